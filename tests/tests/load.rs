//! The kernel verifier accepts the program in both scopes; reports its size and verification
//! cost for each, so the margin to the 1M-instruction limit shows in every test log.

use natt_monitor::{
    ebpf::{self, Variant, Verifier, VerifierLoader},
    features::Features,
    scope::{self, Scope},
};
use natt_monitor_tests::{loader, skip_unless_root};

fn load(scope: &Scope, variant: Variant) -> Verifier {
    // As the daemon loads it: the capture ring and pairing on.
    VerifierLoader::new(scope, variant)
        .capture(true)
        .load()
        .unwrap_or_else(|e| {
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
                "load ({} scope, {}) failed:\n{}",
                scope.as_str(),
                variant.as_str(),
                lines[lines.len().saturating_sub(40)..].join("\n")
            );
        })
}

#[test]
fn verifier_program_loads_in_both_scopes_and_variants_and_reports_its_cost() {
    if skip_unless_root("verifier_program_loads_in_both_scopes_and_variants_and_reports_its_cost") {
        return;
    }
    let mut scopes = vec![Scope::Address];
    match scope::layout_from(&std::path::Path::new("/sys").join(scope::VMLINUX_BTF)) {
        Ok(l) => scopes.push(Scope::Sa(l)),
        Err(e) => eprintln!("sa scope not loaded: {e}"),
    }
    let readme = readme_check_figure();
    for s in &scopes {
        for variant in [Variant::BpfLoop, Variant::BoundedLoop] {
            let mut v = load(s, variant);
            let info = v.program_mut().unwrap().info().expect("program info");
            let xlated = info.size_translated().expect("translated size");
            let verified = info.verified_instruction_count();
            eprintln!(
                "{} ({} scope): {} translated instructions, {verified:?} instructions processed by the kernel verifier",
                variant.program(),
                s.as_str(),
                xlated / 8
            );
            assert!(xlated > 0);
            // The tail-called programs, verified apart: the held path, pairing, and (where
            // `bpf_loop` exists) SCTP's CRC32c.
            let tails: &[&'static str] = if variant == Variant::BpfLoop {
                &[ebpf::PROGRAM_HOLD, ebpf::PROGRAM_PAIR, ebpf::PROGRAM_SCTP]
            } else {
                &[ebpf::PROGRAM_HOLD, ebpf::PROGRAM_PAIR]
            };
            for name in tails {
                let info = v.program_named(name).unwrap().info().expect("program info");
                eprintln!(
                    "  {name}: {} translated instructions, {:?} processed",
                    info.size_translated().expect("translated size") / 8,
                    info.verified_instruction_count()
                );
            }
            if matches!(s, Scope::Sa(_)) && variant == Variant::BpfLoop {
                match &readme {
                    Some((release, figure)) if *release == kernel_release() => assert_eq!(
                        verified,
                        Some(*figure),
                        "README's `natt-monitor check` sample quotes {figure} instructions on \
                         {release}; this build's program costs {verified:?} there: paste the real \
                         output of `natt-monitor check` into the README"
                    ),
                    Some((release, _)) => eprintln!(
                        "README's check sample is from {release}, not this kernel ({}): its \
                         instruction figure is not compared",
                        kernel_release()
                    ),
                    None => panic!(
                        "README has no `natt-monitor check` sample with a bpf program load line"
                    ),
                }
            }
        }
    }
    // The variant follows the bpf_loop probe, and a load of the probed variant runs it.
    let features = Features::probe();
    let probed = if features.bpf_loop.present() {
        Variant::BpfLoop
    } else {
        Variant::BoundedLoop
    };
    assert_eq!(features.variant(), probed);
    assert_eq!(loader(&Scope::Address).load().unwrap().variant(), probed);
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .expect("kernel release")
        .trim()
        .to_string()
}

/// The kernel release and the verifier's instruction count that the README's sample
/// `natt-monitor check` output shows (its `kernel` and `bpf program load` lines).
fn readme_check_figure() -> Option<(String, u32)> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    let field = |prefix: &str| {
        readme
            .lines()
            .find_map(|l| l.strip_prefix(prefix).map(str::trim_start))
    };
    let release = field("info  kernel")?
        .split_whitespace()
        .next()?
        .to_string();
    let load = field("ok    bpf program load")?;
    let figure = load
        .split("; ")
        .nth(1)?
        .strip_suffix(" of 1000000 instructions processed)")?
        .parse()
        .ok()?;
    Some((release, figure))
}
