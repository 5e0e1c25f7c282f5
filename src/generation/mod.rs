//! Generating tokens on a loaded model: the parameters and their one keyword table, sampling,
//! stopping, one sequence, sessions that keep their cache, batches, and the loaded model itself
//! (`model::Generator`). Usable from Rust alone: nothing here knows Python.

pub mod batch;
pub mod defaults;
pub mod model;
pub mod params;
pub mod sampling;
pub mod sequence;
pub mod session;
pub mod stopping;
pub mod threads;
