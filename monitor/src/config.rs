//! Configuration: the TOML file (`--config`) merged with command-line flags.
//!
//! Precedence: a flag given on the command line wins over the same key in the file, which wins
//! over the built-in default. `--peer` flags are added to the file's `[[peer]]` entries (a peer
//! may appear only once). Every error names the flag or the file and key at fault.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use serde::Deserialize;

use crate::{
    events::{LOG_BURST, LOG_PER_SECOND},
    peers::{Mode, NatAddresses, PeerError, PeerSpec, parse_cidr},
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

/// A configuration error. The `Display` text is what the user sees after `error:`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("--config {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not match the schema (names the key and line).
    #[error("--config {}: {message}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// toml's message, which quotes the line and names the key.
        message: String,
    },
    /// A peer is invalid.
    #[error("{origin}: {source}")]
    Peer {
        /// `--peer` or the file and entry.
        origin: String,
        /// What is wrong.
        #[source]
        source: PeerError,
    },
    /// A NAT entry is incomplete or names a prefix.
    #[error("{origin}: {reason}")]
    Nat {
        /// The file and entry.
        origin: String,
        /// What is wrong.
        reason: String,
    },
    /// The listen address does not parse.
    #[error(
        "{origin}: `{value}` is not a socket address (expected e.g. 127.0.0.1:9874, [::1]:9874 or :9874)"
    )]
    Listen {
        /// `--web.listen-address` or the file key.
        origin: String,
        /// What was given.
        value: String,
    },
    /// The telemetry path is not one the endpoint can serve metrics under.
    #[error(
        "{origin}: `{value}` cannot be the metrics path: it must start with `/`, hold no spaces, `?` or `#`, and not be `/` or `/healthz` (e.g. /metrics)"
    )]
    TelemetryPath {
        /// `--web.telemetry-path` or the file key.
        origin: String,
        /// What was given.
        value: String,
    },
    /// The cgroup directory is missing.
    #[error("{origin} {}: no such directory", path.display())]
    Cgroup {
        /// `--cgroup` or the file key.
        origin: String,
        /// The path.
        path: PathBuf,
    },
    /// No cgroup was given and none is mounted.
    #[error("--cgroup not given and no cgroup2 mount found in {}/mounts", proc_path.display())]
    NoCgroup2 {
        /// procfs root searched.
        proc_path: PathBuf,
    },
    /// Nothing to verify.
    #[error(
        "no peers configured and discovery is off: pass --peer CIDR (repeatable), add [[peer]] entries to the --config file, or use --discover xfrm"
    )]
    NoPeers,
    /// A log budget of zero would silence every mismatch line.
    #[error("{origin}: must be at least 1")]
    ZeroBudget {
        /// The file key.
        origin: String,
    },
    /// The web configuration file is unusable.
    #[error(transparent)]
    Web(#[from] crate::webconfig::WebConfigError),
    /// A pin path that is neither absolute nor `none`.
    #[error("{origin}: `{value}` is not an absolute directory path or `none`")]
    PinPath {
        /// The flag or file key.
        origin: String,
        /// What was given.
        value: String,
    },
    /// A number outside its range.
    #[error("{origin}: {value} is out of range; use {min} to {max}")]
    OutOfRange {
        /// The flag or file key.
        origin: String,
        /// The value given.
        value: u32,
        /// The smallest allowed.
        min: u32,
        /// The largest allowed.
        max: u32,
    },
    /// More static peers than the maps hold.
    #[error(
        "{count} peers configured (--peer and [[peer]]), more than {origin} = {max} lets the verifier hold; raise it or remove peers (discovered peers past the limit are only counted, never an error)"
    )]
    TooManyPeers {
        /// How many static peers.
        count: usize,
        /// `--max-peers` or the file key.
        origin: String,
        /// The limit.
        max: u32,
    },
    /// A capture file too small to hold its headers and one whole packet.
    #[error(
        "{origin}: {value} bytes cannot hold one captured packet; use at least {MIN_CAPTURE_BYTES}"
    )]
    CaptureTooSmall {
        /// The flag or file key.
        origin: String,
        /// The value given.
        value: u64,
    },
}

/// The exit status of a configuration error (`EX_CONFIG` from sysexits.h): the file, or values
/// that parse but cannot be used, for `run`, `check --config` and `detach --config`.
pub const EXIT_CONFIG: u8 = 78;

/// The exit status of a usage error: an unknown flag, or a flag or environment value that does
/// not parse (clap's convention).
pub const EXIT_USAGE: u8 = 2;

/// Exit statuses a restart cannot fix: only an edit of the configuration can. The systemd unit
/// lists exactly these in `RestartPreventExitStatus=` (a test compares them); every other
/// failure exits 1 and is restarted.
pub const EXIT_NO_RESTART: [u8; 2] = [EXIT_USAGE, EXIT_CONFIG];

/// The smallest `--capture-max-bytes`: the file's headers and one packet at the snap length.
pub const MIN_CAPTURE_BYTES: u64 = 4096;

/// Everything `run` needs, resolved from flags and file, before anything touches the kernel.
#[derive(Clone, Debug)]
pub struct Settings {
    /// cgroup v2 directory.
    pub cgroup: PathBuf,
    /// Peers in configuration order (file entries first, then `--peer` flags).
    pub peers: Vec<PeerSpec>,
    /// Mode of peers that set none, discovered ones included.
    pub default_mode: Mode,
    /// Peer discovery.
    pub discover: Discover,
    /// True when discovery was asked for explicitly (flag or file): then a kernel without
    /// XFRM netlink is an error rather than a note in the log.
    pub discover_required: bool,
    /// Metrics listen address.
    pub listen: SocketAddr,
    /// The path of the metrics (`--web.telemetry-path`).
    pub telemetry_path: String,
    /// Leave out the `process_*` metrics (`--web.disable-exporter-metrics`).
    pub disable_exporter_metrics: bool,
    /// procfs root.
    pub proc_path: PathBuf,
    /// sysfs root.
    pub sys_path: PathBuf,
    /// Scope.
    pub scope: ScopeChoice,
    /// pcapng file for mismatching packets, if any.
    pub capture: Option<PathBuf>,
    /// Its size limit in bytes.
    pub capture_max_bytes: u64,
    /// Log format.
    pub log_format: LogFormat,
    /// Log level.
    pub log_level: LogLevel,
    /// Where the link and maps are pinned; `None` pins nothing.
    pub pin: Option<PathBuf>,
    /// TLS and authentication of the endpoint (`--web.config.file`), loaded and checked.
    pub web: Option<crate::webconfig::WebConfig>,
    /// Mismatch log burst.
    pub log_burst: u32,
    /// Mismatch log lines per second.
    pub log_per_second: u32,
    /// The most peers the maps hold.
    pub max_peers: u32,
    /// Peers exported under their own label.
    pub max_peer_labels: u32,
    /// `SA_TRUST`'s size, when the hidden `--sa-trust-slots` sets one.
    pub sa_trust_slots: Option<u32>,
}

impl Settings {
    /// The verifier's map sizes: for `max_peers`, with `SA_TRUST` as `--sa-trust-slots` says.
    #[must_use]
    pub fn map_sizes(&self) -> crate::ebpf::MapSizes {
        let mut sizes = crate::ebpf::MapSizes::for_peers(self.max_peers);
        if let Some(n) = self.sa_trust_slots {
            sizes.sa_trust = n;
        }
        sizes
    }

    /// The first setting in which `self` (a reloaded configuration) differs from `running`
    /// that only a restart can apply, named by its file key; `None` when a reload applies all
    /// of it (the peers and `mode`).
    #[must_use]
    pub fn needs_restart(&self, running: &Self) -> Option<&'static str> {
        [
            ("cgroup", self.cgroup != running.cgroup),
            ("discover", self.discover != running.discover),
            ("listen", self.listen != running.listen),
            (
                "telemetry_path",
                self.telemetry_path != running.telemetry_path,
            ),
            (
                "disable_exporter_metrics",
                self.disable_exporter_metrics != running.disable_exporter_metrics,
            ),
            ("proc_path", self.proc_path != running.proc_path),
            ("sys_path", self.sys_path != running.sys_path),
            ("scope", self.scope != running.scope),
            ("capture", self.capture != running.capture),
            (
                "capture_max_bytes",
                self.capture_max_bytes != running.capture_max_bytes,
            ),
            ("log_format", self.log_format != running.log_format),
            ("log_level", self.log_level != running.log_level),
            ("pin_path", self.pin != running.pin),
            ("log.mismatch_burst", self.log_burst != running.log_burst),
            (
                "log.mismatch_per_second",
                self.log_per_second != running.log_per_second,
            ),
            ("max_peers", self.max_peers != running.max_peers),
            (
                "max_peer_labels",
                self.max_peer_labels != running.max_peer_labels,
            ),
        ]
        .into_iter()
        .find_map(|(key, changed)| changed.then_some(key))
    }
}

/// The default `--max-peer-labels`.
pub const DEFAULT_MAX_PEER_LABELS: u32 = 256;

struct Origin<'a> {
    file: Option<&'a Path>,
}

impl Origin<'_> {
    fn key(&self, flag: &str, key: &str, from_flag: bool) -> String {
        match (from_flag, self.file) {
            (false, Some(f)) => format!("--config {} key `{key}`", f.display()),
            _ => flag.to_owned(),
        }
    }
}

impl fmt::Debug for Origin<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Origin").field("file", &self.file).finish()
    }
}

/// Reads and parses a configuration file.
///
/// # Errors
/// `ConfigError::Read` or `ConfigError::Parse`.
pub fn read_file(path: &Path) -> Result<RunOptions, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string().trim_end().to_owned(),
    })
}

/// Merges flags over the file (if any) into `Settings`. Reads the file each time it is called,
/// which is what SIGHUP reload wants.
///
/// # Errors
/// The first `ConfigError` found.
#[expect(
    clippy::too_many_lines,
    reason = "precedence is easiest to audit key by key in one place"
)]
pub fn resolve(args: &RunOptions) -> Result<Settings, ConfigError> {
    let file = match &args.config {
        Some(p) => read_file(p)?,
        None => RunOptions::default(),
    };
    let origin = Origin {
        file: args.config.as_deref(),
    };
    let default_mode = args.mode.or(file.mode).unwrap_or_default();

    let mut peers = Vec::new();
    let mut origins = Vec::new();
    for (i, fp) in file.peer_entries.iter().enumerate() {
        let at = format!(
            "--config {} [[peer]] #{} (cidr = {:?})",
            args.config
                .as_deref()
                .map_or_else(String::new, |p| p.display().to_string()),
            i + 1,
            fp.cidr
        );
        let net = parse_cidr(&fp.cidr).map_err(|source| ConfigError::Peer {
            origin: at.clone(),
            source,
        })?;
        let mut spec = PeerSpec::new(net, fp.mode.unwrap_or(default_mode));
        spec.nat = nat_of(fp, net, &at)?;
        spec.learn = fp.learn_residual.unwrap_or(false);
        if spec.learn && spec.nat.is_some() {
            return Err(ConfigError::Nat {
                origin: at,
                reason: "learn_residual = true and original_src/original_dst/observed_dst contradict each other: set the addresses (exact residual) or learn it, not both".into(),
            });
        }
        peers.push(spec);
        origins.push(at);
    }
    for p in &args.peers {
        let net = parse_cidr(p).map_err(|source| ConfigError::Peer {
            origin: "--peer".into(),
            source,
        })?;
        peers.push(PeerSpec::new(net, default_mode));
        origins.push("--peer".to_owned());
    }
    let discover_required = args.discover.or(file.discover).is_some();
    let discover = args.discover.or(file.discover).unwrap_or(Discover::Xfrm);
    if peers.is_empty() && discover == Discover::None {
        return Err(ConfigError::NoPeers);
    }
    // Duplicates and the peer limit are checked where ids are assigned (PeerTable); check here
    // too so the error names where the duplicate came from.
    for (i, p) in peers.iter().enumerate() {
        if peers[..i].iter().any(|q| q.net == p.net) {
            return Err(ConfigError::Peer {
                origin: origins[i].clone(),
                source: PeerError::Duplicate { peer: p.net },
            });
        }
    }

    let proc_path = args
        .proc_path
        .clone()
        .or(file.proc_path)
        .unwrap_or_else(|| PathBuf::from("/proc"));
    let (cgroup, cgroup_origin) = match (&args.cgroup, &file.cgroup) {
        (Some(c), _) => (c.clone(), "--cgroup".to_owned()),
        (None, Some(c)) => (c.clone(), origin.key("--cgroup", "cgroup", false)),
        (None, None) => (
            crate::cgroup::cgroup2_mount_in(&proc_path).ok_or_else(|| ConfigError::NoCgroup2 {
                proc_path: proc_path.clone(),
            })?,
            "--cgroup".to_owned(),
        ),
    };
    if !cgroup.is_dir() {
        return Err(ConfigError::Cgroup {
            origin: cgroup_origin,
            path: cgroup,
        });
    }

    let (listen_text, listen_origin) = match (&args.listen, &file.listen) {
        (Some(l), _) => (l.clone(), LISTEN_FLAG.to_owned()),
        (None, Some(l)) => (l.clone(), origin.key(LISTEN_FLAG, "listen", false)),
        (None, None) => (DEFAULT_LISTEN.to_owned(), LISTEN_FLAG.to_owned()),
    };
    let listen = listen_address(&listen_text).ok_or_else(|| ConfigError::Listen {
        origin: listen_origin,
        value: listen_text.clone(),
    })?;
    let (telemetry_path, path_origin) = match (&args.telemetry_path, &file.telemetry_path) {
        (Some(p), _) => (p.clone(), PATH_FLAG.to_owned()),
        (None, Some(p)) => (p.clone(), origin.key(PATH_FLAG, "telemetry_path", false)),
        (None, None) => (DEFAULT_TELEMETRY_PATH.to_owned(), PATH_FLAG.to_owned()),
    };
    if !valid_telemetry_path(&telemetry_path) {
        return Err(ConfigError::TelemetryPath {
            origin: path_origin,
            value: telemetry_path,
        });
    }

    let log_burst = file.log.mismatch_burst.unwrap_or(LOG_BURST);
    if log_burst == 0 {
        return Err(ConfigError::ZeroBudget {
            origin: origin.key("", "log.mismatch_burst", false),
        });
    }
    let log_per_second = file.log.mismatch_per_second.unwrap_or(LOG_PER_SECOND);
    let capture_max_bytes = args
        .capture_max_bytes
        .or(file.capture_max_bytes)
        .unwrap_or(crate::capture::DEFAULT_MAX_BYTES);
    if capture_max_bytes < MIN_CAPTURE_BYTES {
        return Err(ConfigError::CaptureTooSmall {
            origin: if args.capture_max_bytes.is_some() {
                "--capture-max-bytes".to_owned()
            } else {
                origin.key("--capture-max-bytes", "capture_max_bytes", false)
            },
            value: capture_max_bytes,
        });
    }

    let bounded = |flag: Option<u32>, key: Option<u32>, name: &str, min: u32, default: u32| {
        let value = flag.or(key).unwrap_or(default);
        if (min..=monitor_ebpf::MAX_PEERS_LIMIT).contains(&value) {
            Ok(value)
        } else {
            let flag_name = format!("--{}", name.replace('_', "-"));
            Err(ConfigError::OutOfRange {
                origin: origin.key(&flag_name, name, flag.is_some()),
                value,
                min,
                max: monitor_ebpf::MAX_PEERS_LIMIT,
            })
        }
    };
    let max_peers = bounded(
        args.max_peers,
        file.max_peers,
        "max_peers",
        1,
        monitor_ebpf::MAX_PEERS,
    )?;
    if peers.len() > max_peers as usize {
        return Err(ConfigError::TooManyPeers {
            count: peers.len(),
            origin: origin.key("--max-peers", "max_peers", args.max_peers.is_some()),
            max: max_peers,
        });
    }
    let max_peer_labels = bounded(
        args.max_peer_labels,
        file.max_peer_labels,
        "max_peer_labels",
        0,
        DEFAULT_MAX_PEER_LABELS,
    )?;

    let pin = match (&args.pin_path, &file.pin_path) {
        (Some(p), _) => pin_path(p, "--pin-path".to_owned())?,
        (None, Some(p)) => pin_path(p, origin.key("--pin-path", "pin_path", false))?,
        (None, None) => Some(PathBuf::from(crate::pin::DEFAULT_PIN_PATH)),
    };

    let web = args
        .web_config_file
        .clone()
        .or(file.web_config_file)
        .map(|p| crate::webconfig::WebConfig::load(&p))
        .transpose()?;

    Ok(Settings {
        cgroup,
        peers,
        default_mode,
        discover,
        discover_required,
        listen,
        telemetry_path,
        disable_exporter_metrics: args.disable_exporter_metrics || file.disable_exporter_metrics,
        proc_path,
        sys_path: args
            .sys_path
            .clone()
            .or(file.sys_path)
            .unwrap_or_else(|| PathBuf::from("/sys")),
        scope: args.scope.or(file.scope).unwrap_or_default(),
        capture: args.capture.clone().or(file.capture),
        capture_max_bytes,
        log_format: args.log_format.or(file.log_format).unwrap_or_default(),
        log_level: args.log_level.or(file.log_level).unwrap_or_default(),
        pin,
        web,
        log_burst,
        log_per_second,
        max_peers,
        max_peer_labels,
        sa_trust_slots: args.sa_trust_slots,
    })
}

const LISTEN_FLAG: &str = "--web.listen-address";
const PATH_FLAG: &str = "--web.telemetry-path";

/// A socket address, or `:PORT` as Prometheus exporters take it: every address of the host,
/// which `[::]` is on Linux (IPv4 too, unless `net.ipv6.bindv6only` is set; the daemon falls
/// back to 0.0.0.0 where IPv6 is off).
fn listen_address(text: &str) -> Option<SocketAddr> {
    match text.strip_prefix(':') {
        Some(port) => port
            .parse()
            .ok()
            .map(|port| SocketAddr::new(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED), port)),
        None => text.parse().ok(),
    }
}

/// A path the endpoint can route metrics to: absolute, one token, and not one of its others.
fn valid_telemetry_path(path: &str) -> bool {
    path.starts_with('/')
        && path != "/"
        && path != "/healthz"
        && !path.contains(|c: char| c.is_whitespace() || c.is_control() || c == '?' || c == '#')
}

/// The `pin_path` key of `file`, as `run` reads it.
///
/// # Errors
/// `ConfigError::PinPath` naming the file and key.
pub fn file_pin_path(file: &Path, value: &str) -> Result<Option<PathBuf>, ConfigError> {
    let origin = Origin { file: Some(file) };
    pin_path(value, origin.key("--pin-path", "pin_path", false))
}

/// `none`, or an absolute directory.
fn pin_path(value: &str, origin: String) -> Result<Option<PathBuf>, ConfigError> {
    if value == "none" {
        return Ok(None);
    }
    let path = PathBuf::from(value);
    if path.is_absolute() && path.parent().is_some() {
        Ok(Some(path))
    } else {
        Err(ConfigError::PinPath {
            origin,
            value: value.to_owned(),
        })
    }
}

fn nat_of(fp: &FilePeer, net: ipnet::IpNet, at: &str) -> Result<Option<NatAddresses>, ConfigError> {
    match (fp.original_src, fp.original_dst, fp.observed_dst) {
        (None, None, None) => Ok(None),
        (Some(original_src), Some(original_dst), Some(observed_dst)) => {
            if net.prefix_len() != net.max_prefix_len() {
                return Err(ConfigError::Nat {
                    origin: at.to_owned(),
                    reason: "original_src/original_dst/observed_dst describe one NATed host, so cidr must be a single address".into(),
                });
            }
            Ok(Some(NatAddresses {
                original_src,
                original_dst,
                observed_src: net.addr(),
                observed_dst,
            }))
        }
        _ => Err(ConfigError::Nat {
            origin: at.to_owned(),
            reason: "set all of original_src, original_dst and observed_dst, or none".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::cli::{Cli, Command};

    fn args(extra: &[&str]) -> RunOptions {
        let mut v = vec!["natt-monitor", "run"];
        v.extend_from_slice(extra);
        match Cli::try_parse_from(v).unwrap().command {
            Command::Run(a) => a,
            _ => unreachable!(),
        }
    }

    fn file(text: &str) -> (PathBuf, RunOptions) {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("natt-config-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("natt-monitor.toml");
        std::fs::write(&path, text).unwrap();
        let a = args(&["--config", path.to_str().unwrap(), "--cgroup", "/"]);
        (path, a)
    }

    #[test]
    fn flags_override_the_file_and_peers_add_up() {
        let (path, _) = file(
            "mode = \"enforce\"\nlisten = \"127.0.0.1:1\"\nlog_format = \"json\"\n\
             [[peer]]\ncidr = \"192.0.2.0/24\"\n[[peer]]\ncidr = \"198.51.100.7\"\nmode = \"observe\"\n",
        );
        let a = args(&[
            "--config",
            path.to_str().unwrap(),
            "--cgroup",
            "/",
            "--listen",
            "[::1]:9",
            "--peer",
            "2001:db8::/32",
        ]);
        let s = resolve(&a).unwrap();
        assert_eq!(s.listen, "[::1]:9".parse().unwrap());
        assert_eq!(s.log_format, LogFormat::Json);
        let got: Vec<(String, Mode)> = s.peers.iter().map(|p| (p.label(), p.mode)).collect();
        assert_eq!(
            got,
            [
                ("192.0.2.0/24".into(), Mode::Enforce),
                ("198.51.100.7/32".into(), Mode::Observe),
                ("2001:db8::/32".into(), Mode::Enforce),
            ]
        );
        let a = args(&[
            "--config",
            path.to_str().unwrap(),
            "--cgroup",
            "/",
            "--mode",
            "observe",
        ]);
        assert_eq!(resolve(&a).unwrap().peers[0].mode, Mode::Observe);
    }

    /// A reload applies peers and `mode`; any other change is refused, naming its file key.
    #[test]
    fn a_reload_names_the_first_setting_that_needs_a_restart() {
        let (path, a) = file("mode = \"observe\"\nlisten = \"127.0.0.1:1\"\n");
        let running = resolve(&a).unwrap();
        std::fs::write(
            &path,
            "mode = \"enforce\"\nlisten = \"127.0.0.1:1\"\n[[peer]]\ncidr = \"192.0.2.7\"\n",
        )
        .unwrap();
        let reloaded = resolve(&a).unwrap();
        assert_eq!(reloaded.needs_restart(&running), None);
        assert_eq!(reloaded.default_mode, Mode::Enforce);
        std::fs::write(&path, "listen = \"127.0.0.1:2\"\nmax_peers = 9\n").unwrap();
        assert_eq!(resolve(&a).unwrap().needs_restart(&running), Some("listen"));
        std::fs::write(&path, "listen = \"127.0.0.1:1\"\nmax_peers = 9\n").unwrap();
        assert_eq!(
            resolve(&a).unwrap().needs_restart(&running),
            Some("max_peers")
        );
    }

    #[test]
    fn flags_and_file_keys_are_one_schema() {
        // Every option but the flag-only ones is also a file key, under its snake_case name.
        let (_, a) = file(
            "cgroup = \"/\"\nmode = \"enforce\"\ndiscover = \"none\"\nscope = \"address\"\n\
             sys_path = \"/s\"\ncapture = \"/c.pcapng\"\ncapture_max_bytes = 5000\n\
             listen = \"127.0.0.1:2\"\nlog_format = \"json\"\nproc_path = \"/proc\"\n\
             pin_path = \"none\"\nlog_level = \"debug\"\n[[peer]]\ncidr = \"192.0.2.1\"\n",
        );
        let s = resolve(&a).unwrap();
        assert_eq!((s.pin, s.log_level), (None, LogLevel::Debug));
        assert_eq!(
            (
                s.default_mode,
                s.discover,
                s.scope,
                s.sys_path.to_str(),
                s.capture.as_deref().and_then(Path::to_str),
                s.capture_max_bytes,
                s.listen.to_string(),
                s.log_format,
            ),
            (
                Mode::Enforce,
                Discover::None,
                ScopeChoice::Address,
                Some("/s"),
                Some("/c.pcapng"),
                5000,
                "127.0.0.1:2".to_owned(),
                LogFormat::Json,
            )
        );
        // The flag-only options are not file keys.
        for key in ["config = \"x.toml\"", "peers = [\"192.0.2.1\"]"] {
            let (_, a) = file(&format!("{key}\n[[peer]]\ncidr = \"192.0.2.1\"\n"));
            let e = resolve(&a).unwrap_err().to_string();
            let name = key.split(' ').next().unwrap();
            assert!(e.contains(&format!("unknown field `{name}`")), "{e}");
        }
    }

    #[test]
    fn map_and_label_limits_are_bounded_and_named() {
        let s = resolve(&args(&["--cgroup", "/", "--peer", "192.0.2.1"])).unwrap();
        assert_eq!((s.max_peers, s.max_peer_labels), (1024, 256));
        let s = resolve(&args(&[
            "--cgroup",
            "/",
            "--peer",
            "192.0.2.1",
            "--max-peers",
            "16384",
            "--max-peer-labels",
            "0",
        ]))
        .unwrap();
        assert_eq!((s.max_peers, s.max_peer_labels), (16384, 0));
        let e = resolve(&args(&[
            "--cgroup",
            "/",
            "--peer",
            "192.0.2.1",
            "--max-peers",
            "0",
        ]))
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "--max-peers: 0 is out of range; use 1 to 65536"
        );
        let (p, a) = file("max_peer_labels = 70000\n[[peer]]\ncidr = \"192.0.2.1\"\n");
        assert_eq!(
            resolve(&a).unwrap_err().to_string(),
            format!(
                "--config {} key `max_peer_labels`: 70000 is out of range; use 0 to 65536",
                p.display()
            )
        );
        let (_, a) = file("max_peers = 12000\n[[peer]]\ncidr = \"192.0.2.1\"\n");
        assert_eq!(resolve(&a).unwrap().max_peers, 12000);
    }

    #[test]
    fn exporter_conventions_for_the_endpoint() {
        let s = resolve(&args(&[
            "--peer",
            "192.0.2.1",
            "--web.listen-address",
            ":9874",
            "--web.telemetry-path",
            "/natt/metrics",
            "--web.disable-exporter-metrics",
        ]))
        .unwrap();
        assert_eq!(s.listen.to_string(), "[::]:9874");
        assert_eq!(s.telemetry_path, "/natt/metrics");
        assert!(s.disable_exporter_metrics);
        // --listen stays the same flag; the defaults serve /metrics with the process metrics.
        let s = resolve(&args(&["--peer", "192.0.2.1", "--listen", "[::1]:9"])).unwrap();
        assert_eq!(s.listen.to_string(), "[::1]:9");
        assert_eq!(s.telemetry_path, "/metrics");
        assert!(!s.disable_exporter_metrics);
        let (p, a) = file(
            "telemetry_path = \"/healthz\"\ndisable_exporter_metrics = true\n[[peer]]\ncidr = \"192.0.2.1\"\n",
        );
        assert_eq!(
            resolve(&a).unwrap_err().to_string(),
            format!(
                "--config {} key `telemetry_path`: `/healthz` cannot be the metrics path: it must start with `/`, hold no spaces, `?` or `#`, and not be `/` or `/healthz` (e.g. /metrics)",
                p.display()
            )
        );
        for bad in [":", ":http", ":70000", "9874"] {
            assert!(
                resolve(&args(&["--peer", "192.0.2.1", "--listen", bad])).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn more_static_peers_than_the_maps_hold_is_a_configuration_error() {
        let (p, a) = file(
            "max_peers = 2\n[[peer]]\ncidr = \"192.0.2.1\"\n[[peer]]\ncidr = \"192.0.2.2\"\n[[peer]]\ncidr = \"192.0.2.3\"\n",
        );
        assert_eq!(
            resolve(&a).unwrap_err().to_string(),
            format!(
                "3 peers configured (--peer and [[peer]]), more than --config {} key `max_peers` = 2 lets the verifier hold; raise it or remove peers (discovered peers past the limit are only counted, never an error)",
                p.display()
            )
        );
        // As many as the limit is fine.
        let (_, a) = file("max_peers = 1\n[[peer]]\ncidr = \"192.0.2.1\"\n");
        assert_eq!(resolve(&a).unwrap().peers.len(), 1);
    }

    #[test]
    fn errors_name_the_key_or_flag() {
        let (_, a) = file("[[peer]]\ncidr = \"192.0.2.0/24\"\nmtu = 9000\n");
        let e = resolve(&a).unwrap_err().to_string();
        assert!(e.contains("unknown field `mtu`, expected one of `cidr`, `mode`, `original_src`, `original_dst`, `observed_dst`, `learn_residual`"), "{e}");
        assert!(e.contains("line 3"), "{e}");

        let (p, a) = file("[[peer]]\ncidr = \"192.0.2.0/33\"\n");
        assert_eq!(
            resolve(&a).unwrap_err().to_string(),
            format!(
                "--config {} [[peer]] #1 (cidr = \"192.0.2.0/33\"): `192.0.2.0/33` is not an IP address or CIDR prefix \
                 (expected e.g. 192.0.2.7, 198.51.100.0/24 or 2001:db8::/64)",
                p.display()
            )
        );

        let (p, a) = file("capture_max_bytes = 100\n[[peer]]\ncidr = \"192.0.2.1\"\n");
        assert_eq!(
            resolve(&a).unwrap_err().to_string(),
            format!(
                "--config {} key `capture_max_bytes`: 100 bytes cannot hold one captured packet; use at least 4096",
                p.display()
            )
        );
        assert_eq!(
            resolve(&args(&["--peer", "192.0.2.1", "--capture-max-bytes", "0"]))
                .unwrap_err()
                .to_string(),
            "--capture-max-bytes: 0 bytes cannot hold one captured packet; use at least 4096"
        );

        let (p, a) = file("listen = \"localhost\"\n[[peer]]\ncidr = \"192.0.2.1\"\n");
        assert_eq!(
            resolve(&a).unwrap_err().to_string(),
            format!(
                "--config {} key `listen`: `localhost` is not a socket address (expected e.g. 127.0.0.1:9874, [::1]:9874 or :9874)",
                p.display()
            )
        );

        let (p, a) = file(
            "[[peer]]\ncidr = \"192.0.2.0/24\"\noriginal_src = \"10.0.0.1\"\noriginal_dst = \"10.0.0.2\"\nobserved_dst = \"192.0.2.99\"\n",
        );
        assert!(
            resolve(&a)
                .unwrap_err()
                .to_string()
                .starts_with(&format!("--config {} [[peer]] #1", p.display()))
        );

        let (_, a) = file("[[peer]]\ncidr = \"192.0.2.1\"\noriginal_src = \"10.0.0.1\"\n");
        assert!(
            resolve(&a)
                .unwrap_err()
                .to_string()
                .ends_with("set all of original_src, original_dst and observed_dst, or none")
        );

        let a = args(&["--cgroup", "/", "--discover", "none"]);
        assert_eq!(
            resolve(&a).unwrap_err().to_string(),
            "no peers configured and discovery is off: pass --peer CIDR (repeatable), add [[peer]] entries to the --config file, or use --discover xfrm"
        );
        // Discovery alone is a valid configuration; by default it is not required.
        let s = resolve(&args(&["--cgroup", "/"])).unwrap();
        assert_eq!((s.discover, s.discover_required), (Discover::Xfrm, false));
        let (_, a) =
            file("discover = \"xfrm\"\n[[peer]]\ncidr = \"192.0.2.1\"\nlearn_residual = true\n");
        let s = resolve(&a).unwrap();
        assert_eq!(
            (s.discover, s.discover_required, s.peers[0].learn),
            (Discover::Xfrm, true, true)
        );
        let a = args(&["--cgroup", "/nonexistent/cg", "--peer", "192.0.2.1"]);
        assert_eq!(
            resolve(&a).unwrap_err().to_string(),
            "--cgroup /nonexistent/cg: no such directory"
        );
        // Pinning is on by default; --pin-path moves it or turns it off.
        let s = resolve(&args(&["--cgroup", "/"])).unwrap();
        assert_eq!(
            s.pin.as_deref(),
            Some(Path::new("/sys/fs/bpf/natt-monitor"))
        );
        let s = resolve(&args(&["--cgroup", "/", "--pin-path", "/sys/fs/bpf/x"])).unwrap();
        assert_eq!(s.pin.as_deref(), Some(Path::new("/sys/fs/bpf/x")));
        assert_eq!(
            resolve(&args(&["--cgroup", "/", "--pin-path", "natt"]))
                .unwrap_err()
                .to_string(),
            "--pin-path: `natt` is not an absolute directory path or `none`"
        );
        let (p, a) = file("pin_path = \"/\"\n[[peer]]\ncidr = \"192.0.2.1\"\n");
        assert_eq!(
            resolve(&a).unwrap_err().to_string(),
            format!(
                "--config {} key `pin_path`: `/` is not an absolute directory path or `none`",
                p.display()
            )
        );
        let a = args(&["--config", "/nonexistent/natt.toml", "--peer", "192.0.2.1"]);
        assert_eq!(
            resolve(&a).unwrap_err().to_string(),
            "--config /nonexistent/natt.toml: No such file or directory (os error 2)"
        );
    }

    #[test]
    fn the_documented_example_is_valid() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../docs/natt-monitor.example.toml"
        );
        let a = args(&["--config", path, "--cgroup", "/"]);
        let s = resolve(&a).unwrap();
        let got: Vec<(String, Mode, bool, bool)> = s
            .peers
            .iter()
            .map(|p| (p.label(), p.mode, p.nat.is_some(), p.learn))
            .collect();
        assert_eq!(
            got,
            [
                ("198.51.100.0/24".into(), Mode::Observe, false, false),
                ("2001:db8:7::/48".into(), Mode::Enforce, false, false),
                ("203.0.113.5/32".into(), Mode::Observe, true, false),
                ("192.0.2.44/32".into(), Mode::Observe, false, true),
            ]
        );
        assert_eq!((s.discover, s.discover_required), (Discover::Xfrm, true));
        assert_eq!(s.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!((s.log_burst, s.log_per_second), (20, 5));
    }

    #[test]
    fn nat_peer_gets_its_residual_inputs() {
        let (_, a) = file(
            "[[peer]]\ncidr = \"203.0.113.5\"\noriginal_src = \"10.0.0.5\"\noriginal_dst = \"10.9.9.9\"\nobserved_dst = \"192.168.1.1\"\n",
        );
        let s = resolve(&a).unwrap();
        let nat = s.peers[0].nat.unwrap();
        assert_eq!(nat.observed_src, "203.0.113.5".parse::<IpAddr>().unwrap());
        assert_ne!(s.peers[0].expected_residual().unwrap(), 0);
    }
}
