//! Enforce mode, TCP, an SA without a residual: no segment is delivered unverified.
//!
//! A segment that sums to residual 0 installs 0 at once (every intact segment of an SA without
//! NAT does). Any other is dropped and held: TCP retransmits what it never had acknowledged,
//! and a copy of the same segment (`segment_id`) that leaves the same residual confirms that
//! value as the SA's, because random corruption does not repeat itself byte for byte. A copy
//! that leaves another value replaces the candidate and is dropped too.
//!
//! `natt_hold` is a program of its own, reached by a tail call through `JUMP` from either shape
//! of the verifier: the kernel verifier checks it apart, so its states never multiply with
//! those of the summing loop (5.10's verifier refused the two together at 1,000,000
//! instructions). The verifier leaves the segment in this CPU's `Scratch` (`Pending`);
//! `natt_hold`'s return is the segment's verdict.

use aya_ebpf::{macros::cgroup_skb, programs::SkBuffContext};
use monitor_ebpf::{
    HELD_SLOTS, Held, IPPROTO_TCP, Proto, SAMPLE_CONFIRMED, SAMPLE_HELD, TRUST_CONFIRMED,
    TrustCounter,
};

use crate::{
    maps::{HELD, TRUST_SCRATCH},
    report,
    scope::Sa,
    stats::{self, Table, bump_trust, count},
    trust::{Scratch, Seen, install},
};

/// `JUMP`'s slot of `natt_hold`.
pub const HOLD_SLOT: u32 = 0;

/// The held path, tail-called by the verifier for a TCP segment of an enforce-mode SA without
/// a residual: 1 delivers it (its residual was just confirmed as the SA's, so it verified), 0
/// drops it for TCP to retransmit.
#[cgroup_skb(ingress)]
pub fn natt_hold(_ctx: SkBuffContext) -> i32 {
    let Some(s) = TRUST_SCRATCH.get_ptr_mut(0) else {
        // Cannot happen (a one-slot per-CPU array); the verifier's own fallback is to pass.
        return 1;
    };
    // SAFETY: a per-CPU map value, valid for this run; the verifier filled it on this CPU just
    // before the tail call, and nothing runs on this CPU in between.
    let (p, peer) = unsafe { ((*s).pending, (*s).key.peer_id) };
    let tcp = Proto::Tcp as usize;
    if hold(s, &p.sa, &p.seen) {
        stats::verified(peer, Table::L4(tcp), p.len);
        return 1;
    }
    count(peer, |st| st.learning[tcp] += 1);
    // SAFETY: a per-CPU map value, valid for this run.
    let key = unsafe { &(*s).key };
    report::trust(
        key,
        &p.sa,
        p.seen.family,
        SAMPLE_HELD,
        p.seen.residual,
        0,
        IPPROTO_TCP,
    );
    0
}

/// Enforce mode, a TCP segment of an SA without a residual: true if its residual is now the
/// SA's (it summed to 0, or a held copy of the same segment left the same value), so it is
/// verified; false if it is held, to be dropped so that TCP retransmits it.
#[inline(always)]
fn hold(s: *mut Scratch, sa: &Sa, seen: &Seen) -> bool {
    if seen.residual == 0 {
        return confirm(s, sa, seen);
    }
    // SAFETY: per-CPU and map value pointers, valid for this run. Two CPUs holding segments of
    // one SA at the same instant can lose a candidate (one more retransmission), never make one.
    unsafe {
        match HELD.get_ptr_mut(&(*s).entry) {
            Some(h) if (*h).state == sa.state => {
                let mut i = 0;
                while i < HELD_SLOTS {
                    if (*h).segments[i] == seen.segment {
                        if (*h).residuals[i] == seen.residual {
                            let _ = HELD.remove(&(*s).entry);
                            return confirm(s, sa, seen);
                        }
                        (*h).residuals[i] = seen.residual;
                        bump_trust(TrustCounter::HeldDropped);
                        return false;
                    }
                    i += 1;
                }
                let slot = ((*h).next as usize) & (HELD_SLOTS - 1);
                (*h).segments[slot] = seen.segment;
                (*h).residuals[slot] = seen.residual;
                (*h).next = (*h).next.wrapping_add(1);
            }
            _ => {
                (*s).held = Held {
                    state: sa.state,
                    next: 1,
                    ..Held::default()
                };
                (*s).held.segments[0] = seen.segment;
                (*s).held.residuals[0] = seen.residual;
                let _ = HELD.insert(&(*s).entry, &(*s).held, 0);
            }
        }
    }
    bump_trust(TrustCounter::HeldDropped);
    false
}

/// Installs the residual `seen` left as the SA's, confirmed here, and tells the daemon.
#[inline(always)]
fn confirm(s: *mut Scratch, sa: &Sa, seen: &Seen) -> bool {
    if !install(s, sa, seen.residual, TRUST_CONFIRMED) {
        bump_trust(TrustCounter::HeldDropped);
        return false;
    }
    bump_trust(TrustCounter::Confirmed);
    // SAFETY: a per-CPU map value, valid for this run.
    report::trust(
        unsafe { &(*s).key },
        sa,
        seen.family,
        SAMPLE_CONFIRMED,
        seen.residual,
        0,
        IPPROTO_TCP,
    );
    true
}
