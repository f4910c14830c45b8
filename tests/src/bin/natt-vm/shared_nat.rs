//! The scenario with two hosts behind one NAT address.

use std::{fs, time::Duration};

use natt_monitor::peers::{Mode, NatAddresses, PeerSpec, parse_cidr};
use natt_monitor_tests::net::{Cgroup, Netns, sh};

use crate::{
    plan::{A2, CORRUPT_BIT, CORRUPT_EVERY, NULL_CIPHER, R_A2, STREAM, V4, WARMUP},
    processes::{captured, metric, scrape, start_monitor, wait_until},
    run::Measured,
    scenarios::Scenario,
    topology::{Topology, encap_socket, ns_sh, tcp_policy, xfrm_state},
    traffic::stream_from,
};

/// Two hosts with different private addresses behind one masquerading NAT, each with its own
/// SAs to B: A (10.1.0.1, encapsulation port 4500, reqid 1, TCP ports 5000/5001 on B) and A2
/// (10.3.0.1, port 4501, reqid 2, TCP ports 5100/5101). B sees both as R's address; their NAT
/// residuals differ, and each SA must be verified against its own.
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
        ("0x1001", "0x2001", 4500, "1", [5000, 5001]),
        ("0x1002", "0x2002", 4501, "2", [5100, 5101]),
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
        fs::read_to_string(&d.log)
            .unwrap_or_default()
            .matches("NAT residual learned")
            .count()
            == 2
    });
    let aggregated = "natt_monitor_skipped_packets_total{reason=\"aggregated\"}";
    let kernel = "natt_monitor_kernel_tcp_in_csum_errors_total";
    let before = scrape(&t.b);
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
    std::thread::sleep(Duration::from_millis(500));
    let text = scrape(&t.b);
    let log = fs::read_to_string(&d.log).unwrap_or_default();
    let mut residuals: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("NAT residual learned"))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("residual="))
        })
        .collect();
    residuals.sort_unstable();
    Measured {
        injected: t.injected(),
        detected: metric(&text, &series("checksum_mismatches_total")),
        dropped: metric(&text, &series("dropped_packets_total")),
        verified: metric(&text, &series("verified_packets_total")),
        learning: metric(&text, &series("learning_packets_total")),
        withdrawn: metric(&text, "natt_monitor_residuals_withdrawn_total"),
        received: r1 + r2,
        differing: d1 + d2,
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
    let mut want: Vec<String> = [x.a, A2]
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
    assert_ne!(
        want[0], want[1],
        "the two hosts must leave different residuals"
    );
    want.join(",")
}
