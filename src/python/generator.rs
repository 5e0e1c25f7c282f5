//! `Generator` and `Session`, thin wrappers over crate::generation::model and crate::generation::session.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use candle_core::Device;
use numpy::{PyArray1, PyArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use pyo3::IntoPyObjectExt;

use super::params::{generate_params, generate_params_rows};
use super::run::{lock, watched, GenerationResult, Running, TextStream};
use crate::config::{dtype_name, parse_dtype, Family};
use crate::error::{Error, Result};
use crate::generation::model;
use crate::generation::params::GenerateParams;
use crate::generation::session;
use crate::loading::quantization::{Precision, Quantization};
use crate::text::chat::Message;

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
    // One stream for every host thread: loading and cache growth run on the caller's thread and
    // the forward on a worker, and candle's default (a stream per host thread) would not order them.
    Ok(Device::new_cuda_with_stream(ordinal)?)
}

/// The generating methods of `Generator` and `Session`: what a call runs on is the model, and
/// the session whose cache it continues, if any.
#[pyclass(module = "granite_rs._granite_rs", name = "_Generates", frozen, subclass)]
pub struct Generates {
    generator: Arc<model::Generator>,
    home: Option<Arc<Mutex<session::Session>>>,
}

/// `messages` as a list of {"role": ..., "content": ...} dicts.
fn messages(list: &Bound<'_, PyList>) -> PyResult<Vec<Message>> {
    let field = |m: &Bound<'_, PyAny>, key: &str| -> PyResult<String> {
        m.get_item(key)
            .and_then(|v| v.extract())
            .map_err(|_| PyValueError::new_err(format!("each message must be a dict with a string {key:?}")))
    };
    list.iter().map(|m| Ok(Message { role: field(&m, "role")?, content: field(&m, "content")? })).collect()
}

impl Generates {
    fn start(&self, prompt: Vec<u32>, params: &GenerateParams) -> Result<Running> {
        Running::start(&self.generator, self.home.clone(), prompt, params.clone())
    }

    fn encode(&self, py: Python<'_>, prompt: &str) -> PyResult<Vec<u32>> {
        Ok(py.detach(|| self.generator.tokenizer().encode(prompt, true))?)
    }

    /// The chat template's text for `messages`, tokenized as transformers does (no special tokens added).
    fn chat_ids(&self, py: Python<'_>, list: &Bound<'_, PyList>) -> PyResult<Vec<u32>> {
        let messages = messages(list)?;
        let template = self.generator.chat_template().ok_or_else(|| {
            Error::Unsupported(
                "this model directory has no chat template (tokenizer_config.json or chat_template.jinja)".into(),
            )
        })?;
        Ok(py.detach(|| -> Result<Vec<u32>> {
            let text = template.render(&messages, true)?;
            self.generator.tokenizer().encode(&text, false)
        })?)
    }

    /// Runs to the end with Ctrl-C honoured; the text, or a GenerationResult with `details`.
    /// The new text, its ids with `ids_only`, or a GenerationResult when `details` is set.
    fn run(
        &self,
        py: Python<'_>,
        prompt: Vec<u32>,
        kwargs: Option<&Bound<'_, PyDict>>,
        ids_only: bool,
    ) -> PyResult<Py<PyAny>> {
        let options = generate_params(&self.generator, kwargs)?;
        let mut running = self.start(prompt, &options)?;
        let cancel = running.generation().cancel_flag();
        let text = watched(py, &cancel, || running.generation().run())?;
        let g = running.get();
        match (options.details, ids_only) {
            (true, _) => GenerationResult::new(g, text, g.new_tokens().to_vec()).into_py_any(py),
            (false, true) => g.new_tokens().into_py_any(py),
            (false, false) => text.into_py_any(py),
        }
    }

    fn open_stream(&self, prompt: Vec<u32>, kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<TextStream> {
        Ok(TextStream::new(self.start(prompt, &generate_params(&self.generator, kwargs)?)?))
    }
}

#[pymethods]
impl Generates {
    #[pyo3(signature = (prompt, **kwargs))]
    fn generate(&self, py: Python<'_>, prompt: &str, kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<Py<PyAny>> {
        self.run(py, self.encode(py, prompt)?, kwargs, false)
    }

    #[pyo3(signature = (ids, **kwargs))]
    fn generate_ids(&self, py: Python<'_>, ids: Vec<i64>, kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<Py<PyAny>> {
        self.run(py, self.generator.check_ids(&ids)?, kwargs, true)
    }

    #[pyo3(signature = (prompt, **kwargs))]
    fn stream(&self, py: Python<'_>, prompt: &str, kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<TextStream> {
        self.open_stream(self.encode(py, prompt)?, kwargs)
    }

    #[pyo3(signature = (messages, **kwargs))]
    fn chat(
        &self,
        py: Python<'_>,
        messages: &Bound<'_, PyList>,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Py<PyAny>> {
        self.run(py, self.chat_ids(py, messages)?, kwargs, false)
    }

    #[pyo3(signature = (messages, **kwargs))]
    fn stream_chat(
        &self,
        py: Python<'_>,
        messages: &Bound<'_, PyList>,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<TextStream> {
        self.open_stream(self.chat_ids(py, messages)?, kwargs)
    }
}

/// A loaded Granite model. Immutable and thread-safe: each call has its own KV cache.
#[pyclass(module = "granite_rs._granite_rs", extends = Generates, frozen, subclass)]
pub struct Generator {
    inner: Arc<model::Generator>,
    device: String,
}

#[pymethods]
impl Generator {
    #[new]
    #[pyo3(signature = (model_dir, *, device = "cpu", dtype = None, quantize = None, num_threads = None, matmul_precision = None, kv_cache_bytes = None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        model_dir: PathBuf,
        device: &str,
        dtype: Option<&str>,
        quantize: Option<&str>,
        num_threads: Option<usize>,
        matmul_precision: Option<&str>,
        kv_cache_bytes: Option<usize>,
    ) -> PyResult<PyClassInitializer<Self>> {
        let dtype = dtype.map(parse_dtype).transpose()?;
        let quantization = quantize.map(Quantization::parse).transpose()?.unwrap_or_default();
        let precision = matmul_precision.map(Precision::parse).transpose().map_err(Error::invalid)?.unwrap_or_default();
        let dev = self::device(device)?;
        let opts = model::LoadOptions { dtype, quantization, precision, num_threads, kv_cache_bytes };
        let inner = py.detach(|| model::Generator::load_with(&model_dir, &dev, &opts))?;
        let inner = Arc::new(inner);
        let base = Generates { generator: inner.clone(), home: None };
        Ok(PyClassInitializer::from(base).add_subclass(Self { inner, device: device.to_string() }))
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

    /// The text the chat template makes of `messages` (with the generation prompt).
    #[pyo3(signature = (messages, add_generation_prompt = true))]
    fn apply_chat_template(&self, messages: &Bound<'_, PyList>, add_generation_prompt: bool) -> PyResult<String> {
        let messages = self::messages(messages)?;
        let template =
            self.inner.chat_template().ok_or_else(|| Error::Unsupported("this model has no chat template".into()))?;
        Ok(template.render(&messages, add_generation_prompt)?)
    }

    /// Generates for all prompts together, one forward per step over every unfinished prompt.
    #[pyo3(signature = (prompts, **kwargs))]
    fn generate_batch(
        &self,
        py: Python<'_>,
        prompts: Vec<String>,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Vec<String>> {
        let options = generate_params_rows(&self.inner, kwargs, prompts.len())?;
        if options.iter().any(|o| o.details) {
            return Err(PyValueError::new_err("details is not supported by generate_batch"));
        }
        let ids =
            py.detach(|| prompts.iter().map(|p| self.inner.tokenizer().encode(p, true)).collect::<Result<Vec<_>>>())?;
        let cancel = std::sync::atomic::AtomicBool::new(false);
        let rows = ids.into_iter().zip(options).collect();
        let outputs =
            watched(py, &cancel, || crate::generation::batch::generate_batch(&self.inner, rows, Some(&cancel)))?;
        Ok(outputs.into_iter().map(|o| o.text).collect())
    }

    /// A conversation that keeps its KV cache between calls.
    fn session(&self, py: Python<'_>) -> PyResult<Py<Session>> {
        Session::create(py, &self.inner, session::Session::new(self.inner.clone())?)
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

    /// Bytes of the weight matrices (what one decode step reads), and how many of each type.
    #[getter]
    fn weight_bytes(&self) -> usize {
        self.inner.model().matrices().iter().map(|w| w.size_in_bytes()).sum()
    }

    /// Bytes of the weight matrices read in place from the memory-mapped checkpoint file.
    #[getter]
    fn mapped_weight_bytes(&self) -> usize {
        self.inner.model().matrices().iter().filter(|w| w.is_mapped()).map(|w| w.size_in_bytes()).sum()
    }

    #[getter]
    fn weight_types(&self) -> std::collections::BTreeMap<String, usize> {
        let mut types = std::collections::BTreeMap::new();
        for w in self.inner.model().matrices() {
            *types.entry(w.type_name()).or_insert(0) += 1;
        }
        types
    }

    /// CPU threads used for compute (process-wide).
    #[getter]
    fn num_threads(&self) -> usize {
        crate::generation::threads::num_threads()
    }

    /// What the model's own files say: format, architecture, shape, stored dtype, parameters.
    #[getter]
    fn model_info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let (info, c) = (self.inner.info(), self.inner.config());
        let d = PyDict::new(py);
        d.set_item("format", info.format)?;
        let optional =
            [("architecture", &info.architecture), ("name", &info.name), ("torch_dtype", &info.stored_dtype)];
        for (key, value) in optional {
            if let Some(v) = value {
                d.set_item(key, v)?;
            }
        }
        if info.format == "HF model directory" {
            if let Some(t) = &c.model_type {
                d.set_item("model_type", t)?;
            }
        }
        d.set_item("num_hidden_layers", c.num_hidden_layers)?;
        d.set_item("hidden_size", c.hidden_size)?;
        d.set_item("intermediate_size", c.intermediate_size)?;
        d.set_item("num_attention_heads", c.num_attention_heads)?;
        d.set_item("num_key_value_heads", c.num_kv_heads())?;
        let model = self.inner.model();
        d.set_item("parameters", model.parameter_count())?;
        d.set_item("active_parameters", model.active_parameter_count())?;
        d.set_item("attention_layers", model.attention_layers())?;
        d.set_item("mamba_layers", model.ssm_shape().map_or(0, |s| s.layers))?;
        if let Some(e) = c.experts()? {
            d.set_item("num_local_experts", e.count)?;
            d.set_item("num_experts_per_tok", e.per_token)?;
        }
        if c.family()? != Family::Dense {
            if let Some(size) = c.shared_mlp_size()? {
                d.set_item("shared_intermediate_size", size)?;
            }
        }
        if let Some(n) = info.trained_context_length {
            d.set_item("trained_context_length", n)?;
        }
        let pool = model.kv_pool();
        d.set_item("kv_cache_bytes", pool.bytes())?;
        d.set_item("kv_cache_positions", pool.capacity())?;
        d.set_item("kv_cache_free_positions", pool.free_positions())?;
        d.set_item("kv_block_positions", crate::model::kv_pool::BLOCK_TOKENS)?;
        if let Some(shape) = model.ssm_shape() {
            d.set_item("ssm_state_bytes", shape.bytes())?;
            d.set_item("ssm_checkpoints", crate::model::ssm_state::CHECKPOINTS)?;
        }
        Ok(d)
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

/// A conversation on one Generator that keeps its KV cache: each call reuses the longest
/// common token prefix with what is cached and computes only the rest.
#[pyclass(module = "granite_rs._granite_rs", extends = Generates, frozen)]
pub struct Session {
    generator: Arc<model::Generator>,
    state: Arc<Mutex<session::Session>>,
}

impl Session {
    fn create(py: Python<'_>, generator: &Arc<model::Generator>, session: session::Session) -> PyResult<Py<Self>> {
        let state = Arc::new(Mutex::new(session));
        let base = Generates { generator: generator.clone(), home: Some(state.clone()) };
        Py::new(py, PyClassInitializer::from(base).add_subclass(Self { generator: generator.clone(), state }))
    }
}

#[pymethods]
impl Session {
    /// The token ids in the cache (prompts and generated tokens).
    #[getter]
    fn cached_ids(&self) -> Vec<u32> {
        lock(&self.state).cached_ids().to_vec()
    }

    /// Forgets the cached tokens.
    fn reset(&self) -> PyResult<()> {
        Ok(lock(&self.state).reset()?)
    }

    /// Keeps only the first `n` cached tokens.
    fn truncate(&self, n: usize) -> PyResult<()> {
        Ok(lock(&self.state).truncate(n)?)
    }

    /// An independent copy of this session (cache copied, nothing shared).
    fn fork(&self, py: Python<'_>) -> PyResult<Py<Session>> {
        let copy = py.detach(|| lock(&self.state).fork())?;
        Session::create(py, &self.generator, copy)
    }

    fn __repr__(&self) -> String {
        format!("Session(cached_ids=[{} ids])", lock(&self.state).cached_ids().len())
    }
}
