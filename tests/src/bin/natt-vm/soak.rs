//! The soak: two hosts behind one NAT, a seeded random sequence of streams, rekeys, departures
//! and returns, with the corruption's shape and rate drawn again and again throughout.

use std::{fs, path::Path, time::Duration};

use natt_monitor::peers::{Mode, NatAddresses, PeerSpec, parse_cidr};
use natt_monitor_tests::net::{Netns, sh};

use crate::{
    plan::{A2, R_A2, V4, WARMUP},
    processes::{captured, learned_into_b, learned_residuals, metric, scrape, wait_until},
    run::Measured,
    scenarios::{Corruption, Scenario},
    shared_nat::{SharedNat, b_sas, host_sas},
    topology::{Topology, xfrm_state},
    traffic::stream_from,
};

/// Actions in one soak (the warm-up aside).
const ROUNDS: u32 = 100;

/// TCP ports on B per host: one per stream.
const PORTS: u16 = 112;

/// Stream sizes a round draws from.
const SIZES: [u64; 4] = [256 << 10, 512 << 10, 1 << 20, 2 << 20];

/// Rates a corruption draws from: one large ESP packet in this many.
const RATES: [u32; 5] = [5, 7, 40, 100, 1000];

/// xorshift64*: a small generator whose whole sequence the printed seed replays.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self((seed ^ 0x9e37_79b9_7f4a_7c15).max(1))
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n as u64).expect("below n")
    }

    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())]
    }
}

/// The soak's seed: `natt_soak_seed=` on the guest's command line (`cargo xtask vm-test` puts
/// `NATT_SOAK_SEED` there, or a fresh one it prints), else the clock.
fn seed() -> u64 {
    fs::read_to_string("/proc/cmdline")
        .ok()
        .and_then(|c| {
            c.split_whitespace()
                .find_map(|w| w.strip_prefix("natt_soak_seed="))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| u64::from(d.subsec_nanos()) ^ d.as_secs())
        })
}

/// One host behind the NAT, as the soak moves it around.
struct Host<'a> {
    ns: &'a Netns,
    dev: &'static str,
    gateway: &'static str,
    /// The private addresses it alternates between when it leaves and comes back.
    addrs: [&'static str; 2],
    at: usize,
    /// Its encapsulation port, which the port-preserving NAT keeps.
    port: u16,
    /// Its SAs' reqid on B.
    reqid: &'static str,
    /// 1 for A, 2 for A2: the SPIs' last digit.
    index: u32,
    /// How many times its SA into B was replaced (rekey, return): that SPI's middle digits.
    generation: u32,
    /// How many times B's SA to it was (return).
    out_generation: u32,
    /// Its next TCP port on B.
    next_port: u16,
    last_port: u16,
}

impl Host<'_> {
    fn addr(&self) -> &'static str {
        self.addrs[self.at]
    }

    /// SPI of its SA into B.
    fn spi_in(&self) -> String {
        format!("{:#x}", 0x1000 + 0x10 * self.generation + self.index)
    }

    /// SPI of B's SA to it.
    fn spi_out(&self) -> String {
        format!("{:#x}", 0x2000 + 0x10 * self.out_generation + self.index)
    }

    fn take_port(&mut self) -> u16 {
        assert!(self.next_port < self.last_port, "out of TCP ports on B");
        self.next_port += 1;
        self.next_port - 1
    }

    /// The residual its segments leave on B from its current address.
    fn residual(&self) -> String {
        let x = &V4;
        let mut p = PeerSpec::new(parse_cidr(x.r_b).expect("cidr"), Mode::Observe);
        p.nat = Some(NatAddresses {
            original_src: self.addr().parse().expect("ip"),
            original_dst: x.b.parse().expect("ip"),
            observed_src: x.r_b.parse().expect("ip"),
            observed_dst: x.b.parse().expect("ip"),
        });
        format!("{:#06x}", p.expected_residual().expect("same family"))
    }
}

/// What the soak did and found, beyond `Measured`.
#[derive(Debug, Default)]
pub(crate) struct Soaked {
    pub(crate) seed: u64,
    pub(crate) streams: u32,
    pub(crate) rekeys: u64,
    pub(crate) returns: u32,
    /// The corruption shapes drawn, as `shape/rate`.
    pub(crate) shapes: Vec<String>,
    /// Bytes streamed in all, for the received total.
    pub(crate) bytes: u64,
    /// The residuals B's SAs must have learned (one per host at the start, one per return),
    /// sorted as their text.
    pub(crate) want_residuals: String,
}

impl Soaked {
    /// For the `NATT-VM RESULT` line.
    pub(crate) fn summary(&self) -> String {
        format!(
            "seed={},streams={},rekeys={},returns={},shapes={}",
            self.seed,
            self.streams,
            self.rekeys,
            self.returns,
            self.shapes.join("+")
        )
    }
}

/// The corruption shapes a round draws from, at `every`.
fn shape(rng: &mut Rng) -> Corruption {
    let every = rng.pick(&RATES);
    match rng.below(5) {
        0 => Corruption::Word,
        1 => Corruption::ConstantDelta { every },
        2 => Corruption::BitFlip { every },
        3 => Corruption::ZeroRun { every },
        _ => Corruption::RandomBitFlip { every },
    }
}

fn shape_name(c: Corruption) -> String {
    match c {
        Corruption::ConstantDelta { every } => format!("constant_delta/{every}"),
        Corruption::BitFlip { every } => format!("bit_flip/{every}"),
        Corruption::ZeroRun { every } => format!("zeroed_run/{every}"),
        Corruption::RandomBitFlip { every } => format!("random_bit_flip/{every}"),
        _ => format!("word/{}", crate::plan::CORRUPT_EVERY),
    }
}

/// Streams `bytes` from each of `hosts` at once; returns (received, differing) summed, and
/// asserts nothing (the verdict compares the totals).
fn streams(t: &Topology, cg: &Path, hosts: &mut [&mut Host<'_>], bytes: u64) -> (u64, u64) {
    let jobs: Vec<(&Netns, u16)> = hosts.iter_mut().map(|h| (h.ns, h.take_port())).collect();
    std::thread::scope(|scope| {
        let running: Vec<_> = jobs
            .iter()
            .map(|(ns, port)| scope.spawn(move || stream_from(t, ns, cg, bytes, *port)))
            .collect();
        running
            .into_iter()
            .map(|r| r.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .fold((0, 0), |(r, d), (r1, d1)| (r + r1, d + d1))
    })
}

/// Rekeys `h`'s SA into B the way an IKE daemon does, make before break: B's new inbound SA
/// (same reqid, same NAT mapping), then `h`'s new outbound one, then `h`'s old one goes. B's
/// old inbound SA stays until the caller has streamed through the new one (`retire`), as it
/// does until the IKE daemon deletes it: the new SA takes its residual over at its first
/// segment. Returns the old SPI.
fn rekey(t: &Topology, h: &mut Host<'_>) -> String {
    let x = t.addrs;
    let old = h.spi_in();
    h.generation += 1;
    let new = h.spi_in();
    let encap = Some((h.port, 4500, x.any));
    let enc = crate::plan::NULL_CIPHER;
    xfrm_state(&t.b, x.r_b, x.b, &new, h.reqid, enc, encap);
    xfrm_state(h.ns, h.addr(), x.b, &new, "0", enc, encap);
    sh(&[
        "ip",
        "-n",
        &h.ns.name,
        "xfrm",
        "state",
        "delete",
        "src",
        h.addr(),
        "dst",
        x.b,
        "proto",
        "esp",
        "spi",
        &old,
    ]);
    old
}

/// Deletes B's inbound SA `spi`, which a rekey replaced.
fn retire(t: &Topology, spi: &str) {
    let x = t.addrs;
    sh(&[
        "ip", "-n", &t.b.name, "xfrm", "state", "delete", "src", x.r_b, "dst", x.b, "proto", "esp",
        "spi", spi,
    ]);
}

/// `h` leaves (its SAs deleted on both ends, its NAT mapping left to expire) and comes back
/// with its other private address and new SAs, on the same NAT mapping.
fn leave_and_return(t: &Topology, h: &mut Host<'_>) {
    let x = t.addrs;
    let (spi_in, spi_out) = (h.spi_in(), h.spi_out());
    for (src, dst, spi) in [(x.r_b, x.b, &spi_in), (x.b, x.r_b, &spi_out)] {
        sh(&[
            "ip", "-n", &t.b.name, "xfrm", "state", "delete", "src", src, "dst", dst, "proto",
            "esp", "spi", spi,
        ]);
    }
    sh(&["ip", "-n", &h.ns.name, "xfrm", "state", "flush"]);
    sh(&["ip", "-n", &h.ns.name, "xfrm", "policy", "flush"]);
    sh(&["ip", "-n", &h.ns.name, "addr", "flush", "dev", h.dev]);
    h.at = 1 - h.at;
    sh(&[
        "ip",
        "-n",
        &h.ns.name,
        "addr",
        "add",
        &format!("{}/24", h.addr()),
        "dev",
        h.dev,
    ]);
    sh(&[
        "ip", "-n", &h.ns.name, "route", "replace", "default", "via", h.gateway,
    ]);
    // Its mapping expires 2 s after its last packet; until it has, R would map the returning
    // host elsewhere and send B's replies to the departed address.
    t.wait_mapping_gone(h.addrs[1 - h.at]);
    h.generation += 1;
    h.out_generation += 1;
    let (spi_in, spi_out) = (h.spi_in(), h.spi_out());
    host_sas(h.ns, h.addr(), x.b, &spi_in, &spi_out, h.port);
    b_sas(t, &spi_in, &spi_out, h.port, h.reqid);
}

/// The soak (`u-soak-enforce`): two hosts behind one NAT, 100 rounds drawn from a printed seed.
/// Each round streams from one host or both at once, rekeys a host's SA, makes a host leave
/// and come back with its other address while the other host streams, or draws a new
/// corruption shape and rate (one in `RATES` packets: a fixed word, a constant delta, a bit, a
/// zeroed run, a random bit at a random offset); corruption is on throughout.
#[expect(
    clippy::too_many_lines,
    reason = "one scenario from set-up to readings, in the order it happens"
)]
pub(crate) fn run_soak(s: &Scenario) -> Measured {
    let seed = seed();
    println!(
        "NATT-VM NOTE soak seed {seed} (replay: NATT_SOAK_SEED={seed} cargo xtask vm-test {})",
        s.name
    );
    let mut rng = Rng::new(seed);
    let SharedNat {
        t,
        a2,
        cg,
        d: daemon,
        encap2: _encap2,
    } = SharedNat::new(s, PORTS);
    let addrs = t.addrs;
    let mut host_a = Host {
        ns: &t.a,
        dev: "va",
        gateway: addrs.r_a,
        addrs: [addrs.a, crate::shared_nat::A_RETURNED],
        at: 0,
        port: 4500,
        reqid: "1",
        index: 1,
        generation: 0,
        out_generation: 0,
        next_port: 5000,
        last_port: 5000 + PORTS,
    };
    let mut host_a2 = Host {
        ns: &a2,
        dev: "va2",
        gateway: R_A2,
        addrs: [A2, "10.3.0.5"],
        at: 0,
        port: 4501,
        reqid: "2",
        index: 2,
        generation: 0,
        out_generation: 0,
        next_port: 5500,
        last_port: 5500 + PORTS,
    };
    let mut soak = Soaked {
        seed,
        ..Soaked::default()
    };
    let mut want = vec![host_a.residual(), host_a2.residual()];
    // Every NAT mapping expires 2 s after its last packet, from the warm-up's on: a host that
    // leaves in the first round frees its mapping as soon as one that leaves later does.
    t.expire_udp_mappings_fast();
    for host in [&mut host_a, &mut host_a2] {
        let (got, bad) = streams(&t, &cg.path, &mut [host], WARMUP);
        assert_eq!((got, bad), (WARMUP, 0), "warm-up stream");
    }
    wait_until(&t.b, &daemon, "both SAs' residuals are learned", |_| {
        learned_into_b(&fs::read_to_string(&daemon.log).unwrap_or_default()).len() == 2
    });
    let kernel = "natt_monitor_kernel_tcp_in_csum_errors_total";
    let aggregated = "natt_monitor_skipped_packets_total{reason=\"aggregated\"}";
    let before = scrape(&t.b);
    // Both hosts' packets, whatever their address: everything R forwards from its hosts' side.
    let from = "iifname != \"rb\"";
    let mut injected = 0;
    let mut corruption = shape(&mut rng);
    soak.shapes.push(shape_name(corruption));
    t.corrupt_with(s, corruption, from);
    let (mut received, mut differing) = (0, 0);
    for round in 1..=ROUNDS {
        let roll = rng.below(100);
        let bytes = rng.pick(&SIZES);
        let which = rng.below(2);
        let (host, other) = if which == 0 {
            (&mut host_a, &mut host_a2)
        } else {
            (&mut host_a2, &mut host_a)
        };
        // Where a hung soak stopped (the console's last lines name it).
        println!(
            "NATT-VM STEP soak round {round}: roll {roll}, {bytes} bytes, host {}",
            host.index
        );
        let (got, bad, n) = match roll {
            0..40 => {
                let (got, bad) = streams(&t, &cg.path, &mut [host], bytes);
                (got, bad, 1)
            }
            40..55 => {
                let (got, bad) = streams(&t, &cg.path, &mut [host, other], bytes);
                (got, bad, 2)
            }
            55..70 => {
                let old = rekey(&t, host);
                soak.rekeys += 1;
                // The new SA carries a stream at once, corruption and all.
                let (got, bad) = streams(&t, &cg.path, &mut [host], bytes);
                retire(&t, &old);
                (got, bad, 1)
            }
            70..80 => {
                leave_and_return(&t, host);
                soak.returns += 1;
                want.push(host.residual());
                let (got, bad) = streams(&t, &cg.path, &mut [host, other], bytes);
                (got, bad, 2)
            }
            _ => {
                injected += t.injected();
                t.uncorrupt();
                corruption = shape(&mut rng);
                soak.shapes.push(shape_name(corruption));
                t.corrupt_with(s, corruption, from);
                (0, 0, 0)
            }
        };
        received += got;
        differing += bad;
        soak.streams += n;
        soak.bytes += bytes * u64::from(n);
    }
    injected += t.injected();
    std::thread::sleep(Duration::from_millis(500));
    let text = scrape(&t.b);
    let log = fs::read_to_string(&daemon.log).unwrap_or_default();
    want.sort_unstable();
    soak.want_residuals = want.join(",");
    let peer = format!("{}/32", addrs.r_b);
    let series = |name: &str| format!("natt_monitor_{name}{{peer=\"{peer}\",proto=\"tcp\"}}");
    Measured {
        injected,
        invisible: t.invisible(),
        received,
        differing,
        kernel_csum_errors: metric(&text, kernel) - metric(&before, kernel),
        residual: learned_residuals(&log).join(","),
        aggregated: metric(&text, aggregated) - metric(&before, aggregated),
        captured: captured(s.name),
        soak: Some(soak),
        ..Measured::from_scrape(&text, series)
    }
}
