//! The plan's ordering rules, and `execute` keeping `applied` exact, with a
//! recording writer: no kernel, no root.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use xhost_common::Endpoint;

use super::*;
use crate::{
    config::PeerConfig,
    net::{Ipv4Net, Ipv6Net},
};

fn net6(s: &str) -> Ipv6Net {
    s.parse().expect("cidr")
}

fn ip6(s: &str) -> Ipv6Addr {
    s.parse().expect("ip")
}

fn net(s: &str) -> Ipv4Net {
    s.parse().expect("cidr")
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().expect("ip")
}

fn peers(list: &[&str]) -> Peers {
    let configs: Vec<PeerConfig> = list.iter().map(|p| p.parse().expect("peer")).collect();
    Peers::of(&configs)
}

fn endpoint(ifindex: u32, last: u8) -> Endpoint {
    Endpoint {
        ifindex,
        flags: 0,
        mac: [2, 0x42, 192, 168, 110, last],
        gw_mac: [2, 0x42, 0, 0, 0, 1],
        _pad: [0; 4],
    }
}

/// docker0 (ifindex 3) serving 192.168.110.0/24 with the given containers
/// (last octet, veth ifindex).
fn local(containers: &[(u8, u32)]) -> Local {
    let mut l = Local::default();
    l.bridges.insert("docker0".into());
    l.locals
        .insert(net("192.168.110.0/24"), ("docker0".into(), 3));
    for (last, ifindex) in containers {
        l.ports.insert(*ifindex, format!("veth{ifindex}"));
        l.endpoints.insert(
            Ipv4Addr::new(192, 168, 110, *last),
            endpoint(*ifindex, *last),
        );
    }
    l
}

fn state(p: Peers, l: Local) -> State {
    State { peers: p, local: l }
}

const ROOMY: Limits = Limits {
    peer_hosts: 16,
    routes: 16,
    routes6: 16,
    endpoints: 16,
};

/// Index of the first op matching `pred` (panics naming `what` if none).
#[track_caller]
fn pos(ops: &[Op], what: &str, pred: impl Fn(&Op) -> bool) -> usize {
    ops.iter()
        .position(pred)
        .unwrap_or_else(|| panic!("no {what} in {ops:#?}"))
}

/// Records every call as the op it carries out; fails the `fail_at`th
/// fallible call (0-based), having done nothing for it.
#[derive(Default)]
struct Recorder {
    done: Vec<Op>,
    fallible_calls: usize,
    fail_at: Option<usize>,
}

#[derive(Debug, thiserror::Error)]
#[error("injected failure")]
struct Injected;

impl Recorder {
    fn failing_at(n: usize) -> Self {
        Self {
            fail_at: Some(n),
            ..Self::default()
        }
    }

    fn fallible(&mut self, op: Op) -> Result<(), Injected> {
        let n = self.fallible_calls;
        self.fallible_calls += 1;
        if self.fail_at == Some(n) {
            return Err(Injected);
        }
        self.done.push(op);
        Ok(())
    }
}

impl Writer for Recorder {
    type Error = Injected;

    fn add_peer_host(&mut self, host: IpAddr) -> Result<(), Injected> {
        self.fallible(Op::AddPeerHost(host))
    }
    fn remove_peer_host(&mut self, host: IpAddr) -> Result<(), Injected> {
        self.fallible(Op::RemovePeerHost(host))
    }
    fn set_route(&mut self, net: &Ipv4Net, peer: Ipv4Addr) -> Result<(), Injected> {
        self.fallible(Op::SetRoute { net: *net, peer })
    }
    fn remove_route(&mut self, net: &Ipv4Net) -> Result<(), Injected> {
        self.fallible(Op::RemoveRoute(*net))
    }
    fn add_kernel_route(&mut self, net: &Ipv4Net, peer: Ipv4Addr) -> Result<(), Injected> {
        self.fallible(Op::AddKernelRoute { net: *net, peer })
    }
    fn remove_kernel_route(&mut self, net: &Ipv4Net) {
        self.done.push(Op::RemoveKernelRoute(*net));
    }
    fn attach_bridge(&mut self, bridge: &str) -> Result<(), Injected> {
        self.fallible(Op::AttachBridge(bridge.into()))
    }
    fn detach_bridge(&mut self, bridge: &str) {
        self.done.push(Op::DetachBridge(bridge.into()));
    }
    fn set_local(&mut self, net: &Ipv4Net, bridge_ifindex: u32) -> Result<(), Injected> {
        // The writer is told the ifindex only; the bridge name is the plan's.
        self.fallible(Op::SetLocal {
            net: *net,
            bridge: String::new(),
            ifindex: bridge_ifindex,
        })
    }
    fn remove_local(&mut self, net: &Ipv4Net) -> Result<(), Injected> {
        self.fallible(Op::RemoveLocal(*net))
    }
    fn attach_port(&mut self, port: &str) -> Result<(), Injected> {
        self.fallible(Op::AttachPort {
            ifindex: 0,
            name: port.into(),
        })
    }
    fn detach_port(&mut self, port: &str) {
        self.done.push(Op::DetachPort {
            ifindex: 0,
            name: port.into(),
        });
    }
    fn set_endpoint(&mut self, ip: Ipv4Addr, ep: Endpoint) -> Result<(), Injected> {
        self.fallible(Op::SetEndpoint { ip, ep })
    }
    fn remove_endpoint(&mut self, ip: Ipv4Addr) -> Result<(), Injected> {
        self.fallible(Op::RemoveEndpoint(ip))
    }
    fn set_neighbours(&mut self, neighbours: &[Neighbour]) {
        self.done.push(Op::SetNeighbours(neighbours.to_vec()));
    }
    fn set_route6(&mut self, net: &Ipv6Net, peer: IpAddr) -> Result<(), Injected> {
        self.fallible(Op::SetRoute6 { net: *net, peer })
    }
    fn remove_route6(&mut self, net: &Ipv6Net) -> Result<(), Injected> {
        self.fallible(Op::RemoveRoute6(*net))
    }
    fn add_kernel_route6(&mut self, net: &Ipv6Net, peer: IpAddr) -> Result<(), Injected> {
        self.fallible(Op::AddKernelRoute6 { net: *net, peer })
    }
    fn remove_kernel_route6(&mut self, net: &Ipv6Net) {
        self.done.push(Op::RemoveKernelRoute6(*net));
    }
    fn set_local6(&mut self, net: &Ipv6Net, bridge_ifindex: u32) -> Result<(), Injected> {
        self.fallible(Op::SetLocal6 {
            net: *net,
            bridge: String::new(),
            ifindex: bridge_ifindex,
        })
    }
    fn remove_local6(&mut self, net: &Ipv6Net) -> Result<(), Injected> {
        self.fallible(Op::RemoveLocal6(*net))
    }
    fn set_endpoint6(&mut self, ip: Ipv6Addr, ep: Endpoint) -> Result<(), Injected> {
        self.fallible(Op::SetEndpoint6 { ip, ep })
    }
    fn remove_endpoint6(&mut self, ip: Ipv6Addr) -> Result<(), Injected> {
        self.fallible(Op::RemoveEndpoint6(ip))
    }
}

/// docker0 dual-stack: `local(containers)` plus fd00:a::/64 on it and each
/// container's IPv6 address fd00:a::LAST on the same veth and MACs.
fn local_dual(containers: &[(u8, u32)]) -> Local {
    let mut l = local(containers);
    l.locals6.insert(net6("fd00:a::/64"), ("docker0".into(), 3));
    for (last, ifindex) in containers {
        l.endpoints6.insert(
            Ipv6Addr::new(0xfd00, 0xa, 0, 0, 0, 0, 0, u16::from(*last)),
            endpoint(*ifindex, *last),
        );
    }
    l
}

#[test]
fn dual_stack_peer_and_container_in_order() {
    // One peer with a v4 and a v6 subnet, one dual-stack container.
    let mut applied = State::default();
    let want = state(
        peers(&["10.0.0.2=10.1.0.0/16,fd00:b::/64"]),
        local_dual(&[(11, 7)]),
    );
    let ops = converge(&want, &mut applied, &ROOMY);
    let host = ip("10.0.0.2");
    let ep = endpoint(7, 11);
    assert_eq!(
        ops,
        [
            Op::AddPeerHost(host.into()),
            Op::SetRoute {
                net: net("10.1.0.0/16"),
                peer: host
            },
            Op::AddKernelRoute {
                net: net("10.1.0.0/16"),
                peer: host
            },
            Op::SetRoute6 {
                net: net6("fd00:b::/64"),
                peer: host.into()
            },
            Op::AddKernelRoute6 {
                net: net6("fd00:b::/64"),
                peer: host.into()
            },
            Op::AttachBridge("docker0".into()),
            Op::SetLocal {
                net: net("192.168.110.0/24"),
                bridge: "docker0".into(),
                ifindex: 3
            },
            Op::SetLocal6 {
                net: net6("fd00:a::/64"),
                bridge: "docker0".into(),
                ifindex: 3
            },
            Op::AttachPort {
                ifindex: 7,
                name: "veth7".into()
            },
            // The IPv6 endpoint before the IPv4 one, whose write arms the veth.
            Op::SetEndpoint6 {
                ip: ip6("fd00:a::b"),
                ep
            },
            Op::SetEndpoint {
                ip: ip("192.168.110.11"),
                ep
            },
            Op::SetNeighbours(vec![Neighbour {
                ip: ip("192.168.110.11"),
                mac: ep.mac,
                bridge: "docker0".into(),
                bridge_ifindex: 3
            }]),
        ]
    );
    // All gone: the IPv4 endpoint (disarming the veth) before the IPv6
    // one, both before the port and the subnets; every route before the
    // peer host.
    let ops = converge(&State::default(), &mut applied, &ROOMY);
    assert_eq!(
        ops,
        [
            Op::RemoveRoute(net("10.1.0.0/16")),
            Op::RemoveKernelRoute(net("10.1.0.0/16")),
            Op::RemoveRoute6(net6("fd00:b::/64")),
            Op::RemoveKernelRoute6(net6("fd00:b::/64")),
            Op::RemovePeerHost(host.into()),
            Op::RemoveEndpoint(ip("192.168.110.11")),
            Op::RemoveEndpoint6(ip6("fd00:a::b")),
            Op::DetachPort {
                ifindex: 7,
                name: "veth7".into()
            },
            Op::RemoveLocal(net("192.168.110.0/24")),
            Op::RemoveLocal6(net6("fd00:a::/64")),
            Op::DetachBridge("docker0".into()),
        ]
    );
}

#[test]
fn ipv6_routes_split_moved_and_overflowing() {
    let mut applied = state(peers(&["10.0.0.2=fd00:b::/48"]), Local::default());
    // Split into two /64s: both written before the /48 leaves.
    let want = state(
        peers(&["10.0.0.2=fd00:b::/64,fd00:b:0:1::/64"]),
        Local::default(),
    );
    let ops = converge(&want, &mut applied, &ROOMY);
    let last_set = ops
        .iter()
        .rposition(|o| matches!(o, Op::SetRoute6 { .. }))
        .expect("set");
    let removed = pos(&ops, "RemoveRoute6", |o| {
        *o == Op::RemoveRoute6(net6("fd00:b::/48"))
    });
    assert!(last_set < removed, "{ops:#?}");
    // Moved to another peer: the new host first, the route replaced in
    // place with its kernel route, the old host after its routes.
    let want = state(
        peers(&["10.0.0.3=fd00:b::/64,fd00:b:0:1::/64"]),
        Local::default(),
    );
    let ops = converge(&want, &mut applied, &ROOMY);
    assert_eq!(ops[0], Op::AddPeerHost(ip("10.0.0.3").into()));
    assert_eq!(ops[1], Op::RemoveKernelRoute6(net6("fd00:b::/64")));
    assert_eq!(
        ops[2],
        Op::SetRoute6 {
            net: net6("fd00:b::/64"),
            peer: ip("10.0.0.3").into()
        }
    );
    assert_eq!(ops.last(), Some(&Op::RemovePeerHost(ip("10.0.0.2").into())));
    assert!(
        !ops.iter().any(|o| matches!(o, Op::RemoveRoute6(_))),
        "{ops:#?}"
    );
    // ROUTES6 full: the gone one leaves before the new one is written.
    let limits = Limits {
        routes6: 2,
        ..ROOMY
    };
    let want = state(
        peers(&["10.0.0.3=fd00:b::/64,fd00:c::/64"]),
        Local::default(),
    );
    let ops = converge(&want, &mut applied, &limits);
    let removed = pos(&ops, "RemoveRoute6", |o| {
        *o == Op::RemoveRoute6(net6("fd00:b:0:1::/64"))
    });
    let set = pos(&ops, "SetRoute6", |o| matches!(o, Op::SetRoute6 { .. }));
    assert!(removed < set, "{ops:#?}");
}

#[test]
fn a_failed_ipv6_write_leaves_applied_exact() {
    let want = state(
        peers(&["10.0.0.2=10.1.0.0/16,fd00:b::/64"]),
        local_dual(&[(11, 7)]),
    );
    let ops = plan(&want, &State::default(), &ROOMY);
    let set6 = pos(&ops, "SetEndpoint6", |o| {
        matches!(o, Op::SetEndpoint6 { .. })
    });
    // Every fallible call up to (not including) SetEndpoint6 succeeds.
    let fallible_before = ops[..set6]
        .iter()
        .filter(|o| !matches!(o, Op::RemoveKernelRoute(_) | Op::RemoveKernelRoute6(_)))
        .count();
    let mut applied = State::default();
    let mut w = Recorder::failing_at(fallible_before);
    execute(&mut w, &ops, &mut applied).expect_err("injected");
    assert!(applied.local.endpoints6.is_empty() && applied.local.endpoints.is_empty());
    assert_eq!(applied.peers.routes6.len(), 1);
    // The next step writes exactly what is missing, IPv6 first.
    let rest = plan(&want, &applied, &ROOMY);
    assert!(matches!(rest[0], Op::SetEndpoint6 { .. }), "{rest:#?}");
    assert!(matches!(rest[1], Op::SetEndpoint { .. }), "{rest:#?}");
}

/// Plans and executes `want` from `applied` through a writer that fails
/// nothing; the result must be `want` exactly.
#[track_caller]
fn converge(want: &State, applied: &mut State, limits: &Limits) -> Vec<Op> {
    let ops = plan(want, applied, limits);
    execute(&mut Recorder::default(), &ops, applied).expect("no failure injected");
    assert_eq!(applied, want, "after {ops:#?}");
    assert!(plan(want, applied, limits).is_empty(), "converged");
    ops
}

#[test]
fn nothing_to_do_when_applied_is_wanted() {
    let s = state(peers(&["10.0.0.2=10.1.0.0/16"]), local(&[(11, 7)]));
    assert_eq!(plan(&s, &s, &ROOMY), []);
}

#[test]
fn new_hosts_before_their_routes() {
    let mut applied = State::default();
    let want = state(
        peers(&["10.0.0.2=10.1.0.0/16", "10.0.0.3=10.2.0.0/16"]),
        Local::default(),
    );
    let ops = converge(&want, &mut applied, &ROOMY);
    assert_eq!(
        ops,
        [
            Op::AddPeerHost(ip("10.0.0.2").into()),
            Op::AddPeerHost(ip("10.0.0.3").into()),
            Op::SetRoute {
                net: net("10.1.0.0/16"),
                peer: ip("10.0.0.2")
            },
            Op::AddKernelRoute {
                net: net("10.1.0.0/16"),
                peer: ip("10.0.0.2")
            },
            Op::SetRoute {
                net: net("10.2.0.0/16"),
                peer: ip("10.0.0.3")
            },
            Op::AddKernelRoute {
                net: net("10.2.0.0/16"),
                peer: ip("10.0.0.3")
            },
        ]
    );
}

#[test]
fn a_split_prefix_is_routed_throughout() {
    // A /16 replaced by its /24s: every /24 is written before the /16 goes,
    // so each address stays routed at every step.
    let mut applied = state(peers(&["10.0.0.2=10.1.0.0/16"]), Local::default());
    let want = state(
        peers(&["10.0.0.2=10.1.0.0/24,10.1.1.0/24,10.1.2.0/24"]),
        Local::default(),
    );
    let ops = converge(&want, &mut applied, &ROOMY);
    let removed = pos(&ops, "RemoveRoute", |o| {
        *o == Op::RemoveRoute(net("10.1.0.0/16"))
    });
    for n in ["10.1.0.0/24", "10.1.1.0/24", "10.1.2.0/24"] {
        let set = pos(
            &ops,
            n,
            |o| matches!(o, Op::SetRoute { net: x, .. } if *x == net(n)),
        );
        assert!(set < removed, "{n} set after the /16 left: {ops:#?}");
    }
    // Replayed op by op: some route covers 10.1.2.7 after every step.
    let mut s = state(peers(&["10.0.0.2=10.1.0.0/16"]), Local::default());
    for op in &ops {
        s.record(op);
        assert!(
            s.peers.routes.keys().any(|n| n.contains(ip("10.1.2.7"))),
            "gap after {op:?}"
        );
    }
    // And merged back: the /16 first, then the /24s leave.
    let back = state(peers(&["10.0.0.2=10.1.0.0/16"]), Local::default());
    let ops = converge(&back, &mut applied, &ROOMY);
    let set = pos(&ops, "SetRoute /16", |o| matches!(o, Op::SetRoute { .. }));
    let first_removal = pos(&ops, "RemoveRoute", |o| matches!(o, Op::RemoveRoute(_)));
    assert!(set < first_removal, "{ops:#?}");
}

#[test]
fn gone_entries_leave_first_when_the_map_would_overflow() {
    let limits = Limits {
        peer_hosts: 2,
        routes: 3,
        routes6: 16,
        endpoints: 16,
    };
    // Routes: 2 held, 2 new, 1 kept -> 4 at once > 3: the gone one leaves first.
    let mut applied = state(
        peers(&["10.0.0.2=10.1.0.0/16,10.2.0.0/16"]),
        Local::default(),
    );
    let want = state(
        peers(&["10.0.0.2=10.1.0.0/16,10.3.0.0/16,10.4.0.0/16"]),
        Local::default(),
    );
    let ops = converge(&want, &mut applied, &limits);
    let removed = pos(&ops, "RemoveRoute", |o| {
        *o == Op::RemoveRoute(net("10.2.0.0/16"))
    });
    let first_set = pos(&ops, "SetRoute", |o| matches!(o, Op::SetRoute { .. }));
    assert!(removed < first_set, "{ops:#?}");
    // Never more entries than the map holds, after any step.
    let mut s = state(
        peers(&["10.0.0.2=10.1.0.0/16,10.2.0.0/16"]),
        Local::default(),
    );
    for op in &ops {
        s.record(op);
        assert!(s.peers.routes.len() <= limits.routes, "after {op:?}");
    }

    // Hosts: 2 held, one replaced -> 3 at once > 2: the gone host and its
    // routes leave before the new host is added.
    let mut applied = state(
        peers(&["10.0.0.2=10.1.0.0/16", "10.0.0.3=10.2.0.0/16"]),
        Local::default(),
    );
    let want = state(
        peers(&["10.0.0.2=10.1.0.0/16", "10.0.0.4=10.5.0.0/16"]),
        Local::default(),
    );
    let ops = converge(&want, &mut applied, &limits);
    assert_eq!(
        ops[..3],
        [
            Op::RemoveRoute(net("10.2.0.0/16")),
            Op::RemoveKernelRoute(net("10.2.0.0/16")),
            Op::RemovePeerHost(ip("10.0.0.3").into()),
        ]
    );
    assert_eq!(ops[3], Op::AddPeerHost(ip("10.0.0.4").into()));

    // With room for both, the new host comes first and the old one last.
    let mut applied = state(
        peers(&["10.0.0.2=10.1.0.0/16", "10.0.0.3=10.2.0.0/16"]),
        Local::default(),
    );
    let ops = converge(&want, &mut applied, &ROOMY);
    assert_eq!(ops[0], Op::AddPeerHost(ip("10.0.0.4").into()));
    assert_eq!(ops.last(), Some(&Op::RemovePeerHost(ip("10.0.0.3").into())));
}

#[test]
fn a_route_moved_to_another_peer_replaces_its_kernel_route() {
    let mut applied = state(
        peers(&["10.0.0.2=10.1.0.0/16", "10.0.0.3=10.2.0.0/16"]),
        Local::default(),
    );
    let want = state(
        peers(&["10.0.0.2=10.2.0.0/16", "10.0.0.3=10.1.0.0/16"]),
        Local::default(),
    );
    let ops = converge(&want, &mut applied, &ROOMY);
    let moved = |n: &str, to: &str| {
        [
            Op::RemoveKernelRoute(net(n)),
            Op::SetRoute {
                net: net(n),
                peer: ip(to),
            },
            Op::AddKernelRoute {
                net: net(n),
                peer: ip(to),
            },
        ]
    };
    let mut expected = moved("10.1.0.0/16", "10.0.0.3").to_vec();
    expected.extend(moved("10.2.0.0/16", "10.0.0.2"));
    // In place: no RemoveRoute, so the subnet is never unrouted.
    assert_eq!(ops, expected);
}

#[test]
fn bridges_before_subnets_and_endpoints_before_removals() {
    // c11 leaves, c12 and c13 arrive, on a bridge that is attached already.
    let mut applied = state(Peers::default(), local(&[(11, 7)]));
    let want = state(Peers::default(), local(&[(12, 8), (13, 9)]));
    let ops = converge(&want, &mut applied, &ROOMY);
    let last_write = ops
        .iter()
        .rposition(|o| matches!(o, Op::SetEndpoint { .. } | Op::AttachPort { .. }))
        .expect("writes");
    let first_removal = pos(&ops, "removal", |o| {
        matches!(o, Op::RemoveEndpoint(_) | Op::DetachPort { .. })
    });
    assert!(last_write < first_removal, "{ops:#?}");
    // Ports attached before their endpoint is written.
    let port = pos(&ops, "port", |o| {
        matches!(o, Op::AttachPort { ifindex: 8, .. })
    });
    let ep = pos(
        &ops,
        "endpoint",
        |o| matches!(o, Op::SetEndpoint { ip: i, .. } if *i == ip("192.168.110.12")),
    );
    assert!(port < ep, "{ops:#?}");

    // A new network: the bridge is attached before its subnet appears.
    let mut applied = State::default();
    let want = state(Peers::default(), local(&[(11, 7)]));
    let ops = converge(&want, &mut applied, &ROOMY);
    assert_eq!(ops[0], Op::AttachBridge("docker0".into()));
    assert!(
        matches!(ops[1], Op::SetLocal { ifindex: 3, .. }),
        "{ops:#?}"
    );
}

#[test]
fn endpoints_leave_before_their_subnets_and_bridges() {
    let mut applied = state(Peers::default(), local(&[(11, 7), (12, 8)]));
    let ops = converge(&State::default(), &mut applied, &ROOMY);
    assert_eq!(
        ops,
        [
            Op::RemoveEndpoint(ip("192.168.110.11")),
            Op::RemoveEndpoint(ip("192.168.110.12")),
            Op::DetachPort {
                ifindex: 7,
                name: "veth7".into()
            },
            Op::DetachPort {
                ifindex: 8,
                name: "veth8".into()
            },
            Op::RemoveLocal(net("192.168.110.0/24")),
            Op::DetachBridge("docker0".into()),
        ]
    );
}

#[test]
fn a_reused_ifindex_detaches_the_stale_port_first() {
    let mut applied = state(Peers::default(), local(&[(11, 7)]));
    let mut want = applied.clone();
    want.local.ports.insert(7, "vethNEW".into());
    let ops = converge(&want, &mut applied, &ROOMY);
    assert_eq!(
        ops,
        [
            Op::DetachPort {
                ifindex: 7,
                name: "veth7".into()
            },
            Op::AttachPort {
                ifindex: 7,
                name: "vethNEW".into()
            },
        ]
    );
}

#[test]
fn neighbours_only_for_written_endpoints() {
    let mut applied = state(Peers::default(), local(&[(11, 7)]));
    // c11 unchanged, c12 new, c13 moved to another veth.
    let mut want = state(Peers::default(), local(&[(11, 7), (12, 8)]));
    applied
        .local
        .endpoints
        .insert(ip("192.168.110.13"), endpoint(9, 13));
    applied.local.ports.insert(9, "veth9".into());
    // c14 leaves.
    applied
        .local
        .endpoints
        .insert(ip("192.168.110.14"), endpoint(14, 14));
    applied.local.ports.insert(14, "veth14".into());
    want.local
        .endpoints
        .insert(ip("192.168.110.13"), endpoint(10, 13));
    want.local.ports.insert(10, "veth10".into());
    let ops = converge(&want, &mut applied, &ROOMY);
    let neighbours: Vec<_> = ops
        .iter()
        .filter_map(|o| match o {
            Op::SetNeighbours(n) => Some(n.clone()),
            _ => None,
        })
        .collect();
    let n = |last: u8| Neighbour {
        ip: Ipv4Addr::new(192, 168, 110, last),
        mac: [2, 0x42, 192, 168, 110, last],
        bridge: "docker0".into(),
        bridge_ifindex: 3,
    };
    assert_eq!(neighbours, [vec![n(12), n(13)]]);
    // After the endpoint writes, before any removal.
    let at = pos(&ops, "neighbours", |o| matches!(o, Op::SetNeighbours(_)));
    assert!(
        ops[..at]
            .iter()
            .filter(|o| matches!(o, Op::SetEndpoint { .. }))
            .count()
            == 2
    );
    assert!(
        ops[at..]
            .iter()
            .all(|o| !matches!(o, Op::SetEndpoint { .. })),
        "{ops:#?}"
    );
    assert!(
        ops[..at]
            .iter()
            .all(|o| !matches!(o, Op::RemoveEndpoint(_) | Op::DetachPort { .. })),
        "{ops:#?}"
    );
    // Nothing written, no neighbour op.
    let removal_only = state(Peers::default(), local(&[(11, 7)]));
    let ops = converge(&removal_only, &mut applied, &ROOMY);
    assert!(
        ops.iter().all(|o| !matches!(o, Op::SetNeighbours(_))),
        "{ops:#?}"
    );
}

#[test]
fn a_failure_half_way_leaves_applied_exact() {
    let start = state(
        peers(&["10.0.0.2=10.1.0.0/16", "10.0.0.3=10.2.0.0/16"]),
        local(&[(11, 7), (12, 8)]),
    );
    let want = state(
        peers(&["10.0.0.2=10.1.0.0/24,10.1.1.0/24", "10.0.0.4=10.2.0.0/16"]),
        {
            let mut l = local(&[(12, 8), (13, 9)]);
            l.bridges.insert("br-x".into());
            l.locals.insert(net("10.77.0.0/24"), ("br-x".into(), 5));
            l
        },
    );
    let ops = plan(&want, &start, &ROOMY);
    let fallible = ops
        .iter()
        .filter(|o| {
            !matches!(
                o,
                Op::RemoveKernelRoute(_)
                    | Op::DetachBridge(_)
                    | Op::DetachPort { .. }
                    | Op::SetNeighbours(_)
            )
        })
        .count();
    assert!(fallible > 10, "{ops:#?}");
    for fail_at in 0..fallible {
        let mut w = Recorder::failing_at(fail_at);
        let mut applied = start.clone();
        execute(&mut w, &ops, &mut applied).expect_err("injected");
        // Exactly what the writer did, applied to the start, no more.
        let mut expected = start.clone();
        for op in &ops[..w.done.len()] {
            expected.record(op);
        }
        assert_eq!(applied, expected, "failing at call {fail_at}");
        // The next plan picks up from there and converges.
        converge(&want, &mut applied, &ROOMY);
    }
}

#[test]
fn local_side_from_sources_and_kernel_facts() {
    let facts = KernelFacts {
        bridges: [
            (
                "docker0".to_owned(),
                BridgeFacts {
                    ifindex: 3,
                    mac: Some(Ok([2, 0x42, 0, 0, 0, 1])),
                },
            ),
            (
                "br-nomac".to_owned(),
                BridgeFacts {
                    ifindex: 4,
                    mac: Some(Err("cannot read its MAC address".into())),
                },
            ),
        ]
        .into(),
        ports: [(7, "veth7".to_owned()), (9, "veth9".to_owned())].into(),
    };
    let spec = |last: u8, ifindex: u32, bridge: &str| EndpointSpec {
        ip: Ipv4Addr::new(192, 168, 110, last),
        ip6: None,
        mac: [2, 0x42, 192, 168, 110, last],
        host_ifindex: ifindex,
        bridge: bridge.into(),
    };
    let docker = [
        ("docker0".to_owned(), vec![net("192.168.110.0/24")]),
        // Overlaps a peer's subnet: not served.
        ("br-x".to_owned(), vec![net("10.1.2.0/24")]),
        // Does not exist (yet).
        ("br-gone".to_owned(), vec![net("10.9.0.0/24")]),
        ("br-nomac".to_owned(), vec![net("192.168.111.0/24")]),
    ];
    let eps = [
        spec(11, 7, "docker0"),
        // Its veth is gone.
        spec(12, 8, "docker0"),
        // On a bridge whose subnet does not hold it.
        spec(13, 9, "br-x"),
        EndpointSpec {
            ip: ip("192.168.111.5"),
            ..spec(5, 9, "br-nomac")
        },
    ];
    let p = peers(&["10.0.0.2=10.1.0.0/16"]);
    let l = super::local(&[], &docker, &[], &eps, &p, &facts);
    let mut want = local(&[(11, 7)]);
    want.bridges.insert("br-nomac".into());
    want.locals
        .insert(net("192.168.111.0/24"), ("br-nomac".into(), 4));
    assert_eq!(l, want);
    // A peer host inside a local subnet keeps it out as well.
    let p = peers(&["192.168.110.200=10.1.0.0/16"]);
    let l = super::local(&[], &docker[..1], &[], &eps, &p, &facts);
    assert_eq!(l, Local::default());
}

#[test]
fn dual_stack_local_side_from_docker() {
    let facts = KernelFacts {
        bridges: [(
            "docker0".to_owned(),
            BridgeFacts {
                ifindex: 3,
                mac: Some(Ok([2, 0x42, 0, 0, 0, 1])),
            },
        )]
        .into(),
        ports: [(7, "veth7".to_owned()), (8, "veth8".to_owned())].into(),
    };
    let spec = |last: u8, ifindex: u32, ip6: Option<&str>| EndpointSpec {
        ip: Ipv4Addr::new(192, 168, 110, last),
        ip6: ip6.map(ip6_of),
        mac: [2, 0x42, 192, 168, 110, last],
        host_ifindex: ifindex,
        bridge: "docker0".into(),
    };
    fn ip6_of(s: &str) -> Ipv6Addr {
        s.parse().expect("ip")
    }
    let docker = [("docker0".to_owned(), vec![net("192.168.110.0/24")])];
    let docker6 = [(
        "docker0".to_owned(),
        // The second overlaps a peer's IPv6 subnet: not served.
        vec![net6("fd00:a::/64"), net6("fd00:b:0:1::/64")],
    )];
    let eps = [
        spec(11, 7, Some("fd00:a::b")),
        // An IPv6 address in no served subnet: its IPv4 endpoint only.
        spec(12, 8, Some("fd00:b:0:1::c")),
    ];
    let p = peers(&["10.0.0.2=10.1.0.0/16,fd00:b::/48"]);
    let l = super::local(&[], &docker, &docker6, &eps, &p, &facts);
    let mut want = local_dual(&[(11, 7)]);
    want.ports.insert(8, "veth8".into());
    want.endpoints.insert(ip("192.168.110.12"), endpoint(8, 12));
    assert_eq!(l, want);
    // IPv6 subnets on a bridge that serves no IPv4 subnet are not served.
    let l = super::local(&[], &[], &docker6, &eps, &p, &facts);
    assert_eq!(l, Local::default());
}

#[test]
fn a_step_with_100k_routes_stays_cheap() {
    // Every step plans the peers too: with nothing changed at the datapath's
    // scale that must cost little, and a change must touch only itself.
    let subnets: Vec<Ipv4Net> = (0..100_000u32)
        .map(|i| Ipv4Net::containing(Ipv4Addr::from(0x0a00_0000 + (i << 8)), 24))
        .collect();
    let config = PeerConfig {
        host: ip("172.16.0.2").into(),
        subnets,
        subnets6: Vec::new(),
    };
    let applied = state(Peers::of(std::slice::from_ref(&config)), local(&[(11, 7)]));
    let mut want = applied.clone();
    let start = std::time::Instant::now();
    assert_eq!(plan(&want, &applied, &Limits::DATAPATH), []);
    let unchanged = start.elapsed();
    want.local = local(&[(11, 7), (12, 8)]);
    let start = std::time::Instant::now();
    let ops = plan(&want, &applied, &Limits::DATAPATH);
    let changed = start.elapsed();
    eprintln!(
        "plan over 100 000 routes: {unchanged:?} unchanged, {changed:?} with one new endpoint"
    );
    assert_eq!(ops.len(), 3, "{ops:#?}");
    assert!(
        unchanged < std::time::Duration::from_millis(100)
            && changed < std::time::Duration::from_millis(100),
        "{unchanged:?} / {changed:?}"
    );
}

#[test]
fn an_adopted_local_side_is_kept_until_its_source_speaks() {
    // Held by the adopted maps: two containers. Docker has not answered
    // yet, so the sources know only the static side (no endpoint).
    let held = local(&[(11, 7), (12, 8)]);
    let applied = state(peers(&["10.0.0.2=10.1.0.0/16"]), held.clone());
    let mut sources_only = Local::default();
    sources_only.bridges.insert("docker0".into());
    let mut want = applied.clone();
    want.local = sources_only.clone();
    assert!(
        plan(&want, &applied, &ROOMY)
            .iter()
            .any(|op| matches!(op, Op::RemoveEndpoint(_))),
        "without keeping, the endpoints would go"
    );
    want.local = sources_only.keeping(&held);
    assert_eq!(plan(&want, &applied, &ROOMY), [], "kept: nothing to write");
    // What the sources do say wins: a moved endpoint is rewritten.
    let mut moved = Local::default();
    moved
        .endpoints
        .insert(ip("192.168.110.11"), endpoint(9, 11));
    moved.ports.insert(9, "veth9".into());
    want.local = moved.keeping(&held);
    let ops = plan(&want, &applied, &ROOMY);
    assert!(
        ops.iter().any(
            |op| matches!(op, Op::SetEndpoint { ip: a, ep } if *a == ip("192.168.110.11") && ep.ifindex == 9)
        ),
        "{ops:#?}"
    );
    assert!(
        !ops.iter().any(|op| matches!(op, Op::RemoveEndpoint(_))),
        "{ops:#?}"
    );
}

#[test]
fn endpoints_over_capacity_are_refused_whole_and_wait() {
    let limits = Limits {
        endpoints: 2,
        ..ROOMY
    };
    // .11 is in the map; .10, .12 and .13 arrive: the one free slot goes
    // to .10 (address order), the others are refused.
    let mut applied = state(Peers::default(), Local::default());
    let mut want = local(&[(11, 21)]);
    assert_eq!(admit(&mut want, &applied.local, 2), Vec::<Ipv4Addr>::new());
    converge(&state(Peers::default(), want), &mut applied, &limits);
    let mut want = local(&[(10, 20), (11, 21), (12, 22), (13, 23)]);
    let refused = admit(&mut want, &applied.local, 2);
    assert_eq!(refused, [ip("192.168.110.12"), ip("192.168.110.13")]);
    assert_eq!(
        want.endpoints.keys().copied().collect::<Vec<_>>(),
        [ip("192.168.110.10"), ip("192.168.110.11")]
    );
    // Refused whole: no program on their veths either.
    assert_eq!(want.ports.keys().copied().collect::<Vec<_>>(), [20, 21]);
    converge(&state(Peers::default(), want), &mut applied, &limits);

    // .11 leaves while .12 waits: the map is full, so .11 (endpoint, then
    // port) goes before .12 (port, then endpoint) comes.
    let mut want = local(&[(10, 20), (12, 22), (13, 23)]);
    let refused = admit(&mut want, &applied.local, 2);
    assert_eq!(refused, [ip("192.168.110.13")]);
    let ops = plan(&state(Peers::default(), want), &applied, &limits);
    let gone = pos(&ops, "RemoveEndpoint .11", |o| {
        *o == Op::RemoveEndpoint(ip("192.168.110.11"))
    });
    let detached = pos(&ops, "DetachPort 21", |o| {
        matches!(o, Op::DetachPort { ifindex: 21, .. })
    });
    let attached = pos(&ops, "AttachPort 22", |o| {
        matches!(o, Op::AttachPort { ifindex: 22, .. })
    });
    let set = pos(
        &ops,
        "SetEndpoint .12",
        |o| matches!(o, Op::SetEndpoint { ip, .. } if *ip == Ipv4Addr::new(192, 168, 110, 12)),
    );
    assert!(
        gone < detached && detached < attached && attached < set,
        "{ops:#?}"
    );

    // Roomy: removals stay last, as always.
    let mut want = local(&[(10, 20), (12, 22)]);
    assert!(admit(&mut want, &applied.local, 16).is_empty());
    let ops = plan(&state(Peers::default(), want), &applied, &ROOMY);
    let set = pos(&ops, "SetEndpoint .12", |o| {
        matches!(o, Op::SetEndpoint { .. })
    });
    let gone = pos(&ops, "RemoveEndpoint .11", |o| {
        matches!(o, Op::RemoveEndpoint(_))
    });
    assert!(set < gone, "{ops:#?}");
}
