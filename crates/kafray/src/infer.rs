//! The inference thread's side of a worker: take the ready frames as one batch, classify them,
//! and hand each frame's prediction (or dead letter) to the sink. Kept apart from the intake so
//! that the model's side of the hand-off reads in one place.
use crate::batch::{BatchQueue, Next};
use crate::error::{Error, Result};
use crate::metrics::{DeadLetterReason, FrameTiming, Metrics, StageTimers};
use crate::model::Model;
use crate::sink::{now_ms, Ack, Prediction, ResultSink, TopEntry};
use crate::worker::POLL_SLICE;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

/// The inference thread: classifies batches until `queue` is closed and empty. A failure of the
/// model itself, or of the sink, ends it with that error.
pub(crate) fn infer_loop(
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
