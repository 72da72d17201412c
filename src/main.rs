//! The `s3mediafs` command: `s3mediafs mount ...`, or the mount-helper form
//! `s3mediafs BUCKET[:PREFIX] MOUNTPOINT -o ...`.

use std::io::IsTerminal;
use std::process::ExitCode;

use s3mediafs::config::{self, Config};
use s3mediafs::mount;

fn main() -> ExitCode {
    let mut args = match config::parse_args(std::env::args_os().collect()) {
        Ok(a) => a,
        Err(e) => e.exit(),
    };
    if std::env::var_os(mount::DAEMON_ENV).is_some() {
        args.foreground = true;
        args.background = false;
    }
    let cfg = match Config::from_args(args) {
        Ok(c) => c,
        Err(msg) => {
            eprintln!("s3mediafs: {msg}");
            return ExitCode::from(1);
        }
    };
    init_logging(&cfg.log_level);
    match mount::run(cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("s3mediafs: {msg}");
            ExitCode::from(1)
        }
    }
}

fn init_logging(level: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("s3mediafs={level},fuser::session=error,warn")));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
