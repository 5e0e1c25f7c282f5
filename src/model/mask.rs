//! The additive causal mask of a prompt forward, where the attention kernel does not mask.

use candle_core::{DType, Device, Tensor};

use crate::error::Result;

/// The mask values, (t, start + t) row-major: 0 where the query at start + i sees key j (j <=
/// start + i), -inf elsewhere.
fn values(start: usize, t: usize) -> Vec<f32> {
    let len = start + t;
    (0..t).flat_map(|i| (0..len).map(move |j| if j <= start + i { 0.0 } else { f32::NEG_INFINITY })).collect()
}

/// Additive causal mask of `t` queries after `start` cached keys, (t, start + t). None for one
/// query (it sees every key), or on the CPU, where `kernels::prefill_attention` masks as it goes.
pub fn causal_mask(start: usize, t: usize, dtype: DType, device: &Device) -> Result<Option<Tensor>> {
    if t == 1 || device.is_cpu() {
        return Ok(None);
    }
    Ok(Some(Tensor::from_vec(values(start, t), (t, start + t), device)?.to_dtype(dtype)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    const N: f32 = f32::NEG_INFINITY;

    #[test]
    fn mask_table() {
        let cases: [(usize, usize, &[&[f32]]); 3] = [
            (0, 3, &[&[0., N, N], &[0., 0., N], &[0., 0., 0.]]),
            (2, 2, &[&[0., 0., 0., N], &[0., 0., 0., 0.]]),
            (0, 1, &[&[0.]]),
        ];
        for (start, t, want) in cases {
            assert_eq!(values(start, t), want.concat(), "start {start}, t {t}");
        }
    }

    #[test]
    fn shapes_and_when_there_is_none() -> Result<()> {
        let cpu = Device::Cpu;
        assert!(causal_mask(0, 4, DType::F32, &cpu)?.is_none(), "the CPU softmax masks prompts");
        assert!(causal_mask(5, 1, DType::F32, &cpu)?.is_none());
        Ok(())
    }
}
