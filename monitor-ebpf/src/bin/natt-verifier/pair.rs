//! Pairing, for the daemon's forensics: a dropped TCP segment's flow and sequence number are
//! remembered (`PAIRS`), and the segment of that flow and sequence number that verifies next,
//! TCP's retransmission of the same bytes, is copied into the capture ring beside the corrupted
//! copy (`Action::Intact`), so the daemon can tell exactly which bytes changed.
//!
//! Nothing is remembered while nothing is dropped, and a verified segment then costs one
//! inlined array read more (`PAIR_DEADLINE` is 0). Only for `PAIR_WINDOW_NS` after a drop does
//! a verified TCP segment read the clock and go on to `natt_pair`, a program of its own reached
//! by a tail call through `PAIR_JUMP` (as `natt_hold` is), so that the lookup and the copy are
//! verified apart from the summing loop and add nothing to its verification cost.

use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::cgroup_skb, programs::SkBuffContext};
use monitor_ebpf::{Action, PAIR_WINDOW_NS, PairKey, PairSlot};

use crate::{
    maps::{PAIR_DEADLINE, PAIR_JUMP, PAIR_SCRATCH, PAIR_STATS, PAIRS},
    parse::{L3, L4},
    report::{self, Record},
    scope::Sa,
};

/// `PAIR_JUMP`'s slot of `natt_pair`.
pub const PAIR_SLOT: u32 = 0;

/// A verified TCP segment that may be a retransmission, handed to `natt_pair` in this CPU's
/// `PAIR_SCRATCH`.
#[derive(Clone, Copy)]
pub struct Candidate {
    pub key: PairKey,
    pub peer_id: u32,
    pub sa: Sa,
    /// A dropped segment's checksum field and the one its bytes call for.
    pub found: u16,
    pub expected: u16,
    /// Non-zero: a dropped segment, to remember; zero: a verified one, maybe its pair.
    pub dropped: u32,
}

#[inline(always)]
fn key(l3: &L3, l4: &L4) -> PairKey {
    PairKey {
        src: l3.src,
        dst: l3.dst,
        sport: l4.sport,
        dport: l4.dport,
        seq: l4.seq,
    }
}

#[inline(always)]
fn bump(slot: PairSlot) {
    if let Some(p) = PAIR_STATS.get_ptr_mut(slot as u32) {
        // SAFETY: per-CPU slot; the program cannot be re-entered on this CPU.
        unsafe { *p += 1 };
    }
}

/// A dropped TCP segment: hands it to `natt_pair`, which remembers it until its retransmission
/// verifies and copies it into the capture ring; its verdict (drop) is the segment's. Returns
/// only when the tail call failed (no daemon fills `PAIR_JUMP`); the caller then copies the
/// segment itself.
#[inline(always)]
pub fn dropped(ctx: &SkBuffContext, l3: &L3, l4: &L4, sa: &Sa, (found, expected): (u16, u16)) {
    hand_over(ctx, l3, l4, sa, (found, expected, 1));
}

/// A TCP segment that verified: within the window after a drop, hands it to `natt_pair`, whose
/// verdict (always to pass it) is the segment's. Returns when nothing was dropped lately, or
/// when the tail call failed (no daemon fills `PAIR_JUMP`).
#[inline(always)]
pub fn verified(ctx: &SkBuffContext, l3: &L3, l4: &L4, sa: &Sa) {
    let deadline = PAIR_DEADLINE.get(0).copied().unwrap_or(0);
    if deadline == 0 {
        return;
    }
    // SAFETY: a helper without arguments.
    if unsafe { bpf_ktime_get_ns() } > deadline {
        return;
    }
    hand_over(ctx, l3, l4, sa, (0, 0, 0));
}

/// Fills this CPU's `PAIR_SCRATCH` and tail-calls `natt_pair`; returns if the call failed.
#[inline(always)]
fn hand_over(
    ctx: &SkBuffContext,
    l3: &L3,
    l4: &L4,
    sa: &Sa,
    (found, expected, dropped): (u16, u16, u32),
) {
    let Some(c) = PAIR_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: a per-CPU map value, valid for this run; `natt_pair` reads it on this CPU.
    unsafe {
        *c = Candidate {
            key: key(l3, l4),
            peer_id: l3.peer.id,
            sa: *sa,
            found,
            expected,
            dropped,
        };
        PAIR_JUMP.tail_call(ctx, PAIR_SLOT);
    }
}

/// Tail-called for a dropped TCP segment (remembers it, copies it into the capture ring, and
/// returns 0: drop), and for a verified one while drops are recent (if it is the
/// retransmission of a remembered one, copies it as `Action::Intact` and forgets the pair; 1).
#[cgroup_skb(ingress)]
#[expect(
    clippy::needless_pass_by_value,
    reason = "signature fixed by aya's #[cgroup_skb]"
)]
pub fn natt_pair(ctx: SkBuffContext) -> i32 {
    let Some(c) = PAIR_SCRATCH.get_ptr(0) else {
        // Cannot happen (a one-slot per-CPU array).
        return 1;
    };
    // SAFETY: a per-CPU map value the verifier filled on this CPU just before the tail call.
    let c = unsafe { *c };
    if c.dropped != 0 {
        // SAFETY: a helper without arguments.
        let now = unsafe { bpf_ktime_get_ns() };
        if PAIRS.insert(&c.key, &now, 0).is_ok() {
            bump(PairSlot::Remembered);
        } else {
            bump(PairSlot::NotRemembered);
        }
        if let Some(d) = PAIR_DEADLINE.get_ptr_mut(0) {
            // SAFETY: the map's one value; CPUs racing here each write a deadline at least as
            // late as the segment each remembered, give or take a moment.
            unsafe { *d = now + PAIR_WINDOW_NS };
        }
        report::capture(
            &ctx,
            &Record {
                peer_id: c.peer_id,
                sa: c.sa,
                action: Action::Dropped,
                found: c.found,
                expected: c.expected,
            },
        );
        return 0;
    }
    // SAFETY: a map lookup with a key on the stack; only presence is read.
    if unsafe { PAIRS.get(&c.key) }.is_none() {
        return 1;
    }
    let _ = PAIRS.remove(&c.key);
    bump(PairSlot::Paired);
    // An intact copy's checksum field is right: found and expected are both 0 in its record.
    report::capture(
        &ctx,
        &Record {
            peer_id: c.peer_id,
            sa: c.sa,
            action: Action::Intact,
            found: 0,
            expected: 0,
        },
    );
    1
}
