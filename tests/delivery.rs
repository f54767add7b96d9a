//! End to end through the real server: intake → matcher → delivery → retries, with real HTTP
//! receivers on loopback.

mod common;

use common::{FAST_POLICIES, Receiver, TestServer, closed_port};
use serde_json::{Value, json};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);

fn vector() -> Value {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/vectors/amocrm_status_lead.json"
    ))
    .unwrap();
    serde_json::from_str(&text).unwrap()
}

#[tokio::test]
async fn captured_status_lead_arrives_byte_for_byte_with_signed_headers() {
    let server = TestServer::start("").await;
    let rx = Receiver::start(200).await;
    let sub = server
        .subscribe(json!({
            "url": rx.url("/amo/hook?key=abc"),
            "events": ["status_lead"],
            "headers": {"X-Api-Key": "k-123"},
        }))
        .await;
    let v = vector();
    let receipt = server.emit(v["event"].clone()).await;
    assert_eq!(receipt["deliveries"], 1);

    let got = rx.wait_requests(1, WAIT).await;
    let req = &got[0];
    assert_eq!(req.path, "/amo/hook?key=abc");
    assert_eq!(req.body_str(), v["expected_body"].as_str().unwrap());
    assert_eq!(
        req.header("content-type"),
        "application/x-www-form-urlencoded"
    );
    assert_eq!(
        req.header("user-agent"),
        format!("webhook-dispatcher/{}", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(req.header("x-api-key"), "k-123");
    uuid::Uuid::parse_str(&req.header("x-request-id")).expect("x-request-id is a UUID");

    // The Standard Webhooks reference implementation verifies the signature with the secret the
    // subscription was created with.
    let wh = standardwebhooks::Webhook::new(sub["secret"].as_str().unwrap()).unwrap();
    wh.verify(&req.body, &req.headers)
        .expect("signature verifies with the reference library");
    assert!(sub["secret"].as_str().unwrap().starts_with("whsec_"));

    // webhook-id is the delivery's id, and the delivery shows as delivered with its attempt.
    let delivery_id = req.header("webhook-id");
    let d = server
        .wait_delivery_status(&delivery_id, "delivered", WAIT)
        .await;
    assert_eq!(d["event"], "status_lead");
    assert_eq!(d["event_id"], receipt["id"]);
    assert_eq!(d["subscription_id"], sub["id"]);
    assert_eq!(d["attempts"].as_array().unwrap().len(), 1);
    assert_eq!(d["attempts"][0]["code"], 200);
    assert_eq!(d["attempts"][0]["response_body"], "answer 200");
    assert_eq!(d["next_attempt_at"], Value::Null);
}

#[tokio::test]
async fn json_format_keeps_types_and_the_configured_account() {
    let server = TestServer::start("").await;
    let rx = Receiver::start(200).await;
    server
        .subscribe(json!({"url": rx.url("/j"), "events": ["add_contact"], "format": "json"}))
        .await;
    server
        .emit(json!({"event": "add_contact", "data": {"id": 5, "name": "Иван Петров", "vip": true, "note": null}}))
        .await;
    let got = rx.wait_requests(1, WAIT).await;
    assert_eq!(got[0].header("content-type"), "application/json");
    assert_eq!(
        got[0].body_str(),
        r#"{"contacts":{"add":[{"id":5,"name":"Иван Петров","vip":true,"note":null,"type":"contact"}]},"account":{"subdomain":"test","id":"7039099","_links":{"self":"https://test.amocrm.ru"}}}"#
    );
}

#[tokio::test]
async fn matcher_sends_only_to_matching_and_filter_passing_subscriptions() {
    let server = TestServer::start("").await;
    let stage = Receiver::start(200).await;
    let other_stage = Receiver::start(200).await;
    let other_event = Receiver::start(200).await;
    let all = Receiver::start(200).await;
    let disabled = Receiver::start(200).await;
    server
        .subscribe(json!({"url": stage.url("/"), "events": ["status_lead"], "filter": {"pipeline_id": "752662", "status_id": 142}}))
        .await;
    server
        .subscribe(json!({"url": other_stage.url("/"), "events": ["status_lead"], "filter": {"status_id": 143}}))
        .await;
    server
        .subscribe(json!({"url": other_event.url("/"), "events": ["add_lead", "update_contact"]}))
        .await;
    server
        .subscribe(json!({"url": all.url("/"), "events": ["status_lead", "add_lead"]}))
        .await;
    let held = server
        .subscribe(json!({"url": disabled.url("/"), "events": ["status_lead"], "enabled": false}))
        .await;
    assert_eq!(held["enabled"], false);
    assert_eq!(held["disabled_reason"], "admin");

    let receipt = server
        .emit(json!({"event": "status_lead", "data": {"id": "25399013", "status_id": "142", "old_status_id": "7039101", "pipeline_id": 752662}}))
        .await;
    // The stage, the catch-all, and the disabled one (held, not sent).
    assert_eq!(receipt["deliveries"], 3);
    let got = stage.wait_requests(1, WAIT).await;
    assert_eq!(
        got[0].body_str(),
        "leads%5Bstatus%5D%5B0%5D%5Bid%5D=25399013&leads%5Bstatus%5D%5B0%5D%5Bstatus_id%5D=142&leads%5Bstatus%5D%5B0%5D%5Bold_status_id%5D=7039101&leads%5Bstatus%5D%5B0%5D%5Bpipeline_id%5D=752662&account%5Bsubdomain%5D=test&account%5Bid%5D=7039099&account%5B_links%5D%5Bself%5D=https%3A%2F%2Ftest.amocrm.ru"
    );
    all.wait_requests(1, WAIT).await;

    // A second event that only `all` and `other_event` take, as a barrier: once they have it,
    // anything wrongly sent for the first event would have arrived too.
    let r2 = server
        .emit(json!({"event": "add_lead", "data": {"id": 7}}))
        .await;
    assert_eq!(r2["deliveries"], 2);
    all.wait_requests(2, WAIT).await;
    other_event.wait_requests(1, WAIT).await;
    assert_eq!(stage.count(), 1);
    assert_eq!(other_stage.count(), 0);
    assert_eq!(other_event.count(), 1);
    assert_eq!(disabled.count(), 0);

    // The held delivery waits as pending; enabling the subscription sends it.
    let (code, list) = server
        .get(&format!(
            "/v1/deliveries?subscription={}",
            held["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(code, 200);
    assert_eq!(list["deliveries"][0]["status"], "pending");
    let (code, _) = server
        .patch(
            &format!("/v1/subscriptions/{}", held["id"].as_str().unwrap()),
            &json!({"enabled": true}),
        )
        .await;
    assert_eq!(code, 200);
    disabled.wait_requests(1, WAIT).await;
}

/// Creates a subscription with `retry` to `url`, emits one event, and waits for its delivery to
/// end; returns the delivery.
async fn deliver_until_end(server: &TestServer, url: String, retry: &str) -> Value {
    let sub = server
        .subscribe(json!({"url": url, "events": ["add_lead"], "retry": retry}))
        .await;
    server
        .emit(json!({"event": "add_lead", "data": {"id": 1}}))
        .await;
    let path = format!(
        "/v1/deliveries?subscription={}",
        sub["id"].as_str().unwrap()
    );
    common::wait_for_async("the delivery to end", WAIT, || async {
        let (_, list) = server.get(&path).await;
        let d = list["deliveries"][0].clone();
        matches!(d["status"].as_str(), Some("delivered" | "failed")).then_some(d)
    })
    .await
}

#[tokio::test]
async fn retries_follow_the_amocrm_code_classes() {
    let server = TestServer::start(FAST_POLICIES).await;
    let cases: [(u16, usize); 3] = [(500, 5), (404, 3), (302, 3)];
    for (code, attempts) in cases {
        let rx = Receiver::start(code).await;
        let d = deliver_until_end(&server, rx.url("/"), "fast-amocrm").await;
        assert_eq!(d["status"], "failed", "code {code}: {d}");
        assert_eq!(
            d["attempts"].as_array().unwrap().len(),
            attempts,
            "code {code}: {d}"
        );
        assert_eq!(rx.count(), attempts, "code {code}");
        assert!(
            d["error"]
                .as_str()
                .unwrap()
                .contains(&format!("HTTP {code}"))
        );
        for (i, a) in d["attempts"].as_array().unwrap().iter().enumerate() {
            assert_eq!(a["n"], i + 1);
            assert_eq!(a["code"], code);
        }
    }
    // A refused connection is code 0: three attempts.
    let port = closed_port();
    let d = deliver_until_end(&server, format!("http://127.0.0.1:{port}/"), "fast-amocrm").await;
    assert_eq!(d["status"], "failed");
    let attempts = d["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 3, "{d}");
    assert!(attempts.iter().all(|a| a["code"] == 0));
    assert!(
        attempts[0]["error"].as_str().unwrap().contains("connect"),
        "{d}"
    );
}

#[tokio::test]
async fn success_stops_retries_and_once_sends_one() {
    let server = TestServer::start(FAST_POLICIES).await;
    let rx = Receiver::scripted(vec![503, 500], 200).await;
    let d = deliver_until_end(&server, rx.url("/"), "fast-amocrm").await;
    assert_eq!(d["status"], "delivered", "{d}");
    let codes: Vec<u64> = d["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["code"].as_u64().unwrap())
        .collect();
    assert_eq!(codes, vec![503, 500, 200]);
    assert_eq!(rx.count(), 3);

    let once = Receiver::start(500).await;
    let d = deliver_until_end(&server, once.url("/"), "once").await;
    assert_eq!(d["status"], "failed");
    assert_eq!(d["attempts"].as_array().unwrap().len(), 1);
    assert_eq!(once.count(), 1);
}

#[tokio::test]
async fn builtin_amocrm_table_schedules_the_second_attempt_five_minutes_later() {
    let server = TestServer::start("").await;
    let rx = Receiver::start(500).await;
    let sub = server
        .subscribe(json!({"url": rx.url("/"), "events": ["add_lead"]}))
        .await;
    assert_eq!(sub["retry"], "amocrm");
    server
        .emit(json!({"event": "add_lead", "data": {"id": 1}}))
        .await;
    let got = rx.wait_requests(1, WAIT).await;
    let id = got[0].header("webhook-id");
    let d = common::wait_for_async("the first attempt to be recorded", WAIT, || async {
        let d = server.delivery(&id).await;
        (d["attempts"].as_array().unwrap().len() == 1 && d["status"] == "pending").then_some(d)
    })
    .await;
    let started =
        humantime::parse_rfc3339(d["attempts"][0]["started_at"].as_str().unwrap()).unwrap();
    let next = humantime::parse_rfc3339(d["next_attempt_at"].as_str().unwrap()).unwrap();
    let gap = next.duration_since(started).unwrap();
    // "after" counts from the end of the attempt: 5 minutes plus the attempt's own duration.
    let duration = Duration::from_millis(d["attempts"][0]["duration_ms"].as_u64().unwrap());
    assert!(
        gap >= Duration::from_secs(300)
            && gap <= Duration::from_secs(300) + duration + Duration::from_millis(50),
        "gap {gap:?}"
    );
}

#[tokio::test]
async fn a_waiting_retry_survives_a_restart() {
    let policy = r#"
[retry.policies.slow]
steps = [ { after = "1500ms" } ]
"#;
    let server = TestServer::start(policy).await;
    let rx = Receiver::scripted(vec![500], 200).await;
    server
        .subscribe(json!({"url": rx.url("/"), "events": ["add_lead"], "retry": "slow"}))
        .await;
    server
        .emit(json!({"event": "add_lead", "data": {"id": 1}}))
        .await;
    let first = rx.wait_requests(1, WAIT).await;
    let id = first[0].header("webhook-id");
    let d = server.wait_retry_scheduled(&id, WAIT).await;
    assert_eq!(d["attempts"].as_array().unwrap().len(), 1);
    let dir = server.stop().await;
    let server = TestServer::start_in(dir, policy).await;
    let got = rx.wait_requests(2, WAIT).await;
    assert_eq!(got[1].header("webhook-id"), id);
    // Not before it was due.
    assert!(got[1].at.duration_since(got[0].at) >= Duration::from_millis(1400));
    server.wait_delivery_status(&id, "delivered", WAIT).await;
}

#[tokio::test]
async fn a_slow_receiver_does_not_hold_up_another_subscription() {
    let server =
        TestServer::start("[delivery]\nallow_private = [\"127.0.0.0/8\"]\nper_subscription = 2\n")
            .await;
    let slow = Receiver::slow(200, Duration::from_secs(3)).await;
    let fast = Receiver::start(200).await;
    server
        .subscribe(json!({"url": slow.url("/"), "events": ["add_lead"], "timeout": "10s"}))
        .await;
    server
        .subscribe(json!({"url": fast.url("/"), "events": ["add_lead"]}))
        .await;
    for i in 0..10 {
        server
            .emit(json!({"event": "add_lead", "data": {"id": i}}))
            .await;
    }
    // All ten reach the fast receiver while the slow one holds at most two in flight.
    fast.wait_requests(10, WAIT).await;
    assert!(slow.count() <= 2, "slow receiver got {}", slow.count());
}

#[tokio::test]
async fn deleting_a_subscription_fails_its_waiting_deliveries_and_url_changes_apply_to_retries() {
    let policy = "[retry.policies.later]\nsteps = [ { after = \"1h\" } ]\n[retry.policies.soon]\nsteps = [ { after = \"300ms\" } ]\n";
    let server = TestServer::start(policy).await;
    let rx = Receiver::start(500).await;
    let sub = server
        .subscribe(json!({"url": rx.url("/"), "events": ["add_lead"], "retry": "later"}))
        .await;
    server
        .emit(json!({"event": "add_lead", "data": {"id": 1}}))
        .await;
    let id = rx.wait_requests(1, WAIT).await[0].header("webhook-id");
    server.wait_retry_scheduled(&id, WAIT).await;
    let (code, body) = server
        .delete(&format!(
            "/v1/subscriptions/{}",
            sub["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(code, 204, "{body}");
    let d = server.delivery(&id).await;
    assert_eq!(d["status"], "failed");
    assert_eq!(d["error"], "subscription deleted");

    // A new URL applies to a pending retry.
    let old = Receiver::start(500).await;
    let new = Receiver::start(200).await;
    let sub = server
        .subscribe(json!({"url": old.url("/"), "events": ["add_lead"], "retry": "soon"}))
        .await;
    server
        .emit(json!({"event": "add_lead", "data": {"id": 2}}))
        .await;
    let id = old.wait_requests(1, WAIT).await[0].header("webhook-id");
    let (code, _) = server
        .patch(
            &format!("/v1/subscriptions/{}", sub["id"].as_str().unwrap()),
            &json!({"url": new.url("/moved"), "format": "json"}),
        )
        .await;
    assert_eq!(code, 200);
    let got = new.wait_requests(1, WAIT).await;
    assert_eq!(got[0].header("webhook-id"), id);
    assert_eq!(got[0].header("content-type"), "application/json");
    assert_eq!(old.count(), 1);
}

#[tokio::test]
async fn batches_are_stored_whole_and_answered_per_event() {
    let server = TestServer::start("").await;
    let rx = Receiver::start(200).await;
    server
        .subscribe(json!({"url": rx.url("/"), "events": ["add_lead", "add_company"]}))
        .await;
    let (code, body) = server
        .post(
            "/v1/events",
            &json!({"events": [
                {"event": "add_lead", "data": {"id": 1}},
                {"event": "add_company", "data": {"id": 2, "name": "ООО Ромашка"}},
                {"event": "add_task", "data": {"id": 3}},
            ]}),
        )
        .await;
    assert_eq!(code, 202, "{body}");
    let receipts = body["events"].as_array().unwrap();
    assert_eq!(receipts.len(), 3);
    assert_eq!(
        receipts
            .iter()
            .map(|r| r["deliveries"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        vec![1, 1, 0]
    );
    let got = rx.wait_requests(2, WAIT).await;
    let bodies: Vec<String> = got.iter().map(|r| r.body_str()).collect();
    assert!(
        bodies.iter().any(|b| b.starts_with(
            "contacts%5Badd%5D%5B0%5D%5Bid%5D=2&contacts%5Badd%5D%5B0%5D%5Bname%5D=%D0%9E%D0%9E%D0%9E+%D0%A0%D0%BE%D0%BC%D0%B0%D1%88%D0%BA%D0%B0&contacts%5Badd%5D%5B0%5D%5Btype%5D=company&account"
        )),
        "{bodies:?}"
    );
}

#[tokio::test]
async fn the_embedded_emitter_has_the_same_promise() {
    let server = TestServer::start("").await;
    let rx = Receiver::start(200).await;
    server
        .subscribe(json!({"url": rx.url("/"), "events": ["note_lead"]}))
        .await;
    let emitter = server.dispatcher.emitter();
    let receipt = emitter
        .emit(json!({"event": "note_lead", "data": {"id": 9, "text": "hi"}}))
        .await
        .unwrap();
    assert_eq!(receipt.deliveries, 1);
    let got = rx.wait_requests(1, WAIT).await;
    assert!(
        got[0]
            .body_str()
            .starts_with("leads%5Bnote%5D%5B0%5D%5Bid%5D=9&")
    );
    let err = emitter
        .emit(json!({"event": "fly_lead", "data": {"id": 1}}))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("fly_lead"));
    // The refused event created no delivery.
    let (_, list) = server.get("/v1/deliveries").await;
    assert_eq!(list["deliveries"].as_array().unwrap().len(), 1);
}

/// `Dispatcher::start_on` runs the engine (its lanes, their workers and their connections' tasks)
/// on the runtime it is given, the API on the caller's.
#[test]
fn the_engine_runs_on_the_runtime_it_is_given() {
    let delivery = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let api = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    api.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        // One slot: one worker and one connection.
        let server = TestServer::start_in_on(
            dir,
            "[delivery]\nallow_private = [\"127.0.0.0/8\"]\nper_subscription = 1\n",
            delivery.handle().clone(),
        )
        .await;
        let rx = Receiver::start(200).await;
        server
            .subscribe(json!({"url": rx.url("/hook"), "events": ["add_lead"]}))
            .await;
        for id in 0..5 {
            server
                .emit(json!({"event": "add_lead", "data": {"id": id}}))
                .await;
        }
        rx.wait_requests(5, WAIT).await;
        assert_eq!(rx.connections(), 1);
        // The lane and its one worker; the kept connection has no task of its own (the task
        // that starts the lanes ended before they started). A blocking task (none here) would
        // not count.
        assert_eq!(delivery.metrics().num_alive_tasks(), 2);
        server.stop().await;
    });
    delivery.shutdown_timeout(Duration::from_secs(1));
}

/// The real binary runs its attempts on threads of their own, named `delivery` (its API on threads
/// named `api`): they run while events are delivered.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn the_binary_delivers_on_its_delivery_threads() {
    /// Nanoseconds on a CPU of each of the daemon's threads named `name`, by thread id; `None`
    /// where the kernel keeps no `schedstat`.
    fn run_ns(pid: u32, name: &str) -> Option<std::collections::HashMap<String, u64>> {
        let mut threads = std::collections::HashMap::new();
        for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
            let task = task.unwrap().path();
            let Ok(comm) = std::fs::read_to_string(task.join("comm")) else {
                continue; // the thread has just ended
            };
            if comm.trim_end() != name {
                continue;
            }
            let stat = match std::fs::read_to_string(task.join("schedstat")) {
                Ok(stat) => stat,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
                Err(_) => continue,
            };
            let ns = stat
                .split_whitespace()
                .next()
                .and_then(|ns| ns.parse().ok());
            let tid = task.file_name().unwrap().to_string_lossy().into_owned();
            threads.insert(tid, ns.expect("schedstat starts with the run time in ns"));
        }
        Some(threads)
    }
    let dir = tempfile::tempdir().unwrap();
    let (mut child, base, rx, http) =
        common::binary_subscribed(dir.path(), std::process::Stdio::null()).await;
    let pid = child.id();
    let Some(api) = run_ns(pid, "api") else {
        eprintln!("skipped: this kernel keeps no /proc/<pid>/task/<tid>/schedstat");
        return;
    };
    assert!(!api.is_empty(), "no thread named `api`");
    // Whatever the delivery threads did while the daemon started (the lanes' start) is behind.
    let before = common::wait_for("the delivery threads to settle", WAIT, || {
        let before = run_ns(pid, "delivery").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        (run_ns(pid, "delivery").unwrap() == before).then_some(before)
    })
    .await;
    assert!(!before.is_empty(), "no thread named `delivery`");
    for id in 0..50 {
        common::emit_binary(
            &http,
            &base,
            json!({"event": "add_lead", "data": {"id": id}}),
        )
        .await;
    }
    rx.wait_requests(50, WAIT).await;
    let after = run_ns(pid, "delivery").unwrap();
    common::stop_binary(&mut child).await;
    // Threads alive at both readings (a blocking-pool thread may end in between).
    assert!(
        before
            .iter()
            .any(|(tid, ns)| after.get(tid).is_some_and(|now| now > ns)),
        "the delivery threads did not run while 50 events were delivered: {before:?} → {after:?}"
    );
}
