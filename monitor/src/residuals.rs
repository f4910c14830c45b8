//! Learned NAT residuals: which NAT mappings have one installed in `SA_RESIDUALS`, and the
//! learning rounds of the others.
//!
//! A residual depends only on the addresses before and after the NAT. The verifier keys it by
//! what names the NAT mapping of the SA that decapsulated the segment (`SaKey`: the addresses as
//! received, which in transport mode are the SA's outer ones, and the SA's encapsulation ports).
//! So hosts that share one NAT address (each with its own SAs, told apart by the NAT's source
//! port) each have their own residual, and an SA rekeyed through the same mapping finds its
//! residual already installed: a rekey leaves no segment unverified, with no race against the
//! SA notification. Under address scope the ports are 0: one residual per address pair.
//!
//! The map is an LRU hash in the kernel, so it stays bounded without the daemon tracking SA
//! lifetimes; a peer whose configuration changes has its residuals removed.
//!
//! A learned residual can be wrong: whoever holds the SA's keys can send a flood of segments
//! that all leave one chosen value while the mapping learns (docs/configuration.md, "Learning
//! under attack"). So an installed residual stays on trial. Mismatches through its mapping are
//! a `Round` of their own, counting each segment once (a TCP retransmission of a dropped
//! segment is the same segment). If `AGREE` distinct segments and three quarters of the round
//! leave one other value *and not one segment of the peer verified meanwhile*, the intact
//! traffic is the one being refused: the residual is withdrawn and the mapping learns again.
//! Corruption cannot do that: it leaves values that differ from segment to segment, and where
//! it does not (a bit stuck at one offset) the segments it spares still verify.

use std::collections::{BTreeMap, HashMap};

use monitor_ebpf::SaKey;

use crate::learn::{Learner, Outcome, Round};

/// The daemon's view of the learned residuals.
#[derive(Debug, Default)]
pub struct Residuals {
    learned: BTreeMap<SaKey, u16>,
    /// Installed residuals per peer id.
    per_peer: HashMap<u32, usize>,
    learner: Learner<SaKey>,
    /// Mismatches against installed residuals, per mapping (at most one per installed key).
    trials: HashMap<SaKey, Trial>,
}

/// A segment, told apart from others of its mapping: ports and TCP sequence number (UDP: the
/// checksum field too, so that distinct datagrams count apart).
pub type Segment = (u16, u16, u32);

/// The evidence against one installed residual.
#[derive(Debug, Default)]
struct Trial {
    round: Round,
    /// Segments counted in this round (at most `learn::WINDOW`).
    seen: Vec<Segment>,
    /// The peer's verified segments when the round began.
    verified_at_start: u64,
}

/// What a mismatch did to the trial of its mapping's residual.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The mapping's residual was not learned (configured, or already gone), or this segment
    /// was counted before, or the round has not decided.
    Pending,
    /// `AGREE` distinct segments agreed on `found`, but segments of the peer verified
    /// meanwhile: corruption with a constant pattern, not a wrong residual. The round starts
    /// over.
    Upheld {
        /// The value the mismatches agreed on.
        found: u16,
        /// Segments of the peer verified during the round.
        verified: u64,
    },
    /// The residual is withdrawn: the mapping learns again.
    Withdrawn {
        /// The residual that was installed.
        learned: u16,
        /// The value the refused segments agreed on.
        found: u16,
        /// Mismatches in the deciding round.
        segments: u32,
    },
}

impl Residuals {
    /// The residual installed for `key`, if any.
    #[must_use]
    pub fn get(&self, key: &SaKey) -> Option<u16> {
        self.learned.get(key).copied()
    }

    /// Number of installed residuals.
    #[must_use]
    pub fn len(&self) -> usize {
        self.learned.len()
    }

    /// True when none is installed.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.learned.is_empty()
    }

    /// True while peer `id` (which `learns` its residuals) has nothing learned yet, or any of its
    /// NAT mappings is being learned: some of its segments are not verified.
    #[must_use]
    pub fn peer_learning(&self, id: u32, learns: bool) -> bool {
        (learns && self.per_peer.get(&id).is_none_or(|n| *n == 0))
            || self.learner.any(|k| k.peer_id == id)
    }

    /// Feeds one learning sample. `None` if `key` is already decided (a sample that was in the
    /// ring when its residual was installed).
    pub fn sample(&mut self, key: SaKey, residual: u16) -> Option<Outcome> {
        if self.learned.contains_key(&key) {
            return None;
        }
        Some(self.learner.sample(key, residual))
    }

    /// Records that `key`'s residual is now installed.
    pub fn installed(&mut self, key: SaKey, residual: u16) {
        self.trials.remove(&key);
        if self.learned.insert(key, residual).is_none() {
            *self.per_peer.entry(key.peer_id).or_default() += 1;
        }
    }

    /// Weighs one mismatch of `segment` through mapping `key`, whose segments were expected to
    /// leave `expected` and this one left `found`. `verified` reads the peer's verified
    /// segments so far (`None`: unreadable, and then nothing is withdrawn); it is called when a
    /// round starts and when it decides.
    pub fn mismatch(
        &mut self,
        key: SaKey,
        expected: u16,
        found: u16,
        segment: Segment,
        verified: impl Fn() -> Option<u64>,
    ) -> Verdict {
        if self.learned.get(&key) != Some(&expected) {
            return Verdict::Pending;
        }
        let trial = match self.trials.entry(key) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let Some(at) = verified() else {
                    return Verdict::Pending;
                };
                e.insert(Trial {
                    verified_at_start: at,
                    ..Trial::default()
                })
            }
        };
        if trial.seen.contains(&segment) {
            return Verdict::Pending;
        }
        trial.seen.push(segment);
        match trial.round.sample(found) {
            Outcome::Pending => Verdict::Pending,
            Outcome::Restarted { .. } => {
                // No agreement among `WINDOW` mismatches: corruption. Start afresh.
                self.trials.remove(&key);
                Verdict::Pending
            }
            Outcome::Learned { residual, samples } => {
                let start = trial.verified_at_start;
                self.trials.remove(&key);
                match verified().map(|now| now.saturating_sub(start)) {
                    Some(0) => {
                        self.withdraw(key);
                        Verdict::Withdrawn {
                            learned: expected,
                            found: residual,
                            segments: samples,
                        }
                    }
                    Some(verified) => Verdict::Upheld {
                        found: residual,
                        verified,
                    },
                    None => Verdict::Pending,
                }
            }
        }
    }

    /// Removes `key`'s residual (the caller removes it from the map): the mapping learns again.
    fn withdraw(&mut self, key: SaKey) {
        if self.learned.remove(&key).is_some()
            && let Some(n) = self.per_peer.get_mut(&key.peer_id)
        {
            *n = n.saturating_sub(1);
        }
        self.learner.reset(key);
    }

    /// Forgets peer `id`: its residuals (returned, to remove from the map) and its rounds.
    pub fn forget_peer(&mut self, id: u32) -> Vec<SaKey> {
        self.learner.retain(|k| k.peer_id != id);
        self.trials.retain(|k, _| k.peer_id != id);
        let keys: Vec<SaKey> = self
            .learned
            .keys()
            .filter(|k| k.peer_id == id)
            .copied()
            .collect();
        for k in &keys {
            self.learned.remove(k);
        }
        self.per_peer.remove(&id);
        keys
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(src: [u8; 4], sport: u16, peer_id: u32) -> SaKey {
        let mut k = SaKey {
            encap_sport: sport.to_be(),
            encap_dport: 4500u16.to_be(),
            peer_id,
            ..SaKey::default()
        };
        k.src[..4].copy_from_slice(&src);
        k.dst[..4].copy_from_slice(&[192, 0, 2, 1]);
        k
    }

    fn learn(r: &mut Residuals, key: SaKey, residual: u16) {
        for _ in 0..crate::learn::AGREE - 1 {
            assert_eq!(r.sample(key, residual), Some(Outcome::Pending));
        }
        assert_eq!(
            r.sample(key, residual),
            Some(Outcome::Learned {
                residual,
                samples: crate::learn::AGREE
            })
        );
        r.installed(key, residual);
    }

    #[test]
    fn hosts_behind_one_nat_keep_their_own_residuals() {
        let mut r = Residuals::default();
        // Two hosts behind 203.0.113.9, told apart by the NAT's source port.
        let a = key([203, 0, 113, 9], 4500, 0);
        let b = key([203, 0, 113, 9], 61000, 0);
        assert!(r.peer_learning(0, true), "nothing learned yet");
        assert!(
            !r.peer_learning(0, false),
            "a peer with a configured residual"
        );
        assert_eq!(r.sample(b, 0x2222), Some(Outcome::Pending));
        assert!(r.peer_learning(0, true));
        learn(&mut r, a, 0x1111);
        for _ in 1..crate::learn::AGREE {
            let _ = r.sample(b, 0x2222);
        }
        r.installed(b, 0x2222);
        assert_eq!(
            (r.get(&a), r.get(&b), r.len()),
            (Some(0x1111), Some(0x2222), 2)
        );
        assert!(!r.peer_learning(0, true));
        // A late sample of a decided mapping is ignored.
        assert_eq!(r.sample(a, 0x9999), None);
    }

    #[test]
    fn forgetting_a_peer_returns_its_keys_and_drops_its_rounds() {
        let mut r = Residuals::default();
        let mine = key([198, 51, 100, 1], 4500, 1);
        let other = key([198, 51, 100, 2], 4500, 2);
        learn(&mut r, mine, 0x0042);
        learn(&mut r, other, 0x0043);
        let pending = key([198, 51, 100, 1], 4501, 1);
        assert_eq!(r.sample(pending, 7), Some(Outcome::Pending));
        assert_eq!(r.forget_peer(1), vec![mine]);
        assert!(r.peer_learning(1, true), "forgotten: learns again");
        assert!(!r.peer_learning(2, true));
        assert_eq!((r.get(&mine), r.get(&other)), (None, Some(0x0043)));
        assert!(!r.is_empty());
    }

    /// A wrong residual (0x0bad, say from a flood while the mapping learned) refuses the intact
    /// segments, which all leave 0x1234 and none of which verifies: after `AGREE` distinct ones
    /// the residual goes and the mapping learns again.
    #[test]
    fn a_residual_that_refuses_all_intact_traffic_is_withdrawn() {
        let mut r = Residuals::default();
        let k = key([203, 0, 113, 9], 4500, 3);
        learn(&mut r, k, 0x0bad);
        let verified = || Some(500);
        for seq in 0..crate::learn::AGREE - 1 {
            assert_eq!(
                r.mismatch(k, 0x0bad, 0x1234, (40000, 22, seq * 1448), verified),
                Verdict::Pending
            );
        }
        assert_eq!(
            r.mismatch(k, 0x0bad, 0x1234, (40000, 22, 7 * 1448), verified),
            Verdict::Withdrawn {
                learned: 0x0bad,
                found: 0x1234,
                segments: crate::learn::AGREE
            }
        );
        assert_eq!(r.get(&k), None);
        assert!(r.peer_learning(3, true), "the mapping learns again");
        // It learns from scratch, and the intact value wins.
        learn(&mut r, k, 0x1234);
        assert_eq!(r.get(&k), Some(0x1234));
    }

    /// Retransmissions of one dropped segment count once: a corruption that repeats on the same
    /// bytes can never make the residual go (and then pass that segment unverified).
    #[test]
    fn retransmissions_of_one_segment_count_once() {
        let mut r = Residuals::default();
        let k = key([203, 0, 113, 9], 4500, 3);
        learn(&mut r, k, 0x1234);
        for _ in 0..100 {
            assert_eq!(
                r.mismatch(k, 0x1234, 0xbeef, (40000, 22, 77), || Some(0)),
                Verdict::Pending
            );
        }
        assert_eq!(r.get(&k), Some(0x1234));
    }

    /// A bit stuck at one offset leaves one value on every segment where it flips something, but
    /// the segments it spares still verify: the residual is upheld and the round starts over.
    #[test]
    fn constant_corruption_beside_verified_segments_is_upheld() {
        let mut r = Residuals::default();
        let k = key([203, 0, 113, 9], 4500, 3);
        learn(&mut r, k, 0x1234);
        let verified = std::cell::Cell::new(1000u64);
        let read = || Some(verified.get());
        for seq in 0..crate::learn::AGREE - 1 {
            assert_eq!(
                r.mismatch(k, 0x1234, 0x1244, (40000, 22, seq), read),
                Verdict::Pending
            );
            verified.set(verified.get() + 1);
        }
        assert_eq!(
            r.mismatch(k, 0x1234, 0x1244, (40000, 22, 99), read),
            Verdict::Upheld {
                found: 0x1244,
                verified: 7
            }
        );
        assert_eq!(r.get(&k), Some(0x1234));
        // Random corruption (no value agrees) never decides anything.
        for i in 0..200u16 {
            assert_eq!(
                r.mismatch(
                    k,
                    0x1234,
                    i.wrapping_mul(7919),
                    (1, 2, u32::from(i) + 1000),
                    || Some(5)
                ),
                Verdict::Pending
            );
        }
        assert_eq!(r.get(&k), Some(0x1234));
        // Mismatches against a configured residual (not learned here) are none of its business.
        let configured = key([198, 51, 100, 1], 0, 4);
        assert_eq!(
            r.mismatch(configured, 0x0042, 0x1234, (1, 2, 3), || Some(0)),
            Verdict::Pending
        );
    }
}
