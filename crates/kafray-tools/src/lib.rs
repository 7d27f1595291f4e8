//! kafray's tooling, kept apart from the engine (`kafray`): the embedded test broker, the frame
//! publisher, reading predictions back (eval), MNIST files, the file batch study, the raw limit
//! of a model, and where things are in a checkout. The engine does not depend on this crate.
pub mod broker;
pub mod eval;
pub mod files;
pub mod layout;
pub mod limit;
pub mod mnist;
pub mod publish;
