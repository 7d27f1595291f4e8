//! Sink: predictions and dead letters, produced idempotently. The broker's acknowledgement
//! of a result is what lets the source store the frame's offset.
pub mod prediction;

pub use prediction::{Prediction, TopEntry};

use crate::error::{Error, KafkaContext as _, Result};
use crate::frame::HEADER_ERROR;
use crate::metrics::{DeadLetterReason, FrameTiming, Metrics};
use crate::offsets::OffsetTracker;
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, Message};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Which frame a produced record answers, carried through librdkafka to the delivery callback.
#[derive(Debug, Clone, Copy)]
pub struct Ack {
    pub partition: i32,
    pub offset: i64,
    pub ts_produce_ms: Option<i64>,
    /// Set for a dead letter: why, as a class for the metrics.
    pub dead_letter: Option<DeadLetterReason>,
    /// A prediction's path so far, completed by the ack (see [`crate::metrics::FrameTimes`]).
    pub timing: Option<FrameTiming>,
    /// A dead letter published without the frame's value: the last resort, so a refusal of it
    /// is a failure, not a reason to try again.
    pub bare: bool,
}

impl Ack {
    pub fn new(partition: i32, offset: i64, ts_produce_ms: Option<i64>) -> Self {
        Ack { partition, offset, ts_produce_ms, dead_letter: None, timing: None, bare: false }
    }
}

/// A result the broker refused for what it is: its frame is still in flight and is
/// dead-lettered without its value (see [`ResultSink::take_refused`]).
#[derive(Debug, Clone)]
pub struct Refused {
    pub ack: Ack,
    /// Why, for the dead letter's `kafray.error` header.
    pub reason: String,
}

/// What becomes of each result once the broker answered: the frame is done, refused (dead-letter
/// it without its value), or the delivery failed for good (the worker stops without storing
/// past it). Shared by the Kafka sink and the tests' sinks, so both settle results alike.
pub struct SinkContext {
    tracker: Arc<OffsetTracker>,
    metrics: Arc<Metrics>,
    /// The first delivery that failed for good; the worker stops on it without storing past it.
    failure: Mutex<Option<String>>,
    /// Results the broker refused for what they are (too large for the topic, invalid): they
    /// would be refused again after every restart, so their frames are dead-lettered bare.
    refused: Mutex<Vec<Refused>>,
}

impl SinkContext {
    pub fn new(tracker: Arc<OffsetTracker>, metrics: Arc<Metrics>) -> Self {
        SinkContext { tracker, metrics, failure: Mutex::new(None), refused: Mutex::new(Vec::new()) }
    }

    /// The broker's answer for one result. `topic` is where it went; `error_header` the
    /// `kafray.error` a dead letter carried.
    pub fn settle(&self, ack: &Ack, outcome: Result<(), &KafkaError>, topic: &str, error_header: Option<&str>) {
        match outcome {
            Ok(()) => acknowledged(&self.tracker, &self.metrics, ack),
            Err(KafkaError::MessageProduction(code)) if !ack.bare && refuses_the_record(*code) => {
                let reason = match (ack.dead_letter, error_header) {
                    (None, _) => format!("the broker refused its prediction on {topic}: {code}"),
                    (Some(_), why) => format!(
                        "{} (the broker refused its dead letter on {topic} with the frame's value: {code})",
                        why.unwrap_or("dead-lettered")
                    ),
                };
                tracing::warn!(
                    partition = ack.partition,
                    offset = ack.offset,
                    "{reason}; dead-lettering the frame bare"
                );
                self.refused.lock().unwrap().push(Refused { ack: *ack, reason });
            }
            Err(e) => {
                // The frame stays in flight: its offset is never stored, so it is read again after a restart.
                self.metrics.delivery_failures.fetch_add(1, Relaxed);
                let reason = format!("delivery to {topic} failed for frame {}@{}: {e}", ack.partition, ack.offset);
                tracing::error!("{reason}");
                let mut failure = self.failure.lock().unwrap();
                if failure.is_none() {
                    *failure = Some(reason);
                    *self.metrics.delivery_failed_at.lock().unwrap() = Some((ack.partition, ack.offset));
                }
            }
        }
    }

    pub fn failure(&self) -> Option<String> {
        self.failure.lock().unwrap().clone()
    }

    pub fn take_refused(&self) -> Vec<Refused> {
        std::mem::take(&mut *self.refused.lock().unwrap())
    }
}

impl ClientContext for SinkContext {}

impl ProducerContext for SinkContext {
    type DeliveryOpaque = Box<Ack>;

    fn delivery(&self, result: &DeliveryResult<'_>, ack: Box<Ack>) {
        match result {
            Ok(_) => self.settle(&ack, Ok(()), "", None),
            Err((e, msg)) => {
                let error_header = msg
                    .headers()
                    .and_then(|h| h.iter().find(|h| h.key == HEADER_ERROR))
                    .and_then(|h| h.value)
                    .map(String::from_utf8_lossy);
                self.settle(&ack, Err(e), msg.topic(), error_header.as_deref());
            }
        }
    }
}

/// A broker error that is about this record, not about the broker: sending it again fails again.
fn refuses_the_record(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidRecord | RDKafkaErrorCode::InvalidMessage
    )
}

/// A result is durable: its frame is done, and counted.
pub fn acknowledged(tracker: &OffsetTracker, metrics: &Metrics, ack: &Ack) {
    tracker.done(ack.partition, ack.offset);
    if let Some(reason) = ack.dead_letter {
        metrics.dead_lettered.fetch_add(1, Relaxed);
        metrics.dead_lettered_by[reason as usize].fetch_add(1, Relaxed);
    } else {
        metrics.predicted.fetch_add(1, Relaxed);
        if let Some(ts) = ack.ts_produce_ms {
            metrics.record_latency(now_ms() - ts);
        }
        if let Some(timing) = &ack.timing {
            metrics.frame_done(timing);
        }
    }
}

/// What the worker needs of its output. Sending queues a result; its acknowledgement comes
/// later, through [`acknowledged`], and only then may the frame's offset be stored. The Kafka
/// producer is the real one; a test can put a fake in its place.
pub trait ResultSink: Send + Sync {
    /// Queues one prediction, keyed like its frame.
    fn predict(&self, key: Option<&[u8]>, prediction: &Prediction, truth: Option<&str>, ack: Ack) -> Result<()>;
    /// Queues a rejected frame unchanged, with the reason (and its class, for the metrics).
    fn dead_letter(
        &self,
        key: Option<&[u8]>,
        value: &[u8],
        headers: Option<OwnedHeaders>,
        reason: &str,
        class: DeadLetterReason,
        ack: Ack,
    ) -> Result<()>;
    /// Waits until every queued result is acknowledged (or failed).
    fn flush(&self, timeout: Duration) -> Result<()>;
    /// The first delivery that failed for good, if any: the worker stops on it.
    fn failure(&self) -> Option<String>;
    /// Results the broker refused for what they are, since the last call: their frames are
    /// still in flight, and the worker dead-letters them without their value.
    fn take_refused(&self) -> Vec<Refused>;
}

pub struct Sink {
    producer: ThreadedProducer<SinkContext>,
    output_topic: String,
    dead_letter_topic: String,
    /// The worker's stop request: a record waiting for room in a full queue is given up (its
    /// frame stays unacknowledged and is read again), so a stop is not held up by the broker.
    stop: Arc<AtomicBool>,
    queue_wait_limit: Duration,
}

impl Sink {
    pub fn new(
        brokers: &str,
        output_topic: &str,
        dead_letter_topic: &str,
        extra: &[(String, String)],
        tracker: Arc<OffsetTracker>,
        metrics: Arc<Metrics>,
        stop: Arc<AtomicBool>,
    ) -> Result<Self> {
        let context = SinkContext::new(tracker, metrics);
        let producer = producer_config(brokers, extra)
            .create_with_context(context)
            .kafka_context(|| format!("producer for {brokers}"))?;
        Ok(Sink {
            producer,
            output_topic: output_topic.into(),
            dead_letter_topic: dead_letter_topic.into(),
            stop,
            queue_wait_limit: queue_wait_limit(extra),
        })
    }

    fn send(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: &[u8],
        headers: Option<OwnedHeaders>,
        ack: Ack,
    ) -> Result<()> {
        let mut record = BaseRecord::with_opaque_to(topic, Box::new(ack)).payload(payload);
        if let Some(k) = key {
            record = record.key(k);
        }
        if let Some(h) = headers {
            record = record.headers(h);
        }
        send_waiting(&self.producer, record, self.queue_wait_limit, || {
            if let Some(failure) = self.failure() {
                Some(Error::Delivery(failure))
            } else if self.stop.load(Relaxed) {
                Some(Error::Stopped)
            } else {
                None
            }
        })
        .map_err(|e| match e {
            // librdkafka refused to queue it, and not for what it is: the producer failed (a
            // fatal idempotence error), so no later result can be delivered either.
            Error::Kafka { context, source: KafkaError::MessageProduction(code) } if !refuses_the_record(code) => {
                Error::Delivery(format!("{context}: {code}"))
            }
            e => e,
        })
    }
}

impl ResultSink for Sink {
    fn predict(&self, key: Option<&[u8]>, prediction: &Prediction, truth: Option<&str>, ack: Ack) -> Result<()> {
        let payload = serde_json::to_vec(prediction).expect("a prediction always serialises");
        let headers =
            truth.map(|t| OwnedHeaders::new().insert(Header { key: crate::frame::HEADER_TRUTH, value: Some(t) }));
        self.send(&self.output_topic, key, &payload, headers, ack)
    }

    /// The reason goes in `kafray.error`. A frame too large to publish with the added headers
    /// goes without its value, so it cannot block its partition.
    fn dead_letter(
        &self,
        key: Option<&[u8]>,
        value: &[u8],
        headers: Option<OwnedHeaders>,
        reason: &str,
        class: DeadLetterReason,
        ack: Ack,
    ) -> Result<()> {
        let ack = Ack { dead_letter: Some(class), bare: value.is_empty(), ..ack };
        let (partition, offset) = (ack.partition.to_string(), ack.offset.to_string());
        let with_reason = |reason: &str| {
            headers
                .clone()
                .unwrap_or_default()
                .insert(Header { key: HEADER_ERROR, value: Some(reason) })
                .insert(Header { key: "kafray.source.partition", value: Some(&partition) })
                .insert(Header { key: "kafray.source.offset", value: Some(&offset) })
        };
        match self.send(&self.dead_letter_topic, key, value, Some(with_reason(reason)), ack) {
            Err(Error::Kafka {
                source: KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge), ..
            }) => {
                let reason = format!("{reason} (value of {} bytes left out: too large to publish)", value.len());
                tracing::warn!(
                    partition = ack.partition, offset = ack.offset,
                    "dead letter without its value ({} bytes, too large to republish); the frame stays in the input topic",
                    value.len()
                );
                self.producer.context().metrics.dead_letter_fallbacks.fetch_add(1, Relaxed);
                self.send(&self.dead_letter_topic, key, &[], Some(with_reason(&reason)), Ack { bare: true, ..ack })
            }
            other => other,
        }
    }

    fn flush(&self, timeout: Duration) -> Result<()> {
        self.producer.flush(timeout).kafka_context(|| "flush results".into())
    }

    fn failure(&self) -> Option<String> {
        self.producer.context().failure()
    }

    fn take_refused(&self) -> Vec<Refused> {
        self.producer.context().take_refused()
    }
}

/// Producer settings shared by the sink and the frame publisher: idempotent, a 5 ms linger (0
/// was measured worse: one-record requests swamp the broker, see bench/RESULTS.md),
/// then the user's pass-through properties (consumer-only ones dropped: librdkafka would warn).
pub fn producer_config(brokers: &str, extra: &[(String, String)]) -> ClientConfig {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "200000");
    for (k, v) in extra.iter().filter(|(k, _)| !is_consumer_only(k)) {
        cfg.set(k, v);
    }
    cfg
}

/// Queues a record, waiting while librdkafka's local queue is full (backpressure from the broker).
/// Between tries it asks `give_up`, whose error ends the wait (a stop request, a delivery that
/// failed for good), and it waits at most `limit`: a queue that stays full that long means the
/// broker takes nothing, which the caller must hear about rather than hang.
pub fn send_waiting<C: ProducerContext>(
    producer: &ThreadedProducer<C>,
    mut record: BaseRecord<'_, [u8], [u8], C::DeliveryOpaque>,
    limit: Duration,
    give_up: impl Fn() -> Option<Error>,
) -> Result<()> {
    let started = std::time::Instant::now();
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                if let Some(e) = give_up() {
                    return Err(e);
                }
                if started.elapsed() >= limit {
                    return Err(Error::External(format!(
                        "the producer queue for {} stayed full for {} s: the broker takes nothing; check it",
                        r.topic,
                        limit.as_secs()
                    )));
                }
                record = r;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err((e, r)) => return Err(e).kafka_context(|| format!("produce to {}", r.topic)),
        }
    }
}

/// How long a record may wait for room in the producer queue: librdkafka's `message.timeout.ms`
/// (the time a queued record may take to be delivered) as set in `extra`, else its default.
pub fn queue_wait_limit(extra: &[(String, String)]) -> Duration {
    let ms = extra
        .iter()
        .rev()
        .find(|(k, _)| k == "message.timeout.ms" || k == "delivery.timeout.ms")
        .and_then(|(_, v)| v.parse::<u64>().ok())
        .filter(|&ms| ms > 0)
        .unwrap_or(300_000);
    Duration::from_millis(ms)
}

fn is_consumer_only(key: &str) -> bool {
    key.starts_with("session.")
        || key.starts_with("heartbeat.")
        || key.starts_with("fetch.")
        || key.starts_with("auto.")
        || key.starts_with("partition.assignment")
        || key.starts_with("max.poll")
        || key.starts_with("group.")
        || key.starts_with("enable.auto")
        || key == "isolation.level"
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::producer::DefaultProducerContext;
    use std::sync::atomic::AtomicUsize;

    /// A real librdkafka producer with room for one record, pointed at a closed loopback port:
    /// its queue is full after one send and stays full.
    fn full_producer() -> ThreadedProducer<DefaultProducerContext> {
        let p: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
            .set("bootstrap.servers", "127.0.0.1:1")
            .set("queue.buffering.max.messages", "1")
            .set("message.timeout.ms", "600000")
            .create()
            .unwrap();
        p.send(BaseRecord::<[u8], [u8]>::to("t").payload(&b"first"[..])).unwrap();
        p
    }

    #[test]
    fn a_full_queue_gives_up_on_stop_or_failure_at_once() {
        let producer = full_producer();
        let asked = AtomicUsize::new(0);
        let started = std::time::Instant::now();
        let outcome =
            send_waiting(&producer, BaseRecord::to("t").payload(&b"second"[..]), Duration::from_secs(3600), || {
                (asked.fetch_add(1, Relaxed) == 3).then_some(Error::Stopped)
            });
        assert!(matches!(outcome, Err(Error::Stopped)), "{outcome:?}");
        assert_eq!(asked.load(Relaxed), 4, "asked between tries, and given up when told");
        assert!(started.elapsed() < Duration::from_secs(60), "gave up long before the 1 h limit");
    }

    #[test]
    fn a_full_queue_is_waited_on_at_most_the_limit() {
        let producer = full_producer();
        let outcome = send_waiting(&producer, BaseRecord::to("t").payload(&b"second"[..]), Duration::ZERO, || None);
        let err = outcome.unwrap_err().to_string();
        assert!(err.contains("stayed full") && err.contains("the broker takes nothing"), "{err}");
    }

    #[test]
    fn the_queue_wait_follows_message_timeout() {
        assert_eq!(queue_wait_limit(&[]), Duration::from_secs(300));
        let set = [("message.timeout.ms".to_string(), "5000".to_string())];
        assert_eq!(queue_wait_limit(&set), Duration::from_secs(5));
    }
}
