//! Live counters of one worker, read by the status line and by embedders.
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;

#[derive(Default)]
pub struct Metrics {
    pub consumed: AtomicU64,
    pub predicted: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub batches: AtomicU64,
    pub batched_frames: AtomicU64,
    pub delivery_failures: AtomicU64,
    /// Errors the consumer reported instead of a frame (logged; see the worker's log).
    pub consume_errors: AtomicU64,
    /// Input partitions this worker currently owns.
    pub assigned_partitions: AtomicUsize,
    /// Frames behind the log end over assigned partitions (from librdkafka statistics), -1 unknown.
    pub lag: AtomicI64,
    /// Produce timestamp -> acknowledged, ms: since start, and since the last status line.
    latency: Mutex<Option<Latency>>,
}

struct Latency {
    total: hdrhistogram::Histogram<u64>,
    window: hdrhistogram::Histogram<u64>,
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Snapshot {
    pub consumed: u64,
    pub predicted: u64,
    pub dead_lettered: u64,
    pub batches: u64,
    pub batched_frames: u64,
    pub delivery_failures: u64,
    pub consume_errors: u64,
    pub lag: i64,
    pub latency_p50_ms: u64,
    pub latency_p99_ms: u64,
}

impl Snapshot {
    pub fn mean_batch(&self) -> f64 {
        if self.batches == 0 {
            0.0
        } else {
            self.batched_frames as f64 / self.batches as f64
        }
    }
}

impl Metrics {
    pub fn new() -> Self {
        Metrics { lag: AtomicI64::new(-1), ..Default::default() }
    }

    pub fn record_latency(&self, ms: i64) {
        let mut guard = self.latency.lock().unwrap();
        let l = guard.get_or_insert_with(|| {
            let h = hdrhistogram::Histogram::new_with_bounds(1, 3_600_000, 2).expect("valid histogram bounds");
            Latency { total: h.clone(), window: h }
        });
        let ms = ms.max(1) as u64;
        l.total.saturating_record(ms);
        l.window.saturating_record(ms);
    }

    /// Latency p50 and p99 (ms) since the previous call; `None` when nothing was acknowledged.
    pub fn take_window_latency(&self) -> Option<(u64, u64)> {
        let mut guard = self.latency.lock().unwrap();
        let w = &mut guard.as_mut()?.window;
        let out = (!w.is_empty()).then(|| (w.value_at_quantile(0.5), w.value_at_quantile(0.99)));
        w.reset();
        out
    }

    pub fn snapshot(&self) -> Snapshot {
        let (p50, p99) = match &*self.latency.lock().unwrap() {
            Some(l) => (l.total.value_at_quantile(0.5), l.total.value_at_quantile(0.99)),
            None => (0, 0),
        };
        Snapshot {
            consumed: self.consumed.load(Relaxed),
            predicted: self.predicted.load(Relaxed),
            dead_lettered: self.dead_lettered.load(Relaxed),
            batches: self.batches.load(Relaxed),
            batched_frames: self.batched_frames.load(Relaxed),
            delivery_failures: self.delivery_failures.load(Relaxed),
            consume_errors: self.consume_errors.load(Relaxed),
            lag: self.lag.load(Relaxed),
            latency_p50_ms: p50,
            latency_p99_ms: p99,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_window_latency_resets_but_the_total_does_not() {
        let m = Metrics::new();
        assert_eq!(m.take_window_latency(), None);
        for ms in [10, 20, 30, 1000] {
            m.record_latency(ms);
        }
        let (p50, p99) = m.take_window_latency().unwrap();
        assert!((19..=21).contains(&p50) && p99 >= 990, "{p50} {p99}");
        assert_eq!(m.take_window_latency(), None, "the window starts empty again");
        let s = m.snapshot();
        assert!((19..=21).contains(&s.latency_p50_ms), "{s:?}");
    }
}
