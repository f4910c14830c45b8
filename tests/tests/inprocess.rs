//! The daemon's library entry point, `daemon::run`, driven in process (root only): a clean
//! shutdown that detaches an unpinned verifier, and an internal task that dies under a pinned
//! one, which stays. Faults come through the test's own handles, never through a hook in the
//! daemon: here the test shuts down the listening socket it handed to `run`, so the HTTP task's
//! accept fails as it would if the socket broke.

use std::{net::TcpListener, os::fd::AsRawFd as _, thread::JoinHandle, time::Duration};

use clap::Parser as _;
use natt_monitor::{
    cli::{Cli, Command},
    config,
    daemon::{self, DaemonError, RunConfig},
};
use natt_monitor_tests::{
    PinDir, eventually, http_get, net::Cgroup, one_peer_run, skip_unless_root,
};

/// Starts `run` on its own thread and runtime with `args` (as after `natt-monitor`) and a
/// listener the test keeps a handle on; returns the thread, the listener's twin and the base
/// URL.
fn start(
    args: &[&str],
    shutdown: tokio::sync::oneshot::Receiver<()>,
) -> (JoinHandle<Result<(), DaemonError>>, TcpListener, String) {
    let cli = Cli::try_parse_from(std::iter::once("natt-monitor").chain(args.iter().copied()))
        .expect("arguments");
    let Command::Run(run_args) = cli.command else {
        panic!("not a run command");
    };
    let settings = config::resolve(&run_args).expect("settings");
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let twin = listener.try_clone().expect("dup listener");
    let url = format!("http://{}", listener.local_addr().unwrap());
    let config = RunConfig {
        settings,
        reload: None,
        listener: Some(listener),
    };
    let thread = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(daemon::run(config, async {
                let _ = shutdown.await;
            }))
    });
    (thread, twin, url)
}

/// `run` with one static peer, no discovery, attached to `cg`, pinned in `pin_path` (`none`:
/// not pinned).
fn start_one_peer(
    cg: &Cgroup,
    pin_path: &str,
    shutdown: tokio::sync::oneshot::Receiver<()>,
) -> (JoinHandle<Result<(), DaemonError>>, TcpListener, String) {
    start(
        &one_peer_run(cg.path.to_str().unwrap(), &["--pin-path", pin_path]),
        shutdown,
    )
}

/// Waits until `/healthz` answers 200 (the program is attached and the drain runs).
fn wait_healthy(url: &str) {
    let body = eventually(
        &format!("{url}/healthz to answer 200"),
        Duration::from_millis(20),
        Duration::from_secs(20),
        || match http_get(&format!("{url}/healthz")) {
            Ok((200, body)) => Some(body),
            _ => None,
        },
    );
    assert_eq!(body, "ok\n");
}

fn join_within(t: JoinHandle<Result<(), DaemonError>>, limit: Duration) -> Result<(), DaemonError> {
    eventually(
        "daemon::run to return",
        Duration::from_millis(20),
        limit,
        || t.is_finished().then_some(()),
    );
    t.join().expect("daemon thread panicked")
}

fn verifier_loaded() -> bool {
    !natt_monitor_tests::test_verifiers_loaded().is_empty()
}

#[test]
fn shutdown_returns_ok_and_detaches_when_not_pinned() {
    if skip_unless_root("shutdown_returns_ok_and_detaches_when_not_pinned") {
        return;
    }
    let cg = Cgroup::new();
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let (thread, _twin, url) = start_one_peer(&cg, "none", stopped);
    wait_healthy(&url);
    let (status, body) = http_get(&format!("{url}/metrics")).unwrap();
    assert_eq!(status, 200);
    for line in [
        "natt_monitor_up 1",
        "natt_monitor_peers{source=\"static\"} 1",
        "natt_monitor_peers{source=\"xfrm\"} 0",
        "natt_monitor_verified_packets_total{peer=\"192.0.2.1/32\",proto=\"tcp\"} 0",
    ] {
        assert!(body.lines().any(|l| l == line), "missing {line:?}:\n{body}");
    }
    assert!(verifier_loaded(), "attached while running");
    stop.send(()).unwrap();
    join_within(thread, Duration::from_secs(10)).expect("clean shutdown");
    assert!(
        !verifier_loaded(),
        "natt_verify still loaded after run returned"
    );
}

#[test]
fn a_dead_internal_task_takes_the_daemon_down() {
    if skip_unless_root("a_dead_internal_task_takes_the_daemon_down") {
        return;
    }
    let cg = Cgroup::new();
    let pins = PinDir::new();
    let (_stop, stopped) = tokio::sync::oneshot::channel();
    let (thread, twin, url) = start_one_peer(&cg, pins.arg(), stopped);
    wait_healthy(&url);
    // SAFETY: shutdown(2) on a descriptor this test owns; the daemon's copy shares the socket.
    let rc = unsafe { libc::shutdown(twin.as_raw_fd(), libc::SHUT_RDWR) };
    assert_eq!(rc, 0, "shutdown: {}", std::io::Error::last_os_error());
    let err = join_within(thread, Duration::from_secs(10))
        .expect_err("a dead task must end run with an error");
    assert_eq!(
        err.to_string(),
        "internal task `http` stopped: Invalid argument (os error 22); exiting so the failure is visible"
    );
    assert!(matches!(err, DaemonError::TaskDied { task: "http", .. }));
    // Pinned, the verifier outlives the failed daemon: the cgroup stays protected until the
    // next one adopts it. Dropping the pin directory detaches it.
    assert!(
        verifier_loaded(),
        "the pinned verifier stays after a failure"
    );
    drop(pins);
    assert!(
        !verifier_loaded(),
        "natt_verify still loaded after its pins were removed"
    );
}
