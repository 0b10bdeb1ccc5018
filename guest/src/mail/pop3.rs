//! One POP3 session (RFC 1939 subset): USER/PASS, STAT, LIST, UIDL, RETR
//! (dot-stuffed, streamed), DELE, RSET, NOOP, QUIT, plus CAPA. Any user
//! name and password open the one mailbox; one session at a time holds
//! it (another gets `-ERR maildrop already locked`). Deletions are
//! committed to the disk, flushed, when the session QUITs; a dropped
//! connection deletes nothing.

use smoltcp::iface::{SocketHandle, SocketSet};
use smoltcp::socket::tcp;

use super::store::{Store, MAX_MSGS};
use super::text::{
    accept, arg, find_line_dot, parse_dec, starts_with_ci, Conn, Line, Out, LINE_MAX,
};
use crate::arena::Arena;

pub const PORT: u16 = 110;

#[derive(Clone, Copy, PartialEq)]
enum State {
    Auth,
    Trans,
}

/// A RETR in progress.
struct Retr {
    len: usize,
    pos: usize,
    bol: bool,
    tail: &'static [u8],
    tail_off: usize,
}

pub struct Session {
    h: SocketHandle,
    active: bool,
    state: State,
    user: bool,
    quit: bool,
    line: Line,
    out: Out,
    /// Store index of each message number (1-based number = index + 1)
    /// at login.
    idx: &'static mut [u16],
    count: usize,
    dele: &'static mut [bool],
    uids: &'static mut [u64],
    retr: Option<Retr>,
    buf: &'static mut [u8],
}

impl Session {
    pub fn new(h: SocketHandle, arena: &mut Arena, buf: &'static mut [u8]) -> Session {
        let what = b"mail buffers";
        Session {
            h,
            active: false,
            state: State::Auth,
            user: false,
            quit: false,
            line: Line::new(),
            out: Out::new(arena.take(32 * 1024, what)),
            idx: arena.array(MAX_MSGS, 0u16, what),
            count: 0,
            dele: arena.array(MAX_MSGS, false, what),
            uids: arena.array(MAX_MSGS, 0u64, what),
            retr: None,
            buf,
        }
    }

    fn greet(&mut self) {
        self.state = State::Auth;
        self.user = false;
        self.quit = false;
        self.retr = None;
        self.line.clear();
        self.out.clear();
        self.out.push(b"+OK tandem POP3 ready\r\n");
    }

    pub fn pump(
        &mut self,
        sockets: &mut SocketSet<'static>,
        store: &mut Store,
        locked: &mut bool,
    ) -> bool {
        let s = sockets.get_mut::<tcp::Socket>(self.h);
        match accept(s, PORT, &mut self.active) {
            Conn::Gone { was_live } => {
                if was_live {
                    self.end(locked);
                }
                return false;
            }
            Conn::Waiting => return false,
            Conn::Live => {}
            Conn::New => self.greet(),
        }
        let mut moved = self.out.flush(s);
        if self.out.is_empty() && self.retr.is_some() {
            moved |= self.stream(s);
        }
        while !self.quit && self.out.is_empty() && self.retr.is_none() && s.can_recv() {
            let r = s.recv(|b| {
                let (n, done) = self.line.feed(b);
                (n, done)
            });
            match r {
                Ok(true) => {
                    self.command(store, locked);
                    self.line.clear();
                    moved = true;
                    moved |= self.out.flush(s);
                    if self.out.is_empty() && self.retr.is_some() {
                        self.stream(s);
                    }
                }
                Ok(false) => moved = true,
                Err(_) => break,
            }
        }
        if self.quit
            && self.out.is_empty()
            && matches!(s.state(), tcp::State::Established | tcp::State::CloseWait)
        {
            s.close();
            self.end(locked);
            moved = true;
        } else if !s.may_recv() && !self.quit {
            s.close();
            self.quit = true;
            self.end(locked);
            moved = true;
        }
        moved
    }

    /// The session is over: give the mailbox back.
    fn end(&mut self, locked: &mut bool) {
        if self.state == State::Trans {
            *locked = false;
            self.state = State::Auth;
        }
        self.active = false;
        self.retr = None;
    }

    /// Stream the RETR in progress into the socket, dot-stuffed.
    fn stream(&mut self, s: &mut tcp::Socket) -> bool {
        let Some(mut r) = self.retr.take() else {
            return false;
        };
        let buf = &self.buf[..r.len];
        let mut moved = false;
        while s.can_send() {
            let n = s
                .send(|tx| {
                    let n = fill(&mut r, buf, tx);
                    (n, n)
                })
                .unwrap_or(0);
            if n == 0 {
                break;
            }
            moved = true;
        }
        if r.tail_off < r.tail.len() || r.pos < r.len {
            self.retr = Some(r);
        }
        moved
    }

    /// Message number → store index, if it exists and is not deleted.
    fn msg(&self, a: &[u8]) -> Option<usize> {
        let n = parse_dec(a)? as usize;
        if n == 0 || n > self.count || self.dele[n - 1] {
            return None;
        }
        Some(self.idx[n - 1] as usize)
    }

    fn command(&mut self, store: &mut Store, locked: &mut bool) {
        if self.line.overlong {
            self.out.push(b"-ERR line too long\r\n");
            return;
        }
        let mut lb = [0u8; LINE_MAX];
        let line = self.line.copy_to(&mut lb);
        let verb = &line[..line.len().min(4)];
        let is = |v: &[u8]| starts_with_ci(verb, v) && line.get(4).is_none_or(|&c| c == b' ');
        let a = arg(line, 4);
        if is(b"QUIT") {
            if self.state == State::Trans {
                let mut n = 0;
                for k in 0..self.count {
                    if self.dele[k] {
                        self.uids[n] = store.msgs[self.idx[k] as usize].uid;
                        n += 1;
                    }
                }
                if store.delete(&self.uids[..n]).is_err() {
                    self.out.push(b"-ERR some deleted messages not removed\r\n");
                    self.quit = true;
                    return;
                }
            }
            self.out.push(b"+OK tandem POP3 signing off\r\n");
            self.quit = true;
        } else if is(b"CAPA") {
            self.out
                .push(b"+OK capability list follows\r\nUSER\r\nUIDL\r\n.\r\n");
        } else if self.state == State::Auth {
            if is(b"USER") {
                if a.is_empty() {
                    self.out.push(b"-ERR user name required\r\n");
                } else {
                    self.user = true;
                    self.out.push(b"+OK send PASS\r\n");
                }
            } else if is(b"PASS") {
                if !self.user {
                    self.out.push(b"-ERR USER first\r\n");
                } else if *locked {
                    self.user = false;
                    self.out.push(b"-ERR maildrop already locked\r\n");
                } else {
                    *locked = true;
                    self.state = State::Trans;
                    self.count = 0;
                    for (i, m) in store.msgs[..store.n].iter().enumerate() {
                        if !m.deleted {
                            self.idx[self.count] = i as u16;
                            self.dele[self.count] = false;
                            self.count += 1;
                        }
                    }
                    self.out.push(b"+OK maildrop has ");
                    self.out.dec(self.count as u64);
                    self.out.push(b" messages\r\n");
                }
            } else {
                self.out.push(b"-ERR USER and PASS first\r\n");
            }
        } else if is(b"STAT") {
            let (mut n, mut size) = (0u64, 0u64);
            for k in 0..self.count {
                if !self.dele[k] {
                    n += 1;
                    size += store.msgs[self.idx[k] as usize].len;
                }
            }
            self.out.push(b"+OK ");
            self.out.dec(n);
            self.out.push(b" ");
            self.out.dec(size);
            self.out.push(b"\r\n");
        } else if is(b"LIST") || is(b"UIDL") {
            let uidl = starts_with_ci(verb, b"UIDL");
            let item = |out: &mut Out, k: usize, i: usize| {
                out.dec(k as u64 + 1);
                out.push(b" ");
                let m = &store.msgs[i];
                out.dec(if uidl { m.uid } else { m.len });
                out.push(b"\r\n");
            };
            if a.is_empty() {
                self.out.push(b"+OK\r\n");
                for k in 0..self.count {
                    if !self.dele[k] {
                        item(&mut self.out, k, self.idx[k] as usize);
                    }
                }
                self.out.push(b".\r\n");
            } else if let Some(i) = self.msg(a) {
                self.out.push(b"+OK ");
                let k = parse_dec(a).unwrap_or(1) as usize - 1;
                item(&mut self.out, k, i);
            } else {
                self.out.push(b"-ERR no such message\r\n");
            }
        } else if is(b"RETR") {
            match self.msg(a) {
                None => self.out.push(b"-ERR no such message\r\n"),
                Some(i) => match store.read(i, self.buf) {
                    Ok(len) => {
                        self.out.push(b"+OK ");
                        self.out.dec(len as u64);
                        self.out.push(b" octets\r\n");
                        let ends_crlf = len == 0 || self.buf[..len].ends_with(b"\r\n");
                        self.retr = Some(Retr {
                            len,
                            pos: 0,
                            bol: true,
                            tail: if ends_crlf { b".\r\n" } else { b"\r\n.\r\n" },
                            tail_off: 0,
                        });
                    }
                    Err(_) => self
                        .out
                        .push(b"-ERR message unreadable (checksum or I/O)\r\n"),
                },
            }
        } else if is(b"DELE") {
            let n = parse_dec(a).unwrap_or(0) as usize;
            if self.msg(a).is_some() {
                self.dele[n - 1] = true;
                self.out.push(b"+OK message deleted\r\n");
            } else {
                self.out.push(b"-ERR no such message\r\n");
            }
        } else if is(b"RSET") {
            self.dele[..self.count].fill(false);
            self.out.push(b"+OK\r\n");
        } else if is(b"NOOP") {
            self.out.push(b"+OK\r\n");
        } else {
            self.out.push(b"-ERR unknown command\r\n");
        }
    }
}

/// Fill `tx` with the next dot-stuffed bytes of the message `buf`, then
/// the terminator. Returns the bytes written.
fn fill(r: &mut Retr, buf: &[u8], tx: &mut [u8]) -> usize {
    let mut w = 0;
    while w < tx.len() {
        if r.pos == r.len {
            let t = &r.tail[r.tail_off..];
            let n = t.len().min(tx.len() - w);
            tx[w..w + n].copy_from_slice(&t[..n]);
            r.tail_off += n;
            return w + n;
        }
        if r.bol && buf[r.pos] == b'.' {
            // Stuff it; the dot itself follows with `bol` false.
            tx[w] = b'.';
            w += 1;
            r.bol = false;
            continue;
        }
        let avail = (tx.len() - w).min(r.len - r.pos).min(1024);
        crate::io::progress(avail);
        let seg = &buf[r.pos..r.pos + avail];
        // Copy up to the next line-starting dot (never at 0: see above).
        let n = find_line_dot(seg, false).unwrap_or(avail);
        r.bol = seg[n - 1] == b'\n';
        tx[w..w + n].copy_from_slice(&seg[..n]);
        w += n;
        r.pos += n;
    }
    w
}
