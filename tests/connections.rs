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
