//! `mail`: an SMTP server on port 25 and a POP3 server on port 110 over
//! one on-disk mailbox (see [`store`]); both run until the VM is stopped.
//! It needs the virtio-blk disk (without one: `ERROR`, status 3) and the
//! network device, and about 22 MiB of RAM above 8 MiB for its buffers.
//!
//! Per message the costly parts are the TCP receive path (smoltcp, about
//! one frame per 1460 bytes), one pass over the data to undo dot-stuffing
//! (eight bytes per step), one hash pass, and the disk write (256 KiB per
//! request) plus one flush. Nothing is printed per message: every console
//! byte is a VM exit.

mod pop3;
mod smtp;
mod store;
mod text;

use smoltcp::iface::SocketHandle;

use crate::arena::Arena;
use crate::io;
use crate::netstack::{IpConfig, Net};
use crate::virtio::{blk::Blk, SECTOR_SIZE};
use store::{Store, MAX_MSG};

const SMTP_SESSIONS: usize = 4;
const POP_SESSIONS: usize = 2;
const MSG_BUF: usize = SECTOR_SIZE + MAX_MSG;

pub fn run(ip: &IpConfig, arena: &mut Arena) -> ! {
    let blk = Blk::probe().unwrap_or_else(|e| {
        e.exit(
            b"mail needs a disk: no virtio-blk device",
            &crate::virtio::BLK,
        )
    });
    crate::interrupts::sti();
    let mut net_handles = [SocketHandle::default(); SMTP_SESSIONS + POP_SESSIONS];
    let mut pops: [Option<pop3::Session>; POP_SESSIONS] = [const { None }; POP_SESSIONS];
    let mut smtps: [Option<smtp::Session>; SMTP_SESSIONS] = [const { None }; SMTP_SESSIONS];

    // Buffers first (the store borrows a POP buffer while it opens).
    let mut pop_bufs: [Option<&'static mut [u8]>; POP_SESSIONS] = [const { None }; POP_SESSIONS];
    for b in pop_bufs.iter_mut() {
        *b = Some(arena.take(MSG_BUF, b"mail buffers"));
    }
    let scratch = arena.take(8 * SECTOR_SIZE, b"mail buffers");
    let tmp = pop_bufs[0]
        .as_deref_mut()
        .unwrap_or_else(|| crate::fail(b"mail: no buffer", 3));
    let msgs = arena.array(store::MAX_MSGS, store::NO_META, b"mail buffers");
    let mut store = match Store::open(blk, scratch, msgs, tmp) {
        Ok(s) => s,
        Err(msg) => crate::fail(msg, 1),
    };
    let live = store.msgs[..store.n].iter().filter(|m| !m.deleted).count();
    io::puts(b"mail: mailbox has ");
    io::put_dec(live as u64);
    io::puts(b" messages (boot ");
    io::put_dec(store.boots);
    io::putln(b")");

    let mut net = Net::up(ip, store.boots);
    for (i, h) in net_handles.iter_mut().enumerate() {
        *h = if i < SMTP_SESSIONS {
            net.tcp_listener(arena, smtp::PORT, 64 * 1024, 4096)
        } else {
            net.tcp_listener(arena, pop3::PORT, 4096, 64 * 1024)
        };
    }
    for (i, s) in smtps.iter_mut().enumerate() {
        let buf = arena.take(MSG_BUF, b"mail buffers");
        let out = arena.take(1024, b"mail buffers");
        *s = Some(smtp::Session::new(net_handles[i], buf, out));
    }
    for (i, p) in pops.iter_mut().enumerate() {
        let buf = pop_bufs[i]
            .take()
            .unwrap_or_else(|| crate::fail(b"mail: no buffer", 3));
        *p = Some(pop3::Session::new(
            net_handles[SMTP_SESSIONS + i],
            arena,
            buf,
        ));
    }
    io::putln(b"mail ready: smtp port 25, pop3 port 110");
    let mut locked = false;
    net.serve(|sockets| {
        let mut moved = false;
        for s in smtps.iter_mut().flatten() {
            moved |= s.pump(sockets, &mut store);
        }
        for p in pops.iter_mut().flatten() {
            moved |= p.pump(sockets, &mut store, &mut locked);
        }
        moved
    })
}
