//! `/api/v4/webhooks`: amoCRM's v4 webhook API (SPEC §5.3). A webhook is addressed by its
//! `destination` URL; `settings` are its event names; `disabled` is the subscription's `enabled`
//! turned round. Errors are problem+json. Same store and limit as the native API.

use super::amocrm_v2::hal;
use super::form::parse_query;
use super::{ApiError, body, parse_json_object};
use crate::App;
use crate::store::Subscription;
use crate::subscription::{DestinationSettings, SubscriptionError};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;

/// The webhook object of the v4 API; times in Unix seconds.
fn webhook(app: &App, s: &Subscription) -> Value {
    json!({
        "id": s.id,
        "destination": s.url,
        "created_at": s.created_at / 1000,
        "updated_at": s.updated_at / 1000,
        "account_id": app.config.account.id,
        "created_by": 0,
        "sort": s.sort.unwrap_or(0),
        "disabled": !s.enabled,
        "settings": s.events,
    })
}

/// Registry errors in the v4 API's own words: `destination` and `settings` for `url` and
/// `events`.
fn v4_error(e: SubscriptionError) -> ApiError {
    match e {
        SubscriptionError::Invalid { field, message } => {
            let field = match field {
                "url" => "destination",
                "events" => "settings",
                other => other,
            };
            ApiError::unprocessable(format!("{field}: {message}"))
        }
        other => other.into(),
    }
}

/// `GET /api/v4/webhooks[?filter[destination]=URL]`: the webhooks by `sort`, then age; 204 when
/// there are none.
pub async fn list(
    State(app): State<Arc<App>>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let query = parse_query(query.as_deref().unwrap_or(""))?;
    let mut destination = None;
    if let Value::Object(q) = &query {
        for (k, v) in q {
            match (k.as_str(), v) {
                ("filter", Value::Object(f)) => {
                    for (fk, fv) in f {
                        match (fk.as_str(), fv) {
                            ("destination", Value::String(d)) => destination = Some(d.clone()),
                            ("destination", _) => {
                                return Err(ApiError::bad_request(
                                    "filter[destination] must be one URL",
                                ));
                            }
                            (other, _) => {
                                return Err(ApiError::bad_request(format!(
                                    "unknown filter {other:?}; the webhooks can be filtered by filter[destination]"
                                )));
                            }
                        }
                    }
                }
                (other, _) => {
                    return Err(ApiError::bad_request(format!(
                        "unknown query parameter {other:?}; the webhooks can be filtered by filter[destination]"
                    )));
                }
            }
        }
    }
    let mut subs = match &destination {
        Some(d) => app.registry.find_by_url(d),
        None => app.registry.list(),
    };
    if subs.is_empty() {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    subs.sort_by_key(|s| (s.sort.unwrap_or(0), s.created_at, s.id));
    let webhooks: Vec<Value> = subs.iter().map(|s| webhook(&app, s)).collect();
    Ok(hal(
        StatusCode::OK,
        json!({"_total_items": webhooks.len(), "_embedded": {"webhooks": webhooks}}),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WebhookInput {
    destination: String,
    settings: Vec<String>,
    #[serde(default)]
    sort: Option<i64>,
    #[serde(default)]
    disabled: Option<bool>,
}

/// A v4 body: a JSON object. One that is not JSON but looks like a form (as `curl -d a=b` or
/// PHP's `http_build_query` make) is told where forms go.
fn parse_v4<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    parse_json_object(bytes).map_err(|mut e| {
        let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
        let form = first.is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'%')
            && bytes.contains(&b'=');
        if e.status == StatusCode::BAD_REQUEST && form {
            e.detail.push_str(
                "; the v4 API takes a JSON body, and this one looks form-encoded (the v2 API takes forms: /api/v2/webhooks/subscribe and /unsubscribe)",
            );
        }
        e
    })
}

/// `POST /api/v4/webhooks`: creates the webhook of `destination`, or replaces its settings (and
/// `sort` and `disabled` when given); 200 with the webhook.
pub async fn put(
    State(app): State<Arc<App>>,
    bytes: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let bytes = body(bytes, app.config.server.max_body)?;
    let input: WebhookInput = parse_v4(&bytes)?;
    let sub = app
        .registry
        .put_destination(
            &input.destination,
            DestinationSettings {
                events: input.settings,
                sort: input.sort,
                disabled: input.disabled,
            },
        )
        .await
        .map_err(v4_error)?;
    app.engine.sync_lane(&sub.id);
    Ok(hal(StatusCode::OK, webhook(&app, &sub)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DestinationInput {
    destination: String,
}

/// `DELETE /api/v4/webhooks` `{"destination"}`: 204, or 404 when no webhook has it.
pub async fn delete(
    State(app): State<Arc<App>>,
    bytes: Result<Bytes, BytesRejection>,
) -> Result<StatusCode, ApiError> {
    let bytes = body(bytes, app.config.server.max_body)?;
    let input: DestinationInput = parse_v4(&bytes)?;
    let deleted = app
        .registry
        .delete_url(&input.destination)
        .await
        .map_err(v4_error)?;
    if deleted.is_empty() {
        return Err(ApiError::not_found(format!(
            "no webhook has the destination {}",
            input.destination
        )));
    }
    for id in &deleted {
        app.engine.sync_lane(id);
    }
    Ok(StatusCode::NO_CONTENT)
}
