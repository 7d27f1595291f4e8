//! At-least-once bookkeeping. A frame is "in flight" from the moment it is polled until its
//! prediction (or dead letter) is acknowledged by the broker. The offset that may be stored
//! for a partition is the lowest offset still in flight (or one past the highest seen): every
//! frame before it has a durable result, whatever order the acknowledgements came in.
use std::collections::{BTreeSet, HashMap};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

#[derive(Default)]
struct PartitionState {
    in_flight: BTreeSet<i64>,
    next_unseen: i64,
    last_stored: i64,
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
            s.in_flight += 1;
        }
    }

    /// A frame's result was acknowledged. Unknown frames (of a partition revoked meanwhile) are ignored.
    pub fn done(&self, partition: i32, offset: i64) {
        let mut s = self.state.lock().unwrap();
        let removed = s.partitions.get_mut(&partition).is_some_and(|p| p.in_flight.remove(&offset));
        if removed {
            s.in_flight -= 1;
            self.room.notify_all();
        }
    }

    /// Offsets (the next offset to consume, as Kafka commits them) that advanced since the last call.
    pub fn take_committable(&self) -> Vec<(i32, i64)> {
        let mut s = self.state.lock().unwrap();
        let mut out = Vec::new();
        for (&partition, p) in s.partitions.iter_mut() {
            let next = p.in_flight.first().copied().unwrap_or(p.next_unseen);
            if next > p.last_stored {
                p.last_stored = next;
                out.push((partition, next));
            }
        }
        out
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

    pub fn in_flight(&self) -> usize {
        self.state.lock().unwrap().in_flight
    }

    /// Waits until fewer than `limit` frames are in flight, or `timeout` passes.
    pub fn wait_below(&self, limit: usize, timeout: Duration) -> bool {
        let s = self.state.lock().unwrap();
        let (s, _) = self.room.wait_timeout_while(s, timeout, |s| s.in_flight >= limit).unwrap();
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
        assert!(t.take_committable().is_empty());
        t.done(0, 11);
        t.done(0, 12);
        assert!(t.take_committable().is_empty(), "10 is still in flight");
        t.done(0, 10);
        assert_eq!(t.take_committable(), vec![(0, 13)]);
        assert!(t.take_committable().is_empty(), "no change, nothing new to store");
        t.done(0, 14);
        t.done(0, 13);
        assert_eq!(t.take_committable(), vec![(0, 15)]);
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn partitions_are_independent_and_revocation_forgets() {
        let t = OffsetTracker::new();
        t.begin(0, 0);
        t.begin(1, 100);
        t.done(1, 100);
        assert_eq!(t.take_committable(), vec![(1, 101)]);
        assert_eq!(t.in_flight(), 1);
        t.forget(&[0]);
        assert_eq!(t.in_flight(), 0);
        t.done(0, 0); // late acknowledgement of a revoked partition
        assert_eq!(t.in_flight(), 0);
        assert!(t.take_committable().is_empty());
    }

    #[test]
    fn wait_below_wakes_on_done() {
        let t = std::sync::Arc::new(OffsetTracker::new());
        t.begin(0, 0);
        assert!(!t.wait_below(1, Duration::from_millis(10)));
        let t2 = t.clone();
        let h = std::thread::spawn(move || t2.wait_below(1, Duration::from_secs(10)));
        std::thread::sleep(Duration::from_millis(20));
        t.done(0, 0);
        assert!(h.join().unwrap());
    }
}
