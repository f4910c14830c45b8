//! Peers: the source prefixes whose segments the verifier checks, and how.
//!
//! Peers are the only values the `peer` metric label and the log lines ever take, so the label
//! set is bounded by configuration (and, later, by the kernel's SAs), never by traffic.

use std::{fmt, net::IpAddr, str::FromStr};

use ipnet::IpNet;
use monitor_ebpf::{MAX_PEERS, PEER_FLAG_LEARN, PeerMode, PeerValue, csum};
use tracing::info;

/// What the verifier does with a mismatching segment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Count and log mismatches; deliver the segment.
    #[default]
    Observe,
    /// Count, log and drop mismatching segments so TCP retransmits them.
    Enforce,
}

impl Mode {
    /// The ABI value stored in the peer map.
    #[must_use]
    pub const fn abi(self) -> u8 {
        match self {
            Self::Observe => PeerMode::Observe as u8,
            Self::Enforce => PeerMode::Enforce as u8,
        }
    }

    /// The mode a peer map value carries; `None` for a byte no build writes.
    #[must_use]
    pub const fn from_abi(v: u8) -> Option<Self> {
        match PeerMode::from_abi(v) {
            Some(PeerMode::Observe) => Some(Self::Observe),
            Some(PeerMode::Enforce) => Some(Self::Enforce),
            None => None,
        }
    }

    /// Lower-case name, as used on the command line and in logs.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Observe => "observe",
            Self::Enforce => "enforce",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Original (pre-NAT) addresses of a peer's segments, when they are known. The sender's checksum
/// covers these; the verifier sees the rewritten ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NatAddresses {
    /// The peer's own address, before its NAT rewrote it.
    pub original_src: IpAddr,
    /// The address the peer sent to (ours, as the peer knows it).
    pub original_dst: IpAddr,
    /// The address we see the peer's segments come from.
    pub observed_src: IpAddr,
    /// Our address as the segments arrive.
    pub observed_dst: IpAddr,
}

/// Error building a peer from its parts.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PeerError {
    /// The CIDR did not parse.
    #[error(
        "`{input}` is not an IP address or CIDR prefix (expected e.g. 192.0.2.7, 198.51.100.0/24 or 2001:db8::/64)"
    )]
    BadCidr {
        /// What was given.
        input: String,
    },
    /// Address families of the NAT addresses differ from each other or from the peer.
    #[error("NAT addresses of peer {peer} mix IPv4 and IPv6")]
    MixedFamilies {
        /// The peer's prefix.
        peer: IpNet,
    },
    /// More peers than the maps hold.
    #[error(
        "{count} peers configured{}; natt-monitor tracks at most {max} (raise --max-peers)",
        catch_alls(*undiscovered)
    )]
    TooMany {
        /// How many were given.
        count: usize,
        /// How many of them are SA scope's catch-alls (`Source::Undiscovered`).
        undiscovered: usize,
        /// The limit (`--max-peers`).
        max: u32,
    },
    /// The same prefix twice.
    #[error("peer {peer} is configured twice")]
    Duplicate {
        /// The repeated prefix.
        peer: IpNet,
    },
}

/// Parses `192.0.2.7`, `198.51.100.0/24`, `2001:db8::/64` (a bare address is a host prefix).
/// Host bits below the prefix are cleared, as a routing table would.
///
/// # Errors
/// `PeerError::BadCidr` naming the input.
pub fn parse_cidr(input: &str) -> Result<IpNet, PeerError> {
    let s = input.trim();
    let net = IpNet::from_str(s)
        .or_else(|_| IpAddr::from_str(s).map(IpNet::from))
        .map_err(|_| PeerError::BadCidr {
            input: input.to_owned(),
        })?;
    Ok(net.trunc())
}

/// One peer as configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerSpec {
    /// Source prefix.
    pub net: IpNet,
    /// What to do with mismatches.
    pub mode: Mode,
    /// Pre-NAT addresses, when known; `None` means no NAT (expected residual 0) unless `learn`.
    pub nat: Option<NatAddresses>,
    /// Learn the NAT residual from traffic (`nat` is then `None`); see `learn.rs`.
    pub learn: bool,
    /// Identity of what the peer was discovered from (a hash of its SAs); a change means the
    /// path may have changed, so a learned residual is learned again. 0 for static peers.
    pub generation: u64,
    /// Where it came from.
    pub source: Source,
}

impl PeerSpec {
    /// A peer with no NAT between us.
    #[must_use]
    pub const fn new(net: IpNet, mode: Mode) -> Self {
        Self {
            net,
            mode,
            nat: None,
            learn: false,
            generation: 0,
            source: Source::Static,
        }
    }

    /// The residual an intact segment from this peer leaves (0 without NAT).
    ///
    /// # Errors
    /// `PeerError::MixedFamilies` when the NAT addresses are not all of the peer's family.
    pub fn expected_residual(&self) -> Result<u16, PeerError> {
        let Some(n) = self.nat else { return Ok(0) };
        let sums = [
            n.original_src,
            n.original_dst,
            n.observed_src,
            n.observed_dst,
        ]
        .map(|a| match (a, self.net) {
            (IpAddr::V4(a), IpNet::V4(_)) => Some(csum::addr4_sum(a.octets())),
            (IpAddr::V6(a), IpNet::V6(_)) => Some(csum::addr6_sum(a.octets())),
            _ => None,
        });
        let [Some(os), Some(od), Some(ss), Some(sd)] = sums else {
            return Err(PeerError::MixedFamilies { peer: self.net });
        };
        Ok(csum::nat_residual(os, od, ss, sd))
    }

    /// The label value this peer exports: its prefix.
    #[must_use]
    pub fn label(&self) -> String {
        if self.source == Source::Undiscovered {
            return UNDISCOVERED.to_owned();
        }
        self.net.to_string()
    }
}

/// Where a peer came from; the `source` label of `natt_monitor_peers`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Source {
    /// `--peer` flags and `[[peer]]` entries of the configuration file.
    #[default]
    Static,
    /// The kernel's inbound ESP-in-UDP/TCP transport-mode SAs (`--discover xfrm`).
    Xfrm,
    /// SA scope's two catch-alls (`0.0.0.0/0`, `::/0`): the segments of every NAT-T transport SA
    /// that no other peer names (SAs of other network namespaces, or of a host without
    /// discovery), verified per SA under the one label `peer="undiscovered"`.
    Undiscovered,
}

/// The `peer` label of `Source::Undiscovered` (both families, summed). No other peer has it:
/// peer labels are prefixes.
pub const UNDISCOVERED: &str = "undiscovered";

impl Source {
    /// Every source, for pre-registering gauges at 0.
    pub const ALL: [Self; 3] = [Self::Static, Self::Xfrm, Self::Undiscovered];

    /// Label value.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Static => "static",
            Self::Xfrm => "xfrm",
            Self::Undiscovered => UNDISCOVERED,
        }
    }
}

/// `PeerError::TooMany`'s note on the catch-alls among the peers counted.
fn catch_alls(n: usize) -> String {
    if n == 0 {
        String::new()
    } else {
        format!(" (with SA scope's {n} catch-alls for undiscovered SAs)")
    }
}

/// The peers the verifier knows, keyed by id. Ids index the per-peer statistics array; they are
/// stable across reloads (a peer that stays keeps its id and its counts) and a freed id is
/// reused only after its statistics slot has been reset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerTable {
    peers: std::collections::BTreeMap<u32, PeerSpec>,
    /// The most peers the maps hold (`--max-peers`).
    limit: u32,
}

impl Default for PeerTable {
    fn default() -> Self {
        Self {
            peers: std::collections::BTreeMap::new(),
            limit: MAX_PEERS,
        }
    }
}

impl PeerTable {
    /// An empty table for maps that hold `limit` peers.
    #[must_use]
    pub fn with_limit(limit: u32) -> Self {
        Self {
            limit,
            ..Self::default()
        }
    }

    /// The most peers this table's maps hold.
    #[must_use]
    pub const fn limit(&self) -> u32 {
        self.limit
    }

    /// Builds a table with ids `0..n`, rejecting duplicates and more than `MAX_PEERS` entries.
    ///
    /// # Errors
    /// `PeerError::Duplicate`, `PeerError::TooMany`, or `PeerError::MixedFamilies`.
    pub fn new(peers: Vec<PeerSpec>) -> Result<Self, PeerError> {
        Self::default().reconcile(peers)
    }

    /// The prefixes a pinned peer map held, under the ids it gave them: what `reconcile` starts
    /// from when a daemon adopts pinned maps, so that every prefix that stays keeps its id and
    /// with it its counts. Only the prefix and mode of each entry are known.
    #[must_use]
    pub fn pinned(entries: &[(IpNet, PeerValue)], limit: u32) -> Self {
        let peers = entries
            .iter()
            .map(|(net, v)| {
                // A byte no build writes: never drop on a guess.
                let mode = Mode::from_abi(v.mode).unwrap_or_else(|| {
                    tracing::warn!(peer = %net, mode = v.mode, "the pinned peer map holds a mode byte this build does not know; taking it as observe");
                    Mode::Observe
                });
                (v.id, PeerSpec::new(*net, mode))
            })
            .collect();
        Self { peers, limit }
    }

    /// The table for a new peer list: peers whose prefix is already here keep their id, new
    /// ones take the lowest free ids.
    ///
    /// # Errors
    /// As `new`.
    pub fn reconcile(&self, peers: Vec<PeerSpec>) -> Result<Self, PeerError> {
        if peers.len() > self.limit as usize {
            return Err(PeerError::TooMany {
                count: peers.len(),
                undiscovered: peers
                    .iter()
                    .filter(|p| p.source == Source::Undiscovered)
                    .count(),
                max: self.limit,
            });
        }
        // Hash lookups: a concentrator's table has thousands of peers, re-reconciled on every
        // SA change.
        let mut seen = std::collections::HashSet::with_capacity(peers.len());
        for p in &peers {
            if !seen.insert(p.net) {
                return Err(PeerError::Duplicate { peer: p.net });
            }
            p.expected_residual()?;
        }
        let ids: std::collections::HashMap<IpNet, u32> =
            self.peers.iter().map(|(id, p)| (p.net, *id)).collect();
        let mut out = std::collections::BTreeMap::new();
        let mut fresh = Vec::new();
        for p in peers {
            match ids.get(&p.net).copied() {
                Some(id) => {
                    out.insert(id, p);
                }
                None => fresh.push(p),
            }
        }
        // Freed ids are reused at once: `Verifier::set_peers` resets the statistics of every id
        // whose prefix changed before the new prefix goes into the maps.
        let mut next = 0u32;
        for p in fresh {
            while out.contains_key(&next) {
                next += 1;
            }
            out.insert(next, p);
            next += 1;
        }
        Ok(Self {
            peers: out,
            limit: self.limit,
        })
    }

    /// True if peer `id`'s residual is learned from traffic (per SA) rather than configured.
    #[must_use]
    pub fn learns(&self, id: u32) -> bool {
        self.peers.get(&id).is_some_and(|p| p.learn)
    }

    /// The configured residual of peer `id`'s intact segments; `None` when it is learned.
    #[must_use]
    pub fn residual(&self, id: u32) -> Option<u16> {
        let p = self.peers.get(&id)?;
        if p.learn {
            None
        } else {
            p.expected_residual().ok()
        }
    }

    /// The id of the peer with this prefix, if any.
    #[must_use]
    pub fn id_of(&self, net: IpNet) -> Option<u32> {
        self.peers
            .iter()
            .find_map(|(id, p)| (p.net == net).then_some(*id))
    }

    /// Peers in id order.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &PeerSpec)> {
        self.peers.iter().map(|(id, p)| (*id, p))
    }

    /// The peer with this id.
    #[must_use]
    pub fn get(&self, id: u32) -> Option<&PeerSpec> {
        self.peers.get(&id)
    }

    /// Number of peers.
    #[must_use]
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// True when no peer is configured.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// Number of peers from each source.
    #[must_use]
    pub fn count_by_source(&self, source: Source) -> usize {
        self.peers.values().filter(|p| p.source == source).count()
    }

    /// The map value for peer `id`.
    ///
    /// # Panics
    /// Never for a table built by `new` or `reconcile` (residuals were validated there).
    #[must_use]
    pub fn value(&self, id: u32, spec: &PeerSpec) -> PeerValue {
        let (flags, expected_residual) = if spec.learn {
            (PEER_FLAG_LEARN, 0)
        } else {
            (
                0,
                spec.expected_residual()
                    .expect("validated in PeerTable::reconcile"),
            )
        };
        PeerValue {
            id,
            mode: spec.mode.abi(),
            flags,
            expected_residual,
        }
    }
}

/// One line per peer: what is verified and how.
pub fn log_peers(table: &PeerTable) {
    for (id, p) in table.iter().take(LOGGED_PEERS) {
        match table.residual(id) {
            Some(residual) => {
                info!(peer = %p.net, id, mode = %p.mode, source = p.source.as_str(), residual, "verifying peer");
            }
            None => {
                info!(peer = %p.net, id, mode = %p.mode, source = p.source.as_str(), "verifying peer; each SA's NAT residual is learned from its first segments");
            }
        }
    }
    if table.len() > LOGGED_PEERS {
        info!(
            more = table.len() - LOGGED_PEERS,
            peers = table.len(),
            "verifying further peers, not listed one by one (natt_monitor_peers counts them)"
        );
    }
}

/// Peers `log_peers` lists one line each; a concentrator's thousands are summed up in one.
pub const LOGGED_PEERS: usize = 64;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_addresses_and_prefixes() {
        assert_eq!(parse_cidr("192.0.2.7").unwrap().to_string(), "192.0.2.7/32");
        assert_eq!(
            parse_cidr("198.51.100.9/24").unwrap().to_string(),
            "198.51.100.0/24"
        );
        assert_eq!(
            parse_cidr("2001:db8::1/64").unwrap().to_string(),
            "2001:db8::/64"
        );
        assert_eq!(
            parse_cidr("10.0.0.300/8").unwrap_err().to_string(),
            "`10.0.0.300/8` is not an IP address or CIDR prefix (expected e.g. 192.0.2.7, \
             198.51.100.0/24 or 2001:db8::/64)"
        );
        assert!(parse_cidr("10.0.0.0/33").is_err());
    }

    /// Every mode byte read back from a pinned map is decoded; one no build writes is taken as
    /// observe, never as enforce.
    #[test]
    fn pinned_mode_bytes_are_decoded() {
        for m in [Mode::Observe, Mode::Enforce] {
            assert_eq!(Mode::from_abi(m.abi()), Some(m));
        }
        assert_eq!(Mode::from_abi(7), None);
        let net = parse_cidr("192.0.2.7").unwrap();
        let value = |mode| PeerValue {
            id: 3,
            mode,
            ..PeerValue::default()
        };
        let t = PeerTable::pinned(&[(net, value(Mode::Enforce.abi()))], 8);
        assert_eq!(t.get(3).map(|p| p.mode), Some(Mode::Enforce));
        let t = PeerTable::pinned(&[(net, value(7))], 8);
        assert_eq!(t.get(3).map(|p| p.mode), Some(Mode::Observe));
    }

    #[test]
    fn table_rejects_duplicates_and_mixed_nat_families() {
        let a = PeerSpec::new(parse_cidr("10.0.0.0/8").unwrap(), Mode::Observe);
        assert_eq!(
            PeerTable::new(vec![a.clone(), a.clone()])
                .unwrap_err()
                .to_string(),
            "peer 10.0.0.0/8 is configured twice"
        );
        let mut b = a;
        b.nat = Some(NatAddresses {
            original_src: "10.0.0.1".parse().unwrap(),
            original_dst: "::1".parse().unwrap(),
            observed_src: "10.0.0.1".parse().unwrap(),
            observed_dst: "10.0.0.2".parse().unwrap(),
        });
        assert_eq!(
            PeerTable::new(vec![b]).unwrap_err().to_string(),
            "NAT addresses of peer 10.0.0.0/8 mix IPv4 and IPv6"
        );
    }

    #[test]
    fn reconcile_keeps_ids_of_remaining_peers() {
        let p = |s: &str| PeerSpec::new(parse_cidr(s).unwrap(), Mode::Observe);
        let t = PeerTable::new(vec![p("10.0.0.1"), p("10.0.0.2"), p("10.0.0.3")]).unwrap();
        let ids: Vec<(u32, String)> = t.iter().map(|(i, s)| (i, s.label())).collect();
        assert_eq!(
            ids,
            [
                (0, "10.0.0.1/32".into()),
                (1, "10.0.0.2/32".into()),
                (2, "10.0.0.3/32".into())
            ]
        );
        // Drop .1, keep .3 and .2 (listed in another order), add .4: it takes the freed id 0.
        let u = t
            .reconcile(vec![p("10.0.0.3"), p("10.0.0.4"), p("10.0.0.2")])
            .unwrap();
        let ids: Vec<(u32, String)> = u.iter().map(|(i, s)| (i, s.label())).collect();
        assert_eq!(
            ids,
            [
                (0, "10.0.0.4/32".into()),
                (1, "10.0.0.2/32".into()),
                (2, "10.0.0.3/32".into())
            ]
        );
        assert_eq!(u.id_of(parse_cidr("10.0.0.3").unwrap()), Some(2));
    }

    #[test]
    fn learning_peers_carry_the_flag() {
        let mut learner = PeerSpec::new(parse_cidr("10.0.0.0/8").unwrap(), Mode::Enforce);
        learner.learn = true;
        learner.source = Source::Xfrm;
        let exact = PeerSpec::new(parse_cidr("10.1.2.3").unwrap(), Mode::Observe);
        let t = PeerTable::new(vec![learner, exact]).unwrap();
        assert!(t.learns(0));
        assert!(!t.learns(1));
        let v = t.value(0, t.get(0).unwrap());
        assert_eq!(
            (v.flags, v.mode),
            (PEER_FLAG_LEARN, PeerMode::Enforce as u8)
        );
        assert_eq!(t.residual(0), None);
        assert_eq!(t.residual(1), Some(0));
        assert_eq!(t.count_by_source(Source::Xfrm), 1);
    }

    #[test]
    fn nat_residual_is_zero_when_nothing_was_rewritten() {
        let mut p = PeerSpec::new(parse_cidr("192.0.2.0/24").unwrap(), Mode::Observe);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "198.51.100.1".parse().unwrap();
        p.nat = Some(NatAddresses {
            original_src: a,
            original_dst: b,
            observed_src: a,
            observed_dst: b,
        });
        assert_eq!(p.expected_residual(), Ok(0));
        p.nat = Some(NatAddresses {
            original_src: "10.1.1.1".parse().unwrap(),
            original_dst: b,
            observed_src: a,
            observed_dst: b,
        });
        assert_ne!(p.expected_residual(), Ok(0));
    }
}
