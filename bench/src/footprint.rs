//! Suite 5: the daemon's footprint.

use std::{
    fs,
    io::Write as _,
    net::TcpStream,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use natt_monitor_tests::{http_get, monitor_bin, net::Cgroup};

use crate::{
    daemon::{Daemon, start_daemon, vm_kib},
    stats::{Stat, stat},
};

pub(crate) struct Footprint {
    pub(crate) binary_kib: u64,
    pub(crate) startup_ms: Stat,
    pub(crate) rss_idle_kib: Stat,
    pub(crate) hostile: Hostile,
}

/// The endpoint against hostile clients: `SLOW_CLIENTS` connections that send half a request
/// line and stall, more than the endpoint's 256 connection slots, and `OVERSIZED_CLIENTS` that
/// each send 1 MiB of header, while a scraper keeps scraping.
pub(crate) struct Hostile {
    /// Scrapes answered 200, of `SCRAPES`.
    pub(crate) answered: usize,
    /// Scrape latency (ms).
    pub(crate) scrape_ms: Stat,
    /// RSS before the clients came, and at its peak (`VmHWM`) after they went (KiB).
    pub(crate) rss_before_kib: u64,
    pub(crate) rss_peak_kib: u64,
}

pub(crate) const SLOW_CLIENTS: usize = 400;
pub(crate) const OVERSIZED_CLIENTS: usize = 20;
pub(crate) const SCRAPES: usize = 10;

fn hostile(d: &Daemon) -> Hostile {
    let addr = d.addr();
    let rss_before_kib = vm_kib(d.pid_u32(), "VmRSS:");
    // Held open until the end: the endpoint must cut them off itself.
    let slow: Vec<TcpStream> = (0..SLOW_CLIENTS)
        .filter_map(|_| {
            let mut s = TcpStream::connect(&addr).ok()?;
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                .ok()?;
            Some(s)
        })
        .collect();
    let oversized: Vec<_> = (0..OVERSIZED_CLIENTS)
        .map(|_| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                if let Ok(mut s) = TcpStream::connect(&addr) {
                    let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nX-Big: ");
                    let chunk = vec![b'a'; 64 * 1024];
                    for _ in 0..16 {
                        if s.write_all(&chunk).is_err() {
                            break;
                        }
                    }
                }
            })
        })
        .collect();
    let mut ms = Vec::new();
    let mut answered = 0;
    for _ in 0..SCRAPES {
        let t0 = Instant::now();
        if let Ok((200, _)) = http_get(&format!("http://{addr}/metrics")) {
            answered += 1;
        }
        ms.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    for t in oversized {
        let _ = t.join();
    }
    drop(slow);
    Hostile {
        answered,
        scrape_ms: stat(&ms),
        rss_before_kib,
        rss_peak_kib: vm_kib(d.pid_u32(), "VmHWM:"),
    }
}

pub(crate) fn footprint(rounds: usize) -> Result<Footprint> {
    let bin = monitor_bin();
    let binary_kib = fs::metadata(&bin)?.len() / 1024;
    let (mut start, mut rss) = (Vec::new(), Vec::new());
    let mut last = None;
    for _ in 0..rounds {
        let cg = Cgroup::new();
        let (d, t) = start_daemon(&cg.path)?;
        start.push(t.as_secs_f64() * 1e3);
        std::thread::sleep(Duration::from_secs(2));
        rss.push(vm_kib(d.pid_u32(), "VmRSS:") as f64);
        last = Some((d, cg));
    }
    let (d, _cg) = last.context("no round ran")?;
    Ok(Footprint {
        binary_kib,
        startup_ms: stat(&start),
        rss_idle_kib: stat(&rss),
        hostile: hostile(&d),
    })
}

// ---------------------------------------------------------------------------------------------
