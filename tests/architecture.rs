//! Which module of the crate may use which: the import rules of the architecture, checked by
//! reading `src/`. A path the code names (`crate::sink::kafka::SinkError`, `super::setup`,
//! `use crate::{route, status}`) is an edge from the module of the file that names it to the
//! module it names. Comments and `#[cfg(test)]` modules do not count: tests may reach anywhere.
//!
//! The rules (see the map in `src/lib.rs`):
//! - `route`, `checkpoint` and the pgoutput decoder (`source::pgoutput`) use no other module of
//!   the crate: they are pure, and unit-tested alone;
//! - the sources use neither the sink, the relay, `status` nor `http`;
//! - the sink uses neither the sources nor the relay;
//! - `config` does not use TLS (it validates `postgres.url` without reading files);
//! - no module but `main.rs` uses `commands` or `demo` (the demo may run `init`: it is an
//!   entry point of its own);
//! - the top-level modules import each other without a cycle;
//! - no source file is over 600 lines outside its `#[cfg(test)]` module.
//!
//! No edge breaks a rule today. One that must exist for a while goes into [`ALLOWED`] with the
//! change that removes it. The test fails on any forbidden edge not listed, and on a listed edge
//! that is gone (delete it from the list: the rule then holds for good).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Forbidden edges that exist for now (none): (module of the file, top-level module it uses).
const ALLOWED: &[(&str, &str)] = &[];

/// Top-level import cycles that exist today, each as its modules in sorted order.
const ALLOWED_CYCLES: &[&[&str]] = &[];

/// One rule: modules under `from` must not use modules under `to`. A `to` of `None` means
/// "anything outside `from` itself".
struct Rule {
    from: &'static str,
    to: Option<&'static str>,
    why: &'static str,
}

const RULES: &[Rule] = &[
    Rule {
        from: "route",
        to: None,
        why: "route is pure: rows in, records out",
    },
    Rule {
        from: "checkpoint",
        to: None,
        why: "the checkpoint is pure bookkeeping",
    },
    Rule {
        from: "source::pgoutput",
        to: None,
        why: "the pgoutput decoder is pure: bytes in, messages out",
    },
    Rule {
        from: "source",
        to: Some("sink"),
        why: "sources never use the sink",
    },
    Rule {
        from: "source",
        to: Some("relay"),
        why: "sources never use the relay",
    },
    Rule {
        from: "source",
        to: Some("status"),
        why: "sources never use status",
    },
    Rule {
        from: "source",
        to: Some("http"),
        why: "sources never use http",
    },
    Rule {
        from: "sink",
        to: Some("source"),
        why: "the sink never uses the sources",
    },
    Rule {
        from: "sink",
        to: Some("relay"),
        why: "the sink never uses the relay",
    },
    Rule {
        from: "config",
        to: Some("postgres::tls"),
        why: "config never uses TLS",
    },
];

/// Who may use the entry points: `commands` only from `main.rs` (and the demo, which runs
/// `init`), `demo` only from `main.rs`.
const ENTRY_POINTS: &[(&str, &[&str])] = &[("commands", &["demo"]), ("demo", &[])];

#[test]
fn no_module_uses_what_the_architecture_forbids() {
    let edges = edges();
    let mut found = BTreeSet::new();
    let mut unlisted = Vec::new();
    for (from, to) in &edges {
        for rule in RULES {
            let forbidden = under(from, rule.from)
                && match rule.to {
                    None => !under(to, rule.from),
                    Some(target) => under(to, target),
                };
            if forbidden {
                let key = (from.clone(), top(to).to_owned());
                if !ALLOWED.contains(&(key.0.as_str(), key.1.as_str())) {
                    unlisted.push(format!("{from} uses crate::{to}: {}", rule.why));
                }
                found.insert(key);
            }
        }
        for (entry, also) in ENTRY_POINTS {
            if under(to, entry) && !under(from, entry) && !also.iter().any(|m| under(from, m)) {
                unlisted.push(format!(
                    "{from} uses crate::{to}: only main.rs uses the {entry}"
                ));
            }
        }
    }
    let gone: Vec<_> = ALLOWED
        .iter()
        .filter(|(from, to)| !found.contains(&((*from).to_owned(), (*to).to_owned())))
        .collect();
    assert!(
        unlisted.is_empty(),
        "forbidden imports:\n  {}",
        unlisted.join("\n  ")
    );
    assert!(
        gone.is_empty(),
        "these allowed edges no longer exist; delete them from ALLOWED: {gone:?}"
    );
}

#[test]
fn the_top_level_modules_import_each_other_without_a_cycle() {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (from, to) in edges() {
        let (from, to) = (top(&from).to_owned(), top(&to).to_owned());
        if from != to {
            graph.entry(from).or_default().insert(to);
        }
    }
    let cycles = strongly_connected(&graph);
    let allowed: BTreeSet<Vec<String>> = ALLOWED_CYCLES
        .iter()
        .map(|c| c.iter().map(|m| (*m).to_owned()).collect())
        .collect();
    let new: Vec<_> = cycles.difference(&allowed).collect();
    let gone: Vec<_> = allowed.difference(&cycles).collect();
    assert!(new.is_empty(), "import cycles between modules: {new:?}");
    assert!(
        gone.is_empty(),
        "these cycles no longer exist; delete them from ALLOWED_CYCLES: {gone:?}"
    );
}

/// The checker itself: paths are resolved and grouped imports split.
#[test]
fn the_reader_finds_every_form_of_path() {
    let text = "use crate::{a::b, c::{d, e}};\n\
                use super::f::G;\n\
                // use crate::comment;\n\
                fn x() { crate::h::i(); $crate::macro_only(); }\n\
                #[cfg(test)]\nmod tests {\n    use crate::test_only;\n}\n";
    let mut paths: Vec<_> = paths_in(&["m".to_owned(), "n".to_owned()], text)
        .into_iter()
        .map(|p| p.join("::"))
        .collect();
    paths.sort();
    assert_eq!(paths, ["a::b", "c::d", "c::e", "h::i", "m::f::G"]);
}

/// Every edge of the crate: (module of the file, the path it names), both without `crate::`.
/// Most lines a source file may have outside its `#[cfg(test)]` module: a file that grows
/// past it holds more than one role, and is split.
const MAX_LINES: usize = 600;

#[test]
fn no_source_file_is_over_600_lines_outside_its_tests() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut long = Vec::new();
    for file in &files {
        if is_test_only(file) {
            continue;
        }
        let text = std::fs::read_to_string(file).unwrap();
        let lines = without_tests(&text).lines().count();
        if lines > MAX_LINES {
            long.push(format!("{} ({lines} lines)", file.display()));
        }
    }
    assert!(files.len() > 20, "no files read: is src/ where it was?");
    assert!(
        long.is_empty(),
        "over {MAX_LINES} lines outside #[cfg(test)]: split by role:\n  {}",
        long.join("\n  ")
    );
}

/// A file its parent declares as `#[cfg(test)] mod NAME;` (unit tests, test-only encoders).
fn is_test_only(file: &Path) -> bool {
    let name = file.file_stem().unwrap().to_string_lossy().into_owned();
    let dir = file.parent().unwrap();
    let parents = [
        dir.join("mod.rs"),
        dir.with_extension("rs"),
        dir.join("lib.rs"),
    ];
    parents
        .iter()
        .filter(|p| p.as_path() != file)
        .any(|parent| {
            let Ok(text) = std::fs::read_to_string(parent) else {
                return false;
            };
            let lines: Vec<&str> = text.lines().collect();
            lines.windows(2).any(|pair| {
                pair[0] == "#[cfg(test)]"
                    && pair[1]
                        .trim_start_matches("pub(crate) ")
                        .trim_start_matches("pub ")
                        == format!("mod {name};")
            })
        })
}

fn edges() -> BTreeSet<(String, String)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut edges = BTreeSet::new();
    for file in files {
        let relative = file.strip_prefix(&src).unwrap();
        if relative == Path::new("main.rs") || relative == Path::new("lib.rs") {
            continue; // the binary is another crate; lib.rs only declares the modules
        }
        let module = module_of(relative);
        let text = std::fs::read_to_string(&file).unwrap();
        for path in paths_in(&module, &text) {
            edges.insert((module.join("::"), path.join("::")));
        }
    }
    assert!(
        edges.iter().any(|(from, _)| from == "relay"),
        "no edges read: is src/ where it was?"
    );
    edges
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `source/pgoutput/encode.rs` is `["source", "pgoutput", "encode"]`; `source/mod.rs` is
/// `["source"]`.
fn module_of(relative: &Path) -> Vec<String> {
    let mut parts: Vec<String> = relative
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().unwrap();
    let stem = last.trim_end_matches(".rs");
    if stem != "mod" {
        parts.push(stem.to_owned());
    }
    parts
}

/// The crate paths `text` names, as absolute module paths (`super::` resolved against
/// `module`), leaving out comments and the `#[cfg(test)]` module.
fn paths_in(module: &[String], text: &str) -> Vec<Vec<String>> {
    let without = without_tests(text);
    let code = without
        .lines()
        .map(strip_comment)
        .collect::<Vec<_>>()
        .join("\n");
    let bytes = code.as_bytes();
    let mut paths = Vec::new();
    let mut i = 0;
    while i < code.len() {
        let rest = &code[i..];
        let starts_word = i == 0 || (!is_ident(bytes[i - 1]) && bytes[i - 1] != b'$');
        let base = if !starts_word {
            None
        } else if rest.starts_with("crate::") {
            Some((Vec::new(), "crate::".len()))
        } else if rest.starts_with("super::") {
            let mut base = module.to_vec();
            let mut len = 0;
            while code[i + len..].starts_with("super::") {
                base.pop();
                len += "super::".len();
            }
            Some((base, len))
        } else {
            None
        };
        match base {
            Some((base, len)) => {
                let used = parse_path(&code[i + len..], base, &mut paths);
                i += len + used.max(1);
            }
            None => i += rest.chars().next().map_or(1, char::len_utf8),
        }
    }
    paths.retain(|p| !p.is_empty());
    paths
}

/// Parses `a::b::{c, d::e}` after a `crate::` into `prefix`-rooted paths; returns the bytes
/// read.
fn parse_path(text: &str, mut prefix: Vec<String>, out: &mut Vec<Vec<String>>) -> usize {
    let bytes = text.as_bytes();
    let mut i = 0;
    loop {
        let start = i;
        while i < bytes.len() && is_ident(bytes[i]) {
            i += 1;
        }
        if i > start {
            let ident = &text[start..i];
            if ident != "self" {
                prefix.push(ident.to_owned());
            }
        } else if i < bytes.len() && bytes[i] == b'{' {
            i += 1;
            loop {
                while i < bytes.len() && (bytes[i].is_ascii_whitespace() || bytes[i] == b',') {
                    i += 1;
                }
                if i >= bytes.len() || bytes[i] == b'}' {
                    break;
                }
                let used = parse_path(&text[i..], prefix.clone(), out);
                i += used.max(1);
            }
            return i + 1;
        }
        if text[i..].starts_with("::") {
            i += 2;
        } else {
            out.push(prefix);
            return i;
        }
    }
}

/// The file up to its `#[cfg(test)] mod … {`, which must be its last item.
fn without_tests(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    for (n, line) in lines.iter().enumerate() {
        // Only an item at the file's top level; attributes may follow before the `mod`.
        if *line != "#[cfg(test)]" {
            continue;
        }
        let Some(item) = (n + 1..lines.len()).find(|&k| {
            let l = lines[k];
            !(l.starts_with("#[") || l.starts_with([' ', '\t']) || l.starts_with(")]"))
        }) else {
            continue;
        };
        let declares_mod = lines[item].starts_with("mod ") || lines[item].contains(" mod ");
        if !declares_mod || !lines[item].trim_end().ends_with('{') {
            continue; // another test-only item, or a test-only file module read on its own
        }
        // A top-level item after it would be read as test code (raw strings in the tests may
        // start at column 0, so only what looks like an item counts).
        const ITEMS: &[&str] = &[
            "pub ",
            "pub(",
            "fn ",
            "async fn ",
            "use ",
            "impl",
            "struct ",
            "enum ",
            "const ",
            "static ",
            "mod ",
            "type ",
            "trait ",
            "macro_rules!",
            "#[",
        ];
        let later_item = lines[item + 1..]
            .iter()
            .find(|l| ITEMS.iter().any(|start| l.starts_with(start)));
        assert!(
            later_item.is_none(),
            "the #[cfg(test)] module must be the file's last item; found {later_item:?}"
        );
        return lines[..n].join("\n");
    }
    text.to_owned()
}

fn strip_comment(line: &str) -> &str {
    let mut from = 0;
    while let Some(at) = line[from..].find("//") {
        let at = from + at;
        if at > 0 && line.as_bytes()[at - 1] == b':' {
            from = at + 2; // a URL in a string, not a comment
        } else {
            return &line[..at];
        }
    }
    line
}

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// Whether the path `path` is `module` or inside it.
fn under(path: &str, module: &str) -> bool {
    path == module
        || path
            .strip_prefix(module)
            .is_some_and(|rest| rest.starts_with("::"))
}

fn top(path: &str) -> &str {
    path.split("::").next().unwrap_or(path)
}

/// The cycles of `graph`: its strongly connected components of more than one module, each
/// sorted (Tarjan's algorithm).
fn strongly_connected(graph: &BTreeMap<String, BTreeSet<String>>) -> BTreeSet<Vec<String>> {
    struct State<'a> {
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        found: BTreeSet<Vec<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, node: &'a str) {
        let n = s.index.len();
        s.index.insert(node, n);
        s.low.insert(node, n);
        s.stack.push(node);
        s.on_stack.insert(node);
        let graph = s.graph;
        for next in graph.get(node).into_iter().flatten() {
            let next = next.as_str();
            if !s.index.contains_key(next) {
                visit(s, next);
                let low = s.low[node].min(s.low[next]);
                s.low.insert(node, low);
            } else if s.on_stack.contains(next) {
                let low = s.low[node].min(s.index[next]);
                s.low.insert(node, low);
            }
        }
        if s.low[node] == s.index[node] {
            let mut component = Vec::new();
            while let Some(m) = s.stack.pop() {
                s.on_stack.remove(m);
                component.push(m.to_owned());
                if m == node {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                s.found.insert(component);
            }
        }
    }
    let mut state = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: BTreeSet::new(),
    };
    for node in graph.keys() {
        if !state.index.contains_key(node.as_str()) {
            visit(&mut state, node);
        }
    }
    state.found
}
