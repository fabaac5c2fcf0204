//! Cluster mode's convergence and scale against a real etcd: a bench
//! helper, not a timed test (`cargo xtask bench --scenarios
//! cluster-docker,cluster-scale` runs it and tabulates the results).
//!
//! ```sh
//! cargo run --release -p xhost-tests --example cluster_bench -- scale --hosts 1000 --subnets 4
//! cargo run --release -p xhost-tests --example cluster_bench -- docker --creations 100
//! ```
//!
//! `scale`: one agent (VXLAN mode, so simulated hosts need no address on
//! the underlay) and N simulated hosts x S subnets written straight to
//! etcd. Measures start-to-all-routes time and agent RSS; claim-to-route
//! latency p50/p99 over `--claims` new subnets; and whether `--churn`
//! hosts/s (leaving and joining) for 5 s were applied without falling
//! behind.
//!
//! `docker`: a real dockerd on host-b with an agent following it, an agent
//! on host-a; each of `--creations` Docker networks is created on host-b
//! through the Engine API, and the time from that call returning to the
//! subnet in host-a's `ROUTES` (polled every millisecond) is recorded, then
//! the network is deleted and the route's departure timed from the delete
//! call's start (Docker tells its watchers before that call returns).
//!
//! `--json` prints the result as one JSON object (what the bench reads).

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use bollard::models::{Ipam, IpamConfig, NetworkCreateRequest};
use clap::{Parser, Subcommand};
use etcd_client::{Client, PutOptions, Txn, TxnOp};
use xhost_tests::{
    cluster::{ClusterBed, ClusterOpts, DockerConvergence, Etcd, Percentiles, ScaleResult},
    docker_engine::Engine,
    xhost::{Agent, RoutesMap, vm_rss_kib},
};

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    what: What,
    /// Print the result as JSON on stdout (progress goes to stderr).
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand)]
enum What {
    /// Many simulated hosts in etcd, one agent.
    Scale {
        /// Simulated hosts in the store.
        #[arg(long, default_value_t = 1000)]
        hosts: u32,
        /// Subnets per simulated host.
        #[arg(long, default_value_t = 4)]
        subnets: u32,
        /// New claims timed one by one (claim -> route).
        #[arg(long, default_value_t = 100)]
        claims: u32,
        /// Hosts leaving and joining per second, for 5 s.
        #[arg(long, default_value_t = 100)]
        churn: u32,
    },
    /// Docker network created on one host -> routed on another.
    Docker {
        /// Networks created (and deleted) one by one, at most 256.
        #[arg(long, default_value_t = 100)]
        creations: u32,
    },
}

const PREFIX: &str = "/xhost/v1";
/// `ROUTES` poll period.
const POLL: Duration = Duration::from_millis(1);

fn host_id(i: u32) -> String {
    format!("sim-{i}")
}

fn underlay(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x0a00_0000 + 1 + i)
}

/// Subnet `k` of the simulated ones: 10.64.0.0/24 upwards.
fn subnet(k: u32) -> (Ipv4Addr, u8) {
    (Ipv4Addr::from(0x0a40_0000 + (k << 8)), 24)
}

fn host_ops(i: u32, per: u32) -> Vec<TxnOp> {
    let mut ops = vec![TxnOp::put(
        format!("{PREFIX}/hosts/{}", host_id(i)),
        format!(
            "{{\"id\":\"{}\",\"underlay\":\"{}\",\"mode\":{{\"kind\":\"vxlan\",\"vni\":1,\"port\":8472}}}}",
            host_id(i),
            underlay(i)
        ),
        None::<PutOptions>,
    )];
    for j in 0..per {
        let (a, l) = subnet(i * per + j);
        ops.push(TxnOp::put(
            format!("{PREFIX}/subnets/{a}-{l}"),
            format!("{{\"host\":\"{}\"}}", host_id(i)),
            None::<PutOptions>,
        ));
    }
    ops
}

async fn write(c: &mut Client, ops: Vec<TxnOp>) {
    // etcd's default limit: 128 operations per transaction.
    let mut ops = ops;
    while !ops.is_empty() {
        let rest = ops.split_off(ops.len().min(128));
        c.txn(Txn::new().and_then(ops)).await.expect("etcd txn");
        ops = rest;
    }
}

/// Polls `routes` every [`POLL`] until `addr/len` is routed (`present`) or
/// not; how long that took after `t0`.
fn wait_route(routes: &RoutesMap, addr: Ipv4Addr, len: u8, present: bool, t0: Instant) -> Duration {
    while routes.contains(addr, len).expect("ROUTES lookup") != present {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{addr}/{len} not {} within 10 s",
            if present { "routed" } else { "gone" }
        );
        std::thread::sleep(POLL);
    }
    t0.elapsed()
}

fn main() {
    let args = Args::parse();
    assert!(xhost_tests::is_root(), "run as root");
    let json = match args.what {
        What::Scale {
            hosts,
            subnets,
            claims,
            churn,
        } => {
            let r = scale(hosts, subnets, claims, churn);
            serde_json::to_string(&r)
        }
        What::Docker { creations } => {
            assert!(
                (1..=256).contains(&creations),
                "--creations: 1..=256, not {creations}"
            );
            serde_json::to_string(&docker(creations))
        }
    };
    if args.json {
        println!("{}", json.expect("json"));
    }
}

/// A testbed of `hosts` hosts (those in `underlay_only` left to a real
/// dockerd) and a real etcd on its underlay.
fn bed(hosts: u32, underlay_only: Vec<u32>) -> (ClusterBed, Etcd) {
    let bed = ClusterBed::new(&ClusterOpts {
        hosts,
        underlay_only,
        ..ClusterOpts::default()
    })
    .expect("testbed");
    let etcd = Etcd::start(bed.underlay(), None).expect("etcd");
    (bed, etcd)
}

fn scale(hosts: u32, subnets: u32, claims: u32, churn: u32) -> ScaleResult {
    let (bed, etcd) = bed(1, Vec::new());
    // The underlay is reached from inside host-a: run on a thread that
    // entered it (and has left, with its end, before the namespaces go).
    let r = std::thread::scope(|s| {
        let (ep, bed) = (etcd.endpoint(), &bed);
        s.spawn(move || scale_in(bed, &ep, hosts, subnets, claims, churn))
            .join()
            .expect("bench thread")
    });
    drop(etcd);
    r
}

fn scale_in(
    bed: &ClusterBed,
    ep: &str,
    hosts: u32,
    per: u32,
    claims: u32,
    churn: u32,
) -> ScaleResult {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let ns = bed.host(0).ns().path();
    let file = std::fs::File::open(&ns).expect("netns");
    nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
    let mut c = rt
        .block_on(Client::connect([ep], None))
        .expect("etcd client");
    let total = hosts * per;
    let t = Instant::now();
    let mut ops = Vec::new();
    for i in 0..hosts {
        ops.extend(host_ops(i, per));
    }
    rt.block_on(write(&mut c, ops));
    eprintln!("wrote {hosts} hosts x {per} subnets in {:?}", t.elapsed());

    let h = bed.host(0);
    let t0 = Instant::now();
    let agent = Agent::start(
        h.ns(),
        h.role(),
        &[
            "--iface",
            h.underlay_iface(),
            "--bridge",
            h.bridge(),
            "--no-docker",
            "--tunnel",
            "vxlan",
            "--etcd-endpoints",
            ep,
        ],
    )
    .expect("agent");
    let ready = t0.elapsed();
    let routes = RoutesMap::open(&agent.dirs).expect("ROUTES");
    while routes.count().expect("count") < total as usize {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "routes never all programmed"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let all = t0.elapsed();
    let rss = vm_rss_kib(agent.pid()).expect("rss");
    eprintln!(
        "scale: {total} routes programmed {all:?} after start (ready at {ready:?}); agent RSS {} MiB",
        rss / 1024
    );

    let mut lat = Vec::new();
    for k in 0..claims {
        let (a, l) = subnet(200_000 + k);
        let key = format!("{PREFIX}/subnets/{a}-{l}");
        let t = Instant::now();
        rt.block_on(c.put(
            key.clone(),
            format!("{{\"host\":\"{}\"}}", host_id(0)),
            None,
        ))
        .expect("put");
        lat.push(wait_route(&routes, a, l, true, t));
        rt.block_on(c.delete(key, None)).expect("delete");
    }
    let claim = Percentiles::of(&lat);
    eprintln!(
        "convergence (etcd claim -> ROUTES): p50 {:.1} ms p99 {:.1} ms over {}",
        claim.p50_ms, claim.p99_ms, claim.samples
    );

    // Churn: every 1/rate s one host leaves (its keys deleted) and one joins.
    let t = Instant::now();
    let step = Duration::from_secs(1) / churn.max(1);
    let n = churn * 5;
    let mut expect: BTreeSet<(Ipv4Addr, u8)> = (0..total).map(subnet).collect();
    for i in 0..n {
        let gone = i % hosts;
        let mut ops: Vec<TxnOp> = vec![TxnOp::delete(
            format!("{PREFIX}/hosts/{}", host_id(gone)),
            None,
        )];
        for j in 0..per {
            let (a, l) = subnet(gone * per + j);
            if expect.remove(&(a, l)) {
                ops.push(TxnOp::delete(format!("{PREFIX}/subnets/{a}-{l}"), None));
            }
        }
        let id = hosts + i;
        ops.extend(host_ops(id, per));
        for j in 0..per {
            expect.insert(subnet(id * per + j));
        }
        rt.block_on(write(&mut c, ops));
        let next = step * (i + 1);
        if let Some(wait) = next.checked_sub(t.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    let sent = t.elapsed();
    while routes.prefixes().expect("routes") != expect {
        assert!(
            t.elapsed() < sent + Duration::from_secs(30),
            "churn never converged"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let behind = t.elapsed().saturating_sub(sent);
    eprintln!(
        "churn: {n} hosts left and {n} joined over {sent:?} ({churn} hosts/s); ROUTES matched {behind:?} after the last write"
    );
    drop(agent);
    drop(c);
    drop(rt);
    ScaleResult {
        hosts,
        subnets_per_host: per,
        all_routes_s: all.as_secs_f64(),
        ready_s: ready.as_secs_f64(),
        rss_bytes: rss * 1024,
        claim,
        churn_hosts_per_s: churn,
        churn_behind_ms: behind.as_secs_f64() * 1e3,
    }
}

fn docker(creations: u32) -> DockerConvergence {
    let (bed, etcd) = bed(2, vec![1]);
    let (ha, hb) = (bed.host(0), bed.host(1));
    let mut engine = Engine::prepare_in_netns(hb.name(), &hb.bip()).expect("prepare dockerd");
    engine.boot().expect("start dockerd");
    let ep = etcd.endpoint();
    let docker_host = engine.host();
    let b = Agent::start(
        hb.ns(),
        hb.role(),
        &[
            "--iface",
            hb.underlay_iface(),
            "--docker-host",
            &docker_host,
            "--etcd-endpoints",
            &ep,
        ],
    )
    .expect("agent on host-b");
    let a = Agent::start(
        ha.ns(),
        ha.role(),
        &[
            "--iface",
            ha.underlay_iface(),
            "--bridge",
            ha.bridge(),
            "--no-docker",
            "--etcd-endpoints",
            &ep,
        ],
    )
    .expect("agent on host-a");
    let routes = RoutesMap::open(&a.dirs).expect("ROUTES");
    // host-b's docker0 routed on host-a: both agents are in the cluster.
    wait_route(
        &routes,
        hb.subnet().addr(),
        hb.subnet().prefix_len(),
        true,
        Instant::now(),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let api = rt
        .block_on(
            bollard::Docker::connect_with_unix(
                &engine.socket().display().to_string(),
                10,
                bollard::API_DEFAULT_VERSION,
            )
            .expect("Docker client")
            .negotiate_version(),
        )
        .expect("Docker API version");
    let (mut created, mut removed) = (Vec::new(), Vec::new());
    for k in 0..creations {
        let net = Ipv4Addr::new(10, 31, k as u8, 0);
        let name = format!("xhb-{k}");
        let req = NetworkCreateRequest {
            name: name.clone(),
            driver: Some("bridge".into()),
            ipam: Some(Ipam {
                config: Some(vec![IpamConfig {
                    subnet: Some(format!("{net}/24")),
                    ..IpamConfig::default()
                }]),
                ..Ipam::default()
            }),
            ..NetworkCreateRequest::default()
        };
        rt.block_on(api.create_network(req))
            .expect("network create");
        created.push(wait_route(&routes, net, 24, true, Instant::now()));
        // Docker tells its watchers before the delete call returns: timed
        // from the call's start.
        let t = Instant::now();
        rt.block_on(api.remove_network(&name)).expect("network rm");
        removed.push(wait_route(&routes, net, 24, false, t));
        if (k + 1) % 20 == 0 {
            eprintln!("docker: {} networks created and removed", k + 1);
        }
    }
    let r = DockerConvergence {
        create: Percentiles::of(&created),
        remove: Percentiles::of(&removed),
        poll_ms: POLL.as_secs_f64() * 1e3,
    };
    eprintln!(
        "convergence (Docker network create on host-b -> ROUTES on host-a): p50 {:.1} ms p99 {:.1} ms max {:.1} ms over {}; removal p50 {:.1} ms p99 {:.1} ms",
        r.create.p50_ms,
        r.create.p99_ms,
        r.create.max_ms,
        r.create.samples,
        r.remove.p50_ms,
        r.remove.p99_ms
    );
    drop(rt);
    drop((a, b));
    drop(engine);
    drop(etcd);
    r
}
