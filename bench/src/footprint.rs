//! Suite 5: the daemon's footprint.

use std::{fs, time::Duration};

use anyhow::Result;
use natt_monitor_tests::{monitor_bin, net::Cgroup};

use crate::{
    daemon::{start_daemon, vm_kib},
    stats::{Stat, stat},
};

pub(crate) struct Footprint {
    pub(crate) binary_kib: u64,
    pub(crate) startup_ms: Stat,
    pub(crate) rss_idle_kib: Stat,
}

pub(crate) fn footprint(rounds: usize) -> Result<Footprint> {
    let bin = monitor_bin();
    let binary_kib = fs::metadata(&bin)?.len() / 1024;
    let (mut start, mut rss) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let cg = Cgroup::new();
        let (d, t) = start_daemon(&cg.path)?;
        start.push(t.as_secs_f64() * 1e3);
        std::thread::sleep(Duration::from_secs(2));
        rss.push(vm_kib(d.child.id(), "VmRSS:") as f64);
    }
    Ok(Footprint {
        binary_kib,
        startup_ms: stat(&start),
        rss_idle_kib: stat(&rss),
    })
}

// ---------------------------------------------------------------------------------------------
