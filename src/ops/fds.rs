//! The process's file-descriptor table, grown once as the process starts.
//!
//! Linux keeps a process's open files in a table of 64 slots at first, and doubles it when a new
//! descriptor does not fit. In a process of more than one thread, the thread that grows it waits
//! for an RCU grace period before it goes on (`expand_fdtable` calls `synchronize_rcu`), and any
//! other thread opening a file or a socket meanwhile waits for it. On this project's machines a
//! grace period took 8–15 ms (`perf record -g -e sched:sched_switch`: the daemon's API worker in
//! `accept4` → `alloc_fd` → `expand_files` → `synchronize_rcu_normal`). With one API worker
//! that is every intake request unanswered for as long, each time the connections first pass
//! 64, 128, 256, …: the benchmark's half-peak run, whose load generator opens a connection per
//! request it cannot send on an idle one, stopped on such stalls (README, Performance).
//!
//! A process of one thread grows its table without waiting, and a table never shrinks; so the
//! daemon grows it to [`SLOTS`] (or its `RLIMIT_NOFILE`, if lower) before it starts a thread.
//! The table costs 8 bytes a slot: 32 KiB for 4,096.

/// The slots the daemon reserves: room for thousands of connections (the API's, and the delivery
/// engine's, which `delivery.concurrency` bounds: 512 by default) and sled's files.
pub const SLOTS: usize = 4096;

/// Grows the descriptor table to hold at least `slots` descriptors, or as many as
/// `RLIMIT_NOFILE` allows if that is fewer, by duplicating a descriptor to the highest of them
/// and closing it again. Returns the slots now reserved (0 where this is not done: other than
/// Linux). Best called before the process starts a second thread (see the module doc).
pub fn reserve(slots: usize) -> std::io::Result<usize> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `limit` is a writable `rlimit`.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let want = usize::try_from(limit.rlim_cur).map_or(slots, |cur| cur.min(slots));
        if want == 0 {
            return Ok(0);
        }
        let file = std::fs::File::open("/dev/null")?;
        let highest = libc::c_int::try_from(want - 1).unwrap_or(libc::c_int::MAX);
        // SAFETY: F_DUPFD_CLOEXEC duplicates a descriptor this function owns (`file`) to the
        // lowest free descriptor ≥ `highest`; the duplicate is closed at once and never used.
        let dup = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_DUPFD_CLOEXEC, highest) };
        if dup < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `dup` was just opened above and nothing else holds it.
        unsafe { libc::close(dup) };
        Ok(want)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = slots;
        Ok(0)
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// `FDSize` of /proc/self/status: the slots of this process's descriptor table.
    fn table_size() -> usize {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("FDSize:")).unwrap();
        line["FDSize:".len()..].trim().parse().unwrap()
    }

    #[test]
    fn the_table_holds_the_slots_asked_for_up_to_the_limit() {
        let before = table_size();
        let want = (before * 4).max(1024);
        let got = reserve(want).unwrap();
        assert!(got > 0 && got <= want, "reserved {got} of {want}");
        assert!(table_size() >= got, "FDSize {} < {got}", table_size());
        // The descriptor that grew it is closed again.
        let highest = format!("/proc/self/fd/{}", got - 1);
        assert!(
            std::fs::symlink_metadata(&highest).is_err(),
            "{highest} is open"
        );
    }
}
