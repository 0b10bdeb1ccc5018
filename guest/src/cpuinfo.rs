//! The `cpuid` workload: print what CPUID tells the guest (the leaves a
//! kernel reads first) and end with a checksum of them, so that a test can
//! check that the guest sees its CPU model's table and nothing of the host.

use core::arch::x86_64::__cpuid_count;

use crate::rt::Hash;
use crate::{io, result};

/// `(leaf, subleaf)` printed, in order.
const LEAVES: &[(u32, u32)] = &[
    (0, 0),
    (1, 0),
    (6, 0),
    (7, 0),
    (0xa, 0),
    (0xd, 0),
    (0xd, 1),
    (0x4000_0000, 0),
    (0x8000_0000, 0),
    (0x8000_0001, 0),
    (0x8000_0007, 0),
    (0x8000_0008, 0),
];

pub fn run() -> ! {
    let mut h = Hash::new();
    for &(leaf, sub) in LEAVES {
        // `cpuid` is no SSE instruction; it only reads the CPU's identity.
        let r = __cpuid_count(leaf, sub);
        io::puts(b"cpuid ");
        io::put_hex(leaf as u64);
        io::putc(b'.');
        io::put_dec(sub as u64);
        for v in [r.eax, r.ebx, r.ecx, r.edx] {
            io::putc(b' ');
            io::put_hex(v as u64);
            h.u64(v as u64);
        }
        io::putc(b'\n');
    }
    let v = __cpuid_count(0, 0);
    io::puts(b"vendor ");
    for w in [v.ebx, v.edx, v.ecx] {
        io::puts(&w.to_le_bytes());
    }
    io::putc(b'\n');
    io::puts(b"brand ");
    for leaf in 0x8000_0002u32..=0x8000_0004 {
        let r = __cpuid_count(leaf, 0);
        for w in [r.eax, r.ebx, r.ecx, r.edx] {
            for c in w.to_le_bytes() {
                if c != 0 {
                    io::putc(c);
                }
            }
        }
    }
    io::putc(b'\n');
    result(b"cpuid", h.finish())
}
