//! The page codec of migration streams and sync points: a page is sent
//! raw, sparse (mostly zero: the common case of guest memory and of the
//! XOR of a page with its previous version) or as an lz4 block, whichever
//! is smallest enough to pay.
//!
//! Sync points carry [`encode_delta`] pages: the XOR of the page with its
//! version in the previous sync point (or the initial memory), coded by
//! [`encode_page`]; both sides hold that previous version (the recorder's
//! and the replayer's memory checkpoint).

/// The page size the codec is tuned for (the sparse form indexes 8-byte
/// words of one such page).
pub const PAGE: usize = 4096;

/// Pages whose lz4 form is not at least this much smaller are sent raw.
const MIN_SAVING: usize = PAGE / 8;
/// Pages with at most this many non-zero 8-byte words use the sparse codec.
const SPARSE_MAX_WORDS: usize = 48;
/// Codec tags: the first byte of a compressed page.
const CODEC_LZ4: u8 = 0;
const CODEC_SPARSE: u8 = 1;

/// Encode `page` into `out` (cleared first). Returns `true` if `out` holds
/// a compressed form, `false` if compression did not pay and `out` holds
/// the raw page.
///
/// Compressed forms start with a codec byte: `1` = sparse (pages that are
/// mostly zero, the common case of guest memory: `u16` word index and `u64`
/// value for each non-zero 8-byte word, little-endian; decodes with one
/// memset and a few stores), `0` = an lz4 block.
pub fn encode_page(page: &[u8], out: &mut Vec<u8>) -> bool {
    out.clear();
    let nonzero = page
        .chunks_exact(8)
        .filter(|w| u64::from_ne_bytes((*w).try_into().unwrap_or_default()) != 0)
        .take(SPARSE_MAX_WORDS + 1)
        .count();
    if page.len() == PAGE && nonzero <= SPARSE_MAX_WORDS {
        out.push(CODEC_SPARSE);
        for (i, w) in page.chunks_exact(8).enumerate() {
            if w.iter().any(|&b| b != 0) {
                out.extend_from_slice(&(i as u16).to_le_bytes());
                out.extend_from_slice(w);
            }
        }
        return true;
    }
    out.push(CODEC_LZ4);
    out.resize(1 + lz4_flex::block::get_maximum_output_size(page.len()), 0);
    match lz4_flex::block::compress_into(page, &mut out[1..]) {
        Ok(n) if n + 1 + MIN_SAVING <= page.len() => {
            out.truncate(n + 1);
            true
        }
        _ => {
            out.clear();
            out.extend_from_slice(page);
            false
        }
    }
}

/// Why a page from the stream does not decode.
#[derive(Debug, thiserror::Error)]
pub enum PageError {
    /// An uncompressed page that is not exactly one page.
    #[error("raw page of {0} bytes")]
    RawSize(usize),
    /// A sparse page whose length is not a whole number of words.
    #[error("sparse page of {0} bytes")]
    SparseSize(usize),
    /// A sparse word outside the page.
    #[error("sparse page word at byte {0}")]
    SparseWord(usize),
    /// An lz4 block that decodes to another size.
    #[error("compressed page decodes to {0} bytes")]
    Lz4Size(usize),
    /// An lz4 block that does not decode.
    #[error("compressed page: {0}")]
    Lz4(#[from] lz4_flex::block::DecompressError),
    /// A codec byte this build does not know.
    #[error("unknown page codec {0}")]
    Codec(u8),
    /// No bytes at all.
    #[error("empty compressed page")]
    Empty,
}

/// Decode a page sent by [`encode_page`] into `page` (exactly one page).
pub fn decode_page(data: &[u8], compressed: bool, page: &mut [u8]) -> Result<(), PageError> {
    if !compressed {
        if data.len() != page.len() {
            return Err(PageError::RawSize(data.len()));
        }
        page.copy_from_slice(data);
        return Ok(());
    }
    match data.split_first() {
        Some((&CODEC_SPARSE, words)) => {
            if words.len() % 10 != 0 {
                return Err(PageError::SparseSize(data.len()));
            }
            page.fill(0);
            for w in words.chunks_exact(10) {
                let i = u16::from_le_bytes([w[0], w[1]]) as usize * 8;
                let Some(dst) = page.get_mut(i..i + 8) else {
                    return Err(PageError::SparseWord(i));
                };
                dst.copy_from_slice(&w[2..]);
            }
            Ok(())
        }
        Some((&CODEC_LZ4, block)) => match lz4_flex::block::decompress_into(block, page)? {
            n if n == page.len() => Ok(()),
            n => Err(PageError::Lz4Size(n)),
        },
        Some((&codec, _)) => Err(PageError::Codec(codec)),
        None => Err(PageError::Empty),
    }
}

/// Encode `page` as its XOR with `prev` (its previous version, same size),
/// page-coded into `out`; `xor` is scratch space. A raw result is exactly
/// one page long, a compressed one always shorter, so the length tells
/// them apart ([`decode_delta`]).
pub fn encode_delta(page: &[u8], prev: &[u8], xor: &mut Vec<u8>, out: &mut Vec<u8>) {
    xor.clear();
    xor.extend(page.iter().zip(prev).map(|(a, b)| a ^ b));
    encode_page(xor, out);
}

/// Decode an [`encode_delta`] page against `prev` into `page` (both one
/// page).
pub fn decode_delta(data: &[u8], prev: &[u8], page: &mut [u8]) -> Result<(), PageError> {
    check_delta(data, page)?;
    for (b, p) in page.iter_mut().zip(prev) {
        *b ^= p;
    }
    Ok(())
}

/// Decode an [`encode_delta`] page's XOR into `page` (without its previous
/// version: to check that it decodes).
pub fn check_delta(data: &[u8], page: &mut [u8]) -> Result<(), PageError> {
    decode_page(data, data.len() != page.len(), page)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_codec_round_trip() {
        let mut sparse = vec![0u8; PAGE];
        sparse[8..16].copy_from_slice(&0x1234_5678_9abc_def0u64.to_le_bytes());
        let mut noisy = vec![0u8; PAGE];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for b in noisy.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        let mut enc = Vec::new();
        let mut dec = vec![0u8; PAGE];
        assert!(encode_page(&sparse, &mut enc));
        assert!(enc.len() < 64, "sparse page took {} bytes", enc.len());
        decode_page(&enc, true, &mut dec).unwrap();
        assert_eq!(dec, sparse);
        // Text-like: compressible, not sparse (lz4).
        let text: Vec<u8> = (0..PAGE).map(|i| b"tandem "[i % 7]).collect();
        assert!(encode_page(&text, &mut enc));
        assert_eq!(enc[0], CODEC_LZ4);
        decode_page(&enc, true, &mut dec).unwrap();
        assert_eq!(dec, text);
        assert!(decode_page(
            &[CODEC_SPARSE, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0],
            true,
            &mut dec
        )
        .is_err());
        assert!(decode_page(&[9], true, &mut dec).is_err());
        assert!(!encode_page(&noisy, &mut enc));
        decode_page(&enc, false, &mut dec).unwrap();
        assert_eq!(dec, noisy);
        assert!(decode_page(&[0xff; 7], true, &mut dec).is_err());
        assert!(decode_page(&[0; 7], false, &mut dec).is_err());
    }

    #[test]
    fn delta_round_trip() {
        let prev: Vec<u8> = (0..PAGE).map(|i| (i * 7) as u8).collect();
        let mut page = prev.clone();
        page[100] ^= 0x5a;
        page[4000..4008].copy_from_slice(&u64::MAX.to_le_bytes());
        let (mut xor, mut enc) = (Vec::new(), Vec::new());
        encode_delta(&page, &prev, &mut xor, &mut enc);
        assert!(enc.len() < 32, "a two-word change took {} bytes", enc.len());
        let mut dec = vec![0u8; PAGE];
        decode_delta(&enc, &prev, &mut dec).unwrap();
        assert_eq!(dec, page);
        // Unchanged: one byte.
        encode_delta(&prev, &prev, &mut xor, &mut enc);
        assert_eq!(enc.len(), 1);
        decode_delta(&enc, &prev, &mut dec).unwrap();
        assert_eq!(dec, prev);
        // Raw when nothing pays, told apart by its length.
        let mut x = 1u64;
        let noisy: Vec<u8> = (0..PAGE)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (x >> 56) as u8
            })
            .collect();
        encode_delta(&noisy, &prev, &mut xor, &mut enc);
        assert_eq!(enc.len(), PAGE);
        decode_delta(&enc, &prev, &mut dec).unwrap();
        assert_eq!(dec, noisy);
        assert!(decode_delta(&[7; 5000], &prev, &mut dec).is_err());
    }
}
