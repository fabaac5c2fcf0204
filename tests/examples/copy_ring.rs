//! `copy_ring`: how steady is this machine's memory path, with no network in it?
//!
//! The data movement of a single-stream TCP test without the TCP: a thread on CPU 0 copies
//! a hot 64 KB block into the slots of a ring (the sender filling socket buffers), a thread
//! on CPU 1 copies each slot out (the receiver reading them). Prints the rate of every
//! `--window` and then how often it fell below `--slump` of its median. The bench's TCP
//! tests slump the same way on every path; this shows whether the machine does it alone.
//!
//! `cargo run --release -p xhost-tests --example copy_ring -- --secs 60`

use std::{
    hint::spin_loop,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Parser;
use nix::{
    sched::{CpuSet, sched_setaffinity},
    unistd::Pid,
};
use xhost_tests::scenarios::median;

const SLOT: usize = 64 * 1024;

#[derive(Parser)]
#[command(about = "Cross-CPU copy loop: the machine's own throughput steadiness")]
struct Cli {
    /// Seconds to run.
    #[arg(long, default_value_t = 30.0)]
    secs: f64,
    /// Slots of 64 KB in the ring (256: 16 MB, about a TCP test's buffers in flight).
    #[arg(long, default_value_t = 256)]
    slots: usize,
    /// Seconds per printed rate.
    #[arg(long, default_value_t = 0.25)]
    window: f64,
    /// A window below this fraction of the median counts as a slump.
    #[arg(long, default_value_t = 0.8)]
    slump: f64,
    /// CPU of the writer and of the reader.
    #[arg(long, num_args = 2, default_values_t = [0, 1])]
    cpus: Vec<usize>,
}

/// One slot of the ring: the bytes and whether they wait for the reader.
struct Slot {
    full: AtomicBool,
    bytes: std::cell::UnsafeCell<Box<[u8]>>,
}

// SAFETY: a slot's bytes are written only by the writer while `full` is false and read
// only by the reader while it is true; `full` is stored with Release after each side's
// access and loaded with Acquire before the other's.
unsafe impl Sync for Slot {}

fn pin(cpu: usize) -> anyhow::Result<()> {
    let mut set = CpuSet::new();
    set.set(cpu).with_context(|| format!("CPU {cpu}"))?;
    sched_setaffinity(Pid::from_raw(0), &set).with_context(|| format!("pinning to CPU {cpu}"))
}

/// Windows below `fraction` of the median rate, and the runs of consecutive ones.
fn slumps(rates: &[f64], fraction: f64) -> (usize, Vec<usize>) {
    let Some(m) = median(rates) else {
        return (0, Vec::new());
    };
    let mut runs = Vec::new();
    let mut current = 0;
    for &r in rates {
        if r < fraction * m {
            current += 1;
        } else if current > 0 {
            runs.push(current);
            current = 0;
        }
    }
    if current > 0 {
        runs.push(current);
    }
    (runs.iter().sum(), runs)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if cli.slots == 0 || cli.window <= 0.0 || cli.secs < cli.window {
        bail!("--slots must be > 0 and --secs at least one --window");
    }
    let (writer_cpu, reader_cpu) = (cli.cpus[0], cli.cpus[1]);
    let ring: Arc<Vec<Slot>> = Arc::new(
        (0..cli.slots)
            .map(|_| Slot {
                full: AtomicBool::new(false),
                bytes: std::cell::UnsafeCell::new(vec![1u8; SLOT].into_boxed_slice()),
            })
            .collect(),
    );
    let copied = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));

    let reader = {
        let (ring, stop) = (ring.clone(), stop.clone());
        thread::spawn(move || -> anyhow::Result<()> {
            pin(reader_cpu)?;
            let mut out = vec![0u8; SLOT];
            for slot in ring.iter().cycle() {
                while !slot.full.load(Ordering::Acquire) {
                    if stop.load(Ordering::Relaxed) {
                        return Ok(());
                    }
                    spin_loop();
                }
                // SAFETY: `full` is set: the writer is done with this slot until it is cleared.
                out.copy_from_slice(unsafe { &*slot.bytes.get() });
                slot.full.store(false, Ordering::Release);
            }
            Ok(())
        })
    };
    let writer = {
        let (ring, stop, copied) = (ring.clone(), stop.clone(), copied.clone());
        thread::spawn(move || -> anyhow::Result<()> {
            pin(writer_cpu)?;
            let block = vec![2u8; SLOT];
            for slot in ring.iter().cycle() {
                while slot.full.load(Ordering::Acquire) {
                    if stop.load(Ordering::Relaxed) {
                        return Ok(());
                    }
                    spin_loop();
                }
                // SAFETY: `full` is clear: the reader is done with this slot until it is set.
                unsafe { &mut *slot.bytes.get() }.copy_from_slice(&block);
                slot.full.store(true, Ordering::Release);
                copied.fetch_add(SLOT as u64, Ordering::Relaxed);
            }
            Ok(())
        })
    };

    let window = Duration::from_secs_f64(cli.window);
    let start = Instant::now();
    let (mut rates, mut last, mut next) = (Vec::new(), 0u64, start + window);
    // A thread ends early only when it could not be pinned: stop and report that.
    while next <= start + Duration::from_secs_f64(cli.secs)
        && !writer.is_finished()
        && !reader.is_finished()
    {
        thread::sleep(next.saturating_duration_since(Instant::now()));
        let now = copied.load(Ordering::Relaxed);
        let gbps = (now - last) as f64 * 8.0 / cli.window / 1e9;
        print!("{gbps:.0} ");
        rates.push(gbps);
        (last, next) = (now, next + window);
    }
    println!();
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("writer thread")?;
    reader.join().expect("reader thread")?;

    let m = median(&rates).context("no window completed")?;
    let (slow, runs) = slumps(&rates, cli.slump);
    println!(
        "copy ring CPU {writer_cpu} -> CPU {reader_cpu}, {} x 64 KB: median {m:.0} Gbit/s over {} windows of {} s; {slow} windows ({:.1} %) below {}x the median, in {} slumps (longest {} windows), lowest {:.2}x",
        cli.slots,
        rates.len(),
        cli.window,
        100.0 * slow as f64 / rates.len() as f64,
        cli.slump,
        runs.len(),
        runs.iter().max().unwrap_or(&0),
        rates.iter().copied().fold(f64::INFINITY, f64::min) / m,
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::slumps;

    #[test]
    fn slumps_count_windows_below_the_fraction_of_the_median_and_their_runs() {
        let rates = [10.0, 10.0, 5.0, 4.0, 10.0, 10.0, 7.9, 10.0, 6.0];
        assert_eq!(slumps(&rates, 0.8), (4, vec![2, 1, 1]));
        assert_eq!(slumps(&rates, 0.5), (1, vec![1]));
        assert_eq!(slumps(&[], 0.8), (0, vec![]));
    }
}
