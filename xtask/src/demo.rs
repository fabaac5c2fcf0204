//! `cargo xtask demo`: two simulated Docker hosts in network namespaces, first isolated,
//! then connected by xhost-user running on each; shows pings, TCP transfers (with the
//! source address the receiver saw) and each agent's status, then tears everything down,
//! also on Ctrl-C.

use std::{
    ffi::OsString,
    fs,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Args;
use xhost_tests::{
    Container, Host, Process, Topology, TopologyOpts, TransferOpts, cleanup_stale, pid_alive, ping,
    tcp_transfer,
};

use crate::{build, interrupt::interrupted, workspace};

#[derive(Args, Debug)]
pub struct Options {
    /// Skip scripts/setup.sh.
    #[arg(long)]
    pub no_setup: bool,
    /// Use this xhost-user binary instead of building one (needs --probe too).
    #[arg(long, requires = "probe")]
    pub xhost_user: Option<PathBuf>,
    /// Use this xh-probe binary instead of building one (needs --xhost-user too).
    #[arg(long, requires = "xhost_user")]
    pub probe: Option<PathBuf>,
    /// Extra argument for each `xhost-user load` (repeatable), e.g. `--agent-arg=--no-docker`.
    #[arg(long, allow_hyphen_values = true)]
    pub agent_arg: Vec<String>,
    /// Bytes sent by each TCP transfer.
    #[arg(long, default_value_t = 4 << 20)]
    pub bytes: u64,
    /// Seconds to wait for each xhost-user to print `ready`.
    #[arg(long, default_value_t = 30)]
    pub ready_timeout: u64,
}

const PING_COUNT: u32 = 3;

pub fn run(opts: &Options) -> anyhow::Result<()> {
    let (xhost_user, probe) = match (&opts.xhost_user, &opts.probe) {
        (Some(x), Some(p)) => (x.clone(), p.clone()),
        _ => {
            let built = build::with_probe(&build::Options {
                release: true,
                no_setup: opts.no_setup,
            })?;
            (built.xhost_user, built.probe)
        }
    };
    if !workspace::is_root() {
        // Built as the user; only the demo itself needs root.
        return reexec_as_root(&xhost_user, &probe);
    }
    for (what, p) in [("xhost-user", &xhost_user), ("xh-probe", &probe)] {
        if !p.is_file() {
            bail!("{what} binary {} not found", p.display());
        }
    }
    crate::interrupt::install()?;
    for name in cleanup_stale().context("removing stale namespaces")? {
        println!("removed stale namespace {name}");
    }
    remove_stale_demo_dirs();
    let result = demo(opts, &xhost_user, &probe);
    if interrupted() {
        // The guards in demo() have run by now; 130 is the shell's code for death by SIGINT.
        println!("interrupted: everything has been torn down");
        std::process::exit(130);
    }
    result
}

/// The demo proper. Guards declared here drop in reverse order on every exit path (error,
/// Ctrl-C, panic): agents first, then the namespaces, then the bpffs mount.
fn demo(opts: &Options, xhost_user: &Path, probe: &Path) -> anyhow::Result<()> {
    let _bpffs = BpffsMount::ensure()?;
    heading("Topology");
    let topo = Topology::two_hosts(TopologyOpts::default()).context("building the topology")?;
    print!("{}", topo.ascii());
    let (ca, cb) = (topo.ctr_a(), topo.ctr_b());
    let mut failures = Vec::new();

    heading("Before xhost: no route between the container subnets");
    let p = ping(ca.ns(), cb.ip(), 1)?;
    let isolated = !p.any_received();
    println!(
        "    {} -> {}: {}/{} replies (expected none)  [{}]",
        ca.role(),
        cb.ip(),
        p.received,
        p.transmitted,
        verdict(isolated)
    );
    if !isolated {
        failures.push("containers could talk before xhost was loaded".to_owned());
    }
    check_interrupted()?;

    let mut agents = Vec::new();
    for (host, peer) in [
        (topo.host_a(), topo.host_b()),
        (topo.host_b(), topo.host_a()),
    ] {
        heading(&format!("Starting xhost-user on {}", host.role()));
        let mut agent = Agent::new(xhost_user, host);
        agent.start(peer, &opts.agent_arg)?;
        // Pushed before waiting, so a failed start is still stopped and cleaned up.
        agents.push(agent);
        if let Some(agent) = agents.last_mut() {
            agent.wait_ready(Duration::from_secs(opts.ready_timeout))?;
        }
    }
    check_interrupted()?;

    heading("Ping across hosts");
    for (from, to) in [(ca, cb), (cb, ca)] {
        let p = ping(from.ns(), to.ip(), PING_COUNT)?;
        let ok = p.all_received();
        println!(
            "    {} {} -> {} {}: {}/{} replies{}  [{}]",
            from.role(),
            from.ip(),
            to.role(),
            to.ip(),
            p.received,
            p.transmitted,
            p.rtt_avg_ms
                .map(|ms| format!(", avg {ms:.3} ms"))
                .unwrap_or_default(),
            verdict(ok)
        );
        if !ok {
            failures.push(format!("ping {} -> {}:\n{}", from.ip(), to.ip(), p.output));
        }
        check_interrupted()?;
    }

    heading(&format!("TCP transfers ({} bytes each way)", opts.bytes));
    for (from, to) in [(ca, cb), (cb, ca)] {
        if let Err(e) = transfer(from, to, opts.bytes, probe) {
            println!("    {} -> {}: {e:#}  [FAIL]", from.role(), to.role());
            failures.push(format!("transfer {} -> {}: {e:#}", from.ip(), to.ip()));
        }
        check_interrupted()?;
    }

    for agent in &agents {
        heading(&format!("xhost-user status on {}", agent.role));
        match agent.status() {
            Ok(out) => print_indented(&out),
            Err(e) => {
                println!("    {e:#}  [FAIL]");
                failures.push(format!("status on {}: {e:#}", agent.role));
            }
        }
    }

    heading("Teardown");
    for agent in &mut agents {
        agent.stop();
    }
    drop(agents);
    let names = topo.netns_names();
    drop(topo);
    println!("    deleted namespaces {}", names.join(", "));

    if failures.is_empty() {
        println!("\ndemo OK: containers on two hosts reach each other by container IP");
        Ok(())
    } else {
        bail!("demo failed:\n- {}", failures.join("\n- "))
    }
}

/// One TCP transfer, printed with the source address the receiver saw.
fn transfer(from: &Container, to: &Container, bytes: u64, probe: &Path) -> anyhow::Result<()> {
    let opts = TransferOpts {
        bytes,
        probe: Some(probe.to_path_buf()),
        ..TransferOpts::default()
    };
    let t = tcp_transfer(from.ns(), to.ns(), to.ip(), &opts)?;
    let preserved = t.source_ip() == from.ip();
    println!(
        "    {} -> {} {}:{}: {} bytes, checksum {}, receiver saw source {} ({}), {:.0} Mbit/s  [{}]",
        from.role(),
        to.role(),
        to.ip(),
        opts.port,
        t.received.bytes,
        if t.intact() { "match" } else { "MISMATCH" },
        t.source_ip(),
        if preserved {
            "container IP preserved"
        } else {
            "NATed"
        },
        t.mbit_per_s(),
        verdict(t.intact() && preserved)
    );
    if !t.intact() {
        bail!("data corrupted: {t:?}");
    }
    if !preserved {
        bail!("source seen as {} instead of {}", t.source_ip(), from.ip());
    }
    Ok(())
}

/// xhost-user running in one host namespace, with its own pin and run directories.
struct Agent {
    role: String,
    bin: PathBuf,
    netns: PathBuf,
    iface: String,
    bridge: String,
    pin_dir: PathBuf,
    run_dir: PathBuf,
    process: Option<Process>,
}

impl Agent {
    fn new(bin: &Path, host: &Host) -> Self {
        let letter = host.role().trim_start_matches("host-");
        let tag = format!("xhost-demo-{}-{letter}", std::process::id());
        Self {
            role: host.role().to_owned(),
            bin: bin.to_path_buf(),
            netns: host.ns().path(),
            iface: host.underlay_iface().to_owned(),
            bridge: host.bridge().to_owned(),
            pin_dir: Path::new("/sys/fs/bpf").join(&tag),
            run_dir: Path::new("/run").join(&tag),
            process: None,
        }
    }

    /// `nsenter --net=HOST -- xhost-user --pin-dir .. --run-dir .. args`. nsenter, not `ip
    /// netns exec`, because the latter remounts /sys and would hide /sys/fs/bpf.
    fn command(&self, args: &[OsString]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.netns.display()))
            .arg("--")
            .arg(&self.bin)
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .arg("--run-dir")
            .arg(&self.run_dir)
            .args(args);
        cmd
    }

    fn start(&mut self, peer: &Host, extra: &[String]) -> anyhow::Result<()> {
        let mut args: Vec<OsString> = [
            "load",
            "--iface",
            &self.iface,
            "--bridge",
            &self.bridge,
            // The demo's hosts are namespaces without a Docker engine of
            // their own: the agent must not follow the machine's engine.
            "--no-docker",
            "--peer",
            &format!("{}={}", peer.underlay_ip(), peer.subnet()),
        ]
        .iter()
        .map(OsString::from)
        .collect();
        args.extend(extra.iter().map(OsString::from));
        let mut cmd = self.command(&args);
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                // If xtask dies without running its guards (SIGKILL), the agent still gets
                // SIGTERM and detaches instead of running on in an orphaned namespace.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        println!("    {}", workspace::display(&cmd));
        let mut process = Process::spawn_echoing(&format!("{} xhost-user", self.role), cmd)?;
        // Detaching programs and unpinning can take a moment; don't SIGKILL too early.
        process.set_grace(Duration::from_secs(10));
        self.process = Some(process);
        Ok(())
    }

    /// Waits for `ready` on stdout, in short slices so Ctrl-C is noticed.
    fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let process = self.process.as_mut().context("agent not started")?;
        let deadline = Instant::now() + timeout;
        loop {
            check_interrupted()?;
            match process.wait_for_line(|l| l.trim() == "ready", Duration::from_millis(200)) {
                Ok(_) => {
                    println!("    {}: ready", self.role);
                    return Ok(());
                }
                Err(xhost_tests::Error::Timeout { .. }) if Instant::now() < deadline => {}
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("xhost-user on {} not ready", self.role));
                }
            }
        }
    }

    fn status(&self) -> anyhow::Result<String> {
        run_bounded(
            &format!("{} xhost-user status", self.role),
            self.command(&["status".into()]),
            Duration::from_secs(15),
        )
    }

    /// SIGTERM and wait; then make sure nothing of this agent is left (an `unload` if its
    /// pins survived, then the directories).
    fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            match process.stop() {
                Ok(status) => println!("    stopped xhost-user on {} ({status})", self.role),
                Err(e) => eprintln!("    cannot stop xhost-user on {}: {e}", self.role),
            }
        }
        if self.pin_dir.exists() {
            let unload = run_bounded(
                &format!("{} xhost-user unload", self.role),
                self.command(&["unload".into()]),
                Duration::from_secs(15),
            );
            if let Err(e) = unload {
                eprintln!("    unload on {} failed: {e:#}", self.role);
            }
        }
        for dir in [&self.pin_dir, &self.run_dir] {
            if dir.exists()
                && let Err(e) = fs::remove_dir_all(dir)
            {
                eprintln!("    cannot remove {}: {e}", dir.display());
            }
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs `cmd` to completion within `timeout` (killing it after), failing unless it succeeds.
fn run_bounded(label: &str, cmd: Command, timeout: Duration) -> anyhow::Result<String> {
    let mut p = Process::spawn(label, cmd)?;
    match p.wait_timeout(timeout)? {
        Some(s) if s.success() => Ok(p.output()),
        Some(s) => bail!("{label} failed ({s}):\n{}", p.output()),
        None => bail!("{label} still running after {timeout:?}:\n{}", p.output()),
    }
}

/// bpffs at /sys/fs/bpf, mounted for the demo if the machine has none (systemd would mount
/// it at boot); unmounted again afterwards only if we mounted it and it is empty, so pins
/// of anything else on the machine are never touched.
struct BpffsMount {
    mounted_by_us: bool,
}

const BPFFS: &str = "/sys/fs/bpf";

impl BpffsMount {
    fn ensure() -> anyhow::Result<Self> {
        let mounts = fs::read_to_string("/proc/self/mounts").context("reading mounts")?;
        let present = mounts.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.get(1) == Some(&BPFFS) && f.get(2) == Some(&"bpf")
        });
        if present {
            return Ok(Self {
                mounted_by_us: false,
            });
        }
        println!("mounting bpffs at {BPFFS}");
        workspace::run_status(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))?;
        Ok(Self {
            mounted_by_us: true,
        })
    }
}

impl Drop for BpffsMount {
    fn drop(&mut self) {
        // bpf_preload puts maps.debug/progs.debug in every fresh bpffs; they are not pins.
        let empty = fs::read_dir(BPFFS).is_ok_and(|d| {
            d.flatten()
                .all(|e| matches!(e.file_name().to_str(), Some("maps.debug" | "progs.debug")))
        });
        if self.mounted_by_us
            && empty
            && let Err(e) = workspace::run_status(Command::new("umount").arg(BPFFS))
        {
            eprintln!("cannot unmount {BPFFS}: {e:#}");
        }
    }
}

/// Removes pin/run directories of earlier demos whose process is gone.
fn remove_stale_demo_dirs() {
    for base in [BPFFS, "/run"] {
        let Ok(entries) = fs::read_dir(base) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = demo_dir_pid(&name.to_string_lossy()) else {
                continue;
            };
            if pid != std::process::id() && !pid_alive(pid) {
                let path = entry.path();
                match fs::remove_dir_all(&path) {
                    Ok(()) => println!("removed stale {}", path.display()),
                    Err(e) => eprintln!("cannot remove stale {}: {e}", path.display()),
                }
            }
        }
    }
}

/// The pid in `xhost-demo-{pid}-{a|b}`.
fn demo_dir_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("xhost-demo-")?;
    let (pid, host) = rest.rsplit_once('-')?;
    matches!(host, "a" | "b").then_some(())?;
    pid.parse().ok()
}

fn check_interrupted() -> anyhow::Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

/// Re-runs this demo under `sudo -E` with the binaries just built.
fn reexec_as_root(xhost_user: &Path, probe: &Path) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("locating xtask")?;
    let mut cmd = Command::new(exe);
    cmd.args(std::env::args_os().skip(1))
        .arg("--xhost-user")
        .arg(xhost_user)
        .arg("--probe")
        .arg(probe);
    let mut cmd = workspace::as_root(cmd);
    let err = cmd.exec();
    Err(err).with_context(|| format!("cannot exec `{}`", workspace::display(&cmd)))
}

fn heading(title: &str) {
    println!("\n==> {title}");
}

fn verdict(ok: bool) -> &'static str {
    if ok { "ok" } else { "FAIL" }
}

fn print_indented(text: &str) {
    for line in text.lines() {
        println!("    {line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_demo_dir_names() {
        assert_eq!(demo_dir_pid("xhost-demo-123-a"), Some(123));
        assert_eq!(demo_dir_pid("xhost-demo-123-b"), Some(123));
        assert_eq!(demo_dir_pid("xhost-demo-123-c"), None);
        assert_eq!(demo_dir_pid("xhost-demo-x-a"), None);
        assert_eq!(demo_dir_pid("xhost"), None);
    }
}
