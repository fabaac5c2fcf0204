//! Where xhost keeps what must outlive a process: bpffs pins and run state.
//!
//! ```text
//! <pin-dir>/ROUTES, LOCAL_NETS, ENDPOINTS, ...      maps (bpftool map dump pinned ...;
//!                                                   every name in PINNED_MAPS)
//! <pin-dir>/links/<iface>@<hook>                   tcx / XDP links (detach = unlink)
//! <pin-dir>/filters/<iface>@<hook>                 classic tc: the program xhost's filter
//!                                                   there runs (unload deletes the filter)
//! <pin-dir>/layout/<fingerprint>                   (empty directory) the maps' layout:
//!                                                   a load adopts pins of its own, or
//!                                                   migrates them (two while it does)
//! <pin-dir>/migrating/<map>                         a migration's new maps, before they
//!                                                   are renamed over the old pins
//! <pin-dir>/clsact/<iface>                          (empty directory) xhost added the
//!                                                   clsact qdisc of <iface>
//! <run-dir>/<instance>.json                         what is attached where, Docker view
//! <run-dir>/<instance>.cluster.json                 cluster mode: last-known view, lease id
//! ```
//! One pin dir is one xhost instance (one underlay). Hosts simulated as
//! network namespaces share a bpffs, so each gets its own `--pin-dir`; the
//! instance's state file is named after its pin dir, so instances may share
//! a run dir (the default `/sys/fs/bpf/xhost` writes `<run-dir>/xhost.json`).

use std::path::{Path, PathBuf};

/// Default bpffs directory.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/xhost";
/// Default runtime state directory.
pub const DEFAULT_RUN_DIR: &str = "/run/xhost";

#[derive(Clone, Debug)]
pub struct Layout {
    pub pin_dir: PathBuf,
    pub run_dir: PathBuf,
}

impl Layout {
    pub fn map(&self, name: &str) -> PathBuf {
        self.pin_dir.join(name)
    }

    pub fn links_dir(&self) -> PathBuf {
        self.pin_dir.join("links")
    }

    /// Directory of the classic tc filters' program pins.
    pub fn filters_dir(&self) -> PathBuf {
        self.pin_dir.join("filters")
    }

    /// The program pin of xhost's classic tc filter at `hook` of `iface`
    /// (named as [`Layout::link`]).
    pub fn filter(&self, iface: &str, hook: Hook) -> PathBuf {
        self.filters_dir()
            .join(format!("{}@{}", iface.replace('.', ":"), hook.as_str()))
    }

    /// Directory holding the maps' layout fingerprint.
    pub fn layout_dir(&self) -> PathBuf {
        self.pin_dir.join("layout")
    }

    /// Records the maps' layout fingerprint (an empty directory named
    /// after it: bpffs holds no regular files).
    pub fn record_layout(&self, fingerprint: &str) -> std::io::Result<()> {
        std::fs::create_dir_all(self.layout_dir().join(fingerprint))
    }

    /// The fingerprint recorded beside the maps, if any.
    pub fn layout_recorded(&self) -> Option<String> {
        std::fs::read_dir(self.layout_dir())
            .ok()?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .next()
    }

    /// Removes the fingerprint record.
    pub fn remove_layout_record(&self) {
        if let Some(fp) = self.layout_recorded() {
            let _ = std::fs::remove_dir(self.layout_dir().join(fp));
        }
        let _ = std::fs::remove_dir(self.layout_dir());
    }

    /// Directory of the clsact markers.
    pub fn clsact_dir(&self) -> PathBuf {
        self.pin_dir.join("clsact")
    }

    /// Marks that xhost added the clsact qdisc of `iface` (an empty
    /// directory: bpffs holds no regular files), so that only that one is
    /// removed again. Names escaped as in [`Layout::link`].
    pub fn clsact_marker(&self, iface: &str) -> PathBuf {
        self.clsact_dir().join(iface.replace('.', ":"))
    }

    /// Interfaces whose clsact qdisc xhost added.
    pub fn clsact_marked(&self) -> Vec<String> {
        std::fs::read_dir(self.clsact_dir())
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().replace(':', "."))
            .collect()
    }

    /// `<iface>@<hook>`. bpffs refuses names containing '.', which
    /// interface names may hold (VLANs: `ens33.100`), so '.' is stored as
    /// ':', a character the kernel never allows in an interface name.
    pub fn link(&self, iface: &str, hook: Hook) -> PathBuf {
        self.links_dir()
            .join(format!("{}@{}", iface.replace('.', ":"), hook.as_str()))
    }

    /// Inverse of the file name of `link`.
    pub fn parse_link_name(name: &str) -> Option<(String, Hook)> {
        let (iface, hook) = name.rsplit_once('@')?;
        Some((iface.replace(':', "."), Hook::parse(hook)?))
    }

    /// The instance's name: its pin dir below `/sys/fs/bpf` (or its whole
    /// path elsewhere), components joined with `-`.
    pub fn instance(&self) -> String {
        let rel = self
            .pin_dir
            .strip_prefix("/sys/fs/bpf")
            .unwrap_or(&self.pin_dir);
        let name: Vec<_> = rel
            .components()
            .filter_map(|c| match c {
                std::path::Component::Normal(s) => Some(s.to_string_lossy()),
                _ => None,
            })
            .collect();
        if name.is_empty() {
            "bpffs".to_owned()
        } else {
            name.join("-")
        }
    }

    /// This instance's state file in the (possibly shared) run dir.
    pub fn state_file(&self) -> PathBuf {
        self.run_dir.join(format!("{}.json", self.instance()))
    }

    /// Cluster mode's last-known view and lease id, beside the state file.
    pub fn cluster_snapshot(&self) -> PathBuf {
        self.run_dir
            .join(format!("{}.cluster.json", self.instance()))
    }

    /// Whether anything of an xhost instance is pinned here.
    pub fn in_use(&self) -> bool {
        std::fs::read_dir(&self.pin_dir).is_ok_and(|mut d| d.next().is_some())
    }
}

/// An attachment point of a program.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Hook {
    /// XDP on the underlay.
    Xdp,
    /// TC ingress of the underlay.
    UnderlayIngress,
    /// TC ingress of a Docker bridge.
    BridgeIngress,
    /// TC ingress of a container's host-side veth.
    #[serde(rename = "ctr-ingress")]
    ContainerIngress,
    /// TC ingress of the vxlan device (VXLAN mode).
    TunnelIngress,
    /// TC egress of the vxlan device (VXLAN mode).
    TunnelEgress,
}

impl Hook {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Xdp => "xdp",
            Self::UnderlayIngress => "underlay-ingress",
            Self::BridgeIngress => "bridge-ingress",
            Self::ContainerIngress => "ctr-ingress",
            Self::TunnelIngress => "tunnel-ingress",
            Self::TunnelEgress => "tunnel-egress",
        }
    }

    pub const fn program(self) -> &'static str {
        match self {
            Self::Xdp => xhost_common::PROG_NIC_XDP,
            Self::UnderlayIngress => xhost_common::PROG_NIC_IN,
            Self::BridgeIngress => xhost_common::PROG_BRIDGE_IN,
            Self::ContainerIngress => xhost_common::PROG_VETH_IN,
            Self::TunnelIngress => xhost_common::PROG_VXLAN_IN,
            Self::TunnelEgress => xhost_common::PROG_VXLAN_OUT,
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Xdp,
            Self::UnderlayIngress,
            Self::BridgeIngress,
            Self::ContainerIngress,
            Self::TunnelIngress,
            Self::TunnelEgress,
        ]
        .into_iter()
        .find(|h| h.as_str() == s)
    }
}

/// Removes `path` if it exists; a missing file is not an error.
pub fn remove_file_if_exists(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_names_round_trip_and_avoid_dots() {
        let l = Layout {
            pin_dir: "/sys/fs/bpf/x".into(),
            run_dir: "/run/x".into(),
        };
        for (iface, hook) in [
            ("ens33", Hook::Xdp),
            ("ens33.100", Hook::UnderlayIngress),
            ("br-0a1b", Hook::BridgeIngress),
            ("xhost_vxlan", Hook::TunnelEgress),
        ] {
            let p = l.link(iface, hook);
            let name = p.file_name().and_then(|n| n.to_str()).expect("utf-8 name");
            assert!(!name.contains('.'), "{name}");
            assert_eq!(
                Layout::parse_link_name(name),
                Some((iface.to_owned(), hook))
            );
        }
        assert_eq!(Layout::parse_link_name("ens33@bogus"), None);
    }

    #[test]
    fn instances_sharing_a_run_dir_get_their_own_state_file() {
        let at = |pin: &str| Layout {
            pin_dir: pin.into(),
            run_dir: "/run/xhost".into(),
        };
        assert_eq!(
            at("/sys/fs/bpf/xhost").state_file(),
            Path::new("/run/xhost/xhost.json")
        );
        assert_eq!(
            at("/sys/fs/bpf/a/xhost").state_file(),
            Path::new("/run/xhost/a-xhost.json")
        );
        assert_eq!(
            at("/mnt/bpf/xh/").state_file(),
            Path::new("/run/xhost/mnt-bpf-xh.json")
        );
        assert_ne!(
            at("/sys/fs/bpf/a").state_file(),
            at("/sys/fs/bpf/b").state_file()
        );
    }
}
