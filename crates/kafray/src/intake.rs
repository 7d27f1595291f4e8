//! The intake thread's side of a worker: poll, then decode and preprocess into the batch being
//! built (or hand the frame to the decode pool), with backpressure, offset stores, the worker's
//! health and the status line. Kept apart
//! from the wiring in [`crate::worker`] so that what happens to one polled frame reads in one place.
use crate::batch::BatchQueue;
use crate::config::WorkerConfig;
use crate::decode::{decode_one, Handoff, Polled, PoolFailure};
use crate::error::{Error, Result};
use crate::metrics::{DeadLetterReason, Health, Metrics, Snapshot, StageTimers, WorkerState};
use crate::model::ModelSpec;
use crate::offsets::OffsetTracker;
use crate::sink::{Ack, Refused, ResultSink};
use crate::source::{self, ConsumerError, FrameSource};
use crate::worker::POLL_SLICE;
use crossbeam_channel::{SendTimeoutError, Sender, TrySendError};
use rdkafka::error::KafkaError;
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// How long the input topic may be reported missing before the worker gives up on it.
const MISSING_TOPIC_GRACE: Duration = Duration::from_secs(30);
/// How often safe offsets are stored for the next auto-commit (which runs every second): every
/// 10 ms, so a commit carries what was acknowledged, without a store call per polled frame.
const STORE_EVERY: Duration = Duration::from_millis(10);
/// At `max_in_flight` the worker first just stops polling: librdkafka keeps what it prefetched,
/// and the next frame is there the moment an acknowledgement makes room. Only a hold this long
/// pauses the partitions, so that polling can go on serving the group (rebalances, the poll
/// interval). A pause is not free: librdkafka drops the prefetched frames, and after a resume
/// its fetcher wakes on its next 1 s tick (bench/backpressure.py measures the difference).
const PAUSE_AFTER: Duration = Duration::from_secs(2);
/// How often the worker's state and the stall watchdog are evaluated.
const HEALTH_EVERY: Duration = Duration::from_secs(1);
/// How long after the consumer last said the broker was unreachable the worker stays degraded
/// for it (librdkafka says so when it loses the brokers, not when it finds them again).
const BROKER_TROUBLE_WINDOW: Duration = Duration::from_secs(10);

/// Who decodes the frames the intake polls ([`crate::decode`]).
pub(crate) enum Decode<'a> {
    /// The intake itself, for this model, through one model input, before it polls the next frame.
    Inline { spec: &'a ModelSpec, tensor: Vec<f32> },
    /// A pool of decode threads, fed through `jobs`; a frame polled while every thread was busy
    /// waits in `pending`, and nothing more is polled until it is handed over.
    Pool { jobs: Option<Sender<Polled>>, pending: Option<Polled>, failure: &'a PoolFailure },
}

/// The intake thread's state: borrowed wiring, and what it tracks of partitions and health.
pub(crate) struct Intake<'a, S> {
    config: &'a WorkerConfig,
    source: &'a S,
    sink: &'a dyn ResultSink,
    tracker: &'a OffsetTracker,
    metrics: &'a Metrics,
    queue: &'a BatchQueue,
    decode: Decode<'a>,
    /// Partitions kafray paused. librdkafka keeps an application's pause across a revoke and a
    /// re-assignment, so kafray owns each pause: a partition that comes (back) is resumed unless
    /// a long hold is on, and every pause it made is undone when the hold ends.
    paused: BTreeSet<i32>,
    /// Since when `max_in_flight` frames have been in flight, while they are (backpressure).
    held_since: Option<Instant>,
    /// The partitions owned, each with when it came: the stall watchdog's clock starts there.
    owned: HashMap<i32, Instant>,
    /// The source's count of assignment changes when `owned` was last brought up to date.
    assignment_seen: Option<u64>,
    /// Since when the consumer has reported the input topic missing, without a frame between.
    input_missing_since: Option<Instant>,
    /// When the consumer last said the broker was unreachable, and what it said.
    broker_trouble: Option<(Instant, String)>,
    /// Partitions found stalled at the last health check.
    stalled: Vec<i32>,
    /// When each owned partition last gave the worker a frame.
    last_polled: HashMap<i32, Instant>,
    /// When a poll last came back empty: the consumer had nothing to give at that moment.
    last_idle_poll: Option<Instant>,
}

impl<'a, S: FrameSource> Intake<'a, S> {
    pub(crate) fn new(
        config: &'a WorkerConfig,
        source: &'a S,
        sink: &'a dyn ResultSink,
        tracker: &'a OffsetTracker,
        metrics: &'a Metrics,
        queue: &'a BatchQueue,
        decode: Decode<'a>,
    ) -> Self {
        Intake {
            config,
            source,
            sink,
            tracker,
            metrics,
            queue,
            decode,
            paused: BTreeSet::new(),
            held_since: None,
            owned: HashMap::new(),
            assignment_seen: None,
            input_missing_since: None,
            broker_trouble: None,
            stalled: Vec::new(),
            last_polled: HashMap::new(),
            last_idle_poll: None,
        }
    }

    /// Polls until `stop` is set, or until something fails or the inference thread stopped
    /// (`infer_stopped`, set however it ends).
    pub(crate) fn run(&mut self, stop: &AtomicBool, infer_stopped: &AtomicBool) -> Result<()> {
        let status_every = Duration::from_secs(self.config.status_interval_s);
        let mut status = StatusLine::new(self.metrics.snapshot());
        let (mut stored, mut checked) = (Instant::now(), Instant::now());
        while !stop.load(Relaxed) {
            if stored.elapsed() >= STORE_EVERY {
                self.store_safe();
                stored = Instant::now();
            }
            if let Some(failure) = self.sink.failure() {
                return Err(Error::Delivery(failure));
            }
            self.dead_letter_refused()?;
            if checked.elapsed() >= HEALTH_EVERY {
                self.check_health();
                checked = Instant::now();
            }
            if self.config.status_interval_s > 0 && status.at.elapsed() >= status_every {
                let health = self.metrics.health();
                status.print(
                    self.metrics.snapshot(),
                    self.metrics.take_window_latency(),
                    self.tracker.in_flight(),
                    &health,
                );
            }
            if infer_stopped.load(Relaxed) {
                return Err(Error::Internal("the inference thread stopped".into()));
            }
            let stages = &self.metrics.stages;
            if !self.room_for_a_frame()? {
                continue;
            }
            self.follow_assignment();
            let in_flight = self.tracker.in_flight();
            self.metrics.in_flight.store(in_flight, Relaxed);
            let waited = Instant::now();
            let polled = if in_flight >= self.config.max_in_flight {
                // Backpressure: wait for acknowledgements without polling, so nothing that
                // librdkafka prefetched is dropped; a long hold pauses, and polls to serve the group.
                let since = *self.held_since.get_or_insert_with(|| {
                    self.metrics.backpressure_pauses.fetch_add(1, Relaxed);
                    waited
                });
                if since.elapsed() >= PAUSE_AFTER {
                    self.pause_owned();
                }
                let room = self.tracker.wait_below(self.config.max_in_flight, POLL_SLICE);
                // A long hold polls (without waiting) even where nothing could be paused (no
                // partition owned just now): the group's rebalances must be served.
                if room || (self.paused.is_empty() && since.elapsed() < PAUSE_AFTER) {
                    StageTimers::add(&stages.poll_us, waited);
                    continue;
                }
                self.source.poll(Duration::ZERO)
            } else {
                self.release_hold();
                self.source.poll(POLL_SLICE)
            };
            StageTimers::add(&stages.poll_us, waited);
            match polled {
                Some(Ok(msg)) => {
                    self.input_missing_since = None;
                    self.accept(&msg)?
                }
                // Only with -X enable.partition.eof=true: the end of a partition, not an error.
                Some(Err(KafkaError::PartitionEOF(_))) => {}
                Some(Err(e)) => {
                    self.metrics.consume_errors.fetch_add(1, Relaxed);
                    match source::classify_error(&e) {
                        ConsumerError::Fatal => {
                            return Err(Error::External(format!(
                                "the consumer cannot go on: {e} (check the input topic {:?}, the group's and the topic's ACLs, and the broker)",
                                self.config.input_topic
                            )))
                        }
                        ConsumerError::Unreadable => {
                            return Err(Error::External(format!(
                                "the consumer cannot read a batch of the input topic {:?}: {e}. It was compressed \
                                 with a codec this build cannot decode (kafray reads none, gzip, snappy, lz4 and \
                                 zstd), or it is corrupt; librdkafka would fetch it again for ever. Fix the producer, \
                                 or move the group's offset past the batch (kafka-consumer-groups --reset-offsets)",
                                self.config.input_topic
                            )))
                        }
                        ConsumerError::TopicMissing => {
                            // At start the topic existed: it was deleted, or metadata lags after a
                            // broker restart. Only a lasting absence stops the worker.
                            let since = *self.input_missing_since.get_or_insert_with(Instant::now);
                            if since.elapsed() >= MISSING_TOPIC_GRACE {
                                return Err(Error::External(format!(
                                    "the input topic {:?} has been missing for {} s (deleted?): {e}",
                                    self.config.input_topic,
                                    MISSING_TOPIC_GRACE.as_secs()
                                )));
                            }
                            tracing::warn!("consumer: {e}");
                        }
                        ConsumerError::Unreachable => {
                            tracing::warn!("consumer: {e}");
                            self.broker_trouble = Some((Instant::now(), e.to_string()));
                        }
                        ConsumerError::Transient => tracing::warn!("consumer: {e}"),
                    }
                }
                None => self.last_idle_poll = Some(Instant::now()),
            }
        }
        Ok(())
    }

    /// Waits up to [`POLL_SLICE`] for room for one more frame; true if there is. Inline, the
    /// batch being built may be at the limit while the model runs the one before: the intake
    /// waits for the model to take it rather than read frames that could not join a batch. With
    /// a pool, a frame waiting for a decode thread is handed over first.
    fn room_for_a_frame(&mut self) -> Result<bool> {
        let handed = Instant::now();
        let room = match &mut self.decode {
            Decode::Inline { .. } => self.queue.wait_for_room(POLL_SLICE),
            Decode::Pool { jobs, pending, failure } => {
                if let Some(e) = failure.take() {
                    return Err(e);
                }
                match (pending.take(), jobs.as_ref()) {
                    (Some(frame), Some(jobs)) => match jobs.send_timeout(frame, POLL_SLICE) {
                        Ok(()) => true,
                        Err(SendTimeoutError::Timeout(frame)) => {
                            *pending = Some(frame);
                            false
                        }
                        Err(SendTimeoutError::Disconnected(_)) => return Err(decoders_gone()),
                    },
                    _ => true,
                }
            }
        };
        StageTimers::add(&self.metrics.stages.handoff_us, handed);
        Ok(room)
    }

    /// No more frames will be polled: a frame still waiting goes to the pool (unless it failed:
    /// then it stays unacknowledged and is read again), and the pool's threads end once they
    /// have decoded what they hold.
    pub(crate) fn stop_decoding(&mut self) {
        if let Decode::Pool { jobs, pending, failure } = &mut self.decode {
            if let (Some(frame), Some(sender)) = (pending.take(), jobs.as_ref()) {
                if !failure.failed() {
                    let _ = sender.send(frame);
                }
            }
            *jobs = None;
        }
    }

    fn store_safe(&self) {
        store_safe(self.source, &self.config.input_topic, self.tracker, self.metrics);
    }

    /// Brings `owned` up to date after a rebalance. A partition that came (back) may carry a
    /// pause from before it was revoked (librdkafka keeps it): it is resumed, or paused as the
    /// others are if a long hold is on.
    fn follow_assignment(&mut self) {
        let (changes, assigned) = self.source.owned_partitions();
        if self.assignment_seen == Some(changes) {
            return;
        }
        self.assignment_seen = Some(changes);
        let now = Instant::now();
        self.owned.retain(|p, _| assigned.contains(p));
        self.paused.retain(|p| assigned.contains(p));
        self.last_polled.retain(|p, _| assigned.contains(p));
        let came: Vec<i32> = assigned.iter().copied().filter(|p| !self.owned.contains_key(p)).collect();
        if came.is_empty() {
            return;
        }
        for &p in &came {
            self.owned.insert(p, now);
        }
        if self.paused.is_empty() {
            if let Err(e) = self.source.resume_partitions(&self.config.input_topic, &came) {
                tracing::warn!(partitions = ?came, "consumer resume: {e}");
            }
        } else {
            self.pause_owned();
        }
    }

    /// Pauses every owned partition not paused yet.
    fn pause_owned(&mut self) {
        let more: Vec<i32> = self.owned.keys().copied().filter(|p| !self.paused.contains(p)).collect();
        if more.is_empty() {
            return;
        }
        tracing::debug!(partitions = ?more, in_flight = self.tracker.in_flight(), "backpressure: pausing");
        match self.source.pause_partitions(&self.config.input_topic, &more) {
            Ok(()) => self.paused.extend(more),
            Err(e) => tracing::warn!(partitions = ?more, "consumer pause: {e}"),
        }
    }

    /// Room again: the hold is over, and every partition kafray paused is resumed.
    fn release_hold(&mut self) {
        self.held_since = None;
        if self.paused.is_empty() {
            return;
        }
        let paused: Vec<i32> = std::mem::take(&mut self.paused).into_iter().collect();
        if let Err(e) = self.source.resume_partitions(&self.config.input_topic, &paused) {
            tracing::warn!(partitions = ?paused, "consumer resume: {e}");
            // Tried again on the next release.
            self.paused.extend(paused);
        }
    }

    /// The worker's state, and the stall watchdog. While backpressure is not holding the
    /// worker, an owned partition is stalled when for `stall_after_s`:
    /// - its oldest frame in flight got no durable result (nor any frame of it after that one), or
    /// - it has frames not yet read (librdkafka's statistics), gave the worker none, and the
    ///   consumer meanwhile had nothing else to give (a poll came back empty): it is not merely
    ///   waiting for its turn behind the other partitions' frames.
    fn check_health(&mut self) {
        let now = Instant::now();
        let stall_after = Duration::from_secs(self.config.stall_after_s);
        let mut problems = Vec::new();
        let mut stalled = Vec::new();
        if self.config.stall_after_s > 0 {
            if self.held_since.is_some_and(|since| now.duration_since(since) >= stall_after) {
                problems.push(format!(
                    "backpressure has held for over {} s: max_in_flight frames wait for the broker's acknowledgement",
                    stall_after.as_secs()
                ));
            }
            if self.held_since.is_none() {
                let quiet_since = |partition: i32, last: Option<&Instant>| {
                    let came = self.owned.get(&partition).copied().unwrap_or(now);
                    now.duration_since(last.map_or(came, |t| (*t).max(came)))
                };
                stalled = self.tracker.waiting_longer_than(stall_after);
                stalled.retain(|p| self.owned.get(p).is_some_and(|came| now.duration_since(*came) >= stall_after));
                let idle_lately = self.last_idle_poll.is_some_and(|t| now.duration_since(t) < stall_after);
                let backlog = self.metrics.partition_backlog.lock().unwrap().clone();
                for (partition, frames) in backlog {
                    let starved = frames > 0
                        && idle_lately
                        && self.owned.contains_key(&partition)
                        && quiet_since(partition, self.last_polled.get(&partition)) >= stall_after;
                    if starved && !stalled.contains(&partition) {
                        stalled.push(partition);
                    }
                }
            }
        }
        stalled.sort_unstable();
        for p in stalled.iter().filter(|p| !self.stalled.contains(p)) {
            self.metrics.partition_stalls.fetch_add(1, Relaxed);
            tracing::warn!(
                partition = p,
                paused_by_kafray = self.paused.contains(p),
                in_flight = self.tracker.in_flight(),
                "partition {p} stalled: no progress for {} s (frames wait for a result, or frames wait unread)",
                stall_after.as_secs()
            );
        }
        for p in self.stalled.iter().filter(|p| !stalled.contains(p)) {
            tracing::info!(partition = p, "partition {p} makes progress again");
        }
        if !stalled.is_empty() {
            problems.push(format!("partition(s) {stalled:?} stalled: no progress for {} s", stall_after.as_secs()));
        }
        self.stalled = stalled;
        *self.metrics.stalled_partitions.lock().unwrap() = self.stalled.clone();
        if let Some((at, why)) = &self.broker_trouble {
            if now.duration_since(*at) < BROKER_TROUBLE_WINDOW {
                problems.push(format!("the broker is unreachable: {why}"));
            }
        }
        let state = match (self.metrics.joined.load(Relaxed), problems.is_empty()) {
            (false, _) => WorkerState::Starting,
            (true, true) => WorkerState::Ready,
            (true, false) => WorkerState::Degraded,
        };
        let reason = match state {
            WorkerState::Starting => Some(format!("joining the group {:?}", self.config.group)),
            _ => (!problems.is_empty()).then(|| problems.join("; ")),
        };
        self.metrics.set_state(state, reason);
    }

    /// Dead-letters, without their values, the frames whose results the broker refused for what
    /// they are (a prediction, or a dead letter with the frame's value). The values are gone by
    /// now (the frame stays in the input topic at the offset named in the dead letter's
    /// headers), so these count as dead-letter fallbacks.
    pub(crate) fn dead_letter_refused(&self) -> Result<()> {
        for Refused { ack, reason } in self.sink.take_refused() {
            self.metrics.dead_letter_fallbacks.fetch_add(1, Relaxed);
            let reason = format!("{reason} (the frame's value is left out: it stays in the input topic)");
            let class = ack.dead_letter.unwrap_or(DeadLetterReason::ResultRefused);
            let ack = Ack { timing: None, dead_letter: None, ..ack };
            self.sink.dead_letter(None, &[], None, &reason, class, ack)?;
        }
        Ok(())
    }

    /// Tracks a polled frame, then decodes it into the batch being built (or dead-letters it),
    /// or hands it to the decode pool.
    fn accept(&mut self, msg: &impl rdkafka::Message) -> Result<()> {
        let frame = Polled::from_message(msg);
        self.tracker.begin(frame.partition, frame.offset);
        self.metrics.consumed.fetch_add(1, Relaxed);
        self.last_polled.insert(frame.partition, Instant::now());
        match &mut self.decode {
            Decode::Inline { spec, tensor } => {
                decode_one(frame, spec, tensor, self.queue, self.sink, self.metrics, Handoff::Checked)
            }
            Decode::Pool { jobs: Some(jobs), pending, .. } => match jobs.try_send(frame) {
                Ok(()) => Ok(()),
                Err(TrySendError::Full(frame)) => {
                    *pending = Some(frame);
                    Ok(())
                }
                Err(TrySendError::Disconnected(_)) => Err(decoders_gone()),
            },
            Decode::Pool { jobs: None, .. } => Err(decoders_gone()),
        }
    }
}

fn decoders_gone() -> Error {
    Error::Internal("the decode threads stopped".into())
}

/// Stores what became safe, and notes each partition's progress (for the restart budget).
pub(crate) fn store_safe<S: FrameSource>(source: &S, topic: &str, tracker: &OffsetTracker, metrics: &Metrics) {
    for (partition, next) in source::store_safe(source, topic, tracker) {
        metrics.progressed(partition, next);
    }
}

/// The periodic status line: rates since the last one, and the worker's state.
struct StatusLine {
    at: Instant,
    last: Snapshot,
}

impl StatusLine {
    fn new(last: Snapshot) -> Self {
        StatusLine { at: Instant::now(), last }
    }

    fn print(&mut self, now: Snapshot, latency: Option<(u64, u64)>, in_flight: usize, health: &Health) {
        let secs = self.at.elapsed().as_secs_f64().max(1e-3);
        let batches = now.batches - self.last.batches;
        let mean_batch =
            if batches == 0 { 0.0 } else { (now.batched_frames - self.last.batched_frames) as f64 / batches as f64 };
        tracing::info!(
            "status: {:.0} frames/s, {} predicted, {} dead-lettered, mean batch {:.1} (limit {}), lag {}, in flight {}, latency {}, {}{}",
            (now.predicted - self.last.predicted) as f64 / secs,
            now.predicted,
            now.dead_lettered,
            mean_batch,
            now.batch_limit,
            if now.lag < 0 { "?".to_string() } else { now.lag.to_string() },
            in_flight,
            latency.map_or_else(|| "-".to_string(), |(p50, p99)| format!("p50 {p50} ms p99 {p99} ms")),
            health.state.as_str(),
            health.reason.as_ref().map_or_else(String::new, |why| format!(": {why}")),
        );
        *self = StatusLine::new(now);
    }
}
