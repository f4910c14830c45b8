//! Suite 2: TCP throughput over veth with iperf3, with the kernel's BPF run-time statistics.

use std::{
    fs,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use aya::{
    EbpfLoader,
    programs::{CgroupSkb, ProgramInfo},
};
use natt_monitor::{
    ebpf::{TESTBED_OBJ, Verifier},
    peers::{Mode, PeerSpec, PeerTable, parse_cidr},
    scope::Scope,
};
use natt_monitor_tests::net::{ADDR_A, ADDR_B, Cgroup, Lab, Netns, Proc};

use crate::stats::{Stat, sh_out, stat};

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Setting {
    Off,
    /// A `cgroup_skb` program that accepts everything: the floor any such hook costs.
    Noop,
    Observe,
    Enforce,
}

impl Setting {
    pub(crate) const fn name(self) -> &'static str {
        match self {
            Self::Off => "no program",
            Self::Noop => "no-op cgroup_skb program",
            Self::Observe => "observe",
            Self::Enforce => "enforce",
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
    /// BPF CPU seconds per verified GB, in observe mode.
    pub(crate) cpu_per_gb: Stat,
    /// Segments received vs verified over all observe runs.
    pub(crate) segments: (u64, u64),
}

pub(crate) fn throughput(mtu: u32, rounds: usize, secs: u32) -> Result<Throughput> {
    let lab = Lab::new(mtu);
    let cg = Cgroup::new();
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).context("BPF_ENABLE_STATS")?;
    let settings = [
        Setting::Off,
        Setting::Noop,
        Setting::Observe,
        Setting::Enforce,
    ];
    let mut gbps: Vec<Vec<f64>> = vec![Vec::new(); settings.len()];
    let mut cpu = Vec::new();
    let (mut received, mut verified) = (0u64, 0u64);
    for _ in 0..rounds {
        for (i, &setting) in settings.iter().enumerate() {
            let mut noop = None;
            if setting == Setting::Noop {
                let mut tb = EbpfLoader::new().load(TESTBED_OBJ)?;
                let p: &mut CgroupSkb = tb
                    .program_mut("natt_noop_skb")
                    .context("natt_noop_skb")?
                    .try_into()?;
                p.load()?;
                let cgroup = fs::File::open(&cg.path)?;
                p.attach(
                    &cgroup,
                    aya::programs::CgroupSkbAttachType::Ingress,
                    aya::programs::CgroupAttachMode::Single,
                )?;
                noop = Some(tb);
            }
            let verifier = if matches!(setting, Setting::Off | Setting::Noop) {
                None
            } else {
                let mut v = Verifier::load(&Scope::Address)?;
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
                Some(v)
            };
            let server = iperf_server(&lab, &cg.path)?;
            let segs0 = tcp_in_segs(&lab.b)?;
            let bps = iperf_client(&lab, secs)?;
            let segs = tcp_in_segs(&lab.b)? - segs0;
            let _ = server.finish(Duration::from_secs(10));
            drop(noop);
            gbps[i].push(bps / 1e9);
            if let Some(mut v) = verifier {
                let s = v.stats().peer_stats(0)?;
                let info: ProgramInfo = v.program_mut()?.info()?;
                if setting == Setting::Observe {
                    let bytes = s.verified_bytes[0] as f64;
                    cpu.push(info.run_time().as_secs_f64() / (bytes / 1e9));
                    received += segs;
                    verified += s.verified_packets[0];
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
        cpu_per_gb: stat(&cpu),
        segments: (received, verified),
    })
}

// ---------------------------------------------------------------------------------------------
// 3. tshark on the receiving interface
