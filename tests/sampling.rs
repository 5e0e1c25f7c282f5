//! Our logits processors against transformers' on fixed scores (tests/fixtures/sampling_reference.json).

use granite_rs::generation::sampling::{
    log_softmax, min_p, presence_frequency_penalty, repetition_penalty, softmax, top_k, top_p, Sampler,
};
use granite_rs::SamplingParams;
use serde_json::Value;

fn reference() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/sampling_reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().map_or(f32::NEG_INFINITY, |f| f as f32)).collect()
}

fn assert_close(ours: &[f32], theirs: &[f32], what: &str) {
    assert_eq!(ours.len(), theirs.len(), "{what}");
    for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
        let same = (a.is_infinite() && b.is_infinite() && a.signum() == b.signum())
            || (a - b).abs() <= 1e-5 * b.abs().max(1.0);
        assert!(same, "{what}: score {i}: ours {a}, transformers {b}");
    }
}

#[test]
fn processors_match_transformers() {
    let r = reference();
    let scores = floats(&r["scores"]);
    let context: Vec<u32> = r["context"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
    let mut names = vec![];
    for case in r["cases"].as_array().unwrap() {
        let (name, value) = (case["name"].as_str().unwrap(), case["value"].as_f64().unwrap());
        let mut ours = scores.clone();
        match name {
            "repetition_penalty" => repetition_penalty(&mut ours, &context, &[], value as f32),
            "temperature" => ours.iter_mut().for_each(|x| *x /= value as f32),
            "top_k" => top_k(&mut ours, value as usize),
            "top_p" => top_p(&mut ours, value as f32),
            "min_p" => min_p(&mut ours, value as f32),
            _ => unreachable!("{name}"),
        }
        assert_close(&ours, &floats(&case["expected"]), &format!("{name}={value}"));
        names.push(name);
    }
    for name in ["repetition_penalty", "temperature", "top_k", "top_p", "min_p"] {
        assert!(names.contains(&name), "the fixture has no {name} case");
    }
}

/// The whole processor list transformers' `_get_logits_processor` builds, so the order counts:
/// `sample` leaves the processed scores in `logits`.
#[test]
fn the_pipeline_matches_transformers_in_order() {
    let r = reference();
    let scores = floats(&r["scores"]);
    let context: Vec<u32> = r["context"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
    let pipelines = r["pipelines"].as_array().unwrap();
    assert!(pipelines.len() >= 4);
    for case in pipelines {
        let p = &case["params"];
        let params = SamplingParams {
            do_sample: p["do_sample"].as_bool().unwrap(),
            temperature: p["temperature"].as_f64().unwrap_or(1.0),
            top_k: p["top_k"].as_u64().map(|k| k as usize),
            top_p: p["top_p"].as_f64(),
            min_p: p["min_p"].as_f64(),
            repetition_penalty: p["repetition_penalty"].as_f64(),
            seed: Some(0),
            ..Default::default()
        };
        let mut ours = scores.clone();
        // The penalty counts the prompt and the generated tokens alike.
        let (prompt, generated) = context.split_at(2);
        let token = Sampler::new(params).unwrap().sample(&mut ours, prompt, generated).unwrap();
        let expected = floats(&case["expected"]);
        assert_close(&ours, &expected, &format!("{p} ({})", case["processors"]));
        assert!(expected[token as usize].is_finite(), "{p}: drew masked token {token}");
    }
}

/// Temperature comes before top-p: sharper scores leave fewer tokens inside p.
#[test]
fn temperature_is_applied_before_top_p() {
    let r = reference();
    let scores = floats(&r["scores"]);
    let kept = |xs: &[f32]| xs.iter().filter(|x| x.is_finite()).count();
    for t in [0.5f32, 2.0] {
        let params = SamplingParams { do_sample: true, temperature: t as f64, top_p: Some(0.9), ..Default::default() };
        let mut ours = scores.clone();
        Sampler::new(params).unwrap().sample(&mut ours, &[], &[]).unwrap();
        let mut other_order = scores.clone();
        top_p(&mut other_order, 0.9);
        other_order.iter_mut().for_each(|x| *x /= t);
        assert_ne!(kept(&ours), kept(&other_order), "temperature {t}");
    }
}

#[test]
fn presence_and_frequency_penalties_count_generated_tokens_only() {
    let logits = [1.0f32, 2.0, -1.0, 0.5, 3.0];
    let prompt = [0u32, 0, 4];
    let generated = [1u32, 1, 1, 2, 0];
    // count: token 0 once, 1 three times, 2 once; 3 and 4 (4 only in the prompt) never.
    let mut ours = logits;
    presence_frequency_penalty(&mut ours, &generated, 0.5, 0.25);
    assert_eq!(ours, [1.0 - 0.25 - 0.5, 2.0 - 0.75 - 0.5, -1.0 - 0.25 - 0.5, 0.5, 3.0]);

    // Through the sampler, greedy: the penalties apply without sampling too.
    let params = SamplingParams { presence_penalty: Some(0.5), frequency_penalty: Some(0.25), ..Default::default() };
    let mut sampler = Sampler::new(params).unwrap();
    let mut via_sampler = logits;
    assert_eq!(sampler.sample(&mut via_sampler, &prompt, &generated).unwrap(), 4);
    assert_eq!(via_sampler, ours);

    // Negative values reward repeats: token 1 ends at 2 + 0.75 + 0.5 = 3.25 > 3.
    let params = SamplingParams { presence_penalty: Some(-0.5), frequency_penalty: Some(-0.25), ..Default::default() };
    assert_eq!(Sampler::new(params).unwrap().sample(&mut logits.clone(), &prompt, &generated).unwrap(), 1);

    // Tokens in the prompt only are not penalized.
    let params = SamplingParams { presence_penalty: Some(2.0), frequency_penalty: Some(2.0), ..Default::default() };
    let mut unchanged = logits;
    Sampler::new(params).unwrap().sample(&mut unchanged, &generated, &[]).unwrap();
    assert_eq!(unchanged, logits);
}

/// Repetition penalty first (over prompt and generated), then presence and frequency.
#[test]
fn repetition_penalty_comes_before_presence_and_frequency() {
    let params = SamplingParams {
        repetition_penalty: Some(2.0),
        presence_penalty: Some(0.5),
        frequency_penalty: Some(0.5),
        ..Default::default()
    };
    let mut logits = [2.0f32, 1.0, -1.0, 0.0];
    // Token 0: generated twice. Token 2: prompt only. Token 1: never.
    Sampler::new(params).unwrap().sample(&mut logits, &[2], &[0, 0]).unwrap();
    // 2 / 2 = 1, - 0.5 * 2 = 0, - 0.5 = -0.5; the other order would give (2 - 1 - 0.5) / 2 = 0.25.
    assert_eq!(logits, [-0.5, 1.0, -2.0, 0.0]);
}

#[test]
fn min_p_keeps_tokens_relative_to_the_most_likely() {
    // probs proportional to 8, 4, 2, 1: min_p 0.25 keeps the first three (2/8 = 0.25 is kept).
    let mut logits = [8f32.ln(), 4f32.ln(), 2f32.ln(), 1f32.ln()];
    min_p(&mut logits, 0.25);
    assert!(logits[..3].iter().all(|x| x.is_finite()) && logits[3] == f32::NEG_INFINITY, "{logits:?}");
    // min_p 0 is off and min_p 1 keeps only the top tokens (ties included).
    let mut tied = [1.0f32, 3.0, 3.0, 2.0];
    min_p(&mut tied, 1.0);
    assert_eq!(tied.map(|x| x.is_finite()), [false, true, true, false]);
    let params = SamplingParams { do_sample: true, min_p: Some(0.0), seed: Some(3), ..Default::default() };
    let mut off = [1.0f32, 3.0, 3.0, 2.0];
    Sampler::new(params).unwrap().sample(&mut off, &[], &[]).unwrap();
    assert_eq!(off, [1.0, 3.0, 3.0, 2.0]);
}

#[test]
fn validation_names_the_parameter() {
    let bad = [
        (SamplingParams { min_p: Some(1.5), ..Default::default() }, "min_p"),
        (SamplingParams { min_p: Some(-0.1), ..Default::default() }, "min_p"),
        (SamplingParams { min_p: Some(f64::NAN), ..Default::default() }, "min_p"),
        (SamplingParams { presence_penalty: Some(2.5), ..Default::default() }, "presence_penalty"),
        (SamplingParams { presence_penalty: Some(f64::NAN), ..Default::default() }, "presence_penalty"),
        (SamplingParams { presence_penalty: Some(f64::INFINITY), ..Default::default() }, "presence_penalty"),
        (SamplingParams { frequency_penalty: Some(-2.01), ..Default::default() }, "frequency_penalty"),
        (SamplingParams { frequency_penalty: Some(f64::NAN), ..Default::default() }, "frequency_penalty"),
        (SamplingParams { temperature: f64::NAN, ..Default::default() }, "temperature"),
        (SamplingParams { do_sample: true, temperature: 0.0, ..Default::default() }, "temperature"),
        (SamplingParams { top_p: Some(f64::NAN), ..Default::default() }, "top_p"),
        (SamplingParams { top_p: Some(0.0), ..Default::default() }, "top_p"),
        (SamplingParams { repetition_penalty: Some(f64::NAN), ..Default::default() }, "repetition_penalty"),
        (SamplingParams { repetition_penalty: Some(0.0), ..Default::default() }, "repetition_penalty"),
    ];
    for (params, name) in bad {
        let message = params.validate().unwrap_err().to_string();
        assert!(message.contains(name), "{params:?}: {message}");
        assert!(Sampler::new(params).is_err());
    }
    let good = SamplingParams {
        do_sample: true,
        temperature: 0.7,
        top_k: Some(0),
        top_p: Some(1.0),
        min_p: Some(1.0),
        repetition_penalty: Some(1.0),
        presence_penalty: Some(-2.0),
        frequency_penalty: Some(2.0),
        seed: Some(1),
    };
    good.validate().unwrap();
    SamplingParams { min_p: Some(0.0), presence_penalty: Some(0.0), ..Default::default() }.validate().unwrap();
    let d = SamplingParams::default();
    assert_eq!((d.min_p, d.presence_penalty, d.frequency_penalty), (None, None, None));
}

#[test]
fn log_softmax_is_stable_and_matches_softmax() {
    let logits = [1000.0f32, 999.0, f32::NEG_INFINITY, -1000.0];
    let lp = log_softmax(&logits);
    assert!(lp.iter().all(|x| !x.is_nan()), "{lp:?}");
    assert!((lp[0] - -(1.0 + (-1f32).exp()).ln()).abs() < 1e-6, "{lp:?}");
    assert!((lp[1] - (lp[0] - 1.0)).abs() < 1e-5);
    assert_eq!(lp[2], f32::NEG_INFINITY);
    let small = [0.3f32, -1.2, 2.0, 0.0];
    for (l, p) in log_softmax(&small).iter().zip(softmax(&small)) {
        assert!((l.exp() - p).abs() < 1e-6);
    }
    let total: f32 = log_softmax(&small).iter().map(|x| x.exp()).sum();
    assert!((total - 1.0).abs() < 1e-6);
    assert!(log_softmax(&[f32::NEG_INFINITY; 3]).iter().all(|x| *x == f32::NEG_INFINITY));
}

#[test]
fn a_seed_makes_sampling_reproducible() {
    let scores: Vec<f32> = (0..100).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
    let draw = |seed| {
        let params = SamplingParams { do_sample: true, temperature: 1.5, seed: Some(seed), ..Default::default() };
        let mut sampler = Sampler::new(params).unwrap();
        (0..50).map(|_| sampler.sample(&mut scores.clone(), &[], &[]).unwrap()).collect::<Vec<_>>()
    };
    assert_eq!(draw(1), draw(1));
    assert_ne!(draw(1), draw(2));
}

#[test]
fn greedy_takes_the_first_maximum_and_nan_is_an_error() {
    let mut sampler = Sampler::new(SamplingParams::default()).unwrap();
    assert_eq!(sampler.sample(&mut [0.5, 2.0, 2.0, -1.0], &[], &[]).unwrap(), 1);
    assert!(sampler.sample(&mut [0.5, f32::NAN], &[], &[]).is_err());
}

#[test]
fn top_k_one_makes_sampling_greedy() {
    let params = SamplingParams { do_sample: true, top_k: Some(1), seed: Some(0), ..Default::default() };
    let mut sampler = Sampler::new(params).unwrap();
    for _ in 0..20 {
        assert_eq!(sampler.sample(&mut [0.1, 0.3, 3.0, 2.9], &[], &[]).unwrap(), 2);
    }
}

#[test]
fn non_finite_logits_and_vanishing_temperatures_are_errors() {
    use candle_core::DType;
    use granite_rs::generation::sampling::check_finite;
    assert!(check_finite(&[0.0, -1e30, 1e30], DType::F16).is_ok());
    let message = |logits: &[f32], dtype| check_finite(logits, dtype).unwrap_err().to_string();
    assert_eq!(message(&[0.0, f32::INFINITY], DType::F32), "numerical error: the model produced infinite logits");
    assert_eq!(message(&[f32::NEG_INFINITY, f32::NAN], DType::BF16), "numerical error: the model produced NaN logits");
    assert!(message(&[0.0, f32::NEG_INFINITY], DType::F16)
        .contains("the logits overflowed in float16 (infinite values); use dtype=\"float32\" or \"bfloat16\""));
    for temperature in [1e-40, 1e-300] {
        let params = SamplingParams { do_sample: true, temperature, seed: Some(0), ..Default::default() };
        let e = Sampler::new(params).unwrap().sample(&mut [0.5, 2.0, -1.0], &[], &[]).unwrap_err();
        assert!(e.to_string().contains(&format!("temperature {temperature} scales the logits past")), "{e}");
    }
}
