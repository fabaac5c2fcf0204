//! `cargo xtask bench --pool`: the ratio targets checked on the repetitions of several
//! earlier runs taken together.
//!
//! One run's verdict on a target whose ratio sits near its bound is decided by the level
//! the paths happened to hold over that run's repetitions. Every repetition's ratio is
//! still measured within that repetition; pooling the per-repetition ratios of several
//! runs on the same machine gives the median more samples and a narrower interval, so a
//! target is shown met or missed with all of them behind it, or shown to sit on its bound.
//! It runs nothing: it reads the runs' `results.json` or `summary.json`.

use std::{collections::BTreeSet, fmt::Write as _, path::PathBuf};

use anyhow::{Context as _, bail};
use serde::Deserialize;

use super::report::{self, GOALS, Goal, Machine, Ratio, Target, median, median_interval};

/// What `--pool` reads back of a run's `results.json` (or `summary.json`).
#[derive(Debug, Deserialize)]
pub struct SavedRun {
    pub started_at: String,
    pub plan: SavedPlan,
    pub machine: Machine,
    pub ratios: Vec<SavedRatio>,
}

#[derive(Debug, Deserialize)]
pub struct SavedPlan {
    pub reps: u32,
}

#[derive(Debug, Deserialize)]
pub struct SavedRatio {
    pub x: String,
    pub base: String,
    /// A metric's JSON name (`udp_kpps`, ...); names this build does not know are kept
    /// and never asked for.
    pub metric: String,
    pub per_rep: Vec<f64>,
    pub clean: bool,
}

impl SavedRun {
    fn ratio(&self, g: &Goal) -> Option<&SavedRatio> {
        let metric = g.metric.json_name();
        self.ratios
            .iter()
            .find(|r| r.x == g.x && r.base == g.base && r.metric == metric)
    }
}

/// One goal over the pooled runs.
#[derive(Debug)]
pub struct PooledTarget {
    pub target: Target,
    /// Repetitions pooled.
    pub reps: usize,
    /// Each run's own median, in the order given (`None`: not measured in that run).
    pub per_run: Vec<Option<f64>>,
}

/// Reads the runs at `paths`: every one a bench `results.json` or `summary.json`, all of
/// one machine, each run once.
pub fn read(paths: &[PathBuf]) -> anyhow::Result<Vec<SavedRun>> {
    let mut runs: Vec<SavedRun> = Vec::with_capacity(paths.len());
    for path in paths {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("--pool: reading {}", path.display()))?;
        let run: SavedRun = serde_json::from_str(&text).with_context(|| {
            format!(
                "--pool: {} is not a bench results.json or summary.json",
                path.display()
            )
        })?;
        if let Some(first) = runs.first() {
            let (a, b) = (&first.machine, &run.machine);
            if (&a.kernel, a.cpus, &a.model_name) != (&b.kernel, b.cpus, &b.model_name) {
                bail!(
                    "--pool: {} ran on another machine ({}, {} x {}) than {} ({}, {} x {}); \
                     ratios of different machines do not pool",
                    path.display(),
                    b.kernel,
                    b.cpus,
                    b.model_name,
                    paths[0].display(),
                    a.kernel,
                    a.cpus,
                    a.model_name
                );
            }
        }
        if let Some(i) = runs.iter().position(|r| r.started_at == run.started_at) {
            bail!(
                "--pool: {} and {} are the same run (started {}); each run counts once",
                paths[i].display(),
                path.display(),
                run.started_at
            );
        }
        runs.push(run);
    }
    Ok(runs)
}

/// The ratio goals checked on the per-repetition ratios of all `runs` together.
pub fn pool(runs: &[SavedRun]) -> Vec<PooledTarget> {
    GOALS
        .iter()
        .map(|g| {
            let found: Vec<&SavedRatio> = runs.iter().filter_map(|r| r.ratio(g)).collect();
            let per_rep: Vec<f64> = found
                .iter()
                .flat_map(|r| r.per_rep.iter().copied())
                .collect();
            let ratio = (!per_rep.is_empty()).then(|| Ratio {
                x: g.x.to_owned(),
                base: g.base.to_owned(),
                metric: g.metric,
                median: median(&per_rep),
                interval: median_interval(&per_rep),
                clean: found.iter().all(|r| r.clean),
                per_rep,
            });
            PooledTarget {
                target: g.check(ratio.as_ref()),
                reps: ratio.as_ref().map_or(0, |r| r.per_rep.len()),
                per_run: runs
                    .iter()
                    .map(|r| r.ratio(g).and_then(|q| median(&q.per_rep)))
                    .collect(),
            }
        })
        .collect()
}

/// The report: the runs pooled, then the targets' table with the repetitions behind each
/// pooled median and each run's own.
pub fn text(paths: &[PathBuf], runs: &[SavedRun], pooled: &[PooledTarget]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "\nxhost bench --pool: {} run(s)", runs.len());
    for (i, (path, r)) in paths.iter().zip(runs).enumerate() {
        let sha: String = r
            .machine
            .xhost_user_sha256
            .as_deref()
            .unwrap_or("-")
            .chars()
            .take(12)
            .collect();
        let _ = writeln!(
            out,
            "  run {}: {} | {} | {} reps | git {} | xhost-user sha256 {}",
            i + 1,
            path.display(),
            r.started_at,
            r.plan.reps,
            r.machine.git.as_deref().unwrap_or("-"),
            sha
        );
    }
    if let Some(r) = runs.first() {
        let _ = writeln!(
            out,
            "  machine: kernel {}, {} x {}",
            r.machine.kernel, r.machine.cpus, r.machine.model_name
        );
    }
    let builds: BTreeSet<Option<&str>> = runs
        .iter()
        .map(|r| r.machine.xhost_user_sha256.as_deref())
        .collect();
    if builds.len() > 1 {
        let _ = writeln!(
            out,
            "  {} different xhost-user builds: pooling says something only where their \
             datapaths are the same",
            builds.len()
        );
    }
    let (mut header, mut rows) = report::target_table(pooled.iter().map(|p| &p.target));
    header.push("reps".into());
    header.push("each run's median".into());
    for (row, p) in rows.iter_mut().zip(pooled) {
        row.push(p.reps.to_string());
        row.push(
            p.per_run
                .iter()
                .map(|v| v.map_or("-".into(), |v| format!("{v:.3}")))
                .collect::<Vec<_>>()
                .join(" "),
        );
    }
    report::section(
        &mut out,
        false,
        "Targets on the runs' repetitions pooled (verdict on the median of all their \
         per-repetition ratios; interval: sign-test confidence interval of that median)",
        &header,
        &rows,
    );
    out
}

/// `cargo xtask bench --pool <results.json>...`.
pub fn run(paths: &[PathBuf]) -> anyhow::Result<()> {
    let runs = read(paths)?;
    print!("{}", text(paths, &runs, &pool(&runs)));
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use serde_json::json;

    use super::*;
    use crate::bench::{IPTABLES, WIRE, XHOST};

    /// A run of xhost / wire pps ratios `pps` (and xhost / iptables-routes TCP when
    /// `tcp` is given), in the JSON the bench writes.
    fn saved(started_at: &str, pps: &[f64], tcp: Option<&[f64]>) -> serde_json::Value {
        let mut ratios = vec![json!({
            "x": XHOST, "base": WIRE, "metric": "udp_kpps", "per_rep": pps,
            "median": null, "interval": null, "clean": true,
        })];
        if let Some(t) = tcp {
            ratios.push(json!({
                "x": XHOST, "base": IPTABLES, "metric": "tcp_gbps", "per_rep": t,
                "median": null, "interval": null, "clean": false,
            }));
        }
        // A metric this build does not know is read and left alone.
        ratios.push(json!({
            "x": XHOST, "base": WIRE, "metric": "gone_metric", "per_rep": [9.0],
            "clean": true,
        }));
        json!({
            "started_at": started_at,
            "wall_s": 1.0,
            "plan": {"reps": pps.len(), "duration_s": 4},
            "machine": {
                "kernel": "6.18.44", "cpus": 2, "model_name": "AMD EPYC",
                "xhost_user": "/bench/xhost-user", "git": "abc1234",
                "xhost_user_sha256": started_at,
            },
            "ratios": ratios,
            "targets": [],
        })
    }

    /// A directory of its own under the system's temporary one, removed when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let p = std::env::temp_dir().join(format!("xtask-pool-{name}-{}", std::process::id()));
            std::fs::create_dir_all(&p).expect("temp dir");
            Self(p)
        }

        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn write(dir: &Path, name: &str, v: &serde_json::Value) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, v.to_string()).expect("write");
        p
    }

    fn target<'a>(pooled: &'a [PooledTarget], what: &str) -> &'a PooledTarget {
        pooled
            .iter()
            .find(|p| p.target.what == what)
            .expect("target")
    }

    #[test]
    fn pools_the_repetitions_of_every_run() {
        let dir = TempDir::new("pools");
        // Alone, the first run meets pps >= 0.8 and the second misses it.
        let a = write(
            dir.path(),
            "a.json",
            &saved(
                "2026-11-01",
                &[0.81, 0.83, 0.82, 0.79, 0.84],
                Some(&[1.5, 1.0]),
            ),
        );
        let b = write(
            dir.path(),
            "b.json",
            &saved("2026-11-02", &[0.78, 0.77, 0.79, 0.80, 0.76], None),
        );
        let paths = vec![a, b];
        let runs = read(&paths).expect("read");
        let pooled = pool(&runs);
        assert_eq!(pooled.len(), GOALS.len());

        let pps = target(&pooled, "xhost / wire: UDP64 kpps");
        assert_eq!(pps.reps, 10);
        assert_eq!(pps.per_run, vec![Some(0.82), Some(0.78)]);
        // The median of all ten: (0.79 + 0.80) / 2.
        let v = pps.target.value.expect("value");
        assert!((v - 0.795).abs() < 1e-12, "{v}");
        assert_eq!(pps.target.met, Some(false));
        // Ten samples: 2nd to 9th smallest (0.77 and 0.83), which straddle 0.8.
        let i = pps.target.interval.expect("interval");
        assert_eq!((i.low, i.high), (0.77, 0.83));
        assert_eq!(pps.target.settled, Some(false));
        assert!(pps.target.clean);

        // Measured in one run only: that run's repetitions, and its disturbed flag.
        let tcp = target(&pooled, "xhost / iptables-routes: TCP Gbit/s");
        assert_eq!((tcp.reps, tcp.per_run.clone()), (2, vec![Some(1.25), None]));
        assert_eq!(tcp.target.met, Some(true));
        assert!(!tcp.target.clean);

        // Measured in none: no verdict.
        let lat = target(&pooled, "xhost / wire: lat mean us");
        assert_eq!(
            (lat.reps, lat.target.value, lat.target.met),
            (0, None, None)
        );

        let out = text(&paths, &runs, &pooled);
        assert!(out.contains("2 run(s)"), "{out}");
        assert!(out.contains("2 different xhost-user builds"), "{out}");
        let row = out
            .lines()
            .find(|l| l.contains("xhost / wire: UDP64 kpps"))
            .expect("pps row");
        for cell in [
            "MISSED",
            "0.77-0.83",
            "no: within the spread",
            "0.820 0.780",
        ] {
            assert!(row.contains(cell), "{cell} missing: {row}");
        }
    }

    #[test]
    fn pool_takes_files_and_no_run_options() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            bench: crate::bench::Options,
        }
        use clap::Parser as _;
        let cli = Cli::try_parse_from(["bench", "--pool", "a.json,b.json", "--pool", "c.json"])
            .expect("parses");
        let want: Vec<PathBuf> = ["a.json", "b.json", "c.json"].map(PathBuf::from).to_vec();
        assert_eq!(cli.bench.pool, want);
        for other in [
            &["--reps", "3"][..],
            &["--quick"],
            &["--scenarios", "xhost"],
            &["--out", "d"],
        ] {
            let mut args = vec!["bench", "--pool", "a.json"];
            args.extend_from_slice(other);
            let e = Cli::try_parse_from(&args)
                .err()
                .expect("refused")
                .to_string();
            assert!(e.contains("cannot be used with"), "{other:?}: {e}");
        }
    }

    #[test]
    fn refuses_what_does_not_pool() {
        let dir = TempDir::new("refuses");
        let a = write(dir.path(), "a.json", &saved("2026-11-01", &[0.8], None));
        let again = write(dir.path(), "again.json", &saved("2026-11-01", &[0.8], None));
        let mut elsewhere = saved("2026-11-03", &[0.8], None);
        elsewhere["machine"]["model_name"] = json!("Intel Xeon");
        let elsewhere = write(dir.path(), "elsewhere.json", &elsewhere);
        let broken = write(dir.path(), "broken.json", &json!({"runs": []}));
        let missing = dir.path().join("missing.json");

        let err = |paths: &[&PathBuf]| {
            let owned: Vec<PathBuf> = paths.iter().map(|p| (*p).clone()).collect();
            format!("{:#}", read(&owned).expect_err("refused"))
        };
        let e = err(&[&a, &again]);
        assert!(
            e.contains("are the same run") && e.contains("again.json"),
            "{e}"
        );
        let e = err(&[&a, &elsewhere]);
        assert!(
            e.contains("another machine") && e.contains("Intel Xeon"),
            "{e}"
        );
        let e = err(&[&a, &broken]);
        assert!(e.contains("broken.json is not a bench results.json"), "{e}");
        let e = err(&[&missing]);
        assert!(e.contains("reading") && e.contains("missing.json"), "{e}");
    }
}
