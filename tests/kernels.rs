//! The fused ops of `granite_rs::kernels` against compositions of plain candle ops (computed in f32 on
//! the same inputs), and (ignored tests, run with `--ignored` on a GPU) their CUDA kernels against
//! their CPU paths.

use candle_core::{DType, Device, Result, Tensor, D};
use granite_rs::kernels;

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// The GPU of the `_on_cuda` tests, which are ignored unless asked for (`-- --ignored`); without
/// the `cuda` feature or a usable GPU they fail.
fn cuda() -> Device {
    Device::new_cuda_with_stream(0).expect("the _on_cuda tests need the `cuda` feature and a usable GPU")
}

/// Each op's test on the CPU, and its CUDA kernel against the CPU path as an ignored test.
macro_rules! cpu_and_cuda {
    ($check:ident: $cpu:ident, $cuda:ident) => {
        #[test]
        fn $cpu() -> Result<()> {
            $check(None)
        }

        #[test]
        #[ignore = "needs a GPU: cargo test --release --features cuda --test kernels -- --ignored"]
        fn $cuda() -> Result<()> {
            $check(Some(cuda()))
        }
    };
}

cpu_and_cuda!(check_rms_norm: rms_norm_and_add_rms_norm, rms_norm_and_add_rms_norm_on_cuda);
cpu_and_cuda!(check_swiglu: swiglu, swiglu_on_cuda);
cpu_and_cuda!(check_rope_write_kv: rope_write_kv, rope_write_kv_on_cuda);
cpu_and_cuda!(check_decode_attention: decode_attention, decode_attention_on_cuda);
cpu_and_cuda!(check_greedy: greedy, greedy_on_cuda);

fn randn(shape: &[usize], dtype: DType, seed: u64) -> Result<Tensor> {
    // A fixed, cheap pseudo-random sequence: tests stay reproducible without a seeded device RNG.
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dtype)
}

/// The cache slots of n positions: in order for even `case`s, else scattered over `cap` slots
/// (as a sequence's blocks lie in a shared pool).
fn slots(n: usize, cap: usize, case: usize) -> Vec<u32> {
    if case.is_multiple_of(2) {
        return (0..n as u32).collect();
    }
    let mut keyed: Vec<(u64, u32)> =
        (0..cap as u32).map(|i| ((i as u64 + case as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 17, i)).collect();
    keyed.sort();
    keyed.into_iter().take(n).map(|(_, i)| i).collect()
}

/// The rows of x (b, h, cap, d) at `slots` along dim 2, in f32.
fn gather(x: &Tensor, slots: &[u32]) -> Result<Tensor> {
    f32(x)?.index_select(&Tensor::new(slots, &Device::Cpu)?, 2)
}

fn f32(t: &Tensor) -> Result<Tensor> {
    t.to_device(&Device::Cpu)?.to_dtype(DType::F32)
}

/// Relative tolerance of one result against a reference computed in f32 from the same inputs.
fn tolerance(dtype: DType) -> f32 {
    match dtype {
        DType::F32 => 1e-5,
        DType::F16 => 4e-3,
        _ => 2e-2,
    }
}

/// |a - b| <= tol * (1 + |b|) everywhere.
fn assert_close(what: &str, a: &Tensor, b: &Tensor, tol: f32) -> Result<()> {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes");
    let (a, b) = (f32(a)?.flatten_all()?.to_vec1::<f32>()?, f32(b)?.flatten_all()?.to_vec1::<f32>()?);
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!((x - y).abs() <= tol * (1.0 + y.abs()), "{what}: element {i}: {x} vs {y} (tolerance {tol})");
    }
    Ok(())
}

fn check_rms_norm(gpu: Option<Device>) -> Result<()> {
    for dtype in DTYPES {
        for (i, shape) in
            [vec![1, 1, 64], vec![2, 3, 96], vec![1, 7, 2048], vec![64, 1024], vec![5, 33]].iter().enumerate()
        {
            let hidden = *shape.last().unwrap();
            let (res, br, w) =
                (randn(shape, dtype, i as u64)?, randn(shape, dtype, 100)?, randn(&[hidden], dtype, 200)?);
            let (scale, eps) = (0.22, 1e-6);
            let what = format!("{dtype:?} {shape:?}");

            let normed = kernels::rms_norm(&res, &w, eps)?;
            let want = candle_nn::ops::rms_norm(&f32(&res)?, &f32(&w)?, eps as f32)?;
            assert_close(&format!("rms_norm {what}"), &normed, &want, tolerance(dtype))?;

            let (new_res, normed) = kernels::add_rms_norm(&res, &br, scale, &w, eps)?;
            let want_res = (f32(&res)? + (f32(&br)? * scale)?)?;
            // The op normalizes the residual as stored, rounded to the dtype.
            let want =
                candle_nn::ops::rms_norm(&want_res.to_dtype(dtype)?.to_dtype(DType::F32)?, &f32(&w)?, eps as f32)?;
            assert_close(&format!("add_rms_norm residual {what}"), &new_res, &want_res, tolerance(dtype))?;
            assert_close(&format!("add_rms_norm normed {what}"), &normed, &want, tolerance(dtype))?;

            if let Some(dev) = &gpu {
                let (r, b, w) = (res.to_device(dev)?, br.to_device(dev)?, w.to_device(dev)?);
                let (gpu_res, gpu_normed) = kernels::add_rms_norm(&r, &b, scale, &w, eps)?;
                assert_close(&format!("cuda residual {what}"), &gpu_res, &new_res, tolerance(dtype))?;
                assert_close(&format!("cuda normed {what}"), &gpu_normed, &normed, tolerance(dtype))?;
                let plain = kernels::rms_norm(&r, &w, eps)?;
                assert_close(
                    &format!("cuda rms_norm {what}"),
                    &plain,
                    &kernels::rms_norm(&res, &w.to_device(&Device::Cpu)?, eps)?,
                    tolerance(dtype),
                )?;
            }
        }
    }
    Ok(())
}

fn check_swiglu(gpu: Option<Device>) -> Result<()> {
    for dtype in DTYPES {
        for (i, shape) in [vec![1, 1, 10], vec![3, 7, 128], vec![64, 2048]].iter().enumerate() {
            // Values up to ±80 on the last shape: sigmoid's tails, where e^-g overflows.
            let x = (randn(shape, dtype, i as u64)? * if i == 2 { 40.0 } else { 1.0 })?;
            let out = kernels::swiglu(&x)?;
            let want = candle_nn::ops::swiglu(&f32(&x)?)?;
            assert_close(&format!("swiglu {dtype:?} {shape:?}"), &out, &want, tolerance(dtype))?;
            if let Some(dev) = &gpu {
                let on_gpu = kernels::swiglu(&x.to_device(dev)?)?;
                assert_close(&format!("cuda swiglu {dtype:?} {shape:?}"), &on_gpu, &out, tolerance(dtype))?;
            }
        }
    }
    Ok(())
}

/// Views of q, k, v (b, heads, t, d) into one qkv projection (b, t, (nh + 2 nkv) d), as the model
/// has them: strided, not contiguous.
fn qkv_views(qkv: &Tensor, nh: usize, nkv: usize, d: usize) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, t, _) = qkv.dims3()?;
    let heads = qkv.reshape((b, t, nh + 2 * nkv, d))?;
    let view = |start, n| heads.narrow(2, start, n)?.transpose(1, 2);
    Ok((view(0, nh)?, view(nh, nkv)?, view(nh + nkv, nkv)?))
}

fn check_rope_write_kv(gpu: Option<Device>) -> Result<()> {
    // (b, nh, nkv, t, d, cap, pos, table rows, per-row tables)
    let cases = [
        (1, 4, 4, 1, 64, 8, 3, 1, false),
        (2, 8, 2, 5, 32, 16, 7, 9, false),
        (2, 6, 1, 3, 128, 3, 0, 3, true),
        (1, 32, 8, 1, 128, 300, 299, 1, false),
        (3, 4, 2, 17, 64, 40, 20, 17, true),
    ];
    for dtype in DTYPES {
        for (i, &(b, nh, nkv, t, d, cap, pos, t_cs, batched)) in cases.iter().enumerate() {
            let what = format!("{dtype:?} case {i}");
            let qkv = randn(&[b, t, (nh + 2 * nkv) * d], dtype, i as u64)?;
            let (q, k, v) = qkv_views(&qkv, nh, nkv, d)?;
            let table_shape = if batched { vec![b, t_cs, d / 2] } else { vec![t_cs, d / 2] };
            let angles = (randn(&table_shape, DType::F32, 50 + i as u64)? * 3.0)?;
            let (cos, sin) = (angles.cos()?.to_dtype(dtype)?, angles.sin()?.to_dtype(dtype)?);
            let k_cache = randn(&[b, nkv, cap, d], dtype, 300)?;
            let v_cache = randn(&[b, nkv, cap, d], dtype, 400)?;
            let (k_before, v_before) = (k_cache.copy()?, v_cache.copy()?);
            let at: Vec<u32> = slots(pos + t, cap, i)[pos..].to_vec();

            let q_rot = kernels::rope_write_kv(&q, &k, &v, &cos, &sin, &k_cache, &v_cache, &at)?;

            let rows = |x: &Tensor| x.narrow(D::Minus2, 0, t);
            let (c, s) = (rows(&f32(&cos)?)?.contiguous()?, rows(&f32(&sin)?)?.contiguous()?);
            let rope = |x: &Tensor| candle_nn::rotary_emb::rope(&f32(x)?.contiguous()?, &c, &s);
            assert_close(&format!("q {what}"), &q_rot, &rope(&q)?, tolerance(dtype))?;
            let with = |cache: &Tensor, new: &Tensor| -> Result<Tensor> {
                let cache = f32(cache)?.copy()?;
                for (j, &slot) in at.iter().enumerate() {
                    cache.slice_set(&new.narrow(2, j, 1)?.contiguous()?, 2, slot as usize)?;
                }
                Ok(cache)
            };
            assert_close(&format!("k_cache {what}"), &k_cache, &with(&k_before, &rope(&k)?)?, tolerance(dtype))?;
            assert_close(&format!("v_cache {what}"), &v_cache, &with(&v_before, &f32(&v)?.contiguous()?)?, 0.0)?;

            if let Some(dev) = &gpu {
                let qkv = qkv.to_device(dev)?;
                let (q, k, v) = qkv_views(&qkv, nh, nkv, d)?;
                let (cos, sin) = (cos.to_device(dev)?, sin.to_device(dev)?);
                let (kc, vc) = (k_before.to_device(dev)?, v_before.to_device(dev)?);
                let q_gpu = kernels::rope_write_kv(&q, &k, &v, &cos, &sin, &kc, &vc, &at)?;
                assert_close(&format!("cuda q {what}"), &q_gpu, &q_rot, tolerance(dtype))?;
                assert_close(&format!("cuda k_cache {what}"), &kc, &k_cache, tolerance(dtype))?;
                assert_close(&format!("cuda v_cache {what}"), &vc, &v_cache, 0.0)?;
            }
        }
    }
    Ok(())
}

fn check_decode_attention(gpu: Option<Device>) -> Result<()> {
    // (b, nh, nkv, d, cap, len)
    let cases = [
        (1, 4, 4, 64, 16, 1),
        (2, 8, 2, 64, 40, 37),
        (1, 32, 8, 128, 600, 513),
        (3, 6, 1, 32, 10, 10),
        (1, 8, 8, 256, 70, 69),
        (2, 4, 2, 96, 3000, 2049),
        (1, 16, 1, 64, 130, 129),  // a group of 16 query heads: two blocks per kv head
        (2, 40, 8, 128, 300, 300), // groups of 5 (granite-4.0-micro)
        (1, 12, 1, 80, 66, 65),    // a group of 12: blocks of 8 and 4 heads
    ];
    for dtype in DTYPES {
        for (i, &(b, nh, nkv, d, cap, len)) in cases.iter().enumerate() {
            let what = format!("{dtype:?} case {i}");
            let qkv = randn(&[b, 1, (nh + 2 * nkv) * d], dtype, i as u64)?;
            let (q, _, _) = qkv_views(&qkv, nh, nkv, d)?;
            let k_cache = randn(&[b, nkv, cap, d], dtype, 10 + i as u64)?;
            let v_cache = randn(&[b, nkv, cap, d], dtype, 20 + i as u64)?;
            let scale = 1.0 / (d as f64).sqrt();
            let at = slots(len, cap, i);

            let out = kernels::decode_attention(&q, &k_cache, &v_cache, &at, scale)?;

            let rep = nh / nkv;
            let keys = |c: &Tensor| gather(c, &at);
            let qf = (f32(&q)?.contiguous()? * scale)?.reshape((b, nkv, rep, d))?;
            let scores = qf.matmul(&keys(&k_cache)?.t()?)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            let want = probs.matmul(&keys(&v_cache)?)?.reshape((b, nh, 1, d))?;
            assert_close(&format!("attention {what}"), &out, &want, tolerance(dtype))?;

            if let Some(dev) = &gpu {
                let qkv = qkv.to_device(dev)?;
                let (q, _, _) = qkv_views(&qkv, nh, nkv, d)?;
                let (kc, vc) = (k_cache.to_device(dev)?, v_cache.to_device(dev)?);
                let on_gpu = kernels::decode_attention(&q, &kc, &vc, &at, scale)?;
                assert_close(&format!("cuda attention {what}"), &on_gpu, &out, tolerance(dtype))?;
            }
        }
    }
    Ok(())
}

/// Rows over their own positions of one cache, in one op: each row gets what `decode_attention`
/// gives it alone, bit for bit.
#[test]
fn rows_attend_as_they_do_alone() -> Result<()> {
    let (nh, nkv, d, cap) = (6, 2, 64, 90);
    let lens = [1, 37, 90, 5, 64];
    for dtype in DTYPES {
        let q = randn(&[lens.len(), nh, 1, d], dtype, 3)?;
        let (k_cache, v_cache) = (randn(&[1, nkv, cap, d], dtype, 4)?, randn(&[1, nkv, cap, d], dtype, 5)?);
        let lists: Vec<Vec<u32>> = lens.iter().enumerate().map(|(i, &len)| slots(len, cap, i)).collect();
        let refs: Vec<&[u32]> = lists.iter().map(Vec::as_slice).collect();
        let out = kernels::decode_attention_rows(&q, &k_cache, &v_cache, &refs, 0.125)?;
        for (i, at) in refs.iter().enumerate() {
            let alone = kernels::decode_attention(&q.narrow(0, i, 1)?, &k_cache, &v_cache, at, 0.125)?;
            assert_close(&format!("{dtype:?} row {i}"), &out.narrow(0, i, 1)?, &alone, 0.0)?;
        }
        // A row without slots, a slot past the cache, fewer lists than rows.
        for bad in [vec![refs[0], &[][..]], vec![refs[0], &[0, cap as u32][..]], vec![refs[0]]] {
            assert!(kernels::decode_attention_rows(&q.narrow(0, 0, 2)?, &k_cache, &v_cache, &bad, 1.0).is_err());
        }
    }
    Ok(())
}

/// The first index of the largest logit (exact ties as bf16 logits make them), and whether all are
/// finite: over 49152 logits, with the maxima spread over the threads of the CUDA kernel.
fn check_greedy(gpu: Option<Device>) -> Result<()> {
    let n = 49152;
    let base = |i: usize| ((i * 7919) % 1000) as f32 / 1000.0;
    let with = |set: &[(usize, f32)]| {
        let mut v: Vec<f32> = (0..n).map(base).collect();
        for &(i, x) in set {
            v[i] = x;
        }
        v
    };
    // (logits, expected pick, all finite)
    let cases = [
        (with(&[(40000, 5.0)]), 40000, true),
        (with(&[(30001, 5.0), (1025, 5.0), (48000, 5.0)]), 1025, true), // ties: the first
        (with(&[(7, 5.0), (8, 5.0)]), 7, true),
        (with(&[(3, f32::NAN), (9, 5.0)]), 9, false), // NaN never wins, and is reported
        (with(&[(5, f32::INFINITY)]), 5, false),
        (vec![f32::NEG_INFINITY; n], 0, false),
        (vec![2.5; 1], 0, true),
        (vec![-1.0, 3.0, 3.0], 1, true),
    ];
    for (i, (logits, pick, finite)) in cases.iter().enumerate() {
        let x = Tensor::new(logits.as_slice(), &Device::Cpu)?;
        assert_eq!(kernels::greedy(&x)?, (*pick, *finite), "case {i} on the CPU");
        if let Some(dev) = &gpu {
            assert_eq!(kernels::greedy(&x.to_device(dev)?)?, (*pick, *finite), "case {i} on CUDA");
        }
    }
    let bf16 = Tensor::new(&[1f32, 2.0], &Device::Cpu)?.to_dtype(DType::BF16)?;
    assert!(kernels::greedy(&bf16).is_err(), "only f32 logits");
    Ok(())
}

/// Tiled causal attention of a prompt against softmax(scale q kᵀ + causal mask) v formed whole,
/// with and without cached keys, GQA, k and v as views of a cache; and a NaN stays visible.
#[test]
fn prefill_attention() -> Result<()> {
    // (b, nh, nkv, t, start, d, cache capacity)
    let cases = [
        (1, 1, 1, 1, 0, 64, 1),
        (1, 4, 4, 5, 0, 64, 5),
        (2, 6, 2, 33, 7, 32, 64),
        (1, 9, 3, 130, 0, 64, 130),
        (2, 4, 1, 40, 300, 128, 400),
        (1, 2, 2, 257, 3, 96, 260),
    ];
    for dtype in DTYPES {
        for (i, &(b, nh, nkv, t, start, d, cap)) in cases.iter().enumerate() {
            let what = format!("{dtype:?} case {i}");
            let len = start + t;
            let q = randn(&[b, nh, t, d], dtype, 60 + i as u64)?;
            // Keys and values as the model has them: len positions at some slots of a cache.
            let k_cache = randn(&[b, nkv, cap, d], dtype, 70 + i as u64)?;
            let v_cache = randn(&[b, nkv, cap, d], dtype, 80 + i as u64)?;
            let at = slots(len, cap, i);
            let (k, v) = (gather(&k_cache, &at)?, gather(&v_cache, &at)?);
            let scale = 1.0 / (d as f64).sqrt();

            let out = kernels::prefill_attention(&q, &k_cache, &v_cache, &at, scale)?;

            let rep = nh / nkv;
            let qf = (f32(&q)? * scale)?.reshape((b, nkv, rep * t, d))?;
            let scores = qf.matmul(&k.t()?)?.reshape((b, nh, t, len))?;
            let mask: Vec<f32> = (0..t)
                .flat_map(|r| (0..len).map(move |j| if j <= start + r { 0.0 } else { f32::NEG_INFINITY }))
                .collect();
            let mask = Tensor::from_vec(mask, (t, len), &Device::Cpu)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&mask)?)?;
            let want = probs.reshape((b, nkv, rep * t, len))?.matmul(&v)?.reshape((b, nh, t, d))?;
            assert_close(&format!("prefill attention {what}"), &out, &want, tolerance(dtype))?;
        }
    }
    // A NaN key reaches the queries that see it, and only those (its value is finite).
    let q = randn(&[1, 1, 3, 64], DType::F32, 1)?;
    let mut keys = randn(&[1, 1, 3, 64], DType::F32, 2)?.flatten_all()?.to_vec1::<f32>()?;
    keys[64] = f32::NAN;
    let k = Tensor::from_vec(keys, (1, 1, 3, 64), &Device::Cpu)?;
    let v = randn(&[1, 1, 3, 64], DType::F32, 3)?;
    let out = kernels::prefill_attention(&q, &k, &v, &[0, 1, 2], 0.125)?.flatten_all()?.to_vec1::<f32>()?;
    let nan_rows: Vec<bool> = (0..3).map(|r| out[r * 64..(r + 1) * 64].iter().any(|x| x.is_nan())).collect();
    assert_eq!(nan_rows, [false, true, true], "query 0 does not see key 1");
    assert!(kernels::prefill_attention(&q, &k, &k, &[0, 1], 1.0).is_err(), "fewer key positions than queries");
    assert!(
        kernels::prefill_attention(&q, &k.narrow(2, 0, 2)?, &k.narrow(2, 0, 2)?, &[0, 1, 2], 1.0).is_err(),
        "a slot past the keys"
    );
    Ok(())
}

#[test]
fn bad_arguments_are_errors() -> Result<()> {
    let x = randn(&[1, 2, 3, 8], DType::F32, 1)?;
    let cache = Tensor::zeros((1, 2, 4, 8), DType::F32, &Device::Cpu)?;
    let cs = Tensor::ones((3, 4), DType::F32, &Device::Cpu)?;
    // a slot beyond the capacity, a slot twice, fewer slots than positions
    for at in [[2, 3, 4], [0, 1, 1]] {
        assert!(kernels::rope_write_kv(&x, &x, &x, &cs, &cs, &cache, &cache.copy()?, &at).is_err(), "{at:?}");
    }
    assert!(kernels::rope_write_kv(&x, &x, &x, &cs, &cs, &cache, &cache.copy()?, &[0, 1]).is_err());
    // a slot beyond the capacity; no positions
    assert!(kernels::decode_attention(&x.narrow(2, 0, 1)?, &cache, &cache, &[0, 4], 1.0).is_err());
    assert!(kernels::decode_attention(&x.narrow(2, 0, 1)?, &cache, &cache, &[], 1.0).is_err());
    // mixed dtypes
    assert!(kernels::rms_norm(&x, &Tensor::ones(8, DType::F16, &Device::Cpu)?, 1e-6).is_err());
    assert!(kernels::swiglu(&randn(&[2, 5], DType::F32, 1)?).is_err());
    Ok(())
}

/// Mamba2's convolution (`kernels::cpu::mamba::Conv`) against plain candle: silu(bias + the
/// kernel's taps over the window then the rows), the rows strided among other values.
#[test]
fn mamba_conv() -> Result<()> {
    use granite_rs::kernels::cpu::mamba::Conv;
    for (case, (t, c, k)) in [(1, 8, 4), (7, 12, 4), (5, 6, 2), (3, 10, 3)].into_iter().enumerate() {
        let (stride, at) = (c + 5, 3);
        let rows = randn(&[t, stride], DType::F32, 10 + case as u64)?;
        let window = randn(&[k - 1, c], DType::F32, 20 + case as u64)?;
        let (weight, bias) =
            (randn(&[c, k], DType::F32, 30 + case as u64)?, randn(&[c], DType::F32, 40 + case as u64)?);
        let inputs = Tensor::cat(&[&window, &rows.narrow(1, at, c)?], 0)?; // (k - 1 + t, c)
        let mut want = bias.broadcast_as((t, c))?.contiguous()?;
        for j in 0..k {
            want = (want + inputs.narrow(0, j, t)?.broadcast_mul(&weight.narrow(1, j, 1)?.t()?)?)?;
        }
        let want = candle_nn::ops::silu(&want)?;

        let (weight_v, bias_v) = (weight.flatten_all()?.to_vec1::<f32>()?, bias.to_vec1::<f32>()?);
        let conv = Conv { weight: &weight_v, bias: &bias_v, kernel: k };
        let mut got = rows.flatten_all()?.to_vec1::<f32>()?;
        let mut win = window.flatten_all()?.to_vec1::<f32>()?;
        let mut before = vec![0f32; win.len()];
        conv.forward(&mut got, stride, at, &mut win, Some(&mut before));
        let got = Tensor::from_vec(got, (t, stride), &Device::Cpu)?;
        assert_close("conv rows", &got.narrow(1, at, c)?, &want, 1e-5)?;
        assert_close("untouched", &got.narrow(1, 0, at)?, &rows.narrow(1, 0, at)?, 0.0)?;
        let window_after = Tensor::from_vec(win, (k - 1, c), &Device::Cpu)?;
        assert_close("window", &window_after, &inputs.narrow(0, t, k - 1)?, 0.0)?;
        let before = Tensor::from_vec(before, (k - 1, c), &Device::Cpu)?;
        assert_close("window before the last row", &before, &inputs.narrow(0, t - 1, k - 1)?, 0.0)?;
    }
    Ok(())
}

/// Mamba2's scan (`kernels::cpu::mamba::Ssm`) against the quadratic form of the same model,
/// in plain candle per head: y_t = Σ_{s<=t} (C_t·B_s) e^{a(Λ_t - Λ_s)} Δ_s x_s + e^{aΛ_t} C_t·h0
/// + D x_t, Λ the running sum of Δ; and a sequence cut in two pieces gives the same bits as whole.
#[test]
fn mamba_scan() -> Result<()> {
    use granite_rs::kernels::cpu::mamba::Ssm;
    for (case, (t, heads, hd, groups, n)) in [(6, 4, 3, 2, 5), (9, 2, 4, 1, 8), (1, 3, 2, 3, 4)].into_iter().enumerate()
    {
        let seed = 100 * case as u64;
        let inner = heads * hd;
        let stride = inner + 2 * groups * n + heads + 3;
        let rows = randn(&[t, stride], DType::F32, seed + 1)?;
        let a: Vec<f32> = (0..heads).map(|h| -0.3 * (h + 1) as f32).collect();
        let d = randn(&[heads], DType::F32, seed + 2)?.to_vec1::<f32>()?;
        let dt_bias = randn(&[heads], DType::F32, seed + 3)?.to_vec1::<f32>()?;
        let h0 = randn(&[heads, hd, n], DType::F32, seed + 4)?;
        let ssm = Ssm { a: &a, d: &d, dt_bias: &dt_bias, head_dim: hd, groups, state: n, dt_limit: None };
        let flat = rows.flatten_all()?.to_vec1::<f32>()?;
        let dt_at = inner + 2 * groups * n;
        let run = |from: usize, to: usize, state: &mut Vec<f32>| -> Vec<f32> {
            let mut y = vec![0f32; (to - from) * inner];
            let (xbc, dt) = (&flat[from * stride..to * stride], &flat[from * stride + dt_at..to * stride]);
            ssm.scan(xbc, stride, dt, stride, None, state, &mut y, None);
            y
        };
        let mut state = h0.flatten_all()?.to_vec1::<f32>()?;
        let whole = run(0, t, &mut state);

        let softplus = |x: &Tensor| -> Result<Tensor> { (x.exp()? + 1.0)?.log() };
        let delta = softplus(&rows.narrow(1, dt_at, heads)?.broadcast_add(&Tensor::new(&dt_bias[..], &Device::Cpu)?)?)?;
        let causal = Tensor::from_vec(
            (0..t * t).map(|i| if i % t <= i / t { 1f32 } else { 0.0 }).collect::<Vec<_>>(),
            (t, t),
            &Device::Cpu,
        )?;
        let mut want = Vec::new();
        for h in 0..heads {
            let g = h / (heads / groups);
            let x = rows.narrow(1, h * hd, hd)?; // (t, hd)
            let b = rows.narrow(1, inner + g * n, n)?; // (t, n)
            let c = rows.narrow(1, inner + (groups + g) * n, n)?;
            let dh = delta.narrow(1, h, 1)?; // (t, 1)
            let lam = (dh.cumsum(0)? * a[h] as f64)?; // a Λ_t, (t, 1)
            let decay = (lam.broadcast_sub(&lam.t()?)?.exp()? * &causal)?; // e^{a(Λ_t - Λ_s)}, s <= t
            let scores = (c.matmul(&b.t()?)? * decay)?; // (t, t)
            let from_inputs = scores.matmul(&x.broadcast_mul(&dh)?)?;
            let from_state = c.matmul(&h0.get(h)?.t()?)?.broadcast_mul(&lam.exp()?)?; // (t, hd)
            want.push(((from_inputs + from_state)? + (x * d[h] as f64)?)?);
        }
        let want = Tensor::cat(&want, 1)?;
        assert_close("scan", &Tensor::from_vec(whole.clone(), (t, inner), &Device::Cpu)?, &want, 1e-4)?;

        // In two pieces, the state carried between them: the same bits.
        if t < 2 {
            continue;
        }
        let cut = t / 2;
        let mut state = h0.flatten_all()?.to_vec1::<f32>()?;
        let mut pieces = run(0, cut, &mut state);
        pieces.extend(run(cut, t, &mut state));
        assert_eq!(pieces, whole, "case {case}: pieces");

        // Continued from a state elsewhere, into a buffer of other values: the same bits.
        let mut continued = h0.flatten_all()?.to_vec1::<f32>()?;
        let first = run(0, cut, &mut continued);
        let mut buffer = vec![f32::NAN; continued.len()];
        let mut y = vec![0f32; (t - cut) * inner];
        let (xbc, dt) = (&flat[cut * stride..], &flat[cut * stride + dt_at..]);
        ssm.scan(xbc, stride, dt, stride, Some(&continued), &mut buffer, &mut y, None);
        assert_eq!([first, y].concat(), whole, "case {case}: from another buffer");
        assert_eq!(buffer, state, "case {case}: the state written from another buffer");
    }
    Ok(())
}

/// Mamba2's gated RMSNorm against plain candle: weight · rmsnorm(y · silu(z)) per group.
#[test]
fn mamba_gated_rms_norm() -> Result<()> {
    use granite_rs::kernels::cpu::mamba::gated_rms_norm;
    let (t, width, groups, z_stride) = (5, 12, 3, 20);
    let (y, z, w) =
        (randn(&[t, width], DType::F32, 1)?, randn(&[t, z_stride], DType::F32, 2)?, randn(&[width], DType::F32, 3)?);
    let gated = (&y * candle_nn::ops::silu(&z.narrow(1, 0, width)?)?)?.reshape((t, groups, width / groups))?;
    let rms = (gated.sqr()?.mean_keepdim(D::Minus1)? + 1e-5)?.sqrt()?;
    let want = gated.broadcast_div(&rms)?.reshape((t, width))?.broadcast_mul(&w)?;
    let mut got = y.flatten_all()?.to_vec1::<f32>()?;
    gated_rms_norm(&mut got, &z.flatten_all()?.to_vec1::<f32>()?, z_stride, &w.to_vec1::<f32>()?, groups, 1e-5);
    assert_close("gated norm", &Tensor::from_vec(got, (t, width), &Device::Cpu)?, &want, 1e-5)
}
