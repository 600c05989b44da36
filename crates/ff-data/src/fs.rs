//! Atomic file writes, the one implementation every writer of the workspace
//! goes through (checkpoints, results, reports, CSVs, heatmaps): the bytes
//! go to a temporary sibling, are synced, renamed onto the final path, and
//! the directory is synced, so a crash, a kill or a full disk never leaves a
//! half-written file behind and a reader sees either the old file or the
//! whole new one.
//!
//! ```
//! let dir = tempfile::tempdir()?;
//! let path = dir.path().join("results/metrics.json");
//! ff_data::fs::write_atomic(&path, b"{}\n")?;
//! assert_eq!(std::fs::read(&path)?, b"{}\n");
//!
//! // A set of files: stage them all, then commit; a failure while staging
//! // leaves every old file of the set in place.
//! let staged = [
//!     ff_data::fs::stage(&dir.path().join("a.bin"), b"a")?,
//!     ff_data::fs::stage(&dir.path().join("b.bin"), b"b")?,
//! ];
//! for file in staged {
//!     file.commit()?;
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::Error;

/// The temporary sibling of `path` that an atomic write goes through. It lives
/// in the same directory so that the final rename never crosses file systems.
pub fn temp_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".to_string());
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Writes `bytes` to `path` atomically (creating its directory): a reader
/// sees either the old file or the complete new one, never a prefix.
///
/// # Errors
/// [`Error::Write`] naming `path` (or its directory) and the cause.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    stage(path, bytes)?.commit()
}

/// Lets `write` produce the file at a temporary path, then renames it onto
/// `path`: for writers that insist on a path of their own (safetensors, PNG
/// encoders). `write`'s error is kept as the cause.
pub fn write_atomic_with<E>(
    path: &Path,
    write: impl FnOnce(&Path) -> Result<(), E>,
) -> Result<(), Error>
where
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let staged = Staged::beside(path)?;
    write(&staged.tmp).map_err(|e| Error::Write {
        path: path.to_path_buf(),
        source: std::io::Error::other(e),
    })?;
    staged.commit()
}

/// Writes `bytes` to the temporary sibling of `path` and syncs it (see
/// [`Staged`]).
pub fn stage(path: &Path, bytes: &[u8]) -> Result<Staged, Error> {
    stage_with(path, |file| file.write_all(bytes))
}

/// [`stage`] with the writing left to `write`, which gets the created
/// temporary file; it is synced afterwards.
pub fn stage_with(
    path: &Path,
    write: impl FnOnce(&mut File) -> std::io::Result<()>,
) -> Result<Staged, Error> {
    let staged = Staged::beside(path)?;
    let written = File::create(&staged.tmp).and_then(|mut file| {
        write(&mut file)?;
        file.sync_all()
    });
    written.map_err(|source| Error::Write {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(staged)
}

/// Stages `path` as a hard link to `existing` (a file already written and
/// synced, such as another checkpoint's copy of the same bytes): nothing is
/// copied, and replacing either path later by [`Staged::commit`]'s rename
/// leaves the other intact. Fails where the file system has no hard links;
/// the caller then writes the bytes instead.
pub fn stage_link(path: &Path, existing: &Path) -> Result<Staged, Error> {
    let staged = Staged::beside(path)?;
    std::fs::hard_link(existing, &staged.tmp).map_err(|source| Error::Write {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(staged)
}

/// A file written in full (and synced) under a temporary name beside its
/// final path, not yet in place. [`Staged::commit`] renames it onto the
/// path; dropping it uncommitted removes it. Staging every file of a set
/// before committing any keeps the old set whole when a write fails (a full
/// disk fails at staging, not at the rename).
#[must_use = "a staged file is removed unless committed"]
#[derive(Debug)]
pub struct Staged {
    tmp: PathBuf,
    path: PathBuf,
    committed: bool,
}

impl Staged {
    /// The (not yet written) temporary sibling of `path`, its folder created.
    fn beside(path: &Path) -> Result<Self, Error> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| Error::Write {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        Ok(Self {
            tmp: temp_sibling(path),
            path: path.to_path_buf(),
            committed: false,
        })
    }

    /// The final path this file goes to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves the file onto its final path and syncs the directory, so that
    /// the rename itself survives a power cut.
    pub fn commit(mut self) -> Result<(), Error> {
        std::fs::rename(&self.tmp, &self.path).map_err(|source| Error::Write {
            path: self.path.clone(),
            source,
        })?;
        self.committed = true;
        sync_parent(&self.path);
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            // Nothing to report: the file was never in place, and the error
            // that made the caller give it up is what the user sees.
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Syncs the directory holding `path`, which makes a rename durable on
/// POSIX file systems. Some file systems refuse to sync a directory; the
/// rename has happened by then, so that is no reason to fail the write.
fn sync_parent(path: &Path) {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(dir) = File::open(dir) {
            let _ = dir.sync_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/out.txt");
        write_atomic(&path, b"old").unwrap();
        write_atomic(&path, b"new").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert_eq!(names(&dir.path().join("sub")), ["out.txt"]);
    }

    #[test]
    fn a_failed_write_keeps_the_old_file_and_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.txt");
        write_atomic(&path, b"old").unwrap();
        let err = stage_with(&path, |f| {
            f.write_all(b"half")?;
            Err(std::io::Error::from_raw_os_error(28)) // ENOSPC
        })
        .unwrap_err();
        assert!(
            matches!(&err, Error::Write { path: p, .. } if p == &path),
            "{err}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert_eq!(names(dir.path()), ["out.txt"], "no temporary file left");

        let err = write_atomic_with(&path, |_| Err("encoder failed")).unwrap_err();
        assert!(
            matches!(&err, Error::Write { path: p, .. } if p == &path),
            "{err}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
    }

    #[test]
    fn dropping_a_staged_file_removes_it() {
        let dir = tempfile::tempdir().unwrap();
        let staged = stage(&dir.path().join("x.bin"), b"x").unwrap();
        assert_eq!(staged.path(), dir.path().join("x.bin"));
        assert_eq!(names(dir.path()).len(), 1, "the temporary file exists");
        drop(staged);
        assert!(names(dir.path()).is_empty());
    }
}
