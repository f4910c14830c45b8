//! What the daemon made of each corrupted copy: the shapes it counted and, in the capture file,
//! the comment on each intact retransmission with the shape and the changed runs it found.
//! Judged against what the nft rule did to the packet (`plan::CORRUPT_BIT`).

use std::path::Path;

use natt_monitor::{
    forensics::{CIPHER_BLOCK, Run, Segment, Shape, diff},
    peers::Mode,
    report::Note,
};

use crate::{
    plan::{CORRUPT_BIT, ZERO_RUN_BIT, ZERO_RUN_BYTES},
    processes::{capture_path, metric},
    scenarios::{Cipher, Corruption, Scenario, Setup},
};

/// The shapes a scenario's daemon counted, and the intact copies its capture holds.
#[derive(Clone, Debug, Default)]
pub(crate) struct Shapes {
    /// `natt_monitor_corruption_shapes_total`, every shape but `unpaired` that is not 0.
    pub(crate) paired: Vec<(Shape, u64)>,
    /// `natt_monitor_corruption_shapes_total{shape="unpaired"}`.
    pub(crate) unpaired: u64,
    /// `natt_monitor_corruption_copies_waiting`.
    pub(crate) waiting: u64,
    /// Each pair in the capture file, compared again here from its two packets.
    pub(crate) pairs: Vec<Pair>,
    /// Read from a scrape and a capture (the scenarios that do not read them are not judged).
    pub(crate) read: bool,
}

/// One corrupted copy and its intact retransmission, as the capture file holds them.
#[derive(Clone, Debug)]
pub(crate) struct Pair {
    /// The intact copy's comment after `shape `: `bit_flip; changed 1 bytes, 1 bits: 184+1(1b)`.
    pub(crate) comment: String,
    /// The changed runs, from the two packets.
    pub(crate) runs: Vec<Run>,
    /// The corrupted copy's TCP segment, from its header's first byte.
    pub(crate) bad: Vec<u8>,
}

/// The ESP payload's first byte, counted from the UDP header: UDP, ESP's SPI and sequence
/// number, and the IV (CBC's 16 bytes; the null cipher has none).
const fn esp_payload(cipher: Cipher) -> u32 {
    match cipher {
        Cipher::Null => 16,
        Cipher::CbcAes => 32,
    }
}

impl Shapes {
    /// Reads the scrape `text` and scenario `name`'s capture file.
    pub(crate) fn read(text: &str, name: &str) -> Self {
        let count = |s: Shape| {
            metric(
                text,
                &format!(
                    "natt_monitor_corruption_shapes_total{{shape=\"{}\"}}",
                    s.as_str()
                ),
            )
        };
        Self {
            paired: Shape::ALL
                .into_iter()
                .filter(|s| *s != Shape::Unpaired)
                .map(|s| (s, count(s)))
                .filter(|(_, n)| *n > 0)
                .collect(),
            unpaired: count(Shape::Unpaired),
            waiting: metric(text, "natt_monitor_corruption_copies_waiting"),
            pairs: pairs_in(&capture_path(name)),
            read: true,
        }
    }

    /// `cipher_block:58,unpaired:2,waiting:0`.
    pub(crate) fn summary(&self) -> String {
        let mut parts: Vec<String> = self
            .paired
            .iter()
            .map(|(s, n)| format!("{s}:{n}"))
            .collect();
        parts.push(format!("unpaired:{}", self.unpaired));
        parts.push(format!("waiting:{}", self.waiting));
        parts.join(",")
    }

    /// Whether the shapes are what the scenario's rule makes, of `detected` mismatches: in
    /// enforce mode every pair in the file has the rule's shape with its changed bytes where
    /// the rule wrote, and every corrupted copy was counted with that shape, or as unpaired or
    /// waiting (a spurious retransmission has no retransmission of its own); in observe mode
    /// nothing is paired.
    pub(crate) fn judge(&self, s: &Scenario, detected: u64) -> Result<(), String> {
        // `p-sighup-enforce` starts in observe mode and reloads to enforce mode mid-run: its
        // capture holds copies of both, so neither mode's claim is its own.
        if !s.corrupt || !self.read || s.setup == Setup::Sighup {
            return Ok(());
        }
        if s.mode == Mode::Observe {
            return if self.paired.is_empty() && self.pairs.is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "observe mode paired copies: {}; {:?}",
                    self.summary(),
                    self.pairs
                ))
            };
        }
        let Some((shape, check)) = expected(s) else {
            return Ok(());
        };
        let n = self.pairs.len() as u64;
        let wrong: Vec<&Pair> = self.pairs.iter().filter(|p| !check(p)).collect();
        let counted = match self.paired.as_slice() {
            [(only, c)] if *only == shape => Some(*c),
            _ => None,
        };
        if n > 0
            && wrong.is_empty()
            && counted.is_some_and(|c| c >= n && c + self.unpaired + self.waiting == detected)
        {
            Ok(())
        } else {
            Err(format!(
                "shapes {} of {detected} mismatches; want {shape} alone, for at least the {n} pairs in the capture, each changed where the rule wrote and nowhere else; not so: {:?}",
                self.summary(),
                wrong
                    .iter()
                    .map(|p| (&p.comment, &p.runs))
                    .collect::<Vec<_>>()
            ))
        }
    }
}

/// A test of one pair against what the rule did.
type PairCheck = Box<dyn Fn(&Pair) -> bool>;

/// Whether every changed byte of `p` lies in one of `ranges` (segment offsets).
fn within(p: &Pair, ranges: &[std::ops::Range<usize>]) -> bool {
    p.runs.iter().all(|r| {
        ranges
            .iter()
            .any(|g| g.start <= r.start && r.start + r.len <= g.end)
    })
}

/// The shape a scenario's rule makes in enforce mode, and the test of each pair: its shape,
/// and its changed bytes exactly where the rule wrote (compared again here from the packets).
fn expected(s: &Scenario) -> Option<(Shape, PairCheck)> {
    // The rule's first byte, from the TCP header's (the ESP payload's) first.
    let at = (CORRUPT_BIT / 8 - esp_payload(s.cipher)) as usize;
    match (s.cipher, s.corruption) {
        // The overwritten ciphertext word garbles its plaintext block and flips the same four
        // bytes of the next: block `at / 16`, and `at + 16 .. at + 20`; nothing else.
        (Cipher::CbcAes, Corruption::Word) => {
            let block = at / CIPHER_BLOCK * CIPHER_BLOCK;
            Some((
                Shape::CipherBlock,
                Box::new(move |p: &Pair| {
                    p.comment.starts_with("cipher_block;")
                        && within(p, &[block..block + CIPHER_BLOCK, at + 16..at + 20])
                        && p.runs
                            .first()
                            .is_some_and(|r| r.start < block + CIPHER_BLOCK)
                }),
            ))
        }
        // The rule sets the lowest bit of one byte of a stream whose bytes have it clear.
        (Cipher::Null, Corruption::BitFlip { .. }) => {
            let want = format!("bit_flip; changed 1 bytes, 1 bits: {at}+1(1b)");
            Some((
                Shape::BitFlip,
                Box::new(move |p: &Pair| {
                    p.comment == want
                        && p.runs
                            == [Run {
                                start: at,
                                len: 1,
                                bits: 1,
                            }]
                }),
            ))
        }
        // The rule zeroes `ZERO_RUN_BYTES`: those bytes are 0 in the corrupted copy, and only
        // they changed (a byte the stream had 0 already did not).
        (Cipher::Null, Corruption::ZeroRun { .. }) => {
            let at = (ZERO_RUN_BIT / 8 - esp_payload(s.cipher)) as usize;
            let end = at + ZERO_RUN_BYTES as usize;
            Some((
                Shape::ZeroedRun,
                Box::new(move |p: &Pair| {
                    p.comment.starts_with("zeroed_run;")
                        && within(p, std::slice::from_ref(&(at..end)))
                        && p.bad
                            .get(at..end)
                            .is_some_and(|z| z.iter().all(|&b| b == 0))
                }),
            ))
        }
        _ => None,
    }
}

/// Each pair in the file at `path`: an intact copy whose comment names the corrupted one.
fn pairs_in(path: &Path) -> Vec<Pair> {
    let Ok(file) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let Ok(mut r) = pcap_file::pcapng::PcapNgReader::new(file) else {
        return Vec::new();
    };
    let mut packets: Vec<Vec<u8>> = Vec::new();
    let mut out = Vec::new();
    while let Some(Ok(block)) = r.next_block() {
        let pcap_file::pcapng::Block::EnhancedPacket(p) = block else {
            continue;
        };
        let data = p.data.to_vec();
        for o in &p.options {
            if let pcap_file::pcapng::blocks::enhanced_packet::EnhancedPacketOption::Comment(c) = o
                && let Some(Note::Intact { of: Some(n) }) = Note::parse(c)
                && let Some((_, comment)) = c.split_once("; shape ")
                && let Some(bad) = usize::try_from(n)
                    .ok()
                    .and_then(|n| packets.get(n.checked_sub(1)?))
                && let (Some(b), Some(g)) = (Segment::parse(bad), Segment::parse(&data))
            {
                out.push(Pair {
                    comment: comment.to_owned(),
                    runs: diff(&b, &g).runs,
                    bad: b.bytes.to_vec(),
                });
            }
        }
        packets.push(data);
    }
    out
}
