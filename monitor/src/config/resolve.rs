//! Flags merged over the file into `Settings`: precedence key by key, and every value checked.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use super::{
    ConfigError, DEFAULT_LISTEN, DEFAULT_TELEMETRY_PATH, Discover, FilePeer, LogFormat, LogLevel,
    RunOptions, ScopeChoice,
};
use crate::{
    events::{LOG_BURST, LOG_PER_SECOND},
    peers::{Mode, NatAddresses, PeerError, PeerSpec, parse_cidr},
};

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
