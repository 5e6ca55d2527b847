//! Imports run one way (issue 14): in each crate, the graph of top-level modules built
//! from `crate::` (and `super::` reaching the crate root) paths outside test code has no
//! cycle, and the pooler's crate root declares its modules bottom to top, so every module
//! names only modules declared above it. A newcomer can then learn the pooler from the
//! bottom up, one module at a time.
//!
//! The sources are read as text: a small lexer drops comments, string and character
//! literals, and every item under `#[cfg(test)]`; module files are found from the crate
//! root's `mod` declarations, as rustc finds them.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// One crate's modules and the edges between its top-level ones.
struct Crate {
    /// Top-level modules in declaration order.
    modules: Vec<String>,
    /// `from -> to -> (file, line)` of one place that names `to` from `from`.
    edges: BTreeMap<String, BTreeMap<String, (PathBuf, usize)>>,
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The source with comments, literals and `#[cfg(test)]` items blanked (newlines kept,
/// so line numbers still hold).
fn code_only(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    let blank = |out: &mut Vec<u8>, s: &[u8]| {
        out.extend(s.iter().map(|c| if *c == b'\n' { b'\n' } else { b' ' }));
    };
    while i < b.len() {
        let rest = &b[i..];
        let end = if rest.starts_with(b"//") {
            i + rest.iter().position(|c| *c == b'\n').unwrap_or(rest.len())
        } else if rest.starts_with(b"/*") {
            let mut depth = 0;
            let mut j = i;
            while j < b.len() {
                if b[j..].starts_with(b"/*") {
                    depth += 1;
                    j += 2;
                } else if b[j..].starts_with(b"*/") {
                    depth -= 1;
                    j += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    j += 1;
                }
            }
            j
        } else if rest.starts_with(b"r\"") || rest.starts_with(b"r#") || rest.starts_with(b"br") {
            let start = if rest[0] == b'b' { 2 } else { 1 };
            let hashes = rest[start..].iter().take_while(|c| **c == b'#').count();
            if rest.get(start + hashes) != Some(&b'"') || (i > 0 && is_ident(b[i - 1])) {
                out.push(b[i]);
                i += 1;
                continue;
            }
            let close: Vec<u8> = std::iter::once(b'"')
                .chain(std::iter::repeat_n(b'#', hashes))
                .collect();
            let body = i + start + hashes + 1;
            body + find(&b[body..], &close).map_or(b.len() - body, |p| p + close.len())
        } else if rest[0] == b'"' {
            let mut j = i + 1;
            while j < b.len() && b[j] != b'"' {
                j += if b[j] == b'\\' { 2 } else { 1 };
            }
            j + 1
        } else if rest[0] == b'\'' {
            // A character literal ('x', '\n', '\u{..}'), or else a lifetime.
            let close = if rest.get(1) == Some(&b'\\') {
                rest[2..].iter().position(|c| *c == b'\'').map(|p| p + 2)
            } else {
                std::str::from_utf8(&rest[1..rest.len().min(6)])
                    .ok()
                    .or_else(|| std::str::from_utf8(&rest[1..2]).ok())
                    .and_then(|s| s.chars().next())
                    .map(|c| 1 + c.len_utf8())
                    .filter(|p| rest.get(*p) == Some(&b'\''))
            };
            match close {
                Some(p) => i + p + 1,
                None => {
                    out.push(b[i]);
                    i += 1;
                    continue;
                }
            }
        } else {
            out.push(b[i]);
            i += 1;
            continue;
        };
        let end = end.min(b.len());
        blank(&mut out, &b[i..end]);
        i = end;
    }
    let mut code = String::from_utf8_lossy(&out).into_owned();
    // Blank each item that `#[cfg(test)]` guards: to its `;` or its closing brace.
    while let Some(at) = code.find("#[cfg(test)]") {
        let bytes = code.as_bytes();
        let mut j = at + "#[cfg(test)]".len();
        let mut depth = 0usize;
        while j < bytes.len() {
            match bytes[j] {
                b'{' => depth += 1,
                b'}' => {
                    depth -= 1;
                    if depth == 0 {
                        j += 1;
                        break;
                    }
                }
                b';' if depth == 0 => {
                    j += 1;
                    break;
                }
                _ => {}
            }
            j += 1;
        }
        let gone: String = code[at..j.min(code.len())]
            .chars()
            .map(|c| if c == '\n' { '\n' } else { ' ' })
            .collect();
        code.replace_range(at..j.min(code.len()), &gone);
    }
    code
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// The identifier starting at `i` (after white space), and where it ends.
fn ident_at(b: &[u8], mut i: usize) -> (String, usize) {
    while i < b.len() && b[i].is_ascii_whitespace() {
        i += 1;
    }
    let start = i;
    while i < b.len() && is_ident(b[i]) {
        i += 1;
    }
    (String::from_utf8_lossy(&b[start..i]).into_owned(), i)
}

/// `mod x;` declarations (not inline `mod x { … }`) in cleaned code.
fn declared_modules(code: &str) -> Vec<String> {
    let b = code.as_bytes();
    let mut found = Vec::new();
    let mut i = 0;
    while let Some(p) = find(&b[i..], b"mod ") {
        let at = i + p;
        i = at + 4;
        if at > 0 && is_ident(b[at - 1]) {
            continue;
        }
        let (name, end) = ident_at(b, at + 4);
        let next = b[end..].iter().find(|c| !c.is_ascii_whitespace());
        if !name.is_empty() && next == Some(&b';') {
            found.push(name);
        }
    }
    found
}

/// Every path that starts at the crate root (`crate::…`) or climbs to a module
/// (`super::…`, resolved against `module`, the file's own module path), as absolute
/// module paths cut to their first `keep` segments, each with its line.
fn module_paths(code: &str, module: &[String], keep: usize) -> Vec<(Vec<String>, usize)> {
    let b = code.as_bytes();
    let line_of = |at: usize| 1 + b[..at].iter().filter(|c| **c == b'\n').count();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let at_word = i == 0 || !(is_ident(b[i - 1]) || b[i - 1] == b':');
        let base = if at_word && b[i..].starts_with(b"crate::") {
            i += "crate::".len();
            Some(Vec::new())
        } else if at_word && b[i..].starts_with(b"super::") {
            let mut ups = 0;
            while b[i..].starts_with(b"super::") {
                ups += 1;
                i += "super::".len();
            }
            module.len().checked_sub(ups).map(|n| module[..n].to_vec())
        } else {
            None
        };
        match base {
            Some(base) => {
                let line = line_of(i);
                i = path_tree(b, i, base, keep, &mut |p| out.push((p, line)));
            }
            None => i += 1,
        }
    }
    out
}

/// Reads `a::b::{c, d::e}` from `i` onwards, reporting each path (after `prefix`) cut
/// to `keep` segments; returns where it ended.
fn path_tree(
    b: &[u8],
    mut i: usize,
    mut prefix: Vec<String>,
    keep: usize,
    found: &mut dyn FnMut(Vec<String>),
) -> usize {
    loop {
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        if b.get(i) == Some(&b'{') {
            i += 1;
            loop {
                i = path_tree(b, i, prefix.clone(), keep, found);
                while i < b.len() && b[i].is_ascii_whitespace() {
                    i += 1;
                }
                match b.get(i) {
                    Some(b',') => i += 1,
                    Some(b'}') => return i + 1,
                    _ => return i,
                }
                while i < b.len() && b[i].is_ascii_whitespace() {
                    i += 1;
                }
                if b.get(i) == Some(&b'}') {
                    return i + 1;
                }
            }
        }
        let (name, end) = ident_at(b, i);
        i = end;
        if name.is_empty() || name == "self" {
            found(prefix);
            return i;
        }
        prefix.push(name);
        if prefix.len() >= keep || !b[i..].starts_with(b"::") {
            prefix.truncate(keep);
            found(prefix);
            // Skip the rest of a deeper path or group.
            let mut depth = 0usize;
            while i < b.len() {
                match b[i] {
                    b'{' => depth += 1,
                    b'}' if depth == 0 => return i,
                    b'}' => depth -= 1,
                    b',' | b';' | b')' | b'>' if depth == 0 => return i,
                    c if depth == 0 && !(is_ident(c) || c == b':' || c == b'*') => return i,
                    _ => {}
                }
                i += 1;
            }
            return i;
        }
        i += 2;
    }
}

/// A crate's source files: each with its module path and its cleaned code.
struct Tree {
    files: Vec<(Vec<String>, PathBuf, String)>,
    /// Items the root re-exports (`pub use shared::{Hooks, …}`) stand for their module.
    aliases: BTreeMap<String, String>,
}

/// Reads the crate rooted at `root` (lib.rs or main.rs), following `mod` declarations.
fn read_tree(root: &Path) -> Tree {
    let src = root.parent().unwrap();
    let root_code = code_only(&std::fs::read_to_string(root).unwrap());
    let mut aliases = BTreeMap::new();
    for stmt in root_code.split(';') {
        let stmt = stmt.trim();
        let Some(path) = stmt.strip_prefix("pub use ") else {
            continue;
        };
        let Some((module, items)) = path.split_once("::") else {
            continue;
        };
        for item in items.trim_matches(|c| c == '{' || c == '}').split(',') {
            let item = item.split(" as ").last().unwrap_or("").trim();
            if !item.is_empty() && item != "self" {
                aliases.insert(item.to_owned(), module.trim().to_owned());
            }
        }
    }
    let mut files = Vec::new();
    let mut queue = vec![(Vec::new(), root.to_path_buf(), root_code)];
    while let Some((path, file, code)) = queue.pop() {
        for child in declared_modules(&code) {
            let mut child_path: Vec<String> = path.clone();
            child_path.push(child);
            let child_file = module_file(src, &child_path);
            let child_code = code_only(&std::fs::read_to_string(&child_file).unwrap());
            queue.push((child_path, child_file, child_code));
        }
        files.push((path, file, code));
    }
    Tree { files, aliases }
}

/// The graph among the child modules of `parent` (`[]`: the crate's top-level modules):
/// an edge wherever code inside one child names another.
fn graph(tree: &Tree, parent: &[String]) -> Crate {
    let depth = parent.len();
    let modules = tree
        .files
        .iter()
        .find(|(path, _, _)| path == parent)
        .map(|(_, _, code)| declared_modules(code))
        .unwrap_or_default();
    let mut edges: BTreeMap<String, BTreeMap<String, (PathBuf, usize)>> = BTreeMap::new();
    for (path, file, code) in &tree.files {
        if path.len() <= depth || !path.starts_with(parent) {
            continue;
        }
        let from = &path[depth];
        for (target, line) in module_paths(code, path, depth + 1) {
            if target.len() != depth + 1 || !target.starts_with(parent) {
                continue;
            }
            let name = &target[depth];
            let to = match tree.aliases.get(name) {
                Some(module) if depth == 0 => module.clone(),
                _ => name.clone(),
            };
            if &to != from && modules.contains(&to) {
                edges
                    .entry(from.clone())
                    .or_default()
                    .entry(to)
                    .or_insert_with(|| (file.clone(), line));
            }
        }
    }
    Crate { modules, edges }
}

fn read_crate(root: &Path) -> Crate {
    graph(&read_tree(root), &[])
}

fn module_file(src: &Path, path: &[String]) -> PathBuf {
    let joined: PathBuf = path.iter().collect();
    let flat = src.join(&joined).with_extension("rs");
    if flat.exists() {
        flat
    } else {
        src.join(joined).join("mod.rs")
    }
}

/// Strongly connected components of more than one module (Tarjan).
fn cycles(c: &Crate) -> Vec<Vec<String>> {
    struct T<'a> {
        c: &'a Crate,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        found: Vec<Vec<String>>,
    }
    fn visit<'a>(t: &mut T<'a>, v: &'a str) {
        let n = t.index.len();
        t.index.insert(v, n);
        t.low.insert(v, n);
        t.stack.push(v);
        t.on.insert(v);
        let c = t.c;
        for w in c.edges.get(v).into_iter().flat_map(|e| e.keys()) {
            if !t.index.contains_key(w.as_str()) {
                visit(t, w);
                let lw = t.low[w.as_str()];
                t.low.entry(v).and_modify(|l| *l = (*l).min(lw));
            } else if t.on.contains(w.as_str()) {
                let iw = t.index[w.as_str()];
                t.low.entry(v).and_modify(|l| *l = (*l).min(iw));
            }
        }
        if t.low[v] == t.index[v] {
            let mut scc = Vec::new();
            while let Some(w) = t.stack.pop() {
                t.on.remove(w);
                scc.push(w.to_owned());
                if w == v {
                    break;
                }
            }
            if scc.len() > 1 {
                scc.sort();
                t.found.push(scc);
            }
        }
    }
    let mut t = T {
        c,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        found: Vec::new(),
    };
    for m in &c.modules {
        if !t.index.contains_key(m.as_str()) {
            visit(&mut t, m);
        }
    }
    t.found
}

/// Every edge inside each cycle, with the place that makes it, for the failure message.
fn explain(c: &Crate, found: &[Vec<String>]) -> String {
    let mut s = String::new();
    for scc in found {
        s += &format!("cycle among {scc:?}:\n");
        for from in scc {
            for (to, (file, line)) in c.edges.get(from).into_iter().flatten() {
                if scc.contains(to) {
                    let file = file.strip_prefix(workspace()).unwrap_or(file);
                    s += &format!("  {from} -> {to}  ({}:{line})\n", file.display());
                }
            }
        }
    }
    s
}

fn assert_acyclic(root: &str) -> Crate {
    let c = read_crate(&workspace().join(root));
    // A binary may have no modules of its own; a library has some.
    assert!(
        !c.modules.is_empty() || root.ends_with("main.rs"),
        "{root}: no modules found"
    );
    let found = cycles(&c);
    assert!(found.is_empty(), "{root}:\n{}", explain(&c, &found));
    c
}

#[test]
fn the_pooler_library_has_no_import_cycle() {
    assert_acyclic("pooler/src/lib.rs");
}

#[test]
fn the_provisioner_has_no_import_cycle() {
    assert_acyclic("provisioner/src/lib.rs");
    assert_acyclic("provisioner/src/main.rs");
    assert_acyclic("pooler/src/main.rs");
}

/// The module map in lib.rs is the order the imports run: each module names only
/// modules declared before it.
#[test]
fn the_pooler_declares_its_modules_bottom_to_top() {
    let c = read_crate(&workspace().join("pooler/src/lib.rs"));
    let mut wrong = Vec::new();
    for (i, from) in c.modules.iter().enumerate() {
        for (to, (file, line)) in c.edges.get(from).into_iter().flatten() {
            if c.modules[i..].contains(to) {
                let file = file.strip_prefix(workspace()).unwrap_or(file);
                wrong.push(format!("{from} -> {to} ({}:{line})", file.display()));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "these name a module declared after them in pooler/src/lib.rs:\n{}",
        wrong.join("\n")
    );
}

/// The seams issue 14 named: a server knows no client, the client's session knows no
/// console, and the protocol code knows no socket.
#[test]
fn the_named_seams_hold() {
    let c = read_crate(&workspace().join("pooler/src/lib.rs"));
    for (from, to) in [
        ("backend", "session"),
        ("session", "admin"),
        ("proto", "net"),
        ("proto", "session"),
        ("net", "session"),
    ] {
        let edge = c.edges.get(from).and_then(|e| e.get(to));
        assert!(edge.is_none(), "{from} names {to}: {edge:?}");
    }
}

/// One level down, too: inside `session/` (and every other module with children), the
/// files import one way.
#[test]
fn modules_inside_modules_have_no_import_cycle() {
    for root in ["pooler/src/lib.rs", "provisioner/src/lib.rs"] {
        let tree = read_tree(&workspace().join(root));
        let parents: BTreeSet<Vec<String>> = tree
            .files
            .iter()
            .filter(|(path, _, _)| !path.is_empty())
            .map(|(path, _, _)| path.clone())
            .collect();
        for parent in parents {
            let c = graph(&tree, &parent);
            let found = cycles(&c);
            assert!(
                found.is_empty(),
                "{root}, inside {}:\n{}",
                parent.join("::"),
                explain(&c, &found)
            );
        }
    }
}

#[test]
fn the_lexer_sees_paths_only_in_code() {
    let src = "use crate::{a::{b, c}, d};\n// crate::e\nlet s = \"crate::f\";\nlet c = '\"';\n\
               fn g<'a>(x: &'a crate::h::X) {}\n#[cfg(test)]\nmod tests { use crate::i; }\n\
               type T = super::j::K;\n";
    let module = ["m".to_owned(), "n".to_owned()];
    let found: Vec<String> = module_paths(&code_only(src), &module, 2)
        .into_iter()
        .map(|(p, _)| p.join("::"))
        .collect();
    assert_eq!(found, ["a::b", "a::c", "d", "h::X", "m::j"]);
    assert_eq!(
        declared_modules(&code_only("pub mod a;\nmod b {}\n#[cfg(test)]\nmod c;\n")),
        ["a"]
    );
}
