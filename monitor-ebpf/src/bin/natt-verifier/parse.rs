//! The IP and L4 headers, each checked against the lengths the one before gave. Every failure
//! is a skip reason.

use aya_ebpf::{
    EbpfContext as _, bindings::__sk_buff, maps::lpm_trie::Key, programs::SkBuffContext,
};
use monitor_ebpf::{
    Counter, Family, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP,
    PeerValue, csum,
};

use crate::maps::{PEERS_V4, PEERS_V6};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
/// IPv6 extension headers walked before giving up; a seventh is `unsupported`.
const MAX_EXT_HEADERS: usize = 6;

/// What the IP layer told us about the L4 segment.
pub struct L3 {
    pub family: Family,
    pub proto: u8,
    pub l4_off: u32,
    /// L4 length from the IP header (may exceed the skb when UDP trimmed it).
    pub l4_len: u32,
    pub peer: PeerValue,
    pub addr_sum: u64,
    pub src: [u8; 16],
    pub dst: [u8; 16],
}

/// What the L4 header says. ICMP has no ports: `sport` carries its type, `dport` its code and
/// `seq` the rest of its header (an echo's identifier and sequence number).
pub struct L4 {
    /// Segment length (UDP: its own length field, which `udp_rcv` trimmed the skb to).
    pub len: u32,
    pub hdr_len: u32,
    pub field: u16,
    pub seq: u32,
    pub sport: u16,
    pub dport: u16,
}

#[inline(always)]
pub fn skb(ctx: &SkBuffContext) -> &__sk_buff {
    // SAFETY: the kernel hands the program a valid `__sk_buff` for its whole run.
    unsafe { &*ctx.as_ptr().cast::<__sk_buff>() }
}

/// `T` (a header) at `off` from the IP header: read in place when the linear area holds it,
/// which it does for every header on the live path (the IP and L4 layers pulled them before the
/// socket filter runs), else copied with `bpf_skb_load_bytes`. Reading in place saves a helper
/// call per header, a sizeable share of a segment's fixed cost.
#[inline(always)]
fn header<T: Copy>(ctx: &SkBuffContext, off: u32) -> Result<T, Counter> {
    // Bounded for the verifier's packet-pointer arithmetic; past it (an IPv6 extension-header
    // chain over 16 KiB) the copy decides.
    if off < 0x4000 {
        let at = ctx.data() + off as usize;
        if at + size_of::<T>() <= ctx.data_end() {
            // SAFETY: the verifier-checked range [at, at + size_of::<T>()) lies in the packet.
            return Ok(unsafe { core::ptr::read_unaligned(at as *const T) });
        }
    }
    ctx.load(off as usize).map_err(|_| Counter::SkipTruncated)
}

/// The IP header of either family, and the peer its source address falls under. `ICMPv6` only
/// with `ICMP` (the `bpf_loop` variant): the bounded-loop variant meets it as
/// `other_protocol` in the extension-header walk, so that its code stays what 5.10's verifier
/// accepts (one more way out of the walk took it past 1,000,000 instructions). SCTP only with
/// `SCTP` (`natt_sctp`): the verifier programs meet it as `other_protocol` and hand it over,
/// so that their code and their verification cost stay what they were (an SCTP way out of
/// the walk took 6.1's verifier from 316,193 to 862,750 instructions).
#[inline(always)]
pub fn parse_l3<const ICMP: bool, const SCTP: bool>(ctx: &SkBuffContext) -> Result<L3, Counter> {
    if skb(ctx).gso_segs > 1 {
        // GRO merged several segments behind one header: their checksums are gone.
        return Err(Counter::SkipAggregated);
    }
    let proto = skb(ctx).protocol;
    if proto == u32::from(ETH_P_IP.to_be()) {
        parse_v4::<SCTP>(ctx)
    } else if proto == u32::from(ETH_P_IPV6.to_be()) {
        parse_v6::<ICMP, SCTP>(ctx)
    } else {
        Err(Counter::SkipOtherProtocol)
    }
}

#[inline(always)]
fn parse_v4<const SCTP: bool>(ctx: &SkBuffContext) -> Result<L3, Counter> {
    let ip: [u8; 20] = header(ctx, 0)?;
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
    if proto != IPPROTO_TCP
        && proto != IPPROTO_UDP
        && proto != IPPROTO_ICMP
        && !(SCTP && proto == IPPROTO_SCTP)
    {
        return Err(Counter::SkipOtherProtocol);
    }
    let mut s = [0u8; 16];
    let mut d = [0u8; 16];
    s[..4].copy_from_slice(&src);
    d[..4].copy_from_slice(&dst);
    Ok(L3 {
        family: Family::V4,
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
fn parse_v6<const ICMP: bool, const SCTP: bool>(ctx: &SkBuffContext) -> Result<L3, Counter> {
    let ip: [u8; 40] = header(ctx, 0)?;
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
    let (proto, off) = walk_extension_headers::<ICMP, SCTP>(ctx, ip[6])?;
    if off > end {
        return Err(Counter::SkipMalformed);
    }
    Ok(L3 {
        family: Family::V6,
        proto,
        l4_off: off,
        l4_len: end - off,
        peer,
        addr_sum: csum::addr6_sum(src) + csum::addr6_sum(dst),
        src,
        dst,
    })
}

/// Follows IPv6 extension headers from `next` (the fixed header's next-header field) to TCP,
/// UDP, (with `ICMP`) `ICMPv6` or (with `SCTP`) SCTP; returns the L4 protocol and its offset.
#[inline(always)]
fn walk_extension_headers<const ICMP: bool, const SCTP: bool>(
    ctx: &SkBuffContext,
    mut next: u8,
) -> Result<(u8, u32), Counter> {
    let mut off: u32 = 40;
    // Each round reads one header: up to MAX_EXT_HEADERS extension headers, then the transport.
    for _ in 0..=MAX_EXT_HEADERS {
        match next {
            IPPROTO_TCP | IPPROTO_UDP => return Ok((next, off)),
            IPPROTO_ICMPV6 if ICMP => return Ok((next, off)),
            IPPROTO_SCTP if SCTP => return Ok((next, off)),
            // Hop-by-hop, routing and destination options share one layout.
            0 | 43 | 60 => {
                let h: [u8; 2] = header(ctx, off)?;
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
    Err(Counter::SkipUnsupportedExtensionHeader)
}

/// The TCP, UDP, ICMP or `ICMPv6` header (the two ICMPs share its layout), checked against
/// the lengths the IP header gave. ICMP only with `ICMP` (the `bpf_loop` variant): the
/// bounded-loop variant's caller has turned ICMP away, and a third arm here would be a third
/// family of states through its summing loop for the kernel verifier (past 5.10's budget),
/// since it cannot tell that no ICMP is left.
#[inline(always)]
pub fn parse_l4<const ICMP: bool>(ctx: &SkBuffContext, l3: &L3) -> Result<L4, Counter> {
    let l4 = match l3.proto {
        IPPROTO_TCP => parse_tcp(ctx, l3)?,
        IPPROTO_UDP => parse_udp(ctx, l3)?,
        _ if ICMP => parse_icmp(ctx, l3)?,
        _ => parse_udp(ctx, l3)?,
    };
    if l3.l4_off + l4.len > ctx.len() {
        return Err(Counter::SkipTruncated);
    }
    Ok(l4)
}

#[inline(always)]
fn parse_tcp(ctx: &SkBuffContext, l3: &L3) -> Result<L4, Counter> {
    if l3.l4_len < 20 {
        return Err(Counter::SkipMalformed);
    }
    let th: [u8; 20] = header(ctx, l3.l4_off)?;
    let doff = u32::from(th[12] >> 4) * 4;
    if doff < 20 || doff > l3.l4_len {
        return Err(Counter::SkipMalformed);
    }
    Ok(L4 {
        len: l3.l4_len,
        hdr_len: doff,
        field: u16::from_be_bytes([th[16], th[17]]),
        seq: u32::from_be_bytes([th[4], th[5], th[6], th[7]]),
        sport: u16::from_be_bytes([th[0], th[1]]),
        dport: u16::from_be_bytes([th[2], th[3]]),
    })
}

#[inline(always)]
fn parse_udp(ctx: &SkBuffContext, l3: &L3) -> Result<L4, Counter> {
    if l3.l4_len < 8 {
        return Err(Counter::SkipMalformed);
    }
    let uh: [u8; 8] = header(ctx, l3.l4_off)?;
    let ulen = u32::from(u16::from_be_bytes([uh[4], uh[5]]));
    // udp_rcv trims the skb to the UDP length before the socket filter runs, so the UDP
    // length, not the IP length, bounds the datagram.
    if ulen < 8 || ulen > l3.l4_len {
        return Err(Counter::SkipMalformed);
    }
    let field = u16::from_be_bytes([uh[6], uh[7]]);
    if field == 0 {
        return Err(Counter::SkipUdpChecksumZero);
    }
    Ok(L4 {
        len: ulen,
        hdr_len: 8,
        field,
        seq: 0,
        sport: u16::from_be_bytes([uh[0], uh[1]]),
        dport: u16::from_be_bytes([uh[2], uh[3]]),
    })
}

/// An ICMP (IPv4) header: its checksum covers the whole message, which the IP length bounds.
#[inline(always)]
fn parse_icmp(ctx: &SkBuffContext, l3: &L3) -> Result<L4, Counter> {
    if l3.l4_len < 8 {
        return Err(Counter::SkipMalformed);
    }
    let ih: [u8; 8] = header(ctx, l3.l4_off)?;
    Ok(L4 {
        len: l3.l4_len,
        hdr_len: 8,
        field: u16::from_be_bytes([ih[2], ih[3]]),
        seq: u32::from_be_bytes([ih[4], ih[5], ih[6], ih[7]]),
        sport: u16::from(ih[0]),
        dport: u16::from(ih[1]),
    })
}

/// An SCTP common header: ports, verification tag (`seq`) and the CRC32c, which covers the
/// whole packet, as the IP length bounds it. `field` is unused: the CRC is 32 bits wide.
#[inline(always)]
pub fn parse_sctp(ctx: &SkBuffContext, l3: &L3) -> Result<(L4, u32), Counter> {
    if l3.l4_len < 12 {
        return Err(Counter::SkipMalformed);
    }
    let sh: [u8; 12] = header(ctx, l3.l4_off)?;
    if l3.l4_off + l3.l4_len > ctx.len() {
        return Err(Counter::SkipTruncated);
    }
    let l4 = L4 {
        len: l3.l4_len,
        hdr_len: 12,
        field: 0,
        seq: u32::from_be_bytes([sh[4], sh[5], sh[6], sh[7]]),
        sport: u16::from_be_bytes([sh[0], sh[1]]),
        dport: u16::from_be_bytes([sh[2], sh[3]]),
    };
    // The kernel stores the CRC as a little-endian word (`sctp_compute_cksum`).
    Ok((l4, u32::from_le_bytes([sh[8], sh[9], sh[10], sh[11]])))
}
