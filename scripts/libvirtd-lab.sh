#!/bin/sh
# Runs Debian's libvirtd (system mode, as root, in the foreground) for the lab, with all of its
# state in DIR: scripts/libvirtd-lab.sh DIR. Clients connect to
#   qemu:///system?socket=DIR/sock/libvirt-sock
# SIGTERM stops it; the guests it started keep running (libvirt's design): destroy them first.
#
# Why this way: as root libvirtd has its directories compiled in (/etc/libvirt, /run/libvirt,
# /var/lib/libvirt, /var/cache/libvirt, /var/log/libvirt) and only its client socket can move,
# so it runs in a private mount namespace where DIR's directories are mounted over them. There:
#  - /etc/passwd and /etc/group are copies with a libvirt-qemu user and group: libvirtd 9.0
#    looks that user up before it reads qemu.conf's `user = "root"` (Debian's
#    libvirt-daemon-system creates it; that package would bring systemd upgrades to this host);
#  - /dev is a small tmpfs without kvm: this lab's /dev/kvm must not be used (it crashes guests),
#    and libvirt probes it even for TCG domains (hiding it behind a read-only /dev/null makes
#    libvirt re-probe QEMU on every call);
#  - qemu.conf turns off what the lab cannot have or must not touch: cgroups (QEMU stays in the
#    caller's), the security driver and file ownership changes (no xattrs on the lab images),
#    QEMU's private mount namespace (it must see the test's sockets), virtlogd.
# QEMU 11 is the default emulator (DIR/bin first in PATH); domains name it in <emulator> anyway.
set -eu
DIR=${1:?usage: libvirtd-lab.sh DIR}
TOP=$(cd "$(dirname "$0")/.." && pwd)
LAB=${BALLOON_LAB_DIR:-$TOP/.lab}
[ -x /usr/sbin/libvirtd ] || { echo "libvirtd is missing: run 'scripts/lab.sh host'" >&2; exit 1; }
[ -x "$LAB/bin/qemu-system-x86_64" ] || { echo "QEMU 11 is missing: run 'scripts/lab.sh qemu'" >&2; exit 1; }
R=$DIR/root
mkdir -p "$R/etc" "$R/run" "$R/lib" "$R/cache" "$R/log" "$R/dev" "$DIR/sock" "$DIR/bin"
cp /etc/libvirt/libvirt.conf "$R/etc/" 2>/dev/null || :
cat >"$R/etc/libvirtd.conf" <<EOF
# The lab's libvirtd: its sockets in $DIR/sock, root only, no TCP.
unix_sock_dir = "$DIR/sock"
unix_sock_rw_perms = "0700"
unix_sock_ro_perms = "0700"
unix_sock_admin_perms = "0700"
auth_unix_rw = "none"
auth_unix_ro = "none"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
EOF
cat >"$R/etc/qemu.conf" <<'EOF'
# The lab's QEMU driver: QEMU as root, no cgroups, no security driver, no ownership changes, no
# private mount namespace, QEMU's stderr straight to its log file (no virtlogd).
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "file"
EOF
cp /etc/passwd "$R/passwd"
cp /etc/group "$R/group"
grep -q '^libvirt-qemu:' "$R/passwd" || echo 'libvirt-qemu:x:64055:64055:libvirt qemu (lab namespace only):/nonexistent:/usr/sbin/nologin' >>"$R/passwd"
grep -q '^libvirt-qemu:' "$R/group" || echo 'libvirt-qemu:x:64055:' >>"$R/group"
ln -sf "$LAB/bin/qemu-system-x86_64" "$DIR/bin/qemu-system-x86_64"
# The mount points (empty on the host).
mkdir -p /etc/libvirt /run/libvirt /var/lib/libvirt /var/cache/libvirt /var/log/libvirt
export PATH="$DIR/bin:$PATH"
exec unshare --mount --propagation private sh -c '
  set -eu
  R=$1/root
  mount --bind "$R/etc" /etc/libvirt
  mount --bind "$R/run" /run/libvirt
  mount --bind "$R/lib" /var/lib/libvirt
  mount --bind "$R/cache" /var/cache/libvirt
  mount --bind "$R/log" /var/log/libvirt
  mount --bind "$R/passwd" /etc/passwd
  mount --bind "$R/group" /etc/group
  mount -t tmpfs -o mode=0755,nosuid labdev "$R/dev"
  for n in null zero full random urandom tty ptmx; do
    : >"$R/dev/$n"
    mount --bind "/dev/$n" "$R/dev/$n"
  done
  mkdir "$R/dev/pts" "$R/dev/shm"
  mount --bind /dev/pts "$R/dev/pts"
  mount --bind /dev/shm "$R/dev/shm"
  ln -s /proc/self/fd "$R/dev/fd"
  ln -s /proc/self/fd/0 "$R/dev/stdin"
  ln -s /proc/self/fd/1 "$R/dev/stdout"
  ln -s /proc/self/fd/2 "$R/dev/stderr"
  mount --move "$R/dev" /dev
  exec /usr/sbin/libvirtd -f /etc/libvirt/libvirtd.conf -p /run/libvirt/libvirtd.pid
' libvirtd-lab "$DIR"
