//! Which residual an SA's segments are verified against, and the verifier's own evidence
//! against it.
//!
//! A residual belongs to one SA (`SaKey`: NAT mapping and SPI) and is constant for that SA's
//! life. It comes from the daemon, which learned it from the SA's own segments, or from the SA
//! that held it on the same NAT mapping, taken over here at the SA's first segment while that
//! SA is still alive (a rekey overlaps its predecessor). A new SA on a mapping whose SAs are
//! gone learns afresh.
//!
//! In enforce mode an SA without a residual delivers no TCP segment unverified: `hold` decides
//! those, in a program of its own. UDP, which nobody retransmits, and observe mode learn in the
//! daemon, passing segments meanwhile.
//!
//! Once installed, a mismatch is corruption. The one exception is decided here, in order with
//! the verdicts: `WITHDRAW_AFTER` consecutive distinct segments of the SA that all leave one
//! identical residual, with not one segment of the SA verifying in between, withdraw it (the
//! SA's intact traffic is what is being refused). A corruption that spares even one segment in
//! `WITHDRAW_AFTER` never withdraws anything.

use monitor_ebpf::{
    Counter, Held, IPPROTO_TCP, MappingOwner, SAMPLE_INHERITED, SAMPLE_WITHDRAWN, SaKey, SaTrust,
    TRUST_INHERITED, TrustCounter, WITHDRAW_AFTER, XFRM_STATE_VALID, segment_id,
};

use crate::{
    maps::{MAPPINGS, SA_TRUST, TRUST_SCRATCH, secpath},
    parse::{L3, L4},
    report,
    scope::{Sa, kread, sa_spi},
    stats::bump_trust,
};

/// Per-CPU room for the keys and values this module hands to map helpers: the BPF stack
/// (512 bytes for the program and its subprograms together) has none to spare.
#[repr(C)]
pub struct Scratch {
    /// The segment's SA, with its encapsulation ports (what reports carry).
    pub key: SaKey,
    /// Its key in `SA_TRUST` and `HELD` (`SaKey::trust_key`).
    pub entry: SaKey,
    /// Its NAT mapping.
    pub mapping: SaKey,
    /// A value being written to `SA_TRUST`.
    pub trust: SaTrust,
    /// A value being written to `MAPPINGS`.
    pub owner: MappingOwner,
    /// A value being written to `HELD`.
    pub held: Held,
    /// The segment the verifier hands to `hold` through a tail call.
    pub pending: Pending,
}

/// What `hold` needs of a segment that the verifier could not verify (its SA has no residual),
/// carried across the tail call in this CPU's `Scratch` (the key is there already).
#[derive(Clone, Copy)]
pub struct Pending {
    /// The SA.
    pub sa: Sa,
    /// The segment.
    pub seen: Seen,
    /// Its L4 length, for the verified byte count.
    pub len: u32,
}

/// The SA of a learning peer's segment, in this CPU's `Scratch`, and its trust entry (`None`:
/// the SA learns).
#[inline(always)]
pub fn of_segment(l3: &L3, sa: &Sa) -> Result<(*mut Scratch, Option<*mut SaTrust>), Counter> {
    let s = TRUST_SCRATCH
        .get_ptr_mut(0)
        .ok_or(Counter::SkipIpsecUnreadable)?;
    // SAFETY: a per-CPU map value, valid for this run.
    unsafe {
        (*s).key = SaKey {
            src: l3.src,
            dst: l3.dst,
            encap_sport: sa.sport,
            encap_dport: sa.dport,
            peer_id: l3.peer.id,
            spi: sa_spi(sa),
        };
        (*s).entry = (*s).key.trust_key();
    }
    Ok((s, lookup(s, sa, l3.family as u8)))
}

/// The trust entry of the SA in `(*s).key`: its own, or one taken over from a live SA of its
/// NAT mapping. `None`: the SA learns.
#[inline(always)]
pub fn lookup(s: *mut Scratch, sa: &Sa, family: u8) -> Option<*mut SaTrust> {
    // SAFETY: a per-CPU map value, valid for this run; the fields are plain integers.
    unsafe {
        if let Some(t) = SA_TRUST.get_ptr_mut(&(*s).entry)
            && (*t).state == sa.state
        {
            return Some(t);
        }
    }
    if sa.state == 0 {
        return None;
    }
    inherit(s, sa, family)
}

/// True while the `xfrm_state` at `state` is alive, still the SA with `spi`, and still on the
/// NAT mapping `mapping` names. A state torn down and freed fails one of the first two: its
/// memory is either no longer `XFRM_STATE_VALID` or now holds another SA, whose SPI differs. An
/// SA that a NAT rebinding moved to another port (its encapsulation updated in place) fails the
/// third: the mapping it left may be handed to another host.
#[inline(always)]
fn alive(state: u64, spi: u32, mapping: &SaKey) -> bool {
    kread::<u32>(state + u64::from(secpath!(x_spi))).is_ok_and(|s| s == spi)
        && kread::<u8>(state + u64::from(secpath!(x_km_state))).is_ok_and(|s| s == XFRM_STATE_VALID)
        && kread::<u64>(state + u64::from(secpath!(x_encap)))
            .and_then(|encap| kread::<[u16; 2]>(encap + u64::from(secpath!(encap_sport))))
            .is_ok_and(|p| p == [mapping.encap_sport, mapping.encap_dport])
}

/// Installs `residual` as the SA's own (in `(*s).key`; `origin` says how it was found) and
/// makes the SA its NAT mapping's owner. False if the map refused it.
#[inline(always)]
pub fn install(s: *mut Scratch, sa: &Sa, residual: u16, origin: u8) -> bool {
    // SAFETY: a per-CPU map value, valid for this run.
    unsafe {
        (*s).trust = SaTrust {
            state: sa.state,
            expected_residual: residual,
            origin,
            ..SaTrust::default()
        };
        if SA_TRUST.insert(&(*s).entry, &(*s).trust, 0).is_err() {
            return false;
        }
        if sa.state != 0 {
            (*s).mapping = (*s).key.mapping();
            (*s).owner = MappingOwner {
                state: sa.state,
                spi: (*s).key.spi,
                expected_residual: residual,
                pad: 0,
            };
            let _ = MAPPINGS.insert(&(*s).mapping, &(*s).owner, 0);
        }
    }
    true
}

/// Takes over the residual of the SA that last held one on this SA's NAT mapping, if that SA
/// is still alive; or restores this very SA's own, whose entry the LRU forgot.
#[inline(never)]
fn inherit(s: *mut Scratch, sa: &Sa, family: u8) -> Option<*mut SaTrust> {
    // SAFETY: a per-CPU map value, valid for this run; map values are copied out at once, and
    // either version of a concurrently replaced one is valid.
    unsafe {
        (*s).mapping = (*s).key.mapping();
        let owner = MAPPINGS.get(&(*s).mapping).copied()?;
        if !alive(owner.state, owner.spi, &(*s).mapping)
            || !install(s, sa, owner.expected_residual, TRUST_INHERITED)
        {
            return None;
        }
        if owner.state == sa.state {
            // This SA's own residual, which the LRU forgot while its mapping's record stayed:
            // back at once, counted, and nothing for the daemon, which still holds it.
            bump_trust(TrustCounter::Restored);
            return SA_TRUST.get_ptr_mut(&(*s).entry);
        }
        bump_trust(TrustCounter::Inherited);
        report::trust(
            &(*s).key,
            sa,
            family,
            SAMPLE_INHERITED,
            owner.expected_residual,
            0,
            0,
        );
        SA_TRUST.get_ptr_mut(&(*s).entry)
    }
}

/// Judges a segment of the SA against the SA's residual, which it returns: one that verifies
/// ends the streak, one that does not extends it (`mismatch`). A subprogram of its own, so that
/// what the caller carries on with is a scalar.
#[inline(never)]
pub fn judge(t: *mut SaTrust, s: *mut Scratch, sa: &Sa, seen: &Seen) -> u16 {
    // SAFETY: a map value pointer, valid for this run (a withdrawal removes the entry, but the
    // value stays readable until the program returns).
    let expected = unsafe { (*t).expected_residual };
    if expected == seen.residual {
        // SAFETY: as above.
        unsafe {
            if (*t).streak != 0 {
                (*t).streak = 0;
            }
        }
    } else {
        mismatch(t, s, sa, seen);
    }
    expected
}

/// A segment of an SA, as the judgement, the streak and `hold` see it.
#[derive(Clone, Copy)]
pub struct Seen {
    /// The residual it left.
    pub residual: u16,
    /// Its `segment_id`.
    pub segment: u32,
    /// Its `Family`.
    pub family: u8,
}

impl Seen {
    /// The segment with headers `l3`, `l4` that left `residual`.
    #[inline(always)]
    pub fn new(l3: &L3, l4: &L4, residual: u16) -> Self {
        Self {
            residual,
            segment: segment_id(
                l3.proto == IPPROTO_TCP,
                l4.sport,
                l4.dport,
                l4.seq,
                l4.field,
                l4.len,
            ),
            family: l3.family as u8,
        }
    }
}

/// A segment of the SA left another residual than the SA's: extends or restarts the streak,
/// and withdraws the residual when the streak is complete.
#[inline(always)]
fn mismatch(t: *mut SaTrust, s: *mut Scratch, sa: &Sa, seen: &Seen) {
    let (residual, segment) = (seen.residual, seen.segment);
    // SAFETY: a map value pointer, valid for this run. Concurrent updates of one SA from two
    // CPUs can lose a step of the streak, never invent one.
    unsafe {
        let n = usize::from((*t).streak);
        if n == 0 || (*t).streak_residual != residual {
            (*t).streak_residual = residual;
            (*t).recent[0] = segment;
            (*t).streak = 1;
            return;
        }
        let mut i = 0;
        while i < WITHDRAW_AFTER {
            if i < n && (*t).recent[i] == segment {
                return;
            }
            i += 1;
        }
        if n + 1 < WITHDRAW_AFTER {
            (*t).recent[n & (WITHDRAW_AFTER - 1)] = segment;
            (*t).streak = (n + 1) as u8;
            return;
        }
        let withdrawn = (*t).expected_residual;
        let _ = SA_TRUST.remove(&(*s).entry);
        (*s).mapping = (*s).key.mapping();
        if let Some(o) = MAPPINGS.get(&(*s).mapping)
            && o.state == sa.state
            && o.spi == (*s).key.spi
        {
            let _ = MAPPINGS.remove(&(*s).mapping);
        }
        bump_trust(TrustCounter::Withdrawn);
        report::trust(
            &(*s).key,
            sa,
            seen.family,
            SAMPLE_WITHDRAWN,
            withdrawn,
            residual,
            0,
        );
    }
}
