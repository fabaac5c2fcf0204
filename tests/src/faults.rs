//! Helpers of the fault suite (`tests/tests/faults.rs`): what the maps hold
//! as `status` shows them, the kernel's routes and neighbours, config files
//! for SIGHUP reloads, and bursts of simulated containers.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use crate::{Container, Error, Host, Ipv4NetExt, NetNs, Result};

/// What an instance's maps hold, as `status --json` lists them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Maps {
    /// `ROUTES`: prefix -> peer host.
    pub routes: BTreeMap<String, String>,
    /// `ENDPOINTS`: container IP -> (host veth ifindex, container MAC).
    pub endpoints: BTreeMap<String, (u64, String)>,
    /// `LOCAL_NETS` prefixes.
    pub local: Vec<String>,
    /// What is attached, as `iface hook` lines.
    pub attached: Vec<String>,
}

impl Maps {
    pub fn of(s: &serde_json::Value) -> Self {
        let rows = |k: &str| s[k].as_array().cloned().unwrap_or_default();
        let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_owned();
        Self {
            routes: rows("routes")
                .iter()
                .map(|r| (text(&r["prefix"]), text(&r["peer"])))
                .collect(),
            endpoints: rows("endpoints")
                .iter()
                .map(|e| {
                    (
                        text(&e["ip"]),
                        (e["ifindex"].as_u64().unwrap_or(0), text(&e["mac"])),
                    )
                })
                .collect(),
            local: rows("local_subnets")
                .iter()
                .map(|l| text(&l["prefix"]))
                .collect(),
            attached: rows("attached")
                .iter()
                .map(|a| format!("{} {}", text(&a["iface"]), text(&a["hook"])))
                .collect(),
        }
    }

    /// One line for logs and the docs' table.
    pub fn summary(&self) -> String {
        let mut routes: Vec<String> = self
            .routes
            .iter()
            .take(3)
            .map(|(p, h)| format!("{p} via {h}"))
            .collect();
        if self.routes.len() > 3 {
            routes.push(format!("... {} in all", self.routes.len()));
        }
        format!(
            "ROUTES [{}], ENDPOINTS {}, LOCAL_NETS {:?}, {} attachments",
            routes.join(", "),
            self.endpoints.len(),
            self.local,
            self.attached.len()
        )
    }
}

/// xhost's kernel routes in `ns` (`ip route show proto 177`), one per line.
pub fn xhost_kernel_routes(ns: &NetNs) -> Result<Vec<String>> {
    let out = ns.ip(&["route", "show", "proto", "177"])?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect())
}

/// The link-layer address `ns`'s neighbour table holds for `ip`, with its
/// state (`None` if no entry or no address).
pub fn neighbour(ns: &NetNs, ip: Ipv4Addr) -> Result<Option<(String, String)>> {
    let out = ns.ip(&["-j", "neigh", "show", "to", &ip.to_string()])?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|_| Error::Parse {
        what: "ip -j neigh",
        input: String::from_utf8_lossy(&out.stdout).into_owned(),
    })?;
    Ok(v.as_array().into_iter().flatten().find_map(|n| {
        let mac = n["lladdr"].as_str()?.to_owned();
        let state = n["state"]
            .as_array()
            .map(|s| {
                s.iter()
                    .filter_map(|x| x.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default();
        Some((mac, state))
    }))
}

/// The MAC of `iface` in `ns`.
pub fn mac_of(ns: &NetNs, iface: &str) -> Result<String> {
    let out = ns.ip(&["-j", "link", "show", "dev", iface])?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|_| Error::Parse {
        what: "ip -j link",
        input: String::from_utf8_lossy(&out.stdout).into_owned(),
    })?;
    v[0]["address"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| Error::Config(format!("{iface} has no address")))
}

/// Packets the kernel dropped because a CPU's input backlog was full
/// (`/proc/net/softnet_stat`, second column, summed over CPUs; the whole
/// machine): a veth hands what it sends to its peer through that backlog,
/// so on a starved CPU packets drop there, before any program sees them.
pub fn backlog_drops() -> u64 {
    std::fs::read_to_string("/proc/net/softnet_stat")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter_map(|v| u64::from_str_radix(v, 16).ok())
        .sum()
}

/// xhost's `drop_*` counters in a `status --json`, by name.
pub fn xhost_drops(s: &serde_json::Value) -> BTreeMap<String, u64> {
    s["counters"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, _)| k.starts_with("drop_"))
        .filter_map(|(k, v)| Some((k.clone(), v["packets"].as_u64()?)))
        .collect()
}

/// A config file in the temp directory, removed on drop.
pub struct ConfigFile(pub PathBuf);

impl ConfigFile {
    pub fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        Self(std::env::temp_dir().join(format!("xh-{}-{n}-{tag}.toml", std::process::id())))
    }

    pub fn write(&self, text: &str) -> Result<()> {
        std::fs::write(&self.0, text).map_err(|source| Error::Io {
            what: format!("writing {}", self.0.display()),
            source,
        })
    }

    pub fn arg(&self) -> String {
        self.0.display().to_string()
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A config for `host` (underlay, its bridge, no Docker) with peers
/// `(underlay address, subnets)`.
pub fn config_for(host: &Host, peers: &[(Ipv4Addr, Vec<String>)]) -> String {
    let mut s = format!(
        "iface = \"{}\"\nbridges = [\"{}\"]\ndocker = false\n",
        host.underlay_iface(),
        host.bridge()
    );
    for (ip, subnets) in peers {
        let list: Vec<String> = subnets.iter().map(|n| format!("\"{n}\"")).collect();
        s.push_str(&format!(
            "[[peer]]\nhost = \"{ip}\"\nsubnets = [{}]\n",
            list.join(", ")
        ));
    }
    s
}

/// Sends `signal` to `pid`.
pub fn signal(pid: u32, signal: nix::sys::signal::Signal) -> Result<()> {
    let raw = i32::try_from(pid).map_err(|_| Error::Config(format!("pid {pid}")))?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), signal).map_err(|e| Error::Io {
        what: format!("sending {signal} to {pid}"),
        source: e.into(),
    })
}

/// Starts `count` simulated containers on `host`'s bridge, with host
/// numbers `first..first+count` of its subnet, each in its own namespace
/// (dropping them deletes the namespaces, and with them the veths). Each
/// then sends one datagram to its gateway, so the bridge learns its
/// neighbour entry and FDB port as it would from a real container's first
/// packet (which is how the agent finds endpoints on a bridge Docker does
/// not manage).
pub fn start_containers(host: &Host, first: u32, count: u32) -> Result<Vec<Container>> {
    let mtu = 1500;
    let mut out = Vec::with_capacity(count as usize);
    for i in 0..count {
        let ip = host
            .subnet()
            .host(first + i)
            .ok_or_else(|| Error::Config(format!("{} has no host {}", host.subnet(), first + i)))?;
        out.push(Container::build(
            host.ns(),
            &format!("burst{i}"),
            host.subnet().with_addr(ip),
            host.bridge_ip(),
            host.bridge(),
            mtu,
        )?);
    }
    let paths: Vec<PathBuf> = out.iter().map(|c| c.ns().path()).collect();
    let gw = SocketAddr::from((host.bridge_ip(), 9));
    // A socket on the host takes the hellos, so the host answers no ICMP
    // port-unreachable into containers that may be gone by then. Made on
    // a thread inside the host's namespace; a socket stays in the
    // namespace it was made in.
    let host_path = host.ns().path();
    let sink = std::thread::spawn(move || -> Result<UdpSocket> {
        let file = std::fs::File::open(&host_path).map_err(|source| Error::Io {
            what: format!("opening {}", host_path.display()),
            source,
        })?;
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| Error::Io {
            what: format!("setns {}", host_path.display()),
            source: e.into(),
        })?;
        UdpSocket::bind(gw).map_err(|source| Error::Io {
            what: format!("binding {gw}"),
            source,
        })
    })
    .join()
    .map_err(|_| Error::Config("host socket thread panicked".into()))??;
    std::thread::spawn(move || -> Result<()> {
        for p in &paths {
            let file = std::fs::File::open(p).map_err(|source| Error::Io {
                what: format!("opening {}", p.display()),
                source,
            })?;
            nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                Error::Io {
                    what: format!("setns {}", p.display()),
                    source: e.into(),
                }
            })?;
            let s = UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))).map_err(
                |source| Error::Io {
                    what: "binding a UDP socket".into(),
                    source,
                },
            )?;
            // The first send only queues behind ARP; the reply completes it.
            let _ = s.send_to(b"hello", gw);
        }
        std::thread::sleep(Duration::from_millis(10));
        Ok(())
    })
    .join()
    .map_err(|_| Error::Config("container hello thread panicked".into()))??;
    drop(sink);
    Ok(out)
}
