//! `POST /v1/events`: intake over HTTP (SPEC §5.1).

use super::{ApiError, body, parse_json};
use crate::App;
use crate::intake::IntakeError;
use crate::intake::Receipt;
use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::Serialize;
use serde_json::Value;
use std::sync::Arc;

impl From<IntakeError> for ApiError {
    fn from(e: IntakeError) -> ApiError {
        match e {
            IntakeError::Invalid(_)
            | IntakeError::InvalidInBatch { .. }
            | IntakeError::EmptyBatch
            | IntakeError::EventsNotArray => ApiError::bad_request(e.to_string()),
            IntakeError::BatchTooLarge { .. } | IntakeError::EventTooLarge { .. } => {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, e.to_string())
            }
            IntakeError::ShuttingDown | IntakeError::Overloaded(_) => {
                let mut err = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string());
                err.retry_after = Some(5);
                err
            }
            IntakeError::Store(e) => ApiError::internal(e),
        }
    }
}

pub async fn create(
    State(app): State<Arc<App>>,
    bytes: Result<Bytes, BytesRejection>,
) -> Result<impl IntoResponse, ApiError> {
    if app.intake.is_closed() {
        return Err(IntakeError::ShuttingDown.into());
    }
    // The body is dropped before the flush is awaited: it is a slice of the connection's read
    // buffer, which hyper reuses for its next read only once nothing else holds it. Held across
    // the await, the connection's reads took a fresh 8 KiB buffer far more often (README,
    // Performance: the twentieth session).
    let value: Value = parse_json(&body(bytes, app.config.server.max_body)?)?;
    let events = app.intake.parse_body(value)?;
    let receipts = app.intake.accept(events).await?;
    Ok((StatusCode::ACCEPTED, Json(Receipts { events: receipts })))
}

/// The answer to `POST /v1/events`: `{"events": [{"id": …, "deliveries": …}]}`, serialized
/// straight from the receipts.
#[derive(Serialize)]
struct Receipts {
    events: Vec<Receipt>,
}
