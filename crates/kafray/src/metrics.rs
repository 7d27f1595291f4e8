//! Live counters of one worker, read by the status line and by embedders.
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use serde::Serialize;
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
    /// Dead letters by [`DeadLetterReason`] (indexed by it).
    pub dead_lettered_by: [AtomicU64; DeadLetterReason::ALL.len()],
    /// Dead letters published without the frame's value, which was too large to republish.
    pub dead_letter_fallbacks: AtomicU64,
    /// Times polling waited because `max_in_flight` frames were in flight (a long wait also
    /// pauses the partitions).
    pub backpressure_pauses: AtomicU64,
    /// Times the worker started again after its results could not be delivered (see
    /// [`crate::Error::Delivery`]). Ray's restarts of an actor are added in `kafray.ray`'s stats.
    pub restarts: AtomicU64,
    /// Frames polled and not yet acknowledged.
    pub in_flight: AtomicUsize,
    /// Frames behind the log end per assigned partition (librdkafka statistics).
    pub partition_lag: Mutex<Vec<(i32, i64)>>,
    /// Frames not yet fetched per assigned partition: the last stable offset less the
    /// consumer's position (librdkafka statistics). Unlike the lag, it falls to 0 when the
    /// worker has read everything, even past a transaction marker it never stores.
    pub partition_backlog: Mutex<Vec<(i32, i64)>>,
    /// Distributions for the Prometheus endpoint.
    pub histograms: Histograms,
    /// Errors the consumer reported instead of a frame (logged; see the worker's log).
    pub consume_errors: AtomicU64,
    /// Input partitions this worker currently owns.
    pub assigned_partitions: AtomicUsize,
    /// The group has given this worker an assignment (maybe empty): it is a member now.
    pub joined: std::sync::atomic::AtomicBool,
    /// Where the Prometheus endpoint listens, once it does (`host:port`).
    pub endpoint: Mutex<Option<String>>,
    /// Rebalances that assigned partitions to this worker or took some away.
    pub rebalances: AtomicU64,
    /// Frames behind the log end over assigned partitions (from librdkafka statistics), -1 unknown.
    pub lag: AtomicI64,
    /// The batching policy's current batch limit (steered under a latency target).
    pub batch_limit: AtomicUsize,
    /// Where the worker's two threads spend their time, µs summed (see [`Stages`]).
    pub stages: StageTimers,
    /// Where each frame's latency goes, µs summed over frames (see [`FrameTimes`]).
    pub frame_times: FrameTimers,
    /// Produce timestamp -> acknowledged, ms: since start, and since the last status line.
    latency: Mutex<Option<Latency>>,
    /// The frame whose delivery failed for good last (partition, offset), if one did.
    pub delivery_failed_at: Mutex<Option<(i32, i64)>>,
    /// Per input partition: the highest next offset stored for commit (the restart budget's
    /// measure of progress past a frame that failed).
    pub stored_offsets: Mutex<std::collections::HashMap<i32, i64>>,
    /// Owned partitions stalled now (see [`crate::config::WorkerConfig::stall_after_s`]).
    pub stalled_partitions: Mutex<Vec<i32>>,
    /// Times a partition was found stalled.
    pub partition_stalls: AtomicU64,
    /// What the worker is doing, for its status, `/healthz` and `/readyz`.
    pub health: Mutex<Health>,
}

/// A worker's state, as Kubernetes-style probes and the controller see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerState {
    /// Loading and warming the model, joining the group.
    #[default]
    Starting,
    /// The model is loaded and warmed, and the worker is a member of its group.
    Ready,
    /// Running, with a problem named in the reason: backpressure held too long, a partition
    /// stalled, the broker unreachable.
    Degraded,
    /// Finishing what is in flight after a stop request.
    Draining,
    /// Stopped by an error (the reason names it).
    Failed,
    /// Stopped cleanly.
    Stopped,
}

impl WorkerState {
    pub const ALL: [WorkerState; 6] = [
        WorkerState::Starting,
        WorkerState::Ready,
        WorkerState::Degraded,
        WorkerState::Draining,
        WorkerState::Failed,
        WorkerState::Stopped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Starting => "starting",
            WorkerState::Ready => "ready",
            WorkerState::Degraded => "degraded",
            WorkerState::Draining => "draining",
            WorkerState::Failed => "failed",
            WorkerState::Stopped => "stopped",
        }
    }

    /// Liveness: alive unless failed (`/healthz` also fails while a partition is stalled).
    pub fn live(self) -> bool {
        self != WorkerState::Failed
    }

    /// Readiness: doing its work (degraded still is, and says why).
    pub fn ready(self) -> bool {
        matches!(self, WorkerState::Ready | WorkerState::Degraded)
    }
}

/// The state with why, and since when.
#[derive(Debug, Clone, PartialEq)]
pub struct Health {
    pub state: WorkerState,
    /// Why it is degraded or failed; `None` otherwise.
    pub reason: Option<String>,
    pub since: std::time::Instant,
}

impl Default for Health {
    fn default() -> Self {
        Health { state: WorkerState::Starting, reason: None, since: std::time::Instant::now() }
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").field("snapshot", &self.snapshot()).finish_non_exhaustive()
    }
}

/// Why a frame went to the dead-letter topic, as a class (the reason text says more).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterReason {
    /// It did not decode, or did not fit the model's input.
    Undecodable = 0,
    /// The model failed on it alone.
    ModelFailed = 1,
    /// Its prediction is larger than the producer may send.
    ResultTooLarge = 2,
    /// The broker refused its prediction.
    ResultRefused = 3,
}

impl DeadLetterReason {
    pub const ALL: [DeadLetterReason; 4] =
        [Self::Undecodable, Self::ModelFailed, Self::ResultTooLarge, Self::ResultRefused];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Undecodable => "undecodable",
            Self::ModelFailed => "model_failed",
            Self::ResultTooLarge => "result_too_large",
            Self::ResultRefused => "result_refused",
        }
    }
}

/// The parts of a prediction's path, as `kafray_stage_seconds` labels them.
pub const STAGES: [&str; 5] = ["fetch", "decode", "queue", "infer", "ack"];

/// The `stage` label of a stage histogram.
pub type StageLabel = [(&'static str, &'static str); 1];

/// Histograms as Prometheus has them (cumulative buckets), in seconds or frames.
#[derive(Debug)]
pub struct Histograms {
    /// Record timestamp -> the prediction acknowledged.
    pub latency_seconds: Histogram,
    /// Each part of a prediction's path, labelled by [`STAGES`].
    pub stage_seconds: Family<StageLabel, Histogram, fn() -> Histogram>,
    /// The family's histograms in [`STAGES`] order, looked up once rather than per frame.
    stages: [Histogram; STAGES.len()],
    /// Frames per batch given to the model.
    pub batch_size: Histogram,
}

fn seconds_histogram() -> Histogram {
    // 0.5 ms .. about 65 s, doubling.
    Histogram::new(exponential_buckets(0.0005, 2.0, 18))
}

impl Default for Histograms {
    fn default() -> Self {
        let stage_seconds: Family<StageLabel, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(seconds_histogram);
        // A histogram is a shared handle: observing the clone observes the family's member.
        let stages = STAGES.map(|stage| stage_seconds.get_or_create(&[("stage", stage)]).clone());
        Histograms {
            latency_seconds: seconds_histogram(),
            stage_seconds,
            stages,
            batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 13)),
        }
    }
}

struct Latency {
    total: hdrhistogram::Histogram<u64>,
    window: hdrhistogram::Histogram<u64>,
}

/// Time spent per stage, µs summed since start. The intake thread polls, decodes and fills the
/// batch being built; the inference thread waits for a batch, infers, and hands predictions to
/// the producer. Each thread's stages add up to about its wall time, so a bottleneck shows as the busy one.
#[derive(Default)]
pub struct StageTimers {
    pub poll_us: AtomicU64,
    pub decode_us: AtomicU64,
    pub handoff_us: AtomicU64,
    pub idle_us: AtomicU64,
    pub infer_us: AtomicU64,
    pub produce_us: AtomicU64,
}

/// Each frame's path from its record timestamp to the broker's acknowledgement of its result,
/// µs summed over acknowledged predictions: divided by `frames`, the mean of each part.
#[derive(Default)]
pub struct FrameTimers {
    pub frames: AtomicU64,
    pub fetch_us: AtomicU64,
    pub decode_us: AtomicU64,
    pub queue_us: AtomicU64,
    pub infer_us: AtomicU64,
    pub ack_us: AtomicU64,
}

/// A copy of [`FrameTimers`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct FrameTimes {
    /// Frames counted (predictions acknowledged).
    pub frames: u64,
    /// Record timestamp -> polled by the worker: the producer's linger, the broker, the fetch
    /// (a held fetch included) and librdkafka's queue. Millisecond timestamps: +-1 ms per frame.
    #[serde(rename = "fetch")]
    pub fetch_us: u64,
    /// Decoding and preprocessing.
    #[serde(rename = "decode")]
    pub decode_us: u64,
    /// Decoded -> its batch dispatched: waiting while the model runs the batch before.
    #[serde(rename = "queue")]
    pub queue_us: u64,
    /// Its batch in the model.
    #[serde(rename = "infer")]
    pub infer_us: u64,
    /// Inferred -> the broker acknowledged the prediction (serialising, producing, the ack).
    #[serde(rename = "ack")]
    pub ack_us: u64,
}

impl FrameTimers {
    pub fn snapshot(&self) -> FrameTimes {
        FrameTimes {
            frames: self.frames.load(Relaxed),
            fetch_us: self.fetch_us.load(Relaxed),
            decode_us: self.decode_us.load(Relaxed),
            queue_us: self.queue_us.load(Relaxed),
            infer_us: self.infer_us.load(Relaxed),
            ack_us: self.ack_us.load(Relaxed),
        }
    }
}

/// What [`Metrics::frame_done`] needs about a frame, carried with its prediction to the ack.
#[derive(Debug, Clone, Copy)]
pub struct FrameTiming {
    pub fetch_us: u64,
    pub decode_us: u64,
    pub queue_us: u64,
    pub infer_us: u64,
    pub inferred_at: std::time::Instant,
}

/// A copy of [`StageTimers`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Stages {
    /// Intake: waiting in the consumer's poll (for frames, or for acknowledgements to make room).
    #[serde(rename = "poll")]
    pub poll_us: u64,
    /// Intake: decoding and preprocessing frames into the batch.
    #[serde(rename = "decode")]
    pub decode_us: u64,
    /// Intake: waiting for room, while the batch being built is at the limit and the model busy.
    #[serde(rename = "handoff")]
    pub handoff_us: u64,
    /// Inference: waiting for a batch.
    #[serde(rename = "idle")]
    pub idle_us: u64,
    /// Inference: running the model.
    #[serde(rename = "infer")]
    pub infer_us: u64,
    /// Inference: serialising predictions and handing them to the producer.
    #[serde(rename = "produce")]
    pub produce_us: u64,
}

impl StageTimers {
    /// Adds the time since `since` to `counter`, and returns now for the next stage.
    pub fn add(counter: &AtomicU64, since: std::time::Instant) -> std::time::Instant {
        let now = std::time::Instant::now();
        counter.fetch_add(now.duration_since(since).as_micros() as u64, Relaxed);
        now
    }

    pub fn snapshot(&self) -> Stages {
        Stages {
            poll_us: self.poll_us.load(Relaxed),
            decode_us: self.decode_us.load(Relaxed),
            handoff_us: self.handoff_us.load(Relaxed),
            idle_us: self.idle_us.load(Relaxed),
            infer_us: self.infer_us.load(Relaxed),
            produce_us: self.produce_us.load(Relaxed),
        }
    }
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Snapshot {
    pub consumed: u64,
    pub predicted: u64,
    pub dead_lettered: u64,
    pub batches: u64,
    pub batched_frames: u64,
    pub delivery_failures: u64,
    pub dead_letter_fallbacks: u64,
    pub restarts: u64,
    pub consume_errors: u64,
    pub rebalances: u64,
    pub lag: i64,
    pub batch_limit: usize,
    pub latency_p50_ms: u64,
    pub latency_p99_ms: u64,
    #[serde(rename = "stages_us")]
    pub stages: Stages,
    #[serde(rename = "frame_us")]
    pub frame_times: FrameTimes,
}

/// What a worker says about itself (the Python `Worker.stats()`), as one serialised record: its
/// counters ([`Snapshot`], flattened) with its state, identity and health. The names are a
/// contract: the Ray controller, `kafray-ray stats` and the benchmarks read them (and the
/// benchmarks' Python peer reports the same names for what it has).
#[derive(Debug, Clone, Serialize)]
pub struct WorkerStats {
    pub worker_id: String,
    /// Where the model runs (`auto` resolved), once loaded.
    pub device: Option<String>,
    /// From start until the worker thread ends (after a stop, or on a fatal error).
    pub running: bool,
    /// Why the worker failed, and whose error that is: `user`, `external` or `internal`.
    pub error: Option<String>,
    pub error_kind: Option<crate::ErrorKind>,
    pub uptime_s: f64,
    pub state: WorkerState,
    /// Why the worker is degraded or failed.
    pub state_reason: Option<String>,
    /// Owned partitions with frames and no progress for `stall_after_s`.
    pub stalled_partitions: Vec<i32>,
    /// Times a partition was found stalled.
    pub partition_stalls: u64,
    /// A member of its group now.
    pub joined: bool,
    pub assigned_partitions: usize,
    /// `host:port` of `/metrics` and the probes, when served.
    pub metrics_endpoint: Option<String>,
    /// Every latency since start as (ms, count) per histogram bucket, to merge over workers.
    pub latency_ms_counts: Vec<(u64, u64)>,
    pub mean_batch: f64,
    #[serde(flatten)]
    pub counters: Snapshot,
}

/// How the worker's owner sees it: what [`Metrics`] cannot know.
#[derive(Debug, Clone, Default)]
pub struct Owner {
    pub worker_id: String,
    pub device: Option<String>,
    pub running: bool,
    pub error: Option<(crate::ErrorKind, String)>,
    pub uptime_s: f64,
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

    pub fn health(&self) -> Health {
        self.health.lock().unwrap().clone()
    }

    /// Moves to `state`; logs a change of state or of reason (`since` counts from the state's start).
    pub fn set_state(&self, state: WorkerState, reason: Option<String>) {
        let mut health = self.health.lock().unwrap();
        if health.state == state && health.reason == reason {
            return;
        }
        let since = if health.state == state { health.since } else { std::time::Instant::now() };
        // A worker that failed or stopped stays so: only a new worker starts again.
        if matches!(health.state, WorkerState::Failed | WorkerState::Stopped) && state != WorkerState::Failed {
            return;
        }
        match (&reason, state) {
            (Some(why), WorkerState::Failed) => tracing::error!("worker {}: {why}", state.as_str()),
            // Joining is the normal way in, not a warning (the demo's first lines showed it as one).
            (Some(why), WorkerState::Starting) => tracing::info!("worker {}: {why}", state.as_str()),
            (Some(why), _) => tracing::warn!("worker {}: {why}", state.as_str()),
            (None, _) => tracing::info!("worker {}", state.as_str()),
        }
        *health = Health { state, reason, since };
    }

    /// `partition`'s offsets were stored up to `next`.
    pub fn progressed(&self, partition: i32, next: i64) {
        let mut stored = self.stored_offsets.lock().unwrap();
        let highest = stored.entry(partition).or_insert(next);
        *highest = (*highest).max(next);
    }

    /// A prediction was acknowledged: adds its frame's path to [`FrameTimers`].
    pub fn frame_done(&self, t: &FrameTiming) {
        let f = &self.frame_times;
        f.frames.fetch_add(1, Relaxed);
        f.fetch_us.fetch_add(t.fetch_us, Relaxed);
        f.decode_us.fetch_add(t.decode_us, Relaxed);
        f.queue_us.fetch_add(t.queue_us, Relaxed);
        f.infer_us.fetch_add(t.infer_us, Relaxed);
        let ack_us = t.inferred_at.elapsed().as_micros() as u64;
        f.ack_us.fetch_add(ack_us, Relaxed);
        let times = [t.fetch_us, t.decode_us, t.queue_us, t.infer_us, ack_us];
        for (histogram, us) in self.histograms.stages.iter().zip(times) {
            histogram.observe(us as f64 / 1e6);
        }
    }

    pub fn record_latency(&self, ms: i64) {
        let mut guard = self.latency.lock().unwrap();
        let l = guard.get_or_insert_with(|| {
            let h = hdrhistogram::Histogram::new_with_bounds(1, 3_600_000, 2).expect("valid histogram bounds");
            Latency { total: h.clone(), window: h }
        });
        self.histograms.latency_seconds.observe(ms.max(0) as f64 / 1000.0);
        let ms = ms.max(1) as u64;
        l.total.saturating_record(ms);
        l.window.saturating_record(ms);
    }

    /// Latency p50 and p99 (ms) since the previous call; `None` when nothing was acknowledged.
    /// Every latency recorded since start as (ms, count) pairs, one per histogram bucket: the
    /// workers' histograms merge exactly by adding counts (a cluster's percentiles from them).
    pub fn latency_counts(&self) -> Vec<(u64, u64)> {
        match &*self.latency.lock().unwrap() {
            Some(l) => l.total.iter_recorded().map(|v| (v.value_iterated_to(), v.count_at_value())).collect(),
            None => Vec::new(),
        }
    }

    pub fn take_window_latency(&self) -> Option<(u64, u64)> {
        let mut guard = self.latency.lock().unwrap();
        let w = &mut guard.as_mut()?.window;
        let out = (!w.is_empty()).then(|| (w.value_at_quantile(0.5), w.value_at_quantile(0.99)));
        w.reset();
        out
    }

    /// The worker's stats: `counters` (live, or the last of a finished worker) with what the
    /// metrics know of its health and what its `owner` knows.
    pub fn stats(&self, counters: Snapshot, owner: Owner) -> WorkerStats {
        let health = self.health();
        let (error_kind, error) = owner.error.map_or((None, None), |(kind, why)| (Some(kind), Some(why)));
        WorkerStats {
            worker_id: owner.worker_id,
            device: owner.device,
            running: owner.running,
            error,
            error_kind,
            uptime_s: owner.uptime_s,
            state: health.state,
            state_reason: health.reason,
            stalled_partitions: self.stalled_partitions.lock().unwrap().clone(),
            partition_stalls: self.partition_stalls.load(Relaxed),
            joined: self.joined.load(Relaxed),
            assigned_partitions: self.assigned_partitions.load(Relaxed),
            metrics_endpoint: self.endpoint.lock().unwrap().clone(),
            latency_ms_counts: self.latency_counts(),
            mean_batch: counters.mean_batch(),
            counters,
        }
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
            dead_letter_fallbacks: self.dead_letter_fallbacks.load(Relaxed),
            restarts: self.restarts.load(Relaxed),
            consume_errors: self.consume_errors.load(Relaxed),
            rebalances: self.rebalances.load(Relaxed),
            lag: self.lag.load(Relaxed),
            batch_limit: self.batch_limit.load(Relaxed),
            latency_p50_ms: p50,
            latency_p99_ms: p99,
            stages: self.stages.snapshot(),
            frame_times: self.frame_times.snapshot(),
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

    /// The names `stats()` gives are a contract (the controller, `kafray-ray stats` and the
    /// benchmarks read them): they are exactly these.
    #[test]
    fn stats_serialise_to_the_documented_names() {
        let m = Metrics::new();
        m.record_latency(12);
        let owner =
            Owner { worker_id: "w1".into(), error: Some((crate::ErrorKind::User, "bad".into())), ..Default::default() };
        let v = serde_json::to_value(m.stats(m.snapshot(), owner)).unwrap();
        let mut names: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        names.sort();
        let mut expected = vec![
            "assigned_partitions",
            "batch_limit",
            "batched_frames",
            "batches",
            "consume_errors",
            "consumed",
            "dead_letter_fallbacks",
            "dead_lettered",
            "delivery_failures",
            "device",
            "error",
            "error_kind",
            "frame_us",
            "joined",
            "lag",
            "latency_ms_counts",
            "latency_p50_ms",
            "latency_p99_ms",
            "mean_batch",
            "metrics_endpoint",
            "partition_stalls",
            "predicted",
            "rebalances",
            "restarts",
            "running",
            "stages_us",
            "stalled_partitions",
            "state",
            "state_reason",
            "uptime_s",
            "worker_id",
        ];
        expected.sort();
        assert_eq!(names, expected);
        assert_eq!(
            (v["state"].as_str(), v["error_kind"].as_str(), v["error"].as_str()),
            (Some("starting"), Some("user"), Some("bad"))
        );
        let stages: Vec<&str> = v["stages_us"].as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(stages.len(), 6);
        for stage in ["poll", "decode", "handoff", "idle", "infer", "produce"] {
            assert!(stages.contains(&stage), "{stages:?}");
        }
        for part in ["frames", "fetch", "decode", "queue", "infer", "ack"] {
            assert!(v["frame_us"].get(part).is_some(), "{part}");
        }
        assert_eq!(v["latency_ms_counts"][0][1], 1);
    }
}
