//! The coupling kernel and its vectorised exp/tanh against f64 references.

mod common;

use common::values;
use ff_kernels::coupling::{erf, exp, gelu_erf, tanh};
use ff_kernels::{coupling_backward, coupling_forward, Coupling, NhwcRef};

#[test]
fn exp_and_tanh_are_accurate() {
    let mut worst_exp = 0f64;
    let mut worst_tanh = 0f64;
    let mut x = -80f32;
    while x < 80.0 {
        let want = f64::from(x).exp();
        worst_exp = worst_exp.max(((f64::from(exp(x)) - want) / want).abs());
        let want = f64::from(x).tanh();
        let err = (f64::from(tanh(x)) - want).abs() / want.abs().max(1e-30);
        worst_tanh = worst_tanh.max(err);
        x += 0.001_37;
    }
    // A few ulp of f32 (ulp = 1.2e-7 relative).
    assert!(worst_exp < 4e-7, "exp: relative error {worst_exp}");
    assert!(worst_tanh < 6e-7, "tanh: relative error {worst_tanh}");
    assert_eq!(tanh(0.0), 0.0);
    assert_eq!(tanh(30.0), 1.0);
    assert_eq!(tanh(-30.0), -1.0);
    assert!(exp(200.0).is_infinite() || exp(200.0) > 1e38);
    assert!(exp(-200.0) < 1e-37);

    let mut worst_erf = 0f64;
    let mut worst_gelu = 0f64;
    let mut x = -8f32;
    while x < 8.0 {
        let xd = f64::from(x);
        // erf from f64 via its series-free identity: erf = 2 Phi(x sqrt 2) - 1
        // is circular, so compare with a high-order reference instead.
        let want = erf_f64(xd);
        worst_erf = worst_erf.max((f64::from(erf(x)) - want).abs());
        let want_gelu = 0.5 * xd * (1.0 + erf_f64(xd / std::f64::consts::SQRT_2));
        worst_gelu = worst_gelu.max((f64::from(gelu_erf(x)) - want_gelu).abs() / xd.abs().max(1.0));
        x += 0.000_97;
    }
    assert!(worst_erf < 6e-7, "erf: absolute error {worst_erf}");
    assert!(worst_gelu < 6e-7, "gelu: error {worst_gelu}");
}

/// erf in f64 to ~1e-15 (Taylor series near 0, continued fraction beyond).
fn erf_f64(x: f64) -> f64 {
    let ax = x.abs();
    let v = if ax < 2.5 {
        // sum_n (-1)^n x^(2n+1) / (n! (2n+1))
        let mut term = ax;
        let mut sum = ax;
        let mut n = 0.0;
        while term.abs() > 1e-17 {
            n += 1.0;
            term *= -ax * ax / n;
            sum += term / (2.0 * n + 1.0);
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        // erfc by the continued fraction (Lentz), then 1 - erfc.
        let mut f = ax;
        for k in (1..60).rev() {
            f = ax + (k as f64 / 2.0) / f;
        }
        1.0 - (-ax * ax).exp() / (f * std::f64::consts::PI.sqrt())
    };
    v.copysign(x)
}

#[test]
fn coupling_matches_f64_reference_forward_and_backward() {
    for (c, carry) in [(8usize, false), (7, true), (64, true), (61, false)] {
        let (c1, c2) = (c - c / 2, c / 2);
        let (n, h, w) = (2, 3, 5);
        let pixels = n * h * w;
        let x_c = if carry { c + 1 } else { c };
        let x = values(pixels * x_c, c as u64, 2.0, 0.0);
        let a = values(pixels * 2 * c2, 10 + c as u64, 8.0, 0.0);
        let scale = values(c, 20, 1.0, 0.0)
            .iter()
            .map(|v| 1.0 + 0.5 * v)
            .collect::<Vec<_>>();
        let offset = values(c, 21, 0.3, 0.0);
        let perm: Vec<u32> = (0..c as u32).map(|j| (j * 5 + 3) % c as u32).collect();
        let mut sorted = perm.clone();
        sorted.sort_unstable();
        if sorted != (0..c as u32).collect::<Vec<_>>() {
            continue; // 5 shares a factor with c: not a permutation
        }
        let cp = Coupling {
            perm: &perm,
            scale: &scale,
            offset: &offset,
            clamp: 2.0,
            subnet_scale: 0.1,
        };
        let xv = NhwcRef::new(&x, [n, h, w, x_c]).unwrap();
        let mut out = vec![0f32; pixels * (c + 1)];
        coupling_forward(&cp, xv, &a, &mut out).unwrap();
        let grad = values(pixels * (c + 1), 30 + c as u64, 1.0, 0.0);
        let mut gx = vec![0f32; pixels * x_c];
        let mut ga = vec![0f32; pixels * 2 * c2];
        let g_aff = coupling_backward(&cp, xv, &a, &grad, &mut gx, &mut ga).unwrap();

        let mut want_aff = vec![0f64; 2 * c];
        for p in 0..pixels {
            let xr = &x[p * x_c..(p + 1) * x_c];
            let ar = &a[p * 2 * c2..(p + 1) * 2 * c2];
            let gr = &grad[p * (c + 1)..(p + 1) * (c + 1)];
            let mut pre = vec![0f64; c];
            let mut ld = if carry { f64::from(xr[c]) } else { 0.0 };
            let mut s = vec![0f64; c2];
            for i in 0..c1 {
                pre[i] = f64::from(xr[i]);
            }
            for i in 0..c2 {
                s[i] = 2.0 * (0.1 * f64::from(ar[i])).tanh();
                ld += s[i];
                pre[c1 + i] = f64::from(xr[c1 + i]) * s[i].exp() + 0.1 * f64::from(ar[c2 + i]);
            }
            let mut gpre = vec![0f64; c];
            for j in 0..c {
                let q = perm[j] as usize;
                let want = pre[q] * f64::from(scale[q]) + f64::from(offset[q]);
                let got = f64::from(out[p * (c + 1) + j]);
                assert!(
                    (got - want).abs() < 2e-6 * want.abs().max(1.0),
                    "c {c}: out {got} vs {want}"
                );
                gpre[q] = f64::from(gr[j]) * f64::from(scale[q]);
                want_aff[q] += f64::from(gr[j]) * pre[q];
                want_aff[c + q] += f64::from(gr[j]);
            }
            let got_ld = f64::from(out[p * (c + 1) + c]);
            assert!(
                (got_ld - ld).abs() < 2e-5 * ld.abs().max(1.0),
                "c {c}: log-det {got_ld} vs {ld}"
            );
            let gl = f64::from(gr[c]);
            for i in 0..c {
                let want = if i < c1 {
                    gpre[i]
                } else {
                    gpre[i] * s[i - c1].exp()
                };
                let got = f64::from(gx[p * x_c + i]);
                assert!(
                    (got - want).abs() < 2e-6 * want.abs().max(1.0),
                    "c {c}: gx {got} vs {want}"
                );
            }
            if carry {
                assert_eq!(gx[p * x_c + c], gr[c]);
            }
            for i in 0..c2 {
                let th = s[i] / 2.0;
                let ds = gpre[c1 + i] * f64::from(xr[c1 + i]) * s[i].exp() + gl;
                let want = ds * 2.0 * 0.1 * (1.0 - th * th);
                let got = f64::from(ga[p * 2 * c2 + i]);
                assert!(
                    (got - want).abs() < 2e-6 * want.abs().max(1.0),
                    "c {c}: ga {got} vs {want}"
                );
                let want_t = 0.1 * gpre[c1 + i];
                assert!((f64::from(ga[p * 2 * c2 + c2 + i]) - want_t).abs() < 1e-6);
            }
        }
        for (g, w) in g_aff.iter().zip(&want_aff) {
            assert!(
                (g - w).abs() < 1e-4 * w.abs().max(1.0),
                "c {c}: affine gradient {g} vs {w}"
            );
        }
    }
}
