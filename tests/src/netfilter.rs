//! Reading netfilter state inside a namespace: iptables rule counters and conntrack entries,
//! to tell whether traffic went through the kernel's forwarding path or bypassed it.

use std::net::Ipv4Addr;

use crate::{Error, NetNs, Result, cmd};

/// Packet/byte counters of one iptables rule (`iptables -L CHAIN -v -x -n`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleCounter {
    pub packets: u64,
    pub bytes: u64,
    /// Jump target (`ACCEPT`, `DOCKER-USER`, ...); empty for a rule without `-j`.
    pub target: String,
    pub prot: String,
    pub in_iface: String,
    pub out_iface: String,
    pub source: String,
    pub destination: String,
    /// The match options iptables prints after the addresses (`ctstate RELATED,...`).
    pub extra: String,
}

/// Counters of one chain: the policy's (built-in chains only) and each rule's, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainCounters {
    pub chain: String,
    /// `Some("DROP")` etc. for built-in chains, `None` for user chains.
    pub policy: Option<String>,
    pub policy_packets: u64,
    pub policy_bytes: u64,
    pub rules: Vec<RuleCounter>,
}

impl ChainCounters {
    /// Packets matched by any rule plus those that fell through to the policy: every packet
    /// that traversed the chain, since the chain's first rule here always matches in
    /// Docker's FORWARD (`-j DOCKER-USER`) this is the FORWARD traffic.
    pub fn total_packets(&self) -> u64 {
        self.policy_packets + self.rules.iter().map(|r| r.packets).sum::<u64>()
    }

    /// Packets of the first rule jumping to `target`.
    pub fn packets_to(&self, target: &str) -> Option<u64> {
        self.rules
            .iter()
            .find(|r| r.target == target)
            .map(|r| r.packets)
    }
}

/// Counters of `chain` in the filter table of `ns` (e.g. `"FORWARD"`).
pub fn iptables_counter(ns: &NetNs, chain: &str) -> Result<ChainCounters> {
    iptables_table_counter(ns, "filter", chain)
}

/// Counters of `chain` in `table` of `ns`.
pub fn iptables_table_counter(ns: &NetNs, table: &str, chain: &str) -> Result<ChainCounters> {
    cmd::require_tool("iptables", "iptables")?;
    let out = ns.try_run(&["iptables", "-w", "-t", table, "-L", chain, "-v", "-x", "-n"])?;
    parse_chain(&String::from_utf8_lossy(&out.stdout))
}

/// Parses the output of `iptables -L CHAIN -v -x -n`.
pub(crate) fn parse_chain(text: &str) -> Result<ChainCounters> {
    let bad = |what| Error::Parse {
        what,
        input: text.to_owned(),
    };
    let mut lines = text.lines();
    // `Chain FORWARD (policy DROP 12 packets, 1008 bytes)` or `Chain DOCKER (1 references)`
    let header = lines.next().ok_or_else(|| bad("iptables chain header"))?;
    let words: Vec<&str> = header
        .split(|c: char| c.is_whitespace() || c == '(' || c == ')' || c == ',')
        .filter(|w| !w.is_empty())
        .collect();
    if words.first() != Some(&"Chain") || words.len() < 2 {
        return Err(bad("iptables chain header"));
    }
    let (policy, policy_packets, policy_bytes) = match words.get(2) {
        Some(&"policy") => {
            let num = |i: usize| words.get(i).and_then(|w| w.parse::<u64>().ok());
            (
                words.get(3).map(|p| (*p).to_owned()),
                num(4).ok_or_else(|| bad("policy packets"))?,
                num(6).ok_or_else(|| bad("policy bytes"))?,
            )
        }
        _ => (None, 0, 0),
    };
    let mut rules = Vec::new();
    for line in lines {
        let t: Vec<&str> = line.split_whitespace().collect();
        if t.is_empty() || t[0] == "pkts" {
            continue;
        }
        // Without `-j` iptables leaves the target column blank, shifting the others left;
        // the `opt` column (`--`, `-f`, `!f`) tells which layout this is.
        let is_opt = |s: &str| s == "--" || s == "-f" || s == "!f";
        let has_target = t.len() >= 9 && is_opt(t[4]);
        let blank_target = t.len() >= 8 && is_opt(t[3]);
        if !(has_target || blank_target) {
            return Err(bad("iptables rule line"));
        }
        let at = |i: usize| if has_target { t[i] } else { t[i - 1] };
        let rest_from = if has_target { 9 } else { 8 };
        rules.push(RuleCounter {
            packets: t[0].parse().map_err(|_| bad("rule packets"))?,
            bytes: t[1].parse().map_err(|_| bad("rule bytes"))?,
            target: if has_target {
                t[2].to_owned()
            } else {
                String::new()
            },
            prot: at(3).to_owned(),
            in_iface: at(5).to_owned(),
            out_iface: at(6).to_owned(),
            source: at(7).to_owned(),
            destination: at(8).to_owned(),
            extra: t[rest_from..].join(" "),
        });
    }
    Ok(ChainCounters {
        chain: words[1].to_owned(),
        policy,
        policy_packets,
        policy_bytes,
        rules,
    })
}

/// One connection tracking entry, from `conntrack -L` or `/proc/net/nf_conntrack`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CtEntry {
    /// `tcp`, `udp`, `icmp`, ...
    pub proto: String,
    /// TCP state (`ESTABLISHED`, `TIME_WAIT`, ...); `None` for stateless protocols.
    pub state: Option<String>,
    pub orig_src: Option<Ipv4Addr>,
    pub orig_dst: Option<Ipv4Addr>,
    pub orig_sport: Option<u16>,
    pub orig_dport: Option<u16>,
    pub reply_src: Option<Ipv4Addr>,
    pub reply_dst: Option<Ipv4Addr>,
    /// The line as printed, for messages.
    pub raw: String,
}

/// Which entries [`conntrack_entries`] returns; `None` fields match anything.
#[derive(Clone, Debug, Default)]
pub struct CtFilter {
    pub proto: Option<String>,
    /// Matches the original direction's source.
    pub src: Option<Ipv4Addr>,
    /// Matches the original direction's destination.
    pub dst: Option<Ipv4Addr>,
    pub dport: Option<u16>,
}

impl CtFilter {
    /// Entries whose original tuple goes `src -> dst`.
    pub fn flow(src: Ipv4Addr, dst: Ipv4Addr) -> Self {
        Self {
            src: Some(src),
            dst: Some(dst),
            ..Self::default()
        }
    }

    /// True when `e` passes every set field.
    pub fn matches(&self, e: &CtEntry) -> bool {
        self.proto.as_deref().is_none_or(|p| p == e.proto)
            && self.src.is_none_or(|ip| e.orig_src == Some(ip))
            && self.dst.is_none_or(|ip| e.orig_dst == Some(ip))
            && self.dport.is_none_or(|p| e.orig_dport == Some(p))
    }
}

/// Conntrack entries of `ns` that pass `filter`: `conntrack -L` when the conntrack tool is
/// installed, else `/proc/net/nf_conntrack` (per-namespace view, same fields).
pub fn conntrack_entries(ns: &NetNs, filter: &CtFilter) -> Result<Vec<CtEntry>> {
    let out = if cmd::find_tool("conntrack").is_some() {
        ns.try_run(&["conntrack", "-L"])?
    } else {
        ns.try_run(&["cat", "/proc/net/nf_conntrack"])?
    };
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(parse_ct_line)
        .filter(|e| filter.matches(e))
        .collect())
}

/// Parses one entry line. `/proc/net/nf_conntrack` lines carry two extra leading fields
/// (`ipv4 2`); the key=value pairs appear twice, original direction first.
pub(crate) fn parse_ct_line(line: &str) -> Option<CtEntry> {
    let mut t = line.split_whitespace().peekable();
    if matches!(t.peek(), Some(&("ipv4" | "ipv6"))) {
        t.next();
        t.next();
    }
    let proto = t.next()?.to_owned();
    t.next()?; // protocol number
    let mut e = CtEntry {
        proto,
        state: None,
        orig_src: None,
        orig_dst: None,
        orig_sport: None,
        orig_dport: None,
        reply_src: None,
        reply_dst: None,
        raw: line.to_owned(),
    };
    // Each direction's tuple starts with `src=`: the first is the original, the second
    // the reply.
    let mut tuple = 0;
    for word in t {
        let Some((k, v)) = word.split_once('=') else {
            // Timeout (a number), a TCP state, or a flag such as `[ASSURED]`.
            if e.state.is_none() && word.chars().all(|c| c.is_ascii_uppercase() || c == '_') {
                e.state = Some(word.to_owned());
            }
            continue;
        };
        if k == "src" {
            tuple += 1;
        }
        match (tuple, k) {
            (1, "src") => e.orig_src = v.parse().ok(),
            (1, "dst") => e.orig_dst = v.parse().ok(),
            (1, "sport") => e.orig_sport = v.parse().ok(),
            (1, "dport") => e.orig_dport = v.parse().ok(),
            (2, "src") => e.reply_src = v.parse().ok(),
            (2, "dst") => e.reply_dst = v.parse().ok(),
            _ => {}
        }
    }
    Some(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORWARD: &str = "\
Chain FORWARD (policy DROP 3 packets, 252 bytes)
    pkts      bytes target     prot opt in     out     source               destination         
      10      840 DOCKER-USER  all  --  *      *       0.0.0.0/0            0.0.0.0/0           
       7      588 ACCEPT     all  --  *      docker0  0.0.0.0/0            0.0.0.0/0            ctstate RELATED,ESTABLISHED
       2      168            all  --  docker0 *       0.0.0.0/0            0.0.0.0/0           
";

    #[test]
    fn parses_forward_counters() {
        let c = parse_chain(FORWARD).expect("parse");
        assert_eq!(c.chain, "FORWARD");
        assert_eq!(c.policy.as_deref(), Some("DROP"));
        assert_eq!((c.policy_packets, c.policy_bytes), (3, 252));
        assert_eq!(c.rules.len(), 3);
        assert_eq!(c.rules[0].target, "DOCKER-USER");
        assert_eq!(c.rules[1].out_iface, "docker0");
        assert_eq!(c.rules[1].extra, "ctstate RELATED,ESTABLISHED");
        assert_eq!(c.rules[2].target, "");
        assert_eq!(c.rules[2].in_iface, "docker0");
        assert_eq!(c.packets_to("DOCKER-USER"), Some(10));
        assert_eq!(c.total_packets(), 22);
    }

    #[test]
    fn parses_user_chain_header() {
        let c = parse_chain("Chain DOCKER (1 references)\n    pkts bytes target prot opt in out source destination\n")
            .expect("parse");
        assert_eq!(c.chain, "DOCKER");
        assert_eq!(c.policy, None);
        assert!(c.rules.is_empty());
        assert!(parse_chain("nonsense").is_err());
    }

    #[test]
    fn parses_conntrack_tool_and_proc_lines() {
        let tool = "tcp      6 431999 ESTABLISHED src=192.168.110.11 dst=192.168.220.11 sport=40000 dport=5001 src=192.168.220.11 dst=192.168.110.11 sport=5001 dport=40000 [ASSURED] mark=0 use=1";
        let e = parse_ct_line(tool).expect("parse");
        assert_eq!(e.proto, "tcp");
        assert_eq!(e.state.as_deref(), Some("ESTABLISHED"));
        assert_eq!(e.orig_src, Some(Ipv4Addr::new(192, 168, 110, 11)));
        assert_eq!(e.orig_dst, Some(Ipv4Addr::new(192, 168, 220, 11)));
        assert_eq!((e.orig_sport, e.orig_dport), (Some(40000), Some(5001)));
        assert_eq!(e.reply_src, Some(Ipv4Addr::new(192, 168, 220, 11)));
        assert_eq!(e.reply_dst, Some(Ipv4Addr::new(192, 168, 110, 11)));

        let proc = "ipv4     2 icmp     1 29 src=192.168.110.11 dst=172.16.91.132 type=8 code=0 id=7 src=172.16.91.132 dst=172.16.91.131 type=0 code=0 id=7 mark=0 zone=0 use=2";
        let e = parse_ct_line(proc).expect("parse");
        assert_eq!(e.proto, "icmp");
        assert_eq!(e.state, None);
        assert_eq!(e.reply_dst, Some(Ipv4Addr::new(172, 16, 91, 131)));

        let f = CtFilter::flow(
            Ipv4Addr::new(192, 168, 110, 11),
            Ipv4Addr::new(172, 16, 91, 132),
        );
        assert!(f.matches(&e));
        assert!(
            !CtFilter {
                proto: Some("tcp".into()),
                ..f
            }
            .matches(&e)
        );
    }
}
