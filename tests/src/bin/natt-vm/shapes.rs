//! What the daemon made of each corrupted copy: the shapes it counted and, in the capture file,
//! the comment on each intact retransmission with the shape and the changed runs it found.
//! Judged against what the nft rule did to the packet (`plan::CORRUPT_BIT`).

use std::path::Path;

use natt_monitor::{
    forensics::{CIPHER_BLOCK, Shape},
    peers::Mode,
    report::Note,
};

use crate::{
    plan::CORRUPT_BIT,
    processes::{capture_path, metric},
    scenarios::{Cipher, Corruption, Scenario},
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
    /// Each intact copy's comment after `shape `: `bit_flip; changed 1 bytes, 1 bits: 184+1(1b)`.
    pub(crate) pairs: Vec<String>,
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
            pairs: intact_comments(&capture_path(name)),
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

    /// Whether the shapes are what the scenario's rule makes: in enforce mode, every pair in
    /// the file has the rule's shape at the rule's offset, and the daemon counted that shape
    /// alone, once for each; in observe mode nothing is paired.
    pub(crate) fn judge(&self, s: &Scenario) -> Result<(), String> {
        if !s.corrupt {
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
        let wrong: Vec<&String> = self.pairs.iter().filter(|p| !check(p)).collect();
        if n > 0 && wrong.is_empty() && self.paired == [(shape, n)] {
            Ok(())
        } else {
            Err(format!(
                "shapes {}; want {shape} for each of the {n} pairs in the capture, at the rule's offset; not so: {wrong:?}",
                self.summary()
            ))
        }
    }
}

/// A test of one pair's comment.
type PairCheck = Box<dyn Fn(&str) -> bool>;

/// The shape a scenario's rule makes in enforce mode, and a test of one pair's comment.
fn expected(s: &Scenario) -> Option<(Shape, PairCheck)> {
    // The rule's first byte, from the TCP header's (the ESP payload's) first.
    let at = (CORRUPT_BIT / 8 - esp_payload(s.cipher)) as usize;
    match (s.cipher, s.corruption) {
        // The overwritten ciphertext word garbles its plaintext block and flips the same bytes
        // of the next: blocks `at / 16` and the one after, nothing else.
        (Cipher::CbcAes, Corruption::Word) => {
            let block = at / CIPHER_BLOCK;
            let want = format!("{}..{}", block, block + 1);
            Some((
                Shape::CipherBlock,
                Box::new(move |p: &str| {
                    p.starts_with("cipher_block;") && blocks(p).as_deref() == Some(want.as_str())
                }),
            ))
        }
        // The rule sets the lowest bit of one byte of a stream whose bytes have it clear.
        (Cipher::Null, Corruption::BitFlip { .. }) => {
            let want = format!("bit_flip; changed 1 bytes, 1 bits: {at}+1(1b)");
            Some((Shape::BitFlip, Box::new(move |p: &str| p == want)))
        }
        _ => None,
    }
}

/// `first..last` cipher block the runs of a comment touch.
fn blocks(comment: &str) -> Option<String> {
    let runs = comment.split_once(": ")?.1;
    let mut first = usize::MAX;
    let mut last = 0;
    for r in runs.split(' ') {
        let (start, rest) = r.split_once('+')?;
        let len: usize = rest.split('(').next()?.parse().ok()?;
        let start: usize = start.parse().ok()?;
        first = first.min(start / CIPHER_BLOCK);
        last = last.max((start + len - 1) / CIPHER_BLOCK);
    }
    Some(format!("{first}..{last}"))
}

/// Each intact copy's comment in the file, from its shape on.
fn intact_comments(path: &Path) -> Vec<String> {
    let Ok(file) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let Ok(mut r) = pcap_file::pcapng::PcapNgReader::new(file) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    while let Some(Ok(block)) = r.next_block() {
        let pcap_file::pcapng::Block::EnhancedPacket(p) = block else {
            continue;
        };
        for o in &p.options {
            if let pcap_file::pcapng::blocks::enhanced_packet::EnhancedPacketOption::Comment(c) = o
                && matches!(Note::parse(c), Some(Note::Intact { .. }))
                && let Some((_, rest)) = c.split_once("; shape ")
            {
                out.push(rest.to_owned());
            }
        }
    }
    out
}
