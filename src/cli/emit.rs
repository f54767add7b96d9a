//! `dispatcher emit`: one event from the command line, or NDJSON events from stdin sent in
//! batches to `POST /v1/events` (SPEC §2, §5.1). Prints one receipt a line: the event's id and how
//! many deliveries it made.
//!
//! A batch is all-or-nothing on the daemon, so the client stops at the first batch that cannot be
//! sent (a line that is not a JSON object, or a batch the daemon refuses): the batches before it
//! were accepted and stay accepted, nothing from that batch on is sent, and the message says
//! from which line to resume.

use super::output::{count, note, print_line};
use super::{CliError, client::Client};
use clap::Args;
use serde_json::Value;
use std::io::IsTerminal;
use tokio::io::AsyncBufReadExt;

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  dispatcher emit status_lead --data '{\"id\": \"25399013\", \"status_id\": \"142\"}'
  dispatcher emit --batch 500 < events.ndjson     # one {\"event\", \"data\"} object a line")]
pub struct EmitArgs {
    /// The event name ({action}_{entity}, e.g. add_lead); without it, NDJSON events are read from
    /// stdin
    #[arg(requires = "data")]
    event: Option<String>,
    /// The event's data: a JSON object with an `id`
    #[arg(long, value_name = "JSON", requires = "event")]
    data: Option<String>,
    /// Idempotency key: the same key within 24 h is accepted once
    #[arg(long = "id", value_name = "KEY", requires = "event")]
    idempotency_key: Option<String>,
    /// Events per request when reading stdin
    #[arg(
        long,
        value_name = "N",
        default_value_t = 1000,
        value_parser = clap::value_parser!(u32).range(1..),
        conflicts_with = "event"
    )]
    batch: u32,
    /// Print the daemon's receipts as JSON, one a line
    #[arg(long)]
    json: bool,
}

pub async fn run(client: &Client, args: EmitArgs) -> Result<(), CliError> {
    match (&args.event, &args.data) {
        (Some(event), Some(data)) => {
            emit_one(
                client,
                event,
                data,
                args.idempotency_key.as_deref(),
                args.json,
            )
            .await
        }
        _ => emit_stdin(client, args.batch as usize, args.json).await,
    }
}

async fn emit_one(
    client: &Client,
    event: &str,
    data: &str,
    key: Option<&str>,
    json: bool,
) -> Result<(), CliError> {
    check_json(data).map_err(|why| CliError::Input(format!("--data is not JSON: {why}")))?;
    // The data goes out as given, byte for byte: its key order and numbers are the payload's.
    let mut body = format!(
        "{{\"event\":{},\"data\":{}",
        Value::from(event),
        data.trim()
    );
    if let Some(key) = key {
        body.push_str(&format!(",\"id\":{}", Value::from(key)));
    }
    body.push('}');
    let answer = client.post("/v1/events", body).await?;
    print_receipts(client, &answer, json)?;
    Ok(())
}

/// Whether `text` is one JSON value; the reason (with its column) when not.
fn check_json(text: &str) -> Result<(), String> {
    serde_json::from_str::<serde::de::IgnoredAny>(text)
        .map(|_| ())
        .map_err(|e| {
            let msg = e.to_string();
            // serde_json appends " at line L column C"; a one-line text needs only the column.
            let msg = msg
                .rfind(" at line ")
                .map_or(msg.as_str(), |i| &msg[..i])
                .to_string();
            format!("{msg} at column {}", e.column())
        })
}

/// Prints the receipts of one answer `{"events": [{id, deliveries}]}`; returns how many.
fn print_receipts(client: &Client, answer: &Value, json: bool) -> Result<usize, CliError> {
    let receipts = answer
        .get("events")
        .and_then(Value::as_array)
        .ok_or_else(|| CliError::BadAnswer {
            server: client.base().to_string(),
            what: "POST /v1/events".into(),
            reason: "no `events` list of receipts".into(),
        })?;
    for r in receipts {
        if json {
            print_line(&r.to_string())?;
        } else {
            let id = r.get("id").and_then(Value::as_str).unwrap_or("?");
            let n = r.get("deliveries").and_then(Value::as_u64).unwrap_or(0);
            print_line(&format!("{id}  {}", count(n, "delivery", "deliveries")))?;
        }
    }
    Ok(receipts.len())
}

/// The events read so far and what became of them, for the message when something stops us.
struct Progress {
    /// Events accepted by the daemon.
    accepted: usize,
    batches: usize,
    /// The first line of the batch being built (the line to resume from if it fails).
    batch_start: usize,
}

impl Progress {
    /// "lines 1–4 were sent and accepted (…); nothing from line 5 on was sent".
    fn fate(&self) -> String {
        if self.batches == 0 {
            return "nothing was sent".to_string();
        }
        format!(
            "lines 1-{} were sent and accepted ({} in {}); nothing from line {} on was sent (resume with `tail -n +{} FILE`)",
            self.batch_start - 1,
            count(self.accepted as u64, "event", "events"),
            count(self.batches as u64, "batch", "batches"),
            self.batch_start,
            self.batch_start,
        )
    }
}

async fn emit_stdin(client: &Client, batch: usize, json: bool) -> Result<(), CliError> {
    if std::io::stdin().is_terminal() {
        note("reading NDJSON events from stdin, one JSON object a line (Ctrl-D to end)");
    }
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut progress = Progress {
        accepted: 0,
        batches: 0,
        batch_start: 1,
    };
    // The events of the batch being built, as their text, and the line each came from.
    let mut events: Vec<String> = Vec::with_capacity(batch);
    let mut line_of: Vec<usize> = Vec::with_capacity(batch);
    let mut line_no = 0usize;
    loop {
        let line = match lines.next_line().await {
            Ok(Some(line)) => line,
            Ok(None) => break,
            Err(e) => {
                return Err(CliError::Input(format!(
                    "line {}: cannot read stdin: {e}; {}",
                    line_no + 1,
                    progress.fate()
                )));
            }
        };
        line_no += 1;
        let text = line.trim();
        if text.is_empty() {
            continue;
        }
        let why = match check_json(text) {
            Err(why) => Some(format!("not JSON: {why}")),
            Ok(()) if !text.starts_with('{') => Some(
                "an event must be a JSON object {\"event\": NAME, \"data\": {...}}".to_string(),
            ),
            Ok(()) => None,
        };
        if let Some(why) = why {
            return Err(CliError::Input(format!(
                "line {line_no}: {why}; {}",
                progress.fate()
            )));
        }
        events.push(text.to_string());
        line_of.push(line_no);
        if events.len() == batch {
            send_batch(client, &mut events, &mut line_of, &mut progress, json).await?;
            progress.batch_start = line_no + 1;
        }
    }
    if !events.is_empty() {
        send_batch(client, &mut events, &mut line_of, &mut progress, json).await?;
    } else if progress.batches == 0 {
        note("no events on stdin; nothing was sent");
    }
    Ok(())
}

async fn send_batch(
    client: &Client,
    events: &mut Vec<String>,
    line_of: &mut Vec<usize>,
    progress: &mut Progress,
    json: bool,
) -> Result<(), CliError> {
    let body = format!("{{\"events\":[{}]}}", events.join(","));
    let answer = match client.post("/v1/events", body).await {
        Ok(answer) => answer,
        Err(e) => return Err(batch_error(e, line_of, progress)),
    };
    progress.accepted += print_receipts(client, &answer, json)?;
    progress.batches += 1;
    events.clear();
    line_of.clear();
    Ok(())
}

/// A refused batch: the daemon names the bad event by its index in the batch ("event 2: …"),
/// which the message turns into the line it came from.
fn batch_error(e: CliError, line_of: &[usize], progress: &Progress) -> CliError {
    let fate = progress.fate();
    if let CliError::Refused { status, detail, .. } = &e
        && let Some(rest) = detail.strip_prefix("event ")
        && let Some((index, why)) = rest.split_once(": ")
        && let Ok(index) = index.parse::<usize>()
        && let Some(line) = line_of.get(index)
    {
        return CliError::Input(format!(
            "line {line}: the daemon refused the event ({status}): {why}; {fate}"
        ));
    }
    CliError::Input(format!("{e}; {fate}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_errors_name_the_column() {
        assert_eq!(check_json("{\"id\": 1}"), Ok(()));
        assert_eq!(
            check_json("{\"id\": }"),
            Err("expected value at column 8".to_string())
        );
        assert!(
            check_json("{} x")
                .unwrap_err()
                .contains("trailing characters")
        );
    }

    #[test]
    fn the_message_says_what_was_sent_and_where_to_resume() {
        let p = Progress {
            accepted: 0,
            batches: 0,
            batch_start: 1,
        };
        assert_eq!(p.fate(), "nothing was sent");
        let p = Progress {
            accepted: 4,
            batches: 2,
            batch_start: 6,
        };
        assert_eq!(
            p.fate(),
            "lines 1-5 were sent and accepted (4 events in 2 batches); nothing from line 6 on was sent (resume with `tail -n +6 FILE`)"
        );
    }

    #[test]
    fn a_refused_event_is_named_by_its_line() {
        let p = Progress {
            accepted: 2,
            batches: 1,
            batch_start: 3,
        };
        let e = CliError::Refused {
            status: reqwest::StatusCode::BAD_REQUEST,
            detail: "event 1: unknown event \"fly_lead\"".into(),
            hint: "",
        };
        let msg = batch_error(e, &[3, 5], &p).to_string();
        assert!(
            msg.starts_with(
                "line 5: the daemon refused the event (400 Bad Request): unknown event \"fly_lead\"; lines 1-2 were sent"
            ),
            "{msg}"
        );
    }
}
