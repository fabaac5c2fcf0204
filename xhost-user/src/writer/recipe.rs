//! The kernel datapath (`--datapath kernel`): where eBPF cannot run, the
//! kernel forwards container traffic itself. The plan's operations become
//! a route per peer subnet (`proto 177`, as [`super::KernelRoutes`] adds
//! them for the eBPF datapath too), `net.ipv4.ip_forward = 1`, and iptables
//! rules in two chains of xhost's own, jumped to from the top of `FORWARD`
//! (filter) and `POSTROUTING` (nat):
//!
//! - `XHOST-FORWARD`: accept local container subnet <-> peer subnet, both
//!   ways, before Docker's isolation chains and its policy DROP see it;
//! - `XHOST-POSTROUTING`: accept (that is: no NAT) local container subnet
//!   -> peer subnet, before Docker's MASQUERADE, so the peer sees the
//!   container's own address. (A `RETURN` from this chain would go back to
//!   `POSTROUTING` and on to the MASQUERADE rule.)
//!
//! The chains' contents are replaced whole with `iptables-restore --noflush`,
//! which declares (and so empties) only xhost's chains and fills them in one
//! transaction per table: no window in which a flow loses its rule, and no
//! other chain is touched. The jumps are added and deleted by their rule
//! spec (`-I CHAIN -j XHOST-...`, `-D CHAIN -j XHOST-...`), never by number.
//! Everything is removed on drop (or by `unload` from [`RecipeState`]),
//! and `ip_forward` gets the value it had before.
//!
//! The iptables binaries rather than a crate: `iptables-restore` is the
//! only interface that replaces a chain's rules atomically, the `iptables`
//! crate wraps the same binary without it, and both honour the host's
//! backend choice (nf_tables or legacy) as Docker's own rules do.

use std::{
    collections::BTreeSet,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    process::Command,
};

use log::{info, warn};
use serde::{Deserialize, Serialize};
use xhost_common::Endpoint;

use super::KernelRoutes;
use crate::{
    net::{Ipv4Net, Ipv6Net},
    plan::{Neighbour, Writer},
};

/// xhost's chain in the filter table, jumped to from the top of `FORWARD`.
pub const FORWARD_CHAIN: &str = "XHOST-FORWARD";
/// xhost's chain in the nat table, jumped to from the top of `POSTROUTING`.
pub const NAT_CHAIN: &str = "XHOST-POSTROUTING";
/// (table, built-in chain, xhost's chain).
pub const CHAINS: [(&str, &str, &str); 2] = [
    ("filter", "FORWARD", FORWARD_CHAIN),
    ("nat", "POSTROUTING", NAT_CHAIN),
];

/// The one rule that may stay above xhost's jump in `FORWARD`: Docker's
/// jump to the operator's `DOCKER-USER`, which Docker moves back to the top
/// whenever it changes its rules; the operator's rules there come first.
const DOCKER_USER_JUMP: &str = "-A FORWARD -j DOCKER-USER";

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// What `unload` needs to take a detached kernel datapath down (kept in
/// the agent's state file).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecipeState {
    /// `net.ipv4.ip_forward` before the load: put back at unload.
    pub ip_forward_before: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    #[error("running {cmd}")]
    Spawn {
        cmd: String,
        #[source]
        source: io::Error,
    },
    #[error("{cmd}: {stderr}")]
    Failed { cmd: String, stderr: String },
    #[error(
        "iptables chain {chain} exists in the {table} table: another xhost kernel datapath serves this network namespace, or one was killed (`xhost-user unload` removes it)"
    )]
    InUse {
        table: &'static str,
        chain: &'static str,
    },
    #[error("{IP_FORWARD}")]
    Sysctl(#[source] io::Error),
}

/// Runs `prog args`, an error naming the command unless it succeeds.
fn run(prog: &str, args: &[&str], stdin: Option<&str>) -> Result<String, RecipeError> {
    let cmd = || format!("{prog} {}", args.join(" "));
    let mut c = Command::new(prog);
    c.args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .stdin(if stdin.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        });
    let mut child = c
        .spawn()
        .map_err(|source| RecipeError::Spawn { cmd: cmd(), source })?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        use io::Write as _;
        pipe.write_all(text.as_bytes())
            .map_err(|source| RecipeError::Spawn { cmd: cmd(), source })?;
    }
    let out = child
        .wait_with_output()
        .map_err(|source| RecipeError::Spawn { cmd: cmd(), source })?;
    if !out.status.success() {
        return Err(RecipeError::Failed {
            cmd: cmd(),
            stderr: String::from_utf8_lossy(&out.stderr)
                .trim()
                .replace('\n', "; "),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `iptables -w args`: waits for the xtables lock rather than failing
/// while Docker (or anyone) holds it.
fn iptables(args: &[&str]) -> Result<String, RecipeError> {
    let mut all = vec!["-w"];
    all.extend_from_slice(args);
    run("iptables", &all, None)
}

/// Whether `chain` exists in `table` (an error only if iptables cannot run).
fn chain_exists(table: &str, chain: &str) -> Result<bool, RecipeError> {
    match iptables(&["-t", table, "-S", chain]) {
        Ok(_) => Ok(true),
        Err(RecipeError::Failed { .. }) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The rules xhost's chains hold for these subnets, as an
/// `iptables-restore --noflush` script: each chain declared (which empties
/// it, or creates it) and filled, one transaction per table.
pub fn restore_script(locals: &BTreeSet<Ipv4Net>, peers: &BTreeSet<Ipv4Net>) -> String {
    let mut filter = format!("*filter\n:{FORWARD_CHAIN} - [0:0]\n");
    let mut nat = format!("*nat\n:{NAT_CHAIN} - [0:0]\n");
    for l in locals {
        for p in peers {
            filter.push_str(&format!("-A {FORWARD_CHAIN} -s {l} -d {p} -j ACCEPT\n"));
            filter.push_str(&format!("-A {FORWARD_CHAIN} -s {p} -d {l} -j ACCEPT\n"));
            nat.push_str(&format!("-A {NAT_CHAIN} -s {l} -d {p} -j ACCEPT\n"));
        }
    }
    format!("{filter}COMMIT\n{nat}COMMIT\n")
}

/// The kernel datapath's rules and forwarding switch, owned: dropped, it
/// removes its chains and puts `ip_forward` back, unless kept (`load
/// --detach`).
#[derive(Debug)]
pub struct Recipe {
    locals: BTreeSet<Ipv4Net>,
    peers: BTreeSet<Ipv4Net>,
    state: RecipeState,
    keep: bool,
}

impl Recipe {
    /// Creates xhost's chains (empty), jumps to them from the top of
    /// `FORWARD` and `POSTROUTING`, and turns IPv4 forwarding on. Refuses
    /// when the chains exist already; on failure undoes what it did.
    pub fn setup() -> Result<Self, RecipeError> {
        for (table, _, chain) in CHAINS {
            if chain_exists(table, chain)? {
                return Err(RecipeError::InUse { table, chain });
            }
        }
        let before = std::fs::read_to_string(IP_FORWARD).map_err(RecipeError::Sysctl)?;
        // From here on, Drop takes down whatever was set up.
        let recipe = Self {
            locals: BTreeSet::new(),
            peers: BTreeSet::new(),
            state: RecipeState {
                ip_forward_before: before.trim().to_owned(),
            },
            keep: false,
        };
        recipe.sync()?;
        for (table, builtin, chain) in CHAINS {
            // `-I` without a number: the first rule of the chain.
            iptables(&["-t", table, "-I", builtin, "-j", chain])?;
        }
        std::fs::write(IP_FORWARD, "1").map_err(RecipeError::Sysctl)?;
        info!(
            "kernel datapath: {FORWARD_CHAIN} (filter) first in FORWARD, {NAT_CHAIN} (nat) first in POSTROUTING, ip_forward 1 (was {})",
            recipe.state.ip_forward_before
        );
        Ok(recipe)
    }

    /// Writes the chains' rules for the current subnets.
    fn sync(&self) -> Result<(), RecipeError> {
        run(
            "iptables-restore",
            &["-w", "--noflush"],
            Some(&restore_script(&self.locals, &self.peers)),
        )
        .map(drop)
    }

    /// Changes one set of subnets and writes the rules; on failure the set
    /// is as before, like the rules.
    fn change(
        &mut self,
        peers: bool,
        f: impl FnOnce(&mut BTreeSet<Ipv4Net>) -> bool,
    ) -> Result<(), RecipeError> {
        let set = if peers {
            &mut self.peers
        } else {
            &mut self.locals
        };
        let before = set.clone();
        if !f(set) {
            return Ok(());
        }
        let res = self.sync();
        if res.is_err() {
            if peers {
                self.peers = before;
            } else {
                self.locals = before;
            }
        }
        res
    }

    /// Puts xhost's jumps back first where rules were inserted above them.
    /// Docker inserts its rules at the top of `FORWARD` and `POSTROUTING`
    /// (`-I`) whenever it creates a network or starts: its MASQUERADE of a
    /// subnet above xhost's exemption would hide the containers' addresses.
    /// Each jump is moved in one `iptables-restore --noflush` transaction
    /// (delete by spec, insert first), so no packet sees it missing.
    pub fn keep_first(&self) -> Result<(), RecipeError> {
        for (table, builtin, chain) in CHAINS {
            let listed = iptables(&["-t", table, "-S", builtin])?;
            let jump = format!("-A {builtin} -j {chain}");
            let rules: Vec<&str> = listed.lines().filter(|l| l.starts_with("-A ")).collect();
            let at = rules.iter().position(|r| *r == jump);
            let above_ok = |n: usize| rules[..n].iter().all(|r| *r == DOCKER_USER_JUMP);
            let script = match at {
                Some(n) if above_ok(n) => continue,
                Some(_) => {
                    format!("*{table}\n-D {builtin} -j {chain}\n-I {builtin} -j {chain}\nCOMMIT\n")
                }
                None => format!("*{table}\n-I {builtin} -j {chain}\nCOMMIT\n"),
            };
            run("iptables-restore", &["-w", "--noflush"], Some(&script))?;
            info!(
                "{chain}: moved back to the top of {builtin} ({table}), where rules were inserted above it"
            );
        }
        Ok(())
    }

    pub fn state(&self) -> &RecipeState {
        &self.state
    }

    /// Leaves the chains, jumps and `ip_forward` in place when dropped
    /// (`load --detach`); `xhost-user unload` removes them.
    pub fn keep(mut self) {
        self.keep = true;
    }
}

impl Drop for Recipe {
    fn drop(&mut self) {
        if !self.keep {
            remove(&self.state);
        }
    }
}

/// Takes a kernel datapath down: the jumps, then xhost's chains (emptied,
/// then deleted), then `ip_forward` as it was. Best effort: what is gone
/// already is fine, anything else is logged.
pub fn remove(state: &RecipeState) {
    for (table, builtin, chain) in CHAINS {
        // Deleted by spec, as often as it is there (a second jump would
        // only be there if someone added it by hand).
        while iptables(&["-t", table, "-C", builtin, "-j", chain]).is_ok() {
            if let Err(e) = iptables(&["-t", table, "-D", builtin, "-j", chain]) {
                warn!("{e}");
                break;
            }
        }
        if chain_exists(table, chain).unwrap_or(false) {
            for args in [["-t", table, "-F", chain], ["-t", table, "-X", chain]] {
                if let Err(e) = iptables(&args) {
                    warn!("{e}");
                }
            }
        }
    }
    if let Err(e) = std::fs::write(IP_FORWARD, &state.ip_forward_before) {
        warn!(
            "putting {IP_FORWARD} back to {}: {e}",
            state.ip_forward_before
        );
    }
}

/// xhost's chains as `iptables -S` prints them, for `status`: (table,
/// chain, rules); a chain that cannot be read has no rules.
pub fn live_rules() -> Vec<(String, String, Vec<String>)> {
    CHAINS
        .iter()
        .map(|(table, builtin, chain)| {
            let mut rules: Vec<String> = iptables(&["-t", table, "-S", builtin])
                .unwrap_or_default()
                .lines()
                .filter(|l| l.ends_with(&format!("-j {chain}")))
                .map(str::to_owned)
                .collect();
            rules.extend(
                iptables(&["-t", table, "-S", chain])
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| l.starts_with("-A "))
                    .map(str::to_owned),
            );
            ((*table).to_owned(), (*chain).to_owned(), rules)
        })
        .collect()
}

/// The kernel datapath and the kernel routes, as one [`Writer`]: peer
/// subnets and local subnets become rules and routes; what only the eBPF
/// datapath has (peer hosts' ICMP entries, attachments, endpoints, ARP
/// entries) the kernel does by itself, so those operations succeed with
/// nothing to write.
pub struct RecipeWriter<'a> {
    pub recipe: &'a mut Recipe,
    pub routes: &'a mut KernelRoutes,
}

impl Writer for RecipeWriter<'_> {
    type Error = super::WriteError;

    fn add_peer_host(&mut self, _host: IpAddr) -> Result<(), Self::Error> {
        Ok(())
    }

    fn remove_peer_host(&mut self, _host: IpAddr) -> Result<(), Self::Error> {
        Ok(())
    }

    fn set_route(&mut self, net: &Ipv4Net, _peer: Ipv4Addr) -> Result<(), Self::Error> {
        Ok(self.recipe.change(true, |s| s.insert(*net))?)
    }

    fn remove_route(&mut self, net: &Ipv4Net) -> Result<(), Self::Error> {
        Ok(self.recipe.change(true, |s| s.remove(net))?)
    }

    fn add_kernel_route(&mut self, net: &Ipv4Net, peer: Ipv4Addr) -> Result<(), Self::Error> {
        Ok(self.routes.add(net, peer)?)
    }

    fn remove_kernel_route(&mut self, net: &Ipv4Net) {
        self.routes.remove(net);
    }

    fn attach_bridge(&mut self, _bridge: &str) -> Result<(), Self::Error> {
        Ok(())
    }

    fn detach_bridge(&mut self, _bridge: &str) {}

    fn set_local(&mut self, net: &Ipv4Net, _bridge_ifindex: u32) -> Result<(), Self::Error> {
        Ok(self.recipe.change(false, |s| s.insert(*net))?)
    }

    fn remove_local(&mut self, net: &Ipv4Net) -> Result<(), Self::Error> {
        Ok(self.recipe.change(false, |s| s.remove(net))?)
    }

    fn attach_port(&mut self, _port: &str) -> Result<(), Self::Error> {
        Ok(())
    }

    fn detach_port(&mut self, _port: &str) {}

    fn set_endpoint(&mut self, _ip: Ipv4Addr, _ep: Endpoint) -> Result<(), Self::Error> {
        Ok(())
    }

    fn remove_endpoint(&mut self, _ip: Ipv4Addr) -> Result<(), Self::Error> {
        Ok(())
    }

    fn set_neighbours(&mut self, _neighbours: &[Neighbour]) {}

    // IPv6 subnets get their kernel routes; xhost's chains are iptables
    // (IPv4) only, so nothing else is written for them.
    fn set_route6(&mut self, _net: &Ipv6Net, _peer: IpAddr) -> Result<(), Self::Error> {
        Ok(())
    }

    fn remove_route6(&mut self, _net: &Ipv6Net) -> Result<(), Self::Error> {
        Ok(())
    }

    fn add_kernel_route6(&mut self, net: &Ipv6Net, peer: IpAddr) -> Result<(), Self::Error> {
        Ok(self.routes.add6(net, peer)?)
    }

    fn remove_kernel_route6(&mut self, net: &Ipv6Net) {
        self.routes.remove6(net);
    }

    fn set_local6(&mut self, _net: &Ipv6Net, _bridge_ifindex: u32) -> Result<(), Self::Error> {
        Ok(())
    }

    fn remove_local6(&mut self, _net: &Ipv6Net) -> Result<(), Self::Error> {
        Ok(())
    }

    fn set_endpoint6(&mut self, _ip: Ipv6Addr, _ep: Endpoint) -> Result<(), Self::Error> {
        Ok(())
    }

    fn remove_endpoint6(&mut self, _ip: Ipv6Addr) -> Result<(), Self::Error> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_accept_both_ways_and_exempt_from_nat_one_way() {
        let net = |s: &str| s.parse::<Ipv4Net>().expect("cidr");
        let locals = BTreeSet::from([net("192.168.110.0/24")]);
        let peers = BTreeSet::from([net("192.168.220.0/24"), net("10.9.0.0/16")]);
        assert_eq!(
            restore_script(&locals, &peers),
            "*filter\n:XHOST-FORWARD - [0:0]\n\
             -A XHOST-FORWARD -s 192.168.110.0/24 -d 10.9.0.0/16 -j ACCEPT\n\
             -A XHOST-FORWARD -s 10.9.0.0/16 -d 192.168.110.0/24 -j ACCEPT\n\
             -A XHOST-FORWARD -s 192.168.110.0/24 -d 192.168.220.0/24 -j ACCEPT\n\
             -A XHOST-FORWARD -s 192.168.220.0/24 -d 192.168.110.0/24 -j ACCEPT\n\
             COMMIT\n*nat\n:XHOST-POSTROUTING - [0:0]\n\
             -A XHOST-POSTROUTING -s 192.168.110.0/24 -d 10.9.0.0/16 -j ACCEPT\n\
             -A XHOST-POSTROUTING -s 192.168.110.0/24 -d 192.168.220.0/24 -j ACCEPT\n\
             COMMIT\n"
        );
        // No local subnet yet: the chains exist, empty.
        assert_eq!(
            restore_script(&BTreeSet::new(), &peers),
            "*filter\n:XHOST-FORWARD - [0:0]\nCOMMIT\n*nat\n:XHOST-POSTROUTING - [0:0]\nCOMMIT\n"
        );
    }
}
