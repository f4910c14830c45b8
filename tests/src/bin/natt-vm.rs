//! The VM suite's driver: runs inside a QEMU guest booted by `cargo xtask vm-test`, on a real
//! Debian kernel with real ESP. Never run it on a host: it builds namespaces, SAs and nft
//! rules of its own, but it expects to be alone on the machine.
//!
//! Topology per scenario (fresh each time): namespaces A (sender, 10.1.0.1), R (router,
//! 10.1.0.2 | 10.2.0.1) and B (receiver, 10.2.0.2), transport-mode SAs between A and B, an nft
//! rule on R that overwrites 32 bits of every Nth large ESP packet and counts what it did, and
//! natt-monitor in B as users run it: attached at the cgroup2 root (every socket of the guest,
//! the IKE daemon's included), with no `--peer` at all (it must find the peer from the SAs
//! itself), default scope and offloads.
//!
//! Output protocol, read by the xtask: one `NATT-VM RESULT key=value ...` line per scenario,
//! `NATT-VM FAIL scenario=... reason=...` for a failed one, and `NATT-VM END passed=N
//! failed=M` last.

#![expect(
    clippy::print_stdout,
    reason = "stdout is this driver's protocol with the xtask"
)]

use std::{
    fs::{self, File},
    io::Write as _,
    net::UdpSocket,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use natt_monitor::peers::{Mode, NatAddresses, PeerSpec, parse_cidr};
use natt_monitor_tests::{
    http_get,
    net::{Cgroup, Netns, sh},
};

/// One address family's plan: A, R's two sides, B, and how nft and xfrm spell things.
struct Addrs {
    a: &'static str,
    r_a: &'static str,
    r_b: &'static str,
    b: &'static str,
    prefix: u8,
    host_prefix: u8,
    any: &'static str,
    nft_family: &'static str,
    saddr: &'static str,
    esp: &'static str,
    forwarding: &'static str,
}

const V4: Addrs = Addrs {
    a: "10.1.0.1",
    r_a: "10.1.0.2",
    r_b: "10.2.0.1",
    b: "10.2.0.2",
    prefix: 24,
    host_prefix: 32,
    any: "0.0.0.0",
    nft_family: "ip",
    saddr: "ip saddr",
    esp: "ip protocol esp",
    forwarding: "/proc/sys/net/ipv4/ip_forward",
};

const V6: Addrs = Addrs {
    a: "fd00:1::1",
    r_a: "fd00:1::2",
    r_b: "fd00:2::1",
    b: "fd00:2::2",
    prefix: 64,
    host_prefix: 128,
    any: "::",
    nft_family: "ip6",
    saddr: "ip6 saddr",
    esp: "meta l4proto esp",
    forwarding: "/proc/sys/net/ipv6/conf/all/forwarding",
};

impl Addrs {
    /// `addr:port` as a socket address.
    fn sock(addr: &str, port: u16) -> String {
        if addr.contains(':') {
            format!("[{addr}]:{port}")
        } else {
            format!("{addr}:{port}")
        }
    }
}
const METRICS: &str = "http://127.0.0.1:9874";
/// Bit offset into the ESP packet's transport header (UDP for NAT-T, ESP for plain ESP) of the
/// 32 bits the corruption rule overwrites: well inside the TCP payload, clear of the ESP
/// trailer, for the null cipher and for cbc(aes) alike. (nft payload offsets stop at byte 255
/// on 6.1: ERANGE beyond.)
const CORRUPT_BIT: u32 = 1600;
/// The rule corrupts every Nth ESP packet longer than 1000 bytes from A.
const CORRUPT_EVERY: u32 = 40;
const STREAM: u64 = 3 << 20;
/// TCP port that bypasses IPsec, and the UDP port plaintext datagrams go to.
const PLAINTEXT_PORT: u16 = 6000;
/// Plaintext UDP datagrams sent from A to B.
const PLAINTEXT_DATAGRAMS: u64 = 50;
const WARMUP: u64 = 64 << 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cipher {
    Null,
    CbcAes,
}

/// Who makes the SAs and what else is special.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Setup {
    /// `ip xfrm state/policy` by hand, encapsulation sockets held by the driver.
    Manual,
    /// strongSwan's `charon` in A and B negotiates the SAs (`IKEv2`, PSK, forced UDP encapsulation,
    /// transport mode), with AES-GCM: ESP's own integrity check catches wire corruption.
    StrongSwan,
    /// As `Manual`, then the conditions under which 6.12 merges decapsulated segments (GRO on
    /// B's device, `esp4_offload`, `UDP_GRO` on the encapsulation socket), measured before and
    /// after the remedy (`gro_max_size` = MTU).
    Gro,
    /// Two senders, A and A2, with different private addresses behind R's one masquerading
    /// address, each with its own SAs to B (told apart on B by reqid and TCP port): each SA
    /// must be verified against its own residual.
    SharedNat,
}

#[derive(Clone, Copy, Debug)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "each flag is an independent axis of the scenario matrix"
)]
struct Scenario {
    name: &'static str,
    setup: Setup,
    cipher: Cipher,
    mode: Mode,
    encap: bool,
    nat: bool,
    corrupt: bool,
    v6: bool,
}

impl Scenario {
    const fn addrs(&self) -> &'static Addrs {
        if self.v6 { &V6 } else { &V4 }
    }
}

const SCENARIOS: [Scenario; 10] = [
    Scenario {
        setup: Setup::Manual,
        name: "a-clean",
        cipher: Cipher::Null,
        mode: Mode::Observe,
        encap: true,
        nat: false,
        corrupt: false,
        v6: false,
    },
    Scenario {
        setup: Setup::Manual,
        name: "b-observe-null",
        cipher: Cipher::Null,
        mode: Mode::Observe,
        encap: true,
        nat: false,
        corrupt: true,
        v6: false,
    },
    Scenario {
        setup: Setup::Manual,
        name: "b-observe-cbc-aes",
        cipher: Cipher::CbcAes,
        mode: Mode::Observe,
        encap: true,
        nat: false,
        corrupt: true,
        v6: false,
    },
    Scenario {
        setup: Setup::Manual,
        name: "c-enforce",
        cipher: Cipher::Null,
        mode: Mode::Enforce,
        encap: true,
        nat: false,
        corrupt: true,
        v6: false,
    },
    Scenario {
        setup: Setup::Manual,
        name: "d-nat-learned",
        cipher: Cipher::Null,
        mode: Mode::Enforce,
        encap: true,
        nat: true,
        corrupt: true,
        v6: false,
    },
    Scenario {
        setup: Setup::Manual,
        name: "e-plain-esp",
        cipher: Cipher::Null,
        mode: Mode::Observe,
        encap: false,
        nat: false,
        corrupt: true,
        v6: false,
    },
    Scenario {
        setup: Setup::StrongSwan,
        name: "f-strongswan-nat",
        cipher: Cipher::Null,
        mode: Mode::Enforce,
        encap: true,
        nat: true,
        corrupt: true,
        v6: false,
    },
    Scenario {
        setup: Setup::Manual,
        name: "h-ipv6-enforce",
        cipher: Cipher::Null,
        mode: Mode::Enforce,
        encap: true,
        nat: false,
        corrupt: true,
        v6: true,
    },
    Scenario {
        setup: Setup::SharedNat,
        name: "i-two-behind-one-nat",
        cipher: Cipher::Null,
        mode: Mode::Enforce,
        encap: true,
        nat: true,
        corrupt: true,
        v6: false,
    },
    Scenario {
        setup: Setup::Gro,
        name: "g-gro",
        cipher: Cipher::Null,
        mode: Mode::Observe,
        encap: true,
        nat: false,
        corrupt: false,
        v6: false,
    },
];

/// A child process killed on drop; its stderr goes to a file shown on failure.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn bin(name: &str) -> PathBuf {
    std::env::current_exe()
        .expect("current exe")
        .with_file_name(name)
}

fn ns_sh(ns: &Netns, args: &[&str]) {
    let mut v = vec!["ip", "netns", "exec", ns.name.as_str()];
    v.extend_from_slice(args);
    sh(&v);
}

fn ns_out(ns: &Netns, args: &[&str]) -> String {
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

struct Topology {
    addrs: &'static Addrs,
    a: Netns,
    r: Netns,
    b: Netns,
    /// UDP 4500 sockets with `UDP_ENCAP_ESPINUDP`, one per end; ESP-in-UDP is only decapsulated
    /// while such a socket exists.
    _encap: Vec<UdpSocket>,
}

fn set_udp_option(s: &UdpSocket, name: libc::c_int, value: libc::c_int, what: &str) {
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
fn encap_socket(ns: &Netns, gro: bool, addrs: &Addrs, port: u16) -> UdpSocket {
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
    fn new(s: &Scenario) -> Self {
        let plan = s.addrs();
        let (a, r, b) = (Netns::new("vma"), Netns::new("vmr"), Netns::new("vmb"));
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
            _encap: encap,
        }
    }

    /// The address B sees A's packets come from.
    fn a_seen_by_b(&self, nat: bool) -> &'static str {
        if nat { self.addrs.r_b } else { self.addrs.a }
    }

    /// SAs and TCP policies on one end: `local`/`remote` as that end addresses them.
    fn sas(ns: &Netns, local: &str, remote: &str, out_spi: &str, in_spi: &str, s: &Scenario) {
        let enc: [&str; 2] = match s.cipher {
            Cipher::Null => NULL_CIPHER,
            Cipher::CbcAes => ["cbc(aes)", "0x00112233445566778899aabbccddeeff"],
        };
        let encap = s.encap.then_some((4500, 4500, s.addrs().any));
        for (src, dst, spi) in [(local, remote, out_spi), (remote, local, in_spi)] {
            xfrm_state(ns, src, dst, spi, "0", enc, encap);
        }
        tcp_policy(ns, local, remote, "out", None, "0");
        tcp_policy(ns, remote, local, "in", None, "0");
    }

    /// Makes the SAs; for strongSwan, returns the two charon daemons (kept alive by the caller).
    fn add_sas(&self, s: &Scenario) -> Vec<Daemon> {
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

    fn corrupt(&self, s: &Scenario) {
        let x = self.addrs;
        let what = if s.encap { "udp dport 4500" } else { x.esp };
        let (family, saddr, a) = (x.nft_family, x.saddr, x.a);
        // IPv6: zero the outer UDP checksum too (see `encap_socket`).
        let zero_udp_csum = if s.v6 && s.encap {
            " @th,48,16 set 0"
        } else {
            ""
        };
        ns_sh(
            &self.r,
            &[
                "nft",
                &format!(
                    "add table {family} natt; add chain {family} natt corrupt {{ type filter hook forward priority 0; }}; \
                     add rule {family} natt corrupt {saddr} {a} {what} meta length > 1000 numgen inc mod {CORRUPT_EVERY} == 0 \
                     counter @th,{CORRUPT_BIT},32 set 0xdeadbeef{zero_udp_csum}"
                ),
            ],
        );
    }

    /// Lets TCP to and from `PLAINTEXT_PORT` bypass IPsec on both ends: traffic that no policy
    /// covers, from the (NAT'd) peer's own address.
    fn allow_plaintext_tcp(&self, s: &Scenario) {
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

    /// Packets the corruption rules rewrote.
    fn injected(&self) -> u64 {
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

fn vici_uri(side: &str) -> String {
    format!("unix:///tmp/ss-{side}/charon.vici")
}

/// `swanctl ARGS` in `ns`, talking to that side's charon (its own configuration and socket).
fn swanctl(ns: &Netns, side: &str, args: &[&str]) -> std::process::Output {
    Command::new("ip")
        .args(["netns", "exec", &ns.name, "swanctl"])
        .args(args)
        .args(["--uri", &vici_uri(side)])
        .env("STRONGSWAN_CONF", format!("/tmp/ss-{side}/strongswan.conf"))
        .output()
        .unwrap_or_else(|e| panic!("swanctl {args:?}: {e}"))
}

/// A `swanctl.conf` for one end: `IKEv2` with a pre-shared key, UDP encapsulation forced even
/// without a NAT, a transport-mode child for TCP, ESP with AES-CBC and HMAC-SHA256.
fn swanctl_conf(local: &str, remote: &str, me: &str, them: &str) -> String {
    format!(
        r#"connections {{
  natt {{
    version = 2
    local_addrs = {local}
    remote_addrs = {remote}
    encap = yes
    dpd_delay = 2s
    proposals = aes128-sha256-modp2048
    local {{
      auth = psk
      id = {me}.natt.test
    }}
    remote {{
      auth = psk
      id = {them}.natt.test
    }}
    children {{
      t {{
        mode = transport
        local_ts = dynamic[tcp]
        remote_ts = dynamic[tcp]
        esp_proposals = aes128-sha256
      }}
    }}
  }}
}}
secrets {{
  ike-natt {{
    id-a = a.natt.test
    id-b = b.natt.test
    secret = "natt-monitor vm suite"
  }}
}}
"#
    )
}

/// Starts charon in `ns` with its own /run (its pid file is fixed) and VICI socket, and loads
/// `swanctl` into it.
fn start_charon(ns: &Netns, side: &str, swanctl_conf: &str) -> Daemon {
    let dir = PathBuf::from(format!("/tmp/ss-{side}"));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("strongSwan dir");
    let conf = dir.join("strongswan.conf");
    fs::write(
        &conf,
        format!(
            "charon {{\n  load_modular = yes\n  install_routes = no\n  plugins {{\n    include /etc/strongswan.d/charon/*.conf\n    vici {{\n      socket = {}\n    }}\n  }}\n  filelog {{\n    natt {{\n      path = {}\n      default = 1\n    }}\n  }}\n}}\n",
            vici_uri(side),
            dir.join("charon.log").display()
        ),
    )
    .expect("strongswan.conf");
    fs::write(dir.join("swanctl.conf"), swanctl_conf).expect("swanctl.conf");
    let log = dir.join("charon.stderr");
    let child = Command::new("ip")
        .args(["netns", "exec", &ns.name, "sh", "-c"])
        .arg("mount -t tmpfs tmpfs /run && exec /usr/lib/ipsec/charon")
        .env("STRONGSWAN_CONF", &conf)
        .stdout(Stdio::null())
        .stderr(File::create(&log).expect("charon log"))
        .spawn()
        .expect("spawn charon");
    let d = Daemon { child, log };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !dir.join("charon.vici").exists() {
        assert!(
            Instant::now() < deadline,
            "charon {side} did not open its VICI socket: {}{}",
            fs::read_to_string(&d.log).unwrap_or_default(),
            fs::read_to_string(dir.join("charon.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let file = dir.join("swanctl.conf");
    let out = swanctl(
        ns,
        side,
        &["--load-all", "--file", file.to_str().expect("utf-8 path")],
    );
    assert!(
        out.status.success(),
        "swanctl --load-all ({side}): {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    d
}

/// natt-monitor in B's network namespace, at the default cgroup (the cgroup2 root: every socket
/// of the guest) with the default scope.
fn start_monitor(b: &Netns, mode: Mode, name: &str) -> Daemon {
    let log = PathBuf::from(format!("/tmp/monitor-{name}.log"));
    let child = Command::new("ip")
        .args(["netns", "exec", &b.name])
        .arg(bin("natt-monitor"))
        .arg("run")
        .args(["--listen", "127.0.0.1:9874", "--mode", mode.as_str()])
        .arg("--capture")
        .arg(capture_path(name))
        .stdout(Stdio::null())
        .stderr(File::create(&log).expect("monitor log"))
        .spawn()
        .expect("spawn natt-monitor");
    let d = Daemon { child, log };
    wait_until(b, &d, "/healthz answers 200", |_| {
        b.enter(|| http_get(&format!("{METRICS}/healthz")))
            .is_ok_and(|(code, _)| code == 200)
    });
    d
}

/// Where scenario `name`'s monitor writes the mismatching packets.
fn capture_path(name: &str) -> PathBuf {
    PathBuf::from(format!("/tmp/capture-{name}.pcapng"))
}

/// Packets in scenario `name`'s capture file so far.
fn captured(name: &str) -> u64 {
    let file = File::open(capture_path(name)).expect("capture file");
    let mut r = pcap_file::pcapng::PcapNgReader::new(file).expect("a pcapng file");
    let mut n = 0;
    while let Some(block) = r.next_block() {
        if matches!(
            block.expect("a whole block"),
            pcap_file::pcapng::Block::EnhancedPacket(_)
        ) {
            n += 1;
        }
    }
    n
}

fn scrape(b: &Netns) -> String {
    b.enter(|| http_get(&format!("{METRICS}/metrics")))
        .expect("scrape /metrics")
        .1
}

/// The value of the series `series` (name with labels, exactly as exposed), 0 if absent.
fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0, |v| v.trim().parse::<u64>().expect("integer sample"))
}

fn wait_until(b: &Netns, d: &Daemon, what: &str, ok: impl Fn(&Netns) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ok(b) {
        assert!(
            Instant::now() < deadline,
            "timed out waiting until {what}; monitor log:\n{}",
            fs::read_to_string(&d.log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Streams `bytes` of the pattern from A to B's receiver (inside `cgroup`); returns (received,
/// differing bytes).
fn stream(t: &Topology, cgroup: &Path, bytes: u64, port: u16) -> (u64, u64) {
    stream_from(t, &t.a, cgroup, bytes, port)
}

/// As `stream`, from `from` (A, or A2 in the shared-NAT scenario).
fn stream_from(t: &Topology, from: &Netns, cgroup: &Path, bytes: u64, port: u16) -> (u64, u64) {
    let mut recv = Command::new(bin("natt-peer"))
        .args(["recv", "--netns", &t.b.name, "--cgroup"])
        .arg(cgroup)
        .args([
            "--listen",
            &Addrs::sock(t.addrs.b, port),
            "--bytes",
            &bytes.to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn natt-peer recv");
    let mut out = recv.stdout.take().expect("piped");
    let mut ready = [0u8; 6];
    std::io::Read::read_exact(&mut out, &mut ready).expect("receiver READY");
    let send = Command::new(bin("natt-peer"))
        .args(["send", "--netns", &from.name, "--connect"])
        .arg(Addrs::sock(t.addrs.b, port))
        .args(["--bytes", &bytes.to_string()])
        .output()
        .expect("natt-peer send");
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).expect("receiver output");
    let status = recv.wait().expect("receiver exit");
    assert!(
        send.status.success() && status.success(),
        "stream failed: sender {}: {} receiver {status}: {rest}",
        send.status,
        String::from_utf8_lossy(&send.stderr)
    );
    let field = |k: &str| -> u64 {
        rest.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {k} in {rest:?}"))
    };
    (field("received="), field("differing="))
}

/// What one scenario measured.
#[derive(Debug, Default)]
struct Measured {
    injected: u64,
    detected: u64,
    dropped: u64,
    verified: u64,
    learning: u64,
    received: u64,
    differing: u64,
    kernel_csum_errors: u64,
    xfrm_peers: u64,
    residual: String,
    /// Segments skipped as GRO aggregates during the main stream.
    aggregated: u64,
    /// `g-gro`: aggregates during a second stream, after `gro_max_size` = MTU.
    aggregated_after_remedy: Option<u64>,
    /// `f-strongswan-nat`: the peer disappeared when the IKE SA was torn down.
    removed_live: Option<bool>,
    /// NAT scenarios: plaintext from the NAT'd peer's address (UDP datagrams received of those
    /// sent; for manual SAs also a TCP stream on a port no policy covers, byte-exact or not).
    plaintext: Option<String>,
    /// Mismatches counted while the plaintext was sent (must be 0).
    plaintext_mismatches: u64,
    /// Packets in the `--capture` file at the end.
    captured: u64,
    /// `f-strongswan-nat`: segments left unverified for learning after the child SA (and the
    /// IKE SA) were rekeyed mid-run (0: the new SA inherited the residual), and whether the
    /// stream after the rekeys was byte-exact.
    rekey_learning: Option<u64>,
}

/// Sends `PLAINTEXT_DATAGRAMS` UDP datagrams from A to B (no policy covers UDP) and, with
/// `tcp`, a TCP stream on a port whose policies bypass IPsec; returns the summary and the
/// mismatches counted meanwhile.
fn plaintext(t: &Topology, s: &Scenario, cg: &Path, tcp: bool) -> (String, u64) {
    let mismatches = |text: &str| -> u64 {
        text.lines()
            .filter(|l| l.starts_with("natt_monitor_checksum_mismatches_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    let before = mismatches(&scrape(&t.b));
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
    (summary, mismatches(&scrape(&t.b)) - before)
}

/// Streams from A while the child SA and then the IKE SA are rekeyed from A, and waits for B's
/// SAs to change; returns how many more segments went to learning (0: the new SA was verified
/// from its first segment), and whether that stream was exact.
fn rekey_during_stream(t: &Topology, cg: &Path, learning: &str) -> (u64, bool) {
    const BYTES: u64 = 2 << 20;
    let l0 = metric(&scrape(&t.b), learning);
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
        streaming.join().expect("stream thread")
    });
    // A second stream entirely on the new SA.
    let (again, bad) = stream(t, cg, 256 << 10, 5004);
    std::thread::sleep(Duration::from_millis(500));
    (
        metric(&scrape(&t.b), learning) - l0,
        (received, differing, again, bad) == (BYTES, 0, 256 << 10, 0),
    )
}

fn expected_nat_residual() -> u16 {
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
fn run(s: &Scenario) -> Measured {
    if s.setup == Setup::SharedNat {
        return run_shared_nat(s);
    }
    let t = Topology::new(s);
    let cg = Cgroup::new();
    let d = start_monitor(&t.b, s.mode, s.name);
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
    let charons = t.add_sas(s);
    let peer = format!("{}/{}", t.a_seen_by_b(s.nat), t.addrs.host_prefix);
    let series = |name: &str| format!("natt_monitor_{name}{{peer=\"{peer}\",proto=\"tcp\"}}");
    if s.encap {
        wait_until(&t.b, &d, "the SA's peer is discovered", |b| {
            metric(&scrape(b), "natt_monitor_peers{source=\"xfrm\"}") == 1
        });
        // Clean warm-up traffic so the residual is learned before anything is corrupted.
        let (got, bad) = stream(&t, &cg.path, WARMUP, 5000);
        assert_eq!((got, bad), (WARMUP, 0), "warm-up stream");
        wait_until(&t.b, &d, "the NAT residual is learned", |b| {
            metric(
                &scrape(b),
                &format!("natt_monitor_peer_learning{{peer=\"{peer}\"}}"),
            ) == 0
        });
        let text = scrape(&t.b);
        assert_eq!(
            metric(&text, &series("checksum_mismatches_total")),
            0,
            "false positives after learning"
        );
    }
    // Plaintext from the NAT'd peer, after its SA's residual (non-zero) was learned.
    let (plaintext, plaintext_mismatches) = if s.nat {
        let (summary, mismatches) = plaintext(&t, s, &cg.path, s.setup == Setup::Manual);
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
    let before = scrape(&t.b);
    let k0 = metric(&before, "natt_monitor_kernel_tcp_in_csum_errors_total");
    let g0 = metric(&before, aggregated);
    if s.corrupt {
        t.corrupt(s);
    }
    let (received, differing) = stream(&t, &cg.path, STREAM, 5001);
    // Give the drain loop a moment, then read everything once.
    std::thread::sleep(Duration::from_millis(500));
    let text = scrape(&t.b);
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
        metric(&scrape(&t.b), aggregated) - g1
    });
    let rekey = (s.setup == Setup::StrongSwan)
        .then(|| rekey_during_stream(&t, &cg.path, &series("learning_packets_total")));
    let removed_live = (s.setup == Setup::StrongSwan).then(|| {
        // Tear the IKE SA down from A: B's charon deletes its SAs, the monitor must notice.
        let _ = swanctl(
            &t.a,
            "a",
            &["--terminate", "--ike", "natt", "--timeout", "30"],
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if metric(&scrape(&t.b), "natt_monitor_peers{source=\"xfrm\"}") == 0 {
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
    let residual = log
        .lines()
        .find(|l| l.contains("NAT residual learned"))
        .and_then(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("residual="))
        })
        .unwrap_or("-")
        .to_owned();
    Measured {
        injected: if s.corrupt { t.injected() } else { 0 },
        detected: metric(&text, &series("checksum_mismatches_total")),
        dropped: metric(&text, &series("dropped_packets_total")),
        verified: metric(&text, &series("verified_packets_total")),
        learning: metric(&text, &series("learning_packets_total")),
        received,
        differing,
        kernel_csum_errors: metric(&text, "natt_monitor_kernel_tcp_in_csum_errors_total") - k0,
        xfrm_peers: metric(&text, "natt_monitor_peers{source=\"xfrm\"}"),
        residual,
        aggregated: g1 - g0,
        aggregated_after_remedy,
        removed_live,
        plaintext,
        plaintext_mismatches,
        rekey_learning: rekey.map(|(l, exact)| if exact { l } else { u64::MAX }),
        captured: captured(s.name),
    }
}

/// Second sender behind the NAT.
const A2: &str = "10.3.0.1";
const R_A2: &str = "10.3.0.2";

/// The null cipher and its empty key, for `xfrm_state`.
const NULL_CIPHER: [&str; 2] = ["ecb(cipher_null)", ""];

/// `ip xfrm state add` of one transport-mode ESP SA: `enc` is the cipher and key, `encap` the
/// UDP encapsulation ports and original address (`None`: plain ESP).
fn xfrm_state(
    ns: &Netns,
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
        "add",
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
fn tcp_policy(ns: &Netns, src: &str, dst: &str, dir: &str, port: Option<(&str, u16)>, reqid: &str) {
    let p;
    let mut args = vec![
        "ip", "-n", &ns.name, "xfrm", "policy", "add", "src", src, "dst", dst, "proto", "tcp",
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

/// Two hosts with different private addresses behind one masquerading NAT, each with its own
/// SAs to B: A (10.1.0.1, encapsulation port 4500, reqid 1, TCP ports 5000/5001 on B) and A2
/// (10.3.0.1, port 4501, reqid 2, TCP ports 5100/5101). B sees both as R's address; their NAT
/// residuals differ, and each SA must be verified against its own.
#[expect(
    clippy::too_many_lines,
    reason = "one scenario from set-up to readings, in the order it happens"
)]
fn run_shared_nat(s: &Scenario) -> Measured {
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
fn shared_nat_residuals() -> String {
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

/// The scenario's claims, as assertions on what it measured.
#[expect(
    clippy::too_many_lines,
    reason = "one expectation per claim, read top to bottom against the scenario table"
)]
fn check(s: &Scenario, m: &Measured) -> Result<(), String> {
    let mut problems = Vec::new();
    let mut expect = |ok: bool, what: String| {
        if !ok {
            problems.push(what);
        }
    };
    if s.corrupt {
        expect(m.injected > 0, "the rule corrupted nothing".into());
    }
    if s.setup == Setup::StrongSwan {
        // ESP authenticates: the corrupted packets die in ESP, never reaching the verifier.
        expect(
            m.detected == 0,
            format!("{} mismatches behind an authenticated SA", m.detected),
        );
        expect(
            m.removed_live == Some(true),
            "the peer was not removed when its SAs were deleted".into(),
        );
    }
    // Fewer mismatches than the capture's burst: every one is in the file.
    expect(
        m.captured == m.detected,
        format!("captured {} != detected {}", m.captured, m.detected),
    );
    if let Some(p) = &m.plaintext {
        let want = if s.setup == Setup::Manual {
            format!("udp={PLAINTEXT_DATAGRAMS}/{PLAINTEXT_DATAGRAMS},tcp=exact")
        } else {
            format!("udp={PLAINTEXT_DATAGRAMS}/{PLAINTEXT_DATAGRAMS}")
        };
        expect(
            *p == want,
            format!("plaintext from the peer: {p}, want {want}"),
        );
        expect(
            m.plaintext_mismatches == 0,
            format!("{} mismatches on plaintext", m.plaintext_mismatches),
        );
    }
    if let Some(l) = m.rekey_learning {
        expect(
            l == 0,
            if l == u64::MAX {
                "the stream after the rekeys was not byte-exact".to_owned()
            } else {
                format!("{l} segments went unverified for learning after the rekey")
            },
        );
    }
    if let Some(after) = m.aggregated_after_remedy {
        expect(
            after == 0,
            format!("{after} aggregates after gro_max_size = MTU"),
        );
    } else if s.encap {
        expect(
            m.aggregated == 0,
            format!("{} GRO aggregates without GRO conditions", m.aggregated),
        );
    }
    if s.encap {
        expect(
            m.xfrm_peers == 1,
            format!("xfrm peers {} != 1", m.xfrm_peers),
        );
        if s.setup != Setup::StrongSwan {
            expect(
                m.detected == m.injected,
                format!("detected {} != injected {}", m.detected, m.injected),
            );
        }
        expect(m.verified > 0, "nothing verified".into());
        expect(
            m.learning >= 8,
            format!("learned from {} < 8 segments", m.learning),
        );
        expect(
            m.kernel_csum_errors == 0,
            format!(
                "kernel counted {} checksum errors on a NAT-T path",
                m.kernel_csum_errors
            ),
        );
        let want = if s.setup == Setup::SharedNat {
            shared_nat_residuals()
        } else {
            format!("{:#06x}", if s.nat { expected_nat_residual() } else { 0 })
        };
        expect(
            m.residual == want,
            format!("learned residual {} != {want}", m.residual),
        );
    } else {
        // Plain ESP: not a NAT-T SA, so not in scope; the kernel checks and drops.
        expect(
            m.xfrm_peers == 0,
            format!("xfrm peers {} != 0", m.xfrm_peers),
        );
        expect(
            m.detected == 0 && m.verified == 0,
            "plain ESP was verified".into(),
        );
        expect(
            m.kernel_csum_errors == m.injected,
            format!(
                "kernel dropped {} != injected {}",
                m.kernel_csum_errors, m.injected
            ),
        );
    }
    let streamed = if s.setup == Setup::SharedNat {
        2 * STREAM
    } else {
        STREAM
    };
    expect(
        m.received == streamed,
        format!("received {} of {streamed}", m.received),
    );
    let exact_expected =
        !s.corrupt || s.mode == Mode::Enforce || !s.encap || s.setup == Setup::StrongSwan;
    if exact_expected {
        expect(m.differing == 0, format!("{} bytes differ", m.differing));
        expect(
            m.dropped == m.detected,
            format!("dropped {} != detected {}", m.dropped, m.detected),
        );
    } else {
        expect(
            m.differing >= m.injected,
            format!(
                "the application saw {} differing bytes for {} corruptions",
                m.differing, m.injected
            ),
        );
        expect(
            m.dropped == 0,
            format!("observe mode dropped {}", m.dropped),
        );
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

fn main() {
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    // What `natt-monitor check` says of this kernel. If it refuses the host, no scenario can
    // run: say why, and end.
    let probe = Command::new(bin("natt-monitor"))
        .arg("check")
        .output()
        .expect("natt-monitor check");
    let report = String::from_utf8_lossy(&probe.stdout);
    for line in report.lines() {
        println!("NATT-VM CHECK {line}");
    }
    if !probe.status.success() {
        let reason = report
            .lines()
            .find(|l| l.starts_with("FAIL"))
            .unwrap_or("natt-monitor check failed");
        println!("NATT-VM REFUSED kernel={kernel} reason={reason}");
        println!("NATT-VM END kernel={kernel} passed=0 failed=0");
        return;
    }
    let only: Vec<String> = std::env::args().skip(1).collect();
    let (mut passed, mut failed) = (0, 0);
    for s in SCENARIOS
        .iter()
        .filter(|s| only.is_empty() || only.iter().any(|o| o == s.name))
    {
        let started = Instant::now();
        let r = std::panic::catch_unwind(|| run(s));
        let secs = started.elapsed().as_secs_f64();
        match r.map_err(|e| {
            e.downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "panic".into())
        }) {
            Ok(m) => {
                let verdict = check(s, &m);
                println!(
                    "NATT-VM RESULT kernel={kernel} scenario={} setup={:?} mode={} cipher={} injected={} detected={} dropped={} verified={} learning={} residual={} received={} differing={} kernel_csum_errors={} xfrm_peers={} aggregated={} aggregated_after_remedy={} removed_live={} plaintext={} rekey_learning={} captured={} seconds={secs:.1} result={}",
                    s.name,
                    s.setup,
                    s.mode,
                    if s.setup == Setup::StrongSwan {
                        "AesCbcHmacSha256"
                    } else {
                        match s.cipher {
                            Cipher::Null => "Null",
                            Cipher::CbcAes => "CbcAes",
                        }
                    },
                    m.injected,
                    m.detected,
                    m.dropped,
                    m.verified,
                    m.learning,
                    m.residual,
                    m.received,
                    m.differing,
                    m.kernel_csum_errors,
                    m.xfrm_peers,
                    m.aggregated,
                    m.aggregated_after_remedy
                        .map_or_else(|| "-".to_owned(), |n| n.to_string()),
                    m.removed_live.map_or("-", |r| if r { "yes" } else { "no" }),
                    m.plaintext.as_deref().unwrap_or("-"),
                    m.rekey_learning
                        .map_or_else(|| "-".to_owned(), |n| n.to_string()),
                    m.captured,
                    if verdict.is_ok() { "ok" } else { "FAILED" }
                );
                match verdict {
                    Ok(()) => passed += 1,
                    Err(e) => {
                        failed += 1;
                        println!(
                            "NATT-VM FAIL kernel={kernel} scenario={} reason={e}",
                            s.name
                        );
                    }
                }
            }
            Err(e) => {
                failed += 1;
                println!(
                    "NATT-VM FAIL kernel={kernel} scenario={} reason={}",
                    s.name,
                    e.replace('\n', " | ")
                );
            }
        }
        let _ = std::io::stdout().flush();
    }
    println!("NATT-VM END kernel={kernel} passed={passed} failed={failed}");
}
