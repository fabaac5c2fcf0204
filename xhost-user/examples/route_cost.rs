//! Time the single writer takes to program kernel routes of peer subnets
//! (`KernelRoutes::add`, one `RTM_NEWROUTE` each over the writer's netlink
//! socket) and to delete them again (`KernelRoutes::remove`), in a private
//! network namespace of its own: a veth underlay `xh-rc0` with
//! 10.200.0.1/16 and N routes `10.a.b.0/24 via 10.200.0.2 proto 177`. The
//! kernel's table is read back (`ip route show proto 177`) after both
//! steps: the run fails unless all N routes were there, then none. Needs
//! root. Prints one JSON object.
//!
//! ```text
//! route_cost [--routes 1000]
//! ```

use std::{net::Ipv4Addr, process::Command, time::Instant};

use xhost_user::{net::Ipv4Net, tunnel::RouteDevice, writer::KernelRoutes};

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(out.status.success(), "ip {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// xhost's routes in the namespace's main table.
fn installed() -> usize {
    ip(&["-4", "route", "show", "proto", "177"]).lines().count()
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut n = 1000usize;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--routes" => {
                n = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|&v| (1..=65_000).contains(&v))
                    .expect("--routes takes a count in 1..=65000");
            }
            _ => panic!("unknown argument {a} (usage: route_cost [--routes N])"),
        }
    }
    // A namespace of this process's own: it and its routes go when it exits.
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
        .expect("a private network namespace (needs root)");
    ip(&[
        "link", "add", "xh-rc0", "type", "veth", "peer", "name", "xh-rc1",
    ]);
    ip(&["addr", "add", "10.200.0.1/16", "dev", "xh-rc0"]);
    ip(&["link", "set", "xh-rc1", "up"]);
    ip(&["link", "set", "xh-rc0", "up"]);
    let oif = xhost_user::net::ifindex("xh-rc0").expect("xh-rc0");
    let peer = Ipv4Addr::new(10, 200, 0, 2);
    let nets: Vec<Ipv4Net> = (0..n)
        .map(|i| {
            let [_, _, hi, lo] = u32::try_from(i + 256).expect("small").to_be_bytes();
            Ipv4Net::containing(Ipv4Addr::new(10, hi, lo, 0), 24)
        })
        .collect();

    let mut routes = KernelRoutes::new(RouteDevice {
        oif,
        via_peer: true,
        ipv6_outer_mtu: None,
    })
    .expect("the writer's netlink socket");
    let t = Instant::now();
    for net in &nets {
        routes.add(net, peer).expect("route add");
    }
    let add = t.elapsed();
    assert_eq!(installed(), n, "every route in the kernel's table");
    let t = Instant::now();
    for net in &nets {
        routes.remove(net);
    }
    let remove = t.elapsed();
    assert_eq!(installed(), 0, "every route deleted");
    println!(
        "{{\"routes\":{n},\"add_ms\":{:.1},\"remove_ms\":{:.1},\"add_us_per_route\":{:.1}}}",
        add.as_secs_f64() * 1e3,
        remove.as_secs_f64() * 1e3,
        add.as_secs_f64() * 1e6 / n as f64
    );
}
