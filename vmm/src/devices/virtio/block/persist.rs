//! Saved state of the virtio-mmio block device, and its [`Persist`]
//! implementation.
//!
//! What is saved: the transport registers (feature selectors, acknowledged
//! driver features, status, interrupt status, queue selection), the split
//! virtqueue (addresses, size, ready flag, `next_avail`/`next_used`, event-idx
//! flag), the device configuration (image path, read-only flag, serial) and
//! the capacity the guest was shown.
//!
//! What is not saved: the disk contents (the image is replicated state of its
//! own: DESIGN.md rule 7, moved by the storage-migration path with
//! [`VirtioBlock::read_block`]/[`VirtioBlock::write_block`]), and the dirty-block
//! bitmap (a per-host migration aid; a restored device starts clean, call
//! [`VirtioBlock::mark_all_dirty`] before seeding another host from it).
//!
//! Restore reopens the image from the [`BlockConfig`] passed in (its path may
//! differ from the saved one, e.g. a migrated copy of the disk), and refuses
//! with a clear error when the image's capacity differs from the saved
//! capacity, when the read-only flag differs (the guest negotiated its
//! features with the saved one), or when a ready queue does not lie in guest
//! memory.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::device::{BlockConfig, BlockError, VirtioBlock};
use crate::devices::virtio::mmio::MmioError;
use crate::devices::virtio::persist::MmioTransportState;
use crate::persist::Persist;
use crate::GuestMemory;

/// Why restoring a virtio block device failed.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// The image could not be opened.
    #[error(transparent)]
    Block(#[from] BlockError),
    /// The image's size differs from the size the guest saw.
    #[error(
        "disk image {path} has {found} sectors but the saved device had {expected} sectors; \
         restore needs the same disk"
    )]
    CapacityMismatch {
        /// The image opened for the restore.
        path: PathBuf,
        /// Capacity in the saved state, in 512-byte sectors.
        expected: u64,
        /// Capacity of the image, in 512-byte sectors.
        found: u64,
    },
    /// The read-only flag differs from the saved one.
    #[error(
        "disk image {path}: saved device was {}, restore asks for {}",
        ro_name(*saved),
        ro_name(*requested)
    )]
    ReadOnlyMismatch {
        /// The image opened for the restore.
        path: PathBuf,
        /// Saved read-only flag.
        saved: bool,
        /// Requested read-only flag.
        requested: bool,
    },
    /// The transport or queue state is invalid (bad size, misaligned or
    /// out-of-memory rings, features the device does not offer).
    #[error("disk image {path}: invalid saved transport state: {source}")]
    Transport {
        /// The image opened for the restore.
        path: PathBuf,
        /// What was wrong.
        #[source]
        source: MmioError,
    },
}

fn ro_name(ro: bool) -> &'static str {
    if ro {
        "read-only"
    } else {
        "read-write"
    }
}

/// Saved state of a [`VirtioBlock`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioBlockState {
    /// Path of the image when the state was saved (informational: restore
    /// uses the path of the [`BlockConfig`] it is given).
    pub path: PathBuf,
    /// The device was read-only.
    pub read_only: bool,
    /// Capacity shown to the guest, in 512-byte sectors.
    pub capacity_sectors: u64,
    /// Serial returned by VIRTIO_BLK_T_GET_ID.
    pub serial: String,
    /// Transport registers and queue.
    pub transport: MmioTransportState,
}

impl Persist for VirtioBlock {
    type State = VirtioBlockState;
    /// The image to reopen (path may differ from the saved one) and the
    /// guest memory the queue must lie in.
    type ConstructorArgs = (BlockConfig, GuestMemory);
    type Error = PersistError;

    fn save(&self) -> VirtioBlockState {
        VirtioBlockState {
            path: self.config().path.clone(),
            read_only: self.config().read_only,
            capacity_sectors: self.capacity_sectors(),
            serial: self.serial().to_owned(),
            transport: self.transport().state(),
        }
    }

    fn restore(
        (config, mem): (BlockConfig, GuestMemory),
        state: &VirtioBlockState,
    ) -> Result<Self, PersistError> {
        let path = config.path.clone();
        if config.read_only != state.read_only {
            return Err(PersistError::ReadOnlyMismatch {
                path,
                saved: state.read_only,
                requested: config.read_only,
            });
        }
        let mut dev = VirtioBlock::new(config)?;
        if dev.capacity_sectors() != state.capacity_sectors {
            return Err(PersistError::CapacityMismatch {
                path,
                expected: state.capacity_sectors,
                found: dev.capacity_sectors(),
            });
        }
        dev.set_serial(&state.serial);
        dev.transport_mut()
            .restore_state(&state.transport, &mem)
            .map_err(|source| PersistError::Transport { path, source })?;
        Ok(dev)
    }
}

impl VirtioBlock {
    /// Overwrite the device's state in place (applying a sync point): the
    /// open image, its capacity and the storage-migration dirty-block
    /// tracker stay as they are. Everything is checked before anything
    /// changes, so on error the device is untouched.
    pub fn load_state(
        &mut self,
        state: &VirtioBlockState,
        mem: &GuestMemory,
    ) -> Result<(), PersistError> {
        let path = self.config().path.clone();
        if self.config().read_only != state.read_only {
            return Err(PersistError::ReadOnlyMismatch {
                path,
                saved: state.read_only,
                requested: self.config().read_only,
            });
        }
        if self.capacity_sectors() != state.capacity_sectors {
            return Err(PersistError::CapacityMismatch {
                path,
                expected: state.capacity_sectors,
                found: self.capacity_sectors(),
            });
        }
        // restore_state validates the whole transport before it assigns.
        self.transport_mut()
            .restore_state(&state.transport, mem)
            .map_err(|source| PersistError::Transport { path, source })?;
        self.set_serial(&state.serial);
        // The queue is the saved one now: nothing is left to retry.
        self.clear_stall();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::block::device::tests::{
        new_mem, r32, Driver, TempImage, DATA, DATA2, STATUS,
    };
    use crate::devices::virtio::block::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
    use crate::devices::virtio::mmio::reg;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn round_trip_mid_stream() {
        let img = TempImage::new("persist", 1 << 20);
        let mem = new_mem();
        let mut dev = VirtioBlock::new(img.config(false)).unwrap();
        dev.set_serial("disk-7");
        let mut drv = Driver::setup(&mut dev, &mem, 16);

        // One completed write, its interrupt left pending.
        mem.write_slice(&[0x5a; 512], GuestAddress(DATA)).unwrap();
        let hdr = Driver::header(&mem, 0, VIRTIO_BLK_T_OUT, 9);
        drv.post(
            &mem,
            &[(hdr, 16, false), (DATA, 512, false), (STATUS, 1, true)],
        );
        drv.notify(&mut dev, &mem);
        assert_eq!(drv.pop_used(&mem).unwrap().1, 1);

        // A read posted but not yet notified when the state is captured.
        let hdr = Driver::header(&mem, 1, VIRTIO_BLK_T_IN, 9);
        let head = drv.post(
            &mem,
            &[(hdr, 16, false), (DATA2, 512, true), (STATUS + 1, 1, true)],
        );

        let state = dev.save();
        // The state survives serialization.
        let bytes = postcard::to_allocvec(&state).unwrap();
        let state: VirtioBlockState = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(state, dev.save());
        assert_eq!(state.capacity_sectors, 2048);
        assert_eq!(state.transport.queues[0].next_avail, 1);
        assert_eq!(state.transport.queues[0].next_used, 1);
        assert_eq!(state.transport.interrupt_status, 1);
        drop(dev);

        // Restore from a copy of the disk at another path.
        let copy = TempImage::new("persist-copy", 0);
        std::fs::copy(&img.path, &copy.path).unwrap();
        let mut dev = VirtioBlock::restore((copy.config(false), mem.clone()), &state).unwrap();
        assert_eq!(dev.save().transport, state.transport);
        assert_eq!(dev.serial(), "disk-7");
        assert_eq!(dev.config().path, copy.path);
        assert!(dev.interrupt_level());
        assert_eq!(r32(&mut dev, reg::STATUS), state.transport.status);

        drv.notify(&mut dev, &mem);
        assert_eq!(drv.pop_used(&mem), Some((u32::from(head), 513)));
        let st: u8 = mem.read_obj(GuestAddress(STATUS + 1)).unwrap();
        assert_eq!(st, VIRTIO_BLK_S_OK);
        let mut back = [0u8; 512];
        mem.read_slice(&mut back, GuestAddress(DATA2)).unwrap();
        assert_eq!(back, [0x5a; 512]);
        // And the next request after that.
        let (st, len) = drv.request(&mut dev, &mem, VIRTIO_BLK_T_IN, 0, Some((DATA2, 512)));
        assert_eq!((st, len), (VIRTIO_BLK_S_OK, 513));
        assert_eq!(dev.save().transport.queues[0].next_used, 3);
    }

    #[test]
    fn load_state_in_place_keeps_the_dirty_tracker_and_is_atomic() {
        let img = TempImage::new("persist-inplace", 1 << 20);
        let mem = new_mem();
        let mut dev = VirtioBlock::new(img.config(false)).unwrap();
        Driver::setup(&mut dev, &mem, 16);
        let state = dev.save();
        // A storage migration holds the tracker from another thread.
        let tracker = dev.dirty_blocks();
        dev.mark_all_dirty();
        let pending = tracker.pending();
        assert!(pending > 0);
        dev.load_state(&state, &mem).unwrap();
        assert_eq!(dev.save().transport, state.transport);
        // The same tracker, with what it had recorded.
        assert_eq!(dev.dirty_blocks().pending(), pending);
        // A mismatching state changes nothing.
        let mut bad = state.clone();
        bad.capacity_sectors += 1;
        assert!(dev.load_state(&bad, &mem).is_err());
        assert_eq!(dev.save().transport, state.transport);
    }

    #[test]
    fn restore_refuses_mismatches() {
        let img = TempImage::new("persist-bad", 1 << 20);
        let mem = new_mem();
        let mut dev = VirtioBlock::new(img.config(false)).unwrap();
        Driver::setup(&mut dev, &mem, 16);
        let state = dev.save();

        let small = TempImage::new("persist-small", 4096);
        let err = VirtioBlock::restore((small.config(false), mem.clone()), &state).unwrap_err();
        assert!(
            matches!(
                err,
                PersistError::CapacityMismatch {
                    expected: 2048,
                    found: 8,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains(&*small.path.to_string_lossy()));

        let err = VirtioBlock::restore((img.config(true), mem.clone()), &state).unwrap_err();
        assert!(
            matches!(err, PersistError::ReadOnlyMismatch { .. }),
            "{err}"
        );

        let missing = BlockConfig {
            path: std::env::temp_dir().join("tandem-vblk-missing-restore.img"),
            read_only: false,
        };
        let err = VirtioBlock::restore((missing, mem.clone()), &state).unwrap_err();
        assert!(
            matches!(err, PersistError::Block(BlockError::Open { .. })),
            "{err}"
        );

        // Guest memory too small for the saved rings.
        let tiny = GuestMemory::from_ranges(&[(GuestAddress(0), 0x2000)]).unwrap();
        let err = VirtioBlock::restore((img.config(false), tiny), &state).unwrap_err();
        assert!(
            matches!(
                err,
                PersistError::Transport {
                    source: MmioError::QueueOutsideMemory { .. },
                    ..
                }
            ),
            "{err}"
        );

        // Corrupt queue fields.
        let mut bad = state.clone();
        bad.transport.queues[0].size = 15;
        assert!(VirtioBlock::restore((img.config(false), mem.clone()), &bad).is_err());
        let mut bad = state.clone();
        bad.transport.queues[0].desc_table = 0x1001;
        assert!(VirtioBlock::restore((img.config(false), mem.clone()), &bad).is_err());
        let mut bad = state.clone();
        bad.transport.driver_features |= 1 << 40;
        assert!(VirtioBlock::restore((img.config(false), mem.clone()), &bad).is_err());

        // A device that was never set up restores without touching memory.
        let fresh = VirtioBlock::new(img.config(false)).unwrap().save();
        let dev =
            VirtioBlock::restore((img.config(false), GuestMemory::default()), &fresh).unwrap();
        assert!(!dev.transport().is_live());
    }
}
