//! The feature cache of `fastflow train`: the backbone is frozen and the
//! training images are not augmented, so every epoch would compute the same
//! backbone features again. Each image's features are computed once, in the
//! first epoch (and at the first evaluation for test images), and read back
//! in every later one.
//!
//! Features are kept exactly (f32, in the memory order the backbone produced
//! them, rebuilt with the same strides), so a run with the cache and one
//! without produce bit-identical checkpoints. They live in memory up to a
//! budget, beyond it in a file of the run directory that is read and written
//! at offsets (the OS page cache keeps it in memory when there is room, and
//! it does not count against the process's memory) and removed at the end.
//! Training on a GPU, `auto` keeps them as tensors in GPU memory, so a
//! cached step copies nothing between host and device.

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};

use crate::cli::FeatureCacheArg;

/// Where the cache keeps its features.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    Ram,
    Disk,
    /// Tensors on the training device (a GPU): no copies to and from the host.
    Device,
}

/// How one scale's features are laid out in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Order {
    /// `[b, C, h, w]` row-major.
    Nchw,
    /// An NCHW view of `[b, h, w, C]` storage (the CPU kernels' layout).
    Nhwc,
}

/// Per-image backbone features of one image set (training or test images),
/// indexed like the loader's samples.
pub struct FeatureStore {
    /// `[C, h, w]` of each scale.
    shapes: Vec<[usize; 3]>,
    /// Where each scale starts within an image's block, in floats.
    offsets: Vec<usize>,
    /// Floats per image (all scales).
    per_image: usize,
    /// Memory order of each scale, fixed by the first batch stored.
    orders: Option<Vec<Order>>,
    filled: Vec<bool>,
    /// Seconds the backbone took for the images stored so far.
    backbone_seconds: f64,
    backing: Backing,
}

enum Backing {
    Ram(Vec<f32>),
    Disk {
        file: File,
        path: PathBuf,
    },
    /// Per image, its `[1, C, h, w]` feature map of each scale.
    Device(Vec<Option<Vec<Tensor>>>),
}

impl std::fmt::Debug for FeatureStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FeatureStore")
            .field("shapes", &self.shapes)
            .field("images", &self.filled.len())
            .field("placement", &self.placement())
            .finish()
    }
}

/// Bytes of features per image for these `[C, h, w]` scale shapes.
pub fn bytes_per_image(shapes: &[[usize; 3]]) -> u64 {
    shapes.iter().map(|[c, h, w]| (c * h * w * 4) as u64).sum()
}

impl FeatureStore {
    /// An empty store for `n` images with features of `shapes`, in memory
    /// or in a new file at `path` (replaced if it exists).
    pub fn new(n: usize, shapes: &[[usize; 3]], placement: Placement, path: &Path) -> Result<Self> {
        let mut offsets = Vec::with_capacity(shapes.len());
        let mut per_image = 0;
        for [c, h, w] in shapes {
            offsets.push(per_image);
            per_image += c * h * w;
        }
        let backing = match placement {
            Placement::Ram => Backing::Ram(vec![0.0; n * per_image]),
            Placement::Device => Backing::Device(vec![None; n]),
            Placement::Disk => {
                let file = File::options()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(path)
                    .with_context(|| {
                        format!("cannot create the feature cache '{}'", path.display())
                    })?;
                Backing::Disk {
                    file,
                    path: path.to_path_buf(),
                }
            }
        };
        Ok(Self {
            shapes: shapes.to_vec(),
            offsets,
            per_image,
            orders: None,
            filled: vec![false; n],
            backbone_seconds: 0.0,
            backing,
        })
    }

    pub fn placement(&self) -> Placement {
        match self.backing {
            Backing::Ram(_) => Placement::Ram,
            Backing::Disk { .. } => Placement::Disk,
            Backing::Device(_) => Placement::Device,
        }
    }

    /// Whether every image of `indices` has its features stored.
    pub fn has_all(&self, indices: &[usize]) -> bool {
        indices.iter().all(|&i| self.filled[i])
    }

    /// Seconds the backbone took to compute what is stored.
    pub fn backbone_seconds(&self) -> f64 {
        self.backbone_seconds
    }

    /// Stores the features of a batch, which the backbone computed in
    /// `backbone_seconds`: `features[s]` is scale `s` of the images
    /// `indices`, `[b, C, h, w]`.
    pub fn store(
        &mut self,
        indices: &[usize],
        features: &[Tensor],
        backbone_seconds: f64,
    ) -> Result<()> {
        if features.len() != self.shapes.len() {
            bail!(
                "feature cache: {} feature maps, expected {}",
                features.len(),
                self.shapes.len()
            );
        }
        let b = indices.len();
        for (s, f) in features.iter().enumerate() {
            let [c, h, w] = self.shapes[s];
            let dims = f.dims();
            if dims != [b, c, h, w] {
                bail!("feature cache: scale {s} has shape {dims:?}, expected [{b}, {c}, {h}, {w}]");
            }
        }
        if let Backing::Device(all) = &mut self.backing {
            for (k, &i) in indices.iter().enumerate() {
                all[i] = Some(
                    features
                        .iter()
                        .map(|f| f.narrow(0, k, 1))
                        .collect::<candle_core::Result<_>>()?,
                );
                self.filled[i] = true;
            }
            self.backbone_seconds += backbone_seconds;
            return Ok(());
        }
        // Host copies keep the backbone's memory order, fixed by the first batch.
        let orders: Vec<Order> = features
            .iter()
            .map(|f| {
                // Channels-last storage shows as a contiguous NHWC permutation.
                if !f.is_contiguous() && f.permute((0, 2, 3, 1)).is_ok_and(|p| p.is_contiguous()) {
                    Order::Nhwc
                } else {
                    Order::Nchw
                }
            })
            .collect();
        match &self.orders {
            None => self.orders = Some(orders.clone()),
            Some(known) if *known != orders => {
                bail!("feature cache: the backbone changed its feature layout between batches")
            }
            Some(_) => {}
        }
        let mut block = vec![0f32; b * self.per_image];
        for (s, (f, order)) in features.iter().zip(&orders).enumerate() {
            let [c, h, w] = self.shapes[s];
            let physical = match order {
                Order::Nhwc => f.permute((0, 2, 3, 1))?,
                Order::Nchw => f.contiguous()?,
            };
            let values = physical.flatten_all()?.to_vec1::<f32>()?;
            let n = c * h * w;
            for (k, chunk) in values.chunks_exact(n).enumerate() {
                let at = k * self.per_image + self.offsets[s];
                block[at..at + n].copy_from_slice(chunk);
            }
        }
        for (k, &i) in indices.iter().enumerate() {
            let image = &block[k * self.per_image..(k + 1) * self.per_image];
            match &mut self.backing {
                Backing::Ram(all) => {
                    all[i * self.per_image..(i + 1) * self.per_image].copy_from_slice(image)
                }
                Backing::Disk { file, path } => {
                    write_all_at(file, &as_bytes(image), (i * self.per_image * 4) as u64)
                        .with_context(|| {
                            format!("cannot write to the feature cache '{}'", path.display())
                        })?
                }
                Backing::Device(_) => unreachable!("device features are stored above"),
            }
            self.filled[i] = true;
        }
        self.backbone_seconds += backbone_seconds;
        Ok(())
    }

    /// The stored features of images `indices` as a batch, one tensor per
    /// scale with the strides the backbone gave them.
    pub fn load(&self, indices: &[usize], device: &Device) -> Result<Vec<Tensor>> {
        if let Some(i) = indices.iter().find(|&&i| !self.filled[i]) {
            bail!("feature cache: image {i} has no stored features");
        }
        if let Backing::Device(all) = &self.backing {
            // Concatenated where they live: no trip through host memory.
            return (0..self.shapes.len())
                .map(|s| {
                    let parts: Vec<&Tensor> = indices
                        .iter()
                        .filter_map(|&i| all[i].as_ref().map(|f| &f[s]))
                        .collect();
                    Ok(Tensor::cat(&parts, 0)?.to_device(device)?)
                })
                .collect();
        }
        let Some(orders) = &self.orders else {
            bail!("feature cache: nothing stored yet");
        };
        let b = indices.len();
        let mut block = vec![0f32; b * self.per_image];
        for (k, &i) in indices.iter().enumerate() {
            let dest = &mut block[k * self.per_image..(k + 1) * self.per_image];
            match &self.backing {
                Backing::Ram(all) => {
                    dest.copy_from_slice(&all[i * self.per_image..(i + 1) * self.per_image])
                }
                Backing::Disk { file, path } => {
                    let mut bytes = vec![0u8; self.per_image * 4];
                    read_exact_at(file, &mut bytes, (i * self.per_image * 4) as u64).with_context(
                        || format!("cannot read the feature cache '{}'", path.display()),
                    )?;
                    for (d, q) in dest.iter_mut().zip(bytes.chunks_exact(4)) {
                        *d = f32::from_ne_bytes([q[0], q[1], q[2], q[3]]);
                    }
                }
                Backing::Device(_) => unreachable!("device features are loaded above"),
            }
        }
        let mut out = Vec::with_capacity(self.shapes.len());
        for (s, order) in orders.iter().enumerate() {
            let [c, h, w] = self.shapes[s];
            let n = c * h * w;
            let mut values = Vec::with_capacity(b * n);
            for k in 0..b {
                let at = k * self.per_image + self.offsets[s];
                values.extend_from_slice(&block[at..at + n]);
            }
            let t = match order {
                Order::Nhwc => {
                    Tensor::from_vec(values, (b, h, w, c), device)?.permute((0, 3, 1, 2))?
                }
                Order::Nchw => Tensor::from_vec(values, (b, c, h, w), device)?,
            };
            out.push(t);
        }
        Ok(out)
    }
}

/// Images per backbone call while filling a cache. Features do not depend
/// on which images share a call, and small calls keep the backbone's
/// activations (DeiT's attention maps: 16 MiB per image and block) small.
pub const FILL_CHUNK: usize = 4;

impl FeatureStore {
    /// Runs the backbone on the images at `positions` of `batch` (whose
    /// samples are `indices`) in chunks of [`FILL_CHUNK`] and stores their
    /// features; returns the backbone's seconds.
    pub fn fill(
        &mut self,
        engine: &crate::engine::Engine,
        batch: &ff_data::Batch,
        indices: &[usize],
        positions: &[usize],
        device: &Device,
    ) -> Result<f64> {
        let mut seconds = 0.0;
        for chunk in positions.chunks(FILL_CHUNK) {
            let x = crate::data::images_subset_tensor(batch, chunk, device)?;
            let t = std::time::Instant::now();
            let features = engine.features(&x)?;
            let s = t.elapsed().as_secs_f64();
            let ids: Vec<usize> = chunk.iter().map(|&k| indices[k]).collect();
            self.store(&ids, &features, s)?;
            seconds += s;
        }
        Ok(seconds)
    }

    /// The positions in a batch of samples `indices` whose features are missing.
    pub fn missing(&self, indices: &[usize]) -> Vec<usize> {
        (0..indices.len())
            .filter(|&k| !self.filled[indices[k]])
            .collect()
    }
}

impl Drop for FeatureStore {
    fn drop(&mut self) {
        if let Backing::Disk { path, .. } = &self.backing {
            // The file is scratch space of this run; if it cannot be removed
            // (already gone, read-only now) there is nothing to tell the user
            // that would change what they do.
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Writes all of `buf` at byte `offset` of `file` (no shared cursor).
fn write_all_at(file: &File, buf: &[u8], offset: u64) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        std::os::unix::fs::FileExt::write_all_at(file, buf, offset)
    }
    #[cfg(windows)]
    {
        let (mut buf, mut offset) = (buf, offset);
        while !buf.is_empty() {
            let n = std::os::windows::fs::FileExt::seek_write(file, buf, offset)?;
            buf = &buf[n..];
            offset += n as u64;
        }
        Ok(())
    }
}

/// Fills `buf` from byte `offset` of `file` (no shared cursor).
fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
    }
    #[cfg(windows)]
    {
        let (mut buf, mut offset) = (buf, offset);
        while !buf.is_empty() {
            let n = std::os::windows::fs::FileExt::seek_read(file, buf, offset)?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            buf = &mut std::mem::take(&mut buf)[n..];
            offset += n as u64;
        }
        Ok(())
    }
}

/// `f32` values as their native-endian bytes.
fn as_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_ne_bytes()).collect()
}

/// The memory the OS reports as available, in bytes (`MemAvailable`).
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The default budget: half of the memory available when training starts
/// (4 GiB where the OS does not say).
pub fn default_budget() -> u64 {
    available_memory().map_or(4 << 30, |m| m / 2)
}

/// What `--feature-cache` decided, for the run's log line.
#[derive(Debug, Clone, PartialEq)]
pub struct CachePlan {
    pub placement: Placement,
    pub bytes: u64,
    pub budget: u64,
}

/// Where training runs, as far as the cache's placement cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrainsOn {
    /// The CPU: features stay in host memory or on disk.
    Cpu,
    /// A GPU: `auto` keeps the features there.
    Gpu,
}

impl TrainsOn {
    /// The processor `device` is.
    pub fn of(device: &candle_core::Device) -> Self {
        if device.is_cpu() {
            TrainsOn::Cpu
        } else {
            TrainsOn::Gpu
        }
    }
}

/// Decides where the features of `n_train + n_test` images go.
///
/// `Ok(None)` when the cache is off. A budget that cannot hold one batch of
/// features (what a step holds in memory in any case) is an error.
/// Training on a GPU ([`TrainsOn::Gpu`]), `auto` keeps the features in GPU
/// memory; the budget is host memory's.
pub fn plan(
    choice: FeatureCacheArg,
    budget: u64,
    per_image: u64,
    n_images: usize,
    batch_size: usize,
    trains_on: TrainsOn,
) -> Result<Option<CachePlan>> {
    if choice == FeatureCacheArg::Off {
        return Ok(None);
    }
    let batch = per_image * batch_size as u64;
    if budget < batch {
        bail!(
            "--feature-cache-mb {} cannot hold one batch of features ({batch_size} images x {} = {}); \
             raise it, or pass --feature-cache off",
            budget >> 20,
            human_bytes(per_image),
            human_bytes(batch)
        );
    }
    let bytes = per_image * n_images as u64;
    let placement = match choice {
        FeatureCacheArg::Ram if bytes > budget => bail!(
            "--feature-cache ram: the features of {n_images} images need {}, more than the budget of {}; \
             raise --feature-cache-mb or use --feature-cache disk",
            human_bytes(bytes),
            human_bytes(budget)
        ),
        FeatureCacheArg::Ram => Placement::Ram,
        FeatureCacheArg::Disk => Placement::Disk,
        FeatureCacheArg::Auto if trains_on == TrainsOn::Gpu => Placement::Device,
        FeatureCacheArg::Auto if bytes <= budget => Placement::Ram,
        FeatureCacheArg::Auto => Placement::Disk,
        FeatureCacheArg::Off => unreachable!("handled above"),
    };
    Ok(Some(CachePlan {
        placement,
        bytes,
        budget,
    }))
}

/// `1.75 MiB`, `3.2 GiB`.
pub fn human_bytes(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.1} GiB", b / (1u64 << 30) as f64)
    } else if b >= (1u64 << 20) as f64 {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    } else {
        format!("{:.0} KiB", b / 1024.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn features(b: usize, seed: f32, nhwc: bool) -> Result<Vec<Tensor>> {
        let dev = Device::Cpu;
        let a = Tensor::arange(0f32, (b * 2 * 3 * 3) as f32, &dev)?.affine(1.0, f64::from(seed))?;
        let first = if nhwc {
            a.reshape((b, 3, 3, 2))?.permute((0, 3, 1, 2))?
        } else {
            a.reshape((b, 2, 3, 3))?
        };
        let second = Tensor::arange(0f32, (b * 4) as f32, &dev)?
            .affine(-1.0, f64::from(seed))?
            .reshape((b, 4, 1, 1))?;
        Ok(vec![first, second])
    }

    /// Stored batches come back bit for bit in any regrouping, with the
    /// backbone's strides, from memory and from disk.
    #[test]
    fn features_round_trip_in_any_batch_grouping() -> Result<()> {
        let dir = tempfile::tempdir()?;
        // Device placement on the CPU device exercises the same code a GPU runs.
        for placement in [Placement::Ram, Placement::Disk, Placement::Device] {
            for nhwc in [false, true] {
                let path = dir.path().join("cache.bin");
                let mut store = FeatureStore::new(4, &[[2, 3, 3], [4, 1, 1]], placement, &path)?;
                let a = features(2, 0.5, nhwc)?;
                let b = features(2, 100.0, nhwc)?;
                store.store(&[3, 0], &a, 1.0)?;
                assert!(store.has_all(&[0, 3]) && !store.has_all(&[0, 1]));
                store.store(&[1, 2], &b, 0.5)?;
                assert_eq!(store.backbone_seconds(), 1.5);
                let got = store.load(&[2, 3], &Device::Cpu)?;
                for s in 0..2 {
                    let want = Tensor::cat(&[b[s].narrow(0, 1, 1)?, a[s].narrow(0, 0, 1)?], 0)?;
                    assert_eq!(
                        got[s].flatten_all()?.to_vec1::<f32>()?,
                        want.flatten_all()?.to_vec1::<f32>()?
                    );
                    assert_eq!(got[s].dims(), a[s].dims());
                    if placement != Placement::Device {
                        // Host copies keep the backbone's strides; device
                        // features are concatenated (contiguous, same values).
                        assert_eq!(got[s].is_contiguous(), a[s].is_contiguous(), "strides");
                    }
                }
                assert_eq!(path.exists(), placement == Placement::Disk);
                drop(store);
                assert!(!path.exists(), "the cache file is removed with the store");
            }
        }
        Ok(())
    }

    #[test]
    fn plans_follow_the_choice_and_the_budget() -> Result<()> {
        let mib = 1u64 << 20;
        let auto = |budget| plan(FeatureCacheArg::Auto, budget, mib, 100, 8, TrainsOn::Cpu);
        assert_eq!(auto(200 * mib)?.map(|p| p.placement), Some(Placement::Ram));
        assert_eq!(auto(50 * mib)?.map(|p| p.placement), Some(Placement::Disk));
        assert_eq!(
            plan(FeatureCacheArg::Off, 0, mib, 100, 8, TrainsOn::Cpu)?,
            None
        );
        let err = plan(FeatureCacheArg::Auto, 4 * mib, mib, 100, 8, TrainsOn::Cpu).unwrap_err();
        assert!(
            err.to_string()
                .contains("cannot hold one batch of features (8 images x 1.0 MiB = 8.0 MiB)"),
            "{err}"
        );
        let err = plan(FeatureCacheArg::Ram, 50 * mib, mib, 100, 8, TrainsOn::Cpu).unwrap_err();
        assert!(err.to_string().contains("more than the budget"), "{err}");
        assert_eq!(
            plan(FeatureCacheArg::Disk, 500 * mib, mib, 100, 8, TrainsOn::Cpu)?
                .map(|p| p.placement),
            Some(Placement::Disk)
        );
        assert_eq!(
            plan(FeatureCacheArg::Auto, 50 * mib, mib, 100, 8, TrainsOn::Gpu)?.map(|p| p.placement),
            Some(Placement::Device)
        );
        Ok(())
    }
}
