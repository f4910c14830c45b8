//! The scrape's side: read handles on the verifier's statistics maps.

use aya::maps::{MapData, PerCpuArray};
use monitor_ebpf::{
    COUNTER_SLOTS, Counter, IcmpCounters, PeerCounters, PeerStats, SctpCounters, TrustCounter,
};

use super::EbpfFailure;

/// Global verifier counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Indexed by `Counter as usize`.
    pub slots: [u64; COUNTER_SLOTS as usize],
}

impl Counters {
    /// One counter.
    #[must_use]
    pub const fn get(&self, c: Counter) -> u64 {
        self.slots[c as usize]
    }
}

/// Read handles on the verifier's statistics: the global counters and the per-peer arrays
/// (second descriptors of the maps `PeerMaps` resets). Reads are plain syscalls and take no lock,
/// so a scrape never waits for a map update.
pub struct Stats {
    pub(super) counters: PerCpuArray<MapData, u64>,
    pub(super) peers: PerCpuArray<MapData, PeerCounters>,
    pub(super) icmp: PerCpuArray<MapData, IcmpCounters>,
    pub(super) sctp: PerCpuArray<MapData, SctpCounters>,
    pub(super) trust: PerCpuArray<MapData, u64>,
    /// `PAIR_STATS`; `None` in objects of earlier builds (benchmarked side by side).
    pub(super) pairs: Option<PerCpuArray<MapData, u64>>,
}

/// Slot `index` of the per-CPU counter array `map` (named `name` in errors), summed over CPUs.
fn slot_sum(map: &PerCpuArray<MapData, u64>, index: u32, name: &str) -> Result<u64, EbpfFailure> {
    let values = map.get(&index, 0).map_err(|source| EbpfFailure::Map {
        what: format!("reading {name}[{index}]"),
        source,
    })?;
    Ok(values.iter().sum())
}

impl std::fmt::Debug for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stats").finish_non_exhaustive()
    }
}

impl Stats {
    /// Global counters summed over CPUs.
    ///
    /// # Errors
    /// `EbpfFailure::Map` if the map cannot be read.
    pub fn counters(&self) -> Result<Counters, EbpfFailure> {
        let mut out = Counters::default();
        for (i, slot) in out.slots.iter_mut().enumerate() {
            let values = self
                .counters
                .get(&(i as u32), 0)
                .map_err(|source| EbpfFailure::Map {
                    what: format!("reading COUNTERS[{i}]"),
                    source,
                })?;
            *slot = values.iter().sum();
        }
        Ok(out)
    }

    /// What happened to residuals (`TrustCounter`), summed over CPUs.
    ///
    /// # Errors
    /// `EbpfFailure::Map` if the map cannot be read.
    pub fn trust(&self, c: TrustCounter) -> Result<u64, EbpfFailure> {
        slot_sum(&self.trust, c as u32, "TRUST_COUNTERS")
    }

    /// A pairing counter (`PairSlot`), summed over CPUs; 0 for an object without pairing.
    ///
    /// # Errors
    /// `EbpfFailure::Map` if the map cannot be read.
    pub fn pairing(&self, slot: monitor_ebpf::PairSlot) -> Result<u64, EbpfFailure> {
        self.pairs
            .as_ref()
            .map_or(Ok(0), |pairs| slot_sum(pairs, slot as u32, "PAIR_STATS"))
    }

    /// Statistics of peer `id` for every protocol, summed over CPUs.
    ///
    /// # Errors
    /// `EbpfFailure::Map` if a map cannot be read.
    pub fn peer_stats(&self, id: u32) -> Result<PeerStats, EbpfFailure> {
        let read = |what: &str, source| EbpfFailure::Map {
            what: format!("reading {what}[{id}]"),
            source,
        };
        let l4 = self.peers.get(&id, 0).map_err(|e| read("PEER_STATS", e))?;
        let icmp = self.icmp.get(&id, 0).map_err(|e| read("ICMP_STATS", e))?;
        let sctp = self.sctp.get(&id, 0).map_err(|e| read("SCTP_STATS", e))?;
        let stats = l4.iter().fold(PeerStats::default(), PeerStats::with_l4);
        let stats = icmp.iter().fold(stats, PeerStats::with_icmp);
        Ok(sctp.iter().fold(stats, PeerStats::with_sctp))
    }
}
