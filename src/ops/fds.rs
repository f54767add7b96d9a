//! The process's file-descriptor table, grown once as the process starts.
//!
//! Linux keeps a process's open files in a table that it doubles when a new descriptor does not
//! fit (a process starts with a table the size of its parent's, at least 64 slots). In a process
//! of more than one thread, the thread that grows it waits for an RCU grace period before it
//! goes on (`expand_fdtable` calls `synchronize_rcu`), and any other thread opening a file or a
//! socket meanwhile waits for it. On this project's machines a grace period took 8–15 ms (`perf
//! record -g -e sched:sched_switch`: the daemon's API worker in `accept4` → `alloc_fd` →
//! `expand_files` → `synchronize_rcu_normal`). With one API worker that is every intake request
//! unanswered for as long, each time the daemon's descriptors first pass the table's size (256
//! once serving, as started by the tests and the bench), then 512, 1,024, …: the benchmark's
//! half-peak run, whose load generator opens a connection per request it cannot send on an idle
//! one, stopped on such stalls (README, Performance).
//!
//! A process of one thread grows its table without waiting, and a table never shrinks; so the
//! daemon grows it to [`SLOTS`] before it starts a thread, raising its soft `RLIMIT_NOFILE` to as
//! much where that is lower (as far as the hard limit allows). The table costs 8 bytes a slot:
//! 32 KiB for 4,096.

/// The slots the daemon reserves: room for thousands of connections (the API's, and the delivery
/// engine's, which `delivery.concurrency` bounds: 512 by default) and sled's files.
pub const SLOTS: usize = 4096;

/// Grows the descriptor table to hold `slots` descriptors, first raising the soft
/// `RLIMIT_NOFILE` to `slots` where it is lower and the hard limit allows (a soft limit of 1,024
/// is common, kept for programs using `select`); with a lower hard limit, the table holds as
/// many as it allows. The table is grown by duplicating a descriptor to the highest slot and
/// closing it again. Returns the slots now reserved (0 where this is not done: other than
/// Linux). Best called before the process starts a second thread (see the module doc).
pub fn reserve(slots: usize) -> std::io::Result<usize> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `limit` is a writable `rlimit`.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let wanted = slots as libc::rlim_t;
        if limit.rlim_cur < wanted {
            let raised = libc::rlimit {
                rlim_cur: wanted.min(limit.rlim_max),
                rlim_max: limit.rlim_max,
            };
            // SAFETY: `raised` is a valid `rlimit` whose hard limit is the current one.
            if raised.rlim_cur > limit.rlim_cur
                && unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0
            {
                limit = raised;
            }
        }
        let want = usize::try_from(limit.rlim_cur).map_or(slots, |cur| cur.min(slots));
        if want == 0 {
            return Ok(0);
        }
        // Any descriptor will do; `/` is there when `/dev/null` is not (a bare chroot).
        let file = std::fs::File::open("/dev/null").or_else(|_| std::fs::File::open("/"));
        let file = match file {
            Ok(file) => file,
            // Every slot up to the limit is taken: the table spans it already.
            Err(e) if e.raw_os_error() == Some(libc::EMFILE) => return Ok(want),
            Err(e) => return Err(e),
        };
        let highest = libc::c_int::try_from(want - 1).unwrap_or(libc::c_int::MAX);
        // SAFETY: F_DUPFD_CLOEXEC duplicates a descriptor this function owns (`file`) to the
        // lowest free descriptor ≥ `highest`; nothing but the `OwnedFd` below holds the copy.
        let dup = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_DUPFD_CLOEXEC, highest) };
        if dup < 0 {
            let e = std::io::Error::last_os_error();
            // The slots from `highest` up to the limit are taken: the table spans them.
            return match e.raw_os_error() {
                Some(libc::EMFILE) => Ok(want),
                _ => Err(e),
            };
        }
        // SAFETY: `dup` was just opened above and is owned by nothing else; dropping it closes it.
        drop(unsafe { OwnedFd::from_raw_fd(dup) });
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
