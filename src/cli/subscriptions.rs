//! `dispatcher subscriptions list|show|add|remove|enable|disable|recover` over `/v1/subscriptions`
//! (SPEC §5.2). Wherever a subscription is named, its id or its (unique) name will do.

use super::output::{Cell, Table, count, note, print_line, short_time, style};
use super::{CliError, client::Client};
use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::{Map, Value, json};

#[derive(Debug, Subcommand)]
pub enum SubscriptionsCommand {
    /// List subscriptions as a table
    #[command(visible_alias = "ls")]
    List {
        /// One JSON object a line, as the daemon gives them
        #[arg(long)]
        json: bool,
    },
    /// Show one subscription (with its signing secret, for an admin token)
    Show {
        /// Subscription id or name
        id: String,
        /// The daemon's JSON
        #[arg(long)]
        json: bool,
    },
    /// Subscribe a URL to events; prints the subscription with its signing secret
    Add(AddArgs),
    /// Delete a subscription; its waiting deliveries end as failed
    #[command(visible_alias = "rm")]
    Remove {
        /// Subscription id or name
        id: String,
    },
    /// Enable a subscription; deliveries held while it was disabled go out
    Enable {
        /// Subscription id or name
        id: String,
    },
    /// Disable a subscription; new deliveries are held (not sent, not dropped) until it is enabled
    Disable {
        /// Subscription id or name
        id: String,
    },
    /// Redeliver every failed delivery of a subscription created since a time
    Recover {
        /// Subscription id or name
        id: String,
        /// RFC 3339 time (2025-06-01T00:00:00Z) or a duration back from now (2h, 1day)
        #[arg(long, value_name = "TIME")]
        since: String,
    },
}

#[derive(Debug, Args)]
pub struct AddArgs {
    /// The receiver: an absolute http(s) URL
    #[arg(long, value_name = "URL")]
    url: String,
    /// Event names, comma-separated (add_lead,status_lead)
    #[arg(long, value_name = "EVENTS", value_delimiter = ',', required = true)]
    events: Vec<String>,
    /// A name to know it by (shown by `tail`)
    #[arg(long)]
    name: Option<String>,
    /// Payload format: amocrm (default), json, creatio, creatio-form
    #[arg(long, value_name = "FORMAT")]
    format: Option<String>,
    /// Retry policy: amocrm (default), creatio, once, or a custom policy of the config
    #[arg(long, value_name = "POLICY")]
    retry: Option<String>,
    /// A header sent with every attempt, NAME:VALUE (repeatable)
    #[arg(long = "header", value_name = "NAME:VALUE")]
    headers: Vec<String>,
    /// Per-attempt timeout (humantime, e.g. 5s)
    #[arg(long, value_name = "DURATION")]
    timeout: Option<String>,
}

pub async fn run(
    client: &Client,
    command: SubscriptionsCommand,
    color: bool,
) -> Result<(), CliError> {
    match command {
        SubscriptionsCommand::List { json } => list(client, json, color).await,
        SubscriptionsCommand::Show { id, json } => {
            let id = resolve(client, &id).await?;
            let sub = client.get(&format!("/v1/subscriptions/{id}"), &[]).await?;
            if json {
                print_line(&pretty(&sub))
            } else {
                print_details(&sub)
            }
        }
        SubscriptionsCommand::Add(args) => add(client, args).await,
        SubscriptionsCommand::Remove { id } => {
            let id = resolve(client, &id).await?;
            client
                .send(
                    Method::DELETE,
                    &format!("/v1/subscriptions/{id}"),
                    &[],
                    None,
                )
                .await?;
            print_line(&format!("removed subscription {id}"))
        }
        SubscriptionsCommand::Enable { id } => set_enabled(client, &id, true).await,
        SubscriptionsCommand::Disable { id } => set_enabled(client, &id, false).await,
        SubscriptionsCommand::Recover { id, since } => {
            let id = resolve(client, &id).await?;
            let since = super::deliveries::since_value(&since)?;
            let answer = client
                .post(
                    &format!("/v1/subscriptions/{id}/recover"),
                    json!({ "since": since }).to_string(),
                )
                .await?;
            let n = answer.get("scheduled").and_then(Value::as_u64).unwrap_or(0);
            print_line(&format!(
                "{} of subscription {id} since {since} scheduled again",
                count(n, "failed delivery", "failed deliveries")
            ))
        }
    }
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

/// `enabled`, or `disabled (failures)` with the reason the daemon gives.
fn state(sub: &Value) -> String {
    if sub.get("enabled").and_then(Value::as_bool).unwrap_or(false) {
        "enabled".to_string()
    } else {
        match sub.get("disabled_reason").and_then(Value::as_str) {
            Some(reason) => format!("disabled ({reason})"),
            None => "disabled".to_string(),
        }
    }
}

fn events_of(sub: &Value) -> String {
    sub.get("events")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default()
}

async fn list(client: &Client, json: bool, color: bool) -> Result<(), CliError> {
    let answer = client.get("/v1/subscriptions", &[]).await?;
    let subs = answer
        .get("subscriptions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if json {
        for s in &subs {
            print_line(&s.to_string())?;
        }
        return Ok(());
    }
    if subs.is_empty() {
        note(
            "no subscriptions; add one with `dispatcher subscriptions add --url URL --events add_lead`",
        );
        return Ok(());
    }
    let mut table = Table::new(vec![
        "ID", "NAME", "STATE", "FORMAT", "RETRY", "EVENTS", "URL",
    ]);
    for s in &subs {
        let state = state(s);
        let st = if state == "enabled" {
            style::GREEN
        } else {
            style::YELLOW
        };
        table.row(vec![
            str_of(s, "id").into(),
            str_of(s, "name").into(),
            Cell::styled(state, st),
            str_of(s, "format").into(),
            str_of(s, "retry").into(),
            events_of(s).into(),
            str_of(s, "url").into(),
        ]);
    }
    table.print(color, true)
}

/// A subscription as `key  value` lines, the secret last.
fn print_details(sub: &Value) -> Result<(), CliError> {
    let mut rows: Vec<(&str, String)> = vec![
        ("id", str_of(sub, "id").to_string()),
        ("name", str_of(sub, "name").to_string()),
        ("url", str_of(sub, "url").to_string()),
        ("events", events_of(sub).replace(',', ", ")),
        ("format", str_of(sub, "format").to_string()),
        ("retry", str_of(sub, "retry").to_string()),
        ("state", state(sub)),
    ];
    if let Some(f) = sub.get("filter").and_then(Value::as_object) {
        let parts: Vec<String> = f.iter().map(|(k, v)| format!("{k}={v}")).collect();
        if !parts.is_empty() {
            rows.push(("filter", parts.join(" ")));
        }
    }
    if let Some(h) = sub.get("headers").and_then(Value::as_object) {
        for (k, v) in h {
            rows.push(("header", format!("{k}: {}", v.as_str().unwrap_or(""))));
        }
    }
    rows.push(("timeout", str_of(sub, "timeout").to_string()));
    rows.push(("created", short_time(str_of(sub, "created_at"))));
    rows.push(("updated", short_time(str_of(sub, "updated_at"))));
    rows.push(("secret", str_of(sub, "secret").to_string()));
    for (k, v) in rows {
        if !v.is_empty() {
            print_line(&format!("{k:<9}{v}"))?;
        }
    }
    Ok(())
}

async fn add(client: &Client, args: AddArgs) -> Result<(), CliError> {
    let mut body = Map::new();
    body.insert("url".into(), json!(args.url));
    let events: Vec<&str> = args
        .events
        .iter()
        .map(|e| e.trim())
        .filter(|e| !e.is_empty())
        .collect();
    body.insert("events".into(), json!(events));
    for (key, value) in [
        ("name", args.name),
        ("format", args.format),
        ("retry", args.retry),
        ("timeout", args.timeout),
    ] {
        if let Some(v) = value {
            body.insert(key.into(), json!(v));
        }
    }
    if !args.headers.is_empty() {
        let mut headers = Map::new();
        for h in &args.headers {
            let (k, v) = h
                .split_once(':')
                .ok_or_else(|| CliError::Usage(format!("--header {h:?} is not NAME:VALUE")))?;
            headers.insert(k.trim().to_string(), json!(v.trim()));
        }
        body.insert("headers".into(), Value::Object(headers));
    }
    let sub = client
        .post("/v1/subscriptions", Value::Object(body).to_string())
        .await?;
    print_details(&sub)?;
    note(
        "receivers verify the webhook-signature header with the secret; `subscriptions show` gives it again to an admin token",
    );
    Ok(())
}

async fn set_enabled(client: &Client, id: &str, enabled: bool) -> Result<(), CliError> {
    let id = resolve(client, id).await?;
    let sub = client
        .send(
            Method::PATCH,
            &format!("/v1/subscriptions/{id}"),
            &[],
            Some(json!({ "enabled": enabled }).to_string()),
        )
        .await?;
    let name = str_of(&sub, "name");
    let named = if name.is_empty() {
        String::new()
    } else {
        format!(" ({name})")
    };
    print_line(&format!("subscription {id}{named} is {}", state(&sub)))
}

/// A subscription's id from its id or its name (names are not unique: an ambiguous name is an
/// error that lists the ids).
pub async fn resolve(client: &Client, id_or_name: &str) -> Result<String, CliError> {
    if uuid::Uuid::parse_str(id_or_name).is_ok() {
        return Ok(id_or_name.to_string());
    }
    let answer = client.get("/v1/subscriptions", &[]).await?;
    let matches: Vec<String> = answer
        .get("subscriptions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|s| s.get("name").and_then(Value::as_str) == Some(id_or_name))
        .map(|s| str_of(s, "id").to_string())
        .collect();
    match matches.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(CliError::Usage(format!(
            "no subscription has the id or name {id_or_name:?} (see `dispatcher subscriptions list`)"
        ))),
        many => Err(CliError::Usage(format!(
            "{} subscriptions are named {id_or_name:?} ({}); give the id",
            many.len(),
            many.join(", ")
        ))),
    }
}
