//! A read-only memory-mapped file whose pages can be handed back range by
//! range: what the backbone's safetensors loader reads weights through, so
//! that a mapped file never stays resident next to the copy made from it.
//!
//! Mapping a file is `unsafe` in Rust because another process could truncate
//! or rewrite it while it is mapped; this module holds that `unsafe` so that
//! the model crates stay free of it (this is the workspace's only crate with
//! `unsafe` code).

use std::ops::Range;
use std::path::Path;

use memmap2::{Mmap, UncheckedAdvice};

/// A whole file mapped read-only (a shared mapping: its pages come from the
/// page cache and can be dropped and read back at any time).
///
/// The contract every memory-mapped model loader relies on holds here too:
/// the file must not be truncated or rewritten while it is mapped. Weight
/// files are read-only inputs (the hub cache stores blobs by content hash
/// and never rewrites them).
pub struct MappedFile {
    mmap: Mmap,
}

impl MappedFile {
    /// Maps all of `path` read-only.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = std::fs::File::open(path)?;
        // SAFETY: see the type's contract: the mapping is valid for as long
        // as no one truncates or rewrites the file, which weight files (read-
        // only inputs) never are. Every access goes through `bytes`, whose
        // slices borrow `self`, so none outlives the mapping.
        let mmap = unsafe { Mmap::map(&file)? };
        Ok(Self { mmap })
    }

    /// The file's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.mmap
    }

    /// Releases this process's pages of `range` (`MADV_DONTNEED`), to be read
    /// back from the page cache or the file on the next access. Only a memory
    /// saving: the bytes stay the same, so this is safe while slices from
    /// [`MappedFile::bytes`] are alive. An empty range does nothing.
    ///
    /// # Errors
    /// A range past the end of the file, or a kernel that refuses the advice.
    pub fn release(&self, range: Range<usize>) -> std::io::Result<()> {
        if range.start >= range.end {
            return Ok(());
        }
        if range.end > self.mmap.len() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "range {}..{} is past the end of a {}-byte mapping",
                    range.start,
                    range.end,
                    self.mmap.len()
                ),
            ));
        }
        // SAFETY: MADV_DONTNEED on a read-only, file-backed shared mapping
        // only drops this process's pages of the range: a later access faults
        // the same bytes back in from the page cache or the file, so nothing
        // is zeroed or lost, even on the boundary pages the range shares with
        // its neighbours, and live slices into the map keep reading the same
        // values. The range was checked to lie inside the map.
        unsafe {
            self.mmap
                .unchecked_advise_range(UncheckedAdvice::DontNeed, range.start, range.len())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn released_pages_read_back_the_same_bytes() {
        let path = std::env::temp_dir().join(format!("ff-kernels-mapped-{}", std::process::id()));
        let data: Vec<u8> = (0..3 * 4096 + 123).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let map = MappedFile::open(&path).unwrap();
        let before = map.bytes();
        assert_eq!(before, &data[..]);
        map.release(100..5000).unwrap();
        map.release(0..0).unwrap();
        assert_eq!(map.bytes(), &data[..], "pages read back after release");
        let err = map.release(0..data.len() + 1).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput, "{err}");
        drop(map);
        std::fs::remove_file(&path).unwrap();
    }
}
