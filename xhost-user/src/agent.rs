//! `xhost-user load`: validate, load, attach, fill the maps, then keep them
//! in step with Docker (and the config, re-read on SIGHUP) until
//! SIGINT/SIGTERM, and detach cleanly.

use std::{io::Write as _, net::Ipv4Addr, time::Duration};

use anyhow::Context as _;
use log::{error, info, warn};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{Signal, SignalKind, signal},
};

use crate::{
    config::{self, LocalSubnet, Settings, Source},
    datapath::Datapath,
    docker::DockerView,
    layout::Layout,
    netlink::KernelEvents,
    report::{AgentState, Attachment, DockerStatus},
    state::{self, Desired, Peers},
    tunnel::RouteDevice,
};

pub async fn load(source: Source, layout: Layout, detach: bool) -> anyhow::Result<()> {
    let settings = source.read()?;
    // Everything that can be checked is checked before the kernel is touched.
    let static_locals = config::validate(&settings)?;
    let mut dp = Datapath::load(
        &layout,
        settings.tunnel.map(|v| (settings.iface.as_str(), v)),
        settings.attach,
    )?;
    let xdp = dp.attach_underlay(&settings.iface, settings.xdp_mode)?;
    dp.attach_tunnel()?;
    let underlay = crate::net::ifindex(&settings.iface)?;
    set_underlay_addrs(&mut dp, &settings.iface, underlay)?;
    let route_dev = dp.route_device(underlay);
    let mut peers = Peers::default();
    state::apply_peers(&mut dp, &mut peers, &Peers::of(&settings.peers), route_dev)?;
    let mut applied = Desired::default();
    let want = state::desired(&static_locals, &[], &[], &settings.peers);
    state::apply(&mut dp, &mut applied, &want)?;
    // Endpoints already on static bridges, so the first packets take the
    // fast path; Docker's arrive asynchronously once it answers.
    reconcile(&settings, &static_locals, None, &mut dp, &mut applied);
    if !crate::net::forwarding_enabled(&settings.iface) {
        warn!(
            "IPv4 forwarding is off on {}: the FIB refuses to forward, so xhost hands packets to the kernel",
            settings.iface
        );
    }

    if let Some(t) = dp.tunnel() {
        info!(
            "VXLAN mode: packets over MTU {} take the kernel's route through {}, which answers fragmentation-needed; give Docker networks that MTU (daemon.json \"mtu\", or -o com.docker.network.driver.mtu) to spare the round trip",
            t.mtu,
            crate::tunnel::DEVICE
        );
    }
    let mut report = AgentState::new(&settings, xdp, detach);
    report.refresh(&dp, &applied);
    // The state file is what `status` reads; failing to write it does not
    // stop the datapath (the maps are the truth), and the next change
    // writes it again.
    if let Err(e) = report.write(&layout) {
        warn!("agent state: {e:#}");
    }
    if detach {
        dp.keep_running();
        println!("ready");
        info!("detached: the datapath stays loaded; `xhost-user unload` removes it");
        return Ok(());
    }
    // Handlers in place before `ready`: a signal right after it is served.
    let signals = Signals {
        int: signal(SignalKind::interrupt())?,
        term: signal(SignalKind::terminate())?,
        hup: signal(SignalKind::hangup())?,
    };
    println!("ready");
    std::io::stdout().flush().ok();

    let mut agent = Agent {
        source,
        settings,
        static_locals,
        peers,
        route_dev,
        underlay,
    };
    let res = agent
        .follow(signals, &mut dp, &mut applied, &mut report)
        .await;
    drop(dp); // detaches and unpins
    let _ = crate::layout::remove_file_if_exists(&layout.state_file());
    let _ = std::fs::remove_dir(&layout.run_dir);
    info!("unloaded");
    res
}

/// How often bridges that Docker does not manage are rescanned for endpoints.
const RESCAN: Duration = Duration::from_secs(1);

struct Signals {
    int: Signal,
    term: Signal,
    hup: Signal,
}

/// What the running agent was configured with, and the peers it applied.
struct Agent {
    source: Source,
    settings: Settings,
    static_locals: Vec<LocalSubnet>,
    peers: Peers,
    route_dev: RouteDevice,
    /// The underlay's ifindex.
    underlay: u32,
}

impl Agent {
    /// The single writer: applies Docker's view, the endpoints of static
    /// bridges and reloaded configs as they change, until a signal.
    async fn follow(
        &mut self,
        mut signals: Signals,
        dp: &mut Datapath,
        applied: &mut Desired,
        report: &mut AgentState,
    ) -> anyhow::Result<()> {
        let (tx, mut rx) = tokio::sync::watch::channel(None);
        let watcher = self.settings.docker.then(|| {
            let host = self.settings.docker_host.clone();
            tokio::spawn(crate::docker::watch(host, tx))
        });
        let mut docker_alive = watcher.is_some();
        // The last view Docker gave; kept while the engine is unreachable, so
        // the datapath stays as it is until Docker says otherwise.
        let mut view: Option<DockerView> = None;
        // The kernel's changes. A container's veth can vanish while Docker
        // cannot say so (the engine is down or restarting): its endpoint must
        // leave the map at once, so its address falls back to the bridge
        // instead of being redirected to an interface that is gone. And any
        // route, rule, neighbour, address or link change retires the
        // datapath's cached forwarding answers, which hold FIB results.
        let events = KernelEvents::open().context("subscribing to kernel changes")?;
        // SAFETY: `KernelEvents` owns its socket and always returns that same fd.
        let mut kernel = unsafe { AsyncFd::register(events) }
            .map_err(|e| e.into_parts().1)
            .context("watching kernel changes")?;
        // What changed before the subscription is not known: retire it all.
        retire_cached(dp);
        let mut rescan = tokio::time::interval(RESCAN);
        rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let mut reloaded = false;
            tokio::select! {
                _ = signals.int.recv() => break,
                _ = signals.term.recv() => break,
                _ = signals.hup.recv() => match self.reload(dp) {
                    Ok(()) => reloaded = true,
                    Err(e) => {
                        error!("config reload refused, the running config stays: {e:#}");
                        continue;
                    }
                },
                changed = rx.changed(), if docker_alive => {
                    if changed.is_err() {
                        // Cannot happen while the watcher runs (it never gives
                        // up); if it does, keep serving what is known.
                        warn!("Docker watcher ended; keeping the datapath as it is");
                        docker_alive = false;
                        continue;
                    }
                    match rx.borrow_and_update().clone() {
                        None => report.docker = Some(DockerStatus::unreachable(&self.settings)),
                        Some(v) => {
                            report.docker = Some(DockerStatus::from_view(&self.settings, &v));
                            view = Some(v);
                        }
                    }
                }
                _ = rescan.tick(), if !self.static_locals.is_empty() => {}
                ready = kernel.readable_mut() => {
                    let mut ready = ready.context("watching kernel changes")?;
                    let changes = ready.get_inner_mut().drain();
                    ready.clear_ready();
                    match changes {
                        Ok(c) => {
                            if c.any {
                                retire_cached(dp);
                            }
                            if c.addresses {
                                self.follow_underlay_addrs(dp);
                            }
                            if !c.link_deleted {
                                continue;
                            }
                        }
                        Err(e) => {
                            warn!("reading kernel changes: {e}");
                            retire_cached(dp);
                            self.follow_underlay_addrs(dp);
                        }
                    }
                }
            }
            let before = applied.clone();
            reconcile(
                &self.settings,
                &self.static_locals,
                view.as_ref(),
                dp,
                applied,
            );
            if reloaded {
                report.peers = self.settings.peers.clone();
            }
            if reloaded || *applied != before || report.docker_changed() {
                report.refresh(dp, applied);
                if let Err(e) = report.write(dp.layout()) {
                    warn!("agent state: {e:#}");
                }
            }
        }
        if let Some(w) = watcher {
            w.abort();
        }
        Ok(())
    }

    /// After the kernel reported address changes: `UNDERLAY_ADDRS` holds
    /// what the underlay has now. Kept as it was if that cannot be read.
    fn follow_underlay_addrs(&self, dp: &mut Datapath) {
        if let Err(e) = set_underlay_addrs(dp, &self.settings.iface, self.underlay) {
            warn!("{e:#}");
        }
    }

    /// SIGHUP: reads the config again and applies its peers and static
    /// bridges. A config that does not validate, or changes what only a
    /// restart can (underlay, XDP mode, Docker), is refused whole; a map
    /// write that fails puts the previous peers back.
    fn reload(&mut self, dp: &mut Datapath) -> anyhow::Result<()> {
        let new = self.source.read()?;
        config::check_reloadable(&self.settings, &new)?;
        let static_locals = config::validate(&new)?;
        let want = Peers::of(&new.peers);
        if let Err(e) = state::apply_peers(dp, &mut self.peers, &want, self.route_dev) {
            let back = Peers::of(&self.settings.peers);
            let outcome = match state::apply_peers(dp, &mut self.peers, &back, self.route_dev) {
                Ok(()) => "the previous ones are back".to_owned(),
                Err(e) => format!("putting the previous ones back failed too: {e}"),
            };
            return Err(
                anyhow::Error::new(e).context(format!("applying the new peers ({outcome})"))
            );
        }
        info!(
            "config reloaded: {} peer(s), {} route(s), {} static bridge(s)",
            self.peers.hosts.len(),
            self.peers.routes.len(),
            new.bridges.len()
        );
        self.settings = new;
        self.static_locals = static_locals;
        Ok(())
    }
}

/// Writes the underlay's IPv4 addresses, as the kernel has them now, to
/// `UNDERLAY_ADDRS` (VXLAN packets to them may be decapsulated by the
/// datapath itself).
fn set_underlay_addrs(dp: &mut Datapath, iface: &str, ifindex: u32) -> anyhow::Result<()> {
    let addrs: Vec<Ipv4Addr> = crate::net::ipv4_subnets(iface)?
        .into_iter()
        .map(|(a, _)| a)
        .collect();
    dp.set_underlay_addrs(ifindex, &addrs)
        .with_context(|| format!("writing {iface}'s addresses"))
}

/// After a kernel change: the datapath's cached answers may hold what the
/// FIB said before it. Should the bump fail, they age out within 100 ms.
fn retire_cached(dp: &mut Datapath) {
    if let Err(e) = dp.kernel_changed() {
        warn!("retiring the datapath's cached answers: {e}");
    }
}

/// One step of the single writer: desired state from every source, diffed
/// into the datapath.
fn reconcile(
    settings: &Settings,
    static_locals: &[LocalSubnet],
    view: Option<&DockerView>,
    dp: &mut Datapath,
    applied: &mut Desired,
) {
    let (nets, mut eps) = view.map(state::docker_specs).unwrap_or_default();
    // Bridges Docker does not manage: endpoints from the kernel's tables.
    let managed: Vec<&str> = nets.iter().map(|(b, _)| b.as_str()).collect();
    let mut statics: Vec<(String, Vec<crate::net::Ipv4Net>)> = Vec::new();
    for l in static_locals
        .iter()
        .filter(|l| !managed.contains(&l.bridge.as_str()))
    {
        match statics.iter_mut().find(|(b, _)| *b == l.bridge) {
            Some((_, v)) => v.push(l.net),
            None => statics.push((l.bridge.clone(), vec![l.net])),
        }
    }
    match state::kernel_endpoints(&statics) {
        Ok(found) => eps.extend(found),
        Err(e) => warn!("reading neighbour/FDB tables: {e}"),
    }
    let want = state::desired(static_locals, &nets, &eps, &settings.peers);
    if let Err(e) = state::apply(dp, applied, &want) {
        warn!("applying state: {e}");
    }
}

impl AgentState {
    fn refresh(&mut self, dp: &Datapath, applied: &Desired) {
        self.attachments = dp
            .attachments()
            .map(|(iface, hook)| Attachment {
                iface: iface.to_owned(),
                hook,
                program: hook.program().to_owned(),
                via: None,
            })
            .collect();
        self.bridges = applied.bridges.iter().cloned().collect();
        self.attach = Some(dp.method());
        self.kernel = Some(dp.features().clone());
        self.tunnel = dp.tunnel().map(|t| crate::report::TunnelState {
            device: crate::tunnel::DEVICE.into(),
            ifindex: t.ifindex,
            vni: t.vxlan.vni,
            port: t.vxlan.port,
            mtu: t.mtu,
        });
        self.kernel_routes = dp
            .kernel_routes()
            .iter()
            .map(|(prefix, via, oif)| crate::report::KernelRoute {
                prefix: *prefix,
                via: *via,
                oif: *oif,
            })
            .collect();
    }
}

/// The underlay's first IPv4 address: what peers route to.
pub fn underlay_address(iface: &str) -> Option<Ipv4Addr> {
    crate::net::ipv4_subnets(iface)
        .ok()?
        .first()
        .map(|(a, _)| *a)
}
