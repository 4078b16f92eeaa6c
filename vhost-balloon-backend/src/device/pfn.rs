//! Inflate and deflate buffers: arrays of little-endian u32 page frame numbers in 4 KiB units
//! (VIRTIO_BALLOON_PFN_SHIFT), up to 256 per buffer from Linux, but any length is accepted.

/// The most PFNs taken from one descriptor chain. Linux sends 256; a hostile driver could send
/// a chain as large as the queue allows, and this bounds the work one chain can cause.
pub const MAX_PFNS_PER_CHAIN: usize = 1 << 16;

/// Appends the PFNs in `bytes` to `out`. Returns the number of trailing bytes that do not form a
/// whole PFN (a malformed buffer; the whole PFNs are still used).
pub fn parse_pfns(bytes: &[u8], out: &mut Vec<u32>) -> usize {
    let chunks = bytes.chunks_exact(4);
    let rest = chunks.remainder().len();
    out.extend(chunks.map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])));
    rest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_and_partial_pfns() {
        let mut out = Vec::new();
        assert_eq!(
            parse_pfns(&[1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff], &mut out),
            0
        );
        assert_eq!(out, vec![1, u32::MAX]);
        out.clear();
        assert_eq!(parse_pfns(&[2, 0, 0, 0, 9, 9], &mut out), 2);
        assert_eq!(out, vec![2]);
        out.clear();
        assert_eq!(parse_pfns(&[], &mut out), 0);
        assert!(out.is_empty());
    }
}
