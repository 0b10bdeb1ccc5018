//! `net-echo PORT`: a TCP echo service, several connections at once (one
//! smoltcp socket per connection, all listening on PORT; a closed one
//! listens again).

use smoltcp::iface::{SocketHandle, SocketSet};
use smoltcp::socket::tcp;

use crate::arena::Arena;
use crate::io;
use crate::netstack::{IpConfig, Net};

const CONNS: usize = 4;
const BUF: usize = 16 * 1024;

/// One pass over the sockets; returns whether anything moved.
fn pump(sockets: &mut SocketSet<'static>, handles: &[SocketHandle], port: u16) -> bool {
    let mut moved = false;
    let mut tmp = [0u8; 2048];
    for &h in handles {
        let s = sockets.get_mut::<tcp::Socket>(h);
        if !s.is_open() {
            let _ = s.listen(port);
            continue;
        }
        while s.can_recv() && s.can_send() {
            let room = (s.send_capacity() - s.send_queue()).min(tmp.len());
            let n = s.recv_slice(&mut tmp[..room]).unwrap_or(0);
            if n == 0 {
                break;
            }
            let _ = s.send_slice(&tmp[..n]);
            moved = true;
        }
        if !s.may_recv() && s.may_send() && s.send_queue() == 0 && !s.can_recv() {
            // The peer closed its side and everything was echoed.
            s.close();
            moved = true;
        }
    }
    moved
}

pub fn run(port: u64, ip: &IpConfig, arena: &mut Arena) -> ! {
    if port == 0 || port > 65535 {
        crate::fail(b"net-echo: PORT must be 1..65535", 2);
    }
    let port = port as u16;
    let mut net = Net::up(ip, 0);
    let mut handles = [SocketHandle::default(); CONNS];
    for h in handles.iter_mut() {
        *h = net.tcp_listener(arena, port, BUF, BUF);
    }
    io::puts(b"net-echo listening on port ");
    io::put_dec(port as u64);
    io::putc(b'\n');
    net.serve(|sockets| pump(sockets, &handles, port))
}
