//! Chat templates, rendered as transformers' `apply_chat_template(..., tokenize=False)` renders them.
//!
//! transformers compiles the model's Jinja template in an `ImmutableSandboxedEnvironment` with
//! `trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension, a `tojson` filter that is
//! `json.dumps` (not Jinja's HTML-safe one), and the globals `raise_exception` and `strftime_now`.
//! We configure minijinja the same way and add Python's `str`/`dict` methods (`.strip()`,
//! `.startswith()`, `.items()`, ...) that real templates call. minijinja is a sandbox: no loader is
//! set, so a template cannot read files, and nothing from the model directory runs as code.

use std::path::Path;

use minijinja::value::{Kwargs, Value, ValueKind};
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

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into() }
    }
}

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
    /// the header of an assistant turn. An error from the template (a `raise_exception`, for one,
    /// when roles do not alternate) is an `InvalidArgument` carrying its message.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        if messages.is_empty() {
            return Err(Error::invalid("cannot apply a chat template to an empty conversation"));
        }
        // Maps keep insertion order (minijinja's `preserve_order`), as Python dicts do for `tojson`.
        let messages: Value = messages
            .iter()
            .map(|m| Value::from_pairs([("role", m.role.as_str()), ("content", m.content.as_str())]))
            .collect();
        let mut ctx: Vec<(&str, Value)> = vec![
            ("messages", messages),
            ("add_generation_prompt", Value::from(add_generation_prompt)),
            ("tools", Value::from(())),
            ("documents", Value::from(())),
        ];
        ctx.extend(self.special_tokens.iter().map(|(n, t)| (*n, Value::from(t.as_str()))));
        let template = self.env.get_template(TEMPLATE_NAME).map_err(template_error)?;
        template.render(Value::from_pairs(ctx)).map_err(|e| Error::invalid(format!("chat template: {}", describe(&e))))
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
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(TEMPLATE_NAME, source.clone()).map_err(template_error)?;
        Ok(Self { source, special_tokens, env })
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
