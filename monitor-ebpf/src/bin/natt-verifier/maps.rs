//! Every map of the verifier object and its load-time constants.

use aya_ebpf::{
    Global,
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray, RingBuf},
};
use monitor_ebpf::{
    CAPTURE_RING_BYTES, COUNTER_SLOTS, EVENT_RING_BYTES, Held, IcmpCounters, LEARNING_RING_BYTES,
    MAX_PAIRS, MAX_PEERS, MAX_SA_RESIDUALS, MAX_TUNNELS, MappingOwner, PAIR_SLOTS, PairKey,
    PeerCounters, PeerKeyV4, PeerKeyV6, PeerValue, SaKey, SaTrust, SctpCounters, SecpathLayout,
    TRUST_SLOTS, TunnelValue,
};

use crate::{pair::Candidate, sum::CHUNK_WORDS, trust::Scratch};

/// Where this kernel keeps the `sec_path`; set by the loader from BTF. All zero: address
/// scope. The map behind it is frozen, so the verifier sees constants and prunes the scope
/// that is not in use.
#[unsafe(no_mangle)]
pub static SECPATH: Global<SecpathLayout> = Global::new(SecpathLayout {
    enabled: 0,
    skb_active_extensions: 0,
    sec_path_bit: 0,
    skb_extensions: 0,
    ext_sec_path_offset: 0,
    sp_len: 0,
    sp_len_size: 0,
    sp_xvec: 0,
    x_encap: 0,
    x_mode: 0,
    x_spi: 0,
    x_reqid: 0,
    encap_sport: 0,
    x_km_state: 0,
    skb_dev: 0,
    dev_net: 0,
    net_inum: 0,
});

/// One field of `SECPATH`, read where it is used. The loader rewrites the value, so reads are
/// volatile; `Global::load` would copy all thirteen fields on every packet, although traffic
/// outside IPsec needs three of them.
macro_rules! secpath {
    ($field:ident) => {
        // SAFETY: `Global<T>` is a transparent `MaybeUninit<T>` that the loader initialises.
        unsafe {
            core::ptr::read_volatile(core::ptr::addr_of!(
                (*(&raw const $crate::maps::SECPATH).cast::<monitor_ebpf::SecpathLayout>()).$field
            ))
        }
    };
}
pub(crate) use secpath;

/// Non-zero: copy every mismatching packet into `CAPTURE`, and pair dropped TCP segments with
/// their retransmissions (the daemon's forensics). Set by the loader; when 0 the verifier
/// prunes both.
#[unsafe(no_mangle)]
pub static CAPTURE_ON: Global<u32> = Global::new(0);

/// Address scope: the peers by source prefix. SA scope: which peer a segment counts under.
#[map]
pub static PEERS_V4: LpmTrie<PeerKeyV4, PeerValue> = LpmTrie::with_max_entries(MAX_PEERS, 0);
/// As `PEERS_V4`, for IPv6.
#[map]
pub static PEERS_V6: LpmTrie<PeerKeyV6, PeerValue> = LpmTrie::with_max_entries(MAX_PEERS, 0);
/// SA scope: the tunnel devices (by ifindex, and the network namespace that ifindex is unique
/// in) whose every inner packet came through a NAT-T transport SA, and the peer their inner
/// segments count under, with residual 0 (a NAT rewrote the outer addresses only) and no
/// learning. Written by the daemon's state task; not pinned:
/// a verifier left running keeps the map it was loaded with.
#[map]
pub static TUNNELS: HashMap<u32, TunnelValue> = HashMap::with_max_entries(MAX_TUNNELS, 0);
/// Slot 0: how many entries `TUNNELS` holds. Plaintext traffic (no `sec_path`) looks `TUNNELS`
/// up only while it is not 0: an array lookup the kernel inlines, where the hash lookup is a
/// call and a hash.
#[map]
pub static TUNNEL_COUNT: Array<u32> = Array::with_max_entries(1, 0);
/// The residual of each SA (`SaKey`) and the verifier's evidence against it. Userspace writes
/// what it learned; the verifier writes what an SA inherits and removes what it withdraws.
#[map]
pub static SA_TRUST: LruHashMap<SaKey, SaTrust> = LruHashMap::with_max_entries(MAX_SA_RESIDUALS, 0);
/// Per NAT mapping (`SaKey` with SPI 0), the SA that last held its residual: what a rekey
/// inherits while that SA is alive.
#[map]
pub static MAPPINGS: LruHashMap<SaKey, MappingOwner> =
    LruHashMap::with_max_entries(MAX_SA_RESIDUALS, 0);
/// Enforce mode: the TCP segments of each SA without a residual that were dropped, waiting for
/// a retransmission that confirms their residual.
#[map]
pub static HELD: LruHashMap<SaKey, Held> = LruHashMap::with_max_entries(MAX_SA_RESIDUALS, 0);
/// The verifier's tail call to `natt_hold`, in `hold::HOLD_SLOT`. Pinned, so that a pinned
/// verifier keeps its held path while no daemon runs (the kernel empties a program array when
/// the last descriptor and pin of it go).
#[map]
pub static JUMP: ProgramArray = ProgramArray::with_max_entries(1, 0);
/// The tail call to `natt_sctp` (where `bpf_loop` exists), in `sctp::SCTP_SLOT`; pinned like
/// `JUMP`. A map of its own: a `JUMP` of another size would not fit the pins of earlier builds,
/// and an upgrade would have to replace them all, counts and learned residuals with them.
#[map]
pub static SCTP_JUMP: ProgramArray = ProgramArray::with_max_entries(1, 0);
/// One per-CPU `trust::Scratch`: keys and values for the trust maps, off the stack.
#[map]
pub static TRUST_SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);
/// What happened to residuals, indexed by `TrustCounter`.
#[map]
pub static TRUST_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(TRUST_SLOTS, 0);
/// Per-peer TCP and UDP statistics, indexed by `PeerValue::id`.
#[map]
pub static PEER_STATS: PerCpuArray<PeerCounters> = PerCpuArray::with_max_entries(MAX_PEERS, 0);
/// Per-peer ICMP statistics, indexed by `PeerValue::id`.
#[map]
pub static ICMP_STATS: PerCpuArray<IcmpCounters> = PerCpuArray::with_max_entries(MAX_PEERS, 0);
/// Per-peer SCTP statistics, indexed by `PeerValue::id`.
#[map]
pub static SCTP_STATS: PerCpuArray<SctpCounters> = PerCpuArray::with_max_entries(MAX_PEERS, 0);
/// Global counters, indexed by `Counter`.
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);
/// Mismatch events.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENT_RING_BYTES, 0);
/// Learning samples.
#[map]
pub static LEARNING: RingBuf = RingBuf::with_byte_size(LEARNING_RING_BYTES, 0);
/// Mismatching packets and the intact retransmissions of dropped ones, for the daemon's
/// forensics and `--capture`.
#[map]
pub static CAPTURE: RingBuf = RingBuf::with_byte_size(CAPTURE_RING_BYTES, 0);
/// Dropped TCP segments (flow and sequence number) waiting for their retransmission, with the
/// `bpf_ktime_get_ns` of the drop. A hash map, not an LRU: a full one refuses, and is counted.
/// The daemon forgets entries older than `PAIR_WINDOW_NS`. Not pinned: pairing serves the
/// daemon that drains the capture ring.
#[map]
pub static PAIRS: HashMap<PairKey, u64> = HashMap::with_max_entries(MAX_PAIRS, 0);
/// Slot 0: until when (`bpf_ktime_get_ns`) verified TCP segments are looked up in `PAIRS`; 0
/// until the first drop.
#[map]
pub static PAIR_DEADLINE: Array<u64> = Array::with_max_entries(1, 0);
/// The tail call to `natt_pair`, in `pair::PAIR_SLOT`. Not pinned: the kernel empties it when
/// the daemon that filled it exits, and a verifier left running then pairs nothing.
#[map]
pub static PAIR_JUMP: ProgramArray = ProgramArray::with_max_entries(1, 0);
/// One per-CPU `pair::Candidate`: the verified segment handed to `natt_pair`.
#[map]
pub static PAIR_SCRATCH: PerCpuArray<Candidate> = PerCpuArray::with_max_entries(1, 0);
/// Pairing counters, indexed by `PairSlot`.
#[map]
pub static PAIR_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(PAIR_SLOTS, 0);
/// 2 KiB bounce buffer for `bpf_skb_load_bytes` (see `sum`): the BPF stack is only 512 bytes.
#[map]
pub static SCRATCH: PerCpuArray<[u64; CHUNK_WORDS]> = PerCpuArray::with_max_entries(1, 0);
/// One per-CPU slot that `sum::opaque` passes values through.
#[map]
pub static OPAQUE: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);
