//! The migration stream's own pieces, shared by the source (`primary`) and
//! the destination (`secondary`): the header that opens a transfer, the
//! destination's acceptance, and the page codec. See `docs/migration.md`.
//!
//! On the control stream, after the channel's `Hello` exchange:
//!
//! 1. source → destination: a frame of kind [`kind::HEADER`] carrying a
//!    postcard [`Header`] (stream version, VM config, memory layout, disk);
//! 2. destination → source: a frame of kind [`kind::ACCEPTED`] (empty), or
//!    `Message::Abort { reason }` if it cannot take the VM;
//! 3. pre-copy rounds: `MemoryPages`, `ZeroPages`, `DiskBlocks`, then
//!    `RoundDone`; the destination answers each `RoundDone` with the same
//!    `RoundDone` once it has applied the round (the source measures the
//!    drain rate from these acknowledgements);
//! 4. stop-and-copy: the final pages and blocks, `DeviceState` (a postcard
//!    `vmm::machine::MachineState`: vCPU, devices, exit counter and virtual
//!    time), `SwitchoverReady`;
//! 5. destination → source: `Running` once the VM is restored and about to
//!    run; the source then closes the connection and ends.
//!
//! Either side may send `Message::Abort` at any point before `Running`.

use serde::{Deserialize, Serialize};

use vmm::machine::VmConfig;
use vmm::PAGE_SIZE;

/// Version of the migration stream (on top of the channel's protocol
/// version). A destination refuses another version with a clear `Abort`.
pub const MIGRATION_VERSION: u32 = 1;

/// Application frame kinds of the migration stream.
pub mod kind {
    /// The [`super::Header`] (source → destination).
    pub const HEADER: u8 = 16;
    /// The destination accepts the VM (empty payload).
    pub const ACCEPTED: u8 = 17;
}

/// What the destination needs to know before the first page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// [`MIGRATION_VERSION`] of the source.
    pub version: u32,
    /// The VM's configuration (memory size, command line, disk).
    pub config: VmConfig,
    /// Guest memory regions `(start, size)`; must equal the destination's.
    pub memory: Vec<(u64, u64)>,
    /// Guest-visible size of the disk in bytes, if the VM has one.
    pub disk_len: Option<u64>,
    /// Where the operator wants the disk on the destination
    /// (`tandem migrate --disk-dest`), when the receiver has no `--disk`.
    pub disk_dest: Option<std::path::PathBuf>,
    /// The source's disk image (canonical path), so that a destination on
    /// the same host refuses to overwrite it.
    pub source_disk: Option<std::path::PathBuf>,
}

/// Pages whose lz4 form is not at least this much smaller are sent raw.
const MIN_SAVING: usize = PAGE_SIZE / 8;
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
    if page.len() == PAGE_SIZE && nonzero <= SPARSE_MAX_WORDS {
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

/// Decode a page sent by [`encode_page`] into `page` (exactly one page).
pub fn decode_page(data: &[u8], compressed: bool, page: &mut [u8]) -> Result<(), String> {
    if !compressed {
        if data.len() != page.len() {
            return Err(format!("raw page of {} bytes", data.len()));
        }
        page.copy_from_slice(data);
        return Ok(());
    }
    match data.split_first() {
        Some((&CODEC_SPARSE, words)) => {
            if words.len() % 10 != 0 {
                return Err(format!("sparse page of {} bytes", data.len()));
            }
            page.fill(0);
            for w in words.chunks_exact(10) {
                let i = u16::from_le_bytes([w[0], w[1]]) as usize * 8;
                let Some(dst) = page.get_mut(i..i + 8) else {
                    return Err(format!("sparse page word at byte {i}"));
                };
                dst.copy_from_slice(&w[2..]);
            }
            Ok(())
        }
        Some((&CODEC_LZ4, block)) => match lz4_flex::block::decompress_into(block, page) {
            Ok(n) if n == page.len() => Ok(()),
            Ok(n) => Err(format!("compressed page decodes to {n} bytes")),
            Err(e) => Err(format!("compressed page: {e}")),
        },
        Some((codec, _)) => Err(format!("unknown page codec {codec}")),
        None => Err("empty compressed page".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_codec_round_trip() {
        let mut sparse = vec![0u8; PAGE_SIZE];
        sparse[8..16].copy_from_slice(&0x1234_5678_9abc_def0u64.to_le_bytes());
        let mut noisy = vec![0u8; PAGE_SIZE];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for b in noisy.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        let mut enc = Vec::new();
        let mut dec = vec![0u8; PAGE_SIZE];
        assert!(encode_page(&sparse, &mut enc));
        assert!(enc.len() < 64, "sparse page took {} bytes", enc.len());
        decode_page(&enc, true, &mut dec).unwrap();
        assert_eq!(dec, sparse);
        // Text-like: compressible, not sparse (lz4).
        let text: Vec<u8> = (0..PAGE_SIZE).map(|i| b"tandem "[i % 7]).collect();
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
}
