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
