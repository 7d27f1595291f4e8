//! kafray: classify live image streams from Kafka with ONNX models, at least once.
//!
//! The data path: [`source`] (consumer group) -> [`frame`] (decode, on the intake thread or a
//! pool: the private module `decode`) -> [`model`] (preprocess, infer) in [`batch`]es -> [`sink`] (predictions, dead letters) -> offsets stored via [`offsets`].
//! [`worker`] ties them together (its intake and inference threads' loops are in the private
//! modules `intake` and `infer`); [`config`] is its configuration.
pub mod admin;
pub mod batch;
pub mod config;
pub mod connection;
mod decode;
pub mod error;
pub mod exporter;
pub mod frame;
mod infer;
mod intake;
pub mod metrics;
pub mod model;
pub mod offsets;
pub mod sink;
pub mod source;
pub mod worker;

pub use config::{ValidConfig, WorkerConfig};
pub use error::{Error, ErrorKind, Result};
