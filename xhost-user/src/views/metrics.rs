//! The Prometheus view (`--metrics-addr`): `/metrics` in the OpenMetrics
//! text format, built on each scrape from what the datapath holds (its
//! pinned maps: `STATS`, entries and capacity of each table) and what the
//! agent last applied (its state file). It reads; it never writes.

use std::{convert::Infallible, net::SocketAddr, sync::atomic::AtomicU64};

use anyhow::Context as _;
use aya::maps::{HashMap, LpmTrie, MapData, MapInfo};
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::{ALLOW, CONTENT_TYPE},
};
use hyper_util::rt::TokioIo;
use log::{debug, info, warn};
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge, info::Info},
    registry::{Registry, Unit},
};
use xhost_common::{
    MAP_ENDPOINTS, MAP_ENDPOINTS6, MAP_LOCAL_NETS, MAP_LOCAL_NETS6, MAP_PEER_HOSTS,
    MAP_PEER_HOSTS6, MAP_ROUTES, MAP_ROUTES6, MAP_UNDERLAY_ADDRS,
};

use crate::{
    layout::Layout,
    report::{AgentState, Attachment, CounterRow, PeerCounterRow, read_peer_counters},
};

/// The OpenMetrics text format, as Prometheus asks for it.
const CONTENT_TYPE_OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug, thiserror::Error)]
#[error("metrics address {addr} cannot be bound")]
pub struct BindError {
    addr: SocketAddr,
    #[source]
    source: std::io::Error,
}

/// Binds the metrics address. Called before anything is attached, so an
/// address in use (or not local) refuses the load with nothing to undo.
pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, BindError> {
    let err = |source| BindError { addr, source };
    let l = std::net::TcpListener::bind(addr).map_err(err)?;
    l.set_nonblocking(true).map_err(err)?;
    Ok(l)
}

/// Serves `/metrics` on `listener` until the task is dropped.
pub async fn serve(listener: std::net::TcpListener, layout: Layout) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            warn!("metrics: cannot serve: {e}");
            return;
        }
    };
    if let Ok(a) = listener.local_addr() {
        info!("metrics: serving http://{a}/metrics");
    }
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of file descriptors and the like: wait, do not spin.
                warn!("metrics: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let layout = layout.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| respond(req, layout.clone()));
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                debug!("metrics: connection: {e}");
            }
        });
    }
}

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(CONTENT_TYPE, v);
    }
    r
}

async fn respond(
    req: Request<Incoming>,
    layout: Layout,
) -> Result<Response<Full<Bytes>>, Infallible> {
    const TEXT: &str = "text/plain; charset=utf-8";
    if req.uri().path() != "/metrics" {
        return Ok(reply(StatusCode::NOT_FOUND, TEXT, "try /metrics\n".into()));
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = reply(StatusCode::METHOD_NOT_ALLOWED, TEXT, String::new());
        r.headers_mut()
            .insert(ALLOW, hyper::header::HeaderValue::from_static("GET, HEAD"));
        return Ok(r);
    }
    // Map reads are syscalls: off the agent's (single-threaded) runtime.
    let body = tokio::task::spawn_blocking(move || Snapshot::read(&layout).map(|s| s.encode()))
        .await
        .context("metrics task")
        .and_then(|r| r);
    Ok(match body {
        Ok(text) => reply(StatusCode::OK, CONTENT_TYPE_OPENMETRICS, text),
        Err(e) => {
            warn!("metrics: {e:#}");
            reply(StatusCode::INTERNAL_SERVER_ERROR, TEXT, format!("{e:#}\n"))
        }
    })
}

/// How full one of the datapath's tables is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapFill {
    pub name: &'static str,
    pub entries: u64,
    pub capacity: u64,
}

/// Everything one scrape reports.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// `STATS` summed over CPUs, by `stat::NAMES`.
    pub counters: std::collections::BTreeMap<String, CounterRow>,
    /// `PEER_STATS` by peer host.
    pub peers: Vec<PeerCounterRow>,
    pub maps: Vec<MapFill>,
    pub attached: Vec<Attachment>,
    /// The agent's state file (absent for a datapath no agent describes).
    pub agent: Option<AgentState>,
}

/// `stat::NAMES` are `<verdict>_<reason>`: `fwd_egress`, `drop_spoofed`,
/// `reject_sent` (answers to refused packets), ...
fn verdict_reason(name: &str) -> (&str, &str) {
    name.split_once('_').unwrap_or((name, ""))
}

fn count_lpm<V: aya::Pod>(layout: &Layout, name: &'static str) -> anyhow::Result<u64> {
    count_lpm_keyed::<[u8; 4], V>(layout, name)
}

fn count_lpm6<V: aya::Pod>(layout: &Layout, name: &'static str) -> anyhow::Result<u64> {
    count_lpm_keyed::<[u8; 16], V>(layout, name)
}

fn count_lpm_keyed<K: aya::Pod, V: aya::Pod>(
    layout: &Layout,
    name: &'static str,
) -> anyhow::Result<u64> {
    let m: LpmTrie<MapData, K, V> = crate::datapath::open_pinned(layout, name)
        .and_then(TryInto::try_into)
        .with_context(|| format!("opening {name}"))?;
    let mut n = 0;
    for k in m.keys() {
        k.with_context(|| format!("reading {name}"))?;
        n += 1;
    }
    Ok(n)
}

/// `ROUTES6`'s entries, pinned by this build (`Peer6` values) or by one
/// before IPv6 underlay addresses (`Peer`), until a load converts them.
fn count_routes6(layout: &Layout, name: &'static str) -> anyhow::Result<u64> {
    let value_size = MapInfo::from_pin(layout.map(name))
        .with_context(|| format!("reading {name}'s info"))?
        .value_size();
    if value_size == std::mem::size_of::<xhost_common::Peer>() as u32 {
        count_lpm6::<xhost_common::Peer>(layout, name)
    } else {
        count_lpm6::<xhost_common::Peer6>(layout, name)
    }
}

fn count_hash<V: aya::Pod>(layout: &Layout, name: &'static str) -> anyhow::Result<u64> {
    count_hash_keyed::<[u8; 4], V>(layout, name)
}

fn count_hash6<V: aya::Pod>(layout: &Layout, name: &'static str) -> anyhow::Result<u64> {
    count_hash_keyed::<[u8; 16], V>(layout, name)
}

fn count_hash_keyed<K: aya::Pod, V: aya::Pod>(
    layout: &Layout,
    name: &'static str,
) -> anyhow::Result<u64> {
    let m: HashMap<MapData, K, V> = crate::datapath::open_pinned(layout, name)
        .and_then(TryInto::try_into)
        .with_context(|| format!("opening {name}"))?;
    let mut n = 0;
    for k in m.keys() {
        k.with_context(|| format!("reading {name}"))?;
        n += 1;
    }
    Ok(n)
}

impl Snapshot {
    /// Reads the pinned maps and the agent's state file.
    pub fn read(layout: &Layout) -> anyhow::Result<Self> {
        let counters = crate::report::read_counters(layout)?;
        let mut maps = Vec::new();
        type Count = fn(&Layout, &'static str) -> anyhow::Result<u64>;
        let tables: [(&'static str, Count); 9] = [
            (MAP_ROUTES, count_lpm::<xhost_common::Peer>),
            (MAP_LOCAL_NETS, count_lpm::<xhost_common::LocalNet>),
            (MAP_ENDPOINTS, count_hash::<xhost_common::Endpoint>),
            (MAP_PEER_HOSTS, count_hash::<xhost_common::PeerHost>),
            (MAP_UNDERLAY_ADDRS, count_hash::<u32>),
            (MAP_ROUTES6, count_routes6),
            (MAP_LOCAL_NETS6, count_lpm6::<xhost_common::LocalNet>),
            (MAP_ENDPOINTS6, count_hash6::<xhost_common::Endpoint>),
            (MAP_PEER_HOSTS6, count_hash6::<xhost_common::PeerHost>),
        ];
        for (name, count) in tables {
            let path = layout.map(name);
            if !path.exists() {
                // A datapath pinned by a build without this map.
                continue;
            }
            let capacity = MapInfo::from_pin(&path)
                .with_context(|| format!("reading {name}'s info"))?
                .max_entries();
            maps.push(MapFill {
                name,
                entries: count(layout, name)?,
                capacity: u64::from(capacity),
            });
        }
        Ok(Self {
            counters,
            maps,
            attached: crate::report::pinned_attachments(layout),
            agent: AgentState::read(layout).ok(),
            peers: read_peer_counters(layout)?,
        })
    }

    fn entries(&self, map: &str) -> i64 {
        self.maps
            .iter()
            .find(|m| m.name == map)
            .map_or(0, |m| m.entries as i64)
    }

    /// The registry of this snapshot, encoded by prometheus-client.
    pub fn encode(&self) -> String {
        let mut r = Registry::with_prefix("xhost");
        type Labels = Vec<(&'static str, String)>;

        let build = Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]);
        r.register("build", "The agent's build", build);

        let packets = Family::<Labels, Counter>::default();
        let bytes = Family::<Labels, Counter>::default();
        for (name, c) in &self.counters {
            let (verdict, reason) = verdict_reason(name);
            let l = vec![
                ("verdict", verdict.to_owned()),
                ("reason", reason.to_owned()),
            ];
            packets.get_or_create(&l).inc_by(c.packets);
            bytes.get_or_create(&l).inc_by(c.bytes);
        }
        r.register(
            "datapath_packets",
            "Packets the datapath decided on, by verdict (fwd, pass: to the kernel, drop; reject: answers it sent to refused packets, or left unsent by the rate limit) and reason (STATS)",
            packets,
        );
        r.register_with_unit(
            "datapath",
            "Bytes of the packets the datapath decided on, by verdict and reason (STATS)",
            Unit::Bytes,
            bytes,
        );

        let peer_packets = Family::<Labels, Counter>::default();
        let peer_bytes = Family::<Labels, Counter>::default();
        for p in &self.peers {
            for (direction, c) in [("tx", p.tx), ("rx", p.rx)] {
                let l = vec![
                    ("peer", p.peer.to_string()),
                    ("direction", direction.to_owned()),
                ];
                peer_packets.get_or_create(&l).inc_by(c.packets);
                peer_bytes.get_or_create(&l).inc_by(c.bytes);
            }
        }
        r.register(
            "peer_packets",
            "Packets forwarded to (tx) and delivered from (rx) each peer host (PEER_STATS)",
            peer_packets,
        );
        r.register_with_unit(
            "peer",
            "Bytes forwarded to (tx) and delivered from (rx) each peer host (PEER_STATS)",
            Unit::Bytes,
            peer_bytes,
        );

        let gauge = |v: i64| {
            let g = Gauge::<i64>::default();
            g.set(v);
            g
        };
        r.register(
            "routes",
            "Remote container prefixes in the datapath (ROUTES)",
            gauge(self.entries(MAP_ROUTES)),
        );
        r.register(
            "local_subnets",
            "This host's container subnets in the datapath (LOCAL_NETS)",
            gauge(self.entries(MAP_LOCAL_NETS)),
        );
        r.register(
            "endpoints",
            "Local containers the datapath delivers to directly (ENDPOINTS)",
            gauge(self.entries(MAP_ENDPOINTS)),
        );
        r.register(
            "routes6",
            "Remote IPv6 container prefixes in the datapath (ROUTES6)",
            gauge(self.entries(MAP_ROUTES6)),
        );
        r.register(
            "local_subnets6",
            "This host's IPv6 container subnets in the datapath (LOCAL_NETS6)",
            gauge(self.entries(MAP_LOCAL_NETS6)),
        );
        r.register(
            "endpoints6",
            "Local containers' IPv6 addresses the datapath delivers to directly (ENDPOINTS6)",
            gauge(self.entries(MAP_ENDPOINTS6)),
        );
        r.register(
            "peers",
            "Peer hosts the datapath accepts container traffic from (PEER_HOSTS, PEER_HOSTS6)",
            gauge(self.entries(MAP_PEER_HOSTS) + self.entries(MAP_PEER_HOSTS6)),
        );
        let entries = Family::<Labels, Gauge>::default();
        let capacity = Family::<Labels, Gauge>::default();
        for m in &self.maps {
            let l = vec![("map", m.name.to_owned())];
            entries.get_or_create(&l).set(m.entries as i64);
            capacity.get_or_create(&l).set(m.capacity as i64);
        }
        r.register(
            "map_entries",
            "Entries in each of the datapath's tables",
            entries,
        );
        r.register(
            "map_capacity",
            "Capacity (max_entries) of each of the datapath's tables",
            capacity,
        );
        let attached = Family::<Labels, Gauge>::default();
        for a in &self.attached {
            attached
                .get_or_create(&vec![("hook", a.hook.as_str().to_owned())])
                .inc();
        }
        r.register(
            "attachments",
            "Programs attached (pinned links), by hook",
            attached,
        );

        if let Some(a) = &self.agent {
            let seconds = |ms: u64| {
                let g = Gauge::<f64, AtomicU64>::default();
                g.set(ms as f64 / 1000.0);
                g
            };
            r.register_with_unit(
                "state_updated_timestamp",
                "When the agent last changed what it applied (Unix time)",
                Unit::Seconds,
                seconds(a.updated_unix_ms),
            );
            r.register(
                "endpoints_refused",
                "Local containers ENDPOINTS has no room for (--max-endpoints), waiting for a free slot",
                gauge(a.endpoints_refused.len() as i64),
            );
            if let Some(d) = &a.docker {
                r.register(
                    "docker_connected",
                    "Whether the agent's Docker Engine connection is up (1) or not (0)",
                    gauge(i64::from(d.connected)),
                );
                r.register(
                    "docker_networks",
                    "Docker networks the agent follows",
                    gauge(d.networks.len() as i64),
                );
                if let Some(ms) = d.last_sync_unix_ms {
                    r.register_with_unit(
                        "docker_last_sync_timestamp",
                        "When the agent last synced with Docker (Unix time)",
                        Unit::Seconds,
                        seconds(ms),
                    );
                }
            }
            if let Some(c) = &a.cluster {
                r.register(
                    "store_connected",
                    "Cluster mode: whether the agent's etcd connection is up (1) or not (0)",
                    gauge(i64::from(c.store.connected)),
                );
                r.register(
                    "store_revision",
                    "Cluster mode: the etcd revision of the cluster view the agent holds",
                    gauge(c.store.revision),
                );
                r.register_with_unit(
                    "store_lease_ttl",
                    "Cluster mode: TTL of this host's etcd lease, as granted",
                    Unit::Seconds,
                    gauge(c.store.lease_ttl),
                );
            }
        }

        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &r);
        out
    }
}

#[cfg(test)]
mod tests {
    use xhost_common::stat;

    use super::*;

    #[test]
    fn every_counter_name_has_a_verdict() {
        for name in stat::NAMES {
            let (verdict, reason) = verdict_reason(name);
            assert!(
                ["fwd", "pass", "drop", "reject"].contains(&verdict) && !reason.is_empty(),
                "{name}: STATS names must read <fwd|pass|drop|reject>_<reason>"
            );
        }
    }

    #[test]
    fn encodes_counters_gauges_and_info() {
        let mut counters = std::collections::BTreeMap::new();
        counters.insert(
            "fwd_egress".to_owned(),
            CounterRow {
                packets: 7,
                bytes: 700,
            },
        );
        counters.insert(
            "drop_spoofed".to_owned(),
            CounterRow {
                packets: 2,
                bytes: 196,
            },
        );
        let s = Snapshot {
            counters,
            maps: vec![
                MapFill {
                    name: MAP_ROUTES,
                    entries: 3,
                    capacity: 131_072,
                },
                MapFill {
                    name: MAP_ROUTES6,
                    entries: 2,
                    capacity: 16_384,
                },
            ],
            attached: Vec::new(),
            agent: None,
            peers: vec![PeerCounterRow {
                peer: std::net::Ipv4Addr::new(10, 0, 0, 2).into(),
                tx: CounterRow {
                    packets: 7,
                    bytes: 700,
                },
                rx: CounterRow {
                    packets: 1,
                    bytes: 98,
                },
            }],
        };
        let text = s.encode();
        for want in [
            "# TYPE xhost_datapath_packets counter",
            "xhost_datapath_packets_total{verdict=\"fwd\",reason=\"egress\"} 7",
            "xhost_datapath_packets_total{verdict=\"drop\",reason=\"spoofed\"} 2",
            "# UNIT xhost_datapath_bytes bytes",
            "xhost_datapath_bytes_total{verdict=\"drop\",reason=\"spoofed\"} 196",
            "xhost_routes 3",
            "xhost_peer_packets_total{peer=\"10.0.0.2\",direction=\"tx\"} 7",
            "xhost_peer_packets_total{peer=\"10.0.0.2\",direction=\"rx\"} 1",
            "xhost_peer_bytes_total{peer=\"10.0.0.2\",direction=\"tx\"} 700",
            "xhost_map_entries{map=\"ROUTES\"} 3",
            "xhost_map_capacity{map=\"ROUTES\"} 131072",
            "xhost_routes6 2",
            "xhost_map_entries{map=\"ROUTES6\"} 2",
            "xhost_map_capacity{map=\"ROUTES6\"} 16384",
            "xhost_endpoints6 0",
            "xhost_build_info{version=\"",
            "# EOF",
        ] {
            assert!(text.contains(want), "missing `{want}` in:\n{text}");
        }
    }
}
