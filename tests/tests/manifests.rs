//! The Kubernetes manifests, checked offline: every object is well formed and the objects agree
//! with each other (names, selectors, ports, volumes, the configuration file's keys), the pod is
//! as privileged as it must be and no more, and the `PrometheusRule` is the rule pack, generated.
//! No cluster or schema download is needed; the checks are structural, in Rust.

use std::path::{Path, PathBuf};

use serde_yaml_ng::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every document of a multi-document YAML file.
fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| {
            serde::Deserialize::deserialize(d).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        })
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn all() -> Vec<Value> {
    ["natt-monitor.yaml", "prometheus-operator.yaml"]
        .iter()
        .flat_map(|f| documents(&repo().join("deploy/kubernetes").join(f)))
        .collect()
}

fn s<'a>(v: &'a Value, path: &[&str]) -> &'a str {
    get(v, path)
        .as_str()
        .unwrap_or_else(|| panic!("{} is not a string", path.join(".")))
}

fn get<'a>(v: &'a Value, path: &[&str]) -> &'a Value {
    path.iter().fold(v, |v, k| {
        v.get(*k)
            .unwrap_or_else(|| panic!("missing {} in {v:?}", path.join(".")))
    })
}

fn list<'a>(v: &'a Value, path: &[&str]) -> &'a Vec<Value> {
    get(v, path)
        .as_sequence()
        .unwrap_or_else(|| panic!("{} is not a list", path.join(".")))
}

fn one<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = docs.iter().filter(|d| s(d, &["kind"]) == kind).collect();
    assert_eq!(found.len(), 1, "one {kind}");
    found[0]
}

#[test]
fn every_object_is_well_formed_and_in_the_namespace() {
    let docs = all();
    for d in &docs {
        let kind = s(d, &["kind"]);
        assert_ne!(s(d, &["apiVersion"]), "");
        assert_eq!(s(d, &["metadata", "name"]), "natt-monitor", "{kind}");
        if kind != "Namespace" {
            assert_eq!(s(d, &["metadata", "namespace"]), "natt-monitor", "{kind}");
        }
    }
    let kinds: Vec<&str> = docs.iter().map(|d| s(d, &["kind"])).collect();
    assert_eq!(
        kinds,
        [
            "Namespace",
            "ServiceAccount",
            "ConfigMap",
            "DaemonSet",
            "Service",
            "ServiceMonitor",
            "PrometheusRule"
        ]
    );
}

#[test]
fn the_pod_is_privileged_exactly_as_far_as_it_must_be() {
    let docs = all();
    let ns = one(&docs, "Namespace");
    for mode in ["enforce", "audit", "warn"] {
        assert_eq!(
            s(
                ns,
                &[
                    "metadata",
                    "labels",
                    &format!("pod-security.kubernetes.io/{mode}")
                ]
            ),
            "privileged"
        );
    }
    let sa = one(&docs, "ServiceAccount");
    assert_eq!(
        get(sa, &["automountServiceAccountToken"]),
        &Value::Bool(false)
    );
    let pod = get(one(&docs, "DaemonSet"), &["spec", "template", "spec"]);
    assert_eq!(
        s(pod, &["serviceAccountName"]),
        s(sa, &["metadata", "name"])
    );
    assert_eq!(
        get(pod, &["automountServiceAccountToken"]),
        &Value::Bool(false)
    );
    assert_eq!(get(pod, &["hostNetwork"]), &Value::Bool(true));
    let containers = list(pod, &["containers"]);
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    let sc = get(c, &["securityContext"]);
    let caps = |k: &str| -> Vec<&str> {
        list(sc, &["capabilities", k])
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect()
    };
    assert_eq!(caps("drop"), ["ALL"]);
    assert_eq!(caps("add"), ["BPF", "PERFMON", "NET_ADMIN"]);
    assert_eq!(get(sc, &["allowPrivilegeEscalation"]), &Value::Bool(false));
    assert_eq!(get(sc, &["readOnlyRootFilesystem"]), &Value::Bool(true));
    assert!(
        sc.get("privileged")
            .is_none_or(|p| p == &Value::Bool(false)),
        "not a privileged container"
    );
    // containerd's RuntimeDefault profile refuses bpf(2) without CAP_SYS_ADMIN (the manifest
    // says so next to this setting, docs/install.md#seccomp too).
    assert_eq!(s(sc, &["seccompProfile", "type"]), "Unconfined");
    // Every mount names a volume; the host paths are exactly what the daemon reads or pins in.
    let volumes = list(pod, &["volumes"]);
    for m in list(c, &["volumeMounts"]) {
        let name = s(m, &["name"]);
        assert!(
            volumes.iter().any(|v| s(v, &["name"]) == name),
            "mount {name} has no volume"
        );
    }
    let host_paths: Vec<&str> = volumes
        .iter()
        .filter_map(|v| v.get("hostPath"))
        .map(|h| s(h, &["path"]))
        .collect();
    assert_eq!(host_paths, ["/sys/fs/cgroup", "/proc", "/sys/fs/bpf"]);
    // Probes reach /healthz on the metrics port over TLS.
    for probe in ["livenessProbe", "readinessProbe"] {
        let g = get(c, &[probe, "httpGet"]);
        assert_eq!(
            (s(g, &["path"]), s(g, &["port"]), s(g, &["scheme"])),
            ("/healthz", "metrics", "HTTPS")
        );
    }
}

#[test]
fn the_configuration_is_valid_and_points_into_its_mounts() {
    let docs = all();
    let cm = one(&docs, "ConfigMap");
    let toml_text = s(cm, &["data", "natt-monitor.toml"]);
    let opts: natt_monitor::config::RunOptions =
        toml::from_str(toml_text).unwrap_or_else(|e| panic!("natt-monitor.toml: {e}"));
    let c = &list(
        get(one(&docs, "DaemonSet"), &["spec", "template", "spec"]),
        &["containers"],
    )[0];
    let mount_of = |name: &str| -> String {
        list(c, &["volumeMounts"])
            .iter()
            .find(|m| s(m, &["name"]) == name)
            .map_or_else(
                || panic!("no mount {name}"),
                |m| s(m, &["mountPath"]).to_owned(),
            )
    };
    let args: Vec<&str> = list(c, &["args"])
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(
        args,
        [
            "run",
            "--config",
            &format!("{}/natt-monitor.toml", mount_of("config"))
        ]
    );
    let web = opts.web_config_file.expect("web_config_file");
    assert_eq!(web, Path::new(&mount_of("web")).join("web.yml"));
    assert_eq!(
        opts.proc_path.as_deref(),
        Some(Path::new(&mount_of("proc")))
    );
    assert_eq!(opts.cgroup.as_deref(), Some(Path::new(&mount_of("cgroup"))));
    let listen: std::net::SocketAddr = opts.listen.expect("listen").parse().unwrap();
    let port = list(c, &["ports"])
        .iter()
        .find(|p| s(p, &["name"]) == "metrics")
        .expect("metrics port");
    assert_eq!(
        get(port, &["containerPort"]).as_u64(),
        Some(u64::from(listen.port()))
    );
}

#[test]
fn the_service_monitor_scrapes_the_pods_as_job_natt_monitor() {
    let docs = all();
    let pod_labels = get(
        one(&docs, "DaemonSet"),
        &["spec", "template", "metadata", "labels"],
    );
    let svc = one(&docs, "Service");
    assert_eq!(get(svc, &["spec", "selector"]), pod_labels);
    let port = &list(svc, &["spec", "ports"])[0];
    assert_eq!(s(port, &["targetPort"]), "metrics");
    let sm = one(&docs, "ServiceMonitor");
    assert_eq!(
        get(sm, &["spec", "selector", "matchLabels"]),
        get(svc, &["metadata", "labels"])
    );
    let ep = &list(sm, &["spec", "endpoints"])[0];
    assert_eq!(s(ep, &["port"]), s(port, &["name"]));
    assert_eq!(s(ep, &["scheme"]), "https");
    // The job label prometheus-operator gives these targets is the Service's name: the job the
    // rule pack's NattMonitorDown alert watches.
    assert_eq!(s(svc, &["metadata", "name"]), "natt-monitor");
    let rules = std::fs::read_to_string(repo().join("docs/alerts/natt-monitor.rules.yml")).unwrap();
    assert!(
        rules.contains(r#"expr: "up{job=\"natt-monitor\"} == 0""#),
        "{rules}"
    );
    // The credentials and CA come from the Secrets the pod and docs/install.md name.
    assert_eq!(
        s(ep, &["basicAuth", "password", "name"]),
        "natt-monitor-scrape"
    );
    assert_eq!(
        s(ep, &["tlsConfig", "ca", "secret", "name"]),
        "natt-monitor-web"
    );
}

/// Where the generated part of prometheus-operator.yaml begins.
const GENERATED_MARK: &str = "# (UPDATE_GENERATED=1 cargo test -p natt-monitor-tests --test manifests); do not edit below.\n";

/// The `PrometheusRule` for the rule pack: its groups, under `spec`.
fn prometheus_rule(rules: &str) -> String {
    let groups: String = rules
        .lines()
        .skip_while(|l| l.starts_with('#'))
        .map(|l| {
            if l.is_empty() {
                "\n".to_owned()
            } else {
                format!("  {l}\n")
            }
        })
        .collect();
    format!(
        "apiVersion: monitoring.coreos.com/v1\nkind: PrometheusRule\nmetadata:\n  name: natt-monitor\n  namespace: natt-monitor\n  labels:\n    app.kubernetes.io/name: natt-monitor\n    release: kube-prometheus-stack\nspec:\n{groups}"
    )
}

#[test]
fn the_prometheus_rule_is_the_rule_pack() {
    let path = repo().join("deploy/kubernetes/prometheus-operator.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let (head, generated) = text
        .split_once(GENERATED_MARK)
        .expect("the generated-part marker");
    let rules = std::fs::read_to_string(repo().join("docs/alerts/natt-monitor.rules.yml")).unwrap();
    let want = prometheus_rule(&rules);
    if std::env::var_os("UPDATE_GENERATED").is_some() {
        std::fs::write(&path, format!("{head}{GENERATED_MARK}{want}")).unwrap();
        return;
    }
    assert_eq!(
        generated, want,
        "deploy/kubernetes/prometheus-operator.yaml is stale: UPDATE_GENERATED=1 cargo test -p natt-monitor-tests --test manifests"
    );
    // And it is the same rules, parsed: groups and every rule's alert, expr and labels.
    let pack: Value = serde_yaml_ng::from_str(&rules).unwrap();
    let docs = all();
    let pr = one(&docs, "PrometheusRule");
    assert_eq!(get(pr, &["spec", "groups"]), get(&pack, &["groups"]));
    // kube-prometheus-stack reads only objects labelled with its release: the rules and the
    // scrape carry the same label, so that one edit makes both (and the absence alert) seen.
    let sm = one(&docs, "ServiceMonitor");
    for obj in [pr, sm] {
        assert_eq!(
            s(obj, &["metadata", "labels", "release"]),
            "kube-prometheus-stack"
        );
    }
}

/// `deploy/kubernetes/detach.yaml` runs `natt-monitor detach` on every node at the path the
/// daemon set pins in, from the same image, with no more privilege than the daemon set.
#[test]
fn the_detach_daemon_set_removes_what_the_daemon_set_pinned() {
    let detach = documents(&repo().join("deploy/kubernetes/detach.yaml"));
    let [ds] = detach.as_slice() else {
        panic!("detach.yaml holds one object")
    };
    assert_eq!(s(ds, &["kind"]), "DaemonSet");
    assert_eq!(s(ds, &["metadata", "namespace"]), "natt-monitor");
    let docs = all();
    let daemon = one(&docs, "DaemonSet");
    let pod = get(daemon, &["spec", "template", "spec"]);
    let main = &list(pod, &["containers"])[0];
    let [init] = list(ds, &["spec", "template", "spec", "initContainers"]).as_slice() else {
        panic!("one init container")
    };
    assert_eq!(s(init, &["image"]), s(main, &["image"]));
    assert_eq!(
        get(init, &["args"]),
        &serde_yaml_ng::from_str::<Value>("[detach, --pin-path, /sys/fs/bpf/natt-monitor]")
            .unwrap()
    );
    assert_eq!(
        get(init, &["securityContext", "capabilities"]),
        get(main, &["securityContext", "capabilities"])
    );
    // The host's bpffs, at the path the daemon's pins are under.
    let mount = &list(init, &["volumeMounts"])[0];
    assert_eq!(s(mount, &["mountPath"]), "/sys/fs/bpf");
    let volume = &list(ds, &["spec", "template", "spec", "volumes"])[0];
    assert_eq!(s(volume, &["name"]), s(mount, &["name"]));
    assert_eq!(s(volume, &["hostPath", "path"]), "/sys/fs/bpf");
    // The configuration the DaemonSet runs pins at the default path, which detach names.
    let config = one(&docs, "ConfigMap");
    assert!(!s(config, &["data", "natt-monitor.toml"]).contains("pin_path"));
}
