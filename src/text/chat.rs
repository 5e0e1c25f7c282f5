//! Chat templates, rendered as transformers' `apply_chat_template(..., tokenize=False)` renders them.
//!
//! transformers compiles the model's Jinja template in an `ImmutableSandboxedEnvironment` with
//! `trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension, a `tojson` filter that is
//! `json.dumps` (not Jinja's HTML-safe one), and the globals `raise_exception` and `strftime_now`.
//! We configure minijinja the same way and add Python's `str`/`dict` methods (`.strip()`,
//! `.startswith()`, `.items()`, ...) that real templates call. minijinja is a sandbox: no loader is
//! set, so a template cannot read files, and nothing from the model directory runs as code.

use std::path::Path;

use minijinja::value::{Kwargs, Serde, Value, ValueKind};
use minijinja::{AutoEscape, Environment, ErrorKind, State};
use serde::{Deserialize, Serialize};

use crate::config::read_json;
use crate::error::{Error, Result};
use crate::text::pyjson::{py_number, tojson};

/// The name errors carry, as in `(in chat_template.jinja:12)`.
const TEMPLATE_NAME: &str = "chat_template.jinja";

/// The special tokens transformers passes to every template (`special_tokens_map`), in its order.
const SPECIAL_TOKENS: [&str; 7] =
    ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"];

/// JSON objects as Python dicts: keys in insertion order.
pub type JsonMap = serde_json::Map<String, serde_json::Value>;

/// One turn of a conversation: a JSON object, usually with a `role` and a `content`. Every field
/// (`tool_calls`, `name`, `reasoning_content`, ...) reaches the template as given.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Message(pub JsonMap);

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        let mut fields = JsonMap::new();
        fields.insert("role".into(), role.into().into());
        fields.insert("content".into(), content.into().into());
        Self(fields)
    }

    /// The message as transformers hands it to the template: keys set to None dropped, and a
    /// reasoning trace under any of its names also given as `reasoning_content`, and as
    /// `thinking` (unless set), which comes first.
    fn normalized(&self) -> JsonMap {
        let mut fields: JsonMap =
            self.0.iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k.clone(), v.clone())).collect();
        let reasoning = REASONING_FIELDS.iter().find_map(|k| fields.get(*k)).cloned();
        if let Some(reasoning) = reasoning {
            let thinking = fields.shift_remove("thinking").unwrap_or_else(|| reasoning.clone());
            let mut first = JsonMap::from_iter([("thinking".to_string(), thinking)]);
            first.extend(fields);
            fields = first;
            fields.insert("reasoning_content".into(), reasoning);
        }
        fields
    }
}

/// The names a message's reasoning trace goes by, in transformers' order of preference.
const REASONING_FIELDS: [&str; 3] = ["reasoning_content", "thinking", "reasoning"];

/// The most instructions one render may run: a template from a model directory is untrusted,
/// and a loop without end must not hang the caller.
pub const TEMPLATE_FUEL: u64 = 50_000_000;

/// The most bytes a render may write.
pub const TEMPLATE_OUTPUT_BYTES: usize = 64 << 20;

/// A compiled chat template and the special tokens it is rendered with.
pub struct ChatTemplate {
    source: String,
    /// (name, token) for each special token the tokenizer config sets, e.g. ("bos_token", "<s>").
    special_tokens: Vec<(&'static str, String)>,
    env: Environment<'static>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .field("special_tokens", &self.special_tokens)
            .finish_non_exhaustive()
    }
}

/// `tokenizer_config.json`, the fields a chat template needs.
#[derive(Deserialize)]
struct TokenizerConfig {
    #[serde(default)]
    chat_template: Option<TemplateField>,
    #[serde(default)]
    bos_token: Option<TokenField>,
    #[serde(default)]
    eos_token: Option<TokenField>,
    #[serde(default)]
    unk_token: Option<TokenField>,
    #[serde(default)]
    sep_token: Option<TokenField>,
    #[serde(default)]
    pad_token: Option<TokenField>,
    #[serde(default)]
    cls_token: Option<TokenField>,
    #[serde(default)]
    mask_token: Option<TokenField>,
}

/// One template, or several by name (transformers 4.x); "default" is the one used.
#[derive(Deserialize)]
#[serde(untagged)]
enum TemplateField {
    One(String),
    Named(Vec<NamedTemplate>),
}

#[derive(Deserialize)]
struct NamedTemplate {
    name: String,
    template: String,
}

/// A special token as a string, or as a serialized `AddedToken` whose text is `content`.
#[derive(Deserialize)]
#[serde(untagged)]
enum TokenField {
    Plain(String),
    Added { content: String },
}

impl TokenField {
    fn into_string(self) -> String {
        match self {
            Self::Plain(s) | Self::Added { content: s } => s,
        }
    }
}

impl TokenizerConfig {
    fn special_tokens(self) -> Vec<(&'static str, String)> {
        let tokens = [
            self.bos_token,
            self.eos_token,
            self.unk_token,
            self.sep_token,
            self.pad_token,
            self.cls_token,
            self.mask_token,
        ];
        SPECIAL_TOKENS.into_iter().zip(tokens).filter_map(|(name, t)| Some((name, t?.into_string()))).collect()
    }
}

impl ChatTemplate {
    /// The template of an HF model directory, found where transformers looks: `chat_template.jinja`
    /// and `additional_chat_templates/*.jinja` (5.x) replace any `chat_template` in
    /// `tokenizer_config.json` (4.x); of several named templates, "default" is used.
    /// `Ok(None)` when the directory has no template.
    pub fn from_dir(dir: &Path) -> Result<Option<Self>> {
        if !dir.is_dir() {
            return Err(Error::NotFound { what: "model directory", path: dir.into() });
        }
        let config_path = dir.join("tokenizer_config.json");
        let mut config: Option<TokenizerConfig> =
            if config_path.is_file() { Some(read_json(&config_path)?) } else { None };
        let from_config = config.as_mut().and_then(|c| c.chat_template.take());
        let source = match template_files(dir)? {
            Some(named) => pick_default(named, dir)?,
            None => match from_config {
                None => return Ok(None),
                Some(TemplateField::One(s)) => s,
                Some(TemplateField::Named(list)) => {
                    let named = list.into_iter().map(|t| (t.name, t.template)).collect();
                    pick_default(named, &config_path)?
                }
            },
        };
        let special_tokens = config.map(TokenizerConfig::special_tokens).unwrap_or_default();
        Self::compile(source, special_tokens).map(Some)
    }

    /// A template from its source, with the given `bos_token` and `eos_token`.
    pub fn new(source: impl Into<String>, bos_token: Option<&str>, eos_token: Option<&str>) -> Result<Self> {
        let tokens = [("bos_token", bos_token), ("eos_token", eos_token)];
        let special_tokens = tokens.into_iter().filter_map(|(n, t)| Some((n, t?.to_string()))).collect();
        Self::compile(source.into(), special_tokens)
    }

    /// Another template with this one's special tokens, like transformers'
    /// `apply_chat_template(..., chat_template=source)`.
    pub fn with_source(&self, source: impl Into<String>) -> Result<Self> {
        Self::compile(source.into(), self.special_tokens.clone())
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.special_token("bos_token")
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.special_token("eos_token")
    }

    fn special_token(&self, name: &str) -> Option<&str> {
        self.special_tokens.iter().find(|(n, _)| *n == name).map(|(_, t)| t.as_str())
    }

    /// The conversation as the prompt text the model expects; with `add_generation_prompt`, ending in
    /// the header of an assistant turn. `vars` are the template's other variables, as transformers
    /// passes `tools=`, `documents=` and any other keyword (`tools` and `documents` are None unless
    /// given; a variable named like a special token replaces it). An error from the template (a
    /// `raise_exception`, for one, when roles do not alternate), a render past `TEMPLATE_FUEL`
    /// instructions or `TEMPLATE_OUTPUT_BYTES` bytes, or a bad variable is an `InvalidArgument`.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool, vars: &JsonMap) -> Result<String> {
        if messages.is_empty() {
            return Err(Error::invalid("cannot apply a chat template to an empty conversation"));
        }
        check_vars(vars)?;
        let messages: Vec<serde_json::Value> = messages.iter().map(|m| m.normalized().into()).collect();
        // Objects keep their key order (serde_json's and minijinja's `preserve_order`), as Python
        // dicts do for `tojson`.
        let mut ctx = JsonMap::new();
        ctx.insert("messages".into(), messages.into());
        ctx.insert("tools".into(), serde_json::Value::Null);
        ctx.insert("documents".into(), serde_json::Value::Null);
        ctx.insert("add_generation_prompt".into(), add_generation_prompt.into());
        ctx.extend(self.special_tokens.iter().map(|(n, t)| (n.to_string(), t.as_str().into())));
        ctx.extend(vars.clone());
        let template = self.env.get_template(TEMPLATE_NAME).map_err(template_error)?;
        let mut out = BoundedOutput { text: Vec::new(), full: false };
        match template.render_captured_to(Value::from(Serde(&ctx)), &mut out) {
            Ok(_) => String::from_utf8(out.text).map_err(|_| Error::invalid("chat template: the output is not UTF-8")),
            Err(_) if out.full => {
                Err(Error::invalid(format!("chat template: the output grew past {TEMPLATE_OUTPUT_BYTES} bytes")))
            }
            Err(e) if e.kind() == ErrorKind::OutOfFuel => Err(Error::invalid(format!(
                "chat template: the render ran past {TEMPLATE_FUEL} instructions (a loop without end?)"
            ))),
            Err(e) => Err(Error::invalid(format!("chat template: {}", describe(&e)))),
        }
    }

    fn compile(source: String, special_tokens: Vec<(&'static str, String)>) -> Result<Self> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(template_error)?;
        env.set_syntax(syntax);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.set_formatter(python_formatter);
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(TEMPLATE_NAME, source.clone()).map_err(template_error)?;
        Ok(Self { source, special_tokens, env })
    }
}

/// The variables a caller may not set, and those transformers requires to be lists of dicts.
fn check_vars(vars: &JsonMap) -> Result<()> {
    for name in ["messages", "add_generation_prompt"] {
        if vars.contains_key(name) {
            return Err(Error::invalid(format!("chat template variable {name:?} is set by the chat call itself")));
        }
    }
    for name in ["tools", "documents"] {
        let list = match vars.get(name) {
            None | Some(serde_json::Value::Null) => continue,
            Some(serde_json::Value::Array(list)) => list,
            Some(_) => return Err(Error::invalid(format!("{name} must be a list of dicts"))),
        };
        if let Some(i) = list.iter().position(|item| !item.is_object()) {
            return Err(Error::invalid(format!("{name}[{i}] must be a dict")));
        }
    }
    Ok(())
}

/// The render's output, refused past `TEMPLATE_OUTPUT_BYTES`.
struct BoundedOutput {
    text: Vec<u8>,
    full: bool,
}

impl std::io::Write for BoundedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.text.len() + buf.len() > TEMPLATE_OUTPUT_BYTES {
            self.full = true;
            return Err(std::io::Error::other("chat template output too large"));
        }
        self.text.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Every `*.jinja` template a 5.x directory holds, by name (`chat_template.jinja` is "default").
/// `None` when there is none, and `tokenizer_config.json` decides.
fn template_files(dir: &Path) -> Result<Option<Vec<(String, String)>>> {
    let mut named = Vec::new();
    let main = dir.join("chat_template.jinja");
    if main.is_file() {
        named.push(("default".to_string(), read_text(&main)?));
    }
    let extra_dir = dir.join("additional_chat_templates");
    if extra_dir.is_dir() {
        let entries = std::fs::read_dir(&extra_dir).map_err(|source| Error::Io { path: extra_dir.clone(), source })?;
        for entry in entries {
            let path = entry.map_err(|source| Error::Io { path: extra_dir.clone(), source })?.path();
            let name = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".jinja"));
            if let (Some(name), true) = (name, path.is_file()) {
                named.push((name.to_string(), read_text(&path)?));
            }
        }
    }
    Ok((!named.is_empty()).then_some(named))
}

/// Python's text mode: `\r\n` and `\r` read as `\n`.
fn read_text(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.into(), source })?;
    Ok(if text.contains('\r') { text.replace("\r\n", "\n").replace('\r', "\n") } else { text })
}

/// transformers takes the first template found under a name; "default" is the one rendered.
fn pick_default(named: Vec<(String, String)>, origin: &Path) -> Result<String> {
    let names: Vec<String> = named.iter().map(|(n, _)| n.clone()).collect();
    let default = named.into_iter().find(|(n, _)| n == "default").map(|(_, t)| t);
    default.ok_or_else(|| {
        Error::Tokenizer(format!("{}: chat templates {names:?} but none named \"default\"", origin.display()))
    })
}

fn template_error(e: minijinja::Error) -> Error {
    Error::Tokenizer(format!("chat template: {}", describe(&e)))
}

/// The error and its causes on one line (a function's error is wrapped by the call site's).
fn describe(e: &minijinja::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// transformers' `raise_exception(message)`: stops the render with the template's own message.
fn raise_exception(message: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

/// transformers' `strftime_now(format)`: `datetime.now().strftime(format)`, in UTC here.
fn strftime_now(state: &State, format: &str) -> std::result::Result<String, minijinja::Error> {
    // Without a `%` Python returns the format as is; datetimeformat would read "short", "iso", ... as presets.
    if !format.contains('%') {
        return Ok(format.to_string());
    }
    let kwargs = Kwargs::from_iter([("format", Value::from(format))]);
    minijinja_contrib::filters::datetimeformat(state, minijinja_contrib::globals::now(), kwargs)
}

/// Prints values as Jinja2 does under Python: `True`, `False`, `None`, floats as `repr(float)`.
fn python_formatter(
    out: &mut minijinja::Output,
    state: &mut State,
    value: &Value,
) -> std::result::Result<(), minijinja::Error> {
    match value.kind() {
        ValueKind::Bool => out.write_str(if value.is_true() { "True" } else { "False" }).map_err(write_error),
        ValueKind::None => out.write_str("None").map_err(write_error),
        ValueKind::Number if !value.is_integer() => out.write_str(&py_number(value)).map_err(write_error),
        _ => minijinja::escape_formatter(out, state, value),
    }
}

fn write_error(_: std::fmt::Error) -> minijinja::Error {
    minijinja::Error::new(ErrorKind::WriteFailure, "formatting failed")
}
