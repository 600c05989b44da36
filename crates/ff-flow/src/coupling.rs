//! One coupling step of FastFlow's 2D flow, with the semantics of FrEIA 0.2's
//! `AllInOneBlock` as the reference configures it (affine clamping 2.0,
//! SOFTPLUS global affine initialised to 1.0, hard permutation).

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use ff_kernels::Activation;
use rand_chacha::ChaCha8Rng;

use crate::conv::{conv2d_same_nhwc, ConvSpec, PackCache};
use crate::error::{Error, Result};
use crate::flow_op::StepSpec;
use crate::freia::{
    global_scale_init, AFFINE_CLAMPING, GLOBAL_SCALE_FACTOR, SOFTPLUS_BETA, SOFTPLUS_THRESHOLD,
    SUBNET_SCALE,
};
use crate::fused::{row_view, CouplingOp};
use crate::param::{trainable, Param, ParamInit};

/// The settings of one coupling step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CouplingConfig {
    /// Feature channels `C` (input = output).
    pub channels: usize,
    /// Hidden channels of the subnet.
    pub hidden_channels: usize,
    /// Subnet kernel size (3 or 1), "same" zero padding.
    pub kernel_size: usize,
}

/// A fixed hard channel permutation: output channel `i` is input channel `perm[i]`.
#[derive(Debug, Clone)]
pub struct Permutation {
    perm: Vec<u32>,
    index: Tensor,
}

impl Permutation {
    /// The permutation with `perm[i]` = the input channel of output channel `i`.
    /// `key` names it in errors.
    pub fn new(perm: Vec<u32>, device: &Device, key: &str) -> Result<Self> {
        let n = perm.len();
        let mut seen = vec![false; n];
        for &p in &perm {
            let p = p as usize;
            if p >= n || seen[p] {
                return Err(Error::InvalidPermutation {
                    key: key.to_string(),
                    message: format!("{perm:?} is not a permutation of 0..{n}"),
                });
            }
            seen[p] = true;
        }
        let index = Tensor::new(perm.as_slice(), device)?;
        Ok(Self { perm, index })
    }

    /// The index list (`perm[i]` feeds output channel `i`).
    pub fn indices(&self) -> &[u32] {
        &self.perm
    }

    /// FrEIA's `w_perm`: the `[C, C, 1, 1]` matrix with `w[i, perm[i]] = 1`,
    /// which the reference applies as a 1x1 convolution.
    ///
    /// # Shapes
    /// -> `[C, C, 1, 1]`.
    pub fn matrix(&self, dtype: DType) -> Result<Tensor> {
        let n = self.perm.len();
        let mut w = vec![0f32; n * n];
        for (i, &j) in self.perm.iter().enumerate() {
            w[i * n + j as usize] = 1.0;
        }
        Ok(Tensor::from_vec(w, (n, n, 1, 1), self.index.device())?.to_dtype(dtype)?)
    }

    /// FrEIA's `w_perm_inv`: the transpose of [`Permutation::matrix`].
    ///
    /// # Shapes
    /// -> `[C, C, 1, 1]`.
    pub fn inverse_matrix(&self, dtype: DType) -> Result<Tensor> {
        Ok(self
            .matrix(DType::F32)?
            .squeeze(3)?
            .squeeze(2)?
            .t()?
            .contiguous()?
            .reshape((self.perm.len(), self.perm.len(), 1, 1))?
            .to_dtype(dtype)?)
    }

    /// Reads the permutation back from a `w_perm` matrix, checking that it is
    /// a hard permutation of the expected size and (if given) that `w_perm_inv`
    /// is its transpose.
    ///
    /// # Shapes
    /// `w_perm`, `w_perm_inv`: `[C, C, 1, 1]`.
    pub fn from_matrices(
        w_perm: &Tensor,
        w_perm_inv: Option<&Tensor>,
        channels: usize,
        key: &str,
    ) -> Result<Self> {
        let expected = vec![channels, channels, 1, 1];
        if w_perm.dims() != expected.as_slice() {
            return Err(Error::ShapeMismatch {
                key: key.to_string(),
                expected,
                found: w_perm.dims().to_vec(),
            });
        }
        let rows = w_perm
            .to_dtype(DType::F32)?
            .reshape((channels, channels))?
            .to_vec2::<f32>()?;
        let mut perm = Vec::with_capacity(channels);
        for (i, row) in rows.iter().enumerate() {
            let ones: Vec<usize> = row
                .iter()
                .enumerate()
                .filter(|(_, &v)| v != 0.0)
                .map(|(j, _)| j)
                .collect();
            if ones.len() != 1 || row[ones[0]] != 1.0 {
                return Err(Error::InvalidPermutation {
                    key: key.to_string(),
                    message: format!("row {i} is not one 1 among zeros"),
                });
            }
            perm.push(ones[0] as u32);
        }
        let p = Self::new(perm, w_perm.device(), key)?;
        if let Some(inv) = w_perm_inv {
            let inv_key = key.replace("w_perm", "w_perm_inv");
            let expected_inv = p.inverse_matrix(DType::F32)?;
            if inv.dims() != expected_inv.dims() {
                return Err(Error::ShapeMismatch {
                    key: inv_key,
                    expected: expected_inv.dims().to_vec(),
                    found: inv.dims().to_vec(),
                });
            }
            let diff = (inv.to_dtype(DType::F32)? - expected_inv)?
                .abs()?
                .sum_all()?
                .to_scalar::<f32>()?;
            if diff != 0.0 {
                return Err(Error::InvalidPermutation {
                    key: inv_key,
                    message: "it is not the transpose of w_perm".into(),
                });
            }
        }
        Ok(p)
    }

    /// Applies the permutation along the channel dimension.
    ///
    /// # Shapes
    /// `x`: `[b, C, h, w]` -> `[b, C, h, w]`.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        // A gather, not the reference's 1x1 convolution with a 0/1 matrix:
        // the result is bit-identical and costs C instead of C^2 per pixel.
        Ok(x.index_select(&self.index, 1)?)
    }

    /// Applies the permutation along the last (channel) dimension of a
    /// channels-last map.
    ///
    /// # Shapes
    /// `x`: `[b, h, w, C]` -> `[b, h, w, C]`.
    pub fn apply_last(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.index_select(&self.index, x.rank() - 1)?)
    }
}

/// One affine coupling step: split, subnet, clamped affine coupling, global
/// affine (softplus scale, offset), fixed channel permutation.
#[derive(Debug, Clone)]
pub struct AllInOneBlock {
    cfg: CouplingConfig,
    global_scale: Param,
    global_offset: Param,
    conv1_weight: Param,
    conv1_bias: Param,
    conv2_weight: Param,
    conv2_bias: Param,
    /// The two convolutions' weights as packed for the CPU kernels.
    conv1_packed: Arc<PackCache>,
    conv2_packed: Arc<PackCache>,
    permutation: Permutation,
    key_prefix: String,
}

impl AllInOneBlock {
    /// Builds the step under `vb` (keys `global_scale`, `global_offset`,
    /// `subnet.0.weight|bias`, `subnet.2.weight|bias`). New parameters start
    /// as the reference's do: the global scale's pre-activation at the value
    /// that makes the scale 1, offset 0, convolutions with PyTorch's default
    /// uniform init drawn from `rng`.
    pub fn new(
        cfg: CouplingConfig,
        permutation: Permutation,
        vb: VarBuilder,
        rng: &mut ChaCha8Rng,
    ) -> Result<Self> {
        let c = cfg.channels;
        if permutation.indices().len() != c {
            return Err(Error::InvalidPermutation {
                key: crate::param::full_key(&vb, "w_perm"),
                message: format!(
                    "it has {} channels, the step {c}",
                    permutation.indices().len()
                ),
            });
        }
        let c1 = c - c / 2;
        let c2 = c / 2;
        let k = cfg.kernel_size;
        let h = cfg.hidden_channels;
        let global_scale = trainable(
            &vb,
            &[1, c, 1, 1],
            "global_scale",
            ParamInit::Const(global_scale_init()),
            rng,
        )?;
        let global_offset = trainable(
            &vb,
            &[1, c, 1, 1],
            "global_offset",
            ParamInit::Const(0.0),
            rng,
        )?;
        let sub = vb.pp("subnet");
        let bound1 = 1.0 / ((c1 * k * k) as f64).sqrt();
        let conv1_weight = trainable(
            &sub,
            &[h, c1, k, k],
            "0.weight",
            ParamInit::Uniform(bound1),
            rng,
        )?;
        let conv1_bias = trainable(&sub, &[h], "0.bias", ParamInit::Uniform(bound1), rng)?;
        let bound2 = 1.0 / ((h * k * k) as f64).sqrt();
        let conv2_weight = trainable(
            &sub,
            &[2 * c2, h, k, k],
            "2.weight",
            ParamInit::Uniform(bound2),
            rng,
        )?;
        let conv2_bias = trainable(&sub, &[2 * c2], "2.bias", ParamInit::Uniform(bound2), rng)?;
        Ok(Self {
            cfg,
            global_scale,
            global_offset,
            conv1_weight,
            conv1_bias,
            conv2_weight,
            conv2_bias,
            conv1_packed: Arc::default(),
            conv2_packed: Arc::default(),
            permutation,
            key_prefix: vb.prefix(),
        })
    }

    /// The step's settings.
    pub fn config(&self) -> CouplingConfig {
        self.cfg
    }

    /// The trainable tensors with their state-dict keys.
    pub fn params(&self) -> Vec<&Param> {
        vec![
            &self.global_scale,
            &self.global_offset,
            &self.conv1_weight,
            &self.conv1_bias,
            &self.conv2_weight,
            &self.conv2_bias,
        ]
    }

    /// The fixed channel permutation.
    pub fn permutation(&self) -> &Permutation {
        &self.permutation
    }

    /// Replaces the channel permutation (when loading a checkpoint).
    pub fn set_permutation(&mut self, permutation: Permutation) -> Result<()> {
        if permutation.indices().len() != self.cfg.channels {
            return Err(Error::InvalidPermutation {
                key: format!("{}.w_perm", self.key_prefix),
                message: format!(
                    "it has {} channels, the step {}",
                    permutation.indices().len(),
                    self.cfg.channels
                ),
            });
        }
        self.permutation = permutation;
        Ok(())
    }

    /// The state-dict key prefix of this step (`nf_flows.{i}.module_list.{k}`).
    pub fn key_prefix(&self) -> &str {
        &self.key_prefix
    }

    /// The global affine scale `0.1 softplus_{beta=0.5}(global_scale)`,
    /// with PyTorch's threshold (identity where `beta * x > 20`).
    ///
    /// # Shapes
    /// `[1, C, 1, 1]`.
    pub fn global_affine_scale(&self) -> Result<Tensor> {
        let g = &self.global_scale.tensor;
        let bx = (g * SOFTPLUS_BETA)?;
        // The smooth branch is evaluated on a clamped input so that neither it
        // nor its gradient overflows where the identity branch is chosen.
        let smooth = ((bx.clamp(f64::NEG_INFINITY, SOFTPLUS_THRESHOLD)?.exp()? + 1.0)?.log()?
            / SOFTPLUS_BETA)?;
        let softplus = bx.gt(SOFTPLUS_THRESHOLD)?.where_cond(g, &smooth)?;
        Ok((softplus * GLOBAL_SCALE_FACTOR)?)
    }

    /// Runs the step forward on a channels-first map (see
    /// [`AllInOneBlock::forward_nhwc`], which the flows use).
    ///
    /// # Shapes
    /// `x`: `[b, C, h, w]` -> (`[b, C, h, w]`, log-det `[b]`).
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let (y, log_det) = self.forward_nhwc(&to_nhwc(x)?)?;
        Ok((to_nchw(&y)?, log_det))
    }

    /// Runs the step forward on a channels-last map. The flows work in this
    /// layout because the subnet convolutions become plain matrix products
    /// over channels and every per-channel reduction runs over the trailing
    /// dimension, which candle's CPU backend does fastest.
    ///
    /// # Shapes
    /// `x`: `[b, h, w, C]` -> (`[b, h, w, C]`, log-det `[b]`).
    pub fn forward_nhwc(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let c = x.dim(3)?;
        if c != self.cfg.channels {
            return Err(Error::InputShape {
                what: "coupling step input channels",
                expected: self.cfg.channels.to_string(),
                found: c.to_string(),
            });
        }
        if fused_path(x) {
            return self.forward_nhwc_fused(x);
        }
        self.forward_nhwc_ops(x)
    }

    /// [`AllInOneBlock::forward_nhwc`] from candle's elementwise ops, for
    /// devices and dtypes the fused kernel does not cover (and as the
    /// kernel's check in the tests).
    ///
    /// # Shapes
    /// `x`: `[b, h, w, C]` -> (`[b, h, w, C]`, log-det `[b]`).
    fn forward_nhwc_ops(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let (_b, h, w, c) = x.dims4()?;
        let c1 = c - c / 2;
        let c2 = c / 2;
        let x1 = x.narrow(3, 0, c1)?; // [b, h, w, c1]
        let x2 = x.narrow(3, c1, c2)?; // [b, h, w, c2]
        let a = (self.subnet_raw(&x1)? * SUBNET_SCALE)?; // [b, h, w, 2 c2]
        let s = (a.narrow(3, 0, c2)?.tanh()? * AFFINE_CLAMPING)?;
        let t = a.narrow(3, c2, c2)?;
        let y2 = ((x2 * s.exp()?)? + t)?;
        let coupling_log_det = s.flatten_from(1)?.sum(1)?; // [b]
        let y = Tensor::cat(&[&x1, &y2], 3)?;
        let scale = self.global_affine_scale()?.reshape(c)?; // [C]
        let y = y
            .broadcast_mul(&scale)?
            .broadcast_add(&self.global_offset.tensor.reshape(c)?)?;
        let y = self.permutation.apply_last(&y)?;
        // FrEIA adds n_pixels * sum(log scale) for the global scaling.
        let scale_log_det = (scale.log()?.sum_all()? * (h * w) as f64)?;
        let log_det = coupling_log_det.broadcast_add(&scale_log_det)?;
        Ok((y, log_det))
    }

    /// [`AllInOneBlock::forward_nhwc`] on the CPU in f32: the subnet as two
    /// im2col products, the rest as one fused kernel ([`CouplingOp`]).
    ///
    /// # Shapes
    /// `x`: `[b, h, w, C]` -> (`[b, h, w, C]`, log-det `[b]`).
    fn forward_nhwc_fused(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let (out, scale_log_det) = self.forward_carrying_log_det(x)?;
        let (y, coupling_log_det) = split_log_det_column(&out)?;
        Ok((y, coupling_log_det.broadcast_add(&scale_log_det)?))
    }

    /// The fused step on a map that may carry its per-pixel log-det so far
    /// as an extra last channel (CPU, f32). The flows chain steps this way:
    /// no slicing between steps, so autograd adds up no zero-padded
    /// full-size gradients.
    ///
    /// # Shapes
    /// `x`: `[b, h, w, C]` or `[b, h, w, C + 1]` -> (`[b, h, w, C + 1]`: the
    /// step output and the accumulated coupling log-det per pixel, the
    /// global scale's log-det `[]`, the same for every image).
    pub(crate) fn forward_carrying_log_det(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let (_b, h, w, x_c) = x.dims4()?;
        let c = self.cfg.channels;
        if x_c != c && x_c != c + 1 {
            return Err(Error::InputShape {
                what: "coupling step input channels (with or without the log-det column)",
                expected: format!("{c} or {}", c + 1),
                found: x_c.to_string(),
            });
        }
        let x = if row_view(x.layout()).is_some() {
            x.clone()
        } else {
            x.contiguous()?
        };
        // The first convolution reads only the first C - C/2 channels (x1).
        let a = self.subnet_raw(&x)?; // [b, h, w, 2 c2]
        let (affine, scale_log_det) = self.affine(h * w)?;
        let op = CouplingOp {
            perm: self.permutation.indices().to_vec(),
        };
        // [b, h, w, C + 1]
        let out = x.apply_op3(&a, &affine, op)?;
        Ok((out, scale_log_det))
    }

    /// The global affine as the fused kernels read it, `[2, C]` (scales,
    /// then offsets), and its log-det on a map of `pixels` pixels: FrEIA
    /// adds `pixels * sum(log scale)` for the global scaling.
    fn affine(&self, pixels: usize) -> Result<(Tensor, Tensor)> {
        let c = self.cfg.channels;
        let scale = self.global_affine_scale()?.reshape((1, c))?;
        let affine = Tensor::cat(&[&scale, &self.global_offset.tensor.reshape((1, c))?], 0)?;
        let log_det = (scale.log()?.sum_all()? * pixels as f64)?;
        Ok((affine, log_det))
    }

    /// This step as one part of the whole-flow training op
    /// ([`crate::flow_op::FlowOp`]) on maps of `pixels` pixels per image: its
    /// description, its parameters flattened in the op's order, and the
    /// global scale's log-det.
    pub(crate) fn training_part(&self, pixels: usize) -> Result<(StepSpec, Vec<Tensor>, Tensor)> {
        let cfg = self.cfg;
        let (c1, c2, k, hidden) = (
            cfg.channels - cfg.channels / 2,
            cfg.channels / 2,
            cfg.kernel_size,
            cfg.hidden_channels,
        );
        let spec = StepSpec {
            conv1: ConvSpec {
                k,
                c: c1,
                o: hidden,
                relu: false,
            },
            conv2: ConvSpec {
                k,
                c: hidden,
                o: 2 * c2,
                relu: true,
            },
            cache1: Arc::clone(&self.conv1_packed),
            cache2: Arc::clone(&self.conv2_packed),
            perm: self.permutation.indices().to_vec(),
        };
        let (affine, log_det) = self.affine(pixels)?;
        let params = [
            &self.conv1_weight.tensor,
            &self.conv1_bias.tensor,
            &self.conv2_weight.tensor,
            &self.conv2_bias.tensor,
            &affine,
        ]
        .into_iter()
        .map(Tensor::flatten_all)
        .collect::<candle_core::Result<Vec<_>>>()?;
        Ok((spec, params, log_det))
    }

    /// conv(k) -> ReLU -> conv(k), "same" zero padding, with bias; the ReLU
    /// is folded into the second convolution's gather.
    ///
    /// # Shapes
    /// `x1`: `[b, h, w, C']` with `C' >= C - C/2` (only the first `C - C/2`
    /// channels are read) -> `[b, h, w, 2 (C/2)]`.
    fn subnet_raw(&self, x1: &Tensor) -> Result<Tensor> {
        let hdn = conv2d_same_nhwc(
            x1,
            Activation::Identity,
            &self.conv1_weight.tensor,
            &self.conv1_bias.tensor,
            &self.conv1_packed,
        )?;
        conv2d_same_nhwc(
            &hdn,
            Activation::Relu,
            &self.conv2_weight.tensor,
            &self.conv2_bias.tensor,
            &self.conv2_packed,
        )
    }
}

/// Splits a map carrying its per-pixel log-det as a last channel into the
/// map and the per-image log-det.
///
/// # Shapes
/// `out`: `[b, h, w, C + 1]` -> (`[b, h, w, C]` (a strided view), `[b]`).
pub(crate) fn split_log_det_column(out: &Tensor) -> Result<(Tensor, Tensor)> {
    let (b, h, w, c1) = out.dims4()?;
    let c = c1 - 1;
    let log_det = out.narrow(3, c, 1)?.reshape((b, h * w))?.sum(1)?; // [b]
    Ok((out.narrow(3, 0, c)?, log_det))
}

/// Whether a map takes the fused coupling ([`AllInOneBlock::forward_nhwc`]):
/// f32 on the CPU, and on CUDA in builds with the `cuda` feature. Off with
/// `FASTFLOW_KERNELS=generic`, which forces candle's op-by-op route.
pub(crate) fn fused_path(x: &Tensor) -> bool {
    let device = x.device().is_cpu() || (cfg!(feature = "cuda") && x.device().is_cuda());
    device && x.dtype() == DType::F32 && ff_kernels::Route::current() == ff_kernels::Route::Kernels
}

/// `[b, C, h, w]` -> contiguous `[b, h, w, C]`.
pub(crate) fn to_nhwc(x: &Tensor) -> Result<Tensor> {
    Ok(x.permute((0, 2, 3, 1))?.contiguous()?)
}

/// `[b, h, w, C]` -> contiguous `[b, C, h, w]`.
pub(crate) fn to_nchw(x: &Tensor) -> Result<Tensor> {
    Ok(x.permute((0, 3, 1, 2))?.contiguous()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;
    use candle_nn::VarMap;
    use rand::SeedableRng;

    fn block(c: usize, k: usize, varmap: &VarMap) -> AllInOneBlock {
        let vb = VarBuilder::from_varmap(varmap, DType::F32, &Device::Cpu);
        let perm = Permutation::new((0..c as u32).rev().collect(), &Device::Cpu, "p").unwrap();
        let cfg = CouplingConfig {
            channels: c,
            hidden_channels: 3,
            kernel_size: k,
        };
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        AllInOneBlock::new(cfg, perm, vb.pp("step"), &mut rng).unwrap()
    }

    #[test]
    fn global_scale_starts_at_one() {
        let varmap = VarMap::new();
        let b = block(6, 3, &varmap);
        let s = b.global_affine_scale().unwrap().flatten_all().unwrap();
        for v in s.to_vec1::<f32>().unwrap() {
            assert!((v - 1.0).abs() < 1e-6, "{v}");
        }
    }

    #[test]
    fn softplus_is_the_identity_above_the_threshold_with_finite_gradients() {
        let varmap = VarMap::new();
        let b = block(4, 1, &varmap);
        // beta * g = 0.5 * [10, 39, 41, 200]: the last two take the identity branch.
        let g = Tensor::new(&[10f32, 39.0, 41.0, 200.0], &Device::Cpu)
            .unwrap()
            .reshape((1, 4, 1, 1))
            .unwrap();
        b.global_scale.var().unwrap().set(&g).unwrap();
        let s = b.global_affine_scale().unwrap();
        let v = s.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let smooth = |x: f64| 0.1 * 2.0 * (1.0 + (0.5 * x).exp()).ln();
        assert!((v[0] as f64 - smooth(10.0)).abs() < 1e-6);
        assert!((v[1] as f64 - smooth(39.0)).abs() < 1e-5);
        assert!((v[2] - 4.1).abs() < 1e-6 && (v[3] - 20.0).abs() < 1e-5);
        let grads = s.sum_all().unwrap().backward().unwrap();
        let gr = grads
            .get(&b.global_scale.tensor)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(gr.iter().all(|x| x.is_finite()), "{gr:?}");
        assert!((gr[3] - 0.1).abs() < 1e-7 && (gr[2] - 0.1).abs() < 1e-7);
    }

    #[test]
    fn permutation_matrices_round_trip_and_gather_equals_matrix_product() {
        let perm = Permutation::new(vec![2, 0, 3, 1], &Device::Cpu, "p").unwrap();
        let w = perm.matrix(DType::F32).unwrap();
        let w_inv = perm.inverse_matrix(DType::F32).unwrap();
        let back = Permutation::from_matrices(&w, Some(&w_inv), 4, "p").unwrap();
        assert_eq!(back.indices(), perm.indices());
        // The reference applies w_perm as a 1x1 convolution.
        let x = Tensor::arange(0f32, 2.0 * 4.0 * 3.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 4, 3, 1))
            .unwrap();
        let conv = x.conv2d(&w, 0, 1, 1, 1).unwrap();
        let gather = perm.apply(&x).unwrap();
        let diff = (conv - gather).unwrap().abs().unwrap().sum_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
        assert!(Permutation::new(vec![0, 0, 1], &Device::Cpu, "bad").is_err());
    }

    /// Two chained steps through the fused kernel (carrying the log-det
    /// column, as the flows do) equal the op-by-op route, forward and in the
    /// gradients of every parameter and of the input.
    #[test]
    fn fused_steps_match_elementwise_ops_with_gradients() {
        let dev = Device::Cpu;
        for (c, k) in [(6usize, 3usize), (7, 1)] {
            let varmap = VarMap::new();
            let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
            let mut rng = ChaCha8Rng::seed_from_u64(3);
            let steps: Vec<AllInOneBlock> = (0..2)
                .map(|i| {
                    let mut perm: Vec<u32> = (0..c as u32).collect();
                    perm.rotate_left(i + 2);
                    perm.swap(0, c - 1);
                    let perm = Permutation::new(perm, &dev, "p").unwrap();
                    let cfg = CouplingConfig {
                        channels: c,
                        hidden_channels: 4,
                        kernel_size: k,
                    };
                    AllInOneBlock::new(cfg, perm, vb.pp(i), &mut rng).unwrap()
                })
                .collect();
            // Global affines away from their initial values.
            for (i, st) in steps.iter().enumerate() {
                let g = Tensor::randn(9f32, 2.0, (1, c, 1, 1), &dev).unwrap();
                st.global_scale.var().unwrap().set(&g).unwrap();
                let o = Tensor::randn(0f32, 0.5 + i as f32, (1, c, 1, 1), &dev).unwrap();
                st.global_offset.var().unwrap().set(&o).unwrap();
            }
            let x =
                Var::from_tensor(&Tensor::randn(0f32, 2.0, (2, 5, 4, c), &dev).unwrap()).unwrap();
            let r = Tensor::randn(0f32, 1.0, (2, 5, 4, c), &dev).unwrap();
            let r_ld = Tensor::new(&[0.7f32, -1.3], &dev).unwrap();
            let objective = |y: &Tensor, ld: &Tensor| {
                ((y * &r).unwrap().sum_all().unwrap() + (ld * &r_ld).unwrap().sum_all().unwrap())
                    .unwrap()
            };

            let (o1, s1) = steps[0].forward_carrying_log_det(&x).unwrap();
            let (o2, s2) = steps[1].forward_carrying_log_det(&o1).unwrap();
            let (y_fused, ld) = split_log_det_column(&o2).unwrap();
            let ld_fused = ld.broadcast_add(&(s1 + s2).unwrap()).unwrap();

            let (y1, l1) = steps[0].forward_nhwc_ops(&x).unwrap();
            let (y_ops, l2) = steps[1].forward_nhwc_ops(&y1).unwrap();
            let ld_ops = (l1 + l2).unwrap();

            let diff = |a: &Tensor, b: &Tensor| {
                let scale = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
                let d = (a - b)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .max(0)
                    .unwrap();
                d.to_scalar::<f32>().unwrap() / scale.to_scalar::<f32>().unwrap().max(1e-6)
            };
            assert!(diff(&y_fused, &y_ops) < 1e-5, "c = {c}: outputs");
            assert!(diff(&ld_fused, &ld_ops) < 1e-5, "c = {c}: log-dets");

            let g_fused = objective(&y_fused, &ld_fused).backward().unwrap();
            let g_ops = objective(&y_ops, &ld_ops).backward().unwrap();
            let mut tensors = vec![x.as_tensor().clone()];
            for st in &steps {
                tensors.extend(st.params().into_iter().map(|p| p.tensor.clone()));
            }
            for t in &tensors {
                let a = g_fused.get(t).expect("fused gradient");
                let b = g_ops.get(t).expect("op-by-op gradient");
                assert!(diff(a, b) < 1e-4, "c = {c}: gradient of {:?}", t.dims());
            }
        }
    }

    #[test]
    fn wrong_channel_count_is_an_error() {
        let varmap = VarMap::new();
        let b = block(6, 3, &varmap);
        let x = Tensor::zeros((1, 5, 2, 2), DType::F32, &Device::Cpu).unwrap();
        assert!(b.forward(&x).is_err());
    }
}
