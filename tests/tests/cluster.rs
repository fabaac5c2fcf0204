//! Cluster mode against a real etcd: hosts publish their container subnets
//! under a lease and route each other's, with no `--peer` anywhere. Needs
//! root and etcd (scripts/setup.sh); `--test-threads=1`.
//!
//! ```text
//!  ctr-a1 192.168.110.11    ctr-b1 192.168.120.11    ctr-c1 192.168.130.11
//!     | veth                   | veth                   | veth
//!  host-a docker0 .110.1    host-b docker0 .120.1    host-c docker0 .130.1
//!         ens33 .131               ens33 .132               ens33 .133
//!             \                        |                       /
//!              ul netns: ul0 bridge 172.16.91.5/24 + etcd :23790
//! ```
//! `cluster_docker_engines` runs a real dockerd on host-a and host-b instead
//! of their simulated bridge and container.

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;
use xhost_tests::{
    Host,
    cluster::{ClusterBed, ClusterOpts, Etcd},
    docker_engine::Engine,
    ping,
    xhost::{
        Agent, AgentDirs, kernel_routes6, remove_instance, status, status_routes, status_routes6,
        wait_status, xhost, xhost_bin,
    },
};

fn require_root() {
    assert!(
        xhost_tests::is_root(),
        "these tests load eBPF programs and build namespaces: run as root (cargo xtask test)"
    );
}

/// The subnet of the `xhost` network the agent made on `e` from the
/// cluster pool, once it exists (15 s at most).
fn pool_subnet(e: &Engine) -> String {
    let t0 = Instant::now();
    loop {
        if let Ok(s) = e.docker_ok(&[
            "network",
            "inspect",
            "-f",
            "{{(index .IPAM.Config 0).Subnet}}",
            "xhost",
        ]) {
            return s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "no xhost network made from the pool"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn bed(hosts: u32) -> ClusterBed {
    require_root();
    ClusterBed::new(&ClusterOpts {
        hosts,
        ..ClusterOpts::default()
    })
    .expect("build the cluster testbed")
}

/// `load` arguments of a cluster agent on `host` with static bridges.
fn args(host: &Host, etcd: &Etcd, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "--iface",
        host.underlay_iface(),
        "--bridge",
        host.bridge(),
        "--no-docker",
        "--etcd-endpoints",
        &etcd.endpoint(),
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    a.extend(extra.iter().map(|s| (*s).to_owned()));
    a
}

fn start(host: &Host, etcd: &Etcd, extra: &[&str]) -> Agent {
    let a = args(host, etcd, extra);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    Agent::start(host.ns(), host.role(), &a).expect("xhost-user load")
}

/// The prefixes in an agent's `ROUTES`, with their peer.
fn routes(host: &Host, dirs: &AgentDirs) -> BTreeSet<(String, String)> {
    status(host.ns(), dirs)
        .map(|s| status_routes(&s).into_iter().collect())
        .unwrap_or_default()
}

/// Waits until `pred` holds for the agent's routes; returns how long it took.
#[track_caller]
fn wait_routes(
    host: &Host,
    dirs: &AgentDirs,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&BTreeSet<(String, String)>) -> bool,
) -> Duration {
    let t0 = Instant::now();
    loop {
        let r = routes(host, dirs);
        if pred(&r) {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < timeout,
            "{what}: not within {timeout:?}; routes of {}: {r:?}",
            host.role()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn route_of(h: &Host) -> (String, String) {
    (h.subnet().to_string(), h.underlay_ip().to_string())
}

/// Reads an agent's `ROUTES` (`status --json`) every 20 ms on a thread of
/// its own, counting the reads that lack one route.
struct RouteWatch {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<(u32, u32)>,
}

impl RouteWatch {
    fn start(host: &Host, dirs: &AgentDirs, want: (String, String)) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (ns, dirs, flag) = (host.ns().path(), dirs.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let bin = xhost_bin().expect("xhost-user");
            let mut checks = 0u32;
            let mut missing = 0u32;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let out = std::process::Command::new("nsenter")
                    .arg(format!("--net={}", ns.display()))
                    .arg("--")
                    .arg(&bin)
                    .args(dirs.args())
                    .args(["status", "--json"])
                    .output()
                    .expect("status");
                let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
                checks += 1;
                if !status_routes(&v).contains(&want) {
                    missing += 1;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            (checks, missing)
        });
        Self { stop, thread }
    }

    /// Stops watching: (reads, reads without the route).
    fn finish(self) -> (u32, u32) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().expect("route watcher")
    }
}

/// Every host routes every other host's subnet via its underlay address.
fn wait_full_mesh(hosts: &[&Host], agents: &[&Agent]) {
    for (i, (h, a)) in hosts.iter().zip(agents).enumerate() {
        let want: BTreeSet<_> = hosts
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, o)| route_of(o))
            .collect();
        wait_routes(
            h,
            &a.dirs,
            "the other hosts' routes",
            Duration::from_secs(10),
            |r| *r == want,
        );
    }
}

/// Every container pings every other host's container.
fn ping_all(hosts: &[&Host]) {
    for a in hosts {
        for b in hosts {
            if a.role() == b.role() {
                continue;
            }
            let (ca, cb) = (&a.containers()[0], &b.containers()[0]);
            let p = ping(ca.ns(), cb.ip(), 3).expect("ping");
            assert!(
                p.received == p.transmitted && p.transmitted > 0,
                "{} -> {}: {}",
                ca.role(),
                cb.role(),
                p.output
            );
        }
    }
}

fn three_hosts(extra: &[&str]) {
    let bed = bed(3);
    let etcd = Etcd::start(bed.underlay(), None).expect("etcd");
    let hosts = [bed.host(0), bed.host(1), bed.host(2)];
    let agents: Vec<Agent> = hosts.iter().map(|h| start(h, &etcd, extra)).collect();
    let refs: Vec<&Agent> = agents.iter().collect();
    wait_full_mesh(&hosts, &refs);
    ping_all(&hosts);
    let out = agents[0].output();
    assert!(
        out.contains("is reached without TLS"),
        "warning about plain-text etcd expected:\n{out}"
    );
    // `cluster hosts --json` lists all three, this one marked.
    let o = xhost(
        hosts[0].ns(),
        &agents[0].dirs,
        &[
            "cluster",
            "hosts",
            "--json",
            "--host-id",
            &hosts[0].underlay_ip().to_string(),
            "--etcd-endpoints",
            &etcd.endpoint(),
        ],
    )
    .expect("cluster hosts");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let hs = v["hosts"].as_array().expect("hosts");
    assert_eq!(hs.len(), 3, "{v:#}");
    assert_eq!(
        hs.iter().filter(|h| h["this_host"] == true).count(),
        1,
        "{v:#}"
    );
    assert_eq!(v["store"]["connected"], true, "{v:#}");
    for a in agents {
        let (st, left) = a.stop_with(Signal::SIGTERM).expect("stop");
        assert!(st.success(), "{st}");
        assert!(left.is_empty(), "left behind: {left:?}");
    }
}

/// Three hosts find each other through etcd alone (native routing).
#[test]
fn cluster_three_hosts_native() {
    three_hosts(&[]);
}

/// The same in VXLAN mode: the host records carry what VXLAN peers need.
#[test]
fn cluster_three_hosts_vxlan() {
    three_hosts(&["--tunnel", "vxlan"]);
}

/// A host that dies (agent SIGKILLed, namespaces deleted) leaves the others'
/// routes within TTL + 1 s; a clean unload revokes its lease at once.
#[test]
fn cluster_host_gone_and_clean_unload() {
    let ttl = 3;
    let mut bed = bed(3);
    let etcd = Etcd::start(bed.underlay(), None).expect("etcd");
    let ttl_arg = ttl.to_string();
    let extra = ["--lease-ttl", ttl_arg.as_str()];
    let a = start(bed.host(0), &etcd, &extra);
    let b = start(bed.host(1), &etcd, &extra);
    let c = start(bed.host(2), &etcd, &extra);
    wait_full_mesh(&[bed.host(0), bed.host(1), bed.host(2)], &[&a, &b, &c]);
    let gone = route_of(bed.host(2));
    let dirs = c.kill().expect("SIGKILL host-c's agent");
    bed.remove_host(2);
    remove_instance(&dirs);
    let t0 = Instant::now();
    let limit = Duration::from_secs(ttl + 1);
    for (h, ag) in [(bed.host(0), &a), (bed.host(1), &b)] {
        wait_routes(h, &ag.dirs, "host-c's route to leave", limit * 2, |r| {
            !r.contains(&gone)
        });
    }
    let took = t0.elapsed();
    eprintln!("host gone: routes left the others after {took:?} (TTL {ttl} s)");
    assert!(took <= limit, "took {took:?}, more than TTL + 1 s");

    let b_route = route_of(bed.host(1));
    let t0 = Instant::now();
    let (st, left) = b.stop_with(Signal::SIGTERM).expect("stop host-b");
    assert!(st.success() && left.is_empty(), "{st} {left:?}");
    let took = wait_routes(
        bed.host(0),
        &a.dirs,
        "host-b's route to leave",
        limit,
        |r| !r.contains(&b_route),
    );
    let total = t0.elapsed();
    eprintln!(
        "clean unload: route left host-a {total:?} after SIGTERM ({took:?} after the agent exited)"
    );
    assert!(
        total < Duration::from_millis(1500),
        "a revoked lease must drop the routes at once, took {total:?}"
    );
}

/// An agent SIGKILLed and started again within the TTL (its datapath kept
/// forwarding meanwhile; `unload --keep-lease` in between, as the service
/// unit does) keeps its lease and claims: the other host's route
/// to it never leaves, and its keys are not even rewritten.
#[test]
fn cluster_restart_within_ttl_keeps_claims() {
    let bed = bed(2);
    let etcd = Etcd::start(bed.underlay(), None).expect("etcd");
    let extra = ["--lease-ttl", "10"];
    let (ha, hb) = (bed.host(0), bed.host(1));
    let a = start(ha, &etcd, &extra);
    let b = start(hb, &etcd, &extra);
    wait_full_mesh(&[ha, hb], &[&a, &b]);
    let key = format!(
        "/xhost/v1/subnets/{}-{}",
        hb.subnet().addr(),
        hb.subnet().prefix_len()
    );
    let before = etcd.ctl_ok(&["get", &key, "-w", "json"]);
    // Watch host-a's routes the whole time, from another thread.
    let watcher = RouteWatch::start(ha, &a.dirs, route_of(hb));
    let dirs = b.kill().expect("SIGKILL host-b's agent");
    // The datapath it left keeps forwarding; an operator restarts it:
    // unload the orphaned datapath, load again with the same run dir.
    let o = xhost(hb.ns(), &dirs, &["unload", "--keep-lease"]).expect("unload");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let a2 = args(hb, &etcd, &extra);
    let a2: Vec<&str> = a2.iter().map(String::as_str).collect();
    let b2 = Agent::start_in(&xhost_bin().expect("bin"), hb.ns(), hb.role(), dirs, &a2)
        .expect("restart host-b");
    wait_full_mesh(&[ha, hb], &[&a, &b2]);
    std::thread::sleep(Duration::from_secs(1));
    let (checks, missing) = watcher.finish();
    eprintln!("restart: {checks} checks of host-a's routes, {missing} without host-b's");
    assert!(checks > 10, "too few checks: {checks}");
    assert_eq!(missing, 0, "host-b's route flapped on host-a");
    let after = etcd.ctl_ok(&["get", &key, "-w", "json"]);
    let modrev = |s: &str| -> serde_json::Value {
        serde_json::from_str::<serde_json::Value>(s).expect("json")["kvs"][0]["mod_revision"]
            .clone()
    };
    assert_eq!(modrev(&before), modrev(&after), "the claim was rewritten");
    assert!(
        !a.output()
            .contains(&format!("route {}: removed", hb.subnet())),
        "{}",
        a.output()
    );
    assert!(
        b2.output().contains("routing from the last-known snapshot"),
        "{}",
        b2.output()
    );
    ping_all(&[ha, hb]);
}

/// The lease and claim revision of `host`'s subnet key, as the other
/// hosts see them in etcd; `None` once the key is gone.
fn claim_of(etcd: &Etcd, host: &Host) -> Option<(i64, i64)> {
    let key = format!(
        "/xhost/v1/subnets/{}-{}",
        host.subnet().addr(),
        host.subnet().prefix_len()
    );
    let v: serde_json::Value =
        serde_json::from_str(&etcd.ctl_ok(&["get", &key, "-w", "json"])).expect("json");
    let kv = v["kvs"].get(0)?;
    Some((kv["lease"].as_i64()?, kv["mod_revision"].as_i64()?))
}

/// A UDP flow of numbered datagrams from `from`'s container to `to`'s.
struct UdpFlow {
    recv: xhost_tests::Process,
    send: xhost_tests::Process,
    count: u32,
}

impl UdpFlow {
    fn start(from: &Host, to: &Host, rate: u32, secs: u32) -> Self {
        let bin = xhost_tests::probe::probe_bin()
            .expect("xh-probe")
            .display()
            .to_string();
        let count = rate * secs;
        let (count_s, timeout) = (count.to_string(), (secs + 20).to_string());
        let mut recv = to.containers()[0]
            .ns()
            .spawn(
                "udp-seq-recv",
                &[
                    &bin,
                    "udp-seq-recv",
                    "--port",
                    "5611",
                    "--count",
                    &count_s,
                    "--timeout",
                    &timeout,
                ],
            )
            .expect("udp receiver");
        recv.wait_for_line(|l| l.starts_with("listening"), Duration::from_secs(5))
            .expect("udp receiver listening");
        let dst = format!("{}:5611", to.containers()[0].ip());
        let send = from.containers()[0]
            .ns()
            .spawn(
                "udp-seq-send",
                &[
                    &bin,
                    "udp-seq-send",
                    "--to",
                    &dst,
                    "--count",
                    &count_s,
                    "--rate",
                    &rate.to_string(),
                ],
            )
            .expect("udp sender");
        Self { recv, send, count }
    }

    /// The receiver's report once the flow is over.
    fn finish(mut self) -> xhost_tests::probe::SeqRecvReport {
        let report = |p: &mut xhost_tests::Process, what: &str| {
            let line = p
                .wait_for_line(|l| l.starts_with('{'), Duration::from_secs(40))
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            serde_json::from_str::<serde_json::Value>(&line).expect("json report")
        };
        let sent = report(&mut self.send, "udp sender");
        assert_eq!(sent["sent"], self.count, "{sent}");
        let line = self
            .recv
            .wait_for_line(|l| l.starts_with('{'), Duration::from_secs(40))
            .expect("udp receiver");
        serde_json::from_str(&line).expect("receiver report")
    }
}

/// Removes an instance's pins and state even if the test fails half-way.
struct Cleanup(AgentDirs);
impl Drop for Cleanup {
    fn drop(&mut self) {
        remove_instance(&self.0);
    }
}

/// An agent stopped with `--keep-datapath`, and then one SIGKILLed, each
/// started again at once, adopt the pinned datapath and keep the lease:
/// the claim is neither revoked nor rewritten (same lease, same revision),
/// the other host's route to it never leaves, and a UDP flow into it loses
/// nothing. Stopped with `--keep-datapath` for longer than the TTL, the
/// lease expires (it was not revoked: the route stays until then), and
/// the next agent adopts the datapath and claims again under a new lease.
#[test]
fn cluster_keep_datapath_restart_adopts_and_keeps_lease() {
    keep_datapath_restart(&[]);
}

/// The same in VXLAN mode: the vxlan device is adopted with the datapath.
#[test]
fn cluster_keep_datapath_restart_vxlan() {
    keep_datapath_restart(&["--tunnel", "vxlan"]);
}

fn keep_datapath_restart(mode: &[&str]) {
    let bed = bed(2);
    let etcd = Etcd::start(bed.underlay(), None).expect("etcd");
    let ttl = 6u64;
    let ttl_s = ttl.to_string();
    let mut extra = vec!["--lease-ttl", ttl_s.as_str()];
    extra.extend(mode);
    let mut keep = extra.clone();
    keep.push("--keep-datapath");
    let (ha, hb) = (bed.host(0), bed.host(1));
    let a = start(ha, &etcd, &extra);
    let b = start(hb, &etcd, &keep);
    let _cleanup = Cleanup(b.dirs.clone());
    wait_full_mesh(&[ha, hb], &[&a, &b]);
    let claim = claim_of(&etcd, hb).expect("host-b's claim");
    let bin = xhost_bin().expect("bin");
    let b_args = args(hb, &etcd, &keep);
    let b_args: Vec<&str> = b_args.iter().map(String::as_str).collect();

    let watcher = RouteWatch::start(ha, &a.dirs, route_of(hb));
    let tcx = xhost_tests::xhost::expect_tcx();
    let (rate, secs) = (1_000, 8);
    let flow = UdpFlow::start(ha, hb, rate, secs);
    std::thread::sleep(Duration::from_millis(1500));
    // Stopped with --keep-datapath: the lease stays, then adopted.
    let dirs = b.dirs.clone();
    let (st, left) = b.stop_leaving(Signal::SIGTERM).expect("stop host-b");
    assert!(st.success() && !left.is_empty(), "{st} {left:?}");
    assert_eq!(claim_of(&etcd, hb), Some(claim), "lease kept at stop");
    let b2 = Agent::start_in(&bin, hb.ns(), hb.role(), dirs, &b_args).expect("restart host-b");
    // SIGKILLed, then adopted again.
    std::thread::sleep(Duration::from_millis(1500));
    let killed_out = b2.output();
    let dirs = b2.kill().expect("SIGKILL host-b");
    let b3 = Agent::start_in(&bin, hb.ns(), hb.role(), dirs, &b_args).expect("restart host-b");
    let got = flow.finish();
    let (checks, missing) = watcher.finish();
    eprintln!(
        "keep + kill restarts: {checks} reads of host-a's routes, {missing} without host-b's; UDP {} of {} received, {} missing",
        got.received,
        rate * secs,
        got.missing
    );
    for out in [&killed_out, &b3.output()] {
        assert!(out.contains("adopted the pinned datapath"), "{out}");
        assert!(
            out.contains("routing from the last-known snapshot"),
            "{out}"
        );
        assert!(!out.contains(" granted (TTL"), "a new lease: {out}");
    }
    assert!(checks > 10, "too few reads: {checks}");
    assert_eq!(missing, 0, "host-b's route left host-a");
    if tcx {
        assert_eq!(got.missing, 0, "UDP lost across the restarts");
    } else {
        assert!(got.missing < u64::from(rate / 10), "{}", got.missing);
    }
    // Connected again under the same lease; the claim never rewritten.
    xhost_tests::xhost::wait_status(
        hb.ns(),
        &b3.dirs,
        "reconnect",
        Duration::from_secs(10),
        |s| s["agent"]["cluster"]["store"]["connected"] == true,
    )
    .expect("host-b connected");
    assert_eq!(
        claim_of(&etcd, hb),
        Some(claim),
        "same lease, not rewritten"
    );
    assert!(
        !a.output()
            .contains(&format!("route {}: removed", hb.subnet())),
        "{}",
        a.output()
    );

    // Away for longer than the TTL: the lease expires (not revoked at the
    // stop, so the route stays for a while), and the next agent claims
    // again under a new lease.
    let dirs = b3.dirs.clone();
    let (st, _) = b3.stop_leaving(Signal::SIGTERM).expect("stop host-b");
    assert!(st.success(), "{st}");
    let gone = wait_routes(
        ha,
        &a.dirs,
        "host-b's route to leave when its lease expires",
        Duration::from_secs(ttl * 3),
        |r| !r.contains(&route_of(hb)),
    );
    eprintln!("lease left to expire: route left host-a {gone:?} after the stop (TTL {ttl} s)");
    assert!(
        gone >= Duration::from_secs(ttl / 2),
        "the lease was revoked at the stop: route gone after {gone:?}"
    );
    assert_eq!(claim_of(&etcd, hb), None, "claim expired");
    let b_args = args(hb, &etcd, &extra);
    let b_args: Vec<&str> = b_args.iter().map(String::as_str).collect();
    let b4 = Agent::start_in(&bin, hb.ns(), hb.role(), dirs, &b_args).expect("restart host-b");
    // The log (stderr) may trail `ready` (stdout) by a moment.
    let t0 = Instant::now();
    while !b4.output().contains("adopted the pinned datapath") {
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "not adopted:\n{}",
            b4.output()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    wait_full_mesh(&[ha, hb], &[&a, &b4]);
    let again = claim_of(&etcd, hb).expect("claimed again");
    assert_ne!(again.0, claim.0, "a new lease");
    ping_all(&[ha, hb]);
    let (st, left) = b4.stop_with(Signal::SIGTERM).expect("stop host-b");
    assert!(st.success() && left.is_empty(), "{st} {left:?}");
}

/// etcd down for longer than the TTL while traffic flows: no packet of the
/// flow is lost, a container started meanwhile is reachable, and after
/// etcd returns the agents reconnect and follow new changes.
#[test]
fn cluster_store_outage() {
    let mut bed = bed(2);
    let mut etcd = Etcd::start(bed.underlay(), None).expect("etcd");
    let extra = ["--lease-ttl", "3"];
    let a = start(bed.host(0), &etcd, &extra);
    let b = start(bed.host(1), &etcd, &extra);
    wait_full_mesh(&[bed.host(0), bed.host(1)], &[&a, &b]);
    // 8 s of pings every 50 ms across the outage.
    let flow = {
        let ns = bed.host(0).containers()[0].ns().path();
        let dst = bed.host(1).containers()[0].ip();
        std::thread::spawn(move || {
            std::process::Command::new("nsenter")
                .arg(format!("--net={}", ns.display()))
                .args([
                    "--", "ping", "-n", "-q", "-i", "0.05", "-c", "160", "-W", "1",
                ])
                .arg(dst.to_string())
                .output()
                .expect("ping")
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    etcd.kill().expect("stop etcd");
    std::thread::sleep(Duration::from_secs(5));
    // A container started on host-b during the outage.
    let newcomer = bed
        .add_container(1, Ipv4Addr::new(192, 168, 120, 50))
        .expect("new container");
    let p = ping(bed.host(0).containers()[0].ns(), newcomer, 3).expect("ping");
    assert!(p.received > 0, "new container unreachable: {}", p.output);
    let s = status(bed.host(0).ns(), &a.dirs).expect("status");
    assert_eq!(s["agent"]["cluster"]["store"]["connected"], false, "{s:#}");
    let out = flow.join().expect("flow");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("160 packets transmitted, 160 received"),
        "packets lost across the outage:\n{text}"
    );
    etcd.restart().expect("etcd back");
    for (h, ag) in [(bed.host(0), &a), (bed.host(1), &b)] {
        xhost_tests::xhost::wait_status(
            h.ns(),
            &ag.dirs,
            "reconnect",
            Duration::from_secs(10),
            |s| s["agent"]["cluster"]["store"]["connected"] == true,
        )
        .expect("agent reconnected");
    }
    // Converged: both hosts still hold their claims, and a change made now
    // reaches host-a.
    let keys = etcd.ctl_ok(&["get", "/xhost/v1/subnets/", "--prefix", "--keys-only"]);
    assert_eq!(keys.lines().filter(|l| !l.is_empty()).count(), 2, "{keys}");
    wait_full_mesh(&[bed.host(0), bed.host(1)], &[&a, &b]);
    ping_all(&[bed.host(0), bed.host(1)]);
}

/// A lease of `ttl` seconds granted with etcdctl; its id in hex.
fn lease(etcd: &Etcd, ttl: u32) -> String {
    let out = etcd.ctl_ok(&["lease", "grant", &ttl.to_string()]);
    // "lease 694d8e7c5a1b2c3d granted with TTL(60s)"
    out.split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("lease grant: {out}"))
        .to_owned()
}

fn put_host(etcd: &Etcd, lease: &str, id: &str, underlay: &str, mode: &str) {
    etcd.ctl_ok(&[
        "put",
        "--lease",
        lease,
        &format!("/xhost/v1/hosts/{id}"),
        &format!("{{\"id\":\"{id}\",\"underlay\":\"{underlay}\",\"mode\":{mode}}}"),
    ]);
}

fn put_claim(etcd: &Etcd, lease: &str, subnet: &str, host: &str) {
    etcd.ctl_ok(&[
        "put",
        "--lease",
        lease,
        &format!("/xhost/v1/subnets/{}", subnet.replace('/', "-")),
        &format!("{{\"host\":\"{host}\"}}"),
    ]);
}

/// Conflicting and bad claims: the older of two claims on a subnet wins
/// and the loser is claimed when freed; overlapping claims, values that do
/// not parse, a host in another datapath mode and a subnet the config also
/// routes (both appearing after the start), an unreachable host are each
/// skipped with one line naming the key, and the agent keeps serving the
/// rest.
#[test]
fn cluster_conflicts_and_bad_values() {
    let bed = bed(2);
    let etcd = Etcd::start(bed.underlay(), None).expect("etcd");
    let (ha, hb) = (bed.host(0), bed.host(1));
    let z = lease(&etcd, 60);
    // Host z holds host-b's subnet before host-b starts.
    put_host(&etcd, &z, "z", "172.16.91.140", "{\"kind\":\"native\"}");
    put_claim(&etcd, &z, &hb.subnet().to_string(), "z");
    // y's claim overlaps z's older one.
    put_claim(&etcd, &z, "10.77.0.0/16", "z");
    put_host(&etcd, &z, "y", "172.16.91.141", "{\"kind\":\"native\"}");
    put_claim(&etcd, &z, "10.77.1.0/24", "y");
    // Bad input.
    etcd.ctl_ok(&["put", "/xhost/v1/subnets/10.9.0.1-16", "{\"host\":\"z\"}"]);
    etcd.ctl_ok(&["put", "/xhost/v1/subnets/10.10.0.0-16", "not json"]);
    put_host(&etcd, &z, "far", "10.0.0.9", "{\"kind\":\"native\"}");
    put_claim(&etcd, &z, "10.55.0.0/16", "far");
    let a = start(ha, &etcd, &["--peer", "172.16.91.150=10.66.0.0/16"]);
    let b = start(hb, &etcd, &[]);
    // A host of another mode and a config peer's subnet that appear in the
    // store after the start (at start both refuse it: see
    // `cluster_start_refusals`) are skipped key by key.
    put_host(
        &etcd,
        &z,
        "v",
        "172.16.91.142",
        "{\"kind\":\"vxlan\",\"vni\":1,\"port\":8472}",
    );
    put_claim(&etcd, &z, "10.88.0.0/16", "v");
    put_claim(&etcd, &z, "10.66.0.0/16", "z");
    let b_via_z = (hb.subnet().to_string(), "172.16.91.140".to_owned());
    let z_77 = ("10.77.0.0/16".to_owned(), "172.16.91.140".to_owned());
    let cfg = ("10.66.0.0/16".to_owned(), "172.16.91.150".to_owned());
    wait_routes(ha, &a.dirs, "z's routes", Duration::from_secs(10), |r| {
        r.contains(&b_via_z) && r.contains(&z_77) && r.contains(&cfg)
    });
    // Nothing else: each bad or losing key is skipped.
    std::thread::sleep(Duration::from_millis(500));
    let r = routes(ha, &a.dirs);
    // z's two winners and the config peer; host-b lost its subnet to z.
    assert_eq!(r.len(), 3, "{r:?}");
    let out = a.output();
    for (key, why) in [
        ("/xhost/v1/subnets/10.77.1.0-24", "held by host z"),
        ("/xhost/v1/subnets/10.9.0.1-16", "host bits set"),
        ("/xhost/v1/subnets/10.10.0.0-16", "not a subnet record"),
        ("/xhost/v1/subnets/10.88.0.0-16", "mixed datapath modes"),
        ("/xhost/v1/subnets/10.55.0.0-16", "unreachable"),
        (
            "/xhost/v1/subnets/10.66.0.0-16",
            "config peer 172.16.91.150",
        ),
    ] {
        let lines: Vec<&str> = out.lines().filter(|l| l.contains(key)).collect();
        assert_eq!(lines.len(), 1, "{key}: one line expected:\n{out}");
        assert!(lines[0].contains(why), "{key}: {}", lines[0]);
    }
    let s = status(ha.ns(), &a.dirs).expect("status");
    let conflicts = s["agent"]["cluster"]["conflicts"].to_string();
    assert!(conflicts.contains("10.77.1.0/24"), "{s:#}");
    // host-b knows it lost, and says what to do.
    let sb = status(hb.ns(), &b.dirs).expect("status");
    let cb = sb["agent"]["cluster"]["conflicts"].to_string();
    assert!(
        cb.contains("held by host z") && cb.contains("--bip"),
        "{sb:#}"
    );
    // z goes: host-b claims its subnet, host-a routes it via host-b.
    etcd.ctl_ok(&["lease", "revoke", &z]);
    wait_routes(
        ha,
        &a.dirs,
        "host-b's claim after z left",
        Duration::from_secs(5),
        |r| r.contains(&route_of(hb)) && !r.contains(&z_77),
    );
    ping_all(&[ha, hb]);
    assert!(a.output().contains("ready"));
}

/// TLS with a client certificate (certificates made in the test), then
/// user/password authentication: the right ones connect, wrong ones give
/// one clear line and the agent keeps running.
#[test]
fn cluster_tls_and_credentials() {
    let bed = bed(2);
    let (ha, hb) = (bed.host(0), bed.host(1));
    let certs_dir = std::env::temp_dir().join(format!("xh-{}-certs", std::process::id()));
    struct RmDir(std::path::PathBuf);
    impl Drop for RmDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _rm = RmDir(certs_dir.clone());
    let tls = xhost_tests::cluster::make_certs(&certs_dir).expect("certificates");
    {
        let etcd = Etcd::start(bed.underlay(), Some(tls.clone())).expect("etcd with TLS");
        let (ca, cert, key) = (
            tls.ca.display().to_string(),
            tls.client_cert.display().to_string(),
            tls.client_key.display().to_string(),
        );
        let extra = [
            "--etcd-cafile",
            ca.as_str(),
            "--etcd-certfile",
            cert.as_str(),
            "--etcd-keyfile",
            key.as_str(),
        ];
        let a = start(ha, &etcd, &extra);
        let b = start(hb, &etcd, &extra);
        wait_full_mesh(&[ha, hb], &[&a, &b]);
        ping_all(&[ha, hb]);
        assert!(!a.output().contains("without TLS"), "{}", a.output());
        drop((a, b));
        // Without a client certificate the server refuses the handshake.
        let c = start(ha, &etcd, &["--etcd-cafile", ca.as_str()]);
        std::thread::sleep(Duration::from_secs(3));
        let out = c.output();
        let lines: Vec<&str> = out
            .lines()
            .filter(|l| l.contains("etcd https://"))
            .collect();
        assert_eq!(lines.len(), 1, "one error line expected:\n{out}");
    }
    let mut etcd = Etcd::start(bed.underlay(), None).expect("etcd");
    etcd.ctl_ok(&["user", "add", "root:rootpw"]);
    etcd.ctl_ok(&["auth", "enable"]);
    etcd.ctl_user = Some("root:rootpw".into());
    let wrong = start(
        ha,
        &etcd,
        &["--etcd-username", "root", "--etcd-password", "nope"],
    );
    std::thread::sleep(Duration::from_secs(3));
    let out = wrong.output();
    let lines: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("authentication failed"))
        .collect();
    assert_eq!(lines.len(), 1, "one clear error line expected:\n{out}");
    assert!(lines[0].contains("etcd http://"), "{}", lines[0]);
    drop(wrong);
    let a = start(
        ha,
        &etcd,
        &["--etcd-username", "root", "--etcd-password", "rootpw"],
    );
    let b = start(
        hb,
        &etcd,
        &["--etcd-username", "root", "--etcd-password", "rootpw"],
    );
    wait_full_mesh(&[ha, hb], &[&a, &b]);
    // The password never reaches the run dir (state file, snapshot).
    let mut files = 0;
    for e in std::fs::read_dir(&a.dirs.run_dir)
        .expect("run dir")
        .flatten()
    {
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        assert!(!text.contains("rootpw"), "{}: {text}", e.path().display());
        files += 1;
    }
    assert!(
        files >= 2,
        "state file and snapshot expected in {}",
        a.dirs.run_dir.display()
    );
}

/// An agent cut off from etcd resumes its watch from the revision it had;
/// when that revision was compacted meanwhile, it lists again and routes
/// what changed.
#[test]
fn cluster_compacted_watch_lists_again() {
    let bed = bed(2);
    let etcd = Etcd::start(bed.underlay(), None).expect("etcd");
    let (ha, hb) = (bed.host(0), bed.host(1));
    let a = start(ha, &etcd, &["--lease-ttl", "15"]);
    let b = start(hb, &etcd, &["--lease-ttl", "15"]);
    wait_full_mesh(&[ha, hb], &[&a, &b]);
    let rule = [
        "OUTPUT",
        "-p",
        "tcp",
        "-d",
        "172.16.91.5",
        "--dport",
        "23790",
        "-j",
        "DROP",
    ];
    let iptables = |op: &str| {
        let mut args = vec!["iptables", op];
        args.extend(rule);
        ha.ns().run(&args);
    };
    iptables("-I");
    xhost_tests::xhost::wait_status(
        ha.ns(),
        &a.dirs,
        "disconnect",
        Duration::from_secs(15),
        |s| s["agent"]["cluster"]["store"]["connected"] == false,
    )
    .expect("host-a notices it is cut off");
    let z = lease(&etcd, 60);
    put_host(&etcd, &z, "z", "172.16.91.140", "{\"kind\":\"native\"}");
    put_claim(&etcd, &z, "10.44.0.0/16", "z");
    let out = etcd.ctl_ok(&["put", "/xhost/v1/config/marker", "x", "-w", "json"]);
    let rev = serde_json::from_str::<serde_json::Value>(&out).expect("json")["header"]["revision"]
        .as_i64()
        .expect("revision");
    etcd.ctl_ok(&["compact", &rev.to_string()]);
    iptables("-D");
    let z_route = ("10.44.0.0/16".to_owned(), "172.16.91.140".to_owned());
    wait_routes(
        ha,
        &a.dirs,
        "z's route after the re-list",
        Duration::from_secs(15),
        |r| r.contains(&z_route) && r.contains(&route_of(hb)),
    );
    assert!(a.output().contains("was compacted"), "{}", a.output());
}

/// Real Docker engines on two of the three hosts: their `docker0` subnets
/// and a network created after the agents started are published, routed by
/// the others, and leave when the network is removed.
#[test]
fn cluster_docker_engines() {
    require_root();
    assert!(
        std::path::Path::new("/usr/sbin/dockerd").exists(),
        "dockerd missing: apt-get install docker.io busybox-static (scripts/setup.sh)"
    );
    let bed = ClusterBed::new(&ClusterOpts {
        hosts: 3,
        underlay_only: vec![0, 1],
        ..ClusterOpts::default()
    })
    .expect("testbed");
    let etcd = Etcd::start(bed.underlay(), None).expect("etcd");
    let (ha, hb, hc) = (bed.host(0), bed.host(1), bed.host(2));
    let engine = |h: &Host| {
        let mut e = Engine::prepare_in_netns(h.name(), &h.bip()).expect("prepare dockerd");
        e.boot().expect("start dockerd");
        e.import_busybox().expect("import busybox");
        e
    };
    let (ea, eb) = (engine(ha), engine(hb));
    let docker_agent = |h: &Host, e: &Engine| {
        let host = e.host();
        let ep = etcd.endpoint();
        Agent::start(
            h.ns(),
            h.role(),
            &[
                "--iface",
                "ens33",
                "--docker-host",
                &host,
                "--etcd-endpoints",
                &ep,
            ],
        )
        .expect("agent")
    };
    let a = docker_agent(ha, &ea);
    let b = docker_agent(hb, &eb);
    let c = start(hc, &etcd, &[]);
    ea.run_container("bridge", None, "a1")
        .expect("container a1");
    eb.run_container("bridge", None, "b1")
        .expect("container b1");
    wait_full_mesh(&[ha, hb, hc], &[&a, &b, &c]);
    let ip = |e: &Engine, name: &str, net: &str| -> Ipv4Addr {
        let f = format!("{{{{(index .NetworkSettings.Networks \"{net}\").IPAddress}}}}");
        e.inspect(name, &f)
            .expect("inspect")
            .parse()
            .expect("container IP")
    };
    let (a1, b1) = (ip(&ea, "a1", "bridge"), ip(&eb, "b1", "bridge"));
    let c1 = hc.containers()[0].ip();
    let ok = |p: xhost_tests::PingStats, what: &str| {
        assert!(
            p.transmitted > 0 && p.received == p.transmitted,
            "{what}: {}",
            p.output
        );
    };
    ok(
        ping(hc.containers()[0].ns(), a1, 3).expect("ping"),
        "c1 -> a1",
    );
    ok(
        ping(hc.containers()[0].ns(), b1, 3).expect("ping"),
        "c1 -> b1",
    );
    ok(ea.ping_from("a1", b1, 3).expect("ping"), "a1 -> b1");
    ok(eb.ping_from("b1", c1, 3).expect("ping"), "b1 -> c1");
    // A network created now on host-a appears on the others.
    ea.docker_ok(&["network", "create", "--subnet", "10.31.0.0/24", "late"])
        .expect("network create");
    ea.run_container("late", Some("10.31.0.10"), "a2")
        .expect("container a2");
    let late = ("10.31.0.0/24".to_owned(), ha.underlay_ip().to_string());
    for (h, ag) in [(hb, &b), (hc, &c)] {
        wait_routes(
            h,
            &ag.dirs,
            "the new network's route",
            Duration::from_secs(10),
            |r| r.contains(&late),
        );
    }
    let a2 = Ipv4Addr::new(10, 31, 0, 10);
    ok(
        ping(hc.containers()[0].ns(), a2, 3).expect("ping"),
        "c1 -> a2",
    );
    ok(eb.ping_from("b1", a2, 3).expect("ping"), "b1 -> a2");
    // And leaves when it is removed.
    ea.docker_ok(&["rm", "-f", "a2"]).expect("rm");
    ea.docker_ok(&["network", "rm", "late"])
        .expect("network rm");
    for (h, ag) in [(hb, &b), (hc, &c)] {
        wait_routes(
            h,
            &ag.dirs,
            "the removed network's route to leave",
            Duration::from_secs(10),
            |r| !r.contains(&late),
        );
    }
    // A cluster pool: each Docker host claims a subnet of it and creates
    // the `xhost` network with it; containers on it reach each other.
    let o = xhost(
        hc.ns(),
        &c.dirs,
        &[
            "cluster",
            "init",
            "--pool",
            "10.200.0.0/16",
            "--host-prefix",
            "24",
            "--etcd-endpoints",
            &etcd.endpoint(),
        ],
    )
    .expect("cluster init");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (pa, pb) = (pool_subnet(&ea), pool_subnet(&eb));
    assert_ne!(pa, pb);
    assert!(
        pa.starts_with("10.200.") && pb.starts_with("10.200."),
        "{pa} {pb}"
    );
    ea.run_container("xhost", None, "a3").expect("container a3");
    eb.run_container("xhost", None, "b3").expect("container b3");
    let want = [
        (pa.clone(), ha.underlay_ip().to_string()),
        (pb.clone(), hb.underlay_ip().to_string()),
    ];
    wait_routes(
        hc,
        &c.dirs,
        "the pool networks' routes",
        Duration::from_secs(10),
        |r| want.iter().all(|w| r.contains(w)),
    );
    let (a3, b3) = (ip(&ea, "a3", "xhost"), ip(&eb, "b3", "xhost"));
    ok(ea.ping_from("a3", b3, 3).expect("ping"), "a3 -> b3");
    ok(
        ping(hc.containers()[0].ns(), a3, 3).expect("ping"),
        "c1 -> a3",
    );
    drop((a, b, c));
    drop((ea, eb));
}

/// Waits for a spawned agent to exit on its own; its output and what it
/// left on disk (looked at before the guard's clean-up).
#[track_caller]
fn refused(mut agent: Agent) -> (String, Vec<std::path::PathBuf>) {
    let t0 = Instant::now();
    while agent.running() {
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "the agent did not refuse to start:\n{}",
            agent.output()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (agent.output(), agent.dirs.leftovers())
}

/// An agent whose datapath mode differs from a host already in the cluster,
/// or whose config peer routes a subnet the store holds, refuses to start
/// with one line naming both sides: nothing attached, nothing claimed.
#[test]
fn cluster_start_refusals() {
    let bed = bed(2);
    let etcd = Etcd::start(bed.underlay(), None).expect("etcd");
    let (ha, hb) = (bed.host(0), bed.host(1));
    let bin = xhost_bin().expect("xhost-user");
    let spawn = |extra: &[&str]| {
        let a = args(ha, &etcd, extra);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        Agent::spawn(&bin, ha.ns(), ha.role(), AgentDirs::unique(ha.role()), &a)
            .expect("spawn xhost-user load")
    };
    let nothing_claimed = || {
        let keys = etcd.ctl_ok(&["get", "/xhost/v1/", "--prefix", "--keys-only"]);
        assert!(
            !keys.contains(&ha.underlay_ip().to_string()) && !keys.contains("192.168.110.0"),
            "host-a claimed something:\n{keys}"
        );
    };
    // host-b runs VXLAN; host-a would run native routing.
    let b = start(hb, &etcd, &["--tunnel", "vxlan"]);
    // `ready` comes before the session publishes: wait for host-b's record.
    let hb_key = format!("/xhost/v1/hosts/{}", hb.underlay_ip());
    let t0 = Instant::now();
    while etcd
        .ctl_ok(&["get", &hb_key, "--keys-only"])
        .trim()
        .is_empty()
    {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "host-b never published"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (out, left) = refused(spawn(&[]));
    let lines: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("xhost-user: "))
        .collect();
    assert_eq!(lines.len(), 1, "one error line expected:\n{out}");
    let hb_ip = hb.underlay_ip().to_string();
    assert!(
        lines[0].contains(&format!("host {hb_ip}"))
            && lines[0].contains("VXLAN VNI 1 port 8472")
            && lines[0].contains("native routing")
            && lines[0].contains("mixed datapath modes"),
        "{}",
        lines[0]
    );
    assert!(!out.contains("ready"), "{out}");
    assert!(left.is_empty(), "{left:?}");
    nothing_claimed();
    // The same mode starts.
    let a = start(ha, &etcd, &["--tunnel", "vxlan"]);
    wait_full_mesh(&[ha, hb], &[&a, &b]);
    drop(a);
    drop(b);
    // A config peer routing a subnet another host holds in the store.
    let z = lease(&etcd, 60);
    put_host(&etcd, &z, "z", "172.16.91.140", "{\"kind\":\"native\"}");
    put_claim(&etcd, &z, "10.66.0.0/16", "z");
    let (out, left) = refused(spawn(&["--peer", "172.16.91.150=10.66.1.0/24"]));
    let lines: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("xhost-user: "))
        .collect();
    assert_eq!(lines.len(), 1, "one error line expected:\n{out}");
    assert!(
        lines[0].contains("config peer 172.16.91.150")
            && lines[0].contains("10.66.1.0/24")
            && lines[0].contains("host z")
            && lines[0].contains("/xhost/v1/subnets/10.66.0.0-16"),
        "{}",
        lines[0]
    );
    assert!(left.is_empty(), "{left:?}");
    nothing_claimed();
}

/// `unload` of a SIGKILLed agent revokes its lease (its snapshot names the
/// lease and the endpoints): the other host drops its route at once, well
/// within the 10 s TTL.
#[test]
fn cluster_unload_of_killed_agent_revokes_lease() {
    let bed = bed(2);
    let etcd = Etcd::start(bed.underlay(), None).expect("etcd");
    let (ha, hb) = (bed.host(0), bed.host(1));
    let extra = ["--lease-ttl", "10"];
    let a = start(ha, &etcd, &extra);
    let b = start(hb, &etcd, &extra);
    wait_full_mesh(&[ha, hb], &[&a, &b]);
    let dirs = b.kill().expect("SIGKILL host-b's agent");
    // Still routed: the lease outlives the killed agent.
    std::thread::sleep(Duration::from_millis(500));
    assert!(routes(ha, &a.dirs).contains(&route_of(hb)));
    let t0 = Instant::now();
    let o = xhost(hb.ns(), &dirs, &["unload"]).expect("unload");
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{err}");
    assert!(err.contains("revoked"), "{err}");
    let took = wait_routes(
        ha,
        &a.dirs,
        "host-b's route to leave",
        Duration::from_secs(5),
        |r| !r.contains(&route_of(hb)),
    );
    let total = t0.elapsed();
    eprintln!(
        "unload of a killed agent: route left host-a {total:?} after unload began ({took:?} of polling)"
    );
    assert!(total < Duration::from_secs(1), "took {total:?}");
    assert!(dirs.leftovers().is_empty(), "{:?}", dirs.leftovers());
    let keys = etcd.ctl_ok(&["get", "/xhost/v1/", "--prefix", "--keys-only"]);
    assert!(!keys.contains(&hb.underlay_ip().to_string()), "{keys}");
}

/// An agent restarted while etcd is down routes the other hosts from its
/// on-disk snapshot (packets cross both ways), then reconnects when etcd
/// returns and follows what changed.
#[test]
fn cluster_restart_during_outage_routes_from_snapshot() {
    let bed = bed(2);
    let mut etcd = Etcd::start(bed.underlay(), None).expect("etcd");
    let (ha, hb) = (bed.host(0), bed.host(1));
    let extra = ["--lease-ttl", "10"];
    let a = start(ha, &etcd, &extra);
    let b = start(hb, &etcd, &extra);
    wait_full_mesh(&[ha, hb], &[&a, &b]);
    etcd.kill().expect("stop etcd");
    let dirs = b.kill().expect("SIGKILL host-b's agent");
    // unload cannot revoke with etcd down: one line, the datapath goes, the
    // snapshot stays.
    let o = xhost(hb.ns(), &dirs, &["unload"]).expect("unload");
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{err}");
    assert!(err.contains("not revoked"), "{err}");
    let a2 = args(hb, &etcd, &extra);
    let a2: Vec<&str> = a2.iter().map(String::as_str).collect();
    let b2 = Agent::start_in(&xhost_bin().expect("bin"), hb.ns(), hb.role(), dirs, &a2)
        .expect("restart host-b during the outage");
    assert!(
        b2.output().contains("routing from the last-known snapshot"),
        "{}",
        b2.output()
    );
    assert!(routes(hb, &b2.dirs).contains(&route_of(ha)));
    let s = status(hb.ns(), &b2.dirs).expect("status");
    assert_eq!(s["agent"]["cluster"]["store"]["connected"], false, "{s:#}");
    ping_all(&[ha, hb]);
    etcd.restart().expect("etcd back");
    xhost_tests::xhost::wait_status(
        hb.ns(),
        &b2.dirs,
        "reconnect",
        Duration::from_secs(15),
        |s| s["agent"]["cluster"]["store"]["connected"] == true,
    )
    .expect("host-b reconnected");
    // Converged: a host that joins now reaches the restarted agent.
    let z = lease(&etcd, 60);
    put_host(&etcd, &z, "z", "172.16.91.140", "{\"kind\":\"native\"}");
    put_claim(&etcd, &z, "10.44.0.0/16", "z");
    let z_route = ("10.44.0.0/16".to_owned(), "172.16.91.140".to_owned());
    wait_routes(hb, &b2.dirs, "z's route", Duration::from_secs(10), |r| {
        r.contains(&z_route) && r.contains(&route_of(ha))
    });
    wait_routes(ha, &a.dirs, "host-b and z", Duration::from_secs(10), |r| {
        r.contains(&z_route) && r.contains(&route_of(hb))
    });
    ping_all(&[ha, hb]);
}

/// `cluster hosts` reads etcd itself, with no agent running: hosts, their
/// subnets, conflicts and skipped keys, as text and `--json`, endpoints
/// from the flags or a config file's `[etcd]`.
#[test]
fn cluster_hosts_reads_etcd_without_agent() {
    let bed = bed(1);
    let etcd = Etcd::start(bed.underlay(), None).expect("etcd");
    let h = bed.host(0);
    let z = lease(&etcd, 60);
    put_host(&etcd, &z, "z", "172.16.91.140", "{\"kind\":\"native\"}");
    put_claim(&etcd, &z, "10.77.0.0/16", "z");
    put_host(&etcd, &z, "y", "172.16.91.141", "{\"kind\":\"native\"}");
    put_claim(&etcd, &z, "10.77.1.0/24", "y");
    put_claim(&etcd, &z, "10.78.0.0/16", "y");
    etcd.ctl_ok(&["put", "/xhost/v1/subnets/10.9.0.1-16", "{\"host\":\"z\"}"]);
    let dirs = AgentDirs::unique("hosts");
    let ep = etcd.endpoint();
    let o = xhost(
        h.ns(),
        &dirs,
        &["cluster", "hosts", "--json", "--etcd-endpoints", &ep],
    )
    .expect("cluster hosts");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let hs = v["hosts"].as_array().expect("hosts");
    let ids: Vec<&str> = hs.iter().filter_map(|h| h["id"].as_str()).collect();
    assert_eq!(ids, ["y", "z"], "{v:#}");
    assert_eq!(
        hs[0]["subnets"].to_string(),
        "[\"10.77.1.0/24\",\"10.78.0.0/16\"]",
        "{v:#}"
    );
    assert_eq!(hs[0]["routed"].to_string(), "[\"10.78.0.0/16\"]", "{v:#}");
    let conflicts = v["conflicts"].to_string();
    assert!(
        conflicts.contains("subnet 10.77.1.0/24 of host y overlaps 10.77.0.0/16 held by host z"),
        "{v:#}"
    );
    assert!(v["skipped"].to_string().contains("10.9.0.1-16"), "{v:#}");
    assert_eq!(v["store"]["connected"], true, "{v:#}");
    // The same from a config file, as text.
    let cfg = std::env::temp_dir().join(format!("xh-{}-hosts.toml", std::process::id()));
    std::fs::write(&cfg, format!("[etcd]\nendpoints = [\"{ep}\"]\n")).expect("config");
    let o = xhost(
        h.ns(),
        &dirs,
        &["cluster", "hosts", "--config", &cfg.display().to_string()],
    )
    .expect("cluster hosts");
    let _ = std::fs::remove_file(&cfg);
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(text.contains("hosts (2):"), "{text}");
    assert!(text.contains("10.77.1.0/24 (not routed)"), "{text}");
    assert!(text.contains("conflict: subnet 10.77.1.0/24"), "{text}");
    // No store given: one line saying what to give.
    let o = xhost(h.ns(), &dirs, &["cluster", "hosts"]).expect("cluster hosts");
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success() && err.lines().count() == 1, "{err}");
    assert!(err.contains("--etcd-endpoints"), "{err}");
    assert!(dirs.leftovers().is_empty(), "{:?}", dirs.leftovers());
}

/// The pool subnet a Docker host leased stays the same across agent
/// restarts: within the TTL (`unload --keep-lease`, the lease kept) and
/// after the lease was gone (`unload` revoked it): the agent finds its
/// Docker network and claims its subnet again, and the other host routes it.
#[test]
fn cluster_pool_subnet_kept_across_restarts() {
    require_root();
    assert!(
        std::path::Path::new("/usr/sbin/dockerd").exists(),
        "dockerd missing: apt-get install docker.io busybox-static (scripts/setup.sh)"
    );
    let bed = ClusterBed::new(&ClusterOpts {
        hosts: 2,
        underlay_only: vec![0],
        ..ClusterOpts::default()
    })
    .expect("testbed");
    let etcd = Etcd::start(bed.underlay(), None).expect("etcd");
    let (ha, hb) = (bed.host(0), bed.host(1));
    let mut engine = Engine::prepare_in_netns(ha.name(), &ha.bip()).expect("prepare dockerd");
    engine.boot().expect("start dockerd");
    let b = start(hb, &etcd, &[]);
    let o = xhost(
        hb.ns(),
        &b.dirs,
        &[
            "cluster",
            "init",
            "--pool",
            "10.200.0.0/16",
            "--host-prefix",
            "24",
            "--etcd-endpoints",
            &etcd.endpoint(),
        ],
    )
    .expect("cluster init");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (ep, docker_host) = (etcd.endpoint(), engine.host());
    let a_args = [
        "--iface",
        "ens33",
        "--docker-host",
        docker_host.as_str(),
        "--etcd-endpoints",
        ep.as_str(),
    ];
    let claimed_by_a = |subnet: &str| {
        let key = format!("/xhost/v1/subnets/{}", subnet.replace('/', "-"));
        let t0 = Instant::now();
        loop {
            let v = etcd.ctl_ok(&["get", &key, "--print-value-only"]);
            if v.contains(&ha.underlay_ip().to_string()) {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "{key} not claimed by host-a: {v:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let routed_on_b = |subnet: &str| {
        let want = (subnet.to_owned(), ha.underlay_ip().to_string());
        wait_routes(
            hb,
            &b.dirs,
            "the pool subnet",
            Duration::from_secs(10),
            |r| r.contains(&want),
        );
    };
    let mut a = Agent::start(ha.ns(), ha.role(), &a_args).expect("agent on host-a");
    let first = pool_subnet(&engine);
    assert!(first.starts_with("10.200."), "{first}");
    claimed_by_a(&first);
    routed_on_b(&first);
    for keep_lease in [true, false] {
        let dirs = a.kill().expect("SIGKILL host-a's agent");
        let unload: &[&str] = if keep_lease {
            &["unload", "--keep-lease"]
        } else {
            &["unload"]
        };
        let o = xhost(ha.ns(), &dirs, unload).expect("unload");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        if !keep_lease {
            // The lease is gone with its claims: the pool subnet is free.
            let key = format!("/xhost/v1/subnets/{}", first.replace('/', "-"));
            assert_eq!(etcd.ctl_ok(&["get", &key, "--print-value-only"]).trim(), "");
        }
        let a2 = Agent::start_in(
            &xhost_bin().expect("bin"),
            ha.ns(),
            ha.role(),
            dirs,
            &a_args,
        )
        .expect("restart host-a");
        assert_eq!(pool_subnet(&engine), first, "keep_lease {keep_lease}");
        claimed_by_a(&first);
        routed_on_b(&first);
        assert!(
            a2.output()
                .contains(&format!("pool network xhost: exists with {first}; kept")),
            "{}",
            a2.output()
        );
        a = a2;
    }
    drop(a);
    drop(b);
    drop(engine);
}

/// `GET /metrics` from `addr` on the host's loopback: the body.
fn scrape_metrics(ns: &xhost_tests::NetNs, addr: &'static str) -> String {
    let raw = xhost_tests::xhost::http(ns, addr, "GET", "/metrics");
    let (head, body) = raw.split_once("\r\n\r\n").expect("HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "scrape: {head}");
    body.to_owned()
}

/// The value of the one sample named `name` (no labels) in `body`.
fn sample(body: &str, name: &str) -> Option<i64> {
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// Cluster mode's store series: connected 1 with the view's revision and
/// the lease's TTL, then 0 while etcd is stopped (the last revision and
/// TTL stay), and 1 again once it is back.
#[test]
fn cluster_store_metrics_follow_the_connection() {
    const ADDR: &str = "127.0.0.1:9464";
    let bed = bed(1);
    let mut etcd = Etcd::start(bed.underlay(), None).expect("etcd");
    let host = bed.host(0);
    let agent = start(host, &etcd, &["--lease-ttl", "4", "--metrics-addr", ADDR]);
    let wait = |what: &str, want: i64| {
        let t0 = Instant::now();
        loop {
            let body = scrape_metrics(host.ns(), ADDR);
            if sample(&body, "xhost_store_connected") == Some(want) {
                return body;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(15),
                "{what}: xhost_store_connected never {want}:\n{body}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let up = wait("etcd up", 1);
    let revision = sample(&up, "xhost_store_revision").expect("xhost_store_revision");
    assert!(revision > 0, "a listed view has a revision:\n{up}");
    assert_eq!(
        sample(&up, "xhost_store_lease_ttl_seconds"),
        Some(4),
        "the lease's TTL:\n{up}"
    );
    etcd.kill().expect("stop etcd");
    let down = wait("etcd stopped", 0);
    assert!(
        sample(&down, "xhost_store_revision").is_some_and(|r| r >= revision),
        "the revision held stays:\n{down}"
    );
    etcd.restart().expect("etcd back");
    wait("etcd back", 1);
    drop(agent);
}

/// Two Docker hosts with a dual-stack network each: each publishes its IPv6
/// subnet next to its IPv4 one, the other routes it (`ROUTES6` entry to the
/// host's IPv4 underlay address and a `proto 177` kernel route), ping6
/// crosses both ways, and the IPv6 routes leave when the host's lease ends.
#[test]
fn cluster_ipv6_subnets_published_and_routed() {
    require_root();
    let t_test = Instant::now();
    const NETS: [(&str, &str); 2] = [
        ("192.168.113.0/24", "fd00:113::/64"),
        ("192.168.223.0/24", "fd00:223::/64"),
    ];
    let ttl = 3;
    let bed = ClusterBed::new(&ClusterOpts {
        hosts: 2,
        underlay_only: vec![0, 1],
        ..ClusterOpts::default()
    })
    .expect("testbed");
    let etcd = Etcd::start(bed.underlay(), None).expect("etcd");
    let mut engines = Vec::new();
    let mut agents = Vec::new();
    let mut ip6 = Vec::new();
    for i in 0..2 {
        let h = bed.host(i);
        h.ns()
            .sysctl("net.ipv6.conf.all.forwarding", "1")
            .expect("IPv6 forwarding");
        let mut e = Engine::prepare_in_netns(h.name(), &h.bip()).expect("prepare dockerd");
        e.boot().expect("start dockerd");
        e.import_busybox().expect("import busybox");
        let (v4, v6) = NETS[i];
        e.docker_ok(&[
            "network", "create", "--ipv6", "--subnet", v4, "--subnet", v6, "dual",
        ])
        .expect("docker network create --ipv6");
        let name = ["a1", "b1"][i];
        e.run_container("dual", None, name).expect("docker run");
        let a: std::net::Ipv6Addr = e
            .inspect(
                name,
                "{{(index .NetworkSettings.Networks \"dual\").GlobalIPv6Address}}",
            )
            .expect("inspect")
            .parse()
            .expect("the container's IPv6 address");
        ip6.push(a);
        let host = e.host();
        let ep = etcd.endpoint();
        let ttl_arg = ttl.to_string();
        agents.push(
            Agent::start(
                h.ns(),
                h.role(),
                &[
                    "--iface",
                    "ens33",
                    "--docker-host",
                    &host,
                    "--etcd-endpoints",
                    &ep,
                    "--lease-ttl",
                    &ttl_arg,
                ],
            )
            .expect("agent"),
        );
        engines.push(e);
    }
    let ready = t_test.elapsed();
    // Each host's IPv6 subnet is claimed under its own key, by its host id.
    for (i, (_, v6)) in NETS.iter().enumerate() {
        let key = format!("/xhost/v1/subnets/{}", v6.replace('/', "-"));
        let t0 = Instant::now();
        loop {
            let v = etcd.ctl_ok(&["get", &key, "--print-value-only"]);
            if !v.trim().is_empty() {
                let want = format!("{{\"host\":\"{}\"}}", bed.host(i).underlay_ip());
                assert_eq!(v.trim(), want, "{key}");
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "{key} not claimed: {}",
                etcd.ctl_ok(&["get", "--prefix", "/xhost/v1/", "--keys-only"])
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // The other host routes it via the publishing host's IPv4 underlay address.
    for i in 0..2 {
        let (h, peer) = (bed.host(i), bed.host(1 - i));
        let want6 = format!("{} via {}", NETS[1 - i].1, peer.underlay_ip());
        let want4 = (NETS[1 - i].0.to_owned(), peer.underlay_ip().to_string());
        let (s, took) = wait_status(
            h.ns(),
            &agents[i].dirs,
            "the other host's IPv6 subnet in ROUTES6",
            Duration::from_secs(10),
            |s| status_routes6(s) == [want6.clone()] && status_routes(s).contains(&want4),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        eprintln!("{}: {want6} {took:?} after the agents started", h.role());
        let cluster_hosts = s["agent"]["cluster"]["hosts"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let other = cluster_hosts
            .iter()
            .find(|c| c["id"] == peer.underlay_ip().to_string())
            .unwrap_or_else(|| panic!("{} not in the cluster section: {s}", peer.role()));
        assert!(
            other["routed"]
                .as_array()
                .is_some_and(|r| r.iter().any(|n| n == NETS[1 - i].1)),
            "the cluster section shows the IPv6 subnet routed: {other}"
        );
        assert_eq!(
            kernel_routes6(h.ns()),
            [format!("{} dev ens33", NETS[1 - i].1)],
            "the kernel route of the other host's IPv6 subnet"
        );
    }
    // ping6 both ways, once the containers' and bridges' addresses are past
    // duplicate address detection and the peer's IPv4 neighbour is resolved.
    for i in 0..2 {
        let (ns, name) = (bed.host(i).ns(), ["a1", "b1"][i]);
        let peer = bed.host(1 - i).underlay_ip().to_string();
        let t0 = Instant::now();
        loop {
            let tentative = ns.run(&["ip", "-6", "addr", "show", "tentative"]);
            let c = engines[i]
                .in_container(name, &["ip", "-6", "addr", "show", "tentative"])
                .expect("nsenter")
                .output()
                .expect("ip addr in the container");
            let neigh = ns.run(&["ip", "-4", "neigh", "show", &peer, "dev", "ens33"]);
            if tentative.trim().is_empty() && c.stdout.is_empty() && neigh.contains("lladdr") {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "{}: not settled: {tentative} {c:?} {neigh}",
                bed.host(i).role()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    for i in 0..2 {
        let (from, to) = (["a1", "b1"][i], ip6[1 - i]);
        let p = engines[i].ping_from(from, to, 3).expect("ping6");
        assert!(
            p.transmitted > 0 && p.received == p.transmitted,
            "{from} -> {to}: {}",
            p.output
        );
    }
    // host-b's agent dies: its lease ends, and host-a drops its IPv6 route
    // (map and kernel) with the IPv4 one.
    let b = agents.pop().expect("host-b's agent");
    let dirs = b.kill().expect("SIGKILL host-b's agent");
    remove_instance(&dirs);
    let t0 = Instant::now();
    let (_, took) = wait_status(
        bed.host(0).ns(),
        &agents[0].dirs,
        "host-b's IPv6 route to leave",
        Duration::from_secs(2 * (ttl + 1)),
        |s| status_routes6(s).is_empty() && !status_routes(s).iter().any(|(n, _)| n == NETS[1].0),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("host-b's routes left host-a {took:?} after its agent was killed (TTL {ttl} s)");
    assert!(
        t0.elapsed() <= Duration::from_secs(ttl + 1),
        "took {:?}, more than TTL + 1 s",
        t0.elapsed()
    );
    assert!(
        kernel_routes6(bed.host(0).ns()).is_empty(),
        "host-a's IPv6 kernel route to host-b stays: {:?}",
        kernel_routes6(bed.host(0).ns())
    );
    eprintln!(
        "dual-stack cluster test: {ready:?} to start the engines and agents, {:?} in all",
        t_test.elapsed()
    );
    drop(agents);
    drop(engines);
}
