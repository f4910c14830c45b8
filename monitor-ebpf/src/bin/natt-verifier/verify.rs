//! The verifier program, in two loop shapes with identical results: `natt_verify` (one
//! `bpf_loop` callback per chunk, 5.17+) and `natt_verify_compat` (a bounded loop, 5.8 to
//! 5.16). The loader probes the kernel and loads one of them.

use aya_ebpf::{macros::cgroup_skb, programs::SkBuffContext};
use aya_log_ebpf::warn;
use monitor_ebpf::{
    Action, Counter, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, PEER_FLAG_LEARN, PeerMode, Proto,
    SAMPLE_LEARNING, TrustCounter, csum,
};

use crate::{
    hold::HOLD_SLOT,
    maps::{CAPTURE_ON, JUMP, SCTP_JUMP, secpath},
    pair,
    parse::{L3, L4, parse_l3, parse_l4},
    report::{self, Mismatch, Record},
    scope::{Sa, address_scope_exemptions, in_scope},
    sctp::SCTP_SLOT,
    stats::{self, Table, bump, bump_trust, count, count_icmp},
    sum::sum_segment,
    trust::{self, Pending, Seen},
};

#[derive(Clone, Copy)]
#[repr(u8)]
enum Verdict {
    Pass,
    Drop,
}
const _: () = assert!(size_of::<Verdict>() <= 8 && size_of::<Counter>() <= 8);

/// The verifier for kernels with `bpf_loop` (5.17+): the segment is summed one chunk per
/// callback, which the kernel verifier checks apart from the rest of the program.
#[cgroup_skb(ingress)]
#[expect(
    clippy::needless_pass_by_value,
    reason = "signature fixed by aya's #[cgroup_skb]"
)]
pub fn natt_verify(ctx: SkBuffContext) -> i32 {
    verdict(try_verify::<true>(&ctx))
}

/// The same verifier for kernels without `bpf_loop` (5.8 to 5.16): a bounded loop sums the
/// chunks, with identical results.
#[cgroup_skb(ingress)]
#[expect(
    clippy::needless_pass_by_value,
    reason = "signature fixed by aya's #[cgroup_skb]"
)]
pub fn natt_verify_compat(ctx: SkBuffContext) -> i32 {
    verdict(try_verify::<false>(&ctx))
}

#[inline(always)]
fn verdict(r: Result<Verdict, Counter>) -> i32 {
    match r {
        Ok(Verdict::Pass) => 1,
        Ok(Verdict::Drop) => 0,
        Err(reason) => {
            bump(reason);
            1
        }
    }
}

#[inline(always)]
fn try_verify<const BPF_LOOP: bool>(ctx: &SkBuffContext) -> Result<Verdict, Counter> {
    let sa_scope = secpath!(enabled) != 0;
    // SA scope dismisses everything that did not come through a NAT-T transport SA (or out of
    // a tunnel that one carries) before touching a header: one read of `active_extensions`
    // for ordinary traffic, and one inlined array lookup while tunnels are listed.
    let (sa, tunnel) = in_scope::<BPF_LOOP>(ctx)?;
    let mut l3 = parse_or_hand_over::<BPF_LOOP>(ctx)?;
    if let Some(peer) = tunnel {
        // The inner addresses are the tunnel's own: the tunnel's peer, residual 0.
        l3.peer = peer;
    }
    if !BPF_LOOP && l3.proto == IPPROTO_ICMP {
        // The bounded-loop variant (kernels before 5.17) leaves ICMP alone: a third protocol
        // through its summing loop took 5.10's verifier past its 1M-instruction budget
        // (processed 1000001 insns, in the VM suite). `parse_l3` turned `ICMPv6` away already.
        return Err(Counter::SkipOtherProtocol);
    }
    let l4 = parse_l4::<BPF_LOOP>(ctx, &l3)?;
    // ICMP's checksum (IPv4) covers the message alone, with no pseudo-header, so a NAT in front
    // of the SA leaves it intact: every intact message leaves residual 0, nothing is learned,
    // and a peer's configured residual does not apply. `ICMPv6` sums a pseudo-header like TCP
    // and UDP, so it leaves its SA's residual. Neither has ports to exempt, or
    // CHECKSUM_PARTIAL.
    let icmp = BPF_LOOP && (l3.proto == IPPROTO_ICMP || l3.proto == IPPROTO_ICMPV6);
    let pseudo = if BPF_LOOP && l3.proto == IPPROTO_ICMP {
        0
    } else {
        l3.addr_sum + csum::proto_len_sum(l3.proto, l4.len)
    };
    if !sa_scope && !icmp {
        address_scope_exemptions(&l4, pseudo)?;
    }
    let Some(data) = sum_segment::<BPF_LOOP>(ctx, l3.l4_off, l4.len) else {
        // The headers said the segment was whole, yet a chunk could not be read: worth a line
        // in the daemon's log (bridged from aya-log), not only a counter.
        warn!(
            ctx,
            "segment of {} bytes at offset {} could not be read whole", l4.len, l3.l4_off
        );
        return Err(Counter::SkipTruncated);
    };
    let residual = csum::residual(pseudo + data);
    if icmp {
        return judge_icmp(ctx, &l3, &l4, sa, residual);
    }
    let peer = l3.peer;
    let p = if l3.proto == IPPROTO_TCP {
        Proto::Tcp
    } else {
        Proto::Udp
    } as usize;
    // A peer with a configured residual has it in the peer map; one that learns has one per SA,
    // judged (streak and all) before anything else is decided, so that only a scalar leaves
    // this block and the kernel verifier's states stay mergeable.
    let expected = if peer.flags & PEER_FLAG_LEARN == 0 {
        peer.expected_residual
    } else {
        let (s, trusted) = trust::of_segment(&l3, &sa)?;
        let seen = Seen::new(&l3, &l4, residual);
        let Some(t) = trusted else {
            if peer.mode == PeerMode::Enforce as u8 && l3.proto == IPPROTO_TCP {
                // Enforce mode delivers no TCP segment unverified: `natt_hold` decides it, and
                // its verdict is this segment's.
                // SAFETY: a per-CPU map value, valid for this run; `natt_hold` reads it on this
                // CPU. A tail call that returns failed (an empty slot), and is counted.
                unsafe {
                    (*s).pending = Pending {
                        sa,
                        seen,
                        len: l4.len,
                    };
                    JUMP.tail_call(ctx, HOLD_SLOT);
                }
                bump_trust(TrustCounter::Unheld);
            }
            // This SA's residual is not known yet: report what this segment left and pass it,
            // neither verified nor a mismatch.
            count(peer.id, |st| st.learning[p] += 1);
            // SAFETY: a per-CPU map value, valid for this run.
            let key = unsafe { &(*s).key };
            report::trust(
                key,
                &sa,
                l3.family as u8,
                SAMPLE_LEARNING,
                residual,
                0,
                l3.proto,
            );
            return Ok(Verdict::Pass);
        };
        trust::judge(t, s, &sa, &seen)
    };
    if expected == residual {
        stats::verified(peer.id, Table::L4(p), l4.len);
        if CAPTURE_ON.load() != 0 && l3.proto == IPPROTO_TCP {
            pair::verified(ctx, &l3, &l4, &sa);
        }
        return Ok(Verdict::Pass);
    }
    Ok(mismatch(
        ctx,
        &l3,
        &l4,
        Table::L4(p),
        sa,
        (residual, expected),
    ))
}

/// The IP header, as `parse_l3` reads it; in the `bpf_loop` variant, a packet it turns away as
/// `other_protocol` goes on to `natt_sctp` by a tail call, which verifies SCTP (its verdict is
/// this packet's) and counts the rest. A tail call returns only when it failed (an empty slot,
/// which the loader never leaves).
#[inline(always)]
fn parse_or_hand_over<const BPF_LOOP: bool>(ctx: &SkBuffContext) -> Result<L3, Counter> {
    match parse_l3::<BPF_LOOP, false>(ctx) {
        Err(Counter::SkipOtherProtocol) if BPF_LOOP => {
            // SAFETY: `ctx` is this program's context.
            unsafe { SCTP_JUMP.tail_call(ctx, SCTP_SLOT) };
            Err(Counter::SkipOtherProtocol)
        }
        r => r,
    }
}

/// The residual an intact `ICMPv6` message of this SA leaves: the peer's configured one, or
/// the SA's own (read, not judged: ICMP takes no part in a residual's streak, so no ICMP can
/// withdraw one); `None` while the SA has none.
#[inline(always)]
fn icmpv6_residual(l3: &L3, sa: &Sa) -> Result<Option<u16>, Counter> {
    if l3.peer.flags & PEER_FLAG_LEARN == 0 {
        return Ok(Some(l3.peer.expected_residual));
    }
    let (_, trusted) = trust::of_segment(l3, sa)?;
    // SAFETY: a map value pointer, valid for this run.
    Ok(trusted.map(|t| unsafe { (*t).expected_residual }))
}

/// The verdict on an ICMP or `ICMPv6` message that left `residual`: against 0 for ICMP, the
/// SA's residual for `ICMPv6` (passed unverified, as learning, while the SA has none).
#[inline(always)]
fn judge_icmp(
    ctx: &SkBuffContext,
    l3: &L3,
    l4: &L4,
    sa: Sa,
    residual: u16,
) -> Result<Verdict, Counter> {
    let id = l3.peer.id;
    let expected = if l3.proto == IPPROTO_ICMP {
        0
    } else if let Some(r) = icmpv6_residual(l3, &sa)? {
        r
    } else {
        count_icmp(id, |s| s.learning += 1);
        return Ok(Verdict::Pass);
    };
    if residual == expected {
        stats::verified(id, Table::Icmp, l4.len);
        return Ok(Verdict::Pass);
    }
    Ok(mismatch(ctx, l3, l4, Table::Icmp, sa, (residual, expected)))
}

/// Counts a mismatch in `table` (and a drop, in enforce mode) and reports it: the verdict.
#[inline(always)]
fn mismatch(
    ctx: &SkBuffContext,
    l3: &L3,
    l4: &L4,
    table: Table,
    sa: Sa,
    (residual, expected): (u16, u16),
) -> Verdict {
    let action = stats::mismatched(l3.peer.id, table, l3.peer.mode);
    reported(
        ctx,
        l3,
        l4,
        &Mismatch {
            sa,
            residual,
            expected,
            action,
        },
    )
}

/// Reports a mismatch (and, with the capture ring on, copies the packet; `natt_pair` copies a
/// dropped TCP segment and remembers it for pairing); the verdict its action means.
#[inline(always)]
fn reported(ctx: &SkBuffContext, l3: &L3, l4: &L4, m: &Mismatch) -> Verdict {
    report::mismatch(ctx, l3, l4, m);
    if CAPTURE_ON.load() != 0 {
        if m.action == Action::Dropped && l3.proto == IPPROTO_TCP {
            // Returns only if the tail call failed; the copy below is then made here.
            pair::dropped(ctx, l3, l4, &m.sa, (l4.field, m.expected_field(l3, l4)));
        }
        report::capture(
            ctx,
            &Record {
                peer_id: l3.peer.id,
                sa: m.sa,
                action: m.action,
                found: l4.field,
                expected: m.expected_field(l3, l4),
            },
        );
    }
    if m.action == Action::Dropped {
        Verdict::Drop
    } else {
        Verdict::Pass
    }
}
