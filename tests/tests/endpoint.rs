//! The metrics endpoint of the real binary (root only): TLS and basic authentication from the
//! web configuration file, the program's run statistics, and peer labels past the cap summed
//! under `other`.

use std::process::Command;

use natt_monitor_tests::{
    daemon::{ATTACHED, Daemon, field_u64},
    metric,
    net::{ADDR_A, Cgroup, Injector, Lab, stream},
    one_peer_run, skip_unless_root,
};

/// The `natt-peer` helper that sends and receives the test streams.
const PEER: &str = env!("CARGO_BIN_EXE_natt-peer");

/// A self-signed certificate for 127.0.0.1 in `dir` (`cert.pem`, key `key.pem`); returns the
/// certificate's path.
fn self_signed(dir: &std::path::Path) -> std::path::PathBuf {
    let key = dir.join("key.pem");
    let cert = dir.join("cert.pem");
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=natt-monitor test",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    cert
}

#[test]
fn tls_and_basic_auth_from_the_web_config_file() {
    if skip_unless_root("tls_and_basic_auth_from_the_web_config_file") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("natt-web-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let cert = self_signed(&dir);
    // Relative paths, as exporter-toolkit resolves them: against the file's directory.
    let hash = bcrypt::hash("right horse battery", 4).unwrap();
    let web = dir.join("web.yml");
    std::fs::write(
        &web,
        format!(
            "tls_server_config:\n  cert_file: cert.pem\n  key_file: key.pem\nbasic_auth_users:\n  prometheus: {hash}\n"
        ),
    )
    .unwrap();
    let cg = Cgroup::new();
    let mut d = Daemon::start(&one_peer_run(
        cg.path.to_str().unwrap(),
        &["--web.config.file", web.to_str().unwrap()],
    ));
    d.wait_for(ATTACHED);
    let url = format!("https://{}/metrics", d.addr());
    // (curl's exit code, the HTTP status it printed, the body).
    let curl = |extra: &[&str]| {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "10", "-w", "\n%{http_code}"])
            .args(extra)
            .arg(&url)
            .output()
            .expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        (out.status.code(), code.to_owned(), body.to_owned())
    };
    let ca = cert.to_str().unwrap();
    let (rc, code, body) = curl(&["--cacert", ca]);
    assert_eq!(
        (rc, code.as_str(), body.as_str()),
        (Some(0), "401", "unauthorized\n")
    );
    let (_, code, _) = curl(&["--cacert", ca, "-u", "prometheus:wrong horse"]);
    assert_eq!(code, "401");
    let (_, code, _) = curl(&["--cacert", ca, "-u", "grafana:right horse battery"]);
    assert_eq!(code, "401");
    let (rc, code, body) = curl(&["--cacert", ca, "-u", "prometheus:right horse battery"]);
    assert_eq!((rc, code.as_str()), (Some(0), "200"));
    assert!(body.lines().any(|l| l == "natt_monitor_up 1"), "{body}");
    // Probes need no credentials: /healthz answers without them (over TLS).
    let health = Command::new("curl")
        .args(["-sS", "--max-time", "10", "--cacert", ca])
        .arg(format!("https://{}/healthz", d.addr()))
        .output()
        .expect("curl");
    assert_eq!(String::from_utf8_lossy(&health.stdout), "ok\n");
    // The handshake is real: without the CA the certificate does not verify (curl exit 60), and
    // plain HTTP gets no HTTP answer from the TLS port.
    let (rc, _, _) = curl(&[]);
    assert_eq!(rc, Some(60));
    let plain = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .arg(format!("http://{}/metrics", d.addr()))
        .output()
        .expect("curl");
    assert_ne!(plain.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&plain.stdout), "000");
    drop(d);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Sets a sysctl for the life of the guard, then puts the old value back.
struct Sysctl {
    path: &'static str,
    old: String,
}

impl Sysctl {
    fn set(path: &'static str, value: &str) -> Self {
        let old = std::fs::read_to_string(path).expect("sysctl");
        std::fs::write(path, value).expect("write sysctl");
        Self { path, old }
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        let _ = std::fs::write(self.path, self.old.trim());
    }
}

#[test]
fn program_run_statistics_count_every_packet_the_verifier_saw() {
    if skip_unless_root("program_run_statistics_count_every_packet_the_verifier_saw") {
        return;
    }
    let lab = Lab::new(1500);
    let cg = Cgroup::new();
    let d = Daemon::attached(&[
        "run",
        "--peer",
        ADDR_A,
        "--discover",
        "none",
        "--scope",
        "address",
        "--cgroup",
        cg.path.to_str().unwrap(),
    ]);
    let (_, body) = d.get("/metrics");
    assert_eq!(metric(&body, "natt_monitor_bpf_stats_enabled"), Some(0));
    assert_eq!(metric(&body, "natt_monitor_program_runs_total"), Some(0));
    let stats = Sysctl::set("/proc/sys/kernel/bpf_stats_enabled", "1");
    let _inj = Injector::attach(&lab.b, lab.dev_b, 0);
    let s = stream(PEER, &lab, &cg.path, 1 << 20, false);
    assert_eq!(s.received, 1 << 20);
    drop(stats);
    let (_, body) = d.get("/metrics");
    assert_eq!(metric(&body, "natt_monitor_bpf_stats_enabled"), Some(0));
    // Every run of the program ends in exactly one count: verified, a mismatch, learning, or a
    // skip with its reason.
    let runs = metric(&body, "natt_monitor_program_runs_total").expect("runs");
    let sum = |prefix: &str| -> u64 {
        body.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    let outcomes = sum("natt_monitor_verified_packets_total{")
        + sum("natt_monitor_checksum_mismatches_total{")
        + sum("natt_monitor_learning_packets_total{")
        + sum("natt_monitor_skipped_packets_total{");
    assert!(runs > 700, "a 1 MiB stream is over 700 segments: {runs}");
    assert_eq!(runs, outcomes, "{body}");
    let seconds: f64 = body
        .lines()
        .find_map(|l| l.strip_prefix("natt_monitor_program_run_seconds_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(seconds > 0.0 && seconds < 1.0, "{seconds}");
}

/// `--max-peer-labels`: peers past the cap are summed under `peer="other"`, exactly, and
/// counted; logs still name them.
#[test]
fn peers_past_the_label_cap_are_summed_under_other() {
    if skip_unless_root("peers_past_the_label_cap_are_summed_under_other") {
        return;
    }
    let lab = Lab::new(1500);
    let cg = Cgroup::new();
    // Two static peers and one label: the first (no traffic) keeps its own series, the second
    // (the lab's sender) is summed under "other".
    let d = Daemon::attached(&[
        "run",
        "--peer",
        "198.51.100.9",
        "--peer",
        ADDR_A,
        "--cgroup",
        cg.path.to_str().unwrap(),
        "--mode",
        "enforce",
        "--scope",
        "address",
        "--max-peers",
        "2",
        "--max-peer-labels",
        "1",
    ]);
    let inj = Injector::attach(&lab.b, lab.dev_b, 50);
    let s = stream(PEER, &lab, &cg.path, 4 << 20, false);
    assert_eq!(s.received, 4 << 20);
    let (_, body) = d.get("/metrics");
    let series = |name: &str, peer: &str| {
        metric(
            &body,
            &format!("natt_monitor_{name}{{peer=\"{peer}\",proto=\"tcp\"}}"),
        )
    };
    assert_eq!(metric(&body, "natt_monitor_peers_aggregated"), Some(1));
    assert_eq!(metric(&body, "natt_monitor_peers_limit"), Some(2));
    assert_eq!(series("verified_packets_total", "198.51.100.9/32"), Some(0));
    assert!(
        !body.contains("peer=\"192.0.2.1/32\""),
        "the aggregated peer has a series of its own"
    );
    let verified = series("verified_packets_total", "other").expect("other");
    let mismatches = series("checksum_mismatches_total", "other").expect("other");
    assert!(verified > 1000, "{verified}");
    assert!(
        mismatches > 0 && mismatches <= inj.stats().corrupted,
        "{mismatches} of {}",
        inj.stats().corrupted
    );
    assert_eq!(series("dropped_packets_total", "other"), Some(mismatches));
    let (status, lines) = d.stop(libc::SIGTERM);
    assert!(status.success());
    // The log names the peer the metrics summed: its totals are exactly "other"'s.
    let totals = lines
        .iter()
        .find(|v| v["message"] == "peer totals" && v["peer"] == "192.0.2.1/32")
        .expect("peer totals of 192.0.2.1/32");
    assert_eq!(field_u64(totals, "verified_tcp"), verified);
    assert_eq!(field_u64(totals, "mismatches"), mismatches);
}
