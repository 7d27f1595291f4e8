//! `kafray._native`: the Rust engine seen from Python. A [`Worker`] runs one consumer-group member
//! on native threads (the GIL is released while it waits); a [`Classifier`] classifies files for
//! the batch study. The Python package (`python/kafray`) wraps both.
use kafray::exporter::MetricsServer;
use kafray::metrics::{Metrics, Owner, Snapshot};
use kafray::model::Model;
use kafray::{Error, ErrorKind, ValidConfig, WorkerConfig};
use kafray_tools::broker::Storage;
use kafray_tools::files::{self, FileResult};
use pyo3::exceptions::{PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The user's mistakes become ValueError, the outside world's OSError, kafray's bugs RuntimeError.
fn to_py(e: Error) -> PyErr {
    match e.kind() {
        ErrorKind::User => PyValueError::new_err(e.to_string()),
        ErrorKind::External => PyOSError::new_err(e.to_string()),
        ErrorKind::Internal => PyRuntimeError::new_err(e.to_string()),
    }
}

/// One kafray worker (one consumer-group member) on native threads.
#[pyclass(module = "kafray._native")]
struct Worker {
    config: ValidConfig,
    worker_id: String,
    stop: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    state: Mutex<State>,
}

/// How long `stop()` waits by default, and a dropped worker at most: its drain is bounded by
/// the worker itself (30 s for acknowledgements, then a commit), so this is ample.
const STOP_WAIT: Duration = Duration::from_secs(120);

#[derive(Default)]
struct State {
    /// `start` is loading the model (outside this lock).
    starting: bool,
    /// `/metrics`, `/healthz` and `/readyz`, from `start` until the Worker is dropped: the
    /// probes go on answering (failed) after the worker thread ended.
    metrics_server: Option<MetricsServer>,
    thread: Option<JoinHandle<kafray::Result<Snapshot>>>,
    started: Option<Instant>,
    /// Where the model runs (`auto` resolved), once loaded.
    device: Option<String>,
    /// Set once the worker thread has ended: its final counters, or why it failed (and whose
    /// error that is).
    outcome: Option<Result<Snapshot, (ErrorKind, String)>>,
}

impl State {
    /// Moves a finished thread's result into `outcome`.
    fn reap(&mut self) {
        if self.thread.as_ref().is_some_and(JoinHandle::is_finished) {
            let outcome = match self.thread.take().expect("checked above").join() {
                Ok(Ok(snapshot)) => Ok(snapshot),
                Ok(Err(e)) => Err((e.kind(), e.to_string())),
                Err(_) => {
                    Err((ErrorKind::Internal, "the worker thread panicked (a bug in kafray; see the log)".into()))
                }
            };
            self.outcome = Some(outcome);
        }
    }
}

#[pymethods]
impl Worker {
    /// `config_json`: a JSON object with `WorkerConfig`'s fields (unknown fields are refused),
    /// layered like the CLI's flags: over `KAFRAY_<FIELD>` variables, over the defaults.
    #[new]
    fn new(config_json: &str) -> PyResult<Self> {
        let given: serde_json::Value = serde_json::from_str(config_json)
            .map_err(|e| PyValueError::new_err(format!("invalid worker configuration: {e}")))?;
        let config = WorkerConfig::layered(None, &given, &[]).map_err(to_py)?;
        let worker_id = config.worker_id();
        let config = WorkerConfig { worker_id: Some(worker_id.clone()), ..config }.validated().map_err(to_py)?;
        // The engine takes a path: a built-in name (mnist, ...) is found in the checkout here.
        let config = config.resolve_model(kafray::model::find_model).map_err(to_py)?;
        Ok(Worker {
            config,
            worker_id,
            stop: Arc::new(AtomicBool::new(false)),
            metrics: Arc::new(Metrics::new()),
            state: Mutex::new(State::default()),
        })
    }

    /// Serves the metrics and probes, loads and warms the model (so a bad model fails here),
    /// then joins the group on a native thread.
    fn start(&self, py: Python<'_>) -> PyResult<()> {
        {
            let mut state = self.state.lock().unwrap();
            if state.starting || state.thread.is_some() || state.outcome.is_some() {
                return Err(PyRuntimeError::new_err("a Worker starts once; create a new one to start again"));
            }
            state.starting = true;
            state.metrics_server = kafray::worker::serve_metrics(&self.config, &self.metrics);
        }
        // The model loads without the GIL and without the state lock: a `stats()` call meanwhile
        // holds the GIL and takes that lock, so holding it here would deadlock.
        let config = self.config.clone();
        let loaded = py.detach(|| {
            Model::load_on(&config.model, config.threads, config.top_k, kafray::model::Device::parse(&config.device)?)
        });
        let mut state = self.state.lock().unwrap();
        state.starting = false;
        let model = match loaded {
            Ok(model) => model,
            Err(e) => {
                let why = e.to_string();
                self.metrics.set_state(kafray::metrics::WorkerState::Failed, Some(why.clone()));
                state.outcome = Some(Err((e.kind(), why)));
                return Err(to_py(e));
            }
        };
        state.device = Some(model.device.to_string());
        if self.stop.load(Relaxed) {
            // stop() came while the model loaded: there is nothing to finish.
            self.metrics.set_state(kafray::metrics::WorkerState::Stopped, None);
            state.outcome = Some(Ok(self.metrics.snapshot()));
            return Ok(());
        }
        let (stop, metrics) = (self.stop.clone(), self.metrics.clone());
        let thread = std::thread::Builder::new()
            .name("kafray-worker".into())
            .spawn(move || kafray::worker::run_with_model(&config, model, stop, metrics))
            .map_err(|e| PyOSError::new_err(format!("cannot start the worker thread: {e}")))?;
        state.thread = Some(thread);
        state.started = Some(Instant::now());
        Ok(())
    }

    /// Asks the worker to finish: last batch, flush, commit, leave the group. Waits up to
    /// `timeout` seconds (None: 120 s, well past the worker's own bound on its drain) and returns
    /// the final stats; raises if it failed, or if it is still finishing then. Ctrl-C (any
    /// Python signal handler that raises) interrupts the wait; the worker goes on stopping.
    #[pyo3(signature = (timeout=None))]
    fn stop<'py>(&self, py: Python<'py>, timeout: Option<f64>) -> PyResult<Bound<'py, PyAny>> {
        self.stop.store(true, Relaxed);
        let waited = timeout.map_or(Some(STOP_WAIT), |t| Duration::try_from_secs_f64(t.max(0.0)).ok());
        // A timeout too large to count to (inf) waits as long as it takes, Ctrl-C still answered.
        let deadline = waited.and_then(|w| Instant::now().checked_add(w));
        loop {
            let finished = py.detach(|| {
                let slice = Instant::now() + Duration::from_millis(100);
                loop {
                    let mut state = self.state.lock().unwrap();
                    state.reap();
                    let now = Instant::now();
                    if state.thread.is_none() || deadline.is_some_and(|d| now >= d) || now >= slice {
                        return state.thread.is_none();
                    }
                    drop(state);
                    std::thread::sleep(Duration::from_millis(10));
                }
            });
            if finished || deadline.is_some_and(|d| Instant::now() >= d) {
                break;
            }
            py.check_signals()?;
        }
        let stats = self.stats(py)?;
        let state = self.state.lock().unwrap();
        match &state.outcome {
            Some(Err((_, why))) => Err(PyRuntimeError::new_err(format!("worker {} failed: {why}", self.worker_id))),
            _ if state.thread.is_some() => Err(PyRuntimeError::new_err(format!(
                "worker {} did not stop within {:.1} s; it is still finishing",
                self.worker_id,
                waited.unwrap_or_default().as_secs_f64()
            ))),
            _ => Ok(stats),
        }
    }

    /// True from `start` until the worker thread ends (after `stop`, or on a fatal error).
    #[getter]
    fn running(&self) -> bool {
        let mut state = self.state.lock().unwrap();
        state.reap();
        state.thread.is_some()
    }

    #[getter]
    fn worker_id(&self) -> &str {
        &self.worker_id
    }

    /// The worker's stats as a dict, in the one schema of `kafray::metrics::WorkerStats` (its doc
    /// comments say what each name means): counters since start (consumed, predicted,
    /// dead_lettered, batches, mean_batch, lag, latency_p50_ms/p99_ms, stages_us, frame_us, ...),
    /// state and state_reason, running, error and error_kind, device, joined, metrics_endpoint.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        // A copy under the lock; the Python objects are built after it is released, so a slow
        // interpreter never holds up the worker's own use of the state.
        let view = self.view();
        let owner = Owner {
            worker_id: self.worker_id.clone(),
            device: view.device,
            running: view.running,
            error: view.error,
            uptime_s: view.uptime_s,
        };
        let stats = self.metrics.stats(view.snapshot, owner);
        let json = serde_json::to_string(&stats).map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
        py.import("json")?.call_method1("loads", (json,))
    }
}

/// What `stats()` reports, copied out of the worker's state at one moment.
struct View {
    snapshot: Snapshot,
    device: Option<String>,
    running: bool,
    error: Option<(ErrorKind, String)>,
    uptime_s: f64,
}

impl Worker {
    fn view(&self) -> View {
        let mut state = self.state.lock().unwrap();
        state.reap();
        View {
            snapshot: match &state.outcome {
                Some(Ok(last)) => *last,
                _ => self.metrics.snapshot(),
            },
            device: state.device.clone(),
            running: state.thread.is_some(),
            error: state.outcome.as_ref().and_then(|o| o.as_ref().err()).cloned(),
            uptime_s: state.started.map_or(0.0, |t| t.elapsed().as_secs_f64()),
        }
    }
}

impl Drop for Worker {
    /// A worker dropped while running still leaves cleanly: commit what is acknowledged. The
    /// wait is bounded: a worker that does not finish in time is left to end on its own thread.
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        let Some(thread) = self.state.get_mut().unwrap().thread.take() else { return };
        let deadline = Instant::now() + STOP_WAIT;
        let wait = |slice: Duration| {
            let until = (Instant::now() + slice).min(deadline);
            while !thread.is_finished() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(20));
            }
        };
        // The drain may take seconds: other Python threads run meanwhile, and a Ctrl-C ends the
        // wait (raised once this returns). While the interpreter shuts down there is no GIL to
        // give back, and nothing else to run.
        let attached = Python::try_attach(|py| {
            while !thread.is_finished() && Instant::now() < deadline {
                py.detach(|| wait(Duration::from_millis(100)));
                if let Err(interrupted) = py.check_signals() {
                    interrupted.restore(py);
                    break;
                }
            }
        });
        if attached.is_none() {
            wait(STOP_WAIT);
        }
        if thread.is_finished() {
            let _ = thread.join();
        } else {
            eprintln!("kafray: worker {} did not stop within {} s; leaving it", self.worker_id, STOP_WAIT.as_secs());
        }
    }
}

/// A model loaded once, classifying whole files (MNIST IDX shards or PNG/JPEG images).
#[pyclass(module = "kafray._native")]
struct Classifier {
    model: Mutex<Model>,
    batch_size: usize,
}

#[pymethods]
impl Classifier {
    #[new]
    #[pyo3(signature = (model="mnist", threads=1, batch_size=64))]
    fn new(py: Python<'_>, model: &str, threads: usize, batch_size: usize) -> PyResult<Self> {
        if batch_size == 0 || threads == 0 {
            return Err(PyValueError::new_err("batch_size and threads must be at least 1"));
        }
        let path = kafray::model::find_model(model).map_err(to_py)?;
        let model = py.detach(|| Model::load(&path, threads, 1)).map_err(to_py)?;
        Ok(Classifier { model: Mutex::new(model), batch_size })
    }

    /// The model file this classifier runs.
    #[getter]
    fn model_path(&self) -> String {
        self.model.lock().unwrap().path.display().to_string()
    }

    /// The model's input for one PNG/JPEG file as the worker builds it (resize, crop, colour,
    /// normalisation): (shape in the model's layout, float32 little-endian bytes).
    fn input_tensor<'py>(&self, py: Python<'py>, path: PathBuf) -> PyResult<(Vec<usize>, Bound<'py, PyBytes>)> {
        let bytes = std::fs::read(&path).map_err(|e| PyOSError::new_err(format!("{}: {e}", path.display())))?;
        let spec = self.model.lock().unwrap().spec.clone();
        let mut out = vec![0f32; spec.input_len()];
        kafray::model::preprocess::frame_to_tensor(&spec, &bytes, &kafray::frame::FrameHeaders::default(), &mut out)
            .map_err(|r| PyValueError::new_err(format!("{}: {r}", path.display())))?;
        let raw: Vec<u8> = out.iter().flat_map(|v| v.to_le_bytes()).collect();
        Ok((spec.input_shape(1).to_vec(), PyBytes::new(py, &raw)))
    }

    /// Classifies one file: {"images", "classes", "correct" (None without labels), "read_s"
    /// (reading and parsing it), "evaluate_s" (preprocessing and inference)}.
    fn classify_file<'py>(&self, py: Python<'py>, path: PathBuf) -> PyResult<Bound<'py, PyDict>> {
        let result: FileResult = py
            .detach(|| files::classify_file(&mut self.model.lock().unwrap(), &path, self.batch_size))
            .map_err(to_py)?;
        file_result(py, &result)
    }

    /// Classifies one MNIST shard shipped in memory (IDX images and labels, gzip or not).
    fn classify_shard<'py>(
        &self,
        py: Python<'py>,
        name: &str,
        images: Vec<u8>,
        labels: Vec<u8>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let result = py
            .detach(|| {
                files::classify_shard_bytes(&mut self.model.lock().unwrap(), name, images, labels, self.batch_size)
            })
            .map_err(to_py)?;
        file_result(py, &result)
    }
}

/// {"images", "classes", "correct" (None without labels), "read_s", "evaluate_s"}.
fn file_result<'py>(py: Python<'py>, result: &FileResult) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("images", result.classes.len())?;
    d.set_item("correct", result.correct())?;
    d.set_item("classes", &result.classes)?;
    d.set_item("read_s", result.read_s)?;
    d.set_item("evaluate_s", result.evaluate_s)?;
    Ok(d)
}

/// The labels file beside an MNIST image shard (MNIST's naming), or an error saying why there is none.
#[pyfunction]
fn mnist_shard_labels(images: PathBuf) -> PyResult<String> {
    files::shard_labels(&images).map(|p| p.display().to_string()).map_err(to_py)
}

/// Writes `files` MNIST shards of `per_file` digits each from an IDX image/label pair into `out_dir`;
/// returns the image files' paths (each has its labels file beside it).
#[pyfunction]
fn write_mnist_shards(
    py: Python<'_>,
    images: PathBuf,
    labels: PathBuf,
    out_dir: PathBuf,
    files: usize,
    per_file: usize,
) -> PyResult<Vec<String>> {
    py.detach(|| {
        let digits = kafray_tools::mnist::load(&images, &labels)?;
        files::write_mnist_shards(&digits, &out_dir, files, per_file)
    })
    .map(|paths| paths.into_iter().map(|p| p.display().to_string()).collect())
    .map_err(to_py)
}

/// The raw limit (no Kafka, no cluster): `parallel` threads, each with its own model, decode and
/// infer the frames a producer would send, in batches of `batch_size`, for at least `seconds`.
/// Frames are the MNIST test set (`mnist=(images, labels)`) or the photos of a folder re-encoded
/// as JPEG of `size` (`photos=`; `224` for 224x224, the default, or `"1920x1080"`). Returns images_per_s and
/// the time per image of each stage.
#[pyfunction]
#[pyo3(signature = (model, *, batch_size, parallel, mnist=None, photos=None, size=None, threads=1, seconds=2.0))]
#[allow(clippy::too_many_arguments)]
fn raw_limit<'py>(
    py: Python<'py>,
    model: &str,
    batch_size: usize,
    parallel: usize,
    mnist: Option<(PathBuf, PathBuf)>,
    photos: Option<PathBuf>,
    size: Option<Bound<'py, PyAny>>,
    threads: usize,
    seconds: f64,
) -> PyResult<Bound<'py, PyDict>> {
    let size: kafray_tools::publish::FrameSize = match size {
        Some(size) => size.str()?.to_string().parse().map_err(PyValueError::new_err)?,
        None => kafray_tools::publish::FrameSize::square(224),
    };
    let report = py
        .detach(|| {
            let frames = match (&mnist, &photos) {
                (Some((images, labels)), None) => {
                    let digits = kafray_tools::mnist::load(images, labels)?;
                    kafray_tools::publish::mnist_frames(&digits, 8).collect()
                }
                (None, Some(dir)) => kafray_tools::publish::photo_frames(dir, Some(size))?,
                _ => return Err(Error::Config("give exactly one of mnist=(images, labels) or photos=".into())),
            };
            let min_time = Duration::from_secs_f64(seconds.max(0.0));
            kafray_tools::limit::measure(model, &frames, batch_size, threads, parallel, min_time)
        })
        .map_err(to_py)?;
    let d = PyDict::new(py);
    d.set_item("parallel", report.parallel)?;
    d.set_item("batch_size", report.batch_size)?;
    d.set_item("images", report.images)?;
    d.set_item("seconds", report.seconds)?;
    d.set_item("images_per_s", report.images_per_s)?;
    d.set_item("decode_ms_per_image", report.decode_ms_per_image)?;
    d.set_item("infer_ms_per_image", report.infer_ms_per_image)?;
    Ok(d)
}

/// The files a model needs beside its `.onnx` (its TOML, its labels), relative to its folder.
#[pyfunction]
fn model_companions(path: PathBuf) -> PyResult<Vec<String>> {
    kafray::model::spec::companion_files(&path)
        .map(|files| files.iter().map(|f| f.display().to_string()).collect())
        .map_err(to_py)
}

/// Resolves a model name (`mnist`, `mobilenet_v2`, ...) or path to the absolute path of its file.
#[pyfunction]
fn find_model(name: &str) -> PyResult<String> {
    let path = kafray::model::find_model(name).map_err(to_py)?;
    let path = path.canonicalize().unwrap_or(path);
    Ok(path.display().to_string())
}

/// The librdkafka properties of a `client.properties` file (`--kafka-config`), as (key, value).
#[pyfunction]
fn read_kafka_config(path: PathBuf) -> PyResult<Vec<(String, String)>> {
    kafray::connection::read_properties(&path).map_err(to_py)
}

/// Whether a librdkafka property holds a secret (a password, a key, a client secret): such a
/// value is shown as `***` and, on Ray, never put in an actor's arguments.
#[pyfunction]
fn is_secret_property(key: &str) -> bool {
    kafray::connection::is_secret(key)
}

/// Whether a value names a secret (`${env:NAME}`, `${file:PATH:KEY}`) rather than holding it.
#[pyfunction]
fn is_secret_reference(value: &str) -> bool {
    kafray::connection::is_reference(value)
}

/// A local Kafka-protocol broker (Tansu, the `nisshi` binary) on a free loopback port, for tests
/// and demos; killed when stopped or garbage-collected.
#[pyclass(module = "kafray._native")]
struct EmbeddedBroker {
    inner: Mutex<Option<kafray_tools::broker::EmbeddedBroker>>,
    bootstrap: String,
}

#[pymethods]
impl EmbeddedBroker {
    /// `storage`: "memory" (fast acknowledgements) or "sqlite" (survives a broker kill).
    /// `users`: (name, password, mechanism) triples, mechanism `SCRAM-SHA-256` or
    /// `SCRAM-SHA-512`: the broker then serves TLS only (its CA at `ca_location`) and requires
    /// SASL/SCRAM as one of them, as a secured cluster does; its storage is "sqlite".
    #[new]
    #[pyo3(signature = (storage="memory", users=None))]
    fn new(py: Python<'_>, storage: &str, users: Option<Vec<(String, String, String)>>) -> PyResult<Self> {
        let storage = match storage {
            "memory" => Storage::Memory,
            "sqlite" => Storage::Sqlite,
            other => {
                return Err(PyValueError::new_err(format!("storage {other:?}: expected \"memory\" or \"sqlite\"")))
            }
        };
        let broker = py
            .detach(|| match users {
                None => kafray_tools::broker::EmbeddedBroker::start_with(storage),
                Some(users) => {
                    let users: Vec<_> = users
                        .into_iter()
                        .map(|(name, password, mechanism)| kafray_tools::broker::ScramUser {
                            name,
                            password,
                            mechanism,
                        })
                        .collect();
                    kafray_tools::broker::EmbeddedBroker::start_secured(&users)
                }
            })
            .map_err(to_py)?;
        Ok(EmbeddedBroker { bootstrap: broker.bootstrap(), inner: Mutex::new(Some(broker)) })
    }

    /// The CA certificate (PEM) of a broker started with `users`, for `ssl.ca.location`.
    #[getter]
    fn ca_location(&self) -> Option<String> {
        self.inner.lock().unwrap().as_ref().and_then(|b| b.ca_location()).map(|p| p.display().to_string())
    }

    /// `host:port` for `brokers=`.
    #[getter]
    fn bootstrap(&self) -> &str {
        &self.bootstrap
    }

    /// The broker's process id while it runs (a test freezes it with SIGSTOP).
    #[getter]
    fn pid(&self) -> Option<u32> {
        self.inner.lock().unwrap().as_ref().and_then(|b| b.pid())
    }

    /// Kills the broker (SIGKILL) and starts it again on the same port and storage: with
    /// "sqlite", what it had acknowledged survives.
    fn restart(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| match self.inner.lock().unwrap().as_mut() {
            Some(broker) => broker.restart().map_err(to_py),
            None => Err(PyRuntimeError::new_err("the broker was stopped")),
        })
    }

    fn stop(&self) {
        self.inner.lock().unwrap().take();
    }
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // Logs go to stderr (Ray keeps each actor's); KAFRAY_LOG filters like the CLI's.
    let filter = tracing_subscriber::EnvFilter::try_from_env("KAFRAY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,librdkafka=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours for a terminal only: logs piped to files and collectors stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
    m.add_class::<Worker>()?;
    m.add_class::<Classifier>()?;
    m.add_class::<EmbeddedBroker>()?;
    m.add_function(wrap_pyfunction!(write_mnist_shards, m)?)?;
    m.add_function(wrap_pyfunction!(find_model, m)?)?;
    m.add_function(wrap_pyfunction!(model_companions, m)?)?;
    m.add_function(wrap_pyfunction!(mnist_shard_labels, m)?)?;
    m.add_function(wrap_pyfunction!(raw_limit, m)?)?;
    m.add_function(wrap_pyfunction!(read_kafka_config, m)?)?;
    m.add_function(wrap_pyfunction!(is_secret_property, m)?)?;
    m.add_function(wrap_pyfunction!(is_secret_reference, m)?)?;
    m.add("WORKER_CONFIG_FIELDS", WorkerConfig::field_names())?;
    // Each field's help (its doc comment) and default: kafray-ray's flags and Worker's docstring.
    let docs = PyDict::new(m.py());
    for doc in WorkerConfig::docs() {
        let entry = PyDict::new(m.py());
        entry.set_item("default", &doc.default)?;
        entry.set_item("summary", doc.summary())?;
        entry.set_item("help", &doc.help)?;
        docs.set_item(&doc.name, entry)?;
    }
    m.add("WORKER_CONFIG_DOCS", docs)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
