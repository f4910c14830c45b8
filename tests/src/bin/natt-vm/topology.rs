//! The namespaces, routes, NAT and corruption rule of one scenario, and the hand-made SAs.

use std::{
    fmt::Write as _,
    fs,
    net::UdpSocket,
    os::fd::AsRawFd as _,
    process::Command,
    sync::atomic::{AtomicU64, Ordering},
};

use natt_monitor_tests::net::{Netns, sh};

use crate::{
    plan::{
        Addrs, CORRUPT_BIT, CORRUPT_EVERY, FLOOD_KBYTES, PLAINTEXT_PORT, RANDOM_FLIP_BYTES,
        REKEYED_SPI, ZERO_RUN_BIT, ZERO_RUN_BYTES,
    },
    processes::Daemon,
    scenarios::{Corruption, Scenario, Setup},
    strongswan::{start_charon, swanctl, swanctl_conf},
};

pub(crate) fn ns_sh(ns: &Netns, args: &[&str]) {
    let mut v = vec!["ip", "netns", "exec", ns.name.as_str()];
    v.extend_from_slice(args);
    sh(&v);
}

pub(crate) fn ns_out(ns: &Netns, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("spawning {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub(crate) struct Topology {
    pub(crate) addrs: &'static Addrs,
    pub(crate) a: Netns,
    pub(crate) r: Netns,
    pub(crate) b: Netns,
    /// `Setup::Undiscovered`: a network namespace of its own for natt-monitor, without
    /// interfaces or SAs (the daemon runs in B's otherwise).
    pub(crate) m: Option<Netns>,
    /// UDP 4500 sockets with `UDP_ENCAP_ESPINUDP`, one per end; ESP-in-UDP is only decapsulated
    /// while such a socket exists.
    pub(crate) _encap: Vec<UdpSocket>,
    /// The byte every stream repeats (`natt-peer --fill`), or `None` for the pattern.
    pub(crate) fill: Option<u8>,
    /// Corruptions the receivers found delivered but invisible to any checksum (see
    /// `traffic::stream`): since the corruption rules were last added, and in all.
    pub(crate) invisible: AtomicU64,
    pub(crate) invisible_total: AtomicU64,
}

pub(crate) fn set_udp_option(s: &UdpSocket, name: libc::c_int, value: libc::c_int, what: &str) {
    // SAFETY: valid socket fd and a c_int option of the right size.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_UDP,
            name,
            (&raw const value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "{what}: {}", std::io::Error::last_os_error());
}

/// UDP `port` with `UDP_ENCAP_ESPINUDP` (as an IKE daemon sets it), optionally `UDP_GRO` too.
pub(crate) fn encap_socket(ns: &Netns, gro: bool, addrs: &Addrs, port: u16) -> UdpSocket {
    ns.enter(|| {
        let s = UdpSocket::bind(Addrs::sock(addrs.any, port)).expect("bind encapsulation port");
        // UDP_GRO first: the kernel picks the encapsulation's GRO handler when UDP_ENCAP is set.
        if gro {
            set_udp_option(&s, 104, 1, "UDP_GRO");
        }
        set_udp_option(&s, 100, 2, "UDP_ENCAP = UDP_ENCAP_ESPINUDP");
        if addrs.host_prefix == 128 {
            // IPv6 UDP carries a mandatory checksum, which the corruption rule cannot fix up; it
            // zeroes it instead (RFC 6935 allows zero checksums for tunnels), and this accepts
            // them. Without it UDP, not natt-monitor, would drop every corrupted packet.
            set_udp_option(&s, 102, 1, "UDP_NO_CHECK6_RX");
        }
        s
    })
}

impl Topology {
    pub(crate) fn new(s: &Scenario) -> Self {
        Self::with_b(s, Netns::new("vmb"))
    }

    /// As `new`, with `b` as B (the systemd guest's host namespace).
    pub(crate) fn with_b(s: &Scenario, b: Netns) -> Self {
        let plan = s.addrs();
        let (a, r) = (Netns::new("vma"), Netns::new("vmr"));
        sh(&[
            "ip", "link", "add", "va", "netns", &a.name, "type", "veth", "peer", "name", "ra",
            "netns", &r.name,
        ]);
        sh(&[
            "ip", "link", "add", "vb", "netns", &b.name, "type", "veth", "peer", "name", "rb",
            "netns", &r.name,
        ]);
        for (ns, dev, addr) in [
            (&a, "va", plan.a),
            (&r, "ra", plan.r_a),
            (&r, "rb", plan.r_b),
            (&b, "vb", plan.b),
        ] {
            let cidr = format!("{addr}/{}", plan.prefix);
            let mut args = vec!["ip", "-n", &ns.name, "addr", "add", &cidr, "dev", dev];
            if s.v6 {
                // No duplicate address detection: the address is usable at once.
                args.push("nodad");
            }
            sh(&args);
            sh(&["ip", "-n", &ns.name, "link", "set", dev, "up"]);
        }
        sh(&[
            "ip", "-n", &a.name, "route", "add", "default", "via", plan.r_a,
        ]);
        sh(&[
            "ip", "-n", &b.name, "route", "add", "default", "via", plan.r_b,
        ]);
        r.enter(|| fs::write(plan.forwarding, "1").expect("forwarding"));
        if s.nat {
            ns_sh(
                &r,
                &[
                    "nft",
                    "add table ip nat; add chain ip nat post { type nat hook postrouting priority 100; }; add rule ip nat post oifname rb masquerade",
                ],
            );
        }
        let encap = if s.encap && s.setup != Setup::StrongSwan {
            let gro = s.setup == Setup::Gro;
            vec![
                encap_socket(&a, gro, plan, 4500),
                encap_socket(&b, gro, plan, 4500),
            ]
        } else {
            Vec::new()
        };
        Self {
            addrs: plan,
            a,
            r,
            b,
            m: (s.setup == Setup::Undiscovered).then(|| Netns::new("vmm")),
            _encap: encap,
            fill: s.corruption.fill(),
            invisible: AtomicU64::new(0),
            invisible_total: AtomicU64::new(0),
        }
    }

    /// The address B sees A's packets come from.
    /// Where natt-monitor runs (and is scraped): B's network namespace, or its own.
    pub(crate) fn mon(&self) -> &Netns {
        self.m.as_ref().unwrap_or(&self.b)
    }

    pub(crate) fn a_seen_by_b(&self, nat: bool) -> &'static str {
        if nat { self.addrs.r_b } else { self.addrs.a }
    }

    /// SAs and TCP policies on one end: `local`/`remote` as that end addresses them.
    pub(crate) fn sas(
        ns: &Netns,
        local: &str,
        remote: &str,
        out_spi: &str,
        in_spi: &str,
        s: &Scenario,
    ) {
        let enc = s.cipher.xfrm();
        let encap = s.encap.then_some((4500, 4500, s.addrs().any));
        for (src, dst, spi) in [(local, remote, out_spi), (remote, local, in_spi)] {
            xfrm_state(ns, src, dst, spi, "0", enc, encap);
        }
        tcp_policy(ns, local, remote, "out", None, "0");
        tcp_policy(ns, remote, local, "in", None, "0");
    }

    /// Makes the SAs; for strongSwan, returns the two charon daemons (kept alive by the caller).
    pub(crate) fn add_sas(&self, s: &Scenario) -> Vec<Daemon> {
        if s.setup == Setup::StrongSwan {
            let x = self.addrs;
            let b = start_charon(&self.b, "b", &swanctl_conf(x.b, "%any", "b", "a"));
            let a = start_charon(&self.a, "a", &swanctl_conf(x.a, x.b, "a", "b"));
            let out = swanctl(
                &self.a,
                "a",
                &["--initiate", "--child", "t", "--timeout", "60"],
            );
            assert!(
                out.status.success(),
                "swanctl --initiate: {}{}; charon a log:\n{}\ncharon b log:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                fs::read_to_string("/tmp/ss-a/charon.log").unwrap_or_default(),
                fs::read_to_string("/tmp/ss-b/charon.log").unwrap_or_default(),
            );
            return vec![a, b];
        }
        let x = self.addrs;
        Self::sas(&self.a, x.a, x.b, "0x1001", "0x2001", s);
        Self::sas(&self.b, x.b, self.a_seen_by_b(s.nat), "0x2001", "0x1001", s);
        Vec::new()
    }

    /// Rekeys the SA from A to B by hand, as an IKE daemon does (make before break): B's new
    /// inbound SA, then A's new outbound SA, then A's old outbound SA deleted, so that A's
    /// traffic moves to the new SPI while B's old SA is still alive.
    pub(crate) fn rekey_a_to_b(&self, s: &Scenario) {
        let x = self.addrs;
        let enc = s.cipher.xfrm();
        let encap = s.encap.then_some((4500, 4500, s.addrs().any));
        xfrm_state(
            &self.b,
            self.a_seen_by_b(s.nat),
            x.b,
            REKEYED_SPI,
            "0",
            enc,
            encap,
        );
        xfrm_state(&self.a, x.a, x.b, REKEYED_SPI, "0", enc, encap);
        sh(&[
            "ip",
            "-n",
            &self.a.name,
            "xfrm",
            "state",
            "delete",
            "src",
            x.a,
            "dst",
            x.b,
            "proto",
            "esp",
            "spi",
            "0x1001",
        ]);
    }

    /// Makes R's UDP NAT mappings expire 2 s after their last packet (from their next packet
    /// on), so that a mapping can be made to move.
    pub(crate) fn expire_udp_mappings_fast(&self) {
        for timeout in [
            "nf_conntrack_udp_timeout",
            "nf_conntrack_udp_timeout_stream",
        ] {
            ns_sh(
                &self.r,
                &[
                    "sh",
                    "-c",
                    &format!("echo 2 > /proc/sys/net/netfilter/{timeout}"),
                ],
            );
        }
    }

    /// Waits until R's connection tracking holds no UDP mapping from `addr` (a host that left):
    /// until then R would map a host returning on the same port elsewhere and send B's
    /// replies to the departed address. Needs `expire_udp_mappings_fast` before the mapping's
    /// last packet.
    pub(crate) fn wait_mapping_gone(&self, addr: &str) {
        let needle = format!(" src={addr} ");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let table = ns_out(&self.r, &["cat", "/proc/net/nf_conntrack"]);
            let held: Vec<&str> = table
                .lines()
                .filter(|l| l.contains(" udp ") && l.contains(&needle))
                .collect();
            if held.is_empty() {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "R still maps {addr} 30 s after it left:\n{}",
                held.join("\n")
            );
            std::thread::sleep(std::time::Duration::from_millis(250));
        }
    }

    /// Moves A's NAT mapping from R's port 4500 to 4600, the way a NAT rebinding does: A's ESP
    /// packets (both ways) are held back at R before connection tracking sees them, until the
    /// mapping expired; R then maps A's port 4500 to 4600; B's SAs with A get the new port in
    /// place (`ip xfrm state update`, as an IKE daemon does on a mapping change); and the packets
    /// flow again. Needs `expire_udp_mappings_fast` before the mapping's last packet. `held` runs
    /// once the packets are held back; what it returns is returned.
    pub(crate) fn rebind_a(&self, s: &Scenario, held: impl FnOnce() -> bool) -> bool {
        ns_sh(
            &self.r,
            &[
                "nft",
                "add table ip natt_hold; add chain ip natt_hold pre { type filter hook prerouting priority -300; }; \
                 add rule ip natt_hold pre udp sport 4500 drop; add rule ip natt_hold pre udp dport 4500 drop",
            ],
        );
        let during = held();
        std::thread::sleep(std::time::Duration::from_secs(3));
        ns_sh(
            &self.r,
            &[
                "nft",
                "insert rule ip nat post oifname rb udp sport 4500 counter masquerade to :4600",
            ],
        );
        let x = self.addrs;
        let enc = s.cipher.xfrm();
        let r = self.a_seen_by_b(s.nat);
        xfrm_state_op(
            &self.b,
            "update",
            r,
            x.b,
            "0x1001",
            "0",
            enc,
            Some((4600, 4500, x.any)),
        );
        xfrm_state_op(
            &self.b,
            "update",
            x.b,
            r,
            "0x2001",
            "0",
            enc,
            Some((4500, 4600, x.any)),
        );
        ns_sh(&self.r, &["nft", "delete table ip natt_hold"]);
        during
    }

    /// NAT mappings R made on its port 4600 (`rebind_a`; the rule counts each mapping's first
    /// packet), and whether B's SA from A names that port.
    pub(crate) fn rebound(&self) -> (u64, bool) {
        let out = ns_out(&self.r, &["nft", "list", "chain", "ip", "nat", "post"]);
        let words: Vec<&str> = out.split_whitespace().collect();
        let packets = words
            .windows(2)
            .find(|w| w[0] == "packets")
            .and_then(|w| w[1].parse().ok())
            .unwrap_or(0);
        let sa = ns_out(&self.b, &["ip", "xfrm", "state", "list", "spi", "0x1001"]);
        (packets, sa.contains("sport 4600"))
    }

    /// True if B's SA with `spi` decapsulated any packet.
    pub(crate) fn carried(&self, spi: &str) -> bool {
        let out = ns_out(&self.b, &["ip", "-s", "xfrm", "state", "list", "spi", spi]);
        // "lifetime current:" is followed by "<n>(bytes), <n>(packets)".
        out.split_whitespace().any(|w| {
            w.strip_suffix("(packets)")
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|n| n > 0)
        })
    }

    pub(crate) fn corrupt(&self, s: &Scenario) {
        let x = self.addrs;
        self.corrupt_with(s, s.corruption, &format!("{} {}", x.saddr, x.a));
    }

    /// Adds the corruption rules of `corruption` on R, for the ESP packets that `from` (nft
    /// match expressions) selects. Their counters are what `injected` reads; `uncorrupt`
    /// removes them.
    pub(crate) fn corrupt_with(&self, s: &Scenario, corruption: Corruption, from: &str) {
        let x = self.addrs;
        let what = if s.encap { "udp dport 4500" } else { x.esp };
        let family = x.nft_family;
        // IPv6: zero the outer UDP checksum too (see `encap_socket`).
        let zero_udp_csum = if s.v6 && s.encap {
            " @th,48,16 set 0"
        } else {
            ""
        };
        if let Corruption::RandomBitFlip { every } = corruption {
            // One draw per packet picks at most one of eight chains, each flipping the lowest
            // bit of its own payload byte: a packet is never corrupted twice, so the chains'
            // counters add up to the packets corrupted.
            let mut script = format!(
                "add table {family} natt; add chain {family} natt corrupt {{ type filter hook forward priority 0; }}; "
            );
            let mut map = Vec::new();
            for (i, byte) in RANDOM_FLIP_BYTES.iter().enumerate() {
                let _ = write!(
                    script,
                    "add chain {family} natt flip{i}; add rule {family} natt flip{i} counter @th,{},1 set 1{zero_udp_csum}; ",
                    byte * 8 + 7
                );
                map.push(format!("{i} : jump flip{i}"));
            }
            let _ = write!(
                script,
                "add rule {family} natt corrupt {from} {what} meta length > 1000 numgen random mod {} vmap {{ {} }}",
                every * 8,
                map.join(", ")
            );
            ns_sh(&self.r, &["nft", &script]);
            return;
        }
        let (every, set) = match corruption {
            Corruption::Word | Corruption::WordFromStart => (
                CORRUPT_EVERY,
                format!("@th,{CORRUPT_BIT},32 set 0xdeadbeef"),
            ),
            Corruption::Flood => (8, format!("@th,{CORRUPT_BIT},8 set 0xa5")),
            Corruption::ConstantDelta { every } => (every, format!("@th,{CORRUPT_BIT},8 set 0xa5")),
            // The byte's lowest bit (nft numbers bits from the most significant): 0x5a → 0x5b.
            Corruption::BitFlip { every } => (every, format!("@th,{},1 set 1", CORRUPT_BIT + 7)),
            // Four 128-bit stores: nft refuses one of 512 bits there (EOVERFLOW on 6.1).
            Corruption::ZeroRun { every } => (
                every,
                (0..ZERO_RUN_BYTES / 16)
                    .map(|i| format!("@th,{},128 set 0", ZERO_RUN_BIT + i * 128))
                    .collect::<Vec<_>>()
                    .join(" "),
            ),
            Corruption::RandomBitFlip { .. } => unreachable!("handled above"),
            Corruption::Drawn => unreachable!("the soak draws a shape for each rule"),
        };
        // Which packets: one in `every`, or for the flood all but one in 8 until its quota.
        let pick = if corruption == Corruption::Flood {
            format!("numgen inc mod {every} != 0 quota until {FLOOD_KBYTES} kbytes")
        } else {
            format!("numgen inc mod {every} == 0")
        };
        ns_sh(
            &self.r,
            &[
                "nft",
                &format!(
                    "add table {family} natt; add chain {family} natt corrupt {{ type filter hook forward priority 0; }}; \
                     add rule {family} natt corrupt {from} {what} meta length > 1000 {pick} \
                     counter {set}{zero_udp_csum}"
                ),
            ],
        );
    }

    /// Removes the corruption rules (and their counters: read `injected` first).
    pub(crate) fn uncorrupt(&self) {
        self.invisible.store(0, Ordering::SeqCst);
        ns_sh(
            &self.r,
            &[
                "nft",
                &format!("delete table {} natt", self.addrs.nft_family),
            ],
        );
    }

    /// Lets TCP to and from `PLAINTEXT_PORT` bypass IPsec on both ends: traffic that no policy
    /// covers, from the (NAT'd) peer's own address.
    pub(crate) fn allow_plaintext_tcp(&self, s: &Scenario) {
        let port = PLAINTEXT_PORT.to_string();
        let x = self.addrs;
        for (ns, local, remote) in [(&self.a, x.a, x.b), (&self.b, x.b, self.a_seen_by_b(s.nat))] {
            for (src, dst, dir, side) in [
                (local, remote, "out", "dport"),
                (remote, local, "in", "sport"),
                (local, remote, "out", "sport"),
                (remote, local, "in", "dport"),
            ] {
                sh(&[
                    "ip", "-n", &ns.name, "xfrm", "policy", "add", "src", src, "dst", dst, "proto",
                    "tcp", side, &port, "dir", dir, "priority", "10",
                ]);
            }
        }
    }

    /// Packets the corruption rules rewrote that a checksum can tell from intact ones: those
    /// the rules counted, less the corruptions the receivers found delivered with their sum
    /// unchanged (about 1 in 65,535 random corruptions, which neither the kernel's checksum
    /// nor natt-monitor can see; `traffic::stream` reports each).
    pub(crate) fn injected(&self) -> u64 {
        self.rewritten()
            .saturating_sub(self.invisible.load(Ordering::SeqCst))
    }

    /// Corruptions delivered unchanged in sum, in this scenario.
    pub(crate) fn invisible(&self) -> u64 {
        self.invisible_total.load(Ordering::SeqCst)
    }

    /// A stream's receiver found `runs` checksum-invisible corruptions.
    pub(crate) fn add_invisible(&self, runs: u64) {
        self.invisible.fetch_add(runs, Ordering::SeqCst);
        self.invisible_total.fetch_add(runs, Ordering::SeqCst);
    }

    /// Packets the corruption rules rewrote.
    fn rewritten(&self) -> u64 {
        let out = ns_out(
            &self.r,
            &["nft", "list", "table", self.addrs.nft_family, "natt"],
        );
        let words: Vec<&str> = out.split_whitespace().collect();
        let counts: Vec<u64> = words
            .windows(2)
            .filter(|w| w[0] == "packets")
            .map(|w| w[1].parse().unwrap_or_else(|_| panic!("counter in {out}")))
            .collect();
        assert!(!counts.is_empty(), "no counter in {out}");
        counts.iter().sum()
    }
}

/// `ip xfrm state add` of one transport-mode ESP SA: `enc` is the cipher and key, `encap` the
/// UDP encapsulation ports and original address (`None`: plain ESP).
pub(crate) fn xfrm_state(
    ns: &Netns,
    src: &str,
    dst: &str,
    spi: &str,
    reqid: &str,
    enc: [&str; 2],
    encap: Option<(u16, u16, &str)>,
) {
    xfrm_state_op(ns, "add", src, dst, spi, reqid, enc, encap);
}

/// As `xfrm_state`, with `op` `add` or `update` (which changes a live SA in place).
#[expect(
    clippy::too_many_arguments,
    reason = "the fields of one `ip xfrm state` command"
)]
pub(crate) fn xfrm_state_op(
    ns: &Netns,
    op: &str,
    src: &str,
    dst: &str,
    spi: &str,
    reqid: &str,
    enc: [&str; 2],
    encap: Option<(u16, u16, &str)>,
) {
    let ports = encap.map(|(sp, dp, oa)| (sp.to_string(), dp.to_string(), oa));
    let mut args = vec![
        "ip",
        "-n",
        &ns.name,
        "xfrm",
        "state",
        op,
        "src",
        src,
        "dst",
        dst,
        "proto",
        "esp",
        "spi",
        spi,
        "reqid",
        reqid,
        "mode",
        "transport",
        "enc",
        enc[0],
        enc[1],
    ];
    if let Some((sp, dp, oa)) = &ports {
        args.extend_from_slice(&["encap", "espinudp", sp, dp, oa]);
    }
    sh(&args);
}

/// One TCP policy, below the plaintext bypass of `allow_plaintext_tcp` (a lower priority number
/// wins); `port` (with `sport`/`dport`) narrows it, `reqid` picks the SA.
pub(crate) fn tcp_policy(
    ns: &Netns,
    src: &str,
    dst: &str,
    dir: &str,
    port: Option<(&str, u16)>,
    reqid: &str,
) {
    policy(ns, "tcp", src, dst, dir, port, reqid);
}

/// One transport-mode ESP policy for `proto` (`tcp`, `icmp`), as `tcp_policy` describes.
pub(crate) fn policy(
    ns: &Netns,
    proto: &str,
    src: &str,
    dst: &str,
    dir: &str,
    port: Option<(&str, u16)>,
    reqid: &str,
) {
    let p;
    let mut args = vec![
        "ip", "-n", &ns.name, "xfrm", "policy", "add", "src", src, "dst", dst, "proto", proto,
    ];
    if let Some((side, port)) = port {
        p = port.to_string();
        args.extend_from_slice(&[side, &p]);
    }
    args.extend_from_slice(&[
        "dir",
        dir,
        "priority",
        "100",
        "tmpl",
        "src",
        src,
        "dst",
        dst,
        "proto",
        "esp",
        "mode",
        "transport",
        "reqid",
        reqid,
    ]);
    sh(&args);
}
