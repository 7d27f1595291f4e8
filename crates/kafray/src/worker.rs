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
use crate::metrics::{FrameTiming, Metrics, Snapshot, StageTimers};
use crate::model::{Model, ModelSpec};
use crate::offsets::OffsetTracker;
use crate::sink::{now_ms, Ack, Prediction, Sink, TopEntry};
use crate::source::{self, ConsumerError, Source, SourceContext};
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers};
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

/// Loads the model named in `config` and runs until `stop` is set.
pub fn run(config: &WorkerConfig, stop: Arc<AtomicBool>, metrics: Arc<Metrics>) -> Result<Snapshot> {
    config.validate()?;
    let model = Model::load(&config.model, config.threads, config.top_k)?;
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
    let worker_id = config.worker_id();
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
    let tracker = Arc::new(OffsetTracker::new());
    let stats_ms = if config.status_interval_s > 0 { config.status_interval_s * 1000 } else { 0 };
    let consumer = source::subscribe(
        &config.brokers,
        &config.group,
        &config.input_topic,
        &config.kafka,
        stats_ms,
        SourceContext { tracker: tracker.clone(), metrics: metrics.clone() },
    )?;
    let sink = Arc::new(Sink::new(
        &config.brokers,
        &config.output_topic,
        &config.dead_letter_topic(),
        &config.kafka,
        tracker.clone(),
        metrics.clone(),
        stop.clone(),
    )?);
    let policy = BatchPolicy::new(
        config.batch_size,
        Duration::from_millis(config.max_wait_ms),
        config.latency_target_ms.map(Duration::from_millis),
    );
    metrics.batch_limit.store(policy.limit(), Relaxed);
    tracing::info!(
        worker = %worker_id, model = %model.path.display(), input = %config.input_topic,
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
                infer_loop(model, &queue, &sink, &worker_id, &metrics)
            })
            .map_err(|e| Error::io("start the inference thread", e))?
    };

    let mut intake = Intake {
        config,
        spec: &spec,
        consumer: &consumer,
        sink: &sink,
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
    let flushed = sink.flush(DRAIN_TIMEOUT);
    source::store_safe(&consumer, &config.input_topic, &tracker);
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) => {}
        Err(rdkafka::error::KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset)) => {}
        Err(e) => tracing::warn!("final commit failed (the group re-reads from the last commit): {e}"),
    }
    consumer.unsubscribe();
    let last = metrics.snapshot();
    tracing::info!(
        worker = %worker_id, predicted = last.predicted, dead_lettered = last.dead_lettered,
        dead_letter_fallbacks = last.dead_letter_fallbacks, consume_errors = last.consume_errors,
        in_flight = tracker.in_flight(), "worker stopped"
    );
    outcome?;
    if let Some(failure) = sink.failure() {
        return Err(Error::External(failure));
    }
    flushed?;
    Ok(last)
}

struct Intake<'a> {
    config: &'a WorkerConfig,
    spec: &'a ModelSpec,
    consumer: &'a Source,
    sink: &'a Sink,
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

impl Intake<'_> {
    fn run(&mut self, stop: &AtomicBool) -> Result<()> {
        let status_every = Duration::from_secs(self.config.status_interval_s);
        let mut status = StatusLine::new(self.metrics.snapshot());
        let mut stored = Instant::now();
        while !stop.load(Relaxed) {
            if stored.elapsed() >= STORE_EVERY {
                source::store_safe(self.consumer, &self.config.input_topic, self.tracker);
                stored = Instant::now();
            }
            if let Some(failure) = self.sink.failure() {
                return Err(Error::External(failure));
            }
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
            let hold = if self.paused { in_flight > resume_at } else { in_flight >= self.config.max_in_flight };
            self.set_paused(hold);
            let waited = Instant::now();
            if hold {
                // Paused: keep polling (without waiting) so the group's rebalances and liveness
                // are still served while acknowledgements make room.
                self.tracker.wait_below(resume_at + 1, wait);
                wait = Duration::ZERO;
            }
            let polled = self.consumer.poll(wait);
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

    /// Pauses the whole assignment while held (again each turn: a rebalance may have added
    /// partitions), resumes it once released.
    fn set_paused(&mut self, hold: bool) {
        if !hold && !self.paused {
            return;
        }
        let Ok(assignment) = self.consumer.assignment() else { return };
        let result = if hold { self.consumer.pause(&assignment) } else { self.consumer.resume(&assignment) };
        if let Err(e) = result {
            tracing::warn!("consumer {}: {e}", if hold { "pause" } else { "resume" });
        }
        self.paused = hold;
    }

    /// Decodes a frame into the batch being built, or sends it to the dead-letter topic.
    fn accept(&mut self, msg: &BorrowedMessage<'_>) -> Result<()> {
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
                    headers: msg.headers().map(|h| h.detach()),
                };
                self.queue.push(meta, &self.tensor);
            }
            Err(rejection) => {
                tracing::debug!(partition, offset, "dead letter: {rejection}");
                let ack = Ack { partition, offset, ts_produce_ms, dead_letter: true, timing: None };
                self.sink.dead_letter(msg.key(), value, msg.headers().map(|h| h.detach()), &rejection.0, ack)?;
            }
        }
        Ok(())
    }
}

fn read_headers(msg: &BorrowedMessage<'_>) -> FrameHeaders {
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

fn infer_loop(mut model: Model, queue: &BatchQueue, sink: &Sink, worker_id: &str, metrics: &Metrics) -> Result<()> {
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
                dead_letter: false,
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
                    sink.dead_letter(meta.key.as_deref(), &meta.value, meta.headers.clone(), &reason, ack)?;
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
                    sink.dead_letter(meta.key.as_deref(), &meta.value, meta.headers.clone(), reason, ack)?;
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
