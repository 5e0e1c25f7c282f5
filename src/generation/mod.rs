//! Generating tokens on a loaded model: the parameters and their one keyword table, sampling,
//! grammar constraints, stopping, one sequence, sessions that keep their cache, batches, and the
//! loaded model itself (`model::Generator`). Usable from Rust alone: nothing here knows Python.

pub(crate) mod batch;
pub mod constraint;
pub(crate) mod defaults;
pub(crate) mod model;
pub mod params;
pub(crate) mod request;
pub mod sampling;
pub mod scheduler;
pub(crate) mod sequence;
pub(crate) mod session;
pub(crate) mod stopping;
pub(crate) mod threads;
