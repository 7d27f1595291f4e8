//! Publishing frames (the producer side of the contract): from MNIST, image folders, or a
//! synthetic camera fleet.
use kafray::error::{Error, KafkaContext as _, Result};
use kafray::frame::{PixelFormat, Shape, HEADER_FORMAT, HEADER_LABEL, HEADER_SEQ, HEADER_SHAPE};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

/// One frame to publish.
#[derive(Debug, Clone)]
pub struct OutFrame {
    pub source: String,
    pub value: Vec<u8>,
    pub format: PixelFormat,
    /// Required for raw frames.
    pub shape: Option<Shape>,
    pub label: Option<String>,
}

#[derive(Default)]
pub struct PublishContext {
    pub acked: AtomicU64,
    pub failed: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl ClientContext for PublishContext {}

impl ProducerContext for PublishContext {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => {
                self.acked.fetch_add(1, Relaxed);
            }
            Err((e, _)) => {
                self.failed.fetch_add(1, Relaxed);
                self.first_error.lock().unwrap().get_or_insert_with(|| e.to_string());
            }
        }
    }
}

pub struct Publisher {
    producer: ThreadedProducer<PublishContext>,
    topic: String,
    /// Next `kafray.seq` per source.
    seqs: std::collections::HashMap<String, u64>,
    /// Round-robin over this many partitions instead of by key; with the next partition.
    spread: Option<(i32, i32)>,
    queue_wait_limit: Duration,
}

impl Publisher {
    pub fn new(brokers: &str, topic: &str, extra: &[(String, String)]) -> Result<Self> {
        let producer = kafray::sink::producer_config(brokers, extra)
            .create_with_context(PublishContext::default())
            .kafka_context(|| format!("producer for {brokers}"))?;
        let queue_wait_limit = kafray::sink::queue_wait_limit(extra);
        Ok(Publisher { producer, topic: topic.into(), seqs: Default::default(), spread: None, queue_wait_limit })
    }

    /// Sends frame i to partition i mod (the topic's partitions) rather than by key, so every
    /// partition gets the same share however few sources there are. Order per source is lost.
    pub fn round_robin(mut self, brokers: &str, extra: &[(String, String)]) -> Result<Self> {
        let partitions = kafray::admin::partition_count(brokers, &self.topic, extra)?.ok_or_else(|| {
            Error::Config(format!("topic {} does not exist: create it (--partitions N) to spread over it", self.topic))
        })?;
        self.spread = Some((partitions as i32, 0));
        Ok(self)
    }

    /// Queues a frame; the record timestamp is now (its capture time).
    pub fn send(&mut self, frame: &OutFrame) -> Result<()> {
        let seq = self.seqs.entry(frame.source.clone()).or_insert(0);
        let seq_text = seq.to_string();
        *seq += 1;
        let shape_text = frame.shape.map(|s| s.to_string());
        let mut headers = OwnedHeaders::new()
            .insert(Header { key: HEADER_FORMAT, value: Some(frame.format.as_str()) })
            .insert(Header { key: HEADER_SEQ, value: Some(&seq_text) });
        if let Some(shape) = &shape_text {
            headers = headers.insert(Header { key: HEADER_SHAPE, value: Some(shape) });
        }
        if let Some(label) = &frame.label {
            headers = headers.insert(Header { key: HEADER_LABEL, value: Some(label) });
        }
        let mut record = BaseRecord::to(&self.topic)
            .key(frame.source.as_bytes())
            .payload(frame.value.as_slice())
            .headers(headers)
            .timestamp(kafray::sink::now_ms());
        if let Some((partitions, next)) = &mut self.spread {
            record = record.partition(*next);
            *next = (*next + 1) % *partitions;
        }
        let ctx = self.producer.context();
        kafray::sink::send_waiting(&self.producer, record, self.queue_wait_limit, || {
            ctx.first_error.lock().unwrap().as_ref().map(|e| Error::External(format!("a frame was not delivered: {e}")))
        })
    }

    /// Waits for every frame to be acknowledged; fails if any was not.
    pub fn finish(&self, timeout: Duration) -> Result<u64> {
        self.producer.flush(timeout).kafka_context(|| format!("flush frames to {}", self.topic))?;
        let ctx = self.producer.context();
        match ctx.failed.load(Relaxed) {
            0 => Ok(ctx.acked.load(Relaxed)),
            n => Err(Error::External(format!(
                "{n} frames were not delivered to {}: {}",
                self.topic,
                ctx.first_error.lock().unwrap().clone().unwrap_or_default()
            ))),
        }
    }
}

/// Paces sends against the start, so a slow send is caught up rather than added to every later
/// one: at one rate, or through a cycle of phases (`rate` frames/s for `seconds` each, repeated),
/// as a bursty source does. Unpaced, it sends as fast as the broker takes them.
pub struct Pacer {
    start: std::time::Instant,
    /// (frames per second, seconds) per phase; empty: unpaced.
    phases: Vec<(f64, f64)>,
}

impl Pacer {
    pub fn new(rate: Option<f64>) -> Self {
        Self::schedule(rate.map(|r| vec![(r, f64::INFINITY)]).unwrap_or_default())
    }

    /// Repeats `phases`, each `(frames per second, seconds)`.
    pub fn schedule(phases: Vec<(f64, f64)>) -> Self {
        Pacer { start: std::time::Instant::now(), phases }
    }

    /// When frame number `i` (from 0) is due, after the start; `None` unpaced.
    pub fn due(&self, i: usize) -> Option<Duration> {
        if self.phases.is_empty() {
            return None;
        }
        let mut left = i as f64;
        let per_cycle: f64 = self.phases.iter().map(|(r, s)| r * s).sum();
        let cycle_s: f64 = self.phases.iter().map(|(_, s)| s).sum();
        let mut at = 0.0;
        if per_cycle.is_finite() {
            let cycles = (left / per_cycle).floor();
            left -= cycles * per_cycle;
            at = cycles * cycle_s;
        }
        for &(rate, secs) in &self.phases {
            if left < rate * secs {
                return Some(Duration::from_secs_f64(at + left / rate));
            }
            left -= rate * secs;
            at += secs;
        }
        Some(Duration::from_secs_f64(at))
    }

    /// Sleeps until frame number `i` (from 0) is due.
    pub fn wait(&self, i: usize) {
        if let Some(wait) = self.due(i).and_then(|due| due.checked_sub(self.start.elapsed())) {
            std::thread::sleep(wait);
        }
    }
}

/// Parses a rate schedule `RATE:SECONDS,RATE:SECONDS,...` (frames/s for seconds, repeated).
pub fn parse_schedule(s: &str) -> Result<Vec<(f64, f64)>> {
    let bad = || {
        Error::Config(format!(
            "schedule {s:?}: expected RATE:SECONDS[,RATE:SECONDS...], positive numbers, e.g. 3000:2,600:2"
        ))
    };
    s.split(',')
        .map(|phase| {
            let (rate, secs) = phase.split_once(':').ok_or_else(bad)?;
            let (rate, secs): (f64, f64) =
                (rate.trim().parse().map_err(|_| bad())?, secs.trim().parse().map_err(|_| bad())?);
            if rate > 0.0 && secs > 0.0 && rate.is_finite() && secs.is_finite() {
                Ok((rate, secs))
            } else {
                Err(bad())
            }
        })
        .collect()
}

/// Frames of the MNIST test set: raw 28x28x1 pixels with their label, spread over `sources` keys.
pub fn mnist_frames(digits: &crate::mnist::Digits, sources: usize) -> impl Iterator<Item = OutFrame> + '_ {
    let shape = Shape::new(digits.rows, digits.cols, 1);
    (0..digits.len()).map(move |i| OutFrame {
        source: format!("mnist-{}", i % sources.max(1)),
        value: digits.image(i).to_vec(),
        format: PixelFormat::Raw,
        shape: Some(shape),
        label: Some(digits.labels[i].to_string()),
    })
}

/// The PNG and JPEG files of a folder (or one file), sorted by name.
pub fn image_files(path: &Path) -> Result<Vec<(PathBuf, Vec<u8>, PixelFormat)>> {
    let paths: Vec<PathBuf> = if path.is_dir() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| Error::io(format!("read folder {}", path.display()), e))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .collect();
        v.sort();
        v
    } else {
        vec![path.to_path_buf()]
    };
    let mut out = Vec::new();
    for p in paths {
        let bytes = std::fs::read(&p).map_err(|e| Error::io(format!("read {}", p.display()), e))?;
        match PixelFormat::sniff(&bytes) {
            Some(format) => out.push((p, bytes, format)),
            None => tracing::warn!("skipping {}: not a PNG or JPEG file", p.display()),
        }
    }
    if out.is_empty() {
        return Err(Error::Config(format!("{} holds no PNG or JPEG image", path.display())));
    }
    Ok(out)
}

/// The size a camera sends its frames at: `N` (N x N) or `WxH`, as `--size` takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameSize {
    pub width: u32,
    pub height: u32,
}

impl FrameSize {
    pub fn square(side: u32) -> Self {
        FrameSize { width: side, height: side }
    }
}

impl std::str::FromStr for FrameSize {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let side = |t: &str| t.trim().parse::<u32>().ok().filter(|n| (1..=kafray::frame::MAX_SIDE).contains(n));
        let size = match s.split_once(['x', 'X']) {
            Some((w, h)) => side(w).zip(side(h)).map(|(width, height)| FrameSize { width, height }),
            None => side(s).map(FrameSize::square),
        };
        size.ok_or_else(|| {
            format!(
                "{s:?} is not a frame size: give N (N x N) or WxH, e.g. 224 or 1920x1080, sides 1 to {}",
                kafray::frame::MAX_SIDE
            )
        })
    }
}

impl std::fmt::Display for FrameSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}", self.width, self.height)
    }
}

/// The images of a folder (or one file) as frames keyed by file name, each re-encoded as a JPEG
/// of `size` when a size is given (as a camera at that resolution sends them).
pub fn photo_frames(path: &Path, size: Option<FrameSize>) -> Result<Vec<OutFrame>> {
    image_files(path)?
        .into_iter()
        .map(|(file, bytes, format)| {
            let source = file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            let (value, format) = match size {
                Some(s) => (to_jpeg(&bytes, s, 90)?, PixelFormat::Jpeg),
                None => (bytes, format),
            };
            Ok(OutFrame { source, value, format, shape: None, label: None })
        })
        .collect()
}

/// Re-encodes an image as a JPEG of `size` (what a camera at that resolution sends), the photo
/// stretched to the frame.
pub fn to_jpeg(bytes: &[u8], size: FrameSize, quality: u8) -> Result<Vec<u8>> {
    let img = image::load_from_memory(bytes).map_err(|e| Error::Config(format!("cannot decode image: {e}")))?;
    let img = img.resize_exact(size.width, size.height, image::imageops::FilterType::Triangle).to_rgb8();
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality)
        .encode_image(&img)
        .map_err(|e| Error::Internal(format!("JPEG encoding failed: {e}")))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_size_is_a_side_or_width_by_height() {
        assert_eq!("224".parse::<FrameSize>(), Ok(FrameSize::square(224)));
        assert_eq!("1920x1080".parse::<FrameSize>(), Ok(FrameSize { width: 1920, height: 1080 }));
        assert_eq!(FrameSize { width: 1280, height: 720 }.to_string(), "1280x720");
        for bad in ["", "0", "1920x", "x1080", "1920x1080x3", "20000x10", "-5"] {
            let err = bad.parse::<FrameSize>().unwrap_err();
            assert!(err.contains("e.g. 224 or 1920x1080"), "{bad}: {err}");
        }
    }

    #[test]
    fn a_schedule_cycles_through_its_phases() {
        let p = Pacer::schedule(parse_schedule("100:2, 10:1").unwrap());
        let s = |i| p.due(i).unwrap().as_secs_f64();
        assert!((s(0) - 0.0).abs() < 1e-9 && (s(100) - 1.0).abs() < 1e-9, "100/s for 2 s");
        assert!((s(200) - 2.0).abs() < 1e-9 && (s(205) - 2.5).abs() < 1e-9, "then 10/s for 1 s");
        assert!((s(210) - 3.0).abs() < 1e-9 && (s(310) - 4.0).abs() < 1e-9, "then again");
        assert!((Pacer::new(Some(50.0)).due(25).unwrap().as_secs_f64() - 0.5).abs() < 1e-9);
        assert_eq!(Pacer::new(None).due(7), None);
        for bad in ["", "100", "100:0", "-5:1", "a:b", "100:2,"] {
            assert!(parse_schedule(bad).is_err(), "{bad}");
        }
    }
}
