//! Prometheus metrics (SPEC §5.4), through the `prometheus-client` crate: one registry per
//! dispatcher, so several dispatchers in one process (tests, embedding) keep their own counts.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AttemptLabels {
    outcome: &'static str,
    code_class: &'static str,
}

/// `2xx`, `4xx`, …; `none` for code 0 (no answer).
pub fn code_class(code: u16) -> &'static str {
    match code {
        0 => "none",
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => "other",
    }
}

pub struct Metrics {
    registry: Registry,
    events_accepted: Counter,
    attempts: Family<AttemptLabels, Counter>,
    duration: Histogram,
    pending: Gauge,
    active: Gauge,
    backlog: Gauge,
    lag: Gauge<f64, AtomicU64>,
    log_dropped: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("dispatcher");
        let events_accepted = Counter::default();
        registry.register(
            "events_accepted",
            "Events accepted by intake (durable)",
            events_accepted.clone(),
        );
        let attempts = Family::<AttemptLabels, Counter>::default();
        registry.register(
            "attempts",
            "Delivery attempts by outcome (delivered, retrying, failed) and status class",
            attempts.clone(),
        );
        let duration = Histogram::new([
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0,
        ]);
        registry.register(
            "attempt_duration_seconds",
            "Duration of delivery attempts",
            duration.clone(),
        );
        let pending = Gauge::default();
        registry.register(
            "deliveries_pending",
            "Deliveries waiting for an attempt (including held ones)",
            pending.clone(),
        );
        let active = Gauge::default();
        registry.register(
            "subscriptions_active",
            "Enabled subscriptions",
            active.clone(),
        );
        let backlog = Gauge::default();
        registry.register(
            "intake_backlog",
            "Events received and not yet durable",
            backlog.clone(),
        );
        let lag = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "scheduler_lag_seconds",
            "Now minus the due time of the oldest due delivery of an enabled subscription",
            lag.clone(),
        );
        let log_dropped = Counter::default();
        registry.register(
            "log_lines_dropped",
            "Log lines dropped because stderr was not read as fast as they came, or refused them",
            log_dropped.clone(),
        );
        Metrics {
            registry,
            events_accepted,
            attempts,
            duration,
            pending,
            active,
            backlog,
            lag,
            log_dropped,
        }
    }

    pub fn events_accepted(&self, n: usize, deliveries: usize) {
        self.events_accepted.inc_by(n as u64);
        self.pending_changed(deliveries as i64);
    }

    pub fn attempt(&self, outcome: &'static str, code: u16, duration: Duration) {
        self.attempts
            .get_or_create(&AttemptLabels {
                outcome,
                code_class: code_class(code),
            })
            .inc();
        self.duration.observe(duration.as_secs_f64());
    }

    pub fn pending_changed(&self, delta: i64) {
        self.pending.inc_by(delta);
    }

    pub fn backlog_changed(&self, delta: i64) {
        self.backlog.inc_by(delta);
    }

    pub fn backlog(&self) -> i64 {
        self.backlog.get()
    }

    /// The exposition, with the gauges read at scrape time set first.
    pub fn render(&self, active: usize, lag: Duration) -> String {
        self.active.set(active as i64);
        self.lag.set(lag.as_secs_f64());
        // The process's count (there is one stderr), brought up to date in this registry; two
        // scrapes at once both leave it there.
        let dropped = super::log::dropped_lines();
        self.log_dropped
            .inner()
            .fetch_max(dropped, std::sync::atomic::Ordering::Relaxed);
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
