//! One SMTP session (RFC 5321 subset): HELO/EHLO, MAIL FROM, RCPT TO,
//! DATA (dot-unstuffed, up to `MAX_MSG` bytes), RSET, NOOP, QUIT, plus
//! VRFY (252) and HELP (214). Commands and replies are processed in order,
//! so pipelined commands work too. An accepted message is on the disk,
//! flushed, before its `250`.

use smoltcp::iface::{SocketHandle, SocketSet};
use smoltcp::socket::tcp;

use super::store::{Store, StoreError, MAX_MSG};
use super::text::{
    accept, arg, find_line_dot, parse_dec, starts_with_ci, Conn, Line, Out, LINE_MAX,
};
use crate::virtio::SECTOR_SIZE;

pub const PORT: u16 = 25;
const MAX_RCPTS: u32 = 100;

#[derive(Clone, Copy, PartialEq)]
enum Data {
    /// Not in DATA: reading commands.
    Off,
    /// At the start of a line.
    Bol,
    /// Inside a line.
    Mid,
    /// Read a `.` at the start of a line.
    Dot,
    /// Read `.\r` at the start of a line.
    DotCr,
}

pub struct Session {
    h: SocketHandle,
    active: bool,
    helo: bool,
    mail: bool,
    rcpts: u32,
    quit: bool,
    line: Line,
    out: Out,
    data: Data,
    dlen: usize,
    too_big: bool,
    /// One header sector, then room for the message (see `Store::append`).
    buf: &'static mut [u8],
    pub accepted: u64,
}

impl Session {
    pub fn new(h: SocketHandle, buf: &'static mut [u8], out: &'static mut [u8]) -> Session {
        Session {
            h,
            active: false,
            helo: false,
            mail: false,
            rcpts: 0,
            quit: false,
            line: Line::new(),
            out: Out::new(out),
            data: Data::Off,
            dlen: 0,
            too_big: false,
            buf,
            accepted: 0,
        }
    }

    fn reset_transaction(&mut self) {
        self.mail = false;
        self.rcpts = 0;
    }

    fn greet(&mut self) {
        self.helo = false;
        self.quit = false;
        self.data = Data::Off;
        self.line.clear();
        self.out.clear();
        self.reset_transaction();
        self.out.push(b"220 tandem ESMTP ready\r\n");
    }

    /// Work on the connection; returns whether anything moved.
    pub fn pump(&mut self, sockets: &mut SocketSet<'static>, store: &mut Store) -> bool {
        let s = sockets.get_mut::<tcp::Socket>(self.h);
        match accept(s, PORT, &mut self.active) {
            Conn::Gone { .. } | Conn::Waiting => return false,
            Conn::Live => {}
            Conn::New => self.greet(),
        }
        let mut moved = self.out.flush(s);
        while !self.quit && self.out.is_empty() && s.can_recv() {
            let n = s.recv(|b| {
                let n = self.consume(b, store);
                (n, n)
            });
            match n {
                Ok(n) if n > 0 => moved = true,
                _ => break,
            }
            moved |= self.out.flush(s);
        }
        if self.quit
            && self.out.is_empty()
            && matches!(s.state(), tcp::State::Established | tcp::State::CloseWait)
        {
            s.close();
            moved = true;
        } else if !s.may_recv() && !self.quit {
            // The client went away without QUIT.
            s.close();
            self.quit = true;
            moved = true;
        }
        moved
    }

    /// Take bytes from `b`; stops after a command whose reply is queued
    /// (so that replies never pile up). Returns the bytes used.
    fn consume(&mut self, b: &[u8], store: &mut Store) -> usize {
        let mut i = 0;
        while i < b.len() {
            if self.data != Data::Off {
                i += self.data_bytes(&b[i..], store);
                if self.data == Data::Off {
                    return i;
                }
                continue;
            }
            let (n, done) = self.line.feed(&b[i..]);
            i += n;
            if done {
                self.command(store);
                self.line.clear();
                return i;
            }
        }
        i
    }

    fn add(&mut self, s: &[u8]) {
        if self.dlen + s.len() > MAX_MSG {
            self.too_big = true;
            return;
        }
        let at = SECTOR_SIZE + self.dlen;
        self.buf[at..at + s.len()].copy_from_slice(s);
        self.dlen += s.len();
    }

    /// DATA bytes: undo dot-stuffing, find the `.` line. Returns the bytes
    /// used (all of `b`, or up to the end of the terminator).
    fn data_bytes(&mut self, b: &[u8], store: &mut Store) -> usize {
        let mut i = 0;
        while i < b.len() {
            match self.data {
                Data::Mid | Data::Bol => {
                    // Copy up to the next line-starting dot (or the end),
                    // a slice at a time (see io::progress).
                    let rest = &b[i..b.len().min(i + 1024)];
                    crate::io::progress(rest.len());
                    match find_line_dot(rest, self.data == Data::Bol) {
                        Some(k) => {
                            self.add(&rest[..k]);
                            i += k + 1;
                            self.data = Data::Dot;
                        }
                        None => {
                            self.add(rest);
                            i += rest.len();
                            self.data = if rest.last() == Some(&b'\n') {
                                Data::Bol
                            } else {
                                Data::Mid
                            };
                        }
                    }
                }
                Data::Dot => {
                    if b[i] == b'\r' {
                        self.data = Data::DotCr;
                        i += 1;
                    } else {
                        self.data = Data::Mid;
                    }
                }
                Data::DotCr => {
                    if b[i] == b'\n' {
                        self.end_of_data(store);
                        return i + 1;
                    }
                    self.add(b"\r");
                    self.data = Data::Mid;
                }
                Data::Off => return i,
            }
        }
        i
    }

    fn end_of_data(&mut self, store: &mut Store) {
        self.data = Data::Off;
        if self.too_big {
            self.out
                .push(b"552 5.3.4 message exceeds the size limit\r\n");
        } else {
            match store.append(self.buf, self.dlen) {
                Ok(uid) => {
                    self.accepted += 1;
                    self.out.push(b"250 2.0.0 OK stored as ");
                    self.out.dec(uid);
                    self.out.push(b"\r\n");
                }
                Err(StoreError::Full) => self.out.push(b"452 4.3.1 mailbox full\r\n"),
                Err(StoreError::Io(msg) | StoreError::Corrupt(msg)) => {
                    crate::io::puts(b"ERROR mail: ");
                    crate::io::putln(msg);
                    self.out
                        .push(b"451 4.3.0 local error writing the mailbox\r\n")
                }
            }
        }
        self.reset_transaction();
    }

    fn command(&mut self, store: &Store) {
        if self.line.overlong {
            self.out.push(b"500 5.5.6 line too long\r\n");
            return;
        }
        let mut lb = [0u8; LINE_MAX];
        let line = self.line.copy_to(&mut lb);
        let verb = &line[..line.len().min(4)];
        let is = |v: &[u8]| starts_with_ci(verb, v) && line.get(4).is_none_or(|&c| c == b' ');
        if is(b"EHLO") || is(b"HELO") {
            let who = arg(line, 4);
            if who.is_empty() {
                self.out.push(b"501 5.5.4 domain or address required\r\n");
                return;
            }
            self.helo = true;
            self.reset_transaction();
            let ehlo = starts_with_ci(verb, b"EHLO");
            self.out.push(if ehlo {
                b"250-tandem Hello "
            } else {
                b"250 tandem Hello "
            });
            let who = &who[..who.len().min(200)];
            let mut tmp = [0u8; 200];
            tmp[..who.len()].copy_from_slice(who);
            self.out.push(&tmp[..who.len()]);
            self.out.push(b"\r\n");
            if ehlo {
                self.out
                    .push(b"250-8BITMIME\r\n250-PIPELINING\r\n250-XSTATS\r\n250 SIZE ");
                self.out.dec(MAX_MSG as u64);
                self.out.push(b"\r\n");
            }
        } else if is(b"MAIL") {
            if !starts_with_ci(line, b"MAIL FROM:") {
                self.out.push(b"501 5.5.4 syntax: MAIL FROM:<address>\r\n");
            } else if !self.helo {
                self.out.push(b"503 5.5.1 EHLO or HELO first\r\n");
            } else if self.mail {
                self.out.push(b"503 5.5.1 nested MAIL command\r\n");
            } else if declared_size(line).is_some_and(|n| n > MAX_MSG as u64) {
                self.out
                    .push(b"552 5.3.4 message exceeds the size limit\r\n");
            } else {
                self.mail = true;
                self.rcpts = 0;
                self.out.push(b"250 2.1.0 OK\r\n");
            }
        } else if is(b"RCPT") {
            if !starts_with_ci(line, b"RCPT TO:") {
                self.out.push(b"501 5.5.4 syntax: RCPT TO:<address>\r\n");
            } else if !self.mail {
                self.out.push(b"503 5.5.1 MAIL first\r\n");
            } else if self.rcpts >= MAX_RCPTS {
                self.out.push(b"452 4.5.3 too many recipients\r\n");
            } else {
                self.rcpts += 1;
                self.out.push(b"250 2.1.5 OK\r\n");
            }
        } else if is(b"DATA") {
            if !self.mail {
                self.out.push(b"503 5.5.1 MAIL first\r\n");
            } else if self.rcpts == 0 {
                self.out.push(b"554 5.5.1 no valid recipients\r\n");
            } else {
                self.data = Data::Bol;
                self.dlen = 0;
                self.too_big = false;
                self.out.push(b"354 End data with <CR><LF>.<CR><LF>\r\n");
            }
        } else if is(b"RSET") {
            self.reset_transaction();
            self.out.push(b"250 2.0.0 OK\r\n");
        } else if is(b"NOOP") {
            self.out.push(b"250 2.0.0 OK\r\n");
        } else if is(b"QUIT") {
            self.out.push(b"221 2.0.0 tandem closing connection\r\n");
            self.quit = true;
        } else if is(b"VRFY") {
            self.out
                .push(b"252 2.5.2 cannot VRFY user, but will accept the message\r\n");
        } else if starts_with_ci(line, b"XSTATS") {
            // Local extension (RFC 5321 allows X verbs): what the guest
            // spent so far, for the benchmark's cost per message.
            let n =
                |c: &core::sync::atomic::AtomicU64| c.load(core::sync::atomic::Ordering::Relaxed);
            self.out.push(b"250 hz=");
            self.out.dec(crate::interrupts::hz());
            self.out.push(b" ticks=");
            self.out.dec(crate::interrupts::ticks());
            self.out.push(b" busy=");
            self.out.dec(n(&crate::interrupts::BUSY_TICKS));
            self.out.push(b" busy_tsc=");
            self.out.dec(n(&crate::interrupts::BUSY_TSC));
            self.out.push(b" rx=");
            self.out.dec(n(&crate::virtio::net::RX_FRAMES));
            self.out.push(b" tx=");
            self.out.dec(n(&crate::virtio::net::TX_FRAMES));
            self.out.push(b" notifies=");
            self.out.dec(n(&crate::virtio::net::NOTIFIES));
            self.out.push(b" stored=");
            self.out.dec(store.n as u64);
            self.out.push(b"\r\n");
        } else if is(b"HELP") {
            self.out
                .push(b"214 2.0.0 commands: HELO EHLO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP\r\n");
        } else {
            self.out.push(b"500 5.5.2 command not recognized\r\n");
        }
    }
}

/// The `SIZE=` parameter of a MAIL command, if any.
fn declared_size(line: &[u8]) -> Option<u64> {
    let mut words = line.split(|&c| c == b' ');
    words.find_map(|w| {
        if starts_with_ci(w, b"SIZE=") {
            parse_dec(&w[5..])
        } else {
            None
        }
    })
}
