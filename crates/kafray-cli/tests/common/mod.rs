//! Shared fixtures: a real broker (Tansu) per test, the real `kafray` binary, real models.
#![allow(dead_code)]
use kafray_tools::broker::EmbeddedBroker;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::{Message, Offset, TopicPartitionList};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

pub fn shared_assets() -> PathBuf {
    let p = repo_root().join("../shared/assets");
    assert!(p.is_dir(), "the shared assets ({}) must sit beside the checkout", p.display());
    p
}

pub fn broker() -> EmbeddedBroker {
    EmbeddedBroker::start().expect("start the local broker (run `bash scripts/setup.sh` first)")
}

/// The `kafray` binary, run from the repository root.
pub fn kafray(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kafray"));
    c.args(args).current_dir(repo_root()).env_remove("KAFRAY_BROKERS");
    c
}

/// `kafray produce mnist` in the background: `n` digits at `rate` frames/s.
pub fn spawn_paced_mnist(brokers: &str, n: usize, rate: u32) -> Child {
    kafray(&["produce", "mnist", "--brokers", brokers, "--limit", &n.to_string(), "--rate", &rate.to_string(), "-q"])
        .spawn()
        .expect("start kafray produce")
}

/// A worker process whose stderr lines are collected (to see when it joined its group).
pub struct WorkerProcess {
    pub child: Child,
    pub log: Arc<Mutex<Vec<String>>>,
    /// Reads stderr into `log`; it ends when the process has exited and its pipe is drained.
    reader: Option<std::thread::JoinHandle<()>>,
}

impl WorkerProcess {
    pub fn start(brokers: &str, id: &str, extra: &[&str]) -> Self {
        let mut args = vec!["worker", "--brokers", brokers, "--worker-id", id, "--status-interval", "1"];
        args.extend_from_slice(extra);
        let mut child =
            kafray(&args).stderr(Stdio::piped()).stdout(Stdio::null()).spawn().expect("start kafray worker");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (stderr, sink) = (child.stderr.take().unwrap(), log.clone());
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        WorkerProcess { child, log, reader: Some(reader) }
    }

    /// Waits until the worker's log has a line containing `text`.
    pub fn wait_for(&mut self, text: &str, timeout: Duration) {
        self.wait_for_line(text, timeout, |l| l.contains(text));
    }

    /// Waits until a status line reports at least `n` predictions.
    pub fn wait_for_predicted(&mut self, n: u64, timeout: Duration) {
        let what = format!("a status line with at least {n} predicted");
        self.wait_for_line(&what, timeout, |l| {
            let predicted = l.split("status: ").nth(1).and_then(|s| s.split(" predicted").next()?.rsplit(' ').next());
            predicted.and_then(|p| p.parse::<u64>().ok()).is_some_and(|p| p >= n)
        });
    }

    fn wait_for_line(&mut self, what: &str, timeout: Duration, found: impl Fn(&str) -> bool) {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if self.log.lock().unwrap().iter().any(|l| found(l)) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("worker exited ({status}) before logging {what}:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("worker did not log {what} within {timeout:?}:\n{}", self.log_text());
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// SIGTERM, then wait; returns whether it exited successfully.
    pub fn stop(mut self) -> (bool, String) {
        unsafe { libc_kill(self.child.id() as i32, 15) };
        let status = self.child.wait().unwrap();
        // Every line the worker wrote is in the log once the reader has drained the pipe.
        if let Some(reader) = self.reader.take() {
            reader.join().unwrap();
        }
        (status.success(), self.log_text())
    }

    /// SIGTERM, then wait at most `timeout`: the exit status, or `None` if it still runs (the
    /// process is left to `Drop`).
    pub fn stop_within(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        unsafe { libc_kill(self.child.id() as i32, 15) };
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub fn kill9(&mut self) {
        unsafe { libc_kill(self.child.id() as i32, 9) };
        let _ = self.child.wait();
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

/// One record read back from a topic.
#[derive(Debug, Clone)]
pub struct Record {
    pub partition: i32,
    pub key: Option<String>,
    pub value: Vec<u8>,
    pub headers: Vec<(String, String)>,
}

impl Record {
    pub fn header(&self, key: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// Reads a topic from the beginning until `n` records arrived or `timeout` passed.
pub fn read_topic(brokers: &str, topic: &str, n: usize, timeout: Duration) -> Vec<Record> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "kafray-test-reader")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let start = Instant::now();
    // The topic may not exist yet (a worker creates it): wait for it.
    let parts = loop {
        let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).unwrap();
        let n = md.topics().first().filter(|t| t.error().is_none()).map_or(0, |t| t.partitions().len());
        if n > 0 || start.elapsed() > timeout {
            break n as i32;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut tpl = TopicPartitionList::new();
    for p in 0..parts {
        tpl.add_partition_offset(topic, p, Offset::Beginning).unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut out = Vec::new();
    while out.len() < n && start.elapsed() < timeout {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            let headers = m
                .headers()
                .map(|hs| {
                    hs.iter()
                        .map(|h| (h.key.to_string(), String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned()))
                        .collect()
                })
                .unwrap_or_default();
            out.push(Record {
                partition: m.partition(),
                key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                value: m.payload().unwrap_or_default().to_vec(),
                headers,
            });
        }
    }
    out
}

/// Runs `kafray eval --json` and parses its report.
pub fn eval(brokers: &str, topic: &str, expect: usize, timeout_s: u64) -> serde_json::Value {
    let out = kafray(&[
        "eval",
        "--brokers",
        brokers,
        "--topic",
        topic,
        "--expect",
        &expect.to_string(),
        "--timeout",
        &timeout_s.to_string(),
        "--json",
    ])
    .output()
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("eval printed no JSON ({e}): {text}\n{}", String::from_utf8_lossy(&out.stderr)))
}

pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Predictions grouped by the frame's key.
pub fn predictions_by_key(brokers: &str, topic: &str, n: usize) -> Vec<(String, serde_json::Value)> {
    read_topic(brokers, topic, n, Duration::from_secs(120))
        .into_iter()
        .map(|r| (r.key.clone().unwrap_or_default(), serde_json::from_slice(&r.value).unwrap()))
        .collect()
}
