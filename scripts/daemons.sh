#!/usr/bin/env bash
# Start dockerd, virtlogd and libvirtd in the background when they are not running (no systemd).
set -euo pipefail

log() { printf '[daemons] %s\n' "$*"; }
wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local limit=$1 what=$2; shift 2
    for _ in $(seq "$limit"); do "$@" > /dev/null 2>&1 && return 0; sleep 1; done
    echo "[daemons] $what did not come up within ${limit}s; see its log" >&2
    return 1
}

if ! docker info > /dev/null 2>&1; then
    log "starting dockerd (log: /var/log/sandbox-kernels-dockerd.log)"
    nohup dockerd > /var/log/sandbox-kernels-dockerd.log 2>&1 &
    wait_for 60 dockerd docker info
fi
if command -v virtlogd > /dev/null && ! pgrep -x virtlogd > /dev/null; then
    log "starting virtlogd"
    virtlogd -d
fi
if command -v libvirtd > /dev/null && ! virsh -c qemu:///system version > /dev/null 2>&1; then
    log "starting libvirtd"
    pgrep -x libvirtd > /dev/null || libvirtd -d
    wait_for 30 libvirtd virsh -c qemu:///system version
fi
