//! Residual trust through `BPF_PROG_TEST_RUN` (root only): NAT peers verified against their
//! residual, learning that passes unverified and reports, a residual withdrawn only by an
//! unbroken streak of distinct segments, and enforce mode holding TCP until a retransmission
//! confirms.

use monitor_ebpf::{Proto, SaKey};
use natt_monitor::{
    events::{Learning, LearningKind},
    peers::Mode,
};
use natt_monitor_tests::{
    packets::{ETH, L4, payload, v4},
    skip_unless_root,
    testrun::*,
};

#[test]
fn nat_peers_use_their_residual() {
    if skip_unless_root("nat_peers_use_their_residual") {
        return;
    }
    let mut h = Harness::new();
    for (l4, proto) in [
        (L4::Tcp, Proto::Tcp as usize),
        (L4::Udp, Proto::Udp as usize),
    ] {
        // Sender computed the checksum over its original addresses; a NAT then rewrote both.
        let mut f = v4(V4_NAT_ORIG, V4_NAT_ORIG_DST, l4, &payload(777));
        f[ETH + 12..ETH + 16].copy_from_slice(&V4_NAT_SEEN.octets());
        f[ETH + 16..ETH + 20].copy_from_slice(&LOCAL4.octets());
        assert_eq!(
            h.run(&f),
            Outcome::verified(P_V4_NAT, proto, l4_len(&f)),
            "{l4:?} right residual"
        );
        // Corruption on top of the NAT shift is still caught.
        let mut bad = f.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0x10;
        assert_eq!(
            h.run(&bad),
            Outcome::mismatch(P_V4_NAT, proto, false),
            "{l4:?} corrupted"
        );
        // The same segment rewritten to an unexpected destination leaves a different residual.
        f[ETH + 16..ETH + 20].copy_from_slice(&[192, 168, 1, 2]);
        assert_eq!(
            h.run(&f),
            Outcome::mismatch(P_V4_NAT, proto, false),
            "{l4:?} wrong residual"
        );
    }
    // A NAT-shifted segment from a peer configured without NAT is a mismatch.
    let mut f = v4(V4_NAT_ORIG, LOCAL4, L4::Tcp, &payload(100));
    f[ETH + 12..ETH + 16].copy_from_slice(&V4_OBSERVE.octets());
    assert_eq!(
        h.run(&f),
        Outcome::mismatch(P_V4_OBSERVE, Proto::Tcp as usize, false)
    );
}

#[test]
fn learning_peers_pass_unverified_and_report_their_residual() {
    if skip_unless_root("learning_peers_pass_unverified_and_report_their_residual") {
        return;
    }
    let mut h = Harness::new();
    let want = nat_peer_learns(&mut h, Mode::Observe);
    assert_ne!(want, 0);
    let mut f = v4(V4_NAT_ORIG, V4_NAT_ORIG_DST, L4::Tcp, &payload(900));
    f[ETH + 12..ETH + 16].copy_from_slice(&V4_NAT_SEEN.octets());
    f[ETH + 16..ETH + 20].copy_from_slice(&LOCAL4.octets());
    let mut bad = f.clone();
    let last = bad.len() - 1;
    bad[last] ^= 0x10;
    // Address scope: the mapping is the address pair, with no encapsulation ports.
    let mut key = SaKey {
        peer_id: P_V4_NAT as u32,
        ..SaKey::default()
    };
    key.src[..4].copy_from_slice(&V4_NAT_SEEN.octets());
    key.dst[..4].copy_from_slice(&LOCAL4.octets());
    for (frame, intact) in [(&f, true), (&bad, false)] {
        let out = h.run(frame);
        // Passed, not verified, not a mismatch, not dropped, and one learning sample, not a
        // mismatch event. (Enforce mode holds TCP instead: see below.)
        let mut expect = Outcome::zero(PASS);
        expect.peers[P_V4_NAT].learning[Proto::Tcp as usize] = 1;
        let residual = out.learning.first().map_or(0, |l| l.residual);
        expect.learning = vec![Learning {
            key,
            kind: LearningKind::Sample {
                held: false,
                proto: Some(Proto::Tcp),
            },
            residual,
            spi: 0,
            reqid: 0,
            state: 0,
        }];
        assert_eq!(out, expect);
        // The intact segment leaves exactly the residual the NAT addresses imply; the
        // corrupted one leaves another.
        assert_eq!(residual == want, intact, "{out:?}");
    }
    // Once userspace installs the learned residual, the peer is verified.
    h.v.peer_maps()
        .unwrap()
        .set_sa_residual(key, 0, want)
        .unwrap();
    assert_eq!(
        h.run(&f),
        Outcome::verified(P_V4_NAT, Proto::Tcp as usize, l4_len(&f))
    );
    assert_eq!(
        h.run(&bad),
        Outcome::mismatch(P_V4_NAT, Proto::Tcp as usize, false)
    );
}

/// The NAT peer of `table()` as a learning peer in enforce mode, with `residual` installed for
/// its one address pair (address scope: no ports, no SPI). Returns the harness, the key and the
/// residual its intact segments leave.
fn learned_nat_peer(installed: impl FnOnce(u16) -> u16) -> (Harness, SaKey, u16) {
    let mut h = Harness::new();
    let want = nat_peer_learns(&mut h, Mode::Enforce);
    let mut key = SaKey {
        peer_id: P_V4_NAT as u32,
        ..SaKey::default()
    };
    key.src[..4].copy_from_slice(&V4_NAT_SEEN.octets());
    key.dst[..4].copy_from_slice(&LOCAL4.octets());
    h.v.peer_maps()
        .unwrap()
        .set_sa_residual(key, 0, installed(want))
        .unwrap();
    (h, key, want)
}

/// A TCP segment of the NAT peer with sequence number `seq`, as it arrives after the NAT; with
/// `delta`, a constant added to one payload word, so every such segment leaves the same wrong
/// residual whatever its sequence number (the shape a stuck bit leaves on repetitive data).
fn nat_segment(seq: u32, delta: u16) -> Vec<u8> {
    let mut out = Vec::new();
    etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(V4_NAT_ORIG.octets(), V4_NAT_ORIG_DST.octets(), 64)
        .tcp(40000, 2181, seq, 64240)
        .ack(99)
        .write(&mut out, &[0x5a; 600])
        .unwrap();
    out[ETH + 12..ETH + 16].copy_from_slice(&V4_NAT_SEEN.octets());
    out[ETH + 16..ETH + 20].copy_from_slice(&LOCAL4.octets());
    let at = ETH + 20 + 20 + 100;
    let word = u16::from_be_bytes([out[at], out[at + 1]]).wrapping_add(delta);
    out[at..at + 2].copy_from_slice(&word.to_be_bytes());
    out
}

/// The withdrawal criterion, exactly: 16 consecutive distinct segments of one SA that leave one
/// identical other residual, with none verifying in between. Corruption with a constant delta
/// that spares one segment in 16, or that repeats on one segment's retransmissions, never
/// withdraws the residual; every corrupted segment is a mismatch and dropped.
#[test]
fn a_residual_is_withdrawn_only_by_an_unbroken_streak_of_distinct_segments() {
    if skip_unless_root("a_residual_is_withdrawn_only_by_an_unbroken_streak_of_distinct_segments") {
        return;
    }
    let streak = monitor_ebpf::WITHDRAW_AFTER as u32;
    let (mut h, key, want) = learned_nat_peer(|w| w);
    let withdrawn = |h: &Harness| {
        h.v.stats()
            .trust(monitor_ebpf::TrustCounter::Withdrawn)
            .unwrap()
    };
    let corrupt = |_| Outcome::mismatch(P_V4_NAT, Proto::Tcp as usize, true);
    let intact = nat_segment(1, 0);
    let len = l4_len(&intact);
    let mut seq = 1000u32;
    // Every k-th segment intact, the rest corrupted alike, for k from 2 to 16.
    for k in 2..=streak {
        for i in 0..4 * k {
            seq += 600;
            if i % k == k - 1 {
                assert_eq!(
                    h.run(&nat_segment(seq, 0)),
                    Outcome::verified(P_V4_NAT, Proto::Tcp as usize, len)
                );
            } else {
                assert_eq!(
                    h.run(&nat_segment(seq, 0x0100)),
                    corrupt(seq),
                    "k={k} i={i}"
                );
            }
        }
    }
    // One segment corrupted alike on every retransmission counts once.
    for _ in 0..100 {
        assert_eq!(h.run(&nat_segment(7, 0x0100)), corrupt(7));
    }
    assert_eq!(withdrawn(&h), 0);
    assert_eq!(
        h.run(&intact),
        Outcome::verified(P_V4_NAT, Proto::Tcp as usize, len)
    );
    // Sixteen distinct segments in a row, all leaving one other value: the residual goes with
    // the sixteenth (still dropped: it was judged against the residual in force), and the SA
    // learns again from the next segment on.
    let mut found = Vec::new();
    for i in 1..streak {
        let out = h.run(&nat_segment(90_000 + i, 0x0100));
        found.push(out.events[0].residual);
        assert_eq!(out, corrupt(i), "{i}");
    }
    found.dedup();
    assert_eq!(
        found.len(),
        1,
        "a constant delta leaves one value: {found:?}"
    );
    assert_ne!(found[0], want);
    let mut last = h.run(&nat_segment(90_000 + streak, 0x0100));
    assert_eq!(last.learning.len(), 1, "{last:?}");
    let news = last.learning.remove(0);
    assert_eq!(
        (news.key, news.kind, news.residual),
        (key, LearningKind::Withdrawn { found: found[0] }, want)
    );
    assert_eq!(last, corrupt(0));
    assert_eq!(withdrawn(&h), 1);
    // Learning again, in enforce mode: the next segment is held, its retransmission confirms.
    let mut learning = Outcome::zero(DROP);
    learning.peers[P_V4_NAT].learning[Proto::Tcp as usize] = 1;
    let out = h.run(&intact);
    assert_eq!(
        (out.verdict, out.peers[P_V4_NAT], out.learning.len()),
        (DROP, learning.peers[P_V4_NAT], 1)
    );
    assert_eq!(out.learning[0].kind, HELD);
    let out = h.run(&intact);
    assert_eq!(
        (out.verdict, out.learning[0].kind, out.learning[0].residual),
        (PASS, LearningKind::Confirmed, want)
    );
}

/// A wrong residual (say, learned from a flood) refuses the SA's intact segments, which all
/// leave the true one: 16 distinct ones withdraw it, and the SA learns again.
#[test]
fn a_wrong_residual_refusing_intact_traffic_is_withdrawn_after_sixteen_segments() {
    if skip_unless_root(
        "a_wrong_residual_refusing_intact_traffic_is_withdrawn_after_sixteen_segments",
    ) {
        return;
    }
    let (mut h, _, want) = learned_nat_peer(|w| w ^ 0x0bad);
    let streak = monitor_ebpf::WITHDRAW_AFTER as u32;
    for i in 1..=streak {
        let out = h.run(&nat_segment(i * 600, 0));
        assert_eq!(out.verdict, DROP, "{i}");
        assert_eq!(out.learning.len(), usize::from(i == streak), "{i}: {out:?}");
        if i == streak {
            assert_eq!(
                (out.learning[0].kind, out.learning[0].residual),
                (LearningKind::Withdrawn { found: want }, want ^ 0x0bad)
            );
        }
    }
    // Held, then confirmed by its retransmission: the true residual.
    let out = h.run(&nat_segment(1, 0));
    assert_eq!((out.verdict, out.learning[0].residual), (DROP, want));
    let out = h.run(&nat_segment(1, 0));
    assert_eq!(
        (out.verdict, out.learning[0].kind, out.learning[0].residual),
        (PASS, LearningKind::Confirmed, want)
    );
}

/// Enforce mode delivers no TCP segment of an SA without a residual unverified: each is held
/// (dropped, for TCP to retransmit) until a copy of the same segment leaves the same residual,
/// which then becomes the SA's. A corrupted first copy only changes the candidate.
#[test]
fn enforce_mode_holds_tcp_until_a_retransmission_confirms_the_residual() {
    if skip_unless_root("enforce_mode_holds_tcp_until_a_retransmission_confirms_the_residual") {
        return;
    }
    let mut h = Harness::new();
    let want = nat_peer_learns(&mut h, Mode::Enforce);
    let held = |out: &Outcome| {
        let mut expect = Outcome::zero(DROP);
        expect.peers[P_V4_NAT].learning[Proto::Tcp as usize] = 1;
        (
            out.verdict,
            out.peers[P_V4_NAT],
            out.learning.iter().map(|l| l.kind).collect::<Vec<_>>(),
        ) == (DROP, expect.peers[P_V4_NAT], vec![HELD])
    };
    let (first, intact) = (nat_segment(100, 0x0100), nat_segment(100, 0));
    // The first copy was corrupted: held. Its retransmission, intact, leaves another residual:
    // the candidate changes, held again. The next copy confirms it.
    let out = h.run(&first);
    assert!(held(&out), "{out:?}");
    let out = h.run(&intact);
    assert!(held(&out), "{out:?}");
    let mut out = h.run(&intact);
    assert_eq!(out.learning.len(), 1, "{out:?}");
    let news = out.learning.remove(0);
    assert_eq!((news.kind, news.residual), (LearningKind::Confirmed, want));
    assert_eq!(
        out,
        Outcome::verified(P_V4_NAT, Proto::Tcp as usize, l4_len(&intact))
    );
    // From now on the SA is verified, and a corrupted segment is a mismatch, dropped.
    assert_eq!(
        h.run(&nat_segment(700, 0)),
        Outcome::verified(P_V4_NAT, Proto::Tcp as usize, l4_len(&intact))
    );
    assert_eq!(
        h.run(&nat_segment(1300, 0x0100)),
        Outcome::mismatch(P_V4_NAT, Proto::Tcp as usize, true)
    );
    assert_eq!(
        (
            h.v.stats()
                .trust(monitor_ebpf::TrustCounter::Confirmed)
                .unwrap(),
            h.v.stats()
                .trust(monitor_ebpf::TrustCounter::HeldDropped)
                .unwrap()
        ),
        (1, 2)
    );
}

/// Enforce mode, no NAT: an SA's first TCP segment sums to residual 0 and installs it at once;
/// UDP of an SA without a residual is passed (nobody retransmits it) and learned by the daemon.
#[test]
fn enforce_mode_installs_residual_zero_at_once_and_passes_udp_while_learning() {
    if skip_unless_root("enforce_mode_installs_residual_zero_at_once_and_passes_udp_while_learning")
    {
        return;
    }
    let mut h = Harness::new();
    let want = nat_peer_learns(&mut h, Mode::Enforce);
    // UDP through the NAT, before any residual: passed, one learning sample.
    let mut udp = v4(V4_NAT_ORIG, V4_NAT_ORIG_DST, L4::Udp, &payload(300));
    udp[ETH + 12..ETH + 16].copy_from_slice(&V4_NAT_SEEN.octets());
    udp[ETH + 16..ETH + 20].copy_from_slice(&LOCAL4.octets());
    let out = h.run(&udp);
    assert_eq!(
        (
            out.verdict,
            out.peers[P_V4_NAT].learning[Proto::Udp as usize],
            out.learning[0].residual
        ),
        (PASS, 1, want)
    );
    // A TCP segment that sums to 0, as every intact segment of an SA without NAT does (here one
    // sent from the address it arrives from), installs 0 at once.
    let mut zero = v4(V4_NAT_SEEN, LOCAL4, L4::Tcp, &payload(300));
    zero[ETH + 12..ETH + 16].copy_from_slice(&V4_NAT_SEEN.octets());
    let mut out = h.run(&zero);
    assert_eq!(out.learning.len(), 1, "{out:?}");
    let news = out.learning.remove(0);
    assert_eq!((news.kind, news.residual), (LearningKind::Confirmed, 0));
    assert_eq!(
        out,
        Outcome::verified(P_V4_NAT, Proto::Tcp as usize, l4_len(&zero))
    );
}
