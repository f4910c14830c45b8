//! Liveness: whether the program is attached and the event drain is making progress.
//!
//! Owns two facts, written by the start-up sequence (attached) and the drain (a completed
//! pass), and read by `/healthz` and `natt_monitor_up`. Nothing else makes the daemon healthy:
//! a timer alone never does.

use std::{
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, Instant},
};

/// How recently the drain loop must have completed a pass for the daemon to count as up.
pub const HEALTH_MAX_AGE: Duration = Duration::from_secs(5);

/// Liveness shared by the drain, `/healthz` and `natt_monitor_up`.
#[derive(Debug)]
pub struct Health {
    attached: AtomicBool,
    start: Instant,
    /// Milliseconds since `start` at the last completed drain pass.
    last_drain_ms: AtomicU64,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            attached: AtomicBool::new(false),
            start: Instant::now(),
            last_drain_ms: AtomicU64::new(0),
        }
    }
}

impl Health {
    /// Attached, with a last drain pass older than `HEALTH_MAX_AGE`: a stalled drain.
    #[cfg(test)]
    pub(crate) fn stalled() -> Self {
        let h = Self {
            start: Instant::now()
                .checked_sub(HEALTH_MAX_AGE + Duration::from_secs(1))
                .expect("uptime"),
            ..Self::default()
        };
        h.set_attached(true);
        h
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Records whether the program is attached.
    pub fn set_attached(&self, attached: bool) {
        self.attached.store(attached, Ordering::Relaxed);
    }

    /// Records a completed drain pass.
    pub fn mark_drained(&self) {
        self.last_drain_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// `Ok` while attached and the drain loop completed a pass within `HEALTH_MAX_AGE`.
    ///
    /// # Errors
    /// Why the daemon is not healthy.
    pub fn check(&self) -> Result<(), String> {
        if !self.attached.load(Ordering::Relaxed) {
            return Err("verifier not attached".into());
        }
        let age = self
            .now_ms()
            .saturating_sub(self.last_drain_ms.load(Ordering::Relaxed));
        if u128::from(age) > HEALTH_MAX_AGE.as_millis() {
            return Err(format!("event loop has not completed a pass for {age} ms"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthy_only_while_attached_and_draining() {
        let h = Health::default();
        assert_eq!(h.check(), Err("verifier not attached".into()));
        h.set_attached(true);
        h.mark_drained();
        assert_eq!(h.check(), Ok(()));
        // A drain pass older than the limit is a stalled loop.
        h.last_drain_ms.store(0, Ordering::Relaxed);
        let h2 = Health {
            start: Instant::now()
                .checked_sub(HEALTH_MAX_AGE + Duration::from_secs(1))
                .unwrap(),
            ..Health::default()
        };
        h2.set_attached(true);
        assert!(
            h2.check()
                .unwrap_err()
                .starts_with("event loop has not completed a pass for 6"),
        );
        h.set_attached(false);
        assert_eq!(h.check(), Err("verifier not attached".into()));
    }
}
