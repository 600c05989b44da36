//! Weight sources for the backbones (hub, local safetensors, seeded timm-style
//! random init, closed-form fixture weights).
//!
//! Every source ends as a `VarBuilder` handing out plain `Tensor`s, never
//! `Var`s, so a backbone is frozen by construction.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use crate::closed_form::ClosedForm;
use crate::error::{Error, Result};
use crate::kind::BackboneKind;
use crate::resnet::resnet_random_value;
pub use crate::weights_mmap::safetensors_var_builder;

/// Where the backbone's weights come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightSource {
    /// `model.safetensors` of a Hugging Face hub model repository (cache first).
    Hub {
        /// The repository (`owner/name`).
        repo: String,
    },
    /// A local safetensors file with timm key names, memory-mapped.
    File(PathBuf),
    /// timm's own initialisation scheme, drawn from a seeded generator.
    Random {
        /// The generator's seed.
        seed: u64,
    },
    /// The closed-form fixture weights of `det_init` (`test-support` feature).
    #[cfg(feature = "test-support")]
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
    /// - `deterministic`: the closed-form fixture weights (`test-support` feature only);
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
        #[cfg(feature = "test-support")]
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
            #[cfg(feature = "test-support")]
            WeightSource::Deterministic => "deterministic fixture weights".to_string(),
        }
    }

    /// The source in `--weights` syntax: [`WeightSource::parse`] of it gives
    /// the source back (`random` with its seed spelled out).
    pub fn to_arg(&self) -> String {
        match self {
            WeightSource::Hub { repo } => format!("hub:{repo}"),
            WeightSource::File(p) => p.display().to_string(),
            WeightSource::Random { seed } => format!("random:{seed}"),
            #[cfg(feature = "test-support")]
            WeightSource::Deterministic => "deterministic".to_string(),
        }
    }
}

/// A `VarBuilder` (f32) that hands `kind`'s backbone its weights from `source`.
///
/// Hub and file weights are memory-mapped, and only the tensors the backbone
/// asks for are read; extra keys (layer4, fc, heads) are ignored. Missing keys and wrong shapes surface when the backbone
/// is built, as [`Error::MissingTensor`] / [`Error::ShapeMismatch`] through
/// [`crate::get_checked`], and as equally clear messages through a plain `vb.get`.
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
        #[cfg(feature = "test-support")]
        WeightSource::Deterministic => Ok(crate::det_init::det_var_builder(DType::F32, device)),
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
        for source in [
            WeightSource::hub(k),
            WeightSource::Random { seed: 7 },
            WeightSource::File("w/model.safetensors".into()),
            WeightSource::Deterministic,
        ] {
            assert_eq!(WeightSource::parse(&source.to_arg(), k).unwrap(), source);
        }
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
