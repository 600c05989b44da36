//! Tidy checks over the whole workspace: every Rust file says what it is for
//! (a `//!` doc, or for a crate root its README included as the crate doc).

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        if name == "target" || name.to_string_lossy().starts_with('.') {
            continue;
        }
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_rust_file_opens_with_a_module_doc() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = Vec::new();
    rust_files(&root.join("crates"), &mut files);
    rust_files(&root.join("xtask"), &mut files);
    assert!(files.len() > 5, "tidy found too few Rust files: {files:?}");
    let offenders: Vec<_> = files
        .iter()
        .filter(|p| {
            let text = std::fs::read_to_string(p).unwrap_or_default();
            let text = text.trim_start();
            // A crate root may open with its README, which says what it is for.
            let readme = p
                .parent()
                .and_then(Path::parent)
                .map(|c| c.join("README.md"));
            let opens_with_readme = text.starts_with("#![doc = include_str!(\"../README.md\")]")
                && readme.is_some_and(|r| {
                    std::fs::read_to_string(r).is_ok_and(|t| t.trim().len() > 100)
                });
            !(text.starts_with("//!") || opens_with_readme)
        })
        .collect();
    assert!(
        offenders.is_empty(),
        "these files do not open with a `//!` line saying what they are for: {offenders:?}"
    );
}

/// The top-level modules of the crate whose sources are in `src`, each with
/// the modules its code (not its comments) names as `crate::<module>`.
fn module_graph(
    src: &Path,
) -> std::collections::BTreeMap<String, std::collections::BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    // Names the crate root re-exports (`pub use module::{A, b}`), by module,
    // so that `crate::A` counts as an edge to `module`.
    let mut reexported = std::collections::BTreeMap::<String, String>::new();
    for root in ["lib.rs", "main.rs"] {
        let text = std::fs::read_to_string(src.join(root)).unwrap_or_default();
        let text = text.replace('\n', " ");
        for item in text.split(';') {
            let Some(rest) = item.trim().strip_prefix("pub use ") else {
                continue;
            };
            let Some((module, names)) = rest.split_once("::") else {
                continue;
            };
            for name in names.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if !name.is_empty() {
                    reexported.insert(name.to_string(), module.trim().to_string());
                }
            }
        }
    }
    let mut graph = std::collections::BTreeMap::<String, std::collections::BTreeSet<String>>::new();
    for file in files {
        let rel = file.strip_prefix(src).expect("file under src");
        let first = rel.components().next().expect("non-empty path");
        let module = first
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        if module == "lib" || module == "main" {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        let deps = graph.entry(module.clone()).or_default();
        for line in text.lines() {
            let code = line.split("//").next().unwrap_or("");
            for (at, _) in code.match_indices("crate::") {
                let name: String = code[at + "crate::".len()..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                let is_module = name.starts_with(|c: char| c.is_ascii_lowercase())
                    && (src.join(format!("{name}.rs")).is_file() || src.join(&name).is_dir());
                let target = if is_module {
                    Some(name)
                } else {
                    reexported.get(&name).cloned()
                };
                if let Some(target) = target.filter(|t| *t != module) {
                    deps.insert(target);
                }
            }
        }
    }
    graph
}

/// The first cycle found in `graph`, as the modules along it.
fn find_cycle(
    graph: &std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut std::collections::BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = std::collections::BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

#[test]
fn no_crate_has_module_cycles() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let crates = [
        "crates/ff-data",
        "crates/ff-backbone",
        "crates/ff-flow",
        "crates/ff-kernels",
        "crates/ff-metrics",
        "crates/ff-cli",
        "xtask",
    ];
    let mut cycles = Vec::new();
    for krate in crates {
        let graph = module_graph(&root.join(krate).join("src"));
        assert!(graph.len() > 2, "{krate}: too few modules found: {graph:?}");
        if let Some(cycle) = find_cycle(&graph) {
            cycles.push(format!("{krate}: {}", cycle.join(" -> ")));
        }
    }
    assert!(
        cycles.is_empty(),
        "modules that depend on each other (a change to one can break the other; \
         move what both need into a module below them):\n{}",
        cycles.join("\n")
    );
}

#[test]
fn only_ff_kernels_has_unsafe_code() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = Vec::new();
    rust_files(&root.join("crates"), &mut files);
    rust_files(&root.join("xtask"), &mut files);
    let kernels = root.join("crates/ff-kernels");
    let keyword = ["un", "safe"].concat();
    let offenders: Vec<_> = files
        .iter()
        .filter(|p| !p.starts_with(&kernels))
        .filter(|p| {
            std::fs::read_to_string(p).is_ok_and(|text| {
                text.lines().any(|line| {
                    let code = line.split("//").next().unwrap_or("");
                    code.match_indices(&keyword).any(|(at, _)| {
                        let after = code[at + keyword.len()..].trim_start();
                        let before = code[..at].chars().next_back();
                        let starts_word =
                            before.is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_'));
                        starts_word
                            && (after.starts_with('{')
                                || after.starts_with("fn ")
                                || after.starts_with("impl")
                                || after.starts_with("trait")
                                || after.starts_with("extern"))
                            || code[at..].starts_with(&format!("{keyword}_code"))
                                && code.contains("allow")
                    })
                })
            })
        })
        .collect();
    assert!(
        offenders.is_empty(),
        "only crates/ff-kernels may hold {keyword} code; found it in {offenders:?}"
    );
}
