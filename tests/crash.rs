//! The real binary killed with SIGKILL in the middle of a stream of events, then restarted on the
//! same storage: every event answered 202 is delivered, and a retry that was waiting still arrives.

mod common;

use common::{Receiver, wait_for, wait_for_async};
use serde_json::{Value, json};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);

struct Daemon {
    child: common::Binary,
    base: String,
}

fn start_daemon(config: &std::path::Path) -> Daemon {
    let (child, base) = common::start_binary(config, std::process::Stdio::null());
    Daemon { child, base }
}

/// The `id` of the first lead in an amoCRM form body.
fn lead_id(body: &str) -> Option<u64> {
    body.split('&')
        .find_map(|kv| kv.strip_prefix("leads%5Badd%5D%5B0%5D%5Bid%5D="))
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn sigkill_loses_no_accepted_event_and_no_waiting_retry() {
    let dir = tempfile::tempdir().unwrap();
    let config = common::binary_config(
        dir.path(),
        "[retry.policies.later]
steps = [ { after = \"2s\" } ]
",
    );
    let sink = Receiver::start(200).await;
    let flaky = Receiver::scripted(vec![500], 200).await;
    let http = reqwest::Client::new();

    let daemon = start_daemon(&config);
    let post = |base: &str, path: &str, body: Value| {
        http.post(format!("{base}{path}"))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
    };
    let r = post(
        &daemon.base,
        "/v1/subscriptions",
        json!({"url": sink.url("/sink"), "events": ["add_lead"]}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 201);
    let r = post(
        &daemon.base,
        "/v1/subscriptions",
        json!({"url": flaky.url("/flaky"), "events": ["update_lead"], "retry": "later"}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 201);

    // A retry waiting in the index when the process dies.
    let r = post(
        &daemon.base,
        "/v1/events",
        json!({"event": "update_lead", "data": {"id": 1}}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 202);
    let first = flaky.wait_requests(1, WAIT).await;
    let waiting_id = first[0].header("webhook-id");
    wait_for_async("the retry to be scheduled", WAIT, || async {
        let d: Value = http
            .get(format!("{}/v1/deliveries/{waiting_id}", daemon.base))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (d["status"] == "pending" && !d["next_attempt_at"].is_null()).then_some(())
    })
    .await;

    // A stream of events from four concurrent senders; the process is killed mid-stream.
    let accepted = Arc::new(Mutex::new(HashSet::new()));
    let mut senders = Vec::new();
    for s in 0..4u64 {
        let (http, base, accepted) = (http.clone(), daemon.base.clone(), accepted.clone());
        senders.push(tokio::spawn(async move {
            for i in 0..10_000u64 {
                let id = s * 100_000 + i;
                let body = json!({"event": "add_lead", "data": {"id": id, "name": "lead"}});
                let sent = http
                    .post(format!("{base}/v1/events"))
                    .header("content-type", "application/json")
                    .body(body.to_string())
                    .send()
                    .await;
                match sent {
                    Ok(r) if r.status() == 202 => {
                        accepted.lock().unwrap().insert(id);
                    }
                    // The daemon is gone: the stream ends.
                    _ => return,
                }
            }
        }));
    }
    wait_for("some events to be accepted", WAIT, || {
        (accepted.lock().unwrap().len() >= 200).then_some(())
    })
    .await;
    let mut daemon = daemon;
    daemon.child.kill().unwrap(); // SIGKILL
    daemon.child.wait().unwrap();
    for s in senders {
        s.await.unwrap();
    }
    let accepted: HashSet<u64> = accepted.lock().unwrap().clone();
    assert!(accepted.len() >= 200);

    let mut daemon = start_daemon(&config);
    wait_for(
        &format!("all {} accepted events at the sink", accepted.len()),
        WAIT,
        || {
            let got: HashSet<u64> = sink
                .requests()
                .iter()
                .filter_map(|r| lead_id(&r.body_str()))
                .collect();
            accepted.is_subset(&got).then_some(())
        },
    )
    .await;
    let retried = flaky.wait_requests(2, WAIT).await;
    assert_eq!(retried[1].header("webhook-id"), waiting_id);
    let d: Value = wait_for_async("the retried delivery to be delivered", WAIT, || async {
        let d: Value = http
            .get(format!("{}/v1/deliveries/{waiting_id}", daemon.base))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (d["status"] == "delivered").then_some(d)
    })
    .await;
    assert_eq!(d["attempts"].as_array().unwrap().len(), 2);
    daemon.child.kill().unwrap();
    daemon.child.wait().unwrap();
}
