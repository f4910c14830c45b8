//! The one place the verifier's counters and per-peer statistics change.

use monitor_ebpf::{
    Action, Counter, IcmpCounters, PeerCounters, PeerMode, SctpCounters, TrustCounter,
};

use crate::maps::{COUNTERS, ICMP_STATS, PEER_STATS, SCTP_STATS, TRUST_COUNTERS};

/// Adds one to a global counter (a skip reason or a lost record).
#[inline(always)]
pub fn bump(c: Counter) {
    if let Some(p) = COUNTERS.get_ptr_mut(c as u32) {
        // SAFETY: per-CPU slot; the program cannot be re-entered on this CPU.
        unsafe { *p += 1 };
    }
}

/// Adds one to a residual counter (inherited, withdrawn).
#[inline(always)]
pub fn bump_trust(c: TrustCounter) {
    if let Some(p) = TRUST_COUNTERS.get_ptr_mut(c as u32) {
        // SAFETY: per-CPU slot; the program cannot be re-entered on this CPU.
        unsafe { *p += 1 };
    }
}

/// Applies `f` to peer `id`'s TCP and UDP statistics on this CPU.
#[inline(always)]
pub fn count(id: u32, f: impl FnOnce(&mut PeerCounters)) {
    if let Some(s) = PEER_STATS.get_ptr_mut(id) {
        // SAFETY: per-CPU slot; the program cannot be re-entered on this CPU.
        f(unsafe { &mut *s });
    }
}

/// Applies `f` to peer `id`'s ICMP statistics on this CPU.
#[inline(always)]
pub fn count_icmp(id: u32, f: impl FnOnce(&mut IcmpCounters)) {
    if let Some(s) = ICMP_STATS.get_ptr_mut(id) {
        // SAFETY: per-CPU slot; the program cannot be re-entered on this CPU.
        f(unsafe { &mut *s });
    }
}

/// Applies `f` to peer `id`'s SCTP statistics on this CPU.
#[inline(always)]
fn count_sctp(id: u32, f: impl FnOnce(&mut SctpCounters)) {
    if let Some(s) = SCTP_STATS.get_ptr_mut(id) {
        // SAFETY: per-CPU slot; the program cannot be re-entered on this CPU.
        f(unsafe { &mut *s });
    }
}

/// Which of a peer's statistics a verdict is counted in. Every call site names a constant
/// table (or, for TCP and UDP, an index), so the match below inlines away.
#[derive(Clone, Copy)]
pub enum Table {
    /// TCP or UDP, by `Proto` index.
    L4(usize),
    /// ICMP (IPv4 peer) or `ICMPv6` (IPv6 peer).
    Icmp,
    /// SCTP.
    Sctp,
}

/// Counts one verified packet of `len` bytes (L4 header and payload) for peer `id`.
#[inline(always)]
pub fn verified(id: u32, table: Table, len: u32) {
    let bytes = u64::from(len);
    match table {
        Table::L4(p) => count(id, |s| {
            s.verified_packets[p] += 1;
            s.verified_bytes[p] += bytes;
        }),
        Table::Icmp => count_icmp(id, |s| {
            s.verified_packets += 1;
            s.verified_bytes += bytes;
        }),
        Table::Sctp => count_sctp(id, |s| {
            s.verified_packets += 1;
            s.verified_bytes += bytes;
        }),
    }
}

/// Counts one mismatch for peer `id`, and a drop if its `mode` enforces: the action taken.
#[inline(always)]
pub fn mismatched(id: u32, table: Table, mode: u8) -> Action {
    let dropped = mode == PeerMode::Enforce as u8;
    let drops = u64::from(dropped);
    match table {
        Table::L4(p) => count(id, |s| {
            s.mismatches[p] += 1;
            s.drops[p] += drops;
        }),
        Table::Icmp => count_icmp(id, |s| {
            s.mismatches += 1;
            s.drops += drops;
        }),
        Table::Sctp => count_sctp(id, |s| {
            s.mismatches += 1;
            s.drops += drops;
        }),
    }
    if dropped {
        Action::Dropped
    } else {
        Action::Passed
    }
}
