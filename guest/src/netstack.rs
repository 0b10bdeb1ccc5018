//! The guest's TCP/IP stack: smoltcp (Ethernet, ARP, IPv4, TCP; no
//! allocator) over the virtio-net driver, with a static address.
//!
//! Time comes from the PIT: smoltcp's clock is the IRQ0 tick count scaled
//! to milliseconds (`hz=` ticks per second), so it advances only through
//! interrupts the VMM delivers and logs — never from RDTSC. The main loop
//! polls the stack when a frame arrived or when smoltcp's next timer is
//! due, and otherwise idles in HLT.

use core::sync::atomic::Ordering;

use smoltcp::iface::{
    Config, Interface, PollIngressSingleResult, SocketHandle, SocketSet, SocketStorage,
};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, Ipv4Address};

use crate::arena::Arena;
use crate::interrupts::{self, cli, sti};
use crate::io;
use crate::rt::mix64;
use crate::virtio::net::{NetDev, NET_EVENT};
use crate::Racy;

/// IPv4 configuration from the command line.
#[derive(Clone, Copy)]
pub struct IpConfig {
    pub addr: [u8; 4],
    pub prefix: u8,
    pub gw: Option<[u8; 4]>,
}

impl IpConfig {
    pub const DEFAULT: IpConfig = IpConfig {
        addr: [10, 0, 2, 15],
        prefix: 24,
        gw: None,
    };
}

pub const MAX_SOCKETS: usize = 8;
static SOCKET_STORAGE: Racy<[SocketStorage<'static>; MAX_SOCKETS]> =
    Racy::new([SocketStorage::EMPTY; MAX_SOCKETS]);

pub struct Net {
    pub iface: Interface,
    pub dev: NetDev,
    pub sockets: SocketSet<'static>,
}

/// Milliseconds since boot, from the PIT tick count.
pub fn now() -> Instant {
    Instant::from_millis((interrupts::ticks() * 1000 / interrupts::hz()) as i64)
}

fn put_ip(a: [u8; 4]) {
    for (i, b) in a.iter().enumerate() {
        if i > 0 {
            io::putc(b'.');
        }
        io::put_dec(*b as u64);
    }
}

impl Net {
    /// Probe the device and bring the interface up; exits with status 3
    /// when there is no network device. `seed` varies smoltcp's initial
    /// sequence numbers and ephemeral ports between boots.
    pub fn up(ip: &IpConfig, seed: u64) -> Net {
        let mut dev = NetDev::probe()
            .unwrap_or_else(|e| e.exit(b"no virtio-net device", &crate::virtio::NET));
        let mac = dev.mac;
        let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(mac)));
        let mut m = 0u64;
        for b in mac {
            m = m << 8 | b as u64;
        }
        config.random_seed = mix64(m ^ seed);
        let mut iface = Interface::new(config, &mut dev, now());
        let [a, b, c, d] = ip.addr;
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::new(Ipv4Address::new(a, b, c, d).into(), ip.prefix));
        });
        if let Some([a, b, c, d]) = ip.gw {
            let _ = iface
                .routes_mut()
                .add_default_ipv4_route(Ipv4Address::new(a, b, c, d));
        }
        io::puts(b"net: mac ");
        for (i, b) in mac.iter().enumerate() {
            if i > 0 {
                io::putc(b':');
            }
            io::putc(hex(b >> 4));
            io::putc(hex(b & 15));
        }
        io::puts(b" ip ");
        put_ip(ip.addr);
        io::putc(b'/');
        io::put_dec(ip.prefix as u64);
        if let Some(gw) = ip.gw {
            io::puts(b" gw ");
            put_ip(gw);
        }
        io::putc(b'\n');
        // SAFETY: called once; the storage lives forever.
        let storage = unsafe { &mut *SOCKET_STORAGE.get() };
        Net {
            iface,
            dev,
            sockets: SocketSet::new(&mut storage[..]),
        }
    }

    /// A TCP socket with buffers from `arena`, listening on `port`.
    pub fn tcp_listener(
        &mut self,
        arena: &mut Arena,
        port: u16,
        rx: usize,
        tx: usize,
    ) -> SocketHandle {
        let rxb = arena.take(rx, b"tcp buffers");
        let txb = arena.take(tx, b"tcp buffers");
        let mut s = tcp::Socket::new(tcp::SocketBuffer::new(rxb), tcp::SocketBuffer::new(txb));
        // Acknowledge at once: the sender is ACK-clocked, and a delayed
        // ACK (smoltcp's default 10 ms) leaves a slow guest idle.
        s.set_ack_delay(None);
        let _ = s.listen(port);
        self.sockets.add(s)
    }

    /// Run forever: feed received frames to the stack, let `app` work on
    /// the sockets (it returns whether it did anything, in which case we
    /// go round again at once), send, and otherwise sleep until a frame
    /// arrives or smoltcp's next timer is due.
    pub fn serve(&mut self, mut app: impl FnMut(&mut SocketSet<'static>) -> bool) -> ! {
        sti();
        loop {
            NET_EVENT.store(false, Ordering::Relaxed);
            // Every received frame first, then the application, then what
            // the sockets send: a reply carries the ACK of the request (one
            // frame, not an ACK and then the reply).
            let t = now();
            while self
                .iface
                .poll_ingress_single(t, &mut self.dev, &mut self.sockets)
                != PollIngressSingleResult::None
            {}
            // smoltcp's passes over the sockets are exit-free work too
            // (see io::progress).
            crate::io::progress(512);
            let busy = app(&mut self.sockets);
            crate::io::progress(512);
            self.iface
                .poll_egress(now(), &mut self.dev, &mut self.sockets);
            self.dev.kick();
            if busy {
                continue;
            }
            let hz = interrupts::hz();
            let deadline = self
                .iface
                .poll_delay(now(), &self.sockets)
                .map(|d| interrupts::ticks() + (d.total_millis() * hz).div_ceil(1000));
            loop {
                cli();
                if self.dev.rx_ready()
                    || NET_EVENT.load(Ordering::Relaxed)
                    || deadline.is_some_and(|d| interrupts::ticks() >= d)
                {
                    sti();
                    break;
                }
                interrupts::idle();
            }
        }
    }
}

fn hex(d: u8) -> u8 {
    if d < 10 {
        b'0' + d
    } else {
        b'a' + d - 10
    }
}
