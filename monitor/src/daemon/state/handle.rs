//! What the other tasks hold of the state: the handle they send commands with, the view they
//! read, and the errors a command can come back with.

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
};

use tokio::sync::{mpsc, oneshot};

use crate::{
    ebpf::EbpfFailure,
    events::Learning,
    peers::{Mode, PeerError, PeerSpec, PeerTable},
    residuals::Judged,
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
pub(super) enum Command {
    Static(
        Vec<PeerSpec>,
        Mode,
        oneshot::Sender<Result<Applied, StateError>>,
    ),
    Discovered(
        Vec<PeerSpec>,
        oneshot::Sender<Result<Option<Applied>, StateError>>,
    ),
    Tunnels(Vec<Tunnel>, oneshot::Sender<Result<(), StateError>>),
    Sample(Learning),
}

/// How the other tasks talk to the state. Cheap to clone; the state task ends when every
/// handle is gone.
#[derive(Clone, Debug)]
pub struct StateHandle {
    pub(super) tx: mpsc::Sender<Command>,
}

/// Why a command to the state failed. In every case but `Gone` the previous peers (or tunnels)
/// stay in force.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The peer set was refused as it is (more peers than the maps hold, a duplicate prefix):
    /// nothing was written.
    #[error(transparent)]
    Refused(#[from] PeerError),
    /// A map update failed; the previous peers were written back.
    #[error("{0}; kept the previous peers")]
    Map(#[source] EbpfFailure),
    /// A map update failed, and writing the previous peers back failed too: the maps may hold
    /// a mix until the next change.
    #[error("{failed}; restoring the previous peers failed too: {restoring}")]
    Restore {
        /// The update that failed.
        #[source]
        failed: Box<EbpfFailure>,
        /// The restore that failed.
        restoring: Box<EbpfFailure>,
    },
    /// `TUNNELS` could not be written; the previous tunnel devices stay.
    #[error("{0}; kept the previous tunnel devices")]
    Tunnels(#[source] EbpfFailure),
    /// The state task is gone (it failed, or the daemon is stopping).
    #[error("the SA/peer state task has stopped")]
    Gone,
}

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
    ) -> Result<Applied, StateError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Static(specs, default_mode, reply))
            .await
            .map_err(|_| StateError::Gone)?;
        rx.await.map_err(|_| StateError::Gone)?
    }

    /// Replaces the discovered peers; `Ok(None)` when they did not change.
    ///
    /// # Errors
    /// As `replace_static`.
    pub async fn replace_discovered(
        &self,
        specs: Vec<PeerSpec>,
    ) -> Result<Option<Applied>, StateError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Discovered(specs, reply))
            .await
            .map_err(|_| StateError::Gone)?;
        rx.await.map_err(|_| StateError::Gone)?
    }

    /// Replaces the tunnel devices whose inner segments are verified (`crate::tunnels`); each
    /// counts under the peer that covers its remote. On error the previous ones stay.
    ///
    /// # Errors
    /// As `replace_static`.
    pub async fn replace_tunnels(&self, tunnels: Vec<Tunnel>) -> Result<(), StateError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Tunnels(tunnels, reply))
            .await
            .map_err(|_| StateError::Gone)?;
        rx.await.map_err(|_| StateError::Gone)?
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
            .map_err(|_| io::Error::other(StateError::Gone))
    }
}

/// The receiving end of a `StateHandle`, for `SaState::run`.
#[derive(Debug)]
pub struct Inbox(pub(super) mpsc::Receiver<Command>);

/// Commands waiting for the state task; a full queue makes senders wait.
pub(super) const QUEUE: usize = 1024;
