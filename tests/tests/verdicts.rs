//! The verifier's verdicts through `BPF_PROG_TEST_RUN` (root only): intact TCP, UDP, ICMP and
//! SCTP verified, every changed byte a mismatch, and what a mismatch event carries. Every case
//! asserts the verdict and the exact change of every counter.

use std::net::Ipv6Addr;

use monitor_ebpf::{Counter, Proto, SaKey, csum};
use natt_monitor::{ebpf::Variant, peers::Mode, scope::Scope};
use natt_monitor_tests::{
    packets::{ETH, L4, l4_offset, payload, v4, v6},
    skip_unless_root,
    testrun::*,
};

#[test]
fn intact_segments_are_verified() {
    if skip_unless_root("intact_segments_are_verified") {
        return;
    }
    for variant in [Variant::BpfLoop, Variant::BoundedLoop] {
        intact_segments_are_verified_by(&mut Harness::with(&Scope::Address, Some(variant)));
    }
}

fn intact_segments_are_verified_by(h: &mut Harness) {
    // Around the 64-byte blocks and the 2 KiB chunks of the sum: with TCP's 20-byte header a
    // 2028-byte payload is one whole chunk, with UDP's 8-byte one 2040. (Test-run frames stop
    // short of a page; segments of several chunks are netns.rs's 64 KiB test.)
    for n in [
        0usize, 1, 2, 3, 63, 64, 65, 511, 512, 513, 1000, 1001, 1448, 2027, 2028, 2029, 2040, 3000,
    ] {
        let data = payload(n);
        for (l4, proto) in [
            (L4::Tcp, Proto::Tcp as usize),
            (L4::TcpWithOptions, Proto::Tcp as usize),
            (L4::Udp, Proto::Udp as usize),
        ] {
            let f = v4(V4_OBSERVE, LOCAL4, l4, &data);
            assert_eq!(
                h.run(&f),
                Outcome::verified(P_V4_OBSERVE, proto, l4_len(&f)),
                "v4 {l4:?} payload {n}"
            );
            let f = v6(V6_OBSERVE, LOCAL6, l4, &data);
            assert_eq!(
                h.run(&f),
                Outcome::verified(P_V6_OBSERVE, proto, l4_len(&f)),
                "v6 {l4:?} payload {n}"
            );
            let f = v4(V4_ENFORCE, LOCAL4, l4, &data);
            assert_eq!(
                h.run(&f),
                Outcome::verified(P_V4_ENFORCE, proto, l4_len(&f)),
                "v4 enforce {l4:?} payload {n}"
            );
        }
    }
}

#[test]
fn every_single_byte_corruption_of_a_1400_byte_segment_is_detected() {
    if skip_unless_root("every_single_byte_corruption_of_a_1400_byte_segment_is_detected") {
        return;
    }
    for variant in [Variant::BpfLoop, Variant::BoundedLoop] {
        every_single_byte_corruption_is_detected_by(&mut Harness::with(
            &Scope::Address,
            Some(variant),
        ));
    }
}

fn every_single_byte_corruption_is_detected_by(h: &mut Harness) {
    for (src, peer, dropped) in [
        (V4_OBSERVE, P_V4_OBSERVE, false),
        (V4_ENFORCE, P_V4_ENFORCE, true),
    ] {
        let clean = v4(src, LOCAL4, L4::Tcp, &payload(1400 - 20));
        let off = l4_offset(&clean);
        assert_eq!(clean.len() - off, 1400);
        for pos in off..clean.len() {
            let mut f = clean.clone();
            // Flip the lowest bit: at the data-offset byte that is a reserved bit, so every
            // position stays a well-formed segment whose only fault is its checksum.
            f[pos] ^= 0x01;
            assert_eq!(
                h.run(&f),
                Outcome::mismatch(peer, Proto::Tcp as usize, dropped),
                "byte {} of the segment",
                pos - off
            );
        }
    }
    // Same for IPv6 UDP, with a different flip and odd-length payload.
    let clean = v6(V6_ENFORCE, LOCAL6, L4::Udp, &payload(1399 - 8));
    let off = l4_offset(&clean);
    for pos in off..clean.len() {
        if (pos - off) == 4 || (pos - off) == 5 {
            continue; // UDP length: changing it makes the datagram malformed (tested below).
        }
        let mut f = clean.clone();
        f[pos] ^= 0xa5;
        assert_eq!(
            h.run(&f),
            Outcome::mismatch(P_V6_ENFORCE, Proto::Udp as usize, true),
            "byte {} of the datagram",
            pos - off
        );
    }
}

/// ICMP (IPv4) is verified against residual 0 whatever the peer's NAT residual (it has no
/// pseudo-header), at every length around the sum's blocks and chunks; every changed byte of a
/// message is a mismatch, dropped in enforce mode, and its event names type, code and echo id.
/// The bounded-loop variant counts it as `other_protocol`.
#[test]
fn icmp_is_verified_against_residual_zero_and_every_changed_byte_is_a_mismatch() {
    if skip_unless_root(
        "icmp_is_verified_against_residual_zero_and_every_changed_byte_is_a_mismatch",
    ) {
        return;
    }
    // The bounded-loop variant (kernels before 5.17) leaves ICMP alone: verifying it there too
    // takes 5.10's verifier past its instruction budget.
    let compat = &mut Harness::with(&Scope::Address, Some(Variant::BoundedLoop));
    for f in [
        v4(V4_OBSERVE, LOCAL4, L4::IcmpEchoReply, &payload(64)),
        v4(V4_ENFORCE, LOCAL4, L4::IcmpEchoReply, &payload(1472)),
    ] {
        assert_eq!(compat.run(&f), Outcome::skipped(Counter::SkipOtherProtocol));
    }
    {
        let variant = Variant::BpfLoop;
        let h = &mut Harness::with(&Scope::Address, Some(variant));
        let off = echo_replies_verify(
            h,
            |src, n| v4(src, LOCAL4, L4::IcmpEchoReply, &payload(n)),
            &[
                (V4_OBSERVE, P_V4_OBSERVE),
                (V4_ENFORCE, P_V4_ENFORCE),
                (V4_NAT_SEEN, P_V4_NAT),
            ],
            "192.0.2.10 -> 192.168.1.1 type 0 code 0",
        );
        // Shorter than an ICMP header.
        let mut f = v4(V4_ENFORCE, LOCAL4, L4::IcmpEchoReply, &[]);
        f.truncate(off + 4);
        f[ETH + 3] = 24;
        assert_eq!(h.run(&f), Outcome::skipped(Counter::SkipMalformed));
    }
}

/// Echo replies (`echo(src, payload bytes)`) of every length around the sum's blocks and
/// chunks, from each of `peers` (the first in observe mode, the second in enforce mode), verify
/// under `proto="icmp"`; every changed byte of one from the enforce-mode peer is a mismatch,
/// dropped; one from the observe-mode peer is passed, and its event names `flow`, the echo's
/// identifier and sequence number, and its length. Returns the ICMP header's offset.
fn echo_replies_verify<A: Copy + std::fmt::Display>(
    h: &mut Harness,
    echo: impl Fn(A, usize) -> Vec<u8>,
    peers: &[(A, usize)],
    flow: &str,
) -> usize {
    let icmp = Proto::Icmp as usize;
    for n in [
        0usize, 1, 56, 63, 64, 65, 1232, 1472, 2039, 2040, 2041, 3000,
    ] {
        for &(src, peer) in peers {
            let f = echo(src, n);
            assert_eq!(
                h.run(&f),
                Outcome::verified(peer, icmp, l4_len(&f)),
                "{n} bytes from {src}"
            );
        }
    }
    let ((observed, p_observed), (enforced, p_enforced)) = (peers[0], peers[1]);
    let clean = echo(enforced, 200);
    let off = l4_offset(&clean);
    for pos in off..clean.len() {
        let mut f = clean.clone();
        f[pos] ^= 0x10;
        assert_eq!(
            h.run(&f),
            Outcome::mismatch(p_enforced, icmp, true),
            "byte {} of the message from {enforced}",
            pos - off
        );
    }
    let mut f = echo(observed, 64);
    f[off + 20] ^= 0x01;
    let out = h.run(&f);
    assert_eq!(out, Outcome::mismatch(p_observed, icmp, false));
    let ev = &out.events[0];
    assert_eq!(
        (ev.proto, ev.flow().as_str(), ev.seq, ev.len),
        ("icmp", flow, 0x4e41_0007, 72)
    );
    off
}

/// Where the `ICMPv6` peer of `table()` sends from before a NAT66 rewrites its source.
const V6_NAT_ORIG: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x99, 0, 0, 0, 0, 0x20);

/// An `ICMPv6` echo reply from `V6_NAT_ORIG` to `LOCAL6`, as it arrives with its source
/// rewritten to `V6_ENFORCE`.
fn nat66_echo_reply(n: usize) -> Vec<u8> {
    let mut f = v6(V6_NAT_ORIG, LOCAL6, L4::IcmpEchoReply, &payload(n));
    f[ETH + 8..ETH + 24].copy_from_slice(&V6_ENFORCE.octets());
    f
}

/// `ICMPv6` sums a pseudo-header, like TCP and UDP, so it leaves its SA's residual: 0 for a
/// configured peer without NAT, the learned one behind a NAT66. At every length and for every
/// changed byte it is verified or a mismatch like the others (dropped in enforce mode, its
/// event naming type and code). While its SA has no residual it passes unverified, counted as
/// learning, and sends no learning sample: ICMP neither teaches a residual nor withdraws one.
/// The bounded-loop variant counts it as `other_protocol`.
#[test]
fn icmpv6_is_verified_against_its_sas_residual() {
    if skip_unless_root("icmpv6_is_verified_against_its_sas_residual") {
        return;
    }
    let icmp = Proto::Icmp as usize;
    let compat = &mut Harness::with(&Scope::Address, Some(Variant::BoundedLoop));
    let f = v6(V6_ENFORCE, LOCAL6, L4::IcmpEchoReply, &payload(64));
    assert_eq!(compat.run(&f), Outcome::skipped(Counter::SkipOtherProtocol));
    let h = &mut Harness::with(&Scope::Address, Some(Variant::BpfLoop));
    echo_replies_verify(
        h,
        |src, n| v6(src, LOCAL6, L4::IcmpEchoReply, &payload(n)),
        &[(V6_OBSERVE, P_V6_OBSERVE), (V6_ENFORCE, P_V6_ENFORCE)],
        "2001:db8:1::10 -> 2001:db8:ff::1 type 129 code 0",
    );
    // The enforce-mode peer learns, behind a NAT66 that rewrote its source.
    peer_learns(h, P_V6_ENFORCE, Mode::Enforce);
    let intact = nat66_echo_reply(300);
    let mut corrupted = intact.clone();
    let last = corrupted.len() - 1;
    corrupted[last] ^= 0x40;
    for f in [&intact, &corrupted] {
        let mut want = Outcome::zero(PASS);
        want.peers[P_V6_ENFORCE].learning[icmp] = 1;
        assert_eq!(h.run(f), want, "no residual yet");
    }
    let mut key = SaKey {
        peer_id: P_V6_ENFORCE as u32,
        ..SaKey::default()
    };
    key.src = V6_ENFORCE.octets();
    key.dst = LOCAL6.octets();
    let residual = csum::nat_residual(
        csum::addr6_sum(V6_NAT_ORIG.octets()),
        csum::addr6_sum(LOCAL6.octets()),
        csum::addr6_sum(V6_ENFORCE.octets()),
        csum::addr6_sum(LOCAL6.octets()),
    );
    assert_ne!(residual, 0);
    h.v.peer_maps()
        .unwrap()
        .set_sa_residual(key, 0, residual)
        .unwrap();
    assert_eq!(
        h.run(&intact),
        Outcome::verified(P_V6_ENFORCE, icmp, l4_len(&intact))
    );
    let out = h.run(&corrupted);
    assert_eq!(out, Outcome::mismatch(P_V6_ENFORCE, icmp, true));
    assert_eq!(out.events[0].expected_residual, residual);
    // Without the NAT the message leaves 0, not the SA's residual: a mismatch, dropped.
    let f = v6(V6_ENFORCE, LOCAL6, L4::IcmpEchoReply, &payload(300));
    assert_eq!(h.run(&f), Outcome::mismatch(P_V6_ENFORCE, icmp, true));
    // Sixteen more, all distinct and all leaving that one value, do not withdraw the residual
    // as sixteen such TCP segments would: ICMP is no evidence against it.
    for n in 0..16 {
        let f = v6(V6_ENFORCE, LOCAL6, L4::IcmpEchoReply, &payload(301 + n));
        assert_eq!(h.run(&f), Outcome::mismatch(P_V6_ENFORCE, icmp, true));
    }
    assert_eq!(
        h.run(&intact),
        Outcome::verified(P_V6_ENFORCE, icmp, l4_len(&intact))
    );
}

/// SCTP's CRC32c covers the packet alone (no pseudo-header), so it is verified from the first
/// packet whatever the peer's NAT residual or learning state, by `natt_sctp` (tail-called by
/// the `bpf_loop` variant), over both families and every length around the 2 KiB chunks.
/// Every changed byte, the CRC's own included, is a mismatch, dropped in enforce mode, whose
/// event carries both 32-bit CRCs and the verification tag. The bounded-loop variant counts
/// SCTP as `other_protocol`.
#[test]
fn sctp_is_verified_by_its_crc32c_and_every_changed_byte_is_a_mismatch() {
    if skip_unless_root("sctp_is_verified_by_its_crc32c_and_every_changed_byte_is_a_mismatch") {
        return;
    }
    let sctp = Proto::Sctp as usize;
    let compat = &mut Harness::with(&Scope::Address, Some(Variant::BoundedLoop));
    for f in [
        v4(V4_ENFORCE, LOCAL4, L4::Sctp, &payload(100)),
        v6(V6_ENFORCE, LOCAL6, L4::Sctp, &payload(100)),
    ] {
        assert_eq!(compat.run(&f), Outcome::skipped(Counter::SkipOtherProtocol));
    }
    let h = &mut Harness::with(&Scope::Address, Some(Variant::BpfLoop));
    // The enforce-mode IPv6 peer learns, without any residual yet: SCTP needs none.
    peer_learns(h, P_V6_ENFORCE, Mode::Enforce);
    for n in [
        0usize, 1, 3, 4, 5, 63, 64, 1232, 1452, 2016, 2017, 2020, 2021, 2036, 2037, 3000,
    ] {
        for (f, peer) in [
            (v4(V4_OBSERVE, LOCAL4, L4::Sctp, &payload(n)), P_V4_OBSERVE),
            (v4(V4_ENFORCE, LOCAL4, L4::Sctp, &payload(n)), P_V4_ENFORCE),
            (v4(V4_NAT_SEEN, LOCAL4, L4::Sctp, &payload(n)), P_V4_NAT),
            (v6(V6_OBSERVE, LOCAL6, L4::Sctp, &payload(n)), P_V6_OBSERVE),
            (v6(V6_ENFORCE, LOCAL6, L4::Sctp, &payload(n)), P_V6_ENFORCE),
        ] {
            assert_eq!(
                h.run(&f),
                Outcome::verified(peer, sctp, l4_len(&f)),
                "{n} bytes, peer {peer}"
            );
        }
    }
    for (clean, peer) in [
        (
            v4(V4_ENFORCE, LOCAL4, L4::Sctp, &payload(200)),
            P_V4_ENFORCE,
        ),
        (
            v6(V6_ENFORCE, LOCAL6, L4::Sctp, &payload(2100)),
            P_V6_ENFORCE,
        ),
    ] {
        let off = l4_offset(&clean);
        for pos in (off..clean.len()).filter(|p| clean.len() < 300 || p % 7 == 0) {
            let mut f = clean.clone();
            f[pos] ^= 0x10;
            assert_eq!(
                h.run(&f),
                Outcome::mismatch(peer, sctp, true),
                "byte {} of the packet",
                pos - off
            );
        }
    }
    let clean = v4(V4_OBSERVE, LOCAL4, L4::Sctp, &payload(64));
    let off = l4_offset(&clean);
    let mut f = clean.clone();
    f[off + 40] ^= 0x01;
    let out = h.run(&f);
    assert_eq!(out, Outcome::mismatch(P_V4_OBSERVE, sctp, false));
    let ev = &out.events[0];
    let found = u32::from_le_bytes(clean[off + 8..off + 12].try_into().unwrap());
    let mut zeroed = f[off..].to_vec();
    zeroed[8..12].fill(0);
    let computed = monitor_ebpf::crc32c::crc32c(&zeroed);
    assert_ne!(found, computed);
    assert_eq!(
        (
            ev.proto,
            ev.flow().as_str(),
            ev.seq,
            ev.len,
            ev.found,
            ev.expected
        ),
        (
            "sctp",
            "192.0.2.10:40002 -> 192.168.1.1:3868",
            natt_monitor_tests::packets::SCTP_VTAG,
            92,
            found,
            computed
        )
    );
    // A CRC of 0 is one left for the device to fill in (CHECKSUM_PARTIAL on a local path) or
    // one a sender with sctp.no_checksums never computed: not verified, counted.
    let mut f = v4(V4_ENFORCE, LOCAL4, L4::Sctp, &payload(100));
    f[off + 8..off + 12].fill(0);
    assert_eq!(h.run(&f), Outcome::skipped(Counter::SkipPartialChecksum));
    // Shorter than the common header.
    let mut f = v4(V4_ENFORCE, LOCAL4, L4::Sctp, &[]);
    f.truncate(off + 8);
    f[ETH + 3] = 28;
    assert_eq!(h.run(&f), Outcome::skipped(Counter::SkipMalformed));
}

#[test]
fn mismatch_events_carry_flow_seq_and_checksums() {
    if skip_unless_root("mismatch_events_carry_flow_seq_and_checksums") {
        return;
    }
    let mut h = Harness::new();
    let clean = v4(
        V4_ENFORCE,
        LOCAL4,
        L4::Tcp,
        b"ruok ruok ruok ruok ruok ruok ruok ruok",
    );
    let off = l4_offset(&clean);
    let original = u16::from_be_bytes([clean[off + 16], clean[off + 17]]);
    let mut f = clean.clone();
    f[off + 16] ^= 0xff; // corrupt the checksum field itself
    let out = h.run(&f);
    assert_eq!(
        out,
        Outcome::mismatch(P_V4_ENFORCE, Proto::Tcp as usize, true)
    );
    let m = &out.events[0];
    assert_eq!(m.flow(), "198.51.100.7:40000 -> 192.168.1.1:2181");
    assert_eq!(
        (m.peer_id, m.proto, m.seq, m.len, m.dropped),
        (P_V4_ENFORCE as u32, "tcp", 0x0102_0304, 59, true)
    );
    assert_eq!(m.found, u32::from(original ^ 0xff00));
    assert_eq!(m.expected, u32::from(original));
    assert_eq!(m.payload, b"ruok ruok ruok ruok ruok ruok ru");
}
