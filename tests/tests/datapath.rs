//! Real packets through the xhost datapath between two simulated Docker
//! hosts (Docker-like iptables: FORWARD DROP, isolation chains,
//! MASQUERADE; no static routes). Needs root; `--test-threads=1`.
//!
//! ```text
//!  ctr-a: eth0 192.168.110.11/24                 ctr-b: eth0 192.168.220.11/24
//!      | veth                                        | veth
//!  host-a: docker0 192.168.110.1/24              host-b: docker0 192.168.220.1/24
//!          ens33 172.16.91.131/24 <== veth ==> ens33 172.16.91.132/24
//!          xhost: TC on docker0 + ens33, XDP on ens33 (each host)
//! ```

use nix::sys::signal::Signal;
use xhost_tests::{
    CtFilter, NetNs, Topology, TopologyOpts, TransferOpts, UdpGsoOpts, conntrack_entries,
    iptables_counter,
    link::set_gso_ipv4_max_size,
    netfilter::iptables_table_counter,
    ping, tcp_transfer, udp_gso_transfer,
    xhost::{
        Agent, AgentDirs, attached_programs, counter, load_args, remove_instance, status_json,
        status_routes, tc_hook, xhost,
    },
};

fn require_root() {
    assert!(
        xhost_tests::is_root(),
        "these tests load eBPF programs and build namespaces: run as root (cargo xtask test)"
    );
}

fn topology() -> Topology {
    require_root();
    Topology::two_hosts(TopologyOpts::default()).expect("build two-host topology")
}

fn start(host: &xhost_tests::Host, peer: &xhost_tests::Host, extra: &[&str]) -> Agent {
    let args = load_args(host, peer, extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Agent::start(host.ns(), host.role(), &args).expect("xhost-user load")
}

/// Programs attached to the host's underlay, bridge and container veths (tcx, tc + XDP).
fn xhost_programs(host: &xhost_tests::Host) -> String {
    let mut ifaces = vec![host.underlay_iface(), host.bridge()];
    ifaces.extend(host.containers().iter().map(|c| c.host_veth()));
    attached_programs(host.ns(), &ifaces)
        .expect("query attachments")
        .join("\n")
}

fn forward_packets(ns: &NetNs) -> u64 {
    iptables_counter(ns, "FORWARD")
        .expect("FORWARD counters")
        .total_packets()
}

#[test]
fn containers_reach_each_other_only_through_xhost() {
    let topo = topology();
    let (a, b) = (topo.host_a(), topo.host_b());
    let (ca, cb) = (topo.ctr_a(), topo.ctr_b());

    // The problem: out of the box, no route between the container subnets.
    assert!(
        !ping(ca.ns(), cb.ip(), 1).expect("ping").any_received(),
        "A reached B before xhost was loaded"
    );

    let agent_a = start(a, b, &[]);
    let agent_b = start(b, a, &[]);
    let fwd_before = (forward_packets(a.ns()), forward_packets(b.ns()));
    let sa0 = status_json(a.ns(), &agent_a.dirs);
    let sb0 = status_json(b.ns(), &agent_b.dirs);

    // Ping both ways: exactly these packets are forwarded by the datapath.
    let p = ping(ca.ns(), cb.ip(), 5).expect("ping A->B");
    assert!(p.all_received(), "ping A->B through xhost: {p:?}");
    let p = ping(cb.ns(), ca.ip(), 5).expect("ping B->A");
    assert!(p.all_received(), "ping B->A through xhost: {p:?}");
    let sa1 = status_json(a.ns(), &agent_a.dirs);
    let sb1 = status_json(b.ns(), &agent_b.dirs);
    for (s0, s1, host) in [(&sa0, &sa1, "A"), (&sb0, &sb1, "B")] {
        // 5 own requests + 5 replies out, 5 requests + 5 replies in.
        assert_eq!(
            counter(s1, "fwd_egress") - counter(s0, "fwd_egress"),
            10,
            "host {host} fwd_egress"
        );
        assert_eq!(
            counter(s1, "fwd_ingress") - counter(s0, "fwd_ingress"),
            10,
            "host {host} fwd_ingress"
        );
        assert_eq!(
            counter(s1, "drop_spoofed"),
            0,
            "host {host} dropped nothing"
        );
    }

    // TCP both ways, payload verified, container IPs preserved (no NAT).
    for (from, to, port) in [(ca, cb, 45_101u16), (cb, ca, 45_102)] {
        let opts = TransferOpts {
            port,
            bytes: 8 << 20,
            ..TransferOpts::default()
        };
        let t = tcp_transfer(from.ns(), to.ns(), to.ip(), &opts).expect("tcp transfer");
        assert!(
            t.intact(),
            "payload corrupted {} -> {}: {t:?}",
            from.ip(),
            to.ip()
        );
        assert_eq!(
            t.source_ip(),
            from.ip(),
            "receiver must see the sender's container IP"
        );
    }

    // Netfilter never saw the traffic: no FORWARD rule hit, no conntrack entry.
    assert_eq!(
        (forward_packets(a.ns()), forward_packets(b.ns())),
        fwd_before,
        "FORWARD chain counters moved"
    );
    for host in [a, b] {
        for (s, d) in [(ca.ip(), cb.ip()), (cb.ip(), ca.ip())] {
            let ct = conntrack_entries(host.ns(), &CtFilter::flow(s, d)).expect("conntrack");
            assert!(
                ct.is_empty(),
                "conntrack on {} holds the flow {s}->{d}: {ct:?}",
                host.role()
            );
        }
    }

    // Ctrl-C: clean exit, nothing of xhost left, and the path is gone again.
    let (status, left) = agent_a.stop_with(Signal::SIGINT).expect("stop A");
    assert!(status.success(), "agent A exit: {status:?}");
    assert!(left.is_empty(), "agent A left {left:?}");
    assert_eq!(xhost_programs(a), "", "programs still attached on host A");
    let (status, left) = agent_b.stop_with(Signal::SIGTERM).expect("stop B");
    assert!(
        status.success() && left.is_empty(),
        "agent B: {status:?} left {left:?}"
    );
    assert_eq!(xhost_programs(b), "", "programs still attached on host B");
    assert!(
        !ping(ca.ns(), cb.ip(), 1).expect("ping").any_received(),
        "A reaches B after unload"
    );
}

/// `status --json` shows the attachments (the container's veth found from
/// the bridge's neighbour and FDB tables once it has sent), the endpoint,
/// routes and local subnet as the maps hold them, and the kernel agrees;
/// bpftool reads the pinned maps field by field.
#[test]
fn status_and_bpftool_show_what_is_attached_and_what_the_maps_hold() {
    let topo = topology();
    let (a, b) = (topo.host_a(), topo.host_b());
    let (ca, cb) = (topo.ctr_a(), topo.ctr_b());
    let agent_a = start(a, b, &[]);
    let _agent_b = start(b, a, &[]);
    let p = ping(ca.ns(), cb.ip(), 1).expect("ping A->B");
    assert!(p.all_received(), "ping A->B through xhost: {p:?}");
    let (s, _) = xhost_tests::xhost::wait_status(
        a.ns(),
        &agent_a.dirs,
        "A's container attached and in ENDPOINTS",
        std::time::Duration::from_secs(10),
        |s| {
            s["endpoints"][0]["ip"] == ca.ip().to_string()
                && s["attached"].as_array().is_some_and(|x| x.len() == 3)
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let attached: Vec<String> = s["attached"]
        .as_array()
        .expect("attached")
        .iter()
        .map(|x| {
            format!(
                "{}@{}",
                x["iface"].as_str().unwrap_or(""),
                x["hook"].as_str().unwrap_or("")
            )
        })
        .collect();
    // Default XDP mode on a veth underlay: off (XDP would strip the peer's
    // TSO). The container's veth was found from the bridge's neighbour and
    // FDB tables and carries the per-container program.
    let port = format!("{}@ctr-ingress", ca.host_veth());
    assert_eq!(
        attached,
        [
            "docker0@bridge-ingress",
            "ens33@underlay-ingress",
            port.as_str()
        ]
    );
    let ep = &s["endpoints"][0];
    assert_eq!(ep["ip"], ca.ip().to_string());
    assert_eq!(ep["ifindex"], ca.host_veth_ifindex());
    assert_eq!(
        ep["mac"].as_str().map(str::to_lowercase),
        Some(ca.mac().to_lowercase())
    );
    assert_eq!(s["agent"]["xdp"], "off");
    // ... and the kernel agrees (this is what the "nothing left" checks use).
    let live = xhost_programs(a);
    let ingress = tc_hook("ingress");
    let port_live = format!("{} {ingress} xhost_veth_in", ca.host_veth());
    let ul_live = format!("ens33 {ingress} xhost_nic_in");
    let br_live = format!("docker0 {ingress} xhost_bridge_in");
    for want in [ul_live.as_str(), br_live.as_str(), port_live.as_str()] {
        assert!(live.contains(want), "{want} not attached: {live}");
    }
    assert_eq!(s["routes"][0]["prefix"], "192.168.220.0/24");
    assert_eq!(s["routes"][0]["peer"], "172.16.91.132");
    assert_eq!(s["local_subnets"][0]["prefix"], "192.168.110.0/24");

    // bpftool reads the pinned BTF maps field by field.
    // (From this process: maps belong to no netns, and `ip netns exec` would
    // remount /sys and hide the bpffs.)
    let out = std::process::Command::new("bpftool")
        .args([
            "map",
            "dump",
            "pinned",
            &format!("{}/ROUTES", agent_a.dirs.pin_dir.display()),
        ])
        .output()
        .expect("bpftool");
    let dump = String::from_utf8_lossy(&out.stdout);
    assert!(
        dump.contains("\"prefix_len\": 24") && dump.contains("\"host\""),
        "bpftool dump: {dump}"
    );
}

#[test]
fn every_xdp_mode_attaches_forwards_and_drops_spoofed() {
    let topo = topology();
    let (a, b) = (topo.host_a(), topo.host_b());
    // Host B sends to container A from its own (non-peer) address.
    b.ns().run(&[
        "ip",
        "route",
        "replace",
        &a.subnet().to_string(),
        "via",
        &a.underlay_ip().to_string(),
    ]);
    for (mode, status, xdp_attached) in [
        ("native", "native", true),
        ("skb", "skb", true),
        ("off", "off", false),
    ] {
        let agent_a = start(a, b, &["--xdp-mode", mode]);
        let agent_b = start(b, a, &[]);
        let s0 = status_json(a.ns(), &agent_a.dirs);
        assert_eq!(s0["agent"]["xdp"], status, "--xdp-mode {mode}");
        let live = xhost_programs(a);
        assert_eq!(
            live.contains("ens33 xdp"),
            xdp_attached,
            "--xdp-mode {mode}: {live}"
        );
        assert!(
            ping(topo.ctr_a().ns(), topo.ctr_b().ip(), 2)
                .expect("ping")
                .all_received(),
            "--xdp-mode {mode}"
        );
        assert_spoof_dropped(&topo, &agent_a, 2, &format!("--xdp-mode {mode}"));
        for agent in [agent_a, agent_b] {
            let (st, left) = agent.stop_with(Signal::SIGTERM).expect("stop");
            assert!(
                st.success() && left.is_empty(),
                "--xdp-mode {mode}: {st:?} {left:?}"
            );
        }
        assert_eq!(xhost_programs(a), "", "--xdp-mode {mode}: left attached");
    }
}

#[test]
fn detached_datapath_keeps_forwarding_until_unload() {
    let topo = topology();
    let (a, b) = (topo.host_a(), topo.host_b());
    let dirs = [AgentDirs::unique("a"), AgentDirs::unique("b")];
    let guard = scopeguard(&dirs);
    for ((host, peer), d) in [(a, b), (b, a)].into_iter().zip(&dirs) {
        let mut args = vec!["load".to_owned()];
        args.extend(load_args(host, peer, &["--detach"]));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = xhost(host.ns(), d, &args).expect("load --detach");
        assert!(
            out.status.success(),
            "load --detach: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ready");
    }
    // The loading processes are gone; the pinned datapath forwards.
    let p = ping(topo.ctr_a().ns(), topo.ctr_b().ip(), 3).expect("ping");
    assert!(p.all_received(), "detached datapath forwards: {p:?}");
    let s = status_json(a.ns(), &dirs[0]);
    assert_eq!(s["agent_running"], false);
    assert_eq!(s["attached"].as_array().map(Vec::len), Some(2));

    // unload with the wrong interface is refused and changes nothing.
    let out = xhost(a.ns(), &dirs[0], &["unload", "--iface", "eth9"]).expect("unload");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("serves ens33, not eth9"));
    assert!(
        ping(topo.ctr_a().ns(), topo.ctr_b().ip(), 1)
            .expect("ping")
            .all_received()
    );

    for ((host, d), iface) in [a, b].into_iter().zip(&dirs).zip(["ens33", "ens33"]) {
        let out = xhost(host.ns(), d, &["unload", "--iface", iface]).expect("unload");
        assert!(
            out.status.success(),
            "unload: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(d.leftovers().is_empty(), "unload left {:?}", d.leftovers());
        assert_eq!(
            xhost_programs(host),
            "",
            "programs still attached after unload"
        );
    }
    assert!(
        !ping(topo.ctr_a().ns(), topo.ctr_b().ip(), 1)
            .expect("ping")
            .any_received()
    );
    let out = xhost(a.ns(), &dirs[0], &["unload"]).expect("unload");
    assert!(
        !out.status.success(),
        "second unload must say nothing is loaded"
    );
    drop(guard);
}

/// A classic BPF program (tc's `bytecode` syntax) for a cls_bpf filter in
/// direct-action mode, as another tool might add: drops ICMP echo requests
/// (IPv4, no options), leaves everything else to later filters
/// (`TC_ACT_UNSPEC`):
/// `ldh [12]; jne #0x800, pass; ldb [23]; jne #1, pass; ldb [34]; jne #8, pass; ret #2; pass: ret #-1`.
const DROP_ECHO_REQUESTS: &str =
    "8,40 0 0 12,21 0 5 2048,48 0 0 23,21 0 3 1,48 0 0 34,21 0 1 8,6 0 0 2,6 0 0 4294967295";

/// Another tool's tc filter on the underlay, added before xhost with the
/// kernel's default priority (49152), runs on through xhost's
/// load, a crash and unload, each way xhost can end (Ctrl-C, SIGKILL +
/// `unload`, `--detach` + `unload`), and is exactly as it was afterwards;
/// the clsact qdisc xhost added on the bridge goes, the one the other tool
/// added on the underlay stays.
///
/// ```text
///  host-a: ens33 ingress: [xhost pref 30824] -> [other tool: drop ICMP echo requests]
/// ```
/// Containers ping each other through xhost (redirected before the other
/// filter), host B cannot ping host A's own address (the other filter
/// drops what xhost hands on), host A can ping host B.
#[test]
fn other_tc_filters_keep_working_through_load_crash_and_unload() {
    let topo = topology();
    let (a, b) = (topo.host_a(), topo.host_b());
    let (ca, cb) = (topo.ctr_a(), topo.ctr_b());
    let tc = |args: &[&str]| {
        let mut all = vec!["tc"];
        all.extend_from_slice(args);
        a.ns().run(&all)
    };
    tc(&["qdisc", "add", "dev", "ens33", "clsact"]);
    tc(&[
        "filter",
        "add",
        "dev",
        "ens33",
        "ingress",
        "protocol",
        "all",
        "bpf",
        "bytecode",
        DROP_ECHO_REQUESTS,
        "da",
    ]);
    let filters_before = tc(&["filter", "show", "dev", "ens33", "ingress"]);
    assert!(
        filters_before.contains("pref 49152 bpf") && filters_before.contains("bytecode"),
        "the other tool's filter: {filters_before}"
    );
    let qdiscs_before = tc(&["qdisc", "show"]);
    let host_ping = |from: &xhost_tests::Host, to: &xhost_tests::Host| {
        ping(from.ns(), to.underlay_ip(), 1)
            .expect("ping")
            .any_received()
    };
    assert!(!host_ping(b, a), "the other filter drops B's echo requests");
    assert!(host_ping(a, b), "A's echo requests and their replies pass");

    let _agent_b = start(b, a, &[]);
    for end in ["sigterm", "crash", "detach"] {
        let dirs = AgentDirs::unique("a");
        let _cleanup = Cleanup(std::slice::from_ref(&dirs));
        let agent = if end == "detach" {
            let mut args = vec!["load".to_owned()];
            args.extend(load_args(a, b, &["--detach"]));
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = xhost(a.ns(), &dirs, &args).expect("load --detach");
            assert!(
                out.status.success(),
                "load --detach: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            None
        } else {
            Some(start(a, b, &[]))
        };
        let dirs = agent.as_ref().map_or(dirs.clone(), |g| g.dirs.clone());
        let live = xhost_programs(a);
        let ul = format!("ens33 {} xhost_nic_in", tc_hook("ingress"));
        assert!(live.contains(&ul), "{end}: {ul} not attached: {live}");
        let filters = tc(&["filter", "show", "dev", "ens33", "ingress"]);
        for line in filters_before.lines() {
            assert!(
                filters.lines().any(|l| l == line),
                "{end}: the other filter is gone with xhost loaded: {filters}"
            );
        }
        let p = ping(ca.ns(), cb.ip(), 3).expect("ping");
        assert!(p.all_received(), "{end}: A->B through xhost: {p:?}");
        let p = ping(cb.ns(), ca.ip(), 3).expect("ping");
        assert!(p.all_received(), "{end}: B->A through xhost: {p:?}");
        assert!(
            !host_ping(b, a),
            "{end}: B's echo request to host A got past the other filter with xhost loaded"
        );
        assert!(host_ping(a, b), "{end}: host A -> host B with xhost loaded");

        match (end, agent) {
            ("sigterm", Some(agent)) => {
                let (status, left) = agent.stop_with(Signal::SIGTERM).expect("stop");
                assert!(status.success() && left.is_empty(), "{status:?} {left:?}");
            }
            ("crash", Some(mut agent)) => {
                // Killed by PID; the guard stays alive (its drop would remove
                // the pins) until unload has run.
                let pid = nix::unistd::Pid::from_raw(agent.pid() as i32);
                nix::sys::signal::kill(pid, Signal::SIGKILL).expect("kill the agent");
                while agent.running() {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                assert!(
                    !dirs.leftovers().is_empty(),
                    "a killed agent leaves its pins"
                );
                // What was attached stays attached and forwarding, until unload.
                let p = ping(ca.ns(), cb.ip(), 1).expect("ping");
                assert!(p.all_received(), "after the crash: {p:?}");
                assert!(!host_ping(b, a), "after the crash: the other filter");
                unload_ok(a, &dirs);
                drop(agent);
            }
            _ => unload_ok(a, &dirs),
        }
        assert!(
            dirs.leftovers().is_empty(),
            "{end}: left {:?}",
            dirs.leftovers()
        );
        assert_eq!(xhost_programs(a), "", "{end}: xhost still attached");
        assert_eq!(
            tc(&["filter", "show", "dev", "ens33", "ingress"]),
            filters_before,
            "{end}: the underlay's filters after unload"
        );
        assert_eq!(
            tc(&["qdisc", "show"]),
            qdiscs_before,
            "{end}: qdiscs after unload"
        );
        assert!(!host_ping(b, a), "{end}: the other filter after unload");
        assert!(
            !ping(ca.ns(), cb.ip(), 1).expect("ping").any_received(),
            "{end}: A reaches B after unload"
        );
    }
}

/// `status` names the attach method in use (auto: tcx where the kernel has
/// it) and what the kernel offered, and per attachment how it is held; a
/// classic filter deleted behind xhost's back shows as missing. A forced
/// method the kernel lacks is one error line with nothing touched.
#[test]
fn status_names_the_attach_method_and_a_forced_one_the_kernel_lacks_is_refused() {
    let topo = topology();
    let (a, b) = (topo.host_a(), topo.host_b());
    let kernel_tcx = xhost_tests::xhost::kernel_has_tcx();
    if !kernel_tcx {
        let args = load_args(a, b, &["--attach", "tcx"]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_refused(a, &args, "has no tcx (Linux 6.6 or newer)");
    }
    let method = if xhost_tests::xhost::expect_tcx() {
        "tcx"
    } else {
        "tc"
    };
    let agent = start(a, b, &[]);
    let s = status_json(a.ns(), &agent.dirs);
    assert_eq!(s["agent"]["attach"], method, "{s}");
    assert_eq!(s["agent"]["kernel"]["tcx"], kernel_tcx, "{s}");
    let helpers = s["agent"]["kernel"]["helpers"].as_array().expect("helpers");
    assert!(
        helpers
            .iter()
            .any(|h| h[0] == "bpf_redirect_peer" && h[1] == true),
        "{s}"
    );
    let via = |s: &serde_json::Value, iface: &str| {
        s["attached"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|x| x["iface"] == iface)
            .map(|x| x["via"].clone())
            .unwrap_or_default()
    };
    let held = if method == "tcx" { "link" } else { "tc-filter" };
    assert_eq!(via(&s, "ens33"), held, "{s}");
    assert_eq!(via(&s, "docker0"), held, "{s}");
    let text = xhost(a.ns(), &agent.dirs, &["status"]).expect("status");
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with(&format!("attach: {method} ("))),
        "{text}"
    );
    if method == "tc" {
        // Someone removes the bridge's qdisc, and xhost's filter with it.
        a.ns()
            .run(&["tc", "qdisc", "del", "dev", "docker0", "clsact"]);
        let s = status_json(a.ns(), &agent.dirs);
        assert_eq!(via(&s, "docker0"), "tc-filter-missing", "{s}");
        assert_eq!(via(&s, "ens33"), "tc-filter", "{s}");
    }
    stop_leaving_nothing(agent, a.ns());
    assert_eq!(xhost_programs(a), "", "left attached");
    assert!(
        !a.ns().run(&["tc", "qdisc", "show"]).contains("clsact"),
        "a clsact qdisc xhost added stayed"
    );
}

fn unload_ok(host: &xhost_tests::Host, dirs: &AgentDirs) {
    let out = xhost(host.ns(), dirs, &["unload"]).expect("unload");
    assert!(
        out.status.success(),
        "unload: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Removes the instances' pins even if the test fails half-way.
struct Cleanup<'a>(&'a [AgentDirs]);
impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        self.0.iter().for_each(remove_instance);
    }
}
fn scopeguard(dirs: &[AgentDirs]) -> Cleanup<'_> {
    Cleanup(dirs)
}

/// Natively and in VXLAN mode. In VXLAN mode B's answer leaves through
/// its kernel's route into `xhost_vxlan`, gets its tunnel key from
/// `xhost_vxlan_out`, and arrives at A with B itself as the inner source.
#[test]
fn ttl_expiring_at_the_host_is_left_to_the_kernel() {
    let topo = topology();
    let (a, b) = (topo.host_a(), topo.host_b());
    for mode in [&[][..], &["--tunnel", "vxlan"][..]] {
        let _agents = (start(a, b, mode), start(b, a, mode));
        // TTL 1 expires at host A, TTL 2 at host B (A's datapath forwarded
        // it with TTL 1): each host's kernel must answer "time exceeded",
        // and B's answer must get through A's isolation check (ICMP error,
        // peer host).
        for (ttl, at) in [("1", "host A"), ("2", "host B")] {
            let dst = topo.ctr_b().ip().to_string();
            let out = topo
                .ctr_a()
                .ns()
                .exec(&["ping", "-n", "-c", "1", "-W", "1", "-t", ttl, &dst])
                .expect("ping");
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                text.contains("Time to live exceeded"),
                "{mode:?}: expected ICMP time exceeded from {at}: {text}"
            );
        }
    }
}

/// The datapath generation the agent in `dirs` pinned (`DATAPATH_GEN`).
fn datapath_generation(dirs: &AgentDirs) -> u64 {
    let path = dirs.pin_dir.join("DATAPATH_GEN");
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(&path)
        .output()
        .expect("run bpftool");
    assert!(out.status.success(), "bpftool map dump {}", path.display());
    let dump: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
    dump[0]["formatted"]["value"]
        .as_u64()
        .unwrap_or_else(|| panic!("generation in {dump}"))
}

/// Polls `check` every 10 ms until it finds nothing wrong (`None`); after 2 s,
/// fails with what it found last.
fn within_2s(what: &str, mut check: impl FnMut() -> Option<String>) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while let Some(wrong) = check() {
        assert!(std::time::Instant::now() < deadline, "{what}: {wrong}");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Waits (up to 2 s) until the agent has bumped the generation past `past`.
fn wait_for_bump(dirs: &AgentDirs, past: u64, what: &str) {
    within_2s(what, || {
        (datapath_generation(dirs) <= past)
            .then(|| "the agent did not retire the cached answers".to_owned())
    });
}

/// The datapath caches its forwarding answers, FIB results included: a
/// route change in the kernel must reach them through the agent (kernel
/// notification, generation bump), not wait for them to age out.
#[test]
fn kernel_route_changes_retire_cached_answers() {
    let topo = topology();
    let (a, b) = (topo.host_a(), topo.host_b());
    let agent_a = start(a, b, &[]);
    let _agent_b = start(b, a, &[]);
    let (ctr_a, dst) = (topo.ctr_a().ns(), topo.ctr_b().ip());
    let p = ping(ctr_a, dst, 3).expect("ping");
    assert!(p.all_received(), "before: {}", p.output);

    // The FIB now says the peer host is a blackhole: the datapath must hand
    // the packets to the kernel instead of forwarding them from its cache.
    let peer = format!("{}/32", b.underlay_ip());
    let before = datapath_generation(&agent_a.dirs);
    a.ns().run(&["ip", "route", "add", "blackhole", &peer]);
    wait_for_bump(&agent_a.dirs, before, "blackhole route added");
    let status = status_json(a.ns(), &agent_a.dirs);
    let (fwd, passed) = (counter(&status, "fwd_egress"), counter(&status, "pass_fib"));
    let p = ping(ctr_a, dst, 3).expect("ping");
    let status = status_json(a.ns(), &agent_a.dirs);
    assert_eq!(
        counter(&status, "fwd_egress"),
        fwd,
        "forwarded despite the blackhole: {}",
        p.output
    );
    assert!(
        counter(&status, "pass_fib") >= passed + 3,
        "each echo request left to the kernel: {status}"
    );

    let before = datapath_generation(&agent_a.dirs);
    a.ns().run(&["ip", "route", "del", "blackhole", &peer]);
    wait_for_bump(&agent_a.dirs, before, "blackhole route removed");
    let p = ping(ctr_a, dst, 3).expect("ping");
    assert!(p.all_received(), "after: {}", p.output);
}

/// What the agent pinned in `UNDERLAY_ADDRS`: (address, ifindex), sorted.
fn underlay_addrs(dirs: &AgentDirs) -> Vec<(std::net::Ipv4Addr, u32)> {
    use aya::maps::{HashMap, Map, MapData};
    let data = MapData::from_pin(dirs.pin_dir.join(xhost_common::MAP_UNDERLAY_ADDRS))
        .expect("pinned UNDERLAY_ADDRS");
    let map: HashMap<MapData, [u8; 4], u32> = Map::from_map_data(data)
        .expect("map")
        .try_into()
        .expect("hash map");
    let mut held: Vec<_> = map
        .iter()
        .map(|e| e.map(|(k, v)| (std::net::Ipv4Addr::from(k), v)))
        .collect::<Result<_, _>>()
        .expect("read UNDERLAY_ADDRS");
    held.sort();
    held
}

/// Waits (up to 2 s) until `UNDERLAY_ADDRS` holds exactly `want`.
fn wait_for_underlay_addrs(dirs: &AgentDirs, want: &[(std::net::Ipv4Addr, u32)], what: &str) {
    within_2s(what, || {
        let held = underlay_addrs(dirs);
        (held != want).then(|| format!("UNDERLAY_ADDRS holds {held:?}, not {want:?}"))
    });
}

/// `UNDERLAY_ADDRS` (where VXLAN mode's datapath may take a peer's packet
/// itself) holds the underlay's addresses from the load on, follows the
/// kernel's address notifications, and leaves with the agent.
#[test]
fn underlay_addresses_follow_the_kernel() {
    let topo = topology();
    let (a, b) = (topo.host_a(), topo.host_b());
    let agent = start(a, b, &[]);
    let ifindex = a
        .ns()
        .ifindex(a.underlay_iface())
        .expect("underlay ifindex");
    let main = (a.underlay_ip(), ifindex);
    assert_eq!(underlay_addrs(&agent.dirs), vec![main], "at load");

    let extra = std::net::Ipv4Addr::new(10, 254, 0, 1);
    let extra_arg = format!("{extra}/32");
    let mut both = vec![main, (extra, ifindex)];
    both.sort();
    a.ns()
        .run(&["ip", "addr", "add", &extra_arg, "dev", a.underlay_iface()]);
    wait_for_underlay_addrs(&agent.dirs, &both, "address added");
    let mut shown = vec![a.underlay_ip().to_string(), extra.to_string()];
    shown.sort_by_key(|s| s.parse::<std::net::Ipv4Addr>().expect("address"));
    assert_eq!(
        status_json(a.ns(), &agent.dirs)["underlay_addrs"],
        serde_json::json!(shown),
        "status shows them"
    );
    // An address on another link is not the underlay's.
    a.ns()
        .run(&["ip", "addr", "add", "10.254.0.2/32", "dev", a.bridge()]);
    a.ns()
        .run(&["ip", "addr", "del", &extra_arg, "dev", a.underlay_iface()]);
    wait_for_underlay_addrs(&agent.dirs, &[main], "address removed");
    a.ns()
        .run(&["ip", "addr", "del", "10.254.0.2/32", "dev", a.bridge()]);

    // More addresses than the map holds: it is filled, and when some of
    // those it holds go, the ones left out take their places (the stale
    // entries leave first, or the new ones would not fit).
    let max = xhost_common::MAX_UNDERLAY_ADDRS as usize;
    let many: Vec<std::net::Ipv4Addr> = (1..=max as u8 + 6)
        .map(|i| std::net::Ipv4Addr::new(10, 254, 1, i))
        .collect();
    let on_underlay = |verb: &str, ip: &std::net::Ipv4Addr| {
        let ip = format!("{ip}/32");
        a.ns()
            .run(&["ip", "addr", verb, &ip, "dev", a.underlay_iface()]);
    };
    for ip in &many {
        on_underlay("add", ip);
    }
    within_2s("more addresses than the map holds", || {
        let held = underlay_addrs(&agent.dirs);
        let ok = held.len() == max
            && held.contains(&main)
            && held
                .iter()
                .all(|(ip, i)| *i == ifindex && (many.contains(ip) || *ip == a.underlay_ip()));
        (!ok).then(|| format!("UNDERLAY_ADDRS holds {held:?}"))
    });
    assert!(
        agent
            .output()
            .contains("VXLAN packets to the others are decapsulated by the kernel"),
        "the addresses left out are not said: {}",
        agent.output()
    );
    let gone: Vec<_> = underlay_addrs(&agent.dirs)
        .into_iter()
        .map(|(ip, _)| ip)
        .filter(|ip| many.contains(ip))
        .take(10)
        .collect();
    for ip in &gone {
        on_underlay("del", ip);
    }
    let mut rest: Vec<_> = many
        .iter()
        .filter(|ip| !gone.contains(ip))
        .map(|ip| (*ip, ifindex))
        .chain([main])
        .collect();
    rest.sort();
    wait_for_underlay_addrs(&agent.dirs, &rest, "ten held addresses removed");
    for ip in many.iter().filter(|ip| !gone.contains(ip)) {
        on_underlay("del", ip);
    }
    wait_for_underlay_addrs(&agent.dirs, &[main], "all extra addresses removed");
    stop_leaving_nothing(agent, a.ns());
}

#[test]
fn underlay_hosts_cannot_reach_containers_directly() {
    let topo = topology();
    let (a, b) = (topo.host_a(), topo.host_b());
    let agent_a = start(a, b, &[]);
    let _agent_b = start(b, a, &[]);
    // Host B itself (not one of its containers) tries container A by IP via a
    // route it sets: xhost on A must drop it (Docker's isolation).
    b.ns().run(&[
        "ip",
        "route",
        "replace",
        &a.subnet().to_string(),
        "via",
        &a.underlay_ip().to_string(),
    ]);
    assert_spoof_dropped(&topo, &agent_a, 3, "host B probing container A");
}

/// Host B pings container A `count` times from its own underlay address (a
/// route to A's subnet must be in place): nothing may get through, and host
/// A's agent must count each probe as dropped-spoofed.
fn assert_spoof_dropped(topo: &Topology, agent_a: &Agent, count: u32, what: &str) {
    let (a, b) = (topo.host_a(), topo.host_b());
    let s0 = status_json(a.ns(), &agent_a.dirs);
    assert!(
        !ping(b.ns(), topo.ctr_a().ip(), count)
            .expect("ping")
            .any_received(),
        "{what}: host B reached container A directly"
    );
    let s1 = status_json(a.ns(), &agent_a.dirs);
    assert_eq!(
        counter(&s1, "drop_spoofed") - counter(&s0, "drop_spoofed"),
        u64::from(count),
        "{what}: each probe dropped as spoofed"
    );
}

/// One bad-input case: `load` must fail with one line naming the culprit and
/// leave nothing attached or pinned.
fn assert_refused(host: &xhost_tests::Host, args: &[&str], culprit: &str) {
    let dirs = AgentDirs::unique("bad");
    let _cleanup = Cleanup(std::slice::from_ref(&dirs));
    let mut all = vec!["load"];
    all.extend_from_slice(args);
    let links = link_names(host.ns());
    let qdiscs = host.ns().run(&["tc", "qdisc", "show"]);
    let out = xhost(host.ns(), &dirs, &all).expect("run load");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "load {args:?} must fail; stderr: {stderr}"
    );
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.contains(" INFO ") && !l.contains(" WARN "))
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "load {args:?}: one error line expected, got: {stderr}"
    );
    assert!(
        lines[0].contains(culprit),
        "load {args:?}: error must name `{culprit}`: {}",
        lines[0]
    );
    assert!(
        dirs.leftovers().is_empty(),
        "load {args:?} left {:?}",
        dirs.leftovers()
    );
    assert_eq!(
        xhost_programs(host),
        "",
        "load {args:?} left programs attached"
    );
    assert_eq!(
        link_names(host.ns()),
        links,
        "load {args:?} left interfaces behind"
    );
    assert_eq!(
        host.ns().run(&["tc", "qdisc", "show"]),
        qdiscs,
        "load {args:?} left qdiscs behind"
    );
}

/// Names of the interfaces of `ns`, sorted.
fn link_names(ns: &NetNs) -> Vec<String> {
    let mut names: Vec<String> = ns
        .run(&["ip", "-o", "link", "show"])
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_owned())
        .collect();
    names.sort();
    names
}

/// `load`'s arguments for host A's underlay and bridge without Docker, then `extra`.
fn host_a_args(extra: &[&str]) -> Vec<String> {
    ["--iface", "ens33", "--bridge", "docker0", "--no-docker"]
        .iter()
        .chain(extra)
        .map(|s| (*s).to_owned())
        .collect()
}

#[test]
fn bad_flags_are_refused_with_nothing_half_applied() {
    let topo = topology();
    let a = topo.host_a();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "--iface".into(),
                "nope0".into(),
                "--bridge".into(),
                "docker0".into(),
                "--no-docker".into(),
            ],
            "nope0",
        ),
        (host_a_args(&["--bridge", "nobr0"]), "nobr0"),
        (
            host_a_args(&["--bridge", "lo"]),
            "`lo` is not a Linux bridge",
        ),
        (
            host_a_args(&["--peer", "172.16.91.132=192.168.220.0/33"]),
            "192.168.220.0/33",
        ),
        (
            host_a_args(&["--peer", "172.16.91.132=192.168.220.1/24"]),
            "host bits set",
        ),
        (host_a_args(&["--peer", "172.16.91.132=banana"]), "banana"),
        (
            host_a_args(&["--peer", "not-an-ip=10.1.0.0/16"]),
            "not-an-ip",
        ),
        (
            host_a_args(&[
                "--peer",
                "172.16.91.132=10.1.0.0/16",
                "--peer",
                "172.16.91.133=10.1.128.0/17",
            ]),
            "overlaps subnet 10.1.128.0/17",
        ),
        (
            host_a_args(&["--peer", "172.16.91.132=192.168.0.0/16"]),
            "overlaps local subnet 192.168.110.0/24 on docker0",
        ),
        (
            host_a_args(&[
                "--peer",
                "172.16.91.132=10.1.0.0/16",
                "--peer",
                "172.16.91.132=10.2.0.0/16",
            ]),
            "peer 172.16.91.132 is given more than once",
        ),
        (
            vec!["--bridge".into(), "docker0".into(), "--no-docker".into()],
            "no underlay interface",
        ),
        (
            vec!["--iface".into(), "ens33".into(), "--no-docker".into()],
            "nothing to serve",
        ),
        (
            host_a_args(&["--tunnel", "vxlan", "--vni", "16777216"]),
            "VNI 16777216 out of range",
        ),
        (host_a_args(&["--vni", "7"]), "it needs --tunnel vxlan"),
        (
            host_a_args(&["--tunnel", "vxlan", "--vxlan-port", "0"]),
            "VXLAN port 0",
        ),
    ];
    for (args, culprit) in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_refused(a, &args, culprit);
    }
}

/// Config files: conflicts with flags, unknown keys, bad CIDRs, a missing file.
#[test]
fn bad_config_files_are_refused_with_nothing_half_applied() {
    let topo = topology();
    let a = topo.host_a();
    let dir = std::env::temp_dir().join(format!("xh-{}-cfg", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write config");
        p.display().to_string()
    };
    let conflict = write("conflict.toml", "iface = \"eth7\"\n");
    assert_refused(
        a,
        &[
            "--config",
            &conflict,
            "--iface",
            "ens33",
            "--bridge",
            "docker0",
            "--no-docker",
        ],
        "conflicts with iface = \"eth7\"",
    );
    let unknown = write(
        "unknown.toml",
        "iface = \"ens33\"\nbridge = [\"docker0\"]\n",
    );
    assert_refused(
        a,
        &["--config", &unknown, "--no-docker"],
        "unknown field `bridge`",
    );
    let bad_cidr = write(
        "cidr.toml",
        "iface = \"ens33\"\nbridges = [\"docker0\"]\n[[peer]]\nhost = \"172.16.91.132\"\nsubnets = [\"192.168.220.0/24\", \"10.0.0.0/40\"]\n",
    );
    assert_refused(a, &["--config", &bad_cidr, "--no-docker"], "10.0.0.0/40");
    let missing = dir.join("missing.toml").display().to_string();
    assert_refused(a, &["--config", &missing, "--no-docker"], "missing.toml");
    let _ = std::fs::remove_dir_all(&dir);
}

/// VXLAN mode: a device of that name that is not xhost's is left alone.
#[test]
fn vxlan_mode_refuses_a_device_of_its_name_that_is_not_its_own() {
    let topo = topology();
    let a = topo.host_a();
    a.ns().run(&[
        "ip",
        "link",
        "add",
        "xhost_vxlan",
        "type",
        "veth",
        "peer",
        "name",
        "xh-other",
    ]);
    assert_refused(
        a,
        &host_a_args(&["--tunnel", "vxlan"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        "xhost_vxlan exists already",
    );
    a.ns().run(&["ip", "link", "del", "xhost_vxlan"]);
}

/// Already loaded: a second instance on the same underlay is refused,
/// whether it shares the pin dir or not, natively and in VXLAN mode, with
/// nothing left behind; the first keeps forwarding.
#[test]
fn a_second_instance_on_the_same_underlay_is_refused() {
    let topo = topology();
    let (a, b) = (topo.host_a(), topo.host_b());
    let first = start(a, b, &[]);
    let _b = start(b, a, &[]);
    let again = load_args(a, b, &[]);
    let mut all = vec!["load".to_owned()];
    all.extend(again.iter().cloned());
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    let out = xhost(a.ns(), &first.dirs, &all).expect("run");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already loaded"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let other = AgentDirs::unique("dup");
    let _cleanup = Cleanup(std::slice::from_ref(&other));
    let links = link_names(a.ns());
    // The second in VXLAN mode too: its device is made before the underlay
    // refuses it, and must go again.
    let mut tunnelled = all.clone();
    tunnelled.extend(["--tunnel", "vxlan"]);
    for args in [&all, &tunnelled] {
        let out = xhost(a.ns(), &other, args).expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains("ens33 already has"),
            "{stderr}"
        );
        assert!(
            other.leftovers().is_empty(),
            "refused load left {:?}",
            other.leftovers()
        );
        assert_eq!(link_names(a.ns()), links, "refused load left interfaces");
    }
    assert!(
        ping(topo.ctr_a().ns(), topo.ctr_b().ip(), 2)
            .expect("ping")
            .all_received(),
        "first instance disturbed"
    );
}

/// An underlay with a smaller MTU than the containers' (1400 against 1500): what does not
/// fit is not forwarded by the datapath but left to the kernel, which answers ICMP
/// fragmentation-needed as the router it is. TCP, whose TSO bursts are checked segment by
/// segment, learns the path MTU from it and gets its payload through intact both ways; a
/// DF ping one byte too big gets the answer, one that fits gets through.
#[test]
fn what_does_not_fit_the_underlay_gets_frag_needed() {
    let topo = topology();
    let (a, b) = (topo.host_a(), topo.host_b());
    let (ca, cb) = (topo.ctr_a(), topo.ctr_b());
    for h in [a, b] {
        h.ns()
            .run(&["ip", "link", "set", h.underlay_iface(), "mtu", "1400"]);
    }
    let agent_a = start(a, b, &[]);
    let agent_b = start(b, a, &[]);
    let before = [
        status_json(a.ns(), &agent_a.dirs),
        status_json(b.ns(), &agent_b.dirs),
    ];

    for (from, to, port) in [(ca, cb, 45_111u16), (cb, ca, 45_112)] {
        transfer_learning_mtu(from, to, port, 8 << 20, 1400);
    }
    for ((host, agent), before) in [(a, &agent_a), (b, &agent_b)].into_iter().zip(&before) {
        let s = status_json(host.ns(), &agent.dirs);
        assert!(
            counter(&s, "pass_fib") > counter(before, "pass_fib"),
            "{}: no oversized burst was left to the kernel: {s}",
            host.role()
        );
    }

    // Forget the learned MTU, then DF pings of 1400 and 1401 bytes.
    ca.ns().run(&["ip", "route", "flush", "cache"]);
    let ping_df = |payload: u32| {
        let out = ca
            .ns()
            .exec(&[
                "ping",
                "-n",
                "-c",
                "1",
                "-W",
                "2",
                "-M",
                "do",
                "-s",
                &payload.to_string(),
                &cb.ip().to_string(),
            ])
            .expect("ping");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (ok, text) = ping_df(1400 - 28);
    assert!(ok, "a 1400-byte ping must get through: {text}");
    let (ok, text) = ping_df(1401 - 28);
    assert!(
        !ok && text.contains("Frag needed") && text.contains("mtu = 1400"),
        "a 1401-byte DF ping must get frag-needed from host A: {text}"
    );
}

/// A checksummed TCP transfer of `bytes` from `from` to `to`, which must arrive intact
/// while `from` learns the path MTU `mtu` from its host's frag-needed. Both forget what
/// they learned first: a path MTU learned in the other direction would lower the MSS the
/// receiver advertises, and the sender would never send too much.
fn transfer_learning_mtu(
    from: &xhost_tests::Container,
    to: &xhost_tests::Container,
    port: u16,
    bytes: u64,
    mtu: u32,
) -> xhost_tests::Transfer {
    for c in [from, to] {
        c.ns().run(&["ip", "route", "flush", "cache"]);
    }
    let opts = TransferOpts {
        port,
        bytes,
        ..TransferOpts::default()
    };
    let t = tcp_transfer(from.ns(), to.ns(), to.ip(), &opts).expect("tcp transfer");
    assert!(t.intact(), "{} -> {}: {t:?}", from.ip(), to.ip());
    let route = from.ns().run(&["ip", "route", "get", &to.ip().to_string()]);
    assert!(
        route.contains(&format!("mtu {mtu}")),
        "{} never learned the path MTU {mtu} to {}: {route}",
        from.ip(),
        to.ip()
    );
    t
}

/// A container's UDP GSO burst (`UDP_SEGMENT`) is no TCP burst: its
/// segments are checked against the underlay by the kernel
/// (`bpf_check_mtu` per segment). One whose segments fit is forwarded as one
/// skb and arrives whole; once they exceed the underlay's MTU the burst is
/// the kernel's (which drops it with frag-needed), not forwarded.
#[test]
fn udp_gso_bursts_are_checked_by_their_segments() {
    let topo = topology();
    let (a, b) = (topo.host_a(), topo.host_b());
    let (ca, cb) = (topo.ctr_a(), topo.ctr_b());
    let agent_a = start(a, b, &[]);
    let _agent_b = start(b, a, &[]);
    let counters = || {
        let s = status_json(a.ns(), &agent_a.dirs);
        (counter(&s, "fwd_egress"), counter(&s, "pass_fib"))
    };
    let opts = UdpGsoOpts::default();
    let datagrams = u64::from(opts.bursts) * u64::from(opts.segments);

    // 1428-byte segments on an MTU of 1500.
    let (fwd, pass) = counters();
    let t = udp_gso_transfer(ca.ns(), cb.ns(), cb.ip(), &opts).expect("udp gso transfer");
    assert!(t.complete(), "every datagram must arrive whole: {t:?}");
    let (fwd_after, pass_after) = counters();
    let bursts = u64::from(opts.bursts);
    assert!(
        (bursts..datagrams).contains(&(fwd_after - fwd)),
        "{} bursts of {} datagrams must be forwarded as {} skbs, not segmented first: \
         fwd_egress moved by {}",
        opts.bursts,
        opts.segments,
        opts.bursts,
        fwd_after - fwd
    );
    assert_eq!(pass_after, pass, "no burst fitting the MTU is the kernel's");

    // The same segments over an underlay of MTU 1400.
    a.ns()
        .run(&["ip", "link", "set", a.underlay_iface(), "mtu", "1400"]);
    assert_burst_left_to_kernel(
        &topo,
        &agent_a,
        opts.port + 1,
        opts.segment,
        "the underlay's",
    );
}

/// Sends one UDP GSO burst of `segment`-byte datagrams from container A to
/// B, whose segments do not fit `what` MTU, and checks that it is the
/// kernel's: none delivered, `fwd_egress` still, `pass_fib` moved.
fn assert_burst_left_to_kernel(
    topo: &Topology,
    agent_a: &Agent,
    port: u16,
    segment: u16,
    what: &str,
) {
    let a = topo.host_a();
    let counters = || {
        let s = status_json(a.ns(), &agent_a.dirs);
        (counter(&s, "fwd_egress"), counter(&s, "pass_fib"))
    };
    let (fwd, pass) = counters();
    let opts = UdpGsoOpts {
        port,
        segment,
        bursts: 1,
        timeout: std::time::Duration::from_secs(1),
        ..UdpGsoOpts::default()
    };
    let (ca, cb) = (topo.ctr_a(), topo.ctr_b());
    let t = udp_gso_transfer(ca.ns(), cb.ns(), cb.ip(), &opts).expect("udp gso transfer");
    assert_eq!(
        t.received.datagrams, 0,
        "segments over {what} MTU must not be forwarded: {t:?}"
    );
    let (fwd_after, pass_after) = counters();
    assert_eq!(fwd_after, fwd, "an oversized burst was forwarded");
    assert!(
        pass_after > pass,
        "the oversized burst was not left to the kernel (pass_fib {pass} -> {pass_after})"
    );
}

/// A container sending BIG TCP bursts (`gso_ipv4_max_size` above 64 KB,
/// Linux 6.3+: TCP GSO skbs whose IPv4 total length is 0) is routed on the
/// fast path like any TSO burst, out of host A and into container B. Left
/// to the kernel, a Docker host would masquerade the bursts and the peer's
/// datapath would drop them as no peer container's.
#[test]
fn big_tcp_bursts_take_the_fast_path() {
    const BIG: u32 = 131_072;
    let topo = topology();
    let (a, b) = (topo.host_a(), topo.host_b());
    let (ca, cb) = (topo.ctr_a(), topo.ctr_b());
    // The container's stack builds the bursts; host A's underlay must take
    // them whole, or it cuts them into segments on the way out.
    for (ns, iface) in [(ca.ns(), "eth0"), (a.ns(), a.underlay_iface())] {
        let got = set_gso_ipv4_max_size(ns, iface, BIG).expect("set gso_ipv4_max_size");
        assert_eq!(
            got, BIG,
            "{iface}: this kernel has no BIG TCP for IPv4 (Linux 6.3+)"
        );
    }
    let agent_a = start(a, b, &[]);
    let agent_b = start(b, a, &[]);
    let hosts = [(a, &agent_a), (b, &agent_b)];
    let before: Vec<_> = hosts
        .iter()
        .map(|(h, agent)| status_json(h.ns(), &agent.dirs))
        .collect();

    let opts = TransferOpts {
        port: 45_121,
        bytes: 32 << 20,
        ..TransferOpts::default()
    };
    let t = tcp_transfer(ca.ns(), cb.ns(), cb.ip(), &opts).expect("tcp transfer");
    assert!(t.intact(), "{t:?}");

    let after: Vec<_> = hosts
        .iter()
        .map(|(h, agent)| status_json(h.ns(), &agent.dirs))
        .collect();
    let moved = |i: usize, name: &str| counter(&after[i], name) - counter(&before[i], name);
    for (i, (host, _)) in hosts.iter().enumerate() {
        assert_eq!(
            moved(i, "pass_malformed"),
            0,
            "{}: a BIG TCP burst was taken for malformed: {}",
            host.role(),
            after[i]
        );
    }
    assert!(
        moved(0, "fwd_egress") > 0 && moved(1, "fwd_ingress") > 0,
        "the transfer did not take the fast path"
    );
}

/// The kernel routes xhost installed in `ns` (`proto 177`), as `prefix via gw`.
fn xhost_kernel_routes(ns: &NetNs) -> Vec<String> {
    ns.run(&["ip", "route", "show", "proto", "177"])
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w.len() >= 3 && w[1] == "via").then(|| format!("{} via {}", w[0], w[2]))
        })
        .collect()
}

/// A config file, removed when dropped.
struct ConfigFile(std::path::PathBuf);
impl ConfigFile {
    /// `xhost-<tag>-<pid>.toml` in the temporary directory.
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

/// An address on `peer`'s underlay /24 that no namespace holds (.200): on-link, so a
/// peer there gets a kernel route, and nothing is ever sent to it.
fn another_underlay_host(peer: &xhost_tests::Host) -> std::net::Ipv4Addr {
    let o = peer.underlay_ip().octets();
    std::net::Ipv4Addr::new(o[0], o[1], o[2], 200)
}

/// The settings lines of a config for `host` (underlay, bridge, no Docker), before its peers.
fn config_head(host: &xhost_tests::Host) -> String {
    format!(
        "iface = \"{}\"\nbridges = [\"{}\"]\ndocker = false\n",
        host.underlay_iface(),
        host.bridge()
    )
}

/// Asks the agent to re-read its config.
fn hup(agent: &Agent) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.pid() as i32),
        Signal::SIGHUP,
    )
    .expect("SIGHUP");
}

/// Ctrl-C: the agent exits cleanly, with no pin, run file or kernel route of its left.
fn stop_leaving_nothing(agent: Agent, ns: &NetNs) {
    let (status, left) = agent.stop_with(Signal::SIGINT).expect("stop");
    assert!(status.success(), "agent exit: {status:?}");
    assert!(left.is_empty(), "left behind: {left:?}");
    assert_eq!(xhost_kernel_routes(ns), Vec::<String>::new());
}

/// How many reloads the agent has refused so far (one log line each).
fn refusals(agent: &Agent) -> usize {
    agent.output().matches("config reload refused").count()
}

/// Host A's configs for the SIGHUP tests, in the file its agent loads: its head
/// (underlay, bridge, no Docker), host B as a peer, and another host on the
/// underlay (on-link, so it gets a kernel route too) as a peer.
struct Reload {
    cfg: ConfigFile,
    head: String,
    peer_b: String,
    other_host: std::net::Ipv4Addr,
    other: String,
}

impl Reload {
    fn new(a: &xhost_tests::Host, b: &xhost_tests::Host) -> Self {
        let other_host = another_underlay_host(b);
        Self {
            cfg: ConfigFile::temp("reload"),
            head: config_head(a),
            peer_b: format!(
                "[[peer]]\nhost = \"{}\"\nsubnets = [\"{}\"]\n",
                b.underlay_ip(),
                b.subnet()
            ),
            other_host,
            other: format!("[[peer]]\nhost = \"{other_host}\"\nsubnets = [\"10.250.0.0/16\"]\n"),
        }
    }

    /// Host A's agent loaded from the file holding the head and `peers`.
    fn start(&self, a: &xhost_tests::Host, peers: &str) -> Agent {
        self.cfg.write(&format!("{}{peers}", self.head));
        let cfg_arg = self.cfg.0.display().to_string();
        Agent::start(a.ns(), a.role(), &["--config", &cfg_arg]).expect("load")
    }

    /// Writes `text` to the file and sends the agent SIGHUP.
    fn reload(&self, agent: &Agent, text: &str) {
        self.cfg.write(text);
        hup(agent);
    }

    /// The other peer's route, as `status_routes` shows it.
    fn other_route(&self) -> Vec<(String, String)> {
        vec![("10.250.0.0/16".into(), self.other_host.to_string())]
    }

    /// The other peer's kernel route, as `xhost_kernel_routes` shows it.
    fn other_kernel_route(&self) -> String {
        format!("10.250.0.0/16 via {}", self.other_host)
    }
}

/// Waits until `ROUTES` and the agent's state file (written after the maps) both
/// hold `want` (prefix, peer).
fn wait_routes(host: &xhost_tests::Host, dirs: &AgentDirs, want: &[(String, String)]) {
    xhost_tests::xhost::wait_status(
        host.ns(),
        dirs,
        "ROUTES after the reload",
        std::time::Duration::from_secs(5),
        |s| {
            let peers: Vec<(String, String)> = s["agent"]["peers"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|p| {
                    let host = p["host"].as_str().unwrap_or_default().to_owned();
                    p["subnets"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(move |n| Some((n.as_str()?.to_owned(), host.clone())))
                })
                .collect();
            status_routes(s) == want && peers == want
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
}

/// SIGHUP re-reads the config: peers removed, added and put back take effect
/// without detaching anything (maps and kernel routes follow, traffic stops
/// and resumes).
#[test]
fn sighup_reloads_peers_in_place() {
    let topo = topology();
    let (a, b) = (topo.host_a(), topo.host_b());
    let _agent_b = start(b, a, &[]);
    let r = Reload::new(a, b);
    let agent = r.start(a, &r.peer_b);
    let (ctr_a, ip_b) = (topo.ctr_a().ns(), topo.ctr_b().ip());
    let reaches_b = || ping(ctr_a, ip_b, 2).expect("ping").any_received();
    assert!(reaches_b(), "B reachable with B as peer");
    // Container A's veth gets its program once the agent has seen the endpoint.
    xhost_tests::xhost::wait_status(
        a.ns(),
        &agent.dirs,
        "container A's endpoint",
        std::time::Duration::from_secs(5),
        |s| s["attached"].as_array().map(Vec::len) == Some(3),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let programs = xhost_programs(a);

    // B's subnet out, another peer in.
    r.reload(&agent, &format!("{}{}", r.head, r.other));
    wait_routes(a, &agent.dirs, &r.other_route());
    assert_eq!(xhost_kernel_routes(a.ns()), [r.other_kernel_route()]);
    assert!(!reaches_b(), "B's subnet is no longer a peer's");
    assert_eq!(
        xhost_programs(a),
        programs,
        "nothing detached or re-attached"
    );

    // B back, the other peer gone: traffic resumes.
    r.reload(&agent, &format!("{}{}", r.head, r.peer_b));
    wait_routes(
        a,
        &agent.dirs,
        &[(b.subnet().to_string(), b.underlay_ip().to_string())],
    );
    assert_eq!(
        xhost_kernel_routes(a.ns()),
        [format!("{} via {}", b.subnet(), b.underlay_ip())]
    );
    assert!(reaches_b(), "B reachable again");
    assert_eq!(xhost_programs(a), programs);

    stop_leaving_nothing(agent, a.ns());
}

/// A config that does not parse, does not validate, or changes what only a
/// restart can is refused whole: the log names the problem, the agent keeps
/// running, and the maps and kernel routes stay as the running config says.
#[test]
fn sighup_refuses_a_bad_config_whole() {
    let topo = topology();
    let (a, b) = (topo.host_a(), topo.host_b());
    let r = Reload::new(a, b);
    let mut agent = r.start(a, &r.other);
    wait_routes(a, &agent.dirs, &r.other_route());
    let (head, other) = (&r.head, &r.other);
    for (text, culprit) in [
        (format!("{head}{other}[[peer]]\nhost = "), "config"),
        (
            format!(
                "{head}{other}[[peer]]\nhost = \"{}\"\nsubnets = [\"10.250.1.0/24\"]\n",
                b.underlay_ip()
            ),
            "overlaps subnet 10.250.1.0/24",
        ),
        (
            format!("{}{other}", head.replace(a.underlay_iface(), "lo")),
            "iface cannot change while the agent runs",
        ),
        (
            format!("{head}{other}").replace(a.bridge(), "xh-no-such-br"),
            "xh-no-such-br",
        ),
    ] {
        let before = refusals(&agent);
        r.reload(&agent, &text);
        let t0 = std::time::Instant::now();
        while refusals(&agent) == before && t0.elapsed() < std::time::Duration::from_secs(5) {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let out = agent.output();
        let line = out
            .lines()
            .filter(|l| l.contains("config reload refused"))
            .nth(before)
            .unwrap_or_else(|| panic!("no refusal for {text:?}:\n{out}"));
        assert!(line.contains(culprit), "{culprit:?} not in {line:?}");
        assert!(agent.running(), "the agent keeps running");
        let s = status_json(a.ns(), &agent.dirs);
        assert_eq!(status_routes(&s), r.other_route());
        assert_eq!(xhost_kernel_routes(a.ns()), [r.other_kernel_route()]);
    }
    stop_leaving_nothing(agent, a.ns());
}

/// SIGHUP follows the static bridges of the config: a second bridge is
/// served (its subnet in `LOCAL_NETS`, its program attached), then let go.
#[test]
fn sighup_follows_static_bridges_added_and_removed() {
    let topo = topology();
    let (a, b) = (topo.host_a(), topo.host_b());
    let r = Reload::new(a, b);
    let agent = r.start(a, &r.other);
    a.ns()
        .run(&["ip", "link", "add", "xh-br2", "type", "bridge"]);
    a.ns()
        .run(&["ip", "addr", "add", "10.77.0.1/24", "dev", "xh-br2"]);
    a.ns().run(&["ip", "link", "set", "xh-br2", "up"]);
    let served = |s: &serde_json::Value| {
        let locals = s["local_subnets"].to_string();
        let attached = s["attached"].to_string();
        (
            locals.contains("10.77.0.0/24"),
            attached.contains("\"xh-br2\""),
        )
    };
    for (bridges, want) in [
        (format!("[\"{}\", \"xh-br2\"]", a.bridge()), (true, true)),
        (format!("[\"{}\"]", a.bridge()), (false, false)),
    ] {
        r.reload(
            &agent,
            &format!(
                "{}{}",
                r.head.replace(&format!("[\"{}\"]", a.bridge()), &bridges),
                r.other
            ),
        );
        xhost_tests::xhost::wait_status(
            a.ns(),
            &agent.dirs,
            "the static bridges after the reload",
            std::time::Duration::from_secs(5),
            |s| served(s) == want,
        )
        .unwrap_or_else(|e| panic!("{e}"));
    }
    a.ns().run(&["ip", "link", "del", "xh-br2"]);
    stop_leaving_nothing(agent, a.ns());
}

/// A reload that replaces most routes: 65 636 /24s become their 65 636 lower /25
/// halves, so old and new together (131 272) would overflow `ROUTES` (131 072). What is
/// gone leaves first instead of the reload failing half-way; the maps and the kernel
/// routes end as the new config says, and the peer that stays keeps its traffic.
#[test]
fn a_reload_replacing_most_routes_fits_the_routes_map() {
    const NETS: u32 = 65_636;
    let topo = topology();
    let (a, b) = (topo.host_a(), topo.host_b());
    let _agent_b = start(b, a, &[]);
    let cfg = ConfigFile::temp("reload-big");
    let other_host = another_underlay_host(b);
    // 10.0.0.0/8 in /24s, then the first 100 /24s of 11.0.0.0/8.
    let net = |i: u32, len: u8| {
        let base = if i < 65_536 {
            0x0a00_0000 + (i << 8)
        } else {
            0x0b00_0000 + ((i - 65_536) << 8)
        };
        format!("{}/{len}", std::net::Ipv4Addr::from(base))
    };
    let config = |len: u8| {
        let nets: Vec<String> = (0..NETS).map(|i| format!("\"{}\"", net(i, len))).collect();
        format!(
            "{}[[peer]]\nhost = \"{}\"\nsubnets = [\"{}\"]\n\
             [[peer]]\nhost = \"{other_host}\"\nsubnets = [{}]\n",
            config_head(a),
            b.underlay_ip(),
            b.subnet(),
            nets.join(", ")
        )
    };
    cfg.write(&config(24));
    let cfg_arg = cfg.0.display().to_string();
    let agent = Agent::start(a.ns(), a.role(), &["--config", &cfg_arg]).expect("load");
    let (ctr_a, ip_b) = (topo.ctr_a().ns(), topo.ctr_b().ip());
    assert!(ping(ctr_a, ip_b, 2).expect("ping").any_received());

    // Routes of `len` as the datapath and the kernel hold them.
    let holds = |len: u8| {
        let s = status_json(a.ns(), &agent.dirs);
        let routes = status_routes(&s);
        let kernel = xhost_kernel_routes(a.ns());
        let first = (net(0, len), other_host.to_string());
        let last = (net(NETS - 1, len), other_host.to_string());
        routes.len() == NETS as usize + 1
            && routes.contains(&first)
            && routes.contains(&last)
            && kernel.len() == NETS as usize + 1
            && kernel.contains(&format!("{} via {other_host}", first.0))
    };
    assert!(holds(24), "loaded with the /24s");

    cfg.write(&config(25));
    hup(&agent);
    let t0 = std::time::Instant::now();
    while !holds(25) {
        let out = agent.output();
        assert!(
            !out.contains("config reload refused"),
            "the reload failed:\n{}",
            out.lines()
                .filter(|l| l.contains("refused"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(30),
            "the /25s never replaced the /24s"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(ping(ctr_a, ip_b, 2).expect("ping").any_received());

    stop_leaving_nothing(agent, a.ns());
}

/// A reload whose map writes fail half-way is rolled back: the new peer host and the
/// new route already written, and their kernel route, leave again, and the running
/// config stays in force. `ROUTES` is filled from outside (through its pin) up to one
/// free entry, so the second of the reload's new routes gets ENOSPC from the kernel;
/// once room is made, the same config loads.
#[test]
fn a_reload_that_fails_half_way_puts_the_previous_peers_back() {
    use aya::maps::{HashMap, LpmTrie, Map, MapData, lpm_trie::Key};
    let topo = topology();
    let (a, b) = (topo.host_a(), topo.host_b());
    let _agent_b = start(b, a, &[]);
    let cfg = ConfigFile::temp("reload-undo");
    let head = config_head(a);
    let other_host = another_underlay_host(b);
    let old = format!(
        "{head}[[peer]]\nhost = \"{}\"\nsubnets = [\"{}\"]\n",
        b.underlay_ip(),
        b.subnet()
    );
    // A new peer host with one subnet, and two more subnets for B: applied in prefix
    // order, 10.98.0.0/24 takes the last free entry and 10.99.1.0/24 finds none.
    let new = format!(
        "{head}[[peer]]\nhost = \"{}\"\nsubnets = [\"{}\", \"10.99.1.0/24\", \"10.99.2.0/24\"]\n\
         [[peer]]\nhost = \"{other_host}\"\nsubnets = [\"10.98.0.0/24\"]\n",
        b.underlay_ip(),
        b.subnet()
    );
    cfg.write(&old);
    let cfg_arg = cfg.0.display().to_string();
    let agent = Agent::start(a.ns(), a.role(), &["--config", &cfg_arg]).expect("load");
    let (ctr_a, ip_b) = (topo.ctr_a().ns(), topo.ctr_b().ip());
    assert!(ping(ctr_a, ip_b, 2).expect("ping").any_received());
    let kernel_b = format!("{} via {}", b.subnet(), b.underlay_ip());
    assert_eq!(xhost_kernel_routes(a.ns()), std::slice::from_ref(&kernel_b));

    let open = |name: &str| {
        let data = MapData::from_pin(agent.dirs.pin_dir.join(name)).expect("pinned map");
        Map::from_map_data(data).expect("map")
    };
    let mut routes: LpmTrie<MapData, [u8; 4], [u8; 8]> =
        open(xhost_common::MAP_ROUTES).try_into().expect("ROUTES");
    let peer_hosts: HashMap<MapData, [u8; 4], [u8; 8]> = open(xhost_common::MAP_PEER_HOSTS)
        .try_into()
        .expect("PEER_HOSTS");
    let key = |net: &str| {
        let (ip, len) = net.split_once('/').expect("prefix");
        let ip: std::net::Ipv4Addr = ip.parse().expect("address");
        Key::new(len.parse().expect("length"), ip.octets())
    };
    let in_routes =
        |routes: &LpmTrie<MapData, [u8; 4], [u8; 8]>, net: &str| routes.get(&key(net), 0).is_ok();
    let is_peer_host = |ip: std::net::Ipv4Addr| peer_hosts.get(&ip.octets(), 0).is_ok();
    // /32s in 10.128.0.0/9 behind an address no test sends to: the map full but one.
    let filler = xhost_common::MAX_ROUTES - 2;
    let filler_key = |i: u32| Key::new(32, (0x0a80_0000 + i).to_be_bytes());
    let nowhere = [172, 16, 91, 250, 0, 0, 0, 0];
    for i in 0..filler {
        routes
            .insert(&filler_key(i), nowhere, 0)
            .unwrap_or_else(|e| panic!("filling ROUTES at entry {i}: {e}"));
    }

    cfg.write(&new);
    hup(&agent);
    let t0 = std::time::Instant::now();
    while refusals(&agent) == 0 {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(10),
            "the reload was not refused:\n{}",
            agent.output()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = agent.output();
    let line = out
        .lines()
        .find(|l| l.contains("config reload refused"))
        .expect("refusal line");
    let failed = format!("map ROUTES, entry 10.99.1.0/24 via {}", b.underlay_ip());
    assert!(
        line.contains("the previous ones are back") && line.contains(&failed),
        "refusal does not say what failed ({failed}) and that it was undone: {line}"
    );
    for net in ["10.98.0.0/24", "10.99.1.0/24", "10.99.2.0/24"] {
        assert!(!in_routes(&routes, net), "{net} left in ROUTES");
    }
    assert!(
        in_routes(&routes, &b.subnet().to_string()),
        "B's subnet kept"
    );
    assert!(
        !is_peer_host(other_host),
        "the new peer host left in PEER_HOSTS"
    );
    assert!(is_peer_host(b.underlay_ip()), "B kept in PEER_HOSTS");
    assert_eq!(xhost_kernel_routes(a.ns()), std::slice::from_ref(&kernel_b));
    let s = status_json(a.ns(), &agent.dirs);
    assert_eq!(
        s["agent"]["peers"].as_array().map(Vec::len),
        Some(1),
        "the running config's peers: {}",
        s["agent"]["peers"]
    );
    assert!(ping(ctr_a, ip_b, 2).expect("ping").any_received());

    // With room made, the same config loads.
    for i in 0..filler {
        routes
            .remove(&filler_key(i))
            .expect("removing a filler entry");
    }
    hup(&agent);
    let t0 = std::time::Instant::now();
    while !(in_routes(&routes, "10.99.2.0/24") && is_peer_host(other_host)) {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(10),
            "the config did not load once there was room:\n{}",
            agent.output()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(refusals(&agent), 1, "{}", agent.output());
    let mut kernel = xhost_kernel_routes(a.ns());
    kernel.sort();
    assert_eq!(
        kernel,
        [
            format!("10.98.0.0/24 via {other_host}"),
            format!("10.99.1.0/24 via {}", b.underlay_ip()),
            format!("10.99.2.0/24 via {}", b.underlay_ip()),
            kernel_b.clone(),
        ]
    );
    assert!(ping(ctr_a, ip_b, 2).expect("ping").any_received());

    stop_leaving_nothing(agent, a.ns());
}

/// Puts a "cloud" between the hosts, as a VPC with source/destination
/// checks is: their underlay ends become ports of a bridge in a namespace of
/// its own, whose FORWARD chain (br_netfilter) drops every frame to or from
/// a container subnet. The hosts keep their underlay addresses.
fn cloud_underlay(topo: &Topology) -> NetNs {
    let cloud = NetNs::new("cloud").expect("cloud netns");
    let (a, b) = (topo.host_a(), topo.host_b());
    // Deleting one end of the direct pair deletes both.
    a.ns().run(&["ip", "link", "del", a.underlay_iface()]);
    for (h, port) in [(a, "to-a"), (b, "to-b")] {
        h.ns()
            .ip_batch(&format!(
                "link add {iface} type veth peer name {port} netns {cloud}\n\
                 addr add {addr} dev {iface}\n\
                 link set {iface} up\n",
                iface = h.underlay_iface(),
                cloud = cloud.name(),
                addr = h.underlay(),
            ))
            .expect("host side of the cloud");
    }
    cloud
        .ip_batch(
            "link add br0 type bridge\n\
             link set to-a master br0\n\
             link set to-b master br0\n\
             link set to-a up\n\
             link set to-b up\n\
             link set br0 up\n",
        )
        .expect("cloud bridge");
    cloud
        .sysctl("net.bridge.bridge-nf-call-iptables", "1")
        .expect("br_netfilter in the cloud");
    for (h, dir) in [(a, "-s"), (a, "-d"), (b, "-s"), (b, "-d")] {
        cloud.run(&[
            "iptables",
            "-w",
            "-A",
            "FORWARD",
            dir,
            &h.subnet().to_string(),
            "-j",
            "DROP",
        ]);
    }
    cloud
}

/// Frames with a container address the cloud dropped.
fn cloud_drops(cloud: &NetNs) -> u64 {
    iptables_counter(cloud, "FORWARD")
        .expect("cloud FORWARD counters")
        .rules
        .iter()
        .map(|r| r.packets)
        .sum()
}

/// Counts, in the cloud's mangle FORWARD chain, the VXLAN packets each
/// host sends the other on `port` (rule 2n) and those of them whose outer
/// headers are what the kernel's vxlan devices write (rule 2n + 1): TTL 64,
/// no DF, a source port in the kernel's range.
fn count_outer_headers(cloud: &NetNs, topo: &Topology, port: u16) {
    let (a, b) = (topo.host_a(), topo.host_b());
    for (from, to) in [(a, b), (b, a)] {
        let flow = [
            "iptables",
            "-w",
            "-t",
            "mangle",
            "-A",
            "FORWARD",
            "-p",
            "udp",
            "-s",
            &from.underlay_ip().to_string(),
            "-d",
            &to.underlay_ip().to_string(),
            "--dport",
            &port.to_string(),
        ]
        .map(str::to_owned);
        cloud.run(&flow.iter().map(String::as_str).collect::<Vec<_>>());
        let mut good = flow.to_vec();
        good.extend(
            [
                "--sport",
                "32768:60998",
                "-m",
                "ttl",
                "--ttl-eq",
                "64",
                "-m",
                "u32",
                "--u32",
                "4&0x4000=0",
            ]
            .map(str::to_owned),
        );
        cloud.run(&good.iter().map(String::as_str).collect::<Vec<_>>());
    }
}

/// (sent, well-formed) VXLAN packets per direction, A->B then B->A, from
/// the rules of [`count_outer_headers`].
fn outer_headers(cloud: &NetNs) -> [(u64, u64); 2] {
    let rules = iptables_table_counter(cloud, "mangle", "FORWARD")
        .expect("cloud mangle counters")
        .rules;
    assert_eq!(rules.len(), 4, "{rules:?}");
    [
        (rules[0].packets, rules[1].packets),
        (rules[2].packets, rules[3].packets),
    ]
}

/// Packets `ns`'s vxlan device has sent (`"tx"`) or received (`"rx"`).
fn tunnel_packets(ns: &NetNs, dir: &str) -> u64 {
    let out = ns.run(&[
        "cat",
        &format!("/sys/class/net/xhost_vxlan/statistics/{dir}_packets"),
    ]);
    out.trim().parse().expect("vxlan device counter")
}

/// An underlay that drops container addresses (a cloud) carries host
/// traffic and defeats native routing: the container IPs on the wire are
/// dropped.
#[test]
fn native_routing_cannot_cross_an_underlay_that_drops_container_ips() {
    let topo = topology();
    let cloud = cloud_underlay(&topo);
    let (a, b) = (topo.host_a(), topo.host_b());
    let (ca, cb) = (topo.ctr_a(), topo.ctr_b());
    let ping_underlay = ping(a.ns(), b.underlay_ip(), 1).expect("ping B's underlay");
    assert!(
        ping_underlay.all_received(),
        "the cloud carries host traffic"
    );
    let agent_a = start(a, b, &[]);
    let agent_b = start(b, a, &[]);
    let drops = cloud_drops(&cloud);
    assert!(
        !ping(ca.ns(), cb.ip(), 1).expect("ping").any_received(),
        "native routing crossed a cloud that drops container IPs"
    );
    assert!(cloud_drops(&cloud) > drops, "the cloud dropped nothing");
    stop_leaving_nothing(agent_a, a.ns());
    stop_leaving_nothing(agent_b, b.ns());
}

/// No `xhost_vxlan` device and no kernel route of xhost's (`proto 177`) on `h`.
fn assert_no_tunnel_left(h: &xhost_tests::Host) {
    assert!(
        !link_names(h.ns()).contains(&"xhost_vxlan".to_owned()),
        "{}: xhost_vxlan left",
        h.role()
    );
    assert!(
        h.ns()
            .run(&["ip", "route", "show", "proto", "177"])
            .is_empty(),
        "{}: kernel routes left",
        h.role()
    );
}

/// In VXLAN mode containers talk through an underlay that drops container
/// addresses (a cloud), container IPs kept, with TCP learning the tunnel's
/// smaller MTU from the kernel's frag-needed. The datapath encapsulates
/// every packet itself (the vxlan device sends none), on the configured
/// port, with the outer headers the kernel's vxlan writes, and decapsulates
/// single packets (pings) itself. Unloading removes the vxlan device and
/// its routes.
#[test]
fn vxlan_crosses_an_underlay_that_drops_container_ips() {
    let topo = topology();
    let cloud = cloud_underlay(&topo);
    let (a, b) = (topo.host_a(), topo.host_b());
    let (ca, cb) = (topo.ctr_a(), topo.ctr_b());

    // The IANA port, not the default: the datapath's own packets must go
    // where the devices listen.
    let vxlan = ["--tunnel", "vxlan", "--vni", "4242", "--vxlan-port", "4789"];
    let agent_a = start(a, b, &vxlan);
    let agent_b = start(b, a, &vxlan);
    count_outer_headers(&cloud, &topo, 4789);
    for (h, agent) in [(a, &agent_a), (b, &agent_b)] {
        let s = status_json(h.ns(), &agent.dirs);
        assert_eq!(s["agent"]["tunnel"]["vni"], 4242, "{s}");
        // The underlay's 1500 less 50 bytes of VXLAN.
        assert_eq!(s["agent"]["tunnel"]["mtu"], 1450, "{s}");
        let dev = h.ns().run(&["ip", "-d", "link", "show", "xhost_vxlan"]);
        assert!(
            dev.contains("mtu 1450") && dev.contains("external") && dev.contains("dstport 4789"),
            "{}: {dev}",
            h.role()
        );
        let progs = attached_programs(h.ns(), &["xhost_vxlan"]).expect("bpftool");
        assert_eq!(
            progs,
            [
                format!("xhost_vxlan {} xhost_vxlan_in", tc_hook("ingress")),
                format!("xhost_vxlan {} xhost_vxlan_out", tc_hook("egress"))
            ],
            "{}",
            h.role()
        );
    }
    let routes = a.ns().run(&["ip", "route", "show", "proto", "177"]);
    assert!(
        routes.contains(&format!("{} dev xhost_vxlan scope link", b.subnet())),
        "host A's kernel route into the tunnel: {routes}"
    );
    let drops = cloud_drops(&cloud);
    let before = [
        status_json(a.ns(), &agent_a.dirs),
        status_json(b.ns(), &agent_b.dirs),
    ];
    let tunnel = |dir| [tunnel_packets(a.ns(), dir), tunnel_packets(b.ns(), dir)];
    let tunnel_tx = tunnel("tx");
    let p = ping(ca.ns(), cb.ip(), 5).expect("ping A->B");
    assert!(p.all_received(), "ping A->B over VXLAN: {p:?}");
    // Once each agent knows its container's endpoint (from the bridge's
    // neighbours), single packets for it are decapsulated by the program:
    // the vxlan devices receive none of them.
    let agents = [(a, &agent_a), (b, &agent_b)];
    for (h, agent) in agents {
        xhost_tests::xhost::wait_status(
            h.ns(),
            &agent.dirs,
            "the container's endpoint",
            std::time::Duration::from_secs(5),
            |s| s["endpoints"].as_array().map(Vec::len) == Some(1),
        )
        .unwrap_or_else(|e| panic!("{}: {e}", h.role()));
    }
    let (tunnel_rx, delivered) = (
        tunnel("rx"),
        agents.map(|(h, agent)| counter(&status_json(h.ns(), &agent.dirs), "fwd_ingress")),
    );
    let p = ping(ca.ns(), cb.ip(), 3).expect("ping A->B");
    assert!(p.all_received(), "ping A->B over VXLAN: {p:?}");
    assert_eq!(
        tunnel("rx"),
        tunnel_rx,
        "the vxlan devices received pings the datapath decapsulates itself"
    );
    for ((h, agent), before) in agents.into_iter().zip(delivered) {
        let s = status_json(h.ns(), &agent.dirs);
        assert_eq!(
            counter(&s, "fwd_ingress") - before,
            3,
            "{}: the echoes delivered: {s}",
            h.role()
        );
    }
    for (from, to, port) in [(ca, cb, 45_131u16), (cb, ca, 45_132)] {
        // 1500-byte containers learn the tunnel's MTU from their host.
        let t = transfer_learning_mtu(from, to, port, 16 << 20, 1450);
        assert_eq!(t.source_ip(), from.ip(), "container IPs kept, no NAT");
    }
    assert_eq!(
        cloud_drops(&cloud),
        drops,
        "no container IP crossed the cloud"
    );
    for (dir, (sent, good)) in ["A->B", "B->A"].into_iter().zip(outer_headers(&cloud)) {
        assert!(sent > 100, "{dir}: {sent} VXLAN packets on port 4789");
        assert_eq!(good, sent, "{dir}: outer headers unlike the kernel's");
    }
    assert_eq!(
        tunnel("tx"),
        tunnel_tx,
        "the vxlan devices sent what the datapath encapsulates itself"
    );
    for ((h, agent), before) in [(a, &agent_a), (b, &agent_b)].into_iter().zip(&before) {
        let s = status_json(h.ns(), &agent.dirs);
        for name in ["fwd_egress", "fwd_ingress", "pass_fib"] {
            assert!(
                counter(&s, name) > counter(before, name),
                "{}: {name} did not move: {s}",
                h.role()
            );
        }
        for name in ["drop_spoofed", "drop_tunnel", "drop_redirect"] {
            assert_eq!(counter(&s, name), 0, "{}: {name}: {s}", h.role());
        }
    }
    for (h, agent) in [(a, agent_a), (b, agent_b)] {
        stop_leaving_nothing(agent, h.ns());
        assert_no_tunnel_left(h);
    }
}

/// Detached, the VXLAN device outlives the loading process; unload removes it.
#[test]
fn a_detached_vxlan_datapath_keeps_its_device_until_unload() {
    let topo = topology();
    let (a, b) = (topo.host_a(), topo.host_b());
    let dirs = AgentDirs::unique("a");
    let _guard = scopeguard(std::slice::from_ref(&dirs));
    let mut args = vec!["load".to_owned()];
    args.extend(load_args(a, b, &["--tunnel", "vxlan", "--detach"]));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = xhost(a.ns(), &dirs, &args).expect("load --detach");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(link_names(a.ns()).contains(&"xhost_vxlan".to_owned()));
    let out = xhost(a.ns(), &dirs, &["unload"]).expect("unload");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        dirs.leftovers().is_empty(),
        "unload left {:?}",
        dirs.leftovers()
    );
    assert_no_tunnel_left(a);
}

/// In VXLAN mode a UDP GSO burst is one the program cannot encapsulate in
/// place (its segments only the kernel measures): it goes to the vxlan
/// device whole, once its segments fit the device's MTU, and its datagrams
/// arrive whole. One whose segments do not fit is the kernel's (its route
/// into the device answers frag-needed) and is not delivered.
#[test]
fn vxlan_mode_hands_udp_gso_bursts_to_the_device() {
    let topo = topology();
    let (a, b) = (topo.host_a(), topo.host_b());
    let (ca, cb) = (topo.ctr_a(), topo.ctr_b());
    let vxlan = ["--tunnel", "vxlan"];
    let agent_a = start(a, b, &vxlan);
    let _agent_b = start(b, a, &vxlan);
    let counters = || {
        let s = status_json(a.ns(), &agent_a.dirs);
        (
            counter(&s, "fwd_egress"),
            counter(&s, "pass_fib"),
            tunnel_packets(a.ns(), "tx"),
        )
    };
    // 1428 bytes of IPv4 per datagram: they fit the device's 1450.
    let opts = UdpGsoOpts::default();
    let bursts = u64::from(opts.bursts);
    let datagrams = bursts * u64::from(opts.segments);
    let (fwd, pass, tx) = counters();
    let t = udp_gso_transfer(ca.ns(), cb.ns(), cb.ip(), &opts).expect("udp gso transfer");
    assert!(t.complete(), "every datagram must arrive whole: {t:?}");
    let (fwd_after, pass_after, tx_after) = counters();
    assert!(
        (bursts..datagrams).contains(&(fwd_after - fwd)),
        "{bursts} bursts must be forwarded as that many skbs: fwd_egress moved by {}",
        fwd_after - fwd
    );
    assert!(
        tx_after - tx >= bursts,
        "the bursts did not go through the vxlan device (its tx moved by {})",
        tx_after - tx
    );
    assert_eq!(
        pass_after, pass,
        "no burst fitting the device is the kernel's"
    );

    // 1468 bytes of IPv4 per datagram: over the device's MTU.
    assert_burst_left_to_kernel(&topo, &agent_a, opts.port + 1, 1440, "the device's");
}

/// In VXLAN mode only what the tunnel vouches for is delivered: our VNI,
/// from a peer host, with an inner source in that peer's own subnets. A
/// third host speaks the kernel's own VXLAN to host B, once as the peer it
/// is configured as (delivered), then with each of those wrong (dropped
/// and counted).
#[test]
fn vxlan_delivers_only_what_a_peer_host_encapsulates() {
    let topo = topology();
    let (a, b) = (topo.host_a(), topo.host_b());
    let cb = topo.ctr_b();
    let c = NetNs::new("host-c").expect("host C netns");
    b.ns()
        .ip_batch(&format!(
            "link add ul1 type veth peer name ul1 netns {}\n\
             addr add 172.16.92.2/24 dev ul1\n\
             link set ul1 up\n",
            c.name()
        ))
        .expect("B's link to C");
    c.ip_batch(
        "link set lo up\n\
         addr add 172.16.92.1/24 dev ul1\n\
         addr add 172.16.92.3/24 dev ul1\n\
         link set ul1 up\n",
    )
    .expect("host C");
    // Only the pings cross: no IPv6 chatter from C's devices.
    c.sysctl("net.ipv6.conf.default.disable_ipv6", "1")
        .expect("IPv6 off on host C");
    let vxlan = ["--tunnel", "vxlan"];
    let _agent_a = start(a, b, &vxlan);
    let agent_b = start(
        b,
        a,
        &[
            "--tunnel",
            "vxlan",
            "--peer",
            "172.16.92.1=192.168.130.0/24",
        ],
    );
    // C's link to B is not B's underlay (no xhost_nic_in there): what C
    // sends is decapsulated by B's vxlan device, and xhost_vxlan_in decides.
    // (The program's own decapsulation checks the same and is tested
    // packet by packet in xhost-user/tests/prog_test_run.rs.)

    // Host C sends from `inner` through a VXLAN device with `vni`, whose
    // outer source is `local`.
    let ping_from_c = |vni: &str, local: &str, inner: &str| {
        c.ip_batch(&format!(
            "link add vx0 type vxlan id {vni} local {local} remote 172.16.92.2 dstport 8472 nolearning\n\
             addr add {inner}/32 dev vx0\n\
             link set vx0 up\n\
             route add 192.168.220.0/24 dev vx0 src {inner}\n\
             neigh add {ctr} lladdr 02:42:00:00:00:01 dev vx0\n",
            ctr = cb.ip(),
        ))
        .expect("host C's vxlan device");
        let counters = || {
            let s = status_json(b.ns(), &agent_b.dirs);
            [counter(&s, "fwd_ingress"), counter(&s, "drop_spoofed")]
        };
        let before = counters();
        ping(&c, cb.ip(), 2).expect("ping from C");
        let after = counters();
        c.run(&["ip", "link", "del", "vx0"]);
        [after[0] - before[0], after[1] - before[1]]
    };
    // The echoes are delivered. (The replies are not checked: the kernel's
    // VXLAN wants them sent to its own MAC, which only a peer's FDB says.)
    assert_eq!(
        ping_from_c("1", "172.16.92.1", "192.168.130.5"),
        [2, 0],
        "peer C, its subnet, our VNI: [delivered, dropped]"
    );
    for (vni, local, inner, what) in [
        (
            "1",
            "172.16.92.3",
            "192.168.130.5",
            "outer source no peer host",
        ),
        (
            "1",
            "172.16.92.1",
            "192.168.110.77",
            "inner source host A's, sent by C",
        ),
        ("2", "172.16.92.1", "192.168.130.5", "another VNI"),
    ] {
        assert_eq!(
            ping_from_c(vni, local, inner),
            [0, 2],
            "{what}: [delivered, dropped]"
        );
    }
}

/// Echo requests from `src` that reached the stack of the container in
/// `ns`: a counting rule in its raw PREROUTING, which sees every packet
/// that arrives, before anything else in it decides.
fn arrived_from(ns: &NetNs, src: std::net::Ipv4Addr) -> u64 {
    let rule = format!("-A PREROUTING -s {src}/32 -p icmp");
    let saved = ns.run(&["iptables-save", "-c", "-t", "raw"]);
    saved
        .lines()
        .find(|l| l.ends_with(&rule))
        .and_then(|l| l.strip_prefix('[')?.split(':').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no counting rule for {src} in {}: {saved}", ns.name()))
}

/// Three echo requests from `ns` to `dst` with source address `src`, which
/// is added to eth0 for the purpose and removed again. No reply is
/// expected.
fn ping_from(ns: &NetNs, src: std::net::Ipv4Addr, dst: std::net::Ipv4Addr) {
    let own = src.to_string();
    ns.run(&["ip", "addr", "add", &format!("{own}/32"), "dev", "eth0"]);
    ns.exec(&[
        "ping",
        "-n",
        "-c",
        "3",
        "-i",
        "0.2",
        "-W",
        "1",
        "-I",
        &own,
        &dst.to_string(),
    ])
    .expect("ping");
    ns.run(&["ip", "addr", "del", &format!("{own}/32"), "dev", "eth0"]);
}

/// A container reaches the other host only with its own address, on both
/// paths, with the topology below (three containers a host; A's agent knows
/// ctr-a and ctr-a2 from the bridge's neighbour and FDB tables, never
/// ctr-a3, which has a static entry for its gateway and so never ARPs):
///
/// ```text
///  ctr-a  .11 ---veth (xhost_veth_in)--+
///  ctr-a2 .12 ---veth (xhost_veth_in)--+ docker0 (xhost_bridge_in) 192.168.110.1
///  ctr-a3 .13 ---veth (nothing)---------+    |  ens33 ====== ens33   host B
///                                                                 ctr-b 192.168.220.11
/// ```
///
/// * ctr-a's own address works before its endpoint is known (its first
///   packets take the bridge path) and after.
/// * ctr-a, on its veth, from an unused address of its subnet, ctr-a2's,
///   a peer's and a foreign subnet's: dropped on host A as
///   `drop_spoofed_local`.
/// * ctr-a3, on the bridge path, from ctr-a2's address and from an unused
///   one: dropped on host A as `drop_spoofed_local`. (With ctr-a2's MAC as
///   well, the bridge's FDB moves that MAC to ctr-a3's port, and a static
///   bridge's endpoints are what its tables say: that case is checked
///   packet by packet in xhost-user/tests/prog_test_run.rs.)
///
/// * VXLAN mode: ctr-a's own VXLAN packets with xhost's VNI and port,
///   which host A's NAT would pass off as host A's: dropped on host A as
///   `drop_spoofed_local`.
///
/// None of them arrives in ctr-b (counted in its raw PREROUTING); ctr-a's
/// and ctr-a2's own echo requests do, throughout.
fn only_own_sources_reach_the_peer(extra: &[&str]) {
    require_root();
    let topo = Topology::two_hosts(TopologyOpts {
        containers_per_host: 3,
        ..TopologyOpts::default()
    })
    .expect("build two-host topology");
    let (a, b) = (topo.host_a(), topo.host_b());
    let [ca, ca2, ca3] = [0, 1, 2].map(|i| &a.containers()[i]);
    let cb = topo.ctr_b();
    let unused: std::net::Ipv4Addr = "192.168.110.99".parse().expect("addr");
    let peer_subnet: std::net::Ipv4Addr = "192.168.220.77".parse().expect("addr");
    let foreign: std::net::Ipv4Addr = "10.1.2.3".parse().expect("addr");
    for src in [ca.ip(), ca2.ip(), unused, peer_subnet, foreign] {
        cb.ns().run(&[
            "iptables",
            "-w",
            "-t",
            "raw",
            "-A",
            "PREROUTING",
            "-s",
            &format!("{src}/32"),
            "-p",
            "icmp",
        ]);
    }
    // ARP requests name the address a packet is sent from unless told to
    // take the interface's own: on a static bridge an address announced
    // by ARP becomes that container's endpoint (docs/security.md), which
    // is not what this test is about.
    for c in [ca, ca2] {
        c.ns()
            .sysctl("net.ipv4.conf.all.arp_announce", "2")
            .expect("arp_announce");
    }
    // ctr-a3 never ARPs: host A's neighbour table never names it.
    let link = a.ns().run(&["ip", "-br", "link", "show", a.bridge()]);
    let gw_mac = link
        .split_whitespace()
        .nth(2)
        .expect("bridge MAC")
        .to_owned();
    ca3.ns().run(&[
        "ip",
        "neigh",
        "replace",
        &ca3.gateway().to_string(),
        "lladdr",
        &gw_mac,
        "nud",
        "permanent",
        "dev",
        "eth0",
    ]);

    let agent_a = start(a, b, extra);
    let agent_b = start(b, a, extra);
    let s = status_json(a.ns(), &agent_a.dirs);
    assert_eq!(
        s["endpoints"].as_array().map(Vec::len),
        Some(0),
        "no endpoint known before any container sent: {s}"
    );
    // Known after its first packets, which therefore took the bridge path.
    for c in [ca, ca2] {
        let p = ping(c.ns(), cb.ip(), 3).expect("ping");
        assert!(
            p.all_received(),
            "{} before it is known: {p:?}\nhost A: {}\nhost B: {}",
            c.ip(),
            status_json(a.ns(), &agent_a.dirs)["counters"],
            status_json(b.ns(), &agent_b.dirs)["counters"]
        );
    }
    let known = |s: &serde_json::Value| {
        let ips: Vec<&str> = s["endpoints"]
            .as_array()
            .map(|e| e.iter().filter_map(|e| e["ip"].as_str()).collect())
            .unwrap_or_default();
        [ca.ip(), ca2.ip()]
            .iter()
            .all(|ip| ips.contains(&ip.to_string().as_str()))
            && !ips.contains(&ca3.ip().to_string().as_str())
    };
    xhost_tests::xhost::wait_status(
        a.ns(),
        &agent_a.dirs,
        "ctr-a and ctr-a2 known, ctr-a3 not",
        std::time::Duration::from_secs(5),
        known,
    )
    .expect("endpoints");

    let dropped = || counter(&status_json(a.ns(), &agent_a.dirs), "drop_spoofed_local");
    let own_before = (
        arrived_from(cb.ns(), ca.ip()),
        arrived_from(cb.ns(), ca2.ip()),
    );
    for (who, src, what) in [
        (ca, unused, "an unused address of its subnet, on its veth"),
        (ca, ca2.ip(), "ctr-a2's address, on ctr-a's veth"),
        (
            ca,
            peer_subnet,
            "an address of the peer's subnet, on its veth",
        ),
        (ca, foreign, "a foreign address, on its veth"),
        (ca3, ca2.ip(), "ctr-a2's address, on the bridge path"),
        (ca3, unused, "an unused address, on the bridge path"),
    ] {
        let before = (dropped(), arrived_from(cb.ns(), src));
        ping_from(who.ns(), src, cb.ip());
        assert_eq!(
            arrived_from(cb.ns(), src) - before.1,
            0,
            "{what}: arrived in ctr-b"
        );
        assert_eq!(
            dropped() - before.0,
            3,
            "{what}: each counted as drop_spoofed_local on host A"
        );
    }
    if extra.contains(&"vxlan") {
        // ctr-a tunnels by itself: its own VXLAN device with xhost's VNI
        // and port, to host B's underlay address. Host A's NAT gives the
        // outer packet host A's address, so host B would take it for one
        // host A encapsulated and deliver what it carries, from any source
        // of host A's subnet. (No IPv6 on the device: only the echoes go.)
        ca.ns()
            .sysctl("net.ipv6.conf.default.disable_ipv6", "1")
            .expect("IPv6 off for new devices in ctr-a");
        ca.ns()
            .ip_batch(&format!(
                "link add vx0 type vxlan id 1 remote {} dstport 8472 nolearning
                 addr add {unused}/32 dev vx0
                 link set vx0 up
                 route add {ctr}/32 dev vx0 src {unused}
                 neigh add {ctr} lladdr 02:42:00:00:00:01 dev vx0
",
                b.underlay_ip(),
                ctr = cb.ip(),
            ))
            .expect("ctr-a's own vxlan device");
        let before = (dropped(), arrived_from(cb.ns(), unused));
        ca.ns()
            .exec(&[
                "ping",
                "-n",
                "-c",
                "3",
                "-i",
                "0.2",
                "-W",
                "1",
                &cb.ip().to_string(),
            ])
            .expect("ping through ctr-a's vxlan device");
        ca.ns().run(&["ip", "link", "del", "vx0"]);
        assert_eq!(
            (
                arrived_from(cb.ns(), unused) - before.1,
                dropped() - before.0
            ),
            (0, 3),
            "a container's own VXLAN packets with our VNI: [arrived, dropped]"
        );
    }

    // The owners' own addresses still work, and each of their echo
    // requests arrived.
    for c in [ca, ca2] {
        let p = ping(c.ns(), cb.ip(), 3).expect("ping");
        assert!(p.all_received(), "{} afterwards: {p:?}", c.ip());
    }
    assert_eq!(
        (
            arrived_from(cb.ns(), ca.ip()) - own_before.0,
            arrived_from(cb.ns(), ca2.ip()) - own_before.1
        ),
        (3, 3),
        "own echo requests arrived in ctr-b"
    );
    assert_eq!(
        counter(&status_json(b.ns(), &agent_b.dirs), "drop_spoofed"),
        0,
        "nothing reached host B to be dropped there"
    );
}

#[test]
fn only_own_sources_reach_the_peer_native() {
    only_own_sources_reach_the_peer(&[]);
}

#[test]
fn only_own_sources_reach_the_peer_vxlan() {
    only_own_sources_reach_the_peer(&["--tunnel", "vxlan"]);
}

/// `connect()` from `ns` to `to`, at most `timeout`: its result and how long
/// it took.
fn connect_from(
    ns: &NetNs,
    to: std::net::SocketAddr,
    timeout: std::time::Duration,
) -> (std::io::Result<()>, std::time::Duration) {
    ns.within("connect", move || {
        let t0 = std::time::Instant::now();
        let r = std::net::TcpStream::connect_timeout(&to, timeout).map(drop);
        Ok((r, t0.elapsed()))
    })
    .expect("connect thread")
}

/// `--deny reject`: what xhost refuses is answered by the datapath itself.
/// Host B (an underlay host, not a peer's container) reaches for container
/// A by a route of its own, as in `underlay_hosts_cannot_reach_containers_directly`.
/// Container A listens on the port, so only xhost can refuse the connection:
///
/// ```text
///  host B 172.16.91.132 --SYN--> ens33 of A: xhost_nic_in refuses (source not a peer's)
///         <--RST from 192.168.110.11-- (built in place, sent back out ens33)
/// ```
///
/// Under `--deny reject` `connect()` fails at once with ECONNREFUSED and a
/// ping gets ICMP administratively prohibited (ping says "Packet
/// filtered"), each counted as `drop_spoofed` and its answer as
/// `reject_sent`; after a restart with the default (drop) `connect()` times
/// out and nothing is sent.
#[test]
fn deny_reject_answers_refused_connections_and_pings() {
    let topo = topology();
    let (a, b) = (topo.host_a(), topo.host_b());
    let ctr = topo.ctr_a();
    let listener = ctr
        .ns()
        .within("listen", || {
            std::net::TcpListener::bind((std::net::Ipv4Addr::UNSPECIFIED, 5201)).map_err(|source| {
                xhost_tests::Error::Io {
                    what: "bind 5201 in container A".into(),
                    source,
                }
            })
        })
        .expect("listener in container A");
    let to = std::net::SocketAddr::from((ctr.ip(), 5201));
    let agent_a = start(a, b, &["--deny", "reject"]);
    let _agent_b = start(b, a, &[]);
    b.ns().run(&[
        "ip",
        "route",
        "replace",
        &a.subnet().to_string(),
        "via",
        &a.underlay_ip().to_string(),
    ]);
    let s0 = status_json(a.ns(), &agent_a.dirs);
    let (r, took) = connect_from(b.ns(), to, std::time::Duration::from_secs(3));
    let e = r.expect_err("xhost must refuse host B's connection to container A");
    assert_eq!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "reject: connect() is refused: {e}"
    );
    assert!(
        took < std::time::Duration::from_secs(1),
        "reject: refused at once, not after a retry: {took:?}"
    );
    let ping = b
        .ns()
        .exec(&["ping", "-n", "-c", "1", "-W", "2", &ctr.ip().to_string()])
        .expect("ping");
    let out = String::from_utf8_lossy(&ping.stdout);
    assert!(
        out.contains(&format!("From {} icmp_seq=1 Packet filtered", ctr.ip())),
        "reject: ping gets administratively prohibited from container A's address:\n{out}"
    );
    let s1 = status_json(a.ns(), &agent_a.dirs);
    assert_eq!(
        counter(&s1, "drop_spoofed") - counter(&s0, "drop_spoofed"),
        2,
        "the SYN and the echo request are refused"
    );
    assert_eq!(
        counter(&s1, "reject_sent") - counter(&s0, "reject_sent"),
        2,
        "one RST and one ICMP error sent"
    );
    drop(agent_a);
    let agent_a = start(a, b, &[]);
    let (r, took) = connect_from(b.ns(), to, std::time::Duration::from_secs(2));
    let e = r.expect_err("xhost must drop host B's connection to container A");
    assert_eq!(
        e.kind(),
        std::io::ErrorKind::TimedOut,
        "drop: connect() times out: {e}"
    );
    assert!(
        took >= std::time::Duration::from_secs(2),
        "drop: no answer: {took:?}"
    );
    let s2 = status_json(a.ns(), &agent_a.dirs);
    assert_eq!(counter(&s2, "reject_sent"), 0, "drop: nothing sent");
    assert!(
        counter(&s2, "drop_spoofed") >= 1,
        "drop: the SYN is dropped"
    );
    drop(listener);
}

/// Each host's container IPv6 subnet in [`vxlan_carries_ipv6_over_the_ipv4_underlay`].
const SUBNETS6: [&str; 2] = ["fd00:a::/64", "fd00:b::/64"];

/// Gives the host's bridge (the gateway, `::1`) and its container (`::11`)
/// addresses of `subnet` (a /64 written `prefix::/64`), the container a
/// default route through the bridge, and the host IPv6 forwarding; returns
/// the container's address.
fn dual_stack(host: &xhost_tests::Host, subnet: &str) -> std::net::Ipv6Addr {
    let prefix = subnet.trim_end_matches("::/64");
    host.ns()
        .sysctl("net.ipv6.conf.all.forwarding", "1")
        .expect("IPv6 forwarding");
    host.ns()
        .ip_batch(&format!(
            "addr add {prefix}::1/64 dev {} nodad\n",
            host.bridge()
        ))
        .expect("bridge IPv6 address");
    let ctr = &host.containers()[0];
    ctr.ns()
        .ip_batch(&format!(
            "addr add {prefix}::11/64 dev {} nodad\n\
             route add ::/0 via {prefix}::1\n",
            ctr.iface()
        ))
        .expect("container IPv6 address");
    format!("{prefix}::11").parse().expect("address")
}

/// VXLAN mode carries IPv6 over the IPv4 underlay through a cloud that
/// drops container addresses of either family: ping6 and checksummed TCP
/// both ways with the sender's address kept, the receiving hosts' IPv6
/// counters moving, the outer headers the kernel's vxlan writes. In the
/// netns topology the agents serve `--bridge` bridges, whose IPv6
/// endpoints they do not learn: the kernel routes each container's IPv6
/// into `xhost_vxlan` (the agent's `proto 177` route, the device's IPv6
/// on without addresses), `xhost_vxlan_out` keys it from `ROUTES6`, and
/// `xhost_vxlan_in` checks and hands on what the far device decapsulated.
/// TCP learns the tunnel's MTU from the kernel's Packet Too Big.
#[test]
fn vxlan_carries_ipv6_over_the_ipv4_underlay() {
    let topo = topology();
    let cloud = cloud_underlay(&topo);
    let (a, b) = (topo.host_a(), topo.host_b());
    let (ca, cb) = (topo.ctr_a(), topo.ctr_b());
    let (ip_a6, ip_b6) = (dual_stack(a, SUBNETS6[0]), dual_stack(b, SUBNETS6[1]));
    cloud
        .sysctl("net.bridge.bridge-nf-call-ip6tables", "1")
        .expect("br_netfilter for IPv6 in the cloud");
    for (subnet, dir) in SUBNETS6.iter().flat_map(|s| [(s, "-s"), (s, "-d")]) {
        cloud.run(&[
            "ip6tables",
            "-w",
            "-A",
            "FORWARD",
            dir,
            subnet,
            "-j",
            "DROP",
        ]);
    }
    let start6 = |host: &xhost_tests::Host, peer: &xhost_tests::Host, subnet6: &str| {
        let spec = format!("{}={},{subnet6}", peer.underlay_ip(), peer.subnet());
        let args = [
            "--iface",
            host.underlay_iface(),
            "--bridge",
            host.bridge(),
            "--no-docker",
            "--peer",
            &spec,
            "--tunnel",
            "vxlan",
        ];
        Agent::start(host.ns(), host.role(), &args).expect("xhost-user load")
    };
    let agent_a = start6(a, b, SUBNETS6[1]);
    let agent_b = start6(b, a, SUBNETS6[0]);
    count_outer_headers(&cloud, &topo, 8472);
    for (h, subnet6) in [(a, SUBNETS6[1]), (b, SUBNETS6[0])] {
        let routes = h.ns().run(&["ip", "-6", "route", "show", "proto", "177"]);
        assert!(
            routes.contains(&format!("{subnet6} dev xhost_vxlan")),
            "{}: the IPv6 kernel route into the tunnel: {routes}",
            h.role()
        );
        let addrs = h
            .ns()
            .run(&["ip", "-6", "addr", "show", "dev", "xhost_vxlan"]);
        assert!(
            !addrs.contains("inet6"),
            "{}: xhost_vxlan has an IPv6 address of its own: {addrs}",
            h.role()
        );
    }
    let before = [
        status_json(a.ns(), &agent_a.dirs),
        status_json(b.ns(), &agent_b.dirs),
    ];
    let ping6 = |from: &xhost_tests::Container, to: std::net::Ipv6Addr| {
        let out = from
            .ns()
            .exec(&["ping", "-6", "-n", "-c", "3", "-W", "2", &to.to_string()])
            .expect("ping6");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    for (from, to) in [(ca, ip_b6), (cb, ip_a6)] {
        let p = ping6(from, to);
        assert!(
            p.contains(" 3 received"),
            "ping6 {} -> {to}: {p}",
            from.ip()
        );
    }
    for (from, to, to_ip, from_ip, port) in [
        (ca, cb, ip_b6, ip_a6, 45_161u16),
        (cb, ca, ip_a6, ip_b6, 45_162),
    ] {
        // Neither end remembers a path MTU from the other direction's
        // transfer (the receiver would advertise an MSS that fits).
        for c in [from, to] {
            c.ns().run(&["ip", "-6", "route", "flush", "cache"]);
        }
        let opts = TransferOpts {
            port,
            bytes: 4 << 20,
            ..TransferOpts::default()
        };
        let t = tcp_transfer(from.ns(), to.ns(), to_ip, &opts).expect("tcp transfer");
        assert!(t.intact(), "{from_ip} -> {to_ip}: {t:?}");
        assert_eq!(t.source_ip(), from_ip, "the sender's IPv6 address kept");
        let route = from
            .ns()
            .run(&["ip", "-6", "route", "get", &to_ip.to_string()]);
        assert!(
            route.contains("mtu 1450"),
            "{from_ip} never learned the tunnel's MTU from Packet Too Big: {route}"
        );
    }
    assert_eq!(
        cloud_drops(&cloud),
        0,
        "no container IPv4 address crossed the cloud"
    );
    let drops6: u64 = cloud
        .run(&["ip6tables", "-w", "-nvxL", "FORWARD"])
        .lines()
        .filter(|l| l.contains("DROP"))
        .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(drops6, 0, "no container IPv6 address crossed the cloud");
    for (dir, (sent, good)) in ["A->B", "B->A"].into_iter().zip(outer_headers(&cloud)) {
        assert!(sent > 100, "{dir}: {sent} VXLAN packets on port 8472");
        assert_eq!(good, sent, "{dir}: outer headers unlike the kernel's");
    }
    for ((h, agent), before) in [(a, &agent_a), (b, &agent_b)].into_iter().zip(&before) {
        let s = status_json(h.ns(), &agent.dirs);
        // What the far device decapsulated, checked and handed on by
        // xhost_vxlan_in.
        assert!(
            counter(&s, "pass_not_ours6") > counter(before, "pass_not_ours6") + 100,
            "{}: pass_not_ours6 did not move: {s}",
            h.role()
        );
        // (drop_tunnel is left out: the device's own IPv6 control traffic,
        // if any, is no peer's and is dropped there.)
        for name in ["drop_spoofed6", "drop_redirect"] {
            assert_eq!(counter(&s, name), 0, "{}: {name}: {s}", h.role());
        }
    }
    stop_leaving_nothing(agent_a, a.ns());
    stop_leaving_nothing(agent_b, b.ns());
    assert_eq!(
        a.ns().run(&["ip", "-6", "route", "show", "proto", "177"]),
        "",
        "IPv6 kernel routes left"
    );
}
