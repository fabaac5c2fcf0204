//! Running external commands with captured output and errors that show the command line.

use std::{
    ffi::OsStr,
    io::Write,
    path::PathBuf,
    process::{Command, Output, Stdio},
};

use crate::{Error, Result};

/// The command line as a shell-like string, for error messages and logs.
pub(crate) fn display(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(OsStr::to_string_lossy)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cmd` to completion with stdin closed, capturing stdout and stderr.
/// A non-zero exit is not an error here; see [`checked`].
pub(crate) fn output(cmd: &mut Command) -> Result<Output> {
    cmd.stdin(Stdio::null())
        .output()
        .map_err(|source| Error::Spawn {
            cmd: display(cmd),
            source,
        })
}

/// Runs `cmd` and fails with its full output unless it exits successfully.
pub(crate) fn checked(cmd: &mut Command) -> Result<Output> {
    let out = output(cmd)?;
    ensure_success(cmd, out)
}

/// Like [`checked`], feeding `input` on stdin (for `ip -batch -` and `iptables-restore`).
pub fn checked_with_stdin(cmd: &mut Command, input: &[u8]) -> Result<Output> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| Error::Spawn {
            cmd: display(cmd),
            source,
        })?;
    // The inputs are small (a few KiB) so writing before reading cannot fill the pipes.
    let written = match child.stdin.take() {
        Some(mut stdin) => stdin.write_all(input),
        None => Ok(()),
    };
    let out = child.wait_with_output().map_err(|source| Error::Io {
        what: format!("waiting for `{}`", display(cmd)),
        source,
    })?;
    let out = ensure_success(cmd, out)?;
    written.map_err(|source| Error::Io {
        what: format!("writing stdin of `{}`", display(cmd)),
        source,
    })?;
    Ok(out)
}

fn ensure_success(cmd: &Command, out: Output) -> Result<Output> {
    if out.status.success() {
        Ok(out)
    } else {
        Err(Error::Command {
            cmd: display(cmd),
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }
}

/// Looks `name` up in `PATH` (plus the sbin directories, which a non-login root shell may
/// lack), without running it.
pub(crate) fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// Fails with an install hint when `tool` is missing.
pub(crate) fn require_tool(tool: &'static str, package: &'static str) -> Result<PathBuf> {
    find_tool(tool).ok_or(Error::MissingTool { tool, package })
}
