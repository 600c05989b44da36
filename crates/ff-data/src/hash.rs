//! The workspace's two small non-cryptographic hashes, defined once:
//! splitmix64 to derive independent seeds from (seed, epoch, index), and
//! FNV-1a (64-bit) to fingerprint names and file contents.

/// splitmix64's output function: decorrelates nearby inputs (a seed, an
/// epoch, an index) into independent 64-bit values for seeding RNGs.
pub fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a, 64-bit, over `bytes`: cheap, stable across platforms and
/// versions; enough to tell a torn or foreign file apart, no defence
/// against tampering.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vectors() {
        // FNV-1a 64 reference values.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        // splitmix64 of 0 (the first output of the generator seeded with 0).
        assert_eq!(splitmix64(0), 0xe220_a839_7b1d_cdaf);
    }
}
