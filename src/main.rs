//! The `s3mediafs` command: `s3mediafs mount ...`, the mount-helper form
//! `s3mediafs BUCKET[:PREFIX] MOUNTPOINT -o ...` (also run as `mount.s3mediafs`),
//! `s3mediafs import ...` and `s3mediafs status ...`.

use std::io::IsTerminal;
use std::process::ExitCode;

use s3mediafs::config::{self, Config, Invocation};
use s3mediafs::{import, mount, status};

fn main() -> ExitCode {
    let invocation = match config::parse_args(std::env::args_os().collect()) {
        Ok(a) => a,
        Err(e) => e.exit(),
    };
    let result = match invocation {
        Invocation::Mount(mut args) => {
            if std::env::var_os(mount::DAEMON_ENV).is_some() {
                args.foreground = true;
                args.background = false;
            }
            match Config::from_args(*args) {
                Ok(cfg) => {
                    init_logging(&cfg.log_level);
                    mount::run(cfg).map(|()| ExitCode::SUCCESS)
                }
                Err(msg) => Err(msg),
            }
        }
        Invocation::Import(args) => {
            init_logging("warn");
            import::run(*args)
        }
        Invocation::Status(args) => status::run(args),
        Invocation::GenerateDocs(dir) => s3mediafs::docs::generate(&dir)
            .map(|()| ExitCode::SUCCESS)
            .map_err(|e| {
                format!(
                    "cannot write the man pages and completions into {}: {e}",
                    dir.display()
                )
            }),
    };
    match result {
        Ok(code) => code,
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
