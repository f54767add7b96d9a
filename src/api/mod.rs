//! The HTTP API (axum): one module per resource, wired here with the body limit, the token check
//! and problem+json errors (SPEC §5).

mod amocrm_v2;
mod amocrm_v4;
mod deliveries;
mod events;
mod form;
mod ops;
mod subscriptions;

use crate::App;
use crate::config::Role;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::de::DeserializeOwned;
use serde_json::json;
use std::sync::Arc;

/// An RFC 9457 problem: `{type, title, status, detail}` as `application/problem+json`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub detail: String,
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, detail: impl Into<String>) -> ApiError {
        ApiError {
            status,
            detail: detail.into(),
            retry_after: None,
        }
    }
    pub fn bad_request(detail: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, detail)
    }
    pub fn unprocessable(detail: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, detail)
    }
    pub fn not_found(detail: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, detail)
    }
    pub fn internal(err: impl std::fmt::Display) -> ApiError {
        tracing::error!(error = %err, "request failed");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, err.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({
            "type": "about:blank",
            "title": self.status.canonical_reason().unwrap_or("Error"),
            "status": self.status.as_u16(),
            "detail": self.detail,
        });
        let mut resp = (self.status, body.to_string()).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

/// A request body, or the problem that stopped it being read (413 over `max_body`).
pub fn body(bytes: Result<Bytes, BytesRejection>, max_body: u64) -> Result<Bytes, ApiError> {
    bytes.map_err(|r| {
        let status = r.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                status,
                format!("the request body is larger than server.max_body ({max_body} bytes)"),
            )
        } else {
            ApiError::new(status, format!("cannot read the request body: {r}"))
        }
    })
}

/// Parses a JSON body into `T`, with a detail that names the field at fault.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request(
            "the request body is empty; expected JSON",
        ));
    }
    // Parsed without keeping track of the path first: a body that parses (most of them) costs one
    // plain parse; only one that does not is parsed again to name where it went wrong.
    if let Ok(value) = serde_json::from_slice(bytes) {
        return Ok(value);
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut *de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let status = if inner.is_data() {
            StatusCode::UNPROCESSABLE_ENTITY
        } else {
            StatusCode::BAD_REQUEST
        };
        let detail = if inner.is_syntax() || inner.is_eof() {
            format!("invalid JSON: {inner}")
        } else if path == "." {
            // Valid JSON that does not fit, as a whole: "missing field `settings`".
            without_position(&inner)
        } else {
            format!("{path}: {}", without_position(&inner))
        };
        ApiError::new(status, detail)
    })?;
    // Text after the JSON value makes the body invalid as a whole.
    de.end()
        .map_err(|e| ApiError::bad_request(format!("invalid JSON: {e}")))?;
    Ok(value)
}

/// serde's message without the position it ends with: the path names the place of a value that
/// does not fit, and a missing field has no place.
fn without_position(e: &serde_json::Error) -> String {
    let text = e.to_string();
    let position = format!(" at line {} column {}", e.line(), e.column());
    match text.strip_suffix(&position) {
        Some(message) => message.to_string(),
        None => text,
    }
}

/// [`parse_json`] for a body that must be a JSON object: serde would take an array for a struct,
/// field by field, and then name a field the array never had.
pub fn parse_json_object<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if first.is_some_and(|b| *b != b'{') {
        // Invalid JSON is said first (`[1,`), then the kind of value it is.
        let kind = match parse_json::<serde_json::Value>(bytes)? {
            serde_json::Value::Array(_) => "an array",
            serde_json::Value::String(_) => "a string",
            serde_json::Value::Number(_) => "a number",
            serde_json::Value::Bool(_) => "a boolean",
            serde_json::Value::Null => "null",
            // Not reached (it does not start with `{`); parsed as the object it would be.
            serde_json::Value::Object(_) => return parse_json(bytes),
        };
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("the request body must be a JSON object, not {kind}"),
        ));
    }
    parse_json(bytes)
}

/// A time in milliseconds since the epoch as RFC 3339 (UTC, millisecond precision).
pub fn rfc3339(ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_millis(t).to_string()
}

/// The role a request needs: `None` for /healthz.
fn required_role(method: &Method, path: &str) -> Option<Role> {
    if path == "/healthz" {
        None
    } else if method == Method::GET || method == Method::HEAD {
        Some(Role::Reader)
    } else if method == Method::POST && path == "/v1/events" {
        Some(Role::Emitter)
    } else {
        Some(Role::Admin)
    }
}

/// The role a request carries; every request is admin when no tokens are configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller(pub Role);

async fn authenticate(
    State(app): State<Arc<App>>,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let tokens = &app.config.api.tokens;
    let role = if tokens.is_empty() {
        Role::Admin
    } else {
        let presented = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                // The scheme is case-insensitive (RFC 9110 §11.1).
                let (scheme, token) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then_some(token)
            })
            .map(str::trim);
        let found = presented.and_then(|p| {
            // Compare against every token without stopping early, in constant time each.
            let mut hit = None;
            for t in tokens {
                if constant_time_eq(t.token.as_bytes(), p.as_bytes()) {
                    hit = Some(t.role);
                }
            }
            hit
        });
        match (found, required_role(req.method(), req.uri().path())) {
            (_, None) => Role::Admin,
            (None, Some(_)) => {
                let mut e = ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "a valid token is required: send `Authorization: Bearer <token>`",
                );
                e.retry_after = None;
                return Err(e);
            }
            (Some(role), Some(need)) => {
                let allowed = role == Role::Admin || role == need;
                if !allowed {
                    return Err(ApiError::new(
                        StatusCode::FORBIDDEN,
                        format!(
                            "this token's role ({role:?}) may not {} {}",
                            req.method(),
                            req.uri().path()
                        )
                        .to_lowercase(),
                    ));
                }
                role
            }
        }
    };
    req.extensions_mut().insert(Caller(role));
    Ok(next.run(req).await)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such endpoint")
}

async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not allowed on {}", uri.path()),
    )
}

/// The whole API.
pub fn router(app: Arc<App>) -> Router {
    let max_body = app.config.server.max_body as usize;
    Router::new()
        .route("/v1/events", post(events::create))
        .route(
            "/v1/subscriptions",
            post(subscriptions::create).get(subscriptions::list),
        )
        .route(
            "/v1/subscriptions/{id}",
            get(subscriptions::show)
                .patch(subscriptions::update)
                .delete(subscriptions::delete),
        )
        .route("/v1/subscriptions/{id}/recover", post(deliveries::recover))
        .route("/api/v2/webhooks", get(amocrm_v2::list))
        .route("/api/v2/webhooks/subscribe", post(amocrm_v2::subscribe))
        .route("/api/v2/webhooks/unsubscribe", post(amocrm_v2::unsubscribe))
        .route(
            "/api/v4/webhooks",
            get(amocrm_v4::list)
                .post(amocrm_v4::put)
                .delete(amocrm_v4::delete),
        )
        .route("/v1/deliveries", get(deliveries::list))
        .route("/v1/deliveries/stream", get(ops::stream))
        .route("/v1/deliveries/{id}", get(deliveries::show))
        .route("/v1/deliveries/{id}/redeliver", post(deliveries::redeliver))
        .route("/healthz", get(ops::healthz))
        .route("/metrics", get(ops::metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(app.clone(), authenticate))
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(app)
}
