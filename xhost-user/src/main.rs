//! xhost-user: loads the xhost datapath and keeps its maps in step with
//! Docker and the configured peers.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use xhost_user::{
    agent,
    config::{self, AttachArg, FlagConfig, PeerConfig, TunnelArg, XdpModeArg},
    layout::{DEFAULT_PIN_DIR, DEFAULT_RUN_DIR, Layout},
    report, service, views,
};

#[derive(Parser)]
#[command(
    version,
    about = "eBPF datapath for direct container-to-container traffic between Docker hosts"
)]
struct Cli {
    /// bpffs directory of this instance's pins (maps, links).
    #[arg(long, global = true, env = "XHOST_PIN_DIR", default_value = DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// Directory of the agent's runtime state.
    #[arg(long, global = true, env = "XHOST_RUN_DIR", default_value = DEFAULT_RUN_DIR)]
    run_dir: PathBuf,
    /// More log output (-v debug, -vv trace); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Attach the datapath and follow Docker until SIGINT/SIGTERM.
    Load {
        /// Underlay interface (towards the other hosts).
        #[arg(long)]
        iface: Option<String>,
        /// A Docker bridge to serve (repeatable); Docker's own are found too.
        #[arg(long = "bridge")]
        bridges: Vec<String>,
        /// A peer host and its container subnets: HOST_IP=CIDR[,CIDR...] (repeatable).
        #[arg(long = "peer", value_name = "HOST_IP=CIDR[,CIDR...]")]
        peers: Vec<String>,
        /// TOML config file (same settings as the flags).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Do not follow Docker; serve only --bridge.
        #[arg(long)]
        no_docker: bool,
        /// Docker Engine API endpoint (default: DOCKER_HOST or unix:///var/run/docker.sock).
        #[arg(long)]
        docker_host: Option<String>,
        /// How the XDP validator attaches to the underlay.
        #[arg(long, value_enum)]
        xdp_mode: Option<XdpModeArg>,
        /// How container traffic crosses the underlay: natively routed
        /// (default), or in VXLAN for underlays that do not carry container IPs.
        #[arg(long, value_enum)]
        tunnel: Option<TunnelArg>,
        /// VXLAN network identifier, the same on every host (default 1).
        #[arg(long)]
        vni: Option<u32>,
        /// VXLAN UDP port, the same on every host (default 8472).
        #[arg(long)]
        vxlan_port: Option<u16>,
        /// How TC programs attach: tcx where the kernel has it (6.6+), else
        /// classic tc (clsact + cls_bpf direct-action); tc or tcx forces one.
        #[arg(long, value_enum)]
        attach: Option<AttachArg>,
        /// Pin everything and exit; the datapath keeps forwarding.
        #[arg(long)]
        detach: bool,
        #[command(flatten)]
        etcd: EtcdArgs,
        /// Serve Prometheus metrics at http://IP:PORT/metrics (off unless given).
        #[arg(long, value_name = "IP:PORT")]
        metrics_addr: Option<String>,
    },
    /// Remove the datapath (stops a running agent first).
    Unload {
        /// Refuse unless the instance serves this underlay.
        #[arg(long)]
        iface: Option<String>,
        /// Succeed when nothing is loaded (the service unit's clean-up
        /// before start).
        #[arg(long)]
        missing_ok: bool,
    },
    /// What is attached where, routes, endpoints, counters, Docker view.
    Status {
        #[arg(long, conflicts_with = "watch")]
        json: bool,
        /// Show the counters as rates per second, refreshed every --interval.
        #[arg(long)]
        watch: bool,
        /// Seconds between refreshes of --watch.
        #[arg(long, default_value_t = 1.0, requires = "watch", value_parser = parse_interval)]
        interval: f64,
        /// Stop --watch after this many refreshes (default: until interrupted).
        #[arg(long, requires = "watch")]
        count: Option<u64>,
    },
    /// Print this host's `[[peer]]` entry for the other hosts' configs.
    Export,
    /// Cluster mode: what the running agent knows of the cluster.
    Cluster {
        #[command(subcommand)]
        cmd: ClusterCmd,
    },
}

#[derive(Subcommand)]
#[expect(
    clippy::large_enum_variant,
    reason = "parsed once per process; boxing would only obscure the clap derive"
)]
enum ClusterCmd {
    /// The cluster's hosts and subnets as this host's agent sees them.
    Hosts {
        #[arg(long)]
        json: bool,
    },
    /// Store the cluster's subnet pool: each agent following Docker then
    /// claims a --host-prefix subnet of it and creates a Docker network with it.
    Init {
        /// The pool, e.g. 10.200.0.0/16.
        #[arg(long)]
        pool: String,
        /// Prefix length of each host's subnet, e.g. 24.
        #[arg(long)]
        host_prefix: u8,
        #[command(flatten)]
        etcd: EtcdArgs,
    },
}

/// Cluster mode: hosts find each other's container subnets in etcd.
#[derive(clap::Args)]
struct EtcdArgs {
    /// etcd endpoints, comma-separated: http(s)://HOST:PORT[,...]. Turns on cluster mode.
    #[arg(long, value_delimiter = ',', value_name = "URL[,URL...]")]
    etcd_endpoints: Vec<String>,
    /// Key prefix in etcd (default /xhost/v1).
    #[arg(long)]
    etcd_prefix: Option<String>,
    /// CA certificate (PEM) the etcd server's certificate must chain to.
    #[arg(long)]
    etcd_cafile: Option<PathBuf>,
    /// Client certificate (PEM) for etcd's client-certificate authentication.
    #[arg(long)]
    etcd_certfile: Option<PathBuf>,
    /// Key of --etcd-certfile (PEM).
    #[arg(long)]
    etcd_keyfile: Option<PathBuf>,
    /// etcd user name (with --etcd-password).
    #[arg(long)]
    etcd_username: Option<String>,
    /// etcd password; better given in the environment than on the command line.
    #[arg(long, env = "XHOST_ETCD_PASSWORD", hide_env_values = true)]
    etcd_password: Option<String>,
    /// Seconds this host's claims outlive its agent (default 10).
    #[arg(long)]
    lease_ttl: Option<i64>,
    /// This host's id in the cluster (default: its underlay address).
    #[arg(long)]
    host_id: Option<String>,
    /// Docker network created from the cluster pool (default xhost).
    #[arg(long)]
    pool_network: Option<String>,
}

impl EtcdArgs {
    fn flags(self) -> config::EtcdFlags {
        config::EtcdFlags {
            endpoints: self.etcd_endpoints,
            prefix: self.etcd_prefix,
            cafile: self.etcd_cafile,
            certfile: self.etcd_certfile,
            keyfile: self.etcd_keyfile,
            username: self.etcd_username,
            password: self.etcd_password,
            lease_ttl: self.lease_ttl,
            host_id: self.host_id,
            pool_network: self.pool_network,
        }
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    service::init_logging(level);
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line naming the culprit: the whole cause chain (with
            // journald's error priority when it is journald's stream).
            let msg = format!("xhost-user: {e:#}");
            if service::stderr_is_journal() {
                eprint!("{}", service::journal_lines(3, &msg));
            } else {
                eprintln!("{msg}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}

/// `--interval`: positive seconds.
fn parse_interval(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("`{s}` is not a positive number of seconds")),
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let layout = Layout {
        pin_dir: cli.pin_dir,
        run_dir: cli.run_dir,
    };
    match cli.cmd {
        Cmd::Load {
            iface,
            bridges,
            peers,
            config,
            no_docker,
            docker_host,
            xdp_mode,
            tunnel,
            vni,
            vxlan_port,
            attach,
            detach,
            etcd,
            metrics_addr,
        } => {
            // Parsed here rather than by clap so a bad value is one line
            // with its cause, like every other input error.
            let peers = peers
                .iter()
                .map(|p| p.parse::<PeerConfig>())
                .collect::<Result<Vec<_>, _>>()?;
            let metrics_addr = metrics_addr
                .as_deref()
                .map(config::parse_metrics_addr)
                .transpose()?;
            let flags = FlagConfig {
                iface,
                bridges,
                peers,
                no_docker,
                docker_host,
                xdp_mode,
                tunnel,
                vni,
                vxlan_port,
                attach,
                etcd: etcd.flags(),
                metrics_addr,
            };
            let source = config::Source {
                flags,
                file: config,
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("tokio runtime")?;
            rt.block_on(agent::load(source, layout, detach))
        }
        Cmd::Unload { iface, missing_ok } => report::unload(&layout, iface.as_deref(), missing_ok),
        Cmd::Status {
            watch: true,
            interval,
            count,
            ..
        } => views::rates::watch(&layout, std::time::Duration::from_secs_f64(interval), count),
        Cmd::Status { json, .. } => {
            let s = report::collect(&layout)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                report::print_status(&s);
            }
            Ok(())
        }
        Cmd::Export => {
            print!("{}", report::export(&layout)?);
            Ok(())
        }
        Cmd::Cluster {
            cmd:
                ClusterCmd::Init {
                    pool,
                    host_prefix,
                    etcd,
                },
        } => {
            let c = config::merge_cluster(etcd.flags(), None)?.context("give --etcd-endpoints")?;
            let pool = pool.parse().map_err(|e| anyhow::anyhow!("--pool {e}"))?;
            let pool = xhost_user::store::pool::Pool::new(pool, host_prefix)
                .map_err(anyhow::Error::msg)?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("tokio runtime")?;
            let keys = xhost_user::store::view::Keys::new(&c.prefix);
            let set = rt.block_on(async {
                let mut st = xhost_user::store::etcd::Etcd::connect(&c.etcd)
                    .await
                    .map_err(|e| anyhow::anyhow!("etcd {}: {e}", c.etcd.endpoints.join(",")))?;
                xhost_user::store::pool::init(&mut st, &keys, pool)
                    .await
                    .map_err(anyhow::Error::msg)
            })?;
            println!(
                "pool {} with /{} host subnets at {}",
                set.pool,
                set.host_prefix,
                keys.pool()
            );
            Ok(())
        }
        Cmd::Cluster {
            cmd: ClusterCmd::Hosts { json },
        } => {
            let c = report::cluster(&layout)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&c)?);
            } else {
                report::print_cluster(&c);
            }
            Ok(())
        }
    }
}
