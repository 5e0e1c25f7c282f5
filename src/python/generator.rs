//! `Generator` and `Session`, thin wrappers over crate::generation::model and crate::generation::session.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use candle_core::Device;
use numpy::{PyArray1, PyArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use pyo3::IntoPyObjectExt;

use super::json::{to_json, to_json_object};
use super::params::{generate_params, generate_params_rows, split_chat_kwargs};
use super::run::{lock, watched, GenerationResult, Running, TextStream};
use crate::config::{dtype_name, parse_dtype, Family};
use crate::error::{Error, Result};
use crate::generation::constraint::Grammar;
use crate::generation::model;
use crate::generation::params::GenerateParams;
use crate::generation::session;
use crate::loading::quantization::{Precision, Quantization};
use crate::model::kv_pool::PrefixReuse;
use crate::text::chat::{JsonMap, Message};
use crate::text::tool_calls::{ToolChoice, ToolFormat};

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

/// `messages` as a list of dicts (or pydantic models or dataclasses), each passed to the template as it is.
fn messages(list: &Bound<'_, PyAny>) -> PyResult<Vec<Message>> {
    if list.is_instance_of::<pyo3::types::PyString>() || list.is_instance_of::<PyDict>() {
        return Err(PyTypeError::new_err("messages must be a list of dicts"));
    }
    let items = list.try_iter().map_err(|_| PyTypeError::new_err("messages must be a list of dicts"))?;
    items.enumerate().map(|(i, m)| Ok(Message(to_json_object(&m?, &format!("messages[{i}]"))?))).collect()
}

/// The chat template's variables: `tools`, `documents`, then the others by name.
fn template_vars<'py>(
    tools: Option<&Bound<'py, PyAny>>,
    documents: Option<&Bound<'py, PyAny>>,
    others: Vec<(String, Bound<'py, PyAny>)>,
) -> PyResult<JsonMap> {
    let mut vars = JsonMap::new();
    for (name, value) in [("tools", tools), ("documents", documents)] {
        if let Some(v) = value.filter(|v| !v.is_none()) {
            vars.insert(name.into(), to_json(v, name)?);
        }
    }
    for (name, value) in others {
        let json = to_json(&value, &name)?;
        vars.insert(name, json);
    }
    Ok(vars)
}

impl Generates {
    fn start(&self, prompt: Vec<u32>, params: &GenerateParams) -> Result<Running> {
        Running::start(&self.generator, self.home.clone(), prompt, params.clone())
    }

    fn encode(&self, py: Python<'_>, prompt: &str) -> PyResult<Vec<u32>> {
        Ok(py.detach(|| self.generator.tokenizer().encode(prompt, true))?)
    }

    /// The chat template's text for `messages`, tokenized as transformers does (no special tokens added).
    fn chat_ids(&self, py: Python<'_>, list: &Bound<'_, PyAny>, vars: &JsonMap) -> PyResult<Vec<u32>> {
        let messages = messages(list)?;
        let template = self.generator.chat_template().ok_or_else(|| {
            Error::Unsupported(
                "this model directory has no chat template (tokenizer_config.json or chat_template.jinja)".into(),
            )
        })?;
        Ok(py.detach(|| -> Result<Vec<u32>> {
            let text = template.render(&messages, true, vars)?;
            self.generator.tokenizer().encode(&text, false)
        })?)
    }

    /// Runs to the end with Ctrl-C honoured: the new text, its ids with `ids_only`, or a
    /// GenerationResult when `details` is set (with the tool calls read in `tools`' format).
    fn run(
        &self,
        py: Python<'_>,
        prompt: Vec<u32>,
        options: GenerateParams,
        ids_only: bool,
        tools: Option<ToolFormat>,
    ) -> PyResult<Py<PyAny>> {
        let mut running = self.start(prompt, &options)?;
        let cancel = running.generation().cancel_flag();
        let text = watched(py, &cancel, || running.generation().run())?;
        let g = running.get();
        match (options.details, ids_only) {
            (true, _) => {
                let result = GenerationResult::new(g, text, g.new_tokens().to_vec());
                let tool_calls = tools.map(|f| self.generator.tool_calls(g.new_tokens(), f)).transpose()?;
                result.with_tool_calls(py, tool_calls)?.into_py_any(py)
            }
            (false, true) => g.new_tokens().into_py_any(py),
            (false, false) => text.into_py_any(py),
        }
    }

    fn open_stream(
        &self,
        prompt: Vec<u32>,
        options: GenerateParams,
        tools: Option<ToolFormat>,
    ) -> PyResult<TextStream> {
        let tools = tools.map(|f| (self.generator.clone(), f));
        Ok(TextStream::new(self.start(prompt, &options)?, tools))
    }

    /// A chat call's options, and the format its tool calls are read in when it has `tools`: with
    /// `tool_choice` "required" or a function, the text is constrained to valid calls.
    fn chat_options(
        &self,
        generation: Option<&Bound<'_, PyDict>>,
        vars: &JsonMap,
        tool_choice: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<(GenerateParams, Option<ToolFormat>)> {
        let mut options = generate_params(&self.generator, generation)?;
        let choice = tool_choice.map(parse_tool_choice).transpose()?.unwrap_or(ToolChoice::Auto);
        let tools = match vars.get("tools") {
            Some(serde_json::Value::Array(tools)) if !tools.is_empty() => tools,
            _ if choice != ToolChoice::Auto => {
                return Err(PyValueError::new_err("tool_choice other than \"auto\" or \"none\" needs tools"))
            }
            _ => return Ok((options, None)),
        };
        let source = self.generator.chat_template().map_or("", |t| t.source());
        let format = ToolFormat::of_template(source);
        if choice != ToolChoice::Auto {
            if let Some(other) = &options.grammar {
                return Err(PyValueError::new_err(format!(
                    "tool_choice constrains the text to tool calls; it cannot be combined with {}",
                    other.keyword()
                )));
            }
            let tokenizer = self.generator.tokenizer();
            let lark = format.grammar(tools, &choice, |marker| tokenizer.is_special(marker))?;
            options.grammar = Some(Grammar::Lark(lark));
        }
        Ok((options, Some(format)))
    }
}

/// OpenAI's `tool_choice`: "auto" or "none" (nothing constrained), "required", or a function
/// as `{"type": "function", "function": {"name": ...}}` or `{"name": ...}`.
fn parse_tool_choice(choice: &Bound<'_, PyAny>) -> PyResult<ToolChoice> {
    let invalid = || {
        PyValueError::new_err(
            "tool_choice must be \"auto\", \"none\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}}",
        )
    };
    if let Ok(word) = choice.extract::<String>() {
        return match word.as_str() {
            "auto" | "none" => Ok(ToolChoice::Auto),
            "required" => Ok(ToolChoice::Required),
            _ => Err(invalid()),
        };
    }
    let value = to_json(choice, "tool_choice")?;
    let spec = value.get("function").unwrap_or(&value);
    let name = spec.get("name").and_then(serde_json::Value::as_str).ok_or_else(invalid)?;
    Ok(ToolChoice::Function(name.to_string()))
}

#[pymethods]
impl Generates {
    #[pyo3(signature = (prompt, **kwargs))]
    fn generate(&self, py: Python<'_>, prompt: &str, kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<Py<PyAny>> {
        self.run(py, self.encode(py, prompt)?, generate_params(&self.generator, kwargs)?, false, None)
    }

    #[pyo3(signature = (ids, **kwargs))]
    fn generate_ids(&self, py: Python<'_>, ids: Vec<i64>, kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<Py<PyAny>> {
        let ids = self.generator.check_ids(&ids)?;
        self.run(py, ids, generate_params(&self.generator, kwargs)?, true, None)
    }

    #[pyo3(signature = (prompt, **kwargs))]
    fn stream(&self, py: Python<'_>, prompt: &str, kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<TextStream> {
        self.open_stream(self.encode(py, prompt)?, generate_params(&self.generator, kwargs)?, None)
    }

    #[pyo3(signature = (messages, *, tools = None, documents = None, tool_choice = None, chat_template_kwargs = None, **kwargs))]
    #[allow(clippy::too_many_arguments)]
    fn chat(
        &self,
        py: Python<'_>,
        messages: &Bound<'_, PyAny>,
        tools: Option<&Bound<'_, PyAny>>,
        documents: Option<&Bound<'_, PyAny>>,
        tool_choice: Option<&Bound<'_, PyAny>>,
        chat_template_kwargs: Option<&Bound<'_, PyDict>>,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Py<PyAny>> {
        let (generation, vars) = chat_args(tools, documents, chat_template_kwargs, kwargs)?;
        let (options, format) = self.chat_options(generation.as_ref(), &vars, tool_choice)?;
        self.run(py, self.chat_ids(py, messages, &vars)?, options, false, format)
    }

    #[pyo3(signature = (messages, *, tools = None, documents = None, tool_choice = None, chat_template_kwargs = None, **kwargs))]
    #[allow(clippy::too_many_arguments)]
    fn stream_chat(
        &self,
        py: Python<'_>,
        messages: &Bound<'_, PyAny>,
        tools: Option<&Bound<'_, PyAny>>,
        documents: Option<&Bound<'_, PyAny>>,
        tool_choice: Option<&Bound<'_, PyAny>>,
        chat_template_kwargs: Option<&Bound<'_, PyDict>>,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<TextStream> {
        let (generation, vars) = chat_args(tools, documents, chat_template_kwargs, kwargs)?;
        let (options, format) = self.chat_options(generation.as_ref(), &vars, tool_choice)?;
        self.open_stream(self.chat_ids(py, messages, &vars)?, options, format)
    }
}

/// A chat call's generation keywords, and its template variables: `tools`, `documents`, what
/// `chat_template_kwargs` holds and every other keyword.
fn chat_args<'py>(
    tools: Option<&Bound<'py, PyAny>>,
    documents: Option<&Bound<'py, PyAny>>,
    chat_template_kwargs: Option<&Bound<'py, PyDict>>,
    kwargs: Option<&Bound<'py, PyDict>>,
) -> PyResult<(Option<Bound<'py, PyDict>>, JsonMap)> {
    let (generation, others) = split_chat_kwargs(kwargs)?;
    let mut named = Vec::new();
    for (key, value) in chat_template_kwargs.into_iter().flat_map(|d| d.iter()) {
        let key: String =
            key.extract().map_err(|_| PyTypeError::new_err("chat_template_kwargs: keys must be strings"))?;
        named.push((key, value));
    }
    named.extend(others);
    Ok((generation, template_vars(tools, documents, named)?))
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
    #[pyo3(signature = (model_dir, *, device = "cpu", dtype = None, quantize = None, num_threads = None, matmul_precision = None, kv_cache_bytes = None, prefix_caching = None))]
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
        prefix_caching: Option<bool>,
    ) -> PyResult<PyClassInitializer<Self>> {
        let dtype = dtype.map(parse_dtype).transpose()?;
        let quantization = quantize.map(Quantization::parse).transpose()?.unwrap_or_default();
        let precision = matmul_precision.map(Precision::parse).transpose().map_err(Error::invalid)?.unwrap_or_default();
        let dev = self::device(device)?;
        let opts = model::LoadOptions { dtype, quantization, precision, num_threads, kv_cache_bytes, prefix_caching };
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

    /// The text the chat template makes of `messages` (with the generation prompt); every
    /// keyword is a template variable, as in transformers.
    #[pyo3(signature = (messages, add_generation_prompt = true, *, tools = None, documents = None, **kwargs))]
    fn apply_chat_template(
        &self,
        py: Python<'_>,
        messages: &Bound<'_, PyAny>,
        add_generation_prompt: bool,
        tools: Option<&Bound<'_, PyAny>>,
        documents: Option<&Bound<'_, PyAny>>,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<String> {
        let messages = self::messages(messages)?;
        let mut others = Vec::new();
        for (key, value) in kwargs.into_iter().flat_map(|d| d.iter()) {
            others.push((key.extract::<String>()?, value));
        }
        let vars = template_vars(tools, documents, others)?;
        let template =
            self.inner.chat_template().ok_or_else(|| Error::Unsupported("this model has no chat template".into()))?;
        Ok(py.detach(|| template.render(&messages, add_generation_prompt, &vars))?)
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
        let cancel = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let rows = ids.into_iter().zip(options).collect();
        let outputs =
            watched(py, &cancel, || crate::generation::batch::generate_batch(&self.inner, rows, cancel.clone()))?;
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
        let reuse = match pool.prefix_reuse() {
            PrefixReuse::Off => "off",
            PrefixReuse::Exact => "exact",
            PrefixReuse::All => "all",
        };
        d.set_item("prefix_caching", reuse)?;
        d.set_item("kv_cache_idle_cached_positions", pool.idle_cached_positions())?;
        if let Some(shape) = model.ssm_shape() {
            d.set_item("ssm_state_bytes", shape.bytes())?;
            d.set_item("ssm_checkpoints", crate::model::ssm_state::CHECKPOINTS)?;
        }
        Ok(d)
    }

    /// What the scheduler that batches every generation is doing and has done.
    #[getter]
    fn scheduler_stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.scheduler_stats();
        let d = PyDict::new(py);
        d.set_item("running", s.running)?;
        d.set_item("waiting", s.waiting)?;
        d.set_item("steps", s.steps)?;
        d.set_item("tokens", s.tokens)?;
        d.set_item("prefill_chunk", crate::generation::scheduler::PREFILL_CHUNK)?;
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
