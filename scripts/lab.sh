#!/usr/bin/env bash
# Provisioning for the lab: host packages, QEMU 11 from a separate Debian trixie rootfs, and the
# guest images. Every step is idempotent and cached under .lab/ (git-ignored), prints its time,
# and fails with a message that names what is missing.
#
#   scripts/lab.sh host       Debian packages the lab needs on this host (apt-get)
#   scripts/lab.sh qemu       trixie rootfs with QEMU 11 (trixie-backports) + .lab/bin/qemu-system-x86_64
#   scripts/lab.sh kernel     the trixie cloud kernel, busybox-static and the needed modules
#   scripts/lab.sh guest-bins the project's static guest binaries (cargo, +crt-static)
#   scripts/lab.sh mini       guest image "mini": kernel + busybox initramfs + agent + guest binaries
#   scripts/lab.sh debian     guest image "debian": trixie + systemd as an ext4 image (on demand)
#   scripts/lab.sh vsock      vhost-device-vsock (crates.io) for the guest app's vsock tests
#   scripts/lab.sh all        host qemu kernel vsock guest-bins mini
#
# Why a separate rootfs: QEMU 10 (bookworm-backports) cannot create the generic vhost-user device,
# and adding trixie to this host's apt sources half-upgrades the host. The rootfs's QEMU runs
# through the rootfs's own dynamic loader, so sockets and files keep their host paths.
set -euo pipefail

TOP=$(cd "$(dirname "$0")/.." && pwd)
LAB=${BALLOON_LAB_DIR:-$TOP/.lab}
QEMU_ROOT=$LAB/qemu-root
KERNEL_DIR=$LAB/kernel
IMAGES=$LAB/images
TARGET_TRIPLE=x86_64-unknown-linux-gnu
GUEST_BIN_DIR=$TOP/target/$TARGET_TRIPLE/release
# The guest binaries every image carries: the test agent and the user-level balloon app.
GUEST_BINS=(balloon-test-agent balloon-guest)
# Kernel modules the guests need, decompressed (busybox insmod cannot read .ko.xz). Order matters:
# dependencies first.
GUEST_MODULES=(
    drivers/virtio/virtio_balloon.ko
    net/vmw_vsock/vsock.ko
    net/vmw_vsock/vmw_vsock_virtio_transport_common.ko
    net/vmw_vsock/vmw_vsock_virtio_transport.ko
    drivers/block/virtio_blk.ko
)

log() { printf '[lab] %s\n' "$*" >&2; }
die() { printf '[lab] ERROR: %s\n' "$*" >&2; exit 1; }

# step NAME FUNCTION: runs FUNCTION and prints how long it took.
step() {
    local name=$1 fn=$2 t0 t1
    t0=$(date +%s.%N)
    "$fn"
    t1=$(date +%s.%N)
    awk -v n="$name" -v a="$t0" -v b="$t1" 'BEGIN { printf "[lab] %-10s %6.1f s\n", n, b - a }' >&2
}

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else
        command -v sudo >/dev/null || die "need root (or sudo) for: $*"
        sudo "$@"
    fi
}

# The Debian mirror this host already uses, so the rootfs comes from the same place.
debian_mirror() {
    local uri=""
    if [ -f /etc/apt/sources.list.d/debian.sources ]; then
        uri=$(awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)
    fi
    if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
        uri=$(awk '/^deb / && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list)
    fi
    echo "${uri:-http://deb.debian.org/debian}"
}

do_host() {
    local want=(mmdebstrap cpio xz-utils zstd e2fsprogs) missing=()
    for p in "${want[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    if [ ${#missing[@]} -eq 0 ]; then return; fi
    log "installing host packages: ${missing[*]}"
    as_root apt-get update -qq || die "apt-get update failed: the Debian archive must be reachable"
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
        || die "apt-get install ${missing[*]} failed"
}

do_qemu() {
    local stamp=$QEMU_ROOT/.lab-complete
    if [ ! -f "$stamp" ]; then
        command -v mmdebstrap >/dev/null || die "mmdebstrap is missing: run 'scripts/lab.sh host'"
        local mirror tmp
        mirror=$(debian_mirror)
        tmp=$QEMU_ROOT.tmp
        as_root rm -rf "$tmp"
        log "building the trixie rootfs with QEMU 11 from $mirror (about 30 s)"
        # The customize hook runs inside mmdebstrap's chroot (with /proc mounted): QEMU comes from
        # trixie-backports, everything else from trixie. The kernel and busybox are downloaded as
        # .debs for the guest images (not installed).
        as_root mmdebstrap --quiet --variant=apt --include=ca-certificates \
            --customize-hook='chroot "$1" apt-get install -y -qq --no-install-recommends -t trixie-backports qemu-system-x86 qemu-system-data seabios >/dev/null' \
            --customize-hook='mkdir -p "$1/debs" && chroot "$1" sh -c "cd /debs && apt-get download -qq busybox-static linux-image-cloud-amd64 && apt-get download -qq \$(apt-cache depends linux-image-cloud-amd64 | awk \"/Depends: linux-image-[0-9]/ {print \\\$2; exit}\")"' \
            trixie "$tmp" \
            "deb $mirror trixie main" "deb $mirror trixie-backports main" \
            || die "mmdebstrap of trixie + QEMU failed (is $mirror reachable?)"
        as_root touch "$tmp/.lab-complete"
        as_root rm -rf "$QEMU_ROOT"
        as_root mv "$tmp" "$QEMU_ROOT"
    fi
    mkdir -p "$LAB/bin"
    # The wrapper runs the rootfs's QEMU through the rootfs's own loader and libraries.
    cat >"$LAB/bin/qemu-system-x86_64.tmp" <<EOF
#!/bin/sh
# Generated by scripts/lab.sh: QEMU 11 from the trixie rootfs in $QEMU_ROOT.
R=$QEMU_ROOT
export QEMU_MODULE_DIR=\$R/usr/lib/x86_64-linux-gnu/qemu
exec \$R/lib64/ld-linux-x86-64.so.2 --library-path \$R/lib/x86_64-linux-gnu:\$R/usr/lib/x86_64-linux-gnu \\
    \$R/usr/bin/qemu-system-x86_64 -L \$R/usr/share/qemu -L \$R/usr/share/seabios "\$@"
EOF
    chmod +x "$LAB/bin/qemu-system-x86_64.tmp"
    mv "$LAB/bin/qemu-system-x86_64.tmp" "$LAB/bin/qemu-system-x86_64"
    "$LAB/bin/qemu-system-x86_64" -device help 2>/dev/null | grep -q vhost-user-test-device-pci \
        || die "QEMU in $QEMU_ROOT lacks vhost-user-test-device-pci (need QEMU >= 10.2)"
}

do_kernel() {
    local stamp=$KERNEL_DIR/.lab-complete
    [ -f "$stamp" ] && return
    [ -d "$QEMU_ROOT/debs" ] || die "the trixie rootfs is missing: run 'scripts/lab.sh qemu'"
    local tmp=$KERNEL_DIR.tmp deb bb
    rm -rf "$tmp"
    mkdir -p "$tmp/x" "$tmp/modules"
    deb=$(ls "$QEMU_ROOT"/debs/linux-image-[0-9]*cloud-amd64*.deb 2>/dev/null | head -1)
    [ -n "$deb" ] || die "no linux-image-*-cloud-amd64 .deb in $QEMU_ROOT/debs"
    bb=$(ls "$QEMU_ROOT"/debs/busybox-static_*.deb 2>/dev/null | head -1)
    [ -n "$bb" ] || die "no busybox-static .deb in $QEMU_ROOT/debs"
    dpkg-deb -x "$deb" "$tmp/x"
    dpkg-deb -x "$bb" "$tmp/bb"
    local ver
    ver=$(ls "$tmp/x/usr/lib/modules" | head -1)
    cp "$tmp/x/boot/vmlinuz-$ver" "$tmp/vmlinuz"
    cp "$tmp/bb/usr/bin/busybox" "$tmp/busybox"
    echo "$ver" >"$tmp/version"
    for m in "${GUEST_MODULES[@]}"; do
        xz -dc "$tmp/x/usr/lib/modules/$ver/kernel/$m.xz" >"$tmp/modules/$(basename "$m")" \
            || die "module $m missing from $deb"
    done
    # The full module tree for the Debian image (depmod runs there).
    mv "$tmp/x/usr/lib/modules" "$tmp/modules-tree"
    rm -rf "$tmp/x" "$tmp/bb"
    touch "$tmp/.lab-complete"
    rm -rf "$KERNEL_DIR"
    mv "$tmp" "$KERNEL_DIR"
}

# vhost-device-vsock, the rust-vmm vhost-user vsock device with the hybrid-vsock convention
# (a guest connecting to host port P reaches the Unix socket UDS_PATH_P), from crates.io.
VSOCK_DEVICE_VERSION=0.3.0
do_vsock() {
    local bin=$LAB/tools/bin/vhost-device-vsock
    if [ -x "$bin" ] && "$bin" --version 2>/dev/null | grep -q "$VSOCK_DEVICE_VERSION"; then
        return
    fi
    command -v cargo >/dev/null || die "cargo is missing"
    log "installing vhost-device-vsock $VSOCK_DEVICE_VERSION from crates.io (about 30 s)"
    cargo install --quiet --locked vhost-device-vsock --version "$VSOCK_DEVICE_VERSION" \
        --root "$LAB/tools" || die "cargo install vhost-device-vsock failed (is crates.io reachable?)"
}

do_guest_bins() {
    command -v cargo >/dev/null || die "cargo is missing"
    # Static binaries for the guests: the gnu target with crt-static (no musl target here).
    # --target keeps these artifacts apart from the host build, and RUSTFLAGS then applies only
    # to the guest target, not to build scripts.
    (cd "$TOP" && RUSTFLAGS="-C target-feature=+crt-static" cargo build --quiet --release \
        --target "$TARGET_TRIPLE" -p balloon-tests -p guest-app \
        --bin balloon-test-agent --bin balloon-guest) || die "building the static guest binaries failed"
    for b in "${GUEST_BINS[@]}"; do
        [ -x "$GUEST_BIN_DIR/$b" ] || die "guest binary $GUEST_BIN_DIR/$b missing"
    done
}

# Installs busybox and the guest binaries into an initramfs staging directory.
stage_common() {
    local root=$1
    mkdir -p "$root"/{bin,sbin,proc,sys,dev,tmp,run,etc,lib/modules,usr/bin,mnt}
    cp "$KERNEL_DIR/busybox" "$root/bin/busybox"
    cp "$KERNEL_DIR"/modules/*.ko "$root/lib/modules/"
    for b in "${GUEST_BINS[@]}"; do cp "$GUEST_BIN_DIR/$b" "$root/usr/bin/$b"; done
}

pack_cpio() { (cd "$1" && find . -print0 | cpio --null -o -H newc --quiet) >"$2.tmp" && mv "$2.tmp" "$2"; }

do_mini() {
    [ -f "$KERNEL_DIR/.lab-complete" ] || die "the guest kernel is missing: run 'scripts/lab.sh kernel'"
    for b in "${GUEST_BINS[@]}"; do
        [ -x "$GUEST_BIN_DIR/$b" ] || die "guest binary $b missing: run 'scripts/lab.sh guest-bins'"
    done
    local out=$IMAGES/mini stage
    mkdir -p "$out"
    stage=$(mktemp -d)
    stage_common "$stage"
    cp "$TOP/tests/guest/mini-init" "$stage/init"
    chmod +x "$stage/init"
    pack_cpio "$stage" "$out/initrd.cpio"
    rm -rf "$stage"
    cp "$KERNEL_DIR/vmlinuz" "$out/vmlinuz"
}

do_debian() {
    [ -f "$KERNEL_DIR/.lab-complete" ] || die "the guest kernel is missing: run 'scripts/lab.sh kernel'"
    command -v mmdebstrap >/dev/null || die "mmdebstrap is missing: run 'scripts/lab.sh host'"
    local root=$LAB/debian-root out=$IMAGES/debian ver
    ver=$(cat "$KERNEL_DIR/version")
    if [ ! -f "$root/.lab-complete" ]; then
        local mirror
        mirror=$(debian_mirror)
        as_root rm -rf "$root.tmp"
        log "building the Debian trixie guest rootfs with systemd (about 15 s)"
        as_root mmdebstrap --quiet --variant=minbase --include=systemd-sysv,udev,kmod trixie "$root.tmp" \
            "deb $mirror trixie main" || die "mmdebstrap of the Debian guest failed"
        as_root mkdir -p "$root.tmp/usr/lib/modules"
        as_root cp -a "$KERNEL_DIR/modules-tree/$ver" "$root.tmp/usr/lib/modules/"
        as_root chroot "$root.tmp" depmod "$ver"
        as_root touch "$root.tmp/.lab-complete"
        as_root rm -rf "$root"
        as_root mv "$root.tmp" "$root"
    fi
    # The project's files change with the code, so they are copied in on every build; the ext4
    # image is made from the directory without loop mounts (mkfs.ext4 -d), in about a second.
    for b in "${GUEST_BINS[@]}"; do as_root install -m 0755 "$GUEST_BIN_DIR/$b" "$root/usr/local/bin/$b"; done
    as_root cp -r "$TOP/tests/guest/debian/." "$root/"
    as_root chroot "$root" systemctl enable balloon-test-agent.service >/dev/null 2>&1
    as_root install -m 0644 "$TOP/guest-app/balloon-guest.service" "$root/etc/systemd/system/balloon-guest.service"
    as_root chroot "$root" systemctl enable balloon-guest.service >/dev/null 2>&1
    mkdir -p "$out"
    rm -f "$out/rootfs.ext4.tmp"
    as_root mkfs.ext4 -q -F -L balloon-root -d "$root" "$out/rootfs.ext4.tmp" 2G >/dev/null || die "mkfs.ext4 -d failed"
    mv "$out/rootfs.ext4.tmp" "$out/rootfs.ext4"
    # A busybox initramfs loads virtio_blk (a module in the cloud kernel) and switches root.
    local stage
    stage=$(mktemp -d)
    stage_common "$stage"
    cp "$TOP/tests/guest/debian-init" "$stage/init"
    chmod +x "$stage/init"
    pack_cpio "$stage" "$out/initrd.cpio"
    rm -rf "$stage"
    cp "$KERNEL_DIR/vmlinuz" "$out/vmlinuz"
}

main() {
    mkdir -p "$LAB"
    [ $# -gt 0 ] || set -- all
    for what in "$@"; do
        case $what in
        host) step host do_host ;;
        qemu) step qemu do_qemu ;;
        kernel) step kernel do_kernel ;;
        vsock) step vsock do_vsock ;;
        guest-bins) step guest-bins do_guest_bins ;;
        mini) step mini do_mini ;;
        debian) step debian do_debian ;;
        all) main host qemu kernel vsock guest-bins mini ;;
        *) die "unknown step '$what' (host, qemu, kernel, vsock, guest-bins, mini, debian, all)" ;;
        esac
    done
}

main "$@"
