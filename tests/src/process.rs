//! `Process`: a spawned child that is stopped (SIGTERM, then SIGKILL) when the guard drops.

use std::{
    io::{BufRead, BufReader, Read},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering},
        mpsc::{self, Receiver, RecvTimeoutError, Sender},
    },
    thread,
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::{Error, Result, cmd};

/// How long [`Process::stop`] waits after SIGTERM before SIGKILL, unless changed.
const DEFAULT_GRACE: Duration = Duration::from_secs(5);
/// Poll interval while waiting for a child; short enough not to slow tests down.
const POLL: Duration = Duration::from_millis(10);

/// A child process with captured output, stopped by pid on drop.
///
/// stdout and stderr are read by background threads into one log (see [`Process::output`]);
/// stdout lines are also queued for [`Process::wait_for_line`], e.g. to wait for `ready`.
/// The pid cannot be reused while the guard holds the unreaped child, so signalling it by
/// pid is safe.
pub struct Process {
    label: String,
    child: Child,
    status: Option<ExitStatus>,
    grace: Duration,
    stdout_lines: Receiver<String>,
    log: Arc<Mutex<String>>,
    open_pipes: Arc<AtomicUsize>,
}

impl Process {
    /// Spawns `cmd` with stdin closed and stdout/stderr captured.
    pub fn spawn(label: &str, cmd: Command) -> Result<Self> {
        Self::spawn_inner(label, cmd, false)
    }

    /// Like [`Process::spawn`], also echoing every output line to our stderr as
    /// `[label] line`, for demos where the child's log should be visible live.
    pub fn spawn_echoing(label: &str, cmd: Command) -> Result<Self> {
        Self::spawn_inner(label, cmd, true)
    }

    fn spawn_inner(label: &str, mut command: Command, echo: bool) -> Result<Self> {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| Error::Spawn {
                cmd: cmd::display(&command),
                source,
            })?;
        let log = Arc::new(Mutex::new(String::new()));
        let open_pipes = Arc::new(AtomicUsize::new(0));
        let (tx, stdout_lines) = mpsc::channel();
        let echo = echo.then(|| label.to_owned());
        if let Some(out) = child.stdout.take() {
            spawn_reader(out, Some(tx), &log, &open_pipes, echo.clone());
        }
        if let Some(err) = child.stderr.take() {
            spawn_reader(err, None, &log, &open_pipes, echo);
        }
        Ok(Self {
            label: label.to_owned(),
            child,
            status: None,
            grace: DEFAULT_GRACE,
            stdout_lines,
            log,
            open_pipes,
        })
    }

    /// The label given at spawn time.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// How long [`Process::stop`] (and drop) waits after SIGTERM before SIGKILL.
    pub fn set_grace(&mut self, grace: Duration) {
        self.grace = grace;
    }

    /// Everything the child printed so far, stdout and stderr interleaved by arrival.
    pub fn output(&self) -> String {
        self.log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The exit status if the child has exited (reaping it), without blocking.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self.child.try_wait().map_err(|source| Error::Io {
                what: format!("waiting for {}", self.label),
                source,
            })?;
        }
        Ok(self.status)
    }

    /// Waits up to `timeout` for the child to exit; `None` if it is still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                self.drain_pipes(Duration::from_millis(500));
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            thread::sleep(POLL);
        }
    }

    /// Waits up to `timeout` for a stdout line matching `pred` and returns it. Lines before
    /// it are consumed (they stay in [`Process::output`]). Fails early if the child closes
    /// stdout, i.e. exits, first.
    pub fn wait_for_line(
        &mut self,
        mut pred: impl FnMut(&str) -> bool,
        timeout: Duration,
    ) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stdout_lines.recv_timeout(left) {
                Ok(line) if pred(&line) => return Ok(line),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {
                    return Err(Error::Timeout {
                        what: format!("a matching output line from {}", self.label),
                        after: timeout,
                        output: self.output(),
                    });
                }
                Err(RecvTimeoutError::Disconnected) => {
                    // stdout closed: give the exit status a moment to show up.
                    let status = self.wait_timeout(Duration::from_millis(500))?;
                    return Err(Error::Exited {
                        label: self.label.clone(),
                        what: "printing the expected line".into(),
                        status,
                        output: self.output(),
                    });
                }
            }
        }
    }

    /// Sends `signal` to the child unless it has already been reaped.
    pub fn signal(&mut self, signal: Signal) -> Result<()> {
        if self.try_wait()?.is_some() {
            return Ok(());
        }
        let pid = i32::try_from(self.pid()).map_err(|_| Error::Config("pid overflow".into()))?;
        kill(Pid::from_raw(pid), signal).map_err(|errno| Error::Io {
            what: format!("sending {signal} to {} (pid {pid})", self.label),
            source: errno.into(),
        })
    }

    /// Stops the child: SIGTERM, up to the grace period for it to exit, then SIGKILL.
    /// Returns its exit status; idempotent.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        self.signal(Signal::SIGTERM)?;
        if let Some(status) = self.wait_timeout(self.grace)? {
            return Ok(status);
        }
        eprintln!(
            "xhost-tests: {} (pid {}) ignored SIGTERM for {:?}; sending SIGKILL",
            self.label,
            self.pid(),
            self.grace
        );
        self.signal(Signal::SIGKILL)?;
        let status = self.child.wait().map_err(|source| Error::Io {
            what: format!("waiting for {}", self.label),
            source,
        })?;
        self.status = Some(status);
        self.drain_pipes(Duration::from_millis(500));
        Ok(status)
    }

    /// After exit, lets the reader threads copy the last output into the log. Bounded,
    /// because a grandchild may keep the pipes open.
    fn drain_pipes(&self, max: Duration) {
        let deadline = Instant::now() + max;
        while self.open_pipes.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
            thread::sleep(POLL);
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("xhost-tests: cannot stop {}: {e}", self.label);
        }
    }
}

impl std::fmt::Debug for Process {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Process")
            .field("label", &self.label)
            .field("pid", &self.child.id())
            .field("status", &self.status)
            .finish()
    }
}

/// Copies lines from a child's pipe into the shared log (and the line queue for stdout).
/// The thread ends when the pipe closes; it is never joined, so a grandchild holding the
/// pipe cannot block teardown.
fn spawn_reader(
    pipe: impl Read + Send + 'static,
    lines: Option<Sender<String>>,
    log: &Arc<Mutex<String>>,
    open_pipes: &Arc<AtomicUsize>,
    echo: Option<String>,
) {
    let log = Arc::clone(log);
    let open_pipes = Arc::clone(open_pipes);
    open_pipes.fetch_add(1, Ordering::AcqRel);
    thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if let Some(label) = &echo {
                eprintln!("[{label}] {line}");
            }
            {
                let mut log = log.lock().unwrap_or_else(PoisonError::into_inner);
                log.push_str(&line);
                log.push('\n');
            }
            if let Some(tx) = &lines {
                // The receiver is gone once the guard dropped; nothing left to notify.
                let _ = tx.send(line);
            }
        }
        open_pipes.fetch_sub(1, Ordering::AcqRel);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.args(["-c", script]);
        c
    }

    #[test]
    fn waits_for_line_and_collects_output() {
        let mut p = Process::spawn(
            "echo",
            sh("echo one; echo err >&2; echo ready; exec sleep 30"),
        )
        .expect("spawn sh");
        let line = p
            .wait_for_line(|l| l == "ready", Duration::from_secs(5))
            .expect("ready line");
        assert_eq!(line, "ready");
        let status = p.stop().expect("stop");
        assert!(!status.success(), "killed by SIGTERM: {status:?}");
        let out = p.output();
        assert!(out.contains("one") && out.contains("err"), "{out}");
    }

    #[test]
    fn reports_early_exit() {
        let mut p = Process::spawn("false", sh("echo bye; exit 3")).expect("spawn sh");
        let err = p
            .wait_for_line(|l| l == "ready", Duration::from_secs(5))
            .expect_err("exits before ready");
        assert!(matches!(err, Error::Exited { .. }), "{err}");
    }

    #[test]
    fn kills_after_grace_when_sigterm_is_ignored() {
        let mut p = Process::spawn("stubborn", sh("trap '' TERM; echo up; exec sleep 30"))
            .expect("spawn sh");
        p.wait_for_line(|l| l == "up", Duration::from_secs(5))
            .expect("up");
        p.set_grace(Duration::from_millis(200));
        let started = Instant::now();
        let status = p.stop().expect("stop");
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(!status.success());
    }
}
