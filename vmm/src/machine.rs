//! A whole VM: KVM VM + vCPU + devices, its logical clock `exit_seq`, boot,
//! state capture/restore and the run loop.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::devices::virtio::block::BlockConfig;
use crate::devices::virtio::net::MacAddr;
use crate::devices::{Devices, DevicesError, DevicesState};
use crate::dirty::DirtyTracker;
use crate::loader::{self, layout, BootSource, LoaderError};
use crate::vstate::cpu_model::CpuModel;
use crate::vstate::cpuid::{self, CpuidError};
use crate::vstate::memory::MemoryError;
use crate::vstate::vcpu::{Vcpu, VcpuError, VcpuState};
use crate::vstate::vm::{Vm, VmError};

/// Smallest guest Tandem accepts.
pub const MIN_MEM_MIB: u64 = 8;

/// How a VM is put together. Serialized into snapshots and log headers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// The kernel, for the record (`None` = the built-in test guest).
    pub kernel: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Initial ramdisk.
    pub initrd: Option<PathBuf>,
    /// The virtio-blk disk.
    pub disk: Option<DiskConfig>,
    /// The virtio-net NIC.
    pub net: Option<NetConfig>,
    /// The CPU the guest sees: the model's name and its whole CPUID table
    /// (checked against the host and this Tandem's models wherever the VM
    /// is built: boot, replay, restore, incoming migration).
    pub cpu: CpuModel,
}

/// The NIC of a [`VmConfig`]: the guest's address and, for the record, the
/// TAP it was attached to (a host resource: a replay opens none, a
/// migration destination its own).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    /// The guest's MAC address (part of what the guest sees).
    pub mac: MacAddr,
    /// The TAP it was attached to, for the record.
    pub tap: String,
}

/// A disk of a [`VmConfig`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    /// The image.
    pub path: PathBuf,
    /// Opened read-only (VIRTIO_BLK_F_RO).
    pub read_only: bool,
}

impl DiskConfig {
    /// The device configuration of this disk.
    pub fn block_config(&self) -> BlockConfig {
        BlockConfig {
            path: self.path.clone(),
            read_only: self.read_only,
        }
    }
}

/// Errors building or restoring a machine.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error("--mem-mib {0}: too little memory (at least {MIN_MEM_MIB} MiB)")]
    /// Less than [`MIN_MEM_MIB`].
    TooLittleMemory(u64),
    #[error("--mem-mib {mib}: the guest would not fit in {what}: at most {limit_mib} MiB")]
    /// More than a limit of this host or process allows.
    TooMuchMemory {
        /// The size asked for.
        mib: u64,
        /// The largest value that limit allows.
        limit_mib: u64,
        /// Which limit: the host's memory, the address space, ...
        what: &'static str,
    },
    #[error(transparent)]
    /// Creating the KVM VM failed.
    Vm(#[from] VmError),
    #[error(transparent)]
    /// Building the CPUID table failed.
    Cpuid(#[from] CpuidError),
    /// A migration's final state names another CPU than its header did.
    #[error("the VM's state has CPU model {state} but the VM was built with CPU model {built}")]
    CpuChanged {
        /// The model of the header (the VM as built).
        built: String,
        /// The model the final state names.
        state: String,
    },
    #[error(transparent)]
    /// Creating or setting the vCPU failed.
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    /// The kernel could not be loaded.
    Loader(#[from] LoaderError),
    #[error(transparent)]
    /// The devices could not be built or restored.
    Devices(#[from] DevicesError),
    #[error(transparent)]
    /// Guest memory could not be allocated or filled.
    Memory(#[from] MemoryError),
    /// The VM is stopped in the middle of an exit by a host disk error:
    /// its state is not one a restore could continue from.
    #[error("the VM is paused on a disk error at exit {exit_seq} ({source}); fix the cause and resume it before saving its state")]
    DiskStalled {
        /// The exit the vCPU is stopped at.
        exit_seq: u64,
        /// The failed request.
        source: crate::devices::virtio::block::HostIoError,
    },
}

/// Everything but guest memory: vCPU, devices, the logical clock.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MachineState {
    /// How the VM is put together.
    pub config: VmConfig,
    /// The exit at which the state was taken.
    pub exit_seq: u64,
    /// Virtual time (ns) at that exit.
    pub virtual_ns: u64,
    /// The vCPU's registers and KVM state.
    pub vcpu: VcpuState,
    /// Every device's state.
    pub devices: DevicesState,
}

/// A VM ready to run.
pub struct Machine {
    /// How the VM is put together (its disk path follows disk moves).
    pub config: VmConfig,
    /// The KVM VM and guest memory, shared with migration threads.
    pub vm: std::sync::Arc<Vm>,
    /// The one vCPU.
    pub vcpu: Vcpu,
    /// The devices.
    pub devices: Devices,
    /// The logical clock: guest-caused exits so far (DESIGN.md rule 1).
    pub exit_seq: u64,
    /// Dirty-page tracking shared by sync points and migration.
    pub dirty: DirtyTracker,
    /// Sync-point tracking, when recording or replaying.
    pub sync: Option<crate::sync::SyncState>,
    /// Counters of the runs so far.
    pub stats: crate::run::RunStats,
    /// The next loop iteration re-enters the guest without servicing
    /// (a replayer after an exit the recorder did not see).
    pub(crate) skip_service: bool,
    /// A replayer said once that this host cannot verify kicks.
    pub(crate) kick_check_warned: bool,
    /// Breakpoint hits a replayer spends at most on reaching a kick's
    /// instruction before it adopts the sync point unverified (`None`: no
    /// limit; [`crate::kick`]).
    pub kick_seek_hits: Option<u32>,
    /// How a pending interrupt the vCPU cannot take yet waits (run.rs).
    pub(crate) blocked_irq: crate::run::BlockedIrq,
}

/// Largest guest Tandem builds (1 TiB of guest-physical RAM).
pub const MAX_MEM_MIB: u64 = 1 << 20;

/// Room this process needs beside guest memory in its address space.
const PROCESS_RESERVE_MIB: u64 = 256;

/// The limits guest memory must fit: (largest MiB, which limit), from
/// the host's RAM (`sysinfo`, as `MemTotal` in /proc/meminfo) and this
/// process's address-space limit (`ulimit -v`).
fn host_mem_limits() -> Vec<(u64, &'static str)> {
    let mut limits = vec![(MAX_MEM_MIB, "Tandem's guest address space")];
    // SAFETY: sysinfo fills the struct it is given and nothing else.
    let mut si: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: `si` is a valid, writable sysinfo.
    if unsafe { libc::sysinfo(&mut si) } == 0 {
        let total = (si.totalram as u64).saturating_mul(u64::from(si.mem_unit).max(1));
        limits.push((total >> 20, "this host's memory (MemTotal)"));
    }
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the rlimit it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut rl) } == 0
        && rl.rlim_cur != libc::RLIM_INFINITY
    {
        limits.push((
            (rl.rlim_cur >> 20).saturating_sub(PROCESS_RESERVE_MIB),
            "this process's address space (ulimit -v, less 256 MiB for Tandem itself)",
        ));
    }
    limits
}

fn check_mem(mib: u64) -> Result<(), MachineError> {
    if mib < MIN_MEM_MIB {
        return Err(MachineError::TooLittleMemory(mib));
    }
    for (limit_mib, what) in host_mem_limits() {
        if mib > limit_mib {
            return Err(MachineError::TooMuchMemory {
                mib,
                limit_mib,
                what,
            });
        }
    }
    Ok(())
}

/// Guest RAM must lie below the CPU model's physical address limit.
fn check_phys_bits(config: &VmConfig) -> Result<(), MachineError> {
    let bits = config.cpu.phys_bits();
    let top = layout::ram_regions(config.mem_mib << 20)
        .iter()
        .map(|(start, len)| start.0 + *len as u64)
        .max()
        .unwrap_or(0);
    if bits < 64 && top > 1u64 << bits {
        let limit_mib = ((1u64 << bits) - (layout::MMIO_HOLE_END - layout::MMIO_HOLE_START)) >> 20;
        return Err(MachineError::TooMuchMemory {
            mib: config.mem_mib,
            limit_mib,
            what: "the CPU model's physical address space",
        });
    }
    Ok(())
}

fn split_mem(mem: &crate::GuestMemory) -> (u64, u64) {
    let mut below = 0;
    let mut above = 0;
    for r in mem.iter() {
        if r.start_addr().0 < layout::MMIO_HOLE_START {
            below += r.len();
        } else {
            above += r.len();
        }
    }
    (below, above)
}

impl Machine {
    fn create(config: &VmConfig) -> Result<(Vm, Vcpu), MachineError> {
        check_mem(config.mem_mib)?;
        let vm = Vm::new(&layout::ram_regions(config.mem_mib << 20))?;
        let cpuid = cpuid::build(&vm.kvm, &config.cpu)?;
        check_phys_bits(config)?;
        let vcpu = Vcpu::new(&vm.kvm, &vm.fd, &cpuid)?;
        Ok((vm, vcpu))
    }

    /// Build a VM and load `kernel` into it (`config.kernel` is only a
    /// label: the built-in guest is passed here as a path to a memfd).
    pub fn boot(config: &VmConfig, kernel: &std::path::Path) -> Result<Self, MachineError> {
        let (vm, vcpu) = Self::create(config)?;
        let entry = loader::load(
            &vm.memory,
            &BootSource {
                kernel,
                cmdline: &config.cmdline,
                initrd: config.initrd.as_deref(),
            },
        )?;
        loader::configure_vcpu(&vcpu.fd, &entry, &vm.memory)?;
        let (below, above) = split_mem(&vm.memory);
        let devices = Devices::new(
            below,
            above,
            config.disk.as_ref().map(DiskConfig::block_config),
            config.net.as_ref().map(|n| n.mac),
        )?;
        let dirty = DirtyTracker::new(&vm.memory);
        Ok(Machine {
            config: config.clone(),
            vm: std::sync::Arc::new(vm),
            vcpu,
            devices,
            exit_seq: 0,
            dirty,
            sync: None,
            stats: Default::default(),
            skip_service: false,
            kick_check_warned: false,
            kick_seek_hits: None,
            blocked_irq: Default::default(),
        })
    }

    /// Capture vCPU and devices at the current exit (memory is captured
    /// separately). Completes pending I/O first.
    pub fn save(&mut self, virtual_ns: u64) -> Result<MachineState, MachineError> {
        if let Some(e) = self.devices.block_stalled() {
            return Err(MachineError::DiskStalled {
                exit_seq: self.exit_seq,
                source: e.clone(),
            });
        }
        self.vcpu.complete_pending_io()?;
        Ok(MachineState {
            config: self.config.clone(),
            exit_seq: self.exit_seq,
            virtual_ns,
            vcpu: self.vcpu.save()?,
            devices: self.devices.save(),
        })
    }

    /// Rebuild a machine from `state`; `fill_memory` loads guest memory
    /// (from a snapshot file or a migration stream) before the vCPU state is
    /// set. `disk` overrides the disk of the saved config (a moved image).
    pub fn restore(
        state: &MachineState,
        disk: Option<DiskConfig>,
        fill_memory: impl FnOnce(&crate::GuestMemory) -> Result<(), MemoryError>,
    ) -> Result<Self, MachineError> {
        let incoming = Self::prepare_incoming(&state.config)?;
        fill_memory(incoming.memory())?;
        incoming.finish(state, disk)
    }

    /// The first half of [`Machine::restore`] for a migration destination:
    /// create the VM (zeroed guest memory) from `config` so that pages can be
    /// written into it while they arrive, long before the final state does.
    pub fn prepare_incoming(config: &VmConfig) -> Result<Incoming, MachineError> {
        let (vm, vcpu) = Self::create(config)?;
        Ok(Incoming {
            vm,
            vcpu,
            cpu: config.cpu.clone(),
        })
    }

    /// What [`Machine::prepare_incoming`] checks and creates, without
    /// creating anything: the memory size and the CPU model are refused as
    /// it would refuse them,
    /// and the guest memory layout (start, length of each region) is the
    /// one its VM will have. Lets a migration destination accept a header
    /// first and prepare the VM while the first pages are on their way.
    pub fn incoming_layout(config: &VmConfig) -> Result<Vec<(u64, u64)>, MachineError> {
        check_mem(config.mem_mib)?;
        cpuid::check(&config.cpu)?;
        check_phys_bits(config)?;
        Ok(layout::ram_regions(config.mem_mib << 20)
            .into_iter()
            .map(|(start, len)| (start.0, len as u64))
            .collect())
    }
}

/// A VM being filled by a migration (see [`Machine::prepare_incoming`]).
pub struct Incoming {
    vm: Vm,
    vcpu: Vcpu,
    /// The CPU model the vCPU was built with.
    cpu: CpuModel,
}

impl Incoming {
    /// Guest memory, to be filled (fresh: every page is zero).
    pub fn memory(&self) -> &crate::GuestMemory {
        &self.vm.memory
    }

    /// Set the vCPU and devices from `state` (the second half of
    /// [`Machine::restore`]). `disk` overrides the disk of the saved config.
    pub fn finish(
        self,
        state: &MachineState,
        disk: Option<DiskConfig>,
    ) -> Result<Machine, MachineError> {
        let mut config = state.config.clone();
        if disk.is_some() {
            config.disk = disk;
        }
        let Incoming { vm, vcpu, cpu } = self;
        if state.config.cpu != cpu {
            return Err(MachineError::CpuChanged {
                built: cpu.name,
                state: state.config.cpu.name.clone(),
            });
        }
        vcpu.restore(&state.vcpu)?;
        let devices = Devices::restore(
            &state.devices,
            config.disk.as_ref().map(DiskConfig::block_config),
            &vm.memory,
        )?;
        let dirty = DirtyTracker::new(&vm.memory);
        Ok(Machine {
            config,
            vm: std::sync::Arc::new(vm),
            vcpu,
            devices,
            exit_seq: state.exit_seq,
            dirty,
            sync: None,
            stats: Default::default(),
            skip_service: false,
            kick_check_warned: false,
            kick_seek_hits: None,
            blocked_irq: Default::default(),
        })
    }
}

/// What a record log's header says about the run (its `vm_config` bytes):
/// the machine and the recording parameters the replayer must mirror.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogConfig {
    /// The machine.
    pub vm: VmConfig,
    /// A fingerprint every this many exits (0: none).
    pub fingerprint_interval: u64,
    /// A periodic sync point (with a state digest) every this many exits.
    pub sync_interval: u64,
}

impl LogConfig {
    /// Encode for the log header (versioned, see [`crate::persist`]).
    pub fn encode(&self) -> Result<Vec<u8>, crate::persist::StateError> {
        crate::persist::encode_state("log's VM configuration", self)
    }

    /// Decode from a log header.
    pub fn decode(bytes: &[u8]) -> Result<Self, crate::persist::StateError> {
        crate::persist::decode_state("log's VM configuration", bytes)
    }
}
