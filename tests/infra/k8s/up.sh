#!/usr/bin/env bash
# Bring up the one-node test cluster (idempotent) and print its kubeconfig path on stdout.
#
# Test infrastructure, not product. Builds or reuses the binaries (build.sh), then runs
# etcd, kube-apiserver, kube-controller-manager, kube-scheduler and the kubelet as
# background processes (logs in $SANDBOX_K8S_RUN_DIR/logs, default /tmp/sandbox-kernels-k8s).
# Everything listens on this machine only: the apiserver and etcd on 127.0.0.1, the kubelet
# on docker0's address (the node IP must not be loopback). Pods run on the local Docker
# engine through the kubelet's dockershim; images are never pulled (imagePullPolicy: Never).
# Env: SANDBOX_K8S_UP_TIMEOUT (s until the node is Ready, default 180).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

UP_TIMEOUT=${SANDBOX_K8S_UP_TIMEOUT:-180}
NODE_NAME=sandbox-kernels-node

[[ $(id -u) == 0 ]] || die "run as root: the kubelet manages Docker containers and cgroups"
docker info >/dev/null 2>&1 || die "the Docker engine is not running (scripts/daemons.sh starts it)"
NODE_IP=$(node_ip)
[[ -n $NODE_IP ]] || die "docker0 has no IPv4 address: start the Docker engine first"

"$K8S_DIR/build.sh" >/dev/null
mkdir -p "$K8S_RUN" "$K8S_LOGS" "$K8S_PKI"
chmod 700 "$K8S_RUN"

# -- certificates and kubeconfigs (made once per run dir) -------------------------------------

mkcert() { # name CN O [extensions for a server cert]
    local name=$1 cn=$2 org=$3 ext=${4:-}
    [[ -f $K8S_PKI/$name.crt ]] && return 0
    openssl genrsa -out "$K8S_PKI/$name.key" 2048 2>/dev/null
    openssl req -new -key "$K8S_PKI/$name.key" -subj "/CN=$cn${org:+/O=$org}" -out "$K8S_PKI/$name.csr"
    local extfile=$K8S_PKI/$name.ext
    printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n' >"$extfile"
    if [[ -n $ext ]]; then
        printf 'extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=%s\n' "$ext" >>"$extfile"
    else
        printf 'extendedKeyUsage=clientAuth\n' >>"$extfile"
    fi
    openssl x509 -req -in "$K8S_PKI/$name.csr" -CA "$K8S_PKI/ca.crt" -CAkey "$K8S_PKI/ca.key" \
        -CAcreateserial -days 30 -sha256 -extfile "$extfile" -out "$K8S_PKI/$name.crt" 2>/dev/null
    rm -f "$K8S_PKI/$name.csr" "$extfile"
}

kubeconfig() { # file cert-name
    local file=$1 name=$2
    [[ -f $file ]] && return 0
    "$K8S_BIN/kubectl" config set-cluster local --server="https://127.0.0.1:$K8S_APISERVER_PORT" \
        --certificate-authority="$K8S_PKI/ca.crt" --embed-certs --kubeconfig="$file.tmp" >/dev/null
    "$K8S_BIN/kubectl" config set-credentials "$name" --client-certificate="$K8S_PKI/$name.crt" \
        --client-key="$K8S_PKI/$name.key" --embed-certs --kubeconfig="$file.tmp" >/dev/null
    "$K8S_BIN/kubectl" config set-context local --cluster=local --user="$name" --kubeconfig="$file.tmp" >/dev/null
    "$K8S_BIN/kubectl" config use-context local --kubeconfig="$file.tmp" >/dev/null
    mv "$file.tmp" "$file"
}

if [[ ! -f $K8S_PKI/ca.crt ]]; then
    say "generating certificates in $K8S_PKI"
    openssl genrsa -out "$K8S_PKI/ca.key" 2048 2>/dev/null
    openssl req -x509 -new -key "$K8S_PKI/ca.key" -subj "/CN=sandbox-kernels-test-ca" -days 30 \
        -sha256 -out "$K8S_PKI/ca.crt"
    openssl genrsa -out "$K8S_PKI/sa.key" 2048 2>/dev/null
    openssl rsa -in "$K8S_PKI/sa.key" -pubout -out "$K8S_PKI/sa.pub" 2>/dev/null
fi
mkcert apiserver kube-apiserver "" "IP:127.0.0.1,IP:10.0.0.1,IP:$NODE_IP,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc"
mkcert apiserver-kubelet-client kube-apiserver-kubelet-client system:masters
mkcert admin sandbox-kernels-admin system:masters
mkcert controller-manager system:kube-controller-manager ""
mkcert scheduler system:kube-scheduler ""
mkcert kubelet "system:node:$NODE_NAME" system:nodes
kubeconfig "$K8S_KUBECONFIG" admin
kubeconfig "$K8S_RUN/controller-manager.kubeconfig" controller-manager
kubeconfig "$K8S_RUN/scheduler.kubeconfig" scheduler
kubeconfig "$K8S_RUN/kubelet.kubeconfig" kubelet

# -- host preparation ---------------------------------------------------------------------------

if [[ ! -f $K8S_RUN/sysctl.saved ]]; then
    for s in "${K8S_SYSCTLS[@]}"; do echo "$s=$(sysctl -n "$s")"; done >"$K8S_RUN/sysctl.saved.tmp"
    mv "$K8S_RUN/sysctl.saved.tmp" "$K8S_RUN/sysctl.saved"
fi
if ! docker image inspect "$K8S_PAUSE_IMAGE" >/dev/null 2>&1; then
    say "importing the pause image $K8S_PAUSE_IMAGE"
    tar -C "$K8S_BIN" -c pause | docker import -c 'ENTRYPOINT ["/pause"]' - "$K8S_PAUSE_IMAGE" >/dev/null
fi

# -- processes ----------------------------------------------------------------------------------

start() { # component args...
    local name=$1; shift
    if [[ -n $(pid_of "$name") ]]; then return 0; fi
    local exe=$K8S_BIN/$name
    [[ $name == etcd ]] && exe=$(command -v etcd)
    say "starting $name"
    setsid "$exe" "$@" </dev/null >>"$K8S_LOGS/$name.log" 2>&1 &
    echo $! >"$K8S_RUN/$name.pid"
}

wait_for() { # what seconds command...
    local what=$1 limit=$2; shift 2
    local deadline=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS > deadline)); then
            die "$what not ready after ${limit}s; logs in $K8S_LOGS"
        fi
        sleep 1
    done
}

check_alive() { # component
    [[ -n $(pid_of "$1") ]] || { tail -n 20 "$K8S_LOGS/$1.log" >&2; die "$1 exited (log above)"; }
}

start etcd --name sandbox-kernels --data-dir "$K8S_RUN/etcd" \
    --listen-client-urls "http://127.0.0.1:$K8S_ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$K8S_ETCD_PORT" \
    --listen-peer-urls http://127.0.0.1:12380 --initial-advertise-peer-urls http://127.0.0.1:12380 \
    --initial-cluster sandbox-kernels=http://127.0.0.1:12380 --listen-metrics-urls "" --log-level warn
wait_for etcd 30 curl -sf "http://127.0.0.1:$K8S_ETCD_PORT/health"

start kube-apiserver --etcd-servers "http://127.0.0.1:$K8S_ETCD_PORT" \
    --bind-address 127.0.0.1 --secure-port "$K8S_APISERVER_PORT" --insecure-port 0 \
    --advertise-address "$NODE_IP" --service-cluster-ip-range 10.0.0.0/24 \
    --authorization-mode Node,RBAC --client-ca-file "$K8S_PKI/ca.crt" \
    --tls-cert-file "$K8S_PKI/apiserver.crt" --tls-private-key-file "$K8S_PKI/apiserver.key" \
    --kubelet-client-certificate "$K8S_PKI/apiserver-kubelet-client.crt" \
    --kubelet-client-key "$K8S_PKI/apiserver-kubelet-client.key" \
    --kubelet-preferred-address-types InternalIP \
    --service-account-key-file "$K8S_PKI/sa.pub" --service-account-signing-key-file "$K8S_PKI/sa.key" \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --allow-privileged=false --profiling=false --v=1
wait_for kube-apiserver 60 "$K8S_BIN/kubectl" --kubeconfig "$K8S_KUBECONFIG" get --raw /readyz
check_alive etcd

start kube-controller-manager --kubeconfig "$K8S_RUN/controller-manager.kubeconfig" \
    --authentication-kubeconfig "$K8S_RUN/controller-manager.kubeconfig" \
    --authorization-kubeconfig "$K8S_RUN/controller-manager.kubeconfig" \
    --bind-address 127.0.0.1 --port 0 --secure-port 10257 --leader-elect=false \
    --service-account-private-key-file "$K8S_PKI/sa.key" --root-ca-file "$K8S_PKI/ca.crt" \
    --use-service-account-credentials --profiling=false --v=1
start kube-scheduler --kubeconfig "$K8S_RUN/scheduler.kubeconfig" \
    --authentication-kubeconfig "$K8S_RUN/scheduler.kubeconfig" \
    --authorization-kubeconfig "$K8S_RUN/scheduler.kubeconfig" \
    --bind-address 127.0.0.1 --port 0 --secure-port 10259 --leader-elect=false --profiling=false --v=1

mkdir -p "$K8S_RUN/kubelet"
# A crashed run's leftover containers stop a new kubelet from starting; a running kubelet's
# containers are its pods' (up.sh also brings back a restarted API server beside them).
[[ -n $(pid_of kubelet) ]] || remove_kubelet_containers
start kubelet --kubeconfig "$K8S_RUN/kubelet.kubeconfig" --hostname-override "$NODE_NAME" \
    --node-ip "$NODE_IP" --address "$NODE_IP" --port 10250 --read-only-port 0 \
    --healthz-bind-address 127.0.0.1 --healthz-port 10248 \
    --client-ca-file "$K8S_PKI/ca.crt" --anonymous-auth=false --authorization-mode Webhook \
    --root-dir "$K8S_RUN/kubelet" --cert-dir "$K8S_RUN/kubelet/pki" \
    --volume-plugin-dir "$K8S_RUN/kubelet/volume-plugins" \
    --pod-infra-container-image "$K8S_PAUSE_IMAGE" --cgroup-driver cgroupfs \
    --fail-swap-on=false --oom-score-adj 0 --make-iptables-util-chains=false \
    --image-gc-high-threshold 100 --image-gc-low-threshold 99 \
    --eviction-hard 'memory.available<100Mi,nodefs.available<1%,imagefs.available<1%' \
    --serialize-image-pulls=false --pod-max-pids 1024 --v=1
say "waiting for node $NODE_NAME to be Ready"
ready() {
    check_alive kubelet
    [[ $(kc get node "$NODE_NAME" -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null) == True ]]
}
deadline=$((SECONDS + UP_TIMEOUT))
until ready; do
    ((SECONDS < deadline)) || die "node $NODE_NAME not Ready after ${UP_TIMEOUT}s; logs in $K8S_LOGS"
    sleep 1
done
for c in etcd kube-apiserver kube-controller-manager kube-scheduler; do check_alive "$c"; done

kc get namespace "$K8S_NAMESPACE" >/dev/null 2>&1 || kc create namespace "$K8S_NAMESPACE" >/dev/null
wait_for "service account default in $K8S_NAMESPACE" 60 kc -n "$K8S_NAMESPACE" get serviceaccount default
say "cluster ready (node $NODE_NAME at $NODE_IP, namespace $K8S_NAMESPACE)"
echo "$K8S_KUBECONFIG"
