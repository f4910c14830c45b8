//! `natt-monitor report FILE...`: what a capture says, for an incident or a vendor ticket.
//!
//! The capture task comments every packet it writes (`Note`): a corrupted copy with its SA and
//! checksums, an intact retransmission with the number of the copy it repairs. The report reads
//! those comments to link the two, compares the copies again itself (`forensics::diff`, the
//! daemon's own code), and prints, per peer and SA: how many corrupted copies, dropped or
//! passed, first and last seen, the shapes, the changed offsets and cipher blocks that recur,
//! and the likely layer with its reasoning. The format is documented in docs/forensics.md and
//! held by a golden test.

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    fs::File,
    path::{Path, PathBuf},
    time::Duration,
};

use pcap_file::pcapng::{Block, PcapNgReader, blocks::enhanced_packet::EnhancedPacketOption};

use crate::forensics::{Diff, Segment, Shape, diff};

/// Prefix of every comment natt-monitor writes.
const PREFIX: &str = "natt-monitor: ";
/// Offsets and blocks a report lists per SA; the rest are counted.
const LISTED: usize = 4;

/// What natt-monitor says of one captured packet, in its pcapng comment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Note {
    /// A packet whose checksum did not match.
    Corrupted {
        /// Dropped (enforce mode) or passed (observe mode).
        dropped: bool,
        /// The SA's SPI (0 when none is known).
        spi: u32,
        /// The SA's encapsulation ports.
        encap: [u16; 2],
        /// The checksum field found and the one the bytes call for.
        found: u16,
        /// See `found`.
        expected: u16,
        /// The peer's label.
        peer: String,
    },
    /// TCP's intact retransmission of a dropped copy.
    Intact {
        /// The corrupted copy's number in the file, when it was written.
        of: Option<u64>,
    },
}

impl Note {
    /// The comment, with what a compared copy showed (`Intact` only).
    #[must_use]
    pub fn text(&self, diff: Option<&Diff>) -> String {
        match self {
            Self::Corrupted {
                dropped,
                spi,
                encap,
                found,
                expected,
                peer,
            } => format!(
                "{PREFIX}checksum mismatch, {}; spi {spi:#010x}; encap {}->{}; checksum {found:#06x}, expected {expected:#06x}; peer {peer}",
                if *dropped { "dropped" } else { "passed" },
                encap[0],
                encap[1],
            ),
            Self::Intact { of } => {
                let mut s = format!(
                    "{PREFIX}intact retransmission of packet {}",
                    of.map_or_else(|| "(not captured)".to_owned(), |n| n.to_string())
                );
                if let Some(d) = diff {
                    let _ = write!(
                        s,
                        "; shape {}; changed {} bytes, {} bits: {}",
                        d.shape,
                        d.changed(),
                        d.bits(),
                        d.runs_text()
                    );
                }
                s
            }
        }
    }

    /// Reads a comment natt-monitor wrote; `None` for any other text.
    #[must_use]
    pub fn parse(text: &str) -> Option<Self> {
        let rest = text.strip_prefix(PREFIX)?;
        if let Some(r) = rest.strip_prefix("intact retransmission of packet ") {
            let number = r.split(';').next()?.trim();
            return Some(Self::Intact {
                of: number.parse().ok(),
            });
        }
        let r = rest.strip_prefix("checksum mismatch, ")?;
        let (action, r) = r.split_once("; spi ")?;
        let (spi, r) = r.split_once("; encap ")?;
        let (encap, r) = r.split_once("; checksum ")?;
        let (found, r) = r.split_once(", expected ")?;
        let (expected, peer) = r.split_once("; peer ")?;
        let hex16 = |s: &str| u16::from_str_radix(s.strip_prefix("0x")?, 16).ok();
        let (sport, dport) = encap.split_once("->")?;
        Some(Self::Corrupted {
            dropped: match action {
                "dropped" => true,
                "passed" => false,
                _ => return None,
            },
            spi: u32::from_str_radix(spi.strip_prefix("0x")?, 16).ok()?,
            encap: [sport.parse().ok()?, dport.parse().ok()?],
            found: hex16(found)?,
            expected: hex16(expected)?,
            peer: peer.to_owned(),
        })
    }
}

/// Why a report could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// A file could not be read as pcapng.
    #[error("{}: {why}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
}

/// One captured packet.
struct Packet {
    at: Duration,
    data: Vec<u8>,
    note: Option<Note>,
}

fn read(path: &Path) -> Result<Vec<Packet>, ReportError> {
    let fail = |why: String| ReportError::File {
        path: path.to_owned(),
        why,
    };
    let file = File::open(path).map_err(|e| fail(e.to_string()))?;
    let mut r = PcapNgReader::new(file).map_err(|e| fail(format!("not a pcapng file ({e})")))?;
    let mut out = Vec::new();
    while let Some(block) = r.next_block() {
        let block = block.map_err(|e| fail(format!("block {}: {e}", out.len() + 1)))?;
        if let Block::EnhancedPacket(p) = block {
            let note = p.options.iter().find_map(|o| match o {
                EnhancedPacketOption::Comment(c) => Note::parse(c),
                _ => None,
            });
            out.push(Packet {
                at: p.timestamp,
                data: p.data.into_owned(),
                note,
            });
        }
    }
    Ok(out)
}

/// What one SA's corrupted copies add up to.
#[derive(Default)]
struct SaSummary {
    copies: u64,
    dropped: u64,
    first: Option<Duration>,
    last: Option<Duration>,
    shapes: BTreeMap<&'static str, u64>,
    runs: HashMap<(usize, usize), u64>,
    blocks: HashMap<(usize, usize), u64>,
}

impl SaSummary {
    fn seen(&mut self, at: Duration, dropped: bool) {
        self.copies += 1;
        self.dropped += u64::from(dropped);
        self.first = Some(self.first.map_or(at, |f| f.min(at)));
        self.last = Some(self.last.map_or(at, |l| l.max(at)));
    }

    fn shape(&mut self, d: Option<&Diff>) {
        let Some(d) = d else {
            *self.shapes.entry(Shape::Unpaired.as_str()).or_default() += 1;
            return;
        };
        *self.shapes.entry(d.shape.as_str()).or_default() += 1;
        for r in &d.runs {
            *self.runs.entry((r.start, r.len)).or_default() += 1;
        }
        if let Some(b) = d.blocks() {
            *self.blocks.entry(b).or_default() += 1;
        }
    }

    /// The shape most paired copies have, and how many of how many.
    fn likely(&self) -> Option<(Shape, u64, u64)> {
        let paired = self
            .shapes
            .iter()
            .filter(|(s, _)| **s != Shape::Unpaired.as_str());
        let total: u64 = paired.clone().map(|(_, n)| n).sum();
        let (shape, n) = paired.max_by_key(|(s, n)| (**n, std::cmp::Reverse(**s)))?;
        Some((Shape::from_label(shape)?, *n, total))
    }

    /// The SA's block of the report.
    fn write(&self, (peer, spi, encap): &(String, u32, [u16; 2]), out: &mut String) {
        let s = self;
        let _ = writeln!(
            out,
            "\npeer {peer}, spi {spi:#010x}, encap {}->{}",
            encap[0], encap[1]
        );
        let _ = writeln!(
            out,
            "  corrupted copies  {} ({} dropped, {} passed)",
            s.copies,
            s.dropped,
            s.copies - s.dropped
        );
        let _ = writeln!(
            out,
            "  first seen        {}\n  last seen         {}",
            s.first.map_or_else(String::new, utc),
            s.last.map_or_else(String::new, utc)
        );
        let shapes: Vec<String> = s.shapes.iter().map(|(k, n)| format!("{k} {n}")).collect();
        let _ = writeln!(out, "  shapes            {}", shapes.join(", "));
        let _ = writeln!(
            out,
            "  changed runs      {}",
            top(&s.runs, |(start, len)| format!("{start}+{len}"))
        );
        let _ = writeln!(
            out,
            "  cipher blocks     {}",
            top(&s.blocks, |(a, b)| format!("{a}..{b}"))
        );
        let likely = match s.likely() {
            Some((shape, n, of)) => {
                format!(
                    "{n} of {of} paired copies are {shape}: {}",
                    shape.points_at()
                )
            }
            None => format!(
                "not known: {}",
                Shape::Unpaired
                    .points_at()
                    .trim_start_matches("not known: ")
            ),
        };
        let _ = writeln!(out, "  likely layer      {likely}");
    }
}

/// Most frequent first, then by value; at most `LISTED`, and how many more.
fn top<K: Ord + Copy>(m: &HashMap<K, u64>, show: impl Fn(K) -> String) -> String {
    let mut v: Vec<(K, u64)> = m.iter().map(|(k, n)| (*k, *n)).collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut s = v
        .iter()
        .take(LISTED)
        .map(|(k, n)| format!("{} ({n})", show(*k)))
        .collect::<Vec<_>>()
        .join(", ");
    if v.len() > LISTED {
        let _ = write!(s, ", and {} more", v.len() - LISTED);
    }
    if s.is_empty() { "-".to_owned() } else { s }
}

/// The report on `paths`, as text.
///
/// # Errors
/// `ReportError::File` naming a file that cannot be read as pcapng.
pub fn report(paths: &[PathBuf]) -> Result<String, ReportError> {
    let mut out = String::from("natt-monitor corruption report\n");
    // (peer, spi, encap) -> summary, in the order first seen.
    let mut order: Vec<(String, u32, [u16; 2])> = Vec::new();
    let mut sas: HashMap<(String, u32, [u16; 2]), SaSummary> = HashMap::new();
    for path in paths {
        let packets = read(path)?;
        let mut diffs: HashMap<u64, Diff> = HashMap::new();
        let mut intact = 0;
        for p in &packets {
            if let Some(Note::Intact { of: Some(n) }) = &p.note {
                intact += 1;
                let bad = usize::try_from(*n)
                    .ok()
                    .and_then(|i| packets.get(i.checked_sub(1)?));
                if let (Some(b), Some(g)) = (
                    bad.and_then(|b| Segment::parse(&b.data)),
                    Segment::parse(&p.data),
                ) {
                    diffs.insert(*n, diff(&b, &g));
                }
            }
        }
        let mut corrupted = 0;
        for (i, p) in packets.iter().enumerate() {
            let Some(Note::Corrupted {
                dropped,
                spi,
                encap,
                peer,
                ..
            }) = &p.note
            else {
                continue;
            };
            corrupted += 1;
            let key = (peer.clone(), *spi, *encap);
            let s = sas.entry(key.clone()).or_insert_with(|| {
                order.push(key);
                SaSummary::default()
            });
            s.seen(p.at, *dropped);
            s.shape(diffs.get(&(i as u64 + 1)));
        }
        let _ = writeln!(
            out,
            "file {}: {} packets, {corrupted} corrupted copies, {intact} intact retransmissions",
            path.display(),
            packets.len()
        );
    }
    let total: u64 = sas.values().map(|s| s.copies).sum();
    for key in &order {
        sas[key].write(key, &mut out);
    }
    let _ = writeln!(
        out,
        "\n{total} corrupted copies from {} SAs; offsets count from the TCP header's first byte, cipher blocks (16 bytes) from the ESP payload's",
        order.len()
    );
    Ok(out)
}

/// `2026-12-05T05:10:34.244Z` for a time since the Unix epoch.
fn utc(t: Duration) -> String {
    let secs = t.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days.cast_signed() + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        t.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_read_back_what_they_wrote() {
        let c = Note::Corrupted {
            dropped: true,
            spi: 0x1001,
            encap: [4500, 4501],
            found: 0xc395,
            expected: 0xed95,
            peer: "zk; east/1".to_owned(),
        };
        let text = c.text(None);
        assert_eq!(
            text,
            "natt-monitor: checksum mismatch, dropped; spi 0x00001001; encap 4500->4501; checksum 0xc395, expected 0xed95; peer zk; east/1"
        );
        assert_eq!(Note::parse(&text), Some(c));
        let i = Note::Intact { of: Some(7) };
        assert_eq!(Note::parse(&i.text(None)), Some(i));
        assert_eq!(
            Note::parse(
                "natt-monitor: intact retransmission of packet (not captured); shape other"
            ),
            Some(Note::Intact { of: None })
        );
        assert_eq!(Note::parse("a comment of someone else"), None);
    }

    /// An IPv4 TCP segment from 10.1.0.1 with a 32-byte header carrying `payload`.
    fn segment(seq: u32, payload: &[u8]) -> Vec<u8> {
        let b = etherparse::PacketBuilder::ipv4([10, 1, 0, 1], [10, 2, 0, 1], 64)
            .tcp(40000, 5001, seq, 1000)
            .options(&[
                etherparse::TcpOptionElement::Noop,
                etherparse::TcpOptionElement::Noop,
                etherparse::TcpOptionElement::Timestamp(1, 2),
            ])
            .unwrap();
        let mut out = Vec::new();
        b.write(&mut out, payload).unwrap();
        out
    }

    #[test]
    fn a_report_of_two_sas_matches_its_golden_text() {
        use pcap_file::{
            DataLink,
            pcapng::{
                PcapNgWriter,
                blocks::{
                    enhanced_packet::EnhancedPacketBlock,
                    interface_description::InterfaceDescriptionBlock,
                },
            },
        };
        let good: Vec<u8> = (0..1400_usize).map(|i| (i % 251) as u8 + 1).collect();
        // SA 0x1001 (enforce): two segments with block 20 garbled and the next one's bytes
        // 4..8 flipped (CBC), each followed by its intact retransmission; a third dropped copy
        // whose retransmission is not in the file. SA 0x2002 (observe): one passed copy.
        let mut cbc = good.clone();
        for (i, b) in cbc[288..304].iter_mut().enumerate() {
            *b ^= 0x5b + i as u8;
        }
        for b in &mut cbc[308..312] {
            *b ^= 0xc3;
        }
        let mut flipped = good.clone();
        flipped[10] ^= 4;
        let bad = |spi: u32, dropped: bool| Note::Corrupted {
            dropped,
            spi,
            encap: [4500, 4500],
            found: 0x1234,
            expected: 0x4321,
            peer: "198.51.100.7/32".to_owned(),
        };
        let packets: Vec<(u64, Vec<u8>, Note)> = vec![
            (1000, segment(7, &cbc), bad(0x1001, true)),
            (1001, segment(7, &good), Note::Intact { of: Some(1) }),
            (2000, segment(9000, &cbc), bad(0x1001, true)),
            (2002, segment(9000, &good), Note::Intact { of: Some(3) }),
            (3000, segment(20000, &cbc), bad(0x1001, true)),
            (3500, segment(50, &flipped), bad(0x2002, false)),
        ];
        let dir = std::env::temp_dir().join(format!("natt-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("mismatches.pcapng");
        let mut w = PcapNgWriter::new(File::create(&path).unwrap()).unwrap();
        w.write_pcapng_block(InterfaceDescriptionBlock {
            linktype: DataLink::RAW,
            snaplen: 2048,
            options: vec![],
        })
        .unwrap();
        for (ms, data, note) in &packets {
            w.write_pcapng_block(EnhancedPacketBlock {
                interface_id: 0,
                timestamp: Duration::from_millis(1_764_900_000_000 + ms),
                original_len: data.len() as u32,
                data: data.as_slice().into(),
                options: vec![EnhancedPacketOption::Comment(note.text(None).into())],
            })
            .unwrap();
        }
        drop(w);
        let text = report(std::slice::from_ref(&path)).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let want = format!(
            "natt-monitor corruption report
file {}: 6 packets, 4 corrupted copies, 2 intact retransmissions

peer 198.51.100.7/32, spi 0x00001001, encap 4500->4500
  corrupted copies  3 (3 dropped, 0 passed)
  first seen        2025-12-05T02:00:01.000Z
  last seen         2025-12-05T02:00:03.000Z
  shapes            cipher_block 2, unpaired 1
  changed runs      320+16 (2), 340+4 (2)
  cipher blocks     20..21 (2)
  likely layer      2 of 2 paired copies are cipher_block: {}

peer 198.51.100.7/32, spi 0x00002002, encap 4500->4500
  corrupted copies  1 (0 dropped, 1 passed)
  first seen        2025-12-05T02:00:03.500Z
  last seen         2025-12-05T02:00:03.500Z
  shapes            unpaired 1
  changed runs      -
  cipher blocks     -
  likely layer      not known: no intact copy to compare (observe mode, UDP, ICMP, SCTP, or no retransmission arrived)

4 corrupted copies from 2 SAs; offsets count from the TCP header's first byte, cipher blocks (16 bytes) from the ESP payload's
",
            path.display(),
            Shape::CipherBlock.points_at()
        );
        assert_eq!(text, want);
    }

    #[test]
    fn utc_formats_the_epoch_and_a_leap_day() {
        assert_eq!(utc(Duration::ZERO), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            utc(Duration::from_millis(1_709_210_096_789)),
            "2024-02-29T12:34:56.789Z"
        );
    }
}
