//! The model of one direction of the emulated link, with no sockets in it:
//! seeded loss, a bottleneck of fixed rate with a tail-drop queue, and a
//! fixed one-way propagation delay.
//!
//! For every frame, in arrival order:
//! 1. one number is drawn from the direction's seeded stream, whatever
//!    happens next, so the k-th frame of a direction is lost or not
//!    depending only on the seed and k (reproducible across runs whatever
//!    the timing);
//! 2. a lost frame is dropped (it uses no bandwidth);
//! 3. the frame is serialised onto the bottleneck: it starts when the
//!    previous one has left (`max(now, busy_until)`) and takes
//!    `len * 8 / rate`. A frame that would wait longer than the queue limit
//!    is tail-dropped, as a router's full buffer does;
//! 4. it arrives at the other end one propagation delay after it has left.

use std::time::{Duration, Instant};

/// Settings of one direction.
#[derive(Debug, Clone, Copy)]
pub struct LinkConfig {
    /// One-way propagation delay.
    pub delay: Duration,
    /// Loss probability in parts per million.
    pub loss_ppm: u32,
    /// Bottleneck rate in bits per second; `None`: no rate limit.
    pub rate_bps: Option<u64>,
    /// Longest a frame may wait in the bottleneck's queue.
    pub queue: Duration,
}

/// What happens to one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Deliver it at this instant.
    Deliver(Instant),
    /// Dropped by the seeded loss stream.
    Lost,
    /// Dropped because the bottleneck's queue is full.
    QueueFull,
}

/// xorshift64* seeded through splitmix64: small, fast, reproducible.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        Rng(if z == 0 { 1 } else { z })
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in 0..1_000_000.
    pub fn ppm(&mut self) -> u32 {
        (((self.next_u64() >> 32) * 1_000_000) >> 32) as u32
    }
}

/// One direction's state.
#[derive(Debug)]
pub struct Link {
    cfg: LinkConfig,
    rng: Rng,
    busy_until: Option<Instant>,
}

impl Link {
    pub fn new(cfg: LinkConfig, seed: u64) -> Link {
        Link {
            cfg,
            rng: Rng::new(seed),
            busy_until: None,
        }
    }

    /// Decide the fate of a frame of `len` bytes arriving at `now`.
    /// `lossy`: whether the loss stream applies to it (it is drawn anyway).
    pub fn admit(&mut self, now: Instant, len: usize, lossy: bool) -> Verdict {
        let draw = self.rng.ppm();
        if lossy && draw < self.cfg.loss_ppm {
            return Verdict::Lost;
        }
        let left = match self.cfg.rate_bps {
            None => now,
            Some(bps) => {
                let start = self.busy_until.map_or(now, |b| b.max(now));
                if start - now > self.cfg.queue {
                    return Verdict::QueueFull;
                }
                let nanos = (len as u128 * 8 * 1_000_000_000).div_ceil(bps as u128);
                let end = start + Duration::from_nanos(nanos as u64);
                self.busy_until = Some(end);
                end
            }
        };
        Verdict::Deliver(left + self.cfg.delay)
    }
}

/// `75`, `1%`, `0.5%`, `0.01` (a fraction) → parts per million.
pub fn parse_loss(s: &str) -> Result<u32, String> {
    let bad =
        || format!("bad loss {s:?}: use a percentage like 1% or 0.5%, or a fraction like 0.01");
    let (num, scale) = match s.strip_suffix('%') {
        Some(p) => (p, 10_000.0),
        None => (s, 1_000_000.0),
    };
    let v: f64 = num.trim().parse().map_err(|_| bad())?;
    let ppm = v * scale;
    if !(0.0..=1_000_000.0).contains(&ppm) {
        return Err(bad());
    }
    Ok(ppm.round() as u32)
}

/// `100mbit`, `1gbit`, `500kbit`, `1000000` (bits per second) → bits per second.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let bad =
        || format!("bad rate {s:?}: use e.g. 100mbit, 1gbit, 500kbit or plain bits per second");
    let lower = s.trim().to_ascii_lowercase();
    let (num, mul) = [
        ("gbit", 1_000_000_000u64),
        ("mbit", 1_000_000),
        ("kbit", 1_000),
        ("bit", 1),
    ]
    .iter()
    .find_map(|(suf, m)| lower.strip_suffix(suf).map(|n| (n.to_string(), *m)))
    .unwrap_or((lower.clone(), 1));
    let v: f64 = num.trim().parse().map_err(|_| bad())?;
    let bps = v * mul as f64;
    if !(1000.0..1e13).contains(&bps) {
        return Err(bad());
    }
    Ok(bps as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(loss_ppm: u32, rate_bps: Option<u64>) -> LinkConfig {
        LinkConfig {
            delay: Duration::from_millis(75),
            loss_ppm,
            rate_bps,
            queue: Duration::from_millis(10),
        }
    }

    #[test]
    fn loss_is_reproducible_and_close_to_the_rate() {
        let now = Instant::now();
        let fates = |seed| {
            let mut l = Link::new(cfg(10_000, None), seed);
            (0..100_000)
                .map(|_| l.admit(now, 1500, true) == Verdict::Lost)
                .collect::<Vec<_>>()
        };
        let (a, b, c) = (fates(7), fates(7), fates(8));
        assert_eq!(a, b);
        assert_ne!(a, c);
        let lost = a.iter().filter(|&&x| x).count();
        assert!((800..1200).contains(&lost), "{lost} of 100000 lost at 1%");
    }

    #[test]
    fn frames_exempt_from_loss_still_draw() {
        let now = Instant::now();
        let mut a = Link::new(cfg(500_000, None), 1);
        let mut b = Link::new(cfg(500_000, None), 1);
        // b sees one exempt frame first; the 2nd frames share a draw index.
        a.admit(now, 60, true);
        assert!(matches!(b.admit(now, 60, false), Verdict::Deliver(_)));
        assert_eq!(a.admit(now, 60, true), b.admit(now, 60, true));
    }

    #[test]
    fn rate_serialises_and_queue_tail_drops() {
        let now = Instant::now();
        // 8 Mbit/s: 1000 bytes take 1 ms.
        let mut l = Link::new(cfg(0, Some(8_000_000)), 0);
        let ms = Duration::from_millis;
        assert_eq!(l.admit(now, 1000, true), Verdict::Deliver(now + ms(76)));
        assert_eq!(l.admit(now, 1000, true), Verdict::Deliver(now + ms(77)));
        for _ in 0..9 {
            assert!(matches!(l.admit(now, 1000, true), Verdict::Deliver(_)));
        }
        // 11 ms of backlog: over the 10 ms queue.
        assert_eq!(l.admit(now, 1000, true), Verdict::QueueFull);
        // Later, the queue has drained.
        assert_eq!(
            l.admit(now + ms(100), 1000, true),
            Verdict::Deliver(now + ms(176))
        );
    }

    #[test]
    fn parses_loss_and_rate() {
        assert_eq!(parse_loss("1%"), Ok(10_000));
        assert_eq!(parse_loss("0.5%"), Ok(5_000));
        assert_eq!(parse_loss("0.01"), Ok(10_000));
        assert_eq!(parse_loss("0"), Ok(0));
        assert!(parse_loss("101%").is_err());
        assert!(parse_loss("x").is_err());
        assert_eq!(parse_rate("100mbit"), Ok(100_000_000));
        assert_eq!(parse_rate("1Gbit"), Ok(1_000_000_000));
        assert_eq!(parse_rate("2500000"), Ok(2_500_000));
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("0mbit").is_err());
    }
}
