//! What `/metrics` and `/healthz` read.
//!
//! Owns nothing that changes: it reads the verifier's statistics maps (through their own
//! descriptors, without a lock), the state's published `View`, the health flags and
//! /proc/net/snmp, once per scrape.

use std::{os::fd::AsFd as _, path::PathBuf, sync::Arc, time::Instant};

use tokio::sync::watch;
use tracing::warn;

use crate::{
    daemon::{health::Health, state::View},
    ebpf::Stats,
    http::Exporter,
    metrics::{Metrics, PeerSnapshot, ProgramStats, Readings, Snapshot},
    peers::Source,
    pin, snmp,
};

/// The kernel's side of a scrape.
#[derive(Debug)]
pub struct KernelReadings {
    /// The verifier's statistics.
    pub stats: Arc<Stats>,
    /// Peer labels and learning flags.
    pub view: watch::Receiver<Arc<View>>,
    /// For `natt_monitor_up`.
    pub health: Arc<Health>,
    /// Root of /proc.
    pub proc_path: PathBuf,
    /// A descriptor of the verifier program, for its run statistics.
    pub program: aya::programs::ProgramFd,
}

impl Readings for KernelReadings {
    fn read(&self) -> Snapshot {
        let t0 = Instant::now();
        let view = Arc::clone(&self.view.borrow());
        let mut snap = Snapshot {
            peers_by_source: Source::ALL
                .iter()
                .map(|s| (*s, view.table.count_by_source(*s)))
                .collect(),
            kernel: snmp::read(&self.proc_path),
            up: self.health.check().is_ok(),
            residuals_withdrawn: view.residuals_withdrawn,
            ..Snapshot::default()
        };
        match self.stats.counters() {
            Ok(c) => snap.counters = c,
            Err(e) => {
                warn!(error = %e, "scrape could not read the verifier's counters");
                snap.up = false;
            }
        }
        for (id, spec) in view.table.iter() {
            match self.stats.peer_stats(id) {
                Ok(stats) => snap.peers.push(PeerSnapshot {
                    label: spec.label(),
                    stats,
                    learning: view.learning.contains(&id),
                }),
                Err(e) => {
                    warn!(peer = %spec.net, error = %e, "scrape could not read peer statistics");
                    snap.up = false;
                }
            }
        }
        snap.program = pin::program_runs(self.program.as_fd())
            .map(|runs| ProgramStats {
                runs,
                stats_enabled: std::fs::read_to_string(
                    self.proc_path.join("sys/kernel/bpf_stats_enabled"),
                )
                .is_ok_and(|v| v.trim() == "1"),
            })
            .ok();
        snap.collect_seconds = t0.elapsed().as_secs_f64();
        snap
    }
}

/// The HTTP endpoint's view of the daemon.
#[derive(Debug)]
pub struct Endpoint {
    /// The registry.
    pub metrics: Metrics,
    /// For `/healthz`.
    pub health: Arc<Health>,
}

impl Exporter for Endpoint {
    fn scrape(&self) -> String {
        self.metrics.render()
    }

    fn health(&self) -> Result<(), String> {
        self.health.check()
    }
}
