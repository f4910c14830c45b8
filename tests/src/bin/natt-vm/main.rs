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

use std::io::Write as _;

mod bench;
mod icmp;
mod plan;
mod processes;
mod restart;
mod run;
mod scale;
mod scenarios;
mod sctp;
mod shapes;
mod shared_nat;
mod soak;
mod strongswan;
mod systemd;
mod topology;
mod traffic;
mod tunnel;
mod verdict;

use std::{fs, process::Command, time::Instant};

use crate::{
    processes::bin,
    run::{Measured, run},
    scenarios::{Cipher, SCENARIOS, Scenario, Setup},
    verdict::check,
};

fn main() {
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    if std::env::args().nth(1).is_some_and(|a| a == "--systemd") {
        systemd::main(&kernel);
        return;
    }
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
    if only.first().is_some_and(|a| a == "--bench") {
        let (passed, failed) = match std::panic::catch_unwind(|| bench::run(&kernel)) {
            Ok(Ok(())) => (1, 0),
            Ok(Err(e)) => {
                println!("NATT-VM FAIL kernel={kernel} scenario=bench reason={e}");
                (0, 1)
            }
            Err(e) => {
                println!(
                    "NATT-VM FAIL kernel={kernel} scenario=bench reason={}",
                    panic_text(e.as_ref()).replace('\n', " | ")
                );
                (0, 1)
            }
        };
        println!("NATT-VM END kernel={kernel} passed={passed} failed={failed}");
        return;
    }
    assert_eq!(
        SCENARIOS.map(|s| s.name),
        natt_monitor_tests::vm_scenarios::NAMES,
        "natt-vm's scenarios differ from tests/src/vm_scenarios.rs"
    );
    let (mut passed, mut failed) = (0, 0);
    for s in SCENARIOS
        .iter()
        .filter(|s| only.is_empty() || only.iter().any(|o| o == s.name))
    {
        let started = Instant::now();
        let r = std::panic::catch_unwind(|| run(s));
        let secs = started.elapsed().as_secs_f64();
        match r.map_err(|e| panic_text(e.as_ref())) {
            Ok(m) => {
                let verdict = check(s, &m);
                println!("{}", result_line(&kernel, s, &m, secs, verdict.is_ok()));
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

/// What a caught panic said.
fn panic_text(e: &(dyn std::any::Any + Send)) -> String {
    e.downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "panic".into())
}

/// The scenario's `NATT-VM RESULT` line.
fn result_line(kernel: &str, s: &Scenario, m: &Measured, secs: f64, ok: bool) -> String {
    format!(
        "NATT-VM RESULT kernel={kernel} scenario={} setup={:?} mode={} cipher={} injected={} detected={} learning_mismatches={} dropped={} verified={} learning={} withdrawn={} inherited={} confirmed={} evicted={} residual={} received={} differing={} invisible={} kernel_csum_errors={} xfrm_peers={} aggregated={} aggregated_after_remedy={} removed_live={} plaintext={} rekey_learning={} rejoin={} restart={} scale={} sighup={} rebind={} flood={} soak={} icmp={} sctp={} tunnel={} captured={} shapes={} seconds={secs:.1} result={}",
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
        m.learning_mismatches,
        m.dropped,
        m.verified,
        m.learning,
        m.withdrawn,
        m.inherited,
        m.confirmed,
        m.evicted,
        m.residual,
        m.received,
        m.differing,
        m.invisible,
        m.kernel_csum_errors,
        m.xfrm_peers,
        m.aggregated,
        m.aggregated_after_remedy
            .map_or_else(|| "-".to_owned(), |n| n.to_string()),
        m.removed_live.map_or("-", |r| if r { "yes" } else { "no" }),
        m.plaintext.as_deref().unwrap_or("-"),
        m.rekey_learning
            .map_or_else(|| "-".to_owned(), |n| n.to_string()),
        m.rejoin.as_deref().unwrap_or("-"),
        m.restart
            .as_ref()
            .map_or_else(|| "-".to_owned(), restart::Restart::summary),
        m.scale
            .as_ref()
            .map_or_else(|| "-".to_owned(), scale::Scale::summary),
        m.sighup
            .as_ref()
            .map_or_else(|| "-".to_owned(), run::Reloaded::summary),
        m.rebound
            .as_ref()
            .map_or_else(|| "-".to_owned(), run::Rebound::summary),
        m.flood
            .as_ref()
            .map_or_else(|| "-".to_owned(), run::Flooded::summary),
        m.soak
            .as_ref()
            .map_or_else(|| "-".to_owned(), soak::Soaked::summary),
        m.icmp
            .as_ref()
            .map_or_else(|| "-".to_owned(), icmp::IcmpRun::summary),
        m.sctp
            .as_ref()
            .map_or_else(|| "-".to_owned(), sctp::SctpRun::summary),
        m.tunnel
            .as_ref()
            .map_or_else(|| "-".to_owned(), tunnel::TunnelRun::summary),
        m.captured,
        m.shapes.summary(),
        if ok { "ok" } else { "FAILED" }
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn scenarios_match_the_shared_list() {
        assert_eq!(
            super::SCENARIOS.map(|s| s.name),
            natt_monitor_tests::vm_scenarios::NAMES
        );
    }
}
