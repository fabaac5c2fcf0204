//! `cargo xtask test`: setup, build, then every test of the workspace in release mode, as
//! root and on one thread (the tests create namespaces and load eBPF programs); then the
//! datapath's real-packet tests a second time with every agent attached through classic tc
//! (`XHOST_TEST_ATTACH=tc`), the first run having used the kernel's default (tcx where
//! present); then the kernel matrix (older kernels in qemu, see [`crate::kernels`]).

use clap::Args;

use crate::{build, kernels, workspace};

#[derive(Args, Debug)]
pub struct Options {
    /// Skip scripts/setup.sh.
    #[arg(long)]
    pub no_setup: bool,
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
const ATTACH_RUNS: [&str; 2] = ["datapath", "topology"];

pub fn run(opts: &Options) -> anyhow::Result<()> {
    build::run(&build::Options {
        release: true,
        no_setup: opts.no_setup,
    })?;
    // A failing run must not hide the others' results.
    let mut failed = Vec::new();
    if !opts.kernels {
        if let Err(e) = host_tests(opts) {
            failed.push(e);
        }
        println!(
            "xtask test: datapath tests again, attached through classic tc (XHOST_TEST_ATTACH=tc)"
        );
        if let Err(e) = tc_tests(opts) {
            failed.push(e);
        }
    }
    if !opts.no_kernels
        && let Err(e) = kernels::run(&kernels::Options {
            // build::run above already ran setup (or was told not to).
            no_setup: true,
            ..kernels::Options::default()
        })
    {
        failed.push(e.context("the kernel matrix"));
    }
    match failed.len() {
        0 => Ok(()),
        1 => Err(failed.remove(0)),
        _ => {
            let all: Vec<String> = failed.iter().map(|e| format!("{e:#}")).collect();
            anyhow::bail!("{} test runs failed: {}", all.len(), all.join("; "))
        }
    }
}

fn host_tests(opts: &Options) -> anyhow::Result<()> {
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
    as_root_runner(&mut cmd);
    cmd.args(["--", "--test-threads=1"]).args(&opts.args);
    workspace::run_status(&mut cmd)
}

/// The datapath's real-packet tests with every agent on `--attach tc`.
fn tc_tests(opts: &Options) -> anyhow::Result<()> {
    let mut cmd = workspace::cargo();
    cmd.args(["test", "-p", "xhost-tests", "--release", "--no-fail-fast"]);
    for t in ATTACH_RUNS {
        cmd.args(["--test", t]);
    }
    as_root_runner(&mut cmd);
    cmd.env("XHOST_TEST_ATTACH", "tc");
    cmd.args(["--", "--test-threads=1"]).args(&opts.args);
    workspace::run_status(&mut cmd)
}

/// Build as the user, run only the test binaries as root (as aya's xtask does), so the
/// target directory does not fill with root-owned files.
fn as_root_runner(cmd: &mut std::process::Command) {
    if !workspace::is_root() {
        cmd.args(["--config", "target.'cfg(all())'.runner = ['sudo', '-E']"]);
    }
}
