//! At-least-once bookkeeping. A frame is "in flight" from the moment it is polled until its
//! prediction (or dead letter) is acknowledged by the broker. The offset that may be stored
//! for a partition is the lowest offset still in flight (or one past the highest seen): every
//! frame before it has a durable result, whatever order the acknowledgements came in.
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(Default)]
struct PartitionState {
    in_flight: BTreeSet<i64>,
    next_unseen: i64,
    last_stored: i64,
    /// Since when the oldest frame in flight has waited for its result (or since the last
    /// result before it); `None` with nothing in flight. The stall watchdog reads it.
    waiting_since: Option<Instant>,
}

#[derive(Default)]
struct State {
    partitions: HashMap<i32, PartitionState>,
    in_flight: usize,
}

/// Tracks in-flight frames per partition of the input topic.
#[derive(Default)]
pub struct OffsetTracker {
    state: Mutex<State>,
    room: Condvar,
    /// Threads inside [`wait_below`](Self::wait_below) (lets a test know a waiter is parked).
    waiters: AtomicUsize,
}

impl OffsetTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// A frame was polled.
    pub fn begin(&self, partition: i32, offset: i64) {
        let mut s = self.state.lock().unwrap();
        let p = s.partitions.entry(partition).or_insert_with(|| PartitionState {
            next_unseen: offset,
            last_stored: offset,
            ..Default::default()
        });
        if p.in_flight.insert(offset) {
            p.next_unseen = p.next_unseen.max(offset + 1);
            p.waiting_since.get_or_insert_with(Instant::now);
            s.in_flight += 1;
        }
    }

    /// A frame's result was acknowledged. Unknown frames (of a partition revoked meanwhile) are ignored.
    pub fn done(&self, partition: i32, offset: i64) {
        let mut s = self.state.lock().unwrap();
        let removed = s.partitions.get_mut(&partition).is_some_and(|p| {
            let oldest = p.in_flight.first() == Some(&offset);
            let removed = p.in_flight.remove(&offset);
            if p.in_flight.is_empty() {
                p.waiting_since = None;
            } else if oldest {
                p.waiting_since = Some(Instant::now());
            }
            removed
        });
        if removed {
            s.in_flight -= 1;
            self.room.notify_all();
        }
    }

    /// Offsets (the next offset to consume, as Kafka commits them) that advanced since the last
    /// store that succeeded. They stay here until [`stored`](Self::stored) confirms them, so a
    /// store that failed is tried again.
    pub fn committable(&self) -> Vec<(i32, i64)> {
        let s = self.state.lock().unwrap();
        let mut out = Vec::new();
        for (&partition, p) in s.partitions.iter() {
            let next = p.in_flight.first().copied().unwrap_or(p.next_unseen);
            if next > p.last_stored {
                out.push((partition, next));
            }
        }
        out.sort_unstable();
        out
    }

    /// These offsets were stored (for the next commit).
    pub fn stored(&self, offsets: &[(i32, i64)]) {
        let mut s = self.state.lock().unwrap();
        for &(partition, next) in offsets {
            if let Some(p) = s.partitions.get_mut(&partition) {
                p.last_stored = p.last_stored.max(next);
            }
        }
    }

    /// Partitions taken away by a rebalance: their in-flight frames no longer count.
    pub fn forget(&self, partitions: &[i32]) {
        let mut s = self.state.lock().unwrap();
        for partition in partitions {
            if let Some(p) = s.partitions.remove(partition) {
                s.in_flight -= p.in_flight.len();
            }
        }
        self.room.notify_all();
    }

    /// Wakes waiters of [`wait_below`](Self::wait_below) early (the inference thread stopped).
    pub fn wake(&self) {
        self.room.notify_all();
    }

    /// Partitions whose oldest frame in flight has waited at least `limit` for a result, with
    /// no result of that partition in between.
    pub fn waiting_longer_than(&self, limit: Duration) -> Vec<i32> {
        let s = self.state.lock().unwrap();
        let mut out: Vec<i32> = s
            .partitions
            .iter()
            .filter(|(_, p)| p.waiting_since.is_some_and(|t| t.elapsed() >= limit))
            .map(|(&partition, _)| partition)
            .collect();
        out.sort_unstable();
        out
    }

    pub fn in_flight(&self) -> usize {
        self.state.lock().unwrap().in_flight
    }

    /// Waits until fewer than `limit` frames are in flight, or `timeout` passes.
    pub fn wait_below(&self, limit: usize, timeout: Duration) -> bool {
        let s = self.state.lock().unwrap();
        self.waiters.fetch_add(1, SeqCst);
        let (s, _) = self.room.wait_timeout_while(s, timeout, |s| s.in_flight >= limit).unwrap();
        self.waiters.fetch_sub(1, SeqCst);
        s.in_flight < limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_only_below_the_oldest_unacknowledged_frame() {
        let t = OffsetTracker::new();
        for o in 10..15 {
            t.begin(0, o);
        }
        assert!(t.committable().is_empty());
        t.done(0, 11);
        t.done(0, 12);
        assert!(t.committable().is_empty(), "10 is still in flight");
        t.done(0, 10);
        assert_eq!(t.committable(), vec![(0, 13)]);
        t.stored(&[(0, 13)]);
        assert!(t.committable().is_empty(), "no change, nothing new to store");
        t.done(0, 14);
        t.done(0, 13);
        assert_eq!(t.committable(), vec![(0, 15)]);
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn partitions_are_independent_and_revocation_forgets() {
        let t = OffsetTracker::new();
        t.begin(0, 0);
        t.begin(1, 100);
        t.done(1, 100);
        assert_eq!(t.committable(), vec![(1, 101)]);
        t.stored(&[(1, 101)]);
        assert_eq!(t.in_flight(), 1);
        t.forget(&[0]);
        assert_eq!(t.in_flight(), 0);
        t.done(0, 0); // late acknowledgement of a revoked partition
        assert_eq!(t.in_flight(), 0);
        assert!(t.committable().is_empty());
    }

    #[test]
    fn a_failed_store_is_offered_again() {
        let t = OffsetTracker::new();
        t.begin(3, 7);
        t.done(3, 7);
        assert_eq!(t.committable(), vec![(3, 8)]);
        // The store failed: nothing confirmed, so the same offset is offered on the next turn.
        assert_eq!(t.committable(), vec![(3, 8)]);
        t.begin(3, 8);
        t.stored(&[(3, 8)]);
        assert!(t.committable().is_empty());
        t.stored(&[(3, 5)]); // an older confirmation never moves the mark back
        t.done(3, 8);
        assert_eq!(t.committable(), vec![(3, 9)]);
    }

    #[test]
    fn a_partition_waits_from_its_oldest_frame_and_a_result_restarts_the_clock() {
        let t = OffsetTracker::new();
        let zero = Duration::ZERO;
        assert!(t.waiting_longer_than(zero).is_empty());
        t.begin(0, 5);
        t.begin(0, 6);
        t.begin(1, 9);
        assert_eq!(t.waiting_longer_than(zero), vec![0, 1]);
        assert!(t.waiting_longer_than(Duration::from_secs(3600)).is_empty());
        t.done(1, 9);
        assert_eq!(t.waiting_longer_than(zero), vec![0], "nothing in flight on 1");
        t.done(0, 5);
        let s = t.state.lock().unwrap();
        let since = s.partitions[&0].waiting_since.unwrap();
        assert!(since.elapsed() < Duration::from_secs(60), "the result of 5 restarted the clock for 6");
    }

    #[test]
    fn wait_below_wakes_on_done() {
        let t = std::sync::Arc::new(OffsetTracker::new());
        t.begin(0, 0);
        assert!(!t.wait_below(1, Duration::from_millis(10)));
        let t2 = t.clone();
        let h = std::thread::spawn(move || {
            let started = std::time::Instant::now();
            (t2.wait_below(1, Duration::from_secs(30)), started.elapsed())
        });
        // Once the waiter is counted and the lock is free again, it is parked on the condition
        // variable: only the notification in `done` can wake it before its 30 s run out.
        while t.waiters.load(SeqCst) == 0 {
            std::thread::yield_now();
        }
        drop(t.state.lock().unwrap());
        t.done(0, 0);
        let (woken, waited) = h.join().unwrap();
        assert!(woken && waited < Duration::from_secs(20), "woken {woken} after {waited:?}");
    }
}
