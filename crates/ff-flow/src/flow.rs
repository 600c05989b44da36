//! One scale's normalizing flow: a stack of coupling steps with alternating
//! kernel sizes, as the reference's `nf_fast_flow` builds it with FrEIA's
//! `SequenceINN`.

use candle_core::Tensor;
use candle_nn::VarBuilder;
use rand_chacha::ChaCha8Rng;

use crate::coupling::{
    fused_path, split_log_det_column, to_nchw, to_nhwc, AllInOneBlock, CouplingConfig, Permutation,
};
use crate::error::{Error, Result};
use crate::flow_op::FlowOp;

/// The settings of one scale's flow.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FlowConfig {
    /// Feature channels `C`.
    pub channels: usize,
    /// Hidden channels of every subnet.
    pub hidden_channels: usize,
    /// Number of coupling steps.
    pub n_steps: usize,
    /// Use 3x3 kernels everywhere (otherwise odd steps use 1x1).
    pub conv3x3_only: bool,
}

impl FlowConfig {
    /// The subnet kernel size of step `step_idx`: 3 on even steps, 1 on odd
    /// steps unless `conv3x3_only`.
    pub fn kernel_size(&self, step_idx: usize) -> usize {
        if step_idx % 2 == 1 && !self.conv3x3_only {
            1
        } else {
            3
        }
    }
}

/// `n_steps` coupling steps applied in sequence (keys `module_list.{k}.*`).
#[derive(Debug, Clone)]
pub struct Flow {
    cfg: FlowConfig,
    steps: Vec<AllInOneBlock>,
}

impl Flow {
    /// Builds the flow under `vb` with one permutation per step.
    pub fn new(
        cfg: FlowConfig,
        permutations: Vec<Permutation>,
        vb: VarBuilder,
        rng: &mut ChaCha8Rng,
    ) -> Result<Self> {
        if permutations.len() != cfg.n_steps {
            return Err(Error::InputShape {
                what: "permutations per flow",
                expected: cfg.n_steps.to_string(),
                found: permutations.len().to_string(),
            });
        }
        let vb = vb.pp("module_list");
        let steps = permutations
            .into_iter()
            .enumerate()
            .map(|(k, perm)| {
                let step_cfg = CouplingConfig {
                    channels: cfg.channels,
                    hidden_channels: cfg.hidden_channels,
                    kernel_size: cfg.kernel_size(k),
                };
                AllInOneBlock::new(step_cfg, perm, vb.pp(k), rng)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { cfg, steps })
    }

    /// The flow's settings.
    pub fn config(&self) -> FlowConfig {
        self.cfg
    }

    /// The coupling steps, in order.
    pub fn steps(&self) -> &[AllInOneBlock] {
        &self.steps
    }

    /// The coupling steps, mutable (to replace permutations on load).
    pub fn steps_mut(&mut self) -> &mut [AllInOneBlock] {
        &mut self.steps
    }

    /// Maps features to the flow's latent, summing the steps' log-determinants.
    ///
    /// # Shapes
    /// `x`: `[b, C, h, w]` -> (`z`: `[b, C, h, w]`, log-det `[b]`). On the
    /// CPU kernels' route `z` is a view of channels-last storage (not
    /// contiguous); call `.contiguous()` where a contiguous tensor is needed.
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        // The steps run channels-last (see `AllInOneBlock::forward_nhwc`);
        // the layout changes once per flow, not once per step.
        let mut z = to_nhwc(x)?;
        if fused_path(&z) {
            return self.forward_fused(z);
        }
        let mut log_det: Option<Tensor> = None;
        for step in &self.steps {
            let (next, ld) = step.forward_nhwc(&z)?;
            z = next;
            log_det = Some(match log_det {
                None => ld,
                Some(acc) => (acc + ld)?,
            });
        }
        match log_det {
            Some(ld) => Ok((to_nchw(&z)?, ld)),
            None => Err(no_steps()),
        }
    }

    /// [`Flow::forward`] for a training step: the same values, and on the
    /// CPU in f32 the whole flow is one op with a hand-written backward
    /// (`flow_op.rs`) that skips autograd's full-size zero-fills and
    /// sums between the steps. It keeps every step's intermediate maps until
    /// the backward pass, so inference takes [`Flow::forward`].
    ///
    /// # Shapes
    /// As [`Flow::forward`].
    pub fn forward_for_training(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let whole = x.device().is_cpu() && fused_path(x) && !self.steps.is_empty();
        if !whole {
            return self.forward(x);
        }
        let z = to_nhwc(x)?;
        let (_, h, w, _) = z.dims4()?;
        let mut specs = Vec::with_capacity(self.steps.len());
        let mut params = Vec::new();
        let mut scale_log_det: Option<Tensor> = None;
        for step in &self.steps {
            let (spec, step_params, sld) = step.training_part(h * w)?;
            specs.push(spec);
            params.extend(step_params);
            scale_log_det = Some(match scale_log_det {
                None => sld,
                Some(acc) => (acc + sld)?,
            });
        }
        let scale_log_det = scale_log_det.ok_or_else(no_steps)?;
        let params = Tensor::cat(&params, 0)?;
        let out = z.apply_op2(&params, FlowOp::new(specs))?;
        let (z, coupling_log_det) = split_log_det_column(&out)?;
        Ok((
            z.permute((0, 3, 1, 2))?,
            coupling_log_det.broadcast_add(&scale_log_det)?,
        ))
    }

    /// [`Flow::forward`] on the CPU in f32: the steps pass the per-pixel
    /// log-det along as an extra channel, split off once at the end.
    ///
    /// # Shapes
    /// `x`: `[b, h, w, C]` -> (`z`: `[b, C, h, w]`, log-det `[b]`).
    fn forward_fused(&self, x: Tensor) -> Result<(Tensor, Tensor)> {
        let mut z = x;
        let mut scale_log_det: Option<Tensor> = None;
        for step in &self.steps {
            let (next, sld) = step.forward_carrying_log_det(&z)?;
            z = next;
            scale_log_det = Some(match scale_log_det {
                None => sld,
                Some(acc) => (acc + sld)?,
            });
        }
        let scale_log_det = scale_log_det.ok_or_else(no_steps)?;
        let (z, coupling_log_det) = split_log_det_column(&z)?;
        // `z` stays channels-last underneath: the anomaly map and the loss
        // read it as it is, and a copy to channels-first would cost a pass.
        Ok((
            z.permute((0, 3, 1, 2))?,
            coupling_log_det.broadcast_add(&scale_log_det)?,
        ))
    }
}

fn no_steps() -> Error {
    Error::InputShape {
        what: "flow steps",
        expected: "at least 1".into(),
        found: "0".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};
    use candle_nn::{VarBuilder, VarMap};
    use rand::seq::SliceRandom;
    use rand::SeedableRng;

    /// A flow of `n_steps` steps on `c` channels, global affines moved away
    /// from their initial values so that every term of the backward counts.
    fn flow(c: usize, n_steps: usize, conv3x3_only: bool, varmap: &VarMap) -> Flow {
        let dev = Device::Cpu;
        let vb = VarBuilder::from_varmap(varmap, DType::F32, &dev);
        let cfg = FlowConfig {
            channels: c,
            hidden_channels: 5,
            n_steps,
            conv3x3_only,
        };
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let perms = (0..n_steps)
            .map(|k| {
                let mut perm: Vec<u32> = (0..c as u32).collect();
                perm.shuffle(&mut rng);
                Permutation::new(perm, &dev, &format!("module_list.{k}.w_perm")).unwrap()
            })
            .collect();
        let flow = Flow::new(cfg, perms, vb, &mut rng).unwrap();
        for (i, step) in flow.steps().iter().enumerate() {
            for p in step.params() {
                let v = p.var().unwrap();
                let moved = (v.as_tensor()
                    + Tensor::randn(0f32, 0.3 + 0.1 * i as f32, v.shape(), &dev).unwrap())
                .unwrap();
                v.set(&moved).unwrap();
            }
        }
        flow
    }

    /// The training op (the whole flow as one op, backward by hand) gives
    /// the step-by-step graph's outputs and gradients: the same kernels in
    /// the same order, so value for value, for 3x3 and 1x1 steps, an odd
    /// channel count, and an input with and without a gradient of its own.
    #[test]
    fn training_op_equals_the_step_by_step_graph() {
        let dev = Device::Cpu;
        for (c, n_steps, conv3x3_only) in [(6usize, 3usize, false), (7, 2, true)] {
            let varmap = VarMap::new();
            let flow = flow(c, n_steps, conv3x3_only, &varmap);
            let x =
                Var::from_tensor(&Tensor::randn(0f32, 1.5, (2, c, 5, 4), &dev).unwrap()).unwrap();
            let r = Tensor::randn(0f32, 1.0, (2, c, 5, 4), &dev).unwrap();
            let r_ld = Tensor::new(&[0.7f32, -1.3], &dev).unwrap();
            let objective = |z: &Tensor, ld: &Tensor| {
                ((z * &r).unwrap().sum_all().unwrap() + (ld * &r_ld).unwrap().sum_all().unwrap())
                    .unwrap()
            };
            for tracked in [true, false] {
                let input = if tracked {
                    x.as_tensor().clone()
                } else {
                    x.as_tensor().detach()
                };
                let (z_graph, ld_graph) = flow.forward(&input).unwrap();
                let (z_op, ld_op) = flow.forward_for_training(&input).unwrap();
                let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                assert_eq!(values(&z_op), values(&z_graph), "c = {c}: latents");
                assert_eq!(values(&ld_op), values(&ld_graph), "c = {c}: log-dets");
                let g_graph = objective(&z_graph, &ld_graph).backward().unwrap();
                let g_op = objective(&z_op, &ld_op).backward().unwrap();
                let mut checked = 0;
                for step in flow.steps() {
                    for p in step.params() {
                        let want = g_graph.get(&p.tensor).expect("graph gradient");
                        let got = g_op.get(&p.tensor).expect("op gradient");
                        assert_eq!(values(got), values(want), "c = {c}: gradient of {}", p.key);
                        checked += 1;
                    }
                }
                assert_eq!(checked, 6 * n_steps);
                let gx_op = g_op.get(x.as_tensor());
                if tracked {
                    let want = g_graph.get(x.as_tensor()).expect("graph input gradient");
                    assert_eq!(
                        values(gx_op.expect("op input gradient")),
                        values(want),
                        "c = {c}: input gradient"
                    );
                } else {
                    assert!(gx_op.is_none(), "c = {c}: a detached input got a gradient");
                }
            }
        }
    }

    /// A second backward pass over the same forward is an error, not a
    /// silent reuse of freed intermediates.
    #[test]
    fn training_op_backward_twice_is_an_error() {
        let dev = Device::Cpu;
        let varmap = VarMap::new();
        let flow = flow(4, 2, false, &varmap);
        let x = Tensor::randn(0f32, 1.0, (1, 4, 3, 3), &dev).unwrap();
        let (z, ld) = flow.forward_for_training(&x).unwrap();
        let loss = (z.sqr().unwrap().sum_all().unwrap() - ld.sum_all().unwrap()).unwrap();
        loss.backward().unwrap();
        let err = loss.backward().unwrap_err().to_string();
        assert!(err.contains("backward without a forward pass"), "{err}");
    }
}
