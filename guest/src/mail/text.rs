//! Byte helpers shared by the SMTP and POP3 sessions.

use smoltcp::socket::tcp;

/// Index of the first `\n` in `s`, eight bytes per step.
pub fn find_lf(s: &[u8]) -> Option<usize> {
    find_byte::<0x0a>(s)
}

/// Index of the first `.` that starts a line in `s`: right after a `\n`,
/// or at 0 if `bol` (the byte before `s` ended a line). Dots are rare, so
/// this costs one eight-byte step per eight bytes and nothing per line.
pub fn find_line_dot(s: &[u8], bol: bool) -> Option<usize> {
    let mut from = 0;
    while let Some(k) = find_byte::<b'.'>(&s[from..]) {
        let p = from + k;
        if (p == 0 && bol) || (p > 0 && s[p - 1] == b'\n') {
            return Some(p);
        }
        from = p + 1;
    }
    None
}

/// Index of the first byte `B` in `s`: 32 bytes per step, then 8 (the
/// "has a zero byte" trick on `word ^ B*0x01..01`; no SIMD in the guest).
pub fn find_byte<const B: u8>(s: &[u8]) -> Option<usize> {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    let pat: u64 = LO * B as u64;
    let word = |i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&s[i..i + 8]);
        u64::from_le_bytes(w) ^ pat
    };
    let zeroish = |x: u64| x.wrapping_sub(LO) & !x;
    let mut i = 0;
    while i + 32 <= s.len() {
        let z =
            zeroish(word(i)) | zeroish(word(i + 8)) | zeroish(word(i + 16)) | zeroish(word(i + 24));
        if z & HI != 0 {
            break;
        }
        i += 32;
    }
    while i + 8 <= s.len() {
        let z = zeroish(word(i)) & HI;
        if z != 0 {
            return Some(i + (z.trailing_zeros() / 8) as usize);
        }
        i += 8;
    }
    s[i..].iter().position(|&c| c == B).map(|k| i + k)
}

/// Where a session's connection stands (see [`accept`]).
pub enum Conn {
    /// No connection (the socket listens again); a session that was live
    /// has ended.
    Gone {
        was_live: bool,
    },
    /// A handshake is under way.
    Waiting,
    /// Just established: greet.
    New,
    Live,
}

/// Track one listening socket's connection: re-listen when it is closed,
/// report a new one once established. `live` is the session's flag.
pub fn accept(s: &mut tcp::Socket, port: u16, live: &mut bool) -> Conn {
    if !s.is_open() {
        let was_live = core::mem::take(live);
        let _ = s.listen(port);
        return Conn::Gone { was_live };
    }
    if *live {
        Conn::Live
    } else if s.state() == tcp::State::Established {
        *live = true;
        Conn::New
    } else {
        Conn::Waiting
    }
}

/// Case-insensitive "starts with" (`prefix` in upper case).
pub fn starts_with_ci(s: &[u8], prefix: &[u8]) -> bool {
    s.len() >= prefix.len()
        && s.iter()
            .zip(prefix)
            .all(|(&a, &b)| a.to_ascii_uppercase() == b)
}

/// A reply buffer: bytes waiting for room in the socket.
pub struct Out {
    buf: &'static mut [u8],
    len: usize,
    off: usize,
}

impl Out {
    pub fn new(buf: &'static mut [u8]) -> Out {
        Out {
            buf,
            len: 0,
            off: 0,
        }
    }
    pub fn is_empty(&self) -> bool {
        self.off == self.len
    }
    pub fn clear(&mut self) {
        self.len = 0;
        self.off = 0;
    }
    pub fn push(&mut self, s: &[u8]) {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s[..n]);
        self.len += n;
    }
    pub fn dec(&mut self, mut v: u64) {
        let mut d = [0u8; 20];
        let mut i = d.len();
        loop {
            i -= 1;
            d[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&d[i..]);
    }
    /// Send what fits; returns whether anything was sent.
    pub fn flush(&mut self, s: &mut tcp::Socket) -> bool {
        if self.is_empty() || !s.can_send() {
            return false;
        }
        let n = s.send_slice(&self.buf[self.off..self.len]).unwrap_or(0);
        self.off += n;
        if self.off == self.len {
            self.clear();
        }
        n > 0
    }
}

/// A command line being assembled (at most `LINE_MAX` bytes kept).
pub const LINE_MAX: usize = 1000;

pub struct Line {
    buf: [u8; LINE_MAX],
    len: usize,
    pub overlong: bool,
}

impl Line {
    pub const fn new() -> Line {
        Line {
            buf: [0; LINE_MAX],
            len: 0,
            overlong: false,
        }
    }
    pub fn clear(&mut self) {
        self.len = 0;
        self.overlong = false;
    }
    /// Feed bytes until a `\n`; returns how many were taken and whether the
    /// line is complete.
    pub fn feed(&mut self, s: &[u8]) -> (usize, bool) {
        let (take, done) = match find_lf(s) {
            Some(k) => (k + 1, true),
            None => (s.len(), false),
        };
        let body = &s[..if done { take - 1 } else { take }];
        let n = body.len().min(LINE_MAX - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&body[..n]);
        self.len += n;
        if n < body.len() {
            self.overlong = true;
        }
        (take, done)
    }
    /// Copy the line (without its CR) to `dst`.
    pub fn copy_to<'a>(&self, dst: &'a mut [u8; LINE_MAX]) -> &'a [u8] {
        let l = self.get();
        dst[..l.len()].copy_from_slice(l);
        &dst[..l.len()]
    }

    /// The line without its CR.
    pub fn get(&self) -> &[u8] {
        let l = &self.buf[..self.len];
        l.strip_suffix(b"\r").unwrap_or(l)
    }
}

/// The argument after the verb (and one space), trimmed.
pub fn arg(line: &[u8], verb_len: usize) -> &[u8] {
    let a = line.get(verb_len..).unwrap_or(&[]);
    let a = a.strip_prefix(b" ").unwrap_or(a);
    trim(a)
}

pub fn trim(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

pub fn parse_dec(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 19 {
        return None;
    }
    let mut v = 0u64;
    for &c in s {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v * 10 + (c - b'0') as u64;
    }
    Some(v)
}
