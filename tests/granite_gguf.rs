//! GGUFs written by llama.cpp's own converter, convert_hf_to_gguf.py (tests/fixtures/granite_gguf,
//! made by scripts/make_granite_gguf.py), against HF transformers on the HF fixtures they were
//! converted from: `granite`, `granitemoe` (experts, and a shared MLP), an all-attention Granite
//! 4.0 (`granite` with `head_count_kv` per layer), and a Granite 4.0-H (`granitehybrid`: Mamba2
//! and NoPE attention layers, experts).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::gguf_file::{self, Content};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use granite_rs::kernels::cpu::Precision;
use granite_rs::text::tokenizer::Tokenizer;
use granite_rs::{GenerateParams, Generator, GraniteConfig, LoadOptions, Sequence};

const CASES: [&str; 6] = ["mha_tied", "gqa_untied", "moe", "moe_shared", "hybrid_dense", "hybrid_moe"];

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
        let family = match case {
            "moe" => "granitemoe",
            "moe_shared" => "granitemoeshared",
            "hybrid_moe" => "granitemoehybrid",
            _ => "granite",
        };
        assert_eq!(c.model_type.as_deref(), Some(family), "{case}");
        assert_eq!(c.experts().unwrap(), hf.experts().unwrap(), "{case}");
        assert_eq!(c.shared_mlp_size().unwrap(), hf.shared_mlp_size().unwrap(), "{case}");
        let shape = |c: &GraniteConfig| {
            let sizes = (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers);
            (sizes, c.num_attention_heads, c.num_kv_heads(), c.head_dim())
        };
        assert_eq!(shape(c), shape(&hf), "{case}");
        // For a hybrid with NoPE attention the converter writes a context of 2^20.
        let context = if case == "hybrid_moe" { 1 << 20 } else { hf.context_length() };
        assert_eq!(c.context_length(), context, "{case}");
        let kinds = |c: &GraniteConfig| (0..c.num_hidden_layers).map(|i| c.layer_kind(i).unwrap()).collect::<Vec<_>>();
        assert_eq!((kinds(c), c.uses_rope().unwrap()), (kinds(&hf), hf.uses_rope().unwrap()), "{case}");
        if c.has_mamba().unwrap() {
            assert_eq!(c.mamba().unwrap(), hf.mamba().unwrap(), "{case}");
        }
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

/// `case`.gguf with each tensor replaced by `f(name, tensor)`, written to a temporary file named
/// after `tag`.
fn rewritten(case: &str, tag: &str, f: impl Fn(&str, QTensor) -> QTensor) -> PathBuf {
    let mut file = std::fs::File::open(fixture("granite_gguf").join(format!("{case}.gguf"))).unwrap();
    let content = Content::read(&mut file).unwrap();
    let tensors: Vec<(String, QTensor)> = content
        .tensor_infos
        .keys()
        .map(|name| (name.clone(), f(name, content.tensor(&mut file, name, &Device::Cpu).unwrap())))
        .collect();
    let metadata: Vec<(&str, &gguf_file::Value)> = content.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, q)| (n.as_str(), q)).collect();
    let path = std::env::temp_dir().join(format!("granite-rs-{case}-{}-{tag}.gguf", std::process::id()));
    gguf_file::write(&mut std::fs::File::create(&path).unwrap(), &metadata, &tensors).unwrap();
    path
}

/// `q`'s values, stored as `format`.
fn stored_as(q: &QTensor, format: GgmlDType) -> QTensor {
    QTensor::quantize(&q.dequantize(&Device::Cpu).unwrap(), format).unwrap()
}

#[test]
fn a_mamba_decay_that_is_not_negative_is_an_error() {
    let path = rewritten("hybrid_moe", "positive-a", |name, q| match name {
        "blk.0.ssm_a" => {
            QTensor::quantize(&q.dequantize(&Device::Cpu).unwrap().abs().unwrap(), GgmlDType::F32).unwrap()
        }
        _ => q,
    });
    let err = Generator::load(&path, &Device::Cpu, None).err().expect("a positive A loads");
    std::fs::remove_file(path).unwrap();
    assert!(err.to_string().contains("tensor `blk.0.ssm_a` (A = -exp(A_log)) must be negative"), "{err}");
}

/// moe.gguf with its expert stacks stored as `format`, or (`dequantized`) as f32 holding the
/// values they have in `format`; the other tensors as they are.
fn moe_with_experts(format: GgmlDType, dequantized: bool) -> PathBuf {
    rewritten("moe", &format!("{format:?}-{dequantized}"), |name, q| match name.ends_with("_exps.weight") {
        false => q,
        true if dequantized => stored_as(&stored_as(&q, format), GgmlDType::F32),
        true => stored_as(&q, format),
    })
}

#[test]
fn quantized_expert_stacks_load_as_their_experts() {
    // Q8_0 experts are read in place; Q5_1 ones are split into a matrix per expert at load.
    for format in [GgmlDType::Q8_0, GgmlDType::Q5_1] {
        let opts = LoadOptions { precision: Precision::Exact, ..Default::default() };
        let load = |dequantized| {
            let path = moe_with_experts(format, dequantized);
            let g = Generator::load_with(&path, &Device::Cpu, &opts).unwrap();
            std::fs::remove_file(path).unwrap();
            g
        };
        let (quantized, values) = (load(false), load(true));
        let formats = |g: &Generator| g.model().matrices().iter().filter_map(|w| w.stored_type()).collect::<Vec<_>>();
        // Per layer and expert: gate and up (one matrix where they lie together in place) and down.
        let experts = formats(&quantized).into_iter().filter(|t| *t == format).count();
        assert!(experts >= 2 * 4 * 2, "{format:?}: {experts} expert matrices");
        assert!(!formats(&values).contains(&format));
        let prompt: Vec<u32> = (5..40).collect();
        let err = relative_error(&quantized.logits(&prompt).unwrap(), &values.logits(&prompt).unwrap());
        // Rows routed to an expert in fours or fewer go through gemv, which rounds the activations
        // of block types to 16 bits.
        assert!(err <= 1e-3, "{format:?}: {err}");
    }
}
