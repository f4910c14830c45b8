//! The `BPF_PROG_TEST_RUN` harness of the verifier's table tests: the verifier loaded with five
//! peers (observe and enforce, IPv4 and IPv6, one behind a NAT), a frame run through it, and
//! the verdict with the exact change of every counter.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::programs::{TestRun as _, TestRunOptions};
use monitor_ebpf::{COUNTER_SLOTS, Counter, PROTO_COUNT, PeerStats, Proto, SaKey};
use natt_monitor::{
    ebpf::{Counters, Variant, Verifier, VerifierLoader},
    events::{Learning, LearningKind, Mismatch},
    features::Features,
    peers::{Mode, NatAddresses, PeerSpec, PeerTable, parse_cidr},
    scope::Scope,
};

use crate::packets::l4_offset;

/// A learning record of a TCP segment held in enforce mode.
pub const HELD: LearningKind = LearningKind::Sample {
    held: true,
    proto: Some(Proto::Tcp),
};

pub const PASS: u32 = 1;

pub const DROP: u32 = 0;

pub const V4_OBSERVE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);

pub const V4_ENFORCE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);

pub const V4_NAT_SEEN: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 5);

pub const V4_NAT_ORIG: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 5);

pub const V4_NAT_ORIG_DST: Ipv4Addr = Ipv4Addr::new(10, 9, 9, 9);

pub const V4_OUT_OF_SCOPE: Ipv4Addr = Ipv4Addr::new(172, 16, 5, 5);

pub const LOCAL4: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 1);

pub const V6_OBSERVE: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x10);

pub const V6_ENFORCE: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 0x20);

pub const LOCAL6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 1);

/// Peer ids, in table order.
pub const P_V4_OBSERVE: usize = 0;

pub const P_V4_ENFORCE: usize = 1;

pub const P_V4_NAT: usize = 2;

pub const P_V6_OBSERVE: usize = 3;

pub const P_V6_ENFORCE: usize = 4;

pub const PEERS: usize = 5;

#[must_use]
pub fn table() -> PeerTable {
    let mut nat = PeerSpec::new(parse_cidr("203.0.113.5").unwrap(), Mode::Observe);
    nat.nat = Some(NatAddresses {
        original_src: IpAddr::V4(V4_NAT_ORIG),
        original_dst: IpAddr::V4(V4_NAT_ORIG_DST),
        observed_src: IpAddr::V4(V4_NAT_SEEN),
        observed_dst: IpAddr::V4(LOCAL4),
    });
    PeerTable::new(vec![
        PeerSpec::new(parse_cidr("192.0.2.0/24").unwrap(), Mode::Observe),
        PeerSpec::new(parse_cidr("198.51.100.7").unwrap(), Mode::Enforce),
        nat,
        PeerSpec::new(parse_cidr("2001:db8:1::/64").unwrap(), Mode::Observe),
        PeerSpec::new(parse_cidr("2001:db8:2::/64").unwrap(), Mode::Enforce),
    ])
    .unwrap()
}

#[derive(Debug)]
pub struct Outcome {
    pub verdict: u32,
    /// Mismatch events that reached the ring buffer (compared by count only).
    pub events: Vec<Mismatch>,
    /// Learning samples that reached their ring buffer (compared exactly).
    pub learning: Vec<Learning>,
    pub counters: [u64; COUNTER_SLOTS as usize],
    pub peers: [PeerStats; PEERS],
}

impl PartialEq for Outcome {
    fn eq(&self, o: &Self) -> bool {
        self.verdict == o.verdict
            && self.events.len() == o.events.len()
            && self.learning == o.learning
            && self.counters == o.counters
            && self.peers == o.peers
    }
}

impl Outcome {
    #[must_use]
    pub fn zero(verdict: u32) -> Self {
        Self {
            verdict,
            events: Vec::new(),
            learning: Vec::new(),
            counters: [0; COUNTER_SLOTS as usize],
            peers: [PeerStats::default(); PEERS],
        }
    }
    #[must_use]
    pub fn skipped(reason: Counter) -> Self {
        let mut o = Self::zero(PASS);
        o.counters[reason as usize] = 1;
        o
    }
    #[must_use]
    pub fn verified(peer: usize, proto: usize, l4_len: usize) -> Self {
        let mut o = Self::zero(PASS);
        o.peers[peer].verified_packets[proto] = 1;
        o.peers[peer].verified_bytes[proto] = l4_len as u64;
        o
    }
    pub fn mismatch(peer: usize, proto: usize, dropped: bool) -> Self {
        let mut o = Self::zero(if dropped { DROP } else { PASS });
        o.peers[peer].mismatches[proto] = 1;
        o.peers[peer].drops[proto] = u64::from(dropped);
        o.events = vec![PLACEHOLDER.clone()];
        o
    }
}

/// Stands in for "one event" in expected outcomes; events compare by count.
pub static PLACEHOLDER: std::sync::LazyLock<Mismatch> = std::sync::LazyLock::new(|| Mismatch {
    peer_id: 0,
    src: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    dst: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    sport: 0,
    dport: 0,
    proto: "tcp",
    seq: 0,
    len: 0,
    found: 0,
    expected: 0,
    dropped: false,
    residual: 0,
    expected_residual: 0,
    key: SaKey::default(),
    encap_ports: (0, 0),
    spi: 0,
    reqid: 0,
    ifindex: 0,
    payload: Vec::new(),
});

pub struct Harness {
    pub v: Verifier,
    pub ring: aya::maps::RingBuf<aya::maps::MapData>,
    pub learning: aya::maps::RingBuf<aya::maps::MapData>,
}

impl Default for Harness {
    fn default() -> Self {
        Self::new()
    }
}

impl Harness {
    /// Test-run frames carry no `sec_path`, so the verification core is exercised under
    /// address scope; `sa_scope_leaves_out_everything_without_a_sec_path` covers the other.
    #[must_use]
    pub fn new() -> Self {
        Self::with_scope(&Scope::Address)
    }

    #[must_use]
    pub fn with_scope(scope: &Scope) -> Self {
        Self::with(scope, None)
    }

    /// With the program variant forced: both must give the same results.
    #[must_use]
    pub fn with(scope: &Scope, variant: Option<Variant>) -> Self {
        let mut v = VerifierLoader::new(
            scope,
            variant.unwrap_or_else(|| Features::probe().variant()),
        )
        .load()
        .expect("load verifier");
        v.peer_maps()
            .unwrap()
            .set_peers(&PeerTable::default(), &table())
            .expect("fill peers");
        let ring = v.take_events().expect("event ring");
        let learning = v.take_learning().expect("learning ring");
        Self { v, ring, learning }
    }

    /// Decoded mismatch events emitted since the last call.
    pub fn drain_events(&mut self) -> Vec<Mismatch> {
        let mut out = Vec::new();
        while let Some(item) = self.ring.next() {
            out.push(Mismatch::decode(&item).expect("whole event"));
        }
        out
    }

    /// Decoded learning samples sent since the last call.
    pub fn drain_learning(&mut self) -> Vec<Learning> {
        let mut out = Vec::new();
        while let Some(item) = self.learning.next() {
            out.push(Learning::decode(&item).expect("whole sample"));
        }
        out
    }

    #[must_use]
    pub fn snapshot(&self) -> (Counters, [PeerStats; PEERS]) {
        let c = self.v.stats().counters().unwrap();
        let mut p = [PeerStats::default(); PEERS];
        for (i, s) in p.iter_mut().enumerate() {
            *s = self.v.stats().peer_stats(i as u32).unwrap();
        }
        (c, p)
    }

    pub fn run_with_ctx(&mut self, frame: &[u8], ctx: Option<&[u8]>) -> Outcome {
        self.try_run(frame, ctx)
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN on a {}-byte frame: {e}", frame.len()))
    }

    /// As `run_with_ctx`.
    ///
    /// # Errors
    /// When the kernel refuses the frame before the program runs.
    pub fn try_run(
        &mut self,
        frame: &[u8],
        ctx: Option<&[u8]>,
    ) -> Result<Outcome, aya::programs::ProgramError> {
        let (c0, p0) = self.snapshot();
        let prog = self.v.program_mut().unwrap();
        let r = prog.test_run(TestRunOptions {
            data_in: Some(frame),
            ctx_in: ctx,
            ..TestRunOptions::default()
        })?;
        let events = self.drain_events();
        let learning = self.drain_learning();
        let (c1, p1) = self.snapshot();
        let mut out = Outcome::zero(r.return_value);
        out.events = events;
        out.learning = learning;
        for i in 0..COUNTER_SLOTS as usize {
            out.counters[i] = c1.slots[i] - c0.slots[i];
        }
        for i in 0..PEERS {
            let (a, b) = (&p0[i], &p1[i]);
            for k in 0..PROTO_COUNT {
                out.peers[i].verified_packets[k] = b.verified_packets[k] - a.verified_packets[k];
                out.peers[i].verified_bytes[k] = b.verified_bytes[k] - a.verified_bytes[k];
                out.peers[i].mismatches[k] = b.mismatches[k] - a.mismatches[k];
                out.peers[i].drops[k] = b.drops[k] - a.drops[k];
                out.peers[i].learning[k] = b.learning[k] - a.learning[k];
            }
        }
        Ok(out)
    }

    pub fn run(&mut self, frame: &[u8]) -> Outcome {
        self.run_with_ctx(frame, None)
    }
}

#[must_use]
pub fn l4_len(frame: &[u8]) -> usize {
    frame.len() - l4_offset(frame)
}

/// Makes the NAT peer of `table()` learn its residual, in `mode`, without its original
/// addresses; returns the residual its intact segments leave.
pub fn nat_peer_learns(h: &mut Harness, mode: Mode) -> u16 {
    peer_learns(h, P_V4_NAT, mode);
    table().residual(P_V4_NAT as u32).unwrap()
}

/// Makes peer `peer` of `table()` a learning peer in `mode`, without configured NAT addresses.
pub fn peer_learns(h: &mut Harness, peer: usize, mode: Mode) {
    let configured = table();
    let specs: Vec<PeerSpec> = configured
        .iter()
        .map(|(id, p)| {
            let mut p = p.clone();
            if id == peer as u32 {
                p.nat = None;
                p.learn = true;
                p.mode = mode;
            }
            p
        })
        .collect();
    let learning = configured.reconcile(specs).unwrap();
    h.v.peer_maps()
        .unwrap()
        .set_peers(&configured, &learning)
        .unwrap();
}
