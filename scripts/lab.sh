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
#   scripts/lab.sh vsock      vhost-device-vsock (cargo install) for the guest app's vsock tests
#   scripts/lab.sh all        host qemu kernel vsock guest-bins mini
#
# Why a separate rootfs: QEMU 10 (bookworm-backports) cannot create the generic vhost-user device,
# and adding trixie to this host's apt sources half-upgrades the host. The rootfs's QEMU runs
# through the rootfs's own dynamic loader, so sockets and files keep their host paths.
set -euo pipefail

TOP=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LAB=${BALLOON_LAB_DIR:-$TOP/.lab}
QEMU_ROOT=$LAB/qemu-root
KERNEL_DIR=$LAB/kernel
IMAGES=$LAB/images
TARGET_TRIPLE=x86_64-unknown-linux-gnu
GUEST_BIN_DIR=$TOP/target/$TARGET_TRIPLE/release
# The guest binaries every image carries: the test agent and the user-level balloon app.
GUEST_BINS=(balloon-test-agent balloon-workload balloon-guest)
# Kernel modules the guests need, decompressed (busybox insmod cannot read .ko.xz). Order matters:
# dependencies first.
GUEST_MODULES=(
    drivers/virtio/virtio_balloon.ko
    net/vmw_vsock/vsock.ko
    net/vmw_vsock/vmw_vsock_virtio_transport_common.ko
    net/vmw_vsock/vmw_vsock_virtio_transport.ko
    drivers/block/virtio_blk.ko
    drivers/firmware/qemu_fw_cfg.ko
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

# The Debian mirror this host's apt already uses, so the rootfs comes from the same place (the
# same mirror, or the same caching proxy such as apt-cacher-ng). It is taken only from the host's
# apt sources, never from a default: a machine behind its own mirror or proxy may reach no other.
# Files are read in apt's order (the classic sources.list, then sources.list.d/*.list in the
# classic one-line format and *.sources in deb822, by name), with apt's own idea of where they
# are (APT_CONFIG, Dir::Etc). An entry counts when it is a "deb" entry, not disabled, for a Debian
# release suite: the host's codename (on a Debian host) or stable/testing/unstable/sid and the
# like, with or without -updates/-backports. Security mirrors carry only *-security suites and
# are skipped; so are other vendors' repositories (their suites are not Debian's). Prints the
# first such entry's first URI; callers never log it (it may name a private host or carry
# credentials).
debian_mirror() {
    local list=/etc/apt/sources.list parts=/etc/apt/sources.list.d codename="" f
    local SL="" SP=""
    if command -v apt-config >/dev/null; then
        eval "$(apt-config shell SL Dir::Etc::sourcelist/f SP Dir::Etc::sourceparts/d)"
        list=${SL:-$list}
        parts=${SP%/}
        parts=${parts:-/etc/apt/sources.list.d}
    fi
    # Only a Debian host's codename names a Debian suite (Ubuntu's do not).
    # shellcheck source=/dev/null
    codename=$(. /etc/os-release 2>/dev/null && [ "${ID:-}" = debian ] && echo "${VERSION_CODENAME:-}") || codename=""
    local files=()
    [ -f "$list" ] && files+=("$list")
    for f in "$parts"/*; do
        case $f in *.list | *.sources) [ -f "$f" ] && files+=("$f") ;; esac
    done
    [ ${#files[@]} -gt 0 ] || die "no apt sources on this host ($list, $parts/): the lab builds its trixie rootfs from the Debian mirror the host's apt uses"
    local uri
    # One awk program for both formats: deb822 stanzas (fields case-insensitive, folded lines,
    # comments, Enabled: no) in *.sources, one-line entries (with [options]) elsewhere.
    # shellcheck disable=SC2016
    uri=$(awk -v codename="$codename" '
        function debian_suite(s,   base) {
            if (s ~ /-security$/) return 0
            base = s
            sub(/-(updates|proposed-updates|backports|backports-sloppy)$/, "", base)
            return (codename != "" && base == codename) || base ~ /^(stable|oldstable|oldoldstable|testing|unstable|sid)$/
        }
        function usable(u) { return u != "" && u !~ /^cdrom:/ }
        function pick(u, s,   nu, ns, i, j, us, ss) {
            if (found != "") return
            ns = split(s, ss); nu = split(u, us)
            for (i = 1; i <= ns; i++) {
                if (!debian_suite(ss[i])) continue
                for (j = 1; j <= nu; j++) if (usable(us[j])) { found = us[j]; return }
            }
        }
        function flush() {
            if (deb822 && nfields > 0 && tolower(f["enabled"]) != "no" && (" " f["types"] " ") ~ /[ \t]deb[ \t]/)
                pick(f["uris"], f["suites"])
            split("", f); nfields = 0; last = ""
        }
        FNR == 1 { flush(); deb822 = FILENAME ~ /\.sources$/ }
        found != "" { exit }
        deb822 {
            if ($0 ~ /^#/) next
            if ($0 ~ /^[ \t]*$/) { flush(); next }
            if ($0 ~ /^[ \t]/) { if (last != "") f[last] = f[last] " " $0; next }
            i = index($0, ":")
            if (i == 0) next
            last = tolower(substr($0, 1, i - 1))
            v = substr($0, i + 1)
            sub(/^[ \t]+/, "", v); sub(/[ \t]+$/, "", v)
            f[last] = v; nfields++
            next
        }
        {
            sub(/#.*/, "")
            if ($1 != "deb") next
            i = 2
            if ($i ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
            pick($i, $(i + 1))
        }
        END { if (found == "") flush(); if (found != "") print found }
    ' "${files[@]}")
    [ -n "$uri" ] || die "the host's apt sources ($list, $parts/*.list, $parts/*.sources) name no Debian mirror (a \"deb\" entry for a Debian release suite such as ${codename:-stable}): the lab builds its trixie rootfs from the Debian mirror the host's apt uses, and knows no other"
    echo "$uri"
}

# The host's apt proxy settings (Acquire::*::Proxy, with per-host entries, and
# Proxy-Auto-Detect) as mmdebstrap --aptopt arguments: mmdebstrap's apt does not read the host's
# apt.conf. Printed one argument a line; never logged.
apt_proxy_aptopts() {
    local dump
    command -v apt-config >/dev/null || return 0
    dump=$(apt-config dump 2>/dev/null) || return 0
    awk '/^Acquire::[A-Za-z0-9+-]+::Proxy(-Auto-Detect)?(::| )/ { print "--aptopt=" $0 }' <<<"$dump"
}

do_host() {
    # libvirt: the daemon and virsh for the libvirt tests (scripts/libvirtd-lab.sh); without
    # recommends, which would bring Debian's own QEMU.
    local want=(mmdebstrap cpio xz-utils zstd e2fsprogs libvirt-daemon libvirt-clients) missing=()
    local p status
    for p in "${want[@]}"; do
        status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) || status=""
        [ "$status" = "install ok installed" ] || missing+=("$p")
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
        local mirror tmp proxy
        mirror=$(debian_mirror)
        proxy=$(apt_proxy_aptopts)
        local aptopts=()
        if [ -n "$proxy" ]; then
            mapfile -t aptopts <<<"$proxy"
            # The proxy is for building; the rootfs keeps no host settings. ($1: the hook's root.)
            # shellcheck disable=SC2016
            aptopts+=(--customize-hook='rm -f "$1/etc/apt/apt.conf.d/99mmdebstrap"')
        fi
        tmp=$QEMU_ROOT.tmp
        as_root rm -rf "$tmp"
        log "building the trixie rootfs with QEMU 11 from the host's apt mirror (about 30 s)"
        # The customize hook runs inside mmdebstrap's chroot (with /proc mounted): QEMU comes from
        # trixie-backports, everything else from trixie. The kernel and busybox are downloaded as
        # .debs for the guest images (not installed). Hooks expand $1 themselves.
        # shellcheck disable=SC2016
        as_root mmdebstrap --quiet --variant=apt --include=ca-certificates \
            --customize-hook='chroot "$1" apt-get install -y -qq --no-install-recommends -t trixie-backports qemu-system-x86 qemu-system-data seabios >/dev/null' \
            --customize-hook='mkdir -p "$1/debs" && chroot "$1" sh -c "cd /debs && apt-get download -qq busybox-static linux-image-cloud-amd64 && apt-get download -qq \$(apt-cache depends linux-image-cloud-amd64 | awk \"/Depends: linux-image-[0-9]/ {print \\\$2; exit}\")"' \
            "${aptopts[@]}" \
            trixie "$tmp" \
            "deb $mirror trixie main" "deb $mirror trixie-backports main" \
            || die "mmdebstrap of trixie + QEMU failed (is the host's apt mirror reachable, and does it carry trixie and trixie-backports?)"
        as_root touch "$tmp/.lab-complete"
        as_root rm -rf "$QEMU_ROOT"
        as_root mv "$tmp" "$QEMU_ROOT"
    fi

    # Keeping QEMU 11 away from a host QEMU's modules. QEMU looks for a module (ui-opengl.so,
    # hw-usb-host.so, ...) in $QEMU_MODULE_DIR, then in its compiled-in module directory
    # /usr/lib/x86_64-linux-gnu/qemu, then in /var/run/qemu/<its exact version> (util/module.c).
    # The compiled-in one is the host's: with Debian's qemu-system-x86 installed there, QEMU 11
    # falls through to the host's modules for any module the rootfs lacks, fails on them ("Only
    # modules from the same build can be loaded") and `-device help` prints nothing. QEMU_MODULE_DIR
    # cannot help, as it only comes first. But QEMU passes every compiled-in path through
    # get_relocated_path() (util/cutils.c), which maps /usr/... to <exec dir>/qemu-bundle/usr/...
    # whenever <exec dir>/qemu-bundle exists, and its exec dir is that of /proc/self/exe: here the
    # rootfs's loader. So a qemu-bundle/usr beside the loader pointing at the rootfs's /usr makes
    # QEMU search only the rootfs for modules (and for firmware and data, as a chroot would); the
    # version directory is only ever filled by the same build. This needs no privileges, keeps
    # QEMU's PID, host paths and mount view (tests read /proc/PID and connect sockets), and works
    # under libvirt. A private mount namespace hiding the host directory would need root (or a
    # user namespace with a mapped root) for every QEMU start and give QEMU its own view of the
    # host's mounts. The check below proves the redirection on every host, QEMU or not: with
    # QEMU_MODULE_DIR unset, only the redirected directory can supply usb-host.
    local loader qr ql
    loader=$(readlink -f "$QEMU_ROOT/lib64/ld-linux-x86-64.so.2")
    [ -x "$loader" ] || die "the rootfs's dynamic loader is missing from $QEMU_ROOT: remove it and run 'scripts/lab.sh qemu'"
    local bundle=${loader%/*}/qemu-bundle
    if [ "$(readlink "$bundle/usr" 2>/dev/null)" != "$QEMU_ROOT/usr" ]; then
        as_root mkdir -p "$bundle"
        as_root ln -sfn "$QEMU_ROOT/usr" "$bundle/usr"
    fi
    mkdir -p "$LAB/bin"
    qr=$(printf '%q' "$QEMU_ROOT")
    ql=$(printf '%q' "$loader")
    # The wrapper runs the rootfs's QEMU through the rootfs's own loader and libraries. It is
    # rewritten on every run, so an existing .lab/ gets the current one.
    cat >"$LAB/bin/qemu-system-x86_64.tmp" <<EOF
#!/bin/sh
# Generated by scripts/lab.sh: QEMU 11 from the trixie rootfs $QEMU_ROOT.
# Its modules, firmware and data come from the rootfs only: see do_qemu in scripts/lab.sh.
R=$qr
unset QEMU_MODULE_DIR
exec $ql --library-path "\$R/lib/x86_64-linux-gnu:\$R/usr/lib/x86_64-linux-gnu" \\
    "\$R/usr/bin/qemu-system-x86_64" -L "\$R/usr/share/qemu" -L "\$R/usr/share/seabios" "\$@"
EOF
    chmod +x "$LAB/bin/qemu-system-x86_64.tmp"
    mv "$LAB/bin/qemu-system-x86_64.tmp" "$LAB/bin/qemu-system-x86_64"
    # The output is captured, not piped into grep -q: under pipefail an early-exiting grep can
    # fail the pipeline by SIGPIPE.
    local out
    out=$("$LAB/bin/qemu-system-x86_64" -device help 2>&1) \
        || die "QEMU in $QEMU_ROOT fails on '-device help': $(printf '%s' "$out" | tail -n 3)"
    case $out in
    *vhost-user-test-device-pci*) ;;
    *) die "QEMU in $QEMU_ROOT lacks vhost-user-test-device-pci (need QEMU >= 10.2)" ;;
    esac
    case $out in
    *'name "usb-host"'*) ;;
    *) die "QEMU in $QEMU_ROOT does not load its own modules from the rootfs (usb-host from hw-usb-host.so is missing): $bundle is not in effect" ;;
    esac
}

do_kernel() {
    # The stamp lists the modules extracted: a changed GUEST_MODULES extracts again.
    local stamp=$KERNEL_DIR/.lab-complete have=""
    [ -f "$stamp" ] && have=$(cat "$stamp")
    [ "$have" = "${GUEST_MODULES[*]}" ] && return
    [ -d "$QEMU_ROOT/debs" ] || die "the trixie rootfs is missing: run 'scripts/lab.sh qemu'"
    local tmp=$KERNEL_DIR.tmp deb bb found
    rm -rf "$tmp"
    mkdir -p "$tmp/x" "$tmp/modules"
    # Globs, not `ls | head` (which under pipefail can fail by SIGPIPE); the first match in order.
    found=("$QEMU_ROOT"/debs/linux-image-[0-9]*cloud-amd64*.deb)
    deb=${found[0]}
    [ -f "$deb" ] || die "no linux-image-*-cloud-amd64 .deb in $QEMU_ROOT/debs"
    found=("$QEMU_ROOT"/debs/busybox-static_*.deb)
    bb=${found[0]}
    [ -f "$bb" ] || die "no busybox-static .deb in $QEMU_ROOT/debs"
    dpkg-deb -x "$deb" "$tmp/x"
    dpkg-deb -x "$bb" "$tmp/bb"
    local ver
    found=("$tmp"/x/usr/lib/modules/*)
    [ -d "${found[0]}" ] || die "no kernel modules directory in $deb"
    ver=${found[0]##*/}
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
    echo "${GUEST_MODULES[*]}" >"$tmp/.lab-complete"
    rm -rf "$KERNEL_DIR"
    mv "$tmp" "$KERNEL_DIR"
}

# vhost-device-vsock, the rust-vmm vhost-user vsock device with the hybrid-vsock convention
# (a guest connecting to host port P reaches the Unix socket UDS_PATH_P), installed by cargo from its registry.
VSOCK_DEVICE_VERSION=0.3.0
do_vsock() {
    local bin=$LAB/tools/bin/vhost-device-vsock
    local have=""
    if [ -x "$bin" ]; then have=$("$bin" --version 2>/dev/null) || have=""; fi
    case $have in *"$VSOCK_DEVICE_VERSION"*) return ;; esac
    command -v cargo >/dev/null || die "cargo is missing"
    log "installing vhost-device-vsock $VSOCK_DEVICE_VERSION with cargo install (about 30 s)"
    cargo install --quiet --locked vhost-device-vsock --version "$VSOCK_DEVICE_VERSION" \
        --root "$LAB/tools" || die "cargo install vhost-device-vsock failed (is the Rust package registry reachable?)"
}

do_guest_bins() {
    command -v cargo >/dev/null || die "cargo is missing"
    # Static binaries for the guests: the gnu target with crt-static (no musl target here).
    # --target keeps these artifacts apart from the host build, and RUSTFLAGS then applies only
    # to the guest target, not to build scripts.
    (cd "$TOP" && RUSTFLAGS="-C target-feature=+crt-static" cargo build --quiet --release \
        --target "$TARGET_TRIPLE" -p balloon-tests -p guest-app \
        --bin balloon-test-agent --bin balloon-workload --bin balloon-guest) || die "building the static guest binaries failed"
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
        local mirror proxy aptopts=()
        mirror=$(debian_mirror)
        proxy=$(apt_proxy_aptopts)
        if [ -n "$proxy" ]; then
            mapfile -t aptopts <<<"$proxy"
            # The proxy is for building; the guest image keeps no host settings.
            # shellcheck disable=SC2016
            aptopts+=(--customize-hook='rm -f "$1/etc/apt/apt.conf.d/99mmdebstrap"')
        fi
        as_root rm -rf "$root.tmp"
        log "building the Debian trixie guest rootfs with systemd from the host's apt mirror (about 15 s)"
        as_root mmdebstrap --quiet --variant=minbase --include=systemd-sysv,udev,kmod "${aptopts[@]}" trixie "$root.tmp" \
            "deb $mirror trixie main" \
            || die "mmdebstrap of the Debian guest failed (is the host's apt mirror reachable, and does it carry trixie?)"
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

# Run, it provisions; sourced (tests/tests/lab_host_qemu.rs checks debian_mirror), it only defines
# its functions. `return` succeeds at the top level only in a sourced file.
if ! (return 0 2>/dev/null); then
    main "$@"
fi
