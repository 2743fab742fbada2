//! `cargo xtask layout`: the house rules of `proxy-user/src` that a compiler does not check
//! (issue 17's proof), checked on every `cargo xtask test`:
//! - no two modules import each other, directly or round a longer loop (`crate::`, `super::`
//!   and a parent's `child::` paths, comments and `#[cfg(test)] mod tests` left out);
//! - only `main.rs` and `lib.rs` import `config`: configuration flows one way;
//! - no file holds more than [`MAX_CODE_LINES`] lines of code outside its test module;
//! - `unsafe` appears only in the modules [`UNSAFE_ALLOWED`] names.
//!
//! What the code still breaks is listed in [`DEBT`] with the reason; the check fails on anything
//! new, and on a debt entry that no longer applies (so the list only ever shrinks).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;

use anyhow::{Context as _, Result, bail};

/// Most lines of code (not blank, not comment) a file may hold outside its test module.
pub const MAX_CODE_LINES: usize = 600;

/// Modules that may contain `unsafe`: the kernel interfaces (fds, splice, epoll, BPF, signals).
pub const UNSAFE_ALLOWED: &[&str] = &[
    "main",
    "ebpf",
    "watch",
    "tunnel::sys",
    "tunnel::splice",
    "tunnel::spliced",
    "tunnel::holds",
    "tunnel::detach",
    "tunnel::sockmap::maps",
];

/// Known breaches, each one to be mended (issue 17): the rule's finding, exactly as printed.
pub const DEBT: &[&str] = &[];

/// One source file as a module: its path (`tunnel::sockmap`) and its code without comments and
/// test module.
pub struct Module {
    pub path: String,
    pub code: String,
}

/// Reads every `.rs` file under `src`.
pub fn read_tree(src: &Path) -> Result<Vec<Module>> {
    let mut out = Vec::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let p = entry?.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|e| e == "rs") {
                let rel = p.strip_prefix(src)?.with_extension("");
                let mut path = rel.to_string_lossy().replace('/', "::");
                if let Some(parent) = path.strip_suffix("::mod") {
                    path = parent.to_string();
                }
                let text = fs::read_to_string(&p)?;
                out.push(Module {
                    path,
                    code: without_tests(&strip_comments(&text)),
                });
            }
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// The text with `//` and `/* */` comments blanked (string literals kept whole).
pub fn strip_comments(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
            i += 2;
            while i < b.len() && !(b[i] == b'*' && b.get(i + 1) == Some(&b'/')) {
                if b[i] == b'\n' {
                    out.push('\n');
                }
                i += 1;
            }
            i += 2;
        } else if b[i] == b'"' {
            // A string literal, escapes included (raw strings have no `\"` to worry about).
            let start = i;
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i = (i + 1).min(b.len());
            out.push_str(&text[start..i]);
        } else {
            let ch = text[i..].chars().next().unwrap_or(' ');
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    out
}

/// The code before the file's `#[cfg(test)] mod tests`.
fn without_tests(code: &str) -> String {
    match code.find("#[cfg(test)]\nmod tests") {
        Some(i) => code[..i].to_string(),
        None => code.to_string(),
    }
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Every module path a file names, absolute (`crate::` dropped): `crate::a::b`, `super::x`,
/// `child::y` for its own `mod child;`, and each leaf of a `use …::{…}` group.
pub fn named_paths(module: &str, code: &str) -> BTreeSet<String> {
    let children: BTreeSet<String> = code
        .lines()
        .filter_map(|l| {
            let l = l
                .trim()
                .trim_start_matches("pub(crate) ")
                .trim_start_matches("pub ");
            l.strip_prefix("mod ")?
                .strip_suffix(';')
                .map(str::to_string)
        })
        .collect();
    let parent = |m: &str| {
        m.rsplit_once("::")
            .map_or(String::new(), |(p, _)| p.to_string())
    };
    let join = |a: &str, b: &str| {
        if a.is_empty() {
            b.to_string()
        } else {
            format!("{a}::{b}")
        }
    };
    let mut out = BTreeSet::new();
    let chars: Vec<char> = code.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        if !is_ident(chars[i]) || (i > 0 && (is_ident(chars[i - 1]) || chars[i - 1] == ':')) {
            i += 1;
            continue;
        }
        let word_end = (i..chars.len())
            .find(|&j| !is_ident(chars[j]))
            .unwrap_or(chars.len());
        let word: String = chars[i..word_end].iter().collect();
        let base = match word.as_str() {
            "crate" => Some(String::new()),
            "super" => Some(parent(module)),
            w if children.contains(w) => Some(join(module, w)),
            _ => None,
        };
        let (Some(mut base), true) = (base, chars[word_end..].starts_with(&[':', ':'])) else {
            i = word_end;
            continue;
        };
        if word != "crate" && word != "super" {
            out.insert(base.clone());
        }
        // Walk `::seg` segments, `super` steps and a final `{ … }` group.
        let mut j = word_end;
        while chars[j..].starts_with(&[':', ':']) {
            j += 2;
            if chars.get(j) == Some(&'{') {
                let close = matching_brace(&chars, j);
                let group: String = chars[j + 1..close].iter().collect();
                for leaf in group_leaves(&group) {
                    out.insert(join(&base, &leaf));
                }
                j = close + 1;
                break;
            }
            let end = (j..chars.len())
                .find(|&k| !is_ident(chars[k]))
                .unwrap_or(chars.len());
            let seg: String = chars[j..end].iter().collect();
            if seg.is_empty() {
                break;
            }
            base = if seg == "super" {
                parent(&base)
            } else {
                join(&base, &seg)
            };
            j = end;
        }
        out.insert(base);
        i = j;
    }
    out.remove("");
    out
}

fn matching_brace(chars: &[char], open: usize) -> usize {
    let mut depth = 0;
    for (k, &c) in chars.iter().enumerate().skip(open) {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return k;
                }
            }
            _ => {}
        }
    }
    chars.len() - 1
}

/// The paths of a `use` group's body: `a, b::{c, self}, d as e` → `a`, `b::c`, `b`, `d`.
fn group_leaves(group: &str) -> Vec<String> {
    let chars: Vec<char> = group.chars().collect();
    let mut out = Vec::new();
    let mut depth = 0;
    let mut start = 0;
    let mut parts = Vec::new();
    for (k, &c) in chars.iter().enumerate() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(chars[start..k].iter().collect::<String>());
                start = k + 1;
            }
            _ => {}
        }
    }
    parts.push(chars[start..].iter().collect());
    for part in parts {
        let part = part.trim();
        if part.is_empty() {
            continue;
        }
        match part.split_once("::{") {
            Some((head, rest)) => {
                let inner = rest.strip_suffix('}').unwrap_or(rest);
                for leaf in group_leaves(inner) {
                    out.push(if leaf == "self" {
                        head.to_string()
                    } else {
                        format!("{head}::{leaf}")
                    });
                }
            }
            None => {
                let path = part.split_whitespace().next().unwrap_or(part);
                if path != "self" {
                    out.push(path.to_string());
                }
            }
        }
    }
    out
}

/// Module → modules it imports (a path resolved to the longest module it starts with; itself
/// left out, its own children counted: a parent that reads its child while the child reads the
/// parent is a cycle too).
pub fn import_graph(modules: &[Module]) -> BTreeMap<String, BTreeSet<String>> {
    let known: BTreeSet<&str> = modules.iter().map(|m| m.path.as_str()).collect();
    let resolve = |p: &str| {
        let segs: Vec<&str> = p.split("::").collect();
        (1..=segs.len())
            .rev()
            .map(|k| segs[..k].join("::"))
            .find(|c| known.contains(c.as_str()))
    };
    modules
        .iter()
        .map(|m| {
            let deps = named_paths(&m.path, &m.code)
                .iter()
                .filter_map(|p| resolve(p))
                .filter(|t| *t != m.path)
                .collect();
            (m.path.clone(), deps)
        })
        .collect()
}

/// Each pair of modules that import each other (`imports each other: a, b`), and each set of
/// modules that reach each other round a loop (`cycle among: a, b, c`: a strongly connected
/// component of the graph, so a module joining a loop changes the finding).
pub fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (a, deps) in graph {
        for b in deps {
            if a < b && graph.get(b).is_some_and(|d| d.contains(a)) {
                out.insert(format!("imports each other: {a}, {b}"));
            }
        }
    }
    let reach = |from: &str| {
        let mut seen = BTreeSet::new();
        let mut stack = vec![from.to_string()];
        while let Some(m) = stack.pop() {
            for d in graph.get(&m).into_iter().flatten() {
                if seen.insert(d.clone()) {
                    stack.push(d.clone());
                }
            }
        }
        seen
    };
    let reaches: BTreeMap<&String, BTreeSet<String>> =
        graph.keys().map(|m| (m, reach(m))).collect();
    let mut placed = BTreeSet::new();
    for m in graph.keys() {
        if placed.contains(m) || !reaches[m].contains(m) {
            continue;
        }
        let component: Vec<&String> = graph
            .keys()
            .filter(|o| *o == m || (reaches[m].contains(*o) && reaches[*o].contains(m)))
            .collect();
        placed.extend(component.iter().map(|c| c.to_string()));
        let names: Vec<&str> = component.iter().map(|c| c.as_str()).collect();
        out.insert(format!("cycle among: {}", names.join(", ")));
    }
    out
}

/// Lines of code: neither blank nor only a comment (comments are already blanked).
fn code_lines(code: &str) -> usize {
    code.lines().filter(|l| !l.trim().is_empty()).count()
}

fn has_unsafe(code: &str) -> bool {
    let mut rest = code;
    while let Some(i) = rest.find("unsafe") {
        let before = rest[..i].chars().next_back();
        let after = rest[i + 6..].chars().next();
        if !before.is_some_and(is_ident) && !after.is_some_and(is_ident) && !in_string(&rest[..i]) {
            return true;
        }
        rest = &rest[i + 6..];
    }
    false
}

/// Whether a position follows an odd number of unescaped quotes on its line.
fn in_string(before: &str) -> bool {
    let line = before.rsplit('\n').next().unwrap_or("");
    let mut quotes = 0;
    let mut escaped = false;
    for c in line.chars() {
        match c {
            '\\' if !escaped => escaped = true,
            '"' if !escaped => quotes += 1,
            _ => escaped = false,
        }
    }
    quotes % 2 == 1
}

/// Every breach of the rules, as one line each.
pub fn findings(modules: &[Module]) -> BTreeSet<String> {
    let graph = import_graph(modules);
    let mut out = cycles(&graph);
    for (m, deps) in &graph {
        if deps.contains("config") && m != "main" && m != "lib" {
            out.insert(format!("imports config: {m}"));
        }
    }
    for m in modules {
        if code_lines(&m.code) > MAX_CODE_LINES {
            out.insert(format!("too long: {}", m.path));
        }
        if has_unsafe(&m.code) && !UNSAFE_ALLOWED.contains(&m.path.as_str()) {
            out.insert(format!("unsafe outside the allow-list: {}", m.path));
        }
    }
    out
}

/// Checks `src` against the rules and [`DEBT`].
pub fn check(src: &Path) -> Result<()> {
    let modules = read_tree(src)?;
    let found = findings(&modules);
    let debt: BTreeSet<String> = DEBT.iter().map(|s| s.to_string()).collect();
    let new: Vec<_> = found.difference(&debt).collect();
    let paid: Vec<_> = debt.difference(&found).collect();
    for f in &new {
        eprintln!("layout: {f}");
    }
    for p in &paid {
        eprintln!("layout: mended, remove from xtask/src/layout.rs DEBT: {p}");
    }
    if !new.is_empty() || !paid.is_empty() {
        bail!(
            "{} new breach(es), {} stale debt entr(ies)",
            new.len(),
            paid.len()
        );
    }
    println!(
        "layout: {} modules checked, {} known breach(es) left (xtask/src/layout.rs DEBT)",
        modules.len(),
        debt.len()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(files: &[(&str, &str)]) -> Vec<Module> {
        files
            .iter()
            .map(|(p, text)| Module {
                path: p.to_string(),
                code: without_tests(&strip_comments(text)),
            })
            .collect()
    }

    #[test]
    fn a_two_module_cycle_is_found_through_groups_super_and_children() {
        let t = tree(&[
            ("lib", "mod a;\nmod b;\n"),
            ("a", "use crate::{b::{self, Thing}, c};\n"),
            ("b", "fn f() { crate::a::g(); }\n"),
            ("c", ""),
            ("d", "mod e;\nuse e::X;\n"),
            ("d::e", "use super::Y;\n"),
        ]);
        let found = findings(&t);
        assert_eq!(
            found.into_iter().collect::<Vec<_>>(),
            [
                "cycle among: a, b",
                "cycle among: d, d::e",
                "imports each other: a, b",
                "imports each other: d, d::e",
            ]
        );
    }

    #[test]
    fn a_longer_loop_is_one_finding_and_comments_and_tests_do_not_count() {
        let t = tree(&[
            ("a", "use crate::b::B;\n// crate::c::C in a comment\n"),
            ("b", "use crate::c::C;\n/* crate::a */\n"),
            ("c", "use crate::a::A;\n"),
            (
                "x",
                "\n#[cfg(test)]\nmod tests {\n    use crate::y::Y;\n}\n",
            ),
            (
                "y",
                "use crate::x::X;\nconst S: &str = \"crate::x // not a comment\";\n",
            ),
        ]);
        let found = findings(&t);
        assert_eq!(
            found.into_iter().collect::<Vec<_>>(),
            ["cycle among: a, b, c"]
        );
    }

    #[test]
    fn config_importers_length_and_unsafe_are_checked() {
        let long = "fn f() {}\n".repeat(MAX_CODE_LINES + 1);
        let t = tree(&[
            ("config", ""),
            ("main", "use crate::config::Cli;\n"),
            ("server", "use crate::config;\n"),
            ("big", &long),
            ("ebpf", "unsafe { x() }\n"),
            (
                "auth",
                "let s = \"unsafe\"; unsafe_name(); unsafe { y() }\n",
            ),
            ("policy", "// unsafe in a comment\nlet is_unsafe = 1;\n"),
        ]);
        let found = findings(&t);
        assert_eq!(
            found.into_iter().collect::<Vec<_>>(),
            [
                "imports config: server",
                "too long: big",
                "unsafe outside the allow-list: auth",
            ]
        );
    }

    #[test]
    fn blank_and_comment_lines_are_not_code() {
        let text = format!("{}{}", "// doc\n\n".repeat(MAX_CODE_LINES), "fn f() {}\n");
        assert!(findings(&tree(&[("m", &text)])).is_empty());
    }
}
