//! SIGHUP end to end (root only): peers added and removed with their counts kept, and `check
//! --reload` signalling only a natt-monitor process.

use std::{fmt::Write as _, process::Command, time::Duration};

use natt_monitor_tests::{
    KillOnDrop,
    daemon::{Daemon, assert_no_verifier_loaded, field_u64, output_of, run_to_end},
    metric,
    net::{ADDR_A, Cgroup, Injector, Lab, stream},
    skip_unless_root,
};

/// The `natt-peer` helper that sends and receives the test streams.
const PEER: &str = env!("CARGO_BIN_EXE_natt-peer");

#[test]
#[expect(clippy::too_many_lines, reason = "one scenario, asserted end to end")]
fn sighup_adds_and_removes_peers_and_keeps_counts() {
    if skip_unless_root("sighup_adds_and_removes_peers_and_keeps_counts") {
        return;
    }
    let lab = Lab::new(1500);
    let cg = Cgroup::new();
    let dir = std::env::temp_dir().join(format!("natt-daemon-hup-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("natt-monitor.toml");
    let write = |peers: &[&str]| {
        // Emulated NAT-T carries no sec_path: address scope (see above).
        let mut t = format!(
            "listen = \"127.0.0.1:0\"\ncgroup = \"{}\"\nmode = \"enforce\"\nscope = \"address\"\n",
            cg.path.display()
        );
        for p in peers {
            let _ = writeln!(t, "[[peer]]\ncidr = \"{p}\"");
        }
        std::fs::write(&cfg, t).unwrap();
    };
    write(&["198.51.100.9", ADDR_A]);
    let mut d = Daemon::attached(&["run", "--config", cfg.to_str().unwrap()]);
    let inj = Injector::attach(&lab.b, lab.dev_b, 50);
    let s = stream(PEER, &lab, &cg.path, 2 << 20, false);
    assert_eq!(s.differing, 0);
    let a = "peer=\"192.0.2.1/32\",proto=\"tcp\"";
    let (_, before) = d.get("/metrics");
    let verified = metric(
        &before,
        &format!("natt_monitor_verified_packets_total{{{a}}}"),
    )
    .unwrap();
    let mismatches = metric(
        &before,
        &format!("natt_monitor_checksum_mismatches_total{{{a}}}"),
    )
    .unwrap();
    assert_eq!(mismatches, inj.stats().corrupted);
    assert!(verified > 0);
    assert!(before.contains("peer=\"198.51.100.9/32\""));

    // Remove 198.51.100.9, keep A, add a prefix; reload as the unit does: `check --config
    // FILE --reload PID` validates, then signals.
    write(&[ADDR_A, "203.0.113.0/24"]);
    let (pid, file) = (d.pid().to_string(), cfg.to_str().unwrap().to_owned());
    let check_reload = ["check", "--config", &file, "--reload", &pid];
    let (code, out) = output_of(&check_reload);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.ends_with(&format!(
            "sent SIGHUP to {pid}: it re-reads the configuration\n"
        )),
        "{out}"
    );
    d.wait_for("reloaded peers on SIGHUP");
    let (_, after) = d.get("/metrics");
    assert_eq!(
        metric(
            &after,
            &format!("natt_monitor_verified_packets_total{{{a}}}")
        ),
        Some(verified),
        "counts kept"
    );
    assert_eq!(
        metric(
            &after,
            &format!("natt_monitor_checksum_mismatches_total{{{a}}}")
        ),
        Some(mismatches)
    );
    assert!(
        !after.contains("198.51.100.9"),
        "removed peer's series are gone:\n{after}"
    );
    assert_eq!(
        metric(
            &after,
            "natt_monitor_verified_packets_total{peer=\"203.0.113.0/24\",proto=\"tcp\"}"
        ),
        Some(0)
    );
    assert_eq!(
        metric(&after, "natt_monitor_peers{source=\"static\"}"),
        Some(2)
    );
    let reload = &d.messages("reloaded peers on SIGHUP")[0];
    assert_eq!(
        (
            field_u64(reload, "added"),
            field_u64(reload, "removed"),
            field_u64(reload, "peers")
        ),
        (1, 1, 2)
    );

    // A setting only a restart applies is refused, naming its key; nothing changes.
    let good = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, format!("max_peers = 9\n{good}")).unwrap();
    d.signal(libc::SIGHUP);
    d.wait_for("reload refused: `max_peers` changed, and only a restart applies it; keeping the current configuration (restart the daemon, or put `max_peers` back)");
    let (_, refused) = d.get("/metrics");
    assert_eq!(
        metric(&refused, "natt_monitor_config_last_reload_successful"),
        Some(0)
    );
    assert_eq!(
        metric(&refused, "natt_monitor_peers{source=\"static\"}"),
        Some(2)
    );

    // A broken file: `check --reload` names the key, exits 78 and signals nothing (the
    // daemon logs no reload attempt); a bare SIGHUP keeps the current peers and the daemon
    // running.
    std::fs::write(&cfg, "[[peer]]\ncidr = \"not-an-address\"\n").unwrap();
    let attempts = |d: &Daemon| {
        d.messages("reload failed; keeping the current peers").len()
            + d.messages("reloaded peers on SIGHUP").len()
    };
    let before_check = attempts(&d);
    let (code, err) = run_to_end(&check_reload);
    assert_eq!(code, 78, "{err}");
    assert!(
        err.contains("`not-an-address` is not an IP address or CIDR prefix"),
        "{err}"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        attempts(&d),
        before_check,
        "an invalid file signalled the daemon"
    );
    d.signal(libc::SIGHUP);
    d.wait_for("reload failed; keeping the current peers");
    assert_eq!(d.get("/healthz").0, 200);
    let (_, still) = d.get("/metrics");
    assert_eq!(
        metric(&still, "natt_monitor_peers{source=\"static\"}"),
        Some(2)
    );

    let (status, _) = d.stop(libc::SIGTERM);
    assert!(status.success());
    drop(inj);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_no_verifier_loaded();
}

#[test]
fn check_reload_signals_only_a_natt_monitor_process() {
    let dir = std::env::temp_dir().join(format!("natt-reload-pid-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("natt-monitor.toml");
    std::fs::write(&cfg, "[[peer]]\ncidr = \"192.0.2.1\"\n").unwrap();
    let file = cfg.to_str().unwrap();
    let reload = |pid: &str| run_to_end(&["check", "--config", file, "--reload", pid]);

    // systemd's $MAINPID is 0 when the unit is not running.
    assert_eq!(
        reload("0"),
        (
            1,
            "natt-monitor: error: --reload 0: not a daemon's process id (systemd passes $MAINPID, which is 0 when the unit is not running)\n".to_owned()
        )
    );
    // Another program: SIGHUP would end it, so it is left alone.
    let mut other = KillOnDrop(Command::new("sleep").arg("60").spawn().unwrap());
    let pid = other.id().to_string();
    assert_eq!(
        reload(&pid),
        (
            1,
            format!(
                "natt-monitor: error: --reload {pid}: process {pid} is `sleep`, not natt-monitor; nothing was signalled\n"
            )
        )
    );
    assert!(other.try_wait().unwrap().is_none(), "sleep was signalled");
    other.kill().unwrap();
    other.wait().unwrap();
    let (code, err) = reload(&pid);
    assert_eq!(code, 1);
    assert!(
        err.starts_with(&format!(
            "natt-monitor: error: --reload {pid}: no such process ("
        )),
        "{err}"
    );
    // --reload needs --config.
    let (code, err) = run_to_end(&["check", "--reload", "1"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--config <FILE>"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
