//! Learned NAT residuals: which SAs have one installed in `SA_TRUST`, and the learning rounds
//! of the others.
//!
//! A residual depends only on the addresses before and after the NAT, so it is a property of
//! one SA and constant for its life. The verifier keys it by the SA that decapsulated the
//! segment (`SaKey`: the NAT mapping, named by the addresses as received and the SA's
//! encapsulation ports, and the SPI). Hosts that share one NAT address each have their own SAs
//! and residuals; a host that leaves and another that comes back on the same mapping never
//! share one.
//!
//! The daemon learns; the verifier does the rest in order with its verdicts, and reports it
//! through the learning ring: a rekey's new SA takes over the residual of a live SA of its
//! mapping (`inherited`), and a residual that `WITHDRAW_AFTER` consecutive distinct segments of
//! its SA refuse with one identical value, not one verifying in between, is withdrawn
//! (`withdrawn`). A sample of an SA this view holds as learned means the verifier no longer
//! has its residual (the LRU map forgot it, or a withdrawal record was lost): the caller checks
//! the map and, if it is gone, calls `forgotten` and learns again.
//!
//! Segments passed unverified while their SA learns (observe mode, and UDP in enforce mode) are
//! judged once the SA's residual is known, however it became known (learned here, inherited or
//! confirmed by the verifier): each that left another value was corrupt and has been delivered.
//! Until then they are tallied per SA, by residual and protocol (`Tally`).

use std::collections::{BTreeMap, HashMap};

use monitor_ebpf::{PROTO_COUNT, Proto, SaKey};

use crate::learn::{Learner, Outcome};

/// Distinct (residual, protocol) pairs tallied per learning SA. Past it, delivered samples are
/// counted without their value and judged corrupt: a value first met after this many others
/// cannot be the SA's, whose intact segments all leave one value.
pub const TALLY_VALUES: usize = 256;

/// Learning segments of each protocol that were delivered and, judged against the SA's
/// residual once it was known, found corrupt.
pub type Judged = [u64; PROTO_COUNT];

/// The delivered learning samples of one SA, waiting for its residual.
#[derive(Debug, Default)]
struct Tally {
    counts: HashMap<(u16, Proto), u64>,
    /// Samples past `TALLY_VALUES` distinct pairs, by protocol.
    unkept: Judged,
}

impl Tally {
    fn add(&mut self, residual: u16, proto: Proto) {
        let full = self.counts.len() >= TALLY_VALUES;
        match self.counts.get_mut(&(residual, proto)) {
            Some(n) => *n += 1,
            None if full => self.unkept[proto as usize] += 1,
            None => {
                self.counts.insert((residual, proto), 1);
            }
        }
    }

    fn judge(&self, residual: u16) -> Judged {
        let mut out = self.unkept;
        for ((r, proto), n) in &self.counts {
            if *r != residual {
                out[*proto as usize] += n;
            }
        }
        out
    }
}

/// The daemon's view of the installed residuals.
#[derive(Debug, Default)]
pub struct Residuals {
    learned: BTreeMap<SaKey, u16>,
    /// Installed residuals per peer id.
    per_peer: HashMap<u32, usize>,
    learner: Learner<SaKey>,
    /// Delivered learning samples of SAs without a residual yet.
    tallies: HashMap<SaKey, Tally>,
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
    /// SAs is being learned: some of its segments are not verified.
    #[must_use]
    pub fn peer_learning(&self, id: u32, learns: bool) -> bool {
        (learns && self.per_peer.get(&id).is_none_or(|n| *n == 0))
            || self.learner.any(|k| k.peer_id == id)
    }

    /// Feeds one learning sample; `delivered` names its protocol if the verifier passed it
    /// (rather than holding it), so that it is judged once the residual is known. `None` if
    /// `key` is held as learned (a sample that was in the ring when its residual was installed,
    /// which the caller judges against `get`, or one of an SA the verifier forgot: see the
    /// module's doc).
    pub fn sample(
        &mut self,
        key: SaKey,
        residual: u16,
        delivered: Option<Proto>,
    ) -> Option<Outcome> {
        if self.learned.contains_key(&key) {
            return None;
        }
        if let Some(proto) = delivered {
            self.tallies.entry(key).or_default().add(residual, proto);
        }
        Some(self.learner.sample(key, residual))
    }

    /// Records that `key`'s residual is now installed (learned here, or inherited or confirmed
    /// by the verifier), and judges the SA's delivered learning samples against it: the
    /// corrupt ones, by protocol.
    pub fn installed(&mut self, key: SaKey, residual: u16) -> Judged {
        self.learner.reset(key);
        if self.learned.insert(key, residual).is_none() {
            *self.per_peer.entry(key.peer_id).or_default() += 1;
        }
        self.tallies
            .remove(&key)
            .map_or([0; PROTO_COUNT], |t| t.judge(residual))
    }

    /// Records that the verifier no longer has `key`'s residual (withdrawn, or forgotten by the
    /// LRU map): the SA learns again. False if it was not held as learned.
    pub fn forgotten(&mut self, key: SaKey) -> bool {
        self.learner.reset(key);
        self.tallies.remove(&key);
        if self.learned.remove(&key).is_none() {
            return false;
        }
        if let Some(n) = self.per_peer.get_mut(&key.peer_id) {
            *n = n.saturating_sub(1);
        }
        true
    }

    /// Forgets peer `id`: its residuals (returned, to remove from the map) and its rounds.
    pub fn forget_peer(&mut self, id: u32) -> Vec<SaKey> {
        self.learner.retain(|k| k.peer_id != id);
        self.tallies.retain(|k, _| k.peer_id != id);
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

    fn key(src: [u8; 4], sport: u16, spi: u32, peer_id: u32) -> SaKey {
        let mut k = SaKey {
            encap_sport: sport.to_be(),
            encap_dport: 4500u16.to_be(),
            peer_id,
            spi: spi.to_be(),
            ..SaKey::default()
        };
        k.src[..4].copy_from_slice(&src);
        k.dst[..4].copy_from_slice(&[192, 0, 2, 1]);
        k
    }

    fn learn(r: &mut Residuals, key: SaKey, residual: u16) {
        for _ in 0..crate::learn::AGREE - 1 {
            assert_eq!(r.sample(key, residual, None), Some(Outcome::Pending));
        }
        assert_eq!(
            r.sample(key, residual, None),
            Some(Outcome::Learned {
                residual,
                samples: crate::learn::AGREE
            })
        );
        let _ = r.installed(key, residual);
    }

    #[test]
    fn hosts_behind_one_nat_keep_their_own_residuals() {
        let mut r = Residuals::default();
        // Two hosts behind 203.0.113.9, told apart by the NAT's source port and their SAs.
        let a = key([203, 0, 113, 9], 4500, 0xc000_0001, 0);
        let b = key([203, 0, 113, 9], 61000, 0xc000_0002, 0);
        assert!(r.peer_learning(0, true), "nothing learned yet");
        assert!(
            !r.peer_learning(0, false),
            "a peer with a configured residual"
        );
        assert_eq!(r.sample(b, 0x2222, None), Some(Outcome::Pending));
        assert!(r.peer_learning(0, true));
        learn(&mut r, a, 0x1111);
        for _ in 1..crate::learn::AGREE {
            let _ = r.sample(b, 0x2222, None);
        }
        let _ = r.installed(b, 0x2222);
        assert_eq!(
            (r.get(&a), r.get(&b), r.len()),
            (Some(0x1111), Some(0x2222), 2)
        );
        assert!(!r.peer_learning(0, true));
        // A late sample of a decided SA is not fed to learning.
        assert_eq!(r.sample(a, 0x9999, None), None);
    }

    /// A new SA on a mapping is another key: it learns for itself unless the verifier reports
    /// that it inherited the residual of a live predecessor.
    #[test]
    fn a_residual_belongs_to_one_sa() {
        let mut r = Residuals::default();
        let old = key([203, 0, 113, 9], 4500, 0xc000_0001, 0);
        let rekey = key([203, 0, 113, 9], 4500, 0xc000_0003, 0);
        let newcomer = key([203, 0, 113, 9], 4500, 0xc000_0004, 0);
        learn(&mut r, old, 0x1111);
        assert_eq!(r.get(&rekey), None);
        let _ = r.installed(rekey, 0x1111);
        assert_eq!(r.get(&rekey), Some(0x1111));
        // Another host on the same mapping after both went: learns afresh.
        assert_eq!(r.sample(newcomer, 0x4444, None), Some(Outcome::Pending));
        assert!(r.peer_learning(0, true));
    }

    #[test]
    fn a_forgotten_residual_is_learned_again() {
        let mut r = Residuals::default();
        let k = key([203, 0, 113, 9], 4500, 0xc000_0001, 3);
        learn(&mut r, k, 0x0bad);
        assert!(!r.peer_learning(3, true));
        assert!(r.forgotten(k));
        assert!(!r.forgotten(k), "only once");
        assert!(r.peer_learning(3, true), "the SA learns again");
        learn(&mut r, k, 0x1234);
        assert_eq!(r.get(&k), Some(0x1234));
    }

    #[test]
    fn forgetting_a_peer_returns_its_keys_and_drops_its_rounds() {
        let mut r = Residuals::default();
        let mine = key([198, 51, 100, 1], 4500, 1, 1);
        let other = key([198, 51, 100, 2], 4500, 2, 2);
        learn(&mut r, mine, 0x0042);
        learn(&mut r, other, 0x0043);
        let pending = key([198, 51, 100, 1], 4501, 3, 1);
        assert_eq!(r.sample(pending, 7, None), Some(Outcome::Pending));
        assert_eq!(r.forget_peer(1), vec![mine]);
        assert!(r.peer_learning(1, true), "forgotten: learns again");
        assert!(!r.peer_learning(2, true));
        assert_eq!((r.get(&mine), r.get(&other)), (None, Some(0x0043)));
        assert!(!r.is_empty());
    }

    /// Samples delivered while the SA learned are judged once its residual is known, however
    /// it became known; held ones
    /// (enforce mode, TCP) were never delivered and are not judged.
    #[test]
    fn delivered_learning_samples_are_judged_once_the_residual_is_known() {
        let mut r = Residuals::default();
        let k = key([203, 0, 113, 9], 4500, 0xc000_0001, 5);
        let (tcp, udp) = (Some(Proto::Tcp), Some(Proto::Udp));
        for (residual, proto) in [
            (0x1111, tcp),
            (0x0bad, tcp),
            (0x1111, udp),
            (0x0bad, None),
            (0x5555, udp),
            (0x1111, tcp),
        ] {
            assert_eq!(r.sample(k, residual, proto), Some(Outcome::Pending));
        }
        // Confirmed by the verifier (enforce mode) before the daemon's round settled.
        assert_eq!(r.installed(k, 0x1111), [1, 1, 0, 0]);
        assert_eq!(r.sample(k, 0x2222, tcp), None);
        // Judged once: installing again (an inherited record after a restart) finds nothing.
        assert_eq!(r.installed(k, 0x1111), [0, 0, 0, 0]);
        // An SA that never settles keeps at most TALLY_VALUES values; the rest are judged
        // corrupt without their value.
        let noisy = key([203, 0, 113, 9], 4501, 0xc000_0002, 5);
        for v in 0..u16::try_from(TALLY_VALUES).unwrap() + 9 {
            let _ = r.sample(noisy, 0x8000 + v, udp);
        }
        assert_eq!(
            r.installed(noisy, 0x8000),
            [0, TALLY_VALUES as u64 + 8, 0, 0]
        );
        // A forgotten SA's tally goes with it.
        let gone = key([203, 0, 113, 9], 4502, 0xc000_0003, 6);
        let _ = r.sample(gone, 0x0bad, tcp);
        assert_eq!(r.forget_peer(6), Vec::<SaKey>::new());
        assert_eq!(r.installed(gone, 0x1111), [0, 0, 0, 0]);
    }
}
