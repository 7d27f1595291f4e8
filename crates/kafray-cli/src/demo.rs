//! `kafray demo`: the whole pipeline on one machine, with nothing set up by hand.
use crate::{BatchArgs, ConnectionArgs};
use clap::Args;
use kafray::metrics::Metrics;
use kafray::WorkerConfig;
use kafray_tools::broker::{EmbeddedBroker, Storage};
use kafray_tools::eval::{self, EvalOptions};
use kafray_tools::publish::{self, Publisher};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct DemoArgs {
    /// Use this Kafka cluster instead of starting a local broker.
    #[arg(short, long, env = "KAFRAY_BROKERS")]
    brokers: Option<String>,
    #[command(flatten)]
    connection: ConnectionArgs,
    /// Number of workers (consumer-group members, one thread each).
    #[arg(short, long, default_value_t = 2)]
    workers: usize,
    /// Partitions of the frames topic.
    #[arg(long, default_value_t = 4)]
    partitions: usize,
    #[command(flatten)]
    batching: BatchArgs,
    /// How many of the 10,000 test digits to stream.
    #[arg(short = 'n', long, default_value_t = 10_000)]
    limit: usize,
    /// MNIST images file.
    #[arg(long, default_value = "assets/mnist/t10k-images-idx3-ubyte.gz")]
    images: PathBuf,
    /// MNIST labels file.
    #[arg(long, default_value = "assets/mnist/t10k-labels-idx1-ubyte.gz")]
    labels: PathBuf,
    /// Publish at this many frames/s, as live cameras would.
    #[arg(long, default_value_t = DEFAULT_RATE, conflicts_with = "burst")]
    rate: f64,
    /// Publish every digit at once instead, as fast as the broker takes them: the throughput of
    /// an unpaced burst (latency then includes the backlog).
    #[arg(long)]
    burst: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// The default pace, frames/s: well inside what 2 workers sustain on a 2-core machine, so the
/// latency shown is the pipeline's and not a backlog's (bench/RESULTS.md has the saturation).
const DEFAULT_RATE: f64 = 1000.0;

pub fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let digits = kafray_tools::mnist::load(&args.images, &args.labels)
        .map_err(|e| anyhow::anyhow!("{e}\n  (run from the repository root, or pass --images/--labels)"))?;
    let n = args.limit.min(digits.len());
    let say = |s: String| {
        if !args.json {
            eprintln!("{s}")
        }
    };

    let (_broker, brokers, prefix) = match &args.brokers {
        Some(b) => {
            // On a shared cluster, fresh topics keep this run's numbers exact.
            let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
            (None, b.clone(), format!("kafray-demo-{stamp}-"))
        }
        None => {
            // In memory: the folder is temporary anyway, and the durable (SQLite) store's commit
            // latency would cap the demo below what the workers do.
            let broker = EmbeddedBroker::start_with(Storage::Memory)?;
            say(format!("started a local broker (Tansu) on {}", broker.bootstrap()));
            let b = broker.bootstrap();
            (Some(broker), b, String::new())
        }
    };
    let props = args.connection.properties()?;
    let (frames, predictions) = (format!("{prefix}frames"), format!("{prefix}predictions"));
    let dlq = format!("{frames}.dlq");
    kafray::admin::ensure_topics(
        &brokers,
        &[(&frames, args.partitions), (&predictions, args.partitions), (&dlq, 1)],
        &props,
    )?;

    // Created before the workers join, so its idempotent session (a producer id from the broker)
    // is set up by the first frame, rather than holding the first frames while it is.
    let mut publisher = Publisher::new(&brokers, &frames, &props)?;
    let model = kafray::model::find_model("mnist")?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    let mut worker_metrics = Vec::new();
    let mut defaults = WorkerConfig::default();
    args.batching.apply(&mut defaults);
    for i in 0..args.workers.max(1) {
        let config = WorkerConfig {
            brokers: brokers.clone(),
            input_topic: frames.clone(),
            output_topic: predictions.clone(),
            group: format!("{prefix}kafray-demo"),
            model: model.display().to_string(),
            status_interval_s: 0,
            worker_id: Some(format!("demo-worker-{i}")),
            kafka: props.clone(),
            insecure_skip_tls_verify: args.connection.insecure_skip_tls_verify,
            // Several workers in one process: the report is the demo's output, not /metrics.
            metrics_addr: String::new(),
            ..defaults.clone()
        }
        .validated()?;
        let (stop, metrics) = (stop.clone(), Arc::new(Metrics::new()));
        worker_metrics.push(metrics.clone());
        workers.push(std::thread::spawn(move || kafray::worker::run(&config, stop, metrics)));
    }
    say(format!("{} workers on {frames} -> {predictions}, model {}", args.workers.max(1), model.display()));
    // Publish once the group owns every partition and has spread them over the workers, so latency
    // measures the pipeline, not the join: the broker answers the first member at once, and the
    // rebalance that brings in the next ones must be over before the stream starts.
    let joined = Instant::now();
    let spread = |m: &Arc<Metrics>| args.workers > args.partitions || m.assigned_partitions.load(Ordering::Relaxed) > 0;
    while worker_metrics.iter().map(|m| m.assigned_partitions.load(Ordering::Relaxed)).sum::<usize>() < args.partitions
        || !worker_metrics.iter().all(spread)
    {
        if joined.elapsed() > Duration::from_secs(60) || workers.iter().any(|w| w.is_finished()) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if workers.iter().any(|w| w.is_finished()) {
        // A worker that stopped already failed to start (model, runtime, broker): say why now.
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            w.join().map_err(|_| anyhow::anyhow!("a worker panicked"))??;
        }
        anyhow::bail!("the workers stopped before the stream started");
    }
    say(format!("the group joined in {:.1} s", joined.elapsed().as_secs_f64()));

    let start = Instant::now();
    let rate = (!args.burst).then_some(args.rate);
    if let Some(r) = rate {
        say(format!("publishing {n} MNIST test digits at {r:.0} frames/s (--burst: all at once)"));
    }
    let pacer = publish::Pacer::new(rate);
    for (i, frame) in publish::mnist_frames(&digits, 8).take(n).enumerate() {
        pacer.wait(i);
        publisher.send(&frame)?;
    }
    publisher.finish(Duration::from_secs(60))?;
    say(format!(
        "published {n} MNIST test digits in {:.1} s{}; waiting for predictions",
        start.elapsed().as_secs_f64(),
        if args.burst { " (a burst: latency includes the backlog)" } else { "" }
    ));

    let opts = EvalOptions {
        brokers: brokers.clone(),
        topic: predictions,
        expect: Some(n),
        timeout: Duration::from_secs(300),
        idle: Duration::from_secs(30),
        kafka: props,
    };
    let read = eval::read_predictions(&opts);
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().map_err(|_| anyhow::anyhow!("a worker panicked"))??;
    }
    let (read, unparseable, timed_out) = read?;
    let report = eval::report(&read, unparseable, timed_out);
    // A worker whose results could not be delivered starts again by itself and reads those
    // frames again: the report says so, since some may then be predicted twice.
    let restarts: u64 = worker_metrics.iter().map(|m| m.restarts.load(Ordering::Relaxed)).sum();
    if args.json {
        let mut json = serde_json::to_value(&report)?;
        json["worker_restarts"] = restarts.into();
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        println!("{report}");
        if restarts > 0 {
            println!("workers started again {restarts} time(s) after undelivered results (see the log above)");
        }
    }
    Ok(if report.distinct_frames == n { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
