//! The four backbones FastFlow uses, by timm name, and one frozen feature
//! extractor type over them.

use std::fmt;

use candle_core::{Device, Tensor};
use candle_nn::VarBuilder;

use crate::error::{Error, Result};
use crate::resnet::ResNet;
use crate::vit::cait::Cait;
use crate::vit::deit::Deit;
use crate::weights::{backbone_var_builder, WeightSource};

/// A backbone of the paper, named as timm 0.5.4 names it.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackboneKind {
    /// `resnet18`: features at strides 4/8/16 with 64/128/256 channels.
    ResNet18,
    /// `wide_resnet50_2`: features at strides 4/8/16 with 256/512/1024 channels.
    WideResNet50_2,
    /// `deit_base_distilled_patch16_384`: one 768-channel map at stride 16.
    DeitBaseDistilled384,
    /// `cait_m48_448`: one 768-channel map at stride 16.
    CaitM48_448,
}

impl BackboneKind {
    /// All four kinds, CNNs first.
    pub const ALL: [BackboneKind; 4] = [
        BackboneKind::ResNet18,
        BackboneKind::WideResNet50_2,
        BackboneKind::DeitBaseDistilled384,
        BackboneKind::CaitM48_448,
    ];

    /// The kind with timm model name `name` (the reference YAML's `backbone_name`).
    pub fn from_timm_name(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.timm_name() == name)
            .ok_or_else(|| Error::UnknownBackbone {
                name: name.to_string(),
            })
    }

    /// The timm model name.
    pub fn timm_name(&self) -> &'static str {
        match self {
            BackboneKind::ResNet18 => "resnet18",
            BackboneKind::WideResNet50_2 => "wide_resnet50_2",
            BackboneKind::DeitBaseDistilled384 => "deit_base_distilled_patch16_384",
            BackboneKind::CaitM48_448 => "cait_m48_448",
        }
    }

    /// The hub repository holding the pretrained weights timm 0.5.4 used.
    pub fn hub_repo(&self) -> &'static str {
        match self {
            BackboneKind::ResNet18 => "timm/resnet18.tv_in1k",
            BackboneKind::WideResNet50_2 => "timm/wide_resnet50_2.racm_in1k",
            BackboneKind::DeitBaseDistilled384 => "timm/deit_base_distilled_patch16_384.fb_in1k",
            BackboneKind::CaitM48_448 => "timm/cait_m48_448.fb_dist_in1k",
        }
    }

    /// Channels of each feature map, in stride order.
    pub fn channels(&self) -> Vec<usize> {
        match self {
            BackboneKind::ResNet18 => vec![64, 128, 256],
            BackboneKind::WideResNet50_2 => vec![256, 512, 1024],
            BackboneKind::DeitBaseDistilled384 | BackboneKind::CaitM48_448 => vec![768],
        }
    }

    /// Stride (input pixels per feature pixel) of each feature map.
    pub fn strides(&self) -> Vec<usize> {
        match self {
            BackboneKind::ResNet18 | BackboneKind::WideResNet50_2 => vec![4, 8, 16],
            BackboneKind::DeitBaseDistilled384 | BackboneKind::CaitM48_448 => vec![16],
        }
    }

    /// Whether this is a CNN (whose features get FastFlow's extra LayerNorm).
    pub fn is_cnn(&self) -> bool {
        matches!(self, BackboneKind::ResNet18 | BackboneKind::WideResNet50_2)
    }

    /// The input size of the reference config for this backbone; the
    /// transformers accept only this size (their position embeddings are fixed).
    pub fn default_input_size(&self) -> usize {
        match self {
            BackboneKind::ResNet18 | BackboneKind::WideResNet50_2 => 256,
            BackboneKind::DeitBaseDistilled384 => 384,
            BackboneKind::CaitM48_448 => 448,
        }
    }
}

impl fmt::Display for BackboneKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.timm_name())
    }
}

impl std::str::FromStr for BackboneKind {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Self::from_timm_name(s)
    }
}

/// A frozen feature extractor: its tensors are plain `Tensor`s from a
/// `VarBuilder`, never `Var`s, so no optimizer can reach them.
#[derive(Debug, Clone)]
pub enum Backbone {
    ResNet(ResNet),
    Deit(Deit),
    Cait(Cait),
}

impl Backbone {
    /// Builds the backbone of `kind` with the weights in `vb` (timm key names
    /// at the root of `vb`).
    pub fn new(kind: BackboneKind, vb: VarBuilder) -> Result<Self> {
        Ok(match kind {
            BackboneKind::ResNet18 => Backbone::ResNet(ResNet::resnet18(vb)?),
            BackboneKind::WideResNet50_2 => Backbone::ResNet(ResNet::wide_resnet50_2(vb)?),
            BackboneKind::DeitBaseDistilled384 => Backbone::Deit(Deit::new(vb)?),
            BackboneKind::CaitM48_448 => Backbone::Cait(Cait::new(vb)?),
        })
    }

    /// Builds the backbone of `kind` with f32 weights from `source` on `device`.
    pub fn load(kind: BackboneKind, source: &WeightSource, device: &Device) -> Result<Self> {
        let vb = backbone_var_builder(kind, source, device)?;
        Self::new(kind, vb)
    }

    /// Which backbone this is.
    pub fn kind(&self) -> BackboneKind {
        match self {
            Backbone::ResNet(r) => r.kind(),
            Backbone::Deit(_) => BackboneKind::DeitBaseDistilled384,
            Backbone::Cait(_) => BackboneKind::CaitM48_448,
        }
    }

    /// The feature maps of a normalized RGB batch, in stride order.
    ///
    /// # Shapes
    /// `x`: `[b, 3, h, w]` -> one `[b, c_i, h / s_i, w / s_i]` per scale, with
    /// `c_i` = [`BackboneKind::channels`] and `s_i` = [`BackboneKind::strides`].
    pub fn features(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        match self {
            Backbone::ResNet(r) => Ok(r.features(x)?.into_scales()),
            Backbone::Deit(d) => Ok(vec![d.features(x)?]),
            Backbone::Cait(c) => Ok(vec![c.features(x)?]),
        }
    }
}
