//! Subscriptions: validation of what integrators send, the registry that enforces the limit of
//! active subscriptions, and the matcher that picks the subscriptions of each event.
//!
//! The registry keeps every subscription in memory (there are at most a few hundred) next to an
//! index from event name to subscriptions, rebuilt from sled at start and after every change.

mod amocrm;

pub use amocrm::{DestinationSettings, UrlChange};

use crate::delivery::guard::Guard;
use crate::delivery::retry::Policies;
use crate::event::{Event, EventName, unknown_event_message};
use crate::payload::{Format, creatio};
use crate::store::{DisabledReason, Filter, Store, StoreError, Subscription};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use uuid::Uuid;

/// Longest URL accepted (browsers and proxies commonly stop near here).
const MAX_URL_LEN: usize = 2048;
/// Headers the dispatcher sets itself; a subscription may not replace them.
const RESERVED_HEADERS: &[&str] = &[
    "content-type",
    "content-length",
    "host",
    "transfer-encoding",
    "connection",
    "user-agent",
    "x-request-id",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
];

#[derive(Debug, thiserror::Error)]
pub enum SubscriptionError {
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error(
        "the limit of {limit} active subscriptions is reached (limits.max_subscriptions); disable or delete one first"
    )]
    LimitReached { limit: usize },
    #[error("no subscription with id {0}")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn invalid(field: &'static str, message: impl Into<String>) -> SubscriptionError {
    SubscriptionError::Invalid {
        field,
        message: message.into(),
    }
}

/// The fields of a create or update request (SPEC §5.2); every one optional here, `url` and
/// `events` are required on create. `null` for an optional field on update clears it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionInput {
    #[serde(default, deserialize_with = "not_null")]
    pub url: Option<String>,
    #[serde(default, deserialize_with = "not_null")]
    pub events: Option<Vec<String>>,
    #[serde(default, deserialize_with = "some")]
    pub name: Option<Option<String>>,
    #[serde(default, deserialize_with = "not_null")]
    pub format: Option<String>,
    #[serde(default, deserialize_with = "not_null")]
    pub retry: Option<String>,
    #[serde(default, deserialize_with = "some")]
    pub filter: Option<Option<Filter>>,
    #[serde(default, deserialize_with = "not_null")]
    pub headers: Option<BTreeMap<String, String>>,
    #[serde(default, deserialize_with = "some")]
    pub timeout: Option<Option<String>>,
    #[serde(default, deserialize_with = "not_null")]
    pub enabled: Option<bool>,
    #[serde(default, deserialize_with = "some")]
    pub entity_name: Option<Option<String>>,
    #[serde(default, deserialize_with = "some")]
    pub field_map: Option<Option<BTreeMap<String, String>>>,
}

/// A field that may be absent but not `null` (it has no "unset" state).
fn not_null<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

/// Tells a field that is present but `null` (Some(None)) from one that is absent (None).
fn some<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// Checks a destination URL: absolute http(s), a host, no fragment or credentials, and the SSRF
/// guard. Returns the normalised URL text.
pub async fn validate_url(raw: &str, guard: &Guard) -> Result<String, SubscriptionError> {
    let url = check_url_syntax(raw)?;
    guard
        .check_url(&url)
        .await
        .map_err(|e| invalid("url", e.to_string()))?;
    Ok(url.to_string())
}

/// The syntax rules of a destination URL. An internationalised host is accepted and kept in its
/// ASCII (punycode) form, as it goes on the wire; one that IDNA refuses is an error.
pub fn check_url_syntax(raw: &str) -> Result<url::Url, SubscriptionError> {
    if raw.len() > MAX_URL_LEN {
        return Err(invalid(
            "url",
            format!("is {} characters long; at most {MAX_URL_LEN}", raw.len()),
        ));
    }
    let url =
        url::Url::parse(raw).map_err(|e| invalid("url", format!("is not an absolute URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid(
            "url",
            format!(
                "scheme {:?} is not allowed; use http or https",
                url.scheme()
            ),
        ));
    }
    if url.host().is_none() {
        return Err(invalid("url", "has no host"));
    }
    if url.fragment().is_some() {
        return Err(invalid("url", "must not have a fragment (#…)"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid(
            "url",
            "must not carry credentials (user:password@); use `headers` for authentication",
        ));
    }
    Ok(url)
}

fn validate_events(events: &[String]) -> Result<Vec<String>, SubscriptionError> {
    if events.is_empty() {
        return Err(invalid("events", "must list at least one event"));
    }
    let mut out: Vec<String> = Vec::with_capacity(events.len());
    for e in events {
        if EventName::parse(e).is_none() {
            return Err(invalid("events", unknown_event_message(e)));
        }
        if !out.contains(e) {
            out.push(e.clone());
        }
    }
    Ok(out)
}

fn validate_headers(headers: &BTreeMap<String, String>) -> Result<(), SubscriptionError> {
    for (name, value) in headers {
        let hn = reqwest::header::HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| invalid("headers", format!("{name:?} is not a valid header name")))?;
        if RESERVED_HEADERS.contains(&hn.as_str()) {
            return Err(invalid(
                "headers",
                format!("{name:?} is set by the dispatcher and cannot be overridden"),
            ));
        }
        if reqwest::header::HeaderValue::from_str(value).is_err() {
            // The value is a secret: name the header, never echo the value.
            return Err(invalid(
                "headers",
                format!("the value of {name:?} is not a valid header value"),
            ));
        }
    }
    Ok(())
}

fn validate_timeout(raw: &str) -> Result<u64, SubscriptionError> {
    let d = humantime::parse_duration(raw).map_err(|e| {
        invalid(
            "timeout",
            format!("{raw:?} is not a duration like \"2s\": {e}"),
        )
    })?;
    if d.is_zero() || d > Duration::from_secs(60) {
        return Err(invalid("timeout", "must be more than 0 and at most 60s"));
    }
    Ok(d.as_millis() as u64)
}

/// The Creatio fields against the subscription as it will be stored: they belong to the Creatio
/// formats, and those need an object for every event.
fn check_creatio(sub: &Subscription) -> Result<(), SubscriptionError> {
    if sub.format.is_creatio() {
        return creatio::check_events(&sub.events, sub.entity_name.as_deref())
            .map_err(|m| invalid("entity_name", m));
    }
    for (field, set) in [
        ("entity_name", sub.entity_name.is_some()),
        ("field_map", sub.field_map.is_some()),
    ] {
        if set {
            return Err(invalid(
                field,
                format!(
                    "applies only to the formats creatio and creatio-form; the format is {:?}, so set {field} to null or choose a Creatio format",
                    sub.format.name()
                ),
            ));
        }
    }
    Ok(())
}

fn validate_filter(f: &Filter) -> Result<(), SubscriptionError> {
    for (name, v) in [("pipeline_id", &f.pipeline_id), ("status_id", &f.status_id)] {
        if let Some(v) = v
            && !matches!(v, Value::String(_) | Value::Number(_))
        {
            return Err(invalid(
                "filter",
                format!("{name} must be a number or a string"),
            ));
        }
    }
    Ok(())
}

fn new_secret() -> String {
    let key: [u8; 24] = rand::random();
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(key)
    )
}

/// A subscription with every default (amoCRM format and retry, enabled, a new secret), before its
/// URL and events are set.
fn blank_subscription() -> Subscription {
    let now = now_ms();
    Subscription {
        id: Uuid::now_v7(),
        url: String::new(),
        events: Vec::new(),
        name: None,
        format: Format::Amocrm,
        retry: "amocrm".into(),
        filter: None,
        headers: BTreeMap::new(),
        timeout_ms: None,
        enabled: true,
        disabled_reason: None,
        created_at: now,
        updated_at: now,
        secret: new_secret(),
        entity_name: None,
        field_map: None,
        sort: None,
        enabled_at: Some(now),
    }
}

/// A URL's text as subscriptions store it (the `url` crate's serialisation), to find the
/// subscriptions of a URL however the client wrote it; `None` when it does not parse.
pub fn normalise_url(raw: &str) -> Option<String> {
    url::Url::parse(raw).ok().map(|u| u.to_string())
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[derive(Default)]
struct Index {
    subs: HashMap<Uuid, Arc<Subscription>>,
    by_event: HashMap<String, Vec<Arc<Subscription>>>,
}

impl Index {
    fn build(subs: HashMap<Uuid, Arc<Subscription>>) -> Index {
        let mut by_event: HashMap<String, Vec<Arc<Subscription>>> = HashMap::new();
        for s in subs.values() {
            for e in &s.events {
                by_event.entry(e.clone()).or_default().push(s.clone());
            }
        }
        Index { subs, by_event }
    }
}

/// All subscriptions, their limit, and the matcher.
pub struct Registry {
    store: Store,
    metrics: Arc<crate::ops::metrics::Metrics>,
    guard: Arc<Guard>,
    policies: Policies,
    max_active: usize,
    index: RwLock<Arc<Index>>,
    /// Serialises changes, so the limit check and the write are one step.
    writer: tokio::sync::Mutex<()>,
    /// Intake holds this for reading from matching to writing its deliveries; a delete takes it for
    /// writing, so no delivery of a deleted subscription is written after its cleanup.
    intake_gate: tokio::sync::RwLock<()>,
}

impl Registry {
    pub fn load(
        store: Store,
        guard: Arc<Guard>,
        policies: Policies,
        max_active: usize,
        metrics: Arc<crate::ops::metrics::Metrics>,
    ) -> Result<Registry, StoreError> {
        let subs: HashMap<Uuid, Arc<Subscription>> = store
            .subscriptions()?
            .into_iter()
            .map(|s| (s.id, Arc::new(s)))
            .collect();
        for s in subs.values() {
            if policies.get(&s.retry).is_none() {
                tracing::warn!(
                    subscription = %s.id,
                    retry = %s.retry,
                    "the subscription's retry policy is no longer configured; its deliveries get one attempt until it is changed"
                );
            }
        }
        Ok(Registry {
            store,
            metrics,
            guard,
            policies,
            max_active,
            index: RwLock::new(Arc::new(Index::build(subs))),
            writer: tokio::sync::Mutex::new(()),
            intake_gate: tokio::sync::RwLock::new(()),
        })
    }

    fn snapshot(&self) -> Arc<Index> {
        self.index.read().expect("registry lock poisoned").clone()
    }

    /// Held by intake from matching an event to writing its deliveries.
    pub async fn intake_gate(&self) -> tokio::sync::RwLockReadGuard<'_, ()> {
        self.intake_gate.read().await
    }

    pub fn guard(&self) -> &Guard {
        &self.guard
    }

    pub fn policies(&self) -> &Policies {
        &self.policies
    }

    pub fn get(&self, id: &Uuid) -> Option<Arc<Subscription>> {
        self.snapshot().subs.get(id).cloned()
    }

    /// Every subscription, oldest first.
    pub fn list(&self) -> Vec<Arc<Subscription>> {
        let mut v: Vec<_> = self.snapshot().subs.values().cloned().collect();
        v.sort_by_key(|s| (s.created_at, s.id));
        v
    }

    pub fn active_count(&self) -> usize {
        self.snapshot().subs.values().filter(|s| s.enabled).count()
    }

    /// The subscriptions an event goes to: by name, then by filter. Disabled subscriptions match
    /// too: their deliveries are held until they are enabled again (SPEC §6).
    pub fn matching(&self, event: &Event) -> Vec<Arc<Subscription>> {
        let idx = self.snapshot();
        let name = event.name.to_string();
        idx.by_event
            .get(&name)
            .map(|subs| {
                subs.iter()
                    .filter(|s| s.accepts(&event.data))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    fn publish(&self, sub: Option<Arc<Subscription>>, removed: Option<Uuid>) {
        let mut guard = self.index.write().expect("registry lock poisoned");
        let mut subs = guard.subs.clone();
        if let Some(id) = removed {
            subs.remove(&id);
        }
        if let Some(s) = sub {
            subs.insert(s.id, s);
        }
        *guard = Arc::new(Index::build(subs));
    }

    /// Applies `input` onto `sub` (a new one or a copy of the stored one), validating each field.
    async fn apply(
        &self,
        sub: &mut Subscription,
        input: SubscriptionInput,
    ) -> Result<(), SubscriptionError> {
        if let Some(url) = input.url {
            sub.url = validate_url(&url, &self.guard).await?;
        }
        if let Some(events) = input.events {
            sub.events = validate_events(&events)?;
        }
        if let Some(name) = input.name {
            if let Some(n) = &name {
                if n.chars().count() > 255 {
                    return Err(invalid("name", "is longer than 255 characters"));
                }
                // A blank name shows as nothing in listings and names nothing on the CLI.
                if n.trim().is_empty() {
                    return Err(invalid(
                        "name",
                        "is blank; null is a subscription without a name",
                    ));
                }
            }
            sub.name = name;
        }
        if let Some(f) = input.format {
            sub.format = Format::parse(&f).ok_or_else(|| {
                invalid(
                    "format",
                    format!("unknown format {f:?}; valid formats are: {}", Format::NAMES),
                )
            })?;
        }
        if let Some(r) = input.retry {
            if self.policies.get(&r).is_none() {
                return Err(invalid(
                    "retry",
                    format!(
                        "unknown retry policy {r:?}; valid policies are: {}",
                        self.policies.names().join(", ")
                    ),
                ));
            }
            sub.retry = r;
        }
        if let Some(filter) = input.filter {
            if let Some(f) = &filter {
                validate_filter(f)?;
            }
            sub.filter = filter.filter(|f| !f.is_empty());
        }
        if let Some(h) = input.headers {
            validate_headers(&h)?;
            sub.headers = h;
        }
        if let Some(t) = input.timeout {
            sub.timeout_ms = t.as_deref().map(validate_timeout).transpose()?;
        }
        if let Some(e) = input.entity_name {
            if let Some(name) = &e {
                creatio::check_entity_name(name).map_err(|m| invalid("entity_name", m))?;
            }
            sub.entity_name = e;
        }
        if let Some(m) = input.field_map {
            if let Some(map) = &m {
                creatio::check_field_map(map).map_err(|m| invalid("field_map", m))?;
            }
            sub.field_map = m;
        }
        check_creatio(sub)?;
        if let Some(enabled) = input.enabled
            && enabled != sub.enabled
        {
            sub.enabled = enabled;
            sub.disabled_reason = (!enabled).then_some(DisabledReason::Admin);
        }
        Ok(())
    }

    fn check_limit(&self, id: Option<Uuid>) -> Result<(), SubscriptionError> {
        let idx = self.snapshot();
        let others = idx
            .subs
            .values()
            .filter(|s| s.enabled && Some(s.id) != id)
            .count();
        if others >= self.max_active {
            return Err(SubscriptionError::LimitReached {
                limit: self.max_active,
            });
        }
        Ok(())
    }

    pub async fn create(
        &self,
        input: SubscriptionInput,
    ) -> Result<Arc<Subscription>, SubscriptionError> {
        if input.url.is_none() {
            return Err(invalid("url", "is required"));
        }
        if input.events.is_none() {
            return Err(invalid("events", "is required"));
        }
        let mut sub = blank_subscription();
        self.apply(&mut sub, input).await?;
        let _w = self.writer.lock().await;
        self.insert_locked(sub).await
    }

    /// Stores a new subscription; the writer lock is held.
    async fn insert_locked(
        &self,
        sub: Subscription,
    ) -> Result<Arc<Subscription>, SubscriptionError> {
        if sub.enabled {
            self.check_limit(None)?;
        }
        self.store.put_subscription(&sub)?;
        self.store.flush().await?;
        let sub = Arc::new(sub);
        self.publish(Some(sub.clone()), None);
        Ok(sub)
    }

    pub async fn update(
        &self,
        id: &Uuid,
        input: SubscriptionInput,
    ) -> Result<Arc<Subscription>, SubscriptionError> {
        let current = self
            .get(id)
            .ok_or_else(|| SubscriptionError::NotFound(id.to_string()))?;
        let mut sub = (*current).clone();
        self.apply(&mut sub, input).await?;
        self.replace(sub).await
    }

    /// Enables or disables a subscription (the disable rule, `410 Gone`, or an admin).
    pub async fn set_enabled(
        &self,
        id: &Uuid,
        enabled: bool,
        reason: Option<DisabledReason>,
    ) -> Result<Arc<Subscription>, SubscriptionError> {
        let current = self
            .get(id)
            .ok_or_else(|| SubscriptionError::NotFound(id.to_string()))?;
        let mut sub = (*current).clone();
        sub.enabled = enabled;
        sub.disabled_reason = if enabled { None } else { reason };
        self.replace(sub).await
    }

    async fn replace(&self, sub: Subscription) -> Result<Arc<Subscription>, SubscriptionError> {
        let _w = self.writer.lock().await;
        self.replace_locked(sub).await
    }

    /// Stores a changed subscription; the writer lock is held.
    async fn replace_locked(
        &self,
        mut sub: Subscription,
    ) -> Result<Arc<Subscription>, SubscriptionError> {
        let Some(current) = self.get(&sub.id) else {
            return Err(SubscriptionError::NotFound(sub.id.to_string()));
        };
        sub.updated_at = now_ms();
        if sub.enabled && !current.enabled {
            self.check_limit(Some(sub.id))?;
            // Enabled again: the disable rule's failure window starts afresh.
            sub.enabled_at = Some(sub.updated_at);
        }
        self.store.put_subscription(&sub)?;
        self.store.flush().await?;
        let sub = Arc::new(sub);
        self.publish(Some(sub.clone()), None);
        Ok(sub)
    }

    /// Deletes a subscription; its waiting deliveries end as `failed` ("subscription deleted").
    pub async fn delete(&self, id: &Uuid) -> Result<(), SubscriptionError> {
        let _w = self.writer.lock().await;
        self.delete_locked(id).await
    }

    /// Deletes a subscription; the writer lock is held.
    async fn delete_locked(&self, id: &Uuid) -> Result<(), SubscriptionError> {
        if self.get(id).is_none() {
            return Err(SubscriptionError::NotFound(id.to_string()));
        }
        // Unpublish first and wait out intake in progress, so that no delivery is written for it
        // after its cleanup.
        self.publish(None, Some(*id));
        drop(self.intake_gate.write().await);
        let ended = self
            .store
            .delete_subscription(id, "subscription deleted", now_ms())
            .await?;
        self.metrics.pending_changed(-(ended as i64));
        self.store.flush().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_syntax() {
        let ok = check_url_syntax("https://пример.испытание/hook?a=1").unwrap();
        assert_eq!(
            ok.as_str(),
            "https://xn--e1afmkfd.xn--80akhbyknj4f/hook?a=1"
        );
        assert_eq!(
            check_url_syntax("HTTP://Example.COM:80/x")
                .unwrap()
                .as_str(),
            "http://example.com/x"
        );
        for bad in [
            "/relative",
            "ftp://example.com/",
            "https://example.com/#frag",
            "https://alice:s3cr3t@example.com/",
            "https://exa mple.com/",
            "https://xn--/",
            "https://a..b\u{0}/",
            "mailto:a@example.com",
        ] {
            let err = check_url_syntax(bad).expect_err(bad).to_string();
            assert!(err.starts_with("url: "), "{bad}: {err}");
            assert!(!err.contains("s3cr3t"), "{err}");
        }
        let long = format!("https://example.com/{}", "a".repeat(2100));
        assert!(
            check_url_syntax(&long)
                .unwrap_err()
                .to_string()
                .contains("2048")
        );
    }
}
