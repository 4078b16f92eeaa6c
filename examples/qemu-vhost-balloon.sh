#!/bin/sh
# A guest with the vhost-user balloon, by hand: starts the backend, then QEMU with the device
# lines from examples/qemu/*.args (the same files the tests and the demo use).
#   QEMU=... BACKEND=... MEM_MIB=1024 ACCEL=tcg examples/qemu-vhost-balloon.sh
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
TOP=$(dirname "$HERE")
QEMU=${QEMU:-$TOP/.lab/bin/qemu-system-x86_64}
BACKEND=${BACKEND:-$TOP/target/release/vhost-balloon-backend}
DIR=${DIR:-/tmp/vhost-balloon-example}
MEM_MIB=${MEM_MIB:-1024}
ACCEL=${ACCEL:-tcg}
mkdir -p "$DIR"

# Reads an args file: drops comments, fills in the placeholders, one argument per line.
args() {
    sed -e '/^#/d' -e '/^$/d' -e "s|{accel}|$ACCEL|g" -e "s|{mem_mib}|$MEM_MIB|g" \
        -e "s|{socket}|$DIR/vm.sock|g" "$1"
}

"$BACKEND" --socket "$DIR/vm.sock" --control-socket "$DIR/control.sock" \
    --state-file "$DIR/state.json" &
BACKEND_PID=$!
trap 'kill $BACKEND_PID 2>/dev/null' EXIT
while [ ! -S "$DIR/control.sock" ]; do sleep 0.1; done

# shellcheck disable=SC2046 # one argument per line, no spaces inside
IFS='
'
set -- $(args "$HERE/qemu/guest-ram.args") $(args "$HERE/qemu/vhost-balloon.args")
unset IFS
"$QEMU" "$@" -kernel "$TOP/.lab/images/mini/vmlinuz" -initrd "$TOP/.lab/images/mini/initrd.cpio" \
    -append "console=ttyS0 lab.modules=virtio_balloon" -nographic
