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
/// `SKIP_REASONS`; `EventsLost` is last, so `COUNTER_SLOTS` follows from it.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Address scope: the source address is not a configured or discovered peer. SA scope: the
    /// segment came through a NAT-T transport SA, but no peer covers its source address (yet).
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
}

/// Number of slots in `COUNTERS`.
pub const COUNTER_SLOTS: u32 = Counter::CaptureLost as u32 + 1;

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

/// One mismatching packet for `--capture`, through the `CAPTURE` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CaptureRecord {
    /// Length of the whole packet from its IP header (`skb->len`).
    pub len: u32,
    /// Bytes of it in `data` (at most `CAPTURE_SNAP`).
    pub caplen: u32,
    /// Interface it arrived on.
    pub ifindex: u32,
    /// `ACTION_PASSED` or `ACTION_DROPPED`.
    pub action: u8,
    /// Padding, 0.
    pub pad: [u8; 3],
    /// The packet from its IP header on.
    pub data: [u8; CAPTURE_SNAP],
}

/// Largest number of learned residuals the `SA_RESIDUALS` map holds. It is an LRU map: past
/// this, the least recently used NAT mapping is forgotten (and learned again if it comes back).
pub const MAX_SA_RESIDUALS: u32 = 16384;

/// Key of `SA_RESIDUALS`: what fixes a NAT residual. The residual depends only on the addresses
/// before and after the NAT, and the NAT mapping is named by the SA's outer addresses (in
/// transport mode, the segment's own) and its encapsulation ports. Hosts behind one NAT address
/// differ in the source port; an SA rekeyed through the same mapping keeps the same key, so it
/// is verified from its first segment. Under address scope the ports are unknown (0): one
/// residual per address pair.
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
}

/// Value of `SA_RESIDUALS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SaValue {
    /// The residual intact segments through this SA leave.
    pub expected_residual: u16,
    /// Reserved, 0.
    pub flags: u16,
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
}

/// `XFRM_MAX_DEPTH`: the most states one `sec_path` holds.
pub const XFRM_MAX_DEPTH: u32 = 6;
/// `XFRM_MODE_TRANSPORT` (uapi).
pub const XFRM_MODE_TRANSPORT: u8 = 0;

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

// The verifier's error enum and the event must stay small: the event is copied into the ring
// buffer in place, and the ABI is shared by two compilers.
const _: () = assert!(size_of::<MismatchEvent>() == 108);
const _: () = assert!(core::mem::offset_of!(MismatchEvent, spi) == 32);
const _: () = assert!(core::mem::offset_of!(MismatchEvent, src) == 44);
const _: () = assert!(core::mem::offset_of!(MismatchEvent, payload) == 76);
const _: () = assert!(size_of::<SaKey>() == 40 && size_of::<SaValue>() == 4);
const _: () = assert!(core::mem::offset_of!(SaKey, peer_id) == 36);
const _: () = assert!(size_of::<SecpathLayout>() == 52);
const _: () = assert!(size_of::<CaptureRecord>() == 16 + CAPTURE_SNAP);
const _: () = assert!(core::mem::offset_of!(CaptureRecord, data) == 16);
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
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SaKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SaValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SecpathLayout {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::CaptureRecord {}
}
