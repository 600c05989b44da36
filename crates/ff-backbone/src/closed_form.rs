//! Weights computed from each tensor's key and shape: the backend behind the
//! seeded timm-style random init and the closed-form fixture weights.

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;

/// The FNV-1a 32-bit hash of a key's UTF-8 bytes.
pub(crate) fn fnv1a32(key: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in key.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// A `VarBuilder` backend whose every tensor is computed from its full key
/// and shape by `values`: the closed-form fixture weights (`det_init`, behind the `test-support`
/// feature)
/// and the seeded timm-style random init share it.
pub struct ClosedForm<F> {
    what: &'static str,
    values: F,
}

impl<F> ClosedForm<F>
where
    F: Fn(&str, &[usize]) -> Vec<f32> + Send + Sync,
{
    /// `what` names the init in errors (it cannot answer a request without a shape).
    pub fn new(what: &'static str, values: F) -> Self {
        Self { what, values }
    }
}

impl<F> std::fmt::Debug for ClosedForm<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClosedForm({})", self.what)
    }
}

impl<F> SimpleBackend for ClosedForm<F>
where
    F: Fn(&str, &[usize]) -> Vec<f32> + Send + Sync,
{
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let values = (self.values)(name, s.dims());
        Tensor::from_vec(values, s, dev)?.to_dtype(dtype)
    }

    fn get_unchecked(
        &self,
        name: &str,
        _dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        candle_core::bail!("{} needs the shape of '{name}'", self.what)
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_matches_known_vectors() {
        // Published FNV-1a 32-bit test vectors.
        assert_eq!(fnv1a32(""), 0x811c_9dc5);
        assert_eq!(fnv1a32("a"), 0xe40c_292c);
        assert_eq!(fnv1a32("foobar"), 0xbf9c_f968);
    }
}
