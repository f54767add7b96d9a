//! `GET /v1/deliveries/{id}`: one delivery with its attempts (SPEC §5.4).

use super::{ApiError, rfc3339};
use crate::App;
use crate::store::{Delivery, DeliveryQuery, DeliveryStatus, StatusFilter};
use crate::subscription::now_ms;
use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
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

/// The filters shared by the listing and the stream: status, subscription, event name.
pub type Filters = (Option<StatusFilter>, Option<Uuid>, Option<String>);

/// Parses the filters shared by the listing and the stream.
pub fn parse_filters(
    status: Option<&str>,
    subscription: Option<&str>,
    event: Option<&str>,
) -> Result<Filters, ApiError> {
    let status = match status.filter(|s| !s.is_empty()) {
        None => None,
        Some("pending") => Some(StatusFilter::Pending),
        Some("in_flight") => Some(StatusFilter::InFlight),
        Some("delivered") => Some(StatusFilter::Delivered),
        Some("failed") => Some(StatusFilter::Failed),
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "status {other:?} is not one of pending, in_flight, delivered, failed"
            )));
        }
    };
    let subscription = subscription
        .filter(|s| !s.is_empty())
        .map(|s| {
            Uuid::parse_str(s)
                .map_err(|_| ApiError::bad_request(format!("subscription {s:?} is not an id")))
        })
        .transpose()?;
    let event = match event.filter(|e| !e.is_empty()) {
        Some(e) if crate::event::EventName::parse(e).is_none() => {
            return Err(ApiError::bad_request(crate::event::unknown_event_message(
                e,
            )));
        }
        e => e.map(str::to_string),
    };
    Ok((status, subscription, event))
}

/// An RFC 3339 time as milliseconds since the epoch, or a 400 naming `field`.
pub fn parse_time(field: &str, s: &str) -> Result<u64, ApiError> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|e| {
            ApiError::bad_request(format!(
                "{field} {s:?} is not an RFC 3339 time like 2026-01-31T12:00:00Z: {e}"
            ))
        })?;
    Ok(u64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(0))
}

/// `GET /v1/deliveries`: newest first, filtered, paginated by cursor.
pub async fn list(
    State(app): State<Arc<App>>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let (status, subscription, event) = parse_filters(
        q.status.as_deref(),
        q.subscription.as_deref(),
        q.event.as_deref(),
    )?;
    let since_ms = q
        .since
        .as_deref()
        .filter(|s| !s.is_empty())
        .map(|s| parse_time("since", s))
        .transpose()?;
    let before = q
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
    let store = app.store.clone();
    let query = DeliveryQuery {
        status,
        subscription,
        event,
        since_ms,
        before,
        limit,
    };
    // A listing walks sled: keep it off the async workers.
    let (page, items) = tokio::task::spawn_blocking(move || {
        let page = store.deliveries(&query)?;
        let items: Vec<Value> = page
            .deliveries
            .iter()
            .map(|d| {
                let in_flight = d.status == DeliveryStatus::Pending && store.is_in_flight(&d.id);
                view(d, in_flight)
            })
            .collect();
        Ok::<_, crate::store::StoreError>((page.next, items))
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(ApiError::internal)?;
    Ok(Json(json!({ "deliveries": items, "next_cursor": page })))
}

/// Redeliver and recover promise attempts now, which a daemon finishing its last attempts
/// before it exits does not make: 503 with `Retry-After`, as intake answers then.
fn refuse_while_shutting_down(app: &App) -> Result<(), ApiError> {
    if app.intake.is_closed() {
        return Err(crate::intake::IntakeError::ShuttingDown.into());
    }
    Ok(())
}

/// `POST /v1/deliveries/{id}/redeliver`: a fresh attempt now, whatever the status.
pub async fn redeliver(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let not_found = || ApiError::not_found(format!("no delivery with id {id}"));
    let uuid = Uuid::parse_str(&id).map_err(|_| not_found())?;
    refuse_while_shutting_down(&app)?;
    let current = app
        .store
        .delivery(&uuid)
        .map_err(ApiError::internal)?
        .ok_or_else(not_found)?;
    if app.registry.get(&current.subscription_id).is_none() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "the delivery's subscription was deleted",
        ));
    }
    let d = match app
        .store
        .redeliver(&uuid, now_ms())
        .await
        .map_err(ApiError::internal)?
    {
        None => return Err(not_found()),
        Some(Err(msg)) => return Err(ApiError::new(StatusCode::CONFLICT, msg)),
        Some(Ok(d)) => d,
    };
    app.store.flush().await.map_err(ApiError::internal)?;
    if current.status != DeliveryStatus::Pending {
        app.metrics.pending_changed(1);
    }
    app.engine.wake(&d.subscription_id);
    Ok((StatusCode::ACCEPTED, Json(view(&d, false))))
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
    let in_flight = d.status == DeliveryStatus::Pending && app.store.is_in_flight(&d.id);
    Ok(Json(view(&d, in_flight)))
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecoverBody {
    since: String,
}

/// `POST /v1/subscriptions/{id}/recover {"since"}`: redelivers every `failed` delivery of the
/// subscription created since then.
pub async fn recover(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    bytes: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let not_found = || ApiError::not_found(format!("no subscription with id {id}"));
    let sub = Uuid::parse_str(&id).map_err(|_| not_found())?;
    if app.registry.get(&sub).is_none() {
        return Err(not_found());
    }
    refuse_while_shutting_down(&app)?;
    let bytes = super::body(bytes, app.config.server.max_body)?;
    let body: RecoverBody = super::parse_json_object(&bytes)?;
    // A value in the body that does not fit is 422, as a missing one is (in a query, 400).
    let since = parse_time("since", &body.since).map_err(|mut e| {
        e.status = StatusCode::UNPROCESSABLE_ENTITY;
        e
    })?;
    let scheduled = app
        .store
        .recover(&sub, since, now_ms())
        .await
        .map_err(ApiError::internal)?;
    app.store.flush().await.map_err(ApiError::internal)?;
    app.metrics.pending_changed(scheduled as i64);
    app.engine.wake(&sub);
    Ok(Json(json!({ "scheduled": scheduled })))
}
