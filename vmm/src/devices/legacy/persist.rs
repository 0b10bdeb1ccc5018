//! Saved state of the legacy devices and their [`Persist`] impls.
//!
//! Every state is a plain serde struct; `restore` validates every field
//! and returns the device module's error for a corrupted state (never
//! panics). Saving is a pure function of the device, so equal devices save
//! to byte-identical encodings.

use std::convert::Infallible;

use serde::{Deserialize, Serialize};
use vm_superio::serial::SerialState;

use super::debug_exit::{DebugExit, PostCode};
use super::i8042::{I8042Error, I8042};
use super::pic::{Chip, Pic, PicError};
use super::pit::{Channel, Pit, PitError};
use super::rtc::{Rtc, RtcError, CMOS_SIZE};
use super::serial::{SerialDevice, SerialError};
use crate::persist::Persist;

// ---------------------------------------------------------------- PIC

/// One 8259A chip.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PicChipState {
    /// The IRR as last sampled (edge detection).
    pub last_irr: u8,
    /// Interrupt request register.
    pub irr: u8,
    /// Interrupt mask register.
    pub imr: u8,
    /// In-service register.
    pub isr: u8,
    /// Rotation: the priority of IRQ 0 is `priority_add`.
    pub priority_add: u8,
    /// Vector of IRQ 0 (ICW2).
    pub irq_base: u8,
    /// OCW3 read-register select: ISR (true) or IRR.
    pub read_reg_select: bool,
    /// The next read is a poll command's answer.
    pub poll: bool,
    /// Special mask mode.
    pub special_mask: bool,
    /// Initialization sequence position (ICW2..ICW4 expected).
    pub init_state: u8,
    /// Automatic end of interrupt (ICW4).
    pub auto_eoi: bool,
    /// Rotate priorities on an automatic EOI.
    pub rotate_on_auto_eoi: bool,
    /// Special fully nested mode (ICW4).
    pub special_fully_nested_mode: bool,
    /// ICW4 is expected (ICW1 bit 0).
    pub init4: bool,
    /// Single (no cascade) mode (ICW1 bit 1).
    pub single_mode: bool,
    /// Edge/level control register (port 0x4d0/0x4d1).
    pub elcr: u8,
}

/// The PIC pair.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PicState {
    /// The master chip (IRQ 0-7).
    pub master: PicChipState,
    /// The slave chip (IRQ 8-15).
    pub slave: PicChipState,
}

fn save_chip(c: &Chip) -> PicChipState {
    PicChipState {
        last_irr: c.last_irr,
        irr: c.irr,
        imr: c.imr,
        isr: c.isr,
        priority_add: c.priority_add,
        irq_base: c.irq_base,
        read_reg_select: c.read_reg_select,
        poll: c.poll,
        special_mask: c.special_mask,
        init_state: c.init_state,
        auto_eoi: c.auto_eoi,
        rotate_on_auto_eoi: c.rotate_on_auto_eoi,
        special_fully_nested_mode: c.special_fully_nested_mode,
        init4: c.init4,
        single_mode: c.single_mode,
        elcr: c.elcr,
    }
}

fn restore_chip(s: &PicChipState, idx: usize) -> Result<Chip, PicError> {
    let c = Chip {
        last_irr: s.last_irr,
        irr: s.irr,
        imr: s.imr,
        isr: s.isr,
        priority_add: s.priority_add,
        irq_base: s.irq_base,
        read_reg_select: s.read_reg_select,
        poll: s.poll,
        special_mask: s.special_mask,
        init_state: s.init_state,
        auto_eoi: s.auto_eoi,
        rotate_on_auto_eoi: s.rotate_on_auto_eoi,
        special_fully_nested_mode: s.special_fully_nested_mode,
        init4: s.init4,
        single_mode: s.single_mode,
        elcr: s.elcr,
    };
    c.validate(idx)?;
    Ok(c)
}

impl Persist for Pic {
    type State = PicState;
    type ConstructorArgs = ();
    type Error = PicError;

    fn save(&self) -> PicState {
        PicState {
            master: save_chip(&self.chips[0]),
            slave: save_chip(&self.chips[1]),
        }
    }

    fn restore(_: (), state: &PicState) -> Result<Self, PicError> {
        Ok(Pic {
            chips: [
                restore_chip(&state.master, 0)?,
                restore_chip(&state.slave, 1)?,
            ],
        })
    }
}

// ---------------------------------------------------------------- PIT

/// One 8254 channel. Access states: 1 low byte, 2 high byte, 3 low/high
/// expecting low, 4 low/high expecting high.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PitChannelState {
    /// Reload value 1..=0x10000.
    pub count: u32,
    /// Mode 0..=5.
    pub mode: u8,
    /// Access mode 1..=3.
    pub rw_mode: u8,
    /// Byte of the counter the next read returns (access state).
    pub read_state: u8,
    /// Byte of the reload value the next write sets (access state).
    pub write_state: u8,
    /// Low byte written while waiting for the high one.
    pub write_latch: u8,
    /// Counter value latched by a counter-latch command.
    pub latched_count: u16,
    /// 0 (none) or the access state of the latched bytes still to read.
    pub count_latched: u8,
    /// A read-back command latched the status byte.
    pub status_latched: bool,
    /// The latched status byte.
    pub status: u8,
    /// BCD counting.
    pub bcd: bool,
    /// Gate input (channel 2: port 0x61 bit 0).
    pub gate: bool,
    /// A reload value was written since the mode was set.
    pub loaded: bool,
    /// Mode 0: the output went high (terminal count reached).
    pub triggered: bool,
    /// Virtual ns at which counting (re)started.
    pub load_ns: u64,
    /// IRQ 0 rising edges delivered since `load_ns` (channel 0).
    pub irq_edges: u64,
}

/// The PIT and port 0x61.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PitState {
    /// Channels 0 (IRQ 0), 1 and 2 (speaker).
    pub channels: [PitChannelState; 3],
    /// Port 0x61 bits 0-3.
    pub port61: u8,
    /// Port 0x61 bit 4, toggled on every read (refresh).
    pub refresh_toggle: bool,
}

fn save_channel(c: &Channel) -> PitChannelState {
    PitChannelState {
        count: c.count,
        mode: c.mode,
        rw_mode: c.rw_mode,
        read_state: c.read_state,
        write_state: c.write_state,
        write_latch: c.write_latch,
        latched_count: c.latched_count,
        count_latched: c.count_latched,
        status_latched: c.status_latched,
        status: c.status,
        bcd: c.bcd,
        gate: c.gate,
        loaded: c.loaded,
        triggered: c.triggered,
        load_ns: c.load_ns,
        irq_edges: c.irq_edges,
    }
}

fn restore_channel(s: &PitChannelState, idx: usize) -> Result<Channel, PitError> {
    let c = Channel {
        count: s.count,
        mode: s.mode,
        rw_mode: s.rw_mode,
        read_state: s.read_state,
        write_state: s.write_state,
        write_latch: s.write_latch,
        latched_count: s.latched_count,
        count_latched: s.count_latched,
        status_latched: s.status_latched,
        status: s.status,
        bcd: s.bcd,
        gate: s.gate,
        loaded: s.loaded,
        triggered: s.triggered,
        load_ns: s.load_ns,
        irq_edges: s.irq_edges,
    };
    c.validate(idx)?;
    Ok(c)
}

impl Persist for Pit {
    type State = PitState;
    type ConstructorArgs = ();
    type Error = PitError;

    fn save(&self) -> PitState {
        PitState {
            channels: [
                save_channel(&self.channels[0]),
                save_channel(&self.channels[1]),
                save_channel(&self.channels[2]),
            ],
            port61: self.port61,
            refresh_toggle: self.refresh_toggle,
        }
    }

    fn restore(_: (), state: &PitState) -> Result<Self, PitError> {
        if state.port61 & !0x0f != 0 {
            return Err(PitError::InvalidPort61(state.port61));
        }
        let [c0, c1, c2] = &state.channels;
        let channels = [
            restore_channel(c0, 0)?,
            restore_channel(c1, 1)?,
            restore_channel(c2, 2)?,
        ];
        if channels[2].gate != (state.port61 & 1 != 0) {
            return Err(PitError::InvalidChannel {
                channel: 2,
                what: "gate disagrees with port 0x61 bit 0",
            });
        }
        Ok(Pit {
            channels,
            port61: state.port61,
            refresh_toggle: state.refresh_toggle,
        })
    }
}

// ---------------------------------------------------------------- RTC

/// The RTC and CMOS memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RtcState {
    /// 128 CMOS bytes.
    pub cmos: Vec<u8>,
    /// Selected register, 0..128.
    pub index: u8,
    /// Port 0x70 bit 7: NMI disabled.
    pub nmi_disabled: bool,
    /// Guest time − wall time, ns.
    pub offset_ns: i64,
    /// A clock setting waits for the next clock-dependent access.
    pub set_pending: bool,
}

impl Persist for Rtc {
    type State = RtcState;
    type ConstructorArgs = ();
    type Error = RtcError;

    fn save(&self) -> RtcState {
        RtcState {
            cmos: self.cmos.to_vec(),
            index: self.index,
            nmi_disabled: self.nmi_disabled,
            offset_ns: self.offset_ns,
            set_pending: self.set_pending,
        }
    }

    fn restore(_: (), state: &RtcState) -> Result<Self, RtcError> {
        let cmos: [u8; CMOS_SIZE] = state
            .cmos
            .as_slice()
            .try_into()
            .map_err(|_| RtcError::CmosSize(state.cmos.len()))?;
        if usize::from(state.index) >= CMOS_SIZE {
            return Err(RtcError::Index(state.index));
        }
        Ok(Rtc {
            cmos,
            index: state.index,
            nmi_disabled: state.nmi_disabled,
            offset_ns: state.offset_ns,
            set_pending: state.set_pending,
        })
    }
}

// ---------------------------------------------------------------- serial

/// The UART (a serde mirror of `vm_superio::serial::SerialState`, which
/// is not serde) plus the device's pending input and interrupt flag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialDeviceState {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// IER.
    pub interrupt_enable: u8,
    /// IIR.
    pub interrupt_identification: u8,
    /// LCR.
    pub line_control: u8,
    /// LSR.
    pub line_status: u8,
    /// MCR.
    pub modem_control: u8,
    /// MSR.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Receive FIFO (≤ 64 bytes).
    pub in_buffer: Vec<u8>,
    /// Console input waiting for FIFO space.
    pub pending_input: Vec<u8>,
    /// The interrupt fired and the run loop has not taken it yet.
    pub interrupt_raised: bool,
    /// Console output gathered and not yet emitted (≤ `OUTPUT_CHUNK`).
    pub waiting_output: Vec<u8>,
}

impl Persist for SerialDevice {
    type State = SerialDeviceState;
    type ConstructorArgs = ();
    type Error = SerialError;

    fn save(&self) -> SerialDeviceState {
        let s = self.serial.state();
        SerialDeviceState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
            pending_input: self.pending.iter().copied().collect(),
            interrupt_raised: self
                .serial
                .interrupt_evt()
                .0
                .load(std::sync::atomic::Ordering::Relaxed),
            waiting_output: self.waiting_output().to_vec(),
        }
    }

    fn restore((): (), state: &SerialDeviceState) -> Result<Self, SerialError> {
        let s = SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        SerialDevice::from_parts(
            &s,
            &state.pending_input,
            state.interrupt_raised,
            &state.waiting_output,
        )
    }
}

// ---------------------------------------------------------------- i8042

/// The keyboard controller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {
    /// Stored status bits (system flag, command/data, unlocked).
    pub status: u8,
    /// Configuration byte.
    pub ctr: u8,
    /// Output port.
    pub outp: u8,
    /// Controller command waiting for its data byte (0: none).
    pub pending_cmd: u8,
    /// Bytes queued for the guest (≤ 16).
    pub buffer: Vec<u8>,
    /// Last byte written to port 0x60.
    pub last_data: u8,
}

impl Persist for I8042 {
    type State = I8042State;
    type ConstructorArgs = ();
    type Error = I8042Error;

    fn save(&self) -> I8042State {
        I8042State {
            status: self.status,
            ctr: self.ctr,
            outp: self.outp,
            pending_cmd: self.pending_cmd,
            buffer: self.buffer.iter().copied().collect(),
            last_data: self.last_data,
        }
    }

    fn restore(_: (), state: &I8042State) -> Result<Self, I8042Error> {
        let k = I8042 {
            status: state.status,
            ctr: state.ctr,
            outp: state.outp,
            pending_cmd: state.pending_cmd,
            buffer: state.buffer.iter().copied().collect(),
            last_data: state.last_data,
        };
        k.validate()?;
        Ok(k)
    }
}

// ---------------------------------------------------------------- debug

/// The exit port has no state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DebugExitState {}

impl Persist for DebugExit {
    type State = DebugExitState;
    type ConstructorArgs = ();
    type Error = Infallible;

    fn save(&self) -> DebugExitState {
        DebugExitState {}
    }

    fn restore(_: (), _: &DebugExitState) -> Result<Self, Infallible> {
        Ok(DebugExit)
    }
}

/// The POST code port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostCodeState {
    /// Last code written to port 0x80.
    pub last: u8,
}

impl Persist for PostCode {
    type State = PostCodeState;
    type ConstructorArgs = ();
    type Error = Infallible;

    fn save(&self) -> PostCodeState {
        PostCodeState { last: self.last }
    }

    fn restore(_: (), state: &PostCodeState) -> Result<Self, Infallible> {
        Ok(PostCode { last: state.last })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes<T: Serialize>(v: &T) -> Vec<u8> {
        postcard::to_allocvec(v).unwrap()
    }

    /// save → encode → decode → restore → save gives identical bytes.
    fn roundtrip<D: Persist<ConstructorArgs = ()>>(d: &D) -> D
    where
        D::Error: std::fmt::Debug,
    {
        let s1 = d.save();
        let enc = bytes(&s1);
        let dec: D::State = postcard::from_bytes(&enc).unwrap();
        let r = D::restore((), &dec).unwrap();
        assert_eq!(bytes(&r.save()), enc);
        r
    }

    fn busy_pic() -> Pic {
        let mut pic = Pic::new();
        for (p, v) in [(0x20, 0x11), (0x21, 0x30), (0x21, 0x04), (0x21, 0x01)] {
            pic.write(p, v);
        }
        for (p, v) in [(0xa0, 0x11), (0xa1, 0x38), (0xa1, 0x02), (0xa1, 0x01)] {
            pic.write(p, v);
        }
        pic.write(0x4d1, 0x08);
        pic.write(0x21, 0x10);
        pic.raise_irq(3);
        pic.raise_irq(4); // masked, stays in IRR
        pic.set_irq_level(11, true);
        pic.acknowledge();
        pic.write(0x20, 0x0b);
        pic
    }

    #[test]
    fn pic_roundtrip_and_same_behaviour() {
        let mut a = busy_pic();
        let mut b = roundtrip(&a);
        assert_eq!(a, b);
        for pic in [&mut a, &mut b] {
            pic.write(0x20, 0x20);
            pic.write(0x21, 0x00);
        }
        let mut va = Vec::new();
        let mut vb = Vec::new();
        while let Some(v) = a.acknowledge() {
            va.push(v);
            a.write(0xa0, 0x20);
            a.write(0x20, 0x20);
            a.set_irq_level(11, false);
        }
        while let Some(v) = b.acknowledge() {
            vb.push(v);
            b.write(0xa0, 0x20);
            b.write(0x20, 0x20);
            b.set_irq_level(11, false);
        }
        assert_eq!(va, vb);
        // IRQ 11 still in service on the slave: 3 first; the level then
        // drops after the slave EOI re-latched IRQ 2: spurious 15; then 4.
        assert_eq!(va, vec![0x33, 0x3f, 0x34]);
        assert_eq!(a.save(), b.save());
    }

    #[test]
    fn pic_restore_rejects_corruption() {
        let good = busy_pic().save();
        let mut s = good.clone();
        s.master.init_state = 4;
        assert!(Pic::restore((), &s).is_err());
        let mut s = good.clone();
        s.slave.priority_add = 8;
        assert!(Pic::restore((), &s).is_err());
        let mut s = good.clone();
        s.master.irq_base = 0x31;
        assert!(Pic::restore((), &s).is_err());
        let mut s = good;
        s.master.elcr = 0x01;
        assert!(Pic::restore((), &s).is_err());
    }

    fn busy_pit() -> Pit {
        let mut pit = Pit::new();
        let mut t = || 1_000_000u64;
        pit.write(0x43, 0x34, &mut t);
        pit.write(0x40, 0x9c, &mut t);
        pit.write(0x40, 0x2e, &mut t);
        pit.irq0_deadline_reached();
        pit.write(0x61, 0x01, &mut t);
        pit.write(0x43, 0xb0, &mut t);
        pit.write(0x42, 0xff, &mut t); // half of a lo/hi write
        pit.write(0x43, 0x00, &mut || 2_000_000); // latch ch0
        pit.read(0x40, &mut || 3_000_000); // half read
        pit
    }

    #[test]
    fn pit_roundtrip_and_same_behaviour() {
        let mut a = busy_pit();
        let mut b = roundtrip(&a);
        assert_eq!(a, b);
        assert_eq!(a.next_irq0_deadline(), b.next_irq0_deadline());
        for t in [4_000_000u64, 5_000_000, 60_000_000] {
            for pit in [&mut a, &mut b] {
                pit.write(0x42, 0x10, &mut || t);
            }
            for port in [0x40, 0x40, 0x42, 0x42, 0x61] {
                assert_eq!(a.read(port, &mut || t), b.read(port, &mut || t));
            }
            a.irq0_deadline_reached();
            b.irq0_deadline_reached();
            assert_eq!(a.next_irq0_deadline(), b.next_irq0_deadline());
        }
        assert_eq!(bytes(&a.save()), bytes(&b.save()));
    }

    #[test]
    fn pit_restore_rejects_corruption() {
        let good = busy_pit().save();
        let cases: [fn(&mut PitState); 10] = [
            |s| s.channels[0].mode = 6,
            |s| s.channels[1].count = 0,
            |s| s.channels[1].count = 0x10001,
            |s| s.channels[2].rw_mode = 0,
            |s| s.channels[0].read_state = 5,
            |s| s.channels[0].write_state = 0,
            |s| s.channels[0].count_latched = 4,
            |s| s.channels[0].gate = false,
            |s| s.port61 = 0x20,
            |s| s.port61 = 0x00,
        ];
        for (i, corrupt) in cases.iter().enumerate() {
            let mut s = good.clone();
            corrupt(&mut s);
            assert!(Pit::restore((), &s).is_err(), "case {i}");
        }
    }

    #[test]
    fn rtc_roundtrip_and_same_behaviour() {
        let mut a = Rtc::new(256 << 20, 0);
        a.write(0x70, 0x0b);
        a.write(0x71, 0x82);
        a.write(0x70, 0x00);
        a.write(0x71, 0x30);
        a.write(0x70, 0x0b);
        a.write(0x71, 0x02); // set pending
        a.write(0x70, 0x85);
        let mut b = roundtrip(&a);
        assert_eq!(a, b);
        let w = 1_700_000_000_000_000_000u64;
        for r in [0u8, 2, 4, 7, 8, 9, 0x0a, 0x32, 0x15] {
            a.write(0x70, r);
            b.write(0x70, r);
            assert_eq!(a.read(0x71, &mut || w), b.read(0x71, &mut || w));
        }
        assert_eq!(a.save(), b.save());

        let good = a.save();
        let mut s = good.clone();
        s.cmos.pop();
        assert_eq!(Rtc::restore((), &s), Err(RtcError::CmosSize(127)));
        let mut s = good;
        s.index = 0x80;
        assert_eq!(Rtc::restore((), &s), Err(RtcError::Index(0x80)));
    }

    #[test]
    fn serial_roundtrip_and_same_behaviour() {
        let mut a = SerialDevice::new();
        a.write(1, 0x03);
        a.write(7, 0x5a);
        let input: Vec<u8> = (0..100u8).collect();
        a.enqueue_input(&input);
        a.read(0);
        let s1 = a.save();
        assert_eq!(s1.in_buffer.len(), 63);
        assert_eq!(s1.pending_input.len(), 36);
        assert!(s1.interrupt_raised);
        a.write(0, b'o');
        let s1 = a.save();
        assert_eq!(s1.waiting_output, b"o");
        let enc = bytes(&s1);
        let mut b = SerialDevice::restore((), &postcard::from_bytes(&enc).unwrap()).unwrap();
        assert_eq!(bytes(&b.save()), enc);
        assert_eq!(a.take_interrupt(), b.take_interrupt());
        let mut ra = Vec::new();
        let mut rb = Vec::new();
        while a.read(5) & 1 == 1 {
            ra.push(a.read(0));
        }
        while b.read(5) & 1 == 1 {
            rb.push(b.read(0));
        }
        assert_eq!(ra, rb);
        assert_eq!(ra, input[1..].to_vec());
        b.write(0, b'k');
        assert_eq!(b.take_output(true).as_deref(), Some(&b"ok"[..]));
        a.write(0, b'k');
        a.take_output(true);
        assert_eq!(a.save(), b.save());
    }

    #[test]
    fn serial_restore_rejects_corruption() {
        let good = SerialDevice::new().save();
        let mut s = good.clone();
        s.in_buffer = vec![0; 65];
        assert!(SerialDevice::restore((), &s).is_err());
        let mut s = good.clone();
        s.interrupt_enable = 0xff;
        assert!(SerialDevice::restore((), &s).is_err());
        let mut s = good.clone();
        s.pending_input = vec![0; crate::devices::legacy::serial::MAX_PENDING_INPUT + 1];
        assert!(SerialDevice::restore((), &s).is_err());
        let mut s = good;
        s.waiting_output = vec![0; crate::devices::legacy::serial::OUTPUT_CHUNK + 1];
        assert!(SerialDevice::restore((), &s).is_err());
    }

    #[test]
    fn i8042_roundtrip_and_same_behaviour() {
        let mut a = I8042::new();
        a.write(0x64, 0xaa);
        a.write(0x64, 0x20);
        a.write(0x64, 0xd1);
        let mut b = roundtrip(&a);
        assert_eq!(a.write(0x60, 0xfe), b.write(0x60, 0xfe));
        for _ in 0..4 {
            assert_eq!(a.read(0x64), b.read(0x64));
            assert_eq!(a.read(0x60), b.read(0x60));
        }
        assert_eq!(a.save(), b.save());
        let good = a.save();
        let mut s = good.clone();
        s.buffer = vec![0; 17];
        assert!(I8042::restore((), &s).is_err());
        let mut s = good.clone();
        s.pending_cmd = 0x20;
        assert!(I8042::restore((), &s).is_err());
        let mut s = good;
        s.status = 0x01;
        assert!(I8042::restore((), &s).is_err());
    }

    #[test]
    fn debug_ports_roundtrip() {
        let d = DebugExit::new();
        roundtrip(&d);
        let mut p = PostCode::new();
        p.write(0x99);
        let mut r = roundtrip(&p);
        assert_eq!(r.read(), 0x99);
    }
}
