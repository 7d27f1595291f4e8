//! Models: what they expect (spec), how pixels become tensors (preprocess), and the
//! inference backend behind one small trait.
mod onnx;
pub mod preprocess;
pub mod spec;

pub use onnx::{runtime_library, OnnxBackend};
pub use spec::{find_model, ModelSpec};

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

/// A loaded model: its spec plus a backend session.
pub struct Model {
    pub spec: ModelSpec,
    pub path: PathBuf,
    backend: Box<dyn Backend>,
    top_k: usize,
}

impl Model {
    /// Loads a model by path or alias (see [`find_model`]) on ONNX Runtime.
    pub fn load(name: &str, threads: usize, top_k: usize) -> Result<Self> {
        let path = find_model(name)?;
        let backend = OnnxBackend::load(&path, threads)?;
        Self::with_backend(&path, Box::new(backend), top_k)
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
        Ok(Model { spec, path: path.to_path_buf(), backend, top_k })
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
            results.extend(scores.chunks(classes).map(|s| self.top(s)));
        }
        Ok(results)
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
