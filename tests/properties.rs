//! Property tests: random JSON through the amoCRM encoder reads back through a PHP-style parser
//! (bracket keys, `+` for space, every scalar a string) as the structure PHP's `$_POST` would hold,
//! and no input panics the encoder or the intake parsers.

use proptest::prelude::*;
use serde_json::{Map, Value};
use webhook_dispatcher::event::Event;
use webhook_dispatcher::payload::amocrm;

/// Object keys as CRM fields are named: not numeric (PHP reads numeric keys as list indexes) and
/// not empty (`a[]` appends in PHP).
fn key() -> impl Strategy<Value = String> {
    "[a-z_][a-z0-9_]{0,7}"
}

/// Scalars: any text (brackets, `&`, `=`, `+`, `%`, Cyrillic, emoji…), integers, halves, bools.
fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<String>().prop_map(Value::String),
        "[ -~]{0,12}".prop_map(Value::String),
        any::<i64>().prop_map(Value::from),
        (-1_000_000i32..1_000_000).prop_map(|n| Value::from(n as f64 / 2.0)),
        any::<bool>().prop_map(Value::Bool),
    ]
}

/// Nested values without nulls or empty containers (those the encoder leaves out by design).
fn value() -> impl Strategy<Value = Value> {
    scalar().prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 1..5).prop_map(Value::Array),
            prop::collection::btree_map(key(), inner, 1..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Anything at all, nulls and empty containers included.
fn any_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![Just(Value::Null), scalar()];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map(".{0,6}", inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// What PHP's `$_POST` holds for a value: every scalar as its form text.
fn as_php(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(m.iter().map(|(k, v)| (k.clone(), as_php(v))).collect()),
        Value::Array(a) => Value::Array(a.iter().map(as_php).collect()),
        Value::Bool(b) => Value::String(if *b { "1" } else { "0" }.into()),
        Value::Number(n) => Value::String(match n.as_f64() {
            Some(f) if !(n.is_i64() || n.is_u64()) && f.fract() == 0.0 => format!("{}", f as i64),
            _ => n.to_string(),
        }),
        other => other.clone(),
    }
}

/// Reads a form body as PHP does, with `serde_qs` (PHP bracket syntax, form encoding).
fn php_parse(body: &str) -> Value {
    serde_qs::Config::new()
        .max_depth(16)
        .use_form_encoding(true)
        .deserialize_str(body)
        .unwrap_or_else(|e| panic!("the encoder's output must parse: {e}\n{body}"))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn encoded_forms_read_back_as_php_would(fields in prop::collection::btree_map(key(), value(), 1..6)) {
        let data: Map<String, Value> = fields.into_iter().collect();
        let root = Value::Object([("leads".to_string(), Value::Object(
            [("add".to_string(), Value::Array(vec![Value::Object(data)]))].into_iter().collect(),
        ))].into_iter().collect());
        let body = amocrm::encode(&root);
        prop_assert!(body.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.%+=&".contains(&b)), "{}", body);
        prop_assert_eq!(php_parse(&body), as_php(&root));
    }

    #[test]
    fn no_value_panics_the_encoder_or_the_event_parser(v in any_value()) {
        let _ = amocrm::encode(&v);
        let _ = Event::from_value(v.clone());
        let _ = Event::from_value(serde_json::json!({"event": "add_lead", "data": v}));
    }

    #[test]
    fn events_with_any_data_encode_without_panic(data in prop::collection::btree_map(".{0,6}", any_value(), 0..6)) {
        let mut data: Map<String, Value> = data.into_iter().collect();
        data.insert("id".into(), Value::from(1));
        let event = Event::from_value(serde_json::json!({"event": "update_company", "data": data})).unwrap();
        let body = amocrm::encode(&event.payload(&Map::new()));
        prop_assert!(body.contains("contacts%5Bupdate%5D%5B0%5D%5Bid%5D=1"));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn no_bytes_panic_the_request_parsers(bytes in prop::collection::vec(any::<u8>(), 0..256), text in ".{0,128}") {
        let _ = webhook_dispatcher::api::parse_json::<Value>(&bytes);
        let _ = webhook_dispatcher::api::parse_json::<Value>(text.as_bytes());
        let _ = webhook_dispatcher::config::Config::from_toml_str(&text, &[]);
        let _ = webhook_dispatcher::event::EventName::parse(&text);
        let _ = serde_qs::Config::new().use_form_encoding(true).deserialize_bytes::<Value>(&bytes);
    }
}
