//! What can be wrong with a configuration, each error naming the flag or the file and key, and
//! the exit statuses that tell a supervisor not to restart.

use std::path::PathBuf;

use super::MIN_CAPTURE_BYTES;
use crate::peers::PeerError;

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
