//! Test packets: Ethernet frames (what `BPF_PROG_TEST_RUN` expects for `cgroup_skb`; the kernel
//! strips the Ethernet header before the program sees offset 0) built with etherparse, plus
//! byte-level surgery for cases etherparse refuses to build (options, extension headers,
//! broken fields).

use std::net::{Ipv4Addr, Ipv6Addr};

use etherparse::{PacketBuilder, TcpOptionElement};

/// Length of the Ethernet header in front of every frame.
pub const ETH: usize = 14;

const MAC_A: [u8; 6] = [2, 0, 0, 0, 0, 1];
const MAC_B: [u8; 6] = [2, 0, 0, 0, 0, 2];

/// Transport of a test packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    /// TCP with the given options.
    Tcp,
    /// TCP carrying MSS, SACK-permitted, timestamps and window scale options.
    TcpWithOptions,
    /// UDP.
    Udp,
    /// An echo reply: ICMP in an IPv4 frame, `ICMPv6` in an IPv6 one.
    IcmpEchoReply,
    /// SCTP: one DATA chunk carrying the data (padded to 4 bytes), verification tag
    /// `SCTP_VTAG`, and a correct CRC32c.
    Sctp,
}

/// The verification tag of `L4::Sctp` packets.
pub const SCTP_VTAG: u32 = 0x4e41_0007;

/// An SCTP packet (RFC 9260) from port 40002 to 3868: the common header, then one DATA chunk
/// with `data`, padded to a multiple of 4 bytes; its CRC32c stored as the kernel stores it
/// (`sctp_compute_cksum`: little-endian).
#[must_use]
pub fn sctp_packet(data: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(28 + data.len() + 3);
    p.extend_from_slice(&40002u16.to_be_bytes());
    p.extend_from_slice(&3868u16.to_be_bytes());
    p.extend_from_slice(&SCTP_VTAG.to_be_bytes());
    p.extend_from_slice(&[0; 4]);
    let chunk_len = u16::try_from(16 + data.len()).expect("one chunk");
    // DATA, unfragmented (B and E bits), its length, TSN, stream 1, sequence 7, PPID 46.
    p.extend_from_slice(&[0, 0x03]);
    p.extend_from_slice(&chunk_len.to_be_bytes());
    p.extend_from_slice(&0x1000_0001u32.to_be_bytes());
    p.extend_from_slice(&[0, 1, 0, 7]);
    p.extend_from_slice(&46u32.to_be_bytes());
    p.extend_from_slice(data);
    p.resize(p.len().next_multiple_of(4), 0);
    let crc = monitor_ebpf::crc32c::crc32c(&p);
    p[8..12].copy_from_slice(&crc.to_le_bytes());
    p
}

/// A deterministic payload of `n` bytes.
#[must_use]
pub fn payload(n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| (i.wrapping_mul(31) ^ (i >> 8)) as u8)
        .collect()
}

/// An IPv4 frame from `src` to `dst` with a correct L4 checksum.
#[must_use]
pub fn v4(src: Ipv4Addr, dst: Ipv4Addr, l4: L4, data: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(MAC_A, MAC_B).ipv4(src.octets(), dst.octets(), 64);
    finish(b, l4, data, false)
}

/// An IPv6 frame from `src` to `dst` with a correct L4 checksum.
#[must_use]
pub fn v6(src: Ipv6Addr, dst: Ipv6Addr, l4: L4, data: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(MAC_A, MAC_B).ipv6(src.octets(), dst.octets(), 64);
    finish(b, l4, data, true)
}

fn finish(
    b: etherparse::PacketBuilderStep<etherparse::IpHeaders>,
    l4: L4,
    data: &[u8],
    v6: bool,
) -> Vec<u8> {
    let mut out = Vec::new();
    match l4 {
        L4::IcmpEchoReply if v6 => b.icmpv6_echo_reply(0x4e41, 7).write(&mut out, data),
        L4::IcmpEchoReply => b.icmpv4_echo_reply(0x4e41, 7).write(&mut out, data),
        L4::Tcp => b
            .tcp(40000, 2181, 0x0102_0304, 64240)
            .ack(99)
            .write(&mut out, data),
        L4::TcpWithOptions => b
            .tcp(40000, 2181, 0x0102_0304, 64240)
            .ack(99)
            .options(&[
                TcpOptionElement::MaximumSegmentSize(1460),
                TcpOptionElement::SelectiveAcknowledgementPermitted,
                TcpOptionElement::Timestamp(0x1122_3344, 0x5566_7788),
                TcpOptionElement::Noop,
                TcpOptionElement::WindowScale(7),
            ])
            .expect("options fit")
            .write(&mut out, data),
        L4::Udp => b.udp(40001, 53).write(&mut out, data),
        L4::Sctp => b.write(&mut out, etherparse::IpNumber::SCTP, &sctp_packet(data)),
    }
    .expect("etherparse builds the frame");
    out
}

/// Offset of the L4 header in a frame built by `v4`/`v6` (no options).
#[must_use]
pub fn l4_offset(frame: &[u8]) -> usize {
    if frame[12..14] == [0x08, 0x00] {
        ETH + usize::from(frame[ETH] & 0x0f) * 4
    } else {
        ETH + 40
    }
}

/// Inserts `opts` (a multiple of 4 bytes) as IPv4 options, fixing IHL and total length. The L4
/// checksum is unaffected: IP options are not part of the pseudo-header.
#[must_use]
pub fn with_ipv4_options(mut frame: Vec<u8>, opts: &[u8]) -> Vec<u8> {
    assert_eq!(opts.len() % 4, 0);
    let ihl = usize::from(frame[ETH] & 0x0f) * 4;
    frame.splice(ETH + ihl..ETH + ihl, opts.iter().copied());
    frame[ETH] = 0x40 | ((ihl + opts.len()) / 4) as u8;
    let tot = u16::from_be_bytes([frame[ETH + 2], frame[ETH + 3]]) + opts.len() as u16;
    frame[ETH + 2..ETH + 4].copy_from_slice(&tot.to_be_bytes());
    frame
}

/// Inserts one IPv6 extension header of type `kind` (8 bytes) right after the fixed header.
/// The upper-layer length in the pseudo-header excludes it, so the L4 checksum still holds.
#[must_use]
pub fn with_ipv6_ext(mut frame: Vec<u8>, kind: u8) -> Vec<u8> {
    let next = frame[ETH + 6];
    let ext: [u8; 8] = match kind {
        // Fragment header: offset 0, M=1.
        44 => [next, 0, 0, 1, 0, 0, 0, 42],
        // Hop-by-hop / destination options / routing: PadN filling 6 bytes.
        _ => [next, 0, 1, 4, 0, 0, 0, 0],
    };
    frame.splice(ETH + 40..ETH + 40, ext);
    frame[ETH + 6] = kind;
    let plen = u16::from_be_bytes([frame[ETH + 4], frame[ETH + 5]]) + 8;
    frame[ETH + 4..ETH + 6].copy_from_slice(&plen.to_be_bytes());
    frame
}
