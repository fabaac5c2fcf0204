//! [`Store`] on etcd v3 (the `etcd-client` crate): create-only claims are
//! transactions on `version == 0`, every claim rides the agent's one lease,
//! and the watch starts at the revision the list was read at, as flannel's
//! etcd registry does.

use std::{path::PathBuf, time::Duration};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions,
    Identity, LeaseKeepAliveStream, LeaseKeeper, PutOptions, TlsOptions, Txn, TxnOp, WatchOptions,
    WatchStream,
};

use super::{Event, Kv, LeaseId, Store, StoreError};

/// How to reach the store.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EtcdOptions {
    pub endpoints: Vec<String>,
    pub cafile: Option<PathBuf>,
    pub certfile: Option<PathBuf>,
    pub keyfile: Option<PathBuf>,
    pub username: Option<String>,
    /// Never serialized: the state file is world-readable.
    #[serde(skip)]
    pub password: Option<String>,
}

impl EtcdOptions {
    /// Endpoints reached without TLS (`http://`).
    pub fn plaintext_endpoints(&self) -> Vec<&str> {
        self.endpoints
            .iter()
            .filter(|e| !e.starts_with("https://"))
            .map(String::as_str)
            .collect()
    }
}

/// One request's deadline. Watches and keep-alive streams have none: they
/// end when the connection does.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// An etcd connection.
pub struct Etcd {
    client: Client,
    keeper: Option<(LeaseId, LeaseKeeper, LeaseKeepAliveStream)>,
}

/// etcd-client's error as one line: the gRPC status' code and message, or
/// the transport error's whole cause chain.
fn describe(e: &etcd_client::Error) -> (bool, String) {
    let (mut msg, mut src) = match e {
        etcd_client::Error::GRpcStatus(s) => {
            // tonic::Code: 7 PermissionDenied, 16 Unauthenticated.
            // etcd 3.4 answers a wrong password with InvalidArgument.
            if matches!(s.code() as i32, 7 | 16) || s.message().contains("authentication failed") {
                return (true, format!("{:?}: {}", s.code(), s.message()));
            }
            // A transport failure (refused, TLS handshake) hides in the
            // status' source.
            (
                format!("{:?}: {}", s.code(), s.message()),
                std::error::Error::source(s),
            )
        }
        _ => (e.to_string(), std::error::Error::source(e)),
    };
    while let Some(s) = src {
        let part = s.to_string();
        if !msg.contains(&part) {
            msg.push_str(": ");
            msg.push_str(&part);
        }
        src = s.source();
    }
    let auth = msg.contains("authentication failed") || msg.contains("invalid user ID");
    (auth, msg)
}

fn err(what: &'static str) -> impl Fn(etcd_client::Error) -> StoreError {
    move |e| {
        let (auth, message) = describe(&e);
        if auth {
            StoreError::Auth { what, message }
        } else {
            StoreError::Failed { what, message }
        }
    }
}

async fn timed<T>(
    what: &'static str,
    f: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(REQUEST_TIMEOUT, f).await {
        Ok(r) => r.map_err(err(what)),
        Err(_) => Err(StoreError::Failed {
            what,
            message: format!("no answer within {REQUEST_TIMEOUT:?}"),
        }),
    }
}

fn read_pem(what: &'static str, path: &std::path::Path) -> Result<Vec<u8>, StoreError> {
    std::fs::read(path).map_err(|e| StoreError::Failed {
        what,
        message: format!("reading {}: {e}", path.display()),
    })
}

impl Etcd {
    /// Connects (and authenticates, with a user name). Nothing is sent
    /// without credentials, so an unreachable store shows on the first
    /// request.
    pub async fn connect(o: &EtcdOptions) -> Result<Self, StoreError> {
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            // HTTP/2 pings notice a store that vanished without closing the
            // connection (a cut link) within about 4 s.
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_keep_alive_while_idle(true);
        if let (Some(u), Some(p)) = (&o.username, &o.password) {
            opts = opts.with_user(u.clone(), p.clone());
        }
        if o.cafile.is_some() || o.certfile.is_some() {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &o.cafile {
                tls = tls.ca_certificate(Certificate::from_pem(read_pem("etcd CA", ca)?));
            }
            if let (Some(c), Some(k)) = (&o.certfile, &o.keyfile) {
                tls = tls.identity(Identity::from_pem(
                    read_pem("etcd client certificate", c)?,
                    read_pem("etcd client key", k)?,
                ));
            }
            opts = opts.with_tls(tls);
        }
        let client = timed(
            "connecting to etcd",
            Client::connect(&o.endpoints, Some(opts)),
        )
        .await?;
        Ok(Self {
            client,
            keeper: None,
        })
    }
}

fn kv(k: &etcd_client::KeyValue) -> Kv {
    Kv {
        key: String::from_utf8_lossy(k.key()).into_owned(),
        value: k.value().to_vec(),
        create_revision: k.create_revision(),
        mod_revision: k.mod_revision(),
        lease: k.lease(),
    }
}

impl Store for Etcd {
    type Watch = EtcdWatch;

    async fn grant(&mut self, ttl: i64) -> Result<LeaseId, StoreError> {
        let r = timed("granting a lease", self.client.lease_grant(ttl, None)).await?;
        Ok(r.id())
    }

    async fn ttl_left(&mut self, lease: LeaseId) -> Result<Option<i64>, StoreError> {
        let r = timed(
            "reading a lease",
            self.client.lease_time_to_live(lease, None),
        )
        .await?;
        // etcd answers TTL -1 for a lease it does not know.
        Ok((r.ttl() > 0).then_some(r.ttl()))
    }

    async fn keep_alive(&mut self, lease: LeaseId) -> Result<Option<i64>, StoreError> {
        if self.keeper.as_ref().is_none_or(|(id, _, _)| *id != lease) {
            let (k, s) = timed("renewing the lease", self.client.lease_keep_alive(lease)).await?;
            self.keeper = Some((lease, k, s));
        }
        let Some((_, keeper, stream)) = self.keeper.as_mut() else {
            return Ok(None);
        };
        let res = async {
            keeper.keep_alive().await?;
            stream.message().await
        };
        match timed("renewing the lease", res).await {
            Ok(Some(r)) => Ok((r.ttl() > 0).then_some(r.ttl())),
            Ok(None) => {
                self.keeper = None;
                Err(StoreError::Failed {
                    what: "renewing the lease",
                    message: "keep-alive stream closed".into(),
                })
            }
            Err(e) => {
                self.keeper = None;
                Err(e)
            }
        }
    }

    async fn revoke(&mut self, lease: LeaseId) -> Result<(), StoreError> {
        self.keeper = None;
        timed("revoking the lease", self.client.lease_revoke(lease)).await?;
        Ok(())
    }

    async fn create(
        &mut self,
        key: &str,
        value: &[u8],
        lease: LeaseId,
    ) -> Result<Option<Kv>, StoreError> {
        let txn = Txn::new()
            .when([Compare::version(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key,
                value,
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else([TxnOp::get(key, None)]);
        let r = timed("claiming a key", self.client.txn(txn)).await?;
        if r.succeeded() {
            return Ok(None);
        }
        for op in r.op_responses() {
            if let etcd_client::TxnOpResponse::Get(g) = op
                && let Some(k) = g.kvs().first()
            {
                return Ok(Some(kv(k)));
            }
        }
        // Deleted between the compare and the get: try again next time.
        Err(StoreError::Failed {
            what: "claiming a key",
            message: format!("{key} changed during the claim"),
        })
    }

    async fn replace(
        &mut self,
        key: &str,
        value: &[u8],
        lease: LeaseId,
        mod_revision: i64,
    ) -> Result<bool, StoreError> {
        let txn = Txn::new()
            .when([Compare::mod_revision(key, CompareOp::Equal, mod_revision)])
            .and_then([TxnOp::put(
                key,
                value,
                Some(PutOptions::new().with_lease(lease)),
            )]);
        let r = timed("taking over a key", self.client.txn(txn)).await?;
        Ok(r.succeeded())
    }

    async fn delete_own(&mut self, key: &str, lease: LeaseId) -> Result<bool, StoreError> {
        let txn = Txn::new()
            .when([Compare::lease(key, CompareOp::Equal, lease)])
            .and_then([TxnOp::delete(key, None::<DeleteOptions>)]);
        let r = timed("releasing a key", self.client.txn(txn)).await?;
        Ok(r.succeeded())
    }

    async fn create_permanent(&mut self, key: &str, value: &[u8]) -> Result<bool, StoreError> {
        let txn = Txn::new()
            .when([Compare::version(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, value, None)]);
        let r = timed("writing a setting", self.client.txn(txn)).await?;
        Ok(r.succeeded())
    }

    async fn list(&mut self, prefix: &str) -> Result<(Vec<Kv>, i64), StoreError> {
        let r = timed(
            "listing the prefix",
            self.client
                .get(prefix, Some(GetOptions::new().with_prefix())),
        )
        .await?;
        let rev = r.header().map_or(0, |h| h.revision());
        Ok((r.kvs().iter().map(kv).collect(), rev))
    }

    async fn watch(&mut self, prefix: &str, from: i64) -> Result<EtcdWatch, StoreError> {
        let mut stream = timed(
            "watching the prefix",
            self.client.watch(
                prefix,
                Some(WatchOptions::new().with_prefix().with_start_revision(from)),
            ),
        )
        .await?;
        // The first reply confirms the watch; a compacted start revision
        // cancels it right there.
        let first = timed("watching the prefix", stream.message()).await?;
        let mut w = EtcdWatch {
            stream,
            from,
            pending: Vec::new(),
        };
        match first {
            Some(r) => w.pending = w.events_of(&r)?,
            None => return Err(StoreError::WatchClosed),
        }
        Ok(w)
    }
}

/// An etcd watch over the prefix.
pub struct EtcdWatch {
    stream: WatchStream,
    from: i64,
    /// Events that came with the watch's "created" reply.
    pending: Vec<Event>,
}

impl EtcdWatch {
    fn events_of(&self, r: &etcd_client::WatchResponse) -> Result<Vec<Event>, StoreError> {
        if r.compact_revision() > 0 {
            return Err(StoreError::Compacted {
                from: self.from,
                compacted: r.compact_revision(),
            });
        }
        if r.canceled() {
            return Err(StoreError::Failed {
                what: "watching the prefix",
                message: format!("watch canceled: {}", r.cancel_reason()),
            });
        }
        Ok(r.events()
            .iter()
            .filter_map(|e| {
                let k = e.kv()?;
                Some(match e.event_type() {
                    EventType::Put => Event::Put(kv(k)),
                    EventType::Delete => Event::Delete {
                        key: String::from_utf8_lossy(k.key()).into_owned(),
                    },
                })
            })
            .collect())
    }
}

impl super::Watch for EtcdWatch {
    async fn next(&mut self) -> Result<Vec<Event>, StoreError> {
        if !self.pending.is_empty() {
            return Ok(std::mem::take(&mut self.pending));
        }
        loop {
            let r = self
                .stream
                .message()
                .await
                .map_err(err("watching the prefix"))?
                .ok_or(StoreError::WatchClosed)?;
            let events = self.events_of(&r)?;
            if let Some(h) = r.header() {
                self.from = h.revision() + 1;
            }
            if !events.is_empty() {
                return Ok(events);
            }
        }
    }
}
