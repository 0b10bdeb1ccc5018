//! The sending side of a live migration: pre-copy rounds, auto-converge,
//! stop-and-copy, confirmation. The end-of-round policy and the pause
//! estimate are in [`super::precopy`].

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use failover::channel::{
    close_code, BlockingConnection, ChannelConfig, DiskBlock, Handle, Message, Page, Role,
};
use failover::migration::{
    encode_page, kind, marker_path, new_nonce, Accepted, DiskIdentity, DiskOffer, DiskPlan, Header,
    MIGRATION_VERSION,
};
use vmm::devices::virtio::block::DIRTY_BLOCK_SIZE;
use vmm::dirty::ConsumerId;
use vmm::image::{Access, Image, ImageError, ImageLock};
use vmm::vstate::memory::{self, page_is_zero, read_page};
use vmm::PAGE_SIZE;

use super::control::{ControlError, DiskInfo, Frozen, VmController};
use super::pipeline::{LinkView, Pipeline};
use super::precopy::{Link, Next, Precopy, MAX_ROUNDS};
use super::{MigrationError, MigrationParams, MigrationReport, Progress};

/// Bytes of page data per `MemoryPages` message.
const BATCH_BYTES: usize = 1 << 20;
/// Pages per message at most: small enough that the destination applies
/// one batch while the next is being encoded.
const BATCH_PAGES: usize = 512;
/// Pre-copy goes on below the downtime target while a round still shrinks
/// the dirty set this much (see [`Precopy::end_round`]).
const SHRINK: u64 = 2;
/// Link drain rate assumed before one was measured (bytes/s).
const INITIAL_BANDWIDTH: f64 = 100e6;
/// Time the switchover needs besides the transfer and the one-way trip:
/// state capture and restore.
const FIXED_SWITCHOVER: Duration = Duration::from_millis(1);
/// How often a long round reports progress.
const PROGRESS_EVERY: Duration = Duration::from_millis(100);
/// How often a wait for the destination checks for a cancel.
const CANCEL_POLL: Duration = Duration::from_millis(50);
/// How long the destination may take to confirm after `SwitchoverReady`.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);
/// How long tail-loss probes follow `SwitchoverReady` at most (a
/// destination restoring slowly still answers within it, mostly).
const TAIL_PROBE_MAX: Duration = Duration::from_secs(5);
/// A destination silent this long is gone (the migration fails and the
/// guest goes on here).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the destination may take to acknowledge a round or the header.
const ACK_TIMEOUT: Duration = Duration::from_secs(60);

/// Move the VM of `ctl` to `params.to`. `on_progress` is called after each
/// round, at phase changes and every [`PROGRESS_EVERY`] during a long
/// round. On success the guest stays frozen here: the caller reports, then
/// calls [`VmController::finish_migrated`] to end the local run. On failure
/// (or [`VmController::cancel_migration`] before the switchover) the
/// throttle is lifted at once and the guest goes on as it was: running, or
/// paused if it was paused.
pub fn migrate(
    ctl: &VmController,
    params: &MigrationParams,
    on_progress: &mut dyn FnMut(&Progress),
) -> Result<MigrationReport, MigrationError> {
    if let Some(p) = ctl.status().protection {
        return Err(MigrationError::Protected(p.peer));
    }
    transfer(ctl, params, on_progress, None).map(|(report, _)| report)
}

/// What seeding a secondary (`tandem protect`) does differently from a
/// migration: the connection is a primary's, the header a lockstep one
/// (`failover::lockstep`), and at the freeze, once the state is sent, the
/// guest starts recording at that exit and runs on here.
pub(crate) trait Seeding {
    /// The lockstep header frame that carries `migration`.
    fn header(&self, migration: &Header) -> Result<(u8, Vec<u8>), String>;
    /// Decode the secondary's acceptance frame `(kind, payload)`.
    fn accepted(&self, kind: u8, payload: &[u8]) -> Option<Result<Accepted, String>>;
    /// The guest is frozen and its state sent: start recording from this
    /// exit and let the guest run on. Returns when it runs again.
    fn start(&mut self, frozen: Frozen) -> Result<Instant, String>;
}

/// Seed a secondary: the migration's pre-copy and stop-and-copy, then
/// `Seeding::start` instead of the switchover. Returns the report (its
/// `downtime_ms` is the primary's pause) and the connection, on which the
/// secondary has confirmed the seed (`Running`).
pub(crate) fn seed<'a>(
    ctl: &'a VmController,
    params: &'a MigrationParams,
    on_progress: &'a mut dyn FnMut(&Progress),
    seeding: &'a mut dyn Seeding,
) -> Result<(MigrationReport, BlockingConnection), MigrationError> {
    let (report, conn) = transfer(ctl, params, on_progress, Some(seeding))?;
    let conn = conn.ok_or_else(|| MigrationError::Protocol("no connection".into()))?;
    Ok((report, conn))
}

fn transfer<'a>(
    ctl: &'a VmController,
    params: &'a MigrationParams,
    on_progress: &'a mut dyn FnMut(&Progress),
    seeding: Option<&'a mut dyn Seeding>,
) -> Result<(MigrationReport, Option<BlockingConnection>), MigrationError> {
    ctl.begin_migration().map_err(|e| match e {
        ControlError::Busy => MigrationError::Busy,
        ControlError::Ended | ControlError::NotMigrating => MigrationError::VmEnded,
        ControlError::Refused(why) => MigrationError::NotMigratable(why),
        ControlError::DiskLocked(why) => MigrationError::Source(why),
    })?;
    let vm = ctl.vm().clone();
    let consumer = match ctl.dirty().register(&vm.fd, &vm.memory, true) {
        Ok(c) => c,
        Err(e) => {
            ctl.end_migration();
            return Err(MigrationError::Source(e.to_string()));
        }
    };
    let mut source = Source {
        ctl,
        params,
        on_progress,
        consumer,
        start: Instant::now(),
        throttled_before: ctl.throttled(),
        capped: true,
        cancellable: true,
        progress: Progress {
            phase: "connecting".into(),
            ..Default::default()
        },
        report: MigrationReport::default(),
        conn: None,
        handle: None,
        queued: 0,
        last_status: Instant::now(),
        page_bytes: 0,
        pages_encoded: 0,
        marker: None,
        disk_plan: DiskPlan::None,
        in_doubt: false,
        seeding,
        recording: false,
        pipe: Pipeline::new(Instant::now()),
        stashed: None,
        answer_pending: false,
        released: None,
    };
    let mut result = source.run();
    // An `Abort` from the destination is an answer: it does not run the
    // guest. Anything else after `SwitchoverReady` leaves it in doubt.
    let mut in_doubt = source.in_doubt && !matches!(result, Err(MigrationError::Aborted(_)));
    if let (false, Err(e), Some(lock)) = (in_doubt, &result, &source.released) {
        // The switchover failed with the image let go (shared storage):
        // take it back before the guest runs on here. If another process
        // has it now, the guest must not run here.
        if let Err(le) = retake(lock) {
            in_doubt = true;
            result = Err(MigrationError::Source(format!("{e}; {le}")));
        }
    }
    if let (true, Err(e)) = (in_doubt, &result) {
        // `SwitchoverReady` went out but no `Running` came back: the
        // destination may be running the guest. Resuming here could make
        // two live copies (writing one image, with shared storage): keep
        // the guest stopped, as paused, for the operator to decide.
        ctl.set_throttle(0);
        if let Some(h) = &source.handle {
            h.close_now(close_code::ABORT, &e.to_string());
        }
        ctl.thaw_paused();
        result = Err(MigrationError::InDoubt(e.to_string()));
    } else if let Err(e) = &result {
        // The guest first: no more throttling from this instant.
        ctl.set_throttle(0);
        // The caller reports the failure (once); this is for tracing only.
        tracing::debug!("migration to {} failed: {e}", params.to);
        if let Some(conn) = source.conn.as_mut() {
            let _ = conn.send_msg(&Message::Abort {
                reason: e.to_string(),
            });
        }
        if let Some(h) = &source.handle {
            h.close_now(close_code::ABORT, &e.to_string());
        }
        if !source.recording {
            ctl.thaw();
        }
    }
    let _ = ctl.dirty().unregister(&vm.fd, &vm.memory, consumer);
    ctl.end_migration();
    let conn = source.conn.take();
    result.map(|r| (r, conn))
}

struct Source<'a> {
    ctl: &'a VmController,
    params: &'a MigrationParams,
    on_progress: &'a mut dyn FnMut(&Progress),
    consumer: ConsumerId,
    start: Instant,
    /// The VM's throttled time when this migration started.
    throttled_before: Duration,
    /// `--max-bandwidth` applies (not while the guest is frozen).
    capped: bool,
    /// A cancel is honoured (until the guest is frozen for the switch).
    cancellable: bool,
    progress: Progress,
    report: MigrationReport,
    conn: Option<BlockingConnection>,
    handle: Option<Handle>,
    /// Payload bytes queued on the connection.
    queued: u64,
    /// When the progress was last published.
    last_status: Instant,
    /// Encoded bytes of the pages sent, for the average page cost.
    page_bytes: u64,
    pages_encoded: u64,
    /// The marker file next to our disk image while the migration runs.
    marker: Option<Marker>,
    /// What the destination does with the disk.
    disk_plan: DiskPlan,
    /// `SwitchoverReady` may have reached the destination: from then on a
    /// failure cannot tell whether the guest runs there.
    in_doubt: bool,
    /// Seeding a secondary rather than migrating.
    seeding: Option<&'a mut dyn Seeding>,
    /// Seeding: the guest runs on, recorded (nothing to thaw on failure).
    recording: bool,
    /// The rounds in the pipe and their acknowledgements.
    pipe: Pipeline,
    /// A message other than an acknowledgement, taken while polling for
    /// acknowledgements (after the switchover: `Running`).
    stashed: Option<Message>,
    /// The header's answer is still to be read (see [`Source::answer`]).
    answer_pending: bool,
    /// The image's lock, let go for a destination on shared storage at
    /// the switchover (taken back if the switchover fails).
    released: Option<ImageLock>,
}

/// Take back the image's lock after a failed switchover, waiting a little
/// for a destination that is letting go of it.
fn retake(lock: &ImageLock) -> Result<(), ImageError> {
    let deadline = Instant::now() + RETAKE_WAIT;
    loop {
        match lock.retake() {
            Err(ImageError::Locked { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            other => return other,
        }
    }
}

/// How long a failed switchover waits for the destination to let go of a
/// shared image.
const RETAKE_WAIT: Duration = Duration::from_secs(2);

/// A marker file next to the source's disk image
/// (`failover::migration::marker_path`), so that a destination on storage
/// this host shares recognises the image as the source's own. Removed when
/// the migration ends.
struct Marker(std::path::PathBuf);

impl Marker {
    /// Create the marker of `image` (canonical); `None` (with a warning)
    /// if the image's directory is not writable.
    fn create(image: &std::path::Path) -> Option<(Marker, String)> {
        let made = new_nonce().and_then(|nonce| {
            let path = marker_path(image, &nonce).ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "no file name")
            })?;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)?;
            use std::io::Write;
            let _ = writeln!(
                f,
                "tandem: the image {} is being migrated by process {}",
                image.display(),
                std::process::id()
            );
            Ok((Marker(path), nonce))
        });
        match made {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!(
                    "cannot create a migration marker next to {}: {e}; a destination on shared storage will not recognise it (one on this host still does)",
                    image.display()
                );
                None
            }
        }
    }
}

impl Drop for Marker {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// What one batch of sending produced.
#[derive(Default)]
struct Sent {
    pages: u64,
    bytes: u64,
}

impl Source<'_> {
    fn conn(&mut self) -> &mut BlockingConnection {
        self.conn.as_mut().expect("connected")
    }

    fn wire_bytes(&self) -> (u64, u64) {
        self.handle
            .as_ref()
            .map(|h| {
                let s = h.quinn().stats();
                (s.udp_tx.bytes, s.udp_rx.bytes)
            })
            .unwrap_or((0, 0))
    }

    /// Fresh numbers for `tandem status` and the `on_progress` callback.
    fn publish(&mut self) {
        self.last_status = Instant::now();
        self.progress.elapsed_ms = ms(self.start.elapsed());
        self.progress.bytes_sent = self.wire_bytes().0;
        self.progress.throttled_ms = ms(self.throttled());
        self.ctl.set_progress(Some(self.progress.clone()));
        (self.on_progress)(&self.progress);
    }

    /// Publish if the last update is older than [`PROGRESS_EVERY`].
    fn tick(&mut self) {
        if self.last_status.elapsed() >= PROGRESS_EVERY {
            self.publish();
        }
    }

    /// Time the guest was held by auto-converge during this migration.
    fn throttled(&self) -> Duration {
        self.ctl.throttled().saturating_sub(self.throttled_before)
    }

    /// A cancel, or the guest's end, stops the migration (until the guest
    /// is frozen for the switchover).
    fn check_cancel(&self) -> Result<(), MigrationError> {
        if self.cancellable && self.ctl.cancel_requested() {
            return Err(MigrationError::Cancelled);
        }
        if self.cancellable && self.ctl.ended() {
            return Err(MigrationError::VmEnded);
        }
        Ok(())
    }

    /// Send `msg` (`payload_len` bytes of guest data). Under
    /// `--max-bandwidth` (not while the guest is frozen) a message leaves
    /// only when the cap allows the bytes sent before it; the wait
    /// publishes progress and honours a cancel.
    fn send(&mut self, msg: &Message, payload_len: usize) -> Result<(), MigrationError> {
        if let Some(max) = self.params.max_bandwidth.filter(|&m| m > 0) {
            let due = self.start + Duration::from_secs_f64(self.queued as f64 / max as f64);
            while self.capped {
                self.check_cancel()?;
                let now = Instant::now();
                if now >= due {
                    break;
                }
                std::thread::sleep((due - now).min(CANCEL_POLL));
                self.tick();
            }
        }
        self.check_cancel()?;
        self.conn().send_msg(msg)?;
        self.queued += payload_len as u64;
        // Acknowledgements are timed as they arrive: they measure the link.
        self.poll_echoes()?;
        self.tick();
        Ok(())
    }

    /// Wait for a reply on the control stream, failing on `Abort`;
    /// publishes progress and honours a cancel meanwhile. The
    /// acknowledgements of rounds (`RoundDone` echoes) that arrive first go
    /// to the pipeline.
    fn recv(&mut self, timeout: Duration) -> Result<Message, MigrationError> {
        if let Some(m) = self.stashed.take() {
            return Ok(m);
        }
        let deadline = Instant::now() + timeout;
        loop {
            self.check_cancel()?;
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(MigrationError::NoConfirmation(timeout));
            }
            match self
                .conn()
                .recv_msg_timeout::<Message>(left.min(CANCEL_POLL))?
            {
                Some(m) => {
                    if let Some(m) = self.echo(m)? {
                        return Ok(m);
                    }
                }
                None => self.tick(),
            }
        }
    }

    /// Take a message from the destination: a round's acknowledgement
    /// goes to the pipeline (`None`), an `Abort` fails, anything else is
    /// returned.
    fn echo(&mut self, m: Message) -> Result<Option<Message>, MigrationError> {
        match m {
            Message::Abort { reason } => Err(MigrationError::Aborted(reason)),
            Message::RoundDone { round, .. } => {
                let rtt = self.min_rtt();
                if !self.pipe.acked(round, Instant::now(), rtt) {
                    return Err(MigrationError::Protocol(format!(
                        "acknowledgement of round {round}, which is not outstanding"
                    )));
                }
                self.progress.acked_round = self.pipe.acked_round();
                Ok(None)
            }
            other => Ok(Some(other)),
        }
    }

    /// Take the acknowledgements that have arrived, without waiting, and
    /// what the congestion controller knows of the link's rate.
    fn poll_echoes(&mut self) -> Result<(), MigrationError> {
        if self.stashed.is_some() || self.answer_pending {
            return Ok(());
        }
        if let Some(h) = &self.handle {
            // BBR paces at its bandwidth estimate times a gain of at most
            // 2.885 (its startup's): the estimate is at least this.
            if let Some(bits) = h.quinn().congestion_state().metrics().pacing_rate {
                self.pipe.transport_rate(bits as f64 / 8.0 / 2.885);
            }
        }
        while let Some(m) = self.conn().recv_msg_timeout::<Message>(Duration::ZERO)? {
            if let Some(other) = self.echo(m)? {
                // For `recv` (or a protocol error during pre-copy).
                self.stashed = Some(other);
                break;
            }
        }
        Ok(())
    }

    /// What the transport knows of the link now.
    fn link_view(&self) -> LinkView {
        LinkView {
            rtt: self.min_rtt(),
            cwnd: self
                .handle
                .as_ref()
                .map_or(0, |h| h.quinn().stats().path.cwnd),
        }
    }

    /// The pause if the guest stopped now with `dirty` pages and
    /// `dirty_blocks` disk blocks dirty: with what is still queued ahead
    /// of them (see [`Pipeline::backlog`]), and without it.
    fn estimate(&self, dirty: u64, dirty_blocks: u64) -> (Link, Duration, Duration) {
        let avg_page = if self.pages_encoded > 0 {
            self.page_bytes as f64 / self.pages_encoded as f64
        } else {
            PAGE_SIZE as f64
        };
        // The cost of a page end to end (read, encode, send, decode and
        // write on the destination), measured from the acknowledgements.
        let secs_per_page = self.pipe.secs_per_page().unwrap_or(0.0);
        let (backlog, backlog_pages) = self.pipe.backlog(Instant::now());
        let link = self.link(self.pipe.rate());
        let dirty_bytes = dirty as f64 * avg_page + (dirty_blocks * DIRTY_BLOCK_SIZE) as f64;
        let with_backlog = link.estimate(
            backlog as f64 + dirty_bytes,
            (dirty + backlog_pages) as f64 * secs_per_page,
        );
        let dirty_only = link.estimate(dirty_bytes, dirty as f64 * secs_per_page);
        (link, with_backlog, dirty_only)
    }

    /// Wait (at most [`CANCEL_POLL`]) for an acknowledgement, and take
    /// whatever else came; publishes progress and honours a cancel.
    fn wait_for_echo(&mut self) -> Result<(), MigrationError> {
        self.check_cancel()?;
        if let Some(other) = self.stashed.take() {
            return Err(MigrationError::Protocol(format!(
                "expected the acknowledgement of a round, got {other:?}"
            )));
        }
        match self.conn().recv_msg_timeout::<Message>(CANCEL_POLL)? {
            Some(m) => {
                if let Some(other) = self.echo(m)? {
                    return Err(MigrationError::Protocol(format!(
                        "expected the acknowledgement of a round, got {other:?}"
                    )));
                }
                self.poll_echoes()
            }
            None => {
                self.tick();
                Ok(())
            }
        }
    }

    /// Wait until the next round may begin (see [`Pipeline::may_start`]),
    /// taking acknowledgements; publishes progress and honours a cancel.
    fn wait_for_room(&mut self) -> Result<(), MigrationError> {
        let deadline = Instant::now() + ACK_TIMEOUT;
        self.poll_echoes()?;
        while !self.pipe.may_start(&self.link_view()) {
            if Instant::now() >= deadline {
                return Err(MigrationError::NoConfirmation(ACK_TIMEOUT));
            }
            self.wait_for_echo()?;
        }
        Ok(())
    }

    fn connect(&mut self) -> Result<(), MigrationError> {
        let params = self.params;
        let role = match self.seeding {
            Some(_) => Role::Primary,
            None => Role::MigrationSource,
        };
        let mut cfg = ChannelConfig::new(role, params.name.clone());
        cfg.idle_timeout = IDLE_TIMEOUT;
        cfg.keep_alive = IDLE_TIMEOUT / 6;
        // The header is ready before the connection: it goes right behind
        // our Hello, and round 0 after it, without waiting for the
        // destination's Hello (one round trip less; the destination reads
        // the header after the Hello exchange; its Hello comes with its
        // answer).
        let vm = self.ctl.vm();
        let disk = match self.ctl.disk() {
            None => None,
            Some(d) => Some(self.disk_offer(&d)?),
        };
        let header = Header {
            version: MIGRATION_VERSION,
            config: self.ctl.config(),
            memory: memory::layout(&vm.memory),
            disk,
        };
        let (frame, bytes) = match &self.seeding {
            Some(s) => s.header(&header).map_err(MigrationError::Protocol)?,
            None => (
                kind::HEADER,
                postcard::to_stdvec(&header)
                    .map_err(|e| MigrationError::Protocol(e.to_string()))?,
            ),
        };
        let mut conn = BlockingConnection::connect_with(
            params.to,
            &params.server_name,
            &params.creds,
            &cfg,
            Some((frame, &bytes)),
        )
        .map_err(|source| MigrationError::Connect {
            addr: params.to,
            source,
        })?;
        // The destination's Hello is read with its answer (`answer`).
        self.handle = Some(conn.as_async().handle().clone());
        self.conn = Some(conn);
        if self.seeding.is_none() && header.disk.is_none() {
            // Round 0 goes out while the header's answer travels (one
            // round trip less; the destination's VM takes the pages from
            // its receive window once it has accepted): read after the
            // round's pages, in `answer`.
            self.answer_pending = true;
            return Ok(());
        }
        self.answer(header.disk.is_some())
    }

    /// Read the destination's answer to the header (`disk`: we offered
    /// one).
    fn answer(&mut self, disk: bool) -> Result<(), MigrationError> {
        // Pipelined: round 0 was already on its way, pre-copy under way; a
        // destination that is gone now was lost, not never reached.
        let pipelined = std::mem::replace(&mut self.answer_pending, false);
        let to = self.params.to;
        self.conn().finish_hello().map_err(|source| match source {
            source @ failover::channel::ChannelError::Closed { .. } if pipelined => {
                MigrationError::Channel(source)
            }
            source => MigrationError::Connect { addr: to, source },
        })?;
        self.report.destination = format!("{} at {to}", self.conn().peer().hello.name);
        let (k, payload) = match self.conn().recv_frame() {
            Ok(f) => f,
            // It refused and closed before we read its answer: its reason
            // is the close's.
            Err(e @ failover::channel::ChannelError::Closed { .. }) => {
                return Err(MigrationError::Refused(e.to_string()))
            }
            Err(e) => return Err(e.into()),
        };
        let seeded = self.seeding.as_ref().and_then(|s| s.accepted(k, &payload));
        let accepted = match seeded {
            Some(a) => Some(a.map_err(MigrationError::Protocol)?),
            None if k == kind::ACCEPTED && self.seeding.is_none() => Some(
                postcard::from_bytes(&payload)
                    .map_err(|e| MigrationError::Protocol(format!("unreadable acceptance: {e}")))?,
            ),
            None => None,
        };
        match k {
            _ if accepted.is_some() => {
                let a: Accepted = accepted.expect("checked");
                let want = if disk {
                    [DiskPlan::Copy, DiskPlan::Shared].contains(&a.disk)
                } else {
                    a.disk == DiskPlan::None
                };
                if !want {
                    return Err(MigrationError::Protocol(format!(
                        "the destination answered with disk plan {:?}",
                        a.disk
                    )));
                }
                self.disk_plan = a.disk;
                self.report.disk_shared = a.disk == DiskPlan::Shared;
                Ok(())
            }
            failover::channel::kind::MESSAGE => match postcard::from_bytes::<Message>(&payload) {
                Ok(Message::Abort { reason }) => Err(MigrationError::Refused(reason)),
                Ok(other) => Err(MigrationError::Protocol(format!(
                    "unexpected answer to the header: {other:?}"
                ))),
                Err(e) => Err(MigrationError::Protocol(e.to_string())),
            },
            other => Err(MigrationError::Protocol(format!(
                "unexpected frame kind {other} in answer to the header"
            ))),
        }
    }

    /// What the destination learns of our disk: size, file name, identity
    /// (with a fresh marker next to the image).
    fn disk_offer(&mut self, d: &DiskInfo) -> Result<DiskOffer, MigrationError> {
        let image = d
            .path
            .canonicalize()
            .map_err(|e| MigrationError::Source(format!("disk {}: {e}", d.path.display())))?;
        let mut identity = DiskIdentity::of(&image)
            .map_err(|e| MigrationError::Source(format!("disk {}: {e}", image.display())))?;
        if image.is_file() {
            if let Some((marker, nonce)) = Marker::create(&image) {
                self.marker = Some(marker);
                identity.marker = Some(nonce);
            }
        }
        Ok(DiskOffer {
            len: d.len,
            name: image
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            identity,
        })
    }

    /// Send the pages at `gpas`. In round 0 zero pages are skipped (the
    /// destination's memory starts zeroed); later they are sent as
    /// `ZeroPages`.
    fn send_pages(&mut self, gpas: &[u64], round: u32) -> Result<Sent, MigrationError> {
        let vm = self.ctl.vm().clone();
        let mut page = vec![0u8; PAGE_SIZE];
        let mut enc = Vec::with_capacity(PAGE_SIZE * 2);
        let mut packed: Vec<Page> = Vec::new();
        let mut raw: Vec<Page> = Vec::new();
        let mut zero: Vec<u64> = Vec::new();
        let mut batch = 0usize;
        let mut sent = Sent::default();
        for (i, &gpa) in gpas.iter().enumerate() {
            read_page(&vm.memory, gpa, &mut page)
                .map_err(|e| MigrationError::Source(e.to_string()))?;
            if page_is_zero(&page) {
                if round > 0 {
                    zero.push(gpa);
                }
            } else {
                let compressed = encode_page(&page, &mut enc);
                batch += enc.len() + 8;
                self.page_bytes += enc.len() as u64 + 8;
                self.pages_encoded += 1;
                sent.pages += 1;
                // Counted as encoded, so that a long round shows progress.
                self.progress.pages_sent += 1;
                let p = Page {
                    gpa,
                    data: enc.clone(),
                };
                if compressed {
                    packed.push(p);
                } else {
                    raw.push(p);
                }
            }
            let last = i + 1 == gpas.len();
            if batch >= BATCH_BYTES || packed.len() + raw.len() + zero.len() >= BATCH_PAGES || last
            {
                for (compressed, pages) in [(true, &mut packed), (false, &mut raw)] {
                    if !pages.is_empty() {
                        let msg = Message::MemoryPages {
                            round,
                            compressed,
                            pages: std::mem::take(pages),
                        };
                        self.send(&msg, batch)?;
                    }
                }
                if !zero.is_empty() {
                    let n = zero.len() * 8;
                    let msg = Message::ZeroPages {
                        round,
                        gpas: std::mem::take(&mut zero),
                    };
                    self.send(&msg, n)?;
                }
                sent.bytes += batch as u64;
                batch = 0;
            }
        }
        Ok(sent)
    }

    /// Send disk blocks (`all`: the whole disk, skipping zero blocks, which
    /// a fresh destination image already holds).
    fn send_blocks(
        &mut self,
        disk: &DiskInfo,
        file: &File,
        blocks: &[u64],
        skip_zero: bool,
    ) -> Result<u64, MigrationError> {
        let mut batch: Vec<DiskBlock> = Vec::new();
        let mut batch_bytes = 0usize;
        let mut total = 0u64;
        for (i, &b) in blocks.iter().enumerate() {
            let off = b * DIRTY_BLOCK_SIZE;
            let len = DIRTY_BLOCK_SIZE.min(disk.len.saturating_sub(off)) as usize;
            if len > 0 {
                let mut data = vec![0u8; len];
                file.read_exact_at(&mut data, off).map_err(|e| {
                    MigrationError::Source(format!("reading disk {}: {e}", disk.path.display()))
                })?;
                if !(skip_zero && data.iter().all(|&x| x == 0)) {
                    batch_bytes += len;
                    batch.push(DiskBlock { offset: off, data });
                }
            }
            if !batch.is_empty() && (batch_bytes >= BATCH_BYTES || i + 1 == blocks.len()) {
                let msg = Message::DiskBlocks {
                    disk: 0,
                    blocks: std::mem::take(&mut batch),
                };
                self.send(&msg, batch_bytes)?;
                total += batch_bytes as u64;
                batch_bytes = 0;
            }
        }
        self.progress.disk_bytes_sent += total;
        Ok(total)
    }

    fn take_dirty(&self) -> Result<Vec<u64>, MigrationError> {
        let vm = self.ctl.vm();
        self.ctl
            .dirty()
            .take(&vm.fd, &vm.memory, self.consumer)
            .map_err(|e| MigrationError::Source(e.to_string()))
    }

    /// The smoothed round trip (queueing included, as our bytes see it).
    fn rtt(&self) -> Duration {
        self.handle.as_ref().map_or(Duration::ZERO, Handle::rtt)
    }

    /// The smallest round trip seen: the link's own delay, without the
    /// queueing and retransmissions that inflate the smoothed one.
    fn min_rtt(&self) -> Duration {
        self.handle
            .as_ref()
            .map_or(Duration::ZERO, |h| h.quinn().stats().path.min_rtt)
            .min(self.rtt())
    }

    fn link(&self, measured: Option<f64>) -> Link {
        Link {
            rtt: self.min_rtt(),
            measured,
            initial: INITIAL_BANDWIDTH,
            cap: self.params.max_bandwidth,
            fixed: FIXED_SWITCHOVER,
        }
    }

    /// The end-of-round policy for this link; says up front (once the
    /// link's round trip is known: not while the header's answer is
    /// pending) if the target cannot be met.
    fn precopy(&mut self) -> Precopy {
        let precopy = Precopy::new(self.params.downtime, self.link(None).floor());
        if !self.answer_pending {
            if let Some(note) = precopy.unreachable() {
                tracing::warn!("migration to {}: {note}", self.params.to);
                self.progress.note = Some(note);
            }
        }
        precopy
    }

    fn run(&mut self) -> Result<MigrationReport, MigrationError> {
        self.publish();
        self.connect()?;
        // The destination reaches our own image: send no block.
        let disk = self.ctl.disk().filter(|_| self.disk_plan == DiskPlan::Copy);
        let shared_disk = match self.disk_plan {
            DiskPlan::Shared => self.ctl.disk(),
            _ => None,
        };
        // Read through a descriptor of its own; the lock is the device's.
        let disk_image = match &disk {
            Some(d) => Some(Image::open(&d.path, Access::Read).map_err(|e| {
                MigrationError::Source(format!("opening disk {}: {e}", d.path.display()))
            })?),
            None => None,
        };
        let disk_file = disk_image.as_ref().map(Image::file);
        // The whole disk goes in round 0: forget older writes.
        if let Some(d) = &disk {
            d.dirty.take();
        }
        // The handshake measured the round trip: say now if the target
        // cannot be met on this link. (Without a disk the header's answer
        // is read after round 0's pages, and so is the floor: the
        // handshake's lone sample, taken while TLS runs on a slow CPU, is
        // far above the link's round trip.)
        let mut precopy = self.precopy();
        let mut round = 0u32;
        let vm = self.ctl.vm().clone();
        self.progress.phase = "precopy".into();
        self.publish();
        self.pipe = Pipeline::new(Instant::now());
        loop {
            let t0 = Instant::now();
            self.progress.round = round;
            let mut gpas = self.take_dirty()?;
            if round == 0 {
                // Never-touched RAM is the mapping's zero page: the
                // destination's fresh memory already holds it.
                gpas = memory::possibly_nonzero(&vm.memory, &gpas);
            }
            let sent = self.send_pages(&gpas, round);
            if self.answer_pending {
                // A refusal says why, whatever sending met meanwhile.
                self.answer(false)?;
                precopy = self.precopy();
            }
            let sent = sent?;
            let mut bytes = sent.bytes;
            if let (Some(d), Some(f)) = (&disk, &disk_file) {
                let blocks: Vec<u64> = if round == 0 {
                    (0..d.dirty.blocks()).collect()
                } else {
                    d.dirty.take()
                };
                bytes += self.send_blocks(d, f, &blocks, round == 0)?;
            }
            // Streamed: no waiting for this round's acknowledgement, only
            // until the link has room for the next round (pipeline.rs).
            self.pipe.sent(round, bytes, sent.pages, t0);
            self.send(
                &Message::RoundDone {
                    round,
                    dirty_pages: gpas.len() as u64,
                },
                8,
            )?;
            self.wait_for_room()?;
            let (dirty, dirty_blocks, estimate, link) = loop {
                // What the guest dirtied meanwhile.
                self.ctl
                    .dirty()
                    .collect(&vm.fd, &vm.memory)
                    .map_err(|e| MigrationError::Source(e.to_string()))?;
                let dirty = self.ctl.dirty().pending(self.consumer) as u64;
                let dirty_blocks = disk.as_ref().map_or(0, |d| d.dirty.pending());
                let (link, queued, dirty_only) = self.estimate(dirty, dirty_blocks);
                // Only the backlog stands between this round and the
                // target: let it drain (no round, no throttle: neither
                // would shorten it), then look again.
                // Nor decide before the first rate is measured, when the
                // echo on its way will measure one.
                if (queued > precopy.target() && dirty_only <= precopy.target()
                    || self.pipe.measuring())
                    && self.pipe.outstanding() > 0
                {
                    self.wait_for_echo()?;
                    continue;
                }
                break (dirty, dirty_blocks, queued, link);
            };
            let elapsed = t0.elapsed();
            tracing::debug!(
                "round {round}: {} pages ({} sent) {} bytes in {:?}; {dirty} dirty now, {} bytes outstanding, {} rounds unacknowledged, estimate {:?} (rtt {:?}, {:.0} B/s)",
                gpas.len(),
                sent.pages,
                bytes,
                elapsed,
                self.pipe.outstanding(),
                self.pipe.unacked_rounds(),
                estimate,
                link.rtt,
                link.rate()
            );
            self.progress.dirty_pages = dirty;
            self.progress.dirty_rate = dirty as f64 / elapsed.as_secs_f64().max(1e-6);
            self.progress.bandwidth = link.rate();
            self.progress.estimated_downtime_ms = ms(estimate);
            round += 1;
            let prev_dirty = precopy.prev_dirty();
            let shrinking = prev_dirty != u64::MAX && dirty * SHRINK <= prev_dirty
                || round == 1 && dirty * SHRINK <= gpas.len() as u64;
            let next = precopy.end_round(
                &mut self.progress,
                round,
                dirty + dirty_blocks,
                estimate,
                shrinking,
            );
            self.publish();
            match next {
                Next::Switch => break,
                Next::Round { throttle } => {
                    if let Some(pct) = throttle {
                        self.ctl.set_throttle(pct);
                    }
                }
            }
        }
        if precopy.gave_up() {
            tracing::warn!(
                "pre-copy did not converge in {MAX_ROUNDS} rounds; forcing the switchover"
            );
        }
        self.report.rounds = round;
        self.report.converged = precopy.converged();
        self.report.max_throttle_pct = precopy.max_throttle_pct();
        self.report.target_ms = ms(precopy.target());
        self.report.note = self.progress.note.clone();

        // Every streamed round must be acknowledged before the guest
        // stops: a switchover sent towards a destination that died
        // meanwhile would leave its outcome in doubt and the VM paused here,
        // where waiting fails in pre-copy and the guest runs on.
        while self.pipe.outstanding() > 0 {
            self.wait_for_echo()?;
        }

        // Stop-and-copy.
        self.progress.phase = "switchover".into();
        self.publish();
        let frozen = self.ctl.freeze().map_err(|e| match e {
            ControlError::Ended => MigrationError::VmEnded,
            ControlError::Busy => MigrationError::Busy,
            ControlError::NotMigrating => MigrationError::Protocol(e.to_string()),
            ControlError::Refused(why) => MigrationError::NotMigratable(why),
            ControlError::DiskLocked(why) => MigrationError::Source(why),
        })?;
        // Frozen: from here on, finishing fast is all that matters.
        self.cancellable = false;
        self.capped = false;
        self.ctl.set_throttle(0);
        self.report.throttled_ms = ms(self.throttled());
        self.report.paused = frozen.paused;
        let t_frozen = Instant::now();
        let gpas = self.take_dirty()?;
        let t_taken = Instant::now();
        let sent = self.send_pages(&gpas, round)?;
        self.report.final_pages = sent.pages;
        tracing::debug!(
            "stop-and-copy: frozen {:?} after the request, dirty log {:?}, {} pages sent in {:?}",
            t_frozen - frozen.at,
            t_taken - t_frozen,
            sent.pages,
            t_taken.elapsed()
        );
        if let (Some(d), Some(f)) = (&disk, &disk_file) {
            let blocks = d.dirty.take();
            self.send_blocks(d, f, &blocks, false)?;
        }
        if let Some(d) = &shared_disk {
            // Every write the guest made is in the image, durable, before
            // the destination opens it.
            Image::open(&d.path, Access::Read)
                .map_err(|e| e.to_string())
                .and_then(|img| img.file().sync_all().map_err(|e| e.to_string()))
                .map_err(|e| {
                    MigrationError::Source(format!("syncing disk {}: {e}", d.path.display()))
                })?;
        }
        let state = vmm::persist::encode_state("machine state", &frozen.state)
            .map_err(|e| MigrationError::Protocol(e.to_string()))?;
        let n = state.len();
        self.send(&Message::DeviceState(state), n)?;
        if self.seeding.is_some() {
            // The bootstrap is complete; the log follows.
            self.conn()
                .send_msg(&Message::SwitchoverReady { paused: false })?;
            let at = frozen.at;
            let seeding = self.seeding.as_mut().expect("seeding");
            let resumed = seeding.start(frozen).map_err(MigrationError::Source)?;
            self.recording = true;
            self.report.downtime_ms = ms(resumed.saturating_duration_since(at));
            return self.seeded();
        }
        if let Some(d) = &shared_disk {
            // The guest is frozen and its writes are on the storage: the
            // destination may open (and lock) the image now.
            d.lock.release().map_err(|e| {
                MigrationError::Source(format!("unlocking disk {}: {e}", d.path.display()))
            })?;
            self.released = Some(d.lock.clone());
        }
        self.in_doubt = true;
        self.send(
            &Message::SwitchoverReady {
                paused: frozen.paused,
            },
            1,
        )?;
        // A packet lost at the end of the final copy is found one round
        // trip later, not at QUIC's probe timeout (failover::channel's
        // probe.rs).
        let probe = self.handle.as_ref().map(|h| h.probe_tail(TAIL_PROBE_MAX));
        let answer = self.recv(CONFIRM_TIMEOUT);
        let probes = probe.map_or(0, |p| p.stop());
        match answer? {
            Message::Running => {}
            other => {
                return Err(MigrationError::Protocol(format!(
                    "expected Running, got {other:?}"
                )))
            }
        }
        let confirmed = frozen.at.elapsed();
        tracing::debug!("{probes} tail-loss probes sent");
        // The guest started there one trip before its confirmation got here.
        let downtime = confirmed.saturating_sub(self.min_rtt() / 2);
        tracing::debug!("confirmed after {confirmed:?}; downtime {downtime:?}");
        self.report.downtime_ms = ms(downtime);
        self.report.confirmed_ms = ms(confirmed);
        self.finish_report();
        // The destination runs the guest; say goodbye in order (it waits
        // for our close to know we got its confirmation).
        if let Some(conn) = self.conn.take() {
            let _ = conn.close();
        }
        Ok(self.report.clone())
    }
}

impl Source<'_> {
    /// After `Seeding::start`: wait for the secondary's `Running` (it
    /// restored the seed) and finish the report.
    fn seeded(&mut self) -> Result<MigrationReport, MigrationError> {
        match self.recv(CONFIRM_TIMEOUT)? {
            Message::Running => {}
            other => {
                return Err(MigrationError::Protocol(format!(
                    "expected Running (the secondary holds the seed), got {other:?}"
                )))
            }
        }
        self.finish_report();
        Ok(self.report.clone())
    }

    /// The totals of a transfer that reached its end.
    fn finish_report(&mut self) {
        let (tx, rx) = self.wire_bytes();
        self.report.total_ms = ms(self.start.elapsed());
        self.report.bytes_on_wire = tx;
        self.report.bytes_received = rx;
        self.report.pages_sent = self.progress.pages_sent;
        self.report.disk_bytes_sent = self.progress.disk_bytes_sent;
        self.progress.phase = "done".into();
        self.publish();
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
