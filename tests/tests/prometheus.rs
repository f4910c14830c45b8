//! A real Prometheus server (Debian package) on loopback scrapes natt-monitor while the
//! namespace injector corrupts traffic; the mismatch series and the shipped alert rule are
//! checked through Prometheus's HTTP API. Root only.

use std::{
    net::TcpListener,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use natt_monitor_tests::{
    KillOnDrop, PinDir,
    daemon::Daemon,
    eventually, http_get,
    net::{ADDR_A, Cgroup, Injector, Lab, stream},
    skip_unless_root,
};
use serde_json::Value;

/// The `natt-peer` helper that sends and receives the test streams.
const PEER: &str = env!("CARGO_BIN_EXE_natt-peer");

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn get_json(url: &str) -> Option<Value> {
    let (code, body) = http_get(url).ok()?;
    (code == 200)
        .then(|| serde_json::from_str(&body).ok())
        .flatten()
}

/// How often the test asks Prometheus.
const POLL: Duration = Duration::from_millis(250);

#[test]
#[expect(clippy::too_many_lines, reason = "one scenario, asserted end to end")]
fn prometheus_sees_the_mismatches_and_fires_the_alert() {
    if skip_unless_root("prometheus_sees_the_mismatches_and_fires_the_alert") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("natt-prom-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let lab = Lab::new(1500);
    let cg = Cgroup::new();

    let monitor_port = free_port();
    // Its own pin directory, detached after the daemon is killed (declared first, dropped last).
    let pins = PinDir::new();
    let listen = format!("127.0.0.1:{monitor_port}");
    let mut monitor = Daemon::start(&[
        "run",
        "--peer",
        ADDR_A,
        "--mode",
        "observe",
        // Emulated NAT-T has no sec_path on this kernel: the address-scope fallback.
        "--scope",
        "address",
        "--cgroup",
        cg.path.to_str().unwrap(),
        "--listen",
        &listen,
        "--pin-path",
        pins.arg(),
    ]);
    monitor.wait_healthy();

    let rules = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/alerts/natt-monitor.rules.yml"
    ))
    .canonicalize()
    .unwrap();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: natt-monitor\n    static_configs:\n      - targets: ['127.0.0.1:{monitor_port}']\n",
            rules.display()
        ),
    )
    .unwrap();
    let prom_port = free_port();
    let prom = format!("http://127.0.0.1:{prom_port}");
    let _prometheus = KillOnDrop(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus (scripts/setup.sh --test installs it)"),
    );
    eventually(
        "Prometheus to scrape natt_monitor_up 1",
        POLL,
        Duration::from_secs(60),
        || {
            let v = get_json(&format!("{prom}/api/v1/query?query=natt_monitor_up"))?;
            (v["data"]["result"][0]["value"][1] == "1").then_some(())
        },
    );

    let inj = Injector::attach(&lab.b, lab.dev_b, 50);
    let s = stream(PEER, &lab, &cg.path, 2 << 20, false);
    let injected = inj.stats().corrupted;
    assert!(injected > 0);
    // Observe mode: the corruption reaches the application, one byte per corrupted segment,
    // but for a corrupted retransmission of data the receiver already has, which TCP discards
    // (veth reorders now and then under load; at most a couple per run, as in netns.rs).
    assert_eq!(s.received, 2 << 20);
    assert!(
        s.differing <= injected && s.differing + 2 >= injected,
        "{} bytes differ for {injected} corrupted segments",
        s.differing
    );

    let query = format!(
        "{prom}/api/v1/query?query=natt_monitor_checksum_mismatches_total%7Bproto%3D%22tcp%22%7D"
    );
    let seen = eventually(
        "the mismatch count in Prometheus",
        POLL,
        Duration::from_secs(30),
        || {
            let v = get_json(&query)?;
            let r = &v["data"]["result"][0];
            let n: u64 = r["value"][1].as_str()?.parse().ok()?;
            (n == injected).then(|| r["metric"].clone())
        },
    );
    assert_eq!(seen["peer"], "192.0.2.1/32");
    assert_eq!(seen["job"], "natt-monitor");

    let alert = eventually(
        "NattMonitorChecksumMismatch to fire",
        POLL,
        Duration::from_secs(90),
        || {
            let v = get_json(&format!("{prom}/api/v1/alerts"))?;
            v["data"]["alerts"]
                .as_array()?
                .iter()
                .find(|a| {
                    a["labels"]["alertname"] == "NattMonitorChecksumMismatch"
                        && a["state"] == "firing"
                })
                .cloned()
        },
    );
    eprintln!("firing alert: {alert}");
    assert_eq!(alert["labels"]["peer"], "192.0.2.1/32");
    assert_eq!(alert["labels"]["proto"], "tcp");
    assert_eq!(alert["labels"]["severity"], "critical");
    assert_eq!(
        alert["labels"]["instance"],
        format!("127.0.0.1:{monitor_port}")
    );
    assert!(
        alert["annotations"]["runbook_url"]
            .as_str()
            .unwrap()
            .ends_with("docs/runbook.md#nattmonitorchecksummismatch")
    );
    drop(inj);
    drop(monitor);
    let _ = std::fs::remove_dir_all(&dir);
}
