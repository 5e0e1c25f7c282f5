//! Checkpoint tensors by HF name, with named errors: memory-mapped safetensors (single-file or
//! sharded), or tensors already in memory (a dequantized GGUF).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::safetensors::{Load, MmapedSafetensors};
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::config::read_json;
use crate::error::{candle_message, Error, Result};

/// Every tensor of a checkpoint, converted to the compute dtype when asked for.
pub struct Weights {
    source: Source,
    dtype: DType,
    device: Device,
}

enum Source {
    Safetensors {
        files: Vec<(PathBuf, MmapedSafetensors)>,
        /// Tensor name -> index into `files`.
        location: HashMap<String, usize>,
    },
    Memory(HashMap<String, Tensor>),
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
        Ok(Self { source: Source::Safetensors { files, location }, dtype, device: device.clone() })
    }

    /// Tensors already loaded, by HF name.
    pub fn from_tensors(tensors: HashMap<String, Tensor>, dtype: DType, device: &Device) -> Self {
        Self { source: Source::Memory(tensors), dtype, device: device.clone() }
    }

    pub fn contains(&self, name: &str) -> bool {
        match &self.source {
            Source::Safetensors { location, .. } => location.contains_key(name),
            Source::Memory(tensors) => tensors.contains_key(name),
        }
    }

    /// Loads `name`, checks its shape, and converts it to the compute dtype on the device.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let missing = || Error::MissingWeight { name: name.into() };
        let (files, location) = match &self.source {
            Source::Safetensors { files, location } => (files, location),
            Source::Memory(tensors) => {
                let t = tensors.get(name).ok_or_else(missing)?;
                if t.dims() != shape {
                    return Err(Error::WeightShape {
                        name: name.into(),
                        expected: shape.to_vec(),
                        found: t.dims().to_vec(),
                    });
                }
                return Ok(t.to_dtype(self.dtype)?.to_device(&self.device)?);
            }
        };
        let file = *location.get(name).ok_or_else(missing)?;
        let (path, st) = &files[file];
        let bad = |e| Error::Safetensors { path: path.clone(), reason: format!("`{name}`: {}", candle_message(e)) };
        let view = st.get(name).map_err(bad)?;
        if view.shape() != shape {
            return Err(Error::WeightShape {
                name: name.into(),
                expected: shape.to_vec(),
                found: view.shape().to_vec(),
            });
        }
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
