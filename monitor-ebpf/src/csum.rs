//! One's-complement (RFC 1071) checksum arithmetic shared by the verifier and userspace.
//!
//! Two value domains appear here, and mixing them is the classic checksum bug:
//! - the *memory* domain: 16/32-bit words loaded from packet bytes in native byte order. The
//!   verifier sums packets this way because it is free (no byte swaps per word); RFC 1071 §2(B)
//!   shows the folded sum is the byte-swapped numeric sum, so it stays exact.
//! - the *numeric* domain: the value a human reads from a header field as a big-endian number.
//!   Everything that leaves this module (residuals, checksum fields in events) is numeric.
//!
//! The *residual* of a segment is `!fold(sum)` over the pseudo-header built from the observed
//! addresses, the L4 header including its checksum field, and the payload. An intact segment
//! that no NAT touched leaves 0; behind a NAT it leaves the constant `nat_residual`.

/// Folds a 64-bit accumulator of 32-bit words to a 16-bit one's-complement sum.
#[inline]
#[must_use]
pub const fn fold(acc: u64) -> u16 {
    let s = (acc & 0xffff_ffff) + (acc >> 32);
    let s = (s & 0xffff_ffff) + (s >> 32);
    let s = (s & 0xffff) + (s >> 16);
    let s = (s & 0xffff) + (s >> 16);
    let s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// One's-complement addition of two 16-bit values.
#[inline]
#[must_use]
pub const fn add(a: u16, b: u16) -> u16 {
    let s = a as u32 + b as u32;
    ((s & 0xffff) + (s >> 16)) as u16
}

/// One's-complement subtraction `a - b`.
#[inline]
#[must_use]
pub const fn sub(a: u16, b: u16) -> u16 {
    add(a, !b)
}

/// Maps one's-complement "negative zero" (0xffff) to 0, so residuals compare with `==`.
#[inline]
#[must_use]
pub const fn normalize(r: u16) -> u16 {
    if r == 0xffff { 0 } else { r }
}

/// Converts between the memory and numeric domains (the operation is its own inverse).
#[inline]
#[must_use]
pub const fn mem16(v: u16) -> u16 {
    u16::from_ne_bytes(v.to_be_bytes())
}

/// Memory-domain contribution of a network-order 32-bit value (e.g. the IPv6 upper-layer
/// length).
#[inline]
#[must_use]
pub const fn mem32(v: u32) -> u32 {
    u32::from_ne_bytes(v.to_be_bytes())
}

/// Memory-domain sum of four address bytes.
#[inline]
#[must_use]
pub const fn addr4_sum(a: [u8; 4]) -> u64 {
    u32::from_ne_bytes(a) as u64
}

/// Memory-domain sum of sixteen address bytes.
#[inline]
#[must_use]
pub const fn addr6_sum(a: [u8; 16]) -> u64 {
    u32::from_ne_bytes([a[0], a[1], a[2], a[3]]) as u64
        + u32::from_ne_bytes([a[4], a[5], a[6], a[7]]) as u64
        + u32::from_ne_bytes([a[8], a[9], a[10], a[11]]) as u64
        + u32::from_ne_bytes([a[12], a[13], a[14], a[15]]) as u64
}

/// Memory-domain sum of the protocol and length words of a pseudo-header (RFC 793 / RFC 8200
/// §8.1). Both families reduce to the same one's-complement value.
#[inline]
#[must_use]
pub const fn proto_len_sum(proto: u8, l4_len: u32) -> u64 {
    mem16(proto as u16) as u64 + mem32(l4_len) as u64
}

/// Residual (numeric domain, normalised) left by a memory-domain accumulator that covers the
/// pseudo-header, the L4 header with its checksum field, and the payload.
#[inline]
#[must_use]
pub const fn residual(acc: u64) -> u16 {
    normalize(mem16(!fold(acc)))
}

/// The checksum field (numeric domain, normalised) of a `CHECKSUM_PARTIAL` segment: before a
/// device or loopback fills it in, it holds the folded pseudo-header sum, not complemented
/// (`~tcp_v4_check(len, saddr, daddr, 0)` in the kernel). `pseudo_acc` is the memory-domain sum
/// of the pseudo-header alone.
#[inline]
#[must_use]
pub const fn partial_field(pseudo_acc: u64) -> u16 {
    normalize(mem16(fold(pseudo_acc)))
}

/// Residual an intact segment leaves when a NAT rewrote its addresses: the sender summed
/// `orig_*`, we sum `seen_*`. Inputs are memory-domain address sums (`addr4_sum`/`addr6_sum`).
#[must_use]
pub const fn nat_residual(orig_src: u64, orig_dst: u64, seen_src: u64, seen_dst: u64) -> u16 {
    let orig = mem16(fold(orig_src + orig_dst));
    let seen = mem16(fold(seen_src + seen_dst));
    normalize(sub(orig, seen))
}

/// The checksum field an intact segment with the same bytes would carry, given the field that
/// arrived, the residual the segment left, and the residual the peer's intact segments leave.
/// All numeric domain. UDP transmits a computed zero as 0xffff (RFC 768), TCP never sends 0xffff.
#[inline]
#[must_use]
pub const fn expected_field(found: u16, residual: u16, expected_residual: u16, udp: bool) -> u16 {
    let f = add(found, sub(residual, expected_residual));
    if udp {
        if f == 0 { 0xffff } else { f }
    } else {
        normalize(f)
    }
}

/// Memory-domain sum of a byte slice, zero-padding an odd tail. Userspace and tests use it; the
/// verifier sums packet chunks with the same word convention.
#[must_use]
pub fn sum_bytes(data: &[u8]) -> u64 {
    let mut acc = 0u64;
    let (words, rest) = data.as_chunks::<4>();
    for w in words {
        acc += u64::from(u32::from_ne_bytes(*w));
    }
    let mut last = [0u8; 4];
    last[..rest.len()].copy_from_slice(rest);
    acc + u64::from(u32::from_ne_bytes(last))
}

#[cfg(test)]
mod tests {
    use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn partial_field_is_the_uncomplemented_pseudo_header_sum() {
        // 127.0.0.1 -> 127.0.0.1, TCP, 40 bytes: 0x7f00 + 0x0001 + 0x7f00 + 0x0001 + 0x0006 +
        // 0x0028 = 0xfe30, by hand.
        let lo = addr4_sum([127, 0, 0, 1]);
        assert_eq!(partial_field(lo + lo + proto_len_sum(6, 40)), 0xfe30);
        // A carry out of the top folds back in: 0xffff + 0x0002 -> 0x0002.
        let v6 = addr6_sum([0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(partial_field(v6 + proto_len_sum(0, 2)), 0x0002);
    }

    /// Residual of a whole IP packet (no options or extension headers) computed with this
    /// module straight from fixed offsets, so damaged length fields cannot confuse it.
    fn residual_of(pkt: &[u8], v6: bool, udp: bool) -> u16 {
        let (mut acc, l3) = if v6 {
            let a: [u8; 16] = pkt[8..24].try_into().unwrap();
            let b: [u8; 16] = pkt[24..40].try_into().unwrap();
            (addr6_sum(a) + addr6_sum(b), 40)
        } else {
            let a: [u8; 4] = pkt[12..16].try_into().unwrap();
            let b: [u8; 4] = pkt[16..20].try_into().unwrap();
            (addr4_sum(a) + addr4_sum(b), 20)
        };
        let proto = if udp {
            crate::IPPROTO_UDP
        } else {
            crate::IPPROTO_TCP
        };
        let l4 = &pkt[l3..];
        acc += proto_len_sum(proto, l4.len() as u32) + sum_bytes(l4);
        residual(acc)
    }

    fn field_of(pkt: &[u8], v6: bool, udp: bool) -> u16 {
        let off = if v6 { 40 } else { 20 } + if udp { 6 } else { 16 };
        u16::from_be_bytes([pkt[off], pkt[off + 1]])
    }

    fn build(v6: bool, udp: bool, src: [u8; 16], dst: [u8; 16], payload: &[u8]) -> Vec<u8> {
        let b = if v6 {
            PacketBuilder::ipv6(src, dst, 64)
        } else {
            PacketBuilder::ipv4(
                [src[0], src[1], src[2], src[3]],
                [dst[0], dst[1], dst[2], dst[3]],
                64,
            )
        };
        let mut out = Vec::new();
        if udp {
            let b = b.udp(4500, 53);
            b.write(&mut out, payload).unwrap();
        } else {
            let b = b.tcp(40000, 2181, 0x1234_5678, 65000).ack(7);
            b.write(&mut out, payload).unwrap();
        }
        out
    }

    #[test]
    fn fold_handles_carries() {
        assert_eq!(fold(0), 0);
        assert_eq!(fold(0xffff), 0xffff);
        assert_eq!(fold(0x1_0000), 1);
        assert_eq!(fold(0xffff_ffff_ffff_ffff), 0xffff);
        assert_eq!(fold(0x0001_0000_0000_0000), 1);
    }

    #[test]
    fn expected_field_normalises_per_protocol() {
        // Residual equal to expectation: the field stands as found.
        assert_eq!(expected_field(0x1234, 7, 7, false), 0x1234);
        // Moving the residual by +1 moves the field by +1.
        assert_eq!(expected_field(0x1234, 8, 7, false), 0x1235);
        // TCP never carries 0xffff; UDP never carries 0.
        assert_eq!(expected_field(0xfffe, 1, 0, false), 0);
        assert_eq!(expected_field(0xfffe, 1, 0, true), 0xffff);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// An intact segment leaves residual 0, and our sum agrees with etherparse's
        /// independent checksum.
        #[test]
        fn intact_segments_leave_zero(v6: bool, udp: bool, src: [u8; 16], dst: [u8; 16],
                                      payload in proptest::collection::vec(any::<u8>(), 0..3000)) {
            let pkt = build(v6, udp, src, dst, &payload);
            let r = residual_of(&pkt, v6, udp);
            let field = field_of(&pkt, v6, udp);
            prop_assert_eq!(r, 0);
            // Recompute the field from our arithmetic with the field zeroed out.
            let sliced = SlicedPacket::from_ip(&pkt).unwrap();
            let ours = match sliced.transport.unwrap() {
                TransportSlice::Tcp(t) => {
                    let h = t.to_header();
                    let oracle = if v6 {
                        h.calc_checksum_ipv6_raw(src, dst, t.payload()).unwrap()
                    } else {
                        h.calc_checksum_ipv4_raw(
                            [src[0], src[1], src[2], src[3]], [dst[0], dst[1], dst[2], dst[3]],
                            t.payload()).unwrap()
                    };
                    prop_assert_eq!(oracle, field);
                    expected_field(field, r, 0, false)
                }
                TransportSlice::Udp(u) => {
                    let h = u.to_header();
                    let oracle = if v6 {
                        h.calc_checksum_ipv6_raw(src, dst, u.payload()).unwrap()
                    } else {
                        h.calc_checksum_ipv4_raw(
                            [src[0], src[1], src[2], src[3]], [dst[0], dst[1], dst[2], dst[3]],
                            u.payload()).unwrap()
                    };
                    prop_assert_eq!(oracle, field);
                    expected_field(field, r, 0, true)
                }
                _ => unreachable!(),
            };
            prop_assert_eq!(ours, field);
        }

        /// Any single-byte change anywhere in the L4 segment moves the residual off 0, and the
        /// expected field computed from the damaged segment is the original field whenever the
        /// damage hit the checksum field itself.
        #[test]
        fn single_byte_corruption_is_detected(v6: bool, udp: bool, src: [u8; 16], dst: [u8; 16],
                                              payload in proptest::collection::vec(any::<u8>(), 1..2000),
                                              pos: prop::sample::Index, flip in 1u8..=255) {
            let mut pkt = build(v6, udp, src, dst, &payload);
            let l3 = if v6 { 40 } else { 20 };
            let i = l3 + pos.index(pkt.len() - l3);
            pkt[i] ^= flip;
            prop_assert_ne!(residual_of(&pkt, v6, udp), 0);
        }

        /// Behind a NAT the residual of an intact segment is exactly `nat_residual`.
        #[test]
        fn nat_residual_matches_rewritten_segments(v6: bool, udp: bool,
                                                   orig_src: [u8; 16], orig_dst: [u8; 16],
                                                   seen_src: [u8; 16], seen_dst: [u8; 16],
                                                   payload in proptest::collection::vec(any::<u8>(), 0..1500)) {
            let mut pkt = build(v6, udp, orig_src, orig_dst, &payload);
            // Rewrite addresses as a NAT would, but leave the L4 checksum alone (as ESP-in-UDP
            // NAT traversal does: the inner checksum is invisible to the NAT).
            let expected = if v6 {
                pkt[8..24].copy_from_slice(&seen_src);
                pkt[24..40].copy_from_slice(&seen_dst);
                nat_residual(addr6_sum(orig_src), addr6_sum(orig_dst), addr6_sum(seen_src), addr6_sum(seen_dst))
            } else {
                pkt[12..16].copy_from_slice(&seen_src[..4]);
                pkt[16..20].copy_from_slice(&seen_dst[..4]);
                let os = [orig_src[0], orig_src[1], orig_src[2], orig_src[3]];
                let od = [orig_dst[0], orig_dst[1], orig_dst[2], orig_dst[3]];
                let ss = [seen_src[0], seen_src[1], seen_src[2], seen_src[3]];
                let sd = [seen_dst[0], seen_dst[1], seen_dst[2], seen_dst[3]];
                nat_residual(addr4_sum(os), addr4_sum(od), addr4_sum(ss), addr4_sum(sd))
            };
            prop_assert_eq!(residual_of(&pkt, v6, udp), expected);
        }
    }
}
