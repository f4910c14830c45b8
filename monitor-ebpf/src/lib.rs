//! The ABI shared by natt-monitor's eBPF programs and its userspace daemon.
//!
//! Everything here is `#[repr(C)]` plain data or `const fn`-style arithmetic that compiles for
//! both `bpfel-unknown-none` (inside the verifier program) and the host (the daemon and its
//! tests). The `user` feature adds `aya::Pod` so userspace can read these types from maps and
//! ring buffers; the BPF build never pulls in `aya`.
#![cfg_attr(not(test), no_std)]
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]

#[cfg(target_arch = "bpf")]
pub mod blocksum;
pub mod crc32c;
pub mod csum;

/// Default number of peers (static and discovered) the maps hold. Peer ids index the per-peer
/// statistics array, so they are dense in `0..max_peers`. The daemon sizes the maps at load
/// (`--max-peers`, up to `MAX_PEERS_LIMIT`); the object's own size is this default.
pub const MAX_PEERS: u32 = 1024;

/// The largest `--max-peers`.
pub const MAX_PEERS_LIMIT: u32 = 65536;

/// Tunnel devices (GRE, IPIP, SIT) whose inner packets the verifier takes in scope: the
/// entries of `TUNNELS`. Past it the daemon leaves tunnels out and says so.
pub const MAX_TUNNELS: u32 = 256;

/// Bytes of L4 payload copied into each mismatch event, for the log line.
pub const EVENT_PAYLOAD_LEN: usize = 32;

/// Ring buffer size for mismatch events (bytes, a power of two and a multiple of the page size).
pub const EVENT_RING_BYTES: u32 = 256 * 1024;

/// Index of a protocol in the per-peer statistics arrays.
#[repr(usize)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Proto {
    /// TCP.
    Tcp = 0,
    /// UDP.
    Udp = 1,
    /// ICMP (IPv4): its checksum covers the message alone, with no pseudo-header, so a NAT in
    /// front of the SA leaves it unchanged and every intact message leaves residual 0.
    Icmp = 2,
    /// SCTP: its CRC32c covers the packet alone, so a NAT in front of the SA leaves it
    /// unchanged; there is no residual, only the CRC the packet carries.
    Sctp = 3,
}

impl Proto {
    /// All of them, in index order.
    pub const ALL: [Self; PROTO_COUNT] = [Self::Tcp, Self::Udp, Self::Icmp, Self::Sctp];

    /// The label value: "tcp", "udp", "icmp" or "sctp".
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Icmp => "icmp",
            Self::Sctp => "sctp",
        }
    }

    /// The slot of an IP protocol number the verifier checks; `None` for any other.
    #[must_use]
    pub const fn from_wire(proto: u8) -> Option<Self> {
        match proto {
            IPPROTO_TCP => Some(Self::Tcp),
            IPPROTO_UDP => Some(Self::Udp),
            IPPROTO_ICMP | IPPROTO_ICMPV6 => Some(Self::Icmp),
            IPPROTO_SCTP => Some(Self::Sctp),
            _ => None,
        }
    }
}

/// Number of protocol slots.
pub const PROTO_COUNT: usize = Proto::Sctp as usize + 1;

/// IANA protocol numbers the verifier understands (wire values, not ours).
pub const IPPROTO_TCP: u8 = 6;
/// IANA protocol numbers the verifier understands (wire values, not ours).
pub const IPPROTO_UDP: u8 = 17;
/// IANA protocol numbers the verifier understands (wire values, not ours).
pub const IPPROTO_ICMP: u8 = 1;
/// IANA protocol numbers the verifier understands (wire values, not ours).
pub const IPPROTO_ICMPV6: u8 = 58;
/// IANA protocol numbers the verifier understands (wire values, not ours).
pub const IPPROTO_SCTP: u8 = 132;

/// What the verifier does with a peer's mismatching segments (`PeerValue::mode`).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerMode {
    /// Count and report; deliver the segment.
    Observe = 0,
    /// Count, report and drop, so that TCP retransmits the segment.
    Enforce = 1,
}

impl PeerMode {
    /// The mode a peer map value carries; `None` for a value no program or daemon writes.
    #[must_use]
    pub const fn from_abi(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Observe),
            1 => Some(Self::Enforce),
            _ => None,
        }
    }
}

/// What happened to a mismatching segment (`MismatchEvent::action`, `CaptureRecord::action`).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Delivered (observe mode).
    Passed = 0,
    /// Dropped (enforce mode).
    Dropped = 1,
    /// `CaptureRecord::action` only: a TCP segment that verified with the flow and sequence
    /// number of one dropped before, i.e. the intact retransmission of a corrupted copy.
    Intact = 2,
}

impl Action {
    /// The action a record carries; `None` for a value no program writes.
    #[must_use]
    pub const fn from_abi(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Passed),
            1 => Some(Self::Dropped),
            2 => Some(Self::Intact),
            _ => None,
        }
    }
}

/// The IP family of a record's addresses.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// IPv4: the first four bytes of each address.
    V4 = 4,
    /// IPv6.
    V6 = 6,
}

impl Family {
    /// The family a record carries; `None` for a value no program writes.
    #[must_use]
    pub const fn from_abi(v: u8) -> Option<Self> {
        match v {
            4 => Some(Self::V4),
            6 => Some(Self::V6),
            _ => None,
        }
    }
}

/// `PeerValue::flags` bit: the peer's NAT residuals are learned per NAT mapping. Until a
/// mapping's residual is in `SA_RESIDUALS`, the verifier neither verifies nor drops its
/// segments; it counts them as learning and sends each one's residual to userspace (a
/// `LearningSample`).
pub const PEER_FLAG_LEARN: u8 = 1;

/// Value of the peer LPM tries: what the verifier needs to know about a peer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerValue {
    /// Dense id in `0..MAX_PEERS`; indexes `PEER_STATS`.
    pub id: u32,
    /// A `PeerMode`.
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

/// Slots of `PeerCounters`' arrays: TCP and UDP, indexed by `Proto`.
pub const L4_SLOTS: usize = 2;

/// Per-CPU, per-peer TCP and UDP statistics (`PEER_STATS`), indexed by `PeerValue::id`.
/// Arrays are indexed by `Proto::Tcp` and `Proto::Udp`. Each further protocol has a map of its
/// own (`ICMP_STATS`), so that adding one leaves the pinned maps of earlier builds adoptable
/// with their counts.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerCounters {
    /// Segments whose checksum matched.
    pub verified_packets: [u64; L4_SLOTS],
    /// L4 bytes (header and payload) of the verified segments.
    pub verified_bytes: [u64; L4_SLOTS],
    /// Segments whose checksum did not match.
    pub mismatches: [u64; L4_SLOTS],
    /// Mismatching segments dropped in enforce mode.
    pub drops: [u64; L4_SLOTS],
    /// Segments seen while the peer's NAT residual was being learned (neither verified nor
    /// counted as mismatches).
    pub learning: [u64; L4_SLOTS],
}

/// Per-CPU, per-peer ICMP statistics (`ICMP_STATS`), indexed by `PeerValue::id`: ICMP for an
/// IPv4 peer, `ICMPv6` for an IPv6 one.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IcmpCounters {
    /// Messages whose checksum matched.
    pub verified_packets: u64,
    /// Bytes (header and payload) of the verified messages.
    pub verified_bytes: u64,
    /// Messages whose checksum did not match.
    pub mismatches: u64,
    /// Mismatching messages dropped in enforce mode.
    pub drops: u64,
    /// `ICMPv6` messages passed unverified because their SA had no residual yet (`ICMPv6` sums
    /// a pseudo-header, so a NAT shifts it like TCP's; ICMP over IPv4 has none and is never
    /// learning).
    pub learning: u64,
}

/// Per-CPU, per-peer SCTP statistics (`SCTP_STATS`), indexed by `PeerValue::id`. SCTP's
/// CRC32c has no pseudo-header and nothing to learn.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SctpCounters {
    /// Packets whose CRC32c matched.
    pub verified_packets: u64,
    /// Bytes (common header and chunks) of the verified packets.
    pub verified_bytes: u64,
    /// Packets whose CRC32c did not match.
    pub mismatches: u64,
    /// Mismatching packets dropped in enforce mode.
    pub drops: u64,
}

/// A peer's statistics for every protocol, as userspace sums them over CPUs (and maps). Arrays
/// are indexed by `Proto`.
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

    /// Adds one CPU's TCP and UDP counters.
    #[must_use]
    pub fn with_l4(mut self, c: &PeerCounters) -> Self {
        for p in 0..L4_SLOTS {
            self.verified_packets[p] += c.verified_packets[p];
            self.verified_bytes[p] += c.verified_bytes[p];
            self.mismatches[p] += c.mismatches[p];
            self.drops[p] += c.drops[p];
            self.learning[p] += c.learning[p];
        }
        self
    }

    /// Adds one CPU's ICMP counters.
    #[must_use]
    pub fn with_icmp(mut self, c: &IcmpCounters) -> Self {
        let p = Proto::Icmp as usize;
        self.verified_packets[p] += c.verified_packets;
        self.verified_bytes[p] += c.verified_bytes;
        self.mismatches[p] += c.mismatches;
        self.drops[p] += c.drops;
        self.learning[p] += c.learning;
        self
    }

    /// Adds one CPU's SCTP counters.
    #[must_use]
    pub fn with_sctp(mut self, c: &SctpCounters) -> Self {
        let p = Proto::Sctp as usize;
        self.verified_packets[p] += c.verified_packets;
        self.verified_bytes[p] += c.verified_bytes;
        self.mismatches[p] += c.mismatches;
        self.drops[p] += c.drops;
        self
    }
}

/// Indexes of the global per-CPU `COUNTERS` array. The skip reasons come first, in the order of
/// `SKIP_REASONS`; `EventsLost` is last, so `COUNTER_SLOTS` follows from it.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Address scope: the source address is not a configured or discovered peer. SA scope: the
    /// segment came through a NAT-T transport SA, but no peer covers its source address (yet).
    SkipNotInScope = 0,
    /// Not TCP, UDP, ICMP, `ICMPv6` or SCTP (GRE, IPIP, ...), or not IP at all; also ICMP,
    /// `ICMPv6` and SCTP in the bounded-loop variant (kernels before 5.17).
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
    /// A GRO/GSO aggregate (also BIG TCP's zero IP length): per-segment checksums were
    /// discarded when segments were merged.
    SkipAggregated = 7,
    /// SA scope: the segment did not come through IPsec at all (no `sec_path`); the kernel
    /// checks its checksum itself.
    SkipNotIpsec = 8,
    /// SA scope: it came through IPsec, but not through a transport-mode SA with UDP/TCP
    /// encapsulation (plain ESP, tunnel mode), after which the kernel does check the checksum.
    SkipIpsecCheckedByKernel = 9,
    /// Address scope only: UDP or TCP to or from port 500 or 4500 (IKE, NAT-T keepalives, the
    /// ESP-in-TCP stream itself), which arrives in the clear with an ordinary checksum.
    SkipIke = 10,
    /// Address scope only: the checksum field holds just the pseudo-header sum
    /// (`CHECKSUM_PARTIAL`: loopback, veth with tx offload), so there is nothing to verify.
    SkipPartialChecksum = 11,
    /// SA scope: the segment has a `sec_path`, but its state could not be read (a kernel
    /// layout that BTF described wrongly, or a state torn down under it): not verified. A rising
    /// count is a bug report, not traffic.
    SkipIpsecUnreadable = 12,
    /// Mismatch events that did not fit in the ring buffer.
    EventsLost = 13,
    /// `--capture`: mismatching packets that did not fit in the capture ring buffer.
    CaptureLost = 14,
    /// Learning samples that did not fit in the learning ring buffer (learning then takes more
    /// segments).
    LearningLost = 15,
}

/// Number of slots in `COUNTERS`.
pub const COUNTER_SLOTS: u32 = Counter::LearningLost as u32 + 1;

/// Skip reasons in counter order, with the label value userspace exports for each.
pub const SKIP_REASONS: [(Counter, &str); Counter::EventsLost as usize] = [
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
    (Counter::SkipNotIpsec, "not_ipsec"),
    (Counter::SkipIpsecCheckedByKernel, "ipsec_checked_by_kernel"),
    (Counter::SkipIke, "ike"),
    (Counter::SkipPartialChecksum, "partial_checksum"),
    (Counter::SkipIpsecUnreadable, "ipsec_unreadable"),
];

// Every skip reason sits at its own counter index.
const _: () = {
    let mut i = 0;
    while i < SKIP_REASONS.len() {
        assert!(SKIP_REASONS[i].0 as usize == i);
        i += 1;
    }
};

/// Bytes of each mismatching packet, from its IP header on, that `--capture` copies.
pub const CAPTURE_SNAP: usize = 2048;

/// Capture ring buffer size (bytes, a power of two and a multiple of the page size): about 500
/// packets between two drains.
pub const CAPTURE_RING_BYTES: u32 = 1 << 20;

/// One packet for the daemon's forensics (and `--capture`), through the `CAPTURE` ring buffer:
/// a mismatching packet, or the intact retransmission of a dropped one (`Action::Intact`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CaptureRecord {
    /// Length of the whole packet from its IP header (`skb->len`).
    pub len: u32,
    /// Bytes of it in `data` (at most `CAPTURE_SNAP`).
    pub caplen: u32,
    /// Interface it arrived on.
    pub ifindex: u32,
    /// An `Action`.
    pub action: u8,
    /// Padding, 0.
    pub pad: [u8; 3],
    /// `PeerValue::id` of the peer it counts under.
    pub peer_id: u32,
    /// SPI of the SA that decapsulated it (network byte order); 0 under address scope and out
    /// of a tunnel.
    pub spi: u32,
    /// The checksum field as received (host order; SCTP: the high half of the CRC32c).
    pub csum_found: u16,
    /// The field an intact segment with these bytes would carry (host order; SCTP: the high
    /// half of the CRC32c of the bytes received). Equal to `csum_found` for `Action::Intact`.
    pub csum_expected: u16,
    /// The SA's encapsulation source and destination ports (network byte order).
    pub encap_ports: [u16; 2],
    /// The packet from its IP header on.
    pub data: [u8; CAPTURE_SNAP],
}

/// The flow and sequence number of a dropped TCP segment, the key of `PAIRS`: its intact
/// retransmission has the same.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PairKey {
    /// Source address; IPv4 uses the first four bytes.
    pub src: [u8; 16],
    /// Destination address; IPv4 uses the first four bytes.
    pub dst: [u8; 16],
    /// Source port (host order).
    pub sport: u16,
    /// Destination port (host order).
    pub dport: u16,
    /// TCP sequence number (host order).
    pub seq: u32,
}

/// Dropped TCP segments `PAIRS` remembers at once, waiting for their retransmission. One more
/// is counted (`PairSlot::NotRemembered`) and its copy reported unpaired.
pub const MAX_PAIRS: u32 = 1024;

/// How long a dropped segment waits for its retransmission (nanoseconds): TCP's first
/// retransmission comes within one RTO (200 ms to a few seconds); the daemon forgets older
/// entries, and the verifier stops looking once this long passed after the last drop.
pub const PAIR_WINDOW_NS: u64 = 60_000_000_000;

/// Slots of `PAIR_STATS`, the verifier's pairing counters (per CPU).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PairSlot {
    /// Dropped TCP segments remembered for pairing.
    Remembered = 0,
    /// Dropped TCP segments `PAIRS` had no room for.
    NotRemembered = 1,
    /// Intact retransmissions found and copied.
    Paired = 2,
}

/// Number of slots in `PAIR_STATS`.
pub const PAIR_SLOTS: u32 = PairSlot::Paired as u32 + 1;

/// Largest number of SAs whose residual the `SA_TRUST` map holds (and NAT mappings in
/// `MAPPINGS`). Both are LRU maps: past this, the least recently used entry is forgotten. A
/// forgotten SA whose mapping still names it takes its residual back from `MAPPINGS`; one
/// forgotten from both learns again.
pub const MAX_SA_RESIDUALS: u32 = 16384;

/// `SA_TRUST` and `MAPPINGS` slots for maps sized for `max_peers` peers: two SAs per peer (an
/// SA and its rekey), and never fewer than `MAX_SA_RESIDUALS`.
#[must_use]
pub const fn sa_residual_slots(max_peers: u32) -> u32 {
    let two = max_peers.saturating_mul(2);
    if two > MAX_SA_RESIDUALS {
        two
    } else {
        MAX_SA_RESIDUALS
    }
}

/// Key of `SA_TRUST`: one SA, as the verifier sees it at the hook. The residual depends only on
/// the addresses before and after the NAT, so it is constant for the life of one SA; the SA is
/// named by its NAT mapping (its outer addresses, which in transport mode are the segment's own,
/// and its encapsulation ports) and its SPI. With `spi` 0 the same struct keys `MAPPINGS`: the
/// mapping alone. Under address scope ports and SPI are unknown (0): one residual per address
/// pair.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SaKey {
    /// Source address as received; IPv4 uses the first four bytes.
    pub src: [u8; 16],
    /// Destination address as received; IPv4 uses the first four bytes.
    pub dst: [u8; 16],
    /// The SA's encapsulation source port (network byte order, as the kernel stores it).
    pub encap_sport: u16,
    /// The SA's encapsulation destination port (network byte order).
    pub encap_dport: u16,
    /// `PeerValue::id` of the peer that covers the source address.
    pub peer_id: u32,
    /// The SA's SPI (network byte order, as the kernel stores it); 0 in a `MAPPINGS` key and
    /// under address scope.
    pub spi: u32,
}

impl SaKey {
    /// The key of this SA's NAT mapping in `MAPPINGS`: addresses and encapsulation ports.
    #[must_use]
    pub const fn mapping(mut self) -> Self {
        self.spi = 0;
        self
    }

    /// The key of this SA's own entry in `SA_TRUST` and `HELD`: addresses and SPI, without the
    /// encapsulation ports. A NAT rebinding moves an SA to another public port, and the IKE
    /// daemon updates the SA's encapsulation in place: it stays the same SA, from the same
    /// host, with the same residual (which depends on addresses only).
    #[must_use]
    pub const fn trust_key(mut self) -> Self {
        self.encap_sport = 0;
        self.encap_dport = 0;
        self
    }
}

/// Consecutive distinct mismatches of one SA that withdraw its residual: segments that all
/// leave one identical residual other than the installed one, with not one segment of that SA
/// verifying in between. A corruption that spares even one segment in this many can never
/// withdraw a residual.
pub const WITHDRAW_AFTER: usize = 16;

/// `SaTrust::origin`: learned by the daemon from this SA's own segments.
pub const TRUST_LEARNED: u8 = 1;
/// `SaTrust::origin`: taken over by the verifier from a live SA of the same NAT mapping (a
/// rekey), or from this SA's own entry in `MAPPINGS` after the LRU forgot it.
pub const TRUST_INHERITED: u8 = 2;
/// `SaTrust::origin`: confirmed by the verifier in enforce mode: a segment of the SA summed to
/// residual 0 (no NAT), or TCP retransmitted a held segment and the copy left the same residual.
pub const TRUST_CONFIRMED: u8 = 3;

/// TCP segments of one SA held (dropped for TCP to retransmit) while they wait for a copy that
/// confirms their residual; past this, the oldest candidate is forgotten.
pub const HELD_SLOTS: usize = 8;

/// Value of `HELD`: the TCP segments of an SA without a residual that enforce mode dropped, each
/// with the residual it left, until a retransmission leaves the same one.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Held {
    /// Address of the SA's `struct xfrm_state` (0 under address scope).
    pub state: u64,
    /// `segment_id` of each held segment (0: free).
    pub segments: [u32; HELD_SLOTS],
    /// The residual each one left.
    pub residuals: [u16; HELD_SLOTS],
    /// The slot the next new segment takes (modulo `HELD_SLOTS`).
    pub next: u32,
    /// Padding, 0.
    pub pad: u32,
}

/// Value of `SA_TRUST`: the residual of one SA and the verifier's own evidence against it.
/// Userspace writes a new entry when it learns a residual; the verifier takes entries over on
/// rekeys, updates the streak and removes an entry it withdraws.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SaTrust {
    /// Address of the SA's `struct xfrm_state` (0 under address scope). An entry whose state is
    /// not the segment's is stale (the SPI went to another SA) and is ignored.
    pub state: u64,
    /// The residual intact segments through this SA leave.
    pub expected_residual: u16,
    /// `TRUST_LEARNED` or `TRUST_INHERITED`.
    pub origin: u8,
    /// Distinct consecutive mismatches that left `streak_residual` (in `recent`).
    pub streak: u8,
    /// The residual the current streak agrees on.
    pub streak_residual: u16,
    /// Padding, 0.
    pub pad: u16,
    /// The segments of the streak (`segment_id`).
    pub recent: [u32; WITHDRAW_AFTER],
}

/// Value of `MAPPINGS`: which SA of a NAT mapping last held a residual, so that its successor
/// (a rekey through the same mapping, which overlaps its predecessor) takes it over while the
/// predecessor is still alive, and no later.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MappingOwner {
    /// Address of that SA's `struct xfrm_state`.
    pub state: u64,
    /// Its SPI (network byte order): the state is alive only while it still holds this SPI
    /// and is `XFRM_STATE_VALID`.
    pub spi: u32,
    /// Its residual.
    pub expected_residual: u16,
    /// Padding, 0.
    pub pad: u16,
}

/// Indexes of the per-CPU `TRUST_COUNTERS` array: what happened to learned residuals.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrustCounter {
    /// An SA took over the residual of another live SA of its NAT mapping (a rekey).
    Inherited = 0,
    /// A residual withdrawn after `WITHDRAW_AFTER` consecutive distinct mismatches.
    Withdrawn = 1,
    /// A residual the verifier confirmed itself in enforce mode (`TRUST_CONFIRMED`).
    Confirmed = 2,
    /// TCP segments of SAs without a residual dropped in enforce mode, for TCP to retransmit
    /// and confirm.
    HeldDropped = 3,
    /// TCP segments of enforce-mode SAs without a residual passed unverified because the tail
    /// call to the held path failed (its `JUMP` slot empty): never expected, never silent.
    Unheld = 4,
    /// An SA whose own entry `SA_TRUST`'s LRU had forgotten took its residual back from its NAT
    /// mapping's record (`MAPPINGS`), at its next segment: nothing went unverified, but the map
    /// is too small for the SAs that carry traffic.
    Restored = 5,
}

/// Slots of `TRUST_COUNTERS` (some kept free, so later counters need no new map).
pub const TRUST_SLOTS: u32 = 8;

/// `XFRM_STATE_VALID` (include/net/xfrm.h, after `XFRM_STATE_VOID` and `XFRM_STATE_ACQ`):
/// `xfrm_state.km.state` of a live SA.
pub const XFRM_STATE_VALID: u8 = 2;

/// A segment told apart from others of its SA, for the withdrawal streak: ports and TCP
/// sequence number, or for UDP the checksum field and length. A retransmission of a dropped
/// segment has the same id, so it counts once.
#[must_use]
pub const fn segment_id(tcp: bool, sport: u16, dport: u16, seq: u32, field: u16, len: u32) -> u32 {
    let ports = ((sport as u32) << 16) | dport as u32;
    let which = if tcp {
        seq
    } else {
        ((field as u32) << 16) | (len & 0xffff)
    };
    ports ^ which.rotate_left(7)
}

/// Where this kernel keeps a segment's IPsec state, as byte offsets (and the one size that
/// changed across kernels) read from its BTF by the daemon and set as a load-time constant. The
/// chain is `sk_buff.active_extensions` (is a `sec_path` attached?) → `sk_buff.extensions` →
/// `skb_ext.offset[SKB_EXT_SEC_PATH]` (in 8-byte units) → `sec_path.len` and `xvec[len - 1]`
/// (the innermost state, the one that decapsulated the segment) → `xfrm_state.encap`,
/// `props.mode`, `id.spi` and `props.reqid`, and the encapsulation ports in `*encap`. All zero
/// (`enabled == 0`) selects address scope.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SecpathLayout {
    /// Non-zero: scope by the segment's own SA.
    pub enabled: u32,
    /// `offsetof(struct sk_buff, active_extensions)` (a `u8`).
    pub skb_active_extensions: u32,
    /// `1 << SKB_EXT_SEC_PATH`.
    pub sec_path_bit: u32,
    /// `offsetof(struct sk_buff, extensions)` (a pointer).
    pub skb_extensions: u32,
    /// `offsetof(struct skb_ext, offset) + SKB_EXT_SEC_PATH` (a `u8`).
    pub ext_sec_path_offset: u32,
    /// `offsetof(struct sec_path, len)`.
    pub sp_len: u32,
    /// `sizeof(sec_path.len)`: 4 (an `int`) before 7.x, 1 (a `u8`) after.
    pub sp_len_size: u32,
    /// `offsetof(struct sec_path, xvec)` (an array of pointers).
    pub sp_xvec: u32,
    /// `offsetof(struct xfrm_state, encap)` (a pointer, NULL without encapsulation).
    pub x_encap: u32,
    /// `offsetof(struct xfrm_state, props.mode)` (a `u8`).
    pub x_mode: u32,
    /// `offsetof(struct xfrm_state, id.spi)` (a `__be32`).
    pub x_spi: u32,
    /// `offsetof(struct xfrm_state, props.reqid)` (a `u32`).
    pub x_reqid: u32,
    /// `offsetof(struct xfrm_encap_tmpl, encap_sport)` (a `__be16`, `encap_dport` right after).
    pub encap_sport: u32,
    /// `offsetof(struct xfrm_state, km.state)` (a `u8`): whether a rekey's predecessor is
    /// still alive.
    pub x_km_state: u32,
    /// `offsetof(struct sk_buff, dev)` (a pointer): the device a tunnel's inner packet came
    /// out of, whose network namespace tells apart devices of equal ifindex.
    pub skb_dev: u32,
    /// `offsetof(struct net_device, nd_net.net)` (a pointer).
    pub dev_net: u32,
    /// `offsetof(struct net, ns.inum)` (a `u32`): the namespace's inode number, as
    /// `stat /proc/self/ns/net` shows it.
    pub net_inum: u32,
}

/// A tunnel device in `TUNNELS` (keyed by ifindex): the network namespace it lives in (ifindex
/// is unique only within one) and the peer its inner segments count under.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TunnelValue {
    /// The peer: its id and mode; residual 0 and no flags.
    pub peer: PeerValue,
    /// The inode number of the device's network namespace.
    pub netns: u32,
}

/// `XFRM_MAX_DEPTH`: the most states one `sec_path` holds.
pub const XFRM_MAX_DEPTH: u32 = 6;
/// `XFRM_MODE_TRANSPORT` (uapi).
pub const XFRM_MODE_TRANSPORT: u8 = 0;

/// One checksum mismatch, sent through the `EVENTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MismatchEvent {
    /// `PeerValue::id` of the matching peer.
    pub peer_id: u32,
    /// L4 length (header and payload) in bytes.
    pub l4_len: u32,
    /// TCP sequence number (host order); 0 for UDP; SCTP: the verification tag.
    pub seq: u32,
    /// A `Family`.
    pub family: u8,
    /// `IPPROTO_TCP`, `IPPROTO_UDP`, `IPPROTO_ICMP`, `IPPROTO_ICMPV6` or `IPPROTO_SCTP`.
    pub proto: u8,
    /// An `Action`.
    pub action: u8,
    /// Number of valid bytes in `payload`.
    pub payload_len: u8,
    /// Source port (host order).
    pub sport: u16,
    /// Destination port (host order).
    pub dport: u16,
    /// Checksum field as received (host order). SCTP: the high half of the CRC32c received.
    pub csum_found: u16,
    /// Checksum field an intact segment with these bytes would carry (host order). SCTP: the
    /// high half of the CRC32c of the bytes received.
    pub csum_expected: u16,
    /// Residual this segment left. SCTP: the low half of the CRC32c received.
    pub residual: u16,
    /// Residual the peer's intact segments leave. SCTP: the low half of the CRC32c of the
    /// bytes received.
    pub expected_residual: u16,
    /// The SA's encapsulation source port (network byte order); 0 under address scope.
    pub encap_sport: u16,
    /// The SA's encapsulation destination port (network byte order); 0 under address scope.
    pub encap_dport: u16,
    /// SPI of the SA that decapsulated the segment (network byte order); 0 under address scope.
    pub spi: u32,
    /// `reqid` of that SA (host order); 0 under address scope.
    pub reqid: u32,
    /// Interface the segment arrived on (`skb->skb_iif`).
    pub ifindex: u32,
    /// Source address; IPv4 uses the first four bytes.
    pub src: [u8; 16],
    /// Destination address; IPv4 uses the first four bytes.
    pub dst: [u8; 16],
    /// First bytes of the L4 payload.
    pub payload: [u8; EVENT_PAYLOAD_LEN],
}

/// Ring buffer size for learning samples (bytes, a power of two and a multiple of the page
/// size): about 1,200 samples between two drains.
pub const LEARNING_RING_BYTES: u32 = 64 * 1024;

/// `LearningSample::kind`: a segment through an SA whose residual is not known yet, passed
/// unverified.
pub const SAMPLE_LEARNING: u8 = 0;
/// `LearningSample::kind`: as `SAMPLE_LEARNING`, held instead (enforce mode, TCP: dropped for
/// TCP to retransmit).
pub const SAMPLE_HELD: u8 = 4;
/// `LearningSample::kind`: the SA took over `residual` from a live SA of its mapping.
pub const SAMPLE_INHERITED: u8 = 1;
/// `LearningSample::kind`: the verifier confirmed `residual` for the SA (`TRUST_CONFIRMED`).
pub const SAMPLE_CONFIRMED: u8 = 3;
/// `LearningSample::kind`: the SA's residual `residual` was withdrawn after `WITHDRAW_AFTER`
/// consecutive distinct mismatches that all left `found`; the SA learns again.
pub const SAMPLE_WITHDRAWN: u8 = 2;

/// One record of the `LEARNING` ring buffer: a learning sample, or news of an SA's residual
/// (inherited, withdrawn). Separate from mismatches, so neither kind can crowd the other out of
/// its ring.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LearningSample {
    /// The SA, exactly as the verifier looked it up in `SA_TRUST`.
    pub key: SaKey,
    /// The residual this segment left (`SAMPLE_LEARNING`), or the SA's residual.
    pub residual: u16,
    /// A `Family`.
    pub family: u8,
    /// `SAMPLE_LEARNING`, `SAMPLE_HELD`, `SAMPLE_INHERITED`, `SAMPLE_CONFIRMED` or
    /// `SAMPLE_WITHDRAWN`.
    pub kind: u8,
    /// `reqid` of that SA; 0 under address scope.
    pub reqid: u32,
    /// `SAMPLE_WITHDRAWN`: the residual the refused segments agreed on; 0 otherwise.
    pub found: u16,
    /// `SAMPLE_LEARNING`, `SAMPLE_HELD`: the segment's IP protocol (`IPPROTO_TCP`,
    /// `IPPROTO_UDP`); 0 otherwise.
    pub proto: u8,
    /// Padding, 0.
    pub pad: u8,
    /// Address of the SA's `struct xfrm_state` (0 under address scope), for `SaTrust::state`.
    pub state: u64,
}

// The layout is shared by two compilers (rustc for bpfel and for the host) and read from raw
// ring-buffer and map bytes: every field's offset is pinned here, so a reordering fails the
// build instead of corrupting records.
const _: () = {
    use core::mem::offset_of;
    assert!(size_of::<PeerValue>() == 8);
    assert!(size_of::<TunnelValue>() == 12);
    assert!(offset_of!(PeerValue, mode) == 4 && offset_of!(PeerValue, flags) == 5);
    assert!(offset_of!(PeerValue, expected_residual) == 6);
    assert!(size_of::<PeerCounters>() == 80);
    assert!(
        offset_of!(PeerCounters, verified_bytes) == 16
            && offset_of!(PeerCounters, mismatches) == 32
    );
    assert!(offset_of!(PeerCounters, drops) == 48 && offset_of!(PeerCounters, learning) == 64);
    assert!(size_of::<IcmpCounters>() == 40 && offset_of!(IcmpCounters, learning) == 32);
    assert!(offset_of!(IcmpCounters, mismatches) == 16 && offset_of!(IcmpCounters, drops) == 24);
    assert!(size_of::<SctpCounters>() == 32 && offset_of!(SctpCounters, drops) == 24);
    assert!(Proto::Tcp as usize == 0 && Proto::Udp as usize == 1 && L4_SLOTS == 2);
    assert!(size_of::<MismatchEvent>() == 108);
    assert!(offset_of!(MismatchEvent, l4_len) == 4 && offset_of!(MismatchEvent, seq) == 8);
    assert!(offset_of!(MismatchEvent, family) == 12 && offset_of!(MismatchEvent, proto) == 13);
    assert!(offset_of!(MismatchEvent, action) == 14);
    assert!(offset_of!(MismatchEvent, payload_len) == 15);
    assert!(offset_of!(MismatchEvent, sport) == 16 && offset_of!(MismatchEvent, dport) == 18);
    assert!(offset_of!(MismatchEvent, csum_found) == 20);
    assert!(offset_of!(MismatchEvent, csum_expected) == 22);
    assert!(offset_of!(MismatchEvent, residual) == 24);
    assert!(offset_of!(MismatchEvent, expected_residual) == 26);
    assert!(offset_of!(MismatchEvent, encap_sport) == 28);
    assert!(offset_of!(MismatchEvent, encap_dport) == 30);
    assert!(offset_of!(MismatchEvent, spi) == 32 && offset_of!(MismatchEvent, reqid) == 36);
    assert!(offset_of!(MismatchEvent, ifindex) == 40 && offset_of!(MismatchEvent, src) == 44);
    assert!(offset_of!(MismatchEvent, dst) == 60 && offset_of!(MismatchEvent, payload) == 76);
    assert!(size_of::<SaKey>() == 44);
    assert!(offset_of!(SaKey, dst) == 16 && offset_of!(SaKey, encap_sport) == 32);
    assert!(offset_of!(SaKey, encap_dport) == 34 && offset_of!(SaKey, peer_id) == 36);
    assert!(offset_of!(SaKey, spi) == 40);
    assert!(size_of::<SaTrust>() == 16 + 4 * WITHDRAW_AFTER);
    assert!(offset_of!(SaTrust, expected_residual) == 8 && offset_of!(SaTrust, origin) == 10);
    assert!(offset_of!(SaTrust, streak) == 11 && offset_of!(SaTrust, streak_residual) == 12);
    assert!(offset_of!(SaTrust, recent) == 16);
    assert!(WITHDRAW_AFTER.is_power_of_two() && WITHDRAW_AFTER < 256);
    assert!(size_of::<MappingOwner>() == 16);
    assert!(size_of::<Held>() == 8 + 6 * HELD_SLOTS + 8);
    assert!(offset_of!(Held, residuals) == 8 + 4 * HELD_SLOTS);
    assert!(
        offset_of!(MappingOwner, spi) == 8 && offset_of!(MappingOwner, expected_residual) == 12
    );
    assert!(size_of::<LearningSample>() == 64);
    assert!(offset_of!(LearningSample, residual) == 44);
    assert!(offset_of!(LearningSample, family) == 46 && offset_of!(LearningSample, kind) == 47);
    assert!(offset_of!(LearningSample, reqid) == 48 && offset_of!(LearningSample, found) == 52);
    assert!(offset_of!(LearningSample, proto) == 54);
    assert!(offset_of!(LearningSample, state) == 56);
    assert!(size_of::<SecpathLayout>() == 68);
    assert!(offset_of!(SecpathLayout, sp_len_size) == 24);
    assert!(offset_of!(SecpathLayout, encap_sport) == 48);
    assert!(offset_of!(SecpathLayout, x_km_state) == 52);
    assert!(size_of::<CaptureRecord>() == 32 + CAPTURE_SNAP);
    assert!(offset_of!(CaptureRecord, caplen) == 4 && offset_of!(CaptureRecord, ifindex) == 8);
    assert!(offset_of!(CaptureRecord, action) == 12 && offset_of!(CaptureRecord, peer_id) == 16);
    assert!(offset_of!(CaptureRecord, spi) == 20 && offset_of!(CaptureRecord, csum_found) == 24);
    assert!(offset_of!(CaptureRecord, encap_ports) == 28 && offset_of!(CaptureRecord, data) == 32);
    assert!(size_of::<PairKey>() == 40 && offset_of!(PairKey, seq) == 36);
    assert!(size_of::<Action>() == 1 && size_of::<Family>() == 1 && size_of::<PeerMode>() == 1);
};

/// Slots of the test injector's `INJECT_STATS` array (`natt-testbed`); userspace sums them over
/// CPUs, except `MaxL4Len`, whose largest value counts.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InjectSlot {
    /// TCP, UDP, ICMP and `ICMPv6` echo-reply packets marked `CHECKSUM_UNNECESSARY`.
    Marked = 0,
    /// TCP segments with payload.
    DataSegments = 1,
    /// Segments whose payload was corrupted.
    Corrupted = 2,
    /// The longest L4 length seen.
    MaxL4Len = 3,
    /// ICMP messages with payload (echo requests and replies; of `ICMPv6`, echo replies).
    IcmpMessages = 4,
    /// ICMP messages whose payload was corrupted.
    IcmpCorrupted = 5,
}

/// Number of slots in `INJECT_STATS`.
pub const INJECT_SLOTS: u32 = InjectSlot::IcmpCorrupted as u32 + 1;

#[cfg(feature = "user")]
mod user {
    // SAFETY: all of these are `#[repr(C)]`, contain only integers and integer arrays, have no
    // padding that could be uninitialised (checked by the size assertions above), and every bit
    // pattern is a valid value.
    unsafe impl aya::Pod for super::PeerValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TunnelValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PeerCounters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::IcmpCounters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SctpCounters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::MismatchEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SaKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SaTrust {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::MappingOwner {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Held {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SecpathLayout {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::CaptureRecord {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::LearningSample {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PairKey {}
}
