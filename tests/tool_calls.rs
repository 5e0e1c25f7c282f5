//! Tool calls read from a model's text, and the grammars that constrain them.

use granite_rs::text::tool_calls::{ToolCall, ToolChoice, ToolFormat};
use serde_json::json;

fn calls(pairs: &[(&str, serde_json::Value)]) -> Vec<ToolCall> {
    pairs
        .iter()
        .map(|(name, args)| ToolCall { name: name.to_string(), arguments: args.as_object().unwrap().clone() })
        .collect()
}

#[test]
fn the_format_follows_the_template() {
    assert_eq!(ToolFormat::of_template("{{ '<|tool_call|>' }}"), ToolFormat::List);
    assert_eq!(ToolFormat::of_template("<tool_call>{{ x }}</tool_call>"), ToolFormat::Tagged);
    assert_eq!(ToolFormat::of_template("no tools here"), ToolFormat::Tagged);
}

#[test]
fn granite_3_lists() {
    let text = r#"Let me check.<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "now", "arguments": "{}"}]"#;
    let (content, found) = ToolFormat::List.parse(text);
    assert_eq!(content, "Let me check.");
    assert_eq!(found, calls(&[("get_weather", json!({"city": "Paris"})), ("now", json!({}))]));
    // Not a list of calls: all of it is text.
    for text in ["<|tool_call|>[{\"nom\": 1}]", "<|tool_call|>[{\"name\": \"f\"", "plain text"] {
        assert_eq!(ToolFormat::List.parse(text), (text.to_string(), vec![]), "{text}");
    }
}

#[test]
fn tagged_calls() {
    let text = "Sure.\n<tool_call>\n{\"name\": \"a\", \"arguments\": {\"x\": 1}}\n</tool_call>\n<tool_call>\n{\"name\": \"b\", \"parameters\": {\"y\": [2]}}\n</tool_call>";
    let (content, found) = ToolFormat::Tagged.parse(text);
    assert_eq!(content, "Sure.");
    assert_eq!(found, calls(&[("a", json!({"x": 1})), ("b", json!({"y": [2]}))]));
    // Ended inside the closing tag: the JSON is whole, so it counts.
    let (content, found) = ToolFormat::Tagged.parse("<tool_call>{\"name\": \"a\", \"arguments\": {}}");
    assert_eq!((content.as_str(), found), ("", calls(&[("a", json!({}))])));
    // A close tag inside a string of the arguments is the string's.
    let text = "<tool_call>\n{\"name\": \"a\", \"arguments\": {\"q\": \"x</tool_call>y\"}}\n</tool_call> after";
    let (content, found) = ToolFormat::Tagged.parse(text);
    assert_eq!((content.as_str(), found), ("after", calls(&[("a", json!({"q": "x</tool_call>y"}))])));
    // Broken JSON, or more than one value, stays text.
    for text in ["<tool_call>{\"name\": </tool_call>", "<tool_call>{\"name\": \"a\"} {}</tool_call> after"] {
        assert_eq!(ToolFormat::Tagged.parse(text).1, vec![], "{text}");
        assert_eq!(ToolFormat::Tagged.parse(text).0, text.trim(), "{text}");
    }
}

#[test]
fn grammars_name_the_allowed_functions() {
    let tools = [
        json!({"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"n": {"type": "integer"}}}}}),
        json!({"name": "g"}),
    ];
    let lark = ToolFormat::Tagged.grammar(&tools, &ToolChoice::Required, |_| false).unwrap();
    assert!(
        lark.contains("\"<tool_call>\"") && lark.contains("\"const\":\"f\"") && lark.contains("\"const\":\"g\""),
        "{lark}"
    );
    let lark = ToolFormat::List.grammar(&tools, &ToolChoice::Function("g".into()), |m| m == "<|tool_call|>").unwrap();
    assert!(lark.starts_with("start: <|tool_call|> calls") && !lark.contains("\"const\":\"f\""), "{lark}");
    let err = ToolFormat::List.grammar(&tools, &ToolChoice::Function("h".into()), |_| false).unwrap_err();
    assert!(err.to_string().contains("\"h\", which is not among tools [\"f\", \"g\"]"), "{err}");
    assert!(ToolFormat::List.grammar(&[], &ToolChoice::Required, |_| false).is_err());
    assert!(ToolFormat::List.grammar(&[json!({"description": "x"})], &ToolChoice::Required, |_| false).is_err());
}
