//! Every committed test fixture has a recorded origin: the script that made
//! it and the pinned package versions behind it (`tests-fixtures/PROVENANCE.json`,
//! written by `data-scripts/fixture_provenance.py`), and its bytes are the
//! recorded ones. A fixture regenerated or added without recording it fails.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read fixture dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            files_under(&path, out);
        } else {
            out.push(path);
        }
    }
}

#[test]
fn every_fixture_records_its_script_versions_and_bytes() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let fixtures = root.join("tests-fixtures");
    let text = std::fs::read_to_string(fixtures.join("PROVENANCE.json"))
        .expect("tests-fixtures/PROVENANCE.json (run data-scripts/fixture_provenance.py)");
    let record: serde_json::Value = serde_json::from_str(&text).expect("PROVENANCE.json is JSON");
    let recorded = record["files"].as_object().expect("a 'files' object");

    let mut files = Vec::new();
    files_under(&fixtures, &mut files);
    let mut on_disk = BTreeMap::new();
    for path in files {
        let rel = path
            .strip_prefix(&fixtures)
            .expect("under tests-fixtures")
            .to_string_lossy()
            .replace('\\', "/");
        if rel != "PROVENANCE.json" {
            on_disk.insert(rel, path);
        }
    }
    assert!(
        on_disk.len() > 40,
        "too few fixtures found: {}",
        on_disk.len()
    );

    let mut problems = Vec::new();
    for (rel, path) in &on_disk {
        let Some(entry) = recorded.get(rel) else {
            problems.push(format!("{rel}: not recorded"));
            continue;
        };
        let script = entry["script"].as_str().unwrap_or("");
        if !root.join(script).is_file() {
            problems.push(format!("{rel}: its script '{script}' does not exist"));
        }
        let packages = entry["packages"].as_object();
        if packages.is_none_or(|p| p.is_empty() || p.values().any(|v| v.as_str().is_none())) {
            problems.push(format!("{rel}: no package versions recorded"));
        }
        let bytes = std::fs::read(path).expect("read fixture");
        let digest: String = Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        if entry["sha256"].as_str() != Some(digest.as_str()) {
            problems.push(format!("{rel}: bytes differ from the recorded ones"));
        }
    }
    for rel in recorded.keys() {
        if !on_disk.contains_key(rel) {
            problems.push(format!("{rel}: recorded but absent"));
        }
    }
    assert!(
        problems.is_empty(),
        "fixture provenance is out of date (run data-scripts/fixture_provenance.py after \
         the fixture script):\n{}",
        problems.join("\n")
    );
}
