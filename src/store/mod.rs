//! Durable state in sled: subscriptions, events, deliveries and the scheduler's due index.
//!
//! Everything lives in one sled tree under one-byte key prefixes, so that one accepted event and
//! all of its deliveries and due entries go to disk in a single atomic batch:
//!
//! | key | value |
//! |---|---|
//! | `s` sub_id | [`Subscription`] (JSON) |
//! | `e` event_id | [`StoredEvent`] (JSON) |
//! | `d` delivery_id | [`Delivery`] (JSON) |
//! | `q` sub_id due_ms delivery_id | empty: the delivery is due at `due_ms` (the scheduler's index, one lane per subscription) |
//! | `t` status delivery_id | empty: the delivery log by status |
//! | `u` sub_id status delivery_id | empty: by subscription and status |
//! | `v` sub_id delivery_id | empty: by subscription |
//! | `w` event_name 0x00 delivery_id | empty: by event name |
//! | `g` event_id delivery_id | empty: the deliveries of an event (to purge the event with its last) |
//! | `i` client key | [`IdempotencyRecord`]: the first receipt of an event sent with an `"id"` |
//!
//! The delivery-log indexes are written in the same batch as the record they index, so a listing
//! walks an index newest first and never scans unrelated records.
//!
//! Ids are UUIDv7, so keys sort by creation time. Durability: writes land in sled's log at once and
//! [`Store::flush`] makes them durable; concurrent callers share one fsync (group commit). Only
//! intake waits for a flush: a lost attempt result only means the attempt is made again, because a
//! delivery keeps its due entry while its attempt is in flight — the claim is in memory only — and
//! the outcome replaces the entry in one batch. After a crash every claimed delivery is simply due.

pub mod model;

pub use model::{
    Attempt, Delivery, DeliveryStatus, DisabledReason, Filter, IdempotencyRecord, StoredEvent,
    Subscription,
};

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

const SUB: u8 = b's';
const EVENT: u8 = b'e';
const DELIVERY: u8 = b'd';
const DUE: u8 = b'q';
const BY_STATUS: u8 = b't';
const BY_SUB_STATUS: u8 = b'u';
const BY_SUB: u8 = b'v';
const BY_EVENT_NAME: u8 = b'w';
const BY_EVENT: u8 = b'g';
const IDEMPOTENCY: u8 = b'i';
const EMPTY: &[u8] = &[];

/// How many index entries one listing may walk before it answers with what it found and a cursor
/// to go on from, so that a rare combination of filters cannot make a request run long.
const SCAN_BUDGET: usize = 50_000;

fn status_byte(s: DeliveryStatus) -> u8 {
    match s {
        DeliveryStatus::Pending => b'p',
        DeliveryStatus::Delivered => b'd',
        DeliveryStatus::Failed => b'f',
    }
}

/// The index keys of a delivery in its current status.
fn index_keys(d: &Delivery) -> [Vec<u8>; 5] {
    let id = d.id.as_bytes();
    let sub = d.subscription_id.as_bytes();
    let st = status_byte(d.status);
    let cat = |parts: &[&[u8]]| parts.concat();
    [
        cat(&[&[BY_STATUS, st], id]),
        cat(&[&[BY_SUB_STATUS], sub, &[st], id]),
        cat(&[&[BY_SUB], sub, id]),
        cat(&[&[BY_EVENT_NAME], d.event.as_bytes(), &[0], id]),
        cat(&[&[BY_EVENT], d.event_id.as_bytes(), id]),
    ]
}

/// Adds a delivery record and its index keys to a batch; `before` is the status it is stored
/// under now (its status-dependent keys move), `None` for a new delivery.
fn put_delivery(batch: &mut sled::Batch, d: &Delivery, before: Option<DeliveryStatus>) {
    batch.insert(key(DELIVERY, &d.id).as_slice(), encode(d));
    let [by_status, by_sub_status, rest @ ..] = index_keys(d);
    match before {
        // A new delivery: every index.
        None => {
            for k in [by_status, by_sub_status].into_iter().chain(rest) {
                batch.insert(k, EMPTY);
            }
        }
        // Only the status-dependent keys move; the others stay as they are.
        Some(old) if old != d.status => {
            let id = d.id.as_bytes();
            let sub = d.subscription_id.as_bytes();
            let st = status_byte(old);
            batch.remove([&[BY_STATUS, st][..], id].concat());
            batch.remove([&[BY_SUB_STATUS][..], sub, &[st], id].concat());
            batch.insert(by_status, EMPTY);
            batch.insert(by_sub_status, EMPTY);
        }
        Some(_) => {}
    }
}

/// The smallest UUIDv7 of a millisecond: a bound for "created since".
fn uuid_floor(ms: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
    b
}

/// Which deliveries a listing wants (SPEC §5.4).
#[derive(Debug, Clone, Default)]
pub struct DeliveryQuery {
    pub status: Option<StatusFilter>,
    pub subscription: Option<Uuid>,
    pub event: Option<String>,
    /// Created at or after this time (ms).
    pub since_ms: Option<u64>,
    /// Older than this delivery (the cursor).
    pub before: Option<Uuid>,
    pub limit: usize,
}

/// A status as the API names it: `in_flight` is a pending delivery with an attempt under way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusFilter {
    Pending,
    InFlight,
    Delivered,
    Failed,
}

impl StatusFilter {
    fn stored(self) -> DeliveryStatus {
        match self {
            StatusFilter::Pending | StatusFilter::InFlight => DeliveryStatus::Pending,
            StatusFilter::Delivered => DeliveryStatus::Delivered,
            StatusFilter::Failed => DeliveryStatus::Failed,
        }
    }
}

/// One page of the delivery log.
#[derive(Debug, Default)]
pub struct DeliveryPage {
    pub deliveries: Vec<Delivery>,
    /// Where the next page starts, when there may be more.
    pub next: Option<Uuid>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage error: {0}")]
    Sled(#[from] sled::Error),
    #[error("corrupt record under key {key}: {source}")]
    Corrupt {
        key: String,
        source: serde_json::Error,
    },
    #[error("storage flusher has stopped")]
    FlusherGone,
    #[error("cannot open storage at {path}: {source}")]
    Open { path: String, source: sled::Error },
}

/// A flush request: the database to flush (so the flusher thread holds it only while flushing,
/// and storage closes when the last `Store` is dropped) and where to answer.
type FlushRequest = (sled::Db, oneshot::Sender<Result<(), String>>);

/// The handle to the database; cheap to clone.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    tree: sled::Tree,
    flusher: mpsc::UnboundedSender<FlushRequest>,
    /// Deliveries whose attempt is in flight; their due entries stay in sled until the outcome.
    claimed: Arc<std::sync::Mutex<HashSet<Uuid>>>,
}

fn key(prefix: u8, id: &Uuid) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = prefix;
    k[1..].copy_from_slice(id.as_bytes());
    k
}

fn due_key(sub: &Uuid, due_ms: u64, delivery: &Uuid) -> [u8; 41] {
    let mut k = [0u8; 41];
    k[0] = DUE;
    k[1..17].copy_from_slice(sub.as_bytes());
    k[17..25].copy_from_slice(&due_ms.to_be_bytes());
    k[25..].copy_from_slice(delivery.as_bytes());
    k
}

fn uuid_at(bytes: &[u8], at: usize) -> Uuid {
    let mut b = [0u8; 16];
    b.copy_from_slice(&bytes[at..at + 16]);
    Uuid::from_bytes(b)
}

fn decode<T: serde::de::DeserializeOwned>(k: &[u8], v: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(v).map_err(|source| StoreError::Corrupt {
        key: String::from_utf8_lossy(k).into_owned(),
        source,
    })
}

fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    // The model types hold only strings, numbers and maps with string keys.
    serde_json::to_vec(value).expect("model types serialise to JSON")
}

/// A due entry: the delivery `delivery` of lane `subscription` is due at `due_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Due {
    pub subscription: Uuid,
    pub due_ms: u64,
    pub delivery: Uuid,
}

impl Store {
    /// Opens (or creates) the database at `path` and starts its group-commit flusher thread.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let config = sled::Config::new()
            .path(path)
            // The working set is the due index and recent records; a small cache keeps RSS flat
            // however many deliveries wait on disk.
            .cache_capacity(64 * 1024 * 1024)
            // Favours compact segments over write speed: measured, it keeps ingest RSS lower at
            // the same throughput.
            .mode(sled::Mode::LowSpace);
        // A process that is just exiting may still hold the lock for a moment: retry briefly.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let db = loop {
            match config.open() {
                Ok(db) => break db,
                Err(sled::Error::Io(e))
                    if e.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(source) => {
                    return Err(StoreError::Open {
                        path: path.display().to_string(),
                        source,
                    });
                }
            }
        };
        let tree = db.open_tree("dispatcher")?;
        let (tx, rx) = mpsc::unbounded_channel();
        std::thread::Builder::new()
            .name("sled-flusher".into())
            .spawn(move || group_commit(rx))
            .map_err(|e| StoreError::Sled(sled::Error::Io(e)))?;
        Ok(Store {
            db,
            tree,
            flusher: tx,
            claimed: Arc::default(),
        })
    }

    /// Makes every write made before this call durable. Many concurrent callers share one fsync.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.flusher
            .send((self.db.clone(), tx))
            .map_err(|_| StoreError::FlusherGone)?;
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(msg)) => Err(StoreError::Sled(sled::Error::Io(std::io::Error::other(
                msg,
            )))),
            Err(_) => Err(StoreError::FlusherGone),
        }
    }

    /// Flushes from a blocking context (shutdown).
    pub fn flush_blocking(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    // ---- subscriptions ----

    pub fn subscriptions(&self) -> Result<Vec<Subscription>, StoreError> {
        self.tree
            .scan_prefix([SUB])
            .map(|r| {
                let (k, v) = r?;
                decode(&k, &v)
            })
            .collect()
    }

    pub fn put_subscription(&self, sub: &Subscription) -> Result<(), StoreError> {
        self.tree.insert(key(SUB, &sub.id), encode(sub))?;
        Ok(())
    }

    /// Deletes a subscription and ends its waiting deliveries as `failed` with `reason`, in one
    /// batch. Returns the number of deliveries ended.
    pub fn delete_subscription(
        &self,
        sub: &Uuid,
        reason: &str,
        now_ms: u64,
    ) -> Result<usize, StoreError> {
        let mut batch = sled::Batch::default();
        batch.remove(key(SUB, sub).as_slice());
        let mut ended = 0;
        {
            let mut p = vec![DUE];
            p.extend_from_slice(sub.as_bytes());
            for r in self.tree.scan_prefix(&p) {
                let (k, _) = r?;
                batch.remove(k.clone());
                let did = uuid_at(&k, k.len() - 16);
                if let Some(mut d) = self.delivery(&did)? {
                    let before = d.status;
                    d.status = DeliveryStatus::Failed;
                    d.next_attempt_at = None;
                    d.error = Some(reason.to_string());
                    d.ended_at = Some(now_ms);
                    put_delivery(&mut batch, &d, Some(before));
                    ended += 1;
                }
            }
        }
        self.tree.apply_batch(batch)?;
        Ok(ended)
    }

    // ---- intake ----

    /// Writes events with their deliveries and due entries in one atomic batch (not yet flushed).
    /// Events sent with an idempotency key record their receipt under it in the same batch.
    pub fn accept(
        &self,
        items: &[(StoredEvent, Vec<Delivery>)],
        keys: &[(String, IdempotencyRecord)],
    ) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for (k, record) in keys {
            batch.insert([&[IDEMPOTENCY][..], k.as_bytes()].concat(), encode(record));
        }
        for (event, deliveries) in items {
            batch.insert(key(EVENT, &event.id).as_slice(), encode(event));
            for d in deliveries {
                put_delivery(&mut batch, d, None);
                let due = d.next_attempt_at.unwrap_or(d.created_at);
                batch.insert(due_key(&d.subscription_id, due, &d.id).as_slice(), EMPTY);
            }
        }
        self.tree.apply_batch(batch)?;
        Ok(())
    }

    /// The first receipt of an idempotency key, if one was recorded.
    pub fn idempotency(&self, client_key: &str) -> Result<Option<IdempotencyRecord>, StoreError> {
        let k = [&[IDEMPOTENCY][..], client_key.as_bytes()].concat();
        self.tree.get(&k)?.map(|v| decode(&k, &v)).transpose()
    }

    /// Forgets idempotency keys recorded before `cutoff_ms`, at most `max`.
    pub fn purge_idempotency(&self, cutoff_ms: u64, max: usize) -> Result<usize, StoreError> {
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for r in self.tree.scan_prefix([IDEMPOTENCY]) {
            let (k, v) = r?;
            let rec: IdempotencyRecord = decode(&k, &v)?;
            if rec.at < cutoff_ms {
                batch.remove(k);
                n += 1;
                if n >= max {
                    break;
                }
            }
        }
        self.tree.apply_batch(batch)?;
        Ok(n)
    }

    pub fn event(&self, id: &Uuid) -> Result<Option<StoredEvent>, StoreError> {
        let k = key(EVENT, id);
        self.tree.get(k)?.map(|v| decode(&k, &v)).transpose()
    }

    pub fn delivery(&self, id: &Uuid) -> Result<Option<Delivery>, StoreError> {
        let k = key(DELIVERY, id);
        self.tree.get(k)?.map(|v| decode(&k, &v)).transpose()
    }

    /// A page of the delivery log, newest first, walking the index that fits the filters best.
    pub fn deliveries(&self, q: &DeliveryQuery) -> Result<DeliveryPage, StoreError> {
        let status = q.status.map(|s| status_byte(s.stored()));
        // The driving index: its prefix, and which filters it already applies.
        let (prefix, by_sub, by_status, by_event) = match (q.subscription, status, &q.event) {
            (Some(sub), Some(st), _) => (
                [&[BY_SUB_STATUS][..], sub.as_bytes(), &[st]].concat(),
                true,
                true,
                false,
            ),
            (Some(sub), None, _) => ([&[BY_SUB][..], sub.as_bytes()].concat(), true, false, false),
            (None, _, Some(e)) => (
                [&[BY_EVENT_NAME][..], e.as_bytes(), &[0]].concat(),
                false,
                false,
                true,
            ),
            (None, Some(st), None) => (vec![BY_STATUS, st], false, true, false),
            (None, None, None) => (vec![DELIVERY], false, false, false),
        };
        let lower = [&prefix[..], &uuid_floor(q.since_ms.unwrap_or(0))].concat();
        let upper = match &q.before {
            Some(id) => [&prefix[..], id.as_bytes()].concat(),
            None => {
                let mut p = prefix.clone();
                p.push(0xff);
                p.extend_from_slice(&[0xff; 16]);
                p
            }
        };
        let mut page = DeliveryPage::default();
        let mut walked = 0;
        for r in self.tree.range(lower..upper).rev() {
            let (k, _) = r?;
            let did = uuid_at(&k, k.len() - 16);
            walked += 1;
            if walked > SCAN_BUDGET {
                page.next = Some(did);
                return Ok(page);
            }
            let Some(d) = self.delivery(&did)? else {
                continue;
            };
            let keep = (by_sub || q.subscription.is_none_or(|s| d.subscription_id == s))
                && (by_status || status.is_none_or(|st| status_byte(d.status) == st))
                && (by_event || q.event.as_deref().is_none_or(|e| d.event == e))
                && q.since_ms.is_none_or(|t| d.created_at >= t)
                && match q.status {
                    Some(StatusFilter::InFlight) => self.is_in_flight(&d.id),
                    Some(StatusFilter::Pending) => !self.is_in_flight(&d.id),
                    _ => true,
                };
            if keep {
                page.deliveries.push(d);
                if page.deliveries.len() >= q.limit {
                    page.next = Some(did);
                    break;
                }
            }
        }
        Ok(page)
    }

    /// Whether an attempt of the delivery is under way.
    pub fn is_in_flight(&self, delivery: &Uuid) -> bool {
        self.claimed_set().contains(delivery)
    }

    fn claimed_set(&self) -> std::sync::MutexGuard<'_, HashSet<Uuid>> {
        self.claimed.lock().expect("claimed set lock poisoned")
    }

    // ---- the scheduler's index ----

    /// The earliest due entry of a subscription's lane that is not in flight.
    pub fn next_due(&self, sub: &Uuid) -> Result<Option<Due>, StoreError> {
        let mut p = [0u8; 17];
        p[0] = DUE;
        p[1..].copy_from_slice(sub.as_bytes());
        // Entries in flight keep their place at the front: at most a lane's slots are skipped.
        for r in self.tree.scan_prefix(p) {
            let (k, _) = r?;
            let delivery = uuid_at(&k, 25);
            if self.is_in_flight(&delivery) {
                continue;
            }
            let mut ms = [0u8; 8];
            ms.copy_from_slice(&k[17..25]);
            return Ok(Some(Due {
                subscription: *sub,
                due_ms: u64::from_be_bytes(ms),
                delivery,
            }));
        }
        Ok(None)
    }

    /// Claims a due entry for an attempt. `false` when it is gone or already claimed.
    pub fn claim(&self, due: &Due) -> Result<bool, StoreError> {
        let mut claimed = self.claimed_set();
        if claimed.contains(&due.delivery)
            || !self
                .tree
                .contains_key(due_key(&due.subscription, due.due_ms, &due.delivery))?
        {
            return Ok(false);
        }
        claimed.insert(due.delivery);
        Ok(true)
    }

    /// Gives a claim up without an outcome (the attempt did not run).
    pub fn release(&self, delivery: &Uuid) {
        self.claimed_set().remove(delivery);
    }

    /// Writes an attempt's outcome: the updated delivery (stored until now with status
    /// `before`), the end of the due entry it was claimed by (`claimed_due_ms`), and its next due
    /// entry when another attempt follows; then the claim ends. `Ok(false)` when the claimed entry
    /// is gone — the delivery was ended meanwhile (its subscription deleted) — and nothing is
    /// written, so a deleted subscription never gets a due entry back.
    pub fn record_attempt(
        &self,
        d: &Delivery,
        before: DeliveryStatus,
        claimed_due_ms: u64,
    ) -> Result<bool, StoreError> {
        let claimed = due_key(&d.subscription_id, claimed_due_ms, &d.id);
        let result = (|| {
            if !self.tree.contains_key(claimed.as_slice())? {
                return Ok(false);
            }
            let mut batch = sled::Batch::default();
            put_delivery(&mut batch, d, Some(before));
            batch.remove(claimed.as_slice());
            if d.status == DeliveryStatus::Pending {
                let due = d.next_attempt_at.unwrap_or(0);
                batch.insert(due_key(&d.subscription_id, due, &d.id).as_slice(), EMPTY);
            }
            self.tree.apply_batch(batch)?;
            Ok(true)
        })();
        // Released after the batch, so the lane never sees the old entry unclaimed.
        self.release(&d.id);
        result
    }

    /// Schedules a fresh attempt of a delivery at `now_ms`, whatever its status. `Ok(None)` when
    /// there is no such delivery; an error message when an attempt is in flight.
    pub fn redeliver(
        &self,
        id: &Uuid,
        now_ms: u64,
    ) -> Result<Option<Result<Delivery, String>>, StoreError> {
        let Some(mut d) = self.delivery(id)? else {
            return Ok(None);
        };
        // Held while the entry moves, so a lane cannot claim the old one meanwhile.
        let claimed = self.claimed_set();
        if claimed.contains(&d.id) {
            return Ok(Some(Err("an attempt of this delivery is in flight".into())));
        }
        let mut batch = sled::Batch::default();
        if d.status == DeliveryStatus::Pending
            && let Some(due) = d.next_attempt_at
        {
            batch.remove(due_key(&d.subscription_id, due, &d.id).as_slice());
        }
        let before = d.status;
        d.status = DeliveryStatus::Pending;
        d.next_attempt_at = Some(now_ms);
        d.ended_at = None;
        d.error = None;
        put_delivery(&mut batch, &d, Some(before));
        batch.insert(due_key(&d.subscription_id, now_ms, &d.id).as_slice(), EMPTY);
        self.tree.apply_batch(batch)?;
        Ok(Some(Ok(d)))
    }

    /// The `failed` deliveries of a subscription created at or after `since_ms`, oldest first.
    pub fn failed_since(&self, sub: &Uuid, since_ms: u64) -> Result<Vec<Uuid>, StoreError> {
        let mut prefix = vec![BY_SUB_STATUS];
        prefix.extend_from_slice(sub.as_bytes());
        prefix.push(status_byte(DeliveryStatus::Failed));
        let mut start = prefix.clone();
        start.extend_from_slice(&uuid_floor(since_ms));
        let mut out = Vec::new();
        for r in self.tree.range(start..) {
            let (k, _) = r?;
            if !k.starts_with(&prefix) {
                break;
            }
            out.push(uuid_at(&k, k.len() - 16));
        }
        Ok(out)
    }

    /// Removes ended deliveries of `status` that ended before `cutoff_ms`, at most `max` of them,
    /// with their index keys, and each event whose last delivery goes. Returns how many went.
    pub fn purge_ended(
        &self,
        status: DeliveryStatus,
        cutoff_ms: u64,
        max: usize,
    ) -> Result<usize, StoreError> {
        let prefix = [BY_STATUS, status_byte(status)];
        let mut batch = sled::Batch::default();
        let mut purged = 0;
        let mut events: Vec<Uuid> = Vec::new();
        // Oldest first: a delivery created after the cutoff cannot have ended before it.
        for r in self.tree.scan_prefix(prefix) {
            let (k, _) = r?;
            let did = uuid_at(&k, 2);
            let Some(d) = self.delivery(&did)? else {
                batch.remove(k);
                continue;
            };
            if d.created_at >= cutoff_ms || purged >= max {
                break;
            }
            if d.ended_at.is_none_or(|t| t >= cutoff_ms) {
                continue;
            }
            batch.remove(key(DELIVERY, &d.id).as_slice());
            for k in index_keys(&d) {
                batch.remove(k);
            }
            if !events.contains(&d.event_id) {
                events.push(d.event_id);
            }
            purged += 1;
        }
        self.tree.apply_batch(batch)?;
        // An event goes with its last delivery (an event that matched nothing has none and is
        // kept only as long as the longer retention allows, see `purge_events_without_deliveries`).
        let mut batch = sled::Batch::default();
        for e in events {
            let mut p = vec![BY_EVENT];
            p.extend_from_slice(e.as_bytes());
            if self.tree.scan_prefix(&p).next().is_none() {
                batch.remove(key(EVENT, &e).as_slice());
            }
        }
        self.tree.apply_batch(batch)?;
        Ok(purged)
    }

    /// Removes events received before `cutoff_ms` that have no delivery (they matched no
    /// subscription), at most `max`. Returns how many went.
    pub fn purge_events_without_deliveries(
        &self,
        cutoff_ms: u64,
        max: usize,
    ) -> Result<usize, StoreError> {
        let mut batch = sled::Batch::default();
        let mut n = 0;
        let end = key(EVENT, &Uuid::from_bytes(uuid_floor(cutoff_ms)));
        for r in self.tree.range([EVENT].to_vec()..end.to_vec()) {
            let (k, _) = r?;
            let mut p = vec![BY_EVENT];
            p.extend_from_slice(&k[1..17]);
            if self.tree.scan_prefix(&p).next().is_none() {
                batch.remove(k);
                n += 1;
                if n >= max {
                    break;
                }
            }
        }
        self.tree.apply_batch(batch)?;
        Ok(n)
    }

    /// How many deliveries created before `before_ms` are pending (the start-up value of the
    /// pending gauge: deliveries created later are counted as they are created).
    pub fn count_pending_before(&self, before_ms: u64) -> usize {
        let prefix = [BY_STATUS, status_byte(DeliveryStatus::Pending)];
        let end = [&prefix[..], &uuid_floor(before_ms)].concat();
        self.tree.range(prefix.to_vec()..end).keys().count()
    }

    /// Whether storage accepts a write (for /healthz).
    pub fn writable(&self) -> bool {
        self.db.insert(b"healthz", b"ok").is_ok()
    }
}

/// The group-commit loop: every request that arrived while the previous fsync ran shares the next.
fn group_commit(mut rx: mpsc::UnboundedReceiver<FlushRequest>) {
    while let Some((db, first)) = rx.blocking_recv() {
        let mut waiters = vec![first];
        while let Ok((_, w)) = rx.try_recv() {
            waiters.push(w);
        }
        let result = db.flush().map(|_| ()).map_err(|e| e.to_string());
        drop(db);
        for w in waiters {
            let _ = w.send(result.clone());
        }
    }
}

/// Shared ownership of the store for the engine and the API.
pub type SharedStore = Arc<Store>;
