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
use crate::metrics::{DeadLetterReason, FrameTiming, Health, Metrics, Snapshot, StageTimers, WorkerState};
use crate::model::{Device, Model, ModelSpec};
use crate::offsets::OffsetTracker;
use crate::sink::{now_ms, Ack, Prediction, Refused, ResultSink, Sink, TopEntry};
use crate::source::{self, ConsumerError, FrameSource, SourceContext};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::Message;
use std::collections::{BTreeSet, HashMap};
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
/// How often safe offsets are stored for the next auto-commit (which runs every second): every
/// 10 ms, so a commit carries what was acknowledged, without a store call per polled frame.
const STORE_EVERY: Duration = Duration::from_millis(10);
/// Restarts after undelivered results, in a row without progress past the frame that failed,
/// before the worker gives up (waiting 1, 2, 4 s): enough to ride out one broker fault, not to
/// loop on one frame.
const RESTARTS_IN_A_ROW: u32 = 3;
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

/// Serves the metrics and probes at `config.metrics_addr`, and loads and warms the model named
/// in `config`, then runs until `stop` is set.
pub fn run(config: &WorkerConfig, stop: Arc<AtomicBool>, metrics: Arc<Metrics>) -> Result<Snapshot> {
    config.validate()?;
    let _metrics_server = serve_metrics(config, &metrics);
    let loaded = Device::parse(&config.device)
        .and_then(|device| Model::load_on(&config.model, config.threads, config.top_k, device));
    match loaded {
        Ok(model) => run_with_model(config, model, stop, metrics),
        Err(e) => Err(failed(&metrics, e)),
    }
}

/// The worker's `/metrics`, `/healthz` and `/readyz` at `config.metrics_addr`, until dropped;
/// `None` where it is off. The endpoint is a window on the worker, not part of its work: a port
/// already taken (a second worker on the host) is a warning, and the stream goes on.
pub fn serve_metrics(config: &WorkerConfig, metrics: &Arc<Metrics>) -> Option<crate::exporter::MetricsServer> {
    if config.metrics_addr.is_empty() {
        return None;
    }
    let labels = vec![("worker".to_string(), config.worker_id())];
    let registry = crate::exporter::registry(metrics.clone(), labels);
    match crate::exporter::MetricsServer::start(&config.metrics_addr, registry, metrics.clone()) {
        Ok(server) => {
            tracing::info!("metrics at http://{}/metrics (probes: /healthz, /readyz)", server.addr);
            *metrics.endpoint.lock().unwrap() = Some(server.addr.to_string());
            Some(server)
        }
        Err(e) => {
            tracing::warn!("no metrics endpoint: {e}");
            None
        }
    }
}

/// Marks the worker failed with `e` as the cause, and gives `e` back.
fn failed(metrics: &Metrics, e: Error) -> Error {
    metrics.set_state(WorkerState::Failed, Some(e.to_string()));
    e
}

/// Runs one worker with a loaded model until `stop` is set; then finishes what is in flight,
/// commits and leaves the group. Returns the final counters. The metrics endpoint is the
/// caller's ([`serve_metrics`]), so that its probes outlive a failure and say so.
pub fn run_with_model(
    config: &WorkerConfig,
    model: Model,
    stop: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
) -> Result<Snapshot> {
    match run_restarting(config, model, stop, &metrics) {
        Ok(last) => {
            metrics.set_state(WorkerState::Stopped, None);
            Ok(last)
        }
        Err(e) => Err(failed(&metrics, e)),
    }
}

fn run_restarting(
    config: &WorkerConfig,
    model: Model,
    stop: Arc<AtomicBool>,
    metrics: &Arc<Metrics>,
) -> Result<Snapshot> {
    config.validate()?;
    // Resolved here, in the process that connects: a secret named by reference travels nowhere else.
    let properties = config.client_properties()?;
    let dead_letter_topic = config.dead_letter_topic();
    if let Some(partitions) = config.create_topics {
        crate::admin::ensure_topics(
            &config.brokers,
            &[
                (config.input_topic.as_str(), partitions),
                (config.output_topic.as_str(), partitions),
                (dead_letter_topic.as_str(), 1),
            ],
            &properties,
        )?;
    }
    crate::admin::check_worker_topics(
        &config.brokers,
        &config.input_topic,
        &config.output_topic,
        &dead_letter_topic,
        &properties,
    )?;
    let (path, device) = (model.path.clone(), model.device);
    let (mut model, mut budget) = (Some(model), RestartBudget::default());
    loop {
        let model = match model.take() {
            Some(m) => m,
            None => Model::load_on(&path, config.threads, config.top_k, device)?,
        };
        match run_connected(config, &properties, model, stop.clone(), metrics.clone()) {
            // Undelivered results were not stored past, so new clients read those frames again.
            Err(e @ Error::Delivery(_)) if !stop.load(Relaxed) => {
                let failed_at = metrics.delivery_failed_at.lock().unwrap().take();
                let Some(backoff) = budget.after_failure(failed_at, metrics) else {
                    return Err(e);
                };
                metrics.restarts.fetch_add(1, Relaxed);
                let why = format!("starting again with new clients after undelivered results: {e}");
                metrics.set_state(WorkerState::Degraded, Some(why));
                tracing::warn!(
                    "{e}; starting again in {} s with new clients ({} of {RESTARTS_IN_A_ROW})",
                    backoff.as_secs(),
                    budget.in_a_row
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

/// Restarts after undelivered results. The count resets only once the worker stored an offset
/// past the frame that failed before: predictions of other frames are no proof that the
/// failing one can ever be delivered, and resetting on them would loop for ever on it.
#[derive(Default)]
struct RestartBudget {
    in_a_row: u32,
    last_failure: Option<LastFailure>,
}

/// The frame whose delivery failed last time (when known), and the offsets stored then.
struct LastFailure {
    frame: Option<(i32, i64)>,
    stored: HashMap<i32, i64>,
}

impl RestartBudget {
    /// After a failure at `failed_at` (when known): how long to wait before starting again, or
    /// `None` to give up.
    fn after_failure(&mut self, failed_at: Option<(i32, i64)>, metrics: &Metrics) -> Option<Duration> {
        let stored = metrics.stored_offsets.lock().unwrap().clone();
        let moved_past = |last: &LastFailure| match last.frame {
            Some((partition, offset)) => stored.get(&partition).is_some_and(|&next| next > offset),
            // No frame named (the producer itself failed): any partition's progress counts.
            None => stored.iter().any(|(p, next)| last.stored.get(p).is_none_or(|b| next > b)),
        };
        if self.last_failure.as_ref().is_some_and(moved_past) {
            self.in_a_row = 0;
        }
        self.last_failure = Some(LastFailure { frame: failed_at, stored });
        if self.in_a_row == RESTARTS_IN_A_ROW {
            return None;
        }
        self.in_a_row += 1;
        Some(Duration::from_secs(1 << (self.in_a_row - 1)))
    }
}

/// One life of the worker's Kafka clients: a consumer in the group and a producer.
fn run_connected(
    config: &WorkerConfig,
    properties: &[(String, String)],
    model: Model,
    stop: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
) -> Result<Snapshot> {
    let dead_letter_topic = config.dead_letter_topic();
    let tracker = Arc::new(OffsetTracker::new());
    // librdkafka's statistics carry the lag: often enough for the status line, for scrapes and
    // for the stall watchdog.
    let watched = config.stall_after_s > 0 || !config.metrics_addr.is_empty();
    let stats_ms = match (config.status_interval_s, watched) {
        (0, false) => 0,
        (0, true) => 5000,
        (s, false) => s * 1000,
        (s, true) => (s * 1000).min(5000),
    };
    // Fresh enough that the watchdog never judges a partition on figures older than half its limit.
    let stats_ms = match config.stall_after_s {
        0 => stats_ms,
        s => stats_ms.min((s * 500).max(500)),
    };
    let consumer = source::subscribe(
        &config.brokers,
        &config.group,
        &config.input_topic,
        properties,
        stats_ms,
        SourceContext::new(tracker.clone(), metrics.clone()),
    )?;
    let sink = Arc::new(Sink::new(
        &config.brokers,
        &config.output_topic,
        &dead_letter_topic,
        properties,
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
        paused: BTreeSet::new(),
        held_since: None,
        owned: HashMap::new(),
        assignment_seen: None,
        input_missing_since: None,
        broker_trouble: None,
        stalled: Vec::new(),
        last_polled: HashMap::new(),
        last_idle_poll: None,
    };
    let outcome = intake.run(&stop);
    if outcome.is_ok() {
        metrics.set_state(WorkerState::Draining, None);
    }
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
    store_safe(source, &config.input_topic, &tracker, &metrics);
    // Nothing of this life stalls any more; a restart starts its own watch.
    metrics.stalled_partitions.lock().unwrap().clear();
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
    fn dead_letter_refused(&self) -> Result<()> {
        for Refused { ack, reason } in self.sink.take_refused() {
            self.metrics.dead_letter_fallbacks.fetch_add(1, Relaxed);
            let reason = format!("{reason} (the frame's value is left out: it stays in the input topic)");
            let class = ack.dead_letter.unwrap_or(DeadLetterReason::ResultRefused);
            let ack = Ack { timing: None, dead_letter: None, ..ack };
            self.sink.dead_letter(None, &[], None, &reason, class, ack)?;
        }
        Ok(())
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
        self.last_polled.insert(partition, decoding);
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
                let ack = Ack::new(partition, offset, ts_produce_ms);
                let headers = msg.headers().map(owned_headers);
                self.sink.dead_letter(msg.key(), value, headers, &rejection.0, DeadLetterReason::Undecodable, ack)?;
            }
        }
        Ok(())
    }
}

/// Stores what became safe, and notes each partition's progress (for the restart budget).
fn store_safe<S: FrameSource>(source: &S, topic: &str, tracker: &OffsetTracker, metrics: &Metrics) {
    for (partition, next) in source::store_safe(source, topic, tracker) {
        metrics.progressed(partition, next);
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
            let ack = Ack::new(meta.partition, meta.offset, meta.ts_produce_ms);
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

/// The path from poll to stored offset without a broker: a fake source and sink around the real
/// intake, batching, inference and offset bookkeeping.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::testing::{pixel_model, Pixel, POISON};
    use crate::sink::SinkContext;
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

    /// Serves events in order; a revoke runs the same handler as the Kafka consumer's. Pauses
    /// are kept per partition across a revoke and an assignment, as librdkafka keeps them: a
    /// paused partition's frames wait in the queue, and only a resume lets them through.
    struct FakeSource {
        events: Mutex<VecDeque<Event>>,
        arrived: Condvar,
        tracker: Arc<OffsetTracker>,
        metrics: Arc<Metrics>,
        assigned: Mutex<BTreeSet<i32>>,
        assignment_changes: AtomicUsize,
        paused: Mutex<BTreeSet<i32>>,
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
        fn paused(&self) -> BTreeSet<i32> {
            self.paused.lock().unwrap().clone()
        }
        /// The first event that can be served now: a frame of a paused partition waits.
        fn next_event(&self, events: &mut VecDeque<Event>) -> Option<Event> {
            let paused = self.paused.lock().unwrap();
            let i = events.iter().position(|e| !matches!(e, Event::Frame(m) if paused.contains(&m.partition())))?;
            events.remove(i)
        }
    }

    impl FrameSource for FakeSource {
        type Frame<'a> = OwnedMessage;

        fn poll(&self, timeout: Duration) -> Option<KafkaResult<OwnedMessage>> {
            let deadline = Instant::now() + timeout;
            let mut events = self.events.lock().unwrap();
            let event = loop {
                if let Some(event) = self.next_event(&mut events) {
                    break event;
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return None;
                }
                events = self.arrived.wait_timeout(events, left).unwrap().0;
            };
            drop(events);
            match event {
                Event::Frame(m) => Some(Ok(m)),
                Event::Revoke(parts) => {
                    source::on_revoke(self, TOPIC, &self.tracker, &parts);
                    let mut assigned = self.assigned.lock().unwrap();
                    assigned.retain(|p| !parts.contains(p));
                    self.metrics.joined.store(!assigned.is_empty(), SeqCst);
                    self.assignment_changes.fetch_add(1, SeqCst);
                    None
                }
                Event::Assign(parts) => {
                    self.assigned.lock().unwrap().extend(parts);
                    self.metrics.joined.store(true, SeqCst);
                    self.assignment_changes.fetch_add(1, SeqCst);
                    None
                }
            }
        }
        fn owned_partitions(&self) -> (u64, Vec<i32>) {
            let changes = self.assignment_changes.load(SeqCst) as u64;
            (changes, self.assigned.lock().unwrap().iter().copied().collect())
        }
        fn pause_partitions(&self, _topic: &str, partitions: &[i32]) -> KafkaResult<()> {
            self.paused.lock().unwrap().extend(partitions);
            Ok(())
        }
        fn resume_partitions(&self, _topic: &str, partitions: &[i32]) -> KafkaResult<()> {
            self.paused.lock().unwrap().retain(|p| !partitions.contains(p));
            self.arrived.notify_all();
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
    /// delivery of one frame for good, or have the broker refuse one frame's prediction or its
    /// dead letter. The broker's answers are settled by the Kafka sink's own [`SinkContext`].
    struct FakeSink {
        context: SinkContext,
        hold: AtomicBool,
        held: Mutex<Vec<Ack>>,
        fail_offset: Option<i64>,
        refuse_offset: Option<i64>,
        /// The broker refuses the dead letter of this frame while it carries the frame's value
        /// (and without it too, if `refuse_bare`).
        refuse_dead_letter_offset: Option<i64>,
        refuse_bare: bool,
        predicted: Mutex<Vec<(i64, usize)>>,
        /// Dead letters sent: offset, reason, and whether the frame's value was left out.
        dead: Mutex<Vec<(i64, String, bool)>>,
    }

    impl FakeSink {
        fn send(&self, ack: Ack) {
            let refuse = |code| self.context.settle(&ack, Err(&KafkaError::MessageProduction(code)), TOPIC, None);
            if Some(ack.offset) == self.refuse_offset && ack.dead_letter.is_none() {
                refuse(RDKafkaErrorCode::MessageSizeTooLarge);
            } else if Some(ack.offset) == self.refuse_dead_letter_offset
                && ack.dead_letter.is_some()
                && (!ack.bare || self.refuse_bare)
            {
                let reason = self.dead.lock().unwrap().last().map(|d| d.1.clone());
                let error = KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge);
                self.context.settle(&ack, Err(&error), "frames.dlq", reason.as_deref());
            } else if Some(ack.offset) == self.fail_offset {
                self.context.settle(
                    &ack,
                    Err(&KafkaError::MessageProduction(RDKafkaErrorCode::RequestTimedOut)),
                    TOPIC,
                    None,
                );
            } else if self.hold.load(SeqCst) {
                self.held.lock().unwrap().push(ack);
            } else {
                self.context.settle(&ack, Ok(()), TOPIC, None);
            }
        }
        /// Acknowledges the held results, in the order given by offset.
        fn release(&self, offsets: &[i64]) {
            let mut held = self.held.lock().unwrap();
            for o in offsets {
                let i = held.iter().position(|a| a.offset == *o).expect("held");
                self.context.settle(&held.remove(i), Ok(()), TOPIC, None);
            }
        }
        fn release_all(&self) {
            let offsets: Vec<i64> = self.held.lock().unwrap().iter().map(|a| a.offset).collect();
            self.release(&offsets);
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
            value: &[u8],
            _headers: Option<OwnedHeaders>,
            reason: &str,
            class: DeadLetterReason,
            ack: Ack,
        ) -> Result<()> {
            self.dead.lock().unwrap().push((ack.offset, reason.to_string(), value.is_empty()));
            self.send(Ack { dead_letter: Some(class), bare: value.is_empty(), ..ack });
            Ok(())
        }
        fn flush(&self, _timeout: Duration) -> Result<()> {
            self.release_all();
            Ok(())
        }
        fn failure(&self) -> Option<String> {
            self.context.failure()
        }
        fn take_refused(&self) -> Vec<Refused> {
            self.context.take_refused()
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
        metrics: Arc<Metrics>,
        stop: Arc<AtomicBool>,
        worker: JoinHandle<Result<Snapshot>>,
    }

    /// What a test changes of the fake broker and the worker's settings.
    #[derive(Default)]
    struct Setup {
        hold: bool,
        fail_offset: Option<i64>,
        refuse_offset: Option<i64>,
        refuse_dead_letter_offset: Option<i64>,
        refuse_bare: bool,
        max_in_flight: Option<usize>,
        stall_after_s: Option<u64>,
    }

    fn start(model: Model, hold: bool, fail_offset: Option<i64>, events: Vec<Event>) -> Harness {
        start_with(model, Setup { hold, fail_offset, ..Setup::default() }, events)
    }

    fn start_with(model: Model, setup: Setup, events: Vec<Event>) -> Harness {
        let (tracker, metrics) = (Arc::new(OffsetTracker::new()), Arc::new(Metrics::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let source = Arc::new(FakeSource {
            events: Mutex::new(VecDeque::new()),
            arrived: Condvar::new(),
            tracker: tracker.clone(),
            metrics: metrics.clone(),
            assigned: Mutex::new([0, 1].into()),
            assignment_changes: AtomicUsize::new(1),
            paused: Default::default(),
            stored: Default::default(),
            committed: Default::default(),
            failing_stores: AtomicUsize::new(0),
            store_calls: AtomicUsize::new(0),
        });
        metrics.joined.store(true, SeqCst);
        source.push(events);
        let sink = Arc::new(FakeSink {
            context: SinkContext::new(tracker.clone(), metrics.clone()),
            hold: AtomicBool::new(setup.hold),
            held: Default::default(),
            fail_offset: setup.fail_offset,
            refuse_offset: setup.refuse_offset,
            refuse_dead_letter_offset: setup.refuse_dead_letter_offset,
            refuse_bare: setup.refuse_bare,
            predicted: Default::default(),
            dead: Default::default(),
        });
        let defaults = WorkerConfig::default();
        let config = WorkerConfig {
            batch_size: 4,
            status_interval_s: 0,
            worker_id: Some("fake".into()),
            max_in_flight: setup.max_in_flight.unwrap_or(defaults.max_in_flight),
            stall_after_s: setup.stall_after_s.unwrap_or(defaults.stall_after_s),
            ..defaults
        };
        let worker = {
            let (source, sink, tracker, stop, metrics) =
                (source.clone(), sink.clone(), tracker.clone(), stop.clone(), metrics.clone());
            std::thread::spawn(move || run_pipeline(&config, model, source.as_ref(), sink, tracker, stop, metrics))
        };
        Harness { source, sink, tracker, metrics, stop, worker }
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
        let h = start(pixel_model(Pixel::default()), true, None, frames(0, 0..8));
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
        let h = start(pixel_model(Pixel::default()), true, None, frames(0, 0..4));
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
        let h = start(pixel_model(Pixel::default()), false, Some(2), frames(0, 0..6));
        let (outcome, committed) = h.ended();
        let err = outcome.unwrap_err().to_string();
        assert!(err.contains("failed for frame 0@2"), "{err}");
        assert_eq!(committed.get(&0), Some(&2), "frames 0 and 1 are safe; 2 must be read again");
    }

    #[test]
    fn a_broken_model_stops_the_worker_without_storing_its_frames() {
        let backend = Pixel::default();
        let model = pixel_model(backend.clone());
        backend.broken.store(true, SeqCst);
        let h = start(model, false, None, frames(0, 0..4));
        let (outcome, committed) = h.ended();
        assert!(outcome.unwrap_err().to_string().contains("the device is gone"));
        assert_eq!(committed.get(&0), None, "the frames are read again after a restart");
    }

    #[test]
    fn a_poison_frame_is_dead_lettered_and_the_stream_goes_on() {
        let events = vec![frame(0, 0, 1), frame(0, 1, POISON as u8), frame(0, 2, 2), frame(0, 3, 3)];
        let h = start(pixel_model(Pixel::default()), false, None, events);
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
        let backend = Pixel::default();
        let model = pixel_model(backend.clone());
        backend.short.store(true, SeqCst);
        let h = start(model, false, None, frames(0, 0..4));
        let (outcome, committed) = h.ended();
        let err = outcome.unwrap_err().to_string();
        assert!(err.contains("scores for a batch of"), "{err}");
        assert_eq!(committed.get(&0), None);
    }

    #[test]
    fn a_prediction_the_broker_refuses_dead_letters_its_frame_and_the_stream_goes_on() {
        let setup = Setup { refuse_offset: Some(1), ..Setup::default() };
        let h = start_with(pixel_model(Pixel::default()), setup, frames(0, 0..4));
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
        let h = start(pixel_model(Pixel::default()), false, None, Vec::new());
        h.source.failing_stores.store(3, SeqCst);
        h.source.push(frames(1, 10..14));
        wait_until("offset 14 stored", || h.source.stored(1) == Some(14));
        assert!(h.source.store_calls.load(SeqCst) >= 4, "three failed stores, then one that worked");
        let (outcome, committed) = h.finish();
        outcome.unwrap();
        assert_eq!(committed[&1], 14);
    }

    #[test]
    fn a_poison_frame_that_comes_first_is_dead_lettered_and_the_stream_goes_on() {
        // The model has classified nothing yet when the poison frame comes, alone in its batch.
        let events = vec![frame(0, 0, POISON as u8), frame(0, 1, 1), frame(0, 2, 2)];
        let h = start(pixel_model(Pixel::default()), false, None, events);
        wait_until("offset 3 stored", || h.source.stored(0) == Some(3));
        let dead = h.sink.dead.lock().unwrap().clone();
        let (outcome, committed) = h.finish();
        let last = outcome.unwrap();
        assert_eq!((last.predicted, last.dead_lettered), (2, 1));
        assert_eq!(dead[0].0, 0);
        assert_eq!(committed[&0], 3);
    }

    #[test]
    fn a_dead_letter_the_broker_refuses_goes_again_without_the_value_and_the_stream_goes_on() {
        let events = vec![frame(0, 0, 1), frame(0, 1, POISON as u8), frame(0, 2, 2), frame(0, 3, 3)];
        let setup = Setup { refuse_dead_letter_offset: Some(1), ..Setup::default() };
        let h = start_with(pixel_model(Pixel::default()), setup, events);
        wait_until("offset 4 stored", || h.source.stored(0) == Some(4) || h.worker.is_finished());
        let dead = h.sink.dead.lock().unwrap().clone();
        let (outcome, committed) = h.finish();
        let last = outcome.expect("a refused dead letter is no reason to stop");
        assert_eq!((last.predicted, last.dead_lettered, last.dead_letter_fallbacks), (3, 1, 1));
        assert_eq!(dead.len(), 2, "the dead letter with the value, then the bare one: {dead:?}");
        let (offset, reason, bare) = &dead[1];
        assert_eq!((*offset, *bare), (1, true), "{dead:?}");
        assert!(
            reason.contains("the model failed on this frame") && reason.contains("refused its dead letter"),
            "the bare dead letter keeps the first reason and says why it is bare: {reason}"
        );
        assert_eq!(committed[&0], 4);
    }

    #[test]
    fn a_bare_dead_letter_the_broker_refuses_stops_the_worker_without_storing_past_it() {
        // Refused even without its value: nothing is left to try, and the frame must be read again.
        let events = vec![frame(0, 0, 1), frame(0, 1, POISON as u8), frame(0, 2, 2)];
        let setup = Setup { refuse_dead_letter_offset: Some(1), refuse_bare: true, ..Setup::default() };
        let h = start_with(pixel_model(Pixel::default()), setup, events);
        let (outcome, committed) = h.ended();
        let err = outcome.unwrap_err().to_string();
        assert!(err.contains("frames.dlq failed for frame 0@1"), "{err}");
        assert_eq!(committed.get(&0), Some(&1));
    }

    #[test]
    fn the_restart_budget_resets_only_past_the_frame_that_failed() {
        let metrics = Metrics::new();
        let mut budget = RestartBudget::default();
        metrics.progressed(0, 10);
        assert_eq!(budget.after_failure(Some((0, 10)), &metrics), Some(Duration::from_secs(1)));
        // Other partitions (and frames of this one before it) go on; the failing frame does not.
        metrics.progressed(1, 500);
        assert_eq!(budget.after_failure(Some((0, 10)), &metrics), Some(Duration::from_secs(2)));
        metrics.progressed(1, 900);
        assert_eq!(budget.after_failure(Some((0, 10)), &metrics), Some(Duration::from_secs(4)));
        metrics.progressed(1, 1200);
        assert_eq!(budget.after_failure(Some((0, 10)), &metrics), None, "the same frame, three times: give up");
        // Progress past the frame that failed: a later failure starts a new count.
        let mut budget = RestartBudget::default();
        budget.after_failure(Some((0, 10)), &metrics);
        budget.after_failure(Some((0, 10)), &metrics);
        metrics.progressed(0, 11);
        assert_eq!(budget.after_failure(Some((0, 40)), &metrics), Some(Duration::from_secs(1)));
    }

    #[test]
    fn a_small_in_flight_bound_drains_a_backlog_without_pausing() {
        let setup = Setup { max_in_flight: Some(4), ..Setup::default() };
        let h = start_with(pixel_model(Pixel::default()), setup, frames(0, 0..400));
        wait_until("offset 400 stored", || h.source.stored(0) == Some(400));
        assert!(h.source.paused().is_empty());
        let (outcome, _) = h.finish();
        let last = outcome.unwrap();
        assert_eq!(last.predicted, 400);
    }

    /// librdkafka keeps an application's pause across a revoke and a re-assignment (the fake
    /// does too): a partition paused under a long hold, taken away and given back must flow.
    #[test]
    fn a_partition_paused_then_revoked_and_given_back_is_resumed() {
        let setup = Setup { hold: true, max_in_flight: Some(4), ..Setup::default() };
        let mut events = frames(0, 0..2);
        events.extend(frames(1, 0..2));
        let h = start_with(pixel_model(Pixel::default()), setup, events);
        wait_until("4 results held", || h.sink.held.lock().unwrap().len() == 4);
        // A hold longer than PAUSE_AFTER pauses both partitions.
        wait_until("both partitions paused", || h.source.paused() == [0, 1].into());
        h.source.push([Event::Revoke(vec![0])]);
        wait_until("partition 0's frames forgotten", || h.tracker.in_flight() == 2);
        h.sink.hold.store(false, SeqCst);
        h.sink.release_all();
        // At light load now: nothing holds, and partition 0 comes back with more frames.
        let mut back = vec![Event::Assign(vec![0])];
        back.extend(frames(0, 2..6));
        back.extend(frames(1, 2..4));
        h.source.push(back);
        wait_until("partition 0 read to offset 6", || h.source.stored(0) == Some(6));
        wait_until("partition 1 read to offset 4", || h.source.stored(1) == Some(4));
        assert!(h.source.paused().is_empty(), "{:?}", h.source.paused());
        let (outcome, _) = h.finish();
        outcome.unwrap();
    }

    #[test]
    fn a_partition_left_unread_while_the_worker_idles_is_stalled_and_the_worker_degraded() {
        let setup = Setup { stall_after_s: Some(1), ..Setup::default() };
        let h = start_with(pixel_model(Pixel::default()), setup, frames(0, 0..3));
        wait_until("offset 3 stored", || h.source.stored(0) == Some(3));
        wait_until("ready", || h.metrics.health().state == WorkerState::Ready);
        // Partition 1 has frames to read (librdkafka's statistics say so) and not one comes:
        // paused behind kafray's back, as hole 1 left partitions, while the worker idles.
        h.source.pause_partitions(TOPIC, &[1]).unwrap();
        h.source.push(frames(1, 0..3));
        *h.metrics.partition_backlog.lock().unwrap() = vec![(0, 0), (1, 3)];
        wait_until("partition 1 stalled", || *h.metrics.stalled_partitions.lock().unwrap() == vec![1]);
        let health = h.metrics.health();
        assert_eq!(health.state, WorkerState::Degraded);
        assert!(health.reason.as_deref().unwrap_or_default().contains("partition(s) [1] stalled"), "{health:?}");
        assert_eq!(h.metrics.partition_stalls.load(SeqCst), 1);
        // It flows again: the stall clears, and the worker is ready.
        h.source.resume_partitions(TOPIC, &[1]).unwrap();
        wait_until("offset 3 stored on partition 1", || h.source.stored(1) == Some(3));
        *h.metrics.partition_backlog.lock().unwrap() = vec![(0, 0), (1, 0)];
        wait_until("ready again", || h.metrics.health().state == WorkerState::Ready);
        assert!(h.metrics.stalled_partitions.lock().unwrap().is_empty());
        let (outcome, _) = h.finish();
        outcome.unwrap();
    }

    #[test]
    fn frames_that_get_no_result_stall_their_partition_until_results_come() {
        let setup = Setup { stall_after_s: Some(1), hold: true, ..Setup::default() };
        let h = start_with(pixel_model(Pixel::default()), setup, frames(1, 0..2));
        wait_until("partition 1 stalled", || *h.metrics.stalled_partitions.lock().unwrap() == vec![1]);
        assert_eq!(h.metrics.health().state, WorkerState::Degraded);
        h.sink.hold.store(false, SeqCst);
        h.sink.release_all();
        wait_until("ready again", || h.metrics.health().state == WorkerState::Ready);
        assert!(h.metrics.stalled_partitions.lock().unwrap().is_empty());
        let (outcome, _) = h.finish();
        outcome.unwrap();
    }

    #[test]
    fn a_partition_that_has_read_everything_is_no_stall_however_long_it_is_quiet() {
        // Lag by the commit can stay above 0 for good (a transaction marker kafray never stores,
        // data deleted below an old commit): the watchdog judges by what is left to read.
        let setup = Setup { stall_after_s: Some(1), ..Setup::default() };
        let h = start_with(pixel_model(Pixel::default()), setup, frames(0, 0..3));
        wait_until("offset 3 stored", || h.source.stored(0) == Some(3));
        *h.metrics.partition_lag.lock().unwrap() = vec![(0, 1), (1, 7)];
        *h.metrics.partition_backlog.lock().unwrap() = vec![(0, 0), (1, 0)];
        // Three health checks, a second each, past the limit.
        let checks = Instant::now();
        wait_until("3 s quiet", || checks.elapsed() >= Duration::from_secs(3));
        assert!(h.metrics.stalled_partitions.lock().unwrap().is_empty());
        assert_eq!(h.metrics.health().state, WorkerState::Ready);
        let (outcome, _) = h.finish();
        outcome.unwrap();
    }
}
