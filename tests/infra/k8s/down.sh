#!/usr/bin/env bash
# Tear the test cluster down: delete its pods, stop every component, remove the containers
# the kubelet made, restore the host sysctls, and remove the run dir (logs are kept in
# $SANDBOX_K8S_RUN_DIR/logs). Safe to run at any time, any number of times.
# Test infrastructure, not product.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

stop() { # component: TERM, then KILL after 15 s (each of its processes, up to 3 rounds)
    local pid i round
    for round in 1 2 3; do
        pid=$(pid_of "$1")
        [[ -n $pid ]] || break
        say "stopping $1 (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 150; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    done
    rm -f "$K8S_RUN/$1.pid"
}

# Pods first, while the kubelet still runs, so it stops their containers itself.
if [[ -n $(pid_of kubelet) && -n $(pid_of kube-apiserver) && -x $K8S_BIN/kubectl ]]; then
    kc delete pods --all --all-namespaces --grace-period=0 --force --wait=false >/dev/null 2>&1 || true
fi
for c in kubelet kube-scheduler kube-controller-manager kube-apiserver etcd; do stop "$c"; done

remove_kubelet_containers

if [[ -f $K8S_RUN/sysctl.saved ]]; then
    say "restoring sysctls"
    while IFS= read -r line; do sysctl -q -w "$line" >/dev/null || say "could not restore $line"; done \
        <"$K8S_RUN/sysctl.saved"
fi

# Mounts the kubelet made under its root dir, then the run dir (logs stay for post-mortems).
if [[ -d $K8S_RUN/kubelet ]]; then
    # (the kubelet also bind-mounts its root dir onto itself, possibly more than once)
    for _ in 1 2 3 4 5; do
        mounts=$(awk -v root="$K8S_RUN/kubelet" '$2 == root || index($2, root "/") == 1 {print $2}' /proc/mounts | sort -r)
        [[ -n $mounts ]] || break
        while read -r m; do umount -l "$m" || true; done <<<"$mounts"
    done
fi
if [[ -d $K8S_RUN ]]; then
    find "$K8S_RUN" -mindepth 1 -maxdepth 1 ! -name logs -exec rm -rf {} +
fi
# The kubelet's per-pod log directories and the dockershim's sandbox checkpoints.
rm -rf /var/lib/dockershim
find /var/log/pods -mindepth 1 -maxdepth 1 -name "${K8S_NAMESPACE}_*" -exec rm -rf {} + 2>/dev/null || true
find /var/log/containers -name "*_${K8S_NAMESPACE}_*" -delete 2>/dev/null || true

left=""
for c in "${K8S_COMPONENTS[@]}"; do [[ -n $(pid_of "$c") ]] && left+=" $c"; done
[[ -z $left ]] || die "still running:$left"
say "cluster stopped"
