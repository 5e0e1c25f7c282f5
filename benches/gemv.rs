//! The matrix kernels alone.
//! - `gemv`, decode: GiB/s of weights read for one activation row, per format, on a 27648 x 576
//!   matrix (SmolLM2's MLP six times over). That is 64 MiB as f32, which streams from memory;
//!   32 MiB as f16/bf16 and 10-18 MiB quantized, which partly stay in a 32 MiB L3 cache between
//!   iterations, so those figures show the kernels' compute speed more than the memory's.
//! - `gemm`, prompts: multiply-adds per second of a 128-token prompt against a Granite-2B-shaped
//!   up projection (8192 x 2048), per format and `Precision`.
//!
//!     cargo bench --bench gemv

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use granite_rs::kernels::cpu::{gemm, gemv, Precision, Rows};
use half::{bf16, f16};

fn bench(c: &mut Criterion) {
    let (n, k) = (4608 * 6, 576);
    let w = Tensor::randn(0f32, 0.02, (n, k), &Device::Cpu).unwrap();
    let dense: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
    let halves: Vec<f16> = dense.iter().map(|v| f16::from_f32(*v)).collect();
    let brains: Vec<bf16> = dense.iter().map(|v| bf16::from_f32(*v)).collect();
    let quantized = |t| QTensor::quantize(&w, t).unwrap().data().unwrap().into_owned();
    let (q4_0, q4_1, q8_0) = (quantized(GgmlDType::Q4_0), quantized(GgmlDType::Q4_1), quantized(GgmlDType::Q8_0));
    let formats = [
        ("f32", Rows::F32(&dense), dense.len() * 4),
        ("f16", Rows::F16(&halves), halves.len() * 2),
        ("bf16", Rows::BF16(&brains), brains.len() * 2),
        ("q8_0", Rows::Q8_0(&q8_0), q8_0.len()),
        ("q4_1", Rows::Q4_1(&q4_1), q4_1.len()),
        ("q4_0", Rows::Q4_0(&q4_0), q4_0.len()),
    ];
    let x: Vec<f32> = Tensor::randn(0f32, 1.0, k, &Device::Cpu).unwrap().to_vec1().unwrap();
    let mut out = vec![0f32; n];
    let mut group = c.benchmark_group("gemv");
    for (name, rows, bytes) in formats {
        group.throughput(Throughput::Bytes(bytes as u64));
        group.bench_function(BenchmarkId::new(name, rayon::current_num_threads()), |b| {
            b.iter(|| gemv(&[(rows, n)], k, &x, &mut out).unwrap())
        });
    }
    group.finish();
}

fn prompt(c: &mut Criterion) {
    let (n, k, m) = (8192, 2048, 128);
    let w = Tensor::randn(0f32, 0.02, (n, k), &Device::Cpu).unwrap();
    let brains: Vec<bf16> = w.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| bf16::from_f32(*v)).collect();
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
                b.iter(|| gemm(&[(rows, n)], k, &x, &mut out, precision).unwrap())
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench, prompt);
criterion_main!(benches);
