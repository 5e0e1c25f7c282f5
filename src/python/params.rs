//! Generation keywords, read once for every generating method: each is looked up in
//! `generation::params::KEYWORDS`, extracted as its kind, and set (and checked) by the core.

use pyo3::exceptions::{PyOverflowError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString, PyTuple};

use super::json::to_json;
use crate::generation::model::Generator;
use crate::generation::params::{DefaultValue, GenerateParams, Keyword, Kind, Value, KEYWORDS};

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

/// A keyword's value as its kind says; None only where the keyword takes it.
fn extract(key: &str, kind: Kind, nullable: bool, value: &Bound<'_, PyAny>) -> PyResult<Value> {
    if nullable && value.is_none() {
        return Ok(Value::None);
    }
    Ok(match kind {
        Kind::Count => Value::Int(get::<i64>(key, value)?.into()),
        Kind::Int => Value::Int(get(key, value)?),
        Kind::Float => Value::Float(get(key, value)?),
        Kind::Bool => Value::Bool(get(key, value)?),
        // One string or a list of them.
        Kind::Strs if value.is_instance_of::<PyString>() => Value::Strs(vec![get(key, value)?]),
        Kind::Strs => Value::Strs(get(key, value)?),
        Kind::Ints => Value::Ints(get(key, value)?),
        Kind::Str => Value::Str(get(key, value)?),
        // A JSON string is parsed; anything else must be JSON already (a dict, a bool, ...).
        Kind::Json if value.is_instance_of::<PyString>() => {
            let text: String = get(key, value)?;
            Value::Json(
                serde_json::from_str(&text).map_err(|e| PyValueError::new_err(format!("{key}: not JSON: {e}")))?,
            )
        }
        Kind::Json => Value::Json(to_json(value, key)?),
    })
}

/// A keyword argument's name and its entry in `KEYWORDS`.
fn keyword(key: &Bound<'_, PyAny>) -> PyResult<(String, &'static Keyword)> {
    let key: String = key.extract()?;
    match KEYWORDS.iter().find(|k| k.name == key) {
        Some(k) => Ok((key, k)),
        None => Err(PyTypeError::new_err(format!("unexpected keyword argument '{key}'"))),
    }
}

/// A chat call's keywords: those in `KEYWORDS` as a dict, and the others (the chat template's
/// variables, as transformers passes them). A name one typo from a generation keyword is a
/// TypeError, since it would silently do nothing; such a template variable goes in
/// `chat_template_kwargs`.
#[allow(clippy::type_complexity)]
pub fn split_chat_kwargs<'py>(
    kwargs: Option<&Bound<'py, PyDict>>,
) -> PyResult<(Option<Bound<'py, PyDict>>, Vec<(String, Bound<'py, PyAny>)>)> {
    let Some(kwargs) = kwargs else { return Ok((None, Vec::new())) };
    let generation = PyDict::new(kwargs.py());
    let mut others = Vec::new();
    for (key, value) in kwargs.iter() {
        let name: String = key.extract()?;
        if KEYWORDS.iter().any(|k| k.name == name) {
            generation.set_item(key, value)?;
            continue;
        }
        let near = KEYWORDS.iter().find(|k| strsim::normalized_damerau_levenshtein(k.name, &name) >= 0.8);
        if let Some(k) = near {
            return Err(PyTypeError::new_err(format!(
                "unexpected keyword argument '{name}' (did you mean '{}'? A chat template variable of this \
                 name goes in chat_template_kwargs)",
                k.name
            )));
        }
        others.push((name, value));
    }
    Ok((Some(generation), others))
}

/// Keywords as transformers' `generate` names them; unset ones come from generation_config.json.
/// The values are checked by the core when the generation starts.
pub fn generate_params(generator: &Generator, kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<GenerateParams> {
    let mut p = GenerateParams { sampling: generator.defaults().sampling(), ..Default::default() };
    for (key, value) in kwargs.into_iter().flat_map(|k| k.iter()) {
        let (key, k) = keyword(&key)?;
        p.set(&key, extract(&key, k.kind, k.nullable, &value)?)?;
    }
    Ok(p)
}

/// `generate_params` for `rows` prompts together: a keyword may give one value per prompt, as a
/// list of `rows` values (for a list-valued keyword, a list of `rows` lists).
pub fn generate_params_rows(
    generator: &Generator,
    kwargs: Option<&Bound<'_, PyDict>>,
    rows: usize,
) -> PyResult<Vec<GenerateParams>> {
    let mut ps = vec![GenerateParams { sampling: generator.defaults().sampling(), ..Default::default() }; rows];
    for (key, value) in kwargs.into_iter().flat_map(|k| k.iter()) {
        let (key, k) = keyword(&key)?;
        let per_row = match per_row_values(&value)? {
            Some(values) if !matches!(k.kind, Kind::Strs | Kind::Ints) => Some(values),
            Some(values) if values.iter().all(|v| per_row_values(v).is_ok_and(|v| v.is_some())) => Some(values),
            _ => None,
        };
        match per_row {
            Some(values) if values.len() != rows => {
                return Err(PyValueError::new_err(format!(
                    "{key}: a list gives one value per prompt: {} values for {rows} prompts",
                    values.len()
                )))
            }
            Some(values) => {
                for (p, v) in ps.iter_mut().zip(&values) {
                    p.set(&key, extract(&key, k.kind, k.nullable, v)?)?;
                }
            }
            None => {
                let v = extract(&key, k.kind, k.nullable, &value)?;
                for p in &mut ps {
                    p.set(&key, v.clone())?;
                }
            }
        }
    }
    Ok(ps)
}

/// The items of a list or tuple; None for anything else.
fn per_row_values<'py>(value: &Bound<'py, PyAny>) -> PyResult<Option<Vec<Bound<'py, PyAny>>>> {
    if value.is_instance_of::<PyList>() || value.is_instance_of::<PyTuple>() {
        return Ok(Some(value.try_iter()?.collect::<PyResult<Vec<_>>>()?));
    }
    Ok(None)
}

/// `KEYWORDS` for Python: a tuple of dicts with name, type, default, range and doc.
pub fn keyword_table(py: Python<'_>) -> PyResult<Bound<'_, pyo3::types::PyTuple>> {
    let rows = KEYWORDS.iter().map(|k| -> PyResult<Bound<'_, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("name", k.name)?;
        d.set_item("type", k.kind.name())?;
        match k.default {
            DefaultValue::None => d.set_item("default", py.None())?,
            DefaultValue::Int(n) => d.set_item("default", n)?,
            DefaultValue::Float(f) => d.set_item("default", f)?,
            DefaultValue::Bool(b) => d.set_item("default", b)?,
        }
        d.set_item("nullable", k.nullable)?;
        d.set_item("range", k.range)?;
        d.set_item("doc", k.doc)?;
        Ok(d)
    });
    pyo3::types::PyTuple::new(py, rows.collect::<PyResult<Vec<_>>>()?)
}
