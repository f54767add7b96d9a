//! Durable state in sled: subscriptions, events, deliveries and the scheduler's due index.
//! sled is 0.34.7 patched for this layout (`vendor/sled/PATCHED.md`): leaves of up to 64 small
//! entries, so that millions of small keys cost a quarter of the pages (and of sled's memory).
//!
//! Everything lives in one sled tree under one-byte key prefixes. The layout keeps the keys written
//! per delivery to a minimum, because every key sled writes costs several microseconds and bytes
//! in its log (measured: the cost of a batch grows with its keys far more than with its bytes),
//! and a change of one key is written without a batch (see `Changes`):
//!
//! | key | value |
//! |---|---|
//! | `s` sub_id | [`Subscription`] (JSON) |
//! | `e` event_id | [`StoredEvent`] (compact binary: time, name, the subscriptions it goes to, the event JSON) |
//! | `d` delivery_id | [`Delivery`] (compact binary, see `record`; JSON of earlier versions is read), once it has changed since intake; or a purge tombstone |
//! | `q` sub_id due_ms delivery_id | empty: the delivery is due at `due_ms` (the scheduler's index, one lane per subscription); every pending delivery has exactly one, here or in memory (below) |
//! | `f` delivery_id | empty: the delivery failed (the failed log, newest first) |
//! | `i` client key | [`IdempotencyRecord`]: the first receipt of an event sent with an `"id"` |
//! | `w` | the watermark: the oldest event that may have deliveries whose due entries are in memory, or whose outcome taken from memory is not written yet |
//!
//! An event's deliveries are not records of their own at intake: delivery `i` of event `E` has
//! the id of `E` with its last two bytes set to `i + 1`, and goes to the event's `i`-th
//! subscription. Until its first attempt ends it is pending and due at the event's arrival, which
//! the event record says; its `d` record is written with the first outcome. Its due entry is kept
//! in memory (`fresh`) unless it waits long, so intake writes one key per event, and a first
//! attempt's outcome one key (its `d` record) when it ends the delivery. A later attempt's
//! outcome writes two or three. The delivery log walks events newest first (the failed log walks
//! `f`).
//!
//! Ids are UUIDv7, so keys sort by creation time. Durability: writes land in sled's log at once and
//! [`Store::flush`] makes them durable; concurrent callers share one fsync (group commit). Only
//! intake waits for a flush: a lost attempt result only means the attempt is made again, because a
//! delivery keeps its due entry while its attempt is in flight — the claim is in memory only — and
//! the outcome replaces the entry in one batch. After a crash every claimed delivery is simply due:
//! one whose due entry was in memory has neither a `d` record nor a due entry in sled, and
//! [`Store::open`] brings it back from the events since the watermark.

mod fresh;
pub mod model;
mod record;

pub use model::{
    Attempt, Delivery, DeliveryStatus, DisabledReason, Filter, IdempotencyRecord, StoredEvent,
    Subscription,
};

use record::encode_delivery;
use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc::{RecvTimeoutError, TryRecvError};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use uuid::Uuid;

const SUB: u8 = b's';
const EVENT: u8 = b'e';
const DELIVERY: u8 = b'd';
const DUE: u8 = b'q';
const FAILED: u8 = b'f';
const IDEMPOTENCY: u8 = b'i';
/// The writer's watermark: the oldest event that may have deliveries kept in memory (see `fresh`).
const WATERMARK: &[u8] = b"w";
const EMPTY: &[u8] = &[];
/// The value of a purged delivery's `d` key while other deliveries of its event are kept.
const TOMBSTONE: &[u8] = b"x";

/// How many index entries one listing may walk before it answers with what it found and a cursor
/// to go on from, so that a rare combination of filters cannot make a request run long.
const SCAN_BUDGET: usize = 50_000;

/// The most deliveries one event can have (the last two bytes of a delivery id number them).
pub const MAX_DELIVERIES_PER_EVENT: usize = u16::MAX as usize - 1;

/// A new event id: a UUIDv7 whose last two bytes are zero, the room for its deliveries' numbers.
pub fn new_event_id() -> Uuid {
    let mut b = *Uuid::now_v7().as_bytes();
    b[14] = 0;
    b[15] = 0;
    Uuid::from_bytes(b)
}

/// The id of delivery `index` (from 0) of an event.
pub fn delivery_id(event: &Uuid, index: usize) -> Uuid {
    let mut b = *event.as_bytes();
    b[14..].copy_from_slice(&((index + 1) as u16).to_be_bytes());
    Uuid::from_bytes(b)
}

/// The event of a delivery id and the delivery's index; `None` for an id that names no delivery.
pub fn event_of(delivery: &Uuid) -> Option<(Uuid, usize)> {
    let mut b = *delivery.as_bytes();
    let n = u16::from_be_bytes([b[14], b[15]]) as usize;
    if n == 0 {
        return None;
    }
    b[14] = 0;
    b[15] = 0;
    Some((Uuid::from_bytes(b), n - 1))
}

/// The creation time (ms) a UUIDv7 carries.
fn uuid_ms(id: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b[2..].copy_from_slice(&id[..6]);
    u64::from_be_bytes(b)
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
    #[error("corrupt record under key {key}: {message}")]
    Malformed { key: String, message: String },
    #[error(
        "an event may go to at most {MAX_DELIVERIES_PER_EVENT} subscriptions, this one matches {0}"
    )]
    TooManyDeliveries(usize),
    #[error("storage writer has stopped")]
    WriterGone,
    /// `reason` says what went wrong in words (sled's own text of an I/O error is its debug form).
    #[error("cannot open storage at {path}: {reason}")]
    Open { path: String, reason: String },
}

/// A key to insert (with its value) or remove.
type KeyWrite = (Vec<u8>, Option<Vec<u8>>);

/// A change for the writer thread, which applies every change of the store's deliveries, due
/// entries and events: one thread, so that no two writers contend for the same sled nodes, and
/// the changes that queue up while it works go to sled as one batch.
enum Write {
    /// Intake, answered once applied and flushed; or a flush (no writes), answered once every
    /// change queued before it, outcomes included, is applied and flushed. The events' deliveries
    /// are kept in memory once written (see `fresh`).
    Durable(
        Vec<KeyWrite>,
        Vec<NewEvent>,
        oneshot::Sender<Result<(), String>>,
    ),
    /// An attempt's outcome, applied unless the claim of `delivery` was voided (its claimed due
    /// entry removed meanwhile); `done` is called on the writer thread with whether it was. The
    /// claim ends once it is applied, and so does the due entry it was claimed by: the one of
    /// `subscription` at `claimed_due_ms`, in memory or in sled.
    Outcome {
        delivery: Uuid,
        subscription: Uuid,
        claimed_due_ms: u64,
        writes: Vec<KeyWrite>,
        done: OutcomeDone,
    },
    /// Reads and writes of its own (deleting a subscription, redelivery, retention), run alone
    /// once everything queued before it is applied.
    Exclusive(Box<dyn FnOnce() + Send>),
}

/// An event written at intake: id, arrival, subscriptions, and the indexes (ascending) of its
/// held deliveries, which do not wait in memory (see [`Store::accept`]); most events have none.
type NewEvent = (Uuid, u64, Vec<Uuid>, Vec<usize>);

/// The deliveries of an event that wait for their first attempt in memory: all but the held ones.
fn waiting<'a>(subs: &[Uuid], held: &'a [usize]) -> impl Iterator<Item = usize> + 'a {
    (0..subs.len()).filter(move |i| held.binary_search(i).is_err())
}

/// What runs on the writer thread once an attempt's outcome is applied: `Ok(true)` when it was
/// written, `Ok(false)` when its claimed due entry was gone and nothing was.
pub type OutcomeDone = Box<dyn FnOnce(Result<bool, StoreError>) + Send>;

/// sled's cache (see [`Store::open`]).
const CACHE_BYTES: u64 = 2 * 1024 * 1024;

/// The least time between two [`release_memory`] calls of the writer while it applies changes.
/// Memory freed since the last trim stays resident: with a million retries coming due at
/// ~1,600/s, a trim every 6,400 outcomes (4 s) let it reach tens of MiB. A trim takes ~3 ms
/// (up to ~17 ms) with the heap of that run, so this bounds its cost to about 1% of a core
/// whatever the rate. The writer trims when nothing is queued, so that no intake request waits
/// for a trim, and after [`TRIM_FORCE`] when something always was.
const TRIM_INTERVAL: Duration = Duration::from_millis(250);
const TRIM_FORCE: Duration = Duration::from_secs(2);

/// How long the writer waits for a change before it trims anyway (reads page sled's nodes in and
/// out without any write), doubled after each idle trim up to [`IDLE_TRIM_MAX`].
const IDLE_TRIM: Duration = Duration::from_secs(1);
const IDLE_TRIM_MAX: Duration = Duration::from_secs(64);

/// Collects the garbage sled leaves behind a batch. sled frees old versions of the nodes it
/// rewrites through crossbeam's epochs, a little on each later pin; a thread that writes large
/// batches and pins rarely (the writer) falls behind by kilobytes per event. Measured: ingest
/// without this peaked anywhere from 106 to 449 MiB in identical runs, with it at 80 MiB.
fn collect_garbage(keys: usize) {
    for _ in 0..(keys / 64).clamp(1, 64) {
        crossbeam_epoch::pin().flush();
    }
}

/// Gives memory glibc's malloc holds free back to the system (it keeps tens of MiB after a burst
/// of sled node copies). For programs that embed the library on glibc's malloc: the `dispatcher`
/// binary runs on mimalloc, which gives memory back itself, and this only trims glibc's small heap.
pub fn release_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own heap structures, under its own locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The most changes the writer applies as one batch.
const MAX_GROUP: usize = 4096;

/// The handle to the database; cheap to clone.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    tree: sled::Tree,
    writer: WriterHandle,
    /// Deliveries whose attempt is in flight; their due entries stay in sled until the outcome.
    claimed: Arc<std::sync::Mutex<Claims>>,
    due_writes: DueWrites,
}

/// Counts the writes that may have put due entries into sled, so that a lane that found none of
/// its own there need not look again until the count moves (see [`DueScan`]). Every sled batch
/// goes through [`DueWrites::apply_batch`], and [`Changes::apply`] counts its single writes of
/// due entries: counted once applied (or failed).
#[derive(Clone, Default)]
struct DueWrites(Arc<std::sync::atomic::AtomicU64>);

impl DueWrites {
    fn bump(&self) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Release);
    }

    /// `tree.apply_batch(batch)`, counted.
    fn apply_batch(&self, tree: &sled::Tree, batch: sled::Batch) -> sled::Result<()> {
        let written = tree.apply_batch(batch);
        self.bump();
        written
    }

    fn count(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// What a lane last found of its subscription's due entries in sled: none at all (in flight or
/// not), as of that count of [`DueWrites`]. Until the count moves, [`Store::lane_due_entries`]
/// reads only memory: most deliveries never have a due entry in sled, and a scan of an empty
/// range of the tree costs a walk from its root.
#[derive(Debug, Default)]
pub struct DueScan {
    none_at: Option<u64>,
}

/// The way to the writer thread. An attempt's outcome is only queued: the writer, once it has
/// applied outcomes, waits [`OUTCOME_GATHER`] for more before it blocks on the queue again, so
/// that a stream of outcomes costs it one wake-up per gathering rather than one per outcome (a
/// wake-up is a system call for the sender and a context switch for both). Everything else
/// someone waits for (intake, a flush, an exclusive change) wakes it at once.
#[derive(Clone)]
struct WriterHandle {
    tx: std::sync::mpsc::Sender<Write>,
    thread: std::thread::Thread,
}

impl WriterHandle {
    fn send(&self, w: Write) -> Result<(), std::sync::mpsc::SendError<Write>> {
        let wake = !matches!(w, Write::Outcome { .. });
        self.tx.send(w)?;
        if wake {
            self.thread.unpark();
        }
        Ok(())
    }
}

/// How long the writer waits for more outcomes after applying some (see [`WriterHandle`]).
const OUTCOME_GATHER: Duration = Duration::from_millis(1);

fn key(prefix: u8, id: &Uuid) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = prefix;
    k[1..].copy_from_slice(id.as_bytes());
    k
}

/// Due entries of `sub` from (due time, delivery) pairs.
fn due_list(sub: &Uuid, entries: Vec<(u64, Uuid)>) -> Vec<Due> {
    entries
        .into_iter()
        .map(|(due_ms, delivery)| Due {
            subscription: *sub,
            due_ms,
            delivery,
        })
        .collect()
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

/// A delivery's record (see [`record`]).
fn delivery_record(k: &[u8], v: &[u8]) -> Result<Delivery, StoreError> {
    record::decode_delivery(v).map_err(|message| StoreError::Malformed {
        key: format!("d{}", Uuid::from_slice(&k[1..]).unwrap_or_default()),
        message,
    })
}

fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    // The model types hold only strings, numbers and maps with string keys.
    serde_json::to_vec(value).expect("model types serialise to JSON")
}

/// Where a claimed due entry was (see [`Store::claim_entry`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claimed {
    /// In memory: the delivery waits for its first attempt and has no record of its own.
    First,
    /// In sled's due index.
    Indexed,
}

/// A due entry: the delivery `delivery` of lane `subscription` is due at `due_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Due {
    pub subscription: Uuid,
    pub due_ms: u64,
    pub delivery: Uuid,
}

/// The version byte that starts an event record.
const EVENT_RECORD_V1: u8 = 1;

/// An event record: `[1][received_at u64][name length u8][name][n u16][n subscription ids][event JSON]`.
fn encode_event<E: serde::Serialize>(e: &StoredEvent<E>) -> Result<Vec<u8>, StoreError> {
    let n = e.subscriptions.len();
    if n > MAX_DELIVERIES_PER_EVENT {
        return Err(StoreError::TooManyDeliveries(n));
    }
    // Event names come from a short fixed catalogue.
    let name = &e.name.as_bytes()[..e.name.len().min(u8::MAX as usize)];
    let mut v = Vec::with_capacity(12 + name.len() + 16 * n + 256);
    v.push(EVENT_RECORD_V1);
    v.extend_from_slice(&e.received_at.to_be_bytes());
    v.push(name.len() as u8);
    v.extend_from_slice(name);
    v.extend_from_slice(&(n as u16).to_be_bytes());
    for s in &e.subscriptions {
        v.extend_from_slice(s.as_bytes());
    }
    // The event objects taken in hold only maps with string keys.
    serde_json::to_writer(&mut v, &e.event).expect("an event object serialises");
    Ok(v)
}

/// A delivery as intake created it: pending, due at its event's arrival, no attempt yet.
fn initial_delivery(
    id: Uuid,
    event_id: Uuid,
    event: &str,
    subscription_id: Uuid,
    received_at: u64,
) -> Delivery {
    Delivery {
        id,
        event_id,
        event: event.to_string(),
        subscription_id,
        status: DeliveryStatus::Pending,
        created_at: received_at,
        next_attempt_at: Some(received_at),
        ended_at: None,
        error: None,
        attempts: Vec::new(),
    }
}

/// The fixed part of an event record, read without parsing the event's JSON.
struct EventHead<'a> {
    received_at: u64,
    name: &'a str,
    subscriptions: &'a [u8],
    json: &'a [u8],
}

impl<'a> EventHead<'a> {
    fn parse(k: &[u8], v: &'a [u8]) -> Result<EventHead<'a>, StoreError> {
        let bad = |message: &str| StoreError::Malformed {
            key: format!("e{}", Uuid::from_slice(&k[1..]).unwrap_or_default()),
            message: message.to_string(),
        };
        if v.first() != Some(&EVENT_RECORD_V1) || v.len() < 10 {
            return Err(bad("not an event record"));
        }
        let received_at = u64::from_be_bytes(v[1..9].try_into().expect("8 bytes"));
        let name_len = v[9] as usize;
        let rest = &v[10..];
        if rest.len() < name_len + 2 {
            return Err(bad("truncated event name"));
        }
        let name = std::str::from_utf8(&rest[..name_len]).map_err(|_| bad("event name"))?;
        let rest = &rest[name_len..];
        let n = u16::from_be_bytes([rest[0], rest[1]]) as usize;
        let rest = &rest[2..];
        if rest.len() < 16 * n {
            return Err(bad("truncated subscription list"));
        }
        Ok(EventHead {
            received_at,
            name,
            subscriptions: &rest[..16 * n],
            json: &rest[16 * n..],
        })
    }

    fn len(&self) -> usize {
        self.subscriptions.len() / 16
    }

    fn subscription(&self, index: usize) -> Uuid {
        uuid_at(self.subscriptions, 16 * index)
    }

    /// Delivery `index` as intake created it: pending, due at the event's arrival.
    fn initial(&self, event: &Uuid, index: usize) -> Delivery {
        initial_delivery(
            delivery_id(event, index),
            *event,
            self.name,
            self.subscription(index),
            self.received_at,
        )
    }

    fn event(&self, id: &Uuid, k: &[u8]) -> Result<StoredEvent, StoreError> {
        Ok(StoredEvent {
            id: *id,
            received_at: self.received_at,
            name: self.name.to_string(),
            event: decode(k, self.json)?,
            subscriptions: (0..self.len()).map(|i| self.subscription(i)).collect(),
        })
    }
}

/// What one step of retention did.
#[derive(Debug, Default)]
pub struct PurgeStep {
    /// Deliveries purged.
    pub purged: usize,
    /// The last event looked at, where the next step goes on; `None` once the walk reached the end.
    pub next: Option<Uuid>,
}

impl Store {
    /// Opens (or creates) the database at `path` and starts its writer thread.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Store::open_with(path, Limits::default())
    }

    /// [`Store::open`] with other [`Limits`] (tests).
    fn open_with(path: &Path, limits: Limits) -> Result<Store, StoreError> {
        let config = sled::Config::new()
            .path(path)
            // sled counts a node's size on disk against this, while nodes in memory are about
            // three times that: measured with a million retries waiting (stock sled's leaves),
            // 64 MiB of "cache" peaked at 254 MiB RSS and 4 MiB at 122 MiB, with the same
            // throughput (the records a lane reads are random reads the OS page cache serves).
            // On mimalloc (the daemon's allocator) 4 MiB peaked at 136 MiB and 2 MiB at 118-119,
            // at the price of a third to two thirds more CPU per retry while the million came
            // due (123-151 s against 92 s). A program embedding the library on glibc gets the
            // smaller cache too; it was not measured on its own there.
            .cache_capacity(CACHE_BYTES);
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        let db = loop {
            match config.open() {
                Ok(db) => break db,
                Err(e) if is_locked(&e) && std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => {
                    return Err(StoreError::Open {
                        path: path.display().to_string(),
                        reason: open_failure(&e),
                    });
                }
            }
        };
        let tree = db.open_tree("dispatcher")?;
        let (fresh, watermark) = recover_fresh(&db, &tree)?;
        let claimed = Arc::new(std::sync::Mutex::new(Claims {
            fresh,
            ..Claims::default()
        }));
        let due_writes = DueWrites::default();
        let (wtx, wrx) = std::sync::mpsc::channel();
        let writer = Writer {
            db: db.clone(),
            tree: tree.clone(),
            claimed: claimed.clone(),
            due_writes: due_writes.clone(),
            changes: 0,
            trimmed: Instant::now(),
            watermark,
            newest: watermark,
            watermark_at: Instant::now(),
            limits,
        };
        let thread = std::thread::Builder::new()
            .name("sled-writer".into())
            .spawn(move || {
                // Every intake answer waits for this thread's flush: when it wakes on a busy
                // machine, it should run before threads that only want their share.
                if let Err(e) = crate::ops::sched::short_slice() {
                    tracing::debug!(error = %e, "the writer thread keeps the default time slice");
                }
                writer.run(wrx)
            })
            .map_err(|e| StoreError::Sled(sled::Error::Io(e)))?
            .thread()
            .clone();
        Ok(Store {
            db,
            tree,
            writer: WriterHandle { tx: wtx, thread },
            claimed,
            due_writes,
        })
    }

    /// Makes every write made before this call durable. Many concurrent callers share one fsync.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.writer
            .send(Write::Durable(Vec::new(), Vec::new(), tx))
            .map_err(|_| StoreError::WriterGone)?;
        Durable(rx).wait().await
    }

    /// Flushes from a blocking context (shutdown).
    pub fn flush_blocking(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    /// Runs `f` on the writer thread, alone, once every change queued before it is applied.
    fn exclusive<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> R + Send + 'static,
    ) -> Result<oneshot::Receiver<R>, StoreError> {
        let (tx, rx) = oneshot::channel();
        let store = self.clone();
        self.writer
            .send(Write::Exclusive(Box::new(move || {
                let _ = tx.send(f(&store));
            })))
            .map_err(|_| StoreError::WriterGone)?;
        Ok(rx)
    }

    /// [`Store::exclusive`], awaited.
    async fn exclusively<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        self.exclusive(f)?
            .await
            .map_err(|_| StoreError::WriterGone)?
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
    pub async fn delete_subscription(
        &self,
        sub: &Uuid,
        reason: &str,
        now_ms: u64,
    ) -> Result<usize, StoreError> {
        let (sub, reason) = (*sub, reason.to_string());
        self.exclusively(move |s| s.delete_subscription_now(&sub, &reason, now_ms))
            .await
    }

    fn delete_subscription_now(
        &self,
        sub: &Uuid,
        reason: &str,
        now_ms: u64,
    ) -> Result<usize, StoreError> {
        let mut batch = sled::Batch::default();
        batch.remove(key(SUB, sub).as_slice());
        let mut ended = 0;
        let mut p = vec![DUE];
        p.extend_from_slice(sub.as_bytes());
        let mut void = Vec::new();
        for r in self.tree.scan_prefix(&p) {
            let (k, _) = r?;
            batch.remove(k.clone());
            void.push(uuid_at(&k, k.len() - 16));
        }
        // Those waiting for their first attempt in memory leave it with the rest.
        let fresh = self.claimed_set().fresh.take_subscription(sub);
        void.extend(fresh.into_iter().map(|(_, did)| did));
        for did in &void {
            if let Some(mut d) = self.delivery(did)? {
                d.status = DeliveryStatus::Failed;
                d.next_attempt_at = None;
                d.error = Some(reason.to_string());
                d.ended_at = Some(now_ms);
                batch.insert(key(DELIVERY, &d.id).as_slice(), encode_delivery(&d));
                batch.insert(key(FAILED, &d.id).as_slice(), EMPTY);
                ended += 1;
            }
        }
        self.due_writes.apply_batch(&self.tree, batch)?;
        // The outcomes of attempts in flight find their claimed entries gone: they write nothing.
        let mut claimed = self.claimed_set();
        for did in void {
            if claimed.held.contains(&did) {
                claimed.voided.insert(did);
            }
        }
        Ok(ended)
    }

    // ---- intake ----

    /// Writes events in one atomic batch (not yet flushed); their deliveries are due at once,
    /// and kept in memory until their first attempt (see `fresh`), but for the held ones
    /// (`held[n]`: the indexes of event `n`'s deliveries to disabled subscriptions; none for an
    /// event beyond `held`), which get their due entries in sled in the same batch:
    /// a held delivery waits for its subscription, which may be long, and in memory it would take
    /// the room of deliveries that go out. Events sent with an idempotency key record their
    /// receipt under it in the same batch. Delivery `i` of an event goes to its `i`-th
    /// subscription (see [`delivery_id`]).
    ///
    /// The writes are queued in call order; the returned [`Durable`] resolves once they are
    /// applied and flushed.
    pub fn accept<E: serde::Serialize>(
        &self,
        events: &[StoredEvent<E>],
        keys: &[(String, IdempotencyRecord)],
        held: &[Vec<usize>],
    ) -> Result<Durable, StoreError> {
        let mut writes: Vec<KeyWrite> = Vec::with_capacity(keys.len() + events.len());
        for (k, record) in keys {
            writes.push((
                [&[IDEMPOTENCY][..], k.as_bytes()].concat(),
                Some(encode(record)),
            ));
        }
        let mut new = Vec::with_capacity(events.len());
        for (n, event) in events.iter().enumerate() {
            writes.push((key(EVENT, &event.id).to_vec(), Some(encode_event(event)?)));
            // Ascending, once each, and within the event: the writer searches them.
            let mut held: Vec<usize> = held
                .get(n)
                .map(|h| {
                    h.iter()
                        .copied()
                        .filter(|&i| i < event.subscriptions.len())
                        .collect()
                })
                .unwrap_or_default();
            held.sort_unstable();
            held.dedup();
            new.push((
                event.id,
                event.received_at,
                event.subscriptions.clone(),
                held,
            ));
        }
        let (tx, rx) = oneshot::channel();
        self.writer
            .send(Write::Durable(writes, new, tx))
            .map_err(|_| StoreError::WriterGone)?;
        Ok(Durable(rx))
    }

    /// The first receipt of an idempotency key, if one was recorded.
    pub fn idempotency(&self, client_key: &str) -> Result<Option<IdempotencyRecord>, StoreError> {
        let k = [&[IDEMPOTENCY][..], client_key.as_bytes()].concat();
        self.tree.get(&k)?.map(|v| decode(&k, &v)).transpose()
    }

    /// Forgets idempotency keys recorded before `cutoff_ms`, at most `max`.
    pub fn purge_idempotency(&self, cutoff_ms: u64, max: usize) -> Result<usize, StoreError> {
        let mut n = 0;
        for r in self.tree.scan_prefix([IDEMPOTENCY]) {
            let (k, v) = r?;
            let rec: IdempotencyRecord = decode(&k, &v)?;
            if rec.at < cutoff_ms {
                // Only the record read: intake may have given the key to a new event since (the
                // writer, on its own thread), and that record stays.
                let removed = self
                    .tree
                    .compare_and_swap(&k, Some(&v), None as Option<&[u8]>)?
                    .is_ok();
                n += usize::from(removed);
                if n >= max {
                    break;
                }
            }
        }
        Ok(n)
    }

    pub fn event(&self, id: &Uuid) -> Result<Option<StoredEvent>, StoreError> {
        let k = key(EVENT, id);
        match self.tree.get(k)? {
            Some(v) => Ok(Some(EventHead::parse(&k, &v)?.event(id, &k)?)),
            None => Ok(None),
        }
    }

    pub fn delivery(&self, id: &Uuid) -> Result<Option<Delivery>, StoreError> {
        Ok(self.delivery_and_event(id, false)?.map(|(d, _)| d))
    }

    /// A delivery, and its event when `with_event` or when reading the delivery meant reading
    /// the event anyway (it has not changed since intake).
    pub fn delivery_and_event(
        &self,
        id: &Uuid,
        with_event: bool,
    ) -> Result<Option<(Delivery, Option<StoredEvent>)>, StoreError> {
        self.read_delivery(id, with_event, false)
    }

    /// [`Store::delivery_and_event`]; `first` for a delivery claimed as [`Claimed::First`],
    /// which has no record of its own, so that only its event is read.
    pub fn read_delivery(
        &self,
        id: &Uuid,
        with_event: bool,
        first: bool,
    ) -> Result<Option<(Delivery, Option<StoredEvent>)>, StoreError> {
        let k = key(DELIVERY, id);
        let stored = match if first { None } else { self.tree.get(k)? } {
            Some(v) if v == TOMBSTONE => return Ok(None),
            Some(v) => Some(delivery_record(&k, &v)?),
            None => None,
        };
        let stored = match stored {
            Some(d) if !with_event => return Ok(Some((d, None))),
            other => other,
        };
        let Some((event_id, index)) = event_of(id) else {
            return Ok(stored.map(|d| (d, None)));
        };
        let ek = key(EVENT, &event_id);
        let Some(v) = self.tree.get(ek)? else {
            return Ok(stored.map(|d| (d, None)));
        };
        let head = EventHead::parse(&ek, &v)?;
        if index >= head.len() {
            return Ok(None);
        }
        let event = with_event.then(|| head.event(&event_id, &ek)).transpose()?;
        let d = stored.unwrap_or_else(|| head.initial(&event_id, index));
        Ok(Some((d, event)))
    }

    /// The state of delivery `index` of an event whose record is `head`: `None` once purged.
    fn delivery_in(
        &self,
        head: &EventHead<'_>,
        event: &Uuid,
        index: usize,
    ) -> Result<Option<Delivery>, StoreError> {
        let did = delivery_id(event, index);
        let k = key(DELIVERY, &did);
        match self.tree.get(k)? {
            Some(v) if v == TOMBSTONE => Ok(None),
            Some(v) => Ok(Some(delivery_record(&k, &v)?)),
            None => Ok(Some(head.initial(event, index))),
        }
    }

    /// Whether a delivery passes a listing's filters (those the walk has not applied already).
    fn listed(&self, q: &DeliveryQuery, d: &Delivery) -> bool {
        q.subscription.is_none_or(|s| d.subscription_id == s)
            && q.event.as_deref().is_none_or(|e| d.event == e)
            && q.since_ms.is_none_or(|t| d.created_at >= t)
            && match q.status {
                None => true,
                Some(StatusFilter::Delivered) => d.status == DeliveryStatus::Delivered,
                Some(StatusFilter::Failed) => d.status == DeliveryStatus::Failed,
                Some(StatusFilter::Pending) => {
                    d.status == DeliveryStatus::Pending && !self.is_in_flight(&d.id)
                }
                Some(StatusFilter::InFlight) => {
                    d.status == DeliveryStatus::Pending && self.is_in_flight(&d.id)
                }
            }
    }

    /// A page of the delivery log, newest first: the failed log for `status=failed`, the events
    /// and their deliveries otherwise.
    pub fn deliveries(&self, q: &DeliveryQuery) -> Result<DeliveryPage, StoreError> {
        if q.status == Some(StatusFilter::Failed) {
            return self.failed_page(q);
        }
        let lower = key(
            EVENT,
            &Uuid::from_bytes(uuid_floor(q.since_ms.unwrap_or(0))),
        );
        // The cursor is the last delivery of the previous page: its event's older deliveries,
        // then older events.
        let (upper, first_below) = match q.before.as_ref().map(|c| (c, event_of(c))) {
            Some((_, Some((event, index)))) => {
                let mut u = key(EVENT, &event).to_vec();
                u.push(0);
                (u, Some((event, index)))
            }
            Some((c, None)) => (key(EVENT, c).to_vec(), None),
            None => (vec![EVENT + 1], None),
        };
        let mut page = DeliveryPage::default();
        let mut walked = 0;
        for r in self.tree.range(lower.to_vec()..upper).rev() {
            let (k, v) = r?;
            let event = uuid_at(&k, 1);
            let head = EventHead::parse(&k, &v)?;
            if q.event.as_deref().is_some_and(|e| e != head.name) {
                walked += 1;
                if walked > SCAN_BUDGET {
                    page.next = Some(delivery_id(&event, 0));
                    return Ok(page);
                }
                continue;
            }
            let end = match first_below {
                // A cursor is a client's input: an index past the event's deliveries is its end.
                Some((e, index)) if e == event => index.min(head.len()),
                _ => head.len(),
            };
            for index in (0..end).rev() {
                walked += 1;
                let did = delivery_id(&event, index);
                if walked > SCAN_BUDGET {
                    page.next = Some(delivery_id(&event, index + 1));
                    return Ok(page);
                }
                if q.subscription
                    .is_some_and(|s| s != head.subscription(index))
                {
                    continue;
                }
                let Some(d) = self.delivery_in(&head, &event, index)? else {
                    continue;
                };
                if self.listed(q, &d) {
                    page.deliveries.push(d);
                    if page.deliveries.len() >= q.limit {
                        page.next = Some(did);
                        return Ok(page);
                    }
                }
            }
        }
        Ok(page)
    }

    /// A page of the failed log, newest first.
    fn failed_page(&self, q: &DeliveryQuery) -> Result<DeliveryPage, StoreError> {
        let lower = key(
            FAILED,
            &Uuid::from_bytes(uuid_floor(q.since_ms.unwrap_or(0))),
        );
        let upper = match &q.before {
            Some(c) => key(FAILED, c).to_vec(),
            None => vec![FAILED + 1],
        };
        let mut page = DeliveryPage::default();
        for (walked, r) in self.tree.range(lower.to_vec()..upper).rev().enumerate() {
            let (k, _) = r?;
            let did = uuid_at(&k, 1);
            if walked >= SCAN_BUDGET {
                page.next = Some(did);
                return Ok(page);
            }
            let Some(d) = self.delivery(&did)? else {
                continue;
            };
            if self.listed(q, &d) {
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
        self.claimed_set().held.contains(delivery)
    }

    /// The due entries in sled (not those waiting in memory): subscription, due time, delivery.
    #[cfg(test)]
    pub(crate) fn due_in_sled(&self) -> Vec<(Uuid, u64, Uuid)> {
        self.tree
            .scan_prefix([DUE])
            .keys()
            .map(|k| {
                let k = k.unwrap();
                let ms = u64::from_be_bytes(k[17..25].try_into().unwrap());
                (uuid_at(&k, 1), ms, uuid_at(&k, 25))
            })
            .collect()
    }

    /// Holds the writer thread until the returned sender sends or is dropped (10 s at most); the
    /// receiver says when it went on.
    #[cfg(test)]
    pub(crate) fn hold_writer(
        &self,
    ) -> (
        std::sync::mpsc::Sender<()>,
        oneshot::Receiver<Result<(), std::sync::mpsc::RecvTimeoutError>>,
    ) {
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let held = self
            .exclusive(move |_| wait.recv_timeout(Duration::from_secs(10)))
            .unwrap();
        (go, held)
    }

    /// Makes the writer's next group of intake fail as a write that sled refused: nothing of it
    /// is written, and its callers get the error.
    #[cfg(test)]
    pub(crate) fn fail_next_intake(&self) {
        self.claimed_set().fail_next_intake = true;
    }

    fn claimed_set(&self) -> std::sync::MutexGuard<'_, Claims> {
        self.claimed.lock().expect("claimed set lock poisoned")
    }

    // ---- the scheduler's index ----

    /// The earliest due entry of a subscription's lane that is not in flight.
    pub fn next_due(&self, sub: &Uuid) -> Result<Option<Due>, StoreError> {
        Ok(self.due_entries(sub, 1)?.pop())
    }

    /// The earliest `max` due entries of a subscription's lane that are not in flight, earliest
    /// first.
    pub fn due_entries(&self, sub: &Uuid, max: usize) -> Result<Vec<Due>, StoreError> {
        self.lane_due_entries(sub, max, &mut DueScan::default())
    }

    /// [`Store::due_entries`] for a lane that keeps what it found in sled in `scan`: sled is read
    /// only if it held some of the subscription's entries then, or may have been given some since.
    pub fn lane_due_entries(
        &self,
        sub: &Uuid,
        max: usize,
        scan: &mut DueScan,
    ) -> Result<Vec<Due>, StoreError> {
        let mut p = [0u8; 17];
        p[0] = DUE;
        p[1..].copy_from_slice(sub.as_bytes());
        // Those kept in memory first: the writer spills an entry to sled before it leaves memory,
        // so one that left since is found below (an entry being spilled is in both for a moment).
        let mut out = {
            let claims = self.claimed_set();
            claims.fresh.earliest(sub, max, |d| claims.held.contains(d))
        };
        let from_memory = out.len();
        // Read before the scan: a write counted after it may have added what the scan missed.
        let writes = self.due_writes.count();
        if scan.none_at == Some(writes) {
            return Ok(due_list(sub, out));
        }
        // Known to hold none only once a read of it ended without an error.
        scan.none_at = None;
        let mut none = true;
        // Entries in flight keep their place at the front: at most a lane's slots (and the
        // outcomes on their way to the writer) are skipped.
        for r in self.tree.scan_prefix(p) {
            let (k, _) = r?;
            // One in flight counts: its claim may be let go without a write.
            none = false;
            let delivery = uuid_at(&k, 25);
            if self.is_in_flight(&delivery) {
                continue;
            }
            let mut ms = [0u8; 8];
            ms.copy_from_slice(&k[17..25]);
            out.push((u64::from_be_bytes(ms), delivery));
            if out.len() - from_memory >= max {
                break;
            }
        }
        if none {
            scan.none_at = Some(writes);
        }
        out.sort_unstable();
        out.dedup();
        out.truncate(max);
        Ok(due_list(sub, out))
    }

    /// Claims a due entry for an attempt. `false` when it is gone or already claimed.
    pub fn claim(&self, due: &Due) -> Result<bool, StoreError> {
        Ok(self.claim_entry(due)?.is_some())
    }

    /// [`Store::claim`], telling where the entry was: `Some(Claimed::First)` when it was one
    /// kept in memory, a delivery waiting for its first attempt since intake, which has no
    /// record of its own yet (see [`Store::first_delivery`]).
    pub fn claim_entry(&self, due: &Due) -> Result<Option<Claimed>, StoreError> {
        let mut claimed = self.claimed_set();
        if claimed.held.contains(&due.delivery) {
            return Ok(None);
        }
        let kind = if claimed
            .fresh
            .contains(&due.subscription, due.due_ms, &due.delivery)
        {
            Claimed::First
        } else if self
            .tree
            .contains_key(due_key(&due.subscription, due.due_ms, &due.delivery))?
        {
            Claimed::Indexed
        } else {
            return Ok(None);
        };
        claimed.held.insert(due.delivery);
        Ok(Some(kind))
    }

    /// A delivery claimed as [`Claimed::First`], as intake created it, from what its due entry
    /// and its event's name say, without reading storage: it is pending, due at its event's
    /// arrival (`due.due_ms`), and has no record of its own until its first outcome.
    pub fn first_delivery(due: &Due, event_name: &str) -> Option<Delivery> {
        let (event_id, _) = event_of(&due.delivery)?;
        Some(initial_delivery(
            due.delivery,
            event_id,
            event_name,
            due.subscription,
            due.due_ms,
        ))
    }

    /// Gives a claim up without an outcome (the attempt did not run).
    pub fn release(&self, delivery: &Uuid) {
        let mut claimed = self.claimed_set();
        claimed.held.remove(delivery);
        claimed.voided.remove(delivery);
    }

    /// Writes an attempt's outcome: the updated delivery, the end of the due entry it was
    /// claimed by (`claimed_due_ms`), its next due entry when another attempt follows, its place
    /// in the failed log when it failed; then the claim ends. `Ok(false)` when the claimed entry
    /// is gone — the delivery was ended meanwhile (its subscription deleted) — and nothing is
    /// written, so a deleted subscription never gets a due entry back.
    pub async fn record_attempt(
        &self,
        d: &Delivery,
        claimed_due_ms: u64,
    ) -> Result<bool, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.record_attempt_then(
            d,
            claimed_due_ms,
            Box::new(move |result| {
                let _ = tx.send(result);
            }),
        );
        rx.await.unwrap_or(Err(StoreError::WriterGone))
    }

    /// [`Store::record_attempt`] without waiting: `done` is called with its result on the writer
    /// thread once the outcome is applied (or at once, on the caller's thread, when the writer
    /// is gone). No task waits for the write, so an attempt costs no wake-up for it.
    pub fn record_attempt_then(&self, d: &Delivery, claimed_due_ms: u64, done: OutcomeDone) {
        let mut writes: Vec<KeyWrite> =
            vec![(key(DELIVERY, &d.id).to_vec(), Some(encode_delivery(d)))];
        match d.status {
            DeliveryStatus::Pending => {
                let due = d.next_attempt_at.unwrap_or(0);
                writes.push((
                    due_key(&d.subscription_id, due, &d.id).to_vec(),
                    Some(Vec::new()),
                ));
            }
            DeliveryStatus::Failed => writes.push((key(FAILED, &d.id).to_vec(), Some(Vec::new()))),
            DeliveryStatus::Delivered => {}
        }
        let sent = self.writer.send(Write::Outcome {
            delivery: d.id,
            subscription: d.subscription_id,
            claimed_due_ms,
            writes,
            done,
        });
        if let Err(std::sync::mpsc::SendError(Write::Outcome { done, .. })) = sent {
            self.release(&d.id);
            done(Err(StoreError::WriterGone));
        }
    }

    /// Schedules a fresh attempt of a delivery at `now_ms`, whatever its status. `Ok(None)` when
    /// there is no such delivery; an error message when an attempt is in flight.
    pub async fn redeliver(
        &self,
        id: &Uuid,
        now_ms: u64,
    ) -> Result<Option<Result<Delivery, String>>, StoreError> {
        let id = *id;
        self.exclusively(move |s| s.redeliver_now(&id, now_ms))
            .await
    }

    /// Redelivers every `failed` delivery of a subscription created at or after `since_ms`, at
    /// `now_ms`. Returns how many were scheduled.
    pub async fn recover(
        &self,
        sub: &Uuid,
        since_ms: u64,
        now_ms: u64,
    ) -> Result<usize, StoreError> {
        let sub = *sub;
        self.exclusively(move |s| {
            let mut n = 0;
            for did in s.failed_since(&sub, since_ms)? {
                if let Some(Ok(_)) = s.redeliver_now(&did, now_ms)? {
                    n += 1;
                }
            }
            Ok(n)
        })
        .await
    }

    fn redeliver_now(
        &self,
        id: &Uuid,
        now_ms: u64,
    ) -> Result<Option<Result<Delivery, String>>, StoreError> {
        let Some(mut d) = self.delivery(id)? else {
            return Ok(None);
        };
        // Held while the entry moves, so a lane cannot claim the old one meanwhile.
        let mut claimed = self.claimed_set();
        if claimed.held.contains(&d.id) {
            return Ok(Some(Err("an attempt of this delivery is in flight".into())));
        }
        let mut batch = sled::Batch::default();
        match d.status {
            DeliveryStatus::Pending => {
                if let Some(due) = d.next_attempt_at
                    && !claimed.fresh.take(&d.subscription_id, due, &d.id)
                {
                    batch.remove(due_key(&d.subscription_id, due, &d.id).as_slice());
                }
            }
            DeliveryStatus::Failed => batch.remove(key(FAILED, &d.id).as_slice()),
            DeliveryStatus::Delivered => {}
        }
        d.status = DeliveryStatus::Pending;
        d.next_attempt_at = Some(now_ms);
        d.ended_at = None;
        d.error = None;
        batch.insert(key(DELIVERY, &d.id).as_slice(), encode_delivery(&d));
        batch.insert(due_key(&d.subscription_id, now_ms, &d.id).as_slice(), EMPTY);
        self.due_writes.apply_batch(&self.tree, batch)?;
        Ok(Some(Ok(d)))
    }

    /// The `failed` deliveries of a subscription created at or after `since_ms`, oldest first.
    pub fn failed_since(&self, sub: &Uuid, since_ms: u64) -> Result<Vec<Uuid>, StoreError> {
        let start = key(FAILED, &Uuid::from_bytes(uuid_floor(since_ms)));
        let mut out = Vec::new();
        for r in self.tree.range(start.to_vec()..vec![FAILED + 1]) {
            let (k, _) = r?;
            let did = uuid_at(&k, 1);
            if let Some(d) = self.delivery(&did)?
                && d.subscription_id == *sub
                && d.status == DeliveryStatus::Failed
                && d.created_at >= since_ms
            {
                out.push(did);
            }
        }
        Ok(out)
    }

    /// One bounded step of retention: walks at most `budget` events oldest first, after `from`,
    /// among those received before the later of the two cutoffs. A delivery goes once it has
    /// ended — `delivered` before `delivered_cutoff`, `failed` before `failed_cutoff` — and an
    /// event goes with its last delivery; an event that went to no subscription goes once it
    /// was received before `bare_cutoff`. A purged delivery whose event still has others is
    /// left as a tombstone until the event goes.
    pub async fn purge_step(
        &self,
        delivered_cutoff: u64,
        failed_cutoff: u64,
        bare_cutoff: u64,
        from: Option<Uuid>,
        budget: usize,
    ) -> Result<PurgeStep, StoreError> {
        self.exclusively(move |s| {
            s.purge_step_now(delivered_cutoff, failed_cutoff, bare_cutoff, from, budget)
        })
        .await
    }

    fn purge_step_now(
        &self,
        delivered_cutoff: u64,
        failed_cutoff: u64,
        bare_cutoff: u64,
        from: Option<Uuid>,
        budget: usize,
    ) -> Result<PurgeStep, StoreError> {
        let lower = match from {
            Some(e) => {
                let mut k = key(EVENT, &e).to_vec();
                k.push(0);
                k
            }
            None => vec![EVENT],
        };
        let upper = key(
            EVENT,
            &Uuid::from_bytes(uuid_floor(delivered_cutoff.max(failed_cutoff))),
        );
        let mut step = PurgeStep::default();
        let mut batch = sled::Batch::default();
        let mut dirty = false;
        for r in self.tree.range(lower..upper.to_vec()).take(budget) {
            let (k, v) = r?;
            let event = uuid_at(&k, 1);
            step.next = Some(event);
            let head = EventHead::parse(&k, &v)?;
            if head.len() == 0 {
                if head.received_at < bare_cutoff {
                    batch.remove(k);
                    dirty = true;
                }
                continue;
            }
            let mut live = false;
            let mut going = Vec::new();
            for index in 0..head.len() {
                let did = delivery_id(&event, index);
                let Some(raw) = self.tree.get(key(DELIVERY, &did))? else {
                    live = true; // pending since intake
                    continue;
                };
                if raw == TOMBSTONE {
                    continue;
                }
                let d = delivery_record(&key(DELIVERY, &did), &raw)?;
                let cutoff = match d.status {
                    DeliveryStatus::Pending => {
                        live = true;
                        continue;
                    }
                    DeliveryStatus::Delivered => delivered_cutoff,
                    DeliveryStatus::Failed => failed_cutoff,
                };
                if d.ended_at.is_some_and(|t| t < cutoff) {
                    going.push((did, d.status));
                } else {
                    live = true;
                }
            }
            step.purged += going.len();
            dirty |= !going.is_empty();
            for (did, status) in &going {
                if *status == DeliveryStatus::Failed {
                    batch.remove(key(FAILED, did).as_slice());
                }
                if live {
                    batch.insert(key(DELIVERY, did).as_slice(), TOMBSTONE);
                }
            }
            if !live {
                dirty = true;
                batch.remove(k);
                for index in 0..head.len() {
                    batch.remove(key(DELIVERY, &delivery_id(&event, index)).as_slice());
                }
            }
        }
        if dirty {
            self.due_writes.apply_batch(&self.tree, batch)?;
        }
        Ok(step)
    }

    /// How many deliveries created before `before_ms` are pending (the start-up value of the
    /// pending gauge: deliveries created later are counted as they are created).
    pub fn count_pending_before(&self, before_ms: u64) -> usize {
        // Those in memory may be spilled to sled while it is read: counted once.
        let fresh = self.claimed_set().fresh.created_before(before_ms);
        let mut n = fresh.len();
        for (i, k) in self.tree.scan_prefix([DUE]).keys().enumerate() {
            let counted = |k: &[u8]| {
                k.len() == 41 && uuid_ms(&k[25..]) < before_ms && !fresh.contains(&uuid_at(k, 25))
            };
            if k.is_ok_and(|k| counted(&k)) {
                n += 1;
            }
            if i % 1024 == 1023 {
                collect_garbage(64);
            }
        }
        release_memory();
        n
    }

    /// Whether storage accepts a write (for /healthz).
    pub fn writable(&self) -> bool {
        self.db.insert(b"healthz", b"ok").is_ok()
    }
}

/// Resolves once an intake batch is applied and on disk.
pub struct Durable(oneshot::Receiver<Result<(), String>>);

impl Durable {
    pub async fn wait(self) -> Result<(), StoreError> {
        match self.0.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(msg)) => Err(writer_error(&msg)),
            Err(_) => Err(StoreError::WriterGone),
        }
    }

    /// The same answer, for several to wait for; it comes whether or not any of them waits.
    pub fn shared(self) -> SharedDurable {
        let answer: futures_util::future::BoxFuture<'static, Result<(), String>> =
            Box::pin(async move {
                match self.0.await {
                    Ok(answer) => answer,
                    Err(_) => Err(StoreError::WriterGone.to_string()),
                }
            });
        SharedDurable(futures_util::FutureExt::shared(answer))
    }
}

/// A [`Durable`] several may wait for: a request and a repeat of it that waits for its write.
#[derive(Clone)]
pub struct SharedDurable(
    futures_util::future::Shared<futures_util::future::BoxFuture<'static, Result<(), String>>>,
);

impl SharedDurable {
    pub async fn wait(self) -> Result<(), StoreError> {
        self.0.await.map_err(|msg| writer_error(&msg))
    }

    /// Whether the writer has answered.
    pub fn answered(&self) -> bool {
        self.0.peek().is_some()
    }
}

/// How long opening retries while another process holds the database's lock: one that is just
/// exiting may still hold it for a moment.
const LOCK_WAIT: Duration = Duration::from_secs(5);

/// Whether sled refused to open because another process holds the database's lock.
fn is_locked(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(io) if io.to_string().contains("could not acquire lock"))
}

/// Why the database did not open, in words: sled's text of an I/O error repeats the error in
/// its debug form.
fn open_failure(e: &sled::Error) -> String {
    match e {
        _ if is_locked(e) => format!(
            "another process has it open (another dispatcher on the same storage.path?); tried for {}",
            humantime::format_duration(LOCK_WAIT)
        ),
        sled::Error::Io(io) => io.to_string(),
        other => other.to_string(),
    }
}

/// A sled error the writer met, as its message (the writer answers many with one error).
fn writer_error(msg: &str) -> StoreError {
    StoreError::Sled(sled::Error::Io(std::io::Error::other(msg.to_string())))
}

/// Deliveries with an attempt under way, and those of them whose claimed due entry an exclusive
/// change (a deleted subscription) removed meanwhile: their outcomes write nothing. With them,
/// under the same lock, the due entries kept in memory.
#[derive(Default)]
struct Claims {
    held: HashSet<Uuid>,
    voided: HashSet<Uuid>,
    fresh: fresh::Fresh,
    /// See [`Store::fail_next_intake`].
    #[cfg(test)]
    fail_next_intake: bool,
}

/// The writer thread's handles.
struct Writer {
    db: sled::Db,
    tree: sled::Tree,
    claimed: Arc<std::sync::Mutex<Claims>>,
    due_writes: DueWrites,
    /// Changes applied since memory was last given back.
    changes: usize,
    /// When memory was last given back.
    trimmed: Instant,
    /// The watermark as written: no event before it has deliveries in memory.
    watermark: Uuid,
    /// The latest event written (the watermark once none is in memory).
    newest: Uuid,
    /// When the watermark was last written.
    watermark_at: Instant,
    limits: Limits,
}

/// What bounds the deliveries kept in memory, and the watermark.
#[derive(Debug, Clone, Copy)]
struct Limits {
    /// The most due entries kept in memory ([`fresh::MAX_FRESH`]).
    max_fresh: usize,
    /// How often the watermark is moved on at most ([`WATERMARK_EVERY`]).
    watermark_every: Duration,
    /// How long an entry waits in memory in a lane with no outcome for as long
    /// ([`fresh::SPILL_AGE`]), and in a lane that drains ([`fresh::DRAINING_SPILL_AGE`]).
    spill_age: Duration,
    draining_spill_age: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_fresh: fresh::MAX_FRESH,
            watermark_every: WATERMARK_EVERY,
            spill_age: fresh::SPILL_AGE,
            draining_spill_age: fresh::DRAINING_SPILL_AGE,
        }
    }
}

/// How often the writer moves the watermark on (at most), and a flush asked for always does, once
/// the outcomes queued before it are written: after a crash, recovery reads the events from it on.
const WATERMARK_EVERY: Duration = Duration::from_secs(1);

/// The most due entries the writer spills from memory in one batch, and how long an idle writer
/// with more to spill waits for changes before it spills the next.
const SPILL_BATCH: usize = 1024;
const SPILL_PAUSE: Duration = Duration::from_millis(1);

/// What is left to an idle writer after [`Writer::maintain`].
enum Idle {
    Spilling,
    Waiting,
    Done,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Reads the watermark (writing one into a database that has none) and brings back into memory
/// the deliveries of the events from it on that wait for their first attempt: those with
/// neither a `d` record nor a due entry.
fn recover_fresh(db: &sled::Db, tree: &sled::Tree) -> Result<(fresh::Fresh, Uuid), StoreError> {
    let watermark = match tree.get(WATERMARK)? {
        Some(v) if v.len() == 16 => uuid_at(&v, 0),
        Some(v) => {
            // Read from the first event on: slower, and nothing is missed.
            tracing::error!(
                bytes = v.len(),
                "the watermark is damaged; reading every event"
            );
            Uuid::nil()
        }
        None => {
            // A new database, or one of a version that wrote a due entry for every delivery
            // at intake: nothing of it is to be found in memory.
            let w = if tree.scan_prefix([EVENT]).next().is_some() {
                Uuid::from_bytes(uuid_floor(now_ms()))
            } else {
                Uuid::nil()
            };
            tree.insert(WATERMARK, w.as_bytes())?;
            db.flush()?;
            w
        }
    };
    let mut fresh = fresh::Fresh::default();
    for (n, r) in tree
        .range(key(EVENT, &watermark).to_vec()..vec![EVENT + 1])
        .enumerate()
    {
        // The nodes read are garbage once passed (see `count_pending_before`).
        if n % 1024 == 1023 {
            collect_garbage(64);
        }
        let (k, v) = r?;
        if k.len() != 17 {
            tracing::error!(key = ?k, "skipping an event key of the wrong length");
            continue;
        }
        let event = uuid_at(&k, 1);
        let head = match EventHead::parse(&k, &v) {
            Ok(head) => head,
            Err(e) => {
                tracing::error!(error = %e, "skipping an unreadable event record");
                continue;
            }
        };
        let mut waiting = Vec::new();
        for i in 0..head.len() {
            let did = delivery_id(&event, i);
            let due = due_key(&head.subscription(i), head.received_at, &did);
            if !tree.contains_key(key(DELIVERY, &did))? && !tree.contains_key(due)? {
                waiting.push(i);
            }
        }
        if !waiting.is_empty() {
            let subs: Vec<Uuid> = (0..head.len()).map(|i| head.subscription(i)).collect();
            fresh.add(event, head.received_at, &subs, waiting);
        }
    }
    fresh.begin_lanes(now_ms());
    release_memory();
    Ok((fresh, watermark))
}

impl Writer {
    /// Applies changes as they come, every change that queued meanwhile as one group (intake
    /// first, see [`Writer::apply`]), until every [`Store`] is gone.
    fn run(mut self, rx: std::sync::mpsc::Receiver<Write>) {
        let mut next = None;
        let mut idle = IDLE_TRIM;
        // Whether the last group had outcomes: more are likely on their way.
        let mut gathering = false;
        loop {
            let first = match next.take() {
                Some(w) => w,
                None => match rx.try_recv() {
                    Ok(w) => w,
                    Err(TryRecvError::Disconnected) => return,
                    // Outcomes queue up meanwhile without waking the writer (see `WriterHandle`).
                    Err(TryRecvError::Empty) if gathering => {
                        gathering = false;
                        std::thread::park_timeout(OUTCOME_GATHER);
                        continue;
                    }
                    // Nothing queued: a moment to give memory back that nobody waits for.
                    Err(TryRecvError::Empty)
                        if self.changes > 0 && self.trimmed.elapsed() >= TRIM_INTERVAL =>
                    {
                        self.trim();
                        continue;
                    }
                    Err(TryRecvError::Empty) => match rx.recv_timeout(idle) {
                        Ok(w) => {
                            idle = IDLE_TRIM;
                            w
                        }
                        Err(RecvTimeoutError::Timeout) => {
                            idle = match self.maintain() {
                                // More to spill: at once, unless changes come first.
                                Idle::Spilling => SPILL_PAUSE,
                                // Deliveries waiting in memory are looked at within a second.
                                Idle::Waiting => {
                                    self.trim();
                                    IDLE_TRIM
                                }
                                Idle::Done => {
                                    self.trim();
                                    (idle * 2).min(IDLE_TRIM_MAX)
                                }
                            };
                            continue;
                        }
                        Err(RecvTimeoutError::Disconnected) => return,
                    },
                },
            };
            if let Write::Exclusive(f) = first {
                f();
                collect_garbage(MAX_GROUP);
                continue;
            }
            let mut group = vec![first];
            while group.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(Write::Exclusive(f)) => {
                        next = Some(Write::Exclusive(f));
                        break;
                    }
                    Ok(w) => group.push(w),
                    Err(_) => break,
                }
            }
            gathering = group.iter().any(|w| matches!(w, Write::Outcome { .. }));
            self.apply(group);
        }
    }

    fn trim(&mut self) {
        release_memory();
        self.changes = 0;
        self.trimmed = Instant::now();
    }

    fn claims(&self) -> std::sync::MutexGuard<'_, Claims> {
        self.claimed.lock().expect("claimed set lock poisoned")
    }

    /// Adds to `batch` the due entries of the deliveries that waited too long in memory (or
    /// beyond the most it keeps), and returns them: they leave memory once the batch is applied.
    fn spill_into(&self, batch: &mut sled::Batch) -> Vec<fresh::Entry> {
        let (mut spill, events) = {
            let claims = self.claims();
            let aged = claims.fresh.aged(
                now_ms(),
                self.limits.spill_age,
                self.limits.draining_spill_age,
                SPILL_BATCH,
            );
            (
                aged,
                claims.fresh.over_max(self.limits.max_fresh, SPILL_BATCH),
            )
        };
        if !events.is_empty() {
            spill.extend(self.spill_for_room(events));
            // An entry both old and of the oldest events is written once.
            spill.sort_unstable();
            spill.dedup();
        }
        for (sub, due, d) in &spill {
            batch.insert(due_key(sub, *due, d).as_slice(), EMPTY);
        }
        spill
    }

    /// The entries still in memory of `events` (spilled for room), from their records.
    fn spill_for_room(&self, events: Vec<(Uuid, u64)>) -> Vec<fresh::Entry> {
        // Which subscriptions their deliveries go to: from their records, read without the
        // lock the lanes claim under.
        let mut heads = Vec::with_capacity(events.len());
        for (event, received_at) in events {
            let k = key(EVENT, &event);
            let subs = match self.tree.get(k) {
                Ok(Some(v)) => EventHead::parse(&k, &v)
                    .map(|h| (0..h.len()).map(|i| h.subscription(i)).collect::<Vec<_>>()),
                Ok(None) => Err(StoreError::Malformed {
                    key: format!("e{event}"),
                    message: "missing, with deliveries waiting".into(),
                }),
                Err(e) => Err(e.into()),
            };
            match subs {
                Ok(subs) => heads.push((event, received_at, subs)),
                Err(e) => {
                    // Not spilled for room any more (the lanes' age rule, which reads no
                    // record, still spills its entries).
                    tracing::error!(error = %e, "cannot spill the deliveries of an event");
                    self.claims().fresh.keep(event);
                }
            }
        }
        let mut spill = Vec::new();
        {
            let claims = self.claims();
            for (event, at, subs) in heads {
                for (i, sub) in subs.into_iter().enumerate() {
                    let d = delivery_id(&event, i);
                    if claims.fresh.contains(&sub, at, &d) {
                        spill.push((sub, at, d));
                    }
                }
            }
        }
        spill
    }

    /// What an idle writer does: spills, and writes the watermark.
    fn maintain(&mut self) -> Idle {
        let mut batch = sled::Batch::default();
        let spill = self.spill_into(&mut batch);
        if !spill.is_empty() {
            match self.due_writes.apply_batch(&self.tree, batch) {
                Ok(()) => {
                    let fresh = &mut self.claims().fresh;
                    for (sub, due, d) in &spill {
                        fresh.take(sub, *due, d);
                    }
                }
                Err(e) => tracing::error!(error = %e, "spilling due entries failed"),
            }
            collect_garbage(spill.len());
            self.changes += spill.len();
        }
        self.advance_watermark(true, None);
        if spill.len() >= SPILL_BATCH {
            Idle::Spilling
        } else if self.claims().fresh.len() > 0 {
            Idle::Waiting
        } else {
            Idle::Done
        }
    }

    /// Moves the watermark on to the oldest event with deliveries in memory (or the latest
    /// event written, when none is), at most every `watermark_every` unless `now`, and never
    /// past `floor`: the oldest event of outcomes taken out of memory whose records are not
    /// written yet.
    fn advance_watermark(&mut self, now: bool, floor: Option<Uuid>) {
        if !now && self.watermark_at.elapsed() < self.limits.watermark_every {
            return;
        }
        let oldest = self.claims().fresh.oldest_event();
        let to = match (oldest, floor) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b).unwrap_or(self.newest),
        };
        if to > self.watermark {
            if let Err(e) = self.tree.insert(WATERMARK, to.as_bytes()) {
                tracing::error!(error = %e, "writing the watermark failed");
                return;
            }
            self.watermark = to;
        }
        self.watermark_at = Instant::now();
    }

    /// Applies a group in two steps. Intake first: its events written, their deliveries put in
    /// memory, flushed and answered. Then the outcomes (and a spill), which need no flush: an
    /// intake request waits for the fsync of its own group, not for the outcomes that queued
    /// beside it, nor for what runs after each outcome.
    fn apply(&mut self, group: Vec<Write>) {
        let mut durable = Vec::new();
        let mut outcomes = Vec::new();
        // Flushes asked for: answered last, once the group's outcomes are written too.
        let mut flushes = Vec::new();
        // Events whose deliveries go into memory once written, with the change that writes them.
        let mut events: Vec<(NewEvent, Slot)> = Vec::new();
        let mut intake = Changes::default();
        // The newest event of the group, in memory or not: the watermark may pass it once
        // memory holds nothing older (see `Writer::advance_watermark`).
        let mut latest: Option<Uuid> = None;
        let mut results = Changes::default();
        let mut claims = self.claims();
        let now = now_ms();
        // What memory may still take: an event beyond it gets its due entries in sled at once.
        let mut room = self.limits.max_fresh.saturating_sub(claims.fresh.len());
        for w in group {
            match w {
                Write::Durable(writes, new, done) if writes.is_empty() && new.is_empty() => {
                    flushes.push(done);
                }
                Write::Durable(mut writes, new, done) => {
                    let mut kept = Vec::with_capacity(new.len());
                    for (id, received_at, subs, held) in new {
                        latest = latest.max(Some(id));
                        // Held deliveries, and all of an event beyond memory's room, get their
                        // due entries in sled at once.
                        let here = subs.len() - held.len();
                        let kept_here = here > 0 && here <= room;
                        for (i, sub) in subs.iter().enumerate() {
                            if kept_here && held.binary_search(&i).is_err() {
                                continue;
                            }
                            let due = due_key(sub, received_at, &delivery_id(&id, i));
                            writes.push((due.to_vec(), Some(Vec::new())));
                        }
                        if kept_here {
                            room -= here;
                            kept.push((id, received_at, subs, held));
                        }
                    }
                    let slot = intake.put(writes);
                    events.extend(kept.into_iter().map(|e| (e, slot)));
                    durable.push((slot, done));
                }
                Write::Outcome {
                    delivery,
                    subscription,
                    claimed_due_ms,
                    mut writes,
                    done,
                } => {
                    // The entry was there when the claim was made; only an exclusive change
                    // (a deleted subscription) removes it meanwhile, and marks the claim void.
                    if claims.voided.remove(&delivery) {
                        outcomes.push((delivery, None, done));
                        continue;
                    }
                    // The claim keeps lanes off it until the change is written.
                    let taken = claims.fresh.take(&subscription, claimed_due_ms, &delivery);
                    // Any outcome (a first attempt from memory or from sled, a retry) tells
                    // that the subscription's lane drains.
                    claims.fresh.progressed(&subscription, now);
                    if !taken {
                        // Removed before the next entry is written: when a retry is due in the
                        // same millisecond, the two keys are one, and the later write wins.
                        let entry = due_key(&subscription, claimed_due_ms, &delivery);
                        writes.insert(0, (entry.to_vec(), None));
                    }
                    let slot = results.put(writes);
                    let taken = taken.then_some((subscription, claimed_due_ms));
                    outcomes.push((delivery, Some((slot, taken)), done));
                }
                Write::Exclusive(_) => unreachable!("exclusive changes run alone"),
            }
        }
        drop(claims);
        // Outcomes taken out of memory are written after the intake's flush: until then the
        // watermark stays at their events, or a crash in between would lose them.
        let floor = outcomes
            .iter()
            .filter(|(_, written, _)| matches!(written, Some((_, Some(_)))))
            .filter_map(|(delivery, _, _)| event_of(delivery).map(|(event, _)| event))
            .min();
        let mut keys = intake.keys;
        self.apply_intake(intake, events, durable, floor, latest);
        let spill = self.spill_into(&mut results.batch);
        results.keys += spill.len();
        results.batched |= !spill.is_empty();
        keys += results.keys;
        let applied = results.apply(&self.tree, &self.due_writes);
        if let Some(e) = &applied.error {
            tracing::error!(error = %e, "writing to storage failed");
        }
        {
            // Released after the batch, so a lane never sees an old entry unclaimed.
            let mut claimed = self.claims();
            if applied.batch {
                for (sub, due, d) in &spill {
                    claimed.fresh.take(sub, *due, d);
                }
            }
            for (delivery, written, _) in &outcomes {
                claimed.held.remove(delivery);
                // An outcome not written leaves its due entry where it was.
                if let Some((slot, Some((sub, due)))) = written
                    && !applied.ok(*slot)
                {
                    claimed.fresh.restore(sub, *due, delivery, now);
                }
            }
        }
        for (delivery, written, done) in outcomes {
            let result = match written {
                None => Ok(false),
                Some((slot, _)) if applied.ok(slot) => Ok(true),
                Some(_) => Err(writer_error(
                    applied.error.as_deref().unwrap_or("not written"),
                )),
            };
            // A caller's bug must not take the writer, and every later write, down with it.
            let run = std::panic::AssertUnwindSafe(move || done(result));
            if std::panic::catch_unwind(run).is_err() {
                tracing::error!(%delivery, "what follows a stored outcome panicked");
            }
        }
        if !flushes.is_empty() {
            // Every change queued before the flush is written: the watermark moves on (no
            // outcome of the group is left unwritten) and is made durable with the rest.
            self.advance_watermark(true, None);
            let flushed = match applied.error {
                Some(e) => Err(e),
                None => self.db.flush().map(|_| ()).map_err(|e| e.to_string()),
            };
            for w in flushes {
                let _ = w.send(flushed.clone());
            }
        }
        collect_garbage(keys);
        self.changes += keys;
        // A writer never idle long enough to trim between batches trims after answering.
        if self.trimmed.elapsed() >= TRIM_FORCE {
            self.trim();
        }
    }

    /// Writes a group's intake, puts the deliveries of its events in memory, moves the
    /// watermark, flushes, and answers each change with whether it is on disk.
    fn apply_intake(
        &mut self,
        mut changes: Changes,
        events: Vec<(NewEvent, Slot)>,
        durable: Vec<(Slot, oneshot::Sender<Result<(), String>>)>,
        floor: Option<Uuid>,
        latest: Option<Uuid>,
    ) {
        // An event older than the watermark (its id was made before a later event's was
        // written) moves it back, written before anything else, so recovery cannot miss it.
        // Every event here has deliveries in memory (see `Writer::apply`).
        if let Some(oldest) = events.iter().map(|((id, _, _, _), _)| *id).min()
            && oldest < self.watermark
        {
            changes.first = Some((WATERMARK.to_vec(), Some(oldest.as_bytes().to_vec())));
            self.watermark = oldest;
        }
        if let Some(latest) = latest {
            self.newest = self.newest.max(latest);
        }
        #[cfg(test)]
        let applied = if changes.keys > 0 && std::mem::take(&mut self.claims().fail_next_intake) {
            changes.refused("a write refused for a test")
        } else {
            changes.apply(&self.tree, &self.due_writes)
        };
        #[cfg(not(test))]
        let applied = changes.apply(&self.tree, &self.due_writes);
        if let Some(e) = &applied.error {
            tracing::error!(error = %e, "writing to storage failed");
        }
        if !events.is_empty() {
            let mut claimed = self.claims();
            for ((id, received_at, subs, held), slot) in events {
                if applied.ok(slot) {
                    claimed
                        .fresh
                        .add(id, received_at, &subs, waiting(&subs, &held));
                }
            }
        }
        self.advance_watermark(false, floor);
        if durable.is_empty() {
            return;
        }
        // Flushed here rather than by another thread: changes that queue up meanwhile make the
        // next batch larger, and the answer reaches intake one thread hop sooner.
        let flushed = self.db.flush().map(|_| ()).map_err(|e| e.to_string());
        for (slot, w) in durable {
            let result = match &applied.error {
                Some(e) if !applied.ok(slot) => Err(e.clone()),
                _ => flushed.clone(),
            };
            let _ = w.send(result);
        }
    }
}

/// The writes of one group of changes. The changes of one key are written each on its own (in
/// key order, see [`Changes::apply`]) and the others as one atomic batch: each change must be
/// atomic, not the group, and sled rolls its log buffer over for every batch (sealing it and
/// handing it to its I/O threads, which write it out), while single writes only append to the
/// buffer. Most changes are of one key: an event taken in, a delivery's first outcome. `first`
/// (a watermark moving back) is written before all of them.
#[derive(Default)]
struct Changes {
    first: Option<KeyWrite>,
    singles: Vec<KeyWrite>,
    batch: sled::Batch,
    batched: bool,
    keys: usize,
}

/// Where one change went in [`Changes`], to tell afterwards whether it was written.
#[derive(Clone, Copy)]
enum Slot {
    Nothing,
    Single(usize),
    Batched,
}

/// What [`Changes::apply`] wrote: the singles whose rank (place in key order) is below
/// `singles`, and the batch or not. It stops at the first error.
struct Applied {
    /// The rank of each single, by its index in [`Changes::singles`].
    ranks: Vec<usize>,
    singles: usize,
    batch: bool,
    error: Option<String>,
}

impl Applied {
    fn ok(&self, slot: Slot) -> bool {
        match slot {
            Slot::Nothing => true,
            Slot::Single(i) => self.ranks[i] < self.singles,
            Slot::Batched => self.batch,
        }
    }
}

fn write_one(tree: &sled::Tree, (k, v): KeyWrite) -> Result<(), sled::Error> {
    match v {
        Some(v) => tree.insert(k, v)?,
        None => tree.remove(k)?,
    };
    Ok(())
}

impl Changes {
    /// What [`Changes::apply`] gives when its first write fails: nothing written (tests).
    #[cfg(test)]
    fn refused(self, error: &str) -> Applied {
        Applied {
            ranks: (0..self.singles.len()).collect(),
            singles: 0,
            batch: false,
            error: Some(error.to_string()),
        }
    }

    fn put(&mut self, mut writes: Vec<KeyWrite>) -> Slot {
        self.keys += writes.len();
        match writes.len() {
            0 => Slot::Nothing,
            1 => {
                self.singles.extend(writes.pop());
                Slot::Single(self.singles.len() - 1)
            }
            _ => {
                self.batched = true;
                for (k, v) in writes {
                    match v {
                        Some(v) => self.batch.insert(k, v),
                        None => self.batch.remove(k),
                    }
                }
                Slot::Batched
            }
        }
    }

    /// Writes `first`, then the singles in key order (a stable sort: a key written twice keeps
    /// its last value), then the batch. In key order, the singles that land in one leaf of
    /// sled's tree (events and deliveries have ids that grow with time) are applied to one copy
    /// of it, where a write of each on its own copies the leaf for each. Single writes of due
    /// entries are counted in `due_writes`, as the batch is.
    fn apply(self, tree: &sled::Tree, due_writes: &DueWrites) -> Applied {
        let is_due = |w: &KeyWrite| w.0.first() == Some(&DUE);
        let single_due = self.first.as_ref().is_some_and(is_due) || self.singles.iter().any(is_due);
        let applied = self.write_all(tree, due_writes);
        if single_due {
            due_writes.bump();
        }
        applied
    }

    fn write_all(self, tree: &sled::Tree, due_writes: &DueWrites) -> Applied {
        let mut singles: Vec<(usize, KeyWrite)> = self.singles.into_iter().enumerate().collect();
        singles.sort_by(|a, b| a.1.0.cmp(&b.1.0));
        let mut ranks = vec![0; singles.len()];
        for (rank, (i, _)) in singles.iter().enumerate() {
            ranks[*i] = rank;
        }
        let mut applied = Applied {
            ranks,
            singles: 0,
            batch: false,
            error: None,
        };
        if let Some(w) = self.first
            && let Err(e) = write_one(tree, w)
        {
            applied.error = Some(e.to_string());
            return applied;
        }
        let writes: Vec<(sled::IVec, Option<sled::IVec>)> = singles
            .into_iter()
            .map(|(_, (k, v))| (sled::IVec::from(k), v.map(sled::IVec::from)))
            .collect();
        match tree.apply_each(&writes) {
            Ok(()) => applied.singles = writes.len(),
            Err((n, e)) => {
                applied.singles = n;
                applied.error = Some(e.to_string());
                return applied;
            }
        }
        if self.batched {
            match due_writes.apply_batch(tree, self.batch) {
                Ok(()) => applied.batch = true,
                Err(e) => applied.error = Some(e.to_string()),
            }
        }
        applied
    }
}

/// Shared ownership of the store for the engine and the API.
pub type SharedStore = Arc<Store>;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(subs: &[Uuid], at: u64) -> StoredEvent {
        StoredEvent {
            id: new_event_id(),
            received_at: at,
            name: "add_lead".into(),
            event: json!({"event": "add_lead", "data": {"id": 7, "name": "Deal"}}),
            subscriptions: subs.to_vec(),
        }
    }

    /// Takes events in and waits until they are flushed.
    async fn accept_now(store: &Store, events: &[StoredEvent]) {
        accept_held(store, events, &[]).await;
    }

    /// Takes events in, with the indexes of each one's held deliveries, and waits until they are
    /// flushed.
    async fn accept_held(store: &Store, events: &[StoredEvent], held: &[Vec<usize>]) {
        store
            .accept(events, &[], held)
            .unwrap()
            .wait()
            .await
            .unwrap();
    }

    fn ended(mut d: Delivery, status: DeliveryStatus, at: u64) -> Delivery {
        d.status = status;
        d.next_attempt_at = None;
        d.ended_at = Some(at);
        d
    }

    async fn claim_and_record(store: &Store, d: &Delivery, due_ms: u64) -> bool {
        let due = Due {
            subscription: d.subscription_id,
            due_ms,
            delivery: d.id,
        };
        assert!(store.claim(&due).unwrap());
        store.record_attempt(d, due_ms).await.unwrap()
    }

    /// The due entries in sled, as (subscription, due time, delivery).
    fn due_in_sled(store: &Store) -> Vec<(Uuid, u64, Uuid)> {
        store.due_in_sled()
    }

    /// Records a delivery delivered at `at` by the attempt its due entry at `due_ms` claimed.
    async fn deliver(store: &Store, did: &Uuid, due_ms: u64, at: u64) {
        let d = store.delivery(did).unwrap().unwrap();
        let d = ended(d, DeliveryStatus::Delivered, at);
        assert!(claim_and_record(store, &d, due_ms).await);
    }

    /// Writes an event's record into the database at `path` straight into sled, then what `more`
    /// writes, as a crash or an earlier version may leave it.
    fn write_raw(path: &Path, e: &StoredEvent, more: impl FnOnce(&sled::Tree)) {
        let store = Store::open(path).unwrap();
        store
            .tree
            .insert(key(EVENT, &e.id), encode_event(e).unwrap())
            .unwrap();
        more(&store.tree);
        store.flush_blocking().unwrap();
    }

    fn watermark(store: &Store) -> Uuid {
        uuid_at(&store.tree.get(WATERMARK).unwrap().unwrap(), 0)
    }

    fn due_of(store: &Store, sub: &Uuid) -> Vec<(u64, Uuid)> {
        let due = store.due_entries(sub, 100).unwrap();
        due.iter().map(|d| (d.due_ms, d.delivery)).collect()
    }

    /// Polls until `f` holds, for at most 10 s.
    async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Claims the first due delivery of `sub`, and returns it as an attempt that delivered it.
    fn claim_first_delivered(store: &Store, sub: &Uuid) -> (Due, Delivery) {
        let due = store.due_entries(sub, 1).unwrap().remove(0);
        assert!(store.claim(&due).unwrap());
        let d = store.delivery(&due.delivery).unwrap().unwrap();
        (due, ended(d, DeliveryStatus::Delivered, now_ms()))
    }

    /// Keeps the writer busy until `go` is sent (at most 10 s): what is queued meanwhile is
    /// applied as one group. The receiver tells once it has let go.
    #[tokio::test]
    async fn intake_is_answered_before_the_outcomes_queued_beside_it_are_written() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let sub = Uuid::now_v7();
        accept_now(&store, &[event(&[sub], now_ms())]).await;
        let (due, d) = claim_first_delivered(&store, &sub);
        // The writer waits until both changes are queued, so that it takes them as one group.
        let (go, held) = store.hold_writer();
        // The outcome, queued first, only ends once the intake behind it has been answered.
        let (answered, on_answer) = std::sync::mpsc::channel::<()>();
        let (ran, outcome) = oneshot::channel();
        store.record_attempt_then(
            &d,
            due.due_ms,
            Box::new(move |written| {
                let waited = on_answer.recv_timeout(Duration::from_secs(5));
                let _ = ran.send((written.is_ok(), waited.is_ok()));
            }),
        );
        let later = event(&[sub], now_ms());
        let durable = store
            .accept(std::slice::from_ref(&later), &[], &[])
            .unwrap();
        go.send(()).unwrap();
        assert!(held.await.unwrap().is_ok());
        durable.wait().await.unwrap();
        let _ = answered.send(());
        let (written, after_the_answer) = outcome.await.unwrap();
        assert!(written);
        assert!(
            after_the_answer,
            "the intake waited for the outcome queued before it"
        );
        assert!(store.event(&later.id).unwrap().is_some());
        let stored = store.delivery(&d.id).unwrap().unwrap();
        assert_eq!(stored.status, DeliveryStatus::Delivered);
    }

    #[tokio::test]
    async fn the_watermark_does_not_pass_an_outcome_written_after_the_intake_flush() {
        let dir = tempfile::tempdir().unwrap();
        // The watermark moves on with every group.
        let store = Store::open_with(
            dir.path(),
            Limits {
                watermark_every: Duration::ZERO,
                ..Limits::default()
            },
        )
        .unwrap();
        let sub = Uuid::now_v7();
        let (a, b) = (event(&[sub], now_ms()), event(&[sub], now_ms()));
        accept_now(&store, &[a.clone(), b.clone()]).await;
        let (due, d) = claim_first_delivered(&store, &sub);
        assert_eq!(d.event_id, a.id);
        // One group: a's outcome, an event c, and a flush asked for.
        let (go, held) = store.hold_writer();
        let (ran, mut outcome) = oneshot::channel();
        let reader = store.clone();
        store.record_attempt_then(
            &d,
            due.due_ms,
            Box::new(move |written| {
                // Once a's record is written, before anything else the group does.
                let _ = ran.send((written.is_ok(), watermark(&reader)));
            }),
        );
        let c = event(&[sub], now_ms());
        let durable = store.accept(std::slice::from_ref(&c), &[], &[]).unwrap();
        let (asked, flushed) = oneshot::channel();
        let flush = Write::Durable(Vec::new(), Vec::new(), asked);
        assert!(store.writer.send(flush).is_ok());
        go.send(()).unwrap();
        assert!(held.await.unwrap().is_ok());
        durable.wait().await.unwrap();
        flushed.await.unwrap().unwrap();
        // c was flushed before a's record was written; had the watermark passed a then (b is
        // the oldest event left in memory), a crash right after would have lost a's delivery.
        let (written, at_the_write) = outcome
            .try_recv()
            .expect("the flush came after the outcome");
        assert!(written);
        assert_eq!(at_the_write, a.id);
        // The flush asked for came after the outcome: it moves the watermark on, to b.
        assert_eq!(watermark(&store), b.id);
        assert_eq!(
            store.delivery(&d.id).unwrap().unwrap().status,
            DeliveryStatus::Delivered
        );
    }

    #[tokio::test]
    async fn first_attempts_wait_in_memory_and_come_back_after_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let now = now_ms();
        let events: Vec<StoredEvent> = (0..3).map(|_| event(&[a, b], now)).collect();
        let d = |e: usize, i: usize| delivery_id(&events[e].id, i);
        {
            let store = Store::open(dir.path()).unwrap();
            accept_now(&store, &events).await;
            // Intake wrote no due entry, and the lanes see every delivery, in order.
            assert!(due_in_sled(&store).is_empty());
            assert_eq!(
                due_of(&store, &a),
                vec![(now, d(0, 0)), (now, d(1, 0)), (now, d(2, 0))]
            );
            assert_eq!(store.count_pending_before(u64::MAX), 6);
            // The first event's deliveries end; the watermark moves past it with the flush.
            for i in 0..2 {
                deliver(&store, &d(0, i), now, now).await;
            }
            // One of the second's is claimed when the process dies: its attempt never ended.
            let due = Due {
                subscription: b,
                due_ms: now,
                delivery: d(1, 1),
            };
            assert!(store.claim(&due).unwrap());
            store.flush().await.unwrap();
            assert_eq!(watermark(&store), events[1].id);
            assert!(
                due_in_sled(&store).is_empty(),
                "an ended first attempt writes no due entry"
            );
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(due_of(&store, &a), vec![(now, d(1, 0)), (now, d(2, 0))]);
        assert_eq!(due_of(&store, &b), vec![(now, d(1, 1)), (now, d(2, 1))]);
        assert_eq!(store.count_pending_before(u64::MAX), 4);
        assert!(due_in_sled(&store).is_empty());
        assert_eq!(
            store.delivery(&d(0, 1)).unwrap().unwrap().status,
            DeliveryStatus::Delivered
        );
    }

    #[tokio::test]
    async fn events_whose_deliveries_are_all_in_sled_let_the_watermark_pass_them() {
        let dir = tempfile::tempdir().unwrap();
        let held = Uuid::now_v7();
        let store = Store::open(dir.path()).unwrap();
        let events: Vec<StoredEvent> = (0..3).map(|_| event(&[held], now_ms())).collect();
        accept_held(&store, &events, &[vec![0], vec![0], vec![0]]).await;
        store.flush().await.unwrap();
        // Nothing of them is in memory: a restart need not read them again.
        let newest = events.iter().map(|e| e.id).max().unwrap();
        assert_eq!(watermark(&store), newest);
    }

    /// A lane reads sled's due index again only once the writer may have added entries to it
    /// (or it held some of the lane's own, in flight ones included); memory is read every time.
    #[tokio::test]
    async fn a_lane_reads_sleds_due_index_again_once_the_writer_may_have_added_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (a, held) = (Uuid::now_v7(), Uuid::now_v7());
        let now = now_ms();
        let mut scan = DueScan::default();
        let mut lane = |store: &Store| -> Vec<Uuid> {
            let due = store.lane_due_entries(&a, 10, &mut scan).unwrap();
            due.iter().map(|d| d.delivery).collect()
        };
        let first = event(&[a], now);
        let fresh = delivery_id(&first.id, 0);
        accept_now(&store, std::slice::from_ref(&first)).await;
        assert_eq!(lane(&store), vec![fresh]);
        // An entry put into sled behind the writer's back is not read: sled had none of the
        // lane's and no write since may have added one. A whole read finds it.
        let stray = Uuid::now_v7();
        store
            .tree
            .insert(due_key(&a, now + 1, &stray), EMPTY)
            .unwrap();
        assert_eq!(lane(&store), vec![fresh]);
        assert_eq!(due_of(&store, &a), vec![(now, fresh), (now + 1, stray)]);
        // The writer writes due entries (those of a held subscription): sled is read again.
        accept_held(&store, &[event(&[held], now)], &[vec![0]]).await;
        assert_eq!(lane(&store), vec![fresh, stray]);
        // In flight, it is skipped, and sled still read: its claim may end without a write.
        let stray_due = Due {
            subscription: a,
            due_ms: now + 1,
            delivery: stray,
        };
        assert!(store.claim(&stray_due).unwrap());
        assert_eq!(lane(&store), vec![fresh]);
        store.release(&stray);
        assert_eq!(lane(&store), vec![fresh, stray]);
    }

    #[tokio::test]
    async fn deliveries_to_a_held_subscription_get_their_due_entries_in_sled_at_intake() {
        let dir = tempfile::tempdir().unwrap();
        let (a, held) = (Uuid::now_v7(), Uuid::now_v7());
        let now = now_ms();
        let events = [
            event(&[a, held], now),
            event(&[held, a], now),
            event(&[held], now),
        ];
        let d = |e: usize, i: usize| delivery_id(&events[e].id, i);
        let mut in_sled = vec![
            (held, now, d(0, 1)),
            (held, now, d(1, 0)),
            (held, now, d(2, 0)),
        ];
        in_sled.sort();
        {
            let store = Store::open(dir.path()).unwrap();
            accept_held(&store, &events, &[vec![1], vec![0], vec![0]]).await;
            // The held ones are in sled, written with the events; the others wait in memory.
            assert_eq!(due_in_sled(&store), in_sled);
            assert_eq!(store.claimed_set().fresh.len(), 2);
            assert_eq!(due_of(&store, &a), vec![(now, d(0, 0)), (now, d(1, 1))]);
            assert_eq!(due_of(&store, &held).len(), 3);
            assert_eq!(store.count_pending_before(u64::MAX), 5);
            // One of them goes out once its subscription is enabled: from sled.
            deliver(&store, &d(2, 0), now, now).await;
            in_sled.retain(|(_, _, delivery)| *delivery != d(2, 0));
            assert_eq!(due_in_sled(&store), in_sled);
            store.flush().await.unwrap();
        }
        // After a restart, memory holds the same two, and sled the held ones left.
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.claimed_set().fresh.len(), 2);
        assert_eq!(due_of(&store, &a), vec![(now, d(0, 0)), (now, d(1, 1))]);
        assert_eq!(due_in_sled(&store), in_sled);
        assert_eq!(store.count_pending_before(u64::MAX), 4);
    }

    #[tokio::test]
    async fn an_event_older_than_the_watermark_moves_it_back() {
        let dir = tempfile::tempdir().unwrap();
        let sub = Uuid::now_v7();
        let now = now_ms();
        // Its id is made first, as by a request that then stalls before it is written.
        let stalled = event(&[sub], now);
        let later = event(&[sub], now);
        {
            let store = Store::open(dir.path()).unwrap();
            accept_now(&store, std::slice::from_ref(&later)).await;
            deliver(&store, &delivery_id(&later.id, 0), now, now).await;
            store.flush().await.unwrap();
            assert_eq!(watermark(&store), later.id);
            accept_now(&store, std::slice::from_ref(&stalled)).await;
            assert_eq!(watermark(&store), stalled.id);
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(
            due_of(&store, &sub),
            vec![(now, delivery_id(&stalled.id, 0))]
        );
    }

    #[tokio::test]
    async fn deliveries_left_waiting_long_get_their_due_entries_in_sled() {
        let dir = tempfile::tempdir().unwrap();
        let sub = Uuid::now_v7();
        let now = now_ms();
        let old = now - 2 * fresh::SPILL_AGE.as_millis() as u64;
        let e = event(&[sub], old);
        let did = delivery_id(&e.id, 0);
        {
            let store = Store::open(dir.path()).unwrap();
            accept_now(&store, std::slice::from_ref(&e)).await;
            // Old already: spilled once its intake is answered, in the same group (a flush
            // asked for is answered after that).
            store.flush().await.unwrap();
            assert_eq!(due_in_sled(&store), vec![(sub, old, did)]);
            assert_eq!(due_of(&store, &sub), vec![(old, did)], "listed once");
            assert_eq!(store.count_pending_before(u64::MAX), 1);
            assert_eq!(watermark(&store), e.id);
        }
        // A spilled delivery is an ordinary due entry: not brought back into memory as well.
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(due_of(&store, &sub), vec![(old, did)]);
        deliver(&store, &did, old, now).await;
        assert!(due_in_sled(&store).is_empty());
        assert!(due_of(&store, &sub).is_empty());
    }

    #[tokio::test]
    async fn a_lane_with_outcomes_keeps_its_old_entries_in_memory_until_it_stalls() {
        let dir = tempfile::tempdir().unwrap();
        // Long enough for a slow machine to take both events in within it.
        let spill_age = Duration::from_secs(5);
        let store = Store::open_with(
            dir.path(),
            Limits {
                spill_age,
                draining_spill_age: Duration::from_secs(3600),
                ..Limits::default()
            },
        )
        .unwrap();
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let now = now_ms();
        // Lane a begins now; then an event that has waited 6 s already goes to a and b.
        let first = event(&[a], now);
        accept_now(&store, std::slice::from_ref(&first)).await;
        let old = event(&[a, b], now - 6000);
        accept_now(&store, std::slice::from_ref(&old)).await;
        // Its delivery to b (a lane with no outcome for longer than the spill age) is spilled
        // in the group of its intake (a flush asked for is answered after that); a's stays in
        // memory.
        store.flush().await.unwrap();
        assert_eq!(
            due_in_sled(&store),
            vec![(b, now - 6000, delivery_id(&old.id, 1))]
        );
        // An outcome in lane a: the lane drains, counted from it.
        let before = now_ms();
        deliver(&store, &delivery_id(&first.id, 0), now, before).await;
        store.flush().await.unwrap();
        let progress = store.claimed_set().fresh.progress_of(&a);
        assert!(
            progress.is_some_and(|t| t >= before),
            "{progress:?} ≥ {before}"
        );
        assert_eq!(
            due_in_sled(&store).len(),
            1,
            "a drains: nothing of it spilled"
        );
        let kept = (now - 6000, delivery_id(&old.id, 0));
        assert_eq!(due_of(&store, &a), vec![kept]);
        // No more outcomes in a: once the spill age has passed since its last, the idle writer
        // spills its entry too.
        eventually("lane a's spill", || due_in_sled(&store).len() == 2).await;
        assert!(due_in_sled(&store).contains(&(a, kept.0, kept.1)));
        assert_eq!(due_of(&store, &a), vec![kept], "listed once");
    }

    #[tokio::test]
    async fn after_a_restart_old_entries_wait_for_their_lanes_before_they_are_spilled() {
        let dir = tempfile::tempdir().unwrap();
        let sub = Uuid::now_v7();
        let old = now_ms() - 2 * fresh::SPILL_AGE.as_millis() as u64;
        let e = event(&[sub], old);
        let did = delivery_id(&e.id, 0);
        // As a crash leaves it: the event written, its delivery in memory only, the watermark
        // at the event.
        write_raw(dir.path(), &e, |tree| {
            tree.insert(WATERMARK, e.id.as_bytes()).unwrap();
        });
        let store = Store::open(dir.path()).unwrap();
        // A group goes through the writer (which spills what is due to be).
        store.flush().await.unwrap();
        assert!(
            due_in_sled(&store).is_empty(),
            "not spilled for the time the daemon was down"
        );
        assert_eq!(due_of(&store, &sub), vec![(old, did)]);
    }

    #[tokio::test]
    async fn an_idle_writer_spills_and_moves_the_watermark_on() {
        let dir = tempfile::tempdir().unwrap();
        let sub = Uuid::now_v7();
        let e = event(&[sub], now_ms() - 2 * fresh::SPILL_AGE.as_millis() as u64);
        let store = Store::open(dir.path()).unwrap();
        accept_now(&store, std::slice::from_ref(&e)).await;
        // Nothing else is written: the writer's idle tick (a second) does it.
        eventually("the spill", || due_in_sled(&store).len() == 1).await;
        eventually("the watermark", || watermark(&store) == e.id).await;
    }

    #[tokio::test]
    async fn a_database_of_the_due_entry_layout_opens_without_doubles() {
        let dir = tempfile::tempdir().unwrap();
        let sub = Uuid::now_v7();
        let now = now_ms();
        let e = event(&[sub], now);
        let did = delivery_id(&e.id, 0);
        // As an earlier version wrote it: the event, a due entry per delivery, no watermark.
        write_raw(dir.path(), &e, |tree| {
            tree.insert(due_key(&sub, now, &did), EMPTY).unwrap();
            tree.remove(WATERMARK).unwrap();
        });
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(due_of(&store, &sub), vec![(now, did)]);
        assert_eq!(store.count_pending_before(u64::MAX), 1);
        assert!(store.tree.get(WATERMARK).unwrap().is_some());
        deliver(&store, &did, now, now).await;
        assert!(due_of(&store, &sub).is_empty());
        assert!(due_in_sled(&store).is_empty());
    }

    #[tokio::test]
    async fn a_retry_due_in_the_millisecond_it_was_claimed_at_keeps_its_entry() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let sub = Uuid::now_v7();
        let now = now_ms();
        let e = event(&[sub], now);
        accept_now(&store, std::slice::from_ref(&e)).await;
        let mut d = store.delivery(&delivery_id(&e.id, 0)).unwrap().unwrap();
        d.next_attempt_at = Some(now + 5);
        assert!(claim_and_record(&store, &d, now).await);
        // Claimed by the entry in sled at `now + 5`, and due again in that same millisecond
        // (a zero step, a clock that went back): one key, removed and written in one change.
        assert!(claim_and_record(&store, &d, now + 5).await);
        assert_eq!(due_of(&store, &sub), vec![(now + 5, d.id)]);
        assert_eq!(due_in_sled(&store), vec![(sub, now + 5, d.id)]);
    }

    #[tokio::test]
    async fn events_beyond_what_memory_may_hold_get_their_due_entries_at_intake() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let now = now_ms();
        let first = event(&[a, b], now);
        let second = event(&[a, b], now);
        // Memory holds three deliveries at most.
        let open = || {
            let limits = Limits {
                max_fresh: 3,
                ..Limits::default()
            };
            Store::open_with(dir.path(), limits).unwrap()
        };
        {
            let store = open();
            accept_now(&store, std::slice::from_ref(&first)).await;
            accept_now(&store, std::slice::from_ref(&second)).await;
            // Two of the first fit; the second's two would make four.
            let second_due = vec![
                (a, now, delivery_id(&second.id, 0)),
                (b, now, delivery_id(&second.id, 1)),
            ];
            let mut sled_due = due_in_sled(&store);
            sled_due.sort();
            let mut expected = second_due.clone();
            expected.sort();
            assert_eq!(sled_due, expected);
            assert_eq!(store.claimed_set().fresh.len(), 2);
            let lane = vec![
                (now, delivery_id(&first.id, 0)),
                (now, delivery_id(&second.id, 0)),
            ];
            assert_eq!(due_of(&store, &a), lane);
            assert_eq!(store.count_pending_before(u64::MAX), 4);
            store.flush().await.unwrap();
        }
        // Found again after a restart, each once.
        let store = open();
        assert_eq!(store.count_pending_before(u64::MAX), 4);
        assert_eq!(due_of(&store, &b).len(), 2);
    }

    #[tokio::test]
    async fn deleting_a_subscription_ends_its_deliveries_waiting_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let now = now_ms();
        let e = event(&[a, b], now);
        let store = Store::open(dir.path()).unwrap();
        accept_now(&store, std::slice::from_ref(&e)).await;
        assert_eq!(store.delete_subscription(&a, "gone", now).await.unwrap(), 1);
        assert!(due_of(&store, &a).is_empty());
        assert_eq!(due_of(&store, &b), vec![(now, delivery_id(&e.id, 1))]);
        let d = store.delivery(&delivery_id(&e.id, 0)).unwrap().unwrap();
        assert_eq!(
            (d.status, d.error.as_deref()),
            (DeliveryStatus::Failed, Some("gone"))
        );
        // Redelivered, it is an ordinary due entry; the other leaves memory for one too.
        store
            .redeliver(&d.id, now + 1)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let other = delivery_id(&e.id, 1);
        store
            .redeliver(&other, now + 2)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(due_of(&store, &b), vec![(now + 2, other)]);
        assert_eq!(due_in_sled(&store), {
            let mut v = vec![(a, now + 1, d.id), (b, now + 2, other)];
            v.sort();
            v
        });
    }

    #[test]
    fn delivery_ids_name_their_event_and_index() {
        let e = new_event_id();
        assert_eq!(event_of(&e), None, "an event id names no delivery");
        for i in [0, 1, 99, MAX_DELIVERIES_PER_EVENT - 1] {
            let d = delivery_id(&e, i);
            assert_ne!(d, e);
            assert_eq!(event_of(&d), Some((e, i)));
        }
        // Time ordered like their event.
        assert_eq!(
            uuid_ms(delivery_id(&e, 3).as_bytes()),
            uuid_ms(e.as_bytes())
        );
    }

    #[tokio::test]
    async fn an_event_record_keeps_its_event_and_subscriptions() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let e = event(&[a, b], 1_000);
        accept_now(&store, std::slice::from_ref(&e)).await;
        let back = store.event(&e.id).unwrap().unwrap();
        assert_eq!(back.received_at, 1_000);
        assert_eq!(back.name, "add_lead");
        assert_eq!(back.event, e.event);
        assert_eq!(back.subscriptions, vec![a, b]);
        // Its deliveries are pending and due at its arrival, one in each lane.
        let d1 = store.delivery(&delivery_id(&e.id, 1)).unwrap().unwrap();
        assert_eq!(d1.subscription_id, b);
        assert_eq!(d1.status, DeliveryStatus::Pending);
        assert_eq!(d1.created_at, 1_000);
        assert_eq!(store.next_due(&b).unwrap().unwrap().delivery, d1.id);
        assert!(store.delivery(&delivery_id(&e.id, 2)).unwrap().is_none());
        assert_eq!(store.count_pending_before(u64::MAX), 2);
    }

    #[tokio::test]
    async fn outcomes_move_a_delivery_between_the_due_index_and_the_failed_log() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let sub = Uuid::now_v7();
        let e = event(&[sub], 1_000);
        accept_now(&store, std::slice::from_ref(&e)).await;
        let mut d = store.delivery(&delivery_id(&e.id, 0)).unwrap().unwrap();
        // A retry: due later, still pending.
        d.next_attempt_at = Some(5_000);
        assert!(claim_and_record(&store, &d, 1_000).await);
        let due = store.next_due(&sub).unwrap().unwrap();
        assert_eq!((due.delivery, due.due_ms), (d.id, 5_000));
        assert!(!store.is_in_flight(&d.id));
        // The last attempt fails: out of the due index, into the failed log.
        let d = ended(d, DeliveryStatus::Failed, 6_000);
        assert!(claim_and_record(&store, &d, 5_000).await);
        assert!(store.next_due(&sub).unwrap().is_none());
        assert_eq!(store.failed_since(&sub, 0).unwrap(), vec![d.id]);
        let failed = store
            .deliveries(&DeliveryQuery {
                status: Some(StatusFilter::Failed),
                limit: 10,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(failed.deliveries.len(), 1);
        // Recovered: pending again, out of the failed log.
        assert_eq!(store.recover(&sub, 0, 7_000).await.unwrap(), 1);
        assert!(store.failed_since(&sub, 0).unwrap().is_empty());
        assert_eq!(store.next_due(&sub).unwrap().unwrap().due_ms, 7_000);
        assert_eq!(store.count_pending_before(u64::MAX), 1);
    }

    #[tokio::test]
    async fn a_panicking_outcome_callback_leaves_the_writer_working() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let sub = Uuid::now_v7();
        let (a, b) = (event(&[sub], 1_000), event(&[sub], 1_001));
        accept_now(&store, &[a.clone(), b.clone()]).await;
        let due = store.due_entries(&sub, 2).unwrap();
        assert_eq!(due.len(), 2);
        let first = store.delivery(&due[0].delivery).unwrap().unwrap();
        assert!(store.claim(&due[0]).unwrap());
        store.record_attempt_then(
            &ended(first, DeliveryStatus::Delivered, 2_000),
            due[0].due_ms,
            Box::new(|_| panic!("a callback's bug")),
        );
        // The writer outlives it: the next outcome is written and answered.
        let second = store.delivery(&due[1].delivery).unwrap().unwrap();
        let second = ended(second, DeliveryStatus::Delivered, 2_100);
        assert!(claim_and_record(&store, &second, due[1].due_ms).await);
        for d in &due {
            let stored = store.delivery(&d.delivery).unwrap().unwrap();
            assert_eq!(stored.status, DeliveryStatus::Delivered);
        }
        assert!(store.next_due(&sub).unwrap().is_none());
    }

    #[tokio::test]
    async fn an_outcome_whose_due_entry_is_gone_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let sub = Uuid::now_v7();
        let e = event(&[sub], 1_000);
        accept_now(&store, std::slice::from_ref(&e)).await;
        let d = store.delivery(&delivery_id(&e.id, 0)).unwrap().unwrap();
        let due = store.next_due(&sub).unwrap().unwrap();
        assert!(store.claim(&due).unwrap());
        assert_eq!(
            store
                .delete_subscription(&sub, "gone", 2_000)
                .await
                .unwrap(),
            1
        );
        let late = ended(d.clone(), DeliveryStatus::Delivered, 2_500);
        assert!(!store.record_attempt(&late, 1_000).await.unwrap());
        let now = store.delivery(&d.id).unwrap().unwrap();
        assert_eq!(now.status, DeliveryStatus::Failed);
        assert_eq!(now.error.as_deref(), Some("gone"));
        assert!(store.next_due(&sub).unwrap().is_none());
        assert!(!store.is_in_flight(&d.id), "the claim ends all the same");
    }

    /// sled is patched (vendor/sled/PATCHED.md) to hold up to 64 small entries per leaf and to
    /// split leaves of large ones by size, to clone a leaf with room for the insert it is cloned
    /// for, and to reuse written-out log segment buffers: many small keys and large events among
    /// them, half of the due entries ended (leaves merge), in a log of several segments (each
    /// flush seals a buffer; a full one goes back to the spare buffers), all read back the same
    /// after a reopen.
    #[tokio::test]
    async fn small_and_large_records_in_thousands_read_back_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let sub = Uuid::now_v7();
        let mut events = Vec::new();
        {
            let store = Store::open(dir.path()).unwrap();
            for batch in 0..30u64 {
                let mut group = Vec::new();
                for i in 0..100u64 {
                    let mut e = event(&[sub], 1_000 + batch * 100 + i);
                    if i % 50 == 7 {
                        // 12 KiB: leaves of these split by size, as stock sled's do.
                        e.event["data"]["note"] = json!("ж".repeat(6 * 1024));
                    }
                    group.push(e);
                }
                accept_now(&store, &group).await;
                events.extend(group);
            }
            for (n, e) in events.iter().enumerate().filter(|(n, _)| n % 2 == 0) {
                let d = store.delivery(&delivery_id(&e.id, 0)).unwrap().unwrap();
                let done = ended(d, DeliveryStatus::Delivered, 10_000 + n as u64);
                assert!(claim_and_record(&store, &done, e.received_at).await);
            }
            store.flush().await.unwrap();
        }
        let log = std::fs::metadata(dir.path().join("db")).unwrap().len();
        assert!(
            log > 4 * 512 * 1024,
            "the log spans several 512 KiB segments: {log} bytes"
        );
        let store = Store::open(dir.path()).unwrap();
        for (n, e) in events.iter().enumerate() {
            let back = store.event(&e.id).unwrap().expect("every event is kept");
            assert_eq!(back.event, e.event, "event {n}");
            let d = store.delivery(&delivery_id(&e.id, 0)).unwrap().unwrap();
            let want = if n % 2 == 0 {
                DeliveryStatus::Delivered
            } else {
                DeliveryStatus::Pending
            };
            assert_eq!(d.status, want, "delivery of event {n}");
        }
        assert_eq!(store.count_pending_before(u64::MAX), events.len() / 2);
        let due = store.due_entries(&sub, usize::MAX).unwrap();
        let want: Vec<Uuid> = events
            .iter()
            .skip(1)
            .step_by(2)
            .map(|e| delivery_id(&e.id, 0))
            .collect();
        assert_eq!(
            due.iter().map(|d| d.delivery).collect::<Vec<_>>(),
            want,
            "the pending ones, in due order"
        );
    }

    /// sled's `apply_each` (a patch: the writes that land in one leaf applied to one copy of it)
    /// against a model: calls of 1 to 40 writes, so that pages take both a few fragments at a
    /// time and enough to be rewritten whole; values small and large, so leaves split by count
    /// and by size; a key written twice in a call (the last value wins), keys removed, no-op
    /// writes. The tree matches the model, and again after a reopen replays the log.
    #[test]
    fn writes_applied_per_leaf_match_a_model_and_read_back_after_a_reopen() {
        use std::collections::BTreeMap;
        let dir = tempfile::tempdir().unwrap();
        let mut model: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        let value = |i: u32| -> Vec<u8> {
            let len = if i.is_multiple_of(37) {
                3000
            } else {
                8 + (i % 200) as usize
            };
            vec![(i % 251) as u8; len]
        };
        {
            let db = sled::Config::new().path(dir.path()).open().unwrap();
            let tree = db.open_tree("t").unwrap();
            let mut next = 0u32;
            let mut size = 1;
            while next < 6000 {
                let mut writes: Vec<(sled::IVec, Option<sled::IVec>)> = Vec::new();
                for _ in 0..size {
                    let k = next.to_be_bytes().to_vec();
                    writes.push((k.into(), Some(value(next).into())));
                    next += 1;
                }
                // The same key again: the last value wins.
                let again = next - 1;
                writes.push((
                    again.to_be_bytes().to_vec().into(),
                    Some(value(again + 1).into()),
                ));
                // A removal of a key written in an earlier call, and one of a key never written.
                if next > 100 {
                    writes.push(((next - 100).to_be_bytes().to_vec().into(), None));
                }
                writes.push(((u32::MAX - next).to_be_bytes().to_vec().into(), None));
                // A no-op: a key set to the value it has.
                if let Some((k, v)) = model.iter().next() {
                    writes.push((k.clone().into(), Some(v.clone().into())));
                }
                writes.sort_by(|a, b| a.0.cmp(&b.0));
                for (k, v) in &writes {
                    match v {
                        Some(v) => model.insert(k.to_vec(), v.to_vec()),
                        None => model.remove(&k.to_vec()),
                    };
                }
                tree.apply_each(&writes).unwrap();
                size = size % 40 + 1;
            }
            let got: BTreeMap<Vec<u8>, Vec<u8>> = tree
                .iter()
                .map(|r| r.map(|(k, v)| (k.to_vec(), v.to_vec())).unwrap())
                .collect();
            assert!(got == model, "the tree holds what the model does");
            db.flush().unwrap();
        }
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let tree = db.open_tree("t").unwrap();
        let got: BTreeMap<Vec<u8>, Vec<u8>> = tree
            .iter()
            .map(|r| r.map(|(k, v)| (k.to_vec(), v.to_vec())).unwrap())
            .collect();
        assert_eq!(got.len(), model.len());
        assert!(got == model, "the log replays to what the model holds");
    }

    /// With a subscriber (`watch_prefix`), `apply_each` writes key by key, as `insert` does: the
    /// subscriber sees every write, in order, and none waits on another.
    #[test]
    fn writes_applied_per_leaf_reach_a_subscriber_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let tree = db.open_tree("t").unwrap();
        let mut events = tree.watch_prefix(b"k");
        let writes: Vec<(sled::IVec, Option<sled::IVec>)> = (0..50u8)
            .map(|i| (vec![b'k', i].into(), Some(vec![i].into())))
            .chain([(vec![b'k', 3].into(), None)])
            .collect();
        tree.apply_each(&writes).unwrap();
        for (k, v) in &writes {
            match events.next().expect("an event per write") {
                sled::Event::Insert { key, value } => {
                    assert_eq!((&key, Some(&value)), (k, v.as_ref()));
                }
                sled::Event::Remove { key } => assert_eq!((&key, None), (k, v.as_ref())),
            }
        }
        assert_eq!(tree.len(), 49);
    }

    /// A first attempt's due entry is in memory: it is claimed as such, and the delivery made
    /// from the entry and the event's name, without reading storage, is the one storage
    /// holds. A retry's entry is in sled's index, and claimed as indexed.
    #[tokio::test]
    async fn a_first_attempt_is_claimed_from_memory_and_made_without_reading_storage() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let subs = [Uuid::now_v7(), Uuid::now_v7()];
        // Received now: one waiting long has its entry moved to sled (see `fresh`).
        let at = now_ms();
        let e = event(&subs, at);
        accept_now(&store, std::slice::from_ref(&e)).await;
        let due = store.due_entries(&subs[1], 1).unwrap().remove(0);
        assert_eq!(store.claim_entry(&due).unwrap(), Some(Claimed::First));
        assert_eq!(store.claim_entry(&due).unwrap(), None, "claimed once");
        let stored = store.delivery(&due.delivery).unwrap().unwrap();
        assert_eq!(stored.subscription_id, subs[1]);
        assert_eq!(Store::first_delivery(&due, &e.name), Some(stored.clone()));
        let (read, event) = store
            .read_delivery(&due.delivery, true, true)
            .unwrap()
            .unwrap();
        assert_eq!(read, stored);
        assert_eq!(event.unwrap().event, e.event);

        let mut failed = stored;
        failed.attempts.push(Attempt {
            n: 1,
            started_at: at + 100,
            duration_ms: 3,
            code: 500,
            error: None,
            response_body: None,
        });
        failed.next_attempt_at = Some(at + 60_000);
        assert!(store.record_attempt(&failed, due.due_ms).await.unwrap());
        let retry = store.due_entries(&subs[1], 1).unwrap().remove(0);
        assert_eq!((retry.due_ms, retry.delivery), (at + 60_000, due.delivery));
        assert_eq!(store.claim_entry(&retry).unwrap(), Some(Claimed::Indexed));
        assert_eq!(store.delivery(&due.delivery).unwrap(), Some(failed));
    }

    /// An event over a quarter of a 512 KiB log segment goes to a sled blob file of its own
    /// (patched to be synced with its directory before the log points to it): it and the
    /// events around it read back after a reopen.
    #[tokio::test]
    async fn an_event_larger_than_sled_puts_in_its_log_reads_back_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let sub = Uuid::now_v7();
        let mut big = event(&[sub], now_ms());
        big.event["data"]["note"] = json!("ж".repeat(150 * 1024));
        let events = [event(&[sub], now_ms()), big, event(&[sub], now_ms())];
        {
            let store = Store::open(dir.path()).unwrap();
            for e in &events {
                accept_now(&store, std::slice::from_ref(e)).await;
            }
        }
        let blobs = std::fs::read_dir(dir.path().join("blobs")).unwrap().count();
        assert!(blobs >= 1, "the large event went to a blob file");
        let store = Store::open(dir.path()).unwrap();
        for e in &events {
            let back = store.event(&e.id).unwrap().expect("every event is kept");
            assert_eq!(back.event, e.event);
        }
    }

    #[tokio::test]
    async fn the_log_pages_newest_first_across_events_with_several_deliveries() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let subs: Vec<Uuid> = (0..3).map(|_| Uuid::now_v7()).collect();
        let mut events = Vec::new();
        for at in 0..4u64 {
            let e = event(&subs, 1_000 + at);
            accept_now(&store, std::slice::from_ref(&e)).await;
            events.push(e);
        }
        let mut all = Vec::new();
        let mut before = None;
        loop {
            let page = store
                .deliveries(&DeliveryQuery {
                    before,
                    limit: 5,
                    ..Default::default()
                })
                .unwrap();
            all.extend(page.deliveries.iter().map(|d| d.id));
            match page.next {
                Some(c) => before = Some(c),
                None => break,
            }
        }
        let mut want: Vec<Uuid> = events
            .iter()
            .flat_map(|e| (0..3).map(|i| delivery_id(&e.id, i)))
            .collect();
        want.reverse();
        assert_eq!(all, want, "12 deliveries, newest first, none twice");
        // A cursor past an event's deliveries (a client's input) starts at its last one.
        let page = store
            .deliveries(&DeliveryQuery {
                before: Some(delivery_id(&events[3].id, 500)),
                limit: 100,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(page.deliveries.len(), 12);
        // One subscription's.
        let page = store
            .deliveries(&DeliveryQuery {
                subscription: Some(subs[1]),
                limit: 10,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(page.deliveries.len(), 4);
        assert!(page.deliveries.iter().all(|d| d.subscription_id == subs[1]));
    }

    #[tokio::test]
    async fn retention_purges_ended_deliveries_one_by_one_and_events_with_their_last() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let e = event(&[a, b], 1_000);
        let bare = event(&[], 1_000);
        accept_now(&store, &[e.clone(), bare.clone()]).await;
        let da = store.delivery(&delivery_id(&e.id, 0)).unwrap().unwrap();
        assert!(
            claim_and_record(
                &store,
                &ended(da.clone(), DeliveryStatus::Delivered, 2_000),
                1_000
            )
            .await
        );
        // Past the delivered retention, while its sibling waits: only the delivered one goes.
        let far = new_event_id();
        let cutoff = uuid_ms(far.as_bytes()) + 1;
        let step = store.purge_step(3_000, 1, 1, None, 100).await.unwrap();
        assert_eq!(
            step.purged, 0,
            "the walk only reaches events received before a cutoff"
        );
        let step = store.purge_step(cutoff, 1, 1, None, 100).await.unwrap();
        assert_eq!(step.purged, 1);
        assert!(store.delivery(&da.id).unwrap().is_none());
        assert!(store.event(&e.id).unwrap().is_some());
        assert!(
            store.event(&bare.id).unwrap().is_some(),
            "kept for the longer retention"
        );
        // The sibling fails and goes past the failed retention: the event goes with it.
        let db = store.delivery(&delivery_id(&e.id, 1)).unwrap().unwrap();
        assert!(
            claim_and_record(
                &store,
                &ended(db.clone(), DeliveryStatus::Failed, 2_000),
                1_000
            )
            .await
        );
        let step = store
            .purge_step(cutoff, cutoff, cutoff, None, 100)
            .await
            .unwrap();
        assert_eq!(step.purged, 1);
        assert!(store.event(&e.id).unwrap().is_none());
        assert!(store.event(&bare.id).unwrap().is_none());
        assert!(store.delivery(&db.id).unwrap().is_none());
        assert!(store.failed_since(&b, 0).unwrap().is_empty());
        assert!(
            store.tree.scan_prefix([DELIVERY]).next().is_none(),
            "no tombstone left"
        );
    }
}
