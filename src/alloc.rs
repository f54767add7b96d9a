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

/// mimalloc v3's option numbers (`mi_option_t` in its `mimalloc.h`); `libmimalloc-sys` names
/// only those that v2 and v3 share.
const ARENA_EAGER_COMMIT: mi::mi_option_t = 4;
const PURGE_DELAY: mi::mi_option_t = 15;

/// Runs [`configure`] as the process starts (an ELF constructor), before Rust's runtime allocates
/// anything: an option set in `main` comes too late for the arena mimalloc reserves at the first
/// allocation (measured: no change at all).
#[cfg(target_os = "linux")]
#[used]
#[unsafe(link_section = ".init_array")]
static CONFIGURE_AT_START: extern "C" fn() = configure;

/// Sets mimalloc's options, without allocating. `MIMALLOC_ARENA_EAGER_COMMIT` and
/// `MIMALLOC_PURGE_DELAY` in the environment take precedence (mimalloc reads them itself).
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
extern "C" fn configure() {
    for (option, env, value) in [
        (ARENA_EAGER_COMMIT, c"MIMALLOC_ARENA_EAGER_COMMIT", 0),
        (PURGE_DELAY, c"MIMALLOC_PURGE_DELAY", 0),
    ] {
        // SAFETY: getenv reads the environment, which nothing changes this early; mi_option_set
        // only stores a value in mimalloc's option table.
        unsafe {
            if libc::getenv(env.as_ptr()).is_null() {
                mi::mi_option_set(option, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The option numbers above are those of the mimalloc this build links, and the options are
    /// set as the process starts: unit tests run in a process of this binary.
    #[test]
    fn the_options_are_set_at_start_under_the_linked_mimalloc_numbers() {
        // SAFETY: reads mimalloc's option table and the environment.
        unsafe {
            for (option, env) in [
                (ARENA_EAGER_COMMIT, c"MIMALLOC_ARENA_EAGER_COMMIT"),
                (PURGE_DELAY, c"MIMALLOC_PURGE_DELAY"),
            ] {
                if libc::getenv(env.as_ptr()).is_null() {
                    assert_eq!(mi::mi_option_get(option), 0, "{env:?}");
                }
            }
            // Options next to them keep mimalloc v3's documented defaults, so the numbers do not
            // point one off: purge_decommits (5) is 1, use_numa_nodes (16) is 0, os_tag (18) 100.
            assert_eq!(mi::mi_option_get(5), 1);
            assert_eq!(mi::mi_option_get(16), 0);
            assert_eq!(mi::mi_option_get(18), 100);
        }
    }
}
