//! The `natt-monitor` binary: parse, resolve configuration, set up logging, run.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;
use natt_monitor::{
    check,
    cli::{Cli, Command},
    config::{self, LogFormat, RunOptions},
    daemon::{self, RunConfig},
};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check(args) => {
            let report = check::run_checks(args.cgroup.as_deref(), &args.proc_path, &args.sys_path);
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
        Command::Run(args) => match run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("natt-monitor: error: {}", render_error(&e));
                ExitCode::FAILURE
            }
        },
    }
}

/// The error and its causes on one line, skipping causes whose text the message already has
/// (our error types quote their cause; library errors do not).
fn render_error(e: &anyhow::Error) -> String {
    let mut msg = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !msg.contains(&c) {
            msg.push_str(": ");
            msg.push_str(&c);
        }
    }
    msg
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

fn run(args: &RunOptions) -> anyhow::Result<()> {
    // Everything in the configuration is checked before logging starts or the kernel is
    // touched, so a typo never leaves anything attached.
    let settings = config::resolve(args)?;
    init_logging(settings.log_format);
    let reload_args = args.clone();
    let config = RunConfig {
        settings,
        reload: Some(Box::new(move || {
            config::resolve(&reload_args).map(|s| s.peers)
        })),
        listener: None,
    };
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
        // Without handlers the default action (terminate) still applies, and the bpf_link is
        // released with the process.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
