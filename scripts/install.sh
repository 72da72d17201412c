#!/usr/bin/env bash
# Installs s3mediafs for mounting at boot: the binary, the mount helper links that make
# `mount -t fuse.s3mediafs` and /etc/fstab work, the service unit (not enabled), the mount
# unit and Synapse drop-in as examples, and /etc/s3mediafs (mode 0700) with example
# settings. Safe to run again.
#
#   scripts/install.sh                  build a release binary and install under /usr/local
#   scripts/install.sh --binary FILE    install FILE instead of building
#   scripts/install.sh --prefix DIR     binary in DIR/bin (units point there), examples in
#                                       DIR/share/doc/s3mediafs/examples [/usr/local]
#   scripts/install.sh --root DIR       install config, units and links under DIR [/]
set -euo pipefail
cd "$(dirname "$0")/.."

binary="" prefix=/usr/local root=/
while [ $# -gt 0 ]; do
    case "$1" in
        --binary) binary="$2"; shift 2 ;;
        --prefix) prefix="$2"; shift 2 ;;
        --root) root="$2"; shift 2 ;;
        -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "install.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
root="${root%/}"

scripts/install-deps.sh fuse
if [ -z "$binary" ]; then
    echo "install.sh: building the release binary" >&2
    cargo build --release --quiet
    binary=target/release/s3mediafs
fi
[ -x "$binary" ] || { echo "install.sh: $binary is not an executable" >&2; exit 1; }

bin="$prefix/bin/s3mediafs"
install -D -m 755 "$binary" "$bin"
# mount(8) runs /sbin/mount.TYPE for `mount -t s3mediafs`; mount.fuse3 finds `s3mediafs`
# on PATH for `-t fuse.s3mediafs`.
install -d "$root/sbin" "$root/usr/local/bin"
ln -sfn "$bin" "$root/sbin/mount.s3mediafs"
if [ "$bin" != "$root/usr/local/bin/s3mediafs" ]; then
    ln -sfn "$bin" "$root/usr/local/bin/s3mediafs"
fi

# A unit into DIR, naming the installed binary.
install_unit() { # UNIT DIR
    sed "s|/usr/local/bin/s3mediafs|$bin|g" "$1" > "$2/$(basename "$1")"
    chmod 644 "$2/$(basename "$1")"
}
units="$root/etc/systemd/system"
install -d "$units"
for u in systemd/*.service; do install_unit "$u" "$units"; done
# The mount unit and Synapse's drop-in name one site's paths and take effect once in
# /etc/systemd/system: examples to copy and edit, as the package ships them.
examples="$prefix/share/doc/s3mediafs/examples"
install -d "$examples/matrix-synapse.service.d"
for u in systemd/*.mount; do install_unit "$u" "$examples"; done
install -m 644 systemd/matrix-synapse.service.d/s3mediafs.conf "$examples/matrix-synapse.service.d/"

install -d -m 700 "$root/etc/s3mediafs"
install -m 600 systemd/s3mediafs.env.example systemd/credentials.example "$root/etc/s3mediafs/"
install -d -m 700 "$root/var/cache/s3mediafs"

echo "installed $bin, $root/sbin/mount.s3mediafs, s3mediafs@.service in $units, and the mount unit and Synapse drop-in to copy from $examples" >&2
if [ "$root" = "" ] && command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
fi
