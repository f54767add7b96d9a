//! Bad input through the real server: every refusal is a 4xx `application/problem+json`
//! `{type, title, status, detail}` whose detail names the problem, and a refused request stores
//! nothing (SPEC §4, §5, §5.1, §5.2).

mod common;

use common::{Receiver, TestServer};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);

/// Events the baseline subscription listens to, so that a wrongly accepted event would create a
/// delivery.
const WATCHED: [&str; 4] = ["add_lead", "status_lead", "update_contact", "add_task"];

/// Sends `body` as-is with `content-type: application/json`; returns status, JSON (or the text as a
/// JSON string, or Null when empty) and the content type.
async fn send_raw(
    server: &TestServer,
    method: &str,
    path: &str,
    body: impl Into<Vec<u8>>,
) -> (u16, Value, String) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let r = server
        .http
        .request(method, server.url(path))
        .header("content-type", "application/json")
        .body(body.into())
        .send()
        .await
        .unwrap();
    let code = r.status().as_u16();
    let ct = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let text = r.text().await.unwrap();
    let v = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    (code, v, ct)
}

/// Checks an RFC 9457 problem with `status` whose detail contains every one of `needles`.
fn check_problem(
    case: &str,
    got: (u16, Value, String),
    status: u16,
    needles: &[&str],
) -> Result<(), String> {
    let (code, body, ct) = got;
    if code != status {
        return Err(format!(
            "{case}: status {code}, expected {status} (body {body})"
        ));
    }
    if ct != "application/problem+json" {
        return Err(format!(
            "{case}: content-type {ct:?}, expected \"application/problem+json\" (body {body})"
        ));
    }
    for field in ["type", "title"] {
        if body[field].as_str().is_none_or(str::is_empty) {
            return Err(format!("{case}: problem has no {field}: {body}"));
        }
    }
    if body["status"] != json!(status) {
        return Err(format!("{case}: problem status is not {status}: {body}"));
    }
    let Some(detail) = body["detail"].as_str() else {
        return Err(format!("{case}: problem has no detail: {body}"));
    };
    for needle in needles {
        if !detail.contains(needle) {
            return Err(format!(
                "{case}: detail {detail:?} does not mention {needle:?}"
            ));
        }
    }
    Ok(())
}

/// Panics unless `got` is the problem [`check_problem`] describes.
fn assert_problem(case: &str, got: (u16, Value, String), status: u16, needles: &[&str]) {
    if let Err(e) = check_problem(case, got, status, needles) {
        panic!("{e}");
    }
}

/// Panics listing every failed case of a table.
fn assert_no_failures(failures: &[String]) {
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Every subscription as listed.
async fn subscriptions(server: &TestServer) -> Vec<Value> {
    let (code, v) = server.get("/v1/subscriptions").await;
    assert_eq!(code, 200, "list subscriptions: {v}");
    v["subscriptions"].as_array().unwrap().clone()
}

/// The ids of every delivery in the log.
async fn delivery_ids(server: &TestServer) -> BTreeSet<String> {
    let (code, v) = server.get("/v1/deliveries?limit=1000").await;
    assert_eq!(code, 200, "list deliveries: {v}");
    assert_eq!(
        v["next_cursor"],
        Value::Null,
        "more than one page of deliveries"
    );
    v["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap().to_string())
        .collect()
}

/// A server with one real subscription to [`WATCHED`] on a loopback receiver, and one control event
/// accepted and delivered through it, so the intake path is known to create deliveries.
async fn server_with_baseline(extra: &str) -> (TestServer, Receiver, Value) {
    let server = TestServer::start(extra).await;
    let rx = Receiver::start(200).await;
    let sub = server
        .subscribe(json!({"url": rx.url("/hook"), "events": WATCHED, "name": "baseline"}))
        .await;
    let receipt = server
        .emit(json!({"event": "add_lead", "data": {"id": 1, "name": "control"}}))
        .await;
    assert_eq!(
        receipt["deliveries"], 1,
        "the control event matches the baseline subscription"
    );
    rx.wait_requests(1, WAIT).await;
    (server, rx, sub)
}

/// A valid event for batches and size tests.
fn good_event(id: u64) -> Value {
    json!({"event": "add_lead", "data": {"id": id, "name": "ok"}})
}

#[tokio::test]
async fn bad_events_are_400_problems_and_store_nothing() {
    let (server, _rx, _sub) = server_with_baseline("").await;
    let subs_before = subscriptions(&server).await;
    let deliveries_before = delivery_ids(&server).await;
    assert_eq!(deliveries_before.len(), 1);

    let good = good_event(7).to_string();
    let long_client_id = "k".repeat(256);
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        ("malformed JSON", r#"{"event":"#.into(), vec!["JSON"]),
        ("empty body", "".into(), vec!["empty"]),
        ("whitespace body", " \n\t".into(), vec!["empty"]),
        ("a JSON array", format!("[{good}]"), vec!["object"]),
        ("a JSON string", r#""add_lead""#.into(), vec!["object"]),
        ("a JSON number", "42".into(), vec!["object"]),
        ("JSON null", "null".into(), vec!["object"]),
        (
            "unknown event name",
            r#"{"event":"add_leed","data":{"id":1}}"#.into(),
            vec!["add_leed", "add_lead", "status_lead", "add_contact", "add_message"],
        ),
        (
            "event name in the wrong case",
            r#"{"event":"ADD_LEAD","data":{"id":1}}"#.into(),
            vec!["ADD_LEAD", "add_lead"],
        ),
        (
            "action the entity does not have",
            r#"{"event":"status_contact","data":{"id":1}}"#.into(),
            vec!["status_contact", "add_lead"],
        ),
        ("event a number", r#"{"event":5,"data":{"id":1}}"#.into(), vec!["\"event\""]),
        ("event missing", r#"{"data":{"id":1}}"#.into(), vec!["\"event\""]),
        ("data missing", r#"{"event":"add_lead"}"#.into(), vec!["\"data\""]),
        (
            "data an array",
            r#"{"event":"add_lead","data":[{"id":1}]}"#.into(),
            vec!["\"data\"", "object"],
        ),
        (
            "data a string",
            r#"{"event":"add_lead","data":"{\"id\":1}"}"#.into(),
            vec!["\"data\"", "object"],
        ),
        ("data null", r#"{"event":"add_lead","data":null}"#.into(), vec!["\"data\""]),
        (
            "data without id",
            r#"{"event":"add_lead","data":{"name":"x"}}"#.into(),
            vec!["\"id\""],
        ),
        (
            "data with id null",
            r#"{"event":"add_lead","data":{"id":null}}"#.into(),
            vec!["\"id\""],
        ),
        (
            "data with an empty id",
            r#"{"event":"add_lead","data":{"id":""}}"#.into(),
            vec!["\"id\""],
        ),
        (
            "data with an object id",
            r#"{"event":"add_lead","data":{"id":{"v":1}}}"#.into(),
            vec!["\"id\""],
        ),
        (
            "unknown top-level field",
            r#"{"event":"add_lead","data":{"id":1},"bogus":1}"#.into(),
            vec!["bogus"],
        ),
        (
            "account not an object",
            r#"{"event":"add_lead","data":{"id":1},"account":"test"}"#.into(),
            vec!["\"account\""],
        ),
        (
            "client id a number",
            r#"{"event":"add_lead","data":{"id":1},"id":5}"#.into(),
            vec!["\"id\""],
        ),
        (
            "client id empty",
            r#"{"event":"add_lead","data":{"id":1},"id":""}"#.into(),
            vec!["\"id\""],
        ),
        (
            "client id over 255 characters",
            json!({"event": "add_lead", "data": {"id": 1}, "id": long_client_id}).to_string(),
            vec!["\"id\""],
        ),
        ("empty batch", r#"{"events":[]}"#.into(), vec!["at least one"]),
        (
            "batch not an array",
            format!(r#"{{"events":{good}}}"#),
            vec!["\"events\" must be an array of events"],
        ),
        (
            "batch with an extra field",
            format!(r#"{{"events":[{good}],"extra":1}}"#),
            vec!["extra"],
        ),
        (
            "batch whose event 2 has an unknown name",
            json!({"events": [good_event(10), good_event(11), {"event": "add_leed", "data": {"id": 12}}]})
                .to_string(),
            vec!["event 2", "add_leed"],
        ),
        (
            "batch whose event 2 has no data",
            json!({"events": [good_event(10), good_event(11), {"event": "add_lead"}, good_event(13)]})
                .to_string(),
            vec!["event 2", "\"data\""],
        ),
        (
            "batch whose event 0 is not an object",
            json!({"events": ["add_lead", good_event(11)]}).to_string(),
            vec!["event 0", "object"],
        ),
        (
            "batch whose event 1 has an unknown field",
            json!({"events": [good_event(10), {"event": "add_lead", "data": {"id": 11}, "x": 1}]})
                .to_string(),
            vec!["event 1", "\"x\""],
        ),
        (
            "nesting deeper than the parser allows",
            format!(
                r#"{{"event":"add_lead","data":{{"id":1,"deep":{}1{}}}}}"#,
                "[".repeat(300),
                "]".repeat(300)
            ),
            vec!["JSON"],
        ),
    ];
    let mut failures = Vec::new();
    for (case, body, needles) in &cases {
        let got = server.post_raw("/v1/events", body).await;
        failures.extend(check_problem(case, got, 400, needles).err());
    }
    let mut not_utf8 = br#"{"event":"add_lead","data":{"id":1,"name":""#.to_vec();
    not_utf8.extend_from_slice(b"\xff\xfe\"}}");
    let got = send_raw(&server, "POST", "/v1/events", not_utf8).await;
    failures.extend(check_problem("invalid UTF-8", got, 400, &[]).err());
    assert_no_failures(&failures);

    assert_eq!(
        subscriptions(&server).await,
        subs_before,
        "subscriptions changed"
    );
    assert_eq!(
        delivery_ids(&server).await,
        deliveries_before,
        "a refused event created deliveries"
    );
}

#[tokio::test]
async fn json_with_trailing_data_is_refused() {
    let (server, rx, baseline_sub) = server_with_baseline("").await;
    let subs_before = subscriptions(&server).await;
    let deliveries_before = delivery_ids(&server).await;

    let good = good_event(8).to_string();
    let mut failures = Vec::new();
    for (case, body) in [
        ("event followed by garbage", format!("{good} trailing")),
        ("two events back to back", format!("{good}{good}")),
        ("event followed by a bracket", format!("{good}]")),
    ] {
        let got = server.post_raw("/v1/events", &body).await;
        failures.extend(check_problem(case, got, 400, &["JSON"]).err());
    }
    let sub = json!({"url": rx.url("/trailing"), "events": ["add_lead"]}).to_string();
    for (case, body) in [
        (
            "subscription followed by garbage",
            format!("{sub} trailing"),
        ),
        ("two subscriptions back to back", format!("{sub}{sub}")),
    ] {
        let got = server.post_raw("/v1/subscriptions", &body).await;
        failures.extend(check_problem(case, got, 400, &["JSON"]).err());
    }
    let baseline = format!("/v1/subscriptions/{}", baseline_sub["id"].as_str().unwrap());
    let got = send_raw(
        &server,
        "PATCH",
        &baseline,
        r#"{"name":"renamed"} trailing"#,
    )
    .await;
    failures.extend(check_problem("patch followed by garbage", got, 400, &["JSON"]).err());
    assert_no_failures(&failures);

    assert_eq!(
        subscriptions(&server).await,
        subs_before,
        "a refused subscription was stored or changed"
    );
    assert_eq!(
        delivery_ids(&server).await,
        deliveries_before,
        "a refused event was stored"
    );
}

#[tokio::test]
async fn a_batch_over_max_batch_is_refused_whole() {
    let (server, _rx, _sub) = server_with_baseline("[limits]\nmax_batch = 3").await;
    let before = delivery_ids(&server).await;

    let four: Vec<Value> = (20..24).map(good_event).collect();
    let got = server
        .post_raw("/v1/events", &json!({ "events": four }).to_string())
        .await;
    assert_problem("4 events with max_batch = 3", got, 413, &["max_batch", "3"]);
    assert_eq!(
        delivery_ids(&server).await,
        before,
        "an over-long batch stored deliveries"
    );

    // The limit is inclusive: three events are one batch.
    let three: Vec<Value> = (30..33).map(good_event).collect();
    let (code, v) = server.post("/v1/events", &json!({ "events": three })).await;
    assert_eq!(code, 202, "{v}");
    let receipts = v["events"].as_array().unwrap();
    assert_eq!(receipts.len(), 3, "{v}");
    assert!(receipts.iter().all(|r| r["deliveries"] == 1), "{v}");
    assert_eq!(delivery_ids(&server).await.len(), before.len() + 3);
}

#[tokio::test]
async fn a_body_over_max_body_is_413_on_every_endpoint() {
    let (server, rx, sub) =
        server_with_baseline("[server]\nlisten = \"127.0.0.1:0\"\nmax_body = \"1KiB\"").await;
    let subs_before = subscriptions(&server).await;
    let deliveries_before = delivery_ids(&server).await;

    // 2 KiB of otherwise valid JSON.
    let big_event =
        json!({"event": "add_lead", "data": {"id": 40, "name": "x".repeat(2048)}}).to_string();
    assert!(big_event.len() > 2048);
    let got = server.post_raw("/v1/events", &big_event).await;
    assert_problem("2 KiB event", got, 413, &["max_body"]);

    let big_sub = json!({"url": rx.url("/big"), "events": ["add_lead"], "name": "n".repeat(2048)})
        .to_string();
    let got = server.post_raw("/v1/subscriptions", &big_sub).await;
    assert_problem("2 KiB subscription", got, 413, &["max_body"]);

    // Without a Content-Length (chunked), the limit holds too.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = big_event
        .as_bytes()
        .chunks(256)
        .map(|c| Ok(c.to_vec()))
        .collect();
    let r = server
        .http
        .post(server.url("/v1/events"))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    let ct = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let code = r.status().as_u16();
    let body: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap_or(Value::Null);
    assert_problem("2 KiB chunked event", (code, body, ct), 413, &["max_body"]);

    let big_patch = json!({"name": "n".repeat(2048)}).to_string();
    let id = sub["id"].as_str().unwrap();
    let got = send_raw(
        &server,
        "PATCH",
        &format!("/v1/subscriptions/{id}"),
        big_patch.as_str(),
    )
    .await;
    assert_problem("2 KiB patch", got, 413, &["max_body"]);

    assert_eq!(
        subscriptions(&server).await,
        subs_before,
        "subscriptions changed"
    );
    assert_eq!(
        delivery_ids(&server).await,
        deliveries_before,
        "deliveries created"
    );

    // Just under the limit is fine.
    let small =
        json!({"event": "add_lead", "data": {"id": 41, "name": "x".repeat(900)}}).to_string();
    assert!(small.len() < 1024);
    let (code, v, _) = server.post_raw("/v1/events", &small).await;
    assert_eq!(code, 202, "{v}");
}

/// The create cases that every server refuses, whatever its SSRF allow list: (case, body, status,
/// detail needles).
fn bad_subscription_cases(good_url: &str) -> Vec<(&'static str, String, u16, Vec<&'static str>)> {
    let ev = json!(["add_lead"]);
    let with = |field: &str, value: Value| {
        let mut b = json!({"url": good_url, "events": ev});
        b[field] = value;
        b.to_string()
    };
    let long_url = format!("{good_url}?q={}", "a".repeat(2100));
    let userinfo_url = good_url.replacen("http://", "http://alice:s3cr3tpw@", 1);
    vec![
        ("malformed JSON", r#"{"url":"#.into(), 400, vec!["JSON"]),
        (
            "malformed JSON array",
            "[1,".into(),
            400,
            vec!["invalid JSON"],
        ),
        ("empty body", "".into(), 400, vec!["empty"]),
        (
            "a JSON array",
            "[]".into(),
            422,
            vec!["the request body must be a JSON object, not an array"],
        ),
        (
            "an array holding the url",
            json!([good_url, ["add_lead"]]).to_string(),
            422,
            vec!["the request body must be a JSON object, not an array"],
        ),
        (
            "JSON null",
            "null".into(),
            422,
            vec!["must be a JSON object, not null"],
        ),
        (
            "empty name",
            with("name", json!("")),
            422,
            vec!["name: is blank"],
        ),
        (
            "blank name",
            with("name", json!("  ")),
            422,
            vec!["name: is blank"],
        ),
        (
            "missing url",
            json!({"events": ev}).to_string(),
            422,
            vec!["url"],
        ),
        (
            "url null",
            json!({"url": null, "events": ev}).to_string(),
            422,
            vec!["url"],
        ),
        (
            "missing events",
            json!({"url": good_url}).to_string(),
            422,
            vec!["events"],
        ),
        (
            "relative url",
            with("url", json!("/hook")),
            422,
            vec!["url"],
        ),
        ("empty url", with("url", json!("")), 422, vec!["url"]),
        (
            "url without a host",
            with("url", json!("http://")),
            422,
            vec!["url"],
        ),
        (
            "ftp url",
            with("url", json!("ftp://127.0.0.1/hook")),
            422,
            vec!["url", "ftp"],
        ),
        (
            "javascript url",
            with("url", json!("javascript:alert(1)")),
            422,
            vec!["url"],
        ),
        (
            "url with a fragment",
            with("url", json!(format!("{good_url}#frag"))),
            422,
            vec!["url", "fragment"],
        ),
        (
            "url with userinfo",
            with("url", json!(userinfo_url)),
            422,
            vec!["url"],
        ),
        (
            "url over 2048 characters",
            with("url", json!(long_url)),
            422,
            vec!["url", "2048"],
        ),
        ("url not a string", with("url", json!(5)), 422, vec!["url"]),
        (
            "url with a host IDNA refuses",
            with("url", json!("http://xn--/hook")),
            422,
            vec!["url"],
        ),
        (
            "url with a space in its host",
            with("url", json!("http://exa mple.com/hook")),
            422,
            vec!["url"],
        ),
        (
            "events empty",
            with("events", json!([])),
            422,
            vec!["events"],
        ),
        (
            "events with an unknown event",
            with("events", json!(["add_lead", "add_leed"])),
            422,
            vec!["events", "add_leed", "add_lead"],
        ),
        (
            "events a string",
            with("events", json!("add_lead")),
            422,
            vec!["events"],
        ),
        (
            "events with a number",
            with("events", json!([5])),
            422,
            vec!["events"],
        ),
        (
            "unknown format",
            with("format", json!("xml")),
            422,
            vec!["format", "xml"],
        ),
        (
            "unknown retry policy",
            with("retry", json!("fast")),
            422,
            vec!["retry", "fast"],
        ),
        (
            "timeout not a duration",
            with("timeout", json!("soon")),
            422,
            vec!["timeout", "soon"],
        ),
        (
            "timeout a number",
            with("timeout", json!(5)),
            422,
            vec!["timeout"],
        ),
        ("unknown field", with("bogus", json!(1)), 422, vec!["bogus"]),
        (
            "invalid header name",
            with("headers", json!({"bad header": "x"})),
            422,
            vec!["headers", "bad header"],
        ),
        (
            "header value with a line break",
            with("headers", json!({"X-Key": "k\r\nX-Injected: 1"})),
            422,
            vec!["headers", "X-Key"],
        ),
        (
            "a header the dispatcher signs with",
            with("headers", json!({"webhook-signature": "v1,forged"})),
            422,
            vec!["headers", "webhook-signature"],
        ),
        (
            "zero timeout",
            with("timeout", json!("0s")),
            422,
            vec!["timeout"],
        ),
        (
            "header value not a string",
            with("headers", json!({"X-Key": 5})),
            422,
            vec!["headers"],
        ),
        (
            "headers an array",
            with("headers", json!(["X-Key: 1"])),
            422,
            vec!["headers"],
        ),
        (
            "filter with an object value",
            with("filter", json!({"pipeline_id": {"id": 1}})),
            422,
            vec!["filter", "pipeline_id"],
        ),
        (
            "filter with an unknown key",
            with("filter", json!({"pipelin_id": 1})),
            422,
            vec!["pipelin_id"],
        ),
        (
            "enabled not a boolean",
            with("enabled", json!("yes")),
            422,
            vec!["enabled"],
        ),
        (
            "name over 255 characters",
            with("name", json!("n".repeat(256))),
            422,
            vec!["name"],
        ),
    ]
}

#[tokio::test]
async fn bad_subscriptions_are_refused_and_store_nothing() {
    let (server, rx, _sub) = server_with_baseline("").await;
    let subs_before = subscriptions(&server).await;
    let deliveries_before = delivery_ids(&server).await;

    let mut failures = Vec::new();
    for (case, body, status, needles) in bad_subscription_cases(&rx.url("/new")) {
        let got = server.post_raw("/v1/subscriptions", &body).await;
        if case == "url with userinfo" && got.1["detail"].to_string().contains("s3cr3tpw") {
            failures.push(format!("{case}: detail echoes the password: {}", got.1));
        }
        // Header values are secrets (SPEC §5.2): a refusal names the header, never the value.
        if case == "header value with a line break" && got.1.to_string().contains("X-Injected") {
            failures.push(format!("{case}: the problem echoes the value: {}", got.1));
        }
        failures.extend(check_problem(case, got, status, &needles).err());
    }
    assert_no_failures(&failures);

    assert_eq!(
        subscriptions(&server).await,
        subs_before,
        "a refused subscription was stored"
    );
    // Nothing new listens to add_lead: an event still makes exactly one delivery.
    let receipt = server.emit(good_event(50)).await;
    assert_eq!(
        receipt["deliveries"], 1,
        "a refused subscription matches events"
    );
    assert_eq!(
        delivery_ids(&server).await.len(),
        deliveries_before.len() + 1
    );
}

#[tokio::test]
async fn private_destinations_are_refused_when_not_allowed() {
    let server = TestServer::start("[delivery]\nallow_private = []").await;
    let rx = Receiver::start(200).await;
    let port = rx.addr.port();
    let cases: Vec<(String, Vec<&str>)> = vec![
        (rx.url("/hook"), vec!["url", "127.0.0.1"]),
        ("http://10.0.0.1/x".into(), vec!["url", "10.0.0.1"]),
        ("http://192.168.1.10/x".into(), vec!["url", "192.168.1.10"]),
        ("http://172.16.0.1/x".into(), vec!["url", "172.16.0.1"]),
        (
            "http://169.254.169.254/latest/meta-data/".into(),
            vec!["url", "169.254.169.254"],
        ),
        ("http://[::1]/x".into(), vec!["url", "::1"]),
        (
            format!("http://[::ffff:127.0.0.1]:{port}/x"),
            vec!["url", "127.0.0.1"],
        ),
        // The url crate reads these as 127.0.0.1.
        (
            format!("http://0x7f000001:{port}/x"),
            vec!["url", "127.0.0.1"],
        ),
        (
            format!("http://2130706433:{port}/x"),
            vec!["url", "127.0.0.1"],
        ),
        ("http://0.0.0.0/x".into(), vec!["url", "0.0.0.0"]),
        (format!("http://localhost:{port}/x"), vec!["url"]),
    ];
    let mut failures = Vec::new();
    for (url, needles) in &cases {
        let got = server
            .post_raw(
                "/v1/subscriptions",
                &json!({"url": url, "events": ["add_lead"]}).to_string(),
            )
            .await;
        failures.extend(check_problem(url, got, 422, needles).err());
    }
    assert_no_failures(&failures);
    assert!(
        subscriptions(&server).await.is_empty(),
        "a refused destination was stored"
    );
    let receipt = server.emit(good_event(60)).await;
    assert_eq!(receipt["deliveries"], 0);
    assert!(delivery_ids(&server).await.is_empty());
    assert_eq!(rx.count(), 0, "the private receiver was contacted");
}

#[tokio::test]
async fn a_bad_patch_leaves_the_subscription_unchanged() {
    let (server, rx, sub) = server_with_baseline("").await;
    let id = sub["id"].as_str().unwrap();
    let path = format!("/v1/subscriptions/{id}");
    let (code, before) = server.get(&path).await;
    assert_eq!(code, 200, "{before}");
    let list_before = subscriptions(&server).await;
    let deliveries_before = delivery_ids(&server).await;

    let other = rx.url("/other");
    let cases: Vec<(&str, Value, u16, Vec<&str>)> = vec![
        (
            "an array",
            json!([1]),
            422,
            vec!["the request body must be a JSON object, not an array"],
        ),
        ("relative url", json!({"url": "/hook"}), 422, vec!["url"]),
        (
            "ftp url",
            json!({"url": "ftp://127.0.0.1/x"}),
            422,
            vec!["url", "ftp"],
        ),
        (
            "url with a fragment",
            json!({"url": format!("{other}#f")}),
            422,
            vec!["url", "fragment"],
        ),
        ("url not a string", json!({"url": 5}), 422, vec!["url"]),
        ("url null", json!({"url": null}), 422, vec!["url", "null"]),
        (
            "events null",
            json!({"events": null}),
            422,
            vec!["events", "null"],
        ),
        (
            "format null",
            json!({"format": null}),
            422,
            vec!["format", "null"],
        ),
        (
            "retry null",
            json!({"retry": null}),
            422,
            vec!["retry", "null"],
        ),
        (
            "enabled null",
            json!({"enabled": null}),
            422,
            vec!["enabled", "null"],
        ),
        (
            "headers null",
            json!({"headers": null}),
            422,
            vec!["headers", "null"],
        ),
        ("events empty", json!({"events": []}), 422, vec!["events"]),
        (
            "unknown event",
            json!({"events": ["add_leed"]}),
            422,
            vec!["events", "add_leed"],
        ),
        (
            "unknown format",
            json!({"format": "xml"}),
            422,
            vec!["format", "xml"],
        ),
        (
            "unknown retry policy",
            json!({"retry": "fast"}),
            422,
            vec!["retry", "fast"],
        ),
        (
            "timeout not a duration",
            json!({"timeout": "soon"}),
            422,
            vec!["timeout", "soon"],
        ),
        ("unknown field", json!({"bogus": true}), 422, vec!["bogus"]),
        (
            "invalid header name",
            json!({"headers": {"bad header": "x"}}),
            422,
            vec!["headers"],
        ),
        (
            "filter with an object value",
            json!({"filter": {"status_id": {}}}),
            422,
            vec!["filter"],
        ),
        (
            "enabled not a boolean",
            json!({"enabled": "no"}),
            422,
            vec!["enabled"],
        ),
        // A good field beside a bad one is not applied either.
        (
            "good name, bad format",
            json!({"name": "renamed", "format": "xml"}),
            422,
            vec!["format"],
        ),
        (
            "good url, bad events",
            json!({"url": other, "events": ["add_leed"]}),
            422,
            vec!["events"],
        ),
        (
            "disable, bad timeout",
            json!({"enabled": false, "timeout": "soon"}),
            422,
            vec!["timeout"],
        ),
    ];
    let mut cases: Vec<(&str, String, u16, Vec<&str>)> = cases
        .into_iter()
        .map(|(case, body, status, needles)| (case, body.to_string(), status, needles))
        .collect();
    cases.push(("malformed JSON", r#"{"name":"#.into(), 400, vec!["JSON"]));
    cases.push(("empty body", "".into(), 400, vec!["empty"]));
    let mut failures = Vec::new();
    for (case, body, status, needles) in &cases {
        let got = send_raw(&server, "PATCH", &path, body.as_str()).await;
        failures.extend(check_problem(case, got, *status, needles).err());
        let (code, now) = server.get(&path).await;
        assert_eq!(code, 200);
        if now != before {
            failures.push(format!("{case}: the subscription changed to {now}"));
        }
    }
    assert_no_failures(&failures);

    assert_eq!(subscriptions(&server).await, list_before);
    assert_eq!(delivery_ids(&server).await, deliveries_before);
}

#[tokio::test]
async fn unknown_and_malformed_ids_are_404_problems() {
    let (server, _rx, sub) = server_with_baseline("").await;
    let list_before = subscriptions(&server).await;
    let unknown = "0190a0b0-0000-7000-8000-000000000000";
    let mut failures = Vec::new();
    for id in [unknown, "not-a-uuid", "42"] {
        let path = format!("/v1/subscriptions/{id}");
        for (method, body) in [("GET", ""), ("PATCH", r#"{"name":"x"}"#), ("DELETE", "")] {
            let got = send_raw(&server, method, &path, body).await;
            failures.extend(check_problem(&format!("{method} {path}"), got, 404, &[id]).err());
        }
        let got = send_raw(&server, "GET", &format!("/v1/deliveries/{id}"), "").await;
        failures.extend(check_problem(&format!("GET /v1/deliveries/{id}"), got, 404, &[id]).err());
    }
    assert_no_failures(&failures);
    assert_eq!(subscriptions(&server).await, list_before);

    // A deleted subscription is gone for every method.
    let id = sub["id"].as_str().unwrap();
    let path = format!("/v1/subscriptions/{id}");
    let (code, v) = server.delete(&path).await;
    assert_eq!(code, 204, "{v}");
    for (method, body) in [
        ("GET", ""),
        ("PATCH", r#"{"enabled":true}"#),
        ("DELETE", ""),
    ] {
        let got = send_raw(&server, method, &path, body).await;
        assert_problem(&format!("{method} deleted"), got, 404, &[id]);
    }
    assert!(subscriptions(&server).await.is_empty());
}

#[tokio::test]
async fn bad_delivery_queries_are_400_problems() {
    let (server, _rx, _sub) = server_with_baseline("").await;
    let mut failures = Vec::new();
    for (query, needles) in [
        ("status=bogus", vec!["bogus"]),
        ("limit=abc", vec!["limit"]),
        ("limit=0", vec!["limit"]),
        ("limit=1001", vec!["limit"]),
        ("subscription=not-an-id", vec!["not-an-id"]),
        ("event=add_leed", vec!["add_leed", "add_lead"]),
        ("since=yesterday", vec!["yesterday"]),
        ("cursor=nope", vec!["nope"]),
        ("unknown=1", vec!["unknown"]),
    ] {
        let got = send_raw(&server, "GET", &format!("/v1/deliveries?{query}"), "").await;
        failures.extend(check_problem(query, got, 400, &needles).err());
    }
    assert_no_failures(&failures);
}

#[tokio::test]
async fn unknown_routes_are_404_problems() {
    let server = TestServer::start("").await;
    let mut failures = Vec::new();
    for (method, path) in [
        ("GET", "/"),
        ("GET", "/v1/nope"),
        ("POST", "/v1/event"),
        ("GET", "/v1/subscriptions/x/y/z"),
        ("DELETE", "/nope"),
        ("GET", "/v1/subscriptions/"),
        ("POST", "/v1/events/"),
    ] {
        let got = send_raw(&server, method, path, "").await;
        failures.extend(check_problem(&format!("{method} {path}"), got, 404, &[]).err());
    }
    assert_no_failures(&failures);
}

#[tokio::test]
async fn a_wrong_method_is_a_405_problem() {
    let server = TestServer::start("").await;
    let mut failures = Vec::new();
    for (method, path) in [
        ("GET", "/v1/events"),
        ("PUT", "/v1/subscriptions"),
        (
            "POST",
            "/v1/subscriptions/0190a0b0-0000-7000-8000-000000000000",
        ),
        ("DELETE", "/v1/deliveries"),
    ] {
        let got = send_raw(&server, method, path, "").await;
        failures.extend(check_problem(&format!("{method} {path}"), got, 405, &[]).err());
    }
    assert_no_failures(&failures);
    assert!(subscriptions(&server).await.is_empty());
}

async fn create(server: &TestServer, body: Value) -> (u16, Value, String) {
    server
        .post_raw("/v1/subscriptions", &body.to_string())
        .await
}

#[tokio::test]
async fn the_101st_enabled_subscription_is_refused_at_the_default_limit() {
    let server = TestServer::start("").await;
    let rx = Receiver::start(200).await;
    let mut ids = Vec::new();
    for i in 0..100 {
        let sub = server
            .subscribe(json!({"url": rx.url(&format!("/h{i}")), "events": ["add_lead"]}))
            .await;
        ids.push(sub["id"].as_str().unwrap().to_string());
    }

    let got = create(
        &server,
        json!({"url": rx.url("/h100"), "events": ["add_lead"]}),
    )
    .await;
    assert_problem("101st enabled", got, 422, &["max_subscriptions", "100"]);
    // `enabled: true` said explicitly is the same.
    let got = create(
        &server,
        json!({"url": rx.url("/h100"), "events": ["add_lead"], "enabled": true}),
    )
    .await;
    assert_problem(
        "101st, enabled: true",
        got,
        422,
        &["max_subscriptions", "100"],
    );
    assert_eq!(
        subscriptions(&server).await.len(),
        100,
        "the refused one was stored"
    );

    // A disabled one does not count.
    let disabled = server
        .subscribe(json!({"url": rx.url("/off"), "events": ["add_lead"], "enabled": false}))
        .await;
    assert_eq!(disabled["enabled"], false);
    assert_eq!(disabled["disabled_reason"], "admin");
    let off_path = format!("/v1/subscriptions/{}", disabled["id"].as_str().unwrap());
    let (_, off_before) = server.get(&off_path).await;

    // Enabling it would make 101.
    let got = send_raw(&server, "PATCH", &off_path, r#"{"enabled":true}"#).await;
    assert_problem("enable the 101st", got, 422, &["max_subscriptions", "100"]);
    assert_eq!(
        server.get(&off_path).await.1,
        off_before,
        "the refused enable changed it"
    );

    // Events still go to the 100 enabled ones, and are held for the disabled one (SPEC §6).
    let receipt = server.emit(good_event(70)).await;
    assert_eq!(receipt["deliveries"], 101);

    // Deleting an enabled one frees the slot.
    let (code, v) = server
        .delete(&format!("/v1/subscriptions/{}", ids[0]))
        .await;
    assert_eq!(code, 204, "{v}");
    let (code, enabled) = server.patch(&off_path, &json!({"enabled": true})).await;
    assert_eq!(code, 200, "{enabled}");
    assert_eq!(enabled["enabled"], true);
    assert_eq!(enabled["disabled_reason"], Value::Null);

    // And the limit holds again.
    let got = create(
        &server,
        json!({"url": rx.url("/h101"), "events": ["add_lead"]}),
    )
    .await;
    assert_problem("101st again", got, 422, &["max_subscriptions", "100"]);
    let subs = subscriptions(&server).await;
    assert_eq!(subs.len(), 100);
    assert!(subs.iter().all(|s| s["enabled"] == true));
}

#[tokio::test]
async fn the_limit_counts_enabled_subscriptions_only() {
    let server = TestServer::start("[limits]\nmax_subscriptions = 5").await;
    let rx = Receiver::start(200).await;
    let mut paths = Vec::new();
    for i in 0..5 {
        let sub = server
            .subscribe(json!({"url": rx.url(&format!("/h{i}")), "events": ["add_lead"]}))
            .await;
        paths.push(format!("/v1/subscriptions/{}", sub["id"].as_str().unwrap()));
    }
    let got = create(
        &server,
        json!({"url": rx.url("/h5"), "events": ["add_lead"]}),
    )
    .await;
    assert_problem("6th of 5", got, 422, &["max_subscriptions", "5"]);

    // At the limit, an enabled subscription can still be changed, and enabled again.
    let (code, v) = server
        .patch(&paths[0], &json!({"name": "renamed", "enabled": true}))
        .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["name"], "renamed");

    // Disabling one frees a slot; the new one takes it; the disabled one cannot come back.
    let (code, v) = server.patch(&paths[1], &json!({"enabled": false})).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["disabled_reason"], "admin");
    let sixth = server
        .subscribe(json!({"url": rx.url("/h5"), "events": ["add_lead"]}))
        .await;
    assert_eq!(sixth["enabled"], true);
    let (_, before) = server.get(&paths[1]).await;
    let got = send_raw(&server, "PATCH", &paths[1], r#"{"enabled":true}"#).await;
    assert_problem(
        "re-enable over the limit",
        got,
        422,
        &["max_subscriptions", "5"],
    );
    assert_eq!(server.get(&paths[1]).await.1, before);
    // Also with other fields in the same request: none of them is applied.
    let got = send_raw(
        &server,
        "PATCH",
        &paths[1],
        r#"{"enabled":true,"name":"x"}"#,
    )
    .await;
    assert_problem("re-enable with a rename", got, 422, &["max_subscriptions"]);
    assert_eq!(server.get(&paths[1]).await.1, before);

    let subs = subscriptions(&server).await;
    assert_eq!(subs.len(), 6);
    assert_eq!(subs.iter().filter(|s| s["enabled"] == true).count(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_do_not_overshoot_the_limit() {
    let server = TestServer::start("[limits]\nmax_subscriptions = 5").await;
    let rx = Receiver::start(200).await;
    for i in 0..4 {
        server
            .subscribe(json!({"url": rx.url(&format!("/h{i}")), "events": ["add_lead"]}))
            .await;
    }
    let tasks: Vec<_> = (0..10)
        .map(|i| {
            let http = server.http.clone();
            let url = server.url("/v1/subscriptions");
            let body = json!({"url": rx.url(&format!("/race{i}")), "events": ["add_lead"]});
            tokio::spawn(async move {
                http.post(url)
                    .json(&body)
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16()
            })
        })
        .collect();
    let mut codes = Vec::new();
    for t in tasks {
        codes.push(t.await.unwrap());
    }
    codes.sort();
    assert_eq!(codes, [201, 422, 422, 422, 422, 422, 422, 422, 422, 422]);
    let subs = subscriptions(&server).await;
    assert_eq!(subs.len(), 5);
}
