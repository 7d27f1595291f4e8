//! Source: the input topic, read as one member of a consumer group.
//! Offsets follow rust-rdkafka's at-least-once recipe: auto-commit on, automatic offset
//! *store* off; the worker stores an offset only once every frame before it has a durable result.
use crate::error::{KafkaContext as _, Result};
use crate::metrics::Metrics;
use crate::offsets::OffsetTracker;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::BorrowedMessage;
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a worker that stops waits for librdkafka to leave the group after its unsubscribe.
/// librdkafka applies KIP-345's rule (a static member, `group.instance.id`, does not leave the
/// group when it closes) to a close but not to an unsubscribe: so the revocation is served and
/// the LeaveGroup request sent before the close, and the partitions move at once instead of
/// after the session timeout. The close then waits for the broker's answer.
const LEAVE_WAIT: Duration = Duration::from_secs(3);

/// Keeps the offset tracker and the metrics in step with the group.
pub struct SourceContext {
    pub tracker: Arc<OffsetTracker>,
    pub metrics: Arc<Metrics>,
    /// Partitions owned now. librdkafka's statistics keep listing a partition after it was
    /// revoked, with its last lag: counted, that stale lag would never fall to 0.
    pub owned: std::sync::Mutex<Vec<i32>>,
    /// Counts changes of the assignment, so the worker notices one without asking each turn.
    pub assignment_changes: AtomicU64,
}

impl SourceContext {
    pub fn new(tracker: Arc<OffsetTracker>, metrics: Arc<Metrics>) -> Self {
        SourceContext { tracker, metrics, owned: Default::default(), assignment_changes: AtomicU64::new(0) }
    }
}

impl ClientContext for SourceContext {
    fn stats(&self, stats: Statistics) {
        let owned = self.owned.lock().unwrap().clone();
        let lags: Vec<(i32, i64)> = stats
            .topics
            .values()
            .flat_map(|t| t.partitions.values())
            .filter(|p| owned.contains(&p.partition) && p.consumer_lag >= 0)
            .map(|p| (p.partition, p.consumer_lag))
            .collect();
        self.metrics.lag.store(lags.iter().map(|(_, lag)| lag).sum(), Relaxed);
        *self.metrics.partition_lag.lock().unwrap() = lags;
        let backlog: Vec<(i32, i64)> = stats
            .topics
            .values()
            .flat_map(|t| t.partitions.values())
            .filter(|p| owned.contains(&p.partition))
            .filter_map(|p| {
                // Where the consumer reads next: its position, else where it will start.
                let position = [p.app_offset, p.committed_offset, p.lo_offset].into_iter().find(|&o| o >= 0)?;
                let end = if p.ls_offset >= 0 { p.ls_offset } else { p.hi_offset };
                (end >= 0).then(|| (p.partition, (end - position).max(0)))
            })
            .collect();
        *self.metrics.partition_backlog.lock().unwrap() = backlog;
    }
}

impl ConsumerContext for SourceContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let elements = tpl.elements();
            let parts: Vec<i32> = elements.iter().map(|e| e.partition()).collect();
            if let Some(topic) = elements.first().map(|e| e.topic().to_string()) {
                on_revoke(consumer, &topic, &self.tracker, &parts);
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) if tpl.count() > 0 => {
                let parts: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
                tracing::info!(partitions = ?parts, "partitions assigned");
                self.metrics.rebalances.fetch_add(1, Relaxed);
            }
            Rebalance::Revoke(tpl) if tpl.count() > 0 => {
                self.metrics.rebalances.fetch_add(1, Relaxed);
            }
            _ => {}
        }
        // From the consumer itself, so incremental (cooperative) rebalances count right too.
        let owned: Vec<i32> =
            consumer.assignment().map(|a| a.elements().iter().map(|e| e.partition()).collect()).unwrap_or_default();
        self.metrics.assigned_partitions.store(owned.len(), Relaxed);
        // A member from its first assignment (maybe empty) until everything is revoked, or it
        // leaves; a revoke of some partitions (cooperative) keeps it one.
        let member = match rebalance {
            Rebalance::Assign(_) => true,
            Rebalance::Revoke(_) => !owned.is_empty(),
            Rebalance::Error(_) => self.metrics.joined.load(Relaxed),
        };
        self.metrics.joined.store(member, Relaxed);
        *self.owned.lock().unwrap() = owned;
        self.assignment_changes.fetch_add(1, Relaxed);
    }
}

pub type Source = BaseConsumer<SourceContext>;

/// What the worker needs of its input. The Kafka consumer is the real one; a test can run the
/// whole path from poll to stored offset against a fake (as Vector and Arroyo test theirs).
pub trait FrameSource {
    type Frame<'a>: Message
    where
        Self: 'a;
    /// The next frame, an error the consumer reports instead, or nothing within `timeout`.
    /// Rebalances happen inside a poll (and call [`on_revoke`] for what is taken away).
    fn poll(&self, timeout: Duration) -> Option<KafkaResult<Self::Frame<'_>>>;
    /// The input partitions owned now, and a count that changes whenever they change.
    fn owned_partitions(&self) -> (u64, Vec<i32>);
    /// Stops fetching these partitions until [`resume_partitions`](Self::resume_partitions). As librdkafka's
    /// application pause, it outlives a revoke and a re-assignment: resume is the only way out.
    fn pause_partitions(&self, topic: &str, partitions: &[i32]) -> KafkaResult<()>;
    fn resume_partitions(&self, topic: &str, partitions: &[i32]) -> KafkaResult<()>;
    /// Stores `next` (the next offset to read) for the partition's next commit.
    fn store_offset(&self, topic: &str, partition: i32, next: i64) -> KafkaResult<()>;
    /// Commits what is stored, now (at shutdown).
    fn commit_now(&self) -> KafkaResult<()>;
    /// Leaves the group.
    fn leave(&self);
}

impl FrameSource for Source {
    type Frame<'a> = BorrowedMessage<'a>;

    fn poll(&self, timeout: Duration) -> Option<KafkaResult<BorrowedMessage<'_>>> {
        BaseConsumer::poll(self, timeout)
    }

    fn owned_partitions(&self) -> (u64, Vec<i32>) {
        let context = self.context();
        // The count first: a change racing with this read is seen again on the next turn.
        let changes = context.assignment_changes.load(Relaxed);
        (changes, context.owned.lock().unwrap().clone())
    }

    fn pause_partitions(&self, topic: &str, partitions: &[i32]) -> KafkaResult<()> {
        Consumer::pause(self, &partition_list(topic, partitions)?)
    }

    fn resume_partitions(&self, topic: &str, partitions: &[i32]) -> KafkaResult<()> {
        Consumer::resume(self, &partition_list(topic, partitions)?)
    }

    fn store_offset(&self, topic: &str, partition: i32, next: i64) -> KafkaResult<()> {
        let mut tpl = TopicPartitionList::new();
        // The list form stores exactly the offset given: the next frame to read.
        tpl.add_partition_offset(topic, partition, Offset::Offset(next))?;
        self.store_offsets(&tpl)
    }

    fn commit_now(&self) -> KafkaResult<()> {
        match self.commit_consumer_state(CommitMode::Sync) {
            // Nothing stored since the last commit.
            Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => Ok(()),
            other => other,
        }
    }

    fn leave(&self) {
        let member = !member_id(self).is_empty();
        self.unsubscribe();
        let began = Instant::now();
        // librdkafka forgets the member id as it sends LeaveGroup; the revocation before that
        // is served inside a poll. A message polled meanwhile is dropped unprocessed: its
        // offset was never stored, so the group reads it again.
        while member && !member_id(self).is_empty() && began.elapsed() < LEAVE_WAIT {
            let _ = BaseConsumer::poll(self, Duration::from_millis(20));
        }
        self.context().metrics.joined.store(false, Relaxed);
    }
}

/// The consumer's group member id ("" before it joined, and once it has left).
fn member_id(consumer: &Source) -> String {
    let rk = consumer.client().native_ptr();
    // SAFETY: `rk` is the live client of `consumer`; rd_kafka_memberid returns a copy it
    // allocated (or null), freed with rd_kafka_mem_free once read.
    unsafe {
        let id = rdkafka::bindings::rd_kafka_memberid(rk);
        if id.is_null() {
            return String::new();
        }
        let copy = std::ffi::CStr::from_ptr(id).to_string_lossy().into_owned();
        rdkafka::bindings::rd_kafka_mem_free(rk, id.cast());
        copy
    }
}

fn partition_list(topic: &str, partitions: &[i32]) -> KafkaResult<TopicPartitionList> {
    let mut tpl = TopicPartitionList::new();
    for &p in partitions {
        tpl.add_partition(topic, p);
    }
    Ok(tpl)
}

/// Partitions were taken away: store what is already safe, so the commit on revocation carries
/// it (fewer duplicates), and forget their frames in flight: their results may be produced
/// again by the next owner.
pub fn on_revoke<S: FrameSource + ?Sized>(source: &S, topic: &str, tracker: &OffsetTracker, partitions: &[i32]) {
    tracing::info!(?partitions, "partitions revoked");
    store_safe(source, topic, tracker);
    tracker.forget(partitions);
}

/// Creates the consumer and subscribes it to `topic`.
pub fn subscribe(
    brokers: &str,
    group: &str,
    topic: &str,
    extra: &[(String, String)],
    stats_interval_ms: u64,
    context: SourceContext,
) -> Result<Source> {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        // How long a broker may hold a fetch when no data is there. Apache Kafka answers a held
        // fetch as soon as data arrives; brokers that do not (Tansu) make a frame wait for it, so
        // it is short: no frame waits more than 5 ms for a held fetch. The price is up to 200
        // empty fetches/s per broker while idle (bench/fetch_path.py measures latency and idle
        // CPU per value; -X fetch.wait.max.ms=500 suits an idle-heavy fleet on Apache Kafka).
        .set("fetch.wait.max.ms", "5")
        // Failover: a worker that dies is noticed within the session timeout, and its partitions
        // go to the others. 6 s is the lowest that Apache Kafka's default
        // group.min.session.timeout.ms allows; heartbeats (at most a third of it) also carry the
        // news of a rebalance to the living. Cooperative-sticky rebalances move only the
        // partitions that change hands: the other workers keep consuming through a rebalance.
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "1000")
        .set("partition.assignment.strategy", "cooperative-sticky")
        // librdkafka prefetches up to queued.max.messages.kbytes (64 MB) and, once past it, waits
        // fetch.queue.backoff.ms (1 s by default) before it fetches again. 64 MB is only ~200
        // camera frames of 1080p, which a decode pool drains in well under a second: the worker
        // then starved for the rest of that second (bench/RESULTS.md, "Camera-size frames").
        .set("fetch.queue.backoff.ms", "10")
        .set("statistics.interval.ms", stats_interval_ms.to_string());
    for (k, v) in extra {
        cfg.set(k, v);
    }
    // Never let a pass-through turn automatic storing back on: it would break at-least-once.
    cfg.set("enable.auto.offset.store", "false");
    let consumer: Source = cfg.create_with_context(context).kafka_context(|| format!("consumer for {brokers}"))?;
    consumer.subscribe(&[topic]).kafka_context(|| format!("subscribe to {topic}"))?;
    Ok(consumer)
}

/// Stores (for the next auto-commit) the offsets that became safe, and confirms to the tracker
/// those that were stored; the others are offered again on the next call. Returns what was
/// stored, as (partition, next offset).
pub fn store_safe<S: FrameSource + ?Sized>(source: &S, topic: &str, tracker: &OffsetTracker) -> Vec<(i32, i64)> {
    let offsets = tracker.committable();
    if offsets.is_empty() {
        return Vec::new();
    }
    // One partition per call, so one partition's failure does not hide the others' success.
    let mut stored = Vec::with_capacity(offsets.len());
    for &(partition, next) in &offsets {
        match source.store_offset(topic, partition, next) {
            Ok(()) => stored.push((partition, next)),
            // The partition was revoked meanwhile; its next owner re-reads from the last commit.
            Err(KafkaError::StoreOffset(RDKafkaErrorCode::State | RDKafkaErrorCode::UnknownPartition)) => {
                tracing::debug!(partition, "offset store skipped: the partition is no longer assigned")
            }
            Err(e) => {
                // Tried again every turn: say so once a second, not every 10 ms.
                static LAST_WARNED_S: AtomicU64 = AtomicU64::new(0);
                let now_s = crate::sink::now_ms() as u64 / 1000;
                if LAST_WARNED_S.swap(now_s, Relaxed) != now_s {
                    tracing::warn!(partition, next, "offset store failed (tried again): {e}");
                }
            }
        }
    }
    tracker.stored(&stored);
    stored
}

/// What an error the consumer reports instead of a frame means for the worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsumerError {
    /// It cannot go on: no retry will help (an authorisation error, librdkafka's fatal error).
    Fatal,
    /// A batch on the input topic cannot be read: compressed with a codec this build lacks, or
    /// corrupt. librdkafka would fetch it again for ever and deliver nothing behind it on its
    /// partition, so the worker stops and says so.
    Unreadable,
    /// The input topic is not there; fatal if it lasts.
    TopicMissing,
    /// No broker answers (all down): librdkafka retries by itself, and the worker says it is
    /// degraded meanwhile.
    Unreachable,
    /// A timeout, a coordinator moving: librdkafka retries by itself.
    Transient,
}

pub fn classify_error(e: &KafkaError) -> ConsumerError {
    use RDKafkaErrorCode as C;
    match e {
        KafkaError::MessageConsumptionFatal(_) => ConsumerError::Fatal,
        KafkaError::MessageConsumption(code) => match code {
            C::Fatal
            | C::TopicAuthorizationFailed
            | C::GroupAuthorizationFailed
            | C::ClusterAuthorizationFailed
            | C::SaslAuthenticationFailed
            | C::Authentication
            | C::InvalidGroupId
            | C::InconsistentGroupProtocol => ConsumerError::Fatal,
            C::BadMessage | C::BadCompression | C::NotImplemented => ConsumerError::Unreadable,
            C::UnknownTopicOrPartition | C::UnknownTopic => ConsumerError::TopicMissing,
            // One broker's connection failing (a rolling restart) is not all of them.
            C::AllBrokersDown => ConsumerError::Unreachable,
            _ => ConsumerError::Transient,
        },
        _ => ConsumerError::Transient,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorisation_and_fatal_errors_stop_the_worker_and_outages_do_not() {
        use RDKafkaErrorCode as C;
        let consumption = KafkaError::MessageConsumption;
        assert_eq!(classify_error(&KafkaError::MessageConsumptionFatal(C::Fatal)), ConsumerError::Fatal);
        assert_eq!(classify_error(&consumption(C::TopicAuthorizationFailed)), ConsumerError::Fatal);
        assert_eq!(classify_error(&consumption(C::GroupAuthorizationFailed)), ConsumerError::Fatal);
        assert_eq!(classify_error(&consumption(C::UnknownTopicOrPartition)), ConsumerError::TopicMissing);
        for unreadable in [C::BadMessage, C::BadCompression, C::NotImplemented] {
            assert_eq!(classify_error(&consumption(unreadable)), ConsumerError::Unreadable, "{unreadable:?}");
        }
        assert_eq!(classify_error(&consumption(C::AllBrokersDown)), ConsumerError::Unreachable);
        for transient in [C::BrokerTransportFailure, C::RequestTimedOut, C::NotCoordinator] {
            assert_eq!(classify_error(&consumption(transient)), ConsumerError::Transient, "{transient:?}");
        }
    }
}
