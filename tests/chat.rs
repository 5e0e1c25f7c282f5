//! Chat templates against transformers' `apply_chat_template(..., tokenize=False)`
//! (tests/fixtures/chat_reference.json, written by scripts/make_fixtures.py --only chat).

use std::path::{Path, PathBuf};

use granite_rs::text::chat::{ChatTemplate, JsonMap, Message};
use granite_rs::Error;
use serde::Deserialize;

#[derive(Deserialize)]
struct Reference {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    /// `None`: the fixture directory's own template.
    template: Option<String>,
    fixture: String,
    messages: Vec<Message>,
    add_generation_prompt: bool,
    /// transformers' `tools=`, `documents=` and other keywords.
    #[serde(default)]
    variables: JsonMap,
    expected: String,
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn reference() -> Reference {
    let text = std::fs::read_to_string(fixture("chat_reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A fresh empty directory, removed when dropped.
fn temp_dir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

fn user(content: &str) -> Message {
    Message::new("user", content)
}

#[test]
fn every_case_renders_as_transformers_does() {
    let reference = reference();
    assert!(reference.cases.len() >= 40);
    let mut failures = Vec::new();
    for (i, case) in reference.cases.iter().enumerate() {
        let own = ChatTemplate::from_dir(&fixture(&case.fixture)).unwrap().expect("fixture has a template");
        let template = match &case.template {
            Some(source) => own.with_source(source.as_str()).unwrap(),
            None => own,
        };
        let ours = template.render(&case.messages, case.add_generation_prompt, &case.variables).unwrap();
        if ours != case.expected {
            failures.push(format!(
                "case {i} ({}, add_generation_prompt={}):\n ours:         {ours:?}\n transformers: {:?}",
                case.fixture, case.add_generation_prompt, case.expected
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ:\n{}",
        failures.len(),
        reference.cases.len(),
        failures.join("\n")
    );
}

#[test]
fn both_layouts_load_with_special_tokens() {
    for name in ["mha_tied", "gqa_untied"] {
        let t = ChatTemplate::from_dir(&fixture(name)).unwrap().unwrap();
        assert!(t.source().contains("<|start_of_role|>"), "{name}");
        assert_eq!(t.bos_token(), Some("<|end_of_text|>"), "{name}");
        assert_eq!(t.eos_token(), Some("<|end_of_text|>"), "{name}");
    }
}

#[test]
fn raise_exception_is_an_error_naming_its_message() {
    let t = ChatTemplate::new(
        "{% if messages[0]['role'] != 'system' %}{{ raise_exception('Only system roles may open: got ' + messages[0]['role']) }}{% endif %}",
        None,
        None,
    )
    .unwrap();
    let err = t.render(&[user("hi")], true, &JsonMap::new()).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
    assert!(err.to_string().contains("Only system roles may open: got user"), "{err}");
}

#[test]
fn alternation_check_of_a_realistic_template_fails_cleanly() {
    let case = reference().cases.into_iter().find(|c| c.template.as_deref().is_some_and(|s| s.contains("alternate")));
    let source = case.unwrap().template.unwrap();
    let t = ChatTemplate::new(source, Some("<s>"), Some("</s>")).unwrap();
    let err = t.render(&[user("one"), user("two")], false, &JsonMap::new()).unwrap_err();
    assert!(err.to_string().contains("Conversation roles must alternate"), "{err}");
}

#[test]
fn a_directory_without_a_template_is_none() {
    let empty = temp_dir();
    assert!(ChatTemplate::from_dir(empty.path()).unwrap().is_none());

    let config_only = temp_dir();
    std::fs::write(config_only.path().join("tokenizer_config.json"), r#"{"bos_token": "<s>", "chat_template": null}"#)
        .unwrap();
    assert!(ChatTemplate::from_dir(config_only.path()).unwrap().is_none());

    let missing = empty.path().join("missing");
    assert!(matches!(ChatTemplate::from_dir(&missing), Err(Error::NotFound { .. })));
}

#[test]
fn named_templates_and_added_token_objects() {
    // transformers 4.x: a list of {name, template}; special tokens serialized as AddedToken objects.
    let dir = temp_dir();
    let config = r#"{
        "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": false, "special": true},
        "eos_token": "</s>",
        "chat_template": [
            {"name": "tool_use", "template": "tools"},
            {"name": "default", "template": "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}"}
        ]
    }"#;
    std::fs::write(dir.path().join("tokenizer_config.json"), config).unwrap();
    let t = ChatTemplate::from_dir(dir.path()).unwrap().unwrap();
    assert_eq!(t.render(&[user("hi")], false, &JsonMap::new()).unwrap(), "<s>hi</s>");

    // A chat_template.jinja (5.x) wins over tokenizer_config.json; Python reads \r\n as \n.
    std::fs::write(dir.path().join("chat_template.jinja"), "{{ messages[0].content }}\r\n!\r\n").unwrap();
    let t = ChatTemplate::from_dir(dir.path()).unwrap().unwrap();
    assert_eq!(t.source(), "{{ messages[0].content }}\n!\n");
    assert_eq!(t.render(&[user("hi")], false, &JsonMap::new()).unwrap(), "hi\n!");
    assert_eq!(t.bos_token(), Some("<s>"));

    // Only non-default templates: nothing transformers could render by default.
    let dir = temp_dir();
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"chat_template": [{"name": "rag", "template": "x"}]}"#,
    )
    .unwrap();
    let err = ChatTemplate::from_dir(dir.path()).unwrap_err();
    assert!(err.to_string().contains("\"rag\""), "{err}");
}

#[test]
fn additional_chat_templates_directory() {
    let dir = temp_dir();
    std::fs::write(dir.path().join("tokenizer_config.json"), r#"{"chat_template": "from config"}"#).unwrap();
    std::fs::create_dir(dir.path().join("additional_chat_templates")).unwrap();
    std::fs::write(dir.path().join("additional_chat_templates/default.jinja"), "from file").unwrap();
    let t = ChatTemplate::from_dir(dir.path()).unwrap().unwrap();
    assert_eq!(t.render(&[user("hi")], false, &JsonMap::new()).unwrap(), "from file");
}

#[test]
fn a_syntax_error_fails_at_load_with_its_line() {
    let dir = temp_dir();
    std::fs::write(dir.path().join("chat_template.jinja"), "ok\n{% for m in messages %}{{ m.content }}").unwrap();
    let err = ChatTemplate::from_dir(dir.path()).unwrap_err();
    assert!(matches!(err, Error::Tokenizer(_)), "{err:?}");
    assert!(err.to_string().contains("chat_template.jinja:2"), "{err}");
}

#[test]
fn an_empty_conversation_is_invalid() {
    let t = ChatTemplate::new("{{ messages | length }}", None, None).unwrap();
    assert!(matches!(t.render(&[], true, &JsonMap::new()), Err(Error::InvalidArgument(_))));
}

#[test]
fn strftime_now_formats_the_current_date() {
    let t = ChatTemplate::new(
        "{{ strftime_now('%Y-%m-%d') }}|{{ strftime_now('%B %d, %Y') }}|{{ strftime_now('iso') }}",
        None,
        None,
    )
    .unwrap();
    let out = t.render(&[user("hi")], false, &JsonMap::new()).unwrap();
    let parts: Vec<&str> = out.split('|').collect();
    let ymd = parts[0].as_bytes();
    assert_eq!(ymd.len(), 10, "{out}");
    assert!(
        ymd.iter().enumerate().all(|(i, c)| if i == 4 || i == 7 { *c == b'-' } else { c.is_ascii_digit() }),
        "{out}"
    );
    assert!(parts[1].ends_with(&format!(", {}", &parts[0][..4])), "{out}");
    assert_eq!(parts[2], "iso", "a format without % comes back as it is, as in Python");
}

#[test]
fn templates_cannot_reach_files() {
    // No loader: include/import/extends find nothing, so a template reads no file.
    for source in ["{% include '/etc/passwd' %}", "{% import 'tokenizer_config.json' as x %}"] {
        let t = ChatTemplate::new(source, None, None).unwrap();
        assert!(t.render(&[user("hi")], false, &JsonMap::new()).is_err(), "{source}");
    }
}

// A template (and the model that holds one) can be shared across threads: checked when compiling.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<ChatTemplate>();
    send_sync::<granite_rs::Generator>();
};

#[test]
fn a_template_that_loops_without_end_is_stopped() {
    let source = "{% for a in range(100000) %}{% for b in range(100000) %}{% for c in range(100000) %}\
                  {% endfor %}{% endfor %}{% endfor %}";
    let t = ChatTemplate::new(source, None, None).unwrap();
    let start = std::time::Instant::now();
    let err = t.render(&[user("hi")], true, &JsonMap::new()).unwrap_err();
    assert!(matches!(&err, Error::InvalidArgument(m) if m.contains("instructions")), "{err}");
    assert!(start.elapsed().as_secs_f64() < 30.0, "{:?}", start.elapsed());
}

#[test]
fn a_template_whose_output_grows_without_end_is_stopped() {
    let source = "{% for a in range(100000) %}{{ 'x' * 1000000 }}{% endfor %}";
    let t = ChatTemplate::new(source, None, None).unwrap();
    let err = t.render(&[user("hi")], true, &JsonMap::new()).unwrap_err();
    assert!(matches!(&err, Error::InvalidArgument(m) if m.contains("bytes")), "{err}");
}

#[test]
fn variables_are_checked() {
    let t = ChatTemplate::new("{{ tools }}", None, None).unwrap();
    let vars = |json: &str| -> JsonMap { serde_json::from_str(json).unwrap() };
    let render = |json: &str| t.render(&[user("hi")], true, &vars(json));
    assert_eq!(render(r#"{"tools": null}"#).unwrap(), "None");
    for (bad, needle) in [
        (r#"{"tools": {"name": "f"}}"#, "tools must be a list"),
        (r#"{"tools": [1]}"#, "tools[0] must be a dict"),
        (r#"{"documents": [{"text": "a"}, "b"]}"#, "documents[1] must be a dict"),
        (r#"{"messages": []}"#, "\"messages\" is set by the chat call"),
        (r#"{"add_generation_prompt": false}"#, "\"add_generation_prompt\""),
    ] {
        let err = render(bad).unwrap_err();
        assert!(matches!(&err, Error::InvalidArgument(m) if m.contains(needle)), "{bad}: {err}");
    }
}
