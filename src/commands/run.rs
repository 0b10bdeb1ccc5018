//! `tandem run` and `tandem restore`.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;

use vmm::image::{Access, Image, ImageError};
use vmm::inputs::Inputs;
use vmm::machine::{DiskConfig, Machine, MachineError, VmConfig};
use vmm::run::{RunLimits, RunOutcome};
use vmm::snapshot;
use vmm::vstate::cpu_model::CpuModel;
use vmm::vstate::cpuid::CpuidError;

use super::CmdError;
use crate::cli::{DiskArg, RestoreArgs, RunArgs, VmArgs};
use crate::net::{self, HostNet};
use crate::signals;
use crate::{console, guest_image};

/// The kernel image to load: a user's file or the built-in guest held in
/// an anonymous memory file (so the loader reads it like any other file).
pub struct KernelImage {
    pub path: PathBuf,
    _memfd: Option<File>,
}

impl KernelImage {
    pub fn resolve(path: Option<&PathBuf>) -> Result<Self, CmdError> {
        if let Some(p) = path {
            if !p.exists() {
                return Err(CmdError::Input(format!(
                    "--kernel {}: no such file",
                    p.display()
                )));
            }
            return Ok(KernelImage {
                path: p.clone(),
                _memfd: None,
            });
        }
        let name = c"tandem-guest";
        // SAFETY: memfd_create takes a NUL-terminated name and flags; the
        // returned descriptor is owned by the File below.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(CmdError::Internal(format!(
                "memfd_create for the built-in guest: {}",
                std::io::Error::last_os_error()
            )));
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let mut file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        file.write_all(guest_image::GUEST_ELF)
            .map_err(|e| CmdError::Internal(format!("writing the built-in guest: {e}")))?;
        Ok(KernelImage {
            path: PathBuf::from(format!("/proc/self/fd/{fd}")),
            _memfd: Some(file),
        })
    }
}

pub fn disk_config(disk: Option<&DiskArg>) -> Result<Option<DiskConfig>, CmdError> {
    let Some(d) = disk else { return Ok(None) };
    let meta = std::fs::metadata(&d.path).map_err(|e| {
        // `x.img,rx` is a path here: say what the options are in case
        // it was meant as one.
        let hint = match d.path.to_string_lossy().rsplit_once(',') {
            Some((_, opt)) => {
                format!(" (the only disk options are ,ro and ,rw; ',{opt}' was taken as part of the path)")
            }
            None => String::new(),
        };
        CmdError::Input(format!("--disk {}: {e}{hint}", d.path.display()))
    })?;
    if !meta.is_file() {
        return Err(CmdError::Input(format!(
            "--disk {}: not a regular file",
            d.path.display()
        )));
    }
    // An image another process uses is refused now, before anything is
    // created or started, and stays held until the VM's device has taken
    // the lock for good (`boot`, `restore_machine`): no moment between the
    // two in which another process could take the image.
    let held = hold_disk(&d.path, d.read_only)?;
    EARLY_HOLDS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(held);
    Ok(Some(DiskConfig {
        path: d.path.clone(),
        read_only: d.read_only,
    }))
}

/// The images [`disk_config`] locked, held until the machine is built
/// (its device's open shares the lock: `vmm::image`), then let go.
static EARLY_HOLDS: std::sync::Mutex<Vec<Image>> = std::sync::Mutex::new(Vec::new());

/// The machine is built (or failed to be): its device holds its image now.
fn built<T>(r: T) -> T {
    EARLY_HOLDS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clear();
    r
}

/// Open and lock the image at `path` (`vmm::image`: exclusive, or shared
/// when `read_only`): refused with status 2 if another process holds it.
/// While the result lives, this process's own opens of the image share
/// the lock.
pub fn hold_disk(path: &std::path::Path, read_only: bool) -> Result<Image, CmdError> {
    let access = if read_only {
        Access::Read
    } else {
        Access::Write
    };
    Image::open(path, access).map_err(|e| match e {
        ImageError::Open { source, .. } => {
            CmdError::Input(format!("--disk {}: {source}", path.display()))
        }
        other => CmdError::Input(other.to_string()),
    })
}

/// Map a machine-building error to bad input or an internal failure.
pub fn machine_error(e: MachineError) -> CmdError {
    match e {
        MachineError::TooLittleMemory(_)
        | MachineError::TooMuchMemory { .. }
        | MachineError::Loader(_)
        | MachineError::Devices(_)
        | MachineError::Cpuid(CpuidError::Model(_)) => CmdError::Input(e.to_string()),
        MachineError::Vm(ref v) => match v {
            vmm::vstate::vm::VmError::NoKvm | vmm::vstate::vm::VmError::KvmPermission => {
                CmdError::Input(e.to_string())
            }
            _ => CmdError::Internal(e.to_string()),
        },
        other => CmdError::Internal(other.to_string()),
    }
}

/// Turn a run outcome into the process exit status.
pub fn outcome_status(outcome: RunOutcome) -> i32 {
    match outcome {
        RunOutcome::Exited(status) => status,
        RunOutcome::Reset => {
            eprintln!("tandem: the guest requested a reset; ending the VM");
            0
        }
        RunOutcome::Halted => {
            eprintln!("tandem: the guest halted with nothing left to wake it");
            124
        }
        RunOutcome::Stopped | RunOutcome::Paused | RunOutcome::LogEnded => 0,
    }
}

/// The VM configuration the options describe (checked inputs); `net` is
/// the NIC `--net` opened.
pub fn vm_config(args: &VmArgs, net: Option<&HostNet>) -> Result<VmConfig, CmdError> {
    if let Some(initrd) = &args.initrd {
        if !initrd.is_file() {
            return Err(CmdError::Input(format!(
                "--initrd {}: no such file",
                initrd.display()
            )));
        }
    }
    let disk = disk_config(args.disk.as_ref())?;
    let mut cmdline = args.cmdline.clone();
    if args.kernel.is_some() && disk.is_some() && !cmdline.contains("virtio_mmio.device=") {
        // Linux finds the virtio-mmio disk only when told where it is.
        cmdline.push_str(&format!(
            " virtio_mmio.device=4K@{:#x}:{}",
            vmm::loader::layout::VIRTIO_MMIO_BASE,
            vmm::loader::layout::VIRTIO_BLK_IRQ
        ));
    }
    let net_base = format!("@{:#x}", vmm::loader::layout::VIRTIO_NET_MMIO_BASE);
    if args.kernel.is_some() && net.is_some() && !cmdline.contains(&net_base) {
        // And where the NIC is.
        cmdline.push_str(&format!(
            " virtio_mmio.device=4K{net_base}:{}",
            vmm::loader::layout::VIRTIO_NET_IRQ
        ));
    }
    Ok(VmConfig {
        mem_mib: args.mem_mib,
        kernel: args.kernel.clone(),
        cmdline: cmdline.trim().to_string(),
        initrd: args.initrd.clone(),
        disk,
        net: net.map(HostNet::config),
        cpu: cpu_model(args.cpu_model.as_deref())?,
    })
}

/// `--cpu-model NAME`, or the most capable model this host's KVM provides.
pub fn cpu_model(name: Option<&str>) -> Result<CpuModel, CmdError> {
    if let Some(name) = name {
        return CpuModel::named(name).map_err(|e| CmdError::Input(e.to_string()));
    }
    match vmm::vstate::cpuid::host_default() {
        Ok(model) => Ok(model),
        // Building the VM will say what is wrong with /dev/kvm.
        Err(CpuidError::Open(_)) => Ok(CpuModel::baseline()),
        Err(CpuidError::Model(m)) => Err(CmdError::Input(m.to_string())),
        Err(other) => Err(CmdError::Internal(other.to_string())),
    }
}

/// Boot the VM `config` describes.
pub fn boot(config: &VmConfig) -> Result<Machine, CmdError> {
    let kernel = KernelImage::resolve(config.kernel.as_ref());
    built(kernel.and_then(|k| Machine::boot(config, &k.path).map_err(machine_error)))
}

/// Read a snapshot and build its machine (`disk` overrides the saved one).
pub fn restore_machine(
    path: &std::path::Path,
    disk: Option<DiskConfig>,
) -> Result<(Machine, snapshot::Snapshot), CmdError> {
    built((|| {
        let snap = snapshot::read(path).map_err(|e| CmdError::Input(e.to_string()))?;
        let machine = snap.restore(disk).map_err(|e| match e {
            snapshot::SnapshotError::Restore { source, .. } => machine_error(source),
            other => CmdError::Input(other.to_string()),
        })?;
        Ok((machine, snap))
    })())
}

/// After a run that SIGTERM/SIGINT stopped: the console's last partial
/// line, and a note on stderr.
pub fn stopped_by_signal(machine: &mut Machine, inputs: &mut dyn Inputs, flush: bool) -> bool {
    let Some(sig) = signals::received() else {
        return false;
    };
    if flush {
        let _ = machine.emit_outputs(inputs, true);
    }
    eprintln!("tandem: stopped by {sig} at exit {}", machine.exit_seq);
    true
}

pub fn run(args: RunArgs) -> Result<i32, CmdError> {
    // Before any thread: SIGTERM/SIGINT stop the VM cleanly on every path
    // (a VM with a control socket or protected, too).
    signals::block();
    // Seeded before its first instruction (memory and state copied): with
    // spares, for a kernel file (a secondary boots only the built-in guest
    // from a log; a seed needs no image), and with a control socket (its
    // protection is then the one `tandem protect` makes: status,
    // unprotect, switchover, failover, re-protection all work the same).
    let kernel = args.vm.kernel.is_some() || args.vm.initrd.is_some();
    let seeded = !args.protect.spare.is_empty() || kernel || args.api_socket.is_some();
    if args.protect.protect_to.is_some() && seeded {
        return super::run_spares::run(args);
    }
    if args.protect.protect_to.is_some() {
        return super::protect::run_protected(args);
    }
    let host_net = net::open(args.vm.net.net.as_ref())?;
    let config = vm_config(&args.vm, host_net.as_ref())?;
    let console = console::open(&args.vm.serial)?;
    let mut machine = boot(&config)?;
    let inputs = net::live_inputs(0, console, host_net.as_ref());
    if let Some(sock) = &args.api_socket {
        return super::migrate::run_with_api(machine, inputs, sock, false);
    }
    let stop = signals::on_stop(machine.vcpu.kicker().clone());
    let mut inputs = inputs.with_wakeup(stop.wakeup);
    let limits = RunLimits {
        stop_at_exit: args.snapshot_at,
        pause: Some(stop.flag),
        ..Default::default()
    };
    let outcome = machine.run(&mut inputs, limits);
    net::report(&machine, inputs.net_frames_dropped());
    let outcome = outcome?;
    if outcome == RunOutcome::Paused && stopped_by_signal(&mut machine, &mut inputs, true) {
        return Ok(0);
    }
    if let (RunOutcome::Stopped, Some(path)) = (outcome, &args.snapshot) {
        let virtual_ns = inputs.clock_ns(machine.exit_seq);
        let state = machine
            .save(virtual_ns)
            .map_err(|e| CmdError::Internal(e.to_string()))?;
        snapshot::write(path, &state, &machine.vm.memory)
            .map_err(|e| CmdError::Internal(e.to_string()))?;
        eprintln!(
            "tandem: snapshot at exit {} written to {}",
            machine.exit_seq,
            path.display()
        );
        return Ok(0);
    }
    if let Some(at) = args.snapshot_at {
        return Err(CmdError::Input(format!(
            "--snapshot-at {at}: the guest ended at exit {} (status {}) before reaching it; no snapshot written",
            machine.exit_seq,
            outcome_status(outcome)
        )));
    }
    Ok(outcome_status(outcome))
}

pub fn restore(args: RestoreArgs) -> Result<i32, CmdError> {
    signals::block();
    let host_net = net::open(args.net.net.as_ref())?;
    let console = console::open(&args.serial)?;
    let disk = disk_config(args.disk.as_ref())?;
    let (mut machine, snap) = restore_machine(&args.snapshot, disk)?;
    net::check_restored(&machine, host_net.as_ref());
    let stop = signals::on_stop(machine.vcpu.kicker().clone());
    let mut inputs = net::live_inputs(snap.state.virtual_ns, console, host_net.as_ref())
        .with_wakeup(stop.wakeup);
    let limits = RunLimits {
        stop_at_exit: None,
        pause: Some(stop.flag),
        ..Default::default()
    };
    let outcome = machine.run(&mut inputs, limits);
    net::report(&machine, inputs.net_frames_dropped());
    let outcome = outcome?;
    stopped_by_signal(&mut machine, &mut inputs, true);
    Ok(outcome_status(outcome))
}
