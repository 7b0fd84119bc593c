# Shared settings of the test cluster scripts (sourced by build.sh, up.sh and down.sh).
#
# Test infrastructure, not product: a one-node Kubernetes 1.20 built from Debian bookworm's
# source package, running on this machine only (apiserver on 127.0.0.1, kubelet on docker0).

set -euo pipefail

K8S_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# The cache key covers everything that decides the binaries: the recipe and the patches.
K8S_HASH=$(cat "$K8S_DIR/build.sh" "$K8S_DIR"/patches/*.patch | sha256sum | cut -c1-16)
K8S_CACHE=${SANDBOX_K8S_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sandbox-kernels/k8s-$K8S_HASH}
K8S_BIN=$K8S_CACHE/bin
K8S_RUN=${SANDBOX_K8S_RUN_DIR:-/tmp/sandbox-kernels-k8s}
K8S_PKI=$K8S_RUN/pki
K8S_LOGS=$K8S_RUN/logs
K8S_KUBECONFIG=$K8S_RUN/admin.kubeconfig
K8S_NAMESPACE=sandbox-kernels-test
K8S_PAUSE_IMAGE=sandbox-kernels/k8s-pause:3.4
K8S_APISERVER_PORT=${SANDBOX_K8S_APISERVER_PORT:-16443}
K8S_ETCD_PORT=${SANDBOX_K8S_ETCD_PORT:-12379}
K8S_COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler kubelet)
# Host sysctls the kubelet changes; up.sh saves them, down.sh puts them back.
K8S_SYSCTLS=(vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops kernel.keys.root_maxkeys kernel.keys.root_maxbytes)

say() { printf '[k8s %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }

# The node address: docker0's IPv4 (a local bridge; the kubelet refuses loopback node IPs).
node_ip() {
    ip -4 -o addr show dev docker0 2>/dev/null | awk '{split($4, a, "/"); print a[1]; exit}'
}

pid_of() { # component -> its pid if running (found by executable path, not by pid file)
    local p exe
    for p in /proc/[0-9]*; do
        exe=$(readlink "$p/exe" 2>/dev/null) || continue
        if [[ $1 == etcd ]]; then
            [[ $exe == */etcd ]] || continue
            tr '\0' ' ' <"$p/cmdline" 2>/dev/null | grep -qF -- "--data-dir $K8S_RUN/etcd " || continue
        else
            [[ $exe == */sandbox-kernels/k8s-*/bin/"$1" ]] || continue
        fi
        echo "${p#/proc/}"
        return 0
    done
}

kc() { "$K8S_BIN/kubectl" --kubeconfig "$K8S_KUBECONFIG" "$@"; }

# Containers the kubelet created (dockershim labels every one with the pod's uid). A container
# whose processes are still being torn down can fail removal once ("directory not empty") and
# stay "Dead"; left behind, it stops the next kubelet from starting, so try again.
remove_kubelet_containers() {
    local attempt ids
    for attempt in 1 2 3 4 5; do
        ids=$(docker ps -aq --filter label=io.kubernetes.pod.uid 2>/dev/null || true)
        [[ -n $ids ]] || return 0
        say "removing $(wc -w <<<"$ids") kubelet container(s) (attempt $attempt)"
        docker rm -f $ids >/dev/null 2>&1 || sleep 2
    done
    say "could not remove kubelet containers: $(docker ps -aq --filter label=io.kubernetes.pod.uid | xargs)"
}
