//! `xh-probe`: the traffic endpoints the testbed runs inside container namespaces, so tests
//! need no iperf/nc. Every mode is bounded by `--timeout` and exits by itself.
//!
//! * `xh-probe tcp-recv --port P`: prints `listening ADDR`, accepts one connection, reads
//!   it to EOF and prints `{"peer":..,"bytes":..,"checksum":..,"elapsed_ms":..}`.
//! * `xh-probe tcp-send --to IP:P --bytes N`: sends N pattern bytes and prints
//!   `{"local":..,"to":..,"bytes":..,"checksum":..,"elapsed_ms":..}`.

use std::{
    io::Write,
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use xhost_tests::probe::{run_recv, run_send};

#[derive(Parser)]
#[command(about = "TCP probe endpoints for the xhost testbed")]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Accept one TCP connection and report what arrived.
    TcpRecv {
        #[arg(long)]
        port: u16,
        #[arg(long, default_value_t = Ipv4Addr::UNSPECIFIED)]
        bind: Ipv4Addr,
        /// Seconds before giving up (whole run).
        #[arg(long, default_value_t = 10.0)]
        timeout: f64,
    },
    /// Send pattern bytes over one TCP connection.
    TcpSend {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        bytes: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Seconds before giving up (whole run).
        #[arg(long, default_value_t = 10.0)]
        timeout: f64,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.mode {
        Mode::TcpRecv {
            port,
            bind,
            timeout,
        } => {
            let report = run_recv(SocketAddr::from((bind, port)), seconds(timeout)?, |addr| {
                // Flushed at once: the testbed waits for this line before connecting.
                println!("listening {addr}");
                let _ = std::io::stdout().flush();
            })
            .with_context(|| format!("tcp-recv on port {port}"))?;
            println!("{}", serde_json::to_string(&report)?);
        }
        Mode::TcpSend {
            to,
            bytes,
            seed,
            timeout,
        } => {
            let report = run_send(to, bytes, seed, seconds(timeout)?)
                .with_context(|| format!("tcp-send to {to}"))?;
            println!("{}", serde_json::to_string(&report)?);
        }
    }
    Ok(())
}

fn seconds(s: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(s).with_context(|| format!("invalid --timeout {s}"))
}
