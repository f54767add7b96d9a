//! Intake: validated events become stored events with one delivery per matching subscription,
//! written in one atomic batch and flushed before anyone is told they are accepted (SPEC §5.1).
//!
//! The HTTP endpoint and the in-process [`Emitter`] share this path, and so its promise: a receipt
//! means the event and all its deliveries are on disk.

use crate::delivery::Engine;
use crate::event::{Event, EventError};
use crate::ops::metrics::Metrics;
use crate::store::{
    self, Delivery, DeliveryStatus, IdempotencyRecord, Store, StoreError, StoredEvent,
};
use crate::subscription::{Registry, now_ms};
use serde::Serialize;
use serde_json::Value;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use uuid::Uuid;

/// What the sender of an event gets back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Receipt {
    /// The event's id in the dispatcher.
    pub id: Uuid,
    /// How many deliveries were created.
    pub deliveries: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    #[error("{0}")]
    Invalid(#[from] EventError),
    #[error("event {index}: {source}")]
    InvalidInBatch { index: usize, source: EventError },
    #[error("a batch must hold at least one event")]
    EmptyBatch,
    #[error("\"events\" must be an array of events")]
    EventsNotArray,
    #[error("a batch holds {got} events; at most {max} are allowed (limits.max_batch)")]
    BatchTooLarge { got: usize, max: usize },
    #[error("the event is {size} bytes; at most {max} are allowed (server.max_body)")]
    EventTooLarge { size: usize, max: usize },
    #[error("the dispatcher is shutting down")]
    ShuttingDown,
    #[error(
        "the dispatcher is over its intake backlog ({0} events waiting to be stored); retry shortly"
    )]
    Overloaded(i64),
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub struct Intake {
    store: Store,
    registry: Arc<Registry>,
    engine: Arc<Engine>,
    max_batch: usize,
    closed: AtomicBool,
    metrics: Arc<Metrics>,
    idempotency: std::sync::Mutex<PendingKeys>,
    max_event: usize,
}

/// Idempotency keys whose records intake has queued for the writer, with the writer's answer to
/// come. A record is in sled once the writer has applied it, a moment after intake queued it; a
/// request with the same key in that moment finds the key here, waits for that answer and looks
/// again: the key is then in sled, or the write failed and the request makes the event itself
/// (SPEC §4: accepted once; and nothing answered 202 that was not stored).
struct PendingKeys {
    records: std::collections::HashMap<String, Pending>,
    purged: std::time::Instant,
}

struct Pending {
    event_id: Uuid,
    written: store::SharedDurable,
    at: std::time::Instant,
}

impl PendingKeys {
    /// Kept this long, up to twice as long at most, when no one takes them out: a request that
    /// stopped waiting (its client went away) leaves its keys behind, and a repeat that finds
    /// one answered takes it out; the writer answers well within this.
    const KEEP: std::time::Duration = std::time::Duration::from_secs(60);

    fn new() -> PendingKeys {
        PendingKeys {
            records: std::collections::HashMap::new(),
            purged: std::time::Instant::now(),
        }
    }

    /// The answer to wait for before `key` can be looked up in sled; `None` when there is none
    /// left to wait for (an answered entry is taken out).
    fn unanswered(&mut self, key: &str) -> Option<store::SharedDurable> {
        let pending = self.records.get(key)?;
        if pending.written.answered() {
            self.records.remove(key);
            return None;
        }
        Some(pending.written.clone())
    }

    fn insert(&mut self, keys: &[(String, IdempotencyRecord)], written: &store::SharedDurable) {
        let now = std::time::Instant::now();
        if now.duration_since(self.purged) >= Self::KEEP {
            self.records
                .retain(|_, p| now.duration_since(p.at) < Self::KEEP);
            self.purged = now;
        }
        for (k, r) in keys {
            let pending = Pending {
                event_id: r.event_id,
                written: written.clone(),
                at: now,
            };
            self.records.insert(k.clone(), pending);
        }
    }

    /// Forgets `keys` once their records are written (or failed to be): sled answers for them.
    fn remove(&mut self, keys: &[(String, IdempotencyRecord)]) {
        for (k, r) in keys {
            if self
                .records
                .get(k)
                .is_some_and(|p| p.event_id == r.event_id)
            {
                self.records.remove(k);
            }
        }
    }
}

/// The writer's answer to an intake request: shared when a repeat of one of its keys may wait
/// for it too.
enum Answer {
    One(store::Durable),
    Shared(store::SharedDurable),
}

impl Answer {
    async fn wait(self) -> Result<(), StoreError> {
        match self {
            Answer::One(d) => d.wait().await,
            Answer::Shared(d) => d.wait().await,
        }
    }
}

/// How long an event's idempotency key is remembered (SPEC §4).
pub const IDEMPOTENCY_WINDOW: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// Events received and not yet durable above which intake answers 503: past this, clients should
/// back off rather than queue more memory in the daemon.
pub const MAX_BACKLOG: i64 = 100_000;

/// Counts events in the backlog gauge while they are being stored.
struct Backlog<'a> {
    metrics: &'a Metrics,
    n: i64,
}

impl Drop for Backlog<'_> {
    fn drop(&mut self) {
        self.metrics.backlog_changed(-self.n);
    }
}

impl Intake {
    pub fn new(
        store: Store,
        registry: Arc<Registry>,
        engine: Arc<Engine>,
        max_batch: usize,
        max_event: usize,
        metrics: Arc<Metrics>,
    ) -> Intake {
        Intake {
            store,
            registry,
            engine,
            max_batch,
            closed: AtomicBool::new(false),
            metrics,
            idempotency: std::sync::Mutex::new(PendingKeys::new()),
            max_event,
        }
    }

    /// An event handed over in-process is held to the size one HTTP request may have.
    fn check_size(&self, event: &Value) -> Result<(), IntakeError> {
        let size = serde_json::to_vec(event)
            .map(|v| v.len())
            .unwrap_or(usize::MAX);
        if size > self.max_event {
            return Err(IntakeError::EventTooLarge {
                size,
                max: self.max_event,
            });
        }
        Ok(())
    }

    /// Refuses every later event (shutdown).
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Validates a request body: one event, or `{"events": [...]}`. A batch is all-or-nothing.
    pub fn parse_body(&self, body: Value) -> Result<Vec<Event>, IntakeError> {
        let batch = match body {
            Value::Object(mut obj) if obj.contains_key("events") && !obj.contains_key("event") => {
                if obj.len() != 1 {
                    let extra = obj
                        .keys()
                        .find(|k| *k != "events")
                        .cloned()
                        .unwrap_or_default();
                    return Err(IntakeError::Invalid(EventError::UnknownField(extra)));
                }
                match obj.remove("events") {
                    Some(Value::Array(items)) => items,
                    _ => return Err(IntakeError::EventsNotArray),
                }
            }
            single => return Ok(vec![Event::from_value(single)?]),
        };
        if batch.is_empty() {
            return Err(IntakeError::EmptyBatch);
        }
        if batch.len() > self.max_batch {
            return Err(IntakeError::BatchTooLarge {
                got: batch.len(),
                max: self.max_batch,
            });
        }
        batch
            .into_iter()
            .enumerate()
            .map(|(index, v)| {
                Event::from_value(v).map_err(|source| IntakeError::InvalidInBatch { index, source })
            })
            .collect()
    }

    /// Stores events and their deliveries durably; answers once they are flushed to disk.
    pub async fn accept(&self, events: Vec<Event>) -> Result<Vec<Receipt>, IntakeError> {
        if self.is_closed() {
            return Err(IntakeError::ShuttingDown);
        }
        let waiting = self.metrics.backlog();
        if waiting >= MAX_BACKLOG {
            return Err(IntakeError::Overloaded(waiting));
        }
        self.metrics.backlog_changed(events.len() as i64);
        let _backlog = Backlog {
            metrics: &self.metrics,
            n: events.len() as i64,
        };
        let now = now_ms();
        let mut held = Vec::new();
        // For each new event, the indexes of its held deliveries (see `Store::accept`).
        let mut held_at: Vec<Vec<usize>> = Vec::with_capacity(events.len());
        let mut items = Vec::with_capacity(events.len());
        let mut receipts = Vec::with_capacity(events.len());
        let mut touched: Vec<Uuid> = Vec::new();
        // What to encode while the flush is under way: each new event and where it goes.
        let mut primes = Vec::with_capacity(events.len());
        let mut created = 0usize;
        let mut keys: Vec<(String, IdempotencyRecord)> = Vec::new();
        let keyed = events.iter().any(|e| e.client_id.is_some());
        let durable = loop {
            let gate = self.registry.intake_gate().await;
            // Events with an idempotency key check and record it under one lock, so that two
            // requests with the same key cannot both create deliveries. The lock is released
            // before any wait (the block's end).
            let decided: Result<Answer, Vec<store::SharedDurable>> = 'decide: {
                let mut pending =
                    keyed.then(|| self.idempotency.lock().expect("idempotency lock poisoned"));
                // A key another request has queued and the writer not yet answered: wait for that
                // answer, then look again, before this request decides or writes anything.
                if let Some(p) = pending.as_mut() {
                    let unanswered: Vec<store::SharedDurable> = events
                        .iter()
                        .filter_map(|e| e.client_id.as_deref())
                        .filter_map(|k| p.unanswered(k))
                        .collect();
                    if !unanswered.is_empty() {
                        break 'decide Err(unanswered);
                    }
                }
                for event in &events {
                    if let Some(k) = &event.client_id {
                        let earlier = match keys.iter().find(|(seen, _)| seen == k) {
                            Some((_, rec)) => Some(*rec),
                            None => self.store.idempotency(k)?.filter(|r| {
                                now.saturating_sub(r.at) < IDEMPOTENCY_WINDOW.as_millis() as u64
                            }),
                        };
                        if let Some(rec) = earlier {
                            receipts.push(Receipt {
                                id: rec.event_id,
                                deliveries: rec.deliveries,
                            });
                            continue;
                        }
                    }
                    let event_id = store::new_event_id();
                    let subs = self.registry.matching(event);
                    let name = event.name.to_string();
                    // Its deliveries to disabled subscriptions, by this event's own snapshot of them
                    // (none for most events: no allocation).
                    let mut held_here = Vec::new();
                    for (i, s) in subs.iter().enumerate() {
                        if !touched.contains(&s.id) {
                            touched.push(s.id);
                        }
                        if !s.enabled {
                            held_here.push(i);
                            let d = Delivery {
                                id: store::delivery_id(&event_id, i),
                                event_id,
                                event: name.clone(),
                                subscription_id: s.id,
                                status: DeliveryStatus::Pending,
                                created_at: now,
                                next_attempt_at: Some(now),
                                ended_at: None,
                                error: None,
                                attempts: Vec::new(),
                            };
                            held.push((d, s.clone()));
                        }
                    }
                    created += subs.len();
                    receipts.push(Receipt {
                        id: event_id,
                        deliveries: subs.len(),
                    });
                    if let Some(k) = &event.client_id {
                        keys.push((
                            k.clone(),
                            IdempotencyRecord {
                                event_id,
                                deliveries: subs.len(),
                                at: now,
                            },
                        ));
                    }
                    items.push(StoredEvent {
                        id: event_id,
                        received_at: now,
                        name,
                        event: event.stored(),
                        subscriptions: subs.iter().map(|s| s.id).collect(),
                    });
                    held_at.push(held_here);
                    primes.push((event_id, event, subs));
                }
                // Queued under the gate: a subscription deleted after this is cleaned up after it.
                let durable = self.store.accept(&items, &keys, &held_at)?;
                // Shared only when a repeat may wait for it too (an allocation otherwise saved).
                match pending.as_mut() {
                    Some(pending) if !keys.is_empty() => {
                        let shared = durable.shared();
                        pending.insert(&keys, &shared);
                        Ok(Answer::Shared(shared))
                    }
                    _ => Ok(Answer::One(durable)),
                }
            };
            match decided {
                Ok(durable) => break durable,
                Err(unanswered) => {
                    drop(gate);
                    for written in unanswered {
                        // Its outcome is read from sled on the next look.
                        let _ = written.wait().await;
                    }
                }
            }
        };
        for ((id, event, subs), item) in primes.iter().zip(&items) {
            self.engine
                .prime(*id, &Arc::from(item.name.as_str()), event, subs);
        }
        // Also when every event was a repeat: the first request may not be flushed yet.
        let written = durable.wait().await;
        if !keys.is_empty() {
            self.idempotency
                .lock()
                .expect("idempotency lock poisoned")
                .remove(&keys);
        }
        written?;
        self.metrics.events_accepted(items.len(), created);
        for id in &touched {
            self.engine.wake(id);
        }
        for (d, sub) in &held {
            self.engine.publish_held(d, sub);
        }
        Ok(receipts)
    }
}

/// The in-process intake handle: a Rust CRM backend embeds the dispatcher and emits events
/// through it, with the same durability promise as `POST /v1/events`. Cheap to clone.
#[derive(Clone)]
pub struct Emitter {
    intake: Arc<Intake>,
}

impl Emitter {
    pub(crate) fn new(intake: Arc<Intake>) -> Emitter {
        Emitter { intake }
    }

    /// Emits one event (`{"event", "data", "id"?, "account"?}`); the receipt comes once the event
    /// and its deliveries are on disk.
    pub async fn emit(&self, event: Value) -> Result<Receipt, IntakeError> {
        self.intake.check_size(&event)?;
        let event = Event::from_value(event)?;
        let mut receipts = self.intake.accept(vec![event]).await?;
        Ok(receipts.pop().expect("one receipt per event"))
    }

    /// Emits several events atomically: all are stored, or none.
    pub async fn emit_batch(&self, events: Vec<Value>) -> Result<Vec<Receipt>, IntakeError> {
        for e in &events {
            self.intake.check_size(e)?;
        }
        let events = self
            .intake
            .parse_body(serde_json::json!({ "events": events }))?;
        self.intake.accept(events).await
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use crate::subscription::SubscriptionInput;
    use serde_json::json;

    /// A dispatcher on storage in `dir`, with `extra` TOML.
    async fn start(dir: &tempfile::TempDir, extra: &str) -> crate::Dispatcher {
        let toml = format!(
            "[storage]\npath = {:?}\n{extra}",
            dir.path().join("db.sled").display().to_string()
        );
        crate::Dispatcher::start(Config::from_toml_str(&toml, &[]).unwrap())
            .await
            .unwrap()
    }

    /// Intake tells the store which of each event's deliveries are held, by that event's own
    /// snapshot of its subscriptions: those get their due entries in sled with the event, the
    /// others wait in memory for their first attempt. A repeated idempotency key in the batch
    /// (an event not stored) does not shift the held deliveries onto another event.
    #[tokio::test]
    async fn deliveries_to_a_disabled_subscription_are_written_to_the_due_index_at_intake() {
        let dir = tempfile::tempdir().unwrap();
        // A receiver that never answers (connections wait in its backlog): the live deliveries
        // stay in flight, with no outcome and no retry's due entry, while the test looks.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/hook", silent.local_addr().unwrap());
        let dispatcher = start(
            &dir,
            "[delivery]\nallow_private = [\"127.0.0.0/8\"]\ntimeout = \"60s\"\n",
        )
        .await;
        let app = dispatcher.app.clone();
        let subscribe = |events: &[&str], enabled: bool| SubscriptionInput {
            url: Some(url.clone()),
            events: Some(events.iter().map(|e| e.to_string()).collect()),
            enabled: Some(enabled),
            ..Default::default()
        };
        let held = app
            .registry
            .create(subscribe(&["add_lead", "status_lead"], false))
            .await
            .unwrap();
        let live = app
            .registry
            .create(subscribe(&["status_lead"], true))
            .await
            .unwrap();
        let receipts = dispatcher
            .emitter()
            .emit_batch(vec![
                json!({"event": "add_lead", "data": {"id": 1}, "id": "k"}),
                json!({"event": "add_lead", "data": {"id": 1}, "id": "k"}),
                json!({"event": "status_lead", "data": {"id": 2, "status_id": 3}}),
            ])
            .await
            .unwrap();
        assert_eq!(receipts[0], receipts[1], "the repeat is the first event");
        let (add, status) = (receipts[0].id, receipts[2].id);
        assert_eq!((receipts[0].deliveries, receipts[2].deliveries), (1, 2));
        // The held deliveries by their ids: the add_lead's only one, and the status_lead's to
        // the held subscription.
        let subs = app.store.event(&status).unwrap().unwrap().subscriptions;
        let at = subs.iter().position(|s| *s == held.id).unwrap();
        let mut expected = vec![
            crate::store::delivery_id(&add, 0),
            crate::store::delivery_id(&status, at),
        ];
        expected.sort();
        let in_sled = app.store.due_in_sled();
        let mut to_held: Vec<_> = in_sled
            .iter()
            .filter(|(s, _, _)| *s == held.id)
            .map(|(_, _, d)| *d)
            .collect();
        to_held.sort();
        assert_eq!(to_held, expected, "the held deliveries, in sled at once");
        assert!(
            in_sled.iter().all(|(s, _, _)| *s != live.id),
            "the others wait in memory: {in_sled:?}"
        );
        // Closing the receiver fails the live attempts at once: shutdown need not wait them out.
        drop(silent);
        dispatcher.shutdown().await;
    }

    /// Requests that carry the same idempotency key at the same time make one event: the ones
    /// that find the first's record not yet written (the writer applies it after intake queued
    /// it) answer with its receipt, as a repeat after it does.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_requests_with_one_idempotency_key_make_one_event() {
        let dir = tempfile::tempdir().unwrap();
        let dispatcher = start(&dir, "").await;
        let emitter = dispatcher.emitter();
        for round in 0..5 {
            let key = format!("k{round}");
            let sends = (0..20).map(|i| {
                let emitter = emitter.clone();
                let event = json!({"event": "add_lead", "data": {"id": i}, "id": key});
                tokio::spawn(async move { emitter.emit(event).await.unwrap() })
            });
            let mut ids = Vec::new();
            for send in sends.collect::<Vec<_>>() {
                ids.push(send.await.unwrap().id);
            }
            ids.sort();
            ids.dedup();
            assert_eq!(
                ids.len(),
                1,
                "round {round}: one event for the key, got {ids:?}"
            );
            let repeat = emitter
                .emit(json!({"event": "add_lead", "data": {"id": 0}, "id": key}))
                .await
                .unwrap();
            assert_eq!(repeat.id, ids[0], "round {round}: a later repeat");
        }
        dispatcher.shutdown().await;
    }

    /// A request whose key another request has queued waits for that write before it decides
    /// anything: when that write fails, it makes the event itself, and a batch with it stores
    /// its other events once. Also when the first request's client went away (its future
    /// dropped while its write was queued). Before, the repeat answered with the id of an event
    /// that was never stored, or (checking afterwards) failed with its own events stored.
    #[tokio::test]
    async fn a_repeat_of_a_request_whose_write_fails_makes_the_event_itself() {
        use std::future::Future;
        let dir = tempfile::tempdir().unwrap();
        let dispatcher = start(&dir, "").await;
        let (intake, store) = (dispatcher.app.intake.clone(), dispatcher.app.store.clone());
        let keyed = |key: &str| {
            crate::event::Event::from_value(
                json!({"event": "add_lead", "data": {"id": 1}, "id": key}),
            )
            .unwrap()
        };
        let keyless = || {
            crate::event::Event::from_value(json!({"event": "add_lead", "data": {"id": 2}}))
                .unwrap()
        };
        let queued = |key: &str| intake.idempotency.lock().unwrap().records.contains_key(key);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        for (key, first_stays) in [("a", true), ("b", false)] {
            let (go, held) = store.hold_writer();
            // Polled once: its write is queued behind the held writer, and it waits.
            let mut first = Some(Box::pin(intake.accept(vec![keyed(key)])));
            let polled = first.as_mut().unwrap().as_mut().poll(&mut cx);
            assert!(polled.is_pending());
            assert!(queued(key), "{key}: the first request's key is queued");
            let mut repeat = Box::pin(intake.accept(vec![keyed(key), keyless()]));
            assert!(repeat.as_mut().poll(&mut cx).is_pending());
            if !first_stays {
                // Its client went away.
                first = None;
            }
            store.fail_next_intake();
            go.send(()).unwrap();
            held.await.unwrap().unwrap();
            if let Some(first) = first {
                assert!(
                    first.await.is_err(),
                    "{key}: the first request's write failed"
                );
            }
            let receipts = repeat.await.unwrap();
            for r in &receipts {
                assert!(
                    store.event(&r.id).unwrap().is_some(),
                    "{key}: {r:?} is stored"
                );
            }
            assert_ne!(receipts[0].id, receipts[1].id);
            assert_eq!(
                store.idempotency(key).unwrap().map(|r| r.event_id),
                Some(receipts[0].id),
                "{key}: the key names the repeat's event"
            );
            let again = intake.accept(vec![keyed(key)]).await.unwrap();
            assert_eq!(again[0].id, receipts[0].id, "{key}: a later repeat");
        }
        dispatcher.shutdown().await;
    }
}
