//! The `cgroup_skb` ingress verifier: recomputes the TCP/UDP checksums that the kernel marks
//! `CHECKSUM_UNNECESSARY` without checking after ESP-in-UDP transport-mode decapsulation
//! (`esp_input_done2` in `net/ipv4/esp4.c` and `net/ipv6/esp6.c`, unchanged from 2.6 to 6.x).
//!
//! Where it runs: `tcp_v4_rcv`/`tcp_v6_rcv` → `tcp_filter` → `sk_filter_trim_cap` →
//! `__cgroup_bpf_run_filter_skb` (and the UDP equivalent in `udp_queue_rcv_one_skb`), with the
//! skb pushed back to its network header, so offset 0 is the IP header. The program sees
//! plaintext after xfrm, which tc and XDP cannot. Returning 0 drops the segment; TCP then
//! retransmits it because it was never acknowledged.
//!
//! Scope comes from each segment's own IPsec state: the program reads the skb's `sec_path` (the
//! context pointer *is* the kernel's `struct sk_buff`) at offsets the daemon took from the
//! kernel's BTF, and verifies exactly the segments that a transport-mode SA with UDP/TCP
//! encapsulation decapsulated. Without BTF it falls back to scope by source address (LPM tries
//! filled by userspace) with exemptions for IKE ports and partial checksums.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(not(target_arch = "bpf"))]
fn main() {
    // Host builds of this binary exist only so `cargo build --workspace` works; the real object
    // is built for bpfel-unknown-none by monitor/build.rs.
}

#[cfg(target_arch = "bpf")]
#[expect(
    clippy::inline_always,
    reason = "inlining decides BPF subprogram boundaries and with them the 512-byte stack budget"
)]
mod prog {
    use core::{
        ffi::c_void,
        ptr::{read_volatile, write_volatile},
    };

    use aya_ebpf::{
        EbpfContext as _, Global,
        bindings::__sk_buff,
        helpers::{
            bpf_probe_read_kernel,
            generated::{bpf_loop, bpf_skb_load_bytes},
        },
        macros::{cgroup_skb, map},
        maps::{LpmTrie, LruHashMap, PerCpuArray, RingBuf, lpm_trie::Key},
        programs::SkBuffContext,
    };
    use aya_log_ebpf::warn;
    use monitor_ebpf::{
        ACTION_DROPPED, ACTION_LEARNING, ACTION_PASSED, CAPTURE_RING_BYTES, CAPTURE_SNAP,
        COUNTER_SLOTS, CaptureRecord, Counter, EVENT_PAYLOAD_LEN, EVENT_RING_BYTES, FAMILY_V4,
        FAMILY_V6, IPPROTO_TCP, IPPROTO_UDP, MAX_PEERS, MAX_SA_RESIDUALS, MODE_ENFORCE,
        MismatchEvent, PEER_FLAG_LEARN, PROTO_TCP, PROTO_UDP, PeerKeyV4, PeerKeyV6, PeerStats,
        PeerValue, SaKey, SaValue, SecpathLayout, XFRM_MAX_DEPTH, XFRM_MODE_TRANSPORT, csum,
    };

    /// Where this kernel keeps the `sec_path`; set by the loader from BTF. All zero: address
    /// scope. The map behind it is frozen, so the verifier sees constants and prunes the scope
    /// that is not in use.
    #[unsafe(no_mangle)]
    static SECPATH: Global<SecpathLayout> = Global::new(SecpathLayout {
        enabled: 0,
        skb_active_extensions: 0,
        sec_path_bit: 0,
        skb_extensions: 0,
        ext_sec_path_offset: 0,
        sp_len: 0,
        sp_len_size: 0,
        sp_xvec: 0,
        x_encap: 0,
        x_mode: 0,
        x_spi: 0,
        x_reqid: 0,
        encap_sport: 0,
    });

    #[map]
    static PEERS_V4: LpmTrie<PeerKeyV4, PeerValue> = LpmTrie::with_max_entries(MAX_PEERS, 0);
    #[map]
    static PEERS_V6: LpmTrie<PeerKeyV6, PeerValue> = LpmTrie::with_max_entries(MAX_PEERS, 0);
    /// Non-zero: copy every mismatching packet into `CAPTURE` (`--capture`). Set by the loader;
    /// when 0 the verifier prunes the copy.
    #[unsafe(no_mangle)]
    static CAPTURE_ON: Global<u32> = Global::new(0);

    #[map]
    static CAPTURE: RingBuf = RingBuf::with_byte_size(CAPTURE_RING_BYTES, 0);

    /// Learned NAT residuals per NAT mapping (`SaKey`). Userspace is the only writer.
    #[map]
    static SA_RESIDUALS: LruHashMap<SaKey, SaValue> =
        LruHashMap::with_max_entries(MAX_SA_RESIDUALS, 0);
    #[map]
    static PEER_STATS: PerCpuArray<PeerStats> = PerCpuArray::with_max_entries(MAX_PEERS, 0);
    #[map]
    static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);
    /// 512-byte bounce buffer for `bpf_skb_load_bytes`: the BPF stack is only 512 bytes.
    #[map]
    static SCRATCH: PerCpuArray<[u64; CHUNK_WORDS]> = PerCpuArray::with_max_entries(1, 0);
    #[map]
    static EVENTS: RingBuf = RingBuf::with_byte_size(EVENT_RING_BYTES, 0);

    const CHUNK: u32 = 512;
    const CHUNK_WORDS: usize = CHUNK as usize / 8;
    const MAX_EXT_HEADERS: usize = 6;
    const ETH_P_IP: u16 = 0x0800;
    const ETH_P_IPV6: u16 = 0x86dd;
    const IKE_PORT: u16 = 500;
    const NATT_PORT: u16 = 4500;

    #[derive(Clone, Copy)]
    #[repr(u8)]
    enum Verdict {
        Pass,
        Drop,
    }
    const _: () = assert!(size_of::<Verdict>() <= 8 && size_of::<Counter>() <= 8);

    /// What the IP layer told us about the L4 segment.
    struct L3 {
        family: u8,
        proto: u8,
        l4_off: u32,
        /// L4 length from the IP header (may exceed the skb when UDP trimmed it).
        l4_len: u32,
        peer: PeerValue,
        addr_sum: u64,
        src: [u8; 16],
        dst: [u8; 16],
    }

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

    /// Feature probe: loads only where the kernel has `bpf_loop`. Never attached.
    #[cgroup_skb(ingress)]
    #[expect(
        clippy::needless_pass_by_value,
        reason = "signature fixed by aya's #[cgroup_skb]"
    )]
    pub fn natt_probe_bpf_loop(ctx: SkBuffContext) -> i32 {
        let _ = &ctx;
        // SAFETY: a valid callback and a null context it never reads.
        unsafe { bpf_loop(1, probe_callback as *mut c_void, core::ptr::null_mut(), 0) };
        1
    }

    #[inline(never)]
    extern "C" fn probe_callback(_index: u64, _ctx: *mut c_void) -> i64 {
        1
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
    fn bump(c: Counter) {
        if let Some(p) = COUNTERS.get_ptr_mut(c as u32) {
            // SAFETY: per-CPU slot; the program cannot be re-entered on this CPU.
            unsafe { *p += 1 };
        }
    }

    #[inline(always)]
    fn skb(ctx: &SkBuffContext) -> &__sk_buff {
        // SAFETY: the kernel hands the program a valid `__sk_buff` for its whole run.
        unsafe { &*ctx.as_ptr().cast::<__sk_buff>() }
    }

    /// The SA that decapsulated a segment: the innermost state of its `sec_path`. All zero under
    /// address scope.
    #[derive(Clone, Copy)]
    struct Sa {
        /// The `struct xfrm_state`'s address; its SPI and reqid are read only for an event.
        state: u64,
        /// Encapsulation ports, network byte order.
        sport: u16,
        dport: u16,
    }

    /// What the L4 header says.
    struct L4 {
        /// Segment length (UDP: its own length field, which `udp_rcv` trimmed the skb to).
        len: u32,
        hdr_len: u32,
        field: u16,
        seq: u32,
        sport: u16,
        dport: u16,
    }

    #[inline(always)]
    fn try_verify<const BPF_LOOP: bool>(ctx: &SkBuffContext) -> Result<Verdict, Counter> {
        let layout = SECPATH.load();
        // SA scope dismisses everything that did not come through a NAT-T transport SA before
        // touching a header: one read of `active_extensions` for ordinary traffic.
        let sa = if layout.enabled != 0 {
            ipsec_state(ctx, &layout)?
        } else {
            Sa {
                state: 0,
                sport: 0,
                dport: 0,
            }
        };
        if skb(ctx).gso_segs > 1 {
            // GRO merged several segments behind one header: their checksums are gone.
            return Err(Counter::SkipAggregated);
        }
        let proto = skb(ctx).protocol;
        let l3 = if proto == u32::from(ETH_P_IP.to_be()) {
            parse_v4(ctx)?
        } else if proto == u32::from(ETH_P_IPV6.to_be()) {
            parse_v6(ctx)?
        } else {
            return Err(Counter::SkipOtherProtocol);
        };
        let l4 = parse_l4(ctx, &l3)?;
        let pseudo = l3.addr_sum + csum::proto_len_sum(l3.proto, l4.len);
        if layout.enabled == 0 {
            address_scope_exemptions(&l4, pseudo)?;
        }

        let Some(data) = sum_segment::<BPF_LOOP>(ctx, l3.l4_off, l4.len) else {
            // The headers said the segment was whole, yet a chunk could not be read: worth a
            // line in the daemon's log (bridged from aya-log), not only a counter.
            warn!(
                ctx,
                "segment of {} bytes at offset {} could not be read whole", l4.len, l3.l4_off
            );
            return Err(Counter::SkipTruncated);
        };
        let residual = csum::residual(pseudo + data);
        let peer = l3.peer;
        let p = if l3.proto == IPPROTO_TCP {
            PROTO_TCP
        } else {
            PROTO_UDP
        };
        let expected = if peer.flags & PEER_FLAG_LEARN == 0 {
            Some(peer.expected_residual)
        } else {
            let key = SaKey {
                src: l3.src,
                dst: l3.dst,
                encap_sport: sa.sport,
                encap_dport: sa.dport,
                peer_id: peer.id,
            };
            // SAFETY: the value is copied out at once; userspace may replace it concurrently,
            // and either version is a valid residual.
            unsafe { SA_RESIDUALS.get(&key) }.map(|v| v.expected_residual)
        };
        let action = match expected {
            None => {
                // The residual of this NAT mapping is not known yet: report what this segment
                // left and pass it, neither verified nor a mismatch.
                count(peer.id, |s| s.learning[p] += 1);
                ACTION_LEARNING
            }
            Some(e) if e == residual => {
                count(peer.id, |s| {
                    s.verified_packets[p] += 1;
                    s.verified_bytes[p] += u64::from(l4.len);
                });
                return Ok(Verdict::Pass);
            }
            Some(_) if peer.mode == MODE_ENFORCE => {
                count(peer.id, |s| {
                    s.mismatches[p] += 1;
                    s.drops[p] += 1;
                });
                ACTION_DROPPED
            }
            Some(_) => {
                count(peer.id, |s| s.mismatches[p] += 1);
                ACTION_PASSED
            }
        };
        emit(
            ctx,
            &l3,
            &l4,
            &Mismatch {
                sa,
                residual,
                expected: expected.unwrap_or(0),
                action,
            },
        );
        if action != ACTION_LEARNING && CAPTURE_ON.load() != 0 {
            capture(ctx, action);
        }
        Ok(if action == ACTION_DROPPED {
            Verdict::Drop
        } else {
            Verdict::Pass
        })
    }

    /// The one place per-peer statistics change.
    #[inline(always)]
    fn count(id: u32, f: impl FnOnce(&mut PeerStats)) {
        if let Some(s) = PEER_STATS.get_ptr_mut(id) {
            // SAFETY: per-CPU slot; the program cannot be re-entered on this CPU.
            f(unsafe { &mut *s });
        }
    }

    /// Reads `T` from kernel memory at `addr`.
    #[inline(always)]
    fn kread<T>(addr: u64) -> Result<T, Counter> {
        // SAFETY: bpf_probe_read_kernel checks the address and fails cleanly.
        unsafe { bpf_probe_read_kernel(addr as *const T) }.map_err(|_| Counter::SkipIpsecUnreadable)
    }

    /// The SA that decapsulated this segment, if its checksum is one the kernel skipped: the
    /// innermost `xfrm_state` of the skb's `sec_path` is in transport mode with an
    /// encapsulation template (ESP in UDP or TCP). `esp_input_done2` (net/ipv4/esp4.c,
    /// net/ipv6/esp6.c) marks exactly those `CHECKSUM_UNNECESSARY`.
    #[inline(always)]
    fn ipsec_state(ctx: &SkBuffContext, l: &SecpathLayout) -> Result<Sa, Counter> {
        let skb = ctx.as_ptr() as u64;
        let active: u8 = kread(skb + u64::from(l.skb_active_extensions))?;
        if u32::from(active) & l.sec_path_bit == 0 {
            return Err(Counter::SkipNotIpsec);
        }
        let ext: u64 = kread(skb + u64::from(l.skb_extensions))?;
        let off: u8 = kread(ext + u64::from(l.ext_sec_path_offset))?;
        let sp = ext + (u64::from(off) << 3);
        let len = if l.sp_len_size == 1 {
            u32::from(kread::<u8>(sp + u64::from(l.sp_len))?)
        } else {
            kread::<u32>(sp + u64::from(l.sp_len))?
        };
        if len == 0 || len > XFRM_MAX_DEPTH {
            return Err(Counter::SkipIpsecUnreadable);
        }
        let x: u64 = kread(sp + u64::from(l.sp_xvec) + u64::from(len - 1) * 8)?;
        let encap: u64 = kread(x + u64::from(l.x_encap))?;
        let mode: u8 = kread(x + u64::from(l.x_mode))?;
        if encap == 0 || mode != XFRM_MODE_TRANSPORT {
            return Err(Counter::SkipIpsecCheckedByKernel);
        }
        let ports: [u16; 2] = kread(encap + u64::from(l.encap_sport))?;
        Ok(Sa {
            state: x,
            sport: ports[0],
            dport: ports[1],
        })
    }

    /// Address scope cannot tell which segments the kernel skipped, so it leaves out the two
    /// kinds that are certainly plaintext with an ordinary or partial checksum: IKE's ports
    /// (UDP, and TCP for RFC 8229's ESP-in-TCP stream itself, whose segments carry ESP), and
    /// the partial-checksum signature.
    #[inline(always)]
    fn address_scope_exemptions(l4: &L4, pseudo: u64) -> Result<(), Counter> {
        if matches!(l4.sport, IKE_PORT | NATT_PORT) || matches!(l4.dport, IKE_PORT | NATT_PORT) {
            return Err(Counter::SkipIke);
        }
        if csum::normalize(l4.field) == csum::partial_field(pseudo) {
            return Err(Counter::SkipPartialChecksum);
        }
        Ok(())
    }

    /// The TCP or UDP header, checked against the lengths the IP header gave.
    #[inline(always)]
    fn parse_l4(ctx: &SkBuffContext, l3: &L3) -> Result<L4, Counter> {
        let l4 = if l3.proto == IPPROTO_TCP {
            if l3.l4_len < 20 {
                return Err(Counter::SkipMalformed);
            }
            let th: [u8; 20] = ctx
                .load(l3.l4_off as usize)
                .map_err(|_| Counter::SkipTruncated)?;
            let doff = u32::from(th[12] >> 4) * 4;
            if doff < 20 || doff > l3.l4_len {
                return Err(Counter::SkipMalformed);
            }
            L4 {
                len: l3.l4_len,
                hdr_len: doff,
                field: u16::from_be_bytes([th[16], th[17]]),
                seq: u32::from_be_bytes([th[4], th[5], th[6], th[7]]),
                sport: u16::from_be_bytes([th[0], th[1]]),
                dport: u16::from_be_bytes([th[2], th[3]]),
            }
        } else {
            if l3.l4_len < 8 {
                return Err(Counter::SkipMalformed);
            }
            let uh: [u8; 8] = ctx
                .load(l3.l4_off as usize)
                .map_err(|_| Counter::SkipTruncated)?;
            let ulen = u32::from(u16::from_be_bytes([uh[4], uh[5]]));
            // udp_rcv trims the skb to the UDP length before the socket filter runs, so the
            // UDP length, not the IP length, bounds the datagram.
            if ulen < 8 || ulen > l3.l4_len {
                return Err(Counter::SkipMalformed);
            }
            let field = u16::from_be_bytes([uh[6], uh[7]]);
            if field == 0 {
                return Err(Counter::SkipUdpChecksumZero);
            }
            L4 {
                len: ulen,
                hdr_len: 8,
                field,
                seq: 0,
                sport: u16::from_be_bytes([uh[0], uh[1]]),
                dport: u16::from_be_bytes([uh[2], uh[3]]),
            }
        };
        if l3.l4_off + l4.len > ctx.len() {
            return Err(Counter::SkipTruncated);
        }
        Ok(l4)
    }

    #[inline(always)]
    fn parse_v4(ctx: &SkBuffContext) -> Result<L3, Counter> {
        let ip: [u8; 20] = ctx.load(0).map_err(|_| Counter::SkipTruncated)?;
        let src = [ip[12], ip[13], ip[14], ip[15]];
        let dst = [ip[16], ip[17], ip[18], ip[19]];
        let peer = *PEERS_V4
            .get(&Key::new(32, src))
            .ok_or(Counter::SkipNotInScope)?;
        if ip[0] >> 4 != 4 {
            return Err(Counter::SkipMalformed);
        }
        let ihl = u32::from(ip[0] & 0x0f) * 4;
        let tot_len = u32::from(u16::from_be_bytes([ip[2], ip[3]]));
        if tot_len == 0 {
            // BIG TCP: an aggregate over 64 KiB carries its length in the skb alone.
            return Err(Counter::SkipAggregated);
        }
        if ihl < 20 || tot_len < ihl {
            return Err(Counter::SkipMalformed);
        }
        // More-fragments flag or a non-zero offset. Reassembled datagrams have both cleared.
        if u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 {
            return Err(Counter::SkipFragment);
        }
        let proto = ip[9];
        if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
            return Err(Counter::SkipOtherProtocol);
        }
        let mut s = [0u8; 16];
        let mut d = [0u8; 16];
        s[..4].copy_from_slice(&src);
        d[..4].copy_from_slice(&dst);
        Ok(L3 {
            family: FAMILY_V4,
            proto,
            l4_off: ihl,
            l4_len: tot_len - ihl,
            peer,
            addr_sum: csum::addr4_sum(src) + csum::addr4_sum(dst),
            src: s,
            dst: d,
        })
    }

    #[inline(always)]
    fn parse_v6(ctx: &SkBuffContext) -> Result<L3, Counter> {
        let ip: [u8; 40] = ctx.load(0).map_err(|_| Counter::SkipTruncated)?;
        let mut src = [0u8; 16];
        let mut dst = [0u8; 16];
        src.copy_from_slice(&ip[8..24]);
        dst.copy_from_slice(&ip[24..40]);
        let peer = *PEERS_V6
            .get(&Key::new(128, src))
            .ok_or(Counter::SkipNotInScope)?;
        if ip[0] >> 4 != 6 {
            return Err(Counter::SkipMalformed);
        }
        let payload_len = u32::from(u16::from_be_bytes([ip[4], ip[5]]));
        if payload_len == 0 {
            // BIG TCP (and RFC 2675 jumbograms): an aggregate over 64 KiB; its length is in the
            // skb (or a hop-by-hop option), and its segments' checksums are gone.
            return Err(Counter::SkipAggregated);
        }
        let end = 40 + payload_len;
        let mut next = ip[6];
        let mut off: u32 = 40;
        let mut found = false;
        for _ in 0..MAX_EXT_HEADERS {
            match next {
                IPPROTO_TCP | IPPROTO_UDP => {
                    found = true;
                    break;
                }
                // Hop-by-hop, routing and destination options share one layout.
                0 | 43 | 60 => {
                    let h: [u8; 2] = ctx.load(off as usize).map_err(|_| Counter::SkipTruncated)?;
                    next = h[0];
                    off += (u32::from(h[1]) + 1) * 8;
                }
                44 => return Err(Counter::SkipFragment),
                // ESP, AH, mobility, HIP, shim6, experimental: not decapsulated or not walkable.
                50 | 51 | 135 | 139 | 140 | 253 | 254 => {
                    return Err(Counter::SkipUnsupportedExtensionHeader);
                }
                _ => return Err(Counter::SkipOtherProtocol),
            }
        }
        if !found {
            return Err(Counter::SkipUnsupportedExtensionHeader);
        }
        if off > end {
            return Err(Counter::SkipMalformed);
        }
        Ok(L3 {
            family: FAMILY_V6,
            proto: next,
            l4_off: off,
            l4_len: end - off,
            peer,
            addr_sum: csum::addr6_sum(src) + csum::addr6_sum(dst),
            src,
            dst,
        })
    }

    /// Copies `n` bytes at `off` into `dst`; the caller keeps `n` within `dst` in a form the
    /// verifier can see.
    #[inline(always)]
    fn load_into(skb: *mut __sk_buff, off: u32, dst: *mut u8, n: u32) -> bool {
        // SAFETY: `dst` has room for `n` bytes (scratch map value or ring-buffer reservation);
        // the helper bounds-checks the skb side and fails cleanly past its end.
        unsafe { bpf_skb_load_bytes(skb.cast::<c_void>(), off, dst.cast::<c_void>(), n) == 0 }
    }

    /// Zeroes the 64 u64 words of the scratch buffer at `$w` with volatile stores.
    macro_rules! seq_macro_zero {
        ($w:ident) => {
            seq_macro_zero!(@ $w; 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23
                24 25 26 27 28 29 30 31 32 33 34 35 36 37 38 39 40 41 42 43 44 45 46 47 48 49 50
                51 52 53 54 55 56 57 58 59 60 61 62 63)
        };
        (@ $w:ident; $($i:literal)*) => {
            $( write_volatile($w.add($i), 0u64); )*
        };
    }
    const _: () = assert!(CHUNK_WORDS == 64);

    /// One per-CPU slot that `opaque` passes values through.
    #[map]
    static OPAQUE: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

    /// `v`, as a value the verifier cannot relate to anything: a round trip through map memory.
    ///
    /// A helper's size argument must be "precise", and the verifier marks precise every value
    /// it was computed from, back to the segment length. A precise length makes the states at
    /// each of the summing loop's up to 128 exits differ, and everything after the loop is
    /// then verified once per exit: that, not the loop, is what exhausts the 1M-instruction
    /// budget. Sizes derived from the length pass through here and are bounded again after.
    #[inline(always)]
    fn opaque(v: u32) -> u32 {
        match OPAQUE.get_ptr_mut(0) {
            // SAFETY: per-CPU slot; the program cannot be re-entered on this CPU.
            Some(p) => unsafe {
                write_volatile(p, v);
                read_volatile(p)
            },
            // Never taken (index 0 exists); a constant keeps this path from depending on `v`.
            None => 1,
        }
    }

    /// Most 512-byte chunks of one segment: 64 KiB.
    const MAX_CHUNKS: u32 = 128;

    /// Memory-domain one's-complement sum of `len` (< 64 KiB) bytes at `off` (see `csum`).
    ///
    /// A bounded loop (Linux 5.3+) over 512-byte chunks whose body is straight-line code: each
    /// chunk is copied with `bpf_skb_load_bytes` into the per-CPU scratch buffer (live payloads
    /// are paged, so most bytes need a copy anyway) and its 128 words are summed unrolled. The
    /// scratch buffer is zeroed before a short last chunk, so its tail needs no masking and an
    /// odd length is zero-padded. With no branch inside a chunk and none of `bpf_loop`'s
    /// callback verification, every kernel's verifier walks each chunk once: about 128 times
    /// the body for a 64 KiB segment, far from the 1M-instruction limit on 5.10 to 7.x alike.
    /// Failure is a `None`, decided outside the sum: comparing the sum with a constant would
    /// mark it precise and defeat state pruning.
    #[inline(always)]
    fn sum_range(skb: *mut __sk_buff, off: u32, len: u32) -> Option<u64> {
        let buf = SCRATCH.get_ptr_mut(0)?;
        let mut even = 0u64;
        let mut odd = 0u64;
        let mut ok = true;
        // Whole chunks: one path per chunk, a constant copy size.
        let mut start = 0u32;
        let mut i = 0u32;
        while i < MAX_CHUNKS && start + CHUNK <= len {
            if !load_into(skb, off + start, buf.cast(), CHUNK) {
                ok = false;
                break;
            }
            sum_chunk(buf, &mut even, &mut odd);
            start += CHUNK;
            i += 1;
        }
        // The last, shorter chunk, over a zeroed buffer so its tail adds nothing.
        if ok && start < len {
            // Volatile stores, written out: LLVM would turn a plain zeroing into a call to
            // `memset`, a byte loop the verifier walks in full.
            // SAFETY: the scratch value is CHUNK_WORDS u64s.
            unsafe {
                let w = buf.cast::<u64>();
                seq_macro_zero!(w);
            }
            // `(n - 1) & 511` + 1 keeps the verifier's view at [1, 512]; LLVM folds a plain
            // bound check into a form the verifier cannot follow. `opaque` keeps the size's
            // precision from reaching `len` (see there).
            let n = ((opaque(len - start) - 1) & (CHUNK - 1)) + 1;
            if load_into(skb, off + start, buf.cast(), n) {
                sum_chunk(buf, &mut even, &mut odd);
            } else {
                ok = false;
            }
        }
        if ok { Some(even + odd) } else { None }
    }

    /// The memory-domain sum of the segment, by the variant's summing loop.
    #[inline(always)]
    fn sum_segment<const BPF_LOOP: bool>(ctx: &SkBuffContext, off: u32, len: u32) -> Option<u64> {
        if BPF_LOOP {
            sum_range_bpf_loop(ctx.as_ptr().cast(), off, len)
        } else {
            sum_range(ctx.as_ptr().cast(), off, len)
        }
    }

    /// State shared with the `bpf_loop` callback; lives on the caller's stack.
    #[repr(C)]
    struct SumCtx {
        skb: *mut __sk_buff,
        even: u64,
        odd: u64,
        off: u32,
        len: u32,
        failed: u32,
    }

    /// As `sum_range`, one `bpf_loop` callback per chunk (5.17+). The callback is straight-line
    /// but for the short-chunk zeroing, so kernels that verify callbacks until their states
    /// converge (7.x walks them as loops) settle after a few rounds.
    #[inline(always)]
    fn sum_range_bpf_loop(skb: *mut __sk_buff, off: u32, len: u32) -> Option<u64> {
        let mut c = SumCtx {
            skb,
            even: 0,
            odd: 0,
            off,
            len,
            failed: 0,
        };
        // SAFETY: the callback matches bpf_loop's contract and `c` outlives the call.
        unsafe {
            bpf_loop(
                len.div_ceil(CHUNK),
                sum_one_chunk as *mut c_void,
                (&raw mut c).cast::<c_void>(),
                0,
            );
        }
        if c.failed != 0 {
            None
        } else {
            Some(c.even + c.odd)
        }
    }

    /// `bpf_loop` callback: adds chunk `index` (512 bytes, or the shorter last one) into the
    /// `SumCtx` accumulators.
    #[inline(never)]
    extern "C" fn sum_one_chunk(index: u64, ctx: *mut c_void) -> i64 {
        // SAFETY: `ctx` is the `SumCtx` that `sum_range_bpf_loop` passed to bpf_loop.
        let st = unsafe { &mut *ctx.cast::<SumCtx>() };
        let start = (index as u32) * CHUNK;
        if start >= st.len {
            return 1;
        }
        let Some(buf) = SCRATCH.get_ptr_mut(0) else {
            st.failed = 1;
            return 1;
        };
        let left = st.len - start;
        if left < CHUNK {
            // SAFETY: the scratch value is CHUNK_WORDS u64s (see `sum_range`).
            unsafe {
                let w = buf.cast::<u64>();
                seq_macro_zero!(w);
            }
        }
        let n = if left > CHUNK { CHUNK } else { left };
        let n = ((opaque(n) - 1) & (CHUNK - 1)) + 1;
        if !load_into(st.skb, st.off + start, buf.cast(), n) {
            st.failed = 1;
            return 1;
        }
        let (mut even, mut odd) = (0u64, 0u64);
        sum_chunk(buf, &mut even, &mut odd);
        st.even += even;
        st.odd += odd;
        0
    }

    /// Sums the 128 words of the scratch buffer into the two accumulators. Eight blocks written
    /// out: a nested loop here is what verifiers refuse as "too complex" on some kernels.
    #[inline(always)]
    fn sum_chunk(buf: *mut [u64; CHUNK_WORDS], even: &mut u64, odd: &mut u64) {
        let words = buf.cast::<u32>();
        // SAFETY: the eight 16-word blocks at 0, 16, .., 112 lie inside the 128-word buffer.
        unsafe {
            sum_block(words, even, odd);
            sum_block(words.add(16), even, odd);
            sum_block(words.add(32), even, odd);
            sum_block(words.add(48), even, odd);
            sum_block(words.add(64), even, odd);
            sum_block(words.add(80), even, odd);
            sum_block(words.add(96), even, odd);
            sum_block(words.add(112), even, odd);
        }
    }

    /// Sums the 16 words of a 64-byte block into two accumulators (two dependency chains, so
    /// the JIT's adds overlap). Volatile reads keep LLVM from hoisting every load of an
    /// unrolled chunk ahead of the adds, which spills past the 512-byte BPF stack.
    #[inline(always)]
    unsafe fn sum_block(p: *const u32, even: &mut u64, odd: &mut u64) {
        // SAFETY: the caller guarantees 64 readable bytes at `p`.
        unsafe {
            *even += u64::from(read_volatile(p));
            *odd += u64::from(read_volatile(p.add(1)));
            *even += u64::from(read_volatile(p.add(2)));
            *odd += u64::from(read_volatile(p.add(3)));
            *even += u64::from(read_volatile(p.add(4)));
            *odd += u64::from(read_volatile(p.add(5)));
            *even += u64::from(read_volatile(p.add(6)));
            *odd += u64::from(read_volatile(p.add(7)));
            *even += u64::from(read_volatile(p.add(8)));
            *odd += u64::from(read_volatile(p.add(9)));
            *even += u64::from(read_volatile(p.add(10)));
            *odd += u64::from(read_volatile(p.add(11)));
            *even += u64::from(read_volatile(p.add(12)));
            *odd += u64::from(read_volatile(p.add(13)));
            *even += u64::from(read_volatile(p.add(14)));
            *odd += u64::from(read_volatile(p.add(15)));
        }
    }

    struct Mismatch {
        sa: Sa,
        residual: u16,
        expected: u16,
        action: u8,
    }

    #[inline(always)]
    fn emit(ctx: &SkBuffContext, l3: &L3, l4: &L4, m: &Mismatch) {
        let Some(mut entry) = EVENTS.reserve::<MismatchEvent>(0) else {
            bump(Counter::EventsLost);
            return;
        };
        let ev = entry.as_mut_ptr();
        // SAFETY: `ev` is an exclusive, aligned ring-buffer reservation of the event's size.
        unsafe {
            (*ev).peer_id = l3.peer.id;
            (*ev).l4_len = l4.len;
            (*ev).seq = l4.seq;
            (*ev).family = l3.family;
            (*ev).proto = l3.proto;
            (*ev).action = m.action;
            (*ev).sport = l4.sport;
            (*ev).dport = l4.dport;
            (*ev).csum_found = l4.field;
            (*ev).csum_expected =
                csum::expected_field(l4.field, m.residual, m.expected, l3.proto == IPPROTO_UDP);
            (*ev).residual = m.residual;
            (*ev).expected_residual = m.expected;
            (*ev).encap_sport = m.sa.sport;
            (*ev).encap_dport = m.sa.dport;
            // Off the verified path: only events name the SA. A read that fails leaves 0.
            (*ev).spi = 0;
            (*ev).reqid = 0;
            if m.sa.state != 0 {
                let l = SECPATH.load();
                (*ev).spi = kread(m.sa.state + u64::from(l.x_spi)).unwrap_or(0);
                (*ev).reqid = kread(m.sa.state + u64::from(l.x_reqid)).unwrap_or(0);
            }
            (*ev).ifindex = skb(ctx).ingress_ifindex;
            (*ev).src = l3.src;
            (*ev).dst = l3.dst;
            (*ev).payload = [0; EVENT_PAYLOAD_LEN];
            (*ev).payload_len = 0;
            let payload_len = l4.len - l4.hdr_len;
            if m.action != ACTION_LEARNING && payload_len > 0 {
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

    /// Copies the packet (from its IP header, up to `CAPTURE_SNAP` bytes) for `--capture`.
    #[inline(always)]
    fn capture(ctx: &SkBuffContext, action: u8) {
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
        // [1, CAPTURE_SNAP] in a form the verifier follows (see `sum_chunk`).
        let n = ((want.wrapping_sub(1)) & (CAPTURE_SNAP as u32 - 1)) + 1;
        // SAFETY: `rec` is an exclusive ring-buffer reservation of the record's size.
        unsafe {
            (*rec).len = len;
            (*rec).ifindex = skb(ctx).ingress_ifindex;
            (*rec).action = action;
            (*rec).pad = [0; 3];
            (*rec).caplen = if load_into(ctx.as_ptr().cast(), 0, (*rec).data.as_mut_ptr(), n) {
                n
            } else {
                0
            };
        }
        entry.submit(0);
    }

    #[cfg(not(test))]
    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }
}
