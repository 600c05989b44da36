//! Adam with PyTorch's semantics (`torch.optim.Adam`, single-tensor path):
//! weight decay is L2 added to the gradient, not decoupled as in AdamW, and
//! each parameter keeps its own step count for the bias corrections.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use crate::error::{Error, Result};

/// Adam's hyperparameters; the defaults are the reference's training settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamConfig {
    /// Learning rate (reference: 1e-3).
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Added to the bias-corrected root of the second moment.
    pub eps: f64,
    /// L2 penalty added to the gradient (reference: 1e-5).
    pub weight_decay: f64,
}

impl Default for AdamConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-5,
        }
    }
}

/// Per-parameter state: PyTorch's `exp_avg`, `exp_avg_sq` and `step`.
#[derive(Debug, Clone)]
struct ParamState {
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: u64,
}

/// `torch.optim.Adam` over named `Var`s.
#[derive(Debug)]
pub struct Adam {
    cfg: AdamConfig,
    vars: Vec<(String, Var)>,
    state: Vec<ParamState>,
    step_count: u64,
}

impl Adam {
    /// Adam over `vars` (the model's trainable tensors, never the backbone's
    /// or the permutations).
    pub fn new(vars: Vec<(String, Var)>, cfg: AdamConfig) -> Result<Self> {
        let state = vars
            .iter()
            .map(|(_, v)| {
                Ok(ParamState {
                    exp_avg: v.zeros_like()?,
                    exp_avg_sq: v.zeros_like()?,
                    step: 0,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg,
            vars,
            state,
            step_count: 0,
        })
    }

    /// The hyperparameters.
    pub fn config(&self) -> AdamConfig {
        self.cfg
    }

    /// How many times [`Adam::step`] ran (including before a resume).
    pub fn step_count(&self) -> u64 {
        self.step_count
    }

    /// The optimized variables with their keys.
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// One update of every variable that has a gradient in `grads`; variables
    /// without one are left alone, with their state, as PyTorch does.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        let AdamConfig {
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.cfg;
        for ((_, var), st) in self.vars.iter().zip(self.state.iter_mut()) {
            let Some(grad) = grads.get(var.as_tensor()) else {
                continue;
            };
            // Gradients and parameters are taken out of any graph so that the
            // optimizer state never keeps one alive.
            let grad = grad.detach();
            let param = var.as_tensor().detach();
            let grad = if weight_decay != 0.0 {
                (&grad + (&param * weight_decay)?)?
            } else {
                grad
            };
            st.step += 1;
            // PyTorch: exp_avg.lerp_(grad, 1 - beta1).
            st.exp_avg = (&st.exp_avg + ((&grad - &st.exp_avg)? * (1.0 - beta1))?)?;
            // PyTorch: exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2).
            st.exp_avg_sq = ((&st.exp_avg_sq * beta2)? + (grad.sqr()? * (1.0 - beta2))?)?;
            let t = st.step as i32;
            let bias_correction1 = 1.0 - beta1.powi(t);
            let bias_correction2_sqrt = (1.0 - beta2.powi(t)).sqrt();
            let step_size = lr / bias_correction1;
            let denom = ((st.exp_avg_sq.sqrt()? / bias_correction2_sqrt)? + eps)?;
            let update = ((&st.exp_avg * step_size)? / denom)?;
            var.set(&(param - update)?)?;
            st.exp_avg = st.exp_avg.detach();
            st.exp_avg_sq = st.exp_avg_sq.detach();
        }
        self.step_count += 1;
        Ok(())
    }

    /// The optimizer state to save: `{key}.exp_avg`, `{key}.exp_avg_sq` and
    /// `{key}.step` (an f64 scalar) per variable. With
    /// [`Adam::step_count`] and [`Adam::load_state`] a resumed run continues
    /// bit-exactly.
    pub fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for ((key, var), st) in self.vars.iter().zip(&self.state) {
            out.insert(format!("{key}.exp_avg"), st.exp_avg.clone());
            out.insert(format!("{key}.exp_avg_sq"), st.exp_avg_sq.clone());
            out.insert(
                format!("{key}.step"),
                Tensor::new(st.step as f64, var.device())?,
            );
        }
        Ok(out)
    }

    /// Restores state saved by [`Adam::state_tensors`]; every variable's
    /// entries must be present with its shape.
    pub fn load_state(&mut self, step_count: u64, tensors: &HashMap<String, Tensor>) -> Result<()> {
        let mut new_state = Vec::with_capacity(self.vars.len());
        for (key, var) in &self.vars {
            let get = |suffix: &str| -> Result<Tensor> {
                let name = format!("{key}.{suffix}");
                tensors
                    .get(&name)
                    .cloned()
                    .ok_or_else(|| Error::OptimizerState {
                        message: format!("no tensor '{name}'"),
                    })
            };
            let moment = |suffix: &str| -> Result<Tensor> {
                let t = get(suffix)?;
                if t.dims() != var.dims() {
                    return Err(Error::ShapeMismatch {
                        key: format!("{key}.{suffix}"),
                        expected: var.dims().to_vec(),
                        found: t.dims().to_vec(),
                    });
                }
                Ok(t.to_dtype(var.dtype())?.to_device(var.device())?)
            };
            let exp_avg = moment("exp_avg")?;
            let exp_avg_sq = moment("exp_avg_sq")?;
            let step_t = get("step")?;
            let step = step_t
                .to_dtype(DType::F64)?
                .flatten_all()?
                .to_vec1::<f64>()
                .ok()
                .filter(|v| v.len() == 1 && v[0] >= 0.0 && v[0].fract() == 0.0)
                .map(|v| v[0] as u64)
                .ok_or_else(|| Error::OptimizerState {
                    message: format!("'{key}.step' is not one non-negative whole number"),
                })?;
            new_state.push(ParamState {
                exp_avg,
                exp_avg_sq,
                step,
            });
        }
        self.state = new_state;
        self.step_count = step_count;
        Ok(())
    }
}
