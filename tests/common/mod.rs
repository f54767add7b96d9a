//! Test harness: the real dispatcher serving on an ephemeral port over a temp-dir sled, and
//! scripted HTTP receivers on loopback that record every request.
#![allow(dead_code)]

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::serve::ListenerExt;
use serde_json::Value;
use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use webhook_dispatcher::Dispatcher;
use webhook_dispatcher::config::Config;

/// Polls `check` until it returns `Some`, or panics with `what` after `timeout`.
pub async fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Like [`wait_for`] with an async check.
pub async fn wait_for_async<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// One request a receiver got.
#[derive(Debug, Clone)]
pub struct Received {
    pub at: Instant,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Received {
    pub fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    }
    pub fn body_str(&self) -> String {
        String::from_utf8(self.body.to_vec()).unwrap()
    }
}

/// One scripted answer: a status and extra headers.
type Answer = (u16, Vec<(String, String)>);

/// How a receiver answers: a queue of answers used in order, then `then` forever.
#[derive(Clone)]
struct Script {
    queue: Arc<Mutex<VecDeque<Answer>>>,
    then: u16,
    delay: Duration,
    /// Whether only the first request waits `delay`.
    only_first: bool,
    answered: Arc<AtomicUsize>,
}

#[derive(Clone)]
struct ReceiverState {
    log: Arc<Mutex<Vec<Received>>>,
    script: Script,
}

/// A scripted HTTP receiver on 127.0.0.1.
pub struct Receiver {
    pub addr: SocketAddr,
    log: Arc<Mutex<Vec<Received>>>,
    script: Script,
    /// TCP connections accepted so far.
    accepted: Arc<AtomicUsize>,
}

async fn receive(
    State(st): State<ReceiverState>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    st.log.lock().unwrap().push(Received {
        at: Instant::now(),
        path: uri.to_string(),
        headers,
        body,
    });
    let (code, extra) = st
        .script
        .queue
        .lock()
        .unwrap()
        .pop_front()
        .unwrap_or((st.script.then, vec![]));
    let nth = st.script.answered.fetch_add(1, Ordering::SeqCst);
    if !st.script.delay.is_zero() && (!st.script.only_first || nth == 0) {
        tokio::time::sleep(st.script.delay).await;
    }
    let mut resp = (
        StatusCode::from_u16(code).unwrap(),
        format!("answer {code}"),
    )
        .into_response();
    for (k, v) in extra {
        resp.headers_mut().insert(
            axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    resp
}

impl Receiver {
    /// A receiver answering `status` to every request.
    pub async fn start(status: u16) -> Receiver {
        Receiver::scripted(vec![], status).await
    }

    /// Answers the statuses of `first` in order, then `then` forever.
    pub async fn scripted(first: Vec<u16>, then: u16) -> Receiver {
        Receiver::with_headers(first.into_iter().map(|c| (c, vec![])).collect(), then).await
    }

    pub async fn with_headers(first: Vec<(u16, Vec<(String, String)>)>, then: u16) -> Receiver {
        Receiver::build(first, then, Duration::ZERO, false).await
    }

    /// Answers `status` after `delay`.
    pub async fn slow(status: u16, delay: Duration) -> Receiver {
        Receiver::build(vec![], status, delay, false).await
    }

    /// Answers `status`, the first request after `delay` and the others at once.
    pub async fn slow_first(status: u16, delay: Duration) -> Receiver {
        Receiver::build(vec![], status, delay, true).await
    }

    async fn build(
        first: Vec<(u16, Vec<(String, String)>)>,
        then: u16,
        delay: Duration,
        only_first: bool,
    ) -> Receiver {
        let log = Arc::new(Mutex::new(Vec::new()));
        let script = Script {
            queue: Arc::new(Mutex::new(first.into_iter().collect())),
            then,
            delay,
            only_first,
            answered: Arc::new(AtomicUsize::new(0)),
        };
        let app = axum::Router::new()
            .fallback(receive)
            .with_state(ReceiverState {
                log: log.clone(),
                script: script.clone(),
            });
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        let count = move |_: &mut tokio::net::TcpStream| {
            counter.fetch_add(1, Ordering::SeqCst);
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let listener = listener.tap_io(count);
        tokio::spawn(async move { axum::serve(listener, app).await });
        Receiver {
            addr,
            log,
            script,
            accepted,
        }
    }

    /// How many TCP connections the receiver has accepted.
    pub fn connections(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn requests(&self) -> Vec<Received> {
        self.log.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.log.lock().unwrap().len()
    }

    /// Waits until at least `n` requests arrived and returns them.
    pub async fn wait_requests(&self, n: usize, timeout: Duration) -> Vec<Received> {
        wait_for(&format!("{n} requests at {}", self.addr), timeout, || {
            let log = self.log.lock().unwrap();
            (log.len() >= n).then(|| log.clone())
        })
        .await
    }
}

/// A port nothing listens on (bound, then closed).
pub fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A fast custom policy with amoCRM's code classes and millisecond delays.
pub const FAST_POLICIES: &str = r#"
[retry.policies.fast-amocrm]
steps = [
  { after = "20ms", on = ["0-99", "300-"] },
  { after = "20ms", on = ["0-99", "300-"] },
  { after = "20ms", on = ["499", "500-599"] },
  { after = "20ms", on = ["499", "500-599"] },
]
"#;

/// The real dispatcher on an ephemeral port with its own temp-dir storage.
pub struct TestServer {
    pub addr: SocketAddr,
    pub base: String,
    pub http: reqwest::Client,
    pub dispatcher: Dispatcher,
    pub dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestServer {
    /// Starts with the test defaults plus `extra` TOML (sections and keys of §3).
    pub async fn start(extra: &str) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        TestServer::start_in(dir, extra).await
    }

    pub fn config_toml(dir: &std::path::Path, extra: &str) -> String {
        let path = dir.join("db.sled");
        let extra_has = |section: &str| extra.contains(&format!("[{section}]"));
        let mut toml = String::new();
        if !extra_has("server") {
            toml.push_str("[server]\nlisten = \"127.0.0.1:0\"\n");
        }
        toml.push_str(&format!(
            "[storage]\npath = {:?}\n",
            path.display().to_string()
        ));
        if !extra_has("delivery") {
            toml.push_str("[delivery]\nallow_private = [\"127.0.0.0/8\"]\ntimeout = \"2s\"\n");
        }
        if !extra_has("account") {
            toml.push_str("[account]\nsubdomain = \"test\"\nid = \"7039099\"\n");
        }
        toml.push_str(extra);
        toml.push('\n');
        toml
    }

    pub async fn start_in(dir: tempfile::TempDir, extra: &str) -> TestServer {
        TestServer::start_in_on(dir, extra, tokio::runtime::Handle::current()).await
    }

    /// Like `start_in`, with the delivery engine on `delivery`'s runtime
    /// (`Dispatcher::start_on`).
    pub async fn start_in_on(
        dir: tempfile::TempDir,
        extra: &str,
        delivery: tokio::runtime::Handle,
    ) -> TestServer {
        let toml = TestServer::config_toml(dir.path(), extra);
        let config = Config::from_toml_str(&toml, &[])
            .unwrap_or_else(|e| panic!("test config: {e}\n{toml}"));
        // A restart in the same process: the previous dispatcher's background tasks may still hold
        // sled's lock for a moment after `stop` (under a loaded test run, longer than the 5 s
        // `Store::open` itself waits).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let dispatcher = loop {
            match Dispatcher::start_on(config.clone(), delivery.clone()).await {
                Ok(d) => break d,
                Err(e)
                    if e.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                Err(e) => panic!("starting the dispatcher: {e}"),
            }
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let d = dispatcher.clone();
        let task = tokio::spawn(async move {
            d.serve(listener, async move {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        TestServer {
            addr,
            base: format!("http://{addr}"),
            http: reqwest::Client::new(),
            dispatcher,
            dir,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Stops gracefully and gives back the storage directory.
    pub async fn stop(mut self) -> tempfile::TempDir {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.unwrap();
        }
        // sled releases its lock when the last handle drops; the pooled connections of the client
        // keep the server's connection tasks (and so the storage) alive until they close.
        let TestServer {
            http,
            dispatcher,
            dir,
            ..
        } = self;
        drop(http);
        drop(dispatcher);
        dir
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// POSTs JSON; returns the status and the JSON answer (Null when empty).
    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self
            .http
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        Self::answer(r).await
    }

    pub async fn post_raw(&self, path: &str, body: &str) -> (u16, Value, String) {
        let r = self
            .http
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        let ct = r
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let (code, v) = Self::answer(r).await;
        (code, v, ct)
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let r = self.http.get(self.url(path)).send().await.unwrap();
        Self::answer(r).await
    }

    pub async fn patch(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self
            .http
            .patch(self.url(path))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        Self::answer(r).await
    }

    pub async fn delete(&self, path: &str) -> (u16, Value) {
        let r = self.http.delete(self.url(path)).send().await.unwrap();
        Self::answer(r).await
    }

    async fn answer(r: reqwest::Response) -> (u16, Value) {
        let code = r.status().as_u16();
        let text = r.text().await.unwrap();
        let v = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (code, v)
    }

    /// Creates a subscription and returns it; panics unless 201.
    pub async fn subscribe(&self, body: Value) -> Value {
        let (code, v) = self.post("/v1/subscriptions", &body).await;
        assert_eq!(code, 201, "subscribe failed: {v}");
        v
    }

    /// Emits one event; panics unless 202. Returns the receipt `{id, deliveries}`.
    pub async fn emit(&self, event: Value) -> Value {
        let (code, v) = self.post("/v1/events", &event).await;
        assert_eq!(code, 202, "emit failed: {v}");
        v["events"][0].clone()
    }

    pub async fn delivery(&self, id: &str) -> Value {
        let (code, v) = self.get(&format!("/v1/deliveries/{id}")).await;
        assert_eq!(code, 200, "delivery {id}: {v}");
        v
    }

    /// Waits until delivery `id` waits for a retry: an attempt recorded, pending, with a
    /// `next_attempt_at`.
    pub async fn wait_retry_scheduled(&self, id: &str, timeout: Duration) -> Value {
        wait_for_async("the retry to be scheduled", timeout, || async {
            let d = self.delivery(id).await;
            let attempted = !d["attempts"].as_array().unwrap().is_empty();
            (attempted && d["status"] == "pending" && !d["next_attempt_at"].is_null()).then_some(d)
        })
        .await
    }

    /// The `/metrics` exposition.
    pub async fn metrics(&self) -> String {
        let r = self.http.get(self.url("/metrics")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        r.text().await.unwrap()
    }

    /// Waits until delivery `id` has `status`, returns it.
    pub async fn wait_delivery_status(&self, id: &str, status: &str, timeout: Duration) -> Value {
        wait_for_async(
            &format!("delivery {id} to be {status}"),
            timeout,
            || async {
                let d = self.delivery(id).await;
                (d["status"] == status).then_some(d)
            },
        )
        .await
    }
}

/// A running `dispatcher` binary, killed when dropped unless it has exited: a test whose
/// assertion fails does not leave it running.
pub struct Binary(std::process::Child);

impl std::ops::Deref for Binary {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for Binary {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The real `dispatcher serve --config CONFIG` binary, stderr into `stderr`; returns it and its
/// base URL once it prints `listening on ADDR`.
pub fn start_binary(config: &std::path::Path, stderr: std::process::Stdio) -> (Binary, String) {
    use std::io::BufRead;
    let mut child = Binary(
        std::process::Command::new(env!("CARGO_BIN_EXE_dispatcher"))
            .args(["serve", "--config"])
            .arg(config)
            .env_remove("DISPATCHER_SERVER_LISTEN")
            .stdout(std::process::Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("the dispatcher binary starts"),
    );
    let stdout = child.stdout.take().expect("stdout is piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(addr) = line.strip_prefix("listening on ") {
                let _ = tx.send(addr.to_string());
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the daemon prints its listen address");
    (child, format!("http://{addr}"))
}

/// The real binary on a default config in `dir` (stderr into `stderr`), with one subscription
/// to `add_lead` at a receiver answering 200. Returns the binary, its base URL, the receiver and
/// the client that subscribed.
pub async fn binary_subscribed(
    dir: &std::path::Path,
    stderr: std::process::Stdio,
) -> (Binary, String, Receiver, reqwest::Client) {
    let config = binary_config(dir, "");
    let rx = Receiver::start(200).await;
    let (child, base) = start_binary(&config, stderr);
    let http = reqwest::Client::new();
    subscribe_binary(
        &http,
        &base,
        serde_json::json!({"url": rx.url("/hook"), "events": ["add_lead"]}),
    )
    .await;
    (child, base, rx, http)
}

/// POSTs `body` to the real binary at `base` + `path` through `http` (the caller's client, so a
/// test may keep its connection alive); panics unless the answer is `want`. Returns its JSON.
async fn post_binary(
    http: &reqwest::Client,
    base: &str,
    path: &str,
    body: Value,
    want: u16,
) -> Value {
    let r = http
        .post(format!("{base}{path}"))
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), want, "POST {path}");
    r.json().await.unwrap()
}

/// Creates a subscription on the real binary; panics unless 201. Returns the subscription.
pub async fn subscribe_binary(http: &reqwest::Client, base: &str, body: Value) -> Value {
    post_binary(http, base, "/v1/subscriptions", body, 201).await
}

/// Sends `body` (an event, or `{"events": [...]}`) to the real binary; panics unless 202.
/// Returns the receipts.
pub async fn emit_binary(http: &reqwest::Client, base: &str, body: Value) -> Value {
    post_binary(http, base, "/v1/events", body, 202).await
}

/// Sends the real binary SIGTERM.
pub fn sigterm(child: &Binary) {
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -TERM {} failed", child.id());
}

/// Sends the real binary SIGTERM and waits (at most 10 s) for it to exit 0.
pub async fn stop_binary(child: &mut Binary) {
    sigterm(child);
    let status = wait_for(
        "the daemon to exit after SIGTERM",
        Duration::from_secs(10),
        || child.try_wait().unwrap(),
    )
    .await;
    assert!(status.success(), "exit status {status}");
}

/// A config file for the real binary in `dir`: loopback listen on an ephemeral port, storage in
/// `dir`, loopback receivers allowed, plus `extra` TOML.
pub fn binary_config(dir: &std::path::Path, extra: &str) -> std::path::PathBuf {
    let config = dir.join("dispatcher.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[storage]\npath = {:?}\n[delivery]\nallow_private = [\"127.0.0.0/8\"]\n{extra}",
            dir.join("db.sled").display().to_string()
        ),
    )
    .expect("the config file is written");
    config
}
