//! One qemu VM: Debian's kernel with the matrix's initramfs, under TCG (the `/dev/kvm`
//! of these machines is not hardware KVM and is slower than TCG). The kernel console goes
//! to one file, the guest's results port to another, which is watched for progress. The
//! VM is a [`Process`] guard: ended by PID on time-out, Ctrl-C or any error.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use xhost_tests::Process;

use super::results::MARKER;
use crate::interrupt;

/// How the VM ended.
#[derive(Debug)]
pub struct Outcome {
    /// The results port's text.
    pub results: String,
    /// Host seconds from starting qemu to the guest's first report (qemu start, firmware,
    /// kernel boot, init's mounts).
    pub boot_secs: Option<f64>,
    /// Host seconds from then to qemu's exit.
    pub run_secs: f64,
    /// The VM was still running at the time limit and was ended.
    pub timed_out: bool,
}

pub struct Vm<'a> {
    pub vmlinuz: &'a Path,
    pub initrd: &'a Path,
    /// Where `console.log` and `results.log` go (kept after the run for reading).
    pub log_dir: &'a Path,
    pub timeout: Duration,
    /// Label for progress lines (`[6.1]`).
    pub label: &'a str,
}

impl Vm<'_> {
    pub fn console_log(&self) -> PathBuf {
        self.log_dir.join("console.log")
    }

    pub fn results_log(&self) -> PathBuf {
        self.log_dir.join("results.log")
    }

    /// Boots, echoes the guest's marker lines as they come, and waits for the guest to
    /// power off (or the time limit, or Ctrl-C).
    pub fn run(&self) -> anyhow::Result<Outcome> {
        std::fs::create_dir_all(self.log_dir)?;
        let (console, results) = (self.console_log(), self.results_log());
        for f in [&console, &results] {
            let _ = std::fs::remove_file(f);
        }
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-accel", "tcg", "-cpu", "max", "-m", "1024", "-smp", "2"])
            // No default devices (no NIC, so no iPXE ROM delay), no display, no monitor;
            // a guest reboot (panic) ends qemu instead of booting again.
            .args(["-nodefaults", "-display", "none", "-no-reboot"])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-serial")
            .arg(format!("file:{}", results.display()))
            .arg("-kernel")
            .arg(self.vmlinuz)
            .arg("-initrd")
            .arg(self.initrd)
            // panic=-1: reboot at once on a panic (init dying), which -no-reboot turns
            // into qemu's exit. random.trust_cpu: -cpu max has RDRAND, so getrandom()
            // does not wait for entropy on older kernels.
            .args([
                "-append",
                "console=ttyS0 panic=-1 quiet loglevel=4 random.trust_cpu=on",
            ]);
        let started = Instant::now();
        let mut vm = Process::spawn(&format!("qemu {}", self.label), cmd)
            .context("starting qemu-system-x86_64 (run `cargo xtask setup`)")?;
        let mut seen = 0usize;
        let mut boot_secs = None;
        let mut timed_out = false;
        let status = loop {
            let status = vm.try_wait()?;
            let text = std::fs::read_to_string(&results).unwrap_or_default();
            // Echo complete new marker lines.
            if let Some(end) = text.rfind('\n').map(|i| i + 1).filter(|&e| e > seen) {
                for line in text[seen..end].lines() {
                    let line = line.trim_end_matches('\r');
                    if let Some(rest) = line.strip_prefix(MARKER) {
                        boot_secs.get_or_insert(started.elapsed().as_secs_f64());
                        eprintln!(
                            "kernels: [{}] {:>6.1}s{rest}",
                            self.label,
                            started.elapsed().as_secs_f64()
                        );
                    }
                }
                seen = end;
            }
            if let Some(status) = status {
                break Some(status);
            }
            if interrupt::interrupted() {
                vm.stop()?;
                bail!("interrupted: VM {} ended", self.label);
            }
            if started.elapsed() > self.timeout {
                timed_out = true;
                vm.stop()?;
                break None;
            }
            std::thread::sleep(Duration::from_millis(250));
        };
        let total = started.elapsed().as_secs_f64();
        if let Some(s) = status.filter(|s| !s.success()) {
            bail!(
                "qemu for {} failed ({s}): {}",
                self.label,
                vm.output().trim()
            );
        }
        Ok(Outcome {
            results: std::fs::read_to_string(&results).unwrap_or_default(),
            boot_secs,
            run_secs: total - boot_secs.unwrap_or(total),
            timed_out,
        })
    }
}
