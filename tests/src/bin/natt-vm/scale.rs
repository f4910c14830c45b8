//! `k-ten-thousand-sas`: natt-monitor on a concentrator's scale. Ten thousand NAT-T SAs from
//! ten thousand peers are added to B in one `ip -batch` while the daemon runs, then the
//! scenario's own SAs: discovery must find all of them live, the exporter must keep its series
//! bounded, and the one SA with traffic must be verified exactly as in `c-enforce`.

use std::{
    fmt::Write as _,
    fs,
    time::{Duration, Instant},
};

use natt_monitor_tests::net::sh;

use crate::{
    processes::{Daemon, metric, scrape},
    topology::Topology,
};

/// SAs (and peers) added besides the scenario's own.
pub(crate) const DUMMY_SAS: u64 = 10_000;
/// The maps are sized for them (`--max-peers`).
pub(crate) const MAX_PEERS: &str = "16384";
/// `--max-peer-labels` at its default.
pub(crate) const PEER_LABELS: u64 = 256;

/// What the scale scenario measured.
#[derive(Debug, Default)]
pub(crate) struct Scale {
    /// Seconds `ip -batch` took to add the SAs.
    pub(crate) create_secs: f64,
    /// Seconds from the batch's start until every one was a peer in the daemon.
    pub(crate) discovered_secs: f64,
    /// Seconds from adding the scenario's own SAs until their residual was learned (the 64 KiB
    /// warm-up stream included): from SA creation to verification.
    pub(crate) verified_secs: f64,
    /// `natt_monitor_peers_aggregated` at the end.
    pub(crate) aggregated: u64,
    /// Distinct values of the `peer` label in the last scrape.
    pub(crate) label_values: usize,
    /// The daemon's resident memory at the end, in MiB.
    pub(crate) rss_mib: f64,
    /// Seconds the last scrape spent reading the maps and /proc.
    pub(crate) collect_secs: f64,
    /// Milliseconds the daemon's last re-read of the SAs took (dump and peer derivation), with
    /// all of them there.
    pub(crate) dump_ms: u64,
}

impl Scale {
    /// The RESULT line's summary.
    pub(crate) fn summary(&self) -> String {
        format!(
            "create_s={:.1},discovered_s={:.1},dump_ms={},verified_s={:.1},aggregated={},label_values={},rss_mib={:.1},collect_ms={:.1}",
            self.create_secs,
            self.discovered_secs,
            self.dump_ms,
            self.verified_secs,
            self.aggregated,
            self.label_values,
            self.rss_mib,
            self.collect_secs * 1e3
        )
    }

    /// Reads what the last scrape says, and the last dump time from the daemon's log.
    pub(crate) fn read(&mut self, text: &str, log: &str) {
        self.dump_ms = log
            .lines()
            .rev()
            .find(|l| l.contains("XFRM discovery: SAs changed"))
            .and_then(|l| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix("dump_ms="))
            })
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        self.aggregated = metric(text, "natt_monitor_peers_aggregated");
        self.rss_mib = float(text, "process_resident_memory_bytes") / (1024.0 * 1024.0);
        self.collect_secs = float(text, "natt_monitor_scrape_collect_seconds");
        let mut labels: Vec<&str> = text
            .match_indices("peer=\"")
            .filter_map(|(i, _)| text[i + 6..].split('"').next())
            .collect();
        labels.sort_unstable();
        labels.dedup();
        self.label_values = labels.len();
    }
}

/// A float sample of an unlabelled metric, NaN if absent.
fn float(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(f64::NAN)
}

/// Adds `DUMMY_SAS` inbound NAT-T transport SAs to B (from 10.100.0.1 on, to B's address) in one
/// batch and waits until the daemon counts them all as peers; returns (seconds to add,
/// seconds until discovered).
pub(crate) fn add_dummy_sas(t: &Topology, d: &Daemon) -> (f64, f64) {
    let mut batch = String::new();
    for i in 0..DUMMY_SAS {
        let _ = writeln!(
            batch,
            "xfrm state add src 10.100.{}.{} dst {} proto esp spi {:#x} reqid {} mode transport enc ecb(cipher_null) \"\" encap espinudp 4500 4500 0.0.0.0",
            i / 250,
            i % 250 + 1,
            t.addrs.b,
            0x0010_0000 + i,
            1000 + i
        );
    }
    let path = "/tmp/dummy-sas.batch";
    fs::write(path, batch).expect("write the batch");
    let t0 = Instant::now();
    sh(&["ip", "-n", &t.b.name, "-batch", path]);
    let created = t0.elapsed().as_secs_f64();
    let deadline = t0 + Duration::from_secs(600);
    while metric(&scrape(&t.b), "natt_monitor_peers{source=\"xfrm\"}") < DUMMY_SAS {
        assert!(
            Instant::now() < deadline,
            "{DUMMY_SAS} SAs not discovered within 600 s; monitor log:\n{}",
            fs::read_to_string(&d.log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    (created, t0.elapsed().as_secs_f64())
}
