//! The layer norm kernels against an f64 reference, with image sizes that are
//! not multiples of the kernels' chunk size.

mod common;

use common::values;
use ff_kernels::{fingerprint, layer_norm_backward, layer_norm_forward, transpose};

#[test]
fn layer_norm_matches_f64_reference_with_gradients() {
    for (n, s) in [(3usize, 40_000usize), (2, 7), (1, 16 * 1024)] {
        let x = values(n * s, 1, 3.0, 0.7);
        let w = values(s, 2, 1.0, 1.0);
        let bias = values(s, 3, 0.5, 0.0);
        let gy = values(n * s, 4, 1.0, 0.1);
        let eps = 1e-5;
        let mut y = vec![0f32; n * s];
        let stats = layer_norm_forward(&x, n, &w, &bias, eps, &mut y).unwrap();
        let mut gx = vec![0f32; n * s];
        let mut gw = vec![f32::NAN; s];
        let mut gb = vec![f32::NAN; s];
        layer_norm_backward(&x, n, &w, &stats, &gy, &mut gx, &mut gw, &mut gb).unwrap();

        let mut want_gw = vec![0f64; s];
        let mut want_gb = vec![0f64; s];
        for b in 0..n {
            let xi: Vec<f64> = x[b * s..(b + 1) * s]
                .iter()
                .map(|&v| f64::from(v))
                .collect();
            let mean = xi.iter().sum::<f64>() / s as f64;
            let var = xi.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / s as f64;
            let rstd = 1.0 / (var + eps).sqrt();
            let xhat: Vec<f64> = xi.iter().map(|v| (v - mean) * rstd).collect();
            let g: Vec<f64> = (0..s)
                .map(|i| f64::from(gy[b * s + i]) * f64::from(w[i]))
                .collect();
            let m_g = g.iter().sum::<f64>() / s as f64;
            let m_gx = g.iter().zip(&xhat).map(|(a, b)| a * b).sum::<f64>() / s as f64;
            for i in 0..s {
                let want_y = xhat[i] * f64::from(w[i]) + f64::from(bias[i]);
                assert!(
                    (f64::from(y[b * s + i]) - want_y).abs() < 1e-5,
                    "y at {b},{i}"
                );
                let want_gx = rstd * (g[i] - m_g - xhat[i] * m_gx);
                assert!(
                    (f64::from(gx[b * s + i]) - want_gx).abs() < 1e-4 * want_gx.abs().max(1.0),
                    "gx at {b},{i}"
                );
                want_gw[i] += f64::from(gy[b * s + i]) * xhat[i];
                want_gb[i] += f64::from(gy[b * s + i]);
            }
        }
        for i in 0..s {
            assert!((f64::from(gw[i]) - want_gw[i]).abs() < 1e-4, "gw at {i}");
            assert!((f64::from(gb[i]) - want_gb[i]).abs() < 1e-4, "gb at {i}");
        }
    }
    let err =
        layer_norm_forward(&[0.0; 10], 3, &[1.0; 3], &[0.0; 3], 1e-5, &mut [0.0; 10]).unwrap_err();
    assert!(err.to_string().contains("layer norm"), "{err}");
}

#[test]
fn transpose_matches_index_swap() {
    for (r, c) in [(1usize, 1usize), (17, 33), (64, 16), (3, 100)] {
        let src: Vec<f32> = (0..r * c).map(|v| v as f32).collect();
        let mut dst = vec![0f32; r * c];
        transpose(&src, r, c, &mut dst).unwrap();
        for i in 0..r {
            for j in 0..c {
                assert_eq!(dst[j * r + i], src[i * c + j]);
            }
        }
    }
    assert!(transpose(&[0.0; 5], 2, 3, &mut [0.0; 6]).is_err());
}

#[test]
fn fingerprints_change_with_any_value_and_with_order() {
    let base = values(1000, 9, 1.0, 0.0);
    let f = fingerprint(&base);
    assert_eq!(f, fingerprint(&base.clone()));
    for i in [0usize, 15, 16, 500, 999] {
        let mut changed = base.clone();
        changed[i] = f32::from_bits(changed[i].to_bits() ^ 1);
        assert_ne!(fingerprint(&changed), f, "one bit of value {i}");
    }
    let mut swapped = base.clone();
    swapped.swap(3, 4);
    assert_ne!(fingerprint(&swapped), f, "two values swapped");
    assert_ne!(fingerprint(&base[..999]), f, "one value fewer");
    assert_ne!(fingerprint(&[0.0; 16]), fingerprint(&[0.0; 17]));
}

#[test]
fn row_softmax_and_layer_norm_match_f64() {
    use ff_kernels::{layer_norm_rows, softmax_rows};
    for (rows, cols) in [(3usize, 768usize), (50, 17), (1, 1), (40, 577)] {
        let x = values(rows * cols, 77, 6.0, 0.5);
        let w = values(cols, 78, 1.0, 1.0);
        let b = values(cols, 79, 0.5, 0.0);
        let mut sm = x.clone();
        softmax_rows(&mut sm, cols).unwrap();
        let mut ln = vec![0f32; rows * cols];
        layer_norm_rows(&x, cols, &w, &b, 1e-6, &mut ln).unwrap();
        for r in 0..rows {
            let row: Vec<f64> = x[r * cols..(r + 1) * cols]
                .iter()
                .map(|&v| f64::from(v))
                .collect();
            let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = row.iter().map(|v| (v - max).exp()).sum();
            let mean = row.iter().sum::<f64>() / cols as f64;
            let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / cols as f64;
            for (c, v) in row.iter().enumerate() {
                let want = (v - max).exp() / z;
                let got = f64::from(sm[r * cols + c]);
                assert!(
                    (got - want).abs() < 1e-6 * want.max(1e-3) + 1e-9,
                    "softmax {rows}x{cols} at {r},{c}: {got} vs {want}"
                );
                let want = (v - mean) / (var + 1e-6).sqrt() * f64::from(w[c]) + f64::from(b[c]);
                let got = f64::from(ln[r * cols + c]);
                assert!(
                    (got - want).abs() < 2e-5,
                    "layer norm {rows}x{cols} at {r},{c}: {got} vs {want}"
                );
            }
        }
    }
    assert!(softmax_rows(&mut [0.0; 5], 2).is_err());
    assert!(layer_norm_rows(&[0.0; 4], 2, &[1.0; 3], &[0.0; 2], 1e-6, &mut [0.0; 4]).is_err());
}
