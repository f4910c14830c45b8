//! Suite 2: TCP throughput over veth with iperf3, with the kernel's BPF run-time statistics.

use std::{
    fs,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    programs::{CgroupSkb, ProgramInfo},
};
use natt_monitor::{
    ebpf::{TESTBED_OBJ, Verifier},
    peers::{Mode, PeerSpec, PeerTable, parse_cidr},
    scope::Scope,
};
use natt_monitor_tests::{
    loader,
    net::{ADDR_A, ADDR_B, Cgroup, Lab, Netns, Proc},
};

use crate::stats::{Stat, sh_out, stat};

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Setting {
    Off,
    /// A `cgroup_skb` program that accepts everything: the floor any such hook costs.
    Noop,
    /// One `bpf_probe_read_kernel` of the skb: the floor under SA scope's dismissal.
    ProbeRead,
    /// The segment copied out of the skb and not summed: the floor under the per-byte cost.
    CopyOnly,
    /// The segment copied out and summed with the verifier's block sum, nothing else: the floor
    /// of a verifier without fixed work.
    CopySum,
    /// Every segment verified (address scope, the sender configured as a peer).
    Observe,
    Enforce,
    /// The monitor as installed by default (SA scope), with traffic outside IPsec: every
    /// segment is dismissed after one read of its `sec_path` flag.
    OutOfScope,
    /// `Observe` with the verifier object given by `--baseline-object` (an earlier build).
    Baseline,
}

impl Setting {
    pub(crate) const fn name(self) -> &'static str {
        match self {
            Self::Off => "no program",
            Self::Noop => "no-op cgroup_skb program",
            Self::ProbeRead => "floor: one kernel read, nothing else",
            Self::CopyOnly => "floor: segment copied out, not summed",
            Self::CopySum => "floor: segment copied out and summed, nothing else",
            Self::Observe => "observe, every segment verified",
            Self::Enforce => "enforce, every segment verified",
            Self::OutOfScope => "SA scope, traffic outside IPsec",
            Self::Baseline => "baseline object, observe, every segment verified",
        }
    }

    /// The testbed program that is this setting, if it is one.
    const fn testbed(self) -> Option<&'static str> {
        match self {
            Self::Noop => Some("natt_noop_skb"),
            Self::ProbeRead => Some("natt_probe_read_skb"),
            Self::CopyOnly => Some("natt_copy_skb"),
            Self::CopySum => Some("natt_copy_sum_skb"),
            _ => None,
        }
    }
}

/// Starts `iperf3 -s -1` in netns B, joined to `cgroup` before it listens.
pub(crate) fn iperf_server(lab: &Lab, cgroup: &Path) -> Result<Proc> {
    let script = format!(
        "echo $$ > {}/cgroup.procs && exec ip netns exec {} iperf3 -s -1 -B {ADDR_B} -p 5201",
        cgroup.display(),
        lab.b.name
    );
    let p = Proc::spawn("iperf3 server", Command::new("sh").args(["-c", &script]));
    // iperf3 prints nothing useful before a client connects; wait until it listens.
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let ss = sh_out(Command::new("ip").args([
            "netns",
            "exec",
            &lab.b.name,
            "ss",
            "-ltn",
            "sport = :5201",
        ]))?;
        if ss.lines().count() > 1 {
            return Ok(p);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("iperf3 server did not listen within 10 s")
}

/// Runs an iperf3 client for `secs`; returns received bits per second.
pub(crate) fn iperf_client(lab: &Lab, secs: u32) -> Result<f64> {
    let out = sh_out(Command::new("ip").args([
        "netns",
        "exec",
        &lab.a.name,
        "iperf3",
        "-c",
        ADDR_B,
        "-p",
        "5201",
        "-J",
        "-t",
        &secs.to_string(),
    ]))?;
    let v: serde_json::Value = serde_json::from_str(&out).context("iperf3 JSON")?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 bits_per_second")
}

pub(crate) fn tcp_in_segs(ns: &Netns) -> Result<u64> {
    let snmp =
        sh_out(Command::new("ip").args(["netns", "exec", &ns.name, "cat", "/proc/net/snmp"]))?;
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (
        tcp.next().context("Tcp header")?,
        tcp.next().context("Tcp values")?,
    );
    let i = names
        .split_whitespace()
        .position(|n| n == "InSegs")
        .context("InSegs")?;
    values
        .split_whitespace()
        .nth(i)
        .context("InSegs value")?
        .parse()
        .context("InSegs number")
}

pub(crate) struct Throughput {
    pub(crate) mtu: u32,
    pub(crate) gbps: Vec<(Setting, Stat)>,
    /// Live BPF run time per packet (kernel run-time statistics), per program setting.
    pub(crate) ns_per_packet: Vec<(Setting, Stat)>,
    /// Mean L4 bytes of the verified segments.
    pub(crate) segment_bytes: f64,
    /// BPF CPU seconds per verified GB, in observe mode.
    pub(crate) cpu_per_gb: Stat,
    /// The same for the `--baseline-object` verifier, when one is given.
    pub(crate) cpu_per_gb_baseline: Option<Stat>,
    /// Segments received vs verified over all observe runs.
    pub(crate) segments: (u64, u64),
}

/// Attaches what `setting` runs to `cg`: a testbed program, or the verifier (address scope
/// with the sender as its peer, from this build or the baseline object, or SA scope for traffic
/// outside IPsec).
fn attach(
    setting: Setting,
    cg: &Cgroup,
    sa_scope: Scope,
    baseline: Option<&[u8]>,
) -> Result<(Option<Ebpf>, Option<Verifier>)> {
    if let Some(name) = setting.testbed() {
        let mut tb = EbpfLoader::new().load(TESTBED_OBJ)?;
        let p: &mut CgroupSkb = tb.program_mut(name).context(name)?.try_into()?;
        p.load()?;
        let cgroup = fs::File::open(&cg.path)?;
        p.attach(
            &cgroup,
            aya::programs::CgroupSkbAttachType::Ingress,
            aya::programs::CgroupAttachMode::Single,
        )?;
        return Ok((Some(tb), None));
    }
    if setting == Setting::Off {
        return Ok((None, None));
    }
    let scope = if setting == Setting::OutOfScope {
        sa_scope
    } else {
        Scope::Address
    };
    let mut v = match (setting, baseline) {
        (Setting::Baseline, Some(obj)) => loader(&scope)
            .object(obj)
            .load()
            .context("loading the --baseline-object verifier")?,
        _ => loader(&scope).load()?,
    };
    let mode = if setting == Setting::Enforce {
        Mode::Enforce
    } else {
        Mode::Observe
    };
    v.peer_maps()?.set_peers(
        &PeerTable::default(),
        &PeerTable::new(vec![PeerSpec::new(parse_cidr(ADDR_A)?, mode)])?,
    )?;
    v.attach(&cg.path)?;
    Ok((None, Some(v)))
}

/// The program's mean run time per packet over its life, from the kernel's statistics.
fn per_packet_ns(info: &ProgramInfo) -> f64 {
    info.run_time().as_nanos() as f64 / info.run_count().max(1) as f64
}

pub(crate) fn throughput(
    mtu: u32,
    rounds: usize,
    secs: u32,
    baseline: Option<&[u8]>,
) -> Result<Throughput> {
    let lab = Lab::new(mtu);
    let cg = Cgroup::new();
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).context("BPF_ENABLE_STATS")?;
    let mut settings = vec![
        Setting::Off,
        Setting::Noop,
        Setting::ProbeRead,
        Setting::CopyOnly,
        Setting::CopySum,
        Setting::Observe,
        Setting::Enforce,
        Setting::OutOfScope,
    ];
    if baseline.is_some() {
        settings.push(Setting::Baseline);
    }
    let mut gbps: Vec<Vec<f64>> = vec![Vec::new(); settings.len()];
    let mut ns: Vec<Vec<f64>> = vec![Vec::new(); settings.len()];
    let mut cpu = Vec::new();
    let mut cpu_base = Vec::new();
    let (mut received, mut verified) = (0u64, 0u64);
    let mut verified_bytes = 0u64;
    let sa_scope = Scope::Sa(natt_monitor::scope::layout_from(
        &Path::new("/sys").join(natt_monitor::scope::VMLINUX_BTF),
    )?);
    for _ in 0..rounds {
        for (i, &setting) in settings.iter().enumerate() {
            let (mut testbed, verifier) = attach(setting, &cg, sa_scope, baseline)?;
            let server = iperf_server(&lab, &cg.path)?;
            let segs0 = tcp_in_segs(&lab.b)?;
            let bps = iperf_client(&lab, secs)?;
            let segs = tcp_in_segs(&lab.b)? - segs0;
            let _ = server.finish(Duration::from_secs(10));
            if let (Some(tb), Some(name)) = (testbed.as_mut(), setting.testbed()) {
                let p: &mut CgroupSkb = tb.program_mut(name).context(name)?.try_into()?;
                ns[i].push(per_packet_ns(&p.info()?));
            }
            drop(testbed);
            gbps[i].push(bps / 1e9);
            if let Some(mut v) = verifier {
                let s = v.stats().peer_stats(0)?;
                let info: ProgramInfo = v.program_mut()?.info()?;
                ns[i].push(per_packet_ns(&info));
                let per_gb = info.run_time().as_secs_f64() / (s.verified_bytes[0] as f64 / 1e9);
                if setting == Setting::Baseline {
                    cpu_base.push(per_gb);
                }
                if setting == Setting::Observe {
                    cpu.push(per_gb);
                    received += segs;
                    verified += s.verified_packets[0];
                    verified_bytes += s.verified_bytes[0];
                }
                if setting == Setting::OutOfScope && s.verified_packets[0] != 0 {
                    bail!(
                        "SA scope verified {} segments that came through no SA",
                        s.verified_packets[0]
                    );
                }
                if s.mismatches[0] != 0 {
                    bail!(
                        "{} mismatches on clean traffic at MTU {mtu}",
                        s.mismatches[0]
                    );
                }
            }
        }
    }
    Ok(Throughput {
        mtu,
        gbps: settings
            .iter()
            .zip(&gbps)
            .map(|(s, v)| (*s, stat(v)))
            .collect(),
        ns_per_packet: settings
            .iter()
            .zip(&ns)
            .filter(|(_, v)| !v.is_empty())
            .map(|(s, v)| (*s, stat(v)))
            .collect(),
        segment_bytes: verified_bytes as f64 / verified.max(1) as f64,
        cpu_per_gb: stat(&cpu),
        cpu_per_gb_baseline: (!cpu_base.is_empty()).then(|| stat(&cpu_base)),
        segments: (received, verified),
    })
}

// ---------------------------------------------------------------------------------------------
// 3. tshark on the receiving interface
