//! A frame header announcing a huge payload is refused before anything of
//! that size is allocated (checked with a counting global allocator).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use failover::certs::{self, Credentials};
use failover::channel::{connect, kind, ChannelConfig, ChannelError, Listener, Role};

struct Counting;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static A: Counting = Counting;

#[tokio::test]
async fn oversized_header_allocates_nothing_big() {
    let dir = tempfile::tempdir().unwrap();
    certs::init_ca(dir.path()).unwrap();
    certs::issue(dir.path(), "a", None, &[]).unwrap();
    certs::issue(dir.path(), "b", None, &[]).unwrap();
    let a = Credentials::load_host(dir.path(), "a").unwrap();
    let b = Credentials::load_host(dir.path(), "b").unwrap();
    let listener = Listener::bind(
        "127.0.0.1:0".parse().unwrap(),
        &b,
        &ChannelConfig::new(Role::Secondary, "b"),
    )
    .unwrap();
    let addr = listener.local_addr().unwrap();
    let cfg = ChannelConfig::new(Role::Primary, "a");
    let (server, client) = tokio::join!(listener.accept(), connect(addr, "localhost", &a, &cfg));
    let (mut server, mut client) = (server.unwrap(), client.unwrap());

    LARGEST.store(0, Ordering::Relaxed);
    // 64 MiB + 1: just over the default cap.
    let len = failover::channel::DEFAULT_MAX_FRAME_LEN + 1;
    let mut header = len.to_le_bytes().to_vec();
    header.push(kind::MESSAGE);
    client.send_raw(&header).await.unwrap();
    let e = server.recv_frame().await.unwrap_err();
    assert!(matches!(e, ChannelError::FrameTooLarge { .. }), "{e}");
    let largest = LARGEST.load(Ordering::Relaxed);
    assert!(
        largest < (1 << 20),
        "allocated {largest} bytes while refusing the frame"
    );
}
