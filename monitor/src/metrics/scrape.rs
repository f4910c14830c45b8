//! The scrape: `node_exporter`'s shape. Every scrape takes one `Snapshot` from `Readings` and
//! builds fresh families from it, one group per source (the verifier's maps, /proc/net/snmp,
//! the program's run statistics, and the daemon's own state). A source that could not be read
//! contributes no families, and `natt_monitor_scrape_collector_success{collector}` says so:
//! `natt_monitor_up` stays what the design defines, attached and draining.
//!
//! The families are defined once here, in a `Group` per source, and their descriptors are
//! taken once at registration (`ScrapeCollector::new`); a scrape sets values on fresh copies,
//! so a peer that is gone is simply absent from the next scrape.

use monitor_ebpf::{Counter, Proto, SKIP_REASONS};
use prometheus::{
    Gauge, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    core::{Collector, Desc},
    proto::MetricFamily,
};

use super::{CAPTURE_RESULTS, DaemonReadings, ProgramStats, Readings, VerifierReadings};
use crate::{peers::Source, snmp::KernelCsumErrors};

/// Builds the kernel-side families from a fresh `Snapshot` on every scrape.
pub(super) struct ScrapeCollector {
    readings: Box<dyn Readings>,
    /// The capture task's counts, merged with the kernel's `ring_full` into one family.
    capture: IntCounterVec,
    descs: Vec<Desc>,
}

impl ScrapeCollector {
    /// Over `readings`, with the capture task's counts `capture`.
    pub(super) fn new(
        readings: Box<dyn Readings>,
        capture: IntCounterVec,
    ) -> Result<Self, prometheus::Error> {
        Ok(Self {
            readings,
            capture,
            descs: Families::new()?.descs(),
        })
    }
}

impl Collector for ScrapeCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let snap = self.readings.read();
        let f = match Families::new() {
            Ok(f) => f,
            Err(e) => {
                // The same definitions were registered at start-up, so this cannot happen.
                tracing::error!(error = %e, "building the scrape's metric families");
                return Vec::new();
            }
        };
        let sources = [
            (
                VerifierFamilies::COLLECTOR,
                snap.verifier
                    .as_ref()
                    .map(|v| f.verifier.filled(v, &self.capture)),
            ),
            (
                SnmpFamilies::COLLECTOR,
                snap.kernel.map(|k| f.snmp.filled(k)),
            ),
            (
                ProgramFamilies::COLLECTOR,
                snap.program.map(|p| f.program.filled(p)),
            ),
        ];
        let mut out = Vec::new();
        for (collector, families) in sources {
            f.daemon
                .collector_success
                .with_label_values(&[collector])
                .set(i64::from(families.is_some()));
            out.extend(families.into_iter().flatten());
        }
        out.extend(f.daemon.filled(&snap.daemon, snap.collect_seconds));
        out
    }
}

/// The families of one source, in the order they are defined.
#[derive(Default)]
struct Group(Vec<Box<dyn Collector>>);

impl Group {
    /// Adds a family to the group and returns the handle that sets its values.
    fn add<C: Collector + Clone + 'static>(
        &mut self,
        c: Result<C, prometheus::Error>,
    ) -> Result<C, prometheus::Error> {
        let c = c?;
        self.0.push(Box::new(c.clone()));
        Ok(c)
    }

    fn descs(&self) -> impl Iterator<Item = Desc> + '_ {
        self.0.iter().flat_map(|c| c.desc().into_iter().cloned())
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.0.iter().flat_map(|c| c.collect()).collect()
    }
}

/// Every source's families, defined afresh for a scrape.
struct Families {
    verifier: VerifierFamilies,
    snmp: SnmpFamilies,
    program: ProgramFamilies,
    daemon: DaemonFamilies,
}

impl Families {
    fn new() -> Result<Self, prometheus::Error> {
        Ok(Self {
            verifier: VerifierFamilies::new()?,
            snmp: SnmpFamilies::new()?,
            program: ProgramFamilies::new()?,
            daemon: DaemonFamilies::new()?,
        })
    }

    fn descs(&self) -> Vec<Desc> {
        [
            &self.verifier.g,
            &self.snmp.g,
            &self.program.g,
            &self.daemon.g,
        ]
        .into_iter()
        .flat_map(Group::descs)
        .collect()
    }
}

fn per_peer(name: &str, help: &str) -> Result<IntCounterVec, prometheus::Error> {
    IntCounterVec::new(Opts::new(name, help), &["peer", "proto"])
}

fn set_count(gauge: &IntGauge, n: usize) {
    gauge.set(i64::try_from(n).unwrap_or(i64::MAX));
}

/// What the verifier's maps count: per peer, per skip reason, lost records, residual events.
struct VerifierFamilies {
    verified_packets: IntCounterVec,
    verified_bytes: IntCounterVec,
    mismatches: IntCounterVec,
    dropped: IntCounterVec,
    learning_packets: IntCounterVec,
    learning_mismatches: IntCounterVec,
    peer_learning: IntGaugeVec,
    skipped: IntCounterVec,
    events_lost: IntCounter,
    learning_lost: IntCounter,
    capture: IntCounterVec,
    residuals_withdrawn: IntCounter,
    residuals_inherited: IntCounter,
    residuals_evicted: IntCounter,
    residuals_confirmed: IntCounter,
    learning_dropped: IntCounter,
    learning_unheld: IntCounter,
    pairing_full: IntCounter,
    peers_aggregated: IntGauge,
    g: Group,
}

impl VerifierFamilies {
    const COLLECTOR: &str = "verifier";

    fn new() -> Result<Self, prometheus::Error> {
        let mut g = Group::default();
        Ok(Self {
            verified_packets: g.add(per_peer(
                "natt_monitor_verified_packets_total",
                "Segments from a peer whose TCP, UDP or ICMP checksum natt-monitor recomputed and found correct.",
            ))?,
            verified_bytes: g.add(per_peer(
                "natt_monitor_verified_bytes_total",
                "L4 bytes (header and payload) of the verified segments.",
            ))?,
            mismatches: g.add(per_peer(
                "natt_monitor_checksum_mismatches_total",
                "Segments from a peer whose recomputed checksum did not match: corrupted after decapsulation.",
            ))?,
            dropped: g.add(per_peer(
                "natt_monitor_dropped_packets_total",
                "Mismatching segments dropped in enforce mode, so that TCP retransmits them (UDP and ICMP are not retransmitted).",
            ))?,
            learning_packets: g.add(per_peer(
                "natt_monitor_learning_packets_total",
                "Segments not verified while the NAT residual of their SA was being learned: passed (observe mode, UDP, ICMPv6) or dropped for TCP to retransmit (TCP in enforce mode).",
            ))?,
            learning_mismatches: g.add(per_peer(
                "natt_monitor_learning_mismatches_total",
                "Segments passed unverified while the NAT residual of their SA was being learned (observe mode, and UDP) that left another residual than the one the SA then got: corrupted segments delivered. Counted by the daemon once the residual is known; starts at 0 with each daemon.",
            ))?,
            peer_learning: g.add(IntGaugeVec::new(
                Opts::new(
                    "natt_monitor_peer_learning",
                    "1 while the peer's NAT residual is being learned (its segments are not verified yet), else 0.",
                ),
                &["peer"],
            ))?,
            skipped: g.add(IntCounterVec::new(
                Opts::new(
                    "natt_monitor_skipped_packets_total",
                    "Packets seen by the verifier but not verified, by reason.",
                ),
                &["reason"],
            ))?,
            events_lost: g.add(IntCounter::new(
                "natt_monitor_events_lost_total",
                "Mismatch events that did not fit in the ring buffer; the mismatch is still counted.",
            ))?,
            learning_lost: g.add(IntCounter::new(
                "natt_monitor_learning_samples_lost_total",
                "Learning samples that did not fit in their ring buffer; learning a NAT residual then takes more segments.",
            ))?,
            capture: g.add(IntCounterVec::new(
                Opts::new(
                    "natt_monitor_capture_packets_total",
                    "Packets for --capture (mismatching ones and the intact retransmissions they pair with), by result: written to the file, or left out (rate_limited, file_full, ring_full).",
                ),
                &["result"],
            ))?,
            residuals_withdrawn: g.add(IntCounter::new(
                "natt_monitor_residuals_withdrawn_total",
                "SA residuals the verifier withdrew: 16 consecutive distinct segments of the SA left one identical other value and none verified in between; the SA learns again.",
            ))?,
            residuals_inherited: g.add(IntCounter::new(
                "natt_monitor_residuals_inherited_total",
                "SA residuals taken over at the SA's first segment from a live SA of the same NAT mapping (a rekey).",
            ))?,
            residuals_evicted: g.add(IntCounter::new(
                "natt_monitor_residuals_evicted_total",
                "SA residuals the verifier's LRU map (SA_TRUST) forgot while the SA carried traffic: restored from the NAT mapping's record at its next segment, or learned again.",
            ))?,
            residuals_confirmed: g.add(IntCounter::new(
                "natt_monitor_residuals_confirmed_total",
                "SA residuals the verifier confirmed itself in enforce mode: a TCP segment summed to 0 (no NAT), or TCP retransmitted a refused segment and the copy left the same residual.",
            ))?,
            learning_dropped: g.add(IntCounter::new(
                "natt_monitor_learning_dropped_packets_total",
                "TCP segments dropped in enforce mode because their SA had no residual yet, so that TCP's retransmission confirms or refutes the one they left; none is delivered unverified.",
            ))?,
            learning_unheld: g.add(IntCounter::new(
                "natt_monitor_learning_unheld_packets_total",
                "TCP segments of enforce-mode SAs without a residual that passed unverified because the verifier could not reach its held path (its tail-call slot empty). Never expected: a non-zero value is a defect to report.",
            ))?,
            pairing_full: g.add(IntCounter::new(
                "natt_monitor_corruption_pairing_full_total",
                "Dropped TCP segments the verifier could not remember for pairing, its map of 1,024 being full; their copies are counted unpaired.",
            ))?,
            peers_aggregated: g.add(IntGauge::new(
                "natt_monitor_peers_aggregated",
                "Peers past --max-peer-labels: their counts are summed under peer=\"other\".",
            ))?,
            g,
        })
    }

    /// The families of `r`. The per-reason and per-result series are always present (0 until
    /// something counts), so alert rules can use `rate()` from the first scrape.
    fn filled(&self, r: &VerifierReadings, capture: &IntCounterVec) -> Vec<MetricFamily> {
        let counter = |c: &IntCounter, v: u64| c.inc_by(v);
        for peer in &r.peers {
            let s = &peer.stats;
            self.peer_learning
                .with_label_values(&[peer.label.as_str()])
                .set(i64::from(peer.learning));
            for proto in Proto::ALL {
                let (p, l) = (proto as usize, [peer.label.as_str(), proto.as_str()]);
                let checked = [
                    (&self.verified_packets, s.verified_packets[p]),
                    (&self.verified_bytes, s.verified_bytes[p]),
                    (&self.mismatches, s.mismatches[p]),
                    (&self.dropped, s.drops[p]),
                ];
                // ICMPv6 messages pass unverified while their SA has no residual (ICMP over
                // IPv4 never does); none of them is a learning sample, so no ICMP segment is
                // judged once the residual is known: no learning-mismatch series for ICMP.
                // SCTP's CRC32c has no residual at all: neither series.
                let tcp_udp = proto == Proto::Tcp || proto == Proto::Udp;
                let judged =
                    tcp_udp.then_some((&self.learning_mismatches, peer.learning_mismatches[p]));
                let learned =
                    (proto != Proto::Sctp).then_some((&self.learning_packets, s.learning[p]));
                for (vec, value) in checked.into_iter().chain(learned).chain(judged) {
                    counter(&vec.with_label_values(&l), value);
                }
            }
        }
        for (c, reason) in SKIP_REASONS {
            counter(
                &self.skipped.with_label_values(&[reason]),
                r.counters.get(c),
            );
        }
        for (c, v) in [
            (&self.events_lost, r.counters.get(Counter::EventsLost)),
            (&self.learning_lost, r.counters.get(Counter::LearningLost)),
            (&self.residuals_withdrawn, r.residuals_withdrawn),
            (&self.residuals_inherited, r.residuals_inherited),
            (&self.residuals_evicted, r.residuals_evicted),
            (&self.residuals_confirmed, r.residuals_confirmed),
            (&self.learning_dropped, r.learning_dropped),
            (&self.learning_unheld, r.learning_unheld),
            (&self.pairing_full, r.pairing_full),
        ] {
            counter(c, v);
        }
        set_count(&self.peers_aggregated, r.peers_aggregated);
        for result in CAPTURE_RESULTS {
            let v = if result == "ring_full" {
                r.counters.get(Counter::CaptureLost)
            } else {
                capture.with_label_values(&[result]).get()
            };
            counter(&self.capture.with_label_values(&[result]), v);
        }
        self.g.collect()
    }
}

/// The kernel's own checksum error counters, from /proc/net/snmp.
struct SnmpFamilies {
    kernel_tcp: IntCounter,
    kernel_udp: IntCounter,
    g: Group,
}

impl SnmpFamilies {
    const COLLECTOR: &str = "snmp";

    fn new() -> Result<Self, prometheus::Error> {
        let mut g = Group::default();
        Ok(Self {
            kernel_tcp: g.add(IntCounter::new(
                "natt_monitor_kernel_tcp_in_csum_errors_total",
                "The kernel's own count of TCP segments with bad checksums (Tcp InCsumErrors in /proc/net/snmp); it never includes NAT-T segments.",
            ))?,
            kernel_udp: g.add(IntCounter::new(
                "natt_monitor_kernel_udp_in_csum_errors_total",
                "The kernel's own count of UDP datagrams with bad checksums (Udp InCsumErrors in /proc/net/snmp).",
            ))?,
            g,
        })
    }

    fn filled(&self, k: KernelCsumErrors) -> Vec<MetricFamily> {
        self.kernel_tcp.inc_by(k.tcp);
        self.kernel_udp.inc_by(k.udp);
        self.g.collect()
    }
}

/// The verifier program's run statistics, from the kernel's program info.
struct ProgramFamilies {
    program_run_seconds: prometheus::Counter,
    program_runs: IntCounter,
    bpf_stats: IntGauge,
    g: Group,
}

impl ProgramFamilies {
    const COLLECTOR: &str = "program";

    fn new() -> Result<Self, prometheus::Error> {
        let mut g = Group::default();
        Ok(Self {
            program_run_seconds: g.add(prometheus::Counter::new(
                "natt_monitor_program_run_seconds_total",
                "Time the kernel spent running the verifier program, while kernel.bpf_stats_enabled is 1.",
            ))?,
            program_runs: g.add(IntCounter::new(
                "natt_monitor_program_runs_total",
                "Runs of the verifier program (one per packet at the cgroup's ingress), while kernel.bpf_stats_enabled is 1.",
            ))?,
            bpf_stats: g.add(IntGauge::new(
                "natt_monitor_bpf_stats_enabled",
                "1 while kernel.bpf_stats_enabled is 1, so that the program's run counts grow; else 0.",
            ))?,
            g,
        })
    }

    fn filled(&self, p: ProgramStats) -> Vec<MetricFamily> {
        #[expect(
            clippy::cast_precision_loss,
            reason = "seconds as a float, exact to the microsecond for centuries"
        )]
        self.program_run_seconds
            .inc_by(p.runs.run_time_ns as f64 / 1e9);
        self.program_runs.inc_by(p.runs.runs);
        self.bpf_stats.set(i64::from(p.stats_enabled));
        self.g.collect()
    }
}

/// What the daemon knows itself, and how each source fared.
struct DaemonFamilies {
    up: IntGauge,
    collect_seconds: Gauge,
    peers: IntGaugeVec,
    peers_observe_only: IntGauge,
    peers_over_limit: IntGauge,
    tunnels: IntGauge,
    tunnels_gro_on: IntGauge,
    collector_success: IntGaugeVec,
    g: Group,
}

impl DaemonFamilies {
    fn new() -> Result<Self, prometheus::Error> {
        let mut g = Group::default();
        Ok(Self {
            up: g.add(IntGauge::new(
                "natt_monitor_up",
                "1 while the verifier is attached and its event loop is draining, else 0.",
            ))?,
            collect_seconds: g.add(Gauge::new(
                "natt_monitor_scrape_collect_seconds",
                "Seconds this scrape spent reading the verifier's maps and /proc.",
            ))?,
            peers: g.add(IntGaugeVec::new(
                Opts::new(
                    "natt_monitor_peers",
                    "Peers in the verifier's scope, by where they came from.",
                ),
                &["source"],
            ))?,
            peers_observe_only: g.add(IntGauge::new(
                "natt_monitor_peers_observe_only",
                "Peers configured or discovered in enforce mode that run in observe mode: address scope learns their NAT residual, and a learned residual is never enforced there.",
            ))?,
            peers_over_limit: g.add(IntGauge::new(
                "natt_monitor_peers_over_limit",
                "Peers discovered from the kernel's NAT-T SAs (and SA scope's catch-alls) that do not fit in --max-peers and so have no entry of their own in the verifier's maps.",
            ))?,
            tunnels: g.add(IntGauge::new(
                "natt_monitor_tunnels",
                "Tunnel devices (GRE, IPIP, SIT, ip6 tunnels) inside NAT-T transport SAs whose inner segments are verified: an inbound policy requires ESP for everything that arrives on them.",
            ))?,
            tunnels_gro_on: g.add(IntGauge::new(
                "natt_monitor_tunnels_gro_on",
                "Verified tunnel devices with GRO on: GRO merges their inner segments, and merged segments cannot be verified (ethtool -K <tunnel> gro off).",
            ))?,
            collector_success: g.add(IntGaugeVec::new(
                Opts::new(
                    "natt_monitor_scrape_collector_success",
                    "1 if this scrape read the source (verifier: the verifier's maps; snmp: /proc/net/snmp; program: the program's run statistics), 0 if it could not; a failed source's metrics are absent from the scrape.",
                ),
                &["collector"],
            ))?,
            g,
        })
    }

    /// The families of `d`. Every peer source has its series, 0 when it has no peers.
    fn filled(&self, d: &DaemonReadings, collect_seconds: f64) -> Vec<MetricFamily> {
        for source in Source::ALL {
            let n = d
                .peers_by_source
                .iter()
                .find(|(s, _)| *s == source)
                .map_or(0, |(_, n)| *n);
            set_count(&self.peers.with_label_values(&[source.as_str()]), n);
        }
        for (gauge, n) in [
            (&self.peers_observe_only, d.peers_observe_only),
            (&self.peers_over_limit, d.peers_over_limit),
            (&self.tunnels, d.tunnels),
            (&self.tunnels_gro_on, d.tunnels_gro_on),
        ] {
            set_count(gauge, n);
        }
        self.up.set(i64::from(d.up));
        self.collect_seconds.set(collect_seconds);
        self.g.collect()
    }
}
