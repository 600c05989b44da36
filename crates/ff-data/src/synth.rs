//! Synthetic MVTec-layout categories: procedural textures and objects with painted defects and masks.
//!
//! Used by tests, the `fastflow demo` and offline benchmarks. Normal images
//! of a category share one texture or object and differ only mildly (texture
//! phase, fine noise, a shift of a few pixels, about 2% colour jitter);
//! defects are clearly visible and locally distinct in colour or texture
//! (dark scratches or bright ones on dark material, near-black holes, stains
//! in the complementary hue, dark triangular cut-ins), 4-30% of the image
//! side, so that even a randomly initialised backbone separates them.

use std::path::Path;

use image::{GrayImage, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::error::Error;

/// The defect types written under `test/<defect>`, in round-robin order.
pub const DEFECTS: [&str; 4] = ["scratch", "hole", "stain", "cut"];

/// Sizes, counts and seed of a synthetic category.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SynthConfig {
    /// Side of the square images in pixels.
    pub image_size: usize,
    /// Normal training images (`train/good`).
    pub n_train: usize,
    /// Normal test images (`test/good`).
    pub n_test_good: usize,
    /// Defective test images, spread round-robin over [`DEFECTS`].
    pub n_test_defect: usize,
    /// Everything drawn depends only on (seed, category name, image index).
    pub seed: u64,
}

impl SynthConfig {
    /// The demo's category: 256 px, 32 train + 12 good + 20 defective test images.
    pub fn demo() -> Self {
        Self {
            image_size: 256,
            n_train: 32,
            n_test_good: 12,
            n_test_defect: 20,
            seed: 0,
        }
    }
}

/// What a synthetic category shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SynthKind {
    /// Basket-weave fabric.
    Weave,
    /// Wood-like grain.
    Grain,
    /// Square tiles with grout lines.
    Tiles,
    /// Carpet-like two-scale noise.
    Speckle,
    /// A round part (nut, cap) on a dark background.
    Disc,
    /// An elongated two-tone capsule on a light background.
    Capsule,
}

impl SynthKind {
    /// All kinds, in the order names hash into.
    pub const ALL: [SynthKind; 6] = [
        SynthKind::Weave,
        SynthKind::Grain,
        SynthKind::Tiles,
        SynthKind::Speckle,
        SynthKind::Disc,
        SynthKind::Capsule,
    ];

    /// The kind's own name.
    pub fn name(self) -> &'static str {
        match self {
            SynthKind::Weave => "weave",
            SynthKind::Grain => "grain",
            SynthKind::Tiles => "tiles",
            SynthKind::Speckle => "speckle",
            SynthKind::Disc => "disc",
            SynthKind::Capsule => "capsule",
        }
    }

    /// The kind a category name gets: a kind's own name selects it,
    /// any other name is hashed (FNV-1a, stable across platforms).
    pub fn for_name(name: &str) -> SynthKind {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == name)
            .unwrap_or(Self::ALL[(fnv1a(name) % Self::ALL.len() as u64) as usize])
    }

    fn is_object(self) -> bool {
        matches!(self, SynthKind::Disc | SynthKind::Capsule)
    }
}

use crate::hash::splitmix64 as mix;

fn fnv1a(s: &str) -> u64 {
    crate::hash::fnv1a64(s.as_bytes())
}

fn hsv(h: f32, s: f32, v: f32) -> [f32; 3] {
    let h = h.rem_euclid(1.0) * 6.0;
    let c = v * s;
    let x = c * (1.0 - ((h % 2.0) - 1.0).abs());
    let (r, g, b) = match h as u32 {
        0 => (c, x, 0.0),
        1 => (x, c, 0.0),
        2 => (0.0, c, x),
        3 => (0.0, x, c),
        4 => (x, 0.0, c),
        _ => (c, 0.0, x),
    };
    let m = v - c;
    [r + m, g + m, b + m]
}

fn luma(c: [f32; 3]) -> f32 {
    0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]
}

/// Smooth value noise on a wrapping lattice, values in [0, 1].
struct ValueNoise {
    cells: usize,
    grid: Vec<f32>,
}

impl ValueNoise {
    fn new(rng: &mut impl Rng, cells: usize) -> Self {
        let cells = cells.max(1);
        Self {
            cells,
            grid: (0..cells * cells).map(|_| rng.random::<f32>()).collect(),
        }
    }

    /// Noise at lattice coordinates (u, v), smoothstep-interpolated.
    fn at(&self, u: f32, v: f32) -> f32 {
        let n = self.cells;
        let (fu, fv) = (u.floor(), v.floor());
        let (tu, tv) = (u - fu, v - fv);
        let (su, sv) = (tu * tu * (3.0 - 2.0 * tu), tv * tv * (3.0 - 2.0 * tv));
        let i0 = (fu as i64).rem_euclid(n as i64) as usize;
        let j0 = (fv as i64).rem_euclid(n as i64) as usize;
        let (i1, j1) = ((i0 + 1) % n, (j0 + 1) % n);
        let g = |i: usize, j: usize| self.grid[j * n + i];
        let a = g(i0, j0) + (g(i1, j0) - g(i0, j0)) * su;
        let b = g(i0, j1) + (g(i1, j1) - g(i0, j1)) * su;
        a + (b - a) * sv
    }
}

/// Category-wide look, from the name only.
#[derive(Debug, Clone, Copy)]
struct Style {
    kind: SynthKind,
    base: [f32; 3],
    second: [f32; 3],
    hue: f32,
}

impl Style {
    fn new(name: &str) -> Self {
        let h = mix(fnv1a(name));
        let unit = |shift: u32| ((h >> shift) & 0xFFFF) as f32 / 65535.0;
        let hue = unit(0);
        let (sat, val) = (0.35 + 0.25 * unit(16), 0.5 + 0.2 * unit(32));
        Self {
            kind: SynthKind::for_name(name),
            base: hsv(hue, sat, val),
            second: hsv(hue + 0.12, sat * 0.8, (val + 0.15).min(0.9)),
            hue,
        }
    }
}

/// Where the part is in an object image: centre and radius (pixels).
#[derive(Debug, Clone, Copy)]
struct Placement {
    cx: f32,
    cy: f32,
    radius: f32,
}

/// Renders a normal image (RGB in [0, 1], `[size, size, 3]`).
fn render_normal(style: &Style, size: usize, rng: &mut ChaCha8Rng) -> (Vec<f32>, Placement) {
    let s = size as f32;
    let jitter: [f32; 3] = std::array::from_fn(|_| 1.0 + 0.02 * (2.0 * rng.random::<f32>() - 1.0));
    let base: [f32; 3] = std::array::from_fn(|c| style.base[c] * jitter[c]);
    let second: [f32; 3] = std::array::from_fn(|c| style.second[c] * jitter[c]);
    // Slight shifts only (up to 3% of the side, 1% for the sharp grout lines
    // of tiles), so that normal images stay close to each other.
    let shift = if style.kind == SynthKind::Tiles {
        0.01
    } else {
        0.03
    };
    let (ox, oy) = (
        shift * s * (2.0 * rng.random::<f32>() - 1.0),
        shift * s * (2.0 * rng.random::<f32>() - 1.0),
    );
    let fine = ValueNoise::new(rng, (size / 4).max(2));
    let coarse = ValueNoise::new(rng, 8);
    let place = Placement {
        cx: s * (0.5 + 0.03 * (2.0 * rng.random::<f32>() - 1.0)),
        cy: s * (0.5 + 0.03 * (2.0 * rng.random::<f32>() - 1.0)),
        radius: s * match style.kind {
            SynthKind::Capsule => 0.3,
            _ => 0.32,
        },
    };
    let tilt = 0.07 * (2.0 * rng.random::<f32>() - 1.0);
    let mut out = vec![0f32; size * size * 3];
    let period = s / 8.0;
    for y in 0..size {
        for x in 0..size {
            let (xf, yf) = (x as f32, y as f32);
            let n_fine = fine.at(xf / 4.0, yf / 4.0) - 0.5;
            let n_coarse = coarse.at(xf * 8.0 / s, yf * 8.0 / s) - 0.5;
            let rgb: [f32; 3] = match style.kind {
                SynthKind::Weave => {
                    let (u, v) = ((xf + ox) / period, (yf + oy) / period);
                    let along = if (u.floor() as i64 + v.floor() as i64) % 2 == 0 {
                        (std::f32::consts::PI * 4.0 * v).sin()
                    } else {
                        (std::f32::consts::PI * 4.0 * u).sin()
                    };
                    let f = 0.8 + 0.15 * along + 0.08 * n_fine;
                    base.map(|c| c * f)
                }
                SynthKind::Grain => {
                    let phase = (yf + oy) / (period * 0.7) + 1.5 * n_coarse;
                    let t = 0.5 + 0.5 * (std::f32::consts::TAU * phase).sin();
                    let f = 0.05 * n_fine;
                    std::array::from_fn(|c| base[c] * (1.0 - t) + second[c] * t + f)
                }
                SynthKind::Tiles => {
                    let p = s / 4.0;
                    let (u, v) = ((xf + ox).rem_euclid(p), (yf + oy).rem_euclid(p));
                    let grout = s * 0.03;
                    if u < grout || v < grout {
                        [0.82 + 0.03 * n_fine; 3]
                    } else {
                        base.map(|c| c * (1.0 + 0.06 * n_fine + 0.05 * n_coarse))
                    }
                }
                SynthKind::Speckle => {
                    let f = 1.0 + 0.22 * n_fine + 0.12 * n_coarse;
                    base.map(|c| c * f)
                }
                SynthKind::Disc => {
                    let (dx, dy) = (xf - place.cx, yf - place.cy);
                    let r = (dx * dx + dy * dy).sqrt() / place.radius;
                    if r < 1.0 {
                        let groove = if (r - 0.6).abs() < 0.04 { 0.75 } else { 1.0 };
                        let shade = (1.0 - 0.25 * r * r) * groove + 0.04 * n_fine;
                        base.map(|c| c * shade + 0.05)
                    } else {
                        [
                            0.1 + 0.02 * n_fine,
                            0.11 + 0.02 * n_fine,
                            0.14 + 0.02 * n_fine,
                        ]
                    }
                }
                SynthKind::Capsule => {
                    let (dx, dy) = (xf - place.cx, yf - place.cy);
                    let (u, v) = (
                        dx * tilt.cos() + dy * tilt.sin(),
                        -dx * tilt.sin() + dy * tilt.cos(),
                    );
                    let (half_len, half_w) = (place.radius * 1.1, place.radius * 0.45);
                    let du = (u.abs() - (half_len - half_w)).max(0.0);
                    let inside = du * du + v * v < half_w * half_w;
                    if inside {
                        let shade = 1.0 - 0.3 * (v / half_w).powi(2) + 0.03 * n_fine;
                        let c = if u < 0.0 { base } else { second };
                        c.map(|c| c * shade + 0.08)
                    } else {
                        [0.86 + 0.015 * n_fine; 3]
                    }
                }
            };
            out[(y * size + x) * 3..(y * size + x) * 3 + 3].copy_from_slice(&rgb);
        }
    }
    (out, place)
}

/// Paints one defect into `img` and returns its binary mask (`[size, size]`).
fn paint_defect(
    img: &mut [f32],
    size: usize,
    defect: &str,
    style: &Style,
    place: Placement,
    rng: &mut ChaCha8Rng,
) -> Vec<bool> {
    let s = size as f32;
    let uniform = |rng: &mut ChaCha8Rng, lo: f32, hi: f32| lo + (hi - lo) * rng.random::<f32>();
    // Defect centre: on the part for objects, anywhere away from the border otherwise.
    let (cx, cy) = if style.kind.is_object() {
        let a = uniform(rng, 0.0, std::f32::consts::TAU);
        let r = place.radius * uniform(rng, 0.0, 0.55);
        (place.cx + r * a.cos(), place.cy + r * a.sin())
    } else {
        (uniform(rng, 0.2, 0.8) * s, uniform(rng, 0.2, 0.8) * s)
    };
    let mut mask = vec![false; size * size];
    let paint =
        |mask: &mut Vec<bool>, img: &mut [f32], x: usize, y: usize, c: [f32; 3], alpha: f32| {
            let i = y * size + x;
            mask[i] = true;
            for (k, &ck) in c.iter().enumerate() {
                img[i * 3 + k] = img[i * 3 + k] * (1.0 - alpha) + ck * alpha;
            }
        };
    let dark_ground = luma(style.base) < 0.45;
    match defect {
        "scratch" => {
            let len = s * uniform(rng, 0.18, 0.3);
            let width = (s * 0.022).max(2.0);
            let a = uniform(rng, 0.0, std::f32::consts::PI);
            let (ux, uy) = (a.cos(), a.sin());
            let bend = uniform(rng, -0.08, 0.08) * len;
            let colour = if dark_ground {
                [0.97, 0.96, 0.9]
            } else {
                [0.06, 0.05, 0.05]
            };
            for y in 0..size {
                for x in 0..size {
                    let (dx, dy) = (x as f32 - cx, y as f32 - cy);
                    let t = dx * ux + dy * uy;
                    if t.abs() > len / 2.0 {
                        continue;
                    }
                    // A slight bow: the offset from the chord grows towards the middle.
                    let bow = bend * (1.0 - (2.0 * t / len).powi(2));
                    let d = (-dx * uy + dy * ux - bow).abs();
                    if d < width / 2.0 {
                        paint(&mut mask, img, x, y, colour, 1.0);
                    }
                }
            }
        }
        "hole" => {
            let r = s * uniform(rng, 0.045, 0.075);
            let rim = (s * 0.012).max(1.5);
            for y in 0..size {
                for x in 0..size {
                    let d = ((x as f32 - cx).powi(2) + (y as f32 - cy).powi(2)).sqrt();
                    if d < r {
                        paint(&mut mask, img, x, y, [0.03, 0.03, 0.035], 1.0);
                    } else if d < r + rim {
                        paint(&mut mask, img, x, y, [0.55, 0.5, 0.45], 0.8);
                    }
                }
            }
        }
        "stain" => {
            let r = s * uniform(rng, 0.07, 0.11);
            let edge = ValueNoise::new(rng, 6);
            let colour = hsv(style.hue + 0.5, 0.85, if dark_ground { 0.9 } else { 0.55 });
            for y in 0..size {
                for x in 0..size {
                    let (dx, dy) = (x as f32 - cx, y as f32 - cy);
                    let d = (dx * dx + dy * dy).sqrt() / r;
                    let wobble = edge.at(x as f32 * 6.0 / s * 3.0, y as f32 * 6.0 / s * 3.0) - 0.5;
                    if d + 0.5 * wobble < 1.0 {
                        paint(&mut mask, img, x, y, colour, 0.85);
                    }
                }
            }
        }
        _ => {
            // "cut": a triangular notch, filled with a dark shadow.
            let h = s * uniform(rng, 0.1, 0.15);
            let a = uniform(rng, 0.0, std::f32::consts::TAU);
            let tip = (cx, cy);
            let base_mid = (cx + h * a.cos(), cy + h * a.sin());
            let (px, py) = (-a.sin() * h * 0.45, a.cos() * h * 0.45);
            let tri = [
                tip,
                (base_mid.0 + px, base_mid.1 + py),
                (base_mid.0 - px, base_mid.1 - py),
            ];
            let cross = |o: (f32, f32), p: (f32, f32), q: (f32, f32)| {
                (p.0 - o.0) * (q.1 - o.1) - (p.1 - o.1) * (q.0 - o.0)
            };
            // Bright amber on dark material (unlike any gray grout or
            // background), a dark shadow on light material.
            let colour = if dark_ground {
                [1.0, 0.72, 0.15]
            } else {
                [0.08, 0.07, 0.09]
            };
            for y in 0..size {
                for x in 0..size {
                    let p = (x as f32 + 0.5, y as f32 + 0.5);
                    let (d0, d1, d2) = (
                        cross(tri[0], tri[1], p),
                        cross(tri[1], tri[2], p),
                        cross(tri[2], tri[0], p),
                    );
                    let inside = (d0 >= 0.0 && d1 >= 0.0 && d2 >= 0.0)
                        || (d0 <= 0.0 && d1 <= 0.0 && d2 <= 0.0);
                    if inside {
                        paint(&mut mask, img, x, y, colour, 1.0);
                    }
                }
            }
        }
    }
    mask
}

fn to_rgb8(img: &[f32], size: usize) -> RgbImage {
    let data = img
        .iter()
        .map(|&v| (v.clamp(0.0, 1.0) * 255.0).round() as u8)
        .collect();
    // `img` holds size * size * 3 values by construction.
    RgbImage::from_raw(size as u32, size as u32, data).expect("synthetic image has its shape")
}

/// One image to write.
struct Job {
    dir: &'static str,
    defect: Option<&'static str>,
    index: usize,
    stream: u64,
}

/// Writes a synthetic category in MVTec AD layout:
///
/// ```text
/// <root>/<name>/train/good/000.png
/// <root>/<name>/test/good/000.png
/// <root>/<name>/test/<defect>/000.png                (defect in scratch, hole, stain, cut)
/// <root>/<name>/ground_truth/<defect>/000_mask.png    (0 or 255)
/// ```
///
/// The kind of texture or object and its colours come from `name` (see
/// [`SynthKind::for_name`]); everything else from `cfg.seed`, so equal
/// arguments write byte-identical files. Existing files of the same names
/// are overwritten; other files are left alone.
pub fn generate_category(root: &Path, name: &str, cfg: &SynthConfig) -> Result<(), Error> {
    if cfg.image_size < 16 {
        return Err(Error::Config(format!(
            "synthetic image_size must be at least 16, got {}",
            cfg.image_size
        )));
    }
    if cfg.n_train == 0 {
        return Err(Error::Config("synthetic n_train must be at least 1".into()));
    }
    let style = Style::new(name);
    let dir = root.join(name);
    let mut jobs = Vec::new();
    for i in 0..cfg.n_train {
        jobs.push(Job {
            dir: "train/good",
            defect: None,
            index: i,
            stream: 1,
        });
    }
    for i in 0..cfg.n_test_good {
        jobs.push(Job {
            dir: "test/good",
            defect: None,
            index: i,
            stream: 2,
        });
    }
    let mut per_defect = [0usize; DEFECTS.len()];
    for i in 0..cfg.n_test_defect {
        let k = i % DEFECTS.len();
        jobs.push(Job {
            dir: "test",
            defect: Some(DEFECTS[k]),
            index: per_defect[k],
            stream: 3 + k as u64,
        });
        per_defect[k] += 1;
    }
    let mut dirs = vec![dir.join("train/good"), dir.join("test/good")];
    for (k, d) in DEFECTS.iter().enumerate() {
        if per_defect[k] > 0 {
            dirs.push(dir.join("test").join(d));
            dirs.push(dir.join("ground_truth").join(d));
        }
    }
    for d in &dirs {
        std::fs::create_dir_all(d).map_err(|source| Error::Io {
            path: d.clone(),
            source,
        })?;
    }
    let size = cfg.image_size;
    let name_hash = fnv1a(name);
    jobs.par_iter().try_for_each(|job| {
        let seed = mix(cfg.seed ^ mix(name_hash ^ mix((job.stream << 32) ^ job.index as u64)));
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let (mut img, place) = render_normal(&style, size, &mut rng);
        let file = format!("{:03}.png", job.index);
        let (img_path, mask) = match job.defect {
            None => (dir.join(job.dir).join(&file), None),
            Some(defect) => {
                let mask = paint_defect(&mut img, size, defect, &style, place, &mut rng);
                (
                    dir.join("test").join(defect).join(&file),
                    Some((defect, mask)),
                )
            }
        };
        save(&to_rgb8(&img, size), &img_path)?;
        if let Some((defect, mask)) = mask {
            let data = mask.iter().map(|&m| if m { 255u8 } else { 0 }).collect();
            let gray =
                GrayImage::from_raw(size as u32, size as u32, data).expect("mask has its shape");
            let path = dir
                .join("ground_truth")
                .join(defect)
                .join(format!("{:03}_mask.png", job.index));
            gray.save_with_format(&path, image::ImageFormat::Png)
                .map_err(|source| Error::Encode { path, source })?;
        }
        Ok(())
    })
}

fn save(img: &RgbImage, path: &Path) -> Result<(), Error> {
    img.save_with_format(path, image::ImageFormat::Png)
        .map_err(|source| Error::Encode {
            path: path.to_path_buf(),
            source,
        })
}
