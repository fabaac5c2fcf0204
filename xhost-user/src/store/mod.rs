//! The cluster store: a source of desired state. Each agent publishes its
//! host and its local container subnets under one lease and learns the other
//! hosts' subnets, which join the config's peers on their way to the single
//! writer (`agent.rs`). [`Store`] is the small key-value surface the cluster
//! logic needs (leases, create-only claims, list, watch from a revision);
//! etcd v3 is the engine behind it ([`etcd`]), so another could be added.
//!
//! Layout under the prefix (default `/xhost/v1`):
//! ```text
//! <prefix>/hosts/<host-id>          {"id","underlay","mode":{...}}   leased
//! <prefix>/subnets/<a.b.c.d>-<len>  {"host":"<host-id>"}             leased
//! <prefix>/config/pool              {"pool":"10.200.0.0/16","host_prefix":24}
//! ```

pub mod etcd;
pub mod pool;
pub mod source;
pub mod sync;
pub mod view;

use std::future::Future;

/// A lease id as the store hands it out.
pub type LeaseId = i64;

/// One key as the store holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kv {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision of the key's creation: the older claim wins a conflict.
    pub create_revision: i64,
    pub mod_revision: i64,
    /// 0 when the key has no lease.
    pub lease: LeaseId,
}

/// A change under the watched prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Put(Kv),
    Delete { key: String },
}

/// What went wrong talking to the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The watch's start revision was compacted away: list again.
    #[error("watch from revision {from} was compacted (oldest kept {compacted})")]
    Compacted { from: i64, compacted: i64 },
    /// The store answered with an authentication or permission error.
    #[error("{what}: {message}")]
    Auth { what: &'static str, message: String },
    /// Unreachable, timed out, or any other failure of one request.
    #[error("{what}: {message}")]
    Failed { what: &'static str, message: String },
    /// The watch stream ended.
    #[error("watch stream closed by the store")]
    WatchClosed,
}

/// The operations the cluster logic needs from a store.
pub trait Store: Send {
    type Watch: Watch;

    /// A new lease of `ttl` seconds.
    fn grant(&mut self, ttl: i64) -> impl Future<Output = Result<LeaseId, StoreError>> + Send;
    /// Seconds left on `lease`; `None` when it is gone.
    fn ttl_left(
        &mut self,
        lease: LeaseId,
    ) -> impl Future<Output = Result<Option<i64>, StoreError>> + Send;
    /// Renews `lease`; returns its TTL, `None` when it is gone.
    fn keep_alive(
        &mut self,
        lease: LeaseId,
    ) -> impl Future<Output = Result<Option<i64>, StoreError>> + Send;
    /// Revokes `lease`: every key under it goes at once.
    fn revoke(&mut self, lease: LeaseId) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Creates `key` under `lease` only if nobody holds it. `Ok(None)`:
    /// created; `Ok(Some(kv))`: held, by `kv`.
    fn create(
        &mut self,
        key: &str,
        value: &[u8],
        lease: LeaseId,
    ) -> impl Future<Output = Result<Option<Kv>, StoreError>> + Send;
    /// Rewrites `key` under `lease` if it is still at `mod_revision` (taking
    /// over this host's own key from an older lease). Whether it did.
    fn replace(
        &mut self,
        key: &str,
        value: &[u8],
        lease: LeaseId,
        mod_revision: i64,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
    /// Deletes `key` if it is held under `lease`. Whether it did.
    fn delete_own(
        &mut self,
        key: &str,
        lease: LeaseId,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
    /// Writes `key` without a lease if nobody holds it (cluster-wide
    /// settings). Whether it did.
    fn create_permanent(
        &mut self,
        key: &str,
        value: &[u8],
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
    /// Every key under `prefix` and the revision they were read at.
    fn list(
        &mut self,
        prefix: &str,
    ) -> impl Future<Output = Result<(Vec<Kv>, i64), StoreError>> + Send;
    /// Changes under `prefix` from revision `from` (inclusive) on.
    fn watch(
        &mut self,
        prefix: &str,
        from: i64,
    ) -> impl Future<Output = Result<Self::Watch, StoreError>> + Send;
}

/// A stream of changes from [`Store::watch`].
pub trait Watch: Send {
    /// The next batch of events (one store revision or more), in order.
    fn next(&mut self) -> impl Future<Output = Result<Vec<Event>, StoreError>> + Send;
}
