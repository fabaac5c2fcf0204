//! The host state a Docker 20.10 engine creates for its default bridge network, reproduced
//! without Docker: the iptables ruleset and the iptables backend check.

use std::process::Command;

use crate::{Error, Ipv4Net, NetNs, Result, cmd};

/// Which kernel interface `iptables` drives. Both keep their tables per network namespace,
/// so either works inside the simulated hosts; what matters is that all tools (Docker,
/// the tests) use the same one, since rules of one backend are invisible to the other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IptablesBackend {
    /// `iptables-nft` (Debian 12's default alternative): rules live in nf_tables.
    Nft,
    /// `iptables-legacy`: the x_tables interface.
    Legacy,
}

/// Reads the backend from `iptables --version` (`iptables v1.8.9 (nf_tables)`).
pub fn iptables_backend() -> Result<IptablesBackend> {
    cmd::require_tool("iptables", "iptables")?;
    let out = cmd::checked(Command::new("iptables").arg("--version"))?;
    parse_backend(&String::from_utf8_lossy(&out.stdout))
}

fn parse_backend(version: &str) -> Result<IptablesBackend> {
    if version.contains("nf_tables") {
        Ok(IptablesBackend::Nft)
    } else if version.contains("legacy") {
        Ok(IptablesBackend::Legacy)
    } else {
        Err(Error::Parse {
            what: "iptables backend",
            input: version.to_owned(),
        })
    }
}

/// The `iptables-restore` input matching `iptables-save` of a fresh Docker 20.10 engine
/// (default options: iptables on, icc on, userland proxy on) whose default bridge is
/// `bridge` with `subnet`, before any port is published.
pub fn docker_ruleset(bridge: &str, subnet: Ipv4Net) -> String {
    let subnet = subnet.trunc();
    format!(
        "\
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:DOCKER - [0:0]
:DOCKER-ISOLATION-STAGE-1 - [0:0]
:DOCKER-ISOLATION-STAGE-2 - [0:0]
:DOCKER-USER - [0:0]
-A FORWARD -j DOCKER-USER
-A FORWARD -j DOCKER-ISOLATION-STAGE-1
-A FORWARD -o {bridge} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A FORWARD -o {bridge} -j DOCKER
-A FORWARD -i {bridge} ! -o {bridge} -j ACCEPT
-A FORWARD -i {bridge} -o {bridge} -j ACCEPT
-A DOCKER-ISOLATION-STAGE-1 -i {bridge} ! -o {bridge} -j DOCKER-ISOLATION-STAGE-2
-A DOCKER-ISOLATION-STAGE-1 -j RETURN
-A DOCKER-ISOLATION-STAGE-2 -o {bridge} -j DROP
-A DOCKER-ISOLATION-STAGE-2 -j RETURN
-A DOCKER-USER -j RETURN
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:DOCKER - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER
-A POSTROUTING -s {subnet} ! -o {bridge} -j MASQUERADE
-A DOCKER -i {bridge} -j RETURN
COMMIT
"
    )
}

/// Applies the Docker-like host state to `ns`: IPv4 forwarding, bridge netfilter (Docker
/// loads `br_netfilter` and turns `bridge-nf-call-iptables` on so bridged traffic meets
/// its rules) and [`docker_ruleset`].
pub fn apply_docker_host_state(
    ns: &NetNs,
    bridge: &str,
    subnet: Ipv4Net,
    iptables: bool,
) -> Result<()> {
    ns.sysctl("net.ipv4.ip_forward", "1")?;
    if !iptables {
        return Ok(());
    }
    // The key only exists once br_netfilter is loaded (per netns since Linux 5.3). Loading a
    // module is machine-wide state, which a testbed should not change, so skip if absent.
    if let Err(e) = ns.sysctl("net.bridge.bridge-nf-call-iptables", "1") {
        eprintln!(
            "xhost-tests: bridge-nf-call-iptables not set in {}: {e}",
            ns.name()
        );
    }
    cmd::require_tool("iptables-restore", "iptables")?;
    let rules = docker_ruleset(bridge, subnet);
    cmd::checked_with_stdin(
        &mut ns.command(&["iptables-restore", "--wait"]),
        rules.as_bytes(),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ruleset_matches_docker_20_10() {
        let subnet = "192.168.110.1/24".parse().expect("cidr");
        let rules = docker_ruleset("docker0", subnet);
        for line in [
            ":FORWARD DROP [0:0]",
            "-A FORWARD -j DOCKER-USER",
            "-A FORWARD -j DOCKER-ISOLATION-STAGE-1",
            "-A FORWARD -o docker0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
            "-A FORWARD -o docker0 -j DOCKER",
            "-A FORWARD -i docker0 ! -o docker0 -j ACCEPT",
            "-A FORWARD -i docker0 -o docker0 -j ACCEPT",
            "-A DOCKER-USER -j RETURN",
            "-A POSTROUTING -s 192.168.110.0/24 ! -o docker0 -j MASQUERADE",
            "-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER",
        ] {
            assert!(
                rules.lines().any(|l| l == line),
                "missing {line:?}:\n{rules}"
            );
        }
        // FORWARD rule order is what Docker relies on (DOCKER-USER first).
        let forward: Vec<_> = rules
            .lines()
            .filter(|l| l.starts_with("-A FORWARD"))
            .collect();
        assert_eq!(forward[0], "-A FORWARD -j DOCKER-USER");
        assert_eq!(rules.matches("COMMIT").count(), 2);
    }

    #[test]
    fn detects_backend() {
        assert_eq!(
            parse_backend("iptables v1.8.9 (nf_tables)\n").ok(),
            Some(IptablesBackend::Nft)
        );
        assert_eq!(
            parse_backend("iptables v1.8.9 (legacy)\n").ok(),
            Some(IptablesBackend::Legacy)
        );
        assert!(parse_backend("iptables v1.4").is_err());
    }
}
