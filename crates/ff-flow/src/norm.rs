//! The trainable LayerNorm over `[C, H, W]` that the reference applies to each
//! CNN feature map: on the CPU in f32 one custom op on ff-kernels' NHWC layer
//! norm (forward and backward), elsewhere elementary candle ops; either way
//! autograd reaches its weight and bias (candle_nn's fused LayerNorm gives
//! them no gradient).

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use candle_nn::VarBuilder;
use ff_kernels::Route;
use rand_chacha::ChaCha8Rng;

use crate::cpu_op::{contiguous_f32, WeightCache};
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
    /// The weight and bias in channels-last order for the CPU kernel.
    affine_hwc: Arc<AffineCache>,
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
            affine_hwc: Arc::default(),
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
        if x.device().is_cpu() && x.dtype() == DType::F32 && Route::current() == Route::Kernels {
            // Channels-last inside: free for the backbone's channels-last
            // maps, and the flows take the output as it is.
            let xh = x.permute((0, 2, 3, 1))?.contiguous()?; // [b, H, W, C]
            let op = LayerNormOp {
                affine: Arc::clone(&self.affine_hwc),
            };
            let yh = xh.apply_op3(&self.weight.tensor, &self.bias.tensor, op)?;
            return Ok(yh.permute((0, 3, 1, 2))?);
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

/// The weight and bias `[C, H, W]` transposed to `[H, W, C]`, kept while
/// they are unchanged.
type AffineCache = WeightCache<AffineHwc>;

/// Weight and bias in `[H, W, C]` order.
type AffineHwc = (Vec<f32>, Vec<f32>);

/// `w` and `b`, each `[c, H W]`, transposed to `[H W, c]`.
fn affine_hwc(c: usize, w: &[f32], b: &[f32]) -> candle_core::Result<AffineHwc> {
    let hw = w.len() / c.max(1);
    let mut wt = vec![0f32; w.len()];
    let mut bt = vec![0f32; b.len()];
    ff_kernels::transpose(w, c, hw, &mut wt).map_err(candle_core::Error::wrap)?;
    ff_kernels::transpose(b, c, hw, &mut bt).map_err(candle_core::Error::wrap)?;
    Ok((wt, bt))
}

/// The layer norm of contiguous `[b, H, W, C]` maps with the `[C, H, W]`
/// weight and bias, on ff-kernels.
struct LayerNormOp {
    affine: Arc<AffineCache>,
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "ff-layer-norm-nhwc"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_l: &Layout,
        w: &CpuStorage,
        w_l: &Layout,
        b: &CpuStorage,
        b_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(x, x_l, self.name())?;
        let w = contiguous_f32(w, w_l, self.name())?;
        let b = contiguous_f32(b, b_l, self.name())?;
        let (n, c) = (x_l.dims()[0], x_l.dims()[3]);
        let affine = self.affine.get(w, b, || affine_hwc(c, w, b))?;
        let mut y = ff_kernels::zeroed(x.len());
        ff_kernels::layer_norm_forward(x, n, &affine.0, &affine.1, LAYER_NORM_EPS, &mut y)
            .map_err(candle_core::Error::wrap)?;
        Ok((CpuStorage::F32(y), x_l.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grads = x.detach().apply_op3_no_bwd(
            &w.detach(),
            &grad_res.detach().contiguous()?,
            &LayerNormBackward,
        )?;
        // [gx (x's size) | gw | gb], the last two as [C, H, W].
        let (nx, nw) = (x.elem_count(), w.elem_count());
        let gx = grads.narrow(0, 0, nx)?.reshape(x.shape())?;
        let gw = grads.narrow(0, nx, nw)?.reshape(w.shape())?;
        let gb = grads.narrow(0, nx + nw, nw)?.reshape(w.shape())?;
        Ok((Some(gx), Some(gw), Some(gb)))
    }
}

/// The backward of [`LayerNormOp`]: inputs `x` `[b, H, W, C]`, the weight
/// `[C, H, W]` and the output gradient; output the flat `[gx | gw | gb]`
/// (weight and bias gradients as `[C, H, W]`).
struct LayerNormBackward;

impl CustomOp3 for LayerNormBackward {
    fn name(&self) -> &'static str {
        "ff-layer-norm-nhwc-backward"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_l: &Layout,
        w: &CpuStorage,
        w_l: &Layout,
        g: &CpuStorage,
        g_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let wrap = candle_core::Error::wrap;
        let x = contiguous_f32(x, x_l, self.name())?;
        let w = contiguous_f32(w, w_l, self.name())?;
        let g = contiguous_f32(g, g_l, self.name())?;
        let (n, c) = (x_l.dims()[0], x_l.dims()[3]);
        let s = w.len();
        let hw = s / c.max(1);
        let mut w_hwc = vec![0f32; s];
        ff_kernels::transpose(w, c, hw, &mut w_hwc).map_err(wrap)?;
        let stats = ff_kernels::layer_norm_statistics(x, n, s, LAYER_NORM_EPS);
        let mut gw_hwc = vec![0f32; s];
        let mut gb_hwc = vec![0f32; s];
        let mut out = ff_kernels::zeroed(x.len() + 2 * s);
        let (gx, rest) = out.split_at_mut(x.len());
        ff_kernels::layer_norm_backward(x, n, &w_hwc, &stats, g, gx, &mut gw_hwc, &mut gb_hwc)
            .map_err(wrap)?;
        let (gw, gb) = rest.split_at_mut(s);
        ff_kernels::transpose(&gw_hwc, hw, c, gw).map_err(wrap)?;
        ff_kernels::transpose(&gb_hwc, hw, c, gb).map_err(wrap)?;
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
}
