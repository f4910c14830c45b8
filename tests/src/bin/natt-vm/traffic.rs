//! The traffic of a scenario: TCP streams through the SAs and plaintext beside them.

use std::{
    net::UdpSocket,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use natt_monitor_tests::net::Netns;

use crate::{
    plan::{Addrs, PLAINTEXT_DATAGRAMS, PLAINTEXT_PORT},
    processes::{bin, metric, scrape},
    scenarios::Scenario,
    strongswan::swanctl,
    topology::{Topology, ns_out},
};

/// Streams `bytes` of the pattern from A to B's receiver (inside `cgroup`); returns (received,
/// differing bytes).
///
/// A corruption whose bytes leave the one's-complement sum unchanged (random corruption does
/// about once in 65,535) is one no TCP checksum can see: it is delivered as intact, by the
/// kernel without natt-monitor and by natt-monitor alike. The receiver finds such runs of
/// differing bytes; they are left out of the differing bytes returned, printed, and taken
/// off what `Topology::injected` counts, so that every assertion still holds exactly for the
/// corruptions a checksum can see. A delivered corruption it could see still fails them.
pub(crate) fn stream(t: &Topology, cgroup: &Path, bytes: u64, port: u16) -> (u64, u64) {
    stream_from(t, &t.a, cgroup, bytes, port)
}

/// As `stream`, from `from` (A, or A2 in the shared-NAT scenario).
pub(crate) fn stream_from(
    t: &Topology,
    from: &Netns,
    cgroup: &Path,
    bytes: u64,
    port: u16,
) -> (u64, u64) {
    let r = stream_with(t, from, cgroup, bytes, port, &[]);
    if r.invisible > 0 {
        eprintln!(
            "natt-vm: port {port}: {} corrupted segment(s) delivered with the checksum's \
             sum unchanged ({} bytes): invisible to any checksum, not counted as injected",
            r.invisible, r.invisible_bytes
        );
        t.add_invisible(r.invisible);
    }
    (r.received, r.differing - r.invisible_bytes)
}

/// What `natt-peer recv` reported.
pub(crate) struct Receiver {
    pub(crate) received: u64,
    /// Bytes that differ from what was sent.
    pub(crate) differing: u64,
    /// Runs of differing bytes that left the one's-complement sum unchanged, and their bytes.
    pub(crate) invisible: u64,
    pub(crate) invisible_bytes: u64,
}

/// Streams `bytes` from `from` to B's receiver (inside `cgroup`), with `extra` arguments to
/// both ends (`--sctp`), and returns what the receiver reported, as it reported it.
pub(crate) fn stream_with(
    t: &Topology,
    from: &Netns,
    cgroup: &Path,
    bytes: u64,
    port: u16,
    extra: &[&str],
) -> Receiver {
    stream_to(t, from, cgroup, t.addrs.b, bytes, port, extra)
}

/// As `stream_with`, to B's address `to` (a tunnel's inner address).
pub(crate) fn stream_to(
    t: &Topology,
    from: &Netns,
    cgroup: &Path,
    to: &str,
    bytes: u64,
    port: u16,
    extra: &[&str],
) -> Receiver {
    let mut recv = Command::new(bin("natt-peer"))
        .args(["recv", "--netns", &t.b.name, "--cgroup"])
        .arg(cgroup)
        .args([
            "--listen",
            &Addrs::sock(to, port),
            "--bytes",
            &bytes.to_string(),
        ])
        .args(fill_args(t))
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn natt-peer recv");
    let mut out = recv.stdout.take().expect("piped");
    let mut ready = [0u8; 6];
    std::io::Read::read_exact(&mut out, &mut ready).expect("receiver READY");
    let send = Command::new(bin("natt-peer"))
        .args(["send", "--netns", &from.name, "--connect"])
        .arg(Addrs::sock(to, port))
        .args(["--bytes", &bytes.to_string()])
        .args(fill_args(t))
        .args(extra)
        .output()
        .expect("natt-peer send");
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).expect("receiver output");
    let mut errors = String::new();
    if let Some(mut e) = recv.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut errors);
    }
    let status = recv.wait().expect("receiver exit");
    assert!(
        send.status.success() && status.success(),
        "stream to port {port} failed: sender {}: {} receiver {status}: {rest}{errors}",
        send.status,
        String::from_utf8_lossy(&send.stderr).trim_end()
    );
    let field = |k: &str| -> u64 {
        rest.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {k} in {rest:?}"))
    };
    Receiver {
        received: field("received="),
        differing: field("differing="),
        invisible: field("invisible="),
        invisible_bytes: field("invisible_bytes="),
    }
}

/// `natt-peer`'s `--fill` arguments for the topology's streams.
fn fill_args(t: &Topology) -> Vec<String> {
    t.fill
        .map(|b| vec!["--fill".to_owned(), b.to_string()])
        .unwrap_or_default()
}

/// Sends `PLAINTEXT_DATAGRAMS` UDP datagrams from A to B (no policy covers UDP) and, with
/// `tcp`, a TCP stream on a port whose policies bypass IPsec; returns the summary and the
/// mismatches counted meanwhile.
pub(crate) fn plaintext(t: &Topology, s: &Scenario, cg: &Path, tcp: bool) -> (String, u64) {
    let mismatches = |text: &str| -> u64 {
        text.lines()
            .filter(|l| l.starts_with("natt_monitor_checksum_mismatches_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    let before = mismatches(&scrape(t.mon()));
    let x = t.addrs;
    let rx = t.b.enter(|| {
        let s = UdpSocket::bind(Addrs::sock(x.b, PLAINTEXT_PORT)).expect("bind plaintext UDP");
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .expect("timeout");
        s
    });
    t.a.enter(|| {
        let tx = UdpSocket::bind(Addrs::sock(x.any, 0)).expect("bind sender");
        for i in 0..PLAINTEXT_DATAGRAMS {
            let msg = vec![i as u8; 200 + i as usize];
            tx.send_to(&msg, Addrs::sock(x.b, PLAINTEXT_PORT))
                .expect("send plaintext datagram");
        }
    });
    let mut got = 0u64;
    let mut buf = [0u8; 2048];
    while let Ok(n) = rx.recv(&mut buf) {
        let i = got;
        if n == 200 + i as usize && buf[..n].iter().all(|b| *b == i as u8) {
            got += 1;
        }
    }
    let mut summary = format!("udp={got}/{PLAINTEXT_DATAGRAMS}");
    if tcp {
        t.allow_plaintext_tcp(s);
        let (received, differing) = stream(t, cg, 256 << 10, PLAINTEXT_PORT);
        summary.push_str(if (received, differing) == (256 << 10, 0) {
            ",tcp=exact"
        } else {
            ",tcp=DAMAGED"
        });
    }
    std::thread::sleep(Duration::from_millis(300));
    (summary, mismatches(&scrape(t.mon())) - before)
}

/// Streams from A while the child SA and then the IKE SA are rekeyed from A, and waits for B's
/// SAs to change; returns how many more segments went to learning (0: the new SA was verified
/// from its first segment), and whether that stream was exact.
pub(crate) fn rekey_during_stream(t: &Topology, cg: &Path, learning: &str) -> (u64, bool) {
    const BYTES: u64 = 2 << 20;
    let l0 = metric(&scrape(t.mon()), learning);
    let spis = |ns: &Netns| ns_out(ns, &["ip", "xfrm", "state"]);
    let before = spis(&t.b);
    let (received, differing) = std::thread::scope(|scope| {
        let streaming = scope.spawn(|| stream(t, cg, BYTES, 5003));
        std::thread::sleep(Duration::from_millis(300));
        for what in [["--child", "t"], ["--ike", "natt"]] {
            let out = swanctl(&t.a, "a", &["--rekey", what[0], what[1]]);
            assert!(
                out.status.success(),
                "swanctl --rekey {what:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while spis(&t.b) == before {
            assert!(Instant::now() < deadline, "the child SA was not rekeyed");
            std::thread::sleep(Duration::from_millis(100));
        }
        streaming
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
    });
    // A second stream entirely on the new SA.
    let (again, bad) = stream(t, cg, 256 << 10, 5004);
    std::thread::sleep(Duration::from_millis(500));
    (
        metric(&scrape(t.mon()), learning) - l0,
        (received, differing, again, bad) == (BYTES, 0, 256 << 10, 0),
    )
}
