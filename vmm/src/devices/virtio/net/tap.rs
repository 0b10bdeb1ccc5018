//! The host side of a guest NIC: a Linux TAP device.
//!
//! [`Tap::open`] attaches to the TAP named by the operator, or creates it
//! when no interface of that name exists. A TAP Tandem creates is not
//! persistent: the kernel removes it when Tandem's descriptors close (when
//! the process ends, however it ends), so Tandem never removes an interface
//! it did not create. Errors name the interface: a name that is too long or
//! malformed, an existing interface that is not a TAP (a TUN device, a
//! bridge, a veth, ...), or one that cannot be created (no permission, no
//! /dev/net/tun).
//!
//! Received frames are read by a thread of their own ([`Tap::spawn_reader`])
//! into a bounded queue: when it is full, frames are dropped and counted, as
//! a NIC with a full ring does, and nothing else waits. They enter the guest
//! only at an exit, through `Inputs` (DESIGN.md rule 2).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crossbeam_channel::{Receiver, TrySendError};
use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref};

use super::device::{MAX_FRAME_LEN, NET_HDR_LEN};

/// Frames waiting on the host for the guest, at most.
pub const RX_QUEUE_FRAMES: usize = 256;
/// Longest interface name (IFNAMSIZ - 1).
pub const MAX_NAME_LEN: usize = libc::IFNAMSIZ - 1;

/// The ioctl numbers (a private module: the macro makes public functions).
mod nr {
    use vmm_sys_util::ioctl_iow_nr;
    const TUNTAP: u32 = b'T' as u32;
    // `TUNSETIFF`: attach the file to a TUN/TAP interface.
    ioctl_iow_nr!(TUNSETIFF, TUNTAP, 202, ::std::os::raw::c_int);
}
use nr::TUNSETIFF;

const IFF_TUN: u16 = 0x0001;
const IFF_TAP: u16 = 0x0002;
const IFF_NO_PI: u16 = 0x1000;

/// Why a TAP device cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// Empty, too long, or with characters Linux refuses in a name.
    #[error("'{0}' is not a valid interface name (1 to {MAX_NAME_LEN} characters, no '/', ':' or whitespace)")]
    BadName(String),
    /// An interface of that name exists and is not a TAP device.
    #[error("network interface {name} exists and is not a TAP device ({what})")]
    NotTap {
        /// The interface.
        name: String,
        /// What it is instead.
        what: String,
    },
    /// /dev/net/tun cannot be opened.
    #[error("cannot open /dev/net/tun for TAP {name}: {source}")]
    OpenTun {
        /// The interface.
        name: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// TUNSETIFF failed (no permission to create, flags of an existing TAP
    /// that differ, ...).
    #[error("cannot {} TAP {name}: {source}", if *.created { "create" } else { "attach to" })]
    SetIff {
        /// The interface.
        name: String,
        /// Tandem was creating it (it did not exist).
        created: bool,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The created TAP cannot be brought up.
    #[error("cannot bring up TAP {name}: {source}")]
    Up {
        /// The interface.
        name: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// An open TAP device.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    created: bool,
}

/// Frames read from a TAP, and how many were dropped because the queue was
/// full.
#[derive(Debug, Clone)]
pub struct TapReceiver {
    /// Frames, oldest first (bounded: [`RX_QUEUE_FRAMES`]).
    pub frames: Receiver<Vec<u8>>,
    /// Frames dropped by the reader thread (queue full).
    pub dropped: Arc<AtomicU64>,
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':')
}

/// What kind of interface `name` is, if it exists in this network namespace:
/// `Some(Ok(flags))` for a TUN/TAP with its `tun_flags`, `Some(Err(kind))`
/// for another kind.
fn existing(name: &str) -> Option<Result<u16, String>> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: `c` is a valid NUL-terminated string; if_nametoindex only
    // reads it.
    if unsafe { libc::if_nametoindex(c.as_ptr()) } == 0 {
        return None;
    }
    let dir = std::path::Path::new("/sys/class/net").join(name);
    if let Ok(s) = std::fs::read_to_string(dir.join("tun_flags")) {
        let flags = u16::from_str_radix(s.trim().trim_start_matches("0x"), 16).unwrap_or(0);
        return Some(Ok(flags));
    }
    let kind = if dir.join("bridge").exists() {
        "a bridge".to_owned()
    } else {
        match std::fs::read_link(dir.join("device/driver")) {
            Ok(p) => format!(
                "driver {}",
                p.file_name().unwrap_or_default().to_string_lossy()
            ),
            Err(_) => "a virtual interface of another kind".to_owned(),
        }
    };
    Some(Err(kind))
}

impl Tap {
    /// Attach to TAP `name`, creating it (and bringing it up) if no
    /// interface of that name exists.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        if !valid_name(name) {
            return Err(TapError::BadName(name.to_owned()));
        }
        let created = match existing(name) {
            None => true,
            Some(Ok(flags)) if flags & IFF_TUN != 0 && flags & IFF_TAP == 0 => {
                return Err(TapError::NotTap {
                    name: name.to_owned(),
                    what: "a TUN device (layer 3); a guest NIC needs a TAP".into(),
                })
            }
            Some(Ok(_)) => false,
            Some(Err(what)) => {
                return Err(TapError::NotTap {
                    name: name.to_owned(),
                    what,
                })
            }
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .map_err(|source| TapError::OpenTun {
                name: name.to_owned(),
                source,
            })?;
        let mut req = ifreq(name);
        req.ifr_ifru.ifru_flags = (IFF_TAP | IFF_NO_PI) as libc::c_short;
        // SAFETY: TUNSETIFF reads (and writes back the name into) a struct
        // ifreq, which `req` is; the descriptor is a valid /dev/net/tun.
        let ret = unsafe { ioctl_with_mut_ref(&file, TUNSETIFF(), &mut req) };
        if ret < 0 {
            return Err(TapError::SetIff {
                name: name.to_owned(),
                created,
                source: std::io::Error::last_os_error(),
            });
        }
        let tap = Tap {
            file,
            name: name.to_owned(),
            created,
        };
        if created {
            tap.set_up().map_err(|source| TapError::Up {
                name: name.to_owned(),
                source,
            })?;
        }
        Ok(tap)
    }

    fn set_up(&self) -> std::io::Result<()> {
        // SAFETY: a plain socket() call; the descriptor is owned below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let sock = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let mut req = ifreq(&self.name);
        // SAFETY: SIOCGIFFLAGS fills the flags of a struct ifreq.
        if unsafe { ioctl_with_mut_ref(&sock, libc::SIOCGIFFLAGS as _, &mut req) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the union member SIOCGIFFLAGS just filled.
        unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
        // SAFETY: SIOCSIFFLAGS reads a struct ifreq.
        if unsafe { ioctl_with_ref(&sock, libc::SIOCSIFFLAGS as _, &req) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Tandem created the interface (it goes away when Tandem ends).
    pub fn created(&self) -> bool {
        self.created
    }

    /// A second handle on the same queue, for writing (cloneable: the run
    /// loop's outputs and an announcement thread may share it).
    pub fn writer(&self) -> std::io::Result<TapWriter> {
        Ok(TapWriter {
            file: Arc::new(self.file.try_clone()?),
            name: self.name.clone(),
        })
    }

    /// Start the reader thread; it runs until the process ends or the
    /// receiving side is dropped.
    pub fn spawn_reader(&self) -> std::io::Result<TapReceiver> {
        let mut file = self.file.try_clone()?;
        let (tx, rx) = crossbeam_channel::bounded(RX_QUEUE_FRAMES);
        let dropped = Arc::new(AtomicU64::new(0));
        let counter = dropped.clone();
        let name = self.name.clone();
        std::thread::Builder::new()
            .name(format!("tap-{name}"))
            .spawn(move || {
                // Room for a frame larger than any the guest accepts, so
                // that one is seen (and dropped by the device, counted)
                // rather than cut.
                let mut buf = vec![0u8; 65536 + NET_HDR_LEN + MAX_FRAME_LEN];
                loop {
                    match file.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => match tx.try_send(buf[..n].to_vec()) {
                            Ok(()) => {}
                            Err(TrySendError::Full(_)) => {
                                counter.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(TrySendError::Disconnected(_)) => break,
                        },
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            tracing::warn!(tap = %name, error = %e, "TAP read failed; receive stops");
                            break;
                        }
                    }
                }
            })?;
        Ok(TapReceiver {
            frames: rx,
            dropped,
        })
    }

    /// The raw descriptor (for tests and diagnostics).
    pub fn as_raw_fd(&self) -> i32 {
        self.file.as_raw_fd()
    }
}

/// The sending side of a TAP.
#[derive(Debug, Clone)]
pub struct TapWriter {
    file: Arc<File>,
    name: String,
}

impl TapWriter {
    /// Send one frame (one write: a TAP takes a whole frame or nothing).
    pub fn send(&self, frame: &[u8]) -> std::io::Result<()> {
        (&*self.file).write(frame).map(|_| ())
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    req
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_before_anything_is_opened() {
        for bad in ["", "a/b", "has space", "x:y", "0123456789abcdef", ".."] {
            assert!(matches!(Tap::open(bad), Err(TapError::BadName(_))), "{bad}");
        }
        // Loopback exists and is not a TAP.
        let err = Tap::open("lo").unwrap_err();
        assert!(matches!(err, TapError::NotTap { .. }), "{err}");
        assert!(err.to_string().contains("lo"), "{err}");
    }
}
