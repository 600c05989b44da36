//! File-system helpers: atomic writes (temp file + rename) so that a crash or
//! kill never leaves a half-written checkpoint, report or CSV behind.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// The temporary sibling of `path` that an atomic write goes through. It lives
/// in the same directory so that the final rename never crosses file systems.
pub fn temp_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".to_string());
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Writes `bytes` to `path` atomically: a reader sees either the old file or
/// the complete new one, never a prefix.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |tmp| {
        let mut file = std::fs::File::create(tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        Ok(())
    })
}

/// Lets `write` produce the file at a temporary path, then renames it onto
/// `path`. Used for writers that insist on a path (safetensors, PNG encoders).
pub fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&Path) -> std::result::Result<(), Box<dyn std::error::Error + Send + Sync>>,
) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create directory '{}'", dir.display()))?;
    }
    let tmp = temp_sibling(path);
    if let Err(e) = write(&tmp) {
        // The temporary file is useless after a failed write; failing to remove
        // it is not worth hiding the original error for.
        let _ = std::fs::remove_file(&tmp);
        return Err(anyhow::anyhow!(e))
            .with_context(|| format!("cannot write '{}'", path.display()));
    }
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot move '{}' onto '{}'", tmp.display(), path.display()))
}

/// Serialises `value` as pretty JSON and writes it atomically.
pub fn write_json_atomic<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value)
        .with_context(|| format!("cannot serialise '{}'", path.display()))?;
    text.push('\n');
    write_atomic(path, text.as_bytes())
}

/// Appends one line to a JSON-lines file, creating it (and its directory) if needed.
pub fn append_json_line<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create directory '{}'", dir.display()))?;
    }
    let mut line = serde_json::to_string(value)
        .with_context(|| format!("cannot serialise a line of '{}'", path.display()))?;
    line.push('\n');
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open '{}' for appending", path.display()))?;
    file.write_all(line.as_bytes())
        .with_context(|| format!("cannot append to '{}'", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp_file() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("sub/a.json");
        write_json_atomic(&path, &serde_json::json!({"a": 1}))?;
        write_json_atomic(&path, &serde_json::json!({"a": 2}))?;
        let back: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
        assert_eq!(back["a"], 2);
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<std::io::Result<_>>()?;
        assert_eq!(names.len(), 1, "leftover files: {names:?}");
        Ok(())
    }

    #[test]
    fn failed_write_keeps_the_old_file() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("a.txt");
        write_atomic(&path, b"old")?;
        let err = write_atomic_with(&path, |tmp| {
            std::fs::write(tmp, b"partial")?;
            Err("disk full".into())
        });
        assert!(format!("{:#}", err.unwrap_err()).contains("disk full"));
        assert_eq!(std::fs::read(&path)?, b"old");
        assert_eq!(std::fs::read_dir(dir.path())?.count(), 1);
        Ok(())
    }

    #[test]
    fn json_lines_append() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("log.jsonl");
        append_json_line(&path, &serde_json::json!({"epoch": 1}))?;
        append_json_line(&path, &serde_json::json!({"epoch": 2}))?;
        let text = std::fs::read_to_string(&path)?;
        let epochs: Vec<i64> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .map(|v| v["epoch"].as_i64().unwrap_or(-1))
            })
            .collect::<std::result::Result<_, _>>()?;
        assert_eq!(epochs, vec![1, 2]);
        Ok(())
    }
}
