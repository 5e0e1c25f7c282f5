//! Generation keywords, read once for generate / generate_ids / stream.

use pyo3::exceptions::{PyOverflowError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};

use crate::generate::{GenerateParams, Generator};

fn non_negative(name: &str, value: i128) -> PyResult<u64> {
    u64::try_from(value).map_err(|_| match value < 0 {
        true => PyValueError::new_err(format!("{name} must not be negative, got {value}")),
        false => PyValueError::new_err(format!("{name} must be below 2**64, got {value}")),
    })
}

/// Extracts a keyword's value; a wrong type is a TypeError (a number out of range an
/// OverflowError, a string with a lone surrogate a ValueError) that names the keyword.
fn get<'a, 'py, T>(key: &str, value: &'a Bound<'py, PyAny>) -> PyResult<T>
where
    T: FromPyObject<'a, 'py>,
    T::Error: Into<PyErr>,
{
    value.extract::<T>().map_err(|e| {
        let (e, py): (PyErr, _) = (e.into(), value.py());
        let message = format!("{key}: {}", e.value(py));
        if e.is_instance_of::<PyOverflowError>(py) {
            PyOverflowError::new_err(message)
        } else if e.is_instance_of::<PyValueError>(py) {
            PyValueError::new_err(message)
        } else {
            PyTypeError::new_err(message)
        }
    })
}

/// `stop` may be one string or a list of them.
fn stop_strings(value: &Bound<'_, PyAny>) -> PyResult<Vec<String>> {
    match value.is_instance_of::<PyString>() {
        true => Ok(vec![get("stop", value)?]),
        false => get("stop", value),
    }
}

/// The keywords of one call: generation parameters, and whether to return details.
pub struct Options {
    pub params: GenerateParams,
    pub details: bool,
}

/// Keywords as transformers' `generate` names them; unset ones come from generation_config.json.
pub fn generate_params(generator: &Generator, kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<Options> {
    let mut p = GenerateParams { sampling: generator.defaults().sampling(), ..Default::default() };
    let mut details = false;
    for (key, value) in kwargs.into_iter().flat_map(|k| k.iter()) {
        let key: String = key.extract()?;
        let none = value.is_none();
        match key.as_str() {
            "max_new_tokens" if none => {}
            "max_new_tokens" => {
                let n: i64 = get(&key, &value)?;
                if n < 1 {
                    return Err(PyValueError::new_err(format!("max_new_tokens must be at least 1, got {n}")));
                }
                p.max_new_tokens = Some(n as usize);
            }
            "do_sample" => p.sampling.do_sample = get(&key, &value)?,
            "temperature" => p.sampling.temperature = get(&key, &value)?,
            "top_k" => {
                let k: Option<i128> = get(&key, &value)?;
                p.sampling.top_k = k.map(|k| non_negative("top_k", k).map(|k| k as usize)).transpose()?;
            }
            "top_p" => p.sampling.top_p = get(&key, &value)?,
            "repetition_penalty" => p.sampling.repetition_penalty = get(&key, &value)?,
            "seed" => {
                p.sampling.seed = get::<Option<i128>>(&key, &value)?.map(|s| non_negative("seed", s)).transpose()?
            }
            "stop" if none => p.stop.clear(),
            "stop" => p.stop = stop_strings(&value)?,
            "stop_token_ids" => {
                let ids: Option<Vec<i64>> = get(&key, &value)?;
                p.stop_token_ids = generator.check_ids(&ids.unwrap_or_default())?;
            }
            "ignore_eos" => p.ignore_eos = get(&key, &value)?,
            "min_p" => p.sampling.min_p = get(&key, &value)?,
            "presence_penalty" => p.sampling.presence_penalty = get(&key, &value)?,
            "frequency_penalty" => p.sampling.frequency_penalty = get(&key, &value)?,
            "details" => details = get(&key, &value)?,
            "top_logprobs" => {
                let n: i128 = get(&key, &value)?;
                p.logprobs = Some(non_negative("top_logprobs", n)? as usize);
            }
            other => return Err(PyTypeError::new_err(format!("unexpected keyword argument '{other}'"))),
        }
    }
    if details {
        p.logprobs.get_or_insert(0);
    }
    p.sampling.validate()?;
    Ok(Options { params: p, details })
}
