//! The channel's congestion controller: quinn's BBR with a floor under its
//! window.
//!
//! BBR is used because a loss-based controller collapses on long lossy
//! links (see `tls.rs`). quinn's BBR, though, enters ProbeRTT on the first
//! acknowledgement that is not application-limited, at the very start of a
//! connection: it has never probed, so its min-RTT counts as expired. There
//! it cuts the window to 3/4 of a bandwidth-delay product measured from the
//! first few packets (tens of KB at 150 ms RTT), for 200 ms and a round
//! trip: a migration's link stood nearly still for a quarter of a second
//! right after its first round, with megabytes queued. The floor keeps the
//! window at or above the initial window whatever BBR decides.
//!
//! quinn's BBR also overshoots a slow bottleneck: in Startup its window
//! doubles every round trip until the bandwidth has not grown for three
//! rounds, and afterwards it keeps twice the bandwidth-delay product plus
//! the acknowledgement aggregation in flight (quinn paces at 1.25 window /
//! RTT, not at BBR's rate). Behind a queue of one round trip (a 100 Mbit/s
//! link at 150 ms: 1.9 MB pipe, 1.9 MB queue) that drops packets round after
//! round: 20751 drops and 263 MB sent for 32 MiB of pages. [`Cap`] bounds
//! the window by what the path delivered: at most [`STARTUP_GAIN`] times
//! the largest delivery rate seen in one round trip times the minimum RTT,
//! and [`SETTLED_GAIN`] times it once a round trip lost more than
//! [`LOSSY_ROUND`] of its bytes (BBRv2 leaves Startup at 2%; the link's
//! random 1% loss must not count as congestion, so 5% and at least
//! [`LOSSY_MIN_BYTES`]). Everything else (bandwidth probing, loss
//! handling below the cap) is BBR's.

use std::any::Any;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::congestion::{BbrConfig, Controller, ControllerFactory, ControllerMetrics};
use quinn_proto::RttEstimator;

/// Builds [`Floored`] BBR controllers.
#[derive(Debug, Clone)]
pub(crate) struct FlooredBbr {
    bbr: Arc<BbrConfig>,
    floor: u64,
}

impl FlooredBbr {
    /// BBR starting with `initial_window` bytes, never below it.
    pub(crate) fn new(initial_window: u64) -> Self {
        let mut bbr = BbrConfig::default();
        bbr.initial_window(initial_window);
        FlooredBbr {
            bbr: Arc::new(bbr),
            floor: initial_window,
        }
    }
}

impl ControllerFactory for FlooredBbr {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(Floored {
            inner: self.bbr.clone().build(now, current_mtu),
            floor: self.floor,
            cap: Cap::default(),
        })
    }
}

/// The window's bound during start-up: [`STARTUP_GAIN`] x the delivery rate
/// x the minimum RTT (BBR's own Startup gain: it only stops the doubling
/// once the rate has stopped growing).
pub(crate) const STARTUP_GAIN: f64 = 2.885;
/// The bound once a round trip was lossy: enough for the pipe and half a
/// bandwidth-delay product of queue.
pub(crate) const SETTLED_GAIN: f64 = 1.5;
/// A round trip that lost more than this share of its bytes overshot.
pub(crate) const LOSSY_ROUND: f64 = 0.05;
/// ...and at least this many bytes (a short round's one or two random
/// losses are not congestion).
pub(crate) const LOSSY_MIN_BYTES: u64 = 64 * 1024;

/// Per-round-trip delivery accounting and the window bound it gives.
#[derive(Debug, Clone, Default)]
struct Cap {
    /// Largest packet number sent.
    largest_sent: u64,
    /// The round trip ends when this packet number is acknowledged.
    round_end: u64,
    /// When the current round trip began (its first acknowledgement).
    round_start: Option<Instant>,
    acked: u64,
    lost: u64,
    min_rtt: Option<Duration>,
    /// Largest delivery rate of one round trip, bytes per second.
    max_rate: f64,
    /// A round trip was lossy: the bound is [`SETTLED_GAIN`] from now on.
    settled: bool,
}

impl Cap {
    fn on_sent(&mut self, last_packet_number: u64) {
        self.largest_sent = self.largest_sent.max(last_packet_number);
    }

    /// `rtt`: from the packet's send to its acknowledgement.
    fn on_ack(&mut self, bytes: u64, rtt: Duration) {
        self.acked += bytes;
        if !rtt.is_zero() {
            self.min_rtt = Some(self.min_rtt.map_or(rtt, |m| m.min(rtt)));
        }
    }

    fn on_lost(&mut self, bytes: u64) {
        self.lost += bytes;
    }

    /// Closes the round trip when its last packet has been acknowledged.
    fn on_end_acks(&mut self, now: Instant, largest_acked: Option<u64>) {
        let Some(start) = self.round_start else {
            if self.acked > 0 {
                self.round_start = Some(now);
                self.round_end = self.largest_sent;
                self.acked = 0;
                self.lost = 0;
            }
            return;
        };
        if largest_acked.is_none_or(|a| a < self.round_end) {
            return;
        }
        if let Some(min_rtt) = self.min_rtt {
            // Never shorter than the minimum RTT: a round whose last packet
            // left late must not read as a burst of bandwidth.
            let took = now.saturating_duration_since(start).max(min_rtt);
            self.max_rate = self.max_rate.max(self.acked as f64 / took.as_secs_f64());
        }
        let sent = self.acked + self.lost;
        if !self.settled
            && self.lost >= LOSSY_MIN_BYTES
            && self.lost as f64 > LOSSY_ROUND * sent as f64
        {
            self.settled = true;
            tracing::debug!(
                "congestion: a round trip lost {} of {sent} bytes, window bound settles at {:?} bytes",
                self.lost,
                self.bound()
            );
        }
        self.round_start = Some(now);
        self.round_end = self.largest_sent;
        self.acked = 0;
        self.lost = 0;
    }

    /// The bound on the window, once a round trip has been measured.
    fn bound(&self) -> Option<u64> {
        let min_rtt = self.min_rtt?;
        if self.max_rate == 0.0 {
            return None;
        }
        let gain = if self.settled {
            SETTLED_GAIN
        } else {
            STARTUP_GAIN
        };
        Some((gain * self.max_rate * min_rtt.as_secs_f64()) as u64)
    }
}

/// A controller whose window never drops below `floor` and never rises
/// above the delivery-rate bound ([`Cap`]) unless the floor is higher.
struct Floored {
    inner: Box<dyn Controller>,
    floor: u64,
    cap: Cap,
}

impl Controller for Floored {
    fn on_sent(&mut self, now: Instant, bytes: u64, last_packet_number: u64) {
        self.cap.on_sent(last_packet_number);
        self.inner.on_sent(now, bytes, last_packet_number)
    }

    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        rtt: &RttEstimator,
    ) {
        // Not `rtt.min()`: quinn starts it at the initial RTT (100 ms here)
        // and only ever lowers it, so on a 150 ms path it stays 100 ms.
        self.cap.on_ack(bytes, now.saturating_duration_since(sent));
        self.inner.on_ack(now, sent, bytes, app_limited, rtt)
    }

    fn on_end_acks(
        &mut self,
        now: Instant,
        in_flight: u64,
        app_limited: bool,
        largest_packet_num_acked: Option<u64>,
    ) {
        self.cap.on_end_acks(now, largest_packet_num_acked);
        self.inner
            .on_end_acks(now, in_flight, app_limited, largest_packet_num_acked)
    }

    fn on_congestion_event(
        &mut self,
        now: Instant,
        sent: Instant,
        is_persistent_congestion: bool,
        lost_bytes: u64,
    ) {
        self.cap.on_lost(lost_bytes);
        self.inner
            .on_congestion_event(now, sent, is_persistent_congestion, lost_bytes)
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.inner.on_mtu_update(new_mtu)
    }

    fn window(&self) -> u64 {
        let w = self.inner.window();
        let w = self.cap.bound().map_or(w, |b| w.min(b));
        w.max(self.floor)
    }

    fn metrics(&self) -> ControllerMetrics {
        let mut m = self.inner.metrics();
        m.congestion_window = self.window();
        m
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(Floored {
            inner: self.inner.clone_box(),
            floor: self.floor,
            cap: self.cap.clone(),
        })
    }

    fn initial_window(&self) -> u64 {
        self.inner.initial_window()
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A controller that shrank its window to a few packets, as quinn's BBR
    /// does in ProbeRTT (which needs real acknowledgements to reach).
    struct Shrunk;

    impl Controller for Shrunk {
        fn on_congestion_event(&mut self, _: Instant, _: Instant, _: bool, _: u64) {}
        fn on_mtu_update(&mut self, _: u16) {}
        fn window(&self) -> u64 {
            4 * 1200
        }
        fn clone_box(&self) -> Box<dyn Controller> {
            Box::new(Shrunk)
        }
        fn initial_window(&self) -> u64 {
            14720
        }
        fn into_any(self: Box<Self>) -> Box<dyn Any> {
            self
        }
    }

    #[test]
    fn the_window_never_drops_below_the_floor() {
        let f = Arc::new(FlooredBbr::new(2 << 20));
        let c = f.build(Instant::now(), 1200);
        assert_eq!(c.window(), 2 << 20);
        assert_eq!(c.initial_window(), 2 << 20);
        let c = Floored {
            inner: Box::new(Shrunk),
            floor: 2 << 20,
            cap: Cap::default(),
        };
        assert_eq!(c.window(), 2 << 20);
        assert_eq!(c.metrics().congestion_window, 2 << 20);
        assert_eq!(c.clone_box().window(), 2 << 20);
    }

    /// BBR in Startup: a window far above any bottleneck.
    struct Runaway;

    impl Controller for Runaway {
        fn on_congestion_event(&mut self, _: Instant, _: Instant, _: bool, _: u64) {}
        fn on_mtu_update(&mut self, _: u16) {}
        fn window(&self) -> u64 {
            64 << 20
        }
        fn clone_box(&self) -> Box<dyn Controller> {
            Box::new(Runaway)
        }
        fn initial_window(&self) -> u64 {
            2 << 20
        }
        fn into_any(self: Box<Self>) -> Box<dyn Any> {
            self
        }
    }

    const RTT: Duration = Duration::from_millis(150);
    const PACKET: u64 = 9000;

    /// One round trip on a path: `lost` packets declared lost, `packets -
    /// lost` acknowledged over `took` (the round's last packet last), the
    /// next round's `packets` sent (numbered on from `next`) just before.
    fn round(
        cap: &mut Cap,
        t: &mut Instant,
        next: &mut u64,
        packets: u64,
        lost: u64,
        took: Duration,
    ) {
        let end = cap.round_end;
        cap.on_lost(lost * PACKET);
        let acked = packets - lost;
        for i in 1..=acked {
            cap.on_ack(PACKET, RTT);
            if i < acked {
                cap.on_end_acks(*t, Some(end.saturating_sub(1)));
            } else {
                *t += took;
                *next += packets;
                cap.on_sent(*next);
                cap.on_end_acks(*t, Some(end));
            }
        }
    }

    /// A path starting with its first acknowledgement at `t`.
    fn started(t: Instant) -> (Cap, u64) {
        let mut cap = Cap::default();
        cap.on_sent(1);
        cap.on_ack(PACKET, RTT);
        cap.on_sent(2);
        cap.on_end_acks(t, Some(1));
        (cap, 2)
    }

    fn floored(cap: Cap, floor: u64) -> Floored {
        Floored {
            inner: Box::new(Runaway),
            floor,
            cap,
        }
    }

    #[test]
    fn no_bound_before_a_round_trip_was_measured() {
        let c = floored(Cap::default(), 2 << 20);
        assert_eq!(c.window(), 64 << 20);
        let (cap, _) = started(Instant::now());
        assert_eq!(cap.bound(), None);
        assert_eq!(floored(cap, 2 << 20).window(), 64 << 20);
    }

    #[test]
    fn the_window_is_bounded_by_the_delivery_rate_times_min_rtt() {
        let mut t = Instant::now();
        let (mut cap, mut next) = started(t);
        // 12.5 MB/s (100 Mbit/s): 208 packets of 9000 bytes in 150 ms.
        round(&mut cap, &mut t, &mut next, 208, 0, RTT);
        let rate = 208.0 * PACKET as f64 / RTT.as_secs_f64();
        let want = (STARTUP_GAIN * rate * RTT.as_secs_f64()) as u64;
        let b = cap.bound().expect("a round was measured");
        assert!(b.abs_diff(want) <= PACKET, "{b} vs {want}");
        assert!(!cap.settled);
        let c = floored(cap.clone(), 2 << 20);
        assert_eq!(c.window(), b);
        assert_eq!(c.metrics().congestion_window, b);
        assert_eq!(c.clone_box().window(), b);
        // The floor still wins over a lower bound.
        assert_eq!(floored(cap, 8 << 20).window(), 8 << 20);
    }

    #[test]
    fn a_queue_delayed_round_does_not_raise_the_bound() {
        let mut t = Instant::now();
        let (mut cap, mut next) = started(t);
        round(&mut cap, &mut t, &mut next, 208, 0, RTT);
        let b = cap.bound().unwrap();
        // The queue full: twice the bytes per round, over twice the RTT.
        round(&mut cap, &mut t, &mut next, 416, 0, 2 * RTT);
        assert!(cap.bound().unwrap().abs_diff(b) <= PACKET);
        // A round whose last packet left late: short, never faster than
        // its bytes over the minimum RTT.
        round(&mut cap, &mut t, &mut next, 100, 0, RTT / 10);
        assert!(cap.bound().unwrap().abs_diff(b) <= PACKET);
    }

    #[test]
    fn a_lossy_round_settles_the_bound_lower() {
        let mut t = Instant::now();
        let (mut cap, mut next) = started(t);
        round(&mut cap, &mut t, &mut next, 208, 0, RTT);
        // Startup doubled into the tail-drop queue: a third lost.
        round(&mut cap, &mut t, &mut next, 624, 208, 2 * RTT);
        assert!(cap.settled);
        let rate = 208.0 * PACKET as f64 / RTT.as_secs_f64();
        let want = (SETTLED_GAIN * rate * RTT.as_secs_f64()) as u64;
        let b = cap.bound().unwrap();
        assert!(b.abs_diff(want) <= PACKET, "{b} vs {want}");
        assert_eq!(floored(cap, 1 << 20).window(), b);
    }

    #[test]
    fn random_one_percent_loss_is_not_congestion() {
        let mut t = Instant::now();
        let (mut cap, mut next) = started(t);
        // 1 Gbit/s: 2083 packets a round, 1% of them lost, rounds after
        // rounds; and a small round losing a few packets (over 5%, under
        // the byte minimum).
        for _ in 0..20 {
            round(&mut cap, &mut t, &mut next, 2083, 21, RTT);
        }
        round(&mut cap, &mut t, &mut next, 40, 4, RTT);
        assert!(!cap.settled);
        let rate = 2062.0 * PACKET as f64 / RTT.as_secs_f64();
        let want = (STARTUP_GAIN * rate * RTT.as_secs_f64()) as u64;
        assert!(cap.bound().unwrap().abs_diff(want) <= PACKET);
        // Just over 5% of a full round is.
        round(&mut cap, &mut t, &mut next, 2083, 110, RTT);
        assert!(cap.settled);
    }
}
