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
//! | `f` sub_id delivery_id | empty: the delivery's attempt is in flight |
//!
//! Ids are UUIDv7, so keys sort by creation time. Durability: writes land in sled's log at once and
//! [`Store::flush`] makes them durable; concurrent callers share one fsync (group commit). Only
//! intake waits for a flush: a lost attempt result only means the attempt is made again, because a
//! claimed delivery keeps its `f` entry until its result is written, and start-up turns every `f`
//! entry back into a due entry.

pub mod model;

pub use model::{
    Attempt, Delivery, DeliveryStatus, DisabledReason, Filter, StoredEvent, Subscription,
};

use std::path::Path;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

const SUB: u8 = b's';
const EVENT: u8 = b'e';
const DELIVERY: u8 = b'd';
const DUE: u8 = b'q';
const IN_FLIGHT: u8 = b'f';
const EMPTY: &[u8] = &[];

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

fn in_flight_key(sub: &Uuid, delivery: &Uuid) -> [u8; 33] {
    let mut k = [0u8; 33];
    k[0] = IN_FLIGHT;
    k[1..17].copy_from_slice(sub.as_bytes());
    k[17..].copy_from_slice(delivery.as_bytes());
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
            .cache_capacity(64 * 1024 * 1024);
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
        for prefix in [DUE, IN_FLIGHT] {
            let mut p = vec![prefix];
            p.extend_from_slice(sub.as_bytes());
            for r in self.tree.scan_prefix(&p) {
                let (k, _) = r?;
                batch.remove(k.clone());
                let did = uuid_at(&k, k.len() - 16);
                if let Some(mut d) = self.delivery(&did)? {
                    d.status = DeliveryStatus::Failed;
                    d.next_attempt_at = None;
                    d.error = Some(reason.to_string());
                    d.ended_at = Some(now_ms);
                    batch.insert(key(DELIVERY, &did).as_slice(), encode(&d));
                    ended += 1;
                }
            }
        }
        self.tree.apply_batch(batch)?;
        Ok(ended)
    }

    // ---- intake ----

    /// Writes events with their deliveries and due entries in one atomic batch (not yet flushed).
    pub fn accept(&self, items: &[(StoredEvent, Vec<Delivery>)]) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for (event, deliveries) in items {
            batch.insert(key(EVENT, &event.id).as_slice(), encode(event));
            for d in deliveries {
                batch.insert(key(DELIVERY, &d.id).as_slice(), encode(d));
                let due = d.next_attempt_at.unwrap_or(d.created_at);
                batch.insert(due_key(&d.subscription_id, due, &d.id).as_slice(), EMPTY);
            }
        }
        self.tree.apply_batch(batch)?;
        Ok(())
    }

    pub fn event(&self, id: &Uuid) -> Result<Option<StoredEvent>, StoreError> {
        let k = key(EVENT, id);
        self.tree.get(k)?.map(|v| decode(&k, &v)).transpose()
    }

    pub fn delivery(&self, id: &Uuid) -> Result<Option<Delivery>, StoreError> {
        let k = key(DELIVERY, id);
        self.tree.get(k)?.map(|v| decode(&k, &v)).transpose()
    }

    /// Deliveries newest first, starting after `before` (a cursor: the last id of the previous
    /// page), keeping those `keep` accepts, at most `limit`.
    ///
    /// This walks the delivery records in id (time) order; the delivery log's secondary indexes
    /// (by subscription, status, event) are a later step.
    pub fn deliveries(
        &self,
        before: Option<&Uuid>,
        limit: usize,
        mut keep: impl FnMut(&Delivery) -> bool,
    ) -> Result<Vec<Delivery>, StoreError> {
        let start = [DELIVERY];
        let end = match before {
            Some(id) => key(DELIVERY, id).to_vec(),
            None => vec![DELIVERY + 1],
        };
        let mut out = Vec::new();
        for r in self.tree.range(start.to_vec()..end).rev() {
            let (k, v) = r?;
            let d: Delivery = decode(&k, &v)?;
            if keep(&d) {
                out.push(d);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    pub fn is_in_flight(&self, sub: &Uuid, delivery: &Uuid) -> Result<bool, StoreError> {
        Ok(self.tree.contains_key(in_flight_key(sub, delivery))?)
    }

    // ---- the scheduler's index ----

    /// The earliest due entry of a subscription's lane.
    pub fn next_due(&self, sub: &Uuid) -> Result<Option<Due>, StoreError> {
        let mut p = [0u8; 17];
        p[0] = DUE;
        p[1..].copy_from_slice(sub.as_bytes());
        match self.tree.scan_prefix(p).next() {
            None => Ok(None),
            Some(r) => {
                let (k, _) = r?;
                let mut ms = [0u8; 8];
                ms.copy_from_slice(&k[17..25]);
                Ok(Some(Due {
                    subscription: *sub,
                    due_ms: u64::from_be_bytes(ms),
                    delivery: uuid_at(&k, 25),
                }))
            }
        }
    }

    /// Moves a due entry to in flight. `false` when the entry was gone (taken by someone else).
    pub fn claim(&self, due: &Due) -> Result<bool, StoreError> {
        let dk = due_key(&due.subscription, due.due_ms, &due.delivery);
        let fk = in_flight_key(&due.subscription, &due.delivery);
        let claimed = self
            .tree
            .transaction(|tx| {
                if tx.remove(dk.as_slice())?.is_none() {
                    return Ok(false);
                }
                tx.insert(fk.as_slice(), EMPTY)?;
                Ok(true)
            })
            .map_err(|e: sled::transaction::TransactionError<()>| match e {
                sled::transaction::TransactionError::Storage(e) => StoreError::Sled(e),
                sled::transaction::TransactionError::Abort(()) => {
                    StoreError::Sled(sled::Error::Unsupported("aborted".into()))
                }
            })?;
        Ok(claimed)
    }

    /// Writes an attempt's outcome: the updated delivery, the end of its in-flight entry, and its
    /// next due entry when another attempt follows.
    pub fn record_attempt(&self, d: &Delivery) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        batch.insert(key(DELIVERY, &d.id).as_slice(), encode(d));
        batch.remove(in_flight_key(&d.subscription_id, &d.id).as_slice());
        if d.status == DeliveryStatus::Pending {
            let due = d.next_attempt_at.unwrap_or(0);
            batch.insert(due_key(&d.subscription_id, due, &d.id).as_slice(), EMPTY);
        }
        self.tree.apply_batch(batch)?;
        Ok(())
    }

    /// Start-up recovery: every attempt that was in flight when the process stopped is due again
    /// now (at-least-once). Returns how many were recovered.
    pub fn recover_in_flight(&self, now_ms: u64) -> Result<usize, StoreError> {
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for r in self.tree.scan_prefix([IN_FLIGHT]) {
            let (k, _) = r?;
            let sub = uuid_at(&k, 1);
            let did = uuid_at(&k, 17);
            batch.remove(k);
            batch.insert(due_key(&sub, now_ms, &did).as_slice(), EMPTY);
            n += 1;
        }
        self.tree.apply_batch(batch)?;
        Ok(n)
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
