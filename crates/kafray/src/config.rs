//! Worker configuration. Layered by the binary: defaults, then a TOML file (unknown fields
//! rejected), then `KAFRAY_*` environment variables, then flags.
use crate::error::{Error, Result};
use serde::Deserialize;
use std::path::Path;

/// Everything one worker (one consumer-group member) needs.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// Kafka bootstrap servers, `host:port[,host:port]`.
    pub brokers: String,
    /// Topic the frames arrive on.
    pub input_topic: String,
    /// Topic predictions are published to.
    pub output_topic: String,
    /// Topic for frames that cannot be classified; default `<input_topic>.dlq`.
    pub dead_letter_topic: Option<String>,
    /// Consumer group; workers of one group share the input partitions.
    pub group: String,
    /// Model: a path to an `.onnx` file or a built-in name (`mnist`, `mobilenet_v2`, `efficientnet_lite0`).
    pub model: String,
    /// Largest micro-batch. The model, once free, takes every frame that is ready up to this,
    /// so batches are small at light load and grow under load by themselves.
    pub batch_size: usize,
    /// Optional fill wait: a partial batch waits up to this long for more frames before the
    /// model takes it. 0 (the default): never wait, the lowest latency.
    pub max_wait_ms: u64,
    /// Optional latency objective, ms, for a frame inside the worker (queueing + inference +
    /// handing its result to the producer): the batch limit then starts at 1 and is steered
    /// by AIMD (up by one on slack, down a quarter on a breach), never above `batch_size`.
    pub latency_target_ms: Option<u64>,
    /// ONNX Runtime intra-op threads per worker.
    pub threads: usize,
    /// How many classes each prediction lists in `top`.
    pub top_k: usize,
    /// Frames polled but not yet acknowledged; polling pauses at this bound (backpressure).
    pub max_in_flight: usize,
    /// Seconds between status lines; 0 turns them off.
    pub status_interval_s: u64,
    /// Name reported in predictions; default `<hostname>-<pid>`.
    pub worker_id: Option<String>,
    /// librdkafka properties passed through to the consumer and producer (`-X key=value`).
    pub kafka: Vec<(String, String)>,
    /// At start, create the input and output topics with this many partitions (and the
    /// dead-letter topic with one) where they are missing. Without it a missing input or output
    /// topic fails the start; a missing dead-letter topic is always created.
    pub create_topics: Option<usize>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            brokers: "127.0.0.1:9092".into(),
            input_topic: "frames".into(),
            output_topic: "predictions".into(),
            dead_letter_topic: None,
            group: "kafray".into(),
            model: "mnist".into(),
            batch_size: 10,
            max_wait_ms: 0,
            latency_target_ms: None,
            threads: 1,
            top_k: 5,
            max_in_flight: 1000,
            status_interval_s: 5,
            worker_id: None,
            kafka: Vec::new(),
            create_topics: None,
        }
    }
}

impl WorkerConfig {
    /// Reads a TOML file over the defaults.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).map_err(|e| Error::io(format!("config file {}", path.display()), e))?;
        toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }

    pub fn dead_letter_topic(&self) -> String {
        self.dead_letter_topic.clone().unwrap_or_else(|| format!("{}.dlq", self.input_topic))
    }

    pub fn worker_id(&self) -> String {
        self.worker_id.clone().unwrap_or_else(default_worker_id)
    }

    /// Checks values that would otherwise fail later and less clearly.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Config(msg));
        if self.brokers.trim().is_empty() {
            return bad("brokers is empty: pass --brokers host:port".into());
        }
        for (name, topic) in [("input", &self.input_topic), ("output", &self.output_topic)] {
            if topic.trim().is_empty() {
                return bad(format!("the {name} topic name is empty"));
            }
        }
        if self.input_topic == self.output_topic || self.input_topic == self.dead_letter_topic() {
            return bad(format!(
                "input topic {:?} is also an output: the worker would read its own results; choose another --output-topic/--dead-letter-topic",
                self.input_topic
            ));
        }
        if self.batch_size == 0 || self.batch_size > 4096 {
            return bad(format!("--batch-size {} is out of range: use 1..=4096", self.batch_size));
        }
        if self.max_in_flight < self.batch_size {
            return bad(format!(
                "--max-in-flight {} is below --batch-size {}: a batch could never fill; raise --max-in-flight",
                self.max_in_flight, self.batch_size
            ));
        }
        if self.latency_target_ms == Some(0) {
            return bad("--latency-target-ms 0 cannot be met: give a target in ms (e.g. 25), or leave it out".into());
        }
        if self.create_topics == Some(0) {
            return bad("--create-topics 0: a topic needs at least 1 partition".into());
        }
        if self.threads == 0 {
            return bad("--threads must be at least 1".into());
        }
        if self.top_k == 0 {
            return bad("--top-k must be at least 1".into());
        }
        for (k, v) in &self.kafka {
            if let Some(why) = weakens_delivery(k, v) {
                return bad(format!("-X {k}={v} is refused: {why}"));
            }
        }
        Ok(())
    }
}

/// Why a pass-through property would break at-least-once delivery (or its bound on duplicates),
/// if it would. The worker's guarantee rests on the producer waiting for every in-sync replica
/// without duplicating on retry, and on offsets that are stored only after that acknowledgement
/// and then committed regularly.
fn weakens_delivery(key: &str, value: &str) -> Option<String> {
    let v = value.trim().to_ascii_lowercase();
    let is_true = matches!(v.as_str(), "true" | "1" | "yes" | "on");
    match key {
        "enable.auto.offset.store" | "group.id" | "bootstrap.servers" => Some(format!(
            "{key} is set by kafray itself (offsets are stored only after delivery); use the dedicated flag or leave it out"
        )),
        "acks" | "request.required.acks" if !matches!(v.as_str(), "all" | "-1") => Some(format!(
            "results must be acknowledged by every in-sync replica (acks=all) before the frame's offset is committed; \
             with {key}={value} a broker failure can lose results whose frames count as done. Leave {key} out"
        )),
        "enable.idempotence" if !is_true => Some(
            "the results producer is idempotent so that its retries cannot write a result twice or out of order; \
             leave enable.idempotence out"
                .into(),
        ),
        "enable.auto.commit" if !is_true => Some(
            "offsets are committed in the background once stored; without it nothing is committed until a clean \
             stop, and a crash re-reads everything since the start. Leave enable.auto.commit out"
                .into(),
        ),
        "auto.offset.reset" if !matches!(v.as_str(), "earliest" | "smallest" | "beginning") => Some(format!(
            "a group without a committed offset (a new group, or one whose offset expired) would skip the frames \
             already in the topic; kafray reads from the earliest. Leave {key} out"
        )),
        "transactional.id" => Some(
            "kafray's results producer is idempotent, not transactional; a transactional id would make every \
             result wait for a transaction that kafray never commits. Leave it out"
                .into(),
        ),
        _ => None,
    }
}

fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "host".into());
    format!("{host}-{}", std::process::id())
}

/// Parses a `key=value` librdkafka property.
pub fn parse_property(s: &str) -> Result<(String, String)> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
        _ => Err(Error::Config(format!("-X {s:?}: expected key=value, e.g. -X session.timeout.ms=6000"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_layer_rejects_unknown_fields() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.toml");
        std::fs::write(
            &path,
            "batch_size = 20\ninput_topic = \"cams\"\nkafka = [[\"session.timeout.ms\", \"6000\"]]\n",
        )
        .unwrap();
        let c = WorkerConfig::from_file(&path).unwrap();
        assert_eq!((c.batch_size, c.input_topic.as_str(), c.dead_letter_topic().as_str()), (20, "cams", "cams.dlq"));
        assert_eq!(c.kafka, vec![("session.timeout.ms".to_string(), "6000".to_string())]);
        std::fs::write(&path, "batchsize = 20\n").unwrap();
        let err = WorkerConfig::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("unknown field `batchsize`"), "{err}");
    }

    #[test]
    fn validation_names_the_fix() {
        let c = WorkerConfig { batch_size: 50, max_in_flight: 10, ..Default::default() };
        assert!(c.validate().unwrap_err().to_string().contains("raise --max-in-flight"));
        let c = WorkerConfig { output_topic: "frames".into(), ..Default::default() };
        assert!(c.validate().is_err());
        let c = WorkerConfig { kafka: vec![("enable.auto.offset.store".into(), "true".into())], ..Default::default() };
        assert!(c.validate().is_err());
        assert!(WorkerConfig::default().validate().is_ok());
    }

    #[test]
    fn properties_that_weaken_delivery_are_refused() {
        let with =
            |k: &str, v: &str| WorkerConfig { kafka: vec![(k.into(), v.into())], ..Default::default() }.validate();
        for (k, v) in [
            ("acks", "0"),
            ("acks", "1"),
            ("request.required.acks", "1"),
            ("enable.idempotence", "false"),
            ("enable.auto.commit", "false"),
            ("auto.offset.reset", "latest"),
            ("transactional.id", "t"),
            ("group.id", "g"),
        ] {
            let err = with(k, v).expect_err(&format!("-X {k}={v} must be refused")).to_string();
            assert!(err.contains(&format!("-X {k}={v} is refused")), "{err}");
        }
        // The settings kafray itself uses, and unrelated ones, pass.
        for (k, v) in [
            ("acks", "all"),
            ("acks", "-1"),
            ("enable.idempotence", "true"),
            ("auto.offset.reset", "earliest"),
            ("session.timeout.ms", "6000"),
            ("linger.ms", "0"),
        ] {
            assert!(with(k, v).is_ok(), "-X {k}={v} must pass");
        }
    }

    #[test]
    fn properties_parse() {
        assert_eq!(parse_property("a.b=1").unwrap(), ("a.b".into(), "1".into()));
        assert!(parse_property("nonsense").is_err());
    }
}
