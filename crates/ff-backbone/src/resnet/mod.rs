//! ResNet18 and WideResNet50-2 feature extractors: the outputs of layer1,
//! layer2 and layer3, exactly as timm 0.5.4
//! `create_model(name, features_only=True, out_indices=[1, 2, 3])` in eval mode.
//!
//! Parameter paths equal timm's state-dict keys (`conv1`, `bn1`,
//! `layerN.i.{conv1,bn1,conv2,bn2,conv3,bn3,downsample.0,downsample.1}`), so a
//! hub `model.safetensors` loads as it is; its `layer4.*` and `fc.*` tensors
//! are never asked for. Eval-mode BatchNorm is an affine map per channel, so it
//! is folded into the preceding convolution when the weights are loaded:
//! `w' = w * gamma / sqrt(var + eps)`, `b' = beta - mean * gamma / sqrt(var + eps)`.
//! That is exact up to float rounding and saves a full pass over every
//! activation.
//!
//! On the CPU in f32 the whole network runs channels-last on ff-kernels:
//! weights packed once at load, bias + ReLU and the residual add fused into
//! each convolution's epilogue, the 1x1 stride-2 downsample on the same
//! kernel. Other devices and dtypes, and `FASTFLOW_KERNELS=generic`, take
//! candle's operations.

mod init;
pub use init::resnet_random_value;

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Conv2d, Conv2dConfig, VarBuilder};
use ff_kernels::{Activation, ConvGeometry, Epilogue, NhwcMut, NhwcRef, PackedConv2d, Route};

use crate::checked::get_checked;
use crate::error::{Error, Result};
use crate::kind::BackboneKind;

/// PyTorch `BatchNorm2d`'s default epsilon, used by timm's ResNets.
const BN_EPS: f64 = 1e-5;

/// The three feature maps FastFlow takes from a CNN backbone.
#[derive(Debug, Clone)]
pub struct ResNetFeatures {
    /// Stride 4: `[b, 64, h/4, w/4]` (resnet18) or `[b, 256, h/4, w/4]` (wide_resnet50_2).
    pub layer1: Tensor,
    /// Stride 8: `[b, 128, h/8, w/8]` or `[b, 512, h/8, w/8]`.
    pub layer2: Tensor,
    /// Stride 16: `[b, 256, h/16, w/16]` or `[b, 1024, h/16, w/16]`.
    pub layer3: Tensor,
}

impl ResNetFeatures {
    /// The feature maps in stride order (layer1, layer2, layer3).
    ///
    /// # Shapes
    /// -> `[[b, C1, h/4, w/4], [b, C2, h/8, w/8], [b, C3, h/16, w/16]]`.
    pub fn into_scales(self) -> Vec<Tensor> {
        vec![self.layer1, self.layer2, self.layer3]
    }
}

/// A convolution (no bias in timm) followed by eval-mode BatchNorm, folded
/// into one convolution with bias.
#[derive(Debug, Clone)]
struct ConvBn {
    conv: Conv2d,
    /// The same folded weights packed for ff-kernels (CPU, f32 only).
    packed: Option<PackedConv2d>,
}

/// The geometry of one convolution.
#[derive(Debug, Clone, Copy)]
struct ConvSpec {
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
}

impl ConvBn {
    /// Loads `conv_name.weight` and the four tensors of `bn_name` from `vb`
    /// and folds them.
    fn load(vb: &VarBuilder, conv_name: &str, bn_name: &str, spec: ConvSpec) -> Result<Self> {
        let c = spec.out_channels;
        let weight = get_checked(
            &vb.pp(conv_name),
            (c, spec.in_channels, spec.kernel, spec.kernel),
            "weight",
        )?;
        let bn = vb.pp(bn_name);
        let gamma = get_checked(&bn, c, "weight")?;
        let beta = get_checked(&bn, c, "bias")?;
        let mean = get_checked(&bn, c, "running_mean")?;
        let var = get_checked(&bn, c, "running_var")?;
        // Fold in f64 so that the folded weights carry no more rounding than
        // one final cast to the compute dtype.
        let dtype = weight.dtype();
        let scale = gamma
            .to_dtype(DType::F64)?
            .div(&(var.to_dtype(DType::F64)? + BN_EPS)?.sqrt()?)?; // [c]
        let folded_w = weight
            .to_dtype(DType::F64)?
            .broadcast_mul(&scale.reshape((c, 1, 1, 1))?)?
            .to_dtype(dtype)?;
        let folded_b = beta
            .to_dtype(DType::F64)?
            .sub(&mean.to_dtype(DType::F64)?.mul(&scale)?)?
            .to_dtype(dtype)?;
        let cfg = Conv2dConfig {
            padding: spec.padding,
            stride: spec.stride,
            ..Default::default()
        };
        let packed = if folded_w.device().is_cpu() && dtype == DType::F32 {
            let geometry = ConvGeometry {
                in_channels: spec.in_channels,
                out_channels: c,
                kernel: spec.kernel,
                stride: spec.stride,
                padding: spec.padding,
            };
            let w = folded_w.flatten_all()?.to_vec1::<f32>()?;
            let b = folded_b.to_vec1::<f32>()?;
            Some(PackedConv2d::from_oihw(geometry, None, &w, Some(&b))?)
        } else {
            None
        };
        Ok(Self {
            conv: Conv2d::new(folded_w, Some(folded_b), cfg),
            packed,
        })
    }

    /// The channels-last forward on ff-kernels: `act(conv(x) + residual)`.
    ///
    /// # Shapes
    /// `x`: `[b, h, w, in]` -> `[b, h', w', out]`; `residual`: `[b, h', w', out]`.
    fn forward_nhwc(&self, x: &Map, residual: Option<&Map>, activation: Activation) -> Result<Map> {
        let packed = self.packed.as_ref().ok_or_else(|| Error::Config {
            message: "the channels-last ResNet needs CPU f32 weights".to_string(),
        })?;
        let g = packed.geometry();
        let [b, h, w, _] = x.dims;
        let (oh, ow) = g.output_size(h, w).ok_or_else(|| Error::InputShape {
            found: x.dims.to_vec(),
            message: format!(
                "a {h}x{w} map is too small for a {0}x{0} convolution",
                g.kernel
            ),
        })?;
        let dims = [b, oh, ow, g.out_channels];
        let mut out = Map::zeros(dims);
        let residual = residual
            .map(|r| NhwcRef::new(&r.data, r.dims))
            .transpose()?;
        ff_kernels::conv2d(
            packed,
            NhwcRef::new(&x.data, x.dims)?,
            Activation::Identity,
            Epilogue {
                residual,
                activation,
            },
            NhwcMut::new(&mut out.data, dims)?,
        )?;
        Ok(out)
    }

    /// # Shapes
    /// `[b, in, h, w]` -> `[b, out, h', w']` with `h' = (h + 2p - k) / s + 1`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.conv.forward(x)?)
    }
}

/// timm's `BasicBlock` (resnet18): two 3x3 convolutions, stride on the first.
#[derive(Debug, Clone)]
struct BasicBlock {
    conv_bn1: ConvBn,
    conv_bn2: ConvBn,
    downsample: Option<ConvBn>,
}

/// timm's `Bottleneck` (wide_resnet50_2): 1x1 reduce, 3x3 with the stride,
/// 1x1 expand.
#[derive(Debug, Clone)]
struct Bottleneck {
    conv_bn1: ConvBn,
    conv_bn2: ConvBn,
    conv_bn3: ConvBn,
    downsample: Option<ConvBn>,
}

#[derive(Debug, Clone)]
enum Block {
    Basic(BasicBlock),
    Bottleneck(Bottleneck),
}

impl Block {
    /// [`Block::forward`] channels-last on ff-kernels, the final ReLU and the
    /// residual add fused into the last convolution.
    ///
    /// # Shapes
    /// `[b, h, w, in]` -> `[b, h / stride, w / stride, planes * expansion]`.
    fn forward_nhwc(&self, x: &Map) -> Result<Map> {
        let (last_input, last, downsample) = match self {
            Block::Basic(b) => (
                b.conv_bn1.forward_nhwc(x, None, Activation::Relu)?,
                &b.conv_bn2,
                &b.downsample,
            ),
            Block::Bottleneck(b) => {
                let out = b.conv_bn1.forward_nhwc(x, None, Activation::Relu)?;
                (
                    b.conv_bn2.forward_nhwc(&out, None, Activation::Relu)?,
                    &b.conv_bn3,
                    &b.downsample,
                )
            }
        };
        match downsample {
            Some(d) => {
                let shortcut = d.forward_nhwc(x, None, Activation::Identity)?;
                last.forward_nhwc(&last_input, Some(&shortcut), Activation::Relu)
            }
            None => last.forward_nhwc(&last_input, Some(x), Activation::Relu),
        }
    }

    fn is_packed(&self) -> bool {
        let convs: Vec<&ConvBn> = match self {
            Block::Basic(b) => [Some(&b.conv_bn1), Some(&b.conv_bn2), b.downsample.as_ref()]
                .into_iter()
                .flatten()
                .collect(),
            Block::Bottleneck(b) => [
                Some(&b.conv_bn1),
                Some(&b.conv_bn2),
                Some(&b.conv_bn3),
                b.downsample.as_ref(),
            ]
            .into_iter()
            .flatten()
            .collect(),
        };
        convs.iter().all(|c| c.packed.is_some())
    }

    /// # Shapes
    /// `[b, in, h, w]` -> `[b, planes * expansion, h / stride, w / stride]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (out, downsample) = match self {
            Block::Basic(b) => {
                let out = b.conv_bn1.forward(x)?.relu()?;
                (b.conv_bn2.forward(&out)?, &b.downsample)
            }
            Block::Bottleneck(b) => {
                let out = b.conv_bn1.forward(x)?.relu()?;
                let out = b.conv_bn2.forward(&out)?.relu()?;
                (b.conv_bn3.forward(&out)?, &b.downsample)
            }
        };
        let shortcut = match downsample {
            Some(d) => d.forward(x)?,
            None => x.clone(),
        };
        Ok((out + shortcut)?.relu()?)
    }
}

/// The block type and widths of one ResNet variant.
#[derive(Debug, Clone, Copy)]
struct ResNetSpec {
    bottleneck: bool,
    /// Blocks in layer1..layer3 (layer4 is never built).
    depths: [usize; 3],
    /// timm's `base_width`: 64 for ResNets, 128 for wide_resnet50_2.
    base_width: usize,
}

impl ResNetSpec {
    fn expansion(&self) -> usize {
        if self.bottleneck {
            4
        } else {
            1
        }
    }
}

/// A frozen timm ResNet truncated after layer3.
#[derive(Debug, Clone)]
pub struct ResNet {
    kind: BackboneKind,
    stem: ConvBn,
    layers: [Vec<Block>; 3],
}

impl ResNet {
    /// timm `resnet18`: BasicBlocks [2, 2, 2] in layers 1-3.
    pub fn resnet18(vb: VarBuilder) -> Result<Self> {
        let spec = ResNetSpec {
            bottleneck: false,
            depths: [2, 2, 2],
            base_width: 64,
        };
        Self::build(BackboneKind::ResNet18, spec, &vb)
    }

    /// timm `wide_resnet50_2`: Bottlenecks [3, 4, 6] in layers 1-3 with base width 128.
    pub fn wide_resnet50_2(vb: VarBuilder) -> Result<Self> {
        let spec = ResNetSpec {
            bottleneck: true,
            depths: [3, 4, 6],
            base_width: 128,
        };
        Self::build(BackboneKind::WideResNet50_2, spec, &vb)
    }

    /// Which of the two ResNets this is.
    pub fn kind(&self) -> BackboneKind {
        self.kind
    }

    fn build(kind: BackboneKind, spec: ResNetSpec, vb: &VarBuilder) -> Result<Self> {
        let stem = ConvBn::load(
            vb,
            "conv1",
            "bn1",
            ConvSpec {
                in_channels: 3,
                out_channels: 64,
                kernel: 7,
                stride: 2,
                padding: 3,
            },
        )?;
        let mut inplanes = 64;
        let mut layers: [Vec<Block>; 3] = Default::default();
        for (idx, layer) in layers.iter_mut().enumerate() {
            let planes = 64 << idx;
            let stride = if idx == 0 { 1 } else { 2 };
            let vb_layer = vb.pp(format!("layer{}", idx + 1));
            for block_idx in 0..spec.depths[idx] {
                let block_stride = if block_idx == 0 { stride } else { 1 };
                let block = load_block(
                    &vb_layer.pp(block_idx),
                    spec,
                    inplanes,
                    planes,
                    block_stride,
                )?;
                inplanes = planes * spec.expansion();
                layer.push(block);
            }
        }
        Ok(Self { kind, stem, layers })
    }

    /// The outputs of layer1, layer2 and layer3 for a normalized RGB batch.
    ///
    /// # Shapes
    /// `x`: `[b, 3, h, w]` -> layer1 `[b, c1, ceil(h/4), ..]`, layer2
    /// `[b, c2, ceil(h/8), ..]`, layer3 `[b, c3, ceil(h/16), ..]` with
    /// `(c1, c2, c3)` = (64, 128, 256) for resnet18 and (256, 512, 1024) for
    /// wide_resnet50_2 (exact for `h`, `w` multiples of 16, PyTorch's
    /// convolution arithmetic otherwise).
    pub fn features(&self, x: &Tensor) -> Result<ResNetFeatures> {
        let dims = x.dims();
        if dims.len() != 4 || dims[1] != 3 {
            return Err(Error::InputShape {
                found: dims.to_vec(),
                message: "expected a batch of RGB images [b, 3, h, w]".to_string(),
            });
        }
        if dims[2] < 32 || dims[3] < 32 {
            return Err(Error::InputShape {
                found: dims.to_vec(),
                message: "images must be at least 32x32 pixels".to_string(),
            });
        }
        let kernels = x.device().is_cpu()
            && x.dtype() == DType::F32
            && Route::current() == Route::Kernels
            && self.stem.packed.is_some()
            && self.layers.iter().flatten().all(Block::is_packed);
        if kernels {
            return self.features_nhwc(x);
        }
        let x = self.stem.forward(x)?.relu()?; // [b, 64, h/2, w/2]
        let x = max_pool_3x3_s2_p1(&x)?; // [b, 64, h/4, w/4]
        let mut x = x;
        let mut run_layer = |layer: &[Block]| -> Result<Tensor> {
            for block in layer {
                x = block.forward(&x)?;
            }
            Ok(x.clone())
        };
        let [l1, l2, l3] = &self.layers;
        Ok(ResNetFeatures {
            layer1: run_layer(l1)?,
            layer2: run_layer(l2)?,
            layer3: run_layer(l3)?,
        })
    }
}

impl ResNet {
    /// [`ResNet::features`] channels-last on ff-kernels (CPU, f32).
    fn features_nhwc(&self, x: &Tensor) -> Result<ResNetFeatures> {
        let (b, c, h, w) = x.dims4()?;
        let input = Map {
            data: x.permute((0, 2, 3, 1))?.flatten_all()?.to_vec1::<f32>()?,
            dims: [b, h, w, c],
        };
        let x = self.stem.forward_nhwc(&input, None, Activation::Relu)?; // [b, h/2, w/2, 64]
        let [_, sh, sw, sc] = x.dims;
        let pooled_dims = [b, (sh - 1) / 2 + 1, (sw - 1) / 2 + 1, sc];
        let pooled = {
            let mut out = Map::zeros(pooled_dims);
            ff_kernels::max_pool2d(
                NhwcRef::new(&x.data, x.dims)?,
                3,
                2,
                1,
                NhwcMut::new(&mut out.data, pooled_dims)?,
            )?;
            out
        };
        // Each layer's output is kept (it is a feature map) and read in
        // place by the next layer.
        let run_layer = |layer: &[Block], input: &Map| -> Result<Map> {
            let mut blocks = layer.iter();
            let mut x = match blocks.next() {
                Some(first) => first.forward_nhwc(input)?,
                None => input.clone(),
            };
            for block in blocks {
                x = block.forward_nhwc(&x)?;
            }
            Ok(x)
        };
        let [l1, l2, l3] = &self.layers;
        let m1 = run_layer(l1, &pooled)?;
        let m2 = run_layer(l2, &m1)?;
        let m3 = run_layer(l3, &m2)?;
        Ok(ResNetFeatures {
            layer1: m1.into_nchw_view(&Device::Cpu)?,
            layer2: m2.into_nchw_view(&Device::Cpu)?,
            layer3: m3.into_nchw_view(&Device::Cpu)?,
        })
    }
}

/// A channels-last feature map on the CPU: `data` is `[b, h, w, c]`.
#[derive(Clone)]
struct Map {
    data: Vec<f32>,
    dims: [usize; 4],
}

impl Map {
    fn zeros(dims: [usize; 4]) -> Self {
        Self {
            data: ff_kernels::zeroed(dims.iter().product()),
            dims,
        }
    }

    /// The map as a `[b, c, h, w]` tensor over its channels-last storage
    /// (a permuted view: no copy; the flows' LayerNorm reads it as it is).
    fn into_nchw_view(self, device: &Device) -> Result<Tensor> {
        let [b, h, w, c] = self.dims;
        Ok(Tensor::from_vec(self.data, (b, h, w, c), device)?.permute((0, 3, 1, 2))?)
    }
}

/// Loads block `vb` (`layerN.i`) of a ResNet with `spec`.
fn load_block(
    vb: &VarBuilder,
    spec: ResNetSpec,
    inplanes: usize,
    planes: usize,
    stride: usize,
) -> Result<Block> {
    let outplanes = planes * spec.expansion();
    // timm's make_blocks adds a 1x1 projection whenever the shape changes.
    let downsample = if stride != 1 || inplanes != outplanes {
        Some(ConvBn::load(
            vb,
            "downsample.0",
            "downsample.1",
            ConvSpec {
                in_channels: inplanes,
                out_channels: outplanes,
                kernel: 1,
                stride,
                padding: 0,
            },
        )?)
    } else {
        None
    };
    let conv = |i: usize, o: usize, k: usize, s: usize| ConvSpec {
        in_channels: i,
        out_channels: o,
        kernel: k,
        stride: s,
        padding: k / 2,
    };
    if spec.bottleneck {
        let width = planes * spec.base_width / 64;
        Ok(Block::Bottleneck(Bottleneck {
            conv_bn1: ConvBn::load(vb, "conv1", "bn1", conv(inplanes, width, 1, 1))?,
            conv_bn2: ConvBn::load(vb, "conv2", "bn2", conv(width, width, 3, stride))?,
            conv_bn3: ConvBn::load(vb, "conv3", "bn3", conv(width, outplanes, 1, 1))?,
            downsample,
        }))
    } else {
        Ok(Block::Basic(BasicBlock {
            conv_bn1: ConvBn::load(vb, "conv1", "bn1", conv(inplanes, planes, 3, stride))?,
            conv_bn2: ConvBn::load(vb, "conv2", "bn2", conv(planes, planes, 3, 1))?,
            downsample,
        }))
    }
}

/// timm's stem max-pool: kernel 3, stride 2, padding 1.
///
/// It follows a ReLU, so every window holds at least one real value >= 0 and
/// zero padding gives the same maximum as PyTorch's implicit -inf padding.
///
/// # Shapes
/// `[b, c, h, w]` -> `[b, c, (h - 1) / 2 + 1, (w - 1) / 2 + 1]`.
fn max_pool_3x3_s2_p1(x: &Tensor) -> Result<Tensor> {
    let padded = x
        .pad_with_zeros(D::Minus2, 1, 1)?
        .pad_with_zeros(D::Minus1, 1, 1)?;
    Ok(padded.max_pool2d_with_stride(3, 2)?)
}
