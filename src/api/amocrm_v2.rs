//! `/api/v2/webhooks`: amoCRM's v2 webhook API (SPEC §5.3), so integrations written for amoCRM
//! subscribe and unsubscribe unchanged. Bodies are JSON or PHP `http_build_query` forms; each item
//! of a request succeeds or fails on its own (`result`, and an `error` that says why), and a body
//! that does not parse is a 400 problem. Same store and limit as the native API.

use super::form::parse_json_or_form;
use super::{ApiError, body};
use crate::App;
use crate::subscription::{SubscriptionError, UrlChange};
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};
use std::sync::Arc;

/// A HAL answer as amoCRM gives it: `application/hal+json` with `Runtime-Timestamp` (Unix seconds).
pub fn hal(status: StatusCode, body: Value) -> Response {
    let mut resp = (status, body.to_string()).into_response();
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/hal+json"),
    );
    headers.insert(
        "runtime-timestamp",
        HeaderValue::from(crate::subscription::now_ms() / 1000),
    );
    resp
}

fn answer(path: &str, method: &str, items: Vec<Value>) -> Response {
    hal(
        StatusCode::OK,
        json!({
            "_links": {"self": {"href": path, "method": method}},
            "_embedded": {"items": items},
        }),
    )
}

/// The items of `{"subscribe": [ … ]}` (or `unsubscribe`): 400 when the body is not that shape.
fn items(body: Value, key: &str) -> Result<Vec<Value>, ApiError> {
    let shape = format!("expected {{\"{key}\": [{{\"url\": …, \"events\": [ … ]}}, …]}}");
    let Value::Object(mut obj) = body else {
        return Err(ApiError::bad_request(format!(
            "the body must be an object; {shape}"
        )));
    };
    if let Some(other) = obj.keys().find(|k| *k != key) {
        return Err(ApiError::bad_request(format!(
            "unknown field {other:?}; {shape}"
        )));
    }
    match obj.remove(key) {
        None => Err(ApiError::bad_request(format!(
            "missing field \"{key}\"; {shape}"
        ))),
        Some(Value::Array(items)) if items.is_empty() => Err(ApiError::bad_request(format!(
            "\"{key}\" lists no items; {shape}"
        ))),
        Some(Value::Array(items)) => Ok(items),
        Some(_) => Err(ApiError::bad_request(format!(
            "\"{key}\" must be a list; {shape}"
        ))),
    }
}

/// One request item's `url` and `events`, or why the item is not valid. `url` is required unless
/// `url_optional`.
fn item_fields(item: &Value, url_optional: bool) -> Result<(Option<String>, Vec<String>), String> {
    let Value::Object(obj) = item else {
        return Err("the item must be an object {url, events}".into());
    };
    if let Some(other) = obj.keys().find(|k| !matches!(k.as_str(), "url" | "events")) {
        return Err(format!(
            "unknown field {other:?}; an item has \"url\" and \"events\""
        ));
    }
    let url = match obj.get("url") {
        Some(Value::String(u)) => Some(u.clone()),
        None if url_optional => None,
        None => return Err("url: is required".into()),
        Some(_) => return Err("url: must be a string".into()),
    };
    let events = match obj.get("events") {
        Some(Value::Array(list)) => list
            .iter()
            .map(|e| match e {
                Value::String(s) => Ok(s.clone()),
                other => Err(format!("events: {other} is not an event name")),
            })
            .collect::<Result<Vec<_>, _>>()?,
        None => return Err("events: is required (a list of event names)".into()),
        Some(_) => return Err("events: must be a list of event names".into()),
    };
    Ok((url, events))
}

/// `{"url", "result": true}` or `{"url", "result": false, "error"}`.
fn item_result(item: &Value, result: Result<(), String>) -> Value {
    let mut out = Map::new();
    out.insert(
        "url".into(),
        item.get("url").cloned().unwrap_or(Value::Null),
    );
    match result {
        Ok(()) => {
            out.insert("result".into(), Value::Bool(true));
        }
        Err(e) => {
            out.insert("result".into(), Value::Bool(false));
            out.insert("error".into(), Value::String(e));
        }
    }
    Value::Object(out)
}

fn describe(e: SubscriptionError) -> String {
    if let SubscriptionError::Store(err) = &e {
        tracing::error!(error = %err, "amoCRM v2 request failed");
    }
    e.to_string()
}

/// `POST /api/v2/webhooks/subscribe`: subscribes each item's URL to its events (adding them to
/// a URL already subscribed).
pub async fn subscribe(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    bytes: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let bytes = body(bytes, app.config.server.max_body)?;
    let items = items(parse_json_or_form(&headers, &bytes)?, "subscribe")?;
    let mut out = Vec::with_capacity(items.len());
    for item in &items {
        let result = match item_fields(item, false) {
            Err(e) => Err(e),
            Ok((url, events)) => {
                let url = url.expect("url is required here");
                match app.registry.subscribe_url(&url, &events).await {
                    Ok((sub, _created)) => {
                        app.engine.sync_lane(&sub.id);
                        Ok(())
                    }
                    Err(e) => Err(describe(e)),
                }
            }
        };
        out.push(item_result(item, result));
    }
    Ok(answer("/api/v2/webhooks/subscribe", "post", out))
}

/// `POST /api/v2/webhooks/unsubscribe`: removes each item's events from its URL, or from every
/// URL when the item has none; a subscription left without events is deleted.
pub async fn unsubscribe(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    bytes: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let bytes = body(bytes, app.config.server.max_body)?;
    let items = items(parse_json_or_form(&headers, &bytes)?, "unsubscribe")?;
    let mut out = Vec::with_capacity(items.len());
    for item in &items {
        let result = match item_fields(item, true) {
            Err(e) => Err(e),
            Ok((url, events)) => {
                match app.registry.unsubscribe_url(url.as_deref(), &events).await {
                    Ok(change) => {
                        sync(&app, &change);
                        if url.is_none() && change.touched().next().is_none() {
                            Err(format!("no URL is subscribed to {}", events.join(", ")))
                        } else {
                            Ok(())
                        }
                    }
                    Err(e) => Err(describe(e)),
                }
            }
        };
        out.push(item_result(item, result));
    }
    Ok(answer("/api/v2/webhooks/unsubscribe", "post", out))
}

fn sync(app: &Arc<App>, change: &UrlChange) {
    for id in change.touched() {
        app.engine.sync_lane(id);
    }
}

/// `GET /api/v2/webhooks`: every subscription as `{id, url, events}`.
pub async fn list(State(app): State<Arc<App>>) -> Response {
    let items = app
        .registry
        .list()
        .iter()
        .map(|s| json!({"id": s.id, "url": s.url, "events": s.events}))
        .collect();
    answer("/api/v2/webhooks", "get", items)
}
