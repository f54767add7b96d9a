//! The daemon's allocator: mimalloc, set to give memory back to the system as it frees it.
//!
//! Why mimalloc: glibc's malloc made up 10–14% of the daemon's samples under the benchmark
//! (`examples/bench.rs`), and its arena locks (shared by the tokio workers, the store's writer
//! and sled's I/O threads) most of the futex wake-ups. In interleaved A/B runs the daemon spent a
//! quarter to a half less CPU per e2e event on mimalloc, and 10–30% less per fanout delivery.
//!
//! Why these options: with mimalloc's defaults, the daemon reopening a million pending
//! deliveries held 2.3 times glibc's memory once serving (98 against 42 MiB), and the backlog
//! scenario's peak (189 MiB) missed its target. Arenas committed on demand and freed pages purged
//! at once brought the reopened daemon to 46–51 MiB and that peak to 136 MiB (glibc: 108).

use libmimalloc_sys as mi;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's option numbers (`mi_option_t` in its `mimalloc.h`, the same in v2 and v3), which
/// `libmimalloc-sys` does not name.
const ARENA_EAGER_COMMIT: mi::mi_option_t = 4;
const PURGE_DELAY: mi::mi_option_t = 15;

/// Runs [`configure`] as the process starts (an ELF constructor), before Rust's runtime allocates
/// anything: an option set in `main` comes too late for the arena mimalloc reserves at the first
/// allocation (measured: no change at all). Linux only; elsewhere mimalloc keeps its defaults.
#[cfg(target_os = "linux")]
#[used]
#[unsafe(link_section = ".init_array")]
static CONFIGURE_AT_START: extern "C" fn() = configure;

/// Sets mimalloc's options as defaults, without allocating: mimalloc's own `MIMALLOC_…` variables
/// (under any of the spellings it reads) still win, whichever of the two runs first.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
extern "C" fn configure() {
    // SAFETY: mi_option_set_default only stores a value in mimalloc's static option table.
    unsafe {
        mi::mi_option_set_default(ARENA_EAGER_COMMIT, 0);
        mi::mi_option_set_default(PURGE_DELAY, 0);
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    const CHILD: &str = "DISPATCHER_ALLOC_TEST_CHILD";
    const NAME: &str = "alloc::tests::the_options_are_set_at_start_and_the_environment_wins";

    fn get(option: mi::mi_option_t) -> std::os::raw::c_long {
        // SAFETY: reads mimalloc's option table.
        unsafe { mi::mi_option_get(option) }
    }

    /// Unit tests run in a process of this binary: the options are set as it starts. Run again
    /// with mimalloc's own variables set, each number reads back the value of the option mimalloc
    /// names so, which ties the numbers above to the names.
    #[test]
    fn the_options_are_set_at_start_and_the_environment_wins() {
        if std::env::var_os(CHILD).is_some() {
            assert_eq!((get(ARENA_EAGER_COMMIT), get(PURGE_DELAY)), (3, 77));
            return;
        }
        if std::env::vars().all(|(k, _)| !k.to_ascii_lowercase().starts_with("mimalloc_")) {
            assert_eq!((get(ARENA_EAGER_COMMIT), get(PURGE_DELAY)), (0, 0));
        }
        let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
            .args([NAME, "--exact", "--test-threads=1"])
            .env(CHILD, "1")
            .env("MIMALLOC_ARENA_EAGER_COMMIT", "3")
            .env("MIMALLOC_PURGE_DELAY", "77")
            .output()
            .expect("the test binary runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("1 passed"), "{stdout}");
    }
}
