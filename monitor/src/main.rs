//! The `natt-monitor` binary: parse, set up logging, run.

use std::process::ExitCode;

use anyhow::{Context as _, bail};
use clap::Parser as _;
use natt_monitor::{
    cgroup, check,
    cli::{Cli, Command, LogFormat, RunArgs},
    daemon::{self, RunConfig},
    peers::{PeerSpec, PeerTable, parse_cidr},
};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check(args) => {
            let report = check::run_checks(args.cgroup.as_deref());
            #[expect(clippy::print_stdout, reason = "the report is the command's output")]
            {
                print!("{}", report.render());
            }
            if report.can_run() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Command::Run(args) => {
            init_logging(args.log_format);
            match run(args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("natt-monitor: error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter =
        EnvFilter::try_from_env("NATT_MONITOR_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let peers = args
        .peers
        .iter()
        .map(|p| parse_cidr(p).map(|net| PeerSpec::new(net, args.mode)))
        .collect::<Result<Vec<_>, _>>()
        .context("--peer")?;
    let peers = PeerTable::new(peers).context("--peer")?;
    let cgroup = match args.cgroup {
        Some(c) => c,
        None => cgroup::cgroup2_mount()
            .context("--cgroup not given and no cgroup2 mount found in /proc/mounts")?,
    };
    if !cgroup.is_dir() {
        bail!("--cgroup {}: no such directory", cgroup.display());
    }
    let config = RunConfig { cgroup, peers };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(daemon::run(config, shutdown_signal()))?;
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the default action (terminate) still applies, and the
        // bpf_link is released with the process.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
