//! Runs `xhost-user` inside a simulated host: a guard around one agent with
//! its own pin and run directories, stopped by PID and checked to leave
//! nothing behind.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Output,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;

use crate::{Error, NetNs, Process, Result};

/// Env var naming the `xhost-user` binary (else found next to the test binary).
pub const XHOST_BIN_ENV: &str = "XHOST_USER_BIN";

/// Env var choosing how every agent the tests start attaches its TC
/// programs: `tc`, `tcx` or `auto` (passed as `load --attach`); unset is
/// the agent's default (auto). `cargo xtask test` runs the datapath tests
/// once with each of tcx and tc.
pub const ATTACH_ENV: &str = "XHOST_TEST_ATTACH";

/// The `--attach` value the tests ask for, if any (empty: none).
pub fn test_attach() -> Option<String> {
    let v = std::env::var(ATTACH_ENV).ok().filter(|v| !v.is_empty())?;
    assert!(
        matches!(v.as_str(), "tc" | "tcx" | "auto"),
        "{ATTACH_ENV}={v}: expected tc, tcx or auto"
    );
    Some(v)
}

/// Whether the agents the tests start attach TC programs through tcx (else
/// classic tc): as asked by [`ATTACH_ENV`], or, for auto, whether the
/// kernel has tcx (its `BPF_PROG_QUERY` knows `BPF_TCX_INGRESS`).
pub fn expect_tcx() -> bool {
    match test_attach().as_deref() {
        Some("tc") => false,
        Some("tcx") => true,
        _ => kernel_has_tcx(),
    }
}

/// Whether the running kernel has tcx (6.6+): its `BPF_PROG_QUERY` knows
/// `BPF_TCX_INGRESS` (asked for `lo`, which every namespace has).
pub fn kernel_has_tcx() -> bool {
    aya::programs::SchedClassifier::query_tcx("lo", aya::programs::TcAttachType::Ingress).is_ok()
}

/// How [`attached_programs`] names the TC hook `dir` (`ingress`,
/// `egress`) for the attach method the tests run with: `tcx-ingress`, or
/// `tc-ingress` for a classic filter.
pub fn tc_hook(dir: &str) -> String {
    format!("{}-{dir}", if expect_tcx() { "tcx" } else { "tc" })
}

/// `args` of `xhost-user load` with `--attach` from [`ATTACH_ENV`] added,
/// unless they choose one themselves.
fn with_test_attach(args: &[&str]) -> Vec<String> {
    let mut all: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    if let Some(a) = test_attach()
        && !args.contains(&"--attach")
    {
        all.extend(["--attach".to_owned(), a]);
    }
    all
}

/// Locates `xhost-user`: `$XHOST_USER_BIN`, else in `target/<profile>/`
/// beside the running test binary (`cargo xtask test` builds it first).
pub fn xhost_bin() -> Result<PathBuf> {
    crate::probe::workspace_bin(
        "xhost-user",
        XHOST_BIN_ENV,
        "cargo build --release -p xhost-user",
    )
}

/// Per-agent state locations, unique per process and agent.
#[derive(Clone, Debug)]
pub struct AgentDirs {
    pub pin_dir: PathBuf,
    pub run_dir: PathBuf,
}

impl AgentDirs {
    pub fn unique(role: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let tag = format!("xh-{}-{n}-{role}", std::process::id());
        Self {
            pin_dir: Path::new("/sys/fs/bpf").join(&tag),
            run_dir: std::env::temp_dir().join(tag),
        }
    }

    /// `--pin-dir D --run-dir R`, to put before a subcommand.
    pub fn args(&self) -> Vec<String> {
        vec![
            "--pin-dir".into(),
            self.pin_dir.display().to_string(),
            "--run-dir".into(),
            self.run_dir.display().to_string(),
        ]
    }

    /// Whether anything of the instance is left on disk.
    pub fn leftovers(&self) -> Vec<PathBuf> {
        [&self.pin_dir, &self.run_dir]
            .into_iter()
            .filter(|p| p.exists())
            .cloned()
            .collect()
    }
}

/// Runs `xhost-user <dirs> <args>` to completion inside `ns`.
pub fn xhost(ns: &NetNs, dirs: &AgentDirs, args: &[&str]) -> Result<Output> {
    let args = if args.first() == Some(&"load") {
        with_test_attach(args)
    } else {
        args.iter().map(|s| (*s).to_owned()).collect()
    };
    let mut cmd = instance_command(&ns.path(), &xhost_bin()?, dirs, &args);
    cmd.output().map_err(|source| Error::Io {
        what: format!("running {}", crate::cmd::display(&cmd)),
        source,
    })
}

/// `xhost-user <dirs> <args>` inside the namespace at `ns_path`, not yet
/// run. nsenter, not `ip netns exec`: the latter remounts /sys, which hides
/// the bpffs at /sys/fs/bpf that pins live on.
fn instance_command(
    ns_path: &Path,
    bin: &Path,
    dirs: &AgentDirs,
    args: &[String],
) -> std::process::Command {
    let mut cmd = std::process::Command::new("nsenter");
    cmd.arg(format!("--net={}", ns_path.display()))
        .arg("--")
        .arg(bin)
        .args(dirs.args())
        .args(args);
    cmd
}

/// `xhost-user status --json` of an instance, parsed.
pub fn status(ns: &NetNs, dirs: &AgentDirs) -> Result<serde_json::Value> {
    parse_status(&xhost(ns, dirs, &["status", "--json"])?)
}

/// What `xhost-user status --json` printed, parsed; an error if it failed.
fn parse_status(out: &Output) -> Result<serde_json::Value> {
    if !out.status.success() {
        return Err(Error::Config(format!(
            "xhost-user status failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    serde_json::from_slice(&out.stdout).map_err(|_| Error::Parse {
        what: "xhost-user status --json",
        input: String::from_utf8_lossy(&out.stdout).into_owned(),
    })
}

/// The `ROUTES` entries `status --json` lists, as (prefix, peer).
pub fn status_routes(s: &serde_json::Value) -> Vec<(String, String)> {
    s["routes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| {
            Some((
                r["prefix"].as_str()?.to_owned(),
                r["peer"].as_str()?.to_owned(),
            ))
        })
        .collect()
}

/// The `ROUTES6` entries `status --json` lists, as `prefix via peer`.
pub fn status_routes6(s: &serde_json::Value) -> Vec<String> {
    s["routes6"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            format!(
                "{} via {}",
                r["prefix"].as_str().unwrap_or_default(),
                r["peer"].as_str().unwrap_or_default()
            )
        })
        .collect()
}

/// xhost's IPv6 kernel routes (`proto 177`) in `ns`, as `ip -6 route` prints
/// them (`prefix dev ens33 ...`), trimmed to `prefix dev device`, sorted.
pub fn kernel_routes6(ns: &NetNs) -> Vec<String> {
    let mut routes: Vec<String> = ns
        .run(&["ip", "-6", "route", "show", "proto", "177"])
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w.len() >= 3 && w[1] == "dev").then(|| format!("{} dev {}", w[0], w[2]))
        })
        .collect();
    routes.sort();
    routes
}

/// Polls [`status`] every 20 ms until `pred` holds, for at most `timeout`; returns the
/// matching status and how long it took. The timeout error shows the last status.
pub fn wait_status(
    ns: &NetNs,
    dirs: &AgentDirs,
    what: &str,
    timeout: Duration,
    mut pred: impl FnMut(&serde_json::Value) -> bool,
) -> Result<(serde_json::Value, Duration)> {
    let t0 = Instant::now();
    loop {
        let last = status(ns, dirs);
        if let Ok(s) = &last
            && pred(s)
        {
            return Ok((last?, t0.elapsed()));
        }
        if t0.elapsed() > timeout {
            return Err(Error::Timeout {
                what: what.to_owned(),
                after: timeout,
                output: match last {
                    Ok(s) => serde_json::to_string_pretty(&s).unwrap_or_default(),
                    Err(e) => e.to_string(),
                },
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `xhost-user status --json` of an instance, parsed; panics (as the tests
/// want) when it fails or does not print JSON.
pub fn status_json(ns: &NetNs, dirs: &AgentDirs) -> serde_json::Value {
    let out = xhost(ns, dirs, &["status", "--json"]).expect("run status");
    assert!(
        out.status.success(),
        "status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status --json is JSON")
}

/// `METHOD PATH` to an agent's HTTP address `addr` (its metrics) from
/// inside `ns`: the raw HTTP/1.1 response; panics (as the tests want) when
/// the request fails.
pub fn http(ns: &NetNs, addr: &'static str, method: &'static str, path: &'static str) -> String {
    use std::io::{Read as _, Write as _};
    ns.within("http request", move || {
        let io = |source| Error::Io {
            what: format!("{method} http://{addr}{path}"),
            source,
        };
        let mut s = std::net::TcpStream::connect(addr).map_err(io)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(io)?;
        let req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).map_err(io)?;
        let mut out = String::new();
        s.read_to_string(&mut out).map_err(io)?;
        Ok(out)
    })
    .unwrap_or_else(|e| panic!("{method} http://{addr}{path}: {e}"))
}

/// The packet count of counter `name` in a `status --json` answer.
pub fn counter(status: &serde_json::Value, name: &str) -> u64 {
    status["counters"][name]["packets"]
        .as_u64()
        .unwrap_or_else(|| panic!("counter {name} in {status}"))
}

/// An instance's map pinned as `name`, opened in-process as aya's type `M`.
fn open_pinned<M>(dirs: &AgentDirs, name: &str) -> Result<M>
where
    M: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let path = dirs.pin_dir.join(name);
    let err = |e: aya::maps::MapError| {
        Error::Config(format!("opening pinned map {}: {e}", path.display()))
    };
    let data = aya::maps::MapData::from_pin(&path).map_err(err)?;
    let map = aya::maps::Map::from_map_data(data).map_err(err)?;
    map.try_into().map_err(err)
}

/// Name of the pinned endpoint map (`xhost_common::MAP_ENDPOINTS`).
const MAP_ENDPOINTS: &str = "ENDPOINTS";
/// Size of its value (`xhost_common::Endpoint`: ifindex u32 first, host byte order).
const ENDPOINT_SIZE: usize = 24;

/// An instance's pinned `ENDPOINTS` map, read in-process: a lookup costs a few syscalls
/// rather than a `status` process, so it can be polled every millisecond to time when an
/// endpoint appears.
pub struct EndpointMap {
    map: aya::maps::HashMap<aya::maps::MapData, [u8; 4], [u8; ENDPOINT_SIZE]>,
}

impl EndpointMap {
    pub fn open(dirs: &AgentDirs) -> Result<Self> {
        Ok(Self {
            map: open_pinned(dirs, MAP_ENDPOINTS)?,
        })
    }

    /// Container IP -> host veth ifindex, as the datapath sees them now.
    pub fn read(&self) -> Result<std::collections::BTreeMap<Ipv4Addr, u32>> {
        let mut out = std::collections::BTreeMap::new();
        for item in self.map.iter() {
            let (k, v) = item.map_err(|e| Error::Config(format!("reading ENDPOINTS: {e}")))?;
            let ifindex = u32::from_ne_bytes([v[0], v[1], v[2], v[3]]);
            out.insert(Ipv4Addr::from(k), ifindex);
        }
        Ok(out)
    }
}

/// Name of the pinned route map (`xhost_common::MAP_ROUTES`).
const MAP_ROUTES: &str = "ROUTES";
/// Size of its value (`xhost_common::Peer`: host address, flags).
const PEER_SIZE: usize = 8;

/// An instance's pinned `ROUTES` map, read in-process, for benches that
/// poll it every few hundred microseconds.
pub struct RoutesMap {
    map: aya::maps::LpmTrie<aya::maps::MapData, [u8; 4], [u8; PEER_SIZE]>,
}

impl RoutesMap {
    pub fn open(dirs: &AgentDirs) -> Result<Self> {
        Ok(Self {
            map: open_pinned(dirs, MAP_ROUTES)?,
        })
    }

    /// Every prefix in the map.
    pub fn prefixes(&self) -> Result<std::collections::BTreeSet<(Ipv4Addr, u8)>> {
        let mut out = std::collections::BTreeSet::new();
        for k in self.map.keys() {
            let k = k.map_err(|e| Error::Config(format!("reading ROUTES: {e}")))?;
            out.insert((Ipv4Addr::from(k.data()), k.prefix_len() as u8));
        }
        Ok(out)
    }

    pub fn count(&self) -> Result<usize> {
        Ok(self.prefixes()?.len())
    }

    /// Whether a lookup of `addr/len` finds a route (longest match).
    pub fn contains(&self, addr: Ipv4Addr, len: u8) -> Result<bool> {
        let key = aya::maps::lpm_trie::Key::new(u32::from(len), addr.octets());
        match self.map.get(&key, 0) {
            Ok(_) => Ok(true),
            Err(aya::maps::MapError::KeyNotFound) => Ok(false),
            Err(e) => Err(Error::Config(format!("reading ROUTES: {e}"))),
        }
    }
}

/// Resident memory of a process in KiB (`VmRSS` of `/proc/<pid>/status`).
pub fn vm_rss_kib(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
        what: format!("reading {path}"),
        source,
    })?;
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| Error::Parse {
            what: "VmRSS",
            input: text.clone(),
        })
}

/// How [`Agent::start_opts`] runs the agent, beyond its `load` arguments.
#[derive(Clone, Debug, Default)]
pub struct StartOpts<'a> {
    /// The `xhost-user` binary (default: [`xhost_bin`]).
    pub bin: Option<&'a Path>,
    /// Extra environment variables (`NOTIFY_SOCKET`, ...).
    pub env: Vec<(String, String)>,
    /// A command the agent runs under, e.g. `setpriv --bounding-set ... --`.
    pub wrapper: Vec<&'a str>,
    /// SIGTERM to the agent when the thread that started it ends
    /// (`PR_SET_PDEATHSIG`): a `cargo xtask demo` killed before its guards
    /// ran leaves no agent running on in an orphaned namespace. Only for
    /// agents started from a thread that outlives them.
    pub die_with_parent: bool,
}

/// A foreground `xhost-user load` in a host namespace: the one wrapper the
/// tests, `cargo xtask demo` and `cargo xtask bench` start, wait for, ask
/// and stop agents through.
pub struct Agent {
    process: Process,
    pub dirs: AgentDirs,
    ns_path: PathBuf,
    bin: PathBuf,
    command_line: String,
    /// Leave pins and run state behind on drop ([`Agent::kill`]).
    keep: bool,
}

/// How long a one-shot `xhost-user` command of [`Agent::run`] and the
/// `unload` after a stop may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(15);

impl Agent {
    /// Starts `xhost-user load <args>` in `ns` and waits for `ready`.
    pub fn start(ns: &NetNs, role: &str, args: &[&str]) -> Result<Self> {
        Self::start_with(&xhost_bin()?, ns, role, args)
    }

    /// As [`Agent::start`], with the `xhost-user` binary `bin`.
    pub fn start_with(bin: &Path, ns: &NetNs, role: &str, args: &[&str]) -> Result<Self> {
        let mut agent = Self::spawn(bin, ns, role, AgentDirs::unique(role), args)?;
        agent.wait_ready()?;
        Ok(agent)
    }

    /// As [`Agent::start_with`], in the pin and run directories `dirs`
    /// (a restart of an agent that [`Agent::kill`] left behind).
    pub fn start_in(
        bin: &Path,
        ns: &NetNs,
        role: &str,
        dirs: AgentDirs,
        args: &[&str],
    ) -> Result<Self> {
        let mut agent = Self::spawn(bin, ns, role, dirs, args)?;
        agent.wait_ready()?;
        Ok(agent)
    }

    /// As [`Agent::start`], with the binary, environment and wrapper of `opts`.
    pub fn start_opts(ns: &NetNs, role: &str, args: &[&str], opts: &StartOpts) -> Result<Self> {
        let mut agent = Self::spawn_opts(ns, role, AgentDirs::unique(role), args, opts)?;
        agent.wait_ready()?;
        Ok(agent)
    }

    /// Starts `xhost-user <dirs> load <args>` in `ns` without waiting for it.
    pub fn spawn(
        bin: &Path,
        ns: &NetNs,
        role: &str,
        dirs: AgentDirs,
        args: &[&str],
    ) -> Result<Self> {
        let opts = StartOpts {
            bin: Some(bin),
            ..StartOpts::default()
        };
        Self::spawn_opts(ns, role, dirs, args, &opts)
    }

    /// As [`Agent::spawn`], with the binary, environment and wrapper of `opts`.
    pub fn spawn_opts(
        ns: &NetNs,
        role: &str,
        dirs: AgentDirs,
        args: &[&str],
        opts: &StartOpts,
    ) -> Result<Self> {
        let bin = match opts.bin {
            Some(b) => b.to_owned(),
            None => xhost_bin()?,
        };
        let mut all: Vec<String> = opts.wrapper.iter().map(|s| (*s).to_owned()).collect();
        all.push(bin.display().to_string());
        all.extend(dirs.args());
        all.push("load".into());
        all.extend(with_test_attach(args));
        let mut cmd = ns.nsenter_command(&all);
        cmd.envs(opts.env.iter().map(|(k, v)| (k, v)));
        if opts.die_with_parent {
            use std::os::unix::process::CommandExt as _;
            // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
            unsafe {
                cmd.pre_exec(|| {
                    // nsenter execs the agent in place, which keeps the setting.
                    if nix::libc::prctl(nix::libc::PR_SET_PDEATHSIG, nix::libc::SIGTERM) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let command_line = crate::cmd::display(&cmd);
        let mut process = Process::spawn_echoing(&format!("xhost-user@{role}"), cmd)?;
        // Detaching programs and unpinning can take a moment: no SIGKILL too early.
        process.set_grace(Duration::from_secs(10));
        Ok(Self {
            process,
            dirs,
            ns_path: ns.path(),
            bin,
            command_line,
            keep: false,
        })
    }

    /// Waits for the agent's `ready` line.
    pub fn wait_ready(&mut self) -> Result<()> {
        self.wait_ready_within(Duration::from_secs(20), || false)
    }

    /// Waits up to `timeout` for the agent's `ready` line, looking every
    /// 200 ms whether `interrupted` (Ctrl-C) says to give up.
    pub fn wait_ready_within(
        &mut self,
        timeout: Duration,
        interrupted: impl Fn() -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if interrupted() {
                return Err(Error::Config("interrupted".into()));
            }
            let slice = deadline
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(200));
            match self.process.wait_for_line(|l| l.trim() == "ready", slice) {
                Ok(_) => return Ok(()),
                Err(Error::Timeout { .. }) if Instant::now() < deadline => {}
                Err(Error::Timeout { what, output, .. }) => {
                    return Err(Error::Timeout {
                        what,
                        after: timeout,
                        output,
                    });
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The command line the agent was started with.
    pub fn command_line(&self) -> &str {
        &self.command_line
    }

    /// `xhost-user <dirs> <args>` for this agent's instance, inside its
    /// namespace, not yet run.
    pub fn command(&self, args: &[&str]) -> std::process::Command {
        let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
        instance_command(&self.ns_path, &self.bin, &self.dirs, &args)
    }

    /// Runs `xhost-user <dirs> <args>` (`status`, `unload`, ...) for this
    /// agent's instance to completion within 15 s (killed after); its
    /// output, or an error unless it succeeded.
    pub fn run(&self, args: &[&str]) -> Result<String> {
        run_bounded(self.command(args), COMMAND_TIMEOUT)
    }

    /// `xhost-user status --json` of this agent's instance, parsed.
    pub fn status(&self) -> Result<serde_json::Value> {
        let out = self
            .command(&["status", "--json"])
            .output()
            .map_err(|source| Error::Io {
                what: "running xhost-user status --json".into(),
                source,
            })?;
        parse_status(&out)
    }

    /// Stops the agent (SIGTERM; SIGKILL after 10 s) and removes what it
    /// left: an `xhost-user unload` if its pins survived (it died without
    /// detaching), then its pin and run directories. Returns its exit
    /// status; what could not be cleaned up is reported on stderr.
    pub fn stop(mut self) -> Result<std::process::ExitStatus> {
        self.process.stop()
    }

    /// SIGKILLs the agent and waits for it: its pinned datapath keeps
    /// forwarding and its run state stays. The caller owns the returned
    /// directories (clean them with `xhost-user unload` and
    /// [`remove_instance`]).
    pub fn kill(mut self) -> Result<AgentDirs> {
        self.process.signal(Signal::SIGKILL)?;
        self.process.wait_timeout(Duration::from_secs(10))?;
        self.keep = true;
        Ok(self.dirs.clone())
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Everything the agent printed so far.
    pub fn output(&self) -> String {
        self.process.output()
    }

    /// Sends `signal` and waits for a clean exit; returns the exit status
    /// and whatever the agent left on disk (should be nothing).
    pub fn stop_with(mut self, signal: Signal) -> Result<(std::process::ExitStatus, Vec<PathBuf>)> {
        self.process.signal(signal)?;
        let status = self
            .process
            .wait_timeout(Duration::from_secs(15))?
            .ok_or_else(|| Error::Timeout {
                what: "xhost-user to exit".into(),
                after: Duration::from_secs(15),
                output: self.process.output(),
            })?;
        Ok((status, self.dirs.leftovers()))
    }

    /// As [`Agent::stop_with`], for an agent that leaves its datapath
    /// pinned (`--keep-datapath`): its pins are the caller's to remove
    /// (`xhost-user unload` and [`remove_instance`]).
    pub fn stop_leaving(
        mut self,
        signal: Signal,
    ) -> Result<(std::process::ExitStatus, Vec<PathBuf>)> {
        self.keep = true;
        let dirs = self.dirs.clone();
        let (status, _) = self.stop_with(signal)?;
        Ok((status, dirs.leftovers()))
    }

    pub fn ns_path(&self) -> &Path {
        &self.ns_path
    }

    /// Whether the agent process is still running (not exited, not reaped).
    pub fn running(&mut self) -> bool {
        matches!(self.process.try_wait(), Ok(None))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // SIGTERM, then SIGKILL after the grace period; the pins an agent
        // that did not detach left are unloaded and removed here, so
        // nothing leaks.
        if let Err(e) = self.process.stop() {
            eprintln!("xhost-tests: cannot stop {}: {e}", self.process.label());
        }
        if self.keep {
            return;
        }
        if self.dirs.pin_dir.exists()
            && let Err(e) = self.run(&["unload"])
        {
            eprintln!("xhost-tests: unload of {}: {e}", self.process.label());
        }
        remove_instance(&self.dirs);
        for left in self.dirs.leftovers() {
            eprintln!("xhost-tests: cannot remove {}", left.display());
        }
    }
}

/// Runs `cmd` to completion within `timeout` (killed after); its output, or
/// an error unless it succeeded.
fn run_bounded(cmd: std::process::Command, timeout: Duration) -> Result<String> {
    let line = crate::cmd::display(&cmd);
    let mut p = Process::spawn(&line, cmd)?;
    match p.wait_timeout(timeout)? {
        Some(s) if s.success() => Ok(p.output()),
        Some(s) => Err(Error::Config(format!(
            "{line} failed ({s}):\n{}",
            p.output()
        ))),
        None => Err(Error::Timeout {
            what: line,
            after: timeout,
            output: p.output(),
        }),
    }
}

/// Removes the pin and run directories of agents ([`AgentDirs::unique`]:
/// `xh-{pid}-{n}-{role}`) whose role starts with `role_prefix` and whose
/// process is gone (a run killed before its guards ran); returns the paths
/// removed. A live run's, and other roles', are left alone.
pub fn remove_stale_instances(role_prefix: &str) -> Vec<PathBuf> {
    let me = std::process::id();
    let mut removed = Vec::new();
    for base in [Path::new("/sys/fs/bpf").to_owned(), std::env::temp_dir()] {
        let Ok(entries) = std::fs::read_dir(&base) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let Some((pid, _, role)) = crate::parse_netns_name(&name) else {
                continue;
            };
            let path = entry.path();
            if !role.starts_with(role_prefix)
                || pid == me
                || crate::pid_alive(pid)
                || !path.is_dir()
            {
                continue;
            }
            match std::fs::remove_dir_all(&path) {
                Ok(()) => removed.push(path),
                Err(e) => eprintln!("xhost-tests: cannot remove stale {}: {e}", path.display()),
            }
        }
    }
    removed
}

/// Best-effort removal of an instance's pins and state (never panics).
pub fn remove_instance(dirs: &AgentDirs) {
    // Markers of the clsact qdiscs an instance added (empty directories).
    let clsact = dirs.pin_dir.join("clsact");
    if let Ok(entries) = std::fs::read_dir(&clsact) {
        for e in entries.flatten() {
            let _ = std::fs::remove_dir(e.path());
        }
    }
    let _ = std::fs::remove_dir(&clsact);
    // The maps' layout fingerprint (an empty directory).
    let layout = dirs.pin_dir.join("layout");
    if let Ok(entries) = std::fs::read_dir(&layout) {
        for e in entries.flatten() {
            let _ = std::fs::remove_dir(e.path());
        }
    }
    let _ = std::fs::remove_dir(&layout);
    let links = dirs.pin_dir.join("links");
    let filters = dirs.pin_dir.join("filters");
    for dir in [&links, &filters, &dirs.pin_dir, &dirs.run_dir] {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.path().is_file() || !e.path().is_dir() {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
    for dir in [&links, &filters, &dirs.pin_dir, &dirs.run_dir] {
        let _ = std::fs::remove_dir(dir);
    }
}

/// Programs attached to `ifaces` inside `ns`: tcx (ingress and egress, by
/// BPF_PROG_QUERY), classic tc cls_bpf filters (`tc filter show`: hooks
/// `tc-ingress`, `tc-egress`, named as the filter is) and XDP (from `ip -d
/// link`), as `iface hook name` lines. bpftool 7.1 (Debian 12) lists
/// neither tcx nor link-based XDP, hence this.
pub fn attached_programs(ns: &NetNs, ifaces: &[&str]) -> Result<Vec<String>> {
    use aya::programs::{SchedClassifier, TcAttachType};
    let ifaces: Vec<String> = ifaces.iter().map(|s| (*s).to_owned()).collect();
    ns.within("attachment query", move || {
        let mut found = Vec::new();
        for iface in &ifaces {
            for (hook, at) in [
                ("tcx-ingress", TcAttachType::Ingress),
                ("tcx-egress", TcAttachType::Egress),
            ] {
                let progs = match SchedClassifier::query_tcx(iface, at) {
                    Ok((_, progs)) => progs,
                    // A kernel without tcx (before 6.6) does not know the attach
                    // type: nothing can be attached through it.
                    Err(aya::programs::ProgramError::SyscallError(e))
                        if e.io_error.raw_os_error() == Some(nix::libc::EINVAL) =>
                    {
                        Vec::new()
                    }
                    Err(e) => {
                        return Err(Error::Config(format!("query_tcx {iface} {hook}: {e}")));
                    }
                };
                for p in progs {
                    found.push(format!("{iface} {hook} {}", p.name_as_str().unwrap_or("?")));
                }
            }
            for dir in ["ingress", "egress"] {
                for name in tc_filter_names(iface, dir)? {
                    found.push(format!("{iface} tc-{dir} {name}"));
                }
            }
            let out = std::process::Command::new("ip")
                .args(["-d", "link", "show", "dev", iface])
                .output()
                .map_err(|source| Error::Io {
                    what: "ip link".into(),
                    source,
                })?;
            let text = String::from_utf8_lossy(&out.stdout);
            if text.contains(" xdp") || text.contains("prog/xdp") {
                found.push(format!("{iface} xdp"));
            }
        }
        Ok(found)
    })
}

/// Names of the eBPF programs that cls_bpf filters at `dir` (`ingress`,
/// `egress`) of `iface` run, in the current namespace (classic BPF
/// `bytecode` filters have none and are left out). No clsact qdisc: none.
pub fn tc_filter_names(iface: &str, dir: &str) -> Result<Vec<String>> {
    Ok(tc_filters(iface, dir)?
        .iter()
        .filter(|l| l.contains(" bpf ") && l.contains(" handle "))
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            words.by_ref().find(|w| *w == "name")?;
            words.next().map(str::to_owned)
        })
        .collect())
}

/// `tc filter show dev <iface> <dir>` in the current namespace, a line per
/// filter (the classifier-only lines without a handle included).
pub fn tc_filters(iface: &str, dir: &str) -> Result<Vec<String>> {
    let out = std::process::Command::new("tc")
        .args(["filter", "show", "dev", iface, dir])
        .output()
        .map_err(|source| Error::Io {
            what: "tc filter show".into(),
            source,
        })?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect())
}

/// `load` arguments for `host` serving its bridge without Docker, with `peer`
/// as its one peer (`--peer IP=SUBNET`), then `extra`.
pub fn load_args(host: &crate::Host, peer: &crate::Host, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "--iface",
        host.underlay_iface(),
        "--bridge",
        host.bridge(),
        "--no-docker",
        "--peer",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    a.push(format!("{}={}", peer.underlay_ip(), peer.subnet()));
    a.extend(extra.iter().map(|s| (*s).to_owned()));
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only directories of the role asked for whose process is gone go.
    #[test]
    fn stale_instances_of_one_role_are_removed() {
        let mut child = std::process::Command::new("true")
            .spawn()
            .expect("spawn true");
        let dead = child.id();
        child.wait().expect("reap");
        let dir = |role: &str| std::env::temp_dir().join(format!("xh-{dead}-0-{role}"));
        let (stale, other, live) = (
            dir("unitstale-a"),
            dir("unitother-a"),
            std::env::temp_dir().join(format!("xh-{}-0-unitstale-b", std::process::id())),
        );
        for d in [&stale, &other, &live] {
            std::fs::create_dir_all(d.join("sub")).expect("mkdir");
        }
        let removed = remove_stale_instances("unitstale-");
        let left = (stale.exists(), other.exists(), live.exists());
        for d in [&other, &live] {
            let _ = std::fs::remove_dir_all(d);
        }
        assert_eq!(removed, vec![stale]);
        assert_eq!(left, (false, true, true));
    }
}
