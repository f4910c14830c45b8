//! Test and benchmark programs. Never loaded by the daemon.
//!
//! `natt_inject` (tc ingress on the receiver's veth) emulates what `esp_input_done2` does to a
//! decapsulated NAT-T segment on a kernel without ESP: `bpf_csum_level(BPF_CSUM_LEVEL_INC)`
//! turns a `CHECKSUM_NONE` skb into `CHECKSUM_UNNECESSARY`, so TCP/UDP skip their own check.
//! It can also flip one payload byte of every Nth TCP data segment, and of every Nth ICMP
//! message with payload, *without* fixing the checksum — the "corrupted after the integrity
//! check" fault — and counts exactly what it did. It sees through a GRE (IPv4 inside, no
//! options) or IPIP header to the inner segment, as a tunnel inside a NAT-T SA carries it.
//!
//! Benchmark references (`cargo xtask bench`): `natt_noop_skb` and `natt_noop_tc` measure the
//! fixed cost of each hook; `natt_copy_skb` (copying a live segment out of the skb),
//! `natt_copy_sum_skb` (copying and summing it with the verifier's block sum) and
//! `natt_probe_read_skb` (one read of kernel memory) are the floors under the verifier's
//! per-byte cost and under SA scope's dismissal of traffic outside IPsec; `natt_kernel_csum` sums an IPv4 frame's L4 segment with
//! `bpf_csum_diff`, i.e. the kernel's own optimised `csum_partial`, over the same bytes the
//! verifier sums.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(not(target_arch = "bpf"))]
fn main() {
    // Host builds exist only so `cargo build --workspace` works; see monitor/build.rs.
}

#[cfg(target_arch = "bpf")]
mod prog {
    use core::ptr::null_mut;

    use aya_ebpf::{
        EbpfContext as _, Global,
        bindings::{__sk_buff, BPF_CSUM_LEVEL_INC, TC_ACT_OK},
        helpers::{
            bpf_probe_read_kernel,
            generated::{bpf_csum_diff, bpf_csum_level, bpf_skb_load_bytes},
        },
        macros::{cgroup_skb, classifier, map},
        maps::{Array, PerCpuArray},
        programs::{SkBuffContext, TcContext},
    };
    use monitor_ebpf::{
        INJECT_SLOTS, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, InjectSlot,
        blocksum::{MAX_BLOCKS, sum_blocks},
    };

    /// `ICMPv6` type of an echo reply.
    const ICMPV6_ECHO_REPLY: u8 = 129;

    /// Corrupt every Nth TCP data segment (per CPU); 0 disables corruption.
    #[unsafe(no_mangle)]
    static CORRUPT_EVERY: Global<u32> = Global::new(0);
    /// Non-zero: instead of flipping a byte, swap two adjacent 16-bit words of the TCP payload
    /// (word-aligned from the segment's start): a corruption that leaves the one's-complement
    /// sum unchanged, which no checksum can see. Segments whose two words are equal are left
    /// alone and not counted as corrupted.
    #[unsafe(no_mangle)]
    static SWAP_WORDS: Global<u32> = Global::new(0);
    /// Non-zero: mark TCP, UDP and ICMP packets `CHECKSUM_UNNECESSARY`, as esp4.c does for
    /// NAT-T.
    #[unsafe(no_mangle)]
    static MARK_UNNECESSARY: Global<u32> = Global::new(1);

    #[map]
    static INJECT_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(INJECT_SLOTS, 0);

    const ETH_HLEN: usize = 14;

    #[classifier]
    #[expect(
        clippy::needless_pass_by_value,
        reason = "signature fixed by aya's #[classifier]"
    )]
    pub fn natt_inject(ctx: TcContext) -> i32 {
        let _ = try_inject(&ctx);
        TC_ACT_OK
    }

    /// IP protocol numbers of GRE and of IPv4 in IPv4.
    const IPPROTO_GRE: u8 = 47;
    const IPPROTO_IPIP: u8 = 4;
    /// A GRE header with no flags, version 0, carrying IPv4 (0x0800).
    const GRE_IPV4: u32 = 0x0000_0800;

    /// The protocol, L4 offset and L4 length of the IPv4 header at `off`.
    fn ipv4_at(ctx: &TcContext, off: usize) -> Result<(u8, usize, usize), i64> {
        let ip: [u8; 20] = ctx.load(off)?;
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        let tot = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
        Ok((ip[9], off + ihl, tot.saturating_sub(ihl)))
    }

    fn slot(i: InjectSlot) -> Option<*mut u64> {
        INJECT_STATS.get_ptr_mut(i as u32)
    }

    fn try_inject(ctx: &TcContext) -> Result<(), i64> {
        let eth_proto: u16 = u16::from_be(ctx.load(12)?);
        let v4 = eth_proto == 0x0800;
        let (proto, l4_off, l4_len) = match eth_proto {
            0x0800 => {
                let (proto, l4_off, l4_len) = ipv4_at(ctx, ETH_HLEN)?;
                if proto == IPPROTO_GRE && ctx.load::<u32>(l4_off)? == GRE_IPV4.to_be() {
                    // A GRE tunnel's outer packet (no options, IPv4 inside): the mark applies
                    // to it, as esp4.c marks a decapsulated one, and the corruption to the
                    // inner TCP segment.
                    ipv4_at(ctx, l4_off + 4)?
                } else if proto == IPPROTO_IPIP {
                    ipv4_at(ctx, l4_off)?
                } else {
                    (proto, l4_off, l4_len)
                }
            }
            0x86dd => {
                let ip: [u8; 40] = ctx.load(ETH_HLEN)?;
                (
                    ip[6],
                    ETH_HLEN + 40,
                    usize::from(u16::from_be_bytes([ip[4], ip[5]])),
                )
            }
            _ => return Ok(()),
        };
        // ICMP over IPv4, and of ICMPv6 only echo replies: neighbour discovery keeps the
        // kernel's own check (a corrupted advertisement would lose the next hop).
        let icmp = if v4 {
            proto == IPPROTO_ICMP
        } else {
            proto == IPPROTO_ICMPV6 && ctx.load::<u8>(l4_off)? == ICMPV6_ECHO_REPLY
        };
        if proto != IPPROTO_TCP && proto != IPPROTO_UDP && !icmp {
            return Ok(());
        }
        if let Some(m) = slot(InjectSlot::MaxL4Len) {
            // SAFETY: per-CPU slot.
            unsafe {
                if (l4_len as u64) > *m {
                    *m = l4_len as u64;
                }
            }
        }
        if proto == IPPROTO_TCP {
            let doff_byte: u8 = ctx.load(l4_off + 12)?;
            let doff = usize::from(doff_byte >> 4) * 4;
            let payload = l4_len.saturating_sub(doff);
            if SWAP_WORDS.load() != 0 {
                let seq = u32::from_be(ctx.load(l4_off + 4)?);
                if payload >= 8 && first_seen(seq, payload as u32) {
                    swap_every(ctx, l4_off + doff + ((payload / 2) & !3))?;
                }
            } else if payload > 0 {
                corrupt_every(
                    ctx,
                    InjectSlot::DataSegments,
                    InjectSlot::Corrupted,
                    l4_off + doff + payload / 2,
                )?;
            }
        }
        if icmp && l4_len > 8 {
            corrupt_every(
                ctx,
                InjectSlot::IcmpMessages,
                InjectSlot::IcmpCorrupted,
                l4_off + 8 + (l4_len - 8) / 2,
            )?;
        }
        if MARK_UNNECESSARY.load() != 0 {
            // SAFETY: ctx is the program's valid skb.
            let r = unsafe {
                bpf_csum_level(
                    ctx.as_ptr().cast::<__sk_buff>(),
                    u64::from(BPF_CSUM_LEVEL_INC),
                )
            };
            if r == 0
                && let Some(p) = slot(InjectSlot::Marked)
            {
                // SAFETY: per-CPU slot.
                unsafe { *p += 1 };
            }
        }
        Ok(())
    }

    /// Counts one packet in `seen`; every `CORRUPT_EVERY`th one (per CPU) has its byte at `at`
    /// flipped and is counted in `corrupted`.
    fn corrupt_every(
        ctx: &TcContext,
        seen: InjectSlot,
        corrupted: InjectSlot,
        at: usize,
    ) -> Result<(), i64> {
        let every = u64::from(CORRUPT_EVERY.load());
        let n = slot(seen).map_or(0, |p| {
            // SAFETY: per-CPU slot.
            unsafe {
                *p += 1;
                *p
            }
        });
        if every != 0 && n.is_multiple_of(every) {
            let b: u8 = ctx.load(at)?;
            // Flags 0: do not touch skb->csum or the L4 checksum. That is the fault.
            ctx.store(at, &(b ^ 0x5a), 0)?;
            if let Some(p) = slot(corrupted) {
                // SAFETY: per-CPU slot.
                unsafe { *p += 1 };
            }
        }
        Ok(())
    }

    /// Where the stream's data seen so far ends (0: nothing seen yet), shared by every CPU.
    #[map]
    static SWAP_NEXT: Array<u32> = Array::with_max_entries(1, 0);

    /// Whether the segment of `len` bytes at `seq` brings data not seen before: a
    /// retransmission of data the receiver already has (a spurious retransmission, a tail loss
    /// probe) is discarded by TCP and would take its swap with it, unseen by the receiver.
    fn first_seen(seq: u32, len: u32) -> bool {
        let Some(p) = SWAP_NEXT.get_ptr_mut(0) else {
            return false;
        };
        // SAFETY: the map's one value; racing CPUs can at worst let one retransmission through,
        // which a test of one stream at a time does not meet.
        unsafe {
            let next = *p;
            // Sequence arithmetic (RFC 1982): `seq` is before `next` when the distance from
            // `next` forward to it is half the space or more.
            if next != 0 && seq.wrapping_sub(next) >= 1 << 31 {
                return false;
            }
            *p = seq.wrapping_add(len);
        }
        true
    }

    /// Counts a TCP data segment; in every `CORRUPT_EVERY`th, swaps the two 16-bit words at
    /// `at` (counted as corrupted when they differ).
    fn swap_every(ctx: &TcContext, at: usize) -> Result<(), i64> {
        let every = u64::from(CORRUPT_EVERY.load());
        let n = slot(InjectSlot::DataSegments).map_or(0, |p| {
            // SAFETY: per-CPU slot.
            unsafe {
                *p += 1;
                *p
            }
        });
        if every != 0 && n.is_multiple_of(every) {
            let w: [u8; 4] = ctx.load(at)?;
            if w[..2] != w[2..] {
                // Flags 0: skb->csum and the L4 checksum untouched, as for the byte flip.
                ctx.store(at, &[w[2], w[3], w[0], w[1]], 0)?;
                if let Some(p) = slot(InjectSlot::Corrupted) {
                    // SAFETY: per-CPU slot.
                    unsafe { *p += 1 };
                }
            }
        }
        Ok(())
    }

    /// Fixed cost of a `cgroup_skb` program: accept everything.
    #[cgroup_skb(ingress)]
    pub fn natt_noop_skb(_ctx: SkBuffContext) -> i32 {
        1
    }

    /// 2 KiB bounce buffer of `natt_copy_skb`.
    #[map]
    static COPY_BUF: PerCpuArray<[u64; 256]> = PerCpuArray::with_max_entries(1, 0);

    /// The live-path floor of reading a segment at all: copies the whole packet out of the skb
    /// (page fragments and all) with `bpf_skb_load_bytes` in 2 KiB pieces, as the verifier's
    /// summing loop does, and sums nothing.
    #[cgroup_skb(ingress)]
    #[expect(
        clippy::needless_pass_by_value,
        reason = "signature fixed by aya's #[cgroup_skb]"
    )]
    pub fn natt_copy_skb(ctx: SkBuffContext) -> i32 {
        copy_out::<false>(&ctx);
        1
    }

    /// The floor of a verifier with no fixed work: the packet copied out as `natt_copy_skb`
    /// does and summed with the verifier's own block sum, nothing else.
    #[cgroup_skb(ingress)]
    #[expect(
        clippy::needless_pass_by_value,
        reason = "signature fixed by aya's #[cgroup_skb]"
    )]
    pub fn natt_copy_sum_skb(ctx: SkBuffContext) -> i32 {
        let sum = copy_out::<true>(&ctx);
        if let Some(out) = CSUM_OUT.get_ptr_mut(0) {
            // SAFETY: per-CPU slot.
            unsafe { *out = sum };
        }
        1
    }

    /// Copies the packet out in 2 KiB pieces; with `SUM`, sums each piece's blocks (the last
    /// block of a short piece zeroed first, as the verifier does) and returns the total.
    #[inline]
    fn copy_out<const SUM: bool>(ctx: &SkBuffContext) -> u64 {
        let Some(buf) = COPY_BUF.get_ptr_mut(0) else {
            return 0;
        };
        let words = buf.cast::<u64>();
        let skb = ctx.as_ptr();
        let len = ctx.len();
        let mut sum = 0u64;
        let mut start = 0u32;
        let mut i = 0u32;
        while i < 32 && start + 2048 <= len {
            // SAFETY: the buffer holds 2048 bytes; the helper bounds-checks the skb side.
            unsafe { bpf_skb_load_bytes(skb, start, buf.cast(), 2048) };
            if SUM {
                // SAFETY: the buffer is MAX_BLOCKS blocks.
                sum += unsafe { sum_blocks::<false>(words, MAX_BLOCKS) };
            }
            start += 2048;
            i += 1;
        }
        if start < len {
            // [1, 2048] in a form the verifier follows.
            let last = (len - start - 1) & 2047;
            if SUM {
                // SAFETY: the block holding the last byte lies in the buffer.
                unsafe {
                    let tail = words.add(((last & !63) / 8) as usize);
                    for k in 0..8 {
                        core::ptr::write_volatile(tail.add(k), 0);
                    }
                }
            }
            // SAFETY: as above, `last + 1` is at most the buffer's size.
            unsafe { bpf_skb_load_bytes(skb, start, buf.cast(), last + 1) };
            if SUM {
                // SAFETY: as above.
                sum += unsafe { sum_blocks::<true>(words, last / 64 + 1) };
            }
        }
        sum
    }

    /// The floor of dismissing a segment by its IPsec state: one `bpf_probe_read_kernel` of
    /// one byte of the skb, as SA scope's first read, and nothing else.
    #[cgroup_skb(ingress)]
    #[expect(
        clippy::needless_pass_by_value,
        reason = "signature fixed by aya's #[cgroup_skb]"
    )]
    pub fn natt_probe_read_skb(ctx: SkBuffContext) -> i32 {
        // SAFETY: bpf_probe_read_kernel checks the address and fails cleanly.
        let _ = unsafe { bpf_probe_read_kernel(ctx.as_ptr() as *const u8) };
        1
    }

    /// Fixed cost of a tc program.
    #[classifier]
    pub fn natt_noop_tc(_ctx: TcContext) -> i32 {
        TC_ACT_OK
    }

    /// The folded sum of the last run, so the work cannot be optimised away.
    #[map]
    static CSUM_OUT: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

    /// Sums bytes 34.. (Ethernet + 20-byte IPv4 header onwards) of a linear test-run frame with
    /// `bpf_csum_diff`: whole 512-byte chunks (the helper's limit), then the rest in
    /// power-of-two pieces so every call has a constant size. Lengths must be multiples of 4.
    #[classifier]
    #[expect(
        clippy::needless_pass_by_value,
        reason = "signature fixed by aya's #[classifier]"
    )]
    #[expect(
        unused_assignments,
        reason = "the last piece advances `p` for symmetry"
    )]
    #[expect(
        clippy::cast_sign_loss,
        reason = "bpf_csum_diff returns the 32-bit sum in an s64"
    )]
    pub fn natt_kernel_csum(ctx: TcContext) -> i32 {
        let mut p = ctx.data() + 34;
        let end = ctx.data_end();
        let mut seed: u32 = 0;
        macro_rules! sum {
            ($n:literal) => {
                if p + $n <= end {
                    let words = p as *mut u32;
                    // SAFETY: `p + $n <= data_end` was just checked on a direct packet pointer.
                    let sum = unsafe { bpf_csum_diff(null_mut(), 0, words, $n, seed) };
                    seed = sum as u32;
                    p += $n;
                }
            };
        }
        sum!(512);
        sum!(512);
        sum!(512);
        sum!(512);
        sum!(512);
        sum!(512);
        sum!(512);
        sum!(512);
        sum!(256);
        sum!(128);
        sum!(64);
        sum!(32);
        sum!(16);
        sum!(8);
        sum!(4);
        if let Some(out) = CSUM_OUT.get_ptr_mut(0) {
            // SAFETY: per-CPU slot.
            unsafe { *out = u64::from(seed) };
        }
        TC_ACT_OK
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }
}
