//! The Creatio formats (SPEC §7): one event's item as the flat record Creatio's webhook service
//! (`https://webhooks.creatio.com/webhooks/{API_KEY}`) turns into a CRM record.
//!
//! Creatio parses a webhook whose body is flat — column code → value — and names the object to
//! create in `EntityName`, sent as JSON (`creatio`) or as `multipart/form-data` (`creatio-form`).
//! [`record`] builds that flat object from an event; [`json`] and [`multipart`] encode it. The
//! rules, in the order they apply:
//!
//! - `EntityName` is the subscription's `entity_name`, else the entity's Creatio object
//!   ([`default_object`]): lead → `Lead`, contact and customer → `Contact`, company → `Account`,
//!   task → `Activity`. Talks and messages have no Creatio object: a subscription must name one.
//! - The item's scalar fields (strings, numbers, booleans) keep their key and order; nulls and
//!   nested values (arrays, objects) are left out.
//! - `field_map` renames a field (`name` → `Name`, `responsible_user_id` → `OwnerId`), drops it
//!   when the new name is empty, or reaches into nested values with a dotted path
//!   (`custom_fields.PHONE` → the first value of the custom field whose `code` or `id` is `PHONE`;
//!   `tags.0.name` → the name of the first tag); such fields take the place of the nested value
//!   they come from, in the order of their paths (a `field_map` is kept sorted). A mapped field
//!   wins over an unmapped one of the same name.
//! - `EntityName` comes last, and always from the rules above (an item's own `EntityName` is
//!   replaced).
//!
//! Subscriptions are checked against these rules when they are created or changed
//! ([`check_entity_name`], [`check_field_map`], [`check_events`]), so a stored one always encodes.

use crate::event::{Entity, Event};
use bytes::Bytes;
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// The key Creatio reads the object code from.
pub const ENTITY_NAME: &str = "EntityName";

/// Longest object or column code accepted (Creatio's own codes are far shorter).
const MAX_CODE_LEN: usize = 128;
/// Longest source path of a `field_map` entry.
const MAX_PATH_LEN: usize = 255;
/// Most entries of one `field_map`.
const MAX_FIELD_MAP: usize = 200;

/// Why an event cannot be encoded for Creatio.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CreatioError {
    #[error(
        "{0} events have no Creatio object; set the subscription's entity_name to the object code to create"
    )]
    NoObject(&'static str),
}

/// What a subscription adds to the Creatio formats: the object code and the column names.
#[derive(Debug, Clone, Copy, Default)]
pub struct Mapping<'a> {
    /// Overrides the entity's default object code.
    pub entity_name: Option<&'a str>,
    /// Source field or path → Creatio column code ("" leaves the field out).
    pub field_map: Option<&'a BTreeMap<String, String>>,
}

impl<'a> Mapping<'a> {
    pub fn new(
        entity_name: Option<&'a str>,
        field_map: Option<&'a BTreeMap<String, String>>,
    ) -> Mapping<'a> {
        Mapping {
            entity_name,
            field_map,
        }
    }
}

/// The Creatio object an amoCRM entity becomes when the subscription names none.
pub fn default_object(entity: Entity) -> Option<&'static str> {
    match entity {
        Entity::Lead => Some("Lead"),
        Entity::Contact | Entity::Customer => Some("Contact"),
        Entity::Company => Some("Account"),
        Entity::Task => Some("Activity"),
        // amoCRM talks and chat messages have no counterpart among Creatio's base objects.
        Entity::Talk | Entity::Message => None,
    }
}

/// The flat record of one event: its item's fields as `mapping` says, `EntityName` last.
pub fn record(event: &Event, mapping: &Mapping<'_>) -> Result<Map<String, Value>, CreatioError> {
    let object = match mapping.entity_name {
        Some(name) => name,
        None => default_object(event.name.entity)
            .ok_or(CreatioError::NoObject(event.name.entity.name()))?,
    };
    let empty = BTreeMap::new();
    let field_map = mapping.field_map.unwrap_or(&empty);
    let is_target = |key: &str| field_map.values().any(|t| t == key);
    let mut out = Map::new();
    for (key, value) in &event.data {
        // A mapping of the field itself renames it ("" drops it).
        let direct = field_map.get(key).filter(|t| !t.is_empty());
        if is_scalar(value) {
            match direct {
                Some(target) => {
                    out.insert(target.clone(), value.clone());
                }
                None if field_map.contains_key(key) || key == ENTITY_NAME || is_target(key) => {}
                None => {
                    out.insert(key.clone(), value.clone());
                }
            }
            continue;
        }
        if let Some(target) = direct
            && let Some(v) = flat_value(value)
        {
            out.insert(target.clone(), v);
        }
        // A nested value: only the paths the map names come out of it, in the map's (sorted) order.
        for (path, target) in field_map {
            let mut segments = path.split('.');
            if segments.next() != Some(key.as_str()) || target.is_empty() {
                continue;
            }
            let rest: Vec<&str> = segments.collect();
            if rest.is_empty() {
                continue;
            }
            if let Some(v) = resolve(value, &rest).and_then(flat_value) {
                out.insert(target.clone(), v);
            }
        }
    }
    out.insert(ENTITY_NAME.into(), Value::String(object.to_string()));
    Ok(out)
}

fn is_scalar(v: &Value) -> bool {
    matches!(v, Value::String(_) | Value::Number(_) | Value::Bool(_))
}

/// What a value gives as a column: a scalar as it is; a custom field (an object with `values`) its
/// first value; nothing for nulls and other nested values.
fn flat_value(v: &Value) -> Option<Value> {
    match v {
        Value::String(_) | Value::Number(_) | Value::Bool(_) => Some(v.clone()),
        Value::Object(obj) => match obj.get("values")?.as_array()?.first()? {
            Value::Object(first) => first.get("value").filter(|v| is_scalar(v)).cloned(),
            first if is_scalar(first) => Some(first.clone()),
            _ => None,
        },
        _ => None,
    }
}

/// Follows a dotted path below a field: an object by key; an array by the element whose `code`
/// or `id` is the segment (amoCRM's custom fields), else by index when the segment is a number.
fn resolve<'v>(mut value: &'v Value, segments: &[&str]) -> Option<&'v Value> {
    for segment in segments {
        value = match value {
            Value::Object(obj) => obj.get(*segment)?,
            Value::Array(items) => items
                .iter()
                .find(|item| {
                    ["code", "id"]
                        .iter()
                        .any(|k| item.get(*k).and_then(scalar_text).as_deref() == Some(*segment))
                })
                .or_else(|| items.get(segment.parse::<usize>().ok()?))?,
            _ => return None,
        };
    }
    Some(value)
}

fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The `creatio` body: the record as one JSON object.
pub fn json(record: &Map<String, Value>) -> Bytes {
    // Serialising a map of JSON values cannot fail: its keys are strings.
    Bytes::from(serde_json::to_vec(record).expect("a JSON map serialises"))
}

/// A value as a form field's text: strings as they are, numbers as JSON writes them, booleans
/// `true`/`false` (what Creatio's boolean columns take).
pub fn form_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// A fresh multipart boundary: 32 random hex digits after a fixed prefix (well under the 70
/// characters RFC 2046 allows).
pub fn new_boundary() -> String {
    let bytes: [u8; 16] = rand::random();
    let mut b = String::from("----webhook-dispatcher-");
    for byte in bytes {
        b.push_str(&format!("{byte:02x}"));
    }
    b
}

/// The `creatio-form` body and its content type: the record as `multipart/form-data`, one text
/// part per field. The boundary is random; a new one is drawn in the (astronomically unlikely)
/// case that a value contains it.
pub fn multipart(record: &Map<String, Value>) -> (String, Bytes) {
    let texts: Vec<(&String, String)> = record.iter().map(|(k, v)| (k, form_text(v))).collect();
    let mut boundary = new_boundary();
    while texts
        .iter()
        .any(|(k, t)| k.contains(&boundary) || t.contains(&boundary))
    {
        boundary = new_boundary();
    }
    let body = multipart_with(&boundary, &texts);
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// The multipart bytes with a given boundary (RFC 7578; names escaped as browsers do).
fn multipart_with(boundary: &str, fields: &[(&String, String)]) -> Bytes {
    let mut out = Vec::with_capacity(256 + fields.len() * (boundary.len() + 64));
    for (name, text) in fields {
        out.extend_from_slice(b"--");
        out.extend_from_slice(boundary.as_bytes());
        out.extend_from_slice(b"\r\nContent-Disposition: form-data; name=\"");
        out.extend_from_slice(escape_name(name).as_bytes());
        out.extend_from_slice(b"\"\r\n\r\n");
        out.extend_from_slice(text.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"--");
    out.extend_from_slice(boundary.as_bytes());
    out.extend_from_slice(b"--\r\n");
    Bytes::from(out)
}

/// A field name inside `name="…"`: `"`, CR and LF percent-encoded, as the HTML standard does.
fn escape_name(name: &str) -> String {
    name.replace('"', "%22")
        .replace('\r', "%0D")
        .replace('\n', "%0A")
}

/// An object or column code: a letter or `_`, then letters, digits and `_`.
fn is_code(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && s.len() <= MAX_CODE_LEN
}

/// Checks a subscription's `entity_name`: a Creatio object code such as `Lead` or `UsrAmoDeal`.
pub fn check_entity_name(name: &str) -> Result<(), String> {
    if is_code(name) {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a Creatio object code (a letter or '_', then letters, digits or '_', at most {MAX_CODE_LEN} characters; e.g. \"Lead\")"
        ))
    }
}

/// Checks a subscription's `field_map`: source fields or dotted paths → column codes, each column
/// named once, `EntityName` left to `entity_name`.
pub fn check_field_map(map: &BTreeMap<String, String>) -> Result<(), String> {
    if map.len() > MAX_FIELD_MAP {
        return Err(format!(
            "has {} entries; at most {MAX_FIELD_MAP}",
            map.len()
        ));
    }
    let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
    for (source, target) in map {
        if source.is_empty() || source.len() > MAX_PATH_LEN {
            return Err(format!(
                "{source:?} is not a field name or a dotted path (1 to {MAX_PATH_LEN} characters)"
            ));
        }
        if source.split('.').any(str::is_empty) {
            return Err(format!(
                "{source:?} has an empty path segment; write a field (\"name\") or a dotted path (\"custom_fields.PHONE\")"
            ));
        }
        if target.is_empty() {
            continue;
        }
        if target.eq_ignore_ascii_case(ENTITY_NAME) {
            return Err(format!(
                "{source:?} cannot map to {ENTITY_NAME:?}: the object code comes from entity_name"
            ));
        }
        if !is_code(target) {
            return Err(format!(
                "{source:?} maps to {target:?}, which is not a Creatio column code (a letter or '_', then letters, digits or '_', at most {MAX_CODE_LEN} characters; e.g. \"OwnerId\"; \"\" leaves the field out)"
            ));
        }
        if let Some(first) = seen.insert(target, source) {
            return Err(format!(
                "{first:?} and {source:?} both map to the column {target:?}"
            ));
        }
    }
    Ok(())
}

/// Checks that every event of a Creatio subscription has an object to create: the entity's
/// default or the subscription's `entity_name`.
pub fn check_events(events: &[String], entity_name: Option<&str>) -> Result<(), String> {
    if entity_name.is_some() {
        return Ok(());
    }
    let orphans: Vec<&str> = events
        .iter()
        .filter(|e| {
            crate::event::EventName::parse(e).is_some_and(|n| default_object(n.entity).is_none())
        })
        .map(String::as_str)
        .collect();
    if orphans.is_empty() {
        return Ok(());
    }
    Err(format!(
        "is required for the Creatio formats when events include {}: talks and messages have no Creatio object; set entity_name to the object code to create, or subscribe to them in another format",
        orphans.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(name: &str, data: Value) -> Event {
        Event::from_value(json!({"event": name, "data": data})).expect("valid event")
    }

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn lead() -> Event {
        event(
            "status_lead",
            json!({
                "id": "25399013",
                "name": "Заявка с сайта",
                "status_id": "142",
                "old_status_id": "7039101",
                "price": 15000,
                "is_deleted": false,
                "closest_task_at": null,
                "responsible_user_id": "504141",
                "custom_fields": [
                    {"id": "427181", "name": "Телефон", "code": "PHONE",
                     "values": [{"value": "+7 912 000-00-00", "enum": "WORK"}, {"value": "+7 000"}]},
                    {"id": "427183", "name": "Источник", "values": [{"value": "site"}]}
                ],
                "tags": [{"id": "1", "name": "vip"}],
                "_embedded": {"company": {"id": 9}}
            }),
        )
    }

    #[test]
    fn every_entity_has_its_object() {
        let cases = [
            ("add_lead", Some("Lead")),
            ("update_contact", Some("Contact")),
            ("add_company", Some("Account")),
            ("add_customer", Some("Contact")),
            ("add_task", Some("Activity")),
            ("add_talk", None),
            ("add_message", None),
        ];
        for (name, want) in cases {
            let e = event(name, json!({"id": 1}));
            let got = record(&e, &Mapping::default());
            match want {
                Some(object) => assert_eq!(got.unwrap()[ENTITY_NAME], object, "{name}"),
                None => assert!(
                    matches!(got, Err(CreatioError::NoObject(_))),
                    "{name}: {got:?}"
                ),
            }
        }
        let talk = event("add_talk", json!({"id": 1}));
        let r = record(&talk, &Mapping::new(Some("UsrAmoTalk"), None)).unwrap();
        assert_eq!(r[ENTITY_NAME], "UsrAmoTalk");
    }

    #[test]
    fn scalars_keep_order_nested_and_nulls_are_left_out() {
        let r = record(&lead(), &Mapping::default()).unwrap();
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"id":"25399013","name":"Заявка с сайта","status_id":"142","old_status_id":"7039101","price":15000,"is_deleted":false,"responsible_user_id":"504141","EntityName":"Lead"}"#
        );
    }

    #[test]
    fn field_map_renames_drops_and_flattens_paths_in_place() {
        let m = map(&[
            ("name", "Name"),
            ("responsible_user_id", "OwnerId"),
            ("old_status_id", ""),
            ("custom_fields.PHONE", "MobilePhone"),
            ("custom_fields.427183", "UsrSource"),
            ("custom_fields.MISSING", "UsrNothing"),
            ("tags.0.name", "UsrTag"),
            ("_embedded.company.id", "UsrAmoCompanyId"),
            ("no_such_field", "UsrAbsent"),
        ]);
        let r = record(&lead(), &Mapping::new(Some("UsrAmoLead"), Some(&m))).unwrap();
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"id":"25399013","Name":"Заявка с сайта","status_id":"142","price":15000,"is_deleted":false,"OwnerId":"504141","UsrSource":"site","MobilePhone":"+7 912 000-00-00","UsrTag":"vip","UsrAmoCompanyId":9,"EntityName":"UsrAmoLead"}"#
        );
    }

    #[test]
    fn a_whole_custom_field_path_gives_its_first_value_and_other_nesting_gives_nothing() {
        let e = event(
            "add_contact",
            json!({"id": 1, "custom_fields": [{"id": 5, "values": ["plain"]}], "tags": [{"id": 1}]}),
        );
        let m = map(&[
            ("custom_fields.5", "UsrPlain"),
            ("tags", "UsrTags"),
            ("tags.0", "UsrTag"),
        ]);
        let r = record(&e, &Mapping::new(None, Some(&m))).unwrap();
        assert_eq!(
            Value::Object(r),
            json!({"id": 1, "UsrPlain": "plain", "type": "contact", "EntityName": "Contact"})
        );
    }

    #[test]
    fn mapped_fields_win_and_entity_name_is_always_ours() {
        let e = event(
            "add_lead",
            json!({"id": 1, "Name": "raw", "name": "mapped", "EntityName": "Contact"}),
        );
        let m = map(&[("name", "Name")]);
        let r = record(&e, &Mapping::new(None, Some(&m))).unwrap();
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"id":1,"Name":"mapped","EntityName":"Lead"}"#
        );
    }

    #[test]
    fn form_texts() {
        assert_eq!(form_text(&json!(true)), "true");
        assert_eq!(form_text(&json!(false)), "false");
        assert_eq!(form_text(&json!(15000)), "15000");
        assert_eq!(form_text(&json!(1.5)), "1.5");
        assert_eq!(form_text(&json!("x y")), "x y");
    }

    #[test]
    fn multipart_bytes() {
        let name = "Name".to_string();
        let odd = "a\"b\r\nc".to_string();
        let body = multipart_with(
            "BOUNDARY",
            &[(&name, "Иван\r\nПетров".to_string()), (&odd, "true".into())],
        );
        assert_eq!(
            std::str::from_utf8(&body).unwrap(),
            "--BOUNDARY\r\nContent-Disposition: form-data; name=\"Name\"\r\n\r\nИван\r\nПетров\r\n\
             --BOUNDARY\r\nContent-Disposition: form-data; name=\"a%22b%0D%0Ac\"\r\n\r\ntrue\r\n\
             --BOUNDARY--\r\n"
        );
    }

    #[test]
    fn multipart_boundary_is_fresh_and_named_in_the_content_type() {
        let r = record(&lead(), &Mapping::default()).unwrap();
        let (ct1, body1) = multipart(&r);
        let (ct2, _) = multipart(&r);
        assert_ne!(ct1, ct2, "each body draws its own boundary");
        let boundary = ct1
            .strip_prefix("multipart/form-data; boundary=")
            .expect("content type names the boundary");
        assert!(boundary.len() <= 70);
        let text = std::str::from_utf8(&body1).unwrap();
        assert!(text.starts_with(&format!("--{boundary}\r\n")));
        assert!(text.ends_with(&format!("--{boundary}--\r\n")));
        assert!(text.contains("name=\"is_deleted\"\r\n\r\nfalse\r\n"));
        assert!(text.contains("name=\"EntityName\"\r\n\r\nLead\r\n"));
    }

    #[test]
    fn entity_name_checks() {
        for ok in ["Lead", "UsrAmoLead", "_x", "A1"] {
            assert_eq!(check_entity_name(ok), Ok(()), "{ok}");
        }
        for bad in ["", "1Lead", "Lead ", "Le-ad", "Лид", &"A".repeat(129)] {
            let err = check_entity_name(bad).expect_err(bad);
            assert!(err.contains("not a Creatio object code"), "{err}");
        }
    }

    #[test]
    fn field_map_checks() {
        assert_eq!(
            check_field_map(&map(&[
                ("name", "Name"),
                ("custom_fields.PHONE", "MobilePhone"),
                ("old_status_id", ""),
                ("status_id", ""),
            ])),
            Ok(())
        );
        let cases = [
            (map(&[("", "Name")]), "\"\" is not a field name"),
            (map(&[("a..b", "Name")]), "empty path segment"),
            (map(&[(".a", "Name")]), "empty path segment"),
            (
                map(&[("name", "EntityName")]),
                "cannot map to \"EntityName\"",
            ),
            (map(&[("name", "entityname")]), "cannot map to"),
            (
                map(&[("name", "Full Name")]),
                "\"Full Name\", which is not a Creatio column code",
            ),
            (
                map(&[("name", "Name"), ("title", "Name")]),
                "\"name\" and \"title\" both map to the column \"Name\"",
            ),
        ];
        for (m, want) in cases {
            let err = check_field_map(&m).expect_err(want);
            assert!(err.contains(want), "{err:?} should contain {want:?}");
        }
        let big: BTreeMap<String, String> = (0..201)
            .map(|i| (format!("f{i}"), format!("C{i}")))
            .collect();
        assert!(check_field_map(&big).unwrap_err().contains("at most 200"));
    }

    #[test]
    fn events_need_an_object() {
        let events = |names: &[&str]| names.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            check_events(&events(&["add_lead", "add_task"]), None),
            Ok(())
        );
        let err = check_events(&events(&["add_lead", "add_talk", "add_message"]), None)
            .expect_err("talk and message have no object");
        assert!(err.contains("add_talk, add_message"), "{err}");
        assert_eq!(
            check_events(&events(&["add_talk"]), Some("UsrAmoTalk")),
            Ok(())
        );
    }
}
