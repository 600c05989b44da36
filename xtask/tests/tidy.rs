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
