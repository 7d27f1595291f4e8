//! Decode: a polled frame becomes one model input in the batch being built, or a dead letter.
//!
//! With one decode thread the intake thread decodes each frame itself, between polls. With more,
//! the intake thread only polls, and a pool of [`decode_loop`]s decodes: frames then join the
//! batch in the order their decoding ends, not the order they were polled. Their offsets are
//! unaffected: the intake began tracking each frame as it polled it, so an offset is stored only
//! once every frame before it on its partition has a durable result, whatever order they were
//! decoded, batched or acknowledged in.
use crate::batch::{BatchQueue, FrameMeta};
use crate::error::{Error, Result};
use crate::frame::{FrameHeaders, HEADER_FORMAT, HEADER_LABEL, HEADER_SEQ, HEADER_SHAPE};
use crate::metrics::{DeadLetterReason, Metrics, StageTimers};
use crate::model::ModelSpec;
use crate::sink::{now_ms, Ack, ResultSink};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::Message;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Instant;

/// A polled frame, owned, so that it can wait for a decode thread.
pub(crate) struct Polled {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    /// kafray's own headers, read.
    pub frame_headers: FrameHeaders,
    /// The record's headers as they came, for a dead letter.
    pub record_headers: Option<OwnedHeaders>,
    pub ts_produce_ms: Option<i64>,
    /// Record timestamp -> polled.
    pub fetch_us: u64,
    pub value: Vec<u8>,
}

impl Polled {
    pub(crate) fn from_message(msg: &impl Message) -> Self {
        let ts_produce_ms = msg.timestamp().to_millis();
        Polled {
            partition: msg.partition(),
            offset: msg.offset(),
            key: msg.key().map(<[u8]>::to_vec),
            frame_headers: read_headers(msg),
            record_headers: msg.headers().map(owned_headers),
            ts_produce_ms,
            fetch_us: ts_produce_ms.map_or(0, |ts| (now_ms() - ts).max(0) as u64 * 1000),
            value: msg.payload().unwrap_or_default().to_vec(),
        }
    }
}

/// Where a decoded frame goes.
pub(crate) enum Handoff<'a> {
    /// Into the batch at once: the intake waited for room before it polled.
    Checked,
    /// Into the batch once it has room (a pool thread), unless the inference thread stopped
    /// meanwhile: then the frame is dropped and, never acknowledged, read again after a restart.
    WaitForRoom(&'a AtomicBool),
}

/// Decodes `frame` through `tensor` (one model input, reused) into the batch, or dead-letters it.
/// An error is the sink's (a dead letter that could not be sent) and stops the worker.
pub(crate) fn decode_one(
    frame: Polled,
    spec: &ModelSpec,
    tensor: &mut [f32],
    queue: &BatchQueue,
    sink: &dyn ResultSink,
    metrics: &Metrics,
    handoff: Handoff<'_>,
) -> Result<()> {
    let decoding = Instant::now();
    let result = crate::model::preprocess::frame_to_tensor(spec, &frame.value, &frame.frame_headers, tensor);
    let decoded_at = StageTimers::add(&metrics.stages.decode_us, decoding);
    let Polled { partition, offset, key, frame_headers, record_headers, ts_produce_ms, fetch_us, value } = frame;
    match result {
        Ok(()) => {
            let meta = FrameMeta {
                partition,
                offset,
                key,
                seq: frame_headers.seq,
                truth: frame_headers.label,
                ts_produce_ms,
                fetch_us,
                decode_us: decoded_at.duration_since(decoding).as_micros() as u64,
                queued_at: decoded_at,
                value,
                headers: record_headers,
            };
            match handoff {
                Handoff::Checked => queue.push(meta, tensor),
                Handoff::WaitForRoom(infer_stopped) => {
                    let waited = Instant::now();
                    queue.push_when_room(meta, tensor, || infer_stopped.load(Relaxed));
                    StageTimers::add(&metrics.stages.handoff_us, waited);
                }
            }
            Ok(())
        }
        Err(rejection) => {
            tracing::debug!(partition, offset, "dead letter: {rejection}");
            let ack = Ack::new(partition, offset, ts_produce_ms);
            sink.dead_letter(key.as_deref(), &value, record_headers, &rejection.0, DeadLetterReason::Undecodable, ack)
        }
    }
}

/// The decode pool's first error, for the intake to stop on. Once there is one, the pool's
/// threads only drain what they are handed: never acknowledged, those frames are read again
/// after a restart.
#[derive(Default)]
pub(crate) struct PoolFailure {
    failed: AtomicBool,
    error: Mutex<Option<Error>>,
}

impl PoolFailure {
    fn set(&self, e: Error) {
        if !self.failed.swap(true, Relaxed) {
            *self.error.lock().unwrap() = Some(e);
        }
    }

    pub(crate) fn failed(&self) -> bool {
        self.failed.load(Relaxed)
    }

    /// The error, once (the pool stays failed).
    pub(crate) fn take(&self) -> Option<Error> {
        self.error.lock().unwrap().take()
    }
}

/// One thread of the decode pool: decodes the frames `jobs` hands it until the intake closes it.
pub(crate) fn decode_loop(
    jobs: crossbeam_channel::Receiver<Polled>,
    spec: &ModelSpec,
    queue: &BatchQueue,
    sink: &dyn ResultSink,
    metrics: &Metrics,
    infer_stopped: &AtomicBool,
    failure: &PoolFailure,
) {
    // This thread's model input, reused for every frame: the batch copies it into its one
    // contiguous buffer.
    let mut tensor = vec![0.0; spec.input_len()];
    for frame in jobs.iter() {
        if infer_stopped.load(Relaxed) || failure.failed() {
            continue;
        }
        let handoff = Handoff::WaitForRoom(infer_stopped);
        if let Err(e) = decode_one(frame, spec, &mut tensor, queue, sink, metrics, handoff) {
            failure.set(e);
        }
    }
}

/// How many threads decode: `configured`, else what the process's CPU share leaves beside the
/// inference threads (`cpus` - `inference_threads`), at least 1.
pub fn decode_threads(configured: Option<usize>, inference_threads: usize, cpus: usize) -> usize {
    configured.unwrap_or_else(|| cpus.saturating_sub(inference_threads)).max(1)
}

/// The CPUs this process may use (its affinity and cgroup quota), as the standard library reads them.
pub fn cpu_share() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_leaves_the_inference_threads_their_cores_and_decodes_on_at_least_one() {
        assert_eq!(decode_threads(None, 1, 2), 1, "two cores, one inference thread: the intake decodes");
        assert_eq!(decode_threads(None, 2, 8), 6);
        assert_eq!(decode_threads(None, 4, 2), 1, "more inference threads than cores");
        assert_eq!(decode_threads(Some(3), 1, 2), 3, "a configured count wins");
    }
}
