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
    /// The exit status is the guest's debug-exit status (port 0xf4). The
    /// built-in guest ends with 0 on success, 1 when its workload failed
    /// (e.g. a disk verify mismatch), 2 for a bad command line (unknown
    /// workload, bad number), 3 when a device or memory it needs is
    /// missing (`disk` without --disk, `dirty` without enough --mem-mib),
    /// 0xe0|vector (224..255) for a CPU exception. Tandem's own statuses:
    /// 2 bad input, 124 the guest halted for good, 125 Tandem failed, 126
    /// the guest crashed.
    Run(RunArgs),
    /// Continue a VM from a snapshot file to its end.
    Restore(RestoreArgs),
    /// Run a VM (like `run`) and record every nondeterministic input into
    /// a log that `tandem replay` reproduces exactly.
    Record(RecordArgs),
    /// Re-execute a recorded run from its log, verifying fingerprints and
    /// state digests. Exit status 0: the replay matched; 1: divergence.
    Replay(ReplayArgs),
    /// Print a record log's header and entries (for debugging).
    DumpLog(DumpLogArgs),
    /// Cluster certificates for the authenticated channel between hosts.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Wait for one VM migrated here (`tandem migrate`) and run it as
    /// `tandem run` would; the exit status is the guest's.
    Receive(ReceiveArgs),
    /// Move a running VM (`tandem run --api-socket`) to a `tandem receive`
    /// on another host, live (--to), or only its disk to another file on
    /// this host (--disk-dest without --to). Ctrl-C cancels it before the
    /// switchover. Exit status 0: the VM runs at the destination (on the
    /// new image); 1: it failed or was cancelled and the VM goes on here as
    /// before (running, or paused if it was paused).
    Migrate(MigrateArgs),
    /// Where a VM with a control socket is: running, migrating, paused;
    /// protected or not, its role (primary / secondary), the peer, the
    /// secondary's lag, outputs held, heartbeats, the protection's
    /// generation (--json for machines).
    Status(StatusArgs),
    /// Test failover: the protected primary (`tandem run --protect-to
    /// --api-socket`) stops at once as if its host died (no goodbye to the
    /// secondary, held outputs never released); its secondary goes live
    /// after the failover timeout, as it would after a real failure.
    Failover(FailoverCmdArgs),
    /// Pause a VM with a control socket (until `tandem resume`).
    Pause(StatusArgs),
    /// Resume a VM paused with `tandem pause`.
    Resume(StatusArgs),
    /// Write the built-in test guest's ELF image (for benchmarks).
    #[command(hide = true)]
    GuestElf(GuestElfArgs),
    /// Protect a VM that already runs (`tandem run --api-socket`) without
    /// stopping it: seed the `tandem secondary` at --to with the same
    /// pre-copy as a migration (memory and disk), then pause the VM briefly
    /// (measured and printed) to send its device and vCPU state and start
    /// recording; from then on its log streams to the secondary and every
    /// output waits for the secondary's acknowledgement. Exit status 0:
    /// protected; 1: it failed and the VM runs on unprotected.
    Protect(ProtectCmdArgs),
    /// End the protection of a VM (`tandem protect`) in order: the log ends
    /// at the next exit, the secondary acknowledges it and stops, held
    /// outputs are released, the VM runs on unprotected.
    Unprotect(StatusArgs),
    /// Planned migration of a protected VM (`tandem protect`, or `tandem
    /// run --protect-to --spare --api-socket`) to its secondary's host,
    /// without a copy: the secondary already holds the exact state. At the
    /// next exit the primary pauses the guest and ends its log with a
    /// handover; the secondary replays to that exit, wins the arbiter for
    /// the VM's generation (fencing this copy, as a failover would) and
    /// runs the VM at once, unprotected, its NIC and console live and the
    /// guest's MAC announced; it releases the outputs this side still held.
    /// The downtime (about one one-way trip plus the go-live) is measured
    /// and printed. `tandem protect --api` of the new primary's socket
    /// protects it again. Needs --arbiter on both sides. Exit status 0: the
    /// VM runs on the secondary's host and the old primary has exited (0);
    /// 1: refused (not protected, no arbiter, ...) or not completed (the
    /// VM runs on here, unprotected, if this side won the arbiter).
    Switchover(StatusArgs),
    /// Wait for a primary (`tandem run --protect-to`) and keep an exact
    /// copy of its VM: replay its log in lockstep as it arrives, its console
    /// only to --serial; when the primary is lost, win the arbiter and go
    /// live. The exit status is the guest's when the VM ends here (followed
    /// to its end, or run live after a failover); 3: it may not go live
    /// (the arbiter chose the other side or could not be reached); 2: a
    /// refused stream or bad input; 1: the replay diverged beyond repair.
    Secondary(SecondaryArgs),
    /// Rehearse a disaster on this machine: build the hosts of a drill
    /// (scenarios/*.toml) as network namespaces, run the mail VM with real
    /// clients sending mail, inject the drill's faults and check from the
    /// clients' side that nothing acknowledged was lost; report each run
    /// and the total. Without FILE: a short built-in drill. As root the
    /// hosts are network namespaces; without root (or with --loopback)
    /// console workloads run over loopback.
    /// Exit status 0: every run passed; 1: an expectation failed (the
    /// report names the run and its seed); 2: a bad drill file or one this
    /// build cannot run (it says what is missing); 130: interrupted (all
    /// torn down).
    Drill(DrillArgs),
}

#[derive(Debug, Args)]
pub struct DrillArgs {
    /// The drill (e.g. scenarios/migrate-under-load.toml); none: the
    /// built-in short drill.
    pub file: Option<PathBuf>,
    /// How many times to run it (each run builds everything afresh).
    #[arg(long, default_value_t = 1)]
    pub runs: u32,
    /// Seed of the first run (run K uses SEED + K - 1): it draws the
    /// random fault times and link losses, so a failed run repeats with
    /// `--seed` its report names. Default: from the clock (printed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Print the report as one JSON object (progress goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// Keep each run's directory (consoles, client output, disks); a
    /// failed run's is always kept.
    #[arg(long)]
    pub keep: bool,
    /// Only validate the file and say whether this build can run it.
    #[arg(long)]
    pub check: bool,
    /// Run the hosts as processes over loopback instead of network
    /// namespaces (the default without root): console workloads only, and
    /// a pulled plug is kill -9 alone (no links to cut).
    #[arg(long)]
    pub loopback: bool,
}

#[derive(Debug, Args)]
pub struct SecondaryArgs {
    /// Address to listen on (UDP), e.g. 0.0.0.0:4445 (port 0: any; the
    /// address is printed on stderr).
    #[arg(long)]
    pub listen: std::net::SocketAddr,
    #[command(flatten)]
    pub creds: CredsArgs,
    /// This host's copy of the VM's disk image. For a VM protected from
    /// boot it must be the primary's image byte for byte (checked by length
    /// and BLAKE3 before the VM is taken); for a running VM (`tandem
    /// protect`) the image is copied here during the seeding (written next
    /// to PATH, put at PATH once the seed is complete). Replay writes to it
    /// as the primary writes to its own.
    #[arg(long, value_name = "PATH")]
    pub disk: Option<PathBuf>,
    /// Where the replayed guest's console goes (null or file:PATH; it never
    /// reaches the outside world while this host is the secondary).
    #[arg(long, default_value = "null")]
    pub serial: SerialTarget,
    /// Also keep the received log in this file (it replays with `tandem
    /// replay --log PATH`).
    #[arg(long, value_name = "PATH")]
    pub log: Option<PathBuf>,
    /// Print the replica's state digest when its replay reaches each of
    /// these exits (`tandem: state digest at exit N: HEX`), to compare with
    /// `tandem replay --digest-at` of the primary's log.
    #[arg(long, value_name = "EXIT,...", value_delimiter = ',')]
    pub digest_at: Vec<u64>,
    /// The TAP the VM's NIC uses once this host goes live. While it is the
    /// secondary the replayed NIC takes its frames from the log and its
    /// sent frames (checked against the log) go nowhere: nothing is written
    /// to the TAP. The VM keeps the primary's MAC address.
    #[arg(long, value_name = "tap=NAME")]
    pub net: Option<NetArg>,
    /// One JSON line per acknowledgement sent to the primary (`offset`: log
    /// bytes received, `replayed`: the exit the replay had reached,
    /// `sent_ns`: real time), the secondary's side of the
    /// Output Rule's audit trail.
    #[arg(long, value_name = "PATH")]
    pub ack_log: Option<PathBuf>,
    /// Where the guest's console goes once this host went live after a
    /// failover (stdio, null or file:PATH); outputs the old primary may not
    /// have released are written there again first.
    #[arg(long, default_value = "stdio")]
    pub live_serial: SerialTarget,
    #[command(flatten)]
    pub failover: FailoverArgs,
    /// Control socket (`tandem status --api PATH` shows the lag). After a
    /// failover it serves the live VM (`tandem status`, `tandem protect`).
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// Spare secondaries (HOST:PORT): once this host went live after a
    /// failover, it seeds the first spare that takes the VM, by itself
    /// (with this host's credentials, timing and arbiter); needs
    /// --api-socket.
    #[arg(
        long,
        value_name = "ADDR[,ADDR...]",
        value_delimiter = ',',
        requires = "api_socket"
    )]
    pub spare: Vec<String>,
}

/// Failure detection and the arbiter (`docs/failover.md`).
#[derive(Debug, Args)]
pub struct FailoverArgs {
    /// Send a heartbeat to the peer at least this often (ms).
    #[arg(long, default_value_t = failover::heartbeat::DEFAULT_HEARTBEAT_MS)]
    pub heartbeat_ms: u64,
    /// Declare the peer lost after hearing nothing (log, acknowledgement or
    /// heartbeat) for this long (ms); at least three heartbeats.
    #[arg(long, default_value_t = failover::heartbeat::DEFAULT_FAILOVER_TIMEOUT_MS)]
    pub failover_timeout_ms: u64,
    /// Who may be live after the peer is lost: file:DIR (a directory on
    /// storage both hosts reach; claims are files in it) or
    /// etcd:URL[,URL...][?ttl=SECONDS] (an etcd cluster, http://HOST:PORT;
    /// the winner keeps a lease, default TTL 10 s, alive and stops before
    /// it could end). Without it a side that loses its peer never goes live
    /// (the primary stops, outputs held; the secondary stops).
    #[arg(long, value_name = "SPEC")]
    pub arbiter: Option<String>,
}

/// `tandem protect`.
#[derive(Debug, Args)]
pub struct ProtectCmdArgs {
    /// Control socket of the VM (`tandem run --api-socket`).
    #[arg(long)]
    pub api: PathBuf,
    /// The `tandem secondary --listen` address (HOST:PORT).
    #[arg(long)]
    pub to: String,
    /// Name the secondary's certificate must carry (default: HOST of --to).
    #[arg(long)]
    pub server_name: Option<String>,
    /// The cluster CA certificate (`ca.pem`).
    #[arg(long)]
    pub ca: PathBuf,
    /// This host's certificate (`NAME.pem`).
    #[arg(long)]
    pub cert: PathBuf,
    /// This host's private key (`NAME.key`).
    #[arg(long)]
    pub key: PathBuf,
    /// Pause target of the pre-copy, in ms (as `tandem migrate`).
    #[arg(long, default_value_t = 30)]
    pub downtime_ms: u64,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub failover: FailoverArgs,
    /// Spare secondaries (`tandem secondary` addresses, HOST:PORT): when
    /// the secondary is lost and this primary wins the arbiter, it seeds the
    /// first spare that takes the VM, by itself (each is used once).
    #[arg(long, value_name = "ADDR[,ADDR...]", value_delimiter = ',')]
    pub spare: Vec<String>,
    #[command(flatten)]
    pub lag: LagArgs,
}

/// `tandem run --protect-to`: the secondary and this host's credentials.
#[derive(Debug, Args)]
pub struct ProtectArgs {
    /// Protect the VM from its first exit: stream its log to the `tandem
    /// secondary` at ADDR (HOST:PORT); every console byte and network frame
    /// leaves only after the secondary has acknowledged the log up to the
    /// exit that wrote it. With --api-socket (needed with --kernel/--initrd
    /// or --spare) the VM is seeded instead, before its first instruction,
    /// as `tandem protect` seeds a running VM (memory and disk copied; the
    /// secondary needs no copy of the kernel or the image), and its control
    /// socket serves `tandem status`, `unprotect`, `switchover`, `failover`
    /// and `protect` again.
    #[arg(long, value_name = "ADDR", requires_all = ["ca", "cert", "key"])]
    pub protect_to: Option<String>,
    /// Name the secondary's certificate must carry (default: HOST of
    /// --protect-to).
    #[arg(long, requires = "protect_to")]
    pub server_name: Option<String>,
    /// The cluster CA certificate (`ca.pem`); needed with --protect-to.
    #[arg(long, requires = "protect_to")]
    pub ca: Option<PathBuf>,
    /// This host's certificate (`NAME.pem`); needed with --protect-to.
    #[arg(long, requires = "protect_to")]
    pub cert: Option<PathBuf>,
    /// This host's private key (`NAME.key`); needed with --protect-to.
    #[arg(long, requires = "protect_to")]
    pub key: Option<PathBuf>,
    /// Also write the log streamed to the secondary to this file (the same
    /// bytes; it replays with `tandem replay`).
    #[arg(long, value_name = "PATH", requires = "protect_to")]
    pub keep_log: Option<PathBuf>,
    /// Audit trail of the Output Rule: one JSON line per released output
    /// (exit, kind, length, hash, the log offset of its entry, the offset
    /// the secondary had acknowledged, emitted and released times).
    #[arg(long, value_name = "PATH", requires = "protect_to")]
    pub output_log: Option<PathBuf>,
    /// Spare secondaries (HOST:PORT): when the secondary is lost and this
    /// primary wins the arbiter, it seeds the first spare that takes the VM
    /// by itself. With --spare the VM is seeded to --protect-to before its
    /// first instruction (as `tandem protect` does, the disk copied) and is
    /// served on --api-socket.
    #[arg(long, value_name = "ADDR[,ADDR...]", value_delimiter = ',', requires_all = ["protect_to", "api_socket"])]
    pub spare: Vec<String>,
    #[command(flatten)]
    pub lag: LagArgs,
    #[command(flatten)]
    pub failover: FailoverArgs,
}

/// How closely the secondary follows a protected primary
/// (docs/lockstep.md, "Lag"); also sent in a protect request.
#[derive(Debug, Clone, Args, serde::Serialize, serde::Deserialize)]
pub struct LagArgs {
    /// Progress marks: when nothing else was logged for MS milliseconds
    /// (a guest that exits without inputs, or idles), the primary logs a
    /// mark with the exit it has reached, so that the secondary replays
    /// up to it instead of waiting at its last logged exit. 0: no marks.
    #[arg(long, value_name = "MS", default_value_t = primary::lockstep::DEFAULT_PROGRESS_MS)]
    pub progress_ms: u64,
    /// Lag bound: once the secondary is more than MS milliseconds behind
    /// (a busier host, a stop), the primary slows its vCPU (a duty cycle
    /// as migration's auto-converge: 20 % held, 20 more every 100 ms, at
    /// most 99 %) until the lag is under half of it; `tandem status` says
    /// so. 0: never slow down.
    #[arg(long, value_name = "MS", default_value_t = primary::lag::DEFAULT_LAG_BOUND_MS)]
    pub lag_bound_ms: u64,
    /// Most log bytes queued for the secondary, in MiB: when the queue is
    /// full the vCPU waits until there is room (nothing is dropped).
    /// 0: unbounded.
    #[arg(long, value_name = "MIB", default_value_t = primary::lag::DEFAULT_LOG_QUEUE_MIB)]
    pub log_queue_mib: u64,
    /// The same bound in KiB (finer, for tests); overrides --log-queue-mib.
    #[arg(long, value_name = "KIB", hide = true)]
    pub log_queue_kib: Option<u64>,
}

impl LagArgs {
    /// The limits these arguments ask for, each checked against its range
    /// (the error names the option).
    pub fn limits(&self) -> Result<primary::lag::LagLimits, primary::lag::LimitError> {
        primary::lag::LagLimits::checked(
            self.lag_bound_ms,
            self.log_queue_mib,
            self.log_queue_kib,
            self.progress_ms,
        )
    }
}

/// `tandem certs ...`
#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Create the cluster CA (`DIR/ca.pem`, `DIR/ca.key`); never overwrites.
    Init {
        /// Directory of the CA.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Issue a host's certificate and key (`NAME.pem`, `NAME.key`), signed
    /// by the CA in DIR; valid for NAME, localhost, 127.0.0.1, ::1 and each
    /// --san.
    Issue {
        /// Directory of the CA.
        #[arg(long)]
        dir: PathBuf,
        /// The host's name.
        #[arg(long)]
        name: String,
        /// Extra subject alternative names (IP addresses or DNS names).
        #[arg(long)]
        san: Vec<String>,
        /// Where to write the files (default: DIR).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// Cluster credentials of this host.
#[derive(Debug, Args, Clone)]
pub struct CredsArgs {
    /// The cluster CA certificate (`ca.pem`).
    #[arg(long)]
    pub ca: PathBuf,
    /// This host's certificate (`NAME.pem`).
    #[arg(long)]
    pub cert: PathBuf,
    /// This host's private key (`NAME.key`).
    #[arg(long)]
    pub key: PathBuf,
}

#[derive(Debug, Args)]
pub struct ReceiveArgs {
    /// Address to listen on (UDP), e.g. 0.0.0.0:4444 (port 0: any; the
    /// address is printed on stderr).
    #[arg(long)]
    pub listen: std::net::SocketAddr,
    #[command(flatten)]
    pub creds: CredsArgs,
    /// Where to put the VM's disk. The image is written to a temporary
    /// file next to PATH and put at PATH at the switchover; a failed
    /// migration leaves PATH as it was. A device node is written in place.
    /// If PATH is the source's own image (this host under another address,
    /// or storage both hosts share), only memory moves.
    #[arg(long, value_name = "PATH", conflicts_with = "disk_dir")]
    pub disk: Option<PathBuf>,
    /// Put the VM's disk in DIR under the source image's file name (checked:
    /// a plain file name; an existing file other than the source's own
    /// image is never replaced). A path sent by the source is never used.
    #[arg(long, value_name = "DIR")]
    pub disk_dir: Option<PathBuf>,
    /// Serial console: stdio, null or file:PATH.
    #[arg(long, default_value = "stdio")]
    pub serial: SerialTarget,
    /// Control socket of the received VM (status, pause, migrate on).
    #[arg(long)]
    pub api_socket: Option<PathBuf>,
    #[command(flatten)]
    pub net: NetArgs,
}

#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// Control socket of the VM (`tandem run --api-socket`).
    #[arg(long)]
    pub api: PathBuf,
    /// The destination's `tandem receive --listen` address (HOST:PORT).
    /// Without it, --disk-dest moves the disk on this host and the VM stays.
    #[arg(long)]
    pub to: Option<String>,
    /// Name the destination's certificate must carry (default: HOST of --to).
    #[arg(long, requires = "to")]
    pub server_name: Option<String>,
    /// The cluster CA certificate (`ca.pem`); needed with --to.
    #[arg(long, requires = "to")]
    pub ca: Option<PathBuf>,
    /// This host's certificate (`NAME.pem`); needed with --to.
    #[arg(long, requires = "to")]
    pub cert: Option<PathBuf>,
    /// This host's private key (`NAME.key`); needed with --to.
    #[arg(long, requires = "to")]
    pub key: Option<PathBuf>,
    /// Longest acceptable pause of the guest, in ms. With --to: from its
    /// stop here to its start there (one-way delay + the last dirty pages);
    /// a target the link cannot meet is said up front, and the link's delay
    /// plus this is aimed at instead.
    #[arg(long, default_value_t = 30)]
    pub downtime_ms: u64,
    /// Cap on the copy rate while the guest runs, bytes per second (the
    /// final copy, with the guest stopped, is not capped).
    #[arg(long)]
    pub max_bandwidth: Option<u64>,
    /// Move the running VM's disk to this new image on this host (the VM
    /// keeps running here). Not with --to: the destination's operator
    /// chooses where an incoming disk goes (`tandem receive --disk` or
    /// `--disk-dir`).
    #[arg(long, conflicts_with = "to")]
    pub disk_dest: Option<PathBuf>,
    /// Local disk move: overwrite --disk-dest even if it is a non-empty
    /// file.
    #[arg(long, requires = "disk_dest", conflicts_with = "to")]
    pub force: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct FailoverCmdArgs {
    /// Control socket of the protected primary.
    #[arg(long)]
    pub api: PathBuf,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Control socket of the VM.
    #[arg(long)]
    pub api: PathBuf,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct GuestElfArgs {
    /// Where to write the image.
    #[arg(long)]
    pub out: PathBuf,
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

/// A `--disk` value: `PATH[,ro|,rw]`. Only a final `,ro` or `,rw` is an
/// option; any other comma belongs to the path.
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
            _ => (s, false),
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

/// A `--net` value: `tap=NAME[,mac=52:54:00:xx:xx:xx]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetArg {
    /// The TAP device (created if it does not exist).
    pub tap: String,
    /// The guest's MAC address (default: 52:54:00:12:34:56).
    pub mac: Option<vmm::devices::virtio::net::MacAddr>,
}

impl std::str::FromStr for NetArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let usage = "use tap=NAME or tap=NAME,mac=52:54:00:xx:xx:xx";
        let mut tap = None;
        let mut mac = None;
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("tap", v)) if !v.is_empty() => tap = Some(v.to_owned()),
                Some(("mac", v)) => mac = Some(v.parse().map_err(|e| format!("{e}"))?),
                _ => {
                    return Err(format!(
                        "'{part}' in '{s}' is not a network option: {usage}"
                    ))
                }
            }
        }
        let tap = tap.ok_or_else(|| format!("'{s}' names no TAP device: {usage}"))?;
        Ok(NetArg { tap, mac })
    }
}

/// What VM to build: shared by `run` and `record`.
#[derive(Debug, Args)]
pub struct VmArgs {
    /// Kernel to boot: a PVH ELF (vmlinux, the test guest) or a Linux
    /// bzImage. Default: the built-in test guest.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Kernel command line. For the built-in guest: `WORKLOAD [ARGS] [hz=N]`
    /// with WORKLOAD one of `hello`, `ticks N`, `dirty PAGES ROUNDS`,
    /// `fill PAGES ROUNDS [TICKS]` (incompressible pages), `busy N`, `disk SECTORS` (512-byte sectors; needs --disk), `echo`,
    /// `tsc N`, `exits N`, `cpuid` (what CPUID shows the guest) (empty: a
    /// short demo).
    #[arg(long, default_value = "")]
    pub cmdline: String,
    /// Initial ramdisk (Linux).
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Guest memory in MiB: at least 8, at most the host's memory
    /// (MemTotal) and what this process's address space (ulimit -v) holds.
    #[arg(long, default_value_t = 64)]
    pub mem_mib: u64,
    /// A raw disk image for the virtio-blk device: PATH, PATH,ro or
    /// PATH,rw (a PATH may contain commas; one that itself ends in `,ro`
    /// or `,rw` is written with an explicit `,rw` after it).
    #[arg(long)]
    pub disk: Option<DiskArg>,
    #[command(flatten)]
    pub net: NetArgs,
    /// Serial console: stdio, null or file:PATH.
    #[arg(long, default_value = "stdio")]
    pub serial: SerialTarget,
    /// The CPU the guest sees (docs/cpu-models.md): `baseline`
    /// (x86-64-v1: SSE2, no SSE3) or `v2` (x86-64-v2: + SSE3, SSSE3,
    /// SSE4.1/4.2, POPCNT, CMPXCHG16B, LAHF); neither has XSAVE/AVX, and
    /// the host's CPUID is never passed through (PVM-based KVM alone fills
    /// leaves 0x1, 0x7, 0xd from the hardware). Default: the most capable
    /// of these this host's KVM provides (v2 on an ordinary VT-x/AMD-V
    /// server, baseline on PVM-based KVM). The model is recorded with the
    /// VM: a replay, restore or migration uses it and refuses a host that
    /// cannot provide it, naming the missing features.
    #[arg(long, value_name = "NAME", value_parser = clap::builder::PossibleValuesParser::new(
        vmm::vstate::cpu_model::MODELS.iter().map(|m| m.name)))]
    pub cpu_model: Option<String>,
}

/// The NIC option, shared by every command that runs a VM.
#[derive(Debug, Args, Clone)]
pub struct NetArgs {
    /// A virtio-net NIC on a TAP device: tap=NAME[,mac=52:54:00:xx:xx:xx].
    /// A TAP that does not exist is created (and goes away when Tandem
    /// ends); the MAC defaults to 52:54:00:12:34:56. A VM that arrives by
    /// migration or from a snapshot keeps its own MAC.
    #[arg(long, value_name = "tap=NAME[,mac=MAC]")]
    pub net: Option<NetArg>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub vm: VmArgs,
    /// Stop at this exit number, write a snapshot (to --snapshot) and end.
    #[arg(long, requires = "snapshot")]
    pub snapshot_at: Option<u64>,
    /// Snapshot file written at --snapshot-at.
    #[arg(long, requires = "snapshot_at")]
    pub snapshot: Option<PathBuf>,
    /// Serve a control socket here (status, pause/resume, migrate; see
    /// `tandem status`, `tandem migrate`).
    #[arg(long, conflicts_with = "snapshot_at")]
    pub api_socket: Option<PathBuf>,
    #[command(flatten)]
    pub protect: ProtectArgs,
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
    #[command(flatten)]
    pub net: NetArgs,
}

#[derive(Debug, Args)]
pub struct RecordArgs {
    /// The record log to write.
    #[arg(long)]
    pub log: PathBuf,
    #[command(flatten)]
    pub vm: VmArgs,
    /// Start from this snapshot instead of booting (the VM options other
    /// than --serial and --disk are then taken from the snapshot; a
    /// --cpu-model other than the snapshot's is refused).
    #[arg(long)]
    pub from_snapshot: Option<PathBuf>,
    /// Log a fingerprint (exit reason, RIP, registers) every N exits.
    #[arg(long, default_value_t = 1000)]
    pub fingerprint_interval: u64,
    /// Log a sync point with a full state digest every N exits (0: only at
    /// kicks and at the end).
    #[arg(long, default_value_t = 200_000)]
    pub sync_interval: u64,
    /// Stop the recording at this exit (the VM is not run to its end).
    #[arg(long)]
    pub stop_at: Option<u64>,
    /// Kick a guest that has run this long (µs of vCPU time) past a timer
    /// deadline without an exit; each kick costs a sync point in the log.
    #[arg(long, default_value_t = 2000)]
    pub kick_grace_us: u64,
    /// Serve a control socket here (status, pause/resume; a recorded VM
    /// is not migrated). A host disk error then pauses the VM until
    /// `tandem resume` instead of ending the recording. SIGTERM ends the
    /// process at once (the log has no end entry).
    #[arg(long, conflicts_with = "stop_at")]
    pub api_socket: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// The record log to replay.
    #[arg(long)]
    pub log: PathBuf,
    /// Serial console output: stdio, null or file:PATH (input comes from
    /// the log).
    #[arg(long, default_value = "stdio")]
    pub serial: SerialTarget,
    /// Discard the guest's console output.
    #[arg(long)]
    pub quiet: bool,
    /// The disk image to replay against (a copy of the recorded disk as it
    /// was when recording started). Default: the recorded path.
    #[arg(long)]
    pub disk: Option<DiskArg>,
    /// For logs recorded from a snapshot: the snapshot (default: the path
    /// recorded in the log).
    #[arg(long)]
    pub snapshot: Option<PathBuf>,
    /// On a divergence, roll back and adopt the next sync point instead of
    /// stopping; report how many were repaired.
    #[arg(long)]
    pub repair: bool,
    /// Follow a log that is still being written (wait for more entries).
    #[arg(long)]
    pub follow: bool,
    /// Print the state digest when the replay reaches each of these exits
    /// (`tandem: state digest at exit N: HEX`; before the exit's inputs are
    /// served, as `tandem secondary --digest-at` does).
    #[arg(long, value_name = "EXIT,...", value_delimiter = ',')]
    pub digest_at: Vec<u64>,
}

#[derive(Debug, Args)]
pub struct DumpLogArgs {
    /// The record log to print.
    #[arg(long)]
    pub log: PathBuf,
}

#[cfg(test)]
mod tests {
    use super::DiskArg;
    use std::path::Path;

    fn disk(s: &str) -> DiskArg {
        s.parse().unwrap()
    }

    #[test]
    fn disk_paths_may_contain_commas() {
        assert_eq!(disk("a.img").path, Path::new("a.img"));
        assert!(!disk("a.img").read_only);
        assert!(disk("a.img,ro").read_only);
        assert!(!disk("a.img,rw").read_only);
        assert_eq!(disk("a,b.img").path, Path::new("a,b.img"));
        assert!(disk("/x/a,b,c.img,ro").read_only);
        assert_eq!(disk("/x/a,b,c.img,ro").path, Path::new("/x/a,b,c.img"));
        // A path that itself ends in ",ro" takes an explicit option.
        assert_eq!(disk("v,ro,rw").path, Path::new("v,ro"));
        assert!(!disk("v,ro,rw").read_only);
        assert!("".parse::<DiskArg>().is_err());
        assert!(",ro".parse::<DiskArg>().is_err());
    }
}
