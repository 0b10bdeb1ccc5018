//! A raw packet socket (AF_PACKET, SOCK_RAW) bound to one interface, with
//! a virtio-net header in front of every frame (PACKET_VNET_HDR).
//!
//! The header is what keeps offloaded frames correct: a frame a veth
//! carries may still have its TCP/UDP checksum unfilled
//! (CHECKSUM_PARTIAL, `NEEDS_CSUM` with where to put it) or be a GSO frame
//! of up to 64 KiB (`gso_type`, `gso_size`). Reading the header and
//! writing it back unchanged hands both to the kernel on the far side,
//! which fills the checksum or segments the frame exactly as if the
//! forwarder were not there. (Without it, re-sent frames carry bad
//! checksums and are dropped.) The test topology also sets the veths'
//! `gso_max_segs` to 1 so that frames arrive one MTU at a time and loss
//! applies per wire packet, not per 64 KiB burst; the header stays as the
//! safety net.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// linux/if_packet.h
const PACKET_ADD_MEMBERSHIP: libc::c_int = 1;
const PACKET_MR_PROMISC: libc::c_int = 1;
const PACKET_VNET_HDR: libc::c_int = 15;
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;
const PACKET_OUTGOING: u8 = 4;

/// `struct virtio_net_hdr` (no `num_buffers`).
pub const VNET_HDR_LEN: usize = 10;
/// `gso_type` byte offset and the value for "not GSO".
const VNET_GSO_TYPE: usize = 1;
const VNET_GSO_NONE: u8 = 0;

/// Largest frame we take: a 64 KiB GSO frame plus headers.
pub const MAX_FRAME: usize = 65536 + 256;

#[repr(C)]
struct PacketMreq {
    mr_ifindex: libc::c_int,
    mr_type: libc::c_ushort,
    mr_alen: libc::c_ushort,
    mr_address: [u8; 8],
}

pub struct PacketSocket {
    fd: OwnedFd,
    pub name: String,
}

/// One received frame, virtio-net header first.
pub enum Recv {
    /// `len` bytes of header + frame are in the buffer.
    Frame { len: usize, gso: bool },
    /// Larger than the buffer (dropped and counted).
    TooBig,
    /// One of our own transmissions (if the kernel lacks IGNORE_OUTGOING).
    Outgoing,
}

fn check(r: libc::c_int, what: &str, name: &str) -> io::Result<()> {
    if r < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what} on {name}: {e}")));
    }
    Ok(())
}

fn setopt(fd: &OwnedFd, level: libc::c_int, opt: libc::c_int, val: libc::c_int) -> libc::c_int {
    // SAFETY: `val` is a valid c_int for the duration of the call and its
    // size is passed.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            opt,
            &val as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    }
}

impl PacketSocket {
    /// Open and bind to interface `name`, promiscuous, with large buffers.
    pub fn open(name: &str) -> io::Result<PacketSocket> {
        let cname = CString::new(name)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in interface name"))?;
        // SAFETY: plain FFI call with a valid C string.
        let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        if ifindex == 0 {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no interface {name:?} in this network namespace"),
            ));
        }
        // Protocol 0: receive nothing until bind() names the protocol and
        // interface, so no frame of another interface slips in.
        // SAFETY: plain FFI call; the result is checked.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        check(raw, "socket(AF_PACKET) (needs root / CAP_NET_RAW)", name)?;
        // SAFETY: `raw` is a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        check(
            setopt(&fd, libc::SOL_PACKET, PACKET_VNET_HDR, 1),
            "PACKET_VNET_HDR",
            name,
        )?;
        // Best effort: filtered by pkttype below as well.
        let _ = setopt(&fd, libc::SOL_PACKET, PACKET_IGNORE_OUTGOING, 1);
        for opt in [libc::SO_RCVBUFFORCE, libc::SO_SNDBUFFORCE] {
            if setopt(&fd, libc::SOL_SOCKET, opt, 64 << 20) < 0 {
                let plain = if opt == libc::SO_RCVBUFFORCE {
                    libc::SO_RCVBUF
                } else {
                    libc::SO_SNDBUF
                };
                let _ = setopt(&fd, libc::SOL_SOCKET, plain, 64 << 20);
            }
        }
        // SAFETY: zeroed sockaddr_ll is a valid value of the C struct.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        sll.sll_ifindex = ifindex as i32;
        // SAFETY: `sll` is a valid sockaddr_ll and its size is passed.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        check(r, "bind", name)?;
        let mreq = PacketMreq {
            mr_ifindex: ifindex as i32,
            mr_type: PACKET_MR_PROMISC as u16,
            mr_alen: 0,
            mr_address: [0; 8],
        };
        // SAFETY: `mreq` has the layout of struct packet_mreq; size passed.
        let r = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                PACKET_ADD_MEMBERSHIP,
                &mreq as *const PacketMreq as *const libc::c_void,
                std::mem::size_of::<PacketMreq>() as libc::socklen_t,
            )
        };
        check(r, "PACKET_ADD_MEMBERSHIP (promiscuous)", name)?;
        Ok(PacketSocket {
            fd,
            name: name.to_string(),
        })
    }

    /// Block until a frame arrives; it lands in `buf` (header first).
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<Recv> {
        loop {
            // SAFETY: zeroed sockaddr_ll is valid; the kernel fills it.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut sl = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            // SAFETY: `buf` is writable for its length; `sll`/`sl` are
            // valid out-parameters.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    libc::MSG_TRUNC,
                    &mut sll as *mut libc::sockaddr_ll as *mut libc::sockaddr,
                    &mut sl,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let n = n as usize;
            if sll.sll_pkttype == PACKET_OUTGOING {
                return Ok(Recv::Outgoing);
            }
            if n > buf.len() {
                return Ok(Recv::TooBig);
            }
            let gso = n > VNET_GSO_TYPE && buf[VNET_GSO_TYPE] != VNET_GSO_NONE;
            return Ok(Recv::Frame { len: n, gso });
        }
    }

    /// Transmit header + frame on the bound interface.
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        loop {
            // SAFETY: `frame` is readable for its length.
            let n = unsafe {
                libc::send(
                    self.fd.as_raw_fd(),
                    frame.as_ptr() as *const libc::c_void,
                    frame.len(),
                    0,
                )
            };
            if n >= 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                // Send buffer full: wait for the device to take some.
                Some(libc::ENOBUFS) | Some(libc::EAGAIN) => {
                    std::thread::sleep(std::time::Duration::from_micros(50))
                }
                _ => return Err(e),
            }
        }
    }
}

/// Is the frame (after the virtio-net header) an ARP frame? ARP is exempt
/// from loss: a lost ARP costs a one-second retry, which no WAN shows.
pub fn is_arp(frame: &[u8]) -> bool {
    frame.len() >= VNET_HDR_LEN + 14
        && u16::from_be_bytes([frame[VNET_HDR_LEN + 12], frame[VNET_HDR_LEN + 13]])
            == libc::ETH_P_ARP as u16
}
