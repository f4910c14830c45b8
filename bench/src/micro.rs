//! Suite 1: per-segment cost in `BPF_PROG_TEST_RUN`: the verifier against the kernel's own checksum and no-op programs.

use anyhow::{Context as _, Result, bail};
use aya::{
    EbpfLoader,
    programs::{CgroupSkb, SchedClassifier, TestRunOptions},
};
use monitor_ebpf::Proto;
use natt_monitor::{
    ebpf::{TESTBED_OBJ, Variant, Verifier},
    peers::{Mode, PeerSpec, PeerTable, parse_cidr},
    scope::Scope,
};
use natt_monitor_tests::{
    loader,
    packets::{L4, payload, v4},
};

use crate::stats::{Stat, stat};

pub(crate) struct Micro {
    /// IP packet sizes and, per size: verifier, kernel csum, noop skb, noop tc (ns/run).
    pub(crate) rows: Vec<(usize, Stat, Stat, Stat, Stat)>,
    pub(crate) verifier_per_byte: f64,
    pub(crate) kernel_per_byte: f64,
    /// Marginal cost per byte between the 1500 and 3600-byte rows: the per-byte work alone,
    /// without either program's fixed per-segment cost.
    pub(crate) verifier_marginal: f64,
    pub(crate) kernel_marginal: f64,
    /// With `--baseline-object`: per size, the baseline verifier's ns/run, measured alternately
    /// with the others.
    pub(crate) baseline: Vec<(usize, Stat)>,
    /// Per size, an SCTP packet of that IP size through the same verifier (which tail-calls
    /// `natt_sctp` for its CRC32c), measured alternately with the others; `None` on a kernel
    /// without `bpf_loop`, which cannot load `natt_sctp`.
    pub(crate) sctp: Vec<(usize, Stat)>,
    /// SCTP's marginal cost per byte, as `verifier_marginal`.
    pub(crate) sctp_marginal: Option<f64>,
    /// Forensics, a verified 1500-byte TCP segment: the verifier with the capture ring and
    /// pairing off, on with nothing dropped (what every segment pays), and on within the
    /// pairing window after a drop (the lookup in `natt_pair`, a miss); ns/run, alternately.
    pub(crate) pairing: [Stat; 3],
}

/// The verifier with the capture ring and pairing `on` (as the daemon loads it), and within
/// the pairing window when `window` (as for 60 s after a drop), 192.0.2.10 its peer.
fn pairing_verifier(on: bool, window: bool) -> Result<Verifier> {
    let mut v = loader(&Scope::Address)
        .capture(on)
        .load()
        .context("loading the verifier")?;
    let peer = PeerSpec::new(parse_cidr("192.0.2.10")?, Mode::Observe);
    v.peer_maps()?
        .set_peers(&PeerTable::default(), &PeerTable::new(vec![peer])?)?;
    if window {
        let map = v
            .ebpf_mut()
            .map_mut("PAIR_DEADLINE")
            .context("PAIR_DEADLINE")?;
        aya::maps::Array::<_, u64>::try_from(map)?.set(0, &u64::MAX, 0)?;
    }
    Ok(v)
}

/// `Micro::pairing`, measured alternately over `rounds`.
fn pairing(rounds: usize, repeat: u32) -> Result<[Stat; 3]> {
    let mut vs = [
        pairing_verifier(false, false)?,
        pairing_verifier(true, false)?,
        pairing_verifier(true, true)?,
    ];
    let frame = v4(
        "192.0.2.10".parse()?,
        "192.0.2.20".parse()?,
        L4::Tcp,
        &payload(1500 - 40),
    );
    let mut samples: [Vec<f64>; 3] = Default::default();
    for round in 0..rounds {
        // Each round starts with the next of the three: the first run of a round measured a few
        // ns apart from the others whatever the program (seen here with three identical ones).
        for k in 0..3 {
            let i = (round + k) % 3;
            samples[i].push(run_ns(vs[i].program_mut()?, &frame, repeat)?);
        }
    }
    let expected = u64::from(repeat) * rounds as u64;
    for (v, what) in vs
        .iter()
        .zip(["capture off", "pairing on", "pairing window"])
    {
        check_verified(v, Proto::Tcp, expected, what)?;
    }
    Ok([stat(&samples[0]), stat(&samples[1]), stat(&samples[2])])
}

/// Mean ns of one run of `prog` on `frame`, over `repeat` runs (the kernel reports the mean).
pub(crate) fn run_ns<P>(prog: &P, frame: &[u8], repeat: u32) -> Result<f64>
where
    for<'a> P: aya::programs::TestRun<Opts<'a> = TestRunOptions<'a>, Result = aya::programs::TestRunResult>,
{
    let r = prog.test_run(TestRunOptions {
        data_in: Some(frame),
        repeat,
        ..TestRunOptions::default()
    })?;
    Ok(r.duration.as_secs_f64() * 1e9)
}

/// The verifier with 192.0.2.10 as its observed peer, from this build or `object`.
fn peered_verifier(object: Option<&[u8]>) -> Result<Verifier> {
    let mut v = match object {
        Some(obj) => loader(&Scope::Address)
            .object(obj)
            .load()
            .context("loading the --baseline-object verifier")?,
        None => loader(&Scope::Address)
            .load()
            .context("loading the verifier")?,
    };
    let peer = PeerSpec::new(parse_cidr("192.0.2.10")?, Mode::Observe);
    v.peer_maps()?
        .set_peers(&PeerTable::default(), &PeerTable::new(vec![peer])?)?;
    Ok(v)
}

/// Every run of `v` must have verified (not skipped, not mismatched) its `proto` segment.
fn check_verified(v: &Verifier, proto: Proto, expected: u64, what: &str) -> Result<()> {
    let s = v.stats().peer_stats(0)?;
    let p = proto as usize;
    if s.verified_packets[p] != expected || s.mismatches[p] != 0 {
        bail!(
            "{what} verified {} of {expected} {} packets ({} mismatches): benchmark input is wrong",
            s.verified_packets[p],
            proto.as_str(),
            s.mismatches[p]
        );
    }
    Ok(())
}

pub(crate) fn micro(rounds: usize, repeat: u32, baseline: Option<&[u8]>) -> Result<Micro> {
    let mut v = peered_verifier(None)?;
    let mut base = baseline.map(|obj| peered_verifier(Some(obj))).transpose()?;
    let mut tb = EbpfLoader::new()
        .load(TESTBED_OBJ)
        .context("loading the testbed object")?;
    for name in ["natt_kernel_csum", "natt_noop_tc"] {
        let p: &mut SchedClassifier = tb.program_mut(name).context(name)?.try_into()?;
        p.load()?;
    }
    let p: &mut CgroupSkb = tb
        .program_mut("natt_noop_skb")
        .context("natt_noop_skb")?
        .try_into()?;
    p.load()?;

    let sizes = [64usize, 512, 1500, 3600];
    let sctp_on = v.variant() == Variant::BpfLoop;
    let mut rows = Vec::new();
    let mut base_rows = Vec::new();
    let mut sctp_rows = Vec::new();
    for &size in &sizes {
        let frame = v4(
            "192.0.2.10".parse()?,
            "192.0.2.20".parse()?,
            L4::Tcp,
            &payload(size - 40),
        );
        // The same IP size: 12 bytes of common header and 16 of DATA chunk header.
        let sctp = v4(
            "192.0.2.10".parse()?,
            "192.0.2.20".parse()?,
            L4::Sctp,
            &payload(size - 48),
        );
        let mut samples: [Vec<f64>; 6] = Default::default();
        for _ in 0..rounds {
            samples[0].push(run_ns(v.program_mut()?, &frame, repeat)?);
            if sctp_on {
                samples[5].push(run_ns(v.program_mut()?, &sctp, repeat)?);
            }
            if let Some(b) = base.as_mut() {
                samples[4].push(run_ns(b.program_mut()?, &frame, repeat)?);
            }
            for (i, name) in [(1, "natt_kernel_csum"), (3, "natt_noop_tc")] {
                let p: &SchedClassifier = tb.program(name).context(name)?.try_into()?;
                samples[i].push(run_ns(p, &frame, repeat)?);
            }
            let p: &CgroupSkb = tb.program("natt_noop_skb").context("noop")?.try_into()?;
            samples[2].push(run_ns(p, &frame, repeat)?);
        }
        rows.push((
            size,
            stat(&samples[0]),
            stat(&samples[1]),
            stat(&samples[2]),
            stat(&samples[3]),
        ));
        if base.is_some() {
            base_rows.push((size, stat(&samples[4])));
        }
        if sctp_on {
            sctp_rows.push((size, stat(&samples[5])));
        }
    }
    let expected = u64::from(repeat) * (rounds as u64) * sizes.len() as u64;
    check_verified(&v, Proto::Tcp, expected, "the verifier")?;
    if sctp_on {
        check_verified(&v, Proto::Sctp, expected, "the verifier")?;
    }
    if let Some(b) = &base {
        check_verified(b, Proto::Tcp, expected, "the baseline verifier")?;
    }
    // Per-byte cost above the fixed hook cost, from the largest size (L4 bytes = size - 20).
    let (size, ver, ker, nskb, ntc) = rows[rows.len() - 1];
    let l4 = (size - 20) as f64;
    let (small, ver_s, ker_s, _, _) = rows[rows.len() - 2];
    let span = (size - small) as f64;
    let sctp_marginal = (sctp_rows.len() == sizes.len()).then(|| {
        let (big, small) = (&sctp_rows[sizes.len() - 1].1, &sctp_rows[sizes.len() - 2].1);
        (big.median - small.median) / span
    });
    let pairing = pairing(rounds, repeat)?;
    Ok(Micro {
        pairing,
        sctp: sctp_rows,
        sctp_marginal,
        verifier_per_byte: (ver.median - nskb.median) / l4,
        kernel_per_byte: (ker.median - ntc.median) / l4,
        verifier_marginal: (ver.median - ver_s.median) / span,
        kernel_marginal: (ker.median - ker_s.median) / span,
        rows,
        baseline: base_rows,
    })
}

// ---------------------------------------------------------------------------------------------
// 2. Throughput with iperf3
