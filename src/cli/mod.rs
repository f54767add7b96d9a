//! The client commands of the `dispatcher` binary (SPEC §2): `emit`, `subscriptions`,
//! `deliveries` and `tail` talk to a running daemon over its HTTP API (SPEC §5). They are thin:
//! each turns flags into one or a few requests and the answers into lines for a person (or, with
//! `--json`, for a program). The daemon does the work.
//!
//! Binary-only (declared from `main.rs`): the library does not need to know its own client.

mod client;
mod deliveries;
mod emit;
mod output;
mod sse;
mod subscriptions;
mod tail;

use clap::{Args, Subcommand, ValueEnum};
use client::Client;

/// How to reach the daemon; global, so these flags go anywhere on the line.
#[derive(Debug, Args)]
pub struct ClientArgs {
    /// The daemon's base URL (client commands)
    #[arg(
        long,
        global = true,
        value_name = "URL",
        default_value = "http://127.0.0.1:8080",
        help_heading = "Client options"
    )]
    pub server: String,
    /// API token, sent as `Authorization: Bearer <token>` (client commands)
    #[arg(
        long,
        global = true,
        env = "DISPATCHER_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN",
        help_heading = "Client options"
    )]
    pub token: Option<String>,
    /// Colour: auto (on a terminal, unless NO_COLOR is set), always, never
    #[arg(
        long,
        global = true,
        value_enum,
        default_value_t = ColorChoice::Auto,
        value_name = "WHEN",
        help_heading = "Client options"
    )]
    pub color: ColorChoice,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ColorChoice {
    Auto,
    Always,
    Never,
}

/// A delivery status as the delivery log and the stream filter by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StatusFilter {
    /// Waiting for an attempt (for `tail`: retrying or held)
    Pending,
    /// An attempt under way
    #[value(name = "in_flight")]
    InFlight,
    Delivered,
    Failed,
}

impl StatusFilter {
    pub fn as_str(self) -> &'static str {
        match self {
            StatusFilter::Pending => "pending",
            StatusFilter::InFlight => "in_flight",
            StatusFilter::Delivered => "delivered",
            StatusFilter::Failed => "failed",
        }
    }
}

/// The filters `deliveries list` and `tail` share (SPEC §5.4).
#[derive(Debug, Args)]
pub struct FilterArgs {
    /// Only deliveries with this status
    #[arg(long, value_enum)]
    status: Option<StatusFilter>,
    /// Only this subscription (its id or its name)
    #[arg(long, value_name = "ID")]
    subscription: Option<String>,
    /// Only this event (add_lead, status_lead, …)
    #[arg(long, value_name = "EVENT")]
    event: Option<String>,
}

impl FilterArgs {
    /// The query pairs, a subscription name resolved to its id.
    pub async fn query(&self, client: &Client) -> Result<Vec<(&'static str, String)>, CliError> {
        let mut q = Vec::new();
        if let Some(s) = self.status {
            q.push(("status", s.as_str().to_string()));
        }
        if let Some(s) = &self.subscription {
            q.push(("subscription", subscriptions::resolve(client, s).await?));
        }
        if let Some(e) = &self.event {
            q.push(("event", e.clone()));
        }
        Ok(q)
    }
}

/// Query pairs as [`client::Client::url`] takes them.
pub fn pairs<'a>(q: &'a [(&'static str, String)]) -> Vec<(&'static str, Option<&'a str>)> {
    q.iter().map(|(k, v)| (*k, Some(v.as_str()))).collect()
}

/// The client commands, flattened into the binary's command list beside `serve`.
#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Send one event, or NDJSON events from stdin, to a running daemon
    Emit(emit::EmitArgs),
    /// Manage subscriptions on a running daemon
    #[command(subcommand)]
    Subscriptions(subscriptions::SubscriptionsCommand),
    /// Query the delivery log, show a delivery with its attempts, redeliver
    #[command(subcommand)]
    Deliveries(deliveries::DeliveriesCommand),
    /// Print delivery attempts as they happen (follows live, like `tail -f`)
    Tail(tail::TailArgs),
}

/// What stops a client command; every variant reads as one line a user can act on.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("cannot reach the daemon at {server}: {reason}")]
    Unreachable { server: String, reason: String },
    /// The daemon's problem+json, as its status and `detail`.
    #[error("the daemon answered {status}: {detail}{hint}")]
    Refused {
        status: reqwest::StatusCode,
        detail: String,
        hint: &'static str,
    },
    #[error("the daemon at {server} sent an answer that cannot be read ({what}): {reason}")]
    BadAnswer {
        server: String,
        what: String,
        reason: String,
    },
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Input(String),
    /// Stdout is closed (`dispatcher tail | head`): not an error worth a message.
    #[error("stdout is closed")]
    StdoutClosed,
    #[error("cannot write to stdout: {0}")]
    Output(std::io::Error),
    #[error("cannot start the client: {0}")]
    Setup(String),
}

impl CliError {
    /// Whether the command should end quietly with success (the reader went away).
    pub fn is_quiet(&self) -> bool {
        matches!(self, CliError::StdoutClosed)
    }
}

/// Runs one client command to completion.
pub fn run(command: ClientCommand, args: ClientArgs) -> Result<(), CliError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Setup(e.to_string()))?;
    rt.block_on(async move {
        let client = Client::new(&args.server, args.token.as_deref())?;
        let color = output::use_color(args.color);
        match command {
            ClientCommand::Emit(a) => emit::run(&client, a).await,
            ClientCommand::Subscriptions(c) => subscriptions::run(&client, c, color).await,
            ClientCommand::Deliveries(c) => deliveries::run(&client, c, color).await,
            ClientCommand::Tail(a) => tail::run(&client, a, color).await,
        }
    })
}
