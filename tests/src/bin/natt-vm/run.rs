//! Running one scenario and measuring what natt-monitor and the kernel saw.

use std::{
    fs,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use natt_monitor::peers::{Mode, NatAddresses, PeerSpec, parse_cidr};
use natt_monitor_tests::net::{Cgroup, sh};

use crate::{
    icmp::{IcmpRun, ping_through_sa},
    plan::{REKEYED_SPI, STREAM, V4, WARMUP},
    processes::{
        bin, captured, learned_into_b, metric, scrape, start_monitor, start_monitor_args,
        start_monitor_with, wait_until,
    },
    restart::{Pins, Restart, finish, stream_through_restart},
    scale::{DUMMY_SAS, MAX_PEERS, Scale, add_dummy_sas},
    scenarios::{Corruption, Scenario, Setup},
    sctp::{SctpRun, stream_through_sa},
    shapes::Shapes,
    shared_nat::run_shared_nat,
    soak::{Soaked, run_soak},
    strongswan::swanctl,
    topology::{Topology, ns_sh},
    traffic::{plaintext, rekey_during_stream, stream},
    tunnel::{TunnelRun, through_tunnels},
};

/// What one scenario measured.
#[derive(Debug, Default)]
pub(crate) struct Measured {
    pub(crate) injected: u64,
    pub(crate) detected: u64,
    /// `natt_monitor_learning_mismatches_total`: segments passed while their SA learned, judged
    /// corrupt once its residual was known.
    pub(crate) learning_mismatches: u64,
    pub(crate) dropped: u64,
    pub(crate) verified: u64,
    pub(crate) learning: u64,
    /// `natt_monitor_residuals_withdrawn_total` at the end: no corruption may withdraw one.
    pub(crate) withdrawn: u64,
    /// `natt_monitor_residuals_inherited_total` at the end: SAs verified from their first
    /// segment with their predecessor's residual.
    pub(crate) inherited: u64,
    /// `natt_monitor_residuals_confirmed_total` at the end: residuals the verifier confirmed
    /// itself in enforce mode.
    pub(crate) confirmed: u64,
    /// `natt_monitor_residuals_evicted_total` at the end: residuals the LRU map forgot.
    pub(crate) evicted: u64,
    pub(crate) received: u64,
    /// Bytes that differed in corruptions a checksum can see (all of them, in observe mode).
    pub(crate) differing: u64,
    /// Corruptions delivered with their sum unchanged, which no checksum can see (left out of
    /// `injected` and `differing`; see `traffic::stream`).
    pub(crate) invisible: u64,
    pub(crate) kernel_csum_errors: u64,
    pub(crate) xfrm_peers: u64,
    pub(crate) residual: String,
    /// Segments skipped as GRO aggregates during the main stream.
    pub(crate) aggregated: u64,
    /// `g-gro`: aggregates during a second stream, after `gro_max_size` = MTU.
    pub(crate) aggregated_after_remedy: Option<u64>,
    /// `f-strongswan-nat`: the peer disappeared when the IKE SA was torn down.
    pub(crate) removed_live: Option<bool>,
    /// NAT scenarios: plaintext from the NAT'd peer's address (UDP datagrams received of those
    /// sent; for manual SAs also a TCP stream on a port no policy covers, byte-exact or not).
    pub(crate) plaintext: Option<String>,
    /// Mismatches counted while the plaintext was sent (must be 0).
    pub(crate) plaintext_mismatches: u64,
    /// Packets in the `--capture` file at the end.
    pub(crate) captured: u64,
    /// `f-strongswan-nat`: segments left unverified for learning after the child SA (and the
    /// IKE SA) were rekeyed mid-run (0: the new SA inherited the residual), and whether the
    /// stream after the rekeys was byte-exact.
    pub(crate) rekey_learning: Option<u64>,
    /// The shared-NAT scenario's returning host (`shared_nat::Rejoin::summary`).
    pub(crate) rejoin: Option<String>,
    /// `j-sigkill-restart`: what the SIGKILL and the second start did.
    pub(crate) restart: Option<Restart>,
    /// `k-ten-thousand-sas`: discovery, labels and footprint at ten thousand SAs.
    pub(crate) scale: Option<Scale>,
    /// `p-sighup-enforce`: the stream after the reload to enforce mode.
    pub(crate) sighup: Option<Reloaded>,
    /// `s-nat-rebind-enforce`: the move of A's NAT mapping to another port mid-stream.
    pub(crate) rebound: Option<Rebound>,
    /// `t-learning-flood-observe`: what the daemon made of the flood, from its log.
    pub(crate) flood: Option<Flooded>,
    /// `u-soak-enforce`: the seed and what the rounds did.
    pub(crate) soak: Option<Soaked>,
    /// `ICMP_SCENARIOS`: the pings through the SA at the end.
    pub(crate) icmp: Option<IcmpRun>,
    /// `ICMP_SCENARIOS`: the SCTP stream through the SA after the pings.
    pub(crate) sctp: Option<SctpRun>,
    /// `TUNNEL_SCENARIOS`: the streams through tunnels inside the SA, last.
    pub(crate) tunnel: Option<TunnelRun>,
    /// The shapes of the corrupted copies, read with `captured`.
    pub(crate) shapes: Shapes,
}

impl Measured {
    /// The counts one scrape `text` gives for the peer whose TCP series `series` names, and the
    /// verifier's residual counters; the caller fills in the rest.
    pub(crate) fn from_scrape(text: &str, series: impl Fn(&str) -> String) -> Self {
        Self {
            detected: metric(text, &series("checksum_mismatches_total")),
            learning_mismatches: metric(text, &series("learning_mismatches_total")),
            dropped: metric(text, &series("dropped_packets_total")),
            verified: metric(text, &series("verified_packets_total")),
            learning: metric(text, &series("learning_packets_total")),
            withdrawn: metric(text, "natt_monitor_residuals_withdrawn_total"),
            inherited: metric(text, "natt_monitor_residuals_inherited_total"),
            confirmed: metric(text, "natt_monitor_residuals_confirmed_total"),
            evicted: metric(text, "natt_monitor_residuals_evicted_total"),
            xfrm_peers: metric(text, "natt_monitor_peers{source=\"xfrm\"}"),
            ..Self::default()
        }
    }
}

pub(crate) fn expected_nat_residual() -> u16 {
    let x = &V4;
    let mut p = PeerSpec::new(parse_cidr(x.r_b).expect("cidr"), Mode::Observe);
    p.nat = Some(NatAddresses {
        original_src: x.a.parse().expect("ip"),
        original_dst: x.b.parse().expect("ip"),
        observed_src: x.r_b.parse().expect("ip"),
        observed_dst: x.b.parse().expect("ip"),
    });
    p.expected_residual().expect("same family")
}

#[expect(
    clippy::too_many_lines,
    reason = "one scenario from set-up to readings, in the order it happens"
)]
pub(crate) fn run(s: &Scenario) -> Measured {
    if s.setup == Setup::SharedNat {
        return run_shared_nat(s);
    }
    if s.setup == Setup::Soak {
        return run_soak(s);
    }
    let t = Topology::new(s);
    if s.setup == Setup::Rebind {
        // Before the SA's first packet: a mapping's timeout is set by its packets.
        t.expire_udp_mappings_fast();
    }
    let cg = Cgroup::new();
    // Before the daemon, so that it is dropped after it: detaches what the daemons pinned.
    let pins = (s.setup == Setup::Restart).then(Pins::mount);
    let mut d = if pins.is_some() {
        let args = Pins::args();
        start_monitor_with(t.mon(), s.mode, s.name, &[&args[0], &args[1]])
    } else if s.setup == Setup::Scale {
        start_monitor_with(t.mon(), s.mode, s.name, &["--max-peers", MAX_PEERS])
    } else if s.setup == Setup::Evicted {
        start_monitor_with(t.mon(), s.mode, s.name, &["--sa-trust-slots", "1"])
    } else if s.setup == Setup::Sighup {
        fs::write(SIGHUP_CONFIG, format!("mode = \"{}\"\n", s.mode.as_str())).expect("config");
        start_monitor_args(t.mon(), s.name, &["--config", SIGHUP_CONFIG])
    } else {
        start_monitor(t.mon(), s.mode, s.name)
    };
    let mut scale = (s.setup == Setup::Scale).then(|| {
        let (create_secs, discovered_secs) = add_dummy_sas(&t, &d);
        Scale {
            create_secs,
            discovered_secs,
            ..Scale::default()
        }
    });
    let dummies = if scale.is_some() { DUMMY_SAS } else { 0 };
    if s.setup == Setup::Gro {
        // Before the SAs: a state takes its GRO (offload) handlers when it is created. The
        // module stays loaded for the rest of this boot, so this scenario runs last.
        if !Path::new("/sys/module/esp4_offload").exists() {
            sh(&["insmod", "/lib/modules/extra/esp4_offload.ko"]);
        }
        ns_sh(&t.b, &["ethtool", "-K", "vb", "gro", "on"]);
        // veth hands a packet to the peer's GRO only if the sending device does not do TSO
        // (or the packet comes from a local socket): R forwards, so R's side must not.
        ns_sh(&t.r, &["ethtool", "-K", "rb", "tso", "off"]);
    }
    // SAs come after the monitor: discovery must pick them up live.
    let sas_added = Instant::now();
    let charons = t.add_sas(s);
    // At scale the SA with traffic is the last peer discovered, past the label cap: its
    // counts are the sum under "other" (the other peers carry no traffic).
    let peer = if scale.is_some() {
        "other".to_owned()
    } else if s.setup == Setup::Undiscovered {
        natt_monitor::peers::UNDISCOVERED.to_owned()
    } else {
        format!("{}/{}", t.a_seen_by_b(s.nat), t.addrs.host_prefix)
    };
    let series_of = |name: &str, proto: &str| {
        format!("natt_monitor_{name}{{peer=\"{peer}\",proto=\"{proto}\"}}")
    };
    let series = |name: &str| series_of(name, "tcp");
    let from_start = s.corrupt && s.corruption.before_traffic();
    if from_start {
        // The first large ESP packet the rule sees is corrupted: the new SA's first data
        // segment, before its residual is known.
        t.corrupt(s);
    }
    // Bytes of the warm-up stream that differ: corruption from the start, in observe mode, is
    // delivered while the SA learns (and counted once its residual is known).
    let mut warmup_differing = 0;
    // `o-rekey-enforce`: segments to learning after the rekey, and whether the new SA carried
    // a byte-exact second stream.
    let mut manual_rekey = None;
    // `p-sighup-enforce`: the stream after the reload to enforce.
    let mut sighup = None;
    // `s-nat-rebind-enforce`: what the move of A's NAT mapping did.
    let mut rebound = None;
    if s.encap {
        // In a namespace of its own the daemon discovers nothing: B's SAs are verified under
        // SA scope's catch-alls.
        let discovered = u64::from(s.setup != Setup::Undiscovered);
        wait_until(t.mon(), &d, "the SA's peer is discovered", |b| {
            metric(&scrape(b), "natt_monitor_peers{source=\"xfrm\"}") == discovered + dummies
                && metric(&scrape(b), "natt_monitor_peers{source=\"undiscovered\"}") == 2
        });
        // Clean warm-up traffic so the residual is learned before anything is corrupted.
        let (got, bad) = stream(&t, &cg.path, WARMUP, 5000);
        if from_start && s.mode == Mode::Observe {
            assert_eq!(got, WARMUP, "warm-up stream");
            warmup_differing = bad;
        } else {
            assert_eq!((got, bad), (WARMUP, 0), "warm-up stream");
        }
        wait_until(t.mon(), &d, "the NAT residual is learned", |b| {
            if scale.is_some() {
                // `other` stays learning: its idle peers never learn anything.
                !learned_into_b(&fs::read_to_string(&d.log).unwrap_or_default()).is_empty()
            } else {
                metric(
                    &scrape(b),
                    &format!("natt_monitor_peer_learning{{peer=\"{peer}\"}}"),
                ) == 0
            }
        });
        if let Some(sc) = scale.as_mut() {
            sc.verified_secs = sas_added.elapsed().as_secs_f64();
        }
        let text = scrape(t.mon());
        if !from_start {
            assert_eq!(
                metric(&text, &series("checksum_mismatches_total")),
                0,
                "false positives after learning"
            );
        }
    }
    // Plaintext from the NAT'd peer, after its SA's residual (non-zero) was learned.
    let (plaintext, plaintext_mismatches) = if s.nat {
        let (summary, mismatches) = plaintext(&t, s, &cg.path, s.setup.manual_sas());
        (Some(summary), mismatches)
    } else {
        (None, 0)
    };
    if s.setup == Setup::Gro {
        // What `natt-monitor check` says on a host in this state (shown in docs/vm-tests.md).
        let out = Command::new("ip")
            .args(["netns", "exec", &t.b.name])
            .arg(bin("natt-monitor"))
            .arg("check")
            .output()
            .expect("natt-monitor check");
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            println!("NATT-VM CHECK {line}");
        }
        assert!(
            out.status.success(),
            "natt-monitor check failed in the guest"
        );
    }
    let aggregated = "natt_monitor_skipped_packets_total{reason=\"aggregated\"}";
    let before = scrape(t.mon());
    let k0 = metric(&before, "natt_monitor_kernel_tcp_in_csum_errors_total");
    let g0 = metric(&before, aggregated);
    if s.corrupt && !from_start {
        t.corrupt(s);
    }
    let (received, differing, restarted) = if pins.is_some() {
        let dropped = series("dropped_packets_total");
        let (received, differing, r, second) =
            stream_through_restart(&t, s, &cg.path, &mut d, &dropped);
        (received, differing, Some((r, second)))
    } else if s.setup == Setup::Sighup {
        let (received, differing) = stream(&t, &cg.path, STREAM, 5001);
        sighup = Some(reload_to_enforce(&t, &cg.path, &d, &series));
        (received, differing + warmup_differing, None)
    } else if s.setup == Setup::Rebind {
        // Corruption is on throughout; the mapping moves while the stream flows.
        let learning = series("learning_packets_total");
        let l0 = metric(&scrape(t.mon()), &learning);
        let (received, differing, mid_stream) = std::thread::scope(|scope| {
            let streaming = scope.spawn(|| stream(&t, &cg.path, STREAM, 5001));
            // The packets are held back while the stream is young, and whether it was still
            // running is judged once nothing of it can flow: a fast guest sent all 3 MiB
            // within the 200 ms this used to wait (6.1 in a fresh-clone CI), and the mapping
            // then moved after the stream.
            std::thread::sleep(Duration::from_millis(20));
            let mid_stream = t.rebind_a(s, || !streaming.is_finished());
            let (received, differing) = streaming
                .join()
                .unwrap_or_else(|e| std::panic::resume_unwind(e));
            (received, differing, mid_stream)
        });
        std::thread::sleep(Duration::from_millis(500));
        let (mappings, sa_updated) = t.rebound();
        rebound = Some(Rebound {
            mid_stream,
            mappings,
            sa_updated,
            learning: metric(&scrape(t.mon()), &learning) - l0,
        });
        (received, differing + warmup_differing, None)
    } else if s.setup == Setup::ManualRekey {
        // Corruption is on: the first segments on the new SA are among the corrupted ones.
        let learning = series("learning_packets_total");
        let l0 = metric(&scrape(t.mon()), &learning);
        let (received, differing) = std::thread::scope(|scope| {
            let streaming = scope.spawn(|| stream(&t, &cg.path, STREAM, 5001));
            std::thread::sleep(Duration::from_millis(200));
            t.rekey_a_to_b(s);
            streaming
                .join()
                .unwrap_or_else(|e| std::panic::resume_unwind(e))
        });
        // A second stream entirely on the new SA.
        let (again, bad) = stream(&t, &cg.path, STREAM, 5003);
        std::thread::sleep(Duration::from_millis(500));
        // In observe mode the second stream's corruption reaches the application (and is
        // judged with the rest); in enforce mode not one byte of it may.
        manual_rekey = Some((
            metric(&scrape(t.mon()), &learning) - l0,
            again == STREAM && (s.mode == Mode::Observe || bad == 0) && t.carried(REKEYED_SPI),
        ));
        (received, differing + warmup_differing + bad, None)
    } else {
        let (received, differing) = stream(&t, &cg.path, s.stream_bytes(), 5001);
        (received, differing + warmup_differing, None)
    };
    // Give the drain loop a moment, then read everything once.
    std::thread::sleep(Duration::from_millis(500));
    let text = scrape(t.mon());
    let restart = restarted.map(|(mut r, second)| {
        finish(second, &text, series_of, &mut r);
        r
    });
    if let Some(sc) = scale.as_mut() {
        sc.read(&text, &fs::read_to_string(&d.log).unwrap_or_default());
    }
    let g1 = metric(&text, aggregated);
    let aggregated_after_remedy = (s.setup == Setup::Gro).then(|| {
        // The remedy the runbook gives: GRO stays on, but nothing grows past one MTU.
        sh(&[
            "ip",
            "-n",
            &t.b.name,
            "link",
            "set",
            "dev",
            "vb",
            "gro_max_size",
            "1500",
        ]);
        let (got, bad) = stream(&t, &cg.path, STREAM, 5002);
        assert_eq!((got, bad), (STREAM, 0), "stream after the remedy");
        std::thread::sleep(Duration::from_millis(500));
        metric(&scrape(t.mon()), aggregated) - g1
    });
    let rekey = (s.setup == Setup::StrongSwan)
        .then(|| rekey_during_stream(&t, &cg.path, &series("learning_packets_total")))
        .or(manual_rekey);
    // strongSwan's rekeys come after the scenario's main scrape: read again after them. (Not
    // otherwise: the restart scenario's second daemon is stopped by now.)
    let inherited = metric(
        &if rekey.is_some() {
            scrape(t.mon())
        } else {
            text.clone()
        },
        "natt_monitor_residuals_inherited_total",
    );
    let removed_live = (s.setup == Setup::StrongSwan).then(|| {
        // Tear the IKE SA down from A: B's charon deletes its SAs, the monitor must notice.
        let _ = swanctl(
            &t.a,
            "a",
            &["--terminate", "--ike", "natt", "--timeout", "30"],
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if metric(&scrape(t.mon()), "natt_monitor_peers{source=\"xfrm\"}") == 0 {
                break true;
            }
            if Instant::now() > deadline {
                break false;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    drop(charons);
    let log = fs::read_to_string(&d.log).unwrap_or_default();
    let residual = learned_into_b(&log)
        .first()
        .and_then(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("residual="))
        })
        .unwrap_or("-")
        .to_owned();
    let flood = (s.corruption == Corruption::Flood).then(|| Flooded::read(&log));
    let mut m = Measured {
        injected: if s.corrupt { t.injected() } else { 0 },
        invisible: t.invisible(),
        inherited,
        received,
        differing,
        kernel_csum_errors: metric(&text, "natt_monitor_kernel_tcp_in_csum_errors_total") - k0,
        xfrm_peers: metric(&text, "natt_monitor_peers{source=\"xfrm\"}") - dummies,
        residual,
        aggregated: g1 - g0,
        aggregated_after_remedy,
        removed_live,
        plaintext,
        plaintext_mismatches,
        rekey_learning: rekey.map(|(l, exact)| if exact { l } else { u64::MAX }),
        rejoin: None,
        // The first daemon died by SIGKILL with its capture file in any state: the second's.
        captured: if restart.is_some() {
            captured(&format!("{}-restarted", s.name))
        } else {
            captured(s.name)
        },
        shapes: Shapes::read(
            &text,
            &if restart.is_some() {
                format!("{}-restarted", s.name)
            } else {
                s.name.to_owned()
            },
        ),
        restart,
        scale,
        sighup,
        rebound,
        flood,
        ..Measured::from_scrape(&text, series)
    };
    // Last, once everything above is read: its corrupted replies add to R's counters and to
    // the capture file.
    if ICMP_SCENARIOS.contains(&s.name) {
        m.icmp = Some(ping_through_sa(&t, s, &cg.path, &peer));
        if !s.v6 {
            // Over IPv6 the association's COOKIE-ACK never reached A through the SA (7.3,
            // 2026-12-04), unexplained yet: IPv6 SCTP is proven by the table tests only.
            m.sctp = Some(stream_through_sa(&t, s, &cg.path, &peer));
        }
    }
    if TUNNEL_SCENARIOS.contains(&s.name) {
        m.tunnel = Some(through_tunnels(&t, s, &cg.path, &peer));
    }
    m
}

/// The scenarios that end with streams through a GRE and an IPIP tunnel inside their SA
/// (`tunnel.rs`): one in each mode with R's NAT between the hosts, and over IPv6 (ip6gre and
/// ip6tnl).
pub(crate) const TUNNEL_SCENARIOS: [&str; 3] = [
    "d-nat-learned",
    "l-constant-delta-observe",
    "h-ipv6-enforce",
];

/// The scenarios that end with pings and an SCTP stream through their SA (`icmp.rs`,
/// `sctp.rs`).
pub(crate) const ICMP_SCENARIOS: [&str; 4] = [
    "b-observe-cbc-aes",
    "b-enforce-cbc-aes",
    "d-nat-learned",
    "h-ipv6-enforce",
];

/// What moving A's NAT mapping to another public port mid-stream did.
#[derive(Debug, Default)]
pub(crate) struct Rebound {
    /// The stream still flowed when the packets were let through again.
    pub(crate) mid_stream: bool,
    /// NAT mappings R made on the new port (its NAT rule sees each mapping's first packet).
    pub(crate) mappings: u64,
    /// B's SA from A names the new port.
    pub(crate) sa_updated: bool,
    /// Segments of the peer that went to learning from the stream's start: the gap in
    /// verification the move caused.
    pub(crate) learning: u64,
}

impl Rebound {
    /// For the `NATT-VM RESULT` line.
    pub(crate) fn summary(&self) -> String {
        format!(
            "mid_stream={},mappings_to_4600={},sa_port_4600={},learning={}",
            if self.mid_stream { "yes" } else { "no" },
            self.mappings,
            if self.sa_updated { "yes" } else { "no" },
            self.learning
        )
    }
}

/// What a flood while B's SA from A learned left in the daemon's log.
#[derive(Debug, Default)]
pub(crate) struct Flooded {
    /// The residuals B's SA from A (SPI 0x1001) learned, in order.
    pub(crate) learned: Vec<String>,
    /// Its withdrawals: (the residual withdrawn, the one the refused segments agreed on).
    pub(crate) withdrawn: Vec<(String, String)>,
    /// The other SA with traffic, A's from B (SPI 0x2001, under the catch-all): residuals
    /// learned and withdrawn.
    pub(crate) other_learned: usize,
    pub(crate) other_withdrawn: usize,
}

impl Flooded {
    /// Reads the daemon's log, and prints what an operator reads in it about B's SA.
    fn read(log: &str) -> Self {
        const B_SA: &str = "spi=0x00001001";
        const OTHER_SA: &str = "spi=0x00002001";
        let field = |line: &str, key: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .unwrap_or("-")
                .to_owned()
        };
        let learned = |l: &&str| l.contains("NAT residual learned");
        let withdrawn = |l: &&str| l.contains("learned NAT residual withdrawn");
        let mut out = Self::default();
        let mut mismatches_shown = 0;
        for line in log.lines() {
            if line.contains(B_SA) {
                let shown = if learned(&line) {
                    out.learned.push(field(line, "residual="));
                    true
                } else if withdrawn(&line) {
                    out.withdrawn
                        .push((field(line, "learned="), field(line, "found=")));
                    true
                } else if line.contains("checksum mismatch") && mismatches_shown < 2 {
                    mismatches_shown += 1;
                    true
                } else {
                    line.contains("segments passed unverified while this SA")
                };
                if shown {
                    println!("NATT-VM LOG {line}");
                }
            } else if line.contains(OTHER_SA) {
                out.other_learned += usize::from(learned(&line));
                out.other_withdrawn += usize::from(withdrawn(&line));
            }
        }
        out
    }

    /// For the `NATT-VM RESULT` line.
    pub(crate) fn summary(&self) -> String {
        format!(
            "learned={},withdrawn={},other_sa=learned:{}/withdrawn:{}",
            self.learned.join(">"),
            self.withdrawn
                .iter()
                .map(|(l, f)| format!("{l}(found:{f})"))
                .collect::<Vec<_>>()
                .join(">"),
            self.other_learned,
            self.other_withdrawn
        )
    }
}

/// The configuration file of `p-sighup-enforce`'s daemon.
const SIGHUP_CONFIG: &str = "/tmp/natt-sighup.toml";

/// What the stream after a SIGHUP to enforce mode did.
#[derive(Debug, Default)]
pub(crate) struct Reloaded {
    /// Corruptions injected, mismatches, drops and learning segments during that stream.
    pub(crate) injected: u64,
    pub(crate) detected: u64,
    pub(crate) dropped: u64,
    pub(crate) learning: u64,
    /// The stream arrived whole and byte-exact.
    pub(crate) exact: bool,
}

impl Reloaded {
    /// For the `NATT-VM RESULT` line.
    pub(crate) fn summary(&self) -> String {
        format!(
            "injected={},detected={},dropped={},learning={},exact={}",
            self.injected,
            self.detected,
            self.dropped,
            self.learning,
            if self.exact { "yes" } else { "no" }
        )
    }
}

/// Rewrites the configuration file to `mode = "enforce"`, sends the daemon SIGHUP, waits for
/// the reload, and streams again.
fn reload_to_enforce(
    t: &Topology,
    cg: &Path,
    d: &crate::processes::Daemon,
    series: &dyn Fn(&str) -> String,
) -> Reloaded {
    fs::write(SIGHUP_CONFIG, "mode = \"enforce\"\n").expect("config");
    let reloads = |d: &crate::processes::Daemon| {
        fs::read_to_string(&d.log)
            .unwrap_or_default()
            .matches("reloaded peers on SIGHUP")
            .count()
    };
    let before = reloads(d);
    let pid = i32::try_from(d.process.0.id()).expect("pid");
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0, "kill -HUP");
    wait_until(t.mon(), d, "the daemon reloaded", |_| reloads(d) > before);
    let read = |text: &str| {
        [
            "checksum_mismatches_total",
            "dropped_packets_total",
            "learning_packets_total",
        ]
        .map(|name| metric(text, &series(name)))
    };
    let (i0, m0) = (t.injected(), read(&scrape(t.mon())));
    let (got, bad) = stream(t, cg, STREAM, 5004);
    std::thread::sleep(Duration::from_millis(500));
    let (i1, m1) = (t.injected(), read(&scrape(t.mon())));
    Reloaded {
        injected: i1 - i0,
        detected: m1[0] - m0[0],
        dropped: m1[1] - m0[1],
        learning: m1[2] - m0[2],
        exact: (got, bad) == (STREAM, 0),
    }
}
