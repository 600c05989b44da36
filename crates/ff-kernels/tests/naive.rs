//! Every kernel against a naive implementation, on every instruction set this
//! CPU supports: odd channel counts (not multiples of 16), strides, padding,
//! strided (wider) inputs, and every epilogue.

mod common;

use ff_kernels::{
    conv2d_weight_grad, conv2d_weight_grad_with, conv2d_with, max_pool2d, Activation, Algorithm,
    ConvGeometry, Epilogue, Isa, NhwcMut, NhwcRef, PackedConv2d,
};

/// A 3x3, stride-1, "same" convolution of `c` -> `o` channels (the flows'
/// shape, the one every algorithm applies to).
fn same_3x3(c: usize, o: usize) -> ConvGeometry {
    ConvGeometry {
        in_channels: c,
        out_channels: o,
        kernel: 3,
        stride: 1,
        padding: 1,
    }
}

/// The algorithms that apply to `g`.
fn algorithms(g: ConvGeometry) -> Vec<Algorithm> {
    if g.kernel == 3 && g.stride == 1 && g.padding == 1 {
        vec![
            Algorithm::Direct,
            Algorithm::Winograd,
            Algorithm::Winograd4x4,
        ]
    } else {
        vec![Algorithm::Direct]
    }
}

fn act(a: Activation, v: f64) -> f64 {
    match a {
        Activation::Identity => v,
        Activation::Relu => v.max(0.0),
        Activation::GeluErf => f64::from(ff_kernels::coupling::gelu_erf(v as f32)),
    }
}

/// Input `[n, h, w, ps]` of which the first `c` channels are read; weights
/// `[O, C, k, k]`; f64 accumulation.
#[allow(clippy::too_many_arguments)]
fn naive_conv(
    g: ConvGeometry,
    x: &[f32],
    dims: [usize; 4],
    ps: usize,
    wt: &[f32],
    bias: &[f32],
    in_act: Activation,
    residual: Option<&[f32]>,
    out_act: Activation,
) -> (Vec<f32>, usize, usize) {
    let [n, h, w, c] = dims;
    let (oh, ow) = g.output_size(h, w).unwrap();
    let (o, k, s, p) = (g.out_channels, g.kernel, g.stride, g.padding);
    let mut out = vec![0f32; n * oh * ow * o];
    for b in 0..n {
        for oy in 0..oh {
            for ox in 0..ow {
                for oo in 0..o {
                    let mut acc = bias[oo] as f64;
                    for ky in 0..k {
                        for kx in 0..k {
                            let iy = (oy * s + ky) as isize - p as isize;
                            let ix = (ox * s + kx) as isize - p as isize;
                            if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                continue;
                            }
                            for ci in 0..c {
                                let xv = x[((b * h + iy as usize) * w + ix as usize) * ps + ci];
                                acc += act(in_act, xv as f64)
                                    * wt[((oo * c + ci) * k + ky) * k + kx] as f64;
                            }
                        }
                    }
                    let idx = ((b * oh + oy) * ow + ox) * o + oo;
                    if let Some(r) = residual {
                        acc += r[idx] as f64;
                    }
                    out[idx] = act(out_act, acc) as f32;
                }
            }
        }
    }
    (out, oh, ow)
}

fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!(
            (a - b).abs() <= tol * scale,
            "{what}: element {i}: {a} vs {b} (scale {scale})"
        );
    }
}

const CASES: &[(usize, usize, usize, usize, usize, usize, usize)] = &[
    // (c, o, k, stride, padding, h, w)
    (3, 64, 7, 2, 3, 21, 19),
    (16, 64, 3, 1, 1, 9, 14),
    (32, 61, 3, 1, 1, 7, 13),
    (64, 128, 1, 2, 0, 8, 8),
    (5, 20, 3, 2, 1, 11, 9),
    (12, 96, 3, 1, 1, 5, 30),
    (7, 33, 1, 1, 0, 3, 17),
    (8, 16, 3, 1, 1, 1, 1),
    // Winograd F(4x4, 3x3)'s error grows with the channel count.
    (160, 24, 3, 1, 1, 10, 11),
];

#[test]
fn conv2d_matches_naive_on_every_isa() {
    for isa in Isa::supported() {
        for (case, &(c, o, k, s, p, h, w)) in CASES.iter().enumerate() {
            let g = ConvGeometry {
                in_channels: c,
                out_channels: o,
                kernel: k,
                stride: s,
                padding: p,
            };
            let n = 2;
            let ps = c + 3; // a wider map: only the first c channels are read
            let x = common::values(n * h * w * ps, case as u64, 1.0, 0.0);
            let wt = common::values(o * c * k * k, 100 + case as u64, 1.0, 0.0);
            let bias = common::values(o, 200 + case as u64, 1.0, 0.0);
            let (oh, ow) = g.output_size(h, w).unwrap();
            let res = common::values(n * oh * ow * o, 300 + case as u64, 1.0, 0.0);
            for algorithm in algorithms(g) {
                let packed = PackedConv2d::from_oihw(g, Some(algorithm), &wt, Some(&bias)).unwrap();
                assert_eq!(packed.algorithm(), algorithm);
                for (in_act, residual, out_act) in [
                    (Activation::Identity, false, Activation::Identity),
                    (Activation::Relu, false, Activation::Identity),
                    (Activation::Identity, true, Activation::Relu),
                    (Activation::Relu, true, Activation::Relu),
                ] {
                    let input = NhwcRef::strided(&x, [n, h, w, c], ps).unwrap();
                    let r = residual.then(|| NhwcRef::new(&res, [n, oh, ow, o]).unwrap());
                    let (want, _, _) = naive_conv(
                        g,
                        &x,
                        [n, h, w, c],
                        ps,
                        &wt,
                        &bias,
                        in_act,
                        residual.then_some(res.as_slice()),
                        out_act,
                    );
                    // A wider output: the extra channels must stay untouched.
                    let ops = o + 2;
                    let mut out = vec![f32::NAN; n * oh * ow * ops];
                    let epilogue = Epilogue {
                        residual: r,
                        activation: out_act,
                    };
                    let dst = NhwcMut::strided(&mut out, [n, oh, ow, o], ops).unwrap();
                    conv2d_with(isa, &packed, input, in_act, epilogue, dst).unwrap();
                    let got: Vec<f32> = out
                        .chunks_exact(ops)
                        .flat_map(|px| px[..o].to_vec())
                        .collect();
                    let what = format!(
                    "{isa:?} {algorithm:?} case {case} {in_act:?} residual {residual} {out_act:?}"
                );
                    assert_close(&what, &got, &want, 1e-5);
                    assert!(
                        out.chunks_exact(ops)
                            .all(|px| px[o..].iter().all(|v| v.is_nan())),
                        "{what}: wrote past the channels"
                    );
                }
            }
        }
    }
}

/// The weight gradient (input ReLU folded in) of `g` on `isa` through
/// `algorithm`, for an input `x` and output gradient `gy` of `[n, h, w]`
/// pixels (stride 1, "same" padding).
fn weight_grad(
    isa: Isa,
    algorithm: Algorithm,
    g: ConvGeometry,
    x: &[f32],
    gy: &[f32],
    [n, h, w]: [usize; 3],
) -> Vec<f32> {
    let (c, o, k) = (g.in_channels, g.out_channels, g.kernel);
    let mut dw = vec![f32::NAN; (k * k * c + 1) * o];
    conv2d_weight_grad_with(
        isa,
        Some(algorithm),
        g,
        NhwcRef::new(x, [n, h, w, c]).unwrap(),
        Activation::Relu,
        NhwcRef::new(gy, [n, h, w, o]).unwrap(),
        &mut dw,
    )
    .unwrap();
    dw
}

#[test]
fn gradients_match_naive_on_every_isa() {
    // Stride-1 "same" convolutions, as in the flows, from the rows layout.
    for isa in Isa::supported() {
        for (case, &(c, o, k, h, w)) in [
            (16usize, 32usize, 3usize, 6usize, 9usize),
            (32, 61, 3, 5, 5),
            (7, 20, 1, 4, 6),
            (61, 16, 3, 3, 4),
            // Odd sizes (partial tiles) and more than 16 tiles in a row
            // (two lane groups) for the Winograd weight gradient.
            (20, 24, 3, 7, 37),
            // The Winograd weight gradient's cuts: F(4x4, 3x3) with more
            // than 16 tiles in a row, output channels in several slices,
            // input channels in several slices.
            (8, 20, 3, 6, 70),
            (8, 200, 3, 5, 30),
            (300, 16, 3, 4, 6),
        ]
        .iter()
        .enumerate()
        {
            let p = k / 2;
            let g = ConvGeometry {
                in_channels: c,
                out_channels: o,
                kernel: k,
                stride: 1,
                padding: p,
            };
            let n = 2;
            let x = common::values(n * h * w * c, 10 + case as u64, 1.0, 0.0);
            let rows = common::values((k * k * c + 1) * o, 20 + case as u64, 1.0, 0.0);
            let gy = common::values(n * h * w * o, 30 + case as u64, 1.0, 0.0);
            // Naive input gradient: dx[b,y,x,c] = sum_{o,ky,kx} gy[b, y+p-ky, x+p-kx, o] W[o,c,ky,kx].
            let mut want_dx = vec![0f32; n * h * w * c];
            for b in 0..n {
                for y in 0..h {
                    for xx in 0..w {
                        for ci in 0..c {
                            let mut acc = 0f64;
                            for ky in 0..k {
                                for kx in 0..k {
                                    let oy = (y + p) as isize - ky as isize;
                                    let ox = (xx + p) as isize - kx as isize;
                                    if oy < 0 || ox < 0 || oy >= h as isize || ox >= w as isize {
                                        continue;
                                    }
                                    for oo in 0..o {
                                        acc += gy
                                            [((b * h + oy as usize) * w + ox as usize) * o + oo]
                                            as f64
                                            * rows[((ky * k + kx) * c + ci) * o + oo] as f64;
                                    }
                                }
                            }
                            want_dx[((b * h + y) * w + xx) * c + ci] = acc as f32;
                        }
                    }
                }
            }
            for algorithm in algorithms(g) {
                let packed =
                    PackedConv2d::input_gradient_from_rows(g, Some(algorithm), &rows).unwrap();
                let mut dx = vec![0f32; n * h * w * c];
                conv2d_with(
                    isa,
                    &packed,
                    NhwcRef::new(&gy, [n, h, w, o]).unwrap(),
                    Activation::Identity,
                    Epilogue::default(),
                    NhwcMut::new(&mut dx, [n, h, w, c]).unwrap(),
                )
                .unwrap();
                assert_close(
                    &format!("{isa:?} {algorithm:?} input gradient {case}"),
                    &dx,
                    &want_dx,
                    1e-5,
                );
            }

            // Naive weight gradient, input ReLU folded in.
            let ncols = k * k * c + 1;
            let mut want_dw = vec![0f64; ncols * o];
            for b in 0..n {
                for y in 0..h {
                    for xx in 0..w {
                        let g_px = &gy[((b * h + y) * w + xx) * o..][..o];
                        for ky in 0..k {
                            for kx in 0..k {
                                let iy = (y + ky) as isize - p as isize;
                                let ix = (xx + kx) as isize - p as isize;
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                    continue;
                                }
                                for ci in 0..c {
                                    let xv = x[((b * h + iy as usize) * w + ix as usize) * c + ci]
                                        .max(0.0)
                                        as f64;
                                    for oo in 0..o {
                                        want_dw[((ky * k + kx) * c + ci) * o + oo] +=
                                            xv * g_px[oo] as f64;
                                    }
                                }
                            }
                        }
                        for oo in 0..o {
                            want_dw[k * k * c * o + oo] += g_px[oo] as f64;
                        }
                    }
                }
            }
            let want_dw: Vec<f32> = want_dw.iter().map(|&v| v as f32).collect();
            for algorithm in algorithms(g) {
                let dw = weight_grad(isa, algorithm, g, &x, &gy, [n, h, w]);
                assert_close(
                    &format!("{isa:?} {algorithm:?} weight gradient {case}"),
                    &dw,
                    &want_dw,
                    1e-5,
                );
            }
            // The default choice is one of the two.
            let mut dw = vec![f32::NAN; ncols * o];
            conv2d_weight_grad(
                g,
                NhwcRef::new(&x, [n, h, w, c]).unwrap(),
                Activation::Relu,
                NhwcRef::new(&gy, [n, h, w, o]).unwrap(),
                &mut dw,
            )
            .unwrap();
            assert_close(&format!("weight gradient {case}"), &dw, &want_dw, 1e-5);
        }
    }
}

#[test]
fn pointwise_weight_gradients_match_naive_with_either_map_read_in_place() {
    // 1x1 weight gradients read one map in place as the product's columns:
    // the gradient when its channels fill whole 16-lane blocks, else the
    // input when its do and no activation applies; both from strided
    // (wider) maps, as the flows' channel halves and log-det column are.
    for isa in Isa::supported() {
        for (case, &(c, o, act_in, x_extra, g_extra)) in [
            // The gradient in place (ReLU on the input, odd input channels).
            (7usize, 32usize, Activation::Relu, 0usize, 0usize),
            (7, 32, Activation::Identity, 3, 5),
            // The input in place, the gradient copied (odd output channels).
            (32, 20, Activation::Identity, 0, 0),
            (48, 13, Activation::Identity, 385, 1),
            // An activation keeps the input copied.
            (32, 20, Activation::Relu, 1, 0),
            // Both could: the gradient is read in place.
            (16, 48, Activation::Identity, 0, 2),
        ]
        .iter()
        .enumerate()
        {
            let g = ConvGeometry {
                in_channels: c,
                out_channels: o,
                kernel: 1,
                stride: 1,
                padding: 0,
            };
            let (n, h, w) = (2, 5, 7);
            let (xs, gs) = (c + x_extra, o + g_extra);
            let x = common::values(n * h * w * xs, 40 + case as u64, 1.0, 0.0);
            let gy = common::values(n * h * w * gs, 50 + case as u64, 1.0, 0.0);
            let mut want = vec![0f64; (c + 1) * o];
            for px in 0..n * h * w {
                for oo in 0..o {
                    let gv = f64::from(gy[px * gs + oo]);
                    for ci in 0..c {
                        want[ci * o + oo] += act(act_in, f64::from(x[px * xs + ci])) * gv;
                    }
                    want[c * o + oo] += gv;
                }
            }
            let want: Vec<f32> = want.iter().map(|&v| v as f32).collect();
            let mut dw = vec![f32::NAN; (c + 1) * o];
            conv2d_weight_grad_with(
                isa,
                Some(Algorithm::Direct),
                g,
                NhwcRef::strided(&x, [n, h, w, c], xs).unwrap(),
                act_in,
                NhwcRef::strided(&gy, [n, h, w, o], gs).unwrap(),
                &mut dw,
            )
            .unwrap();
            assert_close(
                &format!("{isa:?} 1x1 weight gradient {case}"),
                &dw,
                &want,
                1e-5,
            );
        }
    }
}

#[test]
fn max_pool_matches_naive_with_negative_values() {
    let (n, h, w, c) = (2, 9, 8, 5);
    let x = common::values(n * h * w * c, 7, 1.0, 0.0);
    let (oh, ow) = ((h + 2 - 3) / 2 + 1, (w + 2 - 3) / 2 + 1);
    let mut out = vec![0f32; n * oh * ow * c];
    max_pool2d(
        NhwcRef::new(&x, [n, h, w, c]).unwrap(),
        3,
        2,
        1,
        NhwcMut::new(&mut out, [n, oh, ow, c]).unwrap(),
    )
    .unwrap();
    for b in 0..n {
        for oy in 0..oh {
            for ox in 0..ow {
                for ci in 0..c {
                    let mut m = f32::NEG_INFINITY;
                    for iy in (oy * 2).saturating_sub(1)..(oy * 2 + 2).min(h) {
                        for ix in (ox * 2).saturating_sub(1)..(ox * 2 + 2).min(w) {
                            m = m.max(x[((b * h + iy) * w + ix) * c + ci]);
                        }
                    }
                    assert_eq!(out[((b * oh + oy) * ow + ox) * c + ci], m);
                }
            }
        }
    }
}

#[test]
fn shape_errors_name_the_argument() {
    let g = same_3x3(4, 8);
    let err = PackedConv2d::from_oihw(g, None, &[0.0; 10], None).unwrap_err();
    assert!(err.to_string().contains("convolution weight"), "{err}");
    let one = ConvGeometry {
        kernel: 1,
        padding: 0,
        ..g
    };
    for algorithm in [Algorithm::Winograd, Algorithm::Winograd4x4] {
        let err = PackedConv2d::from_oihw(one, Some(algorithm), &[0.0; 32], None).unwrap_err();
        assert!(err.to_string().contains("Winograd"), "{err}");
    }
    let packed = PackedConv2d::from_oihw(g, None, &[0.0; 8 * 4 * 9], None).unwrap();
    let x = vec![0f32; 3 * 3 * 5];
    let mut out = vec![0f32; 9 * 8];
    let err = conv2d_with(
        Isa::Portable,
        &packed,
        NhwcRef::new(&x, [1, 3, 3, 5]).unwrap(),
        Activation::Identity,
        Epilogue::default(),
        NhwcMut::new(&mut out, [1, 3, 3, 8]).unwrap(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("input channels"), "{err}");
    assert!(NhwcRef::new(&x, [1, 3, 3, 6]).is_err());
}

#[test]
fn linear_matches_naive_with_bias_and_gelu() {
    use ff_kernels::linear;
    for (rows, inp, out_dim) in [(37usize, 20usize, 33usize), (100, 64, 128), (1, 5, 7)] {
        let x = common::values(rows * inp, 41, 1.0, 0.0);
        let w = common::values(out_dim * inp, 42, 0.3, 0.0);
        let b = common::values(out_dim, 43, 0.5, 0.0);
        let g = ConvGeometry {
            in_channels: inp,
            out_channels: out_dim,
            kernel: 1,
            stride: 1,
            padding: 0,
        };
        let packed = PackedConv2d::from_oihw(g, None, &w, Some(&b)).unwrap();
        for act in [Activation::Identity, Activation::GeluErf] {
            let mut got = vec![f32::NAN; rows * out_dim];
            linear(&packed, &x, act, &mut got).unwrap();
            for r in 0..rows {
                for o in 0..out_dim {
                    let mut acc = f64::from(b[o]);
                    for i in 0..inp {
                        acc += f64::from(x[r * inp + i]) * f64::from(w[o * inp + i]);
                    }
                    let want = match act {
                        Activation::GeluErf => {
                            f64::from(ff_kernels::coupling::gelu_erf(acc as f32))
                        }
                        _ => acc,
                    };
                    let v = f64::from(got[r * out_dim + o]);
                    assert!(
                        (v - want).abs() < 1e-5,
                        "{act:?} {rows}x{inp}->{out_dim} at {r},{o}: {v} vs {want}"
                    );
                }
            }
        }
    }
    let g3 = same_3x3(4, 4);
    let packed = PackedConv2d::from_oihw(g3, Some(Algorithm::Direct), &[0.0; 144], None).unwrap();
    assert!(ff_kernels::linear(&packed, &[0.0; 8], Activation::Identity, &mut [0.0; 8]).is_err());
}

#[test]
fn winograd_weight_gradients_of_one_shape_called_again_match_the_direct_one() {
    // The Winograd weight gradient keeps its zero-padded input planes per
    // thread for the next call of the same shape: a second input (and a
    // shape in between) must not see the first one's values.
    let (n, h, w) = (2, 9, 26);
    for isa in Isa::supported() {
        // The same shape three times, each time with new values.
        for (call, (c, o)) in [(24usize, 40usize), (24, 40), (40, 24), (24, 40)]
            .into_iter()
            .enumerate()
        {
            let g = same_3x3(c, o);
            let seed = 100 * call as u64 + isa as u64;
            let x = common::values(n * h * w * c, seed, 1.0, 0.0);
            let gy = common::values(n * h * w * o, seed + 1, 1.0, 0.0);
            let grad = |algorithm| weight_grad(isa, algorithm, g, &x, &gy, [n, h, w]);
            let want = grad(Algorithm::Direct);
            for algorithm in [Algorithm::Winograd, Algorithm::Winograd4x4] {
                let what = format!("{isa:?} {algorithm:?} {c} -> {o}");
                assert_close(&what, &grad(algorithm), &want, 1e-5);
            }
        }
    }
}

#[test]
fn winograd_weight_gradients_do_not_depend_on_the_thread_count() {
    // The tiles are dealt into runs fixed by the shapes (at most 8, fewer
    // when their accumulators would not fit in 16 MB together) and the
    // planes' products are shared with the pool: 1, 2 or 3 threads must
    // give the same bits. Shapes: 8 runs (many small tiles), the cap on
    // the accumulators binding (36 x 384 x 320 values each), and odd
    // channel counts.
    for (c, o, n, h, w) in [
        (8usize, 16usize, 2usize, 96usize, 96usize),
        (384, 320, 2, 8, 40),
        (61, 37, 3, 9, 26),
    ] {
        let g = same_3x3(c, o);
        let x = common::values(n * h * w * c, 61 + c as u64, 1.0, 0.0);
        let gy = common::values(n * h * w * o, 62 + o as u64, 1.0, 0.0);
        for isa in Isa::supported() {
            for algorithm in [Algorithm::Winograd, Algorithm::Winograd4x4] {
                let in_pool = |threads: usize| {
                    rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .unwrap()
                        .install(|| weight_grad(isa, algorithm, g, &x, &gy, [n, h, w]))
                };
                let one = in_pool(1);
                assert!(one.iter().all(|v| v.is_finite()));
                for threads in [2, 3] {
                    let many = in_pool(threads);
                    let same = one
                        .iter()
                        .zip(&many)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(
                        same,
                        "{isa:?} {algorithm:?} {c} -> {o}: {threads} threads differ from 1"
                    );
                }
            }
        }
    }
}
