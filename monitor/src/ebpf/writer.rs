//! The state task's side: the maps that say which segments to verify and against what, with
//! one writer.

use std::io;

use aya::maps::{
    Array, HashMap, LpmTrie, MapData, MapError, PerCpuArray, PerCpuValues, lpm_trie::Key,
};
use ipnet::IpNet;
use monitor_ebpf::{
    IcmpCounters, MappingOwner, PeerCounters, PeerKeyV4, PeerKeyV6, PeerValue, SaKey, SaTrust,
    SctpCounters, TRUST_LEARNED, TunnelValue,
};

use super::EbpfFailure;
use crate::peers::PeerTable;

/// The maps that say which segments to verify and against what: the peer tries, the learned
/// residuals, and the per-peer statistics (reset when an id changes hands). One writer owns
/// them; in the daemon that is the SA/peer state task.
pub struct PeerMaps {
    pub(super) v4: LpmTrie<MapData, PeerKeyV4, PeerValue>,
    pub(super) v6: LpmTrie<MapData, PeerKeyV6, PeerValue>,
    pub(super) stats: PerCpuArray<MapData, PeerCounters>,
    pub(super) icmp: PerCpuArray<MapData, IcmpCounters>,
    pub(super) sctp: PerCpuArray<MapData, SctpCounters>,
    pub(super) residuals: HashMap<MapData, SaKey, SaTrust>,
    pub(super) mappings: HashMap<MapData, SaKey, MappingOwner>,
    pub(super) tunnels: HashMap<MapData, u32, TunnelValue>,
    pub(super) tunnel_count: Array<MapData, u32>,
    /// How many peers the tries and statistics arrays hold (`MapSizes::peers`).
    pub(super) capacity: u32,
}

impl std::fmt::Debug for PeerMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerMaps").finish_non_exhaustive()
    }
}

impl PeerMaps {
    /// How many peers the maps hold, as they were made: the one source of the peer limit.
    #[must_use]
    pub const fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Makes the peer maps hold `to` instead of `from` (what they held), in an order that keeps
    /// every count with its prefix: first the prefixes no longer configured leave the tries
    /// (their segments stop counting), then the statistics of ids that now belong to another
    /// prefix are reset, then every peer is inserted or updated. Peers that stay are never
    /// absent from the maps and keep their counts.
    ///
    /// # Errors
    /// `EbpfFailure::Map` naming the step.
    pub fn set_peers(&mut self, from: &PeerTable, to: &PeerTable) -> Result<(), EbpfFailure> {
        let mut want_v4 = Vec::new();
        let mut want_v6 = Vec::new();
        for (id, spec) in to.iter() {
            let value = to.value(id, spec);
            match spec.net {
                IpNet::V4(n) => want_v4.push((
                    Key::new(u32::from(n.prefix_len()), n.network().octets()),
                    value,
                )),
                IpNet::V6(n) => want_v6.push((
                    Key::new(u32::from(n.prefix_len()), n.network().octets()),
                    value,
                )),
            }
        }
        remove_stale(&mut self.v4, "PEERS_V4", &want_v4)?;
        remove_stale(&mut self.v6, "PEERS_V6", &want_v6)?;
        let reused: Vec<u32> = to
            .iter()
            .filter(|(id, spec)| from.get(*id).is_none_or(|old| old.net != spec.net))
            .map(|(id, _)| id)
            .collect();
        self.reset_stats(&reused)?;
        insert_all(&mut self.v4, "PEERS_V4", &want_v4)?;
        insert_all(&mut self.v6, "PEERS_V6", &want_v6)
    }

    /// Makes `TUNNELS` hold exactly `want` (ifindex, its namespace and the peer its inner
    /// segments count under): stale devices leave first, then every wanted one is inserted or updated, then
    /// `TUNNEL_COUNT` says how many there are (the verifier looks `TUNNELS` up only while it is
    /// not 0).
    ///
    /// # Errors
    /// `EbpfFailure::Map` naming the step.
    pub fn set_tunnels(&mut self, want: &[(u32, TunnelValue)]) -> Result<(), EbpfFailure> {
        let map = |what: String| move |source| EbpfFailure::Map { what, source };
        let stale: Vec<u32> = self
            .tunnels
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !want.iter().any(|(w, _)| w == k))
            .collect();
        for ifindex in stale {
            self.tunnels.remove(&ifindex).map_err(map(format!(
                "removing tunnel device {ifindex} from TUNNELS"
            )))?;
        }
        for (ifindex, value) in want {
            self.tunnels
                .insert(ifindex, value, 0)
                .map_err(map(format!("adding tunnel device {ifindex} to TUNNELS")))?;
        }
        let n = u32::try_from(want.len()).unwrap_or(u32::MAX);
        self.tunnel_count
            .set(0, &n, 0)
            .map_err(map("setting TUNNEL_COUNT".to_owned()))
    }

    fn reset_stats(&mut self, ids: &[u32]) -> Result<(), EbpfFailure> {
        if ids.is_empty() {
            return Ok(());
        }
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| EbpfFailure::Map {
            what: "counting possible CPUs".into(),
            source: MapError::IoError(e),
        })?;
        let cpus = cpus.get() as usize;
        for &id in ids {
            let zeroed = |what: &str, e| EbpfFailure::Map {
                what: format!("zeroing {what}[{id}]"),
                source: MapError::IoError(e),
            };
            let reset = |what: &str, source| EbpfFailure::Map {
                what: format!("resetting {what}[{id}]"),
                source,
            };
            let zeros = PerCpuValues::try_from(vec![PeerCounters::default(); cpus])
                .map_err(|e| zeroed("PEER_STATS", e))?;
            self.stats
                .set(id, zeros, 0)
                .map_err(|e| reset("PEER_STATS", e))?;
            let zeros = PerCpuValues::try_from(vec![IcmpCounters::default(); cpus])
                .map_err(|e| zeroed("ICMP_STATS", e))?;
            self.icmp
                .set(id, zeros, 0)
                .map_err(|e| reset("ICMP_STATS", e))?;
            let zeros = PerCpuValues::try_from(vec![SctpCounters::default(); cpus])
                .map_err(|e| zeroed("SCTP_STATS", e))?;
            self.sctp
                .set(id, zeros, 0)
                .map_err(|e| reset("SCTP_STATS", e))?;
        }
        Ok(())
    }

    /// What the maps hold, for a daemon that adopts pinned ones: every peer prefix with its map
    /// value, and every installed residual.
    ///
    /// # Errors
    /// `EbpfFailure::Map` when a map cannot be read.
    pub fn contents(&self) -> Result<MapContents, EbpfFailure> {
        let mut peers = Vec::new();
        trie_contents(&self.v4, "PEERS_V4", &mut peers, |a, len| {
            ipnet::Ipv4Net::new(a.into(), len).ok().map(IpNet::V4)
        })?;
        trie_contents(&self.v6, "PEERS_V6", &mut peers, |a, len| {
            ipnet::Ipv6Net::new(a.into(), len).ok().map(IpNet::V6)
        })?;
        let mut residuals = Vec::new();
        for entry in &self.residuals {
            let (k, v) = entry.map_err(|source| EbpfFailure::Map {
                what: "reading the pinned SA_TRUST".into(),
                source,
            })?;
            residuals.push((k, v.state, v.expected_residual));
        }
        Ok(MapContents { peers, residuals })
    }

    /// Installs the residual that intact segments of SA `key` (whose `xfrm_state` is at `state`,
    /// 0 under address scope) leave: from its next segment on, they are verified against it. The
    /// SA also becomes its NAT mapping's owner, whose residual a rekey takes over while the SA
    /// lives.
    ///
    /// # Errors
    /// `EbpfFailure::Map`, e.g. when the map is full.
    pub fn set_sa_residual(
        &mut self,
        key: SaKey,
        state: u64,
        residual: u16,
    ) -> Result<(), EbpfFailure> {
        let what = |map: &str| {
            format!(
                "installing a residual for peer #{} (SPI {:#010x}, encapsulation ports {}/{}) in {map}",
                key.peer_id,
                u32::from_be(key.spi),
                u16::from_be(key.encap_sport),
                u16::from_be(key.encap_dport)
            )
        };
        let value = SaTrust {
            state,
            expected_residual: residual,
            origin: TRUST_LEARNED,
            ..SaTrust::default()
        };
        self.residuals
            .insert(&key.trust_key(), &value, 0)
            .map_err(|source| EbpfFailure::Map {
                what: what("SA_TRUST"),
                source,
            })?;
        if state == 0 {
            return Ok(());
        }
        let owner = MappingOwner {
            state,
            spi: key.spi,
            expected_residual: residual,
            pad: 0,
        };
        self.mappings
            .insert(&key.mapping(), &owner, 0)
            .map_err(|source| EbpfFailure::Map {
                what: what("MAPPINGS"),
                source,
            })
    }

    /// The entry SA `key` has in the map now, as (address of its `xfrm_state`, residual): the
    /// verifier may have inherited, withdrawn or, LRU, forgotten one since the daemon last heard.
    /// One the LRU forgot while the SA's NAT mapping still names it counts as there: the
    /// verifier restores it from `MAPPINGS` at the SA's next segment.
    ///
    /// # Errors
    /// `EbpfFailure::Map` if a map cannot be read.
    pub fn sa_residual(&self, key: &SaKey) -> Result<Option<(u64, u16)>, EbpfFailure> {
        match self.residuals.get(&key.trust_key(), 0) {
            Ok(v) => return Ok(Some((v.state, v.expected_residual))),
            Err(MapError::KeyNotFound) => {}
            Err(source) => {
                return Err(EbpfFailure::Map {
                    what: "reading SA_TRUST".into(),
                    source,
                });
            }
        }
        match self.mappings.get(&key.mapping(), 0) {
            Ok(o) if o.spi == key.spi && o.state != 0 => Ok(Some((o.state, o.expected_residual))),
            Ok(_) | Err(MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(EbpfFailure::Map {
                what: "reading MAPPINGS".into(),
                source,
            }),
        }
    }

    /// Removes the residuals of every key `stale` selects, among `SA_TRUST`'s keys (without
    /// encapsulation ports, `SaKey::trust_key`) and `MAPPINGS`' (without SPI,
    /// `SaKey::mapping`); returns how many residuals went.
    ///
    /// # Errors
    /// `EbpfFailure::Map`.
    pub fn remove_sa_residuals(
        &mut self,
        stale: impl Fn(&SaKey) -> bool,
    ) -> Result<usize, EbpfFailure> {
        let removed = remove_keys(
            &mut self.residuals,
            &stale,
            "removing a residual from SA_TRUST",
        )?;
        remove_keys(
            &mut self.mappings,
            &stale,
            "removing a NAT mapping from MAPPINGS",
        )?;
        Ok(removed)
    }
}

/// Removes every key of `map` that `stale` selects; returns how many went.
fn remove_keys<V: aya::Pod>(
    map: &mut HashMap<MapData, SaKey, V>,
    stale: &impl Fn(&SaKey) -> bool,
    what: &'static str,
) -> Result<usize, EbpfFailure> {
    let keys: Vec<SaKey> = map.keys().filter_map(Result::ok).filter(stale).collect();
    for k in &keys {
        map.remove(k).map_err(|source| EbpfFailure::Map {
            what: what.into(),
            source,
        })?;
    }
    Ok(keys.len())
}

/// What pinned maps held when a daemon adopted them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapContents {
    /// Every peer prefix with its map value (id, mode, flags, residual).
    pub peers: Vec<(IpNet, PeerValue)>,
    /// Every installed residual (keyed as in `SA_TRUST`: `SaKey::trust_key`), with the address
    /// of its SA's `xfrm_state`.
    pub residuals: Vec<(SaKey, u64, u16)>,
}

/// Appends every prefix of `trie` with its value to `out`; `net` makes an `IpNet` of a key's
/// address and prefix length (`None` for a length out of range).
fn trie_contents<K: aya::Pod>(
    trie: &LpmTrie<MapData, K, PeerValue>,
    name: &'static str,
    out: &mut Vec<(IpNet, PeerValue)>,
    net: impl Fn(K, u8) -> Option<IpNet>,
) -> Result<(), EbpfFailure> {
    for entry in trie {
        let (key, value) = entry.map_err(|source| EbpfFailure::Map {
            what: format!("reading the pinned {name}"),
            source,
        })?;
        let len = key.prefix_len();
        let prefix = u8::try_from(len)
            .ok()
            .and_then(|l| net(key.data(), l))
            .ok_or_else(|| EbpfFailure::Map {
                what: format!("reading the pinned {name}"),
                source: MapError::IoError(io::Error::other(format!(
                    "prefix length {len} out of range"
                ))),
            })?;
        out.push((prefix, value));
    }
    Ok(())
}

/// Removes the prefixes of `trie` that are not in `want`.
fn remove_stale<K: aya::Pod + Eq + std::hash::Hash>(
    trie: &mut LpmTrie<MapData, K, PeerValue>,
    name: &'static str,
    want: &[(Key<K>, PeerValue)],
) -> Result<(), EbpfFailure> {
    let wanted: std::collections::HashSet<(u32, K)> = want
        .iter()
        .map(|(w, _)| (w.prefix_len(), w.data()))
        .collect();
    let stale: Vec<Key<K>> = trie
        .keys()
        .filter_map(Result::ok)
        .filter(|k| !wanted.contains(&(k.prefix_len(), k.data())))
        .collect();
    for key in &stale {
        trie.remove(key).map_err(|source| EbpfFailure::Map {
            what: format!("removing a peer from {name}"),
            source,
        })?;
    }
    Ok(())
}

/// Inserts or updates every prefix of `want` in `trie`.
fn insert_all<K: aya::Pod>(
    trie: &mut LpmTrie<MapData, K, PeerValue>,
    name: &'static str,
    want: &[(Key<K>, PeerValue)],
) -> Result<(), EbpfFailure> {
    for (key, value) in want {
        trie.insert(key, value, 0)
            .map_err(|source| EbpfFailure::Map {
                what: format!("adding a peer to {name}"),
                source,
            })?;
    }
    Ok(())
}
