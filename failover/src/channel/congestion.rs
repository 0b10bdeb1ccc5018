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
//! window at or above the initial window whatever BBR decides; everything
//! else (pacing, bandwidth probing, loss handling above the floor) is BBR's.

use std::any::Any;
use std::sync::Arc;
use std::time::Instant;

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
        })
    }
}

/// A controller whose window never drops below `floor`.
struct Floored {
    inner: Box<dyn Controller>,
    floor: u64,
}

impl Controller for Floored {
    fn on_sent(&mut self, now: Instant, bytes: u64, last_packet_number: u64) {
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
        self.inner.on_ack(now, sent, bytes, app_limited, rtt)
    }

    fn on_end_acks(
        &mut self,
        now: Instant,
        in_flight: u64,
        app_limited: bool,
        largest_packet_num_acked: Option<u64>,
    ) {
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
        self.inner
            .on_congestion_event(now, sent, is_persistent_congestion, lost_bytes)
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.inner.on_mtu_update(new_mtu)
    }

    fn window(&self) -> u64 {
        self.inner.window().max(self.floor)
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
        };
        assert_eq!(c.window(), 2 << 20);
        assert_eq!(c.metrics().congestion_window, 2 << 20);
        assert_eq!(c.clone_box().window(), 2 << 20);
    }
}
