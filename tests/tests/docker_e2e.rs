//! The Docker-driven control plane against two real engines: each simulated host runs its
//! own `dockerd` (own data root, exec root, socket, `--bip`) and an `xhost-user load` that
//! learns its bridges, subnets and containers from that engine only (no `--bridge`); the
//! peers come from a config file. Docker's own iptables rules are in place and nothing is
//! routed by hand. Needs root, dockerd and busybox-static; run with `--test-threads=1`.
//!
//! ```text
//!  a1 192.168.110.x (Docker's IPAM)                b1 192.168.220.x
//!  [a3 192.168.111.11 on user network net2]          |
//!     | veth                                         | veth
//!  host-a netns                                   host-b netns
//!    dockerd -H unix:///tmp/xhd-{pid}-{n}/...       dockerd (its own roots and socket)
//!    docker0 192.168.110.1/24 (made by dockerd)     docker0 192.168.220.1/24
//!    [br-<id12> 192.168.111.1/24: net2]
//!    xhost-user load --iface ens33                  xhost-user load --iface ens33
//!      --docker-host unix://<A's socket>              --docker-host unix://<B's socket>
//!      --config: peer .132 = 192.168.220.0/24         --config: peer .131 = 192.168.110.0/24,
//!                                                                         192.168.111.0/24
//!    ens33 172.16.91.131/24 <======= veth =======> ens33 172.16.91.132/24
//! ```
//!
//! Traffic runs inside the containers' network namespaces with the test machine's `ping`
//! and `xh-probe` (`nsenter --net=/proc/<pid>/ns/net`); every engine, container, namespace,
//! pin and temp file is removed by guards, also when a test fails (see
//! `testbed_leaves_nothing_behind_even_when_a_test_panics`).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    panic::{AssertUnwindSafe, catch_unwind},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use nix::{sys::signal::Signal, unistd::Pid};
use serde_json::Value;
use xhost_tests::{
    NETNS_DIR, Process, Topology, TopologyOpts, TransferOpts,
    docker_engine::{self, Engine, mounts_under, parse_docker_time, processes_mentioning},
    pid_alive,
    xhost::{
        Agent, EndpointMap, attached_programs, status_routes, status_routes6, tc_hook, vm_rss_kib,
        wait_status, xhost,
    },
};

/// A user network host A may create; host B's config routes it to A from the start.
const NET2: &str = "192.168.111.0/24";
/// Containers and maps follow Docker within this (the issue's bound).
const FOLLOW_BOUND: Duration = Duration::from_secs(1);
/// Generous bound for waits that are not themselves measured.
const SETTLE: Duration = Duration::from_secs(10);

fn require_docker() {
    assert!(
        xhost_tests::is_root(),
        "these tests start dockerd and load eBPF programs: run as root (cargo xtask test)"
    );
    assert!(
        Path::new("/usr/sbin/dockerd").exists(),
        "dockerd missing: apt-get install docker.io busybox-static (scripts/setup.sh)"
    );
}

/// A temp directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("xh-{}-{n}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        Self(dir)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).expect("write temp file");
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            eprintln!("cannot remove {}: {e}", self.0.display());
        }
    }
}

/// Two underlay-only hosts, an engine per host (started or only prepared) and the agents.
/// Fields drop in declaration order: agents (detach, unpin), engines (containers, daemon,
/// directories), config files, then the namespaces.
struct Testbed {
    agents: [Option<Agent>; 2],
    engines: [Engine; 2],
    cfg: TempDir,
    topo: Topology,
}

/// Everything a testbed created, to check after teardown that none of it is left.
#[derive(Debug, Default)]
struct Footprint {
    netns: Vec<String>,
    dirs: Vec<PathBuf>,
    pids: Vec<(String, u32)>,
}

impl Testbed {
    /// Builds the hosts and an engine in each; `boot[i]` starts host i's engine (and
    /// imports busybox), else it is only prepared (its socket path exists, not the socket).
    fn new(boot: [bool; 2]) -> Self {
        require_docker();
        if let Ok(gone) = xhost_tests::cleanup_stale() {
            gone.iter()
                .for_each(|n| eprintln!("removed stale netns {n}"));
        }
        for d in docker_engine::cleanup_stale() {
            eprintln!("removed stale engine dir {}", d.display());
        }
        let t0 = Instant::now();
        let topo = Topology::two_hosts(TopologyOpts {
            underlay_only: true,
            ..TopologyOpts::default()
        })
        .expect("build the underlay");
        let prepare = |i: usize| {
            let h = &topo.hosts()[i];
            let mut e = Engine::prepare_in_netns(h.name(), &h.bip()).expect("prepare dockerd");
            if boot[i] {
                e.boot().expect("start dockerd");
                e.import_busybox().expect("import busybox");
            }
            e
        };
        let engines = [prepare(0), prepare(1)];
        let cfg = TempDir::new("e2e-cfg");
        let (a, b) = (topo.host_a(), topo.host_b());
        cfg.write(
            "a.toml",
            &format!(
                "[[peer]]\nhost = \"{}\"\nsubnets = [\"{}\"]\n",
                b.underlay_ip(),
                b.subnet()
            ),
        );
        cfg.write(
            "b.toml",
            &format!(
                "[[peer]]\nhost = \"{}\"\nsubnets = [\"{}\", \"{NET2}\"]\n",
                a.underlay_ip(),
                a.subnet()
            ),
        );
        eprintln!("testbed up in {:?}\n{}", t0.elapsed(), topo.ascii());
        Self {
            agents: [None, None],
            engines,
            cfg,
            topo,
        }
    }

    fn host(&self, i: usize) -> &xhost_tests::Host {
        &self.topo.hosts()[i]
    }

    fn engine(&self, i: usize) -> &Engine {
        &self.engines[i]
    }

    fn agent(&self, i: usize) -> &Agent {
        self.agents[i].as_ref().expect("agent started")
    }

    fn config(&self, i: usize) -> PathBuf {
        self.cfg.0.join(["a.toml", "b.toml"][i])
    }

    /// `xhost-user load --iface ens33 --docker-host <engine> --config <cfg>` on host i.
    /// Starts both hosts' agents and waits until each follows its engine.
    fn start_agents(&mut self) {
        for i in 0..2 {
            self.start_agent(i);
        }
        for i in 0..2 {
            self.wait_docker(i);
        }
    }

    fn start_agent(&mut self, i: usize) {
        let cfg = self.config(i);
        self.start_agent_with(i, &cfg);
    }

    fn start_agent_with(&mut self, i: usize, config: &Path) {
        let config = config.display().to_string();
        self.start_agent_args(i, &["--config", &config]);
    }

    /// `xhost-user load --iface ens33 --docker-host <engine> <extra>` on host i.
    fn start_agent_args(&mut self, i: usize, extra: &[&str]) {
        let host = &self.topo.hosts()[i];
        let docker = self.engines[i].host();
        let mut args = vec!["--iface", host.underlay_iface(), "--docker-host", &docker];
        args.extend_from_slice(extra);
        let agent = Agent::start(host.ns(), host.role(), &args).expect("xhost-user load");
        self.agents[i] = Some(agent);
    }

    fn status(&self, i: usize) -> Value {
        xhost_tests::xhost::status(self.host(i).ns(), &self.agent(i).dirs).expect("status --json")
    }

    /// Polls host i's status until `pred` holds; panics with the last status after `timeout`.
    #[track_caller]
    fn wait(
        &self,
        i: usize,
        what: &str,
        timeout: Duration,
        pred: impl FnMut(&Value) -> bool,
    ) -> (Value, Duration) {
        wait_status(self.host(i).ns(), &self.agent(i).dirs, what, timeout, pred)
            .unwrap_or_else(|e| panic!("host {}: {e}", self.host(i).role()))
    }

    /// Waits until host i's agent is connected to its engine and serves docker0.
    fn wait_docker(&self, i: usize) -> Value {
        let subnet = self.host(i).subnet().to_string();
        self.wait(i, "the agent to follow its engine", SETTLE, |s| {
            connected(s) && local_subnets(s).contains(&subnet)
        })
        .0
    }

    fn footprint(&self) -> Footprint {
        let mut fp = Footprint {
            netns: vec![
                self.host(0).name().to_owned(),
                self.host(1).name().to_owned(),
            ],
            ..Footprint::default()
        };
        for e in &self.engines {
            fp.dirs.push(e.dir().to_owned());
            if let Some(pid) = e.pid() {
                fp.pids.push(("dockerd".into(), pid));
                let ids = e.docker_ok(&["ps", "-q"]).unwrap_or_default();
                for id in ids.split_whitespace() {
                    if let Ok(pid) = e.container_pid(id) {
                        fp.pids.push((format!("container {id}"), pid));
                    }
                }
            }
            for pid in processes_mentioning(e.dir()) {
                fp.pids
                    .push((format!("process of {}", e.dir().display()), pid));
            }
        }
        for a in self.agents.iter().flatten() {
            fp.pids.push(("xhost-user".into(), a.pid()));
            fp.dirs.push(a.dirs.pin_dir.clone());
            fp.dirs.push(a.dirs.run_dir.clone());
        }
        fp.dirs.push(self.cfg.0.clone());
        fp
    }

    /// Tears everything down and checks that nothing is left.
    fn finish(self) {
        let fp = self.footprint();
        let t = Instant::now();
        drop(self);
        eprintln!("teardown took {:?}", t.elapsed());
        fp.assert_gone();
    }
}

impl Footprint {
    #[track_caller]
    fn assert_gone(&self) {
        assert!(!self.netns.is_empty() && !self.pids.is_empty(), "{self:?}");
        for n in &self.netns {
            assert!(!Path::new(NETNS_DIR).join(n).exists(), "netns {n} left");
        }
        for d in &self.dirs {
            assert!(!d.exists(), "{} left", d.display());
            assert_eq!(mounts_under(d), Vec::<PathBuf>::new(), "mounts left");
            assert_eq!(processes_mentioning(d), Vec::<u32>::new(), "processes left");
        }
        for (what, pid) in &self.pids {
            assert!(!pid_alive(*pid), "{what} (pid {pid}) still running");
        }
    }
}

// --- Reading `xhost-user status --json` ---------------------------------------------------

/// IP -> (MAC, ifindex) of the pinned ENDPOINTS map.
fn endpoints(s: &Value) -> BTreeMap<Ipv4Addr, (String, u32)> {
    endpoints_of(s, "endpoints")
}

/// Address -> (MAC, ifindex) of the endpoints `status --json` lists under
/// `field` (`endpoints`, `endpoints6`).
fn endpoints_of<A: std::str::FromStr + Ord>(s: &Value, field: &str) -> BTreeMap<A, (String, u32)> {
    s[field]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| {
            Some((
                e["ip"].as_str()?.parse().ok()?,
                (
                    e["mac"].as_str()?.to_owned(),
                    u32::try_from(e["ifindex"].as_u64()?).ok()?,
                ),
            ))
        })
        .collect()
}

/// `iface@hook` of every pinned attachment.
fn attached(s: &Value) -> Vec<String> {
    s["attached"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| {
            format!(
                "{}@{}",
                a["iface"].as_str().unwrap_or_default(),
                a["hook"].as_str().unwrap_or_default()
            )
        })
        .collect()
}

/// File names under the instance's `links/` pin directory (`iface@hook`).
fn pinned_links(dirs: &xhost_tests::xhost::AgentDirs) -> Vec<String> {
    std::fs::read_dir(dirs.pin_dir.join("links"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn local_subnets(s: &Value) -> Vec<String> {
    s["local_subnets"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| Some(l["prefix"].as_str()?.to_owned()))
        .collect()
}

fn connected(s: &Value) -> bool {
    s["agent"]["docker"]["connected"] == true
}

fn counter(s: &Value, name: &str) -> u64 {
    s["counters"][name]["packets"]
        .as_u64()
        .unwrap_or_else(|| panic!("counter {name} in {s}"))
}

// --- Docker's side -------------------------------------------------------------------------

/// IP -> (MAC, host veth ifindex) of every running container's endpoints, as Docker and
/// the kernel see them; `None` while a container is between states.
fn docker_state(engine: &Engine) -> Option<BTreeMap<Ipv4Addr, (String, u32)>> {
    let mut out = BTreeMap::new();
    for id in engine.docker_ok(&["ps", "-q"]).ok()?.split_whitespace() {
        let nets = engine
            .inspect(
                id,
                "{{range $k, $v := .NetworkSettings.Networks}}{{$k}} {{end}}",
            )
            .ok()?;
        for net in nets.split_whitespace() {
            let ep = engine.container_endpoint(id, net).ok()?;
            out.insert(ep.ip, (ep.mac, ep.host_ifindex));
        }
    }
    Some(out)
}

fn ip_of(engine: &Engine, container: &str, network: &str) -> Ipv4Addr {
    engine
        .container_endpoint(container, network)
        .unwrap_or_else(|e| panic!("endpoint of {container} on {network}: {e}"))
        .ip
}

/// A user network on host A with the subnet host B routes to A; returns its bridge.
fn create_net2(engine: &Engine) -> String {
    let id = engine
        .docker_ok(&["network", "create", "--subnet", NET2, "net2"])
        .expect("docker network create net2");
    format!("br-{}", &id[..12])
}

/// `ping -n -D <opts> <to>` from a container, running: its output is a [`PingLog`].
#[track_caller]
fn spawn_ping(engine: &Engine, from: &str, to: Ipv4Addr, opts: &[&str]) -> Process {
    let to = to.to_string();
    let mut args = vec!["ping", "-n", "-D"];
    args.extend_from_slice(opts);
    args.push(&to);
    let cmd = engine.in_container(from, &args).expect("ping command");
    Process::spawn(&format!("ping {from} -> {to}"), cmd).expect("spawn ping")
}

#[track_caller]
fn assert_ping(engine: &Engine, from: &str, to: Ipv4Addr, count: u32) {
    let p = engine.ping_from(from, to, count).expect("ping");
    assert!(p.all_received(), "ping {from} -> {to}: {p:?}");
}

/// 8 MiB over TCP from container `from` (address `from_ip`) to `to` at `to_ip`: intact, and
/// the receiver sees the sender's container IP (no NAT on the path).
#[track_caller]
fn assert_transfer(
    from: (&Engine, &str),
    from_ip: Ipv4Addr,
    to: (&Engine, &str),
    to_ip: Ipv4Addr,
    port: u16,
) {
    let opts = TransferOpts {
        port,
        bytes: 8 << 20,
        ..TransferOpts::default()
    };
    let t = docker_engine::tcp_transfer(from, to, to_ip, &opts).expect("tcp transfer");
    assert!(t.intact(), "payload corrupted {from_ip} -> {to_ip}: {t:?}");
    assert_eq!(
        t.source_ip(),
        IpAddr::V4(from_ip),
        "the receiver must see the sender's container IP"
    );
    eprintln!(
        "tcp {from_ip} -> {to_ip}: {} MiB intact, {:.0} Mbit/s, receiver saw {}",
        opts.bytes >> 20,
        t.mbit_per_s(),
        t.source_ip()
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Signed `a - b` in milliseconds.
fn diff_ms(a: SystemTime, b: SystemTime) -> f64 {
    match a.duration_since(b) {
        Ok(d) => ms(d),
        Err(e) => -ms(e.duration()),
    }
}

fn unix_secs(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// The value at quantile `q` (0..=1) of sorted samples (nearest rank).
fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// IP -> (when it (last) appeared in the map, when it then went away).
type Sightings = BTreeMap<Ipv4Addr, (SystemTime, Option<SystemTime>)>;

/// Records, on a thread polling the pinned ENDPOINTS map every millisecond, when each IP
/// first appeared and when it was last seen going away.
struct MapWatch {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Sightings>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl MapWatch {
    fn start(agent: &Agent) -> Self {
        let map = EndpointMap::open(&agent.dirs).expect("open pinned ENDPOINTS");
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(BTreeMap::new()));
        let (stop2, seen2) = (Arc::clone(&stop), Arc::clone(&seen));
        let thread = thread::spawn(move || {
            let mut present = BTreeSet::new();
            while !stop2.load(Ordering::Relaxed) {
                let now_map = map.read().unwrap_or_default();
                let now = SystemTime::now();
                let mut seen = seen2.lock().unwrap_or_else(PoisonError::into_inner);
                for ip in now_map.keys() {
                    if present.insert(*ip) {
                        seen.insert(*ip, (now, None));
                    }
                }
                present.retain(|ip| {
                    let keep = now_map.contains_key(ip);
                    if !keep && let Some(e) = seen.get_mut(ip) {
                        e.1 = Some(now);
                    }
                    keep
                });
                drop(seen);
                thread::sleep(Duration::from_millis(1));
            }
        });
        Self {
            stop,
            seen,
            thread: Some(thread),
        }
    }

    /// When `ip` (last) appeared, waiting up to `timeout` for it.
    fn appeared(&self, ip: Ipv4Addr, timeout: Duration) -> Option<SystemTime> {
        let t0 = Instant::now();
        loop {
            if let Some((t, None)) = self.get(ip) {
                return Some(t);
            }
            if t0.elapsed() > timeout {
                return None;
            }
            thread::sleep(Duration::from_millis(1));
        }
    }

    /// When `ip` went away, waiting up to `timeout`.
    fn vanished(&self, ip: Ipv4Addr, timeout: Duration) -> Option<SystemTime> {
        let t0 = Instant::now();
        loop {
            if let Some((_, Some(t))) = self.get(ip) {
                return Some(t);
            }
            if t0.elapsed() > timeout {
                return None;
            }
            thread::sleep(Duration::from_millis(1));
        }
    }

    fn get(&self, ip: Ipv4Addr) -> Option<(SystemTime, Option<SystemTime>)> {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&ip)
            .copied()
    }
}

impl Drop for MapWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `ping -D` output: when each echo request was sent, and the summary's count.
///
/// An answered request's send time is its reply's time minus the round trip (a request
/// queued on an unresolved neighbour is answered seconds later). With `-O`, ping also
/// prints `no answer yet for icmp_seq=N` right before each attempt to send N + 1 while N
/// is unanswered, which times the sends of unanswered requests too. That matters: over a
/// veth "underlay" the requests keep charging the sender's socket while they wait on the
/// far host's neighbour queue, so ping's small send buffer fills and it stops sending
/// (retrying every ~0.1 s) until the queue drains. Spread evenly between the answered
/// requests around such a stall, the requests sent before it would be placed up to
/// seconds late.
#[derive(Debug, Default)]
struct PingLog {
    transmitted: u32,
    /// Answered requests: when each was sent.
    replies: BTreeMap<u32, SystemTime>,
    /// Answered requests: when the reply came.
    answered: BTreeMap<u32, SystemTime>,
    /// Every request whose send time the output gives: the answered ones and, with `-O`,
    /// those sent while the one before was unanswered.
    sent: BTreeMap<u32, f64>,
}

impl PingLog {
    /// Parses `[1700000000.123456] 64 bytes from ...: icmp_seq=5 ttl=62 time=0.1 ms`,
    /// `[1700000000.223456] no answer yet for icmp_seq=5` and `N packets transmitted, ...`.
    fn parse(text: &str) -> Self {
        let mut log = Self::default();
        // Seq N + 1 -> the last attempt to send it (the one that succeeded, if any did).
        let mut attempts = BTreeMap::new();
        for line in text.lines() {
            let field = |key: &str| {
                line.split_whitespace()
                    .find_map(|w| w.strip_prefix(key))
                    .and_then(|s| s.parse::<f64>().ok())
            };
            let stamp = line
                .strip_prefix('[')
                .and_then(|l| l.split_once(']'))
                .and_then(|(s, _)| s.parse::<f64>().ok());
            if line.contains("bytes from")
                && let Some(stamp) = stamp
                && let Some(seq) = field("icmp_seq=")
                && let Some(rtt_ms) = field("time=")
            {
                let sent = stamp - rtt_ms / 1e3;
                log.replies
                    .insert(seq as u32, UNIX_EPOCH + Duration::from_secs_f64(sent));
                log.answered
                    .insert(seq as u32, UNIX_EPOCH + Duration::from_secs_f64(stamp));
                log.sent.insert(seq as u32, sent);
            }
            if line.contains("no answer yet for")
                && let Some(stamp) = stamp
                && let Some(seq) = field("icmp_seq=")
            {
                attempts.insert(seq as u32 + 1, stamp);
            }
            if let Some((n, _)) = line.split_once(" packets transmitted") {
                log.transmitted = n.trim().parse().unwrap_or(0);
            }
        }
        // Attempts past the last request transmitted never succeeded.
        for (seq, t) in attempts.range(..=log.transmitted) {
            log.sent.entry(*seq).or_insert(*t);
        }
        log
    }

    /// Send time of every sequence number 1..=transmitted: as printed where the output
    /// gives it, else interpolated between the nearest known ones (extrapolated at
    /// `interval` at the ends).
    fn send_times(&self, interval: f64) -> BTreeMap<u32, f64> {
        let known: Vec<(u32, f64)> = self.sent.iter().map(|(s, t)| (*s, *t)).collect();
        let mut out = BTreeMap::new();
        if known.is_empty() {
            return out;
        }
        for seq in 1..=self.transmitted {
            let after = known.iter().position(|(s, _)| *s >= seq);
            let t = match after {
                Some(i) if known[i].0 == seq => known[i].1,
                Some(0) => known[0].1 - f64::from(known[0].0 - seq) * interval,
                Some(i) => {
                    let ((s0, t0), (s1, t1)) = (known[i - 1], known[i]);
                    t0 + (t1 - t0) * f64::from(seq - s0) / f64::from(s1 - s0)
                }
                None => {
                    let (s, t) = known[known.len() - 1];
                    t + f64::from(seq - s) * interval
                }
            };
            out.insert(seq, t);
        }
        out
    }
}

/// Send times come from the output where it has them: a request sent after a stall of
/// ping (send buffer full) is not placed one interval after the one before it, and the
/// requests before the stall are not spread over it.
#[test]
fn ping_log_times_the_sends_of_unanswered_requests() {
    let out = "\
[100.000100] 64 bytes from 10.0.0.1: icmp_seq=1 ttl=62 time=0.100 ms
[100.200000] no answer yet for icmp_seq=2
[100.300000] no answer yet for icmp_seq=3
[100.400000] no answer yet for icmp_seq=4
[100.500000] no answer yet for icmp_seq=4
[101.400000] no answer yet for icmp_seq=4
[101.500000] no answer yet for icmp_seq=5
[101.500400] 64 bytes from 10.0.0.1: icmp_seq=6 ttl=62 time=0.400 ms
[101.700000] no answer yet for icmp_seq=7
7 packets transmitted, 2 received, 71.4286% packet loss, time 1600ms
";
    let log = PingLog::parse(out);
    assert_eq!(log.transmitted, 7);
    assert_eq!(log.replies.keys().copied().collect::<Vec<_>>(), [1, 6]);
    assert_eq!(
        log.answered[&6],
        UNIX_EPOCH + Duration::from_secs_f64(101.5004)
    );
    let times = log.send_times(0.1);
    // 2 between its neighbours; 5, unanswered, at the last attempt to send it (spread
    // evenly from 1 to 6 it would be 101.2); 7 one interval after 6; the attempt at 8
    // (never transmitted) ignored.
    let want = [
        (1, 100.0),
        (2, 100.1),
        (3, 100.2),
        (4, 100.3),
        (5, 101.4),
        (6, 101.5),
        (7, 101.6),
    ];
    assert_eq!(times.len(), want.len(), "{times:?}");
    for (seq, t) in want {
        assert!((times[&seq] - t).abs() < 1e-6, "seq {seq}: {times:?}");
    }
}

/// Starts `count` containers named `{prefix}{i}` on host 0's default bridge, `batch` at a
/// time; returns when each `docker run` returned, by name.
fn run_batches(
    engine: &Engine,
    prefix: &str,
    count: usize,
    batch: usize,
) -> BTreeMap<String, SystemTime> {
    let mut returned = BTreeMap::new();
    let names: Vec<String> = (0..count).map(|i| format!("{prefix}{i}")).collect();
    for chunk in names.chunks(batch) {
        let children: Vec<(String, Child)> = chunk
            .iter()
            .map(|name| {
                let mut c = engine.docker_command(&[
                    "run",
                    "-d",
                    "--pull=never",
                    "--init",
                    "--name",
                    name,
                    docker_engine::BUSYBOX_IMAGE,
                    "sleep",
                    "3600",
                ]);
                c.stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped());
                (name.clone(), c.spawn().expect("spawn docker run"))
            })
            .collect();
        // Waited in order: a later one finishing first only makes its stamp late, never early.
        for (name, child) in children {
            let out = child.wait_with_output().expect("docker run");
            let now = SystemTime::now();
            assert!(
                out.status.success(),
                "docker run {name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            returned.insert(name, now);
        }
    }
    returned
}

// --- The tests -------------------------------------------------------------------------------

/// Containers on two real engines reach each other by container IP, both
/// ways, with Docker's own rules in place and no route or rule added by hand; `status`
/// shows what the agent learnt from Docker.
#[test]
fn containers_reach_each_other_by_ip_with_state_from_docker_only() {
    let mut tb = Testbed::new([true, true]);
    let (ea, eb) = (tb.engine(0), tb.engine(1));
    ea.run_container("bridge", None, "a1").expect("run a1");
    eb.run_container("bridge", None, "b1").expect("run b1");
    let (ip_a, ip_b) = (ip_of(ea, "a1", "bridge"), ip_of(eb, "b1", "bridge"));
    eprintln!("a1 = {ip_a}, b1 = {ip_b}");

    // Docker's own host state: FORWARD policy DROP, isolation chains, MASQUERADE.
    for i in 0..2 {
        let ns = tb.host(i).ns();
        let filter = ns.run(&["iptables", "-w", "-S", "FORWARD"]);
        assert!(
            filter.contains("-P FORWARD DROP") && filter.contains("DOCKER-ISOLATION-STAGE-1"),
            "{filter}"
        );
        let nat = ns.run(&["iptables", "-w", "-t", "nat", "-S", "POSTROUTING"]);
        assert!(
            nat.contains(&format!(
                "-s {} ! -o docker0 -j MASQUERADE",
                tb.host(i).subnet()
            )),
            "{nat}"
        );
    }
    // Out of the box the subnets do not reach each other.
    assert!(
        !ea.ping_from("a1", ip_b, 1).expect("ping").any_received(),
        "a1 reached b1 before xhost was loaded"
    );

    tb.start_agent(0);
    tb.start_agent(1);
    let (ea, eb) = (tb.engine(0), tb.engine(1));
    let want_a = ea.container_endpoint("a1", "bridge").expect("a1 endpoint");
    let (sa, took) = tb.wait(0, "a1 in ENDPOINTS", SETTLE, |s| {
        connected(s) && endpoints(s).contains_key(&ip_a)
    });
    eprintln!("host A: Docker state in the maps {took:?} after `ready`");
    let sb = tb
        .wait(1, "b1 in ENDPOINTS", SETTLE, |s| {
            connected(s) && endpoints(s).contains_key(&ip_b)
        })
        .0;

    // The endpoint is the container: its MAC and the host side of its veth.
    assert_eq!(
        endpoints(&sa),
        BTreeMap::from([(ip_a, (want_a.mac.clone(), want_a.host_ifindex))]),
        "host A endpoints vs docker inspect + ip link ({want_a:?})"
    );
    assert_eq!(want_a.bridge, "docker0");
    assert_eq!(
        endpoints(&sb),
        docker_state(eb).expect("docker state of B"),
        "host B endpoints"
    );
    for (s, host, peer) in [(&sa, tb.host(0), tb.host(1)), (&sb, tb.host(1), tb.host(0))] {
        let att = attached(s);
        for want in ["docker0@bridge-ingress", "ens33@underlay-ingress"] {
            assert!(att.iter().any(|a| a == want), "{want} not in {att:?}");
        }
        assert!(local_subnets(s).contains(&host.subnet().to_string()), "{s}");
        assert!(
            status_routes(s).contains(&(peer.subnet().to_string(), peer.underlay_ip().to_string())),
            "{s}"
        );
        let d = &s["agent"]["docker"];
        assert_eq!(d["connected"], true, "{d}");
        assert!(
            d["engine_version"]
                .as_str()
                .is_some_and(|v| v.starts_with("20.10")),
            "{d}"
        );
        assert_eq!(d["api_version"], "1.41", "{d}");
        let nets = d["networks"].as_array().expect("networks");
        assert!(
            nets.iter().any(|n| n["name"] == "bridge"
                && n["bridge"] == "docker0"
                && n["subnets"][0] == host.subnet().to_string()),
            "{d}"
        );
        // ... and the kernel agrees.
        let live = attached_programs(host.ns(), &["docker0", "ens33"]).expect("attachments");
        assert!(
            live.iter()
                .any(|l| *l == format!("docker0 {} xhost_bridge_in", tc_hook("ingress"))),
            "{live:?}"
        );
    }

    assert_both_ways_through_xhost(&tb, ip_a, ip_b, [45_301, 45_302]);
    tb.finish();
}

/// Ping and checksummed TCP both ways between a1 (`ip_a`) and b1 (`ip_b`), TCP on `ports`;
/// both hosts' datapath counters must account for the traffic and have dropped nothing.
fn assert_both_ways_through_xhost(tb: &Testbed, ip_a: Ipv4Addr, ip_b: Ipv4Addr, ports: [u16; 2]) {
    let (ea, eb) = (tb.engine(0), tb.engine(1));
    let c0 = (tb.status(0), tb.status(1));
    assert_ping(ea, "a1", ip_b, 5);
    assert_ping(eb, "b1", ip_a, 5);
    assert_transfer((ea, "a1"), ip_a, (eb, "b1"), ip_b, ports[0]);
    assert_transfer((eb, "b1"), ip_b, (ea, "a1"), ip_a, ports[1]);
    let c1 = (tb.status(0), tb.status(1));
    for (before, after, host) in [(&c0.0, &c1.0, "A"), (&c0.1, &c1.1, "B")] {
        for name in ["fwd_egress", "fwd_ingress"] {
            assert!(
                counter(after, name) - counter(before, name) >= 10,
                "host {host}: {name} did not move: the traffic bypassed xhost"
            );
        }
        assert_eq!(counter(after, "drop_spoofed"), 0, "host {host}");
    }
}

/// A container started after the agent is served within a second of its
/// start event; one removed with `docker rm -f` leaves the maps.
#[test]
fn container_started_later_is_served_within_a_second_and_forgotten_on_rm() {
    let mut tb = Testbed::new([true, true]);
    tb.engine(1)
        .run_container("bridge", None, "b1")
        .expect("run b1");
    tb.start_agents();
    let (ea, eb) = (tb.engine(0), tb.engine(1));
    let ip_b = ip_of(eb, "b1", "bridge");
    let watch = MapWatch::start(tb.agent(0));

    let since = SystemTime::now() - Duration::from_secs(1);
    let t_run = Instant::now();
    let id = ea.run_container("bridge", None, "a2").expect("run a2");
    let returned = SystemTime::now();
    let run_took = t_run.elapsed();
    let ip_a = ip_of(ea, "a2", "bridge");
    // From host B's container until the first echo reply (10 ms apart, 2 s at most).
    let out = eb
        .in_container(
            "b1",
            &[
                "ping",
                "-n",
                "-D",
                "-c",
                "1",
                "-i",
                "0.01",
                "-w",
                "2",
                &ip_a.to_string(),
            ],
        )
        .expect("ping command")
        .output()
        .expect("ping");
    let log = PingLog::parse(&String::from_utf8_lossy(&out.stdout));
    let (first_seq, first_reply) = log
        .replies
        .iter()
        .next()
        .map(|(s, t)| (*s, *t))
        .unwrap_or_else(|| {
            panic!(
                "b1 never reached a2 ({ip_a}):\n{}",
                String::from_utf8_lossy(&out.stdout)
            )
        });
    let in_map = watch
        .appeared(ip_a, SETTLE)
        .unwrap_or_else(|| panic!("{ip_a} never appeared in host A's ENDPOINTS"));
    let started = ea
        .events(
            since,
            SystemTime::now(),
            &["type=container", "event=start", &format!("container={id}")],
        )
        .expect("docker events")
        .last()
        .map(|e| e.time)
        .expect("a start event for a2");
    eprintln!(
        "a2 ({ip_a}): docker run took {run_took:?}; start event -> ENDPOINTS {:.1} ms, -> first reply from host B {:.1} ms \
         (icmp_seq {first_seq}, 10 ms apart); docker run returned -> first reply {:.1} ms",
        diff_ms(in_map, started),
        diff_ms(first_reply, started),
        diff_ms(first_reply, returned)
    );
    assert!(
        diff_ms(in_map, started) < ms(FOLLOW_BOUND),
        "a2 entered the map {:.1} ms after its start event",
        diff_ms(in_map, started)
    );
    assert!(
        diff_ms(first_reply, started) < ms(FOLLOW_BOUND),
        "a2 answered {:.1} ms after its start event",
        diff_ms(first_reply, started)
    );
    let want = ea.container_endpoint("a2", "bridge").expect("a2 endpoint");
    let s = tb
        .wait(0, "a2 in status", SETTLE, |s| {
            endpoints(s).contains_key(&ip_a)
        })
        .0;
    assert_eq!(
        endpoints(&s)[&ip_a],
        (want.mac.clone(), want.host_ifindex),
        "{want:?}"
    );
    assert_ping(ea, "a2", ip_b, 3);

    // docker rm -f: the endpoint leaves the map.
    let t_rm = Instant::now();
    ea.docker_ok(&["rm", "-f", "a2"]).expect("rm a2");
    let rm_returned = SystemTime::now();
    let rm_took = t_rm.elapsed();
    let gone = watch
        .vanished(ip_a, SETTLE)
        .unwrap_or_else(|| panic!("{ip_a} still in host A's ENDPOINTS"));
    let died = ea
        .events(
            since,
            SystemTime::now(),
            &["type=container", "event=die", &format!("container={id}")],
        )
        .expect("docker events")
        .last()
        .map(|e| e.time)
        .expect("a die event for a2");
    eprintln!(
        "a2 removed: docker rm -f took {rm_took:?}; die event -> gone from ENDPOINTS {:.1} ms (rm returned -> gone {:.1} ms)",
        diff_ms(gone, died),
        diff_ms(gone, rm_returned)
    );
    assert!(
        diff_ms(gone, died) < ms(FOLLOW_BOUND),
        "a2 left the map {:.1} ms after its die event",
        diff_ms(gone, died)
    );
    let s = tb.status(0);
    assert!(!endpoints(&s).contains_key(&ip_a), "{s}");
    assert_eq!(s["agent"]["docker"]["endpoints"], 0, "{s}");
    // Nothing pinned or listed for the vanished veth either.
    let (s, _) = tb.wait(0, "no attachment on a2's veth", SETTLE, |s| {
        !attached(s)
            .iter()
            .any(|a| a.starts_with(&format!("{}@", want.host_veth)))
    });
    assert!(
        pinned_links(&tb.agent(0).dirs)
            .iter()
            .all(|l| !l.starts_with(&format!("{}@", want.host_veth))),
        "{s}"
    );
    drop(watch);
    tb.finish();
}

/// Echo requests to a container that is not up yet wait on host A on an unresolved
/// neighbour: with no endpoint for the address, the datapath hands them to the kernel
/// (`bpf_redirect_neigh`). The agent writes the neighbour entry with the endpoint, so they
/// go as soon as the container is in the map, not at the next ARP probe it answers (the
/// kernel probes once a second). All requests are sent before the container starts: one
/// sent after would reach it on the fast path, and its reply's ARP for the gateway would
/// resolve the entry too. Without the write they went at the next probe: 164-227 ms after
/// the container entered the map in round 1 (3 runs). The two rounds wait half a second
/// apart before starting their container, so the probes fall at other offsets and cannot
/// both land within the bound. Both start it well before the third probe, after which the
/// kernel drops what waits.
#[test]
fn requests_waiting_for_a_starting_container_go_when_it_enters_the_map() {
    const BOUND: Duration = Duration::from_millis(100);
    const COUNT: u32 = 6;
    let mut tb = Testbed::new([true, true]);
    create_net2(tb.engine(0));
    // The bridge has a port, and so carrier, before the late containers come.
    tb.engine(0)
        .run_container_with(&["--network", "net2"], "keeper")
        .expect("run keeper");
    tb.engine(1)
        .run_container("bridge", None, "b1")
        .expect("run b1");
    tb.start_agents();
    let watch = MapWatch::start(tb.agent(0));
    for (round, last, lead) in [(1u8, 31u8, 400u64), (2, 32, 900)] {
        let target = Ipv4Addr::new(192, 168, 111, last);
        let name = format!("late{round}");
        // `-c` without `-w`: exactly COUNT requests, then up to `-W` for the replies.
        let (count, linger) = (COUNT.to_string(), "8");
        let mut ping = spawn_ping(
            tb.engine(1),
            "b1",
            target,
            &["-i", "0.05", "-c", &count, "-W", linger],
        );
        // All sent (6 x 50 ms) before the container starts.
        thread::sleep(Duration::from_millis(lead));
        tb.engine(0)
            .run_container_with(&["--network", "net2", "--ip", &target.to_string()], &name)
            .unwrap_or_else(|e| panic!("run {name}: {e}"));
        let in_map = watch
            .appeared(target, SETTLE)
            .unwrap_or_else(|| panic!("{target} never appeared in host A's ENDPOINTS"));
        ping.wait_timeout(Duration::from_secs(10))
            .expect("wait ping")
            .expect("ping ends once answered, or after waiting `-W`");
        let log = PingLog::parse(&ping.output());
        // (seq, ms between the container entering the map and the reply).
        let answered: Vec<(u32, f64)> = log
            .answered
            .iter()
            .map(|(seq, at)| (*seq, diff_ms(*at, in_map)))
            .collect();
        eprintln!(
            "{name} ({target}): {} requests sent, all before it entered the map; answered \
             (seq, ms after it entered the map): {answered:?}",
            log.transmitted
        );
        assert_eq!(log.transmitted, COUNT, "{}", ping.output());
        assert!(
            log.replies.values().all(|sent| *sent < in_map),
            "a request was sent after {name} entered the map:\n{}",
            ping.output()
        );
        assert_eq!(
            answered.len(),
            COUNT as usize,
            "requests that waited for {name} were lost:\n{}",
            ping.output()
        );
        assert!(
            answered.iter().all(|(_, late)| *late < ms(BOUND)),
            "requests that waited for {name} were answered later than {BOUND:?} after it \
             entered the map: {answered:?}"
        );
    }
    drop(watch);
    tb.finish();
}

/// A user network created after the agent is followed (its bridge gets
/// the program, its subnet is local, its containers reach host B), and `docker network
/// rm` takes all of it away again.
#[test]
fn user_network_is_followed_and_forgotten() {
    let mut tb = Testbed::new([true, true]);
    tb.engine(0)
        .run_container("bridge", None, "a1")
        .expect("run a1");
    tb.engine(1)
        .run_container("bridge", None, "b1")
        .expect("run b1");
    tb.start_agents();
    let (ea, eb) = (tb.engine(0), tb.engine(1));
    let (ip_a1, ip_b) = (ip_of(ea, "a1", "bridge"), ip_of(eb, "b1", "bridge"));
    let ns_a = tb.host(0).ns();

    let t = Instant::now();
    let br = create_net2(ea);
    let created = t.elapsed();
    let (s, took) = tb.wait(0, "net2 followed", SETTLE, |s| {
        attached(s).contains(&format!("{br}@bridge-ingress"))
            && local_subnets(s).contains(&NET2.to_owned())
    });
    eprintln!("net2 ({br}): created in {created:?}; followed {took:?} after that");
    assert!(took < FOLLOW_BOUND, "net2 followed only after {took:?}");
    assert!(
        s["agent"]["docker"]["networks"]
            .as_array()
            .is_some_and(|n| n
                .iter()
                .any(|n| n["name"] == "net2" && n["bridge"] == br.as_str())),
        "{s}"
    );
    let live = attached_programs(ns_a, &[&br]).expect("attachments");
    assert_eq!(
        live,
        [format!("{br} {} xhost_bridge_in", tc_hook("ingress"))]
    );

    ea.run_container("net2", Some("192.168.111.11"), "a3")
        .expect("run a3");
    let ip_a3: Ipv4Addr = "192.168.111.11".parse().expect("ip");
    let want = ea.container_endpoint("a3", "net2").expect("a3 endpoint");
    assert_eq!(want.bridge, br);
    let s = tb
        .wait(0, "a3 in ENDPOINTS", SETTLE, |s| {
            endpoints(s).contains_key(&ip_a3)
        })
        .0;
    assert_eq!(endpoints(&s)[&ip_a3], (want.mac.clone(), want.host_ifindex));
    assert_ping(eb, "b1", ip_a3, 3);
    assert_ping(ea, "a3", ip_b, 3);
    assert_transfer((ea, "a3"), ip_a3, (eb, "b1"), ip_b, 45_303);
    assert_transfer((eb, "b1"), ip_b, (ea, "a3"), ip_a3, 45_304);

    // Removal: container, then network. The program stays on the bridge while it exists.
    ea.docker_ok(&["rm", "-f", "a3"]).expect("rm a3");
    tb.wait(0, "a3 gone", SETTLE, |s| !endpoints(s).contains_key(&ip_a3));
    let live = attached_programs(ns_a, &[&br]).expect("attachments");
    assert_eq!(
        live,
        [format!("{br} {} xhost_bridge_in", tc_hook("ingress"))]
    );
    let t = Instant::now();
    ea.docker_ok(&["network", "rm", "net2"])
        .expect("docker network rm");
    let removed = t.elapsed();
    let (s, took) = tb.wait(0, "net2 forgotten", SETTLE, |s| {
        !attached(s).iter().any(|a| a.starts_with(&br))
            && !local_subnets(s).contains(&NET2.to_owned())
    });
    eprintln!("net2 removed in {removed:?}; forgotten {took:?} after that");
    assert!(took < FOLLOW_BOUND, "net2 forgotten only after {took:?}");
    // Nothing of it left: no bridge, no pinned link, no network or bridge in the agent's view.
    assert!(
        ns_a.exec(&["ip", "link", "show", &br])
            .is_ok_and(|o| !o.status.success()),
        "{br} still exists"
    );
    let links = pinned_links(&tb.agent(0).dirs);
    assert!(!links.iter().any(|l| l.contains(&br)), "{links:?}");
    assert!(
        !s["agent"]["bridges"].to_string().contains(&br)
            && !s["agent"]["docker"]["networks"]
                .to_string()
                .contains("net2"),
        "{s}"
    );
    assert_eq!(local_subnets(&s), [tb.host(0).subnet().to_string()]);
    // docker0 and its container are unaffected.
    assert!(attached(&s).contains(&"docker0@bridge-ingress".to_owned()));
    assert_ping(eb, "b1", ip_a1, 2);
    tb.finish();
}

/// An engine restart while a ping runs through it loses only what was
/// sent while the container itself was down, and the maps equal Docker's state afterwards.
#[test]
fn engine_restart_loses_only_the_containers_down_time() {
    let mut tb = Testbed::new([true, true]);
    {
        let (ea, eb) = (tb.engine(0), tb.engine(1));
        create_net2(ea);
        ea.run_container_with(
            &[
                "--restart=always",
                "--network",
                "net2",
                "--ip",
                "192.168.111.20",
            ],
            "target",
        )
        .expect("run target");
        // On the default bridge too: their addresses may swap over the restart.
        for name in ["r1", "r2"] {
            ea.run_container_with(&["--restart=always", "--network", "bridge"], name)
                .expect("run r*");
        }
        // Without a restart policy: down after the restart, must leave the map.
        ea.run_container("bridge", None, "once").expect("run once");
        eb.run_container("bridge", None, "b1").expect("run b1");
    }
    tb.start_agent(0);
    tb.start_agent(1);
    tb.wait_docker(1);
    let before = docker_state(tb.engine(0)).expect("docker state");
    assert_eq!(before.len(), 4, "{before:?}");
    tb.wait(0, "all four endpoints", SETTLE, |s| endpoints(s) == before);
    let once_ip = ip_of(tb.engine(0), "once", "bridge");
    let target: Ipv4Addr = "192.168.111.20".parse().expect("ip");

    let interval = 0.1;
    let mut ping = spawn_ping(
        tb.engine(1),
        "b1",
        target,
        &["-O", "-i", &interval.to_string()],
    );
    ping.wait_for_line(|l| l.contains("bytes from"), Duration::from_secs(5))
        .expect("ping gets through before the restart");
    thread::sleep(Duration::from_secs(1));

    let t = Instant::now();
    tb.engines[0].stop().expect("stop engine A");
    let stopped = t.elapsed();
    tb.engines[0].start().expect("start engine A");
    let up = SystemTime::now();
    eprintln!(
        "engine A: stopped in {stopped:?}, answering again {:?} later",
        tb.engine(0).last_start_time()
    );
    let ea = tb.engine(0);
    // Until the maps equal Docker's state again: restarted containers in, `once` out.
    let t = Instant::now();
    let mut last = None;
    let mut matched = None;
    while t.elapsed() < SETTLE {
        if let Some(want) = docker_state(ea).filter(|w| w.len() == 3) {
            let have = endpoints(&tb.status(0));
            if have == want {
                matched = Some(t.elapsed());
                break;
            }
            last = Some((want, have));
        }
        thread::sleep(Duration::from_millis(20));
    }
    let Some(synced) = matched else {
        panic!("host A's maps never matched Docker after the restart: (docker, maps) = {last:?}");
    };
    eprintln!("maps equal Docker's state {synced:?} after the engine answered again");
    let s = tb.status(0);
    assert_eq!(
        ea.inspect("once", "{{.State.Running}}").as_deref().ok(),
        Some("false")
    );
    eprintln!(
        "`once` ({once_ip} before) is down and out of the map: {:?}",
        endpoints(&s)
    );
    assert!(connected(&s), "{s}");
    // Let the ping run on a little with the container back.
    thread::sleep(Duration::from_secs(2));
    ping.signal(Signal::SIGINT).expect("SIGINT ping");
    ping.wait_timeout(Duration::from_secs(5))
        .expect("wait ping")
        .expect("ping exits on SIGINT");
    let log = PingLog::parse(&ping.output());

    let finished = parse_docker_time(
        &ea.inspect("target", "{{.State.FinishedAt}}")
            .expect("inspect"),
    )
    .expect("FinishedAt");
    let started = parse_docker_time(
        &ea.inspect("target", "{{.State.StartedAt}}")
            .expect("inspect"),
    )
    .expect("StartedAt");
    let (down_from, down_to) = (unix_secs(finished), unix_secs(started));
    assert!(
        down_to > down_from,
        "target restarted: {finished:?} .. {started:?}"
    );
    let times = log.send_times(interval);
    // The last request may still be in flight when ping is interrupted.
    let last_seq = log.transmitted;
    let lost: Vec<u32> = (1..last_seq)
        .filter(|s| !log.replies.contains_key(s))
        .collect();
    // Sent while the container was down, give or take one interval at each edge (the send
    // times of lost requests are estimates).
    let in_window = |t: f64| t >= down_from - interval && t <= down_to + interval;
    let sent_down = times.values().filter(|t| in_window(**t)).count();
    let lost_outside: Vec<(u32, f64)> = lost
        .iter()
        .map(|s| (*s, times[s]))
        .filter(|(_, t)| !in_window(*t))
        .collect();
    // The longest run of unanswered requests: when the path was really down (the kernel of
    // the container's namespace answers pings until its veth is gone, not only the process).
    let mut gap: Option<(u32, u32)> = None;
    let mut run: Option<(u32, u32)> = None;
    for seq in 1..last_seq {
        if log.replies.contains_key(&seq) {
            run = None;
            continue;
        }
        let r = run.map_or((seq, seq), |(a, _)| (a, seq));
        run = Some(r);
        if gap.is_none_or(|(a, b)| r.1 - r.0 > b - a) {
            gap = Some(r);
        }
    }
    let gap_ms = gap.map_or((f64::NAN, f64::NAN), |(a, b)| {
        ((times[&a] - down_from) * 1e3, (times[&b] - down_to) * 1e3)
    });
    // The first request answered that was sent after the container was back.
    let first_after = log
        .replies
        .values()
        .map(|t| unix_secs(*t))
        .find(|t| *t > down_to);
    eprintln!(
        "restart: target down {:.0} ms (FinishedAt -> StartedAt); ping every {interval} s: {} sent, {} answered, {} lost, \
         {sent_down} sent while the container was down; longest loss run {gap:?} from FinishedAt{:+.0} ms to StartedAt{:+.0} ms; \
         first answered request sent {:.0} ms after StartedAt, {:.0} ms after the engine answered; lost outside the down window: {lost_outside:?}; \
         lost (seq, sent ms after StartedAt): {:?}",
        (down_to - down_from) * 1e3,
        log.transmitted,
        log.replies.len(),
        lost.len(),
        gap_ms.0,
        gap_ms.1,
        first_after.map_or(f64::NAN, |t| (t - down_to) * 1e3),
        first_after.map_or(f64::NAN, |t| (t - unix_secs(up)) * 1e3),
        lost.iter()
            .map(|s| (*s, ((times[s] - down_to) * 1e3).round()))
            .collect::<Vec<_>>(),
    );
    assert!(log.transmitted > 20, "{}", ping.output());
    assert!(
        lost.len() <= sent_down && lost_outside.is_empty(),
        "lost {} echo requests, {sent_down} were sent while the container was down; lost outside that window: {lost_outside:?}\n{}",
        lost.len(),
        ping.output()
    );
    drop(ping);
    tb.finish();
}

/// A container's veth can go while the engine cannot say so (hung, or on its way down): the
/// agent hears it from the kernel and drops the endpoint at once, so the address falls back
/// to the bridge instead of being redirected to an interface that is gone, or reused.
#[test]
fn veth_gone_while_the_engine_hangs_leaves_the_map() {
    let mut tb = Testbed::new([true, false]);
    for name in ["a1", "a2"] {
        tb.engine(0)
            .run_container("bridge", None, name)
            .expect("run a*");
    }
    tb.start_agent(0);
    let before = docker_state(tb.engine(0)).expect("docker state");
    tb.wait(0, "both endpoints", SETTLE, |s| endpoints(s) == before);
    let ip = ip_of(tb.engine(0), "a1", "bridge");
    let ns = tb.host(0).ns();
    let veth = ns
        .link_name(before[&ip].1)
        .expect("links")
        .expect("a1's veth");

    // The engine hangs: no event, no error, its API just stops answering.
    let pid =
        Pid::from_raw(i32::try_from(tb.engine(0).pid().expect("engine A runs")).expect("pid"));
    nix::sys::signal::kill(pid, Signal::SIGSTOP).expect("SIGSTOP dockerd");
    let resume = Resume(pid);
    ns.ip(&["link", "del", &veth]).expect("delete a1's veth");
    let mut after = before.clone();
    after.remove(&ip);
    let (_, took) = tb.wait(0, "a1 out of the map", FOLLOW_BOUND, |s| {
        endpoints(s) == after
    });
    eprintln!("{veth} deleted with the engine stopped: {ip} left the map {took:?} later");
    drop(resume);
    tb.finish();
}

/// Sends SIGCONT on drop, also when a test panics: a stopped dockerd cannot be shut down.
struct Resume(Pid);

impl Drop for Resume {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(self.0, Signal::SIGCONT);
    }
}

/// An agent loaded before its engine exists stays up, reports Docker as
/// unreachable, and picks the engine up once it starts.
#[test]
fn agent_waits_for_an_engine_that_starts_later() {
    let mut tb = Testbed::new([false, true]);
    tb.engine(1)
        .run_container("bridge", None, "b1")
        .expect("run b1");
    let socket = tb.engine(0).socket();
    assert!(!socket.exists(), "{} exists already", socket.display());
    tb.start_agent(0);
    tb.start_agent(1);
    tb.wait_docker(1);
    let host = tb.engine(0).host();
    let s = tb
        .wait(0, "Docker reported unreachable", SETTLE, |s| {
            s["agent"]["docker"]["connected"] == false
        })
        .0;
    assert_eq!(s["agent"]["docker"]["host"], host.as_str(), "{s}");
    assert_eq!(attached(&s), ["ens33@underlay-ingress"], "{s}");
    // Still there a moment later, still serving the underlay.
    thread::sleep(Duration::from_millis(1500));
    assert!(
        tb.agents[0].as_mut().is_some_and(Agent::running),
        "the agent exited without an engine:\n{}",
        tb.agent(0).output()
    );
    let s = tb.status(0);
    assert!(s["agent_running"] == true && !connected(&s), "{s}");

    let t = Instant::now();
    tb.engines[0].boot().expect("start engine A");
    let booted = t.elapsed();
    let (_, took) = tb.wait(0, "the engine picked up", Duration::from_secs(15), |s| {
        connected(s) && attached(s).contains(&"docker0@bridge-ingress".to_owned())
    });
    eprintln!("engine A up in {booted:?}; the agent connected {took:?} after that");
    tb.engine(0).import_busybox().expect("import busybox");
    tb.engine(0)
        .run_container("bridge", None, "a1")
        .expect("run a1");
    let (ea, eb) = (tb.engine(0), tb.engine(1));
    let ip_a = ip_of(ea, "a1", "bridge");
    let ip_b = ip_of(eb, "b1", "bridge");
    tb.wait(0, "a1 in ENDPOINTS", FOLLOW_BOUND * 2, |s| {
        endpoints(s).contains_key(&ip_a)
    });
    assert_ping(eb, "b1", ip_a, 3);
    assert_ping(ea, "a1", ip_b, 3);
    assert_transfer((ea, "a1"), ip_a, (eb, "b1"), ip_b, 45_305);
    tb.finish();
}

/// `xhost-user export` on host A prints its `[[peer]]` entry with the
/// Docker subnets, and host B runs on exactly that as its config.
#[test]
fn exported_peer_entry_is_a_working_config() {
    let mut tb = Testbed::new([true, true]);
    {
        let (ea, eb) = (tb.engine(0), tb.engine(1));
        create_net2(ea);
        ea.run_container("bridge", None, "a1").expect("run a1");
        ea.run_container("net2", Some("192.168.111.11"), "a3")
            .expect("run a3");
        eb.run_container("bridge", None, "b1").expect("run b1");
    }
    tb.start_agent(0);
    let subnet_a = tb.host(0).subnet().to_string();
    tb.wait(0, "both Docker subnets local", SETTLE, |s| {
        let l = local_subnets(s);
        l.contains(&subnet_a) && l.contains(&NET2.to_owned())
    });
    let out = xhost(tb.host(0).ns(), &tb.agent(0).dirs, &["export"]).expect("export");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let export = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("export on host A:\n{export}");
    // The config file's shape: one [[peer]] table with host and subnets.
    let lines: Vec<&str> = export.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.first(), Some(&"[[peer]]"), "{export}");
    assert!(
        lines.contains(&format!("host = \"{}\"", tb.host(0).underlay_ip()).as_str()),
        "{export}"
    );
    let subnets: BTreeSet<String> = lines
        .iter()
        .find_map(|l| l.strip_prefix("subnets = ["))
        .and_then(|l| l.strip_suffix(']'))
        .unwrap_or_else(|| panic!("no subnets line: {export}"))
        .split(',')
        .map(|s| s.trim().trim_matches('"').to_owned())
        .collect();
    assert_eq!(
        subnets,
        BTreeSet::from([subnet_a.clone(), NET2.to_owned()]),
        "{export}"
    );

    let cfg = tb.cfg.write("b-export.toml", &export);
    tb.start_agent_with(1, &cfg);
    let s = tb.wait_docker(1);
    let peer = tb.host(0).underlay_ip().to_string();
    let r = status_routes(&s);
    for n in [&subnet_a, &NET2.to_owned()] {
        assert!(r.contains(&(n.clone(), peer.clone())), "{r:?}");
    }
    let (ea, eb) = (tb.engine(0), tb.engine(1));
    let (ip_a1, ip_b) = (ip_of(ea, "a1", "bridge"), ip_of(eb, "b1", "bridge"));
    let ip_a3: Ipv4Addr = "192.168.111.11".parse().expect("ip");
    tb.wait(0, "a1 and a3 in ENDPOINTS", SETTLE, |s| {
        let e = endpoints(s);
        e.contains_key(&ip_a1) && e.contains_key(&ip_a3)
    });
    assert_ping(eb, "b1", ip_a1, 3);
    assert_ping(eb, "b1", ip_a3, 3);
    assert_ping(ea, "a1", ip_b, 3);
    assert_ping(ea, "a3", ip_b, 3);
    tb.finish();
}

/// A test failing with everything running (engines, containers, a user
/// network, agents) still leaves nothing behind: the guards run while unwinding.
#[test]
fn testbed_leaves_nothing_behind_even_when_a_test_panics() {
    let footprint = Arc::new(Mutex::new(None));
    let fp = Arc::clone(&footprint);
    let res = catch_unwind(AssertUnwindSafe(move || {
        let mut tb = Testbed::new([true, true]);
        create_net2(tb.engine(0));
        tb.engine(0)
            .run_container_with(&["--restart=always"], "a1")
            .expect("run a1");
        tb.engine(0)
            .run_container("net2", Some("192.168.111.11"), "a3")
            .expect("run a3");
        tb.engine(1)
            .run_container("bridge", None, "b1")
            .expect("run b1");
        tb.start_agent(0);
        tb.start_agent(1);
        tb.wait(0, "a1 and a3", SETTLE, |s| endpoints(s).len() == 2);
        let f = tb.footprint();
        assert!(f.pids.len() >= 2 + 2 + 3, "{f:?}");
        *fp.lock().unwrap_or_else(PoisonError::into_inner) = Some(f);
        panic!("deliberate failure with everything running");
    }));
    assert!(res.is_err(), "the closure must panic");
    let f = footprint
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take()
        .expect("footprint recorded before the panic");
    eprintln!(
        "checking {} namespaces, {} directories, {} processes",
        f.netns.len(),
        f.dirs.len(),
        f.pids.len()
    );
    f.assert_gone();
}

/// Measurement: start-event -> ENDPOINTS latency over 100 container starts (batches of 4),
/// the agent's resident memory with them running, and die-event -> removal latency.
#[test]
fn event_to_map_latency_and_memory_over_100_starts() {
    const N: usize = 100;
    const BATCH: usize = 4;
    let mut tb = Testbed::new([true, false]);
    tb.start_agent(0);
    tb.wait_docker(0);
    let ea = tb.engine(0);
    let agent_pid = tb.agent(0).pid();
    let rss_idle = vm_rss_kib(agent_pid).expect("VmRSS");
    let watch = MapWatch::start(tb.agent(0));

    let events = ea
        .follow_events(
            SystemTime::now() - Duration::from_secs(1),
            &["type=container", "event=start", "event=die"],
        )
        .expect("docker events");
    // Waits until the follower printed `n` events with `action`.
    let collect = |action: &str, n: usize| {
        let t0 = Instant::now();
        loop {
            let evs: Vec<docker_engine::Event> = docker_engine::Event::parse_all(&events.output())
                .into_iter()
                .filter(|e| e.action == action)
                .collect();
            if evs.len() >= n || t0.elapsed() > SETTLE {
                return evs;
            }
            thread::sleep(Duration::from_millis(20));
        }
    };
    let t = Instant::now();
    let returned = run_batches(ea, "lat", N, BATCH);
    let run_took = t.elapsed();
    let names: Vec<&str> = returned.keys().map(String::as_str).collect();
    let mut args = vec![
        "inspect",
        "-f",
        "{{.Name}} {{.Id}} {{.NetworkSettings.IPAddress}}",
    ];
    args.extend(&names);
    let inspected = ea.docker_ok(&args).expect("inspect");
    // name -> (id, ip)
    let ctrs: BTreeMap<String, (String, Ipv4Addr)> = inspected
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let name = w.next()?.trim_start_matches('/').to_owned();
            Some((name, (w.next()?.to_owned(), w.next()?.parse().ok()?)))
        })
        .collect();
    assert_eq!(ctrs.len(), N, "{inspected}");
    let by_id: BTreeMap<&str, Ipv4Addr> =
        ctrs.values().map(|(id, ip)| (id.as_str(), *ip)).collect();
    let starts = collect("start", N);
    let mut lat = Vec::new();
    let mut from_return = Vec::new();
    for (name, (id, ip)) in &ctrs {
        let ev = starts
            .iter()
            .find(|e| e.id == *id)
            .unwrap_or_else(|| panic!("no start event for {name}"));
        let seen = watch
            .appeared(*ip, SETTLE)
            .unwrap_or_else(|| panic!("{name} ({ip}) never entered ENDPOINTS"));
        lat.push(diff_ms(seen, ev.time));
        from_return.push(diff_ms(seen, returned[name]));
    }
    let rss_full = vm_rss_kib(agent_pid).expect("VmRSS");
    let s = tb.status(0);
    assert_eq!(endpoints(&s).len(), N, "status lists every container");
    lat.sort_by(f64::total_cmp);
    from_return.sort_by(f64::total_cmp);

    let t = Instant::now();
    let mut rm = vec!["rm", "-f"];
    rm.extend(&names);
    ea.docker_ok(&rm).expect("docker rm -f");
    let rm_took = t.elapsed();
    let dies = collect("die", N);
    let mut gone_lat = Vec::new();
    for ev in &dies {
        let Some(ip) = by_id.get(ev.id.as_str()) else {
            continue;
        };
        let gone = watch
            .vanished(*ip, SETTLE)
            .unwrap_or_else(|| panic!("{ip} still in ENDPOINTS"));
        gone_lat.push(diff_ms(gone, ev.time));
    }
    assert_eq!(gone_lat.len(), N);
    gone_lat.sort_by(f64::total_cmp);
    tb.wait(0, "all endpoints removed", SETTLE, |s| {
        endpoints(s).is_empty()
    });
    drop(events);
    let rss_after = vm_rss_kib(agent_pid).expect("VmRSS");
    drop(watch);

    eprintln!(
        "\n== {N} container starts (batches of {BATCH}, docker run total {run_took:?}) ==\n\
         start event -> ENDPOINTS entry: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms, min {:.1} ms\n\
         docker run returned -> ENDPOINTS entry: p50 {:.1} ms, p99 {:.1} ms\n\
         die event -> entry removed (docker rm -f of all {N} took {rm_took:?}): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms\n\
         agent VmRSS: {rss_idle} KiB idle, {rss_full} KiB with {N} containers, {rss_after} KiB after removing them\n",
        quantile(&lat, 0.5),
        quantile(&lat, 0.99),
        quantile(&lat, 1.0),
        quantile(&lat, 0.0),
        quantile(&from_return, 0.5),
        quantile(&from_return, 0.99),
        quantile(&gone_lat, 0.5),
        quantile(&gone_lat, 0.99),
        quantile(&gone_lat, 1.0),
    );
    assert!(
        quantile(&lat, 0.99) < ms(FOLLOW_BOUND),
        "p99 start -> map {:.1} ms",
        quantile(&lat, 0.99)
    );
    // A bulk removal keeps the engine busy for seconds; the agent must not wait for it
    // (it did: p50 3.3-4 s when it re-inspected each dead container and published per
    // batch). Measured since: 85-263 ms; the bound leaves room for a loaded 2-CPU
    // machine (1.1 s seen while a benchmark ran alongside) and still catches that bug.
    assert!(
        quantile(&gone_lat, 0.5) < 2.0 * ms(FOLLOW_BOUND),
        "p50 die -> removal {:.1} ms",
        quantile(&gone_lat, 0.5)
    );
    tb.finish();
}

/// VXLAN mode with real engines: the same config with `tunnel = "vxlan"`; Docker's
/// containers (MTU 1500, Docker's default) reach each other through `xhost_vxlan` on
/// both hosts, TCP learning the tunnel's MTU from the kernel's frag-needed, and the
/// datapath's counters account for the traffic.
#[test]
fn vxlan_mode_serves_docker_containers() {
    let mut tb = Testbed::new([true, true]);
    let (ea, eb) = (tb.engine(0), tb.engine(1));
    ea.run_container("bridge", None, "a1").expect("run a1");
    eb.run_container("bridge", None, "b1").expect("run b1");
    let (ip_a, ip_b) = (ip_of(ea, "a1", "bridge"), ip_of(eb, "b1", "bridge"));
    for i in 0..2 {
        let plain = std::fs::read_to_string(tb.config(i)).expect("read config");
        let tunnelled = tb.cfg.write(
            ["a-vxlan.toml", "b-vxlan.toml"][i],
            &format!("tunnel = \"vxlan\"\n{plain}"),
        );
        tb.start_agent_with(i, &tunnelled);
    }
    for (i, ip) in [(0, ip_a), (1, ip_b)] {
        let (s, _) = tb.wait(i, "the container in ENDPOINTS", SETTLE, |s| {
            connected(s) && endpoints(s).contains_key(&ip)
        });
        let att = attached(&s);
        for want in ["xhost_vxlan@tunnel-ingress", "xhost_vxlan@tunnel-egress"] {
            assert!(att.iter().any(|a| a == want), "{want} not in {att:?}");
        }
        assert_eq!(s["agent"]["tunnel"]["mtu"], 1450, "{s}");
    }
    assert_both_ways_through_xhost(&tb, ip_a, ip_b, [45_311, 45_312]);
    tb.finish();
}

// --- IPv6 ------------------------------------------------------------------------------------

/// Each host's dual-stack user network (`docker network create --ipv6`): its IPv4 and IPv6
/// subnets. The IPv4 ones are not docker0's (`--bip`), which Docker refuses as overlapping.
const DUAL_NETS: [(&str, &str); 2] = [
    ("192.168.112.0/24", "fd00:110::/64"),
    ("192.168.222.0/24", "fd00:220::/64"),
];
const DUAL: &str = "dual";

/// `.NetworkSettings.Networks[network].<field>` of a container, parsed as IPv6.
fn ipv6_field(engine: &Engine, container: &str, network: &str, field: &str) -> Ipv6Addr {
    let fmt = format!("{{{{(index .NetworkSettings.Networks \"{network}\").{field}}}}}");
    let out = engine.inspect(container, &fmt).expect("docker inspect");
    out.parse()
        .unwrap_or_else(|_| panic!("{container} on {network}: {field} is {out:?}"))
}

/// IPv6 address -> (MAC, ifindex) of the pinned ENDPOINTS6 map.
fn endpoints6(s: &Value) -> BTreeMap<Ipv6Addr, (String, u32)> {
    endpoints_of(s, "endpoints6")
}

/// `LOCAL_NETS6` as (prefix, bridge ifindex).
fn local_subnets6(s: &Value) -> Vec<(String, u64)> {
    s["local_subnets6"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| {
            Some((
                l["prefix"].as_str()?.to_owned(),
                l["bridge_ifindex"].as_u64()?,
            ))
        })
        .collect()
}

fn counter_bytes(s: &Value, name: &str) -> u64 {
    s["counters"][name]["bytes"]
        .as_u64()
        .unwrap_or_else(|| panic!("counter {name} in {s}"))
}

/// Waits until `show` (an `ip -6 addr show ... tentative` listing) is empty: duplicate
/// address detection is over. Panics on a failed DAD or after `SETTLE`.
#[track_caller]
fn wait_dad_done(what: &str, mut show: impl FnMut() -> String) -> Duration {
    let t0 = Instant::now();
    loop {
        let out = show();
        assert!(!out.contains("dadfailed"), "{what}: DAD failed: {out}");
        if out.trim().is_empty() {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < SETTLE,
            "{what}: addresses still tentative after {SETTLE:?}: {out}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// Packets through ip6tables' FORWARD chain of `ns` (its policy's and its rules'), from
/// `ip6tables-save -c`.
fn ip6_forward_packets(ns: &xhost_tests::NetNs) -> u64 {
    let out = ns.run(&["ip6tables-save", "-c", "-t", "filter"]);
    out.lines()
        .filter(|l| l.starts_with(":FORWARD ") || l.contains("] -A FORWARD "))
        .filter_map(|l| {
            let (_, rest) = l.split_once('[')?;
            let (packets, _) = rest.split_once(':')?;
            packets.parse::<u64>().ok()
        })
        .sum()
}

/// `conntrack -L -f ipv6` of `ns`: the entries whose original direction is `src -> dst`.
fn conntrack6(ns: &xhost_tests::NetNs, src: Ipv6Addr, dst: Ipv6Addr) -> Vec<String> {
    ns.run(&["conntrack", "-L", "-f", "ipv6"])
        .lines()
        .filter(|l| l.contains(&format!("src={src} dst={dst} ")))
        .map(str::to_owned)
        .collect()
}

/// A container on host `i`'s dual-stack network (`DUAL_NETS[i]`).
struct DualCtr {
    name: &'static str,
    ep: docker_engine::ContainerEndpoint,
    ip6: Ipv6Addr,
    /// The network's IPv6 gateway: the bridge's address.
    gw6: Ipv6Addr,
    bridge: String,
    v6: &'static str,
}

/// IPv6 between Docker's dual-stack user networks on two real engines, native routing:
/// each agent learns its network's IPv6 subnet and its container's IPv6 address from
/// Docker, and routes the other host's IPv6 subnet given with `--peer HOST=V4,V6`.
/// `status` shows `endpoints6` and `routes6`; ping6 and checksummed TCP go both ways
/// with the sender's container address kept, through the datapath (`fwd_egress6` and
/// `fwd_ingress6` move by at least what was sent), not the kernel's forwarding (no
/// ip6tables FORWARD packet, no IPv6 conntrack entry, though a rule makes conntrack track
/// IPv6 in the hosts); when host A's kernel loses the peer's neighbour entry the agent
/// has it resolved again and the datapath forwards on; a hop limit of 1 is answered
/// with time exceeded by host A.
///
/// One scenario (two engines take long to start), in named steps that each
/// check one behaviour on the state the steps before it left.
#[test]
fn dual_stack_networks_carry_ipv6_both_ways_with_the_source_kept() {
    dual_stack_ipv6(Mode::Native);
}

/// The same in VXLAN mode: IPv6 over the IPv4 underlay, encapsulated and
/// decapsulated by the datapath (`fwd_egress6`, `fwd_ingress6` move by what was sent),
/// the kernel route of the peer's IPv6 subnet into `xhost_vxlan`, whose Packet Too Big
/// teaches TCP the tunnel's MTU. The peer hosts' neighbour entries are not checked:
/// once encapsulated the packet is IPv4, and `bpf_redirect_neigh` resolves the peer.
/// Nor is conntrack: the segments too big for the tunnel are the kernel's (which
/// answers them), and its conntrack sees them before it does.
#[test]
fn dual_stack_networks_carry_ipv6_over_vxlan() {
    dual_stack_ipv6(Mode::Vxlan);
}

/// The same, native routing over an IPv6 underlay: each host has an IPv6
/// address on the underlay too, and the peer's IPv6 subnet is given behind
/// that address (`--peer [fd00:91::132]=fd00:220::/64`, its IPv4 subnet
/// behind the IPv4 one). The datapath's next hop is the `AF_INET6` FIB's,
/// its first packets resolve the peer's NDP entry (`bpf_redirect_neigh`),
/// and the kernel route goes via the peer's IPv6 address; `status` counts
/// the traffic under that address.
#[test]
fn dual_stack_networks_carry_ipv6_over_an_ipv6_underlay() {
    dual_stack_ipv6(Mode::Ipv6Underlay);
}

/// The same in VXLAN mode over an IPv6 underlay: the vxlan device sends the
/// packets with IPv6 outer headers to the peer's IPv6 address (the datapath
/// keys it), the other host's datapath takes them from the device only from
/// that address (`PEER_HOSTS6`): `status` counts both ways under it. The
/// kernel route into `xhost_vxlan` has the MTU the larger outer headers
/// leave (1430), whose Packet Too Big teaches TCP.
#[test]
fn dual_stack_networks_carry_ipv6_over_vxlan_on_an_ipv6_underlay() {
    dual_stack_ipv6(Mode::VxlanIpv6Underlay);
}

/// How the dual-stack scenario reaches the peer host.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Native routing, the peer host's IPv4 address.
    Native,
    /// VXLAN mode (the IPv4 underlay).
    Vxlan,
    /// Native routing, the peer host's IPv6 address ([`underlay_ip6`]).
    Ipv6Underlay,
    /// VXLAN mode, the peer host's IPv6 address.
    VxlanIpv6Underlay,
}

impl Mode {
    fn vxlan(self) -> bool {
        matches!(self, Mode::Vxlan | Mode::VxlanIpv6Underlay)
    }

    fn ipv6_underlay(self) -> bool {
        matches!(self, Mode::Ipv6Underlay | Mode::VxlanIpv6Underlay)
    }
}

/// Host `i`'s IPv6 address on the underlay (`Mode::Ipv6Underlay`).
fn underlay_ip6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x91, 0, 0, 0, 0, 0, [0x131, 0x132][i])
}

/// The peer host's address `ROUTES6` holds for its IPv6 subnet.
fn peer6_host(tb: &Testbed, mode: Mode, i: usize) -> String {
    if mode.ipv6_underlay() {
        underlay_ip6(i).to_string()
    } else {
        tb.host(i).underlay_ip().to_string()
    }
}

/// The dual-stack scenario in `mode`.
fn dual_stack_ipv6(mode: Mode) {
    let t_test = Instant::now();
    let mut tb = Testbed::new([true, true]);
    let ctr = [0, 1].map(|i| dual_stack_container(&tb, i));
    let has_conntrack = hosts_track_ipv6(&tb, &ctr[0]);
    if mode.ipv6_underlay() {
        for i in 0..2 {
            let h = tb.host(i);
            let addr = format!("{}/64", underlay_ip6(i));
            h.ns().run(&[
                "ip",
                "-6",
                "addr",
                "add",
                &addr,
                "dev",
                h.underlay_iface(),
                "nodad",
            ]);
        }
    }
    for i in 0..2 {
        let peer = tb.host(1 - i);
        let (v4, v6) = DUAL_NETS[1 - i];
        let peers = if mode.ipv6_underlay() {
            vec![
                format!("{}={v4}", peer.underlay_ip()),
                format!("[{}]={v6}", underlay_ip6(1 - i)),
            ]
        } else {
            vec![format!("{}={v4},{v6}", peer.underlay_ip())]
        };
        let mut args: Vec<&str> = peers.iter().flat_map(|p| ["--peer", p.as_str()]).collect();
        if mode.vxlan() {
            args.extend(["--tunnel", "vxlan"]);
        }
        tb.start_agent_args(i, &args);
    }
    let vxlan = mode.vxlan();
    agents_map_docker_ipv6_and_the_peer_flag(&tb, &ctr, mode);
    if mode == Mode::Native {
        agents_resolve_the_peer_hosts(&tb);
    }
    let fwd0 = ip6_forward_packets_ab(&tb);
    ping6_goes_both_ways_through_the_datapath(&tb, &ctr);
    tcp6_goes_both_ways_with_the_source_kept(&tb, &ctr);
    assert_eq!(
        ip6_forward_packets_ab(&tb),
        fwd0,
        "ip6tables FORWARD packets (A, B) moved"
    );
    if has_conntrack && !vxlan {
        no_ipv6_conntrack_entry_for_the_flows(&tb, &ctr);
    }
    match mode {
        Mode::Native => a_lost_peer_neighbour_is_resolved_again(&tb, &ctr),
        Mode::Ipv6Underlay | Mode::VxlanIpv6Underlay => {
            the_ipv6_peer_host_is_resolved_and_counted(&tb);
        }
        Mode::Vxlan => {}
    }
    hop_limit_1_is_answered_by_host_a(&tb, &ctr);
    tb.finish();
    eprintln!("test took {:?}", t_test.elapsed());
}

/// Host `i`'s dual-stack network and a container on it, its addresses past DAD;
/// the host forwards IPv6 and counts (and conntrack tracks) what its kernel forwards.
fn dual_stack_container(tb: &Testbed, i: usize) -> DualCtr {
    let ns = tb.host(i).ns();
    // The kernel forwards IPv6 (what the datapath leaves to it, and its time
    // exceeded) only with forwarding on; the bridge's NDP entries need IPv6 on.
    ns.sysctl("net.ipv6.conf.all.forwarding", "1")
        .expect("IPv6 forwarding");
    assert_eq!(
        ns.sysctl_get("net.ipv6.conf.all.disable_ipv6")
            .expect("sysctl"),
        "0",
        "IPv6 disabled in {}",
        tb.host(i).name()
    );
    // Docker 20.10 writes no ip6tables rules. This one accepts what the policy
    // would, counts the kernel's IPv6 forwarding, and makes conntrack track IPv6
    // in the namespace, so that an entry would show if the kernel saw the flows.
    ns.run(&[
        "ip6tables",
        "-w",
        "-A",
        "FORWARD",
        "-m",
        "conntrack",
        "--ctstate",
        "NEW,ESTABLISHED,RELATED,INVALID",
        "-j",
        "ACCEPT",
    ]);
    let e = tb.engine(i);
    let (v4, v6) = DUAL_NETS[i];
    let id = e
        .docker_ok(&[
            "network", "create", "--ipv6", "--subnet", v4, "--subnet", v6, DUAL,
        ])
        .expect("docker network create --ipv6");
    let bridge = format!("br-{}", &id[..12]);
    let name = ["a1", "b1"][i];
    e.run_container(DUAL, None, name).expect("docker run");
    let ep = e.container_endpoint(name, DUAL).expect("endpoint");
    assert_eq!(ep.bridge, bridge, "{ep:?}");
    let ip6 = ipv6_field(e, name, DUAL, "GlobalIPv6Address");
    let gw6 = ipv6_field(e, name, DUAL, "IPv6Gateway");
    let net6: ipnet::Ipv6Net = v6.parse().expect("v6 subnet");
    assert!(net6.contains(&ip6) && net6.contains(&gw6), "{ip6} {gw6}");
    // Duplicate address detection: the bridge (the gateway) and the container's
    // eth0 answer neighbour solicitations only once it is over.
    let dad_bridge = wait_dad_done(&bridge, || {
        ns.run(&["ip", "-6", "addr", "show", "dev", &bridge, "tentative"])
    });
    let dad_ctr = wait_dad_done(name, || {
        let c = e
            .in_container(name, &["ip", "-6", "addr", "show", "tentative"])
            .expect("nsenter");
        cmd_stdout(c)
    });
    eprintln!(
        "{name}: {} and {ip6} (gateway {gw6}) on {bridge}, ifindex {}; DAD over after {dad_bridge:?} (bridge), {dad_ctr:?} (container)",
        ep.ip, ep.host_ifindex
    );
    DualCtr {
        name,
        ep,
        ip6,
        gw6,
        bridge,
        v6,
    }
}

/// IPv6 conntrack is on in the hosts: host A's own ping6 to a1 leaves an entry.
/// False (and said) where conntrack-tools are missing: the conntrack checks are
/// skipped then.
fn hosts_track_ipv6(tb: &Testbed, a1: &DualCtr) -> bool {
    let has_conntrack = [
        "/usr/sbin/conntrack",
        "/usr/bin/conntrack",
        "/sbin/conntrack",
    ]
    .iter()
    .any(|p| Path::new(p).is_file());
    let p = tb
        .host(0)
        .ns()
        .run(&["ping", "-n", "-c", "1", "-W", "2", &a1.ip6.to_string()]);
    assert!(p.contains(" 1 received"), "host A -> a1: {p}");
    if has_conntrack {
        assert!(
            !conntrack6(tb.host(0).ns(), a1.gw6, a1.ip6).is_empty(),
            "IPv6 conntrack is not tracking in host A: {}",
            tb.host(0).ns().run(&["conntrack", "-L", "-f", "ipv6"])
        );
    } else {
        eprintln!("conntrack-tools missing: the conntrack checks are skipped");
    }
    has_conntrack
}

/// Each agent holds its container in `ENDPOINTS6` (MAC, host veth) and its network's
/// IPv6 subnet in `LOCAL_NETS6` from Docker, and the peer's IPv6 subnet of
/// `--peer HOST=V4,V6` in `ROUTES6` (its IPv4 one in `ROUTES`) and the kernel (on
/// the underlay, into `xhost_vxlan` in VXLAN mode, via the peer's IPv6 address over
/// an IPv6 underlay).
fn agents_map_docker_ipv6_and_the_peer_flag(tb: &Testbed, ctr: &[DualCtr; 2], mode: Mode) {
    for (i, c) in ctr.iter().enumerate() {
        let peer = tb.host(1 - i);
        let want_route = format!("{} via {}", DUAL_NETS[1 - i].1, peer6_host(tb, mode, 1 - i));
        let bridge_ifindex = u64::from(tb.host(i).ns().ifindex(&c.bridge).expect("bridge ifindex"));
        let (s, took) = tb.wait(i, "the container in ENDPOINTS6", SETTLE, |s| {
            connected(s)
                && endpoints6(s).contains_key(&c.ip6)
                && endpoints(s).contains_key(&c.ep.ip)
                && status_routes6(s) == [want_route.clone()]
        });
        eprintln!(
            "host {i}: {}'s IPv6 endpoint in the map {took:?} after `ready`",
            c.name
        );
        assert_eq!(
            endpoints6(&s)[&c.ip6],
            (c.ep.mac.clone(), c.ep.host_ifindex),
            "{}'s ENDPOINTS6 entry: its MAC and host veth ({:?})",
            c.name,
            c.ep
        );
        assert!(
            local_subnets6(&s).contains(&(c.v6.to_owned(), bridge_ifindex)),
            "{} on {} ({bridge_ifindex}) not in local_subnets6: {s}",
            c.v6,
            c.bridge
        );
        assert!(
            status_routes(&s).contains(&(
                DUAL_NETS[1 - i].0.to_owned(),
                peer.underlay_ip().to_string()
            )),
            "the IPv4 subnet of the same --peer: {s}"
        );
        let kernel = tb
            .host(i)
            .ns()
            .run(&["ip", "-6", "route", "show", "proto", "177"]);
        let underlay = tb.host(i).underlay_iface();
        let want = match mode {
            Mode::Native => format!("{} dev {underlay}", DUAL_NETS[1 - i].1),
            Mode::Vxlan => format!("{} dev xhost_vxlan", DUAL_NETS[1 - i].1),
            Mode::Ipv6Underlay => format!(
                "{} via {} dev {underlay}",
                DUAL_NETS[1 - i].1,
                underlay_ip6(1 - i)
            ),
            Mode::VxlanIpv6Underlay => format!("{} dev xhost_vxlan", DUAL_NETS[1 - i].1),
        };
        if mode == Mode::VxlanIpv6Underlay {
            assert!(
                kernel.contains(" mtu lock 1430 "),
                "the route's MTU leaves room for IPv6 outer headers: {kernel:?}"
            );
        }
        assert!(
            kernel.starts_with(&want),
            "the kernel route of the peer's IPv6 subnet: {kernel:?}, want {want:?}"
        );
    }
}

/// The datapath forwards IPv6 to a peer once the peer host's IPv4 neighbour is
/// resolved (the next hop is IPv4; `pass_fib6` before): the agent asks the kernel to
/// resolve it, as no IPv6 packet the kernel forwards would.
fn agents_resolve_the_peer_hosts(tb: &Testbed) {
    for i in 0..2 {
        let (ns, dev) = (tb.host(i).ns(), tb.host(i).underlay_iface());
        let peer = tb.host(1 - i).underlay_ip().to_string();
        let t0 = Instant::now();
        loop {
            let n = ns.run(&["ip", "-4", "neigh", "show", &peer, "dev", dev]);
            if n.contains("lladdr") {
                eprintln!("host {i}: {} {:?} after the routes", n.trim(), t0.elapsed());
                break;
            }
            assert!(
                t0.elapsed() < SETTLE,
                "host {i}: peer {peer} not resolved on {dev}: {n:?}"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Packets through ip6tables' FORWARD chain of host A and of host B.
fn ip6_forward_packets_ab(tb: &Testbed) -> [u64; 2] {
    [0, 1].map(|i| ip6_forward_packets(tb.host(i).ns()))
}

/// ping6 both ways, from cold (nothing has crossed the underlay yet): all answered,
/// from the other container's own address, and `fwd_egress6`/`fwd_ingress6` of both
/// hosts moved by at least the requests and replies each way carried.
fn ping6_goes_both_ways_through_the_datapath(tb: &Testbed, ctr: &[DualCtr; 2]) {
    let (ea, eb) = (tb.engine(0), tb.engine(1));
    let (ip_a6, ip_b6) = (ctr[0].ip6, ctr[1].ip6);
    let c0 = (tb.status(0), tb.status(1));
    let pings = 5;
    let t = Instant::now();
    let p_ab = ea.ping_from("a1", ip_b6, pings).expect("ping6");
    let counters = |i: usize| tb.status(i)["counters"].to_string();
    assert!(
        p_ab.all_received(),
        "a1 -> b1 {ip_b6}: {p_ab:?}\nA: {}\nB: {}",
        counters(0),
        counters(1)
    );
    let p_ba = eb.ping_from("b1", ip_a6, pings).expect("ping6");
    assert!(
        p_ba.all_received(),
        "b1 -> a1 {ip_a6}: {p_ba:?}\nA: {}\nB: {}",
        counters(0),
        counters(1)
    );
    // The replies come from the other container's own address.
    assert!(
        p_ab.output.contains(&format!("from {ip_b6}: icmp_seq=")),
        "{}",
        p_ab.output
    );
    assert!(
        p_ba.output.contains(&format!("from {ip_a6}: icmp_seq=")),
        "{}",
        p_ba.output
    );
    eprintln!(
        "ping6 a1 -> b1 {}/{} (avg {:?} ms), b1 -> a1 {}/{} (avg {:?} ms), {:?}",
        p_ab.received,
        p_ab.transmitted,
        p_ab.rtt_avg_ms,
        p_ba.received,
        p_ba.transmitted,
        p_ba.rtt_avg_ms,
        t.elapsed()
    );
    let c1 = (tb.status(0), tb.status(1));
    // Each way carried both pings' requests or replies.
    let sent = u64::from(p_ab.transmitted + p_ba.transmitted);
    for (before, after, host) in [(&c0.0, &c1.0, "A"), (&c0.1, &c1.1, "B")] {
        for name in ["fwd_egress6", "fwd_ingress6"] {
            let d = counter(after, name) - counter(before, name);
            eprintln!("host {host}: {name} +{d} over the pings");
            assert!(
                d >= sent,
                "host {host}: {name} moved {d} < {sent} packets sent: the pings bypassed xhost\n{after}"
            );
        }
    }
}

/// TCP both ways, 8 MiB each, checksummed: intact, the receiver sees the sender's
/// container address, `fwd_egress6`/`fwd_ingress6` of both hosts moved by at least
/// the bytes sent, and nothing was dropped as spoofed or on a failed redirect.
fn tcp6_goes_both_ways_with_the_source_kept(tb: &Testbed, ctr: &[DualCtr; 2]) {
    let (ea, eb) = (tb.engine(0), tb.engine(1));
    let (ip_a6, ip_b6) = (ctr[0].ip6, ctr[1].ip6);
    let c1 = (tb.status(0), tb.status(1));
    let bytes = 8u64 << 20;
    for (from, from_ip, to, to_ip, port) in [
        ((ea, "a1"), ip_a6, (eb, "b1"), ip_b6, 45_361),
        ((eb, "b1"), ip_b6, (ea, "a1"), ip_a6, 45_362),
    ] {
        let opts = TransferOpts {
            port,
            bytes,
            ..TransferOpts::default()
        };
        let t =
            docker_engine::tcp_transfer(from, to, to_ip, &opts).expect("tcp transfer over IPv6");
        assert!(t.intact(), "payload corrupted {from_ip} -> {to_ip}: {t:?}");
        assert_eq!(
            t.source_ip(),
            IpAddr::V6(from_ip),
            "the receiver must see the sender's container IPv6 address"
        );
        eprintln!(
            "tcp [{from_ip}] -> [{to_ip}]: {} bytes intact (sha256 {}), {:.0} Mbit/s, receiver saw {}",
            t.received.bytes,
            &t.received.checksum[..16],
            t.mbit_per_s(),
            t.received.peer
        );
    }
    let c2 = (tb.status(0), tb.status(1));
    for (before, after, host) in [(&c1.0, &c2.0, "A"), (&c1.1, &c2.1, "B")] {
        for name in ["fwd_egress6", "fwd_ingress6"] {
            let d = counter_bytes(after, name) - counter_bytes(before, name);
            eprintln!(
                "host {host}: {name} +{} packets, +{d} bytes over the transfers",
                counter(after, name) - counter(before, name)
            );
            assert!(
                d >= bytes,
                "host {host}: {name} moved {d} bytes < {bytes} sent each way\n{after}"
            );
        }
        for name in ["drop_spoofed6", "drop_spoofed_local6", "drop_redirect"] {
            assert_eq!(counter(after, name), 0, "host {host}: {name}\n{after}");
        }
        eprintln!(
            "host {host}: pass_fib6 {}, pass_control6 {}, pass_not_ours6 {}",
            counter(after, "pass_fib6"),
            counter(after, "pass_control6"),
            counter(after, "pass_not_ours6")
        );
    }
}

/// Neither host's conntrack holds an entry of the containers' flows, either way.
fn no_ipv6_conntrack_entry_for_the_flows(tb: &Testbed, ctr: &[DualCtr; 2]) {
    let (ip_a6, ip_b6) = (ctr[0].ip6, ctr[1].ip6);
    for i in 0..2 {
        for (s, d) in [(ip_a6, ip_b6), (ip_b6, ip_a6)] {
            let ct = conntrack6(tb.host(i).ns(), s, d);
            assert!(
                ct.is_empty(),
                "conntrack on {} holds {s} -> {d}: {ct:?}",
                tb.host(i).role()
            );
        }
    }
}

/// The kernel loses host A's entry for peer B (garbage collection, `ip neigh del`, a
/// flush) while only IPv6 flows: no IPv6 packet would make the kernel resolve it again,
/// the agent asks (it follows neighbour deletions). The datapath forwards again
/// (`fwd_egress6` moves by every ping) and hands nothing more to the kernel for want of
/// a neighbour (`pass_fib6` stays).
fn a_lost_peer_neighbour_is_resolved_again(tb: &Testbed, ctr: &[DualCtr; 2]) {
    let (ea, ip_b6, pings) = (tb.engine(0), ctr[1].ip6, 5);
    let (ns_a, dev_a) = (tb.host(0).ns(), tb.host(0).underlay_iface());
    let peer_b = tb.host(1).underlay_ip().to_string();
    let moved =
        |before: &Value, after: &Value, name: &str| counter(after, name) - counter(before, name);
    for round in 0..2 {
        let before = tb.status(0);
        ns_a.run(&["ip", "-4", "neigh", "del", &peer_b, "dev", dev_a]);
        let t0 = Instant::now();
        loop {
            let n = ns_a.run(&["ip", "-4", "neigh", "show", &peer_b, "dev", dev_a]);
            if n.contains("lladdr") {
                eprintln!(
                    "host A, deletion {round}: {} {:?} after `ip neigh del`",
                    n.trim(),
                    t0.elapsed()
                );
                break;
            }
            assert!(
                t0.elapsed() < SETTLE,
                "host A: peer {peer_b} not resolved again after its entry was deleted: {n:?}"
            );
            thread::sleep(Duration::from_millis(20));
        }
        let p = ea.ping_from("a1", ip_b6, pings).expect("ping6");
        assert!(p.all_received(), "a1 -> b1 after the deletion: {p:?}");
        let after = tb.status(0);
        let fwd = moved(&before, &after, "fwd_egress6");
        let fib = moved(&before, &after, "pass_fib6");
        eprintln!("host A, deletion {round}: fwd_egress6 +{fwd}, pass_fib6 +{fib}");
        assert!(
            fwd >= u64::from(p.transmitted),
            "host A: fwd_egress6 +{fwd} < {} pings after the deletion\n{after}",
            p.transmitted
        );
        assert_eq!(fib, 0, "host A: pass_fib6 grew after the deletion\n{after}");
    }
}

/// Over an IPv6 underlay: the first packets had the kernel resolve the peer host's
/// IPv6 address (`bpf_redirect_neigh`, or the vxlan device; the agent asks for none), and
/// `status` counts what went to and came from each peer host under its IPv6
/// address: at least the pings and transfers either way.
fn the_ipv6_peer_host_is_resolved_and_counted(tb: &Testbed) {
    for i in 0..2 {
        let (ns, dev) = (tb.host(i).ns(), tb.host(i).underlay_iface());
        let peer = underlay_ip6(1 - i).to_string();
        let n = ns.run(&["ip", "-6", "neigh", "show", &peer, "dev", dev]);
        assert!(
            n.contains("lladdr"),
            "host {i}: peer {peer} not resolved: {n:?}"
        );
        let s = tb.status(i);
        let row = s["peer_counters"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["peer"].as_str() == Some(peer.as_str()))
            .unwrap_or_else(|| panic!("host {i}: no counters of peer {peer}: {s}"));
        for dir in ["tx", "rx"] {
            let bytes = row[dir]["bytes"].as_u64().unwrap_or(0);
            assert!(
                bytes >= 8 << 20,
                "host {i}: peer {peer} {dir} {bytes} bytes < the 8 MiB transfer: {row}"
            );
        }
        eprintln!("host {i}: {} ; peer {peer}: {row}", n.trim());
    }
}

/// Hop limit 1: the datapath leaves it to host A's kernel (`pass_hop_limit6`), which
/// answers time exceeded from the gateway (its address on a1's network). ICMPv6
/// errors are rate-limited (1 s), so an attempt is retried after that.
fn hop_limit_1_is_answered_by_host_a(tb: &Testbed, ctr: &[DualCtr; 2]) {
    let (a1, ip_b6) = (&ctr[0], ctr[1].ip6);
    let hl0 = counter(&tb.status(0), "pass_hop_limit6");
    let mut answered = None;
    for _ in 0..3 {
        let c = tb
            .engine(0)
            .in_container(
                "a1",
                &[
                    "ping",
                    "-n",
                    "-c",
                    "1",
                    "-W",
                    "2",
                    "-t",
                    "1",
                    &ip_b6.to_string(),
                ],
            )
            .expect("nsenter");
        let out = cmd_stdout(c);
        if out.contains("Time exceeded") {
            answered = Some(out);
            break;
        }
        eprintln!("hop limit 1: no time exceeded yet: {out}");
    }
    let out = answered.expect("a hop limit of 1 answered with time exceeded");
    assert!(
        out.contains(&format!("From {}", a1.gw6)),
        "time exceeded from host A's gateway {}: {out}",
        a1.gw6
    );
    let hl = counter(&tb.status(0), "pass_hop_limit6") - hl0;
    assert!(hl >= 1, "pass_hop_limit6 on A did not move");
    eprintln!(
        "hop limit 1: {} (pass_hop_limit6 +{hl})",
        out.lines()
            .find(|l| l.contains("Time exceeded"))
            .unwrap_or_default()
    );
}

/// Runs `c` and returns its stdout and stderr, whatever its exit status.
fn cmd_stdout(mut c: std::process::Command) -> String {
    let out = c.output().expect("run command");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `iptables-save` of host i without comment lines and counters.
fn iptables_saved(tb: &Testbed, i: usize) -> String {
    tb.host(i)
        .ns()
        .run(&["iptables-save"])
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| match (l.starts_with(':'), l.rfind(" [")) {
            (true, Some(i)) => format!("{} [0:0]", &l[..i]),
            _ => l.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The rules `status` lists for the kernel datapath's chains, one string.
fn chain_rules(s: &Value) -> String {
    s["chains"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|c| c["rules"].as_array().into_iter().flatten())
        .filter_map(Value::as_str)
        .collect::<Vec<_>>()
        .join("\n")
}

/// The kernel datapath (`datapath = "kernel"`) follows Docker as the eBPF
/// one does: docker0's subnet and a user network created later get their
/// rules, so their containers reach the peer's by address with their own
/// source (past Docker's FORWARD DROP, isolation and MASQUERADE); the
/// network's removal takes its rules away, and stopping the agent leaves
/// Docker's iptables exactly as they were.
#[test]
fn kernel_datapath_follows_docker_networks() {
    let mut tb = Testbed::new([true, true]);
    let (ea, eb) = (tb.engine(0), tb.engine(1));
    ea.run_container("bridge", None, "a1").expect("run a1");
    eb.run_container("bridge", None, "b1").expect("run b1");
    let (ip_a, ip_b) = (ip_of(ea, "a1", "bridge"), ip_of(eb, "b1", "bridge"));
    let before = iptables_saved(&tb, 0);
    for i in 0..2 {
        let plain = std::fs::read_to_string(tb.config(i)).expect("read config");
        let kernel = tb.cfg.write(
            ["a-kernel.toml", "b-kernel.toml"][i],
            &format!("datapath = \"kernel\"\n{plain}"),
        );
        tb.start_agent_with(i, &kernel);
    }
    for i in 0..2 {
        let s = tb.wait_docker(i);
        assert_eq!(s["agent"]["datapath"], "kernel", "{s}");
    }
    let (ea, eb) = (tb.engine(0), tb.engine(1));
    let (sub_a, sub_b) = (tb.host(0).subnet(), tb.host(1).subnet());
    let s = tb.status(0);
    assert!(
        chain_rules(&s).contains(&format!("-A XHOST-FORWARD -s {sub_a} -d {sub_b} -j ACCEPT")),
        "{s}"
    );
    assert_ping(ea, "a1", ip_b, 3);
    assert_ping(eb, "b1", ip_a, 3);
    assert_transfer((ea, "a1"), ip_a, (eb, "b1"), ip_b, 45_331);
    assert_transfer((eb, "b1"), ip_b, (ea, "a1"), ip_a, 45_332);

    // A user network created now: its rules follow, its container talks.
    create_net2(ea);
    let rule = format!("-A XHOST-POSTROUTING -s {NET2} -d {sub_b} -j ACCEPT");
    tb.wait(0, "net2's rules", SETTLE, |s| {
        local_subnets(s).contains(&NET2.to_owned()) && chain_rules(s).contains(&rule)
    });
    // Docker inserted net2's MASQUERADE at the top of POSTROUTING: the
    // agent moves its exemption back above it (it checks every second).
    let first_nat = || {
        tb.host(0)
            .ns()
            .run(&["iptables", "-w", "-t", "nat", "-S", "POSTROUTING"])
            .lines()
            .find(|l| l.starts_with("-A "))
            .unwrap_or_default()
            .to_owned()
    };
    let t = Instant::now();
    while first_nat() != "-A POSTROUTING -j XHOST-POSTROUTING" {
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "POSTROUTING starts with {}",
            first_nat()
        );
        thread::sleep(Duration::from_millis(50));
    }
    ea.run_container("net2", Some("192.168.111.11"), "a3")
        .expect("run a3");
    let ip_a3: Ipv4Addr = "192.168.111.11".parse().expect("ip");
    assert_ping(eb, "b1", ip_a3, 3);
    assert_ping(ea, "a3", ip_b, 3);
    assert_transfer((ea, "a3"), ip_a3, (eb, "b1"), ip_b, 45_333);
    assert_transfer((eb, "b1"), ip_b, (ea, "a3"), ip_a3, 45_334);

    // Removed: its rules go.
    ea.docker_ok(&["rm", "-f", "a3"]).expect("rm a3");
    ea.docker_ok(&["network", "rm", "net2"])
        .expect("docker network rm");
    tb.wait(0, "net2's rules gone", SETTLE, |s| {
        !local_subnets(s).contains(&NET2.to_owned()) && !chain_rules(s).contains(NET2)
    });
    assert_ping(eb, "b1", ip_a, 2);

    let agent = tb.agents[0].take().expect("agent A");
    let (status, left) = agent.stop_with(Signal::SIGTERM).expect("stop A");
    assert!(
        status.success() && left.is_empty(),
        "A: {status:?} left {left:?}"
    );
    assert_eq!(
        iptables_saved(&tb, 0),
        before,
        "iptables-save of A after the stop"
    );
    tb.finish();
}
