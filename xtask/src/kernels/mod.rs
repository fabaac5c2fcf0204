//! `cargo xtask kernels`: the kernel matrix. Boots Debian's own cloud kernels (5.10, 6.1,
//! 6.12) in qemu with a small initramfs and runs, inside each, the datapath's
//! BPF_PROG_TEST_RUN suite and the two-host namespace tests once per attach method the
//! kernel and the agent have; prints kernel x attach method x pass/fail counts with the
//! boot and run time per kernel. Any failing test in any kernel fails the command.
//!
//! The kernel packages come from the cache `scripts/setup.sh` fills (`target/kernels/`),
//! unpacked there once; the test binaries are built on the host (`cargo test --release
//! --no-run`, paths from cargo's JSON messages) and run unchanged in the guest.

mod catalog;
mod guest;
mod results;
mod vm;

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};
use cargo_metadata::{Message, TargetKind};
use clap::Args;

use crate::{interrupt, setup, workspace};
use guest::{BIN_DIR, Run, Tree};
use results::{Report, SuiteRun};

/// The namespace tests run in every kernel (tests/tests/datapath.rs): real packets
/// between two simulated Docker hosts, needing only ip/tc/ping, iptables, conntrack,
/// bpftool and the testbed's own xh-probe. Together they cover ping and checksummed TCP
/// both ways with FORWARD and conntrack untouched, Docker's isolation (a peer host cannot
/// reach containers directly), TTL expiry left to the kernel (natively and in VXLAN
/// mode), a detached datapath that keeps forwarding until `unload` leaves nothing, and
/// `status` and bpftool showing what is attached and what the maps hold.
const NAMESPACE_TESTS: [&str; 7] = [
    "containers_reach_each_other_only_through_xhost",
    "status_and_bpftool_show_what_is_attached_and_what_the_maps_hold",
    "underlay_hosts_cannot_reach_containers_directly",
    "ttl_expiring_at_the_host_is_left_to_the_kernel",
    "detached_datapath_keeps_forwarding_until_unload",
    // The attach method: status names it, a forced method the kernel lacks is
    // refused, and another tool's tc filter keeps working through load, a crash
    // and unload.
    "status_names_the_attach_method_and_a_forced_one_the_kernel_lacks_is_refused",
    "other_tc_filters_keep_working_through_load_crash_and_unload",
];

/// The BPF_PROG_TEST_RUN tests that hand the program the device a frame arrived on
/// (`__sk_buff.ingress_ifindex`, which the programs start their FIB lookup from): the
/// kernel's BPF_PROG_TEST_RUN takes it only from Linux 5.16 (before, it refuses the
/// context with EINVAL), so older kernels run the rest of the suite. Their programs
/// still pass the verifier there (every test loads every program), and the namespace
/// tests carry real packets through them.
const NEEDS_TEST_RUN_INGRESS_IFINDEX: [&str; 37] = [
    "bridge_forwards_only_what_its_tables_say_the_sender_owns",
    "cached_forwarding_answers_follow_the_kernel_and_the_maps",
    "drop_mode_answers_nothing",
    "egress_forwards_peer_traffic_up_to_the_underlay_mtu",
    "egress_leaves_malformed_ipv4_to_the_kernel",
    "egress_leaves_what_is_not_for_a_peer_container_to_the_kernel",
    "from_ctr_drops_every_source_but_its_endpoints_own",
    "from_ctr_routes_only_its_own_endpoint_and_counts_only_what_it_decides",
    "ingress_delivers_peer_traffic_and_the_peer_hosts_icmp_errors",
    "ingress_drops_sources_outside_the_peers_subnets",
    "ingress_leaves_what_is_not_for_a_local_container_to_the_kernel",
    "peer_counters_follow_forwarded_packets",
    "reject_mode_answers_spoofed_container_sources_within_the_rate",
    "reject_mode_answers_what_the_underlay_refuses",
    "route_changes_retire_cached_answers",
    "tso_bursts_are_checked_and_cached_by_their_segments",
    "vxlan_mode_decapsulates_in_the_program",
    "vxlan_mode_drops_spoofed_sources_before_encapsulating",
    "vxlan_mode_encapsulates_in_the_program",
    "xdp_drops_what_tc_drops_for_an_endpoint_outside_local_nets",
    "ipv6_bridge_takes_an_unknown_address_from_its_ndp_entry",
    "ipv6_egress_drops_local_sources_no_container_owns",
    "ipv6_egress_forwards_peer_traffic_up_to_the_underlay_mtu",
    "ipv6_egress_leaves_control_extension_and_foreign_traffic_to_the_kernel",
    "ipv6_egress_leaves_malformed_ipv6_to_the_kernel",
    "ipv6_egress_reaches_a_peer_host_over_an_ipv6_underlay",
    "ipv6_from_ctr_routes_only_its_own_endpoint",
    "ipv6_ingress_delivers_peer_traffic",
    "ipv6_ingress_drops_sources_outside_the_peers_subnets",
    "ipv6_ingress_leaves_what_is_not_for_a_local_container_to_the_kernel",
    "ipv6_reject_mode_answers_spoofed_container_sources_within_the_rate",
    "ipv6_reject_mode_answers_what_the_underlay_refuses",
    "ipv6_vxlan_mode_decapsulates_in_the_program",
    "ipv6_vxlan_mode_drops_a_containers_own_vxlan_packets",
    "ipv6_vxlan_mode_encapsulates_in_the_program",
    "ipv6_xdp_drops_what_tc_drops",
    "ipv6_xdp_leaves_refusals_to_tc_in_reject_mode",
];

/// First kernel whose BPF_PROG_TEST_RUN takes `__sk_buff.ingress_ifindex`.
const TEST_RUN_INGRESS_IFINDEX_SINCE: (u32, u32) = (5, 16);

/// A test known to fail on one kernel series with one attach method: still run and
/// shown with what is known, it does not fail the matrix. Each is a finding to fix in the
/// datapath; one that passes is reported so it can come off the list.
struct KnownFailure {
    series: (u32, u32),
    attach: &'static str,
    suite: &'static str,
    test: &'static str,
    why: &'static str,
}

const KNOWN_FAILURES: &[KnownFailure] = &[KnownFailure {
    series: (5, 10),
    attach: "tc",
    suite: "datapath",
    test: "ttl_expiring_at_the_host_is_left_to_the_kernel",
    why: "VXLAN mode on 5.10: host B's ICMP time exceeded for a packet it got through the \
          tunnel does not reach container A (native mode passes); not yet found",
}];

/// Environment variable telling the namespace tests which attach method to ask the
/// agent for.
const ATTACH_ENV: &str = "XHOST_TEST_ATTACH";

#[derive(Args, Debug, Clone)]
pub struct Options {
    /// Skip scripts/setup.sh (qemu, cpio, busybox-static and the kernel packages are
    /// there already).
    #[arg(long)]
    pub no_setup: bool,
    /// Only these kernel series (5.10, 6.1, 6.12); repeatable. Default: all.
    #[arg(long = "kernel", value_name = "SERIES")]
    pub kernels: Vec<String>,
    /// Only these attach methods for the namespace tests (tc, tcx); repeatable.
    /// Default: every method the kernel and the agent have.
    #[arg(long = "attach", value_name = "METHOD")]
    pub attach: Vec<String>,
    /// Time limit per VM, in seconds.
    #[arg(long, default_value_t = DEFAULT_TIMEOUT_SECS)]
    pub timeout: u64,
}

/// A VM's time limit: the slowest kernel (6.12, two attach methods) took 2 to 6 minutes
/// here, the longer while other VMs shared the two CPUs.
const DEFAULT_TIMEOUT_SECS: u64 = 900;

impl Default for Options {
    fn default() -> Self {
        Self {
            no_setup: false,
            kernels: Vec::new(),
            attach: Vec::new(),
            timeout: DEFAULT_TIMEOUT_SECS,
        }
    }
}

/// Where the kernel packages, their unpacked trees and the logs live, in the target
/// directory (`scripts/setup.sh` is told the same place).
pub const CACHE_DIR: &str = "kernels";

fn cache_dir() -> anyhow::Result<PathBuf> {
    Ok(workspace::target_dir()?.join(CACHE_DIR))
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    interrupt::install()?;
    if !opts.no_setup {
        setup::run()?;
    }
    for tool in ["qemu-system-x86_64", "cpio", "busybox", "ldd", "dpkg-deb"] {
        if which(tool).is_none() {
            bail!("{tool} not found: run `cargo xtask setup`");
        }
    }
    for a in &opts.attach {
        if !["tc", "tcx"].contains(&a.as_str()) {
            bail!("--attach {a}: the methods are tc and tcx");
        }
    }
    let suites: Vec<&str> = catalog::SUITES
        .iter()
        .filter(|(_, series)| opts.kernels.is_empty() || opts.kernels.iter().any(|k| k == series))
        .map(|(suite, _)| *suite)
        .collect();
    if suites.is_empty() {
        let known: Vec<&str> = catalog::SUITES.iter().map(|(_, s)| *s).collect();
        bail!(
            "--kernel {}: the matrix has {}",
            opts.kernels.join(","),
            known.join(", ")
        );
    }
    let cache = cache_dir()?;
    let kernels = catalog::prepare(&cache, &suites)?;
    let bins = build_binaries()?;
    let agent_attach = agent_attach_methods(&bins.xhost_user)?;

    // The run's scratch space (trees, archives) goes when this guard drops, also on error.
    let scratch = Scratch(cache.join(format!("run-{}", std::process::id())));
    std::fs::create_dir_all(&scratch.0)?;
    let mut userland = Tree::new(scratch.0.join("userland"))?;
    userland.add_userland(&[
        ("prog_test_run", bins.prog_test_run.as_path()),
        ("datapath", bins.datapath.as_path()),
        ("xhost-user", bins.xhost_user.as_path()),
        ("xh-probe", bins.xh_probe.as_path()),
    ])?;
    let userland_cpio = scratch.0.join("userland.cpio");
    userland.pack(&userland_cpio)?;
    drop(userland);

    let mut rows = Vec::new();
    for kernel in &kernels {
        let plan = plan(kernel, &agent_attach, &opts.attach);
        let mut tree = Tree::new(scratch.0.join(&kernel.release))?;
        let preload = tree.add_modules(kernel)?;
        tree.add_init(&preload, &plan.runs)?;
        let kernel_cpio = scratch.0.join(format!("{}.cpio", kernel.release));
        tree.pack(&kernel_cpio)?;
        drop(tree);
        // The kernel unpacks concatenated newc archives one after the other.
        let initrd = scratch.0.join(format!("{}.initrd", kernel.release));
        concat(&[&userland_cpio, &kernel_cpio], &initrd)?;
        eprintln!(
            "kernels: booting {} ({}, loading {}) for: {}",
            kernel.release,
            kernel.suite,
            preload.join(" "),
            plan.runs
                .iter()
                .map(|r| format!("{} [{}]", r.suite, r.attach))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let log_dir = cache.join("logs").join(&kernel.release);
        let label = kernel.series();
        let outcome = vm::Vm {
            vmlinuz: &kernel.vmlinuz(),
            initrd: &initrd,
            log_dir: &log_dir,
            timeout: Duration::from_secs(opts.timeout),
            label: &label,
        }
        .run()?;
        let _ = std::fs::remove_file(&initrd);
        let report = results::parse(&outcome.results);
        rows.push(KernelRow {
            kernel: kernel.clone(),
            plan,
            report,
            outcome,
            log_dir,
        });
    }
    print_matrix(&rows);
    let failures: Vec<String> = rows.iter().flat_map(KernelRow::failures).collect();
    if !failures.is_empty() {
        bail!("kernel matrix failed:\n  {}", failures.join("\n  "));
    }
    Ok(())
}

/// Removes the run's scratch directory on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn concat(parts: &[&Path], out: &Path) -> anyhow::Result<()> {
    let mut dst = std::fs::File::create(out)?;
    for p in parts {
        let mut src = std::fs::File::open(p)?;
        std::io::copy(&mut src, &mut dst)?;
    }
    Ok(())
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// The host-built binaries the guest runs.
struct Binaries {
    prog_test_run: PathBuf,
    datapath: PathBuf,
    xhost_user: PathBuf,
    xh_probe: PathBuf,
}

/// Builds the two test binaries and the two programs they drive (release), and reads
/// their paths from cargo's JSON messages.
fn build_binaries() -> anyhow::Result<Binaries> {
    let tests = cargo_artifacts(&[
        "test",
        "--release",
        "--no-run",
        "-p",
        "xhost-user",
        "--test",
        "prog_test_run",
        "-p",
        "xhost-tests",
        "--test",
        "datapath",
    ])?;
    let bins = cargo_artifacts(&[
        "build",
        "--release",
        "-p",
        "xhost-user",
        "--bin",
        "xhost-user",
        "-p",
        "xhost-tests",
        "--bin",
        "xh-probe",
    ])?;
    let pick = |list: &[(String, TargetKind, PathBuf)], name: &str, kind: TargetKind| {
        list.iter()
            .find(|(n, k, _)| n == name && *k == kind)
            .map(|(_, _, p)| p.clone())
            .with_context(|| format!("cargo built no {name} ({kind:?})"))
    };
    Ok(Binaries {
        prog_test_run: pick(&tests, "prog_test_run", TargetKind::Test)?,
        datapath: pick(&tests, "datapath", TargetKind::Test)?,
        xhost_user: pick(&bins, "xhost-user", TargetKind::Bin)?,
        xh_probe: pick(&bins, "xh-probe", TargetKind::Bin)?,
    })
}

/// Runs `cargo ARGS --message-format=json` (diagnostics shown as usual) and returns each
/// executable artifact as (target name, kind, path).
fn cargo_artifacts(args: &[&str]) -> anyhow::Result<Vec<(String, TargetKind, PathBuf)>> {
    let mut cmd = workspace::cargo();
    cmd.args(args)
        .arg("--message-format=json-render-diagnostics")
        .stdout(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting `{}`", workspace::display(&cmd)))?;
    let stdout = child.stdout.take().context("cargo's stdout")?;
    let mut found = Vec::new();
    for msg in Message::parse_stream(std::io::BufReader::new(stdout)) {
        if let Message::CompilerArtifact(a) = msg.context("reading cargo's JSON messages")?
            && let Some(exe) = a.executable
        {
            for kind in a.target.kind {
                found.push((a.target.name.clone(), kind, exe.clone().into_std_path_buf()));
            }
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("`{}` failed ({status})", workspace::display(&cmd));
    }
    Ok(found)
}

/// The attach methods the agent can be asked for by name (`load --attach METHOD`), read
/// from its own help: none while it only knows tcx.
fn agent_attach_methods(xhost_user: &Path) -> anyhow::Result<Vec<String>> {
    let out = Command::new(xhost_user)
        .args(["load", "--help"])
        .output()
        .with_context(|| format!("running {} load --help", xhost_user.display()))?;
    let help = String::from_utf8_lossy(&out.stdout);
    Ok(parse_attach_help(&help))
}

/// `--attach <ATTACH>  ... [possible values: tc, tcx, auto]` -> the concrete methods.
fn parse_attach_help(help: &str) -> Vec<String> {
    let mut lines = help
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("--attach"));
    let mut block = String::new();
    if let Some(first) = lines.next() {
        block.push_str(first);
        // The option's description continues on indented lines up to the next option.
        for l in lines.take_while(|l| !l.trim_start().starts_with('-')) {
            block.push(' ');
            block.push_str(l.trim());
        }
    }
    ["tc", "tcx"]
        .into_iter()
        .filter(|m| {
            block
                .split(|c: char| !c.is_ascii_alphanumeric())
                .any(|w| w == *m)
        })
        .map(str::to_owned)
        .collect()
}

/// What one kernel runs, and what it cannot run and why.
struct Plan {
    runs: Vec<Run>,
    /// (attach method, why it is not run).
    skipped: Vec<(String, String)>,
    /// Tests of a run left out on this kernel, and why.
    notes: Vec<String>,
}

fn plan(kernel: &catalog::Kernel, agent_attach: &[String], only: &[String]) -> Plan {
    let mut argv = vec![
        format!("{BIN_DIR}/prog_test_run"),
        "--test-threads=1".into(),
    ];
    let mut notes = Vec::new();
    if kernel.version < TEST_RUN_INGRESS_IFINDEX_SINCE {
        // --exact: a skip names one test, not every test containing the name.
        argv.push("--exact".into());
        for t in NEEDS_TEST_RUN_INGRESS_IFINDEX {
            argv.extend(["--skip".to_owned(), t.to_owned()]);
        }
        notes.push(format!(
            "prog_test_run: {} tests not run: BPF_PROG_TEST_RUN takes __sk_buff.ingress_ifindex only from {}.{}",
            NEEDS_TEST_RUN_INGRESS_IFINDEX.len(),
            TEST_RUN_INGRESS_IFINDEX_SINCE.0,
            TEST_RUN_INGRESS_IFINDEX_SINCE.1
        ));
    }
    let mut runs = vec![Run {
        suite: "prog_test_run".into(),
        attach: "-".into(),
        env: Vec::new(),
        argv,
    }];
    let mut skipped = Vec::new();
    let agent_named = !agent_attach.is_empty();
    for method in ["tc", "tcx"] {
        if !only.is_empty() && !only.iter().any(|m| m == method) {
            continue;
        }
        let why_not = match method {
            "tcx" if !kernel.has_tcx() => Some(format!(
                "kernel {} has no tcx (since {}.{})",
                kernel.series(),
                catalog::TCX_SINCE.0,
                catalog::TCX_SINCE.1
            )),
            // Before the agent can be asked for a method, it attaches through tcx only.
            "tcx" => None,
            _ if !agent_attach.iter().any(|m| m == method) => {
                Some(format!("xhost-user has no `load --attach {method}`"))
            }
            _ => None,
        };
        if let Some(why) = why_not {
            skipped.push((method.to_owned(), why));
            continue;
        }
        let mut argv = vec![
            format!("{BIN_DIR}/datapath"),
            "--test-threads=1".into(),
            "--exact".into(),
        ];
        argv.extend(NAMESPACE_TESTS.iter().map(|t| (*t).to_owned()));
        runs.push(Run {
            suite: "datapath".into(),
            attach: method.into(),
            env: if agent_named {
                vec![(ATTACH_ENV.into(), method.into())]
            } else {
                Vec::new()
            },
            argv,
        });
    }
    Plan {
        runs,
        skipped,
        notes,
    }
}

struct KernelRow {
    kernel: catalog::Kernel,
    plan: Plan,
    report: Report,
    outcome: vm::Outcome,
    log_dir: PathBuf,
}

impl KernelRow {
    /// The known failures of a planned run on this kernel, with what is known.
    fn known(&self, planned: &Run) -> Vec<(&'static str, &'static str)> {
        KNOWN_FAILURES
            .iter()
            .filter(|k| {
                k.series == self.kernel.version
                    && k.attach == planned.attach
                    && k.suite == planned.suite
            })
            .map(|k| (k.test, k.why))
            .collect()
    }

    fn known_names(&self, planned: &Run) -> Vec<&'static str> {
        self.known(planned).into_iter().map(|(t, _)| t).collect()
    }

    /// The run the guest reported for a planned run, if any.
    fn reported(&self, planned: &Run) -> Option<&SuiteRun> {
        self.report
            .runs
            .iter()
            .find(|r| r.suite == planned.suite && r.attach == planned.attach)
    }

    fn failures(&self) -> Vec<String> {
        let k = &self.kernel.release;
        let mut out = Vec::new();
        if self.outcome.timed_out {
            out.push(format!(
                "{k}: VM still running after the time limit (ended)"
            ));
        } else if !self.report.complete() {
            out.push(format!(
                "{k}: the guest stopped before finishing (see {})",
                self.log_dir.join("console.log").display()
            ));
        }
        for planned in &self.plan.runs {
            match self.reported(planned) {
                Some(r) if r.ok_except(&self.known_names(planned)) => {}
                Some(r) => out.push(format!(
                    "{k} {} [{}]: {}",
                    r.suite,
                    r.attach,
                    if r.failed_tests.is_empty() {
                        format!("exit {:?}, no passing test", r.exit)
                    } else {
                        format!("failed {}", r.failed_tests.join(", "))
                    }
                )),
                None => out.push(format!(
                    "{k} {} [{}]: never ran",
                    planned.suite, planned.attach
                )),
            }
        }
        out
    }
}

fn secs(s: Option<f64>) -> String {
    s.map_or_else(|| "-".into(), |s| format!("{s:.1}s"))
}

fn print_matrix(rows: &[KernelRow]) {
    println!();
    println!("kernel matrix (qemu TCG, -smp 2, 1 GiB):");
    println!(
        "{:<28} {:<6} {:<14} {:>6} {:>6} {:>7} {:>8}  result",
        "kernel", "attach", "suite", "passed", "failed", "ignored", "time"
    );
    for row in rows {
        let k = &row.kernel.release;
        for planned in &row.plan.runs {
            let r = row.reported(planned);
            let c = r.and_then(|r| r.counts);
            let num = |f: fn(&results::Counts) -> u32| c.map_or("-".into(), |c| f(&c).to_string());
            let known = row.known_names(planned);
            let result = match r {
                Some(r) if r.ok() && !r.flaky().is_empty() => {
                    format!("ok; passed on retry: {}", r.flaky().join(", "))
                }
                Some(r) if r.ok() => "ok".to_owned(),
                Some(r) if r.ok_except(&known) => {
                    format!("ok but for known failures: {}", r.failed_twice().join(", "))
                }
                Some(_) => "FAILED".to_owned(),
                None => "not run".to_owned(),
            };
            println!(
                "{:<28} {:<6} {:<14} {:>6} {:>6} {:>7} {:>8}  {result}",
                k,
                planned.attach,
                planned.suite,
                num(|c| c.passed),
                num(|c| c.failed),
                num(|c| c.ignored),
                secs(r.and_then(|r| r.secs)),
            );
        }
        for (method, why) in &row.plan.skipped {
            println!(
                "{:<28} {:<6} {:<14} {:>6} {:>6} {:>7} {:>8}  skipped: {why}",
                k, method, "datapath", "-", "-", "-", "-"
            );
        }
    }
    for row in rows {
        for note in &row.plan.notes {
            println!("{}: {note}", row.kernel.release);
        }
    }
    println!();
    println!(
        "{:<28} {:>10} {:>12} {:>10}  modules not loaded",
        "kernel", "boot", "kernel boot", "run"
    );
    for row in rows {
        println!(
            "{:<28} {:>10} {:>12} {:>10}  {}",
            row.kernel.release,
            secs(row.outcome.boot_secs),
            secs(row.report.init_uptime),
            format!("{:.1}s", row.outcome.run_secs),
            if row.report.missing_modules.is_empty() {
                "-".to_owned()
            } else {
                row.report.missing_modules.join(" ")
            }
        );
    }
    println!(
        "(boot: qemu start to the guest's first report; kernel boot: guest uptime when init started; run: the rest, to power-off)"
    );
    for row in rows {
        for planned in &row.plan.runs {
            if let Some(r) = row.reported(planned).filter(|r| !r.flaky().is_empty()) {
                println!(
                    "\n--- {} {} [{}]: failed, then passed on retry ---\n{}",
                    row.kernel.release,
                    r.suite,
                    r.attach,
                    r.failure_excerpt(30)
                );
            }
            let known = row.known(planned);
            if let Some(r) = row.reported(planned) {
                let still = r.failed_twice();
                for (test, why) in &known {
                    if r.ok() || !still.iter().any(|t| t == test) {
                        println!(
                            "{} {} [{}]: known failure {test} passed: take it off KNOWN_FAILURES",
                            row.kernel.release, r.suite, r.attach
                        );
                    } else {
                        println!(
                            "{} {} [{}]: known failure {test}: {why}",
                            row.kernel.release, r.suite, r.attach
                        );
                    }
                }
            }
            if let Some(r) = row.reported(planned).filter(|r| !r.ok()) {
                println!(
                    "\n--- {} {} [{}] ---\n{}",
                    row.kernel.release,
                    r.suite,
                    r.attach,
                    r.failure_excerpt(60)
                );
            }
        }
        if !row.report.complete()
            || row
                .plan
                .runs
                .iter()
                .any(|p| row.reported(p).is_none_or(|r| !r.ok()))
        {
            println!("(full logs: {})", row.log_dir.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attach_methods_from_help() {
        let help = "Options:\n      --iface <IFACE>\n          Underlay\n      --attach <ATTACH>\n          How TC programs attach\n          [default: auto]\n          [possible values: auto, tc, tcx]\n      --xdp-mode <MODE>\n          native\n";
        assert_eq!(parse_attach_help(help), ["tc", "tcx"]);
        assert!(
            parse_attach_help("Options:\n      --iface <IFACE>\n          tc tcx\n").is_empty()
        );
    }

    fn kernel(version: (u32, u32)) -> catalog::Kernel {
        catalog::Kernel {
            suite: "x".into(),
            release: format!("{}.{}.0-1-cloud-amd64", version.0, version.1),
            version,
            root: PathBuf::new(),
        }
    }

    #[test]
    fn plan_runs_what_kernel_and_agent_have() {
        let none: Vec<String> = Vec::new();
        let both = vec!["tc".to_owned(), "tcx".to_owned()];
        let p = plan(&kernel((5, 10)), &none, &[]);
        assert_eq!(p.runs.len(), 1, "only BPF_PROG_TEST_RUN");
        assert_eq!(p.skipped.len(), 2);
        let skips = p.runs[0].argv.iter().filter(|a| *a == "--skip").count();
        assert_eq!(skips, NEEDS_TEST_RUN_INGRESS_IFINDEX.len());
        assert_eq!(p.notes.len(), 1);
        let p61 = plan(&kernel((6, 1)), &none, &[]);
        assert!(!p61.runs[0].argv.contains(&"--skip".to_owned()));
        let p = plan(&kernel((6, 12)), &none, &[]);
        assert_eq!(p.runs[1].attach, "tcx");
        assert!(p.runs[1].env.is_empty(), "the agent cannot be asked");
        let p = plan(&kernel((6, 1)), &both, &[]);
        let attaches: Vec<&str> = p.runs.iter().map(|r| r.attach.as_str()).collect();
        assert_eq!(attaches, ["-", "tc"]);
        let p = plan(&kernel((6, 12)), &both, &["tc".to_owned()]);
        assert_eq!(p.runs[1].env, [(ATTACH_ENV.to_owned(), "tc".to_owned())]);
        assert_eq!(p.runs.len(), 2);
    }
}
