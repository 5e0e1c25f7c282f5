//! The additive causal mask of a prompt forward, with left padding.

use candle_core::{DType, Device, Tensor};

use crate::error::Result;

/// Whether the query at position `query` of a row with `pad` leading pad tokens sees key `key`:
/// the keys up to itself, less the pad keys (a pad query sees itself, to keep its softmax finite).
fn visible(pad: usize, query: usize, key: usize) -> bool {
    key <= query && (key >= pad || key == query)
}

/// The mask values, (rows, t, start + t) row-major: 0 where visible, -inf elsewhere.
fn values(start: usize, t: usize, left_pad: &[usize]) -> Vec<f32> {
    let len = start + t;
    left_pad
        .iter()
        .flat_map(|&pad| (0..t).flat_map(move |i| (0..len).map(move |j| (pad, start + i, j))))
        .map(|(pad, q, j)| if visible(pad, q, j) { 0.0 } else { f32::NEG_INFINITY })
        .collect()
}

/// Additive causal mask of `t` queries after `start` cached keys: (t, start + t) without
/// padding, else (b, 1, t, start + t). None without padding for one query, or on the CPU, where
/// `kernels::prefill_attention` masks as it goes.
pub fn causal_mask(
    start: usize,
    t: usize,
    left_pad: &[usize],
    dtype: DType,
    device: &Device,
) -> Result<Option<Tensor>> {
    let padded = left_pad.iter().any(|p| *p > 0);
    if !padded && (t == 1 || device.is_cpu()) {
        return Ok(None);
    }
    let rows: &[usize] = if padded { left_pad } else { &[0] };
    let mask = Tensor::from_vec(values(start, t, rows), (rows.len(), 1, t, start + t), device)?;
    let mask = if padded { mask } else { mask.squeeze(0)?.squeeze(0)? };
    Ok(Some(mask.to_dtype(dtype)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    const N: f32 = f32::NEG_INFINITY;

    #[test]
    fn mask_table() {
        // (start, t, left pad of the one row, expected rows of the mask)
        let cases: [(usize, usize, usize, &[&[f32]]); 5] = [
            (0, 3, 0, &[&[0., N, N], &[0., 0., N], &[0., 0., 0.]]),
            (2, 2, 0, &[&[0., 0., 0., N], &[0., 0., 0., 0.]]),
            (0, 1, 0, &[&[0.]]),
            (0, 3, 1, &[&[0., N, N], &[N, 0., N], &[N, 0., 0.]]),
            (1, 2, 2, &[&[N, 0., N], &[N, N, 0.]]),
        ];
        for (start, t, pad, want) in cases {
            let want: Vec<f32> = want.concat();
            assert_eq!(values(start, t, &[pad]), want, "start {start}, t {t}, pad {pad}");
        }
    }

    #[test]
    fn rows_are_masked_apart() {
        let both = values(0, 2, &[0, 1]);
        assert_eq!(both, [values(0, 2, &[0]), values(0, 2, &[1])].concat());
    }

    #[test]
    fn shapes_and_when_there_is_none() -> Result<()> {
        let cpu = Device::Cpu;
        assert!(causal_mask(0, 4, &[], DType::F32, &cpu)?.is_none(), "the CPU softmax masks unpadded prompts");
        assert!(causal_mask(0, 4, &[0, 0], DType::F32, &cpu)?.is_none());
        let padded = causal_mask(3, 2, &[0, 2], DType::BF16, &cpu)?.expect("padded rows need a mask");
        assert_eq!((padded.dims(), padded.dtype()), (&[2, 1, 2, 5][..], DType::BF16));
        Ok(())
    }
}
