//! The crate's error type: which command failed, with everything it printed.

use std::{io, process::ExitStatus, time::Duration};

/// Result alias used throughout the testbed.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while building or probing the testbed.
///
/// Command failures carry the full command line and its output, so a failing test shows
/// what to replay by hand.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The program could not be started at all (missing binary, no permission).
    #[error("cannot start `{cmd}`")]
    Spawn {
        cmd: String,
        #[source]
        source: io::Error,
    },
    /// The program ran and exited unsuccessfully.
    #[error("`{cmd}` failed ({status})\nstderr:\n{stderr}\nstdout:\n{stdout}")]
    Command {
        cmd: String,
        status: ExitStatus,
        stdout: String,
        stderr: String,
    },
    /// A tool printed something this crate does not understand.
    #[error("cannot parse {what} from {input:?}")]
    Parse { what: &'static str, input: String },
    /// A bounded wait ran out.
    #[error("timed out after {after:?} waiting for {what}\noutput so far:\n{output}")]
    Timeout {
        what: String,
        after: Duration,
        output: String,
    },
    /// A spawned process exited before producing what was waited for.
    #[error("`{label}` exited ({status:?}) before {what}\noutput:\n{output}")]
    Exited {
        label: String,
        what: String,
        status: Option<ExitStatus>,
        output: String,
    },
    /// The requested topology or probe parameters are inconsistent.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A required tool is not installed.
    #[error("`{tool}` not found in PATH (install: {package})")]
    MissingTool {
        tool: &'static str,
        package: &'static str,
    },
    /// Any other I/O failure, with what was being done.
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}
