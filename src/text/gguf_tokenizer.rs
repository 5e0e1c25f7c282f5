//! The tokenizer a GGUF describes in its `tokenizer.ggml.*` metadata, built as HF transformers
//! builds it for `AutoTokenizer.from_pretrained(dir, gguf_file=...)`
//! (transformers/integrations/gguf/gguf_tokenizer_mapping.py, then `TokenizersBackend.__init__`).
//!
//! Two vocabularies are supported, as `tokenizer.ggml.model` names them:
//!
//! - `gpt2`: byte-level BPE. Tokens the file spells outside the byte alphabet are respelled byte by
//!   byte; `ByteLevel` pre-tokenizer (or a `Split` on the regex `tokenizer.ggml.pre` names, then
//!   `ByteLevel` without its regex) and decoder.
//! - `llama`: sentencepiece as BPE with byte fallback; the merges are the file's, or derived from the
//!   scores. `Metaspace` pre-tokenizer (for architecture `phi3` a normalizer instead). Architectures
//!   `gemma`, `gemma2`, `gemma3` need a builder of their own and are refused, as are the other
//!   models (`t5`, `gemma4`).
//!
//! For both, tokens typed CONTROL (3) become special added tokens (for `gpt2` only those spelled in
//! the byte alphabet), USER_DEFINED (4) plain added tokens, and the BOS/EOS/UNK/PAD tokens special
//! ones. The post-processor adds BOS and EOS as `tokenizer.ggml.add_bos_token`/`add_eos_token` say
//! (`llama` adds BOS when the file does not say). `tokenizer.ggml.add_space_prefix` is read by
//! transformers but not used, so it is not used here either.

use std::collections::{HashMap, HashSet};

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::error::{Error, Result};
use crate::text::tokenizer::Tokenizer;

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

/// The tokenizer of a GGUF file, as transformers builds it from the file.
pub fn tokenizer_from_gguf(content: &Content) -> Result<Tokenizer> {
    tokenizer_from_metadata(&content.metadata)
}

/// [`tokenizer_from_gguf`] from the metadata alone.
pub fn tokenizer_from_metadata(metadata: &HashMap<String, Value>) -> Result<Tokenizer> {
    Ok(Tokenizer::from_inner(hf_tokenizer_from_metadata(metadata)?))
}

/// The `tokenizers` tokenizer itself, equal to transformers' `backend_tokenizer`.
pub fn hf_tokenizer_from_metadata(metadata: &HashMap<String, Value>) -> Result<tokenizers::Tokenizer> {
    let meta = Meta(metadata);
    let architecture = meta.string("general.architecture")?;
    let model = meta.string("tokenizer.ggml.model")?;
    let tokens = meta.strings("tokenizer.ggml.tokens")?;
    let token_types = meta.opt_ints("tokenizer.ggml.token_type")?.unwrap_or_default();
    let byte_level = match (model, architecture) {
        ("gpt2", _) => true,
        ("llama", a @ ("gemma" | "gemma2" | "gemma3")) => {
            return Err(Error::Tokenizer(format!(
                "GGUF sentencepiece (`llama`) vocabulary of architecture `{a}` is not supported"
            )))
        }
        ("llama", _) => false,
        (m, _) => {
            return Err(Error::Tokenizer(format!(
                "GGUF tokenizer model `tokenizer.ggml.model` = `{m}` is not supported (supported: gpt2, llama)"
            )))
        }
    };

    let mut tk = if byte_level { byte_level_bpe(&meta, &tokens)? } else { sentencepiece_bpe(&meta, &tokens)? };
    if architecture == "phi3" && !byte_level {
        // The prefix space comes from a normalizer rather than from `Metaspace`.
        let normalizer = NormalizerSequence::new(vec![
            Prepend::new("\u{2581}".into()).into(),
            Replace::new(" ", "\u{2581}")?.into(),
        ]);
        tk.with_normalizer(Some(NormalizerWrapper::from(normalizer)))?;
        tk.with_pre_tokenizer(None::<PreTokenizerWrapper>);
    }

    // CONTROL tokens as special tokens; in a byte-level vocabulary only those spelled in its alphabet.
    let alphabet: HashSet<char> = bytes_to_unicode().into_iter().collect();
    let control: Vec<AddedToken> = tokens
        .iter()
        .zip(&token_types)
        .filter(|(t, ty)| **ty == CONTROL && (!byte_level || t.chars().all(|c| alphabet.contains(&c))))
        .map(|(t, _)| AddedToken::from(t.as_str(), true))
        .collect();
    if !control.is_empty() {
        tk.add_special_tokens(control)?;
    }
    // USER_DEFINED tokens as plain added tokens, those the vocabulary (added tokens included) holds.
    let vocab = tk.get_vocab(true);
    let user: Vec<AddedToken> = tokens
        .iter()
        .zip(&token_types)
        .filter(|(t, ty)| **ty == USER_DEFINED && vocab.contains_key(t.as_str()))
        .map(|(t, _)| AddedToken::from(t.as_str(), false).normalized(false))
        .collect();
    if !user.is_empty() {
        tk.add_tokens(user)?;
    }

    if let Some(split) = split_regex(meta.opt_string("tokenizer.ggml.pre")?.unwrap_or_default()) {
        let pre = PreTokenizerSequence::new(vec![
            Split::new(SplitPattern::Regex(split.into()), SplitDelimiterBehavior::Isolated, false)?.into(),
            ByteLevel::new(false, true, false).into(),
        ]);
        tk.with_pre_tokenizer(Some(PreTokenizerWrapper::from(pre)));
    }

    // The named special tokens, as the file spells them; those not added yet become special added tokens.
    let named = |key: &str| -> Result<Option<String>> {
        match meta.opt_id(key)? {
            None => Ok(None),
            Some(id) => tokens.get(id as usize).map(|t| Some(t.clone())).ok_or_else(|| {
                Error::Tokenizer(format!("GGUF `{key}` = {id} is outside the vocabulary of {} tokens", tokens.len()))
            }),
        }
    };
    let bos = named("tokenizer.ggml.bos_token_id")?;
    let eos = named("tokenizer.ggml.eos_token_id")?;
    let unk = named("tokenizer.ggml.unknown_token_id")?;
    let pad = named("tokenizer.ggml.padding_token_id")?;
    let added: HashSet<String> = tk.get_added_vocabulary().get_vocab().keys().cloned().collect();
    let mut missing: Vec<&String> = Vec::new();
    for token in [&bos, &eos, &unk, &pad].into_iter().flatten() {
        if !added.contains(token) && !missing.contains(&token) {
            missing.push(token);
        }
    }
    if !missing.is_empty() {
        tk.add_tokens(missing.into_iter().map(|t| AddedToken::from(t.as_str(), true)))?;
    }

    // transformers' `update_post_processor`; a sentencepiece vocabulary adds BOS unless told otherwise.
    let add_bos = meta.opt_bool("tokenizer.ggml.add_bos_token")?.unwrap_or(!byte_level) && bos.is_some();
    let add_eos = meta.opt_bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false) && eos.is_some();
    let id_of = |token: &str| {
        tk.token_to_id(token).or_else(|| unk.as_deref().and_then(|u| tk.token_to_id(u))).ok_or_else(|| {
            Error::Tokenizer(format!("GGUF special token `{token}` has no id in the vocabulary it names it from"))
        })
    };
    let mut special = Vec::new();
    let mut single = String::new();
    if let Some(b) = bos.as_deref().filter(|_| add_bos) {
        single.push_str(&format!("{b}:0 "));
        special.push((b.to_string(), id_of(b)?));
    }
    single.push_str("$A:0");
    if let Some(e) = eos.as_deref().filter(|_| add_eos) {
        single.push_str(&format!(" {e}:0"));
        special.push((e.to_string(), id_of(e)?));
    }
    let mut pair = single.clone();
    if let Some(b) = bos.as_deref().filter(|_| add_bos) {
        pair.push_str(&format!(" {b}:1"));
    }
    pair.push_str(" $B:1");
    if let Some(e) = eos.as_deref().filter(|_| add_eos) {
        pair.push_str(&format!(" {e}:1"));
    }
    let template = TemplateProcessing::builder()
        .try_single(single)
        .and_then(|b| b.try_pair(pair))
        .map_err(|e| Error::Tokenizer(format!("GGUF post-processor template: {e}")))?
        .special_tokens(special)
        .build()
        .map_err(|e| Error::Tokenizer(format!("GGUF post-processor template: {e}")))?;
    tk.with_post_processor(Some(template));
    Ok(tk)
}

/// transformers' `byte_level_tokenizer`: a `GPT2Tokenizer` over the file's vocabulary and merges.
fn byte_level_bpe(meta: &Meta, tokens: &[String]) -> Result<tokenizers::Tokenizer> {
    let spelling = bytes_to_unicode();
    let alphabet: HashSet<char> = spelling.iter().copied().collect();
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let key = if t.chars().all(|c| alphabet.contains(&c)) {
                t.clone()
            } else {
                t.bytes().map(|b| spelling[b as usize]).collect()
            };
            (key, i as u32)
        })
        .collect();
    let merges = file_merges(meta)?.ok_or_else(|| missing("tokenizer.ggml.merges"))?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .continuing_subword_prefix(String::new())
        .end_of_word_suffix(String::new())
        .fuse_unk(false)
        .build()
        .map_err(|e| Error::Tokenizer(format!("GGUF byte-level BPE vocabulary: {e}")))?;
    let mut tk = tokenizers::Tokenizer::new(bpe);
    tk.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tk.with_decoder(Some(ByteLevel::default()));
    // GPT2Tokenizer's own unk/bos/eos, before the file's.
    tk.add_tokens([AddedToken::from("<|endoftext|>", true)])?;
    Ok(tk)
}

/// transformers' `sentencepiece_tokenizer`: a `LlamaTokenizer` over the file's vocabulary.
fn sentencepiece_bpe(meta: &Meta, tokens: &[String]) -> Result<tokenizers::Tokenizer> {
    let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let merges = match file_merges(meta)? {
        Some(m) => m,
        None => {
            let scores = meta.floats("tokenizer.ggml.scores")?;
            if scores.len() != tokens.len() {
                return Err(Error::Tokenizer(format!(
                    "GGUF `tokenizer.ggml.scores` has {} entries for {} tokens",
                    scores.len(),
                    tokens.len()
                )));
            }
            generate_merges(tokens, &scores, &vocab)
        }
    };
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .fuse_unk(true)
        .byte_fallback(true)
        .build()
        .map_err(|e| Error::Tokenizer(format!("GGUF sentencepiece vocabulary: {e}")))?;
    let mut tk = tokenizers::Tokenizer::new(bpe);
    tk.with_pre_tokenizer(Some(Metaspace::new('\u{2581}', PrependScheme::First, false)));
    let decoders: Vec<DecoderWrapper> = vec![
        Replace::new("\u{2581}", " ")?.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
        Strip::new(' ', 1, 0).into(),
    ];
    tk.with_decoder(Some(DecoderSequence::new(decoders)));
    // LlamaTokenizer's own bos/eos/unk, before the file's.
    tk.add_tokens(["<s>", "</s>", "<unk>"].map(|t| AddedToken::from(t, true)))?;
    Ok(tk)
}

/// `tokenizer.ggml.merges`, each "a b" split at its spaces.
fn file_merges(meta: &Meta) -> Result<Option<Merges>> {
    let Some(Value::Array(values)) = meta.0.get("tokenizer.ggml.merges") else {
        return match meta.0.get("tokenizer.ggml.merges") {
            None => Ok(None),
            Some(_) => Err(bad("tokenizer.ggml.merges", "an array of strings")),
        };
    };
    values
        .iter()
        .map(|v| {
            let s = v.to_string().map_err(|_| bad("tokenizer.ggml.merges", "an array of strings"))?;
            let mut parts = s.split(' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some(a), Some(b), None) => Ok((a.to_string(), b.to_string())),
                _ => Err(Error::Tokenizer(format!("GGUF `tokenizer.ggml.merges`: `{s}` is not two tokens"))),
            }
        })
        .collect::<Result<Merges>>()
        .map(Some)
}

/// transformers' `generate_merges(vocab, vocab_scores)`: every split of every token into two tokens
/// of the vocabulary, best score first, then the longer left and right parts first; ties keep the
/// order of the tokens (and within one token, of the parts' ids).
fn generate_merges(tokens: &[String], scores: &[f64], vocab: &Vocab) -> Merges {
    // `dict(zip(tokens, scores))`: first position of each token, last score.
    let mut order: Vec<&str> = Vec::with_capacity(tokens.len());
    let mut score_of: HashMap<&str, f64> = HashMap::with_capacity(tokens.len());
    for (t, &s) in tokens.iter().zip(scores) {
        if score_of.insert(t.as_str(), s).is_none() {
            order.push(t);
        }
    }
    let mut merges: Vec<(&str, &str, f64, usize, usize)> = Vec::new();
    for token in order {
        let score = score_of[token];
        let mut local: Vec<(&str, &str, u32, u32)> = token
            .char_indices()
            .skip(1)
            .filter_map(|(i, _)| {
                let (l, r) = token.split_at(i);
                Some((l, r, *vocab.get(l)?, *vocab.get(r)?))
            })
            .collect();
        local.sort_by_key(|&(_, _, a, b)| (a, b));
        merges.extend(local.into_iter().map(|(l, r, _, _)| (l, r, score, l.chars().count(), r.chars().count())));
    }
    // Python's stable `sorted(..., reverse=True)`: descending keys, ties in their original order.
    merges.sort_by(|a, b| (b.2, b.3, b.4).partial_cmp(&(a.2, a.3, a.4)).unwrap_or(std::cmp::Ordering::Equal));
    merges.into_iter().map(|(l, r, ..)| (l.to_string(), r.to_string())).collect()
}

/// GPT-2's printable spelling of each byte, indexed by byte.
fn bytes_to_unicode() -> Vec<char> {
    let printable = |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
    let mut next = 256;
    (0..256u32)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap()
            } else {
                next += 1;
                char::from_u32(next - 1).unwrap()
            }
        })
        .collect()
}

const LLAMA3_SPLIT: &str = concat!(
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}",
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);
const TEKKEN_SPLIT: &str = concat!(
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+",
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*",
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);
const GPT4O_SPLIT: &str = concat!(
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN35_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// transformers' `GGUF_PRE_TOKENIZER_SPLITS`: the split regex of a `tokenizer.ggml.pre`, if it has one.
fn split_regex(pre: &str) -> Option<&'static str> {
    Some(match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0" | "lfm2"
        | "jina-v5-nano" | "dbrx" | "smaug-bpe" => LLAMA3_SPLIT,
        "tekken" => TEKKEN_SPLIT,
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" => QWEN2_SPLIT,
        "qwen35" => QWEN35_SPLIT,
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => GPT4O_SPLIT,
        _ => return None,
    })
}

fn missing(key: &str) -> Error {
    Error::Tokenizer(format!("GGUF metadata has no `{key}`"))
}

fn bad(key: &str, expected: &str) -> Error {
    Error::Tokenizer(format!("GGUF metadata `{key}` is not {expected}"))
}

fn as_int(v: &Value) -> Option<i64> {
    Some(match *v {
        Value::U8(x) => x.into(),
        Value::I8(x) => x.into(),
        Value::U16(x) => x.into(),
        Value::I16(x) => x.into(),
        Value::U32(x) => x.into(),
        Value::I32(x) => x.into(),
        Value::U64(x) => i64::try_from(x).ok()?,
        Value::I64(x) => x,
        _ => return None,
    })
}

/// Typed reads of the metadata, errors naming the key.
struct Meta<'a>(&'a HashMap<String, Value>);

impl Meta<'_> {
    fn get(&self, key: &str) -> Result<&Value> {
        self.0.get(key).ok_or_else(|| missing(key))
    }

    fn string(&self, key: &str) -> Result<&str> {
        self.opt_string(key)?.ok_or_else(|| missing(key))
    }

    fn opt_string(&self, key: &str) -> Result<Option<&str>> {
        match self.0.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(bad(key, "a string")),
        }
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.0.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => as_int(v).map(|i| Some(i != 0)).ok_or_else(|| bad(key, "a bool")),
        }
    }

    fn opt_id(&self, key: &str) -> Result<Option<u32>> {
        match self.0.get(key) {
            None => Ok(None),
            Some(v) => as_int(v).and_then(|i| u32::try_from(i).ok()).map(Some).ok_or_else(|| bad(key, "a token id")),
        }
    }

    fn array(&self, key: &str) -> Result<&[Value]> {
        match self.get(key)? {
            Value::Array(a) => Ok(a),
            _ => Err(bad(key, "an array")),
        }
    }

    fn strings(&self, key: &str) -> Result<Vec<String>> {
        self.array(key)?.iter().map(|v| v.to_string().cloned().map_err(|_| bad(key, "an array of strings"))).collect()
    }

    fn opt_ints(&self, key: &str) -> Result<Option<Vec<i64>>> {
        if !self.0.contains_key(key) {
            return Ok(None);
        }
        self.array(key)?
            .iter()
            .map(|v| as_int(v).ok_or_else(|| bad(key, "an array of integers")))
            .collect::<Result<_>>()
            .map(Some)
    }

    fn floats(&self, key: &str) -> Result<Vec<f64>> {
        self.array(key)?
            .iter()
            .map(|v| match *v {
                Value::F32(x) => Ok(x.into()),
                Value::F64(x) => Ok(x),
                _ => Err(bad(key, "an array of floats")),
            })
            .collect()
    }
}
