//! Developer tasks for xhost, run as `cargo xtask <command>` (alias in `.cargo/config.toml`).
//!
//! Each subcommand lives in its own module exposing `Options` (its clap arguments) and
//! `run`; adding one (e.g. `bench`) is a module, a variant of [`Command`] and a match arm.

mod bench;
mod build;
mod demo;
mod fuzz;
mod interrupt;
mod kernels;
mod run;
mod setup;
mod test;
mod workspace;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "xhost developer tasks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install the toolchain and tools (runs scripts/setup.sh).
    Setup,
    /// Set up, then build xhost-user (which embeds the eBPF object).
    Build(build::Options),
    /// Build (release), then run xhost-user as root with the given arguments.
    Run(run::Options),
    /// Two simulated Docker hosts in network namespaces, connected by xhost.
    Demo(demo::Options),
    /// Set up, build, and run every test of the workspace (as root, one thread).
    Test(test::Options),
    /// The kernel matrix: Debian's 5.10, 6.1 and 6.12 kernels in qemu, each running the
    /// BPF_PROG_TEST_RUN suite and the namespace tests per attach method.
    Kernels(kernels::Options),
    /// Benchmark container-to-container paths: wire, iptables routes, kernel VXLAN, xhost.
    Bench(bench::Options),
    /// Differential fuzzing: every datapath program against its reference model on random
    /// frames and maps (BPF_PROG_TEST_RUN, as root), from a printed, replayable seed.
    Fuzz(fuzz::Options),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Setup => setup::run(),
        Command::Build(opts) => build::run(&opts).map(drop),
        Command::Run(opts) => run::run(&opts),
        Command::Demo(opts) => demo::run(&opts),
        Command::Test(opts) => test::run(&opts),
        Command::Kernels(opts) => kernels::run(&opts),
        Command::Bench(opts) => bench::run(&opts),
        Command::Fuzz(opts) => fuzz::run(&opts),
    }
}
