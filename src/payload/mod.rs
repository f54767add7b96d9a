//! Payload encoders: how one event becomes the body of a delivery (SPEC §7).
//!
//! `amocrm` is the form encoding amoCRM and PHP's `http_build_query` produce; `json` is the same
//! structure as JSON; both encode the payload structure built by
//! [`crate::event::Event::payload`]. `creatio` and `creatio-form` encode the event's item as the
//! flat record Creatio's webhook service takes ([`creatio`]). [`Format::encode`] gives the body and
//! its content type together: the multipart boundary of `creatio-form` is part of the latter.

pub mod amocrm;
pub mod creatio;

use crate::event::Event;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The wire format of a subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// `application/x-www-form-urlencoded`, byte for byte as amoCRM sends it.
    #[default]
    Amocrm,
    /// The same structure as JSON (nulls kept, types as the event had them).
    Json,
    /// The item as one flat JSON object with `EntityName`, for Creatio's webhook service.
    Creatio,
    /// The same fields as `multipart/form-data`.
    #[serde(rename = "creatio-form")]
    CreatioForm,
}

/// The body of one request and its `Content-Type`.
#[derive(Debug, Clone, PartialEq)]
pub struct Body {
    pub content_type: String,
    pub bytes: Bytes,
}

impl std::ops::Deref for Body {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes
    }
}

impl Format {
    pub const NAMES: &'static str = "amocrm, json, creatio, creatio-form";

    pub fn parse(name: &str) -> Option<Format> {
        match name {
            "amocrm" => Some(Format::Amocrm),
            "json" => Some(Format::Json),
            "creatio" => Some(Format::Creatio),
            "creatio-form" => Some(Format::CreatioForm),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Format::Amocrm => "amocrm",
            Format::Json => "json",
            Format::Creatio => "creatio",
            Format::CreatioForm => "creatio-form",
        }
    }

    /// Whether the format is one of Creatio's, which read `entity_name` and `field_map`.
    pub fn is_creatio(self) -> bool {
        matches!(self, Format::Creatio | Format::CreatioForm)
    }

    /// Encodes one event in this format: the body and its content type. `account` is the block
    /// the amoCRM formats send when the event brings none; `mapping` is the subscription's
    /// Creatio mapping (ignored by the other formats).
    pub fn encode(
        self,
        event: &Event,
        account: &Map<String, Value>,
        mapping: &creatio::Mapping<'_>,
    ) -> Result<Body, creatio::CreatioError> {
        let fixed = |content_type: &str, bytes: Bytes| Body {
            content_type: content_type.to_string(),
            bytes,
        };
        Ok(match self {
            Format::Amocrm => {
                let p = PayloadParts::of(event, account);
                fixed(
                    "application/x-www-form-urlencoded",
                    Bytes::from(amocrm::encode_payload(
                        p.entity, p.action, p.item, p.account,
                    )),
                )
            }
            // Serialising maps of `Value`s cannot fail: their keys are strings.
            Format::Json => fixed(
                "application/json",
                Bytes::from(
                    serde_json::to_vec(&PayloadParts::of(event, account))
                        .expect("the payload serialises"),
                ),
            ),
            Format::Creatio => fixed(
                "application/json",
                creatio::json(&creatio::record(event, mapping)?),
            ),
            Format::CreatioForm => {
                let (content_type, bytes) = creatio::multipart(&creatio::record(event, mapping)?);
                Body {
                    content_type,
                    bytes,
                }
            }
        })
    }
}

/// The parts of [`Event::payload`], borrowed: `{entity: {action: [item]}, account: {…}}`, with
/// the event's own account block or else the default one. Serialises as that structure's JSON
/// without copying the item into a new `Value`.
struct PayloadParts<'a> {
    entity: &'static str,
    action: &'static str,
    item: &'a Map<String, Value>,
    account: &'a Map<String, Value>,
}

impl<'a> PayloadParts<'a> {
    fn of(event: &'a Event, default_account: &'a Map<String, Value>) -> PayloadParts<'a> {
        PayloadParts {
            entity: event.name.entity.payload_key(),
            action: event.name.action,
            item: &event.data,
            account: event.account.as_ref().unwrap_or(default_account),
        }
    }
}

impl Serialize for PayloadParts<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut root = s.serialize_map(Some(2))?;
        root.serialize_entry(self.entity, &ByAction(self.action, [self.item]))?;
        root.serialize_entry("account", self.account)?;
        root.end()
    }
}

/// `{action: [item]}`, serialised without building a map for its one entry.
struct ByAction<'a>(&'static str, [&'a Map<String, Value>; 1]);

impl Serialize for ByAction<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(1))?;
        map.serialize_entry(self.0, &self.1)?;
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names_round_trip_through_parse_and_serde() {
        for name in Format::NAMES.split(", ") {
            let f = Format::parse(name).expect("listed names parse");
            assert_eq!(f.name(), name);
            assert_eq!(serde_json::to_value(f).unwrap(), json!(name));
            assert_eq!(serde_json::from_value::<Format>(json!(name)).unwrap(), f);
        }
        assert_eq!(Format::parse("creatio_form"), None);
    }

    #[test]
    fn each_format_names_its_content_type() {
        let e = Event::from_value(json!({"event": "add_lead", "data": {"id": 1, "name": "x"}}))
            .unwrap();
        let acc = Map::new();
        let m = creatio::Mapping::default();
        let ct = |f: Format| f.encode(&e, &acc, &m).unwrap().content_type;
        assert_eq!(ct(Format::Amocrm), "application/x-www-form-urlencoded");
        assert_eq!(ct(Format::Json), "application/json");
        assert_eq!(ct(Format::Creatio), "application/json");
        assert!(ct(Format::CreatioForm).starts_with("multipart/form-data; boundary="));
        let body = Format::Creatio.encode(&e, &acc, &m).unwrap();
        assert_eq!(&body[..], br#"{"id":1,"name":"x","EntityName":"Lead"}"#);
    }

    /// The amoCRM and JSON bodies are written from the event's parts; they must be the bytes of
    /// the payload structure `Event::payload` builds, encoded as a whole.
    #[test]
    fn amocrm_and_json_bodies_are_those_of_the_payload_structure() {
        let vector: Value =
            serde_json::from_str(include_str!("../../tests/vectors/amocrm_status_lead.json"))
                .unwrap();
        let events = [
            vector["event"].clone(),
            json!({"event": "add_lead", "data": {"id": 1, "name": "x"}}),
            json!({"event": "note_contact", "data": {
                "id": 7, "price": 1.5, "whole": 2.0, "big": 1e20, "neg": -3, "yes": true,
                "no": false, "none": null, "empty": [], "blank": {}, "name": "Ёлка & co [1]",
                "tags": [null, {"id": 1, "name": "a b"}, [1, [2]]],
                "custom_fields": [{"id": "5", "values": [{"value": "=?&%+"}]}]
            }, "account": {"subdomain": "own", "id": 9, "_links": {"self": "https://own.amocrm.ru"}}}),
            json!({"event": "mail_in_lead", "data": {"id": "3"}}),
        ];
        let account =
            crate::event::account_block("example", &json!(1), "https://example.amocrm.ru");
        let m = creatio::Mapping::default();
        for e in events {
            let event = Event::from_value(e.clone()).unwrap();
            let payload = event.payload(&account);
            let form = Format::Amocrm.encode(&event, &account, &m).unwrap();
            assert_eq!(
                std::str::from_utf8(&form).unwrap(),
                amocrm::encode(&payload),
                "{e}"
            );
            let json = Format::Json.encode(&event, &account, &m).unwrap();
            assert_eq!(&json[..], serde_json::to_vec(&payload).unwrap(), "{e}");
        }
    }
}
