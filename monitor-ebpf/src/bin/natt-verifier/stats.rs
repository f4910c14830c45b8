//! The one place the verifier's counters and per-peer statistics change.

use monitor_ebpf::{Counter, IcmpCounters, PeerCounters, SctpCounters, TrustCounter};

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
pub fn count_sctp(id: u32, f: impl FnOnce(&mut SctpCounters)) {
    if let Some(s) = SCTP_STATS.get_ptr_mut(id) {
        // SAFETY: per-CPU slot; the program cannot be re-entered on this CPU.
        f(unsafe { &mut *s });
    }
}
