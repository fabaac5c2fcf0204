//! Real packets through the kernel datapath (`load --datapath kernel`, and
//! `auto` where eBPF cannot load): the kernel forwards, on a route per peer
//! subnet and the rules in xhost's chains `XHOST-FORWARD` (filter) and
//! `XHOST-POSTROUTING` (nat), between two simulated Docker hosts with
//! Docker 20.10's iptables rules (FORWARD policy DROP, isolation chains,
//! MASQUERADE of the container subnet). Needs root; `--test-threads=1`.
//!
//! ```text
//!  ctr-a: eth0 192.168.110.11/24                 ctr-b: eth0 192.168.220.11/24
//!      | veth                                        | veth
//!  host-a: docker0 192.168.110.1/24              host-b: docker0 192.168.220.1/24
//!          ens33 172.16.91.131/24 <== veth ==> ens33 172.16.91.132/24
//!          192.168.220.0/24 via .132 proto 177   192.168.110.0/24 via .131 proto 177
//!          FORWARD -> XHOST-FORWARD (first)      FORWARD -> XHOST-FORWARD (first)
//!          POSTROUTING -> XHOST-POSTROUTING      POSTROUTING -> XHOST-POSTROUTING
//! ```

use std::time::Duration;

use nix::sys::signal::Signal;
use xhost_tests::{
    NetNs, Topology, TopologyOpts, TransferOpts,
    netfilter::iptables_table_counter,
    ping, tcp_transfer,
    xhost::{
        Agent, AgentDirs, StartOpts, load_args, remove_instance, status_json, wait_status, xhost,
    },
};

fn topology() -> Topology {
    assert!(
        xhost_tests::is_root(),
        "these tests build namespaces and iptables rules: run as root (cargo xtask test)"
    );
    Topology::two_hosts(TopologyOpts::default()).expect("build two-host topology")
}

/// `iptables-save` of `ns` without what changes by itself: the comment
/// lines (with their timestamps) and the counters.
fn saved(ns: &NetNs) -> String {
    let text = ns.run(&["iptables-save"]);
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| match (l.starts_with(':'), l.rfind(" [")) {
            (true, Some(i)) => format!("{} [0:0]", &l[..i]),
            _ => l.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn ip_forward(ns: &NetNs) -> String {
    ns.sysctl_get("net.ipv4.ip_forward")
        .expect("read ip_forward")
        .trim()
        .to_owned()
}

/// The routes xhost added in `ns` (`proto 177`), as `prefix via gw`.
fn xhost_routes(ns: &NetNs) -> Vec<String> {
    ns.run(&["ip", "route", "show", "proto", "177"])
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w.len() >= 3 && w[1] == "via").then(|| format!("{} via {}", w[0], w[2]))
        })
        .collect()
}

/// The first rule of `chain` in `table` (`iptables -S`).
fn first_rule(ns: &NetNs, table: &str, chain: &str) -> String {
    ns.run(&["iptables", "-w", "-t", table, "-S", chain])
        .lines()
        .find(|l| l.starts_with("-A "))
        .unwrap_or_default()
        .to_owned()
}

/// Packets that matched xhost's rules in `ns`: (filter, nat).
fn xhost_rule_packets(ns: &NetNs) -> (u64, u64) {
    let sum = |table, chain| {
        iptables_table_counter(ns, table, chain)
            .unwrap_or_else(|e| panic!("{table} {chain} counters: {e}"))
            .rules
            .iter()
            .map(|r| r.packets)
            .sum()
    };
    (
        sum("filter", "XHOST-FORWARD"),
        sum("nat", "XHOST-POSTROUTING"),
    )
}

fn start(host: &xhost_tests::Host, peer: &xhost_tests::Host, extra: &[&str]) -> Agent {
    let args = load_args(host, peer, extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Agent::start(host.ns(), host.role(), &args).expect("xhost-user load --datapath kernel")
}

/// The rules `status` lists for xhost's chains, one string.
fn status_rules(s: &serde_json::Value) -> String {
    s["chains"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|c| c["rules"].as_array().into_iter().flatten())
        .filter_map(|r| r.as_str())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Ping and a checksummed TCP transfer both ways between the first
/// containers; the receiver sees the sender's own address.
fn assert_containers_talk(topo: &Topology, port: u16) {
    let (ca, cb) = (topo.ctr_a(), topo.ctr_b());
    for (from, to) in [(ca, cb), (cb, ca)] {
        let p = ping(from.ns(), to.ip(), 3).expect("ping");
        assert!(p.all_received(), "ping {} -> {}: {p:?}", from.ip(), to.ip());
    }
    for (from, to, port) in [(ca, cb, port), (cb, ca, port + 1)] {
        let opts = TransferOpts {
            port,
            bytes: 4 << 20,
            ..TransferOpts::default()
        };
        let t = tcp_transfer(from.ns(), to.ns(), to.ip(), &opts).expect("tcp transfer");
        assert!(t.intact(), "payload {} -> {}: {t:?}", from.ip(), to.ip());
        assert_eq!(
            t.source_ip(),
            from.ip(),
            "the receiver must see the sender's container address (no MASQUERADE)"
        );
    }
}

fn reaches(from: &NetNs, to: std::net::Ipv4Addr) -> bool {
    ping(from, to, 1).expect("ping").any_received()
}

/// Both hosts on the kernel datapath: containers reach each other by
/// address with their sources kept, through xhost's rules at the top of
/// Docker's chains; `status` names the datapath and lists rules and routes;
/// stopping the agent, and `unload` of a detached one, leave iptables-save
/// exactly as before the load and put ip_forward back.
#[test]
fn kernel_datapath_forwards_and_unload_restores_iptables_exactly() {
    let topo = topology();
    let (a, b) = (topo.host_a(), topo.host_b());
    let (ca, cb) = (topo.ctr_a(), topo.ctr_b());
    // Forwarding off on A (Docker would have turned it on): load turns it
    // on, unload puts it back.
    a.ns()
        .sysctl("net.ipv4.ip_forward", "0")
        .expect("ip_forward 0");
    let before = (saved(a.ns()), saved(b.ns()));
    assert!(!reaches(ca.ns(), cb.ip()), "A reached B before any load");

    let agent_a = start(a, b, &["--datapath", "kernel"]);
    let agent_b = start(b, a, &["--datapath", "kernel"]);
    assert_eq!(ip_forward(a.ns()), "1", "load turns forwarding on");
    for (host, peer) in [(a, b), (b, a)] {
        let ns = host.ns();
        assert_eq!(
            first_rule(ns, "filter", "FORWARD"),
            "-A FORWARD -j XHOST-FORWARD"
        );
        assert_eq!(
            first_rule(ns, "nat", "POSTROUTING"),
            "-A POSTROUTING -j XHOST-POSTROUTING"
        );
        assert_eq!(
            xhost_routes(ns),
            [format!("{} via {}", peer.subnet(), peer.underlay_ip())]
        );
        // No eBPF: nothing pinned.
        assert!(!agent_a.dirs.pin_dir.exists() && !agent_b.dirs.pin_dir.exists());
    }
    let rules0 = (xhost_rule_packets(a.ns()), xhost_rule_packets(b.ns()));
    assert_containers_talk(&topo, 45_301);
    let rules1 = (xhost_rule_packets(a.ns()), xhost_rule_packets(b.ns()));
    for (r0, r1, host) in [(rules0.0, rules1.0, "A"), (rules0.1, rules1.1, "B")] {
        assert!(r1.0 > r0.0, "host {host}: XHOST-FORWARD accepted nothing");
        assert!(
            r1.1 > r0.1,
            "host {host}: XHOST-POSTROUTING exempted nothing"
        );
    }

    let s = status_json(a.ns(), &agent_a.dirs);
    assert_eq!(s["agent"]["datapath"], "kernel");
    assert_eq!(s["routes"][0]["prefix"], b.subnet().to_string());
    assert_eq!(s["routes"][0]["peer"], b.underlay_ip().to_string());
    assert_eq!(s["local_subnets"][0]["prefix"], a.subnet().to_string());
    let rules = status_rules(&s);
    for want in [
        "-A FORWARD -j XHOST-FORWARD".to_owned(),
        format!(
            "-A XHOST-FORWARD -s {} -d {} -j ACCEPT",
            a.subnet(),
            b.subnet()
        ),
        format!(
            "-A XHOST-FORWARD -s {} -d {} -j ACCEPT",
            b.subnet(),
            a.subnet()
        ),
        "-A POSTROUTING -j XHOST-POSTROUTING".to_owned(),
        format!(
            "-A XHOST-POSTROUTING -s {} -d {} -j ACCEPT",
            a.subnet(),
            b.subnet()
        ),
    ] {
        assert!(rules.contains(&want), "status lacks `{want}`:\n{rules}");
    }
    let text = xhost(a.ns(), &agent_a.dirs, &["status"]).expect("status");
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("datapath kernel"), "status: {text}");
    let watch = xhost(
        a.ns(),
        &agent_a.dirs,
        &["status", "--watch", "--count", "1"],
    )
    .expect("status --watch");
    assert_eq!(
        String::from_utf8_lossy(&watch.stderr).trim(),
        "xhost-user: the kernel datapath keeps no counters to watch: `status` lists its rules"
    );

    // Ctrl-C: everything of xhost's gone, exactly.
    let (status, left) = agent_a.stop_with(Signal::SIGINT).expect("stop A");
    assert!(
        status.success() && left.is_empty(),
        "A: {status:?} left {left:?}"
    );
    assert_eq!(saved(a.ns()), before.0, "iptables-save of A after the stop");
    assert_eq!(ip_forward(a.ns()), "0", "ip_forward put back");
    assert!(xhost_routes(a.ns()).is_empty());
    assert!(!reaches(ca.ns(), cb.ip()), "A reaches B after the stop");

    // Detached: keeps forwarding without an agent until `unload`.
    let dirs = AgentDirs::unique("a-detached");
    let mut args = vec!["load".to_owned()];
    args.extend(load_args(a, b, &["--datapath", "kernel", "--detach"]));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = xhost(a.ns(), &dirs, &args).expect("load --detach");
    assert!(
        out.status.success(),
        "load --detach: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_containers_talk(&topo, 45_303);
    let s = status_json(a.ns(), &dirs);
    assert_eq!(s["agent"]["datapath"], "kernel");
    assert_eq!(s["agent_running"], false);
    let out = xhost(a.ns(), &dirs, &["unload"]).expect("unload");
    assert!(
        out.status.success(),
        "unload: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(dirs.leftovers(), Vec::<std::path::PathBuf>::new());
    remove_instance(&dirs);
    assert_eq!(saved(a.ns()), before.0, "iptables-save of A after unload");
    assert_eq!(ip_forward(a.ns()), "0", "ip_forward put back by unload");
    assert!(xhost_routes(a.ns()).is_empty());
    assert!(!reaches(ca.ns(), cb.ip()), "A reaches B after unload");

    let (status, left) = agent_b.stop_with(Signal::SIGTERM).expect("stop B");
    assert!(
        status.success() && left.is_empty(),
        "B: {status:?} left {left:?}"
    );
    assert_eq!(saved(b.ns()), before.1, "iptables-save of B after the stop");
}

/// A config file, removed when dropped.
struct ConfigFile(std::path::PathBuf);
impl ConfigFile {
    fn temp(tag: &str) -> Self {
        Self(std::env::temp_dir().join(format!("xhost-{tag}-{}.toml", std::process::id())))
    }

    fn write(&self, text: &str) {
        std::fs::write(&self.0, text).expect("write config");
    }
}
impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn hup(agent: &Agent) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.pid() as i32),
        Signal::SIGHUP,
    )
    .expect("SIGHUP");
}

/// A second container subnet on host A: bridge `xhk0` 10.77.0.1/24 and a
/// container 10.77.0.11 on it, in a namespace of its own (removed when
/// dropped; the bridge goes with host A's namespace).
fn second_bridge(host: &NetNs) -> NetNs {
    let ctr = NetNs::new("ctr-a2").expect("container namespace");
    host.ip_batch(&format!(
        "link add xhk0 type bridge\n\
         addr add 10.77.0.1/24 dev xhk0\n\
         link set xhk0 up\n\
         link add xhk0p1 type veth peer name eth0 netns {}\n\
         link set xhk0p1 master xhk0\n\
         link set xhk0p1 up\n",
        ctr.name()
    ))
    .expect("second bridge");
    ctr.ip_batch(
        "link set lo up\n\
         addr add 10.77.0.11/24 dev eth0\n\
         link set eth0 up\n\
         route add default via 10.77.0.1\n",
    )
    .expect("second container");
    ctr
}

/// SIGHUP moves the kernel datapath's peers and bridges in place: a peer
/// removed loses its route and rules (traffic stops), put back it gets them
/// again; a bridge added to the config brings its subnet's rules, so its
/// container reaches the peer with its own address; removed, they go.
#[test]
fn kernel_datapath_follows_reloads_and_new_bridges() {
    let topo = topology();
    let (a, b) = (topo.host_a(), topo.host_b());
    let cb = topo.ctr_b();
    let before = saved(a.ns());
    // B knows both of A's subnets from the start.
    let peer_a = format!("{}={},10.77.0.0/24", a.underlay_ip(), a.subnet());
    let _agent_b = Agent::start(
        b.ns(),
        b.role(),
        &[
            "--iface",
            b.underlay_iface(),
            "--bridge",
            b.bridge(),
            "--no-docker",
            "--peer",
            &peer_a,
            "--datapath",
            "kernel",
        ],
    )
    .expect("load B");
    let cfg = ConfigFile::temp("kdp-reload");
    let head = |bridges: &str| {
        format!(
            "iface = \"{}\"\nbridges = [{bridges}]\ndocker = false\ndatapath = \"kernel\"\n",
            a.underlay_iface()
        )
    };
    let docker0 = format!("\"{}\"", a.bridge());
    let peer_b = format!(
        "[[peer]]\nhost = \"{}\"\nsubnets = [\"{}\"]\n",
        b.underlay_ip(),
        b.subnet()
    );
    let other = "[[peer]]\nhost = \"172.16.91.200\"\nsubnets = [\"10.250.0.0/16\"]\n";
    cfg.write(&format!("{}{peer_b}", head(&docker0)));
    let cfg_arg = cfg.0.display().to_string();
    let agent = Agent::start(a.ns(), a.role(), &["--config", &cfg_arg]).expect("load A");
    let ctr_a = topo.ctr_a().ns();
    assert!(reaches(ctr_a, cb.ip()), "B reachable with B as peer");
    let dirs = agent.dirs.clone();
    let wait_rules = |what: &str, pred: &dyn Fn(&str) -> bool| {
        wait_status(a.ns(), &dirs, what, Duration::from_secs(5), |s| {
            pred(&status_rules(s))
        })
        .unwrap_or_else(|e| panic!("{e}"))
    };
    let b_net = b.subnet().to_string();

    // B out, another peer in.
    cfg.write(&format!("{}{other}", head(&docker0)));
    hup(&agent);
    wait_rules("B's rules gone", &|r| {
        !r.contains(&b_net) && r.contains("10.250.0.0/16")
    });
    assert_eq!(xhost_routes(a.ns()), ["10.250.0.0/16 via 172.16.91.200"]);
    assert!(!reaches(ctr_a, cb.ip()), "B's subnet is no longer a peer's");

    // B back.
    cfg.write(&format!("{}{peer_b}", head(&docker0)));
    hup(&agent);
    wait_rules("B's rules back", &|r| r.contains(&b_net));
    assert_eq!(
        xhost_routes(a.ns()),
        [format!("{} via {}", b.subnet(), b.underlay_ip())]
    );
    assert_containers_talk(&topo, 45_311);

    // A second bridge: its container is dropped by Docker's FORWARD policy
    // until the bridge is in the config.
    let ctr2 = second_bridge(a.ns());
    let ip2: std::net::Ipv4Addr = "10.77.0.11".parse().expect("ip");
    assert!(
        !reaches(&ctr2, cb.ip()),
        "the new bridge forwarded before its rules"
    );
    cfg.write(&format!(
        "{}{peer_b}",
        head(&format!("{docker0}, \"xhk0\""))
    ));
    hup(&agent);
    wait_rules("the new bridge's rules", &|r| {
        r.contains(&format!(
            "-A XHOST-FORWARD -s 10.77.0.0/24 -d {b_net} -j ACCEPT"
        )) && r.contains(&format!(
            "-A XHOST-FORWARD -s {b_net} -d 10.77.0.0/24 -j ACCEPT"
        ))
    });
    let p = ping(&ctr2, cb.ip(), 3).expect("ping");
    assert!(p.all_received(), "new bridge's container -> B: {p:?}");
    let t = tcp_transfer(
        cb.ns(),
        &ctr2,
        ip2,
        &TransferOpts {
            port: 45_313,
            ..TransferOpts::default()
        },
    )
    .expect("B -> new bridge's container");
    assert!(t.intact() && t.source_ip() == cb.ip(), "{t:?}");
    let t = tcp_transfer(
        &ctr2,
        cb.ns(),
        cb.ip(),
        &TransferOpts {
            port: 45_314,
            ..TransferOpts::default()
        },
    )
    .expect("new bridge's container -> B");
    assert!(t.intact() && t.source_ip() == ip2, "{t:?}");

    // The bridge leaves the config: its rules go, its traffic stops.
    cfg.write(&format!("{}{peer_b}", head(&docker0)));
    hup(&agent);
    wait_rules("the new bridge's rules gone", &|r| {
        !r.contains("10.77.0.0/24")
    });
    assert!(
        !reaches(&ctr2, cb.ip()),
        "the removed bridge still forwards"
    );
    assert!(reaches(ctr_a, cb.ip()), "docker0 lost its path");

    let (status, left) = agent.stop_with(Signal::SIGINT).expect("stop A");
    assert!(
        status.success() && left.is_empty(),
        "A: {status:?} left {left:?}"
    );
    assert_eq!(saved(a.ns()), before, "iptables-save of A after the stop");
}

/// `--datapath auto` where eBPF cannot load: the agent runs without
/// CAP_BPF, CAP_SYS_ADMIN and CAP_PERFMON (as a container or a unit
/// without them would), so the kernel refuses every BPF program. It says so
/// in one warning and sets up the kernel datapath, which works.
#[test]
fn auto_without_cap_bpf_falls_back_to_the_kernel_datapath() {
    let topo = topology();
    let (a, b) = (topo.host_a(), topo.host_b());
    let before = saved(a.ns());
    let opts = StartOpts {
        wrapper: vec![
            "setpriv",
            "--bounding-set=-bpf,-sys_admin,-perfmon",
            "--inh-caps=-all",
            "--",
        ],
        ..StartOpts::default()
    };
    let args = load_args(a, b, &["--datapath", "auto"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let agent_a = Agent::start_opts(a.ns(), a.role(), &args, &opts).expect("load auto");
    let _agent_b = start(b, a, &["--datapath", "kernel"]);
    let out = agent_a.output();
    let warnings: Vec<&str> = out.lines().filter(|l| l.contains("WARN")).collect();
    assert_eq!(warnings.len(), 1, "one warning: {out}");
    assert!(
        warnings[0].contains("the eBPF datapath cannot run here")
            && warnings[0].contains("Operation not permitted"),
        "the warning says why: {out}"
    );
    assert!(!agent_a.dirs.pin_dir.exists(), "nothing pinned");
    assert_eq!(
        status_json(a.ns(), &agent_a.dirs)["agent"]["datapath"],
        "kernel"
    );
    assert_containers_talk(&topo, 45_321);
    let (status, left) = agent_a.stop_with(Signal::SIGTERM).expect("stop A");
    assert!(
        status.success() && left.is_empty(),
        "A: {status:?} left {left:?}"
    );
    assert_eq!(saved(a.ns()), before, "iptables-save of A after the stop");
}

/// What the kernel datapath cannot do is refused in one line, before
/// anything is touched; so is a second kernel datapath in one namespace.
#[test]
fn kernel_datapath_refuses_what_it_cannot_do() {
    let topo = topology();
    let (a, b) = (topo.host_a(), topo.host_b());
    let before = saved(a.ns());
    let refused = |extra: &[&str], want: &str| {
        let dirs = AgentDirs::unique("refused");
        let mut args = vec!["load".to_owned()];
        args.extend(load_args(a, b, extra));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = xhost(a.ns(), &dirs, &args).expect("run load");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{extra:?} accepted");
        assert_eq!(err.trim(), format!("xhost-user: {want}"), "{extra:?}");
        assert!(
            dirs.leftovers().is_empty(),
            "{extra:?} left {:?}",
            dirs.leftovers()
        );
        assert_eq!(saved(a.ns()), before, "{extra:?} changed iptables");
    };
    refused(
        &["--datapath", "kernel", "--tunnel", "vxlan"],
        "--datapath kernel routes natively: VXLAN mode (--tunnel vxlan) needs the eBPF datapath",
    );
    refused(
        &["--datapath", "kernel", "--xdp-mode", "native"],
        "--datapath kernel attaches no XDP program: drop --xdp-mode",
    );
    refused(
        &["--datapath", "kernel", "--metrics-addr", "127.0.0.1:9464"],
        "--datapath kernel has no datapath counters to serve: drop --metrics-addr",
    );
    let agent = start(a, b, &["--datapath", "kernel"]);
    let dirs = AgentDirs::unique("second");
    let mut args = vec!["load".to_owned()];
    args.extend(load_args(a, b, &["--datapath", "kernel"]));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = xhost(a.ns(), &dirs, &args).expect("run load");
    assert!(
        !out.status.success(),
        "a second kernel datapath was accepted"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("iptables chain XHOST-FORWARD exists"), "{err}");
    assert!(dirs.leftovers().is_empty());
    // The first one is untouched by the refusal.
    assert_eq!(
        first_rule(a.ns(), "filter", "FORWARD"),
        "-A FORWARD -j XHOST-FORWARD"
    );
    let (status, left) = agent.stop_with(Signal::SIGINT).expect("stop");
    assert!(
        status.success() && left.is_empty(),
        "{status:?} left {left:?}"
    );
    assert_eq!(saved(a.ns()), before);
}
