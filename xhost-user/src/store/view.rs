//! What the store says, as data: the records hosts publish, the keys they
//! live under, the view an agent builds from a list and keeps current with
//! watch events, and the pure plan that turns that view into peers for the
//! single writer (unit-tested without a store or root).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
};

use serde::{Deserialize, Serialize};

use super::{Event, Kv};
use crate::{
    config::PeerConfig,
    net::{IpNet, Ipv4Net, split_families},
};

/// How a host's datapath carries traffic: every host of a cluster must say
/// the same.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Mode {
    Native,
    Vxlan { vni: u32, port: u16 },
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mode::Native => write!(f, "native routing"),
            Mode::Vxlan { vni, port } => write!(f, "VXLAN VNI {vni} port {port}"),
        }
    }
}

/// `<prefix>/hosts/<id>`: one host, what its peers need to reach it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostRecord {
    pub id: String,
    /// Its underlay address: next hop (native) or VXLAN remote.
    pub underlay: Ipv4Addr,
    pub mode: Mode,
}

/// `<prefix>/subnets/<address>-<len>`: a container subnet of either family
/// (`10.1.0.0-16`, `fd00:a::-64`) and its host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubnetRecord {
    pub host: String,
}

/// The keys under one prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

/// What a key under the prefix names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyKind {
    Host(String),
    Subnet(IpNet),
    /// Under the prefix but not understood (a bad subnet, an unknown folder).
    Bad(String),
    /// The cluster's subnet pool.
    Pool,
    /// Another cluster setting; not a claim.
    Setting,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.trim_end_matches('/').to_owned(),
        }
    }

    /// `<prefix>/`, what is listed and watched.
    pub fn root(&self) -> String {
        format!("{}/", self.prefix)
    }

    pub fn host(&self, id: &str) -> String {
        format!("{}/hosts/{id}", self.prefix)
    }

    pub fn subnet(&self, n: &IpNet) -> String {
        format!("{}/subnets/{}-{}", self.prefix, n.addr(), n.prefix_len())
    }

    pub fn pool(&self) -> String {
        format!("{}/config/pool", self.prefix)
    }

    pub fn kind(&self, key: &str) -> KeyKind {
        let Some(rest) = key
            .strip_prefix(&self.prefix)
            .and_then(|r| r.strip_prefix('/'))
        else {
            return KeyKind::Bad("not under the prefix".into());
        };
        if let Some(id) = rest.strip_prefix("hosts/") {
            return if valid_host_id(id) {
                KeyKind::Host(id.to_owned())
            } else {
                KeyKind::Bad(format!("`{id}` is not a host id ([A-Za-z0-9._-], 1-64)"))
            };
        }
        if let Some(s) = rest.strip_prefix("subnets/") {
            let Some((a, l)) = s.rsplit_once('-') else {
                return KeyKind::Bad(format!("`{s}` is not <address>-<length>"));
            };
            return match format!("{a}/{l}").parse::<IpNet>() {
                Ok(n) => KeyKind::Subnet(n),
                Err(e) => KeyKind::Bad(e.to_string()),
            };
        }
        if rest == "config/pool" {
            return KeyKind::Pool;
        }
        if rest.starts_with("config/") {
            return KeyKind::Setting;
        }
        KeyKind::Bad("unknown key".into())
    }
}

/// Host ids go into keys: a conservative alphabet.
pub fn valid_host_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// A published host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostEntry {
    pub key: String,
    pub record: HostRecord,
    pub mod_revision: i64,
    pub lease: i64,
}

/// A subnet claim.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    pub key: String,
    pub host: String,
    pub create_revision: i64,
    pub mod_revision: i64,
    pub lease: i64,
}

/// Everything under the prefix, parsed, as of `revision`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct View {
    pub revision: i64,
    pub hosts: BTreeMap<String, HostEntry>,
    /// Both families; an IPv4 subnet sorts before every IPv6 one.
    pub subnets: BTreeMap<IpNet, Claim>,
    /// Keys whose name or value does not parse -> why.
    pub bad: BTreeMap<String, String>,
    /// The subnet pool, once `cluster init` set one.
    #[serde(default)]
    pub pool: Option<super::pool::Pool>,
}

impl View {
    /// From a list of the prefix.
    pub fn from_list(keys: &Keys, kvs: &[Kv], revision: i64) -> Self {
        let mut v = Self {
            revision,
            ..Self::default()
        };
        for k in kvs {
            v.put(keys, k);
        }
        v
    }

    /// Applies watch events; returns whether anything changed.
    pub fn apply(&mut self, keys: &Keys, events: &[Event]) -> bool {
        let before = (self.hosts.len(), self.subnets.len(), self.bad.len());
        let mut changed = false;
        for e in events {
            match e {
                Event::Put(k) => {
                    self.revision = self.revision.max(k.mod_revision);
                    changed |= self.put(keys, k);
                }
                Event::Delete { key } => {
                    changed |= self.bad.remove(key).is_some();
                    match keys.kind(key) {
                        KeyKind::Host(id) => changed |= self.hosts.remove(&id).is_some(),
                        KeyKind::Subnet(n) => changed |= self.subnets.remove(&n).is_some(),
                        KeyKind::Pool => changed |= self.pool.take().is_some(),
                        _ => {}
                    }
                }
            }
        }
        changed || before != (self.hosts.len(), self.subnets.len(), self.bad.len())
    }

    fn put(&mut self, keys: &Keys, k: &Kv) -> bool {
        let bad = |v: &mut Self, why: String| {
            // A key that parsed before and no longer does: forget it.
            match keys.kind(&k.key) {
                KeyKind::Host(id) => {
                    v.hosts.remove(&id);
                }
                KeyKind::Subnet(n) => {
                    v.subnets.remove(&n);
                }
                _ => {}
            }
            v.bad.insert(k.key.clone(), why.clone()) != Some(why)
        };
        match keys.kind(&k.key) {
            KeyKind::Setting => false,
            KeyKind::Pool => match serde_json::from_slice::<super::pool::Pool>(&k.value) {
                Ok(p) => {
                    self.bad.remove(&k.key);
                    self.pool.replace(p) != Some(p)
                }
                Err(e) => bad(self, format!("not a pool: {e}")),
            },
            KeyKind::Bad(why) => bad(self, why),
            KeyKind::Host(id) => match serde_json::from_slice::<HostRecord>(&k.value) {
                Ok(r) if r.id == id => {
                    self.bad.remove(&k.key);
                    let e = HostEntry {
                        key: k.key.clone(),
                        record: r,
                        mod_revision: k.mod_revision,
                        lease: k.lease,
                    };
                    self.hosts.insert(id, e.clone()) != Some(e)
                }
                Ok(r) => bad(self, format!("names host `{}`, not `{id}`", r.id)),
                Err(e) => bad(self, format!("not a host record: {e}")),
            },
            KeyKind::Subnet(n) => match serde_json::from_slice::<SubnetRecord>(&k.value) {
                Ok(r) if valid_host_id(&r.host) => {
                    self.bad.remove(&k.key);
                    let c = Claim {
                        key: k.key.clone(),
                        host: r.host,
                        create_revision: k.create_revision,
                        mod_revision: k.mod_revision,
                        lease: k.lease,
                    };
                    self.subnets.insert(n, c.clone()) != Some(c)
                }
                Ok(r) => bad(self, format!("`{}` is not a host id", r.host)),
                Err(e) => bad(self, format!("not a subnet record: {e}")),
            },
        }
    }
}

/// This host, as the plan needs it.
#[derive(Clone, Debug)]
pub struct Me<'a> {
    pub id: &'a str,
    pub mode: Mode,
    /// The underlay's own addresses.
    pub addrs: &'a [Ipv4Addr],
    /// The underlay's on-link prefixes: in native mode a peer must be on
    /// one, since the kernel route goes via it as a gateway.
    pub onlink: &'a [Ipv4Net],
    /// Whether this host routes IPv6 peer subnets (native routing with the
    /// eBPF datapath): otherwise the other hosts' IPv6 claims are skipped.
    pub ipv6: bool,
}

/// A subnet two hosts want.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conflict {
    pub subnet: IpNet,
    pub host: String,
    /// The subnet and host that hold it (the older claim).
    pub held: IpNet,
    pub holder: String,
}

/// What the store adds to the datapath, and what it leaves out and why.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Other hosts' subnets to route, one entry per host.
    pub peers: Vec<PeerConfig>,
    /// Left out, with the key: one line each, for the log and `status`.
    pub skipped: BTreeMap<String, String>,
    /// Claims that lose to an older overlapping one.
    pub conflicts: Vec<Conflict>,
    /// This host's local subnets that another host holds (or overlaps).
    pub local_conflicts: Vec<Conflict>,
}

/// Turns the view into peers: the oldest claim of overlapping subnets wins;
/// winners of other hosts are routed unless their host is missing, runs
/// another datapath mode, cannot be reached, or they collide with a local
/// subnet or a config peer's, each skipped with a line naming the key.
pub fn plan(view: &View, me: &Me, locals: &BTreeSet<IpNet>, config: &[PeerConfig]) -> Plan {
    let mut p = Plan::default();
    for (key, why) in &view.bad {
        p.skipped
            .insert(key.clone(), format!("etcd key {key}: {why}; skipped"));
    }
    // Oldest first; among the winners so far, one pass keeps the disjoint ones.
    let mut claims: Vec<(&IpNet, &Claim)> = view.subnets.iter().collect();
    claims.sort_by_key(|(n, c)| (c.create_revision, **n));
    // Winners are disjoint, so indexed by first address the only one that can
    // overlap a prefix is the last starting at or before its last address:
    // O(n log n) for the 100 000 routes the map holds. Every IPv4 address
    // sorts before every IPv6 one, so a hit of the other family means none
    // of its own.
    let mut index: BTreeMap<IpAddr, usize> = BTreeMap::new();
    let mut winners: Vec<(IpNet, &Claim)> = Vec::new();
    for (n, c) in claims {
        let hit = index
            .range(..=n.last())
            .next_back()
            .map(|(_, i)| &winners[*i])
            .filter(|(w, _)| w.overlaps(n));
        if let Some((w, wc)) = hit {
            p.conflicts.push(Conflict {
                subnet: *n,
                host: c.host.clone(),
                held: *w,
                holder: wc.host.clone(),
            });
            p.skipped.insert(
                c.key.clone(),
                format!(
                    "etcd key {}: subnet {n} of host {} overlaps {w}, held by host {} since revision {}; not routed until it is freed",
                    c.key, c.host, wc.host, wc.create_revision
                ),
            );
            continue;
        }
        index.insert(n.addr(), winners.len());
        winners.push((*n, c));
    }
    // This host's local subnets held by another host.
    for l in locals {
        if let Some((w, wc)) = winners
            .iter()
            .find(|(w, wc)| w.overlaps(l) && wc.host != me.id)
        {
            p.local_conflicts.push(Conflict {
                subnet: *l,
                host: me.id.to_owned(),
                held: *w,
                holder: wc.host.clone(),
            });
        }
    }
    let mut by_host: BTreeMap<&str, Vec<IpNet>> = BTreeMap::new();
    let skip = |p: &mut Plan, c: &Claim, line: String| {
        p.skipped.insert(
            c.key.clone(),
            format!("etcd key {}: {line}; skipped", c.key),
        );
    };
    for (n, c) in &winners {
        if c.host == me.id {
            continue;
        }
        let Some(h) = view.hosts.get(&c.host) else {
            skip(
                &mut p,
                c,
                format!("subnet {n} names host {}, which has no host record", c.host),
            );
            continue;
        };
        let h = &h.record;
        if h.mode != me.mode {
            skip(
                &mut p,
                c,
                format!(
                    "host {} runs {}, this host {}: mixed datapath modes in one cluster are refused",
                    h.id, h.mode, me.mode
                ),
            );
            continue;
        }
        let u = h.underlay;
        if u.is_unspecified() || u.is_broadcast() || u.is_multicast() || u.is_loopback() {
            skip(
                &mut p,
                c,
                format!(
                    "host {} has underlay address {u}, not a unicast host address",
                    h.id
                ),
            );
            continue;
        }
        if me.addrs.contains(&u) {
            skip(
                &mut p,
                c,
                format!("host {} claims this host's own address {u}", h.id),
            );
            continue;
        }
        if me.mode == Mode::Native && !me.onlink.iter().any(|o| o.contains(u)) {
            skip(
                &mut p,
                c,
                format!(
                    "host {} at {u} is unreachable: native routing needs it on the underlay's subnet",
                    h.id
                ),
            );
            continue;
        }
        if matches!(n, IpNet::V6(_)) && !me.ipv6 {
            skip(
                &mut p,
                c,
                format!(
                    "IPv6 subnet {n} of host {}: this host routes IPv6 only with the eBPF datapath",
                    h.id
                ),
            );
            continue;
        }
        if let Some(l) = locals
            .iter()
            .find(|l| l.overlaps(n) || l.contains(u.into()))
        {
            skip(
                &mut p,
                c,
                format!("subnet {n} of host {} overlaps local subnet {l}", h.id),
            );
            continue;
        }
        if let Some((cp, cn)) = config.iter().find_map(|cp| {
            cp.subnets
                .iter()
                .map(|cn| IpNet::from(*cn))
                .chain(cp.subnets6.iter().map(|cn| IpNet::from(*cn)))
                .find(|cn| cn.overlaps(n))
                .map(|cn| (cp.host, cn))
        }) {
            skip(
                &mut p,
                c,
                format!(
                    "subnet {n} of host {} (etcd) overlaps subnet {cn} of config peer {cp}: a subnet from both sources is refused, remove one",
                    h.id
                ),
            );
            continue;
        }
        if config.iter().any(|cp| n.contains(cp.host)) {
            skip(
                &mut p,
                c,
                format!("subnet {n} of host {} holds a config peer's address", h.id),
            );
            continue;
        }
        by_host.entry(&c.host).or_default().push(*n);
    }
    for (id, mut subnets) in by_host {
        subnets.sort();
        if let Some(h) = view.hosts.get(id) {
            let (subnets, subnets6) = split_families(subnets);
            p.peers.push(PeerConfig {
                host: h.record.underlay.into(),
                subnets,
                subnets6,
            });
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().expect("cidr")
    }

    fn any(s: &str) -> IpNet {
        s.parse().expect("cidr")
    }

    struct Bed {
        keys: Keys,
        kvs: Vec<Kv>,
        rev: i64,
    }

    impl Bed {
        fn new() -> Self {
            Self {
                keys: Keys::new("/xhost/v1"),
                kvs: Vec::new(),
                rev: 1,
            }
        }
        fn put(&mut self, key: String, value: String) {
            self.rev += 1;
            self.kvs.push(Kv {
                key,
                value: value.into_bytes(),
                create_revision: self.rev,
                mod_revision: self.rev,
                lease: 7,
            });
        }
        fn host(&mut self, id: &str, underlay: &str, mode: Mode) {
            let r = HostRecord {
                id: id.into(),
                underlay: underlay.parse().expect("ip"),
                mode,
            };
            let k = self.keys.host(id);
            self.put(k, serde_json::to_string(&r).expect("json"));
        }
        fn claim(&mut self, n: &str, host: &str) {
            let k = self.keys.subnet(&any(n));
            self.put(k, format!("{{\"host\":\"{host}\"}}"));
        }
        fn view(&self) -> View {
            View::from_list(&self.keys, &self.kvs, self.rev)
        }
    }

    const ONLINK: [&str; 1] = ["172.16.91.0/24"];

    fn me_plan(v: &View, locals: &[&str], config: &[PeerConfig]) -> Plan {
        me_plan_ipv6(v, locals, config, true)
    }

    fn me_plan_ipv6(v: &View, locals: &[&str], config: &[PeerConfig], ipv6: bool) -> Plan {
        let onlink: Vec<Ipv4Net> = ONLINK.iter().map(|s| net(s)).collect();
        let addrs = [Ipv4Addr::new(172, 16, 91, 131)];
        let me = Me {
            id: "a",
            mode: Mode::Native,
            addrs: &addrs,
            onlink: &onlink,
            ipv6,
        };
        let locals = locals.iter().map(|s| any(s)).collect();
        plan(v, &me, &locals, config)
    }

    #[test]
    fn routes_other_hosts_and_not_itself() {
        let mut b = Bed::new();
        b.host("a", "172.16.91.131", Mode::Native);
        b.claim("192.168.110.0/24", "a");
        b.host("b", "172.16.91.132", Mode::Native);
        b.claim("192.168.220.0/24", "b");
        b.claim("10.9.0.0/16", "b");
        let p = me_plan(&b.view(), &["192.168.110.0/24"], &[]);
        assert_eq!(
            p.peers,
            [PeerConfig {
                host: "172.16.91.132".parse().expect("ip"),
                subnets: vec![net("10.9.0.0/16"), net("192.168.220.0/24")],
                subnets6: Vec::new(),
            }]
        );
        assert!(p.skipped.is_empty() && p.conflicts.is_empty(), "{p:?}");
    }

    #[test]
    fn the_older_of_overlapping_claims_wins() {
        let mut b = Bed::new();
        b.host("b", "172.16.91.132", Mode::Native);
        b.host("c", "172.16.91.133", Mode::Native);
        b.claim("10.1.0.0/16", "b");
        b.claim("10.1.2.0/24", "c");
        let p = me_plan(&b.view(), &[], &[]);
        assert_eq!(p.peers.len(), 1);
        assert_eq!(p.peers[0].subnets, [net("10.1.0.0/16")]);
        assert_eq!(p.conflicts.len(), 1);
        let line = &p.skipped[&b.keys.subnet(&any("10.1.2.0/24"))];
        assert!(
            line.contains("overlaps 10.1.0.0/16, held by host b"),
            "{line}"
        );
        // A local subnet another host holds.
        let p = me_plan(&b.view(), &["10.1.0.0/16"], &[]);
        assert_eq!(p.local_conflicts[0].holder, "b");
    }

    #[test]
    fn bad_input_is_skipped_with_its_key() {
        let mut b = Bed::new();
        b.host("b", "172.16.91.132", Mode::Native);
        b.put(
            "/xhost/v1/subnets/10.1.0.1-16".into(),
            "{\"host\":\"b\"}".into(),
        );
        b.put("/xhost/v1/subnets/10.2.0.0-16".into(), "garbage".into());
        b.put("/xhost/v1/hosts/x".into(), "{}".into());
        b.host("far", "10.0.0.9", Mode::Native);
        b.claim("10.3.0.0/16", "far");
        b.host("vx", "172.16.91.140", Mode::Vxlan { vni: 1, port: 8472 });
        b.claim("10.4.0.0/16", "vx");
        b.claim("10.5.0.0/16", "ghost");
        b.claim("10.6.0.0/16", "b");
        b.claim("192.168.110.0/25", "b");
        let cfg = [PeerConfig {
            host: "172.16.91.150".parse().expect("ip"),
            subnets: vec![net("10.6.0.0/24")],
            subnets6: Vec::new(),
        }];
        let p = me_plan(&b.view(), &["192.168.110.0/24"], &cfg);
        assert!(p.peers.is_empty(), "{:?}", p.peers);
        let want = [
            ("/xhost/v1/subnets/10.1.0.1-16", "has host bits set"),
            ("/xhost/v1/subnets/10.2.0.0-16", "not a subnet record"),
            ("/xhost/v1/hosts/x", "not a host record"),
            ("/xhost/v1/subnets/10.3.0.0-16", "unreachable"),
            ("/xhost/v1/subnets/10.4.0.0-16", "mixed datapath modes"),
            ("/xhost/v1/subnets/10.5.0.0-16", "no host record"),
            ("/xhost/v1/subnets/10.6.0.0-16", "config peer 172.16.91.150"),
            (
                "/xhost/v1/subnets/192.168.110.0-25",
                "overlaps local subnet",
            ),
        ];
        for (k, w) in want {
            let line = p.skipped.get(k).unwrap_or_else(|| panic!("{k}: {p:?}"));
            assert!(line.contains(w) && line.contains(k), "{line}");
        }
        assert_eq!(p.skipped.len(), want.len(), "{:?}", p.skipped);
    }

    #[test]
    fn events_update_the_view() {
        let mut b = Bed::new();
        b.host("b", "172.16.91.132", Mode::Native);
        let mut v = b.view();
        let key = b.keys.subnet(&any("10.1.0.0/16"));
        let put = Event::Put(Kv {
            key: key.clone(),
            value: b"{\"host\":\"b\"}".to_vec(),
            create_revision: 9,
            mod_revision: 9,
            lease: 7,
        });
        assert!(v.apply(&b.keys, std::slice::from_ref(&put)));
        assert!(
            !v.apply(&b.keys, &[put]),
            "the same put twice changes nothing"
        );
        assert_eq!(v.revision, 9);
        assert_eq!(me_plan(&v, &[], &[]).peers.len(), 1);
        assert!(v.apply(&b.keys, &[Event::Delete { key }]));
        assert!(me_plan(&v, &[], &[]).peers.is_empty());
    }

    #[test]
    fn ipv6_claims_route_to_the_hosts_ipv4_underlay() {
        let mut b = Bed::new();
        b.host("a", "172.16.91.131", Mode::Native);
        b.claim("fd00:a::/64", "a");
        b.host("b", "172.16.91.132", Mode::Native);
        b.claim("fd00:b::/64", "b");
        b.claim("10.9.0.0/16", "b");
        b.claim("fd00:b:1::/48", "b");
        // The key of an IPv6 subnet: its address and length, as for IPv4.
        assert_eq!(
            b.keys.subnet(&any("fd00:b::/64")),
            "/xhost/v1/subnets/fd00:b::-64"
        );
        let p = me_plan(&b.view(), &["fd00:a::/64", "192.168.110.0/24"], &[]);
        assert_eq!(
            p.peers,
            [PeerConfig {
                host: "172.16.91.132".parse().expect("ip"),
                subnets: vec![net("10.9.0.0/16")],
                subnets6: vec![
                    "fd00:b::/64".parse().expect("cidr"),
                    "fd00:b:1::/48".parse().expect("cidr")
                ],
            }]
        );
        assert!(p.skipped.is_empty() && p.conflicts.is_empty(), "{p:?}");
        // A host that does not route IPv6 skips them, one line each, and
        // keeps the IPv4 ones.
        let p = me_plan_ipv6(&b.view(), &[], &[], false);
        assert_eq!(p.peers[0].subnets, [net("10.9.0.0/16")]);
        assert!(p.peers[0].subnets6.is_empty(), "{p:?}");
        let line = &p.skipped["/xhost/v1/subnets/fd00:b::-64"];
        assert!(
            line.contains("IPv6 subnet fd00:b::/64 of host b")
                && line.contains("only with the eBPF datapath"),
            "{line}"
        );
        assert_eq!(p.skipped.len(), 2, "{:?}", p.skipped);
    }

    #[test]
    fn ipv6_claims_follow_the_same_conflict_rules() {
        let mut b = Bed::new();
        b.host("b", "172.16.91.132", Mode::Native);
        b.host("c", "172.16.91.133", Mode::Native);
        b.claim("fd00:1::/48", "b");
        b.claim("fd00:1:0:2::/64", "c");
        // The same bits as an IPv4 claim do not collide across families.
        b.claim("10.1.0.0/16", "c");
        b.claim("fd00:9::/64", "c");
        b.claim("fd00:7::/64", "c");
        let cfg = [PeerConfig {
            host: "172.16.91.150".parse().expect("ip"),
            subnets: Vec::new(),
            subnets6: vec!["fd00:7::/56".parse().expect("cidr")],
        }];
        let p = me_plan(&b.view(), &["fd00:9::/80"], &cfg);
        let six = |h: &str| -> Vec<String> {
            p.peers
                .iter()
                .find(|pc| pc.host.to_string() == h)
                .map(|pc| pc.subnets6.iter().map(|n| n.to_string()).collect())
                .unwrap_or_default()
        };
        assert_eq!(six("172.16.91.132"), ["fd00:1::/48"]);
        assert!(six("172.16.91.133").is_empty(), "{p:?}");
        assert_eq!(
            p.conflicts,
            [Conflict {
                subnet: any("fd00:1:0:2::/64"),
                host: "c".into(),
                held: any("fd00:1::/48"),
                holder: "b".into(),
            }]
        );
        let want = [
            (
                "/xhost/v1/subnets/fd00:1:0:2::-64",
                "overlaps fd00:1::/48, held by host b",
            ),
            (
                "/xhost/v1/subnets/fd00:9::-64",
                "overlaps local subnet fd00:9::/80",
            ),
            (
                "/xhost/v1/subnets/fd00:7::-64",
                "overlaps subnet fd00:7::/56 of config peer 172.16.91.150",
            ),
        ];
        for (k, w) in want {
            let line = p.skipped.get(k).unwrap_or_else(|| panic!("{k}: {p:?}"));
            assert!(line.contains(w) && line.contains(k), "{line}");
        }
        assert_eq!(p.skipped.len(), want.len(), "{:?}", p.skipped);
        assert_eq!(p.peers.iter().map(|pc| pc.subnets.len()).sum::<usize>(), 1);
        // A local IPv6 subnet another host holds.
        let p = me_plan(&b.view(), &["fd00:1:0:5::/64"], &[]);
        assert_eq!(
            (
                p.local_conflicts[0].held,
                p.local_conflicts[0].holder.as_str()
            ),
            (any("fd00:1::/48"), "b")
        );
    }

    #[test]
    fn bad_ipv6_keys_are_skipped_with_their_key() {
        let mut b = Bed::new();
        b.host("b", "172.16.91.132", Mode::Native);
        for k in [
            "fd00:b::1-64",
            "fd00:b::-129",
            "fd00:zz::-64",
            "fd00:b::",
            "fd00:b::-",
        ] {
            b.put(format!("/xhost/v1/subnets/{k}"), "{\"host\":\"b\"}".into());
        }
        b.put("/xhost/v1/subnets/fd00:c::-64".into(), "[1]".into());
        b.put(
            "/xhost/v1/subnets/fd00:d::-64".into(),
            "{\"host\":\"b\",\"family\":6}".into(),
        );
        let p = me_plan(&b.view(), &[], &[]);
        assert!(p.peers.is_empty(), "{:?}", p.peers);
        let want = [
            ("/xhost/v1/subnets/fd00:b::1-64", "has host bits set"),
            ("/xhost/v1/subnets/fd00:b::-129", "0..=128"),
            ("/xhost/v1/subnets/fd00:zz::-64", "not an IPv6 CIDR"),
            ("/xhost/v1/subnets/fd00:b::", "not <address>-<length>"),
            ("/xhost/v1/subnets/fd00:b::-", "not an IPv6 CIDR"),
            ("/xhost/v1/subnets/fd00:c::-64", "not a subnet record"),
            ("/xhost/v1/subnets/fd00:d::-64", "unknown field"),
        ];
        for (k, w) in want {
            let line = p.skipped.get(k).unwrap_or_else(|| panic!("{k}: {p:?}"));
            assert!(line.contains(w) && line.contains(k), "{line}");
        }
        assert_eq!(p.skipped.len(), want.len(), "{:?}", p.skipped);
    }

    /// What an agent of an earlier build wrote (IPv4 claims only, the view
    /// of its snapshot with IPv4 subnets as map keys) reads the same.
    #[test]
    fn records_and_snapshots_of_ipv4_only_agents_still_read() {
        let keys = Keys::new("/xhost/v1");
        let kv = |key: &str, value: &str, rev| Kv {
            key: key.into(),
            value: value.as_bytes().to_vec(),
            create_revision: rev,
            mod_revision: rev,
            lease: 7,
        };
        let v = View::from_list(
            &keys,
            &[
                kv(
                    "/xhost/v1/hosts/b",
                    r#"{"id":"b","underlay":"172.16.91.132","mode":{"kind":"native"}}"#,
                    2,
                ),
                kv("/xhost/v1/subnets/192.168.120.0-24", r#"{"host":"b"}"#, 3),
            ],
            3,
        );
        assert!(v.bad.is_empty(), "{:?}", v.bad);
        let p = me_plan(&v, &[], &[]);
        assert_eq!(p.peers[0].subnets, [net("192.168.120.0/24")]);
        let old = r#"{"revision":3,"hosts":{},"subnets":{"192.168.120.0/24":{"key":"/xhost/v1/subnets/192.168.120.0-24","host":"b","create_revision":3,"mod_revision":3,"lease":7}},"bad":{}}"#;
        let snap: View = serde_json::from_str(old).expect("an older snapshot's view");
        assert_eq!(
            snap.subnets.keys().copied().collect::<Vec<_>>(),
            [any("192.168.120.0/24")]
        );
        // And the view of this build round-trips with both families.
        let mut both = snap.clone();
        both.subnets.insert(
            any("fd00:b::/64"),
            Claim {
                key: keys.subnet(&any("fd00:b::/64")),
                ..snap.subnets[&any("192.168.120.0/24")].clone()
            },
        );
        let text = serde_json::to_string(&both).expect("json");
        assert!(text.contains(r#""192.168.120.0/24":"#) && text.contains(r#""fd00:b::/64":"#));
        assert_eq!(serde_json::from_str::<View>(&text).expect("view"), both);
    }
}
