//! What the verifier reads and what it leaves out, through `BPF_PROG_TEST_RUN` (root only): the
//! headers it walks, every skip reason, a full ring buffer, the scopes' exemptions, and a
//! corpus of malformed packets each with its exact verdict and reason.

use std::net::Ipv6Addr;

use aya::programs::{TestRun as _, TestRunOptions};
use monitor_ebpf::{Counter, Proto, csum};
use natt_monitor::{
    ebpf::Variant,
    events::Mismatch,
    peers::PeerTable,
    scope::{self, Scope},
};
use natt_monitor_tests::{
    loader,
    packets::{ETH, L4, l4_offset, payload, v4, v6, with_ipv4_options, with_ipv6_ext},
    skip_unless_root,
    testrun::*,
};

#[test]
fn headers_the_verifier_walks() {
    if skip_unless_root("headers_the_verifier_walks") {
        return;
    }
    let mut h = Harness::new();
    // IPv4 options (4 NOPs and an end-of-list padded option).
    let f = with_ipv4_options(
        v4(V4_OBSERVE, LOCAL4, L4::Tcp, &payload(300)),
        &[1, 1, 1, 0, 1, 1, 1, 0],
    );
    assert_eq!(
        h.run(&f),
        Outcome::verified(P_V4_OBSERVE, Proto::Tcp as usize, 320)
    );
    // Corruption after IPv4 options is still found at the right offset.
    let mut bad = f.clone();
    let n = bad.len();
    bad[n - 3] ^= 1;
    assert_eq!(
        h.run(&bad),
        Outcome::mismatch(P_V4_OBSERVE, Proto::Tcp as usize, false)
    );
    // IPv6 hop-by-hop, destination options and routing headers are walked.
    for kind in [0u8, 60, 43] {
        let f = with_ipv6_ext(v6(V6_OBSERVE, LOCAL6, L4::Udp, &payload(99)), kind);
        assert_eq!(
            h.run(&f),
            Outcome::verified(P_V6_OBSERVE, Proto::Udp as usize, 107),
            "ext header {kind}"
        );
    }
    let f = with_ipv6_ext(
        with_ipv6_ext(v6(V6_OBSERVE, LOCAL6, L4::Tcp, &payload(10)), 60),
        0,
    );
    assert_eq!(
        h.run(&f),
        Outcome::verified(P_V6_OBSERVE, Proto::Tcp as usize, 30),
        "two ext headers"
    );
}

#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one table of skip cases reads best in one place"
)]
fn skips_are_counted_by_reason() {
    if skip_unless_root("skips_are_counted_by_reason") {
        return;
    }
    let mut h = Harness::new();
    let tcp = v4(V4_OBSERVE, LOCAL4, L4::Tcp, &payload(100));
    let off = l4_offset(&tcp);

    // Out of scope: nothing is verified.
    assert_eq!(
        h.run(&v4(V4_OUT_OF_SCOPE, LOCAL4, L4::Tcp, &payload(100))),
        Outcome::skipped(Counter::SkipNotInScope)
    );
    let v6_foreign = Ipv6Addr::new(0x2001, 0xdb8, 9, 0, 0, 0, 0, 1);
    assert_eq!(
        h.run(&v6(v6_foreign, LOCAL6, L4::Udp, &payload(5))),
        Outcome::skipped(Counter::SkipNotInScope)
    );

    // UDP checksum 0 (IPv4 "no checksum").
    let mut f = v4(V4_OBSERVE, LOCAL4, L4::Udp, &payload(40));
    f[off + 6] = 0;
    f[off + 7] = 0;
    assert_eq!(h.run(&f), Outcome::skipped(Counter::SkipUdpChecksumZero));

    // Fragments: more-fragments flag, non-zero offset, IPv6 fragment header.
    let mut f = tcp.clone();
    f[ETH + 6] |= 0x20;
    assert_eq!(h.run(&f), Outcome::skipped(Counter::SkipFragment), "MF");
    let mut f = tcp.clone();
    f[ETH + 7] = 0x10;
    assert_eq!(h.run(&f), Outcome::skipped(Counter::SkipFragment), "offset");
    let f = with_ipv6_ext(v6(V6_OBSERVE, LOCAL6, L4::Tcp, &payload(64)), 44);
    assert_eq!(
        h.run(&f),
        Outcome::skipped(Counter::SkipFragment),
        "v6 fragment header"
    );

    // Other protocols: GRE and an IPv6 No Next Header. (ICMP, ICMPv6 and SCTP are verified.)
    let mut f = tcp.clone();
    f[ETH + 9] = 47;
    assert_eq!(
        h.run(&f),
        Outcome::skipped(Counter::SkipOtherProtocol),
        "gre"
    );
    let mut f = v6(V6_OBSERVE, LOCAL6, L4::Tcp, &payload(8));
    f[ETH + 6] = 59;
    assert_eq!(
        h.run(&f),
        Outcome::skipped(Counter::SkipOtherProtocol),
        "no next header"
    );

    // Unsupported IPv6 extension headers (AH), and a jumbogram length.
    let f = with_ipv6_ext(v6(V6_OBSERVE, LOCAL6, L4::Tcp, &payload(8)), 51);
    assert_eq!(
        h.run(&f),
        Outcome::skipped(Counter::SkipUnsupportedExtensionHeader),
        "AH"
    );
    // BIG TCP shapes: an IPv6 payload length of 0 and an IPv4 total length of 0 mean an
    // aggregate past 64 KiB, whose segments' checksums are gone.
    let mut f = v6(V6_OBSERVE, LOCAL6, L4::Tcp, &payload(8));
    f[ETH + 4] = 0;
    f[ETH + 5] = 0;
    assert_eq!(
        h.run(&f),
        Outcome::skipped(Counter::SkipAggregated),
        "ipv6 big tcp"
    );
    let mut f = tcp.clone();
    f[ETH + 2] = 0;
    f[ETH + 3] = 0;
    assert_eq!(
        h.run(&f),
        Outcome::skipped(Counter::SkipAggregated),
        "ipv4 big tcp"
    );

    // Malformed: IHL < 5, TCP data offset < 5 or past the segment, UDP length wrong.
    let mut f = tcp.clone();
    f[ETH] = 0x44;
    assert_eq!(h.run(&f), Outcome::skipped(Counter::SkipMalformed), "ihl 4");
    let mut f = tcp.clone();
    f[off + 12] = 0x40;
    assert_eq!(
        h.run(&f),
        Outcome::skipped(Counter::SkipMalformed),
        "doff 4"
    );
    let mut f = v4(V4_OBSERVE, LOCAL4, L4::Tcp, &[]);
    f[off + 12] = 0x60;
    assert_eq!(
        h.run(&f),
        Outcome::skipped(Counter::SkipMalformed),
        "doff past the end"
    );
    let mut f = v4(V4_OBSERVE, LOCAL4, L4::Udp, &payload(20));
    f[off + 5] = 29; // longer than the IP payload
    assert_eq!(
        h.run(&f),
        Outcome::skipped(Counter::SkipMalformed),
        "udp length"
    );
    let mut f = v4(V4_OBSERVE, LOCAL4, L4::Udp, &payload(20));
    f[off + 5] = 7;
    assert_eq!(
        h.run(&f),
        Outcome::skipped(Counter::SkipMalformed),
        "udp length below header"
    );

    // Truncated: the IP header claims more than the packet holds; or the L4 header is cut.
    let mut f = tcp.clone();
    f.truncate(f.len() - 10);
    assert_eq!(
        h.run(&f),
        Outcome::skipped(Counter::SkipTruncated),
        "short segment"
    );
    let mut f = tcp.clone();
    f.truncate(off + 10);
    assert_eq!(
        h.run(&f),
        Outcome::skipped(Counter::SkipTruncated),
        "cut tcp header"
    );
    // (A cut IPv4 header never reaches a socket, and BPF_PROG_TEST_RUN refuses one; a cut
    // IPv6 extension header is the L3 case that can.)
    let mut f = with_ipv6_ext(v6(V6_OBSERVE, LOCAL6, L4::Tcp, &[]), 60);
    f.truncate(ETH + 40 + 1);
    assert_eq!(
        h.run(&f),
        Outcome::skipped(Counter::SkipTruncated),
        "cut extension header"
    );

    // GRO aggregates: gso_segs > 1 in the skb (offset 164 of struct __sk_buff).
    let mut ctx = vec![0u8; 192];
    ctx[164..168].copy_from_slice(&2u32.to_ne_bytes());
    assert_eq!(
        h.run_with_ctx(&tcp, Some(&ctx)),
        Outcome::skipped(Counter::SkipAggregated)
    );
    ctx[164..168].copy_from_slice(&1u32.to_ne_bytes());
    assert_eq!(
        h.run_with_ctx(&tcp, Some(&ctx)),
        Outcome::verified(P_V4_OBSERVE, Proto::Tcp as usize, 120),
        "one segment"
    );
}

#[test]
fn a_full_ring_buffer_counts_lost_events_and_never_blocks() {
    const N: u32 = 5000;
    if skip_unless_root("a_full_ring_buffer_counts_lost_events_and_never_blocks") {
        return;
    }
    let mut v = loader(&Scope::Address).load().expect("load verifier");
    v.peer_maps()
        .unwrap()
        .set_peers(&PeerTable::default(), &table())
        .unwrap();
    let mut ring = v.take_events().unwrap();
    let mut f = v4(V4_OBSERVE, LOCAL4, L4::Tcp, &payload(200));
    let last = f.len() - 1;
    f[last] ^= 0xff;
    let prog = v.program_mut().unwrap();
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(&f),
            repeat: N,
            ..TestRunOptions::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    assert_eq!(r.return_value, PASS);
    let mut delivered = 0u64;
    while let Some(item) = ring.next() {
        assert!(Mismatch::decode(&item).is_some());
        delivered += 1;
    }
    let events_lost = v.stats().counters().unwrap().get(Counter::EventsLost);
    let counted = v
        .stats()
        .peer_stats(P_V4_OBSERVE as u32)
        .unwrap()
        .mismatches[Proto::Tcp as usize];
    assert_eq!(counted, u64::from(N));
    assert!(
        events_lost > 0,
        "5000 events cannot fit in {} bytes",
        monitor_ebpf::EVENT_RING_BYTES
    );
    assert_eq!(
        delivered + events_lost,
        u64::from(N),
        "every mismatch is either delivered or counted lost"
    );
}

/// The checksum field of `frame` rewritten to what a `CHECKSUM_PARTIAL` sender leaves there:
/// the folded pseudo-header sum alone.
fn as_partial(mut frame: Vec<u8>, field_at: usize) -> Vec<u8> {
    let off = l4_offset(&frame);
    let l4 = (frame.len() - off) as u32;
    let v6 = frame[ETH] >> 4 == 6;
    let (addrs, proto) = if v6 {
        let a: [u8; 16] = frame[ETH + 8..ETH + 24].try_into().unwrap();
        let b: [u8; 16] = frame[ETH + 24..ETH + 40].try_into().unwrap();
        (csum::addr6_sum(a) + csum::addr6_sum(b), frame[ETH + 6])
    } else {
        let a: [u8; 4] = frame[ETH + 12..ETH + 16].try_into().unwrap();
        let b: [u8; 4] = frame[ETH + 16..ETH + 20].try_into().unwrap();
        (csum::addr4_sum(a) + csum::addr4_sum(b), frame[ETH + 9])
    };
    let field = csum::partial_field(addrs + csum::proto_len_sum(proto, l4));
    frame[off + field_at..off + field_at + 2].copy_from_slice(&field.to_be_bytes());
    frame
}

#[test]
fn address_scope_leaves_out_ike_ports_and_partial_checksums() {
    if skip_unless_root("address_scope_leaves_out_ike_ports_and_partial_checksums") {
        return;
    }
    let mut h = Harness::new();
    // IKE and NAT-T keepalives from a peer arrive in the clear: never a mismatch, even from a
    // NAT peer whose residual is not 0, and even when the checksum is wrong.
    for port in [500u16, 4500] {
        for (dir, at) in [("to", 2), ("from", 0)] {
            let mut f = v4(V4_NAT_SEEN, LOCAL4, L4::Udp, &payload(60));
            let off = l4_offset(&f);
            f[off + at..off + at + 2].copy_from_slice(&port.to_be_bytes());
            assert_eq!(
                h.run(&f),
                Outcome::skipped(Counter::SkipIke),
                "udp {dir} port {port}"
            );
        }
    }
    // TCP on port 4500 is RFC 8229's ESP-in-TCP stream itself (its payload is ESP): exempt
    // too. TCP on any other port from an observe peer with a bad checksum is a mismatch.
    for (port, want) in [
        (4500u16, Outcome::skipped(Counter::SkipIke)),
        (
            4501,
            Outcome::mismatch(P_V4_OBSERVE, Proto::Tcp as usize, false),
        ),
    ] {
        let mut f = v4(V4_OBSERVE, LOCAL4, L4::Tcp, &payload(60));
        let off = l4_offset(&f);
        f[off + 2..off + 4].copy_from_slice(&port.to_be_bytes());
        assert_eq!(h.run(&f), want, "tcp to port {port}");
    }
    // CHECKSUM_PARTIAL segments (loopback, veth with tx offload) hold only the pseudo-header
    // sum: not verifiable, never dropped, even from an enforce peer.
    for (frame, at, what) in [
        (v4(V4_ENFORCE, LOCAL4, L4::Tcp, &payload(300)), 16, "v4 tcp"),
        (v4(V4_ENFORCE, LOCAL4, L4::Udp, &payload(301)), 6, "v4 udp"),
        (v6(V6_ENFORCE, LOCAL6, L4::Tcp, &payload(0)), 16, "v6 tcp"),
        (v6(V6_ENFORCE, LOCAL6, L4::Udp, &payload(77)), 6, "v6 udp"),
    ] {
        assert_eq!(
            h.run(&as_partial(frame, at)),
            Outcome::skipped(Counter::SkipPartialChecksum),
            "{what}"
        );
    }
}

#[test]
fn sa_scope_leaves_out_everything_without_a_sec_path() {
    if skip_unless_root("sa_scope_leaves_out_everything_without_a_sec_path") {
        return;
    }
    let btf = std::path::Path::new("/sys").join(scope::VMLINUX_BTF);
    let layout = match scope::layout_from(&btf) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("skipped sa_scope_leaves_out_everything_without_a_sec_path: {e}");
            return;
        }
    };
    let mut h = Harness::with_scope(&Scope::Sa(layout));
    // Test-run skbs are built from plain bytes, with no IPsec state: whatever they hold, and
    // whoever sent them, they are out of scope. Intact, corrupt, partial, from an enforce peer.
    let clean = v4(V4_ENFORCE, LOCAL4, L4::Tcp, &payload(500));
    let mut bad = clean.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    for (f, what) in [
        (clean.clone(), "intact"),
        (bad, "corrupt"),
        (as_partial(clean, 16), "partial"),
        (v6(V6_ENFORCE, LOCAL6, L4::Udp, &payload(9)), "v6 udp"),
        (v4(V4_OUT_OF_SCOPE, LOCAL4, L4::Tcp, &payload(9)), "no peer"),
    ] {
        assert_eq!(h.run(&f), Outcome::skipped(Counter::SkipNotIpsec), "{what}");
    }
}

/// What a malformed-corpus case must give.
enum Expect {
    /// The kernel refuses the frame before the program runs: a test run only, since such a
    /// packet never reaches a socket.
    Refused,
    /// The verdict and the exact change of every counter.
    Is(Box<Outcome>),
}

/// An IPv4 TCP frame from the observed peer with explicit options (checksum correct).
fn v4_tcp_options(opts: &[etherparse::TcpOptionElement], data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(V4_OBSERVE.octets(), LOCAL4.octets(), 64)
        .tcp(40000, 2181, 7, 64240)
        .options(opts)
        .expect("options fit")
        .write(&mut out, data)
        .expect("etherparse builds the frame");
    out
}

/// Sets the IPv4 total length, or the IPv6 payload length, of `frame`.
fn set_ip_len(mut frame: Vec<u8>, len: u16) -> Vec<u8> {
    let at = if frame[12..14] == [0x08, 0x00] { 2 } else { 4 };
    frame[ETH + at..ETH + at + 2].copy_from_slice(&len.to_be_bytes());
    frame
}

fn ip_len(frame: &[u8]) -> u16 {
    let at = if frame[12..14] == [0x08, 0x00] { 2 } else { 4 };
    u16::from_be_bytes([frame[ETH + at], frame[ETH + at + 1]])
}

/// Appends `n` bytes behind the IP packet, as link-layer padding does.
fn with_trailer(mut frame: Vec<u8>, n: usize) -> Vec<u8> {
    frame.extend(std::iter::repeat_n(0xa5, n));
    frame
}

/// The malformed-packet corpus: every case is a frame and its exact verdict and reason.
#[expect(clippy::too_many_lines, reason = "the corpus reads best as one table")]
fn malformed_corpus() -> Vec<(String, Vec<u8>, Expect)> {
    use Expect::Refused;
    use etherparse::TcpOptionElement::Noop;
    let is = |o: Outcome| Expect::Is(Box::new(o));
    let mut cases: Vec<(String, Vec<u8>, Expect)> = Vec::new();
    let tcp = Proto::Tcp as usize;
    let udp = Proto::Udp as usize;

    // Headers cut at every byte, for each family and transport, with IPv4 options and with
    // IPv6 extension headers: a frame without its whole fixed IP header never reaches the
    // program; any other cut leaves a segment shorter than its headers say.
    let bases = [
        (
            "v4 tcp+options",
            v4(V4_OBSERVE, LOCAL4, L4::TcpWithOptions, &payload(16)),
            20,
        ),
        ("v4 udp", v4(V4_OBSERVE, LOCAL4, L4::Udp, &payload(16)), 20),
        (
            "v4 ip-options tcp",
            with_ipv4_options(v4(V4_OBSERVE, LOCAL4, L4::Tcp, &payload(16)), &[1, 1, 1, 0]),
            20,
        ),
        (
            "v6 tcp+options",
            v6(V6_OBSERVE, LOCAL6, L4::TcpWithOptions, &payload(16)),
            40,
        ),
        (
            "v6 hop-by-hop+dest-options udp",
            with_ipv6_ext(
                with_ipv6_ext(v6(V6_OBSERVE, LOCAL6, L4::Udp, &payload(16)), 60),
                0,
            ),
            40,
        ),
    ];
    for (name, frame, fixed) in &bases {
        for cut in ETH..frame.len() {
            let expect = if cut < ETH + fixed {
                Refused
            } else {
                is(Outcome::skipped(Counter::SkipTruncated))
            };
            cases.push((
                format!("{name} cut to {cut} bytes"),
                frame[..cut].to_vec(),
                expect,
            ));
        }
    }

    // IPv4 header lengths against the packet.
    let bare = v4(V4_OBSERVE, LOCAL4, L4::Tcp, &[]);
    let mut f = bare.clone();
    f[ETH] = 0x4f; // IHL 15: a 60-byte header in a 40-byte packet
    cases.push((
        "IHL past the total length".into(),
        f.clone(),
        is(Outcome::skipped(Counter::SkipMalformed)),
    ));
    let f = set_ip_len(f, 60); // ... and a total length that covers it, past the frame
    cases.push((
        "IHL and total length past the frame".into(),
        f,
        is(Outcome::skipped(Counter::SkipMalformed)),
    ));
    let with100 = v4(V4_OBSERVE, LOCAL4, L4::Tcp, &payload(100));
    let n = ip_len(&with100);
    cases.push((
        "total length one past the frame".into(),
        set_ip_len(with100.clone(), n + 1),
        is(Outcome::skipped(Counter::SkipTruncated)),
    ));
    cases.push((
        "total length 65535".into(),
        set_ip_len(with100.clone(), 0xffff),
        is(Outcome::skipped(Counter::SkipTruncated)),
    ));
    cases.push((
        "total length below the header".into(),
        set_ip_len(with100.clone(), 19),
        is(Outcome::skipped(Counter::SkipMalformed)),
    ));
    cases.push((
        "total length leaves no TCP header".into(),
        set_ip_len(with100.clone(), 39),
        is(Outcome::skipped(Counter::SkipMalformed)),
    ));
    // Bytes behind the IP packet (link padding) are not part of the segment.
    cases.push((
        "v4: 6 bytes behind the packet".into(),
        with_trailer(with100.clone(), 6),
        is(Outcome::verified(P_V4_OBSERVE, tcp, 120)),
    ));
    let v6_100 = v6(V6_OBSERVE, LOCAL6, L4::Tcp, &payload(100));
    cases.push((
        "v6: 6 bytes behind the packet".into(),
        with_trailer(v6_100.clone(), 6),
        is(Outcome::verified(P_V6_OBSERVE, tcp, 120)),
    ));
    let n = ip_len(&v6_100);
    cases.push((
        "v6 payload length one past the frame".into(),
        set_ip_len(v6_100, n + 1),
        is(Outcome::skipped(Counter::SkipTruncated)),
    ));

    // IPv6 extension-header chains, up to the walk's limit and one beyond it.
    let kinds = [0u8, 60, 43, 60, 43, 60, 43];
    for k in 0..=kinds.len() {
        let mut f = v6(V6_OBSERVE, LOCAL6, L4::Udp, &payload(30));
        for &kind in &kinds[..k] {
            f = with_ipv6_ext(f, kind);
        }
        let expect = if k <= MAX_EXT_HEADERS {
            Outcome::verified(P_V6_OBSERVE, udp, 38)
        } else {
            Outcome::skipped(Counter::SkipUnsupportedExtensionHeader)
        };
        cases.push((format!("{k} extension headers"), f, is(expect)));
    }
    // An extension header whose length runs past the IPv6 payload.
    let mut f = with_ipv6_ext(v6(V6_OBSERVE, LOCAL6, L4::Udp, &payload(30)), 60);
    f[ETH + 41] = 255;
    cases.push((
        "extension header longer than the payload".into(),
        f,
        is(Outcome::skipped(Counter::SkipMalformed)),
    ));

    // Zero-length payloads.
    for (l4, proto, len) in [
        (L4::Tcp, tcp, 20),
        (L4::TcpWithOptions, tcp, 40),
        (L4::Udp, udp, 8),
    ] {
        cases.push((
            format!("v4 {l4:?} without payload"),
            v4(V4_OBSERVE, LOCAL4, l4, &[]),
            is(Outcome::verified(P_V4_OBSERVE, proto, len)),
        ));
        cases.push((
            format!("v6 {l4:?} without payload"),
            v6(V6_OBSERVE, LOCAL6, l4, &[]),
            is(Outcome::verified(P_V6_OBSERVE, proto, len)),
        ));
    }

    // TCP options: the longest header (data offset 15), alone and with data; a data offset past
    // the segment.
    cases.push((
        "data offset 15, no data".into(),
        v4_tcp_options(&vec![Noop; 40], &[]),
        is(Outcome::verified(P_V4_OBSERVE, tcp, 60)),
    ));
    cases.push((
        "data offset 15 and 10 bytes".into(),
        v4_tcp_options(&vec![Noop; 40], &payload(10)),
        is(Outcome::verified(P_V4_OBSERVE, tcp, 70)),
    ));
    let mut f = v4(V4_OBSERVE, LOCAL4, L4::Tcp, &payload(30));
    f[ETH + 20 + 12] = 0xf0;
    cases.push((
        "data offset 15 in a 50-byte segment".into(),
        f,
        is(Outcome::skipped(Counter::SkipMalformed)),
    ));

    // UDP length against the IP payload: shorter is legal (the rest is not the datagram's);
    // longer, or below the header, is not.
    let u = v4(V4_OBSERVE, LOCAL4, L4::Udp, &payload(20));
    let n = ip_len(&u);
    let f = set_ip_len(with_trailer(u.clone(), 12), n + 12);
    cases.push((
        "UDP length 12 short of the IP payload".into(),
        f,
        is(Outcome::verified(P_V4_OBSERVE, udp, 28)),
    ));
    let e = v4(V4_OBSERVE, LOCAL4, L4::Udp, &[]);
    let n = ip_len(&e);
    let f = set_ip_len(with_trailer(e, 20), n + 20);
    cases.push((
        "UDP length 8 in a 28-byte IP payload".into(),
        f,
        is(Outcome::verified(P_V4_OBSERVE, udp, 8)),
    ));
    for (ulen, name) in [(29u16, "one past"), (0, "zero"), (7, "below the header")] {
        let mut f = u.clone();
        f[ETH + 24..ETH + 26].copy_from_slice(&ulen.to_be_bytes());
        cases.push((
            format!("UDP length {name}"),
            f,
            is(Outcome::skipped(Counter::SkipMalformed)),
        ));
    }
    cases
}

/// The verifier walks at most this many IPv6 extension headers (docs/verifier.md).
const MAX_EXT_HEADERS: usize = 6;

#[test]
fn malformed_packet_corpus() {
    if skip_unless_root("malformed_packet_corpus") {
        return;
    }
    for variant in [Variant::BpfLoop, Variant::BoundedLoop] {
        let mut h = Harness::with(&Scope::Address, Some(variant));
        let corpus = malformed_corpus();
        for (name, frame, expect) in &corpus {
            let got = h.try_run(frame, None);
            match (expect, got) {
                (Expect::Refused, Err(_)) => {}
                (Expect::Refused, Ok(o)) => panic!("{name}: the kernel ran the program: {o:?}"),
                (Expect::Is(want), Ok(o)) => assert_eq!(&o, &**want, "{name} ({variant:?})"),
                (Expect::Is(_), Err(e)) => panic!("{name}: refused by the kernel: {e}"),
            }
        }
        eprintln!(
            "{} corpus cases, each with its exact verdict ({variant:?})",
            corpus.len()
        );
    }
}
