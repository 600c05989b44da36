//! Choosing the dataset a command reads (MVTec AD or a user folder) from the
//! command-line flags, and turning ff-data's plain buffers into tensors.

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use ff_data::{Batch, FolderConfig, Split};

/// How the images under `--data` are laid out.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum DatasetFormat {
    /// `<data>/<category>/{train/good, test/<defect>, ground_truth/<defect>}`.
    Mvtec,
    /// A folder of your own (anomalib `Folder` semantics): under `<data>/<category>`,
    /// good images in `--normal-dir`, defective ones in `--abnormal-dir`, optional
    /// good test images in `--normal-test-dir` and masks in `--mask-dir`.
    Folder,
}

/// Flags shared by every command that reads a dataset.
#[derive(Debug, Clone, clap::Args)]
pub struct DataArgs {
    /// Dataset root (e.g. `data/mvtec`).
    #[arg(long)]
    pub data: PathBuf,
    /// Category folder under the root (e.g. `bottle`).
    #[arg(long)]
    pub category: String,
    /// Layout of the dataset.
    #[arg(long, value_enum, default_value_t = DatasetFormat::Mvtec)]
    pub format: DatasetFormat,
    /// Folder format: good images, relative to `<data>/<category>`.
    #[arg(long, default_value = "good")]
    pub normal_dir: PathBuf,
    /// Folder format: defective images, relative to `<data>/<category>`.
    #[arg(long, default_value = "bad")]
    pub abnormal_dir: PathBuf,
    /// Folder format: good test images; without it 20 % of the good images are
    /// held out for testing (seeded).
    #[arg(long)]
    pub normal_test_dir: Option<PathBuf>,
    /// Folder format: masks of the defective images, matched by file stem
    /// (`<stem>.png` or `<stem>_mask.png`); default `masks` when it exists.
    #[arg(long)]
    pub mask_dir: Option<PathBuf>,
}

/// Lists the train and test samples that `args` describe.
pub fn load_split(args: &DataArgs, seed: u64) -> Result<Split> {
    let root = args.data.join(&args.category);
    match args.format {
        DatasetFormat::Mvtec => {
            ff_data::mvtec_category(&args.data, &args.category).with_context(|| {
                format!(
                    "cannot read MVTec AD category '{}' under '{}'",
                    args.category,
                    args.data.display()
                )
            })
        }
        DatasetFormat::Folder => {
            let mut cfg =
                FolderConfig::new(root.join(&args.normal_dir), root.join(&args.abnormal_dir));
            cfg.normal_test_dir = args.normal_test_dir.as_ref().map(|d| root.join(d));
            cfg.mask_dir = match &args.mask_dir {
                Some(d) => Some(root.join(d)),
                None => Some(root.join("masks")).filter(|d| d.is_dir()),
            };
            cfg.seed = seed;
            ff_data::folder_dataset(&cfg).with_context(|| {
                format!("cannot read the image folder dataset '{}'", root.display())
            })
        }
    }
}

/// The images of a batch as a `[n, 3, size, size]` tensor on `device`.
pub fn images_tensor(batch: &Batch, device: &Device) -> Result<Tensor> {
    Tensor::from_slice(&batch.images, (batch.n, 3, batch.size, batch.size), device)
        .context("cannot move a batch of images to the device")
}

/// The images `which` (positions in the batch) of a batch as one tensor.
///
/// # Shapes
/// -> `[which.len(), 3, S, S]`.
pub fn images_subset_tensor(batch: &Batch, which: &[usize], device: &Device) -> Result<Tensor> {
    let per_image = 3 * batch.size * batch.size;
    let mut images = Vec::with_capacity(which.len() * per_image);
    for &k in which {
        images.extend_from_slice(&batch.images[k * per_image..(k + 1) * per_image]);
    }
    Tensor::from_vec(images, (which.len(), 3, batch.size, batch.size), device)
        .context("cannot move a batch of images to the device")
}
