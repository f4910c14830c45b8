//! The `natt-monitor` binary: parse, resolve configuration, set up logging, run.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::{CommandFactory as _, Parser as _};
use natt_monitor::{
    check,
    cli::{Cli, Command},
    config::{self, LogFormat, LogLevel, RunOptions},
    daemon::{self, RunConfig},
};
use tracing_subscriber::EnvFilter;

/// `check --config FILE --reload PID`: asks the daemon `pid` to re-read its configuration.
/// Only a process named `natt-monitor` is signalled: a stale or mistyped pid must not deliver
/// SIGHUP (whose default action ends a process) to something else.
fn reload(pid: i32) -> Result<(), String> {
    if pid <= 0 {
        return Err(format!(
            "--reload {pid}: not a daemon's process id (systemd passes $MAINPID, which is 0 when the unit is not running)"
        ));
    }
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            format!("--reload {pid}: no such process ({e})")
        } else {
            format!("--reload {pid}: cannot read /proc/{pid}/comm to check that it is natt-monitor ({e}); nothing was signalled")
        }
    })?;
    let comm = comm.trim_end();
    if comm != "natt-monitor" {
        return Err(format!(
            "--reload {pid}: process {pid} is `{comm}`, not natt-monitor; nothing was signalled"
        ));
    }
    // SAFETY: kill(2) has no memory preconditions.
    if unsafe { libc::kill(pid, libc::SIGHUP) } == 0 {
        #[expect(clippy::print_stdout, reason = "the report is the command's output")]
        {
            println!("sent SIGHUP to {pid}: it re-reads the configuration");
        }
        Ok(())
    } else {
        Err(format!(
            "--reload {pid}: {}",
            std::io::Error::last_os_error()
        ))
    }
}

/// `check --config FILE [--reload PID]`: the file's summary (exit 0), or the key at fault (exit
/// 78); then, if valid, SIGHUP to the daemon.
fn check_config(path: &std::path::Path, reload_pid: Option<i32>) -> ExitCode {
    match check::config_summary(path) {
        Ok(summary) => {
            #[expect(clippy::print_stdout, reason = "the report is the command's output")]
            {
                print!("{summary}");
            }
            match reload_pid.map(reload) {
                Some(Err(e)) => {
                    eprintln!("natt-monitor: error: {e}");
                    ExitCode::FAILURE
                }
                _ => ExitCode::SUCCESS,
            }
        }
        Err(e) => {
            eprintln!("natt-monitor: error: {e}");
            ExitCode::from(config::EXIT_CONFIG)
        }
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(&e),
    };
    match cli.command {
        Command::Check(args) if args.config.is_some() => {
            check_config(&args.config.unwrap_or_default(), args.reload)
        }
        Command::Check(args) => {
            let mut report =
                check::run_checks(args.cgroup.as_deref(), &args.proc_path, &args.sys_path);
            check::pinned(
                &mut report,
                &args.pin_path,
                natt_monitor::cgroup::cgroup2_mount_in(&args.proc_path).as_deref(),
            );
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
        Command::Detach(args) => {
            let dir = match args.pin_dir() {
                Ok(Some(dir)) => dir,
                Ok(None) => {
                    #[expect(clippy::print_stdout, reason = "the report is the command's output")]
                    {
                        println!(
                            "nothing to detach: the configuration sets pin_path = \"none\", so the verifier goes with its process"
                        );
                    }
                    return ExitCode::SUCCESS;
                }
                Err(e) => {
                    eprintln!("natt-monitor: error: {e}");
                    return ExitCode::from(config::EXIT_CONFIG);
                }
            };
            // Refused while a daemon runs with these pins: it would exit, be restarted by its
            // supervisor, and attach again.
            let _claim = match natt_monitor::pin::claim(&dir) {
                Ok(claim) => claim,
                Err(e) => {
                    eprintln!("natt-monitor: error: {}", render_error(&e.into()));
                    return ExitCode::FAILURE;
                }
            };
            match natt_monitor::pin::detach(&dir) {
                Ok(removed) => {
                    #[expect(clippy::print_stdout, reason = "the report is the command's output")]
                    {
                        print!("{}", removed.render(&dir));
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("natt-monitor: error: {}", render_error(&e.into()));
                    ExitCode::FAILURE
                }
            }
        }
        Command::Report(args) => match natt_monitor::report::report(&args.files) {
            Ok(text) => {
                #[expect(clippy::print_stdout, reason = "the report is the command's output")]
                {
                    print!("{text}");
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("natt-monitor: error: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Generate(args) => match natt_monitor::cli::generate(&args.out) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!(
                    "natt-monitor: error: writing into {}: {e}",
                    args.out.display()
                );
                ExitCode::FAILURE
            }
        },
        Command::Run(args) => match run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("natt-monitor: error: {}", render_error(&e));
                // A configuration error stays one until someone edits the configuration:
                // systemd's RestartPreventExitStatus= keeps it from restarting in a loop.
                if is_config_error(&e) {
                    ExitCode::from(config::EXIT_CONFIG)
                } else {
                    ExitCode::FAILURE
                }
            }
        },
    }
}

/// Prints clap's error (or `--help`, `--version`) and returns its exit status:
/// `config::EXIT_USAGE` for an error. When the value at fault came from the environment (a
/// drop-in's `Environment=`), says which variable, since clap names only the flag.
fn usage_error(e: &clap::Error) -> ExitCode {
    use clap::error::{ContextKind, ContextValue};
    let _ = e.print();
    if !e.use_stderr() {
        return ExitCode::SUCCESS;
    }
    if let Some(ContextValue::String(arg)) = e.get(ContextKind::InvalidArg) {
        let long = arg
            .split_whitespace()
            .next()
            .and_then(|f| f.strip_prefix("--"));
        let cmd = Cli::command();
        let from_env = cmd
            .get_subcommands()
            .flat_map(clap::Command::get_arguments)
            .filter(|a| a.get_long() == long)
            .filter_map(clap::Arg::get_env)
            .find_map(|var| Some((var.to_owned(), std::env::var_os(var)?)));
        let on_command_line = std::env::args().any(|a| {
            long.is_some_and(|l| {
                a.strip_prefix("--")
                    .is_some_and(|a| a.split('=').next() == Some(l))
            })
        });
        if let Some((var, value)) = from_env
            && !on_command_line
        {
            eprintln!(
                "natt-monitor: the value came from the environment: {}={}",
                var.to_string_lossy(),
                value.to_string_lossy()
            );
        }
    }
    ExitCode::from(config::EXIT_USAGE)
}

/// True for errors in the flags, environment or file (as opposed to the host or the kernel).
fn is_config_error(e: &anyhow::Error) -> bool {
    use natt_monitor::{daemon::DaemonError as D, ebpf::EbpfFailure, pin::PinError};
    e.downcast_ref::<config::ConfigError>().is_some()
        || matches!(
            e.downcast_ref::<D>(),
            Some(
                D::Peers(_)
                    | D::MapMemory { .. }
                    | D::Ebpf(EbpfFailure::NotCgroup2 { .. })
                    | D::Pin(PinError::NotBpffs { .. })
            )
        )
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

fn init_logging(format: LogFormat, level: LogLevel) {
    let filter = EnvFilter::try_from_env("NATT_MONITOR_LOG")
        .unwrap_or_else(|_| EnvFilter::new(level.as_str()));
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
    init_logging(settings.log_format, settings.log_level);
    let reload_args = args.clone();
    let config = RunConfig {
        settings,
        reload: Some(Box::new(move || config::resolve(&reload_args))),
        listener: None,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async {
        // Handlers first: a SIGTERM during start-up then ends the daemon cleanly once it is up,
        // instead of killing it by the default action.
        let stop = shutdown_signal();
        daemon::run(config, stop).await
    })?;
    Ok(())
}

/// Installs the SIGTERM and SIGINT handlers now; the future resolves on either signal.
fn shutdown_signal() -> impl Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let handlers = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    async move {
        let (Ok(mut term), Ok(mut int)) = handlers else {
            // Without handlers the default action (terminate) still applies; an unpinned
            // bpf_link is released with the process, a pinned one stays.
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
}
