//! SIGTERM and SIGINT end a running VM cleanly: the vCPU stops at its next
//! exit or kick (as for a pause), the command finishes its work (a
//! recorder closes its log with a final sync point and an end entry) and
//! the process exits with a status instead of dying by the signal. Before a
//! VM runs (a receiver still waiting for one), the signal ends the process
//! at once with status 128 + its number, and so does a second signal.
//!
//! [`block`] must run before the command spawns any thread, so that every
//! thread inherits the blocked mask and only the waiter thread it starts
//! receives the signals.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};

use vmm::vstate::vcpu::Kicker;

/// The signal that stopped the VM (0: none yet).
static RECEIVED: AtomicI32 = AtomicI32::new(0);

/// What the waiter does when a signal comes: stop this VM.
type Target = Box<dyn Fn() + Send>;

static TARGET: Mutex<Option<Target>> = Mutex::new(None);

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

/// Block SIGTERM and SIGINT in this thread (and the threads it spawns) and
/// start the thread that waits for them.
pub fn block() {
    let s = set();
    // SAFETY: a valid signal set; the old mask is not needed.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &s, std::ptr::null_mut()) };
    let spawned = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let s = set();
            loop {
                let mut sig = 0;
                // SAFETY: `s` is a valid set of signals blocked in this
                // thread (inherited), `sig` a valid out-pointer.
                if unsafe { libc::sigwait(&s, &mut sig) } != 0 {
                    return;
                }
                // A second signal, or one before any VM runs: end now.
                if RECEIVED.swap(sig, Ordering::SeqCst) != 0 {
                    std::process::exit(128 + sig);
                }
                let target = TARGET.lock().unwrap_or_else(|e| e.into_inner());
                match target.as_ref() {
                    Some(stop) => stop(),
                    None => std::process::exit(128 + sig),
                }
            }
        });
    if let Err(e) = spawned {
        eprintln!("tandem: cannot watch for SIGTERM/SIGINT: {e}");
    }
}

/// What [`on_stop`] gives the run: the pause flag for `RunLimits::pause`
/// and a channel that wakes a halted guest's `wait_idle`.
pub struct Stop {
    pub flag: Arc<AtomicBool>,
    pub wakeup: crossbeam_channel::Receiver<()>,
}

/// From now on SIGTERM/SIGINT stop the VM whose vCPU `kicker` kicks.
pub fn on_stop(kicker: Kicker) -> Stop {
    let flag = Arc::new(AtomicBool::new(false));
    let (tx, wakeup) = crossbeam_channel::bounded(1);
    let raised = flag.clone();
    on_stop_call(move || {
        raised.store(true, Ordering::SeqCst);
        let _ = tx.try_send(());
        kicker.kick_now();
    });
    Stop { flag, wakeup }
}

/// From now on SIGTERM/SIGINT call `stop` (a VM run under its control
/// socket: its controller stops the vCPU at its next exit and ends the
/// run as the guest's end, closing a protection's log with its `End`).
/// Without [`block`] first, the signals keep their default action.
pub fn on_stop_call(stop: impl Fn() + Send + 'static) {
    *TARGET.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(stop));
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
