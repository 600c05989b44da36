//! The four backbones of the paper, by timm 0.5.4 name: what each outputs
//! (channels, strides), its reference input size and its hub repository.

use std::fmt;

use crate::error::{Error, Result};

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
