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
    /// Set once the broker serves TLS and requires SASL: what a client needs to connect (the
    /// readiness check uses it too).
    secured: Option<Vec<(String, String)>>,
}

/// A SCRAM user of a secured broker ([`EmbeddedBroker::start_secured`]).
#[derive(Debug, Clone)]
pub struct ScramUser {
    pub name: String,
    pub password: String,
    /// `SCRAM-SHA-256` or `SCRAM-SHA-512`, as librdkafka's `sasl.mechanisms` names it.
    pub mechanism: String,
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
        let mut broker = EmbeddedBroker {
            child: None,
            storage,
            port,
            dir,
            keep_dir: false,
            binary: broker_binary()?,
            secured: None,
        };
        broker.spawn()?;
        Ok(broker)
    }

    /// Starts a broker as a secured cluster runs: TLS only, with a certificate for 127.0.0.1
    /// signed by a CA made for it ([`Self::ca_location`]), and SASL/SCRAM authentication of
    /// `users` required (SQLite storage, which keeps the users). The users are created while
    /// the broker runs open, then it starts again secured, on the same port and storage.
    pub fn start_secured(users: &[ScramUser]) -> Result<Self> {
        let first = users.first().ok_or_else(|| Error::Config("a secured broker needs at least one user".into()))?;
        let mut broker = Self::start_with(Storage::Sqlite)?;
        make_certificates(&broker.dir)?;
        for user in users {
            let mechanism = match user.mechanism.as_str() {
                "SCRAM-SHA-256" => "scram256",
                "SCRAM-SHA-512" => "scram512",
                other => return Err(Error::Config(format!("mechanism {other}: use SCRAM-SHA-256 or SCRAM-SHA-512"))),
            };
            let url = format!("tcp://127.0.0.1:{}", broker.port);
            run_checked(
                Command::new(&broker.binary)
                    .args(["user", "create", "--broker", &url, "--mechanism", mechanism, &user.name, &user.password])
                    .current_dir(&broker.dir),
                "create a broker user",
            )?;
        }
        broker.kill();
        broker.secured = Some(broker.client_properties(first));
        broker.spawn()?;
        Ok(broker)
    }

    /// The CA certificate (PEM) of a secured broker, for `ssl.ca.location`.
    pub fn ca_location(&self) -> Option<PathBuf> {
        self.secured.as_ref().map(|_| self.dir.join("ca.pem"))
    }

    /// What a client of a secured broker sets to connect as `user`.
    pub fn client_properties(&self, user: &ScramUser) -> Vec<(String, String)> {
        [
            ("security.protocol", "SASL_SSL"),
            ("sasl.mechanisms", user.mechanism.as_str()),
            ("sasl.username", user.name.as_str()),
            ("sasl.password", user.password.as_str()),
            ("ssl.ca.location", &self.dir.join("ca.pem").display().to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
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
            .args(if self.secured.is_some() {
                &["--cert", "server.pem", "--key", "server-key.pem", "--authentication"][..]
            } else {
                &[]
            })
            .current_dir(&self.dir)
            // A new group's first rebalance waits 1 s for more members (Kafka's
            // group.initial.rebalance.delay.ms; Tansu's default, 3 s, is paid by every demo and test
            // start). Not 0, as Kafka's development config has it: workers that start together would
            // then race into two rebalances, the second one after the stream began. The broker's
            // own variable still overrides it.
            .env(
                "GROUP_INITIAL_REBALANCE_DELAY",
                std::env::var("GROUP_INITIAL_REBALANCE_DELAY").unwrap_or_else(|_| "1s".into()),
            )
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
        let mut config = rdkafka::config::ClientConfig::new();
        config.set("bootstrap.servers", self.bootstrap());
        for (k, v) in self.secured.iter().flatten() {
            config.set(k, v);
        }
        let client: std::result::Result<rdkafka::producer::BaseProducer, _> = config.create();
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

/// A CA, and a certificate for 127.0.0.1 and localhost signed by it (`server.pem`, with its
/// PKCS#8 key `server-key.pem`), made with the `openssl` command.
fn make_certificates(dir: &Path) -> Result<()> {
    let openssl = |args: &[&str]| run_checked(Command::new("openssl").args(args).current_dir(dir), "openssl");
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "30",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-subj",
        "/CN=kafray test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ])?;
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ])?;
    std::fs::write(
        dir.join("server.ext"),
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n\
         extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .map_err(|e| Error::io("write server.ext", e))?;
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "30",
        "-extfile",
        "server.ext",
        "-out",
        "server.pem",
    ])?;
    // The broker takes PKCS#8 keys.
    openssl(&["pkcs8", "-topk8", "-nocrypt", "-in", "server.key", "-out", "server-key.pem"])
}

fn run_checked(command: &mut Command, what: &str) -> Result<()> {
    let out = command.stdin(Stdio::null()).output().map_err(|e| Error::io(format!("{what}: start"), e))?;
    if out.status.success() {
        return Ok(());
    }
    Err(Error::External(format!("{what} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim())))
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
