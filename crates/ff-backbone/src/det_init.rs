//! Closed-form deterministic weights shared with the PyTorch fixture scripts
//! (behind the `test-support` feature: they exist for parity tests, not for
//! models anyone would use).
//!
//! Parity fixtures must not ship the weights of a full ResNet or flow (tens of
//! MB), so both sides compute them from the tensor's key and shape with the
//! same integer formula. `data-scripts/detweights.py` is the Python twin of
//! this file; change both or neither.
//!
//! For a tensor named `key` with `n` elements (row-major):
//! - `h = fnv1a32(key)`, `raw_i = (h + i * 0x9E37_79B9) mod 2^32` (exact in u64),
//!   `u_i = raw_i / 2^32 - 0.5`, computed in f64 and cast to f32 at the end;
//! - the value depends on the key's role (see [`det_value`]).

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use crate::closed_form::fnv1a32;
pub use crate::closed_form::ClosedForm;

/// The uniform variates in [-0.5, 0.5) for `n` elements of tensor `key`.
pub fn det_uniform(key: &str, n: usize) -> Vec<f64> {
    let h = u64::from(fnv1a32(key));
    (0..n as u64)
        .map(|i| ((h + i * 0x9E37_79B9) % (1u64 << 32)) as f64 / 4_294_967_296.0 - 0.5)
        .collect()
}

/// The softplus pre-activation FrEIA uses so that the global scale starts at 1.
pub fn global_scale_init() -> f64 {
    2.0 * (5f64.exp() - 1.0).ln()
}

/// The deterministic values of tensor `key` with shape `dims`.
///
/// Roles, by key suffix and rank:
/// - `running_var`: `1 + 0.5 u`; `running_mean`: `0.2 u`;
/// - `global_scale`: `global_scale_init() + 0.5 u`;
/// - rank >= 2 (conv / linear weights): `2 u sqrt(6 / fan_in)`, fan_in = prod(dims[1..]);
/// - rank 1 `weight` (norm scales): `1 + 0.2 u`;
/// - anything else (biases, offsets, tokens, position embeddings, layer scales): `0.1 u`.
pub fn det_value(key: &str, dims: &[usize]) -> Vec<f32> {
    let n: usize = dims.iter().product();
    let u = det_uniform(key, n);
    let last = key.rsplit('.').next().unwrap_or(key);
    let map: Box<dyn Fn(f64) -> f64> = if last == "running_var" {
        Box::new(|u| 1.0 + 0.5 * u)
    } else if last == "running_mean" {
        Box::new(|u| 0.2 * u)
    } else if last == "global_scale" {
        let g = global_scale_init();
        Box::new(move |u| g + 0.5 * u)
    } else if dims.len() >= 2 && last == "weight" {
        let fan_in: usize = dims[1..].iter().product();
        let bound = (6.0 / fan_in.max(1) as f64).sqrt();
        Box::new(move |u| 2.0 * u * bound)
    } else if dims.len() == 1 && last == "weight" {
        Box::new(|u| 1.0 + 0.2 * u)
    } else {
        Box::new(|u| 0.1 * u)
    };
    u.into_iter().map(|u| map(u) as f32).collect()
}

/// A function from a tensor's key and shape to its values.
pub type ValuesFn = fn(&str, &[usize]) -> Vec<f32>;

/// The backend that answers every request with [`det_value`].
pub fn det_backend() -> ClosedForm<ValuesFn> {
    ClosedForm::new("det_init", det_value)
}

/// A `VarBuilder` whose every tensor is [`det_value`] of its full key.
pub fn det_var_builder(dtype: DType, device: &Device) -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(det_backend()), dtype, device.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_have_expected_ranges() {
        let var = det_value("layer1.0.bn1.running_var", &[64]);
        assert!(var.iter().all(|&v| (0.75..1.25).contains(&v)));
        let w = det_value("conv1.weight", &[64, 3, 7, 7]);
        let bound = (6.0f32 / 147.0).sqrt();
        assert!(w.iter().all(|&v| v.abs() <= bound));
        let g = det_value("nf_flows.0.module_list.0.global_scale", &[1, 8, 1, 1]);
        assert!(g
            .iter()
            .all(|&v| (v as f64 - global_scale_init()).abs() <= 0.25));
        // Different keys give different streams.
        assert_ne!(det_value("a.bias", &[4]), det_value("b.bias", &[4]));
    }
}
