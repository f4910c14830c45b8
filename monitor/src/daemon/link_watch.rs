//! `link-watch`: the daemon ends when its link no longer attaches the program, and holds the pin
//! directory's shared lock while it runs.

use std::{io, time::Duration};

use tracing::warn;

use crate::config::Settings;

/// The pin directory's shared lock, held while the daemon runs, so that `natt-monitor detach`
/// refuses instead of making it exit (and its supervisor attach it again).
pub(super) fn hold_pins(settings: &Settings) -> Option<std::fs::File> {
    let dir = settings.pin.as_deref()?;
    crate::pin::hold(dir)
        .inspect_err(|e| warn!(error = %e, "could not lock the pin directory; `natt-monitor detach` will not see that this daemon runs"))
        .ok()
}

/// How often `link-watch` asks the kernel whether the link is still attached.
const LINK_WATCH_PERIOD: Duration = Duration::from_secs(1);

/// Ends with an error once the link no longer attaches the program (`natt-monitor detach`,
/// `bpftool link detach`, or the cgroup removed): the daemon must not report a verifier that
/// no longer runs.
pub(super) async fn watch_link(
    link: crate::pin::Link,
    _hold: Option<std::fs::File>,
) -> io::Result<()> {
    let mut tick = tokio::time::interval(LINK_WATCH_PERIOD);
    loop {
        tick.tick().await;
        let info = link.info()?;
        if !info.attached() {
            return Err(io::Error::other(
                "the verifier's link was detached from outside this daemon (natt-monitor detach, bpftool, or its cgroup removed)",
            ));
        }
    }
}
