//! `tandem-wan`: a userspace WAN between two network interfaces, for tests.
//!
//! This machine's kernel has no queueing disciplines (no netem), so delay,
//! loss and rate come from here: every frame arriving on `--a` leaves on
//! `--b` and the other way round, each direction through its own model of
//! a link (`link.rs`): seeded loss, a bottleneck of `--rate` with a
//! tail-drop queue, then `--delay-ms` of propagation. Frames are read and
//! written with raw packet sockets (`packet.rs`), so the forwarder is an
//! invisible wire: no addresses, no routing. On SIGTERM or SIGINT it prints
//! what it forwarded and dropped per direction, on stdout, and exits 0; on
//! SIGUSR1 it prints the same and goes on.
//!
//! The topology the tests build around it is described in
//! `tests/wan/README.md` and built by `tests/common/wan.rs`.

mod link;
mod packet;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;

use link::{Link, LinkConfig, Verdict};
use packet::{PacketSocket, Recv, MAX_FRAME};

#[derive(Parser, Debug)]
#[command(
    name = "tandem-wan",
    about = "Forward frames between two interfaces with delay, loss and a rate limit (a test WAN)",
    long_about = "Forward every frame between interfaces A and B (raw packet sockets, both \
                  directions), each direction with its own seeded loss, bottleneck rate with a \
                  tail-drop queue, and one-way delay. Needs root (CAP_NET_RAW). Prints one line \
                  per direction with what it forwarded and dropped when it gets SIGTERM or \
                  SIGINT (and goes on after printing them on SIGUSR1).\n\nExample: tandem-wan --a veth1 --b veth2 --delay-ms 75 --loss 1% \
                  --rate 100mbit --seed 7"
)]
struct Args {
    /// First interface (e.g. the end facing the source host).
    #[arg(long, value_name = "IFACE")]
    a: String,
    /// Second interface.
    #[arg(long, value_name = "IFACE")]
    b: String,
    /// One-way propagation delay in milliseconds, each direction (RTT = twice this).
    #[arg(long, value_name = "MS", default_value_t = 0.0)]
    delay_ms: f64,
    /// Loss per direction: a percentage (`1%`, `0.5%`) or a fraction (`0.01`).
    /// ARP frames are exempt (a lost ARP costs a 1 s retry no WAN shows).
    #[arg(long, value_name = "P", default_value = "0", value_parser = link::parse_loss)]
    loss: u32,
    /// Bottleneck rate per direction: `100mbit`, `1gbit`, `500kbit` or bits per
    /// second. Default: no limit.
    #[arg(long, value_name = "RATE", value_parser = link::parse_rate)]
    rate: Option<u64>,
    /// Longest a frame waits in the bottleneck's queue before it is
    /// tail-dropped, in ms. Default: one round trip (2 x delay), at least 10 ms.
    #[arg(long, value_name = "MS")]
    queue_ms: Option<f64>,
    /// Seed of the loss streams (direction a->b uses SEED, b->a SEED+1): the
    /// same seed drops the same frame numbers.
    #[arg(long, value_name = "N", default_value_t = 1)]
    seed: u64,
}

/// Counters of one direction.
#[derive(Default)]
struct Stats {
    forwarded: AtomicU64,
    bytes: AtomicU64,
    lost: AtomicU64,
    queue_full: AtomicU64,
    too_big: AtomicU64,
    gso: AtomicU64,
}

impl Stats {
    fn line(&self, dir: &str) -> String {
        format!(
            "tandem-wan {dir}: forwarded={} bytes={} lost={} queue_full={} too_big={} gso={}",
            self.forwarded.load(Relaxed),
            self.bytes.load(Relaxed),
            self.lost.load(Relaxed),
            self.queue_full.load(Relaxed),
            self.too_big.load(Relaxed),
            self.gso.load(Relaxed),
        )
    }
}

struct Direction {
    label: String,
    stats: Stats,
}

fn print_stats(dirs: &[Arc<Direction>]) {
    for d in dirs {
        println!("{}", d.stats.line(&d.label));
    }
}

/// Start the two threads of one direction: `from` → link model → `to`.
fn start(
    from: Arc<PacketSocket>,
    to: Arc<PacketSocket>,
    mut link: Link,
    dir: Arc<Direction>,
    all: Vec<Arc<Direction>>,
) {
    let (tx, rx) = crossbeam_channel::unbounded::<(Instant, Vec<u8>)>();
    let fail = move |what: &str, e: std::io::Error, all: &[Arc<Direction>]| -> ! {
        eprintln!("tandem-wan: {what}: {e}");
        print_stats(all);
        std::process::exit(1)
    };
    let (d, all_rx) = (dir.clone(), all.clone());
    std::thread::spawn(move || {
        let mut buf = vec![0u8; MAX_FRAME];
        loop {
            let (len, gso) = match from.recv(&mut buf) {
                Ok(Recv::Frame { len, gso }) => (len, gso),
                Ok(Recv::Outgoing) => continue,
                Ok(Recv::TooBig) => {
                    d.stats.too_big.fetch_add(1, Relaxed);
                    continue;
                }
                Err(e) => fail(&format!("receiving on {}", from.name), e, &all_rx),
            };
            if gso {
                d.stats.gso.fetch_add(1, Relaxed);
            }
            let frame = &buf[..len];
            let wire = len - packet::VNET_HDR_LEN;
            match link.admit(Instant::now(), wire, !packet::is_arp(frame)) {
                Verdict::Lost => {
                    d.stats.lost.fetch_add(1, Relaxed);
                }
                Verdict::QueueFull => {
                    d.stats.queue_full.fetch_add(1, Relaxed);
                }
                Verdict::Deliver(at) => {
                    if tx.send((at, frame.to_vec())).is_err() {
                        return;
                    }
                }
            }
        }
    });
    std::thread::spawn(move || {
        for (at, frame) in rx {
            let now = Instant::now();
            if at > now {
                std::thread::sleep(at - now);
            }
            if let Err(e) = to.send(&frame) {
                fail(&format!("sending on {}", to.name), e, &all);
            }
            dir.stats.forwarded.fetch_add(1, Relaxed);
            dir.stats
                .bytes
                .fetch_add((frame.len() - packet::VNET_HDR_LEN) as u64, Relaxed);
        }
    });
}

fn main() {
    let args = Args::parse();
    if !(0.0..=10_000.0).contains(&args.delay_ms) {
        eprintln!("tandem-wan: --delay-ms must be between 0 and 10000");
        std::process::exit(2);
    }
    let delay = Duration::from_secs_f64(args.delay_ms / 1000.0);
    let queue = Duration::from_secs_f64(
        args.queue_ms
            .unwrap_or((2.0 * args.delay_ms).max(10.0))
            .clamp(0.0, 60_000.0)
            / 1000.0,
    );
    // Block the stop signals in every thread; main waits for them below.
    // SAFETY: sigset operations on a local set, then the calling thread's mask.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGUSR1);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        // Sleep precisely: the delay line wakes per frame.
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong);
        set
    };
    let open = |name: &str| match PacketSocket::open(name) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            eprintln!("tandem-wan: {e}");
            std::process::exit(1)
        }
    };
    let (a, b) = (open(&args.a), open(&args.b));
    let cfg = LinkConfig {
        delay,
        loss_ppm: args.loss,
        rate_bps: args.rate,
        queue,
    };
    let ab = Arc::new(Direction {
        label: format!("{}->{}", args.a, args.b),
        stats: Stats::default(),
    });
    let ba = Arc::new(Direction {
        label: format!("{}->{}", args.b, args.a),
        stats: Stats::default(),
    });
    let all = vec![ab.clone(), ba.clone()];
    start(
        a.clone(),
        b.clone(),
        Link::new(cfg, args.seed),
        ab,
        all.clone(),
    );
    start(
        b,
        a,
        Link::new(cfg, args.seed.wrapping_add(1)),
        ba,
        all.clone(),
    );
    eprintln!(
        "tandem-wan: forwarding between {} and {}: delay {} ms each way, loss {}%, rate {}, queue {} ms, seed {}",
        args.a,
        args.b,
        args.delay_ms,
        args.loss as f64 / 10_000.0,
        args.rate
            .map_or("unlimited".to_string(), |r| format!("{} Mbit/s", r as f64 / 1e6)),
        queue.as_secs_f64() * 1000.0,
        args.seed
    );
    loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: `set` is initialised; `sig` is a valid out-parameter.
        unsafe { libc::sigwait(&set, &mut sig) };
        print_stats(&all);
        if sig != libc::SIGUSR1 {
            break;
        }
    }
}
