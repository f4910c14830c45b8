//! Diffs and shapes on constructed pairs, and the pairing table's bounds.

use etherparse::PacketBuilder;

use super::*;

/// An IPv4 TCP segment with timestamps (a 32-byte header) carrying `payload`.
fn packet(seq: u32, tsval: u32, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ipv4([10, 1, 0, 1], [10, 2, 0, 1], 64)
        .tcp(40000, 5001, seq, 1000)
        .options(&[
            etherparse::TcpOptionElement::Noop,
            etherparse::TcpOptionElement::Noop,
            etherparse::TcpOptionElement::Timestamp(tsval, 7),
        ])
        .unwrap();
    let mut out = Vec::new();
    b.write(&mut out, payload).unwrap();
    out
}

/// Bytes that are never zero, never repeat within 251, and differ from their neighbours.
fn data(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8 + 1).collect()
}

fn diff_of(bad: &[u8], good: &[u8]) -> Diff {
    diff(
        &Segment::parse(&packet(7, 1, bad)).unwrap(),
        &Segment::parse(&packet(7, 2, good)).unwrap(),
    )
}

#[test]
fn a_single_flipped_bit_is_found_at_its_offset() {
    let good = data(1400);
    let mut bad = good.clone();
    bad[700] ^= 0x10;
    let d = diff_of(&bad, &good);
    assert_eq!(
        d.runs,
        vec![Run {
            start: 32 + 700,
            len: 1,
            bits: 1
        }]
    );
    assert_eq!(
        (d.shape, d.compared, d.payload_offset),
        (Shape::BitFlip, 1400, 32)
    );
    assert_eq!(d.runs_text(), "732+1(1b)");
}

#[test]
fn a_garbled_cbc_block_and_the_next_blocks_flipped_word_are_a_cipher_block() {
    let good = data(1400);
    let mut bad = good.clone();
    // Block 20 of the ESP payload is segment bytes 320..336: payload 288..304. The next
    // block has the overwritten ciphertext word's bytes 4..8 flipped.
    for (i, b) in bad[288..304].iter_mut().enumerate() {
        *b ^= 0x5b + i as u8;
    }
    for b in &mut bad[308..312] {
        *b ^= 0xc3;
    }
    let d = diff_of(&bad, &good);
    assert_eq!(d.shape, Shape::CipherBlock);
    assert_eq!(d.blocks(), Some((20, 21)));
    assert_eq!(d.changed(), 20);
    assert_eq!(
        d.runs_text(),
        format!("320+16({}b) 340+4(16b)", d.runs[0].bits)
    );
}

#[test]
fn a_zeroed_run_is_found_whole() {
    let good = data(1400);
    let mut bad = good.clone();
    bad[100..164].fill(0);
    let d = diff_of(&bad, &good);
    assert_eq!(d.shape, Shape::ZeroedRun);
    assert_eq!(
        d.runs,
        vec![Run {
            start: 132,
            len: 64,
            bits: good[100..164].iter().map(|b| b.count_ones()).sum()
        }]
    );
}

#[test]
fn copied_and_repeated_bytes_are_a_repeated_run() {
    let good = data(1400);
    let mut bad = good.clone();
    bad.copy_within(0..24, 500);
    assert_eq!(diff_of(&bad, &good).shape, Shape::RepeatedRun);
    let mut bad = good.clone();
    bad[500..510].fill(0xa5);
    assert_eq!(diff_of(&bad, &good).shape, Shape::RepeatedRun);
}

#[test]
fn an_aligned_run_other_and_unchanged() {
    let good = data(1400);
    let mut bad = good.clone();
    // The segment starts at packet byte 20 and its payload at 52: packet byte 128 is
    // payload byte 76. 128 bytes of noise there are two whole 64-byte units.
    for (i, b) in bad[76..204].iter_mut().enumerate() {
        *b ^= 0x77 ^ (i as u8).wrapping_mul(3);
        if *b == 0 {
            *b = 1;
        }
    }
    let d = diff_of(&bad, &good);
    assert_eq!(d.shape, Shape::AlignedRun, "{d:?}");
    // One byte XORed with 0x5a (the host injector's fault): four bits, no pattern.
    let mut bad = good.clone();
    bad[700] ^= 0x5a;
    assert_eq!(diff_of(&bad, &good).shape, Shape::Other);
    assert_eq!(diff_of(&good, &good).shape, Shape::Unchanged);
}

#[test]
fn only_the_bytes_both_copies_hold_are_compared() {
    let good = data(1400);
    let mut bad = good[..600].to_vec();
    bad[599] ^= 1;
    let d = diff_of(&bad, &good);
    assert_eq!((d.compared, d.changed(), d.shape), (600, 1, Shape::BitFlip));
}

#[test]
fn pairing_matches_flow_and_sequence_and_is_bounded() {
    let t0 = Instant::now();
    let mut p = Pairing::new(2, Duration::from_secs(10));
    let good = data(100);
    let mut bad = good.clone();
    bad[5] ^= 1;
    assert!(p.corrupted(packet(1, 1, &bad), t0, 1).is_empty());
    assert!(p.corrupted(packet(2, 1, &bad), t0, 2).is_empty());
    // A third pushes the oldest out, unpaired.
    let out = p.corrupted(packet(3, 1, &bad), t0, 3);
    assert!(matches!(out.as_slice(), [Outcome::Unpaired { bad, .. }] if bad.tag == 1));
    // Another flow's segment with sequence number 2 pairs with nothing.
    let mut other = packet(2, 2, &good);
    other[12] = 99;
    assert!(p.intact(&other).is_empty());
    let out = p.intact(&packet(2, 2, &good));
    let [Outcome::Paired { bad, diff }] = out.as_slice() else {
        panic!("{out:?}")
    };
    assert_eq!(
        (bad.tag, diff.shape, diff.runs_text().as_str()),
        (2, Shape::BitFlip, "37+1(1b)")
    );
    assert_eq!(p.len(), 1);
    // Past the window, the last is unpaired; a non-TCP packet is unpaired at once.
    assert!(p.expire(t0 + Duration::from_secs(9)).is_empty());
    let out = p.expire(t0 + Duration::from_secs(10));
    assert!(matches!(out.as_slice(), [Outcome::Unpaired { bad, .. }] if bad.tag == 3));
    assert!(p.is_empty());
    let out = p.corrupted(vec![0x45, 0, 0, 20], t0, 4);
    assert!(matches!(
        out.as_slice(),
        [Outcome::Unpaired {
            why: "not a TCP segment",
            ..
        }]
    ));
}

#[test]
fn every_shape_has_a_label_and_a_layer() {
    for s in Shape::ALL {
        assert_eq!(Shape::from_label(s.as_str()), Some(s));
    }
    let layers: std::collections::HashSet<&str> =
        Shape::ALL.iter().map(|s| s.points_at()).collect();
    assert_eq!(layers.len(), Shape::ALL.len(), "each shape says its own");
}

#[test]
fn a_waiting_copy_keeps_the_segment_it_was_parsed_into() {
    let t0 = Instant::now();
    let mut pkt = packet(9, 1, &data(300));
    // A snap-length cut: the segment is what the capture holds.
    pkt.truncate(200);
    let w = Waiting::parsed(pkt.clone(), t0, ());
    assert_eq!(w.segment(), Segment::parse(&pkt));
    let s = w.segment().unwrap();
    assert_eq!(
        (s.key.seq, s.offset, s.header_len, s.bytes.len()),
        (9, 20, 32, 180)
    );
    // Observe mode's copies are never paired, so never parsed.
    assert_eq!(Waiting::unparsed(pkt, t0, ()).segment(), None);
    // Nor is a packet without TCP.
    assert_eq!(
        Waiting::parsed(vec![0x45, 0, 0, 20], t0, ()).segment(),
        None
    );
}
