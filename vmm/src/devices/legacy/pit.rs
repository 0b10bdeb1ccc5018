//! Intel 8254 programmable interval timer, plus the PC's port 0x61
//! (system control port B: speaker gate and channel 2 output).
//!
//! * ports 0x40-0x42: channel counters; 0x43: mode/command register;
//! * channel 0 drives IRQ 0, channel 1 (DRAM refresh) is a plain counter,
//!   channel 2's gate is port 0x61 bit 0 and its output reads back on
//!   port 0x61 bit 5.
//!
//! **Time.** The device never reads a clock. Counter values and output
//! levels are pure functions of the programmed state and the virtual time
//! `now_ns` handed in by the run loop through a lazy closure, which is
//! called (at most once per access) only when the answer really depends on
//! time: a counter read or latch of a counting channel, a status read-back
//! of a counting channel, a count write (the counting start time), a gate
//! rising edge that restarts a counter, a port 0x61 read while channel 2
//! counts. Virtual ns convert to input-clock ticks as
//! `ticks = ns * 1_193_182 / 10^9` in `u128`, rounded down; no floats.
//!
//! **IRQ 0.** The device does not raise interrupts by itself. It tells the
//! run loop the virtual time of the next rising edge of channel 0's output
//! ([`Pit::next_irq0_deadline`]); when the run loop sees that time reached
//! it raises IRQ 0 and calls [`Pit::irq0_deadline_reached`]. The k-th edge
//! since the counter was loaded is at tick `k * count` (modes 2 and 3),
//! tick `count` (mode 0) or `count + 1` (mode 4), so its time is
//! `load_ns + ceil(ticks * 10^9 / 1_193_182)`: computed from the start of
//! counting and the number of edges delivered, never accumulated, so it
//! does not drift.
//!
//! **Deviations from a real 8254 (documented, deterministic):**
//! * BCD counting (control word bit 0) is recorded and reported in the
//!   status byte, but counting is always binary.
//! * Channels start unprogrammed (a real 8254's power-on state is
//!   undefined; on a PC the firmware programs it): no IRQ 0 until the guest
//!   programs channel 0.
//! * A new count takes effect at once (the counter restarts) in every
//!   mode, including modes 2 and 3 where the hardware waits for the end of
//!   the current period.
//! * Gate low on channel 2 stops modes 2 and 3 (output high, counter reads
//!   the reload value) and its rising edge restarts them, as on hardware;
//!   in modes 0 and 4 the gate is ignored (counting continues), as in QEMU.
//!   Modes 1 and 5 start counting on a gate rising edge; channel 0's and
//!   channel 1's gates are tied high, so there they never trigger.
//! * Mode 3 with an odd count uses QEMU's approximation
//!   (`count - (2 * ticks) % count`) for the counter value.
//! * Counts of 1 in modes 2 and 3 (illegal on hardware) produce no output
//!   edges and hence no IRQ 0.
//! * Port 0x61 bit 4 (refresh clock toggle) flips on every read, as in
//!   QEMU, instead of following time.

use thiserror::Error;

/// PIT input clock in Hz.
pub const PIT_FREQ_HZ: u64 = 1_193_182;
const NS_PER_SEC: u64 = 1_000_000_000;

/// Access states (QEMU's RW_STATE_*): low byte, high byte, low then high
/// (expecting the low byte), low then high (expecting the high byte).
pub(crate) const RW_LSB: u8 = 1;
pub(crate) const RW_MSB: u8 = 2;
pub(crate) const RW_WORD0: u8 = 3;
pub(crate) const RW_WORD1: u8 = 4;

/// Errors of the PIT (only restoring a corrupted state can fail).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PitError {
    /// A field of a saved channel state is out of range.
    #[error("invalid PIT state: channel {channel}: {what}")]
    InvalidChannel {
        /// Channel index.
        channel: usize,
        /// Which field is wrong.
        what: &'static str,
    },
    /// Port 0x61 holds bits that are not writable.
    #[error("invalid PIT state: port 0x61 value {0:#x}")]
    InvalidPort61(u8),
}

/// Ticks of the PIT clock elapsed in `ns` nanoseconds (rounded down).
pub fn ns_to_ticks(ns: u64) -> u64 {
    (u128::from(ns) * u128::from(PIT_FREQ_HZ) / u128::from(NS_PER_SEC)) as u64
}

/// The first whole nanosecond at which `ticks` ticks have elapsed
/// (`ceil(ticks * 10^9 / f)`), `None` beyond `u64`.
fn ticks_to_ns_ceil(ticks: u128) -> Option<u64> {
    let f = u128::from(PIT_FREQ_HZ);
    let ns = (ticks * u128::from(NS_PER_SEC)).div_ceil(f);
    u64::try_from(ns).ok()
}

/// A lazy clock: calls the closure at most once per device access.
struct Clock<'a> {
    f: &'a mut dyn FnMut() -> u64,
    cached: Option<u64>,
}

impl Clock<'_> {
    fn now(&mut self) -> u64 {
        *self.cached.get_or_insert_with(&mut *self.f)
    }
}

/// One 8254 counter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Channel {
    /// Reload value, 1..=0x10000 (a written 0 means 0x10000).
    pub(crate) count: u32,
    /// Counter mode 0..=5 (6 and 7 are stored as 2 and 3).
    pub(crate) mode: u8,
    /// Access mode from the control word: RW_LSB, RW_MSB or RW_WORD0.
    pub(crate) rw_mode: u8,
    /// Next counter read: RW_LSB..=RW_WORD1.
    pub(crate) read_state: u8,
    /// Next counter write: RW_LSB..=RW_WORD1.
    pub(crate) write_state: u8,
    /// Low byte written in lo/hi mode, waiting for the high byte.
    pub(crate) write_latch: u8,
    /// Latched counter value.
    pub(crate) latched_count: u16,
    /// Latched bytes still to read: 0 (none), RW_LSB, RW_MSB, RW_WORD0.
    pub(crate) count_latched: u8,
    /// A read-back status byte is latched.
    pub(crate) status_latched: bool,
    /// The latched status byte.
    pub(crate) status: u8,
    /// BCD flag of the control word (reported, not used for counting).
    pub(crate) bcd: bool,
    /// Gate input level.
    pub(crate) gate: bool,
    /// A count was written since the last control word.
    pub(crate) loaded: bool,
    /// Modes 1 and 5: a gate rising edge started counting.
    pub(crate) triggered: bool,
    /// Virtual time at which counting (re)started.
    pub(crate) load_ns: u64,
    /// Channel 0: IRQ 0 rising edges delivered since `load_ns`.
    pub(crate) irq_edges: u64,
}

impl Channel {
    fn new(gate: bool) -> Self {
        Channel {
            count: 0x10000,
            mode: 0,
            rw_mode: RW_WORD0,
            read_state: RW_WORD0,
            write_state: RW_WORD0,
            write_latch: 0,
            latched_count: 0,
            count_latched: 0,
            status_latched: false,
            status: 0,
            bcd: false,
            gate,
            loaded: false,
            triggered: false,
            load_ns: 0,
            irq_edges: 0,
        }
    }

    /// Is the counting element running (its value depends on time)?
    fn counting(&self) -> bool {
        self.loaded
            && match self.mode {
                1 | 5 => self.triggered,
                2 | 3 => self.gate,
                _ => true,
            }
    }

    fn elapsed_ticks(&self, now_ns: u64) -> u64 {
        ns_to_ticks(now_ns.saturating_sub(self.load_ns))
    }

    /// Current counter value (16 bits, 0x10000 reads as 0).
    fn get_count(&self, clock: &mut Clock) -> u16 {
        if !self.counting() {
            return self.count as u16;
        }
        let d = self.elapsed_ticks(clock.now());
        let n = u64::from(self.count);
        let v = match self.mode {
            2 => n - d % n,
            3 => n - (d.wrapping_mul(2)) % n,
            _ => n.wrapping_sub(d),
        };
        v as u16
    }

    /// Output level.
    fn get_out(&self, clock: &mut Clock) -> bool {
        if !self.counting() {
            // Mode 0 drives OUT low from the control word on; every other
            // mode drives it high while not counting.
            // (A loaded mode 0 channel is always counting.)
            return self.mode != 0;
        }
        let d = self.elapsed_ticks(clock.now());
        let n = u64::from(self.count);
        match self.mode {
            0 | 1 => d >= n,
            2 => n == 1 || d % n != n - 1,
            3 => d % n < n.div_ceil(2),
            _ => d != n, // 4, 5: low for one clock at terminal count
        }
    }

    /// Tick (since `load_ns`) of the `k`-th (1-based) output rising edge.
    fn edge_tick(&self, k: u64) -> Option<u128> {
        if !self.counting() {
            return None;
        }
        let n = u128::from(self.count);
        match self.mode {
            0 if k == 1 => Some(n),
            4 if k == 1 => Some(n + 1),
            2 | 3 if n > 1 => Some(u128::from(k) * n),
            _ => None,
        }
    }

    fn next_edge_ns(&self) -> Option<u64> {
        let ticks = self.edge_tick(self.irq_edges.checked_add(1)?)?;
        self.load_ns.checked_add(ticks_to_ns_ceil(ticks)?)
    }

    fn latch_count(&mut self, clock: &mut Clock) {
        if self.count_latched == 0 {
            self.latched_count = self.get_count(clock);
            self.count_latched = self.rw_mode;
        }
    }

    fn latch_status(&mut self, clock: &mut Clock) {
        if !self.status_latched {
            let out = self.get_out(clock);
            self.status = (u8::from(out) << 7)
                | (u8::from(!self.loaded) << 6)
                | (self.rw_mode << 4)
                | (self.mode << 1)
                | u8::from(self.bcd);
            self.status_latched = true;
        }
    }

    fn load_count(&mut self, value: u32, clock: &mut Clock) {
        self.count = if value == 0 { 0x10000 } else { value };
        self.loaded = true;
        self.triggered = false;
        self.load_ns = clock.now();
        self.irq_edges = 0;
    }

    fn write_control(&mut self, val: u8) {
        let access = (val >> 4) & 3;
        let mut mode = (val >> 1) & 7;
        if mode >= 6 {
            mode -= 4;
        }
        self.rw_mode = access;
        self.read_state = access;
        self.write_state = access;
        self.mode = mode;
        self.bcd = val & 1 != 0;
        // The counter stops until a new count is written.
        self.loaded = false;
        self.triggered = false;
        self.irq_edges = 0;
        self.count_latched = 0;
        self.status_latched = false;
    }

    fn write_counter(&mut self, val: u8, clock: &mut Clock) {
        match self.write_state {
            RW_MSB => self.load_count(u32::from(val) << 8, clock),
            RW_WORD0 => {
                self.write_latch = val;
                self.write_state = RW_WORD1;
            }
            RW_WORD1 => {
                self.load_count(u32::from(self.write_latch) | (u32::from(val) << 8), clock);
                self.write_state = RW_WORD0;
            }
            _ => self.load_count(u32::from(val), clock),
        }
    }

    fn read_counter(&mut self, clock: &mut Clock) -> u8 {
        if self.status_latched {
            self.status_latched = false;
            return self.status;
        }
        if self.count_latched != 0 {
            let [lo, hi] = self.latched_count.to_le_bytes();
            return match self.count_latched {
                RW_MSB => {
                    self.count_latched = 0;
                    hi
                }
                RW_WORD0 => {
                    self.count_latched = RW_MSB;
                    lo
                }
                _ => {
                    self.count_latched = 0;
                    lo
                }
            };
        }
        let [lo, hi] = self.get_count(clock).to_le_bytes();
        match self.read_state {
            RW_MSB => hi,
            RW_WORD0 => {
                self.read_state = RW_WORD1;
                lo
            }
            RW_WORD1 => {
                self.read_state = RW_WORD0;
                hi
            }
            _ => lo,
        }
    }

    fn set_gate(&mut self, gate: bool, clock: &mut Clock) {
        let rising = gate && !self.gate;
        self.gate = gate;
        if rising && self.loaded {
            match self.mode {
                1 | 5 => {
                    self.triggered = true;
                    self.load_ns = clock.now();
                    self.irq_edges = 0;
                }
                2 | 3 => {
                    self.load_ns = clock.now();
                    self.irq_edges = 0;
                }
                _ => {}
            }
        }
    }

    pub(crate) fn validate(&self, channel: usize) -> Result<(), PitError> {
        let bad = |what| Err(PitError::InvalidChannel { channel, what });
        if !(1..=0x10000).contains(&self.count) {
            return bad("count out of range 1..=0x10000");
        }
        if self.mode > 5 {
            return bad("mode > 5");
        }
        if !(RW_LSB..=RW_WORD0).contains(&self.rw_mode) {
            return bad("access mode out of range");
        }
        if !(RW_LSB..=RW_WORD1).contains(&self.read_state) {
            return bad("read state out of range");
        }
        if !(RW_LSB..=RW_WORD1).contains(&self.write_state) {
            return bad("write state out of range");
        }
        if self.count_latched > RW_WORD0 {
            return bad("latched count state out of range");
        }
        if channel != 2 && !self.gate {
            return bad("gate of channel 0/1 is tied high");
        }
        Ok(())
    }
}

/// The 8254 and port 0x61.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pit {
    pub(crate) channels: [Channel; 3],
    /// Port 0x61 bits 0-3 (bit 0: channel 2 gate, bit 1: speaker data).
    pub(crate) port61: u8,
    /// Port 0x61 bit 4, flipped on each read.
    pub(crate) refresh_toggle: bool,
}

impl Default for Pit {
    fn default() -> Self {
        Self::new()
    }
}

impl Pit {
    /// A PIT with all channels unprogrammed, channel 2's gate low.
    pub fn new() -> Self {
        Pit {
            channels: [Channel::new(true), Channel::new(true), Channel::new(false)],
            port61: 0,
            refresh_toggle: false,
        }
    }

    /// Guest IN from ports 0x40..=0x42 and 0x61 (others read 0xff).
    /// `now_ns` returns virtual time in ns; it is called only when the
    /// answer depends on time, at most once.
    pub fn read(&mut self, port: u16, now_ns: &mut dyn FnMut() -> u64) -> u8 {
        let mut clock = Clock {
            f: now_ns,
            cached: None,
        };
        match port {
            0x40..=0x42 => self.channels[usize::from(port - 0x40)].read_counter(&mut clock),
            0x61 => {
                self.refresh_toggle = !self.refresh_toggle;
                let out2 = self.channels[2].get_out(&mut clock);
                (self.port61 & 0x0f) | (u8::from(self.refresh_toggle) << 4) | (u8::from(out2) << 5)
            }
            _ => 0xff,
        }
    }

    /// Guest OUT to ports 0x40..=0x43 and 0x61 (others ignored).
    /// `now_ns` as for [`Pit::read`].
    pub fn write(&mut self, port: u16, value: u8, now_ns: &mut dyn FnMut() -> u64) {
        let mut clock = Clock {
            f: now_ns,
            cached: None,
        };
        match port {
            0x40..=0x42 => self.channels[usize::from(port - 0x40)].write_counter(value, &mut clock),
            0x43 => {
                let sel = value >> 6;
                if sel == 3 {
                    // Read-back command: bit 5 = 0 latches counts, bit 4 =
                    // 0 latches status, bits 1-3 select the channels.
                    for (i, ch) in self.channels.iter_mut().enumerate() {
                        if value & (2 << i) != 0 {
                            if value & 0x20 == 0 {
                                ch.latch_count(&mut clock);
                            }
                            if value & 0x10 == 0 {
                                ch.latch_status(&mut clock);
                            }
                        }
                    }
                } else {
                    let ch = &mut self.channels[usize::from(sel)];
                    if (value >> 4) & 3 == 0 {
                        ch.latch_count(&mut clock);
                    } else {
                        ch.write_control(value);
                    }
                }
            }
            0x61 => {
                self.port61 = value & 0x0f;
                self.channels[2].set_gate(value & 1 != 0, &mut clock);
            }
            _ => {}
        }
    }

    /// Virtual time (ns) of the next IRQ 0 rising edge, if channel 0 is
    /// counting in a mode that produces one.
    pub fn next_irq0_deadline(&self) -> Option<u64> {
        self.channels[0].next_edge_ns()
    }

    /// The run loop found the deadline reached (and raises IRQ 0): move
    /// channel 0 on to its next edge (periodic modes: the next period,
    /// computed from the start of counting; one-shot modes: none). Does
    /// nothing if there is no deadline.
    pub fn irq0_deadline_reached(&mut self) {
        if self.next_irq0_deadline().is_some() {
            self.channels[0].irq_edges += 1;
        }
    }

    /// Optional coalescing for a run loop that fell far behind: skip every
    /// IRQ 0 edge at or before `now_ns`, so that the next deadline is after
    /// `now_ns`. Returns how many edges were skipped (the caller raises
    /// IRQ 0 once if it is non-zero; the PIC would coalesce them anyway).
    /// `now_ns` must come from `Inputs` (it is a logged input).
    pub fn irq0_catch_up(&mut self, now_ns: u64) -> u64 {
        let ch = &mut self.channels[0];
        if !ch.counting() || now_ns < ch.load_ns {
            return 0;
        }
        let d = ch.elapsed_ticks(now_ns);
        let n = u64::from(ch.count);
        // Number of edges at or before tick d.
        let due = match ch.mode {
            0 => u64::from(d >= n),
            4 => u64::from(d > n),
            2 | 3 if n > 1 => d / n,
            _ => 0,
        };
        let skipped = due.saturating_sub(ch.irq_edges);
        ch.irq_edges = ch.irq_edges.max(due);
        skipped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t: u64) -> impl FnMut() -> u64 {
        move || t
    }

    fn no_clock() -> impl FnMut() -> u64 {
        || panic!("clock must not be read")
    }

    /// Program channel `ch` (mode, lo/hi) with `count` at time `t`.
    fn program(pit: &mut Pit, ch: u8, mode: u8, count: u16, t: u64) {
        pit.write(0x43, (ch << 6) | 0x30 | (mode << 1), &mut no_clock());
        pit.write(0x40 + u16::from(ch), count as u8, &mut no_clock());
        pit.write(0x40 + u16::from(ch), (count >> 8) as u8, &mut at(t));
    }

    fn exact(t0: u64, ticks: u128) -> u64 {
        t0 + (ticks * 1_000_000_000).div_ceil(1_193_182) as u64
    }

    #[test]
    fn tick_conversion() {
        assert_eq!(ns_to_ticks(1_000_000_000), 1_193_182);
        assert_eq!(ns_to_ticks(838), 0);
        assert_eq!(ns_to_ticks(839), 1);
        assert_eq!(
            ns_to_ticks(u64::MAX),
            (u128::from(u64::MAX) * 1_193_182 / 1_000_000_000) as u64
        );
        assert_eq!(ticks_to_ns_ceil(1), Some(839));
        assert_eq!(ticks_to_ns_ceil(1_193_182), Some(1_000_000_000));
    }

    #[test]
    fn mode2_periodic_no_drift() {
        let mut pit = Pit::new();
        assert_eq!(pit.next_irq0_deadline(), None);
        let t0 = 123_456_789;
        program(&mut pit, 0, 2, 1193, t0);
        for k in 1..=1000u128 {
            let d = pit.next_irq0_deadline().unwrap();
            assert_eq!(d, exact(t0, k * 1193));
            // The output really rises there: low one tick before, high at.
            pit.irq0_deadline_reached();
        }
        // 1000 periods of 1193 ticks: 999847.9 µs, rounded up once only.
        assert_eq!(
            pit.next_irq0_deadline().unwrap() - t0,
            exact(0, 1001 * 1193)
        );
    }

    #[test]
    fn mode3_periodic_no_drift_linux_hz100() {
        let mut pit = Pit::new();
        let t0 = 7;
        program(&mut pit, 0, 3, 11932, t0);
        let mut last = t0;
        for k in 1..=1000u128 {
            let d = pit.next_irq0_deadline().unwrap();
            assert_eq!(d, exact(t0, k * 11932));
            assert!(d > last);
            last = d;
            pit.irq0_deadline_reached();
        }
        // 1000 periods = 10.000150891... s, rounded up once, not 1000 times.
        assert_eq!(last - t0, 10_000_150_858);
    }

    #[test]
    fn output_edges_match_deadlines() {
        let mut pit = Pit::new();
        let t0 = 1_000;
        program(&mut pit, 2, 2, 100, t0);
        pit.write(0x61, 0x01, &mut at(t0)); // gate rising edge restarts at t0
        for mode in [2u8, 3] {
            program(&mut pit, 0, mode, 100, t0);
            for _ in 0..5 {
                let d = pit.next_irq0_deadline().unwrap();
                let ch = &pit.channels[0];
                let out_before = ch.get_out(&mut Clock {
                    f: &mut at(d - 1),
                    cached: None,
                });
                let out_at = ch.get_out(&mut Clock {
                    f: &mut at(d),
                    cached: None,
                });
                assert!(
                    !out_before && out_at,
                    "mode {mode}: rising edge at the deadline"
                );
                pit.irq0_deadline_reached();
            }
        }
    }

    #[test]
    fn counter_read_values() {
        let mut pit = Pit::new();
        let t0 = 1_000_000;
        program(&mut pit, 0, 2, 1000, t0);
        let t = |ticks: u128| exact(t0, ticks);
        let read16 = |pit: &mut Pit, now: u64| {
            let lo = pit.read(0x40, &mut at(now));
            let hi = pit.read(0x40, &mut at(now));
            u16::from_le_bytes([lo, hi])
        };
        assert_eq!(read16(&mut pit, t0), 1000);
        assert_eq!(read16(&mut pit, t(250)), 750);
        assert_eq!(read16(&mut pit, t(999)), 1);
        assert_eq!(read16(&mut pit, t(1000)), 1000);
        assert_eq!(read16(&mut pit, t(1001)), 999);
        // Mode 0 counts down through zero and wraps.
        program(&mut pit, 0, 0, 10, t0);
        assert_eq!(read16(&mut pit, t(3)), 7);
        assert_eq!(read16(&mut pit, t(11)), 0xffff);
        // Mode 3 counts by two.
        program(&mut pit, 0, 3, 100, t0);
        assert_eq!(read16(&mut pit, t(10)), 80);
        assert_eq!(read16(&mut pit, t(60)), 80);
    }

    #[test]
    fn latch_command_freezes_value() {
        let mut pit = Pit::new();
        let t0 = 0;
        program(&mut pit, 0, 2, 5000, t0);
        pit.write(0x43, 0x00, &mut at(exact(t0, 1234)));
        // A second latch before reading is ignored.
        pit.write(0x43, 0x00, &mut at(exact(t0, 2000)));
        let lo = pit.read(0x40, &mut no_clock());
        let hi = pit.read(0x40, &mut no_clock());
        assert_eq!(u16::from_le_bytes([lo, hi]), 5000 - 1234);
        // After the latched value is consumed, reads are live again.
        let lo = pit.read(0x40, &mut at(exact(t0, 3000)));
        let hi = pit.read(0x40, &mut at(exact(t0, 3000)));
        assert_eq!(u16::from_le_bytes([lo, hi]), 2000);
    }

    #[test]
    fn lobyte_hibyte_access() {
        let mut pit = Pit::new();
        // LSB only.
        pit.write(0x43, 0x14, &mut no_clock()); // ch0, lsb, mode 2
        pit.write(0x40, 200, &mut at(0));
        assert_eq!(pit.channels[0].count, 200);
        assert_eq!(pit.read(0x40, &mut at(0)), 200);
        assert_eq!(pit.read(0x40, &mut at(exact(0, 50))), 150);
        // MSB only.
        pit.write(0x43, 0x24, &mut no_clock());
        pit.write(0x40, 0x12, &mut at(0));
        assert_eq!(pit.channels[0].count, 0x1200);
        assert_eq!(pit.read(0x40, &mut at(exact(0, 0x100))), 0x11);
        // Lo/hi: the first byte alone does not load (no clock read).
        pit.write(0x43, 0x34, &mut no_clock());
        pit.write(0x40, 0x34, &mut no_clock());
        assert!(!pit.channels[0].loaded);
        pit.write(0x40, 0x12, &mut at(0));
        assert_eq!(pit.channels[0].count, 0x1234);
        // 0 means 65536.
        pit.write(0x40, 0, &mut no_clock());
        pit.write(0x40, 0, &mut at(0));
        assert_eq!(pit.channels[0].count, 0x10000);
        assert_eq!(pit.read(0x40, &mut at(0)), 0);
        assert_eq!(pit.read(0x40, &mut at(0)), 0);
    }

    #[test]
    fn linux_pit_calibration_on_port61() {
        // arch/x86/kernel/tsc.c: pit_calibrate_tsc / quick_pit_calibrate.
        let mut pit = Pit::new();
        let t0 = 50_000;
        let v = pit.read(0x61, &mut no_clock());
        assert_eq!(v & 0x21, 0);
        pit.write(0x61, (v & !0x02) | 0x01, &mut no_clock());
        pit.write(0x43, 0xb0, &mut no_clock()); // ch2, lo/hi, mode 0
        let latch = (1_193_182u32 / (1000 / 50)) as u16; // 50 ms
        pit.write(0x42, latch as u8, &mut no_clock());
        pit.write(0x42, (latch >> 8) as u8, &mut at(t0));
        assert_eq!(pit.read(0x61, &mut at(t0)) & 0x20, 0);
        assert_eq!(pit.read(0x61, &mut at(t0 + 49_000_000)) & 0x20, 0);
        let end = exact(t0, u128::from(latch));
        assert_eq!(pit.read(0x61, &mut at(end - 1)) & 0x20, 0);
        assert_eq!(pit.read(0x61, &mut at(end)) & 0x20, 0x20);
        assert_eq!(pit.read(0x61, &mut at(end + 1_000_000)) & 0x21, 0x21);
        // quick_pit_calibrate reads the MSB with lo/hi reads.
        pit.write(0x43, 0xb0, &mut no_clock());
        pit.write(0x42, 0xff, &mut no_clock());
        pit.write(0x42, 0xff, &mut at(t0));
        pit.read(0x42, &mut at(t0));
        assert_eq!(pit.read(0x42, &mut at(exact(t0, 256 * 3))), 0xfc);
        // Channel 2 never produces an IRQ 0 deadline.
        assert_eq!(pit.next_irq0_deadline(), None);
        // Refresh bit toggles.
        let a = pit.read(0x61, &mut at(t0)) & 0x10;
        let b = pit.read(0x61, &mut at(t0)) & 0x10;
        assert_ne!(a, b);
    }

    #[test]
    fn channel2_gate_modes_2_and_1() {
        let mut pit = Pit::new();
        program(&mut pit, 2, 2, 100, 0);
        // Gate low: stopped, counter at reload, no clock needed.
        assert_eq!(pit.read(0x42, &mut no_clock()), 100);
        assert_eq!(pit.read(0x42, &mut no_clock()), 0);
        assert_eq!(pit.read(0x61, &mut no_clock()) & 0x20, 0x20);
        pit.write(0x61, 0x01, &mut at(1_000_000));
        assert_eq!(pit.read(0x42, &mut at(exact(1_000_000, 10))), 90);
        assert_eq!(pit.read(0x42, &mut at(exact(1_000_000, 10))), 0);
        // Mode 1: waits for a gate edge.
        pit.write(0x61, 0x00, &mut no_clock());
        program(&mut pit, 2, 1, 100, 0);
        assert_eq!(pit.read(0x61, &mut no_clock()) & 0x20, 0x20);
        pit.write(0x61, 0x01, &mut at(5_000));
        assert_eq!(pit.read(0x61, &mut at(5_000)) & 0x20, 0);
        assert_eq!(pit.read(0x61, &mut at(exact(5_000, 100))) & 0x20, 0x20);
    }

    #[test]
    fn one_shot_modes_0_and_4() {
        let mut pit = Pit::new();
        program(&mut pit, 0, 0, 1000, 10);
        assert_eq!(pit.next_irq0_deadline(), Some(exact(10, 1000)));
        pit.irq0_deadline_reached();
        assert_eq!(pit.next_irq0_deadline(), None);
        pit.irq0_deadline_reached();
        assert_eq!(pit.next_irq0_deadline(), None);
        // Linux's oneshot clockevent: 0x38 (mode 4), then lo/hi.
        pit.write(0x43, 0x38, &mut no_clock());
        assert_eq!(
            pit.next_irq0_deadline(),
            None,
            "control word stops counting"
        );
        pit.write(0x40, 0xe8, &mut no_clock());
        pit.write(0x40, 0x03, &mut at(20));
        assert_eq!(pit.next_irq0_deadline(), Some(exact(20, 1001)));
        pit.irq0_deadline_reached();
        assert_eq!(pit.next_irq0_deadline(), None);
        // Re-arming restarts.
        pit.write(0x40, 0x0a, &mut no_clock());
        pit.write(0x40, 0x00, &mut at(30));
        assert_eq!(pit.next_irq0_deadline(), Some(exact(30, 11)));
        // Modes 1 and 5 on channel 0 never trigger.
        program(&mut pit, 0, 1, 100, 0);
        assert_eq!(pit.next_irq0_deadline(), None);
        program(&mut pit, 0, 5, 100, 0);
        assert_eq!(pit.next_irq0_deadline(), None);
    }

    #[test]
    fn catch_up_skips_missed_periods() {
        let mut pit = Pit::new();
        assert_eq!(pit.irq0_catch_up(1_000_000), 0);
        program(&mut pit, 0, 2, 1193, 0);
        let d3 = exact(0, 3 * 1193);
        assert_eq!(pit.irq0_catch_up(d3 - 1), 2);
        assert_eq!(pit.next_irq0_deadline(), Some(d3));
        assert_eq!(pit.irq0_catch_up(d3), 1);
        assert_eq!(pit.next_irq0_deadline(), Some(exact(0, 4 * 1193)));
        assert_eq!(pit.irq0_catch_up(d3), 0);
        let far = 10_000_000_000;
        pit.irq0_catch_up(far);
        let next = pit.next_irq0_deadline().unwrap();
        assert!(next > far && next - far <= 1_000_000);
        // One-shot.
        program(&mut pit, 0, 4, 100, 0);
        assert_eq!(pit.irq0_catch_up(exact(0, 100)), 0);
        assert_eq!(pit.irq0_catch_up(exact(0, 101)), 1);
        assert_eq!(pit.next_irq0_deadline(), None);
    }

    #[test]
    fn read_back_command() {
        let mut pit = Pit::new();
        program(&mut pit, 0, 2, 1000, 0);
        // Unprogrammed channel 1: status without the clock; null count set.
        pit.write(0x43, 0xe4, &mut no_clock()); // read-back status, ch1
        assert_eq!(pit.read(0x41, &mut no_clock()), 0x40 | (3 << 4));
        // Count and status of channel 0.
        pit.write(0x43, 0xc2, &mut at(exact(0, 300)));
        assert_eq!(pit.read(0x40, &mut no_clock()), 0x80 | (3 << 4) | (2 << 1));
        let lo = pit.read(0x40, &mut no_clock());
        let hi = pit.read(0x40, &mut no_clock());
        assert_eq!(u16::from_le_bytes([lo, hi]), 700);
        // Mode 6/7 alias 2/3; BCD recorded.
        pit.write(0x43, 0x7d, &mut no_clock()); // ch1, lo/hi, mode 6, bcd
        assert_eq!(pit.channels[1].mode, 2);
        assert!(pit.channels[1].bcd);
    }

    #[test]
    fn clock_called_at_most_once_and_only_when_needed() {
        let mut pit = Pit::new();
        let calls = std::cell::Cell::new(0);
        let mut c = || {
            calls.set(calls.get() + 1);
            42
        };
        pit.write(0x43, 0x34, &mut c);
        pit.write(0x40, 1, &mut c);
        assert_eq!(calls.get(), 0);
        pit.write(0x40, 1, &mut c);
        assert_eq!(calls.get(), 1);
        pit.write(0x43, 0xc2, &mut c); // count + status latch: one call
        assert_eq!(calls.get(), 2);
        assert_eq!(pit.read(0x43, &mut no_clock()), 0xff);
    }
}
