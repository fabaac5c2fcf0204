//! Subnet allocation from a cluster pool, so no host needs a hand-picked
//! `--bip`: `xhost-user cluster init --pool 10.200.0.0/16 --host-prefix 24`
//! stores the pool; each agent that follows Docker claims a free
//! `--host-prefix` subnet of it (create-only, under its lease, like any
//! claim) and creates a Docker bridge network with it through the Engine
//! API. The network outlives the agent, so a restart finds it and keeps the
//! same subnet.

use std::{collections::HashMap, net::Ipv4Addr};

use bollard::models::{Ipam, IpamConfig, NetworkCreateRequest};
use log::{info, warn};
use serde::{Deserialize, Serialize};

use super::{
    LeaseId, Store, StoreError,
    view::{Keys, SubnetRecord, View},
};
use crate::net::Ipv4Net;

/// `<prefix>/config/pool`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pool {
    pub pool: Ipv4Net,
    pub host_prefix: u8,
}

impl Pool {
    /// Checks a pool as `cluster init` is given it.
    pub fn new(pool: Ipv4Net, host_prefix: u8) -> Result<Self, String> {
        if host_prefix <= pool.prefix_len() || host_prefix > 30 {
            return Err(format!(
                "--host-prefix {host_prefix}: must be longer than the pool's /{} and at most 30",
                pool.prefix_len()
            ));
        }
        if host_prefix - pool.prefix_len() > 20 {
            return Err(format!(
                "--host-prefix {host_prefix}: more than 2^20 host subnets in {pool}"
            ));
        }
        Ok(Self { pool, host_prefix })
    }

    /// The host subnets of the pool, in order.
    pub fn subnets(&self) -> impl Iterator<Item = Ipv4Net> + '_ {
        let n = 1u32 << (self.host_prefix - self.pool.prefix_len());
        let step = 1u32 << (32 - self.host_prefix);
        let base = u32::from(self.pool.addr());
        (0..n).map(move |i| Ipv4Net::containing(Ipv4Addr::from(base + i * step), self.host_prefix))
    }

    /// The first subnet nobody claims and no local subnet overlaps.
    pub fn free(&self, view: &View, locals: &[Ipv4Net]) -> Option<Ipv4Net> {
        self.subnets().find(|n| {
            !locals.iter().any(|l| l.overlaps(n))
                && !view.subnets.keys().any(|c| c.overlaps(&(*n).into()))
        })
    }
}

/// `cluster init`: stores the pool unless one is set. Returns what is set.
pub async fn init<S: Store>(st: &mut S, keys: &Keys, pool: Pool) -> Result<Pool, String> {
    let value = serde_json::to_vec(&pool).map_err(|e| e.to_string())?;
    if st
        .create_permanent(&keys.pool(), &value)
        .await
        .map_err(|e| e.to_string())?
    {
        return Ok(pool);
    }
    let (kvs, _) = st.list(&keys.pool()).await.map_err(|e| e.to_string())?;
    let set = kvs
        .first()
        .and_then(|k| serde_json::from_slice::<Pool>(&k.value).ok())
        .ok_or_else(|| format!("{} holds something that is not a pool", keys.pool()))?;
    if set == pool {
        Ok(set)
    } else {
        Err(format!(
            "the cluster already has pool {} with host prefix /{} ({}); delete that key to change it",
            set.pool,
            set.host_prefix,
            keys.pool()
        ))
    }
}

/// Where the agent's pool network lives.
#[derive(Clone, Debug)]
pub struct PoolNetwork {
    pub docker_host: Option<String>,
    /// Docker network name (default `xhost`).
    pub name: String,
}

/// Default name of the pool's Docker network.
pub const DEFAULT_NETWORK: &str = "xhost";

/// Makes sure the Docker network `net.name` exists with a subnet of the
/// pool: an existing one is kept (the same subnet across restarts);
/// otherwise a free subnet is claimed under `lease` and the network created
/// with it. Docker errors are logged and retried later (`Ok(None)`); only
/// store errors end the session. `Ok(Some(subnet))`: the network is there.
#[expect(clippy::too_many_arguments, reason = "one call site, all plain inputs")]
pub async fn ensure_network<S: Store>(
    st: &mut S,
    keys: &Keys,
    host_id: &str,
    lease: LeaseId,
    view: &View,
    pool: Pool,
    locals: &[Ipv4Net],
    net: &PoolNetwork,
) -> Result<Option<Ipv4Net>, StoreError> {
    let docker = match crate::docker::client(net.docker_host.as_deref()).await {
        Ok(d) => d,
        Err(e) => {
            warn!(
                "pool network {}: Docker unreachable: {e}; trying again later",
                net.name
            );
            return Ok(None);
        }
    };
    match docker.inspect_network(&net.name, None).await {
        Ok(n) => {
            let subnet = n
                .ipam
                .and_then(|i| i.config)
                .and_then(|c| c.into_iter().find_map(|c| c.subnet))
                .and_then(|s| s.parse::<Ipv4Net>().ok());
            match subnet {
                Some(s) => info!("pool network {}: exists with {s}; kept", net.name),
                None => warn!(
                    "pool network {}: exists without an IPv4 subnet; left as it is",
                    net.name
                ),
            }
            return Ok(subnet);
        }
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => {}
        Err(e) => {
            warn!("pool network {}: {e}; trying again later", net.name);
            return Ok(None);
        }
    }
    let value = serde_json::to_vec(&SubnetRecord {
        host: host_id.to_owned(),
    })
    .map_err(|e| StoreError::Failed {
        what: "claiming a pool subnet",
        message: e.to_string(),
    })?;
    let mut taken: Vec<Ipv4Net> = locals.to_vec();
    let subnet = loop {
        let Some(n) = pool.free(view, &taken) else {
            warn!(
                "pool {}: no free /{} left for network {}",
                pool.pool, pool.host_prefix, net.name
            );
            return Ok(None);
        };
        match st.create(&keys.subnet(&n.into()), &value, lease).await? {
            None => break n,
            // Claimed by another host since the view was read.
            Some(_) => taken.push(n),
        }
    };
    let gateway = Ipv4Addr::from(u32::from(subnet.addr()) + 1);
    let req = NetworkCreateRequest {
        name: net.name.clone(),
        driver: Some("bridge".into()),
        ipam: Some(Ipam {
            config: Some(vec![IpamConfig {
                subnet: Some(subnet.to_string()),
                gateway: Some(gateway.to_string()),
                ..IpamConfig::default()
            }]),
            ..Ipam::default()
        }),
        options: Some(HashMap::new()),
        ..NetworkCreateRequest::default()
    };
    match docker.create_network(req).await {
        Ok(_) => {
            info!(
                "pool network {}: created with {subnet} (claimed from pool {})",
                net.name, pool.pool
            );
            Ok(Some(subnet))
        }
        Err(e) => {
            warn!(
                "pool network {}: creating it with {subnet}: {e}; trying again later",
                net.name
            );
            st.delete_own(&keys.subnet(&subnet.into()), lease).await?;
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_subnets_and_free() {
        let p = Pool::new("10.200.0.0/16".parse().expect("cidr"), 24).expect("pool");
        let all: Vec<_> = p.subnets().take(3).map(|n| n.to_string()).collect();
        assert_eq!(all, ["10.200.0.0/24", "10.200.1.0/24", "10.200.2.0/24"]);
        assert_eq!(p.subnets().count(), 256);
        let mut v = View::default();
        v.subnets.insert(
            "10.200.0.0/24".parse().expect("cidr"),
            super::super::view::Claim {
                key: String::new(),
                host: "b".into(),
                create_revision: 1,
                mod_revision: 1,
                lease: 1,
            },
        );
        let locals = ["10.200.1.0/25".parse().expect("cidr")];
        assert_eq!(
            p.free(&v, &locals).map(|n| n.to_string()).as_deref(),
            Some("10.200.2.0/24")
        );
        assert!(Pool::new("10.200.0.0/16".parse().expect("cidr"), 16).is_err());
    }
}
