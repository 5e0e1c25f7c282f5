//! Our logits processors against transformers' on fixed scores (tests/fixtures/sampling_reference.json).

use granite_rs::sampling::{repetition_penalty, top_k, top_p, Sampler, SamplingParams};
use serde_json::Value;

fn reference() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/sampling_reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().map_or(f32::NEG_INFINITY, |f| f as f32)).collect()
}

#[test]
fn processors_match_transformers() {
    let r = reference();
    let scores = floats(&r["scores"]);
    let context: Vec<u32> = r["context"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
    for case in r["cases"].as_array().unwrap() {
        let (name, value) = (case["name"].as_str().unwrap(), case["value"].as_f64().unwrap());
        let mut ours = scores.clone();
        match name {
            "repetition_penalty" => repetition_penalty(&mut ours, &context, value as f32),
            "temperature" => ours.iter_mut().for_each(|x| *x /= value as f32),
            "top_k" => top_k(&mut ours, value as usize),
            "top_p" => top_p(&mut ours, value as f32),
            _ => unreachable!("{name}"),
        }
        for (i, (a, b)) in ours.iter().zip(floats(&case["expected"])).enumerate() {
            let same = (a.is_infinite() && b.is_infinite()) || (a - b).abs() <= 1e-5 * b.abs().max(1.0);
            assert!(same, "{name}={value}: score {i}: ours {a}, transformers {b}");
        }
    }
}

#[test]
fn a_seed_makes_sampling_reproducible() {
    let scores: Vec<f32> = (0..100).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
    let draw = |seed| {
        let params = SamplingParams { do_sample: true, temperature: 1.5, seed: Some(seed), ..Default::default() };
        let mut sampler = Sampler::new(params).unwrap();
        (0..50).map(|_| sampler.sample(&mut scores.clone(), &[]).unwrap()).collect::<Vec<_>>()
    };
    assert_eq!(draw(1), draw(1));
    assert_ne!(draw(1), draw(2));
}

#[test]
fn greedy_takes_the_first_maximum_and_nan_is_an_error() {
    let mut sampler = Sampler::new(SamplingParams::default()).unwrap();
    assert_eq!(sampler.sample(&mut [0.5, 2.0, 2.0, -1.0], &[]).unwrap(), 1);
    assert!(sampler.sample(&mut [0.5, f32::NAN], &[]).is_err());
}

#[test]
fn top_k_one_makes_sampling_greedy() {
    let params = SamplingParams { do_sample: true, top_k: Some(1), seed: Some(0), ..Default::default() };
    let mut sampler = Sampler::new(params).unwrap();
    for _ in 0..20 {
        assert_eq!(sampler.sample(&mut [0.1, 0.3, 3.0, 2.9], &[]).unwrap(), 2);
    }
}
