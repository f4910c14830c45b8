//! The SA/peer state: which peers are verified, in which mode, and the NAT residuals learned
//! for them.
//!
//! Owns the static peers (flags and configuration file), the peers discovered from the kernel's
//! SAs, the merged peer table, the learned residuals with their learning rounds, and the kernel
//! maps that hold all of it (`PeerMaps`). It is the only writer of those maps. Other tasks send
//! it commands through a `StateHandle`; it runs on a blocking thread, so map updates never stall
//! the async runtime. After every change it publishes a `View` that the drain (log labels) and
//! the scrape (peer labels, learning flags) read without a lock.
//!
//! | file | what |
//! |---|---|
//! | `mod.rs` | the state and its commands: peers, tunnels |
//! | `handle` | what other tasks hold: `StateHandle`, `View`, `StateError` |
//! | `peerset` | how static and discovered peers become one table that fits |
//! | `learning` | the learning ring's records: samples, and the verifier's news |

mod handle;
mod learning;
mod peerset;

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    sync::Arc,
};

pub use handle::{Applied, Inbox, StateError, StateHandle, View};
use handle::{Command, QUEUE};
use ipnet::IpNet;
use monitor_ebpf::{PeerValue, TunnelValue};
use peerset::{
    changed_beyond_mode, fit, in_mode, merge, observe_only, scoped, warn_observe_only,
    warn_over_limit, with_undiscovered,
};
use tokio::sync::{mpsc, watch};
use tracing::{error, warn};

use crate::{
    ebpf::{MapContents, PeerMaps},
    peers::{Mode, PeerSpec, PeerTable, Source},
    residuals::{Judged, Residuals},
    scope::Scope,
    tunnels::Tunnel,
};

/// The state itself; `run` it on a blocking thread.
pub struct SaState {
    maps: PeerMaps,
    table: PeerTable,
    statics: Vec<PeerSpec>,
    discovered: Vec<PeerSpec>,
    residuals: Residuals,
    scope: Scope,
    /// The mode of discovered peers (`--mode`), which a reload may change.
    default_mode: Mode,
    view: watch::Sender<Arc<View>>,
    evicted: u64,
    /// Learning segments found corrupt once their SA's residual was known, per peer id.
    learning_mismatches: BTreeMap<u32, Judged>,
    /// Static and discovered peers that ask for enforce mode but run in observe mode
    /// (`observe_only`).
    observe_only: [usize; 2],
    /// Discovered peers and catch-alls the last peer set left out (`fit`).
    over_limit: usize,
    /// The tunnel devices whose inner segments are verified, and what `TUNNELS` holds for
    /// them (ifindex, the value of the peer that covers the tunnel's remote).
    tunnels: Vec<Tunnel>,
    tunnel_values: Vec<(u32, TunnelValue)>,
    /// Listed tunnels with GRO on.
    tunnels_gro_on: usize,
    /// Verified tunnels past `MAX_TUNNELS`, left out.
    tunnels_over_limit: usize,
}

impl std::fmt::Debug for SaState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SaState")
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

impl SaState {
    /// Builds the first peer table and installs it in `maps`. `prior` is what pinned maps
    /// held when they were adopted (empty for new maps): a prefix that stays keeps its id and
    /// counts, and its residuals stay installed if its map value is unchanged; the residuals of
    /// peers that went or changed are removed.
    ///
    /// # Errors
    /// `StateError::Refused` for a peer set that cannot be installed, `StateError::Map` if the
    /// maps refuse it.
    pub fn start(
        mut maps: PeerMaps,
        scope: Scope,
        statics: Vec<PeerSpec>,
        discovered: Vec<PeerSpec>,
        prior: &MapContents,
        default_mode: Mode,
    ) -> Result<(Self, watch::Receiver<Arc<View>>), StateError> {
        let discovered = in_mode(default_mode, with_undiscovered(scope, discovered));
        let observe_only = [
            observe_only(scope, &statics),
            observe_only(scope, &discovered),
        ];
        warn_observe_only(observe_only.iter().sum());
        let statics = scoped(scope, statics);
        let discovered = scoped(scope, discovered);
        // The limit is the maps' own capacity, recorded where they were made.
        let max_peers = maps.capacity();
        let before = PeerTable::pinned(&prior.peers, max_peers);
        let (fitted, over_limit) = fit(merge(&statics, &discovered), &before);
        warn_over_limit(over_limit, max_peers);
        let table = before.reconcile(fitted)?;
        maps.set_peers(&before, &table).map_err(StateError::Map)?;
        let unchanged: BTreeSet<u32> = prior
            .peers
            .iter()
            .filter(|(net, v)| {
                table
                    .get(v.id)
                    .is_some_and(|p| p.net == *net && table.value(v.id, p) == *v)
            })
            .map(|(_, v)| v.id)
            .collect();
        let mut residuals = Residuals::default();
        for (key, _, residual) in &prior.residuals {
            if unchanged.contains(&key.peer_id) {
                let _ = residuals.installed(*key, *residual);
            }
        }
        if prior.residuals.len() > residuals.len() {
            maps.remove_sa_residuals(|k| !unchanged.contains(&k.peer_id))
                .map_err(StateError::Map)?;
        }
        let (view, rx) = watch::channel(Arc::new(View::default()));
        let state = Self {
            maps,
            table,
            statics,
            discovered,
            residuals,
            scope,
            default_mode,
            view,
            evicted: 0,
            learning_mismatches: BTreeMap::new(),
            observe_only,
            over_limit,
            tunnels: Vec::new(),
            tunnel_values: Vec::new(),
            tunnels_gro_on: 0,
            tunnels_over_limit: 0,
        };
        state.publish();
        Ok((state, rx))
    }

    /// The handle to send commands with, and the inbox `run` serves.
    #[must_use]
    pub fn channel() -> (StateHandle, Inbox) {
        let (tx, rx) = mpsc::channel(QUEUE);
        (StateHandle { tx }, Inbox(rx))
    }

    /// Serves commands until every handle is gone. Blocking: run it on its own thread.
    ///
    /// # Errors
    /// None today: a map update that fails keeps the previous peers and is reported to the
    /// sender. The signature lets the supervisor treat this like every other task.
    pub fn run(mut self, inbox: Inbox) -> io::Result<()> {
        let Inbox(mut rx) = inbox;
        while let Some(cmd) = rx.blocking_recv() {
            match cmd {
                Command::Static(specs, mode, reply) => {
                    let discovered = in_mode(mode, self.discovered.clone());
                    let out = self.apply(Some(specs), Some(discovered));
                    if out.is_ok() {
                        self.default_mode = mode;
                    }
                    let _ = reply.send(out);
                }
                Command::Discovered(specs, reply) => {
                    let specs = in_mode(self.default_mode, with_undiscovered(self.scope, specs));
                    let out = if scoped(self.scope, specs.clone()) == self.discovered {
                        Ok(None)
                    } else {
                        self.apply(None, Some(specs)).map(Some)
                    };
                    let _ = reply.send(out);
                }
                Command::Tunnels(tunnels, reply) => {
                    let _ = reply.send(self.set_tunnels(tunnels));
                }
                Command::Sample(s) => self.sample(&s),
            }
        }
        Ok(())
    }

    fn publish(&self) {
        let learning = self
            .table
            .iter()
            // The catch-alls stand for SAs that may never come: learning while one of theirs
            // is, not while they have learned nothing.
            .filter(|(id, p)| {
                self.residuals
                    .peer_learning(*id, p.learn && p.source != Source::Undiscovered)
            })
            .map(|(id, _)| id)
            .collect();
        self.view.send_replace(Arc::new(View {
            table: self.table.clone(),
            learning,
            residuals_evicted: self.evicted,
            learning_mismatches: self.learning_mismatches.clone(),
            observe_only: self.observe_only.iter().sum(),
            over_limit: self.over_limit,
            tunnels: self.tunnel_values.len(),
            tunnels_gro_on: self.tunnels_gro_on,
        }));
    }

    /// Makes `tunnels` the verified tunnel devices and writes `TUNNELS` to match.
    ///
    /// # Errors
    /// A map update that failed; the previous tunnels stay.
    pub fn set_tunnels(&mut self, tunnels: Vec<Tunnel>) -> Result<(), StateError> {
        let before = std::mem::replace(&mut self.tunnels, tunnels);
        self.write_tunnels().inspect_err(|_| self.tunnels = before)
    }

    /// Writes `TUNNELS` when what it should hold changed: each tunnel counts under the longest
    /// prefix of the peer table that holds its remote, in that peer's mode, expecting residual 0
    /// and learning nothing. A tunnel whose remote no peer covers is left out.
    fn write_tunnels(&mut self) -> Result<(), StateError> {
        let mut values: Vec<(u32, TunnelValue)> = self
            .tunnels
            .iter()
            .filter_map(|t| {
                let (id, spec) = self
                    .table
                    .iter()
                    .filter(|(_, p)| p.net.contains(&t.remote))
                    .max_by_key(|(_, p)| p.net.prefix_len())?;
                let peer = PeerValue {
                    flags: 0,
                    expected_residual: 0,
                    ..self.table.value(id, spec)
                };
                Some((
                    t.ifindex,
                    TunnelValue {
                        peer,
                        netns: t.netns,
                    },
                ))
            })
            .collect();
        let over = values
            .len()
            .saturating_sub(monitor_ebpf::MAX_TUNNELS as usize);
        if over != self.tunnels_over_limit && over > 0 {
            warn!(
                left_out = over,
                max = monitor_ebpf::MAX_TUNNELS,
                "more verified tunnel devices than TUNNELS holds: the ones past it are not verified"
            );
        }
        self.tunnels_over_limit = over;
        values.truncate(monitor_ebpf::MAX_TUNNELS as usize);
        let gro_on = self
            .tunnels
            .iter()
            .filter(|t| t.gro_on && values.iter().any(|(i, _)| *i == t.ifindex))
            .count();
        if values == self.tunnel_values && gro_on == self.tunnels_gro_on {
            return Ok(());
        }
        if values != self.tunnel_values {
            self.maps
                .set_tunnels(&values)
                .map_err(StateError::Tunnels)?;
            self.tunnel_values = values;
        }
        self.tunnels_gro_on = gro_on;
        self.publish();
        Ok(())
    }

    /// Replaces the static or the discovered peers: reconciles ids, updates the maps
    /// (restoring the old set if that fails) and restarts learning for peers that changed.
    fn apply(
        &mut self,
        statics: Option<Vec<PeerSpec>>,
        discovered: Option<Vec<PeerSpec>>,
    ) -> Result<Applied, StateError> {
        let observe_only = [
            statics
                .as_deref()
                .map_or(self.observe_only[0], |s| observe_only(self.scope, s)),
            discovered
                .as_deref()
                .map_or(self.observe_only[1], |d| observe_only(self.scope, d)),
        ];
        let statics = statics.map_or_else(|| self.statics.clone(), |s| scoped(self.scope, s));
        let discovered =
            discovered.map_or_else(|| self.discovered.clone(), |d| scoped(self.scope, d));
        let old = self.table.clone();
        let (fitted, over_limit) = fit(merge(&statics, &discovered), &old);
        let new = old.reconcile(fitted)?;
        if let Err(failed) = self.maps.set_peers(&old, &new) {
            // The maps may now be partly updated; put the old table back so they match what
            // the metrics and logs believe.
            return Err(match self.maps.set_peers(&old, &old) {
                Ok(()) => StateError::Map(failed),
                Err(restoring) => StateError::Restore {
                    failed: Box::new(failed),
                    restoring: Box::new(restoring),
                },
            });
        }
        // A peer whose prefix or NAT addresses changed (or that went) starts over: its residuals
        // were learned for what it was. One whose mode alone changed keeps them.
        let changed: Vec<u32> = old
            .iter()
            .filter(|(id, p)| new.get(*id).is_none_or(|n| changed_beyond_mode(p, n)))
            .map(|(id, _)| id)
            .collect();
        for id in changed {
            self.forget_peer(id);
        }
        let nets = |t: &PeerTable| -> std::collections::HashSet<IpNet> {
            t.iter().map(|(_, p)| p.net).collect()
        };
        let (old_nets, new_nets) = (nets(&old), nets(&new));
        let added = new_nets.difference(&old_nets).count();
        let removed = old_nets.difference(&new_nets).count();
        self.table = new;
        self.statics = statics;
        self.discovered = discovered;
        if observe_only != self.observe_only {
            warn_observe_only(observe_only.iter().sum());
        }
        self.observe_only = observe_only;
        if over_limit != self.over_limit {
            warn_over_limit(over_limit, old.limit());
        }
        self.over_limit = over_limit;
        self.publish();
        // The peers' ids and modes are what the tunnels count under.
        if let Err(e) = self.write_tunnels() {
            error!(error = %e, "could not update the tunnel devices' peers; TUNNELS keeps the previous ones");
        }
        Ok(Applied {
            added,
            removed,
            table: self.table.clone(),
        })
    }

    /// Removes every residual of peer `id` from the map and from memory, and its rounds.
    fn forget_peer(&mut self, id: u32) {
        self.learning_mismatches.remove(&id);
        let keys = self.residuals.forget_peer(id);
        if keys.is_empty() {
            return;
        }
        // Every entry of the peer goes, the verifier's own (restored, or moved by a NAT
        // rebinding) included: all of them carry its id.
        if let Err(e) = self.maps.remove_sa_residuals(|k| k.peer_id == id) {
            warn!(peer_id = id, error = %e, "could not remove learned residuals; the LRU map ages them out");
        }
    }
}
