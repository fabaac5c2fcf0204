//! The bridges' ARP entries of endpoints the agent just wrote.

use std::collections::BTreeMap;

use log::{info, warn};

use crate::{
    net::fmt_mac,
    netlink::{NUD_ADMIN, NUD_USABLE, Neigh, Rtnl},
    plan::Neighbour,
};

/// What a bridge's ARP table needs for an endpoint whose MAC is known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NeighbourFix {
    /// A usable entry with that MAC is there.
    Keep,
    /// Missing, unresolved (INCOMPLETE, FAILED) or another MAC: write it.
    Write,
    /// An administrator's static entry (PERMANENT, NOARP) says otherwise.
    LeaveAdmin,
}

fn neighbour_fix(existing: Option<&Neigh>, mac: [u8; 6]) -> NeighbourFix {
    match existing {
        Some(n) if n.state & NUD_USABLE != 0 && n.lladdr == Some(mac) => NeighbourFix::Keep,
        Some(n) if n.state & NUD_ADMIN != 0 => NeighbourFix::LeaveAdmin,
        _ => NeighbourFix::Write,
    }
}

/// Tells each bridge's ARP table the MAC of the endpoints just written.
/// Until the agent knows an endpoint, the datapath hands packets for it to
/// the kernel (`bpf_redirect_neigh`), and after a container (re)starts they
/// wait on an unresolved entry until the next ARP probe is answered, up to a
/// second; the written entry sends them at once. Best effort: the datapath
/// itself does not use these entries.
pub fn settle(rtnl: &mut Rtnl, written: &[Neighbour]) {
    let mut tables: BTreeMap<u32, Vec<Neigh>> = BTreeMap::new();
    for Neighbour {
        ip,
        mac,
        bridge,
        bridge_ifindex: index,
    } in written
    {
        if !tables.contains_key(index) {
            match rtnl.ipv4_neighbours(*index) {
                Ok(t) => tables.insert(*index, t),
                Err(e) => {
                    warn!("endpoint {ip}: reading the neighbours of {bridge}: {e}");
                    continue;
                }
            };
        }
        let existing = tables
            .get(index)
            .and_then(|t| t.iter().find(|n| n.dst == Some(*ip)));
        match neighbour_fix(existing, *mac) {
            NeighbourFix::Keep => {}
            NeighbourFix::LeaveAdmin => warn!(
                "endpoint {ip}: {bridge} has a static neighbour entry with another MAC; left as it is"
            ),
            NeighbourFix::Write => match rtnl.set_neighbour(*index, *ip, *mac) {
                Ok(()) => info!(
                    "endpoint {ip}: neighbour on {bridge} set to {}",
                    fmt_mac(mac)
                ),
                Err(e) => warn!("endpoint {ip}: writing its neighbour entry on {bridge}: {e}"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn neighbour_entries_are_written_unless_usable_or_static() {
        let mac = [2, 0x42, 192, 168, 110, 7];
        let other = [2, 0x42, 192, 168, 110, 8];
        let entry = |state: u16, lladdr: Option<[u8; 6]>| Neigh {
            ifindex: 3,
            state,
            dst: Some(Ipv4Addr::new(192, 168, 110, 7)),
            lladdr,
            ..Neigh::default()
        };
        let fix = |n: Option<Neigh>| neighbour_fix(n.as_ref(), mac);
        assert_eq!(fix(None), NeighbourFix::Write, "missing");
        assert_eq!(
            fix(Some(entry(0x01, None))),
            NeighbourFix::Write,
            "INCOMPLETE"
        );
        assert_eq!(
            fix(Some(entry(0x20, Some(mac)))),
            NeighbourFix::Write,
            "FAILED"
        );
        for usable in [0x02, 0x04, 0x08, 0x10, 0x80] {
            assert_eq!(
                fix(Some(entry(usable, Some(mac)))),
                NeighbourFix::Keep,
                "{usable:#x}"
            );
        }
        assert_eq!(
            fix(Some(entry(0x04, Some(other)))),
            NeighbourFix::Write,
            "a STALE entry of the address's previous owner"
        );
        assert_eq!(
            fix(Some(entry(0x80, Some(other)))),
            NeighbourFix::LeaveAdmin,
            "PERMANENT"
        );
        assert_eq!(
            fix(Some(entry(0x40, None))),
            NeighbourFix::LeaveAdmin,
            "NOARP"
        );
    }
}
