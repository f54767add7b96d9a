//! A client nobody here wrote reads what the daemon sends: Python's `aioamocrm.parse_webhook`
//! (PyPI; `.ci/run` installs it) gets each body exactly as a receiver on loopback got it, through
//! `tests/python/parse_webhook.py`, and must find entity, action, ids, custom fields and account.

mod common;

use common::{Receiver, TestServer};
use serde_json::{Value, json};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

const WAIT: Duration = Duration::from_secs(10);

/// Parses `bodies` with aioamocrm; one result a body.
async fn parse_webhooks(bodies: &[String]) -> Vec<Value> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/parse_webhook.py");
    let mut child = tokio::process::Command::new("python3")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("python3 is not installed ({e}); `.ci/run` needs it"));
    let input = serde_json::to_vec(bodies).unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&input).await.unwrap();
    drop(stdin);
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("parse_webhook.py finishes within 30 s")
        .unwrap();
    assert!(
        out.status.success(),
        "parse_webhook.py failed (is aioamocrm installed? `.ci/run` runs `python3 -m pip install aioamocrm`): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test]
async fn aioamocrm_parse_webhook_reads_entity_action_ids_fields_and_account() {
    let server = TestServer::start("").await;
    let rx = Receiver::start(200).await;
    server
        .subscribe(json!({"url": rx.url("/py"), "events": [
            "status_lead", "add_lead", "delete_lead", "note_lead", "add_contact", "update_company",
            "add_task", "period_customer", "add_message",
        ]}))
        .await;
    let events = [
        json!({"event": "status_lead", "data": {"id": "25399013", "status_id": "142", "old_status_id": "7039101", "pipeline_id": "752662"}}),
        json!({"event": "add_lead", "data": {"id": 25399014, "name": "Сделка с пробелами & знаками", "price": 1500, "tags": [{"id": 1, "name": "vip"}], "custom_fields": [
            {"id": "427493", "name": "Источник", "values": [{"value": "Сайт", "enum": "1034741"}]},
            {"id": "427497", "name": "Мультисписок", "values": ["Первый", "Второй"]},
        ]}}),
        json!({"event": "delete_lead", "data": {"id": "25399015", "status_id": "142", "pipeline_id": "752662"}}),
        json!({"event": "note_lead", "data": {"id": "9000", "note": {"id": "9000", "text": "Перезвонить", "element_id": "25399013", "element_type": "2"}}}),
        json!({"event": "add_contact", "data": {"id": 31773593, "name": "Иван Петров", "custom_fields": [
            {"id": "66192", "name": "Телефон", "code": "PHONE", "values": [{"value": "+7 912 345-67-89", "enum": "193200"}]},
            {"id": "66194", "name": "Email", "code": "EMAIL", "values": [{"value": "ivan@example.com", "enum": "193206"}]},
        ]}}),
        json!({"event": "update_company", "data": {"id": "31773600", "name": "ООО «Ромашка»"}}),
        json!({"event": "add_task", "data": {"id": "8001", "element_id": "25399013", "text": "Позвонить"}}),
        json!({"event": "period_customer", "data": {"id": 501, "status_id": 31}}),
        json!({"event": "add_message", "data": {"id": "m-1", "text": "Привет", "author": {"id": "a-1", "name": "Иван"}},
               "account": {"subdomain": "другой", "id": 42, "_links": {"self": "https://other.kommo.com"}}}),
    ];
    // One at a time, so the bodies line up with the events.
    let mut bodies = Vec::new();
    for (i, e) in events.iter().enumerate() {
        server.emit(e.clone()).await;
        let got = rx.wait_requests(i + 1, WAIT).await;
        bodies.push(got[i].body_str());
    }
    let read = parse_webhooks(&bodies).await;
    assert_eq!(read.len(), events.len());

    let account =
        json!({"subdomain": "test", "id": "7039099", "_links": {"self": "https://test.amocrm.ru"}});
    for r in &read[..8] {
        assert_eq!(r["account"], account, "{r}");
        assert_eq!(r["account_id"], 7039099, "{r}");
        assert_eq!(r["subdomain"], "test", "{r}");
        assert_eq!(r["events"].as_array().unwrap().len(), 1, "{r}");
    }
    let event = |i: usize| read[i]["events"][0].clone();
    let head = |i: usize| {
        let e = event(i);
        (e["entity"].clone(), e["action"].clone(), e["id"].clone())
    };

    assert_eq!(head(0), (json!("leads"), json!("status"), json!(25399013)));
    assert_eq!(
        event(0)["payload"],
        json!({"id": "25399013", "status_id": "142", "old_status_id": "7039101", "pipeline_id": "752662"})
    );

    assert_eq!(head(1), (json!("leads"), json!("add"), json!(25399014)));
    assert_eq!(event(1)["payload"]["name"], "Сделка с пробелами & знаками");
    assert_eq!(event(1)["payload"]["price"], "1500");
    assert_eq!(
        event(1)["payload"]["tags"],
        json!([{"id": "1", "name": "vip"}])
    );
    assert_eq!(
        event(1)["fields"],
        json!({"427493": ["Сайт"], "427497": ["Первый", "Второй"]})
    );

    assert_eq!(head(2), (json!("leads"), json!("delete"), json!(25399015)));

    assert_eq!(head(3), (json!("leads"), json!("note"), json!(9000)));
    assert_eq!(
        event(3)["payload"]["note"],
        json!({"id": "9000", "text": "Перезвонить", "element_id": "25399013", "element_type": "2"})
    );

    assert_eq!(head(4), (json!("contacts"), json!("add"), json!(31773593)));
    assert_eq!(event(4)["payload"]["type"], "contact");
    assert_eq!(event(4)["fields"]["PHONE"], "+7 912 345-67-89");
    assert_eq!(event(4)["fields"]["EMAIL"], "ivan@example.com");
    assert_eq!(event(4)["fields"]["66192"], json!(["+7 912 345-67-89"]));

    // Companies come under `contacts`, told apart by `type`.
    assert_eq!(
        head(5),
        (json!("contacts"), json!("update"), json!(31773600))
    );
    assert_eq!(event(5)["payload"]["type"], "company");
    assert_eq!(event(5)["payload"]["name"], "ООО «Ромашка»");

    assert_eq!(head(6), (json!("task"), json!("add"), json!(8001)));
    assert_eq!(head(7), (json!("customers"), json!("period"), json!(501)));

    // A non-numeric id is no int to aioamocrm; the payload keeps it. The event's own account block.
    assert_eq!(head(8), (json!("message"), json!("add"), Value::Null));
    assert_eq!(event(8)["payload"]["id"], "m-1");
    assert_eq!(
        event(8)["payload"]["author"],
        json!({"id": "a-1", "name": "Иван"})
    );
    assert_eq!(read[8]["account_id"], 42);
    assert_eq!(read[8]["subdomain"], "другой");
    assert_eq!(
        read[8]["account"]["_links"]["self"],
        "https://other.kommo.com"
    );
}
