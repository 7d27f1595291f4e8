//! Bad flags and bad models: a clear message that names the fix, and exit code 2.
mod common;
use common::kafray;

fn fails_with(args: &[&str], expect: &[&str]) {
    let out = kafray(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?} should fail as a usage error:\n{stderr}");
    for e in expect {
        assert!(stderr.contains(e), "{args:?}: {stderr:?} should mention {e:?}");
    }
}

#[test]
fn bad_worker_settings_name_the_fix() {
    fails_with(&["worker", "--batch-size", "0"], &["--batch-size 0", "1..=4096"]);
    fails_with(&["worker", "--batch-size", "64", "--max-in-flight", "10"], &["raise --max-in-flight"]);
    fails_with(&["worker", "-X", "nonsense"], &["key=value"]);
    fails_with(&["worker", "--output-topic", "frames"], &["read its own results"]);
    fails_with(&["worker", "--device", "gpu"], &["--device \"gpu\"", "cpu, cuda, cuda:N"]);
}

/// This machine's ONNX Runtime is the CPU build: asking for CUDA is an error that names the fix,
/// before any broker is contacted.
#[test]
fn cuda_where_the_runtime_has_none_is_a_clear_error() {
    fails_with(
        &["worker", "--device", "cuda:1"],
        &["--device cuda:1", "no CUDA execution provider", "onnxruntime-gpu"],
    );
}

#[test]
fn unknown_model_and_config_fields_are_rejected() {
    fails_with(&["worker", "--model", "no_such_model"], &["no_such_model", "KAFRAY_MODELS"]);
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("worker.toml");
    std::fs::write(&cfg, "batch_sise = 3\n").unwrap();
    fails_with(&["worker", "--config", cfg.to_str().unwrap()], &["unknown field", "`batch_sise`", "worker.toml"]);
}

#[test]
fn a_model_spec_that_contradicts_the_graph_is_refused() {
    // The MNIST CNN under a name with no preset, and a TOML that disagrees with its [batch,1,28,28] input.
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("digits.onnx");
    std::fs::copy(common::repo_root().join("assets/models/mnist_cnn.onnx"), &model).unwrap();
    std::fs::write(dir.path().join("digits.toml"), "color = \"rgb\"\n").unwrap();
    fails_with(&["worker", "--model", model.to_str().unwrap()], &["channel count is 3 in the spec but 1 in the graph"]);
}

#[test]
fn settings_that_weaken_delivery_are_refused() {
    fails_with(&["worker", "-X", "acks=1"], &["-X acks=1 is refused", "acks=all"]);
    fails_with(&["worker", "-X", "enable.idempotence=false"], &["-X enable.idempotence=false is refused"]);
    fails_with(&["worker", "-X", "enable.auto.commit=false"], &["is refused", "a crash re-reads"]);
    fails_with(&["worker", "-X", "auto.offset.reset=latest"], &["is refused", "skip the frames"]);
}

/// A worker pointed at topics that do not exist fails at once, naming the topic and the fix,
/// instead of running and doing nothing; a missing dead-letter topic is created.
#[test]
fn missing_topics_fail_at_start_and_a_missing_dead_letter_topic_is_created() {
    let broker = common::broker();
    let b = broker.bootstrap();
    fails_with(
        &["worker", "--brokers", &b, "--input-topic", "no-such-frames"],
        &["the input topic \"no-such-frames\" does not exist", "--create-topics"],
    );
    // Input and output exist, the dead-letter topic does not: the worker creates it and runs.
    common::run_ok(&mut kafray(&["produce", "mnist", "--brokers", &b, "--partitions", "1", "--limit", "10", "-q"]));
    fails_with(&["worker", "--brokers", &b], &["the output topic \"predictions\" does not exist"]);
    kafray::admin::ensure_topics(&b, &[("predictions", 1)], &[]).unwrap();
    let worker = common::WorkerProcess::start(&b, "w-dlq-missing", &[]);
    let report = common::eval(&b, "predictions", 10, 60);
    let (clean, log) = worker.stop();
    assert!(clean, "{log}");
    assert!(log.contains("the dead-letter topic is missing: creating it"), "{log}");
    assert_eq!(report["distinct_frames"], 10, "{report:#}");
}

/// `--limit` beyond what the set holds would end the stream early and leave whoever waits for
/// that many results waiting: it is refused before any broker is contacted, naming `--repeat`.
#[test]
fn a_limit_beyond_the_set_is_refused_and_names_repeat() {
    fails_with(
        &["produce", "--brokers", "127.0.0.1:1", "-n", "20000", "mnist"],
        &["--limit 20000", "10000 x --repeat 1 = 10000", "pass --repeat 2"],
    );
    fails_with(&["produce", "--brokers", "127.0.0.1:1", "-n", "30001", "mnist", "--repeat", "2"], &["pass --repeat 4"]);
}
