//! Cluster mode's testbed: N simulated Docker hosts on one shared underlay
//! segment (a bridge in a namespace of its own, where a real `etcd` also
//! listens), and a guard around that etcd.
//!
//! ```text
//!  host-a netns            host-b netns            host-c netns
//!    docker0 192.168.110.1   docker0 192.168.120.1   docker0 192.168.130.1
//!    ens33 172.16.91.131     ens33 172.16.91.132     ens33 172.16.91.133
//!        |                       |                       |
//!  ul netns: ul0 (bridge) 172.16.91.5/24, etcd on 172.16.91.5:23790
//! ```

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use crate::{Error, Host, HostOpts, Ipv4Net, NetNs, Process, Result, TopologyOpts};

/// The underlay's bridge address, where etcd listens.
pub const UNDERLAY_GW: Ipv4Addr = Ipv4Addr::new(172, 16, 91, 5);
/// etcd's client port (not the default, so nothing else answers there).
pub const ETCD_PORT: u16 = 23790;

/// Settings of [`ClusterBed::new`].
#[derive(Clone, Debug)]
pub struct ClusterOpts {
    pub hosts: u32,
    /// Hosts (by index) whose bridge, containers and rules a real dockerd
    /// makes: only their underlay is built.
    pub underlay_only: Vec<u32>,
    pub containers_per_host: u32,
}

impl Default for ClusterOpts {
    fn default() -> Self {
        Self {
            hosts: 3,
            underlay_only: Vec::new(),
            containers_per_host: 1,
        }
    }
}

/// The shared underlay and the hosts on it.
#[derive(Debug)]
pub struct ClusterBed {
    // Hosts first: dropped (namespaces deleted) before the underlay.
    hosts: Vec<Option<Host>>,
    underlay: NetNs,
}

impl ClusterBed {
    pub fn new(o: &ClusterOpts) -> Result<Self> {
        if o.hosts == 0 || o.hosts > 9 {
            return Err(Error::Config(format!("1..=9 hosts, not {}", o.hosts)));
        }
        let underlay = NetNs::new("ul")?;
        // A fixed MAC: a bridge without one takes the lowest of its ports',
        // so removing a host could change the MAC behind etcd's address and
        // cut every other host off it until their neighbour entries expire.
        underlay.ip_batch(&format!(
            "link set lo up\n\
             link add ul0 address 02:00:ac:10:5b:05 type bridge\n\
             addr add {UNDERLAY_GW}/24 dev ul0\n\
             link set ul0 up\n"
        ))?;
        let mut bed = Self {
            hosts: Vec::new(),
            underlay,
        };
        for i in 0..o.hosts {
            let letter = ((b'a' + i as u8) as char).to_string();
            let ns = NetNs::new(&format!("host-{letter}"))?;
            let port = format!("p{i}");
            ns.ip(&[
                "link",
                "add",
                "ens33",
                "type",
                "veth",
                "peer",
                "name",
                &port,
                "netns",
                bed.underlay.name(),
            ])?;
            bed.underlay
                .ip_batch(&format!("link set {port} master ul0\nlink set {port} up\n"))?;
            let opts = TopologyOpts {
                containers_per_host: o.containers_per_host,
                underlay_only: o.underlay_only.contains(&i),
                ..TopologyOpts::default()
            };
            let h = HostOpts {
                subnet: Ipv4Net::new_assert(Ipv4Addr::new(192, 168, 110 + 10 * i as u8, 0), 24),
                underlay: Ipv4Net::new_assert(Ipv4Addr::new(172, 16, 91, 131 + i as u8), 24),
            };
            bed.hosts.push(Some(Host::build(&letter, ns, &h, &opts)?));
        }
        Ok(bed)
    }

    /// Host `i` (0 = host-a). Panics if it was removed.
    pub fn host(&self, i: usize) -> &Host {
        self.hosts[i].as_ref().expect("host was removed")
    }

    /// Deletes host `i` and its namespaces (a host that is gone).
    pub fn remove_host(&mut self, i: usize) {
        self.hosts[i] = None;
    }

    /// Adds a simulated container with address `ip` to host `i`'s bridge;
    /// returns its address.
    pub fn add_container(&mut self, i: usize, ip: Ipv4Addr) -> Result<Ipv4Addr> {
        let h = self.hosts[i]
            .as_mut()
            .ok_or_else(|| Error::Config("host was removed".into()))?;
        let role = format!(
            "{}-x{}",
            h.role().replace("host-", "ctr-"),
            h.containers().len() + 1
        );
        h.add_container(&role, ip)?;
        Ok(ip)
    }

    /// The underlay namespace (etcd's).
    pub fn underlay(&self) -> &NetNs {
        &self.underlay
    }
}

/// How the test etcd authenticates clients.
#[derive(Clone, Debug, Default)]
pub struct EtcdTls {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// etcdctl's own client certificate.
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

/// A real etcd in a namespace, stopped and its data removed on drop.
pub struct Etcd {
    process: Option<Process>,
    ns_path: PathBuf,
    ns_name: String,
    data: PathBuf,
    tls: Option<EtcdTls>,
    args: Vec<String>,
    /// `user:password` etcdctl authenticates with, once auth is on.
    pub ctl_user: Option<String>,
}

impl Etcd {
    /// Starts `etcd` in `ns` on `UNDERLAY_GW:ETCD_PORT` and waits until it
    /// answers.
    pub fn start(ns: &NetNs, tls: Option<EtcdTls>) -> Result<Self> {
        crate::cmd::require_tool("etcd", "etcd-server")?;
        crate::cmd::require_tool("etcdctl", "etcd-client")?;
        static N: AtomicU32 = AtomicU32::new(0);
        let data = std::env::temp_dir().join(format!(
            "xh-{}-{}-etcd",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let scheme = if tls.is_some() { "https" } else { "http" };
        let url = format!("{scheme}://{UNDERLAY_GW}:{ETCD_PORT}");
        let mut args: Vec<String> = [
            "etcd",
            "--name",
            "t",
            "--data-dir",
            &data.display().to_string(),
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
            "--listen-peer-urls",
            "http://127.0.0.1:23800",
            "--initial-advertise-peer-urls",
            "http://127.0.0.1:23800",
            "--initial-cluster",
            "t=http://127.0.0.1:23800",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        if let Some(t) = &tls {
            for (flag, p) in [
                ("--trusted-ca-file", &t.ca),
                ("--cert-file", &t.server_cert),
                ("--key-file", &t.server_key),
            ] {
                args.push(flag.into());
                args.push(p.display().to_string());
            }
            args.push("--client-cert-auth".into());
        }
        let mut e = Self {
            process: None,
            ns_path: ns.path(),
            ns_name: ns.name().to_owned(),
            data,
            tls,
            args,
            ctl_user: None,
        };
        e.restart()?;
        Ok(e)
    }

    /// The client URL.
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{UNDERLAY_GW}:{ETCD_PORT}")
    }

    /// Starts it again (after [`Etcd::kill`]), on the same data.
    pub fn restart(&mut self) -> Result<()> {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.ns_path.display()))
            .arg("--")
            .args(&self.args);
        let mut p = Process::spawn("etcd", c)?;
        p.set_grace(Duration::from_secs(5));
        self.process = Some(p);
        let t0 = Instant::now();
        loop {
            let out = self.ctl(&["endpoint", "health"])?;
            if out.status.success() {
                return Ok(());
            }
            if t0.elapsed() > Duration::from_secs(20) {
                return Err(Error::Timeout {
                    what: "etcd to answer".into(),
                    after: Duration::from_secs(20),
                    output: self
                        .process
                        .as_ref()
                        .map(Process::output)
                        .unwrap_or_default(),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILLs it (an outage); its data stays for [`Etcd::restart`].
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut p) = self.process.take() {
            p.signal(nix::sys::signal::Signal::SIGKILL)?;
            p.stop()?;
        }
        Ok(())
    }

    /// `etcdctl --endpoints URL args...` in etcd's namespace.
    pub fn ctl(&self, args: &[&str]) -> Result<std::process::Output> {
        let mut c = Command::new("ip");
        c.args([
            "netns",
            "exec",
            &self.ns_name,
            "etcdctl",
            "--dial-timeout",
            "1s",
            "--command-timeout",
            "3s",
            "--endpoints",
            &self.endpoint(),
        ]);
        if let Some(t) = &self.tls {
            c.arg(format!("--cacert={}", t.ca.display()))
                .arg(format!("--cert={}", t.client_cert.display()))
                .arg(format!("--key={}", t.client_key.display()));
        }
        if let Some(u) = &self.ctl_user {
            c.arg(format!("--user={u}"));
        }
        c.env("ETCDCTL_API", "3").args(args);
        crate::cmd::output(&mut c)
    }

    /// As [`Etcd::ctl`], panicking unless it succeeds; returns stdout.
    #[track_caller]
    pub fn ctl_ok(&self, args: &[&str]) -> String {
        match self.ctl(args) {
            Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
            Ok(o) => panic!(
                "etcdctl {args:?}: {}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => panic!("etcdctl {args:?}: {e}"),
        }
    }

    /// Its log so far.
    pub fn output(&self) -> String {
        self.process
            .as_ref()
            .map(Process::output)
            .unwrap_or_default()
    }
}

/// Test certificates made with the openssl CLI in `dir`: a CA, etcd's
/// server certificate for `UNDERLAY_GW`, and two client certificates
/// (etcdctl's and the agents').
pub fn make_certs(dir: &std::path::Path) -> Result<EtcdTls> {
    crate::cmd::require_tool("openssl", "openssl")?;
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        what: format!("creating {}", dir.display()),
        source,
    })?;
    let p = |n: &str| dir.join(n).display().to_string();
    let run = |args: &[&str]| -> Result<()> {
        crate::cmd::checked(Command::new("openssl").args(args)).map(|_| ())
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=xhost-test-ca",
        "-keyout",
        &p("ca-key.pem"),
        "-out",
        &p("ca.pem"),
    ])?;
    for (name, cn, ext) in [
        (
            "server",
            "etcd",
            format!("subjectAltName=IP:{UNDERLAY_GW}\nextendedKeyUsage=serverAuth"),
        ),
        ("client", "xhost", "extendedKeyUsage=clientAuth".to_owned()),
    ] {
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            &format!("/CN={cn}"),
            "-keyout",
            &p(&format!("{name}-key.pem")),
            "-out",
            &p(&format!("{name}.csr")),
        ])?;
        let extfile = dir.join(format!("{name}.ext"));
        std::fs::write(&extfile, ext).map_err(|source| Error::Io {
            what: "writing an extension file".into(),
            source,
        })?;
        run(&[
            "x509",
            "-req",
            "-in",
            &p(&format!("{name}.csr")),
            "-CA",
            &p("ca.pem"),
            "-CAkey",
            &p("ca-key.pem"),
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            &extfile.display().to_string(),
            "-out",
            &p(&format!("{name}.pem")),
        ])?;
    }
    Ok(EtcdTls {
        ca: dir.join("ca.pem"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server-key.pem"),
        client_cert: dir.join("client.pem"),
        client_key: dir.join("client-key.pem"),
    })
}

impl Drop for Etcd {
    fn drop(&mut self) {
        drop(self.process.take());
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

/// Latency percentiles of a set of samples, in milliseconds.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Percentiles {
    pub samples: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    /// Nearest-rank percentiles of `v` (empty: all zero).
    pub fn of(v: &[Duration]) -> Self {
        let mut v = v.to_vec();
        v.sort();
        let at = |p: f64| {
            v.get(((v.len() as f64 - 1.0) * p).round() as usize)
                .map_or(0.0, |d| d.as_secs_f64() * 1e3)
        };
        Self {
            samples: v.len(),
            p50_ms: at(0.5),
            p99_ms: at(0.99),
            max_ms: at(1.0),
        }
    }
}

/// `cluster_bench scale`: one agent and many simulated hosts in etcd.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ScaleResult {
    pub hosts: u32,
    pub subnets_per_host: u32,
    /// Agent start -> every simulated route in `ROUTES`, seconds.
    pub all_routes_s: f64,
    /// Agent start -> `ready`, seconds.
    pub ready_s: f64,
    /// Agent RSS with every route programmed, bytes.
    pub rss_bytes: u64,
    /// A claim written to etcd -> in `ROUTES`.
    pub claim: Percentiles,
    /// Hosts leaving and joining per second, for 5 s.
    pub churn_hosts_per_s: u32,
    /// `ROUTES` matched the store this long after the last churn write, ms.
    pub churn_behind_ms: f64,
}

/// `cluster_bench docker`: a Docker network created on one host -> routed
/// on another.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DockerConvergence {
    /// The Engine API's network create call returned -> the subnet in the
    /// other host's `ROUTES`.
    pub create: Percentiles,
    /// The Engine API's network delete call started -> the route gone.
    pub remove: Percentiles,
    /// `ROUTES` poll period, ms.
    pub poll_ms: f64,
}
