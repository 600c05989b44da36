//! Parallel batch loading: rayon decode + resize + normalise, a prefetching thread, seeded shuffling, a cache.

use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::augment::{self, AugmentConfig};
use crate::dataset::{Label, Sample};
use crate::error::Error;
use crate::preprocess::{decode_gray, decode_rgb, Preprocess};

/// A batch ready for the model.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Normalised images, `[n, 3, size, size]` row-major.
    pub images: Vec<f32>,
    /// Images in the batch.
    pub n: usize,
    /// Side of every image.
    pub size: usize,
    /// Ground truth, `[n, size, size]` (all false for normal samples); only
    /// with [`LoaderConfig::with_masks`].
    pub masks: Option<Vec<bool>>,
    /// Label of each image.
    pub labels: Vec<Label>,
    /// Source file of each image.
    pub paths: Vec<PathBuf>,
}

/// How a [`Loader`] batches samples.
#[derive(Debug, Clone, PartialEq)]
pub struct LoaderConfig {
    /// Images per batch (the last one may be smaller unless `drop_last`).
    pub batch_size: usize,
    /// Shuffle each epoch with this seed (order depends on (seed, epoch));
    /// `None` keeps the dataset order.
    pub shuffle_seed: Option<u64>,
    /// Keep resized images in memory after the first epoch (uint8, about
    /// `3 * size^2` bytes per image), so later epochs skip decoding.
    pub cache: bool,
    /// Drop a last, incomplete batch.
    pub drop_last: bool,
    /// Training augmentations; `None` (the reference) for none.
    pub augment: Option<AugmentConfig>,
    /// Load ground-truth masks (every anomalous sample must have one).
    pub with_masks: bool,
}

impl LoaderConfig {
    /// Dataset order, no cache, no augmentation, no masks, keep the last batch.
    pub fn new(batch_size: usize) -> Self {
        Self {
            batch_size,
            shuffle_seed: None,
            cache: false,
            drop_last: false,
            augment: None,
            with_masks: false,
        }
    }
}

/// A resized (not yet normalised) sample, as kept in the cache.
#[derive(Debug)]
struct Prepared {
    /// `[size, size, 3]` interleaved uint8.
    rgb: Vec<u8>,
    /// `[size, size]`; `None` for normal samples or without masks.
    mask: Option<Vec<bool>>,
}

struct Shared {
    samples: Vec<Sample>,
    preprocess: Preprocess,
    cfg: LoaderConfig,
    cache: Vec<OnceLock<Arc<Prepared>>>,
}

/// Turns a list of samples into batches, epoch after epoch.
///
/// Decoding, resizing and normalising run on rayon's pool; a background
/// thread prepares the next batch while the caller computes on the current
/// one. Cheap to clone (shared state behind an `Arc`).
#[derive(Clone)]
pub struct Loader {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Loader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loader")
            .field("samples", &self.shared.samples.len())
            .field("preprocess", &self.shared.preprocess)
            .field("cfg", &self.shared.cfg)
            .finish()
    }
}

use crate::hash::splitmix64 as mix;

impl Loader {
    /// A loader over `samples`. A zero batch size or input size is reported
    /// as an error by the first [`Loader::epoch`] item.
    pub fn new(samples: Vec<Sample>, preprocess: Preprocess, cfg: LoaderConfig) -> Self {
        let cache = (0..samples.len()).map(|_| OnceLock::new()).collect();
        Self {
            shared: Arc::new(Shared {
                samples,
                preprocess,
                cfg,
                cache,
            }),
        }
    }

    /// The samples, in dataset order.
    pub fn samples(&self) -> &[Sample] {
        &self.shared.samples
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.shared.samples.len()
    }

    /// True when there are no samples.
    pub fn is_empty(&self) -> bool {
        self.shared.samples.is_empty()
    }

    /// Batches per epoch.
    pub fn num_batches(&self) -> usize {
        let (n, b) = (self.len(), self.shared.cfg.batch_size.max(1));
        if self.shared.cfg.drop_last {
            n / b
        } else {
            n.div_ceil(b)
        }
    }

    /// The sample order of an epoch: dataset order, or a shuffle that depends
    /// only on (seed, epoch).
    pub fn epoch_order(&self, epoch: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.len()).collect();
        if let Some(seed) = self.shared.cfg.shuffle_seed {
            let mut rng = ChaCha8Rng::seed_from_u64(mix(seed ^ mix(epoch as u64)));
            order.shuffle(&mut rng);
        }
        order
    }

    /// The sample indices of each batch of an epoch, in the order
    /// [`Loader::epoch`] yields them (the last short batch left out under
    /// `drop_last`). Lets a caller that keeps per-sample results (a feature
    /// cache) follow the same batches without loading the images.
    pub fn batch_indices(&self, epoch: usize) -> Vec<Vec<usize>> {
        let b = self.shared.cfg.batch_size.max(1);
        self.epoch_order(epoch)
            .chunks(b)
            .filter(|chunk| !(self.shared.cfg.drop_last && chunk.len() < b))
            .map(<[usize]>::to_vec)
            .collect()
    }

    /// Whether batches are augmented (then a sample differs between epochs).
    pub fn augments(&self) -> bool {
        self.shared.cfg.augment.is_some()
    }

    /// The samples `indices` as one batch, exactly as [`Loader::epoch`] would
    /// yield them in `epoch` (same preprocessing and, when on, the same
    /// augmentation draw), loaded in parallel on the caller's thread. Lets a
    /// feature cache load only the images whose features it lacks.
    pub fn load(&self, indices: &[usize], epoch: usize) -> Result<Batch, Error> {
        self.shared.preprocess.check()?;
        self.shared.batch(indices, epoch)
    }

    /// The batches of one epoch. The first error ends the epoch after it is
    /// yielded. Dropping the iterator stops the background thread.
    pub fn epoch(&self, epoch: usize) -> EpochIter {
        let shared = Arc::clone(&self.shared);
        let (tx, rx) = sync_channel::<Result<Batch, Error>>(1);
        let invalid = if shared.cfg.batch_size == 0 {
            Some(Error::Config("batch_size must be at least 1".into()))
        } else {
            shared.preprocess.check().err()
        };
        if let Some(err) = invalid {
            // Reported in-band so `new` stays infallible.
            let _ = tx.send(Err(err));
            return EpochIter {
                rx: Some(rx),
                worker: None,
            };
        }
        let batches = self.batch_indices(epoch);
        let worker = std::thread::spawn(move || {
            for chunk in &batches {
                let batch = shared.batch(chunk, epoch);
                let failed = batch.is_err();
                // A closed channel means the consumer dropped the iterator.
                if tx.send(batch).is_err() || failed {
                    return;
                }
            }
        });
        EpochIter {
            rx: Some(rx),
            worker: Some(worker),
        }
    }
}

impl Shared {
    /// Decodes and resizes sample `i`, or takes it from the cache.
    fn prepared(&self, i: usize) -> Result<Arc<Prepared>, Error> {
        if let Some(p) = self.cache[i].get() {
            return Ok(Arc::clone(p));
        }
        let sample = &self.samples[i];
        let img = decode_rgb(&sample.path)?;
        let mask = if self.cfg.with_masks && sample.label == Label::Anomalous {
            let Some(mask_path) = &sample.mask else {
                return Err(Error::NoMaskRecorded {
                    image: sample.path.clone(),
                });
            };
            let mask = decode_gray(mask_path)?;
            if mask.dimensions() != img.dimensions() {
                return Err(Error::MaskSizeMismatch {
                    mask: mask_path.clone(),
                    image: sample.path.clone(),
                    mask_width: mask.width(),
                    mask_height: mask.height(),
                    image_width: img.width(),
                    image_height: img.height(),
                });
            }
            Some(self.preprocess.resize_mask(&mask))
        } else {
            None
        };
        let prepared = Arc::new(Prepared {
            rgb: self.preprocess.resize_rgb(&img).into_raw(),
            mask,
        });
        if self.cfg.cache {
            // Another thread may have filled the slot meanwhile; both values are equal.
            let _ = self.cache[i].set(Arc::clone(&prepared));
        }
        Ok(prepared)
    }

    /// One sample, augmented and normalised: `[3, s, s]` and `[s, s]` mask.
    fn item(&self, i: usize, epoch: usize) -> Result<(Vec<f32>, Option<Vec<bool>>), Error> {
        let s = self.preprocess.input_size;
        let p = self.prepared(i)?;
        let (rgb, mask) = match &self.cfg.augment {
            Some(aug) => {
                let seed = mix(aug.seed ^ mix(epoch as u64 ^ mix(i as u64)));
                let draw = aug.draw(&mut ChaCha8Rng::seed_from_u64(seed));
                let (rgb, mask) = augment::apply(&draw, &p.rgb, p.mask.as_deref(), s);
                (std::borrow::Cow::Owned(rgb), mask)
            }
            None => (std::borrow::Cow::Borrowed(&p.rgb), p.mask.clone()),
        };
        let mut out = vec![0f32; 3 * s * s];
        self.preprocess.normalize_into(&rgb, &mut out);
        Ok((out, mask))
    }

    fn batch(&self, indices: &[usize], epoch: usize) -> Result<Batch, Error> {
        let s = self.preprocess.input_size;
        let items: Vec<_> = indices
            .par_iter()
            .map(|&i| self.item(i, epoch))
            .collect::<Result<_, _>>()?;
        let n = items.len();
        let mut images = Vec::with_capacity(n * 3 * s * s);
        let mut masks = self.cfg.with_masks.then(|| Vec::with_capacity(n * s * s));
        for (img, mask) in items {
            images.extend_from_slice(&img);
            if let Some(m) = masks.as_mut() {
                match mask {
                    Some(mask) => m.extend_from_slice(&mask),
                    None => m.resize(m.len() + s * s, false),
                }
            }
        }
        Ok(Batch {
            images,
            n,
            size: s,
            masks,
            labels: indices.iter().map(|&i| self.samples[i].label).collect(),
            paths: indices
                .iter()
                .map(|&i| self.samples[i].path.clone())
                .collect(),
        })
    }
}

/// The batches of one epoch, prepared one ahead by a background thread.
pub struct EpochIter {
    rx: Option<Receiver<Result<Batch, Error>>>,
    worker: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for EpochIter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EpochIter").finish_non_exhaustive()
    }
}

impl Iterator for EpochIter {
    type Item = Result<Batch, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        self.rx.as_ref()?.recv().ok()
    }
}

impl Drop for EpochIter {
    fn drop(&mut self) {
        // Closing the channel first makes a blocked worker's `send` fail, so
        // the join below waits at most for the batch in progress.
        self.rx = None;
        if let Some(w) = self.worker.take() {
            if w.join().is_err() {
                log::error!("ff-data loader thread panicked");
            }
        }
    }
}
