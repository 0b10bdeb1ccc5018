//! Freestanding runtime support: mem* functions (no SSE), unwinding stubs,
//! the panic handler, a `Sync` cell and the checksum hash.

use core::arch::asm;
use core::cell::UnsafeCell;

/// A static cell for data shared between the (single) CPU's main flow and
/// its interrupt handlers; callers guarantee exclusion (cli or ownership).
pub struct Racy<T>(UnsafeCell<T>);

// SAFETY: one CPU; users serialise access themselves.
unsafe impl<T> Sync for Racy<T> {}

impl<T> Racy<T> {
    pub const fn new(v: T) -> Self {
        Racy(UnsafeCell::new(v))
    }
    pub fn get(&self) -> *mut T {
        self.0.get()
    }
}

/// Forward copy: 8 bytes per `movsq` step, then the tail by bytes (an
/// emulated CPU pays per repetition, so wide steps matter).
#[inline(always)]
unsafe fn copy_forward(dst: *mut u8, src: *const u8, n: usize) {
    asm!("rep movsq", "mov rcx, {tail}", "rep movsb",
         tail = in(reg) n & 7,
         inout("rdi") dst => _, inout("rsi") src => _, inout("rcx") n >> 3 => _,
         options(nostack, preserves_flags));
}

#[no_mangle]
unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    copy_forward(dst, src, n);
    dst
}

#[no_mangle]
unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize).wrapping_sub(src as usize) >= n {
        // No overlap, or dst below src: a forward copy (each 8-byte step
        // reads its source before writing, and writes stay below the
        // bytes still to be read).
        copy_forward(dst, src, n);
    } else {
        // dst overlaps the tail of src: copy backwards.
        asm!("std", "rep movsb", "cld",
             inout("rdi") dst.add(n).wrapping_sub(1) => _,
             inout("rsi") src.add(n).wrapping_sub(1) => _,
             inout("rcx") n => _,
             options(nostack));
    }
    dst
}

#[no_mangle]
unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    asm!("rep stosb", inout("rdi") dst => _, inout("rcx") n => _, in("al") c as u8,
         options(nostack, preserves_flags));
    dst
}

#[no_mangle]
unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        let x = core::ptr::read_volatile(a.add(i));
        let y = core::ptr::read_volatile(b.add(i));
        if x != y {
            return x as i32 - y as i32;
        }
        i += 1;
    }
    0
}

#[no_mangle]
unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    memcmp(a, b, n)
}

#[no_mangle]
extern "C" fn rust_eh_personality() {}

#[no_mangle]
extern "C" fn _Unwind_Resume() -> ! {
    crate::io::exit(0x7f)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    // No message formatting: that would pull in core::fmt (SSE).
    crate::io::puts(b"ERROR panic");
    if let Some(loc) = info.location() {
        crate::io::puts(b" at ");
        crate::io::puts(loc.file().as_bytes());
        crate::io::putc(b':');
        crate::io::put_dec(loc.line() as u64);
    }
    crate::io::putc(b'\n');
    crate::io::exit(0x7f)
}

/// FNV-1a 64: the checksum of every RESULT line.
#[derive(Clone, Copy)]
pub struct Hash(pub u64);

impl Hash {
    pub const fn new() -> Self {
        Hash(0xcbf2_9ce4_8422_2325)
    }
    pub fn byte(&mut self, b: u8) {
        self.0 ^= b as u64;
        self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
    }
    pub fn bytes(&mut self, s: &[u8]) {
        for &b in s {
            self.byte(b);
        }
    }
    pub fn u64(&mut self, v: u64) {
        for i in 0..8 {
            self.byte((v >> (i * 8)) as u8);
        }
    }
    pub fn finish(self) -> u64 {
        self.0
    }
}

/// splitmix64 finaliser.
pub fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
