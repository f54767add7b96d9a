//! A scheduling hint for the thread every intake answer waits for: the storage writer.
//!
//! Linux's EEVDF scheduler (6.12 and later) lets a thread ask for a shorter time slice than the
//! default (the base slice × (1 + log2 of the CPU count, up to 8 CPUs): 1.4 ms on two CPUs on
//! this project's machines). A thread's virtual deadline is its eligible time plus its slice, so
//! a thread with a short slice that wakes gets an earlier deadline than the threads with the
//! default one, and is picked first; it may preempt the running thread if it has not had more
//! than its share. Its share of the CPU is unchanged (that is the weight, the nice level), and
//! asking takes no privilege. Kernels before 6.12 accept the call and ignore the value; other
//! systems have no such call, and nothing is done there.
//!
//! The writer applies each group of changes and waits for its `fdatasync`, a few hundred µs of
//! CPU at a time; every intake request of the group waits for it (README, Performance).

/// The shortest slice Linux allows, in ns.
pub const SHORT_SLICE_NS: u64 = 100_000;

/// `struct sched_attr` of `sched_setattr(2)`, its first version (56 bytes).
#[cfg(target_os = "linux")]
#[repr(C)]
#[derive(Default)]
struct SchedAttr {
    size: u32,
    sched_policy: u32,
    sched_flags: u64,
    sched_nice: i32,
    sched_priority: u32,
    sched_runtime: u64,
    sched_deadline: u64,
    sched_period: u64,
    sched_util_min: u32,
    sched_util_max: u32,
}

#[cfg(target_os = "linux")]
const ATTR_SIZE: u32 = std::mem::size_of::<SchedAttr>() as u32;
#[cfg(target_os = "linux")]
const _: () = assert!(ATTR_SIZE == 56);

/// Threads the caller starts get the default slice (and policy), not the caller's.
#[cfg(target_os = "linux")]
const SCHED_FLAG_RESET_ON_FORK: u64 = 0x01;

/// The attributes of thread `tid` (0: the calling thread).
#[cfg(target_os = "linux")]
fn get_attr(tid: i32) -> std::io::Result<SchedAttr> {
    let mut attr = SchedAttr::default();
    // SAFETY: `attr` is writable for `ATTR_SIZE` bytes, the size passed; flags 0.
    let r = unsafe {
        libc::syscall(
            libc::SYS_sched_getattr,
            libc::c_long::from(tid),
            &mut attr as *mut SchedAttr,
            libc::c_long::from(ATTR_SIZE),
            0 as libc::c_long,
        )
    };
    if r == 0 {
        Ok(attr)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Asks for the shortest time slice for the calling thread, keeping its policy and nice level
/// (a thread with a policy other than the normal one is left alone). Threads it starts later get
/// the default slice.
#[cfg(target_os = "linux")]
pub fn short_slice() -> std::io::Result<()> {
    let mut attr = get_attr(0)?;
    if attr.sched_policy != libc::SCHED_OTHER as u32 {
        return Ok(());
    }
    attr.size = ATTR_SIZE;
    attr.sched_flags = SCHED_FLAG_RESET_ON_FORK;
    attr.sched_runtime = SHORT_SLICE_NS;
    // SAFETY: `attr` is an initialised `struct sched_attr` whose `size` says how long it is; pid
    // 0 is the calling thread; flags 0.
    let r = unsafe {
        libc::syscall(
            libc::SYS_sched_setattr,
            0 as libc::c_long,
            &attr as *const SchedAttr,
            0 as libc::c_long,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
pub fn short_slice() -> std::io::Result<()> {
    Ok(())
}

/// The time slice of thread `tid` in ns as the kernel reports it: 0 from kernels that keep no
/// slice per thread (before 6.12). For the tests: the daemon only sets it.
#[cfg(all(test, target_os = "linux"))]
fn slice_of(tid: i32) -> std::io::Result<u64> {
    Ok(get_attr(tid)?.sched_runtime)
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// The thread ids of this process whose name is `name`.
    fn threads_named(name: &str) -> Vec<i32> {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|e| {
                let e = e.ok()?;
                let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
                (comm.trim() == name).then(|| e.file_name().to_str()?.parse().ok())?
            })
            .collect()
    }

    /// The slices of the live threads named `name` (a thread that ended meanwhile is left out).
    fn slices_of(name: &str) -> Vec<u64> {
        threads_named(name)
            .into_iter()
            .filter_map(|tid| slice_of(tid).ok())
            .collect()
    }

    /// The default slice of a new thread, or why there is nothing to check here: a kernel that
    /// keeps no slice per thread (before 6.12), or a sandbox that refuses the calls.
    fn supported() -> Option<u64> {
        let probe = std::thread::spawn(|| {
            let default = slice_of(0).ok().filter(|&s| s != 0)?;
            short_slice().ok()?;
            (slice_of(0).ok()? == SHORT_SLICE_NS).then_some(default)
        });
        let default = probe.join().unwrap();
        if default.is_none() {
            eprintln!(
                "this kernel keeps no time slice per thread, or refuses to set one: nothing to check"
            );
        }
        default
    }

    #[test]
    fn the_store_writer_runs_with_the_short_slice_and_sleds_own_threads_do_not() {
        let Some(default) = supported() else { return };
        assert_ne!(default, SHORT_SLICE_NS);
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(dir.path()).unwrap();
        // Every writer sets its slice as it starts (other tests' stores may be starting too):
        // poll with a deadline until each has.
        let deadline = Instant::now() + Duration::from_secs(10);
        let writers = loop {
            let slices = slices_of("sled-writer");
            let done = !slices.is_empty() && slices.iter().all(|&s| s == SHORT_SLICE_NS);
            if done || Instant::now() > deadline {
                break slices;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        assert!(
            !writers.is_empty() && writers.iter().all(|&s| s == SHORT_SLICE_NS),
            "sled-writer threads' slices: {writers:?}, not all {SHORT_SLICE_NS} ns"
        );
        // sled's flusher thread, started with the database, keeps the default; so does the
        // thread that opened the store.
        let flushers = slices_of("log flusher");
        assert!(!flushers.is_empty(), "no sled flusher thread");
        assert!(
            flushers.iter().all(|&s| s == default),
            "flusher slices {flushers:?}, default {default}"
        );
        assert_eq!(slice_of(0).unwrap(), default);
        drop(store);
    }

    #[test]
    fn short_slice_keeps_the_nice_level_and_threads_started_after_get_the_default() {
        let Some(default) = supported() else { return };
        std::thread::spawn(move || {
            // SAFETY: getpriority and setpriority act on the calling thread (who 0, Linux's
            // per-thread nice level) and touch no memory.
            let nice = unsafe {
                let nice = libc::getpriority(libc::PRIO_PROCESS, 0).max(5);
                assert_eq!(libc::setpriority(libc::PRIO_PROCESS, 0, nice), 0);
                nice
            };
            short_slice().unwrap();
            assert_eq!(slice_of(0).unwrap(), SHORT_SLICE_NS);
            // SAFETY: as above.
            assert_eq!(unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }, nice);
            let child = std::thread::spawn(|| slice_of(0).unwrap()).join().unwrap();
            assert_eq!(
                child, default,
                "a thread started by one with the short slice"
            );
        })
        .join()
        .unwrap();
    }
}
