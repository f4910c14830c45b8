//! systemd's notifications from the real binary (root only): `READY=1` once attached, then
//! `WATCHDOG=1`, then `STOPPING=1`.

use std::time::{Duration, Instant};

use natt_monitor_tests::{PinDir, daemon::Daemon, net::Cgroup, one_peer_run, skip_unless_root};

#[test]
fn systemd_hears_ready_once_attached_then_watchdog_then_stopping() {
    if skip_unless_root("systemd_hears_ready_once_attached_then_watchdog_then_stopping") {
        return;
    }
    // A notification socket like systemd's, and the environment systemd gives a Type=notify
    // service with WatchdogSec=.
    let path = std::env::temp_dir().join(format!("natt-notify-{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let socket = std::os::unix::net::UnixDatagram::bind(&path).expect("bind");
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let cg = Cgroup::new();
    let pins = PinDir::new();
    let d = Daemon::start_env(
        &one_peer_run(
            cg.path.to_str().unwrap(),
            &["--listen", "127.0.0.1:0", "--pin-path", pins.arg()],
        ),
        &[
            ("NOTIFY_SOCKET", path.as_os_str()),
            ("WATCHDOG_USEC", "200000".as_ref()),
        ],
    );
    let mut buf = [0u8; 128];
    let mut next = || {
        let n = socket.recv(&mut buf).expect("a notification within 10 s");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert_eq!(next(), "READY=1");
    // Ready means attached: the pinned link attaches the test's cgroup already.
    let link = natt_monitor::pin::Link::open(&pins.path.join("link")).expect("pinned link");
    assert!(link.info().unwrap().attached());
    drop(link);
    // Fed every 100 ms (half of WATCHDOG_USEC) while the drain makes progress.
    let t0 = Instant::now();
    for _ in 0..5 {
        assert_eq!(next(), "WATCHDOG=1");
    }
    assert!(
        t0.elapsed() >= Duration::from_millis(300),
        "{:?}",
        t0.elapsed()
    );
    d.signal(libc::SIGTERM);
    let mut last = next();
    while last == "WATCHDOG=1" {
        last = next();
    }
    assert_eq!(last, "STOPPING=1");
    let (status, lines) = d.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status}: {lines:?}");
    let _ = std::fs::remove_file(&path);
}
