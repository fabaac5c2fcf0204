//! A steady UDP flow with sequence numbers between two network namespaces,
//! run in-process (one sender and one receiver thread, each entered into
//! its namespace), to count what a fault loses and time when traffic is
//! back.
//!
//! The sender keeps an absolute schedule (datagram `n` leaves at
//! `start + n * interval`, or at once if it fell behind), so a run of missing
//! sequence numbers measures how long the path was broken. Both threads
//! share one monotonic clock, so arrival times compare with the instant a
//! test injected its fault.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use crate::{Error, Result};

/// Bytes of each datagram: the sequence number (u64, little endian) and
/// padding, a typical small packet.
const DATAGRAM: usize = 64;
/// How long the receiver waits for stragglers after the sender stopped.
const DRAIN: Duration = Duration::from_millis(300);

/// A running flow; [`UdpFlow::stop`] ends it and returns the report.
pub struct UdpFlow {
    label: String,
    start: Instant,
    interval: Duration,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    sender: Option<JoinHandle<Result<SendStats>>>,
    receiver: Option<JoinHandle<Result<Received>>>,
}

/// What the receiver thread saw.
struct Received {
    got: Vec<(u64, Instant)>,
    /// Growth of the receiving namespace's UDP `RcvbufErrors` over the run.
    rcvbuf_errors: u64,
}

/// UDP `RcvbufErrors` of the calling thread's network namespace
/// (`/proc/thread-self/net/snmp`): datagrams the kernel delivered to the
/// host but dropped because the socket's buffer was full (the receiver
/// fell behind), as opposed to lost on the way.
pub fn udp_rcvbuf_errors() -> u64 {
    let text = std::fs::read_to_string("/proc/thread-self/net/snmp").unwrap_or_default();
    let mut udp = text.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

#[derive(Debug, Default)]
struct SendStats {
    sent: u64,
    send_errors: u64,
}

/// What one flow saw.
#[derive(Clone, Debug)]
pub struct FlowReport {
    pub label: String,
    /// Datagrams sent (sequence numbers 0..sent).
    pub sent: u64,
    /// Distinct datagrams received.
    pub received: u64,
    /// `sent - received`.
    pub lost: u64,
    /// Sends the kernel refused (no route, ...): counted as sent and lost.
    pub send_errors: u64,
    /// Of the lost, how many the receiving socket dropped itself (buffer
    /// full: the receiver thread did not get the CPU in time), see
    /// [`udp_rcvbuf_errors`].
    pub rcvbuf_errors: u64,
    /// Datagrams received more than once (a forwarding loop would show).
    pub duplicates: u64,
    /// Runs of missing sequence numbers, as (first, last) inclusive.
    pub gaps: Vec<(u64, u64)>,
    /// Pace of the sender.
    pub interval: Duration,
    start: Instant,
    /// Arrival time of each received sequence number.
    arrivals: BTreeMap<u64, Instant>,
}

impl UdpFlow {
    /// Starts a receiver on `to_port` in the namespace `to_ns` and a sender
    /// in `from_ns` sending to `to_ip:to_port` every `interval`. Returns once
    /// the receiver is bound, so no datagram is sent into a closed port.
    pub fn start(
        label: &str,
        from_ns: &Path,
        to_ns: &Path,
        to_ip: Ipv4Addr,
        to_port: u16,
        interval: Duration,
    ) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
        let rx_stop = Arc::clone(&stop);
        let to_ns_owned = to_ns.to_owned();
        let receiver = thread::spawn(move || -> Result<Received> {
            let socket = enter(&to_ns_owned)
                .and_then(|()| {
                    let s = UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, to_port)))
                        .map_err(io(format!("binding UDP {to_port}")))?;
                    s.set_read_timeout(Some(Duration::from_millis(20)))
                        .map_err(io("setting a read timeout".into()))?;
                    Ok(s)
                })
                .inspect_err(|e| {
                    let _ = ready_tx.send(Err(Error::Config(e.to_string())));
                })?;
            let _ = ready_tx.send(Ok(()));
            let rcvbuf_before = udp_rcvbuf_errors();
            let mut got = Vec::new();
            let mut buf = [0u8; 2048];
            let mut stopped_at: Option<Instant> = None;
            loop {
                match socket.recv(&mut buf) {
                    Ok(n) if n >= 8 => {
                        let seq = u64::from_le_bytes(buf[..8].try_into().unwrap_or_default());
                        got.push((seq, Instant::now()));
                    }
                    Ok(_) => {}
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock
                                | std::io::ErrorKind::TimedOut
                                | std::io::ErrorKind::Interrupted
                        ) => {}
                    Err(e) => return Err(io("receiving".into())(e)),
                }
                if rx_stop.load(Ordering::Acquire) {
                    let t = *stopped_at.get_or_insert_with(Instant::now);
                    if t.elapsed() >= DRAIN {
                        let rcvbuf_errors = udp_rcvbuf_errors().saturating_sub(rcvbuf_before);
                        return Ok(Received { got, rcvbuf_errors });
                    }
                }
            }
        });
        match ready_rx.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = receiver.join();
                return Err(e);
            }
            Err(_) => {
                stop.store(true, Ordering::Release);
                let _ = receiver.join();
                return Err(Error::Config(format!("{label}: receiver did not start")));
            }
        }
        let start = Instant::now();
        let tx_stop = Arc::clone(&stop);
        let tx_sent = Arc::clone(&sent);
        let from_ns = from_ns.to_owned();
        let sender = thread::spawn(move || -> Result<SendStats> {
            enter(&from_ns)?;
            let socket = UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))
                .map_err(io("binding the sender".into()))?;
            let to = SocketAddr::from((to_ip, to_port));
            let mut stats = SendStats::default();
            let mut buf = [0u8; DATAGRAM];
            let mut seq = 0u64;
            while !tx_stop.load(Ordering::Acquire) {
                let due = start + interval * u32::try_from(seq).unwrap_or(u32::MAX);
                let now = Instant::now();
                if due > now {
                    thread::sleep(due - now);
                }
                buf[..8].copy_from_slice(&seq.to_le_bytes());
                // Unconnected: an ICMP error from the path does not fail later sends.
                if socket.send_to(&buf, to).is_err() {
                    stats.send_errors += 1;
                }
                seq += 1;
                stats.sent = seq;
                tx_sent.store(seq, Ordering::Release);
            }
            Ok(stats)
        });
        Ok(Self {
            label: label.to_owned(),
            start,
            interval,
            stop,
            sent,
            sender: Some(sender),
            receiver: Some(receiver),
        })
    }

    /// Datagrams sent so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Acquire)
    }

    /// Stops the sender, lets the last datagrams arrive and reports.
    pub fn stop(mut self) -> Result<FlowReport> {
        self.finish()
    }

    fn finish(&mut self) -> Result<FlowReport> {
        self.stop.store(true, Ordering::Release);
        let stats = join(self.sender.take(), &self.label, "sender")?;
        let Received { got, rcvbuf_errors } = join(self.receiver.take(), &self.label, "receiver")?;
        let mut arrivals = BTreeMap::new();
        let mut duplicates = 0;
        for (seq, at) in got {
            if seq >= stats.sent || arrivals.insert(seq, at).is_some() {
                duplicates += u64::from(seq < stats.sent);
            }
        }
        let mut gaps = Vec::new();
        let mut next = 0u64;
        for &seq in arrivals.keys() {
            if seq > next {
                gaps.push((next, seq - 1));
            }
            next = seq + 1;
        }
        if next < stats.sent {
            gaps.push((next, stats.sent - 1));
        }
        let received = arrivals.len() as u64;
        Ok(FlowReport {
            label: self.label.clone(),
            sent: stats.sent,
            received,
            lost: stats.sent - received,
            send_errors: stats.send_errors,
            rcvbuf_errors,
            duplicates,
            gaps,
            interval: self.interval,
            start: self.start,
            arrivals,
        })
    }
}

impl Drop for UdpFlow {
    fn drop(&mut self) {
        if self.sender.is_some() || self.receiver.is_some() {
            let _ = self.finish();
        }
    }
}

impl FlowReport {
    /// When datagram `seq` was due to leave.
    pub fn due(&self, seq: u64) -> Instant {
        self.start + self.interval * u32::try_from(seq).unwrap_or(u32::MAX)
    }

    /// The longest run of missing datagrams, as time at the sender's pace.
    pub fn longest_outage(&self) -> Duration {
        self.gaps
            .iter()
            .map(|(a, b)| self.interval * u32::try_from(b - a + 1).unwrap_or(u32::MAX))
            .max()
            .unwrap_or_default()
    }

    /// Datagrams lost on the way: lost, less those the receiving socket
    /// dropped itself.
    pub fn lost_in_transit(&self) -> u64 {
        self.lost.saturating_sub(self.rcvbuf_errors)
    }

    /// Datagrams lost among those due at or after `t`.
    pub fn lost_since(&self, t: Instant) -> u64 {
        self.gaps
            .iter()
            .map(|&(a, b)| (a..=b).filter(|&s| self.due(s) >= t).count() as u64)
            .sum()
    }

    /// Time from `fault` until traffic was back for good: the arrival of the
    /// first datagram after the last one lost that was due at or after
    /// `fault` (zero if none was lost; `None` if none arrived after it).
    pub fn recovery_after(&self, fault: Instant) -> Option<Duration> {
        let last_lost = self
            .gaps
            .iter()
            .rev()
            .map(|&(_, b)| b)
            .find(|&b| self.due(b) >= fault);
        let Some(last_lost) = last_lost else {
            return Some(Duration::ZERO);
        };
        self.arrivals
            .range(last_lost + 1..)
            .next()
            .map(|(_, &at)| at.saturating_duration_since(fault))
    }

    /// One line for logs and the docs' table.
    pub fn summary(&self, fault: Option<Instant>) -> String {
        let rec = fault
            .and_then(|f| self.recovery_after(f))
            .map_or("-".into(), |d| format!("{} ms", d.as_millis()));
        format!(
            "{}: sent {} received {} lost {} (send errors {}, receive buffer full {}, duplicates {}), longest outage {} ms, recovery {rec}",
            self.label,
            self.sent,
            self.received,
            self.lost,
            self.send_errors,
            self.rcvbuf_errors,
            self.duplicates,
            self.longest_outage().as_millis()
        )
    }
}

/// Enters the network namespace at `path` on the calling thread.
fn enter(path: &Path) -> Result<()> {
    let file = std::fs::File::open(path).map_err(io(format!("opening {}", path.display())))?;
    nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| Error::Io {
        what: format!("setns {}", path.display()),
        source: e.into(),
    })
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { what, source }
}

fn join<T>(h: Option<JoinHandle<Result<T>>>, label: &str, side: &str) -> Result<T> {
    h.ok_or_else(|| Error::Config(format!("{label}: {side} already joined")))?
        .join()
        .map_err(|_| Error::Config(format!("{label}: {side} thread panicked")))?
}
