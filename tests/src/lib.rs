//! Shared helpers for natt-monitor's privileged integration tests: skipping with a reason,
//! building packets, and guards that always clean up namespaces, cgroups and processes.

#![expect(
    clippy::missing_panics_doc,
    reason = "test helpers fail by panicking with a message; that is their contract"
)]

pub mod net;
pub mod packets;

/// Prints why a test is skipped and returns true when it cannot run here (not root).
/// Never a silent pass: the reason goes to stderr, which `cargo test` shows with
/// `--nocapture` and which CI logs.
#[must_use]
pub fn skip_unless_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP {test}: needs root (BPF program load, netns, cgroups)");
        return true;
    }
    false
}
