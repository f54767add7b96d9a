//! The `dispatcher` command line: parses arguments and calls the library (`serve`,
//! `check-config`) or the daemon's HTTP API (the client commands of [`cli`]).

mod alloc;
mod cli;

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use webhook_dispatcher::Dispatcher;
use webhook_dispatcher::config::{Config, LogFormat};
use webhook_dispatcher::ops::attempt_log::LineFormat;

#[derive(Parser)]
#[command(
    name = "dispatcher",
    version,
    about = "An amoCRM-style webhook dispatcher daemon"
)]
struct Cli {
    #[command(flatten)]
    client: cli::ClientArgs,
    #[command(subcommand)]
    command: Command,
}

/// The daemon's config file, for `serve` and `check-config`.
#[derive(Debug, clap::Args)]
struct ConfigArg {
    /// Config file (default ./dispatcher.toml, or built-in defaults when it is absent); an
    /// explicit path that does not exist is an error
    #[arg(long, short)]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon (default config ./dispatcher.toml, or built-in defaults when it is absent)
    Serve(ConfigArg),
    /// Validate a config and print the effective settings (tokens masked)
    CheckConfig(ConfigArg),
    #[command(flatten)]
    Client(cli::ClientCommand),
}

fn main() -> ExitCode {
    let matches = match Cli::command().try_get_matches() {
        Ok(m) => m,
        Err(e) => return usage_error(e),
    };
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    // `serve --server …` would otherwise be silently ignored: the daemon listens where
    // server.listen says.
    let explicit = |id: &str| matches.value_source(id) == Some(ValueSource::CommandLine);
    let client_flags_on_daemon = || {
        anyhow::anyhow!(
            "--server and --token are for the client commands; the daemon takes server.listen and api.tokens from its config"
        )
    };
    let result = match cli.command {
        Command::Client(command) => match cli::run(command, cli.client) {
            Err(e) if e.is_quiet() => Ok(()),
            other => other.map_err(anyhow::Error::from),
        },
        _ if explicit("server") || explicit("token") => Err(client_flags_on_daemon()),
        Command::CheckConfig(ConfigArg { config }) => check_config(config),
        Command::Serve(ConfigArg { config }) => serve_command(config),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dispatcher: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A usage error as one line (`dispatcher: unrecognized subcommand 'x'`) with clap's exit code;
/// help and version are printed as clap prints them.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let _ = e.print();
        return ExitCode::from(e.exit_code() as u8);
    }
    let rendered = e.render().to_string();
    // The message, then its tips and possible values; not the usage block.
    let parts: Vec<&str> = rendered
        .lines()
        .take_while(|l| !l.starts_with("Usage:"))
        .map(|l| l.trim())
        .map(|l| l.strip_prefix("error: ").unwrap_or(l))
        .filter(|l| !l.is_empty() && !l.starts_with("For more information"))
        .collect();
    // A line that ends in a colon introduces the next ones (the arguments missing).
    let mut line = String::new();
    for part in parts {
        if !line.is_empty() {
            line.push_str(if line.ends_with(':') { " " } else { "; " });
        }
        line.push_str(part);
    }
    eprintln!("dispatcher: {line} (see `dispatcher --help`)");
    ExitCode::from(e.exit_code() as u8)
}

fn check_config(config: Option<PathBuf>) -> anyhow::Result<()> {
    let config = Config::load(config.as_deref())?;
    print!("{}", config.to_masked_toml());
    Ok(())
}

fn serve_command(config: Option<PathBuf>) -> anyhow::Result<()> {
    let config = Config::load(config.as_deref())?;
    // The API and the delivery engine run on runtimes of their own (README, Design: "Two
    // runtimes"), which share the CPUs between them.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let env = std::env::var("TOKIO_WORKER_THREADS").ok();
    let (api_threads, delivery_threads) =
        worker_threads(cpus, env.as_deref()).map_err(|e| anyhow::anyhow!(e))?;
    // While this is the only thread: a table grown later holds up every thread opening a
    // socket for an RCU grace period (`ops::fds`).
    let fds = webhook_dispatcher::ops::fds::reserve(webhook_dispatcher::ops::fds::SLOTS);
    // Dropped last: the lines still queued are written out after the runtime has stopped, if
    // stderr takes them within about a second.
    let _log = init_logging(&config)?;
    match fds {
        Err(e) => tracing::warn!(error = %e, "could not grow the file-descriptor table at start"),
        Ok(n) if n > 0 && n < webhook_dispatcher::ops::fds::SLOTS => tracing::info!(
            descriptors = n,
            "RLIMIT_NOFILE keeps the descriptor table below {} slots",
            webhook_dispatcher::ops::fds::SLOTS
        ),
        Ok(_) => {}
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(api_threads)
        .thread_name("api")
        .enable_all()
        .build()?;
    let delivery = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(delivery_threads)
        .thread_name("delivery")
        .enable_all()
        .build()?;
    let served = rt.block_on(serve(config, delivery.handle().clone()));
    // The attempts in flight had their grace (`Dispatcher::serve`) and storage is flushed, unless
    // serving failed to start; what is left (an attempt past its grace, a blocking DNS lookup)
    // does not hold the exit for more than a second.
    delivery.shutdown_timeout(std::time::Duration::from_secs(1));
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    served
}

/// Worker threads of the API's runtime and of the delivery engine's on `cpus` CPUs: half each
/// (the engine gets the odd one, each at least one), so that the two have a worker per CPU
/// between them; `TOKIO_WORKER_THREADS` (the variable Tokio reads) sets both.
fn worker_threads(cpus: usize, env: Option<&str>) -> Result<(usize, usize), String> {
    if let Some(v) = env {
        return match v.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok((n, n)),
            _ => Err(format!(
                "TOKIO_WORKER_THREADS: expected a number of worker threads above 0, got {v:?}"
            )),
        };
    }
    let api = (cpus / 2).max(1);
    Ok((api, cpus.saturating_sub(api).max(1)))
}

/// Log lines go to stderr through a thread of their own (see `ops::log`); the guard writes out
/// what is still queued when it is dropped.
fn init_logging(config: &Config) -> anyhow::Result<webhook_dispatcher::ops::log::LogGuard> {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log.level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (writer, guard) = webhook_dispatcher::ops::log::stderr()
        .map_err(|e| anyhow::anyhow!("cannot start the log's writer thread: {e}"))?;
    let ansi = std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi);
    let format = match config.log.format {
        LogFormat::Json => {
            builder.json().flatten_event(true).init();
            LineFormat::Json
        }
        LogFormat::Text => {
            builder.init();
            LineFormat::Text
        }
    };
    // Each attempt's line is the same bytes written without `tracing`'s formatter (about 1.5 µs
    // of a fanout delivery's CPU less); a terminal's coloured lines still go through it.
    if !ansi {
        webhook_dispatcher::ops::attempt_log::write_directly(format);
    }
    // A panic is logged like the rest: the default hook writes to stderr from the panicking
    // thread, which a stderr nobody reads would block (the writer thread outlives a panic in
    // what follows an outcome, and would stop there).
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        tracing::error!(
            thread = thread.name().unwrap_or("unnamed"),
            "panicked: {info}"
        );
        // Written now rather than within the log's next few milliseconds: the process may be
        // about to abort.
        webhook_dispatcher::ops::log::flush_stderr(std::time::Duration::from_millis(100));
    }));
    Ok(guard)
}

/// Says in the log, once lines get through again, how many were dropped while stderr was not
/// read (checked every few seconds).
async fn report_dropped_log_lines() {
    let mut reported = 0;
    let mut every = tokio::time::interval(std::time::Duration::from_secs(5));
    loop {
        every.tick().await;
        let dropped = webhook_dispatcher::ops::log::dropped_lines();
        if dropped > reported {
            tracing::warn!(
                dropped = dropped - reported,
                total = dropped,
                "log lines dropped: stderr did not take them as fast as they came, or refused them (the delivery log and `dispatcher tail` have every attempt)"
            );
            // Had this warning been dropped too, the next one counts from the same point.
            if webhook_dispatcher::ops::log::dropped_lines() == dropped {
                reported = dropped;
            }
        }
    }
}

async fn serve(config: Config, delivery: tokio::runtime::Handle) -> anyhow::Result<()> {
    let addr = config.server.listen;
    // Bound before anything starts: a daemon that cannot listen leaves storage unopened, where
    // started first its lanes could have begun attempts that the exit would then cut off. The
    // address has passed `Config::validate` (no public address without tokens) in `Config::load`.
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
    let dispatcher = Dispatcher::start_on(config, delivery).await?;
    let local = listener.local_addr()?;
    tracing::info!(listen = %local, "dispatcher serving");
    tokio::spawn(report_dropped_log_lines());
    // A line on stdout that scripts and tests can wait for.
    println!("listening on {local}");
    dispatcher.serve(listener, shutdown_signal()).await?;
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

#[cfg(test)]
mod tests {
    use super::worker_threads;

    #[test]
    fn the_two_runtimes_share_the_cpus_unless_tokio_worker_threads_says() {
        for (cpus, split) in [
            (1, (1, 1)),
            (2, (1, 1)),
            (3, (1, 2)),
            (4, (2, 2)),
            (16, (8, 8)),
        ] {
            assert_eq!(worker_threads(cpus, None), Ok(split), "{cpus} CPUs");
        }
        assert_eq!(worker_threads(2, Some("3")), Ok((3, 3)));
        for bad in ["0", "", "two", "-1"] {
            let e = worker_threads(2, Some(bad)).unwrap_err();
            assert!(
                e.starts_with("TOKIO_WORKER_THREADS: expected a number"),
                "{e}"
            );
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
    }
}
