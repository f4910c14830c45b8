//! Suite 3: the capture alternative, tshark validating TCP checksums on the receiving interface.

use std::{
    fs,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use natt_monitor_tests::net::{Cgroup, Lab};

use crate::{
    stats::{Stat, stat},
    throughput::{iperf_client, iperf_server, tcp_in_segs},
};

pub(crate) struct Capture {
    pub(crate) cpu_per_gb: Stat,
    pub(crate) missed: Stat,
    pub(crate) gbps: Stat,
}

pub(crate) fn proc_cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = after
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    // Fields 14-17 (utime stime cutime cstime) are at 11..15 after the ")".
    let ticks: u64 = f.get(10..14).map_or(0, |s| s.iter().sum());
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    ticks as f64 / hz as f64
}

/// Reaps `pid` and returns the CPU seconds it and the children it reaped used.
pub(crate) fn wait_cpu_seconds(pid: i32) -> Result<f64> {
    let mut status = 0;
    // SAFETY: rusage is plain data; wait4 fills it for our own child.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers; `pid` is our child and has not been reaped.
    let r = unsafe { libc::wait4(pid, &raw mut status, 0, &raw mut ru) };
    if r != pid {
        bail!("wait4({pid}): {}", std::io::Error::last_os_error());
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ok(tv(ru.ru_utime) + tv(ru.ru_stime))
}

pub(crate) fn capture(rounds: usize, secs: u32) -> Result<Capture> {
    let lab = Lab::new(1500);
    let cg = Cgroup::new();
    let (mut cpu, mut missed, mut gbps) = (Vec::new(), Vec::new(), Vec::new());
    let tmp = std::env::temp_dir().join(format!("natt-bench-tshark-{}", std::process::id()));
    fs::create_dir_all(&tmp)?;
    for _ in 0..rounds {
        let mut tshark = Command::new("ip")
            .args([
                "netns",
                "exec",
                &lab.b.name,
                "tshark",
                "-i",
                lab.dev_b,
                "-n",
                "-q",
                "-o",
                "tcp.check_checksum:TRUE",
                // Checksums need neither stream reassembly nor sequence analysis; with them on,
                // a capture full of drops made tshark run for over ten minutes.
                "-o",
                "tcp.desegment_tcp_streams:FALSE",
                "-o",
                "tcp.analyze_sequence_numbers:FALSE",
            ])
            .args([
                "-f",
                "tcp and src host 192.0.2.1",
                "-z",
                "io,stat,0,tcp,tcp.checksum.status==1",
            ])
            .env("TMPDIR", &tmp)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting tshark (apt-get install tshark)")?;
        std::thread::sleep(Duration::from_secs(2));
        let server = iperf_server(&lab, &cg.path)?;
        let segs0 = tcp_in_segs(&lab.b)?;
        let bps = iperf_client(&lab, secs)?;
        let segs = tcp_in_segs(&lab.b)? - segs0;
        let _ = server.finish(Duration::from_secs(10));
        // Stop the capture; tshark then dissects what dumpcap buffered, prints its statistics
        // and exits. Its CPU time comes from wait4: its own plus dumpcap's, which it reaped.
        std::thread::sleep(Duration::from_secs(1));
        let pid = i32::try_from(tshark.id())?;
        // SAFETY: kill has no memory preconditions.
        unsafe { libc::kill(pid, libc::SIGINT) };
        // Bounded: a tshark still dissecting after 300 s is killed and the run fails.
        let finished = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watchdog = {
            let finished = std::sync::Arc::clone(&finished);
            std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(300);
                while !finished.load(std::sync::atomic::Ordering::Relaxed) {
                    if Instant::now() > deadline {
                        // SAFETY: kill has no memory preconditions.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                        return true;
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
                false
            })
        };
        let mut text = String::new();
        std::io::Read::read_to_string(
            &mut tshark.stdout.take().context("tshark stdout")?,
            &mut text,
        )?;
        let seconds = wait_cpu_seconds(pid)?;
        finished.store(true, std::sync::atomic::Ordering::Relaxed);
        if watchdog.join().unwrap_or(true) {
            bail!("tshark did not finish dissecting within 300 s of the end of the capture");
        }
        // The totals row: "| 0.000 <> Dur|  frames | bytes | frames | bytes |".
        let row = text
            .lines()
            .find(|l| l.contains("<>"))
            .with_context(|| format!("no tshark totals in {text}"))?;
        let cols: Vec<u64> = row
            .split('|')
            .skip(2)
            .filter_map(|c| c.trim().parse().ok())
            .collect();
        let (good_frames, good_bytes) = (cols[2], cols[3]);
        let verified_gb = good_bytes as f64 / 1e9;
        cpu.push(seconds / verified_gb.max(1e-9));
        missed.push(1.0 - good_frames as f64 / segs as f64);
        gbps.push(bps / 1e9);
    }
    let _ = fs::remove_dir_all(&tmp);
    Ok(Capture {
        cpu_per_gb: stat(&cpu),
        missed: stat(&missed),
        gbps: stat(&gbps),
    })
}

// ---------------------------------------------------------------------------------------------
// 4 and 5. The daemon under a corruption storm; footprint
