//! The store as a source of desired state for the agent: starts the
//! session task, and turns each new view (and this host's local subnets)
//! into the peers the single writer programs next to the config's, logging
//! each skipped key once and keeping what `status` shows.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
};

use anyhow::Context as _;
use log::{debug, error, info, warn};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{
    Store as _, StoreError,
    etcd::{Etcd, EtcdOptions},
    sync::{ClusterState, Handle, StoreStatus, SyncSettings, read_snapshot},
    view::{HostRecord, Keys, Me, Mode, View, plan},
};
use crate::{
    config::{ClusterSettings, DatapathArg, PeerConfig, Settings},
    layout::Layout,
    net::{IpNet, Ipv4Net},
};

/// One host as `status` and `cluster hosts` show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterHost {
    pub id: String,
    pub underlay: Ipv4Addr,
    pub mode: Mode,
    pub this_host: bool,
    /// Subnets it claims, IPv4 first.
    pub subnets: Vec<IpNet>,
    /// Of those, what this host routes to it.
    pub routed: Vec<IpNet>,
}

/// The cluster section of the state file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterReport {
    pub store: StoreStatus,
    pub hosts: Vec<ClusterHost>,
    /// Subnets wanted by two hosts, as lines.
    pub conflicts: Vec<String>,
    /// Keys left out, one line each.
    pub skipped: Vec<String>,
}

/// The running store source.
pub struct ClusterSource {
    handle: Handle,
    snapshot: std::path::PathBuf,
    id: String,
    mode: Mode,
    /// Whether this host routes (and so publishes) IPv6 subnets.
    ipv6: bool,
    iface: String,
    /// Inputs of the last plan: view version, locals, config peers, IPv6.
    planned: Option<(u64, BTreeSet<IpNet>, Vec<PeerConfig>, bool)>,
    peers: Vec<PeerConfig>,
    /// Lines logged for the current problems (each logged once).
    logged: BTreeMap<String, String>,
    pub report: ClusterReport,
}

/// How long the start check waits for the store before leaving the
/// checks to the session (an unreachable store is retried, not fatal).
const START_CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// What an agent joining the cluster must not meet in the store at start:
/// a host of another datapath mode (mixed modes are refused), or a subnet
/// that a config peer also routes (a subnet from both sources is an error).
/// One line naming both sides; this host's own keys are not held against it.
pub fn check_start(
    view: &View,
    keys: &Keys,
    id: &str,
    mode: Mode,
    config: &[PeerConfig],
) -> Result<(), String> {
    if let Some(h) = view
        .hosts
        .values()
        .find(|h| h.record.id != id && h.record.mode != mode)
    {
        return Err(format!(
            "the cluster's host {} ({}, {}) runs {}, this agent {mode}: mixed datapath modes in one cluster are refused; start this agent with the cluster's --tunnel/--vni/--vxlan-port",
            h.record.id, h.record.underlay, h.key, h.record.mode
        ));
    }
    for p in config {
        let subnets = p.subnets.iter().map(|n| IpNet::from(*n));
        for n in &subnets
            .chain(p.subnets6.iter().map(|n| IpNet::from(*n)))
            .collect::<Vec<_>>()
        {
            if let Some((held, c)) = view
                .subnets
                .iter()
                .find(|(held, c)| c.host != id && held.overlaps(n))
            {
                return Err(format!(
                    "config peer {} routes {n}, and the cluster store has {held} of host {} ({}): a subnet from both sources is an error; remove one",
                    p.host,
                    c.host,
                    keys.subnet(held)
                ));
            }
        }
    }
    Ok(())
}

/// Lists the store once for [`check_start`]; `Ok(None)` when the store does
/// not answer within [`START_CHECK_TIMEOUT`] (the session retries it).
/// Refused credentials are left to the session too, which logs them once.
async fn list_view(opts: &EtcdOptions, keys: &Keys) -> Option<View> {
    let list = async {
        let mut st = Etcd::connect(opts).await?;
        st.list(&keys.root()).await
    };
    match tokio::time::timeout(START_CHECK_TIMEOUT, list).await {
        Ok(Ok((kvs, rev))) => Some(View::from_list(keys, &kvs, rev)),
        Ok(Err(e)) => {
            debug!("etcd at start: {e}; the start checks wait for the session");
            None
        }
        Err(_) => None,
    }
}

/// `unload` of an agent that did not exit cleanly (SIGKILLed): revokes the
/// lease its snapshot names, so the other hosts drop its routes at once
/// rather than when the lease expires, and removes the snapshot. `Ok(None)`:
/// no snapshot with a lease. A store that cannot be reached is an error; the
/// snapshot then stays (a restart still routes from it).
pub async fn revoke_left_lease(layout: &Layout) -> anyhow::Result<Option<String>> {
    let path = layout.cluster_snapshot();
    let Some(snap) = super::sync::read_any_snapshot(&path) else {
        return Ok(None);
    };
    let (Some(lease), Some(mut opts)) = (snap.lease, snap.etcd) else {
        let _ = std::fs::remove_file(&path);
        return Ok(None);
    };
    opts.password = std::env::var("XHOST_ETCD_PASSWORD").ok();
    let revoke = async {
        let mut st = Etcd::connect(&opts).await?;
        st.revoke(lease).await
    };
    let res = tokio::time::timeout(START_CHECK_TIMEOUT, revoke)
        .await
        .unwrap_or_else(|_| {
            Err(StoreError::Failed {
                what: "revoking the lease",
                message: format!("no answer within {START_CHECK_TIMEOUT:?}"),
            })
        });
    let line = match res {
        Ok(()) => format!(
            "etcd: lease {lease:x} of host {} revoked; the other hosts drop its routes now",
            snap.host_id
        ),
        Err(StoreError::Failed { message, .. }) if message.contains("lease not found") => {
            format!(
                "etcd: lease {lease:x} of host {} had already expired",
                snap.host_id
            )
        }
        Err(e) => anyhow::bail!(
            "etcd {}: {e}; lease {lease:x} of host {} not revoked (the other hosts drop it when it expires)",
            opts.endpoints.join(","),
            snap.host_id
        ),
    };
    let _ = std::fs::remove_file(&path);
    Ok(Some(line))
}

/// `cluster hosts`: the cluster as the store holds it now, read directly
/// (no agent needed). `host_id` marks that host as this one.
pub async fn read_cluster(c: &ClusterSettings) -> anyhow::Result<ClusterReport> {
    let keys = Keys::new(&c.prefix);
    let fail = |e: StoreError| anyhow::anyhow!("etcd {}: {e}", c.etcd.endpoints.join(","));
    let mut st = Etcd::connect(&c.etcd).await.map_err(fail)?;
    let (kvs, rev) = st.list(&keys.root()).await.map_err(fail)?;
    let view = View::from_list(&keys, &kvs, rev);
    let id = c.host_id.as_deref().unwrap_or("");
    // Only the claims' order matters for conflicts, not who looks.
    let me = Me {
        id,
        mode: Mode::Native,
        addrs: &[],
        onlink: &[],
        ipv6: true,
    };
    let p = plan(&view, &me, &BTreeSet::new(), &[]);
    let mut report = ClusterReport {
        store: StoreStatus {
            endpoints: c.etcd.endpoints.clone(),
            prefix: c.prefix.clone(),
            host_id: id.to_owned(),
            connected: true,
            lease_ttl: c.lease_ttl,
            revision: rev,
            ..StoreStatus::default()
        },
        ..ClusterReport::default()
    };
    let mut hosts: BTreeMap<&str, ClusterHost> = view
        .hosts
        .iter()
        .map(|(hid, h)| {
            (
                hid.as_str(),
                ClusterHost {
                    id: hid.clone(),
                    underlay: h.record.underlay,
                    mode: h.record.mode,
                    this_host: hid == id,
                    subnets: Vec::new(),
                    routed: Vec::new(),
                },
            )
        })
        .collect();
    let losers: BTreeSet<IpNet> = p.conflicts.iter().map(|c| c.subnet).collect();
    for (n, claim) in &view.subnets {
        if let Some(h) = hosts.get_mut(claim.host.as_str()) {
            h.subnets.push(*n);
            if !losers.contains(n) {
                h.routed.push(*n);
            }
        }
    }
    report.hosts = hosts.into_values().collect();
    report.conflicts = p
        .conflicts
        .iter()
        .map(|c| {
            format!(
                "subnet {} of host {} overlaps {} held by host {}",
                c.subnet, c.host, c.held, c.holder
            )
        })
        .collect();
    // Keys nobody routes: bad ones, claims naming a host with no record.
    report.skipped = view
        .bad
        .iter()
        .map(|(k, why)| format!("etcd key {k}: {why}; skipped"))
        .chain(
            view.subnets
                .iter()
                .filter(|(_, claim)| !view.hosts.contains_key(&claim.host))
                .map(|(n, claim)| {
                    format!(
                        "etcd key {}: subnet {n} names host {}, which has no host record; skipped",
                        claim.key, claim.host
                    )
                }),
        )
        .collect();
    Ok(report)
}

impl ClusterSource {
    /// Starts following the store. `underlay` is this host's address. A
    /// store that answers at once is checked first ([`check_start`]):
    /// refused, nothing is claimed (and the caller has attached nothing).
    pub async fn start(
        c: &ClusterSettings,
        s: &Settings,
        layout: &Layout,
        underlay: Ipv4Addr,
    ) -> anyhow::Result<Self> {
        let id = c.host_id.clone().unwrap_or_else(|| underlay.to_string());
        let mode = match s.tunnel {
            None => Mode::Native,
            Some(v) => Mode::Vxlan {
                vni: v.vni,
                port: v.port,
            },
        };
        let keys = Keys::new(&c.prefix);
        if let Some(view) = list_view(&c.etcd, &keys).await {
            check_start(&view, &keys, &id, mode, &s.peers).map_err(anyhow::Error::msg)?;
        }
        let plain = c.etcd.plaintext_endpoints();
        if !plain.is_empty() {
            warn!(
                "etcd {} is reached without TLS: anyone on the path can read and forge the cluster's routes; give https:// endpoints with --etcd-cafile/--etcd-certfile/--etcd-keyfile",
                plain.join(",")
            );
        }
        let settings = SyncSettings {
            keys: Keys::new(&c.prefix),
            prefix: c.prefix.clone(),
            host: HostRecord {
                id: id.clone(),
                underlay,
                mode,
            },
            ttl: c.lease_ttl,
            endpoints: c.etcd.endpoints.clone(),
            etcd: c.etcd.clone(),
            snapshot: layout.cluster_snapshot(),
            pool_network: s.docker.then(|| super::pool::PoolNetwork {
                docker_host: s.docker_host.clone(),
                name: c.pool_network.clone(),
            }),
        };
        let snapshot = settings.snapshot.clone();
        let snap = read_snapshot(&snapshot, &id);
        let mut initial = ClusterState::default();
        initial.status.endpoints = c.etcd.endpoints.clone();
        initial.status.prefix = c.prefix.clone();
        initial.status.host_id = id.clone();
        initial.status.lease_ttl = c.lease_ttl;
        let lease = snap.as_ref().and_then(|s| s.lease);
        if let Some(s) = snap {
            info!(
                "etcd: routing from the last-known snapshot ({} host(s), revision {}) until the store answers",
                s.view.hosts.len(),
                s.view.revision
            );
            initial.status.revision = s.view.revision;
            initial.status.from_snapshot = true;
            initial.view = Arc::new(s.view);
            initial.view_version = 1;
        }
        let opts = c.etcd.clone();
        std::fs::create_dir_all(&layout.run_dir)
            .with_context(|| format!("creating {}", layout.run_dir.display()))?;
        let handle = Handle::start(
            move || {
                let opts = opts.clone();
                async move { Etcd::connect(&opts).await }
            },
            settings,
            initial,
            lease,
        );
        Ok(Self {
            handle,
            snapshot,
            id,
            mode,
            ipv6: s.datapath != DatapathArg::Kernel,
            iface: s.iface.clone(),
            planned: None,
            peers: Vec::new(),
            logged: BTreeMap::new(),
            report: ClusterReport::default(),
        })
    }

    /// A receiver that wakes the agent when the store's state changes.
    pub fn subscribe(&self) -> watch::Receiver<ClusterState> {
        self.handle.state.clone()
    }

    /// This host's local subnets: claimed in the store. IPv6 ones only
    /// where this host routes IPv6 (the others could not answer them).
    pub fn set_locals(&self, mut locals: BTreeSet<IpNet>) {
        if !self.ipv6 {
            locals.retain(|n| matches!(n, IpNet::V4(_)));
        }
        self.handle.set_locals(locals);
    }

    /// The datapath turned out not to route IPv6 (the kernel's, as a
    /// fallback): the other hosts' IPv6 subnets are skipped, and this
    /// host's are not published.
    pub fn without_ipv6(&mut self) {
        self.ipv6 = false;
    }

    /// The other hosts' subnets to route, given this host's local subnets
    /// and the config's peers; `None` when they are what they were.
    pub fn peers(
        &mut self,
        locals: &BTreeSet<IpNet>,
        config: &[PeerConfig],
    ) -> Option<Vec<PeerConfig>> {
        let state = self.handle.state.borrow().clone();
        self.report.store = state.status.clone();
        let inputs = (
            state.view_version,
            locals.clone(),
            config.to_vec(),
            self.ipv6,
        );
        if self.planned.as_ref() == Some(&inputs) {
            return None;
        }
        let subnets = crate::net::ipv4_subnets(&self.iface).unwrap_or_default();
        let addrs: Vec<Ipv4Addr> = subnets.iter().map(|(a, _)| *a).collect();
        let onlink: Vec<Ipv4Net> = subnets.iter().map(|(_, n)| *n).collect();
        let me = Me {
            id: &self.id,
            mode: self.mode,
            addrs: &addrs,
            onlink: &onlink,
            ipv6: self.ipv6,
        };
        let p = plan(&state.view, &me, locals, config);
        // Each problem logged once, while it lasts.
        self.logged.retain(|k, _| p.skipped.contains_key(k));
        for (k, line) in &p.skipped {
            if self.logged.get(k) != Some(line) {
                error!("{line}");
                self.logged.insert(k.clone(), line.clone());
            }
        }
        let mut conflicts: Vec<String> = p
            .local_conflicts
            .iter()
            .map(|c| {
                format!(
                    "local subnet {} overlaps {} held by host {}: not routed between them; give this host another subnet (Docker: --bip, or a network's --subnet; or a cluster pool)",
                    c.subnet, c.held, c.holder
                )
            })
            .collect();
        for line in &conflicts {
            if !self.logged.contains_key(line) {
                error!("{line}");
                self.logged.insert(line.clone(), line.clone());
            }
        }
        conflicts.extend(p.conflicts.iter().map(|c| {
            format!(
                "subnet {} of host {} overlaps {} held by host {}",
                c.subnet, c.host, c.held, c.holder
            )
        }));
        let routed: BTreeSet<(IpAddr, IpNet)> = p
            .peers
            .iter()
            .flat_map(|pc| {
                let v4 = pc.subnets.iter().map(|n| IpNet::from(*n));
                v4.chain(pc.subnets6.iter().map(|n| IpNet::from(*n)))
                    .map(move |n| (pc.host, n))
            })
            .collect();
        let mut hosts: BTreeMap<&str, ClusterHost> = state
            .view
            .hosts
            .iter()
            .map(|(id, h)| {
                (
                    id.as_str(),
                    ClusterHost {
                        id: id.clone(),
                        underlay: h.record.underlay,
                        mode: h.record.mode,
                        this_host: *id == self.id,
                        subnets: Vec::new(),
                        routed: Vec::new(),
                    },
                )
            })
            .collect();
        for (n, c) in &state.view.subnets {
            if let Some(h) = hosts.get_mut(c.host.as_str()) {
                h.subnets.push(*n);
                if routed.contains(&(IpAddr::V4(h.underlay), *n)) {
                    h.routed.push(*n);
                }
            }
        }
        self.report.hosts = hosts.into_values().collect();
        self.report.conflicts = conflicts;
        self.report.skipped = p.skipped.into_values().collect();
        self.planned = Some(inputs);
        if p.peers == self.peers {
            return None;
        }
        self.peers = p.peers.clone();
        Some(p.peers)
    }

    /// The peers of the last plan.
    pub fn current(&self) -> &[PeerConfig] {
        &self.peers
    }

    /// Exit leaving the datapath: the lease is not revoked, the snapshot
    /// (with the lease id) stays for the next agent.
    pub async fn leave(self) {
        self.handle.leave().await;
    }

    /// Clean exit: revokes the lease; the snapshot goes too (the datapath
    /// it fed is unloaded).
    pub async fn stop(self) {
        self.handle.stop().await;
        let _ = std::fs::remove_file(&self.snapshot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::view::{Claim, HostEntry};

    fn view() -> (View, Keys) {
        let keys = Keys::new("/xhost/v1");
        let mut v = View::default();
        for (id, underlay, mode) in [
            ("a", "10.0.0.1", Mode::Native),
            ("v", "10.0.0.2", Mode::Vxlan { vni: 1, port: 8472 }),
        ] {
            v.hosts.insert(
                id.into(),
                HostEntry {
                    key: keys.host(id),
                    record: HostRecord {
                        id: id.into(),
                        underlay: underlay.parse().expect("addr"),
                        mode,
                    },
                    mod_revision: 1,
                    lease: 1,
                },
            );
        }
        let n: IpNet = "10.66.0.0/16".parse().expect("cidr");
        v.subnets.insert(
            n,
            Claim {
                key: keys.subnet(&n),
                host: "a".into(),
                create_revision: 2,
                mod_revision: 2,
                lease: 1,
            },
        );
        (v, keys)
    }

    #[test]
    fn start_refuses_mixed_modes_and_config_peers_in_the_store() {
        let (mut v, keys) = view();
        let e = check_start(&v, &keys, "me", Mode::Native, &[]).expect_err("mixed");
        assert!(
            e.contains("host v (10.0.0.2, /xhost/v1/hosts/v) runs VXLAN VNI 1 port 8472, this agent native routing"),
            "{e}"
        );
        // This host's own record, in whatever mode it ran before, is not held against it.
        assert!(check_start(&v, &keys, "v", Mode::Native, &[]).is_ok());
        v.hosts.remove("v");
        let peer: PeerConfig = "10.0.0.9=10.66.3.0/24".parse().expect("peer");
        let e = check_start(&v, &keys, "me", Mode::Native, std::slice::from_ref(&peer))
            .expect_err("peer");
        assert!(
            e.contains("config peer 10.0.0.9 routes 10.66.3.0/24")
                && e.contains("10.66.0.0/16 of host a (/xhost/v1/subnets/10.66.0.0-16)"),
            "{e}"
        );
        // Its own claims are this host's, not another source's.
        assert!(check_start(&v, &keys, "a", Mode::Native, &[peer]).is_ok());
        let other: PeerConfig = "10.0.0.9=10.67.0.0/16".parse().expect("peer");
        assert!(check_start(&v, &keys, "me", Mode::Native, &[other]).is_ok());
    }
}
