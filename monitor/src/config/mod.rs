//! Configuration: the TOML file (`--config`) merged with command-line flags.
//!
//! Precedence: a flag given on the command line wins over the same key in the file, which wins
//! over the built-in default. `--peer` flags are added to the file's `[[peer]]` entries (a peer
//! may appear only once). Every error names the flag or the file and key at fault.

use std::{net::IpAddr, path::PathBuf};

use serde::Deserialize;

use crate::peers::Mode;

mod error;
mod resolve;
#[cfg(test)]
mod tests;

pub use error::{ConfigError, EXIT_CONFIG, EXIT_NO_RESTART, EXIT_USAGE};
pub use resolve::{
    DEFAULT_MAX_PEER_LABELS, MIN_CAPTURE_BYTES, Settings, file_pin_path, read_file, resolve,
};

/// Default `--web.listen-address`: loopback only, on natt-monitor's fixed port.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9874";

/// Default `--web.telemetry-path`.
pub const DEFAULT_TELEMETRY_PATH: &str = "/metrics";

/// Log output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Least severe log level written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Failures only.
    Error,
    /// Failures and warnings (a mismatch is a warning).
    Warn,
    /// Also start-up, peers, learning and reloads.
    #[default]
    Info,
    /// Also the verifier log and per-step detail.
    Debug,
    /// Everything.
    Trace,
}

impl LogLevel {
    /// As a tracing filter directive.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Error => "error",
            Self::Warn => "warn",
            Self::Info => "info",
            Self::Debug => "debug",
            Self::Trace => "trace",
        }
    }
}

/// Where peers come from besides --peer and [[peer]].
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Discover {
    /// The kernel's inbound ESP-in-UDP (and ESP-in-TCP) transport-mode SAs, followed live.
    Xfrm,
    /// Static peers only.
    None,
}

/// Which segments are verified.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Deserialize)]
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

/// The options of `natt-monitor run`, declared once for both sources: each is a flag
/// (`--sys-path`) and a key of the configuration file (`sys_path`), unless marked as one or the
/// other. Unknown file keys are errors.
#[derive(Clone, Debug, Default, clap::Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunOptions {
    /// TOML configuration file (see docs/configuration.md). Flags given on the command line
    /// override its keys; --peer flags are added to its [[peer]] entries. SIGHUP re-reads it.
    #[arg(long, value_name = "FILE", env = "NATT_MONITOR_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// cgroup v2 directory whose sockets are verified. Default: the cgroup2 mount point (every
    /// socket on the host), found in /proc/mounts.
    #[arg(long, value_name = "PATH", env = "NATT_MONITOR_CGROUP")]
    pub cgroup: Option<PathBuf>,

    /// Source address or prefix of an IPsec NAT-T peer to verify (repeatable), beside the
    /// discovered ones; with NAT addresses in the configuration file it fixes the residual
    /// exactly. Segments from other sources are counted as skipped (reason `not_in_scope`) and
    /// left alone.
    #[arg(long = "peer", value_name = "CIDR")]
    #[serde(skip)]
    pub peers: Vec<String>,

    /// Default mode for peers that set none. observe: count and log mismatches. enforce: also
    /// drop them so TCP retransmits. [default: observe]
    #[arg(long, value_enum, env = "NATT_MONITOR_MODE")]
    pub mode: Option<Mode>,

    /// Peer discovery. xfrm: every source address of this host's inbound transport-mode SAs with
    /// UDP/TCP encapsulation becomes a peer (learning its NAT residual from traffic), following
    /// SA add/delete/expire live. none: only --peer and [[peer]]. [default: xfrm when the
    /// kernel has XFRM netlink; given explicitly, a missing XFRM is an error]
    #[arg(long, value_enum, env = "NATT_MONITOR_DISCOVER")]
    pub discover: Option<Discover>,

    /// Which segments are verified: sa (each segment's own IPsec state, read through the
    /// kernel's BTF), address (source address, for kernels without BTF), or auto (sa where
    /// possible). [default: auto]
    #[arg(long, value_enum, env = "NATT_MONITOR_SCOPE")]
    pub scope: Option<ScopeChoice>,

    /// sysfs root, for /sys/kernel/btf/vmlinux (a container may mount the host's elsewhere).
    /// [default: /sys]
    #[arg(long, value_name = "PATH", env = "NATT_MONITOR_SYS_PATH")]
    pub sys_path: Option<PathBuf>,

    /// Write every mismatching packet (from its IP header, up to 2048 bytes) to this pcapng
    /// file, which Wireshark and tshark open. Rate limited (bursts of 100, then 20 a second) and
    /// bounded by --capture-max-bytes; what is left out is counted in
    /// `natt_monitor_capture_packets_total`. Created mode 0600, never through a symbolic link;
    /// a file left by an earlier run is rotated to FILE.1 (up to FILE.3), never truncated.
    /// Under the systemd unit, use its state directory: /var/lib/natt-monitor/FILE.
    #[arg(long, value_name = "FILE", env = "NATT_MONITOR_CAPTURE")]
    pub capture: Option<PathBuf>,

    /// Size limit of the --capture file, in bytes. [default: 67108864 (64 MiB)]
    #[arg(long, value_name = "BYTES", env = "NATT_MONITOR_CAPTURE_MAX_BYTES")]
    pub capture_max_bytes: Option<u64>,

    /// Address for the metrics and /healthz: HOST:PORT, [IPv6]:PORT, or :PORT for every
    /// address of the host (IPv4 and IPv6). `--listen` is the same flag; the file key is
    /// `listen`. [default: 127.0.0.1:9874]
    #[arg(
        long = "web.listen-address",
        visible_alias = "listen",
        value_name = "ADDR",
        env = "NATT_MONITOR_LISTEN"
    )]
    pub listen: Option<String>,

    /// Path under which the metrics are served; the file key is `telemetry_path`.
    /// [default: /metrics]
    #[arg(
        long = "web.telemetry-path",
        value_name = "PATH",
        env = "NATT_MONITOR_TELEMETRY_PATH"
    )]
    pub telemetry_path: Option<String>,

    /// Leave out the exporter's own `process_*` metrics (CPU, memory, file descriptors of the
    /// natt-monitor process), keeping only the verifier's. The file key is
    /// `disable_exporter_metrics = true`.
    #[arg(
        long = "web.disable-exporter-metrics",
        env = "NATT_MONITOR_DISABLE_EXPORTER_METRICS"
    )]
    #[serde(default)]
    pub disable_exporter_metrics: bool,

    /// TLS and basic authentication for /metrics and /healthz: a YAML file in the format of
    /// the Prometheus exporter-toolkit (`tls_server_config`, `basic_auth_users` with bcrypt
    /// hashes). See docs/metrics.md. [default: none: plain HTTP, no authentication]
    #[arg(
        long = "web.config.file",
        value_name = "FILE",
        env = "NATT_MONITOR_WEB_CONFIG_FILE"
    )]
    pub web_config_file: Option<PathBuf>,

    /// Log format. [default: text]
    #[arg(long, value_enum, env = "NATT_MONITOR_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,

    /// Least severe log level written. `NATT_MONITOR_LOG`, a full tracing filter (e.g.
    /// `info,natt_monitor::daemon=debug`), overrides it when set. [default: info]
    #[arg(long, value_enum, env = "NATT_MONITOR_LOG_LEVEL")]
    pub log_level: Option<LogLevel>,

    /// procfs root, for /proc/net/snmp and /proc/mounts (a container may mount the host's
    /// elsewhere). [default: /proc]
    #[arg(long, value_name = "PATH", env = "NATT_MONITOR_PROC_PATH")]
    pub proc_path: Option<PathBuf>,

    /// bpffs directory where the verifier's link and maps are pinned, so that they outlive the
    /// daemon: a restart or upgrade adopts them without a gap and the counts continue, and
    /// while no daemon runs the program keeps verifying (and in enforce mode dropping).
    /// `natt-monitor detach` removes them. `none`: nothing pinned, and the program goes with
    /// the process. bpffs is mounted at /sys/fs/bpf if nothing is. [default:
    /// /sys/fs/bpf/natt-monitor]
    #[arg(long, value_name = "DIR|none", env = "NATT_MONITOR_PIN_PATH")]
    pub pin_path: Option<String>,

    /// The most peers (static and discovered: one per NAT-T peer address) the verifier's maps
    /// hold, 1 to 65536. A peer set past it is refused and counted
    /// (`natt_monitor_discovery_errors_total`). Raise it on a VPN concentrator; each peer costs
    /// 120 bytes of kernel memory per possible CPU for its counters, and more than the cgroup's
    /// `memory.max` leaves free (charged on 5.11+) is refused at start, exit 78. Changing it
    /// replaces pinned maps, so their counts start again. [default: 1024]
    #[arg(long, value_name = "N", env = "NATT_MONITOR_MAX_PEERS")]
    pub max_peers: Option<u32>,

    /// Peers exported under their own `peer` label, 0 to 65536; the others are summed under
    /// `peer="other"` and counted in `natt_monitor_peers_aggregated`. This bounds the exporter's
    /// series however many SAs the host has; logs always name the peer. Static peers are
    /// labelled first, then discovered ones in the order they came. [default: 256]
    #[arg(long, value_name = "N", env = "NATT_MONITOR_MAX_PEER_LABELS")]
    pub max_peer_labels: Option<u32>,

    /// Test hook, hidden: the SA residuals the verifier's LRU map (`SA_TRUST`) holds, instead of
    /// the size `--max-peers` gives it (at least 16384). The VM suite makes it small to prove
    /// that a forgotten residual is learned again and counted.
    #[arg(long, value_name = "N", hide = true, value_parser = clap::value_parser!(u32).range(1..=i64::from(monitor_ebpf::MAX_SA_RESIDUALS)))]
    #[serde(skip)]
    pub sa_trust_slots: Option<u32>,

    /// File only: the `[log]` table (mismatch log budget).
    #[arg(skip)]
    #[serde(default)]
    pub log: FileLog,

    /// File only: the `[[peer]]` entries.
    #[arg(skip)]
    #[serde(default, rename = "peer")]
    pub peer_entries: Vec<FilePeer>,
}

/// `[log]` table.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileLog {
    /// Mismatch lines allowed at once.
    pub mismatch_burst: Option<u32>,
    /// Mismatch lines per second after the burst.
    pub mismatch_per_second: Option<u32>,
}

/// One `[[peer]]` entry.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilePeer {
    /// Source address or prefix.
    pub cidr: String,
    /// Overrides the default mode.
    pub mode: Option<Mode>,
    /// The peer's own address before its NAT rewrote it (what its checksum covers).
    pub original_src: Option<IpAddr>,
    /// The destination address the peer sent to, as it knows it.
    pub original_dst: Option<IpAddr>,
    /// Our address as the peer's segments arrive here.
    pub observed_dst: Option<IpAddr>,
    /// Learn the NAT residual from traffic instead of assuming none.
    pub learn_residual: Option<bool>,
}
