//! Command-line interface: the subcommands. `run`'s options are declared once, in
//! `config::RunOptions`, for both the flags and the configuration file.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::RunOptions;

/// Verifies the TCP/UDP checksums Linux skips after IPsec NAT-T (ESP-in-UDP) transport-mode
/// decapsulation, and in enforce mode drops corrupted segments so TCP retransmits them.
#[derive(Debug, Parser)]
#[command(name = "natt-monitor", version, about, long_about = None, after_help = "\
Examples:
  natt-monitor check
  natt-monitor check --config /etc/natt-monitor/natt-monitor.toml
  natt-monitor run --peer 198.51.100.0/24 --peer 2001:db8:7::/48
  natt-monitor run                      # peers from this host's NAT-T SAs (XFRM)
  natt-monitor run --discover none --peer 192.0.2.10 --mode enforce \
      --cgroup /sys/fs/cgroup/unified/zookeeper.slice
  natt-monitor detach                   # remove the verifier that `run` left pinned
  natt-monitor report /var/lib/natt-monitor/mismatches.pcapng")]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Attach the verifier and report mismatches until SIGINT/SIGTERM.
    Run(RunOptions),
    /// Probe whether this host can run the verifier; exits non-zero if it cannot.
    Check(CheckArgs),
    /// Detach the pinned verifier and remove its link and maps from bpffs. `run` leaves them
    /// attached when it exits (so that a restart has no gap); this is how to remove it for good.
    /// Refused while a daemon runs with these pins (stop it first); one detached by other means
    /// (bpftool) notices within a second and exits with an error.
    Detach(DetachArgs),
    /// Summarize `--capture` files for an incident or a vendor ticket: per peer and SA, the
    /// corrupted copies, first and last seen, the shapes of what changed (each corrupted copy
    /// compared byte for byte with TCP's intact retransmission, which the capture holds beside
    /// it), the changed offsets and cipher blocks that recur, and the likely layer.
    #[command(after_help = "\
Examples:
  natt-monitor report /var/lib/natt-monitor/mismatches.pcapng
  natt-monitor report /var/lib/natt-monitor/mismatches.pcapng*   # with the rotated files")]
    Report(ReportArgs),
    /// Write the man pages and shell completions into a directory (for packaging).
    #[command(hide = true)]
    Generate(GenerateArgs),
}

/// `natt-monitor generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Directory to write into: `man/*.1` and `completions/` (bash, zsh, fish).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

/// Writes `natt-monitor.1` and one page per subcommand (`natt-monitor-run.1`, ...) into
/// `out/man`, and the bash, zsh and fish completions into `out/completions`.
///
/// # Errors
/// When a file cannot be written.
pub fn generate(out: &std::path::Path) -> std::io::Result<()> {
    use clap::CommandFactory as _;
    let man = out.join("man");
    let completions = out.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&completions)?;
    let cmd = Cli::command();
    clap_mangen::generate_to(cmd.clone(), &man)?;
    for shell in [
        clap_complete::Shell::Bash,
        clap_complete::Shell::Zsh,
        clap_complete::Shell::Fish,
    ] {
        clap_complete::generate_to(shell, &mut cmd.clone(), "natt-monitor", &completions)?;
    }
    Ok(())
}

/// `natt-monitor report`.
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// pcapng files written by `run --capture` (rotated ones too: FILE.1, FILE.2, ...).
    #[arg(value_name = "FILE", required = true)]
    pub files: Vec<PathBuf>,
}

/// `natt-monitor detach`.
#[derive(Debug, Args)]
pub struct DetachArgs {
    /// The pin directory `run` used (its --pin-path). [default: /sys/fs/bpf/natt-monitor]
    #[arg(long, value_name = "DIR", conflicts_with = "config")]
    pub pin_path: Option<PathBuf>,

    /// Take the pin directory from this configuration file's `pin_path`, as `run --config`
    /// would (the default when the file sets none). The package's removal script uses it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

impl DetachArgs {
    /// The pin directory to detach; `None` when the file says `pin_path = "none"`.
    ///
    /// # Errors
    /// When the file cannot be read or its `pin_path` is invalid.
    pub fn pin_dir(&self) -> Result<Option<PathBuf>, crate::config::ConfigError> {
        if let Some(dir) = &self.pin_path {
            return Ok(Some(dir.clone()));
        }
        let Some(file) = &self.config else {
            return Ok(Some(PathBuf::from(crate::pin::DEFAULT_PIN_PATH)));
        };
        let options = crate::config::read_file(file)?;
        match options.pin_path {
            None => Ok(Some(PathBuf::from(crate::pin::DEFAULT_PIN_PATH))),
            Some(value) => crate::config::file_pin_path(file, &value),
        }
    }
}

/// `natt-monitor check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Validate this configuration file instead of probing the host, as `run --config` would
    /// read it (flags and environment variables are not applied). Prints a summary and exits 0,
    /// or names the key at fault and exits 78. The systemd unit runs it before a reload.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// With --config: once the file is valid, send SIGHUP to the daemon with this process id so
    /// that it re-reads its peers and mode; an invalid file leaves it alone, and so does a pid
    /// that is not a process named natt-monitor (exit 1). The systemd unit's reload is
    /// `check --config FILE --reload $MAINPID` (no `kill` binary needed).
    #[arg(long, value_name = "PID", requires = "config")]
    pub reload: Option<i32>,

    /// cgroup v2 directory to test-attach to. Default: a temporary child of the cgroup2 mount.
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<PathBuf>,

    /// procfs root, for the kernel release, capabilities and mounts (a container may mount the
    /// host's elsewhere).
    #[arg(long, value_name = "PATH", default_value = "/proc")]
    pub proc_path: PathBuf,

    /// sysfs root, for the kernel's BTF and loaded modules.
    #[arg(long, value_name = "PATH", default_value = "/sys")]
    pub sys_path: PathBuf,

    /// Pin directory whose pinned verifier to report.
    #[arg(long, value_name = "DIR", default_value = crate::pin::DEFAULT_PIN_PATH)]
    pub pin_path: PathBuf,
}
