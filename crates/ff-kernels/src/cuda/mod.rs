//! The coupling step on CUDA (feature `cuda`): the kernels of `coupling.cu`,
//! compiled to PTX by `build.rs` with nvcc, loaded once per CUDA context and
//! launched on the caller's stream. Same formulas and layouts as
//! [`crate::coupling_forward`] and [`crate::coupling_backward`]: rows of
//! channels-last pixels, `x` with a pixel stride, `a` and the outputs
//! contiguous. The affine's gradients are summed with atomics, so their
//! last bits may vary from run to run (the CPU sums them deterministically).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{
    CudaFunction, CudaModule, CudaSlice, CudaStream, CudaView, CudaViewMut, LaunchConfig,
    PushKernelArg,
};

use crate::error::{shape_error, Error, Result};

/// The PTX of `coupling.cu`.
const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/coupling.ptx"));

/// Threads per block: a power of two (the forward's log-det reduction halves it).
const THREADS: u32 = 256;

/// Blocks per launch at most; each block walks pixels with a grid stride.
const MAX_BLOCKS: usize = 65_535;

/// The shapes of one coupling launch.
#[derive(Debug, Clone, Copy)]
pub struct CouplingDims {
    /// Pixels (`b h w`).
    pub pixels: usize,
    /// Channels `C` of the step.
    pub channels: usize,
    /// Channels of `x`: `C`, or `C + 1` with the carried log-det.
    pub x_channels: usize,
    /// Floats from one pixel of `x` to the next (at least `x_channels`).
    pub x_pixel_stride: usize,
    /// `s = clamp tanh(subnet_scale a_s)` (FrEIA: 2.0).
    pub clamp: f32,
    /// The subnet output's factor (FrEIA: 0.1).
    pub subnet_scale: f32,
}

impl CouplingDims {
    fn check(&self, x: usize, a: usize, perm: usize, affine: &[usize]) -> Result<()> {
        let (c, n) = (self.channels, self.pixels);
        let c2 = c / 2;
        let fits = c >= 2
            && (self.x_channels == c || self.x_channels == c + 1)
            && self.x_pixel_stride >= self.x_channels
            && (n == 0 || x >= (n - 1) * self.x_pixel_stride + self.x_channels)
            && a >= n * 2 * c2
            && perm == c
            && affine.iter().all(|&len| len == c);
        if fits {
            Ok(())
        } else {
            Err(shape_error(
                "CUDA coupling buffers",
                format!("x, a [{n}, {}], perm, scale, offset [{c}]", 2 * c2),
                format!("x {x}, a {a}, perm {perm}, affine {affine:?}"),
            ))
        }
    }

    fn launch(&self, shared_floats: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (self.pixels.clamp(1, MAX_BLOCKS) as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: (shared_floats * 4) as u32,
        }
    }
}

/// The kernels, loaded once per CUDA context.
fn function(stream: &Arc<CudaStream>, name: &str) -> Result<CudaFunction> {
    static MODULES: OnceLock<Mutex<HashMap<usize, Arc<CudaModule>>>> = OnceLock::new();
    let ctx = stream.context();
    let key = Arc::as_ptr(ctx) as usize;
    let mut modules = MODULES
        .get_or_init(Default::default)
        .lock()
        .map_err(|_| Error::Cuda("the module cache was poisoned".into()))?;
    let module = match modules.get(&key) {
        Some(m) => m.clone(),
        None => {
            let m = ctx
                .load_module(cudarc::nvrtc::Ptx::from_src(PTX))
                .map_err(|e| Error::Cuda(format!("cannot load the coupling PTX: {e}")))?;
            modules.insert(key, m.clone());
            m
        }
    };
    module
        .load_function(name)
        .map_err(|e| Error::Cuda(format!("cannot load {name}: {e}")))
}

fn int(v: usize, what: &'static str) -> Result<i32> {
    i32::try_from(v).map_err(|_| shape_error(what, "below 2^31", v))
}

/// [`crate::coupling_forward`] on the GPU: writes `out` (`[pixels, C + 1]`).
/// `scale` and `offset` are per pre-permutation channel.
#[allow(clippy::too_many_arguments)]
pub fn coupling_forward(
    stream: &Arc<CudaStream>,
    d: &CouplingDims,
    x: &CudaView<f32>,
    a: &CudaView<f32>,
    perm: &CudaView<u32>,
    scale: &CudaView<f32>,
    offset: &CudaView<f32>,
    out: &mut CudaSlice<f32>,
) -> Result<()> {
    d.check(x.len(), a.len(), perm.len(), &[scale.len(), offset.len()])?;
    if out.len() < d.pixels * (d.channels + 1) {
        return Err(shape_error(
            "CUDA coupling output",
            d.pixels * (d.channels + 1),
            out.len(),
        ));
    }
    let f = function(stream, "ff_coupling_forward")?;
    let (xs, x_c, c, n) = (
        int(d.x_pixel_stride, "pixel stride")?,
        int(d.x_channels, "channels")?,
        int(d.channels, "channels")?,
        int(d.pixels, "pixels")?,
    );
    let cfg = d.launch(d.channels + THREADS as usize);
    let mut b = stream.launch_builder(&f);
    b.arg(x)
        .arg(&xs)
        .arg(&x_c)
        .arg(a)
        .arg(perm)
        .arg(scale)
        .arg(offset);
    b.arg(&d.clamp)
        .arg(&d.subnet_scale)
        .arg(&c)
        .arg(&n)
        .arg(out);
    // SAFETY: the argument list matches `ff_coupling_forward`'s signature in
    // coupling.cu (pointers, then ints and floats in order); `check` and the
    // output length above guarantee that every index the kernel computes
    // (pixel p < pixels, channel < C or C + 1, perm entries < C by the
    // caller's permutation) lies inside the buffers; shared memory holds
    // the C + THREADS floats the kernel uses.
    unsafe { b.launch(cfg) }.map_err(|e| Error::Cuda(format!("coupling forward: {e}")))?;
    Ok(())
}

/// [`crate::coupling_backward`] on the GPU: writes `gx` (`[pixels, x_c]`),
/// `ga` (`[pixels, 2 (C/2)]`) and adds the global affine's gradients to
/// `g_affine` (`[2 C]`, scales first; pass it zeroed). The three may be
/// parts of one buffer (`split_at_mut`).
#[allow(clippy::too_many_arguments)]
pub fn coupling_backward(
    stream: &Arc<CudaStream>,
    d: &CouplingDims,
    x: &CudaView<f32>,
    a: &CudaView<f32>,
    grad: &CudaView<f32>,
    perm: &CudaView<u32>,
    scale: &CudaView<f32>,
    gx: &mut CudaViewMut<f32>,
    ga: &mut CudaViewMut<f32>,
    g_affine: &mut CudaViewMut<f32>,
) -> Result<()> {
    d.check(x.len(), a.len(), perm.len(), &[scale.len()])?;
    let (n, c) = (d.pixels, d.channels);
    let c2 = c / 2;
    if grad.len() < n * (c + 1)
        || gx.len() < n * d.x_channels
        || ga.len() < n * 2 * c2
        || g_affine.len() < 2 * c
    {
        return Err(shape_error(
            "CUDA coupling gradients",
            format!(
                "[{n}, {}], [{n}, {}], [{n}, {}], [{}]",
                c + 1,
                d.x_channels,
                2 * c2,
                2 * c
            ),
            format!(
                "{}, {}, {}, {}",
                grad.len(),
                gx.len(),
                ga.len(),
                g_affine.len()
            ),
        ));
    }
    let f = function(stream, "ff_coupling_backward")?;
    let (xs, x_c, ci, ni) = (
        int(d.x_pixel_stride, "pixel stride")?,
        int(d.x_channels, "channels")?,
        int(c, "channels")?,
        int(n, "pixels")?,
    );
    let cfg = d.launch(4 * c + 2 * c2);
    let mut b = stream.launch_builder(&f);
    b.arg(x)
        .arg(&xs)
        .arg(&x_c)
        .arg(a)
        .arg(grad)
        .arg(perm)
        .arg(scale);
    b.arg(&d.clamp).arg(&d.subnet_scale).arg(&ci).arg(&ni);
    b.arg(gx).arg(ga).arg(g_affine);
    // SAFETY: as in `coupling_forward`: the arguments follow
    // `ff_coupling_backward`'s signature, the lengths checked above bound
    // every index, and shared memory holds the 4 C + 2 (C/2) floats used.
    unsafe { b.launch(cfg) }.map_err(|e| Error::Cuda(format!("coupling backward: {e}")))?;
    Ok(())
}
