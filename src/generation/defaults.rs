//! generation_config.json: the generation defaults a model directory sets, as in transformers.

use std::path::Path;

use serde::Deserialize;

use crate::config::{read_json, TokenIds};
use crate::error::{Error, Result};
use crate::generation::params::SamplingParams;

/// The parts of `generation_config.json` that set generation defaults, as in transformers.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct GenerationDefaults {
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub do_sample: Option<bool>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_k: Option<usize>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub repetition_penalty: Option<f64>,
    #[serde(default)]
    pub min_p: Option<f64>,
    #[serde(default)]
    pub max_new_tokens: Option<usize>,
}

impl GenerationDefaults {
    /// The defaults must be valid arguments themselves, so that a bad file fails at load.
    fn validate(&self) -> Result<()> {
        let bad = |field: &str, e: Error| Error::Config {
            field: format!("generation_config.json: {field}"),
            reason: e.to_string(),
        };
        if self.max_new_tokens == Some(0) {
            return Err(bad("max_new_tokens", Error::invalid("must be at least 1")));
        }
        self.sampling().validate().map_err(|e| bad("sampling", e))
    }

    /// The sampling parameters these defaults set, the rest as transformers' defaults.
    pub fn sampling(&self) -> SamplingParams {
        SamplingParams {
            do_sample: self.do_sample.unwrap_or(false),
            temperature: self.temperature.unwrap_or(1.0),
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
            min_p: self.min_p,
            ..Default::default()
        }
    }

    /// Reads and validates `generation_config.json` if the directory has one.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("generation_config.json");
        if !path.exists() {
            return Ok(Self::default());
        }
        let defaults: Self = read_json(&path)?;
        defaults.validate()?;
        Ok(defaults)
    }
}
