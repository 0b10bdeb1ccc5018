//! The announcement a guest's new host makes after a migration or a
//! failover, as QEMU's `announce-self` does: RARP "reverse request" frames
//! broadcast from the guest's MAC so that switches learn its new port.

use super::mac::MacAddr;

/// EtherType of RARP.
pub const ETH_P_RARP: u16 = 0x8035;
/// Rounds of announcements.
pub const ANNOUNCE_ROUNDS: u32 = 5;
/// Gap before the second round (ms); each later gap grows by
/// [`ANNOUNCE_STEP_MS`] (QEMU's defaults: 50 ms initial, 100 ms step).
pub const ANNOUNCE_INITIAL_MS: u64 = 50;
/// Growth of the gap between rounds (ms).
pub const ANNOUNCE_STEP_MS: u64 = 100;

/// The RARP frame QEMU's announce-self sends for `mac`: broadcast, ethertype
/// 0x8035, opcode 3 (reverse request), sender and target hardware address
/// the guest's, protocol addresses zero; padded to the 60-byte minimum.
pub fn rarp_frame(mac: MacAddr) -> Vec<u8> {
    let m = mac.bytes();
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&MacAddr::BROADCAST.bytes());
    f.extend_from_slice(&m);
    f.extend_from_slice(&ETH_P_RARP.to_be_bytes());
    f.extend_from_slice(&1u16.to_be_bytes()); // hardware type: Ethernet
    f.extend_from_slice(&0x0800u16.to_be_bytes()); // protocol type: IPv4
    f.push(6); // hardware address length
    f.push(4); // protocol address length
    f.extend_from_slice(&3u16.to_be_bytes()); // opcode: reverse request
    f.extend_from_slice(&m); // sender hardware address
    f.extend_from_slice(&[0; 4]); // sender protocol address
    f.extend_from_slice(&m); // target hardware address
    f.extend_from_slice(&[0; 4]); // target protocol address
    f.resize(60, 0);
    f
}

/// The gaps (ms) between the rounds: 50, 150, 250, ...
pub fn announce_gaps_ms() -> impl Iterator<Item = u64> {
    (0..ANNOUNCE_ROUNDS.saturating_sub(1) as u64)
        .map(|i| ANNOUNCE_INITIAL_MS + i * ANNOUNCE_STEP_MS)
}

/// Send the announcement rounds through `send` (one frame per round),
/// sleeping between them. Blocks for the whole announcement (~1 s): call it
/// from a thread of its own. Stops at the first send error and returns it.
pub fn announce(
    mac: MacAddr,
    mut send: impl FnMut(&[u8]) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let frame = rarp_frame(mac);
    send(&frame)?;
    for gap in announce_gaps_ms() {
        std::thread::sleep(std::time::Duration::from_millis(gap));
        send(&frame)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_layout_and_schedule() {
        let mac = MacAddr([0x52, 0x54, 0, 1, 2, 3]);
        let f = rarp_frame(mac);
        assert_eq!(f.len(), 60);
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &mac.0);
        assert_eq!(&f[12..14], &[0x80, 0x35]);
        assert_eq!(&f[20..22], &[0, 3]);
        assert_eq!(&f[22..28], &mac.0);
        assert_eq!(&f[32..38], &mac.0);
        assert_eq!(
            announce_gaps_ms().collect::<Vec<_>>(),
            vec![50, 150, 250, 350]
        );
        let mut n = 0;
        announce(mac, |_| {
            n += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(n, ANNOUNCE_ROUNDS);
    }
}
