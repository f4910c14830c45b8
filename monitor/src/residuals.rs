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

use std::collections::{BTreeMap, HashMap};

use monitor_ebpf::SaKey;

use crate::learn::{Learner, Outcome};

/// The daemon's view of the learned residuals.
#[derive(Debug, Default)]
pub struct Residuals {
    learned: BTreeMap<SaKey, u16>,
    /// Installed residuals per peer id.
    per_peer: HashMap<u32, usize>,
    learner: Learner<SaKey>,
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
        if self.learned.insert(key, residual).is_none() {
            *self.per_peer.entry(key.peer_id).or_default() += 1;
        }
    }

    /// Forgets peer `id`: its residuals (returned, to remove from the map) and its rounds.
    pub fn forget_peer(&mut self, id: u32) -> Vec<SaKey> {
        self.learner.retain(|k| k.peer_id != id);
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
}
