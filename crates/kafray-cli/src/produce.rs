//! `kafray produce`: MNIST digits, image files, or a synthetic camera fleet.
use crate::KafkaArgs;
use anyhow::Context as _;
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use kafray_tools::publish::{self, FrameSize, OutFrame, Publisher};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct ProduceArgs {
    #[command(subcommand)]
    source: Source,
    #[command(flatten)]
    kafka: KafkaArgs,
    /// Topic to publish to.
    #[arg(short, long, global = true, default_value = "frames")]
    topic: String,
    /// Stop after this many frames.
    #[arg(short = 'n', long, global = true)]
    limit: Option<usize>,
    /// Frames per second over all sources (default: as fast as the broker takes them).
    #[arg(long, global = true, conflicts_with = "schedule")]
    rate: Option<f64>,
    /// A bursty rate: RATE:SECONDS phases, repeated, e.g. 3000:2,600:2 (2 s at 3000/s, 2 s at 600/s).
    #[arg(long, global = true, value_parser = parse_schedule)]
    schedule: Option<Schedule>,
    /// Create the topic with this many partitions when it does not exist.
    #[arg(long, global = true)]
    partitions: Option<usize>,
    /// Spread frames evenly over the partitions (frame i to partition i mod P) instead of by
    /// source key; order per source is then not kept. For load tests with few sources.
    #[arg(long, global = true)]
    round_robin: bool,
    /// No progress bar.
    #[arg(short, long, global = true)]
    quiet: bool,
}

#[derive(Subcommand)]
enum Source {
    /// The MNIST test set (IDX, gzip or not) as raw 28x28x1 frames with labels.
    Mnist {
        /// Images file (idx3-ubyte).
        #[arg(long, default_value = "assets/mnist/t10k-images-idx3-ubyte.gz")]
        images: PathBuf,
        /// Labels file (idx1-ubyte).
        #[arg(long, default_value = "assets/mnist/t10k-labels-idx1-ubyte.gz")]
        labels: PathBuf,
        /// Number of source ids (keys) the digits are spread over.
        #[arg(long, default_value_t = 8)]
        sources: usize,
        /// Publish the set this many times (for streams longer than 10,000 digits).
        #[arg(long, default_value_t = 1)]
        repeat: usize,
    },
    /// PNG/JPEG files as they are; the key is the file name without extension.
    Images {
        /// Files or folders.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Publish the set this many times.
        #[arg(long, default_value_t = 1)]
        repeat: usize,
        /// Re-encode frames as JPEG of this size, N (N x N) or WxH (e.g. 1920x1080), as a camera
        /// at that resolution would send them.
        #[arg(long)]
        size: Option<FrameSize>,
    },
    /// N cameras, each sending F frames/s, cycling over the images of a folder.
    Camera {
        /// Folder (or file) of images the cameras cycle over.
        path: PathBuf,
        /// Number of cameras (keys cam-0 .. cam-N-1).
        #[arg(long, default_value_t = 4)]
        cameras: usize,
        /// Frames per second per camera.
        #[arg(long, default_value_t = 5.0)]
        fps: f64,
        /// Re-encode frames as JPEG of this size, N (N x N) or WxH (e.g. 1920x1080), as a camera
        /// at that resolution would send them.
        #[arg(long)]
        size: Option<FrameSize>,
        /// Stop after this many seconds (default: run until --limit or Ctrl-C).
        #[arg(long)]
        duration: Option<f64>,
    },
}

/// `--schedule` phases (a newtype, so clap takes the list as one value).
#[derive(Clone)]
struct Schedule(Vec<(f64, f64)>);

fn parse_schedule(s: &str) -> Result<Schedule, String> {
    publish::parse_schedule(s).map(Schedule).map_err(|e| e.to_string())
}

/// What to send and how fast.
struct Plan {
    frames: Box<dyn Iterator<Item = OutFrame>>,
    rate: Option<f64>,
    duration: Option<f64>,
    /// A finite set: (its frames, how many times it is sent).
    set: Option<(usize, usize)>,
}

impl Plan {
    /// A set of frames sent `repeat` times over.
    fn repeated(frames: Vec<OutFrame>, repeat: usize, rate: Option<f64>) -> Self {
        let set = Some((frames.len(), repeat));
        let n = frames.len().saturating_mul(repeat);
        Plan { frames: Box::new(frames.into_iter().cycle().take(n)), rate, duration: None, set }
    }
}

pub fn run(args: ProduceArgs) -> anyhow::Result<()> {
    let props = args.kafka.properties()?;
    let Plan { frames, rate, duration, set } = match args.source {
        Source::Mnist { images, labels, sources, repeat } => {
            let digits = kafray_tools::mnist::load(&images, &labels)
                .with_context(|| "load MNIST (run from the repository root, or pass --images/--labels)")?;
            Plan::repeated(publish::mnist_frames(&digits, sources).collect(), repeat, args.rate)
        }
        Source::Images { paths, repeat, size } => {
            let mut frames = Vec::new();
            for p in &paths {
                frames.extend(publish::photo_frames(p, size)?);
            }
            Plan::repeated(frames, repeat, args.rate)
        }
        Source::Camera { path, cameras, fps, size, duration } => {
            anyhow::ensure!(cameras > 0 && fps > 0.0, "--cameras and --fps must be positive");
            let images: Vec<_> = publish::photo_frames(&path, size)?.into_iter().map(|f| (f.value, f.format)).collect();
            let frames = (0..).map(move |i: usize| {
                let (cam, tick) = (i % cameras, i / cameras);
                let (value, format) = images[(tick + cam) % images.len()].clone();
                OutFrame { source: format!("cam-{cam}"), value, format, shape: None, label: None }
            });
            Plan {
                frames: Box::new(frames),
                rate: Some(args.rate.unwrap_or(cameras as f64 * fps)),
                duration,
                set: None,
            }
        }
    };
    let total = match (set, args.limit) {
        // More frames than the set holds would end the stream early without a word, and whoever
        // waits for N results would wait forever.
        (Some((per_set, repeat)), Some(l)) if l > per_set.saturating_mul(repeat) => {
            let holds = per_set.saturating_mul(repeat);
            return Err(kafray::Error::Config(format!(
                "--limit {l} asks for more frames than the source holds ({per_set} x --repeat {repeat} = {holds}): \
                 pass --repeat {} (the set is sent again), or a --limit of at most {holds}",
                l.div_ceil(per_set.max(1)),
            ))
            .into());
        }
        (Some((per_set, repeat)), l) => Some(l.unwrap_or(per_set.saturating_mul(repeat))),
        (None, l) => l,
    };
    match args.partitions {
        Some(p) => kafray::admin::ensure_topics(&args.kafka.brokers, &[(args.topic.as_str(), p)], &props)?,
        // The probe: a cluster that cannot be reached says why (authentication, TLS) at once.
        None => drop(kafray::admin::partition_count(&args.kafka.brokers, &args.topic, &props)?),
    }
    let mut publisher = Publisher::new(&args.kafka.brokers, &args.topic, &props)?;
    if args.round_robin {
        publisher = publisher.round_robin(&args.kafka.brokers, &props)?;
    }
    let bar = if args.quiet { ProgressBar::hidden() } else { ProgressBar::new(total.unwrap_or(0) as u64) };
    bar.set_style(ProgressStyle::with_template("{bar:40} {pos}/{len} frames {per_sec} {elapsed}").unwrap());
    // Ctrl-C / SIGTERM end the stream after what was sent is acknowledged.
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, stop.clone())?;
    }
    let start = Instant::now();
    let pacer = match args.schedule {
        Some(Schedule(phases)) => publish::Pacer::schedule(phases),
        None => publish::Pacer::new(rate),
    };
    for (sent, frame) in frames.enumerate() {
        let over = total.is_some_and(|t| sent >= t) || duration.is_some_and(|d| start.elapsed().as_secs_f64() >= d);
        if over || stop.load(Ordering::Relaxed) {
            break;
        }
        pacer.wait(sent);
        publisher.send(&frame)?;
        bar.inc(1);
    }
    let acked = publisher.finish(Duration::from_secs(60))?;
    bar.finish_and_clear();
    let secs = start.elapsed().as_secs_f64();
    eprintln!("published {acked} frames to {} in {secs:.1} s ({:.0} frames/s)", args.topic, acked as f64 / secs);
    Ok(())
}
