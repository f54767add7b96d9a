//! A scheduling hint for the thread every intake answer waits for: the storage writer.
//!
//! Linux's EEVDF scheduler (6.12 and later) lets a thread ask for a shorter time slice than the
//! default (0.7 ms × (1 + log2 of the CPU count), 1.4 ms on two CPUs). A thread with a shorter
//! slice gets an earlier virtual deadline when it wakes, so it runs before threads that only
//! want their share, and may preempt the one running. Its share of the CPU is unchanged (that is
//! the weight, the nice level), and asking takes no privilege. Kernels before 6.12 accept the
//! call and ignore the value; other systems have no such call, and nothing is done there.
//!
//! The writer applies each group of changes and waits for its `fdatasync`, a few hundred µs of
//! CPU at a time; every intake request of the group waits for it. On a busy machine it woke and
//! then waited for a CPU behind threads in the middle of their slices (README, Performance).

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

/// The attributes of thread `tid` (0: the calling thread).
#[cfg(target_os = "linux")]
fn get_attr(tid: i32) -> std::io::Result<SchedAttr> {
    let mut attr = SchedAttr::default();
    // SAFETY: `attr` is writable for `ATTR_SIZE` bytes, the size passed; flags 0.
    let r = unsafe {
        libc::syscall(
            libc::SYS_sched_getattr,
            tid,
            &mut attr as *mut SchedAttr,
            ATTR_SIZE,
            0,
        )
    };
    if r == 0 {
        Ok(attr)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Asks for the shortest time slice for the calling thread, keeping its policy and nice level
/// (a thread with a policy other than the normal one is left alone).
#[cfg(target_os = "linux")]
pub fn short_slice() -> std::io::Result<()> {
    let mut attr = get_attr(0)?;
    if attr.sched_policy != libc::SCHED_OTHER as u32 {
        return Ok(());
    }
    attr.size = ATTR_SIZE;
    attr.sched_flags = 0;
    attr.sched_runtime = SHORT_SLICE_NS;
    // SAFETY: `attr` is an initialised `struct sched_attr` whose `size` says how long it is; pid
    // 0 is the calling thread; flags 0.
    let r = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0) };
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
/// slice per thread (before 6.12).
#[cfg(target_os = "linux")]
pub fn slice_of(tid: i32) -> std::io::Result<u64> {
    Ok(get_attr(tid)?.sched_runtime)
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

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

    #[test]
    fn the_store_writer_runs_with_the_short_slice_and_other_threads_do_not() {
        let default = slice_of(0).unwrap();
        if default == 0 {
            eprintln!("this kernel keeps no time slice per thread (before 6.12): nothing to check");
            return;
        }
        assert_ne!(
            default, SHORT_SLICE_NS,
            "the test thread already had the short slice"
        );
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(dir.path()).unwrap();
        // The writer sets its slice as it starts: poll for it with a deadline.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let slices = loop {
            let slices: Vec<u64> = threads_named("sled-writer")
                .into_iter()
                .map(|tid| slice_of(tid).unwrap())
                .collect();
            if slices.contains(&SHORT_SLICE_NS) || std::time::Instant::now() > deadline {
                break slices;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        };
        assert!(
            slices.contains(&SHORT_SLICE_NS),
            "no sled-writer thread with a {SHORT_SLICE_NS} ns slice: {slices:?}"
        );
        // The caller's thread keeps its own.
        assert_eq!(slice_of(0).unwrap(), default);
        drop(store);
    }

    #[test]
    fn short_slice_keeps_the_nice_level() {
        std::thread::spawn(|| {
            // SAFETY: setpriority and getpriority on the calling thread (who 0) touch no memory.
            unsafe {
                assert_eq!(libc::setpriority(libc::PRIO_PROCESS, 0, 5), 0);
            }
            short_slice().unwrap();
            let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
            assert_eq!(nice, 5);
            let slice = slice_of(0).unwrap();
            assert!(slice == SHORT_SLICE_NS || slice == 0, "slice {slice}");
        })
        .join()
        .unwrap();
    }
}
