//! The constants of FrEIA 0.2's `AllInOneBlock` that the reference never
//! changes, named once for the op-by-op route (`coupling.rs`) and the fused
//! kernels' route (`fused.rs`).

/// `affine_clamping` as the reference sets it: `s = clamp tanh(a_s)`.
pub const AFFINE_CLAMPING: f64 = 2.0;

/// The subnet output is scaled by this before the coupling (FrEIA's
/// `a *= 0.1`).
pub const SUBNET_SCALE: f64 = 0.1;

/// The SOFTPLUS global affine's factor: `scale = 0.1 softplus(g)`.
pub const GLOBAL_SCALE_FACTOR: f64 = 0.1;

/// The softplus `beta` of FrEIA's SOFTPLUS global affine.
pub const SOFTPLUS_BETA: f64 = 0.5;

/// PyTorch `nn.Softplus`'s default threshold: above it the function is the
/// identity.
pub const SOFTPLUS_THRESHOLD: f64 = 20.0;

/// FrEIA's `global_affine_init` as the reference leaves it: the global scale
/// starts at 1.
const GLOBAL_AFFINE_INIT: f64 = 1.0;

/// The global-scale pre-activation that makes the scale start at
/// [`GLOBAL_AFFINE_INIT`]: the inverse of `0.1 softplus_{0.5}`, i.e.
/// `2 ln(exp(0.5 * 10 * 1.0) - 1)`.
pub fn global_scale_init() -> f64 {
    ((SOFTPLUS_BETA * GLOBAL_AFFINE_INIT / GLOBAL_SCALE_FACTOR).exp() - 1.0).ln() / SOFTPLUS_BETA
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_initial_global_scale_is_one() {
        let g = global_scale_init();
        assert_eq!(g, 2.0 * (5f64.exp() - 1.0).ln());
        let scale = GLOBAL_SCALE_FACTOR * (1.0 + (SOFTPLUS_BETA * g).exp()).ln() / SOFTPLUS_BETA;
        assert!((scale - GLOBAL_AFFINE_INIT).abs() < 1e-12, "{scale}");
    }
}
