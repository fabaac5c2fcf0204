//! `cargo xtask run -- ARGS`: build (release) and run xhost-user as root.

use std::{os::unix::process::CommandExt as _, process::Command};

use anyhow::Context as _;
use clap::Args;

use crate::{build, workspace};

#[derive(Args, Debug)]
pub struct Options {
    /// Skip scripts/setup.sh.
    #[arg(long)]
    pub no_setup: bool,
    /// Arguments for xhost-user (after `--`).
    #[arg(last = true)]
    pub args: Vec<String>,
}

/// Builds, then replaces this process with xhost-user (under `sudo -E` unless root), so
/// Ctrl-C, the exit status and stdio all belong to xhost-user itself.
pub fn run(opts: &Options) -> anyhow::Result<()> {
    let built = build::run(&build::Options {
        release: true,
        no_setup: opts.no_setup,
    })?;
    let mut cmd = Command::new(&built.xhost_user);
    cmd.args(&opts.args);
    let mut cmd = workspace::as_root(cmd);
    // exec only returns on failure.
    let err = cmd.exec();
    Err(err).with_context(|| format!("cannot exec `{}`", workspace::display(&cmd)))
}
