//! CaiT-M48-448 feature extractor (timm `cait_m48_448`).
//!
//! FastFlow uses the self-attention trunk only: patch embedding plus position
//! embedding (the cls token joins only in the class-attention stage, which is
//! never built), blocks 0..40 of 48 and the final norm, reshaped to a
//! 768-channel map at stride 16.

use std::sync::Arc;

use super::VitConfig;
use candle_core::{DType, Tensor, D};
use candle_nn::VarBuilder;
use ff_kernels::Route;

use crate::checked::get_checked;
use crate::error::Result;

use super::{
    attention_cpu_fwd, check_config, check_input, layer_norm, load_blocks, merge_heads,
    softmax_last_dim, split_heads, tokens_to_map, Linear, Mlp, Norm, PatchEmbed,
};

/// A linear map across the head axis of attention maps (talking heads).
#[derive(Debug, Clone)]
struct HeadMix {
    /// [heads, heads], PyTorch `nn.Linear` layout (out, in).
    weight: Tensor,
    /// [1, heads, 1].
    bias: Tensor,
    /// The weight and bias as host values for the fused kernel (CPU, f32,
    /// kernels route; read once when the model loads).
    host: Option<Arc<(Vec<f32>, Vec<f32>)>>,
}

impl HeadMix {
    fn new(n_heads: usize, vb: VarBuilder) -> Result<Self> {
        let weight = get_checked(&vb, (n_heads, n_heads), "weight")?;
        let bias = get_checked(&vb, n_heads, "bias")?;
        let host = if weight.device().is_cpu()
            && weight.dtype() == DType::F32
            && Route::current() == Route::Kernels
        {
            Some(Arc::new((
                weight.flatten_all()?.to_vec1::<f32>()?,
                bias.to_vec1::<f32>()?,
            )))
        } else {
            None
        };
        Ok(Self {
            weight,
            bias: bias.reshape((1, n_heads, 1))?,
            host,
        })
    }

    /// timm permutes the heads last, applies `nn.Linear` and permutes back;
    /// multiplying by the weight from the left over flattened maps is the
    /// same sum without the two transposed copies of an [n, n] map per head.
    ///
    /// # Shapes
    /// `attn`: [b, h, n, n] -> [b, h, n, n].
    fn forward(&self, attn: &Tensor) -> candle_core::Result<Tensor> {
        let (b, h, n, m) = attn.dims4()?;
        let flat = attn.reshape((b, h, n * m))?;
        let weight = self.weight.broadcast_left(b)?.contiguous()?; // [b, h, h]
        weight
            .matmul(&flat)?
            .broadcast_add(&self.bias)?
            .reshape((b, h, n, m))
    }
}

/// timm's `TalkingHeadAttn`: heads are mixed linearly before and after the softmax.
#[derive(Debug, Clone)]
struct TalkingHeadAttn {
    qkv: Linear,
    proj_l: HeadMix,
    proj_w: HeadMix,
    proj: Linear,
    n_heads: usize,
    scale: f64,
}

impl TalkingHeadAttn {
    fn new(dim: usize, n_heads: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            qkv: Linear::new(dim, 3 * dim, vb.pp("qkv"))?,
            proj_l: HeadMix::new(n_heads, vb.pp("proj_l"))?,
            proj_w: HeadMix::new(n_heads, vb.pp("proj_w"))?,
            proj: Linear::new(dim, dim, vb.pp("proj"))?,
            n_heads,
            scale: ((dim / n_heads) as f64).powf(-0.5),
        })
    }

    /// # Shapes
    /// `x`: [b, n, c] -> [b, n, c].
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let qkv = self.qkv.forward(x)?;
        let (_, _, c3) = qkv.dims3()?;
        if let (Some(before), Some(after)) = (&self.proj_l.host, &self.proj_w.host) {
            if qkv.device().is_cpu()
                && qkv.dtype() == DType::F32
                && (c3 / 3 / self.n_heads.max(1)).is_multiple_of(16)
            {
                let op = TalkingHeadsOp {
                    n_heads: self.n_heads,
                    scale: self.scale,
                    before: Arc::clone(before),
                    after: Arc::clone(after),
                };
                let merged = qkv.contiguous()?.apply_op1_no_bwd(&op)?;
                return self.proj.forward(&merged);
            }
        }
        // [b, h, n, d]
        let (q, k, v) = split_heads(&qkv, self.n_heads)?;
        // timm scales q before the product (not the logits after it); keep its order.
        let q = (q * self.scale)?;
        let attn = q.matmul(&k.transpose(D::Minus2, D::Minus1)?)?; // [b, h, n, n]
        let attn = self.proj_l.forward(&attn)?;
        let attn = softmax_last_dim(&attn)?;
        let attn = self.proj_w.forward(&attn)?;
        self.proj.forward(&merge_heads(&attn.matmul(&v)?)?)
    }
}

/// [`TalkingHeadAttn`]'s attention on ff-kernels, from the fused `qkv`
/// output to the merged heads (forward only: the backbone is frozen).
struct TalkingHeadsOp {
    n_heads: usize,
    scale: f64,
    before: Arc<(Vec<f32>, Vec<f32>)>,
    after: Arc<(Vec<f32>, Vec<f32>)>,
}

impl candle_core::CustomOp1 for TalkingHeadsOp {
    fn name(&self) -> &'static str {
        "ff-talking-heads-attention"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        fn mix(m: &(Vec<f32>, Vec<f32>)) -> ff_kernels::HeadMix<'_> {
            ff_kernels::HeadMix {
                weight: &m.0,
                bias: &m.1,
            }
        }
        attention_cpu_fwd(
            self.name(),
            storage,
            layout,
            self.n_heads,
            |qkv, shape, out| {
                ff_kernels::talking_heads_attention(
                    qkv,
                    shape,
                    self.scale as f32,
                    mix(&self.before),
                    mix(&self.after),
                    out,
                )
            },
        )
    }
}

/// timm's `LayerScaleBlock`: pre-norm attention and MLP, each scaled per
/// channel by a learned `gamma` before joining the residual.
#[derive(Debug, Clone)]
struct LayerScaleBlock {
    norm1: Norm,
    attn: TalkingHeadAttn,
    gamma_1: Tensor,
    norm2: Norm,
    mlp: Mlp,
    gamma_2: Tensor,
}

impl LayerScaleBlock {
    fn new(cfg: &VitConfig, vb: VarBuilder) -> Result<Self> {
        let dim = cfg.embed_dim;
        let hidden = (dim as f64 * cfg.mlp_ratio) as usize;
        Ok(Self {
            norm1: layer_norm(dim, vb.pp("norm1"))?,
            attn: TalkingHeadAttn::new(dim, cfg.n_heads, vb.pp("attn"))?,
            gamma_1: get_checked(&vb, dim, "gamma_1")?,
            norm2: layer_norm(dim, vb.pp("norm2"))?,
            mlp: Mlp::new(dim, hidden, vb.pp("mlp"))?,
            gamma_2: get_checked(&vb, dim, "gamma_2")?,
        })
    }

    /// # Shapes
    /// `x`: [b, n, c] -> [b, n, c].
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let attn = self.attn.forward(&self.norm1.forward(x)?)?;
        let x = (x + attn.broadcast_mul(&self.gamma_1)?)?;
        let mlp = self.mlp.forward(&self.norm2.forward(&x)?)?;
        &x + mlp.broadcast_mul(&self.gamma_2)?
    }
}

/// The frozen CaiT trunk FastFlow extracts features from.
#[derive(Debug, Clone)]
pub struct Cait {
    cfg: VitConfig,
    patch_embed: PatchEmbed,
    pos_embed: Tensor,
    blocks: Vec<LayerScaleBlock>,
    norm: Norm,
}

impl Cait {
    /// Builds `cait_m48_448` (blocks 0..40) from timm 0.5.4 keys under `vb`.
    pub fn new(vb: VarBuilder) -> Result<Self> {
        Self::with_config(&VitConfig::cait_m48_448(), vb)
    }

    /// Builds the trunk described by `cfg`, loading `patch_embed.proj`,
    /// `pos_embed`, `blocks.{0..n_blocks_used}` and `norm`.
    pub fn with_config(cfg: &VitConfig, vb: VarBuilder) -> Result<Self> {
        check_config(
            "CaiT",
            cfg.embed_dim,
            cfg.n_heads,
            cfg.patch,
            cfg.img_size,
            cfg.n_blocks_used,
            cfg.depth,
        )?;
        let c = cfg.embed_dim;
        let n_tokens = cfg.grid() * cfg.grid();
        let blocks = load_blocks(cfg.n_blocks_used, &vb, |vb| LayerScaleBlock::new(cfg, vb))?;
        Ok(Self {
            cfg: cfg.clone(),
            patch_embed: PatchEmbed::new(c, cfg.patch, vb.pp("patch_embed"))?,
            pos_embed: get_checked(&vb, (1, n_tokens, c), "pos_embed")?,
            blocks,
            norm: layer_norm(c, vb.pp("norm"))?,
        })
    }

    /// The configuration this trunk was built with.
    pub fn config(&self) -> &VitConfig {
        &self.cfg
    }

    /// The feature map FastFlow's flow consumes, exactly as the reference's
    /// CaiT branch computes it.
    ///
    /// # Shapes
    /// `x`: [b, 3, img_size, img_size] (ImageNet-normalised) ->
    /// [b, embed_dim, img_size / patch, img_size / patch].
    pub fn features(&self, x: &Tensor) -> Result<Tensor> {
        check_input(x, self.cfg.img_size, "CaiT")?;
        let mut tokens = self
            .patch_embed
            .forward(x)?
            .broadcast_add(&self.pos_embed)?; // [b, n, c]
        for block in &self.blocks {
            tokens = block.forward(&tokens)?;
        }
        let tokens = self.norm.forward(&tokens)?;
        Ok(tokens_to_map(&tokens, self.cfg.grid(), self.cfg.grid())?)
    }
}
