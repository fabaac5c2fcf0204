//! `cargo xtask build`: setup, then build xhost-user (its build script compiles and embeds
//! the eBPF object, so this is the only build step).

use std::path::PathBuf;

use clap::Args;

use crate::{setup, workspace};

#[derive(Args, Debug, Clone)]
pub struct Options {
    /// Build with the release profile.
    #[arg(long)]
    pub release: bool,
    /// Skip scripts/setup.sh (tools already installed).
    #[arg(long)]
    pub no_setup: bool,
}

/// Paths of the built binaries.
pub struct Built {
    pub xhost_user: PathBuf,
    pub probe: PathBuf,
}

/// Runs setup (unless skipped) and builds; returns where the binaries are.
pub fn run(opts: &Options) -> anyhow::Result<Built> {
    if !opts.no_setup {
        setup::run()?;
    }
    build(opts.release, &["-p", "xhost-user"])?;
    let dir = profile_dir(opts.release)?;
    Ok(Built {
        xhost_user: dir.join("xhost-user"),
        probe: dir.join("xh-probe"),
    })
}

/// Like [`run`], also building the testbed's `xh-probe` (needed by the demo and benches).
pub fn with_probe(opts: &Options) -> anyhow::Result<Built> {
    let built = run(opts)?;
    build(opts.release, &["-p", "xhost-tests", "--bin", "xh-probe"])?;
    Ok(built)
}

/// Builds the per-program cost benchmark (`xhost-user/examples/prog_cost.rs`, which embeds
/// this tree's eBPF object); returns its path.
pub fn prog_cost(release: bool) -> anyhow::Result<PathBuf> {
    build(release, &["-p", "xhost-user", "--example", "prog_cost"])?;
    Ok(profile_dir(release)?.join("examples").join("prog_cost"))
}

/// Builds the cluster bench (`tests/examples/cluster_bench.rs`: a real etcd, dockerd and
/// agents in namespaces); returns its path.
pub fn cluster_bench(release: bool) -> anyhow::Result<PathBuf> {
    build(
        release,
        &["-p", "xhost-tests", "--example", "cluster_bench"],
    )?;
    Ok(profile_dir(release)?.join("examples").join("cluster_bench"))
}

/// The value of `XHOST_BUILD_SALT` for the second build of [`upgrade`].
const UPGRADE_SALT: &str = "upgrade-test";

/// A second xhost-user from the same source with other programs (the eBPF
/// crate bakes `XHOST_BUILD_SALT` into every program), for the test of an
/// upgrade under traffic (`tests/tests/adopt.rs`). Built in the same target
/// directory, copied to `<profile>/xhost-user-upgrade`, then the usual build
/// is made again. Returns the copy's path.
pub fn upgrade(release: bool) -> anyhow::Result<PathBuf> {
    let dir = profile_dir(release)?;
    let copy = dir.join("xhost-user-upgrade");
    let mut cmd = workspace::cargo();
    cmd.args(["build", "-p", "xhost-user"])
        .env("XHOST_BUILD_SALT", UPGRADE_SALT);
    if release {
        cmd.arg("--release");
    }
    workspace::run_status(&mut cmd)?;
    std::fs::copy(dir.join("xhost-user"), &copy)
        .map_err(|e| anyhow::anyhow!("copying the upgrade build to {}: {e}", copy.display()))?;
    build(release, &["-p", "xhost-user"])?;
    Ok(copy)
}

fn build(release: bool, args: &[&str]) -> anyhow::Result<()> {
    let mut cmd = workspace::cargo();
    cmd.arg("build").args(args);
    if release {
        cmd.arg("--release");
    }
    workspace::run_status(&mut cmd)
}

fn profile_dir(release: bool) -> anyhow::Result<PathBuf> {
    Ok(workspace::target_dir()?.join(if release { "release" } else { "debug" }))
}
