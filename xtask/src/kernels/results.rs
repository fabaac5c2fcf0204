//! What a guest reports on its results port (the VM's second serial line): marker lines
//! written by the guest's init around each test binary's own libtest output.
//!
//! ```text
//! @@xhkm kernel 6.1.0-50-cloud-amd64
//! @@xhkm init 4.21                    (guest uptime when init started, seconds)
//! @@xhkm begin datapath tc 9.80
//! ...libtest output of the test binary...
//! @@xhkm end datapath tc 0 95.12      (exit code, uptime)
//! @@xhkm done 95.20
//! ```

/// Prefix of every line the guest's init writes (test output never starts with it).
pub const MARKER: &str = "@@xhkm";

/// Characters of an output line a failure excerpt shows.
const MAX_LINE: usize = 400;

/// One test binary's run inside the guest.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SuiteRun {
    pub suite: String,
    /// Attach method the run was made with (`-` for a suite that attaches nothing).
    pub attach: String,
    /// From libtest's `test result:` line; `None` when the binary printed none.
    pub counts: Option<Counts>,
    /// Tests libtest reported as FAILED, by name.
    pub failed_tests: Vec<String>,
    /// Exit code; `None` when the guest never reported the end (crash, time-out).
    pub exit: Option<i32>,
    /// Guest seconds the run took.
    pub secs: Option<f64>,
    /// Everything the binary printed.
    pub output: String,
    /// The failed tests run once more on their own.
    pub retry: Option<Box<SuiteRun>>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub passed: u32,
    pub failed: u32,
    pub ignored: u32,
}

impl SuiteRun {
    /// Passed: the binary exited 0, libtest reported no failure, and at least one test ran
    /// (a filter that matches nothing must not look like success).
    pub fn ok(&self) -> bool {
        self.clean() || !self.flaky().is_empty()
    }

    fn clean(&self) -> bool {
        self.exit == Some(0) && self.counts.is_some_and(|c| c.failed == 0 && c.passed > 0)
    }

    /// Tests that failed and then passed when run again on their own: all of the failed
    /// ones, or none (a run with any test failing twice is not flaky but failed).
    pub fn flaky(&self) -> Vec<String> {
        let Some(retry) = self.retry.as_deref() else {
            return Vec::new();
        };
        let failed = self.counts.map_or(0, |c| c.failed as usize);
        let all_passed = retry.clean()
            && retry.counts.is_some_and(|c| c.passed as usize == failed)
            && failed == self.failed_tests.len();
        if all_passed {
            self.failed_tests.clone()
        } else {
            Vec::new()
        }
    }

    /// Tests that failed and, run again, failed again (or were not run again).
    pub fn failed_twice(&self) -> Vec<String> {
        match self.retry.as_deref() {
            Some(retry) if retry.counts.is_some() => retry.failed_tests.clone(),
            _ => self.failed_tests.clone(),
        }
    }

    /// [`SuiteRun::ok`], or every test that failed twice is one of `known` (a known
    /// failure on this kernel) and the run otherwise completed.
    pub fn ok_except(&self, known: &[&str]) -> bool {
        if self.ok() {
            return true;
        }
        let still = self.failed_twice();
        let complete = self.exit.is_some()
            && self
                .counts
                .is_some_and(|c| c.passed > 0 && c.failed as usize == self.failed_tests.len());
        complete && !still.is_empty() && still.iter().all(|t| known.contains(&t.as_str()))
    }

    /// libtest's `failures:` section (panic messages, verifier logs), else the output's
    /// last lines: what a reader needs to see first.
    pub fn failure_excerpt(&self, max_lines: usize) -> String {
        let lines: Vec<&str> = self.output.lines().collect();
        let start = lines
            .iter()
            .position(|l| *l == "failures:")
            .unwrap_or(lines.len().saturating_sub(max_lines));
        let shown = &lines[start..];
        // Frames printed as byte arrays run to thousands of characters a line.
        let mut text = shown
            .iter()
            .take(max_lines)
            .map(|l| match l.char_indices().nth(MAX_LINE) {
                Some((at, _)) => format!("{} ...", &l[..at]),
                None => (*l).to_owned(),
            })
            .collect::<Vec<_>>()
            .join("\n");
        if shown.len() > max_lines {
            text.push_str(&format!("\n... ({} more lines)", shown.len() - max_lines));
        }
        text
    }
}

/// The whole report of one guest.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Report {
    /// `uname -r` inside the guest.
    pub kernel: Option<String>,
    /// Guest uptime when init started: the kernel's own boot time.
    pub init_uptime: Option<f64>,
    /// Modules the guest could not load.
    pub missing_modules: Vec<String>,
    pub runs: Vec<SuiteRun>,
    /// Guest uptime when init finished every run.
    pub done_uptime: Option<f64>,
}

impl Report {
    /// Init reached its end (every run reported, nothing cut short).
    pub fn complete(&self) -> bool {
        self.done_uptime.is_some()
    }
}

/// Parses the results port's text (CR/LF as a serial line delivers it).
pub fn parse(text: &str) -> Report {
    let mut report = Report::default();
    let mut current: Option<(SuiteRun, f64)> = None;
    let mut retrying = false;
    for raw in text.lines() {
        let line = raw.trim_end_matches('\r');
        let Some(rest) = line.strip_prefix(MARKER) else {
            if let Some((run, _)) = current.as_mut() {
                run.output.push_str(line);
                run.output.push('\n');
                scan_libtest_line(run, line);
            }
            continue;
        };
        let words: Vec<&str> = rest.split_whitespace().collect();
        let num = |i: usize| words.get(i).and_then(|w| w.parse::<f64>().ok());
        match words.first().copied() {
            Some("kernel") => report.kernel = words.get(1).map(|s| (*s).to_owned()),
            Some("init") => report.init_uptime = num(1),
            Some("missing-module") => report
                .missing_modules
                .extend(words[1..].iter().map(|s| (*s).to_owned())),
            Some(kind @ ("begin" | "begin-retry")) if words.len() >= 3 => {
                // A begin without an end: the previous run was cut short.
                if let Some((run, _)) = current.take() {
                    report.runs.push(run);
                }
                let run = SuiteRun {
                    suite: words[1].to_owned(),
                    attach: words[2].to_owned(),
                    ..SuiteRun::default()
                };
                current = Some((run, num(3).unwrap_or(0.0)));
                retrying = kind == "begin-retry";
            }
            Some("end" | "end-retry") if words.len() >= 4 => {
                if let Some((mut run, began)) = current.take() {
                    run.exit = words[3].parse().ok();
                    run.secs = num(4).map(|t| t - began);
                    let first = report
                        .runs
                        .iter_mut()
                        .rev()
                        .find(|r| r.suite == run.suite && r.attach == run.attach);
                    match first {
                        Some(first) if retrying => first.retry = Some(Box::new(run)),
                        _ => report.runs.push(run),
                    }
                }
                retrying = false;
            }
            Some("done") => report.done_uptime = num(1),
            _ => {}
        }
    }
    if let Some((run, _)) = current {
        report.runs.push(run);
    }
    report
}

/// Picks libtest's per-test verdicts and its summary out of one output line.
fn scan_libtest_line(run: &mut SuiteRun, line: &str) {
    if let Some(name) = line
        .strip_prefix("test ")
        .and_then(|l| l.strip_suffix(" ... FAILED"))
    {
        run.failed_tests.push(name.to_owned());
    }
    // `test result: ok. 10 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; ...`
    if let Some(rest) = line.strip_prefix("test result: ") {
        let mut counts = Counts::default();
        for part in rest.split(';') {
            let mut w = part.split_whitespace().rev();
            let (Some(what), Some(n)) = (w.next(), w.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u32>() else { continue };
            match what {
                "passed" => counts.passed = n,
                "failed" => counts.failed = n,
                "ignored" => counts.ignored = n,
                _ => {}
            }
        }
        run.counts = Some(counts);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUEST: &str = "\
@@xhkm kernel 5.10.0-32-cloud-amd64\r
@@xhkm init 6.50\r
@@xhkm missing-module act_bpf\r
@@xhkm begin prog_test_run - 7.00\r
\r
running 2 tests\r
test ingress_redirects_to_peer ... ok\r
test egress_drops_spoofed ... FAILED\r
\r
failures:\r
\r
---- egress_drops_spoofed stdout ----\r
verifier: R1 invalid mem access 'inv'\r
\r
failures:\r
    egress_drops_spoofed\r
\r
test result: FAILED. 1 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.20s\r
\r
@@xhkm end prog_test_run - 101 9.50\r
@@xhkm begin datapath tc 9.60\r
running 1 test\r
test containers_reach_each_other_only_through_xhost ... ok\r
\r
test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 20 filtered out; finished in 30.00s\r
@@xhkm end datapath tc 0 40.10\r
@@xhkm done 40.20\r
";

    #[test]
    fn parses_runs_counts_and_times() {
        let r = parse(GUEST);
        assert_eq!(r.kernel.as_deref(), Some("5.10.0-32-cloud-amd64"));
        assert_eq!(r.init_uptime, Some(6.5));
        assert_eq!(r.missing_modules, ["act_bpf"]);
        assert!(r.complete());
        assert_eq!(r.runs.len(), 2);
        let p = &r.runs[0];
        assert_eq!(
            (p.suite.as_str(), p.attach.as_str()),
            ("prog_test_run", "-")
        );
        assert_eq!(
            p.counts,
            Some(Counts {
                passed: 1,
                failed: 1,
                ignored: 0
            })
        );
        assert_eq!(p.failed_tests, ["egress_drops_spoofed"]);
        assert_eq!(p.exit, Some(101));
        assert!(!p.ok());
        assert!(p.failure_excerpt(20).contains("R1 invalid mem access"));
        let d = &r.runs[1];
        assert!(d.ok(), "{d:?}");
        assert_eq!(d.attach, "tc");
        assert!((d.secs.unwrap_or(0.0) - 30.5).abs() < 1e-9);
    }

    #[test]
    fn a_retry_passing_every_failed_test_is_flaky_not_failed() {
        let first = "@@xhkm begin prog_test_run - 1.0\n\
                     test a ... ok\ntest b ... FAILED\n\
                     test result: FAILED. 1 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out\n\
                     @@xhkm end prog_test_run - 101 2.0\n";
        let retry_ok = "@@xhkm begin-retry prog_test_run - 2.0\ntest b ... ok\n\
                        test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 1 filtered out\n\
                        @@xhkm end-retry prog_test_run - 0 3.0\n@@xhkm done 3.0\n";
        let r = parse(&format!("{first}{retry_ok}"));
        assert_eq!(r.runs.len(), 1);
        assert!(r.runs[0].ok());
        assert_eq!(r.runs[0].flaky(), ["b"]);
        let retry_failed = retry_ok
            .replace("test b ... ok", "test b ... FAILED")
            .replace("ok. 1 passed; 0 failed", "FAILED. 0 passed; 1 failed")
            .replace("- 0 3.0", "- 101 3.0");
        let r = parse(&format!("{first}{retry_failed}"));
        assert!(!r.runs[0].ok(), "failed twice");
        assert!(r.runs[0].flaky().is_empty());
        assert!(!parse(first).runs[0].ok(), "no retry");
        assert!(r.runs[0].ok_except(&["b"]), "a known failure");
        assert!(!r.runs[0].ok_except(&["c"]), "an unknown one");
    }

    #[test]
    fn a_run_cut_short_or_running_nothing_is_not_ok() {
        let cut = parse("@@xhkm begin datapath tcx 1.0\nrunning 4 tests\ntest a ... ok\n");
        assert!(!cut.complete());
        assert_eq!(cut.runs.len(), 1);
        assert!(!cut.runs[0].ok(), "no end, no summary");
        let none = parse(
            "@@xhkm begin datapath tcx 1.0\n\
             test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 21 filtered out\n\
             @@xhkm end datapath tcx 0 2.0\n@@xhkm done 2.0\n",
        );
        assert!(!none.runs[0].ok(), "a filter matching nothing");
    }
}
