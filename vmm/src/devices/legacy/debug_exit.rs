//! Debug ports: isa-debug-exit style exit port (0xf4) and the POST code
//! port (0x80).
//!
//! **Exit status.** A byte written to port 0xf4 ends the VM with that byte
//! as its exit status (0-255). This differs from QEMU's isa-debug-exit,
//! whose process exit status is `(value << 1) | 1`: here the status is the
//! value itself, so a guest writing 0 reports success.

/// The exit port.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// The POST code port.
pub const POST_CODE_PORT: u16 = 0x80;

/// The guest asked to end the VM with `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitRequest {
    /// Exit status (the byte written).
    pub status: i32,
}

/// The isa-debug-exit style device. Stateless.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DebugExit;

impl DebugExit {
    /// The device.
    pub fn new() -> Self {
        DebugExit
    }

    /// Guest IN: reads 0xff (nothing there).
    pub fn read(&mut self) -> u8 {
        0xff
    }

    /// Guest OUT of `value`: the VM must end with status `value`.
    pub fn write(&mut self, value: u8) -> ExitRequest {
        ExitRequest {
            status: i32::from(value),
        }
    }
}

/// Port 0x80: firmware/kernels write progress codes (and Linux uses it as
/// an I/O delay). Keeps the last code written; reads return it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PostCode {
    pub(crate) last: u8,
}

impl PostCode {
    /// Power-on state (last code 0).
    pub fn new() -> Self {
        PostCode { last: 0 }
    }

    /// Guest IN: the last code written.
    pub fn read(&mut self) -> u8 {
        self.last
    }

    /// Guest OUT of a POST code.
    pub fn write(&mut self, value: u8) {
        self.last = value;
    }

    /// The last code written (for diagnostics).
    pub fn last(&self) -> u8 {
        self.last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_status_is_the_value() {
        let mut d = DebugExit::new();
        assert_eq!(d.write(0).status, 0);
        assert_eq!(d.write(1).status, 1);
        assert_eq!(d.write(0xff).status, 255);
        assert_eq!(d.read(), 0xff);
    }

    #[test]
    fn post_code_keeps_last() {
        let mut p = PostCode::new();
        assert_eq!(p.read(), 0);
        p.write(0x42);
        p.write(0x43);
        assert_eq!(p.read(), 0x43);
        assert_eq!(p.last(), 0x43);
    }
}
