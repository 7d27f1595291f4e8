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
}

#[test]
fn unknown_model_and_config_fields_are_rejected() {
    fails_with(&["worker", "--model", "no_such_model"], &["no_such_model", "KAFRAY_MODELS"]);
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("worker.toml");
    std::fs::write(&cfg, "batch_sise = 3\n").unwrap();
    fails_with(&["worker", "--config", cfg.to_str().unwrap()], &["unknown field `batch_sise`"]);
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
