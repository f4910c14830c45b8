//! Precedence, every error's text, and the file format.

use std::path::Path;

use clap::Parser as _;

use super::*;
use crate::cli::{Cli, Command};

fn args(extra: &[&str]) -> RunOptions {
    let mut v = vec!["natt-monitor", "run"];
    v.extend_from_slice(extra);
    match Cli::try_parse_from(v).unwrap().command {
        Command::Run(a) => a,
        _ => unreachable!(),
    }
}

fn file(text: &str) -> (PathBuf, RunOptions) {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("natt-config-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("natt-monitor.toml");
    std::fs::write(&path, text).unwrap();
    let a = args(&["--config", path.to_str().unwrap(), "--cgroup", "/"]);
    (path, a)
}

#[test]
fn flags_override_the_file_and_peers_add_up() {
    let (path, _) = file(
        "mode = \"enforce\"\nlisten = \"127.0.0.1:1\"\nlog_format = \"json\"\n\
         [[peer]]\ncidr = \"192.0.2.0/24\"\n[[peer]]\ncidr = \"198.51.100.7\"\nmode = \"observe\"\n",
    );
    let a = args(&[
        "--config",
        path.to_str().unwrap(),
        "--cgroup",
        "/",
        "--listen",
        "[::1]:9",
        "--peer",
        "2001:db8::/32",
    ]);
    let s = resolve(&a).unwrap();
    assert_eq!(s.listen, "[::1]:9".parse().unwrap());
    assert_eq!(s.log_format, LogFormat::Json);
    let got: Vec<(String, Mode)> = s.peers.iter().map(|p| (p.label(), p.mode)).collect();
    assert_eq!(
        got,
        [
            ("192.0.2.0/24".into(), Mode::Enforce),
            ("198.51.100.7/32".into(), Mode::Observe),
            ("2001:db8::/32".into(), Mode::Enforce),
        ]
    );
    let a = args(&[
        "--config",
        path.to_str().unwrap(),
        "--cgroup",
        "/",
        "--mode",
        "observe",
    ]);
    assert_eq!(resolve(&a).unwrap().peers[0].mode, Mode::Observe);
}

/// A reload applies peers and `mode`; any other change is refused, naming its file key.
#[test]
fn a_reload_names_the_first_setting_that_needs_a_restart() {
    let (path, a) = file("mode = \"observe\"\nlisten = \"127.0.0.1:1\"\n");
    let running = resolve(&a).unwrap();
    std::fs::write(
        &path,
        "mode = \"enforce\"\nlisten = \"127.0.0.1:1\"\n[[peer]]\ncidr = \"192.0.2.7\"\n",
    )
    .unwrap();
    let reloaded = resolve(&a).unwrap();
    assert_eq!(reloaded.needs_restart(&running), None);
    assert_eq!(reloaded.default_mode, Mode::Enforce);
    std::fs::write(&path, "listen = \"127.0.0.1:2\"\nmax_peers = 9\n").unwrap();
    assert_eq!(resolve(&a).unwrap().needs_restart(&running), Some("listen"));
    std::fs::write(&path, "listen = \"127.0.0.1:1\"\nmax_peers = 9\n").unwrap();
    assert_eq!(
        resolve(&a).unwrap().needs_restart(&running),
        Some("max_peers")
    );
}

#[test]
fn flags_and_file_keys_are_one_schema() {
    // Every option but the flag-only ones is also a file key, under its snake_case name.
    let (_, a) = file(
        "cgroup = \"/\"\nmode = \"enforce\"\ndiscover = \"none\"\nscope = \"address\"\n\
         sys_path = \"/s\"\ncapture = \"/c.pcapng\"\ncapture_max_bytes = 5000\n\
         listen = \"127.0.0.1:2\"\nlog_format = \"json\"\nproc_path = \"/proc\"\n\
         pin_path = \"none\"\nlog_level = \"debug\"\n[[peer]]\ncidr = \"192.0.2.1\"\n",
    );
    let s = resolve(&a).unwrap();
    assert_eq!((s.pin, s.log_level), (None, LogLevel::Debug));
    assert_eq!(
        (
            s.default_mode,
            s.discover,
            s.scope,
            s.sys_path.to_str(),
            s.capture.as_deref().and_then(Path::to_str),
            s.capture_max_bytes,
            s.listen.to_string(),
            s.log_format,
        ),
        (
            Mode::Enforce,
            Discover::None,
            ScopeChoice::Address,
            Some("/s"),
            Some("/c.pcapng"),
            5000,
            "127.0.0.1:2".to_owned(),
            LogFormat::Json,
        )
    );
    // The flag-only options are not file keys.
    for key in ["config = \"x.toml\"", "peers = [\"192.0.2.1\"]"] {
        let (_, a) = file(&format!("{key}\n[[peer]]\ncidr = \"192.0.2.1\"\n"));
        let e = resolve(&a).unwrap_err().to_string();
        let name = key.split(' ').next().unwrap();
        assert!(e.contains(&format!("unknown field `{name}`")), "{e}");
    }
}

#[test]
fn map_and_label_limits_are_bounded_and_named() {
    let s = resolve(&args(&["--cgroup", "/", "--peer", "192.0.2.1"])).unwrap();
    assert_eq!((s.max_peers, s.max_peer_labels), (1024, 256));
    let s = resolve(&args(&[
        "--cgroup",
        "/",
        "--peer",
        "192.0.2.1",
        "--max-peers",
        "16384",
        "--max-peer-labels",
        "0",
    ]))
    .unwrap();
    assert_eq!((s.max_peers, s.max_peer_labels), (16384, 0));
    let e = resolve(&args(&[
        "--cgroup",
        "/",
        "--peer",
        "192.0.2.1",
        "--max-peers",
        "0",
    ]))
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "--max-peers: 0 is out of range; use 1 to 65536"
    );
    let (p, a) = file("max_peer_labels = 70000\n[[peer]]\ncidr = \"192.0.2.1\"\n");
    assert_eq!(
        resolve(&a).unwrap_err().to_string(),
        format!(
            "--config {} key `max_peer_labels`: 70000 is out of range; use 0 to 65536",
            p.display()
        )
    );
    let (_, a) = file("max_peers = 12000\n[[peer]]\ncidr = \"192.0.2.1\"\n");
    assert_eq!(resolve(&a).unwrap().max_peers, 12000);
}

#[test]
fn exporter_conventions_for_the_endpoint() {
    let s = resolve(&args(&[
        "--peer",
        "192.0.2.1",
        "--web.listen-address",
        ":9874",
        "--web.telemetry-path",
        "/natt/metrics",
        "--web.disable-exporter-metrics",
    ]))
    .unwrap();
    assert_eq!(s.listen.to_string(), "[::]:9874");
    assert_eq!(s.telemetry_path, "/natt/metrics");
    assert!(s.disable_exporter_metrics);
    // --listen stays the same flag; the defaults serve /metrics with the process metrics.
    let s = resolve(&args(&["--peer", "192.0.2.1", "--listen", "[::1]:9"])).unwrap();
    assert_eq!(s.listen.to_string(), "[::1]:9");
    assert_eq!(s.telemetry_path, "/metrics");
    assert!(!s.disable_exporter_metrics);
    let (p, a) = file(
        "telemetry_path = \"/healthz\"\ndisable_exporter_metrics = true\n[[peer]]\ncidr = \"192.0.2.1\"\n",
    );
    assert_eq!(
        resolve(&a).unwrap_err().to_string(),
        format!(
            "--config {} key `telemetry_path`: `/healthz` cannot be the metrics path: it must start with `/`, hold no spaces, `?` or `#`, and not be `/` or `/healthz` (e.g. /metrics)",
            p.display()
        )
    );
    for bad in [":", ":http", ":70000", "9874"] {
        assert!(
            resolve(&args(&["--peer", "192.0.2.1", "--listen", bad])).is_err(),
            "{bad}"
        );
    }
}

#[test]
fn more_static_peers_than_the_maps_hold_is_a_configuration_error() {
    let (p, a) = file(
        "max_peers = 2\n[[peer]]\ncidr = \"192.0.2.1\"\n[[peer]]\ncidr = \"192.0.2.2\"\n[[peer]]\ncidr = \"192.0.2.3\"\n",
    );
    assert_eq!(
        resolve(&a).unwrap_err().to_string(),
        format!(
            "3 peers configured (--peer and [[peer]]), more than --config {} key `max_peers` = 2 lets the verifier hold; raise it or remove peers (discovered peers past the limit are only counted, never an error)",
            p.display()
        )
    );
    // As many as the limit is fine.
    let (_, a) = file("max_peers = 1\n[[peer]]\ncidr = \"192.0.2.1\"\n");
    assert_eq!(resolve(&a).unwrap().peers.len(), 1);
}

#[test]
fn errors_name_the_key_or_flag() {
    let (_, a) = file("[[peer]]\ncidr = \"192.0.2.0/24\"\nmtu = 9000\n");
    let e = resolve(&a).unwrap_err().to_string();
    assert!(e.contains("unknown field `mtu`, expected one of `cidr`, `mode`, `original_src`, `original_dst`, `observed_dst`, `learn_residual`"), "{e}");
    assert!(e.contains("line 3"), "{e}");

    let (p, a) = file("[[peer]]\ncidr = \"192.0.2.0/33\"\n");
    assert_eq!(
        resolve(&a).unwrap_err().to_string(),
        format!(
            "--config {} [[peer]] #1 (cidr = \"192.0.2.0/33\"): `192.0.2.0/33` is not an IP address or CIDR prefix \
             (expected e.g. 192.0.2.7, 198.51.100.0/24 or 2001:db8::/64)",
            p.display()
        )
    );

    let (p, a) = file("capture_max_bytes = 100\n[[peer]]\ncidr = \"192.0.2.1\"\n");
    assert_eq!(
        resolve(&a).unwrap_err().to_string(),
        format!(
            "--config {} key `capture_max_bytes`: 100 bytes cannot hold one captured packet; use at least 4096",
            p.display()
        )
    );
    assert_eq!(
        resolve(&args(&["--peer", "192.0.2.1", "--capture-max-bytes", "0"]))
            .unwrap_err()
            .to_string(),
        "--capture-max-bytes: 0 bytes cannot hold one captured packet; use at least 4096"
    );

    let (p, a) = file("listen = \"localhost\"\n[[peer]]\ncidr = \"192.0.2.1\"\n");
    assert_eq!(
        resolve(&a).unwrap_err().to_string(),
        format!(
            "--config {} key `listen`: `localhost` is not a socket address (expected e.g. 127.0.0.1:9874, [::1]:9874 or :9874)",
            p.display()
        )
    );

    let (p, a) = file(
        "[[peer]]\ncidr = \"192.0.2.0/24\"\noriginal_src = \"10.0.0.1\"\noriginal_dst = \"10.0.0.2\"\nobserved_dst = \"192.0.2.99\"\n",
    );
    assert!(
        resolve(&a)
            .unwrap_err()
            .to_string()
            .starts_with(&format!("--config {} [[peer]] #1", p.display()))
    );

    let (_, a) = file("[[peer]]\ncidr = \"192.0.2.1\"\noriginal_src = \"10.0.0.1\"\n");
    assert!(
        resolve(&a)
            .unwrap_err()
            .to_string()
            .ends_with("set all of original_src, original_dst and observed_dst, or none")
    );

    let a = args(&["--cgroup", "/", "--discover", "none"]);
    assert_eq!(
        resolve(&a).unwrap_err().to_string(),
        "no peers configured and discovery is off: pass --peer CIDR (repeatable), add [[peer]] entries to the --config file, or use --discover xfrm"
    );
    // Discovery alone is a valid configuration; by default it is not required.
    let s = resolve(&args(&["--cgroup", "/"])).unwrap();
    assert_eq!((s.discover, s.discover_required), (Discover::Xfrm, false));
    let (_, a) =
        file("discover = \"xfrm\"\n[[peer]]\ncidr = \"192.0.2.1\"\nlearn_residual = true\n");
    let s = resolve(&a).unwrap();
    assert_eq!(
        (s.discover, s.discover_required, s.peers[0].learn),
        (Discover::Xfrm, true, true)
    );
    let a = args(&["--cgroup", "/nonexistent/cg", "--peer", "192.0.2.1"]);
    assert_eq!(
        resolve(&a).unwrap_err().to_string(),
        "--cgroup /nonexistent/cg: no such directory"
    );
    // Pinning is on by default; --pin-path moves it or turns it off.
    let s = resolve(&args(&["--cgroup", "/"])).unwrap();
    assert_eq!(
        s.pin.as_deref(),
        Some(Path::new("/sys/fs/bpf/natt-monitor"))
    );
    let s = resolve(&args(&["--cgroup", "/", "--pin-path", "/sys/fs/bpf/x"])).unwrap();
    assert_eq!(s.pin.as_deref(), Some(Path::new("/sys/fs/bpf/x")));
    assert_eq!(
        resolve(&args(&["--cgroup", "/", "--pin-path", "natt"]))
            .unwrap_err()
            .to_string(),
        "--pin-path: `natt` is not an absolute directory path or `none`"
    );
    let (p, a) = file("pin_path = \"/\"\n[[peer]]\ncidr = \"192.0.2.1\"\n");
    assert_eq!(
        resolve(&a).unwrap_err().to_string(),
        format!(
            "--config {} key `pin_path`: `/` is not an absolute directory path or `none`",
            p.display()
        )
    );
    let a = args(&["--config", "/nonexistent/natt.toml", "--peer", "192.0.2.1"]);
    assert_eq!(
        resolve(&a).unwrap_err().to_string(),
        "--config /nonexistent/natt.toml: No such file or directory (os error 2)"
    );
}

#[test]
fn the_documented_example_is_valid() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/natt-monitor.example.toml"
    );
    let a = args(&["--config", path, "--cgroup", "/"]);
    let s = resolve(&a).unwrap();
    let got: Vec<(String, Mode, bool, bool)> = s
        .peers
        .iter()
        .map(|p| (p.label(), p.mode, p.nat.is_some(), p.learn))
        .collect();
    assert_eq!(
        got,
        [
            ("198.51.100.0/24".into(), Mode::Observe, false, false),
            ("2001:db8:7::/48".into(), Mode::Enforce, false, false),
            ("203.0.113.5/32".into(), Mode::Observe, true, false),
            ("192.0.2.44/32".into(), Mode::Observe, false, true),
        ]
    );
    assert_eq!((s.discover, s.discover_required), (Discover::Xfrm, true));
    assert_eq!(s.listen.to_string(), DEFAULT_LISTEN);
    assert_eq!((s.log_burst, s.log_per_second), (20, 5));
}

#[test]
fn nat_peer_gets_its_residual_inputs() {
    let (_, a) = file(
        "[[peer]]\ncidr = \"203.0.113.5\"\noriginal_src = \"10.0.0.5\"\noriginal_dst = \"10.9.9.9\"\nobserved_dst = \"192.168.1.1\"\n",
    );
    let s = resolve(&a).unwrap();
    let nat = s.peers[0].nat.unwrap();
    assert_eq!(nat.observed_src, "203.0.113.5".parse::<IpAddr>().unwrap());
    assert_ne!(s.peers[0].expected_residual().unwrap(), 0);
}
