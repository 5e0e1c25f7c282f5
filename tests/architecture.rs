//! The arrows between the parts of `src/` that ARCHITECTURE.md allows, checked on the source:
//! every `crate::<part>` path a file names must be an allowed arrow from the file's own part.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Each part and the parts it may use (ARCHITECTURE.md). `lib.rs` may use them all.
const ALLOWED: [(&str, &[&str]); 8] = [
    ("error", &[]),
    ("config", &["error"]),
    ("kernels", &[]),
    ("text", &["config", "error"]),
    ("loading", &["config", "text", "kernels", "error"]),
    ("model", &["config", "loading", "kernels", "error"]),
    ("generation", &["config", "text", "loading", "model", "error"]),
    ("python", &["config", "text", "loading", "model", "generation", "error"]),
];

/// Within `kernels`, the pieces the CUDA launchers may use: the dtypes and the op shapes.
const CUDA_ALLOWED: [&str; 2] = ["dtype", "shapes"];

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Source text without its comments (line comments and doc comments).
fn without_comments(text: &str) -> String {
    text.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n")
}

/// The names that follow `prefix` in `code` (`crate::` -> the parts a file uses), the first name
/// of each path in a `prefix{a, b::c}` group included.
fn names_after(code: &str, prefix: &str) -> BTreeSet<String> {
    let ident =
        |s: &str| -> String { s.trim_start().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect() };
    let mut names = BTreeSet::new();
    for (at, _) in code.match_indices(prefix) {
        if code[..at].ends_with(|c: char| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let rest = &code[at + prefix.len()..];
        match rest.strip_prefix('{') {
            Some(group) => {
                let (mut depth, mut item) = (0, String::new());
                for c in group.chars() {
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 0 => break,
                        '}' => depth -= 1,
                        ',' if depth == 0 => {
                            names.insert(ident(&std::mem::take(&mut item)));
                        }
                        _ if depth == 0 => item.push(c),
                        _ => {}
                    };
                }
                names.insert(ident(&item));
            }
            None => {
                names.insert(ident(rest));
            }
        }
    }
    names.remove("");
    names
}

fn part_of(relative: &Path) -> String {
    let first = relative.components().next().unwrap().as_os_str().to_string_lossy().into_owned();
    first.trim_end_matches(".rs").to_string()
}

#[test]
fn parts_use_only_allowed_parts() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    assert!(files.len() > 20, "found only {} source files", files.len());
    let mut wrong = Vec::new();
    for file in &files {
        let relative = file.strip_prefix(&src).unwrap();
        let part = part_of(relative);
        let code = without_comments(&std::fs::read_to_string(file).unwrap());
        if part != "python" && code.contains("pyo3") {
            wrong.push(format!("{}: only src/python uses pyo3", relative.display()));
        }
        if part == "lib" {
            continue;
        }
        let allowed = ALLOWED.iter().find(|(p, _)| *p == part).map(|(_, a)| *a);
        let Some(allowed) = allowed else {
            wrong.push(format!("{}: part `{part}` is not in ARCHITECTURE.md", relative.display()));
            continue;
        };
        for used in names_after(&code, "crate::") {
            if used != part && !allowed.contains(&used.as_str()) {
                wrong.push(format!("{}: {part} -> {used}", relative.display()));
            }
        }
        if relative.starts_with("kernels/cuda") {
            let within = names_after(&code, "crate::kernels::").into_iter().chain(names_after(&code, "super::"));
            for used in within.filter(|u| !CUDA_ALLOWED.contains(&u.as_str())) {
                wrong.push(format!("{}: kernels/cuda -> kernels/{used}", relative.display()));
            }
        }
    }
    assert!(wrong.is_empty(), "arrows that ARCHITECTURE.md forbids:\n{}", wrong.join("\n"));
}

#[test]
fn the_check_sees_a_forbidden_arrow() {
    let code = "use crate::generation::model::Generator;\nlet x = crate::kernels::cpu::gemv; // crate::python\n\
                use crate::{text::chat, loading::{gguf, mapped}};";
    let used = names_after(&without_comments(code), "crate::");
    let want = ["generation", "kernels", "loading", "text"].map(String::from);
    assert_eq!(used, BTreeSet::from(want));
    let cuda = names_after("use crate::kernels::{by_dtype, shapes::RopeShape};", "crate::kernels::");
    assert_eq!(cuda, BTreeSet::from(["by_dtype".to_string(), "shapes".to_string()]));
    assert!(!ALLOWED.iter().find(|(p, _)| *p == "model").unwrap().1.contains(&"generation"));
}

/// The comment and attribute lines right above line `i`, and the line itself.
fn note_above(lines: &[&str], i: usize) -> String {
    let above = lines[..i].iter().rev().take_while(|l| {
        let l = l.trim_start();
        l.starts_with("//") || l.starts_with("#[")
    });
    above.chain(std::iter::once(&lines[i])).copied().collect::<Vec<_>>().join("\n")
}

#[test]
fn every_unsafe_has_a_safety_note() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut missing = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            let note = || note_above(&lines, i);
            let is_fn = code.contains("unsafe fn ");
            let is_block = code.contains("unsafe {") || code.contains("unsafe impl ");
            if (is_fn && !note().contains("# Safety")) || (is_block && !note().contains("SAFETY:")) {
                missing.push(format!("{}:{}: {}", file.strip_prefix(&src).unwrap().display(), i + 1, line.trim()));
            }
        }
    }
    assert!(missing.is_empty(), "unsafe without a SAFETY note or a # Safety section:\n{}", missing.join("\n"));
}
