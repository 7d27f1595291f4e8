//! Reading the predictions topic back: counts, duplicates, accuracy, throughput, latency.
use kafray::error::{KafkaContext as _, Result};
use kafray::frame::HEADER_TRUTH;
use kafray::sink::Prediction;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

pub struct EvalOptions {
    pub brokers: String,
    pub topic: String,
    /// Stop once this many distinct frames have a prediction.
    pub expect: Option<usize>,
    /// Give up after this long.
    pub timeout: Duration,
    /// Stop when nothing new arrived for this long (after at least one prediction).
    pub idle: Duration,
    pub kafka: Vec<(String, String)>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EvalReport {
    pub predictions: usize,
    pub distinct_frames: usize,
    pub duplicates: usize,
    pub unparseable: usize,
    pub labelled: usize,
    pub correct: usize,
    pub accuracy: Option<f64>,
    /// Distinct frames per second between the first and last prediction (worker clocks).
    pub throughput_per_s: f64,
    /// Earliest frame timestamp and latest prediction, ms since the epoch: distinct frames over
    /// this span is a throughput that also counts the first batches' work (for short runs).
    pub first_produced_ms: Option<i64>,
    pub last_done_ms: Option<i64>,
    pub latency_ms_p50: Option<i64>,
    pub latency_ms_p95: Option<i64>,
    pub latency_ms_p99: Option<i64>,
    pub latency_ms_max: Option<i64>,
    pub mean_batch_size: f64,
    pub per_worker: BTreeMap<String, usize>,
    /// Predictions per model name: a rolling update shows the old and the new.
    pub per_model: BTreeMap<String, usize>,
    /// The longest a partition went unanswered: over frames in offset order, the longest time
    /// one waited for its result with no frame ahead of it on its partition still waiting
    /// (done minus the later of its produce time and the previous frame's done time). At a
    /// steady rate this is about the latency; a partition left unread (a worker that left
    /// without telling the group, a rebalance) shows as the time it was left.
    pub longest_partition_wait_ms: Option<i64>,
    /// Where that was: the partition, and the produce time of the frame that waited.
    pub longest_partition_wait_at: Option<(i32, i64)>,
    pub timed_out: bool,
}

/// [`EvalReport::longest_partition_wait_ms`] and where, from each frame's first prediction.
fn longest_partition_wait(first: &HashMap<(i32, i64), &ReadPrediction>) -> Option<(i64, i32, i64)> {
    let mut frames: Vec<(i32, i64, i64, i64)> = first
        .iter()
        .filter_map(|(&(partition, offset), r)| {
            r.prediction.ts_produce_ms.map(|produced| (partition, offset, produced, r.prediction.ts_done_ms))
        })
        .collect();
    frames.sort_unstable();
    let mut longest: Option<(i64, i32, i64)> = None;
    let mut previous: Option<(i32, i64)> = None; // (partition, done)
    for (partition, _, produced, done) in frames {
        let ahead_done = previous.filter(|(p, _)| *p == partition).map_or(produced, |(_, d)| d);
        let waited = (done - produced.max(ahead_done)).max(0);
        if longest.is_none_or(|(w, _, _)| waited > w) {
            longest = Some((waited, partition, produced));
        }
        previous = Some((partition, done));
    }
    longest
}

/// One prediction read back, with its `kafray.truth` header.
#[derive(Debug, Clone)]
pub struct ReadPrediction {
    pub key: Option<String>,
    pub prediction: Prediction,
    pub truth: Option<String>,
}

/// Reads every prediction from the start of the topic until `expect` distinct frames are
/// seen, the topic goes idle, or the timeout passes.
pub fn read_predictions(opts: &EvalOptions) -> Result<(Vec<ReadPrediction>, usize, bool)> {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", &opts.brokers)
        .set("group.id", format!("kafray-eval-{}", std::process::id()))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false");
    for (k, v) in &opts.kafka {
        cfg.set(k, v);
    }
    // First the probe: a cluster that cannot be reached says why (authentication, TLS) at once.
    kafray::admin::partition_count(&opts.brokers, &opts.topic, &opts.kafka)?;
    let consumer: BaseConsumer = cfg.create().kafka_context(|| format!("consumer for {}", opts.brokers))?;
    // Assign every partition from the beginning: no group join, nothing committed.
    let start = Instant::now();
    let partitions = loop {
        let md = consumer
            .fetch_metadata(Some(&opts.topic), Duration::from_secs(10))
            .kafka_context(|| format!("metadata of {}", opts.topic))?;
        let n = md.topics().first().filter(|t| t.error().is_none()).map(|t| t.partitions().len()).unwrap_or(0);
        if n > 0 || start.elapsed() > opts.timeout {
            break n;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions as i32 {
        tpl.add_partition_offset(&opts.topic, p, Offset::Beginning).kafka_context(|| "assign".into())?;
    }
    consumer.assign(&tpl).kafka_context(|| format!("assign {}", opts.topic))?;

    let mut out = Vec::new();
    let mut frames = std::collections::HashSet::new();
    let mut unparseable = 0;
    let mut last_new = Instant::now();
    let mut timed_out = false;
    loop {
        let reached = opts.expect.is_some_and(|n| frames.len() >= n);
        // Once the target is reached, linger briefly so late duplicates are counted too.
        let idle_limit = if reached { opts.idle.min(Duration::from_secs(1)) } else { opts.idle };
        if (reached || opts.expect.is_none()) && !out.is_empty() && last_new.elapsed() >= idle_limit {
            break;
        }
        if start.elapsed() >= opts.timeout {
            timed_out = !reached;
            break;
        }
        let msg = match consumer.poll(Duration::from_millis(100)) {
            None => continue,
            Some(Ok(msg)) => msg,
            // A passing broker error should not end the evaluation; the timeout bounds it.
            Some(Err(e)) => {
                tracing::warn!("reading {}: {e}", opts.topic);
                continue;
            }
        };
        last_new = Instant::now();
        let Some(p) = msg.payload().and_then(|v| serde_json::from_slice::<Prediction>(v).ok()) else {
            unparseable += 1;
            continue;
        };
        let truth = msg.headers().and_then(|hs| {
            hs.iter()
                .find(|h| h.key == HEADER_TRUTH)
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        });
        frames.insert((p.partition, p.offset));
        out.push(ReadPrediction {
            key: msg.key().map(|k| String::from_utf8_lossy(k).into_owned()),
            prediction: p,
            truth,
        });
    }
    Ok((out, unparseable, timed_out))
}

/// Writes one CSV row per frame (its first prediction): where and when it was produced and
/// classified, for timelines and percentiles of one's own.
pub fn write_records(path: &std::path::Path, predictions: &[ReadPrediction]) -> Result<()> {
    use std::io::Write as _;
    let io = |e| kafray::Error::io(format!("write {}", path.display()), e);
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).map_err(io)?);
    writeln!(out, "partition,offset,worker,batch_size,ts_produce_ms,ts_done_ms,latency_ms").map_err(io)?;
    let mut seen = std::collections::HashSet::new();
    for r in predictions.iter().filter(|r| seen.insert((r.prediction.partition, r.prediction.offset))) {
        let p = &r.prediction;
        let (produced, latency) = match p.ts_produce_ms {
            Some(t) => (t.to_string(), (p.ts_done_ms - t).to_string()),
            None => (String::new(), String::new()),
        };
        writeln!(
            out,
            "{},{},{},{},{produced},{},{latency}",
            p.partition, p.offset, p.worker, p.batch_size, p.ts_done_ms
        )
        .map_err(io)?;
    }
    out.flush().map_err(io)
}

/// Summarises predictions read back.
pub fn report(predictions: &[ReadPrediction], unparseable: usize, timed_out: bool) -> EvalReport {
    // The first prediction of each frame counts for accuracy and latency.
    let mut first: HashMap<(i32, i64), &ReadPrediction> = HashMap::new();
    let (mut per_worker, mut per_model) = (BTreeMap::new(), BTreeMap::new());
    for r in predictions {
        first.entry((r.prediction.partition, r.prediction.offset)).or_insert(r);
        *per_worker.entry(r.prediction.worker.clone()).or_insert(0) += 1;
        *per_model.entry(r.prediction.model.clone()).or_insert(0) += 1;
    }
    let labelled: Vec<_> = first.values().filter(|r| r.truth.is_some()).collect();
    let correct = labelled
        .iter()
        .filter(|r| {
            let t = r.truth.as_deref().unwrap_or_default();
            t == r.prediction.class.to_string() || r.prediction.label.as_deref() == Some(t)
        })
        .count();
    let mut latencies: Vec<i64> =
        first.values().filter_map(|r| r.prediction.ts_produce_ms.map(|t| r.prediction.ts_done_ms - t)).collect();
    latencies.sort_unstable();
    let pct = |q: f64| (!latencies.is_empty()).then(|| latencies[((latencies.len() - 1) as f64 * q).round() as usize]);
    let done: Vec<i64> = first.values().map(|r| r.prediction.ts_done_ms).collect();
    let span_ms = match (done.iter().min(), done.iter().max()) {
        (Some(a), Some(b)) => (b - a).max(1),
        _ => 1,
    };
    // Each frame of a batch of b stands for 1/b of a batch: this is the mean per batch, as the
    // worker's status line reports it (a mean per frame would weigh big batches more).
    let batches: f64 = first.values().map(|r| 1.0 / r.prediction.batch_size.max(1) as f64).sum();
    let mean_batch = if first.is_empty() { 0.0 } else { first.len() as f64 / batches };
    let longest_wait = longest_partition_wait(&first);
    EvalReport {
        predictions: predictions.len(),
        distinct_frames: first.len(),
        duplicates: predictions.len() - first.len(),
        unparseable,
        labelled: labelled.len(),
        correct,
        accuracy: (!labelled.is_empty()).then(|| correct as f64 / labelled.len() as f64),
        // N predictions span N - 1 gaps.
        throughput_per_s: first.len().saturating_sub(1) as f64 * 1000.0 / span_ms as f64,
        first_produced_ms: first.values().filter_map(|r| r.prediction.ts_produce_ms).min(),
        last_done_ms: done.iter().max().copied(),
        latency_ms_p50: pct(0.50),
        latency_ms_p95: pct(0.95),
        latency_ms_p99: pct(0.99),
        latency_ms_max: latencies.last().copied(),
        mean_batch_size: mean_batch,
        per_worker,
        per_model,
        longest_partition_wait_ms: longest_wait.map(|(w, _, _)| w),
        longest_partition_wait_at: longest_wait.map(|(_, p, at)| (p, at)),
        timed_out,
    }
}

impl std::fmt::Display for EvalReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |v: Option<i64>| v.map(|v| format!("{v} ms")).unwrap_or_else(|| "-".into());
        writeln!(
            f,
            "predictions      {} ({} distinct frames, {} duplicates)",
            self.predictions, self.distinct_frames, self.duplicates
        )?;
        match self.accuracy {
            Some(a) => {
                writeln!(f, "accuracy         {:.2} % ({} / {} labelled)", a * 100.0, self.correct, self.labelled)?
            }
            None => writeln!(f, "accuracy         - (no kafray.truth headers)")?,
        }
        writeln!(f, "throughput       {:.0} frames/s", self.throughput_per_s)?;
        writeln!(
            f,
            "latency          p50 {}  p95 {}  p99 {}  max {}",
            ms(self.latency_ms_p50),
            ms(self.latency_ms_p95),
            ms(self.latency_ms_p99),
            ms(self.latency_ms_max)
        )?;
        writeln!(f, "mean batch size  {:.1}", self.mean_batch_size)?;
        if let (Some(w), Some((p, _))) = (self.longest_partition_wait_ms, self.longest_partition_wait_at) {
            writeln!(f, "longest wait     {w} ms (partition {p}: unanswered with nothing ahead of it)")?;
        }
        let workers: Vec<String> = self.per_worker.iter().map(|(w, n)| format!("{w}: {n}")).collect();
        write!(f, "per worker       {}", workers.join(", "))?;
        if self.per_model.len() > 1 {
            let models: Vec<String> = self.per_model.iter().map(|(m, n)| format!("{m}: {n}")).collect();
            write!(f, "\nper model        {}", models.join(", "))?;
        }
        if self.unparseable > 0 {
            write!(f, "\nunparseable      {}", self.unparseable)?;
        }
        if self.timed_out {
            write!(f, "\nTIMED OUT before all expected frames had a prediction")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(offset: i64, class: usize, truth: &str, batch_size: usize, done: i64) -> ReadPrediction {
        ReadPrediction {
            key: None,
            truth: Some(truth.into()),
            prediction: Prediction {
                source: None,
                seq: None,
                partition: 0,
                offset,
                class,
                label: None,
                score: 1.0,
                top: vec![],
                model: "m".into(),
                worker: format!("w{}", offset % 2),
                batch_size,
                ts_produce_ms: Some(done - 10 * (offset + 1)),
                ts_done_ms: done,
            },
        }
    }

    #[test]
    fn counts_duplicates_once_and_means_per_batch() {
        // One batch of 1 (offset 0) and one batch of 3 (offsets 1..=3); offset 2 delivered twice.
        let preds = vec![
            read(0, 7, "7", 1, 1000),
            read(1, 1, "1", 3, 1500),
            read(2, 2, "9", 3, 1500),
            read(3, 3, "3", 3, 2000),
            read(2, 2, "9", 3, 2000),
        ];
        let r = report(&preds, 0, false);
        assert_eq!((r.predictions, r.distinct_frames, r.duplicates), (5, 4, 1));
        assert_eq!((r.labelled, r.correct), (4, 3));
        assert_eq!(r.accuracy, Some(0.75));
        assert!((r.mean_batch_size - 2.0).abs() < 1e-9, "two batches of 4 frames: {}", r.mean_batch_size);
        assert!((r.throughput_per_s - 3.0).abs() < 1e-9, "3 gaps in 1 s: {}", r.throughput_per_s);
        assert_eq!((r.first_produced_ms, r.last_done_ms), (Some(1000 - 10), Some(2000)));
        // Latencies 10, 20, 30, 40 ms; nearest rank: p50 = value at round(0.5 * 3) = 30.
        assert_eq!((r.latency_ms_p50, r.latency_ms_p99, r.latency_ms_max), (Some(30), Some(40), Some(40)));
    }

    fn on(partition: i32, offset: i64, produced: i64, done: i64) -> ReadPrediction {
        let mut r = read(offset, 0, "0", 1, done);
        r.prediction.partition = partition;
        r.prediction.ts_produce_ms = Some(produced);
        r
    }

    #[test]
    fn the_longest_partition_wait_is_the_time_a_partition_was_left_unread_not_a_queue_behind_it() {
        // Partition 0 at 100 frames/s answered within 5 ms, except that it was left unread from
        // 1_030 until 3_000; the frames that piled up meanwhile waited behind the first one.
        let mut preds = Vec::new();
        for (i, produced) in (1_000..1_030).step_by(10).enumerate() {
            preds.push(on(0, i as i64, produced, produced + 5));
        }
        preds.push(on(0, 3, 1_030, 3_000)); // unread for 1_970 ms
        preds.push(on(0, 4, 1_040, 3_050)); // queued behind offset 3: 50 ms of its own, not 2_010
        preds.push(on(1, 0, 1_000, 1_300)); // another partition: 300 ms
        let r = report(&preds, 0, false);
        assert_eq!(r.longest_partition_wait_ms, Some(1_970));
        assert_eq!(r.longest_partition_wait_at, Some((0, 1_030)));
    }
}
