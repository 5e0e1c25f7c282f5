//! GGUF checkpoints (llama.cpp's format), architectures `llama`, `granite`, `granitemoe` and
//! `granitehybrid`: the config from the metadata, weights under HF names and in HF layout
//! (quantized ones kept quantized). A stack of experts (E, out, in) becomes E matrices, named by
//! `expert_name`.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{Device, Tensor};
use serde_json::json;

use crate::config::{Family, GraniteConfig};
use crate::error::{candle_message, Error, Result};
use crate::loading::mapped::{self, Mapped};
use crate::loading::safetensors::expert_name;
use crate::loading::weight::Weight;
use crate::text::chat::ChatTemplate;

/// An opened GGUF file: its metadata and tensor index, read without the tensor data.
pub struct Gguf {
    path: std::path::PathBuf,
    content: Content,
}

fn bad(path: &Path, reason: impl std::fmt::Display) -> Error {
    Error::Unsupported(format!("{}: {reason}", path.display()))
}

impl Gguf {
    pub fn open(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::NotFound { what: "GGUF file", path: path.into() });
        }
        let file = File::open(path).map_err(|source| Error::Io { path: path.into(), source })?;
        // candle 0.11.1's reader divides by `general.alignment` unchecked: 0 panics.
        let read = std::panic::catch_unwind(|| Content::read(&mut BufReader::new(file)));
        let content = read
            .map_err(|_| bad(path, "not a readable GGUF file: its header crashed the reader (general.alignment 0?)"))?
            .map_err(|e| bad(path, format!("not a readable GGUF file: {}", candle_message(e))))?;
        let gguf = Self { path: path.into(), content };
        gguf.check_sizes()?;
        Ok(gguf)
    }

    /// Every tensor's data must fit in the file: candle multiplies the dimensions unchecked, and a
    /// product that wraps around passes its own size check and panics later.
    fn check_sizes(&self) -> Result<()> {
        let len = std::fs::metadata(&self.path).map_err(|source| Error::Io { path: self.path.clone(), source })?.len();
        for (name, info) in &self.content.tensor_infos {
            let dims = info.shape.dims();
            let (block, block_bytes) = (info.ggml_dtype.block_size(), info.ggml_dtype.type_size());
            let bytes = dims
                .iter()
                .try_fold(1usize, |n, &d| n.checked_mul(d))
                .and_then(|n| (n / block).checked_mul(block_bytes));
            if bytes.is_none_or(|b| b as u64 > len) {
                return Err(bad(&self.path, format!("tensor `{name}` of shape {dims:?} does not fit in the file")));
            }
        }
        Ok(())
    }

    pub fn content(&self) -> &Content {
        &self.content
    }

    pub fn metadata(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn architecture(&self) -> Result<&str> {
        let arch = self.metadata("general.architecture").and_then(|v| v.to_string().ok()).map(String::as_str);
        match arch {
            Some(a @ ("llama" | "granite" | "granitemoe" | "granitehybrid")) => Ok(a),
            Some(other) => Err(bad(
                &self.path,
                format!("architecture `{other}` is not supported (llama, granite, granitemoe, granitehybrid)"),
            )),
            None => Err(bad(&self.path, "general.architecture is missing")),
        }
    }

    fn number(&self, key: &str) -> Option<f64> {
        value_number(self.metadata(key)?)
    }

    /// A count llama.cpp may write per layer: an array, or None for one value.
    fn layer_counts(&self, key: &str) -> Result<Option<Vec<usize>>> {
        let Some(Value::Array(values)) = self.metadata(key) else { return Ok(None) };
        let counts = values
            .iter()
            .map(|v| value_number(v).filter(|n| *n >= 0.0).map(|n| n as usize))
            .collect::<Option<_>>()
            .ok_or_else(|| bad(&self.path, format!("metadata `{key}` holds something other than counts")))?;
        Ok(Some(counts))
    }

    /// A count llama.cpp may write per layer, as an array with 0 on layers without attention
    /// (Granite 4.0's `attention.head_count_kv`): the one value of the layers that have it.
    fn layer_count(&self, key: &str) -> Result<Option<usize>> {
        let Some(counts) = self.layer_counts(key)? else { return Ok(self.number(key).map(|n| n as usize)) };
        let mut used = counts.iter().copied().filter(|n| *n > 0);
        let first = used.next();
        if used.any(|n| Some(n) != first) {
            return Err(bad(
                &self.path,
                format!("metadata `{key}` differs between layers ({counts:?}); not supported"),
            ));
        }
        Ok(first)
    }

    fn required(&self, key: &str) -> Result<f64> {
        self.number(key).ok_or_else(|| bad(&self.path, format!("metadata `{key}` is missing")))
    }

    /// What the file says of itself for people: its name and llama.cpp's name of its file type.
    pub fn describe(&self) -> (Option<String>, Option<String>) {
        let name = self.metadata("general.name").and_then(|v| v.to_string().ok()).cloned();
        let file_type = self.number("general.file_type").map(|t| file_type_name(t as u32));
        (name, file_type)
    }

    /// The HF config this file's metadata describes.
    pub fn config(&self) -> Result<GraniteConfig> {
        GraniteConfig::from_json(self.config_json()?, &self.path)
    }

    /// `config()` as the config.json transformers would read.
    pub fn config_json(&self) -> Result<serde_json::Value> {
        let arch = self.architecture()?;
        let key = |k: &str| format!("{arch}.{k}");
        let int = |k: &str| -> Result<usize> { Ok(self.required(&key(k))? as usize) };
        let heads = self
            .layer_count(&key("attention.head_count"))?
            .ok_or_else(|| bad(&self.path, format!("metadata `{}` is missing", key("attention.head_count"))))?;
        let vocab = match self.number(&key("vocab_size")) {
            Some(v) => v as usize,
            None => self.metadata("tokenizer.ggml.tokens").and_then(|v| v.to_vec().ok()).map_or(0, Vec::len),
        };
        let id = |k: &str| self.number(&format!("tokenizer.ggml.{k}")).map(|v| v as u32);
        let mut cfg = json!({
            "model_type": arch,
            "vocab_size": vocab,
            "hidden_size": int("embedding_length")?,
            "intermediate_size": int("feed_forward_length")?,
            "num_hidden_layers": int("block_count")?,
            "num_attention_heads": heads,
            "num_key_value_heads": self.layer_count(&key("attention.head_count_kv"))?.unwrap_or(heads),
            "max_position_embeddings": int("context_length")?,
            "rms_norm_eps": self.number(&key("attention.layer_norm_rms_epsilon")).unwrap_or(1e-6),
            "rope_theta": self.number(&key("rope.freq_base")).unwrap_or(10_000.0),
            "tie_word_embeddings": !self.content.tensor_infos.contains_key("output.weight"),
            "attention_bias": self.content.tensor_infos.contains_key("blk.0.attn_q.bias"),
            "mlp_bias": self.content.tensor_infos.contains_key("blk.0.ffn_gate.bias"),
            "bos_token_id": id("bos_token_id"),
            "eos_token_id": id("eos_token_id"),
            "pad_token_id": id("padding_token_id"),
        });
        let experts = self.number(&key("expert_count")).map_or(0, |n| n as usize);
        if arch == "granitehybrid" {
            self.hybrid_config(&mut cfg, experts)?;
        } else if experts > 0 {
            let shared = self.number(&key("expert_shared_feed_forward_length")).map(|n| n as usize);
            cfg["model_type"] = json!(if shared.is_some() { "granitemoeshared" } else { "granitemoe" });
            cfg["num_local_experts"] = json!(experts);
            cfg["num_experts_per_tok"] = json!(int("expert_used_count")?);
            cfg["shared_intermediate_size"] = json!(shared);
        }
        if let Some(dim) = self.number(&key("attention.key_length")).or(self.number(&key("rope.dimension_count"))) {
            cfg["head_dim"] = json!(dim as usize);
        }
        if let Some(kind) = self.metadata(&key("rope.scaling.type")).and_then(|v| v.to_string().ok()) {
            if kind != "none" {
                let factor = self.number(&key("rope.scaling.factor"));
                cfg["rope_scaling"] = json!({"type": kind, "factor": factor});
            }
        }
        // llama.cpp's converter writes the four Granite scalars under these names.
        let scalars = [
            ("embedding_scale", "embedding_multiplier"),
            ("residual_scale", "residual_multiplier"),
            ("attention.scale", "attention_multiplier"),
            ("logit_scale", "logits_scaling"),
        ];
        for (gguf_key, hf_key) in scalars {
            if let Some(v) = self.number(&key(gguf_key)) {
                cfg[hf_key] = json!(v);
            }
        }
        Ok(cfg)
    }

    /// The rest of a `granitehybrid` file's config: the layer types (no KV heads: Mamba2), the
    /// Mamba2 sizes, the experts and the shared MLP.
    fn hybrid_config(&self, cfg: &mut serde_json::Value, experts: usize) -> Result<()> {
        let key = |k: &str| format!("granitehybrid.{k}");
        let int = |k: &str| -> Result<usize> { Ok(self.required(&key(k))? as usize) };
        let kv = self.layer_counts(&key("attention.head_count_kv"))?;
        let layers = int("block_count")?;
        let types: Vec<&str> = match &kv {
            Some(counts) if counts.len() == layers => {
                counts.iter().map(|&n| if n == 0 { "mamba" } else { "attention" }).collect()
            }
            _ => {
                return Err(bad(
                    &self.path,
                    format!(
                        "metadata `{}` must list the KV heads of each of the {layers} layers",
                        key("attention.head_count_kv")
                    ),
                ))
            }
        };
        let first_mamba = types.iter().position(|t| *t == "mamba");
        let has = |tensor: &str| {
            first_mamba.is_some_and(|i| self.content.tensor_infos.contains_key(&format!("blk.{i}.{tensor}")))
        };
        let (heads, inner, hidden) = (int("ssm.time_step_rank")?, int("ssm.inner_size")?, int("embedding_length")?);
        if heads == 0 || hidden == 0 || !inner.is_multiple_of(heads) || !inner.is_multiple_of(hidden) {
            return Err(bad(&self.path, format!("ssm.inner_size {inner} is not a multiple of ssm.time_step_rank {heads} and of embedding_length {hidden}")));
        }
        let rope = matches!(self.metadata(&key("rope.scaling.finetuned")), Some(Value::Bool(true)));
        let shared =
            self.number(&key("expert_shared_feed_forward_length")).map_or(int("feed_forward_length")?, |n| n as usize);
        let fields = json!({
            "model_type": "granitemoehybrid",
            "layer_types": types,
            "position_embedding_type": if rope { "rope" } else { "nope" },
            "num_local_experts": experts,
            "num_experts_per_tok": if experts > 0 { int("expert_used_count")? } else { 0 },
            "shared_intermediate_size": shared,
            "mamba_n_heads": heads,
            "mamba_d_head": inner / heads,
            "mamba_expand": inner / hidden,
            "mamba_n_groups": int("ssm.group_count")?,
            "mamba_d_state": int("ssm.state_size")?,
            "mamba_d_conv": int("ssm.conv_kernel")?,
            "mamba_conv_bias": has("ssm_conv1d.bias"),
            "mamba_proj_bias": has("ssm_in.bias"),
        });
        for (k, v) in fields.as_object().expect("an object") {
            cfg[k] = v.clone();
        }
        Ok(())
    }

    /// The text of token `id` in the file's vocabulary.
    pub fn token(&self, id: u32) -> Option<&str> {
        let tokens = self.metadata("tokenizer.ggml.tokens")?.to_vec().ok()?;
        tokens.get(id as usize)?.to_string().ok().map(String::as_str)
    }

    /// The `tokenizer.chat_template` metadata, with the file's bos and eos tokens.
    pub fn chat_template(&self) -> Result<Option<ChatTemplate>> {
        let Some(source) = self.metadata("tokenizer.chat_template").and_then(|v| v.to_string().ok()) else {
            return Ok(None);
        };
        let token = |key: &str| self.token(self.number(&format!("tokenizer.ggml.{key}"))? as u32);
        Ok(Some(ChatTemplate::new(source.clone(), token("bos_token_id"), token("eos_token_id"))?))
    }

    /// Every tensor under its HF name, q and k rows back in HF's order. Matrices that `gemv`
    /// reads stay in the mapped file; q and k (reordered), 1-D tensors and the k-quants are read:
    /// f32 and 1-D ones dense in f32, the other matrices in their GGUF type.
    pub fn weights(&self, cfg: &GraniteConfig) -> Result<HashMap<String, Weight>> {
        let map = mapped::map(&self.path)?;
        let file = File::open(&self.path).map_err(|source| Error::Io { path: self.path.clone(), source })?;
        let mut reader = BufReader::new(file);
        let mut out = HashMap::new();
        for (name, info) in &self.content.tensor_infos {
            let hybrid = cfg.family()? == Family::Hybrid;
            let hf =
                hf_name(name, hybrid).ok_or_else(|| bad(&self.path, format!("tensor `{name}` is not supported")))?;
            if let &[experts, n, k] = info.shape.dims() {
                let at = usize::try_from(self.content.tensor_data_offset + info.offset).ok();
                let split = self.experts(&map, at, &mut reader, name, (experts, n, k))?;
                out.extend(split.into_iter().enumerate().map(|(e, w)| (expert_name(&hf, e), w)));
                continue;
            }
            let permuted = name.contains(".attn_q.") || name.contains(".attn_k.");
            // Mamba2's small matrices that transformers shapes otherwise.
            let relaid = name.contains(".ssm_norm.") || name.contains(".ssm_conv1d.");
            let in_place = match info.shape.dims() {
                &[n, k] if !permuted && !relaid => usize::try_from(self.content.tensor_data_offset + info.offset)
                    .ok()
                    .and_then(|at| Mapped::new(&map, at, info.ggml_dtype, (n, k))),
                _ => None,
            };
            if let Some(m) = in_place {
                out.insert(hf, Weight::Mapped(Arc::new(m)));
                continue;
            }
            let q = self
                .content
                .tensor(&mut reader, name, &Device::Cpu)
                .map_err(|e| bad(&self.path, format!("tensor `{name}`: {}", candle_message(e))))?;
            let heads = if name.contains(".attn_q.") {
                Some(cfg.num_attention_heads)
            } else if name.contains(".attn_k.") {
                Some(cfg.num_kv_heads())
            } else {
                None
            };
            // f16 and bf16 matrices stay half precision, like the quantized types.
            let weight = if q.dtype() == GgmlDType::F32 || q.shape().rank() != 2 || relaid {
                let t = q.dequantize(&Device::Cpu)?;
                Weight::Dense(match heads {
                    Some(h) => unpermute(&t, h)?,
                    None => self.mamba_layout(name, t)?,
                })
            } else {
                match heads {
                    Some(h) => Weight::Quantized(Arc::new(unpermute_quantized(&q, h)?)),
                    None => Weight::Quantized(Arc::new(q)),
                }
            };
            out.insert(hf, weight);
        }
        Ok(out)
    }
}

impl Gguf {
    /// The matrices of tensor `name`, a stack of (n, k) matrices at byte `at` of the file: read
    /// in place where `gemv` reads their format, else each kept in its GGUF type (f32 dense).
    fn experts(
        &self,
        map: &Arc<memmap2::Mmap>,
        at: Option<usize>,
        reader: &mut BufReader<File>,
        name: &str,
        (count, n, k): (usize, usize, usize),
    ) -> Result<Vec<Weight>> {
        let format = self.content.tensor_infos[name].ggml_dtype;
        let bytes = n * k / format.block_size() * format.type_size();
        let mapped: Option<Vec<Weight>> = at.and_then(|at| {
            (0..count)
                .map(|e| Mapped::new(map, at + e * bytes, format, (n, k)).map(|m| Weight::Mapped(Arc::new(m))))
                .collect()
        });
        if let Some(m) = mapped {
            return Ok(m);
        }
        let q = self
            .content
            .tensor(reader, name, &Device::Cpu)
            .map_err(|e| bad(&self.path, format!("tensor `{name}`: {}", candle_message(e))))?;
        if q.dtype() == GgmlDType::F32 {
            let t = q.dequantize(&Device::Cpu)?;
            return (0..count).map(|e| Ok(Weight::Dense(t.get(e)?))).collect();
        }
        let data = q.data()?;
        data.chunks_exact(bytes)
            .map(|chunk| {
                let storage = QStorage::from_data(Cow::Owned(chunk.to_vec()), &Device::Cpu, format)?;
                Ok(Weight::Quantized(Arc::new(QTensor::new(storage, (n, k))?)))
            })
            .collect()
    }
}

impl Gguf {
    /// A Mamba2 tensor as transformers has it: llama.cpp's converter stores A = -exp(A_log)
    /// (heads, 1), D (heads, 1), the convolution (channels, kernel) and the norm (groups, width).
    fn mamba_layout(&self, name: &str, t: Tensor) -> Result<Tensor> {
        let part = name.split('.').nth(2).unwrap_or_default();
        Ok(match part {
            "ssm_a" => {
                let a = t.flatten_all()?;
                if !a.to_vec1::<f32>()?.iter().all(|v| *v < 0.0) {
                    return Err(bad(&self.path, format!("tensor `{name}` (A = -exp(A_log)) must be negative")));
                }
                a.neg()?.log()?
            }
            "ssm_d" | "ssm_norm" => t.flatten_all()?,
            "ssm_conv1d" if t.rank() == 2 => t.unsqueeze(1)?,
            _ => t,
        })
    }
}

/// llama.cpp's converter interleaves the two rotary halves of each head's q/k rows; this is
/// transformers' `_reverse_permute_weights`. (heads * head_dim, ...) in both.
fn unpermute(t: &Tensor, heads: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let half = rotary_half(dims[0], heads)?;
    let rest: usize = dims[1..].iter().product();
    // (heads, half, 2, rest) -> (heads, 2, half, rest)
    Ok(t.reshape((heads, half, 2, rest))?.transpose(1, 2)?.contiguous()?.reshape(dims)?)
}

/// Rows per rotary half of one head, for `rows` rows of q or k over `heads` heads.
fn rotary_half(rows: usize, heads: usize) -> Result<usize> {
    if rows == 0 || heads == 0 || !rows.is_multiple_of(2 * heads) {
        return Err(Error::Unsupported(format!("{rows} q/k rows do not split into {heads} heads of even size")));
    }
    Ok(rows / heads / 2)
}

/// `unpermute` on the rows of a quantized matrix, which are whole blocks.
fn unpermute_quantized(q: &QTensor, heads: usize) -> Result<QTensor> {
    let (rows, _) = q.shape().dims2()?;
    let half = rotary_half(rows, heads)?;
    let data = q.data()?;
    let row_bytes = data.len() / rows;
    let mut out = Vec::with_capacity(data.len());
    for h in 0..heads {
        for s in 0..2 {
            for j in 0..half {
                let from = h * 2 * half + j * 2 + s;
                out.extend_from_slice(&data[from * row_bytes..(from + 1) * row_bytes]);
            }
        }
    }
    let storage = QStorage::from_data(Cow::Owned(out), &Device::Cpu, q.dtype())?;
    Ok(QTensor::new(storage, q.shape().clone())?)
}

/// The HF weight name of a llama.cpp tensor name. llama.cpp splits the MoE families' fused gate
/// and up matrices (`input_linear`); `gate_linear` and `up_linear` name the halves. In a hybrid
/// (Granite 4.0) without experts, `ffn_*` is the shared MLP.
fn hf_name(gguf: &str, hybrid: bool) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some(name.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    // Mamba2's per-head vectors, which llama.cpp names without a suffix (or under another).
    let whole = match rest {
        "ssm_a" => Some("mamba.A_log"),
        "ssm_d" => Some("mamba.D"),
        "ssm_dt.bias" => Some("mamba.dt_bias"),
        _ => None,
    };
    if let Some(hf) = whole {
        return Some(format!("model.layers.{layer}.{hf}"));
    }
    let (part, kind) = rest.rsplit_once('.')?;
    let hf = match part {
        "ffn_gate" if hybrid => "shared_mlp.gate_linear",
        "ffn_up" if hybrid => "shared_mlp.up_linear",
        "ffn_down" if hybrid => "shared_mlp.output_linear",
        "ssm_in" => "mamba.in_proj",
        "ssm_conv1d" => "mamba.conv1d",
        "ssm_norm" => "mamba.norm",
        "ssm_out" => "mamba.out_proj",
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "ffn_gate_inp" => "block_sparse_moe.router.layer",
        "ffn_gate_exps" => "block_sparse_moe.gate_linear",
        "ffn_up_exps" => "block_sparse_moe.up_linear",
        "ffn_down_exps" => "block_sparse_moe.output_linear",
        "ffn_gate_shexp" => "shared_mlp.gate_linear",
        "ffn_up_shexp" => "shared_mlp.up_linear",
        "ffn_down_shexp" => "shared_mlp.output_linear",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// llama.cpp's name of a `general.file_type` value (LLAMA_FTYPE_*).
fn file_type_name(file_type: u32) -> String {
    let name = match file_type {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        32 => "BF16",
        other => return format!("file type {other}"),
    };
    name.to_string()
}

fn value_number(v: &Value) -> Option<f64> {
    v.to_f64()
        .ok()
        .or_else(|| v.to_f32().ok().map(f64::from))
        .or_else(|| v.to_u64().ok().map(|n| n as f64))
        .or_else(|| v.to_u32().ok().map(f64::from))
        .or_else(|| v.to_i32().ok().map(f64::from))
}
