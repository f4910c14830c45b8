//! Prometheus metrics. Names, units and labels are contracts (DESIGN.md, docs/metrics.md).
//!
//! The kernel-side counters are cumulative per-CPU values; each scrape reads them, sums over
//! CPUs and sets the exported counters to those totals under one lock, so a scrape is a
//! consistent snapshot. Label values are bounded: `peer` only ever holds a configured (or
//! discovered) prefix, `proto` is tcp/udp, `reason` one of the skip reasons, `source` one of
//! the peer sources.

use std::{collections::BTreeSet, sync::Mutex};

use monitor_ebpf::{Counter, PROTO_TCP, PROTO_UDP, PeerStats, SKIP_REASONS};
use prometheus::{
    Encoder as _, Gauge, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
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
    /// The kernel's own checksum error counters, if readable.
    pub kernel: Option<KernelCsumErrors>,
    /// Attached and draining.
    pub up: bool,
    /// Seconds spent reading the kernel for this scrape.
    pub collect_seconds: f64,
}

/// The registry and every metric natt-monitor exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    verified_packets: IntCounterVec,
    verified_bytes: IntCounterVec,
    mismatches: IntCounterVec,
    dropped: IntCounterVec,
    learning_packets: IntCounterVec,
    peer_learning: IntGaugeVec,
    skipped: IntCounterVec,
    events_lost: IntCounter,
    peers: IntGaugeVec,
    kernel_tcp: IntCounter,
    kernel_udp: IntCounter,
    log_suppressed: IntCounter,
    up: IntGauge,
    scope: IntGaugeVec,
    variant: IntGaugeVec,
    capture: IntCounterVec,
    collect_seconds: Gauge,
    /// Peer labels exported by the previous scrape, so removed peers' series can be dropped.
    /// Also serialises scrapes.
    exported: Mutex<BTreeSet<String>>,
}

const PROTOS: [(usize, &str); 2] = [(PROTO_TCP, "tcp"), (PROTO_UDP, "udp")];

/// Values of the `result` label of `natt_monitor_capture_packets_total`.
pub const CAPTURE_RESULTS: [&str; 4] = ["written", "rate_limited", "file_full", "ring_full"];

fn counter_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<IntCounterVec, prometheus::Error> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

fn counter(r: &Registry, name: &str, help: &str) -> Result<IntCounter, prometheus::Error> {
    let c = IntCounter::new(name, help)?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

impl Metrics {
    /// Registers every metric; error counters and per-reason/per-source series start at 0 so
    /// alert rules can use `rate()` from the first scrape.
    ///
    /// # Errors
    /// Only on a programming error (duplicate or invalid metric names).
    #[expect(
        clippy::too_many_lines,
        reason = "one declaration per exported metric, with its help text"
    )]
    pub fn new() -> Result<Self, prometheus::Error> {
        let r = Registry::new();
        let pp = &["peer", "proto"];
        let m = Self {
            verified_packets: counter_vec(
                &r,
                "natt_monitor_verified_packets_total",
                "Segments from a peer whose TCP/UDP checksum natt-monitor recomputed and found correct.",
                pp,
            )?,
            verified_bytes: counter_vec(
                &r,
                "natt_monitor_verified_bytes_total",
                "L4 bytes (header and payload) of the verified segments.",
                pp,
            )?,
            mismatches: counter_vec(
                &r,
                "natt_monitor_checksum_mismatches_total",
                "Segments from a peer whose recomputed checksum did not match: corrupted after decapsulation.",
                pp,
            )?,
            dropped: counter_vec(
                &r,
                "natt_monitor_dropped_packets_total",
                "Mismatching segments dropped in enforce mode, so that TCP retransmits them.",
                pp,
            )?,
            learning_packets: counter_vec(
                &r,
                "natt_monitor_learning_packets_total",
                "Segments passed unverified while the peer's NAT residual was being learned.",
                pp,
            )?,
            peer_learning: {
                let g = IntGaugeVec::new(
                    Opts::new(
                        "natt_monitor_peer_learning",
                        "1 while the peer's NAT residual is being learned (its segments are not verified yet), else 0.",
                    ),
                    &["peer"],
                )?;
                r.register(Box::new(g.clone()))?;
                g
            },
            skipped: counter_vec(
                &r,
                "natt_monitor_skipped_packets_total",
                "Packets seen by the verifier but not verified, by reason.",
                &["reason"],
            )?,
            events_lost: counter(
                &r,
                "natt_monitor_events_lost_total",
                "Mismatch events that did not fit in the ring buffer; the mismatch is still counted.",
            )?,
            peers: {
                let g = IntGaugeVec::new(
                    Opts::new(
                        "natt_monitor_peers",
                        "Peers in the verifier's scope, by where they came from.",
                    ),
                    &["source"],
                )?;
                r.register(Box::new(g.clone()))?;
                g
            },
            kernel_tcp: counter(
                &r,
                "natt_monitor_kernel_tcp_in_csum_errors_total",
                "The kernel's own count of TCP segments with bad checksums (Tcp InCsumErrors in /proc/net/snmp); it never includes NAT-T segments.",
            )?,
            kernel_udp: counter(
                &r,
                "natt_monitor_kernel_udp_in_csum_errors_total",
                "The kernel's own count of UDP datagrams with bad checksums (Udp InCsumErrors in /proc/net/snmp).",
            )?,
            log_suppressed: counter(
                &r,
                "natt_monitor_log_lines_suppressed_total",
                "Mismatch log lines withheld by the log rate limit; the mismatches are still counted.",
            )?,
            up: {
                let g = IntGauge::new(
                    "natt_monitor_up",
                    "1 while the verifier is attached and its event loop is draining, else 0.",
                )?;
                r.register(Box::new(g.clone()))?;
                g
            },
            capture: counter_vec(
                &r,
                "natt_monitor_capture_packets_total",
                "Mismatching packets for --capture, by result: written to the file, or left out (rate_limited, file_full, ring_full).",
                &["result"],
            )?,
            variant: {
                let g = IntGaugeVec::new(
                    Opts::new(
                        "natt_monitor_program_variant",
                        "1 for the verifier program the kernel runs, chosen by probing it: bpf_loop (5.17+) or bounded_loop.",
                    ),
                    &["variant"],
                )?;
                r.register(Box::new(g.clone()))?;
                g
            },
            scope: {
                let g = IntGaugeVec::new(
                    Opts::new(
                        "natt_monitor_scope",
                        "1 for the scope in force: sa (each segment's own IPsec state) or address (source address; kernels without BTF).",
                    ),
                    &["scope"],
                )?;
                r.register(Box::new(g.clone()))?;
                g
            },
            collect_seconds: {
                let g = Gauge::new(
                    "natt_monitor_scrape_collect_seconds",
                    "Seconds this scrape spent reading the verifier's maps and /proc.",
                )?;
                r.register(Box::new(g.clone()))?;
                g
            },
            registry: r,
            exported: Mutex::new(BTreeSet::new()),
        };
        let info = IntGaugeVec::new(
            Opts::new(
                "natt_monitor_build_info",
                "Always 1; labels carry the natt-monitor version.",
            ),
            &["version"],
        )?;
        m.registry.register(Box::new(info.clone()))?;
        info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        for (_, reason) in SKIP_REASONS {
            m.skipped.with_label_values(&[reason]).reset();
        }
        for result in CAPTURE_RESULTS {
            m.capture.with_label_values(&[result]).reset();
        }
        for s in Source::ALL {
            m.peers.with_label_values(&[s.as_str()]).set(0);
        }
        Ok(m)
    }

    /// Marks `scope` ("sa" or "address") and the program `variant` (`bpf_loop` or
    /// `bounded_loop`) as the ones in force.
    pub fn set_program(&self, scope: &str, variant: &str) {
        for s in ["sa", "address"] {
            self.scope
                .with_label_values(&[s])
                .set(i64::from(s == scope));
        }
        for v in ["bpf_loop", "bounded_loop"] {
            self.variant
                .with_label_values(&[v])
                .set(i64::from(v == variant));
        }
    }

    /// `natt_monitor_capture_packets_total`, which the capture task increments (all results
    /// but `ring_full`, which comes from the kernel).
    #[must_use]
    pub fn capture_results(&self) -> IntCounterVec {
        self.capture.clone()
    }

    /// Counter that the event drain task increments when it withholds a log line.
    #[must_use]
    pub fn log_suppressed(&self) -> IntCounter {
        self.log_suppressed.clone()
    }

    /// Applies a snapshot and returns the text exposition.
    #[must_use]
    pub fn render(&self, snap: &Snapshot) -> String {
        let mut exported = self
            .exported
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let set = |c: &IntCounter, v: u64| {
            c.reset();
            c.inc_by(v);
        };
        let now: BTreeSet<String> = snap.peers.iter().map(|p| p.label.clone()).collect();
        for gone in exported.difference(&now) {
            let _ = self.peer_learning.remove_label_values(&[gone]);
            for (_, proto) in PROTOS {
                for v in [
                    &self.verified_packets,
                    &self.verified_bytes,
                    &self.mismatches,
                    &self.dropped,
                    &self.learning_packets,
                ] {
                    let _ = v.remove_label_values(&[gone, proto]);
                }
            }
        }
        for peer in &snap.peers {
            let s = &peer.stats;
            self.peer_learning
                .with_label_values(&[peer.label.as_str()])
                .set(i64::from(peer.learning));
            for (p, proto) in PROTOS {
                let l = [peer.label.as_str(), proto];
                set(
                    &self.verified_packets.with_label_values(&l),
                    s.verified_packets[p],
                );
                set(
                    &self.verified_bytes.with_label_values(&l),
                    s.verified_bytes[p],
                );
                set(&self.mismatches.with_label_values(&l), s.mismatches[p]);
                set(&self.dropped.with_label_values(&l), s.drops[p]);
                set(&self.learning_packets.with_label_values(&l), s.learning[p]);
            }
        }
        *exported = now;
        for (counter, reason) in SKIP_REASONS {
            set(
                &self.skipped.with_label_values(&[reason]),
                snap.counters.get(counter),
            );
        }
        set(&self.events_lost, snap.counters.get(Counter::EventsLost));
        set(
            &self.capture.with_label_values(&["ring_full"]),
            snap.counters.get(Counter::CaptureLost),
        );
        for (source, n) in &snap.peers_by_source {
            self.peers
                .with_label_values(&[source.as_str()])
                .set(i64::try_from(*n).unwrap_or(i64::MAX));
        }
        if let Some(k) = snap.kernel {
            set(&self.kernel_tcp, k.tcp);
            set(&self.kernel_udp, k.udp);
        }
        self.up.set(i64::from(snap.up));
        self.collect_seconds.set(snap.collect_seconds);
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Snapshot {
        let a = PeerStats {
            verified_packets: [10, 2],
            verified_bytes: [14_800, 100],
            mismatches: [3, 0],
            drops: [3, 0],
            learning: [0, 0],
        };
        let b = PeerStats {
            learning: [5, 0],
            ..PeerStats::default()
        };
        let mut c = Counters::default();
        c.slots[Counter::SkipNotInScope as usize] = 7;
        c.slots[Counter::EventsLost as usize] = 1;
        Snapshot {
            peers: vec![
                PeerSnapshot {
                    label: "192.0.2.0/24".into(),
                    stats: a,
                    learning: false,
                },
                PeerSnapshot {
                    label: "2001:db8::/32".into(),
                    stats: PeerStats::default(),
                    learning: false,
                },
                PeerSnapshot {
                    label: "203.0.113.9/32".into(),
                    stats: b,
                    learning: true,
                },
            ],
            counters: c,
            peers_by_source: vec![(Source::Static, 2), (Source::Xfrm, 1)],
            kernel: Some(KernelCsumErrors { tcp: 4, udp: 5 }),
            up: true,
            collect_seconds: 0.000_25,
        }
    }

    #[test]
    fn renders_every_contract_metric_with_exact_values() {
        let m = Metrics::new().unwrap();
        let text = m.render(&sample());
        for line in [
            "natt_monitor_verified_packets_total{peer=\"192.0.2.0/24\",proto=\"tcp\"} 10",
            "natt_monitor_verified_packets_total{peer=\"192.0.2.0/24\",proto=\"udp\"} 2",
            "natt_monitor_verified_bytes_total{peer=\"192.0.2.0/24\",proto=\"tcp\"} 14800",
            "natt_monitor_checksum_mismatches_total{peer=\"192.0.2.0/24\",proto=\"tcp\"} 3",
            "natt_monitor_dropped_packets_total{peer=\"192.0.2.0/24\",proto=\"tcp\"} 3",
            "natt_monitor_checksum_mismatches_total{peer=\"2001:db8::/32\",proto=\"udp\"} 0",
            "natt_monitor_skipped_packets_total{reason=\"not_in_scope\"} 7",
            "natt_monitor_skipped_packets_total{reason=\"aggregated\"} 0",
            "natt_monitor_events_lost_total 1",
            "natt_monitor_peers{source=\"static\"} 2",
            "natt_monitor_peers{source=\"xfrm\"} 1",
            "natt_monitor_learning_packets_total{peer=\"203.0.113.9/32\",proto=\"tcp\"} 5",
            "natt_monitor_peer_learning{peer=\"203.0.113.9/32\"} 1",
            "natt_monitor_peer_learning{peer=\"192.0.2.0/24\"} 0",
            "natt_monitor_kernel_tcp_in_csum_errors_total 4",
            "natt_monitor_kernel_udp_in_csum_errors_total 5",
            "natt_monitor_log_lines_suppressed_total 0",
            "natt_monitor_up 1",
            "# HELP natt_monitor_up 1 while the verifier is attached and its event loop is draining, else 0.",
            "# TYPE natt_monitor_verified_packets_total counter",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert!(text.contains(&format!(
            "natt_monitor_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )));
    }

    /// docs/metrics.golden.prom is this exact exposition; `promtool check metrics` lints it in
    /// the test suite. Regenerate with `UPDATE_GOLDEN=1 cargo test -p natt-monitor golden`.
    #[test]
    fn golden_exposition() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/metrics.golden.prom");
        let m = Metrics::new().unwrap();
        m.set_program("sa", "bpf_loop");
        let text = m.render(&sample());
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
    fn removed_peers_disappear_and_counts_follow_the_kernel() {
        let m = Metrics::new().unwrap();
        let mut s = sample();
        let _ = m.render(&s);
        s.peers.truncate(1);
        s.peers[0].stats.verified_packets[0] = 25;
        s.up = false;
        let text = m.render(&s);
        assert!(!text.contains("2001:db8::/32"), "{text}");
        assert!(!text.contains("203.0.113.9/32"), "{text}");
        assert!(text.contains(
            "natt_monitor_verified_packets_total{peer=\"192.0.2.0/24\",proto=\"tcp\"} 25"
        ));
        assert!(text.contains("natt_monitor_up 0"));
    }
}
