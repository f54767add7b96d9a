//! Percentiles, the clocks the bench measures with, /proc readings and the machine description.

use std::io::Write;
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// The bench's one monotonic clock: every request start, response and arrival in this process is
/// read from it, so latencies never mix clocks. `wall_us` reads the wall clock, used only where
/// the daemon's own wall-clock times (`next_attempt_at`) are compared with an arrival.
pub struct Clock {
    anchor: Instant,
}

impl Clock {
    pub fn new() -> Clock {
        Clock {
            anchor: Instant::now(),
        }
    }

    /// Nanoseconds since the anchor, never 0 (0 marks "no time recorded" in the slot arrays).
    pub fn now_ns(&self) -> u64 {
        self.anchor.elapsed().as_nanos() as u64 + 1
    }
}

/// Microseconds since the Unix epoch on the wall clock.
pub fn wall_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Nearest-rank percentiles of a set of nanosecond values (durations or signed offsets),
/// reported in milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct Pct {
    pub n: usize,
    pub min: f64,
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

pub fn pct_ns(mut v: Vec<i64>) -> Option<Pct> {
    if v.is_empty() {
        return None;
    }
    v.sort_unstable();
    let n = v.len();
    let at = |q: f64| {
        let i = ((q * n as f64).ceil() as usize).clamp(1, n) - 1;
        v[i] as f64 / 1e6
    };
    Some(Pct {
        n,
        min: v[0] as f64 / 1e6,
        p50: at(0.50),
        p99: at(0.99),
        p999: at(0.999),
        max: v[n - 1] as f64 / 1e6,
    })
}

/// Clock ticks per second of /proc/PID/stat's utime and stime.
pub fn clk_tck() -> f64 {
    static TCK: OnceLock<f64> = OnceLock::new();
    *TCK.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|t| *t > 0.0)
            .unwrap_or(100.0)
    })
}

/// A process's memory and CPU time, from /proc/PID/status and /proc/PID/stat.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcStat {
    /// Resident set size now (VmRSS), KiB.
    pub rss_kb: u64,
    /// Peak resident set size over the process's life (VmHWM), KiB.
    pub hwm_kb: u64,
    /// utime + stime, seconds.
    pub cpu_s: f64,
}

/// `pid` is a number or `self`.
pub fn proc_stat(pid: &str) -> Option<ProcStat> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|r| r.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at field 3, `state`;
    // utime and stime are fields 14 and 15.
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ProcStat {
        rss_kb: field("VmRSS:")?,
        hwm_kb: field("VmHWM:")?,
        cpu_s: ticks as f64 / clk_tck(),
    })
}

/// Bytes on disk (allocated blocks, as `du` counts) and apparent bytes under a directory.
pub fn disk_usage(dir: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let mut blocks = 0u64;
    let mut apparent = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            } else {
                blocks += m.blocks() * 512;
                apparent += m.len();
            }
        }
    }
    (blocks, apparent)
}

/// What the figures were measured on.
#[derive(Debug, Clone)]
pub struct Machine {
    pub nproc: usize,
    pub cpu_model: String,
    pub mem_total_mib: u64,
    pub kernel: String,
    pub storage: String,
    /// Appending 4 KiB and fdatasync (the file grows: its size is journaled too).
    pub fsync_append_ms: (f64, f64),
    /// Overwriting 4 KiB in place and fdatasync.
    pub fsync_overwrite_ms: (f64, f64),
}

pub fn machine(dir: &Path) -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|r| r.split_once(':'))
        .map(|(_, m)| m.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_total_mib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|r| r.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        / 1024;
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let fsync_append_ms = fsync_latency(dir, true);
    let fsync_overwrite_ms = fsync_latency(dir, false);
    Machine {
        nproc: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        cpu_model,
        mem_total_mib,
        kernel,
        storage: mount_of(dir),
        fsync_append_ms,
        fsync_overwrite_ms,
    }
}

/// The filesystem holding `dir`, from /proc/mounts (the longest mount point that is a prefix).
fn mount_of(dir: &Path) -> String {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let mut best: Option<(usize, String)> = None;
    for line in mounts.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 3 {
            continue;
        }
        let (dev, point, fs) = (f[0], f[1], f[2]);
        if dir.starts_with(point) && best.as_ref().is_none_or(|(len, _)| point.len() > *len) {
            best = Some((point.len(), format!("{fs} on {dev} (mounted at {point})")));
        }
    }
    format!(
        "{}: {}",
        dir.display(),
        best.map(|b| b.1)
            .unwrap_or_else(|| "unknown filesystem".into())
    )
}

/// p50 and p99 of writing 4 KiB and fdatasync'ing it, 200 times, in ms: appended (the file
/// grows) or overwritten in place.
fn fsync_latency(dir: &Path, append: bool) -> (f64, f64) {
    use std::io::{Seek, SeekFrom};
    let path = dir.join("fsync-probe");
    let Ok(mut f) = std::fs::File::create(&path) else {
        return (f64::NAN, f64::NAN);
    };
    let buf = vec![0x5au8; 4096];
    if f.write_all(&buf).and_then(|_| f.sync_all()).is_err() {
        return (f64::NAN, f64::NAN);
    }
    let mut samples = Vec::with_capacity(200);
    for _ in 0..200 {
        let t = Instant::now();
        if !append && f.seek(SeekFrom::Start(0)).is_err() {
            break;
        }
        if f.write_all(&buf).is_err() || f.sync_data().is_err() {
            break;
        }
        samples.push(t.elapsed().as_nanos() as i64);
    }
    let _ = std::fs::remove_file(&path);
    pct_ns(samples).map_or((f64::NAN, f64::NAN), |p| (p.p50, p.p99))
}

/// CPU time of the whole machine and of this process, from /proc/stat and /proc/self/stat.
#[derive(Debug, Clone, Copy)]
pub struct CpuTotals {
    /// Every CPU's user + nice + system + irq + softirq time, s.
    pub busy_s: f64,
    /// Time the hypervisor ran something else while this machine wanted to run, s.
    pub steal_s: f64,
    /// This process and its reaped children (the daemons, once killed and waited for), s.
    pub self_s: f64,
}

pub fn cpu_totals() -> Option<CpuTotals> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    let at = |i: usize| cpu.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal
    let busy = at(0) + at(1) + at(2) + at(5) + at(6);
    let me = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = me.get(me.rfind(')')? + 1..)?;
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    // utime stime cutime cstime: fields 14-17.
    let mine = f.get(11)? + f.get(12)? + f.get(13)? + f.get(14)?;
    let t = clk_tck();
    Some(CpuTotals {
        busy_s: busy as f64 / t,
        steal_s: at(7) as f64 / t,
        self_s: mine as f64 / t,
    })
}
