//! The entries of a record log (DESIGN.md, "The determinism boundary").
//!
//! Every entry carries the `exit_seq` (the VM's logical clock, rule 1) of the
//! exit at which it happened. Within a log, entries appear in non-decreasing
//! `exit_seq` order; several entries may share one `exit_seq` (an input and
//! the interrupt it raised, for example).

use serde::{Deserialize, Serialize};

pub use crate::digest::Digest;

/// A host-to-guest value that entered the VM at an exit (DESIGN.md rule 2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Input {
    /// Virtual monotonic time in ns, read by a device register (PIT counter, port 0x61).
    Clock(u64),
    /// Wall-clock time, ns since the Unix epoch (RTC).
    WallClock(u64),
    /// A virtual-time deadline (the PIT's next IRQ0) was reached at this exit.
    DeadlineReached,
    /// Bytes that arrived on the serial console.
    Console(Vec<u8>),
    /// A network frame arrived (virtio-net receive).
    NetFrame(Vec<u8>),
}

/// What kind of output left the VM (DESIGN.md rule 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum OutputKind {
    /// Bytes the guest wrote to its serial console.
    Console,
    /// An Ethernet frame the guest sent.
    NetFrame,
}

impl OutputKind {
    /// Its code in the log.
    pub fn code(self) -> u8 {
        match self {
            OutputKind::Console => 0,
            OutputKind::NetFrame => 1,
        }
    }

    /// The kind with log code `c`.
    pub fn from_code(c: u8) -> Option<Self> {
        match c {
            0 => Some(OutputKind::Console),
            1 => Some(OutputKind::NetFrame),
            _ => None,
        }
    }
}

/// What the log keeps of an output: its kind, length and a short hash of
/// its bytes ([`OutputRecord::of`]), enough for a replayer to check that it
/// produced the same output at the same exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputRecord {
    /// Console bytes or a frame.
    pub kind: OutputKind,
    /// Length of the output in bytes.
    pub len: u64,
    /// The first 8 bytes (little endian) of the BLAKE3 hash of the bytes.
    pub hash: u64,
}

impl OutputRecord {
    /// The record of output `bytes` of `kind`.
    pub fn of(kind: OutputKind, bytes: &[u8]) -> Self {
        let h = blake3::hash(bytes);
        let mut b = [0u8; 8];
        b.copy_from_slice(&h.as_bytes()[..8]);
        OutputRecord {
            kind,
            len: bytes.len() as u64,
            hash: u64::from_le_bytes(b),
        }
    }
}

/// A cheap check of the vCPU, logged every N exits (DESIGN.md rule 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Fingerprint {
    /// The KVM exit reason of the exit (`KVM_EXIT_*`).
    pub exit_reason: u32,
    /// Guest RIP at the exit.
    pub rip: u64,
    /// Guest RAX at the exit.
    pub rax: u64,
    /// Guest RCX at the exit.
    pub rcx: u64,
    /// Guest RFLAGS at the exit.
    pub rflags: u64,
}

/// Full state at a sync point (DESIGN.md rule 4): the replayer applies it
/// instead of executing up to here.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SyncPoint {
    /// vCPU state, opaque to the log (serialized by the vmm).
    pub vcpu_state: Vec<u8>,
    /// Device state, opaque to the log (serialized by the vmm).
    pub device_state: Vec<u8>,
    /// Pages dirtied since the previous sync point: `(guest physical address,
    /// delta)`, the delta being the XOR of the page with its version in the
    /// previous sync point (or the initial memory), page-coded
    /// ([`crate::page::encode_delta`]; the log does not decode it).
    pub pages: Vec<(u64, Vec<u8>)>,
    /// Digest of the whole VM state after applying this sync point.
    pub digest: Digest,
}

/// One record of the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Entry {
    /// A host-to-guest input delivered at `exit_seq`.
    Input {
        /// The exit at which the input entered the VM.
        exit_seq: u64,
        /// The value.
        input: Input,
    },
    /// An output (console bytes, a sent frame) produced at `exit_seq`: only
    /// its record, the bytes themselves left the VM.
    Output {
        /// The exit that produced it.
        exit_seq: u64,
        /// Kind, length, hash.
        output: OutputRecord,
    },
    /// An interrupt injected (`KVM_INTERRUPT`) at `exit_seq`.
    Interrupt {
        /// The exit at which it was injected.
        exit_seq: u64,
        /// The vector.
        vector: u8,
    },
    /// A cheap vCPU check at `exit_seq`.
    Fingerprint {
        /// The exit that was fingerprinted.
        exit_seq: u64,
        /// The registers.
        fp: Fingerprint,
    },
    /// Full state at `exit_seq` (boxed: it is large and rare).
    SyncPoint {
        /// The last deterministic exit before the sync point.
        exit_seq: u64,
        /// The state.
        sync: Box<SyncPoint>,
    },
    /// A full state digest at `exit_seq`.
    Digest {
        /// The exit at which the state was hashed.
        exit_seq: u64,
        /// The digest.
        digest: Digest,
    },
    /// A progress mark: every entry of the exits before `exit_seq` has
    /// been logged (the recorder is at `exit_seq` or later). A protected
    /// primary writes one when nothing else was logged for a while, so
    /// that a replayer that reads the log as it arrives may run on to
    /// `exit_seq` instead of waiting at its last logged exit. It changes
    /// nothing in the replayed VM.
    Progress {
        /// The exit the recorder had reached.
        exit_seq: u64,
    },
    /// The VM is handed over at `exit_seq` (a planned switchover to the
    /// replayer, `tandem switchover`): the recording ends here because the
    /// replaying side takes the VM on from this exit, not because the guest
    /// ended. Only the `End` at the same exit may follow. Log format 5.
    Handover {
        /// The exit where the VM changes hosts.
        exit_seq: u64,
    },
    /// The recorded run ended at `exit_seq` with `status`; nothing follows.
    End {
        /// The last exit of the run.
        exit_seq: u64,
        /// Exit status of the run (vmm-defined; 0 = guest shut down normally).
        status: i32,
    },
}

impl Entry {
    /// The `exit_seq` of the entry.
    pub fn exit_seq(&self) -> u64 {
        match *self {
            Entry::Input { exit_seq, .. }
            | Entry::Output { exit_seq, .. }
            | Entry::Interrupt { exit_seq, .. }
            | Entry::Fingerprint { exit_seq, .. }
            | Entry::SyncPoint { exit_seq, .. }
            | Entry::Digest { exit_seq, .. }
            | Entry::Progress { exit_seq }
            | Entry::Handover { exit_seq }
            | Entry::End { exit_seq, .. } => exit_seq,
        }
    }

    /// A short name of the entry kind, for messages and statistics.
    pub fn kind(&self) -> &'static str {
        match self {
            Entry::Input { input, .. } => match input {
                Input::Clock(_) => "input.clock",
                Input::WallClock(_) => "input.wall_clock",
                Input::DeadlineReached => "input.deadline_reached",
                Input::Console(_) => "input.console",
                Input::NetFrame(_) => "input.net_frame",
            },
            Entry::Output { output, .. } => match output.kind {
                OutputKind::Console => "output.console",
                OutputKind::NetFrame => "output.net_frame",
            },
            Entry::Interrupt { .. } => "interrupt",
            Entry::Fingerprint { .. } => "fingerprint",
            Entry::SyncPoint { .. } => "sync_point",
            Entry::Digest { .. } => "digest",
            Entry::Progress { .. } => "progress",
            Entry::Handover { .. } => "handover",
            Entry::End { .. } => "end",
        }
    }
}
