//! Creatio as a delivery target, through the real server: the `creatio` and `creatio-form`
//! formats as a receiver (and PHP's `$_POST`) reads them, the `creatio` retry policy as the
//! delivery log shows it, the Creatio-style example receiver, and the checks at subscribe time.

mod common;
#[allow(dead_code)]
#[path = "../examples/creatio_receiver.rs"]
mod creatio_receiver;

use common::{Receiver, TestServer, closed_port, wait_for, wait_for_async};
use serde_json::{Map, Value, json};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime};

const WAIT: Duration = Duration::from_secs(10);

/// A `status_lead` with what amoCRM sends beside the scalars: custom fields, tags, a null.
fn status_lead() -> Value {
    json!({"event": "status_lead", "data": {
        "id": "25399013",
        "name": "Заявка с сайта",
        "status_id": "142",
        "old_status_id": "7039101",
        "pipeline_id": "752662",
        "responsible_user_id": "504141",
        "price": 15000,
        "is_deleted": false,
        "closest_task_at": null,
        "custom_fields": [
            {"id": "427181", "name": "Телефон", "code": "PHONE",
             "values": [{"value": "+7 912 000-00-00", "enum": "WORK"}, {"value": "+7 900"}]}
        ],
        "tags": [{"id": "1", "name": "vip"}]
    }})
}

fn field_map() -> Value {
    json!({
        "name": "Name",
        "responsible_user_id": "OwnerId",
        "price": "Budget",
        "custom_fields.PHONE": "MobilePhone",
        "old_status_id": ""
    })
}

/// The body a `creatio` subscription with [`field_map`] sends for [`status_lead`].
const LEAD_RECORD: &str = r#"{"id":"25399013","Name":"Заявка с сайта","status_id":"142","pipeline_id":"752662","OwnerId":"504141","Budget":15000,"is_deleted":false,"MobilePhone":"+7 912 000-00-00","EntityName":"Lead"}"#;

/// What a form-data parser reads back from a record: every value as text.
fn as_form_texts(record: &Map<String, Value>) -> Map<String, Value> {
    record
        .iter()
        .map(|(k, v)| {
            let text = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            (k.clone(), Value::String(text))
        })
        .collect()
}

fn keys(m: &Map<String, Value>) -> Vec<&str> {
    m.keys().map(String::as_str).collect()
}

fn ms(rfc3339: &Value) -> u64 {
    let text = rfc3339.as_str().expect("a time is a string");
    let t = humantime::parse_rfc3339(text).expect("RFC 3339");
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[tokio::test]
async fn a_lead_event_reaches_creatio_as_one_flat_json_object() {
    let server = TestServer::start("").await;
    let rx = Receiver::start(200).await;
    let mapped = server
        .subscribe(json!({
            "url": rx.url("/webhooks/key-1"),
            "events": ["status_lead"],
            "format": "creatio",
            "field_map": field_map(),
        }))
        .await;
    assert_eq!(mapped["format"], "creatio");
    assert_eq!(mapped["field_map"], field_map());
    server
        .subscribe(json!({
            "url": rx.url("/webhooks/key-2"),
            "events": ["status_lead"],
            "format": "creatio",
            "entity_name": "UsrAmoLead",
        }))
        .await;
    let receipt = server.emit(status_lead()).await;
    assert_eq!(receipt["deliveries"], 2);

    let got = rx.wait_requests(2, WAIT).await;
    let by_path = |p: &str| {
        got.iter()
            .find(|r| r.path == p)
            .unwrap_or_else(|| panic!("no request at {p}"))
    };

    // Mapped: one flat object, the fields renamed, the phone taken from its custom field.
    let req = by_path("/webhooks/key-1");
    assert_eq!(req.header("content-type"), "application/json");
    assert_eq!(req.body_str(), LEAD_RECORD);
    let wh = standardwebhooks::Webhook::new(mapped["secret"].as_str().unwrap()).unwrap();
    wh.verify(&req.body, &req.headers)
        .expect("the Creatio body is signed like every other");

    // Unmapped: the object code overridden, the item's scalars as they are, nothing nested.
    let req = by_path("/webhooks/key-2");
    let body: Value = serde_json::from_slice(&req.body).expect("a JSON body");
    assert_eq!(
        body,
        json!({"id": "25399013", "name": "Заявка с сайта", "status_id": "142",
               "old_status_id": "7039101", "pipeline_id": "752662",
               "responsible_user_id": "504141", "price": 15000, "is_deleted": false,
               "EntityName": "UsrAmoLead"})
    );

    // One request per delivery: both delivered with a single attempt.
    for r in &got {
        let d = server
            .wait_delivery_status(&r.header("webhook-id"), "delivered", WAIT)
            .await;
        assert_eq!(d["attempts"].as_array().unwrap().len(), 1);
    }
    assert_eq!(rx.count(), 2);
}

#[tokio::test]
async fn company_and_task_events_become_account_and_activity() {
    let server = TestServer::start("").await;
    let rx = Receiver::start(200).await;
    server
        .subscribe(json!({
            "url": rx.url("/c"),
            "events": ["add_company", "add_task", "add_customer"],
            "format": "creatio",
            "field_map": {"name": "Name", "text": "Title"},
        }))
        .await;
    for event in [
        json!({"event": "add_company", "data": {"id": 3, "name": "ООО Ромашка"}}),
        json!({"event": "add_task", "data": {"id": 4, "text": "Call back", "complete_till": 1700000000}}),
        json!({"event": "add_customer", "data": {"id": 5, "name": "Buyer"}}),
    ] {
        server.emit(event).await;
    }
    let got = rx.wait_requests(3, WAIT).await;
    let mut bodies: Vec<Value> = got
        .iter()
        .map(|r| serde_json::from_slice(&r.body).unwrap())
        .collect();
    bodies.sort_by_key(|b| b["id"].as_i64());
    assert_eq!(
        bodies,
        vec![
            json!({"id": 3, "Name": "ООО Ромашка", "type": "company", "EntityName": "Account"}),
            json!({"id": 4, "Title": "Call back", "complete_till": 1700000000, "EntityName": "Activity"}),
            json!({"id": 5, "Name": "Buyer", "EntityName": "Contact"}),
        ]
    );
}

/// `php -S` on a free loopback port serving one script from its own directory; killed on drop.
struct Php {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
}

/// Writes what PHP parsed from each POST to `received.json` (atomically, by rename).
const PHP_POST_SCRIPT: &str = r#"<?php
if ($_SERVER['REQUEST_METHOD'] === 'POST') {
    $out = json_encode([
        'post' => $_POST,
        'files' => $_FILES,
        'content_type' => $_SERVER['CONTENT_TYPE'] ?? null,
    ], JSON_UNESCAPED_UNICODE);
    file_put_contents(__DIR__ . '/received.tmp', $out);
    rename(__DIR__ . '/received.tmp', __DIR__ . '/received.json');
}
echo 'ok';
"#;

impl Php {
    async fn start(script: &str) -> Php {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("index.php"), script).unwrap();
        let port = closed_port();
        let child = Command::new("php")
            .args(["-S", &format!("127.0.0.1:{port}"), "index.php"])
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run php ({e}): these tests need php-cli (`apt-get install -y php-cli`; .ci/run installs it)")
            });
        let php = Php { child, dir, port };
        let http = reqwest::Client::new();
        let url = php.url("/");
        wait_for_async("php -S to answer", WAIT, || {
            let http = http.clone();
            let url = url.clone();
            async move { http.get(url).send().await.ok().map(|_| ()) }
        })
        .await;
        php
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn received(&self) -> PathBuf {
        self.dir.path().join("received.json")
    }
}

impl Drop for Php {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read_json(path: &Path) -> Option<Value> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

#[tokio::test]
async fn creatio_form_is_read_by_php_post_into_the_same_fields() {
    let php = Php::start(PHP_POST_SCRIPT).await;
    let server = TestServer::start("").await;
    let rx = Receiver::start(200).await;
    server
        .subscribe(json!({
            "url": rx.url("/json"),
            "events": ["status_lead"],
            "format": "creatio",
            "field_map": field_map(),
        }))
        .await;
    let form = server
        .subscribe(json!({
            "url": php.url("/webhooks/key-1"),
            "events": ["status_lead"],
            "format": "creatio-form",
            "field_map": field_map(),
        }))
        .await;
    server.emit(status_lead()).await;

    let json_body = rx.wait_requests(1, WAIT).await[0].body.clone();
    let record: Map<String, Value> = serde_json::from_slice(&json_body).unwrap();
    assert_eq!(json_body, LEAD_RECORD.as_bytes());
    let received = wait_for("PHP to receive the form", WAIT, || {
        read_json(&php.received())
    })
    .await;

    let post = received["post"]
        .as_object()
        .unwrap_or_else(|| panic!("$_POST is not a filled array: {received}"));
    let expected = as_form_texts(&record);
    assert_eq!(post, &expected, "$_POST holds the JSON record's fields");
    assert_eq!(keys(post), keys(&expected), "in the same order");
    assert_eq!(post["is_deleted"], "false", "booleans travel as true/false");
    assert_eq!(post["Budget"], "15000");
    assert_eq!(received["files"], json!([]), "no part is a file");
    let ct = received["content_type"].as_str().unwrap();
    assert!(
        ct.starts_with("multipart/form-data; boundary=----webhook-dispatcher-"),
        "{ct}"
    );

    let deliveries = server
        .get(&format!(
            "/v1/deliveries?subscription={}",
            form["id"].as_str().unwrap()
        ))
        .await
        .1;
    let id = deliveries["deliveries"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let d = server.wait_delivery_status(&id, "delivered", WAIT).await;
    assert_eq!(d["attempts"][0]["response_body"], "ok");
}

#[tokio::test]
async fn the_creatio_policy_retries_a_failed_first_attempt_a_minute_later() {
    let server = TestServer::start("").await;
    let rx = Receiver::start(500).await;
    let sub = server
        .subscribe(json!({
            "url": rx.url("/webhooks/key"),
            "events": ["add_lead"],
            "format": "creatio",
            "retry": "creatio",
        }))
        .await;
    assert_eq!(sub["retry"], "creatio");
    server
        .emit(json!({"event": "add_lead", "data": {"id": 1, "name": "x"}}))
        .await;
    let id = rx.wait_requests(1, WAIT).await[0].header("webhook-id");
    let d = wait_for_async("the first attempt to be recorded", WAIT, || async {
        let d = server.delivery(&id).await;
        (d["attempts"].as_array().map(Vec::len) == Some(1)).then_some(d)
    })
    .await;
    assert_eq!(d["status"], "pending");
    assert_eq!(d["attempts"][0]["code"], 500);
    let started = ms(&d["attempts"][0]["started_at"]);
    let ended = started + d["attempts"][0]["duration_ms"].as_u64().unwrap();
    let next = ms(&d["next_attempt_at"]);
    // "after" counts from the end of the failed attempt: one minute, not amoCRM's five.
    assert!(
        next >= started + 60_000,
        "next attempt {next} is less than a minute after the attempt began at {started}"
    );
    assert!(
        next <= ended + 61_000,
        "next attempt {next} is more than a minute after the attempt ended at {ended}"
    );
    assert_eq!(rx.count(), 1, "the retry waits for its minute");
}

#[tokio::test]
async fn the_example_receiver_parses_creatio_bodies_and_fails_one_without_entity_name() {
    let sink = creatio_receiver::Sink::new(None);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = creatio_receiver::router(sink.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let hook = |sub: &str| format!("http://{addr}/webhooks/test-key?sub={sub}");

    let server = TestServer::start("").await;
    for (sub, format) in [
        ("json", "json"),
        ("amocrm", "amocrm"),
        ("creatio", "creatio"),
        ("form", "creatio-form"),
    ] {
        let mut body = json!({"url": hook(sub), "events": ["status_lead"], "format": format});
        if format.starts_with("creatio") {
            body["field_map"] = field_map();
        }
        server.subscribe(body).await;
    }
    let receipt = server.emit(status_lead()).await;
    assert_eq!(receipt["deliveries"], 4);

    // Read the table as a user would: GET /webhooks until every row is parsed.
    let http = reqwest::Client::new();
    let rows = wait_for_async("4 parsed webhooks", WAIT, || async {
        let v: Value = http
            .get(format!("http://{addr}/webhooks"))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        let rows = v["webhooks"].as_array()?.clone();
        (rows.len() == 4 && rows.iter().all(|r| r["Status"] != "New")).then_some(rows)
    })
    .await;
    let row = |sub: &str| {
        rows.iter()
            .find(|r| r["QueryParameters"]["sub"] == sub)
            .unwrap_or_else(|| panic!("no row for {sub}: {rows:?}"))
    };

    // The amoCRM structure as JSON names no object: Failed with the parse error.
    let json_row = row("json");
    assert_eq!(json_row["Status"], "Failed");
    assert_eq!(json_row["ErrorMessage"], creatio_receiver::NO_ENTITY_NAME);
    assert_eq!(
        json_row["ErrorMessage"],
        "The EntityName parameter is not found in the webhook body"
    );
    assert_eq!(json_row["ContentType"], "application/json");
    let raw: Value = serde_json::from_str(json_row["RequestBody"].as_str().unwrap()).unwrap();
    assert_eq!(raw["leads"]["status"][0]["id"], "25399013");
    assert_eq!(json_row["Record"], Value::Null);

    // A form-urlencoded body is not a content type Creatio parses.
    let amo_row = row("amocrm");
    assert_eq!(amo_row["Status"], "Failed");
    assert_eq!(
        amo_row["ErrorMessage"],
        creatio_receiver::unsupported_content_type("application/x-www-form-urlencoded")
    );

    // Both Creatio formats parse into the same record.
    let record: Map<String, Value> = serde_json::from_str(LEAD_RECORD).unwrap();
    let mut columns = record.clone();
    columns.remove("EntityName");
    let creatio_row = row("creatio");
    assert_eq!(creatio_row["Status"], "Done", "{creatio_row}");
    assert_eq!(creatio_row["EntityName"], "Lead");
    assert_eq!(creatio_row["Record"], Value::Object(columns.clone()));
    assert_eq!(creatio_row["RequestBody"], LEAD_RECORD);
    assert_eq!(creatio_row["ErrorMessage"], Value::Null);
    assert!(
        creatio_row["Headers"]["webhook-id"].is_string(),
        "headers are stored: {creatio_row}"
    );
    let form_row = row("form");
    assert_eq!(form_row["Status"], "Done", "{form_row}");
    assert_eq!(form_row["EntityName"], "Lead");
    assert_eq!(form_row["Record"], Value::Object(as_form_texts(&columns)));
    assert!(
        form_row["ContentType"]
            .as_str()
            .unwrap()
            .starts_with("multipart/form-data; boundary=")
    );
    assert_eq!(sink.rows().len(), 4);

    // Creatio answers 200 whatever it makes of the body: every delivery is delivered.
    let list = server.get("/v1/deliveries").await.1;
    for d in list["deliveries"].as_array().unwrap() {
        server
            .wait_delivery_status(d["id"].as_str().unwrap(), "delivered", WAIT)
            .await;
    }
}

#[tokio::test]
async fn the_example_receiver_checks_registered_entities() {
    let sink = creatio_receiver::Sink::new(Some(vec!["Lead".into(), "Contact".into()]));
    let app = creatio_receiver::router(sink);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let server = TestServer::start("").await;
    server
        .subscribe(json!({
            "url": format!("http://{addr}/webhooks/k"),
            "events": ["add_company"],
            "format": "creatio",
        }))
        .await;
    server
        .emit(json!({"event": "add_company", "data": {"id": 1, "name": "Acme"}}))
        .await;
    let http = reqwest::Client::new();
    let row = wait_for_async("the parsed webhook", WAIT, || async {
        let v: Value = http
            .get(format!("http://{addr}/webhooks"))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        let row = v["webhooks"].get(0)?.clone();
        (row["Status"] != "New").then_some(row)
    })
    .await;
    assert_eq!(row["Status"], "Failed");
    assert_eq!(
        row["ErrorMessage"],
        "The \"Account\" object is not registered in the Webhook entities lookup"
    );
}

#[tokio::test]
async fn creatio_fields_are_checked_at_subscribe_time_and_bad_ones_store_nothing() {
    let server = TestServer::start("").await;
    let rx = Receiver::start(200).await;
    let url = rx.url("/c");
    let sub = |extra: Value| {
        let mut body = json!({"url": url, "events": ["add_lead"], "format": "creatio"});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    let cases: Vec<(Value, Vec<&str>)> = vec![
        (
            sub(json!({"events": ["add_lead", "add_talk"]})),
            vec!["entity_name", "add_talk", "no Creatio object"],
        ),
        (
            sub(json!({"events": ["add_message"], "format": "creatio-form"})),
            vec!["entity_name", "add_message"],
        ),
        (
            sub(json!({"entity_name": "Lead Name"})),
            vec!["entity_name", "\"Lead Name\"", "not a Creatio object code"],
        ),
        (
            sub(json!({"entity_name": ""})),
            vec!["entity_name", "not a Creatio object code"],
        ),
        (
            sub(json!({"field_map": {"name": "EntityName"}})),
            vec!["field_map", "EntityName", "entity_name"],
        ),
        (
            sub(json!({"field_map": {"name": "Full Name"}})),
            vec!["field_map", "Full Name", "not a Creatio column code"],
        ),
        (
            sub(json!({"field_map": {"name": "Name", "title": "Name"}})),
            vec!["field_map", "both map to the column"],
        ),
        (
            sub(json!({"field_map": {"custom_fields..PHONE": "MobilePhone"}})),
            vec!["field_map", "empty path segment"],
        ),
        (
            sub(json!({"field_map": {"name": 5}})),
            vec!["field_map.name", "invalid type"],
        ),
        (
            sub(json!({"format": "json", "entity_name": "Lead"})),
            vec![
                "entity_name",
                "applies only to the formats creatio and creatio-form",
            ],
        ),
        (
            json!({"url": url, "events": ["add_lead"], "field_map": {"name": "Name"}}),
            vec!["field_map", "\"amocrm\""],
        ),
        (
            sub(json!({"format": "creatio_form"})),
            vec!["format", "creatio, creatio-form"],
        ),
    ];
    let mut failures = Vec::new();
    for (body, needles) in &cases {
        let (code, problem, ct) = server
            .post_raw("/v1/subscriptions", &body.to_string())
            .await;
        let text = problem["detail"].as_str().unwrap_or_default().to_string();
        if code != 422 || ct != "application/problem+json" {
            failures.push(format!("{body}: {code} {ct} {problem}"));
        }
        for n in needles {
            if !text.contains(n) {
                failures.push(format!("{body}: problem lacks {n:?}: {text}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(
        server.get("/v1/subscriptions").await.1["subscriptions"],
        json!([]),
        "a refused subscription was stored"
    );

    // A talk subscription can switch to Creatio only once it names an object, and back only
    // once it drops it.
    let talk = server
        .subscribe(json!({"url": url, "events": ["add_talk"], "format": "json"}))
        .await;
    let path = format!("/v1/subscriptions/{}", talk["id"].as_str().unwrap());
    let (code, problem) = server.patch(&path, &json!({"format": "creatio"})).await;
    assert_eq!(code, 422, "{problem}");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .starts_with("entity_name:")
    );
    assert_eq!(server.get(&path).await.1["format"], "json");
    let (code, v) = server
        .patch(
            &path,
            &json!({"format": "creatio", "entity_name": "UsrAmoTalk"}),
        )
        .await;
    assert_eq!(
        (code, &v["format"], &v["entity_name"]),
        (200, &json!("creatio"), &json!("UsrAmoTalk"))
    );
    let (code, problem) = server.patch(&path, &json!({"format": "json"})).await;
    assert_eq!(code, 422, "{problem}");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .starts_with("entity_name:")
    );
    let (code, v) = server
        .patch(&path, &json!({"format": "json", "entity_name": null}))
        .await;
    assert_eq!((code, &v["entity_name"]), (200, &Value::Null));
}
