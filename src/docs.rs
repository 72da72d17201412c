//! Man pages and shell completions, generated from the command-line definitions so they
//! never drift from `--help`: `s3mediafs generate-docs DIR` writes them for packaging.

use std::io;
use std::path::Path;

use clap::CommandFactory;
use clap_complete::Shell;

use crate::config::Cli;

/// What the fstab form of the mount helper looks like, for its man page.
const FSTAB_HELP: &str = "\
mount(8) runs this helper for `mount -t s3mediafs` and for /etc/fstab lines of type \
fuse.s3mediafs (through mount.fuse3):

  media-bucket:synapse/  /var/lib/matrix-synapse/media  fuse.s3mediafs  \
_netdev,nofail,allow_other,uid=matrix-synapse,gid=matrix-synapse,\
credentials=/etc/s3mediafs/media.credentials,endpoint=https://s3.example.com,\
cache_dir=/var/cache/s3mediafs/media  0  0

Every option below can be given in -o as name=value (dashes may be written as \
underscores), and flags by their name alone (allow_other, read_only or ro). Options that \
mount(8) and systemd pass for their own use (_netdev, nofail, noauto, x-systemd.*, rw, \
defaults) are accepted and ignored. The helper mounts in the background and returns once \
the mount answers.";

/// Writes `man/man1/s3mediafs*.1`, `man/man8/mount.s3mediafs.8` and
/// `completions/{s3mediafs.bash,_s3mediafs,s3mediafs.fish}` under `dir`.
pub fn generate(dir: &Path) -> io::Result<()> {
    let man1 = dir.join("man/man1");
    let man8 = dir.join("man/man8");
    let completions = dir.join("completions");
    for d in [&man1, &man8, &completions] {
        std::fs::create_dir_all(d)?;
    }
    let cmd = Cli::command();
    write_man(&man1.join("s3mediafs.1"), cmd.clone(), "1")?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("s3mediafs-{}", sub.get_name());
        let page = sub
            .clone()
            .name(name.clone())
            .bin_name(format!("s3mediafs {}", sub.get_name()));
        write_man(&man1.join(format!("{name}.1")), page, "1")?;
    }
    let mount = cmd
        .find_subcommand("mount")
        .expect("the mount subcommand")
        .clone()
        .name("mount.s3mediafs")
        .bin_name("mount.s3mediafs")
        .about("Mount an S3 bucket from /etc/fstab or mount(8)")
        .long_about(FSTAB_HELP);
    write_man(&man8.join("mount.s3mediafs.8"), mount, "8")?;
    for (shell, file) in [
        (Shell::Bash, "s3mediafs.bash"),
        (Shell::Zsh, "_s3mediafs"),
        (Shell::Fish, "s3mediafs.fish"),
    ] {
        let mut out = std::fs::File::create(completions.join(file))?;
        clap_complete::generate(shell, &mut Cli::command(), "s3mediafs", &mut out);
    }
    Ok(())
}

fn write_man(path: &Path, cmd: clap::Command, section: &'static str) -> io::Result<()> {
    let mut out = std::fs::File::create(path)?;
    clap_mangen::Man::new(cmd).section(section).render(&mut out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn man_pages_and_completions_cover_every_command() {
        let dir = tempfile::tempdir().unwrap();
        super::generate(dir.path()).unwrap();
        let page = |p: &str| std::fs::read_to_string(dir.path().join(p)).unwrap();
        assert!(page("man/man1/s3mediafs-mount.1").contains("cache\\-size"));
        assert!(page("man/man8/mount.s3mediafs.8").contains("fstab"));
        assert!(page("man/man1/s3mediafs-import.1").contains("SRC_DIR"));
        assert!(page("completions/s3mediafs.bash").contains("--metadata-ttl"));
        assert!(page("completions/_s3mediafs").contains("--write-mode"));
        assert!(page("completions/s3mediafs.fish").contains("cache-dir"));
    }
}
