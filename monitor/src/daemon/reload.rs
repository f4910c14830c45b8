//! SIGHUP: re-reading the configuration.
//!
//! Owns the SIGHUP stream and the caller's `Reloader`. A reload applies the static peers and
//! the mode of every peer (discovered ones take the new `mode`). A reload that fails (a bad
//! file, a peer set the maps refuse, a changed setting only a restart applies, named by its
//! key) keeps everything as it was, says why and sets
//! `natt_monitor_config_last_reload_successful` to 0; it never takes the daemon down.

use std::io;

use tokio::signal::unix::Signal;
use tracing::{error, info, warn};

use super::state::{StateError, StateHandle};
use crate::{
    config::{ConfigError, Settings},
    metrics::ReloadMetrics,
    peers::log_peers,
};

/// Re-reads the peer list on SIGHUP (the configuration file and flags).
pub type Reloader = Box<dyn Fn() -> Result<Settings, ConfigError> + Send + Sync>;

/// Applies the reloaded peer list on every SIGHUP.
///
/// # Errors
/// Never while the signal stream lives; its end ends the task.
pub async fn follow(
    mut hup: Signal,
    reload: Option<Reloader>,
    mut running: Settings,
    state: StateHandle,
    outcome: ReloadMetrics,
) -> io::Result<()> {
    while hup.recv().await.is_some() {
        let Some(reload) = &reload else {
            warn!("SIGHUP ignored: no configuration to re-read");
            continue;
        };
        let settings = match reload() {
            Ok(s) => s,
            Err(e) => {
                outcome.failed();
                error!(error = %e, "reload failed; keeping the current peers");
                continue;
            }
        };
        if let Some(key) = settings.needs_restart(&running) {
            outcome.failed();
            error!(
                key,
                "reload refused: `{key}` changed, and only a restart applies it; keeping the current configuration (restart the daemon, or put `{key}` back)"
            );
            continue;
        }
        match state
            .replace_static(settings.peers.clone(), settings.default_mode)
            .await
        {
            Ok(applied) => {
                outcome.succeeded();
                info!(
                    peers = applied.table.len(),
                    added = applied.added,
                    removed = applied.removed,
                    mode = %settings.default_mode,
                    "reloaded peers on SIGHUP"
                );
                log_peers(&applied.table);
                running = settings;
            }
            Err(StateError::Gone) => return Err(io::Error::other(StateError::Gone)),
            Err(e) => {
                outcome.failed();
                error!(error = %e, "reload failed; keeping the current peers");
            }
        }
    }
    Err(io::Error::other("the SIGHUP stream ended"))
}
