//! Vision-transformer backbones (DeiT, CaiT) with timm 0.5.4 key names, their
//! shared layers and timm's random initialisation.
//!
//! Both backbones are frozen: every tensor is a plain `Tensor` taken from the
//! `VarBuilder` (memory-mapped safetensors, seeded random init or closed-form
//! fixture weights), so the fused `candle_nn::LayerNorm` (which gives no
//! gradient to its parameters) is fine here.

pub mod cait;
pub mod deit;

use std::sync::Arc;

use candle_core::{CpuStorage, DType, Storage, Tensor, D};
use candle_nn::{LayerNorm, VarBuilder};
use ff_kernels::{Activation, ConvGeometry, PackedConv2d, Route};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal, Uniform};
use rayon::prelude::*;

use crate::checked::get_checked;
use crate::closed_form::fnv1a32;
use crate::error::{Error, Result};

/// The shape of a DeiT or CaiT as FastFlow uses it: the timm model's
/// dimensions and how many of its blocks run before the features are taken.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VitConfig {
    /// Token width (768 for DeiT-base and CaiT-M).
    pub embed_dim: usize,
    /// Number of (self-attention) blocks of the timm model; only
    /// `n_blocks_used` are built.
    pub depth: usize,
    /// Attention heads per block (for CaiT also the talking-heads width).
    pub n_heads: usize,
    /// MLP hidden width over `embed_dim`.
    pub mlp_ratio: f64,
    /// Patch side in pixels (also the feature stride).
    pub patch: usize,
    /// Input side in pixels; the position embedding fits only this size.
    pub img_size: usize,
    /// Blocks run before the final norm (the reference's block index + 1).
    pub n_blocks_used: usize,
}

impl VitConfig {
    /// `deit_base_distilled_patch16_384` as FastFlow uses it: blocks 0..7 at 384 px.
    pub fn deit_base_distilled_384() -> Self {
        Self {
            embed_dim: 768,
            depth: 12,
            n_heads: 12,
            mlp_ratio: 4.0,
            patch: 16,
            img_size: 384,
            n_blocks_used: 8,
        }
    }

    /// `cait_m48_448` as FastFlow uses it: blocks 0..40 at 448 px.
    pub fn cait_m48_448() -> Self {
        Self {
            embed_dim: 768,
            depth: 48,
            n_heads: 16,
            mlp_ratio: 4.0,
            patch: 16,
            img_size: 448,
            n_blocks_used: 41,
        }
    }

    /// Patches per side, the feature map's height and width.
    pub fn grid(&self) -> usize {
        self.img_size / self.patch
    }
}

/// The epsilon of every timm ViT/CaiT LayerNorm (`partial(nn.LayerNorm, eps=1e-6)`).
pub const LAYER_NORM_EPS: f64 = 1e-6;

/// The number of input channels (RGB) of every transformer backbone here.
pub const IN_CHANS: usize = 3;

/// The patch side of both `deit_base_distilled_patch16_384` and `cait_m48_448`.
pub const PATCH: usize = 16;

/// The layer-scale start value of `cait_m48_448` in timm 0.5.4 (`init_scale=1e-6`).
pub const CAIT_M48_INIT_SCALE: f32 = 1e-6;

/// The standard deviation timm uses for linear weights, position embeddings
/// and the cls/dist tokens (`trunc_normal_(std=.02)`).
const TRUNC_NORMAL_STD: f64 = 0.02;

/// The values timm 0.5.4 would give tensor `name` of shape `dims` when it
/// builds `deit_base_distilled_patch16_384` or `cait_m48_448` without
/// pretrained weights, drawn from a ChaCha8 stream seeded by `seed` and
/// selected by `fnv1a32(name)`, so each tensor is reproducible on its own.
///
/// Roles, by key:
/// - `patch_embed.proj.weight` and `.bias`: PyTorch's default `Conv2d` init
///   (timm leaves the patch conv alone in its non-jax init), i.e.
///   `U(-1/sqrt(fan_in), 1/sqrt(fan_in))` with fan_in = 3 * 16 * 16 for both;
/// - `pos_embed`, `cls_token`, `dist_token` and every rank-2 `weight`
///   (linear layers, talking-heads `proj_l`/`proj_w` included):
///   `trunc_normal_(std=.02)`, whose cut at +-2 is absolute as in timm;
/// - rank-1 `weight` (LayerNorm scale): 1; `gamma_1`/`gamma_2` (CaiT layer
///   scale): [`CAIT_M48_INIT_SCALE`];
/// - every other tensor (biases): 0.
pub fn random_init(name: &str, dims: &[usize], seed: u64) -> Vec<f32> {
    let n: usize = dims.iter().product();
    let last = name.rsplit('.').next().unwrap_or(name);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(u64::from(fnv1a32(name)));
    if name.ends_with("patch_embed.proj.weight") || name.ends_with("patch_embed.proj.bias") {
        let bound = 1.0 / ((IN_CHANS * PATCH * PATCH) as f64).sqrt();
        // The bounds are finite and ordered, so this cannot fail.
        let uniform = Uniform::new(-bound, bound).expect("finite, ordered bounds");
        return (0..n).map(|_| uniform.sample(&mut rng) as f32).collect();
    }
    let trunc_normal = matches!(last, "pos_embed" | "cls_token" | "dist_token")
        || (last == "weight" && dims.len() >= 2);
    if trunc_normal {
        // A positive, finite standard deviation cannot fail.
        let normal = Normal::new(0.0, TRUNC_NORMAL_STD).expect("positive std");
        return (0..n)
            .map(|_| loop {
                let v: f64 = normal.sample(&mut rng);
                if (-2.0..=2.0).contains(&v) {
                    break v as f32;
                }
            })
            .collect();
    }
    let value = match last {
        "weight" => 1.0,
        "gamma_1" | "gamma_2" => CAIT_M48_INIT_SCALE,
        _ => 0.0,
    };
    vec![value; n]
}

/// A linear layer `y = x W^T + b` over the last dimension (PyTorch `nn.Linear`).
///
/// On the CPU in f32 the weights are packed at load for ff-kernels, whose
/// micro-kernel runs the layer (with a fused GELU where the MLP wants one),
/// and only the packed copy is kept; elsewhere, and when the model is loaded
/// with `FASTFLOW_KERNELS=generic`, candle's matmul does.
#[derive(Debug, Clone)]
pub(crate) enum Linear {
    Candle { weight: Tensor, bias: Tensor },
    Packed(Arc<PackedConv2d>),
}

/// `len` f32 values of a CPU storage from `start` (a contiguous tensor's
/// data, borrowed).
fn f32_slice(storage: &Storage, start: usize, len: usize) -> candle_core::Result<&[f32]> {
    match storage {
        Storage::Cpu(CpuStorage::F32(v)) if v.len() >= start + len => Ok(&v[start..start + len]),
        _ => candle_core::bail!("linear layer: expected {len} f32 values in CPU memory"),
    }
}

impl Linear {
    /// Loads `weight` [out, in] and `bias` [out] under `vb`.
    pub(crate) fn new(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        let weight = get_checked(&vb, (out_dim, in_dim), "weight")?;
        let bias = get_checked(&vb, out_dim, "bias")?;
        let kernels = weight.device().is_cpu()
            && weight.dtype() == DType::F32
            && Route::current() == Route::Kernels;
        if kernels {
            let geometry = ConvGeometry {
                in_channels: in_dim,
                out_channels: out_dim,
                kernel: 1,
                stride: 1,
                padding: 0,
            };
            // Packed straight from the tensors' storage: a `to_vec1` copy
            // first was another 1.1 GiB written (and faulted in) at CaiT's
            // start-up.
            let (weight, bias) = (weight.contiguous()?, bias.contiguous()?);
            let (w_storage, w_layout) = weight.storage_and_layout();
            let (b_storage, b_layout) = bias.storage_and_layout();
            let w = f32_slice(&w_storage, w_layout.start_offset(), out_dim * in_dim)?;
            let b = f32_slice(&b_storage, b_layout.start_offset(), out_dim)?;
            let packed = PackedConv2d::from_oihw(geometry, None, w, Some(b))?;
            return Ok(Self::Packed(Arc::new(packed)));
        }
        Ok(Self::Candle { weight, bias })
    }

    /// # Shapes
    /// `x`: [..., in] -> [..., out].
    pub(crate) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_with(x, Activation::Identity)
    }

    /// `act(x W^T + b)`, the activation fused into the kernel on the CPU.
    ///
    /// # Shapes
    /// `x`: [..., in] -> [..., out].
    pub(crate) fn forward_with(&self, x: &Tensor, act: Activation) -> candle_core::Result<Tensor> {
        let (weight, bias) = match self {
            Self::Packed(packed) => {
                let op = LinearOp {
                    packed: Arc::clone(packed),
                    act,
                };
                return x.contiguous()?.apply_op1_no_bwd(&op);
            }
            Self::Candle { weight, bias } => (weight, bias),
        };
        // Folding the leading dimensions into one lets a single 2-D GEMM do
        // the work instead of a batched one over a broadcast weight.
        let dims = x.dims().to_vec();
        let in_dim = dims[dims.len() - 1];
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let y = x
            .reshape((rows, in_dim))?
            .matmul(&weight.t()?)?
            .broadcast_add(bias)?;
        let y = match act {
            Activation::Identity => y,
            Activation::Relu => y.relu()?,
            Activation::GeluErf => y.gelu_erf()?,
        };
        let mut out_dims = dims;
        let last = out_dims.len() - 1;
        out_dims[last] = weight.dim(0)?;
        y.reshape(out_dims)
    }
}

/// The values of a contiguous f32 op input, or an error naming the op.
fn contiguous_f32<'a>(
    storage: &'a candle_core::CpuStorage,
    layout: &candle_core::Layout,
    op: &str,
) -> candle_core::Result<&'a [f32]> {
    let (candle_core::CpuStorage::F32(data), Some((start, end))) =
        (storage, layout.contiguous_offsets())
    else {
        candle_core::bail!("{op}: contiguous f32 input only")
    };
    Ok(&data[start..end])
}

/// A [`Linear`] on ff-kernels (forward only: the backbone is frozen).
struct LinearOp {
    packed: Arc<PackedConv2d>,
    act: Activation,
}

impl candle_core::CustomOp1 for LinearOp {
    fn name(&self) -> &'static str {
        "ff-linear"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let x = contiguous_f32(storage, layout, self.name())?;
        let g = self.packed.geometry();
        let rows = x.len() / g.in_channels.max(1);
        let mut out = ff_kernels::zeroed(rows * g.out_channels);
        ff_kernels::linear(&self.packed, x, self.act, &mut out)
            .map_err(candle_core::Error::wrap)?;
        let mut dims = layout.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = g.out_channels;
        }
        Ok((
            candle_core::CpuStorage::F32(out),
            candle_core::Shape::from(dims),
        ))
    }
}

/// A transformer LayerNorm over the last dimension (eps
/// [`LAYER_NORM_EPS`]): ff-kernels' row layer norm on the CPU in f32 (chosen
/// when the model loads), candle_nn's fused one elsewhere.
#[derive(Debug, Clone)]
pub(crate) enum Norm {
    Candle(LayerNorm),
    Kernels {
        weight: Arc<Vec<f32>>,
        bias: Arc<Vec<f32>>,
    },
}

impl Norm {
    /// # Shapes
    /// `x`: [..., dim] -> [..., dim].
    pub(crate) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Norm::Candle(ln) => candle_core::Module::forward(ln, x),
            Norm::Kernels { weight, bias } => x.contiguous()?.apply_op1_no_bwd(&RowOp::LayerNorm {
                weight: Arc::clone(weight),
                bias: Arc::clone(bias),
            }),
        }
    }
}

/// Builds blocks `0 .. n` with `block(vb.pp("blocks.{i}"))`, side by side:
/// each block loads (and with random weights draws, one stream per tensor)
/// its own weights. An error is the first failing block's, in block order.
pub(crate) fn load_blocks<B: Send>(
    n: usize,
    vb: &VarBuilder,
    block: impl Fn(VarBuilder) -> Result<B> + Sync,
) -> Result<Vec<B>> {
    (0..n)
        .into_par_iter()
        .map(|i| block(vb.pp(format!("blocks.{i}"))))
        .collect::<Vec<_>>()
        .into_iter()
        .collect()
}

/// Loads a LayerNorm's `weight` and `bias` [dim] under `vb`.
pub(crate) fn layer_norm(dim: usize, vb: VarBuilder) -> Result<Norm> {
    let weight = get_checked(&vb, dim, "weight")?;
    let bias = get_checked(&vb, dim, "bias")?;
    if weight.device().is_cpu()
        && weight.dtype() == DType::F32
        && Route::current() == Route::Kernels
    {
        return Ok(Norm::Kernels {
            weight: Arc::new(weight.to_vec1::<f32>()?),
            bias: Arc::new(bias.to_vec1::<f32>()?),
        });
    }
    Ok(Norm::Candle(LayerNorm::new(weight, bias, LAYER_NORM_EPS)))
}

/// Softmax over the last dimension: ff-kernels' vectorised row softmax on
/// the CPU in f32, candle_nn's elsewhere.
pub(crate) fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 && Route::current() == Route::Kernels {
        return x.contiguous()?.apply_op1_no_bwd(&RowOp::Softmax);
    }
    candle_nn::ops::softmax_last_dim(x)
}

/// timm's multi-head attention from a fused `qkv` projection:
/// `softmax(q k^T * scale) v` per head, heads merged. On the CPU in f32
/// (head size a multiple of 16) one ff-kernels pass that never builds the
/// `[b, heads, n, n]` logits; elsewhere candle's head split, matmuls and
/// softmax.
///
/// # Shapes
/// `qkv`: [b, n, 3 * c] -> [b, n, c].
pub(crate) fn multi_head_attention(
    qkv: &Tensor,
    n_heads: usize,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let (_, _, c3) = qkv.dims3()?;
    let fused = qkv.device().is_cpu()
        && qkv.dtype() == DType::F32
        && Route::current() == Route::Kernels
        && (c3 / 3 / n_heads.max(1)).is_multiple_of(16);
    if fused {
        return qkv
            .contiguous()?
            .apply_op1_no_bwd(&AttentionOp { n_heads, scale });
    }
    let (q, k, v) = split_heads(qkv, n_heads)?; // [b, h, n, d]
    let attn = softmax_last_dim(&attention_logits(&q, &k, scale)?)?;
    merge_heads(&attn.matmul(&v)?)
}

/// [`multi_head_attention`] on ff-kernels (forward only).
struct AttentionOp {
    n_heads: usize,
    scale: f64,
}

impl candle_core::CustomOp1 for AttentionOp {
    fn name(&self) -> &'static str {
        "ff-attention"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        attention_cpu_fwd(
            self.name(),
            storage,
            layout,
            self.n_heads,
            |qkv, shape, out| ff_kernels::attention(qkv, shape, self.scale as f32, out),
        )
    }
}

/// The forward of an attention op on ff-kernels: the fused `qkv` output
/// `[b, n, 3 c]` in, the merged heads `[b, n, c]` out, computed by `kernel`.
pub(crate) fn attention_cpu_fwd(
    name: &str,
    storage: &candle_core::CpuStorage,
    layout: &candle_core::Layout,
    n_heads: usize,
    kernel: impl FnOnce(&[f32], ff_kernels::AttentionShape, &mut [f32]) -> ff_kernels::Result<()>,
) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
    let qkv = contiguous_f32(storage, layout, name)?;
    let (b, n, c3) = layout.shape().dims3()?;
    let c = c3 / 3;
    let shape = ff_kernels::AttentionShape {
        batch: b,
        tokens: n,
        heads: n_heads,
        head_dim: c / n_heads.max(1),
    };
    let mut out = ff_kernels::zeroed(b * n * c);
    kernel(qkv, shape, &mut out).map_err(candle_core::Error::wrap)?;
    Ok((
        candle_core::CpuStorage::F32(out),
        candle_core::Shape::from((b, n, c)),
    ))
}

/// Row-wise operations over the last dimension on ff-kernels (forward only:
/// the backbone is frozen).
enum RowOp {
    Softmax,
    LayerNorm {
        weight: Arc<Vec<f32>>,
        bias: Arc<Vec<f32>>,
    },
}

impl candle_core::CustomOp1 for RowOp {
    fn name(&self) -> &'static str {
        match self {
            RowOp::Softmax => "ff-softmax-rows",
            RowOp::LayerNorm { .. } => "ff-layer-norm-rows",
        }
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let x = contiguous_f32(storage, layout, self.name())?;
        let cols = layout.dims().last().copied().unwrap_or(1);
        let out = match self {
            RowOp::Softmax => {
                let mut out = x.to_vec();
                ff_kernels::softmax_rows(&mut out, cols).map_err(candle_core::Error::wrap)?;
                out
            }
            RowOp::LayerNorm { weight, bias } => {
                let mut out = ff_kernels::zeroed(x.len());
                ff_kernels::layer_norm_rows(x, cols, weight, bias, LAYER_NORM_EPS as f32, &mut out)
                    .map_err(candle_core::Error::wrap)?;
                out
            }
        };
        Ok((candle_core::CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// timm's `PatchEmbed`: a conv with kernel = stride = patch, flattened to tokens.
#[derive(Debug, Clone)]
pub(crate) struct PatchEmbed {
    /// The conv weight viewed as a matrix [embed_dim, 3 * patch * patch].
    weight: Tensor,
    bias: Tensor,
    patch: usize,
}

impl PatchEmbed {
    /// Loads `proj.weight` [embed_dim, 3, patch, patch] and `proj.bias` [embed_dim] under `vb`.
    pub(crate) fn new(embed_dim: usize, patch: usize, vb: VarBuilder) -> Result<Self> {
        let vb = vb.pp("proj");
        let weight = get_checked(&vb, (embed_dim, IN_CHANS, patch, patch), "weight")?
            .reshape((embed_dim, IN_CHANS * patch * patch))?;
        let bias = get_checked(&vb, embed_dim, "bias")?;
        Ok(Self {
            weight,
            bias,
            patch,
        })
    }

    /// # Shapes
    /// `x`: [b, 3, H, W] with H, W multiples of the patch -> [b, H/p * W/p, embed_dim],
    /// tokens in row-major patch order as timm's `flatten(2).transpose(1, 2)`.
    pub(crate) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        // Kernel and stride are equal, so the patches do not overlap and the
        // convolution is exactly one matrix product over flattened patches.
        let (b, c, h, w) = x.dims4()?;
        let p = self.patch;
        let (gh, gw) = (h / p, w / p);
        let patches = x
            .reshape((b, c, gh, p, gw, p))? // [b, c, gh, p, gw, p]
            .permute((0, 2, 4, 1, 3, 5))? // [b, gh, gw, c, p, p]
            .contiguous()?
            .reshape((b * gh * gw, c * p * p))?;
        patches
            .matmul(&self.weight.t()?)?
            .broadcast_add(&self.bias)?
            .reshape((b, gh * gw, self.weight.dim(0)?))
    }
}

/// timm's `Mlp`: fc1 -> exact (erf) GELU -> fc2.
#[derive(Debug, Clone)]
pub(crate) struct Mlp {
    fc1: Linear,
    fc2: Linear,
}

impl Mlp {
    /// Loads `fc1` [hidden, dim] and `fc2` [dim, hidden] under `vb`.
    pub(crate) fn new(dim: usize, hidden: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            fc1: Linear::new(dim, hidden, vb.pp("fc1"))?,
            fc2: Linear::new(hidden, dim, vb.pp("fc2"))?,
        })
    }

    /// # Shapes
    /// `x`: [b, n, dim] -> [b, n, dim].
    pub(crate) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        // PyTorch's nn.GELU defaults to the exact erf form, not the tanh one.
        self.fc2
            .forward(&self.fc1.forward_with(x, Activation::GeluErf)?)
    }
}

/// Splits the output of a fused `qkv` linear into per-head q, k and v.
///
/// # Shapes
/// `qkv`: [b, n, 3 * c] -> three [b, heads, n, c / heads], contiguous.
pub(crate) fn split_heads(
    qkv: &Tensor,
    n_heads: usize,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let (b, n, c3) = qkv.dims3()?;
    let head_dim = c3 / 3 / n_heads;
    let qkv = qkv
        .reshape((b, n, 3, n_heads, head_dim))?
        .permute((2, 0, 3, 1, 4))?; // [3, b, heads, n, head_dim]
    let q = qkv.get(0)?.contiguous()?;
    let k = qkv.get(1)?.contiguous()?;
    let v = qkv.get(2)?.contiguous()?;
    Ok((q, k, v))
}

/// Merges per-head attention outputs back into tokens.
///
/// # Shapes
/// `x`: [b, heads, n, d] -> [b, n, heads * d].
pub(crate) fn merge_heads(x: &Tensor) -> candle_core::Result<Tensor> {
    let (b, h, n, d) = x.dims4()?;
    x.transpose(1, 2)?.contiguous()?.reshape((b, n, h * d))
}

/// Turns the patch tokens after the final norm into a feature map.
///
/// # Shapes
/// `tokens`: [b, gh * gw, c] -> [b, c, gh, gw].
pub(crate) fn tokens_to_map(tokens: &Tensor, gh: usize, gw: usize) -> candle_core::Result<Tensor> {
    let (b, _, c) = tokens.dims3()?;
    tokens
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b, c, gh, gw))
}

/// Raw attention logits `q k^T * scale`.
///
/// # Shapes
/// `q`, `k`: [b, heads, n, d] -> [b, heads, n, n].
pub(crate) fn attention_logits(q: &Tensor, k: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    q.matmul(&k.transpose(D::Minus2, D::Minus1)?)? * scale
}

/// Checks that `x` is an RGB batch of exactly `img_size` x `img_size`, the
/// only size the learned position embedding fits (timm asserts the same).
pub(crate) fn check_input(x: &Tensor, img_size: usize, model: &str) -> Result<()> {
    match x.dims() {
        &[_, c, h, w] if c == IN_CHANS && h == img_size && w == img_size => Ok(()),
        dims => Err(Error::InputShape {
            found: dims.to_vec(),
            message: format!("{model} expects [b, {IN_CHANS}, {img_size}, {img_size}]"),
        }),
    }
}

/// Checks the numbers a transformer config must agree on.
pub(crate) fn check_config(
    model: &str,
    embed_dim: usize,
    n_heads: usize,
    patch: usize,
    img_size: usize,
    n_blocks_used: usize,
    depth: usize,
) -> Result<()> {
    let invalid = |message: String| Error::Config { message };
    if embed_dim.checked_rem(n_heads) != Some(0) {
        return Err(invalid(format!(
            "{model}: embed_dim {embed_dim} is not a multiple of n_heads {n_heads}"
        )));
    }
    if img_size.checked_rem(patch) != Some(0) {
        return Err(invalid(format!(
            "{model}: img_size {img_size} is not a multiple of patch {patch}"
        )));
    }
    if n_blocks_used > depth {
        return Err(invalid(format!(
            "{model}: n_blocks_used {n_blocks_used} exceeds depth {depth}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_init_follows_timm_roles() {
        let w = random_init("blocks.0.attn.qkv.weight", &[192, 64], 7);
        let mean = w.iter().map(|&v| v as f64).sum::<f64>() / w.len() as f64;
        let std =
            (w.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / w.len() as f64).sqrt();
        assert!(mean.abs() < 2e-3, "mean {mean}");
        assert!((std - 0.02).abs() < 2e-3, "std {std}");
        assert!(random_init("blocks.0.attn.qkv.bias", &[192], 7)
            .iter()
            .all(|&v| v == 0.0));
        assert!(random_init("norm.weight", &[64], 7)
            .iter()
            .all(|&v| v == 1.0));
        assert!(random_init("blocks.3.gamma_2", &[64], 7)
            .iter()
            .all(|&v| v == CAIT_M48_INIT_SCALE));
        let bound = 1.0 / 768f32.sqrt();
        let pw = random_init("patch_embed.proj.weight", &[64, 3, 16, 16], 7);
        assert!(pw.iter().all(|&v| v.abs() <= bound));
        assert!(pw.iter().any(|&v| v.abs() > 0.9 * bound));
        let pb = random_init("patch_embed.proj.bias", &[64], 7);
        assert!(pb.iter().all(|&v| v.abs() <= bound) && pb.iter().any(|&v| v != 0.0));
        let pos = random_init("pos_embed", &[1, 18, 64], 7);
        assert!(pos.iter().any(|&v| v != 0.0));
    }

    #[test]
    fn random_init_is_reproducible_per_key_and_seed() {
        let a = random_init("blocks.0.mlp.fc1.weight", &[16, 8], 1);
        assert_eq!(a, random_init("blocks.0.mlp.fc1.weight", &[16, 8], 1));
        assert_ne!(a, random_init("blocks.0.mlp.fc1.weight", &[16, 8], 2));
        assert_ne!(a, random_init("blocks.1.mlp.fc1.weight", &[16, 8], 1));
    }
}
