//! Learned residuals in the real binary (root only): address scope enforces exact peers and only
//! observes learned ones; a wrong learned residual is withdrawn by the verifier and learned again.

use natt_monitor_tests::{
    PinDir,
    daemon::{Daemon, assert_no_verifier_loaded, field_u64, tcp_counts},
    metric,
    net::{ADDR_A, ADDR_B, ADDR6_A, Cgroup, Injector, Lab, stream, stream_between},
    skip_unless_root,
};

/// The `natt-peer` helper that sends and receives the test streams.
const PEER: &str = env!("CARGO_BIN_EXE_natt-peer");

/// Every injected corruption was counted, but for look-alikes: `partial_checksum` counts
/// segments whose checksum field holds only the pseudo-header sum, a corrupted one that happens
/// to look so or an intact `CHECKSUM_PARTIAL` one (one fresh-clone run in nine saw one), so it
/// bounds what was missed rather than equalling it.
fn assert_counted(counted: u64, injected: u64, look_alike: u64) {
    assert!(
        counted <= injected && counted + look_alike >= injected,
        "{counted} of {injected} corruptions counted, {look_alike} look-alike partial checksums"
    );
}

/// Address scope never drops on a guess, shown on one daemon in enforce mode: a peer that learns
/// its residual (IPv4, `learn_residual = true`) runs in observe mode, so every corruption from it
/// is counted and reaches the application; a peer whose residual is exact (IPv6, no NAT) is
/// enforced, so every corruption from it is dropped and its stream arrives byte for byte.
#[test]
fn address_scope_enforces_exact_peers_and_only_observes_learned_ones() {
    if skip_unless_root("address_scope_enforces_exact_peers_and_only_observes_learned_ones") {
        return;
    }
    let lab = Lab::new(1500);
    let cg = Cgroup::new();
    let dir = std::env::temp_dir().join(format!("natt-daemon-addr-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("natt-monitor.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:0\"\ncgroup = \"{}\"\nmode = \"enforce\"\nscope = \"address\"\n\
             [[peer]]\ncidr = \"{ADDR_A}\"\nlearn_residual = true\n\
             [[peer]]\ncidr = \"{ADDR6_A}\"\n",
            cg.path.display()
        ),
    )
    .unwrap();
    let d = Daemon::attached(&["run", "--config", cfg.to_str().unwrap()]);
    let held_back = d.messages(OBSERVE_ONLY);
    assert_eq!(held_back.len(), 1, "{:?}", d.lines());
    assert_eq!(field_u64(&held_back[0], "peers"), 1);
    let (_, body) = d.get("/metrics");
    assert_eq!(metric(&body, "natt_monitor_peers_observe_only"), Some(1));

    let inj = Injector::attach(&lab.b, lab.dev_b, 50);
    let bytes: u64 = 4 << 20;
    let counts = |body: &str, peer: &str, proto: &str| -> [u64; 4] {
        let m = |name: &str| {
            metric(
                body,
                &format!("{name}{{peer=\"{peer}\",proto=\"{proto}\"}}"),
            )
            .unwrap_or(0)
        };
        [
            m("natt_monitor_verified_packets_total"),
            m("natt_monitor_checksum_mismatches_total"),
            m("natt_monitor_dropped_packets_total"),
            m("natt_monitor_learning_mismatches_total"),
        ]
    };
    let partial = |body: &str| {
        metric(
            body,
            "natt_monitor_skipped_packets_total{reason=\"partial_checksum\"}",
        )
        .unwrap_or(0)
    };

    // The learned peer: observed, so corruption is counted and delivered.
    let learned = stream(PEER, &lab, &cg.path, bytes, false);
    let injected = inj.stats().corrupted;
    let (_, body) = d.get("/metrics");
    let [verified, mismatches, dropped, while_learning] = counts(&body, "192.0.2.1/32", "tcp");
    let look_alike = partial(&body);
    eprintln!(
        "learned peer: {learned:?}, injected {injected}, verified {verified}, mismatches {mismatches}, dropped {dropped}, while learning {while_learning}, partial_checksum {look_alike}"
    );
    assert!(injected > 0 && verified > 0);
    assert_eq!(learned.received, bytes);
    assert_eq!(
        dropped, 0,
        "a learned residual is never enforced under address scope"
    );
    assert_counted(mismatches + while_learning, injected, look_alike);
    assert!(
        learned.differing > 0,
        "observe mode delivers what it counts"
    );

    // The exact peer: enforced, so corruption is dropped and TCP retransmits it.
    let exact = stream(PEER, &lab, &cg.path, bytes, true);
    let injected6 = inj.stats().corrupted - injected;
    let (_, body) = d.get("/metrics");
    let [verified6, mismatches6, dropped6, _] = counts(&body, "2001:db8:77::1/128", "tcp");
    let look_alike6 = partial(&body) - look_alike;
    eprintln!(
        "exact peer: {exact:?}, injected {injected6}, verified {verified6}, mismatches {mismatches6}, dropped {dropped6}, partial_checksum {look_alike6}"
    );
    assert!(injected6 > 0 && verified6 > 0);
    assert_counted(mismatches6, injected6, look_alike6);
    assert_eq!(
        dropped6, mismatches6,
        "every mismatch of the exact peer dropped"
    );
    assert_eq!(exact.received, bytes);
    assert!(
        exact.differing <= look_alike6,
        "{} bytes differ with {look_alike6} look-alike skips",
        exact.differing
    );
    // The learned peer's counts did not move while the exact one streamed.
    assert_eq!(counts(&body, "192.0.2.1/32", "tcp")[2], 0);

    let (status, _) = d.stop(libc::SIGTERM);
    assert!(status.success());
    drop(inj);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_no_verifier_loaded();
}

/// Rewrites every residual in the pinned `SA_TRUST` of `pins` to `residual`, as if the SA had
/// learned it from a flood.
fn poison_pinned_residuals(pins: &std::path::Path, residual: u16) -> usize {
    let data = aya::maps::MapData::from_pin(pins.join("SA_TRUST")).expect("pinned residuals");
    let mut map: aya::maps::HashMap<_, monitor_ebpf::SaKey, monitor_ebpf::SaTrust> =
        aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(data)).expect("an LRU hash");
    let keys: Vec<_> = map.keys().map(Result::unwrap).collect();
    for k in &keys {
        let mut value = map.get(k, 0).expect("read the residual");
        value.expected_residual = residual;
        map.insert(k, &value, 0).expect("rewrite the residual");
    }
    keys.len()
}

const OBSERVE_ONLY: &str = "address scope: peers whose NAT residual is learned run in observe mode, whatever their mode says (a learned residual is a guess there; enforce needs an exact one: configure the peer's original addresses, or run on a kernel with BTF for SA scope); natt_monitor_peers_observe_only counts them";

const WITHDRAWN: &str = "learned NAT residual withdrawn: consecutive distinct segments of the SA all left one other value and none verified in between, so it refused intact traffic; learning again";

/// Learning under attack, end to end: a peer whose SA holds a wrong learned residual (here
/// written into the pinned map between two daemons, as a flood while it learned would leave it)
/// has its intact segments refused. The verifier withdraws the residual after 16 consecutive
/// distinct segments leave the true value, and the daemon learns it again. (This host has no
/// ESP, so the lab runs address scope, where a learned peer is observed whatever its mode says:
/// the enforce mode the file asks for is refused with a warning, and nothing is dropped. The VM
/// suite drops under SA scope.)
#[test]
fn a_wrong_learned_residual_is_withdrawn_by_the_verifier_and_learned_again() {
    if skip_unless_root("a_wrong_learned_residual_is_withdrawn_by_the_verifier_and_learned_again") {
        return;
    }
    let lab = Lab::new(1500);
    let cg = Cgroup::new();
    let pins = PinDir::new();
    let dir = std::env::temp_dir().join(format!("natt-daemon-withdraw-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("natt-monitor.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\nmode = \"enforce\"\nscope = \"address\"\n\n[[peer]]\ncidr = \"{ADDR_A}\"\nlearn_residual = true\n"
        ),
    )
    .unwrap();
    let args = [
        "run",
        "--config",
        config.to_str().unwrap(),
        "--cgroup",
        cg.path.to_str().unwrap(),
        "--pin-path",
        pins.arg(),
    ];
    // The first daemon learns the lab's true residual (0: no NAT) and leaves it pinned.
    let mut first = Daemon::attached(&args);
    let refused = first.messages(OBSERVE_ONLY);
    assert_eq!(refused.len(), 1, "{:?}", first.lines());
    assert_eq!(field_u64(&refused[0], "peers"), 1);
    let s = stream(PEER, &lab, &cg.path, 1 << 20, false);
    assert_eq!((s.received, s.differing), (1 << 20, 0));
    first.wait_for("NAT residual learned; verifying this SA from now on");
    let (status, _) = first.stop(libc::SIGINT);
    assert!(status.success());
    // What a flood would have left: a wrong residual for the mapping.
    assert_eq!(poison_pinned_residuals(&pins.path, 0x0bad), 1);
    let mut second = Daemon::attached(&args);
    assert_eq!(
        second
            .messages("adopting the pinned maps: counts, peers and learned residuals continue")
            .len(),
        1
    );
    let (_, before) = second.get("/metrics");
    let (verified_before, mismatches_before, dropped_before) = tcp_counts(&before);
    assert_eq!((mismatches_before, dropped_before), (0, 0));
    // Twenty connections at once: their SYNs are twenty distinct segments, all refused. (One
    // connection alone would only retransmit its one SYN, which counts once: see residual_trust.rs,
    // `a_residual_is_withdrawn_only_by_an_unbroken_streak_of_distinct_segments`.)
    std::thread::scope(|scope| {
        let streams: Vec<_> = (0..20u16)
            .map(|i| {
                let (lab, cg) = (&lab, &cg);
                scope.spawn(move || {
                    let addr = format!("{ADDR_B}:{}", 5101 + i);
                    stream_between(PEER, &lab.a, &lab.b, &addr, &cg.path, 1 << 20)
                })
            })
            .collect();
        for s in streams {
            let s = s.join().expect("stream thread");
            assert_eq!(
                (s.received, s.differing),
                (1 << 20, 0),
                "a stream did not survive"
            );
        }
    });
    second.wait_for("NAT residual learned; verifying this SA from now on");
    let withdrawn = second.messages(WITHDRAWN);
    assert_eq!(withdrawn.len(), 1, "{:?}", second.lines());
    assert_eq!(withdrawn[0]["learned"], "0x0bad");
    assert_eq!(withdrawn[0]["found"], "0x0000");
    assert_eq!(field_u64(&withdrawn[0], "segments"), 16);
    let relearned = second.messages("NAT residual learned; verifying this SA from now on");
    assert_eq!(relearned.len(), 1);
    assert_eq!(relearned[0]["residual"], "0x0000");
    let (_, body) = second.get("/metrics");
    assert_eq!(
        metric(&body, "natt_monitor_residuals_withdrawn_total"),
        Some(1)
    );
    let (verified, mismatches, dropped) = tcp_counts(&body);
    // Observed, not dropped: the 16 that decided, and any segment of the twenty connections
    // judged before the withdrawal reached the ring. Then the streams were verified.
    assert_eq!(dropped, 0);
    assert!(mismatches >= 16, "{mismatches} mismatches");
    assert!(
        verified > verified_before + 1000,
        "{verified_before} -> {verified}"
    );
    eprintln!(
        "wrong residual withdrawn after {mismatches} refused segments; {} segments verified after relearning",
        verified - verified_before
    );
    let (status, _) = second.stop(libc::SIGTERM);
    assert!(status.success());
    let _ = std::fs::remove_dir_all(&dir);
}
