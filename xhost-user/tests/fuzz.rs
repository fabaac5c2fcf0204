//! Differential fuzzing: every program of the datapath against the
//! reference model (`xhost-model`), on random and mutated frames over
//! random map contents, through `BPF_PROG_TEST_RUN` in the test host
//! (`support`), native and VXLAN mode. Any difference in verdict, frame
//! out, skb priority or counter fails with the seed, the frame (hex), the
//! maps and both answers. See docs/fuzzing.md.
//!
//! `XHOST_FUZZ_FRAMES` (default 100 000) frames from seed `XHOST_FUZZ_SEED`
//! (default: from the clock, printed); `cargo xtask fuzz` sets both.

mod support;

use std::{fmt::Write as _, time::Instant};

use aya::{
    Ebpf,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, lpm_trie::Key},
    programs::{SchedClassifier, TestRun as _, TestRunOptions, Xdp},
};
use support::*;
use xhost_common::{Counter, Endpoint, LocalNet, Peer, Peer6, PeerHost, stat};
use xhost_model::{
    Action, Config, Input, Maps, Model, Outcome, Prog, Tunnel,
    generate::{self, batch_rng},
    host::{Device, Host},
};

const DEFAULT_FRAMES: u64 = 100_000;
/// Frames per map contents: the maps are written once per batch.
const BATCH: u64 = 1_000;
const VNI: u32 = 42;
const PORT: u16 = 8472;

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(
        v.parse()
            .unwrap_or_else(|_| panic!("{name}={v}: not a whole number")),
    )
}

/// The datapath in one mode, and the maps it holds.
struct World {
    ebpf: Ebpf,
    config: Config,
    progs: &'static [Prog],
    applied: Maps,
    generation: u64,
}

/// How often each (mode, program, verdict, counter) came up.
type Coverage =
    std::collections::BTreeMap<(&'static str, &'static str, &'static str, &'static str), u64>;

const NATIVE_PROGS: &[Prog] = &[Prog::BridgeIn, Prog::VethIn, Prog::NicIn, Prog::NicXdp];

#[test]
fn datapath_agrees_with_the_model() {
    let frames = env_u64("XHOST_FUZZ_FRAMES").unwrap_or(DEFAULT_FRAMES);
    let seed = env_u64("XHOST_FUZZ_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_nanos() as u64
    });
    eprintln!(
        "fuzz: {frames} frames, seed {seed} (replay: cargo xtask fuzz --frames {frames} --seed {seed})"
    );
    std::thread::spawn(move || fuzz(frames, seed))
        .join()
        .expect("fuzz thread panicked");
}

/// The test host as the model sees it, with the devices the fuzzer adds.
fn host() -> Host {
    let dev = |name: &str, addr, mtu| Device {
        ifindex: ifindex(name),
        mac: mac(name),
        addr,
        addr6: None,
        mtu,
    };
    let v6 = |a: &str| a.parse::<std::net::Ipv6Addr>().expect("address").octets();
    let mut br0 = dev("br0", Some(([192, 168, 110, 1], 24)), 1500);
    br0.addr6 = Some((v6("fd00:110::1"), 64));
    Host {
        // The bridge first: generated local subnets are served by it.
        devices: vec![
            br0,
            dev("ul0", Some(([172, 16, 91, 131], 24)), 1500),
            dev("vp0", None, 1500),
            dev("vx0", None, 1450),
        ],
        neighbours: vec![
            (ifindex("ul0"), [172, 16, 91, 132], PEER_MAC),
            (ifindex("br0"), [192, 168, 110, 12], LOCAL_NEIGH_MAC),
        ],
        neighbours6: vec![(ifindex("br0"), v6("fd00:110::12"), LOCAL_NEIGH_MAC)],
    }
}

fn fuzz(frames: u64, seed: u64) {
    enter_test_host();
    for cmd in [
        // A container's host-side veth (no address), and the vxlan device.
        "ip link add vp0 type veth peer name vp0p",
        "ip link set vp0 up",
        "ip link add vx0 mtu 1450 type vxlan external dstport 4789",
        "ip link set vx0 up",
    ] {
        sh(&cmd.split(' ').collect::<Vec<_>>());
    }
    let host = host();
    let tunnel = Tunnel {
        ifindex: ifindex("vx0"),
        vni: VNI,
        port: PORT,
    };
    let mut vxlan = loaded_vxlan(tunnel.ifindex, VNI, PORT);
    for name in [xhost_common::PROG_VXLAN_IN, xhost_common::PROG_VXLAN_OUT] {
        let p: &mut SchedClassifier = vxlan
            .program_mut(name)
            .expect("prog")
            .try_into()
            .expect("tc");
        p.load().expect("verifier accepts");
    }
    let mut worlds = [
        World::new(loaded(), Config::default(), NATIVE_PROGS),
        World::new(
            vxlan,
            Config {
                tunnel: Some(tunnel),
                ..Config::default()
            },
            &Prog::ALL,
        ),
    ];
    let start = Instant::now();
    let (mut runs, mut refused) = (0u64, 0u64);
    let mut seen = Coverage::new();
    let batches = frames.div_ceil(BATCH);
    for batch in 0..batches {
        let n = BATCH.min(frames - batch * BATCH);
        let world = &mut worlds[(batch % 2) as usize];
        let (r, x) = world.batch(&host, seed, batch, n, &mut seen);
        runs += r;
        refused += x;
    }
    let secs = start.elapsed().as_secs_f64();
    eprintln!("fuzz: outcomes (mode, program, verdict, counter: runs):");
    for ((mode, prog, action, reason), n) in &seen {
        eprintln!("  {mode:<6} {prog:<16} {action:<8} {reason:<20} {n}");
    }
    eprintln!(
        "fuzz: {frames} frames, {runs} program runs agreed with the model ({refused} runs of frames BPF_PROG_TEST_RUN refuses left out) in {secs:.1} s: {:.0} frames/s, {:.0} runs/s",
        frames as f64 / secs,
        runs as f64 / secs
    );
}

impl World {
    fn new(mut ebpf: Ebpf, config: Config, progs: &'static [Prog]) -> Self {
        // The test host's fixed contents go: every batch writes its own.
        clear_hash::<[u8; 4], Endpoint>(&mut ebpf, "ENDPOINTS");
        clear_hash::<u32, u32>(&mut ebpf, "ENDPOINT_PORTS");
        clear_hash::<[u8; 4], PeerHost>(&mut ebpf, "PEER_HOSTS");
        clear_hash::<[u8; 4], u32>(&mut ebpf, "UNDERLAY_ADDRS");
        clear_lpm::<[u8; 4], Peer>(&mut ebpf, "ROUTES");
        clear_lpm::<[u8; 4], LocalNet>(&mut ebpf, "LOCAL_NETS");
        clear_hash::<[u8; 16], Endpoint>(&mut ebpf, "ENDPOINTS6");
        clear_lpm::<[u8; 16], Peer6>(&mut ebpf, "ROUTES6");
        clear_lpm::<[u8; 16], LocalNet>(&mut ebpf, "LOCAL_NETS6");
        Self {
            ebpf,
            config,
            progs,
            applied: Maps::default(),
            generation: 1,
        }
    }

    /// Writes `m` in place of what the maps held, then bumps the generation
    /// (the caches must not answer from the old contents).
    fn write(&mut self, m: &Maps) {
        let old = std::mem::replace(&mut self.applied, m.clone());
        let e = &mut self.ebpf;
        let mut routes: LpmTrie<_, [u8; 4], Peer> = map(e, "ROUTES");
        for p in old.routes.keys() {
            routes
                .remove(&Key::new(u32::from(p.len), p.addr))
                .expect("remove");
        }
        for (p, host) in &m.routes {
            let v = Peer {
                host: *host,
                flags: 0,
            };
            routes
                .insert(&Key::new(u32::from(p.len), p.addr), v, 0)
                .expect("insert");
        }
        let mut local: LpmTrie<_, [u8; 4], LocalNet> = map(e, "LOCAL_NETS");
        for p in old.local_nets.keys() {
            local
                .remove(&Key::new(u32::from(p.len), p.addr))
                .expect("remove");
        }
        for (p, bridge) in &m.local_nets {
            let v = LocalNet {
                bridge_ifindex: *bridge,
                flags: 0,
            };
            local
                .insert(&Key::new(u32::from(p.len), p.addr), v, 0)
                .expect("insert");
        }
        let mut eps: HashMap<_, [u8; 4], Endpoint> = map(e, "ENDPOINTS");
        for a in old.endpoints.keys() {
            eps.remove(a).expect("remove");
        }
        for (a, ep) in &m.endpoints {
            eps.insert(a, ep, 0).expect("insert");
        }
        let mut ports: HashMap<_, u32, u32> = map(e, "ENDPOINT_PORTS");
        for p in &old.endpoint_ports {
            ports.remove(p).expect("remove");
        }
        for p in &m.endpoint_ports {
            ports.insert(p, xhost_common::ARMED, 0).expect("insert");
        }
        let mut hosts: HashMap<_, [u8; 4], PeerHost> = map(e, "PEER_HOSTS");
        for h in &old.peer_hosts {
            hosts.remove(h).expect("remove");
        }
        // Each peer host its own PEER_STATS slot, as the agent gives them.
        for (slot, h) in m.peer_hosts.iter().enumerate() {
            let v = PeerHost {
                flags: 0,
                slot: slot as u32,
            };
            hosts.insert(h, v, 0).expect("insert");
        }
        let mut addrs: HashMap<_, [u8; 4], u32> = map(e, "UNDERLAY_ADDRS");
        for a in old.underlay_addrs.keys() {
            addrs.remove(a).expect("remove");
        }
        for (a, i) in &m.underlay_addrs {
            addrs.insert(a, i, 0).expect("insert");
        }
        let mut routes6: LpmTrie<_, [u8; 16], Peer6> = map(e, "ROUTES6");
        for p in old.routes6.keys() {
            routes6
                .remove(&Key::new(u32::from(p.len), p.addr))
                .expect("remove");
        }
        for (p, host) in &m.routes6 {
            let v = Peer6 {
                host: xhost_common::map_v4(*host),
                flags: 0,
            };
            routes6
                .insert(&Key::new(u32::from(p.len), p.addr), v, 0)
                .expect("insert");
        }
        let mut local6: LpmTrie<_, [u8; 16], LocalNet> = map(e, "LOCAL_NETS6");
        for p in old.local_nets6.keys() {
            local6
                .remove(&Key::new(u32::from(p.len), p.addr))
                .expect("remove");
        }
        for (p, bridge) in &m.local_nets6 {
            let v = LocalNet {
                bridge_ifindex: *bridge,
                flags: 0,
            };
            local6
                .insert(&Key::new(u32::from(p.len), p.addr), v, 0)
                .expect("insert");
        }
        let mut eps6: HashMap<_, [u8; 16], Endpoint> = map(e, "ENDPOINTS6");
        for a in old.endpoints6.keys() {
            eps6.remove(a).expect("remove");
        }
        for (a, ep) in &m.endpoints6 {
            eps6.insert(a, ep, 0).expect("insert");
        }
        self.generation += 1;
        let mut generation: Array<_, u64> = map(&mut self.ebpf, "DATAPATH_GEN");
        generation.set(0, self.generation, 0).expect("bump");
    }

    /// Batch `batch` of the run seeded `seed`: new map contents, `n`
    /// frames through every program, each answer compared with the
    /// model's, then the counters. Returns the runs compared and those
    /// `BPF_PROG_TEST_RUN` refused.
    fn batch(
        &mut self,
        host: &Host,
        seed: u64,
        batch: u64,
        n: u64,
        seen: &mut Coverage,
    ) -> (u64, u64) {
        let mut rng = batch_rng(seed, batch);
        let maps = generate::maps(&mut rng, host);
        self.write(&maps);
        let model = Model {
            maps,
            config: self.config,
            host: host.clone(),
        };
        let before = counters(&self.ebpf);
        let mut want = vec![Counter::default(); stat::COUNT as usize];
        let (mut runs, mut refused) = (0, 0);
        for i in 0..n {
            let input = generate::input(&mut rng, &model);
            for &prog in self.progs {
                let Some(got) = run(&mut self.ebpf, prog, &input) else {
                    refused += 1;
                    continue;
                };
                let expected = model.run(prog, &input);
                if let Some(diff) = differs(prog, &expected, &got) {
                    fail(seed, batch, i, prog, &model, &input, &expected, &got, &diff);
                }
                let action = match expected.action {
                    Action::Pass => "pass",
                    Action::Drop => "drop",
                    Action::Redirect { .. } => "redirect",
                };
                let reason = expected
                    .counted
                    .map_or("-", |(r, _)| stat::NAMES[r as usize]);
                let mode = if self.config.tunnel.is_some() {
                    "vxlan"
                } else {
                    "native"
                };
                *seen.entry((mode, prog.name(), action, reason)).or_default() += 1;
                if let Some((reason, bytes)) = expected.counted {
                    let c = &mut want[reason as usize];
                    c.packets += 1;
                    c.bytes += u64::from(bytes);
                }
                runs += 1;
            }
        }
        let after = counters(&self.ebpf);
        let moved: Vec<Counter> = before
            .iter()
            .zip(&after)
            .map(|(b, a)| Counter {
                packets: a.packets - b.packets,
                bytes: a.bytes - b.bytes,
            })
            .collect();
        if moved != want {
            self.locate(host, seed, batch, n);
            panic!(
                "seed {seed} batch {batch}: counters moved otherwise than the model says, and no single run shows it\n{}",
                stat::NAMES
                    .iter()
                    .zip(moved.iter().zip(&want))
                    .filter(|(_, (m, w))| m != w)
                    .fold(String::new(), |mut s, (name, (m, w))| {
                        let _ = writeln!(s, "  {name}: datapath {m:?}, model {w:?}");
                        s
                    }),
            );
        }
        (runs, refused)
    }
}

impl World {
    /// Replays batch `batch` (its maps still written) reading the counters
    /// around every run, and fails at the first run whose counters moved
    /// otherwise than the model says.
    fn locate(&mut self, host: &Host, seed: u64, batch: u64, n: u64) {
        let mut rng = batch_rng(seed, batch);
        let maps = generate::maps(&mut rng, host);
        let model = Model {
            maps,
            config: self.config,
            host: host.clone(),
        };
        for i in 0..n {
            let input = generate::input(&mut rng, &model);
            for &prog in self.progs {
                let before = counters(&self.ebpf);
                let Some(got) = run(&mut self.ebpf, prog, &input) else {
                    continue;
                };
                let after = counters(&self.ebpf);
                let expected = model.run(prog, &input);
                let moved: Vec<(usize, Counter)> = before
                    .iter()
                    .zip(&after)
                    .enumerate()
                    .filter(|(_, (b, a))| b != a)
                    .map(|(i, (b, a))| {
                        (
                            i,
                            Counter {
                                packets: a.packets - b.packets,
                                bytes: a.bytes - b.bytes,
                            },
                        )
                    })
                    .collect();
                let want: Vec<(usize, Counter)> = expected
                    .counted
                    .map(|(r, b)| {
                        (
                            r as usize,
                            Counter {
                                packets: 1,
                                bytes: u64::from(b),
                            },
                        )
                    })
                    .into_iter()
                    .collect();
                if moved != want {
                    let named: Vec<(&str, Counter)> =
                        moved.iter().map(|(i, c)| (stat::NAMES[*i], *c)).collect();
                    let diff = format!("counters moved: {named:?}");
                    fail(seed, batch, i, prog, &model, &input, &expected, &got, &diff);
                }
            }
        }
    }
}

fn map<'a, T: TryFrom<&'a mut aya::maps::Map>>(e: &'a mut Ebpf, name: &str) -> T
where
    T::Error: std::fmt::Debug,
{
    e.map_mut(name)
        .unwrap_or_else(|| panic!("{name}"))
        .try_into()
        .unwrap_or_else(|err| panic!("{name}: {err:?}"))
}

fn clear_hash<K: aya::Pod, V: aya::Pod>(e: &mut Ebpf, name: &str) {
    let mut m: HashMap<&mut MapData, K, V> = map(e, name);
    let keys: Vec<K> = m.keys().map(|k| k.expect("key")).collect();
    for k in keys {
        m.remove(&k).expect("remove");
    }
}

fn clear_lpm<K: aya::Pod, V: aya::Pod>(e: &mut Ebpf, name: &str) {
    let mut m: LpmTrie<&mut MapData, K, V> = map(e, name);
    let keys: Vec<Key<K>> = m.keys().map(|k| k.expect("key")).collect();
    for k in keys {
        m.remove(&k).expect("remove");
    }
}

fn counters(ebpf: &Ebpf) -> Vec<Counter> {
    let stats: PerCpuArray<_, Counter> =
        PerCpuArray::try_from(ebpf.map("STATS").expect("STATS")).expect("percpu");
    (0..stat::COUNT)
        .map(|i| {
            stats
                .get(&i, 0)
                .expect("get")
                .iter()
                .fold(Counter::default(), |a, c| Counter {
                    packets: a.packets + c.packets,
                    bytes: a.bytes + c.bytes,
                })
        })
        .collect()
}

/// What the datapath did: its return value, the frame and the priority
/// it left.
struct Got {
    verdict: u32,
    frame: Vec<u8>,
    priority: u32,
}

/// One `BPF_PROG_TEST_RUN` of `prog` on `input`; `None` if the kernel
/// refuses the input itself (a frame too short for it).
fn run(ebpf: &mut Ebpf, prog: Prog, input: &Input) -> Option<Got> {
    if prog == Prog::NicXdp {
        let p: &mut Xdp = ebpf
            .program_mut(prog.name())
            .expect("prog")
            .try_into()
            .expect("xdp");
        let mut out = vec![0u8; input.frame.len() + 64];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(&input.frame);
        opts.data_out = Some(&mut out);
        let res = match p.test_run(opts) {
            Ok(r) => r,
            Err(_) if refusable(&input.frame) => return None,
            Err(e) => panic!("{}: test_run: {e}", prog.name()),
        };
        out.truncate(res.data_size_out as usize);
        return Some(Got {
            verdict: res.return_value,
            frame: out,
            priority: input.priority,
        });
    }
    let ctx = skb_ctx_marked(input.ifindex, 0, input.priority);
    match run_tc_prog_ctx(ebpf, prog.name(), &ctx, &input.frame, 1) {
        Ok(r) => Some(Got {
            verdict: r.verdict,
            frame: r.out,
            priority: r.priority,
        }),
        Err(_) if refusable(&input.frame) => None,
        Err(e) => panic!(
            "{}: test_run: {e:?} on a frame of {} bytes from ifindex {}",
            prog.name(),
            input.frame.len(),
            input.ifindex
        ),
    }
}

/// Frames `BPF_PROG_TEST_RUN` refuses (`EINVAL`) for TC programs: shorter
/// than an Ethernet and an IPv4 header, or an IPv6 one for EtherType IPv6.
/// Anything else it refuses fails the test.
fn refusable(frame: &[u8]) -> bool {
    frame.len() < 34 || (frame[12..14] == [0x86, 0xdd] && frame.len() < 54)
}

/// The return value `action` is for `prog`.
fn verdict_of(prog: Prog, action: Action) -> u32 {
    match (prog, action) {
        (Prog::NicXdp, Action::Pass) => XDP_PASS,
        (Prog::NicXdp, Action::Drop) => XDP_DROP,
        (_, Action::Pass) => TC_ACT_UNSPEC,
        (_, Action::Drop) => TC_ACT_SHOT,
        (_, Action::Redirect { .. }) => TC_ACT_REDIRECT,
    }
}

/// What differs between the model's answer and the datapath's, if
/// anything. The redirect target is the model's alone: a test run
/// returns the verdict, not where the helper pointed the packet.
fn differs(prog: Prog, want: &Outcome, got: &Got) -> Option<String> {
    let mut d = String::new();
    if verdict_of(prog, want.action) != got.verdict {
        let _ = write!(
            d,
            "verdict {} (model {:?}); ",
            got.verdict as i32, want.action
        );
    }
    if !want.frame_matches(&got.frame) {
        d.push_str("frame out; ");
    }
    if want.priority != got.priority {
        let _ = write!(d, "priority {} (model {}); ", got.priority, want.priority);
    }
    (!d.is_empty()).then_some(d)
}

fn hex(b: &[u8]) -> String {
    b.iter().fold(String::new(), |mut s, x| {
        let _ = write!(s, "{x:02x}");
        s
    })
}

#[expect(clippy::too_many_arguments, reason = "one report of everything known")]
fn fail(
    seed: u64,
    batch: u64,
    i: u64,
    prog: Prog,
    model: &Model,
    input: &Input,
    want: &Outcome,
    got: &Got,
    diff: &str,
) -> ! {
    panic!(
        "{}: the datapath and the model differ: {diff}\n\
         seed {seed}, batch {batch}, frame {i} (replay: cargo xtask fuzz --seed {seed})\n\
         config: {:?}\n\
         maps:\n{}\n\
         in: ifindex {} priority {} frame {}\n\
         model: {:?} counted {:?} priority {} loose {:?}\n       frame {}\n\
         datapath: verdict {} priority {}\n       frame {}",
        prog.name(),
        model.config,
        model.maps,
        input.ifindex,
        input.priority,
        hex(&input.frame),
        want.action,
        want.counted.map(|(r, b)| (stat::NAMES[r as usize], b)),
        want.priority,
        want.loose,
        hex(&want.frame),
        got.verdict as i32,
        got.priority,
        hex(&got.frame),
    )
}
