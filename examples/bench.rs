//! The benchmark of issue 6: drives the real `dispatcher` binary on loopback with the bench's own
//! sink (a receiver that counts requests and accepted TCP connections and notes when each event
//! arrived) and its own keep-alive load generator, and prints a table (or `--json`).
//!
//! ```sh
//! cargo run --release --example bench                      # every scenario (a few minutes)
//! cargo run --release --example bench -- --quick           # smaller counts (backlog of 100,000)
//! cargo run --release --example bench -- --scenario e2e,paced --json
//! ```
//!
//! Scenarios: `baseline` (the bench's client straight to the sink: the machine's ceiling),
//! `e2e`, `paced`, `fanout`, `backlog`, `isolation`; every scenario that a target compares with
//! the baseline runs the baseline too, in the same run. Each scenario starts its own daemon with a
//! generated config in a temp dir (listen 127.0.0.1:0, storage in the dir, 127.0.0.0/8 allowed)
//! and kills it and removes the dir when it ends. Progress goes to stderr.

#[path = "bench/daemon.rs"]
mod daemon;
#[path = "bench/load.rs"]
mod load;
#[path = "bench/report.rs"]
mod report;
#[path = "bench/sink.rs"]
mod sink;
#[path = "bench/stats.rs"]
mod stats;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::Parser;
use daemon::{Daemon, Knobs};
use load::BodyFn;
use report::{ConnFig, Outcome, Target, Verdict, int, mib, ms};
use serde_json::{Value, json};
use sink::{Recorder, Route, Sink};
use stats::{Clock, pct_ns};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

const SCENARIOS: [&str; 7] = [
    "baseline",
    "storage",
    "e2e",
    "paced",
    "fanout",
    "backlog",
    "isolation",
];

#[derive(Parser, Clone, Debug)]
#[command(
    name = "bench",
    about = "Benchmark of the real dispatcher binary on loopback (issue 6)"
)]
struct Opts {
    /// Print one JSON object on stdout instead of the table
    #[arg(long)]
    json: bool,
    /// Scenarios to run, repeated or comma-separated: baseline, storage, e2e, paced, fanout,
    /// backlog, isolation (default: all)
    #[arg(long = "scenario", value_delimiter = ',')]
    scenarios: Vec<String>,
    /// Smaller counts (backlog of 100,000) for a fast try
    #[arg(long)]
    quick: bool,
    /// Concurrent keep-alive connections of the load generator (intake and baseline alike)
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Events of the e2e peak run (default 200,000, several seconds like the baseline; --quick 10,000)
    #[arg(long)]
    events: Option<usize>,
    /// Events of the fanout and storage scenarios, each to 100 subscriptions (default 1,000;
    /// --quick 300)
    #[arg(long)]
    fanout_events: Option<usize>,
    /// Deliveries of the backlog scenario (default 1,000,000; --quick 100,000)
    #[arg(long)]
    backlog: Option<usize>,
    /// The daemon's delivery.per_subscription
    #[arg(long, default_value_t = 16)]
    per_subscription: usize,
    /// The daemon's delivery.concurrency (default: --concurrency, so that the daemon has no more
    /// deliveries in flight than the baseline has requests; the daemon's own default is 512)
    #[arg(long)]
    daemon_concurrency: Option<usize>,
    /// The daemon's log.level (its stderr goes to /dev/null unless --daemon-log)
    #[arg(long, default_value = "info")]
    log_level: String,
    /// Append the daemon's stderr (its log) to this file
    #[arg(long)]
    daemon_log: Option<PathBuf>,
    /// The dispatcher binary (default: target/<profile>/dispatcher, built first)
    #[arg(long)]
    daemon: Option<PathBuf>,
    /// Do not run `cargo build` for the daemon
    #[arg(long)]
    no_build: bool,
    /// Where the scenarios' temp dirs go (default: the system temp dir)
    #[arg(long)]
    dir: Option<PathBuf>,
    /// A daemon whose RSS passes this is killed (the machine is shared); the backlog ingest
    /// switches to batches of 100 at half of it
    #[arg(long, default_value_t = 6144)]
    rss_limit_mib: u64,
    /// Backlog: the first attempts (so the retries coming due) are spread at this fraction of
    /// the calibrated attempt rate, by the sink answering them after a delay; 0 = no delay
    #[arg(long, default_value_t = 0.3)]
    backlog_pace: f64,
    /// The `paced` scenario's rate, events/s (its target is set at 400: another rate leaves the
    /// target unjudged)
    #[arg(long, default_value_t = 400.0, value_parser = positive_rate)]
    paced_rate: f64,
}

/// A rate of events per second: a finite number above zero.
fn positive_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 => Ok(r),
        _ => Err(format!("{s:?} is not a rate of events per second above 0")),
    }
}

/// Counts and durations of the scenarios.
#[derive(Debug, Clone)]
struct Sizes {
    baseline: Duration,
    e2e: usize,
    half: Duration,
    paced_rate: f64,
    paced: Duration,
    fanout: usize,
    backlog: usize,
    isolation: Duration,
    /// How long to wait for deliveries after the last intake answer, at most.
    deliver_wait: Duration,
}

impl Sizes {
    fn of(o: &Opts) -> Sizes {
        let q = o.quick;
        Sizes {
            baseline: Duration::from_secs(if q { 3 } else { 5 }),
            e2e: o.events.unwrap_or(if q { 10_000 } else { 200_000 }),
            half: Duration::from_secs(if q { 5 } else { 10 }),
            paced_rate: o.paced_rate,
            paced: Duration::from_secs(if q { 5 } else { 10 }),
            fanout: o.fanout_events.unwrap_or(if q { 300 } else { 1_000 }),
            backlog: o.backlog.unwrap_or(if q { 100_000 } else { 1_000_000 }),
            isolation: Duration::from_secs(if q { 3 } else { 5 }),
            deliver_wait: Duration::from_secs(if q { 120 } else { 300 }),
        }
    }
}

/// Events sent before a measured run (their ids follow the measured ones) and waited for.
const WARM: usize = 100;
/// Events per intake request in the backlog ingest.
const BATCH: usize = 1000;

struct Ctx {
    opts: Opts,
    sizes: Sizes,
    bin: PathBuf,
    knobs: Knobs,
    sink: Arc<Sink>,
    clock: Arc<Clock>,
    /// Set-up calls: subscriptions, delivery look-ups, /healthz, /metrics.
    api: reqwest::Client,
    dir: PathBuf,
    guard: Arc<daemon::RssGuard>,
    t0: Instant,
}

/// A daemon with its temp dir; the daemon is killed before the dir is removed.
struct Instance {
    daemon: Daemon,
    storage: PathBuf,
    config: PathBuf,
    policies: Vec<(String, String)>,
    _dir: tempfile::TempDir,
}

/// The intake body of event `id`: the same JSON whatever the scenario.
fn event_json(name: &str, id: u64) -> String {
    format!(
        r#"{{"event":"{name}","data":{{"id":{id},"name":"Bench lead {id}","status_id":"142","pipeline_id":"752662","price":"1000"}}}}"#
    )
}

fn event_body(name: &'static str) -> BodyFn {
    Arc::new(move |id| (Bytes::from(event_json(name, id)), "application/json"))
}

/// The amoCRM form body the daemon sends for `event_json("add_lead", id)` (checked against
/// the e2e sink's first request): the baseline POSTs exactly this.
fn form_body(id: u64) -> String {
    format!(
        "leads%5Badd%5D%5B0%5D%5Bid%5D={id}&leads%5Badd%5D%5B0%5D%5Bname%5D=Bench+lead+{id}\
         &leads%5Badd%5D%5B0%5D%5Bstatus_id%5D=142&leads%5Badd%5D%5B0%5D%5Bpipeline_id%5D=752662\
         &leads%5Badd%5D%5B0%5D%5Bprice%5D=1000&account%5Bsubdomain%5D=example&account%5Bid%5D=1\
         &account%5B_links%5D%5Bself%5D=https%3A%2F%2Fexample.amocrm.ru"
    )
}

impl Ctx {
    fn log(&self, msg: impl AsRef<str>) {
        eprintln!(
            "[{:>7.1}s] {}",
            self.t0.elapsed().as_secs_f64(),
            msg.as_ref()
        );
    }

    /// A fresh daemon on a fresh temp dir.
    async fn instance(&self, policies: &[(String, String)]) -> Result<Instance> {
        let dir = tempfile::Builder::new()
            .prefix("dispatcher-bench-")
            .tempdir_in(&self.dir)
            .context("cannot create a temp dir")?;
        let storage = dir.path().join("db.sled");
        let config = dir.path().join("dispatcher.toml");
        std::fs::write(
            &config,
            daemon::config_toml("127.0.0.1:0", &storage, &self.knobs, policies),
        )?;
        daemon::check_config(&self.bin, &config)?;
        let mut d = Daemon::spawn(
            &self.bin,
            &config,
            self.opts.daemon_log.as_deref(),
            &self.guard,
        )?;
        d.wait_listening(Duration::from_secs(60)).await?;
        Ok(Instance {
            daemon: d,
            storage,
            config,
            policies: policies.to_vec(),
            _dir: dir,
        })
    }

    async fn call(
        &self,
        method: reqwest::Method,
        url: String,
        body: Option<Value>,
    ) -> Result<Value> {
        let mut rb = self.api.request(method.clone(), &url);
        if let Some(b) = body {
            rb = rb
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(b.to_string());
        }
        let resp = rb.send().await.with_context(|| format!("{method} {url}"))?;
        let status = resp.status();
        let text = resp.text().await?;
        if !status.is_success() {
            bail!("{method} {url}: {status}: {text}");
        }
        Ok(if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text)?
        })
    }

    async fn create_sub(&self, base: &str, body: Value) -> Result<String> {
        let v = self
            .call(
                reqwest::Method::POST,
                format!("{base}/v1/subscriptions"),
                Some(body),
            )
            .await?;
        Ok(v["id"].as_str().context("subscription id")?.to_string())
    }

    async fn patch_sub(&self, base: &str, id: &str, body: Value) -> Result<()> {
        self.call(
            reqwest::Method::PATCH,
            format!("{base}/v1/subscriptions/{id}"),
            Some(body),
        )
        .await?;
        Ok(())
    }

    /// `dispatcher_deliveries_pending` from /metrics.
    async fn pending_metric(&self, base: &str) -> Option<f64> {
        let text = self
            .api
            .get(format!("{base}/metrics"))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("dispatcher_deliveries_pending "))
            .and_then(|v| v.trim().parse().ok())
    }

    /// Sends `WARM` events (ids `first_id..`) and waits until `arrived()` reaches `expect`.
    async fn warmup(
        &self,
        base: &str,
        event: &'static str,
        first_id: u64,
        expect: u64,
        arrived: impl Fn() -> u64,
    ) -> Result<()> {
        let run = load::closed(
            &format!("{base}/v1/events"),
            self.opts.concurrency.min(16),
            WARM,
            first_id,
            Instant::now() + Duration::from_secs(30),
            &self.clock,
            &event_body(event),
        )
        .await?;
        if run.count(202) != WARM {
            bail!("warm-up events were refused: {}", run.failures(202));
        }
        if !wait_until(Duration::from_secs(30), || arrived() >= expect).await {
            bail!(
                "warm-up: {} of {expect} deliveries arrived within 30 s",
                arrived()
            );
        }
        Ok(())
    }
}

/// Polls `done` every 2 ms until it holds or `timeout` passes.
async fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Waits until the daemon uses less than 2% of a core over half a second (its work after the
/// last arrival: recording outcomes), at most `timeout`.
async fn wait_quiet(d: &Daemon, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let mut last = d.stat().map(|s| s.cpu_s).unwrap_or(0.0);
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = d.stat().map(|s| s.cpu_s).unwrap_or(0.0);
        if now - last < 0.01 {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        last = now;
    }
}

fn secs_between(a_ns: u64, b_ns: u64) -> f64 {
    (b_ns.saturating_sub(a_ns)) as f64 / 1e9
}

fn conn_fig(
    ctx: &Ctx,
    before: sink::ConnSnapshot,
    cap: u64,
    cap_text: impl Into<String>,
) -> ConnFig {
    let after = ctx.sink.conn_snapshot();
    ConnFig {
        new: after.accepted - before.accepted,
        cap,
        cap_text: cap_text.into(),
        peak_open: ctx.sink.peak_open(),
    }
}

/// What a closed-loop intake run and its deliveries to one recorder came to.
struct Delivered {
    accepted: usize,
    arrived: usize,
    /// Accepted events that never arrived (after the wait).
    missing: usize,
    /// Events that arrived though their intake request was not answered 202.
    unaccepted_arrivals: usize,
    first_start: u64,
    last_answer: u64,
    last_arrival: u64,
    /// Intake request start → arrival at the sink, ns, per accepted and arrived event.
    latencies: Vec<i64>,
    complete: bool,
}

/// Matches a run's requests (ids `0..n`) with the arrivals of `recs` (one per subscription).
fn delivered(run: &load::Run, recs: &[Arc<Recorder>], complete: bool) -> Delivered {
    let (first_start, last_answer) = run.window().unwrap_or((0, 0));
    let mut d = Delivered {
        accepted: 0,
        arrived: 0,
        missing: 0,
        unaccepted_arrivals: 0,
        first_start,
        last_answer,
        last_arrival: 0,
        latencies: Vec::new(),
        complete,
    };
    for i in 0..run.n() {
        let ok = run.status[i] == 202;
        if ok {
            d.accepted += recs.len();
        }
        for r in recs {
            match r.first(i) {
                Some(t) if ok => {
                    d.arrived += 1;
                    d.last_arrival = d.last_arrival.max(t);
                    d.latencies.push(t as i64 - run.starts[i] as i64);
                }
                Some(_) => d.unaccepted_arrivals += 1,
                None if ok => d.missing += 1,
                None => {}
            }
        }
    }
    d
}

fn report_delivered(o: &mut Outcome, d: &Delivered, what: &str, wait: Duration) {
    if !d.complete {
        o.problem(format!(
            "timeout: {} of {} accepted {what} arrived within {:.0} s of waiting; rates and latencies below cover only what arrived",
            int(d.arrived as f64),
            int(d.accepted as f64),
            wait.as_secs_f64()
        ));
    }
    if d.missing > 0 && d.complete {
        o.problem(format!("{} accepted {what} never arrived", d.missing));
    }
    if d.unaccepted_arrivals > 0 {
        o.problem(format!(
            "{} {what} arrived though their intake request was not answered 202",
            d.unaccepted_arrivals
        ));
    }
}

fn check_dups(o: &mut Outcome, recs: &[Arc<Recorder>]) {
    let dups: u64 = recs.iter().map(|r| r.dups.load(Ordering::SeqCst)).sum();
    let unknown: u64 = recs.iter().map(|r| r.unknown.load(Ordering::SeqCst)).sum();
    if dups > 0 {
        o.note(format!(
            "{dups} repeated deliveries of an event already received (at-least-once repeats)"
        ));
    }
    if unknown > 0 {
        o.problem(format!(
            "{unknown} requests at the sink carried no known event id"
        ));
    }
}

// ---------------------------------------------------------------------------------------------
// baseline

async fn baseline(ctx: &Ctx) -> Result<Outcome> {
    let c = ctx.opts.concurrency;
    let mut o = Outcome::new(
        "baseline",
        format!(
            "the bench's client POSTing straight to the sink: {c} keep-alive connections, the e2e delivery body"
        ),
    );
    let rec = Recorder::new(0, false, 0);
    let route = ctx
        .sink
        .route("/base", Route::new(200, Duration::ZERO, Some(rec)));
    let c0 = ctx.sink.conn_snapshot();
    ctx.sink.reset_peak();
    let me0 = stats::proc_stat("self");
    let body: BodyFn = Arc::new(|i| {
        (
            Bytes::from(form_body(i)),
            "application/x-www-form-urlencoded",
        )
    });
    let url = ctx.sink.url("/base");
    let counted = load::closed_for(&url, c, ctx.sizes.baseline, 200, &body).await?;
    let (good, bad, elapsed) = (counted.good, counted.bad, counted.elapsed);
    let me1 = stats::proc_stat("self");
    let rps = good as f64 / elapsed.as_secs_f64();
    o.fig(
        "requests_per_s",
        format!(
            "requests/s (200s ÷ {:.1} s, closed loop, {c} connections)",
            elapsed.as_secs_f64()
        ),
        rps,
        int(rps),
    );
    o.text(
        "requests",
        "requests answered 200 / other",
        format!("{} / {}", int(good as f64), int(bad as f64)),
    );
    if bad > 0 {
        o.problem(format!("{bad} baseline requests failed"));
    }
    let hits = route.hits.load(Ordering::SeqCst);
    if hits != good + bad {
        o.problem(format!(
            "the sink counted {hits} requests, the client {} answers",
            good + bad
        ));
    }
    bench_cpu(
        &mut o,
        "bench process CPU s (client + sink)",
        (me0, me1),
        elapsed.as_secs_f64(),
        None,
    );
    o.conns = Some(conn_fig(
        ctx,
        c0,
        c as u64,
        format!(
            "the client's {c} connections, {} opened (no daemon here)",
            counted.connections
        ),
    ));
    ctx.sink.remove("/base");
    Ok(o)
}

// ---------------------------------------------------------------------------------------------
// e2e

async fn e2e(ctx: &Ctx) -> Result<Outcome> {
    let c = ctx.opts.concurrency;
    let n = ctx.sizes.e2e;
    let mut o = Outcome::new(
        "e2e",
        format!(
            "{} events → 1 subscription, closed loop with {c} concurrent intake requests, then a paced run at half the peak",
            int(n as f64)
        ),
    );
    let c0 = ctx.sink.conn_snapshot();
    ctx.sink.reset_peak();
    let inst = ctx.instance(&[]).await?;
    let base = inst.daemon.base();
    let rec = Recorder::new(n + WARM, false, 0);
    ctx.sink
        .route("/e2e", Route::new(200, Duration::ZERO, Some(rec.clone())));
    let sub = ctx
        .create_sub(
            &base,
            json!({"url": ctx.sink.url("/e2e"), "events": ["add_lead"], "name": "bench-e2e"}),
        )
        .await?;
    ctx.warmup(&base, "add_lead", n as u64, WARM as u64, || {
        rec.count_first.load(Ordering::SeqCst)
    })
    .await?;
    // The body the daemon sends is the body the baseline sends.
    if let Some(b) = rec.first_body.lock().unwrap().clone() {
        let id = sink::lead_id(&b).unwrap_or(0);
        if b != form_body(id).as_bytes() {
            o.note(format!(
                "the delivered body differs from the baseline's: {}",
                String::from_utf8_lossy(&b)
            ));
        }
    }

    ctx.log(format!("e2e: {n} events, {c} concurrent intake requests"));
    let p0 = inst.daemon.stat();
    let me0 = stats::proc_stat("self");
    let run = load::closed(
        &format!("{base}/v1/events"),
        c,
        n,
        0,
        Instant::now() + ctx.sizes.deliver_wait,
        &ctx.clock,
        &event_body("add_lead"),
    )
    .await?;
    let accepted = run.count(202) as u64;
    ctx.log(format!(
        "e2e: {accepted} accepted; waiting for the deliveries"
    ));
    let complete = wait_until(ctx.sizes.deliver_wait, || {
        rec.count_first.load(Ordering::SeqCst) >= WARM as u64 + accepted
    })
    .await;
    let p1 = inst.daemon.stat();
    let me1 = stats::proc_stat("self");
    let d = delivered(&run, std::slice::from_ref(&rec), complete);
    report_delivered(&mut o, &d, "events", ctx.sizes.deliver_wait);
    if run.count(202) != n {
        o.problem(format!(
            "intake answers other than 202: {}",
            run.failures(202)
        ));
    }
    let intake_s = secs_between(d.first_start, d.last_answer);
    let deliver_s = secs_between(d.first_start, d.last_arrival);
    let acc_rate = accepted as f64 / intake_s;
    let del_rate = d.arrived as f64 / deliver_s;
    o.text(
        "events",
        "events sent / accepted (202) / delivered (arrived once at the sink)",
        format!(
            "{} / {} / {}",
            int(n as f64),
            int(accepted as f64),
            int(d.arrived as f64)
        ),
    );
    o.text(
        "intake_connections",
        "intake connections the load generator opened to the daemon",
        run.connections.to_string(),
    );
    o.fig(
        "accepted_per_s",
        format!("accepted/s (202s ÷ {intake_s:.2} s from first request start to last 202)"),
        acc_rate,
        int(acc_rate),
    );
    o.fig(
        "delivered_per_s",
        format!(
            "delivered/s (arrivals ÷ {deliver_s:.2} s from first request start to last arrival)"
        ),
        del_rate,
        int(del_rate),
    );
    o.pct(
        "latency",
        "intake request start → arrival at the sink (peak load: includes queueing)",
        pct_ns(d.latencies.clone()),
    );
    o.pct(
        "intake_peak",
        "intake request latency at peak (POST /v1/events start → 202 read)",
        pct_ns(run.latencies(202)),
    );
    if let (Some(a), Some(b)) = (p0, p1) {
        let cpu = b.cpu_s - a.cpu_s;
        o.fig(
            "daemon_cpu_s",
            format!("daemon CPU s (utime+stime) over the {deliver_s:.1} s run"),
            cpu,
            format!(
                "{cpu:.1} ({:.0}% of one core; {:.0} µs per event)",
                100.0 * cpu / deliver_s,
                1e6 * cpu / d.arrived.max(1) as f64
            ),
        );
        o.fig(
            "daemon_peak_rss_mib",
            "daemon peak RSS (VmHWM)",
            b.hwm_kb as f64 / 1024.0,
            mib(b.hwm_kb),
        );
    }
    bench_cpu(
        &mut o,
        "bench process CPU s over the run (load generator + sink)",
        (me0, me1),
        deliver_s,
        None,
    );
    check_dups(&mut o, std::slice::from_ref(&rec));

    // Half the peak: the sustainable peak is the lower of intake and delivery.
    if complete && acc_rate.is_finite() && del_rate.is_finite() {
        let rate = acc_rate.min(del_rate) / 2.0;
        let n2 = ((rate * ctx.sizes.half.as_secs_f64()) as usize).max(1);
        ctx.log(format!(
            "e2e: paced run at {rate:.0} events/s for {:.0} s",
            ctx.sizes.half.as_secs_f64()
        ));
        let rec2 = Recorder::new(n2, false, 0);
        ctx.sink.route(
            "/e2e-half",
            Route::new(200, Duration::ZERO, Some(rec2.clone())),
        );
        ctx.patch_sub(&base, &sub, json!({"url": ctx.sink.url("/e2e-half")}))
            .await?;
        let steal0 = stats::cpu_totals();
        let run2 = load::paced(
            &format!("{base}/v1/events"),
            rate,
            n2,
            0,
            10 * c,
            32,
            &ctx.clock,
            &event_body("add_lead"),
        )
        .await?;
        let steal2 = steal_since(steal0);
        let acc2 = run2.count(202) as u64;
        let complete2 = wait_until(ctx.sizes.deliver_wait, || {
            rec2.count_first.load(Ordering::SeqCst) >= acc2
        })
        .await;
        let d2 = delivered(&run2, std::slice::from_ref(&rec2), complete2);
        report_delivered(
            &mut o,
            &d2,
            "events of the paced run",
            ctx.sizes.deliver_wait,
        );
        if run2.overloaded {
            o.problem("the half-rate run was stopped: too many intake requests unanswered");
        }
        if acc2 as usize != n2 {
            o.problem(format!(
                "half-rate run: intake answers other than 202: {}",
                run2.failures(202)
            ));
        }
        o.fig(
            "half_rate",
            "half-peak paced run: events/s (½ × min(accepted/s, delivered/s)), open loop",
            rate,
            format!(
                "{} for {:.0} s ({} events; sender at most {} ms behind schedule)",
                int(rate),
                ctx.sizes.half.as_secs_f64(),
                int(n2 as f64),
                ms(run2.max_late_ns as f64 / 1e6)
            ),
        );
        o.pct(
            "intake_half",
            "intake request latency at half the peak (POST /v1/events start → 202 read)",
            pct_ns(run2.latencies(202)),
        );
        o.pct(
            "latency_half",
            "intake request start → arrival at the sink, at half the peak",
            pct_ns(d2.latencies.clone()),
        );
        steal_fig(&mut o, "steal_half", "the half-peak run", steal2);
        // A run stopped early, or with requests refused, has no p99 to judge: the requests it
        // did not send or that failed would have been the slowest.
        if !complete2 || run2.overloaded || acc2 as usize != n2 {
            o.values.remove("intake_half");
            o.values.remove("latency_half");
        }
        ctx.sink.remove("/e2e-half");
    } else {
        o.problem("no half-rate run: the peak run did not complete");
    }
    o.conns = Some(conn_fig(
        ctx,
        c0,
        ctx.opts.per_subscription as u64,
        format!(
            "per_subscription {} × 1 subscription",
            ctx.opts.per_subscription
        ),
    ));
    if !complete {
        o.values.remove("delivered_per_s");
        o.values.remove("latency");
    }
    ctx.sink.remove("/e2e");
    drop(inst);
    Ok(o)
}

/// Steal since `from` (a [`stats::cpu_totals`] reading), s.
fn steal_since(from: Option<stats::CpuTotals>) -> Option<f64> {
    Some(stats::cpu_totals()?.steal_s - from?.steal_s)
}

/// The steal during a paced run, beside its latencies: while the hypervisor has stopped one of
/// this machine's virtual CPUs (for milliseconds at a time), the work queued on it waits, so a
/// run's p99 is read together with it (see README, Performance).
fn steal_fig(o: &mut Outcome, key: &'static str, run: &str, steal: Option<f64>) {
    if let Some(s) = steal {
        o.fig(
            key,
            format!(
                "steal during {run} (the host ran something else while this machine wanted to), s"
            ),
            s,
            format!("{s:.2}"),
        );
    }
}

// ---------------------------------------------------------------------------------------------
// paced

async fn paced(ctx: &Ctx) -> Result<Outcome> {
    let rate = ctx.sizes.paced_rate;
    let secs = ctx.sizes.paced.as_secs_f64();
    let n = (rate * secs) as usize;
    let mut o = Outcome::new(
        "paced",
        format!("{rate:.0} events/s for {secs:.0} s (open loop) → 1 subscription"),
    );
    if rate != 400.0 {
        o.problems.push(format!(
            "paced at {rate} events/s (--paced-rate), not the target's 400: not judged"
        ));
    }
    let c0 = ctx.sink.conn_snapshot();
    ctx.sink.reset_peak();
    let inst = ctx.instance(&[]).await?;
    let base = inst.daemon.base();
    let rec = Recorder::new(n + WARM, false, 0);
    ctx.sink
        .route("/paced", Route::new(200, Duration::ZERO, Some(rec.clone())));
    ctx.create_sub(
        &base,
        json!({"url": ctx.sink.url("/paced"), "events": ["add_lead"], "name": "bench-paced"}),
    )
    .await?;
    ctx.warmup(&base, "add_lead", n as u64, WARM as u64, || {
        rec.count_first.load(Ordering::SeqCst)
    })
    .await?;
    ctx.log(format!("paced: {n} events at {rate:.0}/s"));
    let p0 = inst.daemon.stat();
    let steal0 = stats::cpu_totals();
    let run = load::paced(
        &format!("{base}/v1/events"),
        rate,
        n,
        0,
        10 * ctx.opts.concurrency,
        32,
        &ctx.clock,
        &event_body("add_lead"),
    )
    .await?;
    let steal = steal_since(steal0);
    let accepted = run.count(202) as u64;
    let complete = wait_until(ctx.sizes.deliver_wait, || {
        rec.count_first.load(Ordering::SeqCst) >= WARM as u64 + accepted
    })
    .await;
    let p1 = inst.daemon.stat();
    let d = delivered(&run, std::slice::from_ref(&rec), complete);
    report_delivered(&mut o, &d, "events", ctx.sizes.deliver_wait);
    if run.overloaded {
        o.problem("the paced run was stopped: too many intake requests unanswered");
    }
    if accepted as usize != n {
        o.problem(format!(
            "intake answers other than 202: {}",
            run.failures(202)
        ));
    }
    o.text(
        "events",
        "events sent / accepted / delivered",
        format!(
            "{} / {} / {} (sender at most {} ms behind schedule)",
            int(n as f64),
            int(accepted as f64),
            int(d.arrived as f64),
            ms(run.max_late_ns as f64 / 1e6)
        ),
    );
    o.pct(
        "latency",
        "intake request start → arrival at the sink",
        pct_ns(d.latencies.clone()),
    );
    steal_fig(&mut o, "steal", "the paced run", steal);
    o.pct(
        "intake",
        "intake request latency (start → 202 read)",
        pct_ns(run.latencies(202)),
    );
    if let (Some(a), Some(b)) = (p0, p1) {
        let window = secs_between(d.first_start, d.last_arrival);
        let cpu = b.cpu_s - a.cpu_s;
        o.fig(
            "daemon_cpu_s",
            "daemon CPU s over the run",
            cpu,
            format!("{cpu:.2} ({:.0}% of one core)", 100.0 * cpu / window),
        );
        o.fig(
            "daemon_peak_rss_mib",
            "daemon peak RSS (VmHWM)",
            b.hwm_kb as f64 / 1024.0,
            mib(b.hwm_kb),
        );
    }
    check_dups(&mut o, std::slice::from_ref(&rec));
    if !complete || run.overloaded || accepted as usize != n {
        o.values.remove("latency");
        o.values.remove("intake");
    }
    o.conns = Some(conn_fig(
        ctx,
        c0,
        ctx.opts.per_subscription as u64,
        format!(
            "per_subscription {} × 1 subscription",
            ctx.opts.per_subscription
        ),
    ));
    ctx.sink.remove("/paced");
    drop(inst);
    Ok(o)
}

// ---------------------------------------------------------------------------------------------
// fanout

const FANOUT_SUBS: usize = 100;

/// The daemon's storage work alone, in this process through the library's `Store` on a temp dir:
/// the fanout's events and deliveries taken in (durably, in requests of one event as intake does),
/// then every delivery taken from the due index, claimed, read and recorded delivered the way the
/// engine does it, one task per subscription and no HTTP. Its rate is what the storage allows
/// the fanout (the writer thread applies every outcome), measured beside the baseline.
async fn storage(ctx: &Ctx) -> Result<Outcome> {
    use webhook_dispatcher::store::{self, Attempt, DeliveryStatus, Store, StoredEvent};
    let n = ctx.sizes.fanout;
    let mut o = Outcome::new(
        "storage",
        format!(
            "the fanout's storage work without HTTP: {} events → {FANOUT_SUBS} subscriptions = {} deliveries taken in and recorded delivered through the library's Store, in this process",
            int(n as f64),
            int((n * FANOUT_SUBS) as f64)
        ),
    );
    let dir = tempfile::Builder::new()
        .prefix("dispatcher-bench-store-")
        .tempdir_in(&ctx.dir)?;
    let st = Arc::new(Store::open(&dir.path().join("data"))?);
    let subs: Vec<uuid::Uuid> = (0..FANOUT_SUBS).map(|_| uuid::Uuid::new_v4()).collect();
    let body: serde_json::Value = serde_json::from_str(&event_json("add_lead", 1))?;
    let cpu = || stats::proc_stat("self").map(|p| p.cpu_s).unwrap_or(0.0);
    // Intake: `c` requests in flight, each one event with its deliveries, each awaiting its flush.
    let (cpu0, t0) = (cpu(), Instant::now());
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..ctx.opts.concurrency {
        let (st, subs, body, next) = (st.clone(), subs.clone(), body.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::SeqCst) < n {
                let event = StoredEvent {
                    id: store::new_event_id(),
                    received_at: stats::wall_us() / 1000,
                    name: "add_lead".into(),
                    event: body.clone(),
                    subscriptions: subs.clone(),
                };
                st.accept(&[event], &[], &[])?.wait().await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let (cpu1, intake_s) = (cpu(), t0.elapsed().as_secs_f64());
    // Outcomes: one task per subscription, as the engine's lanes.
    let t1 = Instant::now();
    let mut tasks = Vec::new();
    for sub in subs {
        let st = st.clone();
        tasks.push(tokio::spawn(async move {
            let mut done = 0u64;
            let mut scan = webhook_dispatcher::store::DueScan::default();
            loop {
                let due = st.lane_due_entries(&sub, 64, &mut scan)?;
                if due.is_empty() {
                    return anyhow::Ok(done);
                }
                let last = due.len() - 1;
                for (i, d) in due.into_iter().enumerate() {
                    if !st.claim(&d)? {
                        continue;
                    }
                    let Some((mut dl, _)) = st.delivery_and_event(&d.delivery, false)? else {
                        bail!("delivery {} has no record", d.delivery);
                    };
                    let now = stats::wall_us() / 1000;
                    dl.attempts.push(Attempt {
                        n: 1,
                        started_at: now,
                        duration_ms: 0,
                        code: 200,
                        error: None,
                        response_body: None,
                    });
                    dl.status = DeliveryStatus::Delivered;
                    dl.next_attempt_at = None;
                    dl.ended_at = Some(now);
                    done += 1;
                    if i == last {
                        // Written in order: once this one is, the chunk is.
                        st.record_attempt(&dl, d.due_ms).await?;
                    } else {
                        st.record_attempt_then(&dl, d.due_ms, Box::new(|_| {}));
                    }
                }
            }
        }));
    }
    let mut recorded = 0u64;
    for t in tasks {
        recorded += t.await??;
    }
    let (cpu2, outcome_s) = (cpu(), t1.elapsed().as_secs_f64());
    let total = (n * FANOUT_SUBS) as u64;
    if recorded != total {
        o.problem(format!("{recorded} of {total} deliveries were recorded"));
    }
    o.fig(
        "intake_events_per_s",
        format!(
            "intake: events/s ({} concurrent one-event requests, each awaiting its flush; {FANOUT_SUBS} due entries each)",
            ctx.opts.concurrency
        ),
        n as f64 / intake_s,
        format!(
            "{} ({:.0} µs of CPU per event)",
            int(n as f64 / intake_s),
            1e6 * (cpu1 - cpu0) / n as f64
        ),
    );
    o.fig(
        "deliveries_per_s",
        format!(
            "outcomes: deliveries/s recorded delivered ({FANOUT_SUBS} tasks, due entries read 64 at a time)"
        ),
        recorded as f64 / outcome_s,
        int(recorded as f64 / outcome_s),
    );
    o.fig(
        "cpu_us_per_delivery",
        "outcomes: CPU µs per delivery (this process; its sink is idle meanwhile)",
        1e6 * (cpu2 - cpu1) / recorded.max(1) as f64,
        format!(
            "{:.0} ({:.0}% of one core)",
            1e6 * (cpu2 - cpu1) / recorded.max(1) as f64,
            100.0 * (cpu2 - cpu1) / outcome_s
        ),
    );
    Ok(o)
}

/// The bench process's own CPU (load generator and sink) between two readings, as a share of one
/// core over `secs`, and per delivery when `deliveries` is given.
fn bench_cpu(
    o: &mut Outcome,
    label: &str,
    readings: (Option<stats::ProcStat>, Option<stats::ProcStat>),
    secs: f64,
    deliveries: Option<u64>,
) {
    let (Some(a), Some(b)) = readings else {
        return;
    };
    let cpu = b.cpu_s - a.cpu_s;
    let per = deliveries.map_or(String::new(), |n| {
        format!("; {:.0} µs per delivery", 1e6 * cpu / n.max(1) as f64)
    });
    o.fig(
        "bench_cpu_s",
        label,
        cpu,
        format!("{cpu:.1} ({:.0}% of one core{per})", 100.0 * cpu / secs),
    );
}

async fn fanout(ctx: &Ctx) -> Result<Outcome> {
    let c = ctx.opts.concurrency;
    let n = ctx.sizes.fanout;
    let mut o = Outcome::new(
        "fanout",
        format!(
            "{} events → {FANOUT_SUBS} subscriptions (the limit) = {} deliveries, closed loop with {c} concurrent intake requests",
            int(n as f64),
            int((n * FANOUT_SUBS) as f64)
        ),
    );
    let c0 = ctx.sink.conn_snapshot();
    ctx.sink.reset_peak();
    let inst = ctx.instance(&[]).await?;
    let base = inst.daemon.base();
    let mut recs = Vec::new();
    for k in 0..FANOUT_SUBS {
        let rec = Recorder::new(n + WARM, false, 0);
        let path = format!("/fan/{k}");
        ctx.sink
            .route(&path, Route::new(200, Duration::ZERO, Some(rec.clone())));
        ctx.create_sub(
            &base,
            json!({"url": ctx.sink.url(&path), "events": ["add_lead"], "name": format!("bench-fan-{k}")}),
        )
        .await?;
        recs.push(rec);
    }
    let total = |recs: &[Arc<Recorder>]| -> u64 {
        recs.iter()
            .map(|r| r.count_first.load(Ordering::SeqCst))
            .sum()
    };
    ctx.warmup(
        &base,
        "add_lead",
        n as u64,
        (WARM * FANOUT_SUBS) as u64,
        || total(&recs),
    )
    .await?;
    ctx.log(format!("fanout: {n} events × {FANOUT_SUBS} subscriptions"));
    let p0 = inst.daemon.stat();
    let me0 = stats::proc_stat("self");
    let run = load::closed(
        &format!("{base}/v1/events"),
        c,
        n,
        0,
        Instant::now() + ctx.sizes.deliver_wait,
        &ctx.clock,
        &event_body("add_lead"),
    )
    .await?;
    let accepted = run.count(202) as u64;
    let expect = (WARM as u64 + accepted) * FANOUT_SUBS as u64;
    let complete = wait_until(ctx.sizes.deliver_wait, || total(&recs) >= expect).await;
    let p1 = inst.daemon.stat();
    let me1 = stats::proc_stat("self");
    let d = delivered(&run, &recs, complete);
    report_delivered(&mut o, &d, "deliveries", ctx.sizes.deliver_wait);
    if accepted as usize != n {
        o.problem(format!(
            "intake answers other than 202: {}",
            run.failures(202)
        ));
    }
    let window = secs_between(d.first_start, d.last_arrival);
    let rate = d.arrived as f64 / window;
    o.text(
        "deliveries",
        "events accepted / deliveries due / arrived",
        format!(
            "{} / {} / {}",
            int(accepted as f64),
            int(d.accepted as f64),
            int(d.arrived as f64)
        ),
    );
    let intake_s = secs_between(d.first_start, d.last_answer);
    o.fig(
        "accepted_per_s",
        format!("events accepted/s (÷ {intake_s:.2} s of intake)"),
        accepted as f64 / intake_s,
        int(accepted as f64 / intake_s),
    );
    o.fig(
        "deliveries_per_s",
        format!("deliveries/s (arrivals ÷ {window:.2} s from first request start to last arrival)"),
        rate,
        int(rate),
    );
    o.pct(
        "latency",
        "intake request start → arrival, per delivery (events sent as fast as accepted: includes queueing)",
        pct_ns(d.latencies.clone()),
    );
    if let (Some(a), Some(b)) = (p0, p1) {
        let cpu = b.cpu_s - a.cpu_s;
        o.fig(
            "daemon_cpu_s",
            "daemon CPU s over the run",
            cpu,
            format!(
                "{cpu:.1} ({:.0}% of one core; {:.0} µs per delivery)",
                100.0 * cpu / window,
                1e6 * cpu / d.arrived.max(1) as f64
            ),
        );
        o.fig(
            "daemon_peak_rss_mib",
            "daemon peak RSS (VmHWM)",
            b.hwm_kb as f64 / 1024.0,
            mib(b.hwm_kb),
        );
    }
    bench_cpu(
        &mut o,
        "bench process CPU s over the run (load generator + sink)",
        (me0, me1),
        window,
        Some(d.arrived as u64),
    );
    check_dups(&mut o, &recs);
    if !complete {
        o.values.remove("deliveries_per_s");
        o.values.remove("latency");
    }
    let per = ctx.opts.per_subscription as u64;
    o.conns = Some(conn_fig(
        ctx,
        c0,
        per * FANOUT_SUBS as u64,
        format!(
            "per_subscription {per} × {FANOUT_SUBS} subscriptions, all on the one sink address (delivery.concurrency {} bounds those in flight at once)",
            ctx.knobs.concurrency
        ),
    ));
    for k in 0..FANOUT_SUBS {
        ctx.sink.remove(&format!("/fan/{k}"));
    }
    drop(inst);
    Ok(o)
}

// ---------------------------------------------------------------------------------------------
// isolation

const SLOW: Duration = Duration::from_millis(1900);

/// Room for the events of a time-bounded isolation run: six times what this machine's daemon
/// takes in over a 5 s run (about 20,000 events/s), so that time, not room, ends the run.
const ISOLATION_CAP: usize = 600_000;

/// One run of the isolation scenario (`round` numbers its figures): the fast subscription's
/// delivered/s over a time-bounded closed loop, with or without a slow one beside it; `None`
/// when not every accepted event arrived.
async fn isolation_run(
    ctx: &Ctx,
    with_slow: bool,
    round: usize,
    o: &mut Outcome,
) -> Result<Option<f64>> {
    let n = ISOLATION_CAP;
    let c = ctx.opts.concurrency;
    let label = if with_slow {
        format!("beside the slow one (run {round})")
    } else {
        format!("alone (run {round})")
    };
    // Several runs of each kind: their figures are told apart by the run's number.
    let key = |name: &str| report::leak(format!("{name}_{round}"));
    let c0 = ctx.sink.conn_snapshot();
    ctx.sink.reset_peak();
    let inst = ctx.instance(&[]).await?;
    let base = inst.daemon.base();
    let fast_path = if with_slow {
        "/iso-fast-mixed"
    } else {
        "/iso-fast-solo"
    };
    let rec = Recorder::new(n + WARM, false, 0);
    ctx.sink.route(
        fast_path,
        Route::new(200, Duration::ZERO, Some(rec.clone())),
    );
    let mut slow_route = None;
    if with_slow {
        let r = ctx.sink.route("/iso-slow", Route::new(200, SLOW, None));
        ctx.create_sub(
            &base,
            json!({"url": ctx.sink.url("/iso-slow"), "events": ["update_lead"], "name": "bench-slow"}),
        )
        .await?;
        // Enough slow events to keep its lane full for the whole run: 1000 events take
        // 1000 / per_subscription × 1.9 s to drain.
        let batch: Vec<Value> = (0..1000u64)
            .map(|i| serde_json::from_str(&event_json("update_lead", i)).unwrap())
            .collect();
        ctx.call(
            reqwest::Method::POST,
            format!("{base}/v1/events"),
            Some(json!({ "events": batch })),
        )
        .await?;
        let per = ctx.opts.per_subscription as i64;
        if !wait_until(Duration::from_secs(10), || {
            r.in_progress.load(Ordering::SeqCst) >= per
        })
        .await
        {
            o.problem(format!(
                "the slow subscription had only {} attempts in flight (cap {per})",
                r.in_progress.load(Ordering::SeqCst)
            ));
        }
        slow_route = Some(r);
    }
    ctx.create_sub(
        &base,
        json!({"url": ctx.sink.url(fast_path), "events": ["add_lead"], "name": "bench-fast"}),
    )
    .await?;
    ctx.warmup(&base, "add_lead", n as u64, WARM as u64, || {
        rec.count_first.load(Ordering::SeqCst)
    })
    .await?;
    ctx.log(format!("isolation: fast subscription {label}"));
    let slow_hits0 = slow_route
        .as_ref()
        .map(|r| r.hits.load(Ordering::SeqCst))
        .unwrap_or(0);
    let run = load::closed(
        &format!("{base}/v1/events"),
        c,
        n,
        0,
        Instant::now() + ctx.sizes.isolation,
        &ctx.clock,
        &event_body("add_lead"),
    )
    .await?;
    let accepted = run.count(202) as u64;
    let sent = run.n() - run.count(load::NOT_SENT);
    if sent == n {
        o.problem(format!(
            "{label}: the run sent all {n} events it had room for before its time was up"
        ));
    }
    let complete = wait_until(ctx.sizes.deliver_wait, || {
        rec.count_first.load(Ordering::SeqCst) >= WARM as u64 + accepted
    })
    .await;
    if let Some(r) = &slow_route {
        let per = ctx.opts.per_subscription as i64;
        let now = r.in_progress.load(Ordering::SeqCst);
        if now < per {
            o.problem(format!(
                "the slow subscription had {now} attempts in flight at the end of the run, not {per}: its lane was not kept full"
            ));
        }
    }
    let d = delivered(&run, std::slice::from_ref(&rec), complete);
    let mut scratch = Outcome::new(o.name, "");
    report_delivered(&mut scratch, &d, "events", ctx.sizes.deliver_wait);
    for p in scratch.problems {
        o.problems.push(format!("fast subscription {label}: {p}"));
    }
    if accepted as usize != sent {
        o.problem(format!(
            "{label}: intake answers other than 202: {}",
            run.failures(202)
        ));
    }
    let window = secs_between(d.first_start, d.last_arrival);
    o.text(
        key(if with_slow { "mixed_events" } else { "solo_events" }),
        format!("fast subscription {label}: events accepted in {:.0} s of closed-loop intake / delivered", ctx.sizes.isolation.as_secs_f64()),
        format!("{} / {}", int(accepted as f64), int(d.arrived as f64)),
    );
    let rate = d.arrived as f64 / window;
    let key_rate = key(if with_slow {
        "mixed_per_s"
    } else {
        "solo_per_s"
    });
    let key_lat = key(if with_slow {
        "mixed_latency"
    } else {
        "solo_latency"
    });
    o.fig(
        key_rate,
        format!("fast subscription {label}: delivered/s (÷ {window:.2} s, first request start → last arrival)"),
        rate,
        int(rate),
    );
    o.pct(
        key_lat,
        &format!("fast subscription {label}: intake start → arrival"),
        pct_ns(d.latencies.clone()),
    );
    if let Some(r) = &slow_route {
        let hits = r.hits.load(Ordering::SeqCst) - slow_hits0;
        let expect = ctx.opts.per_subscription as f64 / SLOW.as_secs_f64();
        o.text(
            key("slow_rate"),
            "slow subscription (answers after 1.9 s) during that run: attempts/s",
            format!(
                "{:.1} (its cap allows {expect:.1}: per_subscription / 1.9 s)",
                hits as f64 / window
            ),
        );
    }
    check_dups(o, std::slice::from_ref(&rec));
    let subs = if with_slow { 2 } else { 1 };
    let per = ctx.opts.per_subscription as u64;
    let cf = conn_fig(
        ctx,
        c0,
        per * subs,
        format!("per_subscription {per} × {subs} subscription(s)"),
    );
    o.text(
        key(if with_slow {
            "mixed_connections"
        } else {
            "solo_connections"
        }),
        format!("new connections at the sink, run {label}"),
        format!("{} (cap {})", cf.new, cf.cap),
    );
    match &mut o.conns {
        Some(prev) => {
            // The scenario's figure: the run that used its cap the most.
            if cf.new as f64 / cf.cap as f64 > prev.new as f64 / prev.cap as f64 {
                *prev = cf;
            }
        }
        None => o.conns = Some(cf),
    }
    ctx.sink.remove(fast_path);
    ctx.sink.remove("/iso-slow");
    drop(inst);
    Ok((complete && d.missing == 0).then_some(rate))
}

/// The isolation runs, `true` beside the slow subscription: ABBA BAAB, which cancels a drift of the
/// host's speed that is linear or quadratic in time, and averages four short runs of each kind
/// rather than two long ones (the host's speed moves by a third within minutes here).
const ISOLATION_ORDER: [bool; 8] = [false, true, true, false, true, false, false, true];

async fn isolation(ctx: &Ctx) -> Result<Outcome> {
    let mut o = Outcome::new(
        "isolation",
        format!(
            "{:.0} s of closed-loop intake ({} concurrent) to a fast subscription, alone or beside one whose receiver answers after 1.9 s (its lane kept full), each on a fresh daemon, eight runs in the order alone, beside, beside, alone, beside, alone, alone, beside, so that a drift of the host's speed weighs on both alike",
            ctx.sizes.isolation.as_secs_f64(),
            ctx.opts.concurrency
        ),
    );
    let (mut solo, mut mixed) = (Some(0.0), Some(0.0));
    for (i, &with_slow) in ISOLATION_ORDER.iter().enumerate() {
        // Runs of each kind are numbered from 1.
        let round = 1 + ISOLATION_ORDER[..i]
            .iter()
            .filter(|&&k| k == with_slow)
            .count();
        let rate = isolation_run(ctx, with_slow, round, &mut o).await?;
        let sum = if with_slow { &mut mixed } else { &mut solo };
        *sum = sum.zip(rate).map(|(a, b)| a + b);
    }
    if let (Some(s), Some(m)) = (solo, mixed) {
        let ratio = m / s;
        o.fig(
            "ratio",
            "fast subscription's delivered/s beside the slow one ÷ alone (sums of the four runs of each)",
            ratio,
            format!("{:.1}%", 100.0 * ratio),
        );
    }
    Ok(o)
}

// ---------------------------------------------------------------------------------------------
// backlog

/// What an ingest of held events came to.
struct Ingested {
    /// Ids of the events accepted (their batch answered 202).
    ids: Vec<usize>,
    /// Start → 202 of each batch request of `BATCH` events, ns.
    batch_latencies: Vec<i64>,
    secs: f64,
    failures: Vec<String>,
    /// Where the bench switched to batches of `SMALL_BATCH`: (events sent so far, daemon RSS KiB).
    switched: Option<(usize, u64)>,
}

/// Batches sent once the daemon's RSS passes the soft limit with batches of `BATCH`.
const SMALL_BATCH: usize = 100;

/// POSTs events `0..n` as `{"events": [...]}` batches of `BATCH` from `workers` workers, in
/// chunks of 20 requests; when the daemon's RSS passes `soft_kb` between chunks, the rest goes in
/// batches of `SMALL_BATCH` (and that is reported).
async fn ingest(
    ctx: &Ctx,
    d: &Daemon,
    event: &'static str,
    n: usize,
    workers: usize,
    soft_kb: u64,
) -> Result<Ingested> {
    let url = format!("{}/v1/events", d.base());
    let mut out = Ingested {
        ids: Vec::with_capacity(n),
        batch_latencies: Vec::new(),
        secs: 0.0,
        failures: Vec::new(),
        switched: None,
    };
    let mut batch = BATCH;
    let mut next = 0usize;
    let t = Instant::now();
    while next < n {
        let from = next;
        let count = (batch * 20).min(n - from);
        let size = batch;
        let body: BodyFn = Arc::new(move |b| {
            let lo = from + b as usize * size;
            let hi = (lo + size).min(from + count);
            let mut s = String::with_capacity((hi - lo) * 140 + 16);
            s.push_str(r#"{"events":["#);
            for id in lo..hi {
                if id > lo {
                    s.push(',');
                }
                s.push_str(&event_json(event, id as u64));
            }
            s.push_str("]}");
            (Bytes::from(s), "application/json")
        });
        let run = load::closed(
            &url,
            workers,
            count.div_ceil(size),
            0,
            Instant::now() + Duration::from_secs(600),
            &ctx.clock,
            &body,
        )
        .await?;
        for b in run.with(202) {
            let lo = from + b * size;
            out.ids.extend(lo..(lo + size).min(from + count));
        }
        if size == BATCH {
            out.batch_latencies.extend(run.latencies(202));
        }
        if run.count(202) != run.n() {
            out.failures.push(run.failures(202));
        }
        next += count;
        if batch == BATCH
            && let Some(st) = d.stat()
            && st.rss_kb > soft_kb
            && next < n
        {
            out.switched = Some((next, st.rss_kb));
            batch = SMALL_BATCH;
        }
        if ctx.guard.tripped_kb.load(Ordering::SeqCst) > 0 {
            bail!("the daemon was killed by the RSS guard during the ingest");
        }
    }
    out.secs = t.elapsed().as_secs_f64();
    Ok(out)
}

/// How a restart on the same storage and address went.
struct Restart {
    stop: Duration,
    clean: bool,
    to_listen: f64,
    to_health: f64,
}

/// SIGTERM, then a new daemon on the same storage and address with `policies`: the time from
/// spawn to the `listening on` line and to the first 200 from /healthz (polled every ms).
async fn restart(ctx: &Ctx, inst: &mut Instance, policies: &[(String, String)]) -> Result<Restart> {
    let addr = inst.daemon.addr().to_string();
    std::fs::write(
        &inst.config,
        daemon::config_toml(&addr, &inst.storage, &ctx.knobs, policies),
    )?;
    daemon::check_config(&ctx.bin, &inst.config)?;
    let (stop, clean) = inst.daemon.terminate(Duration::from_secs(60)).await?;
    let mut d2 = Daemon::spawn(
        &ctx.bin,
        &inst.config,
        ctx.opts.daemon_log.as_deref(),
        &ctx.guard,
    )?;
    let health = format!("http://{addr}/healthz");
    let probe = load::client(1);
    let mut healthy_at = None;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let listening = d2.poll_listening()?;
        if healthy_at.is_none()
            && let Ok(r) = probe
                .get(&health)
                .timeout(Duration::from_secs(1))
                .send()
                .await
            && r.status().is_success()
        {
            healthy_at = Some(Instant::now());
        }
        if listening && healthy_at.is_some() {
            break;
        }
        if Instant::now() > deadline {
            bail!("the restarted daemon did not serve within 300 s");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let to_listen = d2.listening_after().unwrap_or_default().as_secs_f64();
    let to_health = healthy_at
        .expect("healthy")
        .saturating_duration_since(d2.spawned)
        .as_secs_f64();
    inst.daemon = d2;
    inst.policies = policies.to_vec();
    Ok(Restart {
        stop,
        clean,
        to_listen,
        to_health,
    })
}

/// Seconds from the first to the last of `(id, arrival)` pairs (at least 1 ns).
fn retry_window_secs(arrivals: &[(usize, u64)]) -> f64 {
    let lo = arrivals.iter().map(|a| a.1).min().unwrap_or(0);
    let hi = arrivals.iter().map(|a| a.1).max().unwrap_or(0);
    (hi.saturating_sub(lo)).max(1) as f64 / 1e9
}

async fn backlog(ctx: &Ctx) -> Result<Outcome> {
    let n = ctx.sizes.backlog;
    let calib_n = (n / 20).clamp(5_000, 50_000);
    let workers = 4;
    let soft_kb = ctx.guard.limit_kb / 2;
    let mut o = Outcome::new(
        "backlog",
        format!(
            "{} deliveries waiting for retry (receiver answering 500), a restart, then the retries come due",
            int(n as f64)
        ),
    );
    let c0 = ctx.sink.conn_snapshot();
    ctx.sink.reset_peak();
    let mut inst = ctx.instance(&[]).await?;
    let base = inst.daemon.base();
    let rec = Recorder::new(n, true, (n as u64 / 1000).max(1));
    let route = ctx
        .sink
        .route("/fail", Route::new(500, Duration::ZERO, Some(rec.clone())));
    let crec = Recorder::new(calib_n, false, 0);
    ctx.sink.route(
        "/calib",
        Route::new(500, Duration::ZERO, Some(crec.clone())),
    );
    // Both subscriptions start disabled: intake stores their deliveries held, so the ingest is
    // measured alone and the attempts start when the bench enables them.
    let sub = ctx
        .create_sub(
            &base,
            json!({"url": ctx.sink.url("/fail"), "events": ["add_lead"], "retry": "once",
                   "enabled": false, "name": "bench-backlog"}),
        )
        .await?;
    let csub = ctx
        .create_sub(
            &base,
            json!({"url": ctx.sink.url("/calib"), "events": ["update_lead"], "retry": "once",
                   "enabled": false, "name": "bench-calibration"}),
        )
        .await?;

    // 1. Ingest.
    ctx.log(format!(
        "backlog: ingesting {n} events in batches of {BATCH} from {workers} workers"
    ));
    let p_ing0 = inst.daemon.stat();
    let ing = ingest(ctx, &inst.daemon, "add_lead", n, workers, soft_kb).await?;
    let p_ing1 = inst.daemon.stat();
    let accepted = ing.ids.len();
    for f in &ing.failures {
        o.problem(format!("ingest: batch answers other than 202: {f}"));
    }
    if accepted == 0 {
        bail!("nothing was ingested");
    }
    let (disk_ing, _) = stats::disk_usage(&inst.storage);
    o.fig(
        "ingest_per_s",
        format!(
            "ingest: events/s ({} events accepted in {:.1} s, {workers} concurrent batch requests, deliveries held)",
            int(accepted as f64),
            ing.secs
        ),
        accepted as f64 / ing.secs,
        int(accepted as f64 / ing.secs),
    );
    o.pct(
        "ingest_batch",
        &format!("ingest: one request of {BATCH} events, start → 202"),
        pct_ns(ing.batch_latencies.clone()),
    );
    if let Some((at, rss)) = ing.switched {
        o.problem(format!(
            "ingest: the daemon's RSS reached {} after {} events in batches of {BATCH} (≈ {:.1} KiB per event, not given back); the other {} went in batches of {SMALL_BATCH} to stay under the bench's RSS guard",
            mib(rss),
            int(at as f64),
            rss as f64 / at as f64,
            int((n - at) as f64)
        ));
    }
    if let (Some(a), Some(b)) = (p_ing0, p_ing1) {
        o.text(
            "ingest_daemon",
            "ingest: daemon CPU s / RSS after (VmRSS) / peak (VmHWM) / disk after",
            format!(
                "{:.1} s / {} / {} / {:.0} MB",
                b.cpu_s - a.cpu_s,
                mib(b.rss_kb),
                mib(b.hwm_kb),
                disk_ing as f64 / 1e6
            ),
        );
    }

    // A fresh process for what follows: the ingest's memory is not theirs.
    let held_restart = restart(ctx, &mut inst, &[]).await?;
    o.text(
        "restart_held",
        format!(
            "restart with {} deliveries held (not yet attempted): spawn → /healthz 200",
            int(accepted as f64)
        ),
        format!("{:.3} s", held_restart.to_health),
    );

    // 2. Calibration at full size: failing first attempts of a second subscription's held
    //    deliveries, to size the retry delay so that every delivery fails once and the daemon
    //    restarts before the first retry is due.
    ctx.log(format!(
        "backlog: calibrating with {calib_n} failing first attempts of another subscription"
    ));
    let cing = ingest(ctx, &inst.daemon, "update_lead", calib_n, workers, soft_kb).await?;
    let t_cal = ctx.clock.now_ns();
    ctx.patch_sub(&base, &csub, json!({"enabled": true}))
        .await?;
    let cexpect = cing.ids.len() as u64;
    if !wait_until(Duration::from_secs(900), || {
        crec.count_first.load(Ordering::SeqCst) >= cexpect
    })
    .await
    {
        bail!("calibration: the first attempts did not all arrive within 900 s");
    }
    let clast = (0..calib_n)
        .filter_map(|i| crec.first(i))
        .max()
        .unwrap_or(t_cal);
    let calib_rate = cexpect as f64 / secs_between(t_cal, clast);
    ctx.sink.remove("/calib");
    // The first attempts are spread at `backlog_pace` × the calibrated rate: the sink answers
    // each after `answer_us`, with per_subscription attempts in flight.
    let per = ctx.opts.per_subscription as f64;
    let pace = ctx.opts.backlog_pace;
    let answer_us = if pace > 0.0 {
        (per / (calib_rate * pace) * 1e6) as u64
    } else {
        0
    };
    let planned_rate = if pace > 0.0 {
        calib_rate * pace
    } else {
        calib_rate
    };
    route.delay_us.store(answer_us, Ordering::SeqCst);
    let est_first = accepted as f64 / planned_rate;
    // A margin of 2: with a million waiting, the first attempts ran up to a fifth slower than
    // planned (the events are colder than the calibration's), and a retry due before the last
    // first attempt breaks the scenario.
    let margin = 2.0;
    let after_s = (((est_first * margin + 30.0) / 5.0).ceil() * 5.0) as u64;
    let after_ns = after_s * 1_000_000_000;
    // The daemon counts the delay from the end of the attempt, at least `answer_us` after
    // the request arrived at the sink.
    let due_from_arrival_ns = after_ns + answer_us * 1000;
    let policies = vec![("bench-retry".to_string(), format!("{after_s}s"))];
    o.text(
        "policy",
        format!(
            "retry policy `bench-retry`: {margin} × the planned time of the first attempts + 30 s"
        ),
        format!(
            "[{{ after = \"{after_s}s\" }}]; calibration: {} failing first attempts at {}/s",
            int(cexpect as f64),
            int(calib_rate)
        ),
    );
    o.text(
        "pace",
        "first attempts spread by the sink answering each 500 after a delay (--backlog-pace)",
        if pace > 0.0 {
            format!(
                "{} µs per answer → planned {}/s = {pace} × calibrated",
                answer_us,
                int(planned_rate)
            )
        } else {
            "no delay: as fast as the daemon goes".into()
        },
    );
    ctx.log(format!(
        "backlog: {calib_rate:.0} attempts/s; policy after = {after_s} s; expect about {:.0} min more",
        (est_first + after_s as f64 + est_first * 1.2) / 60.0
    ));
    // The policy is in the config, so the daemon restarts to take it (its deliveries are held).
    let conns_a = ctx.sink.conn_snapshot();
    restart(ctx, &mut inst, &policies).await?;

    // 3. First attempts: every delivery fails once with 500.
    ctx.log(format!("backlog: {accepted} first attempts (answered 500)"));
    let p_fa0 = inst.daemon.stat();
    let t_enable = ctx.clock.now_ns();
    ctx.patch_sub(
        &base,
        &sub,
        json!({"retry": "bench-retry", "enabled": true}),
    )
    .await?;
    let first_done = wait_until(Duration::from_secs(after_s + 60), || {
        rec.count_first.load(Ordering::SeqCst) >= accepted as u64
    })
    .await;
    let firsts: Vec<u64> = ing.ids.iter().filter_map(|&i| rec.first(i)).collect();
    let first_min = firsts.iter().copied().min().unwrap_or(t_enable);
    let first_max = firsts.iter().copied().max().unwrap_or(t_enable);
    if !first_done {
        o.problem(format!(
            "timeout: {} of {accepted} first attempts arrived",
            firsts.len()
        ));
    }
    let first_rate = firsts.len() as f64 / secs_between(t_enable, first_max);
    o.fig(
        "first_attempts_per_s",
        format!(
            "first attempts (answered 500)/s (÷ {:.1} s from enabling the subscription to the last arrival)",
            secs_between(t_enable, first_max)
        ),
        first_rate,
        int(first_rate),
    );
    if first_max > first_min + due_from_arrival_ns {
        o.problem(format!(
            "the first retries came due before the last first attempt ({:.0} s after the first): never were all {accepted} waiting at once",
            secs_between(first_min, first_max)
        ));
    }
    // Exact due times of a sample, from the daemon's own record.
    let samples: Vec<(u64, sink::Sample)> = rec
        .samples
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (*k, v.clone()))
        .collect();
    let mut dues: Vec<(u64, u64)> = Vec::new(); // (id, due wall ms)
    let mut no_due = 0usize;
    for (id, s) in &samples {
        let url = format!("{base}/v1/deliveries/{}", s.webhook_id);
        let mut due = None;
        for _ in 0..200 {
            if let Ok(v) = ctx.call(reqwest::Method::GET, url.clone(), None).await
                && v["attempts"].as_array().is_some_and(|a| a.len() == 1)
                && let Some(t) = v["next_attempt_at"].as_str()
                && let Ok(at) = humantime::parse_rfc3339(t)
                && let Ok(since) = at.duration_since(std::time::UNIX_EPOCH)
            {
                due = Some(since.as_millis() as u64);
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        match due {
            Some(d) => dues.push((*id, d)),
            None => no_due += 1,
        }
    }
    if no_due > 0 {
        o.problem(format!(
            "{no_due} sampled deliveries show no next_attempt_at after their first attempt"
        ));
    }
    if !wait_quiet(&inst.daemon, Duration::from_secs(30)).await {
        o.note("the daemon was still busy 30 s after the last first attempt");
    }
    let pending1 = ctx.pending_metric(&base).await;
    let p_wait = inst.daemon.stat();
    let (disk_wait, disk_wait_apparent) = stats::disk_usage(&inst.storage);
    if let (Some(a), Some(b)) = (p_fa0, p_wait) {
        o.text(
            "first_daemon",
            "first attempts: daemon CPU s / peak RSS (VmHWM)",
            format!("{:.1} s / {}", b.cpu_s - a.cpu_s, mib(b.hwm_kb)),
        );
    }
    o.text(
        "pending_before",
        "deliveries pending per the daemon (/metrics dispatcher_deliveries_pending) while waiting",
        pending1.map_or("-".into(), int),
    );
    if let Some(p) = p_wait {
        o.fig(
            "rss_waiting_mib",
            format!(
                "RSS (VmRSS) with {} waiting, before the restart",
                int(accepted as f64)
            ),
            p.rss_kb as f64 / 1024.0,
            mib(p.rss_kb),
        );
    }
    o.fig(
        "disk_bytes",
        "bytes on disk (du of the storage dir) while waiting",
        disk_wait as f64,
        format!(
            "{:.0} MB ({:.0} MB apparent; {:.0} bytes per delivery)",
            disk_wait as f64 / 1e6,
            disk_wait_apparent as f64 / 1e6,
            disk_wait as f64 / accepted as f64
        ),
    );

    // 4. The measured restart, on the same storage and address.
    let conns_p1 = ctx.sink.conn_snapshot();
    ctx.log("backlog: SIGTERM and restart");
    let r = restart(ctx, &mut inst, &policies).await?;
    let p_restart = inst.daemon.stat();
    o.text(
        "shutdown",
        "SIGTERM → exit",
        format!(
            "{} ms{}",
            ms(r.stop.as_secs_f64() * 1e3),
            if r.clean { " (exit 0)" } else { " (not clean)" }
        ),
    );
    o.fig(
        "restart_listening_s",
        "restart: spawn → `listening on` printed, s",
        r.to_listen,
        format!("{:.3}", r.to_listen),
    );
    o.fig(
        "restart_s",
        "restart: spawn → GET /healthz answered 200, s",
        r.to_health,
        format!("{:.3}", r.to_health),
    );
    // The restarted daemon counts what is pending in the background (its lanes start once the
    // count is done) and publishes the gauge then: read it once it matches, or after 20 s.
    let counting = Instant::now();
    let mut pending2 = ctx.pending_metric(&base).await;
    while pending1.is_some() && pending2 != pending1 && counting.elapsed() < Duration::from_secs(20)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
        pending2 = ctx.pending_metric(&base).await;
    }
    o.text(
        "pending_after",
        "deliveries pending per the daemon after the restart, once it has counted them",
        pending2.map_or("-".into(), int),
    );
    if pending2.is_some() && pending2 == pending1 {
        let to_count = r.to_health + counting.elapsed().as_secs_f64();
        o.fig(
            "restart_counted_s",
            "restart: spawn → the pending count on /metrics (lanes start then), s",
            to_count,
            format!("{to_count:.3}"),
        );
    } else {
        o.note("the restarted daemon's pending count did not match the count before the restart within 20 s");
    }
    if let Some(p) = p_restart {
        o.text(
            "rss_restart",
            "RSS (VmRSS) of the restarted daemon once serving",
            mib(p.rss_kb),
        );
    }

    // 5. The retries come due: the sink answers 200 from now on.
    route.status.store(200, Ordering::SeqCst);
    route.delay_us.store(0, Ordering::SeqCst);
    let now = ctx.clock.now_ns();
    let first_due = first_min + due_from_arrival_ns;
    if now > first_due {
        o.problem(format!(
            "the restart ended {:.1} s after the first retry was due: the lag includes the restart",
            secs_between(first_due, now)
        ));
    } else {
        ctx.log(format!(
            "backlog: waiting {:.0} s for the first retry to come due, then {:.0} s of retries",
            secs_between(now, first_due),
            secs_between(first_min, first_max)
        ));
    }
    let last_due = first_max + due_from_arrival_ns;
    let wait_for = Duration::from_nanos(last_due.saturating_sub(now))
        + Duration::from_secs(120).max(ctx.sizes.deliver_wait);
    let pid = inst.daemon.pid.to_string();
    let sampler_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = sampler_stop.clone();
        tokio::spawn(async move {
            let mut max_rss = 0u64;
            while !stop.load(Ordering::SeqCst) {
                if let Some(s) = stats::proc_stat(&pid) {
                    max_rss = max_rss.max(s.rss_kb);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            max_rss
        })
    };
    let p_due0 = inst.daemon.stat();
    let due_done = wait_until(wait_for, || {
        rec.count_second.load(Ordering::SeqCst) >= accepted as u64
    })
    .await;
    sampler_stop.store(true, Ordering::SeqCst);
    let max_rss_p2 = sampler.await.unwrap_or(0);
    let p_end = inst.daemon.stat();
    let seconds: Vec<(usize, u64)> = ing
        .ids
        .iter()
        .filter_map(|&i| rec.second(i).map(|t| (i, t)))
        .collect();
    if !due_done {
        o.problem(format!(
            "timeout: {} of {accepted} retries arrived within {:.0} s",
            seconds.len(),
            wait_for.as_secs_f64()
        ));
    }
    // Lag, every delivery: its due time taken as first arrival + delay. The daemon counts the
    // delay from the end of the attempt (after the sink answered), so the true due time is a
    // little later and this lag an upper bound.
    let timed: Vec<(u64, i64)> = seconds
        .iter()
        .filter_map(|&(i, t2)| {
            rec.first(i).map(|t1| {
                let due = t1 + due_from_arrival_ns;
                (due, t2 as i64 - due as i64)
            })
        })
        .collect();
    let lags: Vec<i64> = timed.iter().map(|t| t.1).collect();
    // How the lag moves over the retries: p99 of each tenth of the due window.
    if let (Some(lo), Some(hi)) = (
        timed.iter().map(|t| t.0).min(),
        timed.iter().map(|t| t.0).max(),
    ) {
        let span = (hi - lo).max(1);
        let mut tenths: Vec<Vec<i64>> = vec![Vec::new(); 10];
        for (due, lag) in &timed {
            let k = (((due - lo) as u128 * 10 / span as u128) as usize).min(9);
            tenths[k].push(*lag);
        }
        o.text(
            "lag_tenths",
            "scheduler lag p99 of each tenth of the due window (upper bound), ms",
            tenths
                .into_iter()
                .map(|v| pct_ns(v).map_or("-".into(), |p| ms(p.p99)))
                .collect::<Vec<_>>()
                .join(" / "),
        );
        let due_rate = timed.len() as f64 / (span as f64 / 1e9);
        o.text(
            "due_rate",
            "retries came due at / arrived at (per s over their windows)",
            format!(
                "{} / {}",
                int(due_rate),
                int(seconds.len() as f64 / retry_window_secs(&seconds))
            ),
        );
    }
    let (smin, smax) = seconds
        .iter()
        .fold((u64::MAX, 0u64), |(lo, hi), s| (lo.min(s.1), hi.max(s.1)));
    let retry_window = if seconds.is_empty() {
        0.0
    } else {
        secs_between(smin, smax)
    };
    o.text(
        "retries",
        "retries arrived (answered 200) / due",
        format!(
            "{} / {} over {retry_window:.1} s",
            int(seconds.len() as f64),
            int(accepted as f64)
        ),
    );
    // Exact, for the sample: the daemon's next_attempt_at (wall clock, ms) vs the wall-clock
    // arrival of the retry.
    let samples_now = rec.samples.lock().unwrap().clone();
    let mut exact = Vec::new();
    let mut eps = Vec::new();
    for (id, due_ms) in &dues {
        if let Some(s) = samples_now.get(id)
            && s.second_wall_us > 0
        {
            let due_us = (*due_ms as i64) * 1000;
            exact.push((s.second_wall_us as i64 - due_us) * 1000);
            eps.push((due_us - (s.first_wall_us + due_from_arrival_ns / 1000) as i64) * 1000);
        }
    }
    o.pct(
        "lag",
        "scheduler lag, sample: retry arrival − next_attempt_at from GET /v1/deliveries/{id}",
        pct_ns(exact),
    );
    o.pct(
        "lag_all",
        "scheduler lag, every delivery: retry arrival − (first arrival + answer delay + policy delay), an upper bound",
        pct_ns(lags),
    );
    o.pct(
        "due_offset",
        "sample: next_attempt_at − (first arrival + answer delay + policy delay): how much the upper bound overstates",
        pct_ns(eps),
    );
    if let (Some(a), Some(b)) = (p_due0, p_end) {
        o.text(
            "retry_daemon",
            "restarted daemon over waiting + retries: CPU s / highest VmRSS sampled / VmHWM",
            format!(
                "{:.1} s / {} / {}",
                b.cpu_s - a.cpu_s,
                mib(max_rss_p2),
                mib(b.hwm_kb)
            ),
        );
        o.values.insert("rss_pending_mib", b.hwm_kb as f64 / 1024.0);
        o.json.insert(
            "rss_pending_mib".into(),
            report::num(b.hwm_kb as f64 / 1024.0),
        );
    }
    let (disk_end, _) = stats::disk_usage(&inst.storage);
    o.text(
        "disk_end",
        "bytes on disk after every retry was delivered",
        format!("{:.0} MB", disk_end as f64 / 1e6),
    );
    check_dups(&mut o, std::slice::from_ref(&rec));
    if !due_done || !first_done {
        o.values.remove("lag");
        o.values.remove("lag_all");
    }
    let per = ctx.opts.per_subscription as u64;
    let end = ctx.sink.conn_snapshot();
    let per_process = [
        conns_a.accepted - c0.accepted,
        conns_p1.accepted - conns_a.accepted,
        end.accepted - conns_p1.accepted,
    ];
    o.text(
        "conns_per_process",
        "new connections at the sink per daemon process: calibration / first attempts / retries",
        format!(
            "{} / {} / {} (cap {per} each: one subscription sends at a time)",
            per_process[0], per_process[1], per_process[2]
        ),
    );
    let cf = conn_fig(
        ctx,
        c0,
        per * 3,
        format!(
            "per_subscription {per} for each of the 3 daemon processes, in each of which one subscription sends"
        ),
    );
    o.conns = Some(cf);
    ctx.sink.remove("/fail");
    drop(inst);
    Ok(o)
}

// ---------------------------------------------------------------------------------------------
// targets

fn targets(outcomes: &[Outcome], quick_backlog: Option<usize>) -> Vec<Target> {
    let get = |s: &str| outcomes.iter().find(|o| o.name == s);
    let val = |s: &str, k: &str| get(s).and_then(|o| o.values.get(k).copied());
    let base = val("baseline", "requests_per_s");
    let mut t = Vec::new();
    let missing = |s: &str, why: &str| -> Verdict {
        match get(s) {
            None => Verdict::NotRun(format!("scenario {s} not run")),
            Some(o) if !o.problems.is_empty() => {
                Verdict::Incomplete(format!("{why}: {}", o.problems.join("; ")))
            }
            Some(_) => Verdict::Incomplete(why.to_string()),
        }
    };
    let ratio_target =
        |t: &mut Vec<Target>, name: &str, s: &str, k: &str, frac: f64, unit: &str| {
            let (verdict, measured, required) = match (val(s, k), base) {
                (Some(v), Some(b)) => (
                    if v >= frac * b {
                        Verdict::Met
                    } else {
                        Verdict::Missed
                    },
                    format!("{} {unit} = {:.1}% of baseline", int(v), 100.0 * v / b),
                    format!(
                        "≥ {} {unit} ({:.0}% of {} req/s)",
                        int(frac * b),
                        100.0 * frac,
                        int(b)
                    ),
                ),
                (None, _) => (
                    missing(s, "no complete figure"),
                    "-".into(),
                    format!("≥ {:.0}% of baseline", 100.0 * frac),
                ),
                (Some(v), None) => (
                    Verdict::NotRun("no baseline in this run".into()),
                    format!("{} {unit}", int(v)),
                    format!("≥ {:.0}% of baseline", 100.0 * frac),
                ),
            };
            t.push(Target {
                target: name.into(),
                required,
                measured,
                verdict,
            });
        };
    let max_target = |t: &mut Vec<Target>,
                      name: &str,
                      s: &str,
                      k: &str,
                      limit: f64,
                      unit: &str,
                      fmt: &dyn Fn(f64) -> String| {
        let (verdict, measured) = match val(s, k) {
            Some(v) => (
                if v <= limit {
                    Verdict::Met
                } else {
                    Verdict::Missed
                },
                format!("{} {unit}", fmt(v)),
            ),
            None => (missing(s, "no complete figure"), "-".into()),
        };
        t.push(Target {
            target: name.into(),
            required: format!("≤ {} {unit}", fmt(limit)),
            measured,
            verdict,
        });
    };
    ratio_target(
        &mut t,
        "e2e delivered/s ≥ 30% of baseline",
        "e2e",
        "delivered_per_s",
        0.30,
        "/s",
    );
    max_target(
        &mut t,
        "e2e intake p99 at half the peak rate ≤ 5 ms",
        "e2e",
        "intake_half",
        5.0,
        "ms",
        &ms,
    );
    ratio_target(
        &mut t,
        "fanout deliveries/s ≥ 50% of baseline",
        "fanout",
        "deliveries_per_s",
        0.50,
        "/s",
    );
    max_target(
        &mut t,
        "paced 400 events/s: intake-to-arrival p99 ≤ 5 ms",
        "paced",
        "latency",
        5.0,
        "ms",
        &ms,
    );
    let scaled = quick_backlog
        .map(|n| format!(" (scaled: {} pending)", int(n as f64)))
        .unwrap_or_default();
    max_target(
        &mut t,
        &format!(
            "backlog RSS ≤ 150 MB with 1,000,000 pending{scaled}: peak of the restarted daemon"
        ),
        "backlog",
        "rss_pending_mib",
        150.0 * 1e6 / 1048576.0,
        "MiB",
        &|v| format!("{v:.1}"),
    );
    max_target(
        &mut t,
        &format!("backlog restart to serving ≤ 5 s{scaled}"),
        "backlog",
        "restart_s",
        5.0,
        "s",
        &|v| format!("{v:.2}"),
    );
    max_target(
        &mut t,
        &format!("backlog scheduler lag p99 ≤ 100 ms{scaled}: sample with exact due times"),
        "backlog",
        "lag",
        100.0,
        "ms",
        &ms,
    );
    max_target(
        &mut t,
        &format!("backlog scheduler lag p99 ≤ 100 ms{scaled}: every delivery (upper bound)"),
        "backlog",
        "lag_all",
        100.0,
        "ms",
        &ms,
    );
    for o in outcomes {
        if o.name == "baseline" {
            continue;
        }
        if let Some(c) = &o.conns {
            t.push(Target {
                target: format!("connections ≤ in-flight cap: {}", o.name),
                required: format!("≤ {} new (see the scenario)", c.cap),
                measured: format!("{} new, {} open at most", c.new, c.peak_open),
                verdict: if c.new <= c.cap {
                    Verdict::Met
                } else {
                    Verdict::Missed
                },
            });
        }
    }
    let (verdict, measured) = match val("isolation", "ratio") {
        Some(r) => (
            if r >= 0.9 {
                Verdict::Met
            } else {
                Verdict::Missed
            },
            format!("{:.1}%", 100.0 * r),
        ),
        None => (missing("isolation", "no complete figure"), "-".into()),
    };
    t.push(Target {
        target: "isolation: fast subscription keeps ≥ 90% of its solo rate".into(),
        required: "≥ 90%".into(),
        measured,
        verdict,
    });
    t
}

// ---------------------------------------------------------------------------------------------
// main

fn print_table(ctx: &Ctx, machine: &stats::Machine, outcomes: &[Outcome], targets: &[Target]) {
    let mut out = String::new();
    out.push_str(&format!(
        "webhook-dispatcher benchmark ({}{})\n",
        if cfg!(debug_assertions) {
            "bench built in DEBUG: figures are not valid; use --release"
        } else {
            "release build"
        },
        if ctx.opts.quick { ", --quick" } else { "" }
    ));
    out.push_str(&format!(
        "machine: {} CPUs, {}, {} MiB RAM, Linux {}\nstorage: {}\n  fdatasync of 4 KiB, p50 / p99: appended {} / {} ms, overwritten in place {} / {} ms\n",
        machine.nproc, machine.cpu_model, int(machine.mem_total_mib as f64), machine.kernel, machine.storage,
        ms(machine.fsync_append_ms.0), ms(machine.fsync_append_ms.1),
        ms(machine.fsync_overwrite_ms.0), ms(machine.fsync_overwrite_ms.1),
    ));
    out.push_str(&format!(
        "daemon: {}\n  config: {}\n",
        ctx.bin.display(),
        ctx.knobs.describe()
    ));
    out.push_str(&format!(
        "load: hyper HTTP/1.1 keep-alive connections, {} concurrent; event `add_lead` of {} bytes JSON, delivered as {} bytes amoCRM form; the client (on one worker thread) and the sink (on a thread of its own) share this process, and the machine with the daemon\n",
        ctx.opts.concurrency, event_json("add_lead", 12345).len(), form_body(12345).len()
    ));
    for o in outcomes {
        out.push_str(&format!("\n== {} ({:.0} s): {}\n", o.name, o.secs, o.title));
        let mut rows: Vec<Vec<String>> = o
            .rows
            .iter()
            .map(|r| vec![r.label.clone(), r.text.clone()])
            .collect();
        if let Some(c) = &o.conns {
            rows.push(vec![
                "new TCP connections accepted by the sink (most open at once)".into(),
                format!("{} ({}); cap {}: {}", c.new, c.peak_open, c.cap, c.cap_text),
            ]);
        }
        if let Some((other, steal)) = o.other_cpu {
            rows.push(vec![
                "other processes on the machine during the scenario: CPU s / steal s".into(),
                format!(
                    "{other:.1} ({:.0}% of one core) / {steal:.1}",
                    100.0 * other / o.secs.max(1e-9)
                ),
            ]);
        }
        out.push_str(&report::table(&rows, "  "));
        for p in &o.problems {
            out.push_str(&format!("  !! {p}\n"));
        }
        for n in &o.notes {
            out.push_str(&format!("  note: {n}\n"));
        }
    }
    out.push_str("\n== targets of issue 6 (ratios to this run's baseline)\n");
    let mut rows = vec![vec![
        "target".to_string(),
        "required".into(),
        "measured".into(),
        "verdict".into(),
    ]];
    for t in targets {
        rows.push(vec![
            t.target.clone(),
            t.required.clone(),
            t.measured.clone(),
            t.verdict.word().into(),
        ]);
    }
    out.push_str(&report::table(&rows, "  "));
    for t in targets {
        match &t.verdict {
            Verdict::Incomplete(w) => {
                out.push_str(&format!("  {}: incomplete — {w}\n", t.target));
            }
            Verdict::NotRun(w) if !w.starts_with("scenario ") => {
                out.push_str(&format!("  {}: n/a — {w}\n", t.target));
            }
            _ => {}
        }
    }
    print!("{out}");
}

/// The load generator (and the rest of the bench) on one worker thread, the sink on a thread of
/// its own: see [`sink::SINK_THREAD`].
fn main() -> Result<()> {
    // Before the first thread: a paced run opens hundreds of connections, and a descriptor table
    // grown while they open holds up the generator's one worker (so every request in flight) for
    // an RCU grace period, as it does the daemon (`webhook_dispatcher::ops::fds`).
    if let Err(e) = webhook_dispatcher::ops::fds::reserve(webhook_dispatcher::ops::fds::SLOTS) {
        eprintln!("warning: the bench's descriptor table was not grown at start: {e}");
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?
        .block_on(run())
}

async fn run() -> Result<()> {
    let opts = Opts::parse();
    let mut selected: Vec<&str> = Vec::new();
    if opts.scenarios.is_empty() {
        selected.extend(SCENARIOS);
    } else {
        for s in &opts.scenarios {
            match SCENARIOS.iter().find(|k| **k == s.as_str()) {
                Some(k) => selected.push(k),
                None => bail!(
                    "unknown scenario {s:?}; the scenarios are {}",
                    SCENARIOS.join(", ")
                ),
            }
        }
        // A ratio needs this run's baseline.
        if selected.iter().any(|s| matches!(*s, "e2e" | "fanout"))
            && !selected.contains(&"baseline")
        {
            selected.insert(0, "baseline");
        }
    }
    selected.sort_by_key(|s| SCENARIOS.iter().position(|k| k == s));
    selected.dedup();
    if cfg!(debug_assertions) {
        eprintln!(
            "warning: the bench is built without --release; its client and sink are slow and the figures are not valid"
        );
    }
    let bin = daemon::locate(opts.daemon.as_deref(), !opts.no_build)?;
    let dir = opts.dir.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&dir)?;
    let machine = stats::machine(&dir);
    let clock = Arc::new(Clock::new());
    let sink = Sink::start(clock.clone())?;
    let knobs = Knobs {
        per_subscription: opts.per_subscription,
        concurrency: opts.daemon_concurrency.unwrap_or(opts.concurrency),
        timeout: "2s".into(),
        log_level: opts.log_level.clone(),
    };
    let guard = Arc::new(daemon::RssGuard {
        limit_kb: opts.rss_limit_mib * 1024,
        tripped_kb: std::sync::atomic::AtomicU64::new(0),
    });
    let ctx = Ctx {
        guard,
        sizes: Sizes::of(&opts),
        api: load::client(8),
        opts,
        bin,
        knobs,
        sink,
        clock,
        dir,
        t0: Instant::now(),
    };
    ctx.log(format!(
        "scenarios: {}; daemon {}; sink on {}",
        selected.join(", "),
        ctx.bin.display(),
        ctx.sink.addr
    ));
    let mut outcomes = Vec::new();
    for s in &selected {
        // Connections of the previous scenario are closed before this one counts.
        wait_until(Duration::from_secs(5), || {
            ctx.sink.conns.open.load(Ordering::SeqCst) == 0
        })
        .await;
        let cpu0 = stats::cpu_totals();
        let t = Instant::now();
        ctx.log(format!("{s}: start"));
        let r = match *s {
            "baseline" => baseline(&ctx).await,
            "e2e" => e2e(&ctx).await,
            "paced" => paced(&ctx).await,
            "storage" => storage(&ctx).await,
            "fanout" => fanout(&ctx).await,
            "backlog" => backlog(&ctx).await,
            "isolation" => isolation(&ctx).await,
            _ => unreachable!(),
        };
        let mut o = match r {
            Ok(o) => o,
            Err(e) => {
                let mut o = Outcome::new(s, "failed");
                o.problem(format!("the scenario failed: {e:#}"));
                o
            }
        };
        o.secs = t.elapsed().as_secs_f64();
        let tripped = ctx.guard.tripped_kb.swap(0, Ordering::SeqCst);
        if tripped > 0 {
            o.problem(format!(
                "the bench killed the daemon: its RSS reached {} (limit {} MiB, --rss-limit-mib)",
                mib(tripped),
                ctx.opts.rss_limit_mib
            ));
        }
        if let (Some(a), Some(b)) = (cpu0, stats::cpu_totals()) {
            let other = ((b.busy_s - a.busy_s) - (b.self_s - a.self_s)).max(0.0);
            let steal = b.steal_s - a.steal_s;
            o.other_cpu = Some((other, steal));
            if other > 0.1 * o.secs || steal > 0.1 * o.secs {
                o.note(format!(
                    "WARNING: the machine was not quiet: other processes used {other:.1} CPU s ({:.0}% of one core) and steal was {steal:.1} s during this scenario; its figures are disturbed",
                    100.0 * other / o.secs
                ));
            }
        }
        ctx.log(format!("{s}: done in {:.1} s", o.secs));
        outcomes.push(o);
    }
    let quick_backlog = (ctx.sizes.backlog != 1_000_000).then_some(ctx.sizes.backlog);
    let targets = targets(&outcomes, quick_backlog);
    if ctx.opts.json {
        let mut scen = serde_json::Map::new();
        for o in &outcomes {
            scen.insert(o.name.to_string(), o.to_json());
        }
        let v = json!({
            "bench": {
                "release": !cfg!(debug_assertions),
                "quick": ctx.opts.quick,
                "concurrency": ctx.opts.concurrency,
                "sizes": format!("{:?}", ctx.sizes),
                "event_body_bytes": event_json("add_lead", 12345).len(),
                "delivered_body_bytes": form_body(12345).len(),
                "seconds": ctx.t0.elapsed().as_secs_f64(),
            },
            "machine": {
                "nproc": machine.nproc,
                "cpu_model": machine.cpu_model,
                "mem_total_mib": machine.mem_total_mib,
                "kernel": machine.kernel,
                "storage": machine.storage,
                "fsync_append_p50_ms": report::num(machine.fsync_append_ms.0),
                "fsync_append_p99_ms": report::num(machine.fsync_append_ms.1),
                "fsync_overwrite_p50_ms": report::num(machine.fsync_overwrite_ms.0),
                "fsync_overwrite_p99_ms": report::num(machine.fsync_overwrite_ms.1),
            },
            "daemon": {
                "binary": ctx.bin.display().to_string(),
                "per_subscription": ctx.knobs.per_subscription,
                "concurrency": ctx.knobs.concurrency,
                "timeout": ctx.knobs.timeout,
                "log_level": ctx.knobs.log_level,
                "config": ctx.knobs.describe(),
            },
            "scenarios": scen,
            "targets": targets.iter().map(Target::to_json).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print_table(&ctx, &machine, &outcomes, &targets);
    }
    Ok(())
}
