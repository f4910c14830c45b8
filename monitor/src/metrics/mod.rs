//! Prometheus metrics. Names, units and labels are contracts (DESIGN.md, docs/metrics.md).
//!
//! Owns the registry and the exposition. Everything that counts in the kernel is read at
//! scrape time (`scrape`): a `prometheus::core::Collector` asks a `Readings` source for one
//! `Snapshot` and builds fresh families from it, one group per source, so nothing is copied
//! into long-lived counters and a peer that is gone simply is not in the next scrape.
//! Counters kept by the process itself (suppressed log lines, capture results, shapes) are
//! ordinary registered metrics. Label values are bounded: `peer` only ever holds a configured
//! or discovered prefix, `proto` is tcp/udp/icmp/sctp, `reason` one of the skip reasons,
//! `source` one of the peer sources, `result` one of `CAPTURE_RESULTS`, `collector` one of the
//! three scrape sources.

use prometheus::{
    Encoder as _, Gauge, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder, core::Collector,
};

mod scrape;
mod snapshot;
#[cfg(test)]
mod tests;

use scrape::ScrapeCollector;
pub use snapshot::{
    DaemonReadings, PeerSnapshot, ProgramStats, Readings, Snapshot, VerifierReadings,
};

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
        r.register(Box::new(ScrapeCollector::new(readings, capture.clone())?))?;
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
