//! The kernel verifier accepts the program; reports its size and verification cost.

use natt_monitor::ebpf::Verifier;
use natt_monitor_tests::skip_unless_root;

#[test]
fn verifier_program_loads_and_reports_its_cost() {
    if skip_unless_root("verifier_program_loads_and_reports_its_cost") {
        return;
    }
    let mut v = Verifier::load().unwrap_or_else(|e| {
        let mut chain = vec![e.to_string()];
        let mut src = std::error::Error::source(&e);
        while let Some(inner) = src {
            chain.push(inner.to_string());
            src = inner.source();
        }
        let text = chain.join("\ncaused by: ");
        let lines: Vec<&str> = text.lines().collect();
        // The verifier log's tail says why it refused.
        panic!(
            "load failed:\n{}",
            lines[lines.len().saturating_sub(40)..].join("\n")
        );
    });
    let info = v.program_mut().unwrap().info().expect("program info");
    let xlated = info.size_translated().expect("translated size");
    let verified = info.verified_instruction_count();
    eprintln!(
        "natt_verify: {} translated instructions, {verified:?} instructions processed by the kernel verifier",
        xlated / 8
    );
    assert!(xlated > 0);
}
