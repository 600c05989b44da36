//! What the CPU custom ops (convolution, coupling, layer norm) share: reading
//! their operands out of candle's storage, and a cache of values derived from
//! weights (packed or transposed) that lives as long as the weights are
//! unchanged.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, Layout};

/// An op operand's values, or an error naming the op if it is not f32.
pub(crate) fn f32_data<'a>(storage: &'a CpuStorage, op: &str) -> candle_core::Result<&'a [f32]> {
    match storage {
        CpuStorage::F32(d) => Ok(d),
        _ => candle_core::bail!("{op}: only f32 is supported"),
    }
}

/// The values of a contiguous f32 operand, or an error naming the op.
pub(crate) fn contiguous_f32<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> candle_core::Result<&'a [f32]> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op}: contiguous operands only, found {layout:?}")
    };
    Ok(&f32_data(storage, op)?[start..end])
}

/// A value derived from a weight and a bias (their packing, their
/// transpose), kept while both are unchanged: a fingerprint of their bits is
/// the key, so an optimizer step or a checkpoint load (which write the
/// weights in place) is noticed without being told.
#[derive(Debug)]
pub(crate) struct WeightCache<T> {
    slot: Mutex<Option<(u64, Arc<T>)>>,
}

impl<T> Default for WeightCache<T> {
    fn default() -> Self {
        Self {
            slot: Mutex::new(None),
        }
    }
}

impl<T> WeightCache<T> {
    /// The value for `weight` and `bias`: the cached one if they are the
    /// same as last time, else `derive()`, which is then cached.
    pub(crate) fn get(
        &self,
        weight: &[f32],
        bias: &[f32],
        derive: impl FnOnce() -> candle_core::Result<T>,
    ) -> candle_core::Result<Arc<T>> {
        let key = ff_kernels::fingerprint(weight) ^ ff_kernels::fingerprint(bias).rotate_left(17);
        // A poisoned lock only means another thread panicked while deriving;
        // the value is then derived again.
        let mut slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((k, v)) = slot.as_ref() {
            if *k == key {
                return Ok(Arc::clone(v));
            }
        }
        let v = Arc::new(derive()?);
        *slot = Some((key, Arc::clone(&v)));
        Ok(v)
    }

    /// The value cached now, if any.
    #[cfg(test)]
    pub(crate) fn cached(&self) -> Option<Arc<T>> {
        let slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        slot.as_ref().map(|(_, v)| Arc::clone(v))
    }
}
