//! SCTP through the SA (issue 22): after the ICMP phase, A streams to B over an SCTP
//! association through the same NAT-T transport SAs (SCTP policies added on both ends), while
//! R's corruption rule still rewrites A's large ESP packets. `sctp_rcv` skips the CRC32c of a
//! packet `esp_input_done2` marked, so every corrupted packet must be counted under
//! `proto="sctp"` and, in enforce mode, dropped (SCTP retransmits it: the stream arrives
//! byte-exact); the kernel's own `SctpChecksumErrors` must not move, which shows it skipped the
//! check. The `bounded_loop` variant (5.10) cannot load `natt_sctp`: every packet is
//! `other_protocol`, and the corrupted bytes reach the application.

use std::path::Path;

use natt_monitor::peers::Mode;

use crate::{
    icmp::{Counted, counted, proc_value, protect},
    scenarios::Scenario,
    topology::Topology,
    traffic::stream_with,
};

/// The SCTP stream's size and its port on B.
const SCTP_BYTES: u64 = 1 << 20;
const SCTP_PORT: u16 = 3868;

/// What the SCTP phase measured.
#[derive(Debug, Default)]
pub(crate) struct SctpRun {
    pub(crate) received: u64,
    pub(crate) differing: u64,
    pub(crate) c: Counted,
}

impl SctpRun {
    /// Exact: every corrupted packet counted, dropped in enforce mode (the stream byte-exact),
    /// delivered in observe mode (the stream differs); the kernel counted nothing.
    pub(crate) fn exact(&self, mode: Mode) -> bool {
        let c = &self.c;
        let common = c.injected > 0 && self.received == SCTP_BYTES && c.kernel_csum_errors == 0;
        if c.bounded_loop {
            return common
                && self.differing > 0
                && c.other_protocol > SCTP_BYTES / 1500
                && c.detected + c.dropped + c.verified == 0;
        }
        let enforce = mode == Mode::Enforce;
        common
            && c.detected == c.injected
            && c.dropped == if enforce { c.injected } else { 0 }
            && (self.differing == 0) == enforce
            && c.verified > SCTP_BYTES / 1500
    }

    /// The result line's field.
    pub(crate) fn summary(&self) -> String {
        format!(
            "variant={}/received={}/differing={}/{}",
            self.c.variant(),
            self.received,
            self.differing,
            self.c.counts()
        )
    }
}

/// `SctpChecksumErrors` of B's network namespace.
fn sctp_csum_errors(t: &Topology) -> u64 {
    proc_value(t, "/proc/net/sctp/snmp", "SctpChecksumErrors")
}

/// The phase: SCTP policies on A and B, then `SCTP_BYTES` over one association from A to B
/// (its receiving socket in `cg`). `peer` is the peer label of A's SA on B.
pub(crate) fn stream_through_sa(t: &Topology, s: &Scenario, cg: &Path, peer: &str) -> SctpRun {
    protect(t, s, "sctp");
    // SCTP's CRC32c sees every corruption, the sum-preserving ones too: all bytes count.
    let (r, c) = counted(t, peer, "sctp", sctp_csum_errors, || {
        stream_with(t, &t.a, cg, SCTP_BYTES, SCTP_PORT, &["--sctp"])
    });
    SctpRun {
        received: r.received,
        differing: r.differing,
        c,
    }
}
