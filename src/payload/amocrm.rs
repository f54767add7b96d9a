//! The amoCRM form encoding: PHP's `http_build_query` as amoCRM calls it (SPEC §7).
//!
//! Nested objects and arrays flatten to bracket keys (`leads[status][0][id]`), arrays index from 0,
//! brackets are percent-encoded, space is `+`, and everything but `A–Z a–z 0–9 - _ .` is
//! percent-encoded (PHP's `urlencode`). Numbers become their shortest decimal text, booleans `1`/`0`;
//! nulls, empty arrays and empty objects are left out, and array elements keep their index even when
//! an earlier element was left out — so PHP's `$_POST` reads back exactly the structure.

use serde_json::{Number, Value};
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

/// Writes `value` under the already-encoded `key`, extending the key with `%5B…%5D` as it descends.
fn write_value(out: &mut String, key: &mut String, value: &Value) {
    let scalar = match value {
        Value::Null => return,
        Value::Bool(b) => { if *b { "1" } else { "0" } }.to_string(),
        Value::Number(n) => number_text(n),
        Value::String(s) => {
            let mut enc = String::with_capacity(s.len());
            push_encoded(&mut enc, s);
            enc
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                let len = key.len();
                let _ = write!(key, "%5B{i}%5D");
                write_value(out, key, v);
                key.truncate(len);
            }
            return;
        }
        Value::Object(map) => {
            for (k, v) in map {
                let len = key.len();
                key.push_str("%5B");
                push_encoded(key, k);
                key.push_str("%5D");
                write_value(out, key, v);
                key.truncate(len);
            }
            return;
        }
    };
    if !out.is_empty() {
        out.push('&');
    }
    out.push_str(key);
    out.push('=');
    out.push_str(&scalar);
}

/// The shortest decimal text of a number: integers as they are, floats without a needless `.0`.
fn number_text(n: &Number) -> String {
    if n.is_i64() || n.is_u64() {
        return n.to_string();
    }
    match n.as_f64() {
        Some(f) if f.fract() == 0.0 && f.abs() < 1e15 => format!("{}", f as i64),
        Some(f) => format!("{f}"),
        None => n.to_string(),
    }
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
