//! Device-state restore: any bytes either fail to decode, fail to restore
//! with an error, or give devices that save and restore again.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vm_memory::GuestAddress;
use vmm::devices::virtio::block::BlockConfig;
use vmm::devices::{Devices, DevicesState};

/// One small disk image for the whole run.
fn disk() -> BlockConfig {
    static PATH: OnceLock<std::path::PathBuf> = OnceLock::new();
    let path = PATH.get_or_init(|| {
        let p = std::env::temp_dir().join(format!("tandem-fuzz-disk-{}", std::process::id()));
        std::fs::write(&p, vec![0u8; 64 << 10]).unwrap();
        p
    });
    BlockConfig {
        path: path.clone(),
        read_only: false,
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(state) = postcard::from_bytes::<DevicesState>(data) else {
        return;
    };
    let mem = vmm::vstate::memory::create(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let cfg = state.block.as_ref().map(|_| disk());
    if let Ok(devices) = Devices::restore(&state, cfg.clone(), &mem) {
        let again = devices.save();
        Devices::restore(&again, cfg, &mem)
            .expect("saved state restores");
    }
});
