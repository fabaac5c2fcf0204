//! `xhost-user status --watch`: the datapath's counters as rates per
//! second (packets and bytes, drops by reason), refreshed in the terminal.

use std::{
    collections::BTreeMap,
    io::{IsTerminal as _, Write as _},
    time::{Duration, Instant},
};

use crate::{layout::Layout, report::CounterRow};

/// One counter's rate over an interval.
#[derive(Clone, Debug, PartialEq)]
pub struct Rate {
    pub name: String,
    pub pps: f64,
    pub bytes_per_s: f64,
}

/// Rates between two reads of `STATS` taken `secs` apart. A counter that
/// went down (the datapath was loaded anew) counts from zero.
pub fn rates(
    prev: &BTreeMap<String, CounterRow>,
    cur: &BTreeMap<String, CounterRow>,
    secs: f64,
) -> Vec<Rate> {
    cur.iter()
        .map(|(name, c)| {
            let p = prev.get(name).copied().unwrap_or_default();
            let (dp, db) = if c.packets < p.packets {
                (c.packets, c.bytes)
            } else {
                (c.packets - p.packets, c.bytes.saturating_sub(p.bytes))
            };
            Rate {
                name: name.clone(),
                pps: dp as f64 / secs,
                bytes_per_s: db as f64 / secs,
            }
        })
        .collect()
}

/// One screen: totals per verdict, then every counter.
pub fn render(rates: &[Rate], secs: f64) -> String {
    let total = |verdict: &str| -> f64 {
        rates
            .iter()
            .filter(|r| r.name.split('_').next() == Some(verdict))
            // fold from +0.0: an empty `sum` of floats is -0.0.
            .fold(0.0, |acc, r| acc + r.pps)
    };
    let mut out = format!(
        "per second over {secs:.2} s: fwd {:.0} pps, pass {:.0} pps, drop {:.0} pps\n",
        total("fwd"),
        total("pass"),
        total("drop")
    );
    out.push_str(&format!(
        "  {:<16} {:>12} {:>14}\n",
        "counter", "pps", "bit/s"
    ));
    for r in rates {
        out.push_str(&format!(
            "  {:<16} {:>12.1} {:>14.0}\n",
            r.name,
            r.pps,
            r.bytes_per_s * 8.0
        ));
    }
    out
}

/// Prints the rates every `interval`, `count` times or until interrupted.
/// On a terminal each screen replaces the last; elsewhere (a pipe, a log)
/// screens follow each other, separated by a blank line.
pub fn watch(layout: &Layout, interval: Duration, count: Option<u64>) -> anyhow::Result<()> {
    if crate::report::AgentState::read(layout)
        .is_ok_and(|a| a.datapath == crate::report::DatapathKind::Kernel)
    {
        anyhow::bail!("the kernel datapath keeps no counters to watch: `status` lists its rules");
    }
    crate::report::ensure_loaded(layout)?;
    let tty = std::io::stdout().is_terminal();
    let mut prev = crate::report::read_counters(layout)?;
    let mut t_prev = Instant::now();
    let mut shown = 0u64;
    while count.is_none_or(|n| shown < n) {
        std::thread::sleep(interval);
        let cur = crate::report::read_counters(layout)?;
        let now = Instant::now();
        let secs = now.duration_since(t_prev).as_secs_f64();
        let screen = render(&rates(&prev, &cur, secs), secs);
        let mut out = std::io::stdout().lock();
        if tty {
            // Cursor home, clear screen.
            write!(out, "\x1b[H\x1b[2J{screen}")?;
        } else {
            write!(out, "{}{screen}", if shown > 0 { "\n" } else { "" })?;
        }
        out.flush()?;
        (prev, t_prev) = (cur, now);
        shown += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(packets: u64, bytes: u64) -> CounterRow {
        CounterRow { packets, bytes }
    }

    #[test]
    fn rates_per_second_and_after_a_reload() {
        let prev = BTreeMap::from([
            ("fwd_egress".to_owned(), row(100, 10_000)),
            ("drop_spoofed".to_owned(), row(50, 5_000)),
        ]);
        let cur = BTreeMap::from([
            ("fwd_egress".to_owned(), row(300, 30_000)),
            ("drop_spoofed".to_owned(), row(10, 1_000)),
        ]);
        let r = rates(&prev, &cur, 2.0);
        assert_eq!(
            r,
            [
                Rate {
                    name: "drop_spoofed".into(),
                    pps: 5.0,
                    bytes_per_s: 500.0
                },
                Rate {
                    name: "fwd_egress".into(),
                    pps: 100.0,
                    bytes_per_s: 10_000.0
                },
            ]
        );
        let screen = render(&r, 2.0);
        assert!(
            screen.starts_with("per second over 2.00 s: fwd 100 pps, pass 0 pps, drop 5 pps\n"),
            "{screen}"
        );
        assert!(
            screen.contains("  fwd_egress              100.0          80000\n"),
            "{screen}"
        );
    }
}
