//! A real Docker engine per simulated host: `dockerd` started inside a host network
//! namespace with its own data root, exec root and socket, and torn down on drop
//! (containers, daemon, leftover processes, mounts, directory).
//!
//! Recipe and engine facts: `/work/shared/DOCKER.md`. Nothing here pulls images or
//! resolves names: the only image is [`BUSYBOX_IMAGE`], imported from the local busybox.

use std::{
    ffi::OsStr,
    fs::{self, File, OpenOptions},
    io::{Read as _, Write as _},
    os::unix::{fs::PermissionsExt as _, net::UnixStream, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use nix::{
    mount::{MntFlags, umount2},
    sys::{
        prctl::set_pdeathsig,
        signal::{Signal, kill},
    },
    unistd::Pid,
};

use crate::{Error, NETNS_DIR, Result, cmd};

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
        let mut engine = Self {
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
        // On error `engine` drops here and cleans up what was started.
        if let Err(first) = engine.start() {
            eprintln!("xhost-tests: dockerd with overlay2 failed, retrying with vfs: {first}");
            engine.storage_driver = "vfs";
            engine.start()?;
        }
        Ok(engine)
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

/// Populates `rootfs` as in DOCKER.md: busybox, its applet links, passwd/group, /tmp.
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
    fn socket_path_fits_sun_path() {
        let dir = PathBuf::from(format!("{DIR_PREFIX}{}-{}", u32::MAX, u32::MAX));
        assert!(dir.join("docker.sock").as_os_str().len() < 100);
    }
}
