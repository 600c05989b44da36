//! The trainable LayerNorm over `[C, H, W]` that the reference applies to each
//! CNN feature map, written from elementary ops so that autograd reaches its
//! weight and bias (candle_nn's fused LayerNorm gives them no gradient).

use candle_core::Tensor;
use candle_nn::VarBuilder;
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};
use crate::param::{trainable, Param, ParamInit};

/// PyTorch `nn.LayerNorm`'s default epsilon.
pub const LAYER_NORM_EPS: f64 = 1e-5;

/// `nn.LayerNorm([C, H, W], elementwise_affine=True)`.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    shape: [usize; 3],
    weight: Param,
    bias: Param,
}

impl LayerNorm {
    /// Builds the norm under `vb` (keys `weight`, `bias`, both `[C, H, W]`;
    /// new ones start at 1 and 0 as in PyTorch).
    pub fn new(shape: [usize; 3], vb: VarBuilder, rng: &mut ChaCha8Rng) -> Result<Self> {
        let weight = trainable(&vb, &shape, "weight", ParamInit::Const(1.0), rng)?;
        let bias = trainable(&vb, &shape, "bias", ParamInit::Const(0.0), rng)?;
        Ok(Self {
            shape,
            weight,
            bias,
        })
    }

    /// The trainable tensors with their state-dict keys.
    pub fn params(&self) -> Vec<&Param> {
        vec![&self.weight, &self.bias]
    }

    /// Normalises each image over all of its `C * H * W` values (biased
    /// variance), then applies the elementwise affine.
    ///
    /// # Shapes
    /// `x`: `[b, C, H, W]` -> `[b, C, H, W]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        if [c, h, w] != self.shape {
            return Err(Error::InputShape {
                what: "LayerNorm input",
                expected: format!(
                    "[b, {}, {}, {}]",
                    self.shape[0], self.shape[1], self.shape[2]
                ),
                found: format!("{:?}", x.dims()),
            });
        }
        // Flattening makes the reductions run over the trailing dimension,
        // which candle's CPU backend parallelises.
        let xf = x.reshape((b, c * h * w))?;
        let mean = xf.mean_keepdim(1)?; // [b, 1]
        let centred = xf.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(1)?; // [b, 1]
        let normed = centred.broadcast_div(&(var + LAYER_NORM_EPS)?.sqrt()?)?;
        Ok(normed
            .reshape((b, c, h, w))?
            .broadcast_mul(&self.weight.tensor)?
            .broadcast_add(&self.bias.tensor)?)
    }
}
