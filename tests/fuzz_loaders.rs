//! A bounded, deterministic mutation fuzz of the loaders: a valid tiny GGUF, safetensors file and
//! config.json are damaged thousands of ways (bit flips, interesting bytes, length-field bumps,
//! truncations, config values) and loaded through `Generator::load`; whatever loads also runs a
//! short generation. An error is fine; a panic fails the test and the case is printed.

use std::io::Cursor;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use granite_rs::{GenerateParams, Generator, Sequence};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SEED: u64 = 0x0067_7261_6e69_7465;
const GGUF_CASES: usize = 6000;
const SAFETENSORS_CASES: usize = 3000;
const CONFIG_BYTE_CASES: usize = 500;

/// Loads `path` and, if that works, generates two tokens; Err is fine, a panic is returned.
fn load_and_run(path: &Path) -> Option<String> {
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        let Ok(g) = Generator::load(path, &Device::Cpu, None) else { return };
        let params = GenerateParams { max_new_tokens: Some(2), ..Default::default() };
        let _ = Sequence::new(Arc::new(g), vec![1, 2], params).and_then(|mut run| run.run());
    }));
    outcome.err().map(|panic| {
        panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default()
    })
}

/// One damage to a byte buffer, described for the failure report.
fn mutate(rng: &mut StdRng, data: &mut Vec<u8>, hot: usize) -> String {
    if data.is_empty() {
        return "nothing left".into();
    }
    // Three quarters of the mutations land in the `hot` prefix (headers), the rest anywhere.
    let end = if rng.random_bool(0.75) { hot } else { data.len() };
    let pos = rng.random_range(0..end.max(1)).min(data.len() - 1);
    match rng.random_range(0..5) {
        0 => {
            let bit = rng.random_range(0..8);
            data[pos] ^= 1 << bit;
            format!("flip bit {bit} at {pos}")
        }
        1 => {
            let value = [0x00, 0xFF, 0x7F, 0x80, 0x01, b'"', b'9'][rng.random_range(0..7)];
            data[pos] = value;
            format!("byte {value:#04x} at {pos}")
        }
        2 => {
            let values = [0, 1, u64::MAX, i64::MAX as u64, 1 << 32, u32::MAX as u64, data.len() as u64];
            let value = values[rng.random_range(0..values.len())];
            let width = if rng.random_bool(0.5) { 8 } else { 4 };
            let n = width.min(data.len() - pos);
            data[pos..pos + n].copy_from_slice(&value.to_le_bytes()[..n]);
            format!("{width}-byte {value:#x} at {pos}")
        }
        3 => {
            // A length or count field grown or shrunk by a little.
            let n = 8.min(data.len() - pos);
            let mut word = [0u8; 8];
            word[..n].copy_from_slice(&data[pos..pos + n]);
            let delta: i64 = [-1, 1, 2, 8, 64, 4096, -4096][rng.random_range(0..7)];
            let bumped = u64::from_le_bytes(word).wrapping_add(delta as u64);
            data[pos..pos + n].copy_from_slice(&bumped.to_le_bytes()[..n]);
            format!("u64 at {pos} bumped by {delta}")
        }
        _ => {
            data.truncate(pos);
            format!("truncated to {pos} bytes")
        }
    }
}

/// Applies `cases` mutations (one to three each) of `original` written to `path`; returns the
/// cases that panicked.
fn fuzz_file(rng: &mut StdRng, original: &[u8], hot: usize, path: &Path, cases: usize) -> Vec<String> {
    let mut panics = Vec::new();
    for case in 0..cases {
        let mut data = original.to_vec();
        let steps: Vec<String> = (0..rng.random_range(1..=3)).map(|_| mutate(rng, &mut data, hot)).collect();
        std::fs::write(path, &data).unwrap();
        if let Some(message) = load_and_run(path) {
            panics.push(format!("case {case}: {}: {message}", steps.join(", ")));
        }
    }
    panics
}

fn report(target: &str, cases: usize, panics: &[String]) {
    eprintln!("{target}: {cases} mutated files loaded, {} panics", panics.len());
    assert!(panics.is_empty(), "{target}: loading panicked on:\n{}", panics.join("\n"));
}

type Metadata = Vec<(&'static str, Value)>;
type Tensors = Vec<(&'static str, Arc<QTensor>)>;

/// A valid llama GGUF: hidden 32, 4 heads of 8, 2 kv heads, 1 layer, a 32-token gpt2
/// vocabulary, F32 norms, F16 and Q8_0 matrices.
fn tiny_gguf() -> (Metadata, Tensors) {
    let mut rng = StdRng::seed_from_u64(SEED);
    let mut matrix = |rows: usize, cols: usize, dtype: GgmlDType| {
        let values: Vec<f32> = (0..rows * cols).map(|_| rng.random_range(-0.3..0.3)).collect();
        Arc::new(QTensor::quantize(&Tensor::from_vec(values, (rows, cols), &Device::Cpu).unwrap(), dtype).unwrap())
    };
    let ones =
        || Arc::new(QTensor::quantize(&Tensor::ones(32, DType::F32, &Device::Cpu).unwrap(), GgmlDType::F32).unwrap());
    let tensors = vec![
        ("token_embd.weight", matrix(32, 32, GgmlDType::F32)),
        ("output_norm.weight", ones()),
        ("blk.0.attn_norm.weight", ones()),
        ("blk.0.ffn_norm.weight", ones()),
        ("blk.0.attn_q.weight", matrix(32, 32, GgmlDType::Q8_0)),
        ("blk.0.attn_k.weight", matrix(16, 32, GgmlDType::F16)),
        ("blk.0.attn_v.weight", matrix(16, 32, GgmlDType::F32)),
        ("blk.0.attn_output.weight", matrix(32, 32, GgmlDType::F16)),
        ("blk.0.ffn_gate.weight", matrix(64, 32, GgmlDType::Q8_0)),
        ("blk.0.ffn_up.weight", matrix(64, 32, GgmlDType::F32)),
        ("blk.0.ffn_down.weight", matrix(32, 64, GgmlDType::Q8_0)),
    ];
    let mut tokens: Vec<Value> = ('a'..='z').map(|c| Value::String(c.to_string())).collect();
    tokens.extend(["ab", "<s>", "</s>", " ", ".", "ba"].map(|t| Value::String(t.into())));
    let string = |s: &str| Value::String(s.into());
    let metadata = vec![
        ("general.architecture", string("llama")),
        ("general.alignment", Value::U32(32)),
        ("llama.embedding_length", Value::U32(32)),
        ("llama.feed_forward_length", Value::U32(64)),
        ("llama.block_count", Value::U32(1)),
        ("llama.attention.head_count", Value::U32(4)),
        ("llama.attention.head_count_kv", Value::U32(2)),
        ("llama.context_length", Value::U32(64)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("llama.rope.freq_base", Value::F32(10_000.0)),
        ("tokenizer.ggml.model", string("gpt2")),
        ("tokenizer.ggml.tokens", Value::Array(tokens)),
        ("tokenizer.ggml.merges", Value::Array(vec![string("a b"), string("b a")])),
        ("tokenizer.ggml.bos_token_id", Value::U32(27)),
        ("tokenizer.ggml.eos_token_id", Value::U32(28)),
        ("tokenizer.chat_template", string("{% for m in messages %}{{ m.content }}{% endfor %}")),
    ];
    (metadata, tensors)
}

/// The GGUF file of `metadata` and `tensors`.
fn gguf_bytes(metadata: &Metadata, tensors: &Tensors) -> Vec<u8> {
    let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (*k, t.as_ref())).collect();
    let mut out = Cursor::new(Vec::new());
    gguf_file::write(&mut out, &metadata, &tensors).unwrap();
    out.into_inner()
}

#[test]
fn mutated_gguf_files_never_panic() {
    let (metadata, tensors) = tiny_gguf();
    let original = gguf_bytes(&metadata, &tensors);
    let header = gguf_file::Content::read(&mut Cursor::new(&original)).unwrap().tensor_data_offset as usize;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    std::fs::write(&path, &original).unwrap();
    Generator::load(&path, &Device::Cpu, None).expect("the unmutated GGUF loads");
    let panics = fuzz_file(&mut StdRng::seed_from_u64(SEED), &original, header, &path, GGUF_CASES);
    report("GGUF", GGUF_CASES, &panics);
}

#[test]
fn gguf_files_with_odd_metadata_or_tensors_never_panic() {
    let (metadata, tensors) = tiny_gguf();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    let odd = [
        Value::U32(0),
        Value::U32(1),
        Value::U32(3),
        Value::U32(u32::MAX),
        Value::U64(u64::MAX),
        Value::I32(-1),
        Value::F32(f32::NAN),
        Value::F32(f32::INFINITY),
        Value::F64(1e300),
        Value::Bool(true),
        Value::String(String::new()),
        Value::String("granite".into()),
        Value::Array(Vec::new()),
        Value::Array(vec![Value::U32(7)]),
        Value::Array(vec![Value::String("x".into())]),
    ];
    let mut variants: Vec<(String, Metadata, Tensors)> = Vec::new();
    for (i, (key, _)) in metadata.iter().enumerate() {
        let mut removed = metadata.clone();
        removed.remove(i);
        variants.push((format!("{key} removed"), removed, tensors.clone()));
        for value in &odd {
            let mut changed = metadata.clone();
            changed[i].1 = value.clone();
            variants.push((format!("{key} = {value:?}"), changed, tensors.clone()));
        }
    }
    for (i, (name, t)) in tensors.iter().enumerate() {
        let values = t.dequantize(&Device::Cpu).unwrap();
        let n = values.elem_count();
        let replacements = [
            ("flat", values.reshape(n).unwrap(), GgmlDType::F32),
            ("one row", values.reshape((1, n)).unwrap(), GgmlDType::F32),
            ("F16", values.clone(), GgmlDType::F16),
        ];
        for (how, replacement, dtype) in replacements {
            let mut changed = tensors.clone();
            changed[i].1 = Arc::new(QTensor::quantize(&replacement, dtype).unwrap());
            variants.push((format!("{name} {how}"), metadata.clone(), changed));
        }
        let mut removed = tensors.clone();
        removed.remove(i);
        variants.push((format!("{name} removed"), metadata.clone(), removed));
    }
    let mut panics = Vec::new();
    for (what, metadata, tensors) in &variants {
        std::fs::write(&path, gguf_bytes(metadata, tensors)).unwrap();
        if let Some(message) = load_and_run(&path) {
            panics.push(format!("{what}: {message}"));
        }
    }
    report("GGUF metadata and tensors", variants.len(), &panics);
}

/// A copy of the `mha_tied` fixture in a temp dir.
fn fixture_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mha_tied");
    for file in ["config.json", "generation_config.json", "tokenizer.json", "model.safetensors"] {
        std::fs::copy(fixture.join(file), dir.path().join(file)).unwrap();
    }
    dir
}

#[test]
fn mutated_safetensors_files_never_panic() {
    let dir = fixture_copy();
    let path = dir.path().join("model.safetensors");
    let original = std::fs::read(&path).unwrap();
    assert!(Generator::load(dir.path(), &Device::Cpu, None).is_ok());
    let header = 8 + u64::from_le_bytes(original[..8].try_into().unwrap()) as usize;
    let panics = fuzz_file(&mut StdRng::seed_from_u64(SEED), &original, header, &path, SAFETENSORS_CASES);
    report("safetensors", SAFETENSORS_CASES, &panics);
}

#[test]
fn mutated_configs_never_panic() {
    let dir = fixture_copy();
    let path = dir.path().join("config.json");
    let original = std::fs::read(&path).unwrap();
    let config: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&original).unwrap();
    let values = serde_json::json!([
        0, 1, -1, 3, 7, 1e-320, 0.5, 2147483648u64, 4294967297u64, 9007199254740993u64, 18446744073709551615u64,
        1e308, -1e308, "x", null, [], {}, true, {"type": "dynamic", "factor": 1e300}
    ]);
    let mut panics = Vec::new();
    let mut cases = 0;
    for key in config.keys() {
        for value in values.as_array().unwrap() {
            let mut changed = config.clone();
            changed.insert(key.clone(), value.clone());
            std::fs::write(&path, serde_json::to_vec(&changed).unwrap()).unwrap();
            cases += 1;
            if let Some(message) = load_and_run(dir.path()) {
                panics.push(format!("{key} = {value}: {message}"));
            }
        }
    }
    let mut rng = StdRng::seed_from_u64(SEED);
    panics.extend(fuzz_file(&mut rng, &original, original.len(), &path, CONFIG_BYTE_CASES));
    report("config.json", cases + CONFIG_BYTE_CASES, &panics);
}
