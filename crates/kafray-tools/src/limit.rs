//! The raw limit: what the model alone achieves on these cores, with no Kafka and no cluster.
//! Each of `parallel` threads loads its own copy of the model and repeats decode -> preprocess ->
//! infer over the same frames a producer would send, so a pipeline's throughput can be read as a
//! fraction of the most these cores can do.
use crate::publish::OutFrame;
use kafray::error::{Error, Result};
use kafray::frame::FrameHeaders;
use kafray::model::Model;
use serde::Serialize;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Serialize)]
pub struct RawLimit {
    pub parallel: usize,
    pub batch_size: usize,
    pub images: u64,
    pub seconds: f64,
    pub images_per_s: f64,
    /// Thread time per image spent decoding + preprocessing, and inferring.
    pub decode_ms_per_image: f64,
    pub infer_ms_per_image: f64,
}

/// Runs `parallel` threads of decode + infer in batches of `batch_size` for at least `min_time`.
pub fn measure(
    model: &str,
    frames: &[OutFrame],
    batch_size: usize,
    threads: usize,
    parallel: usize,
    min_time: Duration,
) -> Result<RawLimit> {
    if frames.is_empty() || batch_size == 0 || parallel == 0 {
        return Err(Error::Config("the raw limit needs frames, a batch size and at least one thread".into()));
    }
    // Models load before the clock starts: a worker loads its model once too.
    let path = kafray::model::find_model(model)?;
    let models = (0..parallel).map(|_| Model::load(&path, threads, 1)).collect::<Result<Vec<_>>>()?;
    let frames: Arc<Vec<(Vec<u8>, FrameHeaders)>> = Arc::new(
        frames
            .iter()
            .map(|f| {
                let headers = FrameHeaders {
                    format: Some(f.format.as_str().into()),
                    shape: f.shape.map(|s| s.to_string()),
                    ..Default::default()
                };
                (f.value.clone(), headers)
            })
            .collect(),
    );
    let start = Arc::new(Barrier::new(parallel + 1));
    let handles: Vec<_> = models
        .into_iter()
        .enumerate()
        .map(|(i, model)| {
            let (frames, start) = (frames.clone(), start.clone());
            std::thread::spawn(move || run_one(model, &frames, i, batch_size, min_time, &start))
        })
        .collect();
    start.wait();
    let began = Instant::now();
    let mut totals = (0u64, Duration::ZERO, Duration::ZERO);
    for h in handles {
        let (images, decode, infer) = h.join().map_err(|_| Error::Internal("a raw-limit thread panicked".into()))??;
        totals = (totals.0 + images, totals.1 + decode, totals.2 + infer);
    }
    let seconds = began.elapsed().as_secs_f64();
    let (images, decode, infer) = totals;
    Ok(RawLimit {
        parallel,
        batch_size,
        images,
        seconds,
        images_per_s: images as f64 / seconds,
        decode_ms_per_image: decode.as_secs_f64() * 1000.0 / images as f64,
        infer_ms_per_image: infer.as_secs_f64() * 1000.0 / images as f64,
    })
}

fn run_one(
    mut model: Model,
    frames: &[(Vec<u8>, FrameHeaders)],
    offset: usize,
    batch_size: usize,
    min_time: Duration,
    start: &Barrier,
) -> Result<(u64, Duration, Duration)> {
    let len = model.input_len();
    let mut input = vec![0.0f32; batch_size * len];
    // One batch before the clock starts (ONNX Runtime sets up per shape on the first run).
    model.classify(&input)?;
    start.wait();
    let began = Instant::now();
    let (mut images, mut decode, mut infer) = (0u64, Duration::ZERO, Duration::ZERO);
    // Threads start at different frames so they do not decode in lock step.
    let mut next = offset * 7919;
    while began.elapsed() < min_time {
        let t = Instant::now();
        for slot in input.chunks_mut(len) {
            let (value, headers) = &frames[next % frames.len()];
            next += 1;
            model.frame_to_tensor(value, headers, slot).map_err(|r| Error::Config(format!("raw limit frame: {r}")))?;
        }
        let t2 = Instant::now();
        model.classify(&input)?;
        decode += t2 - t;
        infer += t2.elapsed();
        images += batch_size as u64;
    }
    Ok((images, decode, infer))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafray::frame::{PixelFormat, Shape};

    #[test]
    fn measures_decode_and_inference_over_threads() {
        crate::layout::use_venv_runtime();
        let frames: Vec<OutFrame> = (0..8u8)
            .map(|i| OutFrame {
                source: "t".into(),
                value: vec![i * 30; 784],
                format: PixelFormat::Raw,
                shape: Some(Shape::new(28, 28, 1)),
                label: None,
            })
            .collect();
        let r = measure("mnist", &frames, 4, 1, 2, Duration::from_millis(200)).unwrap();
        assert_eq!((r.parallel, r.batch_size), (2, 4));
        assert!(r.images >= 8 && r.images.is_multiple_of(4), "{r:?}");
        assert!(r.images_per_s > 0.0 && r.infer_ms_per_image > 0.0 && r.decode_ms_per_image > 0.0, "{r:?}");
        let bad = vec![OutFrame { value: vec![1, 2, 3], ..frames[0].clone() }];
        let err = measure("mnist", &bad, 1, 1, 1, Duration::from_millis(10)).unwrap_err();
        assert!(err.to_string().contains("raw frame has 3 bytes"), "{err}");
    }
}
