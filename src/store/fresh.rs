//! Deliveries waiting for their first attempt, whose due entries are kept in memory rather than
//! in sled.
//!
//! A delivery that has not had an attempt needs no due entry on disk: its event record names its
//! subscription and its due time (the event's arrival), and having no `d` record tells that its
//! first attempt has not ended. So intake writes only the event, the lanes find its deliveries
//! here, and an attempt that ends soon writes one key (its `d` record) instead of a due entry at
//! intake plus its removal. Most deliveries never cost a due entry at all.
//!
//! What bounds this: a delivery still here after [`SPILL_AGE`] gets its due entry written to sled
//! after all (it is *spilled*) and leaves memory; from then on it is an ordinary due entry. An
//! event that would take this past [`MAX_FRESH`] entries gets its due entries in sled at intake.
//! After a crash the writer's watermark (the oldest event that may still have deliveries here, or
//! whose outcome taken from here is not written yet) tells where to look: every delivery of an
//! event from it on that has neither a `d` record nor a due entry comes back here (see
//! `Store::open`).

use super::delivery_id;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Duration;
use uuid::Uuid;

/// How long a delivery may wait for its first attempt in memory before it is spilled.
pub const SPILL_AGE: Duration = Duration::from_secs(10);

/// The most deliveries kept here (170 bytes of RSS each, measured with 100,000): the writer
/// writes the due entries of an event beyond it at intake, and spills the oldest events' should
/// more be here (entries put back after a failed write).
pub const MAX_FRESH: usize = 1 << 18;

/// An event with deliveries here: its arrival, and how many of its deliveries are still here.
/// Which subscriptions they go to is in the event's record (read again only to spill them).
struct FreshEvent {
    received_at: u64,
    left: u32,
}

/// A due entry kept in memory: subscription, due time (ms) and delivery.
pub type Entry = (Uuid, u64, Uuid);

/// The deliveries waiting for their first attempt that have no due entry in sled.
#[derive(Default)]
pub struct Fresh {
    /// Per subscription, in due order.
    lanes: HashMap<Uuid, BTreeSet<(u64, Uuid)>>,
    /// The events they belong to, oldest first.
    events: BTreeMap<Uuid, FreshEvent>,
    len: usize,
    /// Events whose entries cannot be spilled (their record is unreadable): kept here.
    kept: HashSet<Uuid>,
}

impl Fresh {
    /// Adds deliveries `indexes` of an event (due at its arrival). Delivery `i` goes to
    /// `subscriptions[i]`.
    pub fn add(
        &mut self,
        event: Uuid,
        received_at: u64,
        subscriptions: &[Uuid],
        indexes: impl IntoIterator<Item = usize>,
    ) {
        let mut left = 0;
        for i in indexes {
            let lane = self.lanes.entry(subscriptions[i]).or_default();
            if lane.insert((received_at, delivery_id(&event, i))) {
                left += 1;
            }
        }
        if left > 0 {
            self.len += left;
            let e = self.events.entry(event).or_insert(FreshEvent {
                received_at,
                left: 0,
            });
            e.left += left as u32;
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn contains(&self, sub: &Uuid, due_ms: u64, delivery: &Uuid) -> bool {
        self.lanes
            .get(sub)
            .is_some_and(|l| l.contains(&(due_ms, *delivery)))
    }

    /// Removes an entry; `false` when it is not here.
    pub fn take(&mut self, sub: &Uuid, due_ms: u64, delivery: &Uuid) -> bool {
        let Some(lane) = self.lanes.get_mut(sub) else {
            return false;
        };
        if !lane.remove(&(due_ms, *delivery)) {
            return false;
        }
        if lane.is_empty() {
            self.lanes.remove(sub);
        }
        self.forget_one(delivery);
        true
    }

    /// Puts back an entry [`Fresh::take`] removed (its outcome could not be written).
    pub fn restore(&mut self, sub: &Uuid, due_ms: u64, delivery: &Uuid) {
        let Some((event, _)) = super::event_of(delivery) else {
            return;
        };
        if self
            .lanes
            .entry(*sub)
            .or_default()
            .insert((due_ms, *delivery))
        {
            self.len += 1;
            let e = self.events.entry(event).or_insert(FreshEvent {
                received_at: due_ms,
                left: 0,
            });
            e.left += 1;
        }
    }

    /// Notes that one delivery of an event left.
    fn forget_one(&mut self, delivery: &Uuid) {
        self.len -= 1;
        if let Some((event, _)) = super::event_of(delivery)
            && let Some(e) = self.events.get_mut(&event)
        {
            e.left -= 1;
            if e.left == 0 {
                self.events.remove(&event);
                self.kept.remove(&event);
            }
        }
    }

    /// Removes every entry of a subscription, and returns them (due time, delivery) in due order.
    pub fn take_subscription(&mut self, sub: &Uuid) -> Vec<(u64, Uuid)> {
        let taken: Vec<(u64, Uuid)> = self
            .lanes
            .remove(sub)
            .unwrap_or_default()
            .into_iter()
            .collect();
        for (_, delivery) in &taken {
            self.forget_one(delivery);
        }
        taken
    }

    /// The earliest `max` entries of a subscription for which `skip` is false, in due order.
    pub fn earliest(
        &self,
        sub: &Uuid,
        max: usize,
        mut skip: impl FnMut(&Uuid) -> bool,
    ) -> Vec<(u64, Uuid)> {
        let Some(lane) = self.lanes.get(sub) else {
            return Vec::new();
        };
        lane.iter()
            .filter(|(_, d)| !skip(d))
            .take(max)
            .copied()
            .collect()
    }

    /// The deliveries here that were created before `before_ms`.
    pub fn created_before(&self, before_ms: u64) -> HashSet<Uuid> {
        let before = Uuid::from_bytes(super::uuid_floor(before_ms));
        let lanes = self.lanes.values().flat_map(|l| l.iter());
        lanes.map(|(_, d)| *d).filter(|d| *d < before).collect()
    }

    /// The events whose entries are to be spilled, with their arrival: the oldest, while they
    /// arrived before `before_ms` or while more than `max` entries would stay, until they hold
    /// at least `limit` entries. Nothing is removed: the caller writes the due entries of those
    /// still here ([`Fresh::contains`]), then [`Fresh::take`]s them.
    pub fn to_spill(&self, before_ms: u64, max: usize, limit: usize) -> Vec<(Uuid, u64)> {
        let mut out = Vec::new();
        let mut staying = self.len;
        for (event, e) in &self.events {
            if self.kept.contains(event) {
                continue;
            }
            let spilled = self.len - staying;
            if (e.received_at >= before_ms && staying <= max) || spilled >= limit {
                break;
            }
            out.push((*event, e.received_at));
            staying -= e.left as usize;
        }
        out
    }

    /// Stops spilling an event's entries (see `kept`).
    pub fn keep(&mut self, event: Uuid) {
        self.kept.insert(event);
    }

    /// The oldest event with entries here.
    pub fn oldest_event(&self) -> Option<Uuid> {
        self.events.keys().next().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::new_event_id;

    #[test]
    fn entries_leave_by_outcome_by_subscription_and_by_spill_and_the_oldest_event_follows() {
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let mut f = Fresh::default();
        let e1 = new_event_id();
        let e2 = new_event_id();
        assert!(e1 < e2);
        f.add(e1, 100, &[a, b], 0..2);
        f.add(e2, 200, &[b, a], 0..2);
        assert_eq!(f.len(), 4);
        assert_eq!(f.oldest_event(), Some(e1));
        assert!(f.created_before(0).is_empty());
        // In due order per lane, skipping what the caller says (deliveries in flight).
        let d1a = delivery_id(&e1, 0);
        let d2a = delivery_id(&e2, 1);
        assert_eq!(f.earliest(&a, 10, |_| false), vec![(100, d1a), (200, d2a)]);
        assert_eq!(f.earliest(&a, 10, |d| *d == d1a), vec![(200, d2a)]);
        assert_eq!(f.earliest(&a, 1, |_| false), vec![(100, d1a)]);
        // An entry leaves once, at its own due time only.
        assert!(!f.take(&a, 101, &d1a));
        assert!(f.take(&a, 100, &d1a));
        assert!(!f.take(&a, 100, &d1a));
        assert!(!f.contains(&a, 100, &d1a));
        // Put back (its outcome was not written), it is as before.
        f.restore(&a, 100, &d1a);
        assert_eq!(f.len(), 4);
        assert_eq!(f.earliest(&a, 1, |_| false), vec![(100, d1a)]);
        assert!(f.take(&a, 100, &d1a));
        assert_eq!(f.oldest_event(), Some(e1), "e1 still has its delivery to b");
        // The oldest event goes with its last entry.
        assert_eq!(
            f.take_subscription(&b),
            vec![(100, delivery_id(&e1, 1)), (200, delivery_id(&e2, 0))]
        );
        assert_eq!(f.oldest_event(), Some(e2));
        assert_eq!(f.len(), 1);
        // Spilling: by age, then by count; nothing leaves until taken.
        assert!(f.to_spill(200, 10, 100).is_empty());
        assert_eq!(f.to_spill(201, 10, 100), vec![(e2, 200)]);
        assert_eq!(f.to_spill(0, 0, 100), vec![(e2, 200)]);
        assert_eq!(f.len(), 1);
        assert!(f.take(&a, 200, &d2a));
        assert_eq!((f.len(), f.oldest_event()), (0, None));
        assert!(f.lanes.is_empty(), "empty lanes are dropped");
    }

    #[test]
    fn spilling_by_count_takes_whole_events_oldest_first() {
        let subs: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
        let mut f = Fresh::default();
        let events: Vec<Uuid> = (0..4).map(|_| new_event_id()).collect();
        for (n, e) in events.iter().enumerate() {
            f.add(*e, n as u64, &subs, 0..3);
        }
        // 12 entries, at most 7 may stay: the two oldest events (6 entries) go.
        let two = vec![(events[0], 0), (events[1], 1)];
        assert_eq!(f.to_spill(0, 7, 100), two);
        // An event with an entry gone counts for what it has left.
        let first = delivery_id(&events[0], 0);
        assert!(f.take(&subs[0], 0, &first));
        assert_eq!(f.to_spill(0, 8, 100), two);
        assert_eq!(f.to_spill(0, 9, 100), two[..1]);
        // About `limit` entries at once, in whole events.
        assert_eq!(f.to_spill(0, 0, 1), two[..1]);
        assert_eq!(f.to_spill(0, 0, 3), two);
        let all = f.created_before(u64::MAX >> 16);
        assert_eq!(all.len(), 11);
        assert!(!all.contains(&first));
    }
}
