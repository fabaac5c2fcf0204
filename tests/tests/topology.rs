//! Real-kernel checks of the testbed itself: the two-host topology is built as documented,
//! isolates the container subnets, and leaves nothing behind. Needs root; run with
//! `--test-threads=1` (it creates namespaces and reads global netns listings).
//!
//! ```text
//!  ctr-a: eth0 192.168.110.11/24                 ctr-b: eth0 192.168.220.11/24
//!      | vethXXXXXXX                                 | vethXXXXXXX
//!  host-a: docker0 192.168.110.1/24              host-b: docker0 192.168.220.1/24
//!          ens33 172.16.91.131/24 <== veth ==> ens33 172.16.91.132/24
//! ```

use std::{net::Ipv4Addr, path::Path, process::Command, time::Duration};

use xhost_tests::{
    CtFilter, NETNS_DIR, Topology, TopologyOpts, TransferOpts, cleanup_stale, conntrack_entries,
    iptables_counter, is_root, ping, tcp_transfer,
};

/// Root is required to create namespaces: fail loudly rather than pass
/// having tested nothing.
fn require_root() {
    assert!(
        is_root(),
        "needs root (netns, veth, iptables): run via cargo xtask test"
    );
}

fn netns_list() -> String {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn assert_all_deleted(names: &[String]) {
    let listing = netns_list();
    for name in names {
        assert!(
            !listing
                .lines()
                .any(|l| l.split_whitespace().next() == Some(name)),
            "netns {name} still listed:\n{listing}"
        );
        assert!(
            !Path::new(NETNS_DIR).join(name).exists(),
            "{name} still mounted"
        );
    }
}

#[test]
fn two_hosts_are_isolated_until_routed() {
    require_root();
    let topo = Topology::two_hosts(TopologyOpts::default()).expect("build topology");
    println!("{}", topo.ascii());
    let names = topo.netns_names();
    assert_eq!(names.len(), 4);
    let (a, b) = (topo.host_a(), topo.host_b());
    let (ca, cb) = (topo.ctr_a(), topo.ctr_b());
    assert_eq!(ca.ip(), Ipv4Addr::new(192, 168, 110, 11));
    assert_eq!(cb.ip(), Ipv4Addr::new(192, 168, 220, 11));
    assert_eq!(a.underlay_ip(), Ipv4Addr::new(172, 16, 91, 131));
    assert_eq!(b.underlay_ip(), Ipv4Addr::new(172, 16, 91, 132));
    assert_eq!(a.bridge(), "docker0");
    assert!(ca.host_veth().starts_with("veth"));
    assert!(ca.host_veth_ifindex() > 1);

    // Each container reaches its own gateway.
    let p = ping(ca.ns(), a.bridge_ip(), 2).expect("ping");
    assert!(p.all_received(), "ctr-a -> 192.168.110.1:\n{}", p.output);
    let p = ping(cb.ns(), Ipv4Addr::new(192, 168, 220, 1), 2).expect("ping");
    assert!(p.all_received(), "ctr-b -> 192.168.220.1:\n{}", p.output);
    // The underlay connects the hosts.
    let p = ping(a.ns(), b.underlay_ip(), 1).expect("ping");
    assert!(p.all_received(), "host-a -> host-b underlay:\n{}", p.output);
    // No route between container subnets: host-a answers "net unreachable".
    let p = ping(ca.ns(), cb.ip(), 2).expect("ping");
    assert!(
        !p.any_received(),
        "ctr-a must not reach ctr-b yet:\n{}",
        p.output
    );

    // Docker's state is in place on both hosts.
    for h in topo.hosts() {
        assert_eq!(
            h.ns().sysctl_get("net.ipv4.ip_forward").expect("sysctl"),
            "1"
        );
        let fwd = iptables_counter(h.ns(), "FORWARD").expect("FORWARD counters");
        assert_eq!(fwd.policy.as_deref(), Some("DROP"));
        assert_eq!(fwd.rules[0].target, "DOCKER-USER");
        let nat = h.ns().run(&["iptables", "-t", "nat", "-S", "POSTROUTING"]);
        assert!(
            nat.contains(&format!("-s {} ! -o docker0 -j MASQUERADE", h.subnet())),
            "{nat}"
        );
    }

    // The TCP helper works against a local endpoint (host-a's INPUT path).
    let t = tcp_transfer(ca.ns(), a.ns(), a.bridge_ip(), &TransferOpts::default())
        .expect("ctr-a -> host-a transfer");
    assert!(t.intact(), "{t:?}");
    assert_eq!(t.source_ip(), ca.ip());

    // ...and fails (bounded) where there is no path.
    let short = TransferOpts {
        timeout: Duration::from_secs(2),
        ..TransferOpts::default()
    };
    assert!(tcp_transfer(ca.ns(), cb.ns(), cb.ip(), &short).is_err());

    drop(topo);
    assert_all_deleted(&names);
}

#[test]
fn bridged_containers_go_through_docker_forward_rules() {
    require_root();
    let topo = Topology::two_hosts(TopologyOpts {
        containers_per_host: 2,
        ..TopologyOpts::default()
    })
    .expect("build topology");
    let host = topo.host_a();
    let [c1, c2] = host.containers() else {
        panic!("expected 2 containers, got {}", host.containers().len());
    };
    assert_eq!(c2.ip(), Ipv4Addr::new(192, 168, 110, 12));
    let before = iptables_counter(host.ns(), "FORWARD").expect("counters");

    let t = tcp_transfer(c1.ns(), c2.ns(), c2.ip(), &TransferOpts::default()).expect("transfer");
    assert!(t.intact(), "{t:?}");
    assert_eq!(t.received.bytes, 1 << 20);
    assert_eq!(t.source_ip(), c1.ip());

    // bridge-nf-call-iptables sends bridged frames through FORWARD, as on a Docker host.
    let after = iptables_counter(host.ns(), "FORWARD").expect("counters");
    assert!(
        after.total_packets() > before.total_packets(),
        "FORWARD counters did not move: {after:?}"
    );
    let entries = conntrack_entries(
        host.ns(),
        &CtFilter {
            proto: Some("tcp".into()),
            dport: Some(TransferOpts::default().port),
            ..CtFilter::flow(c1.ip(), c2.ip())
        },
    )
    .expect("conntrack");
    assert_eq!(entries.len(), 1, "{entries:?}");
}

#[test]
fn teardown_runs_on_panic() {
    require_root();
    let mut names = Vec::new();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let topo = Topology::two_hosts(TopologyOpts::default()).expect("build topology");
        names = topo.netns_names();
        panic!("deliberate panic with the topology alive");
    }));
    assert!(result.is_err());
    assert_eq!(names.len(), 4);
    assert_all_deleted(&names);
}

#[test]
fn cleanup_stale_removes_dead_runs_only() {
    require_root();
    // A pid that is certainly not alive: a child we ran and reaped.
    let dead = Command::new("true").spawn().expect("spawn true");
    let dead_pid = dead.id();
    let mut dead = dead;
    dead.wait().expect("wait true");
    let stale = format!("xh-{dead_pid}-0-stale");
    let live = format!("xh-{}-999-live", std::process::id());
    for n in [&stale, &live] {
        let ok = Command::new("ip")
            .args(["netns", "add", n])
            .status()
            .expect("ip");
        assert!(ok.success(), "ip netns add {n}");
    }
    let removed = cleanup_stale();
    // Delete the live one ourselves, and the stale one if cleanup missed it, before asserting.
    for n in [&stale, &live] {
        let _ = Command::new("ip")
            .args(["netns", "del", n])
            .stderr(std::process::Stdio::null())
            .status();
    }
    let removed = removed.expect("cleanup_stale");
    assert!(removed.contains(&stale), "{removed:?}");
    assert!(!removed.contains(&live), "{removed:?}");
}
