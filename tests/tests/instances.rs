//! Several xhost instances on one machine: each has its own pin dir, and
//! they may share a run dir (the default `/run/xhost`). Needs root;
//! `--test-threads=1`.
//!
//! ```text
//!  host-a netns: xhost --pin-dir /sys/fs/bpf/xh-..-a --run-dir R   (peer: host-b)
//!  host-b netns: xhost --pin-dir /sys/fs/bpf/xh-..-b --run-dir R   (peer: host-a)
//!          ens33 172.16.91.131/24 <== veth ==> ens33 172.16.91.132/24
//! ```

use nix::sys::signal::Signal;
use xhost_tests::{
    Topology, TopologyOpts, ping,
    xhost::{Agent, AgentDirs, remove_instance, status, xhost_bin},
};

/// Started together, again and again, two instances sharing a run dir
/// both come up, each `status` reads its own state, traffic flows, and
/// both leave nothing behind.
#[test]
fn instances_sharing_a_run_dir_start_together() {
    assert!(xhost_tests::is_root(), "run as root (cargo xtask test)");
    let topo = Topology::two_hosts(TopologyOpts::default()).expect("two-host topology");
    let bin = xhost_bin().expect("xhost-user binary");
    let (a, b) = (topo.host_a(), topo.host_b());
    let run_dir = std::env::temp_dir().join(format!("xh-{}-shared-run", std::process::id()));
    let _cleanup = RemoveDir(run_dir.clone());
    for round in 0..8 {
        let mut agents = Vec::new();
        for (host, peer) in [(a, b), (b, a)] {
            let mut dirs = AgentDirs::unique(host.role());
            dirs.run_dir = run_dir.clone();
            let peer_arg = format!("{}={}", peer.underlay_ip(), peer.subnet());
            let args = [
                "--iface",
                host.underlay_iface(),
                "--bridge",
                host.bridge(),
                "--no-docker",
                "--peer",
                &peer_arg,
            ];
            agents.push(
                Agent::spawn(&bin, host.ns(), host.role(), dirs, &args).expect("spawn agent"),
            );
        }
        for agent in &mut agents {
            agent
                .wait_ready()
                .unwrap_or_else(|e| panic!("round {round}: an instance did not start: {e}"));
        }
        for (agent, host) in agents.iter().zip([a, b]) {
            let s = status(host.ns(), &agent.dirs).expect("status");
            assert_eq!(
                s["agent"]["pid"].as_u64(),
                Some(u64::from(agent.pid())),
                "round {round}: each instance reads its own state: {s}"
            );
            assert_eq!(
                s["agent"]["iface"].as_str(),
                Some(host.underlay_iface()),
                "round {round}: {s}"
            );
        }
        if round == 0 {
            let p = ping(topo.ctr_a().ns(), topo.ctr_b().ip(), 2).expect("ping");
            assert!(p.all_received(), "both instances forward: {p:?}");
        }
        for agent in agents {
            let dirs = agent.dirs.clone();
            let (code, left) = agent.stop_with(Signal::SIGTERM).expect("stop");
            assert!(code.success(), "round {round}: exit {code}");
            // The shared run dir may stay while the other instance runs.
            let left: Vec<_> = left.into_iter().filter(|p| *p != run_dir).collect();
            assert!(left.is_empty(), "round {round}: left behind {left:?}");
            remove_instance(&dirs);
        }
        let files: Vec<_> = std::fs::read_dir(&run_dir)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(files.is_empty(), "round {round}: run dir holds {files:?}");
    }
}

struct RemoveDir(std::path::PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
