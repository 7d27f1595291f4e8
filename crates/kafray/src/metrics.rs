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
    /// Input partitions this worker currently owns.
    pub assigned_partitions: AtomicUsize,
    /// Frames behind the log end over assigned partitions (from librdkafka statistics), -1 unknown.
    pub lag: AtomicI64,
    /// Produce timestamp -> acknowledged, ms.
    latency: Mutex<Option<hdrhistogram::Histogram<u64>>>,
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
    pub lag: i64,
    pub latency_p50_ms: u64,
    pub latency_p99_ms: u64,
}

impl Snapshot {
    pub fn mean_batch(&self) -> f64 {
        if self.batches == 0 { 0.0 } else { self.batched_frames as f64 / self.batches as f64 }
    }
}

impl Metrics {
    pub fn new() -> Self {
        Metrics { lag: AtomicI64::new(-1), ..Default::default() }
    }

    pub fn record_latency(&self, ms: i64) {
        let mut h = self.latency.lock().unwrap();
        let h = h.get_or_insert_with(|| hdrhistogram::Histogram::new_with_bounds(1, 3_600_000, 2).unwrap());
        h.saturating_record(ms.max(1) as u64);
    }

    pub fn snapshot(&self) -> Snapshot {
        let (p50, p99) = match &*self.latency.lock().unwrap() {
            Some(h) => (h.value_at_quantile(0.5), h.value_at_quantile(0.99)),
            None => (0, 0),
        };
        Snapshot {
            consumed: self.consumed.load(Relaxed),
            predicted: self.predicted.load(Relaxed),
            dead_lettered: self.dead_lettered.load(Relaxed),
            batches: self.batches.load(Relaxed),
            batched_frames: self.batched_frames.load(Relaxed),
            delivery_failures: self.delivery_failures.load(Relaxed),
            lag: self.lag.load(Relaxed),
            latency_p50_ms: p50,
            latency_p99_ms: p99,
        }
    }
}
