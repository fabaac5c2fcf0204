//! `cargo xtask test`: setup, build, then every test of the workspace in release mode, as
//! root and on one thread (the tests create namespaces and load eBPF programs), then the
//! kernel matrix (older kernels in qemu, see [`crate::kernels`]).

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

pub fn run(opts: &Options) -> anyhow::Result<()> {
    build::run(&build::Options {
        release: true,
        no_setup: opts.no_setup,
    })?;
    // A failing host test must not hide the matrix's results, nor the other way round.
    let host = if opts.kernels {
        Ok(())
    } else {
        host_tests(opts)
    };
    let matrix = if opts.no_kernels {
        Ok(())
    } else {
        kernels::run(&kernels::Options {
            // build::run above already ran setup (or was told not to).
            no_setup: true,
            ..kernels::Options::default()
        })
    };
    match (host, matrix) {
        (Err(h), Err(m)) => Err(h.context(format!("and the kernel matrix failed too: {m:#}"))),
        (Err(e), Ok(())) | (Ok(()), Err(e)) => Err(e),
        (Ok(()), Ok(())) => Ok(()),
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
    if !workspace::is_root() {
        // Build as the user, run only the test binaries as root (as aya's xtask does), so
        // the target directory does not fill with root-owned files.
        cmd.args(["--config", "target.'cfg(all())'.runner = ['sudo', '-E']"]);
    }
    cmd.args(["--", "--test-threads=1"]).args(&opts.args);
    workspace::run_status(&mut cmd)
}
