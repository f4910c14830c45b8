//! Suite 6: a concentrator's scale. The per-segment cost in `BPF_PROG_TEST_RUN` with 1, 100 and
//! 10,000 peers in the maps, each with a learned residual installed (so a segment walks the
//! peer trie and the residual hash at their full size), measured side by side; and what
//! installing that many peers takes.

use std::{fmt::Write as _, net::Ipv4Addr, time::Instant};

use anyhow::{Context as _, Result, bail};
use monitor_ebpf::SaKey;
use natt_monitor::{
    ebpf::{MapSizes, Verifier},
    peers::{Mode, PeerSpec, PeerTable},
    scope::Scope,
};
use natt_monitor_tests::{
    loader,
    packets::{L4, payload, v4},
};

use crate::{
    micro::run_ns,
    stats::{Stat, stat},
};

/// Peer counts measured.
pub(crate) const PEER_COUNTS: [u32; 3] = [1, 100, 10_000];

/// Maps sized as a concentrator would size them (`--max-peers 16384`).
const MAX_PEERS: u32 = 16_384;

/// Our address, the destination of every segment.
const DST: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 20);

pub(crate) struct Scale {
    /// Per peer count: ns per run of a 1500-byte segment, and milliseconds to install the
    /// peers and their residuals.
    pub(crate) rows: Vec<(u32, Stat, f64)>,
}

/// The `i`-th peer's address: 10.0.0.1, 10.0.0.2, ...
fn peer_addr(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x0a00_0001 + i)
}

/// A verifier holding `n` learning peers, each with its residual (0) installed; the segment
/// measured comes from the last one.
fn populated(n: u32) -> Result<(Verifier, f64)> {
    let mut v = loader(&Scope::Address)
        .map_sizes(MapSizes::for_peers(MAX_PEERS))
        .load()
        .context("loading the verifier")?;
    let t0 = Instant::now();
    let specs = (0..n)
        .map(|i| {
            let mut p = PeerSpec::new(
                ipnet::IpNet::from(std::net::IpAddr::V4(peer_addr(i))),
                Mode::Observe,
            );
            p.learn = true;
            p
        })
        .collect();
    let empty = PeerTable::with_limit(MAX_PEERS);
    let table = empty.reconcile(specs)?;
    let maps = v.peer_maps()?;
    maps.set_peers(&empty, &table)?;
    for (id, p) in table.iter() {
        let ipnet::IpNet::V4(net) = p.net else {
            bail!("not IPv4")
        };
        let mut key = SaKey {
            peer_id: id,
            ..SaKey::default()
        };
        key.src[..4].copy_from_slice(&net.addr().octets());
        key.dst[..4].copy_from_slice(&DST.octets());
        maps.set_sa_residual(key, 0, 0)?;
    }
    Ok((v, t0.elapsed().as_secs_f64() * 1e3))
}

pub(crate) fn scale(rounds: usize, repeat: u32) -> Result<Scale> {
    let mut loaded = Vec::new();
    for n in PEER_COUNTS {
        let (v, ms) = populated(n)?;
        let frame = v4(peer_addr(n - 1), DST, L4::Tcp, &payload(1460));
        loaded.push((n, v, frame, ms, Vec::new()));
    }
    // Alternated, so that drift on a noisy machine hits every count alike.
    for _ in 0..rounds {
        for (_, v, frame, _, samples) in &mut loaded {
            samples.push(run_ns(v.program_mut()?, frame, repeat)?);
        }
    }
    let mut rows = Vec::new();
    for (n, v, _, ms, samples) in loaded {
        let s = v.stats().peer_stats(n - 1)?;
        let want = u64::from(repeat) * rounds as u64;
        if s.verified_packets[0] != want || s.mismatches[0] != 0 || s.learning[0] != 0 {
            bail!(
                "with {n} peers the measured peer verified {} of {want} segments ({} mismatches, {} learning): benchmark input is wrong",
                s.verified_packets[0],
                s.mismatches[0],
                s.learning[0]
            );
        }
        rows.push((n, stat(&samples), ms));
    }
    Ok(Scale { rows })
}

/// The scale table, for the report and `--scale-only`.
pub(crate) fn table(s: &Scale) -> String {
    let base = s.rows[0].1.median;
    let mut out = String::from(
        "| peers (each with a learned residual) | ns per 1500-byte segment | against 1 peer | installing the peers and residuals |\n|---|---|---|---|\n",
    );
    for (n, st, ms) in &s.rows {
        let _ = writeln!(
            out,
            "| {n} | {} | {:.2} | {ms:.0} ms |",
            st.fmt(1),
            st.median / base
        );
    }
    out
}
