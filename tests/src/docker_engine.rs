//! A real Docker engine per simulated host: `dockerd` started inside a host network
//! namespace with its own data root, exec root and socket, and torn down on drop
//! (containers, daemon, leftover processes, mounts, directory).
//!
//! Engine facts this relies on: `nsenter --net` rather than `ip netns exec` (which remounts
//! /sys and hides the cgroup mounts dockerd needs), and `--init` so that `sleep` as PID 1
//! stops on SIGTERM instead of after the 10 s grace. Nothing here pulls images or
//! resolves names: the only image is [`BUSYBOX_IMAGE`], imported from the local busybox.

use std::{
    collections::BTreeMap,
    ffi::OsStr,
    fs::{self, File, OpenOptions},
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr},
    os::unix::{fs::PermissionsExt as _, net::UnixStream, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use nix::{
    mount::{MntFlags, umount2},
    sys::{
        prctl::{set_child_subreaper, set_pdeathsig},
        signal::{Signal, kill},
        wait::{WaitPidFlag, WaitStatus, waitpid},
    },
    unistd::Pid,
};

use crate::{
    Error, NETNS_DIR, PingStats, Process, Result, TransferOpts, cmd,
    probe::{RecvReport, SendReport, Transfer},
};

/// The image every test container runs: a busybox rootfs imported without a registry.
pub const BUSYBOX_IMAGE: &str = "xhost-test/busybox:latest";

/// Prefix of the engines' directories under `/tmp`, kept short because the daemon socket
/// path must fit `sun_path` (108 bytes) and containerd adds longer paths under it.
const DIR_PREFIX: &str = "/tmp/xhd-";
/// How long a starting engine may take to answer `/_ping` (seen: < 1 s).
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// SIGTERM grace before SIGKILL when stopping the daemon.
const STOP_GRACE: Duration = Duration::from_secs(15);
const POLL: Duration = Duration::from_millis(20);

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A `dockerd` running inside network namespace `netns`, with everything it writes under
/// one temp directory `D` (`D/data`, `D/exec`, `D/docker.sock`, `D/dockerd.log`).
///
/// Dropping it removes all containers (force), stops the daemon by pid (SIGTERM, SIGKILL
/// after 15 s), kills processes still running from `D` (containerd, shims) by pid,
/// unmounts whatever is left under `D` and deletes `D`. Drop never panics; problems go to
/// stderr. The namespace itself belongs to the caller (e.g. a [`crate::NetNs`]), which must
/// outlive the engine.
///
/// The daemon is started with `PR_SET_PDEATHSIG = SIGTERM`, so a test process killed before
/// its guards run does not leave daemons behind; since the kernel ties that to the thread
/// that spawned the daemon, create, restart and drop the engine on one long-lived thread
/// (the test's own). [`cleanup_stale`] removes the directories such a run leaves.
#[derive(Debug)]
pub struct Engine {
    netns: String,
    bip: String,
    dir: PathBuf,
    storage_driver: &'static str,
    daemon: Option<Child>,
    last_start: Duration,
}

impl Engine {
    /// Starts `dockerd` in `/var/run/netns/<netns_name>` with `--bip <bip>` (e.g.
    /// "192.168.110.1/24", docker0's address) and waits until it answers `/_ping`.
    /// Uses overlay2, falling back to vfs if the daemon does not come up with overlay2.
    pub fn start_in_netns(netns_name: &str, bip: &str) -> Result<Self> {
        let mut engine = Self::prepare_in_netns(netns_name, bip)?;
        // On error `engine` drops here and cleans up what was started.
        engine.boot()?;
        Ok(engine)
    }

    /// Like [`Engine::start_in_netns`] without starting the daemon: its directory, socket
    /// path and config exist, so clients can be pointed at an engine that is not up yet.
    /// Start it with [`Engine::boot`].
    pub fn prepare_in_netns(netns_name: &str, bip: &str) -> Result<Self> {
        let ns_path = Path::new(NETNS_DIR).join(netns_name);
        if !ns_path.exists() {
            return Err(Error::Config(format!(
                "netns {} does not exist",
                ns_path.display()
            )));
        }
        cmd::require_tool("dockerd", "docker.io")?;
        cmd::require_tool("nsenter", "util-linux")?;
        cmd::require_tool("setsid", "util-linux")?;
        let dir = make_dir()?;
        let engine = Self {
            netns: netns_name.to_owned(),
            bip: bip.to_owned(),
            dir,
            storage_driver: "overlay2",
            daemon: None,
            last_start: Duration::ZERO,
        };
        // An isolated daemon config (the host's /etc/docker/daemon.json must not leak in)
        // and CLI config (no credential helpers, no contexts).
        fs::write(engine.dir.join("daemon.json"), "{}\n").map_err(io("writing daemon.json"))?;
        fs::create_dir_all(engine.dir.join("cli")).map_err(io("creating the CLI config dir"))?;
        Ok(engine)
    }

    /// First start of a prepared engine: overlay2, else vfs. Later starts use
    /// [`Engine::start`], which keeps the storage driver that worked.
    pub fn boot(&mut self) -> Result<()> {
        if let Err(first) = self.start() {
            eprintln!("xhost-tests: dockerd with overlay2 failed, retrying with vfs: {first}");
            self.storage_driver = "vfs";
            self.start()?;
        }
        Ok(())
    }

    /// The daemon's unix socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("docker.sock")
    }

    /// `unix://<socket>`, for `DOCKER_HOST` or `-H`.
    pub fn host(&self) -> String {
        format!("unix://{}", self.socket().display())
    }

    /// The engine's temp directory `D`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The namespace the daemon runs in.
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// The daemon's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(Child::id)
    }

    /// `overlay2`, or `vfs` if overlay2 did not work.
    pub fn storage_driver(&self) -> &'static str {
        self.storage_driver
    }

    /// How long the last start took until `/_ping` answered.
    pub fn last_start_time(&self) -> Duration {
        self.last_start
    }

    /// Everything the daemon logged, over all its starts.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default()
    }

    /// Runs the `docker` CLI against this engine; the output whatever the exit status.
    pub fn docker<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<Output> {
        cmd::output(&mut self.docker_command(args))
    }

    /// Like [`Engine::docker`], failing on a non-zero exit; returns trimmed stdout.
    pub fn docker_ok<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<String> {
        let out = cmd::checked(&mut self.docker_command(args))?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// `docker -H unix://<socket> args...`, not yet run.
    ///
    /// Prefers Debian's CLI (`/usr/bin/docker`, the engine's own version) over a newer one
    /// earlier in `PATH`; `DOCKER_CONFIG` points into `D` so no user config applies.
    pub fn docker_command<S: AsRef<OsStr>>(&self, args: &[S]) -> Command {
        let cli = Path::new("/usr/bin/docker");
        let mut c = if cli.is_file() {
            Command::new(cli)
        } else {
            Command::new("docker")
        };
        c.env("DOCKER_CONFIG", self.dir.join("cli"))
            .env_remove("DOCKER_HOST")
            .env_remove("DOCKER_CONTEXT")
            .arg("-H")
            .arg(self.host())
            .args(args);
        c
    }

    /// Imports [`BUSYBOX_IMAGE`] from the local `busybox` binary unless present.
    pub fn import_busybox(&self) -> Result<()> {
        if self
            .docker(&["image", "inspect", BUSYBOX_IMAGE])?
            .status
            .success()
        {
            return Ok(());
        }
        let busybox = cmd::require_tool("busybox", "busybox-static")?;
        let rootfs = self.dir.join("busybox-rootfs");
        let res = build_rootfs(&busybox, &rootfs).and_then(|()| self.import_rootfs(&rootfs));
        if let Err(e) = fs::remove_dir_all(&rootfs) {
            eprintln!("xhost-tests: cannot remove {}: {e}", rootfs.display());
        }
        res
    }

    fn import_rootfs(&self, rootfs: &Path) -> Result<()> {
        let mut tar = Command::new("tar");
        tar.arg("-C")
            .arg(rootfs)
            .args(["-c", "."])
            .stdout(Stdio::piped());
        let mut tar_child = tar.spawn().map_err(|source| Error::Spawn {
            cmd: cmd::display(&tar),
            source,
        })?;
        let mut import = self.docker_command(&[
            "import",
            "--change",
            "ENV PATH=/bin",
            "--change",
            r#"CMD ["/bin/sh"]"#,
            "-",
            BUSYBOX_IMAGE,
        ]);
        if let Some(out) = tar_child.stdout.take() {
            import.stdin(out);
        }
        let out = import.output().map_err(|source| Error::Spawn {
            cmd: cmd::display(&import),
            source,
        });
        let tar_status = tar_child.wait().map_err(io("waiting for tar"))?;
        let out = out?;
        if !tar_status.success() || !out.status.success() {
            return Err(Error::Command {
                cmd: format!("tar -c | {}", cmd::display(&import)),
                status: if out.status.success() {
                    tar_status
                } else {
                    out.status
                },
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        Ok(())
    }

    /// `docker run -d --pull=never --init --network NET [--ip IP] --name NAME busybox
    /// sleep 3600`; returns the container id. (`--ip` needs a user-defined network.)
    pub fn run_container(&self, network: &str, ip: Option<&str>, name: &str) -> Result<String> {
        let mut args = vec!["run", "-d", "--pull=never", "--init", "--network", network];
        if let Some(ip) = ip {
            args.extend(["--ip", ip]);
        }
        args.extend(["--name", name, BUSYBOX_IMAGE, "sleep", "3600"]);
        self.docker_ok(&args)
    }

    /// `docker inspect -f FORMAT TARGET`, trimmed.
    pub fn inspect(&self, target: &str, format: &str) -> Result<String> {
        self.docker_ok(&["inspect", "-f", format, target])
    }

    /// `docker run -d --pull=never --init OPTS... --name NAME busybox sleep 3600`, for options
    /// [`Engine::run_container`] does not cover (`--restart=always`, ...); returns the id.
    pub fn run_container_with(&self, opts: &[&str], name: &str) -> Result<String> {
        let mut args = vec!["run", "-d", "--pull=never", "--init"];
        args.extend_from_slice(opts);
        args.extend(["--name", name, BUSYBOX_IMAGE, "sleep", "3600"]);
        self.docker_ok(&args)
    }

    /// Pid of a running container's init process (`State.Pid`), in the root pid namespace.
    pub fn container_pid(&self, container: &str) -> Result<u32> {
        let pid = self.inspect(container, "{{.State.Pid}}")?;
        match pid.parse::<u32>() {
            Ok(p) if p > 0 => Ok(p),
            _ => Err(Error::Config(format!(
                "container {container} is not running (State.Pid {pid:?})"
            ))),
        }
    }

    /// `nsenter --net=/proc/<pid>/ns/net -- args...` for a running container: a program
    /// from the test machine, run in the container's network namespace only (its mount
    /// namespace, the busybox rootfs, has no `ping` from iputils and no `xh-probe`).
    pub fn in_container<S: AsRef<OsStr>>(&self, container: &str, args: &[S]) -> Result<Command> {
        let pid = self.container_pid(container)?;
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/proc/{pid}/ns/net"))
            .arg("--")
            .args(args);
        Ok(c)
    }

    /// `ping -c count` from a running container to `dst` (200 ms apart, 1 s for the last
    /// reply), as [`crate::ping`] does for a namespace.
    /// `dst` may be IPv6.
    pub fn ping_from(
        &self,
        container: &str,
        dst: impl Into<IpAddr>,
        count: u32,
    ) -> Result<PingStats> {
        cmd::require_tool("ping", "iputils-ping")?;
        let args = crate::probe::ping_args(dst.into(), count);
        let out = cmd::output(&mut self.in_container(container, &args)?)?;
        Ok(crate::probe::ping_stats(&out))
    }

    /// A running container's endpoint on `network` as Docker and the kernel see it: IP and
    /// MAC from `docker inspect`, the host-side veth from the container's interface with
    /// that MAC (its `IFLA_LINK`, the `@ifN` of `ip link`), checked in the engine's
    /// namespace to be that interface's peer.
    pub fn container_endpoint(&self, container: &str, network: &str) -> Result<ContainerEndpoint> {
        let fmt = format!(
            "{{{{with index .NetworkSettings.Networks \"{network}\"}}}}{{{{.IPAddress}}}} {{{{.MacAddress}}}}{{{{end}}}}"
        );
        let out = self.inspect(container, &fmt)?;
        let parse = || Error::Parse {
            what: "container endpoint (IP MAC)",
            input: out.clone(),
        };
        let (ip, mac) = out.split_once(' ').ok_or_else(parse)?;
        let ip: Ipv4Addr = ip.parse().map_err(|_| parse())?;
        let mac = mac.trim().to_ascii_lowercase();
        let inner =
            cmd::checked(&mut self.in_container(container, &["ip", "-j", "link", "show"])?)?;
        let inner: serde_json::Value =
            serde_json::from_slice(&inner.stdout).map_err(|_| Error::Parse {
                what: "ip -j link (container)",
                input: String::from_utf8_lossy(&inner.stdout).into_owned(),
            })?;
        let iface = inner
            .as_array()
            .into_iter()
            .flatten()
            .find(|l| l["address"].as_str() == Some(mac.as_str()))
            .ok_or_else(|| Error::Config(format!("{container}: no interface with MAC {mac}")))?;
        let (Some(peer), Some(index)) = (iface["link_index"].as_u64(), iface["ifindex"].as_u64())
        else {
            return Err(Error::Config(format!("{container}: {iface} is no veth")));
        };
        let outer =
            cmd::checked(Command::new("ip").args(["-n", &self.netns, "-j", "link", "show"]))?;
        let outer: serde_json::Value =
            serde_json::from_slice(&outer.stdout).map_err(|_| Error::Parse {
                what: "ip -j link (host)",
                input: String::from_utf8_lossy(&outer.stdout).into_owned(),
            })?;
        let host = outer
            .as_array()
            .into_iter()
            .flatten()
            .find(|l| l["ifindex"].as_u64() == Some(peer))
            .ok_or_else(|| {
                Error::Config(format!("{container}: ifindex {peer} not in {}", self.netns))
            })?;
        if host["link_index"].as_u64() != Some(index) {
            return Err(Error::Config(format!(
                "{container}: host ifindex {peer} is not the peer of the container's {index}: {host}"
            )));
        }
        Ok(ContainerEndpoint {
            ip,
            mac,
            host_ifindex: u32::try_from(peer).map_err(|_| parse())?,
            host_veth: host["ifname"].as_str().unwrap_or_default().to_owned(),
            bridge: host["master"].as_str().unwrap_or_default().to_owned(),
        })
    }

    /// `docker events --format '{{json .}}' --filter F...` running until the guard drops:
    /// for runs producing more events than the daemon keeps (see [`Engine::events`]). Read
    /// them with [`Event::parse_all`] on [`Process::output`].
    /// Events from `since` on are included (replayed if the daemon still has them), so a
    /// follower started just before an action does not miss it.
    pub fn follow_events(&self, since: SystemTime, filters: &[&str]) -> Result<Process> {
        let d = since.duration_since(UNIX_EPOCH).unwrap_or_default();
        let since = format!("{}.{:09}", d.as_secs(), d.subsec_nanos());
        let mut args = vec!["events", "--since", &since, "--format", "{{json .}}"];
        for f in filters {
            args.extend(["--filter", f]);
        }
        Process::spawn(
            &format!("docker events in {}", self.netns),
            self.docker_command(&args),
        )
    }

    /// The engine's events between `since` and `until` (both in the past or now), oldest
    /// first, from `docker events --format '{{json .}}'`; `filters` as for `--filter`
    /// (`type=container`, `event=start`, ...). The daemon keeps only its last 256 events,
    /// in memory (a restart forgets them): follow longer runs with
    /// [`Engine::follow_events`].
    pub fn events(
        &self,
        since: SystemTime,
        until: SystemTime,
        filters: &[&str],
    ) -> Result<Vec<Event>> {
        let stamp = |t: SystemTime| {
            let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
            format!("{}.{:09}", d.as_secs(), d.subsec_nanos())
        };
        let (since, until) = (stamp(since), stamp(until));
        let mut args = vec![
            "events",
            "--since",
            &since,
            "--until",
            &until,
            "--format",
            "{{json .}}",
        ];
        for f in filters {
            args.extend(["--filter", f]);
        }
        let out = self.docker_ok(&args)?;
        out.lines()
            .filter(|l| !l.trim().is_empty())
            .map(Event::parse)
            .collect()
    }

    /// Stops the daemon (keeping its containers' state, so restart policies apply on the
    /// next start): SIGTERM by pid, SIGKILL after 15 s. Idempotent.
    pub fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.daemon.take() else {
            return Ok(());
        };
        let status = stop_child(&mut child, STOP_GRACE)?;
        if !status.success() {
            eprintln!(
                "xhost-tests: dockerd in {} exited with {status}",
                self.netns
            );
        }
        Ok(())
    }

    /// Starts the daemon again with the same directories and options; waits for `/_ping`.
    pub fn start(&mut self) -> Result<()> {
        if self.daemon.is_some() {
            return Ok(());
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("dockerd.log"))
            .map_err(io("opening dockerd.log"))?;
        let log_err = log.try_clone().map_err(io("duplicating the log fd"))?;
        let d = &self.dir;
        let mut c = Command::new("nsenter");
        // nsenter with only --net execs without forking, and setsid (not a group leader
        // here) too, so the child's pid is dockerd's. setsid keeps terminal signals away.
        c.arg(format!(
            "--net={}",
            Path::new(NETNS_DIR).join(&self.netns).display()
        ))
        .args(["--", "setsid", "/usr/sbin/dockerd"])
        .arg("--data-root")
        .arg(d.join("data"))
        .arg("--exec-root")
        .arg(d.join("exec"))
        .arg("--pidfile")
        .arg(d.join("pid"))
        .arg("--config-file")
        .arg(d.join("daemon.json"))
        .arg("-H")
        .arg(self.host())
        .args(["--bip", &self.bip, "--storage-driver", self.storage_driver])
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err);
        // SAFETY: the closure only makes the prctl(2) syscall, which is async-signal-safe
        // and touches no memory shared with the parent.
        unsafe {
            c.pre_exec(|| {
                // If this process dies without dropping the guard (a test killed by a
                // timeout), the daemon gets SIGTERM instead of living on. The signal is
                // tied to the spawning *thread*: keep the Engine on the thread that made it.
                set_pdeathsig(Signal::SIGTERM).map_err(std::io::Error::from)
            });
        }
        // Orphans of the daemon (its containerd after a SIGKILL) come to
        // this process rather than to init, so `kill` can reap them: an
        // init that reaps late leaves a zombie containerd that the next
        // dockerd mistakes for a live one.
        set_child_subreaper(true)
            .map_err(|e| Error::Config(format!("PR_SET_CHILD_SUBREAPER: {e}")))?;
        let t0 = Instant::now();
        let child = c.spawn().map_err(|source| Error::Spawn {
            cmd: cmd::display(&c),
            source,
        })?;
        self.daemon = Some(child);
        match self.wait_ready(t0) {
            Ok(()) => {
                self.last_start = t0.elapsed();
                Ok(())
            }
            Err(e) => {
                if let Err(stop) = self.stop() {
                    eprintln!("xhost-tests: stopping the failed dockerd: {stop}");
                }
                Err(e)
            }
        }
    }

    /// SIGKILLs the daemon, as a crash would, and reaps it. Its containerd
    /// goes with it (dockerd starts it with a parent-death signal) and is
    /// reaped here too; the containers' shims and processes stay. Idempotent.
    pub fn kill(&mut self) -> Result<()> {
        let Some(mut child) = self.daemon.take() else {
            return Ok(());
        };
        let pid = Pid::from_raw(
            i32::try_from(child.id()).map_err(|_| Error::Config("pid overflow".into()))?,
        );
        let containerd = self.containerd_pids();
        // The unreaped child keeps its pid reserved, so signalling by pid hits dockerd.
        let _ = kill(pid, Signal::SIGKILL);
        child.wait().map_err(io("waiting for dockerd"))?;
        // The orphaned containerd comes to this process (a child subreaper,
        // see `start`). Unreaped, it would stay a zombie, which the next
        // dockerd takes for a live containerd and waits on until it gives up.
        for p in containerd {
            reap_if_dying(p, Duration::from_millis(500));
        }
        Ok(())
    }

    /// Pids of the engine's containerd (not its shims).
    fn containerd_pids(&self) -> Vec<Pid> {
        processes_mentioning(&self.dir)
            .into_iter()
            .filter(|pid| {
                fs::read_to_string(format!("/proc/{pid}/comm"))
                    .is_ok_and(|c| c.trim() == "containerd")
            })
            .filter_map(|pid| i32::try_from(pid).ok().map(Pid::from_raw))
            .collect()
    }

    /// Replaces the daemon's config file (`D/daemon.json`, e.g.
    /// `{"live-restore": true}`), read at its next start.
    pub fn set_daemon_config(&self, json: &str) -> Result<()> {
        fs::write(self.dir.join("daemon.json"), json).map_err(io("writing daemon.json"))
    }

    /// Stops and starts the daemon.
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.start()
    }

    fn wait_ready(&mut self, t0: Instant) -> Result<()> {
        let socket = self.socket();
        loop {
            if ping(&socket) {
                return Ok(());
            }
            let status = match self.daemon.as_mut() {
                Some(child) => child.try_wait().map_err(io("waiting for dockerd"))?,
                None => None,
            };
            if let Some(status) = status {
                self.daemon = None;
                return Err(Error::Exited {
                    label: "dockerd".into(),
                    what: "answering /_ping".into(),
                    status: Some(status),
                    output: self.log(),
                });
            }
            if t0.elapsed() > READY_TIMEOUT {
                return Err(Error::Timeout {
                    what: format!("dockerd in {} to answer /_ping", self.netns),
                    after: READY_TIMEOUT,
                    output: self.log(),
                });
            }
            thread::sleep(POLL);
        }
    }

    /// Force-removes every container (and its anonymous volumes).
    pub fn remove_all_containers(&self) -> Result<()> {
        let ids = self.docker_ok(&["ps", "-aq"])?;
        let ids: Vec<&str> = ids.split_whitespace().collect();
        if ids.is_empty() {
            return Ok(());
        }
        let mut args = vec!["rm", "-f", "-v"];
        args.extend(ids);
        self.docker_ok(&args).map(drop)
    }

    fn teardown(&mut self) {
        if self.daemon.is_some()
            && let Err(e) = self.remove_all_containers()
        {
            eprintln!("xhost-tests: removing containers of {}: {e}", self.netns);
        }
        if let Err(e) = self.stop() {
            eprintln!("xhost-tests: stopping dockerd in {}: {e}", self.netns);
        }
        // containerd and shims are the daemon's children; after a clean stop none are left.
        for pid in processes_mentioning(&self.dir) {
            eprintln!(
                "xhost-tests: killing leftover pid {pid} of the engine in {}",
                self.netns
            );
            if let Ok(raw) = i32::try_from(pid) {
                let _ = kill(Pid::from_raw(raw), Signal::SIGKILL);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while !processes_mentioning(&self.dir).is_empty() && Instant::now() < deadline {
            thread::sleep(POLL);
        }
        // Deepest first; detach so a busy mount cannot keep the directory.
        for m in mounts_under(&self.dir).iter().rev() {
            if let Err(e) = umount2(m, MntFlags::MNT_DETACH) {
                eprintln!("xhost-tests: cannot unmount {}: {e}", m.display());
            }
        }
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            eprintln!("xhost-tests: cannot remove {}: {e}", self.dir.display());
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// A container's interface on one network, see [`Engine::container_endpoint`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerEndpoint {
    pub ip: Ipv4Addr,
    /// Lower-case `aa:bb:...`, as `docker inspect` and `xhost-user status` print it.
    pub mac: String,
    /// ifindex of the host-side veth in the engine's namespace.
    pub host_ifindex: u32,
    pub host_veth: String,
    /// The bridge the host-side veth is a port of (`docker0`, `br-<id12>`).
    pub bridge: String,
}

/// One entry of `docker events`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// `container`, `network`, ...
    pub typ: String,
    /// `start`, `die`, `create`, ...
    pub action: String,
    /// The actor: a container or network id.
    pub id: String,
    /// The actor's attributes (`name`, `container`, ...).
    pub attributes: BTreeMap<String, String>,
    /// When the engine logged the event (`timeNano`).
    pub time: SystemTime,
}

impl Event {
    /// Every event line of `docker events --format '{{json .}}'` output; other lines (a
    /// guard's own messages) are skipped.
    pub fn parse_all(text: &str) -> Vec<Self> {
        text.lines()
            .filter(|l| l.starts_with('{'))
            .filter_map(|l| Self::parse(l).ok())
            .collect()
    }

    /// One line of `docker events --format '{{json .}}'`.
    pub fn parse(line: &str) -> Result<Self> {
        let bad = || Error::Parse {
            what: "docker event",
            input: line.to_owned(),
        };
        let v: serde_json::Value = serde_json::from_str(line).map_err(|_| bad())?;
        let nanos = v["timeNano"].as_u64().ok_or_else(bad)?;
        let text = |x: &serde_json::Value| x.as_str().unwrap_or_default().to_owned();
        Ok(Self {
            typ: text(&v["Type"]),
            action: text(&v["Action"]),
            id: text(&v["Actor"]["ID"]),
            attributes: v["Actor"]["Attributes"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, x)| (k.clone(), text(x)))
                .collect(),
            time: UNIX_EPOCH + Duration::from_nanos(nanos),
        })
    }
}

/// Parses Docker's UTC timestamps (`State.StartedAt`, `State.FinishedAt`):
/// `2024-05-01T12:34:56.123456789Z`, fraction optional.
pub fn parse_docker_time(s: &str) -> Result<SystemTime> {
    let bad = || Error::Parse {
        what: "Docker timestamp",
        input: s.to_owned(),
    };
    let rest = s.trim().strip_suffix('Z').ok_or_else(bad)?;
    let (date, time) = rest.split_once('T').ok_or_else(bad)?;
    let num = |x: &str| x.parse::<i64>().map_err(|_| bad());
    let mut d = date.splitn(3, '-');
    let (y, m, day) = (
        num(d.next().ok_or_else(bad)?)?,
        num(d.next().ok_or_else(bad)?)?,
        num(d.next().ok_or_else(bad)?)?,
    );
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut t = hms.splitn(3, ':');
    let (hh, mm, ss) = (
        num(t.next().ok_or_else(bad)?)?,
        num(t.next().ok_or_else(bad)?)?,
        num(t.next().ok_or_else(bad)?)?,
    );
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || frac.len() > 9 {
        return Err(bad());
    }
    // Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
    let (y, m) = if m <= 2 { (y - 1, m + 9) } else { (y, m - 3) };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = u64::try_from(days * 86_400 + hh * 3600 + mm * 60 + ss).map_err(|_| bad())?;
    let nanos = if frac.is_empty() {
        0
    } else {
        let digits: u32 = frac.parse().map_err(|_| bad())?;
        digits * 10u32.pow(9 - u32::try_from(frac.len()).map_err(|_| bad())?)
    };
    Ok(UNIX_EPOCH + Duration::new(secs, nanos))
}

/// Sends `opts.bytes` over TCP from container `from_ctr` of engine `from` to
/// `to_ip:opts.port`, where a receiver runs in container `to_ctr` of engine `to`; both
/// ends are `xh-probe` from the test machine in the containers' network namespaces (see
/// [`Engine::in_container`]). The container counterpart of [`crate::tcp_transfer`].
pub fn tcp_transfer(
    from: (&Engine, &str),
    to: (&Engine, &str),
    to_ip: impl Into<IpAddr>,
    opts: &TransferOpts,
) -> Result<Transfer> {
    let to_ip = to_ip.into();
    // The receiver listens on the destination's family only, so it reports an IPv4
    // sender as such (not `::ffff:a.b.c.d`).
    let bind = match to_ip {
        IpAddr::V4(_) => "0.0.0.0",
        IpAddr::V6(_) => "::",
    };
    let bin = match &opts.probe {
        Some(p) => p.clone(),
        None => crate::probe::probe_bin()?,
    };
    let secs = opts.timeout.as_secs_f64().to_string();
    let port = opts.port.to_string();
    let recv = to.0.in_container(
        to.1,
        &[
            bin.as_os_str(),
            "tcp-recv".as_ref(),
            "--port".as_ref(),
            port.as_ref(),
            "--bind".as_ref(),
            bind.as_ref(),
            "--timeout".as_ref(),
            secs.as_ref(),
        ],
    )?;
    let mut receiver = Process::spawn(&format!("xh-probe tcp-recv in {}", to.1), recv)?;
    // Connecting before the listener exists would fail with a reset, not a timeout.
    receiver.wait_for_line(|l| l.starts_with("listening"), Duration::from_secs(5))?;
    let target = std::net::SocketAddr::from((to_ip, opts.port)).to_string();
    let bytes = opts.bytes.to_string();
    let sender = cmd::checked(&mut from.0.in_container(
        from.1,
        &[
            bin.as_os_str(),
            "tcp-send".as_ref(),
            "--to".as_ref(),
            target.as_ref(),
            "--bytes".as_ref(),
            bytes.as_ref(),
            "--timeout".as_ref(),
            secs.as_ref(),
        ],
    )?)?;
    let sent: SendReport = crate::probe::parse_report(&String::from_utf8_lossy(&sender.stdout))?;
    let line = receiver.wait_for_line(|l| l.starts_with('{'), opts.timeout)?;
    let received: RecvReport = crate::probe::parse_report(&line)?;
    receiver.wait_timeout(Duration::from_secs(2))?;
    Ok(Transfer { sent, received })
}

/// Removes engine directories (`/tmp/xhd-{pid}-{n}`) left by runs whose process is gone,
/// unmounting what is left under them. A directory some process still uses (a daemon of a
/// run killed without the death signal) is reported and kept: only its owner may stop it.
/// Returns the directories removed.
pub fn cleanup_stale() -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let Ok(entries) = fs::read_dir("/tmp") else {
        return removed;
    };
    let me = std::process::id();
    for dir in entries.flatten().map(|e| e.path()) {
        let Some(pid) = dir
            .to_str()
            .and_then(|d| d.strip_prefix(DIR_PREFIX))
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(pid, n)| n.parse::<u32>().ok().and(pid.parse::<u32>().ok()))
        else {
            continue;
        };
        if pid == me || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let users = processes_mentioning(&dir);
        if !users.is_empty() {
            eprintln!(
                "xhost-tests: {} still used by pids {users:?}; kept",
                dir.display()
            );
            continue;
        }
        for m in mounts_under(&dir).iter().rev() {
            let _ = umount2(m, MntFlags::MNT_DETACH);
        }
        match fs::remove_dir_all(&dir) {
            Ok(()) => removed.push(dir),
            Err(e) => eprintln!("xhost-tests: cannot remove {}: {e}", dir.display()),
        }
    }
    removed
}

/// Creates a fresh `/tmp/xhd-{pid}-{n}`.
fn make_dir() -> Result<PathBuf> {
    loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = PathBuf::from(format!("{DIR_PREFIX}{}-{n}", std::process::id()));
        match fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(source) => {
                return Err(Error::Io {
                    what: format!("creating {}", dir.display()),
                    source,
                });
            }
        }
    }
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io {
        what: what.into(),
        source,
    }
}

/// `GET /_ping` over the socket with a minimal HTTP/1.0 client: true on `200 ... OK`.
fn ping(socket: &Path) -> bool {
    let Ok(mut s) = UnixStream::connect(socket) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    resp.starts_with("HTTP/1.0 200") || resp.starts_with("HTTP/1.1 200")
}

/// SIGTERM, up to `grace` to exit, then SIGKILL; reaps the child.
fn stop_child(child: &mut Child, grace: Duration) -> Result<ExitStatus> {
    if let Some(status) = child.try_wait().map_err(io("waiting for dockerd"))? {
        return Ok(status);
    }
    let pid =
        Pid::from_raw(i32::try_from(child.id()).map_err(|_| Error::Config("pid overflow".into()))?);
    // The unreaped child keeps its pid reserved, so signalling by pid hits dockerd.
    let _ = kill(pid, Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().map_err(io("waiting for dockerd"))? {
            return Ok(status);
        }
        thread::sleep(POLL);
    }
    eprintln!("xhost-tests: dockerd (pid {pid}) ignored SIGTERM for {grace:?}; sending SIGKILL");
    let _ = kill(pid, Signal::SIGKILL);
    child.wait().map_err(io("waiting for dockerd"))
}

/// Populates `rootfs` for `docker import`: busybox, its applet links, passwd/group, /tmp.
fn build_rootfs(busybox: &Path, rootfs: &Path) -> Result<()> {
    for d in ["bin", "etc", "tmp", "proc", "sys", "dev", "root"] {
        fs::create_dir_all(rootfs.join(d)).map_err(io("creating the rootfs"))?;
    }
    let bin = rootfs.join("bin");
    fs::copy(busybox, bin.join("busybox")).map_err(io("copying busybox"))?;
    let out = cmd::checked(Command::new(busybox).arg("--list"))?;
    for applet in String::from_utf8_lossy(&out.stdout).split_whitespace() {
        if applet != "busybox" && !applet.contains('/') {
            std::os::unix::fs::symlink("busybox", bin.join(applet))
                .map_err(io("linking an applet"))?;
        }
    }
    fs::write(rootfs.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")
        .map_err(io("writing passwd"))?;
    fs::write(rootfs.join("etc/group"), "root:x:0:\n").map_err(io("writing group"))?;
    fs::set_permissions(rootfs.join("tmp"), fs::Permissions::from_mode(0o1777))
        .map_err(io("chmod /tmp"))?;
    Ok(())
}

/// Mount points at or below `dir` in this mount namespace, in mount order.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    info.lines()
        // Field 5 is the mount point, with spaces etc. octal-escaped.
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(unescape_mountinfo(m)))
        .filter(|m| m.starts_with(dir))
        .collect()
}

fn unescape_mountinfo(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Waits up to `within` for `pid` to exit and reaps it when it is this
/// process's child; a process that stays alive that long is left running.
fn reap_if_dying(pid: Pid, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => {}
            // Reaped, or not (or no longer) a child of this process.
            Ok(_) | Err(_) => return,
        }
        if Instant::now() >= deadline {
            return;
        }
        thread::sleep(POLL);
    }
}

/// Pids of processes whose command line mentions `dir` (the engine's dockerd, containerd
/// and shims all carry it), excluding this process.
pub fn processes_mentioning(dir: &Path) -> Vec<u32> {
    let needle = dir.as_os_str().as_encoded_bytes();
    let me = std::process::id();
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            let mut buf = Vec::new();
            File::open(format!("/proc/{pid}/cmdline"))
                .and_then(|mut f| f.read_to_end(&mut buf))
                .is_ok()
                && buf.windows(needle.len()).any(|w| w == needle)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_mountinfo_paths() {
        assert_eq!(unescape_mountinfo(r"/tmp/a\040b"), "/tmp/a b");
        assert_eq!(unescape_mountinfo("/tmp/plain"), "/tmp/plain");
        assert_eq!(unescape_mountinfo(r"/x\\"), r"/x\\");
    }

    #[test]
    fn parses_docker_times() {
        let t = parse_docker_time("2026-11-22T00:29:17.919080617Z").expect("parse");
        let d = t.duration_since(UNIX_EPOCH).expect("after epoch");
        // date -u -d 2026-11-22T00:29:17Z +%s
        assert_eq!(d.as_secs(), 1_795_307_357);
        assert_eq!(d.subsec_nanos(), 919_080_617);
        let t = parse_docker_time("2000-02-29T23:59:59.5Z").expect("parse");
        assert_eq!(
            t.duration_since(UNIX_EPOCH).expect("epoch").as_millis(),
            951_868_799_500
        );
        assert_eq!(
            parse_docker_time("1970-01-01T00:00:00Z").expect("parse"),
            UNIX_EPOCH
        );
        assert!(parse_docker_time("2026-13-01T00:00:00Z").is_err());
        assert!(parse_docker_time("yesterday").is_err());
    }

    #[test]
    fn parses_events() {
        let e = Event::parse(
            r#"{"status":"start","id":"abc","from":"img","Type":"container","Action":"start","Actor":{"ID":"abc","Attributes":{"name":"c1"}},"scope":"local","time":1700000000,"timeNano":1700000000123456789}"#,
        )
        .expect("event");
        assert_eq!(
            (e.typ.as_str(), e.action.as_str(), e.id.as_str()),
            ("container", "start", "abc")
        );
        assert_eq!(e.attributes["name"], "c1");
        assert_eq!(
            e.time.duration_since(UNIX_EPOCH).expect("epoch").as_nanos(),
            1_700_000_000_123_456_789
        );
    }

    #[test]
    fn socket_path_fits_sun_path() {
        let dir = PathBuf::from(format!("{DIR_PREFIX}{}-{}", u32::MAX, u32::MAX));
        assert!(dir.join("docker.sock").as_os_str().len() < 100);
    }
}
