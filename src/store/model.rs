//! The records kept in storage: subscriptions, events, deliveries and their attempts.
//!
//! Times are milliseconds since the Unix epoch here; the API renders them as RFC 3339.

use crate::payload::Format;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use uuid::Uuid;

/// Why a subscription is not enabled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DisabledReason {
    /// The disable rule: too many failed attempts within the window.
    Failures,
    /// A receiver answered `410 Gone`.
    Gone,
    /// Disabled by a request.
    Admin,
}

/// `{pipeline_id?, status_id?}`: deliver only events whose data match (a digital-pipeline stage).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Filter {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline_id: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_id: Option<Value>,
}

/// A scalar's text, so that `"142"` and `142` compare equal.
fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

impl Filter {
    pub fn is_empty(&self) -> bool {
        self.pipeline_id.is_none() && self.status_id.is_none()
    }

    /// Whether an event's data passes the filter.
    pub fn matches(&self, data: &Map<String, Value>) -> bool {
        let field_ok = |want: &Option<Value>, field: &str| match want {
            None => true,
            Some(w) => match (scalar_text(w), data.get(field).and_then(scalar_text)) {
                (Some(w), Some(got)) => w == got,
                _ => false,
            },
        };
        field_ok(&self.pipeline_id, "pipeline_id") && field_ok(&self.status_id, "status_id")
    }
}

/// An integrator's subscription of a URL to events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Subscription {
    pub id: Uuid,
    pub url: String,
    pub events: Vec<String>,
    pub name: Option<String>,
    pub format: Format,
    pub retry: String,
    #[serde(default)]
    pub filter: Option<Filter>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Per-attempt timeout in milliseconds; the configured `[delivery] timeout` when absent.
    pub timeout_ms: Option<u64>,
    pub enabled: bool,
    pub disabled_reason: Option<DisabledReason>,
    pub created_at: u64,
    pub updated_at: u64,
    /// `whsec_` + base64 of the signing key.
    pub secret: String,
    #[serde(default)]
    pub entity_name: Option<String>,
    #[serde(default)]
    pub field_map: Option<BTreeMap<String, String>>,
    /// The amoCRM v4 API's `sort` (v4 lists webhooks in this order).
    #[serde(default)]
    pub sort: Option<i64>,
    /// When the subscription was last enabled (created enabled, or enabled again): the disable
    /// rule counts failed attempts from then on. `None` for records stored before it existed.
    #[serde(default)]
    pub enabled_at: Option<u64>,
}

impl Subscription {
    /// Whether an event (already matched by name) passes this subscription's filter.
    pub fn accepts(&self, data: &Map<String, Value>) -> bool {
        self.filter.as_ref().is_none_or(|f| f.matches(data))
    }
}

/// An accepted event as stored: its id, when it arrived, its name, the event object, and the
/// subscriptions it goes to (delivery `i` goes to the `i`-th, see [`super::delivery_id`]).
///
/// Read back, the event object is a [`Value`]; taken in, it is anything that serialises to it,
/// such as [`crate::event::Event::stored`], which writes the parsed event without copying it.
#[derive(Debug, Clone)]
pub struct StoredEvent<E = Value> {
    pub id: Uuid,
    pub received_at: u64,
    pub name: String,
    pub event: E,
    pub subscriptions: Vec<Uuid>,
}

/// The first receipt of an event sent with an idempotency key (`"id"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdempotencyRecord {
    pub event_id: Uuid,
    pub deliveries: usize,
    pub at: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryStatus {
    Pending,
    Delivered,
    Failed,
}

/// One HTTP attempt of a delivery.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    pub n: u32,
    pub started_at: u64,
    pub duration_ms: u64,
    /// The HTTP status, or 0 when there was no answer.
    pub code: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_body: Option<String>,
}

/// One event on its way to one subscription.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Delivery {
    pub id: Uuid,
    pub event_id: Uuid,
    pub event: String,
    pub subscription_id: Uuid,
    pub status: DeliveryStatus,
    pub created_at: u64,
    pub next_attempt_at: Option<u64>,
    #[serde(default)]
    pub ended_at: Option<u64>,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub attempts: Vec<Attempt>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn filter_matches_strings_and_numbers_alike() {
        let f = Filter {
            pipeline_id: Some(json!(752662)),
            status_id: Some(json!("142")),
        };
        let data = |v: Value| v.as_object().cloned().unwrap();
        assert!(f.matches(&data(json!({"pipeline_id": "752662", "status_id": 142}))));
        assert!(!f.matches(&data(json!({"pipeline_id": "752662", "status_id": 143}))));
        assert!(!f.matches(&data(json!({"pipeline_id": "752662"}))));
        assert!(Filter::default().matches(&data(json!({}))));
    }
}
