//! Tool calls in a model's output, in the two formats chat templates ask for: Granite 3.x's
//! `<|tool_call|>[{"name": ..., "arguments": {...}}, ...]` and the tagged one of Granite 4.0 and
//! Hermes-style templates, `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>` per call.
//! Read back from the text, and written as a grammar that only lets valid calls through.

use serde_json::Value;

use crate::error::{Error, Result};
use crate::text::chat::JsonMap;

/// How a model writes its tool calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolFormat {
    /// Granite 3.x: `<|tool_call|>` and a JSON list of calls.
    List,
    /// Granite 4.0, Hermes: each call a JSON object between `<tool_call>` and `</tool_call>`.
    Tagged,
}

const LIST_MARKER: &str = "<|tool_call|>";
const OPEN_TAG: &str = "<tool_call>";
const CLOSE_TAG: &str = "</tool_call>";

/// One call: the function's name and its arguments.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub name: String,
    pub arguments: JsonMap,
}

/// Which calls a generation may or must make (OpenAI's `tool_choice`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// The model decides, and nothing is constrained.
    Auto,
    /// One call, valid under its function's schema, and nothing else.
    Required,
    /// One call of this function, and nothing else.
    Function(String),
}

impl ToolFormat {
    /// The format a chat template asks for: Granite 3.x's when it names `<|tool_call|>`, else the tagged one.
    pub fn of_template(source: &str) -> Self {
        if source.contains(LIST_MARKER) {
            ToolFormat::List
        } else {
            ToolFormat::Tagged
        }
    }

    /// The calls in `text` (written with special tokens kept) and the text outside them. A call
    /// whose JSON does not parse as `{"name": str, "arguments": {...}}` stays in the text.
    pub fn parse(self, text: &str) -> (String, Vec<ToolCall>) {
        match self {
            ToolFormat::List => parse_list(text),
            ToolFormat::Tagged => parse_tagged(text),
        }
    }

    /// A Lark grammar (llguidance's syntax) whose every text is one call allowed by `choice`,
    /// with arguments valid under its function's `parameters` schema, laid out as `json.dumps`
    /// writes JSON. `special` says whether a marker is one special token of the vocabulary (then
    /// written as `<name>`).
    pub fn grammar(self, tools: &[Value], choice: &ToolChoice, special: impl Fn(&str) -> bool) -> Result<String> {
        let functions = functions(tools)?;
        let allowed: Vec<&(String, Value)> = match choice {
            ToolChoice::Auto => return Err(Error::invalid("tool_choice \"auto\" constrains nothing")),
            ToolChoice::Required => functions.iter().collect(),
            ToolChoice::Function(name) => functions.iter().filter(|(n, _)| n == name).collect(),
        };
        if allowed.is_empty() {
            let names: Vec<&str> = functions.iter().map(|(n, _)| n.as_str()).collect();
            return Err(Error::invalid(match choice {
                ToolChoice::Function(name) => format!("tool_choice names {name:?}, which is not among tools {names:?}"),
                _ => "tool_choice \"required\" needs tools".into(),
            }));
        }
        let calls: Vec<Value> = allowed
            .iter()
            .map(|(name, parameters)| {
                serde_json::json!({
                    "type": "object",
                    "properties": {"name": {"const": name}, "arguments": parameters},
                    "required": ["name", "arguments"],
                    "additionalProperties": false,
                })
            })
            .collect();
        let marker = |m: &str| if special(m) { m.to_string() } else { format!("{:?}", m) };
        let layout = serde_json::json!({"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": false});
        Ok(match self {
            ToolFormat::List => {
                let list = serde_json::json!({"x-guidance": layout, "type": "array", "items": {"anyOf": calls},
                                              "minItems": 1, "maxItems": 1});
                format!("start: {} calls\ncalls: %json {list}\n", marker(LIST_MARKER))
            }
            ToolFormat::Tagged => {
                let call = serde_json::json!({"x-guidance": layout, "anyOf": calls});
                format!("start: {} \"\\n\" body \"\\n\" {}\nbody: %json {call}\n", marker(OPEN_TAG), marker(CLOSE_TAG))
            }
        })
    }
}

/// (name, parameters schema) of each function in `tools`, written as OpenAI and transformers
/// write them (`{"type": "function", "function": {...}}`) or bare (`{"name": ..., "parameters": ...}`).
fn functions(tools: &[Value]) -> Result<Vec<(String, Value)>> {
    tools
        .iter()
        .enumerate()
        .map(|(i, tool)| {
            let spec = tool.get("function").unwrap_or(tool);
            let name = spec.get("name").and_then(Value::as_str);
            let name = name.ok_or_else(|| Error::invalid(format!("tools[{i}] has no function name")))?;
            let parameters = spec.get("parameters").cloned().unwrap_or_else(|| serde_json::json!({"type": "object"}));
            Ok((name.to_string(), parameters))
        })
        .collect()
}

/// A call from its JSON: `{"name": ..., "arguments": {...}}`, the arguments also as a JSON
/// string or under `parameters`.
fn call(value: Value) -> Option<ToolCall> {
    let Value::Object(mut fields) = value else { return None };
    let name = fields.remove("name")?.as_str()?.to_string();
    let arguments = match fields.remove("arguments").or_else(|| fields.remove("parameters")) {
        None => JsonMap::new(),
        Some(Value::Object(arguments)) => arguments,
        Some(Value::String(text)) => match serde_json::from_str(&text).ok()? {
            Value::Object(arguments) => arguments,
            _ => return None,
        },
        Some(_) => return None,
    };
    Some(ToolCall { name, arguments })
}

/// The first JSON value at the start of `text` (after whitespace), and the bytes it took.
fn leading_json(text: &str) -> Option<(Value, usize)> {
    let mut values = serde_json::Deserializer::from_str(text).into_iter::<Value>();
    let value = values.next()?.ok()?;
    Some((value, values.byte_offset()))
}

fn parse_list(text: &str) -> (String, Vec<ToolCall>) {
    let Some(at) = text.find(LIST_MARKER) else { return (text.trim().to_string(), Vec::new()) };
    let rest = &text[at + LIST_MARKER.len()..];
    let calls = leading_json(rest).and_then(|(value, used)| match value {
        Value::Array(items) => Some((items.into_iter().map(call).collect::<Option<Vec<_>>>()?, used)),
        _ => None,
    });
    match calls {
        Some((calls, used)) => {
            let content = format!("{}{}", &text[..at], &rest[used..]);
            (content.trim().to_string(), calls)
        }
        None => (text.trim().to_string(), Vec::new()),
    }
}

fn parse_tagged(text: &str) -> (String, Vec<ToolCall>) {
    let (mut content, mut calls) = (String::new(), Vec::new());
    let mut rest = text;
    while let Some(at) = rest.find(OPEN_TAG) {
        let body = &rest[at + OPEN_TAG.len()..];
        // The JSON is read first, so that a close tag inside one of its strings does not end the
        // call; a call the generation ended inside counts once its JSON is whole.
        let parsed = leading_json(body).and_then(|(value, used)| {
            let tail = body[used..].trim_start();
            let after = if tail.is_empty() { tail } else { tail.strip_prefix(CLOSE_TAG)? };
            Some((call(value)?, after))
        });
        rest = match parsed {
            Some((c, after)) => {
                calls.push(c);
                content.push_str(&rest[..at]);
                after
            }
            None => {
                let after = body.find(CLOSE_TAG).map_or("", |end| &body[end + CLOSE_TAG.len()..]);
                content.push_str(&rest[..rest.len() - after.len()]);
                after
            }
        };
    }
    content.push_str(rest);
    (content.trim().to_string(), calls)
}
