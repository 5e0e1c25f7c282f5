//! Python values as JSON, for what a chat template sees (messages, tools, documents, template
//! variables): plain JSON types, as transformers rebuilds its template inputs, plus pydantic
//! models and dataclasses (the OpenAI client's messages) as dicts.

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyMapping, PyString, PyTuple};
use pyo3::IntoPyObjectExt;
use serde_json::Value;

use crate::text::chat::JsonMap;
use crate::text::tool_calls::ToolCall;

/// Nesting deeper than this is refused (a list that contains itself would never end).
const MAX_DEPTH: usize = 64;

/// `value` as JSON; `path` names it in errors, e.g. `messages[2]["tool_calls"]`.
pub fn to_json(value: &Bound<'_, PyAny>, path: &str) -> PyResult<Value> {
    convert(value, path, 0)
}

/// A dict (or a pydantic model or dataclass) as a JSON object.
pub fn to_json_object(value: &Bound<'_, PyAny>, path: &str) -> PyResult<JsonMap> {
    match to_json(value, path)? {
        Value::Object(map) => Ok(map),
        _ => Err(PyTypeError::new_err(format!("{path} must be a dict, got {}", type_name(value)))),
    }
}

fn convert(value: &Bound<'_, PyAny>, path: &str, depth: usize) -> PyResult<Value> {
    if depth > MAX_DEPTH {
        let root = path.split('[').next().unwrap_or(path);
        return Err(PyValueError::new_err(format!(
            "{root}: nested more than {MAX_DEPTH} deep (does it contain itself?)"
        )));
    }
    if value.is_none() {
        return Ok(Value::Null);
    }
    if value.is_instance_of::<PyBool>() {
        return Ok(Value::Bool(value.extract()?));
    }
    if value.is_instance_of::<PyInt>() {
        if let Ok(n) = value.extract::<i64>() {
            return Ok(n.into());
        }
        return match value.extract::<u64>() {
            Ok(n) => Ok(n.into()),
            Err(_) => Err(PyValueError::new_err(format!("{path}: the integer is too large for JSON"))),
        };
    }
    if value.is_instance_of::<PyFloat>() {
        let x: f64 = value.extract()?;
        return serde_json::Number::from_f64(x)
            .map(Value::Number)
            .ok_or_else(|| PyValueError::new_err(format!("{path}: {x} is not a finite number")));
    }
    if value.is_instance_of::<PyString>() {
        return Ok(Value::String(value.extract()?));
    }
    if value.is_instance_of::<PyList>() || value.is_instance_of::<PyTuple>() {
        let items = value.try_iter()?.enumerate().map(|(i, item)| convert(&item?, &format!("{path}[{i}]"), depth + 1));
        return Ok(Value::Array(items.collect::<PyResult<_>>()?));
    }
    if value.is_instance_of::<PyDict>() || value.is_instance_of::<PyMapping>() {
        let mut map = JsonMap::new();
        for item in value.call_method0("items")?.try_iter()? {
            let (key, item): (Bound<'_, PyAny>, Bound<'_, PyAny>) = item?.extract()?;
            let key: String = key
                .extract()
                .map_err(|_| PyTypeError::new_err(format!("{path}: keys must be strings, got {}", type_name(&key))))?;
            let item = convert(&item, &format!("{path}[{key:?}]"), depth + 1)?;
            map.insert(key, item);
        }
        return Ok(Value::Object(map));
    }
    if value.hasattr("model_dump")? {
        return convert(&value.call_method0("model_dump")?, path, depth + 1);
    }
    let dataclasses = value.py().import("dataclasses")?;
    if dataclasses.call_method1("is_dataclass", (value,))?.is_truthy()?
        && !value.is_instance_of::<pyo3::types::PyType>()
    {
        return convert(&dataclasses.call_method1("asdict", (value,))?, path, depth + 1);
    }
    Err(PyTypeError::new_err(format!(
        "{path}: {} is not JSON (a dict, list, str, int, float, bool or None)",
        type_name(value)
    )))
}

/// JSON as Python values: dicts (in key order), lists, str, int, float, bool and None.
pub fn to_py(py: Python<'_>, value: &Value) -> PyResult<Py<PyAny>> {
    Ok(match value {
        Value::Null => py.None(),
        Value::Bool(b) => PyBool::new(py, *b).to_owned().into_any().unbind(),
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => i.into_py_any(py)?,
            (None, Some(u)) => u.into_py_any(py)?,
            _ => n.as_f64().unwrap_or(f64::NAN).into_py_any(py)?,
        },
        Value::String(text) => text.into_py_any(py)?,
        Value::Array(items) => {
            PyList::new(py, items.iter().map(|v| to_py(py, v)).collect::<PyResult<Vec<_>>>()?)?.into_any().unbind()
        }
        Value::Object(fields) => {
            let dict = PyDict::new(py);
            for (key, item) in fields {
                dict.set_item(key, to_py(py, item)?)?;
            }
            dict.into_any().unbind()
        }
    })
}

/// Tool calls as a list of `{"name": str, "arguments": dict}`.
pub fn tool_calls_to_py(py: Python<'_>, calls: &[ToolCall]) -> PyResult<Py<PyAny>> {
    let calls = calls.iter().map(|c| {
        let dict = PyDict::new(py);
        dict.set_item("name", &c.name)?;
        dict.set_item("arguments", to_py(py, &Value::Object(c.arguments.clone()))?)?;
        Ok(dict)
    });
    Ok(PyList::new(py, calls.collect::<PyResult<Vec<_>>>()?)?.into_any().unbind())
}

fn type_name(value: &Bound<'_, PyAny>) -> String {
    value.get_type().name().map_or_else(|_| "object".into(), |n| n.to_string())
}
