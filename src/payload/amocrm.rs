//! The amoCRM form encoding: PHP's `http_build_query` as amoCRM calls it (SPEC §7).
//!
//! Nested objects and arrays flatten to bracket keys (`leads[status][0][id]`), arrays index from 0,
//! brackets are percent-encoded, space is `+`, and everything but `A–Z a–z 0–9 - _ .` is
//! percent-encoded (PHP's `urlencode`). Numbers become their shortest decimal text, booleans `1`/`0`;
//! nulls, empty arrays and empty objects are left out, and array elements keep their index even when
//! an earlier element was left out — so PHP's `$_POST` reads back exactly the structure.

use serde_json::{Map, Number, Value};
use std::fmt::Write;

/// Encodes a JSON structure as amoCRM's `application/x-www-form-urlencoded` body.
pub fn encode(value: &Value) -> String {
    let mut out = String::with_capacity(512);
    let mut key = String::with_capacity(128);
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                key.clear();
                push_encoded(&mut key, k);
                write_value(&mut out, &mut key, v);
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                key.clear();
                let _ = write!(key, "{i}");
                write_value(&mut out, &mut key, v);
            }
        }
        // A scalar at the top has no key to go under; http_build_query gives nothing for it either.
        _ => {}
    }
    out
}

/// Encodes an event's payload `{entity: {action: [item]}, account: {…}}` as [`encode`] does the
/// same structure built as a [`Value`], without building it: this runs once per event and
/// format, and the item would otherwise be copied for it.
pub fn encode_payload(
    entity: &str,
    action: &str,
    item: &Map<String, Value>,
    account: &Map<String, Value>,
) -> String {
    let mut out = String::with_capacity(512);
    let mut key = String::with_capacity(128);
    push_encoded(&mut key, entity);
    key.push_str("%5B");
    push_encoded(&mut key, action);
    key.push_str("%5D%5B0%5D");
    write_map(&mut out, &mut key, item);
    key.clear();
    key.push_str("account");
    write_map(&mut out, &mut key, account);
    out
}

/// Writes a map's entries under `key` (`key%5Bname%5D=…`).
fn write_map(out: &mut String, key: &mut String, map: &Map<String, Value>) {
    for (k, v) in map {
        let len = key.len();
        key.push_str("%5B");
        push_encoded(key, k);
        key.push_str("%5D");
        write_value(out, key, v);
        key.truncate(len);
    }
}

/// Writes `value` under the already-encoded `key`, extending the key with `%5B…%5D` as it descends.
fn write_value(out: &mut String, key: &mut String, value: &Value) {
    match value {
        Value::Null => return,
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                let len = key.len();
                let _ = write!(key, "%5B{i}%5D");
                write_value(out, key, v);
                key.truncate(len);
            }
            return;
        }
        Value::Object(map) => return write_map(out, key, map),
        Value::Bool(_) | Value::Number(_) | Value::String(_) => {}
    }
    if !out.is_empty() {
        out.push('&');
    }
    out.push_str(key);
    out.push('=');
    match value {
        Value::Bool(b) => out.push(if *b { '1' } else { '0' }),
        Value::Number(n) => push_number(out, n),
        Value::String(s) => push_encoded(out, s),
        Value::Null | Value::Array(_) | Value::Object(_) => {}
    }
}

/// The shortest decimal text of a number: integers as they are, floats without a needless `.0`.
fn push_number(out: &mut String, n: &Number) {
    let _ = match n.as_f64() {
        _ if n.is_i64() || n.is_u64() => write!(out, "{n}"),
        Some(f) if f.fract() == 0.0 && f.abs() < 1e15 => write!(out, "{}", f as i64),
        Some(f) => write!(out, "{f}"),
        None => write!(out, "{n}"),
    };
}

/// PHP's `urlencode`: alphanumerics and `-_.` stay, space becomes `+`, every other byte `%XX`.
fn push_encoded(out: &mut String, s: &str) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in s.as_bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => out.push(b as char),
            b' ' => out.push('+'),
            _ => {
                out.push('%');
                out.push(HEX[(b >> 4) as usize] as char);
                out.push(HEX[(b & 15) as usize] as char);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn scalars_and_escapes() {
        assert_eq!(
            encode(
                &json!({"a": "x y", "b": true, "c": false, "d": 1.5, "e": 2.0, "f": -7, "g": "~*'()!/"})
            ),
            "a=x+y&b=1&c=0&d=1.5&e=2&f=-7&g=%7E%2A%27%28%29%21%2F"
        );
        assert_eq!(
            encode(&json!({"name": "Сделка"})),
            "name=%D0%A1%D0%B4%D0%B5%D0%BB%D0%BA%D0%B0"
        );
    }

    #[test]
    fn nulls_and_empties_are_left_out_and_indexes_kept() {
        assert_eq!(
            encode(&json!({"a": null, "b": [], "c": {}, "d": [null, "x", [], "y"], "e": ""})),
            "d%5B1%5D=x&d%5B3%5D=y&e="
        );
    }

    #[test]
    fn nested_brackets() {
        assert_eq!(
            encode(
                &json!({"leads": {"status": [{"id": "1", "custom_fields": [{"values": ["v"]}]}]}})
            ),
            "leads%5Bstatus%5D%5B0%5D%5Bid%5D=1&leads%5Bstatus%5D%5B0%5D%5Bcustom_fields%5D%5B0%5D%5Bvalues%5D%5B0%5D=v"
        );
        assert_eq!(encode(&json!({"a b[": {"c]": 1}})), "a+b%5B%5Bc%5D%5D=1");
    }

    #[test]
    fn reproduces_the_captured_status_lead_vector() {
        let v: Value =
            serde_json::from_str(include_str!("../../tests/vectors/amocrm_status_lead.json"))
                .unwrap();
        let event = crate::event::Event::from_value(v["event"].clone()).unwrap();
        let body = encode(&event.payload(&serde_json::Map::new()));
        assert_eq!(body, v["expected_body"].as_str().unwrap());
    }

    #[test]
    fn top_level_scalars_give_nothing() {
        assert_eq!(encode(&json!(5)), "");
        assert_eq!(encode(&json!(["a"])), "0=a");
    }
}
