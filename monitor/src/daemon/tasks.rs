//! The supervised task set (any task ending is a failure of the daemon) and the registration of
//! the descriptors the tasks wait on with the runtime.

use std::{collections::HashMap, future::Future, io, time::Duration};

use aya::maps::{MapData, RingBuf};
use tokio::{io::unix::AsyncFd, sync::watch, task::JoinSet};

use super::{discovery, error::DaemonError};

/// The shutdown signal every task gets (mini-redis's `Shutdown`): a task that has something to
/// finish (a ring to drain) waits on `recv` itself; the others are ended at their next await.
#[derive(Clone, Debug)]
pub struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    /// Whether shutdown was asked for, for a task on a thread of its own to look at.
    #[must_use]
    pub fn requested(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once shutdown was asked for (at once if it was already).
    pub async fn recv(&mut self) {
        // An error means the sender is gone: the daemon is going anyway.
        let _ = self.0.wait_for(|stop| *stop).await;
    }
}

/// The supervised tasks: any one ending while the daemon runs is a failure of the daemon.
pub(super) struct Tasks {
    set: JoinSet<(&'static str, io::Result<()>)>,
    names: HashMap<tokio::task::Id, &'static str>,
    stop: watch::Sender<bool>,
}

impl Tasks {
    pub(super) fn new() -> Self {
        Self {
            set: JoinSet::new(),
            names: HashMap::new(),
            stop: watch::Sender::new(false),
        }
    }

    /// A task with nothing to finish: at shutdown it ends, cleanly, at its next await.
    pub(super) fn spawn(
        &mut self,
        name: &'static str,
        task: impl Future<Output = io::Result<()>> + Send + 'static,
    ) {
        let mut stop = Shutdown(self.stop.subscribe());
        self.insert(name, async move {
            tokio::select! {
                r = task => r,
                () = stop.recv() => Ok(()),
            }
        });
    }

    /// A task that handles shutdown itself (`make` gets the signal), to finish its work first.
    pub(super) fn spawn_draining<F>(&mut self, name: &'static str, make: impl FnOnce(Shutdown) -> F)
    where
        F: Future<Output = io::Result<()>> + Send + 'static,
    {
        let task = make(Shutdown(self.stop.subscribe()));
        self.insert(name, task);
    }

    /// Adds `task` to the set under `name`, as it is.
    fn insert(
        &mut self,
        name: &'static str,
        task: impl Future<Output = io::Result<()>> + Send + 'static,
    ) {
        let h = self.set.spawn(async move { (name, task.await) });
        self.names.insert(h.id(), name);
    }

    /// A blocking task; it must end by itself once the others are gone (the state task ends
    /// when the last `StateHandle` is dropped with them).
    pub(super) fn spawn_blocking(
        &mut self,
        name: &'static str,
        task: impl FnOnce() -> io::Result<()> + Send + 'static,
    ) {
        let h = self.set.spawn_blocking(move || (name, task()));
        self.names.insert(h.id(), name);
    }

    /// A blocking task that handles shutdown itself: `task` looks at the signal it is given
    /// (`Shutdown::requested`) often enough to stop within the limit `stop` gives.
    pub(super) fn spawn_blocking_draining(
        &mut self,
        name: &'static str,
        task: impl FnOnce(&Shutdown) -> io::Result<()> + Send + 'static,
    ) {
        let stop = Shutdown(self.stop.subscribe());
        let h = self.set.spawn_blocking(move || (name, task(&stop)));
        self.names.insert(h.id(), name);
    }

    /// Waits for the next task to end and says which and how.
    async fn next_end(&mut self) -> (&'static str, String, bool) {
        match self.set.join_next_with_id().await {
            Some(Ok((id, (name, Ok(()))))) => {
                self.names.remove(&id);
                (name, "returned".into(), true)
            }
            Some(Ok((id, (name, Err(e))))) => {
                self.names.remove(&id);
                (name, e.to_string(), false)
            }
            Some(Err(e)) => (
                self.names.remove(&e.id()).unwrap_or("unknown"),
                e.to_string(),
                false,
            ),
            None => std::future::pending().await,
        }
    }

    /// Aborts what is left and waits for it to go. The shutdown signal goes first: a blocking
    /// task cannot be aborted, and one that handles the signal (`capture`) would otherwise be
    /// waited for forever.
    pub(super) async fn abort(&mut self) {
        self.stop.send_replace(true);
        self.set.shutdown().await;
    }

    /// The first task that ends, as an error.
    pub(super) async fn first_death(&mut self) -> DaemonError {
        let (task, reason, _) = self.next_end().await;
        DaemonError::TaskDied { task, reason }
    }

    /// Signals shutdown to every task and waits up to `limit` for all of them to end cleanly
    /// (the drains after emptying their rings); one failing, or not ending in time, is an
    /// error naming it.
    pub(super) async fn stop(&mut self, limit: Duration) -> Result<(), DaemonError> {
        self.stop.send_replace(true);
        let deadline = tokio::time::Instant::now() + limit;
        while !self.set.is_empty() {
            match tokio::time::timeout_at(deadline, self.next_end()).await {
                Ok((_, _, true)) => {}
                Ok((task, reason, false)) => return Err(DaemonError::TaskDied { task, reason }),
                Err(_) => {
                    let mut left: Vec<&str> = self.names.values().copied().collect();
                    left.sort_unstable();
                    return Err(DaemonError::TaskDied {
                        task: left.first().copied().unwrap_or("unknown"),
                        reason: format!(
                            "did not stop within {limit:?} of the shutdown signal (still running: {})",
                            left.join(", ")
                        ),
                    });
                }
            }
        }
        Ok(())
    }
}

/// Types that own their descriptor and keep it open, unchanged, for as long as they exist: the
/// only ones `watch_fd` registers.
pub(super) trait OwnsFd: std::os::fd::AsRawFd {}
impl OwnsFd for RingBuf<MapData> {}
impl OwnsFd for aya_log::EbpfLogger<&'static dyn log::Log> {}
impl OwnsFd for crate::xfrm::Watch {}
impl OwnsFd for crate::tunnels::LinkWatch {}

/// Registers a ring buffer, the aya-log reader or the XFRM socket with the runtime.
pub(super) fn watch_fd<T: OwnsFd>(what: &'static str, inner: T) -> Result<AsyncFd<T>, DaemonError> {
    // SAFETY: `T: OwnsFd` owns its descriptor and keeps it open, unchanged, for as long as it
    // exists; the AsyncFd owns the `T`, so the registration never outlives the fd.
    unsafe { AsyncFd::register(inner) }.map_err(|e| DaemonError::EventFd {
        what,
        source: e.into_parts().1,
    })
}

/// Registers discovery's XFRM and link notification sockets with the runtime.
pub(super) fn watch_discovery(
    (xfrm, links): discovery::Watches,
) -> Result<
    (
        AsyncFd<crate::xfrm::Watch>,
        AsyncFd<crate::tunnels::LinkWatch>,
    ),
    DaemonError,
> {
    Ok((
        watch_fd("XFRM notification", xfrm)?,
        watch_fd("link notification", links)?,
    ))
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    };

    use super::*;

    /// At shutdown a draining task finishes its work, a plain one ends at its next await, and
    /// a blocking one ends when what feeds it goes: `stop` returns once all have, cleanly.
    #[tokio::test]
    async fn stop_ends_every_task_cleanly_and_drains_first() {
        let mut tasks = Tasks::new();
        let drained = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&drained);
        tasks.spawn_draining("drain", |mut stop| async move {
            stop.recv().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            flag.store(true, Ordering::SeqCst);
            Ok(())
        });
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        tasks.spawn_blocking("blocking", move || {
            while rx.recv().is_ok() {}
            Ok(())
        });
        let thread_done = Arc::new(AtomicBool::new(false));
        let done = Arc::clone(&thread_done);
        tasks.spawn_blocking_draining("thread", move |stop| {
            while !stop.requested() {
                std::thread::sleep(Duration::from_millis(10));
            }
            done.store(true, Ordering::SeqCst);
            Ok(())
        });
        tasks.spawn("plain", async move {
            // Holds the blocking task's feed, as the tasks hold the state's handles.
            let _tx = tx;
            std::future::pending().await
        });
        tasks.stop(Duration::from_secs(5)).await.unwrap();
        assert!(drained.load(Ordering::SeqCst));
        assert!(thread_done.load(Ordering::SeqCst));
        assert!(tasks.set.is_empty());
    }

    /// A task that ignores the signal past the limit is named, with what else still runs.
    #[tokio::test]
    async fn a_task_that_does_not_stop_is_named() {
        let mut tasks = Tasks::new();
        tasks.spawn_draining("stuck", |_stop| std::future::pending());
        tasks.spawn("plain", std::future::pending());
        let e = tasks.stop(Duration::from_millis(100)).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            "internal task `stuck` stopped: did not stop within 100ms of the shutdown signal (still running: stuck); exiting so the failure is visible"
        );
        tasks.abort().await;
    }

    /// After a failure, `abort` ends a blocking task that handles the signal itself (it
    /// cannot be aborted): `run` returns instead of waiting for it forever. (A runtime of its
    /// own, so that a thread left running fails the test instead of hanging it.)
    #[test]
    fn abort_ends_a_blocking_task_that_waits_for_the_signal() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let (died, aborted) = rt.block_on(async {
            let mut tasks = Tasks::new();
            tasks.spawn_blocking_draining("capture", |stop| {
                while !stop.requested() {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Ok(())
            });
            tasks.spawn("http", async {
                Err(io::Error::other("listener shut down"))
            });
            let died = tasks.first_death().await.to_string();
            let aborted = tokio::time::timeout(Duration::from_secs(5), tasks.abort())
                .await
                .is_ok();
            (died, aborted)
        });
        rt.shutdown_timeout(Duration::from_secs(1));
        assert_eq!(
            died,
            "internal task `http` stopped: listener shut down; exiting so the failure is visible"
        );
        assert!(aborted, "abort waited for the blocking task past 5 s");
    }

    /// A task failing while the others stop is the error, not a clean stop.
    #[tokio::test]
    async fn a_task_failing_at_shutdown_is_the_error() {
        let mut tasks = Tasks::new();
        tasks.spawn_draining("capture", |mut stop| async move {
            stop.recv().await;
            Err(io::Error::other("disk full"))
        });
        let e = tasks.stop(Duration::from_secs(5)).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            "internal task `capture` stopped: disk full; exiting so the failure is visible"
        );
    }
}
