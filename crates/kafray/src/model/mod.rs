//! Models: what they expect (spec), how pixels become tensors (preprocess), and the
//! inference backend behind one small trait.
mod onnx;
pub mod preprocess;
pub mod spec;

pub use onnx::{runtime_library, use_runtime_library, OnnxBackend};
pub use spec::ModelSpec;

use crate::error::Result;
use crate::frame::{Pixels, Rejection};
use std::path::{Path, PathBuf};

/// An inference engine for one model. `infer` takes a batch in the model's layout and
/// returns `batch x classes` scores.
pub trait Backend: Send {
    /// The graph's input dimensions, -1 where dynamic.
    fn graph_input(&self) -> Vec<i64>;
    fn classes(&self) -> usize;
    /// The fixed batch size of graphs exported without a dynamic batch dimension.
    fn max_batch(&self) -> Option<usize>;
    fn infer(&mut self, input: &[f32], shape: [usize; 4]) -> Result<Vec<f32>>;
}

/// One prediction: the top-k classes with probabilities, best first.
#[derive(Debug, Clone, PartialEq)]
pub struct Classification {
    pub top: Vec<(usize, f32)>,
}

impl Classification {
    pub fn class(&self) -> usize {
        self.top[0].0
    }
    pub fn score(&self) -> f32 {
        self.top[0].1
    }
}

/// Where a model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    /// ONNX Runtime's CUDA execution provider on this GPU (an index among the visible ones).
    Cuda(u32),
    /// CUDA (GPU 0) where it works, else the CPU, with a warning.
    Auto,
}

impl Device {
    /// `cpu`, `cuda`, `cuda:N` or `auto`.
    pub fn parse(text: &str) -> Result<Self> {
        match text.trim() {
            "cpu" => Ok(Device::Cpu),
            "auto" => Ok(Device::Auto),
            "cuda" => Ok(Device::Cuda(0)),
            other => other.strip_prefix("cuda:").and_then(|n| n.parse().ok()).map(Device::Cuda).ok_or_else(|| {
                crate::Error::Config(format!("--device {other:?}: expected cpu, cuda, cuda:N (N a GPU index) or auto"))
            }),
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
            Device::Auto => f.write_str("auto"),
        }
    }
}

/// A loaded model: its spec plus a backend session.
pub struct Model {
    pub spec: ModelSpec,
    pub path: PathBuf,
    backend: Box<dyn Backend>,
    top_k: usize,
    /// Where it runs (never `Auto`: what `Auto` became).
    pub device: Device,
    /// One input the model classified last time it succeeded: a failing batch is the batch's
    /// fault if the model still classifies this, and the model's own if it does not.
    canary: Option<Vec<f32>>,
}

/// Why the model rejected one frame of a batch that it otherwise classified.
pub type FrameRejection = String;

impl Model {
    /// Loads an `.onnx` file on ONNX Runtime (a built-in name is resolved to a path by the
    /// caller: `kafray_tools::layout::find_model`).
    pub fn load(path: impl AsRef<Path>, threads: usize, top_k: usize) -> Result<Self> {
        Self::load_on(path, threads, top_k, Device::Cpu)
    }

    /// [`Model::load`] on a device; `Auto` becomes the device the session got.
    pub fn load_on(path: impl AsRef<Path>, threads: usize, top_k: usize, device: Device) -> Result<Self> {
        let path = path.as_ref();
        if !path.is_file() {
            return Err(crate::Error::model(path, "no such file"));
        }
        let backend = OnnxBackend::load_on(path, threads, device)?;
        let device = backend.device;
        let mut model = Self::with_backend(path, Box::new(backend), top_k)?;
        model.device = device;
        Ok(model)
    }

    pub fn with_backend(path: &Path, backend: Box<dyn Backend>, top_k: usize) -> Result<Self> {
        let spec = spec::resolve(path, &backend.graph_input())?;
        if let Some(labels) = &spec.labels {
            if labels.len() != backend.classes() {
                return Err(crate::Error::model(
                    path,
                    format!("label file has {} names but the model has {} classes", labels.len(), backend.classes()),
                ));
            }
        }
        let top_k = top_k.clamp(1, backend.classes());
        Ok(Model { spec, path: path.to_path_buf(), backend, top_k, device: Device::Cpu, canary: None })
    }

    pub fn input_len(&self) -> usize {
        self.spec.input_len()
    }

    pub fn preprocess(&self, pixels: &Pixels, out: &mut [f32]) -> Result<(), Rejection> {
        preprocess::preprocess(&self.spec, pixels, out)
    }

    /// Classifies `input.len() / input_len()` images laid out back to back.
    pub fn classify(&mut self, input: &[f32]) -> Result<Vec<Classification>> {
        let per_image = self.input_len();
        let n = input.len() / per_image;
        let chunk = self.backend.max_batch().unwrap_or(n.max(1));
        let mut results = Vec::with_capacity(n);
        for part in input.chunks(chunk * per_image) {
            let batch = part.len() / per_image;
            let scores = self.backend.infer(part, self.spec.input_shape(batch))?;
            let classes = self.backend.classes();
            // One result per frame, or none: a short answer would leave frames that are never
            // acknowledged, and the worker would stall at max_in_flight.
            if scores.len() != batch * classes {
                return Err(crate::Error::Inference(format!(
                    "the backend returned {} scores for a batch of {batch} x {classes} classes",
                    scores.len()
                )));
            }
            results.extend(scores.chunks(classes).map(|s| self.top(s)));
        }
        Ok(results)
    }

    /// Classifies a batch and, where the model fails on it, finds the frames that make it fail,
    /// so that one poison frame cannot stop the stream. One entry per frame.
    ///
    /// A failing batch is tried once more (a transient fault), then the canary (an input the
    /// model classified before) tells a broken model from a broken batch: if the canary fails
    /// too, or if there is none and not one frame of the batch can be classified, the error is
    /// the model's and is returned. Otherwise the batch is split in halves until each failing
    /// frame stands alone, and those frames get their rejection.
    pub fn classify_isolating(&mut self, input: &[f32]) -> Result<Vec<Result<Classification, FrameRejection>>> {
        let per_image = self.input_len();
        let n = input.len() / per_image;
        let error = match self.classify(input).or_else(|_| self.classify(input)) {
            Ok(results) => {
                self.remember_canary(&input[..per_image]);
                return Ok(results.into_iter().map(Ok).collect());
            }
            Err(e) => e,
        };
        if let Some(canary) = self.canary.take() {
            let healthy = self.classify(&canary).is_ok();
            self.canary = Some(canary);
            if !healthy {
                return Err(error);
            }
        }
        let mut out = Vec::with_capacity(n);
        if n == 1 {
            out.push(Err(error.to_string()));
        } else {
            let half = n / 2 * per_image;
            self.isolate(&input[..half], &mut out);
            self.isolate(&input[half..], &mut out);
        }
        if self.canary.is_none() && out.iter().all(Result::is_err) {
            return Err(error);
        }
        Ok(out)
    }

    fn isolate(&mut self, input: &[f32], out: &mut Vec<Result<Classification, FrameRejection>>) {
        let per_image = self.input_len();
        match self.classify(input) {
            Ok(results) => {
                self.remember_canary(&input[..per_image]);
                out.extend(results.into_iter().map(Ok));
            }
            Err(e) if input.len() == per_image => out.push(Err(e.to_string())),
            Err(_) => {
                let half = input.len() / per_image / 2 * per_image;
                self.isolate(&input[..half], out);
                self.isolate(&input[half..], out);
            }
        }
    }

    fn remember_canary(&mut self, image: &[f32]) {
        if self.canary.is_none() {
            self.canary = Some(image.to_vec());
        }
    }

    fn top(&self, scores: &[f32]) -> Classification {
        let probs: Vec<f32> = match self.spec.output {
            spec::OutputKind::Probabilities => scores.to_vec(),
            spec::OutputKind::Logits => softmax(scores),
        };
        let mut idx: Vec<usize> = (0..probs.len()).collect();
        let k = self.top_k;
        idx.select_nth_unstable_by(k - 1, |&a, &b| probs[b].total_cmp(&probs[a]));
        idx.truncate(k);
        idx.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
        Classification { top: idx.into_iter().map(|i| (i, probs[i])).collect() }
    }

    pub fn label(&self, class: usize) -> Option<&str> {
        self.spec.label(class)
    }
}

fn softmax(x: &[f32]) -> Vec<f32> {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = x.iter().map(|v| (v - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    exp.into_iter().map(|e| e / sum).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backend that scores class = first pixel value: enough to test the plumbing.
    struct Echo;
    impl Backend for Echo {
        fn graph_input(&self) -> Vec<i64> {
            vec![2, 1, 1, 1]
        }
        fn classes(&self) -> usize {
            4
        }
        fn max_batch(&self) -> Option<usize> {
            Some(2)
        }
        fn infer(&mut self, input: &[f32], shape: [usize; 4]) -> Result<Vec<f32>> {
            assert!(shape[0] <= 2, "batch larger than the graph allows");
            Ok(input.iter().flat_map(|&v| (0..4).map(move |c| if c == v as usize { 10.0 } else { 0.0 })).collect())
        }
    }

    use std::sync::atomic::Ordering::SeqCst;
    use testing::{pixel_model, Pixel, POISON};

    fn classes(out: &[Result<Classification, FrameRejection>]) -> Vec<Option<usize>> {
        out.iter().map(|r| r.as_ref().ok().map(Classification::class)).collect()
    }

    #[test]
    fn a_poison_frame_is_isolated_and_the_rest_classified() {
        let mut m = pixel_model(Pixel::default());
        let out = m.classify_isolating(&[1.0, 2.0, POISON, 3.0, 4.0, POISON, 5.0]).unwrap();
        assert_eq!(classes(&out), vec![Some(1), Some(2), None, Some(3), Some(4), None, Some(5)]);
        assert!(out[2].as_ref().unwrap_err().contains("cannot take pixel 13"), "{:?}", out[2]);
        // A single-frame batch that fails while the canary (digit 1 or 2 above) passes: poison too.
        let out = m.classify_isolating(&[POISON]).unwrap();
        assert_eq!(classes(&out), vec![None]);
    }

    #[test]
    fn a_broken_model_is_an_error_not_a_poison_frame() {
        let backend = Pixel::default();
        let broken = backend.broken.clone();
        let mut m = pixel_model(backend);
        assert_eq!(classes(&m.classify_isolating(&[7.0]).unwrap()), vec![Some(7)]);
        broken.store(true, SeqCst);
        let err = m.classify_isolating(&[1.0, 2.0, 3.0]).unwrap_err().to_string();
        assert!(err.contains("the device is gone"), "{err}");
        // Without a canary, a batch of which no frame can be classified is the model's fault too.
        let backend = Pixel::default();
        backend.broken.store(true, SeqCst);
        assert!(pixel_model(backend).classify_isolating(&[1.0, 2.0]).is_err());
        let mut fresh = pixel_model(Pixel::default());
        assert!(fresh.classify_isolating(&[POISON]).is_err(), "one frame, no canary: cannot tell, so it is retried");
    }

    #[test]
    fn a_transient_failure_is_retried_whole() {
        let mut m = pixel_model(Pixel { transient: 1, ..Pixel::default() });
        let out = m.classify_isolating(&[1.0, 2.0, 3.0]).unwrap();
        assert_eq!(classes(&out), vec![Some(1), Some(2), Some(3)]);
    }

    #[test]
    fn a_short_answer_is_an_error() {
        let mut m = pixel_model(Pixel { short: true, ..Pixel::default() });
        let err = m.classify(&[1.0, 2.0, 3.0]).unwrap_err().to_string();
        assert!(err.contains("returned 32 scores for a batch of 3 x 16 classes"), "{err}");
    }

    #[test]
    fn classify_chunks_fixed_batch_graphs_and_ranks_top_k() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("echo.onnx");
        std::fs::write(dir.path().join("echo.toml"), "layout='nchw'\ncolor='gray'\nscale=1.0\n").unwrap();
        let mut m = Model::with_backend(&path, Box::new(Echo), 2).unwrap();
        let out = m.classify(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!(out.iter().map(Classification::class).collect::<Vec<_>>(), vec![3, 1, 2]);
        assert_eq!(out[0].top.len(), 2);
        assert!(out[0].score() > 0.99 && out[0].top[1].1 < 0.01);
    }
}

/// A backend for tests of the model and the worker: no ONNX Runtime, a 1x1 gray input.
#[cfg(test)]
pub(crate) mod testing {
    use super::{Backend, Model};
    use crate::error::{Error, Result};
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
    use std::sync::Arc;

    /// The pixel value that the model cannot take (a poison frame).
    pub(crate) const POISON: f32 = 13.0;

    /// Classifies an image as its pixel value (mod 16). It fails on any batch holding
    /// [`POISON`], on every batch while `broken`, and on its next `transient` calls whatever
    /// they hold; while `short`, it answers one image fewer than it was given.
    #[derive(Default)]
    pub(crate) struct Pixel {
        pub broken: Arc<AtomicBool>,
        pub transient: usize,
        pub short: bool,
    }

    impl Backend for Pixel {
        fn graph_input(&self) -> Vec<i64> {
            vec![-1, 1, 1, 1]
        }
        fn classes(&self) -> usize {
            16
        }
        fn max_batch(&self) -> Option<usize> {
            None
        }
        fn infer(&mut self, input: &[f32], _shape: [usize; 4]) -> Result<Vec<f32>> {
            if self.transient > 0 {
                self.transient -= 1;
                return Err(Error::Inference("transient".into()));
            }
            if self.broken.load(SeqCst) {
                return Err(Error::Inference("the device is gone".into()));
            }
            if input.contains(&POISON) {
                return Err(Error::Inference("cannot take pixel 13".into()));
            }
            let n = if self.short { input.len() - 1 } else { input.len() };
            Ok(input[..n]
                .iter()
                .flat_map(|&v| (0..16).map(move |c| if c == v as usize % 16 { 9.0 } else { 0.0 }))
                .collect())
        }
    }

    /// A [`Model`] over the backend, with its spec written beside a stand-in graph path.
    pub(crate) fn pixel_model(backend: Pixel) -> Model {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pixel.onnx");
        std::fs::write(dir.path().join("pixel.toml"), "layout='nchw'\ncolor='gray'\nscale=1.0\n").unwrap();
        Model::with_backend(&path, Box::new(backend), 1).unwrap()
    }
}
