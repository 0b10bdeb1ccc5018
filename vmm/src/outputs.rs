//! The determinism boundary, outbound: the one interface through which
//! everything the world sees of the VM leaves it (DESIGN.md rule 6).
//!
//! Devices never write to the host. The serial console gathers the bytes the
//! guest writes, the NIC the frames it sends; at each exit the run loop takes
//! them and hands each to [`Outputs::emit`] as an [`Output`] tagged with the
//! `exit_seq` that produced it. What happens then is the implementation's
//! decision, not the device's:
//! * live ([`LiveOutputs`]): sent at once;
//! * recorder: a short hash goes into the log at that `exit_seq`, then the
//!   live implementation sends it;
//! * replayer: checked against the logged hash (a mismatch is a divergence)
//!   and dropped;
//! * a primary with a secondary (later): held until the secondary has
//!   acknowledged the log up to `exit_seq`.
//!
//! Console bytes are cut into outputs at deterministic points (a newline, a
//! full buffer, the guest halting, the run stopping; see
//! `devices::legacy::serial`), so that recorder and replayer see the same
//! outputs.

use std::io::Write;

use crate::devices::virtio::net::tap::TapWriter;
pub use crate::inputs::Divergence;
pub use recordlog::{OutputKind, OutputRecord};

/// Bytes leaving the VM.
#[derive(Debug, Clone)]
pub struct Output {
    /// The exit at which the guest produced them.
    pub exit_seq: u64,
    /// Console bytes or a frame.
    pub kind: OutputKind,
    /// The bytes (one frame, or a run of console bytes).
    pub bytes: Vec<u8>,
    /// When the guest produced them (taken at their exit, before anything
    /// logs or holds them: the Output Rule's hold is measured from here).
    /// Not part of what an output is: equality ignores it.
    pub produced: std::time::Instant,
}

impl PartialEq for Output {
    fn eq(&self, other: &Self) -> bool {
        (self.exit_seq, self.kind, &self.bytes) == (other.exit_seq, other.kind, &other.bytes)
    }
}

impl Eq for Output {}

impl Output {
    /// What the log keeps of it.
    pub fn record(&self) -> OutputRecord {
        OutputRecord::of(self.kind, &self.bytes)
    }
}

/// Where the VM's outputs go.
pub trait Outputs: Send {
    /// An output the guest produced at `output.exit_seq` (called while the
    /// vCPU is stopped at that exit). An error is a divergence found by a
    /// replayer; live implementations never fail (a host sink that fails
    /// must not change what the guest sees).
    fn emit(&mut self, output: Output) -> Result<(), Divergence>;
}

/// Counters of what left through [`LiveOutputs`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutputStats {
    /// Console bytes written.
    pub console_bytes: u64,
    /// Frames written to the TAP.
    pub frames_sent: u64,
    /// Frames the TAP refused (or that had nowhere to go).
    pub frames_failed: u64,
}

/// The live implementation: console bytes to the console sink, frames to
/// the TAP, at once.
pub struct LiveOutputs {
    console: Box<dyn Write + Send>,
    net: Option<TapWriter>,
    stats: OutputStats,
}

impl LiveOutputs {
    /// Console bytes go to `console`, frames to `net` (none: discarded and
    /// counted as failed).
    pub fn new(console: Box<dyn Write + Send>, net: Option<TapWriter>) -> Self {
        LiveOutputs {
            console,
            net,
            stats: OutputStats::default(),
        }
    }

    /// Outputs that go nowhere.
    pub fn discard() -> Self {
        Self::new(Box::new(std::io::sink()), None)
    }

    /// Counters so far.
    pub fn stats(&self) -> OutputStats {
        self.stats
    }
}

impl Outputs for LiveOutputs {
    fn emit(&mut self, output: Output) -> Result<(), Divergence> {
        match output.kind {
            OutputKind::Console => {
                self.stats.console_bytes += output.bytes.len() as u64;
                if let Err(e) = self.console.write_all(&output.bytes) {
                    tracing::debug!("serial output sink: {e}");
                }
            }
            OutputKind::NetFrame => match &mut self.net {
                Some(tap) => match tap.send(&output.bytes) {
                    Ok(()) => self.stats.frames_sent += 1,
                    Err(e) => {
                        self.stats.frames_failed += 1;
                        tracing::debug!(tap = tap.name(), "sending a frame failed: {e}");
                    }
                },
                None => self.stats.frames_failed += 1,
            },
        }
        Ok(())
    }
}

impl<O: Outputs + ?Sized> Outputs for Box<O> {
    fn emit(&mut self, output: Output) -> Result<(), Divergence> {
        (**self).emit(output)
    }
}
