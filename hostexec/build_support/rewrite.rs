//! The source rewrite of hostexec's build script, in a file of its own so that
//! `tests/rewrite.rs` can test it: marker tokens left by `kernels/common/host/runtime.h` in a
//! preprocessed unit become plain C++, and the kernels are collected.

use std::fmt::Write as _;

/// `MOLE_GLOBAL` / `__global__` on the host.
const GLOBAL_MARKER: &str = "__mole_hx_global__";
/// `__shared__` on the host.
const SHARED_MARKER: &str = "__mole_hx_shared__";

/// Skips a balanced `(...)` starting at `s[i] == '('`; returns the index after it.
fn skip_parens(s: &[u8], mut i: usize) -> usize {
    let mut depth = 0usize;
    while i < s.len() {
        match s[i] {
            b'(' => depth += 1,
            b')' => {
                depth -= 1;
                if depth == 0 {
                    return i + 1;
                }
            }
            _ => {}
        }
        i += 1;
    }
    i
}

/// `text` without `__attribute__((...))` groups (they cannot appear inside a cast's type).
fn strip_attributes(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::new();
    let mut i = 0;
    while i < b.len() {
        if text[i..].starts_with("__attribute__") {
            let mut j = i + "__attribute__".len();
            while j < b.len() && b[j].is_ascii_whitespace() {
                j += 1;
            }
            if j < b.len() && b[j] == b'(' {
                i = skip_parens(b, j);
                continue;
            }
        }
        out.push(b[i] as char);
        i += 1;
    }
    out.trim().to_string()
}

fn is_ident(c: u8) -> bool {
    c == b'_' || c.is_ascii_alphanumeric()
}

/// A `__shared__` declaration `SPEC NAME DIMS` (text up to its `;`), split into the type
/// specifiers, the name and the array extents (`[32][8]`, or empty).
fn split_shared_decl(decl: &str) -> Result<(String, String, String), String> {
    let bad = || format!("unsupported __shared__ declaration `{decl}` (one variable, no initializer)");
    let mut depth = 0i32;
    for c in decl.chars() {
        match c {
            '(' | '[' => depth += 1,
            ')' | ']' => depth -= 1,
            ',' | '=' | '{' if depth == 0 => return Err(bad()),
            _ => {}
        }
    }
    let mut head = decl.trim_end();
    let mut dims = String::new();
    while head.ends_with(']') {
        let b = head.as_bytes();
        let (mut i, mut d) = (b.len(), 0i32);
        while i > 0 {
            i -= 1;
            match b[i] {
                b']' => d += 1,
                b'[' => {
                    d -= 1;
                    if d == 0 {
                        break;
                    }
                }
                _ => {}
            }
        }
        dims.insert_str(0, &head[i..]);
        head = head[..i].trim_end();
    }
    let split = head.rfind(|c: char| !is_ident(c as u8)).map_or(0, |i| i + 1);
    let (spec, name) = (strip_attributes(&head[..split]), head[split..].to_string());
    if spec.is_empty() || name.is_empty() || name.as_bytes()[0].is_ascii_digit() {
        return Err(bad());
    }
    Ok((spec, name, dims))
}

/// Rewrites the preprocessed unit; returns the text and the kernel names.
/// - `__mole_hx_global__ void NAME(` marks a kernel: the marker goes (with an `extern "C"` in
///   front of it), NAME is registered;
/// - `extern __mole_hx_shared__ T NAME[];` (dynamic shared memory) becomes
///   `T *const NAME = reinterpret_cast<T *>(::mole_host::dynamic_shared());`;
/// - `__mole_hx_shared__ T NAME DIMS;` (static shared memory) becomes a reference to storage
///   from the runtime's shared arena, allocated on first use and poisoned before every block:
///   `using X = T DIMS; static X *const P = ...static_shared(sizeof(X)); X &NAME = *P;`.
///   (Not a `static` variable in a section of its own: GCC drops section attributes of statics
///   in templates.) Attributes such as `__align__` are dropped: the arena aligns every variable
///   to 128 bytes and the dynamic region starts on a page.
pub fn rewrite(text: &str) -> Result<(String, Vec<String>), String> {
    let mut out = String::with_capacity(text.len() + 1024);
    let mut names = Vec::new();
    let mut rest = text;
    let mut shared_count = 0usize;
    loop {
        let g = rest.find(GLOBAL_MARKER);
        let s = rest.find(SHARED_MARKER);
        let (at, global) = match (g, s) {
            (None, None) => break,
            (Some(g), Some(s)) if s < g => (s, false),
            (Some(g), _) => (g, true),
            (None, Some(s)) => (s, false),
        };
        let before = &rest[..at];
        if global {
            let kept = before.trim_end().strip_suffix("extern \"C\"").unwrap_or(before);
            out.push_str(kept);
            let after = &rest[at + GLOBAL_MARKER.len()..];
            let decl: String = after.chars().take_while(|&c| c != '(' && c != ';' && c != '{').collect();
            let mut words = decl.split_whitespace();
            let (ret, name) = (words.next(), words.last());
            match (ret, name) {
                (Some("void"), Some(name)) if name.bytes().all(is_ident) => {
                    if !names.iter().any(|n| n == name) {
                        names.push(name.to_string());
                    }
                }
                _ => return Err(format!("a kernel must be `MOLE_GLOBAL void name(...)`, found `{}`", decl.trim())),
            }
            rest = after;
            continue;
        }
        let after = &rest[at + SHARED_MARKER.len()..];
        let end = after.find(';').ok_or("unterminated __shared__ declaration")?;
        let (spec, name, dims) = split_shared_decl(&after[..end])?;
        let trimmed = before.trim_end();
        let word_before =
            |w: &str| trimmed.strip_suffix(w).filter(|h| h.is_empty() || h.ends_with(|c: char| !is_ident(c as u8)));
        if let Some(head) = word_before("extern") {
            if dims != "[]" {
                return Err(format!("extern __shared__ `{name}` must be an array of unknown size"));
            }
            out.push_str(head);
            let _ = write!(out, "{spec} *const {name} = reinterpret_cast<{spec} *>(::mole_host::dynamic_shared())");
        } else {
            out.push_str(word_before("static").unwrap_or(before));
            let x = format!("mole_hx_shared_{shared_count}");
            shared_count += 1;
            let _ = write!(
                out,
                "using {x}_t = {spec} {dims}; static {x}_t *const {x} = \
                 static_cast<{x}_t *>(::mole_host::static_shared(sizeof({x}_t))); {x}_t &{name} = *{x}"
            );
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    Ok((out, names))
}

/// A C++ string literal for `s` (octal escapes for everything but printable ASCII).
pub fn c_string(s: &str) -> String {
    let mut out = String::from("\"");
    for &b in s.as_bytes().iter().take(16 * 1024) {
        match b {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            b'?' => out.push_str("\\?"), // no trigraphs
            0x20..=0x7e => out.push(b as char),
            _ => {
                let _ = write!(out, "\\{b:03o}");
            }
        }
    }
    out.push('"');
    out
}
