//! Migrating pinned maps to this build's layout when a load adopts a
//! datapath another build pinned (an upgrade, or a rollback).
//!
//! What migrates: a map whose key and value are unchanged but whose
//! capacity or flags differ is created anew in this build's shape and
//! every entry copied into it (per-CPU maps CPU by CPU; LPM tries and hash
//! maps by iterating their keys); a map new in this build is created
//! empty; a pinned map this build no longer has is unpinned. What refuses,
//! decided before anything is touched: a changed map type, key or value
//! (unless a [`Conversion`] is declared for that map and layout version),
//! entries that do not fit the new capacity, and pins written under a
//! layout version this build does not know.
//!
//! Order, so that a crash at any point leaves a datapath that forwards:
//! 1. the new maps are created, filled and pinned under
//!    `<pin-dir>/migrating/`, and this build's fingerprint is recorded
//!    beside the old one; the old programs serve on the old maps. A crash
//!    here leaves `migrating/`, which the next load discards.
//! 2. each new map is renamed over the old pin (rename(2) on bpffs swaps
//!    the name atomically); the old programs hold the old maps, so they
//!    go on serving. A crash here leaves pins of either layout map by map,
//!    under both fingerprints: the next load migrates what is left.
//! 3. the programs are swapped in, link by link (as adoption does).
//! 4. what the old programs counted since the copy is added to the new
//!    counters, maps this build no longer has are unpinned, and the old
//!    fingerprint is removed.
//!
//! A crash after step 2 loses what the old programs counted after the copy
//! (milliseconds of counters); routes, endpoints and the rest carry over.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use aya::{
    Pod,
    maps::{Array, HashMap, LpmTrie, Map, MapData, MapError, MapInfo, PerCpuArray, PerCpuValues},
};
use log::info;
use xhost_common::{
    Counter, Endpoint, LocalNet, MAP_DATAPATH_GEN, MAP_ENDPOINT_PORTS, MAP_ENDPOINTS,
    MAP_ENDPOINTS6, MAP_LAYOUT_VERSION, MAP_LOCAL_NETS, MAP_LOCAL_NETS6, MAP_PEER_HOSTS,
    MAP_PEER_HOSTS6, MAP_PEER_STATS, MAP_ROUTES, MAP_ROUTES6, MAP_STATS, MAP_UNDERLAY_ADDRS, Peer,
    Peer6, PeerCounters, PeerHost,
};

use crate::{
    adopt::{AdoptError, ENDPOINT_MAPS, MapShape, fingerprint, fingerprint_at},
    layout::{Layout, remove_file_if_exists},
};

/// A conversion of one map's entries from the value layout of an older
/// layout version, declared by the build that changes that map's key or
/// value (or bumps `MAP_LAYOUT_VERSION` for a new meaning at the same
/// size). Without one, such a change refuses adoption.
pub struct Conversion {
    pub map: &'static str,
    /// The `MAP_LAYOUT_VERSION` the pinned entries were written under.
    pub from_version: u32,
    /// The key and value size of the pinned map it reads.
    pub from_key_size: u32,
    pub from_value_size: u32,
    /// Writes every entry of `old` (the pinned map) into `new` (this
    /// build's, empty), converted; returns how many it wrote.
    pub convert: fn(old: &Map, new: &mut Map) -> Result<u64, MapError>,
}

/// The declared conversions.
pub const CONVERSIONS: &[Conversion] = &[ROUTES6_PEER_V4];

/// `ROUTES6` of the builds before IPv6 underlay addresses: a `Peer` (an
/// IPv4 host) per prefix, now a `Peer6` holding that host mapped.
const ROUTES6_PEER_V4: Conversion = Conversion {
    map: MAP_ROUTES6,
    from_version: 1,
    // The LPM key: a 4-byte prefix length and the address.
    from_key_size: 4 + 16,
    from_value_size: std::mem::size_of::<Peer>() as u32,
    convert: routes6_of_ipv4_hosts,
};

fn routes6_of_ipv4_hosts(old: &Map, new: &mut Map) -> Result<u64, MapError> {
    let old = LpmTrie::<_, [u8; 16], Peer>::try_from(old)?;
    let mut new = LpmTrie::<_, [u8; 16], Peer6>::try_from(new)?;
    let mut n = 0;
    for e in old.iter() {
        let (k, v) = e?;
        let value = Peer6 {
            host: xhost_common::map_v4(v.host),
            flags: v.flags,
        };
        new.insert(&k, value, 0)?;
        n += 1;
    }
    Ok(n)
}

/// What happens to one map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Reused as pinned.
    Keep,
    /// Capacity or flags differ: copied into a map of this build's shape.
    Copy { from: MapShape },
    /// Converted by the conversion of that index in [`CONVERSIONS`].
    Convert { from: MapShape, conversion: usize },
    /// Not pinned (new in this build): created empty.
    New,
}

/// How the pinned maps become this build's: decided by [`plan`] before
/// anything is touched, carried out by [`Migration::carry`] and
/// [`Carried::settle`] around the programs' swap.
#[derive(Debug)]
pub struct Migration {
    /// The layout version the pins were written under.
    pub from_version: u32,
    /// This build's maps and what happens to each.
    pub steps: BTreeMap<&'static str, Step>,
    /// Pinned maps this build no longer has, unpinned at the end.
    pub dropped: Vec<String>,
    /// The fingerprints recorded beside the pins.
    pub recorded: Vec<String>,
    /// This build's fingerprint.
    pub fingerprint: String,
}

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(
        "pinned map {map} holds {held} entries, this build's capacity is {capacity}: they do not fit, so this build cannot adopt the datapath; nothing was touched (run the build that pinned it, or `xhost-user unload` first, which drops routes, endpoints and counters)"
    )]
    DoesNotFit {
        map: &'static str,
        held: u64,
        capacity: u32,
    },
    #[error("migrating map {map}")]
    Map {
        map: String,
        #[source]
        source: MapError,
    },
    #[error("migrating map {map}: {}", .path.display())]
    Pin {
        map: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("migrating the pinned maps: {}", .path.display())]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("this build cannot copy map {0}: it has no types for it")]
    NoTypes(&'static str),
}

/// The shapes of the maps pinned under `layout` (files directly in the
/// pin dir that are maps), by name.
pub fn pinned_shapes(layout: &Layout) -> BTreeMap<String, MapShape> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(&layout.pin_dir)
        .into_iter()
        .flatten()
        .flatten()
    {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        if let Ok(info) = MapInfo::from_pin(e.path()) {
            out.insert(
                e.file_name().to_string_lossy().into_owned(),
                MapShape::of_pin(&info),
            );
        }
    }
    out
}

/// Every fingerprint recorded under `<pin-dir>/layout/` (two while a
/// migration is under way).
pub fn recorded(layout: &Layout) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(layout.layout_dir())
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Decides, touching nothing, how the maps pinned under `layout` become
/// `want` (this build's shapes): `None` when they are this build's
/// already, else the migration, or the one-line refusal.
pub fn plan(
    layout: &Layout,
    want: &BTreeMap<&'static str, MapShape>,
) -> Result<Option<Migration>, AdoptError> {
    let pinned = pinned_shapes(layout);
    let migration = decide(&pinned, &recorded(layout), want, CONVERSIONS)?;
    if let Some(m) = &migration {
        // Entries must fit where capacity shrinks: counted now, before
        // anything is touched.
        for (&map, step) in &m.steps {
            // A conversion that does not fit fails while filling the
            // staged map, still before anything is renamed.
            let Step::Copy { from } = step else {
                continue;
            };
            let capacity = want[map].max_entries;
            if from.max_entries <= capacity {
                continue;
            }
            let old =
                open(&layout.map(map)).map_err(|source| AdoptError::ReadMap { map, source })?;
            let held = occupied(map, &old).map_err(|source| AdoptError::ReadMap { map, source })?;
            if held > u64::from(capacity) {
                return Err(MigrateError::DoesNotFit {
                    map,
                    held,
                    capacity,
                }
                .into());
            }
        }
    }
    Ok(migration)
}

/// The pure part of [`plan`]: from the pinned shapes, the recorded
/// fingerprints and this build's shapes, what migrates or why not.
pub fn decide(
    pinned: &BTreeMap<String, MapShape>,
    recorded: &[String],
    want: &BTreeMap<&'static str, MapShape>,
    conversions: &[Conversion],
) -> Result<Option<Migration>, AdoptError> {
    let this = fingerprint(want);
    let shapes = || pinned.iter().map(|(n, s)| (n.as_str(), s));
    // The layout version the pins were written under: this build's when
    // its fingerprint is recorded (also an interrupted migration to it) or
    // none is; else the version whose fingerprint of the pinned shapes is
    // the one recorded.
    let from_version = if recorded.is_empty() || recorded.contains(&this) {
        MAP_LAYOUT_VERSION
    } else {
        (1..=MAP_LAYOUT_VERSION)
            .rev()
            .find(|&v| recorded.contains(&fingerprint_at(v, shapes())))
            .ok_or_else(|| AdoptError::Version {
                pinned: recorded.join(", "),
                this: this.clone(),
            })?
    };
    let conversion = |map: &str, from: &MapShape| {
        conversions.iter().position(|c| {
            c.map == map
                && c.from_version == from_version
                && c.from_key_size == from.key_size
                && c.from_value_size == from.value_size
        })
    };
    if from_version != MAP_LAYOUT_VERSION
        && !conversions.iter().any(|c| c.from_version == from_version)
    {
        // Another meaning at the same sizes, and nothing says how to read it.
        return Err(AdoptError::Version {
            pinned: recorded.join(", "),
            this,
        });
    }
    let mut steps = BTreeMap::new();
    for (&map, want_shape) in want {
        let step = match pinned.get(map) {
            None => Step::New,
            Some(from) => match conversion(map, from) {
                Some(conversion) => Step::Convert {
                    from: *from,
                    conversion,
                },
                None if from == want_shape => Step::Keep,
                // The endpoint maps' capacity is the operator's choice
                // (--max-endpoints), not a build's layout: not resized.
                None if ENDPOINT_MAPS.contains(&map)
                    && MapShape {
                        max_entries: want_shape.max_entries,
                        ..*from
                    } == *want_shape =>
                {
                    return Err(AdoptError::Capacity {
                        pinned: from.max_entries,
                        wanted: want_shape.max_entries,
                    });
                }
                None if from.map_type == want_shape.map_type
                    && from.key_size == want_shape.key_size
                    && from.value_size == want_shape.value_size =>
                {
                    Step::Copy { from: *from }
                }
                None => {
                    return Err(AdoptError::Layout {
                        map,
                        difference: from.difference(want_shape).unwrap_or_default(),
                    });
                }
            },
        };
        steps.insert(map, step);
    }
    let dropped: Vec<String> = pinned
        .keys()
        .filter(|n| !want.contains_key(n.as_str()))
        .cloned()
        .collect();
    let unchanged = steps.values().all(|s| *s == Step::Keep)
        && dropped.is_empty()
        && recorded.iter().all(|r| *r == this);
    if unchanged {
        return Ok(None);
    }
    Ok(Some(Migration {
        from_version,
        steps,
        dropped,
        recorded: recorded.to_vec(),
        fingerprint: this,
    }))
}

impl Migration {
    /// The maps the programs get new (created under `<pin-dir>/migrating/`).
    pub fn fresh(&self) -> BTreeSet<&'static str> {
        self.steps
            .iter()
            .filter(|(_, s)| **s != Step::Keep)
            .map(|(&m, _)| m)
            .collect()
    }

    /// Where the programs' map `name` is: the pin for a kept map, the
    /// staging pin for a new one (aya creates and pins it there).
    pub fn map_path(&self, layout: &Layout, name: &str) -> PathBuf {
        if self.fresh().contains(name) {
            staging_dir(layout).join(name)
        } else {
            layout.map(name)
        }
    }

    /// Before the programs are loaded: removes what an interrupted
    /// migration left staged, and makes the staging directory.
    pub fn prepare(&self, layout: &Layout) -> Result<(), MigrateError> {
        discard_staging(layout);
        let path = staging_dir(layout);
        std::fs::create_dir_all(&path).map_err(|source| MigrateError::Dir { path, source })
    }

    /// Steps 1 and 2 (module docs), once this build's programs are loaded
    /// on the staged maps: fills them from the pinned ones, records this
    /// build's fingerprint beside the old one and renames each staged map
    /// over its old pin.
    pub fn carry(&self, layout: &Layout) -> Result<Carried, MigrateError> {
        let mut carried = Carried {
            counters: Vec::new(),
            dropped: self.dropped.clone(),
            recorded: self.recorded.clone(),
            fingerprint: self.fingerprint.clone(),
        };
        let map_err = |map: &str| {
            let map = map.to_owned();
            move |source| MigrateError::Map {
                map: map.clone(),
                source,
            }
        };
        for (&map, step) in &self.steps {
            let staged = staging_dir(layout).join(map);
            match step {
                Step::Keep => {}
                Step::New => info!("map {map} is new in this build: created empty"),
                Step::Copy { from } => {
                    let old = open(&layout.map(map)).map_err(map_err(map))?;
                    let new = open(&staged).map_err(map_err(map))?;
                    let to = new_shape(&staged).unwrap_or(*from);
                    let (n, counters) = copy(map, old, new)?;
                    if let Some(c) = counters {
                        carried.counters.push((map, c));
                    }
                    info!(
                        "map {map}: capacity {} -> {}, flags {:#x} -> {:#x}: {n} entries copied",
                        from.max_entries, to.max_entries, from.flags, to.flags,
                    );
                }
                Step::Convert { conversion, .. } => {
                    let c = &CONVERSIONS[*conversion];
                    let old = open(&layout.map(map)).map_err(map_err(map))?;
                    let mut new = open(&staged).map_err(map_err(map))?;
                    let n = (c.convert)(&old, &mut new).map_err(map_err(map))?;
                    info!(
                        "map {map}: {n} entries converted from layout version {}",
                        c.from_version
                    );
                }
            }
        }
        let io = |map: &str, path: PathBuf| {
            let map = map.to_owned();
            move |source| MigrateError::Pin { map, path, source }
        };
        layout
            .record_layout(&self.fingerprint)
            .map_err(|source| MigrateError::Dir {
                path: layout.layout_dir(),
                source,
            })?;
        for map in self.fresh() {
            let to = layout.map(map);
            std::fs::rename(staging_dir(layout).join(map), &to).map_err(io(map, to))?;
        }
        let _ = std::fs::remove_dir(staging_dir(layout));
        Ok(carried)
    }
}

/// What is left once the programs are swapped in (step 4).
pub struct Carried {
    /// Per-CPU counters: adds what the old programs counted since the copy.
    counters: Vec<(&'static str, Deferred)>,
    dropped: Vec<String>,
    recorded: Vec<String>,
    fingerprint: String,
}

impl Carried {
    /// Step 4: the counters' rest, the maps this build no longer has
    /// unpinned, the old fingerprint removed.
    pub fn settle(self, layout: &Layout) -> Result<(), MigrateError> {
        for (map, add) in self.counters {
            add().map_err(|source| MigrateError::Map {
                map: map.to_owned(),
                source,
            })?;
        }
        for map in &self.dropped {
            let path = layout.map(map);
            remove_file_if_exists(&path).map_err(|source| MigrateError::Pin {
                map: map.clone(),
                path: path.clone(),
                source,
            })?;
            info!("map {map} is not in this build: unpinned");
        }
        for old in self.recorded.iter().filter(|r| **r != self.fingerprint) {
            let _ = std::fs::remove_dir(layout.layout_dir().join(old));
        }
        Ok(())
    }
}

/// Where a migration stages its new maps.
pub fn staging_dir(layout: &Layout) -> PathBuf {
    layout.pin_dir.join("migrating")
}

/// Removes what a migration staged and did not rename into place (a
/// failed or interrupted one): those maps never served.
pub fn discard_staging(layout: &Layout) {
    let dir = staging_dir(layout);
    for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let _ = std::fs::remove_file(e.path());
    }
    let _ = std::fs::remove_dir(&dir);
}

fn open(path: &Path) -> Result<Map, MapError> {
    Map::from_map_data(MapData::from_pin(path)?)
}

fn new_shape(path: &Path) -> Option<MapShape> {
    MapInfo::from_pin(path).ok().map(|i| MapShape::of_pin(&i))
}

type Deferred = Box<dyn FnOnce() -> Result<(), MapError>>;

/// Copies every entry of the pinned `old` into `new` with this build's
/// types for `map`: the number copied, and for per-CPU counters what adds
/// the old programs' later counts.
fn copy(map: &'static str, old: Map, new: Map) -> Result<(u64, Option<Deferred>), MigrateError> {
    let err = |source| MigrateError::Map {
        map: map.to_owned(),
        source,
    };
    let plain = |r: Result<u64, MapError>| r.map(|n| (n, None)).map_err(err);
    match map {
        MAP_ROUTES => plain(copy_lpm::<[u8; 4], Peer>(&old, new)),
        MAP_LOCAL_NETS => plain(copy_lpm::<[u8; 4], LocalNet>(&old, new)),
        MAP_ENDPOINTS => plain(copy_hash::<[u8; 4], Endpoint>(&old, new)),
        MAP_ROUTES6 => plain(copy_lpm::<[u8; 16], Peer6>(&old, new)),
        MAP_LOCAL_NETS6 => plain(copy_lpm::<[u8; 16], LocalNet>(&old, new)),
        MAP_ENDPOINTS6 => plain(copy_hash::<[u8; 16], Endpoint>(&old, new)),
        MAP_PEER_HOSTS => plain(copy_hash::<[u8; 4], PeerHost>(&old, new)),
        MAP_PEER_HOSTS6 => plain(copy_hash::<[u8; 16], PeerHost>(&old, new)),
        MAP_UNDERLAY_ADDRS => plain(copy_hash::<[u8; 4], u32>(&old, new)),
        MAP_ENDPOINT_PORTS => plain(copy_hash::<u32, u32>(&old, new)),
        MAP_DATAPATH_GEN => plain(copy_array::<u64>(&old, new)),
        MAP_STATS => copy_counters::<Counter>(old, new)
            .map(|(n, d)| (n, Some(d)))
            .map_err(err),
        MAP_PEER_STATS => copy_counters::<PeerCounters>(old, new)
            .map(|(n, d)| (n, Some(d)))
            .map_err(err),
        _ => Err(MigrateError::NoTypes(map)),
    }
}

/// How many entries of `map` (pinned, `old`) a new map must hold: the
/// keys of a hash map or trie, one past the last non-zero slot of an array.
fn occupied(map: &'static str, old: &Map) -> Result<u64, MapError> {
    match map {
        MAP_ROUTES => count(LpmTrie::<_, [u8; 4], Peer>::try_from(old)?.keys()),
        MAP_LOCAL_NETS => count(LpmTrie::<_, [u8; 4], LocalNet>::try_from(old)?.keys()),
        MAP_ENDPOINTS => count(HashMap::<_, [u8; 4], Endpoint>::try_from(old)?.keys()),
        MAP_ROUTES6 => count(LpmTrie::<_, [u8; 16], Peer6>::try_from(old)?.keys()),
        MAP_LOCAL_NETS6 => count(LpmTrie::<_, [u8; 16], LocalNet>::try_from(old)?.keys()),
        MAP_ENDPOINTS6 => count(HashMap::<_, [u8; 16], Endpoint>::try_from(old)?.keys()),
        MAP_PEER_HOSTS => count(HashMap::<_, [u8; 4], PeerHost>::try_from(old)?.keys()),
        MAP_PEER_HOSTS6 => count(HashMap::<_, [u8; 16], PeerHost>::try_from(old)?.keys()),
        MAP_UNDERLAY_ADDRS => count(HashMap::<_, [u8; 4], u32>::try_from(old)?.keys()),
        MAP_ENDPOINT_PORTS => count(HashMap::<_, u32, u32>::try_from(old)?.keys()),
        MAP_DATAPATH_GEN => {
            let a = Array::<_, u64>::try_from(old)?;
            last_used(a.len(), |i| Ok(a.get(&i, 0)? != 0))
        }
        MAP_STATS => per_cpu_used::<Counter>(old),
        MAP_PEER_STATS => per_cpu_used::<PeerCounters>(old),
        // No types: `copy` refuses it with its own line.
        _ => Ok(0),
    }
}

fn count<K>(keys: impl Iterator<Item = Result<K, MapError>>) -> Result<u64, MapError> {
    let mut n = 0;
    for k in keys {
        k?;
        n += 1;
    }
    Ok(n)
}

/// One past the last index below `len` for which `used` holds.
fn last_used(len: u32, used: impl Fn(u32) -> Result<bool, MapError>) -> Result<u64, MapError> {
    for i in (0..len).rev() {
        if used(i)? {
            return Ok(u64::from(i) + 1);
        }
    }
    Ok(0)
}

fn per_cpu_used<V: Pod + Default + PartialEq>(old: &Map) -> Result<u64, MapError> {
    let a = PerCpuArray::<_, V>::try_from(old)?;
    last_used(a.len(), |i| {
        Ok(a.get(&i, 0)?.iter().any(|v| *v != V::default()))
    })
}

fn copy_lpm<K: Pod, V: Pod>(old: &Map, new: Map) -> Result<u64, MapError> {
    let old = LpmTrie::<_, K, V>::try_from(old)?;
    let mut new = LpmTrie::<_, K, V>::try_from(new)?;
    let mut n = 0;
    for e in old.iter() {
        let (k, v) = e?;
        new.insert(&k, v, 0)?;
        n += 1;
    }
    Ok(n)
}

fn copy_hash<K: Pod, V: Pod>(old: &Map, new: Map) -> Result<u64, MapError> {
    let old = HashMap::<_, K, V>::try_from(old)?;
    let mut new = HashMap::<_, K, V>::try_from(new)?;
    let mut n = 0;
    for e in old.iter() {
        let (k, v) = e?;
        new.insert(k, v, 0)?;
        n += 1;
    }
    Ok(n)
}

fn copy_array<V: Pod>(old: &Map, new: Map) -> Result<u64, MapError> {
    let old = Array::<_, V>::try_from(old)?;
    let mut new = Array::<_, V>::try_from(new)?;
    let len = old.len().min(new.len());
    for i in 0..len {
        new.set(i, old.get(&i, 0)?, 0)?;
    }
    Ok(u64::from(len))
}

/// Counters that only grow, per CPU: what the old programs counted after
/// the copy is added to the new map once they are swapped out.
pub trait Tally: Pod + Default + PartialEq {
    /// Adds `now - then` to `self`.
    fn add_since(&mut self, now: &Self, then: &Self);
}

impl Tally for Counter {
    fn add_since(&mut self, now: &Self, then: &Self) {
        self.packets = self
            .packets
            .wrapping_add(now.packets.wrapping_sub(then.packets));
        self.bytes = self.bytes.wrapping_add(now.bytes.wrapping_sub(then.bytes));
    }
}

impl Tally for PeerCounters {
    fn add_since(&mut self, now: &Self, then: &Self) {
        self.tx.add_since(&now.tx, &then.tx);
        self.rx.add_since(&now.rx, &then.rx);
    }
}

/// Copies a per-CPU counter array slot by slot, CPU by CPU, and returns
/// what adds, after the swap, what the old programs counted since (it
/// keeps the old map open until then).
fn copy_counters<V: Tally + 'static>(old: Map, new: Map) -> Result<(u64, Deferred), MapError> {
    let old = PerCpuArray::<MapData, V>::try_from(old)?;
    let mut new = PerCpuArray::<MapData, V>::try_from(new)?;
    let len = old.len().min(new.len());
    let mut copied = BTreeMap::new();
    for i in 0..len {
        let values = old.get(&i, 0)?;
        if values.iter().all(|v| *v == V::default()) {
            continue;
        }
        let snapshot: Vec<V> = values.iter().copied().collect();
        new.set(i, values, 0)?;
        copied.insert(i, snapshot);
    }
    let n = copied.len() as u64;
    let rest = move || {
        for i in 0..len {
            let now = old.get(&i, 0)?;
            let then = copied
                .remove(&i)
                .unwrap_or_else(|| vec![V::default(); now.len()]);
            if now.iter().zip(&then).all(|(a, b)| a == b) {
                continue;
            }
            let mut cur: Vec<V> = new.get(&i, 0)?.iter().copied().collect();
            for ((c, n), t) in cur.iter_mut().zip(now.iter()).zip(&then) {
                c.add_since(n, t);
            }
            new.set(i, PerCpuValues::try_from(cur)?, 0)?;
        }
        Ok(())
    };
    Ok((n, Box::new(rest)))
}

#[cfg(test)]
mod tests;
