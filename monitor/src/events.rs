//! Turning mismatch events from the ring buffer into one structured WARN line each.
//!
//! Logging is rate-limited with a token bucket so a corruption storm cannot flood the journal;
//! what the limiter suppresses is counted and reported when logging resumes.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use monitor_ebpf::{ACTION_DROPPED, ACTION_LEARNING, FAMILY_V4, IPPROTO_TCP, MismatchEvent, SaKey};

/// A decoded mismatch event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mismatch {
    /// Peer id (index into the peer table).
    pub peer_id: u32,
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// "tcp" or "udp".
    pub proto: &'static str,
    /// TCP sequence number (0 for UDP).
    pub seq: u32,
    /// L4 length in bytes.
    pub len: u32,
    /// Checksum field as received.
    pub found: u16,
    /// Checksum field an intact segment would carry.
    pub expected: u16,
    /// Whether the segment was dropped (enforce mode).
    pub dropped: bool,
    /// Not a mismatch: a residual sample from a peer still being learned.
    pub learning: bool,
    /// The residual the segment left.
    pub residual: u16,
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
    /// Decodes a raw ring-buffer record; `None` if it is not a whole event.
    #[must_use]
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < size_of::<MismatchEvent>() {
            return None;
        }
        // SAFETY: length checked; MismatchEvent is plain old data valid for any bit pattern, and
        // read_unaligned copes with the ring buffer's 8-byte alignment.
        let ev: MismatchEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        let addr = |a: [u8; 16]| -> IpAddr {
            if ev.family == FAMILY_V4 {
                IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3]))
            } else {
                IpAddr::V6(Ipv6Addr::from(a))
            }
        };
        let n = usize::from(ev.payload_len).min(ev.payload.len());
        Some(Self {
            peer_id: ev.peer_id,
            src: addr(ev.src),
            dst: addr(ev.dst),
            sport: ev.sport,
            dport: ev.dport,
            proto: if ev.proto == IPPROTO_TCP {
                "tcp"
            } else {
                "udp"
            },
            seq: ev.seq,
            len: ev.l4_len,
            found: ev.csum_found,
            expected: ev.csum_expected,
            dropped: ev.action == ACTION_DROPPED,
            learning: ev.action == ACTION_LEARNING,
            residual: ev.residual,
            encap_ports: (u16::from_be(ev.encap_sport), u16::from_be(ev.encap_dport)),
            spi: u32::from_be(ev.spi),
            reqid: ev.reqid,
            ifindex: ev.ifindex,
            payload: ev.payload[..n].to_vec(),
        })
    }

    /// The key of this segment's NAT mapping in `SA_RESIDUALS`.
    #[must_use]
    pub fn sa_key(&self) -> SaKey {
        let bytes = |a: IpAddr| -> [u8; 16] {
            match a {
                IpAddr::V4(a) => {
                    let mut b = [0; 16];
                    b[..4].copy_from_slice(&a.octets());
                    b
                }
                IpAddr::V6(a) => a.octets(),
            }
        };
        SaKey {
            src: bytes(self.src),
            dst: bytes(self.dst),
            encap_sport: self.encap_ports.0.to_be(),
            encap_dport: self.encap_ports.1.to_be(),
            peer_id: self.peer_id,
        }
    }

    /// `src:sport -> dst:dport` with IPv6 brackets.
    #[must_use]
    pub fn flow(&self) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_an_ipv4_event() {
        let mut ev = MismatchEvent {
            peer_id: 3,
            l4_len: 1432,
            seq: 0xdead_beef,
            family: FAMILY_V4,
            proto: IPPROTO_TCP,
            action: ACTION_DROPPED,
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
        // SAFETY: plain old data viewed as bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts((&raw const ev).cast::<u8>(), size_of::<MismatchEvent>())
        };
        let m = Mismatch::decode(bytes).unwrap();
        assert_eq!(m.flow(), "192.0.2.1:40000 -> 198.51.100.2:2181");
        assert_eq!(
            (m.seq, m.len, m.found, m.expected, m.dropped),
            (0xdead_beef, 1432, 0x1234, 0x1235, true)
        );
        assert_eq!(Hex(&m.payload).to_string(), "72756f6b");
        assert_eq!((m.spi, m.reqid, m.ifindex), (0xc1c2_c3c4, 7, 1));
        assert_eq!(m.encap_ports, (61000, 4500));
        let k = m.sa_key();
        assert_eq!(&k.src[..4], &[192, 0, 2, 1]);
        assert_eq!(&k.dst[..4], &[198, 51, 100, 2]);
        assert_eq!(
            (k.encap_sport, k.encap_dport, k.peer_id),
            (ev.encap_sport, ev.encap_dport, 3)
        );
        assert_eq!(Mismatch::decode(&bytes[..10]), None);
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
