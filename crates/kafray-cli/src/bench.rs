//! `kafray bench`: raw model throughput (same backend, same threads, no Kafka) against
//! end-to-end pipeline throughput (Kafka in, decode, batch, infer, Kafka out, offsets), per
//! model and batch size, measured in one run; written as CSV.
use clap::Args;
use kafray::frame::FrameHeaders;
use kafray::metrics::Metrics;
use kafray::model::Model;
use kafray::WorkerConfig;
use kafray_tools::broker::{EmbeddedBroker, Storage};
use kafray_tools::publish::{self, OutFrame, Publisher};
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct BenchArgs {
    /// Use this Kafka cluster instead of starting a local broker.
    #[arg(short, long, env = "KAFRAY_BROKERS")]
    brokers: Option<String>,
    /// Storage of the local broker: `memory` acknowledges in about a millisecond, like a Kafka
    /// broker; `sqlite` commits each produce to disk first (slow acknowledgements).
    #[arg(long, default_value = "memory", value_parser = ["memory", "sqlite"])]
    broker_storage: String,
    #[command(flatten)]
    connection: crate::ConnectionArgs,
    /// Models to measure.
    #[arg(long, value_delimiter = ',', default_value = "mnist,mobilenet_v2")]
    models: Vec<String>,
    /// Batch sizes to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,5,10,20,40")]
    batch_sizes: Vec<usize>,
    /// The worker's --max-wait-ms (a partial batch is sent after this long).
    #[arg(long, default_value_t = 20)]
    max_wait_ms: u64,
    /// ONNX Runtime intra-op threads, the same for raw and pipeline.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Frames per measurement (default: 10000 for mnist, 800 for the ImageNet models).
    #[arg(short = 'n', long)]
    frames: Option<usize>,
    /// Photos the ImageNet models classify (re-encoded as 224x224 JPEG, as a camera sends them).
    #[arg(long, default_value = "../shared/assets/images")]
    photos: PathBuf,
    /// Folder for the CSV.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
}

struct Row {
    model: String,
    batch: usize,
    frames: usize,
    raw: f64,
    pipeline: f64,
    mean_batch: f64,
    decode_ms: f64,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    // Parsed once, before the broker starts or anything is measured, so a bad -X fails at once.
    let kafka = args.connection.properties()?;
    let broker = match &args.brokers {
        Some(_) => None,
        None => Some(EmbeddedBroker::start_with(match args.broker_storage.as_str() {
            "sqlite" => Storage::Sqlite,
            _ => Storage::Memory,
        })?),
    };
    let brokers = args.brokers.clone().unwrap_or_else(|| broker.as_ref().unwrap().bootstrap());
    let run_id = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
    let mut rows = Vec::new();
    for name in &args.models {
        let frames = bench_frames(name, &args)?;
        let mut model = Model::load(kafray::model::find_model(name)?, args.threads, 5)?;
        // Decode + preprocess once: the raw measurement is inference alone.
        let t = Instant::now();
        let mut tensors = vec![0.0f32; frames.len() * model.input_len()];
        for (f, slot) in frames.iter().zip(tensors.chunks_mut(model.input_len())) {
            let headers = FrameHeaders {
                format: Some(f.format.as_str().into()),
                shape: f.shape.map(|s| s.to_string()),
                ..Default::default()
            };
            model.frame_to_tensor(&f.value, &headers, slot).map_err(|r| anyhow::anyhow!("{r}"))?;
        }
        let decode_ms = t.elapsed().as_secs_f64() * 1000.0 / frames.len() as f64;
        for &batch in &args.batch_sizes {
            let raw = raw_throughput(&mut model, &tensors, batch)?;
            let (pipeline, mean_batch) = pipeline_throughput(&brokers, name, &frames, batch, &args, &kafka, run_id)?;
            let row = Row { model: name.clone(), batch, frames: frames.len(), raw, pipeline, mean_batch, decode_ms };
            eprintln!(
                "{:<14} batch {:>2}: raw {:>7.0} img/s  pipeline {:>7.0} img/s  ratio {:.2}  (mean batch {:.1})",
                row.model,
                batch,
                raw,
                pipeline,
                pipeline / raw,
                mean_batch
            );
            rows.push(row);
        }
    }
    std::fs::create_dir_all(&args.out)?;
    let broker_label = if args.brokers.is_some() { "external" } else { args.broker_storage.as_str() };
    let path = args.out.join(format!("pipeline_vs_raw_{broker_label}.csv"));
    let mut f = std::fs::File::create(&path)?;
    writeln!(f, "broker,model,batch_size,frames,threads,raw_images_per_s,pipeline_images_per_s,pipeline_over_raw,mean_batch,decode_ms_per_frame")?;
    for r in &rows {
        writeln!(
            f,
            "{},{},{},{},{},{:.1},{:.1},{:.3},{:.2},{:.3}",
            broker_label,
            r.model,
            r.batch,
            r.frames,
            args.threads,
            r.raw,
            r.pipeline,
            r.pipeline / r.raw,
            r.mean_batch,
            r.decode_ms
        )?;
    }
    eprintln!("wrote {}", path.display());
    Ok(())
}

fn bench_frames(model: &str, args: &BenchArgs) -> anyhow::Result<Vec<OutFrame>> {
    if model == "mnist" {
        let digits = kafray_tools::mnist::load(
            "assets/mnist/t10k-images-idx3-ubyte.gz".as_ref(),
            "assets/mnist/t10k-labels-idx1-ubyte.gz".as_ref(),
        )?;
        let n = args.frames.unwrap_or(10_000);
        let all: Vec<OutFrame> = publish::mnist_frames(&digits, 8).collect();
        return Ok(all.iter().cycle().take(n).cloned().collect());
    }
    let photos: Vec<Vec<u8>> = publish::photo_frames(&args.photos, Some(publish::FrameSize::square(224)))?
        .into_iter()
        .map(|f| f.value)
        .collect();
    let n = args.frames.unwrap_or(800);
    Ok((0..n)
        .map(|i| OutFrame {
            source: format!("cam-{}", i % 4),
            value: photos[i % photos.len()].clone(),
            format: kafray::frame::PixelFormat::Jpeg,
            shape: None,
            label: None,
        })
        .collect())
}

fn raw_throughput(model: &mut Model, tensors: &[f32], batch: usize) -> anyhow::Result<f64> {
    let chunk = batch * model.input_len();
    model.classify(&tensors[..chunk.min(tensors.len())])?; // warm-up
    let t = Instant::now();
    for part in tensors.chunks(chunk) {
        model.classify(part)?;
    }
    Ok((tensors.len() / model.input_len()) as f64 / t.elapsed().as_secs_f64())
}

/// Pre-fills a topic, then times one worker from its first frame to the last acknowledgement.
fn pipeline_throughput(
    brokers: &str,
    model: &str,
    frames: &[OutFrame],
    batch: usize,
    args: &BenchArgs,
    kafka: &[(String, String)],
    run_id: u64,
) -> anyhow::Result<(f64, f64)> {
    let threads = args.threads;
    let topic = format!("bench-{run_id}-{model}-b{batch}");
    let (out, dlq) = (format!("{topic}.predictions"), format!("{topic}.dlq"));
    kafray::admin::ensure_topics(brokers, &[(&topic, 4), (&out, 4), (&dlq, 1)], kafka)?;
    let mut publisher = Publisher::new(brokers, &topic, kafka)?;
    for f in frames {
        publisher.send(f)?;
    }
    publisher.finish(Duration::from_secs(120))?;

    let config = WorkerConfig {
        brokers: brokers.into(),
        input_topic: topic.clone(),
        output_topic: out,
        group: format!("{topic}-group"),
        model: model.into(),
        batch_size: batch,
        max_wait_ms: args.max_wait_ms,
        threads,
        status_interval_s: 0,
        max_in_flight: 2000.max(batch * 4),
        kafka: kafka.to_vec(),
        insecure_skip_tls_verify: args.connection.insecure_skip_tls_verify,
        metrics_addr: String::new(),
        ..WorkerConfig::default()
    }
    .validated()?;
    let metrics = Arc::new(Metrics::new());
    let stop = Arc::new(AtomicBool::new(false));
    let worker = {
        let (metrics, stop) = (metrics.clone(), stop.clone());
        let loaded = Model::load(kafray::model::find_model(model)?, threads, 5)?;
        std::thread::spawn(move || kafray::worker::run_with_model(&config, loaded, stop, metrics))
    };
    let n = frames.len() as u64;
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut first: Option<Instant> = None;
    let result = loop {
        let s = metrics.snapshot();
        if first.is_none() && s.consumed > 0 {
            first = Some(Instant::now());
        }
        if s.predicted + s.dead_lettered >= n {
            let secs = first.map(|t| t.elapsed().as_secs_f64()).unwrap_or(f64::NAN);
            break Ok((n as f64 / secs, s.mean_batch()));
        }
        if Instant::now() > deadline || worker.is_finished() {
            break Err(anyhow::anyhow!(
                "pipeline bench for {model} batch {batch} did not finish ({} of {n} done)",
                s.predicted
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    stop.store(true, Ordering::Relaxed);
    worker.join().map_err(|_| anyhow::anyhow!("worker panicked"))??;
    result
}
