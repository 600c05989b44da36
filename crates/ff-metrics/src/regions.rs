//! Connected components of a ground-truth mask with 8-connectivity, as
//! `scipy.ndimage.label(mask, structure=np.ones((3, 3)))` finds them for the
//! MVTec AD evaluation code.

use crate::Error;

/// Reusable buffers for labelling one image after another without
/// reallocating (one per worker thread).
#[derive(Debug, Default)]
pub(crate) struct RegionScratch {
    /// Per pixel: 0 for a normal pixel, `k` for a pixel of region `k` (1-based).
    pub(crate) labels: Vec<u32>,
    /// `sizes[k - 1]` is the number of pixels of region `k`.
    pub(crate) sizes: Vec<u32>,
    /// Pixels whose neighbours are still to be visited by the flood fill.
    stack: Vec<usize>,
}

/// Labels the 8-connected regions of `mask` (row-major, `height x width`)
/// into `scratch.labels` and their sizes into `scratch.sizes`.
///
/// Regions are numbered in raster order of their first pixel, like SciPy's.
/// The caller guarantees `mask.len() == height * width <= u32::MAX`.
pub(crate) fn label_regions(
    mask: &[bool],
    height: usize,
    width: usize,
    scratch: &mut RegionScratch,
) {
    let RegionScratch {
        labels,
        sizes,
        stack,
    } = scratch;
    labels.clear();
    labels.resize(mask.len(), 0);
    sizes.clear();
    for start in 0..mask.len() {
        if !mask[start] || labels[start] != 0 {
            continue;
        }
        // `sizes.len()` is at most the pixel count, which the caller bounds by u32::MAX.
        let label = sizes.len() as u32 + 1;
        let mut size: u32 = 1;
        labels[start] = label;
        stack.clear();
        stack.push(start);
        while let Some(pixel) = stack.pop() {
            let (y, x) = (pixel / width, pixel % width);
            // Clamped neighbourhood rows and columns: the 3x3 block around the
            // pixel, cut at the image border (SciPy treats outside as background).
            for ny in y.saturating_sub(1)..=(y + 1).min(height - 1) {
                for nx in x.saturating_sub(1)..=(x + 1).min(width - 1) {
                    let neighbour = ny * width + nx;
                    if mask[neighbour] && labels[neighbour] == 0 {
                        labels[neighbour] = label;
                        size += 1;
                        stack.push(neighbour);
                    }
                }
            }
        }
        sizes.push(size);
    }
}

/// The pixel counts of the 8-connected regions of one ground-truth mask, in
/// raster order of each region's first pixel (SciPy's numbering).
///
/// `mask` is row-major `[height, width]`, `true` for an anomalous pixel. Two
/// anomalous pixels touching at an edge or a corner belong to the same region,
/// as in the MVTec AD evaluation code.
///
/// # Errors
/// [`Error::LengthMismatch`] when `mask.len() != height * width`;
/// [`Error::TooLarge`] when the image has more than `u32::MAX` pixels.
pub fn region_sizes(mask: &[bool], height: usize, width: usize) -> Result<Vec<usize>, Error> {
    const METRIC: &str = "region_sizes";
    let pixels = height
        .checked_mul(width)
        .filter(|&p| p <= u32::MAX as usize);
    let Some(pixels) = pixels else {
        return Err(Error::TooLarge {
            metric: METRIC,
            n: 1,
            height,
            width,
        });
    };
    if mask.len() != pixels {
        return Err(Error::LengthMismatch {
            metric: METRIC,
            what: "mask",
            expected: pixels,
            found: mask.len(),
        });
    }
    let mut scratch = RegionScratch::default();
    if pixels > 0 {
        label_regions(mask, height, width, &mut scratch);
    }
    Ok(scratch.sizes.iter().map(|&s| s as usize).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses a picture of a mask: `#` anomalous, `.` normal, one row per line.
    fn mask(rows: &[&str]) -> (Vec<bool>, usize, usize) {
        let width = rows[0].len();
        let pixels = rows
            .iter()
            .flat_map(|r| r.chars().map(|c| c == '#'))
            .collect();
        (pixels, rows.len(), width)
    }

    #[test]
    fn corners_connect_regions() {
        let (m, h, w) = mask(&["#...", ".#..", "..#.", "...#"]);
        assert_eq!(region_sizes(&m, h, w).unwrap(), vec![4]);
        // A checkerboard is one region under 8-connectivity.
        let (m, h, w) = mask(&["#.#.", ".#.#", "#.#."]);
        assert_eq!(region_sizes(&m, h, w).unwrap(), vec![6]);
    }

    #[test]
    fn separate_regions_in_raster_order() {
        let (m, h, w) = mask(&["##..#", "##...", ".....", "..###"]);
        assert_eq!(region_sizes(&m, h, w).unwrap(), vec![4, 1, 3]);
        // A ring is one region and its hole is not part of it.
        let (m, h, w) = mask(&["###", "#.#", "###"]);
        assert_eq!(region_sizes(&m, h, w).unwrap(), vec![8]);
        // A U shape whose first row starts two regions that merge later.
        let (m, h, w) = mask(&["#.#", "#.#", "###"]);
        assert_eq!(region_sizes(&m, h, w).unwrap(), vec![7]);
    }

    #[test]
    fn empty_full_and_degenerate_masks() {
        let (m, h, w) = mask(&["...", "..."]);
        assert_eq!(region_sizes(&m, h, w).unwrap(), Vec::<usize>::new());
        let (m, h, w) = mask(&["###", "###"]);
        assert_eq!(region_sizes(&m, h, w).unwrap(), vec![6]);
        assert_eq!(
            region_sizes(&[true, false, true], 1, 3).unwrap(),
            vec![1, 1]
        );
        assert_eq!(
            region_sizes(&[true, false, true], 3, 1).unwrap(),
            vec![1, 1]
        );
        assert_eq!(region_sizes(&[], 0, 5).unwrap(), Vec::<usize>::new());
        assert!(matches!(
            region_sizes(&[true], 2, 2),
            Err(Error::LengthMismatch {
                expected: 4,
                found: 1,
                ..
            })
        ));
    }
}
