//! Multi-head scaled dot-product attention read straight from a fused `qkv`
//! projection (timm's ViT `Attention`), on the convolution micro-kernel.
//!
//! Per image, each head's keys and values are packed once into the
//! micro-kernel's 16-lane blocks. Each chunk of query rows then takes the
//! heads in turn: its logits against every key (a few hundred KiB, in L2),
//! scaled and softmaxed row by row, then multiplied by the values straight
//! into the head's columns of the merged `[tokens, heads * head_dim]` output.
//! No `[b, heads, n, n]` tensor is ever built and no head is split off or
//! merged back by a copy: at DeiT-384's 578 tokens those were half a GiB per
//! 32 images, faulted in and streamed through memory three times.

use rayon::prelude::*;

use crate::error::{shape_error, Result};
use crate::isa::Isa;
use crate::micro::{write_product, StridedProduct, LANES};
use crate::rows::scaled_softmax_row;

/// Query rows per parallel task.
const QUERY_ROWS: usize = 48;

/// The shape of an attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    /// Images.
    pub batch: usize,
    /// Tokens per image (queries = keys).
    pub tokens: usize,
    /// Heads.
    pub heads: usize,
    /// Channels per head; a multiple of 16.
    pub head_dim: usize,
}

/// `out = softmax(q k^T * scale) v` per image and head, heads merged.
///
/// # Shapes
/// `qkv`: `[batch, tokens, 3, heads, head_dim]` (a fused projection's output:
/// queries, keys, values) -> `out`: `[batch, tokens, heads * head_dim]`.
pub fn attention(qkv: &[f32], shape: AttentionShape, scale: f32, out: &mut [f32]) -> Result<()> {
    let AttentionShape {
        batch: b,
        tokens: n,
        heads,
        head_dim: d,
    } = shape;
    let c = heads * d;
    if d == 0 || !d.is_multiple_of(LANES) || n == 0 {
        return Err(shape_error(
            "attention head",
            "a non-zero multiple of 16 channels and at least one token",
            format!("{d} channels, {n} tokens"),
        ));
    }
    if qkv.len() != b * n * 3 * c || out.len() != b * n * c {
        return Err(shape_error(
            "attention",
            format!("[{b}, {n}, 3, {heads}, {d}] in and [{b}, {n}, {c}] out"),
            format!("{} and {} values", qkv.len(), out.len()),
        ));
    }
    let isa = Isa::detect();
    let key_blocks = n.div_ceil(LANES);
    let n_pad = key_blocks * LANES;
    let keys_len = key_blocks * d * LANES;
    let per_head = keys_len + d * n;
    // Padded key lanes stay zero: every image has the same tokens, so the
    // packing below never writes them.
    let mut packed = vec![0f32; heads * per_head];
    for (img, dst) in qkv.chunks_exact(n * 3 * c).zip(out.chunks_exact_mut(n * c)) {
        packed
            .par_chunks_mut(per_head)
            .enumerate()
            .for_each(|(h, head)| pack_head(img, n, c, h * d, d, head.split_at_mut(keys_len)));
        let job = Head {
            isa,
            img,
            n,
            n_pad,
            c,
            d,
            scale,
        };
        dst.par_chunks_mut(QUERY_ROWS * c)
            .enumerate()
            .for_each_init(
                || vec![0f32; QUERY_ROWS * n_pad],
                |logits, (chunk, rows_out)| {
                    for (h, head) in packed.chunks_exact(per_head).enumerate() {
                        let (keys, values) = head.split_at(keys_len);
                        job.rows(chunk * QUERY_ROWS, h, keys, values, logits, rows_out);
                    }
                },
            );
    }
    Ok(())
}

/// Packs head `h`'s (columns `h0 .. h0 + d` of the keys and values) keys as
/// `[key block][d][16]` and values as `[d / 16][n][16]`.
fn pack_head(
    img: &[f32],
    n: usize,
    c: usize,
    h0: usize,
    d: usize,
    (keys, values): (&mut [f32], &mut [f32]),
) {
    for j in 0..n {
        let row = &img[j * 3 * c..][..3 * c];
        let (kb, lane) = (j / LANES, j % LANES);
        for (dd, &v) in row[c + h0..][..d].iter().enumerate() {
            keys[(kb * d + dd) * LANES + lane] = v;
        }
        for (vb, block) in row[2 * c + h0..][..d].chunks_exact(LANES).enumerate() {
            values[(vb * n + j) * LANES..][..LANES].copy_from_slice(block);
        }
    }
}

/// What every query chunk of one image shares.
struct Head<'a> {
    isa: Isa,
    img: &'a [f32],
    n: usize,
    n_pad: usize,
    c: usize,
    d: usize,
    scale: f32,
}

impl Head<'_> {
    /// Head `h` for the query rows `r0 ..` whose merged outputs `out` holds
    /// (whole rows of `c`); `logits` is scratch of `QUERY_ROWS n_pad` values.
    fn rows(
        &self,
        r0: usize,
        h: usize,
        keys: &[f32],
        values: &[f32],
        logits: &mut [f32],
        out: &mut [f32],
    ) {
        let &Head {
            isa,
            img,
            n,
            n_pad,
            c,
            d,
            scale,
        } = self;
        let rows = out.len() / c;
        assert!(
            r0 + rows <= n
                && logits.len() >= rows * n_pad
                && keys.len() == n_pad * d
                && values.len() == d * n
        );
        let q0 = (r0 * 3 * c) + h * d;
        let queries = StridedProduct {
            rows: &img[q0..],
            n_rows: rows,
            row_stride: 3 * c,
            depth: d,
            packed: keys,
            blocks: n_pad / LANES,
            block_stride: d * LANES,
            out_stride: n_pad,
        };
        write_product(isa, &queries, logits);
        for row in logits.chunks_exact_mut(n_pad).take(rows) {
            scaled_softmax_row(isa, &mut row[..n], scale);
        }
        let weights = StridedProduct {
            rows: logits,
            n_rows: rows,
            row_stride: n_pad,
            depth: n,
            packed: values,
            blocks: d / LANES,
            block_stride: n * LANES,
            out_stride: c,
        };
        write_product(isa, &weights, &mut out[h * d..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: u64, n: usize) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// The same attention in f64, head by head, from the definition.
    fn naive(qkv: &[f32], s: AttentionShape, scale: f64) -> Vec<f64> {
        let AttentionShape {
            batch: b,
            tokens: n,
            heads,
            head_dim: d,
        } = s;
        let c = heads * d;
        let at = |bi: usize, j: usize, part: usize, h: usize, dd: usize| {
            f64::from(qkv[((bi * n + j) * 3 + part) * c + h * d + dd])
        };
        let mut out = vec![0f64; b * n * c];
        for bi in 0..b {
            for h in 0..heads {
                for i in 0..n {
                    let logits: Vec<f64> = (0..n)
                        .map(|j| {
                            (0..d)
                                .map(|dd| at(bi, i, 0, h, dd) * at(bi, j, 1, h, dd))
                                .sum::<f64>()
                                * scale
                        })
                        .collect();
                    let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
                    let sum: f64 = e.iter().sum();
                    for dd in 0..d {
                        out[(bi * n + i) * c + h * d + dd] =
                            (0..n).map(|j| e[j] / sum * at(bi, j, 2, h, dd)).sum();
                    }
                }
            }
        }
        out
    }

    #[test]
    fn attention_matches_the_definition() {
        // Token counts around the 16-key blocks and the 48-row chunks.
        for (batch, tokens, heads, head_dim) in [(2, 5, 2, 16), (1, 50, 3, 32), (2, 97, 2, 16)] {
            let s = AttentionShape {
                batch,
                tokens,
                heads,
                head_dim,
            };
            let qkv = lcg(tokens as u64, batch * tokens * 3 * heads * head_dim);
            let scale = (head_dim as f64).powf(-0.5);
            let mut out = vec![f32::NAN; batch * tokens * heads * head_dim];
            attention(&qkv, s, scale as f32, &mut out).unwrap();
            let want = naive(&qkv, s, scale);
            let err = out
                .iter()
                .zip(&want)
                .map(|(&g, &w)| (f64::from(g) - w).abs())
                .fold(0.0, f64::max);
            assert!(err < 1e-5, "{s:?}: max error {err}");
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let s = AttentionShape {
            batch: 1,
            tokens: 4,
            heads: 2,
            head_dim: 12,
        };
        let qkv = vec![0f32; 4 * 3 * 24];
        let mut out = vec![0f32; 4 * 24];
        let err = attention(&qkv, s, 1.0, &mut out).unwrap_err().to_string();
        assert!(err.contains("multiple of 16"), "{err}");
        let s = AttentionShape { head_dim: 16, ..s };
        let err = attention(&qkv, s, 1.0, &mut out).unwrap_err().to_string();
        assert!(err.contains("[1, 4, 3, 2, 16]"), "{err}");
    }
}
