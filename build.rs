//! With the `cuda` feature: compiles src/kernels/cuda/*.cu to PTX in OUT_DIR with nvcc, for src/kernels/cuda/mod.rs
//! to embed. Without it: nothing (no nvcc needed).

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let nvcc = std::env::var("CUDA_HOME").map_or_else(|_| "nvcc".into(), |h| format!("{h}/bin/nvcc"));
    let mut sources: Vec<PathBuf> = std::fs::read_dir("src/kernels/cuda")
        .expect("src/kernels/cuda")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    sources.sort();
    println!("cargo:rerun-if-changed=src/kernels/cuda");
    for src in sources {
        println!("cargo:rerun-if-changed={}", src.display());
        let ptx = out_dir.join(src.with_extension("ptx").file_name().unwrap());
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17", &format!("-arch=sm_{cap}"), "-o"])
            .arg(&ptx)
            .arg(&src)
            .status()
            .unwrap_or_else(|e| panic!("running {nvcc} (set CUDA_HOME or put nvcc on PATH): {e}"));
        assert!(status.success(), "nvcc failed on {}", src.display());
    }
}
