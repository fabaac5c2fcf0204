//! The store as a source of desired state for the agent: starts the
//! session task, and turns each new view (and this host's local subnets)
//! into the peers the single writer programs next to the config's, logging
//! each skipped key once and keeping what `status` shows.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    sync::Arc,
};

use anyhow::Context as _;
use log::{error, info, warn};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{
    etcd::Etcd,
    sync::{ClusterState, Handle, StoreStatus, SyncSettings, read_snapshot},
    view::{HostRecord, Keys, Me, Mode, plan},
};
use crate::{
    config::{ClusterSettings, PeerConfig, Settings},
    layout::Layout,
    net::Ipv4Net,
};

/// One host as `status` and `cluster hosts` show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterHost {
    pub id: String,
    pub underlay: Ipv4Addr,
    pub mode: Mode,
    pub this_host: bool,
    /// Subnets it claims.
    pub subnets: Vec<Ipv4Net>,
    /// Of those, what this host routes to it.
    pub routed: Vec<Ipv4Net>,
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
    iface: String,
    /// Inputs of the last plan: view version, locals, config peers.
    planned: Option<(u64, BTreeSet<Ipv4Net>, Vec<PeerConfig>)>,
    peers: Vec<PeerConfig>,
    /// Lines logged for the current problems (each logged once).
    logged: BTreeMap<String, String>,
    pub report: ClusterReport,
}

impl ClusterSource {
    /// Starts following the store. `underlay` is this host's address.
    pub fn start(
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

    /// This host's local subnets: claimed in the store.
    pub fn set_locals(&self, locals: BTreeSet<Ipv4Net>) {
        self.handle.set_locals(locals);
    }

    /// The other hosts' subnets to route, given this host's local subnets
    /// and the config's peers; `None` when they are what they were.
    pub fn peers(
        &mut self,
        locals: &BTreeSet<Ipv4Net>,
        config: &[PeerConfig],
    ) -> Option<Vec<PeerConfig>> {
        let state = self.handle.state.borrow().clone();
        self.report.store = state.status.clone();
        let inputs = (state.view_version, locals.clone(), config.to_vec());
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
        let routed: BTreeSet<(Ipv4Addr, Ipv4Net)> = p
            .peers
            .iter()
            .flat_map(|pc| pc.subnets.iter().map(move |n| (pc.host, *n)))
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
                if routed.contains(&(h.underlay, *n)) {
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

    /// Clean exit: revokes the lease; the snapshot goes too (the datapath
    /// it fed is unloaded).
    pub async fn stop(self) {
        self.handle.stop().await;
        let _ = std::fs::remove_file(&self.snapshot);
    }
}
