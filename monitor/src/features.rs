//! What the running kernel offers the verifier, found by probing it rather than by reading its
//! version: a distribution kernel backports features, and a version check cannot see that.
//!
//! Each probe loads a minimal program or creates a minimal map (aya's feature probes, which
//! follow libbpf's). The daemon refuses to start without what it needs, naming it; `check`
//! prints every probe; the program variant follows from `bpf_loop`.

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{BpfHelper, is_helper_supported, is_map_supported},
};

/// Which of the verifier's two programs runs: chosen by probing the kernel, not by version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// `natt_verify`: one `bpf_loop` callback per chunk (5.17+).
    BpfLoop,
    /// `natt_verify_compat`: a bounded loop (5.8 to 5.16).
    BoundedLoop,
}

impl Variant {
    /// Its program's name in the verifier object (`crate::ebpf::VERIFIER_OBJ`).
    #[must_use]
    pub const fn program(self) -> &'static str {
        match self {
            Self::BpfLoop => "natt_verify",
            Self::BoundedLoop => "natt_verify_compat",
        }
    }

    /// For logs, `check` and `natt_monitor_program_info`.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::BpfLoop => "bpf_loop",
            Self::BoundedLoop => "bounded_loop",
        }
    }
}

/// One probe's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probe {
    /// The kernel has it.
    Present,
    /// The kernel lacks it.
    Absent,
    /// The probe itself failed (no privileges, say): unknown.
    Unknown(String),
}

impl Probe {
    fn of<E: std::fmt::Display>(r: Result<bool, E>) -> Self {
        match r {
            Ok(true) => Self::Present,
            Ok(false) => Self::Absent,
            Err(e) => Self::Unknown(e.to_string()),
        }
    }

    /// True only when the kernel certainly has it.
    #[must_use]
    pub const fn present(&self) -> bool {
        matches!(self, Self::Present)
    }
}

/// The kernel features the verifier depends on or chooses by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Features {
    /// `BPF_MAP_TYPE_RINGBUF` (5.8+): every record the program sends. Required.
    pub ring_buffer: Probe,
    /// `bpf_probe_read_kernel` from `cgroup_skb` (5.5+): SA scope reads the segment's IPsec state
    /// with it. Without it only address scope can run.
    pub probe_read_kernel: Probe,
    /// `bpf_loop` from `cgroup_skb` (5.17+): selects the `bpf_loop` variant; without it the
    /// `bounded_loop` variant runs, with the same results.
    pub bpf_loop: Probe,
}

impl Features {
    /// Probes the running kernel.
    #[must_use]
    pub fn probe() -> Self {
        let helper = |h| Probe::of(is_helper_supported(ProgramType::CgroupSkb, h));
        Self {
            ring_buffer: Probe::of(is_map_supported(MapType::RingBuf)),
            probe_read_kernel: helper(BpfHelper::BPF_FUNC_probe_read_kernel),
            bpf_loop: helper(BpfHelper::BPF_FUNC_loop),
        }
    }

    /// The program variant this kernel runs: `BpfLoop` only where the probe found `bpf_loop`.
    #[must_use]
    pub const fn variant(&self) -> Variant {
        if self.bpf_loop.present() {
            Variant::BpfLoop
        } else {
            Variant::BoundedLoop
        }
    }

    /// Each probe as (name, answer, what it means here), in a fixed order, for `check`.
    #[must_use]
    pub fn describe(&self) -> [(&'static str, &Probe, &'static str); 3] {
        [
            (
                "ring buffer",
                &self.ring_buffer,
                "BPF_MAP_TYPE_RINGBUF carries mismatch events, learning samples and captures (required)",
            ),
            (
                "probe_read_kernel",
                &self.probe_read_kernel,
                "bpf_probe_read_kernel from cgroup_skb lets SA scope read each segment's IPsec state",
            ),
            (
                "bpf_loop",
                &self.bpf_loop,
                "bpf_loop from cgroup_skb selects the bpf_loop variant; without it the bounded_loop variant runs, with the same results",
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_answers_keep_the_reason_when_unknown() {
        assert_eq!(Probe::of::<String>(Ok(true)), Probe::Present);
        assert_eq!(Probe::of::<String>(Ok(false)), Probe::Absent);
        let u = Probe::of::<String>(Err("EPERM".into()));
        assert_eq!(u, Probe::Unknown("EPERM".into()));
        assert!(!u.present());
    }
}
