//! Connections to receivers: a subscription's attempts never open more connections than its
//! in-flight cap (`delivery.per_subscription`); a connection the receiver closes, or one dropped
//! after a timeout, is replaced.

mod common;

use common::{Receiver, TestServer, wait_for_async};
use serde_json::{Value, json};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

fn delivery_config(per_subscription: usize) -> String {
    format!(
        "[delivery]\nallow_private = [\"127.0.0.0/8\"]\ntimeout = \"10s\"\nper_subscription = {per_subscription}\n"
    )
}

/// Emits `n` `add_lead` events in batches of `batch`, `senders` requests at a time.
async fn emit_many(server: &TestServer, n: usize, batch: usize, senders: usize) {
    let next = AtomicUsize::new(0);
    let send = || async {
        loop {
            let start = next.fetch_add(batch, Ordering::SeqCst);
            if start >= n {
                return;
            }
            let events: Vec<Value> = (start..(start + batch).min(n))
                .map(|i| json!({"event": "add_lead", "data": {"id": i}}))
                .collect();
            let (code, v) = server
                .post("/v1/events", &json!({ "events": events }))
                .await;
            assert_eq!(code, 202, "emit failed: {v}");
        }
    };
    futures_util::future::join_all((0..senders).map(|_| send())).await;
}

/// Waits until the daemon has recorded `n` delivered attempts, and checks that none failed or
/// is to be retried (a reused connection that broke would show as code 0).
async fn wait_delivered(server: &TestServer, n: usize) {
    let delivered =
        format!(r#"dispatcher_attempts_total{{outcome="delivered",code_class="2xx"}} {n}"#);
    let text = wait_for_async(&format!("{n} delivered attempts"), WAIT, || async {
        let text = server.metrics().await;
        text.contains(&delivered).then_some(text)
    })
    .await;
    assert!(
        !text.contains(r#"outcome="retrying""#) && !text.contains(r#"outcome="failed""#),
        "only delivered attempts: {text}"
    );
}

/// Fresh daemons, each with one subscription to a receiver that answers at once, and a burst of
/// 128 concurrent intake requests of one event each: the daemon is busiest while its lane starts
/// up, which is when a shared pool used to dial more connections than attempts in flight (the
/// connection of a finished attempt was not back in the pool yet, so the next one dialled). The
/// race needs the busy start, so a few daemons are started in turn; none may ever exceed the cap.
async fn deliveries_stay_within_the_cap(per_subscription: usize) {
    const ROUNDS: usize = 12;
    const DELIVERIES: usize = 256;
    let mut accepted = Vec::new();
    for _ in 0..ROUNDS {
        let server = TestServer::start(&delivery_config(per_subscription)).await;
        let rx = Receiver::start(200).await;
        server
            .subscribe(json!({"url": rx.url("/hook"), "events": ["add_lead"]}))
            .await;
        emit_many(&server, DELIVERIES, 1, 128).await;
        rx.wait_requests(DELIVERIES, WAIT).await;
        wait_delivered(&server, DELIVERIES).await;
        // Each delivery arrived once: none needed a second attempt.
        assert_eq!(rx.count(), DELIVERIES);
        accepted.push(rx.connections());
        server.stop().await;
    }
    assert!(
        accepted.iter().all(|&n| n <= per_subscription),
        "connections accepted per daemon {accepted:?}, {DELIVERIES} deliveries each, \
         per_subscription = {per_subscription}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_opens_no_more_connections_than_per_subscription_2() {
    deliveries_stay_within_the_cap(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_opens_no_more_connections_than_per_subscription_4() {
    deliveries_stay_within_the_cap(4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_the_receiver_closes_is_replaced() {
    let server = TestServer::start(&delivery_config(2)).await;
    // Every answer says `Connection: close`: each attempt needs a connection of its own.
    let close = || (200, vec![("connection".to_string(), "close".to_string())]);
    let rx = Receiver::with_headers((0..40).map(|_| close()).collect(), 200).await;
    server
        .subscribe(json!({"url": rx.url("/hook"), "events": ["add_lead"]}))
        .await;
    emit_many(&server, 40, 10, 1).await;
    rx.wait_requests(40, WAIT).await;
    wait_delivered(&server, 40).await;
    assert_eq!(rx.count(), 40);
    assert_eq!(rx.connections(), 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_attempt_drops_its_connection_and_the_next_one_dials_anew() {
    let server = TestServer::start(&format!(
        "{}{}",
        delivery_config(1),
        "[retry.policies.soon]\nsteps = [ { after = \"10ms\" } ]\n"
    ))
    .await;
    // The first answer comes after the subscription's timeout, the second at once.
    let rx = Receiver::slow_first(200, Duration::from_millis(1500)).await;
    let sub = server
        .subscribe(json!({
            "url": rx.url("/hook"), "events": ["add_lead"], "retry": "soon", "timeout": "300ms"
        }))
        .await;
    assert!(sub["id"].is_string());
    let receipt = server
        .emit(json!({"event": "add_lead", "data": {"id": 1}}))
        .await;
    assert_eq!(receipt["deliveries"], 1);
    let got = rx.wait_requests(2, WAIT).await;
    let id = got[0].header("webhook-id");
    let d = server.wait_delivery_status(&id, "delivered", WAIT).await;
    let attempts = d["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{d}");
    assert_eq!(attempts[0]["code"], 0);
    assert_eq!(
        attempts[0]["error"], "timeout: no answer within 300ms",
        "{d}"
    );
    assert_eq!(attempts[1]["code"], 200);
    // The connection of the timed-out attempt was dropped, not reused with its answer pending.
    assert_eq!(rx.connections(), 2);
}

#[tokio::test]
async fn a_refused_connection_is_code_0_naming_its_innermost_cause() {
    let server = TestServer::start("").await;
    let port = common::closed_port();
    server
        .subscribe(json!({
            "url": format!("http://127.0.0.1:{port}/hook"), "events": ["add_lead"], "retry": "once"
        }))
        .await;
    server
        .emit(json!({"event": "add_lead", "data": {"id": 1}}))
        .await;
    let failed = wait_for_async("the delivery to fail", WAIT, || async {
        let (_, l) = server.get("/v1/deliveries?status=failed").await;
        l["deliveries"].as_array().unwrap().first().cloned()
    })
    .await;
    let a = &failed["attempts"][0];
    assert_eq!(a["code"], 0, "{failed}");
    assert!(
        a["error"]
            .as_str()
            .unwrap()
            .starts_with("connect error: Connection refused"),
        "{failed}"
    );
}

/// What a raw receiver does with one request: the bytes it answers, and whether it then closes
/// the connection (without saying so in the answer).
struct RawAnswer {
    bytes: Vec<u8>,
    close: bool,
}

/// A receiver on a bare TCP listener that answers the requests, in order of arrival, with the
/// bytes of `script` (its last entry for every request after), so that the daemon's reading of
/// answers HTTP servers seldom send (chunks, bodies without a length, garbage) is what is tested.
/// Counts its connections and the requests it read.
struct RawReceiver {
    addr: std::net::SocketAddr,
    accepted: std::sync::Arc<AtomicUsize>,
    requests: std::sync::Arc<AtomicUsize>,
}

impl RawReceiver {
    async fn start(script: Vec<RawAnswer>) -> RawReceiver {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = std::sync::Arc::new(AtomicUsize::new(0));
        let requests = std::sync::Arc::new(AtomicUsize::new(0));
        let script = std::sync::Arc::new(script);
        let (acc, reqs) = (accepted.clone(), requests.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                acc.fetch_add(1, Ordering::SeqCst);
                let (script, reqs) = (script.clone(), reqs.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        // One request: its head, then as many bytes as its content-length says.
                        let head_end = loop {
                            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                                break i + 4;
                            }
                            let mut chunk = [0u8; 4096];
                            match s.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        };
                        let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
                        let len: usize = head
                            .split("\r\n")
                            .find_map(|l| l.strip_prefix("content-length: "))
                            .expect("a content-length")
                            .parse()
                            .unwrap();
                        while buf.len() < head_end + len {
                            let mut chunk = [0u8; 4096];
                            match s.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        buf.drain(..head_end + len);
                        let nth = reqs.fetch_add(1, Ordering::SeqCst);
                        let answer = &script[nth.min(script.len() - 1)];
                        if s.write_all(&answer.bytes).await.is_err() || answer.close {
                            return;
                        }
                    }
                });
            }
        });
        RawReceiver {
            addr,
            accepted,
            requests,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    fn connections(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

fn raw(bytes: &[u8], close: bool) -> RawAnswer {
    RawAnswer {
        bytes: bytes.to_vec(),
        close,
    }
}

/// Emits `n` events one after another to a subscription of one slot, waiting for each to end
/// before the next, and returns each delivery's first attempt.
async fn attempts_one_by_one(server: &TestServer, url: &str, n: usize) -> Vec<Value> {
    server
        .subscribe(json!({"url": url, "events": ["add_lead"], "retry": "once"}))
        .await;
    for id in 0..n {
        let receipt = server
            .emit(json!({"event": "add_lead", "data": {"id": id}}))
            .await;
        assert_eq!(receipt["deliveries"], 1, "{receipt}");
        wait_for_async("the delivery to end", WAIT, || async {
            let (_, l) = server.get("/v1/deliveries?limit=100").await;
            let ended = l["deliveries"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|d| d["status"] == "delivered" || d["status"] == "failed")
                .count();
            (ended == id + 1).then_some(())
        })
        .await;
    }
    let (_, l) = server.get("/v1/deliveries?limit=100").await;
    let all = l["deliveries"].as_array().unwrap();
    assert_eq!(all.len(), n);
    all.iter()
        .map(|d| {
            assert_eq!(d["attempts"].as_array().unwrap().len(), 1, "{d}");
            d["attempts"][0].clone()
        })
        .collect()
}

/// A daemon with one subscription of one slot to a raw receiver answering `answer` (closing the
/// connection after it when `close`), and the first attempt of each of `n` deliveries sent one
/// after another.
async fn raw_attempts(answer: &[u8], close: bool, n: usize) -> (RawReceiver, Vec<Value>) {
    let server = TestServer::start(&delivery_config(1)).await;
    let rx = RawReceiver::start(vec![raw(answer, close)]).await;
    let attempts = attempts_one_by_one(&server, &rx.url(), n).await;
    server.stop().await;
    (rx, attempts)
}

/// Each attempt got `code` and kept `body` in the log, without an error.
fn assert_answered(attempts: &[Value], code: u64, body: &str) {
    for a in attempts {
        assert_eq!(
            (a["code"].as_u64(), a["response_body"].as_str()),
            (Some(code), Some(body)),
            "{a}"
        );
        assert!(a.get("error").is_none_or(Value::is_null), "{a}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_answer_is_read_to_its_end_and_its_connection_kept() {
    let (rx, attempts) = raw_attempts(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nok \r\n5\r\nthere\r\n0\r\nX-T: 1\r\n\r\n",
        false,
        3,
    )
    .await;
    assert_answered(&attempts, 200, "ok there");
    assert_eq!(rx.connections(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_past_64_kib_is_cut_and_its_connection_dropped() {
    let mut big = b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n".to_vec();
    big.extend(std::iter::repeat_n(b'z', 1_000_000));
    let (rx, attempts) = raw_attempts(&big, false, 2).await;
    // The log keeps the first KiB.
    assert_answered(&attempts, 200, &"z".repeat(1024));
    // The rest was not read: the connection could not carry another request.
    assert_eq!((rx.requests(), rx.connections()), (2, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_without_a_length_ends_with_the_connection() {
    let (rx, attempts) = raw_attempts(b"HTTP/1.1 202 Accepted\r\n\r\nuntil the end", true, 2).await;
    assert_answered(&attempts, 202, "until the end");
    assert_eq!(rx.connections(), 2);
}

/// A receiver that closes a kept connection after its answer, without `Connection: close` (as a
/// server does when its keep-alive timeout passes): the next attempt finds it closed before it
/// writes and dials anew, with no failed attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_connection_the_receiver_closed_meanwhile_is_not_used() {
    let (rx, attempts) =
        raw_attempts(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", true, 3).await;
    assert_answered(&attempts, 200, "ok");
    // Each request went out once, on a connection of its own.
    assert_eq!((rx.requests(), rx.connections()), (3, 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_that_is_not_http_is_code_0_saying_so() {
    let (_, attempts) = raw_attempts(b"SSH-2.0-OpenSSH_9.6\r\n\r\n", true, 1).await;
    assert_eq!(attempts[0]["code"], 0);
    assert_eq!(
        attempts[0]["error"], "request error: invalid answer: invalid HTTP version",
        "{attempts:?}"
    );
}
