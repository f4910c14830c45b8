//! Learning an SA's NAT residual from its traffic.
//!
//! Behind a NAT the sender's checksum covers addresses the verifier never sees, so an intact
//! segment leaves a constant, non-zero residual (DESIGN.md, "Checksum under NAT"). When the
//! original addresses are not configured, natt-monitor learns that constant: while a peer is
//! learning, the verifier passes its segments unverified and reports each one's residual; this
//! module decides when one value has earned trust.
//!
//! The rule (documented in docs/configuration.md, "NAT residual"): a residual is accepted once
//! `AGREE` samples carry it *and* it is at least three quarters of all samples seen in the
//! current round. Intact segments all leave the same value; a corrupted one leaves a value that
//! depends on the corruption, so a corrupted first segment (or a few) cannot win. If `WINDOW`
//! samples pass without a winner the round starts over, and that is logged: the peer's traffic
//! does not agree with itself (a prefix spanning several NATs, or constant corruption).

use std::collections::HashMap;

/// Samples that must agree before a residual is trusted.
pub const AGREE: u32 = 8;
/// Samples after which an undecided round starts over.
pub const WINDOW: u32 = 64;

/// What one sample did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Not decided yet.
    Pending,
    /// This residual is now trusted.
    Learned {
        /// The residual.
        residual: u16,
        /// Samples seen in the deciding round.
        samples: u32,
    },
    /// `WINDOW` samples without agreement; the round was discarded.
    Restarted {
        /// The most frequent residual of the discarded round and its count.
        top: (u16, u32),
    },
}

/// One learning round for one peer.
#[derive(Clone, Debug, Default)]
pub struct Round {
    counts: HashMap<u16, u32>,
    total: u32,
}

impl Round {
    /// Adds one segment's residual.
    pub fn sample(&mut self, residual: u16) -> Outcome {
        self.total += 1;
        let n = {
            let c = self.counts.entry(residual).or_insert(0);
            *c += 1;
            *c
        };
        if n >= AGREE && n * 4 >= self.total * 3 {
            let samples = self.total;
            *self = Self::default();
            return Outcome::Learned { residual, samples };
        }
        if self.total >= WINDOW {
            let top = self
                .counts
                .iter()
                .max_by_key(|(r, c)| (**c, std::cmp::Reverse(**r)))
                .map_or((0, 0), |(r, c)| (*r, *c));
            *self = Self::default();
            return Outcome::Restarted { top };
        }
        Outcome::Pending
    }
}

/// Rounds for everything still learning, keyed by `K`: the (SA, peer) pair under SA scope.
#[derive(Debug)]
pub struct Learner<K> {
    rounds: HashMap<K, Round>,
}

impl<K> Default for Learner<K> {
    fn default() -> Self {
        Self {
            rounds: HashMap::new(),
        }
    }
}

impl<K: std::hash::Hash + Eq + Copy> Learner<K> {
    /// Adds a sample for `id`.
    pub fn sample(&mut self, id: K, residual: u16) -> Outcome {
        let out = self.rounds.entry(id).or_default().sample(residual);
        if matches!(out, Outcome::Learned { .. }) {
            self.rounds.remove(&id);
        }
        out
    }

    /// Forgets every peer not in `learning` (peers that were removed, re-numbered or decided),
    /// so memory stays bounded by the number of learning peers.
    pub fn retain(&mut self, learning: impl Fn(K) -> bool) {
        self.rounds.retain(|id, _| learning(*id));
    }

    /// Starts `id` over (its addresses or SA changed).
    pub fn reset(&mut self, id: K) {
        self.rounds.remove(&id);
    }

    /// True if any open round's key satisfies `f`.
    pub fn any(&self, f: impl Fn(&K) -> bool) -> bool {
        self.rounds.keys().any(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(r: &mut Round, values: &[u16]) -> Vec<Outcome> {
        values.iter().map(|v| r.sample(*v)).collect()
    }

    #[test]
    fn eight_agreeing_segments_decide() {
        let mut r = Round::default();
        let out = feed(&mut r, &[0x1234; 8]);
        assert!(out[..7].iter().all(|o| *o == Outcome::Pending));
        assert_eq!(
            out[7],
            Outcome::Learned {
                residual: 0x1234,
                samples: 8
            }
        );
    }

    #[test]
    fn a_corrupted_first_segment_does_not_win() {
        let mut r = Round::default();
        // The first segment was corrupted (residual 0xbeef), then intact ones (0x1234).
        let mut values = vec![0xbeef];
        values.extend([0x1234; 8]);
        let out = feed(&mut r, &values);
        assert_eq!(
            out.last(),
            Some(&Outcome::Learned {
                residual: 0x1234,
                samples: 9
            })
        );
        assert!(out[..8].iter().all(|o| *o == Outcome::Pending));
    }

    #[test]
    fn agreement_must_be_three_quarters_of_the_round() {
        let mut r = Round::default();
        // Alternating values: each reaches 8 samples, but only half of the round each.
        let values: Vec<u16> = (0..16).map(|i| if i % 2 == 0 { 1 } else { 2 }).collect();
        assert!(feed(&mut r, &values).iter().all(|o| *o == Outcome::Pending));
        // A run of 1s takes it over three quarters: 8 + k >= 0.75 * (16 + k) at k = 16.
        let out = feed(&mut r, &[1; 16]);
        assert_eq!(out[..15], [Outcome::Pending; 15]);
        assert_eq!(
            out[15],
            Outcome::Learned {
                residual: 1,
                samples: 32
            }
        );
    }

    #[test]
    fn a_round_without_agreement_restarts_after_the_window() {
        let mut r = Round::default();
        let values: Vec<u16> = (0..64u16).map(|i| i % 3).collect();
        let out = feed(&mut r, &values);
        assert_eq!(out[63], Outcome::Restarted { top: (0, 22) });
        // The next round starts empty.
        assert_eq!(r.sample(7), Outcome::Pending);
        assert_eq!(r.total, 1);
    }

    /// Feeds `pattern` (true: a flood segment with a chosen residual, false: an intact one)
    /// repeated to `n` segments; returns every non-pending outcome with its 1-based position.
    fn flood(pattern: &[bool], n: usize) -> Vec<(usize, Outcome)> {
        const FLOOD: u16 = 0x0bad;
        const INTACT: u16 = 0x1234;
        let mut r = Round::default();
        (0..n)
            .filter_map(|i| {
                let v = if pattern[i % pattern.len()] {
                    FLOOD
                } else {
                    INTACT
                };
                let o = r.sample(v);
                (o != Outcome::Pending).then_some((i + 1, o))
            })
            .collect()
    }

    /// The bound of docs/configuration.md, "Learning under attack": a flood below three
    /// quarters of the round is never learned, whichever segment comes first.
    #[test]
    fn a_flood_below_three_quarters_of_the_round_is_never_learned() {
        // A quarter, flood first: the intact value wins at 12 segments (9 intact).
        assert_eq!(
            flood(&[true, false, false, false], 12),
            [(
                12,
                Outcome::Learned {
                    residual: 0x1234,
                    samples: 12
                }
            )]
        );
        // Half: nothing wins; the round restarts at 64 (a tie goes to the lower value).
        assert_eq!(
            flood(&[true, false], 128),
            [
                (64, Outcome::Restarted { top: (0x0bad, 32) }),
                (128, Outcome::Restarted { top: (0x0bad, 32) })
            ]
        );
        // Two thirds, two flood segments before each intact one: still nothing.
        assert_eq!(
            flood(&[true, true, false], 64),
            [(64, Outcome::Restarted { top: (0x0bad, 43) })]
        );
        // Three quarters from the start is the boundary: the flood is learned (at 10 segments,
        // 8 of them its own). No rule that learns from traffic can tell that from a NAT; a
        // residual learned so is withdrawn once it refuses intact traffic (residuals.rs).
        assert_eq!(
            flood(&[true, true, true, false], 10),
            [(
                10,
                Outcome::Learned {
                    residual: 0x0bad,
                    samples: 10
                }
            )]
        );
    }

    #[test]
    fn learner_keeps_rounds_per_peer_and_forgets_on_demand() {
        let mut l = Learner::<u32>::default();
        for _ in 0..7 {
            assert_eq!(l.sample(1, 5), Outcome::Pending);
            assert_eq!(l.sample(2, 6), Outcome::Pending);
        }
        l.reset(2);
        assert_eq!(
            l.sample(1, 5),
            Outcome::Learned {
                residual: 5,
                samples: 8
            }
        );
        assert_eq!(l.sample(2, 6), Outcome::Pending);
        l.retain(|id| id != 2);
        assert!(l.rounds.is_empty());
    }
}
