//! SIGHUP: re-reading the static peers.
//!
//! Owns the SIGHUP stream and the caller's `Reloader`. A reload that fails (a bad file, a peer
//! set the maps refuse) keeps the current peers, says why and sets
//! `natt_monitor_config_last_reload_successful` to 0; it never takes the daemon down.

use std::io;

use tokio::signal::unix::Signal;
use tracing::{error, info, warn};

use crate::{
    daemon::{Reloader, log_peers, state::StateHandle},
    metrics::ReloadMetrics,
};

/// Applies the reloaded peer list on every SIGHUP.
///
/// # Errors
/// Never while the signal stream lives; its end ends the task.
pub async fn follow(
    mut hup: Signal,
    reload: Option<Reloader>,
    state: StateHandle,
    outcome: ReloadMetrics,
) -> io::Result<()> {
    while hup.recv().await.is_some() {
        let Some(reload) = &reload else {
            warn!("SIGHUP ignored: no configuration to re-read");
            continue;
        };
        let specs = match reload() {
            Ok(s) => s,
            Err(e) => {
                outcome.failed();
                error!(error = %e, "reload failed; keeping the current peers");
                continue;
            }
        };
        match state.replace_static(specs).await {
            Ok(applied) => {
                outcome.succeeded();
                info!(
                    peers = applied.table.len(),
                    added = applied.added,
                    removed = applied.removed,
                    "reloaded peers on SIGHUP"
                );
                log_peers(&applied.table);
            }
            Err(e) => {
                outcome.failed();
                error!(error = %e, "reload failed; keeping the current peers");
            }
        }
    }
    Err(io::Error::other("the SIGHUP stream ended"))
}
