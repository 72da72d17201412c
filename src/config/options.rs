//! The command line as parsed: the mount-helper form (`s3mediafs SRC MNT -o ...`, what
//! mount(8), mount.fuse3 and /etc/fstab run) becomes `s3mediafs mount SRC MNT --background
//! ...`, and each `-o` option becomes its flag, so both forms share the flags' rules.
//! Options that mount(8) and systemd pass for their own use are accepted and ignored; any
//! other unknown option is an error.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::{CommandFactory, Parser};

use super::flags::{Cli, Command, ImportArgs, MountArgs, StatusArgs};

/// What the command line asks for.
#[derive(Debug)]
pub enum Invocation {
    Mount(Box<MountArgs>),
    Import(Box<ImportArgs>),
    Status(StatusArgs),
    GenerateDocs(PathBuf),
}

/// Mount options that belong to mount(8), systemd or the kernel's generic set; they mean
/// nothing to the bucket and are accepted silently.
const GENERIC_OPTIONS: &[&str] = &[
    "_netdev",
    "nofail",
    "auto",
    "noauto",
    "user",
    "nouser",
    "users",
    "owner",
    "group",
    "defaults",
    "rw",
    "dev",
    "nodev",
    "suid",
    "nosuid",
    "exec",
    "noexec",
    "async",
    "sync",
    "atime",
    "noatime",
    "relatime",
    "norelatime",
    "strictatime",
    "diratime",
    "nodiratime",
    "lazytime",
    "nolazytime",
    "dirsync",
    "loop",
    "comment",
];

fn is_generic_option(name: &str) -> bool {
    GENERIC_OPTIONS.contains(&name) || name.starts_with("x-") || name.starts_with("comment=")
}

/// The subcommands: a first argument that is none of them (and no flag) is a source, in
/// the mount-helper form.
const SUBCOMMANDS: &[&str] = &["mount", "import", "status", "generate-docs", "help"];

/// Drops the flags mount(8) gives its helpers (-s sloppy, -f fake, -n no mtab, -v verbose,
/// -N namespace, -t type), which mean nothing here.
fn strip_mount_helper_flags(args: Vec<OsString>) -> Vec<OsString> {
    let mut out = Vec::with_capacity(args.len());
    let mut it = args.into_iter();
    out.extend(it.next());
    while let Some(a) = it.next() {
        match a.to_string_lossy().as_ref() {
            "-s" | "-f" | "-n" | "-v" => {}
            "-N" | "-t" => {
                it.next();
            }
            _ => out.push(a),
        }
    }
    out
}

/// Parses the process arguments (see the module's doc).
pub fn parse_args(args: Vec<OsString>) -> Result<Invocation, clap::Error> {
    let mut args = args;
    // mount(8) runs `mount.s3mediafs SRC DIR [-sfnv] [-o OPTS]`; mount.fuse3 and fstab
    // run `s3mediafs SRC DIR -o OPTS`.
    let as_mount_helper = args.first().is_some_and(|a| {
        Path::new(a)
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("mount."))
    });
    if as_mount_helper {
        args = strip_mount_helper_flags(args);
    }
    let helper_form = as_mount_helper
        || args.get(1).is_some_and(|a| {
            let a = a.to_string_lossy();
            !a.starts_with('-') && !SUBCOMMANDS.contains(&a.as_ref())
        });
    if helper_form {
        args.insert(1, "mount".into());
    }
    let first = match Cli::try_parse_from(&args)?.command {
        Command::Mount(m) => m,
        Command::Import(i) => return Ok(Invocation::Import(i)),
        Command::Status(s) => return Ok(Invocation::Status(s)),
        Command::GenerateDocs { dir } => return Ok(Invocation::GenerateDocs(dir)),
    };
    if first.options.is_empty() && !helper_form {
        return Ok(Invocation::Mount(with_default_mode(first, false)));
    }
    // Re-parse with the -o options spelled as flags, so they get the same validation.
    let mut flags: Vec<OsString> = Vec::new();
    let mut skip_next = false;
    for (i, a) in args.iter().enumerate() {
        if skip_next {
            skip_next = false;
            continue;
        }
        let s = a.to_string_lossy();
        if s == "-o" {
            skip_next = true;
            continue;
        }
        if i > 0 && s.starts_with("-o") && s.len() > 2 {
            continue;
        }
        flags.push(a.clone());
    }
    let known = known_long_flags();
    for opt in first.options.iter().flat_map(|o| o.split(',')) {
        let opt = opt.trim();
        if opt.is_empty() || is_generic_option(opt.split('=').next().unwrap_or(opt)) {
            continue;
        }
        let (name, value) = match opt.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (opt, None),
        };
        let flag = match name {
            "ro" => "read-only".to_string(),
            "nonempty" => "nonempty".to_string(),
            n => n.replace('_', "-"),
        };
        let Some(takes_value) = known.iter().find(|(f, _)| *f == flag).map(|(_, v)| *v) else {
            return Err(Cli::command().error(
                clap::error::ErrorKind::UnknownArgument,
                format!(
                    "unknown mount option '{name}'; see `s3mediafs mount --help` for the options"
                ),
            ));
        };
        match (takes_value, value) {
            (true, Some(v)) => {
                flags.push(format!("--{flag}").into());
                flags.push(v.into());
            }
            (true, None) => {
                return Err(Cli::command().error(
                    clap::error::ErrorKind::InvalidValue,
                    format!("mount option '{name}' needs a value: -o {name}=VALUE"),
                ))
            }
            (false, None) => flags.push(format!("--{flag}").into()),
            (false, Some(_)) => {
                return Err(Cli::command().error(
                    clap::error::ErrorKind::InvalidValue,
                    format!("mount option '{name}' takes no value"),
                ))
            }
        }
    }
    match Cli::try_parse_from(&flags)?.command {
        Command::Mount(m) => Ok(Invocation::Mount(with_default_mode(m, helper_form))),
        _ => unreachable!("the flags were built for `mount`"),
    }
}

fn with_default_mode(mut a: Box<MountArgs>, helper_form: bool) -> Box<MountArgs> {
    if !a.foreground && !a.background {
        a.background = helper_form;
        a.foreground = !helper_form;
    }
    a.foreground = !a.background;
    a
}

/// Long flags of `mount`, with whether each takes a value.
fn known_long_flags() -> Vec<(String, bool)> {
    let cmd = Cli::command();
    let mount = cmd
        .find_subcommand("mount")
        .expect("mount subcommand")
        .clone();
    mount
        .get_arguments()
        .filter_map(|a| {
            let long = a.get_long()?.to_string();
            let takes = a.get_action().takes_values();
            Some((long, takes))
        })
        .filter(|(l, _)| l != "help" && l != "version")
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    fn parse_mount(v: &[&str]) -> Result<MountArgs, clap::Error> {
        match parse_args(args(v))? {
            Invocation::Mount(m) => Ok(*m),
            other => panic!("not a mount: {other:?}"),
        }
    }

    #[test]
    fn helper_form_maps_options_to_flags() {
        let a = parse_mount(&[
            "s3mediafs", "media:syn/", "/mnt", "-o",
            "rw,_netdev,nofail,x-systemd.automount,allow_other,uid=115,file_mode=0640,ro,endpoint=http://127.0.0.1:3900",
        ])
        .unwrap();
        assert_eq!(a.source, "media:syn/");
        assert!(a.allow_other && a.read_only && a.background && !a.foreground);
        assert_eq!(a.uid, Some(115));
        assert_eq!(a.file_mode, 0o640);
        assert_eq!(a.store.endpoint.as_deref(), Some("http://127.0.0.1:3900"));
    }

    #[test]
    fn mount_helper_name_takes_mounts_flags() {
        let a = parse_mount(&[
            "/sbin/mount.s3mediafs",
            "media",
            "/mnt",
            "-n",
            "-v",
            "-o",
            "rw,uid=5",
            "-t",
            "s3mediafs",
        ])
        .unwrap();
        assert_eq!(a.source, "media");
        assert_eq!(a.uid, Some(5));
        assert!(a.background);
    }

    #[test]
    fn subcommands_parse() {
        match parse_args(args(&[
            "s3mediafs",
            "import",
            "/src",
            "media:p/",
            "--verify",
            "-j",
            "4",
        ]))
        .unwrap()
        {
            Invocation::Import(i) => {
                assert_eq!(i.target, "media:p/");
                assert!(i.verify && !i.dry_run);
                assert_eq!(i.jobs, 4);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_args(args(&["s3mediafs", "status", "/mnt"])).unwrap(),
            Invocation::Status(_)
        ));
    }

    #[test]
    fn mount_subcommand_runs_in_the_foreground() {
        let a = parse_mount(&["s3mediafs", "mount", "b", "/mnt"]).unwrap();
        assert!(a.foreground && !a.background);
        let a = parse_mount(&["s3mediafs", "mount", "b", "/mnt", "--background"]).unwrap();
        assert!(!a.foreground && a.background);
    }

    #[test]
    fn unknown_and_malformed_options_are_errors() {
        let e = parse_mount(&["s3mediafs", "b", "/mnt", "-o", "bogus"]).unwrap_err();
        assert!(
            e.to_string().contains("unknown mount option 'bogus'"),
            "{e}"
        );
        let e = parse_mount(&["s3mediafs", "b", "/mnt", "-o", "uid"]).unwrap_err();
        assert!(e.to_string().contains("needs a value"), "{e}");
        let e = parse_mount(&["s3mediafs", "b", "/mnt", "-o", "metadata_ttl=soon"]).unwrap_err();
        assert!(e.to_string().contains("not a duration"), "{e}");
    }
}
