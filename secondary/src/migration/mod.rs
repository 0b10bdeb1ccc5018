//! Planned live migration, destination side: accept one VM from a
//! migration source, fill guest memory and the disk image while the source
//! keeps running, restore vCPU and devices at the switchover, confirm with
//! `Running`. The protocol is described in `docs/migration.md` and
//! `failover::migration`.

pub(crate) mod accept;
pub(crate) mod disk;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use failover::channel::{
    kind as channel_kind, BlockingConnection, BlockingListener, ChannelError, Message, Role,
};
use failover::migration::{
    check_page, decode_page, kind, Accepted, DiskPlan, Header, MIGRATION_VERSION,
};
use vmm::devices::virtio::net::announce::announce;
use vmm::devices::virtio::net::tap::TapWriter;
use vmm::machine::{DiskConfig, Incoming, Machine, MachineState};
use vmm::vstate::memory::{self, write_page};
use vmm::PAGE_SIZE;

pub use accept::receive;
use disk::DestDisk;

/// How long a source may take from its `Hello` to its header. Every step
/// before the header is bounded (the TLS handshake and the Hello exchange
/// by the channel's handshake timeout), and while one connection is being
/// set up the receiver takes others.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A source that sends nothing for this long during the transfer is
/// dropped, even if it keeps the connection alive.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(120);

/// How the destination is set up. Paths are the receiver operator's; the
/// source never chooses one (see `disk.rs`).
#[derive(Debug, Clone, Default)]
pub struct ReceiveOptions {
    /// Where to put the VM's disk (staged next to it, put in place at the
    /// switchover; the source's own image is left alone).
    pub disk: Option<PathBuf>,
    /// Or: the directory for the VM's disk, under the source image's file
    /// name (checked; an existing file is never replaced).
    pub disk_dir: Option<PathBuf>,
    /// The received VM gets a control socket, so a VM paused by its
    /// operator can arrive paused (and be resumed there). Without one a
    /// paused VM is refused at the switchover: it stays on the source.
    pub control_socket: bool,
    /// The disk is a secondary's replica (`tandem protect`, a seeded
    /// secondary): its replay writes every block again, behind the
    /// primary, so the primary's own image (the same file) is refused
    /// instead of shared.
    pub replica: bool,
}

/// A VM received and restored, about to run.
pub struct Received {
    /// The restored VM.
    pub machine: Machine,
    /// Virtual time to continue from.
    pub virtual_ns: u64,
    /// The source's address and name.
    pub from: String,
    /// Pre-copy rounds the source made.
    pub rounds: u32,
    /// The VM was paused on the source and must stay paused here.
    pub paused: bool,
    /// Waits (bounded) until the source has closed the connection, i.e. has
    /// seen our `Running`; join before the process ends.
    pub goodbye: std::thread::JoinHandle<()>,
}

/// Why receiving failed.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    /// The connection failed.
    #[error(transparent)]
    Channel(#[from] ChannelError),
    /// The source sent `Abort` with this reason.
    #[error("the source aborted the migration: {0}")]
    Aborted(String),
    /// This destination refused the VM (the reason was sent to the source).
    #[error("refused the VM: {0}")]
    Refused(String),
    /// The source broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The source went quiet for this long.
    #[error("the source sent nothing for {0:?}")]
    Silent(Duration),
    /// A failure on this side (disk, restore).
    #[error("{0}")]
    Local(String),
}

/// Announce the guest's MAC address from its new host, as QEMU's
/// announce-self does (RARP broadcasts, several rounds with growing gaps:
/// `vmm::devices::virtio::net::announce`), so that switches learn where it
/// went. Called by whoever runs the guest, as it starts it (as QEMU does
/// once the VM runs): `tandem receive` after the switchover's `Running`,
/// `tandem golive` after the failover's claim; the rounds (about 0.8 s) run
/// on a thread of their own while the guest runs. The MAC is the
/// guest's own (its saved device state), whatever the destination's `--net`
/// says. Returns the thread, or `None` when there is nothing to announce
/// (no NIC, or no TAP here: said on stderr).
pub fn announce_guest_mac(
    machine: &Machine,
    tap: Option<&TapWriter>,
) -> Option<std::thread::JoinHandle<()>> {
    let mac = machine.devices.net.as_ref()?.mac();
    let Some(tap) = tap.cloned() else {
        eprintln!(
            "tandem: the VM has a network device ({mac}) but this host gave it no --net; its frames go nowhere"
        );
        return None;
    };
    std::thread::Builder::new()
        .name("announce".into())
        .spawn(move || {
            if let Err(e) = announce(mac, |f| tap.send(f)) {
                eprintln!("tandem: announcing {mac} on TAP {}: {e}", tap.name());
            }
        })
        .ok()
}

/// Fault injection for tests (`die-before-running`: the receiver exits
/// right before it would confirm `Running`).
pub const FAULT_ENV: &str = "TANDEM_TEST_FAULT";

pub(crate) fn abort(conn: &mut BlockingConnection, reason: &str) {
    let _ = conn.send_msg(&Message::Abort {
        reason: reason.to_string(),
    });
    // Give the Abort a moment to leave before the connection goes.
    std::thread::sleep(Duration::from_millis(20));
    conn.abort(reason);
}

/// Check who the peer is and read its header, waiting at most
/// [`HEADER_TIMEOUT`] for it.
fn read_header(conn: &mut BlockingConnection) -> Result<Header, ReceiveError> {
    read_first(
        conn,
        Role::MigrationSource,
        "a migration source",
        kind::HEADER,
        "migration header",
    )
}

/// Check that the peer announced `role` (`who`, for messages) and read its
/// first frame, of kind `frame_kind`, holding a postcard `T` (`what`),
/// waiting at most [`HEADER_TIMEOUT`] for it. Any refusal is sent to the
/// peer as an `Abort` too.
pub(crate) fn read_first<T: serde::de::DeserializeOwned>(
    conn: &mut BlockingConnection,
    role: Role,
    who: &str,
    frame_kind: u8,
    what: &str,
) -> Result<T, ReceiveError> {
    let payload = read_first_frame(conn, role, who, frame_kind, what)?;
    postcard::from_bytes(&payload).map_err(|e| {
        let reason = format!("unreadable {what}: {e}");
        abort(conn, &reason);
        ReceiveError::Refused(reason)
    })
}

/// [`read_first`]'s frame, undecoded.
pub(crate) fn read_first_frame(
    conn: &mut BlockingConnection,
    role: Role,
    who: &str,
    frame_kind: u8,
    what: &str,
) -> Result<Vec<u8>, ReceiveError> {
    let peer = conn.peer().clone();
    if peer.hello.role != role {
        let reason = format!("expected {who}, the peer is a {:?}", peer.hello.role);
        abort(conn, &reason);
        return Err(ReceiveError::Refused(reason));
    }
    let Some((k, payload)) = conn.recv_frame_timeout(HEADER_TIMEOUT)? else {
        let e = ReceiveError::Silent(HEADER_TIMEOUT);
        abort(conn, &e.to_string());
        return Err(e);
    };
    if k != frame_kind {
        let reason = format!("expected the {what}, got frame kind {k}");
        abort(conn, &reason);
        return Err(ReceiveError::Protocol(reason));
    }
    Ok(payload)
}

/// Take the VM announced by `header`.
fn receive_one(
    mut conn: BlockingConnection,
    header: &Header,
    opts: &ReceiveOptions,
) -> Result<Received, ReceiveError> {
    let peer = conn.peer().clone();
    let from = format!("{} at {}", peer.hello.name, peer.addr);
    if header.disk.is_none() && (opts.disk.is_some() || opts.disk_dir.is_some()) {
        eprintln!("tandem: the VM from {from} has no disk; --disk/--disk-dir is not used");
    }
    let disk = match accept_header(header, opts) {
        Ok(x) => x,
        Err(reason) => {
            abort(&mut conn, &reason);
            return Err(ReceiveError::Refused(reason));
        }
    };
    let accepted = Accepted {
        disk: disk.as_ref().map_or(DiskPlan::None, DestDisk::plan),
    };
    let bytes = postcard::to_stdvec(&accepted).map_err(|e| ReceiveError::Local(e.to_string()))?;
    if accepted.disk == DiskPlan::Shared {
        eprintln!(
            "tandem: the VM's disk {} is the source's own image: moving memory only",
            disk.as_ref()
                .map(|d| d.place().display().to_string())
                .unwrap_or_default()
        );
    }
    conn.send_frame(kind::ACCEPTED, &bytes)?;
    // Dropped on any failure below: the destination's files go back to how
    // they were.
    let mut disk = disk;
    // The VM is created now, while the source reads and encodes round 0
    // and its first pages travel: they wait in the connection's receive
    // window meanwhile. (Created before `Accepted`, it was most of the
    // setup time of a migration on loopback: ~34 ms on a loaded host.)
    let t = Instant::now();
    let incoming = match prepare(header) {
        Ok(incoming) => incoming,
        Err(reason) => {
            abort(&mut conn, &reason);
            return Err(ReceiveError::Local(reason));
        }
    };
    tracing::debug!("prepared the VM in {:?}", t.elapsed());
    match transfer(&mut conn, incoming, &mut disk, opts) {
        Ok((machine, state, rounds, paused)) => {
            if std::env::var_os(FAULT_ENV).is_some_and(|v| v == "die-before-running") {
                // Test hook: this host dies at the worst moment of the
                // switchover, with the VM restored but unconfirmed.
                eprintln!("tandem: {FAULT_ENV}=die-before-running: exiting");
                std::process::exit(137);
            }
            conn.send_msg(&Message::Running)?;
            // A lost `Running` is found one round trip later, not at
            // QUIC's probe timeout (failover::channel's probe.rs).
            let probe = conn.as_async().handle().probe_tail(Duration::from_secs(2));
            if let Some(d) = disk {
                d.keep();
            }
            let goodbye = std::thread::Builder::new()
                .name("migration-goodbye".into())
                .spawn(move || {
                    // The source closes once it has our confirmation.
                    let _ = conn.recv_msg_timeout::<Message>(Duration::from_secs(10));
                    drop(probe);
                })
                .map_err(|e| ReceiveError::Local(e.to_string()))?;
            Ok(Received {
                machine,
                virtual_ns: state.virtual_ns,
                from,
                rounds,
                paused,
                goodbye,
            })
        }
        Err(TransferError::Local(reason)) => {
            abort(&mut conn, &reason);
            Err(ReceiveError::Local(reason))
        }
        Err(TransferError::Remote(e)) => Err(e),
    }
}

/// Check the header (version, memory size and layout, as the VM will
/// have them) and, last, get the disk ready. Nothing is created on disk
/// before every other check passed; the VM is created after `Accepted`
/// ([`prepare`]).
pub(crate) fn accept_header(
    header: &Header,
    opts: &ReceiveOptions,
) -> Result<Option<DestDisk>, String> {
    if header.version != MIGRATION_VERSION {
        return Err(format!(
            "migration stream version {} is not supported (this Tandem speaks version {MIGRATION_VERSION})",
            header.version
        ));
    }
    let ours =
        Machine::incoming_layout(&header.config).map_err(|e| format!("creating the VM: {e}"))?;
    check_layout(header, &ours)?;
    match &header.disk {
        None => Ok(None),
        Some(offer) => Ok(Some(DestDisk::prepare(opts, offer)?)),
    }
}

fn check_layout(header: &Header, ours: &[(u64, u64)]) -> Result<(), String> {
    if ours != header.memory {
        return Err(format!(
            "memory layout differs: source {:x?}, destination {ours:x?}",
            header.memory
        ));
    }
    Ok(())
}

/// Create the VM (zeroed memory) the accepted header announced.
pub(crate) fn prepare(header: &Header) -> Result<Incoming, String> {
    let incoming =
        Machine::prepare_incoming(&header.config).map_err(|e| format!("creating the VM: {e}"))?;
    check_layout(header, &memory::layout(incoming.memory()))?;
    Ok(incoming)
}

pub(crate) enum TransferError {
    /// Our fault (disk full, bad data): tell the source.
    Local(String),
    /// The source went away or aborted.
    Remote(ReceiveError),
}

impl From<ChannelError> for TransferError {
    fn from(e: ChannelError) -> Self {
        TransferError::Remote(e.into())
    }
}

pub(crate) fn transfer(
    conn: &mut BlockingConnection,
    incoming: Incoming,
    disk: &mut Option<DestDisk>,
    opts: &ReceiveOptions,
) -> Result<(Machine, MachineState, u32, bool), TransferError> {
    let mut page = vec![0u8; PAGE_SIZE];
    let zero = vec![0u8; PAGE_SIZE];
    let layout = memory::layout(incoming.memory());
    let bounded = |gpa| check_page(&layout, gpa).map_err(|e| TransferError::Local(e.to_string()));
    let mut state: Option<MachineState> = None;
    let mut rounds = 0;
    loop {
        let t_wait = Instant::now();
        let Some(frame) = conn.recv_frame_timeout(STALL_TIMEOUT)? else {
            return Err(TransferError::Local(
                ReceiveError::Silent(STALL_TIMEOUT).to_string(),
            ));
        };
        let t_got = Instant::now();
        let msg = match frame {
            (channel_kind::MESSAGE, payload) => postcard::from_bytes::<Message>(&payload)
                .map_err(|e| TransferError::Local(format!("malformed message: {e}")))?,
            (k, _) => return Err(TransferError::Local(format!("unexpected frame kind {k}"))),
        };
        match msg {
            Message::MemoryPages {
                compressed, pages, ..
            } => {
                let n = pages.len();
                let t = Instant::now();
                for p in pages {
                    bounded(p.gpa)?;
                    decode_page(&p.data, compressed, &mut page)
                        .map_err(|e| TransferError::Local(format!("page {:#x}: {e}", p.gpa)))?;
                    write_page(incoming.memory(), p.gpa, &page)
                        .map_err(|e| TransferError::Local(e.to_string()))?;
                }
                tracing::debug!(
                    "{n} pages: waited {:?}, decoded the message in {:?}, applied in {:?}",
                    t_got - t_wait,
                    t - t_got,
                    t.elapsed()
                );
            }
            Message::ZeroPages { gpas, .. } => {
                for gpa in gpas {
                    bounded(gpa)?;
                    write_page(incoming.memory(), gpa, &zero)
                        .map_err(|e| TransferError::Local(e.to_string()))?;
                }
            }
            Message::DiskBlocks { blocks, .. } => {
                let Some(d) = &disk else {
                    return Err(TransferError::Local(
                        "disk blocks for a VM without a disk".into(),
                    ));
                };
                for b in blocks {
                    d.write(b.offset, &b.data).map_err(TransferError::Local)?;
                }
            }
            Message::RoundDone { round, dirty_pages } => {
                // Make the bulk of the disk durable off the downtime path.
                if let Some(d) = &disk {
                    d.sync().map_err(TransferError::Local)?;
                }
                rounds = round + 1;
                conn.send_msg(&Message::RoundDone { round, dirty_pages })?;
            }
            Message::DeviceState(bytes) => {
                state = Some(
                    vmm::persist::decode_state("machine state", &bytes)
                        .map_err(|e| TransferError::Local(e.to_string()))?,
                );
            }
            Message::SwitchoverReady { paused } => {
                if paused && !opts.control_socket {
                    return Err(TransferError::Local(
                        "the VM is paused and this `tandem receive` has no --api-socket to resume it"
                            .into(),
                    ));
                }
                let Some(mut state) = state else {
                    return Err(TransferError::Local(
                        "switchover without a machine state".into(),
                    ));
                };
                let t = Instant::now();
                if let Some(d) = disk {
                    d.commit().map_err(TransferError::Local)?;
                }
                // The disk is ours to choose, never the one the source's
                // state names.
                let read_only = state.config.disk.as_ref().is_some_and(|c| c.read_only);
                state.config.disk = disk.as_ref().map(|d| DiskConfig {
                    path: d.place().to_path_buf(),
                    read_only,
                });
                let disk_cfg = state.config.disk.clone();
                let machine = incoming
                    .finish(&state, disk_cfg)
                    .map_err(|e| TransferError::Local(format!("restoring the VM: {e}")))?;
                tracing::debug!("restored in {:?}", t.elapsed());
                return Ok((machine, state, rounds, paused));
            }
            Message::Abort { reason } => {
                return Err(TransferError::Remote(ReceiveError::Aborted(reason)))
            }
            other => {
                return Err(TransferError::Local(format!(
                    "unexpected message during migration: {other:?}"
                )))
            }
        }
    }
}

/// Bind the listener of `tandem receive`.
pub fn listen(
    addr: SocketAddr,
    creds: &failover::certs::Credentials,
    name: &str,
) -> Result<BlockingListener, ChannelError> {
    let mut cfg = failover::channel::ChannelConfig::new(Role::MigrationDestination, name);
    // A source silent this long is gone; the transfer is dropped.
    cfg.idle_timeout = Duration::from_secs(3);
    cfg.keep_alive = Duration::from_millis(500);
    BlockingListener::bind(addr, creds, &cfg)
}
