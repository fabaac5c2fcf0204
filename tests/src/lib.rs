//! Testbed for xhost: simulated Docker hosts in network namespaces, real-packet probes and
//! guards that tear everything down, for the integration tests, `cargo xtask demo` and benches.
//!
//! Everything shells out to `ip`, `iptables(-restore)`, `sysctl`, `ping` and `conntrack`
//! (via `ip -n` / `ip netns exec`), so the same commands can be replayed by hand when a test
//! fails. Every namespace is named `xh-{pid}-{n}-{role}` and deleted by its guard's `Drop`,
//! also while unwinding from a panic; [`cleanup_stale`] removes what a killed run left.
//!
//! Tests that use this crate touch kernel state and must run as root with `--test-threads=1`.

mod cidr;
pub mod cluster;
pub mod cmd;
pub mod docker;
pub mod docker_engine;
mod error;
pub mod fake_engine;
pub mod faults;
pub mod flow;
pub mod link;
pub mod netfilter;
mod netns;
pub mod probe;
mod process;
pub mod scenarios;
mod topology;
pub mod xhost;

pub use cidr::{Ipv4Net, Ipv4NetExt};
pub use error::{Error, Result};
pub use netfilter::{
    ChainCounters, CtEntry, CtFilter, RuleCounter, conntrack_entries, iptables_counter,
};
pub use netns::{NETNS_DIR, NetNs, cleanup_stale, parse_netns_name, pid_alive};
pub use probe::{
    PingStats, Transfer, TransferOpts, UdpGsoOpts, UdpTransfer, ping, tcp_transfer,
    udp_gso_transfer,
};
pub use process::Process;
pub use topology::{Container, Host, HostOpts, Topology, TopologyOpts};

/// True when the current process has the privileges the testbed needs (effective uid 0).
///
/// Integration tests use it to skip with a message instead of failing on unprivileged
/// machines.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}
