//! xhost-user: loads the xhost datapath and keeps its maps in step with
//! Docker and the configured peers.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use xhost_user::{
    agent, config,
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
        #[command(flatten)]
        settings: config::SettingsLayer,
        /// TOML config file (same settings as the flags).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Pin everything and exit; the datapath keeps forwarding.
        #[arg(long)]
        detach: bool,
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
        /// Cluster mode: keep the cluster lease of an agent that was killed
        /// (a restart within the lease TTL then keeps its claims); without
        /// it the lease is revoked and the other hosts drop this host's
        /// routes at once.
        #[arg(long)]
        keep_lease: bool,
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
enum ClusterCmd {
    /// The cluster's hosts, subnets and conflicts, read from etcd (no agent
    /// needed); the store's endpoints as for load (flags or --config).
    Hosts {
        #[arg(long)]
        json: bool,
        /// TOML config file: its [etcd] table.
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(flatten)]
        etcd: config::EtcdLayer,
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
        etcd: config::EtcdLayer,
    },
}

fn main() -> std::process::ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => match own_error(&e) {
            Some(msg) => return fail(&msg),
            None => e.exit(),
        },
    };
    let level = match cli.verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    service::init_logging(level);
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => fail(&format!("{e:#}")),
    }
}

/// One line naming the culprit: the whole cause chain (with journald's
/// error priority when it is journald's stream).
fn fail(cause: &str) -> std::process::ExitCode {
    let msg = format!("xhost-user: {cause}");
    if service::stderr_is_journal() {
        eprint!("{}", service::journal_lines(3, &msg));
    } else {
        eprintln!("{msg}");
    }
    std::process::ExitCode::FAILURE
}

/// A value refused by xhost's own parser (`--peer`, `--metrics-addr`),
/// with its causes, to print as one line like every other input error
/// rather than as clap's usage error.
fn own_error(e: &clap::Error) -> Option<String> {
    use std::error::Error as _;
    if e.kind() != clap::error::ErrorKind::ValueValidation {
        return None;
    }
    let own = e.source()?.downcast_ref::<config::ConfigError>()?;
    let mut msg = own.to_string();
    let mut cause = own.source();
    while let Some(c) = cause {
        msg = format!("{msg}: {c}");
        cause = c.source();
    }
    Some(msg)
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
            settings,
            config,
            detach,
        } => {
            let source = config::Source {
                flags: settings,
                file: config,
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("tokio runtime")?;
            rt.block_on(agent::load(source, layout, detach))
        }
        Cmd::Unload {
            iface,
            missing_ok,
            keep_lease,
        } => report::unload(&layout, iface.as_deref(), missing_ok, keep_lease),
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
            let c = config::resolve_cluster(etcd)?.context("give --etcd-endpoints")?;
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
            cmd: ClusterCmd::Hosts { json, config, etcd },
        } => {
            // The flags over the file's [etcd], as for load.
            let flags = config::SettingsLayer {
                etcd,
                ..config::SettingsLayer::default()
            };
            let merged = match config.as_deref().map(config::read_file).transpose()? {
                Some(file) => config::layer(&flags, file)?,
                None => flags,
            };
            let c = config::resolve_cluster(merged.etcd)?.context(
                "give the cluster's etcd: --etcd-endpoints, or --config with an [etcd] table",
            )?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("tokio runtime")?;
            let c = rt.block_on(xhost_user::store::source::read_cluster(&c))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&c)?);
            } else {
                report::print_cluster(&c);
            }
            Ok(())
        }
    }
}
