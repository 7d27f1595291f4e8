//! One worker = one consumer-group member:
//! poll -> decode + preprocess -> micro-batch -> infer -> produce -> (ack) -> store offset.
//! Polling runs on the calling thread, and so does decoding unless a pool of decode threads
//! does it (`decode_threads`); inference runs on a thread of its own, so decoding and inference
//! overlap; librdkafka's own threads do the network I/O and call back on acknowledgement.
//! Decoding and inference meet in a [`BatchQueue`]: the model, once free, takes whatever frames
//! are ready, so a frame waits for the model and not for a batch window.
//!
//! This module starts, restarts and stops a worker; the threads' loops are in `intake.rs`,
//! `decode.rs` and `infer.rs`.
use crate::batch::{BatchPolicy, BatchQueue};
use crate::config::{ValidConfig, WorkerConfig};
use crate::decode::{decode_loop, PoolFailure};
use crate::error::{Error, Result};
use crate::infer::infer_loop;
use crate::intake::{store_safe, Decode, Intake};
use crate::metrics::{Metrics, Snapshot, WorkerState};
use crate::model::{Device, Model};
use crate::offsets::OffsetTracker;
use crate::sink::{ResultSink, Sink};
use crate::source::{self, FrameSource, SourceContext};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a drain at shutdown may wait for the broker to acknowledge what is in flight.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Upper bound on one wait of either thread, so stop requests, stored offsets and the status
/// line are handled promptly. No frame waits for it: a poll returns as soon as a frame is
/// there, and a frame joining the batch wakes the inference thread at once.
pub(crate) const POLL_SLICE: Duration = Duration::from_millis(100);
/// Restarts after undelivered results, in a row without progress past the frame that failed,
/// before the worker gives up (waiting 1, 2, 4 s): enough to ride out one broker fault, not to
/// loop on one frame.
const RESTARTS_IN_A_ROW: u32 = 3;
/// How long a worker waits for its consumer to close before it goes on without it.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// Serves the metrics and probes at `config.metrics_addr`, and loads and warms the model named
/// in `config`, then runs until `stop` is set.
pub fn run(config: &ValidConfig, stop: Arc<AtomicBool>, metrics: Arc<Metrics>) -> Result<Snapshot> {
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
    config: &ValidConfig,
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
    config: &ValidConfig,
    model: Model,
    stop: Arc<AtomicBool>,
    metrics: &Arc<Metrics>,
) -> Result<Snapshot> {
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
    config: &ValidConfig,
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
    let outcome = run_pipeline(config, model, &consumer, sink, tracker, stop, metrics);
    close_consumer(consumer);
    outcome
}

/// Closes a consumer that has left its group, waiting at most [`CLOSE_WAIT`] for it. librdkafka's
/// close looks for the group coordinator until it finds one (confluentinc/librdkafka#3740): with
/// every broker down it would hold a restart, or a stop, until the broker came back. Past the
/// wait the close goes on in the background and ends once a broker answers; nothing is lost by
/// not waiting for it, since only offsets already safe were stored.
fn close_consumer(consumer: source::Source) {
    let (closed_tx, closed) = std::sync::mpsc::channel();
    let closing = std::thread::Builder::new().name("kafray-close".into()).spawn(move || {
        let began = Instant::now();
        drop(consumer);
        if closed_tx.send(()).is_err() {
            tracing::info!("the previous consumer closed after {:.0} s", began.elapsed().as_secs_f64());
        }
    });
    match closing {
        Ok(_) => {
            if closed.recv_timeout(CLOSE_WAIT).is_err() {
                tracing::warn!(
                    "the consumer's close waits for the group coordinator (no broker answers); going on, \
                     and it closes in the background once one does"
                );
            }
        }
        Err(e) => tracing::warn!("no thread to close the consumer on: {e}"),
    }
}

/// The data path from poll to stored offset, over any [`FrameSource`] and [`ResultSink`] (the
/// seam that lets tests run it without a broker). Runs until `stop` is set or something fails;
/// then finishes what is in flight, stores and commits what is safe, and leaves the group.
pub fn run_pipeline<S: FrameSource>(
    config: &ValidConfig,
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
    let decode_threads =
        crate::decode::decode_threads(config.decode_threads, config.threads, crate::decode::cpu_share());
    tracing::info!(
        worker = %worker_id, model = %model.path.display(), device = %model.device, input = %config.input_topic,
        output = %config.output_topic, group = %config.group, batch_size = config.batch_size,
        max_wait_ms = config.max_wait_ms, latency_target_ms = ?config.latency_target_ms, decode_threads,
        "worker started"
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

    // Each pool thread holds one frame and one more may wait for it: enough to keep them busy.
    let (jobs, pool_jobs) = crossbeam_channel::bounded(decode_threads);
    let pool_failure = PoolFailure::default();
    let decode = match decode_threads {
        1 => Decode::Inline { spec: &spec, tensor: vec![0.0; spec.input_len()] },
        _ => Decode::Pool { jobs: Some(jobs), pending: None, failure: &pool_failure },
    };
    let mut intake = Intake::new(config, source, sink.as_ref(), &tracker, &metrics, &queue, decode);
    let outcome = std::thread::scope(|scope| {
        for i in (0..decode_threads).filter(|_| decode_threads > 1) {
            let (jobs, spec, queue, sink) = (pool_jobs.clone(), &spec, &*queue, sink.as_ref());
            let (metrics, infer_stopped, failure) = (&*metrics, &*infer_stopped, &pool_failure);
            let started = std::thread::Builder::new()
                .name(format!("kafray-decode-{i}"))
                .spawn_scoped(scope, move || decode_loop(jobs, spec, queue, sink, metrics, infer_stopped, failure));
            if let Err(e) = started {
                // The threads already started end once the intake lets go of the pool.
                intake.stop_decoding();
                return Err(Error::io("start a decode thread", e));
            }
        }
        drop(pool_jobs);
        let outcome = intake.run(&stop, &infer_stopped);
        // The scope ends once the pool has decoded what it was handed, into the open queue.
        intake.stop_decoding();
        outcome
    });
    // A failure of the pool after the intake stopped (while it drained).
    let outcome = outcome.and_then(|()| pool_failure.take().map_or(Ok(()), Err));
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

/// The path from poll to stored offset without a broker: a fake source and sink around the real
/// intake, batching, inference and offset bookkeeping.
#[cfg(test)]
mod tests;
