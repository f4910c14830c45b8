//! Judging one scenario: every claim as an exact comparison.

use natt_monitor::{capture::CAPTURE_BURST, peers::Mode};

use crate::{
    plan::PLAINTEXT_DATAGRAMS,
    run::{Measured, expected_nat_residual},
    scale::{DUMMY_SAS, PEER_LABELS},
    scenarios::{Corruption, Scenario, Setup},
    shared_nat::shared_nat_residuals,
};

/// The scenario's claims, as assertions on what it measured.
#[expect(
    clippy::too_many_lines,
    reason = "one expectation per claim, read top to bottom against the scenario table"
)]
pub(crate) fn check(s: &Scenario, m: &Measured) -> Result<(), String> {
    let mut problems = Vec::new();
    let mut expect = |ok: bool, what: String| {
        if !ok {
            problems.push(what);
        }
    };
    if s.corrupt {
        expect(m.injected > 0, "the rule corrupted nothing".into());
    }
    if let Err(e) = m.shapes.judge(s, m.detected) {
        expect(false, e);
    }
    if crate::run::TUNNEL_SCENARIOS.contains(&s.name) {
        let ok = m.tunnel.as_ref().is_some_and(|r| r.exact(s.mode));
        let got = m
            .tunnel
            .as_ref()
            .map_or_else(|| "not run".to_owned(), crate::tunnel::TunnelRun::summary);
        expect(
            ok,
            format!(
                "tunnels through the SA: {got}; want every corrupted inner segment counted, exactly, and no plaintext tunnel verified"
            ),
        );
    }
    if crate::run::ICMP_SCENARIOS.contains(&s.name) {
        let ok = m.icmp.as_ref().is_some_and(|i| i.exact(s.mode));
        let got = m
            .icmp
            .as_ref()
            .map_or_else(|| "not run".to_owned(), crate::icmp::IcmpRun::summary);
        expect(
            ok,
            format!("ICMP through the SA: {got}; want every corrupted reply counted, exactly"),
        );
        let ok = s.v6 || m.sctp.as_ref().is_some_and(|r| r.exact(s.mode));
        let got = m
            .sctp
            .as_ref()
            .map_or_else(|| "not run".to_owned(), crate::sctp::SctpRun::summary);
        expect(
            ok,
            format!("SCTP through the SA: {got}; want every corrupted packet counted, exactly"),
        );
    }
    // No corruption shape, rate or timing may make the verifier give up a correct residual; a
    // flood while the SA learned makes it learn the flood's, which it must give up once.
    let want_withdrawn = u64::from(s.corruption == Corruption::Flood);
    expect(
        m.withdrawn == want_withdrawn,
        format!("{} residuals withdrawn, want {want_withdrawn}", m.withdrawn),
    );
    if let Some(f) = &m.flood {
        // What the flood did: B's SA learned the flood's residual, the verifier withdrew it on
        // 16 refused intact segments that all left the true one, and the SA learned the true
        // one; the other SA with traffic learned once and kept it. Intact segments refused
        // meanwhile are mismatches, at least the withdrawing streak.
        let want = format!("{:#06x}", expected_nat_residual());
        let ok = f.learned.len() == 2
            && f.learned[0] != want
            && f.learned[1] == want
            && f.withdrawn == [(f.learned[0].clone(), want.clone())]
            && f.other_learned == 1
            && f.other_withdrawn == 0
            && m.detected >= monitor_ebpf::WITHDRAW_AFTER as u64;
        expect(
            ok,
            format!(
                "flood while learning: {}, {} mismatches; want the flood's residual, then {want} after one withdrawal that found {want}, the other SA untouched",
                f.summary(),
                m.detected
            ),
        );
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
    if let Some(sc) = &m.scale {
        // The SA with traffic and the dummies: every peer but the first 256 is summed.
        let want = DUMMY_SAS + 1 - PEER_LABELS;
        expect(
            sc.aggregated == want,
            format!("{} peers aggregated, want {want}", sc.aggregated),
        );
        expect(
            sc.label_values == 258,
            format!(
                "{} peer label values, want 256, `other` and `undiscovered` (outside the cap)",
                sc.label_values
            ),
        );
    }
    if let Some(r) = &m.restart {
        expect(
            r.adopted,
            "the second daemon did not adopt the pinned verifier".into(),
        );
        expect(
            r.mid_stream,
            "the stream ended before the second daemon was up; make it longer".into(),
        );
        expect(
            r.gap_injected > 0,
            "nothing was corrupted while no daemon ran".into(),
        );
        expect(
            r.totals_match,
            "the restarted daemon's peer totals differ from its metrics".into(),
        );
        expect(
            !r.relearned,
            "the restarted daemon learned the residual again".into(),
        );
        // The first daemon's capture died with it (its ring is not pinned): the second's holds
        // what it drained, some of the mismatches.
        expect(
            m.captured > 0 && m.captured < m.detected,
            format!(
                "captured {} of {} after the restart",
                m.captured, m.detected
            ),
        );
    } else if m.detected <= u64::from(CAPTURE_BURST) {
        // Fewer mismatches than the capture's burst: every one is in the file.
        expect(
            m.captured == m.detected,
            format!("captured {} != detected {}", m.captured, m.detected),
        );
    } else {
        // More than the burst: at least the burst, and what the rate let through after it.
        expect(
            m.captured >= u64::from(CAPTURE_BURST) && m.captured <= m.detected,
            format!(
                "captured {} of {} past a burst of {CAPTURE_BURST}",
                m.captured, m.detected
            ),
        );
    }
    if let Some(p) = &m.plaintext {
        let want = if s.setup.manual_sas() {
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
    if s.setup == Setup::SharedNat {
        // The returning host learned its own residual from its own segments (at least 8),
        // with not one false mismatch, and both streams of the phase were byte-exact.
        let ok = m.rejoin.as_deref().is_some_and(|r| {
            let field = |k: &str| {
                r.split(',')
                    .find_map(|kv| kv.strip_prefix(k))
                    .unwrap_or_default()
            };
            field("learned=").parse::<u64>().is_ok_and(|n| n >= 1) && field("exact=") == "yes"
        });
        expect(
            ok,
            format!(
                "the host that came back on a departed host's NAT mapping: {}",
                m.rejoin.as_deref().unwrap_or("-")
            ),
        );
    }
    // Only a map too small for the SAs with traffic forgets residuals; each forgotten one comes
    // back from its mapping's record (an own residual restored is not an inheritance).
    if s.setup == Setup::Evicted {
        expect(
            m.evicted > 0 && m.inherited == 0,
            format!(
                "{} residuals evicted (want some), {} inherited (want 0)",
                m.evicted, m.inherited
            ),
        );
    } else {
        expect(
            m.evicted == 0,
            format!("{} residuals evicted from a map large enough", m.evicted),
        );
    }
    if let Some(k) = &m.soak {
        // Every rekey's new SA took its predecessor's residual over at its first segment, and
        // nothing else inherited (a returning host learns its own).
        expect(
            m.inherited == k.rekeys,
            format!(
                "{} residuals inherited for {} rekeys (seed {})",
                m.inherited, k.rekeys, k.seed
            ),
        );
    }
    if matches!(s.setup, Setup::StrongSwan | Setup::ManualRekey) {
        // The rekeyed child SA took its predecessor's residual over at its first segment.
        expect(
            m.inherited >= 1,
            format!("{} residuals inherited across the rekeys", m.inherited),
        );
    }
    if let Some(h) = &m.sighup {
        // The reload reached the discovered peer: every corruption of the second stream was
        // dropped and retransmitted, and the learned residual was kept (nothing to learning).
        expect(
            h.injected > 0
                && h.detected == h.injected
                && h.dropped == h.injected
                && h.learning == 0
                && h.exact,
            format!("after SIGHUP to enforce mode: {h:?}"),
        );
    }
    if let Some(r) = &m.rebound {
        // The mapping moved while the stream flowed, B's SA followed it, and the SA kept its
        // residual: not one segment went unverified for the move (mismatches == dropped ==
        // injected and byte-exact are judged below, across it).
        expect(
            r.mid_stream && r.mappings >= 1 && r.sa_updated && r.learning == 0,
            format!("NAT rebinding: {}", r.summary()),
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
        // `q-undiscovered-netns`: the daemon's own namespace has no SAs.
        let want = u64::from(s.setup != Setup::Undiscovered);
        expect(
            m.xfrm_peers == want,
            format!("xfrm peers {} != {want}", m.xfrm_peers),
        );
        if s.setup != Setup::StrongSwan && s.corruption != Corruption::Flood {
            // Every corruption is counted: by the verifier, or (passed while the SA learned)
            // by the daemon once the residual was known.
            expect(
                m.detected + m.learning_mismatches == m.injected,
                format!(
                    "detected {} + learning mismatches {} != injected {}",
                    m.detected, m.learning_mismatches, m.injected
                ),
            );
        }
        // Enforce mode delivers no TCP segment unverified (the streams are TCP); corruption
        // from an SA's first segment in observe mode is met while learning.
        let (ok, want) = match (s.mode, s.corruption) {
            (Mode::Enforce, _) => (m.learning_mismatches == 0, "0"),
            (Mode::Observe, Corruption::WordFromStart) => {
                (m.learning_mismatches >= 1, "at least 1")
            }
            _ => (true, ""),
        };
        expect(
            ok,
            format!(
                "{} learning segments judged corrupt, want {want}",
                m.learning_mismatches
            ),
        );
        expect(m.verified > 0, "nothing verified".into());
        // Observe mode learns in the daemon from at least 8 segments, passed meanwhile. Enforce
        // mode delivers no TCP segment unverified: without NAT the first segment sums to 0 and
        // installs it (nothing goes to learning); behind one, TCP's retransmission of a held
        // segment confirms the residual (at least that segment was held).
        let (ok, want) = match (s.mode, s.nat) {
            (Mode::Observe, _) => (m.learning >= 8, "at least 8"),
            (Mode::Enforce, false) => (m.learning == 0, "0"),
            (Mode::Enforce, true) => (m.learning >= 1, "at least 1"),
        };
        expect(
            ok,
            format!("{} segments went to learning, want {want}", m.learning),
        );
        if s.mode == Mode::Enforce {
            // Every held or corrupted segment was retransmitted: nothing reached the
            // application that was not verified.
            expect(
                m.confirmed >= 1,
                format!("{} residuals confirmed in the kernel", m.confirmed),
            );
        }
        expect(
            m.kernel_csum_errors == 0,
            format!(
                "kernel counted {} checksum errors on a NAT-T path",
                m.kernel_csum_errors
            ),
        );
        let want = if s.setup == Setup::SharedNat {
            shared_nat_residuals()
        } else if let Some(k) = &m.soak {
            k.want_residuals.clone()
        } else if let Some(f) = &m.flood {
            // The first learned was the flood's (judged above).
            f.learned.first().cloned().unwrap_or_default()
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
        // A and A2, then the returning host and A2 again.
        4 * s.stream_bytes()
    } else if let Some(k) = &m.soak {
        k.bytes
    } else {
        s.stream_bytes()
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
        // `p-sighup-enforce` enforced its second stream (judged above).
        let (enforced, dropped) = m
            .sighup
            .as_ref()
            .map_or((0, 0), |h| (h.injected, h.dropped));
        expect(
            m.differing >= m.injected - enforced,
            format!(
                "the application saw {} differing bytes for {} corruptions",
                m.differing,
                m.injected - enforced
            ),
        );
        expect(
            m.dropped == dropped,
            format!("observe mode dropped {}", m.dropped - dropped),
        );
    }
    if let Some(k) = &m.soak
        && !problems.is_empty()
    {
        problems.push(format!(
            "replay with NATT_SOAK_SEED={} cargo xtask vm-test {}",
            k.seed, s.name
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}
