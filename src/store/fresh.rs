//! Deliveries waiting for their first attempt, whose due entries are kept in memory rather than
//! in sled.
//!
//! A delivery that has not had an attempt needs no due entry on disk: its event record names its
//! subscription and its due time (the event's arrival), and having no `d` record tells that its
//! first attempt has not ended. So intake writes only the event, the lanes find its deliveries
//! here, and an attempt that ends soon writes one key (its `d` record) instead of a due entry at
//! intake plus its removal. Most deliveries never cost a due entry at all.
//!
//! What bounds this: a delivery still here after [`SPILL_AGE`] in a lane that has had no outcome
//! for as long (a subscription disabled after intake, a receiver that answers nothing) gets its
//! due entry written
//! to sled after all (it is *spilled*) and leaves memory; from then on it is an ordinary due
//! entry. A lane that drains keeps its entries here up to [`DRAINING_SPILL_AGE`]: the oldest
//! entries of a backlog are the next to go out, and spilling them would only make each of them
//! cost a due entry written, read and removed, which slows the drain that would have ended
//! their wait. An event that would take this past [`MAX_FRESH`] entries gets its due entries in
//! sled at intake, and so do deliveries to a subscription disabled at intake (held: they wait
//! for as long as it stays so).
//! After a crash the writer's watermark (the oldest event that may still have deliveries here, or
//! whose outcome taken from here is not written yet) tells where to look: every delivery of an
//! event from it on that has neither a `d` record nor a due entry comes back here (see
//! `Store::open`).

use super::delivery_id;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Duration;
use uuid::Uuid;

/// How long a delivery may wait for its first attempt in memory, in a lane with no outcome for
/// as long, before it is spilled.
pub const SPILL_AGE: Duration = Duration::from_secs(10);

/// How long a delivery may wait in memory in a lane that drains (another of its entries left by
/// an outcome within [`SPILL_AGE`]). It bounds how far the writer's watermark trails, so what a
/// restart after a crash reads again.
pub const DRAINING_SPILL_AGE: Duration = Duration::from_secs(60);

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

/// One subscription's entries, in due order, and when the subscription last had an outcome (or,
/// until it has, when its lane's first entry arrived; after a restart, the restart).
struct Lane {
    entries: BTreeSet<(u64, Uuid)>,
    progress_ms: u64,
}

/// The deliveries waiting for their first attempt that have no due entry in sled.
#[derive(Default)]
pub struct Fresh {
    /// Per subscription.
    lanes: HashMap<Uuid, Lane>,
    /// The events they belong to, oldest first.
    events: BTreeMap<Uuid, FreshEvent>,
    len: usize,
    /// Events whose entries cannot be spilled for room (their record, which names their
    /// subscriptions, is unreadable): not tried again. [`Fresh::aged`] needs no record.
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
            let lane = self.lanes.entry(subscriptions[i]).or_insert_with(|| Lane {
                entries: BTreeSet::new(),
                progress_ms: received_at,
            });
            if lane.entries.insert((received_at, delivery_id(&event, i))) {
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
            .is_some_and(|l| l.entries.contains(&(due_ms, *delivery)))
    }

    /// Removes an entry; `false` when it is not here.
    pub fn take(&mut self, sub: &Uuid, due_ms: u64, delivery: &Uuid) -> bool {
        let Some(lane) = self.lanes.get_mut(sub) else {
            return false;
        };
        if !lane.entries.remove(&(due_ms, *delivery)) {
            return false;
        }
        if lane.entries.is_empty() {
            self.lanes.remove(sub);
        }
        self.forget_one(delivery);
        true
    }

    /// Puts back an entry [`Fresh::take`] removed (its outcome could not be written) at `now_ms`.
    pub fn restore(&mut self, sub: &Uuid, due_ms: u64, delivery: &Uuid, now_ms: u64) {
        let Some((event, _)) = super::event_of(delivery) else {
            return;
        };
        let lane = self.lanes.entry(*sub).or_insert_with(|| Lane {
            entries: BTreeSet::new(),
            progress_ms: now_ms,
        });
        if lane.entries.insert((due_ms, *delivery)) {
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
            .map(|l| l.entries.into_iter().collect())
            .unwrap_or_default();
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
        lane.entries
            .iter()
            .filter(|(_, d)| !skip(d))
            .take(max)
            .copied()
            .collect()
    }

    /// The deliveries here that were created before `before_ms`.
    pub fn created_before(&self, before_ms: u64) -> HashSet<Uuid> {
        let before = Uuid::from_bytes(super::uuid_floor(before_ms));
        let lanes = self.lanes.values().flat_map(|l| l.entries.iter());
        lanes.map(|(_, d)| *d).filter(|d| *d < before).collect()
    }

    /// Notes that an attempt of `sub` had its outcome at `now_ms`: its lane drains.
    pub fn progressed(&mut self, sub: &Uuid, now_ms: u64) {
        if let Some(lane) = self.lanes.get_mut(sub) {
            lane.progress_ms = lane.progress_ms.max(now_ms);
        }
    }

    /// Starts every lane's count anew at `now_ms`, as after a restart: entries that came back
    /// from storage are not spilled at [`SPILL_AGE`] for the time the daemon was down, before
    /// their lanes had a chance to drain (those past the draining age still are).
    pub fn begin_lanes(&mut self, now_ms: u64) {
        for lane in self.lanes.values_mut() {
            lane.progress_ms = lane.progress_ms.max(now_ms);
        }
    }

    /// The entries to spill by age, oldest first in each lane, about `limit` of them: those that
    /// arrived before `now_ms - stalled_age` in a lane with no outcome since then, and those
    /// that arrived before `now_ms - draining_age` in any lane. Nothing is removed (see
    /// [`Fresh::over_max`]).
    pub fn aged(
        &self,
        now_ms: u64,
        stalled_age: Duration,
        draining_age: Duration,
        limit: usize,
    ) -> Vec<Entry> {
        let stalled_before = now_ms.saturating_sub(stalled_age.as_millis() as u64);
        let draining_before = now_ms.saturating_sub(draining_age.as_millis() as u64);
        let mut out = Vec::new();
        for (sub, lane) in &self.lanes {
            if out.len() >= limit {
                break;
            }
            let before = if lane.progress_ms < stalled_before {
                stalled_before
            } else {
                draining_before
            };
            let old = lane.entries.iter().take_while(|(due, _)| *due < before);
            let room = limit - out.len();
            out.extend(old.take(room).map(|(due, d)| (*sub, *due, *d)));
        }
        out
    }

    /// The events whose entries are to be spilled for room, with their arrival: the oldest,
    /// while more than `max` entries would stay, until they hold at least `limit` entries.
    /// Nothing is removed: the caller writes the due entries of those still here
    /// ([`Fresh::contains`]), then [`Fresh::take`]s them.
    pub fn over_max(&self, max: usize, limit: usize) -> Vec<(Uuid, u64)> {
        let mut out = Vec::new();
        let mut staying = self.len;
        for (event, e) in &self.events {
            if self.kept.contains(event) {
                continue;
            }
            let spilled = self.len - staying;
            if staying <= max || spilled >= limit {
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

    #[cfg(test)]
    pub fn progress_of(&self, sub: &Uuid) -> Option<u64> {
        self.lanes.get(sub).map(|l| l.progress_ms)
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
        f.restore(&a, 100, &d1a, 100);
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
        // Spilling for room; nothing leaves until taken.
        assert!(f.over_max(1, 100).is_empty());
        assert_eq!(f.over_max(0, 100), vec![(e2, 200)]);
        assert_eq!(f.len(), 1);
        assert!(f.take(&a, 200, &d2a));
        assert_eq!((f.len(), f.oldest_event()), (0, None));
        assert!(f.lanes.is_empty(), "empty lanes are dropped");
    }

    #[test]
    fn a_lane_with_outcomes_keeps_its_entries_up_to_the_draining_age() {
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let (stalled, draining) = (Duration::from_millis(10), Duration::from_millis(100));
        let mut f = Fresh::default();
        let (e1, e2) = (new_event_id(), new_event_id());
        f.add(e1, 1000, &[a, b], 0..2);
        f.add(e2, 1005, &[a, b], 0..2);
        let aged = |f: &Fresh, now: u64, limit: usize| {
            let mut v = f.aged(now, stalled, draining, limit);
            v.sort();
            v
        };
        let sorted = |mut v: Vec<Entry>| {
            v.sort();
            v
        };
        // No outcome in either lane since they began (1000): what waits past 10 ms goes.
        assert!(aged(&f, 1010, 100).is_empty());
        assert_eq!(
            aged(&f, 1011, 100),
            sorted(vec![
                (a, 1000, delivery_id(&e1, 0)),
                (b, 1000, delivery_id(&e1, 1))
            ])
        );
        // An outcome in lane a: it drains, and keeps its entries until they wait 100 ms.
        assert!(f.take(&a, 1000, &delivery_id(&e1, 0)));
        f.progressed(&a, 1011);
        assert_eq!(
            aged(&f, 1020, 100),
            sorted(vec![
                (b, 1000, delivery_id(&e1, 1)),
                (b, 1005, delivery_id(&e2, 1))
            ])
        );
        // Still draining at 1106 (an outcome at 1100), but e2's entry has waited 101 ms.
        f.progressed(&a, 1100);
        f.progressed(&a, 0);
        assert_eq!(
            aged(&f, 1106, 100),
            sorted(vec![
                (a, 1005, delivery_id(&e2, 0)),
                (b, 1000, delivery_id(&e1, 1)),
                (b, 1005, delivery_id(&e2, 1)),
            ])
        );
        // At 1105 it has not: only the stalled lane's.
        assert_eq!(aged(&f, 1105, 100).len(), 2);
        // At most about `limit` at once; nothing left until taken.
        assert_eq!(aged(&f, 1106, 1).len(), 1);
        assert_eq!(f.len(), 3);
        // A lane that empties and begins again begins stalled-free from its new entry.
        assert!(f.take(&a, 1005, &delivery_id(&e2, 0)));
        let e3 = new_event_id();
        f.add(e3, 2000, &[a], 0..1);
        assert!(aged(&f, 2010, 100).iter().all(|(s, _, _)| *s == b));
        assert!(aged(&f, 2011, 100).contains(&(a, 2000, delivery_id(&e3, 0))));
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
        assert_eq!(f.over_max(7, 100), two);
        // An event with an entry gone counts for what it has left.
        let first = delivery_id(&events[0], 0);
        assert!(f.take(&subs[0], 0, &first));
        assert_eq!(f.over_max(8, 100), two);
        assert_eq!(f.over_max(9, 100), two[..1]);
        // About `limit` entries at once, in whole events.
        assert_eq!(f.over_max(0, 1), two[..1]);
        assert_eq!(f.over_max(0, 3), two);
        let all = f.created_before(u64::MAX >> 16);
        assert_eq!(all.len(), 11);
        assert!(!all.contains(&first));
    }
}
