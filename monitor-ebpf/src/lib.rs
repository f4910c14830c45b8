//! The ABI shared by natt-monitor's eBPF programs and its userspace daemon.
//!
//! Everything here is `#[repr(C)]` plain data or `const fn`-style arithmetic that compiles for
//! both `bpfel-unknown-none` (inside the verifier program) and the host (the daemon and its
//! tests). The `user` feature adds `aya::Pod` so userspace can read these types from maps and
//! ring buffers; the BPF build never pulls in `aya`.
#![cfg_attr(not(test), no_std)]

pub mod csum;

/// Largest number of peers (static and discovered) the maps hold. Peer ids index the per-peer
/// statistics array, so they are dense in `0..MAX_PEERS`.
pub const MAX_PEERS: u32 = 1024;

/// Bytes of L4 payload copied into each mismatch event, for the log line.
pub const EVENT_PAYLOAD_LEN: usize = 32;

/// Ring buffer size for mismatch events (bytes, a power of two and a multiple of the page size).
pub const EVENT_RING_BYTES: u32 = 256 * 1024;

/// Protocol index into per-peer statistics.
pub const PROTO_TCP: usize = 0;
/// Protocol index into per-peer statistics.
pub const PROTO_UDP: usize = 1;
/// Number of protocol slots.
pub const PROTO_COUNT: usize = 2;

/// IANA protocol numbers the verifier understands.
pub const IPPROTO_TCP: u8 = 6;
/// IANA protocol numbers the verifier understands.
pub const IPPROTO_UDP: u8 = 17;

/// Per-peer verification mode.
pub const MODE_OBSERVE: u8 = 0;
/// Per-peer verification mode: drop mismatching segments so TCP retransmits them.
pub const MODE_ENFORCE: u8 = 1;

/// `PeerValue::flags` bit: the peer's NAT residual is not known yet. The verifier neither
/// verifies nor drops its segments; it counts them as learning and reports each one's residual
/// to userspace (an `ACTION_LEARNING` event) until userspace has settled on the residual.
pub const PEER_FLAG_LEARN: u8 = 1;

/// Value of the peer LPM tries: what the verifier needs to know about a peer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerValue {
    /// Dense id in `0..MAX_PEERS`; indexes `PEER_STATS`.
    pub id: u32,
    /// `MODE_OBSERVE` or `MODE_ENFORCE`.
    pub mode: u8,
    /// `PEER_FLAG_*` bits.
    pub flags: u8,
    /// One's-complement residual an intact segment from this peer leaves: 0 without NAT, the
    /// address-rewrite difference behind one (see `csum::nat_residual`).
    pub expected_residual: u16,
}

/// IPv4 LPM trie key data (address in network byte order).
pub type PeerKeyV4 = [u8; 4];
/// IPv6 LPM trie key data (address in network byte order).
pub type PeerKeyV6 = [u8; 16];

/// Per-CPU, per-peer statistics, indexed by `PeerValue::id`. Arrays are indexed by `PROTO_*`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerStats {
    /// Segments whose checksum matched.
    pub verified_packets: [u64; PROTO_COUNT],
    /// L4 bytes (header and payload) of the verified segments.
    pub verified_bytes: [u64; PROTO_COUNT],
    /// Segments whose checksum did not match.
    pub mismatches: [u64; PROTO_COUNT],
    /// Mismatching segments dropped in enforce mode.
    pub drops: [u64; PROTO_COUNT],
    /// Segments seen while the peer's NAT residual was being learned (neither verified nor
    /// counted as mismatches).
    pub learning: [u64; PROTO_COUNT],
}

impl PeerStats {
    /// Adds another CPU's (or period's) statistics into this one.
    #[must_use]
    pub fn merged(mut self, other: &Self) -> Self {
        for p in 0..PROTO_COUNT {
            self.verified_packets[p] += other.verified_packets[p];
            self.verified_bytes[p] += other.verified_bytes[p];
            self.mismatches[p] += other.mismatches[p];
            self.drops[p] += other.drops[p];
            self.learning[p] += other.learning[p];
        }
        self
    }
}

/// Indexes of the global per-CPU `COUNTERS` array. The skip reasons come first, in the order of
/// `SKIP_REASONS`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Source address is not a configured or discovered peer.
    SkipNotInScope = 0,
    /// Not TCP or UDP (ICMP, SCTP, ...), or not IP at all.
    SkipOtherProtocol = 1,
    /// An IPv4 fragment or an IPv6 fragment header: no whole L4 segment to check.
    SkipFragment = 2,
    /// The packet is shorter than its headers say.
    SkipTruncated = 3,
    /// A header field is impossible (bad IHL, data offset, UDP length, IP version).
    SkipMalformed = 4,
    /// UDP with checksum 0: the sender did not compute one.
    SkipUdpChecksumZero = 5,
    /// An IPv6 extension header the verifier does not walk (AH, ESP, mobility, too many).
    SkipUnsupportedExtensionHeader = 6,
    /// A GRO/GSO aggregate: per-segment checksums were discarded when segments were merged.
    SkipAggregated = 7,
    /// Mismatch events that did not fit in the ring buffer.
    EventsLost = 8,
}

/// Number of slots in `COUNTERS`.
pub const COUNTER_SLOTS: u32 = 9;

/// Skip reasons in counter order, with the label value userspace exports for each.
pub const SKIP_REASONS: [(Counter, &str); 8] = [
    (Counter::SkipNotInScope, "not_in_scope"),
    (Counter::SkipOtherProtocol, "other_protocol"),
    (Counter::SkipFragment, "fragment"),
    (Counter::SkipTruncated, "truncated"),
    (Counter::SkipMalformed, "malformed"),
    (Counter::SkipUdpChecksumZero, "udp_checksum_zero"),
    (
        Counter::SkipUnsupportedExtensionHeader,
        "unsupported_extension_header",
    ),
    (Counter::SkipAggregated, "aggregated"),
];

/// IP family tags used in events.
pub const FAMILY_V4: u8 = 4;
/// IP family tags used in events.
pub const FAMILY_V6: u8 = 6;

/// What the verifier did with a mismatching segment.
pub const ACTION_PASSED: u8 = 0;
/// What the verifier did with a mismatching segment.
pub const ACTION_DROPPED: u8 = 1;
/// Not a mismatch: a segment from a peer whose residual is being learned (`PEER_FLAG_LEARN`),
/// passed unverified; `residual` is what it left.
pub const ACTION_LEARNING: u8 = 2;

/// One checksum mismatch, sent through the `EVENTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MismatchEvent {
    /// `PeerValue::id` of the matching peer.
    pub peer_id: u32,
    /// L4 length (header and payload) in bytes.
    pub l4_len: u32,
    /// TCP sequence number (host order); 0 for UDP.
    pub seq: u32,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub proto: u8,
    /// `ACTION_PASSED`, `ACTION_DROPPED` or `ACTION_LEARNING`.
    pub action: u8,
    /// Number of valid bytes in `payload`.
    pub payload_len: u8,
    /// Source port (host order).
    pub sport: u16,
    /// Destination port (host order).
    pub dport: u16,
    /// Checksum field as received (host order).
    pub csum_found: u16,
    /// Checksum field an intact segment with these bytes would carry (host order).
    pub csum_expected: u16,
    /// Residual this segment left.
    pub residual: u16,
    /// Residual the peer's intact segments leave.
    pub expected_residual: u16,
    /// Source address; IPv4 uses the first four bytes.
    pub src: [u8; 16],
    /// Destination address; IPv4 uses the first four bytes.
    pub dst: [u8; 16],
    /// First bytes of the L4 payload.
    pub payload: [u8; EVENT_PAYLOAD_LEN],
}

// The verifier's error enum and the event must stay small: the event is copied into the ring
// buffer in place, and the ABI is shared by two compilers.
const _: () = assert!(size_of::<MismatchEvent>() == 92);
const _: () = assert!(size_of::<PeerValue>() == 8);
const _: () = assert!(size_of::<PeerStats>() == 80);

#[cfg(feature = "user")]
mod user {
    // SAFETY: all of these are `#[repr(C)]`, contain only integers and integer arrays, have no
    // padding that could be uninitialised (checked by the size assertions above), and every bit
    // pattern is a valid value.
    unsafe impl aya::Pod for super::PeerValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PeerStats {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::MismatchEvent {}
}
