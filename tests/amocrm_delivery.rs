//! amoCRM's delivery rules through the real server and scripted receivers (SPEC §6): the disable
//! rule and enabling again (v4 and native), `410 Gone`, `Retry-After` on 429/503, and
//! digital-pipeline webhooks bound to one stage and sent once. Policies are fast custom ones from
//! the config, never the built-in tables' real delays.

mod common;

use common::{Receiver, TestServer, wait_for, wait_for_async};
use serde_json::{Value, json};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const WAIT: Duration = Duration::from_secs(10);

fn hdr(name: &str, value: &str) -> Vec<(String, String)> {
    vec![(name.to_string(), value.to_string())]
}

fn ms(rfc3339: &Value) -> u64 {
    humantime::parse_rfc3339(rfc3339.as_str().unwrap())
        .unwrap()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

async fn subscription(server: &TestServer, id: &Value) -> Value {
    let (code, v) = server
        .get(&format!("/v1/subscriptions/{}", id.as_str().unwrap()))
        .await;
    assert_eq!(code, 200, "{v}");
    v
}

/// The deliveries of a subscription, newest first.
async fn deliveries(server: &TestServer, sub: &Value) -> Vec<Value> {
    let (code, v) = server
        .get(&format!(
            "/v1/deliveries?subscription={}",
            sub["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(code, 200, "{v}");
    v["deliveries"].as_array().unwrap().clone()
}

async fn v4_webhook(server: &TestServer, destination: &str) -> Value {
    let (code, v) = server
        .get(&format!(
            "/api/v4/webhooks?filter[destination]={destination}"
        ))
        .await;
    assert_eq!(code, 200, "{v}");
    v["_embedded"]["webhooks"][0].clone()
}

#[tokio::test]
async fn more_failures_than_the_threshold_disable_and_enabling_again_resumes_with_a_fresh_window() {
    let config = r#"
[disable]
window = "1h"
threshold = 3
[retry.policies.fast]
steps = [ { after = "20ms" }, { after = "20ms" }, { after = "20ms" }, { after = "20ms" }, { after = "20ms" }, { after = "20ms" } ]
"#;
    let server = TestServer::start(config).await;
    // Five failures, then success.
    let rx = Receiver::scripted(vec![500; 5], 200).await;
    let url = rx.url("/hook");
    let sub = server
        .subscribe(json!({"url": url, "events": ["add_lead"], "retry": "fast"}))
        .await;
    server
        .emit(json!({"event": "add_lead", "data": {"id": 1}}))
        .await;

    // The fourth failed attempt is more than 3 within the hour: disabled, by failures.
    let disabled = wait_for_async("the subscription to be disabled", WAIT, || async {
        let s = subscription(&server, &sub["id"]).await;
        (s["enabled"] == false).then_some(s)
    })
    .await;
    assert_eq!(disabled["disabled_reason"], "failures");
    assert_eq!(v4_webhook(&server, &url).await["disabled"], true);
    let first = deliveries(&server, &sub).await[0].clone();
    let first_id = first["id"].as_str().unwrap().to_string();
    // The subscription is disabled before the attempt's outcome is written.
    let d = wait_for_async("the fourth attempt to be recorded", WAIT, || async {
        let d = server.delivery(&first_id).await;
        (d["attempts"].as_array().unwrap().len() >= 4).then_some(d)
    })
    .await;
    assert_eq!(d["status"], "pending", "its retry waits: {d}");
    assert_eq!(d["attempts"].as_array().unwrap().len(), 4, "{d}");
    assert_eq!(rx.count(), 4);

    // A new event still creates its delivery, held.
    let receipt = server
        .emit(json!({"event": "add_lead", "data": {"id": 2}}))
        .await;
    assert_eq!(receipt["deliveries"], 1);
    // Nothing goes out while disabled, though the retry fell due long ago.
    let due = ms(&d["next_attempt_at"]);
    wait_for("the held retry's due time to be well past", WAIT, || {
        (now_ms() > due + 300).then_some(())
    })
    .await;
    assert_eq!(rx.count(), 4);
    let held = deliveries(&server, &sub).await;
    assert_eq!(held.len(), 2);
    assert!(held.iter().all(|d| d["status"] == "pending"), "{held:?}");
    assert_eq!(
        server.delivery(&first_id).await["attempts"]
            .as_array()
            .unwrap()
            .len(),
        4
    );

    // v4 `disabled: false` enables it again; both go out. One more failure follows (the fifth
    // answer), which a fresh window tolerates: it stays enabled and both are delivered.
    let (code, w) = server
        .post(
            "/api/v4/webhooks",
            &json!({"destination": url, "settings": ["add_lead"], "disabled": false}),
        )
        .await;
    assert_eq!(code, 200, "{w}");
    assert_eq!(w["disabled"], false);
    let s = subscription(&server, &sub["id"]).await;
    assert_eq!(
        (s["enabled"].clone(), s["disabled_reason"].clone()),
        (json!(true), Value::Null)
    );
    for d in held {
        server
            .wait_delivery_status(d["id"].as_str().unwrap(), "delivered", WAIT)
            .await;
    }
    assert_eq!(rx.count(), 7);
    let s = subscription(&server, &sub["id"]).await;
    assert_eq!(s["enabled"], true, "{s}");
}

#[tokio::test]
async fn the_rule_needs_more_than_threshold_failures_and_enabling_again_forgets_earlier_ones() {
    let config = r#"
[disable]
threshold = 3
[retry.policies.fast]
steps = [ { after = "20ms" }, { after = "20ms" }, { after = "20ms" }, { after = "20ms" } ]
"#;
    let server = TestServer::start(config).await;
    // Exactly three failures, then success: not disabled.
    let rx = Receiver::scripted(vec![500, 500, 500, 200, 500], 200).await;
    let sub = server
        .subscribe(json!({"url": rx.url("/"), "events": ["add_lead"], "retry": "fast"}))
        .await;
    server
        .emit(json!({"event": "add_lead", "data": {"id": 1}}))
        .await;
    let id = rx.wait_requests(4, WAIT).await[0].header("webhook-id");
    server.wait_delivery_status(&id, "delivered", WAIT).await;
    assert_eq!(subscription(&server, &sub["id"]).await["enabled"], true);

    // Disabled and enabled again by an admin: the three failures no longer count, so the next
    // one (the fourth within the window) does not disable it.
    let path = format!("/v1/subscriptions/{}", sub["id"].as_str().unwrap());
    for enabled in [false, true] {
        let (code, s) = server.patch(&path, &json!({"enabled": enabled})).await;
        assert_eq!(code, 200, "{s}");
    }
    server
        .emit(json!({"event": "add_lead", "data": {"id": 2}}))
        .await;
    let id = rx.wait_requests(6, WAIT).await[4].header("webhook-id");
    let d = server.wait_delivery_status(&id, "delivered", WAIT).await;
    assert_eq!(d["attempts"].as_array().unwrap().len(), 2, "{d}");
    assert_eq!(subscription(&server, &sub["id"]).await["enabled"], true);
}

#[tokio::test]
async fn gone_disables_at_once_and_a_native_patch_sends_what_was_held() {
    let server = TestServer::start(common::FAST_POLICIES).await;
    let rx = Receiver::scripted(vec![410], 200).await;
    let witness = Receiver::start(200).await;
    let sub = server
        .subscribe(json!({"url": rx.url("/gone"), "events": ["add_lead"], "retry": "fast-amocrm"}))
        .await;
    server
        .subscribe(json!({"url": witness.url("/"), "events": ["add_lead"]}))
        .await;
    server
        .emit(json!({"event": "add_lead", "data": {"id": 1}}))
        .await;
    let id = rx.wait_requests(1, WAIT).await[0].header("webhook-id");
    let d = server.wait_delivery_status(&id, "failed", WAIT).await;
    assert_eq!(
        d["attempts"].as_array().unwrap().len(),
        1,
        "410 ends it: {d}"
    );
    assert!(d["error"].as_str().unwrap().contains("410 Gone"), "{d}");
    let s = subscription(&server, &sub["id"]).await;
    assert_eq!(s["enabled"], false);
    assert_eq!(s["disabled_reason"], "gone");
    assert_eq!(
        v4_webhook(&server, &rx.url("/gone")).await["disabled"],
        true
    );

    // Held: the second event reaches the witness, not the disabled subscription.
    let receipt = server
        .emit(json!({"event": "add_lead", "data": {"id": 2}}))
        .await;
    assert_eq!(receipt["deliveries"], 2);
    witness.wait_requests(2, WAIT).await;
    assert_eq!(rx.count(), 1);
    let held = deliveries(&server, &sub).await[0].clone();
    assert_eq!(held["status"], "pending");

    let (code, s) = server
        .patch(
            &format!("/v1/subscriptions/{}", sub["id"].as_str().unwrap()),
            &json!({"enabled": true}),
        )
        .await;
    assert_eq!(code, 200, "{s}");
    assert_eq!(s["disabled_reason"], Value::Null);
    let got = rx.wait_requests(2, WAIT).await;
    assert_eq!(got[1].header("webhook-id"), held["id"].as_str().unwrap());
    server
        .wait_delivery_status(held["id"].as_str().unwrap(), "delivered", WAIT)
        .await;
    // The 410'd delivery stays failed.
    assert_eq!(server.delivery(&id).await["status"], "failed");
    assert_eq!(rx.count(), 2);
}

/// Subscribes `rx` with `retry`, emits one event, and waits for the first attempt's record;
/// returns (the delivery after attempt 1, the scheduled delay from that attempt's end in ms).
async fn first_attempt(server: &TestServer, rx: &Receiver, retry: &str) -> (Value, Option<u64>) {
    server
        .subscribe(json!({"url": rx.url("/"), "events": ["add_lead"], "retry": retry}))
        .await;
    server
        .emit(json!({"event": "add_lead", "data": {"id": 1}}))
        .await;
    let id = rx.wait_requests(1, WAIT).await[0].header("webhook-id");
    let d = wait_for_async("the first attempt to be recorded", WAIT, || async {
        let d = server.delivery(&id).await;
        (d["attempts"].as_array().unwrap().len() == 1).then_some(d)
    })
    .await;
    let a = &d["attempts"][0];
    let end = ms(&a["started_at"]) + a["duration_ms"].as_u64().unwrap();
    let delay = (!d["next_attempt_at"].is_null()).then(|| ms(&d["next_attempt_at"]) - end);
    (d, delay)
}

const RETRY_AFTER_CONFIG: &str = r#"
[delivery]
allow_private = ["127.0.0.0/8"]
max_retry_after = "1500ms"
[retry.policies.fast]
steps = [ { after = "20ms" }, { after = "20ms" } ]
[retry.policies.slower]
steps = [ { after = "800ms" } ]
"#;

#[tokio::test]
async fn retry_after_on_503_postpones_the_next_attempt() {
    let server = TestServer::start(RETRY_AFTER_CONFIG).await;
    let rx = Receiver::with_headers(vec![(503, hdr("Retry-After", "1"))], 200).await;
    let (d, delay) = first_attempt(&server, &rx, "fast").await;
    let delay = delay.expect("a retry is scheduled");
    assert!(
        (995..=1200).contains(&delay),
        "Retry-After: 1 gives 1s, not 20ms: {delay} {d}"
    );
    let got = rx.wait_requests(2, WAIT).await;
    assert!(got[1].at.duration_since(got[0].at) >= Duration::from_millis(990));
    server
        .wait_delivery_status(d["id"].as_str().unwrap(), "delivered", WAIT)
        .await;
}

#[tokio::test]
async fn retry_after_on_429_is_capped_at_max_retry_after() {
    let server = TestServer::start(RETRY_AFTER_CONFIG).await;
    let rx = Receiver::with_headers(vec![(429, hdr("Retry-After", "3600"))], 200).await;
    let (d, delay) = first_attempt(&server, &rx, "fast").await;
    let delay = delay.expect("a retry is scheduled");
    assert!(
        (1495..=1700).contains(&delay),
        "capped at 1500ms: {delay} {d}"
    );
    let got = rx.wait_requests(2, WAIT).await;
    assert!(got[1].at.duration_since(got[0].at) >= Duration::from_millis(1490));
    server
        .wait_delivery_status(d["id"].as_str().unwrap(), "delivered", WAIT)
        .await;
}

#[tokio::test]
async fn retry_after_as_an_http_date_is_honoured() {
    let server = TestServer::start(RETRY_AFTER_CONFIG).await;
    let at = SystemTime::now() + Duration::from_secs(2);
    let rx = Receiver::with_headers(
        vec![(503, hdr("Retry-After", &httpdate::fmt_http_date(at)))],
        200,
    )
    .await;
    let (d, delay) = first_attempt(&server, &rx, "fast").await;
    // An HTTP date has whole seconds: 1–2 s from now, capped at 1.5 s; far more than 20ms.
    let delay = delay.expect("a retry is scheduled");
    assert!((900..=1700).contains(&delay), "{delay} {d}");
}

#[tokio::test]
async fn retry_after_is_ignored_when_shorter_or_not_on_429_or_503() {
    let server = TestServer::start(RETRY_AFTER_CONFIG).await;
    // Shorter than the scheduled delay: the schedule stands.
    let rx = Receiver::with_headers(vec![(503, hdr("Retry-After", "0"))], 200).await;
    let (_, delay) = first_attempt(&server, &rx, "slower").await;
    let delay = delay.unwrap();
    assert!((795..=1000).contains(&delay), "{delay}");
    // On a 500 it is not read.
    let rx = Receiver::with_headers(vec![(500, hdr("Retry-After", "5"))], 200).await;
    let (d, delay) = first_attempt(&server, &rx, "fast").await;
    let delay = delay.unwrap();
    assert!(delay < 1000, "20ms, not the 5 s asked: {delay}");
    server
        .wait_delivery_status(d["id"].as_str().unwrap(), "delivered", WAIT)
        .await;
}

#[tokio::test]
async fn retry_after_never_adds_an_attempt() {
    let server = TestServer::start(RETRY_AFTER_CONFIG).await;
    // `once`: the table allows no second attempt, whatever the receiver asks.
    let rx = Receiver::with_headers(vec![(503, hdr("Retry-After", "1"))], 200).await;
    let (d, delay) = first_attempt(&server, &rx, "once").await;
    assert_eq!(delay, None);
    assert_eq!(d["status"], "failed", "{d}");
    // `fast` allows three attempts: the third 429 ends it.
    let rx = Receiver::with_headers(
        vec![
            (429, hdr("Retry-After", "0")),
            (429, hdr("Retry-After", "0")),
            (429, hdr("Retry-After", "1")),
        ],
        200,
    )
    .await;
    let (d, _) = first_attempt(&server, &rx, "fast").await;
    let d = server
        .wait_delivery_status(d["id"].as_str().unwrap(), "failed", WAIT)
        .await;
    assert_eq!(d["attempts"].as_array().unwrap().len(), 3, "{d}");
    assert_eq!(d["next_attempt_at"], Value::Null);
    assert_eq!(rx.count(), 3);
}

#[tokio::test]
async fn digital_pipeline_webhooks_go_once_to_the_subscription_of_their_stage() {
    let server = TestServer::start("").await;
    let stage = Receiver::start(500).await;
    let customers = Receiver::start(200).await;
    let catch_all = Receiver::start(200).await;
    // The lead pipeline's stage 142 of pipeline 752662, as a digital pipeline "webhook" action.
    let lead_events = [
        "mail_in_lead",
        "call_in_lead",
        "chat_lead",
        "site_visit_lead",
        "status_lead",
    ];
    let sub = server
        .subscribe(json!({
            "url": stage.url("/dp"),
            "events": lead_events,
            "filter": {"pipeline_id": 752662, "status_id": "142"},
            "retry": "once",
        }))
        .await;
    assert_eq!(sub["retry"], "once");
    // The customers' period stage.
    let customer_events = [
        "period_customer",
        "mail_in_customer",
        "call_in_customer",
        "chat_customer",
        "site_visit_customer",
    ];
    server
        .subscribe(json!({
            "url": customers.url("/dp-customers"),
            "events": customer_events,
            "filter": {"status_id": 31},
            "retry": "once",
        }))
        .await;
    // A barrier that takes everything at the end.
    server
        .subscribe(json!({"url": catch_all.url("/"), "events": ["add_task"]}))
        .await;

    for (i, e) in lead_events.iter().enumerate() {
        let r = server
            .emit(json!({"event": e, "data": {"id": format!("{}", 100 + i), "status_id": "142", "pipeline_id": "752662"}}))
            .await;
        assert_eq!(r["deliveries"], 1, "{e}");
        // Another stage, or another pipeline: not for this subscription.
        let r = server
            .emit(json!({"event": e, "data": {"id": "1", "status_id": "143", "pipeline_id": "752662"}}))
            .await;
        assert_eq!(r["deliveries"], 0, "{e}");
        let r = server
            .emit(json!({"event": e, "data": {"id": "1", "status_id": "142", "pipeline_id": "1"}}))
            .await;
        assert_eq!(r["deliveries"], 0, "{e}");
    }
    for (i, e) in customer_events.iter().enumerate() {
        let r = server
            .emit(json!({"event": e, "data": {"id": 200 + i, "status_id": 31}}))
            .await;
        assert_eq!(r["deliveries"], 1, "{e}");
    }
    let got = stage.wait_requests(5, WAIT).await;
    let mut bodies: Vec<String> = got.iter().map(|r| r.body_str()).collect();
    bodies.sort();
    let mut want: Vec<String> = lead_events
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let action = e.strip_suffix("_lead").unwrap();
            format!(
                "leads%5B{action}%5D%5B0%5D%5Bid%5D={}&leads%5B{action}%5D%5B0%5D%5Bstatus_id%5D=142&leads%5B{action}%5D%5B0%5D%5Bpipeline_id%5D=752662&account%5Bsubdomain%5D=test&account%5Bid%5D=7039099&account%5B_links%5D%5Bself%5D=https%3A%2F%2Ftest.amocrm.ru",
                100 + i
            )
        })
        .collect();
    want.sort();
    assert_eq!(bodies, want);
    let got = customers.wait_requests(5, WAIT).await;
    assert!(
        got.iter()
            .any(|r| r.body_str().starts_with("customers%5Bperiod%5D%5B0%5D%5Bid%5D=200&customers%5Bperiod%5D%5B0%5D%5Bstatus_id%5D=31&account")),
        "{:?}",
        got.iter().map(|r| r.body_str()).collect::<Vec<_>>()
    );

    // Sent once: the receiver answered 500 to each, and each delivery ended after one attempt.
    let ds = wait_for_async("the stage's deliveries to end", WAIT, || async {
        let ds = deliveries(&server, &sub).await;
        ds.iter().all(|d| d["status"] == "failed").then_some(ds)
    })
    .await;
    assert_eq!(ds.len(), 5);
    for d in &ds {
        let d = server.delivery(d["id"].as_str().unwrap()).await;
        assert_eq!(d["attempts"].as_array().unwrap().len(), 1, "{d}");
    }
    server
        .emit(json!({"event": "add_task", "data": {"id": 1}}))
        .await;
    catch_all.wait_requests(1, WAIT).await;
    assert_eq!(stage.count(), 5);
    assert_eq!(customers.count(), 5);
}
