//! Retention: ended deliveries are purged after `[retention]` (delivered 30 d, failed 90 d by
//! default) by a background task. It works in bounded chunks on the blocking pool, so delivery
//! never waits on it.

use crate::config::RetentionConfig;
use crate::store::{DeliveryStatus, Store};
use crate::subscription::now_ms;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Deliveries removed per chunk.
const CHUNK: usize = 5_000;

/// How often the purge runs: a quarter of the shorter retention, between 50 ms and a minute.
pub fn interval(cfg: &RetentionConfig) -> Duration {
    (cfg.delivered.min(cfg.failed) / 4).clamp(Duration::from_millis(50), Duration::from_secs(60))
}

/// One pass: everything past its retention goes, chunk by chunk. Returns how many deliveries went.
pub async fn purge(store: &Store, cfg: &RetentionConfig) -> usize {
    let mut total = 0;
    for (status, keep) in [
        (DeliveryStatus::Delivered, cfg.delivered),
        (DeliveryStatus::Failed, cfg.failed),
    ] {
        loop {
            let cutoff = now_ms().saturating_sub(keep.as_millis() as u64);
            let s = store.clone();
            let n = tokio::task::spawn_blocking(move || s.purge_ended(status, cutoff, CHUNK))
                .await
                .ok()
                .and_then(|r| {
                    r.map_err(|e| tracing::error!(error = %e, "retention purge failed"))
                        .ok()
                })
                .unwrap_or(0);
            total += n;
            if n < CHUNK {
                break;
            }
        }
    }
    let cutoff = now_ms().saturating_sub(cfg.delivered.max(cfg.failed).as_millis() as u64);
    let s = store.clone();
    let _ =
        tokio::task::spawn_blocking(move || s.purge_events_without_deliveries(cutoff, CHUNK)).await;
    total
}

/// Runs [`purge`] every [`interval`] until `stop`.
pub async fn run(store: Store, cfg: RetentionConfig, stop: CancellationToken) {
    let every = interval(&cfg);
    loop {
        let n = purge(&store, &cfg).await;
        if n > 0 {
            tracing::info!(purged = n, "retention purged ended deliveries");
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => return,
        }
    }
}
