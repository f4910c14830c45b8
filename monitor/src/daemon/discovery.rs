//! XFRM discovery: the peers the kernel's SAs name.
//!
//! Owns the XFRM notification socket. The first dump is part of start-up (before anything is
//! attached); afterwards every SA notification, and every `XFRM_RESYNC` without one, leads to a
//! fresh dump (on the blocking pool) whose peers replace the discovered set in the SA/peer
//! state. Any netlink failure ends the task, which takes the daemon down.

use std::{io, time::Duration};

use tokio::io::unix::AsyncFd;
use tracing::{error, info, warn};

use crate::{
    config::{Discover, Settings},
    daemon::{DaemonError, log_peers, state::StateHandle},
    peers::{Mode, PeerSpec, Source},
    xfrm::{self, Watch, XfrmError},
};

/// How often discovery re-reads the SAs even without a notification.
pub const XFRM_RESYNC: Duration = Duration::from_secs(30);

/// Opens the notification socket first (so no change is missed between the dump and the
/// subscription), then dumps the SAs. With discovery on by default, a kernel without XFRM
/// netlink only turns discovery off; asked for explicitly, it is an error.
///
/// # Errors
/// `DaemonError::Discovery`.
pub fn start(settings: &Settings) -> Result<(Option<Watch>, Vec<PeerSpec>), DaemonError> {
    if settings.discover == Discover::None {
        return Ok((None, Vec::new()));
    }
    let t0 = std::time::Instant::now();
    let opened = Watch::open().and_then(|w| xfrm::dump().map(|sas| (w, sas)));
    match opened {
        Ok((w, sas)) => {
            let peers = xfrm::peers_from(&sas, settings.default_mode, xfrm::is_local);
            info!(
                sas = sas.len(),
                peers = peers.len(),
                dump_ms = t0.elapsed().as_millis(),
                "XFRM discovery: read the kernel's SAs"
            );
            Ok((Some(w), peers))
        }
        Err(e) if !settings.discover_required && matches!(e, XfrmError::Open(_)) => {
            if settings.peers.is_empty() {
                return Err(DaemonError::Discovery(e));
            }
            info!(error = %e, "XFRM discovery off: this kernel has no XFRM netlink; static peers only");
            Ok((None, Vec::new()))
        }
        Err(e) => Err(DaemonError::Discovery(e)),
    }
}

fn fail(e: XfrmError) -> io::Error {
    io::Error::other(e)
}

/// Keeps the discovered peers in step with the kernel's SAs. Without discovery it waits
/// forever.
///
/// # Errors
/// Any netlink failure.
pub async fn follow(
    watch: Option<AsyncFd<Watch>>,
    state: StateHandle,
    errors: prometheus::IntCounter,
) -> io::Result<()> {
    let Some(mut watch) = watch else {
        return std::future::pending().await;
    };
    loop {
        let woke = tokio::time::timeout(XFRM_RESYNC, watch.readable_mut()).await;
        if let Ok(guard) = woke {
            let mut guard = guard?;
            let n = guard.get_inner_mut().read_pending().map_err(fail)?;
            guard.clear_ready();
            if n.overrun {
                warn!("XFRM notifications overran the socket; re-reading every SA");
            }
            // Coalesce a burst (an IKE rekey adds and deletes several SAs at once).
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = watch.get_mut().read_pending().map_err(fail)?;
        }
        let (peers, sas, dump_ms) = tokio::task::spawn_blocking(move || {
            let t0 = std::time::Instant::now();
            xfrm::dump().map(|sas| {
                // The state task gives discovered peers the mode in force (a reload changes it).
                let peers = xfrm::peers_from(&sas, Mode::default(), xfrm::is_local);
                (peers, sas.len(), t0.elapsed().as_millis())
            })
        })
        .await
        .map_err(io::Error::other)?
        .map_err(fail)?;
        match state.replace_discovered(peers).await {
            Ok(None) => {}
            Ok(Some(applied)) => {
                info!(
                    peers = applied.table.len(),
                    xfrm = applied.table.count_by_source(Source::Xfrm),
                    added = applied.added,
                    removed = applied.removed,
                    sas,
                    dump_ms,
                    "XFRM discovery: SAs changed"
                );
                log_peers(&applied.table);
            }
            Err(e) => {
                errors.inc();
                error!(error = %e, "XFRM discovery could not update the peers; will retry on the next change");
            }
        }
    }
}
