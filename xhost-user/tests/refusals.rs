//! Input that `load` refuses before it touches the kernel, as it prints it:
//! one line naming the culprit. The same steps as the binary (peers parsed
//! from their flags, flags merged with the file, peers checked), without a
//! namespace or root; the namespace test of `load` checks the refusals that
//! need the kernel's view (interfaces, bridge addresses, pins).

use std::path::PathBuf;

use xhost_user::{
    config::{self, PeerConfig, Settings, SettingsLayer, Source, TunnelArg},
    plan::Limits,
    sources::{self, PeerSource},
};

/// A config file that is removed when dropped.
struct TempConfig(PathBuf);

impl TempConfig {
    fn new(name: &str, text: &str) -> Self {
        let path = std::env::temp_dir().join(format!("xh-{}-{name}", std::process::id()));
        std::fs::write(&path, text).expect("write config");
        Self(path)
    }
}

impl Drop for TempConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `load`'s checks up to the first one that needs the kernel.
fn check(peers: &[&str], flags: SettingsLayer, file: Option<PathBuf>) -> anyhow::Result<Settings> {
    let peers = peers
        .iter()
        .map(|p| p.parse::<PeerConfig>())
        .collect::<Result<Vec<_>, _>>()?;
    let source = Source {
        flags: SettingsLayer { peers, ..flags },
        file,
    };
    let settings = source.read()?;
    config::check_peers(&settings.peers)?;
    sources::peers(
        &[PeerSource {
            name: sources::CONFIG,
            peers: &settings.peers,
        }],
        &Limits::DATAPATH,
    )?;
    Ok(settings)
}

/// The flags of `--iface ens33 --bridge docker0 --no-docker`.
fn base() -> SettingsLayer {
    SettingsLayer {
        iface: Some("ens33".into()),
        bridges: vec!["docker0".into()],
        docker: Some(false),
        ..SettingsLayer::default()
    }
}

#[track_caller]
fn assert_refused(result: anyhow::Result<Settings>, culprit: &str) {
    let e = match result {
        Ok(s) => panic!("accepted, expected a refusal naming `{culprit}`: {s:?}"),
        // As main prints it: the whole cause chain.
        Err(e) => format!("{e:#}"),
    };
    assert_eq!(e.lines().count(), 1, "one line expected: {e}");
    assert!(e.contains(culprit), "must name `{culprit}`: {e}");
}

#[test]
fn flags_refused_before_the_kernel() {
    let s = check(&["172.16.91.132=192.168.220.0/24"], base(), None).expect("valid");
    assert_eq!(s.peers.len(), 1);
    let peer_cases = [
        (&["172.16.91.132=192.168.220.0/33"][..], "192.168.220.0/33"),
        (&["172.16.91.132=192.168.220.1/24"], "host bits set"),
        (&["172.16.91.132=banana"], "banana"),
        (&["not-an-ip=10.1.0.0/16"], "not-an-ip"),
        (&["172.16.91.132"], "expected HOST_IP=CIDR"),
        (
            &["172.16.91.132=10.1.0.0/16", "172.16.91.133=10.1.128.0/17"],
            "overlaps subnet 10.1.128.0/17",
        ),
        (
            &["172.16.91.132=10.1.0.0/16", "172.16.91.132=10.2.0.0/16"],
            "peer 172.16.91.132 is given more than once",
        ),
        (&["0.0.0.0=10.1.0.0/16"], "not a unicast host address"),
    ];
    for (peers, culprit) in peer_cases {
        assert_refused(check(peers, base(), None), culprit);
    }
    let no_iface = SettingsLayer {
        iface: None,
        ..base()
    };
    assert_refused(check(&[], no_iface, None), "no underlay interface");
    let vxlan = |vni, vxlan_port| SettingsLayer {
        tunnel: Some(TunnelArg::Vxlan),
        vni,
        vxlan_port,
        ..base()
    };
    assert_refused(
        check(&[], vxlan(Some(16_777_216), None), None),
        "VNI 16777216 out of range",
    );
    assert_refused(check(&[], vxlan(None, Some(0)), None), "VXLAN port 0");
    let vni_alone = SettingsLayer {
        vni: Some(7),
        ..base()
    };
    assert_refused(check(&[], vni_alone, None), "it needs --tunnel vxlan");
}

#[test]
fn config_files_refused_before_the_kernel() {
    let good = TempConfig::new(
        "good.toml",
        "iface = \"ens33\"\nbridges = [\"docker0\"]\n[[peer]]\nhost = \"172.16.91.132\"\nsubnets = [\"192.168.220.0/24\"]\n",
    );
    let flags = SettingsLayer {
        docker: Some(false),
        ..SettingsLayer::default()
    };
    let s = check(&[], flags.clone(), Some(good.0.clone())).expect("valid");
    assert_eq!((s.iface.as_str(), s.peers.len()), ("ens33", 1));

    let conflict = TempConfig::new("conflict.toml", "iface = \"eth7\"\n");
    assert_refused(
        check(&[], base(), Some(conflict.0.clone())),
        "conflicts with iface = \"eth7\"",
    );
    let unknown = TempConfig::new(
        "unknown.toml",
        "iface = \"ens33\"\nbridge = [\"docker0\"]\n",
    );
    assert_refused(
        check(&[], flags.clone(), Some(unknown.0.clone())),
        "unknown field `bridge`",
    );
    let bad_cidr = TempConfig::new(
        "cidr.toml",
        "iface = \"ens33\"\nbridges = [\"docker0\"]\n[[peer]]\nhost = \"172.16.91.132\"\nsubnets = [\"192.168.220.0/24\", \"10.0.0.0/40\"]\n",
    );
    assert_refused(
        check(&[], flags.clone(), Some(bad_cidr.0.clone())),
        "10.0.0.0/40",
    );
    // A peer subnet of the file overlapping one of the flags.
    assert_refused(
        check(
            &["172.16.91.133=192.168.220.128/25"],
            flags.clone(),
            Some(good.0.clone()),
        ),
        "overlaps subnet 192.168.220.128/25",
    );
    let missing = std::env::temp_dir().join(format!("xh-{}-missing.toml", std::process::id()));
    assert_refused(check(&[], flags, Some(missing)), "missing.toml");
}

#[test]
fn ipv6_peer_subnets_accepted_and_refused_like_ipv4() {
    // Mixed families in one --peer, IPv6 alone, and in a file's [[peer]].
    let s = check(
        &[
            "172.16.91.132=192.168.220.0/24,fd00:b::/64",
            "172.16.91.133=fd00:c::/64",
        ],
        base(),
        None,
    )
    .expect("valid");
    assert_eq!(s.peers[0].subnets.len(), 1);
    assert_eq!(s.peers[0].subnets6[0].to_string(), "fd00:b::/64");
    assert_eq!(s.peers[1].subnets6[0].to_string(), "fd00:c::/64");
    let peer_cases = [
        (
            &["172.16.91.132=fd00:b::1/64"][..],
            "`fd00:b::1/64` has host bits set (did you mean fd00:b::/64?)",
        ),
        (&["172.16.91.132=fd00:b::/129"], "fd00:b::/129"),
        (&["172.16.91.132=fd00:zz::/64"], "fd00:zz::/64"),
        (
            &["172.16.91.132=fd00:b::/48", "172.16.91.133=fd00:b:0:7::/64"],
            "subnet fd00:b::/48 of peer 172.16.91.132 overlaps subnet fd00:b:0:7::/64 of peer 172.16.91.133",
        ),
        (
            &["fd00::2=10.5.0.0/24,fd00:b::/64"],
            "peer fd00::2: IPv4 subnet 10.5.0.0/24 needs the peer's IPv4 address",
        ),
        (
            &["fe80::2=fd00:b::/64"],
            "peer address fe80::2 is not a unicast host address",
        ),
        (&["ff02::2=fd00:b::/64"], "peer address ff02::2"),
        (&["[fd00::2=fd00:b::/64"], "`[fd00::2` is not an IP address"),
        (
            &["fd00::2=fd00:b::/64", "[fd00::2]=fd00:c::/64"],
            "peer fd00::2 is given more than once",
        ),
    ];
    for (peers, culprit) in peer_cases {
        assert_refused(check(peers, base(), None), culprit);
    }
    // IPv4 and IPv6 prefixes never overlap each other.
    check(&["172.16.91.132=0.0.0.0/0,::/0"], base(), None).expect("disjoint families");
    let flags = SettingsLayer {
        docker: Some(false),
        ..SettingsLayer::default()
    };
    let dual = TempConfig::new(
        "dual.toml",
        "iface = \"ens33\"\nbridges = [\"docker0\"]\n[[peer]]\nhost = \"172.16.91.132\"\nsubnets = [\"192.168.220.0/24\", \"fd00:b::/64\"]\n",
    );
    let s = check(&[], flags.clone(), Some(dual.0.clone())).expect("valid");
    assert_eq!(
        (s.peers[0].subnets.len(), s.peers[0].subnets6.len()),
        (1, 1)
    );
    // A file's IPv6 subnet overlapping one of the flags'.
    assert_refused(
        check(
            &["172.16.91.133=fd00:b::/56"],
            flags.clone(),
            Some(dual.0.clone()),
        ),
        "overlaps subnet fd00:b::/64",
    );
    // A peer host on an IPv6 underlay, in a file and on the flag (bracketed
    // or not; an IPv4-mapped address is the IPv4 address).
    let v6_host = TempConfig::new(
        "v6host.toml",
        "iface = \"ens33\"\nbridges = [\"docker0\"]\n[[peer]]\nhost = \"fd00::2\"\nsubnets = [\"fd00:b::/64\"]\n",
    );
    let s = check(
        &["[fd00::3]=fd00:c::/64", "::ffff:172.16.91.132=10.5.0.0/24"],
        flags.clone(),
        Some(v6_host.0.clone()),
    )
    .expect("valid");
    let hosts: Vec<String> = s.peers.iter().map(|p| p.host.to_string()).collect();
    assert!(
        hosts.contains(&"fd00::3".to_owned()) && hosts.contains(&"172.16.91.132".to_owned()),
        "{hosts:?}"
    );
    let file_only = check(&[], flags.clone(), Some(v6_host.0.clone())).expect("valid");
    assert_eq!(file_only.peers[0].host.to_string(), "fd00::2");
    let v6_host_v4_net = TempConfig::new(
        "v6host4.toml",
        "iface = \"ens33\"\nbridges = [\"docker0\"]\n[[peer]]\nhost = \"fd00::2\"\nsubnets = [\"10.5.0.0/24\"]\n",
    );
    assert_refused(
        check(&[], flags.clone(), Some(v6_host_v4_net.0.clone())),
        "IPv4 subnet 10.5.0.0/24 needs the peer's IPv4 address",
    );
    let host_bits = TempConfig::new(
        "v6bits.toml",
        "iface = \"ens33\"\nbridges = [\"docker0\"]\n[[peer]]\nhost = \"172.16.91.132\"\nsubnets = [\"fd00:b::1/64\"]\n",
    );
    assert_refused(
        check(&[], flags.clone(), Some(host_bits.0.clone())),
        "fd00:b::1/64",
    );
    // More IPv6 subnets than ROUTES6 holds: refused, naming the map.
    let many: String = (0..=xhost_common::MAX_ROUTES6)
        .map(|i| format!("fd00:{i:x}::/64"))
        .collect::<Vec<_>>()
        .join(",");
    assert_refused(
        check(&[&format!("172.16.91.132={many}")], base(), None),
        &format!(
            "{} IPv6 peer subnets: the datapath's ROUTES6 map holds at most {}",
            xhost_common::MAX_ROUTES6 + 1,
            xhost_common::MAX_ROUTES6
        ),
    );
}

/// A valid config file, line by line: what the corpus below mutates.
const VALID: &[&str] = &[
    "iface = \"ens33\"",
    "bridges = [\"docker0\"]",
    "docker = false",
    "tunnel = \"vxlan\"",
    "vni = 7",
    "vxlan_port = 8472",
    "attach = \"auto\"",
    "xdp_mode = \"auto\"",
    "metrics_addr = \"127.0.0.1:9464\"",
    "[[peer]]",
    "host = \"172.16.91.132\"",
    "subnets = [\"192.168.220.0/24\"]",
    "[[peer]]",
    "host = \"172.16.91.133\"",
    "subnets = [\"192.168.230.0/24\", \"10.1.0.0/16\"]",
];

/// Top-level keys of `VALID` and values of another type for each.
const WRONG_TYPES: &[(&str, &[&str])] = &[
    ("iface", &["7", "true", "[\"ens33\"]"]),
    ("bridges", &["\"docker0\"", "1", "[1, 2]"]),
    ("docker", &["\"yes\"", "1"]),
    ("tunnel", &["1", "\"gre\"", "true"]),
    ("vni", &["\"7\"", "7.5", "true", "-1", "4294967296"]),
    ("vxlan_port", &["\"8472\"", "65536", "-5", "1.5"]),
    ("attach", &["\"xdp\"", "1"]),
    ("xdp_mode", &["\"fast\"", "false"]),
    (
        "metrics_addr",
        &[
            "\"localhost:80\"",
            "\"1.2.3.4\"",
            "\"1.2.3.4:99999\"",
            "9464",
        ],
    ),
];

/// One bad config: the file's lines, extra flags, and what the refusal
/// must name.
struct BadCase {
    lines: Vec<String>,
    peers: Vec<String>,
    flags: SettingsLayer,
    culprit: String,
}

/// A mutation of the valid config that makes it bad, with its culprit.
fn bad_case(rng: &mut xhost_model::generate::Rng) -> BadCase {
    use rand::{Rng as _, seq::IndexedRandom as _};
    let mut lines: Vec<String> = VALID.iter().map(|l| (*l).to_owned()).collect();
    let mut peers = Vec::new();
    let mut flags = SettingsLayer {
        docker: None,
        ..SettingsLayer::default()
    };
    let set = |lines: &mut Vec<String>, key: &str, value: &str| {
        let i = lines
            .iter()
            .position(|l| l.starts_with(&format!("{key} =")))
            .expect("key of VALID");
        lines[i] = format!("{key} = {value}");
    };
    let culprit = match rng.random_range(0..14) {
        0 => {
            // An unknown key, at the top or in a peer.
            let key = *["bridge", "peers", "vnid", "port", "mtu", "Iface", "hosts"]
                .choose(rng)
                .expect("keys");
            let at = if rng.random_bool(0.5) { 0 } else { lines.len() };
            lines.insert(at, format!("{key} = 1"));
            key.to_owned()
        }
        1 => {
            let (key, values) = WRONG_TYPES.choose(rng).expect("keys");
            set(&mut lines, key, values.choose(rng).expect("values"));
            (*key).to_owned()
        }
        2 => {
            let bad = *[
                "10.0.0.0/33",
                "10.0.0.1/8",
                "300.1.0.0/16",
                "banana",
                "10.0.0.0/",
                "/8",
                "10.0.0.0/-1",
                "10.0.0/8",
            ]
            .choose(rng)
            .expect("cidrs");
            let last = lines.len() - 1;
            lines[last] = format!("subnets = [\"192.168.230.0/24\", \"{bad}\"]");
            bad.to_owned()
        }
        3 => {
            let bad = *[
                "banana",
                "300.1.1.1",
                "0.0.0.0",
                "172.16.91",
                "255.255.255.255",
            ]
            .choose(rng)
            .expect("hosts");
            lines[10] = format!("host = \"{bad}\"");
            bad.to_owned()
        }
        4 => {
            // A subnet overlapping the other peer's.
            let net = *[
                "192.168.220.128/25",
                "192.168.0.0/16",
                "192.168.220.7/32",
                "0.0.0.0/0",
            ]
            .choose(rng)
            .expect("nets");
            lines[14] = format!("subnets = [\"10.1.0.0/16\", \"{net}\"]");
            "overlaps".to_owned()
        }
        5 => {
            lines[13] = "host = \"172.16.91.132\"".to_owned();
            "172.16.91.132 is given more than once".to_owned()
        }
        6 => {
            let (key, value) = *[("vni", "0"), ("vni", "16777216"), ("vxlan_port", "0")]
                .choose(rng)
                .expect("ranges");
            set(&mut lines, key, value);
            key.to_owned()
        }
        7 => {
            // A peer without one of its required keys.
            let (line, key) = *[(10, "host"), (11, "subnets"), (14, "subnets")]
                .choose(rng)
                .expect("required");
            lines.remove(line);
            key.to_owned()
        }
        8 => {
            lines.remove(0);
            "iface".to_owned()
        }
        9 => {
            // VXLAN settings without VXLAN.
            lines.remove(3);
            "vni".to_owned()
        }
        10 => {
            // A key given twice.
            let key = *["iface", "vni", "docker"].choose(rng).expect("keys");
            let line = lines
                .iter()
                .find(|l| l.starts_with(&format!("{key} =")))
                .expect("key")
                .clone();
            lines.insert(1, line);
            key.to_owned()
        }
        11 => {
            // A flag that says otherwise than the file.
            match rng.random_range(0..4) {
                0 => {
                    flags.iface = Some("eth7".into());
                    "iface".to_owned()
                }
                1 => {
                    flags.vni = Some(8);
                    "vni".to_owned()
                }
                2 => {
                    flags.vxlan_port = Some(4789);
                    "vxlan-port".to_owned()
                }
                _ => {
                    set(&mut lines, "docker", "true");
                    flags.docker = Some(false);
                    "docker".to_owned()
                }
            }
        }
        12 => {
            // A bad --peer.
            let arg = *[
                "172.16.91.140",
                "x=10.9.0.0/16",
                "172.16.91.140=10.9.0.0/33",
                "172.16.91.140=10.9.0.1/16",
                "172.16.91.140=",
                "172.16.91.140=10.9.0.0/16,,",
                "=10.9.0.0/16",
            ]
            .choose(rng)
            .expect("peers");
            peers.push(arg.to_owned());
            arg.to_owned()
        }
        _ => {
            // An empty subnet list.
            lines[14] = "subnets = []".to_owned();
            "172.16.91.133".to_owned()
        }
    };
    BadCase {
        lines,
        peers,
        flags,
        culprit,
    }
}

/// Thousands of bad configs, generated from a printed seed
/// (`XHOST_CONFIG_SEED` replays one): each is refused, in one line that
/// names its culprit, and nothing panics.
#[test]
fn generated_bad_configs_are_refused_in_one_line_naming_the_culprit() {
    let seed = std::env::var("XHOST_CONFIG_SEED")
        .ok()
        .map(|v| v.parse::<u64>().expect("XHOST_CONFIG_SEED: a whole number"))
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock")
                .as_nanos() as u64
        });
    eprintln!("bad-config corpus: seed {seed} (replay: XHOST_CONFIG_SEED={seed})");
    let mut rng = xhost_model::generate::batch_rng(seed, 0);
    let file = TempConfig::new("corpus.toml", "");
    for n in 0..2_000 {
        let case = bad_case(&mut rng);
        let text = case.lines.join("\n") + "\n";
        std::fs::write(&file.0, &text).expect("write config");
        let peers: Vec<&str> = case.peers.iter().map(String::as_str).collect();
        let flags = case.flags.clone();
        let path = file.0.clone();
        let result = std::panic::catch_unwind(move || check(&peers, flags, Some(path)))
            .unwrap_or_else(|_| panic!("seed {seed} case {n}: panicked on\n{text}"));
        let e = match result {
            Ok(s) => panic!(
                "seed {seed} case {n}: accepted\n{text}{:?}\n{s:?}",
                case.peers
            ),
            Err(e) => format!("{e:#}"),
        };
        assert_eq!(
            e.lines().count(),
            1,
            "seed {seed} case {n}: one line expected: {e}\n{text}"
        );
        assert!(
            e.to_lowercase().contains(&case.culprit.to_lowercase()),
            "seed {seed} case {n}: must name `{}`: {e}\n{text}{:?}",
            case.culprit,
            case.peers
        );
    }
}
