//! ICMP through the SA (issue 22): after a scenario's TCP measurements, B pings A across R's
//! NAT through the same NAT-T transport SAs (ICMP, or over IPv6 `ICMPv6`, policies added on
//! both ends), while R's corruption rule still rewrites A's large ESP packets. Every corrupted
//! echo reply must be counted under `proto="icmp"`, and in enforce mode dropped (a lost ping);
//! the kernel's own `Icmp InCsumErrors` (`Icmp6InCsumErrors`) must not move, which shows it
//! skipped the check. The `bounded_loop` variant (5.10) leaves ICMP alone: every reply is
//! `other_protocol`, the corrupted ones reach the socket.

use std::{path::Path, time::Duration};

use natt_monitor::peers::Mode;
use natt_monitor_tests::net::{PingResult, ping};

use crate::{
    processes::{bin, metric, scrape},
    scenarios::Scenario,
    topology::{Topology, ns_out, policy},
};

/// Echo requests per phase, and their payload: large enough for R's corruption rule.
const PINGS: u16 = 200;
const PING_BYTES: usize = 1200;

/// What was counted over a phase through the SA (ICMP here, SCTP in `sctp.rs`) for one
/// protocol: R's corruptions, natt-monitor's series for the peer, the kernel's own errors.
#[derive(Debug, Default)]
pub(crate) struct Counted {
    /// The `bounded_loop` variant ran (kernels before 5.17): it leaves ICMP and SCTP alone, as
    /// `other_protocol`.
    pub(crate) bounded_loop: bool,
    /// `natt_monitor_skipped_packets_total{reason="other_protocol"}` over the phase.
    pub(crate) other_protocol: u64,
    pub(crate) injected: u64,
    pub(crate) detected: u64,
    pub(crate) dropped: u64,
    pub(crate) verified: u64,
    pub(crate) kernel_csum_errors: u64,
}

impl Counted {
    /// The program variant, as the result line names it.
    pub(crate) const fn variant(&self) -> &'static str {
        if self.bounded_loop {
            "bounded_loop"
        } else {
            "bpf_loop"
        }
    }

    /// The counts, as the result line's field ends.
    pub(crate) fn counts(&self) -> String {
        format!(
            "injected={}/detected={}/dropped={}/verified={}/other_protocol={}/kernel_csum_errors={}",
            self.injected,
            self.detected,
            self.dropped,
            self.verified,
            self.other_protocol,
            self.kernel_csum_errors
        )
    }
}

/// The value of `name` in B's `file`, a `/proc` table of one `name value` pair per line
/// (`/proc/net/snmp6`, `/proc/net/sctp/snmp`).
pub(crate) fn proc_value(t: &Topology, file: &str, name: &str) -> u64 {
    let text = ns_out(&t.b, &["cat", file]);
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in B's {file}:\n{text}"))
}

/// Policies for `proto` on A and B, for the same transport SAs as the scenario's TCP.
pub(crate) fn protect(t: &Topology, s: &Scenario, proto: &str) {
    let x = t.addrs;
    let a_seen = t.a_seen_by_b(s.nat);
    policy(&t.a, proto, x.a, x.b, "out", None, "0");
    policy(&t.a, proto, x.b, x.a, "in", None, "0");
    policy(&t.b, proto, x.b, a_seen, "out", None, "0");
    policy(&t.b, proto, a_seen, x.b, "in", None, "0");
}

/// Runs `phase`; returns what it returned and what was counted meanwhile under
/// `proto="{label}"` for `peer`, with the kernel's own error counter read by `kernel`.
pub(crate) fn counted<T>(
    t: &Topology,
    peer: &str,
    label: &str,
    kernel: impl Fn(&Topology) -> u64,
    phase: impl FnOnce() -> T,
) -> (T, Counted) {
    let series = |name: &str| format!("natt_monitor_{name}{{peer=\"{peer}\",proto=\"{label}\"}}");
    let (i0, k0, before) = (t.injected(), kernel(t), scrape(t.mon()));
    let out = phase();
    std::thread::sleep(Duration::from_millis(500));
    let after = scrape(t.mon());
    let delta = |name: &str| metric(&after, &series(name)) - metric(&before, &series(name));
    let other = "natt_monitor_skipped_packets_total{reason=\"other_protocol\"}";
    let c = Counted {
        bounded_loop: metric(
            &after,
            "natt_monitor_program_variant{variant=\"bounded_loop\"}",
        ) == 1,
        other_protocol: metric(&after, other) - metric(&before, other),
        injected: t.injected() - i0,
        detected: delta("checksum_mismatches_total"),
        dropped: delta("dropped_packets_total"),
        verified: delta("verified_packets_total"),
        kernel_csum_errors: kernel(t) - k0,
    };
    (out, c)
}

/// What the ICMP phase measured.
#[derive(Debug, Default)]
pub(crate) struct IcmpRun {
    pub(crate) ping: Option<PingResult>,
    pub(crate) c: Counted,
}

impl IcmpRun {
    /// Exact: every corrupted reply counted, dropped in enforce mode (and then lost to the
    /// pinging socket), delivered corrupted in observe mode; the intact ones verified; the
    /// kernel counted nothing.
    pub(crate) fn exact(&self, mode: Mode) -> bool {
        let Some(p) = self.ping else { return false };
        let c = &self.c;
        if c.bounded_loop {
            // Not verified: every reply skipped, the corrupted ones delivered.
            return c.injected > 0
                && p.sent == u64::from(PINGS)
                && p.corrupted == c.injected
                && p.intact == p.sent - c.injected
                && p.lost == 0
                && c.other_protocol >= p.sent
                && c.detected + c.dropped + c.verified == 0
                && c.kernel_csum_errors == 0;
        }
        let enforce = mode == Mode::Enforce;
        c.injected > 0
            && p.sent == u64::from(PINGS)
            && c.detected == c.injected
            && c.dropped == if enforce { c.injected } else { 0 }
            && p.corrupted == if enforce { 0 } else { c.injected }
            && p.lost == if enforce { c.injected } else { 0 }
            && p.intact == p.sent - c.injected
            && c.verified == p.intact
            && c.kernel_csum_errors == 0
    }

    /// The result line's field.
    pub(crate) fn summary(&self) -> String {
        let p = self.ping.unwrap_or(PingResult {
            sent: 0,
            intact: 0,
            corrupted: 0,
            lost: 0,
        });
        format!(
            "variant={}/sent={}/intact={}/corrupted={}/lost={}/{}",
            self.c.variant(),
            p.sent,
            p.intact,
            p.corrupted,
            p.lost,
            self.c.counts()
        )
    }
}

/// `Icmp: ... InCsumErrors` of B's network namespace, or with `v6` `Icmp6InCsumErrors`.
fn icmp_csum_errors(t: &Topology, v6: bool) -> u64 {
    if v6 {
        return proc_value(t, "/proc/net/snmp6", "Icmp6InCsumErrors");
    }
    snmp_value(t, "Icmp:", "InCsumErrors")
}

/// The value of `name` in the `row` (`Icmp:`, `Tcp:`) of B's `/proc/net/snmp`, whose rows come
/// in pairs: the names, then the values.
pub(crate) fn snmp_value(t: &Topology, row: &str, name: &str) -> u64 {
    let snmp = ns_out(&t.b, &["cat", "/proc/net/snmp"]);
    let mut rows = snmp.lines().filter(|l| l.starts_with(row));
    let (names, values) = (rows.next().unwrap_or(""), rows.next().unwrap_or(""));
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == name)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or_else(|| panic!("no {row} {name} in B's /proc/net/snmp:\n{snmp}"))
}

/// The phase: ICMP policies on A and B, then `PINGS` echo requests from B (in `cg`) to A as B
/// addresses it. `peer` is the peer label of A's SA on B.
pub(crate) fn ping_through_sa(t: &Topology, s: &Scenario, cg: &Path, peer: &str) -> IcmpRun {
    protect(t, s, if s.v6 { "ipv6-icmp" } else { "icmp" });
    let a_seen = t.a_seen_by_b(s.nat);
    let (p, c) = counted(
        t,
        peer,
        "icmp",
        |t| icmp_csum_errors(t, s.v6),
        || {
            ping(
                bin("natt-peer").to_str().expect("utf-8 path"),
                &t.b,
                cg,
                a_seen,
                PINGS,
                PING_BYTES,
            )
        },
    );
    IcmpRun { ping: Some(p), c }
}
