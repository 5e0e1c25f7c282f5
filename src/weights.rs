//! Checkpoint tensors by HF name, with named errors: memory-mapped safetensors (single-file or
//! sharded), or tensors already in memory (a GGUF, its quantized matrices kept as stored).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use candle_core::safetensors::{Load, MmapedSafetensors};
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::config::read_json;
use crate::error::{candle_message, Error, Result};
use crate::linear::Weight;

/// What loading does to the weight matrices of the projections and embeddings.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub enum Quantization {
    /// Dense matrices in the compute dtype; GGUF matrices stay in their quantized type.
    #[default]
    AsStored,
    /// Every matrix dense in the compute dtype.
    Dequantize,
    /// Every matrix in this GGUF type (rows that its blocks do not divide fall back to Q8_0).
    To(GgmlDType),
}

impl Quantization {
    /// "none" or a GGUF type name: f16, bf16, q8_0, q4_0, q4_1, q4_k, q5_k, q6_k.
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name.to_ascii_lowercase().as_str() {
            "none" => Self::Dequantize,
            "f16" => Self::To(GgmlDType::F16),
            "bf16" => Self::To(GgmlDType::BF16),
            "q8_0" => Self::To(GgmlDType::Q8_0),
            "q4_0" => Self::To(GgmlDType::Q4_0),
            "q4_1" => Self::To(GgmlDType::Q4_1),
            "q4_k" => Self::To(GgmlDType::Q4K),
            "q5_k" => Self::To(GgmlDType::Q5K),
            "q6_k" => Self::To(GgmlDType::Q6K),
            _ => return None,
        })
    }
}

/// Every tensor of a checkpoint, converted to the compute dtype when asked for.
pub struct Weights {
    source: Source,
    dtype: DType,
    device: Device,
    quantization: Quantization,
}

enum Source {
    Safetensors {
        files: Vec<(PathBuf, MmapedSafetensors)>,
        /// Tensor name -> index into `files`.
        location: HashMap<String, usize>,
    },
    Memory(HashMap<String, Weight>),
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: HashMap<String, String>,
}

fn open(path: &Path) -> Result<MmapedSafetensors> {
    if !path.is_file() {
        return Err(Error::NotFound { what: "weights file", path: path.into() });
    }
    // SAFETY: the map is read-only; like every mmap reader we rely on nobody truncating the file under us.
    unsafe { MmapedSafetensors::new(path) }
        .map_err(|e| Error::Safetensors { path: path.into(), reason: candle_message(e) })
}

impl Weights {
    /// Opens `model.safetensors`, or the shards that `model.safetensors.index.json` lists.
    pub fn from_dir(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let mut files = Vec::new();
        let mut location = HashMap::new();
        if index_path.exists() {
            let index: ShardIndex = read_json(&index_path)?;
            let shards: BTreeSet<&String> = index.weight_map.values().collect();
            let mut shard_of = HashMap::new();
            for shard in shards {
                let path = dir.join(shard);
                let st = open(&path)?;
                for (name, _) in st.tensors() {
                    location.insert(name, files.len());
                }
                shard_of.insert(shard, files.len());
                files.push((path, st));
            }
            for (name, shard) in &index.weight_map {
                if location.get(name) != shard_of.get(shard) {
                    return Err(Error::Safetensors {
                        path: dir.join(shard),
                        reason: format!("does not hold `{name}`, which model.safetensors.index.json places there"),
                    });
                }
            }
        } else {
            let path = dir.join("model.safetensors");
            let st = open(&path)?;
            location = st.tensors().into_iter().map(|(name, _)| (name, 0)).collect();
            files.push((path, st));
        }
        Ok(Self {
            source: Source::Safetensors { files, location },
            dtype,
            device: device.clone(),
            quantization: Quantization::AsStored,
        })
    }

    /// Tensors already loaded, by HF name.
    pub fn from_tensors(tensors: HashMap<String, Weight>, dtype: DType, device: &Device) -> Self {
        Self { source: Source::Memory(tensors), dtype, device: device.clone(), quantization: Quantization::AsStored }
    }

    pub fn with_quantization(self, quantization: Quantization) -> Self {
        Self { quantization, ..self }
    }

    /// A weight matrix (out, in), quantized or dense as `Quantization` says. Quantized matrices
    /// run on the CPU only; on another device they are dequantized.
    pub fn matrix(&self, name: &str, shape: [usize; 2]) -> Result<Weight> {
        let stored = match &self.source {
            Source::Memory(tensors) => match tensors.get(name) {
                Some(w @ Weight::Quantized(_)) => {
                    let (n, k) = w.dims2()?;
                    check_shape(name, &shape, &[n, k])?;
                    w.clone()
                }
                _ => Weight::Dense(self.get(name, &shape)?),
            },
            Source::Safetensors { .. } => Weight::Dense(self.get(name, &shape)?),
        };
        let quantization = if self.device.is_cpu() { self.quantization } else { Quantization::Dequantize };
        match (quantization, stored) {
            (Quantization::To(to), Weight::Quantized(q)) if q.dtype() == to => Ok(Weight::Quantized(q)),
            (Quantization::To(to), w) => Weight::Dense(w.dequantize(DType::F32)?).quantize(to),
            (Quantization::Dequantize, w @ Weight::Quantized(_)) => {
                Ok(Weight::Dense(w.dequantize(self.dtype)?.to_device(&self.device)?))
            }
            (_, w) => Ok(w),
        }
    }

    /// Loads `name`, checks its shape, and converts it to the compute dtype on the device.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let missing = || Error::MissingWeight { name: name.into() };
        let (files, location) = match &self.source {
            Source::Safetensors { files, location } => (files, location),
            Source::Memory(tensors) => {
                let w = tensors.get(name).ok_or_else(missing)?;
                let t = w.dequantize(self.dtype)?;
                check_shape(name, shape, t.dims())?;
                return Ok(t.to_device(&self.device)?);
            }
        };
        let file = *location.get(name).ok_or_else(missing)?;
        let (path, st) = &files[file];
        let bad = |e| Error::Safetensors { path: path.clone(), reason: format!("`{name}`: {}", candle_message(e)) };
        let view = st.get(name).map_err(bad)?;
        check_shape(name, shape, view.shape())?;
        let tensor = view.load(&self.device).map_err(bad)?;
        if !tensor.dtype().is_float() {
            return Err(Error::Safetensors {
                path: path.clone(),
                reason: format!("`{name}` has dtype {:?}; weights must be float", tensor.dtype()),
            });
        }
        Ok(tensor.to_dtype(self.dtype)?)
    }
}

fn check_shape(name: &str, expected: &[usize], found: &[usize]) -> Result<()> {
    if expected == found {
        return Ok(());
    }
    Err(Error::WeightShape { name: name.into(), expected: expected.to_vec(), found: found.to_vec() })
}
