//! Trainable parameters: fetched from a `VarMap`-backed `VarBuilder` and, when
//! new, initialised from a seeded generator the way PyTorch initialises the
//! reference's layers, so a seed fixes the whole starting model.

use candle_core::{Tensor, Var};
use candle_nn::{Init, VarBuilder};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};

/// How a new parameter starts, following the reference's PyTorch defaults.
#[derive(Debug, Clone, Copy)]
pub(crate) enum ParamInit {
    /// Every element equal to the value.
    Const(f64),
    /// Independent uniform draws in `[-bound, bound)` (PyTorch's default for
    /// `Conv2d` weights and biases: `bound = 1 / sqrt(fan_in)`).
    Uniform(f64),
}

/// A trainable tensor and its full state-dict key. The tensor is always a
/// `Var`'s (checked when the parameter is made), so the optimizer updates it
/// in place; the fields are read through [`Param::key`] and [`Param::tensor`].
#[derive(Debug, Clone)]
pub struct Param {
    /// The reference `state_dict` key, e.g. `nf_flows.0.module_list.3.global_scale`.
    pub(crate) key: String,
    /// The tensor; a `Var`'s tensor, so the optimizer can update it in place.
    pub(crate) tensor: Tensor,
}

impl Param {
    /// The reference `state_dict` key, e.g. `nf_flows.0.module_list.3.global_scale`.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The current value (shares the `Var`'s storage).
    ///
    /// # Shapes
    /// The parameter's, as its key names it in the reference's `state_dict`
    /// (e.g. `[1, C, 1, 1]` for a global scale).
    pub fn tensor(&self) -> &Tensor {
        &self.tensor
    }

    /// The `Var` behind this parameter (sharing its storage).
    pub fn var(&self) -> Result<Var> {
        if !self.tensor.is_variable() {
            return Err(Error::NotTrainable {
                key: self.key.clone(),
            });
        }
        Ok(Var::from_tensor(&self.tensor)?)
    }
}

/// The full key of `name` under `vb`'s prefix.
pub(crate) fn full_key(vb: &VarBuilder, name: &str) -> String {
    let prefix = vb.prefix();
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// Fetches parameter `name` of shape `dims` from `vb`. A tensor the
/// `VarBuilder` already holds (e.g. a `VarMap` filled from a checkpoint) is
/// taken as it is; a new one is created and filled from `rng` per `init`.
/// The tensor must be a `Var`: only trainable builders are accepted.
pub(crate) fn trainable(
    vb: &VarBuilder,
    dims: &[usize],
    name: &str,
    init: ParamInit,
    rng: &mut ChaCha8Rng,
) -> Result<Param> {
    let key = full_key(vb, name);
    let existed = vb.contains_tensor(name);
    let tensor = vb.get_with_hints(dims, name, Init::Const(0.0))?;
    if !tensor.is_variable() {
        return Err(Error::NotTrainable { key });
    }
    if !existed {
        let n: usize = dims.iter().product();
        let values: Vec<f32> = match init {
            ParamInit::Const(v) => vec![v as f32; n],
            ParamInit::Uniform(bound) => (0..n)
                .map(|_| rng.random_range(-bound..bound) as f32)
                .collect(),
        };
        let init = Tensor::from_vec(values, dims, tensor.device())?.to_dtype(tensor.dtype())?;
        Var::from_tensor(&tensor)?.set(&init)?;
    }
    Ok(Param { key, tensor })
}
