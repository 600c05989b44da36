//! The flow subnets' "same"-padded, stride-1 convolutions on channels-last
//! (`[b, h, w, C]`) feature maps.
//!
//! On the CPU in f32 each convolution is one custom op on ff-kernels
//! (inputs: the map, the `[O, C, k, k]` weight, the bias): the forward is the
//! packed convolution (Winograd for 3x3), the input gradient is the same
//! kernel on flipped, transposed weights (no col2im), and the weight gradient
//! is accumulated per thread over L2-sized column tiles; no im2col matrix of
//! the whole batch ever exists. Each convolution keeps its packed weights in
//! a `PackCache` keyed by a fingerprint of the weights, so inference packs
//! once and training once per step. Other devices and dtypes, and
//! `FASTFLOW_KERNELS=generic`, take an im2col route built from candle's
//! differentiable ops.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use ff_kernels::{Activation, ConvGeometry, Epilogue, NhwcMut, NhwcRef, PackedConv2d, Route};

use crate::cpu_op::{contiguous_f32, f32_data, WeightCache};
use crate::error::{Error, Result};
use crate::fused::row_view;

/// One convolution's weights as last packed for ff-kernels.
pub(crate) type PackCache = WeightCache<PackedConv2d>;

/// A "same"-padded, stride-1 convolution with bias on a channels-last map,
/// numerically the reference's `nn.Conv2d(C, O, k, padding=k // 2)`, of the
/// input itself ([`Activation::Identity`]) or of its ReLU, folded into the
/// kernel's gather (and the ReLU's gradient mask into the input gradient).
///
/// # Shapes
/// `x`: `[b, h, w, C']` with `C' >= C` (any layout; only the first `C`
/// channels are read, so a step can pass its whole input for the first
/// half), `weight`: `[O, C, k, k]` (PyTorch's), `bias`: `[O]` -> `[b, h, w, O]`
/// (contiguous).
pub(crate) fn conv2d_same_nhwc(
    x: &Tensor,
    input: Activation,
    weight: &Tensor,
    bias: &Tensor,
    cache: &Arc<PackCache>,
) -> Result<Tensor> {
    let relu = input == Activation::Relu;
    let (b, h, w, x_c) = x.dims4()?;
    let (o, c, k, k2) = weight.dims4()?;
    if x_c < c || k != k2 || k % 2 == 0 || bias.dims() != [o] {
        return Err(Error::InputShape {
            what: "same convolution (input [b, h, w, C], weight [O, C, k, k] with odd k, bias [O])",
            expected: format!("weight [{o}, {c}, k, k], bias [{o}]"),
            found: format!(
                "input {:?}, weight {:?}, bias {:?}",
                x.dims(),
                weight.dims(),
                bias.dims()
            ),
        });
    }
    if x.device().is_cpu() && x.dtype() == DType::F32 && Route::current() == Route::Kernels {
        // One op, so that autograd sees the convolution whole.
        let x = if row_view(x.layout()).is_some() {
            x.clone()
        } else {
            x.contiguous()?
        };
        let op = ConvSame {
            spec: ConvSpec { k, c, o, relu },
            cache: Arc::clone(cache),
        };
        return Ok(x.apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)?);
    }
    if x.device().is_cuda() {
        // candle's convolution: cuDNN in builds with the `cudnn` feature.
        let x1 = x.narrow(3, 0, c)?;
        let x1 = if relu { x1.relu()? } else { x1 };
        let y = x1
            .permute((0, 3, 1, 2))?
            .contiguous()?
            .conv2d(weight, k / 2, 1, 1, 1)?
            .broadcast_add(&bias.reshape((1, o, 1, 1))?)?;
        return Ok(y.permute((0, 2, 3, 1))?.contiguous()?);
    }
    // Row (ky k + kx) C + c of the matrix holds weight[:, c, ky, kx], the
    // order in which im2col lays out each pixel's neighbourhood.
    let wmat = weight.permute((2, 3, 1, 0))?.reshape((k * k * c, o))?; // [k k C, O]
    let wmat = Tensor::cat(&[&wmat, &bias.reshape((1, o))?], 0)?; // [k k C + 1, O]
    let x1 = x.narrow(3, 0, c)?;
    let x1 = if relu { x1.relu()? } else { x1 };
    let cols = im2col_generic(&x1, k)?; // [b h w, k k C + 1]
    Ok(cols.matmul(&wmat)?.reshape((b, h, w, o))?)
}

/// Each pixel's zero-padded `k x k` neighbourhood as one row, in the order
/// (ky, kx, c), followed by a constant 1 for the bias; candle's own
/// differentiable ops, for the generic route.
///
/// # Shapes
/// `x`: `[b, h, w, C]` -> `[b h w, k k C + 1]`.
fn im2col_generic(x: &Tensor, k: usize) -> Result<Tensor> {
    let (b, h, w, c) = x.dims4()?;
    let p = k / 2;
    let padded = x.pad_with_zeros(1, p, p)?.pad_with_zeros(2, p, p)?;
    let mut parts = Vec::with_capacity(k * k + 1);
    for ky in 0..k {
        for kx in 0..k {
            parts.push(padded.narrow(1, ky, h)?.narrow(2, kx, w)?);
        }
    }
    parts.push(Tensor::ones((b, h, w, 1), x.dtype(), x.device())?);
    Ok(Tensor::cat(&parts, 3)?.reshape((b * h * w, k * k * c + 1))?)
}

/// A channels-last map's first `c` channels as a kernel view.
fn nhwc_view<'a>(
    data: &'a [f32],
    layout: &Layout,
    c: usize,
    what: &str,
) -> candle_core::Result<NhwcRef<'a>> {
    let (b, h, w, x_c) = layout.shape().dims4()?;
    let Some((offset, ps)) = row_view(layout) else {
        candle_core::bail!("{what}: the map's pixels must be evenly spaced, found {layout:?}")
    };
    if x_c < c {
        candle_core::bail!("{what}: {x_c} channels, at least {c} needed")
    }
    NhwcRef::strided(&data[offset..], [b, h, w, c], ps).map_err(candle_core::Error::wrap)
}

fn geometry(k: usize, c: usize, o: usize) -> ConvGeometry {
    ConvGeometry {
        in_channels: c,
        out_channels: o,
        kernel: k,
        stride: 1,
        padding: k / 2,
    }
}

/// One subnet convolution as the kernels see it: `k x k`, "same" padding,
/// the first `c` input channels read (through a ReLU when `relu`), `o`
/// outputs. Its forward, input gradient and weight gradient on host slices
/// serve the per-convolution candle ops below and the whole-flow training op
/// (`crate::flow_op`) alike.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConvSpec {
    pub k: usize,
    pub c: usize,
    pub o: usize,
    /// Whether the ReLU is applied to the input as it is read.
    pub relu: bool,
}

impl ConvSpec {
    fn geometry(&self) -> ConvGeometry {
        geometry(self.k, self.c, self.o)
    }

    fn input_activation(&self) -> Activation {
        if self.relu {
            Activation::Relu
        } else {
            Activation::Identity
        }
    }

    /// `out = conv(act(input)) + bias`, the weights packed through `cache`.
    ///
    /// # Shapes
    /// `input`: `[b, h, w, c]` (a view), `weight`: `[o, c, k, k]`, `bias`:
    /// `[o]` -> `out`: `[b, h, w, o]`.
    pub(crate) fn forward(
        &self,
        cache: &PackCache,
        input: NhwcRef,
        weight: &[f32],
        bias: &[f32],
        out: NhwcMut,
    ) -> candle_core::Result<()> {
        let g = self.geometry();
        let packed = cache.get(weight, bias, || {
            PackedConv2d::from_oihw(g, None, weight, Some(bias)).map_err(candle_core::Error::wrap)
        })?;
        ff_kernels::conv2d(
            &packed,
            input,
            self.input_activation(),
            Epilogue::default(),
            out,
        )
        .map_err(candle_core::Error::wrap)
    }

    /// The input gradient: the forward kernel on the flipped, transposed
    /// weights, masked where the ReLU clipped `input` (the forward's input,
    /// read only when `relu`).
    ///
    /// # Shapes
    /// `grad`: `[b, h, w, o]`, `weight`: `[o, c, k, k]`, `input`:
    /// `[b, h, w, c]` -> `out`: `[b, h, w, c]` (every value written).
    pub(crate) fn input_grad(
        &self,
        grad: NhwcRef,
        weight: &[f32],
        input: NhwcRef,
        mut out: NhwcMut,
    ) -> candle_core::Result<()> {
        let packed = PackedConv2d::input_gradient_from_oihw(self.geometry(), None, weight)
            .map_err(candle_core::Error::wrap)?;
        ff_kernels::conv2d(
            &packed,
            grad,
            Activation::Identity,
            Epilogue::default(),
            out.reborrow(),
        )
        .map_err(candle_core::Error::wrap)?;
        if self.relu {
            ff_kernels::relu_backward(input, out).map_err(candle_core::Error::wrap)?;
        }
        Ok(())
    }

    /// The weight and bias gradients, flat `[o c k k | o]` (the weight in
    /// PyTorch's layout, then the bias).
    ///
    /// # Shapes
    /// `input`: `[b, h, w, c]` (the forward's input), `grad`: `[b, h, w, o]`.
    pub(crate) fn weight_grad(
        &self,
        input: NhwcRef,
        grad: NhwcRef,
    ) -> candle_core::Result<Vec<f32>> {
        let (k, c, o) = (self.k, self.c, self.o);
        let mut rows = vec![0f32; (k * k * c + 1) * o];
        ff_kernels::conv2d_weight_grad(
            self.geometry(),
            input,
            self.input_activation(),
            grad,
            &mut rows,
        )
        .map_err(candle_core::Error::wrap)?;
        // Rows (ky k + kx) C + c by columns o -> [o][c][ky][kx], bias last.
        let mut out = vec![0f32; o * c * k * k + o];
        for (oo, dst) in out[..o * c * k * k].chunks_exact_mut(c * k * k).enumerate() {
            for ci in 0..c {
                for t in 0..k * k {
                    dst[ci * k * k + t] = rows[(t * c + ci) * o + oo];
                }
            }
        }
        out[o * c * k * k..].copy_from_slice(&rows[k * k * c * o..]);
        Ok(out)
    }
}

/// The whole convolution on ff-kernels; inputs `x` `[b, h, w, C']` (the
/// first `c` channels read), the weight `[o, c, k, k]` and the bias `[o]`.
struct ConvSame {
    spec: ConvSpec,
    cache: Arc<PackCache>,
}

impl CustomOp3 for ConvSame {
    fn name(&self) -> &'static str {
        "ff-conv-same-nhwc"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_l: &Layout,
        weight: &CpuStorage,
        weight_l: &Layout,
        bias: &CpuStorage,
        bias_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, h, w, _) = x_l.shape().dims4()?;
        let o = self.spec.o;
        let input = nhwc_view(f32_data(x, self.name())?, x_l, self.spec.c, self.name())?;
        let weight = contiguous_f32(weight, weight_l, self.name())?;
        let bias = contiguous_f32(bias, bias_l, self.name())?;
        let mut out = ff_kernels::zeroed(b * h * w * o);
        let view = NhwcMut::new(&mut out, [b, h, w, o]).map_err(candle_core::Error::wrap)?;
        self.spec.forward(&self.cache, input, weight, bias, view)?;
        Ok((CpuStorage::F32(out), Shape::from((b, h, w, o))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Nothing here needs a graph of its own.
        let (x, weight) = (x.detach(), weight.detach());
        let grad = grad_res.detach().contiguous()?;
        let grad_x = grad.apply_op3_no_bwd(&weight, &x, &ConvInputGrad(self.spec))?;
        let grads = x.apply_op2_no_bwd(&grad, &ConvWeightGrad(self.spec))?;
        let ConvSpec { k, c, o, .. } = self.spec;
        let n_w = o * c * k * k;
        let grad_w = grads.narrow(0, 0, n_w)?.reshape((o, c, k, k))?;
        let grad_b = grads.narrow(0, n_w, o)?;
        Ok((Some(grad_x), Some(grad_w), Some(grad_b)))
    }
}

/// The input gradient of [`ConvSame`] ([`ConvSpec::input_grad`]). Inputs:
/// the output gradient `[b, h, w, o]`, the weight `[o, c, k, k]`, the
/// forward input `x` `[b, h, w, C']`; output `[b, h, w, C']` (0 past the
/// first `c` channels, which the forward did not read).
struct ConvInputGrad(ConvSpec);

impl CustomOp3 for ConvInputGrad {
    fn name(&self) -> &'static str {
        "ff-conv-same-nhwc-input-grad"
    }

    fn cpu_fwd(
        &self,
        grad: &CpuStorage,
        grad_l: &Layout,
        weight: &CpuStorage,
        weight_l: &Layout,
        x: &CpuStorage,
        x_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let spec = self.0;
        let (b, h, w, x_c) = x_l.shape().dims4()?;
        let gy = nhwc_view(f32_data(grad, self.name())?, grad_l, spec.o, self.name())?;
        let weight = contiguous_f32(weight, weight_l, self.name())?;
        let xv = nhwc_view(f32_data(x, self.name())?, x_l, spec.c, self.name())?;
        let mut out = ff_kernels::zeroed(b * h * w * x_c);
        let view =
            NhwcMut::strided(&mut out, [b, h, w, spec.c], x_c).map_err(candle_core::Error::wrap)?;
        spec.input_grad(gy, weight, xv, view)?;
        Ok((CpuStorage::F32(out), Shape::from((b, h, w, x_c))))
    }
}

/// The weight and bias gradients of [`ConvSame`] ([`ConvSpec::weight_grad`]):
/// inputs `x` `[b, h, w, C']` and the output gradient `[b, h, w, o]`; output
/// the flat `[o c k k | o]`.
struct ConvWeightGrad(ConvSpec);

impl CustomOp2 for ConvWeightGrad {
    fn name(&self) -> &'static str {
        "ff-conv-same-nhwc-weight-grad"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_l: &Layout,
        grad: &CpuStorage,
        grad_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let spec = self.0;
        let input = nhwc_view(f32_data(x, self.name())?, x_l, spec.c, self.name())?;
        let gy = nhwc_view(f32_data(grad, self.name())?, grad_l, spec.o, self.name())?;
        let out = spec.weight_grad(input, gy)?;
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn nchw_to_nhwc(t: &Tensor) -> Tensor {
        t.permute((0, 2, 3, 1)).unwrap().contiguous().unwrap()
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// The packed weights are reused while the weights stay the same and
    /// repacked as soon as either the weight or the bias changes.
    #[test]
    fn pack_cache_follows_weight_changes() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (1, 5, 6, 8), &dev).unwrap();
        let weight =
            Var::from_tensor(&Tensor::randn(0f32, 1.0, (16, 8, 3, 3), &dev).unwrap()).unwrap();
        let bias = Var::from_tensor(&Tensor::zeros(16, DType::F32, &dev).unwrap()).unwrap();
        let cache = Arc::new(PackCache::default());
        let conv = |w: &Tensor, b: &Tensor| {
            conv2d_same_nhwc(&x, Activation::Identity, w, b, &cache).unwrap()
        };
        let first = conv(&weight, &bias);
        assert_eq!(max_abs_diff(&first, &conv(&weight, &bias)), 0.0);
        let packed = cache.cached().unwrap();
        conv(&weight, &bias);
        let again = cache.cached().unwrap();
        assert!(
            Arc::ptr_eq(&packed, &again),
            "unchanged weights were repacked"
        );

        weight.set(&(weight.as_tensor() * 2.0).unwrap()).unwrap();
        let doubled = conv(&weight, &bias);
        assert!(max_abs_diff(&doubled, &(&first * 2.0).unwrap()) < 1e-4);
        bias.set(&Tensor::ones(16, DType::F32, &dev).unwrap())
            .unwrap();
        let shifted = conv(&weight, &bias);
        assert!(max_abs_diff(&shifted, &(&doubled + 1.0).unwrap()) < 1e-5);
    }

    /// The custom op, the generic route and candle's conv2d agree, forward
    /// and backward, on a narrowed (strided) input, for k = 3 and k = 1, with
    /// and without the folded ReLU.
    #[test]
    fn im2col_conv_matches_candle_conv2d_with_gradients() {
        let dev = Device::Cpu;
        for (k, relu) in [(3usize, false), (1, false), (3, true), (1, true)] {
            let (b, c, h, w, o) = (2, 5, 6, 7, 4);
            let full = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, h, w, c + 2), &dev).unwrap())
                .unwrap();
            let weight =
                Var::from_tensor(&Tensor::randn(0f32, 1.0, (o, c, k, k), &dev).unwrap()).unwrap();
            let bias = Var::from_tensor(&Tensor::randn(0f32, 1.0, o, &dev).unwrap()).unwrap();
            // strided channels
            let x = full.narrow(3, 1, c).unwrap();
            // Only the first c of these are read: the rest get no gradient.
            let wide = full.narrow(3, 1, c + 1).unwrap();
            let act = if relu {
                Activation::Relu
            } else {
                Activation::Identity
            };
            let cache = Arc::new(PackCache::default());
            let ours = conv2d_same_nhwc(&wide, act, &weight, &bias, &cache).unwrap();
            let x_act = if relu { x.relu().unwrap() } else { x.clone() };
            let x_nchw = x_act.permute((0, 3, 1, 2)).unwrap().contiguous().unwrap();
            let theirs_nchw = x_nchw
                .conv2d(&weight, k / 2, 1, 1, 1)
                .unwrap()
                .broadcast_add(&bias.reshape((1, o, 1, 1)).unwrap())
                .unwrap();
            assert!(max_abs_diff(&ours, &nchw_to_nhwc(&theirs_nchw)) < 1e-4);

            // A loss that weighs every output differently.
            let r = Tensor::randn(0f32, 1.0, ours.dims(), &dev).unwrap();
            let g1 = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let r_nchw = r.permute((0, 3, 1, 2)).unwrap();
            let g2 = (&theirs_nchw * &r_nchw)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for v in [&full, &weight, &bias] {
                let a = g1.get(v.as_tensor()).unwrap();
                let e = g2.get(v.as_tensor()).unwrap();
                assert!(
                    max_abs_diff(a, e) < 1e-4,
                    "k = {k}, relu = {relu}: gradient of {:?}",
                    v.dims()
                );
            }
        }
    }
}
