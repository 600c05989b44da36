//! What both convolution algorithms (direct, `conv.rs`; Winograd,
//! `winograd.rs`) share: channels-last views with checked extents, the
//! convolution's geometry, the fused epilogue, and the gather of a
//! zero-padded input window.

use crate::error::{shape_error, Result};
use crate::micro::LANES;

/// The shape of one convolution (square kernel, equal stride and zero padding
/// on both axes, no dilation, no groups).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGeometry {
    /// Input channels.
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Kernel size `k` (`k x k`).
    pub kernel: usize,
    /// Stride on both axes.
    pub stride: usize,
    /// Zero padding on every side.
    pub padding: usize,
}

impl ConvGeometry {
    /// The output size for an `h x w` input, PyTorch's arithmetic:
    /// `(h + 2p - k) / s + 1`; `None` where the padded input is smaller than
    /// the kernel.
    pub fn output_size(&self, h: usize, w: usize) -> Option<(usize, usize)> {
        let (k, s, p) = (self.kernel, self.stride, self.padding);
        if h + 2 * p < k || w + 2 * p < k || s == 0 {
            return None;
        }
        Some(((h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1))
    }

    pub(crate) fn check(&self) -> Result<()> {
        if self.in_channels == 0 || self.out_channels == 0 || self.kernel == 0 || self.stride == 0 {
            return Err(shape_error(
                "convolution geometry",
                "non-zero channels, kernel and stride",
                format!("{self:?}"),
            ));
        }
        Ok(())
    }
}

/// An elementwise activation applied to a convolution's input as it is
/// gathered, or to its output in the epilogue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Activation {
    /// Values pass unchanged.
    #[default]
    Identity,
    /// `max(x, 0)`.
    Relu,
    /// `x Phi(x)` with the exact (erf) normal CDF, PyTorch's default `GELU`
    /// (the erf within 6e-7, Abramowitz and Stegun 7.1.26).
    GeluErf,
}

impl Activation {
    #[inline(always)]
    pub(crate) fn apply(self, v: f32) -> f32 {
        match self {
            Activation::Identity => v,
            Activation::Relu => v.max(0.0),
            Activation::GeluErf => crate::math::gelu_erf(v),
        }
    }

    /// [`Activation::apply`] on a whole block of lanes, the activation chosen
    /// once outside the lane loop, so the loop is one vector pass (GELU's erf
    /// and exp included).
    #[inline(always)]
    pub(crate) fn apply_block(self, mut v: [f32; LANES]) -> [f32; LANES] {
        // Loops in place rather than `array::map`, which did not inline into
        // one vector pass (GELU was 4% of a CaiT forward as `try_map`).
        match self {
            Activation::Identity => {}
            Activation::Relu => v.iter_mut().for_each(|x| *x = x.max(0.0)),
            Activation::GeluErf => v.iter_mut().for_each(|x| *x = crate::math::gelu_erf(*x)),
        }
        v
    }
}

/// The first `n` (at most 16) values of `src` as a block of lanes, zero past
/// `n`; a whole block is one fixed-size copy (no zero-fill, no memcpy call).
#[inline(always)]
pub(crate) fn load_lanes(src: &[f32], n: usize) -> [f32; LANES] {
    if n == LANES {
        if let Ok(a) = <[f32; LANES]>::try_from(&src[..LANES]) {
            return a;
        }
    }
    let mut a = [0f32; LANES];
    a[..n].copy_from_slice(&src[..n]);
    a
}

/// Stores the first `dst.len()` (at most 16) lanes of `v` into `dst`; a
/// whole block is one fixed-size store (no memcpy call).
#[inline(always)]
pub(crate) fn store_lanes(v: &[f32; LANES], dst: &mut [f32]) {
    match <&mut [f32; LANES]>::try_from(&mut *dst) {
        Ok(d) => *d = *v,
        Err(_) => {
            let n = dst.len();
            dst.copy_from_slice(&v[..n]);
        }
    }
}

/// A read-only NHWC feature map whose pixels lie `pixel_stride` elements
/// apart and whose first `channels` channels are read: a contiguous map, or
/// the leading channels of a wider one.
///
/// Element `(b, y, x, c)` is `data[((b h + y) w + x) pixel_stride + c]`.
#[derive(Debug, Clone, Copy)]
pub struct NhwcRef<'a> {
    pub(crate) data: &'a [f32],
    pub(crate) dims: [usize; 4],
    pub(crate) pixel_stride: usize,
}

impl<'a> NhwcRef<'a> {
    /// A contiguous `[n, h, w, c]` map.
    pub fn new(data: &'a [f32], dims: [usize; 4]) -> Result<Self> {
        Self::strided(data, dims, dims[3])
    }

    /// The first `dims[3]` channels of a map whose pixels are `pixel_stride`
    /// elements apart (`pixel_stride >= dims[3]`).
    pub fn strided(data: &'a [f32], dims: [usize; 4], pixel_stride: usize) -> Result<Self> {
        let [n, h, w, c] = dims;
        let pixels = n * h * w;
        let needed = if pixels == 0 {
            0
        } else {
            (pixels - 1) * pixel_stride + c
        };
        if pixel_stride < c || data.len() < needed {
            return Err(shape_error(
                "NHWC map",
                format!("at least {needed} values for {dims:?} with pixel stride {pixel_stride}"),
                data.len(),
            ));
        }
        Ok(Self {
            data,
            dims,
            pixel_stride,
        })
    }

    /// `[n, h, w, c]`.
    pub fn dims(&self) -> [usize; 4] {
        self.dims
    }

    /// Elements between two pixels.
    pub fn pixel_stride(&self) -> usize {
        self.pixel_stride
    }

    /// The underlying values.
    pub(crate) fn data(&self) -> &'a [f32] {
        self.data
    }

    /// The channels of pixel `(b, y, x)`.
    #[inline(always)]
    pub(crate) fn pixel_at(&self, b: usize, y: usize, x: usize) -> &'a [f32] {
        let [_, h, w, c] = self.dims;
        let start = ((b * h + y) * w + x) * self.pixel_stride;
        &self.data[start..start + c]
    }
}

/// A writable NHWC map; see [`NhwcRef`] for the layout.
#[derive(Debug)]
pub struct NhwcMut<'a> {
    pub(crate) data: &'a mut [f32],
    pub(crate) dims: [usize; 4],
    pub(crate) pixel_stride: usize,
}

impl<'a> NhwcMut<'a> {
    /// A contiguous `[n, h, w, c]` map.
    pub fn new(data: &'a mut [f32], dims: [usize; 4]) -> Result<Self> {
        Self::strided(data, dims, dims[3])
    }

    /// The first `dims[3]` channels of a map whose pixels are `pixel_stride`
    /// elements apart; the other channels are never written.
    pub fn strided(data: &'a mut [f32], dims: [usize; 4], pixel_stride: usize) -> Result<Self> {
        NhwcRef::strided(data, dims, pixel_stride)?;
        Ok(Self {
            data,
            dims,
            pixel_stride,
        })
    }

    /// `[n, h, w, c]`.
    pub fn dims(&self) -> [usize; 4] {
        self.dims
    }

    /// Elements between two pixels.
    pub fn pixel_stride(&self) -> usize {
        self.pixel_stride
    }

    /// The same view for a shorter borrow, so that two passes can write
    /// through one view in turn.
    pub fn reborrow(&mut self) -> NhwcMut<'_> {
        NhwcMut {
            data: &mut *self.data,
            dims: self.dims,
            pixel_stride: self.pixel_stride,
        }
    }

    pub(crate) fn into_data(self) -> &'a mut [f32] {
        self.data
    }
}

/// What the convolution does to each output value after the sum: add the
/// bias, then `residual` (same shape as the output) if given, then the
/// activation.
#[derive(Debug, Clone, Copy, Default)]
pub struct Epilogue<'a> {
    /// A map added to the output before the activation.
    pub residual: Option<NhwcRef<'a>>,
    /// Applied last.
    pub activation: Activation,
}

/// Copies input rows `y0 - p .. y0 - p + k` of image `b`, zero-padded to
/// `wp` pixels (`p` zeros on the left), with the activation applied, into
/// `window` (`[k][wp][C]`).
#[allow(clippy::too_many_arguments)]
#[inline(never)]
pub(crate) fn gather_window(
    input: &NhwcRef,
    act: Activation,
    b: usize,
    y0: usize,
    k: usize,
    p: usize,
    wp: usize,
    window: &mut Vec<f32>,
) {
    let [_, h, w, c] = input.dims;
    // Only the padding is zeroed; the copied pixels overwrite the rest.
    window.resize(k * wp * c, 0.0);
    let copied = w.min(wp - p);
    for ky in 0..k {
        let dst_row = &mut window[ky * wp * c..(ky + 1) * wp * c];
        let Some(iy) = (y0 + ky).checked_sub(p).filter(|&v| v < h) else {
            dst_row.fill(0.0);
            continue;
        };
        dst_row[..p * c].fill(0.0);
        dst_row[(p + copied) * c..].fill(0.0);
        for ix in 0..copied {
            let src = input.pixel_at(b, iy, ix);
            let dst = &mut dst_row[(ix + p) * c..(ix + p + 1) * c];
            match act {
                Activation::Identity => dst.copy_from_slice(src),
                Activation::Relu => {
                    for (d, &v) in dst.iter_mut().zip(src) {
                        *d = v.max(0.0);
                    }
                }
                Activation::GeluErf => {
                    for (d, &v) in dst.iter_mut().zip(src) {
                        *d = crate::math::gelu_erf(v);
                    }
                }
            }
        }
    }
}

/// Splits channel-major planes `[n][C][plane_len]` into one task per image
/// and group of 16 channels: `(image, group, that group's planes)`, so that
/// each task reads a pixel's 16 channels as one cache line and writes them
/// to its 16 planes.
pub(crate) fn plane_groups(
    planes: &mut [f32],
    c: usize,
    plane_len: usize,
) -> Vec<(usize, usize, &mut [f32])> {
    planes
        .chunks_mut(c * plane_len)
        .enumerate()
        .flat_map(|(b, image)| {
            image
                .chunks_mut(LANES * plane_len)
                .enumerate()
                .map(move |(gi, chunk)| (b, gi, chunk))
        })
        .collect()
}
