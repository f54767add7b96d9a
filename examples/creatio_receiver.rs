//! A Creatio-style webhook receiver: try a `creatio` or `creatio-form` subscription (its
//! `entity_name` and `field_map`) here before pointing it at a real Creatio.
//!
//! Like Creatio's webhook service it takes `POST /webhooks/{API_KEY}`, always answers 200, and
//! stores each request as a row of Creatio's `Webhook` table: the raw body (`RequestBody`),
//! `QueryParameters`, `Headers` and `ContentType`, with `Status` `New`. It then parses the row as
//! Creatio does — a flat JSON object or `multipart/form-data` naming its object in `EntityName` —
//! and sets `Status` to `Done` with the record Creatio would create (`EntityName`, `Record`), or to
//! `Failed` with the parse error in `ErrorMessage`. Each finished row is printed, and
//! `GET /webhooks` lists them all as JSON.
//!
//! ```sh
//! cargo run --example creatio_receiver -- 9100                        # any object accepted
//! cargo run --example creatio_receiver -- 9100 --entities Lead,Contact # only these objects
//! # subscribe http://127.0.0.1:9100/webhooks/test-key with "format": "creatio" or "creatio-form"
//! curl -s localhost:9100/webhooks
//! ```
//!
//! `--entities` plays the part of Creatio's "Webhook entities" lookup (out of the box it lists
//! `Contact`, `Lead`, `Order` and `FormSubmit`; `Account` or `Activity` must be added there).
//!
//! The error texts follow the conditions Creatio's documentation gives (only JSON and FormData
//! bodies are parsed; `EntityName` names the object); their wording is this example's.

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::routing::{get, post};
use serde::Serialize;
use serde_json::{Map, Value};
use std::sync::{Arc, Mutex};
use uuid::Uuid;

/// The error of a body that names no object.
pub const NO_ENTITY_NAME: &str = "The EntityName parameter is not found in the webhook body";

/// The error of a body Creatio does not parse.
pub fn unsupported_content_type(content_type: &str) -> String {
    format!(
        "The {content_type:?} content type is not supported. Supported content types: application/json, multipart/form-data"
    )
}

/// Where a webhook is in its life (Creatio's "Webhook status" lookup).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Status {
    New,
    Done,
    Failed,
}

/// One row of the `Webhook` table, plus what parsing made of it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Webhook {
    pub id: Uuid,
    pub created_on: String,
    pub status: Status,
    pub request_body: String,
    pub query_parameters: Map<String, Value>,
    pub headers: Map<String, Value>,
    pub content_type: String,
    /// The object code the body named (rows that reached parsing).
    pub entity_name: Option<String>,
    /// The columns of the record Creatio would create (`Done` rows).
    pub record: Option<Map<String, Value>>,
    pub error_message: Option<String>,
}

/// The stored rows and the registered objects.
pub struct Sink {
    rows: Mutex<Vec<Webhook>>,
    /// `None`: every object is accepted.
    entities: Option<Vec<String>>,
}

impl Sink {
    pub fn new(entities: Option<Vec<String>>) -> Arc<Sink> {
        Arc::new(Sink {
            rows: Mutex::new(Vec::new()),
            entities,
        })
    }

    pub fn rows(&self) -> Vec<Webhook> {
        self.rows.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn update(&self, id: Uuid, f: impl FnOnce(&mut Webhook)) -> Option<(usize, Webhook)> {
        let mut rows = self.rows.lock().unwrap_or_else(|e| e.into_inner());
        let (n, row) = rows.iter_mut().enumerate().find(|(_, r)| r.id == id)?;
        f(row);
        Some((n + 1, row.clone()))
    }
}

/// `POST /webhooks/{api_key}` stores, `GET /webhooks` lists.
pub fn router(sink: Arc<Sink>) -> Router {
    Router::new()
        .route("/webhooks", get(list))
        .route("/webhooks/{api_key}", post(receive))
        .with_state(sink)
}

async fn list(State(sink): State<Arc<Sink>>) -> axum::Json<Value> {
    axum::Json(serde_json::json!({ "webhooks": sink.rows() }))
}

async fn receive(
    State(sink): State<Arc<Sink>>,
    Path(_api_key): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_default();
    let query_parameters = url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
        .map(|(k, v)| (k.into_owned(), Value::String(v.into_owned())))
        .collect();
    let mut header_map = Map::new();
    for (name, value) in &headers {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        match header_map.get_mut(name.as_str()) {
            Some(Value::String(prev)) => {
                prev.push_str(", ");
                prev.push_str(&value);
            }
            _ => {
                header_map.insert(name.as_str().to_string(), Value::String(value));
            }
        }
    }
    let row = Webhook {
        id: Uuid::new_v4(),
        created_on: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
        status: Status::New,
        request_body: String::from_utf8_lossy(&body).into_owned(),
        query_parameters,
        headers: header_map,
        content_type: content_type.clone(),
        entity_name: None,
        record: None,
        error_message: None,
    };
    let id = row.id;
    sink.rows
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(row);
    // Creatio answers at once and parses stored webhooks afterwards.
    tokio::spawn(async move {
        let parsed = parse(&content_type, body, sink.entities.as_deref()).await;
        let finished = sink.update(id, |row| match parsed {
            Ok((entity, record)) => {
                row.status = Status::Done;
                row.entity_name = Some(entity);
                row.record = Some(record);
            }
            Err(message) => {
                row.status = Status::Failed;
                row.error_message = Some(message);
            }
        });
        if let Some((n, row)) = finished {
            print_row(n, &row);
        }
    });
    StatusCode::OK
}

fn print_row(n: usize, row: &Webhook) {
    let what = match (&row.record, &row.error_message) {
        (Some(record), _) => serde_json::to_string(record).unwrap_or_default(),
        (None, Some(e)) => e.clone(),
        (None, None) => String::new(),
    };
    println!(
        "#{n} {:?} {} [{}]\n{}\n",
        row.status,
        row.entity_name.as_deref().unwrap_or("-"),
        row.content_type,
        what
    );
}

/// Parses a body as Creatio does: the object code and the columns, or the error message.
pub async fn parse(
    content_type: &str,
    body: Bytes,
    entities: Option<&[String]>,
) -> Result<(String, Map<String, Value>), String> {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let mut fields = match essence.as_str() {
        "application/json" => json_fields(&body)?,
        "multipart/form-data" => form_fields(content_type, body).await?,
        _ => return Err(unsupported_content_type(content_type)),
    };
    let entity = match fields.remove("EntityName") {
        Some(Value::String(s)) if !s.trim().is_empty() => s,
        _ => return Err(NO_ENTITY_NAME.to_string()),
    };
    if let Some(registered) = entities
        && !registered.contains(&entity)
    {
        return Err(format!(
            "The {entity:?} object is not registered in the Webhook entities lookup"
        ));
    }
    if let Some((name, _)) = fields.iter().find(|(_, v)| v.is_array() || v.is_object()) {
        return Err(format!(
            "The {name:?} parameter holds a nested value; a webhook maps flat parameters to columns"
        ));
    }
    Ok((entity, fields))
}

fn json_fields(body: &[u8]) -> Result<Map<String, Value>, String> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| format!("The webhook body is not valid JSON: {e}"))?;
    let Value::Object(fields) = value else {
        return Err("The webhook body is not a JSON object".to_string());
    };
    Ok(fields)
}

async fn form_fields(content_type: &str, body: Bytes) -> Result<Map<String, Value>, String> {
    let bad = |e: multer::Error| format!("The webhook body is not valid multipart/form-data: {e}");
    let boundary = multer::parse_boundary(content_type).map_err(bad)?;
    let stream = futures_util::stream::once(async move { Ok::<Bytes, std::io::Error>(body) });
    let mut multipart = multer::Multipart::new(stream, boundary);
    let mut fields = Map::new();
    while let Some(field) = multipart.next_field().await.map_err(bad)? {
        // Files are attachments, not columns.
        let Some(name) = field.name().filter(|_| field.file_name().is_none()) else {
            continue;
        };
        let name = name.to_string();
        let text = field.text().await.map_err(bad)?;
        fields.insert(name, Value::String(text));
    }
    Ok(fields)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut port: u16 = 9100;
    let mut entities = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--entities" => {
                let list = args
                    .next()
                    .ok_or_else(|| anyhow::anyhow!("--entities needs a list: Lead,Contact"))?;
                entities = Some(list.split(',').map(|s| s.trim().to_string()).collect());
            }
            other => port = other.parse()?,
        }
    }
    let sink = Sink::new(entities);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    println!(
        "Creatio-style receiver: POST http://127.0.0.1:{port}/webhooks/{{API_KEY}}, rows at GET http://127.0.0.1:{port}/webhooks"
    );
    axum::serve(listener, router(sink)).await?;
    Ok(())
}
