//! SCTP after a NAT-T transport SA: its CRC32c, which `sctp_rcv` skips for a packet marked
//! `CHECKSUM_UNNECESSARY` (`skb_csum_unnecessary` in `net/sctp/input.c`), as `esp_input_done2`
//! marks every decapsulated one.
//!
//! The CRC covers the SCTP packet alone (RFC 9260, no pseudo-header), so a NAT in front of the
//! SA changes nothing it covers: the verdict is exact from the first packet, with no residual
//! to learn. BPF has no CRC instruction; the packet is copied out in 2 KiB chunks, one
//! `bpf_loop` callback each, and run through the slicing-by-8 tables of `monitor_ebpf::crc32c`
//! (about 0.6 ns per byte on this machine's bench, against 0.05 for the one's-complement sum).
//!
//! `natt_sctp` is a program of its own, tail-called through `SCTP_JUMP` by `natt_verify` (the
//! `bpf_loop` variant only: kernels without `bpf_loop` cannot load it, and count SCTP as
//! `other_protocol`), so the kernel verifier checks the CRC loop apart from the summing loop.
//! It reads the headers again rather than taking them over: a tail call carries only the skb.

use core::ffi::c_void;

use aya_ebpf::{
    EbpfContext as _, bindings::__sk_buff, helpers::generated::bpf_loop, macros::cgroup_skb,
    programs::SkBuffContext,
};
use monitor_ebpf::{Action, Counter, IPPROTO_SCTP, blocksum::BLOCK, crc32c};

use crate::{
    maps::{CAPTURE_ON, SCRATCH},
    parse::{parse_l3, parse_sctp},
    report::{self, Record},
    scope::in_scope,
    stats::{self, Table, bump},
    sum::{CHUNK, load_into, opaque},
};

/// `SCTP_JUMP`'s slot of `natt_sctp`.
pub const SCTP_SLOT: u32 = 0;

/// The SCTP path, tail-called by `natt_verify` for an SCTP packet in scope: 1 delivers it, 0
/// drops it (enforce mode, a CRC mismatch) for SCTP to retransmit.
#[cgroup_skb(ingress)]
#[expect(
    clippy::needless_pass_by_value,
    reason = "signature fixed by aya's #[cgroup_skb]"
)]
pub fn natt_sctp(ctx: SkBuffContext) -> i32 {
    match verify(&ctx) {
        Ok(true) => 1,
        Ok(false) => 0,
        Err(reason) => {
            bump(reason);
            1
        }
    }
}

/// True to deliver the packet; a skip reason when it cannot be checked.
#[inline(always)]
fn verify(ctx: &SkBuffContext) -> Result<bool, Counter> {
    let (sa, tunnel) = in_scope::<true>(ctx)?;
    let mut l3 = parse_l3::<true, true>(ctx)?;
    if let Some(peer) = tunnel {
        l3.peer = peer;
    }
    if l3.proto != IPPROTO_SCTP {
        return Err(Counter::SkipOtherProtocol);
    }
    let (l4, found) = parse_sctp(ctx, &l3)?;
    if found == 0 {
        // No CRC: one left for the device to fill in (`CHECKSUM_PARTIAL` on a veth or loopback
        // path, which the kernel accepts unchecked; address scope can meet it), or a sender
        // whose `sctp.no_checksums` is set (a receiver with it set checks nothing either).
        // Enforcing would cut such an association off; a corruption that turns exactly the
        // four CRC bytes into zeros is the price.
        return Err(Counter::SkipPartialChecksum);
    }
    let computed =
        crc_packet(ctx.as_ptr().cast(), l3.l4_off, l4.len).ok_or(Counter::SkipTruncated)?;
    let id = l3.peer.id;
    if computed == found {
        stats::verified(id, Table::Sctp, l4.len);
        return Ok(true);
    }
    let action = stats::mismatched(id, Table::Sctp, l3.peer.mode);
    report::crc_mismatch(ctx, &l3, &l4, &sa, action, (found, computed));
    if CAPTURE_ON.load() != 0 {
        report::capture(
            ctx,
            &Record {
                peer_id: id,
                sa,
                action,
                found: (found >> 16) as u16,
                expected: (computed >> 16) as u16,
            },
        );
    }
    Ok(action == Action::Passed)
}

/// State shared with the `bpf_loop` callback; lives on the caller's stack.
#[repr(C)]
struct CrcCtx {
    skb: *mut __sk_buff,
    crc: u32,
    off: u32,
    len: u32,
    failed: u32,
}

/// CRC32c of the `len` bytes at `off` with the checksum field (bytes 8 to 11) taken as zero,
/// as RFC 9260 computes it; `None` if a chunk could not be read. One `bpf_loop` callback per
/// 64-byte block: its straight-line body is what the kernel verifier checks, once, however
/// long the packet (a loop over the words whose counter indexes the buffer made it walk every
/// iteration count apart: 395,016 instructions on 6.18).
#[inline(always)]
fn crc_packet(skb: *mut __sk_buff, off: u32, len: u32) -> Option<u32> {
    let mut c = CrcCtx {
        skb,
        crc: !0,
        off,
        len,
        failed: 0,
    };
    // SAFETY: the callback matches bpf_loop's contract and `c` outlives the call.
    unsafe {
        bpf_loop(
            len.div_ceil(BLOCK),
            crc_one_block as *mut c_void,
            (&raw mut c).cast::<c_void>(),
            0,
        );
    }
    if c.failed != 0 { None } else { Some(!c.crc) }
}

/// `bpf_loop` callback: advances the `CrcCtx` over block `index`, first copying the 2 KiB
/// chunk that starts there into the scratch buffer when one does.
#[inline(never)]
extern "C" fn crc_one_block(index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `CrcCtx` that `crc_packet` passed to bpf_loop.
    let st = unsafe { &mut *ctx.cast::<CrcCtx>() };
    let start = (index as u32) * BLOCK;
    if start >= st.len {
        return 1;
    }
    let Some(buf) = SCRATCH.get_ptr_mut(0) else {
        st.failed = 1;
        return 1;
    };
    let left = st.len - start;
    if start.is_multiple_of(CHUNK) {
        // As in `sum::add_chunk`: [1, CHUNK] in a form the verifier follows.
        let last = (opaque(if left < CHUNK { left } else { CHUNK }) - 1) & (CHUNK - 1);
        if !load_into(st.skb, st.off + start, buf.cast(), last + 1) {
            st.failed = 1;
            return 1;
        }
        if index == 0 {
            // The checksum field counts as zero: the low half of the second word
            // (little-endian loads; the chunk holds the whole 12-byte header).
            // SAFETY: word 1 lies inside the CHUNK-byte buffer.
            unsafe { *buf.cast::<u64>().add(1) &= !0xffff_ffff };
        }
    }
    // SAFETY: a block's first word inside the CHUNK-byte buffer.
    let block = unsafe { buf.cast::<u64>().add(((start % CHUNK) / 8) as usize) };
    if left >= BLOCK {
        st.crc = crc_block(st.crc, block);
        return 0;
    }
    // The packet's last, short block: its whole words, then its bytes. `opaque` and the mask
    // keep its length below 64 in the kernel verifier's view (LLVM drops a bound it can prove).
    let short = opaque(left) & (BLOCK - 1);
    let mut c = st.crc;
    let mut k = 0u32;
    while k < 7 && k < short / 8 {
        // SAFETY: word k (< 7) of the block, 8-byte aligned.
        c = step8(c, unsafe { *block.add(k as usize) });
        k += 1;
    }
    // SAFETY: at most 56 bytes into the block.
    let tail = unsafe { block.cast::<u8>().add((short & !7) as usize) };
    let mut b = 0u32;
    while b < 7 && b < short % 8 {
        // SAFETY: byte b (< 7) after the block's last whole word.
        c = crc32c::step1(c, unsafe { *tail.add(b as usize) });
        b += 1;
    }
    st.crc = c;
    0
}

/// `crc` advanced over the 64-byte block at `p`, 32 bytes per call: the bench measured 1.51
/// ns per byte with one call per word, 1.08 with one per two words, 0.88 with one per four.
#[inline(always)]
fn crc_block(crc: u32, p: *const u64) -> u32 {
    let mut c = crc;
    let mut i = 0;
    while i < 8 {
        // SAFETY: the caller's block holds 8 words.
        // SAFETY: as above.
        let w = unsafe { [*p.add(i), *p.add(i + 1), *p.add(i + 2), *p.add(i + 3)] };
        c = step32(c, w[0], w[1], w[2], w[3]);
        i += 4;
    }
    c
}

/// Four `crc32c::step8`s, as a function of its own (see `step8`): all eight unrolled into the
/// callback took 328 bytes of stack.
#[inline(never)]
fn step32(crc: u32, a: u64, b: u64, c: u64, d: u64) -> u32 {
    crc32c::step8(crc32c::step8(crc32c::step8(crc32c::step8(crc, a), b), c), d)
}

/// `crc32c::step8` as a function of its own: unrolled into its caller, LLVM computes the
/// table indexes of several words at once and spills them past the 512-byte BPF stack.
#[inline(never)]
fn step8(crc: u32, word: u64) -> u32 {
    crc32c::step8(crc, word)
}
