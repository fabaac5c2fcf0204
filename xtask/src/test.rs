//! `cargo xtask test`: setup, the lints (`cargo fmt --check`, clippy with `-D warnings` on
//! the workspace and on the eBPF crate), build, then every test of the workspace in release
//! mode, as root and on one thread (the tests create namespaces and load eBPF programs); then the
//! datapath's real-packet tests a second time with every agent attached through classic tc
//! (`XHOST_TEST_ATTACH=tc`), the first run having used the kernel's default (tcx where
//! present); then the kernel matrix (older kernels in qemu, see [`crate::kernels`]).

use clap::Args;

use crate::{build, kernels, setup, workspace};

#[derive(Args, Debug)]
pub struct Options {
    /// Skip scripts/setup.sh.
    #[arg(long)]
    pub no_setup: bool,
    /// Skip the format and clippy checks.
    #[arg(long)]
    pub no_lint: bool,
    /// Only the kernel matrix, not the tests on this machine's kernel.
    #[arg(long, conflicts_with = "no_kernels")]
    pub kernels: bool,
    /// Skip the kernel matrix (quick local runs).
    #[arg(long)]
    pub no_kernels: bool,
    /// Extra arguments for the test binaries (after `--`), e.g. a test name filter. They
    /// apply to the tests on this machine's kernel only.
    #[arg(last = true)]
    pub args: Vec<String>,
}

/// The test binaries of the datapath that run again with classic tc.
const ATTACH_RUNS: [&str; 3] = ["datapath", "topology", "adopt"];

pub fn run(opts: &Options) -> anyhow::Result<()> {
    if !opts.no_setup {
        setup::run()?;
    }
    if !opts.no_lint {
        lint()?;
    }
    build::run(&build::Options {
        release: true,
        no_setup: true,
    })?;
    if !opts.kernels {
        // Found by tests/tests/adopt.rs beside xhost-user.
        build::upgrade(true)?;
    }
    // Every part goes ahead even if one fails: one must not hide the others' results.
    let mut results = Vec::new();
    if !opts.kernels {
        results.push(all_tests(opts));
        println!(
            "xtask test: datapath tests again, attached through classic tc (XHOST_TEST_ATTACH=tc)"
        );
        results.push(tc_run(opts));
    }
    if !opts.no_kernels {
        results.push(kernels::run(&kernels::Options {
            // build::run above already ran setup (or was told not to).
            no_setup: true,
            ..kernels::Options::default()
        }));
    }
    let errors: Vec<String> = results
        .into_iter()
        .filter_map(|r| r.err().map(|e| format!("{e:#}")))
        .collect();
    match errors.as_slice() {
        [] => Ok(()),
        _ => anyhow::bail!("{}", errors.join("\n")),
    }
}

/// Every crate's tests, agents attached as the kernel's default.
fn all_tests(opts: &Options) -> anyhow::Result<()> {
    let mut cmd = workspace::cargo();
    // `--workspace` overrides default-members, so the eBPF crate has to be left out by
    // name: it only builds for bpfel-unknown-none (xhost-user's build script builds it, and
    // its datapath tests run from xhost-user through BPF_PROG_TEST_RUN).
    // --no-fail-fast: a failing test binary must not hide the results of the others.
    cmd.args([
        "test",
        "--workspace",
        "--exclude",
        "xhost-ebpf",
        "--release",
        "--no-fail-fast",
    ]);
    if !workspace::is_root() {
        // Build as the user, run only the test binaries as root (as aya's xtask does), so
        // the target directory does not fill with root-owned files.
        cmd.args(["--config", "target.'cfg(all())'.runner = ['sudo', '-E']"]);
    }
    cmd.args(["--", "--test-threads=1"]).args(&opts.args);
    workspace::run_status(&mut cmd)
}

/// The datapath's real-packet tests with `--attach tc`.
fn tc_run(opts: &Options) -> anyhow::Result<()> {
    let mut cmd = workspace::cargo();
    cmd.args(["test", "-p", "xhost-tests", "--release", "--no-fail-fast"]);
    for t in ATTACH_RUNS {
        cmd.args(["--test", t]);
    }
    if !workspace::is_root() {
        cmd.args(["--config", "target.'cfg(all())'.runner = ['sudo', '-E']"]);
    }
    cmd.env("XHOST_TEST_ATTACH", "tc");
    cmd.args(["--", "--test-threads=1"]).args(&opts.args);
    workspace::run_status(&mut cmd)
}

/// The checks CI holds every change to, before any test runs: formatting, then clippy with
/// warnings as errors on the host crates and, separately, on the eBPF crate.
fn lint() -> anyhow::Result<()> {
    workspace::run_status(workspace::cargo().args(["fmt", "--all", "--check"]))?;
    workspace::run_status(workspace::cargo().args([
        "clippy",
        "--release",
        "--workspace",
        "--exclude",
        "xhost-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The compilers with the `core` sources the BPF target needs (Debian's rustc-web) come
    // without clippy, so the eBPF crate is linted for the host target, as aya-template's CI
    // does; a no_std binary checks there only with panic=abort.
    workspace::run_status(workspace::cargo().args([
        "clippy",
        "--release",
        "--package",
        "xhost-ebpf",
        "--config",
        "profile.release.panic=\"abort\"",
        "--",
        "-D",
        "warnings",
    ]))
}
