//! Shipped artifacts: the alert rule pack and the golden /metrics sample (checked with
//! Prometheus's own promtool), the Grafana dashboard and the systemd unit
//! (promtool comes with the Debian package `prometheus`, installed by `scripts/setup.sh --test`).

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
    assert!(out.contains("SUCCESS: 17 rules found"), "{out}");
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

/// Every `natt_monitor_*` name the rule pack and the dashboard use is one the daemon exports
/// (the golden exposition is the daemon's real output, checked byte for byte by a unit test).
#[test]
fn rules_and_dashboard_use_only_exported_metrics() {
    let golden = std::fs::read_to_string(docs().join("metrics.golden.prom")).unwrap();
    let exported: Vec<&str> = golden
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    for file in [
        docs().join("alerts/natt-monitor.rules.yml"),
        docs().join("../deploy/grafana/natt-monitor.json"),
    ] {
        let text = std::fs::read_to_string(&file).unwrap();
        let mut used = 0;
        for (i, _) in text.match_indices("natt_monitor_") {
            let name: String = text[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            assert!(
                exported.contains(&name.as_str()),
                "{} uses {name}, which natt-monitor does not export",
                file.display()
            );
            used += 1;
        }
        assert!(used > 0, "{} uses no natt-monitor metric", file.display());
    }
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(docs().join("../deploy/grafana/natt-monitor.json")).unwrap(),
    )
    .expect("dashboard is valid JSON");
    assert_eq!(dashboard["uid"], "natt-monitor");
}

/// `jsonnet` run in deploy/mixin with `args`; its
/// output.
fn jsonnet(args: &[&str]) -> String {
    let out = Command::new("jsonnet")
        .current_dir(docs().join("../deploy/mixin"))
        .args(args)
        .output()
        .expect("jsonnet (scripts/setup.sh --test installs it)");
    assert!(
        out.status.success(),
        "jsonnet {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The comment the generated rule pack starts with.
const RULES_HEADER: &str = "\
# natt-monitor alert rule pack, generated from the mixin in deploy/mixin (jsonnet -S
# deploy/mixin/rules.jsonnet): edit the mixin, not this file. tests/tests/artifacts.rs fails when
# the two differ; UPDATE_GENERATED=1 cargo test -p natt-monitor-tests --test artifacts rewrites it.
# Load it into Prometheus (rule_files) and route by `severity`; runbook: docs/runbook.md. For
# another job name or cluster label, build your own from the mixin's _config.
";

/// Compares a checked-in generated file with what the mixin generates now; rewrites it under
/// `UPDATE_GENERATED`.
fn assert_generated(path: &Path, want: &str) {
    if std::env::var_os("UPDATE_GENERATED").is_some() {
        std::fs::write(path, want).unwrap();
        return;
    }
    let have = std::fs::read_to_string(path).unwrap();
    assert!(
        have == want,
        "{} is stale: the mixin generates something else; UPDATE_GENERATED=1 cargo test -p natt-monitor-tests --test artifacts",
        path.display()
    );
}

#[test]
fn the_rule_pack_and_the_dashboard_are_the_mixins() {
    let rules = format!("{RULES_HEADER}{}", jsonnet(&["-S", "rules.jsonnet"]));
    assert_generated(&docs().join("alerts/natt-monitor.rules.yml"), &rules);
    let dashboard = jsonnet(&["dashboard.jsonnet"]);
    assert_generated(
        &docs().join("../deploy/grafana/natt-monitor.json"),
        &dashboard,
    );
}

#[test]
fn the_mixin_follows_a_non_default_job_name() {
    let rules = jsonnet(&[
        "-S",
        "-e",
        "std.manifestYamlDoc(((import 'mixin.libsonnet') + { _config+:: { selector: 'job=\"ipsec-verifier\"' } }).prometheusAlerts, quote_keys=false)",
    ]);
    assert!(
        rules.contains("up{job=\\\"ipsec-verifier\\\"} == 0"),
        "{rules}"
    );
    let dir = std::env::temp_dir().join(format!("natt-custom-job-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("natt-monitor.custom-job.rules.yml"), rules).unwrap();
    std::fs::copy(
        docs().join("alerts/natt-monitor.custom-job.test.yml"),
        dir.join("natt-monitor.custom-job.test.yml"),
    )
    .unwrap();
    let out = Command::new("promtool")
        .current_dir(&dir)
        .args(["test", "rules", "natt-monitor.custom-job.test.yml"])
        .output()
        .expect("promtool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(out.status.success() && text.contains("SUCCESS"), "{text}");
}

/// One mismatch shows red: every number on the dashboard turns red from 1; every query is
/// filtered by the cluster, job and instance variables.
#[test]
fn the_dashboard_shows_one_mismatch_red_and_filters_by_job_and_cluster() {
    let d: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(docs().join("../deploy/grafana/natt-monitor.json")).unwrap(),
    )
    .unwrap();
    let vars: Vec<&str> = d["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(vars, ["datasource", "cluster", "job", "instance"]);
    let panels = d["panels"].as_array().unwrap();
    let mut stats = 0;
    for p in panels {
        for t in p["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            assert!(
                expr.contains("cluster=~\"$cluster\",job=~\"$job\",instance=~\"$instance\""),
                "{expr}"
            );
        }
        if p["type"] == "stat" {
            stats += 1;
            let steps = p["fieldConfig"]["defaults"]["thresholds"]["steps"]
                .as_array()
                .unwrap();
            assert_eq!(steps.last().unwrap()["color"], "red", "{}", p["title"]);
            assert_eq!(steps.last().unwrap()["value"], 1, "{}", p["title"]);
        }
    }
    assert_eq!(stats, 6);
    let titles: Vec<&str> = panels
        .iter()
        .map(|p| p["title"].as_str().unwrap())
        .collect();
    for want in [
        "Learning: segments passed unverified",
        "Peers (SAs) by source, and the limit",
        "Unverifiable and skipped traffic by reason",
    ] {
        assert!(titles.contains(&want), "no panel {want:?}");
    }
}

/// The unit stops restarting on exactly the exit statuses the binary reserves for mistakes only
/// an edit fixes (so a typo never loops, and nothing else stays down), and runs the capture in
/// its state directory.
#[test]
fn the_unit_agrees_with_the_exit_status_table() {
    let unit =
        std::fs::read_to_string(docs().join("../deploy/systemd/natt-monitor.service")).unwrap();
    let value = |key: &str| {
        unit.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .unwrap_or_else(|| panic!("the unit sets no {key}="))
            .to_owned()
    };
    let mut prevented: Vec<u8> = value("RestartPreventExitStatus")
        .split_whitespace()
        .map(|c| c.parse().unwrap())
        .collect();
    prevented.sort_unstable();
    assert_eq!(prevented, natt_monitor::config::EXIT_NO_RESTART);
    assert_eq!(value("Restart"), "on-failure");
    assert_eq!(value("StateDirectory"), "natt-monitor");
    assert_eq!(value("StateDirectoryMode"), "0700");
    // docs/configuration.md's table lists each status the binary uses.
    let doc = std::fs::read_to_string(docs().join("configuration.md")).unwrap();
    for code in [0, 1]
        .into_iter()
        .chain(natt_monitor::config::EXIT_NO_RESTART)
    {
        assert!(
            doc.lines().any(|l| l.starts_with(&format!("| {code} |"))),
            "docs/configuration.md has no row for exit status {code}"
        );
    }
}

/// The shipped systemd unit passes `systemd-analyze verify` (with `ExecStart` pointed at the
/// binary this test suite built, since /usr/local/bin has none here).
#[test]
fn systemd_unit_verifies() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIP systemd_unit_verifies: systemd-analyze is not installed");
        return;
    }
    let bin = std::env::current_exe()
        .unwrap()
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("natt-monitor");
    assert!(
        bin.exists(),
        "{} missing: cargo build -p natt-monitor first (cargo xtask test does)",
        bin.display()
    );
    let unit =
        std::fs::read_to_string(docs().join("../deploy/systemd/natt-monitor.service")).unwrap();
    let dir = std::env::temp_dir().join(format!("natt-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("natt-monitor.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/natt-monitor", bin.to_str().unwrap()),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(
        out.status.success() && text.trim().is_empty(),
        "systemd-analyze verify:\n{text}"
    );
}

/// The cells of a markdown table row, trimmed; `None` for a line that is not a row.
fn cells(line: &str) -> Option<Vec<String>> {
    let inner = line.trim().strip_prefix('|')?.strip_suffix('|')?;
    Some(inner.split('|').map(|c| c.trim().to_owned()).collect())
}

/// What the VM suite's recorded results say per kernel (docs/vm-results.md, the table a
/// `cargo xtask vm-test` run writes to target/vm/results.md): (release, scenarios passed,
/// scenarios run, variant, instructions). Every kernel ran every scenario, one row each.
fn recorded_kernels() -> Vec<(String, u32, u32, String, Option<u64>)> {
    let text = std::fs::read_to_string(docs().join("vm-results.md")).unwrap();
    let all: Vec<Vec<String>> = text.lines().filter_map(cells).collect();
    let rows: Vec<_> = all
        .iter()
        .filter(|c| c.len() == 6 && c[3].ends_with(" scenarios pass"))
        .map(|c| {
            let counts: Vec<u32> = c[3]
                .trim_end_matches(" scenarios pass")
                .split(" of ")
                .map(|n| n.parse().unwrap())
                .collect();
            let insns = c[5]
                .strip_suffix(" of 1000000 instructions processed")
                .map(|n| n.parse().unwrap());
            (c[1].clone(), counts[0], counts[1], c[4].clone(), insns)
        })
        .collect();
    assert_eq!(rows.len(), 4, "vm-results.md's kernel table: {rows:?}");
    let names = natt_monitor_tests::vm_scenarios::NAMES;
    for (release, passed, run, _, _) in &rows {
        assert_eq!(
            passed, run,
            "vm-results.md: {release} did not pass every scenario"
        );
        assert_eq!(
            *run as usize,
            names.len(),
            "vm-results.md: {release} ran {run} scenarios; the suite has {}: rerun it",
            names.len()
        );
        for name in names {
            let found = all
                .iter()
                .filter(|c| c.len() > 2 && c[0] == *release && c[2] == name)
                .count();
            assert_eq!(
                found, 1,
                "vm-results.md: {release} has {found} rows for {name}"
            );
        }
    }
    rows
}

/// The README's and install.md's kernel tables quote the VM suite's recorded results: the same
/// scenario counts, program variants and verifier instruction counts, kernel by kernel.
#[test]
fn the_kernel_tables_quote_the_recorded_vm_results() {
    let recorded = recorded_kernels();
    let number = |s: &str| -> Option<u64> {
        let digits: String = s
            .split_whitespace()
            .next()?
            .chars()
            .filter(|c| *c != ',')
            .collect();
        digits.parse().ok()
    };
    for (doc, status_col, variant_col, insns_col) in
        [("../README.md", 2, 3, 4), ("install.md", 2, 4, 5)]
    {
        let text = std::fs::read_to_string(docs().join(doc)).unwrap();
        let rows: Vec<Vec<String>> = text
            .lines()
            .filter_map(cells)
            .filter(|c| c.len() > insns_col && c[status_col].starts_with("full"))
            .collect();
        assert_eq!(rows.len(), recorded.len(), "{doc}'s kernel table: {rows:?}");
        for (release, passed, run, variant, insns) in &recorded {
            let row = rows
                .iter()
                .find(|r| release.starts_with(&r[1]))
                .unwrap_or_else(|| panic!("{doc} has no row for {release}"));
            let status = &row[status_col];
            if let Some(quoted) = status.split_once(" of ") {
                let n: String = quoted.0.chars().filter(char::is_ascii_digit).collect();
                let m: String = quoted.1.chars().take_while(char::is_ascii_digit).collect();
                assert_eq!(
                    (n.parse::<u32>().unwrap(), m.parse::<u32>().unwrap()),
                    (*passed, *run),
                    "{doc}: {release}'s scenario count"
                );
            }
            assert!(
                row[variant_col].contains(&format!("`{variant}`")),
                "{doc}: {release}'s variant is {variant}: {row:?}"
            );
            assert_eq!(
                number(&row[insns_col]),
                *insns,
                "{doc}: {release}'s verifier instructions: {row:?}"
            );
        }
    }
}
