//! The binary's configuration end to end (root only): bad flags, environment values and files are
//! named with their exact messages and the right exit status before anything is attached;
//! discovery alone is a valid configuration; `check` reads the roots it is given.

use std::process::Command;

use natt_monitor_tests::{
    PinDir,
    daemon::{Daemon, assert_no_verifier_loaded, field_u64, output_of, run_to_end},
    metric, monitor_bin,
    net::Cgroup,
    skip_unless_root,
};

#[test]
#[expect(
    clippy::too_many_lines,
    reason = "a table of cases, each an argument list and its exact message"
)]
fn bad_arguments_fail_before_anything_is_attached() {
    if skip_unless_root("bad_arguments_fail_before_anything_is_attached") {
        return;
    }
    // (arguments, exit code, what stderr must say). Exit 78 (EX_CONFIG): natt-monitor's own
    // checks of the configuration; exit 2: clap's usage errors, which also name the flag.
    let cases: [(&[&str], i32, &str); 12] = [
        (
            &["run", "--peer", "10.0.0.300/8"],
            78,
            "natt-monitor: error: --peer: `10.0.0.300/8` is not an IP address or CIDR prefix (expected e.g. 192.0.2.7, 198.51.100.0/24 or 2001:db8::/64)",
        ),
        (
            &["run", "--peer", "192.0.2.1", "--listen", "localhost:80"],
            78,
            "natt-monitor: error: --web.listen-address: `localhost:80` is not a socket address (expected e.g. 127.0.0.1:9874, [::1]:9874 or :9874)",
        ),
        (
            &["run", "--peer", "192.0.2.1", "--peer", "192.0.2.1/32"],
            78,
            "natt-monitor: error: --peer: peer 192.0.2.1/32 is configured twice",
        ),
        (
            &["run", "--peer", "192.0.2.1", "--cgroup", "/nonexistent/cg"],
            78,
            "natt-monitor: error: --cgroup /nonexistent/cg: no such directory",
        ),
        (
            &[
                "run",
                "--peer",
                "192.0.2.1",
                "--cgroup",
                "/tmp",
                "--listen",
                "127.0.0.1:0",
            ],
            78,
            "natt-monitor: error: /tmp is not a cgroup v2 directory (cgroup v2 is mounted at",
        ),
        (
            &["run", "--discover", "none"],
            78,
            "natt-monitor: error: no peers configured and discovery is off: pass --peer CIDR (repeatable), add [[peer]] entries to the --config file, or use --discover xfrm",
        ),
        (
            &["run", "--peer", "192.0.2.1", "--mode", "block"],
            2,
            "invalid value 'block' for '--mode <MODE>'",
        ),
        (
            &["run", "--peers", "192.0.2.1"],
            2,
            "unexpected argument '--peers' found",
        ),
        (
            &["run", "--peer", "192.0.2.1", "--sa-trust-slots", "0"],
            2,
            "invalid value '0' for '--sa-trust-slots <N>': 0 is not in 1..=16384",
        ),
        (
            &["run", "--peer", "192.0.2.1", "--max-peers", "70000"],
            78,
            "natt-monitor: error: --max-peers: 70000 is out of range; use 1 to 65536",
        ),
        (
            &[
                "run",
                "--peer",
                "192.0.2.1",
                "--peer",
                "192.0.2.2",
                "--max-peers",
                "1",
                "--listen",
                "127.0.0.1:0",
            ],
            78,
            "natt-monitor: error: 2 peers configured (--peer and [[peer]]), more than --max-peers = 1 lets the verifier hold; raise it or remove peers (discovered peers past the limit are only counted, never an error)",
        ),
        (
            &[
                "run",
                "--peer",
                "192.0.2.1",
                "--web.telemetry-path",
                "metrics",
            ],
            78,
            "natt-monitor: error: --web.telemetry-path: `metrics` cannot be the metrics path: it must start with `/`, hold no spaces, `?` or `#`, and not be `/` or `/healthz` (e.g. /metrics)",
        ),
    ];
    // Each run pins in a directory of its own: the `/tmp` case loads (and pins) before its
    // attach fails, and must leave nothing pinned behind.
    for (args, want_code, want) in cases {
        let pins = PinDir::new();
        let args = [args, &["--pin-path", pins.arg()]].concat();
        let (code, err) = run_to_end(&args);
        assert_eq!(code, want_code, "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: expected {want:?} in:\n{err}");
        assert!(
            !pins.path.exists(),
            "a failed start left pins in {}",
            pins.path.display()
        );
    }
    assert_no_verifier_loaded();
}

/// A value that does not parse exits 2 (which the unit never restarts), and when it came from
/// the environment, as a drop-in's `Environment=` sets it, the variable is named.
#[test]
fn a_bad_value_from_the_environment_is_named_and_exits_2() {
    let out = Command::new(monitor_bin())
        .args(["run", "--peer", "192.0.2.1"])
        .env("NATT_MONITOR_MODE", "Enforce")
        .output()
        .expect("spawn natt-monitor");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("invalid value 'Enforce' for '--mode <MODE>'"),
        "{err}"
    );
    assert!(
        err.ends_with(
            "natt-monitor: the value came from the environment: NATT_MONITOR_MODE=Enforce\n"
        ),
        "{err}"
    );
}

#[test]
fn discovery_alone_is_a_valid_configuration() {
    if skip_unless_root("discovery_alone_is_a_valid_configuration") {
        return;
    }
    // No static peer at all: the peers come from the kernel's SAs. This kernel has XFRM netlink
    // but no ESP (`ip xfrm state add ... proto esp` fails), so there are none; the VM suite
    // covers real SAs coming and going.
    let cg = Cgroup::new();
    let d = Daemon::attached(&[
        "run",
        "--discover",
        "xfrm",
        "--cgroup",
        cg.path.to_str().unwrap(),
    ]);
    let read = d.messages("XFRM discovery: read the kernel's SAs");
    assert_eq!(read.len(), 1, "{:?}", d.lines());
    assert_eq!(field_u64(&read[0], "peers"), 0);
    let attached = &d.messages("verifier attached at cgroup_skb ingress")[0];
    assert_eq!(attached["discover"], "xfrm");
    // By default the scope comes from each segment's IPsec state wherever the kernel has BTF.
    let btf = std::path::Path::new("/sys/kernel/btf/vmlinux").exists();
    assert_eq!(attached["scope"], if btf { "sa" } else { "address" });
    let (code, body) = d.get("/metrics");
    assert_eq!(code, 200);
    assert_eq!(
        metric(&body, "natt_monitor_peers{source=\"xfrm\"}"),
        Some(0)
    );
    assert_eq!(
        metric(&body, "natt_monitor_peers{source=\"static\"}"),
        Some(0)
    );
    assert_eq!(metric(&body, "natt_monitor_up"), Some(1));
    let (status, lines) = d.stop(libc::SIGTERM);
    assert!(status.success(), "exit status {status}: {lines:?}");
    assert_no_verifier_loaded();
}

#[test]
fn config_errors_are_named_before_anything_is_attached() {
    if skip_unless_root("config_errors_are_named_before_anything_is_attached") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("natt-daemon-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("bad.toml");
    std::fs::write(
        &cfg,
        "listen = \"127.0.0.1:0\"\n[[peer]]\ncidr = \"192.0.2.1\"\nmtu = 9000\n",
    )
    .unwrap();
    let (code, err) = run_to_end(&["run", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 78, "a configuration error exits EX_CONFIG: {err}");
    assert!(
        err.contains(&format!(
            "natt-monitor: error: --config {}: TOML parse error at line 4",
            cfg.display()
        )),
        "{err}"
    );
    assert!(err.contains("unknown field `mtu`"), "{err}");
    // `check --config` says the same, with the same status, and loads nothing.
    let (code, err) = run_to_end(&["check", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 78, "{err}");
    assert!(err.contains("unknown field `mtu`"), "{err}");
    // A valid file: a summary of what it configures.
    let good = dir.join("good.toml");
    std::fs::write(
        &good,
        "mode = \"enforce\"\ndiscover = \"none\"\ncgroup = \"/\"\npin_path = \"none\"\n[[peer]]\ncidr = \"192.0.2.1\"\n[[peer]]\ncidr = \"2001:db8::/64\"\n",
    )
    .unwrap();
    assert_eq!(
        output_of(&["check", "--config", good.to_str().unwrap()]),
        (
            0,
            format!(
                "ok    config                 {}: 2 static peers, discover none, default mode enforce, scope auto, cgroup /, listen 127.0.0.1:9874, pin path none\nthe configuration is valid\n",
                good.display()
            )
        )
    );
    // The environment stands in for flags: a bad value is named like the flag's.
    let out = Command::new(monitor_bin())
        .args(["run", "--peer", "192.0.2.1"])
        .env("NATT_MONITOR_LISTEN", "nowhere")
        .output()
        .expect("spawn natt-monitor");
    assert_eq!(out.status.code(), Some(78));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim_end(),
        "natt-monitor: error: --web.listen-address: `nowhere` is not a socket address (expected e.g. 127.0.0.1:9874, [::1]:9874 or :9874)"
    );

    // A port in use is reported before the program is loaded.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let (code, err) = run_to_end(&["run", "--peer", "192.0.2.1", "--listen", &addr]);
    assert_eq!(code, 1);
    assert_eq!(
        err.trim_end(),
        format!(
            "natt-monitor: error: --web.listen-address {addr}: Address already in use (os error 98)"
        )
    );

    // Without capabilities (root with an empty bounding set), the daemon says which it lacks.
    let out = Command::new("setpriv")
        .args(["--bounding-set=-all", "--inh-caps=-all", "--"])
        .arg(monitor_bin())
        .args(["run", "--peer", "192.0.2.1", "--listen", "127.0.0.1:0"])
        .output()
        .expect("setpriv");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(
            "natt-monitor: error: natt-monitor needs CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN (or CAP_SYS_ADMIN), or root; this process lacks CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN"
        ),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
    assert_no_verifier_loaded();
}

/// A `--max-peers` whose maps cannot fit under the cgroup's `memory.max` (charged to it on
/// 5.11+) exits 78 before anything is loaded, so systemd does not restart it in a loop. This
/// host keeps its memory controller in cgroup v1, so a procfs fixture stands in for a unified
/// host's: a 32 MiB limit two levels up, 6 MiB of it held. v-systemd runs the real one.
#[test]
fn max_peers_past_the_cgroup_memory_limit_exits_78_before_loading() {
    if skip_unless_root("max_peers_past_the_cgroup_memory_limit_exits_78_before_loading") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("natt-daemon-mem-{}", std::process::id()));
    let (proc_root, cg) = (dir.join("proc"), dir.join("cg"));
    for d in [
        proc_root.join("self"),
        proc_root.join("sys/kernel"),
        cg.join("a/b"),
    ] {
        std::fs::create_dir_all(d).unwrap();
    }
    let files = [
        (
            "mounts",
            format!("cgroup2 {} cgroup2 rw 0 0\n", cg.display()),
        ),
        ("self/cgroup", "0::/a/b\n".to_owned()),
        ("self/status", "CapEff:\t000001ffffffffff\n".to_owned()),
        ("sys/kernel/osrelease", "6.1.0-28-amd64\n".to_owned()),
    ];
    for (name, text) in files {
        std::fs::write(proc_root.join(name), text).unwrap();
    }
    std::fs::write(cg.join("a/memory.max"), "33554432\n").unwrap();
    // 8 MiB held, 2 MiB of it page cache: 26 MiB free.
    std::fs::write(cg.join("a/memory.current"), "8388608\n").unwrap();
    std::fs::write(cg.join("a/memory.stat"), "anon 6291456\nfile 2097152\n").unwrap();
    std::fs::write(cg.join("a/b/memory.max"), "max\n").unwrap();
    let cpus = aya::util::nr_cpus().expect("possible CPUs").get();
    let need = natt_monitor::ebpf::MapSizes::for_peers(65536)
        .memory_floor(cpus)
        .div_ceil(1 << 20);
    // Not on bpffs: a start that passes the check stops at its pin path, before loading.
    let pins = dir.join("pins");
    let run = |max_peers: &str, release: &str| {
        std::fs::write(proc_root.join("sys/kernel/osrelease"), release).unwrap();
        let args = [
            "run",
            "--peer",
            "192.0.2.1",
            "--listen",
            "127.0.0.1:0",
            "--pin-path",
            pins.to_str().unwrap(),
            "--proc-path",
            proc_root.to_str().unwrap(),
            "--max-peers",
            max_peers,
        ];
        run_to_end(&args)
    };
    let (code, err) = run("65536", "6.1.0-28-amd64\n");
    assert_eq!(
        (code, err.trim_end()),
        (78, format!(
            "natt-monitor: error: --max-peers 65536: the verifier's maps need at least {need} MiB (possible CPUs: {cpus}; the per-peer counters take one copy per CPU), more than the 26 MiB that memory.max of {} (32 MiB) leaves free; lower --max-peers (the max_peers key) or raise the limit (the unit's MemoryMax=)",
            cg.join("a").display()
        ).as_str())
    );
    // Within the limit, and on 5.10 (maps charged to RLIMIT_MEMLOCK, not the cgroup), the
    // start goes on past the check: it stops later, at the pin path that is not on bpffs.
    for (max_peers, release) in [("1024", "6.1.0-28-amd64\n"), ("65536", "5.10.0-33-amd64\n")] {
        let (code, err) = run(max_peers, release);
        assert!(
            code == 78 && err.contains("bpffs") && !err.contains("memory.max"),
            "--max-peers {max_peers} on {release}: {code} {err}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
    assert_no_verifier_loaded();
}

#[test]
fn check_reads_the_proc_and_sys_roots_it_is_given() {
    if skip_unless_root("check_reads_the_proc_and_sys_roots_it_is_given") {
        return;
    }
    // A host as a container might present it: an old kernel release, no capabilities, no
    // cgroup2, no BTF, one ESP module. The release is only reported: what the kernel can do is
    // probed, and this kernel's probes pass.
    let dir = std::env::temp_dir().join(format!("natt-check-roots-{}", std::process::id()));
    let (proc_root, sys_root) = (dir.join("proc"), dir.join("sys"));
    std::fs::create_dir_all(proc_root.join("sys/kernel")).unwrap();
    std::fs::create_dir_all(proc_root.join("self")).unwrap();
    std::fs::create_dir_all(sys_root.join("module/esp4")).unwrap();
    std::fs::write(proc_root.join("sys/kernel/osrelease"), "5.4.0-fixture\n").unwrap();
    std::fs::write(
        proc_root.join("self/status"),
        "Name:\tnatt-monitor\nCapEff:\t0000000000000000\n",
    )
    .unwrap();
    std::fs::write(proc_root.join("mounts"), "proc /proc proc rw 0 0\n").unwrap();
    let out = Command::new(monitor_bin())
        .args(["check", "--proc-path"])
        .arg(&proc_root)
        .arg("--sys-path")
        .arg(&sys_root)
        .output()
        .expect("spawn natt-monitor check");
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    let p = proc_root.display();
    let s = sys_root.display();
    for line in [
        "info  kernel                 5.4.0-fixture (judged by the probes below, not by its version)".to_owned(),
        "FAIL  capabilities           missing CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN: run as root or grant them (see docs/install.md)".to_owned(),
        format!("info  scope                  address (fallback): reading BTF from {s}/kernel/btf/vmlinux: no such file (the kernel was built without CONFIG_DEBUG_INFO_BTF); plaintext from peers is told apart only by IKE ports and partial checksums, and enforce applies only to peers with an exact residual (learned peers run in observe)"),
        format!("FAIL  cgroup2                no cgroup2 mount in {p}/mounts; mount one (mount -t cgroup2 none /sys/fs/cgroup/unified)"),
        "info  esp modules            loaded: esp4".to_owned(),
        "ok    ring buffer            present: BPF_MAP_TYPE_RINGBUF carries mismatch events, learning samples and captures (required)".to_owned(),
        "natt-monitor cannot run on this host; fix the FAIL lines above".to_owned(),
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
    }
}
