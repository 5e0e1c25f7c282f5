//! Text in and out: tokenizers (tokenizer.json, or built from GGUF metadata), incremental
//! detokenization with stop strings, and chat templates.

pub mod chat;
pub mod detokenizer;
pub mod gguf_tokenizer;
mod pyjson;
pub mod stop;
pub mod tokenizer;
