//! Builds the eBPF object with aya-build and leaves it in OUT_DIR for
//! `include_bytes_aligned!`, so the binary can never carry a stale object.
//!
//! The eBPF crate needs a compiler with the `core` sources for
//! `-Z build-std=core`. It is chosen in this order:
//! 1. `XHOST_EBPF_TOOLCHAIN=<rustup toolchain>` if set;
//! 2. rustup's `nightly` when it has the `rust-src` component (the usual aya
//!    route on a developer laptop);
//! 3. `xhost-bpf`: Debian's rustc-web + rust-web-src linked into rustup by
//!    `scripts/setup.sh`; it is a stable compiler, so unstable flags are
//!    enabled with RUSTC_BOOTSTRAP=1 for the eBPF build only.
//!
//! aya-build hands every line of the inner cargo's output to cargo as a
//! `cargo:warning`, which prints hundreds of `Compiling ...` lines on a
//! first build. So this script runs aya-build in a second copy of itself and
//! sorts what it printed: cargo's own directives are passed on; the inner
//! cargo's progress lines are shown only when the eBPF build fails; compiler
//! diagnostics (a warning in the eBPF crate) are always shown.
use std::{path::Path, process::Command};

use anyhow::{Context as _, anyhow, bail};
use aya_build::Toolchain;

/// The rustup toolchain name `scripts/setup.sh` links Debian's compiler as.
const LINKED_TOOLCHAIN: &str = "xhost-bpf";
/// Set (to the toolchain) in the environment of the second copy of this
/// script, the one that runs aya-build.
const INNER: &str = "XHOST_EBPF_BUILD_TOOLCHAIN";

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
    if let Ok(toolchain) = std::env::var(INNER) {
        // The first copy shows this on failure: the error chain, without a backtrace.
        if let Err(e) = build_ebpf(&toolchain) {
            eprintln!("{e:#}");
            std::process::exit(1);
        }
        return Ok(());
    }
    println!("cargo:rerun-if-env-changed=XHOST_EBPF_TOOLCHAIN");
    // Baked into the programs (xhost-ebpf's BUILD_SALT): another value, another build.
    println!("cargo:rerun-if-env-changed=XHOST_BUILD_SALT");
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

    let exe = std::env::current_exe().context("locating the build script")?;
    let mut inner = Command::new(exe);
    inner.env(INNER, &toolchain);
    if bootstrap {
        // For the eBPF cargo only (inherited through the inner script).
        inner.env("RUSTC_BOOTSTRAP", "1");
    }
    let out = inner
        .output()
        .context("running the eBPF build (aya-build)")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let (directives, ebpf_output) = split_output(&stdout);
    for line in directives {
        println!("{line}");
    }
    if !out.status.success() {
        // cargo shows a failed build script's stderr in full.
        for line in &ebpf_output {
            eprintln!("{line}");
        }
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
        bail!("the eBPF build (xhost-ebpf for bpfel-unknown-none) failed: its output is above");
    }
    for line in ebpf_output.iter().filter(|l| !is_progress(l)) {
        println!("cargo:warning={line}");
    }
    Ok(())
}

/// Splits what the inner script printed into cargo directives to pass on
/// (`rerun-if-changed`, ...) and the eBPF build's own output, which aya-build
/// wraps in `cargo:warning=`.
fn split_output(stdout: &str) -> (Vec<&str>, Vec<&str>) {
    let mut directives = Vec::new();
    let mut output = Vec::new();
    for line in stdout.lines() {
        match line
            .strip_prefix("cargo::warning=")
            .or_else(|| line.strip_prefix("cargo:warning="))
        {
            Some(text) => output.push(text),
            None if line.starts_with("cargo:") => directives.push(line),
            None => output.push(line),
        }
    }
    (directives, output)
}

/// A status line of the inner cargo (`   Compiling core v0.0.0 ...`), as
/// opposed to a compiler diagnostic or a note worth reading.
fn is_progress(line: &str) -> bool {
    const VERBS: [&str; 13] = [
        "Compiling",
        "Checking",
        "Finished",
        "Fresh",
        "Running",
        "Updating",
        "Locking",
        "Adding",
        "Downloading",
        "Downloaded",
        "Blocking",
        "Building",
        "Packaging",
    ];
    line.starts_with(' ')
        && line
            .split_whitespace()
            .next()
            .is_some_and(|verb| VERBS.contains(&verb))
}

/// The second copy's job: build the eBPF crate with aya-build, whose output
/// goes to this process's stdout for the first copy to sort.
fn build_ebpf(toolchain: &str) -> anyhow::Result<()> {
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
        Toolchain::Custom(toolchain),
    )
}
