//! The client commands of the real `dispatcher` binary (SPEC §2) against the real daemon: `tail`
//! (a line per attempt within a second, reconnecting across a restart), `deliveries`
//! (filters, pages, show, redeliver), `subscriptions`, `emit` (one event, NDJSON in batches) and
//! the error lines. The daemon runs in-process on an ephemeral port (or as the binary, where a
//! restart on the same port is needed); receivers are scripted HTTP servers on loopback.

mod common;

use axum::body::Bytes;
use common::{FAST_POLICIES, Receiver, TestServer, closed_port, wait_for_async};
use serde_json::{Value, json};
use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

/// How long a command or an awaited line may take before the test fails.
const WAIT: Duration = Duration::from_secs(20);

/// The keys of a stream object (SPEC §5.4).
const STREAM_KEYS: [&str; 13] = [
    "at",
    "delivery_id",
    "event_id",
    "event",
    "subscription_id",
    "subscription_name",
    "host",
    "attempt",
    "max_attempts",
    "code",
    "duration_ms",
    "outcome",
    "next_attempt_at",
];

/// The binary with no `DISPATCHER_*` variables from the test's environment.
fn dispatcher_std() -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_dispatcher"));
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("DISPATCHER_") {
            cmd.env_remove(&name);
        }
    }
    cmd.env_remove("NO_COLOR");
    cmd
}

/// What a finished command left.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\n--- stdout ---\n{}--- stderr ---\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

impl Run {
    fn ok(self) -> Run {
        assert_eq!(self.code, Some(0), "{self}");
        self
    }

    fn lines(&self) -> Vec<&str> {
        self.stdout.lines().collect()
    }

    /// Each stdout line as JSON.
    fn json_lines(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}\n{self}")))
            .collect()
    }

    /// A failure: non-zero exit, exactly one line on stderr starting `dispatcher: `, no panic.
    fn one_line_error(&self) -> &str {
        assert!(
            matches!(self.code, Some(c) if c != 0),
            "expected a non-zero exit: {self}"
        );
        for marker in ["panicked", "backtrace", "RUST_BACKTRACE"] {
            assert!(!self.stderr.contains(marker), "{marker}: {self}");
        }
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "expected one line on stderr: {self}");
        assert!(lines[0].starts_with("dispatcher: "), "{self}");
        lines[0]
    }
}

/// Runs the binary with `args` to completion (within [`WAIT`]), feeding it `stdin`.
async fn run_with(args: &[&str], stdin: &str, env: &[(&str, &str)]) -> Run {
    let mut cmd = tokio::process::Command::from(dispatcher_std());
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn dispatcher");
    let mut input = child.stdin.take().expect("piped stdin");
    let stdin = stdin.to_string();
    let feed = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        let _ = input.write_all(stdin.as_bytes()).await;
    });
    let out = tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("dispatcher {args:?} did not finish within {WAIT:?}"))
        .expect("wait for dispatcher");
    let _ = feed.await;
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `dispatcher ARGS --server BASE` with an empty stdin.
async fn cli(base: &str, args: &[&str]) -> Run {
    let mut all = args.to_vec();
    all.extend(["--server", base]);
    run_with(&all, "", &[]).await
}

/// The lines a child writes to one of its pipes, each with the moment a reader thread got it.
struct Lines {
    rx: mpsc::Receiver<(Instant, String)>,
    seen: Vec<(Instant, String)>,
}

impl Lines {
    fn read(pipe: impl Read + Send + 'static) -> Lines {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                if tx.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        Lines {
            rx,
            seen: Vec::new(),
        }
    }

    fn drain(&mut self) {
        while let Ok(l) = self.rx.try_recv() {
            self.seen.push(l);
        }
    }

    /// Every line so far.
    fn all(&mut self) -> Vec<String> {
        self.drain();
        self.seen.iter().map(|(_, l)| l.clone()).collect()
    }

    /// Waits for the first line (seen before or arriving) that passes `pred`.
    async fn wait(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> (Instant, String) {
        self.wait_nth(what, 1, pred).await
    }

    /// Waits for the `n`-th line (from 1; seen before or arriving) that passes `pred`.
    async fn wait_nth(
        &mut self,
        what: &str,
        n: usize,
        pred: impl Fn(&str) -> bool,
    ) -> (Instant, String) {
        let deadline = Instant::now() + WAIT;
        loop {
            self.drain();
            if let Some(hit) = self.seen.iter().filter(|(_, l)| pred(l)).nth(n - 1) {
                return hit.clone();
            }
            if Instant::now() > deadline {
                panic!(
                    "no line with {what} within {WAIT:?}; lines so far:\n{}",
                    self.all().join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// A running `dispatcher tail`: its stdout and stderr lines; killed when dropped.
struct Tail {
    child: Child,
    out: Lines,
    err: Lines,
}

impl Tail {
    /// Starts `dispatcher tail ARGS` and waits until it follows the stream.
    async fn start(args: &[&str]) -> Tail {
        let mut child = dispatcher_std()
            .arg("tail")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn dispatcher tail");
        let out = Lines::read(child.stdout.take().expect("piped stdout"));
        let err = Lines::read(child.stderr.take().expect("piped stderr"));
        let mut tail = Tail { child, out, err };
        tail.err
            .wait("`following`", |l| l.contains("following "))
            .await;
        tail
    }

    /// The JSON stream lines so far.
    fn objects(&mut self) -> Vec<Value> {
        self.out
            .all()
            .iter()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    }

    /// Waits for the stream line of attempt `n` of `delivery` with an outcome (not in_flight).
    async fn wait_outcome(&mut self, delivery: &str, n: u64) -> (Instant, Value) {
        let (at, line) = self
            .out
            .wait(&format!("attempt {n} of {delivery}"), |l| {
                let v: Value = serde_json::from_str(l).unwrap_or(Value::Null);
                v["delivery_id"] == delivery && v["attempt"] == n && v["outcome"] != "in_flight"
            })
            .await;
        (at, serde_json::from_str(&line).unwrap())
    }
}

impl Drop for Tail {
    fn drop(&mut self) {
        // Our own child, by handle.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls the child until it exits, within `timeout`.
async fn wait_exit(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn subscribe(
    server: &TestServer,
    name: &str,
    url: &str,
    events: &[&str],
    retry: &str,
) -> String {
    let sub = server
        .subscribe(json!({"url": url, "events": events, "name": name, "retry": retry}))
        .await;
    sub["id"].as_str().unwrap().to_string()
}

/// Every delivery the daemon lists, newest first (one page of up to 1000).
async fn all_deliveries(server: &TestServer) -> Vec<Value> {
    let (code, page) = server.get("/v1/deliveries?limit=1000").await;
    assert_eq!(code, 200, "{page}");
    assert!(page["next_cursor"].is_null(), "more than one page: {page}");
    page["deliveries"].as_array().unwrap().clone()
}

/// Waits until no delivery is pending or in flight.
async fn wait_all_ended(server: &TestServer, expected: usize) -> Vec<Value> {
    wait_for_async(&format!("{expected} ended deliveries"), WAIT, || async {
        let all = all_deliveries(server).await;
        (all.len() == expected
            && all
                .iter()
                .all(|d| d["status"] == "delivered" || d["status"] == "failed"))
        .then_some(all)
    })
    .await
}

fn ids(v: &[Value]) -> Vec<String> {
    v.iter()
        .map(|d| d["id"].as_str().unwrap().to_string())
        .collect()
}

// --- tail ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tail_json_prints_a_line_for_each_attempt_within_a_second() {
    let server = TestServer::start(FAST_POLICIES).await;
    let ok = Receiver::start(200).await;
    let flaky = Receiver::scripted(vec![500, 503], 200).await;
    let ok_id = subscribe(
        &server,
        "crm-sync",
        &ok.url("/amo"),
        &["add_lead"],
        "amocrm",
    )
    .await;
    let flaky_id = subscribe(
        &server,
        "flaky",
        &flaky.url("/hook"),
        &["status_lead"],
        "fast-amocrm",
    )
    .await;

    let mut tail = Tail::start(&["--json", "--server", &server.base]).await;
    server
        .emit(json!({"event": "add_lead", "data": {"id": 1}}))
        .await;
    server
        .emit(json!({"event": "status_lead", "data": {"id": 2, "status_id": 142}}))
        .await;

    // Every request a receiver got has its line, within a second of it.
    let got_ok = ok.wait_requests(1, WAIT).await;
    let got_flaky = flaky.wait_requests(3, WAIT).await;
    let mut checked = 0;
    for (requests, sub_id, name, event, max, codes) in [
        (&got_ok, &ok_id, "crm-sync", "add_lead", 5, vec![200]),
        (
            &got_flaky,
            &flaky_id,
            "flaky",
            "status_lead",
            5,
            vec![500, 503, 200],
        ),
    ] {
        for (i, req) in requests.iter().enumerate() {
            let n = i as u64 + 1;
            let delivery = req.header("webhook-id");
            let (line_at, line) = tail.wait_outcome(&delivery, n).await;
            let lag = line_at.saturating_duration_since(req.at);
            assert!(
                lag < Duration::from_secs(1),
                "the line of attempt {n} of {delivery} came {lag:?} after the receiver got it"
            );
            assert_eq!(line["event"], event, "{line}");
            assert_eq!(line["subscription_id"], sub_id.as_str(), "{line}");
            assert_eq!(line["subscription_name"], name, "{line}");
            assert_eq!(line["host"], "127.0.0.1", "{line}");
            assert_eq!(line["max_attempts"], max, "{line}");
            assert_eq!(line["code"], codes[i], "{line}");
            assert!(line["duration_ms"].is_u64(), "{line}");
            assert!(line["event_id"].is_string(), "{line}");
            let last = i + 1 == codes.len();
            if last {
                assert_eq!(line["outcome"], "delivered", "{line}");
                assert!(line["next_attempt_at"].is_null(), "{line}");
            } else {
                assert_eq!(line["outcome"], "retrying", "{line}");
                assert!(line["next_attempt_at"].is_string(), "{line}");
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 4);

    // Exactly the daemon's objects: the keys of SPEC §5.4, an in_flight line before each outcome.
    let objects = tail.objects();
    for o in &objects {
        let keys: HashSet<&str> = o.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, HashSet::from(STREAM_KEYS), "{o}");
    }
    let in_flight = objects
        .iter()
        .filter(|o| o["outcome"] == "in_flight")
        .count();
    assert_eq!(in_flight, 4, "one in_flight line per attempt: {objects:?}");
    assert_eq!(objects.len(), 8, "{objects:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tail_filters_by_subscription_name_status_and_event() {
    let server = TestServer::start("").await;
    let a = Receiver::start(200).await;
    let b = Receiver::start(200).await;
    subscribe(
        &server,
        "alpha",
        &a.url("/a"),
        &["add_lead", "status_lead"],
        "amocrm",
    )
    .await;
    subscribe(&server, "beta", &b.url("/b"), &["add_lead"], "amocrm").await;

    let mut tail = Tail::start(&[
        "--server",
        &server.base,
        "--json",
        "--subscription",
        "alpha",
        "--status",
        "delivered",
        "--event",
        "add_lead",
    ])
    .await;
    server
        .emit(json!({"event": "add_lead", "data": {"id": 1}}))
        .await;
    server
        .emit(json!({"event": "status_lead", "data": {"id": 2}}))
        .await;
    wait_all_ended(&server, 3).await;
    // The stream is one ordered channel: once a later event's line is here, the earlier ones
    // would have been too.
    server
        .emit(json!({"event": "add_lead", "data": {"id": 3}}))
        .await;
    let last_a = a
        .wait_requests(3, WAIT)
        .await
        .last()
        .unwrap()
        .header("webhook-id");
    tail.wait_outcome(&last_a, 1).await;
    b.wait_requests(2, WAIT).await;

    let objects = tail.objects();
    assert_eq!(
        objects.len(),
        2,
        "only alpha's delivered add_lead: {objects:?}"
    );
    for o in &objects {
        assert_eq!(o["subscription_name"], "alpha", "{o}");
        assert_eq!(o["outcome"], "delivered", "{o}");
        assert_eq!(o["event"], "add_lead", "{o}");
    }
}

/// A daemon run as the binary on a port of the test's choosing, so it can come back on it.
struct Daemon {
    child: Child,
}

impl Daemon {
    async fn start(config: &Path) -> Daemon {
        let mut child = dispatcher_std()
            .args(["serve", "--config"])
            .arg(config)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn dispatcher serve");
        let mut out = Lines::read(child.stdout.take().expect("piped stdout"));
        out.wait("`listening on`", |l| l.starts_with("listening on "))
            .await;
        Daemon { child }
    }

    /// SIGTERM, then waits for the exit.
    async fn stop(mut self) {
        let pid = self.child.id().to_string();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM {pid}");
        let exited = wait_exit(&mut self.child, WAIT).await;
        assert!(exited.is_some(), "the daemon did not stop within {WAIT:?}");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tail_reconnects_when_the_daemon_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let port = closed_port();
    let base = format!("http://127.0.0.1:{port}");
    let config = dir.path().join("dispatcher.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n[storage]\npath = {:?}\n[delivery]\nallow_private = [\"127.0.0.0/8\"]\n",
            dir.path().join("db.sled").display().to_string()
        ),
    )
    .unwrap();
    let sink = Receiver::start(200).await;

    let daemon = Daemon::start(&config).await;
    cli(
        &base,
        &[
            "subscriptions",
            "add",
            "--url",
            &sink.url("/amo"),
            "--events",
            "add_lead",
            "--name",
            "crm-sync",
        ],
    )
    .await
    .ok();
    // The readable lines this time (stdout is a pipe: no colour).
    let mut tail = Tail::start(&["--server", &base]).await;
    cli(&base, &["emit", "add_lead", "--data", r#"{"id": 1}"#])
        .await
        .ok();
    let first = sink.wait_requests(1, WAIT).await[0].clone();
    let (_, line) = tail
        .out
        .wait("the first delivery", |l| l.contains("delivered"))
        .await;
    let words: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(
        &words[1..],
        [
            "add_lead",
            "crm-sync",
            "127.0.0.1",
            "1/5",
            "200",
            words[6],
            "delivered"
        ],
        "{line}"
    );
    assert!(words[0].ends_with('Z') && words[0].len() == 9, "{line}");
    assert!(words[6].ends_with("ms"), "latency: {line}");
    assert!(!line.contains('\x1b'), "colour on a pipe: {line:?}");

    daemon.stop().await;
    tail.err
        .wait("a note that the stream was lost", |l| {
            l.contains("lost the stream")
        })
        .await;
    let daemon = Daemon::start(&config).await;
    tail.err
        .wait("a note that tail reconnected", |l| {
            l.contains("reconnected")
        })
        .await;
    cli(&base, &["emit", "add_lead", "--data", r#"{"id": 2}"#])
        .await
        .ok();
    let second = sink.wait_requests(2, WAIT).await[1].clone();
    assert_ne!(first.header("webhook-id"), second.header("webhook-id"));
    let lines = {
        // Two attempts in the same second with the same latency print the same line.
        tail.out
            .wait_nth("a second delivered line", 2, |l| l.contains("delivered"))
            .await;
        tail.out.all()
    };
    assert_eq!(
        lines.len(),
        2,
        "one line per attempt, none twice: {lines:?}"
    );
    assert!(tail.child.try_wait().unwrap().is_none(), "tail exited");
    drop(tail);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tail_ends_quietly_when_its_reader_goes_away() {
    let server = TestServer::start("").await;
    let sink = Receiver::start(200).await;
    subscribe(&server, "s", &sink.url("/"), &["add_lead"], "amocrm").await;
    let mut tail = Tail::start(&["--json", "--server", &server.base]).await;
    // Close the read end of tail's stdout: the next line it writes meets a broken pipe.
    let stdout = std::mem::replace(&mut tail.out, Lines::read(std::io::empty()));
    drop(stdout);
    let mut n = 0;
    let status = loop {
        n += 1;
        server
            .emit(json!({"event": "add_lead", "data": {"id": n}}))
            .await;
        if let Some(status) = wait_exit(&mut tail.child, Duration::from_millis(200)).await {
            break status;
        }
        assert!(n < 50, "tail did not end after its reader went away");
    };
    assert_eq!(status.code(), Some(0));
    let err = tail.err.all().join("\n");
    assert!(!err.contains("panicked"), "{err}");
}

// --- deliveries ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deliveries_list_filters_and_pages_through_every_record() {
    let server = TestServer::start("").await;
    let ok = Receiver::start(200).await;
    let gone = Receiver::start(404).await;
    let alpha = subscribe(
        &server,
        "alpha",
        &ok.url("/a"),
        &["add_lead", "status_lead"],
        "amocrm",
    )
    .await;
    let beta = subscribe(&server, "beta", &gone.url("/b"), &["add_lead"], "once").await;
    for i in 0..3 {
        server
            .emit(json!({"event": "add_lead", "data": {"id": i}}))
            .await;
    }
    for i in 0..2 {
        server
            .emit(json!({"event": "status_lead", "data": {"id": 10 + i}}))
            .await;
    }
    let all = wait_all_ended(&server, 8).await;
    let base = server.base.as_str();

    // --all follows the cursor across pages of 2: every record once, newest first.
    let run = cli(
        base,
        &["deliveries", "list", "--all", "--limit", "2", "--json"],
    )
    .await
    .ok();
    assert_eq!(ids(&run.json_lines()), ids(&all), "{run}");
    assert!(run.stderr.is_empty(), "{run}");

    // Without --all: one page, and a note on stderr with the cursor of the next.
    let mut paged = Vec::new();
    let mut cursor: Option<String> = None;
    for expected in [3, 3, 2] {
        let mut args = vec!["deliveries", "list", "--limit", "3", "--json"];
        if let Some(c) = &cursor {
            args.extend(["--cursor", c.as_str()]);
        }
        let run = cli(base, &args).await.ok();
        let page = run.json_lines();
        assert_eq!(page.len(), expected, "{run}");
        paged.extend(page);
        cursor = run
            .stderr
            .split_whitespace()
            .skip_while(|w| *w != "--cursor")
            .nth(1)
            .map(str::to_string);
        assert_eq!(cursor.is_some(), expected == 3, "{run}");
    }
    assert_eq!(ids(&paged), ids(&all));

    // Filters, alone and together, by subscription name or id.
    let expect = |pred: &dyn Fn(&Value) -> bool| -> Vec<String> {
        ids(&all.iter().filter(|d| pred(d)).cloned().collect::<Vec<_>>())
    };
    for (args, want) in [
        (
            vec!["--status", "failed"],
            expect(&|d| d["status"] == "failed"),
        ),
        (
            vec!["--subscription", "alpha"],
            expect(&|d| d["subscription_id"] == alpha.as_str()),
        ),
        (
            vec!["--subscription", beta.as_str()],
            expect(&|d| d["subscription_id"] == beta.as_str()),
        ),
        (
            vec!["--event", "status_lead"],
            expect(&|d| d["event"] == "status_lead"),
        ),
        (
            vec![
                "--subscription",
                "alpha",
                "--event",
                "add_lead",
                "--status",
                "delivered",
            ],
            expect(&|d| {
                d["subscription_id"] == alpha.as_str()
                    && d["event"] == "add_lead"
                    && d["status"] == "delivered"
            }),
        ),
        (vec!["--since", "1h"], ids(&all)),
        (vec!["--since", "2099-01-01T00:00:00Z"], vec![]),
    ] {
        let mut full = vec!["deliveries", "list", "--all", "--limit", "2", "--json"];
        full.extend(args.iter().copied());
        let run = cli(base, &full).await.ok();
        assert_eq!(ids(&run.json_lines()), want, "{args:?}: {run}");
    }
    assert_eq!(expect(&|d| d["status"] == "failed").len(), 3);
    assert_eq!(expect(&|d| d["subscription_id"] == alpha.as_str()).len(), 5);

    // The table: one header over all pages, names for subscriptions, the last code.
    let run = cli(
        base,
        &[
            "deliveries",
            "list",
            "--all",
            "--limit",
            "2",
            "--subscription",
            "beta",
        ],
    )
    .await
    .ok();
    let lines = run.lines();
    assert_eq!(lines.len(), 4, "a header and 3 rows: {run}");
    assert!(
        lines[0].starts_with("ID ") && lines[0].contains("STATUS"),
        "{run}"
    );
    for (line, d) in lines[1..]
        .iter()
        .zip(all.iter().filter(|d| d["subscription_id"] == beta.as_str()))
    {
        let words: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(words[0], d["id"].as_str().unwrap(), "{run}");
        assert_eq!(
            &words[2..],
            ["failed", "1", "404", "-", "add_lead", "beta"],
            "{run}"
        );
    }

    // A subscription name that does not exist is an error, not an empty list.
    let run = cli(base, &["deliveries", "list", "--subscription", "gamma"]).await;
    assert!(run.one_line_error().contains("\"gamma\""), "{run}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redeliver_and_recover_schedule_attempts_that_arrive() {
    let server = TestServer::start("").await;
    let rx = Receiver::scripted(vec![500, 500], 200).await;
    subscribe(
        &server,
        "once",
        &rx.url("/hook"),
        &["add_lead", "update_lead"],
        "once",
    )
    .await;
    server
        .emit(json!({"event": "add_lead", "data": {"id": 1}}))
        .await;
    let first = rx.wait_requests(1, WAIT).await[0].clone();
    let id = first.header("webhook-id");
    server.wait_delivery_status(&id, "failed", WAIT).await;
    let base = server.base.as_str();

    let run = cli(base, &["deliveries", "redeliver", &id]).await.ok();
    assert!(run.stdout.contains("attempt 2"), "{run}");
    let second = rx.wait_requests(2, WAIT).await[1].clone();
    assert_eq!(second.header("webhook-id"), id, "the same delivery, again");
    server.wait_delivery_status(&id, "failed", WAIT).await;
    // And once more, now answered 200.
    cli(base, &["deliveries", "redeliver", &id]).await.ok();
    rx.wait_requests(3, WAIT).await;
    server.wait_delivery_status(&id, "delivered", WAIT).await;

    // `show` prints every attempt with its code and the receiver's answer.
    let run = cli(base, &["deliveries", "show", &id]).await.ok();
    assert!(run.stdout.contains(&format!("delivery      {id}")), "{run}");
    assert!(run.stdout.contains("add_lead"), "{run}");
    assert!(
        run.stdout.contains("once  ("),
        "the subscription's name: {run}"
    );
    assert!(run.stdout.contains("status        delivered"), "{run}");
    assert!(run.stdout.contains("attempts      3"), "{run}");
    for (n, code) in [(1, 500), (2, 500), (3, 200)] {
        let line = run
            .lines()
            .into_iter()
            .find(|l| l.trim_start().starts_with(&format!("#{n} ")))
            .unwrap_or_else(|| panic!("no attempt #{n}: {run}"))
            .to_string();
        assert!(line.contains(&format!("  {code}  ")), "{line}");
    }
    assert_eq!(
        run.stdout
            .matches(&"answer: answer 500".to_string())
            .count(),
        2,
        "{run}"
    );
    let json_run = cli(base, &["deliveries", "show", &id, "--json"]).await.ok();
    let shown: Value = serde_json::from_str(&json_run.stdout).unwrap();
    assert_eq!(shown, server.delivery(&id).await);

    // recover: every failed delivery of the subscription since a time goes out again.
    let rx2 = Receiver::scripted(vec![500], 200).await;
    subscribe(&server, "two", &rx2.url("/x"), &["update_lead"], "once").await;
    server
        .emit(json!({"event": "update_lead", "data": {"id": 2}}))
        .await;
    let failed = rx2.wait_requests(1, WAIT).await[0].header("webhook-id");
    server.wait_delivery_status(&failed, "failed", WAIT).await;
    let run = cli(base, &["subscriptions", "recover", "two", "--since", "1h"])
        .await
        .ok();
    assert!(run.stdout.starts_with("1 failed delivery "), "{run}");
    rx2.wait_requests(2, WAIT).await;
    server
        .wait_delivery_status(&failed, "delivered", WAIT)
        .await;

    // Unknown ids are the daemon's 404, as one line.
    let run = cli(
        base,
        &[
            "deliveries",
            "redeliver",
            "0190a0a0-0000-7000-8000-000000000000",
        ],
    )
    .await;
    let line = run.one_line_error();
    assert!(
        line.contains("404 Not Found") && line.contains("no delivery with id"),
        "{line}"
    );
}

// --- subscriptions ------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn subscriptions_add_list_show_disable_enable_remove() {
    let server = TestServer::start("").await;
    let rx = Receiver::start(200).await;
    let base = server.base.as_str();

    let run = cli(
        base,
        &[
            "subscriptions",
            "add",
            "--url",
            &rx.url("/amo"),
            "--events",
            "add_lead,status_lead",
            "--name",
            "crm-sync",
            "--format",
            "json",
            "--retry",
            "creatio",
            "--header",
            "X-Api-Key: k3y",
        ],
    )
    .await
    .ok();
    let field = |run: &Run, key: &str| -> String {
        run.lines()
            .into_iter()
            .find_map(|l| {
                l.strip_prefix(&format!("{key} "))
                    .map(|v| v.trim().to_string())
            })
            .unwrap_or_else(|| panic!("no {key}: {run}"))
    };
    let id = field(&run, "id");
    let secret = field(&run, "secret");
    assert!(secret.starts_with("whsec_"), "{run}");
    assert_eq!(field(&run, "events"), "add_lead, status_lead");
    assert_eq!(field(&run, "state"), "enabled");
    let (_, stored) = server.get(&format!("/v1/subscriptions/{id}")).await;
    assert_eq!(stored["secret"], secret.as_str());
    assert_eq!(stored["format"], "json");
    assert_eq!(stored["retry"], "creatio");
    assert_eq!(stored["headers"]["X-Api-Key"], "k3y");

    // The table, and --json with the daemon's objects.
    let run = cli(base, &["subscriptions", "list"]).await.ok();
    let lines = run.lines();
    assert_eq!(lines.len(), 2, "{run}");
    assert!(
        lines[0].starts_with("ID ") && lines[0].contains("URL"),
        "{run}"
    );
    let words: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        words,
        [
            id.as_str(),
            "crm-sync",
            "enabled",
            "json",
            "creatio",
            "add_lead,status_lead",
            &rx.url("/amo")
        ],
        "{run}"
    );
    assert!(
        !run.stdout.contains("whsec_"),
        "a list shows no secret: {run}"
    );
    let run = cli(base, &["subscriptions", "list", "--json"]).await.ok();
    assert_eq!(run.json_lines()[0]["id"], id.as_str(), "{run}");

    // Disable by name: new deliveries are held, not sent.
    let run = cli(base, &["subscriptions", "disable", "crm-sync"])
        .await
        .ok();
    assert_eq!(
        run.stdout.trim(),
        format!("subscription {id} (crm-sync) is disabled (admin)")
    );
    let (_, stored) = server.get(&format!("/v1/subscriptions/{id}")).await;
    assert_eq!(stored["enabled"], false);
    let receipt = server
        .emit(json!({"event": "add_lead", "data": {"id": 7}}))
        .await;
    assert_eq!(receipt["deliveries"], 1);
    let run = cli(base, &["subscriptions", "show", &id]).await.ok();
    assert_eq!(field(&run, "state"), "disabled (admin)");
    assert_eq!(rx.count(), 0, "a disabled subscription's delivery went out");

    // Enable: the held delivery goes out.
    let run = cli(base, &["subscriptions", "enable", &id]).await.ok();
    assert!(run.stdout.trim().ends_with("is enabled"), "{run}");
    rx.wait_requests(1, WAIT).await;

    // Remove, then it is gone, and removing it again is the daemon's 404.
    let run = cli(base, &["subscriptions", "remove", "crm-sync"])
        .await
        .ok();
    assert_eq!(run.stdout.trim(), format!("removed subscription {id}"));
    let (code, _) = server.get(&format!("/v1/subscriptions/{id}")).await;
    assert_eq!(code, 404);
    let run = cli(base, &["subscriptions", "list", "--json"]).await.ok();
    assert!(run.stdout.is_empty(), "{run}");
    let run = cli(base, &["subscriptions", "rm", &id]).await;
    assert!(run.one_line_error().contains("404 Not Found"), "{run}");

    // A refused field: the daemon's 422 detail.
    let run = cli(
        base,
        &[
            "subscriptions",
            "add",
            "--url",
            "ftp://x/",
            "--events",
            "add_lead",
        ],
    )
    .await;
    let line = run.one_line_error();
    assert!(
        line.contains("422 Unprocessable Entity") && line.contains("url"),
        "{line}"
    );

    // Two subscriptions with one name: the name is ambiguous, the ids are listed.
    let a = subscribe(&server, "dup", &rx.url("/1"), &["add_lead"], "amocrm").await;
    let b = subscribe(&server, "dup", &rx.url("/2"), &["add_lead"], "amocrm").await;
    let run = cli(base, &["subscriptions", "disable", "dup"]).await;
    let line = run.one_line_error();
    assert!(line.contains(&a) && line.contains(&b), "{line}");
}

// --- emit ---------------------------------------------------------------------------------------

/// A pass-through proxy in front of the daemon that records each request's path and body, to
/// count the requests `emit` makes.
struct RecordingProxy {
    base: String,
    log: Arc<Mutex<Vec<(String, Bytes)>>>,
}

impl RecordingProxy {
    async fn start(target: &str) -> RecordingProxy {
        let log: Arc<Mutex<Vec<(String, Bytes)>>> = Arc::default();
        let client = reqwest::Client::new();
        let target = target.to_string();
        let rec = log.clone();
        let app = axum::Router::new().fallback(
            move |method: axum::http::Method,
                  uri: axum::http::Uri,
                  headers: axum::http::HeaderMap,
                  body: Bytes| {
                let client = client.clone();
                let target = target.clone();
                let rec = rec.clone();
                async move {
                    rec.lock()
                        .unwrap()
                        .push((uri.path().to_string(), body.clone()));
                    let mut req = client.request(method, format!("{target}{uri}"));
                    for (k, v) in &headers {
                        if k != "host" {
                            req = req.header(k, v);
                        }
                    }
                    let resp = req.body(body).send().await.unwrap();
                    let status = resp.status();
                    let ct = resp.headers().get("content-type").cloned();
                    let body = resp.bytes().await.unwrap();
                    let mut out = axum::response::Response::new(axum::body::Body::from(body));
                    *out.status_mut() = status;
                    if let Some(ct) = ct {
                        out.headers_mut().insert("content-type", ct);
                    }
                    out
                }
            },
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        RecordingProxy {
            base: format!("http://{addr}"),
            log,
        }
    }

    /// The number of events in each `POST /v1/events` so far.
    fn batches(&self) -> Vec<usize> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| p == "/v1/events")
            .map(|(_, body)| {
                let v: Value = serde_json::from_slice(body).unwrap();
                v["events"].as_array().map_or(1, Vec::len)
            })
            .collect()
    }
}

/// The `id` of the lead in an amoCRM form body.
fn lead_id(body: &str) -> String {
    body.split('&')
        .find_map(|kv| kv.strip_prefix("leads%5Badd%5D%5B0%5D%5Bid%5D="))
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn emit_one_event_and_ndjson_from_stdin_in_batches() {
    let server = TestServer::start("").await;
    let rx = Receiver::start(200).await;
    subscribe(&server, "sink", &rx.url("/amo"), &["add_lead"], "amocrm").await;
    let proxy = RecordingProxy::start(&server.base).await;

    // One event: its receipt, and the data as given (key order kept).
    let run = run_with(
        &[
            "emit",
            "add_lead",
            "--data",
            r#"{"id": 100, "name": "Сделка", "price": 5}"#,
            "--server",
            &proxy.base,
        ],
        "",
        &[],
    )
    .await
    .ok();
    let words: Vec<&str> = run.stdout.split_whitespace().collect();
    assert_eq!(words.len(), 3, "{run}");
    assert_eq!(&words[1..], ["1", "delivery"], "{run}");
    let got = rx.wait_requests(1, WAIT).await;
    let body = got[0].body_str();
    assert_eq!(lead_id(&body), "100");
    assert!(
        body.find("name%5D").unwrap() < body.find("price%5D").unwrap(),
        "key order: {body}"
    );
    assert_eq!(proxy.batches(), vec![1]);

    // NDJSON: 5 events (and a blank line) in batches of 2 -> 3 requests, 5 receipts, 5 deliveries.
    let ndjson: String = (1..=5)
        .map(|i| format!("{{\"event\": \"add_lead\", \"data\": {{\"id\": {i}}}}}\n"))
        .collect::<String>()
        .replacen('\n', "\n\n", 1);
    let run = run_with(
        &["emit", "--batch", "2", "--server", &proxy.base],
        &ndjson,
        &[],
    )
    .await
    .ok();
    assert_eq!(proxy.batches(), vec![1, 2, 2, 1], "{run}");
    let receipts = run.lines();
    assert_eq!(receipts.len(), 5, "{run}");
    let receipt_ids: HashSet<&str> = receipts
        .iter()
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(receipt_ids.len(), 5, "{run}");
    let got = rx.wait_requests(6, WAIT).await;
    let delivered: HashSet<String> = got[1..].iter().map(|r| lead_id(&r.body_str())).collect();
    assert_eq!(delivered, (1..=5).map(|i| i.to_string()).collect());

    // --json prints the daemon's receipts.
    let run = run_with(
        &["emit", "--json", "--server", &proxy.base],
        "{\"event\": \"add_lead\", \"data\": {\"id\": 6}}\n",
        &[],
    )
    .await
    .ok();
    let r = &run.json_lines()[0];
    assert!(r["id"].is_string() && r["deliveries"] == 1, "{run}");
    rx.wait_requests(7, WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn emit_stops_at_a_bad_line_and_says_what_was_sent() {
    let server = TestServer::start("").await;
    let rx = Receiver::start(200).await;
    subscribe(&server, "sink", &rx.url("/amo"), &["add_lead"], "amocrm").await;
    let proxy = RecordingProxy::start(&server.base).await;
    let event = |i: u32| format!("{{\"event\": \"add_lead\", \"data\": {{\"id\": {i}}}}}\n");

    // Line 4 is not JSON: the batch of lines 1-2 was sent, nothing from line 3 on.
    let input = format!(
        "{}{}{}{{\"event\": oops}}\n{}",
        event(1),
        event(2),
        event(3),
        event(5)
    );
    let run = run_with(
        &["emit", "--batch", "2", "--server", &proxy.base],
        &input,
        &[],
    )
    .await;
    let line = run.one_line_error().to_string();
    assert!(line.contains("line 4: not JSON"), "{line}");
    assert!(line.contains("column 11"), "{line}");
    assert!(
        line.contains("lines 1-2 were sent and accepted (2 events in 1 batch); nothing from line 3 on was sent"),
        "{line}"
    );
    assert_eq!(
        run.lines().len(),
        2,
        "the receipts of the sent batch: {run}"
    );
    assert_eq!(proxy.batches(), vec![2]);
    let got = rx.wait_requests(2, WAIT).await;
    let delivered: HashSet<String> = got.iter().map(|r| lead_id(&r.body_str())).collect();
    assert_eq!(delivered, HashSet::from(["1".to_string(), "2".to_string()]));

    // An event the daemon refuses (line 3 of a batch of lines 3-4): named by its line.
    let input = format!(
        "{}{}{{\"event\": \"fly_lead\", \"data\": {{\"id\": 3}}}}\n{}",
        event(11),
        event(12),
        event(14)
    );
    let run = run_with(
        &["emit", "--batch", "2", "--server", &proxy.base],
        &input,
        &[],
    )
    .await;
    let line = run.one_line_error().to_string();
    assert!(
        line.starts_with("dispatcher: line 3: the daemon refused the event (400 Bad Request): unknown event \"fly_lead\""),
        "{line}"
    );
    assert!(line.contains("nothing from line 3 on was sent"), "{line}");
    assert_eq!(
        proxy.batches(),
        vec![2, 2, 2],
        "the refused batch was tried once"
    );

    // A line that is JSON but not an object.
    let run = run_with(&["emit", "--server", &proxy.base], "[1, 2]\n", &[]).await;
    let line = run.one_line_error();
    assert!(
        line.contains("line 1: an event must be a JSON object"),
        "{line}"
    );
    assert!(line.ends_with("nothing was sent"), "{line}");
}

// --- errors -------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn errors_are_one_line_and_a_non_zero_exit() {
    // The daemon is down: every client command says where it looked and why it failed.
    let down = format!("http://127.0.0.1:{}", closed_port());
    for args in [
        vec!["subscriptions", "list"],
        vec![
            "subscriptions",
            "add",
            "--url",
            "http://127.0.0.1:1/",
            "--events",
            "add_lead",
        ],
        vec!["deliveries", "list"],
        vec!["deliveries", "show", "0190a0a0-0000-7000-8000-000000000001"],
        vec!["tail"],
        vec!["tail", "--json"],
        vec!["emit", "add_lead", "--data", "{\"id\": 1}"],
    ] {
        let run = cli(&down, &args).await;
        assert_eq!(
            run.one_line_error(),
            format!("dispatcher: cannot reach the daemon at {down}: connection refused"),
            "{args:?}"
        );
    }
    let run = run_with(
        &["emit", "--server", &down],
        "{\"event\": \"add_lead\", \"data\": {\"id\": 1}}\n",
        &[],
    )
    .await;
    assert!(
        run.one_line_error().starts_with(&format!(
            "dispatcher: cannot reach the daemon at {down}: connection refused; nothing was sent"
        )),
        "{run}"
    );

    let server = TestServer::start("").await;
    let base = server.base.as_str();
    // The daemon's 4xx problem: its status and detail.
    let missing = "0190a0a0-0000-7000-8000-00000000beef";
    let run = cli(base, &["deliveries", "show", missing]).await;
    assert_eq!(
        run.one_line_error(),
        format!("dispatcher: the daemon answered 404 Not Found: no delivery with id {missing}")
    );
    // Not an id at all: refused before it becomes part of a URL path.
    let run = cli(base, &["deliveries", "show", "../subscriptions"]).await;
    assert!(
        run.one_line_error().contains("is not a delivery id"),
        "{run}"
    );
    let run = cli(base, &["emit", "fly_lead", "--data", "{\"id\": 1}"]).await;
    let line = run.one_line_error();
    assert!(
        line.starts_with(
            "dispatcher: the daemon answered 400 Bad Request: unknown event \"fly_lead\""
        ),
        "{line}"
    );
    let run = cli(base, &["tail", "--event", "fly_lead"]).await;
    assert!(run.one_line_error().contains("400 Bad Request"), "{run}");

    // Bad input caught before anything is sent.
    let run = cli(base, &["emit", "add_lead", "--data", "{\"id\": 1"]).await;
    assert_eq!(
        run.one_line_error(),
        "dispatcher: --data is not JSON: EOF while parsing an object at column 8"
    );
    let run = cli(base, &["deliveries", "list", "--since", "last tuesday"]).await;
    assert!(
        run.one_line_error().contains("--since \"last tuesday\""),
        "{run}"
    );
    let run = cli("ftp://127.0.0.1:1", &["deliveries", "list"]).await;
    assert!(run.one_line_error().contains("--server"), "{run}");

    // Usage errors: clap's message on one line.
    for (args, needle) in [
        (vec!["deliveries", "frobnicate"], "frobnicate"),
        (vec!["frobnicate"], "frobnicate"),
        (
            vec!["deliveries", "list", "--status", "lost"],
            "possible values",
        ),
        (vec!["emit", "add_lead"], "--data"),
        (
            vec!["emit", "add_lead", "--data", "{}", "--batch", "5"],
            "--batch",
        ),
        (
            vec!["serve"],
            "--server and --token are for the client commands",
        ),
    ] {
        let run = cli(base, &args).await;
        let line = run.one_line_error();
        assert!(line.contains(needle), "{args:?}: {line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_token_comes_from_the_flag_anywhere_or_the_environment() {
    let server = TestServer::start(
        "[api]\ntokens = [{ token = \"admin-t0ken\", role = \"admin\" }, { token = \"reader-t0ken\", role = \"reader\" }]\n",
    )
    .await;
    let base = server.base.as_str();
    let run = run_with(&["subscriptions", "list", "--server", base], "", &[]).await;
    let line = run.one_line_error();
    assert!(
        line.contains("401 Unauthorized") && line.contains("DISPATCHER_TOKEN"),
        "{line}"
    );

    for args in [
        vec![
            "--token",
            "admin-t0ken",
            "--server",
            base,
            "subscriptions",
            "list",
            "--json",
        ],
        vec![
            "subscriptions",
            "--token",
            "admin-t0ken",
            "list",
            "--server",
            base,
            "--json",
        ],
        vec![
            "subscriptions",
            "list",
            "--json",
            "--server",
            base,
            "--token",
            "admin-t0ken",
        ],
    ] {
        run_with(&args, "", &[]).await.ok();
    }
    run_with(
        &["deliveries", "list", "--server", base],
        "",
        &[("DISPATCHER_TOKEN", "reader-t0ken")],
    )
    .await
    .ok();
    // A reader may not add: the daemon's 403, with the hint.
    let run = run_with(
        &[
            "subscriptions",
            "add",
            "--url",
            "http://127.0.0.1:9/",
            "--events",
            "add_lead",
            "--server",
            base,
        ],
        "",
        &[("DISPATCHER_TOKEN", "reader-t0ken")],
    )
    .await;
    let line = run.one_line_error();
    assert!(line.contains("403 Forbidden"), "{line}");
    assert!(
        !line.contains("reader-t0ken"),
        "the token is printed: {line}"
    );
    // The flag wins over the variable.
    run_with(
        &[
            "subscriptions",
            "add",
            "--url",
            "http://127.0.0.1:9/",
            "--events",
            "add_lead",
            "--server",
            base,
            "--token",
            "admin-t0ken",
        ],
        "",
        &[("DISPATCHER_TOKEN", "reader-t0ken")],
    )
    .await
    .ok();
    // A token that cannot be a header value is a usage error, not a transport one.
    let run = run_with(
        &["deliveries", "list", "--server", base, "--token", "a\nb"],
        "",
        &[],
    )
    .await;
    assert!(run.one_line_error().contains("the token"), "{run}");
    // --help does not print the variable's value.
    let run = run_with(
        &["tail", "--help"],
        "",
        &[("DISPATCHER_TOKEN", "reader-t0ken")],
    )
    .await
    .ok();
    assert!(!run.stdout.contains("reader-t0ken"), "{run}");

    // tail with a token: follows; without: the 401 as one line.
    let mut tail = Tail::start(&[
        "--server",
        base,
        "--token",
        "reader-t0ken",
        "--color",
        "always",
    ])
    .await;
    let sink = Receiver::start(200).await;
    let admin = [("DISPATCHER_TOKEN", "admin-t0ken")];
    let url = sink.url("/");
    let add = [
        "subscriptions",
        "add",
        "--url",
        &url,
        "--events",
        "add_lead",
        "--name",
        "c",
    ];
    run_with(&[&add[..], &["--server", base]].concat(), "", &admin)
        .await
        .ok();
    let emit = [
        "emit",
        "add_lead",
        "--data",
        "{\"id\": 1}",
        "--server",
        base,
    ];
    run_with(&emit, "", &admin).await.ok();
    let (_, line) = tail
        .out
        .wait("a delivered line", |l| l.contains("delivered"))
        .await;
    assert!(
        line.contains("\x1b[32mdelivered"),
        "--color always: {line:?}"
    );
    let run = cli(base, &["tail"]).await;
    assert!(run.one_line_error().contains("401 Unauthorized"), "{run}");
}
