//! Retention: ended deliveries are purged after `[retention]` (delivered 30 d, failed 90 d by
//! default) by a background task. It works in short bounded steps, so delivery
//! never waits on it for long.

use crate::config::RetentionConfig;
use crate::intake::IDEMPOTENCY_WINDOW;
use crate::store::Store;
use crate::subscription::now_ms;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Events looked at per step. A step runs on the storage writer thread, alone, so it is kept
/// short: intake and attempt outcomes wait meanwhile.
const CHUNK: usize = 500;
/// Events one pass looks at, at most; the next pass goes on from there.
const PASS: usize = 100_000;

/// How often the purge runs: a quarter of the shorter retention, between 50 ms and a minute.
pub fn interval(cfg: &RetentionConfig) -> Duration {
    (cfg.delivered.min(cfg.failed) / 4).clamp(Duration::from_millis(50), Duration::from_secs(60))
}

/// One pass: walks the events oldest first from `cursor` (where the previous pass stopped),
/// chunk by chunk, and purges what is past its retention; idempotency keys older than their
/// window go too. Returns how many deliveries went.
pub async fn purge(store: &Store, cfg: &RetentionConfig, cursor: &mut Option<Uuid>) -> usize {
    let now = now_ms();
    let delivered = now.saturating_sub(cfg.delivered.as_millis() as u64);
    let failed = now.saturating_sub(cfg.failed.as_millis() as u64);
    let bare = delivered.min(failed);
    let mut total = 0;
    let mut walked = 0;
    while walked < PASS {
        let step = match store
            .purge_step(delivered, failed, bare, *cursor, CHUNK)
            .await
        {
            Ok(step) => step,
            Err(e) => {
                tracing::error!(error = %e, "retention purge failed");
                break;
            }
        };
        total += step.purged;
        walked += CHUNK;
        *cursor = step.next;
        if cursor.is_none() {
            break;
        }
    }
    let keys = now.saturating_sub(IDEMPOTENCY_WINDOW.as_millis() as u64);
    let s = store.clone();
    let _ = tokio::task::spawn_blocking(move || s.purge_idempotency(keys, usize::MAX)).await;
    total
}

/// Runs [`purge`] every [`interval`] until `stop`.
pub async fn run(store: Store, cfg: RetentionConfig, stop: CancellationToken) {
    let every = interval(&cfg);
    let mut cursor = None;
    loop {
        let n = purge(&store, &cfg, &mut cursor).await;
        if n > 0 {
            tracing::info!(purged = n, "retention purged ended deliveries");
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => return,
        }
    }
}
