//! Scalar `f32` functions written branch-free so that the loops over them
//! vectorise: `exp`, `tanh`, `erf` and PyTorch's erf `GELU`, shared by the
//! coupling step, the convolution epilogue and the row kernels.

/// `e^x` in f32 within 2 ulp on [-87, 88] (Cephes `expf`: range reduction
/// by `ln 2`, a degree-6 polynomial), branch-free so that loops over it
/// vectorise; inputs below -87 give 0-ish subnormals, above 88 give `inf`.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 2^23: adding it rounds to the nearest integer in the low bits.
    const MAGIC: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.5);
    let t = x * LOG2E + MAGIC;
    let n = t - MAGIC;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_2e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5e-1;
    let er = p * r * r + r + 1.0;
    // 2^n from the integer in t's low mantissa bits.
    let ni = t.to_bits().wrapping_sub(MAGIC.to_bits()) as i32;
    let two_n = f32::from_bits(((ni + 127) as u32) << 23);
    er * two_n
}

/// `tanh x` in f32 within a few ulp, branch-free: Cephes' odd polynomial
/// below 0.625 in magnitude, `1 - 2 / (e^{2|x|} + 1)` above, with the sign
/// restored.
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    let ax = x.abs();
    let z = x * x;
    let mut p = -5.704_988_7e-3;
    p = p * z + 2.063_909e-2;
    p = p * z - 5.373_971_6e-2;
    p = p * z + 1.333_144_2e-1;
    p = p * z - 3.333_328e-1;
    let small = p * z * x + x;
    let large = 1.0 - 2.0 / (exp(2.0 * ax.min(20.0)) + 1.0);
    let large = large.copysign(x);
    if ax < 0.625 {
        small
    } else {
        large
    }
}

/// `erf x` within 6e-7 absolute in f32 (Abramowitz and Stegun 7.1.26, whose
/// bound is 1.5e-7 in exact arithmetic), branch-free.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let ax = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * ax);
    let mut p = 1.061_405_4;
    p = p * t - 1.453_152;
    p = p * t + 1.421_413_8;
    p = p * t - 0.284_496_74;
    p = p * t + 0.254_829_6;
    let y = 1.0 - p * t * exp(-ax * ax);
    y.copysign(x)
}

/// PyTorch's default `GELU`: `x / 2 (1 + erf(x / sqrt 2))`.
#[inline(always)]
pub fn gelu_erf(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}
