//! The agent as a service: Prometheus metrics scraped while real packets
//! cross two simulated hosts, `status --watch` rates, readiness on a real
//! systemd notify socket, journald-ready logs, and the unit file with the
//! capabilities it grants. Needs root; `--test-threads=1`.
//!
//! ```text
//!  ctr-a: eth0 192.168.110.11/24                 ctr-b: eth0 192.168.220.11/24
//!      | veth                                        | veth
//!  host-a: docker0 192.168.110.1/24              host-b: docker0 192.168.220.1/24
//!          ens33 172.16.91.131/24 <== veth ==> ens33 172.16.91.132/24
//!          lo 127.0.0.1:9464 /metrics             lo 127.0.0.1:9464 /metrics
//! ```

use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::unix::{fs::MetadataExt as _, net::UnixDatagram},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;
use xhost_tests::{
    Host, NetNs, Process, Topology, TopologyOpts, ping,
    xhost::{
        Agent, AgentDirs, StartOpts, attached_programs, load_args, remove_instance, xhost,
        xhost_bin,
    },
};

const METRICS: &str = "127.0.0.1:9464";
/// UDP payload of the test flows; on the wire 14 + 20 + 8 + 100 bytes.
const PAYLOAD: usize = 100;
const FRAME: u64 = 14 + 20 + 8 + PAYLOAD as u64;

fn topology() -> Topology {
    assert!(
        xhost_tests::is_root(),
        "these tests load eBPF programs and build namespaces: run as root (cargo xtask test)"
    );
    Topology::two_hosts(TopologyOpts::default()).expect("build two-host topology")
}

fn start(host: &Host, peer: &Host, extra: &[&str], opts: &StartOpts) -> Agent {
    let args = load_args(host, peer, extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Agent::start_opts(host.ns(), host.role(), &args, opts).expect("xhost-user load")
}

/// Programs attached to the host's underlay and bridge (tcx + XDP).
fn programs(host: &Host) -> String {
    attached_programs(host.ns(), &[host.underlay_iface(), host.bridge()])
        .expect("query attachments")
        .join("\n")
}

/// A UDP socket bound to `addr` inside `ns`.
fn udp_socket(ns: &NetNs, addr: SocketAddr) -> UdpSocket {
    ns.within("udp socket", move || {
        UdpSocket::bind(addr).map_err(|source| xhost_tests::Error::Io {
            what: format!("binding {addr}"),
            source,
        })
    })
    .expect("udp socket")
}

/// Counts datagrams on `rx` until none came for 500 ms.
fn receiver(rx: UdpSocket) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        rx.set_read_timeout(Some(Duration::from_millis(500)))
            .expect("read timeout");
        let mut buf = [0u8; 2048];
        let mut n = 0;
        while rx.recv(&mut buf).is_ok() {
            n += 1;
        }
        n
    })
}

/// Sends `count` datagrams to `to` at `pps`, each at its own deadline (so
/// the rate holds whatever one send costs); calls `at_half` half-way.
/// Returns how long it took.
fn paced_send(
    tx: &UdpSocket,
    to: SocketAddr,
    count: u64,
    pps: u64,
    mut at_half: impl FnMut(),
) -> Duration {
    let payload = [0x5au8; PAYLOAD];
    let t0 = Instant::now();
    for i in 0..count {
        let due = t0 + Duration::from_micros(i * 1_000_000 / pps);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        assert_eq!(tx.send_to(&payload, to).expect("send"), PAYLOAD);
        if i == count / 2 {
            at_half();
        }
    }
    t0.elapsed()
}

/// `METHOD PATH` to the metrics address on the host's loopback: the raw
/// HTTP/1.1 response.
fn http(ns: &NetNs, method: &'static str, path: &'static str) -> String {
    xhost_tests::xhost::http(ns, METRICS, method, path)
}

/// `GET /metrics` on the host's loopback: (content type, body).
fn scrape(ns: &NetNs) -> (String, String) {
    let raw = http(ns, "GET", "/metrics");
    let (head, body) = raw.split_once("\r\n\r\n").expect("HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "scrape: {head}");
    let ctype = head
        .lines()
        .find_map(|l| l.strip_prefix("content-type: "))
        .unwrap_or_default()
        .to_owned();
    (ctype, body.to_owned())
}

/// The value of the sample `series` (name with its labels, as exposed).
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sample `{series}` in:\n{text}"))
}

fn packets(verdict: &str, reason: &str) -> String {
    format!("xhost_datapath_packets_total{{verdict=\"{verdict}\",reason=\"{reason}\"}}")
}

fn bytes(verdict: &str, reason: &str) -> String {
    format!("xhost_datapath_bytes_total{{verdict=\"{verdict}\",reason=\"{reason}\"}}")
}

/// `xhost_peer_<what>_total` of peer `host` in `direction` (tx, rx).
fn peer_series(what: &str, host: Ipv4Addr, direction: &str) -> String {
    format!("xhost_peer_{what}_total{{peer=\"{host}\",direction=\"{direction}\"}}")
}

/// Host B routes A's container subnet to A, so that B itself (no container
/// of its) can send to container A: what A's datapath drops as spoofed.
fn route_b_to_a_containers(topo: &Topology) {
    let (a, b) = (topo.host_a(), topo.host_b());
    b.ns().run(&[
        "ip",
        "route",
        "replace",
        &a.subnet().to_string(),
        "via",
        &a.underlay_ip().to_string(),
    ]);
}

#[test]
fn metrics_count_the_packets_sent_between_hosts() {
    let topo = topology();
    let (a, b) = (topo.host_a(), topo.host_b());
    let (ca, cb) = (topo.ctr_a(), topo.ctr_b());
    let opts = StartOpts::default();
    let agent_a = start(a, b, &["--metrics-addr", METRICS], &opts);
    let agent_b = start(b, a, &["--metrics-addr", METRICS], &opts);

    let (ctype, before_a) = scrape(a.ns());
    assert!(
        ctype.starts_with("application/openmetrics-text"),
        "content type {ctype}"
    );
    let (_, before_b) = scrape(b.ns());

    // A UDP flow from container A to container B at 2000 pps; A is scraped
    // half-way through.
    const N: u64 = 3000;
    let to = SocketAddr::from((cb.ip(), 40_000));
    let got = receiver(udp_socket(cb.ns(), to));
    let tx = udp_socket(ca.ns(), SocketAddr::from((ca.ip(), 0)));
    let mut during = String::new();
    paced_send(&tx, to, N, 2000, || during = scrape(a.ns()).1);
    let received = got.join().expect("receiver");
    assert_eq!(received, N, "datagrams lost between the containers");
    let (_, after_a) = scrape(a.ns());
    let (_, after_b) = scrape(b.ns());

    let delta = |after: &str, before: &str, series: &str| {
        (sample(after, series) - sample(before, series)) as u64
    };
    assert_eq!(
        delta(&after_a, &before_a, &packets("fwd", "egress")),
        N,
        "host A forwarded each datagram once"
    );
    assert_eq!(
        delta(&after_a, &before_a, &bytes("fwd", "egress")),
        N * FRAME,
        "host A's bytes: {FRAME} per frame"
    );
    assert_eq!(
        delta(&after_b, &before_b, &packets("fwd", "ingress")),
        N,
        "host B delivered each datagram once"
    );
    assert_eq!(
        delta(&after_b, &before_b, &bytes("fwd", "ingress")),
        N * FRAME
    );
    // The same flow per peer host: A sent it to B, B received it from A,
    // and nothing went the other way.
    let (ip_a, ip_b) = (a.underlay_ip(), b.underlay_ip());
    for (after, before, host, direction, n) in [
        (&after_a, &before_a, ip_b, "tx", N),
        (&after_a, &before_a, ip_b, "rx", 0),
        (&after_b, &before_b, ip_a, "rx", N),
        (&after_b, &before_b, ip_a, "tx", 0),
    ] {
        assert_eq!(
            delta(after, before, &peer_series("packets", host, direction)),
            n,
            "peer {host} {direction} packets"
        );
        assert_eq!(
            delta(after, before, &peer_series("bytes", host, direction)),
            n * FRAME,
            "peer {host} {direction} bytes"
        );
    }
    let mid_peer = delta(&during, &before_a, &peer_series("packets", ip_b, "tx"));
    assert!(
        mid_peer > 0 && mid_peer < N,
        "the scrape during the flow saw {mid_peer} of {N} for peer {ip_b}"
    );
    let mid = delta(&during, &before_a, &packets("fwd", "egress"));
    eprintln!("metrics: {N} datagrams sent and received; the scrape half-way saw {mid}");
    assert!(
        mid > 0 && mid < N,
        "the scrape during the flow saw {mid} of {N}: it must read live counters"
    );

    // Drops by reason: host B itself sends to container A.
    route_b_to_a_containers(&topo);
    const K: u64 = 50;
    let tx_b = udp_socket(b.ns(), SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)));
    paced_send(&tx_b, SocketAddr::from((ca.ip(), 40_001)), K, 1000, || ());
    // The last datagram may still be on its way through the veth.
    std::thread::sleep(Duration::from_millis(200));
    let (_, dropped) = scrape(a.ns());
    assert_eq!(
        delta(&dropped, &after_a, &packets("drop", "spoofed")),
        K,
        "each datagram from host B dropped as spoofed on A"
    );
    assert_eq!(
        delta(&dropped, &after_a, &bytes("drop", "spoofed")),
        K * FRAME
    );

    // What was applied, and how full the tables are.
    for (series, want) in [
        ("xhost_routes", 1.0),
        ("xhost_peers", 1.0),
        ("xhost_local_subnets", 1.0),
        ("xhost_endpoints", 1.0),
        ("xhost_map_entries{map=\"ROUTES\"}", 1.0),
        (
            "xhost_map_capacity{map=\"ROUTES\"}",
            f64::from(xhost_common::MAX_ROUTES),
        ),
        (
            "xhost_map_capacity{map=\"ENDPOINTS\"}",
            f64::from(xhost_common::MAX_ENDPOINTS),
        ),
        ("xhost_attachments{hook=\"underlay-ingress\"}", 1.0),
        ("xhost_attachments{hook=\"bridge-ingress\"}", 1.0),
        (
            &format!(
                "xhost_build_info{{version=\"{}\"}}",
                env!("CARGO_PKG_VERSION")
            ),
            1.0,
        ),
    ] {
        assert_eq!(sample(&dropped, series), want, "{series}");
    }
    let updated = sample(&dropped, "xhost_state_updated_timestamp_seconds");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    assert!(
        updated > now - 120.0 && updated <= now,
        "last update {updated}, now {now}"
    );
    assert!(
        !dropped.contains("xhost_docker_connected"),
        "no Docker series with --no-docker"
    );
    assert!(dropped.ends_with("# EOF\n"), "OpenMetrics end marker");
    for (method, path, want) in [
        ("GET", "/", "HTTP/1.1 404"),
        ("POST", "/metrics", "HTTP/1.1 405"),
    ] {
        let r = http(a.ns(), method, path);
        assert!(r.starts_with(want), "{method} {path}: {r}");
    }

    for agent in [agent_a, agent_b] {
        let (status, left) = agent.stop_with(Signal::SIGTERM).expect("stop");
        assert!(
            status.success() && left.is_empty(),
            "{status:?} left {left:?}"
        );
    }
    // The listener went with the agent.
    let closed = a
        .ns()
        .within("connect", || Ok(TcpStream::connect(METRICS).is_err()))
        .expect("connect");
    assert!(closed, "the metrics address still answers after stop");
}

/// `load` must fail with one line naming `culprit` and leave nothing
/// attached or pinned.
fn assert_refused(host: &Host, args: &[String], culprit: &str) {
    let dirs = AgentDirs::unique("bad");
    let mut all = vec!["load"];
    all.extend(args.iter().map(String::as_str));
    let out = xhost(host.ns(), &dirs, &all).expect("run load");
    let left = dirs.leftovers();
    remove_instance(&dirs);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "load {args:?} must fail: {stderr}");
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.contains(" INFO ") && !l.contains(" WARN "))
        .collect();
    assert_eq!(lines.len(), 1, "load {args:?}: one error line: {stderr}");
    assert!(
        lines[0].contains(culprit),
        "load {args:?}: `{culprit}` not in {}",
        lines[0]
    );
    assert!(left.is_empty(), "load {args:?} left {left:?}");
    assert_eq!(programs(host), "", "load {args:?} left programs attached");
}

#[test]
fn a_metrics_address_that_cannot_be_bound_refuses_the_load() {
    let topo = topology();
    let (a, b) = (topo.host_a(), topo.host_b());
    // Something else holds the port on host A's loopback.
    let _held = a
        .ns()
        .within("hold the port", || {
            TcpListener::bind(METRICS).map_err(|source| xhost_tests::Error::Io {
                what: format!("binding {METRICS}"),
                source,
            })
        })
        .expect("hold port");
    let args = |extra: &[&str]| load_args(a, b, extra);
    assert_refused(
        a,
        &args(&["--metrics-addr", METRICS]),
        "metrics address 127.0.0.1:9464 cannot be bound: Address already in use",
    );
    assert_refused(
        a,
        &args(&["--metrics-addr", "192.0.2.1:9464"]),
        "metrics address 192.0.2.1:9464 cannot be bound: Cannot assign requested address",
    );
    assert_refused(
        a,
        &args(&["--metrics-addr", "localhost:9464"]),
        "--metrics-addr `localhost:9464`: expected IP:PORT",
    );
    assert_refused(
        a,
        &args(&["--metrics-addr", "127.0.0.1:9465", "--detach"]),
        "--metrics-addr 127.0.0.1:9465: metrics are served by the running agent, so not with --detach",
    );
}

/// The rows of one `status --watch` screen: counter -> pps.
fn watch_screen(p: &mut Process) -> std::collections::BTreeMap<String, f64> {
    p.wait_for_line(
        |l| l.starts_with("per second over "),
        Duration::from_secs(5),
    )
    .expect("a screen");
    p.wait_for_line(
        |l| l.trim_start().starts_with("counter"),
        Duration::from_secs(1),
    )
    .expect("header");
    let mut rows = std::collections::BTreeMap::new();
    for _ in xhost_common::stat::NAMES {
        let l = p
            .wait_for_line(|_| true, Duration::from_secs(1))
            .expect("row");
        let f: Vec<&str> = l.split_whitespace().collect();
        rows.insert(f[0].to_owned(), f[1].parse().expect("pps"));
    }
    rows
}

#[test]
fn status_watch_shows_rates_per_second() {
    let topo = topology();
    let (a, b) = (topo.host_a(), topo.host_b());
    let (ca, cb) = (topo.ctr_a(), topo.ctr_b());
    let opts = StartOpts::default();
    let agent_a = start(a, b, &[], &opts);
    let _agent_b = start(b, a, &[], &opts);
    route_b_to_a_containers(&topo);

    // Container A -> container B at 1000 pps, host B -> container A (dropped
    // as spoofed on A) at 200 pps, for 4.5 s; three 1 s screens inside.
    let to = SocketAddr::from((cb.ip(), 40_000));
    let got = receiver(udp_socket(cb.ns(), to));
    let tx = udp_socket(ca.ns(), SocketAddr::from((ca.ip(), 0)));
    let flow = std::thread::spawn(move || paced_send(&tx, to, 4500, 1000, || ()));
    let tx_b = udp_socket(b.ns(), SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)));
    let spoof_to = SocketAddr::from((ca.ip(), 40_001));
    let spoof = std::thread::spawn(move || paced_send(&tx_b, spoof_to, 900, 200, || ()));
    std::thread::sleep(Duration::from_millis(300));

    let mut cmd = vec![xhost_bin().expect("xhost-user").display().to_string()];
    cmd.extend(agent_a.dirs.args());
    cmd.extend(["status", "--watch", "--interval", "1", "--count", "3"].map(String::from));
    let mut watch =
        Process::spawn("status --watch", a.ns().nsenter_command(&cmd)).expect("status --watch");
    let screens: Vec<_> = (0..3).map(|_| watch_screen(&mut watch)).collect();
    let status = watch
        .wait_timeout(Duration::from_secs(5))
        .expect("wait")
        .expect("--count 3 ends it");
    assert!(status.success(), "status --watch: {}", watch.output());
    assert!(
        !watch.output().contains('\x1b'),
        "no terminal control codes into a pipe"
    );
    let (flow_t, spoof_t) = (
        flow.join().expect("flow"),
        spoof.join().expect("spoof flow"),
    );
    assert_eq!(got.join().expect("receiver"), 4500);
    let (pps, spoof_pps) = (4500.0 / flow_t.as_secs_f64(), 900.0 / spoof_t.as_secs_f64());
    eprintln!("status --watch: sent {pps:.1} pps forwarded, {spoof_pps:.1} pps spoofed");
    for (i, s) in screens.iter().enumerate() {
        eprintln!(
            "  screen {i}: fwd_egress {:.1} pps, drop_spoofed {:.1} pps",
            s["fwd_egress"], s["drop_spoofed"]
        );
        for (row, want) in [("fwd_egress", pps), ("drop_spoofed", spoof_pps)] {
            let seen = s[row];
            assert!(
                (seen - want).abs() <= want * 0.15,
                "screen {i}: {row} {seen:.1} pps, sent at {want:.1} pps: {s:?}"
            );
        }
        assert_eq!(s["drop_redirect"], 0.0, "screen {i}: {s:?}");
    }

    // On a terminal (a pty from script(1)) each screen replaces the last.
    let mut cmd = vec![xhost_bin().expect("xhost-user").display().to_string()];
    cmd.extend(agent_a.dirs.args());
    cmd.extend(["status", "--watch", "--interval", "0.2", "--count", "2"].map(String::from));
    let out = a
        .ns()
        .nsenter_command(&["script", "-qfec", &cmd.join(" "), "/dev/null"])
        .output()
        .expect("script(1)");
    let tty = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "status --watch on a pty: {tty}");
    assert_eq!(
        tty.matches("\x1b[H\x1b[2J").count(),
        2,
        "two screens, each clearing the last: {tty:?}"
    );
    assert_eq!(tty.matches("per second over ").count(), 2, "{tty:?}");
}

/// A file removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, text: &str) -> Self {
        let p = std::env::temp_dir().join(format!("xh-{}-{name}", std::process::id()));
        std::fs::write(&p, text).expect("write temp file");
        Self(p)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A notify socket as systemd binds it: `NOTIFY_SOCKET` for the agent.
struct NotifySocket {
    sock: UnixDatagram,
    path: PathBuf,
}

impl NotifySocket {
    fn bind() -> Self {
        let path = std::env::temp_dir().join(format!("xh-{}-notify.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let sock = UnixDatagram::bind(&path).expect("bind notify socket");
        sock.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        Self { sock, path }
    }

    fn next(&self) -> String {
        let mut buf = [0u8; 4096];
        let n = self.sock.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[test]
fn readiness_reaches_a_real_notify_socket_once_attached() {
    let topo = topology();
    let (a, b) = (topo.host_a(), topo.host_b());
    let notify = NotifySocket::bind();
    // Peers come from the flags; the file is there to be broken below.
    let config = TempFile::new("notify.toml", "");
    let config_arg = config.0.display().to_string();
    let opts = StartOpts {
        env: vec![("NOTIFY_SOCKET".into(), notify.path.display().to_string())],
        ..StartOpts::default()
    };
    // Another thread waits on the socket and looks at the kernel the moment
    // READY=1 arrives, while this one starts the agent.
    let (ready, live, agent) = std::thread::scope(|s| {
        let waiter = s.spawn(|| {
            let ready = notify.next();
            (ready, programs(a))
        });
        let agent = start(a, b, &["--config", &config_arg], &opts);
        let (ready, live) = waiter.join().expect("waiter");
        (ready, live, agent)
    });
    assert!(
        ready.starts_with("READY=1\n"),
        "first notification: {ready:?}"
    );
    assert!(
        ready.contains("STATUS=serving ens33"),
        "status line: {ready:?}"
    );
    for want in [
        "ens33 tcx-ingress xhost_nic_in",
        "docker0 tcx-ingress xhost_bridge_in",
    ] {
        assert!(live.contains(want), "READY=1 before {want}: {live}");
    }

    // systemctl reload: SIGHUP.
    agent_signal(&agent, Signal::SIGHUP);
    let reloading = notify.next();
    assert!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reloading:?}"
    );
    assert!(notify.next().starts_with("READY=1\n"), "ready again");
    // A refused reload ends the reload too: the unit must not stay
    // "reloading" because the new config was bad.
    std::fs::write(&config.0, "bogus = 1\n").expect("break the config");
    agent_signal(&agent, Signal::SIGHUP);
    assert!(notify.next().starts_with("RELOADING=1\n"), "reloading");
    assert!(
        notify.next().starts_with("READY=1\n"),
        "ready after refusal"
    );
    let t0 = Instant::now();
    while !agent.output().contains("config reload refused") {
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "no refusal logged: {}",
            agent.output()
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    let (status, left) = agent.stop_with(Signal::SIGTERM).expect("stop");
    assert_eq!(notify.next(), "STOPPING=1\n");
    assert!(status.success() && left.is_empty(), "{status:?} {left:?}");
    assert_eq!(programs(a), "", "programs left attached");
}

fn agent_signal(agent: &Agent, signal: Signal) {
    let pid = nix::unistd::Pid::from_raw(agent.pid() as i32);
    nix::sys::signal::kill(pid, signal).expect("signal the agent");
}

/// Runs `load --detach` (which logs and exits) in `host` with stderr into
/// a file, as under systemd when `journal` (JOURNAL_STREAM names the file);
/// returns whether it succeeded and what it wrote there. The instance is
/// removed again.
fn detached_load_log(
    host: &Host,
    peer: &Host,
    args_extra: &[&str],
    journal: bool,
    wrapper: &[&str],
) -> (bool, String) {
    let dirs = AgentDirs::unique("log");
    let log = std::env::temp_dir().join(format!("xh-{}-stderr.log", std::process::id()));
    let file = std::fs::File::create(&log).expect("log file");
    let meta = file.metadata().expect("stat log");
    let mut all: Vec<String> = wrapper.iter().map(|s| (*s).to_owned()).collect();
    all.push(xhost_bin().expect("xhost-user").display().to_string());
    all.extend(dirs.args());
    all.push("load".into());
    all.extend(load_args(host, peer, args_extra));
    let mut cmd = host.ns().nsenter_command(&all);
    cmd.stdout(std::process::Stdio::null()).stderr(file);
    if journal {
        cmd.env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()));
    } else {
        cmd.env_remove("JOURNAL_STREAM");
    }
    let status = cmd.status().expect("run load");
    let _ = xhost(host.ns(), &dirs, &["unload"]);
    remove_instance(&dirs);
    let text = std::fs::read_to_string(&log).expect("read log");
    let _ = std::fs::remove_file(&log);
    assert_eq!(programs(host), "", "unload left programs attached");
    (status.success(), text)
}

#[test]
fn logs_fit_journald() {
    let topo = topology();
    let (a, b) = (topo.host_a(), topo.host_b());
    // To the journal: `<priority>message`, no timestamp (journald adds it),
    // no colour.
    let (ok, j) = detached_load_log(a, b, &["--detach"], true, &[]);
    assert!(ok && j.lines().count() >= 1, "load --detach: {j}");
    for l in j.lines() {
        assert!(
            l.len() > 3 && l.starts_with('<') && l.as_bytes()[2] == b'>',
            "not a journald line: {l:?}"
        );
        assert!(!l.contains('\x1b'), "colour in {l:?}");
    }
    assert!(j.contains("<6>detached: the datapath stays loaded"), "{j}");
    // An error is one line at error priority.
    let (ok, e) = detached_load_log(a, b, &["--vni", "7"], true, &[]);
    assert!(!ok, "--vni without --tunnel vxlan must fail");
    assert_eq!(
        e.lines().collect::<Vec<_>>(),
        [
            "<3>xhost-user: --vni (vni in the config file) is a VXLAN setting: it needs --tunnel vxlan"
        ]
    );
    // An error that spans lines (the verifier's log: refused without
    // CAP_PERFMON) keeps its priority on every line.
    let (ok, v) = detached_load_log(
        a,
        b,
        &["--detach"],
        true,
        &[
            "setpriv",
            "--bounding-set=-all,+bpf,+net_admin",
            "--inh-caps=-all",
            "--",
        ],
    );
    // Info lines (the kernel's attach method) may come first; from the
    // error on, every line is at error priority.
    let error: Vec<_> = v.lines().skip_while(|l| l.starts_with("<6>")).collect();
    assert!(!ok && error.len() > 1, "a verifier log: {v}");
    assert!(error.iter().all(|l| l.starts_with("<3>")), "{v}");
    // Into a file that is not the journal: the usual lines, still no colour.
    let (ok, f) = detached_load_log(a, b, &["--detach"], false, &[]);
    assert!(ok && f.contains(" INFO ") && !f.contains('\x1b'), "{f:?}");
}

/// The capabilities `dist/xhost.service` bounds the agent to, as setpriv
/// spells them (`+bpf,+net_admin,...`).
fn unit_capabilities() -> String {
    let unit = std::fs::read_to_string(unit_path()).expect("read dist/xhost.service");
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("CapabilityBoundingSet= in the unit");
    line.split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect::<Vec<_>>()
        .join(",")
}

/// The capability bits of `+bpf,+net_admin,...` (linux/capability.h).
fn capability_mask(caps: &str) -> u64 {
    caps.split(',')
        .map(|c| match c.trim_start_matches('+') {
            "net_admin" => 12,
            "sys_admin" => 21,
            "sys_resource" => 24,
            "perfmon" => 38,
            "bpf" => 39,
            other => panic!("capability {other}: add its number"),
        })
        .fold(0, |m, bit| m | 1 << bit)
}

fn unit_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/xhost.service")
}

#[test]
fn the_units_capabilities_are_enough_and_needed() {
    let topo = topology();
    let (a, b) = (topo.host_a(), topo.host_b());
    let (ca, cb) = (topo.ctr_a(), topo.ctr_b());
    let caps = unit_capabilities();
    // Root's uid (pins and the Docker socket are root's) with only the
    // unit's capabilities, as systemd runs it.
    let bounding = format!("--bounding-set=-all,{caps}");
    let opts = StartOpts {
        wrapper: vec!["setpriv", &bounding, "--inh-caps=-all", "--"],
        ..StartOpts::default()
    };
    let agent_a = start(a, b, &[], &opts);
    let agent_b = start(b, a, &[], &opts);
    let eff = std::fs::read_to_string(format!("/proc/{}/status", agent_a.pid()))
        .expect("agent status")
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .expect("CapEff");
    assert_eq!(
        eff,
        capability_mask(&caps),
        "the agent's effective capabilities (CapEff {eff:x})"
    );
    assert!(
        ping(ca.ns(), cb.ip(), 3).expect("ping").all_received(),
        "A->B with the unit's capabilities"
    );
    for agent in [agent_a, agent_b] {
        let (status, left) = agent.stop_with(Signal::SIGTERM).expect("stop");
        assert!(
            status.success() && left.is_empty(),
            "{status:?} left {left:?}"
        );
    }
    assert_eq!(programs(a), "", "programs left attached");

    // Each one is needed: without it the load is refused, nothing left.
    for cap in caps.split(',') {
        let fewer = caps
            .split(',')
            .filter(|c| *c != cap)
            .collect::<Vec<_>>()
            .join(",");
        let dirs = AgentDirs::unique("caps");
        let mut all: Vec<String> = [
            "setpriv".to_owned(),
            format!("--bounding-set=-all,{fewer}"),
            "--inh-caps=-all".into(),
            "--".into(),
            xhost_bin().expect("xhost-user").display().to_string(),
        ]
        .into();
        all.extend(dirs.args());
        all.push("load".into());
        all.extend(load_args(a, b, &["--detach"]));
        let out = a.ns().nsenter_command(&all).output().expect("run load");
        let left = dirs.leftovers();
        let _ = xhost(a.ns(), &dirs, &["unload"]);
        remove_instance(&dirs);
        assert!(
            !out.status.success(),
            "load without {cap} succeeded: the unit grants more than it needs"
        );
        // Refused by the kernel for want of the capability (EPERM, or the
        // verifier's EACCES without CAP_PERFMON), not for something else.
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("Operation not permitted") || stderr.contains("Permission denied"),
            "load without {cap}: {stderr}"
        );
        assert!(left.is_empty(), "load without {cap} left {left:?}");
        assert_eq!(programs(a), "", "load without {cap} left programs");
    }
}

#[test]
fn the_unit_file_passes_systemd_analyze_verify() {
    let unit = std::fs::read_to_string(unit_path()).expect("read dist/xhost.service");
    for want in [
        "Type=notify\n",
        "ExecReload=/bin/kill -HUP $MAINPID\n",
        "Restart=on-failure\n",
    ] {
        assert!(unit.contains(want), "unit lacks {want:?}");
    }
    // verify checks that ExecStart's binary exists: point it at the one
    // built here instead of the installed path; nothing else changes.
    let bin = xhost_bin().expect("xhost-user");
    assert!(unit.contains("ExecStart=/usr/local/bin/xhost-user "));
    let dir = std::env::temp_dir().join(format!("xh-{}-unit", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("xhost.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/xhost-user", &bin.display().to_string()),
    )
    .expect("write unit");
    let out = std::process::Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output();
    let _ = std::fs::remove_dir_all(&dir);
    let out = out.expect("systemd-analyze (apt-get install systemd; scripts/setup.sh does)");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {said}"
    );
}

/// Scrapes host A until `pred` holds on the body (10 s at most).
fn scrape_until(ns: &NetNs, what: &str, mut pred: impl FnMut(&str) -> bool) -> String {
    let t0 = Instant::now();
    loop {
        let (_, body) = scrape(ns);
        if pred(&body) {
            return body;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{what}: not within 10 s; last scrape:\n{body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The Docker connection state and last sync time, with a real dockerd in
/// host A's namespace that is stopped under the agent.
#[test]
fn metrics_follow_the_docker_connection() {
    assert!(
        Path::new("/usr/sbin/dockerd").exists(),
        "dockerd missing: apt-get install docker.io (scripts/setup.sh)"
    );
    let topo = Topology::two_hosts(TopologyOpts {
        underlay_only: true,
        ..TopologyOpts::default()
    })
    .expect("build the underlay");
    let (a, b) = (topo.host_a(), topo.host_b());
    // Dropped after the agent (declared first, dropped last).
    let mut engine = xhost_tests::docker_engine::Engine::start_in_netns(a.name(), &a.bip())
        .expect("start dockerd");
    let peer = format!("{}={}", b.underlay_ip(), b.subnet());
    let docker = engine.host();
    let agent = Agent::start(
        a.ns(),
        a.role(),
        &[
            "--iface",
            a.underlay_iface(),
            "--docker-host",
            &docker,
            "--peer",
            &peer,
            "--metrics-addr",
            METRICS,
        ],
    )
    .expect("xhost-user load");

    let up = scrape_until(a.ns(), "Docker connected", |m| {
        m.contains("\nxhost_docker_connected 1\n")
    });
    assert_eq!(
        sample(&up, "xhost_docker_networks"),
        1.0,
        "docker0's network"
    );
    assert_eq!(
        sample(&up, "xhost_local_subnets"),
        1.0,
        "docker0's subnet from Docker"
    );
    let synced = sample(&up, "xhost_docker_last_sync_timestamp_seconds");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    assert!(
        synced > now - 60.0 && synced <= now,
        "last sync {synced}, now {now}"
    );

    engine.stop().expect("stop dockerd");
    let down = scrape_until(a.ns(), "Docker unreachable", |m| {
        m.contains("\nxhost_docker_connected 0\n")
    });
    assert_eq!(
        sample(&down, "xhost_local_subnets"),
        1.0,
        "the datapath keeps what Docker said last"
    );
    let (status, left) = agent.stop_with(Signal::SIGTERM).expect("stop");
    assert!(
        status.success() && left.is_empty(),
        "{status:?} left {left:?}"
    );
}

/// The `load` flags of the unit's `ExecStart`, but its `--config`.
fn unit_load_flags() -> Vec<String> {
    let unit = std::fs::read_to_string(unit_path()).expect("read dist/xhost.service");
    assert!(
        !unit.lines().any(|l| l.starts_with("ExecStartPre=")),
        "the unit needs no clean-up before start: the agent adopts what is pinned"
    );
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart= in the unit");
    let words: Vec<&str> = line.split_whitespace().collect();
    let load = words.iter().position(|w| *w == "load").expect("load");
    let mut flags = Vec::new();
    let mut rest = words[load + 1..].iter();
    while let Some(w) = rest.next() {
        if *w == "--config" {
            rest.next();
        } else {
            flags.push((*w).to_owned());
        }
    }
    flags
}

/// `Restart=on-failure` after a crash: the agent started again on the same
/// pin and run dirs with the unit's flags adopts what the killed one left
/// (which forwarded meanwhile), and its kernel route; `systemctl stop`
/// (SIGTERM) leaves the datapath forwarding (the unit's
/// `--keep-datapath`); `unload` removes everything.
#[test]
fn the_unit_starts_again_after_the_agent_was_killed() {
    let topo = topology();
    let (a, b) = (topo.host_a(), topo.host_b());
    let (ca, cb) = (topo.ctr_a(), topo.ctr_b());
    let opts = StartOpts::default();
    let flags = unit_load_flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    assert!(flags.contains(&"--keep-datapath"), "{flags:?}");
    let mut killed = start(a, b, &flags, &opts);
    let agent_b = start(b, a, &[], &opts);
    assert!(ping(ca.ns(), cb.ip(), 2).expect("ping").all_received());
    agent_signal(&killed, Signal::SIGKILL);
    let t0 = Instant::now();
    while killed.running() {
        assert!(t0.elapsed() < Duration::from_secs(5), "SIGKILL ignored");
        std::thread::sleep(Duration::from_millis(20));
    }
    let dirs = killed.dirs.clone();
    let _cleanup = Cleanup(dirs.clone());
    assert!(
        dirs.pin_dir.join("links").exists(),
        "a killed agent leaves its links pinned"
    );
    assert!(
        ping(ca.ns(), cb.ip(), 2).expect("ping").all_received(),
        "the pinned datapath forwards without its agent"
    );
    let route = |ns: &NetNs| ns.run(&["ip", "route", "show", &b.subnet().to_string()]);
    let kernel_route = route(a.ns());
    assert!(!kernel_route.is_empty(), "the killed agent's kernel route");

    let args = load_args(a, b, &flags);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut restarted =
        Agent::spawn_opts(a.ns(), a.role(), dirs.clone(), &args, &opts).expect("start again");
    restarted.wait_ready().expect("ready again");
    // The line is logged (stderr) before `ready` (stdout), but the two are
    // read by threads of their own: wait for it, as adopt.rs's `log_has`.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !restarted.output().contains("adopted the pinned datapath") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        restarted.output().contains("adopted the pinned datapath"),
        "{}",
        restarted.output()
    );
    assert!(
        ping(ca.ns(), cb.ip(), 2).expect("ping").all_received(),
        "A->B after the restart"
    );
    assert_eq!(route(a.ns()), kernel_route, "the kernel route stays");
    let (status, left) = restarted.stop_leaving(Signal::SIGTERM).expect("stop");
    assert!(status.success(), "{status:?}");
    assert!(!left.is_empty(), "--keep-datapath keeps the datapath");
    assert!(
        ping(ca.ns(), cb.ip(), 2).expect("ping").all_received(),
        "forwarding after a stop with --keep-datapath"
    );
    let out = xhost(a.ns(), &dirs, &["unload"]).expect("unload");
    assert!(
        out.status.success(),
        "unload: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dirs.leftovers().is_empty(), "left {:?}", dirs.leftovers());
    assert_eq!(programs(a), "", "programs still attached");
    assert_eq!(route(a.ns()), "", "kernel route left");
    let (status, left) = agent_b.stop_with(Signal::SIGTERM).expect("stop");
    assert!(
        status.success() && left.is_empty(),
        "{status:?} left {left:?}"
    );
    drop(killed);
}

/// Removes an instance's pins even if the test fails half-way.
struct Cleanup(AgentDirs);
impl Drop for Cleanup {
    fn drop(&mut self) {
        remove_instance(&self.0);
    }
}
