//! `cargo xtask setup`: installs what building and testing need, by running the project's
//! idempotent `scripts/setup.sh` (as root, since it installs packages).

use std::{process::Command, time::Duration};

use anyhow::{Context as _, bail};
use xhost_tests::Process;

use crate::workspace;

/// Bound on the whole setup; a cold machine takes a few minutes (toolchain, bpf-linker).
const SETUP_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Runs `bash scripts/setup.sh` from the workspace root, showing its output live; on failure
/// the error carries the full output.
pub fn run() -> anyhow::Result<()> {
    let root = workspace::root();
    let script = root.join("scripts/setup.sh");
    if !script.is_file() {
        bail!("{} not found", script.display());
    }
    let mut cmd = Command::new("bash");
    cmd.arg("scripts/setup.sh").current_dir(&root);
    // The kernel matrix's packages go to the target directory cargo uses, wherever
    // that is (CARGO_TARGET_DIR, build.target-dir).
    cmd.env(
        "XHOST_KERNELS_DIR",
        workspace::target_dir()?.join(crate::kernels::CACHE_DIR),
    );
    let mut setup = Process::spawn_echoing("setup", workspace::as_root(cmd))
        .context("starting scripts/setup.sh")?;
    let status = setup.wait_timeout(SETUP_TIMEOUT)?;
    match status {
        Some(s) if s.success() => Ok(()),
        Some(s) => bail!(
            "scripts/setup.sh failed ({s}); its output:\n{}",
            setup.output()
        ),
        None => bail!(
            "scripts/setup.sh still running after {SETUP_TIMEOUT:?}; its output:\n{}",
            setup.output()
        ),
    }
}
