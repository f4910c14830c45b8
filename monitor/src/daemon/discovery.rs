//! XFRM discovery: the peers the kernel's SAs name, and the tunnel devices they carry.
//!
//! Owns the XFRM notification socket. The first dump is part of start-up (before anything is
//! attached); afterwards every SA or policy notification, and every `XFRM_RESYNC` without one,
//! leads to a fresh dump (on the blocking pool) whose peers replace the discovered set in the
//! SA/peer state, and whose tunnels (`crate::tunnels`: the links, the policies, the SAs) replace
//! the verified tunnel devices. Any netlink failure ends the task, which takes the daemon down.

use std::{collections::BTreeMap, io, time::Duration};

use tokio::io::unix::AsyncFd;
use tracing::{error, info, warn};

use super::{
    error::DaemonError,
    state::{StateError, StateHandle},
};
use crate::{
    config::{Discover, Settings},
    peers::{Mode, PeerSpec, Source, log_peers},
    tunnels::{self, Coverage, Tunnel, Tunnels},
    xfrm::{self, Watch, XfrmError},
};

/// The sockets discovery wakes on: XFRM's SA, expire and policy notifications, and the link
/// notifications (tunnel devices).
pub type Watches = (Watch, tunnels::LinkWatch);

/// The tunnels last seen, by ifindex, so that only changes are logged.
pub type SeenTunnels = BTreeMap<u32, (Tunnel, Coverage)>;

/// Logs each tunnel whose coverage changed since `seen` (and updates it); returns the ones to
/// verify. `on` is false where the verifier cannot take tunnels (address scope, or the
/// `bounded_loop` variant): those are logged as not verified once.
pub fn tunnels_changed(seen: &mut SeenTunnels, now: Tunnels, on: bool) -> Vec<Tunnel> {
    let mut next = SeenTunnels::new();
    for (t, c) in now {
        if seen.get(&t.ifindex) != Some(&(t.clone(), c.clone())) {
            let local = tunnels::show_local(&t);
            match (&c, on) {
                (Coverage::Verified, true) if t.gro_on => {
                    warn!(tunnel = %t.name, kind = t.kind.name(), remote = %t.remote, %local, "verifying the inner segments of a tunnel that NAT-T transport SAs carry, but GRO is on for it: it merges inner segments, and merged ones cannot be verified (counted as aggregated; corrupted ones are delivered); turn it off: ethtool -K {} gro off", t.name);
                }
                (Coverage::Verified, true) => {
                    info!(tunnel = %t.name, kind = t.kind.name(), remote = %t.remote, %local, "verifying the inner segments of a tunnel that NAT-T transport SAs carry (residual 0)");
                }
                (Coverage::Verified, false) => {
                    warn!(tunnel = %t.name, kind = t.kind.name(), remote = %t.remote, "a tunnel inside NAT-T transport SAs is not verified: that needs SA scope and the bpf_loop variant (5.17+); its inner checksums go unchecked");
                }
                // A tunnel with no NAT-T SA from its remote is none of the verifier's business.
                (Coverage::NoNatTSa, _) => {}
                (_, _) => {
                    warn!(tunnel = %t.name, kind = t.kind.name(), remote = %t.remote, reason = %c.reason(), "a tunnel from a NAT-T peer is not verified: something other than ESP may arrive on it, so its inner segments cannot be judged exactly");
                }
            }
        }
        next.insert(t.ifindex, (t, c));
    }
    for (t, c) in seen.values() {
        if !next.contains_key(&t.ifindex) && *c == Coverage::Verified && on {
            info!(tunnel = %t.name, "a verified tunnel device is gone");
        }
    }
    *seen = next;
    if !on {
        return Vec::new();
    }
    seen.values()
        .filter(|(_, c)| *c == Coverage::Verified)
        .map(|(t, _)| t.clone())
        .collect()
}

/// How often discovery re-reads the SAs even without a notification.
pub const XFRM_RESYNC: Duration = Duration::from_secs(30);

/// Opens the notification socket first (so no change is missed between the dump and the
/// subscription), then dumps the SAs. With discovery on by default, a kernel without XFRM
/// netlink only turns discovery off; asked for explicitly, it is an error.
///
/// # Errors
/// `DaemonError::Discovery`.
pub fn start(
    settings: &Settings,
) -> Result<(Option<Watches>, Vec<PeerSpec>, Tunnels), DaemonError> {
    if settings.discover == Discover::None {
        return Ok((None, Vec::new(), Vec::new()));
    }
    let t0 = std::time::Instant::now();
    let opened = Watch::open().and_then(|w| {
        let links = tunnels::LinkWatch::open().map_err(|source| XfrmError::Io {
            what: "subscribing to link notifications",
            source,
        })?;
        let sas = xfrm::dump()?;
        let tunnels = tunnels::survey(&sas)?;
        Ok(((w, links), sas, tunnels))
    });
    match opened {
        Ok((w, sas, tunnels)) => {
            let peers = xfrm::peers_from(&sas, settings.default_mode, xfrm::is_local);
            info!(
                sas = sas.len(),
                peers = peers.len(),
                tunnels = tunnels.len(),
                dump_ms = t0.elapsed().as_millis(),
                "XFRM discovery: read the kernel's SAs"
            );
            Ok((Some(w), peers, tunnels))
        }
        Err(e) if !settings.discover_required && matches!(e, XfrmError::Open(_)) => {
            if settings.peers.is_empty() {
                return Err(DaemonError::Discovery(e));
            }
            info!(error = %e, "XFRM discovery off: this kernel has no XFRM netlink; static peers only");
            Ok((None, Vec::new(), Vec::new()))
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
    watch: Option<(AsyncFd<Watch>, AsyncFd<tunnels::LinkWatch>)>,
    state: StateHandle,
    errors: prometheus::IntCounter,
    mut seen: SeenTunnels,
    tunnels_on: bool,
) -> io::Result<()> {
    let Some((mut watch, mut links)) = watch else {
        return std::future::pending().await;
    };
    loop {
        let woke = tokio::time::timeout(XFRM_RESYNC, async {
            tokio::select! {
                guard = watch.readable_mut() => {
                    let mut guard = guard?;
                    let n = guard.get_inner_mut().read_pending().map_err(fail)?;
                    guard.clear_ready();
                    if n.overrun {
                        warn!("XFRM notifications overran the socket; re-reading every SA");
                    }
                }
                guard = links.readable_mut() => {
                    let mut guard = guard?;
                    guard.get_inner_mut().read_pending()?;
                    guard.clear_ready();
                }
            }
            Ok::<_, io::Error>(())
        })
        .await;
        if let Ok(woke) = woke {
            woke?;
            // Coalesce a burst (an IKE rekey adds and deletes several SAs at once; a tunnel
            // comes with its policies).
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = watch.get_mut().read_pending().map_err(fail)?;
            let _ = links.get_mut().read_pending()?;
        }
        let (peers, sas, tunnels, dump_ms) = tokio::task::spawn_blocking(move || {
            let t0 = std::time::Instant::now();
            let sas = xfrm::dump()?;
            let tunnels = tunnels::survey(&sas)?;
            // The state task gives discovered peers the mode in force (a reload changes it).
            let peers = xfrm::peers_from(&sas, Mode::default(), xfrm::is_local);
            Ok::<_, XfrmError>((peers, sas.len(), tunnels, t0.elapsed().as_millis()))
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
            Err(StateError::Gone) => return Err(io::Error::other(StateError::Gone)),
            Err(e @ StateError::Refused(_)) => {
                errors.inc();
                warn!(error = %e, "XFRM discovery: the kernel's SAs make a peer set the verifier refuses; keeping the previous peers until the SAs change");
            }
            Err(e) => {
                errors.inc();
                error!(error = %e, "XFRM discovery could not write the peers to the verifier's maps; will retry on the next change");
            }
        }
        let verified = tunnels_changed(&mut seen, tunnels, tunnels_on);
        match state.replace_tunnels(verified).await {
            Ok(()) => {}
            Err(StateError::Gone) => return Err(io::Error::other(StateError::Gone)),
            Err(e) => {
                errors.inc();
                error!(error = %e, "XFRM discovery could not update the tunnel devices; will retry on the next change");
            }
        }
    }
}
