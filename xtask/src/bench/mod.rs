//! `cargo xtask bench`: container A -> container B across two simulated hosts, measured
//! the same way over every path (bare veth, iptables + routes, kernel VXLAN, xhost):
//! single-stream TCP throughput, 64-byte UDP packets per second, UDP ping-pong latency,
//! CPU per packet, and xhost with 1, 1 000 and 100 000 routes. Every scenario's bed is up
//! for the whole run; each repetition runs each test on every scenario in turn, and every
//! comparison is a ratio within one repetition.
//! Beside the packet tests, the datapath programs' own cost per route count is measured
//! with `BPF_PROG_TEST_RUN` (`xhost-user/examples/prog_cost.rs`), and cluster mode's
//! convergence and scale against a real etcd (`tests/examples/cluster_bench.rs`, scenarios
//! `cluster-docker` and `cluster-scale`, run once each after the packet tests).
//! Writes a table to stdout and `results.json`, `summary.json` (the same without the raw
//! samples), `table.md`, `ratios.svg` to `--out`. `--pool` checks the targets on several
//! earlier runs' repetitions together (`pool.rs`).

mod pool;
mod report;

use std::{
    collections::BTreeMap,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Args;
use serde::{Deserialize, Serialize};
use xhost_tests::{
    scenarios::{
        self, Bed, CpuTicks, Cpus, Family, LatencyMode, LatencySample, PathKind, TcpSample,
        USER_HZ, UdpSample, XhostOpts,
    },
    xhost::XHOST_BIN_ENV,
};

use crate::{build, interrupt::interrupted, workspace};

/// Routing protocol number xhost-user marks its kernel routes with (`XHOST_RTPROT`).
const XHOST_RTPROT: u8 = 177;

#[derive(Args, Debug, Clone)]
pub struct Options {
    /// One repetition with short tests (2 s each, no pinned latency): a smoke run in
    /// well under two minutes.
    #[arg(long)]
    pub quick: bool,
    /// Repetitions; every repetition runs every scenario (default 5, 1 with --quick).
    #[arg(long)]
    pub reps: Option<u32>,
    /// Seconds per test (default 4, 2 with --quick).
    #[arg(long)]
    pub duration: Option<u32>,
    /// Only these scenarios (comma-separated; default: all marked default in --list).
    #[arg(long, value_delimiter = ',')]
    pub scenarios: Vec<String>,
    /// cluster-docker: Docker networks created one by one; cluster-scale: claims timed
    /// one by one (default 100, 20 with --quick; at most 256).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub creations: Option<u32>,
    /// Longest wait, in seconds, for the machine to go quiet (< 15 % busy) before each
    /// scenario (default 3, 1 with --quick); busy time that is not ours during a test is
    /// measured anyway and marks that test disturbed.
    #[arg(long)]
    pub max_wait: Option<u64>,
    /// Output directory (default: <target dir>/bench).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// List the scenarios and exit.
    #[arg(long)]
    pub list: bool,
    /// Skip scripts/setup.sh.
    #[arg(long)]
    pub no_setup: bool,
    /// Use this xhost-user binary instead of building one (the per-program cost is still
    /// measured on this tree's eBPF object).
    #[arg(long)]
    pub xhost_user: Option<PathBuf>,
    /// Also run this xhost-user binary (another build of the datapath) as scenario
    /// `xhost-baseline` with xhost's settings beside xhost, and as `xhost-vxlan-baseline`
    /// beside xhost-vxlan (whichever of the two are selected): xhost / xhost-baseline is
    /// then a variant's ratio measured side by side in one run.
    #[arg(long)]
    pub baseline: Option<PathBuf>,
    /// Run nothing: check the targets on the repetitions of these earlier runs pooled
    /// (their results.json or summary.json files, comma-separated; runs of one machine,
    /// each once),
    /// with every run's own median beside the pooled one.
    #[arg(
        long,
        value_delimiter = ',',
        conflicts_with_all = ["quick", "reps", "duration", "scenarios", "creations", "max_wait", "out", "list", "no_setup", "xhost_user", "baseline"]
    )]
    pub pool: Vec<PathBuf>,
}

/// One way of getting from container A to container B.
#[derive(Clone, Debug)]
pub struct Scenario {
    pub name: &'static str,
    pub kind: PathKind,
    /// The family of container A -> B traffic.
    pub family: Family,
    /// Whether TCP throughput is measured (the scale variants only need pps and latency).
    pub tcp: bool,
    /// Run when no --scenarios filter is given.
    pub default: bool,
    pub about: &'static str,
}

pub const WIRE: &str = "wire";
pub const IPTABLES: &str = "iptables-routes";
pub const VXLAN: &str = "kernel-vxlan";
pub const XHOST: &str = "xhost";
pub const XHOST_XDP_OFF: &str = "xhost-xdp-off";
pub const XHOST_XDP_NATIVE: &str = "xhost-xdp-native";
pub const XHOST_1K: &str = "xhost-1k";
pub const XHOST_100K: &str = "xhost-100k";
pub const XHOST_BASELINE: &str = "xhost-baseline";
pub const XHOST_VXLAN: &str = "xhost-vxlan";
pub const XHOST_VXLAN_BASELINE: &str = "xhost-vxlan-baseline";
pub const XHOST_KERNEL: &str = "xhost-kernel";
pub const WIRE_V6: &str = "wire-v6";
pub const IP6_ROUTES: &str = "ip6-routes";
pub const XHOST_V6: &str = "xhost-v6";

/// The `wire` of scenario `name`'s family, its packet-path limit.
pub fn wire_for(name: &str) -> &'static str {
    if [WIRE_V6, IP6_ROUTES, XHOST_V6].contains(&name) {
        WIRE_V6
    } else {
        WIRE
    }
}

pub const CLUSTER_DOCKER: &str = "cluster-docker";
pub const CLUSTER_SCALE: &str = "cluster-scale";

/// Cluster mode's scenarios: no packet tests, one run each of
/// `tests/examples/cluster_bench.rs` after the packet scenarios: (name, about).
pub const CLUSTER_SCENARIOS: [(&str, &str); 2] = [
    (
        CLUSTER_DOCKER,
        "cluster mode: Docker network created on host-b (real dockerd, etcd) -> in host-a's ROUTES",
    ),
    (
        CLUSTER_SCALE,
        "cluster mode: 1 000 simulated hosts x 4 subnets in etcd -> one agent's ROUTES, RSS, churn",
    ),
];

/// The scenarios `--baseline` adds, each beside the scenario whose settings it runs
/// with: (baseline, counterpart).
const BASELINES: [(&str, &str); 2] = [(XHOST_BASELINE, XHOST), (XHOST_VXLAN_BASELINE, XHOST_VXLAN)];

/// The scenario whose settings baseline scenario `name` runs with; `None` for any
/// scenario that is not a baseline.
fn counterpart(name: &str) -> Option<&'static str> {
    BASELINES
        .iter()
        .find(|(b, _)| *b == name)
        .map(|(_, of)| *of)
}

pub fn all_scenarios() -> Vec<Scenario> {
    let xhost = |xdp_mode: Option<&str>, routes| {
        PathKind::Xhost(XhostOpts {
            xdp_mode: xdp_mode.map(str::to_owned),
            routes,
            ..XhostOpts::default()
        })
    };
    let s = |name, kind, tcp, default, about| Scenario {
        name,
        kind,
        family: Family::Ipv4,
        tcp,
        default,
        about,
    };
    vec![
        s(
            WIRE,
            PathKind::Wire,
            true,
            true,
            "the two container netns joined by one veth (the machine's limit)",
        ),
        s(
            IPTABLES,
            PathKind::IptablesRoutes,
            true,
            true,
            "Docker-like hosts + static routes, NAT exemption, DOCKER-USER accepts; conntrack on",
        ),
        s(
            VXLAN,
            PathKind::KernelVxlan,
            true,
            true,
            "Docker-like hosts + vxlan0 (static FDB/neigh, onlink routes, MTU 1450), as flannel",
        ),
        s(
            XHOST,
            xhost(None, 1),
            true,
            true,
            "Docker-like hosts + xhost-user on each, default XDP mode (auto), 1 route",
        ),
        s(
            XHOST_VXLAN,
            PathKind::Xhost(XhostOpts {
                tunnel: true,
                ..XhostOpts::default()
            }),
            true,
            true,
            "as xhost, --tunnel vxlan (containers at MTU 1450, as in kernel-vxlan)",
        ),
        s(
            XHOST_KERNEL,
            PathKind::Xhost(XhostOpts {
                kernel: true,
                ..XhostOpts::default()
            }),
            true,
            false,
            "as xhost, --datapath kernel: the agent's routes and iptables chains (not run by default)",
        ),
        s(
            XHOST_XDP_NATIVE,
            xhost(Some("native"), 1),
            true,
            true,
            "as xhost, --xdp-mode native (auto leaves a veth underlay to TC)",
        ),
        s(
            XHOST_XDP_OFF,
            xhost(Some("off"), 1),
            true,
            false,
            "as xhost, --xdp-mode off (= auto on a veth underlay; not run by default)",
        ),
        s(
            XHOST_1K,
            xhost(None, 1_000),
            false,
            true,
            "as xhost, 1 000 routes in ROUTES (and in the kernel FIB)",
        ),
        s(
            XHOST_100K,
            xhost(None, 100_000),
            false,
            true,
            "as xhost, 100 000 routes in ROUTES (and in the kernel FIB)",
        ),
        // The IPv6 twins: the same beds, dual-stack, measured over the containers' IPv6
        // addresses.
        Scenario {
            family: Family::Ipv6,
            ..s(WIRE_V6, PathKind::Wire, true, true, "as wire, over IPv6")
        },
        Scenario {
            family: Family::Ipv6,
            ..s(
                IP6_ROUTES,
                PathKind::IptablesRoutes,
                true,
                true,
                "the by-hand recipe over IPv6: IPv6 underlay, static routes, ip6tables FORWARD accepts; conntrack on",
            )
        },
        Scenario {
            family: Family::Ipv6,
            ..s(
                XHOST_V6,
                xhost(None, 1),
                true,
                true,
                "as xhost, over IPv6 on dual-stack Docker networks (--peer HOST=V4,V6, IPv4 underlay)",
            )
        },
        s(
            XHOST_BASELINE,
            xhost(None, 1),
            true,
            false,
            "as xhost, with the xhost-user binary given by --baseline (only with it)",
        ),
        s(
            XHOST_VXLAN_BASELINE,
            PathKind::Xhost(XhostOpts {
                tunnel: true,
                ..XhostOpts::default()
            }),
            true,
            false,
            "as xhost-vxlan, with the xhost-user binary given by --baseline (only with it)",
        ),
    ]
}

/// What is measured, with its unit and direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    TcpGbps,
    /// Median of the TCP test's 0.5 s intervals, a second view: the rate the stream
    /// held, apart from the slumps that stall single-stream TCP on any path here.
    TcpSteadyGbps,
    UdpKpps,
    /// Latency, [`LatencyMode::BusyPoll`]: the method the targets use.
    LatMeanUs,
    LatP99Us,
    LatP50Us,
    /// Latency, [`LatencyMode::Pinned`]: blocking sockets on one CPU, a second view.
    PinnedMeanUs,
    PinnedP99Us,
    CpuNsPerPkt,
    SoftirqNsPerPkt,
    /// Function-call IPIs the receiver's CPU took over the UDP test, per 100 packets
    /// delivered: mostly the sender's softirq waking the receiver from a halted CPU, which
    /// the sending CPU pays for (see `scenarios::call_ipis`).
    #[serde(rename = "rx_wake_ipis_per_100_pkts")]
    RxWakeIpisPer100Pkts,
    /// Idle share of the receiver's CPU over the UDP test, %.
    RxIdlePct,
}

impl Metric {
    pub const ALL: [Metric; 12] = [
        Metric::TcpGbps,
        Metric::TcpSteadyGbps,
        Metric::UdpKpps,
        Metric::LatMeanUs,
        Metric::LatP99Us,
        Metric::LatP50Us,
        Metric::PinnedMeanUs,
        Metric::PinnedP99Us,
        Metric::CpuNsPerPkt,
        Metric::SoftirqNsPerPkt,
        Metric::RxWakeIpisPer100Pkts,
        Metric::RxIdlePct,
    ];

    /// The columns of the text tables (the JSON has all).
    pub const TABLE: [Metric; 8] = [
        Metric::TcpGbps,
        Metric::TcpSteadyGbps,
        Metric::UdpKpps,
        Metric::LatMeanUs,
        Metric::LatP99Us,
        Metric::PinnedMeanUs,
        Metric::SoftirqNsPerPkt,
        Metric::RxWakeIpisPer100Pkts,
    ];

    /// The metric's name in `results.json`.
    pub fn json_name(self) -> String {
        serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    }

    pub fn label(self) -> &'static str {
        match self {
            Metric::TcpGbps => "TCP Gbit/s",
            Metric::TcpSteadyGbps => "TCP steady Gbit/s",
            Metric::UdpKpps => "UDP64 kpps",
            Metric::LatMeanUs => "lat mean us",
            Metric::LatP99Us => "lat p99 us",
            Metric::LatP50Us => "lat p50 us",
            Metric::PinnedMeanUs => "pinned lat mean us",
            Metric::PinnedP99Us => "pinned lat p99 us",
            Metric::CpuNsPerPkt => "CPU ns/pkt",
            Metric::SoftirqNsPerPkt => "softirq ns/pkt",
            Metric::RxWakeIpisPer100Pkts => "rx wake IPIs/100 pkt",
            Metric::RxIdlePct => "rx CPU idle %",
        }
    }

    pub fn higher_is_better(self) -> bool {
        matches!(
            self,
            Metric::TcpGbps | Metric::TcpSteadyGbps | Metric::UdpKpps
        )
    }
}

/// One scenario in one repetition: raw tool results and the derived metric values.
#[derive(Debug, Default, Serialize)]
pub struct Run {
    pub rep: u32,
    pub scenario: String,
    /// Seconds to build the scenario (namespaces, rules, agents).
    pub setup_s: f64,
    /// Machine busy fraction just before measuring (other load on the VM shows here).
    pub busy_before: f64,
    /// `busy_before` stayed above [`LOADED`] for the whole wait: measured under load.
    pub loaded: bool,
    pub tcp: Option<TcpSample>,
    pub udp: Option<UdpSample>,
    /// `/proc/stat` ticks over the UDP test.
    pub udp_cpu_ticks: Option<CpuTicks>,
    /// The receiver's CPU over the UDP test: its `/proc/stat` ticks and the function-call
    /// IPIs it took.
    pub udp_receiver: Option<ReceiverCpu>,
    /// Per host (`host-a`, `host-b`), its IPv4 neighbour entries (`"<dev> <address>"`) and
    /// their state just before the UDP test. A forwarding host's entries are confirmed by
    /// no traffic of the test: one that starts STALE sends every packet through the slow
    /// neighbour output for the 5 s of DELAY, which cost `iptables-routes` about 4 % of
    /// its pps on a held bed; in the bench's runs it did not move the ratio.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub udp_neigh: BTreeMap<String, BTreeMap<String, String>>,
    /// [`LatencyMode::BusyPoll`].
    pub latency: Option<LatencySample>,
    /// [`LatencyMode::Pinned`].
    pub latency_pinned: Option<LatencySample>,
    pub agents: Vec<AgentReport>,
    /// Per host: the agent's XDP attachment and datapath counters after the tests.
    pub xhost_status: BTreeMap<String, serde_json::Value>,
    pub values: BTreeMap<Metric, f64>,
    /// Per test (`tcp`, `udp`, `latency_pinned`): CPUs' worth of busy time that was not the
    /// tools' own while it ran.
    pub foreign_cpus: BTreeMap<String, f64>,
    /// Metrics whose test ran with more than [`DISTURBED_CPUS`] of outside work; medians
    /// and ratios leave them out while undisturbed samples exist.
    pub disturbed: std::collections::BTreeSet<Metric>,
    pub errors: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct AgentReport {
    pub host: String,
    pub pid: u32,
    pub load_s: f64,
    /// VmRSS after the tests, bytes.
    pub rss_bytes: Option<u64>,
    /// VmHWM (peak RSS), bytes.
    pub hwm_bytes: Option<u64>,
    /// Kernel routes the agent installed (`proto 177`) in its host's namespace.
    pub kernel_routes: Option<usize>,
}

/// Settings after defaults.
#[derive(Debug, Serialize)]
pub struct Plan {
    pub reps: u32,
    /// cluster-docker's network creations, cluster-scale's timed claims.
    pub creations: u32,
    pub duration_s: u32,
    pub scenarios: Vec<&'static str>,
    pub quick: bool,
    /// Longest wait for the machine to go quiet before each scenario, seconds.
    pub max_wait_s: u64,
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    if !opts.pool.is_empty() {
        return pool::run(&opts.pool);
    }
    let mut scenarios = select(&opts.scenarios, opts.baseline.is_some())?;
    let cluster = select_cluster(&opts.scenarios);
    // Resolved before anything is built: a wrong path is named at once.
    let baseline = opts
        .baseline
        .as_ref()
        .map(|bin| {
            bin.canonicalize()
                .with_context(|| format!("baseline binary {}", bin.display()))
        })
        .transpose()?;
    if opts.list {
        for s in all_scenarios() {
            let mark = if s.default { "" } else { " [not default]" };
            println!("{:<17} {}{mark}", s.name, s.about);
        }
        for (name, about) in CLUSTER_SCENARIOS {
            println!("{name:<17} {about}");
        }
        return Ok(());
    }
    let out_dir = match &opts.out {
        Some(d) => d.clone(),
        None => workspace::target_dir()?.join("bench"),
    };
    let Some(given) = &opts.xhost_user else {
        let built = build::run(&build::Options {
            release: true,
            no_setup: opts.no_setup,
        })?;
        freeze(&build::prog_cost(true)?, &out_dir, PROG_COST)?;
        if !cluster.is_empty() {
            freeze(&build::cluster_bench(true)?, &out_dir, CLUSTER_BENCH)?;
        }
        return reexec(&freeze(&built.xhost_user, &out_dir, XHOST_USER)?);
    };
    let given = given
        .canonicalize()
        .with_context(|| format!("xhost-user binary {}", given.display()))?;
    // Measure a private copy: others rebuilding target/release/xhost-user during a
    // 10-minute bench must not change the binary under test halfway.
    let frozen = out_dir.join(XHOST_USER);
    if given != frozen.canonicalize().unwrap_or_default() {
        freeze(&build::prog_cost(true)?, &out_dir, PROG_COST)?;
        if !cluster.is_empty() {
            freeze(&build::cluster_bench(true)?, &out_dir, CLUSTER_BENCH)?;
        }
        return reexec(&freeze(&given, &out_dir, XHOST_USER)?);
    }
    let xhost_user = given;
    // Agent::start finds xhost-user through this variable; it is set by re-executing
    // rather than with set_var, which is unsound once threads exist.
    if !workspace::is_root()
        || std::env::var_os(XHOST_BIN_ENV).map(PathBuf::from) != Some(xhost_user.clone())
    {
        return reexec(&xhost_user);
    }
    if let Some(bin) = &baseline {
        // Frozen as the binary under test is, in the process that measures.
        let bin = freeze(bin, &out_dir, XHOST_USER_BASELINE)?;
        for s in &mut scenarios {
            if let PathKind::Xhost(o) = &mut s.kind
                && counterpart(s.name).is_some()
            {
                o.binary = Some(bin.clone());
            }
        }
    }
    let plan = Plan {
        creations: opts.creations.unwrap_or(if opts.quick { 20 } else { 100 }),
        reps: opts.reps.unwrap_or(if opts.quick { 1 } else { 5 }).max(1),
        duration_s: opts
            .duration
            .unwrap_or(if opts.quick { 2 } else { 4 })
            .max(1),
        scenarios: scenarios
            .iter()
            .map(|s| s.name)
            .chain(cluster.iter().copied())
            .collect(),
        quick: opts.quick,
        max_wait_s: opts.max_wait.unwrap_or(if opts.quick { 1 } else { 3 }),
    };
    preflight()?;
    crate::interrupt::install()?;
    let started = Instant::now();
    let started_at = report::now_utc();
    eprintln!(
        "bench: {} scenario(s) x {} rep(s), {} s per test; xhost-user {}",
        scenarios.len(),
        plan.reps,
        plan.duration_s,
        xhost_user.display()
    );
    let prog_cost = scenarios
        .iter()
        .any(|s| matches!(s.kind, PathKind::Xhost(_)))
        .then(|| {
            let bin = xhost_user.with_file_name(PROG_COST);
            eprintln!("bench: per-program cost ({})", bin.display());
            measure_prog_cost(&bin, plan.quick).map_err(|e| format!("{e:#}"))
        });
    let runs = if scenarios.is_empty() {
        Vec::new()
    } else {
        run_all(&scenarios, &plan)
    };
    let mut cluster_runs = ClusterRuns::default();
    for name in &cluster {
        if interrupted() {
            break;
        }
        let bin = xhost_user.with_file_name(CLUSTER_BENCH);
        let n = plan.creations.to_string();
        let err = |e: anyhow::Error| format!("{e:#}");
        if *name == CLUSTER_DOCKER {
            let args = ["docker", "--creations", &n];
            eprintln!("bench: {name} ({} {})", bin.display(), args.join(" "));
            cluster_runs.docker = Some(run_json(&bin, &args).map_err(err));
        } else {
            let args = ["scale", "--claims", &n];
            eprintln!("bench: {name} ({} {})", bin.display(), args.join(" "));
            cluster_runs.scale = Some(run_json(&bin, &args).map_err(err));
        }
    }
    if interrupted() {
        // The guards have run by now; 130 is the shell's code for death by SIGINT.
        eprintln!("bench: interrupted; everything has been torn down, no results written");
        std::process::exit(130);
    }
    let results = report::Results::new(
        &plan,
        &scenarios,
        runs,
        started_at,
        started.elapsed(),
        &xhost_user,
        prog_cost,
        cluster_runs,
    );
    let text = results.text_report();
    print!("{text}");
    results.write(&out_dir)?;
    println!(
        "\nwrote {0}/results.json, {0}/summary.json, {0}/table.md, {0}/ratios.svg (wall {1:.0} s)",
        out_dir.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The scenarios named in `filter` (all when empty), in the canonical order; with a
/// `baseline` binary, each baseline scenario whose counterpart is among them (or that is
/// named itself).
fn select(filter: &[String], baseline: bool) -> anyhow::Result<Vec<Scenario>> {
    let all = all_scenarios();
    let is_cluster = |f: &str| CLUSTER_SCENARIOS.iter().any(|(n, _)| *n == f);
    let cluster_only = !filter.is_empty() && filter.iter().all(|f| is_cluster(f));
    let filter: Vec<String> = filter.iter().filter(|f| !is_cluster(f)).cloned().collect();
    if cluster_only {
        return Ok(Vec::new());
    }
    let filter = &filter[..];
    for f in filter {
        if !all.iter().any(|s| s.name == f) {
            let mut names: Vec<_> = all.iter().map(|s| s.name).collect();
            names.extend(CLUSTER_SCENARIOS.iter().map(|(n, _)| *n));
            bail!("unknown scenario {f:?}; known: {}", names.join(", "));
        }
        if !baseline && counterpart(f).is_some() {
            bail!("scenario {f} needs --baseline <xhost-user binary>");
        }
    }
    let chosen = |name: &str| {
        if filter.is_empty() {
            all.iter().any(|s| s.name == name && s.default)
        } else {
            filter.iter().any(|f| f == name)
        }
    };
    let picked: Vec<Scenario> = all
        .iter()
        .filter(|s| match counterpart(s.name) {
            Some(of) => baseline && (chosen(of) || chosen(s.name)),
            None => chosen(s.name),
        })
        .cloned()
        .collect();
    if baseline && !picked.iter().any(|s| counterpart(s.name).is_some()) {
        bail!("--baseline runs beside {XHOST} or {XHOST_VXLAN}: select one of them");
    }
    Ok(picked)
}

/// The cluster scenarios named in `filter` (both when it is empty).
fn select_cluster(filter: &[String]) -> Vec<&'static str> {
    CLUSTER_SCENARIOS
        .iter()
        .map(|(n, _)| *n)
        .filter(|n| filter.is_empty() || filter.iter().any(|f| f == n))
        .collect()
}

/// The frozen binaries' names in the output directory.
const XHOST_USER: &str = "xhost-user";
const XHOST_USER_BASELINE: &str = "xhost-user-baseline";
const PROG_COST: &str = "prog_cost";
const CLUSTER_BENCH: &str = "cluster_bench";

/// Copies `bin` to `<out_dir>/<name>` (through a temporary name and a rename, so an agent
/// of an earlier run still executing the old file is no obstacle) and returns the copy's
/// path.
fn freeze(bin: &Path, out_dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let dest = out_dir.join(name);
    let tmp = out_dir.join(format!(".{name}.{}", std::process::id()));
    std::fs::copy(bin, &tmp)
        .with_context(|| format!("copying {} to {}", bin.display(), tmp.display()))?;
    std::fs::rename(&tmp, &dest).with_context(|| format!("renaming to {}", dest.display()))?;
    dest.canonicalize()
        .with_context(|| format!("resolving {}", dest.display()))
}

/// Re-runs this command as root with `--xhost-user BIN`, `$XHOST_USER_BIN` and a quiet
/// agent log (100 000 routes would otherwise print 100 000 lines).
fn reexec(xhost_user: &Path) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("locating xtask")?;
    let mut args: Vec<std::ffi::OsString> = Vec::new();
    let mut skip = false;
    for a in std::env::args_os().skip(1) {
        if skip {
            skip = false;
            continue;
        }
        if a == "--xhost-user" {
            skip = true;
            continue;
        }
        if a.to_string_lossy().starts_with("--xhost-user=") {
            continue;
        }
        args.push(a);
    }
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .arg("--xhost-user")
        .arg(xhost_user)
        .env(XHOST_BIN_ENV, xhost_user)
        .env(
            "RUST_LOG",
            std::env::var_os("RUST_LOG").unwrap_or_else(|| "warn".into()),
        );
    let mut cmd = workspace::as_root(cmd);
    let err = cmd.exec();
    Err(err).with_context(|| format!("cannot exec `{}`", workspace::display(&cmd)))
}

/// What `prog_cost` prints: ns per run of the datapath programs with `BPF_PROG_TEST_RUN`,
/// per route count.
#[derive(Debug, Serialize, Deserialize)]
pub struct ProgCost {
    pub rounds: usize,
    pub warm_samples: usize,
    pub first_samples: usize,
    pub samples: Vec<ProgSample>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ProgSample {
    pub program: String,
    pub routes: u32,
    /// Median ns of a run after a run of the same packet (caches warm).
    pub warm_ns: f64,
    /// Median ns of a run right after a route write (LPM walk).
    pub first_ns: f64,
}

/// Runs the per-program cost benchmark (a few seconds, no traffic: it runs the programs
/// in a private netns with `BPF_PROG_TEST_RUN`).
fn measure_prog_cost(bin: &Path, quick: bool) -> anyhow::Result<ProgCost> {
    let mut cmd = Command::new(bin);
    if quick {
        cmd.arg("--quick");
    }
    let out = cmd
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "{} failed ({}): {}",
            bin.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("parsing the output of {}", bin.display()))
}

/// What the cluster scenarios measured (`None`: not selected; `Err`: why it failed).
#[derive(Debug, Default, Serialize)]
pub struct ClusterRuns {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub docker: Option<Result<xhost_tests::cluster::DockerConvergence, String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scale: Option<Result<xhost_tests::cluster::ScaleResult, String>>,
}

/// Runs `bin args... --json` (its progress on our stderr) and parses its stdout.
fn run_json<T: serde::de::DeserializeOwned>(bin: &Path, args: &[&str]) -> anyhow::Result<T> {
    let out = Command::new(bin)
        .args(args)
        .arg("--json")
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "{} {} failed ({})",
            bin.display(),
            args.join(" "),
            out.status
        );
    }
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("parsing the output of {}", bin.display()))
}

/// Fails early, with what to install, when a tool or bpffs is missing.
fn preflight() -> anyhow::Result<()> {
    for (tool, pkg) in [
        ("iperf3", "iperf3"),
        ("sockperf", "sockperf"),
        ("ss", "iproute2"),
        ("bridge", "iproute2"),
        ("iptables", "iptables"),
        ("timeout", "coreutils"),
        ("nsenter", "util-linux"),
    ] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            bail!("`{tool}` not found (apt-get install {pkg}, or cargo xtask setup)");
        }
    }
    let mounts = std::fs::read_to_string("/proc/self/mounts").context("reading mounts")?;
    let bpffs = mounts.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.get(1) == Some(&"/sys/fs/bpf") && f.get(2) == Some(&"bpf")
    });
    if !bpffs {
        bail!("no bpffs at /sys/fs/bpf (mount -t bpf bpf /sys/fs/bpf)");
    }
    Ok(())
}

/// One measurement of one scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Test {
    Tcp,
    Udp,
    Latency(LatencyMode),
}

/// Every bed is built once and stays up for the whole run (idle beds cost the others
/// nothing measurable: an idle 100 000-route bed left a 1-route bed's pps unchanged).
/// Each repetition runs each test on every scenario before the next test, so the samples
/// a ratio pairs lie seconds apart, not minutes: this VM's speed drifts by tens of percent
/// within a minute. The scenario order rotates from one repetition to the next.
fn run_all(scenarios: &[Scenario], plan: &Plan) -> Vec<Run> {
    let n = scenarios.len();
    let mut beds = Vec::with_capacity(n);
    for s in scenarios {
        if interrupted() {
            return Vec::new();
        }
        let t = Instant::now();
        let bed = Bed::build(&s.kind, s.family).and_then(|b| b.check_path().map(|()| b));
        let took = t.elapsed().as_secs_f64();
        match &bed {
            Ok(_) => eprintln!("bench: {:<16} up in {took:.1} s", s.name),
            Err(e) => eprintln!("bench: {:<16} setup failed: {e}", s.name),
        }
        beds.push((bed, took));
    }
    // --quick keeps to the latency the targets use, to stay well under two minutes.
    let mut tests = vec![Test::Tcp, Test::Udp, Test::Latency(LatencyMode::BusyPoll)];
    if !plan.quick {
        tests.push(Test::Latency(LatencyMode::Pinned));
    }
    let mut runs = Vec::new();
    for rep in 1..=plan.reps {
        let mut this_rep: Vec<Run> = scenarios
            .iter()
            .zip(&beds)
            .map(|(s, (bed, took))| Run {
                rep,
                scenario: s.name.to_owned(),
                setup_s: *took,
                errors: bed
                    .as_ref()
                    .err()
                    .map(|e| format!("setup: {e}"))
                    .into_iter()
                    .collect(),
                ..Run::default()
            })
            .collect();
        for &test in &tests {
            for i in 0..n {
                if interrupted() {
                    runs.extend(this_rep);
                    return runs;
                }
                let k = (i + rep as usize - 1) % n;
                let s = &scenarios[k];
                if let (Ok(bed), true) = (&beds[k].0, test != Test::Tcp || s.tcp) {
                    measure(test, bed, plan, &mut this_rep[k]);
                }
            }
        }
        for ((s, (bed, _)), run) in scenarios.iter().zip(&beds).zip(&mut this_rep) {
            if let Ok(bed) = bed {
                agent_reports(s, bed, run);
            }
            eprintln!(
                "bench: rep {rep}/{} {:<15} {}",
                plan.reps,
                s.name,
                report::summary(run)
            );
        }
        runs.extend(this_rep);
    }
    runs
}

/// The agents' memory, load time and routes after a repetition, and (1-route xhost) the
/// datapath counters, which show the path the packets took.
fn agent_reports(s: &Scenario, bed: &Bed, run: &mut Run) {
    for (a, ns) in bed.agents().iter().zip(bed.host_namespaces()) {
        let (rss, hwm) = scenarios::rss_bytes(a.agent.pid())
            .map(|(r, h)| (Some(r), Some(h)))
            .unwrap_or((None, None));
        run.agents.push(AgentReport {
            host: a.host.clone(),
            pid: a.agent.pid(),
            load_s: a.load_time.as_secs_f64(),
            rss_bytes: rss,
            hwm_bytes: hwm,
            kernel_routes: scenarios::count_routes(ns, XHOST_RTPROT).ok(),
        });
    }
    // 100 000 routes make status slow and big.
    if matches!(&s.kind, PathKind::Xhost(o) if o.routes <= 1) {
        for a in bed.agents() {
            match a.agent.status() {
                Ok(v) => {
                    let brief = serde_json::json!({
                        "xdp": v.pointer("/agent/xdp"),
                        "counters": v.get("counters"),
                    });
                    run.xhost_status.insert(a.host.clone(), brief);
                }
                Err(e) => run.errors.push(format!("status on {}: {e}", a.host)),
            }
        }
    }
}

/// The receiver's CPU over one UDP test.
#[derive(Debug, Serialize)]
pub struct ReceiverCpu {
    pub cpu: usize,
    pub ticks: CpuTicks,
    pub call_ipis: u64,
}

/// Busy fraction above which a run counts as started under outside load.
const LOADED: f64 = 0.5;
/// CPUs of work that was not ours during a test above which its values count as
/// disturbed (a build of the other engineers takes a whole CPU: ~1.0).
pub const DISTURBED_CPUS: f64 = 0.35;

/// `/proc/stat` around one test, to tell how much CPU went to something else.
struct CpuWindow(CpuTicks, Vec<CpuTicks>);

impl CpuWindow {
    fn start() -> Option<Self> {
        CpuTicks::read_per_cpu().ok().map(|(a, c)| Self(a, c))
    }

    /// Total and per-CPU ticks since `start`.
    fn end(self) -> Option<(CpuTicks, Vec<CpuTicks>)> {
        let (all, cpus) = CpuTicks::read_per_cpu().ok()?;
        let per = cpus.iter().zip(&self.1).map(|(n, o)| n.since(o)).collect();
        Some((all.since(&self.0), per))
    }
}

/// CPUs' worth of busy time over a window that was not the tools' own: machine busy time
/// minus `own_cpu_s` (what iperf3 reports for its two processes), per second of window.
fn foreign_cpus(delta: &CpuTicks, ncpus: usize, own_cpu_s: f64) -> Option<f64> {
    let window_s = delta.total() as f64 / USER_HZ / ncpus.max(1) as f64;
    (window_s > 0.0).then(|| (delta.busy() as f64 / USER_HZ - own_cpu_s) / window_s)
}

/// One test of one scenario, bounded; a failed test is recorded in `run`.
fn measure(test: Test, bed: &Bed, plan: &Plan, run: &mut Run) {
    let (client, server, ip, secs) = (bed.client(), bed.server(), bed.server_ip(), plan.duration_s);
    // Let whatever else runs on the machine settle first; say so when it did not.
    let max_wait = Duration::from_secs(plan.max_wait_s);
    let busy = scenarios::wait_quiet(0.15, max_wait).unwrap_or(f64::NAN);
    run.busy_before = run.busy_before.max(busy);
    run.loaded |= busy > LOADED;
    let cpus = Cpus::split();
    let note_foreign = |run: &mut Run, test: &str, foreign: Option<f64>, metrics: &[Metric]| {
        if let Some(f) = foreign {
            run.foreign_cpus.insert(test.to_owned(), f);
            if f > DISTURBED_CPUS {
                run.disturbed.extend(metrics);
            }
        }
    };
    let own = |sender: Option<f64>, receiver: Option<f64>, secs: f64| {
        (sender.unwrap_or(100.0) + receiver.unwrap_or(0.0)) / 100.0 * secs
    };
    if test == Test::Tcp {
        let w = CpuWindow::start();
        match scenarios::iperf3_tcp(client, server, ip, secs, cpus) {
            Ok(t) => {
                let foreign = w.and_then(CpuWindow::end).and_then(|(d, per)| {
                    let own = own(t.sender_cpu_pct, t.receiver_cpu_pct, f64::from(secs));
                    foreign_cpus(&d, per.len(), own)
                });
                note_foreign(
                    run,
                    "tcp",
                    foreign,
                    &[Metric::TcpGbps, Metric::TcpSteadyGbps],
                );
                run.values.insert(Metric::TcpGbps, t.bits_per_second / 1e9);
                if let Some(steady) = t.steady_bits_per_second {
                    run.values.insert(Metric::TcpSteadyGbps, steady / 1e9);
                }
                run.tcp = Some(t);
            }
            Err(e) => run.errors.push(format!("tcp: {e}")),
        }
    }
    if test == Test::Udp {
        record_neighbours(bed, run);
        let w = CpuWindow::start();
        let ipis = scenarios::call_ipis().ok();
        let udp = scenarios::iperf3_udp(client, server, ip, secs, cpus);
        let cpu = w.and_then(CpuWindow::end);
        let ipis = ipis.zip(scenarios::call_ipis().ok());
        match udp {
            Ok(u) => {
                run.values.insert(Metric::UdpKpps, u.pps / 1e3);
                let delivered = u.packets.saturating_sub(u.lost);
                if let Some((c, per)) = cpu
                    && delivered > 0
                {
                    let ns = |ticks: u64| ticks as f64 * 1e9 / USER_HZ / delivered as f64;
                    run.values.insert(Metric::CpuNsPerPkt, ns(c.busy()));
                    run.values.insert(Metric::SoftirqNsPerPkt, ns(c.softirq));
                    let own = own(u.sender_cpu_pct, u.receiver_cpu_pct, u.seconds);
                    note_foreign(
                        run,
                        "udp",
                        foreign_cpus(&c, per.len(), own),
                        &[
                            Metric::UdpKpps,
                            Metric::CpuNsPerPkt,
                            Metric::SoftirqNsPerPkt,
                            Metric::RxWakeIpisPer100Pkts,
                            Metric::RxIdlePct,
                        ],
                    );
                    if let (Some(rx), Some((before, after))) = (cpus.server, ipis)
                        && let (Some(ticks), Some(&b), Some(&a)) =
                            (per.get(rx), before.get(rx), after.get(rx))
                    {
                        let call_ipis = a.saturating_sub(b);
                        run.values.insert(
                            Metric::RxWakeIpisPer100Pkts,
                            call_ipis as f64 * 100.0 / delivered as f64,
                        );
                        if ticks.total() > 0 {
                            run.values.insert(
                                Metric::RxIdlePct,
                                ticks.idle as f64 * 100.0 / ticks.total() as f64,
                            );
                        }
                        run.udp_receiver = Some(ReceiverCpu {
                            cpu: rx,
                            ticks: *ticks,
                            call_ipis,
                        });
                    }
                    run.udp_cpu_ticks = Some(c);
                }
                run.udp = Some(u);
            }
            Err(e) => run.errors.push(format!("udp: {e}")),
        }
    }
    if let Test::Latency(mode) = test {
        let w = CpuWindow::start();
        match scenarios::sockperf_ping_pong(client, server, ip, secs, mode) {
            Ok(l) if mode == LatencyMode::Pinned => {
                // Both ends share the last CPU; anything busy on the others is not ours.
                let foreign = w.and_then(CpuWindow::end).and_then(|(_, per)| {
                    let others = &per[..per.len().saturating_sub(1)];
                    let busy: u64 = others.iter().map(CpuTicks::busy).sum();
                    let total: u64 = others.iter().map(CpuTicks::total).sum();
                    (total > 0).then(|| busy as f64 / total as f64 * others.len() as f64)
                });
                note_foreign(
                    run,
                    "latency_pinned",
                    foreign,
                    &[Metric::PinnedMeanUs, Metric::PinnedP99Us],
                );
                run.values.insert(Metric::PinnedMeanUs, l.mean_us);
                run.values.insert(Metric::PinnedP99Us, l.p99_us);
                run.latency_pinned = Some(l);
            }
            Ok(l) => {
                // Busy polling keeps both CPUs at 100 %: outside load cannot be told apart.
                run.values.insert(Metric::LatMeanUs, l.mean_us);
                run.values.insert(Metric::LatP99Us, l.p99_us);
                run.values.insert(Metric::LatP50Us, l.p50_us);
                run.latency = Some(l);
            }
            Err(e) => run.errors.push(format!("latency ({mode:?}): {e}")),
        }
    }
}

/// Records the hosts' neighbour states into `run.udp_neigh` (errors into `run.errors`).
fn record_neighbours(bed: &Bed, run: &mut Run) {
    for (ns, host) in bed.host_namespaces().into_iter().zip(["host-a", "host-b"]) {
        let states = ns
            .ip(&["-4", "-j", "neigh", "show"])
            .map_err(anyhow::Error::from)
            .and_then(|out| parse_neigh_states(&String::from_utf8_lossy(&out.stdout)));
        match states {
            Ok(s) => {
                run.udp_neigh.insert(host.to_owned(), s);
            }
            Err(e) => run.errors.push(format!("neighbours of {host}: {e:#}")),
        }
    }
}

/// `ip -j neigh show` output -> `"<dev> <address>"` -> state (`REACHABLE`, `STALE`, ...;
/// several flags joined by `+`).
fn parse_neigh_states(json: &str) -> anyhow::Result<BTreeMap<String, String>> {
    #[derive(Deserialize)]
    struct Entry {
        dst: String,
        dev: String,
        #[serde(default)]
        state: Vec<String>,
    }
    let entries: Vec<Entry> =
        serde_json::from_str(json).context("`ip -j neigh show` output is not its JSON")?;
    Ok(entries
        .into_iter()
        .map(|e| (format!("{} {}", e.dev, e.dst), e.state.join("+")))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_neighbour_states() {
        let out = r#"[{"dst":"172.16.91.132","dev":"ens33","lladdr":"d2:53:d2:2d:48:51","state":["STALE"]},
            {"dst":"192.168.220.11","dev":"docker0","lladdr":"02:42:c0:a8:dc:0b","state":["REACHABLE"]},
            {"dst":"192.168.220.12","dev":"docker0","state":["FAILED"]},
            {"dst":"192.168.220.1","dev":"docker0","lladdr":"02:42:c0:a8:dc:01","router":null,"state":["PERMANENT","NOARP"]}]"#;
        let states = parse_neigh_states(out).expect("parses");
        assert_eq!(
            states.into_iter().collect::<Vec<_>>(),
            [
                ("docker0 192.168.220.1".into(), "PERMANENT+NOARP".into()),
                ("docker0 192.168.220.11".into(), "REACHABLE".into()),
                ("docker0 192.168.220.12".into(), "FAILED".into()),
                ("ens33 172.16.91.132".into(), "STALE".into()),
            ]
        );
        assert!(parse_neigh_states("[]").expect("no entries").is_empty());
        let err = parse_neigh_states(r#"Object "neigh" is unknown"#).expect_err("not JSON");
        assert!(format!("{err:#}").contains("not its JSON"), "{err:#}");
    }

    fn names(v: &[Scenario]) -> Vec<&'static str> {
        v.iter().map(|s| s.name).collect()
    }

    #[test]
    fn the_ipv6_twins_run_by_default_and_compare_to_their_family() {
        let default = select(&[], false).expect("default");
        let v6: Vec<&str> = default
            .iter()
            .filter(|s| s.family == Family::Ipv6)
            .map(|s| s.name)
            .collect();
        assert_eq!(v6, [WIRE_V6, IP6_ROUTES, XHOST_V6]);
        let twin = |name: &str| {
            default
                .iter()
                .find(|s| s.name == name)
                .map(|s| s.kind.clone())
                .expect("selected")
        };
        // Each is its IPv4 scenario's bed, carrying IPv6.
        for (v6, v4) in [(WIRE_V6, WIRE), (IP6_ROUTES, IPTABLES), (XHOST_V6, XHOST)] {
            assert_eq!(twin(v6), twin(v4), "{v6}");
            assert_eq!(wire_for(v6), WIRE_V6);
            assert_eq!(wire_for(v4), WIRE);
        }
        let picked = select(&[XHOST.into(), XHOST_V6.into()], true).expect("filtered");
        assert_eq!(names(&picked), [XHOST, XHOST_V6, XHOST_BASELINE]);
    }

    #[test]
    fn the_baseline_runs_exactly_when_given() {
        let default = names(&select(&[], false).expect("default"));
        assert!(!default.contains(&XHOST_BASELINE));
        assert!(!default.contains(&XHOST_VXLAN_BASELINE));
        let with = names(&select(&[], true).expect("with a baseline"));
        assert_eq!(with.len(), default.len() + 2);
        assert_eq!(
            with[with.len() - 2..],
            [XHOST_BASELINE, XHOST_VXLAN_BASELINE]
        );
        let filtered = select(&[WIRE.into(), XHOST.into()], true).expect("filtered");
        assert_eq!(names(&filtered), [WIRE, XHOST, XHOST_BASELINE]);
        let filtered = select(&[VXLAN.into(), XHOST_VXLAN.into()], true).expect("filtered");
        assert_eq!(names(&filtered), [VXLAN, XHOST_VXLAN, XHOST_VXLAN_BASELINE]);
        for b in [XHOST_BASELINE, XHOST_VXLAN_BASELINE] {
            let e = select(&[b.into()], false).expect_err("no binary");
            assert_eq!(
                e.to_string(),
                format!("scenario {b} needs --baseline <xhost-user binary>")
            );
        }
        let e = select(&[WIRE.into()], true).expect_err("nothing to compare");
        assert_eq!(
            e.to_string(),
            "--baseline runs beside xhost or xhost-vxlan: select one of them"
        );
    }
}
