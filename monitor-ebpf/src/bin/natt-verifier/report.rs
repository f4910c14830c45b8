//! What the verifier tells userspace, each through its own ring buffer: mismatch events,
//! learning samples and, with `--capture`, the mismatching packets. A full ring is counted.

use aya_ebpf::{EbpfContext as _, programs::SkBuffContext};
use monitor_ebpf::{
    Action, CAPTURE_SNAP, CaptureRecord, Counter, EVENT_PAYLOAD_LEN, IPPROTO_UDP, LearningSample,
    MismatchEvent, SaKey, csum,
};

use crate::{
    maps::{CAPTURE, EVENTS, LEARNING},
    parse::{L3, L4, skb},
    scope::{Sa, sa_reqid, sa_spi},
    stats::bump,
    sum::{load_into, opaque},
};

/// A mismatch: the segment's residual against the one its NAT mapping leaves.
pub struct Mismatch {
    pub sa: Sa,
    pub residual: u16,
    pub expected: u16,
    pub action: Action,
}

impl Mismatch {
    /// The checksum field an intact segment with these bytes would carry.
    #[inline(always)]
    pub fn expected_field(&self, l3: &L3, l4: &L4) -> u16 {
        csum::expected_field(
            l4.field,
            self.residual,
            self.expected,
            l3.proto == IPPROTO_UDP,
        )
    }
}

/// Sends one mismatch event, with the first payload bytes for the log line.
#[inline(always)]
pub fn mismatch(ctx: &SkBuffContext, l3: &L3, l4: &L4, m: &Mismatch) {
    event(ctx, l3, l4, &m.sa, m.action, |ev| {
        // SAFETY: `event`'s reservation, exclusive and aligned.
        unsafe {
            (*ev).csum_found = l4.field;
            (*ev).csum_expected = m.expected_field(l3, l4);
            (*ev).residual = m.residual;
            (*ev).expected_residual = m.expected;
        }
    });
}

/// Sends one mismatch event for an SCTP packet: the CRC32c it carried, `found`, against the one
/// its bytes have, `computed`, each split over a checksum field and a residual field.
#[inline(always)]
pub fn crc_mismatch(
    ctx: &SkBuffContext,
    l3: &L3,
    l4: &L4,
    sa: &Sa,
    action: Action,
    (found, computed): (u32, u32),
) {
    event(ctx, l3, l4, sa, action, |ev| {
        // SAFETY: `event`'s reservation, exclusive and aligned.
        unsafe {
            (*ev).csum_found = (found >> 16) as u16;
            (*ev).csum_expected = (computed >> 16) as u16;
            (*ev).residual = found as u16;
            (*ev).expected_residual = computed as u16;
        }
    });
}

/// Sends one mismatch event; `sums` fills in the checksum fields found and expected and the
/// residuals left and expected, where the reservation is written.
#[inline(always)]
fn event(
    ctx: &SkBuffContext,
    l3: &L3,
    l4: &L4,
    sa: &Sa,
    action: Action,
    sums: impl FnOnce(*mut MismatchEvent),
) {
    let Some(mut entry) = EVENTS.reserve::<MismatchEvent>(0) else {
        bump(Counter::EventsLost);
        return;
    };
    let ev = entry.as_mut_ptr();
    // Off the verified path: only reports name the SA.
    let (spi, reqid) = (sa_spi(sa), sa_reqid(sa));
    // SAFETY: `ev` is an exclusive, aligned ring-buffer reservation of the event's size.
    unsafe {
        (*ev).peer_id = l3.peer.id;
        (*ev).l4_len = l4.len;
        (*ev).seq = l4.seq;
        (*ev).family = l3.family as u8;
        (*ev).proto = l3.proto;
        (*ev).action = action as u8;
        (*ev).sport = l4.sport;
        (*ev).dport = l4.dport;
        sums(ev);
        (*ev).encap_sport = sa.sport;
        (*ev).encap_dport = sa.dport;
        (*ev).spi = spi;
        (*ev).reqid = reqid;
        (*ev).ifindex = skb(ctx).ingress_ifindex;
        (*ev).src = l3.src;
        (*ev).dst = l3.dst;
        (*ev).payload = [0; EVENT_PAYLOAD_LEN];
        (*ev).payload_len = 0;
        let payload_len = l4.len - l4.hdr_len;
        if payload_len > 0 {
            let want = if payload_len < EVENT_PAYLOAD_LEN as u32 {
                payload_len
            } else {
                EVENT_PAYLOAD_LEN as u32
            };
            let n = ((opaque(want) - 1) & (EVENT_PAYLOAD_LEN as u32 - 1)) + 1;
            if load_into(
                ctx.as_ptr().cast(),
                l3.l4_off + l4.hdr_len,
                (*ev).payload.as_mut_ptr(),
                n,
            ) {
                (*ev).payload_len = n as u8;
            }
        }
    }
    entry.submit(0);
}

/// Sends one record of the `LEARNING` ring: the residual a segment of IP protocol `proto` left
/// through an SA that is still learning (`SAMPLE_LEARNING`, `SAMPLE_HELD`), or what became of
/// an SA's residual (`SAMPLE_INHERITED`, `SAMPLE_CONFIRMED`, `SAMPLE_WITHDRAWN` with the value
/// the refused segments agreed on in `found`).
#[inline(always)]
pub fn trust(key: &SaKey, sa: &Sa, family: u8, kind: u8, residual: u16, found: u16, proto: u8) {
    let Some(mut entry) = LEARNING.reserve::<LearningSample>(0) else {
        bump(Counter::LearningLost);
        return;
    };
    // The SPI is in the key already: only the reqid is read here.
    let reqid = sa_reqid(sa);
    entry.write(LearningSample {
        key: *key,
        residual,
        family,
        kind,
        reqid,
        found,
        proto,
        pad: 0,
        state: sa.state,
    });
    entry.submit(0);
}

/// What a capture record says about its packet besides its bytes.
pub struct Record {
    pub peer_id: u32,
    pub sa: Sa,
    pub action: Action,
    /// The checksum field found and the one these bytes call for.
    pub found: u16,
    pub expected: u16,
}

/// Copies the packet (from its IP header, up to `CAPTURE_SNAP` bytes) into the capture ring,
/// for the daemon's forensics and `--capture`.
#[inline(always)]
pub fn capture(ctx: &SkBuffContext, r: &Record) {
    let Some(mut entry) = CAPTURE.reserve::<CaptureRecord>(0) else {
        bump(Counter::CaptureLost);
        return;
    };
    let rec = entry.as_mut_ptr();
    let len = ctx.len();
    let want = if len < CAPTURE_SNAP as u32 {
        len
    } else {
        CAPTURE_SNAP as u32
    };
    // [1, CAPTURE_SNAP] in a form the verifier follows (see `sum::add_chunk`).
    let n = ((want.wrapping_sub(1)) & (CAPTURE_SNAP as u32 - 1)) + 1;
    // Off the verified path: only reports name the SA.
    let spi = sa_spi(&r.sa);
    // SAFETY: `rec` is an exclusive ring-buffer reservation of the record's size.
    unsafe {
        (*rec).len = len;
        (*rec).ifindex = skb(ctx).ingress_ifindex;
        (*rec).action = r.action as u8;
        (*rec).pad = [0; 3];
        (*rec).peer_id = r.peer_id;
        (*rec).spi = spi;
        (*rec).csum_found = r.found;
        (*rec).csum_expected = r.expected;
        (*rec).encap_ports = [r.sa.sport, r.sa.dport];
        (*rec).caplen = if load_into(ctx.as_ptr().cast(), 0, (*rec).data.as_mut_ptr(), n) {
            n
        } else {
            0
        };
    }
    entry.submit(0);
}
