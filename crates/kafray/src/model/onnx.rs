//! ONNX Runtime backend, loaded at run time (`load-dynamic`) from a `libonnxruntime.so`
//! (onnxruntime >= 1.31), such as the one of the PyPI `onnxruntime` wheel.
use super::{Backend, Device};
use crate::error::{Error, Result};
use ort::session::{builder::GraphOptimizationLevel, Session};
use ort::value::TensorRef;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

static ENVIRONMENT: OnceLock<std::result::Result<ort::environment::Environment, Error>> = OnceLock::new();

static RUNTIME_LIBRARY: OnceLock<PathBuf> = OnceLock::new();

/// Where `libonnxruntime.so` is: `$ORT_DYLIB_PATH`, else the one given to
/// [`use_runtime_library`], else the system loader's path.
pub fn runtime_library() -> PathBuf {
    std::env::var_os("ORT_DYLIB_PATH")
        .map(PathBuf::from)
        .or_else(|| RUNTIME_LIBRARY.get().cloned())
        .unwrap_or_else(|| PathBuf::from("libonnxruntime.so"))
}

/// The `libonnxruntime.so` to load when `ORT_DYLIB_PATH` is not set (a tool that found one
/// says so here; the first call wins, and only before the first model loads).
pub fn use_runtime_library(path: PathBuf) {
    let _ = RUNTIME_LIBRARY.set(path);
}

fn environment() -> Result<&'static ort::environment::Environment> {
    let env = ENVIRONMENT.get_or_init(|| {
        let path = runtime_library();
        let to_err = |reason: String| Error::RuntimeLoad { path: path.display().to_string(), reason };
        let builder = ort::init_from(&path).map_err(|e| to_err(e.to_string()))?;
        builder.with_name("kafray").build().map_err(|e| to_err(e.to_string()))
    });
    match env {
        Ok(env) => Ok(env),
        Err(Error::RuntimeLoad { path, reason }) => {
            Err(Error::RuntimeLoad { path: path.clone(), reason: reason.clone() })
        }
        Err(other) => Err(Error::Internal(other.to_string())),
    }
}

/// Registers the CUDA execution provider for GPU `n`, or says why it cannot.
fn use_cuda(builder: &mut ort::session::builder::SessionBuilder, n: u32) -> std::result::Result<(), String> {
    use ort::ep::ExecutionProvider as _;
    let library = runtime_library();
    if !ort::ep::CUDA::is_available().unwrap_or(false) {
        return Err(format!(
            "the ONNX Runtime at {} has no CUDA execution provider: install the onnxruntime-gpu wheel \
             (bash scripts/setup.sh --gpu) and set ORT_DYLIB_PATH to its libonnxruntime.so, or use --device cpu",
            library.display()
        ));
    }
    ort::ep::CUDA::default()
        .with_device_id(n as i32)
        .register(builder)
        .map_err(|e| format!("CUDA did not start on GPU {n} (driver, CUDA/cuDNN libraries, or no such GPU): {e}"))
}

/// One ONNX Runtime session. `Session::run` takes `&mut self`, so each worker owns one.
pub struct OnnxBackend {
    session: Session,
    input_dims: Vec<i64>,
    classes: usize,
    /// Where the session runs (`Auto` resolved).
    pub device: Device,
}

impl OnnxBackend {
    /// `threads`: ONNX Runtime intra-op threads; 1 is the robust default when several
    /// workers share a machine.
    pub fn load(path: &Path, threads: usize) -> Result<Self> {
        Self::load_on(path, threads, Device::Cpu)
    }

    /// On `device`: CUDA through ONNX Runtime's CUDA execution provider. Asking for CUDA where
    /// the runtime has none, or where it cannot start (no driver, no GPU), is an error naming
    /// the fix; `Auto` then falls back to the CPU with a warning.
    pub fn load_on(path: &Path, threads: usize, device: Device) -> Result<Self> {
        let env = environment()?;
        let err = |e: String| Error::model(path, e);
        let mut builder = Session::builder(env)
            .map_err(|e| err(e.to_string()))?
            .with_optimization_level(GraphOptimizationLevel::Level3)
            .map_err(|e| err(e.to_string()))?
            .with_intra_threads(threads.max(1))
            .map_err(|e| err(e.to_string()))?
            .with_inter_threads(1)
            .map_err(|e| err(e.to_string()))?;
        let gpu = match device {
            Device::Cpu => None,
            Device::Cuda(n) => Some(n),
            Device::Auto => Some(0),
        };
        let device = match gpu.map(|n| (n, use_cuda(&mut builder, n))) {
            None => Device::Cpu,
            Some((n, Ok(()))) => Device::Cuda(n),
            Some((_, Err(why))) if device == Device::Auto => {
                tracing::warn!(model = %path.display(), "--device auto: {why}; running on the CPU");
                Device::Cpu
            }
            Some((_, Err(why))) => return Err(Error::Config(format!("--device {device}: {why}"))),
        };
        let session =
            builder.commit_from_file(path).map_err(|e| err(format!("ONNX Runtime cannot load it on {device}: {e}")))?;
        let input = session.inputs().first().ok_or_else(|| err("the graph has no input".into()))?;
        let input_dims = input
            .dtype()
            .tensor_shape()
            .map(|s| s.to_vec())
            .ok_or_else(|| err(format!("input `{}` is not a tensor", input.name())))?;
        let output = session.outputs().first().ok_or_else(|| err("the graph has no output".into()))?;
        let out_dims = output.dtype().tensor_shape().map(|s| s.to_vec()).unwrap_or_default();
        let classes = match out_dims.as_slice() {
            [_, k] if *k > 0 => *k as usize,
            other => return Err(err(format!("expected a [batch, classes] output, found {other:?}"))),
        };
        Ok(OnnxBackend { session, input_dims, classes, device })
    }
}

impl Backend for OnnxBackend {
    fn graph_input(&self) -> Vec<i64> {
        self.input_dims.clone()
    }

    fn classes(&self) -> usize {
        self.classes
    }

    fn max_batch(&self) -> Option<usize> {
        self.input_dims.first().and_then(|&b| (b > 0).then_some(b as usize))
    }

    fn infer(&mut self, input: &[f32], shape: [usize; 4]) -> Result<Vec<f32>> {
        // A zero-copy view built per run (cloning a Value hung in ort rc.15).
        let tensor =
            TensorRef::from_array_view((shape.to_vec(), input)).map_err(|e| Error::Inference(e.to_string()))?;
        let outputs = self.session.run(ort::inputs![tensor]).map_err(|e| Error::Inference(e.to_string()))?;
        let (_, scores) = outputs[0].try_extract_tensor::<f32>().map_err(|e| Error::Inference(e.to_string()))?;
        if scores.len() != shape[0] * self.classes {
            return Err(Error::Inference(format!(
                "model returned {} scores for {} images of {} classes",
                scores.len(),
                shape[0],
                self.classes
            )));
        }
        Ok(scores.to_vec())
    }
}
