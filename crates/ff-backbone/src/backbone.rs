//! One frozen feature extractor type over the four backbones FastFlow uses.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

use crate::error::Result;
pub use crate::kind::BackboneKind;
use crate::resnet::ResNet;
use crate::vit::cait::Cait;
use crate::vit::deit::Deit;
use crate::weights::{backbone_var_builder, WeightSource};

/// A frozen feature extractor: its tensors are plain `Tensor`s from a
/// `VarBuilder`, never `Var`s, so no optimizer can reach them.
#[derive(Debug, Clone)]
pub enum Backbone {
    /// ResNet18 or WideResNet50-2.
    ResNet(ResNet),
    /// DeiT-base distilled, 384 px.
    Deit(Deit),
    /// CaiT-M48, 448 px.
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

/// Every tensor the backbone of `kind` reads from `source`, under its timm
/// key: what a weights file for it must hold. Saved as safetensors (e.g. with
/// `candle_core::safetensors::save`), it loads back through
/// [`WeightSource::File`]; this is how a seeded random init becomes a file
/// to share, or to test a file-based setup without the hub.
///
/// # Shapes
/// Each tensor has timm's shape for its key (BatchNorm statistics unfolded).
pub fn source_tensors(
    kind: BackboneKind,
    source: &WeightSource,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let keeping = Keeping {
        inner: backbone_var_builder(kind, source, device)?,
        kept: Arc::new(Mutex::new(HashMap::new())),
    };
    let kept = Arc::clone(&keeping.kept);
    let vb = VarBuilder::from_backend(Box::new(keeping), DType::F32, device.clone());
    drop(Backbone::new(kind, vb)?);
    let mut kept = kept.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    Ok(std::mem::take(&mut *kept))
}

/// A backend that hands out `inner`'s tensors and keeps each one it handed
/// out, by key.
struct Keeping {
    inner: VarBuilder<'static>,
    kept: Arc<Mutex<HashMap<String, Tensor>>>,
}

impl SimpleBackend for Keeping {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: Init,
        dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.inner.get_with_hints_dtype(s, name, h, dtype)?;
        self.kept
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(name.to_string(), t.clone());
        Ok(t)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.inner.get_unchecked_dtype(name, dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}
