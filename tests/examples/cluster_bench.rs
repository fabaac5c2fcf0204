//! Cluster mode's convergence and scale against a real etcd: a bench
//! helper, not a timed test. One agent (VXLAN mode, so simulated hosts need
//! no address on the underlay) and N simulated hosts x S subnets written
//! straight to etcd:
//!
//! ```sh
//! cargo run --release -p xhost-tests --example cluster_bench -- --hosts 1000 --subnets 4
//! ```
//!
//! Prints: start-to-all-routes time and agent RSS; claim-to-route latency
//! p50/p99 over `--claims` new subnets; and whether `--churn` hosts/s
//! (leaving and joining) for 5 s were applied without falling behind.

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use clap::Parser;
use etcd_client::{Client, PutOptions, Txn, TxnOp};
use xhost_tests::{
    cluster::{ClusterBed, ClusterOpts, Etcd},
    xhost::{Agent, RoutesMap, vm_rss_kib},
};

#[derive(Parser)]
struct Args {
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
}

const PREFIX: &str = "/xhost/v1";

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

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let args = Args::parse();
    assert!(xhost_tests::is_root(), "run as root");
    let bed = ClusterBed::new(&ClusterOpts {
        hosts: 1,
        ..ClusterOpts::default()
    })
    .expect("testbed");
    let etcd = Etcd::start(bed.underlay(), None).expect("etcd");
    // The underlay is reached from inside host-a: run on a thread that
    // entered it (and has left, with its end, before the namespaces go).
    std::thread::scope(|s| {
        let (ep, args, bed) = (etcd.endpoint(), &args, &bed);
        s.spawn(move || run(args, bed, &ep))
            .join()
            .expect("bench thread");
    });
}

fn run(args: &Args, bed: &ClusterBed, ep: &str) {
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
    let total = args.hosts * args.subnets;
    let t = Instant::now();
    let mut ops = Vec::new();
    for i in 0..args.hosts {
        ops.extend(host_ops(i, args.subnets));
    }
    rt.block_on(write(&mut c, ops));
    println!(
        "wrote {} hosts x {} subnets in {:?}",
        args.hosts,
        args.subnets,
        t.elapsed()
    );

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
    loop {
        if routes.count().expect("count") >= total as usize {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "routes never all programmed"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let all = t0.elapsed();
    let rss = vm_rss_kib(agent.pid()).expect("rss");
    println!(
        "scale: {total} routes programmed {all:?} after start (ready at {ready:?}); agent RSS {} MiB",
        rss / 1024
    );

    let mut lat = Vec::new();
    for k in 0..args.claims {
        let (a, l) = subnet(200_000 + k);
        let key = format!("{PREFIX}/subnets/{a}-{l}");
        let t = Instant::now();
        rt.block_on(c.put(
            key.clone(),
            format!("{{\"host\":\"{}\"}}", host_id(0)),
            None,
        ))
        .expect("put");
        while !routes.contains(a, l).expect("lookup") {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "claim {key} never routed"
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        lat.push(t.elapsed());
        rt.block_on(c.delete(key, None)).expect("delete");
    }
    println!(
        "convergence (etcd claim -> ROUTES): p50 {:?} p99 {:?} over {}",
        pct(&mut lat, 0.5),
        pct(&mut lat, 0.99),
        lat.len()
    );

    // Churn: every 1/rate s one host leaves (its keys deleted) and one joins.
    let t = Instant::now();
    let step = Duration::from_secs(1) / args.churn.max(1);
    let n = args.churn * 5;
    let mut expect: BTreeSet<(Ipv4Addr, u8)> = (0..total).map(subnet).collect();
    for i in 0..n {
        let gone = i % args.hosts;
        let mut ops: Vec<TxnOp> = vec![TxnOp::delete(
            format!("{PREFIX}/hosts/{}", host_id(gone)),
            None,
        )];
        for j in 0..args.subnets {
            let k = gone * args.subnets + j;
            let (a, l) = subnet(k);
            if expect.remove(&(a, l)) {
                ops.push(TxnOp::delete(format!("{PREFIX}/subnets/{a}-{l}"), None));
            }
        }
        let id = args.hosts + i;
        let joined = host_ops(id, args.subnets);
        for j in 0..args.subnets {
            expect.insert(subnet(id * args.subnets + j));
        }
        ops.extend(joined);
        rt.block_on(write(&mut c, ops));
        let next = step * (i + 1);
        if let Some(wait) = next.checked_sub(t.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    let sent = t.elapsed();
    loop {
        let now = routes.prefixes().expect("routes");
        if now == expect {
            break;
        }
        assert!(
            t.elapsed() < sent + Duration::from_secs(30),
            "churn never converged"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let behind = t.elapsed().saturating_sub(sent);
    println!(
        "churn: {n} hosts left and {n} joined over {sent:?} ({} hosts/s); ROUTES matched {behind:?} after the last write",
        args.churn
    );
    drop(agent);
    drop(c);
    drop(rt);
}
