//! Checkpoint tensors by HF name, with named errors: memory-mapped safetensors (single-file or
//! sharded), or tensors a GGUF reader has gathered. On the CPU, matrices whose stored format is
//! used as it is stay in the mapped file (`Weight::Mapped`); the rest are loaded and converted.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::tensor::{Metadata, TensorView};
use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;

use crate::config::read_json;
use crate::error::{candle_message, Error, Result};
use crate::kernels::cpu::Precision;
use crate::loading::mapped::{self, Mapped};
use crate::loading::quantization::Quantization;
use crate::loading::weight::Weight;

/// Whether a matrix stored as `format` is used as stored, for a model computing in `dtype`.
/// As stored, only f32 converts (to a dtype other than f32); f16/bf16 matrices are computed in
/// f32, like the quantized types.
fn keeps(format: GgmlDType, dtype: DType, quantization: Quantization) -> bool {
    let exact = matches!(
        (format, dtype),
        (GgmlDType::F32, DType::F32) | (GgmlDType::F16, DType::F16) | (GgmlDType::BF16, DType::BF16)
    );
    match quantization {
        Quantization::To(to) => to == format,
        Quantization::Dequantize => exact,
        Quantization::AsStored => exact || format != GgmlDType::F32,
    }
}

/// Every tensor of a checkpoint, converted to the compute dtype when asked for.
pub struct Weights {
    source: Source,
    dtype: DType,
    device: Device,
    quantization: Quantization,
    precision: Precision,
}

enum Source {
    Safetensors {
        files: Vec<SafetensorsFile>,
        /// Tensor name -> index into `files`.
        location: HashMap<String, usize>,
    },
    Memory(HashMap<String, Weight>),
}

/// The name of matrix `e` of stack `stack` where a loader splits the stack into its matrices
/// (GGUF's experts).
pub fn expert_name(stack: &str, e: usize) -> String {
    format!("{stack}[{e}]")
}

/// One safetensors file, mapped, and its validated header.
struct SafetensorsFile {
    path: PathBuf,
    map: Arc<Mmap>,
    /// Where the tensor data starts: after the header's 8-byte length and the header.
    data_start: usize,
    header: Metadata,
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: HashMap<String, String>,
}

fn open(path: &Path) -> Result<SafetensorsFile> {
    if !path.is_file() {
        return Err(Error::NotFound { what: "weights file", path: path.into() });
    }
    let map = mapped::map(path)?;
    let (header_len, header) = SafeTensors::read_metadata(&map)
        .map_err(|e| Error::Safetensors { path: path.into(), reason: e.to_string() })?;
    Ok(SafetensorsFile { path: path.into(), map, data_start: 8 + header_len, header })
}

impl SafetensorsFile {
    /// `name`'s dtype, shape and bytes (read_metadata checked that they lie in the file).
    fn view(&self, name: &str) -> Option<(Dtype, &[usize], usize, &[u8])> {
        let info = self.header.info(name)?;
        let (start, end) = info.data_offsets;
        let at = self.data_start + start;
        Some((info.dtype, &info.shape, at, &self.map[at..self.data_start + end]))
    }
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
                for name in st.header.tensors().into_keys() {
                    location.insert(name, files.len());
                }
                shard_of.insert(shard, files.len());
                files.push(st);
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
            location = st.header.tensors().into_keys().map(|name| (name, 0)).collect();
            files.push(st);
        }
        Ok(Self {
            source: Source::Safetensors { files, location },
            dtype,
            device: device.clone(),
            quantization: Quantization::AsStored,
            precision: Precision::default(),
        })
    }

    /// Tensors already loaded, by HF name.
    pub fn from_tensors(tensors: HashMap<String, Weight>, dtype: DType, device: &Device) -> Self {
        Self {
            source: Source::Memory(tensors),
            dtype,
            device: device.clone(),
            quantization: Quantization::AsStored,
            precision: Precision::default(),
        }
    }

    pub fn with_quantization(self, quantization: Quantization) -> Self {
        Self { quantization, ..self }
    }

    /// How the projections built from these weights take a prompt's activations.
    pub fn with_precision(self, precision: Precision) -> Self {
        Self { precision, ..self }
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The device tensors are loaded onto.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// A weight matrix (out, in), quantized, mapped or dense as `Quantization` says. Quantized
    /// and mapped matrices run on the CPU only; on another device they are dequantized.
    pub fn matrix(&self, name: &str, shape: [usize; 2]) -> Result<Weight> {
        let stored = match &self.source {
            Source::Memory(tensors) => match tensors.get(name) {
                Some(w) if w.stored_type().is_some() => {
                    let (n, k) = w.dims2()?;
                    check_shape(name, &shape, &[n, k])?;
                    w.clone()
                }
                _ => Weight::Dense(self.get(name, &shape)?),
            },
            Source::Safetensors { .. } => match self.mapped(name, shape)? {
                Some(m) => Weight::Mapped(Arc::new(m)),
                None => Weight::Dense(self.get(name, &shape)?),
            },
        };
        self.convert(stored)
    }

    /// Whether the checkpoint holds tensor `name`, or a stack `name` split at load.
    pub fn contains(&self, name: &str) -> bool {
        match &self.source {
            Source::Safetensors { location, .. } => location.contains_key(name),
            Source::Memory(tensors) => tensors.contains_key(name) || tensors.contains_key(&expert_name(name, 0)),
        }
    }

    /// The `count` matrices (out, in) of a stack stored as one (count, out, in) tensor (a mixture's
    /// experts), each as `matrix` gives it: in place in the mapped file where it can be.
    pub fn stacked_matrices(&self, name: &str, count: usize, shape: [usize; 2]) -> Result<Vec<Weight>> {
        if let Source::Memory(_) = &self.source {
            return (0..count).map(|e| self.matrix(&expert_name(name, e), shape)).collect();
        }
        let stored = match self.mapped_stack(name, count, shape)? {
            Some(m) => m.into_iter().map(|m| Weight::Mapped(Arc::new(m))).collect(),
            None => {
                let all = self.get(name, &[count, shape[0], shape[1]])?;
                (0..count).map(|e| Ok(Weight::Dense(all.get(e)?))).collect::<Result<Vec<_>>>()?
            }
        };
        stored.into_iter().map(|w| self.convert(w)).collect()
    }

    /// A weight as loaded, quantized, kept or converted as `Quantization` and the device say.
    fn convert(&self, stored: Weight) -> Result<Weight> {
        let quantization = if self.device.is_cpu() { self.quantization } else { Quantization::Dequantize };
        match (stored.stored_type(), quantization) {
            (Some(format), _) if self.device.is_cpu() && keeps(format, self.dtype, quantization) => Ok(stored),
            (_, Quantization::To(to)) => Weight::Dense(stored.dequantize(DType::F32)?).quantize(to),
            (None, _) => Ok(stored),
            (Some(_), _) => Ok(Weight::Dense(stored.dequantize(self.dtype)?.to_device(&self.device)?)),
        }
    }

    /// Safetensors matrix `name`, read in place, where its dtype is used as stored (CPU only).
    fn mapped(&self, name: &str, shape: [usize; 2]) -> Result<Option<Mapped>> {
        let Some((map, at, format)) = self.in_place(name, &shape)? else { return Ok(None) };
        Ok(Mapped::new(map, at, format, (shape[0], shape[1])))
    }

    /// `mapped` for each matrix of a (count, out, in) stack.
    fn mapped_stack(&self, name: &str, count: usize, shape: [usize; 2]) -> Result<Option<Vec<Mapped>>> {
        let Some((map, at, format)) = self.in_place(name, &[count, shape[0], shape[1]])? else { return Ok(None) };
        let bytes = shape[0] * shape[1] * format.type_size();
        Ok((0..count).map(|e| Mapped::new(map, at + e * bytes, format, (shape[0], shape[1]))).collect())
    }

    /// Where safetensors tensor `name` (of `shape`) starts in its mapped file and its format, when
    /// it is used as stored (CPU only).
    fn in_place(&self, name: &str, shape: &[usize]) -> Result<Option<(&Arc<Mmap>, usize, GgmlDType)>> {
        let Source::Safetensors { files, location } = &self.source else { return Ok(None) };
        let Some((dtype, found, at, _)) = location.get(name).and_then(|&f| files[f].view(name)) else {
            return Ok(None);
        };
        check_shape(name, shape, found)?;
        let format = match dtype {
            Dtype::F32 => GgmlDType::F32,
            Dtype::F16 => GgmlDType::F16,
            Dtype::BF16 => GgmlDType::BF16,
            _ => return Ok(None),
        };
        if !self.device.is_cpu() || !keeps(format, self.dtype, self.quantization) {
            return Ok(None);
        }
        Ok(Some((&files[location[name]].map, at, format)))
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
        let file = &files[*location.get(name).ok_or_else(missing)?];
        let bad =
            |reason: String| Error::Safetensors { path: file.path.clone(), reason: format!("`{name}`: {reason}") };
        let (dtype, found, _, data) = file.view(name).ok_or_else(missing)?;
        check_shape(name, shape, found)?;
        let view = TensorView::new(dtype, found.to_vec(), data).map_err(|e| bad(e.to_string()))?;
        let tensor = view.load(&self.device).map_err(|e| bad(candle_message(e)))?;
        if !tensor.dtype().is_float() {
            return Err(Error::Safetensors {
                path: file.path.clone(),
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
