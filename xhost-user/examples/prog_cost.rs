//! Per-packet cost of the datapath programs against the size of `ROUTES`, with
//! `BPF_PROG_TEST_RUN`: no packets on the wire, no scheduler, no other CPU, so
//! the route-scale cost can be told apart from this VM's ±25 % packet-rate
//! noise. `cargo xtask bench` runs it and reports the result.
//!
//! Each route count (the real peer's subnet plus the scale benchmark's extra
//! subnets, `scale_subnets`) gets a datapath instance of its own, with those
//! routes in its `ROUTES` and, as the agent installs them, in the FIB of a
//! test host namespace of its own (`bpf_fib_lookup` walks that FIB). Rounds
//! interleave the instances. For `xhost_veth_in` (a container's packet to
//! the peer's subnet) and `xhost_nic_in` (the peer's packet to a local
//! endpoint), all on one CPU:
//! * `warm`: a run after a run of the same packet, median of many: the
//!   steady state, answered from the per-CPU caches (`xhost_veth_in`'s
//!   flow cache, `xhost_nic_in`'s route cache);
//! * `first`: a run right after a route write (which retires both caches),
//!   median of many: the first packet after any route change, which walks
//!   the LPM trie.
//!
//! Every sample is one run (`repeat` 1): repeated runs would share one skb,
//! which the first run rewrites (MACs, TTL), so the rest would take another
//! path. A sample's time is the kernel's, around the program: it includes
//! two clock reads and the BH toggling, the same at every route count.
//! Every run must forward (`TC_ACT_REDIRECT`), else the numbers would be of
//! another path and the run fails. Needs root. Prints one JSON object.
//!
//! ```text
//! prog_cost [--quick] [--routes 1,1000,100000]
//! ```

#[path = "../tests/support/mod.rs"]
mod support;

use std::{fmt::Write as _, fs::File, net::Ipv4Addr, process::Command, time::Duration};

use anyhow::{Context as _, ensure};
use aya::Ebpf;
use clap::Parser;
use nix::sched::{CloneFlags, setns};
use serde::Serialize;
use support::{
    CTR_MAC, GW_MAC, TC_ACT_REDIRECT, enter_test_host, ifindex, ipv4, loaded, pin_to_cpu0,
    run_tc_prog, to_mac,
};
use xhost_tests::{cmd::checked_with_stdin, scenarios::scale_subnets};
use xhost_user::{datapath::RouteTable, net::Ipv4Net};

#[derive(Parser, Debug)]
struct Args {
    /// Fewer samples: a smoke run of a few seconds.
    #[arg(long)]
    quick: bool,
    /// Route counts to measure, ascending.
    #[arg(long, value_delimiter = ',', default_value = "1,1000,100000")]
    routes: Vec<u32>,
}

#[derive(Debug, Serialize)]
struct Sample {
    program: &'static str,
    routes: u32,
    /// Median ns of a run after a run of the same packet.
    warm_ns: f64,
    /// Median ns of a run right after a route write.
    first_ns: f64,
}

#[derive(Debug, Serialize)]
struct Output {
    rounds: usize,
    /// Per program and route count.
    warm_samples: usize,
    first_samples: usize,
    samples: Vec<Sample>,
}

const LOCAL: [u8; 4] = [192, 168, 110, 11];
const REMOTE: [u8; 4] = [192, 168, 220, 11];
const PEER: Ipv4Addr = Ipv4Addr::new(172, 16, 91, 132);
/// The peer's container subnet: the one route of the 1-route case.
const PEER_NET: &str = "192.168.220.0/24";
/// Peer hosts of the extra routes, as the scale benchmark spreads them.
const EXTRA_PEER_BASE: u8 = 140;
const EXTRA_PEERS: usize = 100;

fn extra_peer(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(172, 16, 91, EXTRA_PEER_BASE + (i % EXTRA_PEERS) as u8)
}

/// `ip -batch -` in this thread's netns.
fn ip_batch(script: &str) -> anyhow::Result<()> {
    checked_with_stdin(Command::new("ip").args(["-batch", "-"]), script.as_bytes())?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    check_counts(&args.routes)?;
    let (rounds, warm_per_round, first_per_round) = if args.quick {
        (5, 100, 60)
    } else {
        (20, 250, 100)
    };
    // A thread of its own: it moves through the test hosts' namespaces.
    let routes = args.routes.clone();
    let samples =
        std::thread::spawn(move || measure(&routes, rounds, warm_per_round, first_per_round))
            .join()
            .map_err(|_| anyhow::anyhow!("the measuring thread panicked"))??;
    let out = Output {
        rounds,
        warm_samples: rounds * warm_per_round,
        first_samples: rounds * first_per_round,
        samples,
    };
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

fn check_counts(routes: &[u32]) -> anyhow::Result<()> {
    ensure!(
        routes.first().is_some_and(|&n| n >= 1) && routes.windows(2).all(|w| w[0] < w[1]),
        "--routes must be ascending counts >= 1, got {routes:?}"
    );
    Ok(())
}

/// One loaded instance of the datapath with its own `ROUTES` of one size, in a test host
/// of its own whose FIB holds the same routes, as the agent installs them.
struct Instance {
    routes: u32,
    netns: File,
    /// ifindex of br0 and ul0 in `netns`.
    ifindex: [u32; 2],
    ebpf: Ebpf,
    table: RouteTable,
    /// Per program: warm and first-packet samples.
    warm: Vec<Vec<Duration>>,
    first: Vec<Vec<Duration>>,
}

fn measure(
    counts: &[u32],
    rounds: usize,
    warm_per_round: usize,
    first_per_round: usize,
) -> anyhow::Result<Vec<Sample>> {
    pin_to_cpu0();
    let avoid: Vec<ipnet::Ipv4Net> = ["192.168.110.0/24", "192.168.220.0/24", "192.168.230.0/24"]
        .iter()
        .map(|s| s.parse())
        .collect::<Result<_, _>>()?;
    let max = counts.last().copied().unwrap_or(1);
    let extra = scale_subnets(max - 1, &avoid)?;
    let mut instances = Vec::new();
    for &routes in counts {
        enter_test_host();
        let mut kernel_routes = format!("route add {PEER_NET} via {PEER} dev ul0 proto 177\n");
        for (i, net) in extra.iter().enumerate().take(routes as usize - 1) {
            let _ = writeln!(
                kernel_routes,
                "route add {net} via {} dev ul0 proto 177",
                extra_peer(i)
            );
        }
        ip_batch(&kernel_routes)?;
        let netns = File::open("/proc/thread-self/ns/net").context("this thread's netns")?;
        let mut ebpf = loaded();
        let mut table = RouteTable::new(
            ebpf.take_map("ROUTES").context("ROUTES")?,
            ebpf.take_map("DATAPATH_GEN").context("DATAPATH_GEN")?,
        )?;
        // The bench's hosts have one route, the peer's container subnet, and
        // the scale scenarios add these.
        table.remove(&"192.168.230.0/24".parse()?)?;
        for (i, net) in extra.iter().enumerate().take(routes as usize - 1) {
            table.set(&Ipv4Net::try_from(*net)?, extra_peer(i))?;
        }
        instances.push(Instance {
            routes,
            netns,
            ifindex: [ifindex("br0"), ifindex("ul0")],
            ebpf,
            table,
            warm: vec![Vec::new(); 2],
            first: vec![Vec::new(); 2],
        });
    }

    // Sent to the gateway, as containers do.
    let out_frame = to_mac(ipv4(LOCAL, REMOTE, 64, &[]), GW_MAC);
    let in_frame = to_mac(ipv4(REMOTE, LOCAL, 63, &[]), CTR_MAC);
    // (program, arrival device: br0 or ul0, frame)
    let programs = [
        (xhost_common::PROG_VETH_IN, 0, out_frame),
        (xhost_common::PROG_NIC_IN, 1, in_frame),
    ];
    let peer_net: Ipv4Net = PEER_NET.parse()?;
    // Rounds interleave the instances, so drift of the machine meets all alike.
    for _ in 0..rounds {
        for inst in &mut instances {
            // The FIB lookups and the test skb's device are this thread's netns.
            setns(&inst.netns, CloneFlags::CLONE_NEWNET).context("entering a test host")?;
            for (p, (program, dev, frame)) in programs.iter().enumerate() {
                let count = inst.routes;
                let iif = inst.ifindex[*dev];
                let what = |after_write: bool| {
                    let when = if after_write {
                        " after a route write"
                    } else {
                        ""
                    };
                    format!("{program} with {count} routes{when}")
                };
                forwarded_run(&mut inst.ebpf, program, iif, frame, || what(false))?; // fills this CPU's cache slot
                for _ in 0..warm_per_round {
                    let d = forwarded_run(&mut inst.ebpf, program, iif, frame, || what(false))?;
                    inst.warm[p].push(d);
                }
                for _ in 0..first_per_round {
                    // Rewriting a route retires every cached answer.
                    inst.table.set(&peer_net, PEER)?;
                    let d = forwarded_run(&mut inst.ebpf, program, iif, frame, || what(true))?;
                    inst.first[p].push(d);
                }
            }
        }
    }
    let mut samples = Vec::new();
    for inst in &mut instances {
        for (p, (program, _, _)) in programs.iter().enumerate() {
            samples.push(Sample {
                program,
                routes: inst.routes,
                warm_ns: median_ns(&mut inst.warm[p]),
                first_ns: median_ns(&mut inst.first[p]),
            });
        }
    }
    Ok(samples)
}

/// One run that must forward (redirect); its time. `what` names the case in the error.
fn forwarded_run(
    ebpf: &mut Ebpf,
    program: &str,
    iif: u32,
    frame: &[u8],
    what: impl FnOnce() -> String,
) -> anyhow::Result<Duration> {
    let r = run_tc_prog(ebpf, program, iif, frame, 1)?;
    ensure!(
        r.verdict == TC_ACT_REDIRECT,
        "{}: verdict {} instead of a redirect",
        what(),
        r.verdict
    );
    Ok(r.per_run)
}

fn median_ns(v: &mut [Duration]) -> f64 {
    v.sort();
    v[v.len() / 2].as_nanos() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_counts_are_checked() {
        let parse = |a: &[&str]| Args::try_parse_from([&["prog_cost"], a].concat());
        let args = parse(&["--routes", "1,300"]).expect("parses");
        assert!(check_counts(&args.routes).is_ok());
        assert_eq!(parse(&[]).expect("default").routes, [1, 1000, 100_000]);
        for bad in ["300,1", "0,5", "5,5"] {
            let args = parse(&["--routes", bad]).expect("parses");
            assert!(check_counts(&args.routes).is_err(), "{bad} accepted");
        }
        assert!(parse(&["--routes", "x"]).is_err());
    }

    /// Every count and program measured, on the forwarding path (`measure` fails on any
    /// other verdict), with plausible times.
    #[test]
    fn measures_each_program_at_each_count() {
        let samples = std::thread::spawn(|| measure(&[1, 300], 2, 20, 10))
            .join()
            .expect("no panic")
            .expect("measured");
        let got: Vec<(&str, u32)> = samples.iter().map(|s| (s.program, s.routes)).collect();
        assert_eq!(
            got,
            [
                (xhost_common::PROG_VETH_IN, 1),
                (xhost_common::PROG_NIC_IN, 1),
                (xhost_common::PROG_VETH_IN, 300),
                (xhost_common::PROG_NIC_IN, 300),
            ]
        );
        for s in &samples {
            for ns in [s.warm_ns, s.first_ns] {
                assert!(ns > 0.0 && ns < 1e6, "{s:?}");
            }
        }
    }
}
