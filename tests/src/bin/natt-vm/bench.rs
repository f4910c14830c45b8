//! `natt-vm --bench`: the live cost of the verifier on the real ESP-in-UDP path, this build
//! beside the baseline build (`/natt/natt-monitor-baseline`, from `cargo xtask vm-bench`), in
//! the default install shape (SA scope at the cgroup2 root, the peer discovered from its SAs,
//! NAT in the path, enforce mode). Each round streams through the same SAs once with no
//! daemon, once under each build (in alternating order), and reads the kernel's BPF run-time
//! statistics over the measured stream: one `NATT-VM BENCH` line per run. The xtask takes the
//! medians.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use natt_monitor::peers::Mode;
use natt_monitor_tests::net::{Cgroup, Netns};

use crate::{
    plan::WARMUP,
    processes::{bin, metric, scrape, start_binary, wait_until},
    scenarios::{Cipher, Corruption, Scenario, Setup},
    topology::{Topology, ns_out, ns_sh},
    traffic::stream,
};

/// The topology of the bench: `d-nat-learned` without corruption.
const BENCH: Scenario = Scenario {
    name: "bench",
    setup: Setup::Manual,
    cipher: Cipher::Null,
    mode: Mode::Enforce,
    encap: true,
    nat: true,
    corrupt: false,
    corruption: Corruption::Word,
    v6: false,
};

/// Bytes of each measured stream.
const BYTES: u64 = 24 << 20;
/// Rounds: each runs no daemon, the baseline and this build once.
const ROUNDS: usize = 5;
/// B's first listening port; each stream takes the next.
const FIRST_PORT: u16 = 7000;
/// The guest binary of the baseline build.
const BASELINE: &str = "natt-monitor-baseline";

/// What the kernel says of natt-monitor's programs: summed run time of every `natt_*` program,
/// and the run count of the one that ran most (the attached entry program).
#[derive(Clone, Copy, Default)]
struct BpfStats {
    run_ns: u64,
    runs: u64,
}

fn bpf_stats() -> BpfStats {
    let mut s = BpfStats::default();
    for info in aya::programs::loaded_programs() {
        let info = info.expect("BPF_OBJ_GET_INFO_BY_FD of a loaded program");
        if info.name_as_str().is_some_and(|n| n.starts_with("natt_")) {
            s.run_ns += u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX);
            s.runs = s.runs.max(info.run_count());
        }
    }
    s
}

/// Waits until no natt-monitor program is loaded: the previous daemon is gone entirely.
fn wait_unloaded() {
    let deadline = Instant::now() + Duration::from_secs(60);
    while aya::programs::loaded_programs()
        .flatten()
        .any(|i| i.name_as_str().is_some_and(|n| n.starts_with("natt_")))
    {
        assert!(
            Instant::now() < deadline,
            "natt-monitor's programs still loaded 60 s after its daemon ended"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// TCP segments received in `ns` so far (`/proc/net/snmp`'s `InSegs`).
fn tcp_in_segs(ns: &Netns) -> u64 {
    let snmp = ns_out(ns, &["cat", "/proc/net/snmp"]);
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next().expect("Tcp:"), tcp.next().expect("Tcp: values"));
    let i = names
        .split_whitespace()
        .position(|n| n == "InSegs")
        .expect("InSegs");
    values
        .split_whitespace()
        .nth(i)
        .and_then(|v| v.parse().ok())
        .expect("InSegs value")
}

/// Sum of every series of the counter `name` (all peers, all protocols).
fn total(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// One measured stream under `build` (`none`, `baseline` or `current`).
fn measure(t: &Topology, cg: &Path, kernel: &str, round: usize, build: &str, port: u16) {
    let daemon = (build != "none").then(|| {
        let binary = if build == "baseline" {
            bin(BASELINE)
        } else {
            bin("natt-monitor")
        };
        let d = start_binary(
            t.mon(),
            &binary,
            &format!("bench-{build}-{round}"),
            &["--mode", "enforce", "--pin-path", "none"],
        );
        wait_until(t.mon(), &d, "the peer is discovered from its SAs", |b| {
            metric(&scrape(b), "natt_monitor_peers{source=\"xfrm\"}") >= 1
        });
        d
    });
    // Learns the SA's residual (in enforce mode, the first segments wait for TCP to confirm it).
    let (got, bad) = stream(t, cg, WARMUP, port);
    assert_eq!((got, bad), (WARMUP, 0), "{build}: the warm-up stream");
    let before = daemon.as_ref().map(|_| scrape(t.mon()));
    let (in_segs_before, bpf0) = (tcp_in_segs(&t.b), bpf_stats());
    let started = Instant::now();
    let (got, bad) = stream(t, cg, BYTES, port + 1);
    let secs = started.elapsed().as_secs_f64();
    let (received_segs, bpf1) = (tcp_in_segs(&t.b) - in_segs_before, bpf_stats());
    assert_eq!((got, bad), (BYTES, 0), "{build}: the measured stream");
    let (runs, run_ns) = (bpf1.runs - bpf0.runs, bpf1.run_ns - bpf0.run_ns);
    let (verified, mismatches) = match &before {
        Some(before) => {
            let after = scrape(t.mon());
            let delta = |name: &str| total(&after, name) - total(before, name);
            (
                delta("natt_monitor_verified_packets_total"),
                delta("natt_monitor_checksum_mismatches_total"),
            )
        }
        None => (0, 0),
    };
    if daemon.is_some() {
        assert!(
            runs > 0,
            "{build}: the kernel counted no run of natt-monitor's program"
        );
        assert_eq!(mismatches, 0, "{build}: mismatches on clean traffic");
        // B's segments were verified (a retransmission or two may be counted apart): the
        // program did the work whose cost is being read.
        assert!(
            verified * 100 >= received_segs * 99,
            "{build}: {verified} segments verified of {received_segs} that B received"
        );
    }
    drop(daemon);
    wait_unloaded();
    println!(
        "NATT-VM BENCH kernel={kernel} round={round} build={build} bytes={BYTES} secs={secs:.3} segments={received_segs} runs={runs} run_ns={run_ns} verified={verified}"
    );
}

/// B's replies (ACKs) leave IPsec, and R forwards them to A: what the program verifies is then
/// B's inbound stream alone, as on a host of its own. (The guest's namespaces share one kernel,
/// so with A's inbound SA in place its ACKs would be verified too, under this build's
/// catch-all: work the baseline, which left them out of scope, never did.)
fn one_way(t: &Topology) {
    let x = t.addrs;
    let a_seen = t.a_seen_by_b(BENCH.nat);
    ns_sh(
        &t.b,
        &[
            "ip", "xfrm", "policy", "delete", "src", x.b, "dst", a_seen, "proto", "tcp", "dir",
            "out",
        ],
    );
    ns_sh(
        &t.a,
        &[
            "ip", "xfrm", "policy", "delete", "src", x.b, "dst", x.a, "proto", "tcp", "dir", "in",
        ],
    );
    // Stateless, before conntrack (which would not translate a flow whose first packet is
    // B's SYN-ACK): nft fixes the TCP checksum for the new pseudo-header.
    ns_sh(
        &t.r,
        &[
            "nft",
            &format!(
                "add table ip raw; add chain ip raw pre {{ type filter hook prerouting priority -300; }}; add rule ip raw pre iifname rb ip saddr {} tcp sport {}-{} ip daddr set {}",
                x.b,
                FIRST_PORT,
                FIRST_PORT + 999,
                x.a
            ),
        ],
    );
}

/// The bench: `ROUNDS` rounds of no daemon, the baseline and this build.
pub(crate) fn run(kernel: &str) -> Result<(), String> {
    if !bin(BASELINE).exists() {
        return Err(format!("no {} in the guest", bin(BASELINE).display()));
    }
    std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1")
        .map_err(|e| format!("enabling BPF run-time statistics: {e}"))?;
    let t = Topology::new(&BENCH);
    let cg = Cgroup::new();
    let _sas = t.add_sas(&BENCH);
    one_way(&t);
    let mut port = FIRST_PORT;
    for round in 0..ROUNDS {
        // Alternating order: a drift over the run weighs on both builds alike.
        let order = if round % 2 == 0 {
            ["none", "baseline", "current"]
        } else {
            ["current", "baseline", "none"]
        };
        for build in order {
            measure(&t, &cg.path, kernel, round, build, port);
            port += 2;
        }
    }
    Ok(())
}
