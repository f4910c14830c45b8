//! One scrape's readings, by source: the daemon's own state (always readable), the verifier's
//! maps, /proc/net/snmp and the program's run statistics. A source that could not be read is
//! `None`: its families are left out of the scrape and
//! `natt_monitor_scrape_collector_success{collector}` is 0 for it, as `node_exporter` reports a
//! failed collector.

use monitor_ebpf::{PROTO_COUNT, PeerStats};

use crate::{ebpf::Counters, peers::Source, snmp::KernelCsumErrors};

/// One peer's readings.
#[derive(Clone, Debug, Default)]
pub struct PeerSnapshot {
    /// The `peer` label: its prefix.
    pub label: String,
    /// Statistics summed over CPUs.
    pub stats: PeerStats,
    /// Waiting for its NAT residual to be learned.
    pub learning: bool,
    /// Segments passed unverified while their SA learned and found corrupt once its residual
    /// was known, by protocol (counted by the daemon).
    pub learning_mismatches: [u64; PROTO_COUNT],
}

/// One scrape's worth of readings.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// What the daemon itself holds.
    pub daemon: DaemonReadings,
    /// The verifier's maps (`collector="verifier"`).
    pub verifier: Option<VerifierReadings>,
    /// The kernel's own checksum error counters (`collector="snmp"`).
    pub kernel: Option<KernelCsumErrors>,
    /// The verifier program's run statistics (`collector="program"`).
    pub program: Option<ProgramStats>,
    /// Seconds spent reading the kernel for this scrape.
    pub collect_seconds: f64,
}

/// What the daemon knows without asking the kernel.
#[derive(Clone, Debug, Default)]
pub struct DaemonReadings {
    /// Attached and draining.
    pub up: bool,
    /// Number of peers per source.
    pub peers_by_source: Vec<(Source, usize)>,
    /// Peers that ask for enforce mode but run in observe mode (address scope learns their
    /// residual).
    pub peers_observe_only: usize,
    /// Discovered peers (and catch-alls) left out because the maps hold no more.
    pub peers_over_limit: usize,
    /// Tunnel devices whose inner segments are verified.
    pub tunnels: usize,
    /// Of those, the ones with GRO on.
    pub tunnels_gro_on: usize,
}

/// What the verifier's maps say, with the daemon's counts that are reported beside them.
#[derive(Clone, Debug, Default)]
pub struct VerifierReadings {
    /// Per peer readings.
    pub peers: Vec<PeerSnapshot>,
    /// Peers past `--max-peer-labels`, whose counts are summed under `peer="other"`.
    pub peers_aggregated: usize,
    /// Global counters.
    pub counters: Counters,
    /// SA residuals the verifier withdrew (`TrustCounter::Withdrawn`).
    pub residuals_withdrawn: u64,
    /// SA residuals taken over from a live SA of the same NAT mapping (`TrustCounter::Inherited`).
    pub residuals_inherited: u64,
    /// SA residuals the verifier's LRU map forgot: restored by the verifier
    /// (`TrustCounter::Restored`) or learned again (counted by the daemon).
    pub residuals_evicted: u64,
    /// SA residuals the verifier confirmed itself in enforce mode (`TrustCounter::Confirmed`).
    pub residuals_confirmed: u64,
    /// TCP segments dropped in enforce mode while their SA had no residual
    /// (`TrustCounter::HeldDropped`).
    pub learning_dropped: u64,
    /// TCP segments of enforce-mode SAs without a residual passed unverified because the held
    /// path could not be reached (`TrustCounter::Unheld`; never expected).
    pub learning_unheld: u64,
    /// Dropped TCP segments the verifier's pairing map had no room for
    /// (`PairSlot::NotRemembered`).
    pub pairing_full: u64,
}

/// The verifier program's run statistics and whether the kernel is counting them.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProgramStats {
    /// Runs and run time.
    pub runs: crate::pin::ProgramRuns,
    /// `kernel.bpf_stats_enabled` is 1: without it both counts stay 0.
    pub stats_enabled: bool,
}

/// Where a scrape's readings come from: the daemon reads the kernel's maps; tests give fixed
/// snapshots.
pub trait Readings: Send + Sync + 'static {
    /// Reads everything once. Called on every scrape, on the blocking pool.
    fn read(&self) -> Snapshot;
}
