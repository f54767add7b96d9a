//! `GET /v1/deliveries/{id}`: one delivery with its attempts (SPEC §5.4).

use super::{ApiError, rfc3339};
use crate::App;
use crate::store::{Delivery, DeliveryStatus};
use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use serde_json::{Value, json};
use std::sync::Arc;
use uuid::Uuid;

/// The API view of a delivery; `in_flight` while an attempt is under way.
pub fn view(d: &Delivery, in_flight: bool) -> Value {
    let status = match (d.status, in_flight) {
        (DeliveryStatus::Pending, true) => "in_flight",
        (DeliveryStatus::Pending, false) => "pending",
        (DeliveryStatus::Delivered, _) => "delivered",
        (DeliveryStatus::Failed, _) => "failed",
    };
    let attempts: Vec<Value> = d
        .attempts
        .iter()
        .map(|a| {
            let mut v = json!({
                "n": a.n,
                "started_at": rfc3339(a.started_at),
                "duration_ms": a.duration_ms,
                "code": a.code,
            });
            if let Some(e) = &a.error {
                v["error"] = json!(e);
            }
            if let Some(b) = &a.response_body {
                v["response_body"] = json!(b);
            }
            v
        })
        .collect();
    let mut v = json!({
        "id": d.id,
        "event_id": d.event_id,
        "event": d.event,
        "subscription_id": d.subscription_id,
        "status": status,
        "created_at": rfc3339(d.created_at),
        "next_attempt_at": if in_flight { None } else { d.next_attempt_at.map(rfc3339) },
        "attempts": attempts,
    });
    if let Some(e) = &d.error {
        v["error"] = json!(e);
    }
    v
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    status: Option<String>,
    subscription: Option<String>,
    event: Option<String>,
    since: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
}

/// `GET /v1/deliveries`: newest first, filtered, paginated by cursor.
pub async fn list(
    State(app): State<Arc<App>>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let status = match q.status.as_deref() {
        None | Some("") => None,
        Some(s @ ("pending" | "in_flight" | "delivered" | "failed")) => Some(s.to_string()),
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "status {other:?} is not one of pending, in_flight, delivered, failed"
            )));
        }
    };
    let subscription = q
        .subscription
        .as_deref()
        .filter(|s| !s.is_empty())
        .map(|s| {
            Uuid::parse_str(s)
                .map_err(|_| ApiError::bad_request(format!("subscription {s:?} is not an id")))
        })
        .transpose()?;
    if let Some(e) = q.event.as_deref().filter(|e| !e.is_empty())
        && crate::event::EventName::parse(e).is_none()
    {
        return Err(ApiError::bad_request(crate::event::unknown_event_message(
            e,
        )));
    }
    let since = q
        .since
        .as_deref()
        .filter(|s| !s.is_empty())
        .map(|s| {
            humantime::parse_rfc3339_weak(s)
                .map(|t| {
                    t.duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_millis() as u64)
                        .unwrap_or(0)
                })
                .map_err(|e| {
                    ApiError::bad_request(format!("since {s:?} is not an RFC 3339 time: {e}"))
                })
        })
        .transpose()?;
    let cursor = q
        .cursor
        .as_deref()
        .filter(|s| !s.is_empty())
        .map(|s| {
            Uuid::parse_str(s)
                .map_err(|_| ApiError::bad_request(format!("cursor {s:?} is not valid")))
        })
        .transpose()?;
    let limit = q.limit.unwrap_or(50);
    if limit == 0 || limit > 1000 {
        return Err(ApiError::bad_request("limit must be between 1 and 1000"));
    }
    let store = &app.store;
    let in_flight_of = |d: &Delivery| {
        d.status == DeliveryStatus::Pending
            && store
                .is_in_flight(&d.subscription_id, &d.id)
                .unwrap_or(false)
    };
    let page = store
        .deliveries(cursor.as_ref(), limit, |d| {
            subscription.is_none_or(|s| d.subscription_id == s)
                && q.event
                    .as_deref()
                    .is_none_or(|e| e.is_empty() || d.event == e)
                && since.is_none_or(|t| d.created_at >= t)
                && status.as_deref().is_none_or(|s| {
                    let current = match d.status {
                        DeliveryStatus::Pending if in_flight_of(d) => "in_flight",
                        DeliveryStatus::Pending => "pending",
                        DeliveryStatus::Delivered => "delivered",
                        DeliveryStatus::Failed => "failed",
                    };
                    current == s
                })
        })
        .map_err(ApiError::internal)?;
    let next_cursor = (page.len() == limit).then(|| page.last().map(|d| d.id.to_string()));
    let items: Vec<Value> = page.iter().map(|d| view(d, in_flight_of(d))).collect();
    Ok(Json(
        json!({ "deliveries": items, "next_cursor": next_cursor.flatten() }),
    ))
}

pub async fn show(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let not_found = || ApiError::not_found(format!("no delivery with id {id}"));
    let uuid = Uuid::parse_str(&id).map_err(|_| not_found())?;
    let d = app
        .store
        .delivery(&uuid)
        .map_err(ApiError::internal)?
        .ok_or_else(not_found)?;
    let in_flight = d.status == DeliveryStatus::Pending
        && app
            .store
            .is_in_flight(&d.subscription_id, &d.id)
            .map_err(ApiError::internal)?;
    Ok(Json(view(&d, in_flight)))
}
