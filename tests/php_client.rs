//! The seed integration's PHP code against the real server: `tests/php/webhooks_v2.php` is
//! amoCRM's v2 webhook snippet (curl, `CURLOPT_POSTFIELDS => http_build_query($data)`), run with
//! `php` as a subprocess. It subscribes its own PHP receiver, which then reads a delivered webhook
//! through `$_POST`; then it unsubscribes, with and without a URL.

mod common;
mod php;

use common::TestServer;
use php::PhpReceiver;
use serde_json::{Value, json};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const WAIT: Duration = Duration::from_secs(10);

/// Runs the snippet; returns its exit code and the `{code, content_type, runtime_timestamp,
/// response}` it printed.
async fn snippet(server: &TestServer, action: &str, url: &str, events: &[&str]) -> (i32, Value) {
    let mut args = vec![server.base.as_str(), action, url];
    args.extend_from_slice(events);
    let out = php::run("webhooks_v2.php", &args).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let printed: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "webhooks_v2.php printed no JSON ({e}); stdout {stdout:?}, stderr {:?}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), printed)
}

fn assert_v2_answer(printed: &Value, action: &str) {
    assert_eq!(printed["code"], 200, "{printed}");
    assert_eq!(printed["content_type"], "application/hal+json", "{printed}");
    let ts: u64 = printed["runtime_timestamp"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(ts.abs_diff(now) <= 5, "{printed}");
    assert_eq!(
        printed["response"]["_links"]["self"],
        json!({"href": format!("/api/v2/webhooks/{action}"), "method": "post"})
    );
}

async fn events_of(server: &TestServer, url: &str) -> Option<Value> {
    let (_, v) = server.get("/v1/subscriptions").await;
    v["subscriptions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["url"] == url)
        .map(|s| s["events"].clone())
}

#[tokio::test]
async fn the_php_snippet_subscribes_its_receiver_and_unsubscribes_it() {
    let server = TestServer::start("").await;
    let receiver = PhpReceiver::start().await;
    let hook = receiver.url("/amocrm/webhook.php");

    let (exit, printed) = snippet(&server, "subscribe", &hook, &["add_lead", "status_lead"]).await;
    assert_eq!(exit, 0, "{printed}");
    assert_v2_answer(&printed, "subscribe");
    assert_eq!(
        printed["response"]["_embedded"]["items"],
        json!([{"url": hook, "result": true}])
    );
    assert_eq!(
        events_of(&server, &hook).await,
        Some(json!(["add_lead", "status_lead"]))
    );

    // A webhook for the subscribed event reaches the receiver, which reads it through $_POST.
    let receipt = server
        .emit(json!({"event": "status_lead", "data": {"id": "25399013", "status_id": "142", "old_status_id": "7039101", "pipeline_id": "752662"}}))
        .await;
    let (_, list) = server.get("/v1/deliveries").await;
    let delivery = list["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["event_id"] == receipt["id"])
        .unwrap()
        .clone();
    let post = receiver
        .post_of(delivery["id"].as_str().unwrap(), WAIT)
        .await;
    assert_eq!(
        post,
        json!({
            "leads": {"status": [{"id": "25399013", "status_id": "142", "old_status_id": "7039101", "pipeline_id": "752662"}]},
            "account": {"subdomain": "test", "id": "7039099", "_links": {"self": "https://test.amocrm.ru"}},
        })
    );

    // Subscribing again adds events to the same subscription.
    let (exit, printed) = snippet(&server, "subscribe", &hook, &["add_contact"]).await;
    assert_eq!(exit, 0, "{printed}");
    assert_eq!(
        events_of(&server, &hook).await,
        Some(json!(["add_lead", "status_lead", "add_contact"]))
    );

    // An unknown event: the item fails with the reason, and nothing changes.
    let (exit, printed) = snippet(&server, "subscribe", &hook, &["fly_lead"]).await;
    assert_eq!(exit, 2, "{printed}");
    let item = &printed["response"]["_embedded"]["items"][0];
    assert_eq!(item["result"], false);
    assert!(
        item["error"]
            .as_str()
            .unwrap()
            .contains("unknown event \"fly_lead\""),
        "{item}"
    );
    assert_eq!(
        events_of(&server, &hook).await,
        Some(json!(["add_lead", "status_lead", "add_contact"]))
    );

    // Unsubscribe one event from the URL.
    let (exit, printed) = snippet(&server, "unsubscribe", &hook, &["status_lead"]).await;
    assert_eq!(exit, 0, "{printed}");
    assert_v2_answer(&printed, "unsubscribe");
    assert_eq!(
        printed["response"]["_embedded"]["items"],
        json!([{"url": hook, "result": true}])
    );
    assert_eq!(
        events_of(&server, &hook).await,
        Some(json!(["add_lead", "add_contact"]))
    );
    let receipt = server
        .emit(json!({"event": "status_lead", "data": {"id": "1"}}))
        .await;
    assert_eq!(receipt["deliveries"], 0);

    // Without a URL: from every URL; the subscription left with no events is gone.
    let (exit, printed) = snippet(&server, "unsubscribe", "-", &["add_lead", "add_contact"]).await;
    assert_eq!(exit, 0, "{printed}");
    assert_eq!(
        printed["response"]["_embedded"]["items"],
        json!([{"url": null, "result": true}])
    );
    assert_eq!(events_of(&server, &hook).await, None);

    // A URL that is not subscribed.
    let (exit, printed) = snippet(&server, "unsubscribe", &hook, &["add_lead"]).await;
    assert_eq!(exit, 2, "{printed}");
    let item = &printed["response"]["_embedded"]["items"][0];
    assert_eq!(item["result"], false);
    assert!(
        item["error"]
            .as_str()
            .unwrap()
            .contains("is not subscribed"),
        "{item}"
    );
    assert_eq!(receiver.count(), 1);
}
