//! GGUF -> HF model directory: what transformers' `from_pretrained` reads, as GraniteForCausalLM.

use std::collections::HashMap;
use std::path::Path;

use serde_json::json;

use crate::error::{candle_message, Error, Result};
use crate::loading::gguf::Gguf;
use crate::text::gguf_tokenizer::hf_tokenizer_from_metadata;

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|source| Error::Json { path: path.into(), source })?;
    std::fs::write(path, text + "\n").map_err(|source| Error::Io { path: path.into(), source })
}

/// Writes config.json, generation_config.json, model.safetensors (float32), tokenizer.json and
/// tokenizer_config.json (with the chat template) for `src` into `out` (created if missing).
pub fn gguf_to_hf(src: &Path, out: &Path) -> Result<()> {
    let gguf = Gguf::open(src)?;
    let cfg = gguf.config()?;
    std::fs::create_dir_all(out).map_err(|source| Error::Io { path: out.into(), source })?;

    let mut config = gguf.config_json()?;
    // As GraniteForCausalLM every scalar must be explicit: Granite's defaults are not Llama's.
    config["architectures"] = json!(["GraniteForCausalLM"]);
    config["model_type"] = json!("granite");
    config["embedding_multiplier"] = json!(cfg.embedding_multiplier());
    config["residual_multiplier"] = json!(cfg.residual_multiplier());
    config["attention_multiplier"] = json!(cfg.attention_multiplier());
    config["logits_scaling"] = json!(cfg.logits_scaling());
    config["hidden_act"] = json!("silu");
    config["torch_dtype"] = json!("float32");
    write_json(&out.join("config.json"), &config)?;
    let ids = json!({"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"], "pad_token_id": config["pad_token_id"]});
    write_json(&out.join("generation_config.json"), &ids)?;

    let path = out.join("model.safetensors");
    let tensors = gguf
        .weights(&cfg)?
        .into_iter()
        .map(|(name, w)| Ok((name, w.dequantize(candle_core::DType::F32)?)))
        .collect::<Result<HashMap<_, _>>>()?;
    candle_core::safetensors::save(&tensors, &path)
        .map_err(|e| Error::Safetensors { path: path.clone(), reason: candle_message(e) })?;

    let path = out.join("tokenizer.json");
    hf_tokenizer_from_metadata(&gguf.content().metadata)?
        .save(&path, false)
        .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
    let token = |key: &str| config[key].as_u64().and_then(|id| gguf.token(id as u32));
    let mut tokenizer_config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "pad_token": token("pad_token_id"),
        "model_max_length": cfg.max_position_embeddings,
    });
    if let Some(template) = gguf.chat_template()? {
        tokenizer_config["chat_template"] = json!(template.source());
    }
    write_json(&out.join("tokenizer_config.json"), &tokenizer_config)
}
