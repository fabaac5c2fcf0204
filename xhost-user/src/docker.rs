//! Docker watcher: which bridge networks and container endpoints the local engine serves,
//! discovered once per connection and then kept current from the engine's `/events`.
//!
//! The view is published on a `tokio::sync::watch` channel: `Some(view)` whenever it changes,
//! `None` while the engine is unreachable. The consumer diffs views, so after a reconnect a
//! full re-discovery is simply published as the next view.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    net::{Ipv4Addr, Ipv6Addr},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bollard::{
    Docker,
    errors::Error as BollardError,
    models::{ContainerInspectResponse, EventMessage, EventMessageTypeEnum, Ipam},
    query_parameters::{
        EventsOptions, InspectContainerOptions, InspectNetworkOptions, ListContainersOptions,
        ListNetworksOptions,
    },
};
use futures_util::StreamExt as _;
use log::{debug, info, warn};
use tokio::sync::{mpsc, watch};

use crate::net::{CidrError, Ipv4Net, Ipv6Net, fmt_mac, parse_mac};

/// Where the engine listens when neither `--docker-host` nor `DOCKER_HOST` says otherwise.
pub const DEFAULT_DOCKER_HOST: &str = "unix:///var/run/docker.sock";

/// Bounds every API call but the events stream (which bollard does not time out once the
/// response headers arrived): a wedged engine then counts as unreachable.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Reconnect backoff: first retry soon (an engine restart takes ~1 s), then at most every 1 s.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
// A failed connect to a local socket costs microseconds, and an engine that
// comes back should be followed within about a second, not five.
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// The events subscription starts this long before the listing, so an event racing the
/// listing is replayed (and re-inspected, which is idempotent) rather than lost.
const EVENTS_LOOKBACK: Duration = Duration::from_secs(1);
/// Events buffered between the stream reader and the view updater.
const EVENTS_QUEUE: usize = 1024;

/// Docker's option naming a bridge network's kernel bridge.
const OPT_BRIDGE_NAME: &str = "com.docker.network.bridge.name";

/// What the local Docker engine says this host serves.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct DockerView {
    /// Engine version, e.g. "20.10.24".
    pub engine_version: String,
    /// Negotiated API version, e.g. "1.41".
    pub api_version: String,
    /// Bridge-driver networks by network id.
    pub networks: BTreeMap<String, DockerNetwork>,
    /// Running containers' IPv4 endpoints on those networks, by container IP.
    pub endpoints: BTreeMap<Ipv4Addr, DockerEndpoint>,
    /// When the engine state this view shows was last reconciled (Unix ms); only changes of
    /// the content are published, so this is the time of the last change or reconnect.
    pub synced_at_unix_ms: u64,
}

/// One bridge-driver network.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DockerNetwork {
    pub id: String,
    pub name: String,
    /// Kernel bridge interface name (`docker0`, `br-<id12>` or the configured name).
    pub bridge: String,
    /// IPv4 subnets from the network's IPAM config.
    pub subnets: Vec<Ipv4Net>,
    /// IPv4 gateways from the IPAM config (the bridge's addresses).
    pub gateways: Vec<Ipv4Addr>,
    /// IPv6 subnets from the IPAM config, if the network has IPv6 enabled
    /// (`EnableIPv6`; an IPv6-only network, without IPv4, is not served).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub subnets6: Vec<Ipv6Net>,
}

impl DockerNetwork {
    /// Keeps the IPv6 subnets only if the engine says the network has IPv6.
    fn ipv6_if(mut self, enable_ipv6: Option<bool>) -> Self {
        if enable_ipv6 != Some(true) {
            self.subnets6.clear();
        }
        self
    }
}

/// A running container's interface on one bridge network.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DockerEndpoint {
    pub container_id: String,
    /// Without Docker's leading `/`.
    pub container_name: String,
    pub network_id: String,
    pub ip: Ipv4Addr,
    /// Its IPv6 address on the network (`GlobalIPv6Address`), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip6: Option<Ipv6Addr>,
    #[serde(serialize_with = "ser_mac")]
    pub mac: [u8; 6],
    /// ifindex, in the agent's network namespace, of the container's host-side veth.
    pub host_ifindex: u32,
}

fn ser_mac<S: serde::Serializer>(mac: &[u8; 6], s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&fmt_mac(mac))
}

impl DockerView {
    /// Equal engine state, whatever the sync time.
    fn same_state(&self, other: &DockerView) -> bool {
        self.engine_version == other.engine_version
            && self.api_version == other.api_version
            && self.networks == other.networks
            && self.endpoints == other.endpoints
    }

    /// Adds or replaces a network.
    fn upsert_network(&mut self, net: DockerNetwork) {
        self.networks.insert(net.id.clone(), net);
    }

    /// Removes a network and every endpoint on it.
    fn remove_network(&mut self, id: &str) {
        if self.networks.remove(id).is_some() {
            self.endpoints.retain(|_, e| e.network_id != id);
        }
    }

    /// Removes the container's endpoint on one network.
    fn forget_endpoint(&mut self, container_id: &str, network_id: &str) {
        self.endpoints
            .retain(|_, e| e.container_id != container_id || e.network_id != network_id);
    }

    /// Makes `endpoints` the container's complete set: its other endpoints are removed, and
    /// an IP held by another container is taken over (the engine's latest word wins).
    fn set_container(&mut self, container_id: &str, endpoints: Vec<DockerEndpoint>) {
        self.endpoints.retain(|_, e| e.container_id != container_id);
        for ep in endpoints {
            debug_assert_eq!(ep.container_id, container_id);
            self.endpoints.insert(ep.ip, ep);
        }
    }
}

/// Why talking to the engine failed.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    /// Connecting or negotiating the API version failed: the engine counts as unreachable.
    #[error("Docker engine at {host} is unreachable")]
    Unreachable {
        host: String,
        #[source]
        source: BollardError,
    },
    /// A call failed after the connection was established.
    #[error("Docker API call {call} failed")]
    Api {
        call: String,
        #[source]
        source: BollardError,
    },
    /// The events stream reported an error.
    #[error("Docker events stream failed")]
    Events(#[source] BollardError),
    /// The engine closed the events stream (it is shutting down or restarting).
    #[error("Docker events stream ended")]
    EventsEnded,
}

impl DockerError {
    fn api(call: impl Into<String>) -> impl FnOnce(BollardError) -> Self {
        let call = call.into();
        move |source| Self::Api { call, source }
    }
}

/// Runs until every receiver of `tx` is gone: connects to the engine (`docker_host`: `None`
/// means `DOCKER_HOST` or [`DEFAULT_DOCKER_HOST`]; `unix:///path`, a bare `/path`, `tcp://`
/// and `http://` are accepted), discovers, then follows `/events`.
///
/// Publishes `Some(view)` whenever the view changed and `None` while the engine is
/// unreachable (notified once per outage, also when the value already was `None`). Never
/// fails because of Docker: every error ends the current connection and a new one is made
/// with exponential backoff (100 ms .. 5 s), followed by a full re-discovery.
pub async fn watch(docker_host: Option<String>, tx: watch::Sender<Option<DockerView>>) {
    let host = docker_host
        .or_else(|| std::env::var("DOCKER_HOST").ok())
        .filter(|h| !h.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_DOCKER_HOST.to_owned());
    let mut backoff = Backoff::default();
    // Unreachable is logged at warn once per outage, then at debug on each retry.
    let mut outage_logged = false;
    // Kept across reconnects: a re-discovery does not log the same skips again.
    let mut skipped = Skipped::default();
    loop {
        let mut session = Session {
            host: &host,
            tx: &tx,
            connected: false,
            skipped: &mut skipped,
        };
        let err = tokio::select! {
            _ = tx.closed() => return,
            err = session.run() => err,
        };
        if session.connected {
            // The connection worked; the next failure starts a fresh backoff.
            backoff = Backoff::default();
            outage_logged = false;
        }
        match &err {
            DockerError::Unreachable { .. } => {
                if outage_logged {
                    debug!("{}", Chain(&err));
                } else {
                    // Told once per outage even if the value already is `None` (the
                    // initial one), so the consumer learns the engine is unreachable.
                    tx.send_replace(None);
                    warn!("{}; retrying, datapath kept as it is", Chain(&err));
                    outage_logged = true;
                }
            }
            DockerError::EventsEnded => {
                info!("Docker at {host}: events stream ended; reconnecting")
            }
            _ => warn!("Docker at {host}: {}; reconnecting", Chain(&err)),
        }
        let delay = backoff.next_delay();
        tokio::select! {
            _ = tx.closed() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Publishes `view` unless it shows the same engine state as the current value.
fn publish(tx: &watch::Sender<Option<DockerView>>, view: Option<DockerView>) {
    tx.send_if_modified(|cur| {
        let same = match (&*cur, &view) {
            (None, None) => true,
            (Some(a), Some(b)) => a.same_state(b),
            _ => false,
        };
        if !same {
            *cur = view;
        }
        !same
    });
}

/// Exponential backoff between [`BACKOFF_MIN`] and [`BACKOFF_MAX`].
#[derive(Debug)]
struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { next: BACKOFF_MIN }
    }
}

impl Backoff {
    fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        d
    }
}

/// Networks and containers the watcher leaves out, each logged once with its reason: a
/// resync or a repeated event that finds the same object unusable for the same reason says
/// nothing new. Keys are network or container ids (`id/what` for a part of one); an object
/// that becomes usable or goes away is forgotten, so a later relapse is logged again.
#[derive(Debug, Default)]
struct Skipped {
    reasons: HashMap<String, String>,
}

impl Skipped {
    /// Logs `Docker <what>: <reason>; skipped` (at warn, or at info for what is expected, such
    /// as the engine's `host` and `none` networks) unless `key` was last skipped for the same
    /// reason. Returns whether it logged.
    fn skip(&mut self, key: &str, what: &str, reason: &str, expected: bool) -> bool {
        if self.reasons.get(key).is_some_and(|r| r == reason) {
            return false;
        }
        self.reasons.insert(key.to_owned(), reason.to_owned());
        if expected {
            info!("Docker {what}: {reason}; skipped");
        } else {
            warn!("Docker {what}: {reason}; skipped");
        }
        true
    }

    /// Forgets `key` and its parts (`key/...`).
    fn clear(&mut self, key: &str) {
        if self.reasons.is_empty() {
            return;
        }
        self.reasons.retain(|k, _| {
            k != key
                && !k
                    .strip_prefix(key)
                    .is_some_and(|rest| rest.starts_with('/'))
        });
    }
}

/// An error and its sources on one line.
struct Chain<'a>(&'a (dyn std::error::Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut src = self.0.source();
        while let Some(e) = src {
            write!(f, ": {e}")?;
            src = e.source();
        }
        Ok(())
    }
}

/// Aborts a spawned task when dropped, so a session never leaves its reader behind.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One connection to the engine: discovery, then events until something fails.
struct Session<'a> {
    host: &'a str,
    tx: &'a watch::Sender<Option<DockerView>>,
    /// Set once a full view was published; only then does the backoff restart (an engine
    /// that answers but fails discovery is retried at a growing interval).
    connected: bool,
    skipped: &'a mut Skipped,
}

impl Session<'_> {
    /// Runs until the connection fails; returns why.
    async fn run(&mut self) -> DockerError {
        match self.try_run().await {
            Ok(never) => match never {},
            Err(e) => e,
        }
    }

    async fn try_run(&mut self) -> Result<std::convert::Infallible, DockerError> {
        let unreachable = |source| DockerError::Unreachable {
            host: self.host.to_owned(),
            source,
        };
        let docker = connect(self.host).map_err(unreachable)?;
        let docker = docker.negotiate_version().await.map_err(unreachable)?;
        let version = docker.version().await.map_err(unreachable)?;
        let api = docker.client_version();
        let api_version = format!("{}.{}", api.major_version, api.minor_version);
        let engine_version = version.version.unwrap_or_default();

        // Subscribe first, from a moment before the listing: the reader task sends the
        // request right away and the engine replays events since `since`, so nothing
        // between listing and streaming is missed.
        let since = SystemTime::now() - EVENTS_LOOKBACK;
        let (ev_tx, mut events) = mpsc::channel(EVENTS_QUEUE);
        let stream = docker.events(Some(events_options(since)));
        let _reader = AbortOnDrop(tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(item) = stream.next().await {
                if ev_tx.send(item).await.is_err() {
                    break;
                }
            }
        }));

        let mut view = discover(&docker, self.skipped).await?;
        view.engine_version = engine_version.clone();
        view.api_version = api_version.clone();
        view.synced_at_unix_ms = unix_ms();
        info!(
            "Docker {engine_version} (API {api_version}) at {}: {} bridge network(s), {} endpoint(s)",
            self.host,
            view.networks.len(),
            view.endpoints.len()
        );
        publish(self.tx, Some(view.clone()));
        self.connected = true;

        loop {
            let Some(first) = events.recv().await else {
                return Err(DockerError::EventsEnded);
            };
            // Take whatever is already queued too.
            let mut batch = vec![first];
            while let Ok(more) = events.try_recv() {
                batch.push(more);
            }
            let mut changes = Vec::with_capacity(batch.len());
            for item in batch {
                let ev = item.map_err(DockerError::Events)?;
                if let Some(change) = classify(&ev) {
                    debug!("Docker event: {change:?}");
                    changes.push(change);
                }
            }
            // The view is published after every change, not once per batch: a re-read
            // waits for the engine, so under churn (`docker rm -f` of 100 containers) a
            // batch takes seconds, and holding every change until its end delayed the maps
            // by that much.
            for change in coalesce(changes) {
                apply_change(&docker, &mut view, change, self.skipped).await?;
                view.synced_at_unix_ms = unix_ms();
                publish(self.tx, Some(view.clone()));
            }
        }
    }
}

/// The changes of one batch worth applying, in order: one that repeats its object's
/// previous change in the batch adds nothing (a re-read sees the latest state; start +
/// connect of one container need one inspect), any other is kept, so start, die, start
/// still ends with a re-read.
fn coalesce(changes: Vec<Change>) -> Vec<Change> {
    let mut last: HashMap<String, Change> = HashMap::new();
    changes
        .into_iter()
        .filter(|c| last.insert(c.object().to_owned(), c.clone()).as_ref() != Some(c))
        .collect()
}

/// A negotiated client for `docker_host` (`None`: `DOCKER_HOST` or the
/// default socket), for one-off requests outside the watcher.
pub async fn client(docker_host: Option<&str>) -> Result<Docker, BollardError> {
    let host = docker_host
        .map(str::to_owned)
        .or_else(|| std::env::var("DOCKER_HOST").ok())
        .filter(|h| !h.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_DOCKER_HOST.to_owned());
    connect(&host)?.negotiate_version().await
}

/// A bollard client for `host`, with the agent's request timeout.
fn connect(host: &str) -> Result<Docker, BollardError> {
    let host = if host.starts_with('/') {
        format!("unix://{host}")
    } else {
        host.to_owned()
    };
    Ok(Docker::connect_with_host(&host)?.with_timeout(REQUEST_TIMEOUT))
}

/// `/events` filtered to what changes the view; `since` as Docker's `seconds.nanoseconds`.
fn events_options(since: SystemTime) -> EventsOptions {
    let since = since.duration_since(UNIX_EPOCH).unwrap_or_default();
    let filters = HashMap::from([
        (
            "type".to_owned(),
            vec!["container".to_owned(), "network".to_owned()],
        ),
        (
            "event".to_owned(),
            // `create` and `destroy` are wanted for networks only, `rename` for containers;
            // the filter cannot pair actions with types, so `classify` drops the rest.
            [
                "start",
                "die",
                "destroy",
                "rename",
                "create",
                "connect",
                "disconnect",
            ]
            .map(String::from)
            .to_vec(),
        ),
    ]);
    EventsOptions {
        since: Some(format!("{}.{:09}", since.as_secs(), since.subsec_nanos())),
        until: None,
        filters: Some(filters),
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or_default()
}

/// What an event asks the watcher to re-read.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Change {
    /// Re-inspect this container (started, renamed, (dis)connected).
    Container(String),
    /// This container stopped or was removed: forget its endpoints without asking the engine
    /// (an inspect would wait for the engine to finish cleaning it up).
    ContainerGone(String),
    /// This container left this network: forget that endpoint (no inspect, as above).
    Disconnected { container: String, network: String },
    /// Inspect this new network.
    NetworkCreated(String),
    /// Forget this network and its endpoints.
    NetworkDestroyed(String),
}

impl Change {
    /// The container or network the change is about.
    fn object(&self) -> &str {
        match self {
            Self::Container(id)
            | Self::ContainerGone(id)
            | Self::Disconnected { container: id, .. }
            | Self::NetworkCreated(id)
            | Self::NetworkDestroyed(id) => id,
        }
    }
}

/// Maps an event to the re-read it needs; `None` for events that do not change the view.
fn classify(ev: &EventMessage) -> Option<Change> {
    let action = ev.action.as_deref()?;
    let actor = ev.actor.as_ref()?;
    let id = actor.id.clone().filter(|id| !id.is_empty())?;
    match ev.typ {
        Some(EventMessageTypeEnum::CONTAINER) => match action {
            "start" | "rename" => Some(Change::Container(id)),
            "die" | "destroy" => Some(Change::ContainerGone(id)),
            _ => None,
        },
        Some(EventMessageTypeEnum::NETWORK) => match action {
            "create" => Some(Change::NetworkCreated(id)),
            "destroy" => Some(Change::NetworkDestroyed(id)),
            // The container is an attribute; the actor is the network.
            "connect" => {
                let container = actor.attributes.as_ref()?.get("container")?;
                Some(Change::Container(container.clone()))
            }
            "disconnect" => {
                let container = actor.attributes.as_ref()?.get("container")?;
                Some(Change::Disconnected {
                    container: container.clone(),
                    network: id,
                })
            }
            _ => None,
        },
        _ => None,
    }
}

/// Applies one change to `view`, inspecting only the affected object. Fails only on
/// transport errors (the session then reconnects); anything else is logged and skipped.
async fn apply_change(
    docker: &Docker,
    view: &mut DockerView,
    change: Change,
    skipped: &mut Skipped,
) -> Result<(), DockerError> {
    match change {
        Change::NetworkDestroyed(id) => {
            skipped.clear(&id);
            view.remove_network(&id);
        }
        Change::NetworkCreated(id) => {
            if let Some(net) = inspect_bridge_network(docker, &id, skipped).await? {
                view.upsert_network(net);
            }
        }
        Change::Container(id) => refresh_container(docker, view, &id, skipped).await?,
        Change::ContainerGone(id) => {
            skipped.clear(&id);
            view.set_container(&id, Vec::new());
        }
        Change::Disconnected { container, network } => view.forget_endpoint(&container, &network),
    }
    Ok(())
}

/// Transport-level failures mean the engine went away; the rest are about one object.
fn is_transport(e: &BollardError) -> bool {
    matches!(
        e,
        BollardError::IOError { .. }
            | BollardError::HyperResponseError { .. }
            | BollardError::HyperLegacyError { .. }
            | BollardError::RequestTimeoutError
            | BollardError::SocketNotFoundError(_)
    )
}

fn is_not_found(e: &BollardError) -> bool {
    matches!(
        e,
        BollardError::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

/// Inspects network `id`: `Some` if it is a bridge network the datapath can serve, `None`
/// if it is not, is gone, or cannot be read (logged once, see [`Skipped`]).
async fn inspect_bridge_network(
    docker: &Docker,
    id: &str,
    skipped: &mut Skipped,
) -> Result<Option<DockerNetwork>, DockerError> {
    match docker
        .inspect_network(id, None::<InspectNetworkOptions>)
        .await
    {
        Ok(n) => Ok(usable_network(
            n.id.as_deref().unwrap_or(id),
            n.name.as_deref().unwrap_or_default(),
            n.driver.as_deref(),
            n.options.as_ref(),
            n.ipam.as_ref(),
            skipped,
        )
        .map(|net| with_bridge_gateways(net.ipv6_if(n.enable_ipv6)))),
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) if is_transport(&e) => Err(DockerError::api(format!("inspect network {id}"))(e)),
        Err(e) => {
            let reason = format!("cannot inspect it: {}", Chain(&e));
            skipped.skip(id, &format!("network {}", short_id(id)), &reason, false);
            Ok(None)
        }
    }
}

/// [`bridge_network`], with a skipped network logged once and a served one forgotten.
fn usable_network(
    id: &str,
    name: &str,
    driver: Option<&str>,
    options: Option<&HashMap<String, String>>,
    ipam: Option<&Ipam>,
    skipped: &mut Skipped,
) -> Option<DockerNetwork> {
    match bridge_network(id, name, driver, options, ipam) {
        Ok(net) => {
            skipped.clear(id);
            Some(net)
        }
        Err(skip) => {
            let what = format!("network {name} ({})", short_id(id));
            skipped.skip(id, &what, &skip.to_string(), skip.expected());
            None
        }
    }
}

/// Re-reads one container and replaces its endpoints in the view.
async fn refresh_container(
    docker: &Docker,
    view: &mut DockerView,
    id: &str,
    skipped: &mut Skipped,
) -> Result<(), DockerError> {
    let facts = match docker
        .inspect_container(id, None::<InspectContainerOptions>)
        .await
    {
        Ok(c) => ContainerFacts::from_inspect(&c),
        // Removed since the event; its destroy event follows.
        Err(e) if is_not_found(&e) => Err(ContainerSkip::Gone),
        Err(e) if is_transport(&e) => {
            return Err(DockerError::api(format!("inspect container {id}"))(e));
        }
        Err(e) => {
            // Keep what the view had: a transient error must not cut a live container off.
            let reason = format!("cannot inspect it: {}", Chain(&e));
            skipped.skip(id, &format!("container {}", short_id(id)), &reason, false);
            return Ok(());
        }
    };
    match facts {
        Ok(facts) => {
            // Event ids may be short or names; the view keys on the full id.
            if facts.id != id {
                view.set_container(id, Vec::new());
            }
            let facts = [facts];
            add_missing_networks(docker, view, &facts, skipped).await?;
            for (cid, eps) in resolve_endpoints(view, &facts, skipped).await {
                view.set_container(&cid, eps);
            }
        }
        Err(skip) => {
            skip.log(id, skipped);
            view.set_container(id, Vec::new());
        }
    }
    Ok(())
}

/// The full view from listings (networks first, so endpoints find their network).
async fn discover(docker: &Docker, skipped: &mut Skipped) -> Result<DockerView, DockerError> {
    let mut view = DockerView::default();
    let networks = docker
        .list_networks(None::<ListNetworksOptions>)
        .await
        .map_err(DockerError::api("list networks"))?;
    for n in &networks {
        let id = n.id.as_deref().unwrap_or_default();
        let name = n.name.as_deref().unwrap_or_default();
        if let Some(net) = usable_network(
            id,
            name,
            n.driver.as_deref(),
            n.options.as_ref(),
            n.ipam.as_ref(),
            skipped,
        ) {
            view.upsert_network(with_bridge_gateways(net.ipv6_if(n.enable_ipv6)));
        }
    }
    // Running containers only (`all: false`).
    let containers = docker
        .list_containers(None::<ListContainersOptions>)
        .await
        .map_err(DockerError::api("list containers"))?;
    let mut facts = Vec::with_capacity(containers.len());
    for id in containers.iter().filter_map(|c| c.id.as_deref()) {
        match docker
            .inspect_container(id, None::<InspectContainerOptions>)
            .await
        {
            Ok(c) => match ContainerFacts::from_inspect(&c) {
                Ok(f) => facts.push(f),
                Err(skip) => skip.log(id, skipped),
            },
            // Removed since the listing; its destroy event follows.
            Err(e) if is_not_found(&e) => ContainerSkip::Gone.log(id, skipped),
            Err(e) if is_transport(&e) => {
                return Err(DockerError::api(format!("inspect container {id}"))(e));
            }
            Err(e) => {
                let reason = format!("cannot inspect it: {}", Chain(&e));
                skipped.skip(id, &format!("container {}", short_id(id)), &reason, false);
            }
        }
    }
    add_missing_networks(docker, &mut view, &facts, skipped).await?;
    for (cid, eps) in resolve_endpoints(&view, &facts, skipped).await {
        view.set_container(&cid, eps);
    }
    Ok(view)
}

/// Inspects networks that containers are on but the view does not know yet (created after
/// the listing, or whose create event is still queued).
async fn add_missing_networks(
    docker: &Docker,
    view: &mut DockerView,
    facts: &[ContainerFacts],
    skipped: &mut Skipped,
) -> Result<(), DockerError> {
    let missing: BTreeSet<&str> = facts
        .iter()
        .flat_map(|f| &f.endpoints)
        .map(|e| e.network_id.as_str())
        .filter(|id| !view.networks.contains_key(*id))
        .collect();
    for id in missing {
        if let Some(net) = inspect_bridge_network(docker, id, skipped).await? {
            view.upsert_network(net);
        }
    }
    Ok(())
}

/// Resolves the host-side veths of the containers' endpoints on the view's bridge networks,
/// on one short-lived thread. Returns every container's complete endpoint list; endpoints
/// whose veth cannot be resolved (its namespace gone with its process, say) are logged
/// once and left out (the datapath then delivers via the bridge).
async fn resolve_endpoints(
    view: &DockerView,
    facts: &[ContainerFacts],
    skipped: &mut Skipped,
) -> Vec<(String, Vec<DockerEndpoint>)> {
    let mut queries = Vec::new();
    let mut owners = Vec::new();
    for (ci, f) in facts.iter().enumerate() {
        let pid = f.pid;
        for (ei, e) in f.endpoints.iter().enumerate() {
            match view.networks.get(&e.network_id) {
                Some(net) => {
                    queries.push(veth::Query {
                        pid,
                        mac: e.mac,
                        bridge: net.bridge.clone(),
                    });
                    owners.push((ci, ei));
                }
                None => debug!(
                    "container {} on network {}: not a bridge network; skipped",
                    f.name, e.network_id
                ),
            }
        }
    }
    let results = veth::resolve(queries).await;
    let mut out: Vec<(String, Vec<DockerEndpoint>)> =
        facts.iter().map(|f| (f.id.clone(), Vec::new())).collect();
    for ((ci, ei), res) in owners.into_iter().zip(results) {
        let (f, e) = (&facts[ci], &facts[ci].endpoints[ei]);
        let key = format!("{}/{}", f.id, e.ip);
        match res {
            Ok(host_ifindex) => {
                skipped.clear(&key);
                out[ci].1.push(DockerEndpoint {
                    container_id: f.id.clone(),
                    container_name: f.name.clone(),
                    network_id: e.network_id.clone(),
                    ip: e.ip,
                    ip6: e.ip6,
                    mac: e.mac,
                    host_ifindex,
                });
            }
            Err(err) => {
                let what = format!(
                    "container {} ({}) endpoint {} on network {}",
                    f.name,
                    short_id(&f.id),
                    e.ip,
                    short_id(&e.network_id)
                );
                let reason = format!("host veth not resolved: {}", Chain(&err));
                skipped.skip(&key, &what, &reason, false);
            }
        }
    }
    out
}

fn short_id(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// The kernel bridge of a bridge network: the explicit option, `docker0` for the default
/// `bridge` network, else `br-` and the first 12 characters of the id (libnetwork's rule).
fn bridge_name(id: &str, name: &str, options: Option<&HashMap<String, String>>) -> String {
    if let Some(n) = options
        .and_then(|o| o.get(OPT_BRIDGE_NAME))
        .filter(|n| !n.is_empty())
    {
        return n.clone();
    }
    if name == "bridge" {
        return "docker0".to_owned();
    }
    format!("br-{}", short_id(id))
}

/// Why a network from the engine is not served.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
enum NetworkSkip {
    #[error("driver {0:?}, not a bridge")]
    Driver(String),
    #[error("the engine's answer has no network id")]
    NoId,
    #[error("no IPv4 subnet in its IPAM config (IPv6-only, or no IPAM config)")]
    NoIpv4,
    #[error("IPAM subnet {subnet:?} is not an IPv4 or IPv6 prefix ({reason})")]
    BadSubnet { subnet: String, reason: String },
}

impl NetworkSkip {
    /// The engine's own `host` and `none` networks are in every listing.
    fn expected(&self) -> bool {
        matches!(self, Self::Driver(d) if d == "host" || d == "null")
    }
}

/// A [`DockerNetwork`] if `driver` is `bridge` and its IPAM config names at least one IPv4
/// subnet and no unreadable one (a subnet misread would route the wrong addresses).
fn bridge_network(
    id: &str,
    name: &str,
    driver: Option<&str>,
    options: Option<&HashMap<String, String>>,
    ipam: Option<&Ipam>,
) -> Result<DockerNetwork, NetworkSkip> {
    if driver != Some("bridge") {
        return Err(NetworkSkip::Driver(driver.unwrap_or_default().to_owned()));
    }
    if id.is_empty() {
        return Err(NetworkSkip::NoId);
    }
    let (subnets, gateways, subnets6) = ipam_v4(ipam)?;
    if subnets.is_empty() {
        return Err(NetworkSkip::NoIpv4);
    }
    Ok(DockerNetwork {
        id: id.to_owned(),
        name: name.to_owned(),
        bridge: bridge_name(id, name, options),
        subnets,
        gateways,
        subnets6,
    })
}

/// Fills in gateways the IPAM config does not name from the bridge's own addresses.
///
/// Docker 20.10 echoes the IPAM config as given: `docker network create --subnet S`
/// without `--gateway` shows no gateway although the default IPAM gave the bridge one
/// (set up before the `create` event is sent). The bridge lives in the agent's namespace,
/// so its addresses inside the network's subnets are the gateways.
fn with_bridge_gateways(mut net: DockerNetwork) -> DockerNetwork {
    if !net.gateways.is_empty() {
        return net;
    }
    match crate::net::ipv4_subnets(&net.bridge) {
        Ok(addrs) => {
            net.gateways = addrs
                .into_iter()
                .map(|(addr, _)| addr)
                .filter(|a| net.subnets.iter().any(|s| s.contains(*a)))
                .collect();
            net.gateways.sort();
            net.gateways.dedup();
        }
        Err(e) => debug!("network {}: bridge addresses unreadable: {e}", net.name),
    }
    net
}

/// IPv4 subnets and gateways, and IPv6 subnets, of an IPAM config; a subnet that is neither
/// fails.
type Ipam4 = (Vec<Ipv4Net>, Vec<Ipv4Addr>, Vec<Ipv6Net>);

fn ipam_v4(ipam: Option<&Ipam>) -> Result<Ipam4, NetworkSkip> {
    let mut subnets = Vec::new();
    let mut gateways = Vec::new();
    let mut subnets6 = Vec::new();
    for c in ipam.and_then(|i| i.config.as_deref()).unwrap_or_default() {
        let bad = |reason: String, s: &str| NetworkSkip::BadSubnet {
            subnet: s.to_owned(),
            reason,
        };
        match c.subnet.as_deref().filter(|s| !s.is_empty()) {
            None => {}
            Some(s) if s.contains(':') => match s.parse::<Ipv6Net>() {
                Ok(n) => subnets6.push(n),
                Err(CidrError::HostBits6 { canonical, .. }) => subnets6.push(canonical),
                Err(_) => return Err(bad("not an IPv6 prefix".into(), s)),
            },
            Some(s) => match s.parse::<Ipv4Net>() {
                Ok(n) => subnets.push(n),
                // Docker keeps what the user typed; the prefix is what matters.
                Err(CidrError::HostBits { canonical, .. }) => subnets.push(canonical),
                Err(e) => return Err(bad(e.to_string(), s)),
            },
        }
        // Plain address, though some tools write it with a prefix length.
        if let Some(g) = c.gateway.as_deref() {
            let addr = g.split_once('/').map_or(g, |(a, _)| a);
            if let Ok(ip) = addr.parse::<Ipv4Addr>() {
                gateways.push(ip);
            }
        }
    }
    subnets.sort();
    subnets.dedup();
    gateways.sort();
    gateways.dedup();
    subnets6.sort();
    subnets6.dedup();
    Ok((subnets, gateways, subnets6))
}

/// What the watcher needs from `docker inspect <container>`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ContainerFacts {
    id: String,
    name: String,
    /// The init process, whose network namespace holds the endpoints.
    pid: i32,
    endpoints: Vec<EndpointFacts>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct EndpointFacts {
    network_id: String,
    ip: Ipv4Addr,
    ip6: Option<Ipv6Addr>,
    mac: [u8; 6],
}

/// Why a container from the engine is not served.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
enum ContainerSkip {
    #[error("the engine's inspect answer has no container id")]
    NoId,
    #[error("gone between the listing and its inspect")]
    Gone,
    #[error("not running any more (stopped since it was listed or started)")]
    NotRunning,
    #[error(
        "running but without a process or network namespace (pid {pid}, SandboxKey {sandbox:?})"
    )]
    NoNetns { pid: i64, sandbox: String },
}

impl ContainerSkip {
    /// Logs the skip once; a container that stopped is expected churn, logged at info.
    fn log(&self, id: &str, skipped: &mut Skipped) {
        let expected = matches!(self, Self::Gone | Self::NotRunning);
        let what = format!("container {}", short_id(id));
        skipped.skip(id, &what, &self.to_string(), expected);
    }
}

impl ContainerFacts {
    /// The facts of a running container; why not otherwise. Endpoints without an IPv4
    /// address or MAC (not yet connected, IPv6-only) are left out.
    fn from_inspect(c: &ContainerInspectResponse) -> Result<Self, ContainerSkip> {
        let id =
            c.id.clone()
                .filter(|id| !id.is_empty())
                .ok_or(ContainerSkip::NoId)?;
        let name = c
            .name
            .as_deref()
            .unwrap_or_default()
            .trim_start_matches('/')
            .to_owned();
        let state = c.state.as_ref();
        if !state.and_then(|s| s.running).unwrap_or(false) {
            return Err(ContainerSkip::NotRunning);
        }
        let raw_pid = state.and_then(|s| s.pid).unwrap_or(0);
        let sandbox = c
            .network_settings
            .as_ref()
            .and_then(|n| n.sandbox_key.clone())
            .unwrap_or_default();

        let mut endpoints = Vec::new();
        let networks = c
            .network_settings
            .as_ref()
            .and_then(|n| n.networks.as_ref());
        for (net_name, ep) in networks.into_iter().flatten() {
            let network_id = ep.network_id.clone().unwrap_or_default();
            let ip = ep
                .ip_address
                .as_deref()
                .and_then(|s| s.parse::<Ipv4Addr>().ok());
            let ip6 = ep
                .global_ipv6_address
                .as_deref()
                .and_then(|s| s.parse::<Ipv6Addr>().ok());
            let mac = ep.mac_address.as_deref().and_then(parse_mac);
            match (ip, mac) {
                (Some(ip), Some(mac)) if !network_id.is_empty() => endpoints.push(EndpointFacts {
                    network_id,
                    ip,
                    ip6,
                    mac,
                }),
                _ => debug!(
                    "container {name}: endpoint on {net_name} without IPv4 address or MAC; skipped"
                ),
            }
        }
        endpoints.sort_by_key(|e| e.ip);
        // A container sharing another's namespace (`--network container:...`) has neither
        // a SandboxKey nor endpoints of its own; one with endpoints needs both.
        let pid = i32::try_from(raw_pid)
            .ok()
            .filter(|p| *p > 0 && (endpoints.is_empty() || !sandbox.is_empty()))
            .ok_or(ContainerSkip::NoNetns {
                pid: raw_pid,
                sandbox,
            })?;
        Ok(Self {
            id,
            name,
            pid,
            endpoints,
        })
    }
}

/// Finding a container endpoint's host-side veth.
///
/// `docker inspect` does not name the host side. The container's interface with the
/// endpoint's MAC is one end of a veth pair; its `IFLA_LINK` is the peer's ifindex in the
/// peer's namespace, i.e. the engine's (`eth0@ifN` in `ip link`). Reading it needs a
/// netlink socket *inside* the container's namespace: a thread `setns(2)`s there (network
/// namespaces are per thread) and opens one. rtnetlink was chosen over the alternatives
/// because it is namespace-correct by construction (a socket answers for the namespace it
/// was created in): `/sys/class/net` shows the namespace of whoever mounted sysfs, not the
/// thread's, and the ethtool `peer_ifindex` statistic is read from the host side, whose
/// index space is the one in question. The answer is then checked in the agent's own
/// namespace with a socket opened before the first `setns`: the ifindex must exist, be the
/// veth whose peer is the container's interface, and be enslaved to the network's bridge.
mod veth {
    use std::{collections::HashMap, fs::File, io, sync::Arc, thread};

    use log::debug;
    use nix::sched::{CloneFlags, setns};
    use tokio::sync::oneshot;

    use crate::net::fmt_mac;
    use crate::netlink::{Link, Rtnl};

    /// One endpoint to resolve.
    #[derive(Clone, Debug)]
    pub(super) struct Query {
        /// A process in the container's network namespace (its init).
        pub pid: i32,
        pub mac: [u8; 6],
        /// The bridge the host side must be enslaved to, in the agent's namespace.
        pub bridge: String,
    }

    /// Why an endpoint's host veth was not resolved. Cloneable (sources behind `Arc`) because
    /// a failure to enter a namespace fails every endpoint in it.
    #[derive(Clone, Debug, thiserror::Error)]
    pub(super) enum VethError {
        #[error("cannot enter the network namespace of pid {pid}")]
        Netns {
            pid: i32,
            #[source]
            source: Arc<io::Error>,
        },
        #[error("netlink request failed")]
        Netlink(#[source] Arc<io::Error>),
        #[error("no interface with MAC {} in the container (pid {pid})", fmt_mac(.mac))]
        NoSuchMac { pid: i32, mac: [u8; 6] },
        #[error("container interface {name} is not one end of a veth pair (no peer ifindex)")]
        NoPeer { name: String },
        #[error("bridge {0} does not exist in the agent's network namespace")]
        NoBridge(String),
        #[error("host ifindex {0} does not exist in the agent's network namespace")]
        NotInAgentNetns(u32),
        #[error(
            "ifindex {index} ({name}) in the agent's namespace is not both the peer of the container's ifindex {peer} and enslaved to {bridge}"
        )]
        Mismatch {
            index: u32,
            name: String,
            peer: u32,
            bridge: String,
        },
        #[error("the veth resolver thread failed")]
        Thread(#[source] Arc<io::Error>),
    }

    fn netlink(e: io::Error) -> VethError {
        VethError::Netlink(Arc::new(e))
    }

    /// Resolves every query on one dedicated thread that exits afterwards, so no thread is
    /// ever left (or returned to a pool) inside a container's namespace. The thread starts
    /// in the caller's namespace, which is the agent's.
    pub(super) async fn resolve(queries: Vec<Query>) -> Vec<Result<u32, VethError>> {
        if queries.is_empty() {
            return Vec::new();
        }
        let n = queries.len();
        let (tx, rx) = oneshot::channel();
        let spawned = thread::Builder::new()
            .name("xhost-veth".into())
            .spawn(move || {
                // The receiver only goes away if the watcher was cancelled.
                let _ = tx.send(resolve_blocking(&queries));
            });
        let failed = |e: io::Error| vec![Err(VethError::Thread(Arc::new(e))); n];
        match spawned {
            Ok(_) => match rx.await {
                Ok(results) => results,
                Err(_) => failed(io::Error::other("resolver thread panicked")),
            },
            Err(e) => failed(e),
        }
    }

    /// Must run on a thread of its own (see [`resolve`]): it changes the thread's namespace.
    fn resolve_blocking(queries: &[Query]) -> Vec<Result<u32, VethError>> {
        // Opened before any setns: keeps answering for the agent's namespace.
        let mut home = match Rtnl::open() {
            Ok(s) => s,
            Err(e) => return vec![Err(netlink(e)); queries.len()],
        };
        let mut bridges: HashMap<String, Option<u32>> = HashMap::new();
        // Containers with several endpoints: each namespace is entered once.
        let mut links_by_pid: HashMap<i32, Result<Vec<Link>, VethError>> = HashMap::new();
        let mut resolve_one = |q: &Query| {
            let links = links_by_pid
                .entry(q.pid)
                .or_insert_with(|| container_links(q.pid));
            let links = links.as_ref().map_err(Clone::clone)?;
            let bridge = match bridges.get(q.bridge.as_str()) {
                Some(b) => *b,
                None => {
                    let b = home
                        .link_by_name(&q.bridge)
                        .map_err(netlink)?
                        .map(|l| l.index);
                    bridges.insert(q.bridge.clone(), b);
                    b
                }
            };
            let bridge = bridge.ok_or_else(|| VethError::NoBridge(q.bridge.clone()))?;
            check(&mut home, links, q, bridge)
        };
        queries.iter().map(&mut resolve_one).collect()
    }

    /// The links of the namespace `pid` is in. Leaves the calling thread there.
    fn container_links(pid: i32) -> Result<Vec<Link>, VethError> {
        let netns = |source: io::Error| VethError::Netns {
            pid,
            source: Arc::new(source),
        };
        let ns = File::open(format!("/proc/{pid}/ns/net")).map_err(netns)?;
        setns(&ns, CloneFlags::CLONE_NEWNET).map_err(|e| netns(e.into()))?;
        // A socket opened now belongs to the container's namespace.
        let mut sock = Rtnl::open().map_err(netlink)?;
        sock.links().map_err(netlink)
    }

    /// Picks the container interface with the query's MAC and verifies its peer in the
    /// agent's namespace.
    fn check(home: &mut Rtnl, links: &[Link], q: &Query, bridge: u32) -> Result<u32, VethError> {
        let inner = links
            .iter()
            .find(|l| l.mac == Some(q.mac))
            .ok_or(VethError::NoSuchMac {
                pid: q.pid,
                mac: q.mac,
            })?;
        let peer = inner.link.ok_or_else(|| VethError::NoPeer {
            name: inner.name.clone(),
        })?;
        let outer = home
            .link_by_index(peer)
            .map_err(netlink)?
            .ok_or(VethError::NotInAgentNetns(peer))?;
        if outer.link != Some(inner.index) || outer.master != Some(bridge) {
            return Err(VethError::Mismatch {
                index: peer,
                name: outer.name,
                peer: inner.index,
                bridge: q.bridge.clone(),
            });
        }
        debug!(
            "pid {} {} -> host {} (ifindex {peer})",
            q.pid, inner.name, outer.name
        );
        Ok(peer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(id: &str, name: &str, bridge: &str, subnet: &str) -> DockerNetwork {
        DockerNetwork {
            id: id.into(),
            name: name.into(),
            bridge: bridge.into(),
            subnets: vec![subnet.parse().expect("cidr")],
            gateways: vec![],
            subnets6: vec![],
        }
    }

    fn ep(container: &str, network: &str, ip: [u8; 4], ifindex: u32) -> DockerEndpoint {
        DockerEndpoint {
            container_id: container.into(),
            container_name: format!("{container}-name"),
            network_id: network.into(),
            ip: Ipv4Addr::from(ip),
            ip6: None,
            mac: [2, 0x42, ip[0], ip[1], ip[2], ip[3]],
            host_ifindex: ifindex,
        }
    }

    #[test]
    fn bridge_names_follow_libnetwork() {
        let id = "3f1e2d4c5b6a79880123456789abcdef";
        assert_eq!(bridge_name(id, "bridge", None), "docker0");
        assert_eq!(bridge_name(id, "xnet", None), "br-3f1e2d4c5b6a");
        let opts = HashMap::from([(OPT_BRIDGE_NAME.to_owned(), "xh-br0".to_owned())]);
        assert_eq!(bridge_name(id, "xnet", Some(&opts)), "xh-br0");
        // The default network names its bridge in the options too; the option wins.
        let opts = HashMap::from([(OPT_BRIDGE_NAME.to_owned(), "docker9".to_owned())]);
        assert_eq!(bridge_name(id, "bridge", Some(&opts)), "docker9");
        let empty = HashMap::from([(OPT_BRIDGE_NAME.to_owned(), String::new())]);
        assert_eq!(bridge_name(id, "xnet", Some(&empty)), "br-3f1e2d4c5b6a");
        assert_eq!(bridge_name("abc", "short", None), "br-abc");
    }

    #[test]
    fn ipam_keeps_ipv4_only() {
        let ipam: Ipam = serde_json::from_str(
            r#"{"Driver":"default","Options":null,"Config":[
                {"Subnet":"192.168.110.0/24","Gateway":"192.168.110.1"},
                {"Subnet":"fd00:1::/64","Gateway":"fd00:1::1"},
                {"Subnet":"10.77.0.5/24","Gateway":"10.77.0.1/24"},
                {"Subnet":"10.88.0.0/16"},
                {"Gateway":"nope"}]}"#,
        )
        .expect("ipam json");
        let (subnets, gateways, subnets6) = ipam_v4(Some(&ipam)).expect("ipam");
        assert_eq!(subnets6, ["fd00:1::/64".parse::<Ipv6Net>().expect("cidr")]);
        let want: Vec<Ipv4Net> = ["10.77.0.0/24", "10.88.0.0/16", "192.168.110.0/24"]
            .iter()
            .map(|s| s.parse().expect("cidr"))
            .collect();
        assert_eq!(subnets, want);
        assert_eq!(
            gateways,
            [Ipv4Addr::new(10, 77, 0, 1), Ipv4Addr::new(192, 168, 110, 1)]
        );
        assert_eq!(ipam_v4(None), Ok((vec![], vec![], vec![])));
        let no_config: Ipam =
            serde_json::from_str(r#"{"Driver":"default","Config":null}"#).expect("json");
        assert_eq!(ipam_v4(Some(&no_config)), Ok((vec![], vec![], vec![])));
        for bad in [
            "garbage",
            "10.77.0.300/24",
            "10.77.0.0/33",
            "fd00:77::/129",
            "fd00::zz/64",
        ] {
            let ipam: Ipam = serde_json::from_str(&format!(
                r#"{{"Config":[{{"Subnet":"10.9.0.0/24"}},{{"Subnet":"{bad}"}}]}}"#
            ))
            .expect("json");
            assert!(
                matches!(ipam_v4(Some(&ipam)), Err(NetworkSkip::BadSubnet { ref subnet, .. }) if subnet == bad),
                "{bad}: {:?}",
                ipam_v4(Some(&ipam))
            );
        }
    }

    #[test]
    fn ipv6_subnets_count_only_with_ipv6_enabled() {
        let list: Vec<bollard::models::Network> = serde_json::from_str(
            r#"[
              {"Name":"dual","Id":"d0d0","Driver":"bridge","EnableIPv6":true,
               "IPAM":{"Driver":"default","Config":[{"Subnet":"10.77.0.0/24"},{"Subnet":"fd00:a::5/64"}]}},
              {"Name":"off","Id":"0f0f","Driver":"bridge","EnableIPv6":false,
               "IPAM":{"Driver":"default","Config":[{"Subnet":"10.78.0.0/24"},{"Subnet":"fd00:b::/64"}]}},
              {"Name":"unsaid","Id":"0505","Driver":"bridge",
               "IPAM":{"Driver":"default","Config":[{"Subnet":"10.79.0.0/24"},{"Subnet":"fd00:c::/64"}]}}
            ]"#,
        )
        .expect("network list json");
        let nets: Vec<DockerNetwork> = list
            .iter()
            .map(|n| {
                bridge_network(
                    n.id.as_deref().unwrap_or_default(),
                    n.name.as_deref().unwrap_or_default(),
                    n.driver.as_deref(),
                    n.options.as_ref(),
                    n.ipam.as_ref(),
                )
                .expect("a bridge network")
                .ipv6_if(n.enable_ipv6)
            })
            .collect();
        // Host bits as Docker keeps what was typed: the prefix is what counts.
        assert_eq!(
            nets[0].subnets6,
            ["fd00:a::/64".parse::<Ipv6Net>().expect("cidr")]
        );
        assert!(nets[1].subnets6.is_empty() && nets[2].subnets6.is_empty());
        assert_eq!(nets[1].subnets.len(), 1);
    }

    #[test]
    fn only_bridge_driver_networks_are_kept() {
        // `docker network ls` output of a 20.10 engine, trimmed.
        let list: Vec<bollard::models::Network> = serde_json::from_str(
            r#"[
              {"Name":"bridge","Id":"b9c3178ec49d2024e73137f6872dbb9778619f13b5ba607453f14037d43e4118",
               "Created":"2026-11-21T23:50:27.9Z","Scope":"local","Driver":"bridge","EnableIPv6":false,
               "IPAM":{"Driver":"default","Options":null,"Config":[{"Subnet":"192.168.110.0/24","Gateway":"192.168.110.1"}]},
               "Internal":false,"Attachable":false,"Ingress":false,"ConfigFrom":{"Network":""},"ConfigOnly":false,
               "Containers":{},"Options":{"com.docker.network.bridge.default_bridge":"true",
               "com.docker.network.bridge.name":"docker0"},"Labels":{}},
              {"Name":"host","Id":"5b3e4a","Driver":"host","IPAM":{"Driver":"default","Config":[]},"Options":{}},
              {"Name":"none","Id":"77aa01","Driver":"null","IPAM":{"Driver":"default","Config":[]},"Options":{}},
              {"Name":"xnet","Id":"0123456789abcdef0123","Driver":"bridge",
               "IPAM":{"Driver":"default","Options":{},"Config":[{"Subnet":"10.77.0.0/24","Gateway":"10.77.0.1"}]},
               "Options":{}}
            ]"#,
        )
        .expect("network list json");
        let nets: Vec<DockerNetwork> = list
            .iter()
            .filter_map(|n| {
                bridge_network(
                    n.id.as_deref().unwrap_or_default(),
                    n.name.as_deref().unwrap_or_default(),
                    n.driver.as_deref(),
                    n.options.as_ref(),
                    n.ipam.as_ref(),
                )
                .ok()
            })
            .collect();
        assert_eq!(nets.len(), 2, "{nets:?}");
        assert_eq!(nets[0].bridge, "docker0");
        assert_eq!(
            nets[0].subnets,
            ["192.168.110.0/24".parse::<Ipv4Net>().expect("cidr")]
        );
        assert_eq!(nets[0].gateways, [Ipv4Addr::new(192, 168, 110, 1)]);
        assert_eq!(nets[1].name, "xnet");
        assert_eq!(nets[1].bridge, "br-0123456789ab");
    }

    /// `docker inspect` of a running 20.10 container, trimmed to what matters.
    const INSPECT: &str = r#"{
        "Id":"b618e18c35f19812b85ebc2124b3fc4cda6d513c513e2eeab9e991414cf0747f",
        "Created":"2026-11-21T23:50:29.1Z","Path":"sleep","Args":["3600"],
        "State":{"Status":"running","Running":true,"Paused":false,"Restarting":false,"OOMKilled":false,
                 "Dead":false,"Pid":11893,"ExitCode":0,"Error":"","StartedAt":"2026-11-21T23:50:29.4Z",
                 "FinishedAt":"0001-01-01T00:00:00Z"},
        "Name":"/c1",
        "NetworkSettings":{"Bridge":"","SandboxID":"5fb5561967e3","HairpinMode":false,"Ports":{},
          "SandboxKey":"/tmp/xhd/exec/netns/5fb5561967e3",
          "Networks":{
            "bridge":{"IPAMConfig":null,"Links":null,"Aliases":null,
              "NetworkID":"b9c3178ec49d2024e73137f6872dbb9778619f13b5ba607453f14037d43e4118",
              "EndpointID":"25a45304","Gateway":"192.168.110.1","IPAddress":"192.168.110.2",
              "IPPrefixLen":24,"IPv6Gateway":"","GlobalIPv6Address":"","GlobalIPv6PrefixLen":0,
              "MacAddress":"02:42:c0:a8:6e:02","DriverOpts":null},
            "xnet":{"NetworkID":"0123456789abcdef0123","IPAddress":"10.77.0.10","MacAddress":"02:42:0a:4d:00:0a",
              "GlobalIPv6Address":"fd00:77::a","GlobalIPv6PrefixLen":64},
            "v6only":{"NetworkID":"feedbeef","IPAddress":"","MacAddress":"02:42:0a:4d:00:0b"}
          }}
    }"#;

    #[test]
    fn container_facts_from_inspect() {
        let c: ContainerInspectResponse = serde_json::from_str(INSPECT).expect("inspect json");
        let f = ContainerFacts::from_inspect(&c).expect("facts");
        assert_eq!(
            f.id,
            "b618e18c35f19812b85ebc2124b3fc4cda6d513c513e2eeab9e991414cf0747f"
        );
        assert_eq!(f.name, "c1");
        assert_eq!(f.pid, 11893);
        assert_eq!(
            f.endpoints,
            [
                EndpointFacts {
                    network_id: "0123456789abcdef0123".into(),
                    ip: Ipv4Addr::new(10, 77, 0, 10),
                    ip6: Some("fd00:77::a".parse().expect("ip6")),
                    mac: [2, 0x42, 10, 77, 0, 10],
                },
                EndpointFacts {
                    network_id: "b9c3178ec49d2024e73137f6872dbb9778619f13b5ba607453f14037d43e4118"
                        .into(),
                    ip: Ipv4Addr::new(192, 168, 110, 2),
                    ip6: None,
                    mac: [2, 0x42, 192, 168, 110, 2],
                },
            ]
        );
        // Exited: no pid, so no endpoints get resolved.
        let exited = INSPECT
            .replace(r#""Running":true"#, r#""Running":false"#)
            .replace("11893", "0");
        let c: ContainerInspectResponse = serde_json::from_str(&exited).expect("inspect json");
        assert_eq!(
            ContainerFacts::from_inspect(&c),
            Err(ContainerSkip::NotRunning)
        );
        let c: ContainerInspectResponse = serde_json::from_str(r#"{"Name":"/x"}"#).expect("json");
        assert_eq!(ContainerFacts::from_inspect(&c), Err(ContainerSkip::NoId));
    }

    fn event(json: &str) -> EventMessage {
        serde_json::from_str(json).expect("event json")
    }

    #[test]
    fn events_map_to_rereads() {
        // As /events of a 20.10 engine sends them (legacy fields included).
        let start = event(
            r#"{"status":"start","id":"abc","from":"xhost-test/busybox:latest","Type":"container",
                "Action":"start","Actor":{"ID":"abc","Attributes":{"image":"xhost-test/busybox:latest","name":"c1"}},
                "scope":"local","time":1795305028,"timeNano":1795305028123456789}"#,
        );
        assert_eq!(classify(&start), Some(Change::Container("abc".into())));
        for (action, change) in [
            ("die", Change::ContainerGone("abc".into())),
            ("destroy", Change::ContainerGone("abc".into())),
            ("rename", Change::Container("abc".into())),
        ] {
            let ev = event(&format!(
                r#"{{"Type":"container","Action":"{action}","Actor":{{"ID":"abc"}}}}"#
            ));
            assert_eq!(classify(&ev), Some(change), "{action}");
        }
        for action in [
            "create",
            "exec_start: sh",
            "health_status: healthy",
            "kill",
            "stop",
        ] {
            let ev = event(&format!(
                r#"{{"Type":"container","Action":"{action}","Actor":{{"ID":"abc"}}}}"#
            ));
            assert_eq!(classify(&ev), None, "{action}");
        }
        let connect = event(
            r#"{"Type":"network","Action":"connect","Actor":{"ID":"net1",
                "Attributes":{"container":"abc","name":"bridge","type":"bridge"}},"scope":"local"}"#,
        );
        assert_eq!(classify(&connect), Some(Change::Container("abc".into())));
        let disconnect = event(
            r#"{"Type":"network","Action":"disconnect","Actor":{"ID":"net1","Attributes":{"container":"abc"}}}"#,
        );
        assert_eq!(
            classify(&disconnect),
            Some(Change::Disconnected {
                container: "abc".into(),
                network: "net1".into()
            })
        );
        let no_container =
            event(r#"{"Type":"network","Action":"connect","Actor":{"ID":"net1","Attributes":{}}}"#);
        assert_eq!(classify(&no_container), None);
        let create = event(
            r#"{"Type":"network","Action":"create","Actor":{"ID":"net1","Attributes":{"name":"xnet","type":"bridge"}}}"#,
        );
        assert_eq!(
            classify(&create),
            Some(Change::NetworkCreated("net1".into()))
        );
        let destroy = event(r#"{"Type":"network","Action":"destroy","Actor":{"ID":"net1"}}"#);
        assert_eq!(
            classify(&destroy),
            Some(Change::NetworkDestroyed("net1".into()))
        );
        let image = event(r#"{"Type":"image","Action":"delete","Actor":{"ID":"sha256:1"}}"#);
        assert_eq!(classify(&image), None);
        let no_actor = event(r#"{"Type":"container","Action":"start"}"#);
        assert_eq!(classify(&no_actor), None);
    }

    #[test]
    fn batches_coalesce_repeats_only() {
        let c = |id: &str| Change::Container(id.into());
        let gone = |id: &str| Change::ContainerGone(id.into());
        // start + connect of one container: one inspect; die + destroy: one removal.
        assert_eq!(
            coalesce(vec![c("a"), c("a"), gone("b"), gone("b")]),
            [c("a"), gone("b")]
        );
        // A restart inside one batch still ends with a re-read.
        assert_eq!(
            coalesce(vec![c("a"), gone("a"), c("a")]),
            [c("a"), gone("a"), c("a")]
        );
        let left = Change::Disconnected {
            container: "a".into(),
            network: "n".into(),
        };
        assert_eq!(coalesce(vec![c("a"), left.clone()]), [c("a"), left]);
    }

    #[test]
    fn view_forgets_a_disconnected_endpoint_only() {
        let ep = |cid: &str, net: &str, last: u8| DockerEndpoint {
            container_id: cid.into(),
            container_name: cid.into(),
            network_id: net.into(),
            ip: Ipv4Addr::new(10, 0, 0, last),
            ip6: None,
            mac: [2, 0x42, 10, 0, 0, last],
            host_ifindex: u32::from(last),
        };
        let mut v = DockerView::default();
        v.set_container("a", vec![ep("a", "n1", 1), ep("a", "n2", 2)]);
        v.set_container("b", vec![ep("b", "n1", 3)]);
        v.forget_endpoint("a", "n1");
        assert_eq!(
            v.endpoints.keys().copied().collect::<Vec<_>>(),
            [Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(10, 0, 0, 3)]
        );
    }

    #[test]
    fn events_filter_and_since() {
        let opts = events_options(UNIX_EPOCH + Duration::new(1_795_305_027, 5));
        assert_eq!(opts.since.as_deref(), Some("1795305027.000000005"));
        let filters = opts.filters.expect("filters");
        assert_eq!(filters["type"], ["container", "network"]);
        assert!(filters["event"].iter().any(|e| e == "connect"));
    }

    #[test]
    fn view_updates_are_incremental() {
        let mut v = DockerView::default();
        v.upsert_network(net("n1", "bridge", "docker0", "192.168.110.0/24"));
        v.upsert_network(net("n2", "xnet", "br-n2", "10.77.0.0/24"));
        v.set_container(
            "c1",
            vec![
                ep("c1", "n1", [192, 168, 110, 2], 4),
                ep("c1", "n2", [10, 77, 0, 2], 6),
            ],
        );
        v.set_container("c2", vec![ep("c2", "n1", [192, 168, 110, 3], 8)]);
        assert_eq!(v.endpoints.len(), 3);

        // Disconnected from n2: the container's set is replaced.
        v.set_container("c1", vec![ep("c1", "n1", [192, 168, 110, 2], 4)]);
        assert_eq!(v.endpoints.len(), 2);
        assert!(!v.endpoints.contains_key(&Ipv4Addr::new(10, 77, 0, 2)));

        // c2 died unseen and c3 got its address: the newer word wins.
        v.set_container("c3", vec![ep("c3", "n1", [192, 168, 110, 3], 9)]);
        assert_eq!(
            v.endpoints[&Ipv4Addr::new(192, 168, 110, 3)].container_id,
            "c3"
        );
        assert_eq!(v.endpoints.len(), 2);

        // A network removed takes its endpoints along.
        v.set_container("c4", vec![ep("c4", "n2", [10, 77, 0, 4], 11)]);
        v.remove_network("n2");
        assert!(!v.networks.contains_key("n2"));
        assert!(v.endpoints.values().all(|e| e.network_id == "n1"));
        // Removing an unknown network or container changes nothing.
        let before = v.clone();
        v.remove_network("nope");
        v.set_container("nope", vec![]);
        assert_eq!(v, before);

        v.set_container("c1", vec![]);
        v.set_container("c3", vec![]);
        assert!(v.endpoints.is_empty());
        assert_eq!(v.networks.len(), 1);
    }

    #[test]
    fn publishes_only_changes() {
        let (tx, mut rx) = watch::channel(None);
        publish(&tx, None);
        assert!(
            !rx.has_changed().expect("open"),
            "None -> None is no change"
        );
        let mut v = DockerView {
            engine_version: "20.10.24".into(),
            api_version: "1.41".into(),
            ..Default::default()
        };
        v.upsert_network(net("n1", "bridge", "docker0", "192.168.110.0/24"));
        v.synced_at_unix_ms = 1;
        publish(&tx, Some(v.clone()));
        assert!(rx.has_changed().expect("open"));
        rx.borrow_and_update();
        // Only the sync time differs: nothing to tell the consumer.
        v.synced_at_unix_ms = 2;
        publish(&tx, Some(v.clone()));
        assert!(!rx.has_changed().expect("open"));
        v.set_container("c1", vec![ep("c1", "n1", [192, 168, 110, 2], 4)]);
        publish(&tx, Some(v.clone()));
        assert!(rx.has_changed().expect("open"));
        assert_eq!(
            rx.borrow_and_update().as_ref().map(|v| v.endpoints.len()),
            Some(1)
        );
        publish(&tx, None);
        assert!(rx.has_changed().expect("open"));
        assert!(rx.borrow_and_update().is_none());
    }

    #[test]
    fn backoff_doubles_up_to_one_second() {
        let mut b = Backoff::default();
        let seq: Vec<u64> = (0..9)
            .map(|_| u64::try_from(b.next_delay().as_millis()).unwrap_or(0))
            .collect();
        assert_eq!(seq, [100, 200, 400, 800, 1000, 1000, 1000, 1000, 1000]);
    }

    #[test]
    fn view_serializes_macs_as_text() {
        let mut v = DockerView::default();
        v.set_container("c1", vec![ep("c1", "n1", [192, 168, 110, 2], 4)]);
        let json = serde_json::to_value(&v).expect("serialize");
        assert_eq!(
            json["endpoints"]["192.168.110.2"]["mac"],
            "02:42:c0:a8:6e:02"
        );
        assert_eq!(json["endpoints"]["192.168.110.2"]["host_ifindex"], 4);
    }

    #[test]
    fn unreachable_engine_is_told_once_and_watcher_stops_without_receivers() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let (tx, mut rx) = watch::channel(None);
            let task = tokio::spawn(watch(
                Some("unix:///nonexistent/xhost/docker.sock".into()),
                tx,
            ));
            let told = tokio::time::timeout(Duration::from_secs(2), rx.changed()).await;
            assert!(matches!(told, Ok(Ok(()))), "no notification: {told:?}");
            assert!(rx.borrow_and_update().is_none());
            // Retries (100, 200, 400 ms) do not notify again.
            let again = tokio::time::timeout(Duration::from_millis(800), rx.changed()).await;
            assert!(again.is_err(), "notified again: {again:?}");
            drop(rx);
            let done = tokio::time::timeout(Duration::from_secs(6), task).await;
            assert!(
                matches!(done, Ok(Ok(()))),
                "watcher did not return: {done:?}"
            );
        });
    }

    #[test]
    fn unsupported_hosts_fail_fast() {
        assert!(connect("ssh://somewhere").is_err());
        assert!(connect("unix:///nonexistent/xhost/docker.sock").is_err());
        assert!(connect("/nonexistent/xhost/docker.sock").is_err());
    }

    /// Engine answers the watcher cannot use, as a 20.10 engine gives them or as recorded:
    /// each network is skipped with its reason, the usable ones are kept.
    #[test]
    fn unusable_networks_are_skipped_with_a_reason() {
        let list: Vec<bollard::models::Network> = serde_json::from_str(
            r#"[
              {"Name":"bridge","Id":"b9c3178ec49d","Driver":"bridge",
               "IPAM":{"Driver":"default","Config":[{"Subnet":"192.168.110.0/24","Gateway":"192.168.110.1"}]},
               "Options":{"com.docker.network.bridge.name":"docker0"}},
              {"Name":"v6only","Id":"6666aaaa0000","Driver":"bridge","EnableIPv6":true,
               "IPAM":{"Driver":"default","Config":[{"Subnet":"fd00:77::/64","Gateway":"fd00:77::1"}]},"Options":{}},
              {"Name":"noipam","Id":"7777bbbb0000","Driver":"bridge","IPAM":{"Driver":"default","Config":null}},
              {"Name":"mv","Id":"8888cccc0000","Driver":"macvlan",
               "IPAM":{"Driver":"default","Config":[{"Subnet":"10.50.0.0/24"}]},"Options":{"parent":"eth0"}},
              {"Name":"odd","Id":"9999dddd0000","Driver":"acme/overlay-ng:1.2",
               "IPAM":{"Driver":"default","Config":[{"Subnet":"10.51.0.0/24"}]}},
              {"Name":"bad","Id":"aaaaeeee0000","Driver":"bridge",
               "IPAM":{"Driver":"default","Config":[{"Subnet":"10.52.0.0/24"},{"Subnet":"10.53.0.300/24"}]}},
              {"Name":"noid","Id":"","Driver":"bridge","IPAM":{"Config":[{"Subnet":"10.54.0.0/24"}]}},
              {"Name":"none","Id":"77aa01","Driver":"null","IPAM":{"Driver":"default","Config":[]}},
              {"Name":"xnet","Id":"0123456789abcdef0123","Driver":"bridge",
               "IPAM":{"Driver":"default","Config":[{"Subnet":"10.77.0.0/24"},{"Subnet":"fd00:78::/64"}]}}
            ]"#,
        )
        .expect("network list json");
        let mut skipped = Skipped::default();
        let mut kept = Vec::new();
        for n in &list {
            let id = n.id.as_deref().unwrap_or_default();
            let name = n.name.as_deref().unwrap_or_default();
            let (driver, opts, ipam) = (n.driver.as_deref(), n.options.as_ref(), n.ipam.as_ref());
            match bridge_network(id, name, driver, opts, ipam) {
                Ok(net) => kept.push(net.name),
                Err(e) => assert!(skipped.skip(id, name, &e.to_string(), e.expected())),
            }
            usable_network(id, name, driver, opts, ipam, &mut skipped);
        }
        assert_eq!(kept, ["bridge", "xnet"]);
        let reason = |id: &str| skipped.reasons.get(id).map(String::as_str);
        assert_eq!(
            reason("6666aaaa0000"),
            Some(NetworkSkip::NoIpv4.to_string().as_str())
        );
        assert_eq!(
            reason("7777bbbb0000"),
            Some(NetworkSkip::NoIpv4.to_string().as_str())
        );
        assert_eq!(
            reason("8888cccc0000"),
            Some(r#"driver "macvlan", not a bridge"#)
        );
        assert!(reason("9999dddd0000").is_some_and(|r| r.contains("acme/overlay-ng")));
        assert!(
            reason("aaaaeeee0000").is_some_and(|r| r.contains(r#""10.53.0.300/24""#)),
            "{:?}",
            reason("aaaaeeee0000")
        );
        assert_eq!(reason(""), Some(NetworkSkip::NoId.to_string().as_str()));
        assert!(NetworkSkip::Driver("null".into()).expected());
        assert!(!NetworkSkip::Driver("macvlan".into()).expected());
        assert!(!NetworkSkip::NoIpv4.expected());
        assert_eq!(skipped.reasons.len(), 7, "{:?}", skipped.reasons);
    }

    /// Containers whose namespace is gone (the engine still says running, but with no pid
    /// or no SandboxKey) or that stopped since the listing are skipped with a reason.
    #[test]
    fn containers_without_a_namespace_are_skipped_with_a_reason() {
        let parse = |json: &str| {
            let c: ContainerInspectResponse = serde_json::from_str(json).expect("inspect json");
            ContainerFacts::from_inspect(&c)
        };
        let no_pid = INSPECT.replace("11893", "0");
        assert_eq!(
            parse(&no_pid),
            Err(ContainerSkip::NoNetns {
                pid: 0,
                sandbox: "/tmp/xhd/exec/netns/5fb5561967e3".into()
            })
        );
        let no_sandbox = INSPECT.replace(r#""SandboxKey":"/tmp/xhd/exec/netns/5fb5561967e3","#, "");
        assert_eq!(
            parse(&no_sandbox),
            Err(ContainerSkip::NoNetns {
                pid: 11893,
                sandbox: String::new()
            })
        );
        let stopped = INSPECT.replace(r#""Running":true"#, r#""Running":false"#);
        assert_eq!(parse(&stopped), Err(ContainerSkip::NotRunning));
        // Sharing another container's namespace: no SandboxKey and no endpoints of its own.
        let shared = r#"{"Id":"c2","Name":"/c2","State":{"Running":true,"Pid":4242},
            "NetworkSettings":{"SandboxKey":"","Networks":{}}}"#;
        assert_eq!(
            parse(shared).map(|f| (f.pid, f.endpoints.len())),
            Ok((4242, 0))
        );
        let text = ContainerSkip::NoNetns {
            pid: 0,
            sandbox: String::new(),
        }
        .to_string();
        assert!(
            text.contains("pid 0") && text.contains("SandboxKey"),
            "{text}"
        );
    }

    /// One line per object and reason: a resync finding the same skip says nothing; a new
    /// reason, or the object back after it was served or gone, is told again.
    #[test]
    fn skips_are_logged_once_per_object_and_reason() {
        let mut s = Skipped::default();
        assert!(s.skip("n1", "network v6", "no IPv4 subnet", false));
        assert!(!s.skip("n1", "network v6", "no IPv4 subnet", false));
        assert!(s.skip("n1", "network v6", "driver \"null\", not a bridge", true));
        assert!(s.skip("n2", "network x", "no IPv4 subnet", false));
        assert!(s.skip(
            "c1/10.0.0.2",
            "container c1 endpoint",
            "host veth not resolved",
            false
        ));
        assert!(s.skip("c1", "container c1", "gone", true));
        assert!(s.skip("c10", "container c10", "gone", true));
        s.clear("c1");
        assert!(!s.reasons.contains_key("c1/10.0.0.2") && !s.reasons.contains_key("c1"));
        assert!(
            s.reasons.contains_key("c10"),
            "only c1 and its parts are forgotten"
        );
        assert!(s.skip("c1", "container c1", "gone", true));
        s.clear("n1");
        assert!(s.skip("n1", "network v6", "no IPv4 subnet", false));
        assert!(!s.skip("n2", "network x", "no IPv4 subnet", false));
    }
}
