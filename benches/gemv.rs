//! The matrix kernels alone.
//! - `gemv`, decode: GiB/s of weights read for one activation row, per format, on a 16384 x 2048
//!   matrix (a Granite-2B-shaped fused gate/up): 128 MiB as f32, 64 MiB as f16/bf16 and 18-34 MiB
//!   quantized, which mostly stream from memory; the k-quants also through candle's quantized
//!   matmul, for comparison. `x8`: multiply-adds per second for 8 activation rows (a batch);
//!   `x8 int8`: the same at `Precision::Int8`.
//! - `gemm`, prompts: multiply-adds per second of a 128-token prompt against a Granite-2B-shaped
//!   up projection (8192 x 2048), per format and `Precision`.
//!
//!     cargo bench --bench gemv

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use granite_rs::kernels::cpu::{gemm, gemv, gemv_reads, Precision, Rows};
use half::{bf16, f16};

fn bench(c: &mut Criterion) {
    let (n, k) = (16384, 2048);
    let w = Tensor::randn(0f32, 0.02, (n, k), &Device::Cpu).unwrap();
    let dense: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
    let halves: Vec<f16> = dense.iter().map(|v| f16::from_f32(*v)).collect();
    let brains: Vec<bf16> = dense.iter().map(|v| bf16::from_f32(*v)).collect();
    let quantized = |t| QTensor::quantize(&w, t).unwrap();
    let blocks = [GgmlDType::Q8_0, GgmlDType::Q4_1, GgmlDType::Q4_0, GgmlDType::Q6K, GgmlDType::Q5K, GgmlDType::Q4K];
    let blocks: Vec<(GgmlDType, QTensor, Vec<u8>)> = blocks
        .into_iter()
        .map(|t| {
            let q = quantized(t);
            let bytes = q.data().unwrap().into_owned();
            (t, q, bytes)
        })
        .collect();
    let mut formats = vec![
        ("f32".to_string(), Rows::F32(&dense), dense.len() * 4),
        ("f16".to_string(), Rows::F16(&halves), halves.len() * 2),
        ("bf16".to_string(), Rows::BF16(&brains), brains.len() * 2),
    ];
    for (t, _, bytes) in &blocks {
        let rows = Rows::of(*t, bytes).or_else(|| Rows::other(*t, bytes)).unwrap();
        if gemv_reads(*t) {
            formats.push((format!("{t:?}").to_lowercase(), rows, bytes.len()));
        }
    }
    let x: Vec<f32> = Tensor::randn(0f32, 1.0, k, &Device::Cpu).unwrap().to_vec1().unwrap();
    let mut out = vec![0f32; n];
    let threads = rayon::current_num_threads();
    let mut group = c.benchmark_group("gemv");
    for (name, rows, bytes) in &formats {
        group.throughput(Throughput::Bytes(*bytes as u64));
        group.bench_function(BenchmarkId::new(name, threads), |b| {
            b.iter(|| gemv(&[(*rows, n)], k, &x, &mut out, Precision::Fast).unwrap())
        });
    }
    // Eight activation rows (a batch of decode steps): multiply-adds per second.
    let x8: Vec<f32> = Tensor::randn(0f32, 1.0, 8 * k, &Device::Cpu).unwrap().to_vec1().unwrap();
    let mut out8 = vec![0f32; 8 * n];
    for (name, rows, _) in &formats {
        group.throughput(Throughput::Elements((8 * n * k) as u64));
        group.bench_function(BenchmarkId::new(format!("{name} x8"), threads), |b| {
            b.iter(|| gemv(&[(*rows, n)], k, &x8, &mut out8, Precision::Fast).unwrap())
        });
        if matches!(rows, Rows::Q4_0(_) | Rows::Q4_1(_) | Rows::Q8_0(_)) {
            group.bench_function(BenchmarkId::new(format!("{name} x8 int8"), threads), |b| {
                b.iter(|| gemv(&[(*rows, n)], k, &x8, &mut out8, Precision::Int8).unwrap())
            });
        }
    }
    // candle's quantized matmul on the k-quants, for comparison.
    let xt = Tensor::from_vec(x.clone(), (1, k), &Device::Cpu).unwrap();
    for (t, q, bytes) in blocks.into_iter().filter(|(t, ..)| t.block_size() == 256) {
        let matmul = QMatMul::from_qtensor(q).unwrap();
        group.throughput(Throughput::Bytes(bytes.len() as u64));
        group.bench_function(BenchmarkId::new(format!("candle {t:?}").to_lowercase(), threads), |b| {
            b.iter(|| matmul.forward(&xt).unwrap())
        });
    }
    group.finish();
}

fn prompt(c: &mut Criterion) {
    let (n, k, m) = (8192, 2048, 128);
    let w = Tensor::randn(0f32, 0.02, (n, k), &Device::Cpu).unwrap();
    let brains: Vec<bf16> =
        w.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| bf16::from_f32(*v)).collect();
    let quantized = |t| QTensor::quantize(&w, t).unwrap().data().unwrap().into_owned();
    let (q4_0, q8_0, q4_k) = (quantized(GgmlDType::Q4_0), quantized(GgmlDType::Q8_0), quantized(GgmlDType::Q4K));
    let formats = [
        ("bf16", Rows::BF16(&brains)),
        ("q8_0", Rows::Q8_0(&q8_0)),
        ("q4_0", Rows::Q4_0(&q4_0)),
        ("q4_k", Rows::other(GgmlDType::Q4K, &q4_k).unwrap()),
    ];
    let x: Vec<f32> = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let mut out = vec![0f32; m * n];
    let mut group = c.benchmark_group("gemm");
    group.sample_size(10);
    group.throughput(Throughput::Elements((n * k * m) as u64));
    for (name, rows) in formats {
        for (precision_name, precision) in Precision::NAMES {
            group.bench_function(BenchmarkId::new(name, precision_name), |b| {
                b.iter(|| gemm(&[(rows, n)], k, &x, &mut out, precision, &[m]).unwrap())
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench, prompt);
criterion_main!(benches);
