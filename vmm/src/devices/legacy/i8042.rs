//! Minimal i8042 keyboard controller at ports 0x60 (data) and 0x64
//! (status/command), enough for guests to probe it and to reboot through
//! it.
//!
//! * Controller commands: 0x20 read / 0x60 write the configuration byte,
//!   0xa7/0xa8 disable/enable the aux port, 0xa9 aux test (0x00), 0xaa
//!   self-test (0x55, sets the system flag), 0xab keyboard test (0x00),
//!   0xad/0xae disable/enable the keyboard, 0xc0 read input port, 0xd0/0xd1
//!   read/write the output port, 0xd2/0xd3 write the keyboard/aux output
//!   buffer, 0xd4 write to aux (swallowed: no mouse), 0xf0-0xff pulse
//!   output lines.
//! * CPU reset requests ([`ResetRequest`]): command 0xfe (or any 0xf0-0xff
//!   pulse with bit 0 clear), or an output port write (0xd1) with bit 0
//!   (reset line, active low) clear.
//! * Keyboard commands on 0x60: reset (0xff: 0xfa, 0xaa), identify (0xf2:
//!   0xfa, 0xab, 0x83), echo (0xee: 0xee), anything else acknowledged with
//!   0xfa. There are no key presses.
//! * No interrupts (IRQ 1/12 are never raised): guests poll the status
//!   register, which is how Linux probes and how it reboots. Documented
//!   deviation.
//!
//! Defaults follow QEMU's `kbd_reset`: configuration byte 0x03 (interrupts
//! enabled), status "command + unlocked", output port 0xcf.

use std::collections::VecDeque;

use thiserror::Error;

/// Data port.
pub const DATA_PORT: u16 = 0x60;
/// Status (read) / command (write) port.
pub const COMMAND_PORT: u16 = 0x64;
/// Output buffer depth (bytes queued for the guest to read).
pub const BUFFER_SIZE: usize = 16;

pub(crate) const STAT_OBF: u8 = 0x01;
pub(crate) const STAT_SYS: u8 = 0x04;
pub(crate) const STAT_CMD: u8 = 0x08;
pub(crate) const STAT_UNLOCKED: u8 = 0x10;
/// Status bits kept in the state (OBF is derived from the buffer).
pub(crate) const STAT_STORED: u8 = STAT_SYS | STAT_CMD | STAT_UNLOCKED;

/// Controller commands that take a data byte.
pub(crate) const CMDS_WITH_DATA: [u8; 5] = [0x60, 0xd1, 0xd2, 0xd3, 0xd4];

/// The guest asked the controller to reset the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResetRequest;

/// Errors of the i8042 (only restoring a corrupted state can fail).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum I8042Error {
    /// More queued bytes than the buffer holds.
    #[error("invalid i8042 state: {0} bytes queued (max {BUFFER_SIZE})")]
    BufferOverflow(usize),
    /// A pending controller command that takes no data byte.
    #[error("invalid i8042 state: pending command {0:#x}")]
    PendingCommand(u8),
    /// Status bits that are not stored.
    #[error("invalid i8042 state: status {0:#x}")]
    Status(u8),
}

/// The keyboard controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct I8042 {
    /// Stored status bits (STAT_STORED).
    pub(crate) status: u8,
    /// Controller configuration byte.
    pub(crate) ctr: u8,
    /// Output port.
    pub(crate) outp: u8,
    /// Controller command waiting for its data byte (0: none).
    pub(crate) pending_cmd: u8,
    /// Bytes for the guest to read on 0x60.
    pub(crate) buffer: VecDeque<u8>,
    /// Last byte read on 0x60 (returned again when the buffer is empty).
    pub(crate) last_data: u8,
}

impl Default for I8042 {
    fn default() -> Self {
        Self::new()
    }
}

impl I8042 {
    /// A controller in QEMU's reset state.
    pub fn new() -> Self {
        I8042 {
            status: STAT_CMD | STAT_UNLOCKED,
            ctr: 0x03,
            outp: 0xcf,
            pending_cmd: 0,
            buffer: VecDeque::new(),
            last_data: 0,
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.buffer.len() < BUFFER_SIZE {
                self.buffer.push_back(b);
            }
        }
    }

    /// Guest IN from 0x60 (data) or 0x64 (status); others read 0xff.
    pub fn read(&mut self, port: u16) -> u8 {
        match port {
            DATA_PORT => {
                if let Some(b) = self.buffer.pop_front() {
                    self.last_data = b;
                }
                self.last_data
            }
            COMMAND_PORT => self.status | if self.buffer.is_empty() { 0 } else { STAT_OBF },
            _ => 0xff,
        }
    }

    /// Guest OUT to 0x60 (data) or 0x64 (command). Returns a reset request
    /// if the guest asked for a CPU reset.
    pub fn write(&mut self, port: u16, value: u8) -> Option<ResetRequest> {
        match port {
            DATA_PORT => {
                self.status &= !STAT_CMD;
                self.write_data(value)
            }
            COMMAND_PORT => {
                self.status |= STAT_CMD;
                self.write_command(value)
            }
            _ => None,
        }
    }

    fn write_command(&mut self, cmd: u8) -> Option<ResetRequest> {
        self.pending_cmd = 0;
        match cmd {
            0x20 => self.push(&[self.ctr]),
            0xa7 => self.ctr |= 0x20,
            0xa8 => self.ctr &= !0x20,
            0xa9 | 0xab => self.push(&[0x00]),
            0xaa => {
                self.status |= STAT_SYS;
                self.push(&[0x55]);
            }
            0xad => self.ctr |= 0x10,
            0xae => self.ctr &= !0x10,
            0xc0 => self.push(&[0x00]),
            0xd0 => self.push(&[self.outp]),
            c if CMDS_WITH_DATA.contains(&c) => self.pending_cmd = c,
            c if c >= 0xf0 && c & 1 == 0 => return Some(ResetRequest),
            _ => {}
        }
        None
    }

    fn write_data(&mut self, value: u8) -> Option<ResetRequest> {
        let cmd = std::mem::take(&mut self.pending_cmd);
        match cmd {
            0x60 => {
                self.ctr = value;
                if value & 0x04 != 0 {
                    self.status |= STAT_SYS;
                } else {
                    self.status &= !STAT_SYS;
                }
            }
            0xd1 => {
                self.outp = value;
                if value & 0x01 == 0 {
                    return Some(ResetRequest);
                }
            }
            0xd2 | 0xd3 => self.push(&[value]),
            0xd4 => {}
            _ => match value {
                0xff => self.push(&[0xfa, 0xaa]),
                0xf2 => self.push(&[0xfa, 0xab, 0x83]),
                0xee => self.push(&[0xee]),
                _ => self.push(&[0xfa]),
            },
        }
        None
    }

    pub(crate) fn validate(&self) -> Result<(), I8042Error> {
        if self.buffer.len() > BUFFER_SIZE {
            return Err(I8042Error::BufferOverflow(self.buffer.len()));
        }
        if self.pending_cmd != 0 && !CMDS_WITH_DATA.contains(&self.pending_cmd) {
            return Err(I8042Error::PendingCommand(self.pending_cmd));
        }
        if self.status & !STAT_STORED != 0 {
            return Err(I8042Error::Status(self.status));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command() {
        let mut k = I8042::new();
        // Linux's kb_wait: input buffer never full.
        assert_eq!(k.read(COMMAND_PORT) & 0x02, 0);
        assert_eq!(k.write(COMMAND_PORT, 0xfe), Some(ResetRequest));
        assert_eq!(k.write(COMMAND_PORT, 0xff), None);
        assert_eq!(k.write(COMMAND_PORT, 0xd1), None);
        assert_eq!(k.write(DATA_PORT, 0xce), Some(ResetRequest));
        assert_eq!(k.write(COMMAND_PORT, 0xd1), None);
        assert_eq!(k.write(DATA_PORT, 0xcf), None);
    }

    #[test]
    fn self_test_and_ctr() {
        let mut k = I8042::new();
        assert_eq!(k.read(COMMAND_PORT) & STAT_OBF, 0);
        k.write(COMMAND_PORT, 0xaa);
        assert_eq!(
            k.read(COMMAND_PORT) & (STAT_OBF | STAT_SYS),
            STAT_OBF | STAT_SYS
        );
        assert_eq!(k.read(DATA_PORT), 0x55);
        assert_eq!(k.read(COMMAND_PORT) & STAT_OBF, 0);
        k.write(COMMAND_PORT, 0x20);
        assert_eq!(k.read(DATA_PORT), 0x03);
        k.write(COMMAND_PORT, 0x60);
        k.write(DATA_PORT, 0x65);
        k.write(COMMAND_PORT, 0x20);
        assert_eq!(k.read(DATA_PORT), 0x65);
        k.write(DATA_PORT, 0xff);
        assert_eq!(k.read(DATA_PORT), 0xfa);
        assert_eq!(k.read(DATA_PORT), 0xaa);
        assert_eq!(k.read(DATA_PORT), 0xaa, "empty buffer repeats last byte");
        assert_eq!(k.read(0x61), 0xff);
    }

    #[test]
    fn buffer_is_bounded() {
        let mut k = I8042::new();
        for _ in 0..100 {
            k.write(COMMAND_PORT, 0x20);
        }
        assert_eq!(k.buffer.len(), BUFFER_SIZE);
        assert!(k.validate().is_ok());
    }
}
