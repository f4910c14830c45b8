//! The SA/peer state: which peers are verified, in which mode, and the NAT residuals learned
//! for them.
//!
//! Owns the static peers (flags and configuration file), the peers discovered from the kernel's
//! SAs, the merged peer table, the learned residuals with their learning rounds, and the kernel
//! maps that hold all of it (`PeerMaps`). It is the only writer of those maps. Other tasks send
//! it commands through a `StateHandle`; it runs on a blocking thread, so map updates never stall
//! the async runtime. After every change it publishes a `View` that the drain (log labels) and
//! the scrape (peer labels, learning flags) read without a lock.

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    sync::Arc,
};

use ipnet::IpNet;
use monitor_ebpf::{PROTO_COUNT, PeerValue, Proto, TunnelValue};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{error, info, warn};

use crate::{
    daemon::DaemonError,
    ebpf::{MapContents, PeerMaps},
    events::{Learning, LearningKind},
    learn::{Outcome, WINDOW},
    peers::{Mode, PeerSpec, PeerTable, Source},
    residuals::{Judged, Residuals},
    scope::Scope,
    tunnels::Tunnel,
};

/// What the drain and the scrape see of the state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct View {
    /// The peers in the maps.
    pub table: PeerTable,
    /// Ids of the peers some of whose segments are not verified yet (learning).
    pub learning: BTreeSet<u32>,
    /// SA residuals the verifier had forgotten (its LRU map) and that are learned again, since
    /// the daemon started.
    pub residuals_evicted: u64,
    /// Per peer id: segments passed unverified while their SA learned, found corrupt once its
    /// residual was known (by protocol), since the daemon started.
    pub learning_mismatches: BTreeMap<u32, Judged>,
    /// Peers that ask for enforce mode but run in observe mode: address scope learns their
    /// residual, and a learned residual is a guess there.
    pub observe_only: usize,
    /// Discovered peers and catch-alls left out of the maps by `--max-peers`.
    pub over_limit: usize,
    /// Tunnel devices whose inner segments the verifier takes in scope (`TUNNELS`).
    pub tunnels: usize,
    /// Of those, the ones with GRO on, whose merged inner segments cannot be verified.
    pub tunnels_gro_on: usize,
}

impl View {
    /// The label of peer `id`, or `#id` for one that is gone.
    #[must_use]
    pub fn label(&self, id: u32) -> String {
        self.table
            .get(id)
            .map_or_else(|| format!("#{id}"), PeerSpec::label)
    }
}

/// The outcome of replacing a peer list.
#[derive(Clone, Debug)]
pub struct Applied {
    /// Peers that were not there before.
    pub added: usize,
    /// Peers that went.
    pub removed: usize,
    /// The peers now in the maps.
    pub table: PeerTable,
}

#[derive(Debug)]
enum Command {
    Static(
        Vec<PeerSpec>,
        Mode,
        oneshot::Sender<Result<Applied, String>>,
    ),
    Discovered(
        Vec<PeerSpec>,
        oneshot::Sender<Result<Option<Applied>, String>>,
    ),
    Tunnels(Vec<Tunnel>, oneshot::Sender<Result<(), String>>),
    Sample(Learning),
}

/// How the other tasks talk to the state. Cheap to clone; the state task ends when every
/// handle is gone.
#[derive(Clone, Debug)]
pub struct StateHandle {
    tx: mpsc::Sender<Command>,
}

/// The state task is gone (it failed, or the daemon is stopping).
const GONE: &str = "the SA/peer state task has stopped";

impl StateHandle {
    /// Replaces the static peers and the mode of discovered ones (on SIGHUP). On error the
    /// previous peers stay.
    ///
    /// # Errors
    /// Why the new list was refused or could not be installed.
    pub async fn replace_static(
        &self,
        specs: Vec<PeerSpec>,
        default_mode: Mode,
    ) -> Result<Applied, String> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Static(specs, default_mode, reply))
            .await
            .map_err(|_| GONE.to_owned())?;
        rx.await.map_err(|_| GONE.to_owned())?
    }

    /// Replaces the discovered peers; `Ok(None)` when they did not change.
    ///
    /// # Errors
    /// As `replace_static`.
    pub async fn replace_discovered(
        &self,
        specs: Vec<PeerSpec>,
    ) -> Result<Option<Applied>, String> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Discovered(specs, reply))
            .await
            .map_err(|_| GONE.to_owned())?;
        rx.await.map_err(|_| GONE.to_owned())?
    }

    /// Replaces the tunnel devices whose inner segments are verified (`crate::tunnels`); each
    /// counts under the peer that covers its remote. On error the previous ones stay.
    ///
    /// # Errors
    /// As `replace_static`.
    pub async fn replace_tunnels(&self, tunnels: Vec<Tunnel>) -> Result<(), String> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Tunnels(tunnels, reply))
            .await
            .map_err(|_| GONE.to_owned())?;
        rx.await.map_err(|_| GONE.to_owned())?
    }

    /// Hands over one record of the learning ring. Waits while the state is busy (the drain slows down
    /// rather than losing samples).
    ///
    /// # Errors
    /// When the state task is gone.
    pub async fn sample(&self, s: Learning) -> io::Result<()> {
        self.tx
            .send(Command::Sample(s))
            .await
            .map_err(|_| io::Error::other(GONE))
    }
}

/// The receiving end of a `StateHandle`, for `SaState::run`.
#[derive(Debug)]
pub struct Inbox(mpsc::Receiver<Command>);

/// Commands waiting for the state task; a full queue makes senders wait.
const QUEUE: usize = 1024;

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

/// The peers to verify: every static peer, then each discovered peer whose address no static
/// prefix already covers (an operator's explicit entry wins over discovery).
fn merge(statics: &[PeerSpec], discovered: &[PeerSpec]) -> Vec<PeerSpec> {
    let mut out = statics.to_vec();
    out.extend(
        discovered
            .iter()
            .filter(|d| {
                if d.source == Source::Undiscovered {
                    // A static catch-all of the same family takes its place.
                    !statics.iter().any(|s| s.net == d.net)
                } else {
                    !statics.iter().any(|s| s.net.contains(&d.net.addr()))
                }
            })
            .cloned(),
    );
    out
}

/// The peers that fit in `table`'s limit: every static one, then SA scope's catch-alls, then
/// the discovered ones, those already in `table` first (they keep their ids and counts) and
/// the rest in the order discovery gave them; and how many were left out. Static peers past
/// the limit stay in, for `PeerTable::reconcile` to refuse: the configuration asked for them,
/// and `config::resolve` already refuses such a configuration by name.
fn fit(mut peers: Vec<PeerSpec>, table: &PeerTable) -> (Vec<PeerSpec>, usize) {
    let limit = table.limit() as usize;
    if peers.len() <= limit {
        return (peers, 0);
    }
    let known: std::collections::HashSet<IpNet> = table.iter().map(|(_, p)| p.net).collect();
    peers.sort_by_key(|p| match p.source {
        Source::Static => 0,
        Source::Undiscovered => 1,
        Source::Xfrm if known.contains(&p.net) => 2,
        Source::Xfrm => 3,
    });
    let statics = peers.iter().filter(|p| p.source == Source::Static).count();
    let keep = limit.max(statics);
    let over = peers.len() - keep;
    peers.truncate(keep);
    (peers, over)
}

/// Says that `n` peers did not fit in `limit` (nothing when `n` is 0).
fn warn_over_limit(n: usize, limit: u32) {
    if n > 0 {
        warn!(
            peers = n,
            max_peers = limit,
            "discovered peers past --max-peers have no entry of their own: under SA scope their SAs are verified by the catch-alls while those fit, under address scope they are not verified; raise --max-peers (natt_monitor_peers_over_limit counts them)"
        );
    }
}

/// Under SA scope, `discovered` and after them the two catch-alls (`Source::Undiscovered`):
/// every NAT-T transport SA whose segments no other peer names is verified too, whatever
/// network namespace it lives in and whether or not discovery runs. They take the discovered
/// peers' mode and learn each SA's residual like them.
fn with_undiscovered(scope: Scope, mut discovered: Vec<PeerSpec>) -> Vec<PeerSpec> {
    if matches!(scope, Scope::Sa(_)) {
        for net in [
            IpNet::V4(ipnet::Ipv4Net::default()),
            IpNet::V6(ipnet::Ipv6Net::default()),
        ] {
            let mut p = PeerSpec::new(net, Mode::Observe);
            p.source = Source::Undiscovered;
            discovered.push(p);
        }
    }
    discovered
}

/// Discovered peers take the default mode in force, whatever discovery was started with.
fn in_mode(mode: Mode, mut specs: Vec<PeerSpec>) -> Vec<PeerSpec> {
    for p in &mut specs {
        p.mode = mode;
    }
    specs
}

/// True when `a` and `b` differ in more than their mode: a mode change keeps the residuals,
/// which depend on addresses only.
fn changed_beyond_mode(a: &PeerSpec, b: &PeerSpec) -> bool {
    PeerSpec {
        mode: a.mode,
        ..b.clone()
    } != *a
}

/// Under SA scope every peer without configured NAT addresses learns its residual per SA, and
/// a rekey (a new discovery generation) is no reason to forget anything: the verifier hands the
/// residual on to the new SA itself. Under address scope a static peer without NAT addresses
/// has residual 0 and a discovered one learns again when its SAs change; and there a learned
/// residual is a guess (plaintext and decapsulated segments of one address pair cannot be told
/// apart), so a peer that learns is only observed, never enforced.
fn scoped(scope: Scope, mut specs: Vec<PeerSpec>) -> Vec<PeerSpec> {
    for p in &mut specs {
        match scope {
            Scope::Sa(_) => {
                p.learn = p.nat.is_none();
                p.generation = 0;
            }
            Scope::Address if p.learn => p.mode = Mode::Observe,
            Scope::Address => {}
        }
    }
    specs
}

/// Peers of `specs` that ask for enforce mode but learn their residual under address scope, and
/// so run in observe mode (`scoped`).
fn observe_only(scope: Scope, specs: &[PeerSpec]) -> usize {
    if matches!(scope, Scope::Sa(_)) {
        return 0;
    }
    specs
        .iter()
        .filter(|p| p.learn && p.mode == Mode::Enforce)
        .count()
}

/// Says that address scope keeps `n` learned peers in observe mode (nothing when `n` is 0).
fn warn_observe_only(n: usize) {
    if n > 0 {
        warn!(
            peers = n,
            "address scope: peers whose NAT residual is learned run in observe mode, whatever their mode says (a learned residual is a guess there; enforce needs an exact one: configure the peer's original addresses, or run on a kernel with BTF for SA scope); natt_monitor_peers_observe_only counts them"
        );
    }
}

impl SaState {
    /// Builds the first peer table and installs it in `maps`. `prior` is what pinned maps
    /// held when they were adopted (empty for new maps): a prefix that stays keeps its id and
    /// counts, and its residuals stay installed if its map value is unchanged; the residuals of
    /// peers that went or changed are removed.
    ///
    /// # Errors
    /// `DaemonError::Peers` for an invalid peer set, `DaemonError::Ebpf` if the maps refuse it.
    pub fn start(
        mut maps: PeerMaps,
        scope: Scope,
        statics: Vec<PeerSpec>,
        discovered: Vec<PeerSpec>,
        prior: &MapContents,
        max_peers: u32,
        default_mode: Mode,
    ) -> Result<(Self, watch::Receiver<Arc<View>>), DaemonError> {
        let discovered = in_mode(default_mode, with_undiscovered(scope, discovered));
        let observe_only = [
            observe_only(scope, &statics),
            observe_only(scope, &discovered),
        ];
        warn_observe_only(observe_only.iter().sum());
        let statics = scoped(scope, statics);
        let discovered = scoped(scope, discovered);
        let before = PeerTable::pinned(&prior.peers, max_peers);
        let (fitted, over_limit) = fit(merge(&statics, &discovered), &before);
        warn_over_limit(over_limit, max_peers);
        let table = before.reconcile(fitted)?;
        maps.set_peers(&before, &table)?;
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
            maps.remove_sa_residuals(|k| !unchanged.contains(&k.peer_id))?;
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
    pub fn set_tunnels(&mut self, tunnels: Vec<Tunnel>) -> Result<(), String> {
        let before = std::mem::replace(&mut self.tunnels, tunnels);
        self.write_tunnels().inspect_err(|_| self.tunnels = before)
    }

    /// Writes `TUNNELS` when what it should hold changed: each tunnel counts under the longest
    /// prefix of the peer table that holds its remote, in that peer's mode, expecting residual 0
    /// and learning nothing. A tunnel whose remote no peer covers is left out.
    fn write_tunnels(&mut self) -> Result<(), String> {
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
            self.maps.set_tunnels(&values).map_err(|e| e.to_string())?;
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
    ) -> Result<Applied, String> {
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
        let new = old.reconcile(fitted).map_err(|e| e.to_string())?;
        if let Err(e) = self.maps.set_peers(&old, &new) {
            // The maps may now be partly updated; put the old table back so they match what
            // the metrics and logs believe.
            if let Err(e2) = self.maps.set_peers(&old, &old) {
                return Err(format!(
                    "{e}; restoring the previous peers failed too: {e2}"
                ));
            }
            return Err(format!("{e}; kept the previous peers"));
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

    /// Takes one record of the learning ring: a sample for an SA that learns, or news from the
    /// verifier about an SA's residual.
    fn sample(&mut self, m: &Learning) {
        // Records of a peer that no longer learns (reloaded, removed) are stale.
        if !self.table.learns(m.peer_id()) {
            return;
        }
        let label = self
            .table
            .get(m.peer_id())
            .map_or_else(String::new, PeerSpec::label);
        let spi = format_args!("{:#010x}", m.spi);
        let residual = format_args!("{:#06x}", m.residual);
        match m.kind {
            LearningKind::Inherited | LearningKind::Confirmed => {
                let judged = self.residuals.installed(m.key, m.residual);
                self.judged(m, &label, m.residual, judged);
                self.publish();
                let how = if m.kind == LearningKind::Inherited {
                    "NAT residual inherited from a live SA of the same NAT mapping (a rekey); verifying this SA from its first segment"
                } else {
                    "NAT residual learned in the kernel: a segment summed to it with no NAT in the path, or TCP retransmitted a refused segment and the copy left the same value; verifying this SA from now on"
                };
                info!(
                    peer = label,
                    spi = %spi,
                    reqid = m.reqid,
                    encap_ports = %format_args!("{}/{}", m.encap_ports().0, m.encap_ports().1),
                    residual = %residual,
                    "{how}"
                );
            }
            LearningKind::Withdrawn { found } => {
                self.residuals.forgotten(m.key);
                self.publish();
                warn!(
                    peer = label,
                    spi = %spi,
                    learned = %residual,
                    found = %format_args!("{found:#06x}"),
                    segments = monitor_ebpf::WITHDRAW_AFTER,
                    "learned NAT residual withdrawn: consecutive distinct segments of the SA all left one other value and none verified in between, so it refused intact traffic; learning again"
                );
            }
            LearningKind::Sample { held, proto } => {
                self.learn(m, &label, if held { None } else { proto });
            }
        }
    }

    /// Counts the learning segments of `m`'s SA that were delivered and, judged against the
    /// residual it now has, were corrupt; says so in the log.
    fn judged(&mut self, m: &Learning, label: &str, residual: u16, judged: Judged) {
        if judged.iter().all(|n| *n == 0) {
            return;
        }
        let total = self.learning_mismatches.entry(m.peer_id()).or_default();
        for (t, n) in total.iter_mut().zip(judged) {
            *t += n;
        }
        warn!(
            peer = label,
            spi = %format_args!("{:#010x}", m.spi),
            residual = %format_args!("{residual:#06x}"),
            tcp = judged[Proto::Tcp as usize],
            udp = judged[Proto::Udp as usize],
            "segments passed unverified while this SA's NAT residual was being learned left another value: corrupted segments were delivered (natt_monitor_learning_mismatches_total)"
        );
    }

    /// Feeds one learning segment's residual to the learner (`delivered`: its protocol, if the
    /// verifier passed it); when it settles, installs the residual so the SA's next segment is
    /// verified.
    fn learn(&mut self, m: &Learning, label: &str, delivered: Option<Proto>) {
        let key = m.key;
        if self.residuals.get(&key).is_some() {
            // Held as learned, yet the verifier sent a sample: it has forgotten the residual
            // (LRU), or the entry is another SA's (one that held the same SPI on the same
            // mapping), unless this sample was in the ring when the residual was installed.
            match self.maps.sa_residual(&key) {
                Ok(Some((state, _))) if state == m.state => {
                    // In the ring while the residual was installed: judged now.
                    if let Some(proto) = delivered
                        && let Some(residual) = self.residuals.get(&key)
                        && residual != m.residual
                    {
                        let mut judged = [0; PROTO_COUNT];
                        judged[proto as usize] = 1;
                        self.judged(m, label, residual, judged);
                        self.publish();
                    }
                    return;
                }
                Ok(_) => {
                    self.residuals.forgotten(key);
                    self.evicted += 1;
                    self.publish();
                    warn!(
                        peer = label,
                        spi = %format_args!("{:#010x}", m.spi),
                        "the verifier's SA_TRUST map no longer holds this SA's residual (its LRU forgot it; raise --max-peers if this repeats); learning again"
                    );
                }
                Err(e) => {
                    error!(peer = label, error = %e, "could not read SA_TRUST");
                    return;
                }
            }
        }
        let Some(outcome) = self.residuals.sample(key, m.residual, delivered) else {
            return;
        };
        match outcome {
            Outcome::Pending => {}
            Outcome::Restarted { top } => warn!(
                peer = label,
                spi = %format_args!("{:#010x}", m.spi),
                most_common = %format_args!("{:#06x}", top.0),
                count = top.1,
                window = WINDOW,
                "NAT residual did not settle: no value carried three quarters of the segments; learning again"
            ),
            Outcome::Learned { residual, samples } => {
                match self.maps.set_sa_residual(key, m.state, residual) {
                    Ok(()) => {
                        let judged = self.residuals.installed(key, residual);
                        self.judged(m, label, residual, judged);
                        self.publish();
                        info!(
                            peer = label,
                            spi = %format_args!("{:#010x}", m.spi),
                            reqid = m.reqid,
                            encap_ports = %format_args!("{}/{}", m.encap_ports().0, m.encap_ports().1),
                            residual = %format_args!("{residual:#06x}"),
                            samples,
                            "NAT residual learned; verifying this SA from now on"
                        );
                    }
                    Err(e) => {
                        error!(peer = label, error = %e, "could not install the learned residual; still learning");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peers::parse_cidr;

    fn spec(net: &str, source: Source) -> PeerSpec {
        let mut p = PeerSpec::new(parse_cidr(net).unwrap(), Mode::Observe);
        p.source = source;
        p
    }

    #[test]
    fn static_prefixes_win_over_discovered_addresses_they_cover() {
        let statics = [spec("192.0.2.0/24", Source::Static)];
        let discovered = [
            spec("192.0.2.9", Source::Xfrm),
            spec("198.51.100.7", Source::Xfrm),
        ];
        let merged: Vec<String> = merge(&statics, &discovered)
            .iter()
            .map(PeerSpec::label)
            .collect();
        assert_eq!(merged, ["192.0.2.0/24", "198.51.100.7/32"]);
    }

    /// Past the limit, statics stay, then the catch-alls, then discovered peers the table already
    /// holds (their ids and counts), then new ones in discovery order; the rest are counted.
    #[test]
    fn peers_past_the_limit_are_left_out_in_order_and_counted() {
        let old = PeerTable::with_limit(4)
            .reconcile(vec![spec("198.51.100.9", Source::Xfrm)])
            .unwrap();
        let peers = vec![
            spec("198.51.100.7", Source::Xfrm),
            spec("198.51.100.8", Source::Xfrm),
            spec("198.51.100.9", Source::Xfrm),
            spec("192.0.2.0/24", Source::Static),
            spec("0.0.0.0/0", Source::Undiscovered),
            spec("::/0", Source::Undiscovered),
        ];
        let (kept, over) = fit(peers.clone(), &old);
        let nets: Vec<String> = kept.iter().map(|p| p.net.to_string()).collect();
        assert_eq!(
            nets,
            ["192.0.2.0/24", "0.0.0.0/0", "::/0", "198.51.100.9/32"]
        );
        assert_eq!(over, 2);
        let table = old.reconcile(kept).unwrap();
        // The peer that stayed kept its id.
        assert_eq!(
            table.get(0).map(PeerSpec::label).as_deref(),
            Some("198.51.100.9/32")
        );
        // Within the limit nothing moves.
        let (kept, over) = fit(peers[..4].to_vec(), &old);
        assert_eq!((kept.len(), over), (4, 0));
        // Statics past the limit are not cut: reconcile refuses them as a configuration error.
        let statics: Vec<PeerSpec> = (1..=5)
            .map(|i| spec(&format!("192.0.2.{i}"), Source::Static))
            .collect();
        let (kept, over) = fit(statics, &old);
        assert_eq!((kept.len(), over), (5, 0));
        assert!(matches!(
            old.reconcile(kept),
            Err(crate::peers::PeerError::TooMany { count: 5, .. })
        ));
    }

    /// Under SA scope the two catch-alls follow the discovered peers, take their mode and learn;
    /// a static peer of exactly their prefix takes one's place. Address scope has none.
    #[test]
    fn sa_scope_adds_the_undiscovered_catch_alls() {
        let sa = Scope::Sa(monitor_ebpf::SecpathLayout::default());
        let discovered = vec![spec("198.51.100.7", Source::Xfrm)];
        let specs = scoped(
            sa,
            in_mode(Mode::Enforce, with_undiscovered(sa, discovered.clone())),
        );
        let seen: Vec<(String, Source, Mode, bool)> = specs
            .iter()
            .map(|p| (p.net.to_string(), p.source, p.mode, p.learn))
            .collect();
        assert_eq!(
            seen,
            [
                ("198.51.100.7/32".into(), Source::Xfrm, Mode::Enforce, true),
                (
                    "0.0.0.0/0".into(),
                    Source::Undiscovered,
                    Mode::Enforce,
                    true
                ),
                ("::/0".into(), Source::Undiscovered, Mode::Enforce, true),
            ]
        );
        assert_eq!(specs[1].label(), "undiscovered");
        let statics = [spec("::/0", Source::Static)];
        let merged: Vec<(String, String)> = merge(&statics, &specs)
            .iter()
            .map(|p| (p.net.to_string(), p.label()))
            .collect();
        assert_eq!(
            merged,
            [
                ("::/0".into(), "::/0".into()),
                ("198.51.100.7/32".into(), "198.51.100.7/32".into()),
                ("0.0.0.0/0".into(), "undiscovered".into()),
            ]
        );
        assert_eq!(
            with_undiscovered(Scope::Address, discovered.clone()),
            discovered
        );
    }

    /// A reload's `mode` reaches discovered peers, and a change of mode alone keeps what was
    /// learned for them.
    #[test]
    fn discovered_peers_take_the_mode_in_force_and_keep_residuals_across_it() {
        let p = spec("192.0.2.9", Source::Xfrm);
        let enforced = in_mode(Mode::Enforce, vec![p.clone()]);
        assert_eq!(enforced[0].mode, Mode::Enforce);
        assert!(!changed_beyond_mode(&p, &enforced[0]));
        let mut moved = enforced[0].clone();
        moved.net = parse_cidr("192.0.2.10").unwrap();
        assert!(changed_beyond_mode(&p, &moved));
    }

    #[test]
    fn sa_scope_learns_every_peer_without_nat_addresses() {
        let mut p = spec("192.0.2.9", Source::Xfrm);
        p.generation = 42;
        let layout = monitor_ebpf::SecpathLayout {
            enabled: 1,
            ..Default::default()
        };
        let out = scoped(Scope::Sa(layout), vec![p.clone()]);
        assert!(out[0].learn);
        assert_eq!(out[0].generation, 0);
        let out = scoped(Scope::Address, vec![p]);
        assert!(!out[0].learn);
        assert_eq!(out[0].generation, 42);
    }

    /// Address scope never drops on a guess: a peer that learns its residual there is observed
    /// whatever mode it asks for; one whose residual is exact keeps enforce.
    #[test]
    fn address_scope_enforces_only_exact_residuals() {
        let mut learned = spec("192.0.2.9", Source::Xfrm);
        learned.learn = true;
        learned.mode = Mode::Enforce;
        let mut exact = spec("198.51.100.0/24", Source::Static);
        exact.mode = Mode::Enforce;
        let specs = vec![learned, exact];
        assert_eq!(observe_only(Scope::Address, &specs), 1);
        let out = scoped(Scope::Address, specs.clone());
        assert_eq!(
            out.iter().map(|p| p.mode).collect::<Vec<_>>(),
            [Mode::Observe, Mode::Enforce]
        );
        let sa = Scope::Sa(monitor_ebpf::SecpathLayout {
            enabled: 1,
            ..Default::default()
        });
        assert_eq!(observe_only(sa, &specs), 0);
        assert!(scoped(sa, specs).iter().all(|p| p.mode == Mode::Enforce));
    }
}
