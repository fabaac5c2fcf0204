//! A real Docker engine inside a simulated host's network namespace: it starts without any
//! engine in the host namespace, runs a container that reaches its gateway, keeps its
//! iptables rules inside the namespace, and leaves nothing behind. Needs root, dockerd and
//! busybox-static; run with `--test-threads=1`.
//!
//! ```text
//!  host netns: no Docker, iptables untouched
//!  ─────────────────────────────────────────────────────────────────────────
//!  netns xh-{pid}-{n}-dkr:  dockerd -H unix:///tmp/xhd-{pid}-{n}/docker.sock
//!     docker0 192.168.110.1/24 ── vethXXXX ══ eth0 192.168.110.x  (c1, bridge)
//!     br-<id12> 10.77.0.1/24   ── vethYYYY ══ eth0 10.77.0.10     (c2, user network)
//! ```

use std::{
    net::Ipv4Addr,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use xhost_tests::{
    NETNS_DIR, NetNs,
    docker_engine::{self, Engine, mounts_under, processes_mentioning},
    is_root,
};

fn privileged() -> bool {
    let ok = is_root() && Path::new("/usr/sbin/dockerd").exists();
    if !ok {
        eprintln!(
            "skipped: needs root and /usr/sbin/dockerd (apt-get install docker.io busybox-static)"
        );
    }
    ok
}

/// The host namespace's rules, without counters.
fn host_iptables() -> String {
    let mut all = String::new();
    for table in ["filter", "nat"] {
        let out = Command::new("iptables")
            .args(["-w", "-t", table, "-S"])
            .output()
            .expect("iptables -S");
        all.push_str(&String::from_utf8_lossy(&out.stdout));
    }
    all
}

#[test]
fn engine_in_netns_runs_containers_and_cleans_up() {
    if !privileged() {
        return;
    }
    for dir in docker_engine::cleanup_stale() {
        eprintln!("removed stale engine dir {}", dir.display());
    }
    let host_engine = Path::new("/var/run/docker.sock").exists();
    eprintln!("host namespace has a Docker socket: {host_engine}");
    let host_rules = host_iptables();

    let ns = NetNs::new("dkr").expect("netns");
    ns.ip(&["link", "set", "lo", "up"]).expect("lo up");
    let ns_name = ns.name().to_owned();
    let t0 = Instant::now();
    let mut engine = Engine::start_in_netns(&ns_name, "192.168.110.1/24").expect("start dockerd");
    eprintln!(
        "dockerd ready after {:?} (storage driver {})",
        t0.elapsed(),
        engine.storage_driver()
    );
    let dir = engine.dir().to_owned();
    let pid = engine.pid().expect("running");
    assert!(
        engine.socket().as_os_str().len() < 100,
        "socket path too long"
    );
    let pidfile = std::fs::read_to_string(dir.join("pid")).expect("pidfile");
    assert_eq!(pidfile.trim(), pid.to_string(), "child pid is dockerd's");

    let t = Instant::now();
    engine.import_busybox().expect("import busybox");
    eprintln!("busybox imported in {:?}", t.elapsed());
    engine.import_busybox().expect("import is idempotent");

    // Default bridge: Docker picks the address (--ip needs a user network).
    let t = Instant::now();
    let c1 = engine.run_container("bridge", None, "c1").expect("run c1");
    eprintln!("docker run returned after {:?}", t.elapsed());
    let ip1: Ipv4Addr = engine
        .inspect(&c1, "{{.NetworkSettings.Networks.bridge.IPAddress}}")
        .expect("inspect")
        .parse()
        .expect("IPv4");
    assert_eq!(ip1.octets()[..3], [192, 168, 110], "c1 got {ip1}");
    let ping = engine
        .docker(&["exec", &c1, "ping", "-c", "1", "-W", "2", "192.168.110.1"])
        .expect("docker exec");
    assert!(
        ping.status.success(),
        "c1 cannot ping its gateway:\n{}{}",
        String::from_utf8_lossy(&ping.stdout),
        String::from_utf8_lossy(&ping.stderr)
    );
    // The engine's namespace reaches the container too (docker0 is there).
    ns.run(&["ping", "-c", "1", "-W", "2", &ip1.to_string()]);

    // A user network with a fixed address.
    let net = engine
        .docker_ok(&["network", "create", "--subnet", "10.77.0.0/24", "xnet"])
        .expect("network create");
    let c2 = engine
        .run_container("xnet", Some("10.77.0.10"), "c2")
        .expect("run c2");
    assert_eq!(
        engine
            .inspect(&c2, "{{.NetworkSettings.Networks.xnet.IPAddress}}")
            .expect("inspect"),
        "10.77.0.10"
    );
    let links = ns.run(&["ip", "-br", "link"]);
    assert!(links.contains("docker0"), "{links}");
    assert!(links.contains(&format!("br-{}", &net[..12])), "{links}");

    // Docker's rules are inside the namespace, the host's are untouched.
    let rules = ns.run(&["iptables", "-w", "-t", "nat", "-S"]);
    assert!(
        rules.contains("-A POSTROUTING -s 192.168.110.0/24 ! -o docker0 -j MASQUERADE"),
        "{rules}"
    );
    let filter = ns.run(&["iptables", "-w", "-S", "FORWARD"]);
    assert!(
        filter.contains("-P FORWARD DROP") && filter.contains("DOCKER-USER"),
        "{filter}"
    );
    assert_eq!(
        host_iptables(),
        host_rules,
        "dockerd changed the host namespace's rules"
    );

    // A restart comes back with the same state.
    let t = Instant::now();
    engine.restart().expect("restart");
    eprintln!("restart (stop + start) took {:?}", t.elapsed());
    assert_eq!(
        engine.inspect("c1", "{{.State.Running}}").expect("inspect"),
        "false"
    );
    let pid = engine.pid().expect("running again");

    let t = Instant::now();
    drop(engine);
    eprintln!("teardown took {:?}", t.elapsed());
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "dockerd {pid} still alive"
    );
    assert_eq!(
        processes_mentioning(&dir),
        Vec::<u32>::new(),
        "engine processes left"
    );
    assert_eq!(
        mounts_under(&dir),
        Vec::<std::path::PathBuf>::new(),
        "mounts left"
    );
    assert!(!dir.exists(), "{} left", dir.display());
    assert!(
        ns.pids().expect("ip netns pids").is_empty(),
        "processes left in {ns_name}"
    );
    drop(ns);
    assert!(
        !Path::new(NETNS_DIR).join(&ns_name).exists(),
        "netns {ns_name} left"
    );
    assert_eq!(
        host_iptables(),
        host_rules,
        "host rules changed after teardown"
    );
    // Nothing waits on timeouts: the whole test stays well under a minute.
    assert!(
        t0.elapsed() < Duration::from_secs(60),
        "took {:?}",
        t0.elapsed()
    );
}
