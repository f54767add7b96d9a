//! The delivery engine: one lane per subscription takes due deliveries from the store's due index
//! (sled's, and the first attempts' the store keeps in memory) and runs their HTTP attempts, then
//! writes each outcome and the next due time the retry policy gives.
//!
//! Why lanes: a lane holds at most `per_subscription` attempts in flight, so a slow receiver only
//! ever waits on itself, and the engine holds at most `concurrency` attempts in flight in all. A
//! lane sleeps until the earliest due time of its subscription (one timer per subscription, none
//! per pending retry), and is woken early when intake or an attempt adds a due entry. Pending
//! retries therefore cost disk, not memory. A disabled subscription's lane holds its deliveries.
//!
//! A lane claims due deliveries and queues them for its workers, at most `per_subscription`
//! long-lived tasks that run attempts one after another: no task, timer or thread hand-off exists
//! per delivery beyond the attempt's own request timeout. An attempt's outcome is finished on the
//! store's writer thread once written (metrics, the live stream, waking the lane).

pub mod attempt;
mod bodies;
pub mod conn;
pub mod guard;
pub mod h1;
pub mod retry;
pub mod signature;

use crate::config::DisableConfig;
use crate::event::Event;
use crate::ops::metrics::Metrics;
use crate::ops::stream::{AttemptEvent, AttemptStream, Outcome};
use crate::payload::Format;
use crate::payload::creatio::Mapping;
use crate::store::{self, Attempt, Delivery, DeliveryStatus, DisabledReason, Store, Subscription};
use crate::subscription::{Registry, now_ms};
use attempt::{AttemptOutcome, AttemptRequest};
use bodies::Bodies;
use guard::Guard;
use retry::is_success;
use serde_json::{Map, Value};
use signature::Signer;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

/// The settings of the engine, from `[delivery]` and `[account]`, and the runtime it runs on.
pub struct EngineSettings {
    pub timeout: Duration,
    pub concurrency: usize,
    pub per_subscription: usize,
    pub max_retry_after: Duration,
    pub account: Map<String, Value>,
    /// The disable rule: more than `threshold` failed attempts within `window`.
    pub disable: DisableConfig,
    /// The runtime the lanes and their workers (so the attempts and their connections) run on.
    pub runtime: tokio::runtime::Handle,
}

struct Lane {
    wake: Arc<Notify>,
    stop: CancellationToken,
}

pub struct Engine {
    store: Store,
    registry: Arc<Registry>,
    client: attempt::Client,
    guard: Arc<Guard>,
    settings: EngineSettings,
    global: Arc<Semaphore>,
    lanes: Mutex<HashMap<Uuid, Lane>>,
    /// The end times of each subscription's recent failed attempts, for the disable rule; at most
    /// `threshold + 1` a subscription. Kept in memory: a restart starts every window afresh.
    failures: Mutex<HashMap<Uuid, VecDeque<u64>>>,
    stop: CancellationToken,
    attempts: TaskTracker,
    lane_tasks: TaskTracker,
    stream: AttemptStream,
    metrics: Arc<Metrics>,
    started: std::sync::atomic::AtomicBool,
    /// Encoded bodies of recent events, by event and format, until their deliveries take them.
    bodies: Bodies,
}

/// A subscription's URL as parsed, or why it cannot be.
type Destination = Result<Arc<url::Url>, String>;

/// A claimed delivery waiting for one of its lane's workers, with the slot and the engine permit
/// it holds.
struct Job {
    sub: Arc<Subscription>,
    due: store::Due,
    /// Claimed from memory: a first attempt, no record of its own yet.
    first: bool,
    /// The subscription's URL, parsed once per lane and URL.
    url: Destination,
    /// Its secret as an HMAC key, made once per lane and secret.
    signer: Arc<Signer>,
    permits: (conn::Slot, OwnedSemaphorePermit),
}

/// The workers of a lane: long-lived tasks (at most `per_subscription`, started as the lane first
/// needs them) that run its attempts one after another, so an attempt costs no task of its own.
struct Workers {
    jobs: Mutex<VecDeque<Job>>,
    ready: Notify,
    /// Workers started, and those waiting for a job.
    started: std::sync::atomic::AtomicUsize,
    idle: std::sync::atomic::AtomicUsize,
    /// Cancelled when the lane ends: the workers run what is queued, then end.
    closed: CancellationToken,
}

/// How many due entries a lane reads from the index at once.
const READ_AHEAD: usize = 64;

impl Engine {
    pub fn new(
        store: Store,
        registry: Arc<Registry>,
        client: attempt::Client,
        guard: Arc<Guard>,
        settings: EngineSettings,
        stream: AttemptStream,
        metrics: Arc<Metrics>,
    ) -> Arc<Engine> {
        Arc::new(Engine {
            global: Arc::new(Semaphore::new(settings.concurrency)),
            store,
            registry,
            client,
            guard,
            settings,
            lanes: Mutex::new(HashMap::new()),
            failures: Mutex::new(HashMap::new()),
            stop: CancellationToken::new(),
            attempts: TaskTracker::new(),
            lane_tasks: TaskTracker::new(),
            stream,
            metrics,
            started: std::sync::atomic::AtomicBool::new(false),
            bodies: Bodies::new(),
        })
    }

    /// Starts a lane for every subscription.
    /// Counts what is pending from before `started_ms` for the gauge, then starts a lane for every
    /// subscription. Both happen in the background: with a million deliveries waiting the count
    /// takes seconds, and the API serves meanwhile. Lanes wait for the count, so none of the
    /// deliveries it counts can end while it runs.
    pub fn start(self: &Arc<Self>, started_ms: u64) {
        let engine = self.clone();
        self.settings.runtime.spawn(async move {
            let store = engine.store.clone();
            let pending =
                tokio::task::spawn_blocking(move || store.count_pending_before(started_ms))
                    .await
                    .unwrap_or(0);
            engine.metrics.pending_changed(pending as i64);
            engine
                .started
                .store(true, std::sync::atomic::Ordering::SeqCst);
            for sub in engine.registry.list() {
                engine.sync_lane(&sub.id);
            }
        });
    }

    /// Brings a subscription's lane in line with the registry after a change or a new due entry:
    /// starts it, wakes it, or stops it when the subscription is gone.
    pub fn sync_lane(self: &Arc<Self>, id: &Uuid) {
        if !self.started.load(std::sync::atomic::Ordering::SeqCst) {
            // `start` brings every lane up once it has counted.
            return;
        }
        let mut lanes = self.lanes.lock().expect("lanes lock poisoned");
        if self.registry.get(id).is_none() {
            if let Some(lane) = lanes.remove(id) {
                lane.stop.cancel();
            }
            self.failures
                .lock()
                .expect("failures lock poisoned")
                .remove(id);
            return;
        }
        if let Some(lane) = lanes.get(id) {
            lane.wake.notify_one();
            return;
        }
        if self.stop.is_cancelled() {
            return;
        }
        let lane = Lane {
            wake: Arc::new(Notify::new()),
            stop: self.stop.child_token(),
        };
        let engine = self.clone();
        let (wake, stop, id) = (lane.wake.clone(), lane.stop.clone(), *id);
        lanes.insert(id, lane);
        self.lane_tasks.spawn_on(
            async move { engine.run_lane(id, wake, stop).await },
            &self.settings.runtime,
        );
    }

    /// Wakes the lane of a subscription (a due entry was added).
    pub fn wake(self: &Arc<Self>, id: &Uuid) {
        self.sync_lane(id)
    }

    async fn run_lane(self: Arc<Self>, id: Uuid, wake: Arc<Notify>, stop: CancellationToken) {
        // Each slot owns at most one connection to the receiver: see `conn`.
        let slots = conn::Slots::new(self.settings.per_subscription);
        // Due entries read ahead from the index: one scan serves many attempts. An entry that
        // went meanwhile (its subscription's deletion, a redelivery) fails its claim.
        let mut ahead: VecDeque<store::Due> = VecDeque::new();
        // Whether sled had none of this lane's due entries when last read, and as of when.
        let mut scan = store::DueScan::default();
        let workers = Arc::new(Workers {
            jobs: Mutex::new(VecDeque::new()),
            ready: Notify::new(),
            started: 0.into(),
            idle: 0.into(),
            closed: CancellationToken::new(),
        });
        let _close = workers.closed.clone().drop_guard();
        // The subscription's URL, parsed, and its secret as a key: again only when they change.
        let mut parsed: Option<(String, Destination)> = None;
        let mut keyed: Option<(String, Arc<Signer>)> = None;
        loop {
            if stop.is_cancelled() {
                return;
            }
            let Some(sub) = self.registry.get(&id) else {
                return;
            };
            if !sub.enabled {
                // Held: its deliveries wait until the subscription is enabled again.
                tokio::select! {
                    _ = wake.notified() => continue,
                    _ = slots.idle_expired() => continue,
                    _ = stop.cancelled() => return,
                }
            }
            let slot = tokio::select! {
                s = slots.acquire() => s,
                _ = stop.cancelled() => return,
            };
            let due = match ahead.pop_front() {
                Some(d) => Ok(Some(d)),
                None => self
                    .store
                    .lane_due_entries(&id, READ_AHEAD, &mut scan)
                    .map(|entries| {
                        ahead.extend(entries);
                        ahead.pop_front()
                    }),
            };
            let due = match due {
                Ok(d) => d,
                Err(e) => {
                    tracing::error!(subscription = %id, error = %e, "reading the due index failed");
                    drop(slot);
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        _ = stop.cancelled() => return,
                    }
                }
            };
            let now = now_ms();
            match due {
                None => {
                    drop(slot);
                    tokio::select! {
                        _ = wake.notified() => {}
                        _ = slots.idle_expired() => {}
                        _ = stop.cancelled() => return,
                    }
                }
                Some(d) if d.due_ms > now => {
                    drop(slot);
                    // Entries earlier than these may come while the lane sleeps: read afresh.
                    ahead.clear();
                    let wait = Duration::from_millis(d.due_ms - now);
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = wake.notified() => {}
                        _ = slots.idle_expired() => {}
                        _ = stop.cancelled() => return,
                    }
                }
                Some(d) => {
                    let permit = tokio::select! {
                        p = self.global.clone().acquire_owned() => p.expect("global semaphore is never closed"),
                        _ = stop.cancelled() => return,
                    };
                    // Disabled while this lane waited (an attempt tripped the disable rule): hold.
                    if !self.registry.get(&id).is_some_and(|s| s.enabled) {
                        continue;
                    }
                    match self.store.claim_entry(&d) {
                        Ok(Some(claimed)) => {
                            let url = match &parsed {
                                Some((text, url)) if *text == sub.url => url.clone(),
                                _ => {
                                    let url = url::Url::parse(&sub.url)
                                        .map(Arc::new)
                                        .map_err(|e| format!("bad destination URL: {e}"));
                                    parsed = Some((sub.url.clone(), url.clone()));
                                    url
                                }
                            };
                            let signer = match &keyed {
                                Some((secret, signer)) if *secret == sub.secret => signer.clone(),
                                _ => {
                                    let signer = Arc::new(Signer::new(&sub.secret));
                                    keyed = Some((sub.secret.clone(), signer.clone()));
                                    signer
                                }
                            };
                            let job = Job {
                                sub,
                                due: d,
                                first: claimed == store::Claimed::First,
                                url,
                                signer,
                                permits: (slot, permit),
                            };
                            self.hand_over(&workers, job, &wake);
                        }
                        Ok(None) => {}
                        Err(e) => {
                            tracing::error!(subscription = %id, error = %e, "claiming a delivery failed");
                        }
                    }
                }
            }
        }
    }

    /// Queues a claimed delivery for the lane's workers, starting one more if none is waiting
    /// (a job holds a slot, so `per_subscription` workers are never short of one).
    fn hand_over(self: &Arc<Self>, workers: &Arc<Workers>, job: Job, wake: &Arc<Notify>) {
        use std::sync::atomic::Ordering::SeqCst;
        workers
            .jobs
            .lock()
            .expect("jobs lock poisoned")
            .push_back(job);
        if workers.idle.load(SeqCst) == 0
            && workers.started.load(SeqCst) < self.settings.per_subscription
        {
            workers.started.fetch_add(1, SeqCst);
            let (engine, workers, wake) = (self.clone(), workers.clone(), wake.clone());
            self.attempts.spawn_on(
                async move { engine.work(workers, wake).await },
                &self.settings.runtime,
            );
        } else {
            workers.ready.notify_one();
        }
    }

    /// A worker of a lane: runs queued attempts until the lane ends and nothing is queued.
    async fn work(self: Arc<Self>, workers: Arc<Workers>, wake: Arc<Notify>) {
        use std::sync::atomic::Ordering::SeqCst;
        loop {
            let job = workers.jobs.lock().expect("jobs lock poisoned").pop_front();
            match job {
                Some(job) => self.attempt(job, wake.clone()).await,
                None if workers.closed.is_cancelled() => return,
                None => {
                    workers.idle.fetch_add(1, SeqCst);
                    tokio::select! {
                        _ = workers.ready.notified() => {}
                        _ = workers.closed.cancelled() => {}
                    }
                    workers.idle.fetch_sub(1, SeqCst);
                }
            }
        }
    }

    /// Runs one attempt of a claimed delivery and records its outcome. `permits` (the lane's slot,
    /// whose connection the attempt goes over, and the engine's) are given back once the HTTP
    /// exchange is over: the claim keeps the delivery from being taken again until its outcome is
    /// written.
    async fn attempt(self: &Arc<Self>, job: Job, wake: Arc<Notify>) {
        let Job {
            sub,
            due,
            first,
            url,
            signer,
            mut permits,
        } = job;
        let delivery_id = due.delivery;
        // The event is read with the delivery unless its body is encoded already; a first
        // attempt of an encoded event reads nothing.
        let cached = matches!(sub.format, Format::Amocrm | Format::Json)
            .then(|| store::event_of(&delivery_id))
            .flatten()
            .and_then(|(event, _)| self.bodies.take(event, sub.format));
        let found = match &cached {
            Some(c) if first => Ok(Store::first_delivery(&due, &c.event).map(|d| (d, None))),
            _ => self
                .store
                .read_delivery(&delivery_id, cached.is_none(), first),
        };
        let (mut d, event) = match found {
            Ok(Some(found)) => found,
            Ok(None) => {
                tracing::error!(delivery = %delivery_id, "claimed delivery has no record");
                self.store.release(&delivery_id);
                return;
            }
            Err(e) => {
                tracing::error!(delivery = %delivery_id, error = %e, "reading a delivery failed");
                self.store.release(&delivery_id);
                return;
            }
        };
        let n = d.attempts.len() as u32 + 1;
        // Its host for the log and the stream; the URL for the request.
        let host = url
            .as_ref()
            .ok()
            .and_then(|u| u.host_str())
            .unwrap_or_default()
            .to_string();
        let max_attempts = self
            .registry
            .policies()
            .get(&sub.retry)
            .map(|p| p.max_attempts())
            .unwrap_or(1);
        if self.stream.has_readers() {
            self.stream.publish(AttemptEvent {
                at: crate::api::rfc3339(now_ms()),
                delivery_id: d.id,
                event_id: d.event_id,
                event: d.event.clone(),
                subscription_id: sub.id,
                subscription_name: sub.name.clone(),
                host: host.clone(),
                attempt: n,
                max_attempts,
                code: None,
                duration_ms: None,
                outcome: Outcome::InFlight,
                next_attempt_at: None,
            });
        }
        let started_at = now_ms();
        let body = match cached {
            Some(c) => Ok(c.body),
            None => self.prepare(&sub, &d, event),
        };
        let outcome = match url.and_then(|url| Ok((url, body?))) {
            Ok((url, body)) => {
                let timeout = sub
                    .timeout_ms
                    .map(Duration::from_millis)
                    .unwrap_or(self.settings.timeout);
                attempt::send(
                    &self.client,
                    &self.guard,
                    &mut permits.0,
                    AttemptRequest {
                        sub: &sub,
                        signer: &signer,
                        url: &url,
                        delivery_id: d.id,
                        content_type: body.content_type,
                        body: body.bytes,
                        timeout,
                    },
                )
                .await
            }
            Err(error) => AttemptOutcome {
                code: 0,
                error: Some(error),
                response_body: None,
                duration: Duration::ZERO,
                retry_after: None,
            },
        };
        drop(permits);
        let ended = now_ms();
        d.attempts.push(Attempt {
            n,
            started_at,
            duration_ms: outcome.duration.as_millis() as u64,
            code: outcome.code,
            error: outcome.error.clone(),
            response_body: outcome.response_body.clone(),
        });
        let mut disable = None;
        if is_success(outcome.code) {
            d.status = DeliveryStatus::Delivered;
            d.next_attempt_at = None;
            d.error = None;
            d.ended_at = Some(ended);
        } else if outcome.code == 410 {
            d.status = DeliveryStatus::Failed;
            d.next_attempt_at = None;
            d.error = Some("receiver answered 410 Gone; subscription disabled".into());
            d.ended_at = Some(ended);
            disable = Some(DisabledReason::Gone);
        } else {
            let policy = self.registry.policies().get(&sub.retry);
            match policy.and_then(|p| p.next_delay(n, outcome.code)) {
                Some(delay) => {
                    // A Retry-After longer than the scheduled delay postpones the attempt.
                    let delay = retry::delay_with_retry_after(
                        delay,
                        outcome.code,
                        outcome.retry_after,
                        self.settings.max_retry_after,
                    );
                    d.status = DeliveryStatus::Pending;
                    d.next_attempt_at = Some(ended + delay.as_millis() as u64);
                    d.error = None;
                }
                None => {
                    d.status = DeliveryStatus::Failed;
                    d.next_attempt_at = None;
                    d.error = Some(failure_text(&outcome, n));
                    d.ended_at = Some(ended);
                }
            }
            if self.trips_disable_rule(&sub.id, ended) {
                disable = Some(DisabledReason::Failures);
            }
        }
        if d.status == DeliveryStatus::Pending && self.registry.get(&sub.id).is_none() {
            d.status = DeliveryStatus::Failed;
            d.next_attempt_at = None;
            d.error = Some("subscription deleted".into());
            d.ended_at = Some(ended);
        }
        let outcome_kind = match d.status {
            DeliveryStatus::Delivered => Outcome::Delivered,
            DeliveryStatus::Pending => Outcome::Retrying,
            DeliveryStatus::Failed => Outcome::Failed,
        };
        let next_attempt_at = d.next_attempt_at.map(crate::api::rfc3339);
        crate::ops::attempt_log::attempt(&crate::ops::attempt_log::AttemptLine {
            delivery: &d.id,
            subscription: &sub.id,
            event: &d.event,
            host: &host,
            attempt: n,
            code: outcome.code,
            duration_ms: outcome.duration.as_millis() as u64,
            outcome: outcome_kind.as_str(),
            next_attempt_at: next_attempt_at.as_deref().unwrap_or("-"),
        });
        // Disable before the next due entry is written, so the lane cannot take it first.
        if let Some(reason) = disable
            && let Err(e) = self
                .registry
                .set_enabled(&sub.id, false, Some(reason))
                .await
        {
            tracing::error!(subscription = %sub.id, error = %e, "disabling a subscription failed");
        }
        // What follows the write runs on the writer thread once the outcome is stored (so what
        // the stream shows the log shows too); no task waits for it.
        let engine = self.clone();
        let event = self.stream.has_readers().then(|| AttemptEvent {
            at: crate::api::rfc3339(ended),
            delivery_id: d.id,
            event_id: d.event_id,
            event: d.event.clone(),
            subscription_id: sub.id,
            subscription_name: sub.name.clone(),
            host,
            attempt: n,
            max_attempts,
            code: Some(outcome.code),
            duration_ms: Some(outcome.duration.as_millis() as u64),
            outcome: outcome_kind,
            next_attempt_at,
        });
        let (code, duration, status, id) = (outcome.code, outcome.duration, d.status, d.id);
        self.store.record_attempt_then(
            &d,
            due.due_ms,
            Box::new(move |written| {
                match written {
                    Ok(true) if status != DeliveryStatus::Pending => {
                        engine.metrics.pending_changed(-1)
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::error!(delivery = %id, error = %e, "recording an attempt failed; it will be made again after a restart");
                    }
                }
                engine.metrics.attempt(outcome_kind.as_str(), code, duration);
                if let Some(event) = event {
                    engine.stream.publish(event);
                }
                if status == DeliveryStatus::Pending {
                    // Its next due entry is written: the lane may have to wake earlier for it.
                    wake.notify_one();
                }
            }),
        );
    }

    /// The disable rule (SPEC §6): notes a failed attempt that ended at `at`, the latest attempt
    /// of the subscription, and tells whether it now has more than `threshold` failed attempts
    /// within `window`, counting only those since it was last enabled.
    fn trips_disable_rule(&self, id: &Uuid, at: u64) -> bool {
        let rule = &self.settings.disable;
        let enabled_at = self
            .registry
            .get(id)
            .and_then(|s| s.enabled_at)
            .unwrap_or(0);
        let from = at
            .saturating_sub(rule.window.as_millis() as u64)
            .max(enabled_at);
        let mut failures = self.failures.lock().expect("failures lock poisoned");
        let tripped = note_failure(failures.entry(*id).or_default(), at, from, rule.threshold);
        if tripped {
            failures.remove(id);
        }
        tripped
    }

    /// The body (with its content type) of an attempt, encoded from the stored event in the
    /// subscription's current format.
    fn prepare(
        &self,
        sub: &Subscription,
        d: &Delivery,
        event: Option<store::StoredEvent>,
    ) -> Result<crate::payload::Body, String> {
        // The amoCRM and JSON bodies depend on the event alone: encoded once per event and format
        // and shared by the event's deliveries that need them (the caller looked in the cache
        // first). Creatio bodies depend on the subscription's mapping (and a form's boundary is
        // random), so they are not kept.
        let shared = matches!(sub.format, Format::Amocrm | Format::Json);
        let stored = match event {
            Some(e) => e,
            None => self
                .store
                .event(&d.event_id)
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("event {} is missing from storage", d.event_id))?,
        };
        let event = Event::from_value(stored.event).map_err(|e| format!("stored event: {e}"))?;
        let mapping = Mapping::new(sub.entity_name.as_deref(), sub.field_map.as_ref());
        let body = sub
            .format
            .encode(&event, &self.settings.account, &mapping)
            .map_err(|e| e.to_string())?;
        // Kept for the event's other deliveries, if it has any: a retry of this one comes
        // minutes later, when the body would only have taken room.
        if shared {
            let others = stored.subscriptions.len().saturating_sub(1);
            let name = Arc::from(stored.name.as_str());
            self.bodies
                .keep(d.event_id, sub.format, name, body.clone(), others);
        }
        Ok(body)
    }

    /// Encodes an event intake has just stored, once for each shared format (amoCRM, JSON) an
    /// enabled subscription among `subs` takes, so that its first attempts read nothing from
    /// storage. Runs while intake waits for its flush. The body is the one [`Engine::prepare`]
    /// makes from the stored event (a test checks it with every captured vector).
    pub fn prime(&self, id: Uuid, name: &Arc<str>, event: &Event, subs: &[Arc<Subscription>]) {
        for format in [Format::Amocrm, Format::Json] {
            let uses = subs
                .iter()
                .filter(|s| s.enabled && s.format == format)
                .count();
            if uses == 0 {
                continue;
            }
            // These two formats cannot fail (only a Creatio mapping can).
            if let Ok(body) = format.encode(event, &self.settings.account, &Mapping::default()) {
                self.bodies.keep(id, format, name.clone(), body, uses);
            }
        }
    }

    /// Now minus the due time of the oldest due delivery of an enabled subscription.
    pub fn scheduler_lag(&self) -> Duration {
        let now = now_ms();
        let oldest = self
            .registry
            .list()
            .iter()
            .filter(|s| s.enabled)
            .filter_map(|s| self.store.next_due(&s.id).ok().flatten())
            .map(|d| d.due_ms)
            .min();
        oldest.map_or(Duration::ZERO, |due| {
            Duration::from_millis(now.saturating_sub(due))
        })
    }

    /// Publishes that a delivery waits because its subscription is disabled.
    pub fn publish_held(&self, d: &Delivery, sub: &Subscription) {
        if !self.stream.has_readers() {
            return;
        }
        let max_attempts = self
            .registry
            .policies()
            .get(&sub.retry)
            .map(|p| p.max_attempts())
            .unwrap_or(1);
        self.stream.publish(AttemptEvent {
            at: crate::api::rfc3339(now_ms()),
            delivery_id: d.id,
            event_id: d.event_id,
            event: d.event.clone(),
            subscription_id: sub.id,
            subscription_name: sub.name.clone(),
            host: host_of(&sub.url),
            attempt: d.attempts.len() as u32 + 1,
            max_attempts,
            code: None,
            duration_ms: None,
            outcome: Outcome::Held,
            next_attempt_at: None,
        });
    }

    pub fn stream(&self) -> &AttemptStream {
        &self.stream
    }

    /// Stops the lanes, lets attempts in flight finish for up to `grace`, and flushes storage.
    pub async fn shutdown(&self, grace: Duration) {
        self.stop.cancel();
        self.lane_tasks.close();
        self.lane_tasks.wait().await;
        self.attempts.close();
        if tokio::time::timeout(grace, self.attempts.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "attempts still in flight after {grace:?}; they are made again after the next start"
            );
        }
        if let Err(e) = self.store.flush().await {
            tracing::error!(error = %e, "final flush failed");
        }
    }
}

/// The host of a destination, the only part of it that is logged or shown live (its path and
/// query may hold a key).
pub fn host_of(url: &str) -> String {
    url::Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_string))
        .unwrap_or_default()
}

/// Adds a failure at `at` to `times` (failure end times, oldest first), forgets those before
/// `from`, and tells whether more than `threshold` remain.
fn note_failure(times: &mut VecDeque<u64>, at: u64, from: u64, threshold: u32) -> bool {
    times.push_back(at);
    while times.front().is_some_and(|&t| t < from) {
        times.pop_front();
    }
    times.len() > threshold as usize
}

fn failure_text(outcome: &AttemptOutcome, n: u32) -> String {
    let what = match (&outcome.error, outcome.code) {
        (Some(e), 0) => e.clone(),
        (_, code) => format!("HTTP {code}"),
    };
    format!("{what} on attempt {n}; the retry policy allows no further attempt")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_disable_rule_counts_failures_within_the_window_only() {
        let mut times = VecDeque::new();
        // threshold 2: the third failure within the window trips it, not the second.
        assert!(!note_failure(&mut times, 1_000, 0, 2));
        assert!(!note_failure(&mut times, 2_000, 0, 2));
        assert!(note_failure(&mut times, 3_000, 0, 2));
        // A window that starts after the first two (they aged out, or the subscription was
        // enabled again since): only the newest counts.
        let mut times: VecDeque<u64> = [1_000, 2_000].into();
        assert!(!note_failure(&mut times, 9_000, 2_500, 2));
        assert_eq!(times, VecDeque::from([9_000]));
        // threshold 0: any failure trips it.
        assert!(note_failure(&mut VecDeque::new(), 5, 0, 0));
    }
}
