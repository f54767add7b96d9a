//! `dispatcher deliveries list|show|redeliver` over the delivery log (SPEC §5.4).
//!
//! `list` prints one page (newest first) and, when there is more, says on stderr how to get the
//! next; `--all` follows `next_cursor` to the end, printing each page as it arrives so that a
//! long log streams instead of piling up in memory.

use super::output::{
    Cell, Table, note, parse_time, print_line, relative, short_duration, short_time, status_style,
};
use super::{CliError, FilterArgs, client::Client, pairs};
use clap::{Args, Subcommand};
use serde_json::Value;
use std::collections::HashMap;
use std::time::{Duration, SystemTime};

#[derive(Debug, Subcommand)]
pub enum DeliveriesCommand {
    /// List deliveries, newest first
    #[command(visible_alias = "ls")]
    List(ListArgs),
    /// Show a delivery with every attempt
    Show {
        /// Delivery id (the `webhook-id` header a receiver saw)
        id: String,
        /// The daemon's JSON
        #[arg(long)]
        json: bool,
    },
    /// Schedule a fresh attempt now (a failed delivery too)
    Redeliver {
        /// Delivery id
        id: String,
    },
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    filters: FilterArgs,
    /// Only deliveries created since: an RFC 3339 time or a duration back from now (1h, 2days)
    #[arg(long, value_name = "TIME")]
    since: Option<String>,
    /// Deliveries per page (1-1000; the daemon's default is 50, with --all 1000)
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1000))]
    limit: Option<u32>,
    /// Start after this cursor (the `next_cursor` of the page before)
    #[arg(long, value_name = "CURSOR", conflicts_with = "all")]
    cursor: Option<String>,
    /// Follow the pages to the end instead of printing one
    #[arg(long)]
    all: bool,
    /// One JSON object a line, as the daemon gives them
    #[arg(long)]
    json: bool,
}

pub async fn run(client: &Client, command: DeliveriesCommand, color: bool) -> Result<(), CliError> {
    match command {
        DeliveriesCommand::List(args) => list(client, args, color).await,
        DeliveriesCommand::Show { id, json } => {
            check_id(&id)?;
            let d = client.get(&format!("/v1/deliveries/{id}"), &[]).await?;
            if json {
                print_line(&serde_json::to_string_pretty(&d).unwrap_or_else(|_| d.to_string()))
            } else {
                let names = subscription_names(client).await;
                print_details(&d, &names, color)
            }
        }
        DeliveriesCommand::Redeliver { id } => {
            check_id(&id)?;
            let d = client
                .post(&format!("/v1/deliveries/{id}/redeliver"), String::new())
                .await?;
            let n = d
                .get("attempts")
                .and_then(Value::as_array)
                .map_or(0, Vec::len)
                + 1;
            print_line(&format!(
                "delivery {id}: attempt {n} scheduled now (`dispatcher deliveries show {id}` shows how it went)"
            ))
        }
    }
}

/// A delivery id is a UUID; anything else is refused here rather than pasted into a URL path.
fn check_id(id: &str) -> Result<(), CliError> {
    if uuid::Uuid::parse_str(id).is_ok() {
        Ok(())
    } else {
        Err(CliError::Usage(format!(
            "{id:?} is not a delivery id (a UUID, as in the webhook-id header a receiver saw, or the ID column of `dispatcher deliveries list`)"
        )))
    }
}

/// `--since`: a duration back from now becomes an RFC 3339 time; a time goes as given.
pub fn since_value(since: &str) -> Result<String, CliError> {
    if let Ok(back) = humantime::parse_duration(since) {
        let t = SystemTime::now()
            .checked_sub(back)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        return Ok(humantime::format_rfc3339_millis(t).to_string());
    }
    if parse_time(since).is_some() {
        return Ok(since.to_string());
    }
    if let Some(t) = parse_offset_time(since) {
        // The daemon reads UTC times only: send the same instant in UTC.
        return Ok(humantime::format_rfc3339_millis(t).to_string());
    }
    Err(CliError::Usage(format!(
        "--since {since:?} is neither an RFC 3339 time (2025-06-01T00:00:00Z) nor a duration (2h, 1day)"
    )))
}

/// An RFC 3339 time with a numeric offset (`2025-06-01T09:00:00+03:00`), which humantime does
/// not read: the local part read as UTC, moved by the offset.
fn parse_offset_time(s: &str) -> Option<SystemTime> {
    let split = s.len().checked_sub(6)?;
    let (local, offset) = (s.get(..split)?, s.get(split..)?);
    let (sign, hhmm) = offset.split_at(1);
    let (hh, mm) = hhmm.split_once(':')?;
    let (hh, mm): (u64, u64) = (hh.parse().ok()?, mm.parse().ok()?);
    if hh > 23 || mm > 59 {
        return None;
    }
    let shift = Duration::from_secs(hh * 3600 + mm * 60);
    let as_utc = humantime::parse_rfc3339_weak(&format!("{local}Z")).ok()?;
    match sign {
        "+" => as_utc.checked_sub(shift),
        "-" => as_utc.checked_add(shift),
        _ => None,
    }
}

/// Subscription ids to names, for readable lines; empty when the list cannot be had.
async fn subscription_names(client: &Client) -> HashMap<String, String> {
    let Ok(answer) = client.get("/v1/subscriptions", &[]).await else {
        return HashMap::new();
    };
    answer
        .get("subscriptions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|s| {
            Some((
                s.get("id")?.as_str()?.to_string(),
                s.get("name")?.as_str()?.to_string(),
            ))
        })
        .collect()
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

async fn list(client: &Client, args: ListArgs, color: bool) -> Result<(), CliError> {
    let mut query = args.filters.query(client).await?;
    if let Some(since) = &args.since {
        query.push(("since", since_value(since)?));
    }
    let limit = args.limit.or(args.all.then_some(1000));
    if let Some(limit) = limit {
        query.push(("limit", limit.to_string()));
    }
    let names = if args.json {
        HashMap::new()
    } else {
        subscription_names(client).await
    };
    let mut cursor = args.cursor.clone();
    let mut printed = 0usize;
    loop {
        let mut q = pairs(&query);
        q.push(("cursor", cursor.as_deref()));
        let page = client.get("/v1/deliveries", &q).await?;
        let deliveries = page
            .get("deliveries")
            .and_then(Value::as_array)
            .ok_or_else(|| CliError::BadAnswer {
                server: client.base().to_string(),
                what: "GET /v1/deliveries".into(),
                reason: "no `deliveries` list".into(),
            })?;
        if args.json {
            for d in deliveries {
                print_line(&d.to_string())?;
            }
        } else if !deliveries.is_empty() {
            table(deliveries, &names).print(color, printed == 0)?;
        }
        printed += deliveries.len();
        let next = page
            .get("next_cursor")
            .and_then(Value::as_str)
            .map(str::to_string);
        match next {
            Some(next) if args.all => cursor = Some(next),
            Some(next) => {
                note(&format!(
                    "more deliveries: --cursor {next} for the next page, or --all for every page"
                ));
                break;
            }
            None => break,
        }
    }
    if printed == 0 && !args.json {
        note("no deliveries match");
    }
    Ok(())
}

/// One page of deliveries as table rows; fixed minimum widths keep the pages of `--all` aligned.
fn table(deliveries: &[Value], names: &HashMap<String, String>) -> Table {
    let mut t = Table::new(vec![
        "ID",
        "CREATED",
        "STATUS",
        "ATTEMPTS",
        "CODE",
        "NEXT ATTEMPT",
        "EVENT",
        "SUBSCRIPTION",
    ])
    .min_widths(vec![36, 20, 9, 8, 4, 12, 20]);
    let now = SystemTime::now();
    for d in deliveries {
        let attempts = d.get("attempts").and_then(Value::as_array);
        let n = attempts.map_or(0, Vec::len);
        let code = attempts
            .and_then(|a| a.last())
            .and_then(|a| a.get("code"))
            .and_then(Value::as_u64)
            .map_or("-".to_string(), |c| c.to_string());
        let next = d
            .get("next_attempt_at")
            .and_then(Value::as_str)
            .and_then(parse_time)
            .map_or("-".to_string(), |t| relative(t, now));
        let status = str_of(d, "status");
        let sub = str_of(d, "subscription_id");
        t.row(vec![
            str_of(d, "id").into(),
            short_time(str_of(d, "created_at")).into(),
            Cell::styled(status, status_style(status)),
            n.to_string().into(),
            code.into(),
            next.into(),
            str_of(d, "event").into(),
            names.get(sub).map_or(sub, String::as_str).into(),
        ]);
    }
    t
}

/// A delivery as `key  value` lines, then every attempt with its error and answer.
fn print_details(d: &Value, names: &HashMap<String, String>, color: bool) -> Result<(), CliError> {
    let sub = str_of(d, "subscription_id");
    let status = str_of(d, "status");
    let mut rows: Vec<(&str, String)> = vec![
        ("delivery", str_of(d, "id").to_string()),
        (
            "event",
            format!("{}  (event {})", str_of(d, "event"), str_of(d, "event_id")),
        ),
        (
            "subscription",
            match names.get(sub) {
                Some(name) => format!("{name}  ({sub})"),
                None => sub.to_string(),
            },
        ),
        (
            "status",
            super::output::paint(color, status_style(status), status),
        ),
        ("created", short_time(str_of(d, "created_at"))),
    ];
    if let Some(next) = d.get("next_attempt_at").and_then(Value::as_str) {
        let when = parse_time(next).map_or(String::new(), |t| {
            format!("  ({})", relative(t, SystemTime::now()))
        });
        rows.push(("next attempt", format!("{}{when}", short_time(next))));
    }
    if let Some(e) = d.get("error").and_then(Value::as_str) {
        rows.push(("error", e.to_string()));
    }
    let attempts = d
        .get("attempts")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    rows.push(("attempts", attempts.len().to_string()));
    for (k, v) in rows {
        print_line(&format!("{k:<14}{v}"))?;
    }
    for a in &attempts {
        let code = a.get("code").and_then(Value::as_u64).unwrap_or(0);
        let code_text = if code == 0 {
            "0 (no answer)".to_string()
        } else {
            code.to_string()
        };
        let ms = a.get("duration_ms").and_then(Value::as_u64).unwrap_or(0);
        print_line(&format!(
            "  #{:<3}{}  {}  {}",
            a.get("n").and_then(Value::as_u64).unwrap_or(0),
            short_time(str_of(a, "started_at")),
            super::output::paint(color, super::output::code_style(code), &code_text),
            short_duration(Duration::from_millis(ms)),
        ))?;
        if let Some(e) = a.get("error").and_then(Value::as_str) {
            print_line(&format!("        error: {}", one_line(e)))?;
        }
        if let Some(b) = a.get("response_body").and_then(Value::as_str)
            && !b.is_empty()
        {
            print_line(&format!("        answer: {}", one_line(b)))?;
        }
    }
    Ok(())
}

/// Text from a receiver on one line: line ends and control characters escaped, so a body can
/// neither break the layout nor send escape sequences to the terminal.
fn one_line(text: &str) -> String {
    text.chars()
        .flat_map(|c| match c {
            '\n' => vec!['\\', 'n'],
            '\r' => vec!['\\', 'r'],
            '\t' => vec![' '],
            c if c.is_control() => c.escape_unicode().collect(),
            c => vec![c],
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_a_duration_or_a_time() {
        let t = since_value("1h").unwrap();
        let parsed = parse_time(&t).unwrap();
        let back = SystemTime::now().duration_since(parsed).unwrap();
        assert!(
            back >= Duration::from_secs(3599) && back < Duration::from_secs(3700),
            "{t}"
        );
        assert_eq!(
            since_value("2025-06-01T00:00:00Z").unwrap(),
            "2025-06-01T00:00:00Z"
        );
        assert!(since_value("yesterday-ish").is_err());
        assert_eq!(
            since_value("2025-06-01T03:00:00+03:00").unwrap(),
            "2025-06-01T00:00:00.000Z"
        );
        assert_eq!(
            since_value("2025-05-31T20:30:00.250-03:30").unwrap(),
            "2025-06-01T00:00:00.250Z"
        );
        assert!(since_value("2025-06-01T03:00:00+25:00").is_err());
    }

    #[test]
    fn receiver_text_cannot_break_a_line_or_drive_the_terminal() {
        assert_eq!(one_line("a\nb\r\tc"), "a\\nb\\r c");
        assert_eq!(one_line("\x1b[31mred"), "\\u{1b}[31mred");
    }

    #[test]
    fn a_page_renders_names_codes_and_next_attempts() {
        let names = HashMap::from([("s1".to_string(), "crm-sync".to_string())]);
        let d = serde_json::json!({
            "id": "d1", "event_id": "e1", "event": "add_lead", "subscription_id": "s1",
            "status": "pending", "created_at": "2025-06-01T10:00:00.500Z",
            "next_attempt_at": null,
            "attempts": [{"n": 1, "started_at": "2025-06-01T10:00:00.600Z", "duration_ms": 3, "code": 500}]
        });
        let lines = table(&[d], &names).render(false, true);
        assert!(lines[0].starts_with("ID  "), "{lines:?}");
        assert!(
            lines[1].starts_with("d1  ")
                && lines[1].contains("2025-06-01T10:00:00Z")
                && lines[1].contains("  pending  ")
                && lines[1].contains("  500  ")
                && lines[1].ends_with("add_lead              crm-sync"),
            "{lines:?}"
        );
    }
}
