//! The real `dispatcher` binary: `check-config`, `serve`, `--help` (SPEC §2, §3). Every run gets
//! its own temp dir as the working directory (so `./dispatcher.toml` is under the test's control)
//! and an environment without `DISPATCHER_*` variables unless a test sets them.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use webhook_dispatcher::config::Config;

/// How long a short command (check-config, a refused serve) may take.
const QUICK: Duration = Duration::from_secs(20);

/// The binary with `dir` as working directory and no `DISPATCHER_*` variables.
fn dispatcher(dir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dispatcher"));
    cmd.current_dir(dir);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("DISPATCHER_") {
            cmd.env_remove(&name);
        }
    }
    cmd
}

/// What a finished run left.
struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Run {
    fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Panics if stderr shows a panic or a backtrace (SPEC §2: never a panic or a backtrace).
    fn assert_no_panic(&self) {
        for marker in ["panicked", "backtrace", "RUST_BACKTRACE"] {
            assert!(
                !self.stderr.contains(marker),
                "stderr shows {marker:?}:\n{}",
                self.stderr
            );
        }
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status.code(),
            self.stdout,
            self.stderr
        )
    }
}

/// Kills the child (our own process, by handle) if a test ends while it still runs.
struct Reaper(Option<Child>);

impl Reaper {
    fn child(&mut self) -> &mut Child {
        self.0.as_mut().unwrap()
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0
            && matches!(child.try_wait(), Ok(None))
        {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Polls until the child exits, or returns `None` at the deadline.
fn wait_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `cmd` to completion within [`QUICK`], its output captured in files of `dir` (so a full
/// pipe can never stall it).
fn run(mut cmd: Command, dir: &Path) -> Run {
    let out = dir.join("run.stdout");
    let err = dir.join("run.stderr");
    cmd.stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap());
    let mut reaper = Reaper(Some(cmd.spawn().expect("spawn dispatcher")));
    let status = wait_exit(reaper.child(), QUICK)
        .unwrap_or_else(|| panic!("dispatcher did not exit within {QUICK:?}"));
    Run {
        status,
        stdout: std::fs::read_to_string(&out).unwrap(),
        stderr: std::fs::read_to_string(&err).unwrap(),
    }
}

/// Writes `text` to `dir/name` and returns the path.
fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// `[storage]` in the temp dir, as TOML.
fn storage(dir: &Path) -> String {
    format!(
        "[storage]\npath = {:?}\n",
        dir.join("db.sled").display().to_string()
    )
}

/// `dispatcher serve --config CONFIG`, expected to stop by itself (a refused start).
fn serve_refused(dir: &Path, config: &Path) -> Run {
    let mut cmd = dispatcher(dir);
    cmd.args(["serve", "--config"]).arg(config);
    run(cmd, dir)
}

/// A refused `serve` that neither listened nor opened its storage in `dir`, without a panic.
fn assert_opened_nothing(dir: &Path, run: &Run) {
    assert!(!run.stdout.contains("listening on"), "it listened: {run}");
    assert!(!dir.join("db.sled").exists(), "storage was opened: {run}");
    run.assert_no_panic();
}

/// `serve_refused` with storage in `dir` and `server.listen = LISTEN`.
fn serve_listening_on(dir: &Path, listen: &str) -> Run {
    let config = format!("[server]\nlisten = \"{listen}\"\n{}", storage(dir));
    serve_refused(dir, &write(dir, "listen.toml", &config))
}

fn check_config(dir: &Path, config: Option<&Path>, env: &[(&str, &str)]) -> Run {
    let mut cmd = dispatcher(dir);
    cmd.arg("check-config");
    if let Some(path) = config {
        cmd.arg("--config").arg(path);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    run(cmd, dir)
}

/// The effective settings printed by check-config, read back as a config.
fn parse_printed(run: &Run) -> Config {
    Config::from_toml_str(&run.stdout, &[])
        .unwrap_or_else(|e| panic!("check-config output does not read back ({e}):\n{run}"))
}

#[test]
fn check_config_prints_the_effective_settings_with_tokens_masked() {
    let dir = tempfile::tempdir().unwrap();
    let token = "s3cr3t-admin-token-0123456789";
    let config = write(
        dir.path(),
        "my.toml",
        &format!(
            "[server]\nlisten = \"127.0.0.1:18080\"\n{}\
             [api]\ntokens = [{{ token = \"{token}\", role = \"admin\" }}]\n\
             [limits]\nmax_batch = 7\n\
             [delivery]\ntimeout = \"1500ms\"\n",
            storage(dir.path())
        ),
    );
    let run = check_config(dir.path(), Some(&config), &[]);
    assert_eq!(run.code(), Some(0), "{run}");
    for needle in [
        "[server]",
        "127.0.0.1:18080",
        "[delivery]",
        "[limits]",
        "[storage]",
    ] {
        assert!(
            run.stdout.contains(needle),
            "output lacks {needle:?}:\n{run}"
        );
    }
    assert!(!run.stdout.contains(token), "the token is printed:\n{run}");
    assert!(
        !run.stderr.contains(token),
        "the token is on stderr:\n{run}"
    );
    assert!(run.stdout.contains("***"), "no masked token shown:\n{run}");
    // The output is the effective config: it reads back with the file's values and the defaults.
    let printed = parse_printed(&run);
    assert_eq!(printed.server.listen.to_string(), "127.0.0.1:18080");
    assert_eq!(printed.limits.max_batch, 7);
    assert_eq!(
        printed.limits.max_subscriptions, 100,
        "a default is missing"
    );
    assert_eq!(printed.delivery.timeout, Duration::from_millis(1500));
    assert_eq!(printed.api.tokens.len(), 1);
    assert_eq!(printed.api.tokens[0].token, "***");
    // Also a default made from another key: the account link from the subdomain.
    assert!(
        run.stdout.contains("link = \"https://example.amocrm.ru\""),
        "{run}"
    );
}

#[test]
fn check_config_names_an_unknown_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(dir.path(), "c.toml", "[delivery]\ntimout = \"2s\"\n");
    let run = check_config(dir.path(), Some(&config), &[]);
    assert_eq!(run.code(), Some(1), "{run}");
    assert!(run.stderr.contains("delivery.timout"), "{run}");
    run.assert_no_panic();
}

#[test]
fn check_config_names_the_key_of_a_bad_value() {
    let dir = tempfile::tempdir().unwrap();
    for (toml, key) in [
        ("[server]\nlisten = \"nope\"\n", "server.listen"),
        ("[delivery]\ntimeout = \"5 parsecs\"\n", "delivery.timeout"),
        ("[server]\nmax_body = \"lots\"\n", "server.max_body"),
        (
            "[limits]\nmax_subscriptions = -1\n",
            "limits.max_subscriptions",
        ),
        (
            "[delivery]\nallow_private = [\"300.0.0.0/8\"]\n",
            "delivery.allow_private",
        ),
    ] {
        let config = write(dir.path(), "c.toml", toml);
        let run = check_config(dir.path(), Some(&config), &[]);
        assert_eq!(run.code(), Some(1), "{toml:?}: {run}");
        assert!(
            run.stderr.contains(key),
            "{toml:?} does not name {key}: {run}"
        );
        assert!(
            run.stdout.is_empty(),
            "{toml:?}: settings printed for a bad config: {run}"
        );
        run.assert_no_panic();
    }
}

#[test]
fn check_config_reports_toml_syntax_errors() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(dir.path(), "broken.toml", "[server\nlisten = 1\n");
    let run = check_config(dir.path(), Some(&config), &[]);
    assert_eq!(run.code(), Some(1), "{run}");
    assert!(
        run.stderr.contains("broken.toml"),
        "the file is not named: {run}"
    );
    run.assert_no_panic();
}

#[test]
fn an_explicit_config_that_does_not_exist_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    // Even with a ./dispatcher.toml present: the explicit path is not silently replaced.
    write(dir.path(), "dispatcher.toml", "[limits]\nmax_batch = 3\n");
    for command in ["check-config", "serve"] {
        let mut cmd = dispatcher(dir.path());
        cmd.args([command, "--config", "/nonexistent.toml"]);
        let run = run(cmd, dir.path());
        assert_ne!(run.code(), Some(0), "{command}: {run}");
        assert!(run.code().is_some(), "{command} died by a signal: {run}");
        assert!(
            run.stderr.contains("/nonexistent.toml"),
            "{command}: the path is not named: {run}"
        );
        run.assert_no_panic();
    }
}

#[test]
fn without_a_config_the_built_in_defaults_apply() {
    let dir = tempfile::tempdir().unwrap();
    let run = check_config(dir.path(), None, &[]);
    assert_eq!(run.code(), Some(0), "{run}");
    assert!(run.stdout.contains("127.0.0.1:8080"), "{run}");
    let mut printed = parse_printed(&run);
    // The link in effect is printed: the default one, made from the subdomain.
    assert_eq!(
        printed.account.link.take(),
        Some(Config::default().account.link())
    );
    assert_eq!(
        printed,
        Config::default(),
        "the defaults are not SPEC §3's: {run}"
    );
    assert_eq!(printed.limits.max_subscriptions, 100);
    assert_eq!(printed.limits.max_batch, 1000);
    assert_eq!(printed.server.max_body, 1024 * 1024);
    assert_eq!(printed.delivery.timeout, Duration::from_secs(2));
    assert!(printed.delivery.allow_private.is_empty());
}

#[test]
fn without_config_flag_the_dispatcher_toml_of_the_cwd_is_read() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "dispatcher.toml",
        "[server]\nlisten = \"127.0.0.1:18181\"\n",
    );
    let run = check_config(dir.path(), None, &[]);
    assert_eq!(run.code(), Some(0), "{run}");
    assert_eq!(
        parse_printed(&run).server.listen.to_string(),
        "127.0.0.1:18181"
    );

    // And its errors are reported as such, not replaced by the defaults.
    write(
        dir.path(),
        "dispatcher.toml",
        "[delivery]\ntimout = \"2s\"\n",
    );
    let run = check_config(dir.path(), None, &[]);
    assert_eq!(run.code(), Some(1), "{run}");
    assert!(run.stderr.contains("delivery.timout"), "{run}");
}

#[test]
fn environment_overrides() {
    let dir = tempfile::tempdir().unwrap();

    let run = check_config(
        dir.path(),
        None,
        &[("DISPATCHER_SERVER_LISTEN", "127.0.0.1:9999")],
    );
    assert_eq!(run.code(), Some(0), "{run}");
    assert!(run.stdout.contains("127.0.0.1:9999"), "{run}");
    assert_eq!(
        parse_printed(&run).server.listen.to_string(),
        "127.0.0.1:9999"
    );

    // The variable wins over the file.
    let config = write(
        dir.path(),
        "c.toml",
        "[server]\nlisten = \"127.0.0.1:18080\"\n[limits]\nmax_batch = 5\n",
    );
    let run = check_config(
        dir.path(),
        Some(&config),
        &[("DISPATCHER_SERVER_LISTEN", "127.0.0.1:9999")],
    );
    assert_eq!(run.code(), Some(0), "{run}");
    let printed = parse_printed(&run);
    assert_eq!(printed.server.listen.to_string(), "127.0.0.1:9999");
    assert_eq!(printed.limits.max_batch, 5, "the rest of the file is lost");

    // A variable for a key that does not exist is an error naming it.
    let run = check_config(dir.path(), None, &[("DISPATCHER_SERVER_BOGUS", "1")]);
    assert_eq!(run.code(), Some(1), "{run}");
    assert!(run.stderr.contains("DISPATCHER_SERVER_BOGUS"), "{run}");
    run.assert_no_panic();

    // A bad value through a variable names the variable.
    let run = check_config(dir.path(), None, &[("DISPATCHER_SERVER_LISTEN", "nope")]);
    assert_eq!(run.code(), Some(1), "{run}");
    assert!(run.stderr.contains("DISPATCHER_SERVER_LISTEN"), "{run}");
    run.assert_no_panic();

    // DISPATCHER_TOKEN is the client's token, not a config key.
    let run = check_config(dir.path(), None, &[("DISPATCHER_TOKEN", "x")]);
    assert_eq!(run.code(), Some(0), "{run}");
    assert!(run.stdout.contains("127.0.0.1:8080"), "{run}");
}

/// Storage another daemon holds, or a path that cannot be made: the message names the storage
/// and the cause once, in words (sled's text repeated it in debug form).
#[test]
fn serve_names_storage_it_cannot_open() {
    let dir = tempfile::tempdir().unwrap();
    let first = common::binary_config(dir.path(), "");
    let (_running, _) = common::start_binary(&first, Stdio::null());
    // The same storage, another port.
    let held = serve_refused(dir.path(), &first);
    assert_eq!(held.code(), Some(1), "{held}");
    let db = dir.path().join("db.sled").display().to_string();
    assert!(
        held.stderr.contains(&format!(
            "cannot open storage at {db}: another process has it open"
        )),
        "{held}"
    );
    assert_eq!(held.stderr.matches("lock").count(), 0, "{held}");
    assert!(!held.stdout.contains("listening on"), "it listened: {held}");
    held.assert_no_panic();

    let config = write(
        dir.path(),
        "nowhere.toml",
        "[server]\nlisten = \"127.0.0.1:0\"\n[storage]\npath = \"/proc/nope/db.sled\"\n",
    );
    let nowhere = serve_refused(dir.path(), &config);
    assert_eq!(nowhere.code(), Some(1), "{nowhere}");
    assert_eq!(
        nowhere.stderr.trim(),
        "dispatcher: cannot open storage at /proc/nope/db.sled: No such file or directory (os error 2)",
        "{nowhere}"
    );
}

/// A port that is taken: the daemon says so and exits before it opens storage, so no lane of
/// it starts an attempt that its exit would cut off.
#[test]
fn serve_that_cannot_listen_opens_no_storage() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let run = serve_listening_on(dir.path(), &addr.to_string());
    assert_eq!(run.code(), Some(1), "{run}");
    assert!(
        run.stderr
            .starts_with(&format!("dispatcher: cannot listen on {addr}: ")),
        "{run}"
    );
    assert_opened_nothing(dir.path(), &run);
}

/// `TOKIO_WORKER_THREADS` sets the worker threads of both runtimes; a value that is no count of
/// threads is refused by name before anything is opened.
#[test]
fn serve_refuses_a_tokio_worker_threads_that_is_no_count() {
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{}",
        storage(dir.path())
    );
    let config = write(dir.path(), "threads.toml", &config);
    let mut cmd = dispatcher(dir.path());
    cmd.args(["serve", "--config"])
        .arg(&config)
        .env("TOKIO_WORKER_THREADS", "two");
    let run = run(cmd, dir.path());
    assert_eq!(run.code(), Some(1), "{run}");
    assert!(
        run.stderr.starts_with(
            "dispatcher: TOKIO_WORKER_THREADS: expected a number of worker threads above 0, got \"two\""
        ),
        "{run}"
    );
    assert_opened_nothing(dir.path(), &run);
}

/// Refused before anything is bound or opened: the test holds the port on loopback, so a bind
/// of the public address would fail first, with `cannot listen`.
#[test]
fn serve_refuses_a_public_listen_address_without_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let run = serve_listening_on(dir.path(), &format!("0.0.0.0:{port}"));
    assert_ne!(run.code(), Some(0), "{run}");
    assert!(run.code().is_some(), "died by a signal: {run}");
    assert!(run.stderr.contains("tokens"), "{run}");
    assert!(
        !run.stderr.contains("cannot listen"),
        "it tried to bind: {run}"
    );
    assert_opened_nothing(dir.path(), &run);
}

#[test]
fn serve_listens_answers_healthz_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        "serve.toml",
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n{}",
            storage(dir.path())
        ),
    );
    let stderr_path = dir.path().join("serve.stderr");
    let mut cmd = dispatcher(dir.path());
    cmd.args(["serve", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr_path).unwrap());
    let mut reaper = Reaper(Some(cmd.spawn().expect("spawn dispatcher serve")));
    let stderr = || std::fs::read_to_string(&stderr_path).unwrap_or_default();

    // Every stdout line, through a channel, so that waiting for one has a deadline.
    let stdout = reaper.child().stdout.take().unwrap();
    let (tx, lines) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + QUICK;
    let addr: std::net::SocketAddr = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => {
                if let Some(addr) = line.strip_prefix("listening on ") {
                    break addr
                        .trim()
                        .parse()
                        .unwrap_or_else(|e| panic!("{line:?}: not an address: {e}"));
                }
            }
            Err(e) => panic!(
                "no `listening on` line within {QUICK:?} ({e}); stderr:\n{}",
                stderr()
            ),
        }
    };
    assert_eq!(addr.ip().to_string(), "127.0.0.1");
    assert_ne!(
        addr.port(),
        0,
        "the real port is printed, not the configured 0"
    );

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (code, body) = rt.block_on(async {
        let r = reqwest::Client::new()
            .get(format!("http://{addr}/healthz"))
            .timeout(QUICK)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET /healthz: {e}"));
        (r.status().as_u16(), r.text().await.unwrap())
    });
    assert_eq!(code, 200, "healthz: {body}");
    assert!(
        dir.path().join("db.sled").exists(),
        "storage is not where configured"
    );

    let pid = reaper.child().id().to_string();
    let status = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -TERM {pid} failed");
    let exited = wait_exit(reaper.child(), Duration::from_secs(15)).unwrap_or_else(|| {
        panic!(
            "serve did not exit within 15s of SIGTERM; stderr:\n{}",
            stderr()
        )
    });
    assert_eq!(
        exited.code(),
        Some(0),
        "exit after SIGTERM; stderr:\n{}",
        stderr()
    );
    let err = stderr();
    assert!(!err.contains("panicked"), "{err}");
    // The port is released.
    std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1))
        .expect_err("the port still accepts connections after exit");
}

#[test]
fn help_lists_the_commands() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = dispatcher(dir.path());
    cmd.arg("--help");
    let run = run(cmd, dir.path());
    assert_eq!(run.code(), Some(0), "{run}");
    for command in ["serve", "check-config"] {
        assert!(
            run.stdout.contains(command),
            "--help lacks {command}: {run}"
        );
    }
}

#[test]
fn an_unknown_command_is_an_error_without_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = dispatcher(dir.path());
    cmd.arg("frobnicate");
    let run = run(cmd, dir.path());
    assert_ne!(run.code(), Some(0), "{run}");
    assert!(run.code().is_some(), "died by a signal: {run}");
    assert!(run.stderr.contains("frobnicate"), "{run}");
    run.assert_no_panic();
}

/// A missing argument is named on one line, after the sentence that introduces it.
#[test]
fn a_missing_argument_is_named_on_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = dispatcher(dir.path());
    cmd.args(["subscriptions", "add", "--events", "add_lead"]);
    let run = run(cmd, dir.path());
    assert_eq!(run.code(), Some(2), "{run}");
    assert_eq!(
        run.stderr.trim(),
        "dispatcher: the following required arguments were not provided: --url <URL> (see `dispatcher --help`)",
        "{run}"
    );
}
