//! Operations endpoints: `/healthz`, `/metrics` and the live stream `/v1/deliveries/stream`.

use super::ApiError;
use super::deliveries::parse_filters;
use crate::App;
use crate::ops::stream::{AttemptEvent, Outcome};
use crate::store::StatusFilter;
use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::Stream;
use serde_json::json;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;
use uuid::Uuid;

pub async fn healthz(State(app): State<Arc<App>>) -> Response {
    // Not ready for traffic while it finishes its last attempts before exiting.
    if app.intake.is_closed() {
        return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response();
    }
    let store = app.store.clone();
    let writable = tokio::task::spawn_blocking(move || store.writable())
        .await
        .unwrap_or(false);
    if writable {
        (
            StatusCode::OK,
            Json(json!({"status": "ok", "storage": "writable"})),
        )
            .into_response()
    } else {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "storage is not writable").into_response()
    }
}

pub async fn metrics(State(app): State<Arc<App>>) -> Response {
    let engine = app.engine.clone();
    let lag = tokio::task::spawn_blocking(move || engine.scheduler_lag())
        .await
        .unwrap_or_default();
    let body = app.metrics.render(app.registry.active_count(), lag);
    let mut resp = body.into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    resp
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamQuery {
    status: Option<String>,
    subscription: Option<String>,
    event: Option<String>,
}

/// Whether a stream event passes the filters; `pending` stands for the waiting outcomes.
fn passes(
    e: &AttemptEvent,
    status: Option<StatusFilter>,
    sub: Option<Uuid>,
    event: Option<&str>,
) -> bool {
    let status_ok = match status {
        None => true,
        Some(StatusFilter::InFlight) => e.outcome == Outcome::InFlight,
        Some(StatusFilter::Delivered) => e.outcome == Outcome::Delivered,
        Some(StatusFilter::Failed) => e.outcome == Outcome::Failed,
        Some(StatusFilter::Pending) => matches!(e.outcome, Outcome::Retrying | Outcome::Held),
    };
    status_ok && sub.is_none_or(|s| e.subscription_id == s) && event.is_none_or(|n| e.event == n)
}

/// `GET /v1/deliveries/stream`: server-sent events, one per attempt or state change.
pub async fn stream(
    State(app): State<Arc<App>>,
    query: Result<Query<StreamQuery>, QueryRejection>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let (status, sub, event) = parse_filters(
        q.status.as_deref(),
        q.subscription.as_deref(),
        q.event.as_deref(),
    )?;
    let rx = app.engine.stream().subscribe();
    // A stream ends when the daemon stops, so an open connection never holds it alive.
    let stop = app.stop.clone();
    let events = futures_util::stream::unfold(rx, move |mut rx| {
        let event = event.clone();
        let stop = stop.clone();
        async move {
            loop {
                let next = tokio::select! {
                    next = rx.recv() => next,
                    _ = stop.cancelled() => return None,
                };
                match next {
                    Ok(e) => {
                        if !passes(&e, status, sub, event.as_deref()) {
                            continue;
                        }
                        let data = serde_json::to_string(&*e).unwrap_or_default();
                        return Some((Ok(Event::default().event("attempt").data(data)), rx));
                    }
                    // Fell behind: dropped, so the engine never waits for a slow reader.
                    Err(RecvError::Lagged(_)) | Err(RecvError::Closed) => return None,
                }
            }
        }
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}
