//! `xhost-user load`: validate, load, attach, fill the maps, then keep them
//! in step with Docker (and the config, re-read on SIGHUP) until
//! SIGINT/SIGTERM, and detach cleanly.

use std::{collections::BTreeSet, io::Write as _, net::Ipv4Addr, time::Duration};

use anyhow::Context as _;
use log::{error, info, warn};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{Signal, SignalKind, signal},
};

use crate::{
    config::{self, DatapathArg, LocalSubnet, PeerConfig, Settings, Source},
    datapath::{Datapath, DatapathError, XdpAttached},
    docker::DockerView,
    layout::Layout,
    net::IpNet,
    netlink::KernelEvents,
    plan::{self, Limits, Peers, State},
    report::{AgentState, Attachment, DockerStatus},
    sources::{self, PeerSource},
    store::{source::ClusterSource, sync::ClusterState},
    writer::{
        KernelRoutes, KernelWriter, WriteError,
        recipe::{Recipe, RecipeWriter},
    },
};

pub async fn load(source: Source, layout: Layout, detach: bool) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let settings = source.read()?;
    // Everything that can be checked is checked before the kernel is touched.
    let static_locals = config::validate(&settings)?;
    // Bound before anything is attached: an address that cannot be had
    // refuses the load with nothing to undo.
    let mut metrics = match settings.metrics_addr {
        Some(addr) if detach => anyhow::bail!(
            "--metrics-addr {addr}: metrics are served by the running agent, so not with --detach"
        ),
        Some(addr) => Some(crate::views::metrics::bind(addr)?),
        None => None,
    };
    if settings.cluster.is_some() && detach {
        anyhow::bail!(
            "cluster mode needs the agent running to renew this host's lease: drop --detach"
        );
    }
    // A datapath pinned here (detached, or left by a killed agent or one
    // stopped with --keep-datapath) is adopted; checked before anything is
    // touched.
    let prior = crate::adopt::find(&layout, &settings)?;
    // Cluster mode: the store is a source of peers next to the config.
    let mut cluster = match &settings.cluster {
        Some(c) => {
            let addr = underlay_address(&settings.iface)
                .with_context(|| format!("{} has no IPv4 address to publish", settings.iface))?;
            Some(ClusterSource::start(c, &settings, &layout, addr).await?)
        }
        None => None,
    };
    let store_peers = match cluster.as_mut() {
        Some(c) => {
            let locals = static_locals.iter().map(|l| l.net.into()).collect();
            c.peers(&locals, &settings.peers).unwrap_or_default()
        }
        None => Vec::new(),
    };
    let peers = desired_peers(&settings, &store_peers)?;
    let underlay = crate::net::ifindex(&settings.iface)?;
    let (backend, xdp, applied, adopted_routes) = match settings.datapath {
        DatapathArg::Ebpf => load_ebpf(&layout, &settings, underlay, prior)?,
        DatapathArg::Kernel => load_kernel(&layout, &settings)?,
        DatapathArg::Auto => match load_ebpf(&layout, &settings, underlay, prior) {
            Ok(b) => b,
            Err(e) if falls_back(&e) => {
                warn!(
                    "the eBPF datapath cannot run here, so the kernel forwards (routes and iptables, docs/kernel-datapath.md): {e:#}"
                );
                if metrics.take().is_some() {
                    warn!("metrics are not served: the kernel datapath keeps no counters");
                }
                if settings.max_endpoints != xhost_common::MAX_ENDPOINTS {
                    warn!(
                        "--max-endpoints {} does nothing: the kernel datapath has no ENDPOINTS map",
                        settings.max_endpoints
                    );
                }
                load_kernel(&layout, &settings)
                    .map_err(|k| k.context(format!("and the eBPF datapath failed: {e:#}")))?
            }
            Err(e) => return Err(e),
        },
    };
    // The kernel's datapath (a fallback) does not route IPv6 subnets.
    if let (Backend::Kernel(_), Some(c)) = (&backend, cluster.as_mut()) {
        c.without_ipv6();
    }
    let route_device = match &backend {
        Backend::Ebpf(dp) => dp.route_device(underlay),
        Backend::Kernel(_) => crate::tunnel::RouteDevice {
            oif: underlay,
            via_peer: true,
            ipv6_outer_mtu: None,
        },
    };
    let routes = match adopted_routes {
        Some((added, added6)) => KernelRoutes::adopt(route_device, added, added6),
        None => KernelRoutes::new(route_device),
    }
    .context("opening the writer's netlink socket")?;
    let limits = match &backend {
        Backend::Ebpf(_) => Limits::with_endpoints(settings.max_endpoints),
        // The kernel keeps no endpoint table.
        Backend::Kernel(_) => Limits {
            endpoints: usize::MAX,
            ..Limits::DATAPATH
        },
    };
    let mut host = Host {
        routes,
        backend,
        limits,
        applied,
        xdp,
        layout: layout.clone(),
    };
    // The peers, then the static bridges and their subnets.
    let mut want = State {
        local: sources::static_bridges(&static_locals, &peers),
        peers,
    };
    // Adopted: nothing of this host's side leaves before the sources spoke.
    let adopted = host.is_adopted();
    if adopted {
        want.local = want.local.keeping(&host.applied.local);
    }
    host.write(&want)?;
    let hold = adopted && settings.docker;
    let mut agent = Agent {
        source,
        settings,
        static_locals,
        want,
        underlay,
        cluster,
        hold,
        refused: Vec::new(),
    };
    // Endpoints already on static bridges, so the first packets take the
    // fast path; Docker's arrive asynchronously once it answers.
    agent.reconcile(None, &mut host);
    let settings = &agent.settings;
    if !crate::net::forwarding_enabled(&settings.iface) {
        warn!(
            "IPv4 forwarding is off on {}: the FIB refuses to forward, so xhost hands packets to the kernel",
            settings.iface
        );
    }

    if let Backend::Ebpf(dp) = &host.backend
        && let Some(t) = dp.tunnel()
    {
        info!(
            "VXLAN mode: packets over MTU {} take the kernel's route through {}, which answers fragmentation-needed; give Docker networks that MTU (daemon.json \"mtu\", or -o com.docker.network.driver.mtu) to spare the round trip",
            t.mtu,
            crate::tunnel::DEVICE
        );
    }
    let mut report = AgentState::new(settings, host.xdp, detach);
    report.cluster = agent.cluster.as_ref().map(|c| c.report.clone());
    report.refresh(&host);
    // The state file is what `status` reads; failing to write it does not
    // stop the datapath (the maps are the truth), and the next change
    // writes it again.
    if let Err(e) = report.write(&layout) {
        warn!("agent state: {e:#}");
    }
    if let Backend::Ebpf(dp) = &mut host.backend
        && dp.is_adopted()
    {
        info!(
            "adopted the pinned datapath: {} attachment(s) carried on, {} route(s) and {} endpoint(s) kept; ready {} ms after start",
            dp.attachments().count(),
            host.applied.peers.routes.len(),
            host.applied.local.endpoints.len(),
            started.elapsed().as_millis()
        );
        dp.adopted();
    }
    if detach {
        host.keep();
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
    let metrics = metrics.map(|l| tokio::spawn(crate::views::metrics::serve(l, layout.clone())));
    println!("ready");
    std::io::stdout().flush().ok();
    crate::service::ready(&agent.settings.iface);

    let res = agent.follow(signals, &mut host, &mut report).await;
    crate::service::stopping();
    if let Some(m) = metrics {
        m.abort();
    }
    let keep = agent.settings.keep_datapath && matches!(host.backend, Backend::Ebpf(_));
    if agent.settings.keep_datapath && !keep {
        warn!(
            "--keep-datapath: the kernel datapath (auto's fallback) is not adopted by a next load, so it is removed"
        );
    }
    // Revoke first: the other hosts drop this host's routes at once.
    if let Some(c) = agent.cluster.take() {
        if keep {
            // The datapath stays, so this host's routes must too: the
            // lease is left to the next agent (or expires), the snapshot
            // stays for it.
            c.leave().await;
        } else {
            c.stop().await;
        }
    }
    if keep {
        // The next load adopts what stays: the state file keeps the kernel
        // routes and XDP mode for it (and for `unload`).
        host.keep();
        report.detached = true;
        if let Err(e) = report.write(&layout) {
            warn!("agent state: {e:#}");
        }
        info!(
            "stopped; the datapath stays loaded (--keep-datapath): the next load adopts it, `xhost-user unload` removes it"
        );
        return res;
    }
    drop(host); // deletes the kernel routes, detaches and unpins
    let _ = crate::layout::remove_file_if_exists(&layout.state_file());
    let _ = std::fs::remove_dir(&layout.run_dir);
    info!("unloaded");
    res
}

/// How often bridges that Docker does not manage are rescanned for endpoints.
const RESCAN: Duration = Duration::from_secs(1);
/// How often the agent checks that its pins are still on the bpffs.
const PIN_CHECK: Duration = Duration::from_secs(1);

struct Signals {
    int: Signal,
    term: Signal,
    hup: Signal,
}

/// What the running agent was configured with, and the peers its sources
/// want.
struct Agent {
    source: Source,
    settings: Settings,
    static_locals: Vec<LocalSubnet>,
    /// The desired state: the peers gathered from every source of peers,
    /// and this host's side as the last step gathered it.
    want: State,
    /// The underlay's ifindex.
    underlay: u32,
    /// Cluster mode's store, a source of peers.
    cluster: Option<ClusterSource>,
    /// After an adoption, until Docker's first view: the datapath's
    /// endpoints, ports and subnets stay (Docker's are not known yet, and
    /// removing them would open the gap the adoption avoids).
    hold: bool,
    /// Endpoints the sources want that `ENDPOINTS` has no room for, waiting
    /// for a free slot.
    refused: Vec<Ipv4Addr>,
}

/// The single writer's side: what it writes to, and what it has written.
/// Dropped in this order: the kernel routes go, then the datapath.
struct Host {
    routes: KernelRoutes,
    backend: Backend,
    /// The sizes of the datapath's maps.
    limits: Limits,
    applied: State,
    /// Which XDP mode is attached to the underlay.
    xdp: crate::datapath::XdpAttached,
    layout: Layout,
}

/// What forwards container traffic, chosen at load (`--datapath`).
enum Backend {
    /// The eBPF programs and their maps (boxed: the object is large, and
    /// the enum lives once per agent anyway).
    Ebpf(Box<Datapath>),
    /// The kernel, with xhost's routes and iptables rules.
    Kernel(Recipe),
}

/// What a load sets up: the backend, the XDP mode attached, what the
/// datapath holds already (adopted: its maps; else nothing), and the kernel
/// routes an adopted datapath's agent had added.
type Loaded = (
    Backend,
    XdpAttached,
    State,
    Option<(
        Vec<crate::writer::routes::KernelRoute>,
        Vec<crate::writer::routes::KernelRoute6>,
    )>,
);

/// The eBPF datapath loaded and attached to the underlay, or the pinned
/// one (`prior`) adopted.
fn load_ebpf(
    layout: &Layout,
    settings: &Settings,
    underlay: u32,
    prior: Option<crate::adopt::Prior>,
) -> anyhow::Result<Loaded> {
    let (mut dp, xdp, applied, added) = match prior {
        None => {
            let mut dp = Datapath::load(
                layout,
                settings.tunnel.map(|v| (settings.iface.as_str(), v)),
                settings.attach,
                load_opts(settings),
            )?;
            let xdp = dp.attach_underlay(&settings.iface, settings.xdp_mode)?;
            dp.attach_tunnel()?;
            (dp, xdp, State::default(), None)
        }
        Some(prior) => {
            let mut dp = Datapath::adopt(
                layout,
                prior.method,
                load_opts(settings),
                prior.migration.as_ref(),
                prior.tunnel,
            )?;
            let state = prior.state.as_ref();
            let xdp =
                dp.adopt_underlay(&settings.iface, settings.xdp_mode, state.map(|s| s.xdp))?;
            dp.adopt_tunnel()?;
            // The plan starts from what the maps hold, not from nothing.
            let applied = dp.held()?;
            let added = state.map(|s| s.kernel_routes.clone()).unwrap_or_default();
            let added6 = state.map(|s| s.kernel_routes6.clone()).unwrap_or_default();
            (dp, xdp, applied, Some((added, added6)))
        }
    };
    set_underlay_addrs(&mut dp, &settings.iface, underlay)?;
    Ok((Backend::Ebpf(Box::new(dp)), xdp, applied, added))
}

fn load_opts(settings: &Settings) -> crate::datapath::LoadOpts {
    crate::datapath::LoadOpts {
        deny: settings.deny,
        max_endpoints: settings.max_endpoints,
    }
}

/// The kernel datapath set up (its chains, jumps and `ip_forward`), after
/// the checks `--datapath kernel` gets from the config (for `auto`, here).
fn load_kernel(layout: &Layout, settings: &Settings) -> anyhow::Result<Loaded> {
    if settings.tunnel.is_some() {
        anyhow::bail!(
            "the kernel datapath routes natively: VXLAN mode (--tunnel vxlan) needs the eBPF datapath"
        );
    }
    if layout.in_use() {
        return Err(DatapathError::AlreadyLoaded(layout.pin_dir.clone()).into());
    }
    let state = layout.state_file();
    if state.exists() {
        anyhow::bail!(
            "{} exists: an instance with this pin dir runs, or was killed (`xhost-user unload` removes it)",
            state.display()
        );
    }
    Ok((
        Backend::Kernel(Recipe::setup()?),
        XdpAttached::Off,
        State::default(),
        None,
    ))
}

/// Whether `auto` takes the kernel datapath after this failure of the
/// eBPF one: any probe, load, verifier, pin or attach failure; not an
/// instance already loaded under the pin dir.
fn falls_back(e: &anyhow::Error) -> bool {
    !matches!(
        e.downcast_ref::<DatapathError>(),
        Some(DatapathError::AlreadyLoaded(_))
    )
}

impl Host {
    /// Ends the agent leaving everything in place: the kernel routes and
    /// the datapath (pins, or the kernel datapath's rules) stay.
    fn keep(self) {
        let Host {
            routes, backend, ..
        } = self;
        routes.keep();
        match backend {
            Backend::Ebpf(dp) => dp.keep_running(),
            Backend::Kernel(recipe) => recipe.keep(),
        }
    }

    /// Whether this load adopted a pinned eBPF datapath (until
    /// `Datapath::adopted` ends that).
    fn is_adopted(&self) -> bool {
        matches!(&self.backend, Backend::Ebpf(dp) if dp.is_adopted())
    }

    /// Plans the way from what is applied to `want` and carries it out. On
    /// error `applied` reflects exactly what was done.
    fn write(&mut self, want: &State) -> Result<(), WriteError> {
        let ops = plan::plan(want, &self.applied, &self.limits);
        match &mut self.backend {
            Backend::Ebpf(dp) => {
                let mut w = KernelWriter {
                    dp,
                    routes: &mut self.routes,
                };
                plan::execute(&mut w, &ops, &mut self.applied)
            }
            Backend::Kernel(recipe) => {
                recipe.keep_first()?;
                let mut w = RecipeWriter {
                    recipe,
                    routes: &mut self.routes,
                };
                plan::execute(&mut w, &ops, &mut self.applied)
            }
        }
    }

    /// The eBPF datapath, if that is what forwards.
    fn ebpf(&mut self) -> Option<&mut Datapath> {
        match &mut self.backend {
            Backend::Ebpf(dp) => Some(dp),
            Backend::Kernel(_) => None,
        }
    }

    /// Moves the peer side alone to `peers`.
    fn write_peers(&mut self, peers: &Peers) -> Result<(), WriteError> {
        let want = State {
            peers: peers.clone(),
            local: self.applied.local.clone(),
        };
        self.write(&want)
    }
}

/// The peers every source of peers wants, checked together: the config's
/// and the cluster store's (whose plan already skips what overlaps the
/// config, naming both).
fn desired_peers(settings: &Settings, store: &[PeerConfig]) -> Result<Peers, sources::PeerError> {
    sources::peers(
        &[
            PeerSource {
                name: sources::CONFIG,
                peers: &settings.peers,
            },
            PeerSource {
                name: CLUSTER,
                peers: store,
            },
        ],
        &Limits::DATAPATH,
    )
}

/// The cluster store as a source of peers.
const CLUSTER: &str = "cluster store";

/// Waits for the store's next state; never, without a store.
async fn cluster_changed(
    rx: &mut Option<tokio::sync::watch::Receiver<ClusterState>>,
) -> Result<(), tokio::sync::watch::error::RecvError> {
    match rx {
        Some(r) => r.changed().await,
        None => std::future::pending().await,
    }
}

impl Agent {
    /// The single writer: applies Docker's view, the endpoints of static
    /// bridges and reloaded configs as they change, until a signal.
    async fn follow(
        &mut self,
        mut signals: Signals,
        host: &mut Host,
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
        retire_cached(host);
        let mut cluster_rx = self.cluster.as_ref().map(ClusterSource::subscribe);
        let mut rescan = tokio::time::interval(RESCAN);
        rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pin_check = tokio::time::interval(PIN_CHECK);
        pin_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let mut reloaded = false;
            tokio::select! {
                _ = pin_check.tick() => {
                    host.routes.retry_failed();
                    let Backend::Ebpf(dp) = &host.backend else { continue };
                    if check_pins(dp, report) {
                        report.refresh(host);
                        if let Err(e) = report.write(&host.layout) {
                            warn!("agent state: {e:#}");
                        }
                    }
                    continue;
                }
                _ = signals.int.recv() => break,
                _ = signals.term.recv() => break,
                _ = signals.hup.recv() => {
                    crate::service::reloading();
                    let res = self.reload(host);
                    if let Err(e) = &res {
                        error!("config reload refused, the running config stays: {e:#}");
                    }
                    // Refused or not, the reload is over.
                    crate::service::ready(&self.settings.iface);
                    report.reload_refused = res.as_ref().err().map(|e| format!("{e:#}"));
                    if res.is_err() {
                        if let Err(e) = report.write(&host.layout) {
                            warn!("agent state: {e:#}");
                        }
                        continue;
                    }
                    reloaded = true;
                }
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
                // The kernel datapath: also to keep its jumps first.
                _ = rescan.tick(), if !self.static_locals.is_empty()
                    || matches!(host.backend, Backend::Kernel(_)) => {}
                changed = cluster_changed(&mut cluster_rx) => if changed.is_err() {
                    cluster_rx = None;
                },
                ready = kernel.readable_mut() => {
                    let mut ready = ready.context("watching kernel changes")?;
                    let changes = ready.get_inner_mut().drain();
                    ready.clear_ready();
                    match changes {
                        Ok(c) => {
                            if c.any {
                                retire_cached(host);
                            }
                            if c.addresses {
                                self.follow_underlay_addrs(host);
                            }
                            if c.came_up {
                                host.routes.restore();
                            }
                            if c.neighbour_lost {
                                host.routes.resolve_lost();
                            }
                            if !c.link_deleted {
                                continue;
                            }
                        }
                        Err(e) => {
                            warn!("reading kernel changes: {e}");
                            retire_cached(host);
                            self.follow_underlay_addrs(host);
                            host.routes.restore();
                            host.routes.resolve_lost();
                        }
                    }
                }
            }
            let before = host.applied.clone();
            self.reconcile(view.as_ref(), host);
            if reloaded {
                report.peers = self.settings.peers.clone();
            }
            let cluster_report = self.follow_cluster(host, report);
            let refused_report = report.endpoints_refused != self.refused;
            report.endpoints_refused.clone_from(&self.refused);
            if reloaded
                || host.applied != before
                || report.docker_changed()
                || cluster_report
                || refused_report
            {
                report.refresh(host);
                if let Err(e) = report.write(&host.layout) {
                    warn!("agent state: {e:#}");
                }
            }
        }
        if let Some(w) = watcher {
            w.abort();
        }
        Ok(())
    }

    /// One step of the single writer: the desired state from every source,
    /// planned against what is applied and written.
    fn reconcile(&mut self, view: Option<&DockerView>, host: &mut Host) {
        if view.is_some() {
            self.hold = false;
        }
        let local = sources::local(&self.static_locals, view, &self.want.peers);
        self.want.local = if self.hold {
            local.keeping(&host.applied.local)
        } else {
            local
        };
        let refused = plan::admit(
            &mut self.want.local,
            &host.applied.local,
            host.limits.endpoints,
        );
        if refused != self.refused {
            log_refused(&self.refused, &refused, host.limits.endpoints);
            self.refused = refused;
        }
        if let Err(e) = host.write(&self.want) {
            warn!("applying state: {e}");
        }
    }

    /// Cluster mode: claims the local subnets in the store and, when the
    /// store's peers change, writes them with the config's through the same
    /// writer. Whether the report changed.
    fn follow_cluster(&mut self, host: &mut Host, report: &mut AgentState) -> bool {
        let Some(c) = self.cluster.as_mut() else {
            return false;
        };
        let local = &host.applied.local;
        let locals: BTreeSet<IpNet> = local
            .locals
            .keys()
            .map(|n| IpNet::from(*n))
            .chain(local.locals6.keys().map(|n| IpNet::from(*n)))
            .collect();
        c.set_locals(locals.clone());
        if let Some(store) = c.peers(&locals, &self.settings.peers) {
            match desired_peers(&self.settings, &store) {
                Ok(peers) => {
                    self.want.peers = peers;
                    if let Err(e) = host.write(&self.want) {
                        warn!("applying the cluster's peers: {e}");
                    }
                }
                Err(e) => error!("the cluster's peers are refused, the previous ones stay: {e}"),
            }
        }
        if report.cluster.as_ref() == Some(&c.report) {
            return false;
        }
        report.cluster = Some(c.report.clone());
        true
    }

    /// After the kernel reported address changes: `UNDERLAY_ADDRS` holds
    /// what the underlay has now. Kept as it was if that cannot be read.
    fn follow_underlay_addrs(&self, host: &mut Host) {
        let Some(dp) = host.ebpf() else { return };
        if let Err(e) = set_underlay_addrs(dp, &self.settings.iface, self.underlay) {
            warn!("{e:#}");
        }
    }

    /// SIGHUP: reads the config again and applies its peers and static
    /// bridges. A config that does not validate, or changes what only a
    /// restart can (underlay, XDP mode, Docker), is refused whole; a map
    /// write that fails puts the previous peers back.
    fn reload(&mut self, host: &mut Host) -> anyhow::Result<()> {
        let new = self.source.read()?;
        config::check_reloadable(&self.settings, &new)?;
        let static_locals = config::validate(&new)?;
        let store: &[PeerConfig] = self.cluster.as_ref().map_or(&[], |c| c.current());
        let peers = desired_peers(&new, store)?;
        if let Err(e) = host.write_peers(&peers) {
            let outcome = match host.write_peers(&self.want.peers) {
                Ok(()) => "the previous ones are back".to_owned(),
                Err(e) => format!("putting the previous ones back failed too: {e}"),
            };
            return Err(
                anyhow::Error::new(e).context(format!("applying the new peers ({outcome})"))
            );
        }
        info!(
            "config reloaded: {} peer(s), {} route(s), {} static bridge(s)",
            host.applied.peers.hosts.len(),
            host.applied.peers.routes.len(),
            new.bridges.len()
        );
        self.settings = new;
        self.static_locals = static_locals;
        self.want.peers = peers;
        Ok(())
    }
}

/// Says once which endpoints `ENDPOINTS` has just refused, and which of
/// those refused before got a slot or left (both lists in address order).
fn log_refused(before: &[Ipv4Addr], now: &[Ipv4Addr], max: usize) {
    let list = |ips: &[&Ipv4Addr]| {
        const SHOWN: usize = 8;
        let mut s: Vec<String> = ips.iter().take(SHOWN).map(ToString::to_string).collect();
        if ips.len() > SHOWN {
            s.push(format!("and {} more", ips.len() - SHOWN));
        }
        s.join(", ")
    };
    let new: Vec<&Ipv4Addr> = now
        .iter()
        .filter(|ip| before.binary_search(ip).is_err())
        .collect();
    if !new.is_empty() {
        error!(
            "ENDPOINTS is full (it holds at most {max}): {} endpoint(s) refused, waiting for a free slot (their traffic takes the kernel's path): {}",
            new.len(),
            list(&new)
        );
    }
    let left: Vec<&Ipv4Addr> = before
        .iter()
        .filter(|ip| now.binary_search(ip).is_err())
        .collect();
    if !left.is_empty() {
        info!(
            "{} endpoint(s) no longer refused (admitted, or gone): {}",
            left.len(),
            list(&left)
        );
    }
}

/// Compares the pins on the bpffs with what the datapath pinned; says so
/// once when some went (removed by hand) or came back. Whether the report
/// changed.
fn check_pins(dp: &Datapath, report: &mut AgentState) -> bool {
    let missing: Vec<String> = dp
        .missing_pins()
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    if missing == report.missing_pins {
        return false;
    }
    if missing.is_empty() {
        info!(
            "pins under {} are complete again",
            dp.layout().pin_dir.display()
        );
    } else {
        error!(
            "pins removed under {}: {}; the datapath keeps forwarding while this agent runs, but status cannot read the missing maps and unload or a restart cannot find them: stop the agent (SIGTERM) and load again",
            dp.layout().pin_dir.display(),
            missing.join(", ")
        );
    }
    report.missing_pins = missing;
    true
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
/// (The kernel datapath caches nothing.)
fn retire_cached(host: &mut Host) {
    let Some(dp) = host.ebpf() else { return };
    if let Err(e) = dp.kernel_changed() {
        warn!("retiring the datapath's cached answers: {e}");
    }
}

impl AgentState {
    fn refresh(&mut self, host: &Host) {
        self.kernel_routes = host.routes.list().to_vec();
        self.kernel_routes6 = host.routes.list6();
        let applied = &host.applied.local;
        self.bridges = applied.bridges.iter().cloned().collect();
        let dp = match &host.backend {
            Backend::Ebpf(dp) => dp,
            Backend::Kernel(recipe) => {
                self.datapath = crate::report::DatapathKind::Kernel;
                self.recipe = Some(recipe.state().clone());
                self.local_subnets = applied
                    .locals
                    .iter()
                    .map(|(net, (_, ifindex))| crate::report::Local {
                        prefix: *net,
                        bridge_ifindex: *ifindex,
                    })
                    .collect();
                return;
            }
        };
        self.attachments = dp
            .attachments()
            .map(|(iface, hook)| Attachment {
                iface: iface.to_owned(),
                hook,
                program: hook.program().to_owned(),
                via: None,
            })
            .collect();
        self.attach = Some(dp.method());
        self.kernel = Some(dp.features().clone());
        self.tunnel = dp.tunnel().map(|t| crate::report::TunnelState {
            device: crate::tunnel::DEVICE.into(),
            ifindex: t.ifindex,
            vni: t.vxlan.vni,
            port: t.vxlan.port,
            mtu: t.mtu,
        });
    }
}

/// The underlay's first IPv4 address: what peers route to.
pub fn underlay_address(iface: &str) -> Option<Ipv4Addr> {
    crate::net::ipv4_subnets(iface)
        .ok()?
        .first()
        .map(|(a, _)| *a)
}
