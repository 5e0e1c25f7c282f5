//! The decode matrix-vector kernels and `Linear` against candle's matmul on the same weights
//! (dequantized where they are quantized), for every format and a range of shapes. The quantized
//! formats round the activations to 15 or 16 bits per group of 32 (8 at `Precision::Int8`).

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use granite_rs::kernels::cpu::{gemv, gemv_reads, Precision, Rows};
use granite_rs::loading::mapped::{self, Mapped};
use granite_rs::loading::weight::Weight;
use granite_rs::model::linear::{Linear, PackedRows};

fn random(shape: (usize, usize), seed: u64) -> Tensor {
    // Deterministic values in [-1, 1) without a RNG dependency: a multiplicative hash.
    let n = shape.0 * shape.1;
    let v: Vec<f32> =
        (0..n as u64).map(|i| ((i.wrapping_add(seed).wrapping_mul(2654435761) % 2000) as f32 / 1000.0) - 1.0).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn max_rel_err(got: &Tensor, want: &Tensor) -> f32 {
    let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1e-6);
    diff / scale
}

fn reference(x: &Tensor, w: &Tensor) -> Tensor {
    x.matmul(&w.t().unwrap()).unwrap()
}

#[test]
fn dense_formats_match_matmul() {
    for (n, k) in [(1, 32), (7, 64), (96, 576), (1536, 576), (300, 1024)] {
        let w = random((n, k), 1);
        for m in [1, 2, 3, 4, 5, 8] {
            let x = random((m, k), 7 + m as u64);
            for dtype in [DType::F32, DType::F16, DType::BF16] {
                let wd = w.to_dtype(dtype).unwrap();
                let want = reference(&x, &wd.to_dtype(DType::F32).unwrap());
                let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
                let mut out = vec![0f32; m * n];
                match dtype {
                    DType::F32 => gemv(
                        &[(Rows::F32(&wd.flatten_all().unwrap().to_vec1().unwrap()), n)],
                        k,
                        &xs,
                        &mut out,
                        Precision::Fast,
                    ),
                    DType::F16 => gemv(
                        &[(Rows::F16(&wd.flatten_all().unwrap().to_vec1().unwrap()), n)],
                        k,
                        &xs,
                        &mut out,
                        Precision::Fast,
                    ),
                    _ => gemv(
                        &[(Rows::BF16(&wd.flatten_all().unwrap().to_vec1().unwrap()), n)],
                        k,
                        &xs,
                        &mut out,
                        Precision::Fast,
                    ),
                }
                .unwrap();
                let got = Tensor::from_vec(out, (m, n), &Device::Cpu).unwrap();
                let err = max_rel_err(&got, &want);
                assert!(err < 1e-5, "{dtype:?} {m}x{k} by {n}x{k}: relative error {err}");
            }
        }
    }
}

#[test]
fn quantized_formats_match_their_dequantized_weights() {
    for (n, k) in [(1, 32), (96, 576), (1536, 576), (257, 1024)] {
        let w = random((n, k), 3);
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let q = QTensor::quantize(&w, dtype).unwrap();
            let deq = q.dequantize(&Device::Cpu).unwrap();
            let data = q.data().unwrap();
            let rows = match dtype {
                GgmlDType::Q4_0 => Rows::Q4_0(&data),
                GgmlDType::Q4_1 => Rows::Q4_1(&data),
                _ => Rows::Q8_0(&data),
            };
            for m in [1, 3, 4, 6, 9] {
                let x = random((m, k), 11 + m as u64);
                let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
                // Activations rounded to 15 bits per 32 (16 without AVX512-VNNI); at Int8 to 8
                // bits on AVX512-VNNI.
                for (precision, tolerance) in [(Precision::Fast, 4e-5), (Precision::Int8, 1e-2)] {
                    let mut out = vec![0f32; m * n];
                    gemv(&[(rows, n)], k, &xs, &mut out, precision).unwrap();
                    let got = Tensor::from_vec(out, (m, n), &Device::Cpu).unwrap();
                    let err = max_rel_err(&got, &reference(&x, &deq));
                    assert!(err < tolerance, "{dtype:?} {precision:?} {m}x{k} by {n}x{k}: relative error {err}");
                }
            }
        }
    }
}

/// `gemm` (prompts: decoded tiles, then gemm) on every format: exact weights, f32 activations.
/// The k-quants, Q5_0 and Q5_1 are decoded by candle (`Rows::Other`); `gemv` refuses them but
/// for the k-quants on CPUs with the int8 kernels.
#[test]
fn gemm_matches_matmul_on_every_format() {
    use GgmlDType::*;
    for (n, k) in [(7, 64), (300, 576), (1536, 96), (300, 512)] {
        let w = random((n, k), 21);
        for m in [9, 37] {
            let x = random((m, k), 5 + m as u64);
            let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            let all = [F32, F16, BF16, Q4_0, Q4_1, Q8_0, Q5_0, Q5_1, Q2K, Q3K, Q4K, Q5K, Q6K];
            for dtype in all.into_iter().filter(|t| k.is_multiple_of(t.block_size())) {
                let q = QTensor::quantize(&w, dtype).unwrap();
                let deq = q.dequantize(&Device::Cpu).unwrap();
                let data = q.data().unwrap();
                let (f32s, f16s, bf16s);
                let rows = match dtype {
                    F32 => {
                        f32s = deq.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                        Rows::F32(&f32s)
                    }
                    F16 => {
                        f16s = deq.to_dtype(DType::F16).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                        Rows::F16(&f16s)
                    }
                    BF16 => {
                        bf16s = deq.to_dtype(DType::BF16).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                        Rows::BF16(&bf16s)
                    }
                    Q4_0 => Rows::Q4_0(&data),
                    Q4_1 => Rows::Q4_1(&data),
                    Q8_0 => Rows::Q8_0(&data),
                    other => {
                        // gemv reads the k-quants only on CPUs with the int8 kernels.
                        let rows = Rows::other(other, &data).unwrap();
                        let mut out = vec![0f32; n];
                        match gemv(&[(rows, n)], k, &xs[..k], &mut out, Precision::Fast) {
                            Ok(()) => {
                                assert!(gemv_reads(other), "{other:?}");
                                let got = Tensor::from_vec(out, (1, n), &Device::Cpu).unwrap();
                                let err = max_rel_err(&got, &reference(&x.narrow(0, 0, 1).unwrap(), &deq));
                                assert!(err < 2e-2, "gemv {other:?} 1x{k} by {n}x{k}: relative error {err}");
                            }
                            Err(err) => assert!(!gemv_reads(other) && err.contains("does not read"), "{err}"),
                        }
                        rows
                    }
                };
                let mut out = vec![0f32; m * n];
                granite_rs::kernels::cpu::gemm(&[(rows, n)], k, &xs, &mut out, Precision::Exact, &[m]).unwrap();
                let got = Tensor::from_vec(out, (m, n), &Device::Cpu).unwrap();
                let err = max_rel_err(&got, &reference(&x, &deq));
                assert!(err < 1e-5, "gemm {dtype:?} {m}x{k} by {n}x{k}: relative error {err}");
            }
        }
    }
}

/// The quantized formats round the activations to 16-bit integers: a NaN or an infinity among
/// them must still reach the output, not vanish in the rounding.
#[test]
fn quantized_formats_keep_non_finite_activations() {
    let (n, k) = (4, 320);
    let w = random((n, k), 3);
    for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
        let q = QTensor::quantize(&w, dtype).unwrap();
        let data = q.data().unwrap();
        let rows = match dtype {
            GgmlDType::Q4_0 => Rows::Q4_0(&data),
            GgmlDType::Q4_1 => Rows::Q4_1(&data),
            _ => Rows::Q8_0(&data),
        };
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            for at in [0, 33, 300] {
                let mut x = vec![0.5f32; k];
                x[at] = bad;
                for precision in [Precision::Fast, Precision::Int8] {
                    let mut out = vec![0f32; n];
                    gemv(&[(rows, n)], k, &x, &mut out, precision).unwrap();
                    assert!(out.iter().all(|v| !v.is_finite()), "{dtype:?} {precision:?}: {bad} at {at} gave {out:?}");
                }
            }
        }
    }
}

#[test]
fn gemv_rejects_bad_shapes() {
    let w = vec![0f32; 64];
    let mut out = vec![0f32; 2];
    assert!(gemv(&[(Rows::F32(&w), 2)], 30, &[0.0; 30], &mut out, Precision::Fast)
        .unwrap_err()
        .contains("multiple of 32"));
    assert!(gemv(&[(Rows::F32(&w), 2)], 32, &[0.0; 33], &mut out, Precision::Fast).unwrap_err().contains("shapes"));
    assert!(gemv(&[(Rows::F32(&w[..63]), 2)], 32, &[0.0; 32], &mut out, Precision::Fast)
        .unwrap_err()
        .contains("bytes"));
}

/// Every path of `Linear`: gemv for few rows, matmul for many, candle's quantized matmul for
/// the k-quants, stacked weights of mixed types, and weights read in place from a mapped file.
/// A name, two weights and the tolerance against an f32 matmul.
type Case = (&'static str, Weight, Weight, f32);

/// Two weights of every path `Linear` takes (mapped, dense, quantized, mixed), with the bias and
/// the tolerance against an f32 matmul.
fn linear_cases() -> (usize, Tensor, Vec<Case>) {
    let (k, n1, n2) = (512, 64, 96);
    let (w1, w2) = (random((n1, k), 5), random((n2, k), 6));
    let bias = random((1, n1 + n2), 9).squeeze(0).unwrap();
    let quantized = |w: &Tensor, t| Weight::Quantized(Arc::new(QTensor::quantize(w, t).unwrap()));
    // A file holding w1 and w2 as f32, then w1 as bf16 and w2 as q4_1, read through one map.
    let stored = |w: &Tensor, t| QTensor::quantize(w, t).unwrap().data().unwrap().into_owned();
    let blobs = [
        stored(&w1, GgmlDType::F32),
        stored(&w2, GgmlDType::F32),
        stored(&w1, GgmlDType::BF16),
        stored(&w2, GgmlDType::Q4_1),
    ];
    let path = std::env::temp_dir().join(format!("granite-gemv-mapped-{}", std::process::id()));
    std::fs::write(&path, blobs.concat()).unwrap();
    let map = mapped::map(&path).unwrap();
    let _ = std::fs::remove_file(&path); // the map outlives the name on Unix
    let starts: Vec<usize> = blobs.iter().scan(0, |at, b| Some(std::mem::replace(at, *at + b.len()))).collect();
    let in_file = |i: usize, t, n| Weight::Mapped(Arc::new(Mapped::new(&map, starts[i], t, (n, k)).unwrap()));
    let cases = vec![
        // Neighbours in the file in one format become one matrix: one pass over the weights.
        ("mapped f32, joined", in_file(0, GgmlDType::F32, n1), in_file(1, GgmlDType::F32, n2), 1e-5),
        ("mapped bf16 + mapped q4_1", in_file(2, GgmlDType::BF16, n1), in_file(3, GgmlDType::Q4_1, n2), 1e-5),
        ("mapped f32 + dense", in_file(0, GgmlDType::F32, n1), Weight::Dense(w2.clone()), 1e-5),
        ("dense", Weight::Dense(w1.clone()), Weight::Dense(w2.clone()), 1e-5),
        ("q8_0", quantized(&w1, GgmlDType::Q8_0), quantized(&w2, GgmlDType::Q8_0), 1e-5),
        ("q4_1 + q8_0", quantized(&w1, GgmlDType::Q4_1), quantized(&w2, GgmlDType::Q8_0), 1e-5),
        ("f16", quantized(&w1, GgmlDType::F16), quantized(&w2, GgmlDType::F16), 1e-5),
        ("bf16 + q4_0", quantized(&w1, GgmlDType::BF16), quantized(&w2, GgmlDType::Q4_0), 1e-5),
        // candle quantizes the activations for these: llama.cpp's approximation.
        ("q4_k", quantized(&w1, GgmlDType::Q4K), quantized(&w2, GgmlDType::Q4K), 2e-2),
        ("q6_k", quantized(&w1, GgmlDType::Q6K), quantized(&w2, GgmlDType::Q6K), 2e-2),
        ("q5_k", quantized(&w1, GgmlDType::Q5K), quantized(&w2, GgmlDType::Q5K), 2e-2),
        // Q4_K_M's fused q/k/v: Q4_K and Q6_K side by side.
        ("q4_k + q6_k", quantized(&w1, GgmlDType::Q4K), quantized(&w2, GgmlDType::Q6K), 2e-2),
    ];
    (k, bias, cases)
}

#[test]
fn linear_matches_matmul_on_every_path() {
    let (k, bias, cases) = linear_cases();
    for (name, a, b, tol) in cases {
        let n1 = a.dims2().unwrap().0;
        let (b1, b2) = (bias.narrow(0, 0, n1).unwrap(), bias.narrow(0, n1, bias.dim(0).unwrap() - n1).unwrap());
        let want_w = Tensor::cat(&[a.dequantize(DType::F32).unwrap(), b.dequantize(DType::F32).unwrap()], 0).unwrap();
        // Fast rounds a prompt's activations (and non-bf16 weights) to bf16 where the CPU has a
        // bf16 kernel: a relative error of about 2^-9 per value. Int8 rounds them to 8 bits per
        // 32 for block weights where the CPU has VNNI: at most 1/254 of each group's largest.
        let precisions =
            [(Precision::Exact, tol), (Precision::Fast, f32::max(tol, 1e-2)), (Precision::Int8, f32::max(tol, 2e-2))];
        for (precision, tol) in precisions {
            let part = |w: &Weight, bias: &Tensor| Linear::new(w.clone(), Some(bias.clone()), precision);
            let linear = Linear::stack(vec![part(&a, &b1), part(&b, &b2)]).unwrap();
            assert_eq!(linear.weights().len(), if name.contains(" + ") { 2 } else { 1 }, "{name}");
            for rows in [1, 3, 8, 9, 40] {
                let x = random((rows, k), 13).reshape((1, rows, k)).unwrap();
                let want = reference(&x.squeeze(0).unwrap(), &want_w).broadcast_add(&bias).unwrap();
                let got = linear.forward(&x).unwrap().squeeze(0).unwrap();
                let err = max_rel_err(&got, &want);
                assert!(err < tol, "{name}, {precision:?}, {rows} rows: relative error {err}");
            }
        }
    }
}

/// Rows packed from several spans give, bit for bit, what each span gives alone: a span of up
/// to 8 rows as decode, a longer one as a prompt, whatever else shares the product.
#[test]
fn packed_rows_equal_each_span_alone() {
    let (k, bias, cases) = linear_cases();
    let lens = [1, 1, 3, 20, 1, 9, 8, 1, 12];
    let total: usize = lens.iter().sum();
    let x = random((total, k), 17).reshape((1, total, k)).unwrap();
    for (name, a, b, _) in cases {
        let n1 = a.dims2().unwrap().0;
        let (b1, b2) = (bias.narrow(0, 0, n1).unwrap(), bias.narrow(0, n1, bias.dim(0).unwrap() - n1).unwrap());
        for precision in [Precision::Exact, Precision::Fast, Precision::Int8] {
            let part = |w: &Weight, bias: &Tensor| Linear::new(w.clone(), Some(bias.clone()), precision);
            let linear = Linear::stack(vec![part(&a, &b1), part(&b, &b2)]).unwrap();
            let packed = linear.forward_packed(&x, &PackedRows::new(lens)).unwrap();
            let mut at = 0;
            for len in lens {
                let alone = linear.forward(&x.narrow(1, at, len).unwrap()).unwrap();
                let same = packed.narrow(1, at, len).unwrap();
                let diff = (alone - same).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert_eq!(diff, 0.0, "{name}, {precision:?}: the span of {len} rows at {at} differs by {diff}");
                at += len;
            }
        }
    }
}

/// Several projections on their own rows in one parallel loop give, bit for bit, what each
/// gives alone as decode.
#[test]
fn forward_each_equals_each_forward() {
    let (k, _, cases) = linear_cases();
    for (name, a, b, _) in cases {
        let linear = |parts: Vec<&Weight>| {
            Linear::stack(parts.into_iter().map(|w| Linear::new(w.clone(), None, Precision::Exact)).collect()).unwrap()
        };
        let linears = [linear(vec![&a]), linear(vec![&b, &a]), linear(vec![&b])];
        let xs: Vec<Vec<f32>> = [1, 3, 8]
            .iter()
            .enumerate()
            .map(|(i, &rows)| random((rows, k), 20 + i as u64).flatten_all().unwrap().to_vec1().unwrap())
            .collect();
        let refs: Vec<&Linear> = linears.iter().collect();
        let slices: Vec<&[f32]> = xs.iter().map(Vec::as_slice).collect();
        let readable = [&a, &b].iter().all(|w| w.stored_type().is_none_or(gemv_reads));
        let Some(each) = Linear::forward_each(&refs, &slices).unwrap() else {
            assert!(!readable, "{name}: gemv reads these weights");
            continue;
        };
        for ((l, x), got) in linears.iter().zip(&xs).zip(each) {
            let x = Tensor::from_vec(x.clone(), (1, x.len() / k, k), &Device::Cpu).unwrap();
            let alone = l.forward(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(got, alone, "{name}");
        }
    }
}
