#!/usr/bin/env bash
# Builds a Debian package of s3mediafs: the binary (stripped; its debug info split into
# s3mediafs.debug beside the package), /sbin/mount.s3mediafs, man pages and bash/zsh/fish
# completions generated from the command-line definitions, the systemd units (not enabled),
# /etc/s3mediafs (mode 0700) with example settings, and the README. Install it with
# `dpkg -i` (or `apt install ./s3mediafs_*.deb`, which also installs fuse3); removing it
# leaves /etc/s3mediafs's credentials and the cache directories alone.
#
#   scripts/package.sh                  build a release binary and package it
#   scripts/package.sh --binary FILE    package FILE instead of building
#   scripts/package.sh --out DIR        where the .deb goes [target/debian]
set -euo pipefail
cd "$(dirname "$0")/.."

binary="" out=target/debian
while [ $# -gt 0 ]; do
    case "$1" in
        --binary) binary="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "package.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
for tool in dpkg-deb objcopy gzip; do
    command -v "$tool" >/dev/null || {
        echo "package.sh: $tool is missing; install Debian's dpkg, binutils and gzip" >&2; exit 1; }
done
if [ -z "$binary" ]; then
    echo "package.sh: building the release binary" >&2
    cargo build --release --quiet
    binary=target/release/s3mediafs
fi
[ -x "$binary" ] || { echo "package.sh: $binary is not an executable" >&2; exit 1; }

version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)"
arch="$(dpkg --print-architecture)"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT
chmod 755 "$root"

# The binary, stripped, with its debug info kept apart for those who need backtraces.
install -D -m 755 "$binary" "$root/usr/bin/s3mediafs"
objcopy --only-keep-debug "$root/usr/bin/s3mediafs" "$out/s3mediafs.debug"
objcopy --strip-debug --strip-unneeded \
    --add-gnu-debuglink="$out/s3mediafs.debug" "$root/usr/bin/s3mediafs"
# mount(8) runs /sbin/mount.TYPE for `mount -t s3mediafs`; mount.fuse3 finds `s3mediafs`
# on PATH for `-t fuse.s3mediafs` and /etc/fstab.
install -d "$root/sbin"
ln -s /usr/bin/s3mediafs "$root/sbin/mount.s3mediafs"

docs="$(mktemp -d)"
"$root/usr/bin/s3mediafs" generate-docs "$docs"
for section in 1 8; do
    install -d "$root/usr/share/man/man$section"
    for page in "$docs/man/man$section"/*; do
        gzip -9n < "$page" > "$root/usr/share/man/man$section/$(basename "$page").gz"
    done
done
install -D -m 644 "$docs/completions/s3mediafs.bash" "$root/usr/share/bash-completion/completions/s3mediafs"
install -D -m 644 "$docs/completions/_s3mediafs" "$root/usr/share/zsh/vendor-completions/_s3mediafs"
install -D -m 644 "$docs/completions/s3mediafs.fish" "$root/usr/share/fish/vendor_completions.d/s3mediafs.fish"
rm -rf "$docs"

units="$root/lib/systemd/system"
install -d "$units" "$root/usr/share/doc/s3mediafs/examples/matrix-synapse.service.d"
install -m 644 systemd/s3mediafs@.service "$units/"
sed -i 's|/usr/local/bin/s3mediafs|/usr/bin/s3mediafs|g' "$units/s3mediafs@.service"
# The mount unit and Synapse's drop-in name one site's paths: examples to copy and edit.
for u in systemd/*.mount; do
    sed 's|/usr/local/bin/s3mediafs|/usr/bin/s3mediafs|g' "$u" > "$root/usr/share/doc/s3mediafs/examples/$(basename "$u")"
done
install -m 644 systemd/matrix-synapse.service.d/s3mediafs.conf \
    "$root/usr/share/doc/s3mediafs/examples/matrix-synapse.service.d/"
install -m 644 README.md "$root/usr/share/doc/s3mediafs/README.md"
install -m 644 systemd/README.md "$root/usr/share/doc/s3mediafs/README.systemd.md"
gzip -9n "$root/usr/share/doc/s3mediafs/README.md" "$root/usr/share/doc/s3mediafs/README.systemd.md"
cat > "$root/usr/share/doc/s3mediafs/copyright" <<'COPYRIGHT'
s3mediafs: Mount an S3 bucket as a directory, built to hold a Matrix homeserver's media store.
License: Apache-2.0 (see /usr/share/common-licenses/Apache-2.0)
COPYRIGHT

install -d -m 700 "$root/etc/s3mediafs"
install -m 600 systemd/s3mediafs.env.example systemd/credentials.example "$root/etc/s3mediafs/"

install -d "$root/DEBIAN"
size_kib="$(du -sk --exclude=DEBIAN "$root" | cut -f1)"
cat > "$root/DEBIAN/control" <<CONTROL
Package: s3mediafs
Version: $version
Architecture: $arch
Maintainer: s3mediafs maintainers <s3mediafs@example.org>
Installed-Size: $size_kib
Depends: fuse3, libc6
Section: admin
Priority: optional
Homepage: https://github.com/s3mediafs/s3mediafs
Description: mount an S3 bucket as a directory, for a Matrix homeserver's media store
 s3mediafs mounts an S3 or S3-compatible bucket (AWS S3, Garage, MinIO, Ceph RGW,
 Backblaze B2, Wasabi, R2) as an ordinary directory: one file is one object, prefixes are
 directories. A write-back cache on local disk makes close() fast and crash-safe, and
 readahead streams large media. Synapse keeps its media store on it unchanged.
CONTROL
printf '%s\n' /etc/s3mediafs/s3mediafs.env.example /etc/s3mediafs/credentials.example \
    > "$root/DEBIAN/conffiles"
cat > "$root/DEBIAN/postinst" <<'POSTINST'
#!/bin/sh
set -e
# Settings and credentials under /etc/s3mediafs hold secrets.
chmod 700 /etc/s3mediafs
if [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi
POSTINST
cat > "$root/DEBIAN/postrm" <<'POSTRM'
#!/bin/sh
set -e
# The credentials an operator put in /etc/s3mediafs and the cache directories (with files
# still waiting for upload) are never removed, not even by a purge.
if [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi
POSTRM
chmod 755 "$root/DEBIAN/postinst" "$root/DEBIAN/postrm"

deb="$out/s3mediafs_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
echo "package.sh: wrote $deb ($(du -h "$deb" | cut -f1))" >&2
