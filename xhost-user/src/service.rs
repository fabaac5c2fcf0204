//! Running under a service manager: state notifications for systemd
//! (`Type=notify`: READY once the datapath is attached, RELOADING on
//! SIGHUP, STOPPING on the way out) and log lines journald files by level.

use std::io::Write as _;

use log::{Level, debug};
use sd_notify::NotifyState;

/// Sends `state` to the service manager if `NOTIFY_SOCKET` names one; a
/// no-op otherwise. A failed send is logged, never fatal: the datapath is
/// no less attached because the manager did not hear of it.
fn notify(state: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        log::warn!("telling the service manager {state:?}: {e}");
    } else if std::env::var_os("NOTIFY_SOCKET").is_some() {
        debug!("told the service manager {state:?}");
    }
}

/// The datapath is attached to `iface` and its maps filled.
pub fn ready(iface: &str) {
    let status = format!("serving {iface}");
    notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
}

/// SIGHUP: the config is being read again. systemd wants the monotonic
/// time with it (it tells this reload from an earlier one).
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => notify(&[NotifyState::Reloading, now]),
        Err(_) => notify(&[NotifyState::Reloading]),
    }
}

/// The agent is detaching the datapath and will exit.
pub fn stopping() {
    notify(&[NotifyState::Stopping]);
}

/// Whether stderr is journald's stream (systemd sets `JOURNAL_STREAM` to
/// `DEV:INODE` of it; a child that inherited the variable but writes
/// elsewhere must not be treated so).
pub fn stderr_is_journal() -> bool {
    let Some(want) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(st) = nix::sys::stat::fstat(std::io::stderr()) else {
        return false;
    };
    want.to_str() == Some(&format!("{}:{}", st.st_dev, st.st_ino))
}

/// syslog priority of a log level (`<N>` prefixes journald reads:
/// sd-daemon(3)).
pub fn syslog_priority(level: Level) -> u8 {
    match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    }
}

/// `message` as journald lines at `priority`: every line carries the
/// prefix, so a message that spans lines (a verifier log in an error) keeps
/// its level throughout instead of falling back to journald's default.
pub fn journal_lines(priority: u8, message: &str) -> String {
    message
        .lines()
        .map(|l| format!("<{priority}>{l}\n"))
        .collect()
}

/// Sets up logging: to journald, `<priority>message` per line (journald
/// adds the time and files the level); elsewhere env_logger's usual lines,
/// coloured only when stderr is a terminal.
pub fn init_logging(default_level: &str) {
    let mut b =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default_level));
    if stderr_is_journal() {
        b.format(|buf, record| {
            write!(
                buf,
                "{}",
                journal_lines(syslog_priority(record.level()), &record.args().to_string())
            )
        });
    } else {
        b.format_target(false)
            // Milliseconds: event-to-map latencies are read off these lines.
            .format_timestamp_millis();
    }
    b.init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_map_to_syslog_priorities() {
        assert_eq!(syslog_priority(Level::Error), 3);
        assert_eq!(syslog_priority(Level::Warn), 4);
        assert_eq!(syslog_priority(Level::Info), 6);
        assert_eq!(syslog_priority(Level::Debug), 7);
    }

    #[test]
    fn every_journal_line_carries_the_priority() {
        assert_eq!(journal_lines(6, "attached"), "<6>attached\n");
        assert_eq!(
            journal_lines(3, "xhost-user: program x: verifier:\n0: r1 = 0\nrefused"),
            "<3>xhost-user: program x: verifier:\n<3>0: r1 = 0\n<3>refused\n"
        );
    }
}
