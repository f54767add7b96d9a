//! Events and the entity × action catalogue (SPEC §4).
//!
//! An event is `{"event": NAME, "data": {…}, "id"?, "account"?}` where NAME is `{action}_{entity}`.
//! This module owns the catalogue, validation of incoming events, and the amoCRM payload structure
//! `{payload_key: {action: [data]}, account: {…}}` that every format encodes.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The entities amoCRM sends webhooks about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Entity {
    Lead,
    Contact,
    Company,
    Customer,
    Task,
    Talk,
    Message,
}

impl Entity {
    pub const ALL: [Entity; 7] = [
        Entity::Lead,
        Entity::Contact,
        Entity::Company,
        Entity::Customer,
        Entity::Task,
        Entity::Talk,
        Entity::Message,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Entity::Lead => "lead",
            Entity::Contact => "contact",
            Entity::Company => "company",
            Entity::Customer => "customer",
            Entity::Task => "task",
            Entity::Talk => "talk",
            Entity::Message => "message",
        }
    }

    /// The top-level key amoCRM puts the items under; companies travel under `contacts`.
    pub fn payload_key(self) -> &'static str {
        match self {
            Entity::Lead => "leads",
            Entity::Contact | Entity::Company => "contacts",
            Entity::Customer => "customers",
            Entity::Task => "task",
            Entity::Talk => "talk",
            Entity::Message => "message",
        }
    }

    pub fn actions(self) -> &'static [&'static str] {
        match self {
            Entity::Lead => &[
                "add",
                "update",
                "delete",
                "restore",
                "status",
                "responsible",
                "note",
                "mail_in",
                "call_in",
                "chat",
                "site_visit",
            ],
            Entity::Contact | Entity::Company => {
                &["add", "update", "delete", "restore", "responsible", "note"]
            }
            Entity::Customer => &[
                "add",
                "update",
                "delete",
                "responsible",
                "note",
                "period",
                "mail_in",
                "call_in",
                "chat",
                "site_visit",
            ],
            Entity::Task => &["add", "update", "delete", "responsible"],
            Entity::Talk => &["add", "update"],
            Entity::Message => &["add"],
        }
    }

    /// The `type` amoCRM adds to items sent under `contacts`.
    fn contact_type(self) -> Option<&'static str> {
        match self {
            Entity::Contact => Some("contact"),
            Entity::Company => Some("company"),
            _ => None,
        }
    }
}

/// A valid event name from the catalogue, e.g. `status_lead` or `mail_in_customer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EventName {
    pub entity: Entity,
    pub action: &'static str,
}

impl EventName {
    /// Looks a name up in the catalogue; `None` when it is not one of [`all_event_names`].
    pub fn parse(name: &str) -> Option<EventName> {
        Entity::ALL.iter().find_map(|&entity| {
            let action = name.strip_suffix(entity.name())?.strip_suffix('_')?;
            let action = entity.actions().iter().find(|a| **a == action)?;
            Some(EventName { entity, action })
        })
    }
}

impl std::fmt::Display for EventName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}_{}", self.action, self.entity.name())
    }
}

impl Serialize for EventName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for EventName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        EventName::parse(&name)
            .ok_or_else(|| serde::de::Error::custom(unknown_event_message(&name)))
    }
}

/// Every name of the catalogue, entity by entity.
pub fn all_event_names() -> Vec<String> {
    Entity::ALL
        .iter()
        .flat_map(|e| e.actions().iter().map(move |a| format!("{a}_{}", e.name())))
        .collect()
}

pub fn unknown_event_message(name: &str) -> String {
    format!(
        "unknown event {name:?}; valid events are: {}",
        all_event_names().join(", ")
    )
}

/// Why an incoming event was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum EventError {
    #[error("an event must be a JSON object")]
    NotAnObject,
    #[error("missing field \"event\"")]
    MissingName,
    #[error("\"event\" must be a string")]
    NameNotString,
    #[error("{}", unknown_event_message(.0))]
    UnknownEvent(String),
    #[error("missing field \"data\"")]
    MissingData,
    #[error("\"data\" must be an object")]
    DataNotObject,
    #[error("\"data\" must have an \"id\" (a non-empty string or a number)")]
    MissingId,
    #[error("\"id\" must be a non-empty string of at most 255 characters")]
    BadClientId,
    #[error("\"account\" must be an object")]
    AccountNotObject,
    #[error("unknown field {0:?} (an event has \"event\", \"data\", \"id\" and \"account\")")]
    UnknownField(String),
}

/// A validated event as accepted by intake.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The client's idempotency key, if it sent one.
    pub client_id: Option<String>,
    pub name: EventName,
    /// The item, in the key order the client gave, with `type` added for contacts and companies.
    pub data: Map<String, Value>,
    /// Overrides the configured account block when present.
    pub account: Option<Map<String, Value>>,
}

impl Event {
    /// Validates one event object against the catalogue (SPEC §4).
    pub fn from_value(value: Value) -> Result<Event, EventError> {
        let Value::Object(mut obj) = value else {
            return Err(EventError::NotAnObject);
        };
        if let Some(key) = obj
            .keys()
            .find(|k| !matches!(k.as_str(), "event" | "data" | "id" | "account"))
        {
            return Err(EventError::UnknownField(key.clone()));
        }
        let name = match obj.remove("event") {
            None => return Err(EventError::MissingName),
            Some(Value::String(s)) => EventName::parse(&s).ok_or(EventError::UnknownEvent(s))?,
            Some(_) => return Err(EventError::NameNotString),
        };
        let mut data = match obj.remove("data") {
            None => return Err(EventError::MissingData),
            Some(Value::Object(m)) => m,
            Some(_) => return Err(EventError::DataNotObject),
        };
        match data.get("id") {
            Some(Value::String(s)) if !s.is_empty() => {}
            Some(Value::Number(_)) => {}
            _ => return Err(EventError::MissingId),
        }
        let client_id = match obj.remove("id") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if !s.is_empty() && s.len() <= 255 => Some(s),
            Some(_) => return Err(EventError::BadClientId),
        };
        let account = match obj.remove("account") {
            None | Some(Value::Null) => None,
            Some(Value::Object(m)) => Some(m),
            Some(_) => return Err(EventError::AccountNotObject),
        };
        if let Some(kind) = name.entity.contact_type()
            && !data.contains_key("type")
        {
            data.insert("type".into(), Value::String(kind.into()));
        }
        Ok(Event {
            client_id,
            name,
            data,
            account,
        })
    }

    /// The item's `id` as text, for logs and listings.
    pub fn item_id(&self) -> String {
        match self.data.get("id") {
            Some(Value::String(s)) => s.clone(),
            Some(v) => v.to_string(),
            None => String::new(),
        }
    }

    /// `{payload_key: {action: [data]}, account: {…}}`, the structure of the `amocrm` and `json`
    /// formats (SPEC §7). `default_account` is used when the event brings no account block.
    pub fn payload(&self, default_account: &Map<String, Value>) -> Value {
        let mut by_action = Map::new();
        by_action.insert(
            self.name.action.to_string(),
            Value::Array(vec![Value::Object(self.data.clone())]),
        );
        let mut root = Map::new();
        root.insert(
            self.name.entity.payload_key().to_string(),
            Value::Object(by_action),
        );
        let account = self.account.as_ref().unwrap_or(default_account);
        root.insert("account".into(), Value::Object(account.clone()));
        Value::Object(root)
    }

    /// The stored form, as [`Event::to_value`] gives it, to serialise without copying the event.
    pub fn stored(&self) -> StoredForm<'_> {
        StoredForm(self)
    }

    /// The stored form: the event object as a client would send it (with `type` added).
    pub fn to_value(&self) -> Value {
        let mut obj = Map::new();
        obj.insert("event".into(), Value::String(self.name.to_string()));
        obj.insert("data".into(), Value::Object(self.data.clone()));
        if let Some(id) = &self.client_id {
            obj.insert("id".into(), Value::String(id.clone()));
        }
        if let Some(acc) = &self.account {
            obj.insert("account".into(), Value::Object(acc.clone()));
        }
        Value::Object(obj)
    }
}

/// An event's stored form (see [`Event::stored`]): `{"event", "data", "id"?, "account"?}`.
pub struct StoredForm<'a>(&'a Event);

impl Serialize for StoredForm<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let e = self.0;
        let fields = 2 + usize::from(e.client_id.is_some()) + usize::from(e.account.is_some());
        let mut map = s.serialize_map(Some(fields))?;
        map.serialize_entry("event", &e.name)?;
        map.serialize_entry("data", &e.data)?;
        if let Some(id) = &e.client_id {
            map.serialize_entry("id", id)?;
        }
        if let Some(account) = &e.account {
            map.serialize_entry("account", account)?;
        }
        map.end()
    }
}

/// The configured account block: `{subdomain, id, _links: {self}}`.
pub fn account_block(subdomain: &str, id: &Value, link: &str) -> Map<String, Value> {
    let mut links = Map::new();
    links.insert("self".into(), Value::String(link.to_string()));
    let mut acc = Map::new();
    acc.insert("subdomain".into(), Value::String(subdomain.to_string()));
    acc.insert("id".into(), id.clone());
    acc.insert("_links".into(), Value::Object(links));
    acc
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_every_catalogue_name_and_nothing_else() {
        let names = all_event_names();
        assert_eq!(names.len(), 11 + 6 + 6 + 10 + 4 + 2 + 1);
        for n in &names {
            let parsed = EventName::parse(n).unwrap_or_else(|| panic!("{n} must parse"));
            assert_eq!(&parsed.to_string(), n);
        }
        for bad in [
            "",
            "lead",
            "_lead",
            "status",
            "status_contact",
            "period_lead",
            "add_leads",
            "Add_lead",
            "add_lead ",
            "mail_in",
            "in_lead",
        ] {
            assert!(EventName::parse(bad).is_none(), "{bad:?} must not parse");
        }
        let n = EventName::parse("site_visit_customer").unwrap();
        assert_eq!((n.entity, n.action), (Entity::Customer, "site_visit"));
    }

    #[test]
    fn validates_events() {
        let ok = Event::from_value(json!({"event": "add_lead", "data": {"id": 1}})).unwrap();
        assert_eq!(ok.name.to_string(), "add_lead");
        let cases = [
            (json!([]), EventError::NotAnObject),
            (json!({"data": {"id": 1}}), EventError::MissingName),
            (
                json!({"event": 5, "data": {"id": 1}}),
                EventError::NameNotString,
            ),
            (
                json!({"event": "fly_lead", "data": {"id": 1}}),
                EventError::UnknownEvent("fly_lead".into()),
            ),
            (json!({"event": "add_lead"}), EventError::MissingData),
            (
                json!({"event": "add_lead", "data": [1]}),
                EventError::DataNotObject,
            ),
            (
                json!({"event": "add_lead", "data": {"name": "x"}}),
                EventError::MissingId,
            ),
            (
                json!({"event": "add_lead", "data": {"id": ""}}),
                EventError::MissingId,
            ),
            (
                json!({"event": "add_lead", "data": {"id": null}}),
                EventError::MissingId,
            ),
            (
                json!({"event": "add_lead", "data": {"id": 1}, "id": 7}),
                EventError::BadClientId,
            ),
            (
                json!({"event": "add_lead", "data": {"id": 1}, "account": "x"}),
                EventError::AccountNotObject,
            ),
            (
                json!({"event": "add_lead", "data": {"id": 1}, "extra": 1}),
                EventError::UnknownField("extra".into()),
            ),
        ];
        for (input, want) in cases {
            assert_eq!(Event::from_value(input.clone()), Err(want), "{input}");
        }
    }

    #[test]
    fn contacts_and_companies_get_their_type_last() {
        let c = Event::from_value(json!({"event": "add_contact", "data": {"id": 1, "name": "a"}}))
            .unwrap();
        assert_eq!(
            serde_json::to_string(&c.data).unwrap(),
            r#"{"id":1,"name":"a","type":"contact"}"#
        );
        let co = Event::from_value(json!({"event": "update_company", "data": {"id": 2}})).unwrap();
        assert_eq!(co.data["type"], "company");
        let keep = Event::from_value(
            json!({"event": "add_contact", "data": {"id": 1, "type": "company"}}),
        )
        .unwrap();
        assert_eq!(keep.data["type"], "company");
        let lead = Event::from_value(json!({"event": "add_lead", "data": {"id": 1}})).unwrap();
        assert!(!lead.data.contains_key("type"));
    }

    #[test]
    fn payload_has_amocrm_shape() {
        let acc = account_block("test", &json!("7039099"), "https://test.amocrm.ru");
        let e = Event::from_value(
            json!({"event": "status_lead", "data": {"id": "25399013", "status_id": "142"}}),
        )
        .unwrap();
        assert_eq!(
            serde_json::to_string(&e.payload(&acc)).unwrap(),
            r#"{"leads":{"status":[{"id":"25399013","status_id":"142"}]},"account":{"subdomain":"test","id":"7039099","_links":{"self":"https://test.amocrm.ru"}}}"#
        );
        let company = Event::from_value(
            json!({"event": "add_company", "data": {"id": 3}, "account": {"id": 9}}),
        )
        .unwrap();
        assert_eq!(
            company.payload(&acc),
            json!({"contacts": {"add": [{"id": 3, "type": "company"}]}, "account": {"id": 9}})
        );
    }
}
