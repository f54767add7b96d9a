//! Payload encoders: how one event's structure becomes the body of a delivery (SPEC §7).
//!
//! `amocrm` is the form encoding amoCRM and PHP's `http_build_query` produce; `json` is the same
//! structure as JSON. Each is a pure function of the payload structure built by
//! [`crate::event::Event::payload`], so a body is encoded once per event and format.

pub mod amocrm;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The wire format of a subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// `application/x-www-form-urlencoded`, byte for byte as amoCRM sends it.
    #[default]
    Amocrm,
    /// The same structure as JSON (nulls kept, types as the event had them).
    Json,
}

impl Format {
    pub const NAMES: &'static str = "amocrm, json";

    pub fn parse(name: &str) -> Option<Format> {
        match name {
            "amocrm" => Some(Format::Amocrm),
            "json" => Some(Format::Json),
            _ => None,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Amocrm => "application/x-www-form-urlencoded",
            Format::Json => "application/json",
        }
    }

    /// Encodes a payload structure in this format.
    pub fn encode(self, payload: &Value) -> Bytes {
        match self {
            Format::Amocrm => Bytes::from(amocrm::encode(payload)),
            // Serialising a `Value` cannot fail: its keys are strings.
            Format::Json => Bytes::from(serde_json::to_vec(payload).expect("a Value serialises")),
        }
    }
}
