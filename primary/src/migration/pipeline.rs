//! Streamed pre-copy rounds: the source does not wait for a round's
//! acknowledgement before the next round. A pure model of what is in the
//! pipe (tested without a link or a VM, on a simulated clock).
//!
//! Each round ends with `RoundDone`; the destination echoes it once it has
//! applied the round. Waiting for that echo before every round left the
//! link idle for a round trip per round (150 ms at 150 ms RTT) while the
//! guest dirtied pages. Now the source goes on at once and only holds the
//! next round back while more is *outstanding* (queued but not yet echoed)
//! than the link holds in flight plus a little slack
//! ([`Pipeline::may_start`]): the pages of a round are then read when the
//! previous round has left, not a round trip later, and no stale backlog
//! builds up in the send buffer.
//!
//! The echoes still measure the link end to end (read, encode, transfer,
//! decode, apply): the bytes echoed between two echoes at least a round trip
//! apart, over their time ([`Pipeline::acked`]). Until a rate is measured
//! nothing is credited as in flight, and the next round waits for the
//! echo of the one before the previous one (at most two rounds
//! outstanding), so that an unknown link is never flooded.
//!
//! The pause estimate counts what is outstanding beyond what the link holds
//! in flight ([`Pipeline::backlog`]): it must drain before the last dirty
//! pages do.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Smallest sample (bytes) a rate is measured on.
const MIN_SAMPLE_BYTES: u64 = 256 << 10;
/// Slack beyond the bytes in flight: keeps the link busy while the next
/// round's dirty log is read and its first batch encoded.
const SLACK: Duration = Duration::from_millis(10);
/// Least slack in bytes (a link measured slow still gets one batch ahead).
const MIN_SLACK_BYTES: u64 = 256 << 10;

/// What the transport knows of the link.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LinkView {
    /// The link's round trip (the smallest seen).
    pub rtt: Duration,
    /// The congestion controller's window (bytes).
    pub cwnd: u64,
}

/// One round sent and not yet echoed.
#[derive(Debug, Clone, Copy)]
struct Sent {
    round: u32,
    /// Cumulative bytes and pages queued when the round ended.
    bytes: u64,
    pages: u64,
    /// When the round began.
    started: Instant,
}

/// An echo received: cumulative bytes and pages the destination applied.
#[derive(Debug, Clone, Copy)]
struct Echo {
    bytes: u64,
    pages: u64,
    at: Instant,
    /// When the round after the echoed one began (`None`: not yet begun
    /// when the echo came).
    next_started: Option<Instant>,
}

/// What the source has in the pipe to the destination.
#[derive(Debug)]
pub(crate) struct Pipeline {
    queued_bytes: u64,
    queued_pages: u64,
    /// Rounds sent, not yet echoed (oldest first).
    sent: VecDeque<Sent>,
    /// Echoes of the last few round trips, for rate samples.
    echoes: VecDeque<Echo>,
    acked_bytes: u64,
    acked_pages: u64,
    /// Highest round echoed.
    acked_round: Option<u32>,
    /// When the transfer began.
    start: Instant,
    /// Best end-to-end rates measured (bytes/s, pages/s).
    rate: Option<f64>,
    page_rate: Option<f64>,
}

impl Pipeline {
    /// An empty pipe; the transfer began at `start`.
    pub(crate) fn new(start: Instant) -> Self {
        Pipeline {
            queued_bytes: 0,
            queued_pages: 0,
            sent: VecDeque::new(),
            echoes: VecDeque::new(),
            acked_bytes: 0,
            acked_pages: 0,
            acked_round: None,
            start,
            rate: None,
            page_rate: None,
        }
    }

    /// Round `round`, begun at `started`, is queued: `bytes` and `pages`
    /// more than before.
    pub(crate) fn sent(&mut self, round: u32, bytes: u64, pages: u64, started: Instant) {
        self.queued_bytes += bytes;
        self.queued_pages += pages;
        self.sent.push_back(Sent {
            round,
            bytes: self.queued_bytes,
            pages: self.queued_pages,
            started,
        });
    }

    /// The echo of `round` arrived at `now`; `rtt` is the link's round trip.
    /// `false`: no such round is outstanding (a protocol error).
    pub(crate) fn acked(&mut self, round: u32, now: Instant, rtt: Duration) -> bool {
        let Some(pos) = self.sent.iter().position(|s| s.round == round) else {
            return false;
        };
        // Echoes come in order: the earlier rounds are done too.
        let s = self.sent.drain(..=pos).next_back().expect("position found");
        self.acked_bytes = s.bytes;
        self.acked_pages = s.pages;
        self.acked_round = Some(round);
        let echo = Echo {
            bytes: s.bytes,
            pages: s.pages,
            at: now,
            next_started: self.sent.front().map(|n| n.started),
        };
        match self.echoes.back().copied() {
            // The first echo: its bytes took its time minus the trip back
            // and forth (which carried no data for it).
            None => {
                let busy = now.saturating_duration_since(self.start);
                let drain = busy.saturating_sub(rtt).max(busy / 4);
                self.sample(s.bytes, s.pages, drain);
            }
            Some(_) => {
                // Between an echo a round trip or more ago and this one the
                // destination applied what was echoed meanwhile, if the
                // link was busy all along: the round after that echo's
                // began before the echoed one's last byte left (a round
                // trip before its echo came back). A gap later on only
                // makes a sample lower (harmless: the best one counts).
                if let Some(from) = self
                    .echoes
                    .iter()
                    .rev()
                    .find(|e| now.saturating_duration_since(e.at) >= rtt)
                {
                    if from.next_started.is_some_and(|t| t + rtt <= from.at) {
                        self.sample(s.bytes - from.bytes, s.pages - from.pages, now - from.at);
                    }
                }
            }
        }
        self.echoes.push_back(echo);
        // Keep what a sample a round trip long can start from.
        while self.echoes.len() > 2
            && self
                .echoes
                .get(1)
                .is_some_and(|e| now.saturating_duration_since(e.at) >= rtt)
        {
            self.echoes.pop_front();
        }
        true
    }

    fn sample(&mut self, bytes: u64, pages: u64, took: Duration) {
        if bytes < MIN_SAMPLE_BYTES || took.is_zero() {
            return;
        }
        let secs = took.as_secs_f64();
        let r = bytes as f64 / secs;
        self.rate = Some(self.rate.map_or(r, |m| m.max(r)));
        if pages > 0 {
            let p = pages as f64 / secs;
            self.page_rate = Some(self.page_rate.map_or(p, |m| m.max(p)));
        }
    }

    /// The best end-to-end rate measured (bytes/s).
    pub(crate) fn rate(&self) -> Option<f64> {
        self.rate
    }

    /// A rate the transport measured (bytes/s, from every packet's
    /// acknowledgement: a lower bound of the link's); counts once a round
    /// has been echoed. Small rounds cannot measure a long fat pipe by
    /// their echoes (a 1 MiB round takes 8 ms of a 150 ms round trip at
    /// 1 Gbit/s), the transport's acknowledgements can.
    pub(crate) fn transport_rate(&mut self, rate: f64) {
        if self.rate.is_some() && rate.is_finite() && rate > 0.0 {
            self.rate = self.rate.map(|r| r.max(rate));
        }
    }

    /// Seconds per page end to end (read, encode, send, decode, apply), as
    /// measured; `None` before a sample.
    pub(crate) fn secs_per_page(&self) -> Option<f64> {
        self.page_rate.map(|p| 1.0 / p)
    }

    /// Bytes queued and not yet echoed.
    pub(crate) fn outstanding(&self) -> u64 {
        self.queued_bytes - self.acked_bytes
    }

    /// Pages queued and not yet echoed.
    fn outstanding_pages(&self) -> u64 {
        self.queued_pages - self.acked_pages
    }

    /// Bytes the link holds in flight at the measured rate (none before a
    /// rate is measured).
    fn measured_in_flight(&self, link: &LinkView) -> u64 {
        self.rate.map_or(0, |r| (r * link.rtt.as_secs_f64()) as u64)
    }

    /// Bytes the link may hold in flight once a rate is measured (none
    /// before: the pause estimate would rest on a guess): at the measured
    /// rate, or half the congestion controller's window (BBR keeps it at twice the
    /// bandwidth-delay product it measured from every packet's
    /// acknowledgement), whichever is more. Without the window, a rate
    /// measured low would hold the rounds back to that rate for ever (the
    /// echoes only measure what the rounds let through).
    fn in_flight(&self, link: &LinkView) -> u64 {
        match self.rate {
            Some(_) => self.measured_in_flight(link).max(link.cwnd / 2),
            None => 0,
        }
    }

    /// What the link cannot have sent yet at `now`, at the measured rate:
    /// the outstanding rounds leave one after the other, each no earlier
    /// than it began (all that is outstanding before a rate is measured).
    /// It drains before anything sent after it (bytes, pages).
    pub(crate) fn backlog(&self, now: Instant) -> (u64, u64) {
        let out = self.outstanding();
        let bytes = match self.rate {
            None => out,
            Some(rate) => {
                let mut free: Option<Instant> = None;
                let mut prev = self.acked_bytes;
                for s in &self.sent {
                    let begin = free.map_or(s.started, |f| f.max(s.started));
                    free = Some(begin + Duration::from_secs_f64((s.bytes - prev) as f64 / rate));
                    prev = s.bytes;
                }
                let left = free.map_or(Duration::ZERO, |f| f.saturating_duration_since(now));
                ((left.as_secs_f64() * rate) as u64).min(out)
            }
        };
        let pages = (self.outstanding_pages() as u128 * bytes as u128 / out.max(1) as u128) as u64;
        (bytes, pages)
    }

    /// May the next round begin (read its dirty pages) now? Yes while what
    /// is outstanding fits the bytes in flight plus a little slack; and
    /// always once at most one round is outstanding (so that a rate
    /// measured too low never makes the rounds wait a round trip each).
    pub(crate) fn may_start(&self, link: &LinkView) -> bool {
        if self.sent.len() <= 1 {
            return true;
        }
        let slack = self
            .rate
            .map_or(0, |r| (r * SLACK.as_secs_f64()) as u64)
            .max(MIN_SLACK_BYTES);
        self.outstanding() <= self.in_flight(link) + slack
    }

    /// No rate is measured yet, but the echo of what is outstanding will
    /// measure one: a decision now would rest on a guess.
    pub(crate) fn measuring(&self) -> bool {
        self.rate.is_none() && self.outstanding() >= MIN_SAMPLE_BYTES
    }

    /// The highest round the destination has echoed.
    pub(crate) fn acked_round(&self) -> Option<u32> {
        self.acked_round
    }

    /// Rounds sent and not yet echoed.
    pub(crate) fn unacked_rounds(&self) -> usize {
        self.sent.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);
    const MIB: u64 = 1 << 20;

    /// A link of `rate` bytes/s and `rtt`, simulated: when the echo of a
    /// round queued at `queued_at` with `backlog` bytes ahead of it comes
    /// back.
    struct Link {
        rate: f64,
        rtt: Duration,
        /// When the link has sent everything queued so far.
        free_at: Instant,
    }

    impl Link {
        fn send(&mut self, at: Instant, bytes: u64) -> Instant {
            let begin = self.free_at.max(at);
            self.free_at = begin + Duration::from_secs_f64(bytes as f64 / self.rate);
            self.free_at + self.rtt
        }
    }

    /// Rounds of 1 MiB at 150 ms RTT and 125 MB/s: after the first echo
    /// (the rate measured), the rounds follow each other back to back —
    /// several rounds outstanding, far more rounds than round trips —
    /// where waiting for each echo allowed one round per round trip.
    #[test]
    fn rounds_stream_without_a_round_trip_each() {
        let t0 = Instant::now();
        let rtt = 150 * MS;
        let mut link = Link {
            rate: 125e6,
            rtt,
            free_at: t0,
        };
        // BBR's window: twice the link's bandwidth-delay product.
        let view = LinkView {
            rtt,
            cwnd: (2.0 * 125e6 * rtt.as_secs_f64()) as u64,
        };
        let mut p = Pipeline::new(t0);
        let mut now = t0;
        let mut echoes: Vec<(Instant, u32)> = Vec::new();
        let mut rounds = 0u32;
        let mut most_outstanding = 0;
        let mut waits = 0;
        // Event loop on a simulated clock: the next event is a round start
        // (1 ms to read and encode) or an echo.
        while rounds < 40 {
            if p.may_start(&view) {
                let bytes = if rounds == 0 { 4 * MIB } else { MIB };
                p.sent(rounds, bytes, bytes / 4096, now);
                echoes.push((link.send(now, bytes), rounds));
                rounds += 1;
                most_outstanding = most_outstanding.max(p.unacked_rounds());
                now += MS;
            } else {
                waits += 1;
                echoes.sort();
                let (at, r) = echoes.remove(0);
                now = now.max(at);
                assert!(p.acked(r, at, rtt));
            }
            // Deliver the echoes that are due.
            echoes.sort();
            while echoes.first().is_some_and(|&(at, _)| at <= now) {
                let (at, r) = echoes.remove(0);
                assert!(p.acked(r, at, rtt));
            }
        }
        let elapsed = now - t0;
        echoes.sort();
        for (at, r) in echoes {
            assert!(p.acked(r, at, rtt));
        }
        // One round per round trip would have taken 40 x 150 ms.
        assert!(
            elapsed < 10 * rtt,
            "40 rounds took {elapsed:?} at {rtt:?} RTT"
        );
        assert!(
            most_outstanding >= 3,
            "{most_outstanding} rounds outstanding at most"
        );
        // The rate is measured end to end from the echoes (within 20%).
        let r = p.rate().expect("measured");
        assert!((r / 125e6 - 1.0).abs() < 0.2, "{r}");
        // Never more outstanding than in flight plus slack plus a round.
        assert!(p.outstanding() <= p.in_flight(&view) + 2 * MIB + MIN_SLACK_BYTES);
        assert!(waits > 0, "the link's capacity held rounds back");
    }

    /// Before a rate is measured at most two rounds are outstanding, and
    /// everything outstanding counts in the backlog.
    #[test]
    fn an_unmeasured_link_gets_two_rounds() {
        let t0 = Instant::now();
        let rtt = 150 * MS;
        let view = LinkView { rtt, cwnd: 0 };
        let mut p = Pipeline::new(t0);
        assert!(p.may_start(&view));
        p.sent(0, 200 << 10, 25, t0);
        assert!(
            p.may_start(&view),
            "the second round goes while the first travels"
        );
        p.sent(1, 200 << 10, 25, t0 + MS);
        assert!(!p.may_start(&view), "a third waits for the first echo");
        assert_eq!(p.backlog(t0 + MS), (400 << 10, 50));
        // Round 0 echoed (too small to measure a rate): round 2 may go.
        assert!(p.acked(0, t0 + 200 * MS, rtt));
        assert_eq!(p.rate(), None);
        assert!(p.may_start(&view));
        assert_eq!(p.outstanding(), 200 << 10);
        assert_eq!(p.acked_round(), Some(0));
        // An echo of a round never sent is refused.
        assert!(!p.acked(7, t0 + 201 * MS, rtt));
        // Enough outstanding to measure a rate with: wait for its echo.
        assert!(!p.measuring());
        p.sent(2, 200 << 10, 25, t0 + 202 * MS);
        assert!(p.measuring());
    }

    /// With a rate measured, the backlog is what the link cannot have sent
    /// yet since the rounds were queued.
    #[test]
    fn backlog_is_what_the_link_cannot_have_sent_yet() {
        let t0 = Instant::now();
        let rtt = 100 * MS;
        let mut p = Pipeline::new(t0);
        // 10 MB echoed after 200 ms: 10 MB / (200 - 100) ms = 100 MB/s.
        p.sent(0, 10_000_000, 2000, t0);
        assert!(p.acked(0, t0 + 200 * MS, rtt));
        assert!((p.rate().unwrap() - 1e8).abs() < 1.0);
        assert!((p.secs_per_page().unwrap() - 5e-5).abs() < 1e-9);
        // 15 MB queued at 200 ms leave by 350 ms.
        p.sent(1, 15_000_000, 3000, t0 + 200 * MS);
        assert_eq!(p.backlog(t0 + 200 * MS), (15_000_000, 3000));
        assert_eq!(p.backlog(t0 + 300 * MS), (5_000_000, 1000));
        // A second round queued meanwhile waits for the first.
        p.sent(2, 1_000_000, 200, t0 + 300 * MS);
        let (bytes, _) = p.backlog(t0 + 300 * MS);
        assert!(bytes.abs_diff(6_000_000) < 10, "{bytes}");
        assert_eq!(p.backlog(t0 + 400 * MS), (0, 0));
    }
}
