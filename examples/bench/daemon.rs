//! The real `dispatcher` binary: finding or building it, its generated config, its process (killed
//! when dropped) and its /proc figures.

use crate::stats::{ProcStat, proc_stat};
use anyhow::{Context, Result, bail};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The bench's safety net on a shared machine: a daemon whose resident memory passes `limit_kb`
/// is killed, and the size it reached is kept for the report.
pub struct RssGuard {
    pub limit_kb: u64,
    pub tripped_kb: AtomicU64,
}

/// The daemon settings the bench sets; every other key has its default (SPEC §3).
#[derive(Debug, Clone)]
pub struct Knobs {
    pub per_subscription: usize,
    pub concurrency: usize,
    pub timeout: String,
    pub log_level: String,
}

impl Knobs {
    pub fn describe(&self) -> String {
        format!(
            "delivery.per_subscription = {}, delivery.concurrency = {}, delivery.timeout = {}, \
             log.level = {} (stderr to {}), allow_private = 127.0.0.0/8, disable = more than {} failed \
             attempts within 1s (the backlog fails a million on purpose), durable intake (202 after fsync) as always, \
             every other key at its default",
            self.per_subscription,
            self.concurrency,
            self.timeout,
            self.log_level,
            "/dev/null unless --daemon-log",
            DISABLE_THRESHOLD,
        )
    }
}

/// The disable rule of every bench daemon: more than this many failed attempts within 1 s. The
/// backlog scenario fails a million attempts of one subscription on purpose, which amoCRM's rule
/// (more than 100 in 2 h) would stop; a 1 s window keeps the rule's memory of them small.
pub const DISABLE_THRESHOLD: u32 = 1_000_000;

/// The config file of one daemon: `listen` (`127.0.0.1:0`, or a fixed address for a restart),
/// storage under the scenario's temp dir, and custom policies `(name, after)` of one step each.
pub fn config_toml(
    listen: &str,
    storage: &Path,
    knobs: &Knobs,
    policies: &[(String, String)],
) -> String {
    let mut s = format!(
        "[server]\nlisten = \"{listen}\"\n\n[storage]\npath = {:?}\n\n[delivery]\ntimeout = \"{}\"\n\
         concurrency = {}\nper_subscription = {}\nallow_private = [\"127.0.0.0/8\"]\n\n[disable]\nwindow = \"1s\"\nthreshold = {}\n\n\
         [log]\nlevel = \"{}\"\n",
        storage.display().to_string(),
        knobs.timeout,
        knobs.concurrency,
        knobs.per_subscription,
        DISABLE_THRESHOLD,
        knobs.log_level,
    );
    for (name, after) in policies {
        s.push_str(&format!(
            "\n[retry.policies.{name}]\nsteps = [ {{ after = \"{after}\" }} ]\n"
        ));
    }
    s
}

/// The `dispatcher` binary: `--daemon PATH`, or the one beside this example's own executable,
/// built first with the same profile through cargo (a no-op when it is up to date).
pub fn locate(explicit: Option<&Path>, build: bool) -> Result<PathBuf> {
    if let Some(p) = explicit {
        if !p.is_file() {
            bail!("--daemon {}: no such file", p.display());
        }
        return Ok(p.to_path_buf());
    }
    let exe = std::env::current_exe().context("cannot find the bench's own executable")?;
    // target/<profile>/examples/bench
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("the bench is not inside a cargo target directory; pass --daemon PATH")?
        .to_path_buf();
    let release = profile_dir.file_name().is_some_and(|n| n == "release");
    if build {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(&cargo);
        cmd.args(["build", "--bin", "dispatcher", "--manifest-path"])
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"));
        if release {
            cmd.arg("--release");
        }
        eprintln!(
            "building the daemon: {cargo} build{} --bin dispatcher",
            if release { " --release" } else { "" }
        );
        let status = cmd
            .status()
            .context("cannot run cargo to build the daemon")?;
        if !status.success() {
            bail!("building the dispatcher binary failed ({status})");
        }
    }
    let bin = profile_dir.join("dispatcher");
    if !bin.is_file() {
        bail!(
            "{} does not exist; build it with `cargo build --release --bin dispatcher` or pass --daemon PATH",
            bin.display()
        );
    }
    Ok(bin)
}

/// Checks a config with `dispatcher check-config`, so that a bad one fails with its message.
pub fn check_config(bin: &Path, config: &Path) -> Result<()> {
    let mut cmd = Command::new(bin);
    cmd.args(["check-config", "--config"]).arg(config);
    clear_env(&mut cmd);
    let out = cmd.output().context("cannot run dispatcher check-config")?;
    if !out.status.success() {
        bail!(
            "dispatcher check-config refused the generated config: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn clear_env(cmd: &mut Command) {
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("DISPATCHER_") {
            cmd.env_remove(k);
        }
    }
}

/// A running `dispatcher serve`; killed (SIGKILL) and reaped when dropped.
pub struct Daemon {
    child: Child,
    pub pid: u32,
    /// When `spawn` was called.
    pub spawned: Instant,
    /// The address from its `listening on ADDR` line, and when that line was read.
    listening: Option<(String, Instant)>,
    rx: mpsc::Receiver<(String, Instant)>,
    /// Cleared before the process is reaped, so the watchdog never signals a reused pid.
    alive: Arc<AtomicBool>,
}

impl Daemon {
    /// Starts `dispatcher serve --config CONFIG`; see [`Daemon::poll_listening`].
    pub fn spawn(
        bin: &Path,
        config: &Path,
        log: Option<&Path>,
        guard: &Arc<RssGuard>,
    ) -> Result<Daemon> {
        let mut cmd = Command::new(bin);
        cmd.args(["serve", "--config"])
            .arg(config)
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        clear_env(&mut cmd);
        match log {
            Some(path) => {
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| format!("cannot open {}", path.display()))?;
                cmd.stderr(f);
            }
            None => {
                cmd.stderr(Stdio::null());
            }
        }
        let spawned = Instant::now();
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = line.strip_prefix("listening on ") {
                    let _ = tx.send((addr.trim().to_string(), Instant::now()));
                }
            }
        });
        let alive = Arc::new(AtomicBool::new(true));
        let pid = child.id();
        {
            let (alive, guard) = (alive.clone(), guard.clone());
            std::thread::spawn(move || {
                while alive.load(Ordering::SeqCst) {
                    let Some(st) = proc_stat(&pid.to_string()) else {
                        return;
                    };
                    if st.rss_kb > guard.limit_kb && alive.load(Ordering::SeqCst) {
                        guard.tripped_kb.fetch_max(st.rss_kb, Ordering::SeqCst);
                        let _ = Command::new("kill")
                            .args(["-KILL", &pid.to_string()])
                            .status();
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            });
        }
        Ok(Daemon {
            pid,
            child,
            spawned,
            listening: None,
            rx,
            alive,
        })
    }

    /// Whether the daemon has printed its `listening on` line; an error when it exited instead.
    pub fn poll_listening(&mut self) -> Result<bool> {
        if self.listening.is_some() {
            return Ok(true);
        }
        if let Ok(l) = self.rx.try_recv() {
            self.listening = Some(l);
            return Ok(true);
        }
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "the daemon exited before serving ({status}); rerun with --daemon-log FILE to see why"
            );
        }
        Ok(false)
    }

    /// Waits for the `listening on` line.
    pub async fn wait_listening(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while !self.poll_listening()? {
            if Instant::now() > deadline {
                bail!("the daemon did not print `listening on` within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(())
    }

    pub fn addr(&self) -> &str {
        &self.listening.as_ref().expect("the daemon is listening").0
    }

    pub fn base(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// From spawn to the `listening on` line.
    pub fn listening_after(&self) -> Option<Duration> {
        self.listening
            .as_ref()
            .map(|(_, at)| at.saturating_duration_since(self.spawned))
    }

    pub fn stat(&self) -> Option<ProcStat> {
        proc_stat(&self.pid.to_string())
    }

    /// SIGTERM, then waits for the exit (SIGKILL after `timeout`). Returns the time to exit and
    /// whether the exit was clean (status 0 within the timeout).
    pub async fn terminate(&mut self, timeout: Duration) -> Result<(Duration, bool)> {
        self.alive.store(false, Ordering::SeqCst);
        let t = Instant::now();
        let status = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .context("cannot run kill")?;
        if !status.success() {
            bail!("kill -TERM {} failed", self.pid);
        }
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok((t.elapsed(), s.success()));
            }
            if t.elapsed() > timeout {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return Ok((t.elapsed(), false));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.alive.store(false, Ordering::SeqCst);
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}
