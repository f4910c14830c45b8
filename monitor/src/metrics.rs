//! Prometheus metrics. Names, units and labels are contracts (DESIGN.md, docs/metrics.md).
//!
//! Owns the registry and the exposition. Everything that counts in the kernel is read at
//! scrape time, through a `prometheus::core::Collector` (`ScrapeCollector`) that asks a
//! `Readings` source for one `Snapshot` and builds fresh metric families from it: nothing is
//! copied into long-lived counters, and a peer that is gone simply is not in the next scrape.
//! Counters kept by the process itself (suppressed log lines, capture results) are ordinary
//! registered metrics. Label values are bounded: `peer` only ever holds a configured or
//! discovered prefix, `proto` is tcp/udp, `reason` one of the skip reasons, `source` one of the
//! peer sources, `result` one of `CAPTURE_RESULTS`.

use monitor_ebpf::{Counter, PROTO_COUNT, PeerStats, Proto, SKIP_REASONS};
use prometheus::{
    Encoder as _, Gauge, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
    core::{Collector, Desc},
    proto::MetricFamily,
};

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
    /// Per peer readings.
    pub peers: Vec<PeerSnapshot>,
    /// Global counters.
    pub counters: Counters,
    /// Number of peers per source.
    pub peers_by_source: Vec<(Source, usize)>,
    /// The kernel's own checksum error counters, if readable (absent from the scrape if not).
    pub kernel: Option<KernelCsumErrors>,
    /// Attached and draining.
    pub up: bool,
    /// Seconds spent reading the kernel for this scrape.
    pub collect_seconds: f64,
    /// The verifier program's run statistics, when they could be read (absent if not).
    pub program: Option<ProgramStats>,
    /// SA residuals the verifier withdrew (`TrustCounter::Withdrawn`).
    pub residuals_withdrawn: u64,
    /// SA residuals taken over from a live SA of the same NAT mapping (`TrustCounter::Inherited`).
    pub residuals_inherited: u64,
    /// SA residuals the verifier's LRU map forgot, learned again (counted by the daemon).
    pub residuals_evicted: u64,
    /// SA residuals the verifier confirmed itself in enforce mode (`TrustCounter::Confirmed`).
    pub residuals_confirmed: u64,
    /// TCP segments dropped in enforce mode while their SA had no residual
    /// (`TrustCounter::HeldDropped`).
    pub learning_dropped: u64,
    /// TCP segments of enforce-mode SAs without a residual passed unverified because the held
    /// path could not be reached (`TrustCounter::Unheld`; never expected).
    pub learning_unheld: u64,
    /// Peers past `--max-peer-labels`, whose counts are summed under `peer="other"`.
    pub peers_aggregated: usize,
    /// Peers that ask for enforce mode but run in observe mode (address scope learns their
    /// residual).
    pub peers_observe_only: usize,
    /// Discovered peers (and catch-alls) left out because the maps hold no more.
    pub peers_over_limit: usize,
    /// Dropped TCP segments the verifier's pairing map had no room for
    /// (`PairSlot::NotRemembered`).
    pub pairing_full: u64,
    /// Tunnel devices whose inner segments are verified.
    pub tunnels: usize,
    /// Of those, the ones with GRO on.
    pub tunnels_gro_on: usize,
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

/// The git commit this build came from (`natt_monitor_build_info{revision}`), or `unknown`.
pub const REVISION: &str = env!("NATT_MONITOR_REVISION");

/// Values of the `result` label of `natt_monitor_capture_packets_total`.
pub const CAPTURE_RESULTS: [&str; 4] = ["written", "rate_limited", "file_full", "ring_full"];

/// The registry and the process-side counters.
pub struct Metrics {
    registry: Registry,
    log_suppressed: IntCounter,
    capture: IntCounterVec,
    shapes: IntCounterVec,
    waiting: IntGauge,
    reload: ReloadMetrics,
    discovery_errors: IntCounter,
}

/// The outcome of the last configuration (re)load, as Prometheus reports its own.
#[derive(Clone, Debug)]
pub struct ReloadMetrics {
    successful: IntGauge,
    success_time: Gauge,
}

impl ReloadMetrics {
    /// Records a load that succeeded now.
    pub fn succeeded(&self) {
        self.successful.set(1);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.success_time.set(now);
    }

    /// Records a reload that failed (the previous peers stay).
    pub fn failed(&self) {
        self.successful.set(0);
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn register<C: Collector + Clone + 'static>(r: &Registry, c: C) -> Result<C, prometheus::Error> {
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

/// The capture task's `natt_monitor_corruption_shapes_total` (every shape at 0) and
/// `natt_monitor_corruption_copies_waiting`, registered.
fn forensics_metrics(r: &Registry) -> Result<(IntCounterVec, IntGauge), prometheus::Error> {
    let shapes = register(
        r,
        IntCounterVec::new(
            Opts::new(
                "natt_monitor_corruption_shapes_total",
                "Corrupted copies by the shape of what changed, from a byte-for-byte comparison with TCP's intact retransmission (unpaired: nothing to compare with).",
            ),
            &["shape"],
        )?,
    )?;
    for shape in crate::forensics::Shape::ALL {
        shapes.with_label_values(&[shape.as_str()]);
    }
    let waiting = register(
        r,
        IntGauge::new(
            "natt_monitor_corruption_copies_waiting",
            "Corrupted copies of dropped TCP segments waiting for their intact retransmission; each is counted in natt_monitor_corruption_shapes_total once paired, or as unpaired after 60 s.",
        )?,
    )?;
    Ok((shapes, waiting))
}

impl Metrics {
    /// Registers every metric. `scope` ("sa" or "address") and `variant` (`bpf_loop` or
    /// `bounded_loop`) are fixed for the life of the process.
    ///
    /// # Errors
    /// Only on a programming error (duplicate or invalid metric names).
    pub fn new(
        readings: Box<dyn Readings>,
        scope: &str,
        variant: &str,
        peers_limit: u32,
    ) -> Result<Self, prometheus::Error> {
        let r = Registry::new();
        let info = register(
            &r,
            IntGaugeVec::new(
                Opts::new(
                    "natt_monitor_build_info",
                    "Always 1; labels carry the natt-monitor version and the git commit it was built from.",
                ),
                &["version", "revision"],
            )?,
        )?;
        info.with_label_values(&[env!("CARGO_PKG_VERSION"), REVISION])
            .set(1);
        let scopes = register(
            &r,
            IntGaugeVec::new(
                Opts::new(
                    "natt_monitor_scope",
                    "1 for the scope in force: sa (each segment's own IPsec state) or address (source address; kernels without BTF).",
                ),
                &["scope"],
            )?,
        )?;
        for s in ["sa", "address"] {
            scopes.with_label_values(&[s]).set(i64::from(s == scope));
        }
        let variants = register(
            &r,
            IntGaugeVec::new(
                Opts::new(
                    "natt_monitor_program_variant",
                    "1 for the verifier program the kernel runs, chosen by probing it: bpf_loop (5.17+) or bounded_loop.",
                ),
                &["variant"],
            )?,
        )?;
        for v in ["bpf_loop", "bounded_loop"] {
            variants
                .with_label_values(&[v])
                .set(i64::from(v == variant));
        }
        let log_suppressed = register(
            &r,
            IntCounter::new(
                "natt_monitor_log_lines_suppressed_total",
                "Mismatch log lines withheld by the log rate limit; the mismatches are still counted.",
            )?,
        )?;
        let reload = ReloadMetrics {
            successful: register(
                &r,
                IntGauge::new(
                    "natt_monitor_config_last_reload_successful",
                    "1 if the last load of the configuration (at start or on SIGHUP) succeeded, 0 if the last reload failed and the previous peers stayed.",
                )?,
            )?,
            success_time: register(
                &r,
                Gauge::new(
                    "natt_monitor_config_last_reload_success_timestamp_seconds",
                    "Unix time of the last successful load of the configuration.",
                )?,
            )?,
        };
        let discovery_errors = register(
            &r,
            IntCounter::new(
                "natt_monitor_discovery_errors_total",
                "XFRM discovery passes whose SAs could not be applied (e.g. more peers than the limit); the previous peers stay until a later pass succeeds.",
            )?,
        )?;
        register(
            &r,
            IntGauge::new(
                "natt_monitor_peers_limit",
                "The most peers the verifier's maps hold (static and discovered); a peer set past it is refused and counted as a discovery or reload error.",
            )?,
        )?
        .set(i64::from(peers_limit));
        let (shapes, waiting) = forensics_metrics(&r)?;
        // Not registered: the scrape collector merges these with the kernel's ring_full count
        // into one family.
        let capture = IntCounterVec::new(Opts::new("capture", "capture"), &["result"])?;
        let descs = Families::new()?.descs();
        r.register(Box::new(ScrapeCollector {
            readings,
            capture: capture.clone(),
            descs,
        }))?;
        Ok(Self {
            registry: r,
            log_suppressed,
            capture,
            shapes,
            waiting,
            reload,
            discovery_errors,
        })
    }

    /// The configuration load gauges, for start-up and the SIGHUP task.
    #[must_use]
    pub fn reload(&self) -> ReloadMetrics {
        self.reload.clone()
    }

    /// The discovery error counter, for the discovery task.
    #[must_use]
    pub fn discovery_errors(&self) -> IntCounter {
        self.discovery_errors.clone()
    }

    /// The capture task's counts of `natt_monitor_capture_packets_total` (every result but
    /// `ring_full`, which the kernel counts).
    #[must_use]
    pub fn capture_results(&self) -> IntCounterVec {
        self.capture.clone()
    }

    /// `natt_monitor_corruption_shapes_total`, by `shape`, for the capture task.
    #[must_use]
    pub fn corruption_shapes(&self) -> IntCounterVec {
        self.shapes.clone()
    }

    /// `natt_monitor_corruption_copies_waiting`, for the capture task.
    #[must_use]
    pub fn corruption_waiting(&self) -> IntGauge {
        self.waiting.clone()
    }

    /// Counter that the event drain task increments when it withholds a log line.
    #[must_use]
    pub fn log_suppressed(&self) -> IntCounter {
        self.log_suppressed.clone()
    }

    /// Adds the `process_*` metrics every Prometheus client library exports (CPU seconds,
    /// resident and virtual memory, open and maximum file descriptors, start time), read from
    /// /proc at each scrape, when `on` (off: `--web.disable-exporter-metrics`). Not part of
    /// `new`, whose exposition is a byte-exact golden file.
    ///
    /// # Errors
    /// Only on a programming error (registered twice).
    pub fn with_process_metrics(self, on: bool) -> Result<Self, prometheus::Error> {
        if on {
            self.registry.register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))?;
        }
        Ok(self)
    }

    /// Reads everything and returns the text exposition.
    #[must_use]
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }
}

/// Builds the kernel-side families from a fresh `Snapshot` on every scrape.
struct ScrapeCollector {
    readings: Box<dyn Readings>,
    capture: IntCounterVec,
    descs: Vec<Desc>,
}

impl Collector for ScrapeCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let snap = self.readings.read();
        match Families::new() {
            Ok(f) => f.filled(&snap, &self.capture),
            Err(e) => {
                // The same definitions were registered at start-up, so this cannot happen.
                tracing::error!(error = %e, "building the scrape's metric families");
                Vec::new()
            }
        }
    }
}

/// The metrics read from the kernel, defined once for `desc` and built afresh per scrape.
struct Families {
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
    peers: IntGaugeVec,
    kernel_tcp: IntCounter,
    kernel_udp: IntCounter,
    up: IntGauge,
    collect_seconds: Gauge,
    program_run_seconds: prometheus::Counter,
    program_runs: IntCounter,
    bpf_stats: IntGauge,
    residuals_withdrawn: IntCounter,
    residuals_inherited: IntCounter,
    residuals_evicted: IntCounter,
    residuals_confirmed: IntCounter,
    learning_dropped: IntCounter,
    learning_unheld: IntCounter,
    pairing_full: IntCounter,
    peers_aggregated: IntGauge,
    peers_observe_only: IntGauge,
    peers_over_limit: IntGauge,
    tunnels: IntGauge,
    tunnels_gro_on: IntGauge,
}

fn per_peer(name: &str, help: &str) -> Result<IntCounterVec, prometheus::Error> {
    IntCounterVec::new(Opts::new(name, help), &["peer", "proto"])
}

impl Families {
    #[expect(
        clippy::too_many_lines,
        reason = "the metric contract in one place: a name and a help text per family, in order"
    )]
    fn new() -> Result<Self, prometheus::Error> {
        Ok(Self {
            verified_packets: per_peer(
                "natt_monitor_verified_packets_total",
                "Segments from a peer whose TCP, UDP or ICMP checksum natt-monitor recomputed and found correct.",
            )?,
            verified_bytes: per_peer(
                "natt_monitor_verified_bytes_total",
                "L4 bytes (header and payload) of the verified segments.",
            )?,
            mismatches: per_peer(
                "natt_monitor_checksum_mismatches_total",
                "Segments from a peer whose recomputed checksum did not match: corrupted after decapsulation.",
            )?,
            dropped: per_peer(
                "natt_monitor_dropped_packets_total",
                "Mismatching segments dropped in enforce mode, so that TCP retransmits them (UDP and ICMP are not retransmitted).",
            )?,
            learning_packets: per_peer(
                "natt_monitor_learning_packets_total",
                "Segments not verified while the NAT residual of their SA was being learned: passed (observe mode, UDP, ICMPv6) or dropped for TCP to retransmit (TCP in enforce mode).",
            )?,
            learning_mismatches: per_peer(
                "natt_monitor_learning_mismatches_total",
                "Segments passed unverified while the NAT residual of their SA was being learned (observe mode, and UDP) that left another residual than the one the SA then got: corrupted segments delivered. Counted by the daemon once the residual is known; starts at 0 with each daemon.",
            )?,
            peer_learning: IntGaugeVec::new(
                Opts::new(
                    "natt_monitor_peer_learning",
                    "1 while the peer's NAT residual is being learned (its segments are not verified yet), else 0.",
                ),
                &["peer"],
            )?,
            skipped: IntCounterVec::new(
                Opts::new(
                    "natt_monitor_skipped_packets_total",
                    "Packets seen by the verifier but not verified, by reason.",
                ),
                &["reason"],
            )?,
            events_lost: IntCounter::new(
                "natt_monitor_events_lost_total",
                "Mismatch events that did not fit in the ring buffer; the mismatch is still counted.",
            )?,
            learning_lost: IntCounter::new(
                "natt_monitor_learning_samples_lost_total",
                "Learning samples that did not fit in their ring buffer; learning a NAT residual then takes more segments.",
            )?,
            capture: IntCounterVec::new(
                Opts::new(
                    "natt_monitor_capture_packets_total",
                    "Packets for --capture (mismatching ones and the intact retransmissions they pair with), by result: written to the file, or left out (rate_limited, file_full, ring_full).",
                ),
                &["result"],
            )?,
            peers: IntGaugeVec::new(
                Opts::new(
                    "natt_monitor_peers",
                    "Peers in the verifier's scope, by where they came from.",
                ),
                &["source"],
            )?,
            kernel_tcp: IntCounter::new(
                "natt_monitor_kernel_tcp_in_csum_errors_total",
                "The kernel's own count of TCP segments with bad checksums (Tcp InCsumErrors in /proc/net/snmp); it never includes NAT-T segments.",
            )?,
            kernel_udp: IntCounter::new(
                "natt_monitor_kernel_udp_in_csum_errors_total",
                "The kernel's own count of UDP datagrams with bad checksums (Udp InCsumErrors in /proc/net/snmp).",
            )?,
            up: IntGauge::new(
                "natt_monitor_up",
                "1 while the verifier is attached and its event loop is draining, else 0.",
            )?,
            collect_seconds: Gauge::new(
                "natt_monitor_scrape_collect_seconds",
                "Seconds this scrape spent reading the verifier's maps and /proc.",
            )?,
            program_run_seconds: prometheus::Counter::new(
                "natt_monitor_program_run_seconds_total",
                "Time the kernel spent running the verifier program, while kernel.bpf_stats_enabled is 1.",
            )?,
            program_runs: IntCounter::new(
                "natt_monitor_program_runs_total",
                "Runs of the verifier program (one per packet at the cgroup's ingress), while kernel.bpf_stats_enabled is 1.",
            )?,
            bpf_stats: IntGauge::new(
                "natt_monitor_bpf_stats_enabled",
                "1 while kernel.bpf_stats_enabled is 1, so that the program's run counts grow; else 0.",
            )?,
            pairing_full: IntCounter::new(
                "natt_monitor_corruption_pairing_full_total",
                "Dropped TCP segments the verifier could not remember for pairing, its map of 1,024 being full; their copies are counted unpaired.",
            )?,
            residuals_withdrawn: IntCounter::new(
                "natt_monitor_residuals_withdrawn_total",
                "SA residuals the verifier withdrew: 16 consecutive distinct segments of the SA left one identical other value and none verified in between; the SA learns again.",
            )?,
            residuals_inherited: IntCounter::new(
                "natt_monitor_residuals_inherited_total",
                "SA residuals taken over at the SA's first segment from a live SA of the same NAT mapping (a rekey).",
            )?,
            residuals_evicted: IntCounter::new(
                "natt_monitor_residuals_evicted_total",
                "SA residuals the verifier's LRU map (SA_TRUST) forgot while the SA carried traffic: restored from the NAT mapping's record at its next segment, or learned again.",
            )?,
            residuals_confirmed: IntCounter::new(
                "natt_monitor_residuals_confirmed_total",
                "SA residuals the verifier confirmed itself in enforce mode: a TCP segment summed to 0 (no NAT), or TCP retransmitted a refused segment and the copy left the same residual.",
            )?,
            learning_dropped: IntCounter::new(
                "natt_monitor_learning_dropped_packets_total",
                "TCP segments dropped in enforce mode because their SA had no residual yet, so that TCP's retransmission confirms or refutes the one they left; none is delivered unverified.",
            )?,
            learning_unheld: IntCounter::new(
                "natt_monitor_learning_unheld_packets_total",
                "TCP segments of enforce-mode SAs without a residual that passed unverified because the verifier could not reach its held path (its tail-call slot empty). Never expected: a non-zero value is a defect to report.",
            )?,
            peers_aggregated: IntGauge::new(
                "natt_monitor_peers_aggregated",
                "Peers past --max-peer-labels: their counts are summed under peer=\"other\".",
            )?,
            peers_observe_only: IntGauge::new(
                "natt_monitor_peers_observe_only",
                "Peers configured or discovered in enforce mode that run in observe mode: address scope learns their NAT residual, and a learned residual is never enforced there.",
            )?,
            peers_over_limit: IntGauge::new(
                "natt_monitor_peers_over_limit",
                "Peers discovered from the kernel's NAT-T SAs (and SA scope's catch-alls) that do not fit in --max-peers and so have no entry of their own in the verifier's maps.",
            )?,
            tunnels: IntGauge::new(
                "natt_monitor_tunnels",
                "Tunnel devices (GRE, IPIP, SIT, ip6 tunnels) inside NAT-T transport SAs whose inner segments are verified: an inbound policy requires ESP for everything that arrives on them.",
            )?,
            tunnels_gro_on: IntGauge::new(
                "natt_monitor_tunnels_gro_on",
                "Verified tunnel devices with GRO on: GRO merges their inner segments, and merged segments cannot be verified (ethtool -K <tunnel> gro off).",
            )?,
        })
    }

    fn collectors(&self) -> [&dyn Collector; 31] {
        [
            &self.verified_packets,
            &self.verified_bytes,
            &self.mismatches,
            &self.dropped,
            &self.learning_packets,
            &self.learning_mismatches,
            &self.peer_learning,
            &self.skipped,
            &self.events_lost,
            &self.learning_lost,
            &self.capture,
            &self.peers,
            &self.kernel_tcp,
            &self.kernel_udp,
            &self.up,
            &self.collect_seconds,
            &self.program_run_seconds,
            &self.program_runs,
            &self.bpf_stats,
            &self.residuals_withdrawn,
            &self.residuals_inherited,
            &self.residuals_evicted,
            &self.residuals_confirmed,
            &self.learning_dropped,
            &self.learning_unheld,
            &self.pairing_full,
            &self.peers_aggregated,
            &self.peers_observe_only,
            &self.peers_over_limit,
            &self.tunnels,
            &self.tunnels_gro_on,
        ]
    }

    fn descs(&self) -> Vec<Desc> {
        self.collectors()
            .iter()
            .flat_map(|c| c.desc().into_iter().cloned())
            .collect()
    }

    /// The host-wide counters and gauges of one scrape: lost records, residual events and the
    /// peer and tunnel counts.
    fn fill_totals(&self, snap: &Snapshot) {
        for (c, v) in [
            (&self.events_lost, snap.counters.get(Counter::EventsLost)),
            (
                &self.learning_lost,
                snap.counters.get(Counter::LearningLost),
            ),
            (&self.residuals_withdrawn, snap.residuals_withdrawn),
            (&self.residuals_inherited, snap.residuals_inherited),
            (&self.residuals_evicted, snap.residuals_evicted),
            (&self.residuals_confirmed, snap.residuals_confirmed),
            (&self.learning_dropped, snap.learning_dropped),
            (&self.learning_unheld, snap.learning_unheld),
            (&self.pairing_full, snap.pairing_full),
        ] {
            c.inc_by(v);
        }
        for (gauge, n) in [
            (&self.peers_aggregated, snap.peers_aggregated),
            (&self.peers_observe_only, snap.peers_observe_only),
            (&self.peers_over_limit, snap.peers_over_limit),
            (&self.tunnels, snap.tunnels),
            (&self.tunnels_gro_on, snap.tunnels_gro_on),
        ] {
            gauge.set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// The families of `snap`. The per-reason, per-result and per-source series are always
    /// present (0 until something counts), so alert rules can use `rate()` from the first
    /// scrape; the kernel's own counters are absent when /proc could not be read.
    fn filled(self, snap: &Snapshot, capture: &IntCounterVec) -> Vec<MetricFamily> {
        let counter = |c: &IntCounter, v: u64| c.inc_by(v);
        for peer in &snap.peers {
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
                snap.counters.get(c),
            );
        }
        self.fill_totals(snap);
        for result in CAPTURE_RESULTS {
            let v = if result == "ring_full" {
                snap.counters.get(Counter::CaptureLost)
            } else {
                capture.with_label_values(&[result]).get()
            };
            counter(&self.capture.with_label_values(&[result]), v);
        }
        for source in Source::ALL {
            let n = snap
                .peers_by_source
                .iter()
                .find(|(s, _)| *s == source)
                .map_or(0, |(_, n)| *n);
            self.peers
                .with_label_values(&[source.as_str()])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        let mut skip = Vec::new();
        match snap.kernel {
            Some(k) => {
                counter(&self.kernel_tcp, k.tcp);
                counter(&self.kernel_udp, k.udp);
            }
            None => skip.extend([
                "natt_monitor_kernel_tcp_in_csum_errors_total",
                "natt_monitor_kernel_udp_in_csum_errors_total",
            ]),
        }
        match snap.program {
            Some(p) => {
                #[expect(
                    clippy::cast_precision_loss,
                    reason = "seconds as a float, exact to the microsecond for centuries"
                )]
                self.program_run_seconds
                    .inc_by(p.runs.run_time_ns as f64 / 1e9);
                counter(&self.program_runs, p.runs.runs);
                self.bpf_stats.set(i64::from(p.stats_enabled));
            }
            None => skip.extend([
                "natt_monitor_program_run_seconds_total",
                "natt_monitor_program_runs_total",
                "natt_monitor_bpf_stats_enabled",
            ]),
        }
        self.up.set(i64::from(snap.up));
        self.collect_seconds.set(snap.collect_seconds);
        self.collectors()
            .iter()
            .flat_map(|c| c.collect())
            .filter(|mf| !skip.contains(&mf.name()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    fn sample() -> Snapshot {
        let a = PeerStats {
            verified_packets: [10, 2, 4, 3],
            verified_bytes: [14_800, 100, 4_032, 2_808],
            mismatches: [3, 0, 1, 1],
            drops: [3, 0, 1, 1],
            learning: [0, 0, 0, 0],
        };
        let b = PeerStats {
            learning: [5, 0, 0, 0],
            ..PeerStats::default()
        };
        let mut c = Counters::default();
        c.slots[Counter::SkipNotInScope as usize] = 7;
        c.slots[Counter::EventsLost as usize] = 1;
        c.slots[Counter::LearningLost as usize] = 2;
        Snapshot {
            peers: vec![
                PeerSnapshot {
                    label: "192.0.2.0/24".into(),
                    stats: a,
                    learning: false,
                    learning_mismatches: [0; 4],
                },
                PeerSnapshot {
                    label: "2001:db8::/32".into(),
                    stats: PeerStats::default(),
                    learning: false,
                    learning_mismatches: [0; 4],
                },
                PeerSnapshot {
                    label: "203.0.113.9/32".into(),
                    stats: b,
                    learning: true,
                    learning_mismatches: [2, 1, 0, 0],
                },
            ],
            counters: c,
            peers_by_source: vec![(Source::Static, 2), (Source::Xfrm, 1)],
            kernel: Some(KernelCsumErrors { tcp: 4, udp: 5 }),
            up: true,
            collect_seconds: 0.000_25,
            program: Some(ProgramStats {
                runs: crate::pin::ProgramRuns {
                    run_time_ns: 1_500_000_000,
                    runs: 6_000_000,
                },
                stats_enabled: true,
            }),
            residuals_withdrawn: 1,
            residuals_inherited: 3,
            residuals_evicted: 0,
            residuals_confirmed: 2,
            learning_dropped: 4,
            learning_unheld: 0,
            pairing_full: 6,
            peers_aggregated: 0,
            peers_observe_only: 0,
            peers_over_limit: 0,
            tunnels: 1,
            tunnels_gro_on: 0,
        }
    }

    /// Readings a test changes between scrapes.
    #[derive(Clone, Default)]
    struct Fixed(Arc<Mutex<Snapshot>>);

    impl Readings for Fixed {
        fn read(&self) -> Snapshot {
            self.0.lock().unwrap().clone()
        }
    }

    fn metrics(snap: Snapshot) -> (Metrics, Fixed) {
        let fixed = Fixed(Arc::new(Mutex::new(snap)));
        let m = Metrics::new(Box::new(fixed.clone()), "sa", "bpf_loop", 1024).unwrap();
        (m, fixed)
    }

    #[test]
    fn renders_every_contract_metric_with_exact_values() {
        let (m, _) = metrics(sample());
        m.log_suppressed().inc_by(2);
        m.capture_results().with_label_values(&["written"]).inc();
        m.discovery_errors().inc();
        let text = m.render();
        for line in [
            "natt_monitor_program_runs_total 6000000",
            "natt_monitor_program_run_seconds_total 1.5",
            "natt_monitor_bpf_stats_enabled 1",
            "natt_monitor_discovery_errors_total 1",
            "natt_monitor_peers_limit 1024",
            "natt_monitor_config_last_reload_successful 0",
            "natt_monitor_verified_packets_total{peer=\"192.0.2.0/24\",proto=\"tcp\"} 10",
            "natt_monitor_verified_packets_total{peer=\"192.0.2.0/24\",proto=\"udp\"} 2",
            "natt_monitor_verified_bytes_total{peer=\"192.0.2.0/24\",proto=\"tcp\"} 14800",
            "natt_monitor_checksum_mismatches_total{peer=\"192.0.2.0/24\",proto=\"tcp\"} 3",
            "natt_monitor_dropped_packets_total{peer=\"192.0.2.0/24\",proto=\"tcp\"} 3",
            "natt_monitor_checksum_mismatches_total{peer=\"2001:db8::/32\",proto=\"udp\"} 0",
            "natt_monitor_skipped_packets_total{reason=\"not_in_scope\"} 7",
            "natt_monitor_skipped_packets_total{reason=\"aggregated\"} 0",
            "natt_monitor_events_lost_total 1",
            "natt_monitor_learning_samples_lost_total 2",
            "natt_monitor_peers{source=\"static\"} 2",
            "natt_monitor_peers{source=\"xfrm\"} 1",
            "natt_monitor_learning_packets_total{peer=\"203.0.113.9/32\",proto=\"tcp\"} 5",
            "natt_monitor_peer_learning{peer=\"203.0.113.9/32\"} 1",
            "natt_monitor_peer_learning{peer=\"192.0.2.0/24\"} 0",
            "natt_monitor_kernel_tcp_in_csum_errors_total 4",
            "natt_monitor_kernel_udp_in_csum_errors_total 5",
            "natt_monitor_log_lines_suppressed_total 2",
            "natt_monitor_capture_packets_total{result=\"written\"} 1",
            "natt_monitor_capture_packets_total{result=\"ring_full\"} 0",
            "natt_monitor_up 1",
            "natt_monitor_scope{scope=\"sa\"} 1",
            "natt_monitor_program_variant{variant=\"bounded_loop\"} 0",
            "# HELP natt_monitor_up 1 while the verifier is attached and its event loop is draining, else 0.",
            "# TYPE natt_monitor_verified_packets_total counter",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert!(text.contains(&format!(
            "natt_monitor_build_info{{revision=\"{REVISION}\",version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )));
    }

    /// docs/metrics.golden.prom is this exact exposition; `promtool check metrics` lints it in
    /// the test suite. Regenerate with `UPDATE_GOLDEN=1 cargo test -p natt-monitor golden`.
    #[test]
    fn golden_exposition() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/metrics.golden.prom");
        let (m, _) = metrics(sample());
        // The one value that changes with every commit.
        let text = m.render().replace(
            &format!("revision=\"{REVISION}\""),
            "revision=\"0123456789ab\"",
        );
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::write(path, &text).unwrap();
        }
        let golden = std::fs::read_to_string(path).expect("docs/metrics.golden.prom");
        assert_eq!(
            text, golden,
            "regenerate with UPDATE_GOLDEN=1 if the change is intended"
        );
    }

    #[test]
    fn reload_outcome_and_unreadable_program_stats() {
        let (m, fixed) = metrics(sample());
        let reload = m.reload();
        reload.succeeded();
        let text = m.render();
        assert!(
            text.lines()
                .any(|l| l == "natt_monitor_config_last_reload_successful 1")
        );
        let at: f64 = text
            .lines()
            .find_map(|l| {
                l.strip_prefix("natt_monitor_config_last_reload_success_timestamp_seconds ")
            })
            .unwrap()
            .parse()
            .unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!((now - 60.0..=now).contains(&at), "{at} vs {now}");
        // A failed reload keeps the time of the last success.
        reload.failed();
        let text = m.render();
        assert!(
            text.lines()
                .any(|l| l == "natt_monitor_config_last_reload_successful 0")
        );
        assert!(text.contains(&format!(
            "natt_monitor_config_last_reload_success_timestamp_seconds {at}"
        )));
        // Program statistics that could not be read are absent, not 0.
        fixed.0.lock().unwrap().program = None;
        let text = m.render();
        for name in [
            "natt_monitor_program_runs_total",
            "natt_monitor_program_run_seconds_total",
            "natt_monitor_bpf_stats_enabled",
        ] {
            assert!(!text.contains(name), "{name} in\n{text}");
        }
    }

    #[test]
    fn each_scrape_reads_afresh_so_removed_peers_disappear() {
        let (m, fixed) = metrics(sample());
        assert!(m.render().contains("2001:db8::/32"));
        {
            let mut s = fixed.0.lock().unwrap();
            s.peers.truncate(1);
            s.peers[0].stats.verified_packets[0] = 25;
            s.up = false;
            s.kernel = None;
        }
        let text = m.render();
        assert!(!text.contains("2001:db8::/32"), "{text}");
        assert!(!text.contains("203.0.113.9/32"), "{text}");
        assert!(text.contains(
            "natt_monitor_verified_packets_total{peer=\"192.0.2.0/24\",proto=\"tcp\"} 25"
        ));
        assert!(text.contains("natt_monitor_up 0"));
        assert!(
            !text.contains("natt_monitor_kernel_tcp_in_csum_errors_total"),
            "unreadable /proc: absent, not 0\n{text}"
        );
    }
}
