//! The elementwise part of one coupling step (clamped affine coupling, global
//! affine, permutation, log-det per pixel) as one candle op on the CPU, whose
//! forward and hand-written backward are ff-kernels' coupling kernels.
//!
//! Written with candle's elementwise ops, this part costs about twenty full
//! passes over the feature map forward and as many backward, each allocating
//! a fresh tensor, plus reductions over leading dimensions for the global
//! affine's gradients (single-threaded in candle). Fused, it is one parallel
//! pass each way. With the `cuda` feature the same op runs on the GPU with
//! ff-kernels' CUDA kernels. [`crate::coupling::AllInOneBlock`] keeps the
//! op-by-op version for other devices and dtypes, and the tests check both
//! agree.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use ff_kernels::NhwcRef;

use crate::cpu_op::f32_data;
use crate::freia::{AFFINE_CLAMPING, SUBNET_SCALE};

/// Where the rows of a channels-last `[b, h, w, C]` view lie in its storage:
/// `(start offset, row stride)`, if every pixel's channels are contiguous and
/// pixels are evenly spaced (a contiguous map, or a narrow of its channels).
pub(crate) fn row_view(layout: &Layout) -> Option<(usize, usize)> {
    let dims = layout.dims();
    let st = layout.stride();
    if dims.len() != 4 || st[3] != 1 {
        return None;
    }
    let rs = st[2];
    let consistent = (dims[2] <= 1 || st[2] == rs)
        && (dims[1] <= 1 || st[1] == dims[2] * rs)
        && (dims[0] <= 1 || st[0] == dims[1] * dims[2] * rs);
    (consistent && rs >= dims[3]).then_some((layout.start_offset(), rs))
}

/// Where the three operands of a coupling op lie: `x` `[b, h, w, x_c]` as
/// rows (start, pixel stride), the other two contiguous (start, end).
struct Operands {
    dims: [usize; 4],
    x_rows: (usize, usize),
    second: (usize, usize),
    third: (usize, usize),
}

impl Operands {
    /// Reads the layouts of an op `name` on a `c`-channel step, whose second
    /// and third operands are called `what`.
    fn of(
        name: &str,
        c: usize,
        l1: &Layout,
        l2: &Layout,
        l3: &Layout,
        what: &str,
    ) -> candle_core::Result<Self> {
        let (b, h, w, x_c) = l1.shape().dims4()?;
        if x_c != c && x_c != c + 1 {
            candle_core::bail!("{name}: {x_c} input channels for a {c}-channel step")
        }
        let Some(x_rows) = row_view(l1) else {
            candle_core::bail!("{name}: x must have contiguous channels")
        };
        let (Some(second), Some(third)) = (l2.contiguous_offsets(), l3.contiguous_offsets()) else {
            candle_core::bail!("{name}: {what} must be contiguous")
        };
        Ok(Self {
            dims: [b, h, w, x_c],
            x_rows,
            second,
            third,
        })
    }

    /// Pixels `b h w`.
    #[cfg(feature = "cuda")]
    fn pixels(&self) -> usize {
        self.dims[0] * self.dims[1] * self.dims[2]
    }
}

/// The host operands of an op `name` on a `c`-channel step: `x` as a
/// channels-last view, and the second and third operands (called `what`)
/// as the contiguous slices their layouts name.
fn host_operands<'s>(
    name: &str,
    c: usize,
    [(s1, l1), (s2, l2), (s3, l3)]: [(&'s CpuStorage, &Layout); 3],
    what: &str,
) -> candle_core::Result<(NhwcRef<'s>, &'s [f32], &'s [f32])> {
    let (x, second, third) = (
        f32_data(s1, name)?,
        f32_data(s2, name)?,
        f32_data(s3, name)?,
    );
    let ops = Operands::of(name, c, l1, l2, l3, what)?;
    let (x_off, x_rs) = ops.x_rows;
    let xv = NhwcRef::strided(&x[x_off..], ops.dims, x_rs).map_err(candle_core::Error::wrap)?;
    Ok((
        xv,
        &second[ops.second.0..ops.second.1],
        &third[ops.third.0..ops.third.1],
    ))
}

/// The step's elementwise part. Inputs: `x` `[b, h, w, C]` or
/// `[b, h, w, C + 1]` (the step input, optionally followed by the log-det per
/// pixel accumulated so far), `a` `[b, h, w, 2 (C/2)]` (the raw subnet
/// output), `affine` `[2, C]` (global scale, global offset). Output
/// `[b, h, w, C + 1]`: the permuted `concat(x1, x2 * exp(s) + t) * scale +
/// offset`, then the accumulated log-det plus `sum_c s` per pixel. Carrying
/// the log-det along as a column means a flow's steps chain with no slicing
/// (whose backward would zero-fill and add a full-size gradient per step).
pub(crate) struct CouplingOp {
    /// `perm[j]`: the pre-permutation channel of output channel `j`.
    pub perm: Vec<u32>,
}

/// The kernel's view of a step with permutation `perm` and the given global
/// affine.
pub(crate) fn coupling<'a>(
    perm: &'a [u32],
    scale: &'a [f32],
    offset: &'a [f32],
) -> ff_kernels::Coupling<'a> {
    ff_kernels::Coupling {
        perm,
        scale,
        offset,
        clamp: AFFINE_CLAMPING as f32,
        subnet_scale: SUBNET_SCALE as f32,
    }
}

impl CustomOp3 for CouplingOp {
    fn name(&self) -> &'static str {
        "ff-affine-coupling"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let name = self.name();
        let c = self.perm.len();
        let (xv, a, affine) =
            host_operands(name, c, [(s1, l1), (s2, l2), (s3, l3)], "a and affine")?;
        let [b, h, w, _] = xv.dims();
        let (n, c2) = (b * h * w, c / 2);
        if a.len() != n * 2 * c2 || affine.len() != 2 * c {
            candle_core::bail!("{name}: inconsistent shapes")
        }
        let (scale, offset) = affine.split_at(c);
        let oc = c + 1;
        let mut out = ff_kernels::zeroed(n * oc);
        ff_kernels::coupling_forward(&coupling(&self.perm, scale, offset), xv, a, &mut out)
            .map_err(candle_core::Error::wrap)?;
        Ok((CpuStorage::F32(out), Shape::from((b, h, w, oc))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let c = self.perm.len();
        let ops = Operands::of(self.name(), c, l1, l2, l3, "a and affine")?;
        let ([b, h, w, x_c], (x_off, x_rs), n) = (ops.dims, ops.x_rows, ops.pixels());
        let ((a0, a1), (f0, _)) = (ops.second, ops.third);
        let dev = s1.device.clone();
        let stream = dev.cuda_stream();
        let (x, a, affine) = (
            s1.as_cuda_slice::<f32>()?,
            s2.as_cuda_slice::<f32>()?,
            s3.as_cuda_slice::<f32>()?,
        );
        let perm = stream
            .clone_htod(&self.perm)
            .map_err(candle_core::Error::wrap)?;
        let mut out = dev.alloc_zeros::<f32>(n * (c + 1))?;
        let dims = cuda_dims(n, c, x_c, x_rs);
        ff_kernels::cuda::coupling_forward(
            &stream,
            &dims,
            &x.slice(x_off..),
            &a.slice(a0..a1),
            &perm.slice(..),
            &affine.slice(f0..f0 + c),
            &affine.slice(f0 + c..f0 + 2 * c),
            &mut out,
        )
        .map_err(candle_core::Error::wrap)?;
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(out, dev),
            Shape::from((b, h, w, c + 1)),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        affine: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, h, w, x_c) = x.dims4()?;
        let c = self.perm.len();
        let c2 = c / 2;
        let n = b * h * w;
        // On the CPU the kernel reads the affine from host memory; on a GPU
        // it stays on the device (no copy back to the host in the step).
        let affine = if affine.device().is_cpu() {
            AffineValues::Host {
                scale: affine.get(0)?.to_vec1::<f32>()?,
                offset: affine.get(1)?.to_vec1::<f32>()?,
            }
        } else {
            AffineValues::Device(affine.contiguous()?)
        };
        let packed = x.apply_op3_no_bwd(
            &a.contiguous()?,
            &grad_res.contiguous()?,
            &CouplingBackward {
                perm: self.perm.clone(),
                affine,
            },
        )?;
        // The packed result is [gx (n x_c) | ga (n 2 c2) | g_affine (2 C)].
        let gx = packed.narrow(0, 0, n * x_c)?.reshape((b, h, w, x_c))?;
        let ga = packed
            .narrow(0, n * x_c, n * 2 * c2)?
            .reshape((b, h, w, 2 * c2))?;
        let gf = packed
            .narrow(0, n * (x_c + 2 * c2), 2 * c)?
            .reshape((2, c))?;
        Ok((Some(gx), Some(ga), Some(gf)))
    }
}

/// The backward of [`CouplingOp`]: inputs `x`, `a` and the output gradient
/// `[b, h, w, C + 1]`; output the flat packing `[gx | ga | g_affine]`.
struct CouplingBackward {
    perm: Vec<u32>,
    affine: AffineValues,
}

/// The global affine (`[2, C]`: scales, offsets) as a backward kernel reads it.
enum AffineValues {
    Host {
        scale: Vec<f32>,
        offset: Vec<f32>,
    },
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    Device(Tensor),
}

/// The launch shapes of a CUDA coupling call.
#[cfg(feature = "cuda")]
fn cuda_dims(pixels: usize, c: usize, x_c: usize, x_rs: usize) -> ff_kernels::cuda::CouplingDims {
    ff_kernels::cuda::CouplingDims {
        pixels,
        channels: c,
        x_channels: x_c,
        x_pixel_stride: x_rs,
        clamp: AFFINE_CLAMPING as f32,
        subnet_scale: SUBNET_SCALE as f32,
    }
}

impl CustomOp3 for CouplingBackward {
    fn name(&self) -> &'static str {
        "ff-affine-coupling-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let name = self.name();
        let c = self.perm.len();
        let (xv, a, g) = host_operands(
            name,
            c,
            [(s1, l1), (s2, l2), (s3, l3)],
            "a and the gradient",
        )?;
        let [b, h, w, x_c] = xv.dims();
        let (n, c2, oc) = (b * h * w, c / 2, c + 1);
        if a.len() != n * 2 * c2 || g.len() != n * oc {
            candle_core::bail!("{name}: inconsistent shapes")
        }
        let AffineValues::Host { scale, offset } = &self.affine else {
            candle_core::bail!("{name}: the affine of a CPU step is on another device")
        };
        // One allocation for the packed result: growing `gx` into it would
        // copy the whole map and fault in a second full-size buffer.
        let len = n * x_c + n * 2 * c2 + 2 * c;
        let mut out = ff_kernels::zeroed(len);
        let (gx, rest) = out.split_at_mut(n * x_c);
        let (ga, gf) = rest.split_at_mut(n * 2 * c2);
        let cp = coupling(&self.perm, scale, offset);
        let g_affine = ff_kernels::coupling_backward(&cp, xv, a, g, gx, ga)
            .map_err(candle_core::Error::wrap)?;
        for (dst, v) in gf.iter_mut().zip(&g_affine) {
            *dst = *v as f32;
        }
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let name = self.name();
        let c = self.perm.len();
        let ops = Operands::of(name, c, l1, l2, l3, "a and the gradient")?;
        let ([_, _, _, x_c], (x_off, x_rs), n) = (ops.dims, ops.x_rows, ops.pixels());
        let c2 = c / 2;
        let ((a0, a1), (g0, g1)) = (ops.second, ops.third);
        let AffineValues::Device(affine) = &self.affine else {
            candle_core::bail!("{name}: the affine of a CUDA step is in host memory")
        };
        let (affine_storage, affine_layout) = affine.storage_and_layout();
        let candle_core::Storage::Cuda(affine_storage) = &*affine_storage else {
            candle_core::bail!("{name}: the affine is not on the GPU")
        };
        let f0 = affine_layout.start_offset();
        let dev = s1.device.clone();
        let stream = dev.cuda_stream();
        let (x, a, g, affine) = (
            s1.as_cuda_slice::<f32>()?,
            s2.as_cuda_slice::<f32>()?,
            s3.as_cuda_slice::<f32>()?,
            affine_storage.as_cuda_slice::<f32>()?,
        );
        let perm = stream
            .clone_htod(&self.perm)
            .map_err(candle_core::Error::wrap)?;
        let len = n * x_c + n * 2 * c2 + 2 * c;
        let mut packed = dev.alloc_zeros::<f32>(len)?;
        {
            let (mut gx, mut rest) = packed.split_at_mut(n * x_c);
            let (mut ga, mut g_affine) = rest.split_at_mut(n * 2 * c2);
            ff_kernels::cuda::coupling_backward(
                &stream,
                &cuda_dims(n, c, x_c, x_rs),
                &x.slice(x_off..),
                &a.slice(a0..a1),
                &g.slice(g0..g1),
                &perm.slice(..),
                &affine.slice(f0..f0 + c),
                &mut gx,
                &mut ga,
                &mut g_affine,
            )
            .map_err(candle_core::Error::wrap)?;
        }
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(packed, dev),
            Shape::from(len),
        ))
    }
}
