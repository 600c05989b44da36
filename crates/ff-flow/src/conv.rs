//! The flow subnets' "same"-padded, stride-1 convolutions as im2col plus one
//! matrix product, on channels-last (`[b, h, w, C]`) feature maps.
//!
//! candle's CPU `conv2d` is several times slower than PyTorch's, and its
//! backward goes through `conv_transpose2d`, slower still. Here the whole
//! convolution is one large `[b h w, k k C + 1] x [k k C + 1, O]` product
//! (gemm, multi-threaded), whose backward is two more products; the bias is
//! folded into the product through a column of ones, so its gradient needs
//! no reduction over a leading dimension. The im2col gather and its adjoint
//! (col2im) are custom ops with parallel loops.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::error::{Error, Result};

/// A "same"-padded, stride-1 convolution with bias on a channels-last map,
/// numerically the reference's `nn.Conv2d(C, O, k, padding=k // 2)`.
///
/// # Shapes
/// `x`: `[b, h, w, C']` with `C' >= C` (any layout; only the first `C`
/// channels are read, so a step can pass its whole input for the first
/// half), `weight`: `[O, C, k, k]` (PyTorch's), `bias`: `[O]` -> `[b, h, w, O]`
/// (contiguous).
pub fn conv2d_same_nhwc(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    conv2d_same_nhwc_impl(x, weight, bias, false)
}

/// [`conv2d_same_nhwc`] of `relu(x)`, with the ReLU folded into the im2col
/// gather (and its gradient mask into the scatter), so that the activation
/// costs no pass of its own either way.
///
/// # Shapes
/// As [`conv2d_same_nhwc`].
pub fn relu_conv2d_same_nhwc(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    conv2d_same_nhwc_impl(x, weight, bias, true)
}

fn conv2d_same_nhwc_impl(x: &Tensor, weight: &Tensor, bias: &Tensor, relu: bool) -> Result<Tensor> {
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
    // Row (ky k + kx) C + c of the matrix holds weight[:, c, ky, kx], the
    // order in which im2col lays out each pixel's neighbourhood.
    let wmat = weight.permute((2, 3, 1, 0))?.reshape((k * k * c, o))?; // [k k C, O]
    let wmat = Tensor::cat(&[&wmat, &bias.reshape((1, o))?], 0)?; // [k k C + 1, O]
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        // One op, so that autograd never stores (nor zero-fills and adds up)
        // a gradient for the k k times larger column matrix.
        let x = if x.layout().stride()[3] == 1 {
            x.clone()
        } else {
            x.contiguous()?
        };
        return Ok(x.apply_op2(&wmat.contiguous()?, ConvSame { k, c, relu })?);
    }
    let cols = im2col(&x.narrow(3, 0, c)?, k, relu)?; // [b h w, k k C + 1]
    Ok(cols.matmul(&wmat)?.reshape((b, h, w, o))?)
}

/// Each pixel's zero-padded `k x k` neighbourhood (of `relu(x)` if `relu`)
/// as one row, in the order (ky, kx, c), followed by a constant 1 for the bias.
///
/// # Shapes
/// `x`: `[b, h, w, C]` -> `[b h w, k k C + 1]`.
pub fn im2col(x: &Tensor, k: usize, relu: bool) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        let x = if x.layout().stride()[3] == 1 {
            x.clone()
        } else {
            x.contiguous()?
        };
        return Ok(x.apply_op1(Im2Col { k, relu })?);
    }
    if relu {
        im2col_generic(&x.relu()?, k)
    } else {
        im2col_generic(x, k)
    }
}

/// [`im2col`] from candle's own differentiable ops, for devices and dtypes
/// the custom op does not cover.
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

/// The im2col gather of the first `c` channels of a `[b, h, w, C']` map
/// whose channels are contiguous: `[b h w, k k c + 1]`, row-major.
fn im2col_f32(
    storage: &CpuStorage,
    layout: &Layout,
    k: usize,
    c: usize,
    relu: bool,
) -> candle_core::Result<Vec<f32>> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("im2col: only f32 is supported")
    };
    let (b, h, w, x_c) = layout.shape().dims4()?;
    let st = layout.stride();
    if st[3] != 1 || x_c < c {
        candle_core::bail!("im2col: channels must be contiguous, at least {c} of them")
    }
    let (s0, s1, s2) = (st[0], st[1], st[2]);
    let off = layout.start_offset();
    let p = k / 2;
    let ncols = k * k * c + 1;
    let mut out = vec![0f32; b * h * w * ncols];
    if out.is_empty() {
        return Ok(out);
    }
    // One image row of output rows per task: rows never overlap.
    out.par_chunks_mut(w * ncols)
        .enumerate()
        .for_each(|(row, dst)| {
            let (bi, y) = (row / h, row % h);
            for x in 0..w {
                let d = &mut dst[x * ncols..(x + 1) * ncols];
                for ky in 0..k {
                    let Some(yy) = (y + ky).checked_sub(p).filter(|&v| v < h) else {
                        continue;
                    };
                    for kx in 0..k {
                        let Some(xx) = (x + kx).checked_sub(p).filter(|&v| v < w) else {
                            continue;
                        };
                        let src = off + bi * s0 + yy * s1 + xx * s2;
                        let dst = &mut d[(ky * k + kx) * c..(ky * k + kx + 1) * c];
                        if relu {
                            for (o, &v) in dst.iter_mut().zip(&data[src..src + c]) {
                                *o = v.max(0.0);
                            }
                        } else {
                            dst.copy_from_slice(&data[src..src + c]);
                        }
                    }
                }
                d[ncols - 1] = 1.0;
            }
        });
    Ok(out)
}

/// The whole convolution: im2col, then one product with the `[k k C + 1, O]`
/// weight matrix (bias in the last row). Backward recomputes the columns
/// instead of keeping them.
struct ConvSame {
    k: usize,
    /// Input channels read (the first `c` of the map).
    c: usize,
    relu: bool,
}

impl CustomOp2 for ConvSame {
    fn name(&self) -> &'static str {
        "ff-conv-same-nhwc"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_l: &Layout,
        wmat: &CpuStorage,
        wmat_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, h, w, _) = x_l.shape().dims4()?;
        let c = self.c;
        let (kk, o) = wmat_l.shape().dims2()?;
        let n = b * h * w;
        if kk != self.k * self.k * c + 1 {
            candle_core::bail!(
                "{}: weight matrix {:?} for {c} channels",
                self.name(),
                wmat_l.dims()
            )
        }
        let cols = CpuStorage::F32(im2col_f32(x, x_l, self.k, c, self.relu)?);
        let out = cols.matmul(wmat, (1, n, o, kk), &Layout::contiguous((n, kk)), wmat_l)?;
        Ok((out, Shape::from((b, h, w, o))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        wmat: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (b, h, w, _c) = x.dims4()?;
        let (_kk, o) = wmat.dims2()?;
        // Nothing here needs a graph of its own.
        let (x, wmat) = (x.detach(), wmat.detach());
        let grad = grad_res.detach().reshape((b * h * w, o))?;
        let grad_cols = grad.matmul(&wmat.t()?)?; // [b h w, k k C + 1]
        let grad_x = grad_cols.apply_op2_no_bwd(
            &x,
            &Col2Im {
                k: self.k,
                c: self.c,
                relu: self.relu,
            },
        )?;
        let cols = x.narrow(3, 0, self.c)?.apply_op1_no_bwd(&Im2Col {
            k: self.k,
            relu: self.relu,
        })?;
        let grad_wmat = cols.t()?.matmul(&grad)?; // [k k C + 1, O]
        Ok((Some(grad_x), Some(grad_wmat)))
    }
}

/// The im2col gather; its backward is [`Col2Im`].
struct Im2Col {
    k: usize,
    relu: bool,
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "ff-im2col-nhwc"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, h, w, c) = layout.shape().dims4()?;
        let out = im2col_f32(storage, layout, self.k, c, self.relu)?;
        let shape = Shape::from((b * h * w, self.k * self.k * c + 1));
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let g = grad_res.contiguous()?.apply_op2_no_bwd(
            arg,
            &Col2Im {
                k: self.k,
                c: arg.dim(3)?,
                relu: self.relu,
            },
        )?;
        Ok(Some(g))
    }
}

/// The adjoint of [`Im2Col`]: sums each pixel's share of the column gradient
/// (the first input), masked where the forward input (the second) was
/// clipped by the ReLU.
struct Col2Im {
    k: usize,
    /// Channels the gather read (the first `c`); the gradient of the others is 0.
    c: usize,
    relu: bool,
}

impl CustomOp2 for Col2Im {
    fn name(&self) -> &'static str {
        "ff-col2im-nhwc"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
        arg: &CpuStorage,
        arg_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(data), CpuStorage::F32(arg)) = (storage, arg) else {
            candle_core::bail!("{}: only f32 is supported", self.name())
        };
        let (b, h, w, x_c) = arg_l.shape().dims4()?;
        let st = arg_l.stride();
        let (s0, s1, s2, a_off) = (st[0], st[1], st[2], arg_l.start_offset());
        let (k, c, relu) = (self.k, self.c, self.relu);
        if st[3] != 1 || x_c < c {
            candle_core::bail!("{}: bad input layout {:?}", self.name(), arg_l)
        }
        let p = k / 2;
        let ncols = k * k * c + 1;
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("{}: the gradient must be contiguous", self.name())
        };
        let g = &data[start..end];
        if g.len() != b * h * w * ncols {
            candle_core::bail!(
                "{}: gradient of {} values for {:?}",
                self.name(),
                g.len(),
                arg_l.dims()
            )
        }
        // The gradient has the input's full channel count; channels past
        // the first `c` were not read, so theirs is 0.
        let mut out = vec![0f32; b * h * w * x_c];
        if out.is_empty() {
            return Ok((CpuStorage::F32(out), Shape::from((b, h, w, x_c))));
        }
        // Input pixel (y, x) is tap (ky, kx) of output pixel (y + p - ky, x + p - kx).
        out.par_chunks_mut(w * x_c)
            .enumerate()
            .for_each(|(row, dst)| {
                let (bi, y) = (row / h, row % h);
                for x in 0..w {
                    let d = &mut dst[x * x_c..x * x_c + c];
                    for ky in 0..k {
                        let Some(oy) = (y + p).checked_sub(ky).filter(|&v| v < h) else {
                            continue;
                        };
                        for kx in 0..k {
                            let Some(ox) = (x + p).checked_sub(kx).filter(|&v| v < w) else {
                                continue;
                            };
                            let src = ((bi * h + oy) * w + ox) * ncols + (ky * k + kx) * c;
                            for (acc, v) in d.iter_mut().zip(&g[src..src + c]) {
                                *acc += v;
                            }
                        }
                    }
                    if relu {
                        let src = a_off + bi * s0 + y * s1 + x * s2;
                        for (acc, &v) in d.iter_mut().zip(&arg[src..src + c]) {
                            if v <= 0.0 {
                                *acc = 0.0;
                            }
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((b, h, w, x_c))))
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
            let x = full.narrow(3, 1, c).unwrap(); // strided channels
                                                   // Only the first c of these are read: the rest get no gradient.
            let wide = full.narrow(3, 1, c + 1).unwrap();
            let ours = if relu {
                relu_conv2d_same_nhwc(&wide, &weight, &bias).unwrap()
            } else {
                conv2d_same_nhwc(&wide, &weight, &bias).unwrap()
            };
            let x_act = if relu { x.relu().unwrap() } else { x.clone() };
            let x_nchw = x_act.permute((0, 3, 1, 2)).unwrap().contiguous().unwrap();
            let theirs_nchw = x_nchw
                .conv2d(&weight, k / 2, 1, 1, 1)
                .unwrap()
                .broadcast_add(&bias.reshape((1, o, 1, 1)).unwrap())
                .unwrap();
            assert!(max_abs_diff(&ours, &nchw_to_nhwc(&theirs_nchw)) < 1e-4);
            let generic = im2col_generic(&x_act, k).unwrap();
            let custom = im2col(&x, k, relu).unwrap();
            assert_eq!(max_abs_diff(&generic, &custom), 0.0);

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
