//! Per-SA NAT residuals: which (SA, peer) pairs have a learned residual, the learning rounds of
//! the others, and what carries over when an SA is rekeyed.
//!
//! Under SA scope each inbound SA has its own residual, so hosts that share one NAT address
//! (each with its own SAs) are verified each against its own. The residual depends only on the
//! addresses before and after the NAT, so a new SA with the same outer addresses and
//! encapsulation ports as one already learned (an IKE rekey through the same NAT mapping) takes
//! its residual at once, before its first segment: a rekey leaves no segment unverified.
//! Under address scope the SA is unknown (`spi` 0): one residual per peer, as before.
//!
//! This is plain state; the daemon applies what it returns to the `SA_RESIDUALS` map.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
};

use monitor_ebpf::SaKey;

use crate::{
    learn::{Learner, Outcome},
    xfrm::Sa,
};

/// The outer addresses and encapsulation ports of an SA: what fixes its NAT residual.
pub type Tuple = (IpAddr, IpAddr, u16, u16);

/// Most tuples remembered for carrying residuals over to rekeyed SAs.
pub const MAX_TUPLES: usize = 16384;

/// What changed in `SA_RESIDUALS` after a new SA list.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SaSync {
    /// Residuals to install: rekeyed SAs that inherit a learned residual.
    pub install: Vec<(SaKey, u16)>,
    /// Keys whose SA is gone.
    pub remove: Vec<SaKey>,
}

/// The daemon's view of the learned residuals.
#[derive(Debug, Default)]
pub struct Residuals {
    learned: BTreeMap<SaKey, u16>,
    learner: Learner<SaKey>,
    /// Tuple of every SA in the last list, by key.
    tuples: HashMap<SaKey, Tuple>,
    /// Residual learned for each tuple, kept after its SA is gone so a rekey can inherit it.
    by_tuple: HashMap<Tuple, u16>,
}

/// The SA-scope key of an SA whose segments count into peer `peer_id`.
#[must_use]
pub const fn key_of(sa: &Sa, peer_id: u32) -> SaKey {
    SaKey {
        // The verifier reads `id.spi` as the kernel stores it, in network byte order.
        spi: sa.spi.to_be(),
        peer_id,
    }
}

fn tuple_of(sa: &Sa) -> Option<Tuple> {
    sa.encap
        .map(|(_, sport, dport)| (sa.src, sa.dst, sport, dport))
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

    /// True while any SA of peer `id` is being learned.
    #[must_use]
    pub fn peer_learning(&self, id: u32) -> bool {
        self.learner.any(|k| k.peer_id == id)
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
        self.learned.insert(key, residual);
        if let Some(t) = self.tuples.get(&key) {
            if self.by_tuple.len() >= MAX_TUPLES && !self.by_tuple.contains_key(t) {
                self.by_tuple.clear();
            }
            self.by_tuple.insert(*t, residual);
        }
    }

    /// Records that `key` was removed from the map.
    pub fn removed(&mut self, key: &SaKey) {
        self.learned.remove(key);
        self.learner.reset(*key);
    }

    /// Every key of peer `id` (its prefix changed or went away): to remove from the map.
    #[must_use]
    pub fn keys_of_peer(&self, id: u32) -> Vec<SaKey> {
        self.learned
            .keys()
            .filter(|k| k.peer_id == id)
            .copied()
            .collect()
    }

    /// Forgets the learning rounds of peer `id`.
    pub fn reset_peer(&mut self, id: u32) {
        self.learner.retain(|k| k.peer_id != id);
    }

    /// Takes a new list of the inbound NAT-T SAs, each with the peer that counts it: residuals
    /// of SAs that are gone are to be removed, and new SAs whose tuple was learned before
    /// inherit that residual.
    pub fn sync(&mut self, sas: &[(Sa, u32)]) -> SaSync {
        self.tuples = sas
            .iter()
            .filter_map(|(sa, id)| tuple_of(sa).map(|t| (key_of(sa, *id), t)))
            .collect();
        let live: BTreeSet<SaKey> = sas.iter().map(|(sa, id)| key_of(sa, *id)).collect();
        let remove: Vec<SaKey> = self
            .learned
            .keys()
            .filter(|k| k.spi != 0 && !live.contains(k))
            .copied()
            .collect();
        self.learner.retain(|k| k.spi == 0 || live.contains(&k));
        let install = live
            .iter()
            .filter(|k| !self.learned.contains_key(k))
            .filter_map(|k| {
                let t = self.tuples.get(k)?;
                self.by_tuple.get(t).map(|r| (*k, *r))
            })
            .collect();
        SaSync { install, remove }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(src: &str, spi: u32, sport: u16) -> Sa {
        Sa {
            src: src.parse().unwrap(),
            dst: "192.0.2.1".parse().unwrap(),
            spi,
            proto: 50,
            mode: 0,
            encap: Some((2, sport, 4500)),
        }
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
        let a = sa("203.0.113.9", 0x100, 4500);
        let b = sa("203.0.113.9", 0x200, 61000);
        assert_eq!(r.sync(&[(a.clone(), 0), (b.clone(), 0)]), SaSync::default());
        learn(&mut r, key_of(&a, 0), 0x1111);
        learn(&mut r, key_of(&b, 0), 0x2222);
        assert_eq!(r.get(&key_of(&a, 0)), Some(0x1111));
        assert_eq!(r.get(&key_of(&b, 0)), Some(0x2222));
        assert!(!r.peer_learning(0));
        // A late sample of a decided SA is ignored.
        assert_eq!(r.sample(key_of(&a, 0), 0x9999), None);
    }

    #[test]
    fn a_rekeyed_sa_inherits_the_residual_of_its_tuple_and_the_old_one_goes() {
        let mut r = Residuals::default();
        let old = sa("203.0.113.9", 0x100, 4500);
        r.sync(&[(old.clone(), 3)]);
        learn(&mut r, key_of(&old, 3), 0xabcd);
        // Make-before-break: the new SA appears beside the old one.
        let new = sa("203.0.113.9", 0x101, 4500);
        let other = sa("203.0.113.9", 0x300, 4501);
        let s = r.sync(&[(old.clone(), 3), (new.clone(), 3), (other.clone(), 3)]);
        assert_eq!(s.install, vec![(key_of(&new, 3), 0xabcd)]);
        assert_eq!(s.remove, []);
        r.installed(key_of(&new, 3), 0xabcd);
        // Then the old SA is deleted.
        let s = r.sync(&[(new.clone(), 3), (other, 3)]);
        assert_eq!(s.remove, vec![key_of(&old, 3)]);
        r.removed(&key_of(&old, 3));
        assert_eq!(r.len(), 1);
        // Break-before-make: the tuple is remembered after its SA is gone.
        assert_eq!(r.sync(&[]).remove, vec![key_of(&new, 3)]);
        r.removed(&key_of(&new, 3));
        let again = sa("203.0.113.9", 0x102, 4500);
        assert_eq!(
            r.sync(&[(again.clone(), 3)]).install,
            vec![(key_of(&again, 3), 0xabcd)]
        );
    }

    #[test]
    fn address_scope_keys_survive_sa_lists_and_peer_resets_drop_rounds() {
        let mut r = Residuals::default();
        let k = SaKey { spi: 0, peer_id: 1 };
        learn(&mut r, k, 0x0042);
        assert_eq!(r.sync(&[]).remove, []);
        assert_eq!(r.keys_of_peer(1), vec![k]);
        let k2 = SaKey { spi: 0, peer_id: 2 };
        assert_eq!(r.sample(k2, 1), Some(Outcome::Pending));
        assert!(r.peer_learning(2));
        r.reset_peer(2);
        assert!(!r.peer_learning(2));
    }
}
