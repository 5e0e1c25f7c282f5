//! The x86-64 paths of the CPU kernels, each chosen at run time where the CPU has its features:
//! the format loads (`loads`), decode's row products (`decode`), and prompts' bf16 products on
//! AVX512-BF16 (`bf16`) and AMX tiles (`amx`). The portable paths in `cpu/` are the reference
//! each is tested against.

pub mod amx;
pub mod bf16;
pub mod decode;
pub mod lanes;
pub mod loads;
