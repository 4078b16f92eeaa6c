#!/bin/sh
# A guest with the vhost-user balloon, by hand. QEMU >= 10.2 (the lab's QEMU 11 wrapper:
# .lab/bin/qemu-system-x86_64). Guest RAM must be shared memory for a vhost-user device.
#
#   num_vqs=4     inflate, deflate, statistics, free page reporting (the backend always
#                 exposes 4; the driver uses those whose feature it negotiates)
#   config_size=8 struct virtio_balloon_config up to `actual`
#
# Do not add reconnect-ms to the chardev: QEMU 11.1's generic device then fails at start-up
# (docs/qemu-vhost-user-base-reconnect.md).
set -eu
QEMU=${QEMU:-.lab/bin/qemu-system-x86_64}
BACKEND=${BACKEND:-target/release/vhost-balloon-backend}
DIR=${DIR:-/tmp/vhost-balloon-example}
mkdir -p "$DIR"

"$BACKEND" --socket "$DIR/vm.sock" --control-socket "$DIR/control.sock" \
    --state-file "$DIR/state.json" &
BACKEND_PID=$!
trap 'kill $BACKEND_PID 2>/dev/null' EXIT
while [ ! -S "$DIR/control.sock" ]; do sleep 0.1; done

"$QEMU" -machine q35,accel=${ACCEL:-tcg},memory-backend=mem -m 1G \
    -object memory-backend-memfd,id=mem,size=1G,share=on \
    -kernel .lab/images/mini/vmlinuz -initrd .lab/images/mini/initrd.cpio \
    -append "console=ttyS0 lab.modules=virtio_balloon" -nographic \
    -chardev socket,id=balloon,path="$DIR/vm.sock" \
    -device vhost-user-test-device-pci,chardev=balloon,virtio-id=5,num_vqs=4,config_size=8
