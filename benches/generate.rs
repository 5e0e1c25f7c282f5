//! Prefill and decode throughput on the fixture checkpoints (tiny: this measures our per-step
//! overhead, not matmul speed; issue 5 adds real-size models).
//!
//!     cargo bench --bench generate

use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use granite_rs::{GenerateParams, Generation, Generator, Logits};

fn load(case: &str) -> Arc<Generator> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(case);
    Arc::new(Generator::load(&dir, &Device::Cpu, None).expect("fixture loads"))
}

fn prefill(c: &mut Criterion) {
    let g = load("gqa_untied");
    let mut group = c.benchmark_group("prefill");
    for len in [16usize, 64] {
        let ids: Vec<u32> = (0..len as u32).map(|i| 10 + i % 300).collect();
        let input = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        group.throughput(Throughput::Elements(len as u64));
        group.bench_function(format!("{len}_tokens"), |b| {
            b.iter(|| {
                let mut cache = g.model().new_cache(1, len).unwrap();
                g.model().forward(&input, Some(&mut cache), Logits::Last).unwrap()
            })
        });
    }
    group.finish();
}

fn decode(c: &mut Criterion) {
    let g = load("gqa_untied");
    let mut group = c.benchmark_group("decode");
    let new_tokens = 64;
    group.throughput(Throughput::Elements(new_tokens as u64));
    group.bench_function(format!("{new_tokens}_tokens_greedy"), |b| {
        b.iter(|| {
            let params = GenerateParams { max_new_tokens: Some(new_tokens), ignore_eos: true, ..Default::default() };
            let mut generation = Generation::new(g.clone(), vec![1, 2, 3, 4], params).unwrap();
            while generation.next_token().unwrap().is_some() {}
        })
    });
    group.finish();
}

criterion_group!(benches, prefill, decode);
criterion_main!(benches);
