//! Turning mismatch events from the ring buffer into one structured WARN line each.
//!
//! Logging is rate-limited with a token bucket so a corruption storm cannot flood the journal;
//! what the limiter suppresses is counted and reported when logging resumes.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use monitor_ebpf::{Action, Family, LearningSample, MismatchEvent, Proto, SaKey};

/// A decoded mismatch event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mismatch {
    /// Peer id (index into the peer table).
    pub peer_id: u32,
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Source port (ICMP: the message type).
    pub sport: u16,
    /// Destination port (ICMP: the code).
    pub dport: u16,
    /// "tcp", "udp", "icmp" or "sctp".
    pub proto: &'static str,
    /// TCP sequence number (0 for UDP; ICMP: the header's last four bytes, an echo's identifier
    /// and sequence number; SCTP: the verification tag).
    pub seq: u32,
    /// L4 length in bytes.
    pub len: u32,
    /// Checksum field as received (SCTP: the 32-bit CRC32c).
    pub found: u32,
    /// Checksum field an intact segment would carry (SCTP: the CRC32c of the bytes received).
    pub expected: u32,
    /// Whether the segment was dropped (enforce mode).
    pub dropped: bool,
    /// The residual the segment left (0 for SCTP, which has none).
    pub residual: u16,
    /// The residual it was verified against: the one intact segments of its mapping leave.
    pub expected_residual: u16,
    /// The SA, as the verifier looks it up in `SA_TRUST`.
    pub key: SaKey,
    /// The SA's encapsulation ports (host order); 0 under address scope.
    pub encap_ports: (u16, u16),
    /// SPI of the SA that decapsulated it (host order); 0 under address scope.
    pub spi: u32,
    /// `reqid` of that SA; 0 under address scope.
    pub reqid: u32,
    /// Index of the interface it arrived on, in the receiving network namespace (which need
    /// not be natt-monitor's, so no name is looked up).
    pub ifindex: u32,
    /// First payload bytes.
    pub payload: Vec<u8>,
}

impl Mismatch {
    /// Decodes a raw record of the `EVENTS` ring; `None` if it is not a whole, valid event.
    #[must_use]
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let ev: MismatchEvent = record(bytes)?;
        let family = Family::from_abi(ev.family)?;
        let action = Action::from_abi(ev.action)?;
        let proto = Proto::from_wire(ev.proto)?;
        let addr = |a| address(family, a);
        let n = usize::from(ev.payload_len).min(ev.payload.len());
        // SCTP's 32-bit CRCs travel split over the checksum and residual fields.
        let (found, expected, residual, expected_residual) = if proto == Proto::Sctp {
            let crc = |hi: u16, lo: u16| u32::from(hi) << 16 | u32::from(lo);
            (
                crc(ev.csum_found, ev.residual),
                crc(ev.csum_expected, ev.expected_residual),
                0,
                0,
            )
        } else {
            (
                u32::from(ev.csum_found),
                u32::from(ev.csum_expected),
                ev.residual,
                ev.expected_residual,
            )
        };
        Some(Self {
            peer_id: ev.peer_id,
            src: addr(ev.src),
            dst: addr(ev.dst),
            sport: ev.sport,
            dport: ev.dport,
            proto: proto.as_str(),
            seq: ev.seq,
            len: ev.l4_len,
            found,
            expected,
            dropped: action == Action::Dropped,
            residual,
            expected_residual,
            key: SaKey {
                src: ev.src,
                dst: ev.dst,
                encap_sport: ev.encap_sport,
                encap_dport: ev.encap_dport,
                peer_id: ev.peer_id,
                spi: ev.spi,
            },
            encap_ports: (u16::from_be(ev.encap_sport), u16::from_be(ev.encap_dport)),
            spi: u32::from_be(ev.spi),
            reqid: ev.reqid,
            ifindex: ev.ifindex,
            payload: ev.payload[..n].to_vec(),
        })
    }

    /// `src:sport -> dst:dport` with IPv6 brackets; ICMP, which has no ports,
    /// `src -> dst type T code C`.
    #[must_use]
    pub fn flow(&self) -> String {
        if self.proto == Proto::Icmp.as_str() {
            return format!(
                "{} -> {} type {} code {}",
                self.src, self.dst, self.sport, self.dport
            );
        }
        let ep = |a: IpAddr, p: u16| match a {
            IpAddr::V4(a) => format!("{a}:{p}"),
            IpAddr::V6(a) => format!("[{a}]:{p}"),
        };
        format!(
            "{} -> {}",
            ep(self.src, self.sport),
            ep(self.dst, self.dport)
        )
    }

    /// The checksum fields as the log shows them: four hex digits, eight for SCTP's CRC32c.
    #[must_use]
    pub fn sums(&self) -> (String, String) {
        if self.proto == Proto::Sctp.as_str() {
            (
                format!("{:#010x}", self.found),
                format!("{:#010x}", self.expected),
            )
        } else {
            (
                format!("{:#06x}", self.found),
                format!("{:#06x}", self.expected),
            )
        }
    }
}

/// A ring-buffer record as `T`; `None` if it is too short.
fn record<T: aya::Pod>(bytes: &[u8]) -> Option<T> {
    if bytes.len() < size_of::<T>() {
        return None;
    }
    // SAFETY: length checked; `T` is plain old data valid for any bit pattern, and
    // read_unaligned copes with the ring buffer's 8-byte alignment.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) })
}

fn address(family: Family, a: [u8; 16]) -> IpAddr {
    match family {
        Family::V4 => IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3])),
        Family::V6 => IpAddr::V6(Ipv6Addr::from(a)),
    }
}

/// What a record of the `LEARNING` ring says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LearningKind {
    /// A segment of an SA that is still learning left `residual`.
    Sample {
        /// Enforce mode, TCP: the segment was held (dropped for TCP to retransmit), not passed.
        held: bool,
        /// Its protocol (`None`: a record of another version, which did not say).
        proto: Option<Proto>,
    },
    /// The SA took over `residual` from a live SA of its NAT mapping (a rekey), or from its own
    /// entry there after the LRU forgot it.
    Inherited,
    /// Enforce mode: the verifier confirmed `residual` for the SA itself (a segment summed to
    /// 0, or TCP's retransmission of a held segment left the same value).
    Confirmed,
    /// The SA's residual `residual` was withdrawn after `WITHDRAW_AFTER` consecutive distinct
    /// mismatches that all left `found`; the SA learns again.
    Withdrawn {
        /// The residual the refused segments agreed on.
        found: u16,
    },
}

/// A decoded record of the `LEARNING` ring: a learning sample, or what became of an SA's
/// residual.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Learning {
    /// The SA, as the verifier looks it up in `SA_TRUST`.
    pub key: SaKey,
    /// What happened.
    pub kind: LearningKind,
    /// The residual the segment left (a sample), or the SA's residual.
    pub residual: u16,
    /// SPI of the SA (host order); 0 under address scope.
    pub spi: u32,
    /// `reqid` of the SA; 0 under address scope.
    pub reqid: u32,
    /// Address of the SA's `struct xfrm_state`; 0 under address scope.
    pub state: u64,
}

impl Learning {
    /// Decodes a raw record of the `LEARNING` ring; `None` if it is not a whole, valid record.
    #[must_use]
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let s: LearningSample = record(bytes)?;
        Family::from_abi(s.family)?;
        let kind = match s.kind {
            monitor_ebpf::SAMPLE_LEARNING | monitor_ebpf::SAMPLE_HELD => LearningKind::Sample {
                held: s.kind == monitor_ebpf::SAMPLE_HELD,
                proto: Proto::from_wire(s.proto),
            },
            monitor_ebpf::SAMPLE_INHERITED => LearningKind::Inherited,
            monitor_ebpf::SAMPLE_CONFIRMED => LearningKind::Confirmed,
            monitor_ebpf::SAMPLE_WITHDRAWN => LearningKind::Withdrawn { found: s.found },
            _ => return None,
        };
        Some(Self {
            key: s.key,
            kind,
            residual: s.residual,
            spi: u32::from_be(s.key.spi),
            reqid: s.reqid,
            state: s.state,
        })
    }

    /// The peer the mapping counts under.
    #[must_use]
    pub const fn peer_id(&self) -> u32 {
        self.key.peer_id
    }

    /// The SA's encapsulation ports (host order); 0 under address scope.
    #[must_use]
    pub const fn encap_ports(&self) -> (u16, u16) {
        (
            u16::from_be(self.key.encap_sport),
            u16::from_be(self.key.encap_dport),
        )
    }
}

/// Lower-case hex of a byte slice.
pub struct Hex<'a>(pub &'a [u8]);

impl fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// Token bucket: `burst` lines at once, refilled at `per_second`.
#[derive(Debug)]
pub struct RateLimiter {
    burst: f64,
    per_second: f64,
    tokens: f64,
    last: Instant,
    suppressed: u64,
}

impl RateLimiter {
    /// A bucket that starts full.
    #[must_use]
    pub fn new(per_second: u32, burst: u32) -> Self {
        Self {
            burst: f64::from(burst.max(1)),
            per_second: f64::from(per_second),
            tokens: f64::from(burst.max(1)),
            last: Instant::now(),
            suppressed: 0,
        }
    }

    /// Takes a token at `now`. `Some(n)` allows the line and says how many lines were
    /// suppressed since the last allowed one; `None` suppresses it.
    pub fn admit(&mut self, now: Instant) -> Option<u64> {
        let dt = now.saturating_duration_since(self.last);
        self.last = now;
        self.tokens = dt
            .as_secs_f64()
            .mul_add(self.per_second, self.tokens)
            .min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }

    /// Forgets the suppressed count after it was reported on its own.
    pub const fn clear_suppressed(&mut self) {
        self.suppressed = 0;
    }

    /// Lines suppressed and not yet reported.
    #[must_use]
    pub const fn pending_suppressed(&self) -> u64 {
        self.suppressed
    }
}

/// Default log budget: bursts of 20 mismatch lines, then 5 a second.
pub const LOG_BURST: u32 = 20;
/// See `LOG_BURST`.
pub const LOG_PER_SECOND: u32 = 5;

/// How long an idle limiter waits before the suppressed count is flushed on its own.
pub const SUPPRESSED_FLUSH: Duration = Duration::from_secs(10);

/// Records as the verifier writes them, for tests and the fuzz corpus's seeds.
#[cfg(test)]
pub(crate) mod samples {
    use monitor_ebpf::{Action, Family, IPPROTO_TCP, LearningSample, MismatchEvent, SaKey};

    /// An IPv4 TCP mismatch, dropped, through an SA with NAT-T ports.
    pub(crate) fn mismatch() -> MismatchEvent {
        let mut ev = MismatchEvent {
            peer_id: 3,
            l4_len: 1432,
            seq: 0xdead_beef,
            family: Family::V4 as u8,
            proto: IPPROTO_TCP,
            action: Action::Dropped as u8,
            payload_len: 4,
            sport: 40000,
            dport: 2181,
            csum_found: 0x1234,
            csum_expected: 0x1235,
            residual: 1,
            expected_residual: 0,
            encap_sport: 61000u16.to_be(),
            encap_dport: 4500u16.to_be(),
            spi: 0xc1c2_c3c4_u32.to_be(),
            reqid: 7,
            ifindex: 1,
            src: [0; 16],
            dst: [0; 16],
            payload: [0; 32],
        };
        ev.src[..4].copy_from_slice(&[192, 0, 2, 1]);
        ev.dst[..4].copy_from_slice(&[198, 51, 100, 2]);
        ev.payload[..4].copy_from_slice(b"ruok");
        ev
    }

    /// A learning sample from 203.0.113.9 behind a NAT.
    pub(crate) fn learning() -> LearningSample {
        let mut key = SaKey {
            encap_sport: 61000u16.to_be(),
            encap_dport: 4500u16.to_be(),
            peer_id: 2,
            spi: 0xc1c2_c3c4_u32.to_be(),
            ..SaKey::default()
        };
        key.src[..4].copy_from_slice(&[203, 0, 113, 9]);
        LearningSample {
            key,
            residual: 0xbeef,
            family: Family::V4 as u8,
            kind: monitor_ebpf::SAMPLE_LEARNING,
            reqid: 9,
            found: 0,
            proto: monitor_ebpf::IPPROTO_UDP,
            pad: 0,
            state: 0xffff_8880_0123_4000,
        }
    }

    /// `v`'s bytes, as the ring buffer carries them.
    pub(crate) fn bytes_of<T>(v: &T) -> Vec<u8> {
        // SAFETY: plain old data viewed as bytes.
        unsafe { std::slice::from_raw_parts(std::ptr::from_ref(v).cast::<u8>(), size_of::<T>()) }
            .to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_an_ipv4_event() {
        let mut ev = samples::mismatch();
        let bytes = samples::bytes_of(&ev);
        let m = Mismatch::decode(&bytes).unwrap();
        assert_eq!(m.flow(), "192.0.2.1:40000 -> 198.51.100.2:2181");
        assert_eq!(
            (m.seq, m.len, m.found, m.expected, m.dropped),
            (0xdead_beef, 1432, 0x1234, 0x1235, true)
        );
        assert_eq!(Hex(&m.payload).to_string(), "72756f6b");
        assert_eq!((m.spi, m.reqid, m.ifindex), (0xc1c2_c3c4, 7, 1));
        assert_eq!(m.encap_ports, (61000, 4500));
        assert_eq!(Mismatch::decode(&bytes[..10]), None);
        // A value no program writes is not a mismatch.
        ev.action = 7;
        assert_eq!(Mismatch::decode(&samples::bytes_of(&ev)), None);
    }

    #[test]
    fn an_sctp_event_carries_32_bit_crcs() {
        let mut ev = samples::mismatch();
        ev.proto = monitor_ebpf::IPPROTO_SCTP;
        (ev.csum_found, ev.residual) = (0x1a2b, 0x3c4d);
        (ev.csum_expected, ev.expected_residual) = (0xe306, 0x9283);
        let m = Mismatch::decode(&samples::bytes_of(&ev)).unwrap();
        assert_eq!(
            (
                m.proto,
                m.found,
                m.expected,
                m.residual,
                m.expected_residual
            ),
            ("sctp", 0x1a2b_3c4d, 0xe306_9283, 0, 0)
        );
        assert_eq!(m.flow(), "192.0.2.1:40000 -> 198.51.100.2:2181");
        assert_eq!(m.sums(), ("0x1a2b3c4d".into(), "0xe3069283".into()));
        let tcp = Mismatch::decode(&samples::bytes_of(&samples::mismatch())).unwrap();
        assert_eq!(tcp.sums(), ("0x1234".into(), "0x1235".into()));
    }

    #[test]
    fn decodes_a_learning_sample() {
        let s = samples::learning();
        let key = s.key;
        let bytes = samples::bytes_of(&s);
        let l = Learning::decode(&bytes).unwrap();
        assert_eq!(
            (
                l.key,
                l.residual,
                l.spi,
                l.reqid,
                l.peer_id(),
                l.encap_ports()
            ),
            (key, 0xbeef, 0xc1c2_c3c4, 9, 2, (61000, 4500))
        );
        assert_eq!(
            (l.kind, l.state),
            (
                LearningKind::Sample {
                    held: false,
                    proto: Some(Proto::Udp)
                },
                0xffff_8880_0123_4000
            )
        );
        assert_eq!(Learning::decode(&bytes[..63]), None);
        // A withdrawal carries the value the refused segments agreed on.
        let mut w = s;
        w.kind = monitor_ebpf::SAMPLE_WITHDRAWN;
        w.found = 0x1234;
        assert_eq!(
            Learning::decode(&samples::bytes_of(&w)).map(|l| l.kind),
            Some(LearningKind::Withdrawn { found: 0x1234 })
        );
        // A kind no program writes is refused.
        w.kind = 9;
        assert_eq!(Learning::decode(&samples::bytes_of(&w)), None);
    }

    #[test]
    fn limiter_allows_a_burst_then_counts_what_it_suppresses() {
        let t0 = Instant::now();
        let mut rl = RateLimiter::new(2, 3);
        assert_eq!(rl.admit(t0), Some(0));
        assert_eq!(rl.admit(t0), Some(0));
        assert_eq!(rl.admit(t0), Some(0));
        assert_eq!(rl.admit(t0), None);
        assert_eq!(rl.admit(t0), None);
        assert_eq!(rl.pending_suppressed(), 2);
        // Half a second at 2/s refills one token, and the next line reports the two suppressed.
        assert_eq!(rl.admit(t0 + Duration::from_millis(500)), Some(2));
        assert_eq!(rl.admit(t0 + Duration::from_millis(500)), None);
    }
}
