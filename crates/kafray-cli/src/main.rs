//! `kafray`: classify live image streams from Kafka with ONNX models.
mod bench;
mod demo;
mod produce;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use kafray::config::{parse_property, FieldDoc, ValidConfig, WorkerConfig};
use kafray::metrics::Metrics;
use kafray::ErrorKind;
use kafray_tools::eval::{self, EvalOptions};
use serde::Serialize;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "kafray", version, about = "Classify live image streams from Kafka with ONNX models")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Stream the 10,000 MNIST test digits through 2 workers and report accuracy, throughput
    /// and latency (starts a local broker unless --brokers is given).
    Demo(demo::DemoArgs),
    /// Publish frames: MNIST digits, image files, or a synthetic camera fleet.
    Produce(produce::ProduceArgs),
    /// Run one worker: consume frames, classify them in micro-batches, publish predictions.
    Worker(WorkerArgs),
    /// Read the predictions topic back: count, duplicates, accuracy, throughput, latency.
    Eval(EvalArgs),
    /// Measure raw model throughput and end-to-end pipeline throughput; write CSV.
    Bench(bench::BenchArgs),
}

/// The cluster to use, as kcat takes it.
#[derive(Args, Clone, Default)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers.
    #[arg(short, long, global = true, env = "KAFRAY_BROKERS", default_value = "127.0.0.1:9092")]
    pub brokers: String,
    #[command(flatten)]
    pub connection: ConnectionArgs,
}

impl KafkaArgs {
    pub fn properties(&self) -> kafray::Result<Vec<(String, String)>> {
        self.connection.properties()
    }
}

/// How every client connects: librdkafka properties from a file and flags (the worker's own
/// flags of the same names set its `WorkerConfig`).
#[derive(Args, Clone, Default)]
pub struct ConnectionArgs {
    /// librdkafka property passed through, e.g. -X security.protocol=SASL_SSL (repeatable); a
    /// value may be ${env:NAME} or ${file:PATH:KEY}.
    #[arg(short = 'X', global = true, value_name = "KEY=VALUE")]
    pub properties: Vec<String>,
    /// client.properties file of librdkafka properties (-X wins over it): the place for
    /// credentials, which then appear in no process's arguments.
    #[arg(long, global = true, env = "KAFRAY_KAFKA_CONFIG", value_name = "FILE")]
    pub kafka_config: Option<PathBuf>,
    /// Accept properties that turn TLS certificate or hostname verification off.
    #[arg(long, global = true)]
    pub insecure_skip_tls_verify: bool,
}

impl ConnectionArgs {
    /// The properties a client gets: the file's, then -X, checked and with references resolved.
    pub fn properties(&self) -> kafray::Result<Vec<(String, String)>> {
        let given: Vec<_> = self.properties.iter().map(|p| parse_property(p)).collect::<Result<_, _>>()?;
        kafray::connection::client_properties(self.kafka_config.as_deref(), &given, self.insecure_skip_tls_verify)
    }
}

/// The batching flags, shared by `worker` and `demo`; each overrides the config when given.
/// Their help is the field's doc comment ([`cli_command`]).
#[derive(Args, Clone, Default, Serialize)]
pub struct BatchArgs {
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_wait_ms: Option<u64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_target_ms: Option<u64>,
}

impl BatchArgs {
    pub fn apply(&self, c: &mut WorkerConfig) {
        if let Some(v) = self.batch_size {
            c.batch_size = v;
        }
        if let Some(v) = self.max_wait_ms {
            c.max_wait_ms = v;
        }
        if self.latency_target_ms.is_some() {
            c.latency_target_ms = self.latency_target_ms;
        }
    }
}

/// Each flag sets the `WorkerConfig` field of its name. Flags win over `KAFRAY_<FIELD>`
/// variables, which win over the config file, which wins over the defaults. Their help is the
/// field's doc comment, with its default ([`cli_command`]).
#[derive(Args, Serialize)]
struct WorkerArgs {
    /// TOML file with worker settings (field names as in `WorkerConfig`; unknown fields are rejected).
    #[arg(long, env = "KAFRAY_CONFIG")]
    #[serde(skip)]
    config: Option<PathBuf>,
    #[arg(short, long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    brokers: Option<String>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    input_topic: Option<String>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    output_topic: Option<String>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    dead_letter_topic: Option<String>,
    #[arg(short, long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    group: Option<String>,
    #[arg(short, long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<String>,
    #[command(flatten)]
    #[serde(flatten)]
    batching: BatchArgs,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    threads: Option<usize>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    decode_threads: Option<usize>,
    #[arg(long, value_name = "DEVICE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    device: Option<String>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    top_k: Option<usize>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_in_flight: Option<usize>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    stall_after_s: Option<u64>,
    #[arg(long = "status-interval")]
    #[serde(skip_serializing_if = "Option::is_none")]
    status_interval_s: Option<u64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    worker_id: Option<String>,
    #[arg(long, value_name = "ADDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    metrics_addr: Option<String>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    create_topics: Option<usize>,
    #[arg(short = 'X', value_name = "KEY=VALUE")]
    #[serde(skip)]
    properties: Vec<String>,
    #[arg(long, value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    kafka_config: Option<String>,
    #[arg(long)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    insecure_skip_tls_verify: bool,
}

impl WorkerArgs {
    fn to_config(&self) -> kafray::Result<ValidConfig> {
        let properties: Vec<_> = self.properties.iter().map(|p| parse_property(p)).collect::<Result<_, _>>()?;
        let c = WorkerConfig::layered(self.config.as_deref(), self, &properties)?.validated()?;
        // The engine takes a path: a built-in name (mnist, ...) is found in the checkout here.
        c.resolve_model(kafray::model::find_model)
    }
}

#[derive(Args)]
struct EvalArgs {
    #[command(flatten)]
    kafka: KafkaArgs,
    /// Predictions topic.
    #[arg(short, long, default_value = "predictions")]
    topic: String,
    /// Stop once this many distinct frames have a prediction.
    #[arg(short = 'n', long)]
    expect: Option<usize>,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    /// Stop when nothing new arrived for this many seconds.
    #[arg(long, default_value_t = 5)]
    idle: u64,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Also write one CSV row per frame (partition, offset, worker, batch size, timestamps, latency).
    #[arg(long, value_name = "PATH")]
    records: Option<PathBuf>,
}

/// The CLI, where each flag that sets a `WorkerConfig` field takes its help and default from that
/// field's doc comment and `Default`, so the two cannot drift.
fn cli_command() -> clap::Command {
    let docs = WorkerConfig::docs();
    let batching: Vec<String> = BatchArgs::augment_args(clap::Command::new("batching"))
        .get_arguments()
        .map(|a| a.get_id().to_string())
        .collect();
    Cli::command()
        .mut_subcommand("worker", |c| document_flags(c, &docs, None))
        .mut_subcommand("demo", |c| document_flags(c, &docs, Some(&batching)))
}

/// Gives each of `command`'s flags that sets a config field (of `only`, if given) its field's help.
fn document_flags(mut command: clap::Command, docs: &[FieldDoc], only: Option<&[String]>) -> clap::Command {
    for doc in docs {
        // -X fills the `kafka` list.
        let id = if doc.name == "kafka" { "properties" } else { doc.name.as_str() };
        let wanted = only.is_none_or(|ids| ids.iter().any(|i| i == id));
        if !wanted || !command.get_arguments().any(|a| a.get_id() == id) {
            continue;
        }
        command = command.mut_arg(id, |arg| {
            // A switch or a repeatable flag has no default to show.
            let default = match arg.get_action() {
                clap::ArgAction::Set => format!(" [default: {}]", doc.default),
                _ => String::new(),
            };
            arg.help(format!("{}{default}", doc.summary())).long_help(format!("{}{default}", doc.help))
        });
    }
    command
}

fn main() -> ExitCode {
    // The engine loads ONNX Runtime from ORT_DYLIB_PATH, else from the checkout's .venv.
    kafray_tools::layout::use_venv_runtime();
    let cli = Cli::from_arg_matches(&cli_command().get_matches()).unwrap_or_else(|e| e.exit());
    let default_level = match cli.command {
        Command::Worker(_) => "info",
        _ => "warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("KAFRAY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{default_level},librdkafka=warn")));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours for a terminal only: logs piped to files and collectors stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            if let Some(kafray::Error::RuntimeLoad { .. }) = e.downcast_ref::<kafray::Error>() {
                eprintln!(
                    "  in a checkout: `bash scripts/setup.sh` installs onnxruntime into .venv, where kafray finds it"
                );
            }
            match e.downcast_ref::<kafray::Error>().map(kafray::Error::kind) {
                Some(ErrorKind::User) => ExitCode::from(2),
                Some(ErrorKind::Internal) => ExitCode::from(70),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Demo(args) => demo::run(args),
        Command::Produce(args) => produce::run(args).map(|_| ExitCode::SUCCESS),
        Command::Worker(args) => {
            let config = args.to_config()?;
            let stop = Arc::new(AtomicBool::new(false));
            for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
                signal_hook::flag::register(signal, stop.clone())?;
            }
            let last = kafray::worker::run(&config, stop, Arc::new(Metrics::new()))?;
            eprintln!("worker done: {} predicted, {} dead-lettered", last.predicted, last.dead_lettered);
            Ok(ExitCode::SUCCESS)
        }
        Command::Eval(args) => {
            let opts = EvalOptions {
                brokers: args.kafka.brokers.clone(),
                topic: args.topic.clone(),
                expect: args.expect,
                timeout: Duration::from_secs(args.timeout),
                idle: Duration::from_secs(args.idle),
                kafka: args.kafka.properties()?,
            };
            let (read, unparseable, timed_out) = eval::read_predictions(&opts)?;
            let report = eval::report(&read, unparseable, timed_out);
            if let Some(path) = &args.records {
                eval::write_records(path, &read)?;
            }
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!("{report}");
            }
            Ok(if report.timed_out { ExitCode::FAILURE } else { ExitCode::SUCCESS })
        }
        Command::Bench(args) => bench::run(args).map(|_| ExitCode::SUCCESS),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CLI cannot drift from `WorkerConfig`: every field has a flag that sets it (`kafka`
    /// through `-X`), and every flag sets a field of its own name.
    #[test]
    fn every_config_field_has_its_flag() {
        let folder = tempfile::tempdir().unwrap();
        let properties = folder.path().join("client.properties");
        std::fs::write(&properties, "linger.ms=5\nenable.ssl.certificate.verification=false\n").unwrap();
        let matches = cli_command()
            .try_get_matches_from([
                "kafray",
                "worker",
                "--brokers",
                "b",
                "--input-topic",
                "i",
                "--output-topic",
                "o",
                "--dead-letter-topic",
                "d",
                "--group",
                "g",
                "--model",
                "mnist",
                "--batch-size",
                "3",
                "--max-wait-ms",
                "4",
                "--latency-target-ms",
                "5",
                "--threads",
                "2",
                "--decode-threads",
                "3",
                "--device",
                "auto",
                "--top-k",
                "3",
                "--max-in-flight",
                "9",
                "--stall-after-s",
                "7",
                "--status-interval",
                "1",
                "--worker-id",
                "w",
                "--create-topics",
                "2",
                "--metrics-addr",
                "127.0.0.1:0",
                "-X",
                "linger.ms=1",
                "--kafka-config",
                properties.to_str().unwrap(),
                "--insecure-skip-tls-verify",
            ])
            .unwrap();
        let Command::Worker(args) = Cli::from_arg_matches(&matches).unwrap().command else { unreachable!() };
        let serde_json::Value::Object(flags) = serde_json::to_value(&args).unwrap() else { unreachable!() };
        let mut named: Vec<String> = flags.keys().cloned().collect();
        named.push("kafka".into());
        named.sort();
        assert_eq!(named, WorkerConfig::field_names(), "flags (left) against WorkerConfig's fields (right)");
        let c = args.to_config().unwrap();
        assert_eq!((c.kafka_config.as_deref(), c.insecure_skip_tls_verify), (properties.to_str(), true));
        // The file's properties come first, -X over them.
        let connected: Vec<_> = c.client_properties().unwrap().into_iter().map(|(k, v)| format!("{k}={v}")).collect();
        assert_eq!(connected, ["enable.ssl.certificate.verification=false", "linger.ms=5", "linger.ms=1"]);
        assert_eq!((c.batch_size, c.status_interval_s, c.create_topics, c.stall_after_s), (3, 1, Some(2), 7));
        assert_eq!((c.device.as_str(), c.decode_threads), ("auto", Some(3)));
        assert_eq!(c.kafka, vec![("linger.ms".to_string(), "1".to_string())]);
    }

    /// Each worker flag's help is its field's doc comment and default (one source, no copy to
    /// drift): `-h` shows the first sentence, `--help` all of it.
    #[test]
    fn worker_flags_say_their_fields_help_and_default() {
        let mut command = cli_command();
        let worker = command.find_subcommand_mut("worker").unwrap();
        let docs = WorkerConfig::docs();
        for doc in &docs {
            let id = if doc.name == "kafka" { "properties" } else { doc.name.as_str() };
            let arg = worker.get_arguments().find(|a| a.get_id() == id).unwrap_or_else(|| panic!("no flag for {id}"));
            let (short, long) = (arg.get_help().unwrap().to_string(), arg.get_long_help().unwrap().to_string());
            assert!(short.starts_with(doc.summary()) && long.starts_with(&doc.help), "{id}: {short} / {long}");
            if matches!(arg.get_action(), clap::ArgAction::Set) {
                assert!(short.ends_with(&format!("[default: {}]", doc.default)), "{id}: {short}");
            }
        }
        let batch = docs.iter().find(|d| d.name == "batch_size").unwrap();
        let demo = command.find_subcommand_mut("demo").unwrap();
        let help = demo.get_arguments().find(|a| a.get_id() == "batch_size").unwrap().get_help().unwrap().to_string();
        assert_eq!(help, format!("{} [default: 10]", batch.summary()));
    }

    /// The table of worker flags in docs/reference.md, rendered from the CLI and
    /// `WorkerConfig::docs()`. It must match the page; `KAFRAY_BLESS=1 cargo test -p kafray-cli
    /// --release worker_flag_table` writes it there after a change to a field.
    #[test]
    fn worker_flag_table_in_the_reference_is_current() {
        let mut command = cli_command();
        let worker = command.find_subcommand_mut("worker").unwrap();
        let mut table = String::from("| flag | TOML field | default | meaning |\n|---|---|---|---|\n");
        for doc in WorkerConfig::docs() {
            let id = if doc.name == "kafka" { "properties" } else { doc.name.as_str() };
            let arg = worker.get_arguments().find(|a| a.get_id() == id).unwrap();
            let mut flag: Vec<String> = arg.get_short().map(|s| format!("-{s}")).into_iter().collect();
            flag.extend(arg.get_long().map(|l| format!("--{l}")));
            let field = if doc.name == "kafka" { "kafka = [[\"k\", \"v\"]]".to_string() } else { doc.name.clone() };
            let default = if doc.default == "none" { "none".to_string() } else { format!("`{}`", doc.default) };
            table += &format!(
                "| `{}` | `{field}` | {default} | {} |\n",
                flag.join(", "),
                doc.help.replace('\n', " ").replace('|', "\\|")
            );
        }
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/reference.md");
        let page = std::fs::read_to_string(&path).unwrap();
        let (begin, end) = ("<!-- worker-flags: begin -->\n", "<!-- worker-flags: end -->");
        let start = page.find(begin).expect("the begin marker") + begin.len();
        let stop = page.find(end).expect("the end marker");
        if std::env::var_os("KAFRAY_BLESS").is_some() {
            std::fs::write(&path, format!("{}{table}{}", &page[..start], &page[stop..])).unwrap();
        } else {
            assert!(
                page[start..stop] == table,
                "docs/reference.md's worker flag table is stale: run `KAFRAY_BLESS=1 cargo test --release -p kafray-cli worker_flag_table`\n{table}"
            );
        }
    }
}
