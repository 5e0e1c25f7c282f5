//! `Generator` and `TextStream`, thin wrappers over crate::generate.

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device};
use numpy::{PyArray1, PyArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::params::generate_params;
use crate::config::parse_dtype;
use crate::error::{Error, Result};
use crate::generate::{self, Generation};

fn device(name: &str) -> Result<Device> {
    let ordinal = match name {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        _ => name
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| Error::invalid(format!("device must be \"cpu\", \"cuda\" or \"cuda:N\", got {name:?}")))?,
    };
    if !candle_core::utils::cuda_is_available() {
        return Err(Error::Unsupported(
            "this build of granite-rs has no CUDA support; build it with `maturin build --release --features cuda`"
                .into(),
        ));
    }
    Ok(Device::new_cuda(ordinal)?)
}

fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    }
}

/// A loaded Granite model. Immutable and thread-safe: each call has its own KV cache.
#[pyclass(module = "granite_rs._granite_rs", frozen)]
pub struct Generator {
    inner: Arc<generate::Generator>,
    device: String,
}

impl Generator {
    fn prompt_ids(&self, py: Python<'_>, prompt: &str) -> PyResult<Vec<u32>> {
        Ok(py.detach(|| self.inner.tokenizer().encode(prompt, true))?)
    }

    fn start(&self, prompt: Vec<u32>, kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<Generation> {
        let params = generate_params(&self.inner, kwargs)?;
        Ok(Generation::new(self.inner.clone(), prompt, params)?)
    }
}

/// Runs a generation to its end, the GIL released for each step, Ctrl-C checked between steps.
fn run(py: Python<'_>, generation: &mut Generation) -> PyResult<String> {
    let mut text = String::new();
    while let Some(chunk) = py.detach(|| generation.next_chunk())? {
        text.push_str(&chunk);
        py.check_signals()?;
    }
    Ok(text)
}

#[pymethods]
impl Generator {
    #[new]
    #[pyo3(signature = (model_dir, *, device = "cpu", dtype = None))]
    fn new(py: Python<'_>, model_dir: PathBuf, device: &str, dtype: Option<&str>) -> PyResult<Self> {
        let dtype = dtype
            .map(|d| {
                parse_dtype(d).ok_or_else(|| {
                    PyValueError::new_err(format!("dtype must be float32, bfloat16 or float16, got {d:?}"))
                })
            })
            .transpose()?;
        let dev = self::device(device)?;
        let inner = py.detach(|| generate::Generator::load(&model_dir, &dev, dtype))?;
        Ok(Self { inner: Arc::new(inner), device: device.to_string() })
    }

    #[pyo3(signature = (text, add_special_tokens = true))]
    fn encode(&self, py: Python<'_>, text: &str, add_special_tokens: bool) -> PyResult<Vec<u32>> {
        Ok(py.detach(|| self.inner.tokenizer().encode(text, add_special_tokens))?)
    }

    #[pyo3(signature = (ids, skip_special_tokens = true))]
    fn decode(&self, py: Python<'_>, ids: Vec<i64>, skip_special_tokens: bool) -> PyResult<String> {
        let ids = self.inner.check_ids(&ids)?;
        Ok(py.detach(|| self.inner.tokenizer().decode(&ids, skip_special_tokens))?)
    }

    /// float32 logits (len(ids), vocab_size) of one uncached forward.
    fn logits<'py>(&self, py: Python<'py>, ids: Vec<i64>) -> PyResult<Bound<'py, numpy::PyArray2<f32>>> {
        let ids = self.inner.check_ids(&ids)?;
        let values = py.detach(|| -> Result<Vec<f32>> { Ok(self.inner.logits(&ids)?.flatten_all()?.to_vec1()?) })?;
        PyArray1::from_vec(py, values).reshape([ids.len(), self.inner.config().vocab_size])
    }

    #[pyo3(signature = (prompt, **kwargs))]
    fn generate(&self, py: Python<'_>, prompt: &str, kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<String> {
        let mut generation = self.start(self.prompt_ids(py, prompt)?, kwargs)?;
        run(py, &mut generation)
    }

    #[pyo3(signature = (ids, **kwargs))]
    fn generate_ids(&self, py: Python<'_>, ids: Vec<i64>, kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<Vec<u32>> {
        let mut generation = self.start(self.inner.check_ids(&ids)?, kwargs)?;
        run(py, &mut generation)?;
        Ok(generation.new_tokens().to_vec())
    }

    #[pyo3(signature = (prompt, **kwargs))]
    fn stream(&self, py: Python<'_>, prompt: &str, kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<TextStream> {
        Ok(TextStream { generation: self.start(self.prompt_ids(py, prompt)?, kwargs)? })
    }

    #[getter]
    fn vocab_size(&self) -> usize {
        self.inner.config().vocab_size
    }

    #[getter]
    fn context_length(&self) -> usize {
        self.inner.context_length()
    }

    #[getter]
    fn eos_token_ids(&self) -> Vec<u32> {
        self.inner.eos_token_ids().to_vec()
    }

    #[getter]
    fn device(&self) -> &str {
        &self.device
    }

    #[getter]
    fn dtype(&self) -> &'static str {
        dtype_name(self.inner.model().dtype())
    }

    fn __repr__(&self) -> String {
        let c = self.inner.config();
        format!(
            "Generator(layers={}, hidden_size={}, vocab_size={}, device={:?}, dtype={:?})",
            c.num_hidden_layers,
            c.hidden_size,
            c.vocab_size,
            self.device,
            self.dtype()
        )
    }
}

/// Text chunks of one generation; the work stops when the iterator is dropped.
#[pyclass(module = "granite_rs._granite_rs")]
pub struct TextStream {
    generation: Generation,
}

#[pymethods]
impl TextStream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&mut self, py: Python<'_>) -> PyResult<Option<String>> {
        let generation = &mut self.generation;
        Ok(py.detach(|| generation.next_chunk())?)
    }

    /// The new token ids so far.
    #[getter]
    fn token_ids(&self) -> Vec<u32> {
        self.generation.new_tokens().to_vec()
    }

    /// "eos", "stop" or "length" once finished, else None.
    #[getter]
    fn finish_reason(&self) -> Option<&'static str> {
        self.generation.finish_reason().map(|f| f.as_str())
    }
}
