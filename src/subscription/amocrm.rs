//! The registry's operations for the amoCRM-compatible APIs (SPEC §5.3), which address
//! subscriptions by URL rather than by id: v2 adds and removes events of a URL, v4 creates or
//! replaces the settings of a destination and deletes by destination.
//!
//! A URL may have several subscriptions when the native API made them; by-URL changes apply to
//! all of them, except that adding events (v2) and replacing settings (v4) change the oldest.

use super::{
    Registry, SubscriptionError, blank_subscription, invalid, normalise_url, validate_events,
    validate_url,
};
use crate::store::{DisabledReason, Subscription};
use std::sync::Arc;
use uuid::Uuid;

/// What changed for a by-URL request: the subscriptions to bring the delivery lanes in line with.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct UrlChange {
    pub changed: Vec<Uuid>,
    pub deleted: Vec<Uuid>,
}

impl UrlChange {
    pub fn touched(&self) -> impl Iterator<Item = &Uuid> {
        self.changed.iter().chain(&self.deleted)
    }
}

/// The v4 settings of a destination: its events, and `sort` and `disabled` when given.
#[derive(Debug, Clone, Default)]
pub struct DestinationSettings {
    pub events: Vec<String>,
    pub sort: Option<i64>,
    pub disabled: Option<bool>,
}

impl Registry {
    /// The subscriptions of `url` (however the client wrote it), oldest first.
    pub fn find_by_url(&self, url: &str) -> Vec<Arc<Subscription>> {
        let Some(url) = normalise_url(url) else {
            return Vec::new();
        };
        self.list().into_iter().filter(|s| s.url == url).collect()
    }

    /// amoCRM v2 `subscribe`: adds `events` to the subscription of `url`, or creates one with the
    /// defaults (enabled, subject to the limit). A disabled subscription stays disabled. Returns
    /// the subscription and whether it was created.
    pub async fn subscribe_url(
        &self,
        url: &str,
        events: &[String],
    ) -> Result<(Arc<Subscription>, bool), SubscriptionError> {
        let url = validate_url(url, &self.guard).await?;
        let events = validate_events(events)?;
        let _w = self.writer.lock().await;
        if let Some(current) = self.find_by_url(&url).into_iter().next() {
            let mut sub = (*current).clone();
            for e in events {
                if !sub.events.contains(&e) {
                    sub.events.push(e);
                }
            }
            return Ok((self.replace_locked(sub).await?, false));
        }
        let mut sub = blank_subscription();
        sub.url = url;
        sub.events = events;
        Ok((self.insert_locked(sub).await?, true))
    }

    /// amoCRM v2 `unsubscribe`: removes `events` from the subscriptions of `url`, or of every URL
    /// when `url` is `None`; a subscription left without events is deleted (its waiting
    /// deliveries end as `failed`). A `url` with no subscription is an error.
    pub async fn unsubscribe_url(
        &self,
        url: Option<&str>,
        events: &[String],
    ) -> Result<UrlChange, SubscriptionError> {
        let events = validate_events(events)?;
        let _w = self.writer.lock().await;
        let subs = match url {
            Some(u) => {
                let subs = self.find_by_url(u);
                if subs.is_empty() {
                    return Err(invalid("url", format!("{u} is not subscribed")));
                }
                subs
            }
            None => self.list(),
        };
        let mut change = UrlChange::default();
        for current in subs {
            if !current.events.iter().any(|e| events.contains(e)) {
                continue;
            }
            let mut sub = (*current).clone();
            sub.events.retain(|e| !events.contains(e));
            if sub.events.is_empty() {
                self.delete_locked(&sub.id).await?;
                change.deleted.push(sub.id);
            } else {
                self.replace_locked(sub).await?;
                change.changed.push(current.id);
            }
        }
        Ok(change)
    }

    /// amoCRM v4 `POST /api/v4/webhooks`: replaces the events of the subscription of `url` (and
    /// its `sort` and enabled state when given), or creates one. `disabled: false` enables a
    /// subscription whatever disabled it, subject to the limit.
    pub async fn put_destination(
        &self,
        url: &str,
        settings: DestinationSettings,
    ) -> Result<Arc<Subscription>, SubscriptionError> {
        let url = validate_url(url, &self.guard).await?;
        let events = validate_events(&settings.events)?;
        let _w = self.writer.lock().await;
        let existing = self.find_by_url(&url).into_iter().next();
        let mut sub = match &existing {
            Some(current) => (**current).clone(),
            None => {
                let mut sub = blank_subscription();
                sub.url = url;
                sub
            }
        };
        sub.events = events;
        if settings.sort.is_some() {
            sub.sort = settings.sort;
        }
        match settings.disabled {
            Some(true) if sub.enabled => {
                sub.enabled = false;
                sub.disabled_reason = Some(DisabledReason::Admin);
            }
            Some(false) if !sub.enabled => {
                sub.enabled = true;
                sub.disabled_reason = None;
            }
            _ => {}
        }
        match existing {
            Some(_) => self.replace_locked(sub).await,
            None => self.insert_locked(sub).await,
        }
    }

    /// amoCRM v4 `DELETE /api/v4/webhooks`: deletes every subscription of `url`; their waiting
    /// deliveries end as `failed`. Returns the ids deleted (none: there was no such destination).
    pub async fn delete_url(&self, url: &str) -> Result<Vec<Uuid>, SubscriptionError> {
        let _w = self.writer.lock().await;
        let mut deleted = Vec::new();
        for sub in self.find_by_url(url) {
            self.delete_locked(&sub.id).await?;
            deleted.push(sub.id);
        }
        Ok(deleted)
    }
}
