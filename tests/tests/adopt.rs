//! A restarted agent adopts the pinned datapath: traffic between containers
//! on two hosts runs on while host A's agent is restarted with
//! `--keep-datapath` or SIGKILLed and started again (natively routed or
//! in VXLAN mode, whose `xhost_vxlan` device and the routes into it stay),
//! or while pinned maps of another capacity (as an older build would
//! leave) are migrated; a pinned map of another value layout, or a VXLAN
//! device of other parameters, is refused with the pins untouched.
//! Needs root; `--test-threads=1`.
//!
//! ```text
//!  ctr-a 192.168.110.11 --UDP 2000 pps (numbered), TCP (paced, SHA-256)--> ctr-b 192.168.220.11
//!      | veth                                            | veth
//!  host-a: docker0, ens33  <====== veth ======>  host-b: docker0, ens33
//!          xhost (restarted / killed + started)           xhost (runs on)
//! ```

use std::{
    path::Path,
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;
use xhost_tests::{
    NetNs, Process, Topology, TopologyOpts,
    probe::{RecvReport, SendReport, SeqRecvReport, SeqSendReport, probe_bin},
    xhost::{
        Agent, AgentDirs, counter, load_args, remove_instance, status_json, status_routes6, xhost,
        xhost_bin,
    },
};

const UDP_PORT: u16 = 5601;
const TCP_PORT: u16 = 5602;
/// The UDP flow: datagrams per second, and for how long.
const RATE: u32 = 2_000;
const FLOW_SECS: u32 = 6;
/// The TCP transfer, paced to last the flow's time.
const TCP_BYTES: u64 = 48 << 20;

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

fn args(host: &xhost_tests::Host, peer: &xhost_tests::Host, extra: &[&str]) -> Vec<String> {
    load_args(host, peer, extra)
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Removes the instances' pins even if the test fails half-way.
struct Cleanup(Vec<AgentDirs>);
impl Drop for Cleanup {
    fn drop(&mut self) {
        self.0.iter().for_each(remove_instance);
    }
}

/// The two flows from ctr-a to ctr-b, running.
struct Flows {
    udp_recv: Process,
    udp_send: Process,
    tcp_recv: Process,
    tcp_send: Process,
}

fn probe_args(args: &[&str]) -> Vec<String> {
    let bin = probe_bin().expect("xh-probe").display().to_string();
    std::iter::once(bin)
        .chain(args.iter().map(|s| (*s).to_owned()))
        .collect()
}

fn start_flows(topo: &Topology) -> Flows {
    let (from, to) = (topo.ctr_a().ns(), topo.ctr_b().ns());
    let count = (RATE * FLOW_SECS).to_string();
    let timeout = (FLOW_SECS + 20).to_string();
    let mut udp_recv = to
        .spawn(
            "udp-seq-recv",
            &probe_args(&[
                "udp-seq-recv",
                "--port",
                &UDP_PORT.to_string(),
                "--count",
                &count,
                "--timeout",
                &timeout,
            ]),
        )
        .expect("udp receiver");
    udp_recv
        .wait_for_line(|l| l.starts_with("listening"), Duration::from_secs(5))
        .expect("udp receiver listening");
    let mut tcp_recv = to
        .spawn(
            "tcp-recv",
            &probe_args(&[
                "tcp-recv",
                "--port",
                &TCP_PORT.to_string(),
                "--timeout",
                &timeout,
            ]),
        )
        .expect("tcp receiver");
    tcp_recv
        .wait_for_line(|l| l.starts_with("listening"), Duration::from_secs(5))
        .expect("tcp receiver listening");
    let dst = topo.ctr_b().ip();
    let udp_send = from
        .spawn(
            "udp-seq-send",
            &probe_args(&[
                "udp-seq-send",
                "--to",
                &format!("{dst}:{UDP_PORT}"),
                "--count",
                &count,
                "--rate",
                &RATE.to_string(),
            ]),
        )
        .expect("udp sender");
    let tcp_send = from
        .spawn(
            "tcp-send",
            &probe_args(&[
                "tcp-send",
                "--to",
                &format!("{dst}:{TCP_PORT}"),
                "--bytes",
                &TCP_BYTES.to_string(),
                "--rate",
                &(TCP_BYTES / u64::from(FLOW_SECS)).to_string(),
                "--timeout",
                &timeout,
            ]),
        )
        .expect("tcp sender");
    Flows {
        udp_recv,
        udp_send,
        tcp_recv,
        tcp_send,
    }
}

fn report<T: for<'de> serde::Deserialize<'de>>(p: &mut Process, what: &str) -> T {
    let line = p
        .wait_for_line(
            |l| l.starts_with('{'),
            Duration::from_secs(u64::from(FLOW_SECS) + 25),
        )
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{what}: {e}: {line}"))
}

struct FlowResult {
    udp: SeqRecvReport,
    tcp_intact: bool,
    tcp_bytes: u64,
}

impl FlowResult {
    /// No datagram lost across `what` and the TCP transfer whole. tcx and
    /// XDP links (BPF_LINK_UPDATE) and classic tc filters (changed in place:
    /// same parent, priority, protocol and handle) swap programs
    /// atomically: not one datagram may go missing.
    /// `rcvbuf_full`: datagrams the receiving socket had no room for,
    /// delivered by the path and so not counted as lost on it.
    fn assert_intact(&self, what: &str, rcvbuf_full: u64) {
        assert_eq!(
            self.udp.missing.saturating_sub(rcvbuf_full),
            0,
            "UDP lost across {what} ({rcvbuf_full} more for a full receive buffer)"
        );
        assert!(self.tcp_intact, "TCP transfer damaged across {what}");
        assert_eq!(self.tcp_bytes, TCP_BYTES);
    }
}

impl Flows {
    fn finish(mut self) -> FlowResult {
        let sent: SeqSendReport = report(&mut self.udp_send, "udp sender");
        let udp: SeqRecvReport = report(&mut self.udp_recv, "udp receiver");
        let tcp_sent: SendReport = report(&mut self.tcp_send, "tcp sender");
        let tcp_got: RecvReport = report(&mut self.tcp_recv, "tcp receiver");
        assert_eq!(sent.sent, u64::from(RATE * FLOW_SECS));
        FlowResult {
            udp,
            tcp_intact: tcp_sent.bytes == tcp_got.bytes && tcp_sent.checksum == tcp_got.checksum,
            tcp_bytes: tcp_got.bytes,
        }
    }
}

/// What runs at `dir` of `iface`, for each hook of `hooks`, in `ns`: (device,
/// direction and handle, program id, tag). tcx: the programs attached
/// (handle 0); classic tc: xhost's filters (`pref 30824`), as `tc filter
/// show` lists them.
fn hook_progs(
    ns: &NetNs,
    hooks: &[(&str, aya::programs::TcAttachType)],
) -> Vec<(String, u32, String)> {
    use aya::programs::TcAttachType;
    let hooks: Vec<(String, TcAttachType)> =
        hooks.iter().map(|(i, d)| ((*i).to_owned(), *d)).collect();
    ns.within("hook programs", move || {
        use aya::programs::SchedClassifier;
        let mut found = Vec::new();
        for (iface, dir) in &hooks {
            let side = match dir {
                TcAttachType::Egress => "egress",
                _ => "ingress",
            };
            if let Ok((_, progs)) = SchedClassifier::query_tcx(iface, *dir) {
                for p in progs {
                    found.push((
                        format!("{iface} {side} 0"),
                        p.id(),
                        format!("{:016x}", p.tag()),
                    ));
                }
            }
            for line in xhost_tests::xhost::tc_filters(iface, side)? {
                let words: Vec<&str> = line.split_whitespace().collect();
                let after = |key: &str| {
                    words
                        .iter()
                        .position(|w| *w == key)
                        .and_then(|i| words.get(i + 1))
                        .map(|w| (*w).to_owned())
                };
                if after("pref").as_deref() != Some("30824") {
                    continue;
                }
                if let (Some(handle), Some(id), Some(tag)) =
                    (after("handle"), after("id"), after("tag"))
                {
                    let id = id.parse().expect("program id");
                    found.push((format!("{iface} {side} {handle}"), id, tag));
                }
            }
        }
        Ok(found)
    })
    .expect("query the hooks' programs")
}

/// [`hook_progs`] at ingress of each of `ifaces`.
fn ingress_progs(ns: &NetNs, ifaces: &[&str]) -> Vec<(String, u32, String)> {
    let hooks: Vec<_> = ifaces
        .iter()
        .map(|i| (*i, aya::programs::TcAttachType::Ingress))
        .collect();
    hook_progs(ns, &hooks)
}

/// What happens to host A's agent halfway through the flows.
enum Restart<'a> {
    /// SIGTERM with `--keep-datapath`, then started again.
    Keep,
    /// SIGKILL, then started again.
    Kill,
    /// SIGTERM with `--keep-datapath`, then another build started.
    Upgrade(&'a Path),
}

/// How the hosts route: natively, or in VXLAN mode.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Native,
    Vxlan,
}

impl Mode {
    fn args(self) -> &'static [&'static str] {
        match self {
            Mode::Native => &[],
            Mode::Vxlan => &["--tunnel", "vxlan"],
        }
    }
}

const VXLAN_DEV: &str = "xhost_vxlan";

/// VXLAN mode's device on `host`: its ifindex, `None` if there is none.
fn vxlan_ifindex(host: &xhost_tests::Host) -> Option<u32> {
    let out = host
        .ns()
        .exec(&["ip", "-o", "link", "show", VXLAN_DEV])
        .expect("ip link");
    let text = String::from_utf8_lossy(&out.stdout);
    out.status
        .success()
        .then(|| text.split(':').next()?.trim().parse().ok())
        .flatten()
}

/// The kernel's routes of `host` through `dev` (`ip route show dev`).
fn kernel_routes_via(host: &xhost_tests::Host, dev: &str) -> String {
    host.ns().run(&["ip", "route", "show", "dev", dev])
}

/// The programs of every hook xhost has on `host` in `mode` (tcx or classic
/// tc): underlay and bridge ingress, the containers' veths, and in VXLAN
/// mode both sides of the vxlan device.
fn all_progs(host: &xhost_tests::Host, veths: &[&str], mode: Mode) -> Vec<(String, u32, String)> {
    use aya::programs::TcAttachType::{Egress, Ingress};
    let mut hooks: Vec<(&str, _)> = veths.iter().map(|v| (*v, Ingress)).collect();
    hooks.extend([(host.bridge(), Ingress), (host.underlay_iface(), Ingress)]);
    if mode == Mode::Vxlan {
        hooks.extend([(VXLAN_DEV, Ingress), (VXLAN_DEV, Egress)]);
    }
    hook_progs(host.ns(), &hooks)
}

/// Runs the flows while host A's agent is restarted as `restart` says,
/// and checks that nothing was lost, the programs were replaced in place
/// (the links stay, the programs behind them change) and the counters
/// carried over; in VXLAN mode also that the vxlan device and the kernel
/// routes into it stayed, its two programs replaced in place like the
/// others. Returns (adoption time as the new agent measured it, wall time
/// from its start to `ready`).
fn restart_under_traffic(restart: Restart<'_>) -> (u64, Duration) {
    restart_in_mode(restart, Mode::Native)
}

fn restart_in_mode(restart: Restart<'_>, mode: Mode) -> (u64, Duration) {
    let topo = topology();
    let (a, b) = (topo.host_a(), topo.host_b());
    let with_mode = |extra: &[&str]| {
        let mut v: Vec<&str> = mode.args().to_vec();
        v.extend(extra);
        v.into_iter().map(str::to_owned).collect::<Vec<String>>()
    };
    let keep = args(a, b, &strs(&with_mode(&["--keep-datapath"])));
    let first = Agent::start(a.ns(), a.role(), &strs(&keep)).expect("load A");
    let dirs = first.dirs.clone();
    let _cleanup = Cleanup(vec![dirs.clone()]);
    let agent_b =
        Agent::start(b.ns(), b.role(), &strs(&args(b, a, &strs(&with_mode(&[]))))).expect("load B");
    let ping = xhost_tests::ping(topo.ctr_a().ns(), topo.ctr_b().ip(), 2).expect("ping");
    assert!(ping.all_received(), "A -> B before: {ping:?}");
    // The flows start once both datapaths are whole: each agent has
    // attached its container's veth and written the endpoint. With classic
    // tc, attaching a veth first adds its clsact qdisc, and the kernel
    // (qdisc_graft -> dev_deactivate) drops what the device transmits for
    // a moment while it does; the veth of ctr-b carries the flow until B
    // delivers it with bpf_redirect_peer. That is the first load, not the
    // restart under test.
    for (host, d) in [(a, &dirs), (b, &agent_b.dirs)] {
        xhost_tests::xhost::wait_status(
            host.ns(),
            d,
            "the container's endpoint",
            Duration::from_secs(5),
            |s| s["endpoints"].as_array().map(Vec::len) == Some(1),
        )
        .unwrap_or_else(|e| panic!("{}: {e}", host.role()));
    }
    let before = status_json(a.ns(), &dirs);
    let egress_before = counter(&before, "fwd_egress");
    let ids_before = all_progs(a, &[topo.ctr_a().host_veth()], mode);
    let hooks_of = |v: &[(String, u32, String)]| v.iter().map(|p| p.0.clone()).collect::<Vec<_>>();
    let want_hooks = if mode == Mode::Vxlan { 5 } else { 3 };
    assert_eq!(
        ids_before.len(),
        want_hooks,
        "one program per hook: {ids_before:?}"
    );
    let (dev_before, routes_before) = match mode {
        Mode::Native => (None, String::new()),
        Mode::Vxlan => {
            let dev = vxlan_ifindex(a).expect("xhost_vxlan on A");
            let routes = kernel_routes_via(a, VXLAN_DEV);
            assert!(
                routes.contains(&b.subnet().to_string()),
                "A's kernel route into the tunnel: {routes}"
            );
            assert_eq!(before["agent"]["tunnel"]["ifindex"], dev, "{before}");
            (Some(dev), routes)
        }
    };

    let rcvbuf = || {
        topo.ctr_b()
            .ns()
            .within(
                "RcvbufErrors",
                || Ok(xhost_tests::flow::udp_rcvbuf_errors()),
            )
            .expect("RcvbufErrors")
    };
    let rcvbuf_before = rcvbuf();
    let flows = start_flows(&topo);
    std::thread::sleep(Duration::from_millis(1500));
    let bin = match &restart {
        Restart::Keep | Restart::Kill => xhost_bin().expect("xhost-user"),
        Restart::Upgrade(p) => (*p).to_owned(),
    };
    let stopped = match &restart {
        Restart::Kill => first.kill().expect("SIGKILL A"),
        Restart::Keep | Restart::Upgrade(_) => {
            let (status, left) = first.stop_leaving(Signal::SIGTERM).expect("stop A");
            assert!(status.success(), "{status:?}");
            assert!(!left.is_empty(), "--keep-datapath keeps the pins");
            dirs.clone()
        }
    };
    // The next agent starts at once, as a service manager would.
    let t0 = Instant::now();
    let mut second = Agent::spawn(
        &bin,
        a.ns(),
        a.role(),
        stopped,
        &strs(&args(a, b, &strs(&with_mode(&[])))),
    )
    .expect("start A");
    second.wait_ready().expect("A adopts and is ready");
    let wall = t0.elapsed();
    // The log (stderr) may trail `ready` (stdout) by a moment.
    let adopt_ms = || {
        second.output().lines().find_map(|l| {
            let (_, rest) = l.split_once("adopted the pinned datapath")?;
            let ms = rest.split("ready ").nth(1)?.split(" ms").next()?;
            ms.trim().parse::<u64>().ok()
        })
    };
    let deadline = Instant::now() + Duration::from_secs(2);
    let adopt_ms = loop {
        match adopt_ms() {
            Some(ms) => break ms,
            None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            None => panic!("no adoption line in the agent's log:\n{}", second.output()),
        }
    };
    let log = second.output();

    let result = flows.finish();
    // Datagrams the receiving socket had no room for (its thread did not
    // get the CPU in time; this machine's CPUs are shared) were delivered
    // by the path: counted apart, as in tests/tests/faults.rs.
    let rcvbuf_full = rcvbuf() - rcvbuf_before;
    eprintln!(
        "counters on A after: {}",
        status_json(a.ns(), &dirs)["counters"]
    );
    eprintln!(
        "adoption: {adopt_ms} ms in the agent, {} ms start -> ready; UDP {} of {} received, {} missing (first {:?}), {} of them for a full receive buffer; TCP {} bytes intact={}",
        wall.as_millis(),
        result.udp.received,
        RATE * FLOW_SECS,
        result.udp.missing,
        result.udp.first_missing,
        rcvbuf_full,
        result.tcp_bytes,
        result.tcp_intact
    );
    result.assert_intact("the restart", rcvbuf_full);

    // Counted before and after, by the same pinned STATS.
    let after = status_json(a.ns(), &dirs);
    let egress_after = counter(&after, "fwd_egress");
    assert!(
        egress_after >= egress_before + u64::from(RATE * FLOW_SECS),
        "STATS carried over: fwd_egress {egress_before} before, {egress_after} after {} datagrams",
        RATE * FLOW_SECS
    );
    if let Some(dev) = dev_before {
        // The same device (its routes would have gone with it), the same
        // kernel routes into it, and the status says it is the tunnel.
        assert_eq!(vxlan_ifindex(a), Some(dev), "xhost_vxlan kept");
        assert_eq!(
            kernel_routes_via(a, VXLAN_DEV),
            routes_before,
            "kernel routes into the tunnel kept"
        );
        assert_eq!(after["agent"]["tunnel"]["ifindex"], dev, "{after}");
        assert!(
            log.contains(&format!("adopting {VXLAN_DEV} (ifindex {dev})")),
            "{log}"
        );
    }
    // The same hooks (tcx, or filters at the same priority and handle)
    // run new programs.
    let ids_after = all_progs(a, &[topo.ctr_a().host_veth()], mode);
    assert_eq!(
        hooks_of(&ids_after),
        hooks_of(&ids_before),
        "one program per hook"
    );
    assert!(
        ids_after
            .iter()
            .all(|(_, id, _)| ids_before.iter().all(|(_, old, _)| old != id)),
        "the programs were replaced: {ids_before:?} -> {ids_after:?}"
    );
    // Same build, same instructions (tag); another build, others.
    let same_tags = ids_after
        .iter()
        .zip(&ids_before)
        .all(|(new, old)| new.2 == old.2);
    assert_eq!(
        same_tags,
        !matches!(restart, Restart::Upgrade(_)),
        "program tags {ids_before:?} -> {ids_after:?}"
    );
    assert!(
        log.contains("in place"),
        "programs replaced in place:\n{log}"
    );
    // Stopped without --keep-datapath, the adopted datapath goes.
    let (status, left) = second.stop_with(Signal::SIGTERM).expect("stop A");
    assert!(
        status.success() && left.is_empty(),
        "{status:?} left {left:?}"
    );
    if mode == Mode::Vxlan {
        assert_eq!(vxlan_ifindex(a), None, "xhost_vxlan removed at the end");
    }
    (adopt_ms, wall)
}

#[test]
fn restart_with_keep_datapath_loses_nothing() {
    restart_under_traffic(Restart::Keep);
}

#[test]
fn a_killed_agent_is_adopted_without_loss() {
    restart_under_traffic(Restart::Kill);
}

#[test]
fn vxlan_restart_with_keep_datapath_loses_nothing() {
    restart_in_mode(Restart::Keep, Mode::Vxlan);
}

#[test]
fn vxlan_a_killed_agent_is_adopted_without_loss() {
    restart_in_mode(Restart::Kill, Mode::Vxlan);
}

/// Another build of xhost-user takes over: the same source built with
/// another `XHOST_BUILD_SALT`, which the eBPF crate bakes into every
/// program, so its programs differ (other tags). `cargo xtask test` builds
/// it as `target/release/xhost-user-upgrade`; `XHOST_UPGRADE_BIN` names
/// another.
#[test]
fn another_build_takes_over_without_loss() {
    require_root();
    let bin = xhost_tests::probe::workspace_bin(
        "xhost-user-upgrade",
        "XHOST_UPGRADE_BIN",
        "XHOST_BUILD_SALT=upgrade-test cargo build --release -p xhost-user, copy target/release/xhost-user to xhost-user-upgrade, build again without the salt (cargo xtask test does this)",
    )
    .expect("the upgrade build");
    restart_under_traffic(Restart::Upgrade(&bin));
}

/// The files and directories under `dir`, recursively, with the ids of
/// the maps pinned there.
fn pins(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p.clone());
                out.push(format!("{}/", p.display()));
            } else {
                let id = aya::maps::MapInfo::from_pin(&p)
                    .map(|i| format!(" map {}", i.id()))
                    .unwrap_or_default();
                out.push(format!("{}{id}", p.display()));
            }
        }
    }
    out.sort();
    out
}

/// A pinned map whose shape is not this build's (as an older or newer
/// build with another value layout would leave) is refused in one line,
/// and nothing is touched: the same pins, the same maps, the same
/// programs, still forwarding.
#[test]
fn a_changed_map_layout_is_refused_with_pins_untouched() {
    refused_with_pins_untouched(
        |pin_dir| {
            // ENDPOINT_PORTS as a build with 8-byte values would have pinned it.
            let path = pin_dir.join("ENDPOINT_PORTS");
            std::fs::remove_file(&path).expect("unpin ENDPOINT_PORTS");
            bpftool_create(
                &path,
                "ENDPOINT_PORTS",
                &["type", "hash", "key", "4", "value", "8", "entries", "1024"],
            );
        },
        "pinned map ENDPOINT_PORTS does not match this build (value size 8, this build's 4)",
    );
}

/// A map of a larger capacity holding more entries than this build's
/// capacity is refused in one line, nothing touched.
#[test]
fn entries_that_do_not_fit_are_refused_with_pins_untouched() {
    refused_with_pins_untouched(
        |pin_dir| {
            // UNDERLAY_ADDRS as a build with room for 128 would have
            // pinned it, holding 65 addresses (this build's room: 64).
            let path = pin_dir.join("UNDERLAY_ADDRS");
            std::fs::remove_file(&path).expect("unpin UNDERLAY_ADDRS");
            bpftool_create(
                &path,
                "UNDERLAY_ADDRS",
                &["type", "hash", "key", "4", "value", "4", "entries", "128"],
            );
            let mut m: aya::maps::HashMap<_, [u8; 4], u32> =
                open_map(&path).try_into().expect("hash map");
            for i in 0..65u8 {
                m.insert([10, 99, 0, i], 1, 0).expect("insert");
            }
        },
        "pinned map UNDERLAY_ADDRS holds 65 entries, this build's capacity is 64: they do not fit",
    );
}

/// Loads A detached, checks that a load in VXLAN mode is refused on the
/// natively routing datapath (one line, no device made), lets `alter`
/// change its pins, and checks that the next load refuses with one line
/// holding `expected`, touching nothing.
fn refused_with_pins_untouched(alter: impl FnOnce(&Path), expected: &str) {
    let topo = topology();
    let (a, b) = (topo.host_a(), topo.host_b());
    let dirs = AgentDirs::unique("a");
    let _cleanup = Cleanup(vec![dirs.clone()]);
    let _agent_b = Agent::start(b.ns(), b.role(), &strs(&args(b, a, &[]))).expect("load B");
    let mut detach = vec!["load".to_owned()];
    detach.extend(args(a, b, &["--detach"]));
    let out = xhost(a.ns(), &dirs, &strs(&detach)).expect("load --detach");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A natively routing datapath is not adopted in VXLAN mode.
    let pinned = pins(&dirs.pin_dir);
    let mut vxlan = vec!["load".to_owned()];
    vxlan.extend(args(a, b, &["--tunnel", "vxlan"]));
    let out = xhost(a.ns(), &dirs, &strs(&vxlan)).expect("load");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "VXLAN mode on a native datapath");
    assert!(
        stderr.lines().filter(|l| l.starts_with("xhost-user:")).count() == 1
            && stderr.contains(
                "the pinned datapath routes natively, this load asks for VXLAN mode (--tunnel vxlan): nothing was touched"
            ),
        "{stderr}"
    );
    assert_eq!(pins(&dirs.pin_dir), pinned, "pins untouched");
    assert_eq!(vxlan_ifindex(a), None, "no vxlan device made");

    alter(&dirs.pin_dir);
    let pinned = pins(&dirs.pin_dir);
    let hooks = [a.bridge(), a.underlay_iface()];
    let ids = ingress_progs(a.ns(), &hooks);
    assert_eq!(ids.len(), hooks.len(), "{ids:?}");

    let mut again = vec!["load".to_owned()];
    again.extend(args(a, b, &[]));
    let out = xhost(a.ns(), &dirs, &strs(&again)).expect("load");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a mismatched layout must be refused");
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("xhost-user:"))
        .collect();
    assert_eq!(errors.len(), 1, "one line: {stderr}");
    assert!(errors[0].contains(expected), "{stderr}");
    assert!(errors[0].contains("nothing was touched"), "{stderr}");
    assert_eq!(pins(&dirs.pin_dir), pinned, "pins untouched");
    assert_eq!(ingress_progs(a.ns(), &hooks), ids, "programs untouched");
    let ping = xhost_tests::ping(topo.ctr_a().ns(), topo.ctr_b().ip(), 2).expect("ping");
    assert!(ping.all_received(), "still forwarding: {ping:?}");

    let out = xhost(a.ns(), &dirs, &["unload"]).expect("unload");
    assert!(
        out.status.success(),
        "unload: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dirs.leftovers().is_empty(), "left {:?}", dirs.leftovers());
}

/// Replaces the pinned map `name` under `dir` by one bpftool creates with
/// `spec` (as another build would have pinned it) and returns the
/// original, still open, to copy from.
fn repin(dir: &Path, name: &str, spec: &[&str]) -> aya::maps::Map {
    let path = dir.join(name);
    let data = aya::maps::MapData::from_pin(&path).expect("open the pinned map");
    std::fs::remove_file(&path).expect("unpin");
    bpftool_create(&path, name, spec);
    aya::maps::Map::from_map_data(data).expect("a map")
}

fn bpftool_create(path: &Path, name: &str, spec: &[&str]) {
    let made = std::process::Command::new("bpftool")
        .args(["map", "create"])
        .arg(path)
        .args(spec)
        .args(["name", name])
        .output()
        .expect("bpftool");
    assert!(
        made.status.success(),
        "bpftool map create {name}: {}",
        String::from_utf8_lossy(&made.stderr)
    );
}

fn open_map(path: &Path) -> aya::maps::Map {
    let data = aya::maps::MapData::from_pin(path).expect("open pinned map");
    aya::maps::Map::from_map_data(data).expect("a map")
}

/// The layout fingerprint of the maps pinned under `dir` (layout version
/// 1): what the build that pinned them records, computed here from the
/// definition (SHA-256 of the version, then each map's name and type, key
/// size, value size, capacity and flags: the maps of `PINNED_MAPS` in its
/// order, then others by name; 16 hex digits).
fn fingerprint_of_pins(dir: &Path) -> String {
    use sha2::{Digest as _, Sha256};
    let mut maps: Vec<(String, aya::maps::MapInfo)> = std::fs::read_dir(dir)
        .expect("pin dir")
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter_map(|e| {
            let info = aya::maps::MapInfo::from_pin(e.path()).ok()?;
            Some((e.file_name().to_string_lossy().into_owned(), info))
        })
        .collect();
    let rank = |name: &str| {
        xhost_common::PINNED_MAPS
            .iter()
            .position(|n| *n == name)
            .unwrap_or(usize::MAX)
    };
    maps.sort_by(|a, b| rank(&a.0).cmp(&rank(&b.0)).then(a.0.cmp(&b.0)));
    let mut h = Sha256::new();
    h.update(1u32.to_le_bytes());
    for (name, i) in &maps {
        h.update(name.as_bytes());
        let map_type = i.map_type().map_or(u32::MAX, |t| t as u32);
        for v in [
            map_type,
            i.key_size(),
            i.value_size(),
            i.max_entries(),
            i.map_flags(),
        ] {
            h.update(v.to_le_bytes());
        }
    }
    h.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn recorded_layouts(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir.join("layout"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// tx packets of every peer in a `status --json` answer, summed.
fn peer_tx(status: &serde_json::Value) -> u64 {
    status["peer_counters"]
        .as_array()
        .unwrap_or_else(|| panic!("peer_counters in {status}"))
        .iter()
        .map(|p| p["tx"]["packets"].as_u64().unwrap_or(0))
        .sum()
}

/// A build whose maps had other capacities pinned the datapath (ROUTES
/// and PEER_STATS smaller, and a map this build no longer has): the next
/// load migrates them under traffic, with nothing lost: the routes and
/// the per-CPU counters are copied (not reset), STATS is kept as pinned,
/// the gone map is unpinned, and the new fingerprint replaces the old.
#[test]
fn maps_of_another_capacity_are_migrated_without_loss() {
    let topo = topology();
    let (a, b) = (topo.host_a(), topo.host_b());
    let keep = args(a, b, &["--keep-datapath"]);
    let first = Agent::start(a.ns(), a.role(), &strs(&keep)).expect("load A");
    let dirs = first.dirs.clone();
    let _cleanup = Cleanup(vec![dirs.clone()]);
    let _agent_b = Agent::start(b.ns(), b.role(), &strs(&args(b, a, &[]))).expect("load B");
    let ping = xhost_tests::ping(topo.ctr_a().ns(), topo.ctr_b().ip(), 20).expect("ping");
    assert!(ping.all_received(), "A -> B before: {ping:?}");
    let (status, left) = first.stop_leaving(Signal::SIGTERM).expect("stop A");
    assert!(status.success() && !left.is_empty(), "{status:?}");
    let before = status_json(a.ns(), &dirs);
    let egress_before = counter(&before, "fwd_egress");
    let tx_before = peer_tx(&before);
    assert!(tx_before >= 20, "pings counted per peer: {before}");

    // ROUTES as a build with 1024 routes would have pinned it, holding
    // the routes; PEER_STATS with 64 slots, holding the counters.
    let old = repin(
        &dirs.pin_dir,
        "ROUTES",
        &[
            "type", "lpm_trie", "key", "8", "value", "8", "entries", "1024", "flags", "1",
        ],
    );
    let from: aya::maps::LpmTrie<_, [u8; 4], [u8; 8]> = old.try_into().expect("trie");
    let mut to: aya::maps::LpmTrie<_, [u8; 4], [u8; 8]> = open_map(&dirs.pin_dir.join("ROUTES"))
        .try_into()
        .expect("trie");
    let mut routes = 0;
    for e in from.iter() {
        let (k, v) = e.expect("route");
        to.insert(&k, v, 0).expect("copy route");
        routes += 1;
    }
    assert!(routes >= 1, "A has a route to B's subnet");
    let old = repin(
        &dirs.pin_dir,
        "PEER_STATS",
        &[
            "type",
            "percpu_array",
            "key",
            "4",
            "value",
            "32",
            "entries",
            "64",
        ],
    );
    let from: aya::maps::PerCpuArray<_, [u64; 4]> = old.try_into().expect("per-CPU array");
    let mut to: aya::maps::PerCpuArray<_, [u64; 4]> = open_map(&dirs.pin_dir.join("PEER_STATS"))
        .try_into()
        .expect("per-CPU array");
    // What the older build counted, plus a million tx packets it had
    // counted before (so that counters reset by the migration cannot pass
    // for carried ones).
    for i in 0..64 {
        let mut values: Vec<[u64; 4]> = from.get(&i, 0).expect("slot").iter().copied().collect();
        if values.iter().any(|v| v.iter().any(|&c| c != 0)) {
            values[0][0] += 1_000_000;
        }
        let values = aya::maps::PerCpuValues::try_from(values).expect("per-CPU values");
        to.set(i, values, 0).expect("copy slot");
    }
    bpftool_create(
        &dirs.pin_dir.join("OLD_MAP"),
        "OLD_MAP",
        &["type", "hash", "key", "4", "value", "4", "entries", "16"],
    );
    let old_fp = fingerprint_of_pins(&dirs.pin_dir);
    for fp in recorded_layouts(&dirs.pin_dir) {
        std::fs::remove_dir(dirs.pin_dir.join("layout").join(fp)).expect("old record");
    }
    std::fs::create_dir(dirs.pin_dir.join("layout").join(&old_fp)).expect("record");
    let migrated_from = peer_tx(&status_json(a.ns(), &dirs));
    assert!(
        migrated_from >= tx_before + 1_000_000,
        "PEER_STATS copied: {tx_before} -> {migrated_from}"
    );

    let flows = start_flows(&topo);
    std::thread::sleep(Duration::from_millis(1500));
    let t0 = Instant::now();
    let mut second = Agent::spawn(
        &xhost_bin().expect("xhost-user"),
        a.ns(),
        a.role(),
        dirs.clone(),
        &strs(&args(a, b, &[])),
    )
    .expect("start A");
    second.wait_ready().expect("A migrates and is ready");
    let wall = t0.elapsed();
    let result = flows.finish();
    let log = second.output();
    eprintln!(
        "migration: {} ms start -> ready; UDP {} of {} received, {} missing (first {:?}); TCP {} bytes intact={}",
        wall.as_millis(),
        result.udp.received,
        RATE * FLOW_SECS,
        result.udp.missing,
        result.udp.first_missing,
        result.tcp_bytes,
        result.tcp_intact
    );
    result.assert_intact("the migration", 0);

    for line in [
        format!("map ROUTES: capacity 1024 -> 131072, flags 0x1 -> 0x1: {routes} entries copied"),
        "map PEER_STATS: capacity 64 -> 16384".to_owned(),
        "map OLD_MAP is not in this build: unpinned".to_owned(),
    ] {
        assert!(log.contains(&line), "{line:?} in the log:\n{log}");
    }
    // held() read the routes from the migrated ROUTES.
    let kept_routes = log
        .lines()
        .find_map(|l| {
            let rest = l.split_once("attachment(s) carried on, ")?.1;
            rest.split(" route(s)").next()?.parse::<u64>().ok()
        })
        .unwrap_or_else(|| panic!("no adoption line:\n{log}"));
    assert_eq!(kept_routes, routes, "routes carried:\n{log}");
    let info = |name: &str| {
        aya::maps::MapInfo::from_pin(dirs.pin_dir.join(name))
            .unwrap_or_else(|e| panic!("{name} pinned: {e}"))
    };
    assert_eq!(info("ROUTES").max_entries(), 131_072);
    assert_eq!(info("PEER_STATS").max_entries(), 16_384);
    assert!(!dirs.pin_dir.join("OLD_MAP").exists(), "OLD_MAP unpinned");
    assert!(
        !dirs.pin_dir.join("migrating").exists(),
        "nothing staged left"
    );
    let records = recorded_layouts(&dirs.pin_dir);
    assert_eq!(records.len(), 1, "{records:?}");
    assert_ne!(records[0], old_fp);
    assert_eq!(
        records[0],
        fingerprint_of_pins(&dirs.pin_dir),
        "this build's layout recorded"
    );

    // Counters carried on, not reset: STATS as pinned, PEER_STATS copied.
    let after = status_json(a.ns(), &dirs);
    let egress_after = counter(&after, "fwd_egress");
    assert!(
        egress_after >= egress_before + u64::from(RATE * FLOW_SECS),
        "STATS carried over: fwd_egress {egress_before} before, {egress_after} after"
    );
    let tx_after = peer_tx(&after);
    assert!(
        tx_after >= migrated_from + u64::from(RATE),
        "PEER_STATS copied and counting: {migrated_from} in the old map, {tx_after} after"
    );
    let (status, left) = second.stop_with(Signal::SIGTERM).expect("stop A");
    assert!(
        status.success() && left.is_empty(),
        "{status:?} left {left:?}"
    );
}

/// Waits (2 s at most) until the agent's log holds `needle`.
fn log_has(agent: &Agent, needle: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(2);
    while !agent.output().contains(needle) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// Classic tc, whatever `XHOST_TEST_ATTACH` says: a filter of the pinned
/// datapath deleted by hand while no agent ran is not added back by the
/// in-place replacement (its request carries no `NLM_F_CREATE`, so the
/// kernel refuses it): the adopting agent says so, forgets the filter and
/// attaches the bridge afresh; the underlay's filter is replaced in place.
#[test]
fn a_classic_filter_deleted_by_hand_is_attached_afresh_not_replaced() {
    let topo = topology();
    let (a, b) = (topo.host_a(), topo.host_b());
    let tc = ["--attach", "tc"];
    let keep = args(a, b, &["--keep-datapath", tc[0], tc[1]]);
    let first = Agent::start(a.ns(), a.role(), &strs(&keep)).expect("load A");
    let dirs = first.dirs.clone();
    let _cleanup = Cleanup(vec![dirs.clone()]);
    let _agent_b = Agent::start(b.ns(), b.role(), &strs(&args(b, a, &[]))).expect("load B");
    let (status, _) = first.stop_leaving(Signal::SIGTERM).expect("stop A");
    assert!(status.success(), "{status:?}");
    let deleted = std::process::Command::new("nsenter")
        .arg(format!("--net={}", a.ns().path().display()))
        .args(["tc", "filter", "del", "dev", a.bridge(), "ingress"])
        .args(["pref", "30824", "handle", "0x2", "bpf"])
        .output()
        .expect("tc");
    assert!(
        deleted.status.success(),
        "tc filter del: {}",
        String::from_utf8_lossy(&deleted.stderr)
    );
    let before = ingress_progs(a.ns(), &[a.bridge(), a.underlay_iface()]);
    assert_eq!(
        before.len(),
        1,
        "only the underlay's filter left: {before:?}"
    );

    let bin = xhost_bin().expect("xhost-user");
    let mut second = Agent::spawn(
        &bin,
        a.ns(),
        a.role(),
        dirs.clone(),
        &strs(&args(a, b, &tc)),
    )
    .expect("start A");
    second.wait_ready().expect("A adopts and is ready");
    for needle in [
        &format!(
            "{}: replacing xhost's tc filter (bridge-ingress)",
            a.bridge()
        ),
        &format!("replaced xhost_nic_in on {} ", a.underlay_iface()),
        &format!("attached xhost_bridge_in to {} ", a.bridge()),
    ] {
        assert!(
            log_has(&second, needle),
            "{needle:?} in:\n{}",
            second.output()
        );
    }
    let after = ingress_progs(a.ns(), &[a.bridge(), a.underlay_iface()]);
    let hooks: Vec<&str> = after.iter().map(|p| p.0.as_str()).collect();
    assert_eq!(
        hooks,
        [
            format!("{} ingress 0x2", a.bridge()),
            format!("{} ingress 0x1", a.underlay_iface())
        ],
        "one filter per hook: {after:?}"
    );
    assert_ne!(after[1].1, before[0].1, "the underlay's program replaced");
    let ping = xhost_tests::ping(topo.ctr_a().ns(), topo.ctr_b().ip(), 2).expect("ping");
    assert!(ping.all_received(), "A -> B after: {ping:?}");
    let (status, left) = second.stop_with(Signal::SIGTERM).expect("stop A");
    assert!(
        status.success() && left.is_empty(),
        "{status:?} left {left:?}"
    );
}

/// What a migration interrupted after its maps were renamed into place
/// leaves (a crash before the programs were swapped in): the pins of this
/// build's layout under both fingerprints, and a map still staged. The
/// next load finishes it: it adopts, discards what was staged, keeps only
/// this build's fingerprint, and forwards.
#[test]
fn an_interrupted_migration_is_finished_by_the_next_load() {
    let topo = topology();
    let (a, b) = (topo.host_a(), topo.host_b());
    let dirs = AgentDirs::unique("a");
    let _cleanup = Cleanup(vec![dirs.clone()]);
    let _agent_b = Agent::start(b.ns(), b.role(), &strs(&args(b, a, &[]))).expect("load B");
    let mut detach = vec!["load".to_owned()];
    detach.extend(args(a, b, &["--detach"]));
    let load = |what: &str| {
        let out = xhost(a.ns(), &dirs, &strs(&detach)).expect(what);
        assert!(
            out.status.success(),
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    load("load --detach");
    let this = recorded_layouts(&dirs.pin_dir);
    assert_eq!(this.len(), 1, "{this:?}");
    std::fs::create_dir(dirs.pin_dir.join("layout").join("00112233deadbeef"))
        .expect("the old fingerprint");
    let staging = dirs.pin_dir.join("migrating");
    std::fs::create_dir(&staging).expect("staging dir");
    bpftool_create(
        &staging.join("ROUTES"),
        "ROUTES",
        &[
            "type", "lpm_trie", "key", "8", "value", "8", "entries", "1024", "flags", "1",
        ],
    );

    let log = load("load again");
    assert!(log.contains("adopted the pinned datapath"), "{log}");
    assert_eq!(
        recorded_layouts(&dirs.pin_dir),
        this,
        "only this build's fingerprint"
    );
    assert!(!staging.exists(), "what was staged is discarded");
    let ping = xhost_tests::ping(topo.ctr_a().ns(), topo.ctr_b().ip(), 2).expect("ping");
    assert!(ping.all_received(), "forwarding: {ping:?}");
    let out = xhost(a.ns(), &dirs, &["unload"]).expect("unload");
    assert!(
        out.status.success(),
        "unload: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dirs.leftovers().is_empty(), "left {:?}", dirs.leftovers());
}

/// A VXLAN-mode datapath is adopted only by a load that wants the same
/// tunnel: another VNI, UDP port or MTU, or native routing, is refused in
/// one line with the pins, the programs, the device and the kernel routes
/// into it untouched and still forwarding; `unload` removes the device.
#[test]
fn a_vxlan_datapath_of_other_settings_is_refused_untouched() {
    let topo = topology();
    let (a, b) = (topo.host_a(), topo.host_b());
    let dirs = AgentDirs::unique("a");
    let _cleanup = Cleanup(vec![dirs.clone()]);
    let vxlan = ["--tunnel", "vxlan"];
    let _agent_b = Agent::start(b.ns(), b.role(), &strs(&args(b, a, &vxlan))).expect("load B");
    let mut detach = vec!["load".to_owned()];
    detach.extend(args(a, b, &["--tunnel", "vxlan", "--detach"]));
    let out = xhost(a.ns(), &dirs, &strs(&detach)).expect("load --detach");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dev = vxlan_ifindex(a).expect("xhost_vxlan on A");
    let pinned = pins(&dirs.pin_dir);
    let ids = all_progs(a, &[], Mode::Vxlan);
    let routes = kernel_routes_via(a, VXLAN_DEV);
    assert!(routes.contains(&b.subnet().to_string()), "{routes}");
    let ul = a.underlay_iface();
    let refused = |extra: &[&str], want: &str| {
        let mut again = vec!["load".to_owned()];
        again.extend(args(a, b, extra));
        let out = xhost(a.ns(), &dirs, &strs(&again)).expect("load");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{extra:?} must be refused");
        let errors: Vec<&str> = stderr
            .lines()
            .filter(|l| l.starts_with("xhost-user:"))
            .collect();
        assert_eq!(errors.len(), 1, "one line: {stderr}");
        assert!(errors[0].contains(want), "{extra:?}: {stderr}");
        assert!(errors[0].contains("nothing was touched"), "{stderr}");
        assert_eq!(pins(&dirs.pin_dir), pinned, "{extra:?}: pins untouched");
        assert_eq!(all_progs(a, &[], Mode::Vxlan), ids, "programs untouched");
        assert_eq!(vxlan_ifindex(a), Some(dev), "device untouched");
        assert_eq!(kernel_routes_via(a, VXLAN_DEV), routes, "routes untouched");
    };
    refused(
        &["--tunnel", "vxlan", "--vni", "7"],
        "the pinned datapath's xhost_vxlan has VNI 1, this load wants 7",
    );
    refused(
        &["--tunnel", "vxlan", "--vxlan-port", "4789"],
        "xhost_vxlan has UDP port 8472, this load wants 4789",
    );
    refused(
        &[],
        "the pinned datapath runs in VXLAN mode, this load asks for native routing",
    );
    // The underlay's MTU changed while no agent ran: the device's no
    // longer fits it.
    a.ns().run(&["ip", "link", "set", ul, "mtu", "1400"]);
    refused(
        &["--tunnel", "vxlan"],
        &format!("xhost_vxlan has MTU 1450, this load wants 1350 ({ul}'s less 50)"),
    );
    a.ns().run(&["ip", "link", "set", ul, "mtu", "1500"]);
    let ping = xhost_tests::ping(topo.ctr_a().ns(), topo.ctr_b().ip(), 2).expect("ping");
    assert!(ping.all_received(), "still forwarding: {ping:?}");

    let out = xhost(a.ns(), &dirs, &["unload"]).expect("unload");
    assert!(
        out.status.success(),
        "unload: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dirs.leftovers().is_empty(), "left {:?}", dirs.leftovers());
    assert_eq!(vxlan_ifindex(a), None, "unload removes xhost_vxlan");
}

/// Pins of the builds before IPv6 underlay addresses: `ROUTES6` values of
/// 8 bytes (`Peer`, an IPv4 host) and no `PEER_HOSTS6`. The next load
/// converts `ROUTES6` (each host mapped into IPv6), creates `PEER_HOSTS6`,
/// records this build's layout, and serves the same IPv6 route.
#[test]
fn routes6_of_an_older_build_are_converted_on_load() {
    let topo = topology();
    let (a, b) = (topo.host_a(), topo.host_b());
    let dirs = AgentDirs::unique("a");
    let _cleanup = Cleanup(vec![dirs.clone()]);
    let peer = format!("{}={},fd00:b::/64", b.underlay_ip(), b.subnet());
    let load = [
        "load",
        "--detach",
        "--iface",
        a.underlay_iface(),
        "--bridge",
        a.bridge(),
        "--no-docker",
        "--peer",
        &peer,
    ];
    let out = xhost(a.ns(), &dirs, &load).expect("load --detach");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want = [format!("fd00:b::/64 via {}", b.underlay_ip())];
    assert_eq!(status_routes6(&status_json(a.ns(), &dirs)), want);

    // ROUTES6 as the older build pinned it, holding the same route.
    let old = repin(
        &dirs.pin_dir,
        "ROUTES6",
        &[
            "type", "lpm_trie", "key", "20", "value", "8", "entries", "16384", "flags", "1",
        ],
    );
    // Values as bytes: `Peer6` (16-byte host, 4-byte flags) to `Peer`
    // (4-byte host, 4-byte flags).
    let from: aya::maps::LpmTrie<_, [u8; 16], [u8; 20]> = old.try_into().expect("trie");
    let mut to: aya::maps::LpmTrie<_, [u8; 16], [u8; 8]> = open_map(&dirs.pin_dir.join("ROUTES6"))
        .try_into()
        .expect("trie");
    for e in from.iter() {
        let (k, v) = e.expect("route");
        let host: [u8; 16] = v[..16].try_into().expect("16 bytes");
        let v4 = xhost_common::mapped_v4(&host).expect("an IPv4 host");
        let mut old_value = [0u8; 8];
        old_value[..4].copy_from_slice(&v4);
        to.insert(&k, old_value, 0).expect("copy route");
    }
    std::fs::remove_file(dirs.pin_dir.join("PEER_HOSTS6")).expect("unpin PEER_HOSTS6");
    let old_fp = fingerprint_of_pins(&dirs.pin_dir);
    for fp in recorded_layouts(&dirs.pin_dir) {
        std::fs::remove_dir(dirs.pin_dir.join("layout").join(fp)).expect("old record");
    }
    std::fs::create_dir(dirs.pin_dir.join("layout").join(&old_fp)).expect("record");
    // status reads the older layout too.
    assert_eq!(status_routes6(&status_json(a.ns(), &dirs)), want);

    let out = xhost(a.ns(), &dirs, &load).expect("load --detach again");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    for line in [
        "map ROUTES6: 1 entries converted from layout version 1",
        "map PEER_HOSTS6 is new in this build: created empty",
    ] {
        assert!(log.contains(line), "{line:?} in the log:\n{log}");
    }
    let info = |name: &str| {
        aya::maps::MapInfo::from_pin(dirs.pin_dir.join(name))
            .unwrap_or_else(|e| panic!("{name} pinned: {e}"))
    };
    assert_eq!(info("ROUTES6").value_size(), 20, "Peer6");
    assert_eq!(info("PEER_HOSTS6").key_size(), 16);
    assert_eq!(status_routes6(&status_json(a.ns(), &dirs)), want);
    let records = recorded_layouts(&dirs.pin_dir);
    assert_eq!(
        records,
        [fingerprint_of_pins(&dirs.pin_dir)],
        "this build's layout recorded"
    );

    let out = xhost(a.ns(), &dirs, &["unload"]).expect("unload");
    assert!(
        out.status.success(),
        "unload: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dirs.leftovers().is_empty(), "left {:?}", dirs.leftovers());
}
