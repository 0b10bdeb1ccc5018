//! The lockstep protocol between a primary and its secondary (issue 8,
//! first slice: protection from the first exit). See `docs/lockstep.md`.
//!
//! On one authenticated channel connection (the primary connects with
//! [`Role::Primary`](crate::channel::Role::Primary)):
//! 1. primary → secondary: a frame of kind [`kind::HEADER`] carrying a
//!    postcard [`Header`] (what the secondary must hold before any VM byte:
//!    the disk's length and content hash);
//! 2. secondary → primary: an empty frame of kind [`kind::ACCEPTED`], or a
//!    `Message::Abort` naming why it refuses;
//! 3. primary → secondary: the record log as a byte stream (its own header,
//!    then frames) in `Message::LogBytes` chunks of whole frames;
//! 4. secondary → primary: after each chunk, a frame of kind [`kind::ACK`]
//!    carrying an [`Ack`]: the log bytes it has received so far. The primary
//!    releases an output once the acknowledged offset covers the log entry
//!    of that output (the Output Rule).
//! 5. primary → secondary: after each chunk that holds entries, a frame of
//!    kind [`kind::CHUNK_TIME`] carrying a [`ChunkTime`]: the exit the log
//!    reaches with that chunk and the primary's guest time (µs) when it
//!    left. The secondary's own lag (`tandem status`) is measured against
//!    them: what it has received, not what its replayer has read.
//!
//! A *seeded* stream (`tandem protect` of a running VM) has
//! [`Header::seed`]: the migration header of the VM. The secondary answers
//! [`kind::ACCEPTED`] with a postcard `migration::Accepted` (its disk
//! plan), then the migration's pre-copy follows on the same connection
//! exactly as `docs/migration.md` describes it (pages, disk blocks,
//! `RoundDone` acknowledged), then, at the exit where the primary paused,
//! its final pages and blocks, `DeviceState` and `SwitchoverReady` (here:
//! the bootstrap is complete, the log follows). The secondary restores the
//! VM, answers `Running` (it holds the seed), and from then on the stream is
//! the log as in steps 3 and 4, its header naming the seed's digest.
//!
//! [`kind::UNPROTECT`] (empty, primary → secondary) after the log's `End`:
//! the operator ended protection (`tandem unprotect`); the guest runs on,
//! unprotected, on the primary.
//!
//! Switchover (`tandem switchover`, a planned move of the VM to its
//! secondary's host): the log ends with `Entry::Handover` and its `End` at
//! the exit where the primary paused, then [`kind::HANDOVER`] (a
//! [`Handover`]: the log offset up to which the primary released outputs;
//! it releases nothing more). The secondary replays to that exit, claims
//! the arbiter, goes live at once and answers [`kind::LIVE`] (a [`Live`]).
//! A secondary of an older build never sees these frames: it refuses the
//! log's format version 5 first.
//!
//! Repair (DESIGN.md rule 5): a secondary whose replay diverged sends
//! [`kind::SYNC_REQUEST`] (a [`SyncRequest`]) at once; the primary captures
//! a sync point (with its state digest) at its next exit and logs it like
//! any other; the secondary, skipping the log to the next sync point,
//! adopts it and reports [`kind::REPAIRED`] (a [`Repaired`]), whose count
//! the primary shows in `tandem status`.

use std::io::Read;
use std::path::{Path, PathBuf};

use recordlog::{Digest, Hasher};
use serde::{Deserialize, Serialize};

/// Version of this protocol. 2: [`Header::seed`]. 3: [`kind::SYNC_REQUEST`]
/// and [`kind::REPAIRED`] (a version-2 primary would take them for a
/// protocol error and drop its secondary, so version 2 is refused).
/// 4: [`Header::arbiter`] (a header is read by its version first:
/// [`decode_header`]). 5: [`kind::CHUNK_TIME`] after every log chunk (a
/// version-4 secondary refuses the stream at the first one: an unexpected
/// frame kind).
pub const LOCKSTEP_VERSION: u32 = 5;

/// Application frame kinds of the lockstep stream.
pub mod kind {
    /// [`super::Header`], primary → secondary.
    pub const HEADER: u8 = 24;
    /// Empty: the secondary takes the VM.
    pub const ACCEPTED: u8 = 25;
    /// [`super::Ack`], secondary → primary.
    pub const ACK: u8 = 26;
    /// Empty, primary → secondary, after the log's `End`: protection was
    /// ended by the operator, the guest runs on at the primary.
    pub const UNPROTECT: u8 = 29;
    /// [`super::SyncRequest`], secondary → primary: the replay diverged,
    /// log a sync point at the next exit.
    pub const SYNC_REQUEST: u8 = 30;
    /// [`super::Repaired`], secondary → primary: a divergence was repaired.
    pub const REPAIRED: u8 = 31;
    /// [`super::Handover`], primary → secondary, after a log that ends in
    /// a handover: take the VM on.
    pub const HANDOVER: u8 = 32;
    /// [`super::Live`], secondary → primary: it won the arbiter and runs
    /// the VM.
    pub const LIVE: u8 = 33;
    /// [`super::ChunkTime`], primary → secondary, after each log chunk
    /// that holds entries: how far the log reaches with it.
    pub const CHUNK_TIME: u8 = 34;
}

/// How far the log stream reaches with the chunk just sent: the highest
/// exit of its entries, and the primary's guest time when it left.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkTime {
    /// The highest `exit_seq` of an entry in the chunk (a progress mark's
    /// exit is the exit the primary had reached).
    pub exit: u64,
    /// The primary's guest virtual time when the chunk left, in µs since
    /// its stream started (the primary's guest time is its host's
    /// monotonic time: only differences mean anything).
    pub guest_us: u64,
}

impl ChunkTime {
    /// Its [`kind::CHUNK_TIME`] frame payload.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).unwrap_or_default()
    }

    /// A peer's [`kind::CHUNK_TIME`] payload: exactly one [`ChunkTime`]
    /// (two varints, at most 20 bytes), nothing after it.
    pub fn decode(payload: &[u8]) -> Result<ChunkTime, String> {
        if payload.len() > 20 {
            return Err(format!(
                "a chunk time of {} bytes (at most 20)",
                payload.len()
            ));
        }
        match postcard::take_from_bytes::<ChunkTime>(payload) {
            Ok((t, [])) => Ok(t),
            Ok((_, rest)) => Err(format!("{} bytes after the chunk time", rest.len())),
            Err(e) => Err(format!("unreadable chunk time: {e}")),
        }
    }

    /// Does this chunk time follow `prev` (the previous one of the same
    /// stream)? Neither the exit nor the guest time goes back.
    pub fn check_after(&self, prev: &ChunkTime) -> Result<(), String> {
        if self.exit < prev.exit || self.guest_us < prev.guest_us {
            return Err(format!(
                "the log goes back: it reached exit {} at {} µs, now exit {} at {} µs",
                prev.exit, prev.guest_us, self.exit, self.guest_us
            ));
        }
        Ok(())
    }
}

/// When the primary had reached which exit (one pair per log chunk, oldest
/// first, at most a fixed number: the oldest are forgotten), to answer
/// "when was the primary where the secondary is now?". `T`: the primary's
/// clock (an `Instant` on the primary, [`ChunkTime::guest_us`] on the
/// secondary).
#[derive(Debug, Clone)]
pub struct ExitTimes<T> {
    reached: std::collections::VecDeque<(u64, T)>,
    cap: usize,
}

/// Pairs an [`ExitTimes`] holds by default (16 to 24 bytes each): at a
/// chunk every progress mark interval (2 ms), about two minutes of them.
pub const EXIT_TIMES: usize = 1 << 16;

impl<T: Copy> Default for ExitTimes<T> {
    fn default() -> Self {
        ExitTimes::new(EXIT_TIMES)
    }
}

impl<T: Copy> ExitTimes<T> {
    /// An empty history of at most `cap` (≥ 2) pairs.
    pub fn new(cap: usize) -> Self {
        ExitTimes {
            reached: std::collections::VecDeque::new(),
            cap: cap.max(2),
        }
    }

    /// A chunk reaching `exit` left at `at`.
    pub fn push(&mut self, exit: u64, at: T) {
        if self.reached.len() >= self.cap {
            self.reached.pop_front();
        }
        self.reached.push_back((exit, at));
    }

    /// The newest pair: how far the log reaches.
    pub fn last(&self) -> Option<(u64, T)> {
        self.reached.back().copied()
    }

    /// Forget what lies wholly behind `replayed` (the newest pair at or
    /// before it stays: it is where the answer of [`ExitTimes::at`] starts).
    pub fn forget_behind(&mut self, replayed: u64) {
        while self.reached.len() > 1 && self.reached[1].0 <= replayed {
            self.reached.pop_front();
        }
    }

    /// When the primary first reached (or passed) exit `replayed`, after
    /// [`ExitTimes::forget_behind`]`(replayed)`: `None` past every exit
    /// known (caught up).
    pub fn at(&self, replayed: u64) -> Option<T> {
        match (self.reached.front(), self.reached.get(1)) {
            (Some(&(exit, at)), _) if exit >= replayed => Some(at),
            (_, Some(&(_, at))) => Some(at),
            _ => None,
        }
    }

    /// Pairs held.
    pub fn len(&self) -> usize {
        self.reached.len()
    }

    /// None held.
    pub fn is_empty(&self) -> bool {
        self.reached.is_empty()
    }
}

/// The primary hands the VM over (after the log's handover `End`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handover {
    /// Outputs up to this log offset left the primary; none after it ever
    /// will (the new primary produces them).
    pub released: u64,
}

/// The secondary took the VM over.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Live {
    /// From the arrival of the [`Handover`] to the guest running here (ms,
    /// the secondary's own clock): the replay's last exits, the claim,
    /// the NIC's attach.
    pub took_ms: f64,
    /// The exit it goes live at.
    pub exit_seq: u64,
}

impl Live {
    /// Its [`kind::LIVE`] frame payload.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).unwrap_or_default()
    }
}

/// The secondary's replay diverged at `exit_seq`: it asks for a sync point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncRequest {
    /// The exit at which the replay diverged.
    pub exit_seq: u64,
}

/// The secondary repaired a divergence by adopting a sync point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Repaired {
    /// The exit at which the replay diverged.
    pub diverged_at: u64,
    /// The exit of the sync point it adopted.
    pub sync_exit: u64,
    /// Divergences repaired so far on this secondary (this one included).
    pub repaired: u64,
}

/// The disk both sides must hold, byte for byte (disks are not copied in
/// this slice: each side brings its own identical image).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskHash {
    /// Image length in bytes.
    pub len: u64,
    /// BLAKE3 of the whole image.
    pub hash: Digest,
}

impl DiskHash {
    /// Hash the image at `path` (opened read-only and locked shared:
    /// `vmm::image`; an image another process writes is refused).
    pub fn of(path: &Path) -> std::io::Result<DiskHash> {
        let img = vmm::image::Image::open(path, vmm::image::Access::Read).map_err(|e| match e {
            vmm::image::ImageError::Open { source, .. } => source,
            other => std::io::Error::other(other.to_string()),
        })?;
        let mut f = img.file();
        let mut h = Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut len = 0u64;
        loop {
            let n = match f.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            h.update(&buf[..n]);
            len += n as u64;
        }
        Ok(DiskHash {
            len,
            hash: h.finalize(),
        })
    }
}

/// First frame of the primary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// Must be [`LOCKSTEP_VERSION`].
    pub version: u32,
    /// The VM's disk, if it has one (a stream from boot: the secondary's
    /// own copy must be identical; a seeded stream copies it instead).
    pub disk: Option<DiskHash>,
    /// A running VM is seeded first (the migration pre-copy): its migration
    /// header. `None`: the log starts at boot.
    pub seed: Option<crate::migration::Header>,
    /// The primary's arbiter (`Arbiter::identity`), if it has one: a
    /// secondary with another arbiter refuses the VM.
    pub arbiter: Option<String>,
}

/// The secondary has received this many bytes of the log stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// Log stream bytes received (header included).
    pub offset: u64,
    /// The exit the secondary's replay has reached.
    pub replayed: u64,
    /// The guest's virtual time there (ns: the last clock value replayed).
    pub replayed_ns: u64,
}

/// A protected VM as `tandem status` shows it, on either side.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProtectionStatus {
    /// `primary` or `secondary`.
    pub role: String,
    /// `seeding`, `protected`, `lost: WHY` (primary); `replaying`,
    /// `ended` (secondary).
    pub state: String,
    /// `NAME at ADDR` of the other side.
    pub peer: String,
    /// The exit protection started at (0: from boot).
    pub start_exit: u64,
    /// The primary's exit (the secondary: the exit the log it received
    /// reaches, as the primary's [`ChunkTime`]s say).
    pub exit_seq: u64,
    /// The exit the secondary's replay has reached (its last ack).
    pub replayed_exit: u64,
    /// Exits the secondary is behind.
    pub lag_exits: u64,
    /// Guest virtual time the secondary is behind (µs; the secondary: from
    /// the primary's being at `replayed_exit` to the end of what it
    /// received).
    pub lag_us: f64,
    /// Log bytes streamed (primary) or received (secondary).
    pub log_bytes: u64,
    /// Average log bandwidth since protection started (bit/s).
    pub log_bandwidth_bps: f64,
    /// Log bytes the secondary has acknowledged.
    pub acked_bytes: u64,
    /// Outputs held until acknowledged (primary).
    pub outputs_held: u64,
    /// Age of the oldest held output (ms).
    pub oldest_held_ms: f64,
    /// Last measured acknowledgement round trip: a chunk sent to its ack (ms).
    pub ack_rtt_ms: f64,
    /// Divergences of the secondary's replay repaired by a sync point
    /// (the primary: as the secondary last reported).
    #[serde(default)]
    pub repaired: u64,
    /// This side's heartbeat interval (ms).
    #[serde(default)]
    pub heartbeat_ms: u64,
    /// This side's failover timeout (ms): silence for this long and the
    /// peer is lost.
    #[serde(default)]
    pub failover_timeout_ms: u64,
    /// How long ago the peer gave its last sign of life (ms).
    #[serde(default)]
    pub last_heard_ms: f64,
    /// The VM's identity for the arbiter (empty until the primary sent it).
    #[serde(default)]
    pub vm_id: String,
    /// The protection generation: the arbiter's claim is `(vm_id,
    /// generation)`.
    #[serde(default)]
    pub generation: u64,
    /// Sync points the secondary asked for after a divergence (primary:
    /// requests answered; secondary: requests sent).
    #[serde(default)]
    pub sync_requests: u64,
    /// The primary's lag bound and log queue (primary only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bound: Option<LagBoundStatus>,
}

/// How a protected primary keeps its secondary close (docs/lockstep.md,
/// "Lag bound"): the measured lag, the bound past which it slows its
/// vCPU, and its bounded log queue.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LagBoundStatus {
    /// The lag bound (ms; 0: none).
    pub lag_bound_ms: u64,
    /// The secondary's lag now, counted from the last acknowledgement
    /// (grows while no acknowledgement comes) (ms).
    pub lag_now_ms: f64,
    /// The vCPU is slowed now because the lag passed the bound.
    pub slowed: bool,
    /// The vCPU's hold now (%, the duty-cycle throttle).
    pub throttle_pct: u32,
    /// Times the vCPU was slowed, and the time it was held in all (ms).
    pub slow_downs: u64,
    /// Time the vCPU was held by the throttle in all (ms).
    pub held_ms: f64,
    /// The secondary's lag at its acknowledgements: p50, p99 and maximum
    /// (µs) over `lag_samples` acknowledgements.
    pub lag_p50_us: f64,
    /// See `lag_p50_us`.
    pub lag_p99_us: f64,
    /// See `lag_p50_us`.
    pub lag_max_us: f64,
    /// Acknowledgements measured.
    pub lag_samples: u64,
    /// Log bytes queued for the secondary now, the most ever, the bound.
    pub queue_bytes: u64,
    /// See `queue_bytes`.
    pub queue_high_water_bytes: u64,
    /// See `queue_bytes`.
    pub queue_bound_bytes: u64,
    /// Times the vCPU waited because the queue was full, and how long in
    /// all (ms).
    pub queue_full_waits: u64,
    /// See `queue_full_waits`.
    pub queue_full_wait_ms: f64,
}

/// Why the secondary refuses a primary's header.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    /// Another version of this protocol.
    #[error("lockstep protocol version {0} (this secondary speaks {LOCKSTEP_VERSION})")]
    Version(u32),
    /// A seeded VM with a disk, and no `--disk` to copy it to.
    #[error("the VM has a {0}-byte disk: give the secondary --disk PATH for its copy")]
    SeedNeedsDisk(u64),
    /// `--disk` for a VM without a disk.
    #[error("the VM has no disk but this secondary was given --disk {}", .0.display())]
    UnexpectedDisk(PathBuf),
    /// A VM protected from boot with a disk, and no `--disk`.
    #[error(
        "the VM has a {0}-byte disk: give the secondary a copy of the primary's image with --disk"
    )]
    NeedsDisk(u64),
    /// The header's bytes do not decode.
    #[error("unreadable lockstep header: {0}")]
    Unreadable(String),
    /// The primary asks another arbiter than this secondary's.
    #[error("{0}")]
    Arbiter(String),
    /// `--disk` cannot be read.
    #[error("--disk {}: {source}", path.display())]
    ReadDisk {
        /// This secondary's image.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// `--disk` has another length than the primary's image.
    #[error("--disk {} is {mine} bytes, the primary's image {theirs} bytes: not the same image", path.display())]
    DiskLength {
        /// This secondary's image.
        path: PathBuf,
        /// Its length.
        mine: u64,
        /// The primary's.
        theirs: u64,
    },
    /// `--disk` has other contents than the primary's image.
    #[error("--disk {} differs from the primary's image (BLAKE3 {}, the primary's {}): the images must be identical", path.display(), mine.to_hex(), theirs.to_hex())]
    DiskContent {
        /// This secondary's image.
        path: PathBuf,
        /// Its hash.
        mine: Digest,
        /// The primary's.
        theirs: Digest,
    },
}

/// A primary's header frame: its version first (a header of another
/// version is refused by its number, not as garbage), then the rest.
pub fn decode_header(payload: &[u8]) -> Result<Header, HeaderError> {
    let (version, _) = postcard::take_from_bytes::<u32>(payload)
        .map_err(|e| HeaderError::Unreadable(e.to_string()))?;
    if version != LOCKSTEP_VERSION {
        return Err(HeaderError::Version(version));
    }
    postcard::from_bytes(payload).map_err(|e| HeaderError::Unreadable(e.to_string()))
}

/// Does the secondary take a primary's header? `disk`: the secondary's own
/// image (`--disk`), if any; `arbiter`: its own arbiter's identity.
pub fn check_header(
    header: &Header,
    disk: Option<&Path>,
    arbiter: Option<&str>,
) -> Result<(), HeaderError> {
    if header.version != LOCKSTEP_VERSION {
        return Err(HeaderError::Version(header.version));
    }
    crate::arbiter::same_arbiter(header.arbiter.as_deref(), arbiter)
        .map_err(HeaderError::Arbiter)?;
    if let Some(seed) = &header.seed {
        // The disk is copied during the seeding, to --disk.
        return match (&seed.disk, disk) {
            (Some(d), None) => Err(HeaderError::SeedNeedsDisk(d.len)),
            _ => Ok(()),
        };
    }
    match (&header.disk, disk) {
        (None, None) => Ok(()),
        (None, Some(p)) => Err(HeaderError::UnexpectedDisk(p.to_path_buf())),
        (Some(d), None) => Err(HeaderError::NeedsDisk(d.len)),
        (Some(d), Some(p)) => {
            let mine = DiskHash::of(p).map_err(|source| HeaderError::ReadDisk {
                path: p.to_path_buf(),
                source,
            })?;
            if mine.len != d.len {
                return Err(HeaderError::DiskLength {
                    path: p.to_path_buf(),
                    mine: mine.len,
                    theirs: d.len,
                });
            }
            if mine.hash != d.hash {
                return Err(HeaderError::DiskContent {
                    path: p.to_path_buf(),
                    mine: mine.hash,
                    theirs: d.hash,
                });
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_times_are_checked() {
        let t = ChunkTime {
            exit: 1 << 40,
            guest_us: u64::MAX,
        };
        assert_eq!(ChunkTime::decode(&t.encode()), Ok(t));
        let mut long = t.encode();
        long.push(0);
        assert!(ChunkTime::decode(&long)
            .unwrap_err()
            .contains("1 bytes after"));
        assert!(ChunkTime::decode(&[0x80]).is_err());
        assert!(ChunkTime::decode(&[0; 21])
            .unwrap_err()
            .contains("at most 20"));
        let prev = ChunkTime {
            exit: 10,
            guest_us: 500,
        };
        let same = prev;
        assert!(same.check_after(&prev).is_ok());
        let back = ChunkTime { exit: 9, ..prev };
        assert!(back.check_after(&prev).unwrap_err().contains("goes back"));
        let earlier = ChunkTime {
            guest_us: 499,
            ..prev
        };
        assert!(earlier.check_after(&prev).is_err());
    }

    #[test]
    fn exit_times_answer_when_the_primary_was_there() {
        let mut t = ExitTimes::new(3);
        assert_eq!(t.at(0), None);
        t.push(10, 100u64);
        t.push(20, 200);
        t.push(30, 300);
        t.forget_behind(5);
        assert_eq!((t.len(), t.at(5)), (3, Some(100)));
        // Between two chunks: the one that passed it.
        t.forget_behind(15);
        assert_eq!((t.len(), t.at(15)), (3, Some(200)));
        t.forget_behind(20);
        assert_eq!((t.len(), t.at(20)), (2, Some(200)));
        // Past every exit known: caught up.
        t.forget_behind(31);
        assert_eq!((t.len(), t.at(31), t.last()), (1, None, Some((30, 300))));
        // Bounded: the oldest go.
        for i in 4..10 {
            t.push(i * 10, i * 100);
        }
        assert_eq!((t.len(), t.at(0)), (3, Some(700)));
    }

    #[test]
    fn disk_mismatch_is_refused() {
        let dir = std::env::temp_dir().join(format!("lockstep-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a = dir.join("a.img");
        let b = dir.join("b.img");
        std::fs::write(&a, vec![1u8; 4096]).unwrap();
        std::fs::write(&b, vec![2u8; 4096]).unwrap();
        let h = Header {
            version: LOCKSTEP_VERSION,
            disk: Some(DiskHash::of(&a).unwrap()),
            seed: None,
            arbiter: None,
        };
        assert!(check_header(&h, Some(&a), None).is_ok());
        let e = check_header(&h, Some(&b), None).unwrap_err();
        assert!(matches!(e, HeaderError::DiskContent { .. }), "{e}");
        assert!(e.to_string().contains("differs"), "{e}");
        let e = check_header(&h, None, None).unwrap_err();
        assert!(matches!(e, HeaderError::NeedsDisk(4096)), "{e}");
        assert!(e.to_string().contains("--disk"));
        let mine = Header {
            arbiter: Some("file arbiter 12".into()),
            ..h.clone()
        };
        assert!(check_header(&mine, Some(&a), Some("file arbiter 12")).is_ok());
        let e = check_header(&mine, Some(&a), Some("file arbiter 34")).unwrap_err();
        assert!(matches!(e, HeaderError::Arbiter(_)), "{e}");
        let bytes = postcard::to_stdvec(&mine).unwrap();
        assert_eq!(decode_header(&bytes).unwrap(), mine);
        assert!(decode_header(&bytes[..bytes.len() - 3]).is_err());
        let old = Header { version: 3, ..h };
        assert!(matches!(
            check_header(&old, Some(&a), None),
            Err(HeaderError::Version(3))
        ));
        // A version-3 header (no arbiter field) is refused by its number.
        #[derive(Serialize)]
        struct V3 {
            version: u32,
            disk: Option<DiskHash>,
            seed: Option<crate::migration::Header>,
        }
        let v3 = postcard::to_stdvec(&V3 {
            version: 3,
            disk: None,
            seed: None,
        })
        .unwrap();
        assert!(matches!(decode_header(&v3), Err(HeaderError::Version(3))));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
