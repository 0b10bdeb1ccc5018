//! Moving a running VM's disk to another image on the same host, inside the
//! VMM process (`tandem migrate --api SOCK --disk-dest NEW.img`, no `--to`):
//! storage live migration without moving the VM.
//!
//! The same pre-copy as a migration, with a file instead of a link: every
//! non-zero block of the current image is copied to the new image while the
//! guest runs, then rounds of the blocks the guest wrote meanwhile (the
//! device's shared [`DirtyBlocks`](vmm::devices::virtio::block::DirtyBlocks)
//! record, 64 KiB blocks, marked after the data reached the image), until
//! the last round fits the pause target. Then the vCPU is held at its next
//! exit, the last dirty blocks are copied, the new image is `fsync`ed, the
//! device is switched to it (`VirtioBlock::replace_backing`, which also
//! checks its size) and the guest goes on. The VM's configuration names the
//! new image from then on, so later snapshots and migrations use it.
//!
//! Any failure before the switch (the new image cannot be created or
//! written, disk full, the guest ended) leaves the guest running on the old
//! image, and a new image this move created is removed. The move only ever
//! reads the old image; after the switch nothing writes it any more.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmm::devices::virtio::block::{BlockConfig, DIRTY_BLOCK_SIZE};
use vmm::image::{Access, Image, ImageError};

use super::control::{ControlError, DiskInfo, VmController};
use super::precopy::{Next, Precopy, MAX_ROUNDS};
use super::Progress;

/// Copy rate assumed before one was measured (bytes/s).
const INITIAL_RATE: f64 = 200e6;
/// Time the switch needs besides copying: fsync of a few blocks, reopening
/// the image, stopping and resuming the vCPU.
const FIXED_SWITCH: Duration = Duration::from_millis(1);

/// What `tandem migrate --disk-dest PATH` (without `--to`) asked for.
#[derive(Debug, Clone)]
pub struct DiskMoveParams {
    /// The new image (absolute). Created if missing.
    pub dest: PathBuf,
    /// Overwrite an existing non-empty file.
    pub force: bool,
    /// Largest acceptable pause of the guest.
    pub downtime: Duration,
    /// Cap on the copy rate while the guest runs, bytes per second (the
    /// final copy is never slowed down).
    pub max_bandwidth: Option<u64>,
}

/// The summary of a finished disk move.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DiskMoveReport {
    /// The old image (no longer used by the VM).
    pub from: PathBuf,
    /// The image the VM uses now.
    pub to: PathBuf,
    /// Size of the disk in bytes.
    pub disk_bytes: u64,
    /// From the request to the guest running on the new image (ms).
    pub total_ms: f64,
    /// How long the guest was stopped (ms): final copy, fsync, switch.
    pub pause_ms: f64,
    /// Bytes written to the new image in all (zero blocks of the first
    /// pass are skipped: the new image starts sparse and zeroed).
    pub bytes_copied: u64,
    /// Copy rounds while the guest ran (the final copy not counted).
    pub rounds: u32,
    /// Blocks copied while the guest was stopped.
    pub final_blocks: u64,
    /// Highest auto-converge throttle used (%).
    pub max_throttle_pct: u32,
    /// Did the rounds reach the pause target (else: forced switch)?
    pub converged: bool,
}

/// Why a disk move failed. The guest keeps running on its current image.
#[derive(Debug, thiserror::Error)]
pub enum DiskMoveError {
    #[error("a migration or disk move is already in progress")]
    /// A migration or disk move is already in progress.
    Busy,
    #[error("the VM has stopped")]
    /// The VM ended before the move completed.
    VmEnded,
    /// This VM's disk cannot be moved (the reason).
    #[error("{0}")]
    Refused(&'static str),
    #[error("the VM has no disk")]
    /// The VM has no disk to move.
    NoDisk,
    #[error("{0} is the VM's current disk image")]
    /// The destination is the current image.
    SameImage(PathBuf),
    #[error("{0} is a directory")]
    /// The destination is a directory.
    IsDirectory(PathBuf),
    #[error("{0} is not a regular file")]
    /// The destination is not a regular file.
    NotRegular(PathBuf),
    #[error("{0} exists and is not empty (--force overwrites it)")]
    /// The destination holds data (and --force was not given).
    NotEmpty(PathBuf),
    #[error("cannot create {path}: {source}")]
    /// The destination could not be created.
    Create {
        /// The destination.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    #[error("reading the current disk image {path}: {source}")]
    /// The current image could not be read.
    Read {
        /// The current image.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    #[error("writing {path}: {source}")]
    /// The destination could not be written.
    Write {
        /// The destination.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    #[error("switching the disk to {path}: {reason}")]
    /// The device refused the new image (the guest goes on with the old one).
    Switch {
        /// The destination.
        path: PathBuf,
        /// Why.
        #[source]
        reason: super::control::ReplaceDiskError,
    },
    #[error("cancelled by the operator")]
    /// The operator cancelled the move.
    Cancelled,
    /// The destination (or the current image) is locked by another
    /// process, or cannot be locked (`vmm::image`).
    #[error(transparent)]
    Locked(vmm::image::ImageError),
}

fn control_error(e: ControlError) -> DiskMoveError {
    match e {
        ControlError::Busy => DiskMoveError::Busy,
        ControlError::Ended | ControlError::NotMigrating => DiskMoveError::VmEnded,
        ControlError::Refused(why) => DiskMoveError::Refused(why),
        // Only a resume meets it.
        ControlError::DiskLocked(_) => {
            DiskMoveError::Refused("the disk image is held by another process")
        }
    }
}

/// Move the disk of the VM of `ctl` to `params.dest`. `on_progress` is
/// called after each round and at phase changes (phases `disk-copy`,
/// `disk-switch`, `disk-done`). On success the guest runs on the new image; on
/// failure it runs on the old one as before.
pub fn move_disk(
    ctl: &VmController,
    params: &DiskMoveParams,
    on_progress: &mut dyn FnMut(&Progress),
) -> Result<DiskMoveReport, DiskMoveError> {
    ctl.begin_migration().map_err(control_error)?;
    let result = ctl.disk().ok_or(DiskMoveError::NoDisk).and_then(|disk| {
        let read_only = ctl.config().disk.is_some_and(|d| d.read_only);
        let mut mover = Mover {
            ctl,
            params,
            disk,
            read_only,
            start: Instant::now(),
            progress: Progress {
                phase: "disk-copy".into(),
                ..Default::default()
            },
            report: DiskMoveReport::default(),
            buf: vec![0; DIRTY_BLOCK_SIZE as usize],
            last_status: Instant::now(),
        };
        mover.run(on_progress)
    });
    if let Err(e) = &result {
        tracing::debug!("moving the disk to {} failed: {e}", params.dest.display());
    }
    ctl.end_migration();
    result
}

struct Mover<'a> {
    ctl: &'a VmController,
    params: &'a DiskMoveParams,
    disk: DiskInfo,
    read_only: bool,
    start: Instant,
    progress: Progress,
    report: DiskMoveReport,
    buf: Vec<u8>,
    /// When `tandem status` last got fresh numbers.
    last_status: Instant,
}

/// Refuse destinations that would lose data or cannot work; `Ok(true)` if
/// `dest` exists (and may be overwritten).
fn check_dest(dest: &Path, current: &Path, force: bool) -> Result<bool, DiskMoveError> {
    let cur = std::fs::metadata(current).map_err(|source| DiskMoveError::Read {
        path: current.to_path_buf(),
        source,
    })?;
    match std::fs::metadata(dest) {
        Ok(m) => {
            if m.dev() == cur.dev() && m.ino() == cur.ino() {
                return Err(DiskMoveError::SameImage(dest.to_path_buf()));
            }
            if m.is_dir() {
                return Err(DiskMoveError::IsDirectory(dest.to_path_buf()));
            }
            if !m.is_file() {
                return Err(DiskMoveError::NotRegular(dest.to_path_buf()));
            }
            if m.len() > 0 && !force {
                return Err(DiskMoveError::NotEmpty(dest.to_path_buf()));
            }
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(DiskMoveError::Create {
            path: dest.to_path_buf(),
            source,
        }),
    }
}

impl Mover<'_> {
    fn publish(&mut self, on_progress: &mut dyn FnMut(&Progress)) {
        self.progress.elapsed_ms = ms(self.start.elapsed());
        self.progress.bytes_sent = self.progress.disk_bytes_sent;
        self.ctl.set_progress(Some(self.progress.clone()));
        on_progress(&self.progress);
    }

    fn write_err(&self, source: std::io::Error) -> DiskMoveError {
        DiskMoveError::Write {
            path: self.params.dest.clone(),
            source,
        }
    }

    /// Copy `blocks` from `src` to `dst` (`skip_zero`: leave zero blocks,
    /// which a fresh image already holds). Returns the bytes written.
    fn copy(
        &mut self,
        src: &File,
        dst: &File,
        blocks: &[u64],
        skip_zero: bool,
        throttled: bool,
    ) -> Result<u64, DiskMoveError> {
        let mut total = 0u64;
        for &b in blocks {
            // A cancel is honoured until the guest is held.
            if throttled && self.ctl.cancel_requested() {
                return Err(DiskMoveError::Cancelled);
            }
            let off = b * DIRTY_BLOCK_SIZE;
            let len = DIRTY_BLOCK_SIZE.min(self.disk.len.saturating_sub(off)) as usize;
            if len == 0 {
                continue;
            }
            let data = &mut self.buf[..len];
            src.read_exact_at(data, off)
                .map_err(|source| DiskMoveError::Read {
                    path: self.disk.path.clone(),
                    source,
                })?;
            if skip_zero && data.iter().all(|&x| x == 0) {
                continue;
            }
            if let Err(e) = dst.write_all_at(data, off) {
                return Err(self.write_err(e));
            }
            total += len as u64;
            if self.last_status.elapsed() >= Duration::from_millis(100) {
                self.last_status = Instant::now();
                let mut p = self.progress.clone();
                p.disk_bytes_sent += total;
                p.bytes_sent = p.disk_bytes_sent;
                p.dirty_blocks = self.disk.dirty.pending();
                p.elapsed_ms = ms(self.start.elapsed());
                self.ctl.set_progress(Some(p));
            }
            if let Some(max) = self.params.max_bandwidth.filter(|&m| m > 0 && throttled) {
                let due = Duration::from_secs_f64(
                    (self.progress.disk_bytes_sent + total) as f64 / max as f64,
                );
                let elapsed = self.start.elapsed();
                if due > elapsed {
                    std::thread::sleep(due - elapsed);
                }
            }
        }
        self.progress.disk_bytes_sent += total;
        Ok(total)
    }

    fn run(
        &mut self,
        on_progress: &mut dyn FnMut(&Progress),
    ) -> Result<DiskMoveReport, DiskMoveError> {
        let dest = self.params.dest.clone();
        let existed = check_dest(&dest, &self.disk.path, self.params.force)?;
        // Locked before anything is truncated: an image another process
        // uses is refused as it is. The device shares this lock once it
        // switches to the new image (vmm::image).
        let access = if existed {
            Access::Write
        } else {
            Access::CreateNew
        };
        let dst = Image::open(&dest, access).map_err(|e| match e {
            ImageError::Open { path, source } => DiskMoveError::Create { path, source },
            other => DiskMoveError::Locked(other),
        })?;
        let result = self.copy_and_switch(dst.file(), on_progress);
        if result.is_err() && !existed {
            // Ours, and never used by the VM.
            let _ = std::fs::remove_file(&dest);
        }
        result
    }

    fn copy_and_switch(
        &mut self,
        dst: &File,
        on_progress: &mut dyn FnMut(&Progress),
    ) -> Result<DiskMoveReport, DiskMoveError> {
        let dest = self.params.dest.clone();
        self.report.from = self.disk.path.clone();
        self.report.to = dest.clone();
        self.report.disk_bytes = self.disk.len;
        // A sparse, zeroed image of the disk's size.
        dst.set_len(0)
            .and_then(|()| dst.set_len(self.disk.len))
            .map_err(|e| self.write_err(e))?;
        if let Some(dir) = dest.parent() {
            // The new name must survive a crash once the VM uses it.
            let _ = File::open(dir).and_then(|d| d.sync_all());
        }
        // Read through its own descriptor; the lock is the device's.
        let src = Image::open(&self.disk.path, Access::Read).map_err(|e| match e {
            ImageError::Open { path, source } => DiskMoveError::Read { path, source },
            other => DiskMoveError::Locked(other),
        })?;
        let src = src.file();
        let dirty = self.disk.dirty.clone();
        // The whole disk goes in round 0: forget older writes.
        dirty.take();
        let mut precopy = Precopy::new(self.params.downtime, FIXED_SWITCH);
        let mut rate = INITIAL_RATE;
        let mut round = 0u32;
        self.publish(on_progress);
        loop {
            if self.ctl.ended() {
                return Err(DiskMoveError::VmEnded);
            }
            let t0 = Instant::now();
            self.progress.round = round;
            let blocks: Vec<u64> = if round == 0 {
                (0..dirty.blocks()).collect()
            } else {
                dirty.take()
            };
            let copied = self.copy(src, dst, &blocks, round == 0, true)?;
            // Each round's data on stable storage: the sync in the pause
            // only covers the last blocks.
            dst.sync_data().map_err(|e| self.write_err(e))?;
            let elapsed = t0.elapsed();
            if copied >= 256 << 10 {
                rate = rate.max(copied as f64 / elapsed.as_secs_f64());
            }
            let pending = dirty.pending();
            let estimate =
                Duration::from_secs_f64((pending * DIRTY_BLOCK_SIZE) as f64 / rate) + FIXED_SWITCH;
            tracing::debug!(
                "disk move round {round}: {} blocks, {copied} bytes in {elapsed:?}; {pending} dirty now, estimate {estimate:?}",
                blocks.len()
            );
            self.progress.dirty_blocks = pending;
            self.progress.bandwidth = rate;
            self.progress.estimated_downtime_ms = ms(estimate);
            self.publish(on_progress);
            round += 1;
            let shrinking = pending * 2 <= blocks.len() as u64;
            match precopy.end_round(&mut self.progress, round, pending, estimate, shrinking) {
                Next::Switch => break,
                Next::Round { throttle } => {
                    if let Some(pct) = throttle {
                        self.ctl.set_throttle(pct);
                    }
                }
            }
        }
        if precopy.gave_up() {
            tracing::warn!("disk move did not converge in {MAX_ROUNDS} rounds; forcing the switch");
        }
        self.report.rounds = round;
        self.report.converged = precopy.converged();
        self.report.max_throttle_pct = precopy.max_throttle_pct();

        // The final copy, with the guest held.
        self.progress.phase = "disk-switch".into();
        self.publish(on_progress);
        let held = self.ctl.hold().map_err(control_error)?;
        let last = (|| {
            let blocks = dirty.take();
            self.copy(src, dst, &blocks, false, false)?;
            // Metadata too: the file may be new or resized.
            dst.sync_all().map_err(|e| self.write_err(e))?;
            Ok(blocks.len() as u64)
        })();
        let final_blocks = match last {
            Ok(n) => n,
            Err(e) => {
                self.ctl.thaw();
                return Err(e);
            }
        };
        let config = BlockConfig {
            path: dest.clone(),
            read_only: self.read_only,
        };
        let resumed = match self.ctl.replace_disk(config).map_err(control_error)? {
            Ok(t) => t,
            Err(reason) => return Err(DiskMoveError::Switch { path: dest, reason }),
        };
        self.report.final_blocks = final_blocks;
        self.report.pause_ms = ms(resumed.saturating_duration_since(held));
        self.report.total_ms = ms(self.start.elapsed());
        self.report.bytes_copied = self.progress.disk_bytes_sent;
        self.progress.phase = "disk-done".into();
        self.progress.dirty_blocks = 0;
        self.publish(on_progress);
        // The old image as of the switch, on stable storage too (nothing
        // writes it any more; best effort).
        let _ = src.sync_data();
        tracing::info!(
            "disk moved from {} to {} ({:.2} ms pause)",
            self.report.from.display(),
            dest.display(),
            self.report.pause_ms
        );
        Ok(self.report.clone())
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
