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
