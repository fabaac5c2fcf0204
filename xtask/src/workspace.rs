//! Shared helpers: where the workspace and its target directory are, running commands with
//! readable failures, and getting root only for the commands that need it.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// `cargo` as invoked us (`$CARGO`, set by `cargo run`), run from the workspace root.
pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(root());
    c
}

/// The target directory, which may be shared or redirected (`CARGO_TARGET_DIR`,
/// `build.target-dir`): cargo itself is the one to ask.
pub fn target_dir() -> anyhow::Result<PathBuf> {
    let out = cargo()
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .output()
        .context("running cargo metadata")?;
    if !out.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("parsing cargo metadata")?;
    meta["target_directory"]
        .as_str()
        .map(PathBuf::from)
        .context("cargo metadata has no target_directory")
}

/// The command line, for messages.
pub fn display(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cmd` with inherited stdio and fails unless it succeeds.
pub fn run_status(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start `{}`", display(cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", display(cmd));
    }
    Ok(())
}

/// True when running as root.
pub fn is_root() -> bool {
    xhost_tests::is_root()
}

/// `cmd` unchanged as root; otherwise the same command under `sudo -E`. `PATH` is passed
/// explicitly because sudo's `secure_path` would otherwise hide `~/.cargo/bin`.
pub fn as_root(cmd: Command) -> Command {
    if is_root() {
        return cmd;
    }
    let mut sudo = Command::new("sudo");
    sudo.args(["-E", "env"]);
    let mut path = OsString::from("PATH=");
    path.push(std::env::var_os("PATH").unwrap_or_default());
    sudo.arg(path);
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            let mut kv = k.to_owned();
            kv.push("=");
            kv.push(v);
            sudo.arg(kv);
        }
    }
    sudo.arg(cmd.get_program()).args(cmd.get_args());
    if let Some(dir) = cmd.get_current_dir() {
        sudo.current_dir(dir);
    }
    sudo
}
