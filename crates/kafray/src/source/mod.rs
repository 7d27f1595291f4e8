//! Source: the input topic, read as one member of a consumer group.
//! Offsets follow rust-rdkafka's at-least-once recipe: auto-commit on, automatic offset
//! *store* off; the worker stores an offset only once every frame before it has a durable result.
use crate::error::{KafkaContext as _, Result};
use crate::metrics::Metrics;
use crate::offsets::OffsetTracker;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

/// Keeps the offset tracker and the metrics in step with the group.
pub struct SourceContext {
    pub tracker: Arc<OffsetTracker>,
    pub metrics: Arc<Metrics>,
}

impl ClientContext for SourceContext {
    fn stats(&self, stats: Statistics) {
        let lag: i64 = stats
            .topics
            .values()
            .flat_map(|t| t.partitions.values())
            .filter(|p| p.partition >= 0 && p.consumer_lag >= 0)
            .map(|p| p.consumer_lag)
            .sum();
        self.metrics.lag.store(lag, Relaxed);
    }
}

impl ConsumerContext for SourceContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let elements = tpl.elements();
            let parts: Vec<i32> = elements.iter().map(|e| e.partition()).collect();
            tracing::info!(partitions = ?parts, "partitions revoked");
            // Store what is already safe, so the commit on revocation carries it (fewer duplicates).
            if let Some(topic) = elements.first().map(|e| e.topic().to_string()) {
                store(consumer, &topic, &self.tracker.take_committable());
            }
            // Results still in flight for these partitions may be produced again by the next owner.
            self.tracker.forget(&parts);
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let parts: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
            tracing::info!(partitions = ?parts, "partitions assigned");
        }
        // From the consumer itself, so incremental (cooperative) rebalances count right too.
        let owned = consumer.assignment().map(|a| a.count()).unwrap_or(0);
        self.metrics.assigned_partitions.store(owned, Relaxed);
    }
}

pub type Source = BaseConsumer<SourceContext>;

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

/// Stores (for the next auto-commit) the offsets that became safe.
pub fn store(consumer: &Source, topic: &str, offsets: &[(i32, i64)]) {
    if offsets.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    for &(partition, next) in offsets {
        // The list form stores exactly the offset given: the next frame to read.
        let _ = tpl.add_partition_offset(topic, partition, Offset::Offset(next));
    }
    if let Err(e) = consumer.store_offsets(&tpl) {
        // Happens when a partition was revoked meanwhile; its next owner re-reads from the last commit.
        tracing::debug!("offset store skipped: {e}");
    }
}
