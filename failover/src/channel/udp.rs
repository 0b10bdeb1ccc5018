//! The UDP socket under the channel's QUIC endpoint: quinn's own, with its
//! GSO batches capped so that one `sendmsg` never exceeds what Linux
//! accepts.
//!
//! quinn hands the kernel up to 10 datagrams of the path MTU per `sendmsg`
//! (UDP GSO). Linux refuses a batch whose payload exceeds 64 KiB
//! (EMSGSIZE), and quinn counts the whole batch as lost: with 9000-byte
//! datagrams every full batch of a bulk transfer vanished (330 of 2358
//! packets of a migration at 150 ms RTT). [`GsoCapped`] tells quinn how
//! many datagrams of the largest size we allow fit in one batch.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};

/// Largest UDP payload of one GSO `sendmsg` Linux accepts, with room for
/// an IPv6 header (65535 - 40 - 8 = 65487).
const GSO_MAX_BYTES: usize = 65_487;

/// Socket buffers asked for (the kernel caps them at `net.core.rmem_max` /
/// `wmem_max`). Linux's default receive buffer (208 KiB) holds 32
/// datagrams of 6500 bytes: a receiver descheduled for a moment on a
/// loaded host overflowed it (measured on loopback: 11 000 of 22 000
/// packets lost in some runs of a 64 MiB transfer).
const SOCKET_BUFFER: usize = 8 << 20;

/// Ask for [`SOCKET_BUFFER`]-byte send and receive buffers; a refusal
/// leaves the kernel's defaults (traced).
pub(crate) fn enlarge_buffers(socket: &std::net::UdpSocket) {
    let s = socket2::SockRef::from(socket);
    if let Err(e) = s
        .set_recv_buffer_size(SOCKET_BUFFER)
        .and_then(|()| s.set_send_buffer_size(SOCKET_BUFFER))
    {
        tracing::debug!("UDP socket buffers of {SOCKET_BUFFER} bytes refused: {e}");
    }
}

/// Datagrams of up to `max_udp_payload` bytes per GSO batch (at least 1).
pub(crate) fn gso_segments(max_udp_payload: u16) -> usize {
    (GSO_MAX_BYTES / usize::from(max_udp_payload).max(1)).max(1)
}

/// quinn's socket, sending at most `segments` datagrams per batch.
pub(crate) struct GsoCapped {
    inner: Arc<dyn AsyncUdpSocket>,
    segments: usize,
}

impl GsoCapped {
    pub(crate) fn new(inner: Arc<dyn AsyncUdpSocket>, max_udp_payload: u16) -> Self {
        GsoCapped {
            inner,
            segments: gso_segments(max_udp_payload),
        }
    }
}

impl fmt::Debug for GsoCapped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GsoCapped")
            .field("inner", &self.inner)
            .field("segments", &self.segments)
            .finish()
    }
}

impl AsyncUdpSocket for GsoCapped {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments().min(self.segments)
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_stay_below_64_kib() {
        for payload in [1200u16, 1472, 6500, 8972, 9000, 16_000, 32_000, 65_000] {
            let n = gso_segments(payload);
            assert!(n >= 1);
            assert!(
                n == 1 || n * usize::from(payload) <= GSO_MAX_BYTES,
                "{payload}"
            );
        }
        assert_eq!(gso_segments(6500), 10);
        assert_eq!(gso_segments(9000), 7);
        assert_eq!(gso_segments(65_000), 1);
    }
}
