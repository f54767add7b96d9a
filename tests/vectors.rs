//! Captured amoCRM bodies: each vector's event must encode to its body byte for byte, and the
//! structure must equal what PHP's `$_POST` read from it. Reads the repository's copies and, when
//! present, the shared vectors beside the repository.

use serde_json::{Map, Value};
use std::path::{Path, PathBuf};
use webhook_dispatcher::event::{Event, account_block};
use webhook_dispatcher::payload::Format;

fn vector_files() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for dir in [root.join("tests/vectors"), root.join("../shared/vectors")] {
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                if e.path().extension().is_some_and(|x| x == "json") {
                    files.push(e.path());
                }
            }
        }
    }
    files
}

/// Turns every scalar into the string PHP's `$_POST` would hold, dropping nulls.
fn as_php_post(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), as_php_post(v)))
                .collect::<Map<_, _>>(),
        ),
        Value::Array(a) => {
            Value::Array(a.iter().filter(|v| !v.is_null()).map(as_php_post).collect())
        }
        Value::String(s) => Value::String(s.clone()),
        Value::Bool(b) => Value::String(if *b { "1" } else { "0" }.into()),
        Value::Number(n) => Value::String(n.to_string()),
        Value::Null => Value::Null,
    }
}

#[test]
fn every_captured_vector_encodes_byte_for_byte() {
    let files = vector_files();
    assert!(
        files
            .iter()
            .any(|f| f.ends_with("tests/vectors/amocrm_status_lead.json")),
        "the repository's vector is present: {files:?}"
    );
    let default_account = account_block("example", &Value::from(1), "https://example.amocrm.ru");
    for file in files {
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        let format = Format::parse(v["format"].as_str().unwrap()).unwrap();
        let event = Event::from_value(v["event"].clone()).unwrap();
        let payload = event.payload(&default_account);
        let body = format
            .encode(&event, &default_account, &Default::default())
            .unwrap();
        assert_eq!(
            std::str::from_utf8(&body).unwrap(),
            v["expected_body"].as_str().unwrap(),
            "{}",
            file.display()
        );
        if let Some(php) = v.get("php_post") {
            assert_eq!(&as_php_post(&payload), php, "{}", file.display());
        }
    }
}

/// Intake encodes an event's amoCRM and JSON bodies from the event it parsed (`Engine::prime`);
/// a retry, or an attempt after a restart, encodes them from the stored event (which intake
/// writes from the parsed event without building its `Value`). For every
/// captured vector, and an event with floats, unicode and an account of its own, the stored
/// round trip gives the same bytes.
#[test]
fn an_event_encodes_alike_before_and_after_storage() {
    let default_account = account_block("example", &Value::from(1), "https://example.amocrm.ru");
    let mut events: Vec<Value> = vector_files()
        .iter()
        .map(|f| {
            let v: Value = serde_json::from_str(&std::fs::read_to_string(f).unwrap()).unwrap();
            v["event"].clone()
        })
        .collect();
    events.push(serde_json::json!({
        "event": "note_contact",
        "id": "client-key-1",
        "data": {"id": 7, "price": 1.25, "big": 18446744073709551615u64, "neg": -3,
                 "text": "Привет & <b>\"x\"</b>", "tags": [{"name": "a b"}, null, true]},
        "account": {"subdomain": "other", "id": "29", "_links": {"self": "https://other.amocrm.ru"}}
    }));
    for value in events {
        let event = Event::from_value(value.clone()).unwrap();
        // Intake writes the parsed event as it is (`stored`), the bytes of its `Value` form.
        let stored = serde_json::to_vec(&event.stored()).unwrap();
        assert_eq!(
            stored,
            serde_json::to_vec(&event.to_value()).unwrap(),
            "{value}"
        );
        let read = Event::from_value(serde_json::from_slice(&stored).unwrap()).unwrap();
        for format in [Format::Amocrm, Format::Json] {
            let at_intake = format
                .encode(&event, &default_account, &Default::default())
                .unwrap();
            let from_storage = format
                .encode(&read, &default_account, &Default::default())
                .unwrap();
            assert_eq!(at_intake, from_storage, "{format:?} of {value}");
        }
    }
}
