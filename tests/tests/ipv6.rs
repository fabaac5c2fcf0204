//! The agent's IPv6 side on the two-host netns topology: IPv6 peer subnets
//! from the config become `ROUTES6` entries and kernel routes on the
//! underlay (`proto 177`; Linux has no IPv6 route via an IPv4 next hop),
//! follow a SIGHUP, and leave with the agent. Needs root; `--test-threads=1`.

use std::time::Duration;

use nix::sys::signal::Signal;
use xhost_tests::{
    NetNs, Topology, TopologyOpts,
    xhost::{Agent, AgentDirs, kernel_routes6, status_routes6, wait_status},
};

fn topology() -> Topology {
    assert!(
        xhost_tests::is_root(),
        "these tests load eBPF programs and build namespaces: run as root (cargo xtask test)"
    );
    Topology::two_hosts(TopologyOpts::default()).expect("build two-host topology")
}

fn wait_routes6(ns: &NetNs, dirs: &AgentDirs, want: &[String]) -> serde_json::Value {
    wait_status(ns, dirs, "ROUTES6", Duration::from_secs(5), |s| {
        status_routes6(s) == want
    })
    .unwrap_or_else(|e| panic!("{e}"))
    .0
}

/// A config file, removed when dropped.
struct ConfigFile(std::path::PathBuf);
impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn ipv6_peer_subnets_get_routes6_and_kernel_routes() {
    let topo = topology();
    let (a, b) = (topo.host_a(), topo.host_b());
    let cfg =
        ConfigFile(std::env::temp_dir().join(format!("xhost-ipv6-{}.toml", std::process::id())));
    let head = format!(
        "iface = \"{}\"\nbridges = [\"{}\"]\ndocker = false\n",
        a.underlay_iface(),
        a.bridge()
    );
    let peer = |subnets: &str| {
        format!(
            "{head}[[peer]]\nhost = \"{}\"\nsubnets = [{subnets}]\n",
            b.underlay_ip()
        )
    };
    // Dual-stack: B's IPv4 subnet and two IPv6 ones in one list.
    std::fs::write(
        &cfg.0,
        peer(&format!(
            "\"{}\", \"fd00:b::/64\", \"fd00:b:0:1::/64\"",
            b.subnet()
        )),
    )
    .expect("write config");
    let cfg_arg = cfg.0.display().to_string();
    let agent = Agent::start(a.ns(), a.role(), &["--config", &cfg_arg]).expect("load");
    let via = b.underlay_ip().to_string();
    let both = [
        format!("fd00:b::/64 via {via}"),
        format!("fd00:b:0:1::/64 via {via}"),
    ];
    let s = wait_routes6(a.ns(), &agent.dirs, &both);
    assert_eq!(
        s["routes"][0]["prefix"].as_str(),
        Some(b.subnet().to_string().as_str()),
        "the IPv4 subnet is routed as before: {s}"
    );
    let dev = a.underlay_iface();
    let (kernel_b, kernel_b1) = (
        format!("fd00:b::/64 dev {dev}"),
        format!("fd00:b:0:1::/64 dev {dev}"),
    );
    // Sorted as text.
    assert_eq!(
        kernel_routes6(a.ns()),
        [kernel_b1, kernel_b.clone()],
        "kernel routes, proto 177"
    );
    // The counters status shows include IPv6's.
    for name in ["fwd_egress6", "fwd_ingress6"] {
        assert!(s["counters"].get(name).is_some(), "{name} missing: {s}");
    }

    // One IPv6 subnet out: its map entry and kernel route go, the other stays.
    std::fs::write(
        &cfg.0,
        peer(&format!("\"{}\", \"fd00:b::/64\"", b.subnet())),
    )
    .expect("write config");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.pid() as i32),
        Signal::SIGHUP,
    )
    .expect("SIGHUP");
    wait_routes6(a.ns(), &agent.dirs, &both[..1]);
    assert_eq!(kernel_routes6(a.ns()), [kernel_b]);

    // Stopped: no pin, run file or kernel route of either family left.
    let (status, left) = agent.stop_with(Signal::SIGINT).expect("stop");
    assert!(status.success(), "agent exit: {status:?}");
    assert!(left.is_empty(), "left behind: {left:?}");
    assert_eq!(kernel_routes6(a.ns()), Vec::<String>::new());
    assert_eq!(
        a.ns().run(&["ip", "route", "show", "proto", "177"]),
        "",
        "IPv4 kernel routes gone too"
    );
}

/// A peer host on an IPv6 underlay that this host has no route to: its
/// subnet is in `ROUTES6` (the datapath leaves its packets to the kernel)
/// and the agent leaves out the kernel route with a warning, as it does
/// for an IPv4 peer that is not on-link, rather than refusing the load.
#[test]
fn an_ipv6_peer_host_off_link_gets_its_map_entry_without_a_kernel_route() {
    let topo = topology();
    let (a, b) = (topo.host_a(), topo.host_b());
    let v4_peer = format!("{}={}", b.underlay_ip(), b.subnet());
    let agent = Agent::start(
        a.ns(),
        a.role(),
        &[
            "--iface",
            a.underlay_iface(),
            "--bridge",
            a.bridge(),
            "--no-docker",
            "--peer",
            &v4_peer,
            "--peer",
            "[fd00:99::2]=fd00:c::/64",
        ],
    )
    .expect("load");
    wait_routes6(
        a.ns(),
        &agent.dirs,
        &["fd00:c::/64 via fd00:99::2".to_owned()],
    );
    assert_eq!(kernel_routes6(a.ns()), Vec::<String>::new());
    let log = agent.output();
    assert!(
        log.contains("no kernel route for fd00:c::/64: peer fd00:99::2 is not on-link"),
        "{log}"
    );
    let (status, _) = agent.stop_with(Signal::SIGINT).expect("stop");
    assert!(status.success(), "agent exit: {status:?}");
}
