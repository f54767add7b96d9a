//! The live stream of delivery attempts and state changes (SPEC §5.4): the engine and intake
//! publish one [`AttemptEvent`] per attempt or state change; `GET /v1/deliveries/stream` and
//! `dispatcher tail` follow it.
//!
//! A broadcast channel with a fixed capacity: publishing never waits, and a reader that falls
//! behind by more than the capacity is dropped (its stream ends) instead of slowing the engine.

use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tokio::sync::broadcast;
use uuid::Uuid;

/// How many events a reader may fall behind before it is dropped.
const CAPACITY: usize = 8192;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// An attempt started.
    InFlight,
    Delivered,
    /// The attempt failed and another is scheduled.
    Retrying,
    /// The delivery ended without success.
    Failed,
    /// The delivery waits because its subscription is disabled.
    Held,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::InFlight => "in_flight",
            Outcome::Delivered => "delivered",
            Outcome::Retrying => "retrying",
            Outcome::Failed => "failed",
            Outcome::Held => "held",
        }
    }
}

/// One line of the stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptEvent {
    pub at: String,
    pub delivery_id: Uuid,
    pub event_id: Uuid,
    pub event: String,
    pub subscription_id: Uuid,
    pub subscription_name: Option<String>,
    pub host: String,
    /// The attempt's number (for `held`, the number of the attempt that waits).
    pub attempt: u32,
    /// The most attempts the subscription's policy allows.
    pub max_attempts: u32,
    /// The HTTP status (0: no answer); absent before the attempt has an outcome.
    pub code: Option<u16>,
    pub duration_ms: Option<u64>,
    pub outcome: Outcome,
    pub next_attempt_at: Option<String>,
}

/// The publishing side, shared by the engine and intake.
#[derive(Clone)]
pub struct AttemptStream {
    tx: broadcast::Sender<Arc<AttemptEvent>>,
}

impl Default for AttemptStream {
    fn default() -> Self {
        AttemptStream {
            tx: broadcast::channel(CAPACITY).0,
        }
    }
}

impl AttemptStream {
    /// Publishes an event; never waits, and costs nothing when nobody listens.
    pub fn publish(&self, event: AttemptEvent) {
        if self.tx.receiver_count() > 0 {
            let _ = self.tx.send(Arc::new(event));
        }
    }

    pub fn has_readers(&self) -> bool {
        self.tx.receiver_count() > 0
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<AttemptEvent>> {
        self.tx.subscribe()
    }
}
