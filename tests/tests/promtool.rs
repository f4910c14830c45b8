//! The alert rule pack and the golden /metrics sample, checked with Prometheus's own promtool
//! (Debian package `prometheus`, installed by `scripts/setup.sh --test`).

use std::{path::Path, process::Command};

fn docs() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs"))
}

fn promtool(args: &[&str], stdin_file: Option<&Path>) -> String {
    let mut cmd = Command::new("promtool");
    cmd.args(args).current_dir(docs().join("alerts"));
    if let Some(f) = stdin_file {
        cmd.stdin(std::fs::File::open(f).expect("open stdin file"));
    }
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("promtool not runnable ({e}); install it with scripts/setup.sh --test (Debian package prometheus)")
    });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

#[test]
fn rule_pack_is_valid() {
    let out = promtool(&["check", "rules", "natt-monitor.rules.yml"], None);
    assert!(out.contains("SUCCESS: 7 rules found"), "{out}");
}

#[test]
fn rule_pack_unit_tests_pass() {
    let out = promtool(&["test", "rules", "natt-monitor.rules.test.yml"], None);
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn golden_metrics_pass_promtool_lint() {
    let golden = docs().join("metrics.golden.prom");
    let out = promtool(&["check", "metrics"], Some(&golden));
    assert_eq!(
        out.trim(),
        "",
        "promtool check metrics reported problems:\n{out}"
    );
}
