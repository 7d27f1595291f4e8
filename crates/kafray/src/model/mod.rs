//! Models: what they expect (spec), how pixels become tensors (preprocess), and the
//! inference backend behind one small trait.
pub mod builtin;
mod onnx;
pub mod preprocess;
pub mod spec;

pub use builtin::{builtin_names, find_model, BUILTIN_MODELS};
pub use onnx::{runtime_library, use_runtime_library, OnnxBackend};
pub use spec::ModelSpec;

use crate::error::Result;
use crate::frame::{FrameHeaders, Pixels, Rejection};
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
    /// An input the model classified at load (its warm-up): a batch that fails is the batch's
    /// fault only while the model still classifies this.
    canary: Vec<f32>,
}

/// Why the model rejected one frame of a batch that it otherwise classified.
pub type FrameRejection = String;

impl Model {
    /// Loads an `.onnx` file on ONNX Runtime (a built-in name is resolved to a path by the
    /// caller: `kafray::model::find_model`).
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
        let ran_on = backend.device;
        let mut model = match Self::with_backend(path, Box::new(backend), top_k) {
            // `auto` falls back to the CPU where CUDA starts but cannot run the model.
            Err(e) if device == Device::Auto && ran_on != Device::Cpu => {
                tracing::warn!("--device auto: {e}; running on the CPU");
                return Self::load_on(path, threads, top_k, Device::Cpu);
            }
            other => other?,
        };
        model.device = ran_on;
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
        let canary = vec![0.0; spec.input_len()];
        let mut model = Model { spec, path: path.to_path_buf(), backend, top_k, device: Device::Cpu, canary };
        model.warm_up(path)?;
        Ok(model)
    }

    /// Classifies a synthetic input (all zeros: the mean image under most normalisations), as
    /// Triton's model warm-up does: the first inference's one-off cost is paid here, not by the
    /// first frame, and the worker has a canary before its first frame (without one, a poison
    /// frame that came first could not be told from a broken model). A model that cannot
    /// classify it cannot be served.
    fn warm_up(&mut self, path: &Path) -> Result<()> {
        self.classify_canary()
            .map_err(|e| crate::Error::model(path, format!("it failed its warm-up on a zero input: {e}")))
    }

    fn classify_canary(&mut self) -> Result<()> {
        let canary = std::mem::take(&mut self.canary);
        let outcome = self.classify(&canary);
        self.canary = canary;
        outcome.map(drop)
    }

    pub fn input_len(&self) -> usize {
        self.spec.input_len()
    }

    pub fn preprocess(&self, pixels: &Pixels, out: &mut [f32]) -> Result<(), Rejection> {
        preprocess::preprocess(&self.spec, pixels, out)
    }

    /// A frame's bytes to this model's input, as the worker does it ([`preprocess::frame_to_tensor`]).
    pub fn frame_to_tensor(&self, value: &[u8], headers: &FrameHeaders, out: &mut [f32]) -> Result<(), Rejection> {
        preprocess::frame_to_tensor(&self.spec, value, headers, out)
    }

    /// Classifies `input.len() / input_len()` images laid out back to back.
    pub fn classify(&mut self, input: &[f32]) -> Result<Vec<Classification>> {
        let per_image = self.input_len();
        let n = input.len() / per_image;
        let fixed = self.backend.max_batch();
        let chunk = fixed.unwrap_or(n.max(1));
        let mut results = Vec::with_capacity(n);
        let mut padded = Vec::new();
        for part in input.chunks(chunk * per_image) {
            let batch = part.len() / per_image;
            // A graph exported with a fixed batch takes only that: a short last chunk (or the
            // warm-up's single image) is padded with zero images, whose scores are dropped.
            let (part, shape) = match fixed {
                Some(size) if batch < size => {
                    padded.clear();
                    padded.extend_from_slice(part);
                    padded.resize(size * per_image, 0.0);
                    (&padded[..], self.spec.input_shape(size))
                }
                _ => (part, self.spec.input_shape(batch)),
            };
            let scores = self.backend.infer(part, shape)?;
            let classes = self.backend.classes();
            // One result per frame, or none: a short answer would leave frames that are never
            // acknowledged, and the worker would stall at max_in_flight.
            let given = shape[0];
            if scores.len() != given * classes {
                return Err(crate::Error::Inference(format!(
                    "the backend returned {} scores for a batch of {given} x {classes} classes",
                    scores.len()
                )));
            }
            results.extend(scores.chunks(classes).take(batch).map(|s| self.top(s)));
        }
        Ok(results)
    }

    /// Classifies a batch and, where the model fails on it, finds the frames that make it fail,
    /// so that one poison frame cannot stop the stream. One entry per frame.
    ///
    /// A failing batch is tried once more (a transient fault). Then the canary (the warm-up
    /// input) tells a broken model or device from a broken batch: if it fails, the error is the
    /// model's. Otherwise the batch is split in halves until each failing frame stands alone. A
    /// frame is poison only if it fails alone twice, with the canary passing just before and just
    /// after its second try: a device that fails, recovers, then fails again makes this an error
    /// (its frames are read again after a restart), never a dead letter of a good frame.
    pub fn classify_isolating(&mut self, input: &[f32]) -> Result<Vec<Result<Classification, FrameRejection>>> {
        let n = input.len() / self.input_len();
        let error = match self.classify(input).or_else(|_| self.classify(input)) {
            Ok(results) => return Ok(results.into_iter().map(Ok).collect()),
            Err(e) => e,
        };
        self.check_canary(&error)?;
        let mut out = Vec::with_capacity(n);
        self.isolate(input, &mut out)?;
        Ok(out)
    }

    fn isolate(&mut self, input: &[f32], out: &mut Vec<Result<Classification, FrameRejection>>) -> Result<()> {
        let per_image = self.input_len();
        match self.classify(input) {
            Ok(results) => out.extend(results.into_iter().map(Ok)),
            // Alone, it failed: poison only if the canary passes, the frame fails once more, and
            // the canary passes again; a device that falters and recovers cannot make it so.
            Err(e) if input.len() == per_image => {
                self.check_canary(&e)?;
                match self.classify(input) {
                    Ok(results) => out.extend(results.into_iter().map(Ok)),
                    Err(again) => {
                        self.check_canary(&again)?;
                        out.push(Err(again.to_string()));
                    }
                }
            }
            Err(_) => {
                let half = input.len() / per_image / 2 * per_image;
                self.isolate(&input[..half], out)?;
                self.isolate(&input[half..], out)?;
            }
        }
        Ok(())
    }

    /// The model still classifies its canary; if not, `failure` was the model's (or the
    /// device's), not the frames'.
    fn check_canary(&mut self, failure: &crate::Error) -> Result<()> {
        self.classify_canary().map_err(|canary_error| {
            crate::Error::Inference(format!(
                "{failure}; the model then failed on its warm-up input too ({canary_error}): the model or its device \
                 is at fault, not the frames"
            ))
        })
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

    /// A backend that scores class = first pixel value, exported with a fixed batch of 2 (as
    /// ONNX Runtime, it refuses any other): enough to test the plumbing.
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
            assert_eq!((shape[0], input.len()), (2, 2), "a fixed-batch graph takes exactly its batch");
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
        let out = m.classify_isolating(&[POISON]).unwrap();
        assert_eq!(classes(&out), vec![None]);
    }

    #[test]
    fn a_poison_frame_that_comes_first_is_poison_not_a_broken_model() {
        // The warm-up at load is the canary: no frame needs to have been classified before.
        let mut fresh = pixel_model(Pixel::default());
        let out = fresh.classify_isolating(&[POISON]).unwrap();
        assert_eq!(classes(&out), vec![None]);
        assert_eq!(classes(&fresh.classify_isolating(&[3.0]).unwrap()), vec![Some(3)]);
    }

    #[test]
    fn a_model_that_fails_its_warm_up_does_not_load() {
        let backend = Pixel::default();
        backend.broken.store(true, SeqCst);
        let err = testing::try_pixel_model(backend).err().expect("a model that cannot classify anything").to_string();
        assert!(err.contains("warm-up") && err.contains("the device is gone"), "{err}");
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
        assert!(m.classify_isolating(&[POISON]).is_err());
    }

    #[test]
    fn a_device_that_fails_recovers_and_fails_again_dead_letters_nothing() {
        let backend = Pixel::default();
        let script = backend.script.clone();
        let mut m = pixel_model(backend);
        // The batch fails twice, the canary passes, the batch fails again in isolation, then the
        // first half's single frame fails alone, and the canary fails after it: the device, not
        // the frame.
        script.lock().unwrap().extend([false, false, true, false, false, true, false, false]);
        let err = m.classify_isolating(&[1.0, 2.0]).expect_err("no frame may be called poison").to_string();
        assert!(err.contains("the device faltered") && err.contains("warm-up input too"), "{err}");
        // A single-frame batch: it fails (twice), the canary passes, it fails alone twice with
        // the canary passing between, and the canary then fails.
        script.lock().unwrap().extend([false, false, true, false, true, false, false]);
        assert!(m.classify_isolating(&[4.0]).is_err());
        // The device falters once on the frame alone and then recovers: the frame is classified.
        script.lock().unwrap().extend([false, false, true, false, false, true]);
        assert_eq!(classes(&m.classify_isolating(&[1.0, 2.0]).unwrap()), vec![Some(1), Some(2)]);
        // Healthy again: the same frames classify.
        assert_eq!(classes(&m.classify_isolating(&[1.0, 2.0]).unwrap()), vec![Some(1), Some(2)]);
    }

    #[test]
    fn a_transient_failure_is_retried_whole() {
        let backend = Pixel::default();
        let transient = backend.transient.clone();
        let mut m = pixel_model(backend);
        transient.store(1, SeqCst);
        let out = m.classify_isolating(&[1.0, 2.0, 3.0]).unwrap();
        assert_eq!(classes(&out), vec![Some(1), Some(2), Some(3)]);
    }

    #[test]
    fn a_short_answer_is_an_error() {
        let backend = Pixel::default();
        let short = backend.short.clone();
        let mut m = pixel_model(backend);
        short.store(true, SeqCst);
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
    use std::collections::VecDeque;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
    use std::sync::{Arc, Mutex};

    /// The pixel value that the model cannot take (a poison frame).
    pub(crate) const POISON: f32 = 13.0;

    /// Classifies an image as its pixel value (mod 16). It fails on any batch holding
    /// [`POISON`], on every batch while `broken`, and on its next `transient` calls whatever
    /// they hold; `script` scripts its next calls (`false`: the device fails, `true`: it
    /// behaves as above); while `short`, it answers one image fewer than it was given. The
    /// shared fields can be changed after the model loaded (its warm-up is one call).
    #[derive(Default, Clone)]
    pub(crate) struct Pixel {
        pub broken: Arc<AtomicBool>,
        pub transient: Arc<AtomicUsize>,
        pub script: Arc<Mutex<VecDeque<bool>>>,
        pub short: Arc<AtomicBool>,
        /// Calls of `infer` so far.
        pub calls: Arc<AtomicUsize>,
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
            self.calls.fetch_add(1, SeqCst);
            if self.script.lock().unwrap().pop_front() == Some(false) {
                return Err(Error::Inference("the device faltered".into()));
            }
            if self.transient.load(SeqCst) > 0 {
                self.transient.fetch_sub(1, SeqCst);
                return Err(Error::Inference("transient".into()));
            }
            if self.broken.load(SeqCst) {
                return Err(Error::Inference("the device is gone".into()));
            }
            if input.contains(&POISON) {
                return Err(Error::Inference("cannot take pixel 13".into()));
            }
            let n = if self.short.load(SeqCst) { input.len() - 1 } else { input.len() };
            Ok(input[..n]
                .iter()
                .flat_map(|&v| (0..16).map(move |c| if c == v as usize % 16 { 9.0 } else { 0.0 }))
                .collect())
        }
    }

    /// A [`Model`] over the backend, with its spec written beside a stand-in graph path.
    pub(crate) fn pixel_model(backend: Pixel) -> Model {
        try_pixel_model(backend).unwrap()
    }

    pub(crate) fn try_pixel_model(backend: Pixel) -> Result<Model> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pixel.onnx");
        std::fs::write(dir.path().join("pixel.toml"), "layout='nchw'\ncolor='gray'\nscale=1.0\n").unwrap();
        Model::with_backend(&path, Box::new(backend), 1)
    }
}
