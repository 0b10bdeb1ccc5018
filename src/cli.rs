//! Command-line interface.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Tandem runs a KVM virtual machine so that the death of its host loses
/// nothing: record/replay, failover and live migration for one-vCPU guests.
#[derive(Debug, Parser)]
#[command(name = "tandem", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot and run a VM (by default the built-in test guest's demo).
    ///
    /// The exit status is the guest's debug-exit status (port 0xf4).
    Run(RunArgs),
    /// Continue a VM from a snapshot file to its end.
    Restore(RestoreArgs),
}

/// Where the guest's serial console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialTarget {
    /// This process's stdin/stdout.
    Stdio,
    /// Output appended to a file (no input).
    File(PathBuf),
    /// Discarded.
    Null,
}

impl std::str::FromStr for SerialTarget {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "stdio" => Ok(SerialTarget::Stdio),
            "null" | "none" => Ok(SerialTarget::Null),
            _ => match s.strip_prefix("file:") {
                Some(p) if !p.is_empty() => Ok(SerialTarget::File(PathBuf::from(p))),
                _ => Err(format!(
                    "'{s}' is not a serial target: use stdio, null or file:PATH"
                )),
            },
        }
    }
}

/// A `--disk` value: `PATH[,ro]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskArg {
    pub path: PathBuf,
    pub read_only: bool,
}

impl std::str::FromStr for DiskArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (path, read_only) = match s.rsplit_once(',') {
            Some((p, "ro")) => (p, true),
            Some((p, "rw")) => (p, false),
            Some((_, opt)) => {
                return Err(format!(
                    "unknown disk option '{opt}' in '{s}': use PATH or PATH,ro"
                ))
            }
            None => (s, false),
        };
        if path.is_empty() {
            return Err("empty disk path".into());
        }
        Ok(DiskArg {
            path: PathBuf::from(path),
            read_only,
        })
    }
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Kernel to boot: a PVH ELF (vmlinux, the test guest) or a Linux
    /// bzImage. Default: the built-in test guest.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Kernel command line. For the built-in guest: `WORKLOAD [ARGS] [hz=N]`
    /// with WORKLOAD one of hello, ticks, dirty, busy, disk, echo, tsc
    /// (empty: a short demo).
    #[arg(long, default_value = "")]
    pub cmdline: String,
    /// Initial ramdisk (Linux).
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 64)]
    pub mem_mib: u64,
    /// A raw disk image for the virtio-blk device: PATH or PATH,ro.
    #[arg(long)]
    pub disk: Option<DiskArg>,
    /// Serial console: stdio, null or file:PATH.
    #[arg(long, default_value = "stdio")]
    pub serial: SerialTarget,
    /// Stop at this exit number, write a snapshot (to --snapshot) and end.
    #[arg(long, requires = "snapshot")]
    pub snapshot_at: Option<u64>,
    /// Snapshot file written at --snapshot-at.
    #[arg(long, requires = "snapshot_at")]
    pub snapshot: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// Snapshot file written by `tandem run --snapshot-at`.
    #[arg(long)]
    pub snapshot: PathBuf,
    /// Serial console: stdio, null or file:PATH.
    #[arg(long, default_value = "stdio")]
    pub serial: SerialTarget,
    /// Use this disk image instead of the one recorded in the snapshot
    /// (same size): PATH or PATH,ro.
    #[arg(long)]
    pub disk: Option<DiskArg>,
}
