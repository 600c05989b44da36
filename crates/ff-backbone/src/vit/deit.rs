//! DeiT-base-distilled-384 feature extractor (timm `deit_base_distilled_patch16_384`).
//!
//! FastFlow uses the trunk only: patch embedding, the cls and distillation
//! tokens, the position embedding, the first 8 of 12 blocks and the final
//! norm; the two tokens are dropped and the patch tokens become a 768-channel
//! map at stride 16. Blocks 8..11 and the heads are never built or loaded.

use super::VitConfig;
use candle_core::Tensor;
use candle_nn::VarBuilder;

use crate::checked::get_checked;
use crate::error::Result;

use super::{
    check_config, check_input, layer_norm, load_blocks, multi_head_attention, tokens_to_map,
    Linear, Mlp, Norm, PatchEmbed,
};

/// timm's ViT `Attention`: fused qkv, scaled dot-product softmax, output projection.
#[derive(Debug, Clone)]
struct Attention {
    qkv: Linear,
    proj: Linear,
    n_heads: usize,
    scale: f64,
}

impl Attention {
    fn new(dim: usize, n_heads: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            qkv: Linear::new(dim, 3 * dim, vb.pp("qkv"))?,
            proj: Linear::new(dim, dim, vb.pp("proj"))?,
            n_heads,
            scale: ((dim / n_heads) as f64).powf(-0.5),
        })
    }

    /// # Shapes
    /// `x`: [b, n, c] -> [b, n, c].
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let qkv = self.qkv.forward(x)?; // [b, n, 3 c]
        self.proj
            .forward(&multi_head_attention(&qkv, self.n_heads, self.scale)?)
    }
}

/// timm's ViT `Block`: pre-norm attention and MLP, each added to the residual.
#[derive(Debug, Clone)]
struct Block {
    norm1: Norm,
    attn: Attention,
    norm2: Norm,
    mlp: Mlp,
}

impl Block {
    fn new(cfg: &VitConfig, vb: VarBuilder) -> Result<Self> {
        let dim = cfg.embed_dim;
        let hidden = (dim as f64 * cfg.mlp_ratio) as usize;
        Ok(Self {
            norm1: layer_norm(dim, vb.pp("norm1"))?,
            attn: Attention::new(dim, cfg.n_heads, vb.pp("attn"))?,
            norm2: layer_norm(dim, vb.pp("norm2"))?,
            mlp: Mlp::new(dim, hidden, vb.pp("mlp"))?,
        })
    }

    /// # Shapes
    /// `x`: [b, n, c] -> [b, n, c].
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = (x + self.attn.forward(&self.norm1.forward(x)?)?)?;
        &x + self.mlp.forward(&self.norm2.forward(&x)?)?
    }
}

/// The frozen DeiT trunk FastFlow extracts features from.
#[derive(Debug, Clone)]
pub struct Deit {
    cfg: VitConfig,
    patch_embed: PatchEmbed,
    cls_token: Tensor,
    dist_token: Tensor,
    pos_embed: Tensor,
    blocks: Vec<Block>,
    norm: Norm,
}

impl Deit {
    /// Builds `deit_base_distilled_patch16_384` (blocks 0..7) from timm 0.5.4 keys under `vb`.
    pub fn new(vb: VarBuilder) -> Result<Self> {
        Self::with_config(&VitConfig::deit_base_distilled_384(), vb)
    }

    /// Builds the trunk described by `cfg`, loading `patch_embed.proj`,
    /// `cls_token`, `dist_token`, `pos_embed`, `blocks.{0..n_blocks_used}` and `norm`.
    pub fn with_config(cfg: &VitConfig, vb: VarBuilder) -> Result<Self> {
        check_config(
            "DeiT",
            cfg.embed_dim,
            cfg.n_heads,
            cfg.patch,
            cfg.img_size,
            cfg.n_blocks_used,
            cfg.depth,
        )?;
        let c = cfg.embed_dim;
        let n_tokens = cfg.grid() * cfg.grid() + 2;
        let blocks = load_blocks(cfg.n_blocks_used, &vb, |vb| Block::new(cfg, vb))?;
        Ok(Self {
            cfg: cfg.clone(),
            patch_embed: PatchEmbed::new(c, cfg.patch, vb.pp("patch_embed"))?,
            cls_token: get_checked(&vb, (1, 1, c), "cls_token")?,
            dist_token: get_checked(&vb, (1, 1, c), "dist_token")?,
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
    /// DeiT branch computes it.
    ///
    /// # Shapes
    /// `x`: [b, 3, img_size, img_size] (ImageNet-normalised) ->
    /// [b, embed_dim, img_size / patch, img_size / patch].
    pub fn features(&self, x: &Tensor) -> Result<Tensor> {
        check_input(x, self.cfg.img_size, "DeiT")?;
        let b = x.dim(0)?;
        let c = self.cfg.embed_dim;
        let patches = self.patch_embed.forward(x)?; // [b, n, c]
        let cls = self.cls_token.broadcast_as((b, 1, c))?;
        let dist = self.dist_token.broadcast_as((b, 1, c))?;
        let mut tokens =
            Tensor::cat(&[&cls, &dist, &patches], 1)?.broadcast_add(&self.pos_embed)?; // [b, n + 2, c]
        for block in &self.blocks {
            tokens = block.forward(&tokens)?;
        }
        let tokens = self.norm.forward(&tokens)?;
        let n = tokens.dim(1)?;
        let patch_tokens = tokens.narrow(1, 2, n - 2)?; // [b, n, c]
        Ok(tokens_to_map(
            &patch_tokens,
            self.cfg.grid(),
            self.cfg.grid(),
        )?)
    }
}
