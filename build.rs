//! Builds the test guest (`guest/`, its own cargo workspace) and copies the
//! resulting PVH ELF to `$OUT_DIR/tandem-guest.elf`, where
//! `src/guest_image.rs` embeds it.
//!
//! The guest is always built in release mode with its own flags
//! (`guest/.cargo/config.toml`); anything the outer build would leak into the
//! inner cargo (RUSTFLAGS, wrappers such as clippy's, the target dir, the
//! jobserver) is removed from its environment.

use std::env;
use std::path::PathBuf;
use std::process::Command;

const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let guest_dir = manifest_dir.join("guest");

    for p in [
        "guest/src",
        "guest/Cargo.toml",
        "guest/Cargo.lock",
        "guest/build.rs",
        "guest/linker.ld",
        "guest/.cargo/config.toml",
    ] {
        println!("cargo:rerun-if-changed={p}");
    }

    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let target_dir = out_dir.join("guest-target");

    let mut cmd = Command::new(&cargo);
    cmd.current_dir(&guest_dir)
        .args([
            "build",
            "--release",
            "--offline",
            "--target",
            GUEST_TARGET,
            "--target-dir",
        ])
        .arg(&target_dir);

    // Strip everything the outer cargo/rustc invocation would leak.
    for (key, _) in env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let leaks = matches!(
            key,
            "RUSTFLAGS"
                | "CARGO_ENCODED_RUSTFLAGS"
                | "RUSTDOCFLAGS"
                | "CARGO_ENCODED_RUSTDOCFLAGS"
                | "RUSTC_WRAPPER"
                | "RUSTC_WORKSPACE_WRAPPER"
                | "CARGO_TARGET_DIR"
                | "CARGO_BUILD_TARGET"
                | "CARGO_BUILD_TARGET_DIR"
                | "CARGO_BUILD_RUSTFLAGS"
                | "CARGO_BUILD_RUSTC_WRAPPER"
                | "CARGO_BUILD_RUSTC_WORKSPACE_WRAPPER"
                | "CARGO_MAKEFLAGS"
                | "MAKEFLAGS"
                | "MFLAGS"
                | "CARGO_PRIMARY_PACKAGE"
                | "CARGO_MANIFEST_DIR"
                | "CARGO_MANIFEST_PATH"
                | "CARGO_PKG_NAME"
                | "OUT_DIR"
                | "TARGET"
                | "HOST"
                | "PROFILE"
                | "OPT_LEVEL"
                | "DEBUG"
                | "NUM_JOBS"
                | "RUSTC_LINKER"
        ) || key.starts_with("CARGO_FEATURE_")
            || key.starts_with("CARGO_CFG_")
            || key.starts_with("CARGO_PROFILE_")
            || key.starts_with("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_")
            || key.starts_with("DEP_");
        if leaks {
            cmd.env_remove(key);
        }
    }

    let status = match cmd.status() {
        Ok(s) => s,
        Err(e) => panic!(
            "failed to run `{} build` for the test guest in {}: {e}",
            cargo.to_string_lossy(),
            guest_dir.display()
        ),
    };
    if !status.success() {
        panic!(
            "building the test guest (guest/) failed ({status}); run `cd guest && cargo build --release` to see why"
        );
    }

    let built = target_dir
        .join(GUEST_TARGET)
        .join("release")
        .join("tandem-guest");
    let dest = out_dir.join("tandem-guest.elf");
    if let Err(e) = std::fs::copy(&built, &dest) {
        panic!(
            "copying the test guest {} to {}: {e}",
            built.display(),
            dest.display()
        );
    }
}
