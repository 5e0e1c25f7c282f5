//! The process's CPU thread count, fixed once.

use crate::error::{Error, Result};

/// Fixes the CPU thread count for the process and returns it. candle sizes its thread pools
/// once, from RAYON_NUM_THREADS, and without the variable rereads /proc and sysfs on every
/// matmul (measured as 7x a small model's decode step), so it is set once here.
pub(crate) fn pin_thread_count(requested: Option<usize>) -> Result<usize> {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    if requested == Some(0) {
        return Err(Error::invalid("num_threads must be at least 1"));
    }
    let threads = *THREADS.get_or_init(|| {
        let threads = std::env::var("RAYON_NUM_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|n| *n > 0)
            .or(requested)
            .unwrap_or_else(candle_core::utils::get_num_threads);
        // std's environment lock orders this against candle's own reads of the variable.
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
        threads
    });
    match requested {
        Some(n) if n != threads => Err(Error::invalid(format!(
            "num_threads={n}, but this process already runs on {threads} threads (set by the first model \
             loaded, or RAYON_NUM_THREADS); the thread count cannot change once set"
        ))),
        _ => Ok(threads),
    }
}

/// The CPU threads this process computes on.
pub fn num_threads() -> usize {
    pin_thread_count(None).unwrap_or(1)
}
