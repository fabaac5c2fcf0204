//! Real-packet checks between namespaces: `ping`, and a bounded TCP transfer through the
//! crate's own `xh-probe` binary whose receiver reports the source address it saw.

use std::{
    io::{self, Read, Write},
    net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{Error, NetNs, Result, cmd};

/// Environment variable overriding where the `xh-probe` binary is.
pub const PROBE_BIN_ENV: &str = "XH_PROBE_BIN";

/// Outcome of [`ping`].
#[derive(Clone, Debug, PartialEq)]
pub struct PingStats {
    pub transmitted: u32,
    pub received: u32,
    /// Average round trip, when any reply came back.
    pub rtt_avg_ms: Option<f64>,
    /// Everything ping printed, for assertion messages.
    pub output: String,
}

impl PingStats {
    /// Every echo request was answered.
    pub fn all_received(&self) -> bool {
        self.transmitted > 0 && self.received == self.transmitted
    }

    /// At least one echo request was answered.
    pub fn any_received(&self) -> bool {
        self.received > 0
    }
}

/// Sends `count` echo requests from `ns` to `dst`, 200 ms apart, waiting at most 1 s for
/// the last reply. An unreachable destination is not an error: it shows as `received == 0`.
pub fn ping(ns: &NetNs, dst: Ipv4Addr, count: u32) -> Result<PingStats> {
    cmd::require_tool("ping", "iputils-ping")?;
    let out = ns.exec(&ping_args(dst.into(), count))?;
    Ok(ping_stats(&out))
}

/// The `ping` command line both [`ping`] and the Docker harness run (iputils `ping`
/// takes either family's address).
pub(crate) fn ping_args(dst: IpAddr, count: u32) -> Vec<String> {
    let count = count.max(1).to_string();
    [
        "ping",
        "-n",
        "-c",
        &count,
        "-i",
        "0.2",
        "-W",
        "1",
        &dst.to_string(),
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

/// Statistics from a finished ping's output (stdout and stderr).
pub(crate) fn ping_stats(out: &std::process::Output) -> PingStats {
    parse_ping(&format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

/// Reads the summary of iputils ping. Output without a summary (e.g. `connect: Network is
/// unreachable`, where nothing was sent) gives zero counts.
pub(crate) fn parse_ping(text: &str) -> PingStats {
    let mut stats = PingStats {
        transmitted: 0,
        received: 0,
        rtt_avg_ms: None,
        output: text.to_owned(),
    };
    for line in text.lines() {
        // `3 packets transmitted, 2 received, +1 errors, 33.3333% packet loss, time 402ms`
        if line.contains("packets transmitted") {
            for part in line.split(',') {
                let mut words = part.split_whitespace();
                let (Some(n), Some(what)) = (words.next(), words.next()) else {
                    continue;
                };
                match (n.parse(), what) {
                    (Ok(n), "packets") => stats.transmitted = n,
                    (Ok(n), "received") => stats.received = n,
                    _ => {}
                }
            }
        }
        // `rtt min/avg/max/mdev = 0.040/0.055/0.070/0.012 ms`
        if let Some(values) = line.strip_prefix("rtt min/avg/max/mdev = ") {
            stats.rtt_avg_ms = values.split('/').nth(1).and_then(|v| v.parse().ok());
        }
    }
    stats
}

/// Parameters of [`tcp_transfer`].
#[derive(Clone, Debug)]
pub struct TransferOpts {
    /// Port the receiver listens on (all addresses of its namespace).
    pub port: u16,
    /// Payload size.
    pub bytes: u64,
    /// Bound on each side's whole run, after which both give up by themselves.
    pub timeout: Duration,
    /// The `xh-probe` binary to run; `None` finds it with [`probe_bin`].
    pub probe: Option<PathBuf>,
}

impl Default for TransferOpts {
    fn default() -> Self {
        Self {
            port: 45_001,
            bytes: 1 << 20,
            timeout: Duration::from_secs(10),
            probe: None,
        }
    }
}

/// What `xh-probe tcp-recv` prints when the connection ends (one JSON line).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecvReport {
    /// The sender's address as the receiver's socket saw it (after any NAT on the path).
    pub peer: SocketAddr,
    pub bytes: u64,
    /// SHA-256 of the received bytes, hex.
    pub checksum: String,
    pub elapsed_ms: f64,
}

/// What `xh-probe tcp-send` prints when done (one JSON line).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SendReport {
    pub local: SocketAddr,
    pub to: SocketAddr,
    pub bytes: u64,
    /// SHA-256 of the sent bytes, hex.
    pub checksum: String,
    pub elapsed_ms: f64,
}

/// Both ends' view of one transfer.
#[derive(Clone, Debug, PartialEq)]
pub struct Transfer {
    pub sent: SendReport,
    pub received: RecvReport,
}

impl Transfer {
    /// Same byte count and same checksum on both ends.
    pub fn intact(&self) -> bool {
        self.sent.bytes == self.received.bytes && self.sent.checksum == self.received.checksum
    }

    /// The source address the receiver saw: the sender's own IP unless something NATed it.
    pub fn source_ip(&self) -> IpAddr {
        self.received.peer.ip()
    }

    /// Goodput seen by the receiver, in Mbit/s.
    pub fn mbit_per_s(&self) -> f64 {
        if self.received.elapsed_ms <= 0.0 {
            return 0.0;
        }
        self.received.bytes as f64 * 8.0 / 1e3 / self.received.elapsed_ms
    }
}

/// Sends `opts.bytes` over TCP from `from` to `to_ip:opts.port`, where a receiver runs in
/// `to`, and returns both ends' reports. Fails (after at most about `opts.timeout`) when
/// the connection cannot be made or breaks; check [`Transfer::intact`] for corruption.
pub fn tcp_transfer(
    from: &NetNs,
    to: &NetNs,
    to_ip: impl Into<IpAddr>,
    opts: &TransferOpts,
) -> Result<Transfer> {
    let to_ip = to_ip.into();
    let secs = opts.timeout.as_secs_f64().to_string();
    let to_addr = SocketAddr::from((to_ip, opts.port)).to_string();
    let port = opts.port.to_string();
    let bytes = opts.bytes.to_string();
    let mut recv = vec!["tcp-recv", "--port", &port, "--timeout", &secs];
    // The receiver listens on the family it is reached by.
    if to_ip.is_ipv6() {
        recv.extend(["--bind", "::"]);
    }
    let (sent, received) = probe_pair(
        (from, to),
        opts.probe.as_deref(),
        &recv,
        &[
            "tcp-send",
            "--to",
            &to_addr,
            "--bytes",
            &bytes,
            "--timeout",
            &secs,
        ],
        opts.timeout,
    )?;
    Ok(Transfer { sent, received })
}

/// Starts `xh-probe <recv_args>` in `to`, waits for its `listening` line
/// (a connection or datagram sent before it would be refused), runs
/// `xh-probe <send_args>` in `from` to the end, and returns the sender's
/// report and the receiver's (which it must print within `wait`).
fn probe_pair<S: for<'de> Deserialize<'de>, R: for<'de> Deserialize<'de>>(
    (from, to): (&NetNs, &NetNs),
    probe: Option<&Path>,
    recv_args: &[&str],
    send_args: &[&str],
    wait: Duration,
) -> Result<(S, R)> {
    let bin = match probe {
        Some(p) => p.to_owned(),
        None => probe_bin()?,
    };
    let with_bin = |args: &[&str]| -> Vec<std::ffi::OsString> {
        std::iter::once(bin.clone().into_os_string())
            .chain(args.iter().map(Into::into))
            .collect()
    };
    let mut receiver = to.spawn(
        &format!("xh-probe {} in {}", recv_args[0], to.name()),
        &with_bin(recv_args),
    )?;
    receiver.wait_for_line(|l| l.starts_with("listening"), Duration::from_secs(5))?;
    let sender = cmd::checked(&mut from.command(&with_bin(send_args)))?;
    let sent: S = parse_report(&String::from_utf8_lossy(&sender.stdout))?;
    let line = receiver.wait_for_line(|l| l.starts_with('{'), wait)?;
    let received: R = parse_report(&line)?;
    receiver.wait_timeout(Duration::from_secs(2))?;
    Ok((sent, received))
}

/// Parameters of [`udp_gso_transfer`].
#[derive(Clone, Debug)]
pub struct UdpGsoOpts {
    /// Port the receiver binds (all addresses of its namespace).
    pub port: u16,
    /// Payload bytes per datagram (`UDP_SEGMENT`).
    pub segment: u16,
    /// Datagrams per send: each send leaves the sender as one GSO skb.
    pub segments: u16,
    /// Number of sends.
    pub bursts: u32,
    /// How long the receiver waits for all the datagrams.
    pub timeout: Duration,
    /// The `xh-probe` binary to run; `None` finds it with [`probe_bin`].
    pub probe: Option<PathBuf>,
}

impl Default for UdpGsoOpts {
    fn default() -> Self {
        Self {
            port: 45_201,
            segment: 1400,
            segments: 8,
            bursts: 10,
            timeout: Duration::from_secs(5),
            probe: None,
        }
    }
}

/// What `xh-probe udp-gso-send` prints when done (one JSON line).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UdpSendReport {
    pub to: SocketAddr,
    pub bursts: u32,
    pub segment: u16,
    pub segments: u16,
}

/// What `xh-probe udp-recv` prints (one JSON line): what arrived before the
/// expected count was reached or the time ran out.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UdpRecvReport {
    pub datagrams: u64,
    pub bytes: u64,
    /// Datagrams of another length than the expected one.
    pub odd_sizes: u64,
}

/// Both ends' view of one [`udp_gso_transfer`].
#[derive(Clone, Debug, PartialEq)]
pub struct UdpTransfer {
    pub sent: UdpSendReport,
    pub received: UdpRecvReport,
}

impl UdpTransfer {
    /// Every datagram sent arrived, each of the segment's length.
    pub fn complete(&self) -> bool {
        let expected = u64::from(self.sent.bursts) * u64::from(self.sent.segments);
        self.received.datagrams == expected && self.received.odd_sizes == 0
    }
}

/// Sends `opts.bursts` UDP GSO sends of `opts.segments` datagrams from `from`
/// to `to_ip:opts.port`, where a receiver runs in `to`, and returns both
/// ends' reports. Datagrams that never arrive are not an error: the
/// receiver reports what it got within `opts.timeout`.
pub fn udp_gso_transfer(
    from: &NetNs,
    to: &NetNs,
    to_ip: Ipv4Addr,
    opts: &UdpGsoOpts,
) -> Result<UdpTransfer> {
    let secs = opts.timeout.as_secs_f64().to_string();
    let to_addr = SocketAddr::from((to_ip, opts.port)).to_string();
    let port = opts.port.to_string();
    let expect = (u64::from(opts.bursts) * u64::from(opts.segments)).to_string();
    let (segment, segments, bursts) = (
        opts.segment.to_string(),
        opts.segments.to_string(),
        opts.bursts.to_string(),
    );
    let (sent, received) = probe_pair(
        (from, to),
        opts.probe.as_deref(),
        &[
            "udp-recv",
            "--port",
            &port,
            "--datagrams",
            &expect,
            "--size",
            &segment,
            "--timeout",
            &secs,
        ],
        &[
            "udp-gso-send",
            "--to",
            &to_addr,
            "--segment",
            &segment,
            "--segments",
            &segments,
            "--bursts",
            &bursts,
        ],
        opts.timeout * 2,
    )?;
    Ok(UdpTransfer { sent, received })
}

/// Receiver side of [`udp_gso_transfer`]: binds `bind`, calls
/// `on_listening`, and counts datagrams until `expect` arrived or `timeout`
/// passed.
pub fn run_udp_recv(
    bind: SocketAddr,
    expect: u64,
    size: usize,
    timeout: Duration,
    on_listening: impl FnOnce(SocketAddr),
) -> io::Result<UdpRecvReport> {
    let deadline = Instant::now() + timeout;
    let socket = UdpSocket::bind(bind)?;
    on_listening(socket.local_addr()?);
    let mut report = UdpRecvReport {
        datagrams: 0,
        bytes: 0,
        odd_sizes: 0,
    };
    let mut buf = vec![0u8; CHUNK];
    while report.datagrams < expect {
        let Ok(left) = remaining(deadline, "receiving") else {
            break;
        };
        socket.set_read_timeout(Some(left))?;
        match socket.recv(&mut buf) {
            Ok(n) => {
                report.datagrams += 1;
                report.bytes += n as u64;
                report.odd_sizes += u64::from(n != size);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                break;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(report)
}

/// Sender side of [`udp_gso_transfer`]: `bursts` sends of `segments` x
/// `segment` bytes with `UDP_SEGMENT`, each leaving as one GSO skb, a
/// millisecond apart so the receiver's buffer keeps up.
pub fn run_udp_gso_send(
    to: SocketAddr,
    segment: u16,
    segments: u16,
    bursts: u32,
) -> io::Result<UdpSendReport> {
    let socket = UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))?;
    socket.connect(to)?;
    nix::sys::socket::setsockopt(
        &socket,
        nix::sys::socket::sockopt::UdpGsoSegment,
        &i32::from(segment),
    )
    .map_err(io::Error::from)?;
    let mut buf = vec![0u8; usize::from(segment) * usize::from(segments)];
    let mut pattern = Pattern::new(u64::from(segment));
    for _ in 0..bursts {
        pattern.fill(&mut buf);
        let n = socket.send(&buf)?;
        if n != buf.len() {
            return Err(io::Error::other(format!(
                "sent {n} of {} bytes in one send",
                buf.len()
            )));
        }
        thread::sleep(Duration::from_millis(1));
    }
    Ok(UdpSendReport {
        to,
        bursts,
        segment,
        segments,
    })
}

/// The last JSON line of a probe's output.
pub(crate) fn parse_report<T: for<'de> Deserialize<'de>>(text: &str) -> Result<T> {
    text.lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .and_then(|l| serde_json::from_str(l).ok())
        .ok_or_else(|| Error::Parse {
            what: "xh-probe report",
            input: text.to_owned(),
        })
}

/// Locates the `xh-probe` binary: `$XH_PROBE_BIN`, else next to the running executable.
pub fn probe_bin() -> Result<PathBuf> {
    workspace_bin(
        "xh-probe",
        PROBE_BIN_ENV,
        "cargo build -p xhost-tests --bin xh-probe",
    )
}

/// Locates a workspace binary: `$env` if set, else next to the running
/// executable or one directory up (test binaries live in
/// `target/<profile>/deps/`, bins in `target/<profile>/`). `build` says how
/// to make it when it is missing.
pub fn workspace_bin(name: &str, env: &str, build: &str) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().map_err(|source| Error::Io {
        what: "locating the current executable".into(),
        source,
    })?;
    exe.ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            Error::Config(format!(
                "{name} not found near {} (build it: {build}, or set {env})",
                exe.display()
            ))
        })
}

/// Deterministic payload: a xorshift64 stream, so the data is not trivially compressible
/// or all zeros (which would hide byte-order or offset bugs).
pub struct Pattern(u64);

impl Pattern {
    pub fn new(seed: u64) -> Self {
        // xorshift must not start from 0, or it stays 0 forever.
        Self(seed | 1)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            let n = chunk.len();
            chunk.copy_from_slice(&self.0.to_le_bytes()[..n]);
        }
    }
}

const CHUNK: usize = 64 * 1024;
const POLL: Duration = Duration::from_millis(5);

fn timed_out(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, format!("timed out {what}"))
}

fn remaining(deadline: Instant, what: &str) -> io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err(timed_out(what))
    } else {
        Ok(left)
    }
}

/// Receiver side: binds `bind`, calls `on_listening` with the bound address, accepts one
/// connection and reads it to EOF, all within `timeout`.
pub fn run_recv(
    bind: SocketAddr,
    timeout: Duration,
    on_listening: impl FnOnce(SocketAddr),
) -> io::Result<RecvReport> {
    let deadline = Instant::now() + timeout;
    let listener = TcpListener::bind(bind)?;
    // Non-blocking accept lets us honour the deadline without a helper thread.
    listener.set_nonblocking(true)?;
    on_listening(listener.local_addr()?);
    let (mut stream, peer) = loop {
        match listener.accept() {
            Ok(conn) => break conn,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                remaining(deadline, "waiting for a connection")?;
                thread::sleep(POLL);
            }
            Err(e) => return Err(e),
        }
    };
    stream.set_nonblocking(false)?;
    let started = Instant::now();
    let mut hasher = Sha256::new();
    let mut bytes = 0u64;
    let mut buf = vec![0u8; CHUNK];
    loop {
        stream.set_read_timeout(Some(remaining(deadline, "receiving")?))?;
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                hasher.update(&buf[..n]);
                bytes += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(timed_out("receiving"));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(RecvReport {
        peer,
        bytes,
        checksum: hex(&hasher.finalize()),
        elapsed_ms: started.elapsed().as_secs_f64() * 1e3,
    })
}

/// Sender side: connects to `to`, sends `bytes` of [`Pattern`] data, half-closes and waits
/// for the receiver to close, all within `timeout`.
pub fn run_send(
    to: SocketAddr,
    bytes: u64,
    seed: u64,
    timeout: Duration,
) -> io::Result<SendReport> {
    run_send_paced(to, bytes, seed, timeout, None)
}

/// As [`run_send`], holding the rate at `rate` bytes per second when given
/// (a transfer that lasts, to span something done to the path meanwhile).
pub fn run_send_paced(
    to: SocketAddr,
    bytes: u64,
    seed: u64,
    timeout: Duration,
    rate: Option<u64>,
) -> io::Result<SendReport> {
    let deadline = Instant::now() + timeout;
    let mut stream = TcpStream::connect_timeout(&to, remaining(deadline, "connecting")?)?;
    let local = stream.local_addr()?;
    let started = Instant::now();
    let mut pattern = Pattern::new(seed);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut left = bytes;
    while left > 0 {
        let n = usize::try_from(left).map_or(CHUNK, |l| l.min(CHUNK));
        pattern.fill(&mut buf[..n]);
        stream.set_write_timeout(Some(remaining(deadline, "sending")?))?;
        stream.write_all(&buf[..n])?;
        hasher.update(&buf[..n]);
        left -= n as u64;
        if let Some(rate) = rate.filter(|r| *r > 0) {
            // On schedule: byte k leaves no earlier than k / rate seconds in.
            let due = started + Duration::from_secs_f64((bytes - left) as f64 / rate as f64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                thread::sleep(wait);
            }
        }
    }
    stream.shutdown(Shutdown::Write)?;
    // Wait for the receiver's close so "sent" means "read by the peer", not "queued".
    loop {
        stream.set_read_timeout(Some(remaining(deadline, "waiting for the receiver")?))?;
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(timed_out("waiting for the receiver"));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(SendReport {
        local,
        to,
        bytes,
        checksum: hex(&hasher.finalize()),
        elapsed_ms: started.elapsed().as_secs_f64() * 1e3,
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;

    #[test]
    fn parses_ping_success_and_failure() {
        let ok = "PING 192.168.110.1 (192.168.110.1) 56(84) bytes of data.\n\
                  64 bytes from 192.168.110.1: icmp_seq=1 ttl=64 time=0.050 ms\n\n\
                  --- 192.168.110.1 ping statistics ---\n\
                  3 packets transmitted, 3 received, 0% packet loss, time 402ms\n\
                  rtt min/avg/max/mdev = 0.040/0.055/0.070/0.012 ms\n";
        let s = parse_ping(ok);
        assert_eq!((s.transmitted, s.received), (3, 3));
        assert_eq!(s.rtt_avg_ms, Some(0.055));
        assert!(s.all_received());

        let unreachable = "From 192.168.110.1 icmp_seq=1 Destination Net Unreachable\n\n\
                           --- 192.168.220.11 ping statistics ---\n\
                           2 packets transmitted, 0 received, +2 errors, 100% packet loss, time 201ms\n";
        let s = parse_ping(unreachable);
        assert_eq!((s.transmitted, s.received), (2, 0));
        assert!(!s.any_received());

        let s = parse_ping("ping: connect: Network is unreachable\n");
        assert_eq!((s.transmitted, s.received), (0, 0));
        assert!(!s.all_received());
    }

    #[test]
    fn pattern_is_deterministic_and_nonzero() {
        let (mut a, mut b) = ([0u8; 37], [0u8; 37]);
        Pattern::new(7).fill(&mut a);
        Pattern::new(7).fill(&mut b);
        assert_eq!(a, b);
        assert!(a.iter().any(|&x| x != 0));
        Pattern::new(8).fill(&mut b);
        assert_ne!(a, b);
    }

    #[test]
    fn transfers_over_loopback() {
        let (tx, rx) = mpsc::channel();
        let recv = thread::spawn(move || {
            run_recv(
                "127.0.0.1:0".parse().expect("addr"),
                Duration::from_secs(10),
                |a| {
                    let _ = tx.send(a);
                },
            )
        });
        let addr = rx.recv_timeout(Duration::from_secs(5)).expect("listening");
        let sent = run_send(addr, 300_001, 42, Duration::from_secs(10)).expect("send");
        let got = recv.join().expect("receiver thread").expect("receive");
        assert_eq!(got.bytes, 300_001);
        assert_eq!(got.checksum, sent.checksum);
        assert_eq!(got.peer, sent.local);
    }

    #[test]
    fn receiver_gives_up_at_deadline() {
        let err = run_recv(
            "127.0.0.1:0".parse().expect("addr"),
            Duration::from_millis(50),
            |_| {},
        )
        .expect_err("nobody connects");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }

    #[test]
    fn reports_round_trip_through_json() {
        let r = RecvReport {
            peer: "192.168.110.11:40000".parse().expect("addr"),
            bytes: 5,
            checksum: "ab".into(),
            elapsed_ms: 1.5,
        };
        let line = serde_json::to_string(&r).expect("json");
        let back: RecvReport =
            parse_report(&format!("listening 0.0.0.0:1\n{line}\n")).expect("parse");
        assert_eq!(back, r);
    }
}

/// What `xh-probe udp-seq-recv` prints: of the datagrams numbered
/// `0..count`, how many arrived, how many never did, and repeats (counted
/// by [`crate::flow::SeqReceiver`], as the fault tests' flows are).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeqRecvReport {
    pub received: u64,
    pub missing: u64,
    pub duplicates: u64,
    /// Datagrams numbered `count` or more: not the sender's.
    pub strays: u64,
    /// Of the missing, how many the receiving socket dropped itself
    /// (buffer full), see [`crate::flow::udp_rcvbuf_errors`].
    pub rcvbuf_errors: u64,
    /// The first number that never arrived.
    pub first_missing: Option<u64>,
}

/// What `xh-probe udp-seq-send` prints.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SeqSendReport {
    pub sent: u64,
    /// Of those, the sends the kernel refused (no route, ...).
    pub send_errors: u64,
    pub elapsed_ms: f64,
}

/// Receiver of [`run_udp_seq_send`]: binds `bind`, calls `on_listening`,
/// and collects the numbered datagrams that arrive until all of `0..count`
/// did or `timeout` passed.
pub fn run_udp_seq_recv(
    bind: SocketAddr,
    count: u64,
    timeout: Duration,
    on_listening: impl FnOnce(SocketAddr),
) -> io::Result<SeqRecvReport> {
    let deadline = Instant::now() + timeout;
    let mut receiver = crate::flow::SeqReceiver::bind(bind)?;
    on_listening(receiver.local_addr()?);
    while !receiver.has_all(count) {
        let Ok(left) = remaining(deadline, "receiving") else {
            break;
        };
        receiver.poll(left)?;
    }
    let t = receiver.finish().tally(count);
    Ok(SeqRecvReport {
        received: t.received,
        missing: t.lost,
        duplicates: t.duplicates,
        strays: t.strays,
        rcvbuf_errors: t.rcvbuf_errors,
        first_missing: t.first_missing(),
    })
}

/// Sends datagrams numbered `0..count` to `to` at `rate` per second, each
/// on its slot of a fixed schedule ([`crate::flow::SeqSender`]).
pub fn run_udp_seq_send(to: SocketAddr, count: u64, rate: u32) -> io::Result<SeqSendReport> {
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    let started = Instant::now();
    let mut sender = crate::flow::SeqSender::new(to, interval, started)?;
    while sender.sent() < count {
        sender.send_next();
    }
    Ok(SeqSendReport {
        sent: sender.sent(),
        send_errors: sender.send_errors(),
        elapsed_ms: started.elapsed().as_secs_f64() * 1e3,
    })
}
