//! Intel 8259A programmable interrupt controller pair, as wired in a PC.
//!
//! * master: ports 0x20 (command) / 0x21 (data), IRQ 0-7;
//! * slave: ports 0xa0 / 0xa1, IRQ 8-15, its INT output cascaded on the
//!   master's IRQ 2;
//! * ELCR (edge/level control, PIIX): 0x4d0 (master) / 0x4d1 (slave).
//!
//! The model follows QEMU's `hw/intc/i8259.c` and KVM's
//! `arch/x86/kvm/i8259.c` closely (including the way the slave output is
//! pulsed onto master IRQ 2 after every state change, as KVM does). It is a
//! pure state machine: no time, no host state. The run loop asks
//! [`Pic::interrupt_pending`] at exits and runs the INTA cycle with
//! [`Pic::acknowledge`] when it injects.
//!
//! Supported: ICW1-ICW4 (cascade and single mode, ICW4 auto-EOI and special
//! fully nested mode), OCW1 masks, OCW2 (non-specific/specific EOI, rotate
//! on non-specific EOI, rotate in auto-EOI mode, set priority), OCW3 (read
//! IRR/ISR, poll, special mask mode), ELCR level triggering.
//! Not modelled: the 8080/8085 call-address mode (ICW1 bit 2, ICW4 bit 0 =
//! 0 are accepted and ignored; vectors are always 8086 style), buffered mode
//! (ICW4 bits 2-3, no meaning in a VM).

use thiserror::Error;

/// Errors of the PIC (only restoring a corrupted state can fail).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PicError {
    /// A field of a saved chip state is out of range.
    #[error("invalid PIC state: {chip} chip: {what}")]
    InvalidState {
        /// "master" or "slave".
        chip: &'static str,
        /// Which field is wrong.
        what: &'static str,
    },
}

/// ELCR bits that may be set: IRQ 0, 1, 2 (master) and 8, 13 (slave) are
/// always edge triggered on a PIIX.
pub(crate) const ELCR_MASK: [u8; 2] = [0xf8, 0xde];

/// One 8259A chip.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Chip {
    /// Line levels seen at the last input change (edge detection).
    pub(crate) last_irr: u8,
    /// Interrupt request register.
    pub(crate) irr: u8,
    /// Interrupt mask register (OCW1).
    pub(crate) imr: u8,
    /// In-service register.
    pub(crate) isr: u8,
    /// Lowest-priority rotation: IRQ `priority_add` has the highest priority.
    pub(crate) priority_add: u8,
    /// Vector base (ICW2, low 3 bits zero).
    pub(crate) irq_base: u8,
    /// OCW3 RR/RIS: reading the command port returns ISR (true) or IRR.
    pub(crate) read_reg_select: bool,
    /// OCW3 poll command pending: the next read is a poll.
    pub(crate) poll: bool,
    /// OCW3 special mask mode.
    pub(crate) special_mask: bool,
    /// 0: operational; 1, 2, 3: expecting ICW2, ICW3, ICW4.
    pub(crate) init_state: u8,
    /// ICW4 AEOI.
    pub(crate) auto_eoi: bool,
    /// OCW2 rotate in automatic EOI mode.
    pub(crate) rotate_on_auto_eoi: bool,
    /// ICW4 SFNM.
    pub(crate) special_fully_nested_mode: bool,
    /// ICW1 IC4: an ICW4 follows.
    pub(crate) init4: bool,
    /// ICW1 SNGL: no ICW3.
    pub(crate) single_mode: bool,
    /// Edge/level control register (1 = level).
    pub(crate) elcr: u8,
}

/// Priority (0 = highest) of the highest-priority bit set in `mask`, 8 if
/// none.
fn get_priority(c: &Chip, mask: u8) -> u8 {
    if mask == 0 {
        return 8;
    }
    let mut priority = 0u8;
    while mask & (1 << ((priority + c.priority_add) & 7)) == 0 {
        priority += 1;
    }
    priority
}

impl Chip {
    /// The IRQ (0-7) this chip would present on INT, if any.
    fn get_irq(&self, is_master: bool) -> Option<u8> {
        let mask = self.irr & !self.imr;
        let priority = get_priority(self, mask);
        if priority == 8 {
            return None;
        }
        // Compute the current in-service priority. In special mask mode,
        // masked in-service levels do not block lower ones; in special
        // fully nested mode, the cascade input does not block itself.
        let mut mask = self.isr;
        if self.special_mask {
            mask &= !self.imr;
        }
        if self.special_fully_nested_mode && is_master {
            mask &= !(1 << 2);
        }
        let cur_priority = get_priority(self, mask);
        if priority < cur_priority {
            Some((priority + self.priority_add) & 7)
        } else {
            None
        }
    }

    /// Input line change.
    fn set_irq(&mut self, irq: u8, level: bool) {
        let mask = 1u8 << irq;
        if self.elcr & mask != 0 {
            // Level triggered: IRR follows the line.
            if level {
                self.irr |= mask;
                self.last_irr |= mask;
            } else {
                self.irr &= !mask;
                self.last_irr &= !mask;
            }
        } else if level {
            // Edge triggered: a rising edge latches a request.
            if self.last_irr & mask == 0 {
                self.irr |= mask;
            }
            self.last_irr |= mask;
        } else {
            self.last_irr &= !mask;
        }
    }

    /// INTA on this chip for `irq`.
    fn intack(&mut self, irq: u8) {
        if self.auto_eoi {
            if self.rotate_on_auto_eoi {
                self.priority_add = (irq + 1) & 7;
            }
        } else {
            self.isr |= 1 << irq;
        }
        // A level-sensitive request stays in IRR while its line is high.
        if self.elcr & (1 << irq) == 0 {
            self.irr &= !(1 << irq);
        }
    }

    /// ICW1 resets everything but the ELCR and level-triggered requests.
    fn init_reset(&mut self) {
        let elcr = self.elcr;
        let irr = self.irr & elcr;
        *self = Chip {
            elcr,
            irr,
            ..Chip::default()
        };
    }

    fn write_command(&mut self, val: u8) {
        if val & 0x10 != 0 {
            // ICW1.
            self.init_reset();
            self.init_state = 1;
            self.init4 = val & 0x01 != 0;
            self.single_mode = val & 0x02 != 0;
            // Bit 3 (LTIM, level-triggered mode for all inputs) is
            // ignored, as in QEMU: PC chipsets use the ELCR instead.
        } else if val & 0x08 != 0 {
            // OCW3.
            if val & 0x04 != 0 {
                self.poll = true;
            }
            if val & 0x02 != 0 {
                self.read_reg_select = val & 0x01 != 0;
            }
            if val & 0x40 != 0 {
                self.special_mask = val & 0x20 != 0;
            }
        } else {
            // OCW2.
            let cmd = val >> 5;
            match cmd {
                // Clear / set rotate in automatic EOI mode.
                0 | 4 => self.rotate_on_auto_eoi = cmd == 4,
                // Non-specific EOI (5: with rotation).
                1 | 5 => {
                    let priority = get_priority(self, self.isr);
                    if priority != 8 {
                        let irq = (priority + self.priority_add) & 7;
                        self.isr &= !(1 << irq);
                        if cmd == 5 {
                            self.priority_add = (irq + 1) & 7;
                        }
                    }
                }
                // Specific EOI.
                3 => self.isr &= !(1 << (val & 7)),
                // Set priority: IRQ (val & 7) becomes the lowest.
                6 => self.priority_add = (val + 1) & 7,
                // Rotate on specific EOI.
                7 => {
                    let irq = val & 7;
                    self.isr &= !(1 << irq);
                    self.priority_add = (irq + 1) & 7;
                }
                // 2: no operation.
                _ => {}
            }
        }
    }

    fn write_data(&mut self, val: u8) {
        match self.init_state {
            1 => {
                // ICW2.
                self.irq_base = val & 0xf8;
                self.init_state = match (self.single_mode, self.init4) {
                    (false, _) => 2,
                    (true, true) => 3,
                    (true, false) => 0,
                };
            }
            2 => {
                // ICW3: the cascade wiring is fixed (slave on IRQ 2).
                self.init_state = if self.init4 { 3 } else { 0 };
            }
            3 => {
                // ICW4.
                self.special_fully_nested_mode = val & 0x10 != 0;
                self.auto_eoi = val & 0x02 != 0;
                self.init_state = 0;
            }
            _ => {
                // OCW1.
                self.imr = val;
            }
        }
    }

    /// Validate a restored chip.
    pub(crate) fn validate(&self, idx: usize) -> Result<(), PicError> {
        let chip = if idx == 0 { "master" } else { "slave" };
        let bad = |what| Err(PicError::InvalidState { chip, what });
        if self.priority_add > 7 {
            return bad("priority_add > 7");
        }
        if self.irq_base & 7 != 0 {
            return bad("irq_base not a multiple of 8");
        }
        if self.init_state > 3 {
            return bad("init_state > 3");
        }
        if self.elcr & !ELCR_MASK[idx] != 0 {
            return bad("elcr sets an always-edge-triggered IRQ");
        }
        Ok(())
    }
}

/// The cascaded 8259A pair of a PC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pic {
    /// [master, slave].
    pub(crate) chips: [Chip; 2],
}

impl Default for Pic {
    fn default() -> Self {
        Self::new()
    }
}

impl Pic {
    /// Both chips in their power-on state (uninitialised: all inputs
    /// unmasked, vector base 0, edge triggered). Guests must run ICW1-4
    /// before enabling interrupts, as on real hardware.
    pub fn new() -> Self {
        Pic {
            chips: [Chip::default(), Chip::default()],
        }
    }

    /// After any change: if the slave presents an interrupt, pulse master
    /// IRQ 2 (as KVM does), so that a pending slave request is latched in
    /// the master's IRR again after each acknowledge.
    fn update(&mut self) {
        if self.chips[1].get_irq(false).is_some() {
            self.chips[0].set_irq(2, true);
            self.chips[0].set_irq(2, false);
        }
    }

    /// Guest IN from `port` (0x20, 0x21, 0xa0, 0xa1, 0x4d0, 0x4d1).
    /// Other ports read as 0xff.
    pub fn read(&mut self, port: u16) -> u8 {
        match port {
            0x20 | 0x21 | 0xa0 | 0xa1 => {
                let idx = usize::from(port >= 0xa0);
                let addr = port & 1;
                if self.chips[idx].poll {
                    self.chips[idx].poll = false;
                    self.poll_read(idx)
                } else if addr == 0 {
                    let c = &self.chips[idx];
                    if c.read_reg_select {
                        c.isr
                    } else {
                        c.irr
                    }
                } else {
                    self.chips[idx].imr
                }
            }
            0x4d0 => self.chips[0].elcr,
            0x4d1 => self.chips[1].elcr,
            _ => 0xff,
        }
    }

    /// OCW3 poll: acknowledge the highest request on chip `idx` and return
    /// 0x80 | level, or 0 if none.
    fn poll_read(&mut self, idx: usize) -> u8 {
        let ret = match self.chips[idx].get_irq(idx == 0) {
            Some(irq) => {
                self.chips[idx].intack(irq);
                0x80 | irq
            }
            None => 0,
        };
        self.update();
        ret
    }

    /// Guest OUT to `port`. Other ports are ignored.
    pub fn write(&mut self, port: u16, value: u8) {
        match port {
            0x20 | 0xa0 => self.chips[usize::from(port == 0xa0)].write_command(value),
            0x21 | 0xa1 => self.chips[usize::from(port == 0xa1)].write_data(value),
            0x4d0 => self.chips[0].elcr = value & ELCR_MASK[0],
            0x4d1 => self.chips[1].elcr = value & ELCR_MASK[1],
            _ => return,
        }
        self.update();
    }

    fn chip_of(irq: u8) -> Option<(usize, u8)> {
        match irq {
            0..=7 => Some((0, irq)),
            8..=15 => Some((1, irq - 8)),
            _ => None,
        }
    }

    /// Edge-triggered input: a pulse (rising then falling edge) on `irq`
    /// (0..16), which latches a request in IRR if the input is edge
    /// triggered. As on real hardware, a pulse on an input the guest has
    /// programmed as level triggered (ELCR) has no lasting effect; devices
    /// that hold their line use [`Pic::set_irq_level`]. Do not mix the two
    /// on the same line. Out-of-range IRQs are ignored.
    pub fn raise_irq(&mut self, irq: u8) {
        if let Some((idx, line)) = Self::chip_of(irq) {
            self.chips[idx].set_irq(line, true);
            self.chips[idx].set_irq(line, false);
            self.update();
        }
    }

    /// Level input for devices that hold their line: sets the line state.
    /// Edge mode: a 0→1 transition latches a request; level mode (ELCR):
    /// the request follows the line. Out-of-range IRQs are ignored.
    pub fn set_irq_level(&mut self, irq: u8, level: bool) {
        if let Some((idx, line)) = Self::chip_of(irq) {
            self.chips[idx].set_irq(line, level);
            self.update();
        }
    }

    /// Is INTR asserted towards the CPU (an unmasked requested IRQ with
    /// priority above the in-service ones)?
    pub fn interrupt_pending(&self) -> bool {
        self.chips[0].get_irq(true).is_some()
    }

    /// INTA cycle: the vector to inject, updating IRR/ISR (auto-EOI
    /// honoured). `None` if INTR is not asserted (the CPU would not run an
    /// INTA cycle). If the master presents IRQ 2 but the slave no longer
    /// has a request (it was masked or its level dropped), the slave
    /// answers with its spurious vector (base + 7, ISR untouched), as a
    /// real 8259A does.
    pub fn acknowledge(&mut self) -> Option<u8> {
        let irq = self.chips[0].get_irq(true)?;
        self.chips[0].intack(irq);
        let vector = if irq == 2 {
            let irq2 = match self.chips[1].get_irq(false) {
                Some(irq2) => {
                    self.chips[1].intack(irq2);
                    irq2
                }
                None => 7,
            };
            self.chips[1].irq_base.wrapping_add(irq2)
        } else {
            self.chips[0].irq_base.wrapping_add(irq)
        };
        self.update();
        Some(vector)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Linux's init_8259A(auto_eoi = 0), with vectors 0x30/0x38.
    fn linux_init(pic: &mut Pic, auto_eoi: bool) {
        pic.write(0x21, 0xff);
        pic.write(0xa1, 0xff);
        pic.write(0x20, 0x11); // ICW1: edge, cascade, ICW4
        pic.write(0x21, 0x30); // ICW2
        pic.write(0x21, 0x04); // ICW3: slave on IR2
        pic.write(0x21, if auto_eoi { 0x03 } else { 0x01 }); // ICW4
        pic.write(0xa0, 0x11);
        pic.write(0xa1, 0x38);
        pic.write(0xa1, 0x02); // ICW3: cascade identity
        pic.write(0xa1, 0x01);
        pic.write(0x21, 0x00);
        pic.write(0xa1, 0x00);
    }

    #[test]
    fn init_sequence_linux() {
        let mut pic = Pic::new();
        linux_init(&mut pic, false);
        assert_eq!(pic.chips[0].irq_base, 0x30);
        assert_eq!(pic.chips[1].irq_base, 0x38);
        assert_eq!(pic.chips[0].init_state, 0);
        assert_eq!(pic.chips[1].init_state, 0);
        assert!(!pic.chips[0].auto_eoi);
        assert_eq!(pic.read(0x21), 0);
        assert!(!pic.interrupt_pending());
        pic.raise_irq(0);
        assert!(pic.interrupt_pending());
        assert_eq!(pic.acknowledge(), Some(0x30));
        assert!(!pic.interrupt_pending());
        assert_eq!(pic.acknowledge(), None);
    }

    #[test]
    fn init_sequence_small_kernel_single_no_icw4() {
        // A minimal kernel: single mode, no ICW4 (no ICW3 either).
        let mut pic = Pic::new();
        pic.write(0x20, 0x13); // ICW1: single, ICW4
        pic.write(0x21, 0x20);
        pic.write(0x21, 0x01); // ICW4 directly (no ICW3 in single mode)
        assert_eq!(pic.chips[0].init_state, 0);
        pic.write(0x21, 0xfe); // OCW1: only IRQ0
        assert_eq!(pic.read(0x21), 0xfe);
        pic.raise_irq(1);
        assert!(!pic.interrupt_pending());
        pic.raise_irq(0);
        assert_eq!(pic.acknowledge(), Some(0x20));

        let mut pic = Pic::new();
        pic.write(0x20, 0x12); // single, no ICW4
        pic.write(0x21, 0x40);
        assert_eq!(pic.chips[0].init_state, 0);
        pic.write(0x21, 0x00); // this is OCW1 now
        pic.raise_irq(3);
        assert_eq!(pic.acknowledge(), Some(0x43));
    }

    #[test]
    fn mask_unmask_keeps_request() {
        let mut pic = Pic::new();
        linux_init(&mut pic, false);
        pic.write(0x21, 0x01);
        pic.raise_irq(0);
        assert!(!pic.interrupt_pending());
        assert_eq!(pic.read(0x20) & 1, 1, "IRR latched while masked");
        pic.write(0x21, 0x00);
        assert!(pic.interrupt_pending());
        assert_eq!(pic.acknowledge(), Some(0x30));
    }

    #[test]
    fn priority_isr_and_eoi() {
        let mut pic = Pic::new();
        linux_init(&mut pic, false);
        pic.raise_irq(3);
        assert_eq!(pic.acknowledge(), Some(0x33));
        // Lower priority IRQ 5 is blocked while 3 is in service.
        pic.raise_irq(5);
        assert!(!pic.interrupt_pending());
        // Higher priority IRQ 1 nests.
        pic.raise_irq(1);
        assert!(pic.interrupt_pending());
        assert_eq!(pic.acknowledge(), Some(0x31));
        pic.write(0x20, 0x0b); // OCW3: read ISR
        assert_eq!(pic.read(0x20), 0b1010);
        pic.write(0x20, 0x0a); // read IRR
        assert_eq!(pic.read(0x20), 0b10_0000);
        // Non-specific EOI ends the highest in service (1).
        pic.write(0x20, 0x20);
        assert!(!pic.interrupt_pending());
        // Specific EOI for 3.
        pic.write(0x20, 0x63);
        assert!(pic.interrupt_pending());
        assert_eq!(pic.acknowledge(), Some(0x35));
        pic.write(0x20, 0x20);
        pic.write(0x20, 0x0b);
        assert_eq!(pic.read(0x20), 0);
    }

    #[test]
    fn simultaneous_requests_by_priority() {
        let mut pic = Pic::new();
        linux_init(&mut pic, true);
        pic.raise_irq(6);
        pic.raise_irq(4);
        pic.raise_irq(1);
        assert_eq!(pic.acknowledge(), Some(0x31));
        assert_eq!(pic.acknowledge(), Some(0x34));
        assert_eq!(pic.acknowledge(), Some(0x36));
        assert_eq!(pic.acknowledge(), None);
    }

    #[test]
    fn rotation_commands() {
        let mut pic = Pic::new();
        linux_init(&mut pic, false);
        // Set priority: IRQ 4 lowest, so 5 is highest.
        pic.write(0x20, 0xc4);
        pic.raise_irq(1);
        pic.raise_irq(5);
        assert_eq!(pic.acknowledge(), Some(0x35));
        // Rotate on non-specific EOI: 5 becomes lowest, 6 highest.
        pic.write(0x20, 0xa0);
        assert_eq!(pic.chips[0].priority_add, 6);
        assert_eq!(pic.acknowledge(), Some(0x31));
        // Rotate on specific EOI for 1.
        pic.write(0x20, 0xe1);
        assert_eq!(pic.chips[0].priority_add, 2);
        assert_eq!(pic.chips[0].isr, 0);
    }

    #[test]
    fn cascade_through_slave() {
        let mut pic = Pic::new();
        linux_init(&mut pic, false);
        pic.raise_irq(12);
        assert!(pic.interrupt_pending());
        assert_eq!(pic.acknowledge(), Some(0x3c));
        pic.write(0xa0, 0x0b);
        assert_eq!(pic.read(0xa0), 1 << 4);
        pic.write(0x20, 0x0b);
        assert_eq!(pic.read(0x20), 1 << 2);
        // A second slave request waits for the master's IRQ2 to end
        // (no special fully nested mode)...
        pic.raise_irq(9);
        assert!(!pic.interrupt_pending());
        // ... Linux EOIs slave then master.
        pic.write(0xa0, 0x20);
        pic.write(0x20, 0x20);
        assert!(pic.interrupt_pending());
        assert_eq!(pic.acknowledge(), Some(0x39));
        // Masking the cascade input masks the slave.
        pic.write(0xa0, 0x20);
        pic.write(0x20, 0x20);
        pic.write(0x21, 0x04);
        pic.raise_irq(14);
        assert!(!pic.interrupt_pending());
        pic.write(0x21, 0x00);
        assert_eq!(pic.acknowledge(), Some(0x3e));
    }

    #[test]
    fn special_fully_nested_mode() {
        let mut pic = Pic::new();
        pic.write(0x20, 0x11);
        pic.write(0x21, 0x30);
        pic.write(0x21, 0x04);
        pic.write(0x21, 0x11); // SFNM
        pic.write(0xa0, 0x11);
        pic.write(0xa1, 0x38);
        pic.write(0xa1, 0x02);
        pic.write(0xa1, 0x01);
        pic.raise_irq(12);
        assert_eq!(pic.acknowledge(), Some(0x3c));
        // Higher-priority slave IRQ 9 nests despite master ISR bit 2.
        pic.raise_irq(9);
        assert_eq!(pic.acknowledge(), Some(0x39));
    }

    #[test]
    fn spurious_slave_and_master() {
        let mut pic = Pic::new();
        linux_init(&mut pic, false);
        pic.raise_irq(10);
        assert!(pic.interrupt_pending());
        // The slave request disappears (masked) after INT reached the
        // master: the master still latches IRQ2 and the slave answers 7.
        pic.write(0xa1, 0x04);
        assert!(pic.interrupt_pending());
        assert_eq!(pic.acknowledge(), Some(0x3f));
        pic.write(0xa0, 0x0b);
        assert_eq!(pic.read(0xa0), 0, "spurious: no slave ISR bit");
        // Nothing asserted: no INTA cycle.
        pic.write(0x20, 0x20);
        assert_eq!(pic.acknowledge(), None);
    }

    #[test]
    fn spurious_master_via_level_drop() {
        let mut pic = Pic::new();
        linux_init(&mut pic, false);
        pic.write(0x4d0, 0x20); // IRQ5 level triggered
        assert_eq!(pic.read(0x4d0), 0x20);
        pic.set_irq_level(5, true);
        assert!(pic.interrupt_pending());
        // Level-triggered request stays in IRR after INTA.
        assert_eq!(pic.acknowledge(), Some(0x35));
        assert_eq!(pic.read(0x20) & 0x20, 0x20);
        pic.set_irq_level(5, false);
        assert_eq!(pic.read(0x20) & 0x20, 0);
        pic.write(0x20, 0x20);
        assert!(!pic.interrupt_pending());
        // Always-edge IRQs cannot be made level.
        pic.write(0x4d0, 0xff);
        assert_eq!(pic.read(0x4d0), 0xf8);
    }

    #[test]
    fn auto_eoi() {
        let mut pic = Pic::new();
        linux_init(&mut pic, true);
        pic.raise_irq(4);
        assert_eq!(pic.acknowledge(), Some(0x34));
        pic.write(0x20, 0x0b);
        assert_eq!(pic.read(0x20), 0, "auto-EOI: no ISR bit");
        pic.raise_irq(6);
        assert_eq!(pic.acknowledge(), Some(0x36));
        // Rotate in auto-EOI mode.
        pic.write(0x20, 0x80);
        pic.raise_irq(0);
        assert_eq!(pic.acknowledge(), Some(0x30));
        assert_eq!(pic.chips[0].priority_add, 1);
    }

    #[test]
    fn level_line_edge_mode() {
        let mut pic = Pic::new();
        linux_init(&mut pic, false);
        pic.set_irq_level(4, true);
        assert_eq!(pic.acknowledge(), Some(0x34));
        pic.write(0x20, 0x20);
        // Still high: no new edge.
        pic.set_irq_level(4, true);
        assert!(!pic.interrupt_pending());
        pic.set_irq_level(4, false);
        pic.set_irq_level(4, true);
        assert_eq!(pic.acknowledge(), Some(0x34));
    }

    #[test]
    fn poll_command() {
        let mut pic = Pic::new();
        linux_init(&mut pic, false);
        pic.raise_irq(3);
        pic.write(0x20, 0x0c); // OCW3 poll
        assert_eq!(pic.read(0x20), 0x83);
        assert_eq!(pic.chips[0].isr, 0x08);
        pic.write(0x20, 0x0c);
        assert_eq!(pic.read(0x20), 0);
    }

    #[test]
    fn special_mask_mode() {
        let mut pic = Pic::new();
        linux_init(&mut pic, false);
        pic.raise_irq(1);
        assert_eq!(pic.acknowledge(), Some(0x31));
        pic.raise_irq(5);
        assert!(!pic.interrupt_pending());
        pic.write(0x21, 0x02); // mask in-service IRQ1
        pic.write(0x20, 0x68); // set special mask mode
        assert!(pic.interrupt_pending());
        assert_eq!(pic.acknowledge(), Some(0x35));
    }

    #[test]
    fn out_of_range_irq_ignored() {
        let mut pic = Pic::new();
        linux_init(&mut pic, false);
        pic.raise_irq(16);
        pic.set_irq_level(200, true);
        assert!(!pic.interrupt_pending());
        assert_eq!(pic.read(0x1234), 0xff);
    }
}
