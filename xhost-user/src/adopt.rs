//! Adopting a pinned datapath: a `load` that finds this underlay served by
//! pins (a `--detach`ed instance, or an agent that was killed or stopped
//! with `--keep-datapath`) takes it over instead of refusing: the pinned
//! maps are reused as they are, each program is replaced in place through
//! its pinned link (or classic tc filter), and the plan's applied state is
//! rebuilt from what the maps hold, so only the difference is written.
//!
//! What is checked before anything is touched: no agent still runs the
//! pins, they serve this underlay through the TC method asked for, in the
//! routing mode asked for (VXLAN mode: the same vxlan device, with the
//! VNI, UDP port and MTU the settings want; it is taken over with the
//! routes into it), and the pinned maps have the shape this build's
//! programs were compiled against (type, key and value size, capacity,
//! flags), recorded as a fingerprint under `<pin-dir>/layout/`, or can be
//! migrated to it ([`crate::migrate`]).

use std::{collections::BTreeMap, path::PathBuf};

use aya::maps::MapInfo;
use sha2::{Digest as _, Sha256};
use xhost_common::{
    MAP_ENDPOINT_PORTS, MAP_ENDPOINTS, MAP_ENDPOINTS6, MAP_LAYOUT_VERSION, PINNED_MAPS,
};

use crate::{
    attach::{AttachArg, TcMethod},
    config::Settings,
    layout::{Hook, Layout},
    report::AgentState,
    tunnel::{self, TunnelDevice},
};

/// What the programs of a build assume of one map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapShape {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

impl MapShape {
    pub(crate) fn of_pin(info: &MapInfo) -> Self {
        Self {
            map_type: info.map_type().map_or(u32::MAX, |t| t as u32),
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
            flags: info.map_flags(),
        }
    }

    /// The first difference to `want` (this build's), in words.
    pub(crate) fn difference(&self, want: &Self) -> Option<String> {
        let fields = [
            ("type", self.map_type, want.map_type),
            ("key size", self.key_size, want.key_size),
            ("value size", self.value_size, want.value_size),
            ("flags", self.flags, want.flags),
            ("capacity", self.max_entries, want.max_entries),
        ];
        fields
            .into_iter()
            .find(|(_, have, want)| have != want)
            .map(|(what, have, want)| format!("{what} {have}, this build's {want}"))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    #[error(
        "xhost is already loaded here: an agent (pid {pid}) runs the datapath pinned under {}; stop it first (`xhost-user unload`, or SIGTERM; --keep-datapath keeps the datapath for this load to adopt)",
        .pin_dir.display()
    )]
    AgentRunning { pid: u32, pin_dir: PathBuf },
    #[error(
        "{} holds pins but no underlay attachment of xhost: nothing to adopt (`xhost-user unload` removes them)",
        .0.display()
    )]
    NoUnderlay(PathBuf),
    #[error(
        "the datapath pinned under {} serves {pinned}, not {wanted} (use another --pin-dir, or `xhost-user unload` first)",
        .pin_dir.display()
    )]
    OtherIface {
        pin_dir: PathBuf,
        pinned: String,
        wanted: String,
    },
    #[error(
        "the pinned datapath attaches through {pinned}, --attach asks for {wanted}: `xhost-user unload` first to change it"
    )]
    OtherMethod {
        pinned: &'static str,
        wanted: &'static str,
    },
    #[error(
        "the pinned datapath {pinned}, this load asks for {wanted}: nothing was touched (`xhost-user unload` first to change it)"
    )]
    OtherMode {
        pinned: &'static str,
        wanted: &'static str,
    },
    #[error(
        "the pinned datapath runs in VXLAN mode but its agent state does not tell its VNI: nothing was touched (`xhost-user unload` first)"
    )]
    TunnelUnknown,
    #[error(transparent)]
    Tunnel(#[from] crate::tunnel::TunnelError),
    #[error(
        "pinned map {map} does not match this build ({difference}): its layout changed, so this build cannot adopt the datapath; nothing was touched (run the build that pinned it, or `xhost-user unload` first, which drops routes, endpoints and counters)"
    )]
    Layout {
        map: &'static str,
        difference: String,
    },
    #[error(
        "the pinned datapath's ENDPOINTS holds at most {pinned} endpoints, this load asks for {wanted} (--max-endpoints, max_endpoints in the config file); nothing was touched: load with --max-endpoints {pinned} to adopt it, or `xhost-user unload` first (which drops routes, endpoints and counters)"
    )]
    Capacity { pinned: u32, wanted: u32 },
    #[error(
        "the pinned maps were written under map layout {pinned}, this build's is {this}, and this build declares no conversion from it (another meaning, or an unknown layout): nothing was touched (run the build that pinned it, or `xhost-user unload` first)"
    )]
    Version { pinned: String, this: String },
    #[error("reading pinned map {map}")]
    ReadMap {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("parsing the embedded eBPF object")]
    Object(#[source] aya_obj::ParseError),
    #[error("the embedded eBPF object has no map {0}")]
    ObjectMap(&'static str),
    #[error(transparent)]
    Migrate(#[from] crate::migrate::MigrateError),
}

/// The maps sized by `--max-endpoints` (one port per endpoint at most;
/// as many IPv6 endpoints as IPv4 ones).
pub const ENDPOINT_MAPS: [&str; 3] = [MAP_ENDPOINTS, MAP_ENDPOINT_PORTS, MAP_ENDPOINTS6];

/// The shapes of the pinned maps as this build's object declares them,
/// with the endpoint maps sized to hold `max_endpoints`.
pub fn object_shapes(max_endpoints: u32) -> Result<BTreeMap<&'static str, MapShape>, AdoptError> {
    let obj = aya_obj::Object::parse(crate::datapath::object()).map_err(AdoptError::Object)?;
    PINNED_MAPS
        .iter()
        .map(|&name| {
            let m = obj.maps.get(name).ok_or(AdoptError::ObjectMap(name))?;
            Ok((
                name,
                MapShape {
                    map_type: m.map_type(),
                    key_size: m.key_size(),
                    value_size: m.value_size(),
                    max_entries: if ENDPOINT_MAPS.contains(&name) {
                        max_endpoints
                    } else {
                        m.max_entries()
                    },
                    flags: m.map_flags(),
                },
            ))
        })
        .collect()
}

/// This build's layout fingerprint: [`fingerprint_at`] this build's
/// `MAP_LAYOUT_VERSION`.
pub fn fingerprint(shapes: &BTreeMap<&'static str, MapShape>) -> String {
    fingerprint_at(MAP_LAYOUT_VERSION, shapes.iter().map(|(n, s)| (*n, s)))
}

/// The order maps are hashed in by [`fingerprint_at`]: every map name a
/// build has pinned, in the order they were added. Append only: a map a
/// build no longer has keeps its place, so later builds can still tell
/// the layout of pins that hold it.
pub const FINGERPRINT_ORDER: [&str; 13] = [
    "ROUTES",
    "LOCAL_NETS",
    "ENDPOINTS",
    "PEER_HOSTS",
    "STATS",
    "DATAPATH_GEN",
    "UNDERLAY_ADDRS",
    "ENDPOINT_PORTS",
    "PEER_STATS",
    "ROUTES6",
    "LOCAL_NETS6",
    "ENDPOINTS6",
    "PEER_HOSTS6",
];

/// The layout fingerprint of maps `shapes` (name and shape) under layout
/// `version`: 16 hex digits of the SHA-256 of the version and every map's
/// name and shape, in [`FINGERPRINT_ORDER`], then any map it does not
/// name, by name. It depends only on the maps given, not on a build's
/// list of maps, so a build can tell the layout of pins holding maps it
/// no longer has.
pub fn fingerprint_at<'a>(
    version: u32,
    shapes: impl IntoIterator<Item = (&'a str, &'a MapShape)>,
) -> String {
    let mut shapes: Vec<(&str, &MapShape)> = shapes.into_iter().collect();
    let rank = |name: &str| {
        FINGERPRINT_ORDER
            .iter()
            .position(|n| *n == name)
            .unwrap_or(FINGERPRINT_ORDER.len())
    };
    shapes.sort_by(|a, b| rank(a.0).cmp(&rank(b.0)).then(a.0.cmp(b.0)));
    let mut h = Sha256::new();
    h.update(version.to_le_bytes());
    for (name, s) in shapes {
        h.update(name.as_bytes());
        for v in [s.map_type, s.key_size, s.value_size, s.max_entries, s.flags] {
            h.update(v.to_le_bytes());
        }
    }
    hex(&h.finalize()[..8])
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A pinned datapath this load may adopt.
#[derive(Debug)]
pub struct Prior {
    /// The state file its agent left, if any (kernel routes, XDP mode).
    pub state: Option<AgentState>,
    /// How its TC programs are attached.
    pub method: TcMethod,
    /// How its maps become this build's, when their layout is another's.
    pub migration: Option<crate::migrate::Migration>,
    /// VXLAN mode: its vxlan device, checked against the settings.
    pub tunnel: Option<TunnelDevice>,
}

/// Whether `layout` holds a datapath to adopt, checked against `settings`
/// and this build's map layout without touching anything. `None`: nothing
/// is pinned there, a fresh load.
pub fn find(layout: &Layout, settings: &Settings) -> Result<Option<Prior>, AdoptError> {
    if !layout.in_use() {
        return Ok(None);
    }
    let state = AgentState::read(layout).ok();
    if let Some(s) = state
        .as_ref()
        .filter(|s| !s.detached && s.pid != std::process::id() && pid_alive(s.pid))
    {
        return Err(AdoptError::AgentRunning {
            pid: s.pid,
            pin_dir: layout.pin_dir.clone(),
        });
    }
    let underlay = |dir: PathBuf| {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| Layout::parse_link_name(&e.file_name().to_string_lossy()))
            .find(|(_, hook)| *hook == Hook::UnderlayIngress)
            .map(|(iface, _)| iface)
    };
    let (iface, method) = match (underlay(layout.links_dir()), underlay(layout.filters_dir())) {
        (Some(i), _) => (i, TcMethod::Tcx),
        (None, Some(i)) => (i, TcMethod::Tc),
        (None, None) => return Err(AdoptError::NoUnderlay(layout.pin_dir.clone())),
    };
    if iface != settings.iface {
        return Err(AdoptError::OtherIface {
            pin_dir: layout.pin_dir.clone(),
            pinned: iface,
            wanted: settings.iface.clone(),
        });
    }
    let forced = match settings.attach {
        AttachArg::Auto => None,
        AttachArg::Tcx => Some(TcMethod::Tcx),
        AttachArg::Tc => Some(TcMethod::Tc),
    };
    if let Some(wanted) = forced.filter(|m| *m != method) {
        return Err(AdoptError::OtherMethod {
            pinned: method.as_str(),
            wanted: wanted.as_str(),
        });
    }
    let tunnel = check_tunnel(layout, settings, state.as_ref())?;
    let migration = crate::migrate::plan(layout, &object_shapes(settings.max_endpoints)?)?;
    Ok(Some(Prior {
        state,
        method,
        migration,
        tunnel,
    }))
}

/// VXLAN mode: whether the pinned datapath runs in the mode `settings`
/// ask for, and in VXLAN mode its vxlan device with the VNI, port and MTU
/// they want (the device and the routes into it are kept as they are).
/// Reads only. The mode is told by the state file or by attachments
/// pinned on the device: either is VXLAN mode, whose VNI only the state
/// file knows.
fn check_tunnel(
    layout: &Layout,
    settings: &Settings,
    state: Option<&AgentState>,
) -> Result<Option<TunnelDevice>, AdoptError> {
    let on_device = |dir: PathBuf| {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| Layout::parse_link_name(&e.file_name().to_string_lossy()))
            .any(|(iface, _)| iface == tunnel::DEVICE)
    };
    let pinned = state.and_then(|s| s.tunnel.as_ref());
    let vxlan_pinned =
        pinned.is_some() || on_device(layout.links_dir()) || on_device(layout.filters_dir());
    const NATIVE: &str = "routes natively";
    const VXLAN: &str = "runs in VXLAN mode";
    match (settings.tunnel, vxlan_pinned) {
        (None, false) => Ok(None),
        (None, true) => Err(AdoptError::OtherMode {
            pinned: VXLAN,
            wanted: "native routing",
        }),
        (Some(_), false) => Err(AdoptError::OtherMode {
            pinned: NATIVE,
            wanted: "VXLAN mode (--tunnel vxlan)",
        }),
        (Some(vxlan), true) => {
            let t = pinned.ok_or(AdoptError::TunnelUnknown)?;
            Ok(Some(TunnelDevice::existing(
                &settings.iface,
                vxlan,
                t.ifindex,
                t.vni,
            )?))
        }
    }
}

fn pid_alive(pid: u32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok()
}
