//! `natt-monitor check`: can this host run the verifier? Each probe prints one line; the
//! command fails if any required probe fails.

use std::{fmt::Write as _, fs, path::Path};

use crate::{
    cgroup,
    ebpf::VerifierLoader,
    features::{Features, Probe as Feature},
};

/// Outcome of one probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Status {
    /// Works.
    Ok,
    /// Does not work, and the monitor needs it.
    Fail,
    /// Informational; the monitor runs either way.
    Info,
}

/// One probe's result.
#[derive(Clone, Debug)]
pub struct Probe {
    /// What was probed.
    pub name: &'static str,
    /// Result.
    pub status: Status,
    /// Detail or remedy.
    pub detail: String,
}

/// Results of all probes.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// In probe order.
    pub probes: Vec<Probe>,
}

impl Report {
    /// True if every required probe passed.
    #[must_use]
    pub fn can_run(&self) -> bool {
        self.probes.iter().all(|p| p.status != Status::Fail)
    }

    fn push(&mut self, name: &'static str, status: Status, detail: impl Into<String>) {
        self.probes.push(Probe {
            name,
            status,
            detail: detail.into(),
        });
    }

    /// The report as printed.
    #[must_use]
    pub fn render(&self) -> String {
        let mut s = String::new();
        for p in &self.probes {
            let tag = match p.status {
                Status::Ok => "ok  ",
                Status::Fail => "FAIL",
                Status::Info => "info",
            };
            let _ = writeln!(s, "{tag}  {:<22} {}", p.name, p.detail);
        }
        let verdict = if self.can_run() {
            "natt-monitor can run on this host"
        } else {
            "natt-monitor cannot run on this host; fix the FAIL lines above"
        };
        let _ = writeln!(s, "{verdict}");
        s
    }
}

use crate::privileges::missing_capabilities;

/// The kernel release `<proc_root>/sys/kernel/osrelease` names.
pub(crate) fn kernel_release(proc_root: &Path) -> Option<String> {
    let rel = fs::read_to_string(proc_root.join("sys/kernel/osrelease")).ok()?;
    Some(rel.trim().to_owned())
}

/// Validates a configuration file as `run --config FILE` reads it, without flags or
/// environment variables, and summarises what it configures.
///
/// # Errors
/// The `ConfigError` that `run` would stop with.
pub fn config_summary(path: &Path) -> Result<String, crate::config::ConfigError> {
    use clap::ValueEnum as _;
    let s = crate::config::resolve(&crate::config::RunOptions {
        config: Some(path.to_owned()),
        ..crate::config::RunOptions::default()
    })?;
    let name = |v: Option<clap::builder::PossibleValue>| {
        v.map_or_else(String::new, |v| v.get_name().to_owned())
    };
    Ok(format!(
        "ok    config                 {}: {} static peer{}, discover {}, default mode {}, scope {}, cgroup {}, listen {}, pin path {}\nthe configuration is valid\n",
        path.display(),
        s.peers.len(),
        if s.peers.len() == 1 { "" } else { "s" },
        name(s.discover.to_possible_value()),
        s.default_mode,
        name(s.scope.to_possible_value()),
        s.cgroup.display(),
        s.listen,
        s.pin
            .as_deref()
            .map_or_else(|| "none".to_owned(), |p| p.display().to_string()),
    ))
}

/// What is pinned in `dir`: the link (its program, cgroup and whether it is attached) and the
/// maps. Informational: a running or stopped daemon leaves these on purpose.
pub fn pinned(r: &mut Report, dir: &Path, cgroup_mount: Option<&Path>) {
    use crate::pin::{self, Link};
    if !pin::is_bpffs(dir.parent().unwrap_or(dir)) {
        r.push(
            "pinned",
            Status::Info,
            format!(
                "nothing: {} is not on bpffs (run mounts bpffs at {} when the pin path lies below it)",
                dir.display(),
                pin::BPFFS_ROOT
            ),
        );
        return;
    }
    let maps = pin::pinned_maps(dir);
    let link = match Link::open(&dir.join(pin::LINK_FILE)) {
        Ok(l) => match l.info() {
            Ok(i) if i.attached() => {
                let at = cgroup_mount
                    .filter(|m| {
                        fs::File::open(m)
                            .and_then(|f| pin::cgroup_id(&f))
                            .is_ok_and(|id| id == i.cgroup_id)
                    })
                    .map_or_else(
                        || format!("cgroup id {}", i.cgroup_id),
                        |m| m.display().to_string(),
                    );
                format!(
                    "link {} runs program id {} at {at} ingress",
                    i.id, i.prog_id
                )
            }
            Ok(i) => format!("link {} is detached (its cgroup went)", i.id),
            Err(e) => format!("the link cannot be read: {e}"),
        },
        Err(_) => "no link".to_owned(),
    };
    r.push(
        "pinned",
        Status::Info,
        if maps.is_empty() && link == "no link" {
            format!("nothing at {}", dir.display())
        } else {
            format!(
                "{}: {link}; {} of {} maps ({}); `natt-monitor detach` removes them",
                dir.display(),
                maps.len(),
                pin::PINNED_MAPS.len(),
                maps.join(", ")
            )
        },
    );
}

/// Runs every probe, reading the kernel's state under `proc_root` and `sys_root` (normally
/// `/proc` and `/sys`). `cgroup_dir` overrides the temporary cgroup used for the attach test.
#[must_use]
#[expect(
    clippy::too_many_lines,
    reason = "a flat list of probes reads best in order"
)]
pub fn run_checks(cgroup_dir: Option<&Path>, proc_root: &Path, sys_root: &Path) -> Report {
    let mut r = Report::default();

    r.push(
        "kernel",
        Status::Info,
        kernel_release(proc_root).map_or_else(
            || {
                format!(
                    "could not read {}",
                    proc_root.join("sys/kernel/osrelease").display()
                )
            },
            |rel| format!("{rel} (judged by the probes below, not by its version)"),
        ),
    );
    let features = Features::probe();
    for (name, probe, meaning) in features.describe() {
        let required = name == "ring buffer";
        let (status, detail) = match probe {
            Feature::Present => (Status::Ok, format!("present: {meaning}")),
            Feature::Absent if required => (Status::Fail, format!("absent: {meaning}")),
            Feature::Absent => (Status::Info, format!("absent: {meaning}")),
            Feature::Unknown(why) => (Status::Info, format!("could not probe ({why}): {meaning}")),
        };
        r.push(name, status, detail);
    }

    if crate::privileges::effective_caps(proc_root).is_some() {
        let missing = missing_capabilities(proc_root);
        if missing.is_empty() {
            r.push(
                "capabilities",
                Status::Ok,
                "CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN (or CAP_SYS_ADMIN) are effective",
            );
        } else {
            r.push(
                "capabilities",
                Status::Fail,
                format!(
                    "missing {}: run as root or grant them (see docs/install.md)",
                    missing.join(", ")
                ),
            );
        }
    } else {
        r.push(
            "capabilities",
            Status::Info,
            format!(
                "could not read CapEff from {}",
                proc_root.join("self/status").display()
            ),
        );
    }

    let btf = sys_root.join(crate::scope::VMLINUX_BTF);
    let readable = features.probe_read_kernel != Feature::Absent;
    let scope = match crate::scope::sa_layout(&btf, readable) {
        Ok(l) => {
            r.push(
                "scope",
                Status::Ok,
                format!(
                    "sa: each segment's IPsec state is read through {} (sec_path.len is {} byte{})",
                    btf.display(),
                    l.sp_len_size,
                    if l.sp_len_size == 1 { "" } else { "s" }
                ),
            );
            crate::scope::Scope::Sa(l)
        }
        Err(e) => {
            r.push(
                "scope",
                Status::Info,
                format!("address (fallback): {e}; {}", crate::scope::FALLBACK_COST),
            );
            crate::scope::Scope::Address
        }
    };

    let mount = cgroup::cgroup2_mount_in(proc_root);
    match &mount {
        Some(m) => r.push("cgroup2", Status::Ok, format!("mounted at {}", m.display())),
        None => r.push(
            "cgroup2",
            Status::Fail,
            format!(
                "no cgroup2 mount in {}; mount one (mount -t cgroup2 none /sys/fs/cgroup/unified)",
                proc_root.join("mounts").display()
            ),
        ),
    }

    // Loaded as the daemon loads it: with the capture ring and pairing on.
    let mut verifier = match VerifierLoader::new(&scope, features.variant())
        .capture(true)
        .load()
    {
        Ok(mut v) => {
            // How close the program is to the verifier's limit on this kernel.
            let cost = v
                .program_mut()
                .ok()
                .and_then(|p| p.info().ok())
                .and_then(|i| i.verified_instruction_count())
                .map_or_else(String::new, |n| {
                    format!("; {n} of 1000000 instructions processed")
                });
            r.push(
                "bpf program load",
                Status::Ok,
                format!(
                    "the kernel verifier accepted {} (cgroup_skb, {} scope, {} variant{cost})",
                    v.variant().program(),
                    scope.as_str(),
                    v.variant().as_str()
                ),
            );
            Some(v)
        }
        Err(e) => {
            r.push("bpf program load", Status::Fail, first_line(&e));
            None
        }
    };

    if let (Some(v), Some(target)) = (
        verifier.as_mut(),
        cgroup_dir.map(Path::to_path_buf).or_else(|| mount.clone()),
    ) {
        let temp = cgroup_dir
            .is_none()
            .then(|| target.join(format!("natt-monitor-check-{}", std::process::id())));
        let dir = temp.clone().unwrap_or(target);
        let made = temp.as_ref().map(fs::create_dir);
        if let Some(Err(e)) = made {
            r.push(
                "cgroup_skb attach",
                Status::Fail,
                format!("creating {}: {e}", dir.display()),
            );
        } else {
            match v.attach(&dir) {
                Ok(()) => r.push(
                    "cgroup_skb attach",
                    Status::Ok,
                    format!("attached to and detached from {}", dir.display()),
                ),
                Err(e) => r.push("cgroup_skb attach", Status::Fail, first_line(&e)),
            }
            // Drop detaches before the temporary cgroup is removed.
            verifier = None;
            if let Some(t) = &temp {
                let _ = fs::remove_dir(t);
            }
        }
    }
    drop(verifier);

    let esp: Vec<String> = ["esp4", "esp6", "esp4_offload", "esp6_offload"]
        .iter()
        .filter(|m| sys_root.join("module").join(m).exists())
        .map(ToString::to_string)
        .collect();
    r.push(
        "esp modules",
        Status::Info,
        if esp.is_empty() {
            "none loaded (no IPsec ESP traffic to verify yet)".to_owned()
        } else {
            format!("loaded: {}", esp.join(", "))
        },
    );
    if esp.iter().any(|m| m.ends_with("_offload")) {
        r.push(
            "gro",
            Status::Info,
            "an esp offload module is loaded: if the receiving device has GRO on and the IKE daemon set UDP_GRO on its \
             encapsulation socket, decapsulated segments can be merged (seen on 6.12, not on 6.1) and cannot be verified (counted as \
             skipped reason=\"aggregated\"); remedy: ip link set dev <dev> gro_max_size <its MTU>, or ethtool -K <dev> gro off \
             (docs/runbook.md#nattmonitorunverifiabletraffic)",
        );
    }
    match crate::xfrm::dump() {
        Ok(sas) => {
            let peers =
                crate::xfrm::peers_from(&sas, crate::peers::Mode::Observe, crate::xfrm::is_local);
            let names: Vec<String> = peers.iter().map(crate::peers::PeerSpec::label).collect();
            r.push(
                "xfrm discovery",
                Status::Ok,
                format!(
                    "{} SAs; {} NAT-T transport-mode peers{}",
                    sas.len(),
                    peers.len(),
                    if names.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", names.join(", "))
                    }
                ),
            );
            tunnels(&mut r, &sas);
        }
        Err(e) => r.push(
            "xfrm discovery",
            Status::Info,
            format!("{e}; run with --discover none and static peers"),
        ),
    }
    r
}

/// The tunnel devices NAT-T transport SAs carry (`crate::tunnels`): which ones the verifier
/// takes in scope, and why the others are left out. Silent on a host with none.
fn tunnels(r: &mut Report, sas: &[crate::xfrm::Sa]) {
    use crate::tunnels::Coverage;
    match crate::tunnels::survey(sas) {
        Ok(all) => {
            let from_peers: Vec<_> = all
                .iter()
                .filter(|(_, c)| *c != Coverage::NoNatTSa)
                .collect();
            if from_peers.is_empty() {
                return;
            }
            for (t, c) in from_peers {
                let (status, what) = if *c == Coverage::Verified && t.gro_on {
                    (
                        Status::Info,
                        format!(
                            "inner segments verified, but GRO is on for it: merged inner segments cannot be verified; turn it off: ethtool -K {} gro off",
                            t.name
                        ),
                    )
                } else if *c == Coverage::Verified {
                    (
                        Status::Ok,
                        "inner segments verified (under SA scope with the bpf_loop variant, as reported above)".to_owned(),
                    )
                } else {
                    (Status::Info, format!("not verified: {}", c.reason()))
                };
                r.push(
                    "tunnel",
                    status,
                    format!(
                        "{} ({}, remote {}): {what}",
                        t.name,
                        t.kind.name(),
                        t.remote
                    ),
                );
            }
        }
        Err(e) => r.push(
            "tunnel",
            Status::Info,
            format!("tunnel devices not read: {e}"),
        ),
    }
}

fn first_line(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        let t = inner.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = inner.source();
    }
    s.lines().next().unwrap_or_default().to_owned()
}
