//! Builds the eBPF object with aya-build and leaves it in OUT_DIR for
//! `include_bytes_aligned!`, so the binary can never carry a stale object.
//!
//! The eBPF crate needs a compiler with the `core` sources for
//! `-Z build-std=core`. Two are accepted, tried in this order:
//! 1. `XHOST_EBPF_TOOLCHAIN=<rustup toolchain>` if set;
//! 2. rustup's `nightly` when it has the `rust-src` component (the usual aya
//!    route on a developer laptop);
//! 3. `xhost-bpf`: Debian's rustc-web + rust-web-src linked into rustup by
//!    `scripts/setup.sh`; it is a stable compiler, so unstable flags are
//!    enabled with RUSTC_BOOTSTRAP=1 for the eBPF build only.
use std::{path::Path, process::Command};

use anyhow::{Context as _, anyhow, bail};
use aya_build::Toolchain;

/// The rustup toolchain name `scripts/setup.sh` links Debian's compiler as.
const LINKED_TOOLCHAIN: &str = "xhost-bpf";

fn sysroot(toolchain: &str) -> Option<String> {
    let out = Command::new("rustup")
        .args(["run", toolchain, "rustc", "--print", "sysroot"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn has_core_sources(toolchain: &str) -> bool {
    sysroot(toolchain).is_some_and(|root| {
        Path::new(&root)
            .join("lib/rustlib/src/rust/library/core")
            .is_dir()
    })
}

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=XHOST_EBPF_TOOLCHAIN");
    let (toolchain, bootstrap) = match std::env::var("XHOST_EBPF_TOOLCHAIN") {
        Ok(name) => {
            let bootstrap = !name.starts_with("nightly");
            (name, bootstrap)
        }
        Err(_) if has_core_sources("nightly") => ("nightly".to_owned(), false),
        Err(_) if has_core_sources(LINKED_TOOLCHAIN) => (LINKED_TOOLCHAIN.to_owned(), true),
        Err(_) => bail!(
            "no Rust toolchain with library sources for the eBPF build: run `bash scripts/setup.sh` \
             (Debian), or `rustup toolchain install nightly --component rust-src`"
        ),
    };
    if bootstrap {
        // SAFETY: the build script is single-threaded at this point; the
        // variable is inherited by the eBPF cargo child only.
        unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    }

    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "xhost-ebpf")
        .ok_or_else(|| anyhow!("xhost-ebpf package not found in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("xhost-ebpf manifest has no parent directory"))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: ebpf.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        Toolchain::Custom(&toolchain),
    )
}
