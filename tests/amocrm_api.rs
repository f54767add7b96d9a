//! amoCRM's webhook management APIs through the real server (SPEC §5.3): v2 subscribe,
//! unsubscribe and list, in JSON and as PHP's `http_build_query` sends them, with per-item results;
//! v4 create, update by destination, filter, delete, errors and the limit. Both share the native
//! API's store, so every change is checked through `/v1/subscriptions` too, and deliveries follow.

mod common;

use common::{Receiver, TestServer};
use reqwest::header::HeaderMap;
use serde_json::{Value, json};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const WAIT: Duration = Duration::from_secs(10);

/// Sends `body` with `content_type` (none when empty); returns status, JSON body (Null when
/// empty, a string when not JSON) and the answer's headers.
async fn send(
    server: &TestServer,
    method: &str,
    path: &str,
    content_type: &str,
    body: impl Into<reqwest::Body>,
) -> (u16, Value, HeaderMap) {
    let mut req = server
        .http
        .request(method.parse().unwrap(), server.url(path))
        .body(body);
    if !content_type.is_empty() {
        req = req.header("content-type", content_type);
    }
    let r = req.send().await.unwrap();
    let code = r.status().as_u16();
    let headers = r.headers().clone();
    let text = r.text().await.unwrap();
    let v = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    (code, v, headers)
}

async fn post_json(server: &TestServer, path: &str, body: Value) -> (u16, Value, HeaderMap) {
    send(server, "POST", path, "application/json", body.to_string()).await
}

async fn post_form(server: &TestServer, path: &str, form: &str) -> (u16, Value, HeaderMap) {
    send(
        server,
        "POST",
        path,
        "application/x-www-form-urlencoded",
        form.to_string(),
    )
    .await
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn content_type(h: &HeaderMap) -> &str {
    h.get("content-type").unwrap().to_str().unwrap()
}

/// A v2 answer: 200, `application/hal+json`, a `Runtime-Timestamp` of now, the `_links` of
/// `path`; returns its items.
fn v2_items(path: &str, method: &str, got: (u16, Value, HeaderMap)) -> Vec<Value> {
    let (code, body, headers) = got;
    assert_eq!(code, 200, "{body}");
    assert_eq!(content_type(&headers), "application/hal+json");
    let ts: u64 = headers
        .get("runtime-timestamp")
        .expect("Runtime-Timestamp header")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(ts.abs_diff(unix_now()) <= 2, "Runtime-Timestamp {ts}");
    assert_eq!(
        body["_links"],
        json!({"self": {"href": path, "method": method}}),
        "{body}"
    );
    assert_eq!(body.as_object().unwrap().len(), 2, "{body}");
    body["_embedded"]["items"].as_array().unwrap().clone()
}

/// Every subscription as `(url, events)`, oldest first, from the native API.
async fn native(server: &TestServer) -> Vec<(String, Vec<String>)> {
    let (code, v) = server.get("/v1/subscriptions").await;
    assert_eq!(code, 200);
    v["subscriptions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["url"].as_str().unwrap().to_string(),
                s["events"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|e| e.as_str().unwrap().to_string())
                    .collect(),
            )
        })
        .collect()
}

fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// A problem+json answer with `status` whose detail contains each of `needles`.
fn assert_problem(case: &str, got: (u16, Value, HeaderMap), status: u16, needles: &[&str]) {
    let (code, body, headers) = got;
    assert_eq!(code, status, "{case}: {body}");
    assert_eq!(
        content_type(&headers),
        "application/problem+json",
        "{case}: {body}"
    );
    assert_eq!(body["status"], status, "{case}: {body}");
    let detail = body["detail"].as_str().unwrap_or_default();
    for n in needles {
        assert!(detail.contains(n), "{case}: detail {detail:?} lacks {n:?}");
    }
}

#[tokio::test]
async fn v2_subscribe_in_json_adds_events_to_a_subscribed_url_and_deliveries_follow() {
    let server = TestServer::start("").await;
    let rx = Receiver::start(200).await;
    let other = Receiver::start(200).await;

    // Nothing subscribed yet: an empty list.
    let (code, body, headers) = send(&server, "GET", "/api/v2/webhooks", "", "").await;
    assert_eq!(
        v2_items("/api/v2/webhooks", "get", (code, body, headers)),
        Vec::<Value>::new()
    );

    let url = rx.url("/amo?key=k1");
    let got = post_json(
        &server,
        "/api/v2/webhooks/subscribe",
        json!({"subscribe": [
            {"url": url, "events": ["add_lead", "status_lead"]},
            {"url": other.url("/"), "events": ["add_contact"]},
        ]}),
    )
    .await;
    assert_eq!(
        v2_items("/api/v2/webhooks/subscribe", "post", got),
        vec![
            json!({"url": url, "result": true}),
            json!({"url": other.url("/"), "result": true}),
        ]
    );

    // The same URL again adds its events to the same subscription; a repeated event is kept once.
    let got = post_json(
        &server,
        "/api/v2/webhooks/subscribe",
        json!({"subscribe": [{"url": url, "events": ["status_lead", "add_company"]}]}),
    )
    .await;
    assert_eq!(
        v2_items("/api/v2/webhooks/subscribe", "post", got),
        vec![json!({"url": url, "result": true})]
    );
    assert_eq!(
        native(&server).await,
        vec![
            (
                url.clone(),
                strings(&["add_lead", "status_lead", "add_company"])
            ),
            (other.url("/"), strings(&["add_contact"])),
        ]
    );

    let (code, body, headers) = send(&server, "GET", "/api/v2/webhooks", "", "").await;
    let items = v2_items("/api/v2/webhooks", "get", (code, body, headers));
    let (_, subs) = server.get("/v1/subscriptions").await;
    assert_eq!(
        items,
        vec![
            json!({"id": subs["subscriptions"][0]["id"], "url": url, "events": ["add_lead", "status_lead", "add_company"]}),
            json!({"id": subs["subscriptions"][1]["id"], "url": other.url("/"), "events": ["add_contact"]}),
        ]
    );

    // The added event is delivered, in the amoCRM format and with the amoCRM retry policy.
    assert_eq!(subs["subscriptions"][0]["format"], "amocrm");
    assert_eq!(subs["subscriptions"][0]["retry"], "amocrm");
    server
        .emit(json!({"event": "add_company", "data": {"id": 3, "name": "ООО Ромашка"}}))
        .await;
    let got = rx.wait_requests(1, WAIT).await;
    assert_eq!(got[0].path, "/amo?key=k1");
    assert!(
        got[0]
            .body_str()
            .starts_with("contacts%5Badd%5D%5B0%5D%5Bid%5D=3&"),
        "{}",
        got[0].body_str()
    );
    assert_eq!(other.count(), 0);
}

#[tokio::test]
async fn v2_reads_forms_as_http_build_query_sends_them() {
    let server = TestServer::start("").await;
    let rx = Receiver::start(200).await;
    let url = rx.url("/hook?a=1&b=Сделка");
    // PHP: http_build_query(['subscribe' => [['url' => $url, 'events' => ['add_lead', 'update_lead']]]])
    let form = format!(
        "subscribe%5B0%5D%5Burl%5D={}&subscribe%5B0%5D%5Bevents%5D%5B0%5D=add_lead&subscribe%5B0%5D%5Bevents%5D%5B1%5D=update_lead",
        php_urlencode(&url)
    );
    let got = post_form(&server, "/api/v2/webhooks/subscribe", &form).await;
    assert_eq!(
        v2_items("/api/v2/webhooks/subscribe", "post", got),
        vec![json!({"url": url, "result": true})]
    );
    // Unencoded brackets and no content type at all read the same.
    let second = rx.url("/second");
    let form = format!("subscribe[0][url]={second}&subscribe[0][events][0]=delete_lead");
    let got = send(&server, "POST", "/api/v2/webhooks/subscribe", "", form).await;
    assert_eq!(
        v2_items("/api/v2/webhooks/subscribe", "post", got),
        vec![json!({"url": second, "result": true})]
    );
    let normalised = url::Url::parse(&url).unwrap().to_string();
    assert_eq!(
        native(&server).await,
        vec![
            (normalised, strings(&["add_lead", "update_lead"])),
            (second.clone(), strings(&["delete_lead"])),
        ]
    );

    // Unsubscribe as a form too.
    let form = format!(
        "unsubscribe%5B0%5D%5Burl%5D={}&unsubscribe%5B0%5D%5Bevents%5D%5B0%5D=delete_lead",
        php_urlencode(&second)
    );
    let got = post_form(&server, "/api/v2/webhooks/unsubscribe", &form).await;
    assert_eq!(
        v2_items("/api/v2/webhooks/unsubscribe", "post", got),
        vec![json!({"url": second, "result": true})]
    );
    assert_eq!(native(&server).await.len(), 1);
}

/// PHP's `urlencode`.
fn php_urlencode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => out.push(b as char),
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[tokio::test]
async fn v2_items_fail_on_their_own_with_the_reason_and_store_nothing() {
    let server = TestServer::start("").await;
    let good = "http://127.0.0.1:9/good";
    let got = post_json(
        &server,
        "/api/v2/webhooks/subscribe",
        json!({"subscribe": [
            {"url": "http://127.0.0.1:9/a", "events": ["fly_lead"]},
            {"url": "ftp://127.0.0.1/x", "events": ["add_lead"]},
            {"url": "not a url", "events": ["add_lead"]},
            {"url": "http://10.1.2.3/private", "events": ["add_lead"]},
            {"url": "http://127.0.0.1:9/b", "events": []},
            {"url": "http://127.0.0.1:9/c", "events": "add_lead"},
            {"url": "http://127.0.0.1:9/d", "events": [5]},
            {"url": "http://127.0.0.1:9/e"},
            {"events": ["add_lead"]},
            {"url": 7, "events": ["add_lead"]},
            {"url": "http://127.0.0.1:9/f", "events": ["add_lead"], "sort": 1},
            "just a string",
            {"url": good, "events": ["add_lead"]},
        ]}),
    )
    .await;
    let items = v2_items("/api/v2/webhooks/subscribe", "post", got);
    let expect: [(&str, &[&str]); 13] = [
        ("fly_lead", &["unknown event \"fly_lead\"", "add_lead"]),
        ("ftp", &["url", "scheme \"ftp\""]),
        ("not a url", &["url", "not an absolute URL"]),
        ("private", &["url", "10.1.2.3"]),
        ("no events", &["events", "at least one event"]),
        ("events a string", &["events", "must be a list"]),
        ("events a number", &["events", "5 is not an event name"]),
        ("no events field", &["events", "required"]),
        ("no url", &["url", "required"]),
        ("url a number", &["url", "must be a string"]),
        ("unknown field", &["unknown field \"sort\""]),
        ("not an object", &["must be an object"]),
        ("good", &[]),
    ];
    assert_eq!(items.len(), expect.len());
    for (item, (case, needles)) in items.iter().zip(expect) {
        if needles.is_empty() {
            assert_eq!(item, &json!({"url": good, "result": true}), "{case}");
            continue;
        }
        assert_eq!(item["result"], false, "{case}: {item}");
        let error = item["error"].as_str().unwrap_or_default();
        for n in needles {
            assert!(error.contains(n), "{case}: error {error:?} lacks {n:?}");
        }
    }
    assert_eq!(items[0]["url"], "http://127.0.0.1:9/a");
    assert_eq!(items[8]["url"], Value::Null);
    // Only the good item was stored.
    assert_eq!(
        native(&server).await,
        vec![(good.to_string(), strings(&["add_lead"]))]
    );
}

#[tokio::test]
async fn v2_bodies_that_do_not_parse_are_400_problems_and_store_nothing() {
    let server = TestServer::start("").await;
    let cases: Vec<(&str, &str, &str, u16, Vec<&str>)> = vec![
        ("empty", "", "", 400, vec!["empty"]),
        ("empty json", "application/json", "", 400, vec!["empty"]),
        (
            "broken json",
            "application/json",
            "{\"subscribe\": [",
            400,
            vec!["invalid JSON"],
        ),
        (
            "json trailing text",
            "application/json",
            "{\"subscribe\": []} x",
            400,
            vec!["invalid JSON"],
        ),
        (
            "an array",
            "application/json",
            "[1]",
            400,
            vec!["must be an object", "subscribe"],
        ),
        (
            "no subscribe key",
            "application/json",
            "{\"items\": []}",
            400,
            vec!["unknown field \"items\""],
        ),
        (
            "subscribe not a list",
            "application/json",
            "{\"subscribe\": {\"url\": \"http://127.0.0.1:9/\"}}",
            400,
            vec!["\"subscribe\" must be a list"],
        ),
        (
            "no items",
            "application/json",
            "{\"subscribe\": []}",
            400,
            vec!["lists no items"],
        ),
        (
            "form without brackets",
            "application/x-www-form-urlencoded",
            "url=http://127.0.0.1:9/&events=add_lead",
            400,
            vec!["unknown field", "expected {\"subscribe\": ["],
        ),
        (
            "form with a broken key",
            "application/x-www-form-urlencoded",
            "subscribe[0][url=x",
            400,
            vec!["invalid form body"],
        ),
        (
            "form mixing a value and a nested key",
            "application/x-www-form-urlencoded",
            "subscribe=1&subscribe[0][url]=x",
            400,
            vec!["invalid form body"],
        ),
        (
            "multipart",
            "multipart/form-data; boundary=x",
            "--x--",
            415,
            vec!["multipart/form-data", "http_build_query"],
        ),
    ];
    for (case, ct, body, status, needles) in cases {
        let got = send(
            &server,
            "POST",
            "/api/v2/webhooks/subscribe",
            ct,
            body.to_string(),
        )
        .await;
        assert_problem(case, got, status, &needles);
    }
    let got = post_json(
        &server,
        "/api/v2/webhooks/unsubscribe",
        json!({"subscribe": [{"url": "http://127.0.0.1:9/", "events": ["add_lead"]}]}),
    )
    .await;
    assert_problem(
        "subscribe sent to unsubscribe",
        got,
        400,
        &["unknown field \"subscribe\"", "unsubscribe"],
    );
    assert!(native(&server).await.is_empty());
}

#[tokio::test]
async fn v2_unsubscribe_removes_events_from_one_url_or_all_and_deletes_emptied_subscriptions() {
    let server = TestServer::start("").await;
    let a = "http://127.0.0.1:9/a";
    let b = "http://127.0.0.1:9/b";
    let got = post_json(
        &server,
        "/api/v2/webhooks/subscribe",
        json!({"subscribe": [
            {"url": a, "events": ["add_lead", "status_lead"]},
            {"url": b, "events": ["add_lead", "update_contact"]},
        ]}),
    )
    .await;
    assert!(
        v2_items("/api/v2/webhooks/subscribe", "post", got)
            .iter()
            .all(|i| i["result"] == true)
    );

    // From one URL.
    let got = post_json(
        &server,
        "/api/v2/webhooks/unsubscribe",
        json!({"unsubscribe": [{"url": a, "events": ["status_lead"]}]}),
    )
    .await;
    assert_eq!(
        v2_items("/api/v2/webhooks/unsubscribe", "post", got),
        vec![json!({"url": a, "result": true})]
    );
    assert_eq!(
        native(&server).await,
        vec![
            (a.to_string(), strings(&["add_lead"])),
            (b.to_string(), strings(&["add_lead", "update_contact"])),
        ]
    );

    // Per item: a URL that is not subscribed, an unknown event, and without a URL from every URL:
    // `a` is left with no events and is deleted, `b` keeps the other one.
    let got = post_json(
        &server,
        "/api/v2/webhooks/unsubscribe",
        json!({"unsubscribe": [
            {"url": "http://127.0.0.1:9/never", "events": ["add_lead"]},
            {"url": a, "events": ["fly_lead"]},
            {"events": ["add_lead"]},
            {"events": ["note_lead"]},
            {"url": a},
        ]}),
    )
    .await;
    let items = v2_items("/api/v2/webhooks/unsubscribe", "post", got);
    assert_eq!(items.len(), 5);
    assert_eq!(items[0]["result"], false);
    assert_eq!(items[0]["url"], "http://127.0.0.1:9/never");
    assert!(
        items[0]["error"]
            .as_str()
            .unwrap()
            .contains("http://127.0.0.1:9/never is not subscribed"),
        "{}",
        items[0]
    );
    assert_eq!(items[1]["result"], false);
    assert!(
        items[1]["error"]
            .as_str()
            .unwrap()
            .contains("unknown event \"fly_lead\""),
        "{}",
        items[1]
    );
    assert_eq!(items[2], json!({"url": null, "result": true}));
    assert_eq!(items[3]["result"], false);
    assert!(
        items[3]["error"]
            .as_str()
            .unwrap()
            .contains("no URL is subscribed to note_lead"),
        "{}",
        items[3]
    );
    assert_eq!(items[4]["result"], false);
    assert!(
        items[4]["error"]
            .as_str()
            .unwrap()
            .contains("events: is required"),
        "{}",
        items[4]
    );
    assert_eq!(
        native(&server).await,
        vec![(b.to_string(), strings(&["update_contact"]))]
    );
}

#[tokio::test]
async fn unsubscribing_the_last_event_deletes_the_subscription_and_fails_its_waiting_deliveries() {
    let policy = "[retry.policies.later]\nsteps = [ { after = \"1h\" } ]\n";
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
    let got = post_json(
        &server,
        "/api/v2/webhooks/unsubscribe",
        json!({"unsubscribe": [{"url": rx.url("/"), "events": ["add_lead"]}]}),
    )
    .await;
    assert_eq!(
        v2_items("/api/v2/webhooks/unsubscribe", "post", got),
        vec![json!({"url": rx.url("/"), "result": true})]
    );
    let (code, _) = server
        .get(&format!(
            "/v1/subscriptions/{}",
            sub["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(code, 404);
    let d = server.delivery(&id).await;
    assert_eq!(d["status"], "failed");
    assert_eq!(d["error"], "subscription deleted");
}

/// A v4 webhook object checked field by field; returns its id.
fn check_webhook(
    w: &Value,
    destination: &str,
    settings: &[&str],
    sort: i64,
    disabled: bool,
) -> String {
    let keys: Vec<&str> = w.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        vec![
            "id",
            "destination",
            "created_at",
            "updated_at",
            "account_id",
            "created_by",
            "sort",
            "disabled",
            "settings"
        ],
        "{w}"
    );
    assert_eq!(w["destination"], destination, "{w}");
    assert_eq!(w["settings"], json!(settings), "{w}");
    assert_eq!(w["sort"], sort, "{w}");
    assert_eq!(w["disabled"], disabled, "{w}");
    assert_eq!(w["account_id"], "7039099", "{w}");
    assert_eq!(w["created_by"], 0, "{w}");
    for t in ["created_at", "updated_at"] {
        let secs = w[t]
            .as_u64()
            .unwrap_or_else(|| panic!("{t} in seconds: {w}"));
        assert!(secs.abs_diff(unix_now()) <= 5, "{t}: {w}");
    }
    w["id"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn v4_creates_updates_by_destination_filters_and_deletes() {
    let server = TestServer::start("").await;
    let rx = Receiver::start(200).await;
    let dest = rx.url("/v4?token=t");

    let (code, body, _) = send(&server, "GET", "/api/v4/webhooks", "", "").await;
    assert_eq!((code, body), (204, Value::Null), "no webhooks is 204");

    let (code, w, headers) = post_json(
        &server,
        "/api/v4/webhooks",
        json!({"destination": dest, "settings": ["add_lead", "status_lead"], "sort": 10}),
    )
    .await;
    assert_eq!(code, 200, "{w}");
    assert_eq!(content_type(&headers), "application/hal+json");
    let id = check_webhook(&w, &dest, &["add_lead", "status_lead"], 10, false);

    // Another destination, without sort: listed before the first (sort 0 < 10).
    let other = "http://127.0.0.1:9/other";
    let (code, w2, _) = post_json(
        &server,
        "/api/v4/webhooks",
        json!({"destination": other, "settings": ["add_task"]}),
    )
    .await;
    assert_eq!(code, 200, "{w2}");
    let other_id = check_webhook(&w2, other, &["add_task"], 0, false);

    // Update by destination: the settings are replaced, the id stays, no new subscription.
    let (code, w, _) = post_json(
        &server,
        "/api/v4/webhooks",
        json!({"destination": dest, "settings": ["update_lead", "add_lead"]}),
    )
    .await;
    assert_eq!(code, 200, "{w}");
    assert_eq!(
        check_webhook(&w, &dest, &["update_lead", "add_lead"], 10, false),
        id
    );
    let (_, native_sub) = server.get(&format!("/v1/subscriptions/{id}")).await;
    assert_eq!(native_sub["events"], json!(["update_lead", "add_lead"]));
    assert_eq!(native(&server).await.len(), 2);

    let (code, list, headers) = send(&server, "GET", "/api/v4/webhooks", "", "").await;
    assert_eq!(code, 200, "{list}");
    assert_eq!(content_type(&headers), "application/hal+json");
    assert_eq!(list["_total_items"], 2);
    let ids: Vec<&str> = list["_embedded"]["webhooks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![other_id.as_str(), id.as_str()]);

    // filter[destination], encoded as http_build_query encodes it, and raw.
    let path = format!(
        "/api/v4/webhooks?filter%5Bdestination%5D={}",
        php_urlencode(&dest)
    );
    let (code, list, _) = send(&server, "GET", &path, "", "").await;
    assert_eq!(code, 200, "{list}");
    assert_eq!(list["_total_items"], 1);
    check_webhook(
        &list["_embedded"]["webhooks"][0],
        &dest,
        &["update_lead", "add_lead"],
        10,
        false,
    );
    let (code, list, _) = send(
        &server,
        "GET",
        &format!("/api/v4/webhooks?filter[destination]={other}"),
        "",
        "",
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(list["_embedded"]["webhooks"][0]["id"], other_id.as_str());
    let (code, _, _) = send(
        &server,
        "GET",
        "/api/v4/webhooks?filter[destination]=http://127.0.0.1:9/none",
        "",
        "",
    )
    .await;
    assert_eq!(code, 204);

    // The updated settings are what is delivered.
    server
        .emit(json!({"event": "status_lead", "data": {"id": 1}}))
        .await;
    server
        .emit(json!({"event": "update_lead", "data": {"id": 2}}))
        .await;
    let got = rx.wait_requests(1, WAIT).await;
    assert!(
        got[0]
            .body_str()
            .starts_with("leads%5Bupdate%5D%5B0%5D%5Bid%5D=2&")
    );
    assert_eq!(got[0].path, "/v4?token=t");

    // Delete by destination: 204, then 404.
    let (code, body, _) = send(
        &server,
        "DELETE",
        "/api/v4/webhooks",
        "application/json",
        json!({"destination": dest}).to_string(),
    )
    .await;
    assert_eq!((code, body), (204, Value::Null));
    let (code, _) = server.get(&format!("/v1/subscriptions/{id}")).await;
    assert_eq!(code, 404);
    let got = send(
        &server,
        "DELETE",
        "/api/v4/webhooks",
        "application/json",
        json!({"destination": dest}).to_string(),
    )
    .await;
    assert_problem("delete again", got, 404, &["no webhook", &dest]);
    assert_eq!(native(&server).await.len(), 1);
}

#[tokio::test]
async fn v4_bad_input_is_a_problem_and_stores_nothing() {
    let server = TestServer::start("").await;
    let ok = "http://127.0.0.1:9/ok";
    let cases: Vec<(&str, &str, &str, u16, Vec<&str>)> = vec![
        ("empty body", "POST", "", 400, vec!["empty"]),
        (
            "not json",
            "POST",
            "destination=x",
            400,
            vec![
                "invalid JSON",
                "looks form-encoded",
                "/api/v2/webhooks/subscribe",
            ],
        ),
        (
            "broken json",
            "POST",
            r#"{"destination": "#,
            400,
            vec!["invalid JSON"],
        ),
        (
            "an array",
            "POST",
            r#"["http://127.0.0.1:9/ok", ["add_lead"]]"#,
            422,
            vec!["the request body must be a JSON object, not an array"],
        ),
        (
            "no destination",
            "POST",
            r#"{"settings": ["add_lead"]}"#,
            422,
            vec!["destination"],
        ),
        (
            "no settings",
            "POST",
            r#"{"destination": "http://127.0.0.1:9/ok"}"#,
            422,
            vec!["missing field `settings`"],
        ),
        (
            "settings not a list",
            "POST",
            r#"{"destination": "http://127.0.0.1:9/ok", "settings": "add_lead"}"#,
            422,
            vec!["settings"],
        ),
        (
            "empty settings",
            "POST",
            r#"{"destination": "http://127.0.0.1:9/ok", "settings": []}"#,
            422,
            vec!["settings: must list at least one event"],
        ),
        (
            "unknown event",
            "POST",
            r#"{"destination": "http://127.0.0.1:9/ok", "settings": ["add_lead", "fly_lead"]}"#,
            422,
            vec!["settings: unknown event \"fly_lead\"", "valid events are"],
        ),
        (
            "bad destination",
            "POST",
            r#"{"destination": "ftp://127.0.0.1/", "settings": ["add_lead"]}"#,
            422,
            vec!["destination: scheme \"ftp\""],
        ),
        (
            "private destination",
            "POST",
            r#"{"destination": "http://192.168.1.1/", "settings": ["add_lead"]}"#,
            422,
            vec!["destination", "192.168.1.1"],
        ),
        (
            "sort not a number",
            "POST",
            r#"{"destination": "http://127.0.0.1:9/ok", "settings": ["add_lead"], "sort": "1"}"#,
            422,
            vec!["sort"],
        ),
        (
            "disabled not a bool",
            "POST",
            r#"{"destination": "http://127.0.0.1:9/ok", "settings": ["add_lead"], "disabled": "no"}"#,
            422,
            vec!["disabled"],
        ),
        (
            "unknown field",
            "POST",
            r#"{"destination": "http://127.0.0.1:9/ok", "settings": ["add_lead"], "events": []}"#,
            422,
            vec!["unknown field `events`"],
        ),
        ("delete without body", "DELETE", "", 400, vec!["empty"]),
        (
            "delete without destination",
            "DELETE",
            r#"{"url": "http://127.0.0.1:9/ok"}"#,
            422,
            vec!["unknown field `url`"],
        ),
    ];
    for (case, method, body, status, needles) in cases {
        let got = send(
            &server,
            method,
            "/api/v4/webhooks",
            "application/json",
            body.to_string(),
        )
        .await;
        // Valid JSON that does not fit is not called invalid JSON.
        let detail = got.1["detail"].as_str().unwrap_or_default().to_string();
        assert_eq!(
            detail.starts_with("invalid JSON"),
            status == 400 && !needles.contains(&"empty"),
            "{case}: {detail}"
        );
        assert_problem(case, got, status, &needles);
    }
    for (case, query, needles) in [
        (
            "unknown parameter",
            "page=2",
            vec!["unknown query parameter \"page\""],
        ),
        (
            "unknown filter",
            "filter[id]=1",
            vec!["unknown filter \"id\""],
        ),
        (
            "two destinations",
            "filter[destination][0]=a&filter[destination][1]=b",
            vec!["filter[destination] must be one URL"],
        ),
        (
            "broken key",
            "filter[destination=x",
            vec!["invalid query string"],
        ),
    ] {
        let got = send(&server, "GET", &format!("/api/v4/webhooks?{query}"), "", "").await;
        assert_problem(case, got, 400, &needles);
    }
    assert!(native(&server).await.is_empty());
    // The good request after all that works.
    let (code, _, _) = post_json(
        &server,
        "/api/v4/webhooks",
        json!({"destination": ok, "settings": ["add_lead"]}),
    )
    .await;
    assert_eq!(code, 200);
}

#[tokio::test]
async fn the_100_limit_holds_for_v2_and_v4_and_disabled_webhooks_do_not_count() {
    let server = TestServer::start("").await;
    // 101 URLs in one v2 request: each item on its own, the 101st refused by the limit.
    let items: Vec<Value> = (0..101)
        .map(|i| json!({"url": format!("http://127.0.0.1:9/hook/{i}"), "events": ["add_lead"]}))
        .collect();
    let got = post_json(
        &server,
        "/api/v2/webhooks/subscribe",
        json!({"subscribe": items}),
    )
    .await;
    let results = v2_items("/api/v2/webhooks/subscribe", "post", got);
    assert!(results[..100].iter().all(|r| r["result"] == true));
    assert_eq!(results[100]["result"], false);
    let error = results[100]["error"].as_str().unwrap();
    assert!(
        error.contains("limit of 100 active subscriptions"),
        "{error}"
    );
    assert_eq!(native(&server).await.len(), 100);

    // At the limit, a subscribed URL still takes more events (no new subscription).
    let got = post_json(
        &server,
        "/api/v2/webhooks/subscribe",
        json!({"subscribe": [{"url": "http://127.0.0.1:9/hook/0", "events": ["status_lead"]}]}),
    )
    .await;
    assert_eq!(
        v2_items("/api/v2/webhooks/subscribe", "post", got)[0]["result"],
        true
    );

    // v4: a new destination is refused, naming the limit; an existing one can be updated.
    let new = "http://127.0.0.1:9/new";
    let got = post_json(
        &server,
        "/api/v4/webhooks",
        json!({"destination": new, "settings": ["add_lead"]}),
    )
    .await;
    assert_problem(
        "101st via v4",
        got,
        422,
        &["limit of 100 active subscriptions"],
    );
    let (code, _, _) = post_json(
        &server,
        "/api/v4/webhooks",
        json!({"destination": "http://127.0.0.1:9/hook/5", "settings": ["add_task"]}),
    )
    .await;
    assert_eq!(code, 200);

    // A new destination created disabled does not count; disabling one frees a place.
    let (code, w, _) = post_json(
        &server,
        "/api/v4/webhooks",
        json!({"destination": new, "settings": ["add_lead"], "disabled": true}),
    )
    .await;
    assert_eq!(code, 200, "{w}");
    check_webhook(&w, new, &["add_lead"], 0, true);
    let (code, w, _) = post_json(
        &server,
        "/api/v4/webhooks",
        json!({"destination": "http://127.0.0.1:9/hook/7", "settings": ["add_lead"], "disabled": true}),
    )
    .await;
    assert_eq!(code, 200, "{w}");
    assert_eq!(w["disabled"], true);
    let (_, native_sub) = server
        .get(&format!("/v1/subscriptions/{}", w["id"].as_str().unwrap()))
        .await;
    assert_eq!(native_sub["enabled"], false);
    assert_eq!(native_sub["disabled_reason"], "admin");

    // Now the new one can be enabled; enabling the other again is over the limit.
    let (code, w, _) = post_json(
        &server,
        "/api/v4/webhooks",
        json!({"destination": new, "settings": ["add_lead"], "disabled": false}),
    )
    .await;
    assert_eq!(code, 200, "{w}");
    assert_eq!(w["disabled"], false);
    let got = post_json(
        &server,
        "/api/v4/webhooks",
        json!({"destination": "http://127.0.0.1:9/hook/7", "settings": ["add_lead"], "disabled": false}),
    )
    .await;
    assert_problem("re-enable over the limit", got, 422, &["limit of 100"]);
    let (_, native_sub) = server
        .get(&format!(
            "/v1/subscriptions/{}",
            native_sub["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(
        native_sub["enabled"], false,
        "a refused request changes nothing"
    );
    // And v2 refuses a new URL the same way.
    let got = post_json(
        &server,
        "/api/v2/webhooks/subscribe",
        json!({"subscribe": [{"url": "http://127.0.0.1:9/newer", "events": ["add_lead"]}]}),
    )
    .await;
    let r = &v2_items("/api/v2/webhooks/subscribe", "post", got)[0];
    assert_eq!(r["result"], false);
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("limits.max_subscriptions")
    );
    assert_eq!(native(&server).await.len(), 101);
}
