//! SIGTERM and SIGINT end a running VM cleanly: the vCPU stops at its next
//! exit or kick (as for a pause), the command finishes its work (a
//! recorder closes its log with a final sync point and an end entry) and
//! the process exits with a status instead of dying by the signal.
//!
//! [`block`] must run before the command spawns any thread, so that every
//! thread inherits the blocked mask and only the waiter thread of
//! [`on_stop`] receives the signals.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;

use vmm::vstate::vcpu::Kicker;

/// The signal that stopped the VM (0: none yet).
static RECEIVED: AtomicI32 = AtomicI32::new(0);

fn set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill the set in place.
    unsafe {
        let mut s: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut s);
        libc::sigaddset(&mut s, libc::SIGTERM);
        libc::sigaddset(&mut s, libc::SIGINT);
        s
    }
}

/// Block SIGTERM and SIGINT in this thread (and the threads it spawns).
pub fn block() {
    let s = set();
    // SAFETY: a valid signal set; the old mask is not needed.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &s, std::ptr::null_mut()) };
}

/// What [`on_stop`] gives the run: the pause flag for `RunLimits::pause`
/// and a channel that wakes a halted guest's `wait_idle`.
pub struct Stop {
    pub flag: Arc<AtomicBool>,
    pub wakeup: crossbeam_channel::Receiver<()>,
}

/// Wait for SIGTERM/SIGINT on a thread of its own; when one comes, raise
/// the flag, wake the idle wait and kick the vCPU.
pub fn on_stop(kicker: Kicker) -> Stop {
    let flag = Arc::new(AtomicBool::new(false));
    let (tx, wakeup) = crossbeam_channel::bounded(1);
    let f = flag.clone();
    let spawned = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let s = set();
            let mut sig = 0;
            // SAFETY: `s` is a valid set of signals blocked in this thread
            // (inherited), `sig` a valid out-pointer.
            if unsafe { libc::sigwait(&s, &mut sig) } == 0 {
                RECEIVED.store(sig, Ordering::SeqCst);
                f.store(true, Ordering::SeqCst);
                let _ = tx.try_send(());
                kicker.kick_now();
            }
        });
    if let Err(e) = spawned {
        eprintln!("tandem: cannot watch for SIGTERM/SIGINT: {e}");
    }
    Stop { flag, wakeup }
}

/// The name of the signal that stopped the VM, if one did.
pub fn received() -> Option<&'static str> {
    match RECEIVED.load(Ordering::SeqCst) {
        0 => None,
        libc::SIGTERM => Some("SIGTERM"),
        libc::SIGINT => Some("SIGINT"),
        _ => Some("a signal"),
    }
}
