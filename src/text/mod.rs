//! Text in and out: tokenizers (tokenizer.json, or built from GGUF metadata), incremental
//! detokenization with stop strings, chat templates, tool calls in
//! the formats templates ask for, and the token trie of constrained decoding.

pub mod chat;
pub mod detokenizer;
pub mod gguf_tokenizer;
mod pyjson;
pub mod stop;
pub mod token_env;
pub mod tokenizer;
pub mod tool_calls;
