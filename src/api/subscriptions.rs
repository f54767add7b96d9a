//! `/v1/subscriptions`: the native subscription API (SPEC §5.2).

use super::{ApiError, Caller, body, parse_json_object, rfc3339};
use crate::App;
use crate::config::Role;
use crate::store::Subscription;
use crate::subscription::{SubscriptionError, SubscriptionInput};
use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde_json::{Value, json};
use std::sync::Arc;
use uuid::Uuid;

impl From<SubscriptionError> for ApiError {
    fn from(e: SubscriptionError) -> ApiError {
        match e {
            SubscriptionError::Invalid { .. } | SubscriptionError::LimitReached { .. } => {
                ApiError::unprocessable(e.to_string())
            }
            SubscriptionError::NotFound(_) => ApiError::not_found(e.to_string()),
            SubscriptionError::Store(e) => ApiError::internal(e),
        }
    }
}

/// The API view; the signing secret and header values only when `secrets` is set.
pub fn view(s: &Subscription, secrets: bool) -> Value {
    let headers: serde_json::Map<String, Value> = s
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), json!(if secrets { v.as_str() } else { "***" })))
        .collect();
    let mut v = json!({
        "id": s.id,
        "url": s.url,
        "events": s.events,
        "name": s.name,
        "format": s.format,
        "retry": s.retry,
        "filter": s.filter,
        "headers": headers,
        "timeout": s.timeout_ms.map(|ms| humantime::format_duration(std::time::Duration::from_millis(ms)).to_string()),
        "enabled": s.enabled,
        "disabled_reason": s.disabled_reason,
        "entity_name": s.entity_name,
        "field_map": s.field_map,
        "created_at": rfc3339(s.created_at),
        "updated_at": rfc3339(s.updated_at),
    });
    if secrets {
        v["secret"] = json!(s.secret);
    }
    v
}

fn parse_id(id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id).map_err(|_| ApiError::not_found(format!("no subscription with id {id}")))
}

pub async fn create(
    State(app): State<Arc<App>>,
    bytes: Result<Bytes, BytesRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let bytes = body(bytes, app.config.server.max_body)?;
    let input: SubscriptionInput = parse_json_object(&bytes)?;
    let sub = app.registry.create(input).await?;
    app.engine.sync_lane(&sub.id);
    Ok((StatusCode::CREATED, Json(view(&sub, true))))
}

pub async fn list(State(app): State<Arc<App>>) -> Json<Value> {
    let subs: Vec<Value> = app.registry.list().iter().map(|s| view(s, false)).collect();
    Json(json!({ "subscriptions": subs }))
}

pub async fn show(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let uuid = parse_id(&id)?;
    let sub = app
        .registry
        .get(&uuid)
        .ok_or_else(|| SubscriptionError::NotFound(id.clone()))?;
    Ok(Json(view(&sub, caller.0 == Role::Admin)))
}

pub async fn update(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    bytes: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let uuid = parse_id(&id)?;
    let bytes = body(bytes, app.config.server.max_body)?;
    let input: SubscriptionInput = parse_json_object(&bytes)?;
    let sub = app.registry.update(&uuid, input).await?;
    app.engine.sync_lane(&sub.id);
    Ok(Json(view(&sub, true)))
}

pub async fn delete(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let uuid = parse_id(&id)?;
    app.registry.delete(&uuid).await?;
    app.engine.sync_lane(&uuid);
    Ok(StatusCode::NO_CONTENT)
}
