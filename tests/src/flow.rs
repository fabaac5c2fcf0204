//! Sequenced UDP: datagrams numbered from 0 sent on a fixed schedule
//! ([`SeqSender`]), and the receiver's account of which arrived, when, and
//! which never did ([`SeqReceiver`], [`Tally`]). The one implementation of
//! loss counting: [`UdpFlow`] runs it in-process between two network
//! namespaces (one sender and one receiver thread, each entered into its
//! namespace) for the fault tests, and `xh-probe udp-seq-send` /
//! `udp-seq-recv` run it as processes ([`crate::probe::run_udp_seq_send`]).
//!
//! The sender keeps an absolute schedule (datagram `n` leaves at
//! `start + n * interval`, or at once if it fell behind), so a run of missing
//! sequence numbers measures how long the path was broken. Both threads of a
//! [`UdpFlow`] share one monotonic clock, so arrival times compare with the
//! instant a test injected its fault.

use std::{
    collections::BTreeMap,
    io,
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

/// Bytes of each datagram: the sequence number (u64, big endian) and
/// padding, a typical small packet.
pub const DATAGRAM: usize = 64;
/// The receiving socket's buffer: a burst queued while the receiver does
/// not get the CPU must not overflow it.
const RCVBUF: usize = 4 << 20;
/// How long the receiver waits for stragglers after the sender stopped.
const DRAIN: Duration = Duration::from_millis(300);
/// How long a [`UdpFlow`] receiver waits for a datagram before it looks
/// whether the flow was stopped.
const POLL: Duration = Duration::from_millis(20);

/// Sends datagrams numbered 0, 1, ... to one address, datagram `n` due at
/// `start + n * interval` (at once if the sender fell behind).
pub struct SeqSender {
    socket: UdpSocket,
    to: SocketAddr,
    start: Instant,
    interval: Duration,
    sent: u64,
    send_errors: u64,
}

impl SeqSender {
    /// A sender to `to` from an ephemeral port, its schedule starting at
    /// `start`. Unconnected: an ICMP error from the path does not fail
    /// later sends.
    pub fn new(to: SocketAddr, interval: Duration, start: Instant) -> io::Result<Self> {
        let socket = UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))?;
        Ok(Self {
            socket,
            to,
            start,
            interval,
            sent: 0,
            send_errors: 0,
        })
    }

    /// Waits for the next datagram's slot and sends it. A send the kernel
    /// refuses (no route, ...) counts as sent, and as a send error.
    pub fn send_next(&mut self) {
        let due = due(self.start, self.interval, self.sent);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
        let mut buf = [0u8; DATAGRAM];
        buf[..8].copy_from_slice(&self.sent.to_be_bytes());
        if self.socket.send_to(&buf, self.to).is_err() {
            self.send_errors += 1;
        }
        self.sent += 1;
    }

    /// Datagrams sent: numbers `0..sent`.
    pub fn sent(&self) -> u64 {
        self.sent
    }

    /// Of those, the sends the kernel refused.
    pub fn send_errors(&self) -> u64 {
        self.send_errors
    }
}

/// When datagram `seq` of a schedule from `start` at `interval` is due.
fn due(start: Instant, interval: Duration, seq: u64) -> Instant {
    start + interval * u32::try_from(seq).unwrap_or(u32::MAX)
}

/// Receives numbered datagrams on one port and keeps when each arrived.
pub struct SeqReceiver {
    socket: UdpSocket,
    arrivals: BTreeMap<u64, Instant>,
    /// Numbers that arrived again, once per repeat.
    repeats: Vec<u64>,
    rcvbuf_before: u64,
}

impl SeqReceiver {
    /// Binds `addr` (in the calling thread's network namespace).
    pub fn bind(addr: SocketAddr) -> io::Result<Self> {
        let socket = UdpSocket::bind(addr)?;
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::RcvBuf, &RCVBUF)
            .map_err(io::Error::from)?;
        Ok(Self {
            socket,
            arrivals: BTreeMap::new(),
            repeats: Vec::new(),
            rcvbuf_before: udp_rcvbuf_errors(),
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Waits up to `wait` (not zero) for one datagram and records it; a wait
    /// that ends with none is no error.
    pub fn poll(&mut self, wait: Duration) -> io::Result<()> {
        self.socket.set_read_timeout(Some(wait))?;
        let mut buf = [0u8; 2048];
        match self.socket.recv(&mut buf) {
            Ok(n) if n >= 8 => {
                let mut seq = [0u8; 8];
                seq.copy_from_slice(&buf[..8]);
                let seq = u64::from_be_bytes(seq);
                if self.arrivals.insert(seq, Instant::now()).is_some() {
                    self.repeats.push(seq);
                }
                Ok(())
            }
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Whether every number of `0..count` arrived.
    pub fn has_all(&self, count: u64) -> bool {
        // The range is walked only once enough numbers arrived at all.
        self.arrivals.len() as u64 >= count && self.arrivals.range(..count).count() as u64 == count
    }

    /// Closes the socket; call it in the namespace the receiver was bound
    /// in (the receive buffer's drops are counted there).
    pub fn finish(self) -> Arrivals {
        Arrivals {
            arrivals: self.arrivals,
            repeats: self.repeats,
            rcvbuf_errors: udp_rcvbuf_errors().saturating_sub(self.rcvbuf_before),
        }
    }
}

/// What a [`SeqReceiver`] saw, to be told how many were sent.
pub struct Arrivals {
    arrivals: BTreeMap<u64, Instant>,
    repeats: Vec<u64>,
    rcvbuf_errors: u64,
}

impl Arrivals {
    /// The account of datagrams `0..sent`: a repeated number keeps its
    /// first arrival.
    pub fn tally(self, sent: u64) -> Tally {
        let Self {
            mut arrivals,
            repeats,
            rcvbuf_errors,
        } = self;
        let strays = arrivals.split_off(&sent).len() as u64;
        let duplicates = repeats.iter().filter(|&&s| s < sent).count() as u64;
        let mut gaps = Vec::new();
        let mut next = 0u64;
        for &seq in arrivals.keys() {
            if seq > next {
                gaps.push((next, seq - 1));
            }
            next = seq + 1;
        }
        if next < sent {
            gaps.push((next, sent - 1));
        }
        let received = arrivals.len() as u64;
        Tally {
            sent,
            received,
            lost: sent - received,
            duplicates,
            strays,
            rcvbuf_errors,
            gaps,
            arrivals,
        }
    }
}

/// Which of the datagrams `0..sent` arrived, when, and which never did.
#[derive(Clone, Debug)]
pub struct Tally {
    pub sent: u64,
    /// Distinct datagrams of `0..sent` received.
    pub received: u64,
    /// `sent - received`.
    pub lost: u64,
    /// Datagrams of `0..sent` received more than once (a forwarding loop
    /// would show).
    pub duplicates: u64,
    /// Datagrams numbered `sent` or more: not this sender's.
    pub strays: u64,
    /// Growth of the receiving namespace's UDP `RcvbufErrors` while the
    /// receiver was bound, see [`udp_rcvbuf_errors`].
    pub rcvbuf_errors: u64,
    /// Runs of missing sequence numbers, as (first, last) inclusive.
    pub gaps: Vec<(u64, u64)>,
    /// Arrival time of each received sequence number.
    pub arrivals: BTreeMap<u64, Instant>,
}

impl Tally {
    /// The first number that never arrived.
    pub fn first_missing(&self) -> Option<u64> {
        self.gaps.first().map(|&(first, _)| first)
    }
}

/// A running flow; [`UdpFlow::stop`] ends it and returns the report.
pub struct UdpFlow {
    label: String,
    start: Instant,
    interval: Duration,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    sender: Option<JoinHandle<Result<(u64, u64)>>>,
    receiver: Option<JoinHandle<Result<Arrivals>>>,
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
        let receiver = thread::spawn(move || -> Result<Arrivals> {
            let mut receiver = enter(&to_ns_owned)
                .and_then(|()| {
                    SeqReceiver::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, to_port)))
                        .map_err(io(format!("binding UDP {to_port}")))
                })
                .inspect_err(|e| {
                    let _ = ready_tx.send(Err(Error::Config(e.to_string())));
                })?;
            let _ = ready_tx.send(Ok(()));
            let mut stopped_at: Option<Instant> = None;
            loop {
                receiver.poll(POLL).map_err(io("receiving".into()))?;
                if rx_stop.load(Ordering::Acquire) {
                    let t = *stopped_at.get_or_insert_with(Instant::now);
                    if t.elapsed() >= DRAIN {
                        return Ok(receiver.finish());
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
        let sender = thread::spawn(move || -> Result<(u64, u64)> {
            enter(&from_ns)?;
            let to = SocketAddr::from((to_ip, to_port));
            let mut sender =
                SeqSender::new(to, interval, start).map_err(io("binding the sender".into()))?;
            while !tx_stop.load(Ordering::Acquire) {
                sender.send_next();
                tx_sent.store(sender.sent(), Ordering::Release);
            }
            Ok((sender.sent(), sender.send_errors()))
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
        let (sent, send_errors) = join(self.sender.take(), &self.label, "sender")?;
        let t = join(self.receiver.take(), &self.label, "receiver")?.tally(sent);
        Ok(FlowReport {
            label: self.label.clone(),
            sent,
            received: t.received,
            lost: t.lost,
            send_errors,
            rcvbuf_errors: t.rcvbuf_errors,
            duplicates: t.duplicates,
            gaps: t.gaps,
            interval: self.interval,
            start: self.start,
            arrivals: t.arrivals,
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
        due(self.start, self.interval, seq)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn arrivals(seqs: &[u64]) -> Arrivals {
        let now = Instant::now();
        let mut a = Arrivals {
            arrivals: BTreeMap::new(),
            repeats: Vec::new(),
            rcvbuf_errors: 0,
        };
        for &s in seqs {
            if a.arrivals.insert(s, now).is_some() {
                a.repeats.push(s);
            }
        }
        a
    }

    #[test]
    fn tally_names_gaps_repeats_and_strays() {
        let t = arrivals(&[0, 1, 4, 4, 5, 9, 12, 12]).tally(10);
        assert_eq!((t.sent, t.received, t.lost), (10, 5, 5));
        assert_eq!(t.gaps, vec![(2, 3), (6, 8)]);
        assert_eq!(t.first_missing(), Some(2));
        assert_eq!(t.duplicates, 1, "4 twice; 12 is beyond what was sent");
        assert_eq!(t.strays, 1);
        let t = arrivals(&[1, 2]).tally(5);
        assert_eq!(t.gaps, vec![(0, 0), (3, 4)], "lost at both ends");
        let t = arrivals(&[0, 1, 2]).tally(3);
        assert_eq!((t.lost, t.first_missing()), (0, None));
    }

    /// Over loopback: every datagram of a short run arrives, numbered as
    /// sent, on the sender's schedule.
    #[test]
    fn a_sender_and_receiver_over_loopback_lose_nothing() {
        let mut rx = SeqReceiver::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).expect("bind");
        let to = rx.local_addr().expect("addr");
        let start = Instant::now();
        let mut tx = SeqSender::new(to, Duration::from_millis(1), start).expect("sender");
        for _ in 0..50 {
            tx.send_next();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while !rx.has_all(50) && Instant::now() < deadline {
            rx.poll(Duration::from_millis(20)).expect("poll");
        }
        assert!(
            start.elapsed() >= Duration::from_millis(49),
            "50 datagrams 1 ms apart"
        );
        let t = rx.finish().tally(tx.sent());
        assert_eq!((t.received, t.lost, t.duplicates, t.strays), (50, 0, 0, 0));
        assert_eq!(tx.send_errors(), 0);
    }
}
