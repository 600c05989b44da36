//! The FastFlow model: frozen backbone, trainable LayerNorms (CNNs only), one
//! 2D flow per feature scale; its loss and its anomaly map.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use ff_backbone::{Backbone, BackboneKind};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::config::{hidden_channels, FastFlowConfig};
use crate::coupling::Permutation;
use crate::error::{Error, Result};
use crate::flow::{Flow, FlowConfig};
use crate::norm::LayerNorm;
use crate::param::Param;

/// What the flows make of a batch: per scale, the latent and the log-determinant.
#[derive(Debug, Clone)]
pub struct FlowOutput {
    /// Per scale, `[b, C_i, h_i, w_i]`.
    pub z: Vec<Tensor>,
    /// Per scale, `[b]`: the log-determinant of the flow's Jacobian per image.
    pub log_det: Vec<Tensor>,
}

/// The reference loss: over scales, the sum of the batch mean of
/// `0.5 * sum_{c,h,w} z^2 - log_det` (no constant term, so it goes negative).
///
/// # Shapes
/// -> scalar `[]`.
pub fn loss(out: &FlowOutput) -> Result<Tensor> {
    total_loss(&scale_losses(out)?)
}

/// [`loss`] and its gradients with respect to every trainable tensor the
/// output depends on, as `loss(out)?.backward()` gives them, bit for bit.
///
/// The scales' graphs share nothing, so each scale's loss is differentiated
/// on its own: on the CPU the three backward passes run side by side, and
/// the small or sequential operations of one fill the cores while another
/// waits (as the forward pass does). Each scale's gradients are the same
/// operations in the same order as in one backward pass over the sum, whose
/// gradient with respect to every term is exactly 1.
///
/// # Shapes
/// -> scalar `[]` loss.
pub fn loss_and_grads(out: &FlowOutput) -> Result<(Tensor, GradStore)> {
    let per_scale = scale_losses(out)?;
    let total = total_loss(&per_scale)?;
    let on_cpu = per_scale.iter().all(|l| l.device().is_cpu());
    let stores: Vec<candle_core::Result<GradStore>> = if on_cpu {
        per_scale.par_iter().map(Tensor::backward).collect()
    } else {
        per_scale.iter().map(Tensor::backward).collect()
    };
    let mut stores = stores.into_iter();
    let mut grads = stores.next().ok_or_else(unreachable_empty)??;
    for store in stores {
        grads.extend(store?)?;
    }
    Ok((total, grads))
}

/// Per scale, the batch mean of `0.5 * sum_{c,h,w} z^2 - log_det`.
fn scale_losses(out: &FlowOutput) -> Result<Vec<Tensor>> {
    if out.z.len() != out.log_det.len() || out.z.is_empty() {
        return Err(Error::InputShape {
            what: "flow output scales (z vs log_det)",
            expected: format!("{} non-empty", out.z.len()),
            found: out.log_det.len().to_string(),
        });
    }
    out.z
        .iter()
        .zip(&out.log_det)
        .map(|(z, log_det)| {
            // Channels-last order first: on the CPU route `z` is a view of
            // channels-last storage, which candle then walks in contiguous
            // channel runs rather than element by element.
            let half_sq = (z.permute((0, 2, 3, 1))?.sqr()?.flatten_from(1)?.sum(1)? * 0.5)?; // [b]
            Ok((half_sq - log_det)?.mean(0)?)
        })
        .collect()
}

/// The scales' losses summed in order.
fn total_loss(per_scale: &[Tensor]) -> Result<Tensor> {
    let (first, rest) = per_scale.split_first().ok_or_else(unreachable_empty)?;
    let mut total = first.clone();
    for l in rest {
        total = (total + l)?;
    }
    Ok(total)
}

fn unreachable_empty() -> Error {
    Error::InputShape {
        what: "flow output scales",
        expected: "at least 1".into(),
        found: "0".into(),
    }
}

/// The anomaly map: per scale `-exp(-0.5 * mean_c z^2)`, bilinearly upsampled
/// (align_corners = false) to `input_size`, averaged over scales. Higher
/// (closer to 0) is more anomalous.
///
/// # Shapes
/// -> `[b, 1, input_size, input_size]`.
pub fn anomaly_map(out: &FlowOutput, input_size: usize) -> Result<Tensor> {
    let mut sum: Option<Tensor> = None;
    for z in &out.z {
        // The channel mean over the last dimension of a channels-last view
        // (the flows' own layout on the CPU), a contiguous reduction.
        let (b, _, h, w) = z.dims4()?;
        // [b, h, w, 1]
        let log_prob = (z.permute((0, 2, 3, 1))?.sqr()?.mean_keepdim(3)? * -0.5)?;
        // candle's bilinear upsampling misreads strided views, so the map is
        // contiguous (and [b, 1, h, w] has the same order as [b, h, w, 1]).
        let neg_prob = log_prob.exp()?.neg()?.reshape((b, 1, h, w))?;
        let up = neg_prob.upsample_bilinear2d(input_size, input_size, false)?;
        sum = Some(match sum {
            None => up,
            Some(s) => (s + up)?,
        });
    }
    let sum = sum.ok_or_else(unreachable_empty)?;
    Ok((sum / out.z.len() as f64)?)
}

/// Image scores: the maximum of each image's anomaly map.
///
/// # Shapes
/// `map`: `[b, 1, S, S]` -> `[b]`.
pub fn image_scores(map: &Tensor) -> Result<Tensor> {
    Ok(map.flatten_from(1)?.max(1)?)
}

/// The per-seed random channel permutations, one per (scale, step), drawn in
/// that order from a ChaCha8 stream seeded with `seed`.
pub fn draw_permutations(
    channels: &[usize],
    n_steps: usize,
    seed: u64,
    device: &Device,
) -> Result<Vec<Vec<Permutation>>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    channels
        .iter()
        .enumerate()
        .map(|(i, &c)| {
            (0..n_steps)
                .map(|k| {
                    let mut perm: Vec<u32> = (0..c as u32).collect();
                    perm.shuffle(&mut rng);
                    Permutation::new(
                        perm,
                        device,
                        &format!("nf_flows.{i}.module_list.{k}.w_perm"),
                    )
                })
                .collect()
        })
        .collect()
}

/// Whether each scale's features pass through a trainable LayerNorm before
/// its flow: the reference does so for CNN features, not for transformers'.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureNorms {
    /// A LayerNorm over `[C, h, w]` per scale (keys `norms.{i}.*`).
    LayerNorm,
    /// Features go to the flows as they are.
    None,
}

/// Which forward pass [`FastFlowHead`] runs: inference keeps nothing for a
/// backward pass, training runs each flow as one op that does.
#[derive(Debug, Clone, Copy)]
enum Pass {
    Inference,
    Training,
}

/// The trainable part of FastFlow: LayerNorms (CNN features only) and one
/// flow per scale. Knows nothing about images or backbones: it maps feature
/// maps of known shapes to latents.
#[derive(Debug, Clone)]
pub struct FastFlowHead {
    feature_shapes: Vec<[usize; 3]>,
    input_size: usize,
    norms: Vec<LayerNorm>,
    flows: Vec<Flow>,
}

impl FastFlowHead {
    /// Builds norms (with [`FeatureNorms::LayerNorm`]) and flows for features of
    /// `feature_shapes` (`[C, h, w]` per scale) at the root of `vb`
    /// (keys `norms.{i}.*`, `nf_flows.{i}.module_list.{k}.*`). Permutations
    /// and new parameters are drawn from `seed`.
    pub fn new(
        cfg: &FastFlowConfig,
        feature_shapes: Vec<[usize; 3]>,
        norms: FeatureNorms,
        seed: u64,
        vb: VarBuilder,
    ) -> Result<Self> {
        let channels: Vec<usize> = feature_shapes.iter().map(|s| s[0]).collect();
        let perms = draw_permutations(&channels, cfg.flow_step, seed, vb.device())?;
        // Parameter init uses a second stream of the same seed, so the
        // permutations do not depend on how many parameters are new.
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(1);
        let norms = if norms == FeatureNorms::LayerNorm {
            feature_shapes
                .iter()
                .enumerate()
                .map(|(i, &shape)| LayerNorm::new(shape, vb.pp("norms").pp(i), &mut rng))
                .collect::<Result<Vec<_>>>()?
        } else {
            Vec::new()
        };
        let flows = feature_shapes
            .iter()
            .zip(perms)
            .enumerate()
            .map(|(i, (shape, perms))| {
                let flow_cfg = FlowConfig {
                    channels: shape[0],
                    hidden_channels: hidden_channels(shape[0], cfg.hidden_ratio),
                    n_steps: cfg.flow_step,
                    conv3x3_only: cfg.conv3x3_only,
                };
                Flow::new(flow_cfg, perms, vb.pp("nf_flows").pp(i), &mut rng)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            feature_shapes,
            input_size: cfg.input_size,
            norms,
            flows,
        })
    }

    /// The `[C, h, w]` of each scale's features.
    pub fn feature_shapes(&self) -> &[[usize; 3]] {
        &self.feature_shapes
    }

    /// The flows, one per scale.
    pub fn flows(&self) -> &[Flow] {
        &self.flows
    }

    /// The LayerNorms, one per scale (empty for transformer backbones).
    pub fn norms(&self) -> &[LayerNorm] {
        &self.norms
    }

    /// All trainable tensors in the reference's `state_dict` order (norms,
    /// then flows).
    pub fn params(&self) -> Vec<&Param> {
        let mut out: Vec<&Param> = self.norms.iter().flat_map(|n| n.params()).collect();
        for flow in &self.flows {
            for step in flow.steps() {
                out.extend(step.params());
            }
        }
        out
    }

    /// The trainable `Var`s with their keys, for the optimizer.
    pub fn trainable_vars(&self) -> Result<Vec<(String, Var)>> {
        self.params()
            .into_iter()
            .map(|p| Ok((p.key.clone(), p.var()?)))
            .collect()
    }

    /// The non-trainable buffers: every step's `w_perm` and `w_perm_inv`
    /// (`[C, C, 1, 1]` hard permutation matrices, as in the reference).
    pub fn buffers(&self) -> Result<HashMap<String, Tensor>> {
        let dtype = self
            .params()
            .first()
            .map(|p| p.tensor.dtype())
            .unwrap_or(DType::F32);
        let mut out = HashMap::new();
        for flow in &self.flows {
            for step in flow.steps() {
                let prefix = step.key_prefix();
                let perm = step.permutation();
                out.insert(format!("{prefix}.w_perm"), perm.matrix(dtype)?);
                out.insert(format!("{prefix}.w_perm_inv"), perm.inverse_matrix(dtype)?);
            }
        }
        Ok(out)
    }

    /// Trainable tensors and buffers under their reference keys.
    pub fn state_dict(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = self.buffers()?;
        for p in self.params() {
            out.insert(p.key.clone(), p.tensor.clone());
        }
        Ok(out)
    }

    /// Loads a state dict (reference keys, no `feature_extractor.*`): every
    /// trainable tensor and every permutation. Checks every key and shape
    /// before changing anything; extra keys are an error.
    pub fn load_state_dict(&mut self, sd: &HashMap<String, Tensor>) -> Result<()> {
        let mut expected: HashMap<String, Vec<usize>> = HashMap::new();
        for p in self.params() {
            expected.insert(p.key.clone(), p.tensor.dims().to_vec());
        }
        for flow in &self.flows {
            let c = flow.config().channels;
            for step in flow.steps() {
                for name in ["w_perm", "w_perm_inv"] {
                    expected.insert(format!("{}.{name}", step.key_prefix()), vec![c, c, 1, 1]);
                }
            }
        }
        let mut unexpected: Vec<String> = sd
            .keys()
            .filter(|k| !expected.contains_key(*k))
            .cloned()
            .collect();
        if !unexpected.is_empty() {
            unexpected.sort();
            return Err(Error::UnexpectedTensors { keys: unexpected });
        }
        let mut keys: Vec<&String> = expected.keys().collect();
        keys.sort();
        for key in keys {
            let shape = &expected[key];
            let t = sd.get(key).ok_or_else(|| Error::MissingTensor {
                key: key.clone(),
                expected: shape.clone(),
            })?;
            if t.dims() != shape.as_slice() {
                return Err(Error::ShapeMismatch {
                    key: key.clone(),
                    expected: shape.clone(),
                    found: t.dims().to_vec(),
                });
            }
        }
        // Permutations are parsed (and validated) before any tensor changes.
        let mut perms = Vec::new();
        for flow in &self.flows {
            let c = flow.config().channels;
            let mut flow_perms = Vec::new();
            for step in flow.steps() {
                let key = format!("{}.w_perm", step.key_prefix());
                let inv_key = format!("{}.w_perm_inv", step.key_prefix());
                let mut p = Permutation::from_matrices(&sd[&key], Some(&sd[&inv_key]), c, &key)?;
                // The index tensor must live where the model runs.
                let device = step.params()[0].tensor.device().clone();
                p = Permutation::new(p.indices().to_vec(), &device, &key)?;
                flow_perms.push(p);
            }
            perms.push(flow_perms);
        }
        for p in self.params() {
            let src = sd[&p.key]
                .to_dtype(p.tensor.dtype())?
                .to_device(p.tensor.device())?;
            p.var()?.set(&src)?;
        }
        for (flow, flow_perms) in self.flows.iter_mut().zip(perms) {
            for (step, perm) in flow.steps_mut().iter_mut().zip(flow_perms) {
                step.set_permutation(perm)?;
            }
        }
        Ok(())
    }

    /// Runs norms and flows on backbone features.
    ///
    /// # Shapes
    /// `features`: one `[b, C_i, h_i, w_i]` per scale -> per scale `z`
    /// `[b, C_i, h_i, w_i]` and log-det `[b]`.
    pub fn forward(&self, features: Vec<Tensor>) -> Result<FlowOutput> {
        self.run(features, Pass::Inference)
    }

    /// [`FastFlowHead::forward`] for a training step: the same values, with
    /// each flow as one op whose backward is written by hand on the CPU
    /// ([`Flow::forward_for_training`]); it keeps the flows' intermediate
    /// maps for the backward pass.
    ///
    /// # Shapes
    /// As [`FastFlowHead::forward`].
    pub fn forward_for_training(&self, features: Vec<Tensor>) -> Result<FlowOutput> {
        self.run(features, Pass::Training)
    }

    fn run(&self, features: Vec<Tensor>, pass: Pass) -> Result<FlowOutput> {
        if features.len() != self.flows.len() {
            return Err(Error::InputShape {
                what: "number of feature maps",
                expected: self.flows.len().to_string(),
                found: features.len().to_string(),
            });
        }
        let scale = |(i, feature): (usize, Tensor)| -> Result<(Tensor, Tensor)> {
            let [c, h, w] = self.feature_shapes[i];
            let dims = feature.dims();
            if dims.len() != 4 || dims[1..] != [c, h, w] {
                return Err(Error::InputShape {
                    what: "feature map shape",
                    expected: format!("[b, {c}, {h}, {w}] at scale {i}"),
                    found: format!("{dims:?}"),
                });
            }
            let x = match self.norms.get(i) {
                Some(norm) => norm.forward(&feature)?,
                None => feature,
            };
            match pass {
                Pass::Inference => self.flows[i].forward(&x),
                Pass::Training => self.flows[i].forward_for_training(&x),
            }
        };
        // The scales are independent: on the CPU they run side by side, so
        // that the small per-step kernels of one scale fill the cores while
        // another waits (batch-1 inference spent ~8% in the scheduler with
        // the scales in turn). Elsewhere they run in turn.
        let on_cpu = features.iter().all(|f| f.device().is_cpu());
        let outs: Vec<Result<(Tensor, Tensor)>> = if on_cpu {
            features.into_par_iter().enumerate().map(scale).collect()
        } else {
            features.into_iter().enumerate().map(scale).collect()
        };
        let mut z = Vec::with_capacity(outs.len());
        let mut log_det = Vec::with_capacity(outs.len());
        for out in outs {
            let (zi, ldi) = out?;
            z.push(zi);
            log_det.push(ldi);
        }
        Ok(FlowOutput { z, log_det })
    }

    /// The anomaly map of a flow output at this model's input size.
    ///
    /// # Shapes
    /// -> `[b, 1, input_size, input_size]`.
    pub fn anomaly_map(&self, out: &FlowOutput) -> Result<Tensor> {
        anomaly_map(out, self.input_size)
    }
}

/// FastFlow: a frozen backbone, and the trainable [`FastFlowHead`].
#[derive(Debug, Clone)]
pub struct FastFlow {
    cfg: FastFlowConfig,
    backbone: Backbone,
    head: FastFlowHead,
}

impl FastFlow {
    /// Builds the model of `cfg` around `backbone`. Trainable tensors come
    /// from `vb`, which must be backed by a `VarMap`; tensors the map already
    /// holds are kept, new ones start as in the reference (PyTorch default
    /// init drawn from `perm_seed`). The channel permutations are drawn from
    /// `perm_seed` too and stored with the weights.
    pub fn new(
        cfg: &FastFlowConfig,
        backbone: Backbone,
        perm_seed: u64,
        vb: VarBuilder,
    ) -> Result<Self> {
        cfg.validate()?;
        let kind = cfg.backbone_kind()?;
        if backbone.kind() != kind {
            return Err(Error::Config {
                field: "backbone_name",
                message: format!(
                    "the config names '{}' but the backbone given is '{}'",
                    cfg.backbone_name,
                    backbone.kind()
                ),
            });
        }
        let head = FastFlowHead::new(
            cfg,
            cfg.feature_shapes()?,
            if kind.is_cnn() {
                FeatureNorms::LayerNorm
            } else {
                FeatureNorms::None
            },
            perm_seed,
            vb,
        )?;
        Ok(Self {
            cfg: cfg.clone(),
            backbone,
            head,
        })
    }

    /// The model's config.
    pub fn config(&self) -> &FastFlowConfig {
        &self.cfg
    }

    /// The backbone kind.
    pub fn backbone_kind(&self) -> BackboneKind {
        self.backbone.kind()
    }

    /// The frozen backbone.
    pub fn backbone(&self) -> &Backbone {
        &self.backbone
    }

    /// The trainable norms and flows.
    pub fn head(&self) -> &FastFlowHead {
        &self.head
    }

    /// The trainable norms and flows, mutable.
    pub fn head_mut(&mut self) -> &mut FastFlowHead {
        &mut self.head
    }

    /// See [`FastFlowHead::params`].
    pub fn params(&self) -> Vec<&Param> {
        self.head.params()
    }

    /// See [`FastFlowHead::trainable_vars`].
    pub fn trainable_vars(&self) -> Result<Vec<(String, Var)>> {
        self.head.trainable_vars()
    }

    /// See [`FastFlowHead::buffers`].
    pub fn buffers(&self) -> Result<HashMap<String, Tensor>> {
        self.head.buffers()
    }

    /// See [`FastFlowHead::state_dict`].
    pub fn state_dict(&self) -> Result<HashMap<String, Tensor>> {
        self.head.state_dict()
    }

    /// Backbone features of a normalised image batch.
    ///
    /// # Shapes
    /// `images`: `[b, 3, S, S]` -> one `[b, C_i, S / s_i, S / s_i]` per scale.
    pub fn features(&self, images: &Tensor) -> Result<Vec<Tensor>> {
        let s = self.cfg.input_size;
        let dims = images.dims();
        if dims.len() != 4 || dims[1..] != [3, s, s] {
            return Err(Error::InputShape {
                what: "image batch shape",
                expected: format!("[b, 3, {s}, {s}]"),
                found: format!("{dims:?}"),
            });
        }
        // The backbone is frozen: its output is cut from the graph so that
        // backward never walks through it.
        Ok(self
            .backbone
            .features(images)?
            .into_iter()
            .map(|f| f.detach())
            .collect())
    }

    /// Backbone, norms and flows.
    ///
    /// # Shapes
    /// `images`: `[b, 3, S, S]` -> per scale `z` `[b, C_i, h_i, w_i]`, log-det `[b]`.
    pub fn forward(&self, images: &Tensor) -> Result<FlowOutput> {
        self.head.forward(self.features(images)?)
    }

    /// Norms and flows on precomputed backbone features.
    ///
    /// # Shapes
    /// `features`: one `[b, C_i, h_i, w_i]` per scale -> as [`FastFlow::forward`].
    pub fn forward_features(&self, features: Vec<Tensor>) -> Result<FlowOutput> {
        self.head.forward(features)
    }

    /// [`FastFlow::forward_features`] for a training step (see
    /// [`FastFlowHead::forward_for_training`]).
    ///
    /// # Shapes
    /// As [`FastFlow::forward_features`].
    pub fn forward_features_for_training(&self, features: Vec<Tensor>) -> Result<FlowOutput> {
        self.head.forward_for_training(features)
    }

    /// See [`anomaly_map`].
    ///
    /// # Shapes
    /// -> `[b, 1, S, S]`.
    pub fn anomaly_map(&self, out: &FlowOutput) -> Result<Tensor> {
        anomaly_map(out, self.cfg.input_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::VarMap;

    fn bits(t: &Tensor) -> Vec<u32> {
        let values = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        values.iter().map(|v| v.to_bits()).collect()
    }

    /// `loss_and_grads` (one backward pass per scale, side by side) must give
    /// exactly what one backward pass over the summed loss gives: the same
    /// loss and, for every trainable tensor, bit-identical gradients.
    #[test]
    fn per_scale_backward_equals_one_pass_bit_for_bit() {
        let device = Device::Cpu;
        let cfg = FastFlowConfig {
            input_size: 32,
            flow_step: 2,
            ..FastFlowConfig::resnet18()
        };
        let shapes = vec![[8, 8, 8], [16, 4, 4], [32, 2, 2]];
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
        let head = FastFlowHead::new(&cfg, shapes.clone(), FeatureNorms::LayerNorm, 7, vb).unwrap();
        let features: Vec<Tensor> = shapes
            .iter()
            .map(|&[c, h, w]| Tensor::randn(0f32, 1.0, (3, c, h, w), &device).unwrap())
            .collect();
        let out = head.forward(features).unwrap();
        let one_pass = loss(&out).unwrap();
        let want = one_pass.backward().unwrap();
        let (got_loss, got) = loss_and_grads(&out).unwrap();
        assert_eq!(
            got_loss.to_scalar::<f32>().unwrap().to_bits(),
            one_pass.to_scalar::<f32>().unwrap().to_bits()
        );
        let vars = head.trainable_vars().unwrap();
        assert!(vars.len() > 3 * 2 * 2);
        for (key, var) in &vars {
            let w = want
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{key}: no gradient"));
            let g = got
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{key}: no gradient"));
            let (w, g) = (bits(w), bits(g));
            assert_eq!(g, w, "{key}");
            assert!(w.iter().any(|&b| b != 0), "{key}: all-zero gradient");
        }
    }
}
