//! One error type for the library. Every error says whose it is, so binaries can
//! print the right advice and exit with the right code.
use std::path::PathBuf;

/// Who has to act on an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ErrorKind {
    /// The user's input or configuration is wrong; the message names the fix.
    User,
    /// Something outside kafray failed: the broker, the file system, ONNX Runtime.
    External,
    /// A bug in kafray.
    Internal,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid configuration: {0}")]
    Config(String),

    #[error("model {path}: {reason}")]
    Model { path: PathBuf, reason: String },

    #[error(
        "ONNX Runtime could not be loaded from {path}: {reason}\n  \
         fix: set ORT_DYLIB_PATH to a libonnxruntime.so (onnxruntime >= 1.31: kafray asks for its C API version 31)"
    )]
    RuntimeLoad { path: String, reason: String },

    #[error("inference failed: {0}")]
    Inference(String),

    #[error("kafka: {context}: {source}")]
    Kafka {
        context: String,
        #[source]
        source: rdkafka::error::KafkaError,
    },

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    #[error("{0}")]
    External(String),

    /// Results were not delivered (the producer failed for good, as an idempotent producer does
    /// after a broker answers out of sequence). Nothing past them was stored, so a worker with a
    /// new producer reads those frames again: [`crate::worker`] restarts itself on this.
    #[error("results not delivered: {0}")]
    Delivery(String),

    #[error("internal error (a bug in kafray): {0}")]
    Internal(String),

    /// A stop was requested while a result waited for room in the producer queue. Not a
    /// failure: that frame stays unacknowledged, so it is read again after a restart.
    #[error("stopped while a result waited for room in the producer queue")]
    Stopped,
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Config(_) | Error::Model { .. } => ErrorKind::User,
            Error::RuntimeLoad { .. }
            | Error::Inference(_)
            | Error::Kafka { .. }
            | Error::Io { .. }
            | Error::External(_)
            | Error::Delivery(_)
            | Error::Stopped => ErrorKind::External,
            Error::Internal(_) => ErrorKind::Internal,
        }
    }

    pub fn model(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Model { path: path.into(), reason: reason.into() }
    }

    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io { context: context.into(), source }
    }
}

/// Attaches context to rdkafka results.
pub trait KafkaContext<T> {
    fn kafka_context(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> KafkaContext<T> for std::result::Result<T, rdkafka::error::KafkaError> {
    fn kafka_context(self, context: impl FnOnce() -> String) -> Result<T> {
        use rdkafka::error::KafkaError::ClientConfig;
        self.map_err(|source| {
            // rdkafka's message for a property librdkafka refuses ends with its value: never a secret's.
            let source = match source {
                ClientConfig(res, desc, key, value) => {
                    let value = crate::connection::shown(&key, &value).to_string();
                    ClientConfig(res, desc, key, value)
                }
                other => other,
            };
            Error::Kafka { context: context(), source }
        })
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
