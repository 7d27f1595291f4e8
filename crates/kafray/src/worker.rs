//! One worker = one consumer-group member:
//! poll -> decode + preprocess -> micro-batch -> infer -> produce -> (ack) -> store offset.
//! Polling and decoding run on the calling thread, inference on a second one, so the two
//! overlap; librdkafka's own threads do the network I/O and call back on acknowledgement.
//! The two threads meet in a [`BatchQueue`]: the model, once free, takes whatever frames are
//! ready, so a frame waits for the model and not for a batch window.
use crate::batch::{BatchPolicy, BatchQueue, FrameMeta, Next};
use crate::config::WorkerConfig;
use crate::error::{Error, Result};
use crate::frame::{self, FrameHeaders, HEADER_FORMAT, HEADER_LABEL, HEADER_SEQ, HEADER_SHAPE};
use crate::metrics::{DeadLetterReason, FrameTiming, Metrics, Snapshot, StageTimers};
use crate::model::{Device, Model, ModelSpec};
use crate::offsets::OffsetTracker;
use crate::sink::{now_ms, Ack, Prediction, ResultSink, Sink, TopEntry};
use crate::source::{self, ConsumerError, FrameSource, SourceContext};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::Message;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a drain at shutdown may wait for the broker to acknowledge what is in flight.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Upper bound on one wait of either thread, so stop requests, stored offsets and the status
/// line are handled promptly. No frame waits for it: a poll returns as soon as a frame is
/// there, and a frame joining the batch wakes the inference thread at once.
const POLL_SLICE: Duration = Duration::from_millis(100);
/// How long the input topic may be reported missing before the worker gives up on it.
const MISSING_TOPIC_GRACE: Duration = Duration::from_secs(30);
/// How often safe offsets are stored for the next auto-commit (every second): often enough that
/// a commit carries what was acknowledged, without a store call per polled frame.
const STORE_EVERY: Duration = Duration::from_millis(10);
/// Restarts after undelivered results, in a row without a prediction between them, before the
/// worker gives up (waiting 1, 2, 4 s): enough to ride out one broker fault, not to loop on one.
const RESTARTS_IN_A_ROW: u32 = 3;

/// Loads the model named in `config` and runs until `stop` is set.
pub fn run(config: &WorkerConfig, stop: Arc<AtomicBool>, metrics: Arc<Metrics>) -> Result<Snapshot> {
    config.validate()?;
    let model = Model::load_on(&config.model, config.threads, config.top_k, Device::parse(&config.device)?)?;
    run_with_model(config, model, stop, metrics)
}

/// Runs one worker with a loaded model until `stop` is set; then finishes what is in flight,
/// commits and leaves the group. Returns the final counters.
pub fn run_with_model(
    config: &WorkerConfig,
    model: Model,
    stop: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
) -> Result<Snapshot> {
    config.validate()?;
    let dead_letter_topic = config.dead_letter_topic();
    if let Some(partitions) = config.create_topics {
        crate::admin::ensure_topics(
            &config.brokers,
            &[
                (config.input_topic.as_str(), partitions),
                (config.output_topic.as_str(), partitions),
                (dead_letter_topic.as_str(), 1),
            ],
            &config.kafka,
        )?;
    }
    crate::admin::check_worker_topics(
        &config.brokers,
        &config.input_topic,
        &config.output_topic,
        &dead_letter_topic,
        &config.kafka,
    )?;
    // The endpoint is a window on the worker, not part of its work: a port already taken (a
    // second worker on the host) is a warning, and the stream goes on.
    let _metrics_server = (!config.metrics_addr.is_empty())
        .then(|| {
            let labels = vec![("worker".to_string(), config.worker_id())];
            match crate::exporter::MetricsServer::start(
                &config.metrics_addr,
                crate::exporter::registry(metrics.clone(), labels),
            ) {
                Ok(server) => {
                    tracing::info!("metrics at http://{}/metrics", server.addr);
                    *metrics.endpoint.lock().unwrap() = Some(server.addr.to_string());
                    Some(server)
                }
                Err(e) => {
                    tracing::warn!("no metrics endpoint: {e}");
                    None
                }
            }
        })
        .flatten();
    let (path, device) = (model.path.clone(), model.device);
    let (mut model, mut restarts) = (Some(model), 0);
    loop {
        let model = match model.take() {
            Some(m) => m,
            None => Model::load_on(&path, config.threads, config.top_k, device)?,
        };
        let predicted_before = metrics.predicted.load(Relaxed);
        match run_connected(config, model, stop.clone(), metrics.clone()) {
            // Undelivered results were not stored past, so new clients read those frames again.
            Err(e @ Error::Delivery(_)) if !stop.load(Relaxed) => {
                if metrics.predicted.load(Relaxed) > predicted_before {
                    restarts = 0;
                }
                if restarts == RESTARTS_IN_A_ROW {
                    return Err(e);
                }
                let backoff = Duration::from_secs(1 << restarts);
                restarts += 1;
                metrics.restarts.fetch_add(1, Relaxed);
                tracing::warn!(
                    "{e}; starting again in {} s with new clients ({restarts} of {RESTARTS_IN_A_ROW})",
                    backoff.as_secs()
                );
                let waited = Instant::now();
                while waited.elapsed() < backoff && !stop.load(Relaxed) {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            other => return other,
        }
    }
}

/// One life of the worker's Kafka clients: a consumer in the group and a producer.
fn run_connected(
    config: &WorkerConfig,
    model: Model,
    stop: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
) -> Result<Snapshot> {
    let dead_letter_topic = config.dead_letter_topic();
    let tracker = Arc::new(OffsetTracker::new());
    // librdkafka's statistics carry the lag: often enough for the status line and for scrapes.
    let stats_ms = match (config.status_interval_s, config.metrics_addr.is_empty()) {
        (0, true) => 0,
        (0, false) => 5000,
        (s, true) => s * 1000,
        (s, false) => (s * 1000).min(5000),
    };
    let consumer = source::subscribe(
        &config.brokers,
        &config.group,
        &config.input_topic,
        &config.kafka,
        stats_ms,
        SourceContext::new(tracker.clone(), metrics.clone()),
    )?;
    let sink = Arc::new(Sink::new(
        &config.brokers,
        &config.output_topic,
        &dead_letter_topic,
        &config.kafka,
        tracker.clone(),
        metrics.clone(),
        stop.clone(),
    )?);
    run_pipeline(config, model, &consumer, sink, tracker, stop, metrics)
}

/// The data path from poll to stored offset, over any [`FrameSource`] and [`ResultSink`] (the
/// seam that lets tests run it without a broker). Runs until `stop` is set or something fails;
/// then finishes what is in flight, stores and commits what is safe, and leaves the group.
pub fn run_pipeline<S: FrameSource>(
    config: &WorkerConfig,
    model: Model,
    source: &S,
    sink: Arc<dyn ResultSink>,
    tracker: Arc<OffsetTracker>,
    stop: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
) -> Result<Snapshot> {
    let worker_id = config.worker_id();
    let policy = BatchPolicy::new(
        config.batch_size,
        Duration::from_millis(config.max_wait_ms),
        config.latency_target_ms.map(Duration::from_millis),
    );
    metrics.batch_limit.store(policy.limit(), Relaxed);
    tracing::info!(
        worker = %worker_id, model = %model.path.display(), device = %model.device, input = %config.input_topic,
        output = %config.output_topic, group = %config.group, batch_size = config.batch_size,
        max_wait_ms = config.max_wait_ms, latency_target_ms = ?config.latency_target_ms, "worker started"
    );

    let spec = model.spec.clone();
    let queue = Arc::new(BatchQueue::new(policy, spec.input_len()));
    let infer_stopped = Arc::new(AtomicBool::new(false));
    let infer = {
        let (sink, worker_id, metrics, queue) = (sink.clone(), worker_id.clone(), metrics.clone(), queue.clone());
        let guard = ExitGuard { stopped: infer_stopped.clone(), tracker: tracker.clone(), queue: queue.clone() };
        std::thread::Builder::new()
            .name("kafray-infer".into())
            .spawn(move || {
                let _guard = guard;
                infer_loop(model, &queue, sink.as_ref(), &worker_id, &metrics)
            })
            .map_err(|e| Error::io("start the inference thread", e))?
    };

    let mut intake = Intake {
        config,
        spec: &spec,
        source,
        sink: sink.as_ref(),
        tracker: &tracker,
        metrics: &metrics,
        queue: &queue,
        tensor: vec![0.0; spec.input_len()],
        infer_stopped: &infer_stopped,
        paused: false,
        input_missing_since: None,
    };
    let outcome = intake.run(&stop);
    // Finish in-flight work: the last partial batch, inference, then every acknowledgement.
    queue.close();
    let inferred = infer.join().map_err(|_| Error::Internal("the inference thread panicked".into()))?;
    // The inference thread's own error explains a stopped intake better than the intake does.
    // A result given up for a stop is no failure: its frame is read again.
    let outcome = match inferred.and(outcome) {
        Err(Error::Stopped) => Ok(()),
        other => other,
    };
    let mut flushed = sink.flush(DRAIN_TIMEOUT);
    // Predictions refused while draining: dead-letter them too, and wait for those.
    if flushed.is_ok() && outcome.is_ok() {
        flushed = match intake.dead_letter_refused() {
            Ok(()) => sink.flush(DRAIN_TIMEOUT),
            // Given up for the stop: those frames stay unacknowledged and are read again.
            Err(Error::Stopped) => Ok(()),
            Err(e) => Err(e),
        };
    }
    source::store_safe(source, &config.input_topic, &tracker);
    if let Err(e) = source.commit_now() {
        tracing::warn!("final commit failed (the group re-reads from the last commit): {e}");
    }
    source.leave();
    let last = metrics.snapshot();
    tracing::info!(
        worker = %worker_id, predicted = last.predicted, dead_lettered = last.dead_lettered,
        dead_letter_fallbacks = last.dead_letter_fallbacks, consume_errors = last.consume_errors,
        in_flight = tracker.in_flight(), "worker stopped"
    );
    outcome?;
    if let Some(failure) = sink.failure() {
        return Err(Error::Delivery(failure));
    }
    flushed?;
    Ok(last)
}

struct Intake<'a, S> {
    config: &'a WorkerConfig,
    spec: &'a ModelSpec,
    source: &'a S,
    sink: &'a dyn ResultSink,
    tracker: &'a OffsetTracker,
    metrics: &'a Metrics,
    queue: &'a BatchQueue,
    /// One preprocessed frame, before it joins the batch.
    tensor: Vec<f32>,
    infer_stopped: &'a AtomicBool,
    /// The assignment is paused because `max_in_flight` frames are in flight.
    paused: bool,
    /// Since when the consumer has reported the input topic missing, without a frame between.
    input_missing_since: Option<Instant>,
}

/// Marks the inference thread as stopped however it ends (error or panic), and wakes the
/// intake thread if it waits for acknowledgements or for room in the batch, so it cannot wait
/// forever.
struct ExitGuard {
    stopped: Arc<AtomicBool>,
    tracker: Arc<OffsetTracker>,
    queue: Arc<BatchQueue>,
}

impl Drop for ExitGuard {
    fn drop(&mut self) {
        self.stopped.store(true, Relaxed);
        self.tracker.wake();
        self.queue.wake();
    }
}

impl<S: FrameSource> Intake<'_, S> {
    fn run(&mut self, stop: &AtomicBool) -> Result<()> {
        let status_every = Duration::from_secs(self.config.status_interval_s);
        let mut status = StatusLine::new(self.metrics.snapshot());
        let mut stored = Instant::now();
        while !stop.load(Relaxed) {
            if stored.elapsed() >= STORE_EVERY {
                source::store_safe(self.source, &self.config.input_topic, self.tracker);
                stored = Instant::now();
            }
            if let Some(failure) = self.sink.failure() {
                return Err(Error::Delivery(failure));
            }
            self.dead_letter_refused()?;
            if self.config.status_interval_s > 0 && status.at.elapsed() >= status_every {
                status.print(self.metrics.snapshot(), self.metrics.take_window_latency(), self.tracker.in_flight());
            }
            if self.infer_stopped.load(Relaxed) {
                return Err(Error::Internal("the inference thread stopped".into()));
            }
            let stages = &self.metrics.stages;
            // The batch being built is at the limit while the model runs the one before: wait
            // for the model to take it rather than read frames that could not join a batch.
            let handed = Instant::now();
            let room = self.queue.wait_for_room(POLL_SLICE);
            StageTimers::add(&stages.handoff_us, handed);
            if !room {
                continue;
            }
            let mut wait = POLL_SLICE;
            // Backpressure with hysteresis: pause at max_in_flight, resume at half of it, so the
            // consumer does not flip between pause and resume (each resume restarts fetching).
            let resume_at = self.config.max_in_flight / 2;
            let in_flight = self.tracker.in_flight();
            self.metrics.in_flight.store(in_flight, Relaxed);
            let hold = if self.paused { in_flight > resume_at } else { in_flight >= self.config.max_in_flight };
            self.set_paused(hold);
            let waited = Instant::now();
            if hold {
                // Paused: keep polling (without waiting) so the group's rebalances and liveness
                // are still served while acknowledgements make room.
                self.tracker.wait_below(resume_at + 1, wait);
                wait = Duration::ZERO;
            }
            let polled = self.source.poll(wait);
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
                        ConsumerError::Transient => tracing::warn!("consumer: {e}"),
                    }
                }
                None => {}
            }
        }
        Ok(())
    }

    /// Dead-letters the frames whose predictions the broker refused for what they are. Their
    /// values are gone by now (the frame stays in the input topic at the offset named in the
    /// dead letter's headers), so these count as dead-letter fallbacks.
    fn dead_letter_refused(&self) -> Result<()> {
        for (ack, reason) in self.sink.take_refused() {
            self.metrics.dead_letter_fallbacks.fetch_add(1, Relaxed);
            let reason = format!("{reason} (the frame's value is left out: it stays in the input topic)");
            let ack = Ack { timing: None, ..ack };
            self.sink.dead_letter(None, &[], None, &reason, DeadLetterReason::ResultRefused, ack)?;
        }
        Ok(())
    }

    /// Pauses the whole assignment while held (again each turn: a rebalance may have added
    /// partitions), resumes it once released.
    fn set_paused(&mut self, hold: bool) {
        if !hold && !self.paused {
            return;
        }
        if hold && !self.paused {
            self.metrics.backpressure_pauses.fetch_add(1, Relaxed);
        }
        if let Err(e) = self.source.set_paused(hold) {
            tracing::warn!("consumer {}: {e}", if hold { "pause" } else { "resume" });
        }
        self.paused = hold;
    }

    /// Decodes a frame into the batch being built, or sends it to the dead-letter topic.
    fn accept(&mut self, msg: &impl Message) -> Result<()> {
        let (partition, offset) = (msg.partition(), msg.offset());
        self.tracker.begin(partition, offset);
        self.metrics.consumed.fetch_add(1, Relaxed);
        let headers = read_headers(msg);
        let ts_produce_ms = msg.timestamp().to_millis();
        let value = msg.payload().unwrap_or_default();
        let (spec, tensor) = (self.spec, &mut self.tensor);
        let decoding = Instant::now();
        let result = frame::decode(value, &headers)
            .and_then(|pixels| crate::model::preprocess::preprocess(spec, &pixels, tensor));
        let queued_at = StageTimers::add(&self.metrics.stages.decode_us, decoding);
        match result {
            Ok(()) => {
                let meta = FrameMeta {
                    partition,
                    offset,
                    key: msg.key().map(<[u8]>::to_vec),
                    seq: headers.seq,
                    truth: headers.label,
                    ts_produce_ms,
                    fetch_us: ts_produce_ms.map_or(0, |ts| (now_ms() - ts).max(0) as u64 * 1000),
                    decode_us: queued_at.duration_since(decoding).as_micros() as u64,
                    queued_at,
                    value: value.to_vec(),
                    headers: msg.headers().map(owned_headers),
                };
                self.queue.push(meta, &self.tensor);
            }
            Err(rejection) => {
                tracing::debug!(partition, offset, "dead letter: {rejection}");
                let ack = Ack { partition, offset, ts_produce_ms, dead_letter: None, timing: None };
                let headers = msg.headers().map(owned_headers);
                self.sink.dead_letter(msg.key(), value, headers, &rejection.0, DeadLetterReason::Undecodable, ack)?;
            }
        }
        Ok(())
    }
}

/// A copy of a record's headers, to publish again with its dead letter.
fn owned_headers(headers: &impl Headers) -> OwnedHeaders {
    headers.iter().fold(OwnedHeaders::new_with_capacity(headers.count()), |out, h| {
        out.insert(Header { key: h.key, value: h.value })
    })
}

fn read_headers(msg: &impl Message) -> FrameHeaders {
    let mut out = FrameHeaders::default();
    if let Some(headers) = msg.headers() {
        for h in headers.iter() {
            let Some(value) = h.value.and_then(|v| std::str::from_utf8(v).ok()) else { continue };
            match h.key {
                HEADER_FORMAT => out.format = Some(value.to_string()),
                HEADER_SHAPE => out.shape = Some(value.to_string()),
                HEADER_SEQ => out.seq = value.trim().parse().ok(),
                HEADER_LABEL => out.label = Some(value.to_string()),
                _ => {}
            }
        }
    }
    out
}

fn infer_loop(
    mut model: Model,
    queue: &BatchQueue,
    sink: &dyn ResultSink,
    worker_id: &str,
    metrics: &Metrics,
) -> Result<()> {
    let model_name = model.spec.name.clone();
    let stages = &metrics.stages;
    let mut clock = Instant::now();
    loop {
        // Idle time is counted slice by slice, so it shows while it passes.
        let (batch, queued) = match queue.next(POLL_SLICE) {
            Next::Batch(batch, queued) => (batch, queued),
            Next::Idle => {
                clock = StageTimers::add(&stages.idle_us, clock);
                continue;
            }
            Next::Closed => break,
        };
        let dispatched = StageTimers::add(&stages.idle_us, clock);
        let size = batch.len();
        metrics.batches.fetch_add(1, Relaxed);
        metrics.batched_frames.fetch_add(size as u64, Relaxed);
        metrics.histograms.batch_size.observe(size as f64);
        // A frame on which the model fails (while it classifies others) is dead-lettered; a
        // failure of the model itself stops the worker without storing these frames' offsets,
        // so they are read again.
        let results = model.classify_isolating(&batch.input)?;
        let inferred_at = StageTimers::add(&stages.infer_us, dispatched);
        let infer_us = inferred_at.duration_since(dispatched).as_micros() as u64;
        let ts_done_ms = now_ms();
        for (meta, result) in batch.frames.iter().zip(results) {
            let ack = Ack {
                partition: meta.partition,
                offset: meta.offset,
                ts_produce_ms: meta.ts_produce_ms,
                dead_letter: None,
                timing: None,
            };
            let result = match result {
                Ok(result) => result,
                Err(reason) => {
                    tracing::warn!(
                        partition = meta.partition,
                        offset = meta.offset,
                        "the model failed on this frame alone: {reason}"
                    );
                    let reason = format!("the model failed on this frame: {reason}");
                    let (key, headers) = (meta.key.as_deref(), meta.headers.clone());
                    sink.dead_letter(key, &meta.value, headers, &reason, DeadLetterReason::ModelFailed, ack)?;
                    continue;
                }
            };
            let top: Vec<TopEntry> = result
                .top
                .iter()
                .map(|&(class, score)| TopEntry(class, model.label(class).map(String::from), score))
                .collect();
            let prediction = Prediction {
                source: meta.key.as_ref().map(|k| String::from_utf8_lossy(k).into_owned()),
                seq: meta.seq,
                partition: meta.partition,
                offset: meta.offset,
                class: result.class(),
                label: top[0].1.clone(),
                score: result.score(),
                top,
                model: model_name.clone(),
                worker: worker_id.to_string(),
                batch_size: size,
                ts_produce_ms: meta.ts_produce_ms,
                ts_done_ms,
            };
            let timing = FrameTiming {
                fetch_us: meta.fetch_us,
                decode_us: meta.decode_us,
                queue_us: dispatched.saturating_duration_since(meta.queued_at).as_micros() as u64,
                infer_us,
                inferred_at,
            };
            let ack = Ack { timing: Some(timing), ..ack };
            match sink.predict(meta.key.as_deref(), &prediction, meta.truth.as_deref(), ack) {
                // This frame's result can never be published (a huge key, say): the same would
                // happen after every restart, so the frame is dead-lettered instead.
                Err(Error::Kafka {
                    source: KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge),
                    ..
                }) => {
                    let reason = "its prediction is larger than the producer's message.max.bytes (a very long key?)";
                    tracing::warn!(partition = meta.partition, offset = meta.offset, "dead letter: {reason}");
                    let (key, headers) = (meta.key.as_deref(), meta.headers.clone());
                    sink.dead_letter(key, &meta.value, headers, reason, DeadLetterReason::ResultTooLarge, ack)?;
                }
                other => other?,
            }
        }
        clock = StageTimers::add(&stages.produce_us, inferred_at);
        let limit = queue.observe(size, queued, clock.duration_since(dispatched));
        metrics.batch_limit.store(limit, Relaxed);
    }
    Ok(())
}

struct StatusLine {
    at: Instant,
    last: Snapshot,
}

impl StatusLine {
    fn new(last: Snapshot) -> Self {
        StatusLine { at: Instant::now(), last }
    }

    fn print(&mut self, now: Snapshot, latency: Option<(u64, u64)>, in_flight: usize) {
        let secs = self.at.elapsed().as_secs_f64().max(1e-3);
        let batches = now.batches - self.last.batches;
        let mean_batch =
            if batches == 0 { 0.0 } else { (now.batched_frames - self.last.batched_frames) as f64 / batches as f64 };
        tracing::info!(
            "status: {:.0} frames/s, {} predicted, {} dead-lettered, mean batch {:.1} (limit {}), lag {}, in flight {}, latency {}",
            (now.predicted - self.last.predicted) as f64 / secs,
            now.predicted,
            now.dead_lettered,
            mean_batch,
            now.batch_limit,
            if now.lag < 0 { "?".to_string() } else { now.lag.to_string() },
            in_flight,
            latency.map_or_else(|| "-".to_string(), |(p50, p99)| format!("p50 {p50} ms p99 {p99} ms")),
        );
        *self = StatusLine::new(now);
    }
}

/// The path from poll to stored offset without a broker: a fake source and sink around the real
/// intake, batching, inference and offset bookkeeping.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::testing::{pixel_model, Pixel, POISON};
    use rdkafka::error::KafkaResult;
    use rdkafka::message::{OwnedMessage, Timestamp};
    use std::collections::{BTreeSet, HashMap, VecDeque};
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use std::sync::{Condvar, Mutex};
    use std::thread::JoinHandle;

    const TOPIC: &str = "frames";

    enum Event {
        Frame(OwnedMessage),
        Revoke(Vec<i32>),
        Assign(Vec<i32>),
    }

    /// Serves events in order; a revoke runs the same handler as the Kafka consumer's.
    struct FakeSource {
        events: Mutex<VecDeque<Event>>,
        arrived: Condvar,
        tracker: Arc<OffsetTracker>,
        assigned: Mutex<BTreeSet<i32>>,
        stored: Mutex<HashMap<i32, i64>>,
        committed: Mutex<HashMap<i32, i64>>,
        failing_stores: AtomicUsize,
        store_calls: AtomicUsize,
    }

    impl FakeSource {
        fn push(&self, events: impl IntoIterator<Item = Event>) {
            self.events.lock().unwrap().extend(events);
            self.arrived.notify_all();
        }
        fn stored(&self, partition: i32) -> Option<i64> {
            self.stored.lock().unwrap().get(&partition).copied()
        }
    }

    impl FrameSource for FakeSource {
        type Frame<'a> = OwnedMessage;

        fn poll(&self, timeout: Duration) -> Option<KafkaResult<OwnedMessage>> {
            let events = self.events.lock().unwrap();
            let (mut events, _) = self.arrived.wait_timeout_while(events, timeout, |e| e.is_empty()).unwrap();
            match events.pop_front()? {
                Event::Frame(m) => Some(Ok(m)),
                Event::Revoke(parts) => {
                    drop(events);
                    source::on_revoke(self, TOPIC, &self.tracker, &parts);
                    self.assigned.lock().unwrap().retain(|p| !parts.contains(p));
                    None
                }
                Event::Assign(parts) => {
                    self.assigned.lock().unwrap().extend(parts);
                    None
                }
            }
        }
        fn set_paused(&self, _paused: bool) -> KafkaResult<()> {
            Ok(())
        }
        fn store_offset(&self, _topic: &str, partition: i32, next: i64) -> KafkaResult<()> {
            self.store_calls.fetch_add(1, SeqCst);
            if self.failing_stores.load(SeqCst) > 0 {
                self.failing_stores.fetch_sub(1, SeqCst);
                return Err(KafkaError::StoreOffset(RDKafkaErrorCode::Fail));
            }
            if !self.assigned.lock().unwrap().contains(&partition) {
                return Err(KafkaError::StoreOffset(RDKafkaErrorCode::State));
            }
            self.stored.lock().unwrap().insert(partition, next);
            Ok(())
        }
        fn commit_now(&self) -> KafkaResult<()> {
            *self.committed.lock().unwrap() = self.stored.lock().unwrap().clone();
            Ok(())
        }
        fn leave(&self) {}
    }

    /// Acknowledges at once, or holds acknowledgements for the test to release; can fail the
    /// delivery of one frame for good.
    struct FakeSink {
        tracker: Arc<OffsetTracker>,
        metrics: Arc<Metrics>,
        hold: AtomicBool,
        held: Mutex<Vec<Ack>>,
        fail_offset: Option<i64>,
        failure: Mutex<Option<String>>,
        refuse_offset: Option<i64>,
        refused: Mutex<Vec<(Ack, String)>>,
        predicted: Mutex<Vec<(i64, usize)>>,
        dead: Mutex<Vec<(i64, String)>>,
    }

    impl FakeSink {
        fn send(&self, ack: Ack) {
            if Some(ack.offset) == self.refuse_offset && ack.dead_letter.is_none() {
                self.refused.lock().unwrap().push((ack, "the broker refused its prediction: too large".into()));
            } else if Some(ack.offset) == self.fail_offset {
                *self.failure.lock().unwrap() = Some(format!("delivery failed for frame {}", ack.offset));
            } else if self.hold.load(SeqCst) {
                self.held.lock().unwrap().push(ack);
            } else {
                crate::sink::acknowledged(&self.tracker, &self.metrics, &ack);
            }
        }
        /// Acknowledges the held results, in the order given by offset.
        fn release(&self, offsets: &[i64]) {
            let mut held = self.held.lock().unwrap();
            for o in offsets {
                let i = held.iter().position(|a| a.offset == *o).expect("held");
                crate::sink::acknowledged(&self.tracker, &self.metrics, &held.remove(i));
            }
        }
    }

    impl ResultSink for FakeSink {
        fn predict(&self, _key: Option<&[u8]>, p: &Prediction, _truth: Option<&str>, ack: Ack) -> Result<()> {
            self.predicted.lock().unwrap().push((p.offset, p.class));
            self.send(ack);
            Ok(())
        }
        fn dead_letter(
            &self,
            _key: Option<&[u8]>,
            _value: &[u8],
            _headers: Option<OwnedHeaders>,
            reason: &str,
            class: DeadLetterReason,
            ack: Ack,
        ) -> Result<()> {
            self.dead.lock().unwrap().push((ack.offset, reason.to_string()));
            self.send(Ack { dead_letter: Some(class), ..ack });
            Ok(())
        }
        fn flush(&self, _timeout: Duration) -> Result<()> {
            let offsets: Vec<i64> = self.held.lock().unwrap().iter().map(|a| a.offset).collect();
            self.release(&offsets);
            Ok(())
        }
        fn failure(&self) -> Option<String> {
            self.failure.lock().unwrap().clone()
        }
        fn take_refused(&self) -> Vec<(Ack, String)> {
            std::mem::take(&mut *self.refused.lock().unwrap())
        }
    }

    fn frame(partition: i32, offset: i64, pixel: u8) -> Event {
        let headers = OwnedHeaders::new()
            .insert(Header { key: HEADER_FORMAT, value: Some("raw") })
            .insert(Header { key: HEADER_SHAPE, value: Some("1x1x1") });
        let ts = Timestamp::CreateTime(now_ms());
        Event::Frame(OwnedMessage::new(Some(vec![pixel]), None, TOPIC.into(), ts, partition, offset, Some(headers)))
    }

    fn frames(partition: i32, offsets: std::ops::Range<i64>) -> Vec<Event> {
        offsets.map(|o| frame(partition, o, (o % 10) as u8)).collect()
    }

    struct Harness {
        source: Arc<FakeSource>,
        sink: Arc<FakeSink>,
        tracker: Arc<OffsetTracker>,
        stop: Arc<AtomicBool>,
        worker: JoinHandle<Result<Snapshot>>,
    }

    fn start(backend: Pixel, hold: bool, fail_offset: Option<i64>, events: Vec<Event>) -> Harness {
        start_refusing(backend, hold, fail_offset, None, events)
    }

    fn start_refusing(
        backend: Pixel,
        hold: bool,
        fail_offset: Option<i64>,
        refuse_offset: Option<i64>,
        events: Vec<Event>,
    ) -> Harness {
        let model = pixel_model(backend);
        let (tracker, metrics) = (Arc::new(OffsetTracker::new()), Arc::new(Metrics::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let source = Arc::new(FakeSource {
            events: Mutex::new(VecDeque::new()),
            arrived: Condvar::new(),
            tracker: tracker.clone(),
            assigned: Mutex::new([0, 1].into()),
            stored: Default::default(),
            committed: Default::default(),
            failing_stores: AtomicUsize::new(0),
            store_calls: AtomicUsize::new(0),
        });
        source.push(events);
        let sink = Arc::new(FakeSink {
            tracker: tracker.clone(),
            metrics: metrics.clone(),
            hold: AtomicBool::new(hold),
            held: Default::default(),
            fail_offset,
            failure: Default::default(),
            refuse_offset,
            refused: Default::default(),
            predicted: Default::default(),
            dead: Default::default(),
        });
        let config =
            WorkerConfig { batch_size: 4, status_interval_s: 0, worker_id: Some("fake".into()), ..Default::default() };
        let worker = {
            let (source, sink, tracker, stop) = (source.clone(), sink.clone(), tracker.clone(), stop.clone());
            std::thread::spawn(move || run_pipeline(&config, model, source.as_ref(), sink, tracker, stop, metrics))
        };
        Harness { source, sink, tracker, stop, worker }
    }

    /// Polls a condition (the worker runs on its own threads) until it holds, or fails.
    fn wait_until(what: &str, check: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !check() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    impl Harness {
        fn finish(self) -> (Result<Snapshot>, HashMap<i32, i64>) {
            self.stop.store(true, SeqCst);
            self.source.arrived.notify_all();
            let outcome = self.worker.join().unwrap();
            let committed = self.source.committed.lock().unwrap().clone();
            (outcome, committed)
        }
        /// Waits for the worker to end by itself (an error), however long a stall would last.
        fn ended(self) -> (Result<Snapshot>, HashMap<i32, i64>) {
            wait_until("the worker to stop by itself", || self.worker.is_finished());
            self.finish()
        }
        fn held(&self) -> usize {
            self.sink.held.lock().unwrap().len()
        }
    }

    #[test]
    fn acknowledgements_out_of_order_store_only_below_the_oldest_unacknowledged_frame() {
        let h = start(Pixel::default(), true, None, frames(0, 0..8));
        wait_until("8 results sent", || h.held() == 8);
        h.sink.release(&[7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(h.tracker.in_flight(), 1);
        assert!(h.tracker.committable().is_empty(), "frame 0 is not acknowledged: nothing is safe");
        assert_eq!(h.source.stored(0), None);
        h.sink.release(&[0]);
        wait_until("offset 8 stored", || h.source.stored(0) == Some(8));
        let (outcome, committed) = h.finish();
        assert_eq!(outcome.unwrap().predicted, 8);
        assert_eq!(committed[&0], 8);
    }

    #[test]
    fn a_revoke_with_frames_in_flight_forgets_them_and_the_partition_can_come_back() {
        let h = start(Pixel::default(), true, None, frames(0, 0..4));
        wait_until("4 results sent", || h.held() == 4);
        h.source.push([Event::Revoke(vec![0])]);
        wait_until("the revoked frames forgotten", || h.tracker.in_flight() == 0);
        h.sink.release(&[2, 0, 1, 3]); // late acknowledgements of a partition no longer owned
        assert_eq!(h.tracker.in_flight(), 0);
        assert_eq!(h.source.stored(0), None, "nothing was stored for a partition it no longer owns");
        // The partition comes back, read again from the last commit.
        h.sink.hold.store(false, SeqCst);
        h.source.push(std::iter::once(Event::Assign(vec![0])).chain(frames(0, 0..4)));
        wait_until("offset 4 stored", || h.source.stored(0) == Some(4));
        let (outcome, committed) = h.finish();
        outcome.unwrap();
        assert_eq!(committed[&0], 4);
    }

    #[test]
    fn a_failed_delivery_stops_the_worker_and_nothing_past_it_is_stored() {
        let h = start(Pixel::default(), false, Some(2), frames(0, 0..6));
        let (outcome, committed) = h.ended();
        let err = outcome.unwrap_err().to_string();
        assert!(err.contains("delivery failed for frame 2"), "{err}");
        assert_eq!(committed.get(&0), Some(&2), "frames 0 and 1 are safe; 2 must be read again");
    }

    #[test]
    fn a_broken_model_stops_the_worker_without_storing_its_frames() {
        let h =
            start(Pixel { broken: Arc::new(AtomicBool::new(true)), ..Pixel::default() }, false, None, frames(0, 0..4));
        let (outcome, committed) = h.ended();
        assert!(outcome.unwrap_err().to_string().contains("the device is gone"));
        assert_eq!(committed.get(&0), None, "the frames are read again after a restart");
    }

    #[test]
    fn a_poison_frame_is_dead_lettered_and_the_stream_goes_on() {
        let events = vec![frame(0, 0, 1), frame(0, 1, POISON as u8), frame(0, 2, 2), frame(0, 3, 3)];
        let h = start(Pixel::default(), false, None, events);
        wait_until("offset 4 stored", || h.source.stored(0) == Some(4));
        let dead = h.sink.dead.lock().unwrap().clone();
        let mut predicted = h.sink.predicted.lock().unwrap().clone();
        let (outcome, _) = h.finish();
        let last = outcome.unwrap();
        assert_eq!((last.predicted, last.dead_lettered), (3, 1));
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].0, 1);
        assert!(dead[0].1.contains("the model failed on this frame"), "{dead:?}");
        predicted.sort();
        assert_eq!(predicted, vec![(0, 1), (2, 2), (3, 3)]);
    }

    #[test]
    fn a_short_model_answer_stops_the_worker_instead_of_stalling_it() {
        let h = start(Pixel { short: true, ..Pixel::default() }, false, None, frames(0, 0..4));
        let (outcome, committed) = h.ended();
        let err = outcome.unwrap_err().to_string();
        assert!(err.contains("scores for a batch of"), "{err}");
        assert_eq!(committed.get(&0), None);
    }

    #[test]
    fn a_prediction_the_broker_refuses_dead_letters_its_frame_and_the_stream_goes_on() {
        let h = start_refusing(Pixel::default(), false, None, Some(1), frames(0, 0..4));
        wait_until("offset 4 stored", || h.source.stored(0) == Some(4));
        let dead = h.sink.dead.lock().unwrap().clone();
        let (outcome, committed) = h.finish();
        let last = outcome.unwrap();
        assert_eq!((last.predicted, last.dead_lettered, last.dead_letter_fallbacks), (3, 1, 1));
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].0, 1);
        assert!(dead[0].1.contains("refused its prediction") && dead[0].1.contains("left out"), "{dead:?}");
        assert_eq!(committed[&0], 4);
    }

    #[test]
    fn a_failed_offset_store_is_tried_again() {
        let h = start(Pixel::default(), false, None, Vec::new());
        h.source.failing_stores.store(3, SeqCst);
        h.source.push(frames(1, 10..14));
        wait_until("offset 14 stored", || h.source.stored(1) == Some(14));
        assert!(h.source.store_calls.load(SeqCst) >= 4, "three failed stores, then one that worked");
        let (outcome, committed) = h.finish();
        outcome.unwrap();
        assert_eq!(committed[&1], 14);
    }
}
