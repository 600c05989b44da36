//! File-system helpers of the CLI over [`ff_data::fs`]'s atomic writes (temp
//! file + rename, so that a crash or kill never leaves a half-written
//! checkpoint, report or CSV behind): JSON files, JSON-lines logs, a
//! writability probe, and write failures on demand for tests.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

pub use ff_data::fs::{write_atomic_with, Staged};

/// Writes `bytes` to `path` atomically: a reader sees either the old file or
/// the complete new one, never a prefix.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    stage(path, bytes)?.commit()?;
    Ok(())
}

/// Writes `bytes` to the temporary sibling of `path` ([`ff_data::fs::stage`],
/// with the test builds' [`fault`] injection).
pub fn stage(path: &Path, bytes: &[u8]) -> Result<Staged> {
    Ok(ff_data::fs::stage_with(path, |file| {
        file.write_all(bytes)?;
        fault::check()
    })?)
}

/// Stages `path` as a hard link to the already written `existing` when the
/// file system allows, else writes `bytes` (the same content) like [`stage`].
pub fn stage_shared(path: &Path, existing: &Path, bytes: &[u8]) -> Result<Staged> {
    match ff_data::fs::stage_link(path, existing) {
        Ok(staged) => {
            fault::check().map_err(|source| ff_data::Error::Write {
                path: path.to_path_buf(),
                source,
            })?;
            Ok(staged)
        }
        Err(e) => {
            log::debug!("no hard link for '{}' ({e}); writing it", path.display());
            stage(path, bytes)
        }
    }
}

/// Checks that files can be created in `dir` (creating it if needed), by
/// writing and removing a probe file: an unwritable `--out` is reported
/// before any work is done, not after the first epoch.
pub fn ensure_writable_dir(dir: &Path, what: &str) -> Result<()> {
    let fail = |e: anyhow::Error| {
        e.context(format!(
            "the {what} '{}' is not writable; choose another with --out",
            dir.display()
        ))
    };
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create directory '{}'", dir.display()))
        .map_err(fail)?;
    let probe = dir.join(format!(".fastflow-write-test-{}", std::process::id()));
    std::fs::write(&probe, b"probe")
        .with_context(|| format!("cannot create '{}'", probe.display()))
        .map_err(fail)?;
    std::fs::remove_file(&probe)
        .with_context(|| format!("cannot remove '{}'", probe.display()))
        .map_err(fail)
}

/// Write failures on demand, for tests of what a full disk does to a run:
/// `fault::fail_write(n)` (in test builds) makes the `n`-th next staged write on this
/// thread fail with "No space left on device" after its bytes went out.
/// Outside tests this is a no-op.
pub mod fault {
    #[cfg(test)]
    thread_local! {
        static COUNTDOWN: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
    }

    /// Fails the `n`-th next staged write on this thread (`1`: the very next one).
    #[cfg(test)]
    pub fn fail_write(n: usize) {
        COUNTDOWN.with(|c| c.set(Some(n)));
    }

    #[cfg(test)]
    pub(super) fn check() -> std::io::Result<()> {
        COUNTDOWN.with(|c| match c.get() {
            Some(1) => {
                c.set(None);
                Err(std::io::Error::from_raw_os_error(28)) // ENOSPC
            }
            Some(n) => {
                c.set(Some(n - 1));
                Ok(())
            }
            None => Ok(()),
        })
    }

    #[cfg(not(test))]
    #[inline]
    pub(super) fn check() -> std::io::Result<()> {
        Ok(())
    }
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
