//! Topic administration through the Kafka admin API (works on any Kafka-compatible broker;
//! brokers without topic auto-creation need it).
use crate::connection::{cannot_mend, explain_unreachable, ErrorRecorder};
use crate::error::{Error, KafkaContext as _, Result};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::producer::{BaseProducer, Producer as _};
use rdkafka::types::RDKafkaErrorCode;
use std::time::{Duration, Instant};

/// The settings every admin request uses: the connection's (security, SASL, TLS), no more.
fn admin_config(brokers: &str, extra: &[(String, String)]) -> ClientConfig {
    let mut cfg = ClientConfig::new();
    // An admin client is a producer to librdkafka, and a producer's metadata request asks the
    // broker to auto-create the topic: the existence check would create it with the default count.
    cfg.set("bootstrap.servers", brokers).set("allow.auto.create.topics", "false");
    for (k, v) in extra {
        // What connecting takes: TLS, SASL (with an OIDC endpoint's own TLS), sockets, names.
        let connection = ["security.", "sasl.", "ssl.", "enable.ssl.", "enable.sasl.", "https.", "socket.", "client."];
        if connection.iter().any(|prefix| k.starts_with(prefix)) || k == "broker.address.family" {
            cfg.set(k, v);
        }
    }
    cfg
}

fn admin(brokers: &str, extra: &[(String, String)]) -> Result<AdminClient<DefaultClientContext>> {
    admin_config(brokers, extra).create().kafka_context(|| format!("admin client for {brokers}"))
}

/// How long the first request waits for a broker that does not answer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Number of partitions of `topic`, or `None` when it does not exist.
///
/// The first request of a worker, `produce` and `eval`: when it cannot be answered, it fails
/// with why (authentication, TLS) and the fix, from what librdkafka reported; a failure that
/// waiting cannot mend (a wrong password, an untrusted certificate) fails at once.
pub fn partition_count(brokers: &str, topic: &str, extra: &[(String, String)]) -> Result<Option<usize>> {
    // A producer rather than an admin client: its poll serves the log and error events (on the
    // main queue, which an admin client never reads), so the cause reaches the recorder.
    let mut config = admin_config(brokers, extra);
    // Info, whatever the log filter: a plaintext client's failure against a TLS listener is
    // logged at this level only (the recorder passes it on to the filter).
    config.set_log_level(RDKafkaLogLevel::Info);
    let client: BaseProducer<ErrorRecorder> =
        config.create_with_context(ErrorRecorder::default()).kafka_context(|| format!("client for {brokers}"))?;
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    loop {
        match client.client().fetch_metadata(Some(topic), Duration::from_secs(1)) {
            Ok(md) => {
                return Ok(md
                    .topics()
                    .iter()
                    .find(|t| t.name() == topic && t.error().is_none())
                    .map(|t| t.partitions().len()))
            }
            Err(e) => {
                client.poll(Duration::from_millis(50));
                let reported = client.context().last();
                if reported.as_deref().is_some_and(cannot_mend) || Instant::now() >= deadline {
                    let request = format!("metadata of {topic}: {e}");
                    return Err(Error::External(explain_unreachable(brokers, &request, reported.as_deref(), extra)));
                }
            }
        }
    }
}

/// Creates the topics that do not exist yet; existing ones are left as they are.
/// The replication factor is the broker's default.
pub fn ensure_topics(brokers: &str, topics: &[(&str, usize)], extra: &[(String, String)]) -> Result<()> {
    let client = admin(brokers, extra)?;
    let mut missing = Vec::new();
    for &(name, partitions) in topics {
        if partition_count(brokers, name, extra)?.is_none() {
            missing.push((name, partitions));
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let create = |replication: i32| -> Result<Vec<(String, RDKafkaErrorCode)>> {
        let new: Vec<NewTopic> = missing
            .iter()
            .map(|&(n, p)| NewTopic::new(n, p.max(1) as i32, TopicReplication::Fixed(replication)))
            .collect();
        let results =
            futures_executor::block_on(client.create_topics(&new, &opts)).kafka_context(|| "create topics".into())?;
        Ok(results
            .into_iter()
            .filter_map(|r| r.err())
            .filter(|(_, code)| *code != RDKafkaErrorCode::TopicAlreadyExists)
            .collect())
    };
    let mut failed = create(-1)?;
    // Brokers older than KIP-464 do not know "-1 = default replication": fall back to 1.
    if failed
        .iter()
        .any(|(_, c)| matches!(c, RDKafkaErrorCode::InvalidReplicationFactor | RDKafkaErrorCode::InvalidRequest))
    {
        failed = create(1)?;
    }
    match failed.first() {
        None => {
            tracing::info!(topics = ?missing, "created topics");
            Ok(())
        }
        Some((topic, code)) => Err(Error::External(format!("cannot create topic {topic} on {brokers}: {code}"))),
    }
}

/// Checks at a worker's start that its topics exist, so that a typo fails at once with the fix
/// rather than leaving a worker that reports running and does nothing. A missing dead-letter
/// topic is created (one partition): it is the worker's own, and a stream must not stop for it.
pub fn check_worker_topics(
    brokers: &str,
    input: &str,
    output: &str,
    dead_letter: &str,
    extra: &[(String, String)],
) -> Result<()> {
    for (role, topic) in [("input", input), ("output", output)] {
        if partition_count(brokers, topic, extra)?.is_none() {
            return Err(Error::Config(format!(
                "the {role} topic {topic:?} does not exist on {brokers}: create it (`kafray worker --create-topics N` \
                 creates missing topics with N partitions) or fix the topic name"
            )));
        }
    }
    if partition_count(brokers, dead_letter, extra)?.is_none() {
        tracing::info!(topic = dead_letter, "the dead-letter topic is missing: creating it");
        ensure_topics(brokers, &[(dead_letter, 1)], extra)?;
    }
    Ok(())
}
