//! The scenario with two hosts behind one NAT address.

use std::{fmt::Write as _, fs, net::UdpSocket, time::Duration};

use natt_monitor::peers::{Mode, NatAddresses, PeerSpec, parse_cidr};
use natt_monitor_tests::net::{Cgroup, Netns, sh};

use crate::{
    plan::{A2, CORRUPT_BIT, CORRUPT_EVERY, NULL_CIPHER, R_A2, STREAM, V4, WARMUP},
    processes::{
        Daemon, captured, learned_into_b, learned_residuals, metric, scrape, start_monitor,
        wait_until,
    },
    run::Measured,
    scenarios::Scenario,
    topology::{Topology, encap_socket, ns_sh, tcp_policy, xfrm_state},
    traffic::stream_from,
};

/// A and A2 behind R's one masquerading address, each with one pair of SAs to B (A: SPIs
/// 0x1001/0x2001, encapsulation port 4500, reqid 1 on B; A2: 0x1002/0x2002, port 4501, reqid 2),
/// and natt-monitor in B. A is 10.1.0.1, A2 10.3.0.1. On B the TCP port picks the SA: `ports`
/// ports from 5000 for A's streams, from 5500 for A2's.
pub(crate) struct SharedNat {
    pub(crate) t: Topology,
    pub(crate) a2: Netns,
    pub(crate) cg: Cgroup,
    pub(crate) d: Daemon,
    /// A2's encapsulation socket: bind it for as long as A2 sends.
    pub(crate) encap2: UdpSocket,
}

impl SharedNat {
    pub(crate) fn new(s: &Scenario, ports: u16) -> Self {
        assert!(
            ports <= 500,
            "A's and A2's TCP port blocks on B would overlap"
        );
        let t = Topology::new(s);
        let x = t.addrs;
        let a2 = Netns::new("vma2");
        sh(&[
            "ip", "link", "add", "va2", "netns", &a2.name, "type", "veth", "peer", "name", "ra2",
            "netns", &t.r.name,
        ]);
        for (ns, dev, addr) in [(&a2, "va2", A2), (&t.r, "ra2", R_A2)] {
            sh(&[
                "ip",
                "-n",
                &ns.name,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                dev,
            ]);
            sh(&["ip", "-n", &ns.name, "link", "set", dev, "up"]);
        }
        sh(&["ip", "-n", &a2.name, "route", "add", "default", "via", R_A2]);
        let encap2 = encap_socket(&a2, false, x, 4501);
        let cg = Cgroup::new();
        let d = start_monitor(&t.b, s.mode, s.name);
        let nat = x.r_b;
        // A and A2: one pair of SAs each, every TCP segment to B through them.
        for (ns, me, to_b, from_b, port) in [
            (&t.a, x.a, "0x1001", "0x2001", 4500),
            (&a2, A2, "0x1002", "0x2002", 4501),
        ] {
            host_sas(ns, me, x.b, to_b, from_b, port);
        }
        // B: both pairs from and to the NAT's address, told apart by reqid; the TCP port picks
        // it.
        // The policies in one `ip -batch`: the soak has hundreds.
        let mut batch = String::new();
        for (to_b, from_b, port, reqid, base) in [
            ("0x1001", "0x2001", 4500, "1", 5000),
            ("0x1002", "0x2002", 4501, "2", 5500),
        ] {
            b_sas(&t, to_b, from_b, port, reqid);
            for p in base..base + ports {
                for (src, dst, side, dir) in [(nat, x.b, "dport", "in"), (x.b, nat, "sport", "out")]
                {
                    let _ = writeln!(
                        batch,
                        "xfrm policy add src {src} dst {dst} proto tcp {side} {p} dir {dir} priority 100 \
                         tmpl src {src} dst {dst} proto esp mode transport reqid {reqid}"
                    );
                }
            }
        }
        let path = format!("/tmp/natt-policies-{}", s.name);
        fs::write(&path, batch).expect("policy batch");
        sh(&["ip", "-n", &t.b.name, "-batch", &path]);
        wait_until(
            &t.b,
            &d,
            "the NAT's address is discovered as one peer",
            |b| metric(&scrape(b), "natt_monitor_peers{source=\"xfrm\"}") == 1,
        );
        Self {
            t,
            a2,
            cg,
            d,
            encap2,
        }
    }
}

/// A host's pair of SAs with B (`me` its private address; `to_b`, `from_b` their SPIs), and
/// its TCP policies.
pub(crate) fn host_sas(ns: &Netns, me: &str, b: &str, to_b: &str, from_b: &str, port: u16) {
    let any = V4.any;
    xfrm_state(ns, me, b, to_b, "0", NULL_CIPHER, Some((port, 4500, any)));
    xfrm_state(ns, b, me, from_b, "0", NULL_CIPHER, Some((4500, port, any)));
    tcp_policy(ns, me, b, "out", None, "0");
    tcp_policy(ns, b, me, "in", None, "0");
}

/// B's pair of SAs with a host behind the NAT (`port` its encapsulation port on the NAT; `to_b`,
/// `from_b` their SPIs).
pub(crate) fn b_sas(t: &Topology, to_b: &str, from_b: &str, port: u16, reqid: &str) {
    let x = t.addrs;
    let any = x.any;
    xfrm_state(
        &t.b,
        x.r_b,
        x.b,
        to_b,
        reqid,
        NULL_CIPHER,
        Some((port, 4500, any)),
    );
    xfrm_state(
        &t.b,
        x.b,
        x.r_b,
        from_b,
        reqid,
        NULL_CIPHER,
        Some((4500, port, any)),
    );
}

/// Two hosts with different private addresses behind one masquerading NAT, each with its own
/// SAs to B (`SharedNat`, TCP ports 5000-5002 and 5500-5502). B sees both as R's address; their NAT residuals differ, and each SA
/// must be verified against its own. Then A leaves (its SAs deleted on both ends) and comes back
/// with another private address, on the same NAT mapping (R:4500), while A2 keeps streaming:
/// the new SA must learn its own residual, never inherit the departed one's (`rejoin`).
pub(crate) fn run_shared_nat(s: &Scenario) -> Measured {
    let SharedNat {
        t,
        a2,
        cg,
        d,
        encap2: _encap2,
    } = SharedNat::new(s, 3);
    let x = t.addrs;
    let nat = x.r_b;
    let peer = format!("{nat}/32");
    let series = |name: &str| format!("natt_monitor_{name}{{peer=\"{peer}\",proto=\"tcp\"}}");
    for (from, port) in [(&t.a, 5000), (&a2, 5500)] {
        let (got, bad) = stream_from(&t, from, &cg.path, WARMUP, port);
        assert_eq!((got, bad), (WARMUP, 0), "warm-up stream to port {port}");
    }
    wait_until(&t.b, &d, "both SAs' residuals are learned", |_| {
        learned_into_b(&fs::read_to_string(&d.log).unwrap_or_default()).len() == 2
    });
    let aggregated = "natt_monitor_skipped_packets_total{reason=\"aggregated\"}";
    let kernel = "natt_monitor_kernel_tcp_in_csum_errors_total";
    let before = scrape(&t.b);
    // NAT mappings expire 2 s after their last packet from now on, so that the one A held is
    // free for its return (a masquerading NAT keeps the source port when it can).
    t.expire_udp_mappings_fast();
    t.corrupt(s);
    ns_sh(
        &t.r,
        &[
            "nft",
            &format!(
                "add rule ip natt corrupt ip saddr {A2} udp dport 4500 meta length > 1000 numgen inc mod {CORRUPT_EVERY} == 0 counter @th,{CORRUPT_BIT},32 set 0xdeadbeef"
            ),
        ],
    );
    let (r1, d1) = stream_from(&t, &t.a, &cg.path, STREAM, 5001);
    let (r2, d2) = stream_from(&t, &a2, &cg.path, STREAM, 5501);
    let rejoin = rejoin(&t, &a2, &cg.path);
    std::thread::sleep(Duration::from_millis(500));
    let text = scrape(&t.b);
    let log = fs::read_to_string(&d.log).unwrap_or_default();
    Measured {
        injected: t.injected(),
        invisible: t.invisible(),
        received: r1 + r2 + rejoin.received,
        differing: d1 + d2 + rejoin.differing,
        rejoin: Some(rejoin.summary(&text, &series)),
        kernel_csum_errors: metric(&text, kernel) - metric(&before, kernel),
        residual: learned_residuals(&log).join(","),
        aggregated: metric(&text, aggregated) - metric(&before, aggregated),
        captured: captured(s.name),
        ..Measured::from_scrape(&text, series)
    }
}

/// The residuals the shared-NAT scenario's two SAs must learn, sorted as their text.
pub(crate) fn shared_nat_residuals() -> String {
    let x = &V4;
    let mut want: Vec<String> = [x.a, A2, A_RETURNED]
        .iter()
        .map(|orig| {
            let mut p = PeerSpec::new(parse_cidr(x.r_b).expect("cidr"), Mode::Observe);
            p.nat = Some(NatAddresses {
                original_src: orig.parse().expect("ip"),
                original_dst: x.b.parse().expect("ip"),
                observed_src: x.r_b.parse().expect("ip"),
                observed_dst: x.b.parse().expect("ip"),
            });
            format!("{:#06x}", p.expected_residual().expect("same family"))
        })
        .collect();
    want.sort_unstable();
    want.dedup();
    assert_eq!(
        want.len(),
        3,
        "the three addresses must leave different residuals"
    );
    want.join(",")
}

/// A's private address when it comes back on the same NAT mapping.
pub(crate) const A_RETURNED: &str = "10.1.0.5";

/// What the returning host's phase measured.
pub(crate) struct Rejoin {
    /// Bytes both streams of the phase received, and how many differed.
    received: u64,
    differing: u64,
    /// The returning host's stream was byte-exact (and A2's meanwhile).
    exact: bool,
    /// The peer's mismatches and learning segments before the phase.
    mismatches_before: u64,
    learning_before: u64,
}

impl Rejoin {
    /// `learned=N,mismatches=M,exact=yes|no` for the result line: the segments the new SA
    /// learned from, and the mismatches the phase added (A2's injected corruption: the
    /// scenario's totals compare every mismatch with what was injected, so a false one on the
    /// returning host's SA fails them).
    fn summary(&self, text: &str, series: &impl Fn(&str) -> String) -> String {
        format!(
            "learned={},mismatches={},exact={}",
            metric(text, &series("learning_packets_total")) - self.learning_before,
            metric(text, &series("checksum_mismatches_total")) - self.mismatches_before,
            if self.exact { "yes" } else { "no" }
        )
    }
}

/// A leaves: its SAs go on both ends and its NAT mapping expires. It comes back with another
/// private address and new SAs (reqid 1 on B again), and the port-preserving NAT gives it the
/// same public address and port. Meanwhile A2 streams through its own SA. Returns what the
/// phase measured.
fn rejoin(t: &Topology, a2: &Netns, cg: &std::path::Path) -> Rejoin {
    let x = t.addrs;
    let nat = x.r_b;
    let peer = format!("{nat}/32");
    let text = scrape(&t.b);
    let before = |name: &str| {
        metric(
            &text,
            &format!("natt_monitor_{name}{{peer=\"{peer}\",proto=\"tcp\"}}"),
        )
    };
    let (mismatches_before, learning_before) = (
        before("checksum_mismatches_total"),
        before("learning_packets_total"),
    );
    sh(&["ip", "-n", &t.a.name, "xfrm", "state", "flush"]);
    sh(&["ip", "-n", &t.a.name, "xfrm", "policy", "flush"]);
    for (src, dst, spi) in [(nat, x.b, "0x1001"), (x.b, nat, "0x2001")] {
        sh(&[
            "ip", "-n", &t.b.name, "xfrm", "state", "delete", "src", src, "dst", dst, "proto",
            "esp", "spi", spi,
        ]);
    }
    sh(&["ip", "-n", &t.a.name, "addr", "flush", "dev", "va"]);
    sh(&[
        "ip",
        "-n",
        &t.a.name,
        "addr",
        "add",
        &format!("{A_RETURNED}/24"),
        "dev",
        "va",
    ]);
    sh(&[
        "ip", "-n", &t.a.name, "route", "replace", "default", "via", x.r_a,
    ]);
    // The old mapping expires 2 s after its last packet.
    t.wait_mapping_gone(x.a);
    host_sas(&t.a, A_RETURNED, x.b, "0x1003", "0x2003", 4500);
    b_sas(t, "0x1003", "0x2003", 4500, "1");
    let (ra, da, rb, db) = std::thread::scope(|scope| {
        let other = scope.spawn(|| stream_from(t, a2, cg, STREAM, 5502));
        std::thread::sleep(Duration::from_millis(200));
        let (ra, da) = stream_from(t, &t.a, cg, STREAM, 5002);
        let (rb, db) = other
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e));
        (ra, da, rb, db)
    });
    // B's SAs send to R:4500, so the returning host's stream completes only if the NAT gave
    // it the departed host's mapping: the byte-exact stream is the proof it did.
    Rejoin {
        received: ra + rb,
        differing: da + db,
        exact: (ra, da, rb, db) == (STREAM, 0, STREAM, 0),
        mismatches_before,
        learning_before,
    }
}
