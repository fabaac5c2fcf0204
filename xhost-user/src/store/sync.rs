//! The store session task: keeps this host and its local subnets claimed
//! under one lease (renewed every TTL/3, as Cilium's etcd lease manager
//! does), lists the prefix, watches from the listed revision, re-lists when
//! the watch is compacted, and hands each new view to the agent. A store
//! error never clears the view: the agent keeps routing what it last knew
//! while this task reconnects, re-claims (under a new lease if the old one
//! expired) and lists again. The view and the lease id are kept on disk,
//! so a restart during an outage still routes and a restart within the TTL
//! keeps its claims without a change the other hosts would see.

use std::{
    collections::BTreeSet,
    future::Future,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use log::{debug, info, warn};
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};

use super::{
    LeaseId, Store, StoreError, Watch as _,
    view::{HostRecord, Keys, SubnetRecord, View},
};
use crate::net::{IpNet, Ipv4Net};

/// What the session needs to know about this host and the store.
#[derive(Clone, Debug)]
pub struct SyncSettings {
    pub keys: Keys,
    pub prefix: String,
    pub host: HostRecord,
    /// Lease TTL in seconds.
    pub ttl: i64,
    pub endpoints: Vec<String>,
    /// How to reach the store, kept in the snapshot (without the password)
    /// so `unload` can revoke the lease of an agent that was killed.
    pub etcd: super::etcd::EtcdOptions,
    /// `<run-dir>/<instance>.cluster.json`.
    pub snapshot: PathBuf,
    /// With a cluster pool: the Docker network to create from it.
    pub pool_network: Option<super::pool::PoolNetwork>,
}

/// The store as `status` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreStatus {
    pub endpoints: Vec<String>,
    pub prefix: String,
    pub host_id: String,
    pub connected: bool,
    pub lease: Option<LeaseId>,
    pub lease_ttl: i64,
    /// When the lease runs out unless renewed (as of the last renewal).
    pub lease_expires_unix_ms: Option<u64>,
    /// Revision of the view.
    pub revision: i64,
    /// The view came from the on-disk snapshot and the store has not been
    /// reached since.
    pub from_snapshot: bool,
    pub last_error: Option<String>,
}

/// What the task hands the agent.
#[derive(Clone, Debug, Default)]
pub struct ClusterState {
    pub view: Arc<View>,
    /// Bumped whenever `view` changes: the agent plans again only then.
    pub view_version: u64,
    pub status: StoreStatus,
}

/// The snapshot file.
#[derive(Debug, Serialize, Deserialize)]
pub struct Snapshot {
    pub host_id: String,
    pub lease: Option<LeaseId>,
    /// Where the lease lives (the password is never written).
    #[serde(default)]
    pub etcd: Option<super::etcd::EtcdOptions>,
    pub view: View,
}

/// The snapshot this host left, if any (another host id's is ignored).
pub fn read_snapshot(path: &Path, host_id: &str) -> Option<Snapshot> {
    read_any_snapshot(path).filter(|s| s.host_id == host_id)
}

/// The snapshot at `path`, whoever left it.
pub fn read_any_snapshot(path: &Path) -> Option<Snapshot> {
    let text = std::fs::read(path).ok()?;
    match serde_json::from_slice::<Snapshot>(&text) {
        Ok(s) => Some(s),
        Err(e) => {
            warn!("ignoring {}: {e}", path.display());
            None
        }
    }
}

fn write_snapshot(path: &Path, s: &Snapshot) {
    let res = (|| -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec(s)?)?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = res {
        warn!("writing the cluster snapshot {}: {e}", path.display());
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The running session task, on a thread of its own.
pub struct Handle {
    /// `None` until the agent has said which subnets are local.
    locals: watch::Sender<Option<BTreeSet<IpNet>>>,
    pub state: watch::Receiver<ClusterState>,
    stop: Option<oneshot::Sender<()>>,
    /// Dropped: the task is abandoned where it stands.
    abort: Option<oneshot::Sender<()>>,
    /// Fires (or closes) when the task has ended.
    done: oneshot::Receiver<()>,
}

impl Handle {
    /// Starts the task; `initial` is what the agent routes until the store
    /// answers (the snapshot's view, or nothing).
    pub fn start<S, F, Fut>(
        connect: F,
        settings: SyncSettings,
        initial: ClusterState,
        lease: Option<LeaseId>,
    ) -> Self
    where
        S: Store + 'static,
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = Result<S, StoreError>> + Send + 'static,
    {
        let (locals, locals_rx) = watch::channel(None);
        let (out, state) = watch::channel(initial);
        let (stop, stop_rx) = oneshot::channel();
        let (abort, abort_rx) = oneshot::channel::<()>();
        let (done_tx, done) = oneshot::channel();
        // The lease is renewed on a thread of its own: the agent's thread
        // makes blocking calls (netlink, BPF maps) that can wait seconds on
        // a loaded host (rtnl held while a namespace is torn down), and a
        // renewal waiting behind them lets the lease expire, which drops
        // this host from every other host's routes.
        let task = run(connect, settings, locals_rx, out, stop_rx, lease);
        let spawned = std::thread::Builder::new()
            .name("xhost-store".into())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt.block_on(async {
                        tokio::select! {
                            _ = task => {}
                            _ = abort_rx => {}
                        }
                    }),
                    Err(e) => warn!("etcd: no runtime for the store session: {e}"),
                }
                let _ = done_tx.send(());
            });
        if let Err(e) = spawned {
            warn!("etcd: no thread for the store session: {e}");
        }
        Self {
            locals,
            state,
            stop: Some(stop),
            abort: Some(abort),
            done,
        }
    }

    /// This host's local subnets now: claimed if new, released if gone.
    pub fn set_locals(&self, locals: BTreeSet<IpNet>) {
        self.locals.send_if_modified(|l| {
            let changed = l.as_ref() != Some(&locals);
            *l = Some(locals);
            changed
        });
    }

    /// Exit leaving the datapath (`--keep-datapath`): the session ends
    /// without revoking the lease, so this host's keys and the other
    /// hosts' routes to it stay until the next agent renews the lease (it
    /// finds it in the snapshot) or it expires. Merely dropping the handle
    /// would not do: the session takes the closed stop channel for a stop
    /// and revokes.
    pub async fn leave(mut self) {
        if let Some(a) = self.abort.take() {
            let _ = a.send(());
        }
        if tokio::time::timeout(Duration::from_secs(2), &mut self.done)
            .await
            .is_err()
        {
            warn!("etcd: the store session did not end within 2 s");
        }
    }

    /// Clean exit: revokes the lease (the other hosts drop this host's
    /// routes at once), waiting at most a few seconds for the store.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if tokio::time::timeout(Duration::from_secs(4), &mut self.done)
            .await
            .is_err()
        {
            warn!(
                "etcd: no answer to the lease revocation; the other hosts drop this host when it expires"
            );
            self.abort.take();
        }
    }
}

/// How the session ended.
enum End {
    Stopped,
}

struct Task {
    s: SyncSettings,
    locals: watch::Receiver<Option<BTreeSet<IpNet>>>,
    out: watch::Sender<ClusterState>,
    lease: Option<LeaseId>,
    view: View,
    view_version: u64,
    /// The snapshot on disk is older than the view.
    dirty: bool,
    /// The pool network's subnet, once it exists: claimed even before
    /// Docker's view shows the network as local.
    pool_subnet: Option<Ipv4Net>,
    /// Whether the last logged error was an authentication one; `None`:
    /// connected since.
    last_logged: Option<bool>,
}

async fn run<S, F, Fut>(
    mut connect: F,
    s: SyncSettings,
    locals: watch::Receiver<Option<BTreeSet<IpNet>>>,
    out: watch::Sender<ClusterState>,
    mut stop: oneshot::Receiver<()>,
    lease: Option<LeaseId>,
) where
    S: Store,
    F: FnMut() -> Fut + Send,
    Fut: Future<Output = Result<S, StoreError>> + Send,
{
    let view = (*out.borrow().view).clone();
    let mut t = Task {
        s,
        locals,
        out,
        lease,
        view,
        view_version: 0,
        dirty: false,
        pool_subnet: None,
        last_logged: None,
    };
    let mut backoff = Duration::from_millis(200);
    loop {
        let started = Instant::now();
        let res = tokio::select! {
            _ = &mut stop => return,
            r = connect() => match r {
                Ok(mut st) => t.session(&mut st, &mut stop).await,
                Err(e) => Err(e),
            },
        };
        match res {
            Ok(End::Stopped) => return,
            Err(e) => {
                let line = format!(
                    "etcd {}: {e}; the datapath keeps the last known state, retrying",
                    t.s.endpoints.join(",")
                );
                // One line per kind of trouble while it lasts (a refused
                // TLS handshake alternates between messages); the latest
                // is always in `status`.
                let kind = matches!(e, StoreError::Auth { .. });
                if t.last_logged != Some(kind) {
                    warn!("{line}");
                    t.last_logged = Some(kind);
                } else {
                    debug!("{line}");
                }
                t.out.send_modify(|st| {
                    st.status.connected = false;
                    st.status.last_error = Some(e.to_string());
                });
                if t.dirty {
                    t.save();
                }
            }
        }
        // A session that ran a while failed on its own, not at connect.
        if started.elapsed() > Duration::from_secs(5) {
            backoff = Duration::from_millis(200);
        }
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

impl Task {
    fn save(&mut self) {
        write_snapshot(
            &self.s.snapshot,
            &Snapshot {
                host_id: self.s.host.id.clone(),
                lease: self.lease,
                etcd: Some(self.s.etcd.clone()),
                view: self.view.clone(),
            },
        );
        self.dirty = false;
    }

    /// Hands the current view (and status) to the agent.
    fn publish(&mut self, view_changed: bool, status: impl FnOnce(&mut StoreStatus)) {
        if view_changed {
            self.view_version += 1;
            self.dirty = true;
        }
        let view = view_changed.then(|| Arc::new(self.view.clone()));
        let (version, revision) = (self.view_version, self.view.revision);
        self.out.send_modify(|st| {
            if let Some(v) = view {
                st.view = v;
                st.view_version = version;
            }
            st.status.revision = revision;
            status(&mut st.status);
        });
    }

    async fn session<S: Store>(
        &mut self,
        st: &mut S,
        stop: &mut oneshot::Receiver<()>,
    ) -> Result<End, StoreError> {
        let ttl = self.s.ttl;
        // A lease that outlived a restart (or an outage) keeps its keys.
        let kept = match self.lease {
            Some(id) => st.ttl_left(id).await?.map(|left| (id, left)),
            None => None,
        };
        let (lease, left) = match kept {
            Some(k) => k,
            None => {
                let id = st.grant(ttl).await?;
                info!("etcd: lease {id:x} granted (TTL {ttl} s)");
                (id, ttl)
            }
        };
        self.lease = Some(lease);
        let root = self.s.keys.root();
        // A view from before (an earlier session, or the snapshot) catches
        // up with a watch from its revision, which replays what it missed;
        // one whose revision was compacted, or that is ahead of the store
        // (a store rebuilt from scratch), is listed again.
        let mut resumed = None;
        if self.view.revision > 0 {
            let (_, now) = st.list(&self.s.keys.pool()).await?;
            if self.view.revision <= now {
                match st.watch(&root, self.view.revision + 1).await {
                    Ok(w) => resumed = Some(w),
                    Err(StoreError::Compacted { from, compacted }) => warn!(
                        "etcd: revision {from} was compacted (oldest kept {compacted}); listing again"
                    ),
                    Err(e) => return Err(e),
                }
            }
        }
        let (mut w, rev) = match resumed {
            Some(w) => (w, self.view.revision),
            None => {
                let (kvs, rev) = st.list(&root).await?;
                self.view = View::from_list(&self.s.keys, &kvs, rev);
                (st.watch(&root, rev + 1).await?, rev)
            }
        };
        // Claims are safe on a stale view (create-only, or compare the
        // revision); they run again after every batch of events.
        self.publish_host(st, lease).await?;
        // Until the agent has said which subnets are local (a restarted
        // agent, before its first look at Docker and the bridges), claims
        // stay as the store has them: releasing them would drop this host's
        // routes on every other host for the moment it takes.
        let want = self.locals.borrow_and_update().clone();
        if let Some(want) = want {
            self.claim(st, lease, &want).await?;
        }
        self.pool_network(st, lease).await?;
        if self.last_logged.take().is_some() || kept.is_none() {
            info!(
                "etcd {}: connected, {} host(s), {} subnet(s) at revision {rev}",
                self.s.endpoints.join(","),
                self.view.hosts.len(),
                self.view.subnets.len()
            );
        }
        let endpoints = self.s.endpoints.clone();
        let (prefix, host_id) = (self.s.prefix.clone(), self.s.host.id.clone());
        self.publish(true, |s| {
            s.endpoints = endpoints;
            s.prefix = prefix;
            s.host_id = host_id;
            s.connected = true;
            s.lease = Some(lease);
            s.lease_ttl = ttl;
            s.lease_expires_unix_ms = Some(now_ms() + left as u64 * 1000);
            s.from_snapshot = false;
            s.last_error = None;
        });
        self.save();
        let period = Duration::from_millis((ttl as u64 * 1000 / 3).max(300));
        let mut renew = tokio::time::interval(period);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut snap = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = &mut *stop => {
                    match st.revoke(lease).await {
                        Ok(()) => info!("etcd: lease {lease:x} revoked; the other hosts drop this host's routes now"),
                        Err(e) => warn!("etcd: revoking lease {lease:x}: {e}; the other hosts drop this host when it expires"),
                    }
                    let _ = std::fs::remove_file(&self.s.snapshot);
                    return Ok(End::Stopped);
                }
                // A renewal unanswered for a whole period is given up on a
                // connection that may be stuck: the session reconnects and
                // renews again while the lease still has a third or more
                // of its TTL left.
                _ = renew.tick() => match tokio::time::timeout(period, st.keep_alive(lease))
                    .await
                    .map_err(|_| StoreError::Failed {
                        what: "renewing the lease",
                        message: format!("no answer within {period:?}"),
                    })?? {
                    Some(t) => {
                        self.publish(false, |s| {
                            s.lease_expires_unix_ms = Some(now_ms() + t as u64 * 1000);
                        });
                        self.pool_network(st, lease).await?;
                    }
                    None => {
                        self.lease = None;
                        return Err(StoreError::Failed {
                            what: "renewing the lease",
                            message: format!("lease {lease:x} expired; claiming again under a new one"),
                        });
                    }
                },
                changed = self.locals.changed() => {
                    if changed.is_err() {
                        return Ok(End::Stopped);
                    }
                    let want = self.locals.borrow_and_update().clone();
                    if let Some(want) = want {
                        self.claim(st, lease, &want).await?;
                    }
                    self.pool_network(st, lease).await?;
                }
                events = w.next() => {
                    match events {
                        Ok(ev) => {
                            let changed = self.view.apply(&self.s.keys, &ev);
                            self.publish(changed, |_| {});
                        }
                        Err(StoreError::Compacted { from, compacted }) => {
                            warn!("etcd: watch from revision {from} was compacted (oldest kept {compacted}); listing again");
                            let (kvs, rev) = st.list(&root).await?;
                            self.view = View::from_list(&self.s.keys, &kvs, rev);
                            self.publish(true, |_| {});
                            w = st.watch(&root, rev + 1).await?;
                        }
                        Err(e) => return Err(e),
                    }
                    // Keys of ours that went (deleted by hand, or freed
                    // subnets this host waits for): claim them again.
                    self.publish_host(st, lease).await?;
                    let want = self.locals.borrow().clone();
                    if let Some(want) = want {
                        self.claim(st, lease, &want).await?;
                    }
                    self.pool_network(st, lease).await?;
                }
                _ = snap.tick() => if self.dirty {
                    self.save();
                },
            }
        }
    }

    /// With a pool and Docker: makes sure the pool's Docker network exists.
    async fn pool_network<S: Store>(
        &mut self,
        st: &mut S,
        lease: LeaseId,
    ) -> Result<(), StoreError> {
        let (Some(net), Some(pool)) = (&self.s.pool_network, self.view.pool) else {
            return Ok(());
        };
        if self.pool_subnet.is_some() {
            return Ok(());
        }
        let locals = self.locals.borrow().clone();
        let Some(locals) = locals else {
            return Ok(());
        };
        // The pool is IPv4: only IPv4 locals can collide with it.
        let locals: Vec<Ipv4Net> = locals
            .into_iter()
            .filter_map(|n| match n {
                IpNet::V4(n) => Some(n),
                IpNet::V6(_) => None,
            })
            .collect();
        self.pool_subnet = super::pool::ensure_network(
            st,
            &self.s.keys,
            &self.s.host.id,
            lease,
            &self.view,
            pool,
            &locals,
            net,
        )
        .await?;
        if let Some(n) = self.pool_subnet {
            let mut want = self.locals.borrow().clone().unwrap_or_default();
            want.insert(n.into());
            self.claim(st, lease, &want).await?;
        }
        Ok(())
    }

    /// Creates (or takes over from this host's older lease) the host key.
    async fn publish_host<S: Store>(
        &mut self,
        st: &mut S,
        lease: LeaseId,
    ) -> Result<(), StoreError> {
        let me = &self.s.host;
        let key = self.s.keys.host(&me.id);
        let value = serde_json::to_vec(me).map_err(|e| StoreError::Failed {
            what: "publishing this host",
            message: e.to_string(),
        })?;
        match self.view.hosts.get(&me.id) {
            Some(h) if h.lease == lease && h.record == *me => Ok(()),
            Some(h) if h.record.underlay != me.underlay && h.lease != lease => {
                Err(StoreError::Failed {
                    what: "publishing this host",
                    message: format!(
                        "host id {} is held by the host at {} ({key}): give each host its own --host-id",
                        me.id, h.record.underlay
                    ),
                })
            }
            Some(h) => {
                st.replace(&key, &value, lease, h.mod_revision).await?;
                Ok(())
            }
            // Held but not in the view yet: its event is on the way, and
            // this runs again when it comes.
            None => st.create(&key, &value, lease).await.map(|_| ()),
        }
    }

    /// Claims the local subnets nobody holds, takes over this host's own
    /// from an older lease, and releases those no longer local. A subnet
    /// another host holds is left to it (the plan reports the conflict) and
    /// claimed when its key goes.
    async fn claim<S: Store>(
        &mut self,
        st: &mut S,
        lease: LeaseId,
        want: &BTreeSet<IpNet>,
    ) -> Result<(), StoreError> {
        let mut want = want.clone();
        want.extend(self.pool_subnet.map(IpNet::from));
        let want = &want;
        let value = serde_json::to_vec(&SubnetRecord {
            host: self.s.host.id.clone(),
        })
        .map_err(|e| StoreError::Failed {
            what: "claiming a subnet",
            message: e.to_string(),
        })?;
        for n in want {
            let key = self.s.keys.subnet(n);
            match self.view.subnets.get(n) {
                Some(c) if c.lease == lease => {}
                Some(c) if c.host == self.s.host.id => {
                    st.replace(&key, &value, lease, c.mod_revision).await?;
                }
                Some(_) => {}
                None => {
                    if self.view.bad.contains_key(&key) {
                        continue;
                    }
                    if let Some(held) = st.create(&key, &value, lease).await? {
                        info!(
                            "etcd: subnet {n} is held ({key}, lease {:x}); claimed when freed",
                            held.lease
                        );
                    } else {
                        info!("etcd: subnet {n} claimed ({key})");
                    }
                }
            }
        }
        let mine: Vec<(IpNet, String, LeaseId)> = self
            .view
            .subnets
            .iter()
            .filter(|(n, c)| c.host == self.s.host.id && !want.contains(n))
            .map(|(n, c)| (*n, c.key.clone(), c.lease))
            .collect();
        for (n, key, l) in mine {
            if st.delete_own(&key, l).await? {
                info!("etcd: subnet {n} released ({key})");
            }
        }
        Ok(())
    }
}
