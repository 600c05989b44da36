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
//!
//! [`talking_heads_attention`] is CaiT's variant, whose heads are mixed
//! linearly before and after the softmax: a chunk keeps every head's logits
//! in L2 at once and mixes them in place. Through candle those were four
//! `[b, 16, 784, 784]` maps and their copies per block (39 MB each per
//! image); the fused pass made CaiT-M48-448 inference 1.5x faster
//! (`vit_infer cait` at batch 4: 5.7 -> 3.8 s per image) and 700 MB smaller.

use rayon::prelude::*;

use crate::error::{shape_error, Result};
use crate::isa::Isa;
use crate::micro::{write_product, StridedProduct, LANES};
use crate::rows::{scaled_softmax_row, softmax_row};

/// Query rows per parallel task.
const QUERY_ROWS: usize = 48;

/// Query rows per parallel task with talking heads: every head's logits for
/// the chunk are live at once (16 heads x 16 rows x 784 keys = 784 KiB at
/// CaiT-448, inside a Zen 4 core's 1 MiB L2).
const TALKING_ROWS: usize = 16;

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

/// A linear map across the heads of attention maps (CaiT's talking heads,
/// timm `proj_l` / `proj_w`): `out[g] = bias[g] + sum_h weight[g][h] in[h]`.
#[derive(Debug, Clone, Copy)]
pub struct HeadMix<'a> {
    /// `[heads, heads]`, PyTorch `nn.Linear` layout (out, in).
    pub weight: &'a [f32],
    /// `[heads]`.
    pub bias: &'a [f32],
}

/// `out = softmax(q k^T * scale) v` per image and head, heads merged.
///
/// # Shapes
/// `qkv`: `[batch, tokens, 3, heads, head_dim]` (a fused projection's output:
/// queries, keys, values) -> `out`: `[batch, tokens, heads * head_dim]`.
pub fn attention(qkv: &[f32], shape: AttentionShape, scale: f32, out: &mut [f32]) -> Result<()> {
    let scratch = QUERY_ROWS * shape.tokens.div_ceil(LANES) * LANES;
    for_each_chunk(
        qkv,
        shape,
        out,
        QUERY_ROWS,
        scratch,
        |img, r0, logits, rows_out| {
            for h in 0..img.heads {
                img.head_rows(r0, h, scale, logits, rows_out);
            }
        },
    )
}

/// timm's `TalkingHeadAttn` (CaiT): `out = mix_w(softmax(mix_l((q scale)
/// k^T))) v` per image, heads mixed by `before` ahead of the softmax and by
/// `after` behind it, then merged.
///
/// The queries are scaled before the product, as timm does. Each chunk of
/// query rows holds every head's logits at once, mixes them across heads in
/// place, softmaxes each row, mixes again and multiplies by the values: none
/// of timm's four `[b, heads, n, n]` maps (product, two mixes, softmax) nor
/// its permuted copies is built.
///
/// # Shapes
/// `qkv`: `[batch, tokens, 3, heads, head_dim]`; `before`, `after`: weights
/// `[heads, heads]`, biases `[heads]` -> `out`: `[batch, tokens, heads * head_dim]`.
pub fn talking_heads_attention(
    qkv: &[f32],
    shape: AttentionShape,
    scale: f32,
    before: HeadMix,
    after: HeadMix,
    out: &mut [f32],
) -> Result<()> {
    let h = shape.heads;
    for (name, mix) in [
        ("talking heads before", before),
        ("talking heads after", after),
    ] {
        if mix.weight.len() != h * h || mix.bias.len() != h {
            return Err(shape_error(
                name,
                format!("a [{h}, {h}] weight and a [{h}] bias"),
                format!("{} and {} values", mix.weight.len(), mix.bias.len()),
            ));
        }
    }
    let plane = TALKING_ROWS * shape.tokens.div_ceil(LANES) * LANES;
    let c = h * shape.head_dim;
    let scratch = h * plane + TALKING_ROWS * c;
    for_each_chunk(
        qkv,
        shape,
        out,
        TALKING_ROWS,
        scratch,
        |img, r0, scratch, rows_out| {
            let rows = rows_out.len() / c;
            let (logits, queries) = scratch.split_at_mut(h * plane);
            // timm's `q * scale`, rounded before the product.
            let queries = &mut queries[..rows * c];
            for (i, q) in queries.chunks_exact_mut(c).enumerate() {
                let src = &img.img[(r0 + i) * 3 * c..][..c];
                for (d, &s) in q.iter_mut().zip(src) {
                    *d = s * scale;
                }
            }
            let used = rows * img.n_pad;
            for (hh, plane) in logits.chunks_exact_mut(plane).enumerate() {
                img.logits(&queries[hh * img.d..], c, rows, hh, plane);
            }
            mix_heads(img.isa, before, logits, plane, used);
            for plane in logits.chunks_exact_mut(plane) {
                for row in plane.chunks_exact_mut(img.n_pad).take(rows) {
                    softmax_row(img.isa, &mut row[..img.n]);
                }
            }
            mix_heads(img.isa, after, logits, plane, used);
            for (hh, plane) in logits.chunks_exact(plane).enumerate() {
                img.weighted_values(plane, rows, hh, rows_out);
            }
        },
    )
}

/// Checks the shapes, then per image packs every head's keys and values
/// once and calls `body(image, r0, scratch, out_rows)` in parallel for each
/// chunk of `chunk_rows` query rows starting at `r0` (`out_rows`: their
/// merged outputs, whole rows; `scratch`: `scratch_len` values per task).
fn for_each_chunk(
    qkv: &[f32],
    shape: AttentionShape,
    out: &mut [f32],
    chunk_rows: usize,
    scratch_len: usize,
    body: impl Fn(&Image, usize, &mut [f32], &mut [f32]) + Sync,
) -> Result<()> {
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
        let image = Image {
            isa,
            img,
            packed: &packed,
            keys_len,
            per_head,
            n,
            n_pad,
            c,
            d,
            heads,
        };
        dst.par_chunks_mut(chunk_rows * c)
            .enumerate()
            .for_each_init(
                || vec![0f32; scratch_len],
                |scratch, (chunk, rows_out)| body(&image, chunk * chunk_rows, scratch, rows_out),
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

/// One image's `qkv` rows and packed heads, shared by all its query chunks.
struct Image<'a> {
    isa: Isa,
    img: &'a [f32],
    packed: &'a [f32],
    keys_len: usize,
    per_head: usize,
    n: usize,
    n_pad: usize,
    c: usize,
    d: usize,
    heads: usize,
}

impl Image<'_> {
    /// Head `h`'s packed keys and values.
    fn head(&self, h: usize) -> (&[f32], &[f32]) {
        self.packed[h * self.per_head..][..self.per_head].split_at(self.keys_len)
    }

    /// `logits[i][..n_pad] = queries[i row_stride ..][..d] . keys_h` for the
    /// `rows` query rows (padded keys give 0).
    fn logits(
        &self,
        queries: &[f32],
        row_stride: usize,
        rows: usize,
        h: usize,
        logits: &mut [f32],
    ) {
        let (keys, _) = self.head(h);
        let p = StridedProduct {
            rows: queries,
            n_rows: rows,
            row_stride,
            depth: self.d,
            packed: keys,
            blocks: self.n_pad / LANES,
            block_stride: self.d * LANES,
            out_stride: self.n_pad,
        };
        write_product(self.isa, &p, logits);
    }

    /// Head `h`'s columns of `out` (whole merged rows) from the attention
    /// weights `weights` (`rows` rows of `n_pad`, the first `n` used).
    fn weighted_values(&self, weights: &[f32], rows: usize, h: usize, out: &mut [f32]) {
        let (_, values) = self.head(h);
        let p = StridedProduct {
            rows: weights,
            n_rows: rows,
            row_stride: self.n_pad,
            depth: self.n,
            packed: values,
            blocks: self.d / LANES,
            block_stride: self.n * LANES,
            out_stride: self.c,
        };
        write_product(self.isa, &p, &mut out[h * self.d..]);
    }

    /// Plain attention for head `h` and the query rows `r0 ..` whose merged
    /// outputs `out` holds (whole rows of `c`); `logits` is scratch of
    /// `rows n_pad` values.
    fn head_rows(&self, r0: usize, h: usize, scale: f32, logits: &mut [f32], out: &mut [f32]) {
        let rows = out.len() / self.c;
        assert!(r0 + rows <= self.n && logits.len() >= rows * self.n_pad);
        let queries = &self.img[r0 * 3 * self.c + h * self.d..];
        self.logits(queries, 3 * self.c, rows, h, logits);
        for row in logits.chunks_exact_mut(self.n_pad).take(rows) {
            scaled_softmax_row(self.isa, &mut row[..self.n], scale);
        }
        self.weighted_values(logits, rows, h, out);
    }
}

/// Mixes the heads of `maps` (`heads` planes `plane` apart, the first `used`
/// values of each) in place: `maps[g] = bias[g] + sum_h weight[g][h] maps[h]`.
fn mix_heads(isa: Isa, mix: HeadMix, maps: &mut [f32], plane: usize, used: usize) {
    let heads = mix.bias.len();
    assert!(used <= plane && used.is_multiple_of(LANES) && maps.len() >= heads * plane);
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` is a detected one, so the CPU has AVX-512F.
        Isa::Avx512 if heads <= MAX_MIX_HEADS => unsafe {
            mix_heads_avx512(mix, maps, plane, used)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` is a detected one, so the CPU has AVX2 and FMA.
        Isa::Avx2Fma if heads == 16 => unsafe { mix_heads_avx2_16(mix, maps, plane, used) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2Fma if heads <= MAX_MIX_HEADS => unsafe { mix_heads_avx2(mix, maps, plane, used) },
        _ => mix_heads_portable(mix, maps, plane, used),
    }
}

/// The most heads [`mix_heads_avx512`] keeps in registers' worth of stack.
const MAX_MIX_HEADS: usize = 32;

fn mix_heads_portable(mix: HeadMix, maps: &mut [f32], plane: usize, used: usize) {
    let heads = mix.bias.len();
    let mut x = vec![[0f32; LANES]; heads];
    for p in (0..used).step_by(LANES) {
        for (h, xh) in x.iter_mut().enumerate() {
            xh.copy_from_slice(&maps[h * plane + p..][..LANES]);
        }
        for (g, w) in mix.weight.chunks_exact(heads).enumerate() {
            let mut acc = [mix.bias[g]; LANES];
            for (&wgh, xh) in w.iter().zip(&x) {
                for (a, &v) in acc.iter_mut().zip(xh) {
                    *a += wgh * v;
                }
            }
            maps[g * plane + p..][..LANES].copy_from_slice(&acc);
        }
    }
}

/// [`mix_heads_portable`] on 16-lane vectors, four output heads at a time
/// (each input vector loaded once per four FMAs).
///
/// # Safety
/// The CPU must have AVX-512F; `heads <= MAX_MIX_HEADS`, `maps` holds
/// `heads` planes and `used` is a multiple of 16 (asserted by the caller).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn mix_heads_avx512(mix: HeadMix, maps: &mut [f32], plane: usize, used: usize) {
    use std::arch::x86_64::*;
    let heads = mix.bias.len();
    let base = maps.as_mut_ptr();
    let mut x = [_mm512_setzero_ps(); MAX_MIX_HEADS];
    for p in (0..used).step_by(LANES) {
        for (h, xh) in x.iter_mut().enumerate().take(heads) {
            // SAFETY: h < heads planes, p + 16 <= used <= plane.
            *xh = unsafe { _mm512_loadu_ps(base.add(h * plane + p)) };
        }
        let mut g = 0;
        while g < heads {
            let gn = (heads - g).min(4);
            let mut acc = [_mm512_setzero_ps(); 4];
            for (k, a) in acc.iter_mut().enumerate().take(gn) {
                *a = _mm512_set1_ps(mix.bias[g + k]);
            }
            for (h, &xh) in x.iter().enumerate().take(heads) {
                for (k, a) in acc.iter_mut().enumerate().take(gn) {
                    let w = _mm512_set1_ps(mix.weight[(g + k) * heads + h]);
                    *a = _mm512_fmadd_ps(w, xh, *a);
                }
            }
            for (k, a) in acc.iter().enumerate().take(gn) {
                // SAFETY: g + k < heads planes, p + 16 <= plane.
                unsafe { _mm512_storeu_ps(base.add((g + k) * plane + p), *a) };
            }
            g += gn;
        }
    }
}

/// [`mix_heads_avx512`] on 8-lane vectors: a position's inputs are copied
/// to the stack first (the mix is in place and 16 ymm registers cannot hold
/// them all next to the accumulators), then eight output heads at a time
/// take one multiply-add per input head each, in the same order as on
/// AVX-512, so both give the same bits. CaiT-M48 ran these mixes on the
/// portable loop before (11% of its inference on Zen 3).
///
/// # Safety
/// The CPU must have AVX2 and FMA; `heads <= MAX_MIX_HEADS`, `maps` holds
/// `heads` planes and `used` is a multiple of 16 (asserted by the caller).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn mix_heads_avx2(mix: HeadMix, maps: &mut [f32], plane: usize, used: usize) {
    use std::arch::x86_64::*;
    const OUT: usize = 8;
    let heads = mix.bias.len();
    let base = maps.as_mut_ptr();
    let mut x = [_mm256_setzero_ps(); MAX_MIX_HEADS];
    for p in (0..used).step_by(8) {
        for (h, xh) in x.iter_mut().enumerate().take(heads) {
            // SAFETY: h < heads planes, p + 8 <= used <= plane.
            *xh = unsafe { _mm256_loadu_ps(base.add(h * plane + p)) };
        }
        let mut g = 0;
        while g + OUT <= heads {
            // A loop, not `array::from_fn`: its closure stays an
            // out-of-line call inside a target_feature function.
            let mut acc = [_mm256_setzero_ps(); OUT];
            for (k, a) in acc.iter_mut().enumerate() {
                *a = _mm256_set1_ps(mix.bias[g + k]);
            }
            let w = &mix.weight[g * heads..(g + OUT) * heads];
            for (h, &xh) in x.iter().enumerate().take(heads) {
                for (k, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(_mm256_set1_ps(w[k * heads + h]), xh, *a);
                }
            }
            for (k, a) in acc.iter().enumerate() {
                // SAFETY: g + k < heads planes, p + 8 <= plane.
                unsafe { _mm256_storeu_ps(base.add((g + k) * plane + p), *a) };
            }
            g += OUT;
        }
        for g in g..heads {
            let mut a = _mm256_set1_ps(mix.bias[g]);
            for (h, &xh) in x.iter().enumerate().take(heads) {
                a = _mm256_fmadd_ps(_mm256_set1_ps(mix.weight[g * heads + h]), xh, a);
            }
            // SAFETY: g < heads planes, p + 8 <= plane.
            unsafe { _mm256_storeu_ps(base.add(g * plane + p), a) };
        }
    }
}

/// [`mix_heads_avx2`] for CaiT's 16 heads: the weight indices are
/// constants, so the loops unroll without bounds checks or index arithmetic
/// (the general loop spent half its time on those). Same multiply-adds in
/// the same order.
///
/// # Safety
/// As [`mix_heads_avx2`], and `mix` has 16 heads.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn mix_heads_avx2_16(mix: HeadMix, maps: &mut [f32], plane: usize, used: usize) {
    use std::arch::x86_64::*;
    const OUT: usize = 8;
    let (Ok(weight), Ok(bias)) = (
        <&[f32; 256]>::try_from(mix.weight),
        <&[f32; 16]>::try_from(mix.bias),
    ) else {
        unreachable!("the caller dispatches 16 heads only");
    };
    let base = maps.as_mut_ptr();
    for p in (0..used).step_by(8) {
        let mut x = [_mm256_setzero_ps(); 16];
        for (h, xh) in x.iter_mut().enumerate() {
            // SAFETY: h < 16 planes, p + 8 <= used <= plane.
            *xh = unsafe { _mm256_loadu_ps(base.add(h * plane + p)) };
        }
        for g in (0..16).step_by(OUT) {
            let mut acc = [_mm256_setzero_ps(); OUT];
            for (k, a) in acc.iter_mut().enumerate() {
                *a = _mm256_set1_ps(bias[g + k]);
            }
            for (h, &xh) in x.iter().enumerate() {
                for (k, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(_mm256_set1_ps(weight[(g + k) * 16 + h]), xh, *a);
                }
            }
            for (k, a) in acc.iter().enumerate() {
                // SAFETY: g + k < 16 planes, p + 8 <= plane.
                unsafe { _mm256_storeu_ps(base.add((g + k) * plane + p), *a) };
            }
        }
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

    /// Plain attention in f64 from the definition: the talking-heads one
    /// with identity mixes (scaling the queries or the logits is the same
    /// in f64, far below the tolerance).
    fn naive(qkv: &[f32], s: AttentionShape, scale: f64) -> Vec<f64> {
        let h = s.heads;
        let identity: Vec<f32> = (0..h * h)
            .map(|i| if i / h == i % h { 1.0 } else { 0.0 })
            .collect();
        let zero = vec![0f32; h];
        naive_talking(qkv, s, scale, (&identity, &zero), (&identity, &zero))
    }

    /// Runs `run(shape, qkv, scale) -> (kernel output, f64 definition)` for
    /// each `(batch, tokens, heads, head_dim)` on seeded inputs and checks
    /// the largest difference.
    fn check_against_definition(
        shapes: &[(usize, usize, usize, usize)],
        run: impl Fn(AttentionShape, &[f32], f64) -> (Vec<f32>, Vec<f64>),
    ) {
        for &(batch, tokens, heads, head_dim) in shapes {
            let s = AttentionShape {
                batch,
                tokens,
                heads,
                head_dim,
            };
            let qkv = lcg(tokens as u64, batch * tokens * 3 * heads * head_dim);
            let (out, want) = run(s, &qkv, (head_dim as f64).powf(-0.5));
            assert_eq!(out.len(), want.len());
            let err = out
                .iter()
                .zip(&want)
                .map(|(&g, &w)| (f64::from(g) - w).abs())
                .fold(0.0, f64::max);
            assert!(err < 1e-5, "{s:?}: max error {err}");
        }
    }

    #[test]
    fn attention_matches_the_definition() {
        // Token counts around the 16-key blocks and the 48-row chunks.
        check_against_definition(
            &[(2, 5, 2, 16), (1, 50, 3, 32), (2, 97, 2, 16)],
            |s, qkv, scale| {
                let mut out = vec![f32::NAN; s.batch * s.tokens * s.heads * s.head_dim];
                attention(qkv, s, scale as f32, &mut out).unwrap();
                (out, naive(qkv, s, scale))
            },
        );
    }

    /// timm's `TalkingHeadAttn` in f64 from its definition: q scaled, the
    /// logits mixed across heads, softmaxed, mixed again, times v.
    fn naive_talking(
        qkv: &[f32],
        s: AttentionShape,
        scale: f64,
        before: (&[f32], &[f32]),
        after: (&[f32], &[f32]),
    ) -> Vec<f64> {
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
        let mix = |(w, bias): (&[f32], &[f32]), maps: &[Vec<f64>]| -> Vec<Vec<f64>> {
            (0..heads)
                .map(|g| {
                    (0..n)
                        .map(|j| {
                            f64::from(bias[g])
                                + (0..heads)
                                    .map(|h| f64::from(w[g * heads + h]) * maps[h][j])
                                    .sum::<f64>()
                        })
                        .collect()
                })
                .collect()
        };
        let mut out = vec![0f64; b * n * c];
        for bi in 0..b {
            for i in 0..n {
                let logits: Vec<Vec<f64>> = (0..heads)
                    .map(|h| {
                        (0..n)
                            .map(|j| {
                                (0..d)
                                    .map(|dd| at(bi, i, 0, h, dd) * scale * at(bi, j, 1, h, dd))
                                    .sum()
                            })
                            .collect()
                    })
                    .collect();
                let soft: Vec<Vec<f64>> = mix(before, &logits)
                    .into_iter()
                    .map(|row| {
                        let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                        let e: Vec<f64> = row.iter().map(|l| (l - max).exp()).collect();
                        let sum: f64 = e.iter().sum();
                        e.into_iter().map(|v| v / sum).collect()
                    })
                    .collect();
                let weights = mix(after, &soft);
                for h in 0..heads {
                    for dd in 0..d {
                        out[(bi * n + i) * c + h * d + dd] =
                            (0..n).map(|j| weights[h][j] * at(bi, j, 2, h, dd)).sum();
                    }
                }
            }
        }
        out
    }

    #[test]
    fn talking_heads_attention_matches_the_definition() {
        // Token counts around the 16-key blocks and the 16-row chunks; head
        // counts around the four-head groups of the vector mix.
        check_against_definition(
            &[(2, 5, 2, 16), (1, 50, 5, 16), (2, 37, 16, 32)],
            |s, qkv, scale| {
                let heads = s.heads;
                let mixes = lcg(heads as u64 + 7, 2 * heads * (heads + 1));
                let (before, after) = mixes.split_at(heads * (heads + 1));
                let (wl, bl) = before.split_at(heads * heads);
                let (ww, bw) = after.split_at(heads * heads);
                let mut out = vec![f32::NAN; s.batch * s.tokens * heads * s.head_dim];
                talking_heads_attention(
                    qkv,
                    s,
                    scale as f32,
                    HeadMix {
                        weight: wl,
                        bias: bl,
                    },
                    HeadMix {
                        weight: ww,
                        bias: bw,
                    },
                    &mut out,
                )
                .unwrap();
                (out, naive_talking(qkv, s, scale, (wl, bl), (ww, bw)))
            },
        );
    }

    /// The head mix on every instruction set this CPU runs against f64 sums,
    /// with head counts around the vector paths' groups of four (AVX-512)
    /// and eight (AVX2) output heads; the two vector paths agree bit for bit.
    #[test]
    fn head_mix_matches_the_definition_on_every_isa() {
        for heads in [1, 3, 8, 12, 16, 17] {
            let (plane, used) = (80, 64);
            let w = lcg(heads as u64, heads * (heads + 1));
            let mix = HeadMix {
                weight: &w[..heads * heads],
                bias: &w[heads * heads..],
            };
            let maps = lcg(100 + heads as u64, heads * plane);
            let mut want = maps.clone();
            for g in 0..heads {
                for p in 0..used {
                    let sum: f64 = (0..heads)
                        .map(|h| {
                            f64::from(mix.weight[g * heads + h]) * f64::from(maps[h * plane + p])
                        })
                        .sum();
                    want[g * plane + p] = (sum + f64::from(mix.bias[g])) as f32;
                }
            }
            let mut vector: Option<Vec<f32>> = None;
            for isa in Isa::supported() {
                let mut got = maps.clone();
                mix_heads(isa, mix, &mut got, plane, used);
                for (i, (&g, &r)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - r).abs() <= 1e-5 * (1.0 + r.abs()),
                        "{isa:?}, {heads} heads, value {i}: {g} against {r}"
                    );
                }
                if isa != Isa::Portable {
                    match &vector {
                        Some(v) => assert_eq!(v, &got, "{isa:?}, {heads} heads"),
                        None => vector = Some(got),
                    }
                }
            }
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
        // Talking heads whose second mix is not [heads, heads].
        let (qkv, mut out) = (vec![0f32; 4 * 3 * 32], vec![0f32; 4 * 32]);
        let w = [0f32; 4];
        let mix = HeadMix {
            weight: &w,
            bias: &w[..2],
        };
        let bad = HeadMix {
            weight: &w[..3],
            ..mix
        };
        let err = talking_heads_attention(&qkv, s, 1.0, mix, bad, &mut out)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("talking heads after") && err.contains("[2, 2]"),
            "{err}"
        );
    }
}
