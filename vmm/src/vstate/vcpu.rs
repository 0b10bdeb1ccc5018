//! The one vCPU: KVM vCPU state capture/restore, interrupt injection, kicks
//! and the crash report for exits that end a VM.

use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_debugregs, kvm_interrupt, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::ioctl::ioctl_with_ref;

use crate::GuestMemory;

/// The ioctl numbers (a private module: the macro makes public functions).
mod nr {
    use kvm_bindings::{kvm_interrupt, KVMIO};
    use vmm_sys_util::ioctl_iow_nr;
    // `KVM_INTERRUPT`: inject an external interrupt.
    ioctl_iow_nr!(KVM_INTERRUPT, KVMIO, 0x86, kvm_interrupt);
}
use nr::KVM_INTERRUPT;

/// Errors of the vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("cannot create the vCPU: {0}")]
    /// KVM_CREATE_VCPU failed.
    Create(kvm_ioctls::Error),
    #[error("KVM_SET_CPUID2 failed: {0}")]
    /// KVM_SET_CPUID2 failed.
    Cpuid(kvm_ioctls::Error),
    #[error("KVM_INTERRUPT (vector {vector:#x}) failed: {source}")]
    /// KVM_INTERRUPT failed.
    Interrupt {
        /// The vector.
        vector: u8,
        /// The OS error.
        source: std::io::Error,
    },
    #[error("{what} failed: {source}")]
    /// Reading or setting a piece of vCPU state failed.
    State {
        /// Which ioctl.
        what: &'static str,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
    #[error("vCPU state: {0}")]
    /// A saved vCPU state that cannot be applied.
    Invalid(String),
}

fn st<T>(what: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, VcpuError> {
    r.map_err(|source| VcpuError::State { what, source })
}

/// Everything KVM holds about the vCPU.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VcpuState {
    /// General-purpose registers, RIP, RFLAGS.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// The 4 KiB legacy `kvm_xsave` region (x87, SSE, AVX... state).
    pub xsave: Vec<u32>,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// The saved MSRs.
    pub msrs: Vec<kvm_msr_entry>,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
    /// Pending exceptions, interrupts, NMIs.
    pub events: kvm_vcpu_events,
    /// Runnable or halted.
    pub mp_state: kvm_mp_state,
}

/// The vCPU and the MSR list it saves.
pub struct Vcpu {
    /// The KVM vCPU.
    pub fd: VcpuFd,
    msr_indices: Vec<u32>,
    kicker: Kicker,
    ready_override: Option<bool>,
}

/// A `KVM_GET_MSRS` request for `indices`.
fn msr_request(indices: &[u32]) -> Result<Msrs, VcpuError> {
    let entries: Vec<kvm_msr_entry> = indices
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    Msrs::from_entries(&entries).map_err(|e| VcpuError::Invalid(format!("MSR list: {e:?}")))
}

/// MSRs that must not be saved or restored (host-specific or read-only).
fn msr_excluded(index: u32) -> bool {
    // KVM paravirt MSRs (kvmclock etc.) are hidden from the guest by CPUID.
    (0x4b56_4d00..=0x4b56_4dff).contains(&index) || (0x11..=0x12).contains(&index)
}

impl Vcpu {
    /// Create vCPU 0 with the given CPUID.
    pub fn new(kvm: &Kvm, vm: &VmFd, cpuid: &kvm_bindings::CpuId) -> Result<Self, VcpuError> {
        let fd = vm.create_vcpu(0).map_err(VcpuError::Create)?;
        fd.set_cpuid2(cpuid).map_err(VcpuError::Cpuid)?;
        let list = kvm
            .get_msr_index_list()
            .map_err(|source| VcpuError::State {
                what: "KVM_GET_MSR_INDEX_LIST",
                source,
            })?;
        let mut vcpu = Vcpu {
            fd,
            msr_indices: list
                .as_slice()
                .iter()
                .copied()
                .filter(|&i| !msr_excluded(i))
                .collect(),
            kicker: Kicker::new(),
            ready_override: None,
        };
        vcpu.probe_msrs()?;
        Ok(vcpu)
    }

    /// Keep only the MSRs this host lets us read (KVM stops at the first
    /// failing index and returns how many it read).
    fn probe_msrs(&mut self) -> Result<(), VcpuError> {
        let mut keep = Vec::with_capacity(self.msr_indices.len());
        let mut rest = self.msr_indices.clone();
        while !rest.is_empty() {
            let mut msrs = msr_request(&rest)?;
            let n = st("KVM_GET_MSRS", self.fd.get_msrs(&mut msrs))?;
            keep.extend_from_slice(&rest[..n]);
            rest.drain(..(n + 1).min(rest.len()));
        }
        self.msr_indices = keep;
        Ok(())
    }

    /// Capture the vCPU state. Pending I/O must have been completed first
    /// (see [`Vcpu::complete_pending_io`]).
    pub fn save(&self) -> Result<VcpuState, VcpuError> {
        let mut msrs = msr_request(&self.msr_indices)?;
        let n = st("KVM_GET_MSRS", self.fd.get_msrs(&mut msrs))?;
        if n != self.msr_indices.len() {
            return Err(VcpuError::Invalid(format!(
                "KVM_GET_MSRS read {n} of {} MSRs",
                self.msr_indices.len()
            )));
        }
        Ok(VcpuState {
            regs: st("KVM_GET_REGS", self.fd.get_regs())?,
            sregs: st("KVM_GET_SREGS", self.fd.get_sregs())?,
            xsave: st("KVM_GET_XSAVE", self.fd.get_xsave())?.region.to_vec(),
            xcrs: st("KVM_GET_XCRS", self.fd.get_xcrs())?,
            msrs: msrs.as_slice().to_vec(),
            debug_regs: st("KVM_GET_DEBUGREGS", self.fd.get_debug_regs())?,
            events: st("KVM_GET_VCPU_EVENTS", self.fd.get_vcpu_events())?,
            mp_state: st("KVM_GET_MP_STATE", self.fd.get_mp_state())?,
        })
    }

    /// Overwrite the vCPU state. Pending I/O must have been completed first.
    pub fn restore(&self, s: &VcpuState) -> Result<(), VcpuError> {
        // Order as the kernel documentation and other VMMs do: sregs before
        // regs (mode), xcrs before xsave, events and MSRs last.
        st("KVM_SET_SREGS", self.fd.set_sregs(&s.sregs))?;
        st("KVM_SET_REGS", self.fd.set_regs(&s.regs))?;
        st("KVM_SET_XCRS", self.fd.set_xcrs(&s.xcrs))?;
        let xsave = kvm_xsave {
            region: s.xsave.as_slice().try_into().map_err(|_| {
                VcpuError::Invalid(format!("xsave region of {} words", s.xsave.len()))
            })?,
            extra: kvm_bindings::__IncompleteArrayField::new(),
        };
        // SAFETY: `xsave` is a complete legacy `kvm_xsave` (4 KiB region),
        // exactly what KVM_SET_XSAVE reads.
        st("KVM_SET_XSAVE", unsafe { self.fd.set_xsave(&xsave) })?;
        let msrs = Msrs::from_entries(&s.msrs)
            .map_err(|e| VcpuError::Invalid(format!("MSR list: {e:?}")))?;
        let n = st("KVM_SET_MSRS", self.fd.set_msrs(&msrs))?;
        if n != s.msrs.len() {
            let bad = s.msrs.get(n).map(|e| e.index).unwrap_or(0);
            return Err(VcpuError::Invalid(format!(
                "KVM_SET_MSRS stopped at MSR {bad:#x} ({n} of {})",
                s.msrs.len()
            )));
        }
        st("KVM_SET_DEBUGREGS", self.fd.set_debug_regs(&s.debug_regs))?;
        st("KVM_SET_VCPU_EVENTS", self.fd.set_vcpu_events(&s.events))?;
        st("KVM_SET_MP_STATE", self.fd.set_mp_state(s.mp_state))?;
        Ok(())
    }

    /// Finish an IN or MMIO read that KVM completes only on re-entry, without
    /// running guest code (`KVM_RUN` with `immediate_exit`). Must precede any
    /// capture or overwrite of the vCPU state at an exit (DESIGN.md rule 4).
    pub fn complete_pending_io(&mut self) -> Result<(), VcpuError> {
        self.fd.set_kvm_immediate_exit(1);
        let r = match self.fd.run() {
            Err(e) if e.errno() == libc::EINTR => Ok(()),
            Err(source) => Err(VcpuError::State {
                what: "KVM_RUN (immediate exit)",
                source,
            }),
            Ok(_) => Err(VcpuError::Invalid(
                "KVM_RUN with immediate_exit returned an exit".into(),
            )),
        };
        self.fd.set_kvm_immediate_exit(0);
        r
    }

    /// Inject an external interrupt (`KVM_INTERRUPT`, no in-kernel irqchip).
    pub fn inject(&self, vector: u8) -> Result<(), VcpuError> {
        let irq = kvm_interrupt { irq: vector.into() };
        // SAFETY: KVM_INTERRUPT reads one `kvm_interrupt` from the pointer,
        // which refers to a live local; the fd is a vCPU fd.
        let ret = unsafe { ioctl_with_ref(&self.fd, KVM_INTERRUPT(), &irq) };
        if ret < 0 {
            return Err(VcpuError::Interrupt {
                vector,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Can an interrupt be injected now (IF set, no interrupt shadow)?
    pub fn ready_for_interrupt(&mut self) -> bool {
        if let Some(ready) = self.ready_override.take() {
            return ready;
        }
        let run = self.fd.get_kvm_run();
        run.ready_for_interrupt_injection != 0 && run.if_flag != 0
    }

    /// After a kick or after the state was overwritten, `kvm_run`'s
    /// readiness flags describe a point the other side of a record/replay
    /// pair never saw. Decide readiness from the vCPU state itself (IF set,
    /// no interrupt shadow, nothing already being injected) so that the
    /// recorder and the replayer decide the same.
    pub fn derive_readiness_from_state(&mut self) -> Result<(), VcpuError> {
        let regs = st("KVM_GET_REGS", self.fd.get_regs())?;
        let events = st("KVM_GET_VCPU_EVENTS", self.fd.get_vcpu_events())?;
        let ready = regs.rflags & (1 << 9) != 0
            && events.interrupt.shadow == 0
            && events.interrupt.injected == 0
            && events.exception.injected == 0
            && events.nmi.injected == 0;
        self.ready_override = Some(ready);
        Ok(())
    }

    /// Drop a readiness decided by [`Vcpu::derive_readiness_from_state`]
    /// (before re-entering the guest: it held for that exit only).
    pub fn forget_readiness_override(&mut self) {
        self.ready_override = None;
    }

    /// Was IF set at the last exit?
    pub fn interrupts_enabled(&mut self) -> bool {
        self.fd.get_kvm_run().if_flag != 0
    }

    /// The suberror of the last `KVM_EXIT_INTERNAL_ERROR`.
    pub fn internal_error_suberror(&mut self) -> u32 {
        // SAFETY: only called right after a KVM_EXIT_INTERNAL_ERROR exit,
        // for which the kernel fills the `internal` member of the union.
        unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror }
    }

    /// Ask KVM to exit as soon as the guest can take an interrupt.
    pub fn request_interrupt_window(&mut self, on: bool) {
        self.fd.get_kvm_run().request_interrupt_window = on.into();
    }

    /// The kicker of this vCPU (to stop a guest that does not exit).
    pub fn kicker(&self) -> &Kicker {
        &self.kicker
    }

    /// A human-readable report of the vCPU for a VM that ended abnormally:
    /// RIP, the instruction bytes there, registers.
    pub fn crash_report(&self, mem: &GuestMemory) -> String {
        let mut out = String::new();
        let regs = match self.fd.get_regs() {
            Ok(r) => r,
            Err(e) => return format!("(registers unavailable: {e})"),
        };
        let sregs = self.fd.get_sregs().ok();
        out.push_str(&format!("RIP {:#018x}", regs.rip));
        if let Some(s) = &sregs {
            out.push_str(&format!(
                " (CS {:#06x} base {:#x}, CR0 {:#x}, EFER {:#x})",
                s.cs.selector, s.cs.base, s.cr0, s.efer
            ));
        }
        out.push('\n');
        let linear = sregs.map(|s| s.cs.base + regs.rip).unwrap_or(regs.rip);
        match self.fd.translate_gva(linear) {
            Ok(t) if t.valid != 0 => {
                let mut bytes = [0u8; 16];
                match mem.read_slice(&mut bytes, GuestAddress(t.physical_address)) {
                    Ok(()) => {
                        out.push_str(&format!("instruction bytes at {:#x}:", t.physical_address));
                        for b in bytes {
                            out.push_str(&format!(" {b:02x}"));
                        }
                        out.push('\n');
                    }
                    Err(e) => out.push_str(&format!("instruction bytes unreadable: {e}\n")),
                }
            }
            _ => out.push_str("instruction bytes: RIP does not translate\n"),
        }
        out.push_str(&format!(
            "RAX {:#018x} RBX {:#018x} RCX {:#018x} RDX {:#018x}\n\
             RSI {:#018x} RDI {:#018x} RBP {:#018x} RSP {:#018x}\n\
             R8  {:#018x} R9  {:#018x} R10 {:#018x} R11 {:#018x}\n\
             R12 {:#018x} R13 {:#018x} R14 {:#018x} R15 {:#018x}\n\
             RFLAGS {:#010x}",
            regs.rax,
            regs.rbx,
            regs.rcx,
            regs.rdx,
            regs.rsi,
            regs.rdi,
            regs.rbp,
            regs.rsp,
            regs.r8,
            regs.r9,
            regs.r10,
            regs.r11,
            regs.r12,
            regs.r13,
            regs.r14,
            regs.r15,
            regs.rflags
        ));
        if let Some(s) = sregs {
            out.push_str(&format!(
                "\nCR2 {:#x} CR3 {:#x} CR4 {:#x}",
                s.cr2, s.cr3, s.cr4
            ));
        }
        out
    }

    /// The raw fd, for diagnostics.
    pub fn raw_fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }
}

/// Kicks the vCPU thread out of `KVM_RUN` at a host deadline, with a signal.
///
/// A kick lands at an arbitrary guest instruction: it is not an exit and
/// not a tick of `exit_seq` (DESIGN.md rule 4). The signal is repeated every
/// millisecond until the vCPU thread disarms, so that a signal arriving just
/// before `KVM_RUN` is entered is not lost.
///
/// A deadline may carry a grace ([`Kicker::arm_after`]) counted in CPU time
/// of the vCPU thread, not in wall time: a vCPU thread the host did not
/// schedule could not have exited, so it is not kicked for that (on a
/// loaded host a wall-clock grace kicked guests that exit every few µs).
///
/// Arming and disarming happen around every `KVM_RUN`, so they are a few
/// atomic operations: the timer thread is woken only when a deadline moves
/// earlier than the time it sleeps until.
#[derive(Clone)]
pub struct Kicker {
    inner: Arc<KickerInner>,
}

const NONE: u64 = u64::MAX;

struct KickerInner {
    /// The pthread to signal (0 = none yet).
    thread: AtomicU64,
    /// The CPU-time clock of that thread (`NO_CLOCK`: none).
    cpu_clock: AtomicI32,
    /// Origin of the ns values below.
    base: Instant,
    /// When to kick, ns since `base` (`NONE`: disarmed).
    deadline: AtomicU64,
    /// CPU time (ns) the vCPU thread must run past `deadline` first.
    grace: AtomicU64,
    /// Bumped by every arming, so the timer thread measures each grace
    /// from its own deadline.
    armed: AtomicU64,
    /// When the timer thread wakes next, ns since `base` (0: it is awake).
    sleeping_until: AtomicU64,
    lock: Mutex<()>,
    cond: Condvar,
    kicks: AtomicU64,
    started: AtomicBool,
}

const NO_CLOCK: i32 = i32::MIN;

fn kick_signal() -> i32 {
    libc::SIGRTMIN() + 2
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

static HANDLER: Once = Once::new();

impl Kicker {
    fn new() -> Self {
        HANDLER.call_once(|| {
            // No SA_RESTART: the signal must make KVM_RUN return EINTR.
            let _ = vmm_sys_util::signal::register_signal_handler(kick_signal(), noop_handler);
        });
        Kicker {
            inner: Arc::new(KickerInner {
                thread: AtomicU64::new(0),
                cpu_clock: AtomicI32::new(NO_CLOCK),
                base: Instant::now(),
                deadline: AtomicU64::new(NONE),
                grace: AtomicU64::new(0),
                armed: AtomicU64::new(0),
                sleeping_until: AtomicU64::new(0),
                lock: Mutex::new(()),
                cond: Condvar::new(),
                kicks: AtomicU64::new(0),
                started: AtomicBool::new(false),
            }),
        }
    }

    /// Bind to the calling thread (the vCPU thread) and start the timer
    /// thread on first use.
    pub fn bind_current_thread(&self) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        let mut clock: libc::clockid_t = 0;
        // SAFETY: `me` is the calling thread; `clock` is a valid out pointer.
        let clock = match unsafe { libc::pthread_getcpuclockid(me, &mut clock) } {
            0 => clock,
            _ => NO_CLOCK,
        };
        self.inner.cpu_clock.store(clock, Ordering::SeqCst);
        self.inner.thread.store(me as u64, Ordering::SeqCst);
        if !self.inner.started.swap(true, Ordering::SeqCst) {
            let weak = Arc::downgrade(&self.inner);
            std::thread::Builder::new()
                .name("vcpu-kicker".into())
                .spawn(move || kicker_thread(weak))
                .expect("spawn kicker thread");
        }
    }

    /// Kick the vCPU at `when` (and every millisecond after) until disarmed.
    pub fn arm(&self, when: Instant) {
        self.arm_after(when, Duration::ZERO);
    }

    /// Kick the vCPU once it has run `cpu` of CPU time past `when` without
    /// being disarmed (and every millisecond after, until disarmed).
    pub fn arm_after(&self, when: Instant, cpu: Duration) {
        let at = when.saturating_duration_since(self.inner.base).as_nanos() as u64;
        self.inner
            .grace
            .store(cpu.as_nanos() as u64, Ordering::SeqCst);
        self.inner.armed.fetch_add(1, Ordering::SeqCst);
        self.inner.deadline.store(at, Ordering::SeqCst);
        if at < self.inner.sleeping_until.load(Ordering::SeqCst) {
            let _guard = self.inner.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.inner.cond.notify_one();
        }
    }

    /// Kick the vCPU now (and every millisecond until it disarms): used to
    /// pause a running guest from another thread.
    pub fn kick_now(&self) {
        self.arm(Instant::now());
    }

    /// Stop kicking.
    pub fn disarm(&self) {
        self.inner.deadline.store(NONE, Ordering::SeqCst);
    }

    /// Kicks sent so far.
    pub fn kicks(&self) -> u64 {
        self.inner.kicks.load(Ordering::Relaxed)
    }
}

/// CPU time the thread of `clock` has run (ns), if it can be read.
fn thread_cpu_ns(clock: i32) -> Option<u64> {
    if clock == NO_CLOCK {
        return None;
    }
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out pointer; a clock of a thread that ended
    // makes the call fail, which is handled.
    let r = unsafe { libc::clock_gettime(clock, &mut ts) };
    (r == 0).then(|| ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

fn kicker_thread(weak: std::sync::Weak<KickerInner>) {
    // The arming whose grace is being measured, and the vCPU thread's CPU
    // time when its deadline was seen passed.
    let mut measuring: Option<(u64, u64)> = None;
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let guard = inner.lock.lock().unwrap_or_else(|e| e.into_inner());
        inner.sleeping_until.store(0, Ordering::SeqCst);
        let now = inner.base.elapsed().as_nanos() as u64;
        let deadline = inner.deadline.load(Ordering::SeqCst);
        let armed = inner.armed.load(Ordering::SeqCst);
        let grace = inner.grace.load(Ordering::SeqCst);
        let mut due = deadline != NONE && deadline <= now;
        // Still owed CPU time of its grace (ns), for a due deadline.
        let mut owed = 0;
        if due && grace > 0 {
            match thread_cpu_ns(inner.cpu_clock.load(Ordering::SeqCst)) {
                Some(cpu) => {
                    let from = match measuring {
                        Some((a, from)) if a == armed => from,
                        _ => {
                            measuring = Some((armed, cpu));
                            cpu
                        }
                    };
                    owed = grace.saturating_sub(cpu.saturating_sub(from));
                }
                // No CPU clock: the grace in wall time.
                None => owed = (deadline + grace).saturating_sub(now),
            }
            due = owed == 0;
        }
        if due {
            drop(guard);
            let t = inner.thread.load(Ordering::SeqCst);
            if t != 0 {
                // SAFETY: `t` is the pthread id of the vCPU thread, which
                // outlives the VM (it owns it); the signal has a no-op
                // handler installed.
                unsafe { libc::pthread_kill(t as libc::pthread_t, kick_signal()) };
                inner.kicks.fetch_add(1, Ordering::Relaxed);
            }
            drop(inner);
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        // Wake periodically even when disarmed, so the thread ends soon
        // after the VM is gone; with a grace owed, when it could be run
        // at the earliest (CPU time never runs faster than the wall clock).
        let until = if owed > 0 {
            now + owed
        } else {
            deadline.min(now + 200_000_000)
        };
        inner.sleeping_until.store(until, Ordering::SeqCst);
        let _ = inner
            .cond
            .wait_timeout(guard, Duration::from_nanos(until - now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CPU time the calling thread has run.
    fn own_cpu() -> Duration {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        let mut clock: libc::clockid_t = 0;
        // SAFETY: `me` is the calling thread; `clock` is a valid out pointer.
        assert_eq!(unsafe { libc::pthread_getcpuclockid(me, &mut clock) }, 0);
        Duration::from_nanos(thread_cpu_ns(clock).expect("thread CPU clock"))
    }

    /// The grace is the armed thread's CPU time: a thread that does not run
    /// (here: sleeps) is not kicked however long it waits; one that runs is
    /// kicked once it ran the grace.
    #[test]
    fn a_grace_counts_only_time_the_vcpu_thread_ran() {
        let kicker = Kicker::new();
        kicker.bind_current_thread();
        let grace = Duration::from_millis(20);
        let cpu0 = own_cpu();
        kicker.arm_after(Instant::now(), grace);
        // Sleeping (several graces of wall time) costs almost no CPU time.
        for _ in 0..5 {
            std::thread::sleep(grace);
        }
        if own_cpu() - cpu0 < grace / 2 {
            assert_eq!(kicker.kicks(), 0, "kicked while not running");
        }
        // Running: kicked within a generous failsafe.
        let start = Instant::now();
        while kicker.kicks() == 0 {
            assert!(start.elapsed() < Duration::from_secs(60), "never kicked");
            std::hint::spin_loop();
        }
        assert!(own_cpu() - cpu0 >= grace, "kicked before the grace ran");
        kicker.disarm();
    }
}
