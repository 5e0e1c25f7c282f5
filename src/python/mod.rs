//! The PyO3 layer: argument conversion, the GIL released around all work, errors mapped to
//! Python exception classes. No logic of its own.

mod generator;
mod json;
mod params;
mod run;

use pyo3::exceptions::{PyException, PyFileNotFoundError, PyValueError};
use pyo3::prelude::*;

use crate::error::Error;

pyo3::create_exception!(
    granite_rs,
    GraniteError,
    PyException,
    "A model that cannot be loaded or run: bad config, weights or tokenizer, numerical failure."
);

impl From<Error> for PyErr {
    fn from(e: Error) -> Self {
        let message = e.to_string();
        match e {
            Error::NotFound { .. } => PyFileNotFoundError::new_err(message),
            Error::InvalidArgument(_) | Error::ContextOverflow { .. } => PyValueError::new_err(message),
            _ => GraniteError::new_err(message),
        }
    }
}

/// Writes an HF model directory (GraniteForCausalLM, float32 safetensors, tokenizer.json and
/// tokenizer_config.json with the chat template) from a GGUF file.
#[pyfunction]
fn convert_gguf(py: Python<'_>, src: std::path::PathBuf, out_dir: std::path::PathBuf) -> PyResult<()> {
    Ok(py.detach(|| crate::loading::convert::gguf_to_hf(&src, &out_dir))?)
}

#[pymodule]
fn _granite_rs(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("GraniteError", m.py().get_type::<GraniteError>())?;
    m.add_class::<generator::Generator>()?;
    m.add_class::<generator::Generates>()?;
    m.add_class::<generator::Session>()?;
    m.add_class::<run::TextStream>()?;
    m.add_class::<run::GenerationResult>()?;
    m.add_function(wrap_pyfunction!(convert_gguf, m)?)?;
    m.add("GENERATION_KEYWORDS", params::keyword_table(m.py())?)?;
    m.add(
        "QUANTIZE_NAMES",
        pyo3::types::PyTuple::new(m.py(), crate::loading::quantization::Quantization::names().collect::<Vec<_>>())?,
    )?;
    let precisions = crate::loading::quantization::Precision::NAMES.map(|(name, _)| name);
    m.add("MATMUL_PRECISIONS", pyo3::types::PyTuple::new(m.py(), precisions)?)?;
    let dtypes = pyo3::types::PyDict::new(m.py());
    for (name, canonical) in crate::config::dtype_names() {
        dtypes.set_item(name, canonical)?;
    }
    m.add("DTYPE_NAMES", dtypes)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
