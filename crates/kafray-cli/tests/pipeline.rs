//! End-to-end tests: real broker, real `kafray` processes, real models and data.
mod common;

use common::*;
use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use std::time::Duration;

const CATS: [&str; 3] = ["Egyptian cat", "tabby", "tiger cat"];

/// The README's first command: all 10,000 test digits, 2 workers, one prediction each.
#[test]
fn demo_predicts_every_mnist_digit_once_and_accurately() {
    let out = run_ok(&mut kafray(&["demo", "--json"]));
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["distinct_frames"], 10_000, "{report:#}");
    // A worker restart (after results the broker would not take) reads again what was in flight.
    let restarts = report["worker_restarts"].as_u64().unwrap();
    let in_flight_bound = restarts * kafray::WorkerConfig::default().max_in_flight as u64;
    let predictions = report["predictions"].as_u64().unwrap();
    assert!(
        (10_000..=10_000 + in_flight_bound).contains(&predictions),
        "one prediction per digit, plus at most what was in flight at each of {restarts} restarts: {report:#}"
    );
    assert_eq!(report["labelled"], 10_000);
    let accuracy = report["accuracy"].as_f64().unwrap();
    assert!(accuracy >= 0.985, "accuracy {accuracy}");
    assert_eq!(report["per_worker"].as_object().unwrap().len(), 2, "both workers took part: {report:#}");
}

#[test]
fn mobilenet_recognises_the_cat_and_the_espresso() {
    let broker = broker();
    let b = broker.bootstrap();
    let images = shared_assets().join("images");
    let (chelsea, coffee) = (images.join("chelsea.png"), images.join("coffee.png"));
    run_ok(&mut kafray(&[
        "produce",
        "images",
        chelsea.to_str().unwrap(),
        coffee.to_str().unwrap(),
        "--brokers",
        &b,
        "--partitions",
        "2",
        "-q",
    ]));
    let worker = WorkerProcess::start(&b, "w-photos", &["--model", "mobilenet_v2", "--create-topics", "2"]);
    let got = predictions_by_key(&b, "predictions", 2);
    let (clean, log) = worker.stop();
    assert!(clean, "worker did not shut down cleanly:\n{log}");
    assert_eq!(got.len(), 2, "{got:?}");
    for (key, p) in &got {
        let label = p["label"].as_str().unwrap();
        match key.as_str() {
            "chelsea" => assert!(CATS.contains(&label), "chelsea.png -> {label}: {p}"),
            "coffee" => assert_eq!(label, "espresso", "{p}"),
            other => panic!("unexpected key {other}"),
        }
        assert_eq!(p["top"].as_array().unwrap().len(), 5);
        assert_eq!(p["model"], "mobilenet_v2_imagenet");
    }
    assert!(log.contains("worker stopped"), "{log}");
}

#[test]
fn malformed_frames_go_to_the_dead_letter_topic_and_the_stream_goes_on() {
    let broker = broker();
    let b = broker.bootstrap();
    let produce_digits =
        |n: &str| run_ok(&mut kafray(&["produce", "mnist", "--brokers", &b, "--partitions", "2", "--limit", n, "-q"]));
    produce_digits("100");
    let png = std::fs::read(shared_assets().join("images/chelsea.png")).unwrap();
    // (key, value, headers, the reason the dead letter must give)
    type Bad = (&'static str, Vec<u8>, Vec<(&'static str, &'static str)>, &'static str);
    let bad: Vec<Bad> = vec![
        ("empty", vec![], vec![], "empty frame"),
        ("truncated-png", png[..png.len() / 3].to_vec(), vec![], "undecodable image (png)"),
        (
            "wrong-shape",
            vec![0u8; 9],
            vec![("kafray.format", "raw"), ("kafray.shape", "3x3x1")],
            "shape 3x3x1 does not match model input 28x28x1",
        ),
        ("random", noise(500), vec![], "not PNG or JPEG"),
        // A frame at the producer's size limit: its dead letter, with the reason added, would
        // pass the limit, so it goes without its value.
        ("at-the-limit", noise(AT_LIMIT), vec![], "value of 999900 bytes left out: too large to publish"),
    ];
    // A valid digit whose key is so long that its prediction (key + the key again as `source`)
    // can never be published: after every restart it would fail again, so it is dead-lettered.
    let long_key = "k".repeat(600_000);
    let producer: ThreadedProducer<DefaultProducerContext> =
        ClientConfig::new().set("bootstrap.servers", &b).create().unwrap();
    for (key, value, headers, _) in &bad {
        let mut h = OwnedHeaders::new();
        for (k, v) in headers {
            h = h.insert(Header { key: k, value: Some(*v) });
        }
        producer.send(BaseRecord::to("frames").key(*key).payload(value).headers(h)).unwrap();
    }
    let raw = OwnedHeaders::new()
        .insert(Header { key: "kafray.format", value: Some("raw") })
        .insert(Header { key: "kafray.shape", value: Some("28x28x1") });
    producer.send(BaseRecord::to("frames").key(&long_key).payload(&[0u8; 784][..]).headers(raw)).unwrap();
    producer.flush(Duration::from_secs(10)).unwrap();
    produce_digits("100");

    let worker = WorkerProcess::start(&b, "w-dlq", &["--create-topics", "2"]);
    let report = eval(&b, "predictions", 200, 90);
    let dead = read_topic(&b, "frames.dlq", bad.len() + 1, Duration::from_secs(30));
    let (clean, log) = worker.stop();
    assert!(clean, "{log}");
    assert_eq!(report["distinct_frames"], 200, "every valid frame predicted: {report:#}\n{log}");
    assert_eq!(dead.len(), bad.len() + 1, "{:?}", dead.iter().map(|d| &d.headers).collect::<Vec<_>>());
    for (key, value, _, reason) in &bad {
        let d =
            dead.iter().find(|d| d.key.as_deref() == Some(*key)).unwrap_or_else(|| panic!("{key} not dead-lettered"));
        let error = d.header("kafray.error").unwrap();
        assert!(error.contains(reason), "{key}: {error:?} should say {reason:?}");
        if *key == "at-the-limit" {
            assert!(d.value.is_empty(), "the value is left out");
        } else {
            assert_eq!(&d.value, value, "{key}: the original value is kept");
        }
        assert!(d.header("kafray.source.offset").is_some());
    }
    let d = dead.iter().find(|d| d.key.as_deref() == Some(long_key.as_str())).expect("the long-keyed digit");
    assert!(
        d.header("kafray.error").unwrap().contains("larger than the producer's message.max.bytes"),
        "{:?}",
        d.headers
    );
    assert_eq!(d.value, vec![0u8; 784], "the digit itself is kept");
    assert!(log.contains("dead_letter_fallbacks=1"), "the fallback is counted and reported:\n{log}");
    assert!(log.contains("too large to republish"), "the fallback is warned about:\n{log}");
    let raw = dead.iter().find(|d| d.key.as_deref() == Some("wrong-shape")).unwrap();
    assert_eq!(raw.header("kafray.shape"), Some("3x3x1"), "original headers are kept");
}

/// A frame value that is not an image; with the key "at-the-limit" and kafray's headers, a
/// record of this value fits the producer's 1,000,000-byte message.max.bytes, and with the
/// dead-letter headers added it does not.
const AT_LIMIT: usize = 999_900;

fn noise(n: usize) -> Vec<u8> {
    (0..n as u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect()
}

/// Two workers share the partitions; one is killed mid-stream; every frame still gets a prediction.
#[test]
fn a_worker_killed_mid_stream_loses_no_frame() {
    let broker = broker();
    let b = broker.bootstrap();
    let n = 6000;
    let common = ["--group", "g-kill", "--create-topics", "4", "--batch-size", "20"];
    let mut a = WorkerProcess::start(&b, "w-a", &common);
    let mut w = WorkerProcess::start(&b, "w-b", &common);
    a.wait_for("partitions assigned", Duration::from_secs(60));
    w.wait_for("partitions assigned", Duration::from_secs(60));
    let mut producer = spawn_paced_mnist(&b, n, 1000);
    // Killed mid-stream: once it has predicted frames, with more still coming.
    a.wait_for_predicted(500, Duration::from_secs(60));
    a.kill9();
    assert!(producer.wait().unwrap().success());
    let report = eval(&b, "predictions", n, 120);
    let (clean, log) = w.stop();
    assert!(clean, "{log}");
    eprintln!("kill test: {report:#}");
    assert_eq!(report["distinct_frames"], n, "every frame predicted: {report:#}\nsurvivor log:\n{log}");
    assert_eq!(report["labelled"], n);
    let per_worker = report["per_worker"].as_object().unwrap();
    assert!(
        per_worker.get("w-a").and_then(|v| v.as_u64()).unwrap_or(0) > 0,
        "the killed worker had taken part: {report:#}"
    );
    assert!(per_worker.get("w-b").and_then(|v| v.as_u64()).unwrap_or(0) > 0, "{report:#}");
    assert!(report["accuracy"].as_f64().unwrap() >= 0.985);
}

/// kcat publishes a JPEG and reads the prediction back: the formats are usable from any client.
#[test]
fn kcat_round_trip() {
    let broker = broker();
    let b = broker.bootstrap();
    let png = std::fs::read(shared_assets().join("images/coffee.png")).unwrap();
    let jpeg = kafray_tools::publish::to_jpeg(&png, kafray_tools::publish::FrameSize::square(256), 92).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("coffee.jpg");
    std::fs::write(&file, &jpeg).unwrap();
    kafray::admin::ensure_topics(&b, &[("frames", 1), ("predictions", 1)], &[]).unwrap();
    let kcat_lib = repo_root().join(".venv/kcat-lib");
    let kcat = |args: &[&str]| {
        let mut c = std::process::Command::new("kcat");
        c.args(["-b", &b]).args(args).env("LD_LIBRARY_PATH", &kcat_lib);
        c
    };
    run_ok(&mut kcat(&[
        "-P",
        "-t",
        "frames",
        "-k",
        "kitchen-cam",
        "-H",
        "kafray.seq=41",
        "-H",
        "kafray.label=967",
        file.to_str().unwrap(),
    ]));
    let worker = WorkerProcess::start(&b, "w-kcat", &["--model", "mobilenet_v2"]);
    let out = run_ok(&mut kcat(&["-C", "-t", "predictions", "-c", "1", "-o", "beginning", "-J"]));
    let (clean, log) = worker.stop();
    assert!(clean, "{log}");
    let envelope: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(envelope["key"], "kitchen-cam");
    let p: serde_json::Value = serde_json::from_str(envelope["payload"].as_str().unwrap()).unwrap();
    assert_eq!(p["label"], "espresso", "{p}");
    assert_eq!(p["class"], 967);
    assert_eq!(p["seq"], 41);
    assert_eq!(p["source"], "kitchen-cam");
    let headers = envelope["headers"].as_array().unwrap();
    assert_eq!(headers, &vec![serde_json::json!("kafray.truth"), serde_json::json!("967")], "truth echoed: {envelope}");
}

/// A synthetic fleet: N cameras at F frames/s, JPEG at the asked size, keys cam-0.., paced.
#[test]
fn camera_fleet_sends_paced_jpeg_frames_per_camera() {
    let broker = broker();
    let b = broker.bootstrap();
    let images = shared_assets().join("images");
    let start = std::time::Instant::now();
    run_ok(&mut kafray(&[
        "produce",
        "camera",
        images.to_str().unwrap(),
        "--brokers",
        &b,
        "--partitions",
        "3",
        "--cameras",
        "3",
        "--fps",
        "10",
        "--size",
        "64",
        "--limit",
        "30",
        "-q",
    ]));
    let took = start.elapsed();
    // 30 frames at 3 x 10 frames/s take about a second; unpaced they would take milliseconds.
    assert!(took >= Duration::from_millis(900), "not paced: {took:?}");
    let frames = read_topic(&b, "frames", 30, Duration::from_secs(30));
    assert_eq!(frames.len(), 30);
    for cam in ["cam-0", "cam-1", "cam-2"] {
        let mine: Vec<_> = frames.iter().filter(|f| f.key.as_deref() == Some(cam)).collect();
        assert_eq!(mine.len(), 10, "{cam}");
        let seqs: Vec<&str> = mine.iter().map(|f| f.header("kafray.seq").unwrap()).collect();
        assert_eq!(seqs, (0..10).map(|i| i.to_string()).collect::<Vec<_>>(), "{cam}: in order on one partition");
    }
    let img = image::load_from_memory(&frames[0].value).unwrap();
    assert_eq!((img.width(), img.height()), (64, 64));
    assert_eq!(frames[0].header("kafray.format"), Some("jpeg"));
}

/// Load tests with few sources: --round-robin spreads the photos evenly over the partitions,
/// re-encoded at the asked size.
#[test]
fn round_robin_spreads_few_sources_evenly_over_partitions() {
    let broker = broker();
    let b = broker.bootstrap();
    let images = shared_assets().join("images");
    let produce = |extra: &[&str]| {
        let mut args = vec!["produce", "images", images.to_str().unwrap(), "--brokers", &b, "--round-robin", "-q"];
        args.extend_from_slice(extra);
        kafray(&args).output().unwrap()
    };
    let out = produce(&["--partitions", "5", "--size", "96", "--repeat", "5"]);
    assert!(out.status.success(), "{out:?}");
    let frames = read_topic(&b, "frames", 20, Duration::from_secs(30));
    assert_eq!(frames.len(), 20, "4 photos x 5");
    for p in 0..5 {
        assert_eq!(frames.iter().filter(|f| f.partition == p).count(), 4, "partition {p}");
    }
    let img = image::load_from_memory(&frames[0].value).unwrap();
    assert_eq!((img.width(), img.height()), (96, 96));
}

/// The broker is killed (SIGKILL) and restarted mid-stream: its SQLite storage keeps frames and
/// offsets, the worker and producer reconnect, and every frame still gets a prediction.
#[test]
fn a_broker_crash_mid_stream_loses_no_frame() {
    let mut broker = broker();
    let b = broker.bootstrap();
    let n = 3000;
    let mut worker = WorkerProcess::start(&b, "w-crash", &["--create-topics", "2"]);
    worker.wait_for("partitions assigned", Duration::from_secs(60));
    let mut producer = spawn_paced_mnist(&b, n, 1000);
    // Crashed mid-stream: once frames were consumed and predicted, with more still coming.
    worker.wait_for_predicted(300, Duration::from_secs(60));
    assert!(producer.try_wait().unwrap().is_none(), "the producer is still sending when the broker dies");
    broker.restart().expect("restart the broker on the same port and storage");
    assert!(producer.wait().unwrap().success(), "the producer survives the broker restart");
    let report = eval(&b, "predictions", n, 120);
    let (clean, log) = worker.stop();
    assert!(clean, "{log}");
    eprintln!(
        "broker crash: {} predictions, {} distinct, {} duplicates",
        report["predictions"], report["distinct_frames"], report["duplicates"]
    );
    assert_eq!(report["distinct_frames"], n, "every frame predicted after the crash: {report:#}\n{log}");
    assert_eq!(report["labelled"], n);
}

/// Deliveries fail for good after 1.5 s of outage.
const OUTAGE_FLAGS: [&str; 4] = ["--create-topics", "2", "-X", "message.timeout.ms=1500"];

/// The 10,000 MNIST digits published, a worker `id` working through them with [`OUTAGE_FLAGS`],
/// and the broker crashed once 500 are predicted, so that results are in flight. Returns the
/// broker, its address, the number of frames and the worker.
fn broker_crashed_under_a_backlog(id: &str) -> (kafray_tools::broker::EmbeddedBroker, String, usize, WorkerProcess) {
    let mut broker = broker();
    let b = broker.bootstrap();
    let n = 10_000;
    run_ok(&mut kafray(&["produce", "mnist", "--brokers", &b, "--partitions", "2", "--limit", &n.to_string(), "-q"]));
    let mut worker = WorkerProcess::start(&b, id, &OUTAGE_FLAGS);
    worker.wait_for_predicted(500, Duration::from_secs(60));
    broker.crash();
    (broker, b, n, worker)
}

/// An outage longer than `message.timeout.ms` fails deliveries for good (as a fatal producer
/// error does): the worker starts again with new clients by itself, without waiting for the
/// broker to come back, and every frame is predicted.
///
/// The frames are all there before the worker starts: working through a backlog, it has results
/// in flight at every moment, so the crash always catches some (a worker that had caught up with
/// a paced producer might have had nothing to deliver, and no reason to restart).
#[test]
fn results_undelivered_for_good_restart_the_worker_and_lose_nothing() {
    let (mut broker, b, n, mut worker) = broker_crashed_under_a_backlog("w-outage");
    // While the broker is still down: the old clients' close must not wait for it.
    worker.wait_for("starting again", Duration::from_secs(60));
    broker.start_again().expect("start the broker again on the same port and storage");
    let report = eval(&b, "predictions", n, 180);
    let (clean, log) = worker.stop();
    assert!(clean, "the worker kept running after its restart:\n{log}");
    assert!(log.contains("results not delivered"), "{log}");
    assert_eq!(report["distinct_frames"], n, "every frame predicted across the restart: {report:#}\n{log}");
    assert_eq!(report["labelled"], n);
}

/// A worker told to stop while every broker is down ends within its drain's bounds (deliveries
/// time out after `message.timeout.ms`, the group is left without an answer), without waiting
/// for the broker to come back; a worker started after the broker returns predicts every frame.
#[test]
fn a_stop_while_the_broker_is_down_ends_the_worker_without_waiting_for_the_broker() {
    let (mut broker, b, n, mut worker) = broker_crashed_under_a_backlog("w-down");
    // 1.5 s for the deliveries to time out, 3 s to leave the group, 5 s for the consumer's close.
    let exited = worker.stop_within(Duration::from_secs(30));
    assert!(exited.is_some(), "the worker still runs 30 s after SIGTERM with the broker down:\n{}", worker.log_text());
    broker.start_again().expect("start the broker again on the same port and storage");
    let after = WorkerProcess::start(&b, "w-after-down", &OUTAGE_FLAGS);
    let report = eval(&b, "predictions", n, 180);
    let (clean, log) = after.stop();
    assert!(clean, "{log}");
    assert_eq!(report["distinct_frames"], n, "every frame predicted once the broker was back: {report:#}");
}

/// A tiny in-flight bound on a full topic: the worker pauses and resumes, loses nothing, and
/// never holds more than the bound (plus what one poll of a just-paused partition may still return).
#[test]
fn backpressure_bounds_frames_in_flight_and_loses_nothing() {
    let broker = broker();
    let b = broker.bootstrap();
    // 16 in flight over acknowledgements of ~0.2 s (SQLite broker): about 80 frames/s.
    let n = 600;
    run_ok(&mut kafray(&["produce", "mnist", "--brokers", &b, "--partitions", "2", "--limit", &n.to_string(), "-q"]));
    let worker = WorkerProcess::start(
        &b,
        "w-bp",
        &["--create-topics", "2", "--batch-size", "8", "--max-in-flight", "16", "--max-wait-ms", "5"],
    );
    let report = eval(&b, "predictions", n, 120);
    let (clean, log) = worker.stop();
    assert!(clean, "{log}");
    assert_eq!(report["distinct_frames"], n, "{report:#}\n{log}");
    assert_eq!(report["duplicates"], 0, "no crash, no duplicates: {report:#}");
    let in_flight: Vec<u64> =
        log.lines().filter_map(|l| l.split("in flight ").nth(1)?.split(',').next()?.trim().parse().ok()).collect();
    assert!(!in_flight.is_empty(), "no status lines:\n{log}");
    assert!(in_flight.iter().all(|&f| f <= 16), "in flight above the bound: {in_flight:?}");
    assert!(report["mean_batch_size"].as_f64().unwrap() <= 8.0);
}

/// Batching adapts to load: frames paced far below capacity find the model free and are inferred
/// alone, with no window to wait for; a backlog fills every batch up to the limit.
#[test]
fn batches_are_single_frames_at_light_load_and_full_under_a_backlog() {
    let broker = kafray_tools::broker::EmbeddedBroker::start_with(kafray_tools::broker::Storage::Memory)
        .expect("start the broker");
    let b = broker.bootstrap();
    let n = 3000;
    run_ok(&mut kafray(&["produce", "mnist", "--brokers", &b, "--partitions", "2", "--limit", &n.to_string(), "-q"]));
    let backlog = WorkerProcess::start(&b, "w-backlog", &["--create-topics", "2", "--batch-size", "16"]);
    let report = eval(&b, "predictions", n, 120);
    let (clean, log) = backlog.stop();
    assert!(clean, "{log}");
    assert_eq!(report["distinct_frames"], n, "{report:#}");
    let mean = report["mean_batch_size"].as_f64().unwrap();
    assert!(mean > 8.0 && mean <= 16.0, "a backlog fills batches: mean {mean}\n{log}");
    assert!(log.contains("(limit 16)"), "the status line shows the batch limit:\n{log}");

    let paced = 120;
    let mut worker = WorkerProcess::start(
        &b,
        "w-paced",
        &["--create-topics", "2", "--batch-size", "16", "--input-topic", "paced", "--output-topic", "paced-out"],
    );
    worker.wait_for("partitions assigned", Duration::from_secs(60));
    // 40 frames/s: 25 ms apart, against a model that needs well under a millisecond per digit.
    // Not idempotent: a fresh idempotent producer holds its first frames while it gets a
    // producer id from the broker, then releases them together, and they would batch.
    let status = kafray(&[
        "produce",
        "mnist",
        "--brokers",
        &b,
        "--topic",
        "paced",
        "--limit",
        &paced.to_string(),
        "--rate",
        "40",
        "-q",
        "-X",
        "enable.idempotence=false",
    ])
    .status()
    .unwrap();
    assert!(status.success());
    let report = eval(&b, "paced-out", paced, 120);
    let (clean, log) = worker.stop();
    assert!(clean, "{log}");
    assert_eq!(report["distinct_frames"], paced, "{report:#}");
    let mean = report["mean_batch_size"].as_f64().unwrap();
    assert!(mean < 1.2, "paced frames go alone, not in a window's batch: mean {mean}\n{log}");
}

/// The group's committed offset and the log end of each partition of `topic`.
fn committed_and_end(brokers: &str, group: &str, topic: &str, partitions: i32) -> Vec<(i64, i64)> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{Offset, TopicPartitionList};
    let consumer: BaseConsumer =
        ClientConfig::new().set("bootstrap.servers", brokers).set("group.id", group).create().unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let committed = consumer.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
    (0..partitions)
        .map(|p| {
            let offset = match committed.find_partition(topic, p).unwrap().offset() {
                Offset::Offset(o) => o,
                _ => -1,
            };
            let (_, end) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10)).unwrap();
            (offset, end)
        })
        .collect()
}

/// After a clean stop the group's committed offsets are the log end on every partition, so a
/// restarted group reads nothing again: the frames produced later are the only new predictions.
#[test]
fn a_clean_stop_commits_to_the_log_end_and_a_restart_reads_nothing_again() {
    let broker = broker();
    let b = broker.bootstrap();
    let produce =
        |n: &str| run_ok(&mut kafray(&["produce", "mnist", "--brokers", &b, "--partitions", "3", "--limit", n, "-q"]));
    produce("2000");
    let first = WorkerProcess::start(&b, "w-first", &["--create-topics", "3", "--group", "g-clean"]);
    let report = eval(&b, "predictions", 2000, 90);
    assert_eq!(report["distinct_frames"], 2000, "{report:#}");
    let (clean, log) = first.stop();
    assert!(clean, "{log}");
    let offsets = committed_and_end(&b, "g-clean", "frames", 3);
    assert!(offsets.iter().all(|&(committed, end)| committed == end && end > 0), "committed vs end: {offsets:?}");

    let mut again = WorkerProcess::start(&b, "w-again", &["--group", "g-clean"]);
    again.wait_for("partitions assigned", Duration::from_secs(60));
    produce("30");
    // A re-read would predict old frames of a partition before its new ones: by the time the 30
    // new frames have predictions, any duplicate would be on the topic too.
    let report = eval(&b, "predictions", 2030, 90);
    let (clean, log) = again.stop();
    assert!(clean, "{log}");
    assert_eq!(report["distinct_frames"], 2030, "{report:#}");
    assert_eq!(report["duplicates"], 0, "the restarted group read frames again: {report:#}");
    assert_eq!(report["per_worker"]["w-again"], 30, "{report:#}");
}

/// SIGTERM mid-stream, then a new worker: nothing is lost, and duplicates stay within what was
/// in flight (a clean stop drains and commits, so there should be none at all).
#[test]
fn sigterm_mid_stream_then_a_restart_loses_nothing() {
    let broker = broker();
    let b = broker.bootstrap();
    let n = 4000;
    let in_flight = 200;
    let flags = ["--create-topics", "2", "--group", "g-term", "--max-in-flight", "200"];
    let mut first = WorkerProcess::start(&b, "w-term", &flags);
    first.wait_for("partitions assigned", Duration::from_secs(60));
    let mut producer = spawn_paced_mnist(&b, n, 1000);
    first.wait_for_predicted(500, Duration::from_secs(60));
    let (clean, log) = first.stop();
    assert!(clean, "a SIGTERM ends the worker cleanly:\n{log}");
    assert!(producer.try_wait().unwrap().is_none(), "the stream is still going when the worker stops");
    let second = WorkerProcess::start(&b, "w-after", &flags);
    assert!(producer.wait().unwrap().success());
    let report = eval(&b, "predictions", n, 120);
    let (clean, log) = second.stop();
    assert!(clean, "{log}");
    eprintln!("sigterm: {} distinct, {} duplicates", report["distinct_frames"], report["duplicates"]);
    assert_eq!(report["distinct_frames"], n, "{report:#}");
    assert!(report["duplicates"].as_u64().unwrap() <= in_flight, "duplicates beyond what was in flight: {report:#}");
}

/// A model that fails deterministically on some frames: the real MNIST CNN, wrapped to refuse any
/// image whose first pixel is 255 (as a model with a data-dependent fault would). With the real
/// broker: those frames are dead-lettered with the model's error, every digit is predicted, and
/// the worker neither stalls nor stops.
#[test]
fn frames_the_model_rejects_are_dead_lettered_and_the_stream_goes_on() {
    use kafray::model::{Backend, Model, OnnxBackend};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    struct Refusing(OnnxBackend);
    impl Backend for Refusing {
        fn graph_input(&self) -> Vec<i64> {
            self.0.graph_input()
        }
        fn classes(&self) -> usize {
            self.0.classes()
        }
        fn max_batch(&self) -> Option<usize> {
            self.0.max_batch()
        }
        fn infer(&mut self, input: &[f32], shape: [usize; 4]) -> kafray::Result<Vec<f32>> {
            if input.chunks(784).any(|image| image[0] == 255.0) {
                return Err(kafray::Error::Inference("cannot take an image whose first pixel is 255".into()));
            }
            self.0.infer(input, shape)
        }
    }

    kafray_tools::layout::use_venv_runtime();
    let broker = broker();
    let b = broker.bootstrap();
    run_ok(&mut kafray(&["produce", "mnist", "--brokers", &b, "--partitions", "2", "--limit", "300", "-q"]));
    let producer: ThreadedProducer<DefaultProducerContext> =
        ClientConfig::new().set("bootstrap.servers", &b).create().unwrap();
    for i in 0..3 {
        let mut poison = vec![0u8; 784];
        poison[0] = 255;
        let headers = OwnedHeaders::new()
            .insert(Header { key: "kafray.format", value: Some("raw") })
            .insert(Header { key: "kafray.shape", value: Some("28x28x1") });
        let key = format!("poison-{i}");
        producer.send(BaseRecord::to("frames").key(&key).payload(&poison).headers(headers)).unwrap();
    }
    producer.flush(Duration::from_secs(10)).unwrap();
    run_ok(&mut kafray(&["produce", "mnist", "--brokers", &b, "--limit", "300", "-q"]));

    let path = kafray::model::find_model("mnist").unwrap();
    let model = Model::with_backend(&path, Box::new(Refusing(OnnxBackend::load(&path, 1).unwrap())), 5).unwrap();
    let config = kafray::WorkerConfig {
        brokers: b.clone(),
        model: path.display().to_string(),
        create_topics: Some(2),
        batch_size: 16,
        status_interval_s: 0,
        worker_id: Some("w-refusing".into()),
        ..Default::default()
    }
    .validated()
    .unwrap();
    let (stop, metrics) = (Arc::new(AtomicBool::new(false)), Arc::new(kafray::metrics::Metrics::new()));
    let worker = {
        let (stop, metrics) = (stop.clone(), metrics.clone());
        std::thread::spawn(move || kafray::worker::run_with_model(&config, model, stop, metrics))
    };
    let report = eval(&b, "predictions", 600, 90);
    let dead = read_topic(&b, "frames.dlq", 3, Duration::from_secs(30));
    stop.store(true, Ordering::Relaxed);
    let last = worker.join().unwrap().expect("the worker ends cleanly");
    assert_eq!(report["distinct_frames"], 600, "every digit predicted: {report:#}");
    assert_eq!((last.predicted, last.dead_lettered), (600, 3), "{last:?}");
    assert_eq!(dead.len(), 3);
    for d in &dead {
        assert!(d.key.as_deref().is_some_and(|k| k.starts_with("poison-")), "{d:?}");
        let error = d.header("kafray.error").unwrap();
        assert!(error.contains("the model failed on this frame") && error.contains("first pixel is 255"), "{error}");
        assert_eq!(d.value.len(), 784, "the frame itself is kept");
    }
}

fn memory_broker() -> kafray_tools::broker::EmbeddedBroker {
    kafray_tools::broker::EmbeddedBroker::start_with(kafray_tools::broker::Storage::Memory)
        .expect("start the local broker (run `bash scripts/setup.sh` first)")
}

/// Reaching the in-flight bound costs latency, not throughput: with 20 in flight the worker
/// still drains a backlog at model speed. It used to pause and resume its partitions at every
/// hold; each resume dropped librdkafka's prefetched frames and waited for the fetcher's next
/// 1 s tick, so 2,000 digits took about 80 s (25 frames/s). bench/backpressure.py measures it.
#[test]
fn a_small_in_flight_bound_drains_a_backlog_at_model_speed() {
    let broker = memory_broker();
    let b = broker.bootstrap();
    let n = 2000;
    run_ok(&mut kafray(&["produce", "mnist", "--brokers", &b, "--partitions", "4", "--limit", &n.to_string(), "-q"]));
    let worker = WorkerProcess::start(
        &b,
        "w-small-bound",
        &["--max-in-flight", "20", "--batch-size", "10", "--create-topics", "4"],
    );
    // A generous deadline: the drain takes a few seconds; the old pause-resume cycle took 80.
    let report = eval(&b, "predictions", n, 40);
    let (clean, log) = worker.stop();
    assert!(clean, "{log}");
    assert_eq!(report["distinct_frames"], n, "{report:#}\n{log}");
    assert_eq!(report["duplicates"], 0, "{report:#}");
}

/// librdkafka keeps an application's pause on a partition across a revoke and a re-assignment.
/// A worker under backpressure while a second member joins and leaves gets its partitions back;
/// each must flow, however it was paused before, down to a slow trickle afterwards.
#[test]
fn partitions_given_back_after_a_rebalance_under_backpressure_all_flow() {
    let broker = memory_broker();
    let b = broker.bootstrap();
    let burst = 3000;
    run_ok(&mut kafray(&[
        "produce",
        "mnist",
        "--brokers",
        &b,
        "--partitions",
        "4",
        "--limit",
        &burst.to_string(),
        "-q",
    ]));
    let bound = ["--max-in-flight", "20", "--batch-size", "10", "--create-topics", "4"];
    let mut first = WorkerProcess::start(&b, "w-held", &bound);
    first.wait_for("partitions assigned", Duration::from_secs(60));
    let mut second = WorkerProcess::start(&b, "w-passing", &bound);
    second.wait_for("partitions assigned", Duration::from_secs(60));
    let (clean, log) = second.stop();
    assert!(clean, "{log}");
    // Light load now: a trickle on every partition.
    let trickle = 40;
    let mut producer = kafray(&[
        "produce",
        "mnist",
        "--brokers",
        &b,
        "--limit",
        &trickle.to_string(),
        "--rate",
        "10",
        "--round-robin",
        "-q",
    ])
    .spawn()
    .unwrap();
    assert!(producer.wait().unwrap().success());
    let report = eval(&b, "predictions", burst + trickle, 90);
    let (clean, log) = first.stop();
    assert!(clean, "{log}");
    assert_eq!(report["distinct_frames"], burst + trickle, "{report:#}\n{log}");
}

/// The very first frame a worker sees is one its model cannot take: a real ONNX graph (the MNIST
/// CNN plus a Gather that ONNX Runtime refuses for an all-white image; see
/// tests/models/make_white_poison.py). The model's warm-up at load is the canary, so the frame
/// is dead-lettered rather than taken for a broken model (which stopped the worker on every restart).
#[test]
fn a_poison_frame_that_comes_first_is_dead_lettered_by_a_real_model() {
    let broker = broker();
    let b = broker.bootstrap();
    let model = repo_root().join("crates/kafray-cli/tests/models/white_poison_digits.onnx");
    let admin: ThreadedProducer<DefaultProducerContext> =
        ClientConfig::new().set("bootstrap.servers", &b).create().unwrap();
    kafray::admin::ensure_topics(&b, &[("frames", 1)], &[]).unwrap();
    let headers = OwnedHeaders::new()
        .insert(Header { key: "kafray.format", value: Some("raw") })
        .insert(Header { key: "kafray.shape", value: Some("28x28x1") });
    let white = vec![255u8; 784];
    admin.send(BaseRecord::to("frames").key("white").payload(&white).headers(headers)).unwrap();
    admin.flush(Duration::from_secs(10)).unwrap();
    run_ok(&mut kafray(&["produce", "mnist", "--brokers", &b, "--limit", "50", "-q"]));
    let worker = WorkerProcess::start(
        &b,
        "w-first-poison",
        &["--model", model.to_str().unwrap(), "--batch-size", "1", "--create-topics", "1"],
    );
    let report = eval(&b, "predictions", 50, 60);
    let dead = read_topic(&b, "frames.dlq", 1, Duration::from_secs(30));
    let (clean, log) = worker.stop();
    assert!(clean, "the worker goes on after the poison frame:\n{log}");
    assert_eq!(report["distinct_frames"], 50, "{report:#}\n{log}");
    assert_eq!(dead.len(), 1, "{log}");
    assert_eq!(dead[0].key.as_deref(), Some("white"));
    let error = dead[0].header("kafray.error").unwrap();
    assert!(error.contains("the model failed on this frame") && error.contains("out of data bounds"), "{error}");
}
