//! End to end in network namespaces (root only): a real TCP stream from namespace A to a
//! receiver in namespace B that runs in the monitored cgroup. A tc injector on B's veth does
//! what esp4.c does to decapsulated NAT-T segments (marks them `CHECKSUM_UNNECESSARY`) and
//! corrupts every Nth data segment after that, without fixing the checksum.
//!
//! These tests share kernel state (namespaces, cgroups); run them with `--test-threads=1`
//! (`cargo xtask test` does).

use monitor_ebpf::{
    Counter, PROTO_COUNT, PeerMode, PeerStats, PeerValue, Proto, SKIP_REASONS, TunnelValue,
};
use natt_monitor::{
    ebpf::{Attached, PinnedMaps, Variant, Verifier, VerifierLoader},
    features::Features,
    peers::{Mode, PeerSpec, PeerTable, parse_cidr},
    scope::{self, Scope},
};
use natt_monitor_tests::{
    PinDir, loader,
    net::{
        ADDR_A, ADDR_B, ADDR6_A, Cgroup, InjectStats, Injector, Lab, PingResult, StreamResult,
        ping, sh, stream, stream_between,
    },
    skip_unless_root,
};

/// The `natt-peer` helper that sends and receives the test streams.
const PEER: &str = env!("CARGO_BIN_EXE_natt-peer");

struct Run {
    stream: StreamResult,
    inject: InjectStats,
    peer: PeerStats,
    not_in_scope: u64,
    aggregated: u64,
    /// Segments skipped as `partial_checksum`: under address scope, a complete checksum that
    /// happens to equal the pseudo-header sum looks like one (1 segment in 65,536; docs/
    /// benchmarks.md), so a run of thousands of segments has one now and then.
    partial: u64,
    /// Every skip reason that counted anything, for the run's log line.
    skips: Vec<(&'static str, u64)>,
}

/// One stream of `bytes` with the given peer prefix, mode, corruption rate, MTU and family.
fn run(peer: &str, mode: Mode, every: u32, mtu: u32, bytes: u64, v6: bool) -> Run {
    run_variant(peer, mode, every, mtu, bytes, v6, None)
}

/// As `run`, with the program variant forced (`None`: probed).
fn run_variant(
    peer: &str,
    mode: Mode,
    every: u32,
    mtu: u32,
    bytes: u64,
    v6: bool,
    variant: Option<Variant>,
) -> Run {
    let lab = Lab::new(mtu);
    let cg = Cgroup::new();
    let v = attached_verifier(&cg, peer, mode, variant);
    let inj = Injector::attach(&lab.b, lab.dev_b, every);
    let s = stream(PEER, &lab, &cg.path, bytes, v6);
    let r = readings(&v, s, inj.stats());
    drop(inj);
    drop(v);
    log_run(
        &format!("peer={peer} mode={mode} every={every} mtu={mtu}"),
        &r,
    );
    r
}

/// The verifier (address scope, `variant` or the probed one) with `peer` as its only peer, in
/// `mode`, attached to `cg`.
fn attached_verifier(cg: &Cgroup, peer: &str, mode: Mode, variant: Option<Variant>) -> Verifier {
    let mut v = VerifierLoader::new(
        &Scope::Address,
        variant.unwrap_or_else(|| Features::probe().variant()),
    )
    .load()
    .expect("load verifier");
    v.peer_maps()
        .unwrap()
        .set_peers(
            &PeerTable::default(),
            &PeerTable::new(vec![PeerSpec::new(parse_cidr(peer).unwrap(), mode)]).unwrap(),
        )
        .unwrap();
    v.attach(&cg.path).expect("attach to test cgroup");
    v
}

/// What the verifier of peer id 0 counted, beside what the stream and the injector saw.
fn readings(v: &Verifier, stream: StreamResult, inject: InjectStats) -> Run {
    let c = v.stats().counters().unwrap();
    Run {
        stream,
        inject,
        peer: v.stats().peer_stats(0).unwrap(),
        not_in_scope: c.get(Counter::SkipNotInScope),
        aggregated: c.get(Counter::SkipAggregated),
        partial: c.get(Counter::SkipPartialChecksum),
        skips: SKIP_REASONS
            .iter()
            .map(|&(reason, name)| (name, c.get(reason)))
            .filter(|&(_, n)| n > 0)
            .collect(),
    }
}

fn log_run(what: &str, r: &Run) {
    eprintln!(
        "{what}: app received={} differing={}; injector marked={} data={} corrupted={} max_l4={}; \
         verifier verified={:?} bytes={:?} mismatches={:?} drops={:?} skipped={:?}",
        r.stream.received,
        r.stream.differing,
        r.inject.marked,
        r.inject.data_segments,
        r.inject.corrupted,
        r.inject.max_l4_len,
        r.peer.verified_packets,
        r.peer.verified_bytes,
        r.peer.mismatches,
        r.peer.drops,
        r.skips
    );
}

/// Nothing dropped the corruption, so the application received it: one flipped byte per
/// corrupted segment that delivered new data. A corrupted segment can also be a
/// retransmission of data the receiver already has (veth under load reorders now and then);
/// TCP discards it, so it reaches no application: a couple per run at most.
fn assert_app_saw_corruption(r: &Run) {
    assert!(
        r.stream.differing <= r.inject.corrupted && r.stream.differing + 2 >= r.inject.corrupted,
        "one flipped byte per corrupted segment: {} differing for {} corrupted",
        r.stream.differing,
        r.inject.corrupted
    );
}

/// Every injected corruption is a mismatch, but for one the look-alike partial-checksum skip
/// took (`Run::partial`); and every segment the injector marked is verified, a mismatch, or
/// that skip.
fn assert_accounted(r: &Run) {
    let tcp = Proto::Tcp as usize;
    assert!(
        r.peer.mismatches[tcp] <= r.inject.corrupted
            && r.peer.mismatches[tcp] + r.partial >= r.inject.corrupted,
        "mismatches {} for {} injected ({} partial-checksum skips)",
        r.peer.mismatches[tcp],
        r.inject.corrupted,
        r.partial
    );
    assert_eq!(
        r.peer.verified_packets[tcp] + r.peer.mismatches[tcp] + r.partial,
        r.inject.marked,
        "verified + mismatches + partial-checksum skips == marked"
    );
}

const MB: u64 = 1 << 20;

/// Enforce mode's contract: every injected corruption detected and dropped, and TCP's
/// retransmissions deliver the whole stream byte for byte. The one exception is address scope's
/// look-alike partial-checksum skip (1 segment in 65,536, `assert_accounted`): a corrupted
/// segment it lets through reaches the application, so the bytes that differ are at most the
/// corrupted segments that were not mismatches (0 in most runs; a 1 GiB stream has about 12
/// such skips, of which a corrupted one now and then).
fn assert_enforced(r: &Run, bytes: u64) {
    assert!(r.inject.corrupted > 0, "the injector corrupted something");
    assert_accounted(r);
    let tcp = Proto::Tcp as usize;
    assert_eq!(
        r.peer.drops[tcp], r.peer.mismatches[tcp],
        "every mismatch dropped"
    );
    let let_through = r.inject.corrupted - r.peer.mismatches[tcp];
    assert_eq!(r.stream.received, bytes, "TCP retransmitted every drop");
    assert!(
        r.stream.differing <= let_through,
        "{} bytes differ, but only {let_through} corrupted segments were not dropped",
        r.stream.differing
    );
}

#[test]
fn clean_stream_has_no_mismatches() {
    if skip_unless_root("clean_stream_has_no_mismatches") {
        return;
    }
    let r = run(ADDR_A, Mode::Observe, 0, 1500, 4 * MB, false);
    assert_eq!(
        r.stream,
        StreamResult {
            received: 4 * MB,
            differing: 0,
            invisible: 0,
        }
    );
    assert_eq!(r.inject.corrupted, 0);
    assert!(
        r.inject.marked > 0,
        "the injector marked segments UNNECESSARY"
    );
    assert_eq!(r.peer.mismatches, [0; PROTO_COUNT]);
    assert_eq!(r.peer.drops, [0; PROTO_COUNT]);
    assert_eq!(r.aggregated, 0, "GRO is off on the receiver");
    // Every marked segment (data, SYN, ACKs, FIN) reached the verifier and was verified.
    assert_accounted(&r);
    assert!(
        r.peer.verified_bytes[Proto::Tcp as usize] > 4 * MB,
        "payload plus headers"
    );
    assert_eq!(r.peer.verified_packets[Proto::Udp as usize], 0);
}

#[test]
fn observe_mode_detects_every_injected_corruption_and_the_app_sees_it() {
    if skip_unless_root("observe_mode_detects_every_injected_corruption_and_the_app_sees_it") {
        return;
    }
    let r = run(ADDR_A, Mode::Observe, 50, 1500, 4 * MB, false);
    assert!(r.inject.corrupted > 0);
    assert_accounted(&r);
    assert_eq!(r.peer.drops, [0; PROTO_COUNT]);
    // This is the bug natt-monitor exists for: the corrupted bytes reach the application.
    assert_eq!(r.stream.received, 4 * MB);
    assert_app_saw_corruption(&r);
}

#[test]
fn enforce_mode_drops_corruption_and_tcp_delivers_a_byte_exact_stream() {
    if skip_unless_root("enforce_mode_drops_corruption_and_tcp_delivers_a_byte_exact_stream") {
        return;
    }
    let r = run(ADDR_A, Mode::Enforce, 50, 1500, 8 * MB, false);
    assert_enforced(&r, 8 * MB);
}

/// Long enough that the upgrade happens while it flows (about 2 s here).
const UPGRADE_BYTES: u64 = 1 << 30;

/// An upgrade while traffic flows: the previous build's program (here the bounded-loop variant,
/// another program with the same maps) runs pinned in enforce mode; its process exits; the new
/// build adopts the pinned maps and swaps its program into the pinned link in one
/// `BPF_LINK_UPDATE`. The stream arrives byte for byte, and the counts of both programs add up
/// to exactly what was injected.
#[test]
fn an_upgrade_swaps_the_pinned_program_mid_stream_without_a_gap() {
    if skip_unless_root("an_upgrade_swaps_the_pinned_program_mid_stream_without_a_gap") {
        return;
    }
    let lab = Lab::new(1500);
    let cg = Cgroup::new();
    let pins = PinDir::new();
    natt_monitor::pin::prepare(&pins.path).expect("pin directory");
    let load = |variant| {
        VerifierLoader::new(&Scope::Address, variant)
            .load_pinned(&pins.path)
            .expect("load pinned")
    };
    let (mut old, origin) = load(Variant::BoundedLoop);
    assert_eq!(origin, PinnedMaps::Created);
    let table = PeerTable::new(vec![PeerSpec::new(
        parse_cidr(ADDR_A).unwrap(),
        Mode::Enforce,
    )])
    .unwrap();
    old.peer_maps()
        .unwrap()
        .set_peers(&PeerTable::default(), &table)
        .unwrap();
    assert_eq!(
        old.attach_pinned(&cg.path, &pins.path).unwrap(),
        Attached::New
    );
    let old_id = old.program_mut().unwrap().info().unwrap().id();
    let inj = Injector::attach(&lab.b, lab.dev_b, 50);
    let tcp = Proto::Tcp as usize;
    let (s, new) = std::thread::scope(|scope| {
        let streaming = scope.spawn(|| stream(PEER, &lab, &cg.path, UPGRADE_BYTES, false));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while old.stats().peer_stats(0).unwrap().drops[tcp] < 20 {
            assert!(std::time::Instant::now() < deadline, "no drops within 20 s");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        // The old daemon exits: its descriptors close, the pins keep link and maps.
        drop(old);
        let (mut new, origin) = load(Variant::BpfLoop);
        assert_eq!(origin, PinnedMaps::Adopted);
        let contents = new.peer_maps().unwrap().contents().unwrap();
        assert_eq!(contents.peers.len(), 1);
        assert_eq!(contents.peers[0].0, parse_cidr(ADDR_A).unwrap());
        assert_eq!(contents.peers[0].1, table.value(0, table.get(0).unwrap()));
        assert_eq!(
            new.attach_pinned(&cg.path, &pins.path).unwrap(),
            Attached::Replaced {
                old_prog_id: old_id
            }
        );
        assert!(
            !streaming.is_finished(),
            "the stream ended before the upgrade; make it longer"
        );
        (streaming.join().expect("stream thread"), new)
    });
    let mut new = new;
    let new_id = new.program_mut().unwrap().info().unwrap().id();
    let link = natt_monitor::pin::Link::open(&pins.path.join("link")).unwrap();
    assert_eq!(link.info().unwrap().prog_id, new_id);
    let r = readings(&new, s, inj.stats());
    log_run("upgrade from bounded_loop to bpf_loop", &r);
    assert_enforced(&r, UPGRADE_BYTES);
}

/// The limit no checksum escapes, measured: a corruption that leaves the one's-complement sum
/// unchanged (two adjacent 16-bit words of the payload swapped, in every 50th segment that
/// brings new data: a retransmission of data the receiver has is discarded, swap and all) sums
/// like the intact segment, so the verifier passes it as verified even in enforce mode, as the
/// kernel's own check would. The receiver finds every one as an `invisible` run: the same
/// judgement by which the VM suite tells such a segment (about 1 in 65,535 random corruptions)
/// from a miss.
#[test]
fn a_corruption_that_keeps_the_sum_is_delivered_and_found_invisible() {
    if skip_unless_root("a_corruption_that_keeps_the_sum_is_delivered_and_found_invisible") {
        return;
    }
    let lab = Lab::new(1500);
    let cg = Cgroup::new();
    let v = attached_verifier(&cg, ADDR_A, Mode::Enforce, None);
    let inj = Injector::attach_swapping(&lab.b, lab.dev_b, 50);
    let s = stream(PEER, &lab, &cg.path, 4 * MB, false);
    let r = readings(&v, s, inj.stats());
    drop(inj);
    log_run("swapped words", &r);
    let (st, peer) = (r.inject, r.peer);
    let tcp = Proto::Tcp as usize;
    assert!(st.corrupted >= 20, "{} segments swapped", st.corrupted);
    assert_eq!(
        (s.received, s.invisible),
        (4 * MB, st.corrupted),
        "every swapped segment delivered, and found invisible"
    );
    // Two to four bytes differ per swap (bytes equal in both words do not).
    assert!(
        (2 * st.corrupted..=4 * st.corrupted).contains(&s.differing),
        "{} bytes differ for {} swaps",
        s.differing,
        st.corrupted
    );
    assert_eq!(
        (peer.mismatches[tcp], peer.drops[tcp]),
        (0, 0),
        "the verifier saw nothing: the sum did not change"
    );
    // Every segment the injector marked, swapped ones included, verified; but for a segment
    // whose checksum field happens to equal its pseudo-header sum (1 in 65,536), which address
    // scope takes for CHECKSUM_PARTIAL and skips.
    assert_eq!(
        peer.verified_packets[tcp] + r.partial,
        st.marked,
        "verified + partial-checksum skips == marked"
    );
}

/// ICMP echo replies marked as esp4.c marks a NAT-T packet, one in every 7 (per CPU)
/// corrupted: ICMP skips its checksum under the mark and the raw socket gets the reply. The
/// verifier checks every reply against residual 0 (ICMP has no pseudo-header), counts exactly
/// the corrupted ones, and in enforce mode drops them before the socket sees them.
#[test]
fn icmp_echo_replies_are_verified_and_corruption_counted_exactly() {
    if skip_unless_root("icmp_echo_replies_are_verified_and_corruption_counted_exactly") {
        return;
    }
    echo_replies_through_the_verifier(ADDR_A);
}

/// The same for `ICMPv6`, which esp6.c marks alike and `icmpv6_rcv` skips alike: checked
/// against the peer's residual (0 here: `ICMPv6` sums a pseudo-header, but no NAT rewrote it).
/// The neighbours are static, so that no neighbour discovery from the peer is counted beside
/// the replies.
#[test]
fn icmpv6_echo_replies_are_verified_and_corruption_counted_exactly() {
    if skip_unless_root("icmpv6_echo_replies_are_verified_and_corruption_counted_exactly") {
        return;
    }
    echo_replies_through_the_verifier(ADDR6_A);
}

/// Pings `peer` (A's address) from B, 300 echo requests of 1,000 bytes, in observe and then
/// enforce mode, with A's replies marked and one in 7 corrupted; asserts what the socket got
/// and the peer's counts, exactly.
fn echo_replies_through_the_verifier(peer_addr: &str) {
    let (count, size) = (300u16, 1000usize);
    let icmp = Proto::Icmp as usize;
    for mode in [Mode::Observe, Mode::Enforce] {
        let lab = Lab::new(1500);
        if peer_addr.contains(':') {
            lab.static_neighbours();
        }
        let cg = Cgroup::new();
        let v = attached_verifier(&cg, peer_addr, mode, None);
        let inj = Injector::attach(&lab.b, lab.dev_b, 7);
        let p = ping(PEER, &lab.b, &cg.path, peer_addr, count, size);
        let (st, peer) = (inj.stats(), v.stats().peer_stats(0).unwrap());
        drop(inj);
        eprintln!("{peer_addr} {mode}: {p:?}; injector {st:?}; verifier {peer:?}");
        let bad = st.icmp_corrupted;
        assert_eq!(
            st.icmp_messages,
            u64::from(count),
            "{mode}: replies the injector saw"
        );
        assert!(
            bad >= 40,
            "{mode}: one in 7 per CPU corrupted, {bad} of {count}"
        );
        let enforce = mode == Mode::Enforce;
        assert_eq!(
            p,
            PingResult {
                sent: u64::from(count),
                intact: u64::from(count) - bad,
                corrupted: if enforce { 0 } else { bad },
                lost: if enforce { bad } else { 0 },
            },
            "{mode}: what the pinging socket got"
        );
        let mut want = PeerStats::default();
        want.verified_packets[icmp] = u64::from(count) - bad;
        want.verified_bytes[icmp] = (u64::from(count) - bad) * (8 + u64::try_from(size).unwrap());
        want.mismatches[icmp] = bad;
        want.drops[icmp] = if enforce { bad } else { 0 };
        assert_eq!(peer, want, "{mode}: the peer's counts");
    }
}

#[test]
fn enforce_mode_over_ipv6() {
    if skip_unless_root("enforce_mode_over_ipv6") {
        return;
    }
    let r = run(ADDR6_A, Mode::Enforce, 40, 1500, 4 * MB, true);
    assert_enforced(&r, 4 * MB);
}

#[test]
fn segments_up_to_64k_are_verified() {
    if skip_unless_root("segments_up_to_64k_are_verified") {
        return;
    }
    // Both program variants: the bpf_loop callback and the bounded loop of older kernels.
    for variant in [Variant::BpfLoop, Variant::BoundedLoop] {
        let r = run_variant(
            ADDR_A,
            Mode::Enforce,
            20,
            65_000,
            16 * MB,
            false,
            Some(variant),
        );
        assert!(
            r.inject.max_l4_len > 60_000,
            "segments of {} bytes reached the receiver",
            r.inject.max_l4_len
        );
        assert!(
            r.peer.verified_bytes[Proto::Tcp as usize]
                / r.peer.verified_packets[Proto::Tcp as usize]
                > 20_000,
            "large segments verified"
        );
        assert_enforced(&r, 16 * MB);
    }
}

#[test]
fn an_unconfigured_peer_is_left_alone() {
    if skip_unless_root("an_unconfigured_peer_is_left_alone") {
        return;
    }
    // The configured peer is another host: A's segments are out of scope, even in enforce mode.
    let r = run("198.51.100.0/24", Mode::Enforce, 50, 1500, 2 * MB, false);
    assert_eq!(
        r.peer,
        PeerStats::default(),
        "nothing verified, counted or dropped"
    );
    assert_eq!(
        r.not_in_scope, r.inject.marked,
        "every segment from A counted as not_in_scope"
    );
    // Without a verifier in scope, the emulated NAT-T path hands the corruption to the app.
    assert_app_saw_corruption(&r);
}

/// Partial checksums (veth with the sender's tx offload on, as it is by default, and loopback)
/// and plaintext are never mismatches and never dropped, in either scope, with enforce-mode
/// peers that cover both the veth peer and loopback. SA scope runs attached at the cgroup2
/// root, as users run it.
#[test]
fn partial_checksums_and_plaintext_are_never_mismatches() {
    if skip_unless_root("partial_checksums_and_plaintext_are_never_mismatches") {
        return;
    }
    let mut scopes = vec![Scope::Address];
    match scope::layout_from(&std::path::Path::new("/sys").join(scope::VMLINUX_BTF)) {
        Ok(l) => scopes.push(Scope::Sa(l)),
        Err(e) => eprintln!("sa scope not tested: {e}"),
    }
    for s in scopes {
        let lab = Lab::with_default_offloads(1500);
        let cg = Cgroup::new();
        let mut v = loader(&s).load().expect("load verifier");
        v.peer_maps()
            .unwrap()
            .set_peers(
                &PeerTable::default(),
                &PeerTable::new(vec![
                    PeerSpec::new(parse_cidr(ADDR_A).unwrap(), Mode::Enforce),
                    PeerSpec::new(parse_cidr("127.0.0.0/8").unwrap(), Mode::Enforce),
                ])
                .unwrap(),
            )
            .unwrap();
        let root = natt_monitor::cgroup::cgroup2_mount().expect("cgroup2 mount");
        v.attach(if matches!(s, Scope::Sa(_)) {
            &root
        } else {
            &cg.path
        })
        .expect("attach");
        let over_veth = stream(PEER, &lab, &cg.path, 2 * MB, false);
        let over_lo = stream_between(PEER, &lab.b, &lab.b, "127.0.0.1:5003", &cg.path, 2 * MB);
        let c = v.stats().counters().unwrap();
        let stats = [
            v.stats().peer_stats(0).unwrap(),
            v.stats().peer_stats(1).unwrap(),
        ];
        drop(v);
        eprintln!(
            "{} scope: veth {over_veth:?}, loopback {over_lo:?}, peers {stats:?}, partial_checksum={} aggregated={} not_ipsec={}",
            s.as_str(),
            c.get(Counter::SkipPartialChecksum),
            c.get(Counter::SkipAggregated),
            c.get(Counter::SkipNotIpsec)
        );
        let whole = StreamResult {
            received: 2 * MB,
            differing: 0,
            invisible: 0,
        };
        assert_eq!(over_veth, whole, "{} scope, veth", s.as_str());
        assert_eq!(over_lo, whole, "{} scope, loopback", s.as_str());
        for st in &stats {
            assert_eq!(
                st.mismatches,
                [0; PROTO_COUNT],
                "{} scope: {stats:?}",
                s.as_str()
            );
            assert_eq!(
                st.drops,
                [0; PROTO_COUNT],
                "{} scope: {stats:?}",
                s.as_str()
            );
        }
        match s {
            // Address scope recognises the partial checksums: nothing verified, all exempt.
            Scope::Address => {
                assert_eq!(stats[0].verified_packets, [0; PROTO_COUNT], "{stats:?}");
                assert!(c.get(Counter::SkipPartialChecksum) > 0);
            }
            // SA scope never looks: no segment came through an SA.
            Scope::Sa(_) => {
                assert_eq!(c.get(Counter::SkipPartialChecksum), 0);
                assert_eq!(stats[0].verified_packets, [0; PROTO_COUNT], "{stats:?}");
                assert!(c.get(Counter::SkipNotIpsec) > 0);
            }
        }
    }
}

/// A GRE tunnel from A to B: `gnm` in each, inner addresses 10.77.0.1 and .2, B's GRO off (the
/// documented remedy: GRO on a tunnel device merges inner segments, which cannot be verified).
/// Returns B's tunnel ifindex and B's network namespace inode; `None` when this kernel has no
/// GRE (`CONFIG_NET_IPGRE`).
fn gre_tunnel(lab: &Lab) -> Option<(u32, u32)> {
    let probe = std::process::Command::new("ip")
        .args([
            "-n",
            &lab.a.name,
            "link",
            "add",
            "gnm0",
            "type",
            "gre",
            "remote",
            ADDR_B,
        ])
        .output()
        .expect("run ip");
    if !probe.status.success() {
        eprintln!(
            "no GRE tunnels on this kernel: {}",
            String::from_utf8_lossy(&probe.stderr).trim()
        );
        return None;
    }
    sh(&["ip", "-n", &lab.a.name, "link", "del", "gnm0"]);
    for (ns, local, remote, inner) in [
        (&lab.a, ADDR_A, ADDR_B, "10.77.0.1/30"),
        (&lab.b, ADDR_B, ADDR_A, "10.77.0.2/30"),
    ] {
        let n = ns.name.as_str();
        sh(&[
            "ip", "-n", n, "link", "add", "gnm", "type", "gre", "local", local, "remote", remote,
        ]);
        sh(&["ip", "-n", n, "addr", "add", inner, "dev", "gnm"]);
        sh(&["ip", "-n", n, "link", "set", "gnm", "up"]);
    }
    sh(&[
        "ip",
        "netns",
        "exec",
        &lab.b.name,
        "ethtool",
        "-K",
        "gnm",
        "gro",
        "off",
    ]);
    Some(device_of(lab, "gnm"))
}

/// The verifier's tunnel path, device by device: the injector on B's veth marks each packet
/// `CHECKSUM_UNNECESSARY` (as `esp_input_done2` marks a decapsulated one) and corrupts every
/// 9th TCP data segment, inner ones included. Listed in `TUNNELS` under SA scope, a device's
/// segments (no `sec_path`) count under the tunnel's peer: every corruption a mismatch, dropped,
/// and the stream byte-exact. Listed with another namespace's inode (an equal ifindex
/// elsewhere), or not listed, the device is none of the verifier's: nothing is verified, and the
/// kernel delivers the corruption. The program does not care which kind a device is, so B's veth
/// stands in for a tunnel on kernels without GRE (this one); where GRE exists, a GRE tunnel over
/// the veth runs too (GRE without its checksum option passes the mark to the inner packet). The
/// VM suite proves the real path: GRE, IPIP and ip6 tunnels inside real NAT-T SAs.
#[test]
fn a_listed_tunnel_device_is_verified_in_its_namespace_and_no_other_device_is() {
    let name = "a_listed_tunnel_device_is_verified_in_its_namespace_and_no_other_device_is";
    if skip_unless_root(name) {
        return;
    }
    let layout = match scope::layout_from(&std::path::Path::new("/sys").join(scope::VMLINUX_BTF)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("SKIP {name}: tunnels need SA scope: {e}");
            return;
        }
    };
    for device in ["veth", "gre"] {
        for listed in ["this namespace", "another namespace", "nowhere"] {
            let lab = Lab::new(1500);
            let (found, to) = if device == "gre" {
                let Some(found) = gre_tunnel(&lab) else {
                    eprintln!("{name}: GRE not run; the veth stood in for it");
                    return;
                };
                (found, "10.77.0.2:5001")
            } else {
                (device_of(&lab, lab.dev_b), "192.0.2.2:5001")
            };
            tunnel_run(layout, &lab, found, listed, to, device);
        }
    }
}

/// B's device `dev`: its ifindex and B's network namespace inode.
fn device_of(lab: &Lab, dev: &str) -> (u32, u32) {
    use std::os::unix::fs::MetadataExt as _;
    // `ip netns exec` mounts B's own /sys; entering the namespace alone would not.
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &lab.b.name, "cat"])
        .arg(format!("/sys/class/net/{dev}/ifindex"))
        .output()
        .expect("run ip netns exec");
    assert!(out.status.success(), "{dev}'s ifindex in B: {out:?}");
    let ifindex = String::from_utf8_lossy(&out.stdout).into_owned();
    let netns = std::fs::metadata(format!("/run/netns/{}", lab.b.name))
        .expect("B's netns file")
        .ino();
    (
        ifindex.trim().parse().expect("ifindex"),
        u32::try_from(netns).expect("32-bit netns inode"),
    )
}

/// One stream from A to `to` through B's device `(ifindex, netns)`, listed as `listed` says,
/// under SA scope at the cgroup2 root, with what
/// `a_listed_tunnel_device_is_verified_in_its_namespace_and_no_other_device_is` asserts.
fn tunnel_run(
    layout: monitor_ebpf::SecpathLayout,
    lab: &Lab,
    (ifindex, netns): (u32, u32),
    listed: &str,
    to: &str,
    device: &str,
) {
    let bytes = 2 * MB;
    let tcp = Proto::Tcp as usize;
    let cg = Cgroup::new();
    let mut v = loader(&Scope::Sa(layout)).load().expect("load verifier");
    let maps = v.peer_maps().unwrap();
    // Id 0: the tunnel's peer (its remote, as discovery names it); id 1: SA scope's catch-all,
    // which every inner source address falls under first.
    maps.set_peers(
        &PeerTable::default(),
        &PeerTable::new(vec![
            PeerSpec::new(parse_cidr(ADDR_A).unwrap(), Mode::Enforce),
            PeerSpec::new(parse_cidr("0.0.0.0/0").unwrap(), Mode::Enforce),
        ])
        .unwrap(),
    )
    .unwrap();
    let value = |netns| TunnelValue {
        peer: PeerValue {
            id: 0,
            mode: PeerMode::Enforce as u8,
            flags: 0,
            expected_residual: 0,
        },
        netns,
    };
    match listed {
        "this namespace" => maps.set_tunnels(&[(ifindex, value(netns))]).unwrap(),
        "another namespace" => maps.set_tunnels(&[(ifindex, value(netns + 1))]).unwrap(),
        _ => {}
    }
    let root = natt_monitor::cgroup::cgroup2_mount().expect("cgroup2 mount");
    v.attach(&root).expect("attach at the cgroup2 root");
    let inj = Injector::attach(&lab.b, lab.dev_b, 9);
    let s = stream_between(PEER, &lab.a, &lab.b, to, &cg.path, bytes);
    let r = readings(&v, s, inj.stats());
    let catch_all = v.stats().peer_stats(1).unwrap();
    drop(inj);
    drop(v);
    let what = format!("{device} listed in {listed}");
    log_run(&what, &r);
    assert!(
        r.inject.corrupted > 0,
        "{what}: the injector corrupted segments"
    );
    assert_eq!(
        catch_all.verified_packets, [0; PROTO_COUNT],
        "{what}: {catch_all:?}"
    );
    assert_eq!(
        catch_all.mismatches, [0; PROTO_COUNT],
        "{what}: {catch_all:?}"
    );
    if listed == "this namespace" {
        assert_eq!(r.peer.mismatches[tcp], r.inject.corrupted, "{what}");
        assert_eq!(r.peer.drops[tcp], r.inject.corrupted, "{what}");
        assert_eq!(
            r.peer.verified_packets[tcp] + r.peer.mismatches[tcp],
            r.inject.marked,
            "{what}: every marked segment verified or a mismatch"
        );
        assert_eq!(
            r.stream,
            StreamResult {
                received: bytes,
                differing: 0,
                invisible: 0
            },
            "{what}: TCP retransmitted every drop"
        );
    } else {
        assert_eq!(r.peer.verified_packets, [0; PROTO_COUNT], "{what}");
        assert_eq!(r.peer.mismatches, [0; PROTO_COUNT], "{what}");
        assert_eq!(r.stream.received, bytes, "{what}");
        assert_app_saw_corruption(&r);
    }
}
