//! Weight sources for the backbones (hub, local safetensors, seeded timm-style
//! random init, closed-form fixture weights) and key/shape-checked tensor access.
//!
//! Every source ends as a `VarBuilder` handing out plain `Tensor`s, never
//! `Var`s, so a backbone is frozen by construction.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use memmap2::{Mmap, UncheckedAdvice};
use safetensors::{tensor::Metadata, Dtype, SafeTensors};

use crate::det_init::{det_var_builder, ClosedForm};
use crate::error::{Error, Result};
use crate::kind::BackboneKind;
use crate::resnet::resnet_random_value;

/// Where the backbone's weights come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightSource {
    /// `model.safetensors` of a Hugging Face hub model repository (cache first).
    Hub { repo: String },
    /// A local safetensors file with timm key names, memory-mapped.
    File(PathBuf),
    /// timm's own initialisation scheme, drawn from a seeded generator.
    Random { seed: u64 },
    /// The closed-form fixture weights of [`crate::det_init`].
    Deterministic,
}

impl WeightSource {
    /// The pretrained weights of `kind` on the hub (see [`BackboneKind::hub_repo`]).
    pub fn hub(kind: BackboneKind) -> Self {
        WeightSource::Hub {
            repo: kind.hub_repo().to_string(),
        }
    }

    /// Parses the CLI's `--weights` value for backbone `kind`.
    ///
    /// - `hub`: the kind's pretrained hub repository; `hub:<owner/name>`: another repository;
    /// - `random`: seeded timm-style init with seed 0; `random:<seed>`: with that seed;
    /// - `deterministic`: the closed-form fixture weights;
    /// - anything ending in `.safetensors`: that local file.
    pub fn parse(value: &str, kind: BackboneKind) -> Result<Self> {
        let invalid = || Error::InvalidWeightSource {
            value: value.to_string(),
        };
        let v = value.trim();
        if v == "hub" {
            return Ok(Self::hub(kind));
        }
        if let Some(repo) = v.strip_prefix("hub:") {
            if repo.is_empty() || !repo.contains('/') {
                return Err(invalid());
            }
            return Ok(WeightSource::Hub {
                repo: repo.to_string(),
            });
        }
        if v == "random" {
            return Ok(WeightSource::Random { seed: 0 });
        }
        if let Some(seed) = v.strip_prefix("random:") {
            let seed = seed.parse::<u64>().map_err(|_| invalid())?;
            return Ok(WeightSource::Random { seed });
        }
        if v == "deterministic" {
            return Ok(WeightSource::Deterministic);
        }
        if Path::new(v)
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"))
        {
            return Ok(WeightSource::File(PathBuf::from(v)));
        }
        Err(invalid())
    }

    /// A short human-readable description, for logs and notices.
    pub fn describe(&self) -> String {
        match self {
            WeightSource::Hub { repo } => format!("hub repository {repo}"),
            WeightSource::File(p) => format!("file {}", p.display()),
            WeightSource::Random { seed } => format!("random timm-style init (seed {seed})"),
            WeightSource::Deterministic => "deterministic fixture weights".to_string(),
        }
    }
}

/// A `VarBuilder` (f32) that hands `kind`'s backbone its weights from `source`.
///
/// Hub and file weights are memory-mapped, and only the tensors the backbone
/// asks for are read; extra keys (layer4, fc, heads) are ignored. Missing keys and wrong shapes surface when the backbone
/// is built, as [`Error::MissingTensor`] / [`Error::ShapeMismatch`] through
/// [`get_checked`], and as equally clear messages through a plain `vb.get`.
pub fn backbone_var_builder(
    kind: BackboneKind,
    source: &WeightSource,
    device: &Device,
) -> Result<VarBuilder<'static>> {
    match source {
        WeightSource::Hub { repo } => {
            let path = crate::hub::resolve_hub_file(repo, crate::hub::WEIGHTS_FILE)?;
            safetensors_var_builder(&path, device)
        }
        WeightSource::File(path) => safetensors_var_builder(path, device),
        WeightSource::Random { seed } => {
            let seed = *seed;
            let values = move |name: &str, dims: &[usize]| {
                if kind.is_cnn() {
                    resnet_random_value(kind, name, dims, seed)
                } else {
                    crate::vit::random_init(name, dims, seed)
                }
            };
            Ok(VarBuilder::from_backend(
                Box::new(ClosedForm::new("the timm random init", values)),
                DType::F32,
                device.clone(),
            ))
        }
        WeightSource::Deterministic => Ok(det_var_builder(DType::F32, device)),
    }
}

/// A `VarBuilder` over the memory-mapped safetensors file at `path`, with
/// key- and shape-naming error messages.
///
/// The file is memory-mapped and only its header is parsed up front. Each
/// tensor the backbone asks for is read from its byte range of the map into
/// candle's own storage: that one copy is unavoidable, because candle's CPU
/// tensors must own their memory. Right after the copy the range's pages are
/// released from the process (`MADV_DONTNEED`), so the mapped file never stays
/// resident next to its copy: loading peaks at about one times the weights plus
/// one tensor instead of twice the weights (1.4 GB for CaiT-M48).
pub fn safetensors_var_builder(path: &Path, device: &Device) -> Result<VarBuilder<'static>> {
    let weights = MappedSafetensors::open(path)?;
    Ok(VarBuilder::from_backend(
        Box::new(weights),
        DType::F32,
        device.clone(),
    ))
}

/// A safetensors file mapped into memory with its parsed header: the
/// `SimpleBackend` behind [`safetensors_var_builder`], whose errors name the
/// file, the key and both shapes.
struct MappedSafetensors {
    mmap: Mmap,
    metadata: Metadata,
    /// Where the tensor data starts in the file (after the 8-byte length and
    /// the JSON header); the header's data offsets count from here.
    data_start: usize,
    path: PathBuf,
}

impl MappedSafetensors {
    /// Maps `path` and parses its safetensors header; any failure is
    /// [`Error::WeightsFile`] naming the path.
    fn open(path: &Path) -> Result<Self> {
        let weights_file = |source| Error::WeightsFile {
            path: path.to_path_buf(),
            source,
        };
        if !path.is_file() {
            return Err(weights_file(candle_core::Error::Msg(
                "no such file".to_string(),
            )));
        }
        let file = std::fs::File::open(path).map_err(|e| weights_file(e.into()))?;
        // SAFETY: the mapping stays valid only while no one truncates or
        // rewrites the file; weight files are read-only inputs (the hub cache
        // stores blobs by content hash and never rewrites them), which is the
        // contract every memory-mapped model loader relies on.
        #[allow(unsafe_code)]
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| weights_file(e.into()))?;
        let (header_len, metadata) =
            SafeTensors::read_metadata(&mmap).map_err(|e| weights_file(e.into()))?;
        // `read_metadata` checked that the header and every data range lie
        // inside the file, so these offsets cannot overflow or run past the map.
        let data_start = 8 + header_len;
        Ok(Self {
            mmap,
            metadata,
            data_start,
            path: path.to_path_buf(),
        })
    }

    /// An error message that names this file.
    fn error(&self, what: impl std::fmt::Display) -> candle_core::Error {
        candle_core::Error::Msg(format!("{what} (file '{}')", self.path.display()))
    }

    /// Copies tensor `name` out of the map as a `dtype` tensor on `dev`, then
    /// releases its pages; with `expected`, a different shape is an error.
    fn load(
        &self,
        name: &str,
        expected: Option<&Shape>,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let Some(info) = self.metadata.info(name) else {
            return Err(self.error(Error::MissingTensor {
                key: name.to_string(),
            }));
        };
        if let Some(expected) = expected {
            if info.shape.as_slice() != expected.dims() {
                return Err(self.error(Error::ShapeMismatch {
                    key: name.to_string(),
                    expected: expected.dims().to_vec(),
                    found: info.shape.clone(),
                }));
            }
        }
        let stored = match info.dtype {
            Dtype::U8 => DType::U8,
            Dtype::U32 => DType::U32,
            Dtype::I16 => DType::I16,
            Dtype::I32 => DType::I32,
            Dtype::I64 => DType::I64,
            Dtype::BF16 => DType::BF16,
            Dtype::F16 => DType::F16,
            Dtype::F32 => DType::F32,
            Dtype::F64 => DType::F64,
            other => {
                return Err(self.error(format!(
                    "tensor '{name}' is stored as {other:?}, which is not a number type the \
                     backbone can use (expected f32, f16, bf16, f64 or an integer type)"
                )))
            }
        };
        let (begin, end) = info.data_offsets;
        let (begin, end) = (self.data_start + begin, self.data_start + end);
        let tensor = Tensor::from_raw_buffer(&self.mmap[begin..end], stored, &info.shape, dev)?;
        if end > begin {
            // SAFETY: MADV_DONTNEED only drops this process's pages of the
            // range. The map is read-only and backed by the file (a shared
            // mapping), so a later access faults the same bytes back in from
            // the page cache or the file: nothing is zeroed or lost, even on
            // the boundary pages this range shares with its neighbours. No
            // slice into the map outlives this call (the tensor above owns a
            // copy), so no Rust reference observes the pages going away.
            #[allow(unsafe_code)]
            let released = unsafe {
                self.mmap
                    .unchecked_advise_range(UncheckedAdvice::DontNeed, begin, end - begin)
            };
            // Releasing is only a memory saving; a kernel that refuses the
            // advice leaves the pages mapped and the tensor correct.
            if let Err(e) = released {
                log::debug!("madvise(DONTNEED) on '{name}' failed: {e}");
            }
        }
        tensor.to_dtype(dtype)
    }
}

impl SimpleBackend for MappedSafetensors {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.load(name, Some(&s), dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, None, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.metadata.info(name).is_some()
    }
}

/// The full key of `name` under `vb`'s prefix.
pub fn full_key(vb: &VarBuilder, name: &str) -> String {
    let prefix = vb.prefix();
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// Gets tensor `name` of shape `shape` from `vb`, turning a missing key or a
/// wrong shape into [`Error::MissingTensor`] / [`Error::ShapeMismatch`] with
/// the full key and both shapes.
pub fn get_checked<S: Into<Shape>>(vb: &VarBuilder, shape: S, name: &str) -> Result<Tensor> {
    let shape: Shape = shape.into();
    let key = full_key(vb, name);
    if !vb.contains_tensor(name) {
        return Err(Error::MissingTensor { key });
    }
    match vb.get(shape.clone(), name) {
        Ok(t) if t.dims() == shape.dims() => Ok(t),
        Ok(t) => Err(Error::ShapeMismatch {
            key,
            expected: shape.dims().to_vec(),
            found: t.dims().to_vec(),
        }),
        Err(e) => match vb.get_unchecked(name) {
            Ok(t) if t.dims() != shape.dims() => Err(Error::ShapeMismatch {
                key,
                expected: shape.dims().to_vec(),
                found: t.dims().to_vec(),
            }),
            _ => Err(Error::Candle(e)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_weight_sources() {
        let k = BackboneKind::ResNet18;
        assert_eq!(
            WeightSource::parse("hub", k).unwrap(),
            WeightSource::Hub {
                repo: "timm/resnet18.tv_in1k".into()
            }
        );
        assert_eq!(
            WeightSource::parse("hub:me/my-resnet", k).unwrap(),
            WeightSource::Hub {
                repo: "me/my-resnet".into()
            }
        );
        assert_eq!(
            WeightSource::parse("random", k).unwrap(),
            WeightSource::Random { seed: 0 }
        );
        assert_eq!(
            WeightSource::parse("random:42", k).unwrap(),
            WeightSource::Random { seed: 42 }
        );
        assert_eq!(
            WeightSource::parse("deterministic", k).unwrap(),
            WeightSource::Deterministic
        );
        assert_eq!(
            WeightSource::parse("w/model.safetensors", k).unwrap(),
            WeightSource::File("w/model.safetensors".into())
        );
        for bad in ["", "random:x", "hub:", "weights.bin", "cuda"] {
            assert!(
                matches!(
                    WeightSource::parse(bad, k),
                    Err(Error::InvalidWeightSource { .. })
                ),
                "{bad:?} should be rejected"
            );
        }
    }
}
