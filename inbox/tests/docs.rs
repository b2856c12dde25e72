//! The consumer `docs/CONSUMING.md` shows is the crate's doc example, which `cargo test` compiles:
//! the page cannot drift from an API that builds. It stays under 20 lines.

use std::path::Path;

/// The lines of the first fenced block opening with `fence` in `text`.
fn block<'a>(text: impl Iterator<Item = &'a str>, fence: &str) -> Vec<&'a str> {
    text.skip_while(|l| l.trim_end() != fence)
        .skip(1)
        .take_while(|l| l.trim_end() != "```")
        .collect()
}

#[test]
fn the_consumer_in_consuming_md_is_the_compiled_doc_example() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib = std::fs::read_to_string(crate_dir.join("src/lib.rs")).expect("lib.rs");
    let page = std::fs::read_to_string(crate_dir.join("../docs/CONSUMING.md")).expect("the page");

    let doc_lines = lib
        .lines()
        .filter_map(|l| l.strip_prefix("//!"))
        .map(|l| l.strip_prefix(' ').unwrap_or(l));
    // Lines starting with `#` are compiled but hidden from readers.
    let example: Vec<&str> = block(doc_lines, "```no_run")
        .into_iter()
        .filter(|l| !l.starts_with('#'))
        .collect();
    let shown = block(page.lines(), "```rust");

    assert!(example.len() > 10, "the doc example was found: {example:?}");
    assert_eq!(
        shown, example,
        "docs/CONSUMING.md shows the crate's doc example"
    );
    assert!(example.len() < 20, "{} lines", example.len());
}
