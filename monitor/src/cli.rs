//! Command-line interface. Parsing only: `main.rs` turns it into a typed `RunConfig`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::peers::Mode;

/// Verifies the TCP/UDP checksums Linux skips after IPsec NAT-T (ESP-in-UDP) transport-mode
/// decapsulation, and in enforce mode drops corrupted segments so TCP retransmits them.
#[derive(Debug, Parser)]
#[command(name = "natt-monitor", version, about, long_about = None, after_help = "\
Examples:
  natt-monitor check
  natt-monitor run --peer 198.51.100.0/24 --peer 2001:db8:7::/48
  natt-monitor run                      # peers from this host's NAT-T SAs (XFRM)
  natt-monitor run --discover none --peer 192.0.2.10 --mode enforce \
      --cgroup /sys/fs/cgroup/unified/zookeeper.slice")]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Attach the verifier and report mismatches until SIGINT/SIGTERM.
    Run(RunArgs),
    /// Probe whether this host can run the verifier; exits non-zero if it cannot.
    Check(CheckArgs),
}

/// Log output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Where peers come from besides --peer and [[peer]].
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Discover {
    /// The kernel's inbound ESP-in-UDP (and ESP-in-TCP) transport-mode SAs, followed live.
    Xfrm,
    /// Static peers only.
    None,
}

/// Which segments are verified.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScopeChoice {
    /// `sa` where the kernel has BTF, else `address` (with a warning).
    #[default]
    Auto,
    /// Exactly the segments a transport-mode SA with UDP/TCP encapsulation decapsulated, read
    /// from each segment's own IPsec state; residuals are learned per SA.
    Sa,
    /// Segments from peer addresses, except IKE ports and partial checksums (kernels without
    /// BTF; plaintext from a peer can still be mistaken for corrupt).
    Address,
}

/// `natt-monitor run`.
#[derive(Clone, Debug, Args)]
pub struct RunArgs {
    /// TOML configuration file (see docs/configuration.md). Flags given on the command line
    /// override its keys; --peer flags are added to its [[peer]] entries. SIGHUP re-reads it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// cgroup v2 directory whose sockets are verified. Default: the cgroup2 mount point (every
    /// socket on the host), found in /proc/mounts.
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<PathBuf>,

    /// Source address or prefix of an IPsec NAT-T peer to verify (repeatable), beside the
    /// discovered ones; with NAT addresses in the configuration file it fixes the residual
    /// exactly. Segments from other sources are counted as skipped (reason `not_in_scope`) and
    /// left alone.
    #[arg(long = "peer", value_name = "CIDR")]
    pub peers: Vec<String>,

    /// Default mode for peers that set none. observe: count and log mismatches. enforce: also
    /// drop them so TCP retransmits. [default: observe]
    #[arg(long, value_enum)]
    pub mode: Option<Mode>,

    /// Peer discovery. xfrm: every source address of this host's inbound transport-mode SAs with
    /// UDP/TCP encapsulation becomes a peer (learning its NAT residual from traffic), following
    /// SA add/delete/expire live. none: only --peer and [[peer]]. [default: xfrm when the
    /// kernel has XFRM netlink; given explicitly, a missing XFRM is an error]
    #[arg(long, value_enum)]
    pub discover: Option<Discover>,

    /// Which segments are verified: sa (each segment's own IPsec state, read through the
    /// kernel's BTF), address (source address, for kernels without BTF), or auto (sa where
    /// possible). [default: auto]
    #[arg(long, value_enum)]
    pub scope: Option<ScopeChoice>,

    /// sysfs root, for /sys/kernel/btf/vmlinux (a container may mount the host's elsewhere).
    /// [default: /sys]
    #[arg(long, value_name = "PATH")]
    pub sys_path: Option<PathBuf>,

    /// Write every mismatching packet (from its IP header, up to 2048 bytes) to this pcapng
    /// file, which Wireshark and tshark open. Rate limited (bursts of 100, then 20 a second) and
    /// bounded by --capture-max-bytes; what is left out is counted in
    /// `natt_monitor_capture_packets_total`. The file is replaced at start.
    #[arg(long, value_name = "FILE")]
    pub capture: Option<PathBuf>,

    /// Size limit of the --capture file, in bytes. [default: 67108864 (64 MiB)]
    #[arg(long, value_name = "BYTES")]
    pub capture_max_bytes: Option<u64>,

    /// Address for /metrics and /healthz. [default: 127.0.0.1:9874]
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,

    /// Log format. [default: text]
    #[arg(long, value_enum, env = "NATT_MONITOR_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,

    /// procfs root, for /proc/net/snmp and /proc/mounts (a container may mount the host's
    /// elsewhere). [default: /proc]
    #[arg(long, value_name = "PATH")]
    pub proc_path: Option<PathBuf>,
}

/// `natt-monitor check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// cgroup v2 directory to test-attach to. Default: a temporary child of the cgroup2 mount.
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<PathBuf>,
}
