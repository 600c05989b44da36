//! The FastFlow model config with the reference YAML keys and the four
//! presets of the paper.

use ff_backbone::BackboneKind;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One FastFlow model, described with the keys of the reference's YAML
/// configs (`configs/*.yaml` of gathierry/FastFlow).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FastFlowConfig {
    /// The timm name of the backbone (`resnet18`, `wide_resnet50_2`,
    /// `deit_base_distilled_patch16_384`, `cait_m48_448`).
    pub backbone_name: String,
    /// Side of the square input image in pixels.
    pub input_size: usize,
    /// Number of coupling steps in each scale's flow.
    pub flow_step: usize,
    /// Hidden channels of each subnet, as a fraction of its input channels.
    pub hidden_ratio: f64,
    /// Use 3x3 kernels in every step (otherwise odd steps use 1x1 kernels).
    pub conv3x3_only: bool,
}

impl FastFlowConfig {
    /// The reference `resnet18.yaml`.
    pub fn resnet18() -> Self {
        Self {
            backbone_name: "resnet18".into(),
            input_size: 256,
            flow_step: 8,
            hidden_ratio: 1.0,
            conv3x3_only: true,
        }
    }

    /// The reference `wide_resnet50_2.yaml`.
    pub fn wide_resnet50_2() -> Self {
        Self {
            backbone_name: "wide_resnet50_2".into(),
            input_size: 256,
            flow_step: 8,
            hidden_ratio: 1.0,
            conv3x3_only: false,
        }
    }

    /// The reference `deit.yaml`.
    pub fn deit() -> Self {
        Self {
            backbone_name: "deit_base_distilled_patch16_384".into(),
            input_size: 384,
            flow_step: 20,
            hidden_ratio: 0.16,
            conv3x3_only: false,
        }
    }

    /// The reference `cait.yaml`.
    pub fn cait() -> Self {
        Self {
            backbone_name: "cait_m48_448".into(),
            input_size: 448,
            flow_step: 20,
            hidden_ratio: 0.16,
            conv3x3_only: false,
        }
    }

    /// The backbone this config names.
    pub fn backbone_kind(&self) -> Result<BackboneKind> {
        BackboneKind::from_timm_name(&self.backbone_name).map_err(|_| Error::Config {
            field: "backbone_name",
            message: format!(
                "unknown backbone '{}' (expected one of: resnet18, wide_resnet50_2, \
                 deit_base_distilled_patch16_384, cait_m48_448)",
                self.backbone_name
            ),
        })
    }

    /// The `[c, h, w]` shape of each feature map this config produces, in
    /// stride order.
    pub fn feature_shapes(&self) -> Result<Vec<[usize; 3]>> {
        let kind = self.backbone_kind()?;
        Ok(kind
            .channels()
            .into_iter()
            .zip(kind.strides())
            .map(|(c, s)| [c, self.input_size / s, self.input_size / s])
            .collect())
    }

    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<()> {
        let kind = self.backbone_kind()?;
        if self.input_size == 0 || !self.input_size.is_multiple_of(16) {
            return Err(Error::Config {
                field: "input_size",
                message: format!(
                    "{} is not a positive multiple of 16 (the coarsest feature stride)",
                    self.input_size
                ),
            });
        }
        if !kind.is_cnn() && self.input_size != kind.default_input_size() {
            return Err(Error::Config {
                field: "input_size",
                message: format!(
                    "{} takes only {}-pixel inputs (fixed position embeddings), not {}",
                    kind,
                    kind.default_input_size(),
                    self.input_size
                ),
            });
        }
        if self.flow_step == 0 {
            return Err(Error::Config {
                field: "flow_step",
                message: "must be at least 1".into(),
            });
        }
        if !(self.hidden_ratio.is_finite() && self.hidden_ratio > 0.0) {
            return Err(Error::Config {
                field: "hidden_ratio",
                message: format!("{} is not a positive number", self.hidden_ratio),
            });
        }
        for c in kind.channels() {
            if hidden_channels(c, self.hidden_ratio) == 0 {
                return Err(Error::Config {
                    field: "hidden_ratio",
                    message: format!(
                        "{} gives subnets with 0 hidden channels for {c}-channel features",
                        self.hidden_ratio
                    ),
                });
            }
        }
        Ok(())
    }
}

/// The hidden channels of a subnet for a `channels`-channel feature map, as
/// the reference computes them: `int((C - C // 2) * hidden_ratio)`.
pub fn hidden_channels(channels: usize, hidden_ratio: f64) -> usize {
    let c_in = channels - channels / 2;
    // Python's int() truncates toward zero; the product is positive here.
    (c_in as f64 * hidden_ratio) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_valid_and_match_reference_table() {
        for (cfg, steps, ratio) in [
            (FastFlowConfig::resnet18(), 8, 1.0),
            (FastFlowConfig::wide_resnet50_2(), 8, 1.0),
            (FastFlowConfig::deit(), 20, 0.16),
            (FastFlowConfig::cait(), 20, 0.16),
        ] {
            cfg.validate().unwrap();
            assert_eq!(cfg.flow_step, steps);
            assert_eq!(cfg.hidden_ratio, ratio);
        }
        assert!(FastFlowConfig::resnet18().conv3x3_only);
        assert!(!FastFlowConfig::wide_resnet50_2().conv3x3_only);
    }

    #[test]
    fn invalid_fields_are_named() {
        let mut cfg = FastFlowConfig::resnet18();
        cfg.input_size = 100;
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("input_size"), "{e}");
        let mut cfg = FastFlowConfig::resnet18();
        cfg.backbone_name = "vgg16".into();
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("backbone_name") && e.contains("vgg16"), "{e}");
        let mut cfg = FastFlowConfig::resnet18();
        cfg.hidden_ratio = 0.001;
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("hidden_ratio"), "{e}");
        let mut cfg = FastFlowConfig::deit();
        cfg.input_size = 256;
        assert!(cfg.validate().is_err());
    }

    #[test]
    fn hidden_channels_truncate_like_python_int() {
        // DeiT: C = 768, C - C // 2 = 384, int(384 * 0.16) = int(61.44) = 61.
        assert_eq!(hidden_channels(768, 0.16), 61);
        assert_eq!(hidden_channels(64, 1.0), 32);
        assert_eq!(hidden_channels(7, 1.0), 4);
    }

    #[test]
    fn unknown_yaml_key_is_rejected() {
        let json = r#"{"backbone_name":"resnet18","input_size":256,"flow_step":8,
                      "hidden_ratio":1.0,"conv3x3_only":true,"lr":0.1}"#;
        let e = serde_json::from_str::<FastFlowConfig>(json).unwrap_err();
        assert!(e.to_string().contains("lr"), "{e}");
    }
}
