//! The engine's encoded bodies: an event's amoCRM or JSON body is encoded once (at intake, or by
//! the first attempt that needs it) and kept for the deliveries of the event still to take it.
//!
//! Each body counts the deliveries still to take it, and the one that takes the last use removes
//! it: the cache holds bodies still waiting for their use, not bodies already sent, so it is only
//! as full as the lanes lag behind intake. Its memory is bounded besides, by weight.

use crate::payload::{Body, Format};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use uuid::Uuid;

/// How much memory the bodies may take: 32 MiB, about 70,000 bodies of an ordinary amoCRM event.
/// A body leaves once its deliveries have taken it, so the cache is only this full while the
/// lanes lag that far behind intake.
const CAPACITY_BYTES: u64 = 32 << 20;

/// The share of [`CAPACITY_BYTES`] for bodies used more than once (an event's for many
/// subscriptions). The rest holds new bodies until their first use: a body encoded at intake
/// waits there for its event's first attempt, which comes tens of thousands of events later
/// when the lanes lag behind a burst of intake.
const HOT_SHARE: f64 = 0.25;

/// A body with its event's name: a first attempt of a cached event needs nothing from storage
/// (see [`crate::store::Store::first_delivery`]).
#[derive(Clone)]
pub struct Encoded {
    pub body: Body,
    pub event: Arc<str>,
    /// How many deliveries are still to take the body.
    left: Arc<AtomicUsize>,
}

/// Weighs a kept body by the memory it takes: its bytes, its event's name, and about what the
/// entry costs besides.
#[derive(Clone)]
struct Weight;

impl quick_cache::Weighter<(Uuid, Format), Encoded> for Weight {
    fn weight(&self, _: &(Uuid, Format), v: &Encoded) -> u64 {
        (v.body.bytes.len() + v.body.content_type.len() + v.event.len() + 120) as u64
    }
}

pub struct Bodies {
    cache: quick_cache::sync::Cache<(Uuid, Format), Encoded, Weight>,
}

impl Bodies {
    pub fn new() -> Bodies {
        Bodies::with_capacity(CAPACITY_BYTES)
    }

    fn with_capacity(bytes: u64) -> Bodies {
        Bodies {
            cache: quick_cache::sync::Cache::with_options(
                quick_cache::OptionsBuilder::new()
                    .estimated_items_capacity((bytes / 448) as usize)
                    .weight_capacity(bytes)
                    .hot_allocation(HOT_SHARE)
                    .build()
                    .expect("the body cache's options are valid"),
                Weight,
                Default::default(),
                Default::default(),
            ),
        }
    }

    /// Keeps the body of `event` in `format` for `uses` deliveries (none: not kept).
    pub fn keep(&self, event: Uuid, format: Format, name: Arc<str>, body: Body, uses: usize) {
        if uses == 0 {
            return;
        }
        self.cache.insert(
            (event, format),
            Encoded {
                body,
                event: name,
                left: Arc::new(AtomicUsize::new(uses)),
            },
        );
    }

    /// The body of `event` in `format`, taken by one delivery: the delivery that takes the last
    /// use removes it. A retry may come for a body whose uses are all taken but not yet removed;
    /// it removes it too, which only costs a later retry an encode.
    pub fn take(&self, event: Uuid, format: Format) -> Option<Encoded> {
        let key = (event, format);
        let found = self.cache.get(&key)?;
        let before = found
            .left
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .unwrap_or(0);
        if before <= 1 {
            // This body only: one kept anew meanwhile counts uses of its own.
            self.cache
                .remove_if(&key, |v| Arc::ptr_eq(&v.left, &found.left));
        }
        Some(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(text: &str) -> Body {
        Body {
            content_type: "application/json".into(),
            bytes: bytes::Bytes::from(text.to_string()),
        }
    }

    #[test]
    fn a_body_is_there_for_each_of_its_uses_and_gone_after_the_last() {
        let bodies = Bodies::new();
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        bodies.keep(a, Format::Amocrm, "add_lead".into(), body("a"), 3);
        bodies.keep(b, Format::Amocrm, "add_lead".into(), body("b"), 1);
        for _ in 0..3 {
            let got = bodies.take(a, Format::Amocrm).expect("a use is left");
            assert_eq!(&got.body.bytes[..], b"a");
            assert_eq!(&*got.event, "add_lead");
        }
        assert!(bodies.take(a, Format::Amocrm).is_none());
        // Keyed by format too.
        assert!(bodies.take(b, Format::Json).is_none());
        assert_eq!(
            &bodies.take(b, Format::Amocrm).unwrap().body.bytes[..],
            b"b"
        );
        assert!(bodies.take(b, Format::Amocrm).is_none());
        // Nothing to keep for no use.
        bodies.keep(b, Format::Json, "add_lead".into(), body("b"), 0);
        assert!(bodies.take(b, Format::Json).is_none());
    }

    #[test]
    fn bodies_beyond_the_capacity_are_evicted() {
        let bodies = Bodies::with_capacity(64 << 10);
        let ids: Vec<Uuid> = (0..1000).map(|_| Uuid::now_v7()).collect();
        for id in &ids {
            bodies.keep(
                *id,
                Format::Amocrm,
                "add_lead".into(),
                body(&"x".repeat(300)),
                1,
            );
        }
        let kept = ids
            .iter()
            .filter(|id| bodies.take(**id, Format::Amocrm).is_some())
            .count();
        // 1000 bodies of about 440 bytes do not fit in 64 KiB; the newest do.
        assert!(kept > 0 && kept < 200, "{kept} of 1000 kept");
    }
}
