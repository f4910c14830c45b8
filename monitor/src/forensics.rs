//! Forensics: which bytes a corruption changed, told exactly by TCP's own retransmission.
//!
//! In enforce mode the verifier drops a corrupted TCP segment and remembers its flow and
//! sequence number; the segment of that flow and sequence number that verifies next is TCP's
//! retransmission of the same bytes, and the verifier copies it into the capture ring beside the
//! corrupted copy (`Action::Intact`). This module pairs the two copies, compares their payloads
//! byte for byte and names the shape of the difference, which points at the layer that made it
//! (`Shape::points_at`). A corrupted copy with nothing to compare against (observe mode, UDP,
//! ICMP, SCTP, a retransmission that never came) is `Shape::Unpaired`.
//!
//! Offsets are counted from the start of the TCP segment (its header's first byte). In IPsec
//! transport mode that is also the first byte of the ESP payload, so a CBC cipher block is
//! `offset / 16`. The TCP headers of the two copies legitimately differ (acknowledgement,
//! window, timestamps), so only payloads are compared.
//!
//! Bounded: at most `MAX_PAIRS` corrupted copies wait, each for at most `PAIR_WINDOW`; an
//! older or an overflowing one is reported unpaired.

use std::{
    collections::{HashMap, VecDeque},
    fmt::{self, Write as _},
    time::{Duration, Instant},
};

use etherparse::{LaxNetSlice, LaxSlicedPacket, TransportSlice};
use monitor_ebpf::{MAX_PAIRS, PAIR_WINDOW_NS, PairKey};

/// Bytes of an AES block: a CBC decryption fault garbles whole blocks of plaintext.
pub const CIPHER_BLOCK: usize = 16;
/// A DMA or cache-line boundary: runs that start on one and cover whole units of it.
pub const DMA_ALIGN: usize = 64;
/// Runs a log line or a capture comment lists; the rest are counted.
pub const LISTED_RUNS: usize = 4;
/// How long a corrupted copy waits for its retransmission.
pub const PAIR_WINDOW: Duration = Duration::from_nanos(PAIR_WINDOW_NS);

/// What a corruption looks like, from the difference between the corrupted copy and the intact
/// retransmission. A bounded label set (`natt_monitor_corruption_shapes_total{shape}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Shape {
    /// Every changed byte differs from the intact one in exactly one bit.
    BitFlip,
    /// The changes fill one or more consecutive 16-byte blocks of the ESP payload (at least
    /// half of each block's bytes), the last of which may be changed in a few bytes only: what
    /// a wrong CBC decryption of one ciphertext block does (it garbles that block and flips the
    /// matching bytes of the next).
    CipherBlock,
    /// The changed bytes, from the first to the last, are all zero.
    ZeroedRun,
    /// The changed bytes, from the first to the last, are one byte value repeated, or a copy of
    /// bytes from elsewhere in the segment.
    RepeatedRun,
    /// The changed bytes start on a 64-byte boundary of the packet and cover whole 64-byte
    /// units.
    AlignedRun,
    /// None of the above.
    Other,
    /// The payloads compared are equal: what changed lies beyond the captured bytes, or in the
    /// TCP header.
    Unchanged,
    /// No intact copy to compare with.
    Unpaired,
}

impl Shape {
    /// Every shape, in label order.
    pub const ALL: [Self; 8] = [
        Self::BitFlip,
        Self::CipherBlock,
        Self::ZeroedRun,
        Self::RepeatedRun,
        Self::AlignedRun,
        Self::Other,
        Self::Unchanged,
        Self::Unpaired,
    ];

    /// The label value.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::BitFlip => "bit_flip",
            Self::CipherBlock => "cipher_block",
            Self::ZeroedRun => "zeroed_run",
            Self::RepeatedRun => "repeated_run",
            Self::AlignedRun => "aligned_run",
            Self::Other => "other",
            Self::Unchanged => "unchanged",
            Self::Unpaired => "unpaired",
        }
    }

    /// The shape a label names.
    #[must_use]
    pub fn from_label(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|x| x.as_str() == s)
    }

    /// The layer this shape points at, and why: what an operator tells a vendor.
    #[must_use]
    pub const fn points_at(self) -> &'static str {
        match self {
            Self::BitFlip => {
                "memory or a bus: single bits flipped with no relation to cipher blocks (check ECC and EDAC counters, run a memory test)"
            }
            Self::CipherBlock => {
                "the decryption: whole 16-byte blocks of the ESP payload garbled, as a CBC fault makes them (the crypto driver or instruction set, e.g. AES-NI under a hypervisor)"
            }
            Self::ZeroedRun => {
                "DMA or buffer handling: a run of bytes never written (the NIC driver, an IOMMU, or a buffer reused too early)"
            }
            Self::RepeatedRun => {
                "DMA or buffer handling: bytes from elsewhere written over the data (a stale or shared buffer)"
            }
            Self::AlignedRun => {
                "DMA: a run on a 64-byte boundary in whole units (the NIC or an IOMMU mapping)"
            }
            Self::Other => "unknown: the changed bytes follow no pattern this tool knows",
            Self::Unchanged => {
                "beyond the captured bytes or in the TCP header: compare the copies in the capture"
            }
            Self::Unpaired => {
                "not known: no intact copy to compare (observe mode, UDP, ICMP, SCTP, or no retransmission arrived)"
            }
        }
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One run of changed bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    /// Offset of its first byte from the start of the TCP segment.
    pub start: usize,
    /// Bytes in it (each differs from the intact copy).
    pub len: usize,
    /// Bits that differ in it.
    pub bits: u32,
}

/// The difference between a corrupted copy and its intact retransmission.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diff {
    /// Maximal runs of changed bytes, in order.
    pub runs: Vec<Run>,
    /// Payload bytes compared (what both copies hold).
    pub compared: usize,
    /// Where the payload starts in the TCP segment (the corrupted copy's header length).
    pub payload_offset: usize,
    /// The shape.
    pub shape: Shape,
}

impl Diff {
    /// Bytes that differ.
    #[must_use]
    pub fn changed(&self) -> usize {
        self.runs.iter().map(|r| r.len).sum()
    }

    /// Bits that differ.
    #[must_use]
    pub fn bits(&self) -> u32 {
        self.runs.iter().map(|r| r.bits).sum()
    }

    /// The first and last cipher block touched, counted from the start of the ESP payload.
    #[must_use]
    pub fn blocks(&self) -> Option<(usize, usize)> {
        let first = self.runs.first()?;
        let last = self.runs.last()?;
        Some((
            first.start / CIPHER_BLOCK,
            (last.start + last.len - 1) / CIPHER_BLOCK,
        ))
    }

    /// The runs as `START+LEN` (bits), at most `LISTED_RUNS` of them and how many more:
    /// `1460+16(61b) 1476+4(9b)`.
    #[must_use]
    pub fn runs_text(&self) -> String {
        let mut s = String::new();
        for r in self.runs.iter().take(LISTED_RUNS) {
            if !s.is_empty() {
                s.push(' ');
            }
            let _ = write!(s, "{}+{}({}b)", r.start, r.len, r.bits);
        }
        if self.runs.len() > LISTED_RUNS {
            let _ = write!(s, " and {} more", self.runs.len() - LISTED_RUNS);
        }
        s
    }
}

/// A TCP segment in a captured packet: its flow and sequence number, header length and the
/// captured bytes from its first on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment<'a> {
    /// Flow and sequence number.
    pub key: PairKey,
    /// Where the TCP header starts in the packet.
    pub offset: usize,
    /// The TCP header's length.
    pub header_len: usize,
    /// The captured part of the segment, header included.
    pub bytes: &'a [u8],
}

impl<'a> Segment<'a> {
    /// The TCP segment of a packet that starts at its IP header (possibly cut short by the
    /// capture's snap length); `None` for anything else.
    #[must_use]
    pub fn parse(packet: &'a [u8]) -> Option<Self> {
        let p = LaxSlicedPacket::from_ip(packet).ok()?;
        let mut key = PairKey::default();
        match p.net.as_ref()? {
            LaxNetSlice::Ipv4(v4) => {
                key.src[..4].copy_from_slice(&v4.header().source());
                key.dst[..4].copy_from_slice(&v4.header().destination());
            }
            LaxNetSlice::Ipv6(v6) => {
                key.src = v6.header().source();
                key.dst = v6.header().destination();
            }
            LaxNetSlice::Arp(_) => return None,
        }
        let Some(TransportSlice::Tcp(tcp)) = p.transport.as_ref() else {
            return None;
        };
        key.sport = tcp.source_port();
        key.dport = tcp.destination_port();
        key.seq = tcp.sequence_number();
        let bytes = tcp.slice();
        // The slice lies inside `packet`: its offset is the distance between their starts.
        let offset = (bytes.as_ptr() as usize).checked_sub(packet.as_ptr() as usize)?;
        Some(Self {
            key,
            offset,
            header_len: usize::from(tcp.data_offset()) * 4,
            bytes,
        })
    }

    fn payload(&self) -> &'a [u8] {
        self.bytes.get(self.header_len..).unwrap_or_default()
    }
}

/// Compares the corrupted copy `bad` with its intact retransmission `good`, payload to payload,
/// over the bytes both hold, and names the shape.
#[must_use]
pub fn diff(bad: &Segment<'_>, good: &Segment<'_>) -> Diff {
    let (b, g) = (bad.payload(), good.payload());
    let compared = b.len().min(g.len());
    let base = bad.header_len;
    let mut runs: Vec<Run> = Vec::new();
    for (i, (x, y)) in b[..compared].iter().zip(&g[..compared]).enumerate() {
        if x == y {
            continue;
        }
        let bits = (x ^ y).count_ones();
        match runs.last_mut() {
            Some(r) if r.start + r.len == base + i => {
                r.len += 1;
                r.bits += bits;
            }
            _ => runs.push(Run {
                start: base + i,
                len: 1,
                bits,
            }),
        }
    }
    let shape = classify(&runs, b, g, base, bad.offset);
    Diff {
        runs,
        compared,
        payload_offset: base,
        shape,
    }
}

/// The shape of `runs` (offsets from the segment's start; the payload starts at `base`, the
/// segment at `segment_offset` in the packet), given both payloads.
fn classify(runs: &[Run], bad: &[u8], good: &[u8], base: usize, segment_offset: usize) -> Shape {
    let (Some(first), Some(last)) = (runs.first(), runs.last()) else {
        return Shape::Unchanged;
    };
    let changed: usize = runs.iter().map(|r| r.len).sum();
    let bits: u32 = runs.iter().map(|r| r.bits).sum();
    if usize::try_from(bits).is_ok_and(|b| b == changed) {
        return Shape::BitFlip;
    }
    let (from, to) = (first.start - base, last.start + last.len - base);
    let span = &bad[from..to];
    if span.len() >= 2 && span.iter().all(|&x| x == 0) {
        return Shape::ZeroedRun;
    }
    // A copy of 8 bytes or more from elsewhere is no accident of a garbled block: tested first.
    let copied = span.len() >= 8
        && good
            .windows(span.len())
            .enumerate()
            .any(|(at, w)| at != from && w == span);
    if (span.len() >= 4 && span.iter().all(|&x| x == span[0])) || copied {
        return Shape::RepeatedRun;
    }
    if cipher_blocks(runs, base, base + bad.len().min(good.len())) {
        return Shape::CipherBlock;
    }
    let at = segment_offset + first.start;
    if span.len() >= DMA_ALIGN
        && at.is_multiple_of(DMA_ALIGN)
        && span.len().is_multiple_of(DMA_ALIGN)
    {
        return Shape::AlignedRun;
    }
    Shape::Other
}

/// Whether the changed bytes fill consecutive cipher blocks, each but the last at least half
/// changed (of the bytes of it that were compared, `[lo, hi)` of the segment).
fn cipher_blocks(runs: &[Run], lo: usize, hi: usize) -> bool {
    let mut per_block: Vec<(usize, usize)> = Vec::new();
    for r in runs {
        for at in r.start..r.start + r.len {
            let block = at / CIPHER_BLOCK;
            match per_block.last_mut() {
                Some((b, n)) if *b == block => *n += 1,
                _ => per_block.push((block, 1)),
            }
        }
    }
    let half = |block: usize| {
        let start = (block * CIPHER_BLOCK).max(lo);
        let end = ((block + 1) * CIPHER_BLOCK).min(hi);
        end.saturating_sub(start).div_ceil(2).max(1)
    };
    let consecutive = per_block.windows(2).all(|w| w[1].0 == w[0].0 + 1);
    let Some((&(last, last_n), full)) = per_block.split_last() else {
        return false;
    };
    consecutive
        && full.iter().all(|&(b, n)| n >= half(b))
        && (!full.is_empty() || last_n >= half(last))
}

/// A corrupted copy waiting for its retransmission.
#[derive(Clone, Debug)]
pub struct Waiting<T> {
    /// The packet, from its IP header.
    pub packet: Vec<u8>,
    /// When it arrived.
    pub at: Instant,
    /// What the caller keeps with it (its record, its number in the capture file).
    pub tag: T,
    /// Where its TCP segment lies, from the one parse it gets (`None`: not parsed, or no TCP).
    span: Option<Span>,
}

/// A parsed `Segment`'s place in its packet, kept so that it is never parsed twice.
#[derive(Clone, Copy, Debug)]
struct Span {
    key: PairKey,
    offset: usize,
    end: usize,
    header_len: usize,
}

impl<T> Waiting<T> {
    /// A copy whose TCP segment is parsed now, once, for pairing.
    #[must_use]
    pub fn parsed(packet: Vec<u8>, at: Instant, tag: T) -> Self {
        let span = Segment::parse(&packet).map(|s| Span {
            key: s.key,
            offset: s.offset,
            end: s.offset + s.bytes.len(),
            header_len: s.header_len,
        });
        Self {
            packet,
            at,
            tag,
            span,
        }
    }

    /// A copy that will never be paired (observe mode): not parsed at all.
    #[must_use]
    pub const fn unparsed(packet: Vec<u8>, at: Instant, tag: T) -> Self {
        Self {
            packet,
            at,
            tag,
            span: None,
        }
    }

    /// Its TCP segment, as parsed when it was made; `None` if it was not, or holds none.
    #[must_use]
    pub fn segment(&self) -> Option<Segment<'_>> {
        let s = self.span?;
        Some(Segment {
            key: s.key,
            offset: s.offset,
            header_len: s.header_len,
            bytes: self.packet.get(s.offset..s.end)?,
        })
    }
}

/// What became of a corrupted copy.
#[derive(Debug)]
pub enum Outcome<T> {
    /// Compared with its intact retransmission.
    Paired {
        /// The corrupted copy.
        bad: Waiting<T>,
        /// What differs.
        diff: Diff,
    },
    /// Never compared: `why` says what was missing.
    Unpaired {
        /// The corrupted copy.
        bad: Waiting<T>,
        /// What was missing.
        why: &'static str,
    },
}

/// Corrupted copies waiting for their intact retransmission, bounded by `MAX_PAIRS` and
/// `PAIR_WINDOW`.
#[derive(Debug)]
pub struct Pairing<T> {
    waiting: HashMap<PairKey, Vec<Waiting<T>>>,
    order: VecDeque<(Instant, PairKey)>,
    len: usize,
    capacity: usize,
    window: Duration,
}

impl<T> Default for Pairing<T> {
    fn default() -> Self {
        Self::new(MAX_PAIRS as usize, PAIR_WINDOW)
    }
}

impl<T> Pairing<T> {
    /// At most `capacity` copies waiting, each at most `window`.
    #[must_use]
    pub fn new(capacity: usize, window: Duration) -> Self {
        Self {
            waiting: HashMap::new(),
            order: VecDeque::new(),
            len: 0,
            capacity,
            window,
        }
    }

    /// Copies waiting.
    #[must_use]
    pub const fn len(&self) -> usize {
        self.len
    }

    /// Whether none waits.
    #[must_use]
    pub const fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A dropped TCP segment's copy, to wait for its retransmission; a copy pushed out by the
    /// bound is returned unpaired. A packet that is no TCP segment is unpaired at once.
    pub fn corrupted(&mut self, packet: Vec<u8>, at: Instant, tag: T) -> Vec<Outcome<T>> {
        let bad = Waiting::parsed(packet, at, tag);
        let Some(key) = bad.span.map(|s| s.key) else {
            return vec![Outcome::Unpaired {
                bad,
                why: "not a TCP segment",
            }];
        };
        let mut out = Vec::new();
        while self.len >= self.capacity {
            match self.pop_oldest() {
                Some(w) => out.push(Outcome::Unpaired {
                    bad: w,
                    why: "pushed out by newer corrupted copies",
                }),
                None => break,
            }
        }
        self.order.push_back((at, key));
        self.waiting.entry(key).or_default().push(bad);
        self.len += 1;
        out
    }

    /// An intact retransmission: every waiting copy of its flow and sequence number, compared
    /// with it. Empty when none waits (its corrupted copy was lost or given up on).
    pub fn intact(&mut self, packet: &[u8]) -> Vec<Outcome<T>> {
        let Some(good) = Segment::parse(packet) else {
            return Vec::new();
        };
        let Some(bads) = self.waiting.remove(&good.key) else {
            return Vec::new();
        };
        self.len -= bads.len();
        self.order.retain(|(_, k)| *k != good.key);
        bads.into_iter()
            .map(|bad| {
                let diff = bad
                    .segment()
                    .map_or_else(|| unreachable_diff(&good), |b| diff(&b, &good));
                Outcome::Paired { bad, diff }
            })
            .collect()
    }

    /// Copies that waited longer than the window at `now`, unpaired.
    pub fn expire(&mut self, now: Instant) -> Vec<Outcome<T>> {
        let mut out = Vec::new();
        while let Some(&(at, _)) = self.order.front() {
            if now.saturating_duration_since(at) < self.window {
                break;
            }
            if let Some(w) = self.pop_oldest() {
                out.push(Outcome::Unpaired {
                    bad: w,
                    why: "no retransmission verified within the pairing window",
                });
            }
        }
        out
    }

    /// Every copy still waiting, unpaired (at shutdown).
    pub fn drain(&mut self) -> Vec<Outcome<T>> {
        let mut out = Vec::new();
        while let Some(w) = self.pop_oldest() {
            out.push(Outcome::Unpaired {
                bad: w,
                why: "the daemon stopped before a retransmission verified",
            });
        }
        out
    }

    fn pop_oldest(&mut self) -> Option<Waiting<T>> {
        let (_, key) = self.order.pop_front()?;
        let list = self.waiting.get_mut(&key)?;
        let w = list.remove(0);
        if list.is_empty() {
            self.waiting.remove(&key);
        }
        self.len -= 1;
        Some(w)
    }
}

/// A waiting copy always held a TCP segment when it was queued, and its span stays within its
/// packet; this is the diff of one that does not, which cannot happen.
fn unreachable_diff(good: &Segment<'_>) -> Diff {
    Diff {
        runs: Vec::new(),
        compared: 0,
        payload_offset: good.header_len,
        shape: Shape::Unchanged,
    }
}

#[cfg(test)]
mod tests;
