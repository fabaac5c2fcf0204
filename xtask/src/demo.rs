//! `cargo xtask demo`: two simulated Docker hosts in network namespaces, first isolated,
//! then connected by xhost-user running on each; shows pings, TCP transfers (with the
//! source address the receiver saw) and each agent's status, then tears everything down,
//! also on Ctrl-C.

use std::{
    fs,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, bail};
use clap::Args;
use xhost_tests::{
    Container, Topology, TopologyOpts, TransferOpts, cleanup_stale, ping, tcp_transfer,
    xhost::{Agent, AgentDirs, StartOpts, load_args, remove_stale_instances},
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
/// Prefix of the demo agents' roles (`demo-host-a`), which name their pin
/// and run directories: what a killed demo left is found by it.
const DEMO_ROLE: &str = "demo-";

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
    for path in remove_stale_instances(DEMO_ROLE) {
        println!("removed stale {}", path.display());
    }
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

    // (host role, agent)
    let mut agents: Vec<(&str, Agent)> = Vec::new();
    let extra: Vec<&str> = opts.agent_arg.iter().map(String::as_str).collect();
    for (host, peer) in [
        (topo.host_a(), topo.host_b()),
        (topo.host_b(), topo.host_a()),
    ] {
        heading(&format!("Starting xhost-user on {}", host.role()));
        // The demo's hosts are namespaces without a Docker engine of their
        // own: the agent must not follow the machine's engine (`--no-docker`).
        let args = load_args(host, peer, &extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let role = format!("{DEMO_ROLE}{}", host.role());
        let start = StartOpts {
            bin: Some(xhost_user),
            die_with_parent: true,
            ..StartOpts::default()
        };
        let agent = Agent::spawn_opts(host.ns(), &role, AgentDirs::unique(&role), &args, &start)?;
        println!("    {}", agent.command_line());
        // Pushed before waiting, so a failed start is still stopped and cleaned up.
        agents.push((host.role(), agent));
        if let Some((role, agent)) = agents.last_mut() {
            agent
                .wait_ready_within(Duration::from_secs(opts.ready_timeout), interrupted)
                .with_context(|| format!("xhost-user on {role} not ready"))?;
            println!("    {role}: ready");
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

    for (role, agent) in &agents {
        heading(&format!("xhost-user status on {role}"));
        match agent.run(&["status"]) {
            Ok(out) => print_indented(&out),
            Err(e) => {
                println!("    {e:#}  [FAIL]");
                failures.push(format!("status on {role}: {e:#}"));
            }
        }
    }

    heading("Teardown");
    for (role, agent) in agents.drain(..) {
        // Its guard unloads and removes whatever the agent left.
        match agent.stop() {
            Ok(status) => println!("    stopped xhost-user on {role} ({status})"),
            Err(e) => eprintln!("    cannot stop xhost-user on {role}: {e}"),
        }
    }
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
