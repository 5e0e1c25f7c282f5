//! Logits and greedy tokens against HF transformers' GraniteForCausalLM, GraniteMoeForCausalLM,
//! GraniteMoeSharedForCausalLM and GraniteMoeHybridForCausalLM, attention-only and with Mamba2
//! layers (tests/fixtures, made by scripts/make_fixtures.py).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use granite_rs::kernels::cpu::Precision;
use granite_rs::loading::safetensors::Weights;
use granite_rs::{ForwardOptions, Granite, GraniteConfig, Logits, Span};

const CASES: [&str; 14] = [
    "mha_tied",
    "gqa_untied",
    "mqa_bias",
    "rope_linear",
    "rope_dynamic",
    "bf16",
    "sharded",
    "llama_like",
    "moe",
    "moe_shared",
    "hybrid_dense",
    "hybrid_nope",
    "hybrid_moe",
    "hybrid_mamba",
];

fn fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(case)
}

struct Reference {
    input_ids: Vec<u32>,
    logits: Tensor,
    greedy_ids: Vec<u32>,
    step_logits: Tensor,
}

fn reference(case: &str) -> Reference {
    let r = candle_core::safetensors::load(fixture(case).join("reference.safetensors"), &Device::Cpu).unwrap();
    let ids = |name: &str| r[name].to_vec1::<i64>().unwrap().into_iter().map(|i| i as u32).collect();
    Reference {
        input_ids: ids("input_ids"),
        logits: r["logits"].clone(),
        greedy_ids: ids("greedy_ids"),
        step_logits: r["step_logits"].clone(),
    }
}

/// The fixture with exact products (`Precision::Exact`: f32 activations, as the references were
/// computed); the bf16 kernels' rounding is tested against their own references.
fn load(case: &str, dtype: DType) -> Granite {
    let dir = fixture(case);
    let cfg = GraniteConfig::from_file(&dir.join("config.json")).unwrap();
    let weights = Weights::from_dir(&dir, dtype, &Device::Cpu).unwrap().with_precision(Precision::Exact);
    Granite::load(&cfg, &weights, dtype, &Device::Cpu, None).unwrap()
}

/// max |a - b| / max |b|
fn relative_error(a: &Tensor, b: &Tensor) -> f32 {
    let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    diff / b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

fn row(ids: &[u32]) -> Tensor {
    Tensor::new(ids, &Device::Cpu).unwrap().unsqueeze(0).unwrap()
}

#[test]
fn full_sequence_logits_match_transformers() {
    for case in CASES {
        let (model, r) = (load(case, DType::F32), reference(case));
        let logits = model.forward(&row(&r.input_ids), None, Logits::All).unwrap().squeeze(0).unwrap();
        let err = relative_error(&logits, &r.logits);
        println!("{case:12} full-sequence logits: max abs diff / max |logit| = {err:.2e}");
        assert!(err <= 1e-4, "{case}: {err}");
    }
}

#[test]
fn cached_greedy_decoding_matches_transformers() {
    for case in CASES {
        let (model, r) = (load(case, DType::F32), reference(case));
        let mut cache = model.new_cache();
        let mut input = r.input_ids.clone();
        let mut steps = Vec::new();
        let mut tokens = Vec::new();
        for _ in 0..r.greedy_ids.len() {
            let logits = model.forward(&row(&input), Some(&mut cache), Logits::Last).unwrap().flatten_all().unwrap();
            let next = logits.argmax(0).unwrap().to_scalar::<u32>().unwrap();
            steps.push(logits);
            tokens.push(next);
            input = vec![next];
        }
        let err = relative_error(&Tensor::stack(&steps, 0).unwrap(), &r.step_logits);
        println!("{case:12} cached step logits: max abs diff / max |logit| = {err:.2e}");
        assert!(err <= 1e-4, "{case}: {err}");
        assert_eq!(tokens, r.greedy_ids, "{case}");
    }
}

/// Without dynamic RoPE, and without a time-step clamp that binds (transformers clamps a prompt's
/// Δ, not a decode step's: `hybrid_mamba`), the cached path computes the same function as one
/// full forward; for Mamba2 layers, the state carried from step to step.
#[test]
fn cached_logits_equal_uncached() {
    for case in CASES.iter().filter(|c| !["rope_dynamic", "hybrid_mamba"].contains(c)) {
        let (model, r) = (load(case, DType::F32), reference(case));
        let ids = &r.input_ids;
        let full = model.forward(&row(ids), None, Logits::All).unwrap().squeeze(0).unwrap();
        let mut cache = model.new_cache();
        // Another sequence takes a block between each of this one's: its slots are scattered.
        let mut other = model.new_cache();
        let split = ids.len() / 2;
        let mut parts = vec![model.forward(&row(&ids[..split]), Some(&mut cache), Logits::All).unwrap()];
        for id in &ids[split..] {
            other.reserve(1).unwrap();
            other.append(&vec![0; other.capacity() - other.len()], false);
            parts.push(model.forward(&row(&[*id]), Some(&mut cache), Logits::All).unwrap());
        }
        let stepped = Tensor::cat(&parts, 1).unwrap().squeeze(0).unwrap();
        let err = relative_error(&stepped, &full);
        assert!(err <= 1e-5, "{case}: {err}");
    }
}

#[test]
fn bf16_and_f16_compute_stay_close() {
    for dtype in [DType::BF16, DType::F16] {
        let (model, r) = (load("mha_tied", dtype), reference("mha_tied"));
        let logits = model.forward(&row(&r.input_ids), None, Logits::All).unwrap().squeeze(0).unwrap();
        let err = relative_error(&logits, &r.logits);
        println!("{dtype:?} compute: max abs diff / max |logit| = {err:.2e}");
        assert!(err <= 5e-2, "{dtype:?}: {err}");
    }
}

/// Spans packed into one forward give, bit for bit, what each gives alone: prompts longer and
/// shorter than a decode batch, one-token steps and a few tokens over cached prefixes, with the
/// exact and the default (bf16 where the CPU has it) prompt products.
#[test]
fn packed_spans_equal_each_alone() {
    for case in CASES {
        for precision in [Precision::Exact, Precision::Fast] {
            let dir = fixture(case);
            let cfg = GraniteConfig::from_file(&dir.join("config.json")).unwrap();
            let weights = Weights::from_dir(&dir, DType::F32, &Device::Cpu).unwrap().with_precision(precision);
            let model = Granite::load(&cfg, &weights, DType::F32, &Device::Cpu, None).unwrap();
            let ids = reference(case).input_ids;
            let n = ids.len();
            assert!(n >= 12, "{case}: the reference prompt has {n} tokens");
            // (cached prefix, span, which logits)
            let seqs: Vec<(&[u32], &[u32], Logits)> = vec![
                (&[], &ids, Logits::All),
                (&ids[..n - 1], &ids[n - 1..], Logits::Last),
                (&[], &ids[..3], Logits::Last),
                (&ids[..4], &ids[4..9], Logits::All),
                (&ids[..2], &ids[2..], Logits::Last),
                (&ids[..7], &ids[7..8], Logits::All),
            ];
            let prefilled = |prefix: &[u32]| {
                let mut cache = model.new_cache();
                if !prefix.is_empty() {
                    model.forward(&row(prefix), Some(&mut cache), Logits::Last).unwrap();
                }
                cache
            };
            let alone: Vec<Tensor> = seqs
                .iter()
                .map(|(prefix, span, which)| {
                    let mut cache = prefilled(prefix);
                    model.forward(&row(span), Some(&mut cache), *which).unwrap().squeeze(0).unwrap()
                })
                .collect();
            let mut caches: Vec<_> = seqs.iter().map(|(prefix, _, _)| prefilled(prefix)).collect();
            let mut spans: Vec<Span> = seqs
                .iter()
                .zip(&mut caches)
                .map(|((_, tokens, logits), cache)| Span { tokens, as_prompt: false, cache: Some(cache), logits: *logits })
                .collect();
            let packed = model.forward_spans(&mut spans, &ForwardOptions::default()).unwrap();
            for (i, (a, p)) in alone.iter().zip(&packed).enumerate() {
                let diff = (a - p).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert_eq!(diff, 0.0, "{case}, {precision:?}: span {i} differs by {diff}");
            }
            for ((prefix, span, _), cache) in seqs.iter().zip(&caches) {
                assert_eq!(cache.len(), prefix.len() + span.len(), "{case}: the caches advance");
            }
        }
    }
}
