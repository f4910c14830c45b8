//! What `/metrics` and `/healthz` read.
//!
//! Owns nothing that changes: it reads the verifier's statistics maps (through their own
//! descriptors, without a lock), the state's published `View`, the health flags and
//! /proc/net/snmp, once per scrape.

use std::{
    collections::{HashMap, HashSet},
    os::fd::AsFd as _,
    path::PathBuf,
    sync::Arc,
    time::Instant,
};

use ipnet::IpNet;
use monitor_ebpf::{PROTO_COUNT, PeerStats, TrustCounter};
use tokio::sync::watch;
use tracing::warn;

use crate::{
    daemon::{health::Health, state::View},
    ebpf::{EbpfFailure, Stats},
    http::Exporter,
    metrics::{
        DaemonReadings, Metrics, PeerSnapshot, ProgramStats, Readings, Snapshot, VerifierReadings,
    },
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
    /// Which peers have a label of their own (`--max-peer-labels`) and the sum of the others.
    pub labels: std::sync::Mutex<LabelCap>,
}

/// `--max-peer-labels`: which peers are exported under their own `peer` label, and the sum of
/// the others under `peer="other"`.
///
/// Both stay valid Prometheus counters as peers come and go: a peer keeps the label it got
/// (an aggregated one is never promoted when a slot frees, which would take its counts out of
/// `other`), and the counts of an aggregated peer that goes stay in `other` (as last read), so
/// `other` never decreases.
#[derive(Debug, Default)]
pub struct LabelCap {
    cap: usize,
    labelled: HashSet<IpNet>,
    /// Aggregated peers and their counts at the last scrape.
    aggregated: HashMap<IpNet, Counts>,
    /// Counts of aggregated peers that went.
    retired: Counts,
}

/// A peer's counters, as `other` sums them: the verifier's and the daemon's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Counts {
    kernel: PeerStats,
    learning_mismatches: [u64; PROTO_COUNT],
}

impl Counts {
    fn of(p: &PeerSnapshot) -> Self {
        Self {
            kernel: p.stats,
            learning_mismatches: p.learning_mismatches,
        }
    }

    fn merged(mut self, other: &Self) -> Self {
        self.kernel = self.kernel.merged(&other.kernel);
        for (a, b) in self
            .learning_mismatches
            .iter_mut()
            .zip(other.learning_mismatches)
        {
            *a += b;
        }
        self
    }

    fn snapshot(self, label: String, learning: bool) -> PeerSnapshot {
        PeerSnapshot {
            label,
            stats: self.kernel,
            learning,
            learning_mismatches: self.learning_mismatches,
        }
    }
}

impl LabelCap {
    /// Room for `cap` labels.
    #[must_use]
    pub fn new(cap: u32) -> Self {
        Self {
            cap: cap as usize,
            ..Self::default()
        }
    }

    /// Sorts one scrape's `peers` (prefix and readings, in the order labels are offered) into
    /// labelled snapshots and one `other`; returns them and how many present peers `other`
    /// sums.
    pub fn apply(&mut self, peers: Vec<(IpNet, PeerSnapshot)>) -> (Vec<PeerSnapshot>, usize) {
        let present: HashSet<IpNet> = peers.iter().map(|(net, _)| *net).collect();
        self.labelled.retain(|net| present.contains(net));
        let gone: Vec<IpNet> = self
            .aggregated
            .keys()
            .filter(|net| !present.contains(net))
            .copied()
            .collect();
        for net in gone {
            if let Some(last) = self.aggregated.remove(&net) {
                self.retired = self.retired.merged(&last);
            }
        }
        let mut out = Vec::new();
        let mut sum = self.retired;
        let mut learning = false;
        let mut summed = 0;
        for (net, p) in peers {
            let labelled = self.labelled.contains(&net)
                || (!self.aggregated.contains_key(&net)
                    && self.labelled.len() < self.cap
                    && self.labelled.insert(net));
            if labelled {
                out.push(p);
            } else {
                summed += 1;
                let counts = Counts::of(&p);
                self.aggregated.insert(net, counts);
                sum = sum.merged(&counts);
                learning |= p.learning;
            }
        }
        if summed > 0 || self.retired != Counts::default() {
            out.push(sum.snapshot(OTHER_PEERS.to_owned(), learning));
        }
        (out, summed)
    }
}

/// The `peer` label of the peers past `--max-peer-labels`, summed. No peer has it: peer labels
/// are prefixes.
pub const OTHER_PEERS: &str = "other";

impl KernelReadings {
    /// The verifier's host-wide counters: residual events, pairing, skips and lost records.
    fn read_totals(&self, r: &mut VerifierReadings) -> Result<(), EbpfFailure> {
        // Residuals the LRU forgot: restored by the verifier from the NAT mapping's record, or
        // learned again when that was forgotten too (counted by the daemon, already in `r`).
        let mut restored = 0;
        for (counter, field) in [
            (TrustCounter::Withdrawn, &mut r.residuals_withdrawn),
            (TrustCounter::Inherited, &mut r.residuals_inherited),
            (TrustCounter::Confirmed, &mut r.residuals_confirmed),
            (TrustCounter::HeldDropped, &mut r.learning_dropped),
            (TrustCounter::Unheld, &mut r.learning_unheld),
            (TrustCounter::Restored, &mut restored),
        ] {
            *field = self.stats.trust(counter)?;
        }
        r.residuals_evicted += restored;
        r.pairing_full = self.stats.pairing(monitor_ebpf::PairSlot::NotRemembered)?;
        r.counters = self.stats.counters()?;
        Ok(())
    }

    /// Everything the verifier's maps say, per peer (labels capped by `--max-peer-labels`) and
    /// host-wide.
    fn read_verifier(&self, view: &View) -> Result<VerifierReadings, EbpfFailure> {
        let mut r = VerifierReadings {
            residuals_evicted: view.residuals_evicted,
            ..VerifierReadings::default()
        };
        self.read_totals(&mut r)?;
        // Static peers are offered labels first, then discovered ones in id order.
        let ordered = view
            .table
            .iter()
            .filter(|(_, p)| p.source == Source::Static)
            .chain(
                view.table
                    .iter()
                    .filter(|(_, p)| p.source != Source::Static),
            );
        let mut peers = Vec::with_capacity(view.table.len());
        // SA scope's two catch-alls are one label, `undiscovered`, outside the label cap.
        let mut undiscovered: Option<PeerSnapshot> = None;
        for (id, spec) in ordered {
            let p = PeerSnapshot {
                label: spec.label(),
                stats: self.stats.peer_stats(id)?,
                learning: view.learning.contains(&id),
                learning_mismatches: view
                    .learning_mismatches
                    .get(&id)
                    .copied()
                    .unwrap_or_default(),
            };
            if spec.source == Source::Undiscovered {
                undiscovered = Some(match undiscovered {
                    Some(u) => Counts::of(&u)
                        .merged(&Counts::of(&p))
                        .snapshot(u.label, u.learning || p.learning),
                    None => p,
                });
            } else {
                peers.push((spec.net, p));
            }
        }
        let (mut peers, summed) = self
            .labels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .apply(peers);
        peers.extend(undiscovered);
        r.peers = peers;
        r.peers_aggregated = summed;
        Ok(r)
    }
}

impl Readings for KernelReadings {
    fn read(&self) -> Snapshot {
        let t0 = Instant::now();
        let view = Arc::clone(&self.view.borrow());
        let by_source = |s: &Source| (*s, view.table.count_by_source(*s));
        let verifier = self
            .read_verifier(&view)
            .inspect_err(|e| {
                warn!(error = %e, "scrape could not read the verifier's maps; its metrics are left out (natt_monitor_scrape_collector_success{{collector=\"verifier\"}} 0)");
            })
            .ok();
        let program = pin::program_runs(self.program.as_fd())
            .inspect_err(|e| {
                warn!(error = %e, "scrape could not read the verifier program's run statistics");
            })
            .ok()
            .map(|runs| ProgramStats {
                runs,
                stats_enabled: std::fs::read_to_string(
                    self.proc_path.join("sys/kernel/bpf_stats_enabled"),
                )
                .is_ok_and(|v| v.trim() == "1"),
            });
        Snapshot {
            daemon: DaemonReadings {
                up: self.health.check().is_ok(),
                peers_by_source: Source::ALL.iter().map(by_source).collect(),
                peers_observe_only: view.observe_only,
                peers_over_limit: view.over_limit,
                tunnels: view.tunnels,
                tunnels_gro_on: view.tunnels_gro_on,
            },
            verifier,
            kernel: snmp::read(&self.proc_path),
            program,
            collect_seconds: t0.elapsed().as_secs_f64(),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(net: &str, verified: u64) -> (IpNet, PeerSnapshot) {
        let net: IpNet = net.parse().unwrap();
        let mut stats = PeerStats::default();
        stats.verified_packets[0] = verified;
        (
            net,
            PeerSnapshot {
                label: net.to_string(),
                stats,
                learning: false,
                learning_mismatches: [0; PROTO_COUNT],
            },
        )
    }

    fn labels(out: &[PeerSnapshot]) -> Vec<(String, u64)> {
        out.iter()
            .map(|p| (p.label.clone(), p.stats.verified_packets[0]))
            .collect()
    }

    /// Labels are kept, `other` never decreases as peers come and go, and a freed label goes
    /// to a new peer, never to one whose counts are in `other`.
    #[test]
    fn labels_stick_and_other_never_decreases() {
        let mut cap = LabelCap::new(2);
        let (out, summed) = cap.apply(vec![
            peer("192.0.2.1/32", 10),
            peer("192.0.2.2/32", 20),
            peer("192.0.2.3/32", 30),
            peer("192.0.2.4/32", 40),
        ]);
        assert_eq!(summed, 2);
        assert_eq!(
            labels(&out),
            [
                ("192.0.2.1/32".into(), 10),
                ("192.0.2.2/32".into(), 20),
                ("other".into(), 70)
            ]
        );
        // .2 (labelled) and .3 (summed) go; .5 arrives and takes the freed label; .4 stays
        // summed, and .3's last counts stay in `other`.
        let (out, summed) = cap.apply(vec![
            peer("192.0.2.1/32", 11),
            peer("192.0.2.4/32", 41),
            peer("192.0.2.5/32", 5),
        ]);
        assert_eq!(summed, 1);
        assert_eq!(
            labels(&out),
            [
                ("192.0.2.1/32".into(), 11),
                ("192.0.2.5/32".into(), 5),
                ("other".into(), 71)
            ]
        );
        // Every summed peer gone: `other` stays, at what it had.
        let (out, summed) = cap.apply(vec![peer("192.0.2.1/32", 12)]);
        assert_eq!(summed, 0);
        assert_eq!(
            labels(&out),
            [("192.0.2.1/32".into(), 12), ("other".into(), 71)]
        );
    }

    #[test]
    fn under_the_cap_there_is_no_other() {
        let mut cap = LabelCap::new(256);
        let (out, summed) = cap.apply(vec![peer("192.0.2.1/32", 1)]);
        assert_eq!(
            (labels(&out), summed),
            (vec![("192.0.2.1/32".into(), 1)], 0)
        );
        let (out, _) = LabelCap::new(0).apply(vec![peer("192.0.2.1/32", 1)]);
        assert_eq!(labels(&out), [("other".into(), 1)]);
    }
}
