//! `dispatcher tail`: follows `GET /v1/deliveries/stream` (server-sent events, SPEC §5.4) like
//! `tail -f`, one line per attempt as it ends, or with `--json` the stream's objects one a line,
//! exactly as the daemon sends them.
//!
//! When the connection drops (the daemon restarts, or dropped us for reading too slowly), tail
//! says so on stderr and reconnects with a growing backoff; events published while it was away
//! are not replayed (the stream has no history), so nothing is printed twice. The first
//! connection is not retried: a daemon that is not there at the start is more likely a wrong
//! `--server` than a restart.

use super::output::{
    code_style, note, paint, parse_time, print_line, short_duration, status_style, style,
};
use super::sse::SseParser;
use super::{CliError, FilterArgs, StatusFilter, client::Client, pairs};
use clap::Args;
use futures_util::StreamExt;
use serde_json::Value;
use std::time::{Duration, SystemTime};

/// The first wait before reconnecting, doubled up to [`MAX_BACKOFF`] while the daemon stays away.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

#[derive(Debug, Args)]
#[command(after_help = "Lines look like:
  13:42:03Z  status_lead  billing  api.example.org    1/5  500   132ms  retrying   next in 5m
  (time UTC, event, subscription, destination host, attempt n of max, code, latency, outcome,
  next attempt). Attempts starting (in_flight) are shown with --status in_flight or --json.
When the daemon restarts, tail reconnects; what happened meanwhile is not replayed.")]
pub struct TailArgs {
    #[command(flatten)]
    filters: FilterArgs,
    /// Print the stream's JSON objects, one a line, exactly as the daemon sends them
    #[arg(long)]
    json: bool,
}

pub async fn run(client: &Client, args: TailArgs, color: bool) -> Result<(), CliError> {
    let query = args.filters.query(client).await?;
    let url = client.url("/v1/deliveries/stream", &pairs(&query));
    let mut printer = Printer {
        json: args.json,
        color,
        in_flight: args.filters.status == Some(StatusFilter::InFlight),
        widths: Widths::default(),
    };
    let mut connected_before = false;
    let mut backoff = FIRST_BACKOFF;
    loop {
        match client
            .open_stream("/v1/deliveries/stream", &pairs(&query))
            .await
        {
            Ok(resp) => {
                if connected_before {
                    note(&format!("reconnected to {url}"));
                } else {
                    note(&format!("following {url} (Ctrl-C to stop)"));
                }
                connected_before = true;
                backoff = FIRST_BACKOFF;
                let why = follow(resp, &mut printer).await?;
                note(&format!("lost the stream ({why}); reconnecting"));
            }
            // A refusal (a bad filter, a token no longer valid) will not heal by retrying.
            Err(e @ CliError::Refused { status, .. }) if status.is_client_error() => return Err(e),
            Err(e) if !connected_before => return Err(e),
            // The daemon is still away: keep trying quietly.
            Err(_) => {}
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Reads one connection's events until it ends; returns why it ended. Only a closed stdout is an
/// error.
async fn follow(resp: reqwest::Response, printer: &mut Printer) -> Result<String, CliError> {
    let mut body = resp.bytes_stream();
    let mut parser = SseParser::new();
    loop {
        match body.next().await {
            Some(Ok(chunk)) => {
                for event in parser.feed(&chunk) {
                    printer.print(&event.data)?;
                }
            }
            Some(Err(e)) if e.is_timeout() => {
                return Ok(format!(
                    "nothing heard for {}",
                    short_duration(super::client::STREAM_IDLE_TIMEOUT)
                ));
            }
            // The daemon went away mid-stream (hyper says "unexpected EOF during chunk size
            // line"): what a person needs to know is that the connection closed.
            Some(Err(e)) if e.is_body() || e.is_decode() => {
                return Ok("the connection closed".to_string());
            }
            Some(Err(e)) => return Ok(super::client::transport_reason(&e)),
            // A daemon shutting down, or dropping this reader for falling behind.
            None => return Ok("the daemon closed it".to_string()),
        }
    }
}

/// Column widths that only grow, so that lines stay aligned as wider values turn up.
#[derive(Debug)]
struct Widths {
    event: usize,
    name: usize,
    host: usize,
    code: usize,
}

impl Default for Widths {
    fn default() -> Widths {
        Widths {
            event: 11,
            name: 8,
            host: 9,
            code: 3,
        }
    }
}

struct Printer {
    json: bool,
    color: bool,
    /// Whether to print the `in_flight` events (an attempt starting) as lines.
    in_flight: bool,
    widths: Widths,
}

impl Printer {
    fn print(&mut self, data: &str) -> Result<(), CliError> {
        if self.json {
            // The daemon's object as it is; one that spans lines is joined onto one.
            if data.contains('\n') {
                if let Ok(v) = serde_json::from_str::<Value>(data) {
                    return print_line(&v.to_string());
                }
                return print_line(&data.replace('\n', " "));
            }
            return print_line(data);
        }
        let Ok(event) = serde_json::from_str::<Value>(data) else {
            note(&format!("an event that is not JSON: {data}"));
            return Ok(());
        };
        if event.get("outcome").and_then(Value::as_str) == Some("in_flight") && !self.in_flight {
            return Ok(());
        }
        print_line(&format_line(&event, &mut self.widths, self.color))
    }
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

/// `{at} {event} {subscription} {host} {n}/{max} {code} {latency} {outcome} {next}`.
fn format_line(e: &Value, w: &mut Widths, color: bool) -> String {
    let at = parse_time(str_of(e, "at"));
    let time = at.map_or_else(
        || str_of(e, "at").to_string(),
        |t| {
            let full = humantime::format_rfc3339_seconds(t).to_string();
            // 2025-06-01T10:42:07Z -> 10:42:07Z
            full.split_once('T')
                .map_or(full.clone(), |(_, time)| time.to_string())
        },
    );
    let event = str_of(e, "event");
    let name = e
        .get("subscription_name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| str_of(e, "subscription_id"));
    let host = str_of(e, "host");
    let n = e.get("attempt").and_then(Value::as_u64).unwrap_or(0);
    let max = e.get("max_attempts").and_then(Value::as_u64).unwrap_or(0);
    let code = e.get("code").and_then(Value::as_u64);
    let code_text = match code {
        None => "-".to_string(),
        Some(0) => "no answer".to_string(),
        Some(c) => c.to_string(),
    };
    let latency = e
        .get("duration_ms")
        .and_then(Value::as_u64)
        .map_or("-".to_string(), |ms| {
            short_duration(Duration::from_millis(ms))
        });
    let outcome = str_of(e, "outcome");
    let next = match outcome {
        "retrying" => match e
            .get("next_attempt_at")
            .and_then(Value::as_str)
            .and_then(parse_time)
        {
            // Counted from the attempt's end, as the policy counts it: "next in 5m".
            Some(next) => {
                let from = at.unwrap_or_else(SystemTime::now);
                format!(
                    "next in {}",
                    short_duration(next.duration_since(from).unwrap_or_default())
                )
            }
            None => String::new(),
        },
        "held" => "subscription disabled: held until it is enabled".to_string(),
        "failed" => "no more attempts".to_string(),
        _ => String::new(),
    };

    w.event = w.event.max(event.chars().count());
    w.name = w.name.max(name.chars().count());
    w.host = w.host.max(host.chars().count());
    w.code = w.code.max(code_text.chars().count());
    let pad = |text: &str, width: usize| {
        let fill = width.saturating_sub(text.chars().count());
        format!("{text}{}", " ".repeat(fill))
    };
    let line = format!(
        "{}  {}  {}  {}  {:>5}  {}  {:>6}  {}  {}",
        paint(color, style::DIM, &time),
        pad(event, w.event),
        paint(color, style::BOLD, &pad(name, w.name)),
        pad(host, w.host),
        format!("{n}/{max}"),
        paint(color, code.map_or("", code_style), &pad(&code_text, w.code)),
        latency,
        paint(color, status_style(outcome), &pad(outcome, 9)),
        next,
    );
    line.trim_end().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(outcome: &str, code: Option<u16>, next: Option<&str>) -> Value {
        json!({
            "at": "2025-06-01T10:42:07.250Z",
            "delivery_id": "0197a1b2-0000-7000-8000-000000000001",
            "event_id": "0197a1b2-0000-7000-8000-000000000002",
            "event": "status_lead",
            "subscription_id": "0197a1b2-0000-7000-8000-000000000003",
            "subscription_name": "crm-sync",
            "host": "hooks.example.com",
            "attempt": 1,
            "max_attempts": 5,
            "code": code,
            "duration_ms": code.map(|_| 132),
            "outcome": outcome,
            "next_attempt_at": next,
        })
    }

    #[test]
    fn a_retry_reads_with_its_next_attempt_in_humantime() {
        let line = format_line(
            &event("retrying", Some(500), Some("2025-06-01T10:47:07.250Z")),
            &mut Widths::default(),
            false,
        );
        assert_eq!(
            line,
            "10:42:07Z  status_lead  crm-sync  hooks.example.com    1/5  500   132ms  retrying   next in 5m"
        );
    }

    #[test]
    fn delivered_failed_held_and_no_answer() {
        let mut w = Widths::default();
        let line = format_line(&event("delivered", Some(200), None), &mut w, false);
        assert!(line.ends_with("1/5  200   132ms  delivered"), "{line}");
        let line = format_line(&event("failed", Some(0), None), &mut w, false);
        assert!(
            line.contains("1/5  no answer   132ms  failed     no more attempts"),
            "{line}"
        );
        let line = format_line(&event("held", None, None), &mut w, false);
        assert!(
            line.contains("1/5  -               -  held       subscription disabled"),
            "{line}"
        );
    }

    #[test]
    fn a_subscription_without_a_name_shows_its_id() {
        let mut e = event("delivered", Some(200), None);
        e["subscription_name"] = Value::Null;
        let line = format_line(&e, &mut Widths::default(), false);
        assert!(
            line.contains("  0197a1b2-0000-7000-8000-000000000003  "),
            "{line}"
        );
    }

    #[test]
    fn colour_only_when_asked() {
        let e = event("failed", Some(404), None);
        let plain = format_line(&e, &mut Widths::default(), false);
        assert!(!plain.contains('\x1b'), "{plain}");
        let coloured = format_line(&e, &mut Widths::default(), true);
        assert!(coloured.contains("\x1b[1;31mfailed"), "{coloured}");
        assert!(coloured.contains("\x1b[33m404"), "{coloured}");
    }
}
