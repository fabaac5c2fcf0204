//! The migration decision, without a kernel: which pinned layouts migrate
//! and which refuse.

use super::*;

const HASH: u32 = 1;
const LPM: u32 = 11;

fn want() -> BTreeMap<&'static str, MapShape> {
    BTreeMap::from([
        (
            MAP_ROUTES,
            MapShape {
                map_type: LPM,
                key_size: 8,
                value_size: 8,
                max_entries: 131_072,
                flags: 1,
            },
        ),
        (
            MAP_ENDPOINT_PORTS,
            MapShape {
                map_type: HASH,
                key_size: 4,
                value_size: 4,
                max_entries: 65_536,
                flags: 0,
            },
        ),
    ])
}

fn pinned_as(want: &BTreeMap<&'static str, MapShape>) -> BTreeMap<String, MapShape> {
    want.iter().map(|(n, s)| ((*n).to_owned(), *s)).collect()
}

#[test]
fn this_builds_layout_needs_nothing() {
    let want = want();
    let pinned = pinned_as(&want);
    let this = fingerprint(&want);
    assert!(
        decide(&pinned, &[this], &want, &[])
            .expect("adopts")
            .is_none()
    );
    // Pins of a build that recorded no fingerprint are taken as this build's.
    assert!(decide(&pinned, &[], &want, &[]).expect("adopts").is_none());
}

#[test]
fn another_capacity_or_flags_is_copied() {
    let want = want();
    let mut pinned = pinned_as(&want);
    pinned.get_mut(MAP_ROUTES).expect("ROUTES").max_entries = 1_024;
    pinned.get_mut(MAP_ROUTES).expect("ROUTES").flags = 0;
    let old = fingerprint_at(
        MAP_LAYOUT_VERSION,
        pinned.iter().map(|(n, s)| (n.as_str(), s)),
    );
    let m = decide(&pinned, std::slice::from_ref(&old), &want, &[])
        .expect("migrates")
        .expect("a migration");
    assert_eq!(m.from_version, MAP_LAYOUT_VERSION);
    assert_eq!(
        m.steps[MAP_ROUTES],
        Step::Copy {
            from: pinned[MAP_ROUTES]
        }
    );
    assert_eq!(m.steps[MAP_ENDPOINT_PORTS], Step::Keep);
    assert_eq!(m.recorded, vec![old]);
    assert_eq!(m.fingerprint, fingerprint(&want));
    assert_eq!(m.fresh(), BTreeSet::from([MAP_ROUTES]));
}

#[test]
fn a_new_map_is_created_and_a_gone_one_dropped() {
    let want = want();
    let mut pinned = pinned_as(&want);
    pinned.remove(MAP_ENDPOINT_PORTS);
    pinned.insert("OLD_MAP".into(), pinned[MAP_ROUTES]);
    let old = fingerprint_at(
        MAP_LAYOUT_VERSION,
        pinned.iter().map(|(n, s)| (n.as_str(), s)),
    );
    let m = decide(&pinned, &[old], &want, &[])
        .expect("migrates")
        .expect("a migration");
    assert_eq!(m.steps[MAP_ENDPOINT_PORTS], Step::New);
    assert_eq!(m.steps[MAP_ROUTES], Step::Keep);
    assert_eq!(m.dropped, vec!["OLD_MAP".to_owned()]);
    assert_eq!(m.fresh(), BTreeSet::from([MAP_ENDPOINT_PORTS]));
}

/// Pins of the build before IPv6: no `ROUTES6`, `LOCAL_NETS6` or
/// `ENDPOINTS6`, and a `STATS` of 13 slots. This build adopts them: the
/// IPv6 maps are created empty (the endpoint one sized as `ENDPOINTS`),
/// `STATS` is copied into its longer array, the rest is kept.
#[test]
fn pins_from_before_ipv6_gain_the_ipv6_maps() {
    let want = crate::adopt::object_shapes(16).expect("this build's shapes");
    let ipv6 = [MAP_ROUTES6, MAP_LOCAL_NETS6, MAP_ENDPOINTS6];
    let mut pinned = pinned_as(&want);
    for map in ipv6 {
        pinned.remove(map);
    }
    pinned.get_mut(MAP_STATS).expect("STATS").max_entries = 13;
    let old = fingerprint_at(1, pinned.iter().map(|(n, s)| (n.as_str(), s)));
    let m = decide(&pinned, &[old], &want, &[])
        .expect("migrates")
        .expect("a migration");
    for map in ipv6 {
        assert_eq!(m.steps[map], Step::New, "{map}");
    }
    assert_eq!(want[MAP_ENDPOINTS6].max_entries, 16);
    assert_eq!(
        m.steps[MAP_STATS],
        Step::Copy {
            from: pinned[MAP_STATS]
        }
    );
    assert_eq!(
        m.fresh(),
        BTreeSet::from([MAP_ROUTES6, MAP_LOCAL_NETS6, MAP_ENDPOINTS6, MAP_STATS])
    );
    assert!(m.dropped.is_empty());
}

/// Pins of the first IPv6 build: `STATS` of 22 slots, before
/// `reject_sent6` and `reject_limited6`. Only `STATS` is copied, into its
/// longer array.
#[test]
fn pins_without_the_ipv6_reject_counters_gain_them() {
    let want = crate::adopt::object_shapes(16).expect("this build's shapes");
    assert_eq!(want[MAP_STATS].max_entries, xhost_common::stat::COUNT);
    let mut pinned = pinned_as(&want);
    pinned.get_mut(MAP_STATS).expect("STATS").max_entries = 22;
    let old = fingerprint_at(1, pinned.iter().map(|(n, s)| (n.as_str(), s)));
    assert_ne!(old, fingerprint(&want), "the layout changed");
    let m = decide(&pinned, &[old], &want, &[])
        .expect("migrates")
        .expect("a migration");
    assert_eq!(
        m.steps[MAP_STATS],
        Step::Copy {
            from: pinned[MAP_STATS]
        }
    );
    assert_eq!(m.fresh(), BTreeSet::from([MAP_STATS]));
    assert!(m.dropped.is_empty());
}

#[test]
fn another_endpoint_capacity_is_the_operators_and_refused() {
    let want = want();
    let mut pinned = pinned_as(&want);
    pinned
        .get_mut(MAP_ENDPOINT_PORTS)
        .expect("ports")
        .max_entries = 8;
    let old = fingerprint_at(
        MAP_LAYOUT_VERSION,
        pinned.iter().map(|(n, s)| (n.as_str(), s)),
    );
    let e = decide(&pinned, &[old], &want, &[]).expect_err("refused");
    assert!(
        matches!(
            e,
            AdoptError::Capacity {
                pinned: 8,
                wanted: 65_536
            }
        ),
        "{e}"
    );
}

#[test]
fn another_value_size_is_refused_naming_the_map() {
    let want = want();
    let mut pinned = pinned_as(&want);
    let ports = pinned.get_mut(MAP_ENDPOINT_PORTS).expect("ports");
    ports.value_size = 8;
    ports.max_entries = 1_024;
    let e = decide(&pinned, &[fingerprint(&want)], &want, &[]).expect_err("refused");
    assert!(
        e.to_string().starts_with(
            "pinned map ENDPOINT_PORTS does not match this build (value size 8, this build's 4)"
        ),
        "{e}"
    );
}

#[test]
fn a_declared_conversion_takes_a_changed_value() {
    fn convert(_: &Map, _: &mut Map) -> Result<u64, MapError> {
        Ok(0)
    }
    let conversions = [Conversion {
        map: MAP_ROUTES,
        from_version: MAP_LAYOUT_VERSION,
        from_key_size: 8,
        from_value_size: 4,
        convert,
    }];
    let want = want();
    let mut pinned = pinned_as(&want);
    pinned.get_mut(MAP_ROUTES).expect("ROUTES").value_size = 4;
    let m = decide(&pinned, &[fingerprint(&want)], &want, &conversions)
        .expect("migrates")
        .expect("a migration");
    assert_eq!(
        m.steps[MAP_ROUTES],
        Step::Convert {
            from: pinned[MAP_ROUTES],
            conversion: 0
        }
    );
    // Not for another value size.
    pinned.get_mut(MAP_ROUTES).expect("ROUTES").value_size = 12;
    assert!(decide(&pinned, &[fingerprint(&want)], &want, &conversions).is_err());
}

#[test]
fn an_unknown_layout_is_refused() {
    let want = want();
    let pinned = pinned_as(&want);
    let e = decide(&pinned, &["00112233deadbeef".into()], &want, &[]).expect_err("refused");
    assert!(
        matches!(e, AdoptError::Version { ref pinned, .. } if pinned == "00112233deadbeef"),
        "{e}"
    );
}

#[test]
fn an_interrupted_migration_goes_on() {
    // Both fingerprints recorded, one map renamed into place, one not.
    let want = want();
    let mut pinned = pinned_as(&want);
    pinned.get_mut(MAP_ROUTES).expect("ROUTES").max_entries = 1_024;
    let m = decide(
        &pinned,
        &["00112233deadbeef".into(), fingerprint(&want)],
        &want,
        &[],
    )
    .expect("migrates")
    .expect("a migration");
    assert_eq!(m.steps[MAP_ENDPOINT_PORTS], Step::Keep);
    assert!(matches!(m.steps[MAP_ROUTES], Step::Copy { .. }));
    // Everything renamed: only the old record is left to remove.
    let m = decide(
        &pinned_as(&want),
        &["00112233deadbeef".into(), fingerprint(&want)],
        &want,
        &[],
    )
    .expect("migrates")
    .expect("a migration");
    assert!(m.fresh().is_empty());
}

/// Builds before migration hashed their maps in `PINNED_MAPS` order; the
/// fingerprint of this build's maps is still what they recorded, so
/// either can adopt the other's pins.
#[test]
fn the_fingerprint_is_what_earlier_builds_recorded() {
    use sha2::{Digest as _, Sha256};
    let shapes: BTreeMap<&'static str, MapShape> = xhost_common::PINNED_MAPS
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let i = i as u32;
            (
                n,
                MapShape {
                    map_type: i,
                    key_size: i + 1,
                    value_size: i + 2,
                    max_entries: i + 3,
                    flags: i + 4,
                },
            )
        })
        .collect();
    let mut h = Sha256::new();
    h.update(1u32.to_le_bytes());
    for name in xhost_common::PINNED_MAPS {
        h.update(name.as_bytes());
        let s = shapes[name];
        for v in [s.map_type, s.key_size, s.value_size, s.max_entries, s.flags] {
            h.update(v.to_le_bytes());
        }
    }
    let earlier: String = h.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        fingerprint_at(1, shapes.iter().map(|(n, s)| (*n, s))),
        earlier
    );
}

/// A map added to `PINNED_MAPS` must be appended to `FINGERPRINT_ORDER`
/// too (and a removed one stays there).
#[test]
fn every_pinned_map_has_its_place_in_the_fingerprint() {
    for name in xhost_common::PINNED_MAPS {
        assert!(
            crate::adopt::FINGERPRINT_ORDER.contains(&name),
            "{name} missing from FINGERPRINT_ORDER"
        );
    }
}

/// Pinned maps bpftool created in a bpffs directory of this process,
/// removed on drop.
struct Pins(PathBuf);

impl Pins {
    fn new() -> Self {
        let dir = PathBuf::from(format!("/sys/fs/bpf/xh-migrate-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a bpffs directory (root)");
        Self(dir)
    }

    fn per_cpu_array(&self, name: &str, entries: u32) -> Map {
        let entries = entries.to_string();
        self.create(
            name,
            &[
                "type",
                "percpu_array",
                "key",
                "4",
                "value",
                "16",
                "entries",
                &entries,
            ],
        )
    }

    /// A map bpftool creates as `spec` (type, sizes, entries, flags),
    /// pinned as `name` and opened.
    fn create(&self, name: &str, spec: &[&str]) -> Map {
        let path = self.0.join(name);
        let out = std::process::Command::new("bpftool")
            .args(["map", "create"])
            .arg(&path)
            .args(spec)
            .args(["name", name])
            .output()
            .expect("bpftool");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        open(&path).expect("open the pin")
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        for e in std::fs::read_dir(&self.0).into_iter().flatten().flatten() {
            let _ = std::fs::remove_file(e.path());
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}

fn counters(m: &Map, slot: u32) -> Vec<Counter> {
    let a = PerCpuArray::<_, Counter>::try_from(m).expect("per-CPU array");
    a.get(&slot, 0).expect("slot").iter().copied().collect()
}

fn set(m: &mut Map, slot: u32, values: Vec<Counter>) {
    let mut a = PerCpuArray::<_, Counter>::try_from(m).expect("per-CPU array");
    a.set(slot, PerCpuValues::try_from(values).expect("values"), 0)
        .expect("set");
}

/// Pins of the builds before IPv6 underlay addresses: `ROUTES6` values of
/// 8 bytes (`Peer`, an IPv4 host) and no `PEER_HOSTS6`. This build adopts
/// them: `ROUTES6` is converted, `PEER_HOSTS6` created empty, the rest kept.
#[test]
fn pins_with_ipv4_hosts_in_routes6_convert_them() {
    let want = crate::adopt::object_shapes(16).expect("this build's shapes");
    assert_eq!(want[MAP_ROUTES6].value_size, 20, "Peer6");
    let mut pinned = pinned_as(&want);
    pinned.remove(MAP_PEER_HOSTS6);
    pinned.get_mut(MAP_ROUTES6).expect("ROUTES6").value_size = 8;
    let old = fingerprint_at(1, pinned.iter().map(|(n, s)| (n.as_str(), s)));
    let m = decide(&pinned, &[old], &want, CONVERSIONS)
        .expect("migrates")
        .expect("a migration");
    assert_eq!(
        m.steps[MAP_ROUTES6],
        Step::Convert {
            from: pinned[MAP_ROUTES6],
            conversion: 0
        }
    );
    assert_eq!(m.steps[MAP_PEER_HOSTS6], Step::New);
    assert_eq!(m.fresh(), BTreeSet::from([MAP_ROUTES6, MAP_PEER_HOSTS6]));
}

/// The conversion itself on real maps: each prefix keeps its place, its
/// IPv4 host becomes `::ffff:a.b.c.d`. Needs root and bpftool.
#[test]
fn routes6_of_ipv4_hosts_are_converted_to_mapped_addresses() {
    let pins = Pins::new();
    let lpm = |name: &str, value: &str| {
        let spec = [
            "type", "lpm_trie", "key", "20", "value", value, "entries", "16", "flags", "1",
        ];
        pins.create(name, &spec)
    };
    let mut old = lpm("OLD6", "8");
    let mut new = lpm("NEW6", "20");
    let key = |last: u8| {
        aya::maps::lpm_trie::Key::new(64, [0xfd, 0, 0, last, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    };
    {
        let mut t = LpmTrie::<_, [u8; 16], Peer>::try_from(&mut old).expect("lpm");
        for (last, host) in [(0xb, [172, 16, 91, 132]), (0xc, [172, 16, 91, 133])] {
            t.insert(&key(last), Peer { host, flags: 0 }, 0)
                .expect("insert");
        }
    }
    let n = routes6_of_ipv4_hosts(&old, &mut new).expect("convert");
    assert_eq!(n, 2);
    let t = LpmTrie::<_, [u8; 16], Peer6>::try_from(&new).expect("lpm");
    let got: BTreeMap<[u8; 16], [u8; 16]> = t
        .iter()
        .map(|e| e.map(|(k, v)| (k.data(), v.host)))
        .collect::<Result<_, _>>()
        .expect("iterate");
    let mapped = |a: [u8; 4]| std::net::Ipv4Addr::from(a).to_ipv6_mapped().octets();
    assert_eq!(
        got,
        BTreeMap::from([
            (key(0xb).data(), mapped([172, 16, 91, 132])),
            (key(0xc).data(), mapped([172, 16, 91, 133])),
        ])
    );
}

/// Per-CPU counters are copied CPU by CPU, and what the old programs
/// count after the copy is added once they are swapped out, on top of
/// what the new programs counted meanwhile. Needs root and bpftool.
#[test]
fn per_cpu_counters_are_copied_and_later_counts_added() {
    let pins = Pins::new();
    let mut old = pins.per_cpu_array("OLD", 8);
    let old_again = open(&pins.0.join("OLD")).expect("open OLD");
    let new = pins.per_cpu_array("NEW", 16);
    let mut new_again = open(&pins.0.join("NEW")).expect("open NEW");
    let cpus = counters(&old, 0).len();
    let c = |packets, bytes| Counter { packets, bytes };
    let first: Vec<Counter> = (0..cpus as u64).map(|i| c(10 + i, 1000 + i)).collect();
    set(&mut old, 5, first.clone());
    let (n, rest) = copy_counters::<Counter>(old_again, new).expect("copy");
    assert_eq!(n, 1, "one slot held counts");
    assert_eq!(counters(&new_again, 5), first, "copied CPU by CPU");
    assert!(
        counters(&new_again, 6)
            .iter()
            .all(|v| *v == Counter::default())
    );
    // The old programs count on (slot 5 and a slot empty at the copy),
    // the new ones too.
    let mut later = first.clone();
    later[0] = c(later[0].packets + 7, later[0].bytes + 700);
    set(&mut old, 5, later);
    set(&mut old, 2, vec![c(1, 100); cpus]);
    let mut new_counted = first.clone();
    new_counted[cpus - 1] = c(
        new_counted[cpus - 1].packets + 3,
        new_counted[cpus - 1].bytes + 300,
    );
    set(&mut new_again, 5, new_counted);
    rest().expect("add the rest");
    let got = counters(&new_again, 5);
    assert_eq!(
        got[0].packets,
        first[0].packets + 7 + u64::from(cpus == 1) * 3
    );
    assert_eq!(
        got[cpus - 1].packets,
        first[cpus - 1].packets + 3 + u64::from(cpus == 1) * 7
    );
    assert_eq!(counters(&new_again, 2), vec![c(1, 100); cpus]);
}
