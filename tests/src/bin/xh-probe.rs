//! `xh-probe`: the traffic endpoints the testbed runs inside container namespaces, so tests
//! need no iperf/nc. Every mode is bounded by `--timeout` and exits by itself.
//!
//! * `xh-probe tcp-recv --port P`: prints `listening ADDR`, accepts one connection, reads
//!   it to EOF and prints `{"peer":..,"bytes":..,"checksum":..,"elapsed_ms":..}`.
//! * `xh-probe tcp-send --to IP:P --bytes N`: sends N pattern bytes and prints
//!   `{"local":..,"to":..,"bytes":..,"checksum":..,"elapsed_ms":..}`.
//! * `xh-probe udp-recv --port P --datagrams N --size S`: prints `listening ADDR`, counts
//!   datagrams until N arrived or the time is up and prints
//!   `{"datagrams":..,"bytes":..,"odd_sizes":..}` (sizes other than S).
//! * `xh-probe udp-gso-send --to IP:P --segment S --segments K --bursts B`: B sends of K
//!   datagrams of S bytes with `UDP_SEGMENT` (one GSO skb each).
//! * `xh-probe udp-seq-recv --port P --count N`: prints `listening ADDR`, collects the
//!   sequence numbers of up to N datagrams until they all arrived or the time is up and
//!   prints `{"received":..,"missing":..,"duplicates":..,"strays":..,"rcvbuf_errors":..,
//!   "first_missing":..}`, counted as the fault tests' flows count (`xhost_tests::flow`).
//! * `xh-probe udp-seq-send --to IP:P --count N --rate R`: sends N datagrams numbered
//!   0..N at R per second, on a fixed schedule, and prints
//!   `{"sent":..,"send_errors":..,"elapsed_ms":..}`.

use std::{
    io::Write,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use xhost_tests::probe::{
    run_recv, run_send_paced, run_udp_gso_send, run_udp_recv, run_udp_seq_recv, run_udp_seq_send,
};

#[derive(Parser)]
#[command(about = "TCP and UDP probe endpoints for the xhost testbed")]
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
        /// `::` for IPv6 (IPv4 clients would then show as `::ffff:a.b.c.d`).
        #[arg(long, default_value_t = IpAddr::V4(Ipv4Addr::UNSPECIFIED))]
        bind: IpAddr,
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
        /// Hold the sending rate at this many bytes per second (default: as fast as it goes).
        #[arg(long)]
        rate: Option<u64>,
        /// Seconds before giving up (whole run).
        #[arg(long, default_value_t = 10.0)]
        timeout: f64,
    },
    /// Collect numbered UDP datagrams and report which never arrived.
    UdpSeqRecv {
        #[arg(long)]
        port: u16,
        #[arg(long, default_value_t = Ipv4Addr::UNSPECIFIED)]
        bind: Ipv4Addr,
        /// How many the sender sends (numbered 0..count).
        #[arg(long)]
        count: u64,
        /// Seconds to wait for them.
        #[arg(long, default_value_t = 30.0)]
        timeout: f64,
    },
    /// Send numbered UDP datagrams at a fixed rate.
    UdpSeqSend {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        count: u64,
        /// Datagrams per second.
        #[arg(long)]
        rate: u32,
    },
    /// Count the UDP datagrams that arrive (missing ones are reported, not an error).
    UdpRecv {
        #[arg(long)]
        port: u16,
        #[arg(long, default_value_t = Ipv4Addr::UNSPECIFIED)]
        bind: Ipv4Addr,
        /// Stop once this many arrived.
        #[arg(long)]
        datagrams: u64,
        /// The expected length of each datagram.
        #[arg(long)]
        size: usize,
        /// Seconds to wait for them.
        #[arg(long, default_value_t = 5.0)]
        timeout: f64,
    },
    /// Send UDP GSO bursts (`UDP_SEGMENT`).
    UdpGsoSend {
        #[arg(long)]
        to: SocketAddr,
        /// Payload bytes per datagram.
        #[arg(long)]
        segment: u16,
        /// Datagrams per send.
        #[arg(long)]
        segments: u16,
        /// Number of sends.
        #[arg(long)]
        bursts: u32,
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
            let report = run_recv(SocketAddr::from((bind, port)), seconds(timeout)?, listening)
                .with_context(|| format!("tcp-recv on port {port}"))?;
            println!("{}", serde_json::to_string(&report)?);
        }
        Mode::TcpSend {
            to,
            bytes,
            seed,
            rate,
            timeout,
        } => {
            let report = run_send_paced(to, bytes, seed, seconds(timeout)?, rate)
                .with_context(|| format!("tcp-send to {to}"))?;
            println!("{}", serde_json::to_string(&report)?);
        }
        Mode::UdpRecv {
            port,
            bind,
            datagrams,
            size,
            timeout,
        } => {
            let report = run_udp_recv(
                SocketAddr::from((bind, port)),
                datagrams,
                size,
                seconds(timeout)?,
                listening,
            )
            .with_context(|| format!("udp-recv on port {port}"))?;
            println!("{}", serde_json::to_string(&report)?);
        }
        Mode::UdpSeqRecv {
            port,
            bind,
            count,
            timeout,
        } => {
            let report = run_udp_seq_recv(
                SocketAddr::from((bind, port)),
                count,
                seconds(timeout)?,
                listening,
            )
            .with_context(|| format!("udp-seq-recv on port {port}"))?;
            println!("{}", serde_json::to_string(&report)?);
        }
        Mode::UdpSeqSend { to, count, rate } => {
            let report = run_udp_seq_send(to, count, rate)
                .with_context(|| format!("udp-seq-send to {to}"))?;
            println!("{}", serde_json::to_string(&report)?);
        }
        Mode::UdpGsoSend {
            to,
            segment,
            segments,
            bursts,
        } => {
            let report = run_udp_gso_send(to, segment, segments, bursts)
                .with_context(|| format!("udp-gso-send to {to}"))?;
            println!("{}", serde_json::to_string(&report)?);
        }
    }
    Ok(())
}

/// Announces the bound address, flushed at once: the testbed waits for this line before
/// it sends.
fn listening(addr: SocketAddr) {
    println!("listening {addr}");
    let _ = std::io::stdout().flush();
}

fn seconds(s: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(s).with_context(|| format!("invalid --timeout {s}"))
}
