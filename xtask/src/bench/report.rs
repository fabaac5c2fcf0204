//! The bench's results: medians, within-run ratios, targets, and their renderings (text
//! table, markdown, hand-written SVG chart, JSON).

use std::{collections::BTreeMap, fmt::Write as _, path::Path, process::Command, time::Duration};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use super::{
    CLUSTER_DOCKER, CLUSTER_SCALE, ClusterRuns, IP6_ROUTES, IPTABLES, Metric, Plan, ProgCost, Run,
    Scenario, VXLAN, WIRE, WIRE_V6, XHOST, XHOST_1K, XHOST_100K, XHOST_BASELINE, XHOST_KERNEL,
    XHOST_V6, XHOST_VXLAN, XHOST_VXLAN_BASELINE, XHOST_XDP_NATIVE, XHOST_XDP_OFF, wire_for,
};

pub use xhost_tests::scenarios::median;

/// `(max - min) / median`, the repetitions' relative range; `None` for fewer than two.
pub fn spread(values: &[f64]) -> Option<f64> {
    if values.len() < 2 {
        return None;
    }
    let (lo, hi) = values
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    median(values).filter(|m| *m > 0.0).map(|m| (hi - lo) / m)
}

/// Coverage the median's interval aims for.
pub const INTERVAL_LEVEL: f64 = 0.95;

/// A distribution-free confidence interval for a median: the `k`-th smallest and `k`-th
/// largest of `n` samples cover the true median with probability `1 - 2 P(B <= k - 1)`,
/// `B ~ Binomial(n, 1/2)` (the sign-test interval; no assumption on the samples'
/// distribution, only that repetitions are independent).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct MedianInterval {
    pub low: f64,
    pub high: f64,
    /// The probability that the interval covers the median: the narrowest interval with
    /// at least [`INTERVAL_LEVEL`], or with fewer samples than that needs (5 or less),
    /// the smallest to the largest sample and the lower coverage they give.
    pub coverage: f64,
}

/// The median's interval of `values`, over the same finite values [`median`] takes;
/// `None` for fewer than two.
pub fn median_interval(values: &[f64]) -> Option<MedianInterval> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    let n = v.len();
    if n < 2 {
        return None;
    }
    v.sort_by(f64::total_cmp);
    // P(B <= j) for B ~ Binomial(n, 1/2), j = 0..n.
    let mut cdf = Vec::with_capacity(n + 1);
    let (mut term, mut sum) = (0.5f64.powi(n as i32), 0.0);
    for j in 0..=n {
        sum += term;
        cdf.push(sum);
        term = term * (n - j) as f64 / (j + 1) as f64;
    }
    let coverage = |k: usize| 1.0 - 2.0 * cdf[k - 1];
    let k = (1..=n / 2)
        .rev()
        .find(|&k| coverage(k) >= INTERVAL_LEVEL)
        .unwrap_or(1);
    Some(MedianInterval {
        low: v[k - 1],
        high: v[n - k],
        coverage: coverage(k),
    })
}

/// `x / base` of one metric: the per-repetition ratios (pairs from the same repetition),
/// their median and the median's interval.
#[derive(Debug, Serialize)]
pub struct Ratio {
    pub x: String,
    pub base: String,
    pub metric: Metric,
    pub per_rep: Vec<f64>,
    pub median: Option<f64>,
    pub interval: Option<MedianInterval>,
    /// False when no repetition had both sides undisturbed, so disturbed pairs were used.
    pub clean: bool,
}

/// A goal of the bench (the ratio targets), checked against a median.
#[derive(Debug, Serialize)]
pub struct Target {
    pub what: String,
    pub value: Option<f64>,
    /// `>= 0.9`, `<= 1.3`, `< 50 MB`, ...
    pub goal: String,
    /// `None` when the value could not be measured (scenario filtered out or failed).
    pub met: Option<bool>,
    /// The median's interval, for targets on a ratio.
    pub interval: Option<MedianInterval>,
    /// Whether the whole interval lies on the verdict's side of the bound, so that the
    /// repetitions' spread could not have turned the verdict; `None` without an interval.
    pub settled: Option<bool>,
    /// False when the value rests on samples disturbed by outside load.
    pub clean: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Machine {
    pub kernel: String,
    pub cpus: usize,
    pub model_name: String,
    pub mem_total_kb: Option<u64>,
    pub iperf3: Option<String>,
    pub sockperf: Option<String>,
    /// The machine's default TCP congestion control, which every namespace of the bench
    /// inherits (`net.ipv4.tcp_congestion_control`): single-stream TCP depends on it.
    pub tcp_congestion_control: Option<String>,
    pub xhost_user: String,
    pub xhost_user_sha256: Option<String>,
    /// `git describe --always --dirty` of the workspace at the end of the run.
    pub git: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Results {
    pub started_at: String,
    pub wall_s: f64,
    pub plan: Plan,
    pub machine: Machine,
    pub cpu_method: &'static str,
    pub latency_method: &'static str,
    pub scenarios: Vec<ScenarioInfo>,
    pub runs: Vec<Run>,
    /// scenario -> metric -> median over repetitions.
    pub medians: BTreeMap<String, BTreeMap<Metric, f64>>,
    /// scenario -> metrics whose median had to use disturbed samples (no clean ones).
    pub disturbed_medians: BTreeMap<String, Vec<Metric>>,
    pub ratios: Vec<Ratio>,
    pub targets: Vec<Target>,
    /// Median VmRSS of host A's agent per xhost scenario, MB.
    pub agent_rss_mb: BTreeMap<String, f64>,
    /// Median load time (spawn to `ready`) of host A's agent per xhost scenario, s.
    pub agent_load_s: BTreeMap<String, f64>,
    /// The datapath programs' own cost per route count (`BPF_PROG_TEST_RUN`); `None` when
    /// no xhost scenario ran.
    pub prog_cost: Option<ProgCost>,
    /// Why `prog_cost` is missing although an xhost scenario ran.
    pub prog_cost_error: Option<String>,
    /// Cluster mode's scenarios (`cluster-docker`, `cluster-scale`).
    pub cluster: ClusterRuns,
}

#[derive(Debug, Serialize)]
pub struct ScenarioInfo {
    pub name: String,
    pub about: String,
}

const CPU_METHOD: &str = "/proc/stat ticks (USER_HZ=100, whole machine, tick-sampled) over the UDP test divided by delivered packets: softirq alone (table) and user+nice+system+irq+softirq (JSON cpu_ns_per_pkt); perf has no hardware counters in this VM. rx wake IPIs/100 pkt: function-call IPIs (CAL, /proc/interrupts) the receiver's CPU took over the UDP test per 100 delivered packets, mostly wakeups of the receiver from a halted CPU, each paid on the sending CPU, which runs the whole path (JSON also: rx_idle_pct)";
const LATENCY_METHOD: &str = "sockperf ping-pong, UDP, 64-byte messages, latency = RTT/2 as sockperf reports it. lat mean/p99/p50 (the targets): --nonblocked --timeout 0 on both ends (busy polling, as the targets specify), client on CPU 0, server on CPU 1. pinned lat: blocking sockets, client and server on the same CPU (local wakeups), a second view that does not depend on both CPUs being free";

/// A target on a within-run ratio: `x / base` of `metric`, `op` (`>=` or `<=`)
/// `bound`.
#[derive(Clone, Copy, Debug)]
pub struct Goal {
    pub x: &'static str,
    pub base: &'static str,
    pub metric: Metric,
    pub op: &'static str,
    pub bound: f64,
}

impl Goal {
    const fn new(
        x: &'static str,
        base: &'static str,
        metric: Metric,
        op: &'static str,
        bound: f64,
    ) -> Self {
        Self {
            x,
            base,
            metric,
            op,
            bound,
        }
    }

    fn meets(&self, v: f64) -> bool {
        if self.op == ">=" {
            v >= self.bound
        } else {
            v <= self.bound
        }
    }

    /// The goal checked against `ratio`'s median and interval (`None`: not measured).
    pub fn check(&self, ratio: Option<&Ratio>) -> Target {
        let value = ratio.and_then(|r| r.median);
        let met = value.map(|v| self.meets(v));
        let interval = ratio.and_then(|r| r.interval);
        Target {
            what: format!("{} / {}: {}", self.x, self.base, self.metric.label()),
            value,
            goal: format!("{} {}", self.op, self.bound),
            met,
            interval,
            settled: interval
                .zip(met)
                .map(|(i, met)| self.meets(i.low) == met && self.meets(i.high) == met),
            clean: ratio.is_none_or(|r| r.clean),
        }
    }
}

/// The targets on ratios (the agent's memory is the tenth).
pub const GOALS: [Goal; 9] = [
    Goal::new(XHOST, WIRE, Metric::TcpGbps, ">=", 0.9),
    Goal::new(XHOST, WIRE, Metric::UdpKpps, ">=", 0.8),
    Goal::new(XHOST, WIRE, Metric::LatMeanUs, "<=", 1.3),
    Goal::new(XHOST, IPTABLES, Metric::TcpGbps, ">=", 1.2),
    Goal::new(XHOST, IPTABLES, Metric::UdpKpps, ">=", 1.8),
    Goal::new(XHOST, IPTABLES, Metric::LatMeanUs, "<=", 0.6),
    Goal::new(XHOST_100K, XHOST, Metric::UdpKpps, ">=", 0.95),
    // IPv6 within 5 % of IPv4, side by side in one run.
    Goal::new(XHOST_V6, XHOST, Metric::TcpGbps, ">=", 0.95),
    Goal::new(XHOST_V6, XHOST, Metric::UdpKpps, ">=", 0.95),
];

/// The comparisons reported, as (x, base); those whose scenarios did not run are skipped.
const COMPARISONS: [(&str, &str); 22] = [
    (XHOST, WIRE),
    (XHOST, IPTABLES),
    (XHOST_KERNEL, IPTABLES),
    (XHOST, XHOST_KERNEL),
    (XHOST, VXLAN),
    (XHOST_VXLAN, VXLAN),
    (XHOST_VXLAN, WIRE),
    (XHOST_XDP_NATIVE, XHOST),
    (XHOST_XDP_OFF, XHOST),
    (XHOST_XDP_NATIVE, WIRE),
    (IPTABLES, WIRE),
    (VXLAN, WIRE),
    (XHOST_1K, XHOST),
    (XHOST_100K, XHOST),
    (XHOST_100K, XHOST_1K),
    (XHOST, XHOST_BASELINE),
    (XHOST_VXLAN, XHOST_VXLAN_BASELINE),
    (XHOST_V6, XHOST),
    (XHOST_V6, WIRE_V6),
    (XHOST_V6, IP6_ROUTES),
    (WIRE_V6, WIRE),
    (IP6_ROUTES, IPTABLES),
];

impl Results {
    #[expect(
        clippy::too_many_arguments,
        reason = "one call site and the tests; each is one part of the results"
    )]
    pub fn new(
        plan: &Plan,
        scenarios: &[Scenario],
        runs: Vec<Run>,
        started_at: String,
        wall: Duration,
        xhost_user: &Path,
        prog_cost: Option<Result<ProgCost, String>>,
        cluster: ClusterRuns,
    ) -> Self {
        let mut medians: BTreeMap<String, BTreeMap<Metric, f64>> = BTreeMap::new();
        let mut disturbed_medians: BTreeMap<String, Vec<Metric>> = BTreeMap::new();
        for s in scenarios {
            let m = medians.entry(s.name.to_owned()).or_default();
            for metric in Metric::ALL {
                let (vals, clean) = samples(&runs, s.name, metric);
                if let Some(v) = median(&vals) {
                    m.insert(metric, v);
                    if !clean {
                        disturbed_medians
                            .entry(s.name.to_owned())
                            .or_default()
                            .push(metric);
                    }
                }
            }
        }
        let mut ratios = Vec::new();
        for (x, base) in COMPARISONS {
            for metric in Metric::ALL {
                if let Some(r) = ratio(&runs, x, base, metric, false) {
                    ratios.push(r);
                }
            }
        }
        let mut agent_rss_mb = BTreeMap::new();
        let mut agent_load_s = BTreeMap::new();
        for s in scenarios {
            let host_a = |r: &&Run| r.scenario == s.name;
            let rss: Vec<f64> = runs
                .iter()
                .filter(host_a)
                .filter_map(|r| r.agents.first()?.rss_bytes)
                .map(|b| b as f64 / (1024.0 * 1024.0))
                .collect();
            let load: Vec<f64> = runs
                .iter()
                .filter(host_a)
                .filter_map(|r| Some(r.agents.first()?.load_s))
                .collect();
            if let Some(m) = median(&rss) {
                agent_rss_mb.insert(s.name.to_owned(), m);
            }
            if let Some(m) = median(&load) {
                agent_load_s.insert(s.name.to_owned(), m);
            }
        }
        let mut results = Self {
            started_at,
            wall_s: wall.as_secs_f64(),
            plan: Plan {
                reps: plan.reps,
                creations: plan.creations,
                duration_s: plan.duration_s,
                scenarios: plan.scenarios.clone(),
                quick: plan.quick,
                max_wait_s: plan.max_wait_s,
            },
            machine: machine(xhost_user),
            cpu_method: CPU_METHOD,
            latency_method: LATENCY_METHOD,
            scenarios: scenarios
                .iter()
                .map(|s| ScenarioInfo {
                    name: s.name.to_owned(),
                    about: s.about.to_owned(),
                })
                .collect(),
            runs,
            medians,
            disturbed_medians,
            ratios,
            targets: Vec::new(),
            agent_rss_mb,
            agent_load_s,
            prog_cost_error: prog_cost.as_ref().and_then(|r| r.as_ref().err().cloned()),
            prog_cost: prog_cost.and_then(Result::ok),
            cluster,
        };
        results.targets = results.targets();
        results
    }

    fn find_ratio(&self, x: &str, base: &str, metric: Metric) -> Option<&Ratio> {
        self.ratios
            .iter()
            .find(|r| r.x == x && r.base == base && r.metric == metric)
    }

    /// The ratio formatted, `*` marking one that rests on disturbed samples.
    fn ratio_cell(&self, x: &str, base: &str, metric: Metric) -> String {
        match self.find_ratio(x, base, metric) {
            Some(Ratio {
                median: Some(v),
                clean,
                ..
            }) => format!("{v:.2}{}", if *clean { "" } else { "*" }),
            _ => "-".into(),
        }
    }

    fn median_cell(&self, scenario: &str, metric: Metric) -> String {
        let v = self
            .medians
            .get(scenario)
            .and_then(|m| m.get(&metric))
            .copied();
        let disturbed = self
            .disturbed_medians
            .get(scenario)
            .is_some_and(|d| d.contains(&metric));
        format!(
            "{}{}",
            fmt_value(v, metric),
            if disturbed { "*" } else { "" }
        )
    }

    fn targets(&self) -> Vec<Target> {
        let mut t: Vec<Target> = GOALS
            .iter()
            .map(|g| g.check(self.find_ratio(g.x, g.base, g.metric)))
            .collect();
        let rss = self.agent_rss_mb.get(XHOST_100K).copied();
        t.push(Target {
            what: "agent RSS with 100k routes (MB)".into(),
            value: rss,
            goal: "< 50 MB".into(),
            met: rss.map(|v| v < 50.0),
            interval: None,
            settled: None,
            clean: true,
        });
        t
    }

    fn ran(&self, name: &str) -> bool {
        self.runs.iter().any(|r| r.scenario == name)
    }

    /// Every table, as text (`markdown = false`) or GitHub markdown.
    fn tables(&self, markdown: bool) -> String {
        let mut out = String::new();
        let reps = self.plan.reps;
        // Absolute values.
        let mut header = vec!["scenario".to_owned()];
        header.extend(Metric::TABLE.iter().map(|m| m.label().to_owned()));
        header.push("ok reps".into());
        let mut rows = Vec::new();
        for s in &self.scenarios {
            let mut row = vec![s.name.clone()];
            for metric in Metric::TABLE {
                row.push(self.median_cell(&s.name, metric));
            }
            let of = |f: &dyn Fn(&Run) -> bool| {
                self.runs
                    .iter()
                    .filter(|r| r.scenario == s.name && f(r))
                    .count()
            };
            let ok = of(&|r| r.errors.is_empty());
            let disturbed = of(&|r| !r.disturbed.is_empty());
            let disturbed = if disturbed > 0 {
                format!(" ({disturbed} disturbed)")
            } else {
                String::new()
            };
            row.push(format!("{ok}/{reps}{disturbed}"));
            rows.push(row);
        }
        section(
            &mut out,
            markdown,
            &format!(
                "Medians over {reps} repetition(s), {} s per test",
                self.plan.duration_s
            ),
            &header,
            &rows,
        );

        // Spread: how much the repetitions disagree.
        if reps > 1 {
            let mut header = vec!["scenario".to_owned()];
            header.extend(Metric::TABLE.iter().map(|m| m.label().to_owned()));
            let rows: Vec<Vec<String>> = self
                .scenarios
                .iter()
                .map(|s| {
                    let mut row = vec![s.name.clone()];
                    for metric in Metric::TABLE {
                        let (vals, _) = samples(&self.runs, &s.name, metric);
                        row.push(match spread(&vals) {
                            Some(p) => format!("{:.0}%", p * 100.0),
                            None => "-".into(),
                        });
                    }
                    row
                })
                .collect();
            section(
                &mut out,
                markdown,
                "Spread over repetitions ((max - min) / median)",
                &header,
                &rows,
            );
        }

        // Ratios.
        let metrics = Metric::TABLE;
        let mut header = vec!["x / base".to_owned()];
        header.extend(metrics.iter().map(|m| {
            let dir = if m.higher_is_better() { "^" } else { "v" };
            format!("{} {dir}", m.label())
        }));
        let mut rows = Vec::new();
        for (x, base) in COMPARISONS {
            if !self.ran(x) || !self.ran(base) {
                continue;
            }
            let mut row = vec![format!("{x} / {base}")];
            for metric in metrics {
                row.push(self.ratio_cell(x, base, metric));
            }
            rows.push(row);
        }
        section(
            &mut out,
            markdown,
            "Ratios (median of per-repetition x/base; ^ higher is better, v lower is better)",
            &header,
            &rows,
        );

        // Scale.
        let scale = [(XHOST, 1u32), (XHOST_1K, 1_000), (XHOST_100K, 100_000)];
        if scale.iter().filter(|(s, _)| self.ran(s)).count() > 1 {
            let header: Vec<String> = [
                "routes",
                "UDP64 kpps",
                "vs 1 route",
                "lat mean us",
                "lat p99 us",
                "agent RSS MB",
                "agent load s",
            ]
            .map(str::to_owned)
            .to_vec();
            let mut rows = Vec::new();
            for (name, routes) in scale {
                if !self.ran(name) {
                    continue;
                }
                let vs = if name == XHOST {
                    "1.00".into()
                } else {
                    self.ratio_cell(name, XHOST, Metric::UdpKpps)
                };
                rows.push(vec![
                    format!("{routes} ({name})"),
                    self.median_cell(name, Metric::UdpKpps),
                    vs,
                    self.median_cell(name, Metric::LatMeanUs),
                    self.median_cell(name, Metric::LatP99Us),
                    self.agent_rss_mb
                        .get(name)
                        .map_or("-".into(), |v| format!("{v:.1}")),
                    self.agent_load_s
                        .get(name)
                        .map_or("-".into(), |v| format!("{v:.2}")),
                ]);
            }
            section(
                &mut out,
                markdown,
                "xhost scale (host A's agent; routes in ROUTES and in the kernel FIB)",
                &header,
                &rows,
            );
        }

        // Targets.
        let (header, rows) = target_table(&self.targets);
        section(
            &mut out,
            markdown,
            "Targets (verdict on the median of per-repetition ratios; interval: \
             sign-test confidence interval of that median, from the repetitions' order \
             statistics)",
            &header,
            &rows,
        );
        self.prog_cost_table(&mut out, markdown);
        self.cluster_table(&mut out, markdown);
        out
    }

    /// Cluster mode's measures against their goals (one run each).
    fn cluster_table(&self, out: &mut String, markdown: bool) {
        let c = &self.cluster;
        if c.docker.is_none() && c.scale.is_none() {
            return;
        }
        let title = "Cluster mode (real etcd; one run each)";
        let header: Vec<String> = ["scenario", "what", "result", "goal", "met"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        let mut rows: Vec<Vec<String>> = Vec::new();
        // `met` is `None` for a measure without a goal.
        let mut row =
            |scenario: &str, what: String, result: String, goal: &str, met: Option<bool>| {
                let met = match met {
                    Some(true) => "yes",
                    Some(false) => "NO",
                    None => "-",
                };
                rows.push(vec![
                    scenario.to_owned(),
                    what,
                    result,
                    goal.to_owned(),
                    met.to_owned(),
                ]);
            };
        let pct = |p: &xhost_tests::cluster::Percentiles| {
            format!(
                "p50 {:.1} ms, p99 {:.1} ms (max {:.1})",
                p.p50_ms, p.p99_ms, p.max_ms
            )
        };
        match &c.docker {
            Some(Ok(d)) => {
                row(
                    CLUSTER_DOCKER,
                    format!(
                        "Docker network created on host-b -> routed on host-a ({} creations)",
                        d.create.samples
                    ),
                    pct(&d.create),
                    "p99 < 250 ms",
                    Some(d.create.p99_ms < 250.0),
                );
                row(
                    CLUSTER_DOCKER,
                    "Docker network delete call started -> route gone (includes Docker's teardown)"
                        .into(),
                    pct(&d.remove),
                    "-",
                    None,
                );
            }
            Some(Err(e)) => {
                let _ = writeln!(out, "\n{CLUSTER_DOCKER}: not measured: {e}");
            }
            None => {}
        }
        match &c.scale {
            Some(Ok(s)) => {
                let routes = s.hosts * s.subnets_per_host;
                row(
                    CLUSTER_SCALE,
                    format!(
                        "{} hosts x {} subnets: agent start -> all {routes} routes",
                        s.hosts, s.subnets_per_host
                    ),
                    format!("{:.2} s (ready at {:.2} s)", s.all_routes_s, s.ready_s),
                    "< 3 s",
                    Some(s.all_routes_s < 3.0),
                );
                let mib = s.rss_bytes as f64 / (1024.0 * 1024.0);
                row(
                    CLUSTER_SCALE,
                    "agent RSS with them".into(),
                    format!("{mib:.1} MiB"),
                    "< 64 MB",
                    Some((s.rss_bytes as f64) < 64e6),
                );
                row(
                    CLUSTER_SCALE,
                    format!(
                        "a claim written to etcd -> in ROUTES ({} claims)",
                        s.claim.samples
                    ),
                    pct(&s.claim),
                    "p99 < 250 ms",
                    Some(s.claim.p99_ms < 250.0),
                );
                row(
                    CLUSTER_SCALE,
                    format!(
                        "churn {0} hosts/s leaving + {0}/s joining for 5 s",
                        s.churn_hosts_per_s
                    ),
                    format!(
                        "ROUTES matched {:.0} ms after the last write",
                        s.churn_behind_ms
                    ),
                    "< 1000 ms after",
                    Some(s.churn_behind_ms < 1000.0),
                );
            }
            Some(Err(e)) => {
                let _ = writeln!(out, "\n{CLUSTER_SCALE}: not measured: {e}");
            }
            None => {}
        }
        if !rows.is_empty() {
            section(out, markdown, title, &header, &rows);
        }
    }

    /// ns per run of each program per route count, and the largest count over the
    /// smallest.
    fn prog_cost_table(&self, out: &mut String, markdown: bool) {
        let title = "Per-program cost, BPF_PROG_TEST_RUN (ns per run, medians; warm: cache hit, first: right after a route write)";
        if let Some(e) = &self.prog_cost_error {
            let _ = writeln!(out, "\n{title}: not measured: {e}");
        }
        let Some(pc) = &self.prog_cost else {
            return;
        };
        let mut programs: Vec<&str> = Vec::new();
        let mut counts: Vec<u32> = Vec::new();
        for s in &pc.samples {
            if !programs.contains(&s.program.as_str()) {
                programs.push(&s.program);
            }
            if !counts.contains(&s.routes) {
                counts.push(s.routes);
            }
        }
        let find = |program: &str, routes: u32| {
            pc.samples
                .iter()
                .find(|s| s.program == program && s.routes == routes)
        };
        let mut header = vec!["routes".to_owned()];
        for p in &programs {
            header.push(format!("{p} warm"));
            header.push(format!("{p} first"));
        }
        let cell =
            |v: Option<f64>, digits: usize| v.map_or("-".into(), |v| format!("{v:.digits$}"));
        let mut rows: Vec<Vec<String>> = counts
            .iter()
            .map(|&n| {
                let mut row = vec![n.to_string()];
                for p in &programs {
                    let s = find(p, n);
                    row.push(cell(s.map(|s| s.warm_ns), 0));
                    row.push(cell(s.map(|s| s.first_ns), 0));
                }
                row
            })
            .collect();
        if let (Some(&lo), Some(&hi)) = (counts.first(), counts.last())
            && lo != hi
        {
            let mut row = vec![format!("{hi} / {lo}")];
            for p in &programs {
                let (a, b) = (find(p, hi), find(p, lo));
                let r = |f: fn(&super::ProgSample) -> f64| Some(f(a?) / f(b?));
                row.push(cell(r(|s| s.warm_ns), 2));
                row.push(cell(r(|s| s.first_ns), 2));
            }
            rows.push(row);
        }
        section(out, markdown, title, &header, &rows);
        let _ = writeln!(
            out,
            "{}(one run per sample, {} warm and {} first samples per program and count, interleaved over {} rounds; each includes the kernel's two clock reads)",
            if markdown { "\n" } else { "  " },
            pc.warm_samples,
            pc.first_samples,
            pc.rounds
        );
    }

    /// How iperf3 ran, congestion control included.
    fn iperf3_method(&self) -> String {
        format!(
            "iperf3 client on CPU 0, server on CPU 1; TCP congestion control {} (the machine's default), TCP steady = median of the sender's {} s intervals; UDP -u -l 64 -b 0 (one sender thread), pps = receiver's (packets - lost) / seconds",
            self.machine
                .tcp_congestion_control
                .as_deref()
                .unwrap_or("unknown"),
            xhost_tests::scenarios::TCP_INTERVAL_S
        )
    }

    /// The whole report for stdout.
    pub fn text_report(&self) -> String {
        let mut out = String::new();
        let m = &self.machine;
        let _ = writeln!(
            out,
            "\nxhost bench {} | kernel {} | {} x {} | {} | wall {:.0} s",
            self.started_at, m.kernel, m.cpus, m.model_name, m.xhost_user, self.wall_s
        );
        out.push_str(&self.tables(false));
        let _ = writeln!(out, "\nCPU: {}", self.cpu_method);
        let _ = writeln!(out, "Latency: {}", self.latency_method);
        let _ = writeln!(out, "TCP/UDP: {}", self.iperf3_method());
        let _ = writeln!(
            out,
            "Disturbed: a test during which more than {} CPUs of busy time was not the tools' own (other work on the VM); medians and ratios leave such samples out while clean ones exist, and * marks a value that had to use them.",
            super::DISTURBED_CPUS
        );
        let disturbed: Vec<String> = self
            .runs
            .iter()
            .filter(|r| !r.disturbed.is_empty())
            .map(|r| {
                let tests: Vec<String> = r
                    .foreign_cpus
                    .iter()
                    .filter(|(_, f)| **f > super::DISTURBED_CPUS)
                    .map(|(t, f)| format!("{t} {f:.1}"))
                    .collect();
                format!("rep {} {} ({})", r.rep, r.scenario, tests.join(", "))
            })
            .collect();
        if !disturbed.is_empty() {
            let _ = writeln!(
                out,
                "Disturbed tests (foreign CPUs): {}",
                disturbed.join("; ")
            );
        }
        let failed: Vec<&Run> = self.runs.iter().filter(|r| !r.errors.is_empty()).collect();
        if !failed.is_empty() {
            let _ = writeln!(out, "\nErrors:");
            for r in failed {
                for e in &r.errors {
                    let first = e.lines().next().unwrap_or_default();
                    let _ = writeln!(out, "  rep {} {}: {first}", r.rep, r.scenario);
                }
            }
        }
        out
    }

    /// `results.json`, `summary.json`, `table.md`, `ratios.svg` in `dir`.
    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let json = serde_json::to_string_pretty(self).context("serialising results")?;
        let write = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
        };
        write("results.json", &json)?;
        // The run without its raw samples: what bench/runs keeps and --pool reads.
        let mut summary = serde_json::to_value(self).context("serialising results")?;
        if let Some(o) = summary.as_object_mut() {
            o.remove("runs");
        }
        write("summary.json", &summary.to_string())?;
        let m = &self.machine;
        let md = format!(
            "<!-- cargo xtask bench, {} -->\nKernel {}, {} x {}, {} repetition(s) x {} s per test.\n{}\nCPU: {}.  \nLatency: {}.  \nTCP/UDP: {}.\n",
            self.started_at,
            m.kernel,
            m.cpus,
            m.model_name,
            self.plan.reps,
            self.plan.duration_s,
            self.tables(true),
            self.cpu_method,
            self.latency_method,
            self.iperf3_method()
        );
        write("table.md", &md)?;
        write("ratios.svg", &self.svg())?;
        Ok(())
    }

    /// Grouped bars: per scenario, each metric as a ratio to the wire (latency as wire/x so
    /// higher is better everywhere), with a reference line at 1.0.
    pub fn svg(&self) -> String {
        let metrics: [(Metric, &str, &str, bool); 5] = [
            (Metric::TcpGbps, "TCP throughput", "#4e79a7", false),
            (Metric::UdpKpps, "UDP 64B pps", "#f28e2b", false),
            (Metric::LatMeanUs, "latency mean (wire/x)", "#59a14f", true),
            (Metric::LatP99Us, "latency p99 (wire/x)", "#b07aa1", true),
            (
                Metric::PinnedMeanUs,
                "pinned latency mean (wire/x)",
                "#76b7b2",
                true,
            ),
        ];
        let groups: Vec<&ScenarioInfo> = self
            .scenarios
            .iter()
            .filter(|s| wire_for(&s.name) != s.name && self.ran(&s.name))
            .collect();
        // The median ratio, its interval and whether it rests on undisturbed samples only.
        let value = |s: &str, m: Metric, invert: bool| {
            let r = ratio(&self.runs, s, wire_for(s), m, invert)?;
            Some((r.median?, r.interval, r.clean))
        };
        let max = groups
            .iter()
            .flat_map(|g| {
                metrics.iter().filter_map(|(m, _, _, inv)| {
                    value(&g.name, *m, *inv).map(|(v, i, _)| i.map_or(v, |i| v.max(i.high)))
                })
            })
            .fold(1.2f64, f64::max);
        let top = (max * 5.0).ceil() / 5.0; // round up to 0.2
        let (left, right, plot_top, plot_h) = (60.0, 20.0, 60.0, 300.0);
        let bar_w = 22.0;
        let group_w = bar_w * metrics.len() as f64 + 30.0;
        let width = left + right + group_w * groups.len().max(1) as f64;
        let height = plot_top + plot_h + 90.0;
        let y = |v: f64| plot_top + plot_h - v / top * plot_h;
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="sans-serif" font-size="11">"#
        );
        let _ = writeln!(
            s,
            r#"<rect width="100%" height="100%" fill="white"/><text x="{left}" y="20" font-size="14" font-weight="bold">Ratio to wire (container netns joined by one veth; IPv6 scenarios: to wire-v6), higher is better</text>"#
        );
        let _ = writeln!(
            s,
            r##"<text x="{left}" y="34" fill="#555">medians of per-repetition ratios; whiskers: the median's interval (sign test, 95 % from 6 reps)</text><text x="{left}" y="48" fill="#555">* = only disturbed tests were available; {} rep(s) x {} s; latency as wire/x; {}</text>"##,
            self.plan.reps,
            self.plan.duration_s,
            xml(&self.started_at)
        );
        // Axis and grid.
        let mut tick = 0.0;
        while tick <= top + 1e-9 {
            let ty = y(tick);
            let _ = writeln!(
                s,
                r##"<line x1="{left}" x2="{:.0}" y1="{ty:.1}" y2="{ty:.1}" stroke="#ddd"/><text x="{:.0}" y="{:.1}" text-anchor="end">{tick:.1}</text>"##,
                width - right,
                left - 6.0,
                ty + 4.0
            );
            tick += 0.2;
        }
        let one = y(1.0);
        let _ = writeln!(
            s,
            r##"<line x1="{left}" x2="{:.0}" y1="{one:.1}" y2="{one:.1}" stroke="#c00" stroke-dasharray="5,3"/><text x="{:.0}" y="{:.1}" fill="#c00" text-anchor="end">wire = 1.0</text>"##,
            width - right,
            width - right,
            one - 4.0
        );
        for (gi, g) in groups.iter().enumerate() {
            let gx = left + 15.0 + gi as f64 * group_w;
            for (mi, (metric, _, colour, invert)) in metrics.iter().enumerate() {
                let x = gx + mi as f64 * bar_w;
                match value(&g.name, *metric, *invert) {
                    Some((v, interval, clean)) => {
                        let (top_y, h) = (y(v.min(top)), v.min(top) / top * plot_h);
                        let mark = if clean { "" } else { "*" };
                        let mid = x + (bar_w - 3.0) / 2.0;
                        let range = interval.map_or(String::new(), |i| {
                            format!(" ({:.3}-{:.3}, {:.0} %)", i.low, i.high, i.coverage * 100.0)
                        });
                        let _ = writeln!(
                            s,
                            r#"<rect x="{x:.1}" y="{top_y:.1}" width="{:.1}" height="{h:.1}" fill="{colour}"><title>{} {}: {v:.3}{mark}{range}</title></rect>"#,
                            bar_w - 3.0,
                            xml(&g.name),
                            metric.label(),
                        );
                        let label_y = match interval {
                            Some(i) => {
                                let (lo, hi) = (y(i.low.min(top)), y(i.high.min(top)));
                                let _ = writeln!(
                                    s,
                                    r##"<path d="M{mid:.1} {lo:.1}V{hi:.1}M{:.1} {lo:.1}h6M{:.1} {hi:.1}h6" stroke="#333" fill="none"/>"##,
                                    mid - 3.0,
                                    mid - 3.0
                                );
                                top_y.min(hi)
                            }
                            None => top_y,
                        };
                        let _ = writeln!(
                            s,
                            r#"<text x="{mid:.1}" y="{:.1}" text-anchor="middle" font-size="9">{v:.2}{mark}</text>"#,
                            label_y - 3.0
                        );
                    }
                    None => {
                        let _ = writeln!(
                            s,
                            r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="9" fill="#999">n/a</text>"##,
                            x + (bar_w - 3.0) / 2.0,
                            plot_top + plot_h - 3.0
                        );
                    }
                }
            }
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                gx + bar_w * metrics.len() as f64 / 2.0,
                plot_top + plot_h + 16.0,
                xml(&g.name)
            );
        }
        // Legend.
        let ly = plot_top + plot_h + 40.0;
        for (i, (_, name, colour, _)) in metrics.iter().enumerate() {
            let lx = 10.0 + i as f64 * 155.0;
            let _ = writeln!(
                s,
                r#"<rect x="{lx:.0}" y="{:.0}" width="12" height="12" fill="{colour}"/><text x="{:.0}" y="{:.0}">{name}</text>"#,
                ly,
                lx + 16.0,
                ly + 10.0
            );
        }
        s.push_str("</svg>\n");
        s
    }
}

/// The values of `metric` for `scenario`, leaving out disturbed samples while undisturbed
/// ones exist; the flag says whether they did.
fn samples(runs: &[Run], scenario: &str, metric: Metric) -> (Vec<f64>, bool) {
    let of = |clean_only: bool| -> Vec<f64> {
        runs.iter()
            .filter(|r| r.scenario == scenario)
            .filter(|r| !clean_only || !r.disturbed.contains(&metric))
            .filter_map(|r| r.values.get(&metric).copied())
            .collect()
    };
    let clean = of(true);
    if clean.is_empty() {
        (of(false), false)
    } else {
        (clean, true)
    }
}

/// Per-repetition `x / base` (or `base / x` when `invert`) for `metric`, paired by
/// repetition, from the repetitions where neither side was disturbed (all repetitions when
/// there are none such); `None` when no repetition has both.
fn ratio(runs: &[Run], x: &str, base: &str, metric: Metric, invert: bool) -> Option<Ratio> {
    let value = |name: &str, rep: u32, clean_only: bool| {
        runs.iter()
            .find(|r| r.scenario == name && r.rep == rep)
            .filter(|r| !clean_only || !r.disturbed.contains(&metric))
            .and_then(|r| r.values.get(&metric).copied())
    };
    let mut reps: Vec<u32> = runs.iter().map(|r| r.rep).collect();
    reps.sort_unstable();
    reps.dedup();
    let pairs = |clean_only: bool| -> Vec<f64> {
        reps.iter()
            .filter_map(|&rep| {
                let (a, b) = (value(x, rep, clean_only)?, value(base, rep, clean_only)?);
                (a > 0.0 && b > 0.0).then(|| if invert { b / a } else { a / b })
            })
            .collect()
    };
    let (per_rep, clean) = match pairs(true) {
        p if !p.is_empty() => (p, true),
        _ => (pairs(false), false),
    };
    if per_rep.is_empty() {
        return None;
    }
    Some(Ratio {
        x: x.to_owned(),
        base: base.to_owned(),
        metric,
        median: median(&per_rep),
        interval: median_interval(&per_rep),
        per_rep,
        clean,
    })
}

fn fmt_value(v: Option<f64>, metric: Metric) -> String {
    match (v, metric) {
        (None, _) => "-".into(),
        (
            Some(v),
            Metric::TcpGbps
            | Metric::TcpSteadyGbps
            | Metric::LatMeanUs
            | Metric::LatP99Us
            | Metric::LatP50Us
            | Metric::PinnedMeanUs
            | Metric::PinnedP99Us,
        ) => format!("{v:.2}"),
        (Some(v), Metric::RxWakeIpisPer100Pkts) => format!("{v:.1}"),
        (Some(v), _) => format!("{v:.0}"),
    }
}

/// A target's value with two decimals, or more where two would print the goal's own
/// bound for a value that is not exactly on it (1.7998 against `>= 1.8` prints 1.7998,
/// not a misleading 1.80 next to MISSED).
fn target_value(v: f64, goal: &str) -> String {
    let bound = goal
        .split_whitespace()
        .nth(1)
        .and_then(|b| b.parse::<f64>().ok());
    let mut decimals = 2;
    loop {
        let shown = format!("{v:.decimals$}");
        let on_bound = bound.is_some_and(|b| shown.parse::<f64>().ok() == Some(b) && v != b);
        if !on_bound || decimals >= 6 {
            return shown;
        }
        decimals += 1;
    }
}

/// The targets' table: header and one row per target.
pub fn target_table<'a>(
    targets: impl IntoIterator<Item = &'a Target>,
) -> (Vec<String>, Vec<Vec<String>>) {
    let header: Vec<String> = [
        "target",
        "value",
        "goal",
        "verdict",
        "median's interval",
        "interval clear of the goal",
    ]
    .map(str::to_owned)
    .to_vec();
    let rows: Vec<Vec<String>> = targets
        .into_iter()
        .map(|t| {
            vec![
                t.what.clone(),
                t.value.map_or("-".into(), |v| {
                    format!(
                        "{}{}",
                        target_value(v, &t.goal),
                        if t.clean { "" } else { "*" }
                    )
                }),
                t.goal.clone(),
                match t.met {
                    Some(true) => "met".into(),
                    Some(false) => "MISSED".into(),
                    None => "n/a".into(),
                },
                t.interval.map_or("-".into(), |i| {
                    format!(
                        "{}-{} ({:.0} %)",
                        target_value(i.low, &t.goal),
                        target_value(i.high, &t.goal),
                        i.coverage * 100.0
                    )
                }),
                match t.settled {
                    Some(true) => "yes".into(),
                    Some(false) => "no: within the spread".into(),
                    None => "-".into(),
                },
            ]
        })
        .collect();
    (header, rows)
}

/// One titled table, aligned text or GitHub markdown.
pub fn section(
    out: &mut String,
    markdown: bool,
    title: &str,
    header: &[String],
    rows: &[Vec<String>],
) {
    if markdown {
        let _ = writeln!(out, "\n**{title}**\n");
        let _ = writeln!(out, "| {} |", header.join(" | "));
        let _ = writeln!(
            out,
            "|{}",
            header
                .iter()
                .enumerate()
                .map(|(i, _)| if i == 0 { " --- |" } else { " ---: |" })
                .collect::<String>()
        );
        for r in rows {
            let _ = writeln!(out, "| {} |", r.join(" | "));
        }
        return;
    }
    let _ = writeln!(out, "\n{title}");
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .chain(std::iter::once(&header[i]))
                .map(String::len)
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: &[String]| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if i == 0 {
                    format!("{c:<w$}", w = widths[i])
                } else {
                    format!("{c:>w$}", w = widths[i])
                }
            })
            .collect::<Vec<_>>()
            .join("  ")
    };
    let _ = writeln!(out, "  {}", line(header));
    let _ = writeln!(
        out,
        "  {}",
        "-".repeat(widths.iter().sum::<usize>() + 2 * (widths.len() - 1))
    );
    for r in rows {
        let _ = writeln!(out, "  {}", line(r));
    }
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// One line per run for the progress log.
pub fn summary(run: &Run) -> String {
    let mut parts = Vec::new();
    for (metric, unit) in [
        (Metric::TcpGbps, "Gbit/s"),
        (Metric::UdpKpps, "kpps"),
        (Metric::LatMeanUs, "us mean"),
        (Metric::LatP99Us, "us p99"),
        (Metric::PinnedMeanUs, "us pinned mean"),
    ] {
        if let Some(v) = run.values.get(&metric) {
            parts.push(format!("{v:.2} {unit}"));
        }
    }
    if let Some(a) = run.agents.first() {
        parts.push(format!(
            "agent {:.1} MB, load {:.2} s, {} kernel routes",
            a.rss_bytes.unwrap_or(0) as f64 / (1024.0 * 1024.0),
            a.load_s,
            a.kernel_routes.map_or("?".into(), |n| n.to_string())
        ));
    }
    for (host, st) in &run.xhost_status {
        if let Some(xdp) = st.get("xdp").filter(|x| !x.is_null()) {
            parts.push(format!("{host} xdp {xdp}"));
        }
    }
    if run.loaded {
        parts.push(format!(
            "LOADED ({:.0}% busy before)",
            run.busy_before * 100.0
        ));
    }
    if !run.errors.is_empty() {
        parts.push(format!(
            "ERRORS: {}",
            run.errors
                .iter()
                .map(|e| e.lines().next().unwrap_or_default())
                .collect::<Vec<_>>()
                .join("; ")
        ));
    }
    parts.join(", ")
}

fn machine(xhost_user: &Path) -> Machine {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let model_name = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    let cpus = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let mem_total_kb = read("/proc/meminfo")
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok());
    let git = Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .current_dir(crate::workspace::root())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    Machine {
        kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
        cpus,
        model_name,
        mem_total_kb,
        iperf3: xhost_tests::scenarios::tool_version("iperf3"),
        sockperf: xhost_tests::scenarios::tool_version("sockperf"),
        tcp_congestion_control: std::fs::read_to_string(
            "/proc/sys/net/ipv4/tcp_congestion_control",
        )
        .ok()
        .map(|s| s.trim().to_owned()),
        xhost_user: xhost_user.display().to_string(),
        xhost_user_sha256: Command::new("sha256sum")
            .arg(xhost_user)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .next()
                    .map(str::to_owned)
            }),
        git,
    }
}

/// The current time as ISO 8601 UTC (`2025-11-22T00:05:00Z`), without a date crate.
pub fn now_utc() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format_utc(secs)
}

fn format_utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_values_never_print_the_bound_they_miss() {
        assert_eq!(target_value(1.799_813_9, ">= 1.8"), "1.7998");
        assert_eq!(target_value(0.604, "<= 0.6"), "0.604");
        assert_eq!(target_value(1.8, ">= 1.8"), "1.80");
        assert_eq!(target_value(0.8213, ">= 0.8"), "0.82");
        assert_eq!(target_value(32.07, "< 50 MB"), "32.07");
    }

    #[test]
    fn median_intervals_are_the_sign_test_order_statistics() {
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
        assert_eq!(median_interval(&[]), None);
        assert_eq!(median_interval(&[1.0, f64::NAN]), None);
        // Two samples: the range, covering the median half the time.
        let i = median_interval(&[2.0, 1.0]).expect("interval");
        assert_eq!((i.low, i.high), (1.0, 2.0));
        assert!(close(i.coverage, 0.5));
        // Five: no pair reaches 95 %; the range gives 1 - 2/32.
        let i = median_interval(&[5.0, 1.0, 4.0, 2.0, 3.0]).expect("interval");
        assert_eq!((i.low, i.high), (1.0, 5.0));
        assert!(close(i.coverage, 1.0 - 2.0 / 32.0));
        // Nine (the earlier VM's runs in bench/runs): 2nd to 8th, 1 - 2 * 10/512 = 96.1 %.
        let nine: Vec<f64> = (1..=9).rev().map(f64::from).collect();
        let i = median_interval(&nine).expect("interval");
        assert_eq!((i.low, i.high), (2.0, 8.0));
        assert!(close(i.coverage, 1.0 - 2.0 * 10.0 / 512.0));
        // Twenty: 6th to 15th (P(B <= 5) = 21 700 / 2^20; one further in would be < 95 %).
        let twenty: Vec<f64> = (1..=20).map(f64::from).collect();
        let i = median_interval(&twenty).expect("interval");
        assert_eq!((i.low, i.high), (6.0, 15.0));
        assert!(close(i.coverage, 1.0 - 2.0 * 21_700.0 / 1_048_576.0));
        assert!(i.coverage >= INTERVAL_LEVEL);
    }

    #[test]
    fn a_verdict_is_settled_only_when_the_interval_clears_the_goal() {
        let mut runs = Vec::new();
        for (rep, (x, base)) in [
            (1.10, 1.0),
            (1.25, 1.0),
            (1.30, 1.0),
            (1.22, 1.0),
            (1.21, 1.0),
        ]
        .into_iter()
        .enumerate()
        {
            let rep = rep as u32 + 1;
            let mut a = run(XHOST, rep, Metric::TcpGbps, x);
            a.values.insert(Metric::LatMeanUs, 0.5 * x);
            let mut b = run(IPTABLES, rep, Metric::TcpGbps, base);
            b.values.insert(Metric::LatMeanUs, base);
            runs.extend([a, b, run(WIRE, rep, Metric::TcpGbps, 1.0)]);
        }
        let (plan, scenarios) = plan(5, &[WIRE, IPTABLES, XHOST]);
        let r = Results::new(
            &plan,
            &scenarios,
            runs,
            "now".into(),
            Duration::ZERO,
            Path::new("/nonexistent"),
            None,
            ClusterRuns::default(),
        );
        let target = |what: &str| {
            r.targets
                .iter()
                .find(|t| t.what == what)
                .unwrap_or_else(|| panic!("no target {what}"))
        };
        // Median 1.22 meets >= 1.2, but the interval 1.10-1.30 reaches below it.
        let tcp = target("xhost / iptables-routes: TCP Gbit/s");
        assert_eq!((tcp.met, tcp.settled), (Some(true), Some(false)));
        assert_eq!(tcp.interval.map(|i| (i.low, i.high)), Some((1.10, 1.30)));
        // Latency 0.55-0.65 around a 0.61 median against <= 0.6: missed, not settled.
        let lat = target("xhost / iptables-routes: lat mean us");
        assert_eq!((lat.met, lat.settled), (Some(false), Some(false)));
        let text = r.text_report();
        assert!(text.contains("no: within the spread"), "{text}");
        assert!(text.contains("1.10-1.30 (94 %)"), "{text}");
        // The chart draws the interval as a whisker on the bar (xhost's TCP over wire).
        let svg = r.svg();
        assert!(
            svg.contains("TCP Gbit/s: 1.220 (1.100-1.300, 94 %)") && svg.contains("<path d=\"M"),
            "{svg}"
        );
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0]), Some(3.0));
        assert_eq!(median(&[5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[f64::NAN, 2.0]), Some(2.0));
        assert_eq!(spread(&[1.0]), None);
        assert_eq!(spread(&[1.0, 3.0, 2.0]), Some(1.0));
    }

    /// A plan of `reps` repetitions (one is a --quick run) over the scenarios `names`.
    fn plan(reps: u32, names: &[&'static str]) -> (Plan, Vec<Scenario>) {
        let quick = reps == 1;
        let plan = Plan {
            creations: 100,
            reps,
            duration_s: if quick { 1 } else { 4 },
            scenarios: names.to_vec(),
            quick,
            max_wait_s: if quick { 1 } else { 3 },
        };
        let scenarios = super::super::all_scenarios()
            .into_iter()
            .filter(|s| names.contains(&s.name))
            .collect();
        (plan, scenarios)
    }

    fn run(scenario: &str, rep: u32, metric: Metric, v: f64) -> Run {
        let mut r = Run {
            rep,
            scenario: scenario.into(),
            ..Run::default()
        };
        r.values.insert(metric, v);
        r
    }

    #[test]
    fn ratios_pair_by_repetition() {
        let runs = vec![
            run(WIRE, 1, Metric::UdpKpps, 100.0),
            run(XHOST, 1, Metric::UdpKpps, 90.0),
            run(WIRE, 2, Metric::UdpKpps, 200.0),
            run(XHOST, 2, Metric::UdpKpps, 160.0),
            run(WIRE, 3, Metric::UdpKpps, 100.0),
            // rep 3 of xhost failed: no pair.
        ];
        let r = ratio(&runs, XHOST, WIRE, Metric::UdpKpps, false).expect("ratio");
        assert_eq!(r.per_rep, [0.9, 0.8]);
        assert!((r.median.expect("median") - 0.85).abs() < 1e-12);
        let inv = ratio(&runs, XHOST, WIRE, Metric::UdpKpps, true).expect("ratio");
        assert_eq!(inv.per_rep[1], 1.25);
        assert!(ratio(&runs, XHOST, IPTABLES, Metric::UdpKpps, false).is_none());

        // A disturbed sample is left out while clean pairs exist...
        let mut runs = runs;
        runs[3].disturbed.insert(Metric::UdpKpps);
        let r = ratio(&runs, XHOST, WIRE, Metric::UdpKpps, false).expect("ratio");
        assert_eq!((r.per_rep.as_slice(), r.clean), ([0.9].as_slice(), true));
        assert_eq!(samples(&runs, XHOST, Metric::UdpKpps), (vec![90.0], true));
        // ...and used, flagged, when nothing else is left.
        runs[1].disturbed.insert(Metric::UdpKpps);
        let r = ratio(&runs, XHOST, WIRE, Metric::UdpKpps, false).expect("ratio");
        assert_eq!((r.per_rep.len(), r.clean), (2, false));
        assert!(!samples(&runs, XHOST, Metric::UdpKpps).1);
    }

    #[test]
    fn ipv6_is_compared_with_ipv4_side_by_side() {
        // Per repetition: xhost v4 and v6 TCP and pps, and both wires.
        let mut runs = Vec::new();
        for (rep, (tcp4, tcp6, pps4, pps6)) in [
            (20.0, 19.4, 200.0, 180.0),
            (18.0, 18.0, 210.0, 189.0),
            (21.0, 19.74, 190.0, 174.8),
        ]
        .into_iter()
        .enumerate()
        {
            let rep = rep as u32 + 1;
            let mut x4 = run(XHOST, rep, Metric::TcpGbps, tcp4);
            x4.values.insert(Metric::UdpKpps, pps4);
            let mut x6 = run(XHOST_V6, rep, Metric::TcpGbps, tcp6);
            x6.values.insert(Metric::UdpKpps, pps6);
            let mut w6 = run(WIRE_V6, rep, Metric::TcpGbps, 20.0);
            w6.values.insert(Metric::UdpKpps, 200.0);
            runs.extend([x4, x6, w6, run(WIRE, rep, Metric::TcpGbps, 40.0)]);
        }
        let (plan, scenarios) = plan(3, &[WIRE, XHOST, WIRE_V6, XHOST_V6]);
        let r = Results::new(
            &plan,
            &scenarios,
            runs,
            "now".into(),
            Duration::ZERO,
            Path::new("/nonexistent"),
            None,
            ClusterRuns::default(),
        );
        let median = |x, base, m| r.find_ratio(x, base, m).and_then(|q| q.median);
        let close = |a: Option<f64>, b: f64| a.is_some_and(|a| (a - b).abs() < 1e-9);
        // TCP 0.97, 1.0, 0.94: median 0.97; pps 0.9, 0.9, 0.92: median 0.9.
        assert!(close(median(XHOST_V6, XHOST, Metric::TcpGbps), 0.97));
        assert!(close(median(XHOST_V6, XHOST, Metric::UdpKpps), 0.9));
        assert!(close(median(XHOST_V6, WIRE_V6, Metric::UdpKpps), 0.9));
        assert!(close(median(WIRE_V6, WIRE, Metric::TcpGbps), 0.5));
        // Not run: no row.
        assert!(
            r.find_ratio(XHOST_V6, IP6_ROUTES, Metric::TcpGbps)
                .is_none()
        );
        let target = |what: &str| {
            r.targets
                .iter()
                .find(|t| t.what == what)
                .unwrap_or_else(|| panic!("no target {what}"))
        };
        let tcp = target("xhost-v6 / xhost: TCP Gbit/s");
        assert_eq!((tcp.goal.as_str(), tcp.met), (">= 0.95", Some(true)));
        // 0.94 of the third repetition is below the bound.
        assert_eq!(tcp.settled, Some(false));
        let pps = target("xhost-v6 / xhost: UDP64 kpps");
        assert_eq!((pps.met, pps.settled), (Some(false), Some(true)));
        let md = r.tables(true);
        for row in [
            "| xhost-v6 / xhost | 0.97 |",
            "| xhost-v6 / wire-v6 |",
            "| wire-v6 / wire | 0.50 |",
        ] {
            assert!(md.contains(row), "{row}: {md}");
        }
        // The chart draws the IPv6 scenarios against their own wire: xhost-v6's pps bar
        // is 0.90, not 0.90 x 200 / the IPv4 wire's (which has no pps here).
        let svg = r.svg();
        assert!(
            svg.contains(XHOST_V6) && !svg.contains(">wire-v6<"),
            "{svg}"
        );
    }

    #[test]
    fn formats_dates() {
        assert_eq!(format_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(format_utc(1_763_769_845), "2025-11-22T00:04:05Z");
    }

    #[test]
    fn renders_tables_and_chart() {
        let (plan, scenarios) = plan(1, &[WIRE, XHOST]);
        let mut w = run(WIRE, 1, Metric::TcpGbps, 10.0);
        w.values.insert(Metric::LatMeanUs, 2.0);
        let mut x = run(XHOST, 1, Metric::TcpGbps, 9.5);
        x.values.insert(Metric::LatMeanUs, 2.5);
        let r = Results::new(
            &plan,
            &scenarios,
            vec![w, x],
            "2025-01-01T00:00:00Z".into(),
            Duration::from_secs(1),
            Path::new("/bin/xhost-user"),
            Some(Ok(prog_cost())),
            ClusterRuns::default(),
        );
        assert_eq!(
            r.find_ratio(XHOST, WIRE, Metric::TcpGbps)
                .and_then(|q| q.median),
            Some(0.95)
        );
        let tcp = &r.targets[0];
        assert_eq!((tcp.met, tcp.goal.as_str()), (Some(true), ">= 0.9"));
        assert_eq!(r.targets[2].value, Some(1.25)); // latency x/wire
        assert_eq!(r.targets[3].met, None); // no iptables-routes run
        let text = r.tables(false);
        assert!(text.contains("xhost / wire"), "{text}");
        let md = r.tables(true);
        assert!(md.contains("| xhost / wire | 0.95 |"), "{md}");
        let svg = r.svg();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains(">0.80<"), "latency as wire/x: {svg}");
        assert!(
            md.contains("| 100000 | 160 | 220 | 80 | 150 |")
                && md.contains("| 100000 / 1 | 1.07 | 1.38 | 1.00 | 1.88 |"),
            "{md}"
        );

        // What it writes, and --pool reads back the same targets from summary.json.
        let dir = std::env::temp_dir().join(format!("xtask-report-{}", std::process::id()));
        r.write(&dir).expect("write");
        let written: Vec<String> = ["results.json", "summary.json", "table.md", "ratios.svg"]
            .into_iter()
            .filter(|f| dir.join(f).is_file())
            .map(str::to_owned)
            .collect();
        let summary = std::fs::read_to_string(dir.join("summary.json")).unwrap_or_default();
        let saved = super::super::pool::read(&[dir.join("summary.json")]);
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(written.len(), 4, "{written:?}");
        assert!(
            !summary.contains("\"runs\""),
            "raw samples left in: {summary}"
        );
        let pooled = super::super::pool::pool(&saved.expect("summary.json reads back"));
        let again: Vec<(Option<f64>, Option<bool>)> = pooled
            .iter()
            .map(|p| (p.target.value, p.target.met))
            .collect();
        let first: Vec<(Option<f64>, Option<bool>)> = r
            .targets
            .iter()
            .take(GOALS.len())
            .map(|t| (t.value, t.met))
            .collect();
        assert_eq!(again, first);
    }

    fn prog_cost() -> ProgCost {
        let sample = |program: &str, routes, warm_ns, first_ns| super::super::ProgSample {
            program: program.into(),
            routes,
            warm_ns,
            first_ns,
        };
        ProgCost {
            rounds: 1,
            warm_samples: 1,
            first_samples: 1,
            samples: vec![
                sample("xhost_veth_in", 1, 150.0, 160.0),
                sample("xhost_nic_in", 1, 80.0, 80.0),
                sample("xhost_veth_in", 100_000, 160.0, 220.0),
                sample("xhost_nic_in", 100_000, 80.0, 150.0),
            ],
        }
    }

    #[test]
    fn says_why_the_program_cost_is_missing() {
        let plan = Plan {
            creations: 100,
            reps: 1,
            duration_s: 1,
            scenarios: vec![XHOST],
            quick: true,
            max_wait_s: 1,
        };
        let r = Results::new(
            &plan,
            &[],
            Vec::new(),
            "2025-01-01T00:00:00Z".into(),
            Duration::from_secs(1),
            Path::new("/bin/xhost-user"),
            Some(Err("prog_cost failed (exit status: 1): no root".into())),
            ClusterRuns::default(),
        );
        assert!(
            r.tables(false)
                .contains("not measured: prog_cost failed (exit status: 1): no root"),
            "{}",
            r.tables(false)
        );
    }
}
