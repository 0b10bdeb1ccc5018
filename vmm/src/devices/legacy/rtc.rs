//! Motorola MC146818 real-time clock and CMOS memory, ports 0x70 (index,
//! bit 7 = NMI disable) and 0x71 (data).
//!
//! **Time.** The device never reads a clock. The time registers (0, 2, 4,
//! 6, 7, 8, 9 and the century at 0x32) and register A's UIP bit are derived
//! from the wall-clock time (ns since the Unix epoch) that the run loop
//! hands in through a lazy closure, called only for a read that depends on
//! it. The guest's clock is `wall + offset_ns`; the offset starts at 0 and
//! changes when the guest sets the clock, so the time it set keeps
//! advancing.
//!
//! **Setting the clock.** As on the chip, the guest sets register B's SET
//! bit, writes the time registers, and clears SET. The new time takes
//! effect (offset = set time − wall time, on a whole second) when SET is
//! cleared — or, as [`Rtc::write`] has no clock argument, at the next
//! time-dependent read if the run loop used `write`; [`Rtc::write_timed`]
//! applies it at once. A time register written while SET is clear sets
//! the clock the same way. Time registers not written keep the value of the
//! last time the guest read the clock (or of the moment SET was set, with
//! `write_timed`). The day of the week is always computed from the date
//! (a written value is ignored once the clock runs).
//!
//! **Formats.** BCD or binary (register B bit 2) and 12/24-hour (bit 1,
//! PM = bit 7 of the hours) apply to reads and writes; the century register
//! follows the BCD/binary setting (as QEMU).
//!
//! **Register A.** UIP (bit 7) is set during the last 244 µs of each
//! second of guest time, and is 0 while SET is set. The divider and rate
//! bits are stored but do not stop the clock.
//!
//! **Not modelled (documented):** periodic, alarm and update-ended
//! interrupts (IRQ 8 is never raised; register C always reads 0), daylight
//! saving (register B bit 0), square wave output.
//!
//! **CMOS memory** (128 bytes, index & 0x7f) holds the memory size bytes as
//! QEMU's `pc_cmos_init` writes them: 0x15/0x16 base memory in KiB (≤ 640),
//! 0x17/0x18 and 0x30/0x31 memory above 1 MiB in KiB (≤ 0xffff), 0x34/0x35
//! memory between 16 MiB and 4 GiB in 64 KiB units (≤ 0xffff), 0x5b-0x5d
//! memory above 4 GiB in 64 KiB units. Other bytes are plain storage.

use thiserror::Error;

/// Size of the CMOS memory (registers included).
pub const CMOS_SIZE: usize = 128;

pub(crate) const REG_SECONDS: u8 = 0x00;
pub(crate) const REG_MINUTES: u8 = 0x02;
pub(crate) const REG_HOURS: u8 = 0x04;
pub(crate) const REG_WEEKDAY: u8 = 0x06;
pub(crate) const REG_DAY: u8 = 0x07;
pub(crate) const REG_MONTH: u8 = 0x08;
pub(crate) const REG_YEAR: u8 = 0x09;
pub(crate) const REG_A: u8 = 0x0a;
pub(crate) const REG_B: u8 = 0x0b;
pub(crate) const REG_C: u8 = 0x0c;
pub(crate) const REG_D: u8 = 0x0d;
pub(crate) const REG_CENTURY: u8 = 0x32;

const REG_A_UIP: u8 = 0x80;
const REG_B_SET: u8 = 0x80;
const REG_B_UIE: u8 = 0x10;
const REG_B_DM_BINARY: u8 = 0x04;
const REG_B_24H: u8 = 0x02;
const REG_D_VRT: u8 = 0x80;

const NS_PER_SEC: i128 = 1_000_000_000;
/// UIP is set this long before each second boundary.
const UIP_NS: i128 = 244_000;

/// Errors of the RTC (only restoring a corrupted state can fail).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RtcError {
    /// The CMOS image does not have 128 bytes.
    #[error("invalid RTC state: CMOS image of {0} bytes, expected 128")]
    CmosSize(usize),
    /// The index register is out of range.
    #[error("invalid RTC state: index {0:#x} out of range")]
    Index(u8),
}

fn is_time_reg(reg: u8) -> bool {
    matches!(
        reg,
        REG_SECONDS
            | REG_MINUTES
            | REG_HOURS
            | REG_WEEKDAY
            | REG_DAY
            | REG_MONTH
            | REG_YEAR
            | REG_CENTURY
    )
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// (year, month 1-12, day 1-31) of a day number since 1970-01-01.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// The RTC and CMOS memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rtc {
    /// CMOS bytes; the time registers hold the last snapshot or the values
    /// the guest wrote while setting the clock.
    pub(crate) cmos: [u8; CMOS_SIZE],
    /// Selected register (0..128).
    pub(crate) index: u8,
    /// Port 0x70 bit 7 (NMI disabled); recorded only.
    pub(crate) nmi_disabled: bool,
    /// Guest time − wall time, in ns.
    pub(crate) offset_ns: i64,
    /// The guest set the clock; the offset is computed from the time
    /// registers at the next clock-dependent access.
    pub(crate) set_pending: bool,
}

impl Rtc {
    /// An RTC in 24-hour BCD mode showing wall-clock time, with the memory
    /// size bytes for `mem_below_4g` and `mem_above_4g` bytes of RAM.
    pub fn new(mem_below_4g: u64, mem_above_4g: u64) -> Self {
        const KIB: u64 = 1024;
        const MIB: u64 = 1024 * KIB;
        let mut cmos = [0u8; CMOS_SIZE];
        cmos[usize::from(REG_A)] = 0x26;
        cmos[usize::from(REG_B)] = REG_B_24H;
        cmos[usize::from(REG_D)] = REG_D_VRT;
        let base = (mem_below_4g / KIB).min(640);
        cmos[0x15] = base as u8;
        cmos[0x16] = (base >> 8) as u8;
        let ext = (mem_below_4g.saturating_sub(MIB) / KIB).min(0xffff);
        cmos[0x17] = ext as u8;
        cmos[0x18] = (ext >> 8) as u8;
        cmos[0x30] = ext as u8;
        cmos[0x31] = (ext >> 8) as u8;
        let above16 = (mem_below_4g.saturating_sub(16 * MIB) / (64 * KIB)).min(0xffff);
        cmos[0x34] = above16 as u8;
        cmos[0x35] = (above16 >> 8) as u8;
        let above4g = mem_above_4g / (64 * KIB);
        cmos[0x5b] = above4g as u8;
        cmos[0x5c] = (above4g >> 8) as u8;
        cmos[0x5d] = (above4g >> 16) as u8;
        let mut rtc = Rtc {
            cmos,
            index: 0,
            nmi_disabled: false,
            offset_ns: 0,
            set_pending: false,
        };
        // Sensible stored fields (1970-01-01) until the first snapshot.
        rtc.store_time(0);
        rtc
    }

    /// Is NMI delivery disabled (port 0x70 bit 7)? The run loop may use it
    /// if it ever injects NMIs.
    pub fn nmi_disabled(&self) -> bool {
        self.nmi_disabled
    }

    fn reg_b(&self) -> u8 {
        self.cmos[usize::from(REG_B)]
    }

    fn set_mode(&self) -> bool {
        self.reg_b() & REG_B_SET != 0
    }

    fn encode(&self, v: u8) -> u8 {
        if self.reg_b() & REG_B_DM_BINARY != 0 {
            v
        } else {
            ((v / 10) << 4) | (v % 10)
        }
    }

    fn decode(&self, v: u8) -> i64 {
        if self.reg_b() & REG_B_DM_BINARY != 0 {
            i64::from(v)
        } else {
            i64::from(v >> 4) * 10 + i64::from(v & 0x0f)
        }
    }

    /// Guest time in ns since the epoch for wall time `wall`.
    fn guest_ns(&self, wall: u64) -> i128 {
        i128::from(wall) + i128::from(self.offset_ns)
    }

    /// Write the broken-down time `guest_ns` into the time registers.
    fn store_time(&mut self, guest_ns: i128) {
        let secs = guest_ns.div_euclid(NS_PER_SEC);
        let secs = i64::try_from(secs).unwrap_or(0);
        let days = secs.div_euclid(86_400);
        let sod = secs.rem_euclid(86_400);
        let (year, month, day) = civil_from_days(days);
        let hour = (sod / 3600) as u8;
        let hours_reg = if self.reg_b() & REG_B_24H != 0 {
            self.encode(hour)
        } else {
            let h12 = match hour % 12 {
                0 => 12,
                h => h,
            };
            self.encode(h12) | if hour >= 12 { 0x80 } else { 0 }
        };
        let weekday = (days + 4).rem_euclid(7) as u8 + 1; // Sunday = 1
        let year = year.clamp(0, 9999);
        let values = [
            (REG_SECONDS, self.encode((sod % 60) as u8)),
            (REG_MINUTES, self.encode((sod / 60 % 60) as u8)),
            (REG_HOURS, hours_reg),
            (REG_WEEKDAY, self.encode(weekday)),
            (REG_DAY, self.encode(day as u8)),
            (REG_MONTH, self.encode(month as u8)),
            (REG_YEAR, self.encode((year % 100) as u8)),
            (REG_CENTURY, self.encode((year / 100) as u8)),
        ];
        for (reg, v) in values {
            self.cmos[usize::from(reg)] = v;
        }
    }

    /// Seconds since the epoch encoded in the time registers (garbage in
    /// the registers gives a garbage but well-defined time, never a panic).
    fn stored_time_secs(&self) -> i64 {
        let reg = |r: u8| self.cmos[usize::from(r)];
        let sec = self.decode(reg(REG_SECONDS)).min(59);
        let min = self.decode(reg(REG_MINUTES)).min(59);
        let hours = reg(REG_HOURS);
        let hour = if self.reg_b() & REG_B_24H != 0 {
            self.decode(hours).min(23)
        } else {
            let pm = hours & 0x80 != 0;
            self.decode(hours & 0x7f).min(12) % 12 + if pm { 12 } else { 0 }
        };
        let day = self.decode(reg(REG_DAY)).clamp(1, 31);
        let month = self.decode(reg(REG_MONTH)).clamp(1, 12);
        let year = self.decode(reg(REG_CENTURY)).min(99) * 100 + self.decode(reg(REG_YEAR)).min(99);
        days_from_civil(year, month, day) * 86_400 + hour * 3600 + min * 60 + sec
    }

    /// Apply a pending clock setting at wall time `wall`.
    fn resolve(&mut self, wall: u64) {
        if self.set_pending {
            let target = i128::from(self.stored_time_secs()) * NS_PER_SEC;
            let off = target - i128::from(wall);
            self.offset_ns = off.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64;
            self.set_pending = false;
        }
    }

    /// Guest IN from port 0x70 (reads 0xff) or 0x71 (the selected
    /// register). `wall_ns` (wall-clock ns since the Unix epoch) is called
    /// only for time registers and register A while the clock runs.
    pub fn read(&mut self, port: u16, wall_ns: &mut dyn FnMut() -> u64) -> u8 {
        if port != 0x71 {
            return 0xff;
        }
        let reg = self.index;
        match reg {
            REG_C => 0,
            REG_D => REG_D_VRT,
            REG_A if self.set_mode() => self.cmos[usize::from(REG_A)] & !REG_A_UIP,
            REG_A => {
                let wall = wall_ns();
                self.resolve(wall);
                let sub = self.guest_ns(wall).rem_euclid(NS_PER_SEC);
                let uip = if sub >= NS_PER_SEC - UIP_NS {
                    REG_A_UIP
                } else {
                    0
                };
                (self.cmos[usize::from(REG_A)] & !REG_A_UIP) | uip
            }
            r if is_time_reg(r) && !self.set_mode() => {
                let wall = wall_ns();
                self.resolve(wall);
                self.store_time(self.guest_ns(wall));
                self.cmos[usize::from(r)]
            }
            r => self.cmos[usize::from(r)],
        }
    }

    /// Guest OUT to port 0x70 or 0x71 (others ignored). A clock setting
    /// takes effect at the next time-dependent read; see
    /// [`Rtc::write_timed`].
    pub fn write(&mut self, port: u16, value: u8) {
        self.write_inner(port, value);
    }

    /// As [`Rtc::write`], but applies a clock setting at once: `wall_ns`
    /// is called only when this write ends setting the clock (or starts
    /// it: SET rising, to snapshot the current time).
    pub fn write_timed(&mut self, port: u16, value: u8, wall_ns: &mut dyn FnMut() -> u64) {
        let set_before = self.set_mode();
        self.write_inner(port, value);
        let set_rising = !set_before && self.set_mode();
        if set_rising || self.set_pending {
            let wall = wall_ns();
            self.resolve(wall);
            if set_rising {
                self.store_time(self.guest_ns(wall));
            }
        }
    }

    fn write_inner(&mut self, port: u16, value: u8) {
        match port {
            0x70 => {
                self.index = value & 0x7f;
                self.nmi_disabled = value & 0x80 != 0;
            }
            0x71 => match self.index {
                REG_A => self.cmos[usize::from(REG_A)] = value & !REG_A_UIP,
                REG_B => {
                    let was_set = self.set_mode();
                    let mut value = value;
                    if value & REG_B_SET != 0 {
                        // Setting SET clears UIE.
                        value &= !REG_B_UIE;
                    }
                    self.cmos[usize::from(REG_B)] = value;
                    if was_set && value & REG_B_SET == 0 {
                        self.set_pending = true;
                    }
                }
                REG_C | REG_D => {}
                r => {
                    self.cmos[usize::from(r)] = value;
                    if is_time_reg(r) && r != REG_WEEKDAY && !self.set_mode() {
                        self.set_pending = true;
                    }
                }
            },
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NS: u64 = 1_000_000_000;
    // 2024-02-29 13:45:07 UTC, a Thursday.
    const T: u64 = 1_709_214_307;

    fn at(t: u64) -> impl FnMut() -> u64 {
        move || t
    }

    fn no_clock() -> impl FnMut() -> u64 {
        || panic!("clock must not be read")
    }

    fn reg(rtc: &mut Rtc, r: u8, wall: u64) -> u8 {
        rtc.write(0x70, r);
        rtc.read(0x71, &mut at(wall))
    }

    fn set_reg(rtc: &mut Rtc, r: u8, v: u8) {
        rtc.write(0x70, r);
        rtc.write(0x71, v);
    }

    #[test]
    fn calendar_roundtrip() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2024, 2, 29), 19_782);
        for z in [-800_000i64, -1, 0, 1, 11_016, 19_782, 30_000, 2_000_000] {
            let (y, m, d) = civil_from_days(z);
            assert_eq!(days_from_civil(y, m, d), z);
        }
    }

    #[test]
    fn bcd_24h() {
        let mut rtc = Rtc::new(0, 0);
        let w = T * NS + 500_000_000;
        assert_eq!(reg(&mut rtc, REG_SECONDS, w), 0x07);
        assert_eq!(reg(&mut rtc, REG_MINUTES, w), 0x45);
        assert_eq!(reg(&mut rtc, REG_HOURS, w), 0x13);
        assert_eq!(reg(&mut rtc, REG_WEEKDAY, w), 5);
        assert_eq!(reg(&mut rtc, REG_DAY, w), 0x29);
        assert_eq!(reg(&mut rtc, REG_MONTH, w), 0x02);
        assert_eq!(reg(&mut rtc, REG_YEAR, w), 0x24);
        assert_eq!(reg(&mut rtc, REG_CENTURY, w), 0x20);
    }

    #[test]
    fn binary_and_12h() {
        let mut rtc = Rtc::new(0, 0);
        set_reg(&mut rtc, REG_B, REG_B_DM_BINARY | REG_B_24H);
        let w = T * NS;
        assert_eq!(reg(&mut rtc, REG_SECONDS, w), 7);
        assert_eq!(reg(&mut rtc, REG_MINUTES, w), 45);
        assert_eq!(reg(&mut rtc, REG_HOURS, w), 13);
        assert_eq!(reg(&mut rtc, REG_YEAR, w), 24);
        assert_eq!(reg(&mut rtc, REG_CENTURY, w), 20);
        // 12-hour BCD.
        set_reg(&mut rtc, REG_B, 0);
        assert_eq!(reg(&mut rtc, REG_HOURS, w), 0x81);
        let midnight = (T - 13 * 3600 - 45 * 60 - 7) * NS;
        assert_eq!(reg(&mut rtc, REG_HOURS, midnight), 0x12);
        assert_eq!(reg(&mut rtc, REG_HOURS, midnight + 12 * 3600 * NS), 0x92);
        assert_eq!(reg(&mut rtc, REG_HOURS, midnight + 11 * 3600 * NS), 0x11);
        // 12-hour binary.
        set_reg(&mut rtc, REG_B, REG_B_DM_BINARY);
        assert_eq!(reg(&mut rtc, REG_HOURS, w), 0x81);
        assert_eq!(
            reg(&mut rtc, REG_HOURS, midnight + 23 * 3600 * NS),
            0x80 | 11
        );
    }

    #[test]
    fn uip_last_244us() {
        let mut rtc = Rtc::new(0, 0);
        let s = T * NS;
        assert_eq!(reg(&mut rtc, REG_A, s), 0x26);
        assert_eq!(reg(&mut rtc, REG_A, s + 500_000_000), 0x26);
        assert_eq!(reg(&mut rtc, REG_A, s + NS - 244_001), 0x26);
        assert_eq!(reg(&mut rtc, REG_A, s + NS - 244_000), 0xa6);
        assert_eq!(reg(&mut rtc, REG_A, s + NS - 1), 0xa6);
        // SET: UIP clear, no clock.
        set_reg(&mut rtc, REG_B, REG_B_SET | REG_B_24H | REG_B_UIE);
        assert_eq!(rtc.cmos[usize::from(REG_B)] & REG_B_UIE, 0);
        rtc.write(0x70, REG_A);
        assert_eq!(rtc.read(0x71, &mut no_clock()), 0x26);
        // Writes cannot set UIP.
        rtc.write(0x71, 0xa6);
        assert_eq!(rtc.read(0x71, &mut no_clock()), 0x26);
    }

    #[test]
    fn status_and_memory_without_clock() {
        let mut rtc = Rtc::new(512 << 20, 1 << 30);
        let mut r = |i: u8| {
            rtc.write(0x70, i);
            rtc.read(0x71, &mut no_clock())
        };
        assert_eq!(r(REG_B), 0x02);
        assert_eq!(r(REG_C), 0);
        assert_eq!(r(REG_D), 0x80);
        assert_eq!((r(0x15), r(0x16)), (0x80, 0x02)); // 640 KiB
        assert_eq!((r(0x17), r(0x18)), (0xff, 0xff));
        assert_eq!((r(0x30), r(0x31)), (0xff, 0xff));
        assert_eq!((r(0x34), r(0x35)), (0x00, 0x1f)); // 496 MiB / 64 KiB
        assert_eq!((r(0x5b), r(0x5c), r(0x5d)), (0x00, 0x40, 0x00));
        let mut rtc = Rtc::new(8 << 20, 0);
        let mut r = |i: u8| {
            rtc.write(0x70, i);
            rtc.read(0x71, &mut no_clock())
        };
        assert_eq!((r(0x17), r(0x18)), (0x00, 0x1c)); // 7168 KiB
        assert_eq!((r(0x34), r(0x35)), (0, 0));
        assert_eq!(r(0x5b), 0);
        // Plain storage; index port reads 0xff; NMI bit recorded.
        rtc.write(0x70, 0x80 | 0x40);
        assert!(rtc.nmi_disabled());
        rtc.write(0x71, 0x5a);
        assert_eq!(rtc.read(0x71, &mut no_clock()), 0x5a);
        assert_eq!(rtc.read(0x70, &mut no_clock()), 0xff);
    }

    /// Linux's mc146818_set_time: SET, fields, clear SET.
    fn linux_set(rtc: &mut Rtc, timed_wall: Option<u64>) {
        let fields = [
            (REG_YEAR, 0x99),
            (REG_MONTH, 0x12),
            (REG_DAY, 0x31),
            (REG_HOURS, 0x23),
            (REG_MINUTES, 0x59),
            (REG_SECONDS, 0x50),
            (REG_CENTURY, 0x19),
        ];
        let b = reg(rtc, REG_B, 0);
        set_reg(rtc, REG_B, b | REG_B_SET);
        for (r, v) in fields {
            set_reg(rtc, r, v);
        }
        rtc.write(0x70, REG_B);
        match timed_wall {
            Some(w) => rtc.write_timed(0x71, b, &mut at(w)),
            None => rtc.write(0x71, b),
        }
    }

    #[test]
    fn guest_sets_clock_and_it_advances() {
        let mut rtc = Rtc::new(0, 0);
        let w0 = T * NS;
        linux_set(&mut rtc, Some(w0));
        assert!(!rtc.set_pending);
        // 1999-12-31 23:59:50 + 15 s = 2000-01-01 00:00:05.
        let w = w0 + 15 * NS;
        assert_eq!(reg(&mut rtc, REG_SECONDS, w), 0x05);
        assert_eq!(reg(&mut rtc, REG_MINUTES, w), 0x00);
        assert_eq!(reg(&mut rtc, REG_YEAR, w), 0x00);
        assert_eq!(reg(&mut rtc, REG_CENTURY, w), 0x20);
        assert_eq!(reg(&mut rtc, REG_WEEKDAY, w), 7); // Saturday

        // Untimed write: applied at the next clock read.
        let mut rtc = Rtc::new(0, 0);
        linux_set(&mut rtc, None);
        assert!(rtc.set_pending);
        assert_eq!(reg(&mut rtc, REG_SECONDS, w0), 0x50);
        assert_eq!(reg(&mut rtc, REG_SECONDS, w0 + 3 * NS), 0x53);
    }

    #[test]
    fn set_mode_reads_stored_values() {
        let mut rtc = Rtc::new(0, 0);
        let w = T * NS;
        rtc.write(0x70, REG_B);
        rtc.write_timed(0x71, REG_B_SET | REG_B_24H, &mut at(w));
        rtc.write(0x70, REG_MINUTES);
        assert_eq!(rtc.read(0x71, &mut no_clock()), 0x45);
        rtc.write(0x71, 0x10);
        assert_eq!(rtc.read(0x71, &mut no_clock()), 0x10);
        rtc.write(0x70, REG_B);
        rtc.write_timed(0x71, REG_B_24H, &mut at(w + 60 * NS));
        // Only the minutes changed; the time resumes from the stored one.
        assert_eq!(reg(&mut rtc, REG_HOURS, w + 60 * NS), 0x13);
        assert_eq!(reg(&mut rtc, REG_MINUTES, w + 61 * NS), 0x10);
        assert_eq!(reg(&mut rtc, REG_SECONDS, w + 61 * NS), 0x08);
    }

    #[test]
    fn garbage_fields_do_not_panic() {
        let mut rtc = Rtc::new(0, 0);
        set_reg(&mut rtc, REG_B, REG_B_SET);
        for r in [
            REG_SECONDS,
            REG_MINUTES,
            REG_HOURS,
            REG_DAY,
            REG_MONTH,
            REG_YEAR,
            REG_CENTURY,
        ] {
            set_reg(&mut rtc, r, 0xff);
        }
        set_reg(&mut rtc, REG_B, 0);
        for r in [REG_SECONDS, REG_HOURS, REG_YEAR, REG_A] {
            reg(&mut rtc, r, 0);
            reg(&mut rtc, r, u64::MAX);
        }
    }
}
