//! `NetNs`: a named network namespace that is deleted when the guard drops.

use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

use crate::{Error, Process, Result, cmd};

/// Where `ip netns` bind-mounts named namespaces (iproute2 hard-codes `/var/run/netns`).
pub const NETNS_DIR: &str = "/var/run/netns";

/// Prefix of every namespace this crate creates; [`cleanup_stale`] only touches these.
const PREFIX: &str = "xh";

/// Per-process counter making names unique within a run; the pid makes them unique across
/// concurrent runs.
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A network namespace created with `ip netns add` and deleted on drop.
///
/// Names are `xh-{pid}-{n}-{role}`, so parallel test binaries and leftovers of a killed run
/// never collide. Dropping never panics: a failed delete is reported on stderr (a panic in
/// `Drop` while unwinding would abort the test binary and hide the original failure).
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates `xh-{pid}-{n}-{role}`. `role` is free-form but kept to `[A-Za-z0-9-]` so the
    /// name is also safe in paths and shell commands.
    pub fn new(role: &str) -> Result<Self> {
        if role.is_empty() || !role.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(Error::Config(format!(
                "netns role {role:?} must be non-empty [A-Za-z0-9-]"
            )));
        }
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{PREFIX}-{}-{n}-{role}", std::process::id());
        cmd::require_tool("ip", "iproute2")?;
        cmd::checked(Command::new("ip").args(["netns", "add", &name]))?;
        Ok(Self { name })
    }

    /// The namespace's name as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bind mount that pins the namespace, for `nsenter --net=...` or `setns(2)`.
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }

    /// Runs `f` on a thread that entered this namespace (network namespaces
    /// are per thread), for sockets that must live in it.
    pub fn within<T: Send + 'static>(
        &self,
        what: &str,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let path = self.path();
        std::thread::spawn(move || -> Result<T> {
            let file = std::fs::File::open(&path).map_err(|source| Error::Io {
                what: format!("opening {}", path.display()),
                source,
            })?;
            nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                Error::Io {
                    what: format!("setns {}", path.display()),
                    source: e.into(),
                }
            })?;
            f()
        })
        .join()
        .map_err(|_| Error::Config(format!("{what}: thread in {} panicked", self.name)))?
    }

    /// `ip netns exec NAME args...`, not yet run.
    ///
    /// `ip netns exec` also remounts `/sys` so `/sys/class/net` shows this namespace's
    /// devices; it execs the program, so a spawned child's pid is the program's own.
    pub fn command<S: AsRef<OsStr>>(&self, args: &[S]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).args(args);
        c
    }

    /// `nsenter --net=PATH -- args...`, not yet run.
    ///
    /// Unlike `ip netns exec` this stays in the caller's mount namespace, which is what
    /// programs pinning to bpffs or talking to cgroups need (the remount of `/sys` done by
    /// `ip netns exec` hides `/sys/fs/bpf`).
    pub fn nsenter_command<S: AsRef<OsStr>>(&self, args: &[S]) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path().display()))
            .arg("--")
            .args(args);
        c
    }

    /// Runs `args` inside the namespace and returns its output, whatever the exit status.
    pub fn exec<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<Output> {
        cmd::output(&mut self.command(args))
    }

    /// Runs `args` inside the namespace; an unsuccessful exit is an error with the full
    /// output.
    pub fn try_run<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<Output> {
        cmd::checked(&mut self.command(args))
    }

    /// Like [`NetNs::try_run`] but panics with the full stderr: for tests. Returns stdout.
    #[track_caller]
    pub fn run<S: AsRef<OsStr>>(&self, args: &[S]) -> String {
        match self.try_run(args) {
            Ok(out) => String::from_utf8_lossy(&out.stdout).into_owned(),
            Err(e) => panic!("in netns {}: {e}", self.name),
        }
    }

    /// Starts `args` inside the namespace as a [`Process`] guard (stdout/stderr captured),
    /// which stops it on drop.
    pub fn spawn<S: AsRef<OsStr>>(&self, label: &str, args: &[S]) -> Result<Process> {
        Process::spawn(label, self.command(args))
    }

    /// `ip -n NAME args...`: configures the namespace without entering it.
    pub fn ip<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<Output> {
        cmd::checked(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// The ifindex of interface `name`.
    pub fn ifindex(&self, name: &str) -> Result<u32> {
        let out = self.ip(&["-o", "link", "show", "dev", name])?;
        crate::topology::parse_ifindex(&String::from_utf8_lossy(&out.stdout))
    }

    /// The name of the interface with `ifindex`, `None` if there is none.
    pub fn link_name(&self, ifindex: u32) -> Result<Option<String>> {
        let out = self.ip(&["-o", "link", "show"])?;
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if crate::topology::parse_ifindex(line)? == ifindex {
                // `12: vethabc@if2: <...> ...`
                let name = line
                    .split(':')
                    .nth(1)
                    .and_then(|n| n.trim().split('@').next());
                return Ok(name.map(str::to_owned));
            }
        }
        Ok(None)
    }

    /// Feeds a script of `ip` commands (one per line) to `ip -n NAME -batch -`: one process
    /// for a whole namespace's setup instead of one per command.
    pub fn ip_batch(&self, script: &str) -> Result<Output> {
        cmd::checked_with_stdin(
            Command::new("ip").args(["-n", &self.name, "-batch", "-"]),
            script.as_bytes(),
        )
    }

    /// Sets `key=value` with `sysctl -w` inside the namespace (net.* sysctls are per netns).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        cmd::require_tool("sysctl", "procps")?;
        self.try_run(&["sysctl", "-qw", &format!("{key}={value}")])
            .map(drop)
    }

    /// Reads a sysctl inside the namespace.
    pub fn sysctl_get(&self, key: &str) -> Result<String> {
        cmd::require_tool("sysctl", "procps")?;
        let out = self.try_run(&["sysctl", "-n", key])?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Pids of processes still living in the namespace (`ip netns pids`).
    pub fn pids(&self) -> Result<Vec<u32>> {
        let out = cmd::checked(Command::new("ip").args(["netns", "pids", &self.name]))?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect())
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // A process still inside keeps the namespace (and its interfaces) alive after the
        // name is removed; say so, since only the process's own guard may kill it.
        match self.pids() {
            Ok(pids) if !pids.is_empty() => eprintln!(
                "xhost-tests: netns {} still has processes {pids:?}; it lives on until they exit",
                self.name
            ),
            _ => {}
        }
        if let Err(e) = cmd::checked(Command::new("ip").args(["netns", "del", &self.name])) {
            eprintln!("xhost-tests: cannot delete netns {}: {e}", self.name);
        }
    }
}

/// Splits `xh-{pid}-{n}-{role}` into its parts; `None` for names this crate did not make.
pub fn parse_netns_name(name: &str) -> Option<(u32, u32, &str)> {
    let rest = name.strip_prefix(PREFIX)?.strip_prefix('-')?;
    let mut parts = rest.splitn(3, '-');
    let pid = parts.next()?.parse().ok()?;
    let n = parts.next()?.parse().ok()?;
    let role = parts.next().filter(|r| !r.is_empty())?;
    Some((pid, n, role))
}

/// Names from `ip netns list`, whose lines look like `NAME` or `NAME (id: 3)`.
pub(crate) fn parse_netns_list(out: &str) -> Vec<&str> {
    out.lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect()
}

/// Deletes namespaces left behind by runs whose process is gone (killed by SIGKILL, a
/// crash, or a panic with `panic = "abort"`). Returns the names removed.
///
/// Only names of the form `xh-{pid}-{n}-{role}` whose pid is not alive are touched, so a
/// concurrent run's namespaces are left alone.
pub fn cleanup_stale() -> Result<Vec<String>> {
    let out = cmd::checked(Command::new("ip").args(["netns", "list"]))?;
    let listing = String::from_utf8_lossy(&out.stdout);
    let me = std::process::id();
    let mut removed = Vec::new();
    for name in parse_netns_list(&listing) {
        let Some((pid, _, _)) = parse_netns_name(name) else {
            continue;
        };
        if pid == me || pid_alive(pid) {
            continue;
        }
        match cmd::checked(Command::new("ip").args(["netns", "del", name])) {
            Ok(_) => removed.push(name.to_owned()),
            Err(e) => eprintln!("xhost-tests: cannot delete stale netns {name}: {e}"),
        }
    }
    Ok(removed)
}

/// True while `pid` is a running process. A zombie counts as dead: a run killed with
/// SIGKILL stays a zombie until its parent reaps it, but will never clean up after itself.
pub fn pid_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| proc_state(&stat))
        .is_some_and(|state| !matches!(state, 'Z' | 'X' | 'x'))
}

/// The state letter of a `/proc/PID/stat` line: `123 (comm) S ...`. The command name may
/// itself contain `)` and spaces, so parse from the last `)`.
fn proc_state(stat: &str) -> Option<char> {
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_own_names_only() {
        assert_eq!(
            parse_netns_name("xh-123-4-host-a"),
            Some((123, 4, "host-a"))
        );
        assert_eq!(parse_netns_name("xh-1-0-c"), Some((1, 0, "c")));
        assert_eq!(parse_netns_name("xh-abc-0-c"), None);
        assert_eq!(parse_netns_name("xh-1-0-"), None);
        assert_eq!(parse_netns_name("xh-1-0"), None);
        assert_eq!(parse_netns_name("xhost-1-0-a"), None);
        assert_eq!(parse_netns_name("host-a"), None);
    }

    #[test]
    fn reads_process_state() {
        assert_eq!(proc_state("42 (a) b) Z 1 2"), Some('Z'));
        assert_eq!(proc_state("42 (cargo) S 1"), Some('S'));
        assert_eq!(proc_state("garbage"), None);
        assert!(pid_alive(std::process::id()));
    }

    #[test]
    fn parses_netns_list_with_ids() {
        let out = "xh-9-1-ctr-a1 (id: 2)\nxh-9-0-host-a (id: 0)\nplain\n\n";
        assert_eq!(
            parse_netns_list(out),
            ["xh-9-1-ctr-a1", "xh-9-0-host-a", "plain"]
        );
    }
}
