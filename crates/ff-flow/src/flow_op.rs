//! A whole flow (all its steps) as one candle op for training on the CPU,
//! with a hand-written backward pass over the steps.
//!
//! Run step by step through candle's autograd (see [`crate::fused`] and
//! [`crate::conv`]), every gradient a step produces is first a zero tensor
//! the size of the map and then a sum into it (`GradStore::or_insert`
//! followed by `add`), and a step input used by both the subnet and the
//! coupling gets a second full-size sum: about a tenth of a DeiT training
//! step went to allocating, zeroing and adding those maps. Here the backward
//! walks the steps in reverse with the same kernels in the same order, keeps
//! one gradient buffer per role for the whole flow, and adds the subnet's
//! input gradient into the coupling's in place: the results equal the
//! step-by-step graph's (the tests compare them value for value).
//!
//! The op's inputs are the flow's input map and all steps' parameters
//! concatenated (candle's `cat` hands each parameter its share of the
//! gradient); the forward keeps each step's hidden map and subnet output in
//! the op for the backward, which is why inference does not use it.

use std::ops::Range;
use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Storage, Tensor};
use ff_kernels::{NhwcMut, NhwcRef};
use rayon::prelude::*;

use crate::conv::{ConvSpec, PackCache};
use crate::cpu_op::{contiguous_f32, f32_data};
use crate::fused::{coupling, row_view};

/// What one step contributes to the op: its two convolutions (with their
/// packed-weight caches) and its permutation. Its parameters sit in the
/// op's second operand in the order conv1 weight, conv1 bias, conv2 weight,
/// conv2 bias, global scale, global offset.
pub(crate) struct StepSpec {
    pub conv1: ConvSpec,
    pub conv2: ConvSpec,
    pub cache1: Arc<PackCache>,
    pub cache2: Arc<PackCache>,
    /// `perm[j]`: the pre-permutation channel of output channel `j`.
    pub perm: Vec<u32>,
}

impl StepSpec {
    fn channels(&self) -> usize {
        self.perm.len()
    }

    /// The parameter ranges of this step, starting at `start` of the
    /// concatenated parameters: `[w1, b1, w2, b2, scale, offset]`.
    fn slots(&self, start: usize) -> [Range<usize>; 6] {
        let (s1, s2, c) = (self.conv1, self.conv2, self.channels());
        let lens = [
            s1.o * s1.c * s1.k * s1.k,
            s1.o,
            s2.o * s2.c * s2.k * s2.k,
            s2.o,
            c,
            c,
        ];
        let mut at = start;
        lens.map(|n| {
            let r = at..at + n;
            at += n;
            r
        })
    }
}

/// What the forward keeps of one step for the backward.
struct Saved {
    /// The step's input for every step but the first (whose input is the
    /// op's first operand): `[n, C + 1]`, the previous step's output.
    input: Option<Vec<f32>>,
    /// The first convolution's output `[n, hidden]`.
    hidden: Vec<f32>,
    /// The subnet's raw output `[n, 2 (C/2)]`.
    a: Vec<f32>,
}

/// The flow's steps as one op. Inputs: the map `[b, h, w, C]` (channels-last
/// rows) and every step's parameters concatenated (see [`StepSpec`]);
/// output `[b, h, w, C + 1]`: the last step's output with the per-pixel
/// coupling log-det summed over the steps in the last channel, as the
/// step-by-step chain produces it.
pub(crate) struct FlowOp {
    steps: Vec<StepSpec>,
    saved: Mutex<Vec<Saved>>,
}

impl FlowOp {
    pub(crate) fn new(steps: Vec<StepSpec>) -> Self {
        Self {
            steps,
            saved: Mutex::new(Vec::new()),
        }
    }

    /// The parameter ranges of every step.
    fn all_slots(&self) -> Vec<[Range<usize>; 6]> {
        let mut at = 0;
        self.steps
            .iter()
            .map(|s| {
                let slots = s.slots(at);
                at = slots[5].end;
                slots
            })
            .collect()
    }
}

/// A map with `dims` as a view of `data`, pixels `stride` apart.
fn view<'a>(data: &'a [f32], dims: [usize; 4], stride: usize) -> candle_core::Result<NhwcRef<'a>> {
    NhwcRef::strided(data, dims, stride).map_err(candle_core::Error::wrap)
}

/// A contiguous writable map with `dims`.
fn view_mut(data: &mut [f32], dims: [usize; 4]) -> candle_core::Result<NhwcMut<'_>> {
    NhwcMut::new(data, dims).map_err(candle_core::Error::wrap)
}

/// The CPU storage behind a tensor's storage guard, for an op's backward
/// (which receives tensors, not storages).
fn cpu<'a>(storage: &'a Storage, op: &str) -> candle_core::Result<&'a CpuStorage> {
    match storage {
        Storage::Cpu(cpu) => Ok(cpu),
        _ => candle_core::bail!("{op}: the operands must be on the CPU"),
    }
}

/// A map's rows: its values from its first pixel, and the pixel stride.
fn map_rows<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> candle_core::Result<(&'a [f32], usize)> {
    let Some((offset, stride)) = row_view(layout) else {
        candle_core::bail!("{op}: the map's pixels must be evenly spaced, found {layout:?}")
    };
    Ok((&f32_data(storage, op)?[offset..], stride))
}

impl CustomOp2 for FlowOp {
    fn name(&self) -> &'static str {
        "ff-flow-steps"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_l: &Layout,
        params: &CpuStorage,
        params_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (b, h, w, c) = x_l.shape().dims4()?;
        let n = b * h * w;
        let (x, x_rs) = map_rows(x, x_l, name)?;
        let params = contiguous_f32(params, params_l, name)?;
        let slots = self.all_slots();
        if self.steps.iter().any(|s| s.channels() != c)
            || slots.last().map(|s| s[5].end) != Some(params.len())
        {
            candle_core::bail!(
                "{name}: a {c}-channel map with {} parameters for steps of {:?} channels",
                params.len(),
                self.steps
                    .iter()
                    .map(StepSpec::channels)
                    .collect::<Vec<_>>()
            )
        }
        let mut saved = Vec::with_capacity(self.steps.len());
        let mut prev: Option<Vec<f32>> = None;
        for (step, [w1, b1, w2, b2, scale, offset]) in self.steps.iter().zip(slots) {
            let (input, stride) = match prev.as_deref() {
                Some(p) => (p, c + 1),
                None => (x, x_rs),
            };
            let x_c = if prev.is_some() { c + 1 } else { c };
            let (s1, s2) = (step.conv1, step.conv2);
            let mut hidden = ff_kernels::zeroed(n * s1.o);
            s1.forward(
                &step.cache1,
                view(input, [b, h, w, s1.c], stride)?,
                &params[w1],
                &params[b1],
                view_mut(&mut hidden, [b, h, w, s1.o])?,
            )?;
            let mut a = ff_kernels::zeroed(n * s2.o);
            s2.forward(
                &step.cache2,
                view(&hidden, [b, h, w, s2.c], s2.c)?,
                &params[w2],
                &params[b2],
                view_mut(&mut a, [b, h, w, s2.o])?,
            )?;
            let mut out = ff_kernels::zeroed(n * (c + 1));
            let cp = coupling(&step.perm, &params[scale], &params[offset]);
            ff_kernels::coupling_forward(&cp, view(input, [b, h, w, x_c], stride)?, &a, &mut out)
                .map_err(candle_core::Error::wrap)?;
            saved.push(Saved {
                input: prev.replace(out),
                hidden,
                a,
            });
        }
        let Some(out) = prev else {
            candle_core::bail!("{name}: a flow without steps")
        };
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = saved;
        Ok((CpuStorage::F32(out), Shape::from((b, h, w, c + 1))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        params: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let name = self.name();
        let saved = std::mem::take(&mut *self.saved.lock().unwrap_or_else(|e| e.into_inner()));
        if saved.len() != self.steps.len() {
            candle_core::bail!("{name}: backward without a forward pass before it")
        }
        let (b, h, w, c) = x.dims4()?;
        let grad = grad_res.contiguous()?;
        let params_c = params.contiguous()?;
        let want_gx = x.track_op();
        let slots = self.all_slots();
        let mut g_params = vec![0f32; params.elem_count()];
        let (x_storage, x_l) = x.storage_and_layout();
        let (p_storage, p_l) = params_c.storage_and_layout();
        let (g_storage, g_l) = grad.storage_and_layout();
        let (x_data, x_rs) = map_rows(cpu(&x_storage, name)?, x_l, name)?;
        let ops = Operands {
            x: x_data,
            x_rs,
            params: contiguous_f32(cpu(&p_storage, name)?, p_l, name)?,
            grad: contiguous_f32(cpu(&g_storage, name)?, g_l, name)?,
            dims: [b, h, w, c],
        };
        let gx = backward_steps(&self.steps, &slots, saved, ops, want_gx, &mut g_params)?;
        let gx = match gx {
            Some(v) => Some(Tensor::from_vec(v, (b, h, w, c), x.device())?),
            None => None,
        };
        let g_params = Tensor::from_vec(g_params, params.shape(), params.device())?;
        Ok((gx, Some(g_params)))
    }
}

/// The host operands of the backward pass.
struct Operands<'a> {
    /// The op's input map from its first element, pixels `x_rs` apart.
    x: &'a [f32],
    x_rs: usize,
    params: &'a [f32],
    /// The gradient of the op's output `[n, C + 1]`.
    grad: &'a [f32],
    dims: [usize; 4],
}

/// The steps' backward in reverse: writes every parameter's gradient into
/// `g_params` and returns the input map's gradient `[n, C]` when `want_gx`.
fn backward_steps(
    steps: &[StepSpec],
    slots: &[[Range<usize>; 6]],
    saved: Vec<Saved>,
    ops: Operands,
    want_gx: bool,
    g_params: &mut [f32],
) -> candle_core::Result<Option<Vec<f32>>> {
    let [b, h, w, c] = ops.dims;
    let n = b * h * w;
    // Gradient buffers, reused by every step: the gradient of the current
    // step's output (`g`: the op's own output gradient for the last step)
    // and of its input (`gx`), the subnet output's, the hidden map's and the
    // first convolution's input gradient before it joins `gx`.
    let mut g: Option<Vec<f32>> = None;
    let mut gx: Vec<f32> = Vec::new();
    let mut ga: Vec<f32> = Vec::new();
    let mut g_hidden: Vec<f32> = Vec::new();
    let mut g_conv: Vec<f32> = Vec::new();
    // Each step's kept maps are dropped once its backward is done.
    for (i, ((step, slot), kept)) in steps.iter().zip(slots).zip(saved).enumerate().rev() {
        let [w1, b1, w2, b2, scale, offset] = slot.clone();
        let (s1, s2) = (step.conv1, step.conv2);
        let (input, stride, x_c) = match kept.input.as_deref() {
            Some(p) => (p, c + 1, c + 1),
            None => (ops.x, ops.x_rs, c),
        };
        let first = i == 0;
        resize(&mut gx, n * x_c);
        resize(&mut ga, n * s2.o);
        let cp = coupling(
            &step.perm,
            &ops.params[scale.clone()],
            &ops.params[offset.clone()],
        );
        let g_out = g.as_deref().unwrap_or(ops.grad);
        let g_affine = ff_kernels::coupling_backward(
            &cp,
            view(input, [b, h, w, x_c], stride)?,
            &kept.a,
            g_out,
            &mut gx,
            &mut ga,
        )
        .map_err(candle_core::Error::wrap)?;
        for (dst, v) in g_params[scale.start..offset.end].iter_mut().zip(&g_affine) {
            *dst = *v as f32;
        }
        // The subnet: conv2 on ReLU(hidden), then conv1 on the input's first
        // half, each input gradient before its weight gradient as the
        // per-convolution op computes them.
        let hidden = view(&kept.hidden, [b, h, w, s2.c], s2.c)?;
        let ga_view = view(&ga, [b, h, w, s2.o], s2.o)?;
        resize(&mut g_hidden, n * s1.o);
        s2.input_grad(
            ga_view,
            &ops.params[w2.clone()],
            hidden,
            view_mut(&mut g_hidden, [b, h, w, s2.c])?,
        )?;
        let grads2 = s2.weight_grad(hidden, ga_view)?;
        g_params[w2.start..b2.end].copy_from_slice(&grads2);
        let input1 = view(input, [b, h, w, s1.c], stride)?;
        let gh_view = view(&g_hidden, [b, h, w, s1.o], s1.o)?;
        if !first || want_gx {
            resize(&mut g_conv, n * s1.c);
            s1.input_grad(
                gh_view,
                &ops.params[w1.clone()],
                input1,
                view_mut(&mut g_conv, [b, h, w, s1.c])?,
            )?;
            add_into_rows(&mut gx, x_c, &g_conv, s1.c);
        }
        let grads1 = s1.weight_grad(input1, gh_view)?;
        g_params[w1.start..b1.end].copy_from_slice(&grads1);
        // This step's input gradient is the previous step's output gradient.
        let spare = g.replace(std::mem::take(&mut gx));
        gx = spare.unwrap_or_default();
    }
    Ok(if want_gx { g } else { None })
}

/// Sets `v`'s length to `len`, keeping its allocation (every value is
/// overwritten before it is read).
fn resize(v: &mut Vec<f32>, len: usize) {
    if v.len() != len {
        v.resize(len, 0.0);
    }
}

/// `dst[p][..c] += src[p][..c]` for every pixel `p` of the `dst_c`-channel
/// rows of `dst` and `c`-channel rows of `src`.
fn add_into_rows(dst: &mut [f32], dst_c: usize, src: &[f32], c: usize) {
    const ROWS: usize = 64;
    dst.par_chunks_mut(dst_c * ROWS)
        .zip(src.par_chunks(c * ROWS))
        .for_each(|(d, s)| {
            for (dr, sr) in d.chunks_mut(dst_c).zip(s.chunks(c)) {
                for (dv, &sv) in dr[..c].iter_mut().zip(sr) {
                    *dv += sv;
                }
            }
        });
}
