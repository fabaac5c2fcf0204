//! Kernel facts as a source: endpoints on bridges Docker does not manage
//! (from the bridge's neighbour and FDB tables), and the interface facts
//! (ifindex, MAC, name) the plan needs about what the other sources name.

use std::collections::BTreeMap;

use crate::{
    net::{self, Ipv4Net},
    netlink::{NUD_USABLE, Rtnl},
    plan::{BridgeFacts, EndpointSpec, KernelFacts},
};

/// Endpoints on bridges Docker does not manage, from the kernel: the
/// bridge's IPv4 neighbours (IP -> MAC, learned when a container ARPs for
/// its gateway) joined with its learned FDB (MAC -> port). Only veth ports
/// qualify: `bpf_redirect_peer` delivers into a veth's peer.
pub fn endpoints(bridges: &[(String, Vec<Ipv4Net>)]) -> std::io::Result<Vec<EndpointSpec>> {
    if bridges.is_empty() {
        return Ok(Vec::new());
    }
    let mut rtnl = Rtnl::open()?;
    let links = rtnl.links()?;
    let mut out = Vec::new();
    for (bridge, nets) in bridges {
        let Some(br) = links.iter().find(|l| l.name == *bridge) else {
            continue;
        };
        let fdb = rtnl.fdb_learned(br.index)?;
        for n in rtnl.ipv4_neighbours(br.index)? {
            let (Some(ip), Some(mac)) = (n.dst, n.lladdr) else {
                continue;
            };
            if n.state & NUD_USABLE == 0 || !nets.iter().any(|net| net.contains(ip)) {
                continue;
            }
            let Some(port) = fdb
                .iter()
                .find(|f| f.lladdr == Some(mac))
                .map(|f| f.ifindex)
            else {
                continue;
            };
            let is_veth = links
                .iter()
                .any(|l| l.index == port && l.kind.as_deref() == Some("veth"));
            if is_veth {
                out.push(EndpointSpec {
                    ip,
                    ip6: None,
                    mac,
                    host_ifindex: port,
                    bridge: bridge.clone(),
                });
            }
        }
    }
    Ok(out)
}

/// The kernel's facts about `bridges` and the endpoints' veths: which
/// exist, their ifindex and name, and the MAC of each bridge an endpoint
/// sits on (its gateway MAC).
pub fn facts<'a>(
    bridges: impl IntoIterator<Item = &'a str>,
    endpoints: &[EndpointSpec],
) -> KernelFacts {
    let mut f = KernelFacts::default();
    for b in bridges {
        if f.bridges.contains_key(b) {
            continue;
        }
        let Ok(ifindex) = net::ifindex(b) else {
            continue;
        };
        let mac = endpoints
            .iter()
            .any(|e| e.bridge == b)
            .then(|| net::mac_of(b).map_err(|e| e.to_string()));
        f.bridges.insert(b.to_owned(), BridgeFacts { ifindex, mac });
    }
    let mut ports = BTreeMap::new();
    for e in endpoints {
        if let Some(name) = ifname(e.host_ifindex) {
            ports.insert(e.host_ifindex, name);
        }
    }
    f.ports = ports;
    f
}

/// Name of the interface with `index` in this netns.
fn ifname(index: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: the buffer holds IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    Some(
        unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned(),
    )
}
