//! `granite` GGUFs written by llama.cpp's own converter, convert_hf_to_gguf.py
//! (tests/fixtures/granite_gguf, made by scripts/make_granite_gguf.py), against HF transformers on
//! the HF fixtures they were converted from.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{Device, Tensor};
use granite_rs::text::tokenizer::Tokenizer;
use granite_rs::{GenerateParams, Generator, GraniteConfig, Sequence};

const CASES: [&str; 2] = ["mha_tied", "gqa_untied"];

fn fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(case)
}

fn load(case: &str) -> Generator {
    let path = fixture("granite_gguf").join(format!("{case}.gguf"));
    Generator::load(&path, &Device::Cpu, None).unwrap()
}

/// max |a - b| / max |b|
fn relative_error(a: &Tensor, b: &Tensor) -> f32 {
    let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    diff / b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn logits_and_greedy_tokens_match_transformers() {
    for case in CASES {
        let g = Arc::new(load(case));
        let r = candle_core::safetensors::load(fixture(case).join("reference.safetensors"), &Device::Cpu).unwrap();
        let ids =
            |name: &str| -> Vec<u32> { r[name].to_vec1::<i64>().unwrap().into_iter().map(|i| i as u32).collect() };
        let (prompt, greedy) = (ids("input_ids"), ids("greedy_ids"));

        let err = relative_error(&g.logits(&prompt).unwrap(), &r["logits"]);
        println!("{case:12} GGUF full-sequence logits: max abs diff / max |logit| = {err:.2e}");
        assert!(err <= 1e-4, "{case}: {err}");

        let params = GenerateParams { max_new_tokens: Some(greedy.len()), ignore_eos: true, ..Default::default() };
        let mut generation = Sequence::new(g, prompt, params).unwrap();
        generation.run().unwrap();
        assert_eq!(generation.new_tokens(), greedy.as_slice(), "{case}");
    }
}

#[test]
fn tokenizer_encodes_like_tokenizer_json() {
    let texts = [
        "The quick brown fox likes 你好 and 🦊. def main(): return 42",
        "<|start_of_role|>user<|end_of_role|>Hello!<|end_of_text|>\n<|start_of_role|>assistant<|end_of_role|>",
        "  two  spaces,\ttabs\n\nand 1234567 3.14 café naïve 🚀✨ #$%&*()[]{}<>",
        "don't it's we'll <|pad|>unknown-ish",
    ];
    for case in CASES {
        let g = load(case);
        let hf = Tokenizer::from_file(&fixture(case).join("tokenizer.json")).unwrap();
        for text in texts {
            for add_special in [false, true] {
                let ids = hf.encode(text, add_special).unwrap();
                assert_eq!(g.tokenizer().encode(text, add_special).unwrap(), ids, "{case}: {text:?}");
                assert_eq!(g.tokenizer().decode(&ids, false).unwrap(), hf.decode(&ids, false).unwrap(), "{case}");
            }
        }
    }
}

#[test]
fn config_equals_the_hf_config() {
    for case in CASES {
        let (g, hf) = (load(case), GraniteConfig::from_file(&fixture(case).join("config.json")).unwrap());
        let c = g.config();
        assert_eq!(c.model_type.as_deref(), Some("granite"));
        let shape = |c: &GraniteConfig| {
            let sizes = (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers);
            (sizes, c.num_attention_heads, c.num_kv_heads(), c.head_dim(), c.context_length())
        };
        assert_eq!(shape(c), shape(&hf), "{case}");
        let flags = |c: &GraniteConfig| (c.tie_word_embeddings, c.attention_bias, c.mlp_bias);
        assert_eq!(flags(c), flags(&hf), "{case}");
        assert_eq!(
            (c.bos_token_id, c.eos_token_ids(), c.pad_token_id),
            (hf.bos_token_id, hf.eos_token_ids(), hf.pad_token_id)
        );
        assert_eq!(c.rope().unwrap(), hf.rope().unwrap(), "{case}");
        // GGUF stores these as f32.
        let scalars = |c: &GraniteConfig| {
            [
                c.embedding_multiplier(),
                c.residual_multiplier(),
                c.attention_multiplier(),
                c.logits_scaling(),
                c.rms_norm_eps,
            ]
            .map(|v| v as f32)
        };
        assert_eq!(scalars(c), scalars(&hf), "{case}");
    }
}
