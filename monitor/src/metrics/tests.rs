//! The exposition, exactly: every contract metric, the golden file, and what a scrape leaves
//! out when a source cannot be read.

use std::sync::{Arc, Mutex};

use monitor_ebpf::{Counter, PeerStats};

use super::*;
use crate::{ebpf::Counters, peers::Source, snmp::KernelCsumErrors};

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
        daemon: DaemonReadings {
            up: true,
            peers_by_source: vec![(Source::Static, 2), (Source::Xfrm, 1)],
            peers_observe_only: 0,
            peers_over_limit: 0,
            tunnels: 1,
            tunnels_gro_on: 0,
        },
        verifier: Some(VerifierReadings {
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
            peers_aggregated: 0,
            counters: c,
            residuals_withdrawn: 1,
            residuals_inherited: 3,
            residuals_evicted: 0,
            residuals_confirmed: 2,
            learning_dropped: 4,
            learning_unheld: 0,
            pairing_full: 6,
        }),
        kernel: Some(KernelCsumErrors { tcp: 4, udp: 5 }),
        program: Some(ProgramStats {
            runs: crate::pin::ProgramRuns {
                run_time_ns: 1_500_000_000,
                runs: 6_000_000,
            },
            stats_enabled: true,
        }),
        collect_seconds: 0.000_25,
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
        "natt_monitor_scrape_collector_success{collector=\"verifier\"} 1",
        "natt_monitor_scrape_collector_success{collector=\"snmp\"} 1",
        "natt_monitor_scrape_collector_success{collector=\"program\"} 1",
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
        .find_map(|l| l.strip_prefix("natt_monitor_config_last_reload_success_timestamp_seconds "))
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
    // Program statistics that could not be read are absent, not 0, and the collector says so.
    fixed.0.lock().unwrap().program = None;
    let text = m.render();
    for name in [
        "natt_monitor_program_runs_total",
        "natt_monitor_program_run_seconds_total",
        "natt_monitor_bpf_stats_enabled",
    ] {
        assert!(!text.contains(name), "{name} in\n{text}");
    }
    assert!(
        text.lines()
            .any(|l| l == "natt_monitor_scrape_collector_success{collector=\"program\"} 0"),
        "{text}"
    );
}

#[test]
fn each_scrape_reads_afresh_so_removed_peers_disappear() {
    let (m, fixed) = metrics(sample());
    assert!(m.render().contains("2001:db8::/32"));
    {
        let mut s = fixed.0.lock().unwrap();
        let v = s.verifier.as_mut().unwrap();
        v.peers.truncate(1);
        v.peers[0].stats.verified_packets[0] = 25;
        s.daemon.up = false;
        s.kernel = None;
    }
    let text = m.render();
    assert!(!text.contains("2001:db8::/32"), "{text}");
    assert!(!text.contains("203.0.113.9/32"), "{text}");
    assert!(
        text.contains(
            "natt_monitor_verified_packets_total{peer=\"192.0.2.0/24\",proto=\"tcp\"} 25"
        )
    );
    assert!(text.contains("natt_monitor_up 0"));
    assert!(
        !text.contains("natt_monitor_kernel_tcp_in_csum_errors_total"),
        "unreadable /proc: absent, not 0\n{text}"
    );
    assert!(text.contains("natt_monitor_scrape_collector_success{collector=\"snmp\"} 0"));
}

/// A verifier map that cannot be read leaves the verifier's families out and says so; `up`
/// stays what it is (attached and draining), and the other sources are still reported.
#[test]
fn an_unreadable_verifier_map_fails_its_collector_not_up() {
    let (m, fixed) = metrics(sample());
    fixed.0.lock().unwrap().verifier = None;
    let text = m.render();
    for name in [
        "natt_monitor_verified_packets_total",
        "natt_monitor_checksum_mismatches_total",
        "natt_monitor_skipped_packets_total",
        "natt_monitor_residuals_withdrawn_total",
        "natt_monitor_capture_packets_total",
        "natt_monitor_peers_aggregated",
    ] {
        assert!(!text.contains(name), "{name} in\n{text}");
    }
    for line in [
        "natt_monitor_up 1",
        "natt_monitor_scrape_collector_success{collector=\"verifier\"} 0",
        "natt_monitor_scrape_collector_success{collector=\"snmp\"} 1",
        "natt_monitor_kernel_tcp_in_csum_errors_total 4",
        "natt_monitor_peers{source=\"static\"} 2",
        "natt_monitor_log_lines_suppressed_total 0",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
}
