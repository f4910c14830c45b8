//! The scenario with two hosts behind one NAT address.

use std::{fs, time::Duration};

use natt_monitor::peers::{Mode, NatAddresses, PeerSpec, parse_cidr};
use natt_monitor_tests::net::{Cgroup, Netns, sh};

use crate::{
    plan::{A2, CORRUPT_BIT, CORRUPT_EVERY, NULL_CIPHER, R_A2, STREAM, V4, WARMUP},
    processes::{captured, learned_into_b, metric, scrape, start_monitor, wait_until},
    run::Measured,
    scenarios::Scenario,
    topology::{Topology, encap_socket, ns_sh, tcp_policy, xfrm_state},
    traffic::stream_from,
};

/// Two hosts with different private addresses behind one masquerading NAT, each with its own
/// SAs to B: A (10.1.0.1, encapsulation port 4500, reqid 1, TCP ports 5000-5002 on B) and A2
/// (10.3.0.1, port 4501, reqid 2, TCP ports 5100-5102). B sees both as R's address; their NAT
/// residuals differ, and each SA must be verified against its own. Then A leaves (its SAs
/// deleted on both ends) and comes back with another private address, on the same NAT mapping
/// (R:4500), while A2 keeps streaming: the new SA must learn its own residual, never inherit
/// the departed one's (`rejoin`).
#[expect(
    clippy::too_many_lines,
    reason = "one scenario from set-up to readings, in the order it happens"
)]
pub(crate) fn run_shared_nat(s: &Scenario) -> Measured {
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
    let _encap2 = encap_socket(&a2, false, x, 4501);
    let cg = Cgroup::new();
    let d = start_monitor(&t.b, s.mode, s.name);
    let nat = x.r_b;
    // A and A2: one pair of SAs each, every TCP segment to B through them.
    for (ns, me, spi_out, spi_in, port) in [
        (&t.a, x.a, "0x1001", "0x2001", 4500),
        (&a2, A2, "0x1002", "0x2002", 4501),
    ] {
        xfrm_state(
            ns,
            me,
            x.b,
            spi_out,
            "0",
            NULL_CIPHER,
            Some((port, 4500, x.any)),
        );
        xfrm_state(
            ns,
            x.b,
            me,
            spi_in,
            "0",
            NULL_CIPHER,
            Some((4500, port, x.any)),
        );
        tcp_policy(ns, me, x.b, "out", None, "0");
        tcp_policy(ns, x.b, me, "in", None, "0");
    }
    // B: both pairs from and to the NAT's address, told apart by reqid; the TCP port picks it.
    for (spi_in, spi_out, port, reqid, tcp_ports) in [
        ("0x1001", "0x2001", 4500, "1", [5000, 5001, 5002]),
        ("0x1002", "0x2002", 4501, "2", [5100, 5101, 5102]),
    ] {
        xfrm_state(
            &t.b,
            nat,
            x.b,
            spi_in,
            reqid,
            NULL_CIPHER,
            Some((port, 4500, x.any)),
        );
        xfrm_state(
            &t.b,
            x.b,
            nat,
            spi_out,
            reqid,
            NULL_CIPHER,
            Some((4500, port, x.any)),
        );
        for p in tcp_ports {
            tcp_policy(&t.b, nat, x.b, "in", Some(("dport", p)), reqid);
            tcp_policy(&t.b, x.b, nat, "out", Some(("sport", p)), reqid);
        }
    }
    let peer = format!("{nat}/32");
    let series = |name: &str| format!("natt_monitor_{name}{{peer=\"{peer}\",proto=\"tcp\"}}");
    wait_until(
        &t.b,
        &d,
        "the NAT's address is discovered as one peer",
        |b| metric(&scrape(b), "natt_monitor_peers{source=\"xfrm\"}") == 1,
    );
    for (from, port) in [(&t.a, 5000), (&a2, 5100)] {
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
    let (r2, d2) = stream_from(&t, &a2, &cg.path, STREAM, 5101);
    let rejoin = rejoin(&t, &a2, &cg.path);
    std::thread::sleep(Duration::from_millis(500));
    let text = scrape(&t.b);
    let log = fs::read_to_string(&d.log).unwrap_or_default();
    let mut residuals: Vec<&str> = learned_into_b(&log)
        .into_iter()
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("residual="))
        })
        .collect();
    residuals.sort_unstable();
    Measured {
        injected: t.injected(),
        detected: metric(&text, &series("checksum_mismatches_total")),
        learning_mismatches: metric(&text, &series("learning_mismatches_total")),
        dropped: metric(&text, &series("dropped_packets_total")),
        verified: metric(&text, &series("verified_packets_total")),
        learning: metric(&text, &series("learning_packets_total")),
        withdrawn: metric(&text, "natt_monitor_residuals_withdrawn_total"),
        confirmed: metric(&text, "natt_monitor_residuals_confirmed_total"),
        evicted: metric(&text, "natt_monitor_residuals_evicted_total"),
        received: r1 + r2 + rejoin.received,
        differing: d1 + d2 + rejoin.differing,
        rejoin: Some(rejoin.summary(&text, &series)),
        kernel_csum_errors: metric(&text, kernel) - metric(&before, kernel),
        xfrm_peers: metric(&text, "natt_monitor_peers{source=\"xfrm\"}"),
        residual: residuals.join(","),
        aggregated: metric(&text, aggregated) - metric(&before, aggregated),
        captured: captured(s.name),
        ..Measured::default()
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
    std::thread::sleep(Duration::from_secs(4));
    xfrm_state(
        &t.a,
        A_RETURNED,
        x.b,
        "0x1003",
        "0",
        NULL_CIPHER,
        Some((4500, 4500, x.any)),
    );
    xfrm_state(
        &t.a,
        x.b,
        A_RETURNED,
        "0x2003",
        "0",
        NULL_CIPHER,
        Some((4500, 4500, x.any)),
    );
    tcp_policy(&t.a, A_RETURNED, x.b, "out", None, "0");
    tcp_policy(&t.a, x.b, A_RETURNED, "in", None, "0");
    xfrm_state(
        &t.b,
        nat,
        x.b,
        "0x1003",
        "1",
        NULL_CIPHER,
        Some((4500, 4500, x.any)),
    );
    xfrm_state(
        &t.b,
        x.b,
        nat,
        "0x2003",
        "1",
        NULL_CIPHER,
        Some((4500, 4500, x.any)),
    );
    let (ra, da, rb, db) = std::thread::scope(|scope| {
        let other = scope.spawn(|| stream_from(t, a2, cg, STREAM, 5102));
        std::thread::sleep(Duration::from_millis(200));
        let (ra, da) = stream_from(t, &t.a, cg, STREAM, 5002);
        let (rb, db) = other.join().expect("A2's stream");
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
