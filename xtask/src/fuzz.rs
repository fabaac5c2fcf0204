//! `cargo xtask fuzz`: the differential fuzz test of the datapath against its reference
//! model (`xhost-user/tests/fuzz.rs`, see docs/fuzzing.md) with a frame count and seed of
//! one's choosing. `cargo xtask test` runs the same test with its default of 100 000 frames.

use clap::Args;

use crate::{setup, workspace};

#[derive(Args, Debug)]
pub struct Options {
    /// Frames to generate; each goes through every program of its mode.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub frames: u64,
    /// Seed of the run (printed by every run; the same seed replays the same frames and
    /// maps). Default: from the clock.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Skip scripts/setup.sh.
    #[arg(long)]
    pub no_setup: bool,
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    if !opts.no_setup {
        setup::run()?;
    }
    let mut cmd = workspace::cargo();
    cmd.args(["test", "--release", "-p", "xhost-user", "--test", "fuzz"]);
    cmd.env("XHOST_FUZZ_FRAMES", opts.frames.to_string());
    match opts.seed {
        Some(seed) => cmd.env("XHOST_FUZZ_SEED", seed.to_string()),
        None => cmd.env_remove("XHOST_FUZZ_SEED"),
    };
    if !workspace::is_root() {
        // Build as the user, run the test binary as root (it makes a netns and loads
        // programs); -E keeps the two variables above.
        cmd.args(["--config", "target.'cfg(all())'.runner = ['sudo', '-E']"]);
    }
    cmd.args(["--", "--test-threads=1", "--nocapture"]);
    workspace::run_status(&mut cmd)
}
