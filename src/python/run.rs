//! Running generations from Python: the GIL released, Ctrl-C and cancellation honoured, a
//! session's cache handed back however the run ends.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use pyo3::exceptions::PyStopIteration;
use pyo3::prelude::*;

use super::json::tool_calls_to_py;
use crate::error::{Error, Result};
use crate::generation::model::Generator;
use crate::generation::params::GenerateParams;
use crate::generation::request::{Timings, TokenLogprob};
use crate::generation::sequence::Sequence;
use crate::generation::session::Session;
use crate::generation::stopping::FinishReason;
use crate::text::tool_calls::{ToolCall, ToolFormat};

pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A generation, and the session whose cache it borrows, if any.
pub struct Running {
    generation: Option<Sequence>,
    home: Option<Arc<Mutex<Session>>>,
}

impl Running {
    pub fn start(
        generator: &Arc<Generator>,
        home: Option<Arc<Mutex<Session>>>,
        prompt: Vec<u32>,
        params: GenerateParams,
    ) -> Result<Self> {
        let generation = match &home {
            Some(session) => lock(session).start(prompt, params)?,
            None => Sequence::new(generator.clone(), prompt, params)?,
        };
        Ok(Self { generation: Some(generation), home })
    }

    pub fn generation(&mut self) -> &mut Sequence {
        self.generation.as_mut().expect("a Running holds its generation until dropped")
    }

    pub fn get(&self) -> &Sequence {
        self.generation.as_ref().expect("a Running holds its generation until dropped")
    }

    /// The next chunk; None once finished, or once handed back.
    fn next_chunk(&mut self) -> Result<Option<String>> {
        self.generation.as_mut().map_or(Ok(None), Sequence::next_chunk)
    }

    /// Hands a session's cache back now, so that a finished stream does not keep it busy.
    fn hand_back(&mut self) {
        if let (Some(session), Some(generation)) = (&self.home, self.generation.take()) {
            lock(session).finish(generation);
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let (Some(generation), Some(session)) = (self.generation.take(), &self.home) {
            lock(session).finish(generation);
        }
    }
}

/// Runs `work` on a helper thread with the GIL released, checking for Ctrl-C every 50 ms; on
/// an interrupt it sets `cancel`, waits for the work to stop, and raises KeyboardInterrupt.
pub fn watched<T: Send>(py: Python<'_>, cancel: &AtomicBool, work: impl FnOnce() -> Result<T> + Send) -> PyResult<T> {
    std::thread::scope(|scope| {
        let (done, finished) = mpsc::channel();
        let finished = Mutex::new(finished); // a Receiver is not Sync; detach needs Send captures
        let worker = scope.spawn(move || {
            let result = work();
            let _ = done.send(());
            result
        });
        loop {
            let ready = py.detach(|| lock(&finished).recv_timeout(Duration::from_millis(50)).is_ok());
            if ready || worker.is_finished() {
                break;
            }
            if let Err(interrupt) = py.check_signals() {
                cancel.store(true, Ordering::Relaxed);
                let _ = py.detach(|| worker.join());
                return Err(interrupt);
            }
        }
        let result = py.detach(|| worker.join()).map_err(|_| Error::Numerical("a worker thread panicked".into()))?;
        Ok(result?)
    })
}

/// Text chunks of one generation; the work stops when the iterator is dropped or cancelled.
#[pyclass(module = "granite_rs._granite_rs", frozen)]
pub struct TextStream {
    running: Mutex<Running>,
    /// What the getters read, brought up to date by each `__next__`: a getter never waits for
    /// the next token behind a `__next__` blocked on another thread.
    seen: Mutex<Seen>,
    cancel: Arc<AtomicBool>,
    /// For a chat with tools: the model, and the format its tool calls are read in.
    tools: Option<(Arc<Generator>, ToolFormat)>,
}

impl TextStream {
    pub fn new(mut running: Running, tools: Option<(Arc<Generator>, ToolFormat)>) -> Self {
        let cancel = running.generation().cancel_flag();
        Self { running: Mutex::new(running), seen: Mutex::default(), cancel, tools }
    }
}

/// A generation as far as its stream has handed it out.
#[derive(Default)]
struct Seen {
    new_tokens: Vec<u32>,
    logprobs: Vec<TokenLogprob>,
    finish_reason: Option<FinishReason>,
    timings: Timings,
}

impl Seen {
    /// Takes in what `generation` has made since.
    fn update(&mut self, generation: &Sequence) {
        self.new_tokens.extend_from_slice(&generation.new_tokens()[self.new_tokens.len()..]);
        self.logprobs.extend_from_slice(&generation.logprobs()[self.logprobs.len()..]);
        self.finish_reason = generation.finish_reason();
        self.timings = generation.timings();
    }
}

#[pymethods]
impl TextStream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<String> {
        let chunk = py.detach(|| {
            let mut running = lock(&self.running);
            let chunk = running.next_chunk();
            if let Some(generation) = &running.generation {
                lock(&self.seen).update(generation);
            }
            if !matches!(chunk, Ok(Some(_))) {
                running.hand_back();
            }
            chunk
        });
        match chunk {
            Ok(Some(text)) => Ok(text),
            Ok(None) | Err(Error::Cancelled) => Err(PyStopIteration::new_err(())),
            Err(e) => Err(e.into()),
        }
    }

    /// Stops the work, from any thread, within one layer's forward; the iterator then ends.
    fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }

    /// The new token ids so far.
    #[getter]
    fn token_ids(&self) -> Vec<u32> {
        lock(&self.seen).new_tokens.clone()
    }

    /// "eos", "stop" or "length" once finished, else None.
    #[getter]
    fn finish_reason(&self) -> Option<&'static str> {
        lock(&self.seen).finish_reason.map(|f| f.as_str())
    }

    /// Each new token's log-probability so far (when ``top_logprobs`` is given, 0 included; else empty).
    #[getter]
    fn logprobs(&self) -> Vec<f32> {
        lock(&self.seen).logprobs.iter().map(|l| l.logprob).collect()
    }

    /// Per new token so far, the ``top_logprobs`` most likely (token id, log-probability) pairs.
    #[getter]
    fn top_logprobs(&self) -> Vec<Vec<(u32, f32)>> {
        lock(&self.seen).logprobs.iter().map(|l| l.top.clone()).collect()
    }

    /// The prompt's tokens, once finished (0 before).
    #[getter]
    fn prompt_tokens(&self) -> usize {
        lock(&self.seen).timings.prompt_tokens
    }

    /// Prompt tokens not computed again (a session's cache, or prefix caching), once finished.
    #[getter]
    fn cached_tokens(&self) -> usize {
        lock(&self.seen).timings.cached_tokens
    }

    /// For a chat with tools, the tool calls complete so far; else None.
    #[getter]
    fn tool_calls(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        match self.read_tool_calls(py)? {
            Some((_, calls)) => tool_calls_to_py(py, &calls).map(Some),
            None => Ok(None),
        }
    }

    /// For a chat with tools, the text so far outside the complete tool calls; else None.
    #[getter]
    fn content(&self, py: Python<'_>) -> PyResult<Option<String>> {
        Ok(self.read_tool_calls(py)?.map(|(content, _)| content))
    }
}

impl TextStream {
    fn read_tool_calls(&self, py: Python<'_>) -> Result<Option<(String, Vec<ToolCall>)>> {
        let Some((generator, format)) = &self.tools else { return Ok(None) };
        let tokens = lock(&self.seen).new_tokens.clone();
        py.detach(|| generator.tool_calls(&tokens, *format)).map(Some)
    }
}

/// What `generate(..., details=True)` returns.
#[pyclass(module = "granite_rs._granite_rs", frozen, get_all)]
pub struct GenerationResult {
    /// The new text.
    text: String,
    /// The new token ids.
    token_ids: Vec<u32>,
    /// "eos", "stop" or "length" (None while unfinished).
    finish_reason: Option<&'static str>,
    /// Each new token's log-probability under the model (before sampling processors).
    logprobs: Vec<f32>,
    /// Per new token, the `top_logprobs` most likely (token id, log-probability) pairs.
    top_logprobs: Vec<Vec<(u32, f32)>>,
    /// Prompt tokens, and how many of them came from a session's cache.
    prompt_tokens: usize,
    cached_tokens: usize,
    /// Seconds from the start to the first new token.
    time_to_first_token: f64,
    /// New tokens after the first, per second.
    decode_tokens_per_s: f64,
    /// Seconds spent on json_schema, regex or grammar: the token masks and the matcher.
    constraint_time: f64,
    /// For a chat with tools: the text outside the tool calls, and the calls.
    content: Option<String>,
    tool_calls: Option<Py<PyAny>>,
}

impl GenerationResult {
    pub fn new(g: &Sequence, text: String, token_ids: Vec<u32>) -> Self {
        let t = &g.timings();
        let decode_s = t.decode_time.as_secs_f64();
        let decoded = token_ids.len().saturating_sub(1);
        Self {
            text,
            finish_reason: g.finish_reason().map(|f| f.as_str()),
            logprobs: g.logprobs().iter().map(|l| l.logprob).collect(),
            top_logprobs: g.logprobs().iter().map(|l| l.top.clone()).collect(),
            token_ids,
            prompt_tokens: t.prompt_tokens,
            cached_tokens: t.cached_tokens,
            time_to_first_token: t.time_to_first_token.as_secs_f64(),
            decode_tokens_per_s: if decode_s > 0.0 { decoded as f64 / decode_s } else { 0.0 },
            constraint_time: t.constraint_time.as_secs_f64(),
            content: None,
            tool_calls: None,
        }
    }

    /// With the text outside the tool calls and the calls, for a chat with tools.
    pub fn with_tool_calls(mut self, py: Python<'_>, found: Option<(String, Vec<ToolCall>)>) -> PyResult<Self> {
        if let Some((content, calls)) = found {
            self.content = Some(content);
            self.tool_calls = Some(tool_calls_to_py(py, &calls)?);
        }
        Ok(self)
    }
}

#[pymethods]
impl GenerationResult {
    fn __repr__(&self) -> String {
        format!(
            "GenerationResult(text={:?}, tokens={}, finish_reason={}, ttft={:.4}s, decode={:.1} tok/s)",
            self.text,
            self.token_ids.len(),
            self.finish_reason.map_or("None".to_string(), |f| format!("'{f}'")),
            self.time_to_first_token,
            self.decode_tokens_per_s
        )
    }
}
