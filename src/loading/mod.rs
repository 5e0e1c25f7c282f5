//! Reading checkpoints: HF safetensors directories and GGUF files, weight matrices kept in place in
//! the memory-mapped file where their stored format is computed on as it is, and GGUF -> HF.

pub mod convert;
pub mod gguf;
pub mod mapped;
pub mod quantization;
pub mod safetensors;
pub mod weight;
