//! Worker configuration, defined once: this struct's fields are the TOML file's fields, the
//! `KAFRAY_<FIELD>` environment variables, the Python keywords and (with `-` for `_`) the CLI's
//! flags, and its doc comments are their help ([`WorkerConfig::docs`]: the CLI's `--help`,
//! `kafray-ray`'s and the table in docs/reference.md come from it). [`WorkerConfig::layered`]
//! stacks defaults, then a TOML file (unknown fields rejected), then the environment, then flags;
//! tests check that every surface offers every field.
use crate::error::{Error, Result};
use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Everything one worker (one consumer-group member) needs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// Kafka bootstrap servers, `host:port[,host:port]`.
    pub brokers: String,
    /// Topic the frames arrive on.
    pub input_topic: String,
    /// Topic predictions are published to.
    pub output_topic: String,
    /// Topic for frames that cannot be classified.
    #[schemars(extend("x-shown-default" = "<input_topic>.dlq"))]
    pub dead_letter_topic: Option<String>,
    /// Consumer group; workers of one group share the input partitions.
    pub group: String,
    /// Model: an `.onnx` file, or a built-in name (`mnist`, `mobilenet_v2`,
    /// `efficientnet_lite0`, `pool_linear`), which the CLI and the Python package resolve to a
    /// path first.
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
    /// ONNX Runtime intra-op threads per worker (1 is robust when workers share cores).
    pub threads: usize,
    /// Threads that decode and preprocess frames. With 1 the polling thread decodes each frame
    /// itself; with more, a pool decodes while it polls, and frames join batches as their
    /// decoding ends (offsets are still stored in each partition's order). `auto`: the CPUs this
    /// process may use, less `threads`, at least 1, so that workers on a host sized by their
    /// CPU share (as on Ray) do not oversubscribe it.
    #[schemars(extend("x-shown-default" = "auto"))]
    pub decode_threads: Option<usize>,
    /// Where the model runs: `cpu`, `cuda` or `cuda:N` (GPU N; fails where ONNX Runtime has
    /// no CUDA), or `auto` (CUDA where it works, else the CPU with a warning). CUDA needs the
    /// `onnxruntime-gpu` build of libonnxruntime (`ORT_DYLIB_PATH`).
    pub device: String,
    /// How many classes each prediction lists in `top`.
    pub top_k: usize,
    /// Frames polled but not yet acknowledged; polling waits at this bound (backpressure), and
    /// a hold that lasts pauses the partitions.
    pub max_in_flight: usize,
    /// While backpressure is not holding the worker, a partition it owns is stalled when for this
    /// many seconds its oldest frame in flight got no durable result, or it had frames left
    /// unread and gave the worker none while the consumer idled: logged, counted
    /// (`kafray_partition_stalled`), and the worker is degraded and fails `/healthz`. Backpressure
    /// held this long also degrades it. 0 turns the watchdog off.
    pub stall_after_s: u64,
    /// Seconds between status lines; 0 turns them off.
    pub status_interval_s: u64,
    /// Name reported in predictions.
    #[schemars(extend("x-shown-default" = "<hostname>-<pid>"))]
    pub worker_id: Option<String>,
    /// librdkafka properties passed through to the consumer and producer (`-X key=value`), over
    /// those of `kafka_config`. A value may name a secret instead of holding it: `${env:NAME}` or
    /// `${file:PATH:KEY}` (Kafka's config-provider syntax), resolved only when connecting.
    pub kafka: Vec<(String, String)>,
    /// A `client.properties` file of librdkafka properties (Java's format, as `kcat -F` reads):
    /// the place for credentials, which then appear in no process's arguments. Its secrets are
    /// shown as `***` wherever the configuration is shown.
    pub kafka_config: Option<String>,
    /// Accept `enable.ssl.certificate.verification=false` or
    /// `ssl.endpoint.identification.algorithm=none` (refused without it; warned about with it).
    pub insecure_skip_tls_verify: bool,
    /// Serve Prometheus metrics at `http://<this>/metrics`, and the probes `/healthz` and
    /// `/readyz` (`host:port`; port 0 picks a free one, logged). Loopback by default; on Ray,
    /// each actor binds its node's address on a free port. `""` turns the endpoint off. A port
    /// already taken is a warning, not a failure.
    pub metrics_addr: String,
    /// At start, create the input and output topics with this many partitions (and the
    /// dead-letter topic with one) where they are missing. Without it a missing input or output
    /// topic fails the start; a missing dead-letter topic is always created.
    pub create_topics: Option<usize>,
}

/// One setting of the worker as people read it ([`WorkerConfig::docs`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FieldDoc {
    /// The field's name: the TOML key and Python keyword (`-` for `_` in the CLI's flag).
    pub name: String,
    /// The default, as shown in help: `none` where the setting is off unless given.
    pub default: String,
    /// The field's doc comment.
    pub help: String,
}

impl FieldDoc {
    /// The help's first sentence, for `-h` and other short listings.
    pub fn summary(&self) -> &str {
        let ends = self.help.match_indices(". ").map(|(i, _)| i);
        let mut sentence_ends = ends.filter(|&i| !self.help[..i].ends_with("e.g") && !self.help[..i].ends_with("i.e"));
        match sentence_ends.next() {
            Some(i) => &self.help[..=i],
            None => &self.help,
        }
    }
}

/// A default value as help shows it.
fn shown_default(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::Null => "none".into(),
        serde_json::Value::Array(items) if items.is_empty() => "none".into(),
        serde_json::Value::String(s) if s.is_empty() => "\"\"".into(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
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
            decode_threads: None,
            device: "cpu".into(),
            top_k: 5,
            max_in_flight: 1000,
            stall_after_s: 30,
            status_interval_s: 5,
            worker_id: None,
            kafka: Vec::new(),
            kafka_config: None,
            insecure_skip_tls_verify: false,
            metrics_addr: "127.0.0.1:9464".into(),
            create_topics: None,
        }
    }
}

impl WorkerConfig {
    /// Every field's name, sorted: the one list that the CLI's flags, the
    /// environment variables and the Python surfaces are checked against.
    pub fn field_names() -> Vec<String> {
        match serde_json::to_value(Self::default()) {
            Ok(serde_json::Value::Object(fields)) => fields.keys().cloned().collect(),
            _ => unreachable!("a struct serialises to an object"),
        }
    }

    /// Every field with its help (its doc comment) and its default as people read it: the one
    /// source of the CLI's flag help, `kafray-ray`'s, the Python docstring and the table in
    /// docs/reference.md. Sorted by name.
    pub fn docs() -> Vec<FieldDoc> {
        let schema = schemars::schema_for!(WorkerConfig);
        let defaults = serde_json::to_value(Self::default()).unwrap_or_default();
        let Some(fields) = schema.get("properties").and_then(serde_json::Value::as_object) else {
            unreachable!("a struct's schema has properties")
        };
        fields
            .iter()
            .map(|(name, field)| {
                let text = |key: &str| field.get(key).and_then(serde_json::Value::as_str).map(str::to_string);
                FieldDoc {
                    name: name.clone(),
                    default: text("x-shown-default").unwrap_or_else(|| shown_default(&defaults[name])),
                    // Doc comments wrap at 100 columns: the help is their text, unwrapped.
                    help: text("description")
                        .unwrap_or_default()
                        .split('\n')
                        .map(str::trim)
                        .collect::<Vec<_>>()
                        .join(" "),
                }
            })
            .collect()
    }

    /// Reads a TOML file over the defaults.
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::layered(Some(path), &serde_json::json!({}), &[])
    }

    /// The configuration in layers, each over the one before: the defaults; the TOML `file`
    /// (unknown fields rejected); `KAFRAY_<FIELD>` environment variables (e.g.
    /// `KAFRAY_BATCH_SIZE=20`, `KAFRAY_KAFKA='[["session.timeout.ms","6000"]]'`); then
    /// `flags`, whose fields (serialised, unset ones left out) win. `properties` (`-X`) are
    /// added to the `kafka` list of the layers below.
    pub fn layered(file: Option<&Path>, flags: &impl Serialize, properties: &[(String, String)]) -> Result<Self> {
        let mut figment = Figment::from(Serialized::defaults(Self::default()));
        if let Some(path) = file {
            if !path.is_file() {
                return Err(Error::Config(format!("config file {}: no such file", path.display())));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        let fields = Self::field_names();
        // Flags (and Python keywords) name fields: an unknown name is a typo, said plainly.
        if let Ok(serde_json::Value::Object(given)) = serde_json::to_value(flags) {
            if let Some(unknown) = given.keys().find(|k| !fields.contains(k)) {
                return Err(Error::Config(format!(
                    "unknown field `{unknown}`: the worker's settings are {}",
                    fields.join(", ")
                )));
            }
        }
        // Only the fields: other KAFRAY_* variables (KAFRAY_LOG, KAFRAY_MODELS) are not config.
        let env =
            Env::prefixed("KAFRAY_").filter(move |key| fields.iter().any(|f| key.as_str().eq_ignore_ascii_case(f)));
        figment = figment.merge(env).merge(Serialized::defaults(flags));
        let mut config: Self = figment.extract().map_err(|e| Error::Config(figment_message(e)))?;
        config.kafka.extend(properties.iter().cloned());
        Ok(config)
    }

    pub fn dead_letter_topic(&self) -> String {
        self.dead_letter_topic.clone().unwrap_or_else(|| format!("{}.dlq", self.input_topic))
    }

    pub fn worker_id(&self) -> String {
        self.worker_id.clone().unwrap_or_else(default_worker_id)
    }

    /// The librdkafka properties the worker's clients get: `kafka_config`'s, then `kafka`, with
    /// references resolved. [`Self::validate`] checked them.
    pub fn client_properties(&self) -> Result<Vec<(String, String)>> {
        let properties = crate::connection::gather(self.kafka_config.as_deref().map(Path::new), &self.kafka)?;
        crate::connection::resolve(&properties)
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
        if self.decode_threads == Some(0) {
            return bad(
                "--decode-threads must be at least 1 (1: the polling thread decodes), or left out for auto".into()
            );
        }
        crate::model::Device::parse(&self.device)?;
        if self.top_k == 0 {
            return bad("--top-k must be at least 1".into());
        }
        // Resolved first: a reference that names nothing fails here, at start, and a value given
        // by reference is checked like any other.
        let properties = self.client_properties()?;
        for (k, v) in &properties {
            if let Some(why) = weakens_delivery(k, v) {
                return bad(format!("-X {k}={} is refused: {why}", crate::connection::shown(k, v)));
            }
        }
        crate::connection::check_tls_verification(&properties, self.insecure_skip_tls_verify)?;
        Ok(())
    }

    /// This configuration, once [`Self::validate`] passed it: what the worker runs on.
    pub fn validated(self) -> Result<ValidConfig> {
        self.validate()?;
        Ok(ValidConfig(self))
    }
}

/// A [`WorkerConfig`] that [`WorkerConfig::validate`] passed. Only [`WorkerConfig::validated`]
/// makes one, so the worker, which takes nothing else, checks once, where the configuration
/// is made, and never again on its way in.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidConfig(WorkerConfig);

impl ValidConfig {
    /// Replaces `model` by the path `find` gives for it (the CLI and the Python package resolve
    /// a built-in name such as `mnist`). Validation checks nothing of `model` (loading the model
    /// does), so the configuration stays valid.
    pub fn resolve_model(mut self, find: impl FnOnce(&str) -> Result<PathBuf>) -> Result<Self> {
        self.0.model = find(&self.0.model)?.display().to_string();
        Ok(self)
    }
}

impl std::ops::Deref for ValidConfig {
    type Target = WorkerConfig;

    fn deref(&self) -> &WorkerConfig {
        &self.0
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

/// Every error of a layered extraction, each with where its value came from. The `kafka` list
/// may hold secrets, so an error in it names where it came from, never the value found.
fn figment_message(e: figment::Error) -> String {
    e.into_iter()
        .map(|e| match e.path.first().map(String::as_str) {
            Some("kafka") => format!(
                "kafka{}: expected a list of [key, value] pairs, e.g. KAFRAY_KAFKA='[[\"linger.ms\", \"1\"]]'",
                e.metadata.as_ref().map(|m| format!(" (from {})", m.name)).unwrap_or_default()
            ),
            _ => e.to_string(),
        })
        .collect::<Vec<_>>()
        .join("; ")
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
        // Not the whole argument: it may hold a secret after a mistyped separator.
        _ => Err(Error::Config(format!(
            "-X with {} characters and no `=`: expected key=value, e.g. -X session.timeout.ms=6000",
            s.chars().count()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A secret given in the wrong shape is refused without being shown.
    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail's closure returns figment's own error
    fn malformed_kafka_settings_are_refused_without_their_values() {
        let said = parse_property("sasl.password:hunter2").unwrap_err().to_string();
        assert!(said.contains("expected key=value") && !said.contains("hunter2"), "{said}");
        figment::Jail::expect_with(|jail| {
            jail.set_env("KAFRAY_KAFKA", "sasl.password=hunter2");
            let said = WorkerConfig::layered(None, &serde_json::json!({}), &[]).unwrap_err().to_string();
            assert!(said.contains("KAFRAY_KAFKA") && !said.contains("hunter2"), "{said}");
            Ok(())
        });
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail's closure returns figment's own error
    fn file_layer_rejects_unknown_fields() {
        // In a jail: the environment layer reads this process's variables, which other tests set.
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "w.toml",
                "batch_size = 20\ninput_topic = \"cams\"\nkafka = [[\"session.timeout.ms\", \"6000\"]]\n",
            )?;
            let c = WorkerConfig::from_file(Path::new("w.toml")).unwrap();
            assert_eq!(
                (c.batch_size, c.input_topic.as_str(), c.dead_letter_topic().as_str()),
                (20, "cams", "cams.dlq")
            );
            assert_eq!(c.kafka, vec![("session.timeout.ms".to_string(), "6000".to_string())]);
            jail.create_file("w.toml", "batchsize = 20\n")?;
            let err = WorkerConfig::from_file(Path::new("w.toml")).unwrap_err().to_string();
            assert!(
                err.contains("unknown field: found `batchsize`") || err.contains("unknown field `batchsize`"),
                "{err}"
            );
            Ok(())
        });
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail's closure returns figment's own error
    fn layers_stack_defaults_file_environment_then_flags() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("w.toml", "batch_size = 20\ninput_topic = \"cams\"\nmax_in_flight = 300\n")?;
            jail.set_env("KAFRAY_BATCH_SIZE", "30");
            jail.set_env("KAFRAY_LATENCY_TARGET_MS", "25");
            jail.set_env("KAFRAY_KAFKA", r#"[["session.timeout.ms", "9000"]]"#);
            jail.set_env("KAFRAY_LOG", "debug"); // not a field: ignored, not refused
            let flags = serde_json::json!({ "batch_size": 40, "group": "g" });
            let extra = [("linger.ms".to_string(), "1".to_string())];
            let c = WorkerConfig::layered(Some(Path::new("w.toml")), &flags, &extra).unwrap();
            assert_eq!(c.batch_size, 40, "a flag wins over the environment");
            assert_eq!(c.latency_target_ms, Some(25), "the environment wins over the defaults");
            assert_eq!((c.input_topic.as_str(), c.max_in_flight), ("cams", 300), "the file wins over the defaults");
            assert_eq!(c.group, "g");
            assert_eq!(c.kafka, vec![("session.timeout.ms".into(), "9000".into()), ("linger.ms".into(), "1".into())]);
            jail.set_env("KAFRAY_BATCH_SIZE", "many");
            let err = WorkerConfig::layered(None, &serde_json::json!({}), &[]).unwrap_err().to_string();
            assert!(err.contains("BATCH_SIZE") && err.contains("KAFRAY_"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn every_field_is_named_once() {
        let names = WorkerConfig::field_names();
        assert!(
            names.contains(&"brokers".to_string())
                && names.contains(&"create_topics".to_string())
                && names.contains(&"kafka".to_string())
        );
        let unique: std::collections::BTreeSet<_> = names.iter().collect();
        assert_eq!(unique.len(), names.len());
    }

    /// The docs come from the doc comments and the defaults from `Default`: every field has
    /// help, and the defaults read as people expect.
    #[test]
    fn every_field_is_documented_with_its_default() {
        let docs = WorkerConfig::docs();
        let names: Vec<_> = docs.iter().map(|d| d.name.clone()).collect();
        assert_eq!(names, WorkerConfig::field_names());
        for d in &docs {
            assert!(d.help.len() > 10 && d.summary().ends_with('.'), "{}: help {:?}", d.name, d.help);
        }
        let default = |name: &str| docs.iter().find(|d| d.name == name).unwrap().default.clone();
        assert_eq!(default("batch_size"), WorkerConfig::default().batch_size.to_string());
        assert_eq!(default("max_in_flight"), "1000");
        assert_eq!(default("brokers"), "127.0.0.1:9092");
        assert_eq!(default("dead_letter_topic"), "<input_topic>.dlq");
        assert_eq!(default("latency_target_ms"), "none");
        assert_eq!(default("kafka"), "none");
        assert_eq!(default("insecure_skip_tls_verify"), "false");
        let model = docs.iter().find(|d| d.name == "model").unwrap();
        assert!(model.summary().starts_with("Model: an `.onnx` file") && model.help.contains("efficientnet_lite0"));
    }

    #[test]
    fn validation_names_the_fix() {
        let c = WorkerConfig { batch_size: 50, max_in_flight: 10, ..Default::default() };
        assert!(c.validate().unwrap_err().to_string().contains("raise --max-in-flight"));
        let c = WorkerConfig { output_topic: "frames".into(), ..Default::default() };
        assert!(c.validate().is_err());
        let c = WorkerConfig { kafka: vec![("enable.auto.offset.store".into(), "true".into())], ..Default::default() };
        assert!(c.validate().is_err());
        let c = WorkerConfig { decode_threads: Some(0), ..Default::default() };
        assert!(c.validate().unwrap_err().to_string().contains("left out for auto"));
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
