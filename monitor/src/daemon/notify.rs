//! systemd's service notifications (`sd_notify(3)`), for `Type=notify` with `WatchdogSec=`.
//!
//! Owns the notification socket. `READY=1` goes out once the program is attached and every task
//! runs; `WATCHDOG=1` only while `/healthz` would answer 200, that is while the program is
//! attached and the event drain completed a pass within `HEALTH_MAX_AGE`. A timer alone never
//! feeds the watchdog: a stalled drain stops the notifications, and systemd restarts the daemon
//! after `WatchdogSec=` (the pinned verifier keeps running meanwhile). `STOPPING=1` goes out at
//! shutdown. Without `NOTIFY_SOCKET` (not started by systemd) nothing is sent.

use std::{
    io,
    os::{
        linux::net::SocketAddrExt as _,
        unix::net::{SocketAddr, UnixDatagram},
    },
    sync::Arc,
    time::Duration,
};

use tracing::warn;

use crate::daemon::health::Health;

/// Where systemd listens, from `NOTIFY_SOCKET`.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    to: SocketAddr,
}

impl Notifier {
    /// The notifier `NOTIFY_SOCKET` names (a path, or `@name` for an abstract socket); `None`
    /// when it is unset or empty.
    ///
    /// # Errors
    /// When the socket cannot be created or the address is invalid.
    pub fn from_env() -> io::Result<Option<Self>> {
        match std::env::var_os("NOTIFY_SOCKET") {
            Some(v) if !v.is_empty() => Self::to(&v.to_string_lossy()).map(Some),
            _ => Ok(None),
        }
    }

    /// A notifier that sends to `addr` (`@name` for an abstract socket).
    ///
    /// # Errors
    /// When the socket cannot be created or the address is invalid.
    pub fn to(addr: &str) -> io::Result<Self> {
        let to = match addr.strip_prefix('@') {
            Some(name) => SocketAddr::from_abstract_name(name.as_bytes())?,
            None => SocketAddr::from_pathname(addr)?,
        };
        Ok(Self {
            socket: UnixDatagram::unbound()?,
            to,
        })
    }

    /// Sends one notification (e.g. `READY=1`). A datagram to a local socket does not wait.
    ///
    /// # Errors
    /// When systemd's socket refuses it.
    pub fn send(&self, message: &str) -> io::Result<()> {
        self.socket
            .send_to_addr(message.as_bytes(), &self.to)
            .map(drop)
    }
}

/// How often to feed the watchdog: half of `WATCHDOG_USEC` (as `sd_watchdog_enabled(3)`
/// advises), when it is set and `WATCHDOG_PID`, if set, is this process.
#[must_use]
pub fn watchdog_interval() -> Option<Duration> {
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.trim() != std::process::id().to_string()
    {
        return None;
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// Feeds the watchdog every `every` while `health` says the daemon is healthy; says once when
/// it stops feeding and when it starts again.
///
/// # Errors
/// When systemd's socket refuses a notification.
pub async fn watchdog(
    notifier: Arc<Notifier>,
    health: Arc<Health>,
    every: Duration,
) -> io::Result<()> {
    let mut tick = tokio::time::interval(every);
    let mut starving = false;
    loop {
        tick.tick().await;
        match health.check() {
            Ok(()) => {
                if starving {
                    warn!("healthy again; feeding the systemd watchdog");
                    starving = false;
                }
                notifier.send("WATCHDOG=1")?;
            }
            Err(why) if !starving => {
                warn!(reason = %why, "not healthy; withholding the systemd watchdog notification");
                starving = true;
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::net::UnixDatagram;

    use super::*;

    /// A bound notification socket like systemd's, and a notifier aimed at it.
    fn socket() -> (UnixDatagram, Notifier, std::path::PathBuf) {
        let path = std::env::temp_dir().join(format!(
            "natt-notify-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_file(&path);
        let listener = UnixDatagram::bind(&path).expect("bind");
        let notifier = Notifier::to(path.to_str().unwrap()).expect("notifier");
        (listener, notifier, path)
    }

    async fn next(listener: &UnixDatagram, within: Duration) -> Option<String> {
        let mut buf = [0u8; 256];
        tokio::time::timeout(within, listener.recv(&mut buf))
            .await
            .ok()
            .map(|n| String::from_utf8_lossy(&buf[..n.expect("recv")]).into_owned())
    }

    #[tokio::test]
    async fn the_watchdog_is_fed_only_while_the_drain_makes_progress() {
        let (listener, notifier, path) = socket();
        let notifier = Arc::new(notifier);
        notifier.send("READY=1").unwrap();
        assert_eq!(
            next(&listener, Duration::from_secs(1)).await.as_deref(),
            Some("READY=1")
        );
        // Attached and draining: fed on every tick.
        let health = Arc::new(Health::default());
        health.set_attached(true);
        health.mark_drained();
        let feeding = tokio::spawn(watchdog(
            Arc::clone(&notifier),
            Arc::clone(&health),
            Duration::from_millis(20),
        ));
        for _ in 0..3 {
            assert_eq!(
                next(&listener, Duration::from_secs(1)).await.as_deref(),
                Some("WATCHDOG=1")
            );
        }
        feeding.abort();
        // A drain whose last pass is older than HEALTH_MAX_AGE: nothing is sent.
        let stalled = Arc::new(Health::stalled());
        let starving = tokio::spawn(watchdog(
            Arc::clone(&notifier),
            stalled,
            Duration::from_millis(20),
        ));
        // Drain what the first task sent before it was aborted, then expect silence.
        while next(&listener, Duration::from_millis(100)).await.is_some() {}
        assert_eq!(next(&listener, Duration::from_millis(300)).await, None);
        starving.abort();
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn abstract_and_path_addresses() {
        assert!(Notifier::to("@natt-monitor-test").is_ok());
        assert!(Notifier::to("/run/systemd/notify").is_ok());
    }
}
