//! Incremental detokenization and stop strings.

use std::sync::Arc;

use granite_rs::text::detokenizer::Detokenizer;
use granite_rs::text::stop::StopStrings;
use granite_rs::text::tokenizer::Tokenizer;

fn tokenizer() -> Arc<Tokenizer> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/mha_tied/tokenizer.json");
    Arc::new(Tokenizer::from_file(path.as_ref()).unwrap())
}

/// Streams `ids` one at a time; returns the chunks.
fn stream(tok: &Arc<Tokenizer>, ids: &[u32]) -> Vec<String> {
    let mut s = Detokenizer::new(tok.clone());
    let mut chunks: Vec<String> = ids.iter().filter_map(|id| s.push(*id).unwrap()).collect();
    chunks.extend(s.finish().unwrap());
    chunks
}

#[test]
fn chunks_join_to_the_full_text_and_never_split_a_character() {
    let tok = tokenizer();
    let text = "Héllo 你好，世界！ 🦊🚀✨ naïve déjà vu";
    let ids = tok.encode(text, false).unwrap();
    // This byte-level tokenizer splits these characters over several tokens.
    let single: Vec<String> = ids.iter().map(|id| tok.decode(&[*id], false).unwrap()).collect();
    assert!(single.iter().any(|s| s.contains('\u{FFFD}')), "the test needs split characters");
    let chunks = stream(&tok, &ids);
    assert_eq!(chunks.concat(), text);
    assert!(chunks.iter().all(|c| !c.contains('\u{FFFD}')), "{chunks:?}");
}

#[test]
fn text_is_released_as_soon_as_it_is_complete() {
    let tok = tokenizer();
    let ids = tok.encode("The quick brown fox", false).unwrap();
    let mut s = Detokenizer::new(tok.clone());
    for id in &ids {
        // Plain ASCII: every token completes its text at once.
        assert!(s.push(*id).unwrap().is_some());
    }
    assert_eq!(s.finish().unwrap(), None);
}

#[test]
fn an_unfinished_character_at_the_end_is_flushed_as_decode_gives_it() {
    let tok = tokenizer();
    let ids = tok.encode("ab🦊", false).unwrap();
    let cut = &ids[..ids.len() - 1];
    assert_eq!(stream(&tok, cut).concat(), tok.decode(cut, true).unwrap());
}

fn run_stops(stops: &[&str], pieces: &[&str]) -> (String, bool, Vec<String>) {
    let mut s = StopStrings::new(stops.iter().map(|s| s.to_string()).collect());
    let mut out = Vec::new();
    for p in pieces {
        let (certain, stopped) = s.push(p);
        out.push(certain);
        if stopped {
            return (out.concat(), true, out);
        }
    }
    out.push(s.finish());
    (out.concat(), false, out)
}

#[test]
fn a_stop_string_across_pieces_is_found_and_cut() {
    let (text, stopped, _) = run_stops(&["</end>"], &["Hello </", "en", "d> after"]);
    assert_eq!((text.as_str(), stopped), ("Hello ", true));
}

#[test]
fn only_a_possible_stop_prefix_is_held_back() {
    let (text, stopped, out) = run_stops(&["STOP"], &["abc S", "T", "x and more"]);
    assert_eq!((text.as_str(), stopped), ("abc STx and more", false));
    assert_eq!(out[0], "abc ", "'S' may start 'STOP'; the rest is certain");
    assert_eq!(out[1], "");
}

#[test]
fn the_earliest_of_several_stop_strings_wins() {
    let (text, stopped, _) = run_stops(&["world", "lo w"], &["hello world"]);
    assert_eq!((text.as_str(), stopped), ("hel", true));
}

#[test]
fn multibyte_stop_strings_are_cut_on_character_boundaries() {
    let (text, stopped, out) = run_stops(&["世界！"], &["你好世", "界！ more"]);
    assert_eq!((text.as_str(), stopped), ("你好", true));
    assert_eq!(out[0], "你好");
}
