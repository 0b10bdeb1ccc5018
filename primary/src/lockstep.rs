//! The primary's side of lockstep protection (first slice): the log
//! stream to the secondary, its acknowledgements, and the Output Rule.
//!
//! The recorder writes into a [`LogQueue`]; a sender thread ships whatever
//! is queued as `LogBytes` chunks; an ack thread reads the secondary's
//! [`Ack`]s (the log bytes it has). [`HeldOutputs`] is the [`Outputs`] of a
//! protected VM: each output is tagged with the log offset just past its
//! own `Output` entry (the recorder flushed it there) and handed to a
//! release thread, which passes it to the live outputs once the secondary
//! has acknowledged that offset. The vCPU never waits for an ack; only the
//! output does. Protocol: `failover::lockstep`, `docs/lockstep.md`.
//!
//! Heartbeats and the loss of the secondary (`failover::heartbeat`,
//! [`crate::failover`], `docs/failover.md`): the sender thread also sends a
//! heartbeat every interval; the ack thread takes the secondary's
//! heartbeats and declares it lost after the failover timeout of silence.
//! Outputs are released only inside the release lease.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Sender};
use failover::certs::Credentials;
use failover::channel::{BlockingConnection, ChannelConfig, Message, Role};
use failover::heartbeat::{self, lease_end, Liveness, PrimaryBeat, SecondaryBeat};
use failover::lockstep::{
    kind, Ack, ChunkTime, ExitTimes, Handover, Header, Live, Repaired, SyncRequest,
};
use recordlog::LogQueue;
use vmm::inputs::Divergence;
use vmm::outputs::{Output, Outputs};

use crate::failover::{decide, Decision, FailoverParams, STOPPED};
use crate::held_audit::{realtime_ns, HeldLatency, ReleaseAudit, Released};

/// Default interval of progress marks (`RecordOptions::progress`), ms:
/// a secondary stays within about this much of its primary.
pub const DEFAULT_PROGRESS_MS: u64 = 2;

/// Largest `LogBytes` chunk.
const MAX_CHUNK: usize = 4 << 20;
/// How long the secondary may take to answer the header.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
pub(crate) struct AckState {
    /// Log bytes the secondary has acknowledged.
    pub(crate) offset: u64,
    /// The secondary is gone (why).
    pub(crate) lost: Option<String>,
    /// Protection ended or never started (`crate::protect`): every output
    /// leaves at once.
    pub(crate) unprotected: bool,
    /// The last acknowledgement, and when it arrived.
    pub(crate) last: Option<(Ack, Instant)>,
    /// Chunks sent and not yet acknowledged: (stream offset they end at,
    /// when they left), oldest first.
    sent: std::collections::VecDeque<(u64, Instant)>,
    /// The last acknowledgement round trip: a chunk's sending to its ack.
    pub(crate) rtt: Option<Duration>,
    /// The exits the primary had reached when chunks left (the highest
    /// exit in each), oldest first: when was the primary where the
    /// secondary is now?
    reached: ExitTimes<Instant>,
    /// How long ago the primary was at the exit the secondary had replayed
    /// when it last acknowledged (its lag in time; the primary's virtual
    /// clock is host time).
    pub(crate) lag: Option<Duration>,
    /// That lag at every acknowledgement.
    pub(crate) lag_samples: crate::lag::LagSamples,
    /// Newest heartbeat stamp the secondary echoed (the release lease).
    echo_us: u64,
    /// The arbiter let us run on alone: everything may leave.
    alone: bool,
    /// The arbiter is being asked.
    deciding: bool,
    /// The secondary acknowledged the whole log including its end: it will
    /// never go live, so the lease no longer matters.
    complete: bool,
    /// Divergences the secondary repaired (its last [`Repaired`] report).
    pub(crate) repaired: u64,
    /// Sync points the secondary asked for (divergences to repair).
    pub(crate) sync_requests: u64,
    /// A switchover is under way: no output is released until it is
    /// decided ([`Acks::freeze_releases`]).
    frozen: bool,
    /// The release thread is releasing an output right now.
    releasing: bool,
    /// The VM was handed over: nothing held here ever leaves (the new
    /// primary produces it).
    handed_over: bool,
    /// The secondary said it runs the VM (a switchover), and when.
    pub(crate) live: Option<(Live, Instant)>,
}

impl AckState {
    /// When the primary first reached (or passed) exit `replayed`, seen
    /// from `now`.
    fn lag_at(&self, replayed: u64, now: Instant) -> Duration {
        // Past every exit sent so far: caught up.
        self.reached
            .at(replayed)
            .map_or(Duration::ZERO, |at| now.saturating_duration_since(at))
    }
}

/// Unacknowledged chunks remembered for the round trip, at most.
const MAX_SENT: usize = 4096;

/// What the secondary has acknowledged (shared by the ack reader, the
/// output release and `tandem status`).
pub(crate) struct Acks {
    st: Mutex<AckState>,
    cond: Condvar,
    /// Last sign of life of the secondary; also the stamp clock.
    life: Liveness,
    /// Outputs released up to this log offset (for heartbeats).
    released: AtomicU64,
    failover: FailoverParams,
    /// The secondary asked for a sync point: the recorder takes one at its
    /// next exit (`LiveInputs::set_sync_requests`).
    pub(crate) sync_wanted: Arc<AtomicBool>,
}

impl Acks {
    /// Nothing acknowledged yet.
    pub(crate) fn new(failover: FailoverParams) -> Acks {
        Acks {
            st: Mutex::new(AckState::default()),
            cond: Condvar::new(),
            life: Liveness::new(),
            released: AtomicU64::new(0),
            failover,
            sync_wanted: Arc::new(AtomicBool::new(false)),
        }
    }

    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, AckState> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The failover settings, and how long the secondary has been silent.
    pub(crate) fn heard(&self) -> (&FailoverParams, Duration) {
        (&self.failover, self.life.silent_for())
    }

    /// The secondary was lost and this primary won the arbiter.
    pub(crate) fn alone(&self) -> bool {
        self.lock().alone
    }

    /// Stop releasing outputs (a switchover): waits for an output being
    /// released now, then returns the log offset up to which outputs
    /// left; nothing after it leaves until [`Acks::thaw_releases`].
    pub(crate) fn freeze_releases(&self) -> u64 {
        let mut st = self.lock();
        st.frozen = true;
        while st.releasing {
            st = self.cond.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        self.released.load(Ordering::SeqCst)
    }

    /// The switchover failed and this primary runs on: releases resume.
    pub(crate) fn thaw_releases(&self) {
        self.lock().frozen = false;
        self.cond.notify_all();
    }

    /// The VM was handed over: what is still held never leaves here.
    pub(crate) fn handed_over(&self) {
        self.lock().handed_over = true;
        self.cond.notify_all();
    }

    /// The release thread may release its next output (false: handed
    /// over, it never leaves); pair with [`Acks::released_one`].
    fn may_release(&self) -> bool {
        let mut st = self.lock();
        while st.frozen && !st.handed_over {
            st = self.cond.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        if st.handed_over {
            return false;
        }
        st.releasing = true;
        true
    }

    fn released_one(&self) {
        self.lock().releasing = false;
        self.cond.notify_all();
    }

    /// No secondary any more by decision: held outputs leave at once.
    pub(crate) fn unprotect(&self) {
        self.lock().unprotected = true;
        self.cond.notify_all();
    }

    /// The secondary's replay diverged at `exit_seq`: a sync point at the
    /// next exit (DESIGN.md rule 5).
    fn sync_requested(&self, req: SyncRequest, who: &str) {
        self.sync_wanted.store(true, Ordering::SeqCst);
        self.lock().sync_requests += 1;
        eprintln!(
            "tandem: the secondary {who} diverged at exit {}: it gets a sync point at the next exit",
            req.exit_seq
        );
    }

    /// The secondary repaired a divergence.
    fn repaired(&self, r: Repaired) {
        let mut st = self.lock();
        st.repaired = st.repaired.max(r.repaired);
    }

    /// An acknowledgement arrived: the round trip of the chunks it covers.
    fn acked(&self, ack: Ack) {
        let mut st = self.lock();
        st.offset = st.offset.max(ack.offset);
        let now = Instant::now();
        st.last = Some((ack, now));
        while let Some(&(end, at)) = st.sent.front() {
            if end > ack.offset {
                break;
            }
            st.rtt = Some(now - at);
            st.sent.pop_front();
        }
        st.reached.forget_behind(ack.replayed);
        let lag = st.lag_at(ack.replayed, now);
        st.lag = Some(lag);
        st.lag_samples.push(lag);
    }

    /// The secondary's lag now: how long ago the primary was where the
    /// secondary last said it was (it grows while no acknowledgement
    /// comes: a stopped secondary falls behind).
    pub(crate) fn lag_now(&self) -> Duration {
        let st = self.lock();
        let replayed = st.last.map_or(0, |(a, _)| a.replayed);
        st.lag_at(replayed, Instant::now())
    }

    /// A chunk ending at stream offset `end` left, its highest exit
    /// `exit`.
    fn sent(&self, end: u64, exit: Option<u64>) {
        let mut st = self.lock();
        let now = Instant::now();
        if st.sent.len() >= MAX_SENT {
            st.sent.pop_front();
        }
        st.sent.push_back((end, now));
        if let Some(exit) = exit {
            st.reached.push(exit, now);
        }
    }

    /// Wait until `offset` is acknowledged (true), the secondary is lost or
    /// `deadline` passed (false). With `lease`: also until the release lease
    /// holds (or we run alone, or the log is complete); a lost secondary
    /// then waits for the arbiter's decision.
    fn wait_for(&self, offset: u64, deadline: Option<Instant>, lease: bool) -> bool {
        let mut st = self.lock();
        loop {
            if st.alone || st.unprotected {
                return true;
            }
            let acked = st.offset >= offset;
            let leased =
                st.complete || self.life.now_us() < lease_end(st.echo_us, &self.failover.timing);
            if acked && (!lease || leased) {
                return true;
            }
            if st.lost.is_some() && !st.deciding && !lease {
                return false;
            }
            // Re-check the lease at least every heartbeat.
            let mut wait = self.failover.timing.interval;
            if let Some(d) = deadline {
                let now = Instant::now();
                if now >= d {
                    return false;
                }
                wait = wait.min(d - now);
            }
            st = self
                .cond
                .wait_timeout(st, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// The secondary is lost (`why`): ask the arbiter, then run on alone or
    /// stop the process (see [`crate::failover`]).
    fn secondary_lost(&self, why: String) {
        {
            let mut st = self.lock();
            if st.complete || st.lost.is_some() {
                st.lost.get_or_insert(why);
                drop(st);
                self.cond.notify_all();
                return;
            }
            st.lost = Some(why.clone());
            st.deciding = true;
        }
        self.cond.notify_all();
        match decide(&self.failover, &why) {
            Decision::Alone => {
                eprintln!(
                    "tandem: the secondary is lost ({why}); this primary won the arbiter and runs on UNPROTECTED, its held outputs released"
                );
                let mut st = self.lock();
                st.alone = true;
                st.deciding = false;
                drop(st);
                self.cond.notify_all();
                if let Some(f) = &self.failover.on_alone {
                    f();
                }
            }
            Decision::Stop(msg) => {
                eprintln!("tandem: {msg}; stopping");
                std::process::exit(STOPPED);
            }
        }
    }
}

/// The connection to the secondary, streaming `queue`.
pub struct Link {
    queue: LogQueue,
    acks: Arc<Acks>,
    sender: Option<JoinHandle<()>>,
    handle: failover::channel::Handle,
    /// Set before [`Link::finish`]: tell the secondary protection ends
    /// by decision (`kind::UNPROTECT` after the log).
    unprotect: Arc<std::sync::atomic::AtomicBool>,
    /// Set before [`Link::finish_handover`]: after the log, hand the VM
    /// over (`kind::HANDOVER` with this released offset).
    handover: Arc<Mutex<Option<u64>>>,
    /// The lag bound ([`Link::govern`]).
    governor: Option<Arc<crate::lag::Governor>>,
    /// `NAME at ADDR` of the secondary.
    pub peer: String,
}

/// Where the secondary is and who we are.
pub struct LinkParams {
    /// The secondary's address.
    pub to: SocketAddr,
    /// The name its certificate must carry.
    pub server_name: String,
    /// This host's cluster credentials.
    pub creds: Credentials,
    /// This host's name (announced in the handshake).
    pub name: String,
    /// Heartbeats, the VM's identity and the arbiter.
    pub failover: FailoverParams,
}

impl Link {
    /// Connect, send `header`, wait for the secondary to accept it, then
    /// start streaming `queue` (which already holds the log's header).
    pub fn connect(p: &LinkParams, header: &Header, queue: LogQueue) -> Result<Link, String> {
        let cfg = ChannelConfig::new(Role::Primary, p.name.clone());
        let mut conn = BlockingConnection::connect(p.to, &p.server_name, &p.creds, &cfg)
            .map_err(|e| format!("connecting to the secondary at {}: {e}", p.to))?;
        let peer = format!("{} at {}", conn.peer().hello.name, conn.peer().addr);
        let bytes = postcard::to_stdvec(header).map_err(|e| e.to_string())?;
        conn.send_frame(kind::HEADER, &bytes)
            .map_err(|e| format!("the secondary {peer}: {e}"))?;
        match conn.recv_frame_timeout(ACCEPT_TIMEOUT) {
            Ok(Some((kind::ACCEPTED, _))) => {}
            Ok(Some((failover::channel::kind::MESSAGE, payload))) => {
                return Err(match postcard::from_bytes::<Message>(&payload) {
                    Ok(Message::Abort { reason }) => {
                        format!("the secondary {peer} refused the VM: {reason}")
                    }
                    Ok(m) => format!("the secondary {peer} answered {m:?}"),
                    Err(e) => format!("the secondary {peer} sent an unreadable message: {e}"),
                })
            }
            Ok(Some((k, _))) => return Err(format!("the secondary {peer} sent frame kind {k}")),
            Ok(None) => {
                return Err(format!(
                    "the secondary {peer} did not answer in {ACCEPT_TIMEOUT:?}"
                ))
            }
            Err(e) => return Err(format!("the secondary {peer}: {e}")),
        }
        Self::start(conn, queue, Arc::new(Acks::new(p.failover.clone())))
    }

    /// The secondary has accepted the VM on `conn`: send it the protection
    /// (VM, generation), then stream `queue` and take its acknowledgements
    /// and heartbeats into `acks`.
    pub(crate) fn start(
        mut conn: BlockingConnection,
        queue: LogQueue,
        acks: Arc<Acks>,
    ) -> Result<Link, String> {
        let peer = format!("{} at {}", conn.peer().hello.name, conn.peer().addr);
        // The secondary's silence counts from now (a seeding took a while).
        acks.life.touch();
        let protection =
            postcard::to_stdvec(&acks.failover.protection).map_err(|e| e.to_string())?;
        conn.send_frame(heartbeat::kind::PROTECTION, &protection)
            .map_err(|e| format!("the secondary {peer}: {e}"))?;
        let (mut tx, mut rx, handle) = conn.split();
        let timing = acks.failover.timing;
        let a = acks.clone();
        let who = peer.clone();
        std::thread::Builder::new()
            .name("lockstep-acks".into())
            .spawn(move || loop {
                match rx.recv_frame_timeout(timing.interval) {
                    Ok(Some((kind::ACK, payload))) => match postcard::from_bytes::<Ack>(&payload) {
                        Ok(ack) => {
                            a.life.touch();
                            a.acked(ack);
                            a.cond.notify_all();
                        }
                        Err(e) => {
                            return a.secondary_lost(format!("unreadable ack from {who}: {e}"))
                        }
                    },
                    Ok(Some((heartbeat::kind::HEARTBEAT, payload))) => {
                        match postcard::from_bytes::<SecondaryBeat>(&payload) {
                            Ok(b) => {
                                a.life.touch();
                                let mut st = a.lock();
                                st.offset = st.offset.max(b.offset);
                                st.echo_us = st.echo_us.max(b.echo_us.min(a.life.now_us()));
                                drop(st);
                                a.cond.notify_all();
                            }
                            Err(e) => {
                                return a.secondary_lost(format!(
                                    "unreadable heartbeat from {who}: {e}"
                                ))
                            }
                        }
                    }
                    Ok(Some((kind::SYNC_REQUEST, payload))) => {
                        match postcard::from_bytes::<SyncRequest>(&payload) {
                            Ok(req) => {
                                a.life.touch();
                                a.sync_requested(req, &who);
                            }
                            Err(e) => {
                                return a.secondary_lost(format!(
                                    "unreadable sync point request from {who}: {e}"
                                ))
                            }
                        }
                    }
                    Ok(Some((kind::LIVE, payload))) => match postcard::from_bytes::<Live>(&payload)
                    {
                        Ok(l) => {
                            a.life.touch();
                            a.lock().live = Some((l, Instant::now()));
                            a.cond.notify_all();
                        }
                        Err(e) => {
                            return a.secondary_lost(format!("unreadable go-live from {who}: {e}"))
                        }
                    },
                    Ok(Some((kind::REPAIRED, payload))) => {
                        match postcard::from_bytes::<Repaired>(&payload) {
                            Ok(r) => {
                                a.life.touch();
                                a.repaired(r);
                            }
                            Err(e) => {
                                return a
                                    .secondary_lost(format!("unreadable repair from {who}: {e}"))
                            }
                        }
                    }
                    Ok(Some((failover::channel::kind::MESSAGE, payload))) => {
                        let why = match postcard::from_bytes::<Message>(&payload) {
                            Ok(Message::Abort { reason }) => {
                                format!("the secondary {who} stopped taking the log: {reason}")
                            }
                            _ => format!("an unexpected message from {who}"),
                        };
                        return a.secondary_lost(why);
                    }
                    Ok(Some((k, _))) => {
                        return a.secondary_lost(format!("frame kind {k} from {who}"))
                    }
                    Ok(None) => {
                        let silent = a.life.silent_for();
                        if silent >= timing.timeout {
                            return a.secondary_lost(format!(
                                "nothing heard from {who} for {} ms",
                                silent.as_millis()
                            ));
                        }
                    }
                    Err(e) => return a.secondary_lost(format!("the secondary {who}: {e}")),
                }
            })
            .map_err(|e| e.to_string())?;
        let q = queue.clone();
        let a = acks.clone();
        let unprotect = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let bye = unprotect.clone();
        let handover = Arc::new(Mutex::new(None::<u64>));
        let hand = handover.clone();
        let sender = std::thread::Builder::new()
            .name("lockstep-out".into())
            .spawn(move || {
                let mut beat_at = Instant::now();
                let mut sending = true;
                let mut offset = 0u64;
                loop {
                    let d = q.wait_drain(MAX_CHUNK, Some(timing.interval));
                    let closed = d.is_none() && q.is_closed();
                    {
                        let st = a.lock();
                        if st.lost.is_some() {
                            // Alone (or stopping): the log goes nowhere.
                            sending = false;
                        }
                        if st.complete {
                            break;
                        }
                    }
                    if !sending {
                        if closed {
                            break;
                        }
                        continue;
                    }
                    if let Some(d) = d {
                        offset += d.bytes.len() as u64;
                        let exit = d.last_exit_seq;
                        if let Err(e) = tx.send_msg(&Message::LogBytes(d.bytes)) {
                            sending = false;
                            a.secondary_lost(format!("sending the log: {e}"));
                            continue;
                        }
                        a.sent(offset, exit);
                        if let Some(exit) = exit {
                            // How far the secondary's log reaches now, in
                            // exits and in our guest time (its own lag).
                            let t = ChunkTime {
                                exit,
                                guest_us: a.life.now_us(),
                            };
                            if let Err(e) = tx.send_frame(kind::CHUNK_TIME, &t.encode()) {
                                sending = false;
                                a.secondary_lost(format!("sending the log: {e}"));
                                continue;
                            }
                        }
                    }
                    if closed && bye.swap(false, Ordering::SeqCst) {
                        // After the whole log: protection ends by decision.
                        let _ = tx.send_frame(kind::UNPROTECT, &[]);
                    }
                    let handing = if closed {
                        hand.lock().unwrap_or_else(|e| e.into_inner()).take()
                    } else {
                        None
                    };
                    if let Some(released) = handing {
                        // After the whole log (its handover end): the
                        // secondary takes the VM on.
                        let b = postcard::to_stdvec(&Handover { released }).unwrap_or_default();
                        let _ = tx.send_frame(kind::HANDOVER, &b);
                    }
                    if beat_at.elapsed() >= timing.interval {
                        beat_at = Instant::now();
                        let beat = PrimaryBeat {
                            stamp_us: a.life.now_us(),
                            released: a.released.load(Ordering::SeqCst),
                        };
                        let bytes = postcard::to_stdvec(&beat).unwrap_or_default();
                        if let Err(e) = tx.send_frame(heartbeat::kind::HEARTBEAT, &bytes) {
                            sending = false;
                            a.secondary_lost(format!("sending a heartbeat: {e}"));
                        }
                    }
                }
                let _ = tx.finish();
            })
            .map_err(|e| e.to_string())?;
        Ok(Link {
            queue,
            acks,
            sender: Some(sender),
            handle,
            unprotect,
            handover,
            governor: None,
            peer,
        })
    }

    /// Slow the vCPU of `throttle` (the run loop's duty cycle) while the
    /// secondary is more than `bound` behind (`crate::lag`).
    pub fn govern(&mut self, throttle: Arc<vmm::throttle::Throttle>, bound: Duration) {
        self.governor = Some(Arc::new(crate::lag::Governor::start(
            self.acks.clone(),
            throttle,
            bound,
        )));
    }

    /// What `tandem status` shows of this protection, with `held`'s
    /// outputs and the primary's exit from `exit` (see
    /// [`crate::record::Recorder::with_exit_gauge`]).
    pub fn status_source(
        &self,
        held: &HeldOutputs,
        exit: Arc<AtomicU64>,
    ) -> crate::status::StatusSource {
        crate::status::StatusSource {
            acks: self.acks.clone(),
            queue: self.queue.clone(),
            governor: self.governor.clone(),
            waiting: held.waiting(),
            exit,
            peer: self.peer.clone(),
            started: Instant::now(),
        }
    }

    /// Set when the secondary asks for a sync point (for
    /// `LiveInputs::set_sync_requests`).
    pub fn sync_requests(&self) -> Arc<AtomicBool> {
        self.acks.sync_wanted.clone()
    }

    /// (divergences the secondary repaired, sync points it asked for).
    pub fn repairs(&self) -> (u64, u64) {
        let st = self.acks.lock();
        (st.repaired, st.sync_requests)
    }

    /// Make [`Link::finish`] tell the secondary that protection ends by
    /// decision, not because the guest ended.
    pub fn ending_protection(&self) {
        self.unprotect.store(true, Ordering::SeqCst);
    }

    /// Outputs held until the secondary has their log entries; released
    /// to `live` by the returned [`Release`], each noted in `audit`.
    pub fn held_outputs(
        &self,
        live: Box<dyn Outputs>,
        audit: ReleaseAudit,
    ) -> Result<(HeldOutputs, Release), String> {
        HeldOutputs::new(self.queue.clone(), self.acks.clone(), live, audit)
    }

    /// After the log's `End` was queued: close the stream and wait (up to
    /// `timeout`) until the secondary has acknowledged all of it. A primary
    /// running alone has nothing to wait for: `Ok(true)`.
    pub fn finish(self, timeout: Duration) -> Result<bool, String> {
        self.finish_with(timeout, None).0
    }

    /// [`Link::finish`] of a log that ends in a handover: after the whole
    /// log, [`Handover`] (outputs released up to `released`, none after);
    /// once it is acknowledged, wait up to `live_within` for the
    /// secondary's [`Live`]. Also the last acknowledgement round trip.
    pub(crate) fn finish_handover(
        self,
        released: u64,
        timeout: Duration,
        live_within: Duration,
    ) -> HandoverEnd {
        *self.handover.lock().unwrap_or_else(|e| e.into_inner()) = Some(released);
        let acks = self.acks.clone();
        let (acked, sent) = self.finish_with(timeout, Some(live_within));
        let st = acks.lock();
        HandoverEnd {
            acked,
            sent,
            live: st.live.clone(),
            rtt: st.rtt,
        }
    }

    fn finish_with(
        mut self,
        timeout: Duration,
        live_within: Option<Duration>,
    ) -> (Result<bool, String>, Option<Instant>) {
        if let Some(g) = self.governor.take() {
            g.stop();
        }
        self.queue.close();
        eprintln!(
            "tandem: heartbeats: longest silence from the secondary {:.1} ms (failover timeout {} ms)",
            self.acks.life.longest_silence().as_secs_f64() * 1e3,
            self.acks.failover.timing.timeout.as_millis()
        );
        let total = self.queue.stats().pushed_bytes;
        let ok = self
            .acks
            .wait_for(total, Some(Instant::now() + timeout), false);
        // Ending protection: the sender says so after the whole log, before
        // the stream ends (it clears the flag once it has).
        let said = Instant::now() + Duration::from_secs(2);
        let saying = |l: &Link| {
            l.unprotect.load(Ordering::SeqCst)
                || l.handover
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .is_some()
        };
        while ok && saying(&self) && Instant::now() < said {
            std::thread::sleep(Duration::from_micros(100));
        }
        let sent = (ok && !saying(&self)).then(Instant::now);
        let (lost, alone) = {
            let mut st = self.acks.lock();
            if st.repaired > 0 || st.sync_requests > 0 {
                eprintln!(
                    "tandem: the secondary repaired {} divergences ({} sync points asked for)",
                    st.repaired, st.sync_requests
                );
            }
            st.complete = ok;
            let lost = st.lost.clone();
            if !ok {
                // The sender stops too.
                st.lost
                    .get_or_insert_with(|| "the end of the log was not acknowledged".into());
            }
            (lost, st.alone)
        };
        self.acks.cond.notify_all();
        if let Some(s) = self.sender.take() {
            let _ = s.join();
        }
        if let (true, Some(within)) = (ok && !alone, live_within) {
            // A handover: the secondary says when it runs the VM.
            let deadline = Instant::now() + within;
            let mut st = self.acks.lock();
            while st.live.is_none() && st.lost.is_none() && Instant::now() < deadline {
                let wait = deadline.saturating_duration_since(Instant::now());
                st = self
                    .acks
                    .cond
                    .wait_timeout(st, wait.min(Duration::from_millis(50)))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }
        self.handle
            .close_now(failover::channel::close_code::NORMAL, "done");
        let r = match (ok, lost) {
            (_, _) if alone => Ok(true),
            (true, _) => Ok(false),
            (false, Some(why)) => Err(why),
            (false, None) => Err(format!(
                "the secondary {} did not acknowledge the end of the log in {timeout:?}",
                self.peer
            )),
        };
        (r, sent)
    }
}

/// How a log that ends in a handover ended ([`Link::finish_handover`]).
pub(crate) struct HandoverEnd {
    /// As [`Link::finish`]'s.
    pub acked: Result<bool, String>,
    /// When the handover left (after the whole log), if it did.
    pub sent: Option<Instant>,
    /// The secondary's go-live, and when it arrived.
    pub live: Option<(Live, Instant)>,
    /// The last acknowledgement round trip.
    pub rtt: Option<Duration>,
}

/// Counters of [`HeldOutputs`].
#[derive(Debug, Clone, Copy, Default)]
pub struct HeldStats {
    /// Outputs released to the world after their acknowledgement.
    pub released: u64,
    /// Outputs still held (not acknowledged when the run ended).
    pub withheld: u64,
    /// Added latency of the released outputs.
    pub latency: HeldLatency,
}

/// The [`Outputs`] of a protected VM (see the module docs).
pub struct HeldOutputs {
    queue: LogQueue,
    tx: Sender<Held>,
    waiting: Arc<Waiting>,
}

/// The outputs waiting for an acknowledgement (for `tandem status`):
/// when each was produced, oldest first.
#[derive(Debug, Default)]
pub(crate) struct Waiting(Mutex<std::collections::VecDeque<Instant>>);

impl Waiting {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::VecDeque<Instant>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// (outputs held, age of the oldest).
    pub(crate) fn now(&self) -> (u64, Option<Duration>) {
        let q = self.lock();
        (q.len() as u64, q.front().map(Instant::elapsed))
    }
}

/// An output waiting for the acknowledgement of `entry_end`.
struct Held {
    entry_end: u64,
    output: Output,
    emitted: Instant,
    emitted_ns: u64,
}

/// The thread that releases held outputs.
pub struct Release(JoinHandle<(HeldStats, Box<dyn Outputs>)>);

impl Release {
    /// After the run, once the [`HeldOutputs`] are dropped: wait until
    /// every output was released (or the secondary was lost).
    pub fn wait(self) -> HeldStats {
        self.wait_outputs().0
    }

    /// [`Release::wait`], and get the live outputs back (`None` if the
    /// release thread failed).
    pub fn wait_outputs(self) -> (HeldStats, Option<Box<dyn Outputs>>) {
        match self.0.join() {
            Ok((stats, live)) => (stats, Some(live)),
            Err(_) => (HeldStats::default(), None),
        }
    }
}

impl HeldOutputs {
    /// The outputs it holds now.
    pub(crate) fn waiting(&self) -> Arc<Waiting> {
        self.waiting.clone()
    }

    pub(crate) fn new(
        queue: LogQueue,
        acks: Arc<Acks>,
        mut live: Box<dyn Outputs>,
        mut audit: ReleaseAudit,
    ) -> Result<(Self, Release), String> {
        let (tx, rx) = unbounded::<Held>();
        let waiting = Arc::new(Waiting::default());
        let w = waiting.clone();
        let releaser = std::thread::Builder::new()
            .name("lockstep-release".into())
            .spawn(move || {
                let mut stats = HeldStats::default();
                for h in rx {
                    if stats.withheld == 0
                        && acks.wait_for(h.entry_end, None, true)
                        && acks.may_release()
                    {
                        let acked = acks.lock().offset;
                        let (exit_seq, kind) = (h.output.exit_seq, h.output.kind);
                        let bytes = h.output.bytes.clone();
                        // Taken before the output leaves: nobody outside
                        // can have it earlier.
                        let released_ns = realtime_ns();
                        let _ = live.emit(h.output);
                        acks.released.fetch_max(h.entry_end, Ordering::SeqCst);
                        acks.released_one();
                        audit.released(&Released {
                            exit_seq,
                            kind,
                            bytes: &bytes,
                            entry_end: h.entry_end,
                            acked,
                            emitted_ns: h.emitted_ns,
                            emitted: h.emitted,
                            released_ns,
                        });
                        stats.released += 1;
                    } else {
                        // Never acknowledged: it never leaves.
                        stats.withheld += 1;
                    }
                    w.lock().pop_front();
                }
                stats.latency = audit.latency();
                (stats, live)
            })
            .map_err(|e| format!("starting the output release thread: {e}"))?;
        Ok((HeldOutputs { queue, tx, waiting }, Release(releaser)))
    }
}

impl Outputs for HeldOutputs {
    fn emit(&mut self, output: Output) -> Result<(), Divergence> {
        // The recorder flushed the output's entry: everything pushed so far
        // must be acknowledged before the output leaves. Its hold counts
        // from when the guest produced it (at its exit, before the entry
        // was logged and flushed, which may have waited for room in the
        // log queue), not from now.
        let emitted = output.produced;
        let emitted_ns = realtime_ns().saturating_sub(emitted.elapsed().as_nanos() as u64);
        self.waiting.lock().push_back(emitted);
        let _ = self.tx.send(Held {
            entry_end: self.queue.stats().pushed_bytes,
            output,
            emitted,
            emitted_ns,
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use failover::heartbeat::{Protection, Timing};
    use vmm::outputs::{LiveOutputs, OutputKind};

    /// The hold of an output counts from when the guest produced it (its
    /// exit), not from when it reached the held outputs after its entry
    /// was logged and flushed.
    #[test]
    fn the_hold_counts_from_the_output_s_exit() {
        let acks = Arc::new(Acks::new(FailoverParams {
            timing: Timing::from_ms(50, 1000).unwrap(),
            protection: Protection {
                vm_id: "00".into(),
                generation: 1,
                heartbeat_ms: 50,
            },
            arbiter: None,
            arbiter_id: None,
            holder: "test".into(),
            on_alone: None,
        }));
        // Released as soon as it comes.
        acks.unprotect();
        let (mut held, release) = HeldOutputs::new(
            LogQueue::new(),
            acks,
            Box::new(LiveOutputs::discard()),
            ReleaseAudit::new(None),
        )
        .unwrap();
        // Produced at an exit 300 ms ago; logging it took that long.
        let produced = Instant::now() - Duration::from_millis(300);
        held.emit(Output {
            exit_seq: 7,
            kind: OutputKind::Console,
            bytes: b"x\n".to_vec(),
            produced,
        })
        .unwrap();
        drop(held);
        let stats = release.wait();
        assert_eq!(stats.released, 1);
        assert!(
            stats.latency.p50 >= Duration::from_millis(300),
            "{:?}",
            stats.latency
        );
    }
}
