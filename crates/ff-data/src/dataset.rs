//! Dataset listings: MVTec AD categories and user folders, as sorted lists of labelled samples.
//!
//! Listing only touches directory entries; images are decoded later by the
//! [`crate::Loader`]. Files that are not images (by extension: png, jpg,
//! jpeg, bmp, tif, tiff, any case), hidden entries (name starting with `.`,
//! e.g. `.DS_Store` or macOS `._x.png` resource forks) and subdirectories
//! inside image folders are skipped with a `log::warn!` naming them, because
//! such stray files are common in users' folders and should not stop a run.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::Error;

/// The 15 MVTec AD categories.
pub const MVTEC_CATEGORIES: [&str; 15] = [
    "bottle",
    "cable",
    "capsule",
    "carpet",
    "grid",
    "hazelnut",
    "leather",
    "metal_nut",
    "pill",
    "screw",
    "tile",
    "toothbrush",
    "transistor",
    "wood",
    "zipper",
];

/// File extensions (lower case) treated as images.
pub const IMAGE_EXTENSIONS: [&str; 6] = ["png", "jpg", "jpeg", "bmp", "tif", "tiff"];

/// Whether a sample is normal ("good") or shows a defect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Label {
    /// A good part.
    Normal,
    /// A part with a defect.
    Anomalous,
}

/// One image of a dataset with what is known about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// The image file.
    pub path: PathBuf,
    /// Normal or anomalous.
    pub label: Label,
    /// Defect type (`"good"` for normal MVTec samples, the folder name otherwise).
    pub defect: String,
    /// Ground-truth mask of an anomalous sample, when the dataset has masks.
    pub mask: Option<PathBuf>,
}

/// Training (normal only) and test samples of one dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    /// Normal images to fit the flows on.
    pub train: Vec<Sample>,
    /// Normal and anomalous images to evaluate on.
    pub test: Vec<Sample>,
}

impl Split {
    /// True when every anomalous test sample has a mask, so pixel metrics can
    /// be computed (normal samples need none: their mask is all false).
    pub fn has_masks(&self) -> bool {
        self.test
            .iter()
            .all(|s| s.label == Label::Normal || s.mask.is_some())
    }
}

/// Whether `path` has an image extension (case-insensitive).
pub fn is_image_file(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

fn require_dir(path: &Path) -> Result<(), Error> {
    if path.is_dir() {
        Ok(())
    } else {
        Err(Error::MissingDir {
            path: path.to_path_buf(),
        })
    }
}

/// Whether the entry's name starts with a dot (hidden on Unix, macOS metadata).
fn is_hidden(path: &Path) -> bool {
    path.file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with('.'))
}

fn read_dir_sorted(dir: &Path) -> Result<Vec<PathBuf>, Error> {
    let io_err = |source| Error::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err)? {
        entries.push(entry.map_err(io_err)?.path());
    }
    entries.sort();
    Ok(entries)
}

/// The image files directly inside `dir`, sorted by path; anything else is
/// skipped with a warning.
pub fn list_images(dir: &Path) -> Result<Vec<PathBuf>, Error> {
    require_dir(dir)?;
    let mut images = Vec::new();
    for path in read_dir_sorted(dir)? {
        if is_hidden(&path) {
            log::warn!("skipping {}: hidden file", path.display());
        } else if path.is_file() && is_image_file(&path) {
            images.push(path);
        } else {
            log::warn!("skipping {}: not an image file", path.display());
        }
    }
    Ok(images)
}

/// Lists one MVTec AD category:
///
/// ```text
/// <root>/<category>/train/good/*.png                      normal training images
/// <root>/<category>/test/good/*.png                       normal test images
/// <root>/<category>/test/<defect>/*.png                   anomalous test images
/// <root>/<category>/ground_truth/<defect>/<stem>_mask.png their masks
/// ```
///
/// Samples are sorted by path (defect folders alphabetically, `good`
/// included among them), so the order is the same on every machine. Every
/// defect image must have its mask; a missing one is an error naming it.
pub fn mvtec_category(root: &Path, category: &str) -> Result<Split, Error> {
    let dir = root.join(category);
    require_dir(&dir)?;
    let train_dir = dir.join("train").join("good");
    let train: Vec<Sample> = list_images(&train_dir)?
        .into_iter()
        .map(|path| Sample {
            path,
            label: Label::Normal,
            defect: "good".to_string(),
            mask: None,
        })
        .collect();
    if train.is_empty() {
        return Err(Error::EmptyTrainSet { path: train_dir });
    }
    let test_dir = dir.join("test");
    require_dir(&test_dir)?;
    let mut test = Vec::new();
    for defect_dir in read_dir_sorted(&test_dir)? {
        if !defect_dir.is_dir() || is_hidden(&defect_dir) {
            log::warn!("skipping {}: not a defect directory", defect_dir.display());
            continue;
        }
        let defect = defect_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let normal = defect == "good";
        for path in list_images(&defect_dir)? {
            let mask = if normal {
                None
            } else {
                let stem = path
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let expected = dir
                    .join("ground_truth")
                    .join(&defect)
                    .join(format!("{stem}_mask.png"));
                if !expected.is_file() {
                    return Err(Error::MissingMask {
                        image: path,
                        expected,
                    });
                }
                Some(expected)
            };
            test.push(Sample {
                path,
                label: if normal {
                    Label::Normal
                } else {
                    Label::Anomalous
                },
                defect: defect.clone(),
                mask,
            });
        }
    }
    Ok(Split { train, test })
}

/// A user's own dataset, following anomalib's `Folder` semantics.
///
/// Layout (every directory is given explicitly; names are free):
///
/// ```text
/// normal_dir/        good images; all train, unless normal_test_dir is absent,
///                    then a seeded normal_split_ratio share of them is tested
/// abnormal_dir/      images with defects (test only)
/// normal_test_dir/   optional: good images kept for testing
/// mask_dir/          optional: one mask per abnormal image, matched by file
///                    stem: <stem>.<ext> or <stem>_mask.<ext>, white = defect
/// ```
///
/// Images are the files directly inside each directory with an image
/// extension (png, jpg, jpeg, bmp, tif, tiff); other files and
/// subdirectories are skipped with a warning. Any size and mode (grayscale,
/// RGBA, palette, 16-bit, JPEG) is accepted. With `mask_dir`, every abnormal
/// image must have a mask of its own size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FolderConfig {
    /// Good images.
    pub normal_dir: PathBuf,
    /// Images with defects.
    pub abnormal_dir: PathBuf,
    /// Good images reserved for testing; when absent, a share of `normal_dir` is used.
    pub normal_test_dir: Option<PathBuf>,
    /// Masks of the abnormal images, matched by file stem.
    pub mask_dir: Option<PathBuf>,
    /// Share of `normal_dir` moved to the test set when `normal_test_dir` is
    /// absent (anomalib's default 0.2); must be in [0, 1).
    pub normal_split_ratio: f32,
    /// Seed of that split.
    pub seed: u64,
}

impl FolderConfig {
    /// A config with only the two required directories, anomalib's split
    /// ratio 0.2 and seed 0.
    pub fn new(normal_dir: impl Into<PathBuf>, abnormal_dir: impl Into<PathBuf>) -> Self {
        Self {
            normal_dir: normal_dir.into(),
            abnormal_dir: abnormal_dir.into(),
            normal_test_dir: None,
            mask_dir: None,
            normal_split_ratio: 0.2,
            seed: 0,
        }
    }
}

/// Masks in `mask_dir` by file stem (`<stem>` and `<stem>_mask` both map to it).
fn index_masks(mask_dir: &Path) -> Result<HashMap<String, PathBuf>, Error> {
    let mut by_stem = HashMap::new();
    for path in list_images(mask_dir)? {
        let Some(stem) = path.file_stem().map(|s| s.to_string_lossy().into_owned()) else {
            continue;
        };
        let key = stem.strip_suffix("_mask").unwrap_or(&stem).to_string();
        // Sorted listing: an exact `<stem>` file wins over `<stem>_mask` only if
        // it sorts first; both naming schemes in one folder is the user's choice.
        by_stem.entry(key).or_insert(path);
    }
    Ok(by_stem)
}

/// Lists a user's folder dataset (layout in [`FolderConfig`]).
pub fn folder_dataset(cfg: &FolderConfig) -> Result<Split, Error> {
    if !(0.0..1.0).contains(&cfg.normal_split_ratio) {
        return Err(Error::Config(format!(
            "normal_split_ratio must be in [0, 1), got {}",
            cfg.normal_split_ratio
        )));
    }
    let normal_sample = |path: PathBuf| Sample {
        path,
        label: Label::Normal,
        defect: "good".to_string(),
        mask: None,
    };
    let mut normals = list_images(&cfg.normal_dir)?;
    let mut test_normals = match &cfg.normal_test_dir {
        Some(dir) => list_images(dir)?,
        None => {
            // A seeded choice of which normals to hold out, kept in sorted order.
            let n_test =
                (normals.len() as f64 * f64::from(cfg.normal_split_ratio)).round() as usize;
            let mut idx: Vec<usize> = (0..normals.len()).collect();
            idx.shuffle(&mut ChaCha8Rng::seed_from_u64(cfg.seed));
            let mut held: Vec<usize> = idx[..n_test].to_vec();
            held.sort_unstable();
            let mut test = Vec::with_capacity(n_test);
            for &i in held.iter().rev() {
                test.push(normals.remove(i));
            }
            test.reverse();
            test
        }
    };
    if normals.is_empty() {
        return Err(Error::EmptyTrainSet {
            path: cfg.normal_dir.clone(),
        });
    }
    let defect = cfg
        .abnormal_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "abnormal".to_string());
    let mut test: Vec<Sample> = test_normals.drain(..).map(normal_sample).collect();
    let masks = match &cfg.mask_dir {
        Some(dir) => Some((dir, index_masks(dir)?)),
        None => None,
    };
    for path in list_images(&cfg.abnormal_dir)? {
        let mask = match &masks {
            Some((dir, by_stem)) => {
                let stem = path
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                match by_stem.get(&stem) {
                    Some(m) => Some(m.clone()),
                    None => {
                        return Err(Error::MissingMask {
                            expected: dir.join(format!("{stem}.png")),
                            image: path,
                        })
                    }
                }
            }
            None => None,
        };
        test.push(Sample {
            path,
            label: Label::Anomalous,
            defect: defect.clone(),
            mask,
        });
    }
    Ok(Split {
        train: normals.into_iter().map(normal_sample).collect(),
        test,
    })
}
