#!/usr/bin/env bash
# Build (or reuse) the test cluster's binaries: kube-apiserver, kube-controller-manager,
# kube-scheduler, kubelet and kubectl from Debian bookworm's `kubernetes` source package
# (1.20.2, vendored), plus the static `pause` binary. Test infrastructure, not product.
#
# Cached under ~/.cache/sandbox-kernels/k8s-<hash of this script and patches/>/bin; a cold
# build takes 10-20 minutes on 2 cores. Env: SANDBOX_K8S_BUILD_TIMEOUT (s, default 1800).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

BINS=(kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl)
SRC_PACKAGE="kubernetes=1.20.5+really1.20.2-1.1+deb12u1"
SRC_LIST=/etc/apt/sources.list.d/sandbox-kernels-k8s-src.sources
BUILD_TIMEOUT=${SANDBOX_K8S_BUILD_TIMEOUT:-1800}
# Go >= 1.18 breaks the vendored reflect2 1.0.1 (json-iterator's map encoding panics in every
# binary); Debian's golang-github-modern-go-reflect2-dev (1.0.2) replaces it.
REFLECT2=/usr/share/gocode/src/github.com/modern-go/reflect2

have_all() {
    local b
    for b in "${BINS[@]}" pause; do [[ -x $K8S_BIN/$b ]] || return 1; done
}

install_tools() {
    local missing=()
    command -v go >/dev/null || missing+=(golang-go)
    command -v rsync >/dev/null || missing+=(rsync)
    command -v jq >/dev/null || missing+=(jq)
    command -v etcd >/dev/null || missing+=(etcd-server)
    command -v socat >/dev/null || missing+=(socat)   # the kubelet's port-forward needs it
    command -v conntrack >/dev/null || missing+=(conntrack)
    command -v dpkg-source >/dev/null || missing+=(dpkg-dev)
    command -v gcc >/dev/null || missing+=(gcc libc6-dev)
    command -v openssl >/dev/null || missing+=(openssl)
    [[ -d $REFLECT2 ]] || missing+=(golang-github-modern-go-reflect2-dev)
    if ((${#missing[@]})); then
        say "installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

fetch_source() { # $1: work dir; prints the source tree path
    local work=$1
    if [[ ! -f $SRC_LIST ]]; then
        say "adding a deb-src entry for bookworm ($SRC_LIST)"
        cat >"$SRC_LIST" <<'SOURCES'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
        apt-get update -qq
    fi
    say "fetching the Debian source package $SRC_PACKAGE"
    if ! (cd "$work" && apt-get source -qq "$SRC_PACKAGE" >"$work/apt-source.log" 2>&1); then
        # A newer stable/security upload replaces the pinned one on the mirror: take it (the
        # patches must still apply, or the build stops with a clear message).
        say "$SRC_PACKAGE is no longer on the mirror; trying the current kubernetes source"
        (cd "$work" && apt-get source -qq kubernetes >>"$work/apt-source.log" 2>&1) \
            || { tail -n 20 "$work/apt-source.log" >&2; die "apt-get source failed (log above)"; }
    fi
    local tree
    tree=$(find "$work" -mindepth 1 -maxdepth 1 -type d -name 'kubernetes-*' | head -n1)
    [[ -n $tree ]] || die "no source tree after apt-get source"
    echo "$tree"
}

build() {
    local work=$K8S_CACHE.work
    rm -rf "$work" && mkdir -p "$work"
    local tree; tree=$(fetch_source "$work")
    local p
    for p in "$K8S_DIR"/patches/*.patch; do
        say "applying $(basename "$p")"
        patch -s -p1 -d "$tree" <"$p" || die "patch $(basename "$p") does not apply"
    done
    say "replacing vendor/github.com/modern-go/reflect2 (1.0.1) with Debian's $(basename "$REFLECT2") 1.0.2"
    rsync -a --delete "$REFLECT2/" "$tree/vendor/github.com/modern-go/reflect2/"
    mkdir -p "$tree/.go/src/k8s.io"
    ln -sfn ../../.. "$tree/.go/src/k8s.io/kubernetes"
    local what="" b
    for b in "${BINS[@]}"; do what+="cmd/$b "; done
    say "building ${BINS[*]} with $(go version | cut -d' ' -f3) (GOPATH mode; 10-20 min on 2 cores)"
    local log=$work/build.log start=$SECONDS
    (cd "$tree/.go/src/k8s.io/kubernetes" && \
        exec env GOPATH="$tree/.go" GO111MODULE=off CGO_ENABLED=0 HOME="$work" \
        GOFLAGS= make WHAT="${what% }") >"$log" 2>&1 &
    local pid=$!
    while kill -0 "$pid" 2>/dev/null; do
        sleep 30
        if ((SECONDS - start > BUILD_TIMEOUT)); then
            kill -- "$pid" 2>/dev/null || true
            pkill -TERM -P "$pid" 2>/dev/null || true
            die "the Kubernetes build did not finish within ${BUILD_TIMEOUT}s (SANDBOX_K8S_BUILD_TIMEOUT); log: $log"
        fi
        say "still building ($((SECONDS - start)) s): $(tail -n1 "$log" | cut -c1-100)"
    done
    wait "$pid" || { tail -n 30 "$log" >&2; die "the Kubernetes build failed; log: $log"; }
    say "built in $((SECONDS - start)) s"
    mkdir -p "$K8S_BIN.new"
    for b in "${BINS[@]}"; do
        cp "$tree/_output/bin/$b" "$K8S_BIN.new/$b" || die "$b was not built"
    done
    say "building pause (gcc -static from build/pause/linux/pause.c)"
    gcc -Os -static -DVERSION=v3.4-sandbox-kernels -o "$K8S_BIN.new/pause" "$tree/build/pause/linux/pause.c" \
        || die "building pause failed"
    strip "$K8S_BIN.new/pause" 2>/dev/null || true
    cp "$K8S_DIR"/patches/*.patch "$K8S_BIN.new/"
    rm -rf "$K8S_BIN" && mv "$K8S_BIN.new" "$K8S_BIN"
    rm -rf "$work"
}

install_tools
if have_all; then
    say "reusing cached binaries in $K8S_BIN"
else
    mkdir -p "$K8S_CACHE"
    exec 9>"$K8S_CACHE.lock"
    flock 9
    have_all || build
fi
echo "$K8S_BIN"
