//! Tunnels inside the SA (issue 22): after the scenario's other phases, A and B build a GRE and
//! then an IPIP tunnel (over IPv6: ip6gre and ip6tnl) whose outer packets NAT-T transport SAs
//! carry (inbound and outbound policies for protocols 47 and 4 (41) on both ends, B's tunnel remote the address B sees A by:
//! R's, behind the NAT), and A streams to B's inner address through each while R's corruption
//! rule still rewrites A's large ESP packets. The tunnel's receive path scrubs the `sec_path`
//! and keeps `esp_input_done2`'s `CHECKSUM_UNNECESSARY`, so the kernel skips the inner TCP check:
//! natt-monitor must list the tunnel from discovery (`natt_monitor_tunnels`) and count every
//! corrupted inner segment under A's peer (and drop it in enforce mode: the stream arrives
//! byte-exact), while B's `Tcp InCsumErrors` does not move, which shows the kernel skipped the
//! check. A VXLAN stream through the SA shows the other side: VXLAN's outer UDP layer consumes
//! the mark, the kernel checks and drops every corrupted inner segment itself, and natt-monitor
//! counts none of them. Then R streams to B through a GRE tunnel of its own from another
//! address, which no policy requires ESP for: never listed, never verified. The `bounded_loop` variant (5.10) verifies no
//! tunnel: the corrupted bytes reach the application.

use std::{path::Path, time::Duration};

use natt_monitor::peers::Mode;
use natt_monitor_tests::net::Netns;

use crate::{
    icmp::{Counted, counted, protect, snmp_value},
    processes::{metric, scrape},
    scenarios::Scenario,
    topology::{Topology, ns_sh, policy},
    traffic::stream_to,
};

/// Each stream's size, the tunnel devices' MTU (ESP's overhead and GRE's fit under R's 1500)
/// and the receivers' port.
const TUNNEL_BYTES: u64 = 1 << 20;
const TUNNEL_MTU: &str = "1300";
const TUNNEL_PORT: u16 = 5077;
/// R's second address on B's side, for the plaintext GRE tunnel; and that tunnel's inner net.
const R_PLAIN: &str = "10.2.0.3";

/// One tunnel through the SA: its kind, the extra `ip link add` arguments, the protocol its
/// outer packets carry, A's and B's inner addresses and their prefix length.
struct TunnelKind {
    kind: &'static str,
    args: &'static [&'static str],
    proto: &'static str,
    inner: (&'static str, &'static str),
    prefix: u8,
}

/// The tunnels through an IPv4 SA.
const KINDS_V4: [TunnelKind; 2] = [
    TunnelKind {
        kind: "gre",
        args: &[],
        proto: "47",
        inner: ("10.77.0.1", "10.77.0.2"),
        prefix: 30,
    },
    TunnelKind {
        kind: "ipip",
        args: &[],
        proto: "4",
        inner: ("10.77.1.1", "10.77.1.2"),
        prefix: 30,
    },
];

/// The tunnels through an IPv6 SA, without the encapsulation-limit option (one destination
/// option header less to walk before the protocol the policy selects).
const KINDS_V6: [TunnelKind; 2] = [
    TunnelKind {
        kind: "ip6gre",
        args: &["encaplimit", "none"],
        proto: "47",
        inner: ("fd77::1", "fd77::2"),
        prefix: 126,
    },
    TunnelKind {
        kind: "ip6tnl",
        args: &["mode", "ip6ip6", "encaplimit", "none"],
        proto: "41",
        inner: ("fd77:1::1", "fd77:1::2"),
        prefix: 126,
    },
];

/// What one tunnel's stream measured.
#[derive(Debug, Default)]
pub(crate) struct TunnelStream {
    pub(crate) kind: &'static str,
    /// `natt_monitor_tunnels` once the tunnel was up.
    pub(crate) listed: u64,
    /// `natt_monitor_tunnels_gro_on` with GRO as the kernel set it (on), and once B turned it
    /// off.
    pub(crate) gro: (u64, u64),
    pub(crate) received: u64,
    pub(crate) differing: u64,
    pub(crate) c: Counted,
}

/// What the tunnel phase measured.
#[derive(Debug, Default)]
pub(crate) struct TunnelRun {
    pub(crate) through_sa: Vec<TunnelStream>,
    /// IPv4: the VXLAN stream through the SA, whose inner segments the kernel checks itself.
    pub(crate) vxlan: Option<TunnelStream>,
    /// IPv4: the plaintext GRE stream from R.
    pub(crate) plaintext: Option<Plaintext>,
}

/// What the plaintext GRE stream from R measured: bytes received, segments verified anywhere
/// meanwhile, and `natt_monitor_tunnels` while it ran.
#[derive(Debug, Default)]
pub(crate) struct Plaintext {
    pub(crate) received: u64,
    pub(crate) verified: u64,
    pub(crate) listed: u64,
}

impl TunnelRun {
    /// Exact: through each tunnel every corrupted inner segment counted, dropped in enforce
    /// mode (the stream byte-exact), delivered in observe mode; the kernel counted nothing;
    /// the plaintext tunnel never listed or verified. On `bounded_loop`, nothing listed or
    /// verified and the corruption delivered.
    pub(crate) fn exact(&self, mode: Mode) -> bool {
        let enforce = mode == Mode::Enforce;
        let streams = self.through_sa.len() == KINDS_V4.len()
            && self.through_sa.iter().enumerate().all(|(i, t)| {
                let c = &t.c;
                let common =
                    c.injected > 0 && t.received == TUNNEL_BYTES && c.kernel_csum_errors == 0;
                if c.bounded_loop {
                    return common
                        && t.listed == 0
                        && t.gro == (0, 0)
                        && t.differing > 0
                        && c.detected + c.dropped + c.verified == 0;
                }
                common
                    && t.listed == i as u64 + 1
                    && t.gro == (1, 0)
                    && c.detected == c.injected
                    && c.dropped == if enforce { c.injected } else { 0 }
                    && (t.differing == 0) == enforce
                    // Every inner data segment judged: about one per 1,248 bytes.
                    && c.verified + c.detected > TUNNEL_BYTES / 1300
            });
        let bounded = self.through_sa.iter().any(|t| t.c.bounded_loop);
        // VXLAN's outer UDP layer consumes the mark (`__skb_checksum_validate_needed` in
        // `udp4_csum_init` lowers `csum_level`), so the kernel checks the inner segments: it
        // counts and drops every corrupted one, TCP retransmits it, and natt-monitor, which
        // never sees VXLAN's encapsulation socket, counts none of them a second time.
        let vxlan = self.vxlan.as_ref().is_none_or(|v| {
            v.c.injected > 0
                && v.received == TUNNEL_BYTES
                && v.differing == 0
                && v.c.kernel_csum_errors == v.c.injected
                && v.c.detected + v.c.dropped + v.c.verified == 0
        });
        let plaintext = self.plaintext.as_ref().is_none_or(|p| {
            p.received == TUNNEL_BYTES
                && p.verified == 0
                && p.listed == if bounded { 0 } else { KINDS_V4.len() as u64 }
        });
        streams && vxlan && plaintext
    }

    /// The result line's field.
    pub(crate) fn summary(&self) -> String {
        let mut out: Vec<String> = self
            .through_sa
            .iter()
            .map(|t| {
                format!(
                    "{}:variant={}/listed={}/gro_on={}->{}/received={}/differing={}/{}",
                    t.kind,
                    t.c.variant(),
                    t.listed,
                    t.gro.0,
                    t.gro.1,
                    t.received,
                    t.differing,
                    t.c.counts()
                )
            })
            .collect();
        if let Some(v) = &self.vxlan {
            out.push(format!(
                "vxlan:received={}/differing={}/{}",
                v.received,
                v.differing,
                v.c.counts()
            ));
        }
        if let Some(p) = &self.plaintext {
            out.push(format!(
                "plaintext_gre:received={}/verified={}/listed={}",
                p.received, p.verified, p.listed
            ));
        }
        out.join(",")
    }
}

/// `Tcp: ... InCsumErrors` of B's network namespace.
fn tcp_csum_errors(t: &Topology) -> u64 {
    snmp_value(t, "Tcp:", "InCsumErrors")
}

/// The sum of every `natt_monitor_verified_packets_total` series in `text`.
fn verified_anywhere(text: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with("natt_monitor_verified_packets_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// A tunnel device `name` of `kind` (with `args`) in `ns`, from `local` to `remote`, with inner
/// address `inner`, up, GRO as the kernel sets it (on).
fn tunnel(ns: &Netns, name: &str, (kind, args): (&str, &[&str]), ends: (&str, &str), inner: &str) {
    let (local, remote) = ends;
    let mut add = vec![
        "ip", "link", "add", name, "type", kind, "local", local, "remote", remote,
    ];
    add.extend_from_slice(args);
    ns_sh(ns, &add);
    ns_sh(ns, &["ip", "link", "set", name, "mtu", TUNNEL_MTU]);
    ns_sh(ns, &["ip", "addr", "add", inner, "dev", name]);
    ns_sh(ns, &["ip", "link", "set", name, "up"]);
}

/// Turns GRO off on B's tunnel `name` (the documented remedy: GRO on a tunnel device merges
/// inner segments, whose checksums are then gone) and returns `natt_monitor_tunnels_gro_on`
/// before and after (the link notification makes discovery look again).
fn gro_remedy(t: &Topology, name: &str) -> (u64, u64) {
    let gro_on = || metric(&scrape(t.mon()), "natt_monitor_tunnels_gro_on");
    let before = gro_on();
    ns_sh(&t.b, &["ethtool", "-K", name, "gro", "off"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while gro_on() >= before && before > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    (before, gro_on())
}

/// `natt_monitor_tunnels` once it reaches `n` (discovery re-reads on the policy
/// notifications), or what it is after 10 s: a variant that lists no tunnel never gets there.
fn tunnels_listed(t: &Topology, n: u64) -> u64 {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let listed = metric(&scrape(t.mon()), "natt_monitor_tunnels");
        if listed >= n || std::time::Instant::now() > deadline {
            return listed;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The phase: a GRE and an IPIP tunnel through the SA (IPv6: ip6gre and ip6tnl), then, over
/// IPv4, VXLAN through the SA and a plaintext GRE tunnel from R. `peer` is the peer label of
/// A's SA on B; the receivers run in `cg`.
pub(crate) fn through_tunnels(t: &Topology, s: &Scenario, cg: &Path, peer: &str) -> TunnelRun {
    let addrs = t.addrs;
    let a_seen = t.a_seen_by_b(s.nat);
    let mut run = TunnelRun::default();
    let kinds = if s.v6 { &KINDS_V6 } else { &KINDS_V4 };
    for (i, k) in kinds.iter().enumerate() {
        let name = format!("t{}", k.kind);
        let (inner_a, inner_b) = k.inner;
        // The links first, then the policies, whose notifications make discovery look again.
        let inner = |a: &str| format!("{a}/{}", k.prefix);
        tunnel(
            &t.a,
            &name,
            (k.kind, k.args),
            (addrs.a, addrs.b),
            &inner(inner_a),
        );
        tunnel(
            &t.b,
            &name,
            (k.kind, k.args),
            (addrs.b, a_seen),
            &inner(inner_b),
        );
        protect(t, s, k.proto);
        let listed = tunnels_listed(t, i as u64 + 1);
        let gro = gro_remedy(t, &name);
        let (recv, counts) = counted(t, peer, "tcp", tcp_csum_errors, || {
            stream_to(t, &t.a, cg, inner_b, TUNNEL_BYTES, TUNNEL_PORT, &[])
        });
        run.through_sa.push(TunnelStream {
            kind: k.kind,
            listed,
            gro,
            received: recv.received,
            differing: recv.differing,
            c: counts,
        });
    }
    if s.v6 {
        return run;
    }
    run.vxlan = Some(through_vxlan(t, s, cg, peer));
    run.plaintext = Some(plaintext_gre(t, s, cg));
    run
}

/// Plaintext GRE from R's second address to B (in `cg`): never listed, never verified.
fn plaintext_gre(t: &Topology, s: &Scenario, cg: &Path) -> Plaintext {
    let addrs = t.addrs;
    // Plaintext GRE from R's second address, which R's masquerade leaves alone: no SA comes
    // from it, and the only policy for it lets GRE in without ESP (`level use`); adding that
    // policy makes discovery look again.
    ns_sh(
        &t.r,
        &["ip", "addr", "add", &format!("{R_PLAIN}/24"), "dev", "rb"],
    );
    if s.nat {
        ns_sh(
            &t.r,
            &[
                "nft",
                &format!("insert rule ip nat post ip saddr {R_PLAIN} accept"),
            ],
        );
    }
    tunnel(
        &t.r,
        "tplain",
        ("gre", &[]),
        (R_PLAIN, addrs.b),
        "10.78.0.1/30",
    );
    tunnel(
        &t.b,
        "tplain",
        ("gre", &[]),
        (addrs.b, R_PLAIN),
        "10.78.0.2/30",
    );
    ns_sh(
        &t.b,
        &[
            "ip",
            "xfrm",
            "policy",
            "add",
            "src",
            R_PLAIN,
            "dst",
            addrs.b,
            "proto",
            "47",
            "dir",
            "in",
            "tmpl",
            "src",
            R_PLAIN,
            "dst",
            addrs.b,
            "proto",
            "esp",
            "mode",
            "transport",
            "level",
            "use",
        ],
    );
    std::thread::sleep(Duration::from_secs(1));
    let before = scrape(t.mon());
    let plain = stream_to(t, &t.r, cg, "10.78.0.2", TUNNEL_BYTES, TUNNEL_PORT + 1, &[]);
    std::thread::sleep(Duration::from_millis(500));
    let after = scrape(t.mon());
    Plaintext {
        received: plain.received,
        verified: verified_anywhere(&after) - verified_anywhere(&before),
        listed: metric(&after, "natt_monitor_tunnels"),
    }
}

/// VXLAN (UDP port 4789) through the SA, with policies for that port alone: the kernel's own
/// inner check catches every corruption, natt-monitor counts nothing.
fn through_vxlan(t: &Topology, s: &Scenario, cg: &Path, peer: &str) -> TunnelStream {
    let addrs = t.addrs;
    let a_seen = t.a_seen_by_b(s.nat);
    for (ns, local, remote, inner) in [
        (&t.a, addrs.a, addrs.b, "10.77.2.1"),
        (&t.b, addrs.b, a_seen, "10.77.2.2"),
    ] {
        ns_sh(
            ns,
            &[
                "ip", "link", "add", "tvxlan", "type", "vxlan", "id", "77", "local", local,
                "remote", remote, "dstport", "4789",
            ],
        );
        ns_sh(ns, &["ip", "link", "set", "tvxlan", "mtu", TUNNEL_MTU]);
        ns_sh(
            ns,
            &["ip", "addr", "add", &format!("{inner}/30"), "dev", "tvxlan"],
        );
        ns_sh(ns, &["ip", "link", "set", "tvxlan", "up"]);
        for (src, dst, dir) in [(local, remote, "out"), (remote, local, "in")] {
            policy(ns, "udp", src, dst, dir, Some(("dport", 4789)), "0");
        }
    }
    let (recv, counts) = counted(t, peer, "tcp", tcp_csum_errors, || {
        stream_to(t, &t.a, cg, "10.77.2.2", TUNNEL_BYTES, TUNNEL_PORT + 2, &[])
    });
    TunnelStream {
        kind: "vxlan",
        listed: 0,
        gro: (0, 0),
        received: recv.received,
        differing: recv.differing,
        c: counts,
    }
}
