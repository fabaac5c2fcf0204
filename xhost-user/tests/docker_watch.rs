//! The Docker watcher against a real engine (dockerd in a network namespace,
//! started by the test crate's harness). The watcher must see the engine's network
//! namespace (ifindexes are per namespace), so it runs on a thread that `setns`es
//! there, with a current-thread runtime (a namespace belongs to a thread, not the
//! process).
//!
//! ```text
//!  test thread ── docker CLI ──> unix:///tmp/xhd-…/docker.sock
//!  watcher thread (setns) ─┐
//!  netns xh-{pid}-{n}-dkw: dockerd
//!     docker0 192.168.110.1/24 ── vethA ══ eth0 (c1)
//!     br-<id12> 10.77.0.1/24   ── vethB ══ eth0 10.77.0.10 (c2, restart=always)
//! ```

use std::{
    fs::File,
    net::Ipv4Addr,
    sync::{Arc, Mutex, PoisonError},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use nix::sched::{CloneFlags, setns};
use tokio::{
    runtime::{Builder, Runtime},
    sync::watch,
};
use xhost_tests::{NetNs, docker_engine::Engine, is_root};
use xhost_user::{
    docker::{self, DockerEndpoint, DockerView},
    net::{Ipv4Net, fmt_mac},
};

type Rx = watch::Receiver<Option<DockerView>>;
/// Every published value with the wall-clock time it was seen.
type Record = Arc<Mutex<Vec<(SystemTime, Option<DockerView>)>>>;

fn runtime() -> Runtime {
    Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// The watcher's thread and the recorder's stop signal.
struct Running {
    watcher: thread::JoinHandle<()>,
    stop_recorder: tokio::sync::oneshot::Sender<()>,
}

impl Running {
    /// Stops the recorder; with the test's receiver gone too, the watcher returns.
    /// Bounded, so a watcher that does not notice fails the test instead of hanging.
    #[track_caller]
    fn finish(self, rx: Rx) {
        drop(self.stop_recorder);
        drop(rx);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.watcher.is_finished() {
            assert!(
                Instant::now() < deadline,
                "watcher still running without receivers"
            );
            thread::sleep(Duration::from_millis(10));
        }
        self.watcher.join().expect("watcher thread");
    }
}

/// Starts the watcher on a thread inside `ns`, plus a recorder timestamping every
/// published view. The watcher returns once all receivers are dropped: the test's
/// and the recorder's, which stops when `stop_recorder` is dropped (also while
/// unwinding from a failed assertion).
fn spawn_watcher(ns: &NetNs, host: String) -> (Rx, Record, Running) {
    let (tx, rx) = watch::channel(None);
    let path = ns.path();
    let watcher = thread::Builder::new()
        .name("docker-watch".into())
        .spawn(move || {
            let f = File::open(&path).expect("open netns");
            setns(&f, CloneFlags::CLONE_NEWNET).expect("setns into the engine's netns");
            runtime().block_on(docker::watch(Some(host), tx));
        })
        .expect("spawn watcher");
    let record: Record = Arc::default();
    let (mut rec_rx, rec) = (rx.clone(), Arc::clone(&record));
    let (stop_recorder, mut stop) = tokio::sync::oneshot::channel::<()>();
    thread::spawn(move || {
        runtime().block_on(async move {
            loop {
                tokio::select! {
                    _ = &mut stop => break,
                    changed = rec_rx.changed() => if changed.is_err() { break },
                }
                let v = rec_rx.borrow_and_update().clone();
                rec.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push((SystemTime::now(), v));
            }
        })
    });
    (
        rx,
        record,
        Running {
            watcher,
            stop_recorder,
        },
    )
}

/// Waits until `pred` holds for the published value; returns it and the wait.
#[track_caller]
fn wait_for(
    rt: &Runtime,
    rx: &mut Rx,
    what: &str,
    timeout: Duration,
    mut pred: impl FnMut(&DockerView) -> bool,
) -> (DockerView, Duration) {
    let t = Instant::now();
    let res = rt.block_on(async {
        let fut = rx.wait_for(|v| v.as_ref().is_some_and(&mut pred));
        tokio::time::timeout(timeout, fut)
            .await
            .map(|r| r.map(|v| v.clone()))
    });
    match res {
        Ok(Ok(v)) => (v.expect("Some"), t.elapsed()),
        Ok(Err(_)) => panic!("watcher stopped while waiting for {what}"),
        Err(_) => panic!(
            "no view with {what} within {timeout:?}; last: {:#?}",
            *rx.borrow()
        ),
    }
}

#[track_caller]
fn wait_none(rt: &Runtime, rx: &mut Rx, timeout: Duration) -> Duration {
    let t = Instant::now();
    let res = rt.block_on(async {
        tokio::time::timeout(timeout, rx.wait_for(Option::is_none))
            .await
            .map(|r| r.map(drop))
    });
    match res {
        Ok(Ok(())) => t.elapsed(),
        Ok(Err(_)) => panic!("watcher stopped while waiting for None"),
        Err(_) => panic!("still Some after {timeout:?}: {:#?}", *rx.borrow()),
    }
}

fn endpoint_of<'a>(v: &'a DockerView, name: &str) -> Vec<&'a DockerEndpoint> {
    v.endpoints
        .values()
        .filter(|e| e.container_name == name)
        .collect()
}

/// When the engine logged `action` for `container`, from `docker events`.
fn event_time(engine: &Engine, container: &str, action: &str, since: SystemTime) -> SystemTime {
    let secs = |t: SystemTime| {
        t.duration_since(UNIX_EPOCH)
            .expect("after epoch")
            .as_secs()
            .to_string()
    };
    let until = SystemTime::now() + Duration::from_secs(1);
    let out = engine
        .docker_ok(&[
            "events",
            "--since",
            &secs(since),
            "--until",
            &secs(until),
            "--filter",
            &format!("container={container}"),
            "--filter",
            &format!("event={action}"),
            "--format",
            "{{.TimeNano}}",
        ])
        .expect("docker events");
    let nanos: u64 = out
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .expect("event time");
    UNIX_EPOCH + Duration::from_nanos(nanos)
}

/// First time the recorder saw a view satisfying `pred` (it may lag the test
/// thread's own wait by a moment).
fn seen_at(record: &Record, pred: impl Fn(&DockerView) -> bool) -> SystemTime {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let found = record
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .find(|(_, v)| v.as_ref().is_some_and(&pred))
            .map(|(t, _)| *t);
        match found {
            Some(t) => return t,
            None if Instant::now() < deadline => thread::sleep(Duration::from_millis(5)),
            None => panic!("the recorder never saw the view"),
        }
    }
}

/// The host-side veth of `container` as iproute2 sees it: (ifindex, master) in the
/// engine's namespace, found from the container's `eth0@ifN`.
fn veth_by_iproute(engine: &Engine, ns: &NetNs, container: &str, iface: &str) -> (u32, String) {
    let pid = engine.inspect(container, "{{.State.Pid}}").expect("pid");
    let out = std::process::Command::new("nsenter")
        .args([
            &format!("--net=/proc/{pid}/ns/net"),
            "ip",
            "-j",
            "link",
            "show",
            iface,
        ])
        .output()
        .expect("nsenter ip link");
    let inner: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j");
    let peer = inner[0]["link_index"].as_u64().expect("link_index");
    let inner_index = inner[0]["ifindex"].as_u64().expect("ifindex");
    let links: serde_json::Value =
        serde_json::from_str(&ns.run(&["ip", "-j", "link", "show"])).expect("ip -j");
    let outer = links
        .as_array()
        .expect("array")
        .iter()
        .find(|l| l["ifindex"].as_u64() == Some(peer))
        .unwrap_or_else(|| panic!("ifindex {peer} not in {}", ns.name()));
    assert_eq!(
        outer["link_index"].as_u64(),
        Some(inner_index),
        "veth peers: {outer}"
    );
    (
        u32::try_from(peer).expect("u32"),
        outer["master"].as_str().unwrap_or_default().to_owned(),
    )
}

fn privileged() -> bool {
    let ok = is_root() && std::path::Path::new("/usr/sbin/dockerd").exists();
    if !ok {
        eprintln!("skipped: needs root and dockerd (apt-get install docker.io busybox-static)");
    }
    ok
}

/// What the steps of [`watcher_follows_a_real_engine`] share: the engine, the
/// watcher's receiver and its recorder.
struct Steps<'a> {
    rt: &'a Runtime,
    rx: &'a mut Rx,
    record: &'a Record,
    engine: &'a mut Engine,
    ns: &'a NetNs,
    /// A moment before the watcher started (for `docker events --since`).
    t_begin: SystemTime,
}

/// One engine followed through a sequence of changes, in named steps that each
/// check one behaviour on the state the steps before it left (an engine takes
/// seconds to start).
#[test]
fn watcher_follows_a_real_engine() {
    if !privileged() {
        return;
    }
    let _ = env_logger::builder().is_test(true).try_init();
    let rt = runtime();
    let ns = NetNs::new("dkw").expect("netns");
    ns.ip(&["link", "set", "lo", "up"]).expect("lo up");
    let mut engine = Engine::start_in_netns(ns.name(), "192.168.110.1/24").expect("dockerd");
    eprintln!("engine ready in {:?}", engine.last_start_time());
    engine.import_busybox().expect("busybox image");
    let t_begin = SystemTime::now() - Duration::from_secs(2);

    let (mut rx, record, running) = spawn_watcher(&ns, engine.host());
    let mut w = Steps {
        rt: &rt,
        rx: &mut rx,
        record: &record,
        engine: &mut engine,
        ns: &ns,
        t_begin,
    };
    let bridge_id = w.first_view_holds_the_default_bridge_network_only();
    w.started_container_shows_within_a_second_and_leaves_on_rm(&bridge_id);
    let xnet = w.user_network_shows_with_its_bridge_and_containers();
    w.connect_and_disconnect_are_followed(&bridge_id);
    w.containers_without_a_bridge_endpoint_stay_out();
    w.engine_restart_publishes_none_then_the_full_view(&bridge_id, &xnet);
    w.network_removal_leaves_the_view(&xnet);

    // No receivers left: the watcher returns and its thread ends.
    running.finish(rx);
    drop(engine);
    drop(ns);
}

impl Steps<'_> {
    #[track_caller]
    fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl FnMut(&DockerView) -> bool,
    ) -> (DockerView, Duration) {
        wait_for(self.rt, self.rx, what, timeout, pred)
    }

    /// The engine's version, and only its bridge-driver network (the default
    /// `bridge` on docker0, its subnet and gateway), no endpoints. Returns the
    /// network's id.
    fn first_view_holds_the_default_bridge_network_only(&mut self) -> String {
        let (v, took) = self.wait_for("docker0", Duration::from_secs(10), |v| {
            v.networks.values().any(|n| n.bridge == "docker0")
        });
        eprintln!("first view after {took:?}");
        assert!(
            v.engine_version.starts_with("20.10"),
            "{}",
            v.engine_version
        );
        assert_eq!(v.api_version, "1.41");
        assert_eq!(
            v.networks.len(),
            1,
            "only bridge-driver networks: {:?}",
            v.networks
        );
        let bridge = v.networks.values().next().expect("one");
        assert_eq!(bridge.name, "bridge");
        assert_eq!(
            bridge.subnets,
            ["192.168.110.0/24".parse::<Ipv4Net>().expect("cidr")]
        );
        assert_eq!(bridge.gateways, [Ipv4Addr::new(192, 168, 110, 1)]);
        assert!(v.endpoints.is_empty());
        bridge.id.clone()
    }

    /// A started container appears well within 1 s of its start event, with the
    /// address, MAC and host veth Docker and iproute2 show; removed, it is gone
    /// within 1 s.
    fn started_container_shows_within_a_second_and_leaves_on_rm(&mut self, bridge_id: &str) {
        let c1 = self
            .engine
            .run_container("bridge", None, "c1")
            .expect("run c1");
        let (v, took) = self.wait_for("c1's endpoint", Duration::from_secs(1), |v| {
            !endpoint_of(v, "c1").is_empty()
        });
        let seen = seen_at(self.record, |v| !endpoint_of(v, "c1").is_empty());
        let started = event_time(self.engine, &c1, "start", self.t_begin);
        let latency = seen.duration_since(started).unwrap_or_default();
        eprintln!("c1: start event -> view {latency:?}; waited {took:?} after docker run returned");
        assert!(
            latency < Duration::from_secs(1),
            "start event -> view took {latency:?}"
        );
        let e = endpoint_of(&v, "c1")[0].clone();
        assert_eq!(e.container_id, c1);
        assert_eq!(e.network_id, bridge_id);
        let ip = self
            .engine
            .inspect(&c1, "{{.NetworkSettings.Networks.bridge.IPAddress}}")
            .expect("ip");
        assert_eq!(e.ip.to_string(), ip);
        let mac = self
            .engine
            .inspect(&c1, "{{.NetworkSettings.Networks.bridge.MacAddress}}")
            .expect("mac");
        assert_eq!(fmt_mac(&e.mac), mac);
        assert_eq!(
            veth_by_iproute(self.engine, self.ns, &c1, "eth0"),
            (e.host_ifindex, "docker0".into())
        );

        self.engine.docker_ok(&["rm", "-f", "c1"]).expect("rm c1");
        let (_, took) = self.wait_for("c1 gone", Duration::from_secs(1), |v| {
            endpoint_of(v, "c1").is_empty()
        });
        eprintln!("c1 gone {took:?} after docker rm -f returned");
    }

    /// A user network appears within 1 s with its bridge, subnet and gateway;
    /// a container on it too (c2, `--restart=always`, for the restart step).
    /// Returns the network's id.
    fn user_network_shows_with_its_bridge_and_containers(&mut self) -> String {
        let xnet = self
            .engine
            .docker_ok(&["network", "create", "--subnet", "10.77.0.0/24", "xnet"])
            .expect("network create");
        let (v, took) = self.wait_for("xnet", Duration::from_secs(1), |v| {
            v.networks.contains_key(&xnet)
        });
        eprintln!("xnet in view {took:?} after docker network create returned");
        let n = &v.networks[&xnet];
        assert_eq!(
            (n.name.as_str(), n.bridge.clone()),
            ("xnet", format!("br-{}", &xnet[..12]))
        );
        assert_eq!(
            n.subnets,
            ["10.77.0.0/24".parse::<Ipv4Net>().expect("cidr")]
        );
        assert_eq!(n.gateways, [Ipv4Addr::new(10, 77, 0, 1)]);
        let c2 = self
            .engine
            .docker_ok(&[
                "run",
                "-d",
                "--pull=never",
                "--init",
                "--restart=always",
                "--network",
                "xnet",
                "--ip",
                "10.77.0.10",
                "--name",
                "c2",
                xhost_tests::docker_engine::BUSYBOX_IMAGE,
                "sleep",
                "3600",
            ])
            .expect("run c2");
        let (v, _) = self.wait_for("c2 on xnet", Duration::from_secs(1), |v| {
            v.endpoints
                .get(&Ipv4Addr::new(10, 77, 0, 10))
                .is_some_and(|e| e.container_name == "c2")
        });
        let e2 = v.endpoints[&Ipv4Addr::new(10, 77, 0, 10)].clone();
        assert_eq!(e2.network_id, xnet);
        assert_eq!(
            veth_by_iproute(self.engine, self.ns, &c2, "eth0"),
            (e2.host_ifindex, format!("br-{}", &xnet[..12]))
        );
        xnet
    }

    /// A running container connected to a second network gets an endpoint on it
    /// (its eth1's host veth), and loses it when disconnected.
    fn connect_and_disconnect_are_followed(&mut self, bridge_id: &str) {
        self.engine
            .docker_ok(&["network", "connect", "bridge", "c2"])
            .expect("connect");
        let (v, took) = self.wait_for("c2 on bridge too", Duration::from_secs(1), |v| {
            endpoint_of(v, "c2").len() == 2
        });
        eprintln!("connect -> view {took:?}");
        let on_bridge = endpoint_of(&v, "c2")
            .into_iter()
            .find(|e| e.network_id == bridge_id)
            .expect("bridge ep");
        assert_eq!(
            veth_by_iproute(self.engine, self.ns, "c2", "eth1"),
            (on_bridge.host_ifindex, "docker0".into())
        );
        self.engine
            .docker_ok(&["network", "disconnect", "bridge", "c2"])
            .expect("disconnect");
        self.wait_for("c2 off bridge", Duration::from_secs(1), |v| {
            endpoint_of(v, "c2").len() == 1
        });
    }

    /// Containers without a bridge endpoint stay out; the host/none networks too.
    fn containers_without_a_bridge_endpoint_stay_out(&mut self) {
        self.engine
            .docker_ok(&[
                "run",
                "-d",
                "--pull=never",
                "--init",
                "--network",
                "none",
                "--name",
                "c3",
                xhost_tests::docker_engine::BUSYBOX_IMAGE,
                "sleep",
                "3600",
            ])
            .expect("run c3");
        thread::sleep(Duration::from_millis(300));
        let v = self.rx.borrow().clone().expect("Some");
        assert!(endpoint_of(&v, "c3").is_empty());
        assert_eq!(v.networks.keys().collect::<Vec<_>>().len(), 2);
    }

    /// Engine down: None. Back up: the full view again, c2 restarted by its
    /// policy; the default network recreated (same name and bridge, new id).
    fn engine_restart_publishes_none_then_the_full_view(&mut self, bridge_id: &str, xnet: &str) {
        let t = Instant::now();
        self.engine.stop().expect("stop");
        let stop_took = t.elapsed();
        let took = wait_none(self.rt, self.rx, Duration::from_secs(5));
        eprintln!("engine stopped in {stop_took:?}; None published {took:?} later");
        self.engine.start().expect("start again");
        let (v, took) = self.wait_for("full view after restart", Duration::from_secs(10), |v| {
            v.networks.contains_key(xnet) && !endpoint_of(v, "c2").is_empty()
        });
        eprintln!(
            "engine up again in {:?}; full view {took:?} after that",
            self.engine.last_start_time()
        );
        // The default network is recreated on every daemon start: same name and bridge,
        // new id.
        let default = v
            .networks
            .values()
            .find(|n| n.name == "bridge")
            .expect("bridge network");
        assert_eq!(default.bridge, "docker0");
        assert_ne!(
            default.id, bridge_id,
            "expected a new id for the default network"
        );
        let e2 = v.endpoints[&Ipv4Addr::new(10, 77, 0, 10)].clone();
        assert_eq!(
            veth_by_iproute(self.engine, self.ns, "c2", "eth0"),
            (e2.host_ifindex, format!("br-{}", &xnet[..12]))
        );
        assert_eq!(v.endpoints.len(), 1, "{:?}", v.endpoints);
    }

    /// Network removal takes it (and its containers) out of the view.
    fn network_removal_leaves_the_view(&mut self, xnet: &str) {
        self.engine
            .docker_ok(&["rm", "-f", "c2", "c3"])
            .expect("rm");
        self.engine
            .docker_ok(&["network", "rm", "xnet"])
            .expect("network rm");
        self.wait_for("xnet gone", Duration::from_secs(1), |v| {
            !v.networks.contains_key(xnet) && v.endpoints.is_empty()
        });
    }
}
