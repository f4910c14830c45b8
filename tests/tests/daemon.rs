//! The `natt-monitor` binary end to end (root only): argument errors, a real run against the
//! namespace lab with JSON logs, detach on exit without pinning, and with pinning (the default)
//! a verifier that outlives the daemon, is adopted by the next one without a gap, and is
//! removed by `natt-monitor detach`.
//!
//! The binary comes from `NATT_MONITOR_BIN` (set by `cargo xtask test`) or the target directory
//! next to this test executable.

use std::{
    fmt::Write as _,
    io::{BufRead as _, BufReader},
    os::unix::process::ExitStatusExt as _,
    process::{Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use natt_monitor_tests::{
    KillOnDrop, PinDir, http_get, metric, monitor_bin,
    net::{ADDR_A, ADDR_B, ADDR6_A, Cgroup, Injector, Lab, StreamResult, stream, stream_between},
    one_peer_run, skip_unless_root,
};
use serde_json::Value;

/// Runs the binary to completion and returns (exit code, stderr).
fn run_to_end(args: &[&str]) -> (i32, String) {
    let out = Command::new(monitor_bin())
        .args(args)
        .output()
        .expect("spawn natt-monitor");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

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

/// No verifier of this test's is left loaded (one installed on the host is not this test's).
fn assert_no_verifier_loaded() {
    let left = natt_monitor_tests::test_verifiers_loaded();
    assert!(left.is_empty(), "natt_verify still loaded: ids {left:?}");
}

struct Daemon {
    child: KillOnDrop,
    lines: Arc<Mutex<Vec<Value>>>,
    reader: Option<std::thread::JoinHandle<()>>,
    /// Dropped after the process is killed: detaches what it left pinned.
    _pins: Option<PinDir>,
}

impl Daemon {
    /// Runs `natt-monitor` with `args`, JSON logs, a free port unless `--listen` or `--config`
    /// is given, and a pin directory of its own (removed on drop) unless `--pin-path` is.
    fn start(args: &[&str]) -> Self {
        let pins = (!args.contains(&"--pin-path")).then(PinDir::new);
        Self::start_pinned(args, pins)
    }

    /// As `start`, pinning in `pins` (which the caller may share with a later daemon).
    fn start_pinned(args: &[&str], pins: Option<PinDir>) -> Self {
        Self::spawn(&monitor_bin(), args, pins)
    }

    /// As `start`, with another build's binary (whose `run` takes the same flags).
    fn start_bin(bin: &std::path::Path, args: &[&str]) -> Self {
        let pins = (!args.contains(&"--pin-path")).then(PinDir::new);
        Self::spawn(bin, args, pins)
    }

    fn spawn(bin: &std::path::Path, args: &[&str], pins: Option<PinDir>) -> Self {
        let mut cmd = Command::new(bin);
        cmd.args(args).args(["--log-format", "json"]);
        if !args.contains(&"--listen") && !args.iter().any(|a| a.starts_with("--config")) {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        if let Some(p) = &pins {
            cmd.args(["--pin-path", p.arg()]);
        }
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn natt-monitor");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        let err = child.stderr.take().expect("stderr");
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let v = serde_json::from_str(&line).unwrap_or(Value::String(line));
                sink.lock().unwrap().push(v);
            }
        });
        Self {
            child: KillOnDrop(child),
            lines,
            reader: Some(reader),
            _pins: pins,
        }
    }

    fn messages(&self, message: &str) -> Vec<Value> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|v| v["message"] == message)
            .cloned()
            .collect()
    }

    fn wait_for(&mut self, message: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.messages(message).is_empty() {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "natt-monitor exited ({status}) before logging {message:?}: {:?}",
                    self.lines.lock().unwrap()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no {message:?} within 20 s: {:?}",
                self.lines.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The metrics address, from the "attached" log line.
    fn addr(&self) -> String {
        let attached = self.messages("verifier attached at cgroup_skb ingress");
        attached[0]["listen"]
            .as_str()
            .expect("listen field")
            .to_owned()
    }

    fn get(&self, path: &str) -> (u16, String) {
        http_get(&format!("http://{}{path}", self.addr()))
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pid")
    }

    fn signal(&self, signal: i32) {
        let pid = self.pid();
        // SAFETY: kill has no memory preconditions.
        unsafe { libc::kill(pid, signal) };
    }

    /// Waits for the process to exit on its own.
    fn wait_exit(mut self, timeout: Duration) -> (ExitStatus, Vec<Value>) {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "natt-monitor did not exit within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        self.reader.take().unwrap().join().unwrap();
        (status, self.lines.lock().unwrap().clone())
    }

    fn stop(self, signal: i32) -> (ExitStatus, Vec<Value>) {
        self.signal(signal);
        self.wait_exit(Duration::from_secs(10))
    }
}

fn field_u64(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or_else(|| panic!("field {k} in {v}"))
}

#[test]
#[expect(clippy::too_many_lines, reason = "one scenario, asserted end to end")]
fn logs_every_mismatch_within_its_budget_and_detaches_on_sigterm() {
    if skip_unless_root("logs_every_mismatch_within_its_budget_and_detaches_on_sigterm") {
        return;
    }
    let lab = Lab::new(1500);
    let cg = Cgroup::new();
    let cgroup = cg.path.to_str().unwrap();
    // The emulated NAT-T path has no sec_path (this kernel has no ESP), so this runs the
    // address-scope fallback; the VM suite runs SA scope on real ESP-in-UDP.
    let pcap = std::env::temp_dir().join(format!("natt-capture-{}.pcapng", std::process::id()));
    let mut d = Daemon::start(&[
        "run",
        "--peer",
        ADDR_A,
        "--cgroup",
        cgroup,
        "--mode",
        "enforce",
        "--scope",
        "address",
        "--capture",
        pcap.to_str().unwrap(),
        // Without pinning the program goes with the process (what this test asserts at the
        // end); the pinned default is tested below.
        "--pin-path",
        "none",
    ]);
    d.wait_for("verifier attached at cgroup_skb ingress");
    let inj = Injector::attach(&lab.b, lab.dev_b, 50);
    let s = stream(
        env!("CARGO_BIN_EXE_natt-peer"),
        &lab,
        &cg.path,
        4 << 20,
        false,
    );
    let injected = inj.stats().corrupted;
    assert!(injected > 0);
    assert_eq!(
        s,
        StreamResult {
            received: 4 << 20,
            differing: 0,
            invisible: 0,
        }
    );
    // The endpoint reports exactly what was injected.
    let (code, body) = d.get("/metrics");
    assert_eq!(code, 200);
    let peer = "peer=\"192.0.2.1/32\",proto=\"tcp\"";
    assert_eq!(
        metric(
            &body,
            &format!("natt_monitor_checksum_mismatches_total{{{peer}}}")
        ),
        Some(injected),
        "{body}"
    );
    assert_eq!(
        metric(
            &body,
            &format!("natt_monitor_dropped_packets_total{{{peer}}}")
        ),
        Some(injected)
    );
    // Every other marked segment is verified, but for the connection's last segments: once the
    // receiver has read the stream and closed, the sender's FIN can arrive to no socket, so no
    // socket filter sees it (seen as one segment short in about one run in three).
    let verified = metric(
        &body,
        &format!("natt_monitor_verified_packets_total{{{peer}}}"),
    )
    .expect("verified series");
    let delivered_to_sockets = inj.stats().marked - injected;
    assert!(
        verified <= delivered_to_sockets && verified + 2 >= delivered_to_sockets,
        "verified {verified} of {delivered_to_sockets} marked intact segments"
    );
    assert_eq!(
        metric(
            &body,
            "natt_monitor_checksum_mismatches_total{peer=\"192.0.2.1/32\",proto=\"udp\"}"
        ),
        Some(0)
    );
    assert_eq!(metric(&body, "natt_monitor_up"), Some(1));
    assert_eq!(
        metric(&body, "natt_monitor_peers{source=\"static\"}"),
        Some(1)
    );
    assert_eq!(
        metric(
            &body,
            "natt_monitor_skipped_packets_total{reason=\"aggregated\"}"
        ),
        Some(0)
    );
    assert!(metric(&body, "natt_monitor_kernel_tcp_in_csum_errors_total").is_some());
    // The standard process metrics, as any Prometheus client exports them.
    let rss = metric(&body, "process_resident_memory_bytes").expect("process metrics");
    assert!((1 << 20..1 << 30).contains(&rss), "resident memory {rss}");
    assert!(metric(&body, "process_open_fds").is_some_and(|n| n > 3));
    assert_eq!(d.get("/healthz"), (200, "ok\n".to_owned()));
    // Every corrupted copy is compared with TCP's intact retransmission: one byte XORed with
    // 0x5a (four bits) at the middle of the payload, which no shape but `other` describes.
    let shapes = |body: &str, shape: &str| {
        metric(
            body,
            &format!("natt_monitor_corruption_shapes_total{{shape=\"{shape}\"}}"),
        )
        .unwrap_or_else(|| panic!("shape {shape} in {body}"))
    };
    // A corrupted copy of a spurious retransmission (data the receiver had already) gets no
    // retransmission of its own: it waits until the daemon stops and is counted then.
    let deadline = Instant::now() + Duration::from_secs(5);
    let body = loop {
        let (_, body) = d.get("/metrics");
        if shapes(&body, "other") >= injected || Instant::now() > deadline {
            break body;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let paired = shapes(&body, "other");
    for shape in natt_monitor::forensics::Shape::ALL {
        if shape.as_str() != "other" {
            assert_eq!(shapes(&body, shape.as_str()), 0, "{shape}: {body}");
        }
    }
    // Every packet for the capture (each corrupted copy, and one intact retransmission per
    // corrupted segment, fewer when a retransmission was corrupted again) is in the file or
    // counted as left out.
    let capture = |body: &str, result: &str| {
        metric(
            body,
            &format!("natt_monitor_capture_packets_total{{result=\"{result}\"}}"),
        )
        .unwrap_or_else(|| panic!("capture {result} in {body}"))
    };
    let written = capture(&body, "written");
    let left_out = ["rate_limited", "file_full", "ring_full"]
        .iter()
        .map(|r| capture(&body, r))
        .sum::<u64>();
    assert!(
        (injected + 1..=2 * injected).contains(&(written + left_out)),
        "{written} written and {left_out} left out of {injected} corrupted copies and their pairs"
    );
    let (status, lines) = d.stop(libc::SIGTERM);
    assert!(status.success(), "exit status {status}: {lines:?}");

    let warn: Vec<&Value> = lines
        .iter()
        .filter(|v| v["message"] == "checksum mismatch")
        .collect();
    let suppressed_before: u64 = warn.iter().map(|v| field_u64(v, "suppressed_before")).sum();
    let suppressed_at_exit: u64 = lines
        .iter()
        .filter(|v| v["message"] == "mismatch log lines suppressed by the rate limit")
        .map(|v| field_u64(v, "suppressed"))
        .sum();
    eprintln!(
        "injected={injected} logged={} suppressed={}",
        warn.len(),
        suppressed_before + suppressed_at_exit
    );
    assert_eq!(
        warn.len() as u64 + suppressed_before + suppressed_at_exit,
        injected,
        "every mismatch logged or counted"
    );
    let first = warn[0];
    eprintln!("first mismatch line: {first}");
    assert_eq!(first["level"], "WARN");
    assert_eq!(first["peer"], "192.0.2.1/32");
    assert_eq!(first["proto"], "tcp");
    assert_eq!(first["action"], "dropped");
    assert!(
        first["flow"].as_str().unwrap().starts_with("192.0.2.1:"),
        "{first}"
    );
    assert!(
        first["flow"]
            .as_str()
            .unwrap()
            .ends_with(" -> 192.0.2.2:5001"),
        "{first}"
    );
    assert_ne!(first["found"], first["expected"]);
    assert_eq!(first["len"], 1480);
    // Address scope: no SA; the interface is B's veth, by its index in B's namespace.
    assert_eq!(
        (&first["spi"], &first["reqid"]),
        (&Value::from("0x00000000"), &Value::from(0))
    );
    assert_eq!(first["ifindex"], lab.b.enter(|| veth_index(lab.dev_b)));
    let totals = lines
        .iter()
        .find(|v| v["message"] == "peer totals")
        .expect("peer totals line");
    assert_eq!(field_u64(totals, "mismatches"), injected);
    assert_eq!(field_u64(totals, "dropped"), injected);
    assert!(lines.iter().any(|v| v["message"] == "verifier detached"));
    drop(inj);
    assert_no_verifier_loaded();
    // The shape lines: one byte, four bits, at the middle of the payload (after a 32-byte
    // header; every copy paired with a retransmission of its own length).
    let shape_lines: Vec<&Value> = lines
        .iter()
        .filter(|v| v["message"] == "corruption shape, from the intact retransmission")
        .collect();
    let unpaired_at_exit = lines
        .iter()
        .find(|v| {
            v["message"]
                == "corrupted copies still waiting for their retransmission at shutdown, counted unpaired"
        })
        .map_or(0, |v| field_u64(v, "unpaired"));
    assert_eq!(
        paired + unpaired_at_exit,
        injected,
        "paired or counted at exit"
    );
    // Spurious retransmissions are few (up to 5 of about 60 corrupted copies seen here).
    assert!(paired * 4 >= injected * 3, "{paired} of {injected} paired");
    // Within the shape lines' own budget: a burst of 50, then 10 a second.
    assert!(
        shape_lines.len() as u64 >= paired.min(50),
        "{} shape lines for {paired} pairs",
        shape_lines.len()
    );
    for v in &shape_lines {
        let at = 32 + field_u64(v, "compared") / 2;
        assert_eq!(
            (
                &v["shape"],
                &v["runs"],
                &v["changed"],
                &v["bits"],
                &v["cipher_blocks"]
            ),
            (
                &Value::from("other"),
                &Value::from(format!("{at}+1(4b)")),
                &Value::from(1),
                &Value::from(4),
                &Value::from(format!("{0}..{0}", at / 16))
            ),
            "{v}"
        );
    }
    // The capture holds exactly the written packets: corrupt TCP segments from A, whole, each
    // followed by its intact retransmission, whose comment names it and what changed.
    let packets = captured_packets(&pcap);
    assert_eq!(packets.len() as u64, written);
    let mut corrupt = std::collections::HashMap::new();
    let mut paired = 0;
    for (n, (original_len, data, comment)) in packets.iter().enumerate() {
        assert_eq!(
            *original_len as usize,
            data.len(),
            "1500-byte packets fit the snap length"
        );
        let ip = etherparse::Ipv4HeaderSlice::from_slice(data).expect("an IPv4 header");
        assert_eq!(ip.source_addr().to_string(), ADDR_A);
        let tcp = etherparse::TcpHeaderSlice::from_slice(&data[ip.slice().len()..])
            .expect("a TCP header");
        let payload = &data[ip.slice().len() + tcp.slice().len()..];
        let want = tcp
            .to_header()
            .calc_checksum_ipv4(&ip.to_header(), payload)
            .unwrap();
        if let Some(rest) = comment.strip_prefix("natt-monitor: intact retransmission of packet ") {
            assert_eq!(
                tcp.checksum(),
                want,
                "an intact copy whose checksum is wrong"
            );
            let (number, what) = rest.split_once(';').expect(comment);
            let bad: &Vec<u8> = corrupt
                .get(&number.parse::<usize>().expect(comment))
                .expect("names a corrupted copy before it");
            assert_eq!(bad.len(), data.len());
            let diff: Vec<(usize, u8)> = (0..data.len())
                .filter(|&i| bad[i] != data[i] && i >= 20 + 32)
                .map(|i| (i - 20, bad[i] ^ data[i]))
                .collect();
            let at = 32 + (data.len() - 52) / 2;
            assert_eq!(diff, vec![(at, 0x5a)], "packet {}", n + 1);
            assert_eq!(
                what,
                format!(" shape other; changed 1 bytes, 4 bits: {at}+1(4b)"),
                "packet {}",
                n + 1
            );
            paired += 1;
        } else {
            assert_ne!(
                tcp.checksum(),
                want,
                "a corrupted copy whose checksum is right"
            );
            assert!(
                comment.starts_with(
                    "natt-monitor: checksum mismatch, dropped; spi 0x00000000; encap 0->0; checksum "
                ) && comment.ends_with("; peer 192.0.2.1/32"),
                "{comment}"
            );
            corrupt.insert(n + 1, data.clone());
        }
    }
    assert!(paired > 0 && !corrupt.is_empty(), "{paired} pairs");
    // `natt-monitor report` on the capture: the same counts, the shape, the offsets.
    let out = Command::new(monitor_bin())
        .arg("report")
        .arg(&pcap)
        .output()
        .expect("natt-monitor report");
    let _ = std::fs::remove_file(&pcap);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    eprintln!("{text}");
    let n = corrupt.len();
    let line = |prefix: &str| {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} line in:\n{text}"))
            .to_owned()
    };
    assert_eq!(
        line("file "),
        format!(
            "file {}: {written} packets, {n} corrupted copies, {paired} intact retransmissions",
            pcap.display()
        )
    );
    assert_eq!(
        line("peer "),
        "peer 192.0.2.1/32, spi 0x00000000, encap 0->0"
    );
    assert_eq!(
        line("  corrupted copies"),
        format!("  corrupted copies  {n} ({n} dropped, 0 passed)")
    );
    let unpaired = n - paired;
    let shapes = if unpaired == 0 {
        format!("  shapes            other {paired}")
    } else {
        format!("  shapes            other {paired}, unpaired {unpaired}")
    };
    assert_eq!(line("  shapes"), shapes);
    assert_eq!(
        line("  likely layer"),
        format!(
            "  likely layer      {paired} of {paired} paired copies are other: unknown: the changed bytes follow no pattern this tool knows"
        )
    );
}

/// The index of interface `dev` in the calling thread's network namespace.
fn veth_index(dev: &str) -> u64 {
    let name = std::ffi::CString::new(dev).unwrap();
    // SAFETY: a valid NUL-terminated name.
    u64::from(unsafe { libc::if_nametoindex(name.as_ptr()) })
}

/// (original length, data, comment) of every packet in a pcapng file.
fn captured_packets(path: &std::path::Path) -> Vec<(u32, Vec<u8>, String)> {
    let file = std::fs::File::open(path).expect("capture file");
    let mut r = pcap_file::pcapng::PcapNgReader::new(file).expect("a pcapng file");
    let mut out = Vec::new();
    while let Some(block) = r.next_block() {
        if let pcap_file::pcapng::Block::EnhancedPacket(p) = block.expect("a whole block") {
            let comment = p
                .options
                .iter()
                .find_map(|o| match o {
                    pcap_file::pcapng::blocks::enhanced_packet::EnhancedPacketOption::Comment(
                        c,
                    ) => Some(c.to_string()),
                    _ => None,
                })
                .unwrap_or_default();
            out.push((p.original_len, p.data.to_vec(), comment));
        }
    }
    out
}

/// `natt-monitor` with `args`, to completion: (exit code, stdout).
fn output_of(args: &[&str]) -> (i32, String) {
    let out = Command::new(monitor_bin())
        .args(args)
        .output()
        .expect("spawn natt-monitor");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn sigint_leaves_the_pinned_verifier_attached_and_detach_removes_it() {
    if skip_unless_root("sigint_leaves_the_pinned_verifier_attached_and_detach_removes_it") {
        return;
    }
    let cg = Cgroup::new();
    let pins = PinDir::new();
    let mut d = Daemon::start(&[
        "run",
        "--peer",
        "2001:db8::/32",
        "--cgroup",
        cg.path.to_str().unwrap(),
        "--pin-path",
        pins.arg(),
    ]);
    d.wait_for("verifier attached at cgroup_skb ingress");
    // While the daemon runs, `detach` refuses, naming it: detaching would make it exit and its
    // supervisor attach it again. The daemon stays healthy and the pins stay.
    let (code, err) = run_to_end(&["detach", "--pin-path", pins.arg()]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(
        err,
        format!(
            "natt-monitor: error: --pin-path {}: a running natt-monitor (pid {}) uses this verifier; detached now, it would exit and systemd or Kubernetes would start it again, attaching anew. Stop it first (`systemctl stop natt-monitor`, `podman stop`, or delete the DaemonSet), then detach\n",
            pins.arg(),
            d.child.id()
        )
    );
    assert!(pins.path.join("link").exists());
    assert_eq!(d.get("/healthz").0, 200);
    let (status, lines) = d.stop(libc::SIGINT);
    assert!(status.success(), "exit status {status}: {lines:?}");
    assert!(lines.iter().any(|v| v["message"]
        == "the verifier stays attached, pinned with its maps: the next natt-monitor adopts it; `natt-monitor detach` removes it"));
    assert!(!lines.iter().any(|v| v["message"] == "verifier detached"));
    let link = natt_monitor::pin::Link::open(&pins.path.join("link")).expect("a pinned link");
    let info = link.info().expect("link info");
    drop(link);
    assert!(info.attached(), "{info:?}");
    // `check` reports it, naming the program and the cgroup by id (a test cgroup is not the
    // cgroup2 mount).
    let (code, out) = output_of(&["check", "--pin-path", pins.arg()]);
    assert_eq!(code, 0, "{out}");
    let pinned = out
        .lines()
        .find(|l| l.starts_with("info  pinned"))
        .unwrap_or_else(|| panic!("no pinned line in {out}"));
    assert!(
        pinned.contains(&format!(
            "{}: link {} runs program id {} at cgroup id ",
            pins.arg(),
            info.id,
            info.prog_id
        )) && pinned.contains(
            "13 of 13 maps (PEERS_V4, PEERS_V6, PEER_STATS, ICMP_STATS, SCTP_STATS, COUNTERS, SA_TRUST, MAPPINGS, TRUST_COUNTERS, EVENTS, LEARNING, JUMP, SCTP_JUMP)"
        ),
        "{pinned}"
    );
    // `detach` removes it all, and says what it removed; a second time there is nothing. Given
    // the configuration file (as the package's removal script gives it), it detaches where the
    // file's `pin_path` pinned.
    let cfg = std::env::temp_dir().join(natt_monitor_tests::net::unique("natt-detach-cfg-"));
    std::fs::write(&cfg, format!("pin_path = \"{}\"\n", pins.arg())).unwrap();
    let (code, out) = output_of(&["detach", "--config", cfg.to_str().unwrap()]);
    let _ = std::fs::remove_file(&cfg);
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out,
        format!(
            "detached link {} (program id {}) from cgroup id {}\n\
             removed maps: PEERS_V4, PEERS_V6, PEER_STATS, ICMP_STATS, SCTP_STATS, COUNTERS, SA_TRUST, MAPPINGS, TRUST_COUNTERS, EVENTS, LEARNING, JUMP, SCTP_JUMP\n\
             removed {}\n",
            info.id,
            info.prog_id,
            info.cgroup_id,
            pins.arg()
        )
    );
    assert_no_verifier_loaded();
    assert_eq!(
        output_of(&["detach", "--pin-path", pins.arg()]),
        (0, format!("nothing pinned at {}\n", pins.arg()))
    );
}

/// `detach --config` reads the file as `run` would: `none` has nothing to detach, a bad value
/// is a configuration error naming the key, and the file and `--pin-path` exclude each other.
#[test]
fn detach_takes_the_pin_path_from_the_configuration_file() {
    let dir = std::env::temp_dir().join(natt_monitor_tests::net::unique("natt-detach-"));
    std::fs::create_dir_all(&dir).unwrap();
    let none = dir.join("none.toml");
    std::fs::write(&none, "pin_path = \"none\"\n").unwrap();
    assert_eq!(
        output_of(&["detach", "--config", none.to_str().unwrap()]),
        (
            0,
            "nothing to detach: the configuration sets pin_path = \"none\", so the verifier goes with its process\n".to_owned()
        )
    );
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "pin_path = \"pins\"\n").unwrap();
    let (code, err) = run_to_end(&["detach", "--config", bad.to_str().unwrap()]);
    assert_eq!(code, 78, "{err}");
    assert_eq!(
        err,
        format!(
            "natt-monitor: error: --config {} key `pin_path`: `pins` is not an absolute directory path or `none`\n",
            bad.display()
        )
    );
    let (code, err) = run_to_end(&[
        "detach",
        "--config",
        none.to_str().unwrap(),
        "--pin-path",
        "/sys/fs/bpf/x",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("cannot be used with"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_units_three_capabilities_suffice_to_pin_adopt_and_detach() {
    if skip_unless_root("the_units_three_capabilities_suffice_to_pin_adopt_and_detach") {
        return;
    }
    // As deploy/systemd/natt-monitor.service runs it: uid 0 holding only CAP_BPF, CAP_PERFMON
    // and CAP_NET_ADMIN, so no CAP_DAC_OVERRIDE to reach into bpffs and no CAP_SYS_ADMIN to
    // mount it (systemd mounts it at boot; here the test does).
    let cg = Cgroup::new();
    let pins = PinDir::new();
    natt_monitor::pin::prepare(&pins.path).expect("bpffs");
    std::fs::remove_dir(&pins.path).expect("the daemon creates the directory itself");
    let restricted = |args: &[&str]| {
        let mut cmd = Command::new("setpriv");
        cmd.args([
            "--bounding-set=-all,+bpf,+perfmon,+net_admin",
            "--inh-caps=-all",
            "--",
        ])
        .arg(monitor_bin())
        .args(args);
        cmd
    };
    let run = one_peer_run(
        cg.path.to_str().unwrap(),
        &[
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--pin-path",
            pins.arg(),
        ],
    );
    for (round, message) in [
        "pinned the verifier's link and maps: they outlive this process",
        "adopted the pinned link: its program was replaced by this one in one atomic update, with no segment unverified",
    ]
    .into_iter()
    .enumerate()
    {
        let mut child = KillOnDrop(
            restricted(&run)
                .stderr(Stdio::piped())
                .spawn()
                .expect("setpriv"),
        );
        let err = child.stderr.take().unwrap();
        let mut lines = BufReader::new(err).lines().map_while(Result::ok);
        let seen: Vec<String> = lines
            .by_ref()
            .take_while(|l| !l.contains("verifier attached at cgroup_skb ingress"))
            .collect();
        assert!(
            seen.iter().any(|l| l.contains(message)),
            "round {round}: no {message:?} in {seen:?}"
        );
        // Once attached, the running daemon holds only CAP_BPF (bit 39) and CAP_NET_ADMIN
        // (bit 12): CAP_PERFMON went after the load.
        let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
        for set in ["CapEff:", "CapPrm:"] {
            let line = status.lines().find(|l| l.starts_with(set)).unwrap();
            assert_eq!(
                line.split_whitespace().nth(1),
                Some("0000008000001000"),
                "round {round}: {line}"
            );
        }
        // SAFETY: kill has no memory preconditions.
        unsafe { libc::kill(i32::try_from(child.id()).unwrap(), libc::SIGTERM) };
        let status = child.wait().unwrap();
        let rest: Vec<String> = lines.collect();
        assert!(status.success(), "round {round}: {status}: {rest:?}");
    }
    let out = restricted(&["detach", "--pin-path", pins.arg()])
        .output()
        .expect("setpriv");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.starts_with("detached link "), "{text}");
    assert_no_verifier_loaded();
}

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
    let mut cmd = Command::new(monitor_bin());
    cmd.args(one_peer_run(
        cg.path.to_str().unwrap(),
        &["--listen", "127.0.0.1:0", "--pin-path", pins.arg()],
    ))
    .env("NOTIFY_SOCKET", &path)
    .env("WATCHDOG_USEC", "200000")
    .stderr(Stdio::null());
    let mut child = KillOnDrop(cmd.spawn().expect("spawn"));
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
    // SAFETY: kill has no memory preconditions.
    unsafe { libc::kill(i32::try_from(child.id()).unwrap(), libc::SIGTERM) };
    let mut last = next();
    while last == "WATCHDOG=1" {
        last = next();
    }
    assert_eq!(last, "STOPPING=1");
    assert!(child.wait().unwrap().success());
    let _ = std::fs::remove_file(&path);
}

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
    d.wait_for("verifier attached at cgroup_skb ingress");
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
    let mut d = Daemon::start(&[
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
    d.wait_for("verifier attached at cgroup_skb ingress");
    let (_, body) = d.get("/metrics");
    assert_eq!(metric(&body, "natt_monitor_bpf_stats_enabled"), Some(0));
    assert_eq!(metric(&body, "natt_monitor_program_runs_total"), Some(0));
    let stats = Sysctl::set("/proc/sys/kernel/bpf_stats_enabled", "1");
    let _inj = Injector::attach(&lab.b, lab.dev_b, 0);
    let s = stream(
        env!("CARGO_BIN_EXE_natt-peer"),
        &lab,
        &cg.path,
        1 << 20,
        false,
    );
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

/// Long enough that the kill and the restart happen while it flows (about 2 s here).
const RESTART_BYTES: u64 = 1 << 30;

/// The TCP mismatch and drop counts of the one peer `192.0.2.1/32` in a scrape.
fn tcp_counts(body: &str) -> (u64, u64, u64) {
    let peer = "peer=\"192.0.2.1/32\",proto=\"tcp\"";
    let get = |name: &str| {
        metric(body, &format!("natt_monitor_{name}{{{peer}}}"))
            .unwrap_or_else(|| panic!("{name} in {body}"))
    };
    (
        get("verified_packets_total"),
        get("checksum_mismatches_total"),
        get("dropped_packets_total"),
    )
}

#[test]
fn sigkill_mid_stream_in_enforce_mode_loses_no_protection_and_no_count() {
    if skip_unless_root("sigkill_mid_stream_in_enforce_mode_loses_no_protection_and_no_count") {
        return;
    }
    handover_mid_stream(&monitor_bin(), libc::SIGKILL);
}

/// An upgrade from the previous release's binary (built from its commit by `cargo xtask test`,
/// in `NATT_PREVIOUS_BIN`) to this one, the way a package upgrade does it: the old daemon is
/// stopped with SIGTERM mid-stream in enforce mode, leaving its pins; the new one adopts its
/// maps and swaps its program into the old link.
#[test]
fn an_upgrade_from_the_previous_release_loses_no_protection_and_no_count() {
    if skip_unless_root("an_upgrade_from_the_previous_release_loses_no_protection_and_no_count") {
        return;
    }
    let previous = std::env::var("NATT_PREVIOUS_BIN").unwrap_or_else(|_| {
        "skip:NATT_PREVIOUS_BIN is not set (`cargo xtask test` builds the previous release and sets it)".into()
    });
    if let Some(why) = previous.strip_prefix("skip:") {
        eprintln!(
            "SKIP an_upgrade_from_the_previous_release_loses_no_protection_and_no_count: {why}"
        );
        return;
    }
    handover_mid_stream(std::path::Path::new(&previous), libc::SIGTERM);
}

/// In enforce mode, a daemon of `first_bin` is stopped with `stop` while a stream with
/// corruption flows, and this build's daemon starts on the same pins: not one corrupted byte
/// reaches the application, every corruption is counted and dropped across both daemons and
/// the gap, and the second daemon reports the same totals as its metrics.
#[expect(clippy::too_many_lines, reason = "one scenario, asserted end to end")]
fn handover_mid_stream(first_bin: &std::path::Path, stop: i32) {
    let lab = Lab::new(1500);
    let cg = Cgroup::new();
    let pins = PinDir::new();
    let args = [
        "run",
        "--peer",
        ADDR_A,
        "--cgroup",
        cg.path.to_str().unwrap(),
        "--mode",
        "enforce",
        "--scope",
        "address",
        "--pin-path",
        pins.arg(),
    ];
    let mut first = Daemon::start_bin(first_bin, &args);
    first.wait_for("verifier attached at cgroup_skb ingress");
    let inj = Injector::attach(&lab.b, lab.dev_b, 50);
    let peer = env!("CARGO_BIN_EXE_natt-peer");
    let sender = std::thread::scope(|scope| {
        let streaming = scope.spawn(|| stream(peer, &lab, &cg.path, RESTART_BYTES, false));
        // Corruption is being dropped under the first daemon...
        let deadline = Instant::now() + Duration::from_secs(20);
        let at_kill = loop {
            let (_, body) = first.get("/metrics");
            let counts = tcp_counts(&body);
            if counts.2 >= 20 {
                break counts;
            }
            assert!(Instant::now() < deadline, "no drops within 20 s: {body}");
            std::thread::sleep(Duration::from_millis(20));
        };
        // ...when it is killed without a chance to clean up, or stopped for an upgrade.
        first.signal(stop);
        let (status, lines) = first.wait_exit(Duration::from_secs(10));
        if stop == libc::SIGKILL {
            assert_eq!(status.signal(), Some(libc::SIGKILL));
        } else {
            assert!(status.success(), "{lines:?}");
        }
        let corrupted_at_kill = inj.stats().corrupted;
        // No daemon runs: the pinned program keeps verifying and dropping.
        std::thread::sleep(Duration::from_millis(300));
        let corrupted_while_down = inj.stats().corrupted - corrupted_at_kill;
        let mut second = Daemon::start(&args);
        second.wait_for("verifier attached at cgroup_skb ingress");
        assert_eq!(
            second
                .messages("adopting the pinned maps: counts, peers and learned residuals continue")
                .len(),
            1
        );
        let adopted = second.messages("adopted the pinned link: its program was replaced by this one in one atomic update, with no segment unverified");
        assert_eq!(adopted.len(), 1, "{:?}", second.lines.lock().unwrap());
        // The counts continued: nothing was reset, and what happened while no daemon ran is in.
        let (_, body) = second.get("/metrics");
        let after = tcp_counts(&body);
        assert!(
            after.0 > at_kill.0 && after.1 > at_kill.1 && after.2 > at_kill.2,
            "counts at the kill {at_kill:?}, after the restart {after:?}"
        );
        assert!(
            !streaming.is_finished(),
            "the stream ended before the second daemon adopted the verifier; make it longer"
        );
        let s = streaming.join().expect("stream thread");
        // Nothing was lost (what differed is checked below, against the mismatch count).
        assert_eq!(s.received, RESTART_BYTES);
        eprintln!(
            "corrupted: {} in all, {corrupted_while_down} in the 300 ms without a daemon; counts at the kill {at_kill:?}, after the restart {after:?}",
            inj.stats().corrupted
        );
        assert!(
            corrupted_while_down > 0,
            "traffic flowed while no daemon ran"
        );
        (second, s)
    });
    let (sender, s) = sender;
    let injected = inj.stats().corrupted;
    // Across both daemons and the gap between them, every injected corruption was counted and
    // dropped, and the second daemon reports all of it.
    let (_, body) = sender.get("/metrics");
    let (_, mismatches, dropped) = tcp_counts(&body);
    let partial = metric(
        &body,
        "natt_monitor_skipped_packets_total{reason=\"partial_checksum\"}",
    )
    .unwrap_or(0);
    assert!(
        mismatches <= injected && mismatches + partial >= injected,
        "mismatches {mismatches} for {injected} injected ({partial} look-alike partial-checksum skips)"
    );
    assert_eq!(dropped, mismatches, "every mismatch dropped");
    // Not one corrupted byte reached the application, but for a corrupted segment that address
    // scope's look-alike partial-checksum skip let through (about one run in four streams a
    // GiB with one; SA scope has no such skip): at most one byte per corruption not counted.
    assert!(
        s.differing <= injected - mismatches,
        "{} bytes differ, but only {} corrupted segments were not dropped",
        s.differing,
        injected - mismatches
    );
    let (status, lines) = sender.stop(libc::SIGTERM);
    assert!(status.success(), "{lines:?}");
    let totals = lines
        .iter()
        .find(|v| v["message"] == "peer totals")
        .expect("peer totals line");
    assert_eq!(field_u64(totals, "mismatches"), mismatches);
    assert_eq!(field_u64(totals, "dropped"), dropped);
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
    let mut d = Daemon::start(&[
        "run",
        "--discover",
        "xfrm",
        "--cgroup",
        cg.path.to_str().unwrap(),
    ]);
    d.wait_for("verifier attached at cgroup_skb ingress");
    let read = d.messages("XFRM discovery: read the kernel's SAs");
    assert_eq!(read.len(), 1, "{:?}", d.lines.lock().unwrap());
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
    let mut d = Daemon::start(&["run", "--config", cfg.to_str().unwrap()]);
    d.wait_for("verifier attached at cgroup_skb ingress");
    let inj = Injector::attach(&lab.b, lab.dev_b, 50);
    let s = stream(
        env!("CARGO_BIN_EXE_natt-peer"),
        &lab,
        &cg.path,
        2 << 20,
        false,
    );
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

/// Every injected corruption was counted, but for look-alikes: `partial_checksum` counts
/// segments whose checksum field holds only the pseudo-header sum, a corrupted one that happens
/// to look so or an intact `CHECKSUM_PARTIAL` one (one fresh-clone run in nine saw one), so it
/// bounds what was missed rather than equalling it.
fn assert_counted(counted: u64, injected: u64, look_alike: u64) {
    assert!(
        counted <= injected && counted + look_alike >= injected,
        "{counted} of {injected} corruptions counted, {look_alike} look-alike partial checksums"
    );
}

/// Address scope never drops on a guess, shown on one daemon in enforce mode: a peer that learns
/// its residual (IPv4, `learn_residual = true`) runs in observe mode, so every corruption from it
/// is counted and reaches the application; a peer whose residual is exact (IPv6, no NAT) is
/// enforced, so every corruption from it is dropped and its stream arrives byte for byte.
#[test]
fn address_scope_enforces_exact_peers_and_only_observes_learned_ones() {
    if skip_unless_root("address_scope_enforces_exact_peers_and_only_observes_learned_ones") {
        return;
    }
    let lab = Lab::new(1500);
    let cg = Cgroup::new();
    let dir = std::env::temp_dir().join(format!("natt-daemon-addr-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("natt-monitor.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:0\"\ncgroup = \"{}\"\nmode = \"enforce\"\nscope = \"address\"\n\
             [[peer]]\ncidr = \"{ADDR_A}\"\nlearn_residual = true\n\
             [[peer]]\ncidr = \"{ADDR6_A}\"\n",
            cg.path.display()
        ),
    )
    .unwrap();
    let mut d = Daemon::start(&["run", "--config", cfg.to_str().unwrap()]);
    d.wait_for("verifier attached at cgroup_skb ingress");
    let held_back = d.messages(OBSERVE_ONLY);
    assert_eq!(held_back.len(), 1, "{:?}", d.lines.lock().unwrap());
    assert_eq!(field_u64(&held_back[0], "peers"), 1);
    let (_, body) = d.get("/metrics");
    assert_eq!(metric(&body, "natt_monitor_peers_observe_only"), Some(1));

    let inj = Injector::attach(&lab.b, lab.dev_b, 50);
    let peer_bin = env!("CARGO_BIN_EXE_natt-peer");
    let bytes: u64 = 4 << 20;
    let counts = |body: &str, peer: &str, proto: &str| -> [u64; 4] {
        let m = |name: &str| {
            metric(
                body,
                &format!("{name}{{peer=\"{peer}\",proto=\"{proto}\"}}"),
            )
            .unwrap_or(0)
        };
        [
            m("natt_monitor_verified_packets_total"),
            m("natt_monitor_checksum_mismatches_total"),
            m("natt_monitor_dropped_packets_total"),
            m("natt_monitor_learning_mismatches_total"),
        ]
    };
    let partial = |body: &str| {
        metric(
            body,
            "natt_monitor_skipped_packets_total{reason=\"partial_checksum\"}",
        )
        .unwrap_or(0)
    };

    // The learned peer: observed, so corruption is counted and delivered.
    let learned = stream(peer_bin, &lab, &cg.path, bytes, false);
    let injected = inj.stats().corrupted;
    let (_, body) = d.get("/metrics");
    let [verified, mismatches, dropped, while_learning] = counts(&body, "192.0.2.1/32", "tcp");
    let look_alike = partial(&body);
    eprintln!(
        "learned peer: {learned:?}, injected {injected}, verified {verified}, mismatches {mismatches}, dropped {dropped}, while learning {while_learning}, partial_checksum {look_alike}"
    );
    assert!(injected > 0 && verified > 0);
    assert_eq!(learned.received, bytes);
    assert_eq!(
        dropped, 0,
        "a learned residual is never enforced under address scope"
    );
    assert_counted(mismatches + while_learning, injected, look_alike);
    assert!(
        learned.differing > 0,
        "observe mode delivers what it counts"
    );

    // The exact peer: enforced, so corruption is dropped and TCP retransmits it.
    let exact = stream(peer_bin, &lab, &cg.path, bytes, true);
    let injected6 = inj.stats().corrupted - injected;
    let (_, body) = d.get("/metrics");
    let [verified6, mismatches6, dropped6, _] = counts(&body, "2001:db8:77::1/128", "tcp");
    let look_alike6 = partial(&body) - look_alike;
    eprintln!(
        "exact peer: {exact:?}, injected {injected6}, verified {verified6}, mismatches {mismatches6}, dropped {dropped6}, partial_checksum {look_alike6}"
    );
    assert!(injected6 > 0 && verified6 > 0);
    assert_counted(mismatches6, injected6, look_alike6);
    assert_eq!(
        dropped6, mismatches6,
        "every mismatch of the exact peer dropped"
    );
    assert_eq!(exact.received, bytes);
    assert!(
        exact.differing <= look_alike6,
        "{} bytes differ with {look_alike6} look-alike skips",
        exact.differing
    );
    // The learned peer's counts did not move while the exact one streamed.
    assert_eq!(counts(&body, "192.0.2.1/32", "tcp")[2], 0);

    let (status, _) = d.stop(libc::SIGTERM);
    assert!(status.success());
    drop(inj);
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

/// Rewrites every residual in the pinned `SA_TRUST` of `pins` to `residual`, as if the SA had
/// learned it from a flood.
fn poison_pinned_residuals(pins: &std::path::Path, residual: u16) -> usize {
    let data = aya::maps::MapData::from_pin(pins.join("SA_TRUST")).expect("pinned residuals");
    let mut map: aya::maps::HashMap<_, monitor_ebpf::SaKey, monitor_ebpf::SaTrust> =
        aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(data)).expect("an LRU hash");
    let keys: Vec<_> = map.keys().map(Result::unwrap).collect();
    for k in &keys {
        let mut value = map.get(k, 0).expect("read the residual");
        value.expected_residual = residual;
        map.insert(k, &value, 0).expect("rewrite the residual");
    }
    keys.len()
}

const OBSERVE_ONLY: &str = "address scope: peers whose NAT residual is learned run in observe mode, whatever their mode says (a learned residual is a guess there; enforce needs an exact one: configure the peer's original addresses, or run on a kernel with BTF for SA scope); natt_monitor_peers_observe_only counts them";

const WITHDRAWN: &str = "learned NAT residual withdrawn: consecutive distinct segments of the SA all left one other value and none verified in between, so it refused intact traffic; learning again";

/// Learning under attack, end to end: a peer whose SA holds a wrong learned residual (here
/// written into the pinned map between two daemons, as a flood while it learned would leave it)
/// has its intact segments refused. The verifier withdraws the residual after 16 consecutive
/// distinct segments leave the true value, and the daemon learns it again. (This host has no
/// ESP, so the lab runs address scope, where a learned peer is observed whatever its mode says:
/// the enforce mode the file asks for is refused with a warning, and nothing is dropped. The VM
/// suite drops under SA scope.)
#[test]
fn a_wrong_learned_residual_is_withdrawn_by_the_verifier_and_learned_again() {
    if skip_unless_root("a_wrong_learned_residual_is_withdrawn_by_the_verifier_and_learned_again") {
        return;
    }
    let lab = Lab::new(1500);
    let cg = Cgroup::new();
    let pins = PinDir::new();
    let dir = std::env::temp_dir().join(format!("natt-daemon-withdraw-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("natt-monitor.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\nmode = \"enforce\"\nscope = \"address\"\n\n[[peer]]\ncidr = \"{ADDR_A}\"\nlearn_residual = true\n"
        ),
    )
    .unwrap();
    let args = [
        "run",
        "--config",
        config.to_str().unwrap(),
        "--cgroup",
        cg.path.to_str().unwrap(),
        "--pin-path",
        pins.arg(),
    ];
    let peer = env!("CARGO_BIN_EXE_natt-peer");
    // The first daemon learns the lab's true residual (0: no NAT) and leaves it pinned.
    let mut first = Daemon::start(&args);
    first.wait_for("verifier attached at cgroup_skb ingress");
    let refused = first.messages(OBSERVE_ONLY);
    assert_eq!(refused.len(), 1, "{:?}", first.lines.lock().unwrap());
    assert_eq!(field_u64(&refused[0], "peers"), 1);
    let s = stream(peer, &lab, &cg.path, 1 << 20, false);
    assert_eq!((s.received, s.differing), (1 << 20, 0));
    first.wait_for("NAT residual learned; verifying this SA from now on");
    let (status, _) = first.stop(libc::SIGINT);
    assert!(status.success());
    // What a flood would have left: a wrong residual for the mapping.
    assert_eq!(poison_pinned_residuals(&pins.path, 0x0bad), 1);
    let mut second = Daemon::start(&args);
    second.wait_for("verifier attached at cgroup_skb ingress");
    assert_eq!(
        second
            .messages("adopting the pinned maps: counts, peers and learned residuals continue")
            .len(),
        1
    );
    let (_, before) = second.get("/metrics");
    let (verified_before, mismatches_before, dropped_before) = tcp_counts(&before);
    assert_eq!((mismatches_before, dropped_before), (0, 0));
    // Twenty connections at once: their SYNs are twenty distinct segments, all refused. (One
    // connection alone would only retransmit its one SYN, which counts once: see testrun.rs,
    // `a_residual_is_withdrawn_only_by_an_unbroken_streak_of_distinct_segments`.)
    std::thread::scope(|scope| {
        let streams: Vec<_> = (0..20u16)
            .map(|i| {
                let (lab, cg) = (&lab, &cg);
                scope.spawn(move || {
                    let addr = format!("{ADDR_B}:{}", 5101 + i);
                    stream_between(peer, &lab.a, &lab.b, &addr, &cg.path, 1 << 20)
                })
            })
            .collect();
        for s in streams {
            let s = s.join().expect("stream thread");
            assert_eq!(
                (s.received, s.differing),
                (1 << 20, 0),
                "a stream did not survive"
            );
        }
    });
    second.wait_for("NAT residual learned; verifying this SA from now on");
    let withdrawn = second.messages(WITHDRAWN);
    assert_eq!(withdrawn.len(), 1, "{:?}", second.lines.lock().unwrap());
    assert_eq!(withdrawn[0]["learned"], "0x0bad");
    assert_eq!(withdrawn[0]["found"], "0x0000");
    assert_eq!(field_u64(&withdrawn[0], "segments"), 16);
    let relearned = second.messages("NAT residual learned; verifying this SA from now on");
    assert_eq!(relearned.len(), 1);
    assert_eq!(relearned[0]["residual"], "0x0000");
    let (_, body) = second.get("/metrics");
    assert_eq!(
        metric(&body, "natt_monitor_residuals_withdrawn_total"),
        Some(1)
    );
    let (verified, mismatches, dropped) = tcp_counts(&body);
    // Observed, not dropped: the 16 that decided, and any segment of the twenty connections
    // judged before the withdrawal reached the ring. Then the streams were verified.
    assert_eq!(dropped, 0);
    assert!(mismatches >= 16, "{mismatches} mismatches");
    assert!(
        verified > verified_before + 1000,
        "{verified_before} -> {verified}"
    );
    eprintln!(
        "wrong residual withdrawn after {mismatches} refused segments; {} segments verified after relearning",
        verified - verified_before
    );
    let (status, _) = second.stop(libc::SIGTERM);
    assert!(status.success());
    let _ = std::fs::remove_dir_all(&dir);
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
    let mut d = Daemon::start(&[
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
    d.wait_for("verifier attached at cgroup_skb ingress");
    let inj = Injector::attach(&lab.b, lab.dev_b, 50);
    let s = stream(
        env!("CARGO_BIN_EXE_natt-peer"),
        &lab,
        &cg.path,
        4 << 20,
        false,
    );
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

/// `--max-peers` sizes the maps: a restart with another size replaces the pinned maps (and says
/// so), one with the same size adopts them.
#[test]
fn another_max_peers_replaces_the_pinned_maps() {
    if skip_unless_root("another_max_peers_replaces_the_pinned_maps") {
        return;
    }
    let cg = Cgroup::new();
    let pins = PinDir::new();
    let cgroup = cg.path.to_str().unwrap();
    let args = |n: &'static str| {
        [
            "run",
            "--peer",
            ADDR_A,
            "--cgroup",
            cgroup,
            "--scope",
            "address",
            "--pin-path",
            pins.arg(),
            "--max-peers",
            n,
        ]
    };
    let adopting = "adopting the pinned maps: counts, peers and learned residuals continue";
    let replaced = "the pinned maps do not fit this build or this --max-peers; replaced them, so the counts start again";
    for (n, adopts, replaces) in [("2", 0, 0), ("4", 0, 1), ("4", 1, 0)] {
        let mut d = Daemon::start(&args(n));
        d.wait_for("verifier attached at cgroup_skb ingress");
        let (_, body) = d.get("/metrics");
        assert_eq!(
            metric(&body, "natt_monitor_peers_limit"),
            Some(n.parse().unwrap())
        );
        assert_eq!(
            (d.messages(adopting).len(), d.messages(replaced).len()),
            (adopts, replaces),
            "--max-peers {n}: {:?}",
            d.lines.lock().unwrap()
        );
        let (status, _) = d.stop(libc::SIGINT);
        assert!(status.success());
    }
}
