//! An embedded Kafka-protocol broker for the demo, benchmarks and tests: Tansu (crates.io
//! `nisshi`, Apache-2.0) on loopback with storage in a temporary folder. kafray itself only
//! speaks the Kafka protocol; nothing depends on this broker.
use kafray::error::{Error, Result};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where the embedded broker keeps its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Storage {
    /// SQLite in the broker's folder: durable across a broker kill, acknowledges each produce
    /// after a database commit (tens to hundreds of ms under load).
    #[default]
    Sqlite,
    /// RAM only: acknowledges in about a millisecond, as a Kafka broker writing to its page
    /// cache does; used for benchmarks of kafray itself.
    Memory,
}

pub struct EmbeddedBroker {
    child: Option<Child>,
    storage: Storage,
    port: u16,
    dir: PathBuf,
    keep_dir: bool,
    binary: PathBuf,
}

/// Finds the broker binary: `$KAFRAY_BROKER_BIN`, then `nisshi` on PATH, then `~/.cargo/bin/nisshi`.
pub fn broker_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("KAFRAY_BROKER_BIN") {
        return Ok(PathBuf::from(p));
    }
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("nisshi")).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(Path::new(&home).join(".cargo/bin/nisshi"));
    }
    candidates.into_iter().find(|p| p.is_file()).ok_or_else(|| {
        Error::Config(
            "no local broker found (the `nisshi` binary, Tansu): run `bash scripts/setup.sh`, \
             or pass --brokers host:port to use an existing Kafka cluster"
                .into(),
        )
    })
}

impl EmbeddedBroker {
    /// Starts a broker on a free loopback port with SQLite storage in a new temporary folder.
    pub fn start() -> Result<Self> {
        Self::start_with(Storage::Sqlite)
    }

    pub fn start_with(storage: Storage) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("kafray-broker-{}-{}", std::process::id(), unique()));
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        let port = free_port()?;
        let mut broker = EmbeddedBroker { child: None, storage, port, dir, keep_dir: false, binary: broker_binary()? };
        broker.spawn()?;
        Ok(broker)
    }

    fn spawn(&mut self) -> Result<()> {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|e| Error::io("broker log", e))?;
        let child = Command::new(&self.binary)
            .arg("broker")
            .args(["--listener-url", &url, "--advertised-listener-url", &url])
            // Tansu resolves the sqlite path against its working directory.
            .args([
                "--storage-engine",
                match self.storage {
                    Storage::Sqlite => "sqlite://tansu.db",
                    Storage::Memory => "memory://tansu/",
                },
            ])
            .current_dir(&self.dir)
            .env("RUST_LOG", std::env::var("KAFRAY_BROKER_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| Error::io("broker log", e))?)
            .stderr(log)
            .spawn()
            .map_err(|e| Error::io(format!("start {}", self.binary.display()), e))?;
        self.child = Some(child);
        self.wait_ready(Duration::from_secs(30))
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(Error::External(format!(
                        "the broker exited at start ({status}); see {}",
                        self.log_path().display()
                    )));
                }
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() && self.metadata_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(Error::External(format!("the broker did not answer within {timeout:?}; see {}", self.log_path().display())))
    }

    fn metadata_ok(&self) -> bool {
        let client: std::result::Result<rdkafka::producer::BaseProducer, _> =
            rdkafka::config::ClientConfig::new().set("bootstrap.servers", self.bootstrap()).create();
        use rdkafka::producer::Producer as _;
        client.is_ok_and(|c| c.client().fetch_metadata(None, Duration::from_secs(2)).is_ok())
    }

    /// `host:port` for `bootstrap.servers`.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("broker.log")
    }

    /// Kills the broker (SIGKILL) and starts it again on the same port and storage.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn()
    }

    /// Kills the broker (SIGKILL), for an outage that lasts until [`Self::start_again`].
    pub fn crash(&mut self) {
        self.kill();
    }

    /// Starts a crashed broker on the same port and storage.
    pub fn start_again(&mut self) -> Result<()> {
        self.spawn()
    }

    /// The broker's process id while it runs (to freeze it with SIGSTOP, say).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Keeps the storage folder after drop (for post-mortems).
    pub fn keep_dir(&mut self) {
        self.keep_dir = true;
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        self.kill();
        if !self.keep_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| Error::io("find a free port", e))?;
    listener.local_addr().map(|a| a.port()).map_err(|e| Error::io("find a free port", e))
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    (nanos as u64) << 16 | N.fetch_add(1, Ordering::Relaxed)
}
