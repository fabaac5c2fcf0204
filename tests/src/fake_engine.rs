//! A Docker Engine API server played by the test, on a unix socket: the
//! requests the agent's Docker watcher makes (bollard: `/version`,
//! `/_ping`, `/networks`, `/networks/{id}`, `/containers/json`,
//! `/containers/{id}/json`, and the `/events` stream), answered in the
//! shape of Docker 20.10 (API 1.41). Its containers are what the test says
//! they are: each names a real network namespace (a process in it, its
//! `SandboxKey`) with a real veth on a real bridge, so an agent following
//! this engine does all its real work per event (inspect, find the host
//! veth from inside the namespace, attach and detach the veth's program,
//! write and remove the endpoint), without the ~0.3 s a real `docker run`
//! takes here. The server is hyper's (already in the workspace for the
//! agent's metrics endpoint) on a tokio runtime of its own thread.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{SystemTime, UNIX_EPOCH},
};

use http_body_util::{BodyExt as _, Full, combinators::BoxBody};
use hyper::{
    Request, Response, StatusCode,
    body::{Bytes, Frame, Incoming},
    header::CONTENT_TYPE,
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use crate::{Error, Ipv4Net, Result};

/// The engine version and API version the server reports.
pub const ENGINE_VERSION: &str = "20.10.24";
pub const API_VERSION: &str = "1.41";

/// The one bridge network the engine has.
#[derive(Clone, Debug)]
pub struct Network {
    /// 64 hex digits, as Docker's.
    pub id: String,
    pub name: String,
    /// The bridge device (`com.docker.network.bridge.name`).
    pub bridge: String,
    pub subnet: Ipv4Net,
    pub gateway: Ipv4Addr,
    /// The IPv6 subnet and gateway of a dual-stack network (`EnableIPv6`).
    pub ipv6: Option<(ipnet::Ipv6Net, Ipv6Addr)>,
}

/// A running container as `docker inspect` shows it.
#[derive(Clone, Debug)]
pub struct Container {
    /// 64 hex digits.
    pub id: String,
    pub name: String,
    /// A process in the container's network namespace (`State.Pid`).
    pub pid: u32,
    /// The namespace's path (`NetworkSettings.SandboxKey`).
    pub sandbox: PathBuf,
    pub ip: Ipv4Addr,
    /// Its address on a dual-stack network (`GlobalIPv6Address`).
    pub ip6: Option<Ipv6Addr>,
    /// `02:42:...`, the MAC of the container's interface.
    pub mac: String,
}

/// What the engine was asked, by request kind.
#[derive(Debug, Default)]
pub struct Requests {
    pub container_inspects: AtomicU64,
    pub container_lists: AtomicU64,
    pub event_streams: AtomicU64,
    pub other: AtomicU64,
}

#[derive(Default)]
struct State {
    containers: BTreeMap<String, Container>,
    /// Networks listed and answered as given (see [`FakeEngine::add_raw_network`]).
    raw_networks: Vec<serde_json::Value>,
    /// The open `/events` streams.
    subscribers: Vec<mpsc::UnboundedSender<Bytes>>,
}

struct Shared {
    network: Network,
    state: Mutex<State>,
    requests: Requests,
}

/// The server; stopped, and its socket removed, on drop.
pub struct FakeEngine {
    socket: PathBuf,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeEngine {
    /// Serves `network` at `socket` (which must not exist).
    pub fn start(socket: &Path, network: Network) -> Result<Self> {
        let io = |what: &str, source| Error::Io {
            what: format!("{what} {}", socket.display()),
            source,
        };
        let listener =
            std::os::unix::net::UnixListener::bind(socket).map_err(|e| io("binding", e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| io("configuring", e))?;
        let shared = Arc::new(Shared {
            network,
            state: Mutex::new(State::default()),
            requests: Requests::default(),
        });
        let (stop, stopped) = oneshot::channel();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| io("a runtime for", e))?;
        let served = shared.clone();
        let thread = std::thread::Builder::new()
            .name("fake-engine".into())
            .spawn(move || rt.block_on(serve(listener, served, stopped)))
            .map_err(|e| io("a thread for", e))?;
        Ok(Self {
            socket: socket.to_owned(),
            shared,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// `unix://...`, for `--docker-host`.
    pub fn host(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    pub fn requests(&self) -> &Requests {
        &self.shared.requests
    }

    /// The engine's `/events` streams open now.
    pub fn streams(&self) -> usize {
        let mut st = self.shared.state.lock().expect("engine state");
        st.subscribers.retain(|s| !s.is_closed());
        st.subscribers.len()
    }

    /// The container is running from now on: listed, inspectable, and a
    /// `start` event on every stream.
    pub fn start_container(&self, c: Container) {
        let mut st = self.shared.state.lock().expect("engine state");
        let event = event(&c, "start", &[]);
        st.containers.insert(c.id.clone(), c);
        publish(&mut st, &event);
    }

    /// A network the engine lists and answers exactly as `answer` (the
    /// shape of `/networks/{id}`), for answers an agent cannot use: another
    /// driver, no IPv4 subnet, an unreadable one. Found by its `Id` or `Name`.
    pub fn add_raw_network(&self, answer: serde_json::Value) {
        let mut st = self.shared.state.lock().expect("engine state");
        st.raw_networks.push(answer);
    }

    /// The container exited and is gone (as `docker run --rm`): a `die`
    /// event, and inspecting it answers 404.
    pub fn stop_container(&self, id: &str) {
        let mut st = self.shared.state.lock().expect("engine state");
        if let Some(c) = st.containers.remove(id) {
            let event = event(&c, "die", &[("exitCode", "0")]);
            publish(&mut st, &event);
        }
    }
}

impl Drop for FakeEngine {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn publish(st: &mut State, event: &serde_json::Value) {
    let mut line = event.to_string();
    line.push('\n');
    let bytes = Bytes::from(line);
    st.subscribers.retain(|s| s.send(bytes.clone()).is_ok());
}

fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default()
}

/// A container event as Docker 20.10 streams it.
fn event(c: &Container, action: &str, extra: &[(&str, &str)]) -> serde_json::Value {
    let mut attributes = serde_json::Map::new();
    attributes.insert("image".into(), json!("xhost-test/busybox:latest"));
    attributes.insert("name".into(), json!(c.name));
    for (k, v) in extra {
        attributes.insert((*k).into(), json!(v));
    }
    let nanos = now_nanos();
    json!({
        "status": action,
        "id": c.id,
        "from": "xhost-test/busybox:latest",
        "Type": "container",
        "Action": action,
        "Actor": {"ID": c.id, "Attributes": attributes},
        "scope": "local",
        "time": nanos / 1_000_000_000,
        "timeNano": nanos,
    })
}

async fn serve(
    listener: std::os::unix::net::UnixListener,
    shared: Arc<Shared>,
    mut stopped: oneshot::Receiver<()>,
) {
    let Ok(listener) = tokio::net::UnixListener::from_std(listener) else {
        return;
    };
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let shared = shared.clone();
                conns.spawn(async move {
                    let service = service_fn(move |req| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(respond(&req, &shared)) }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        }
    }
    conns.abort_all();
}

type Body = BoxBody<Bytes, Infallible>;

fn reply(status: StatusCode, body: serde_json::Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "application/json")
        .header("Api-Version", API_VERSION)
        .header("Server", format!("Docker/{ENGINE_VERSION} (linux)"))
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .unwrap_or_default()
}

fn not_found(what: &str) -> Response<Body> {
    reply(StatusCode::NOT_FOUND, json!({ "message": what }))
}

/// The path without its `/v1.41` prefix.
fn route(path: &str) -> &str {
    match path.strip_prefix("/v") {
        Some(rest) if rest.starts_with(|c: char| c.is_ascii_digit()) => {
            rest.find('/').map_or("/", |i| &rest[i..])
        }
        _ => path,
    }
}

fn respond(req: &Request<Incoming>, shared: &Shared) -> Response<Body> {
    let r = &shared.requests;
    let path = route(req.uri().path());
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match segments.as_slice() {
        ["_ping"] => {
            r.other.fetch_add(1, Ordering::Relaxed);
            Response::builder()
                .header(CONTENT_TYPE, "text/plain; charset=utf-8")
                .header("Api-Version", API_VERSION)
                .body(Full::new(Bytes::from_static(b"OK")).boxed())
                .unwrap_or_default()
        }
        ["version"] => {
            r.other.fetch_add(1, Ordering::Relaxed);
            reply(
                StatusCode::OK,
                json!({
                    "Platform": {"Name": ""},
                    "Version": ENGINE_VERSION,
                    "ApiVersion": API_VERSION,
                    "MinAPIVersion": "1.12",
                    "GitCommit": "e63daec",
                    "GoVersion": "go1.19.10",
                    "Os": "linux",
                    "Arch": "amd64",
                    "KernelVersion": "6.1.0",
                }),
            )
        }
        ["networks"] => {
            r.other.fetch_add(1, Ordering::Relaxed);
            let st = shared.state.lock().expect("engine state");
            let mut list = vec![network_json(&shared.network)];
            list.extend(st.raw_networks.iter().cloned());
            reply(StatusCode::OK, json!(list))
        }
        ["networks", id] => {
            r.other.fetch_add(1, Ordering::Relaxed);
            let n = &shared.network;
            let st = shared.state.lock().expect("engine state");
            let raw = st
                .raw_networks
                .iter()
                .find(|v| v["Id"] == json!(id) || v["Name"] == json!(id));
            if *id == n.id || *id == n.name || n.id.starts_with(id) {
                reply(StatusCode::OK, network_json(n))
            } else if let Some(v) = raw {
                reply(StatusCode::OK, v.clone())
            } else {
                not_found(&format!("network {id} not found"))
            }
        }
        ["containers", "json"] => {
            r.container_lists.fetch_add(1, Ordering::Relaxed);
            let st = shared.state.lock().expect("engine state");
            let list: Vec<_> = st
                .containers
                .values()
                .map(|c| list_json(c, &shared.network))
                .collect();
            reply(StatusCode::OK, json!(list))
        }
        ["containers", id, "json"] => {
            r.container_inspects.fetch_add(1, Ordering::Relaxed);
            let st = shared.state.lock().expect("engine state");
            match st.containers.get(*id) {
                Some(c) => reply(StatusCode::OK, inspect_json(c, &shared.network)),
                None => not_found(&format!("No such container: {id}")),
            }
        }
        ["events"] => {
            r.event_streams.fetch_add(1, Ordering::Relaxed);
            let (tx, rx) = mpsc::unbounded_channel();
            shared
                .state
                .lock()
                .expect("engine state")
                .subscribers
                .push(tx);
            Response::builder()
                .header(CONTENT_TYPE, "application/json")
                .header("Api-Version", API_VERSION)
                .body(Events(rx).boxed())
                .unwrap_or_default()
        }
        _ => {
            r.other.fetch_add(1, Ordering::Relaxed);
            not_found(&format!("page not found: {path}"))
        }
    }
}

/// The `/events` body: one JSON object a line, as the engine sends them.
struct Events(mpsc::UnboundedReceiver<Bytes>);

impl hyper::body::Body for Events {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<std::result::Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

fn network_json(n: &Network) -> serde_json::Value {
    let mut config =
        vec![json!({"Subnet": n.subnet.to_string(), "Gateway": n.gateway.to_string()})];
    if let Some((net, gw)) = n.ipv6 {
        config.push(json!({"Subnet": net.to_string(), "Gateway": gw.to_string()}));
    }
    json!({
        "Name": n.name,
        "Id": n.id,
        "Created": "2026-01-01T00:00:00.000000000Z",
        "Scope": "local",
        "Driver": "bridge",
        "EnableIPv6": n.ipv6.is_some(),
        "IPAM": {
            "Driver": "default",
            "Options": null,
            "Config": config,
        },
        "Internal": false,
        "Attachable": false,
        "Ingress": false,
        "ConfigFrom": {"Network": ""},
        "ConfigOnly": false,
        "Containers": {},
        "Options": {
            "com.docker.network.bridge.default_bridge": "true",
            "com.docker.network.bridge.enable_icc": "true",
            "com.docker.network.bridge.enable_ip_masquerade": "true",
            "com.docker.network.bridge.host_binding_ipv4": "0.0.0.0",
            "com.docker.network.bridge.name": n.bridge,
            "com.docker.network.driver.mtu": "1500",
        },
        "Labels": {},
    })
}

fn endpoint_json(c: &Container, n: &Network) -> serde_json::Value {
    let (gw6, prefix6) = n.ipv6.map_or((String::new(), 0), |(net, gw)| {
        (gw.to_string(), net.prefix_len())
    });
    let ip6 = c.ip6.map(|a| a.to_string()).unwrap_or_default();
    let prefix6 = if c.ip6.is_some() { prefix6 } else { 0 };
    json!({
        "IPAMConfig": null,
        "Links": null,
        "Aliases": null,
        "NetworkID": n.id,
        "EndpointID": format!("{:0>64}", &c.id[..16]),
        "Gateway": n.gateway.to_string(),
        "IPAddress": c.ip.to_string(),
        "IPPrefixLen": n.subnet.prefix_len(),
        "IPv6Gateway": gw6,
        "GlobalIPv6Address": ip6,
        "GlobalIPv6PrefixLen": prefix6,
        "MacAddress": c.mac,
        "DriverOpts": null,
    })
}

fn list_json(c: &Container, n: &Network) -> serde_json::Value {
    json!({
        "Id": c.id,
        "Names": [format!("/{}", c.name)],
        "Image": "xhost-test/busybox:latest",
        "Command": "sleep 3600",
        "Created": 1_767_225_600,
        "Ports": [],
        "Labels": {},
        "State": "running",
        "Status": "Up 1 second",
        "HostConfig": {"NetworkMode": n.name},
        "NetworkSettings": {"Networks": {n.name.clone(): endpoint_json(c, n)}},
        "Mounts": [],
    })
}

fn inspect_json(c: &Container, n: &Network) -> serde_json::Value {
    json!({
        "Id": c.id,
        "Created": "2026-01-01T00:00:00.000000000Z",
        "Path": "sleep",
        "Args": ["3600"],
        "State": {
            "Status": "running",
            "Running": true,
            "Paused": false,
            "Restarting": false,
            "OOMKilled": false,
            "Dead": false,
            "Pid": c.pid,
            "ExitCode": 0,
            "Error": "",
            "StartedAt": "2026-01-01T00:00:00.000000000Z",
            "FinishedAt": "0001-01-01T00:00:00Z",
        },
        "Image": "sha256:0000000000000000000000000000000000000000000000000000000000000000",
        "Name": format!("/{}", c.name),
        "RestartCount": 0,
        "Driver": "overlay2",
        "Platform": "linux",
        "HostConfig": {"NetworkMode": n.name},
        "Config": {"Hostname": &c.id[..12], "Image": "xhost-test/busybox:latest"},
        "NetworkSettings": {
            "Bridge": "",
            "SandboxID": &c.id,
            "HairpinMode": false,
            "LinkLocalIPv6Address": "",
            "LinkLocalIPv6PrefixLen": 0,
            "Ports": {},
            "SandboxKey": c.sandbox.display().to_string(),
            "Gateway": n.gateway.to_string(),
            "IPAddress": c.ip.to_string(),
            "IPPrefixLen": n.subnet.prefix_len(),
            "MacAddress": c.mac,
            "Networks": {n.name.clone(): endpoint_json(c, n)},
        },
    })
}

#[cfg(test)]
mod tests {
    use super::route;

    #[test]
    fn versioned_paths_route_as_unversioned() {
        assert_eq!(route("/v1.41/containers/abc/json"), "/containers/abc/json");
        assert_eq!(route("/version"), "/version");
        assert_eq!(route("/v1.41/version"), "/version");
        assert_eq!(route("/_ping"), "/_ping");
    }
}
