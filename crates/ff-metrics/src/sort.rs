//! Sorting packed samples by their score key (the high 32 bits of each `u64`):
//! a least-significant-digit radix sort, linear in the number of samples.

use rayon::prelude::*;

/// Bits per radix digit: 3 passes cover the 32-bit key, and 2048 buckets
/// keep every bucket's write position in L1 cache.
const DIGIT_BITS: u32 = 11;
const BUCKETS: usize = 1 << DIGIT_BITS;
const DIGIT_MASK: u64 = (BUCKETS as u64) - 1;
/// Shifts of the three key digits, least significant first.
const SHIFTS: [u32; 3] = [32, 32 + DIGIT_BITS, 32 + 2 * DIGIT_BITS];

/// Below this many samples a comparison sort is faster than three radix passes.
const RADIX_MIN_LEN: usize = 1 << 12;

/// Sorts `keys` ascending by their high 32 bits (the score key); the order of
/// keys with equal high bits is unspecified, which the sweeps do not need.
///
/// Each of the three passes is a stable counting sort by one 11-bit digit,
/// run in parallel: the input is cut into one chunk per rayon thread, every
/// chunk counts its digits, and the output is cut into disjoint per-chunk,
/// per-bucket slices so each thread scatters its chunk without sharing.
pub(crate) fn sort_by_score_key(keys: &mut Vec<u64>) {
    if keys.len() < RADIX_MIN_LEN {
        keys.sort_unstable();
        return;
    }
    let mut scratch = vec![0u64; keys.len()];
    let mut sorted_in_scratch = false;
    for &shift in &SHIFTS {
        let (source, target) = if sorted_in_scratch {
            (&scratch[..], &mut keys[..])
        } else {
            (&keys[..], &mut scratch[..])
        };
        if scatter_by_digit(source, target, shift) {
            sorted_in_scratch = !sorted_in_scratch;
        }
    }
    if sorted_in_scratch {
        *keys = scratch;
    }
}

fn digit(key: u64, shift: u32) -> usize {
    ((key >> shift) & DIGIT_MASK) as usize
}

/// One stable counting-sort pass of `source` into `target` by the digit at
/// `shift`. Returns `false` (and writes nothing) when every key has the same
/// digit, so the pass would not reorder anything; for scores in a narrow
/// range (anomaly maps in [-1, 0]) the top digit is often such a digit.
fn scatter_by_digit(source: &[u64], target: &mut [u64], shift: u32) -> bool {
    let chunk_len = source.len().div_ceil(rayon::current_num_threads().max(1));
    let chunks: Vec<&[u64]> = source.chunks(chunk_len).collect();
    let histograms: Vec<Vec<usize>> = chunks
        .par_iter()
        .map(|chunk| {
            let mut histogram = vec![0usize; BUCKETS];
            for &key in *chunk {
                histogram[digit(key, shift)] += 1;
            }
            histogram
        })
        .collect();
    let single_bucket = (0..BUCKETS)
        .any(|bucket| histograms.iter().map(|h| h[bucket]).sum::<usize>() == source.len());
    if single_bucket {
        return false;
    }
    // Bucket by bucket, each chunk gets the next slice of the output: keys of
    // a lower bucket come first, and within a bucket earlier chunks come
    // first, which keeps the pass stable.
    let mut outputs: Vec<Vec<&mut [u64]>> =
        chunks.iter().map(|_| Vec::with_capacity(BUCKETS)).collect();
    let mut rest = target;
    for bucket in 0..BUCKETS {
        for (output, histogram) in outputs.iter_mut().zip(&histograms) {
            let (slice, tail) = std::mem::take(&mut rest).split_at_mut(histogram[bucket]);
            output.push(slice);
            rest = tail;
        }
    }
    chunks
        .par_iter()
        .zip(outputs.into_par_iter())
        .for_each(|(chunk, mut output)| {
            let mut cursors = vec![0usize; BUCKETS];
            for &key in *chunk {
                let bucket = digit(key, shift);
                output[bucket][cursors[bucket]] = key;
                cursors[bucket] += 1;
            }
        });
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn check(mut keys: Vec<u64>) {
        let mut expected: Vec<u64> = keys.iter().map(|k| k >> 32).collect();
        expected.sort_unstable();
        let mut low_bits: Vec<u64> = keys.iter().map(|k| k & 0xffff_ffff).collect();
        sort_by_score_key(&mut keys);
        let got: Vec<u64> = keys.iter().map(|k| k >> 32).collect();
        assert_eq!(got, expected);
        // The payload travels with its key: the multiset of payloads is unchanged.
        let mut got_low: Vec<u64> = keys.iter().map(|k| k & 0xffff_ffff).collect();
        low_bits.sort_unstable();
        got_low.sort_unstable();
        assert_eq!(got_low, low_bits);
    }

    #[test]
    fn sorts_random_keys_of_every_size() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for len in [0, 1, 2, 100, RADIX_MIN_LEN - 1, RADIX_MIN_LEN, 50_000] {
            check((0..len).map(|_| rng.random::<u64>()).collect());
        }
    }

    #[test]
    fn sorts_keys_with_constant_digits_and_many_ties() {
        let mut rng = ChaCha8Rng::seed_from_u64(6);
        // Only the middle digit varies: the other two passes are skipped.
        let keys = (0..30_000u64)
            .map(|i| (0x4000_0000u64 | (rng.random_range(0..64u64) << 11)) << 32 | i)
            .collect();
        check(keys);
        // All keys tied.
        check((0..10_000u64).map(|i| (7u64 << 32) | i).collect());
    }
}
