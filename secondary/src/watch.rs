//! The secondary's watch over its primary (issue 10, `docs/failover.md`):
//! the receiving loop of the lockstep stream with heartbeats and failure
//! detection.
//!
//! Every frame from the primary (log bytes, heartbeats) is a sign of life.
//! Each primary heartbeat is answered at once with a
//! [`SecondaryBeat`] echoing its stamp (the primary's release lease), and
//! one is sent every interval anyway. After the failover timeout without a
//! sign of life the primary is lost: the loop ends with
//! [`StreamEnd::Lost`], the received log ends there (the replayer stops at
//! the last exit it covers) and the caller may go live.

use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Mutex;
use std::time::Instant;

use failover::channel::{kind as chan_kind, BlockingConnection, Message};
use failover::heartbeat::{
    kind as hb_kind, Liveness, PrimaryBeat, Protection, SecondaryBeat, Timing,
};
use failover::lockstep::kind;

use crate::migration::abort;

/// What the secondary knows about its primary (shared with the caller).
#[derive(Debug, Default)]
pub struct PrimaryWatch {
    /// Last sign of life.
    pub life: Liveness,
    /// Outputs up to this log offset were released by the primary (its
    /// newest heartbeat said so): those after it are produced again at
    /// go-live.
    pub released: AtomicU64,
    /// The VM and generation, once the primary sent them.
    pub protection: Mutex<Option<Protection>>,
}

/// How the log stream ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEnd {
    /// The primary closed the connection (after the log's end).
    Closed,
    /// The primary is lost: nothing heard for the timeout, or the
    /// connection failed (why).
    Lost(String),
}

/// Receive log chunks until the primary closes or is lost: each is written
/// to `log`, passed on and acknowledged (each acknowledgement noted in
/// `ack_log`, the `--ack-log` audit trail). Returns the log bytes received
/// and how it ended; `Err` for a protocol error (bad frames) or a local
/// failure. Frames on `outgoing` (the replay's repair requests) are sent
/// within a few milliseconds.
pub fn receive(
    conn: &mut BlockingConnection,
    (mut log, mut ack_log): (Option<File>, Option<File>),
    (tx, outgoing): (&Sender<Vec<u8>>, &Receiver<crate::repair::Outgoing>),
    watch: &PrimaryWatch,
    timing: Timing,
    follow: &crate::lockstep::Follow,
) -> Result<(u64, StreamEnd), String> {
    let mut total = 0u64;
    let mut echo = 0u64;
    let mut beat_at = Instant::now();
    // A repair request must not wait for the next frame from the primary.
    let poll = timing.interval.min(std::time::Duration::from_millis(2));
    loop {
        while let Ok((k, payload)) = outgoing.try_recv() {
            if let Err(e) = conn.send_frame(k, &payload) {
                return Ok((total, StreamEnd::Lost(e.to_string())));
            }
            if k == chan_kind::MESSAGE {
                // `repair::refuse`: nothing more is taken from this primary.
                let why = match postcard::from_bytes::<Message>(&payload) {
                    Ok(Message::Abort { reason }) => reason,
                    _ => "refused".into(),
                };
                // Give the Abort a moment to leave before the connection goes.
                std::thread::sleep(std::time::Duration::from_millis(20));
                return Err(format!("this secondary refused the log stream: {why}"));
            }
        }
        let frame = match conn.recv_frame_timeout(poll) {
            Ok(f) => f,
            Err(e) if e.is_closed() => {
                if follow
                    .handed_over_within(std::time::Duration::ZERO)
                    .is_some()
                {
                    // The old primary's stream ends after its handover; it
                    // waits for our go-live: send it before closing.
                    send_live(conn, outgoing);
                }
                return Ok((total, StreamEnd::Closed));
            }
            Err(e) => return Ok((total, StreamEnd::Lost(e.to_string()))),
        };
        let mut answer = false;
        match frame {
            Some((chan_kind::MESSAGE, payload)) => {
                watch.life.touch();
                match postcard::from_bytes::<Message>(&payload) {
                    Ok(Message::LogBytes(b)) => {
                        if let Some(f) = log.as_mut() {
                            f.write_all(&b)
                                .map_err(|e| format!("writing the received log (--log): {e}"))?;
                        }
                        total += b.len() as u64;
                        // The replayer may have stopped (the guest ended):
                        // the log is still kept and acknowledged.
                        let _ = tx.send(b);
                        let ack = follow.ack(total);
                        let replayed = ack.replayed;
                        let ack = postcard::to_stdvec(&ack).map_err(|e| e.to_string())?;
                        // Taken before the ack leaves: the primary cannot
                        // have it earlier than this.
                        let sent_ns = crate::lockstep::realtime_ns();
                        if let Err(e) = conn.send_frame(kind::ACK, &ack) {
                            return Ok((total, StreamEnd::Lost(e.to_string())));
                        }
                        if let Some(f) = ack_log.as_mut() {
                            let line = format!(
                                "{{\"offset\":{total},\"replayed\":{replayed},\"sent_ns\":{sent_ns}}}\n"
                            );
                            f.write_all(line.as_bytes()).map_err(|e| {
                                format!("writing the acknowledgement log (--ack-log): {e}")
                            })?;
                        }
                    }
                    Ok(Message::Abort { reason }) => {
                        return Ok((
                            total,
                            StreamEnd::Lost(format!("the primary aborted: {reason}")),
                        ))
                    }
                    Ok(other) => {
                        let reason = format!("unexpected message in the log stream: {other:?}");
                        abort(conn, &reason);
                        return Err(reason);
                    }
                    Err(e) => {
                        let reason = format!("unreadable message in the log stream: {e}");
                        abort(conn, &reason);
                        return Err(reason);
                    }
                }
            }
            Some((hb_kind::HEARTBEAT, payload)) => {
                watch.life.touch();
                let b: PrimaryBeat = postcard::from_bytes(&payload)
                    .map_err(|e| format!("unreadable heartbeat from the primary: {e}"))?;
                echo = echo.max(b.stamp_us);
                watch.released.fetch_max(b.released, Ordering::SeqCst);
                answer = true;
            }
            Some((hb_kind::PROTECTION, payload)) => {
                watch.life.touch();
                let p: Protection = postcard::from_bytes(&payload)
                    .map_err(|e| format!("unreadable protection identity from the primary: {e}"))?;
                p.check()
                    .map_err(|e| format!("the primary's protection identity: {e}"))?;
                let known = watch.protection.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(k) = known
                    .as_ref()
                    .filter(|k| (&k.vm_id, k.generation) != (&p.vm_id, p.generation))
                {
                    // One stream, one VM: a stream that changes its VM is
                    // another VM's (or garbage), never a reason to follow it.
                    let reason = format!(
                        "the primary named VM {} generation {} at first, now VM {} generation {}: a log stream of another VM",
                        k.vm_id, k.generation, p.vm_id, p.generation
                    );
                    abort(conn, &reason);
                    return Err(reason);
                }
                drop(known);
                if p.heartbeat_ms.saturating_mul(3) > timing.timeout.as_millis() as u64 {
                    eprintln!(
                        "tandem: warning: the primary sends heartbeats every {} ms; this secondary's --failover-timeout-ms {} covers fewer than three",
                        p.heartbeat_ms,
                        timing.timeout.as_millis()
                    );
                }
                *watch.protection.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
            }
            Some((kind::CHUNK_TIME, payload)) => {
                watch.life.touch();
                let checked = failover::lockstep::ChunkTime::decode(&payload)
                    .and_then(|t| follow.chunk_time(t, total));
                if let Err(e) = checked {
                    let reason = format!("a bad chunk time from the primary: {e}");
                    abort(conn, &reason);
                    return Err(reason);
                }
            }
            Some((kind::UNPROTECT, _)) => {
                watch.life.touch();
                follow.set_unprotected();
            }
            Some((kind::HANDOVER, payload)) => {
                watch.life.touch();
                let h: failover::lockstep::Handover = postcard::from_bytes(&payload)
                    .map_err(|e| format!("unreadable handover from the primary: {e}"))?;
                // Exact: the primary releases nothing after this offset.
                watch.released.fetch_max(h.released, Ordering::SeqCst);
                follow.set_handed_over();
            }
            Some((k, _)) => {
                let reason = format!("unexpected frame kind {k} in the log stream");
                abort(conn, &reason);
                return Err(reason);
            }
            None => {
                let silent = watch.life.silent_for();
                if silent >= timing.timeout {
                    return Ok((
                        total,
                        StreamEnd::Lost(format!(
                            "nothing heard from the primary for {} ms",
                            silent.as_millis()
                        )),
                    ));
                }
            }
        }
        if answer || beat_at.elapsed() >= timing.interval {
            beat_at = Instant::now();
            let beat = postcard::to_stdvec(&SecondaryBeat {
                offset: total,
                echo_us: echo,
            })
            .map_err(|e| e.to_string())?;
            if let Err(e) = conn.send_frame(hb_kind::HEARTBEAT, &beat) {
                return Ok((total, StreamEnd::Lost(e.to_string())));
            }
        }
    }
}

/// After a handover: send what the go-live queues for the old primary
/// (its `LIVE`), waiting for it as long as a go-live may take here; the
/// process ends anyway if this side does not go live.
fn send_live(conn: &mut BlockingConnection, outgoing: &Receiver<crate::repair::Outgoing>) {
    loop {
        match outgoing.recv_timeout(std::time::Duration::from_secs(30)) {
            Ok((k, payload)) => {
                if conn.send_frame(k, &payload).is_err() || k == kind::LIVE {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}
