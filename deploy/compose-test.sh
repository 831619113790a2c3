#!/usr/bin/env bash
# CI test of the compose deployment, on this machine and against loopback only: installs Debian's
# docker.io and docker-compose if missing, starts dockerd if none runs, builds the base image
# locally (no registry needed) and Realm's runtime image from the host's binaries, brings up
# deploy/docker-compose.yml (one coordinator, three workers) with a cluster token and an API key
# made for this run (random, exported, never printed), sends the Paris prompt through the `realm`
# client with the key to the coordinator's port on 127.0.0.1 and checks the answer, and checks
# that a client without the key, or with a wrong one, is refused (UNAUTHENTICATED). The workers
# have no model: it checks that only the coordinator mounts /models, that each worker received its
# layers into a cache volume holding one shard file, then takes the cluster down and up again
# keeping the volumes and checks that the Paris answer comes with nothing delivered (`realm
# workers`: one cache hit each, 0 B received; the shard files untouched). Then it runs the pods of
# deploy/k8s/ the same way (deploy/k8s-pods.py: the manifests' names, environment, users, volumes
# and limits under docker, no cluster needed). The containers, their networks and volumes and a
# dockerd this script started are torn down however it ends.
#
#   deploy/compose-test.sh
#
# Prints the image sizes and the time from `up` to the first streamed token, for the first start
# (layers delivered) and for the restart (layers from the caches).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

project="realm-ci"
image="realm:ci"
base="realm-base:bookworm"
model="SmolLM2-135M-Instruct.Q4_1.gguf"
compose_file="deploy/docker-compose.yml"
work="$(mktemp -d)"
started_dockerd=""
compose=()

log() { echo "compose-test: $*" >&2; }

# This run's secrets: 128 random bits each, in the environment only (compose reads them from it).
secret() { od -An -N16 -tx1 /dev/urandom | tr -d ' \n'; }
REALM_CLUSTER_TOKEN="$(secret)"
REALM_API_KEY="$(secret)"
export REALM_CLUSTER_TOKEN REALM_API_KEY
[[ ${#REALM_CLUSTER_TOKEN} == 32 && ${#REALM_API_KEY} == 32 ]] || { log "cannot read /dev/urandom"; exit 1; }

cleanup() {
    local status=$?
    if ((${#compose[@]})); then
        if ((status != 0)); then
            log "failed; the cluster's logs:"
            "${compose[@]}" logs --no-color --tail 40 >&2 || true
        fi
        "${compose[@]}" down --volumes --remove-orphans --timeout 10 >/dev/null 2>&1 || true
    fi
    if [[ -n "$(docker ps -aq --filter label=realm.test=k8s-pods 2>/dev/null)" ]]; then
        docker rm -f $(docker ps -aq --filter label=realm.test=k8s-pods) >/dev/null 2>&1 || true
    fi
    if [[ -n "$started_dockerd" ]]; then
        kill "$started_dockerd" 2>/dev/null || true
        wait "$started_dockerd" 2>/dev/null || true
    fi
    rm -rf "$work"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- the engine --------------------------------------------------------------------------------
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v debootstrap >/dev/null || missing+=(debootstrap)
"$root/deploy/apt-install.sh" compose-test "${missing[@]}"

docker_up() { timeout 5 docker info >/dev/null 2>&1; }

# Starts dockerd with extra flags $@ and waits up to 30 s for it; returns 1 if it does not come up.
start_dockerd() {
    dockerd "$@" >"$work/dockerd.log" 2>&1 &
    started_dockerd=$!
    for _ in $(seq 60); do
        docker_up && return 0
        kill -0 "$started_dockerd" 2>/dev/null || break
        sleep 0.5
    done
    kill "$started_dockerd" 2>/dev/null || true
    wait "$started_dockerd" 2>/dev/null || true
    started_dockerd=""
    return 1
}

if ! docker_up; then
    if ((EUID != 0)); then
        log "no docker engine answers and only root can start one"
        exit 1
    fi
    log "starting dockerd"
    # overlay2 first; vfs where the kernel or the filesystem refuses overlay.
    if ! start_dockerd && ! start_dockerd --storage-driver vfs; then
        log "dockerd does not start here:"
        tail -20 "$work/dockerd.log" >&2
        exit 1
    fi
fi

# docker-compose v1 (Debian's package) or the `docker compose` plugin.
if command -v docker-compose >/dev/null; then
    compose=(docker-compose)
else
    compose=(docker compose)
fi
compose+=(--project-name "$project" --file "$compose_file")

# --- images ------------------------------------------------------------------------------------
[[ -f "models/$model" ]] || { log "models/$model missing: run deploy/fetch-models.sh"; exit 1; }
"$root/deploy/base-image.sh" "$base"
BASE_IMAGE="$base" "$root/deploy/build-image.sh" "$image"
export REALM_IMAGE="$image"
REALM_MODELS_DIR="$(realpath models)"
export REALM_MODELS_DIR
REALM_PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
export REALM_PORT
# Budgets per worker: the first two hold their shards whole, the third streams its layers through
# 16 MiB (a shard of SmolLM2 is 21 MiB).
export REALM_WORKER_1_MEMORY_BUDGET=256MiB REALM_WORKER_2_MEMORY_BUDGET=64MiB \
    REALM_WORKER_3_MEMORY_BUDGET=16MiB
realm="$root/target/release/realm"

# --- the cluster -------------------------------------------------------------------------------
"${compose[@]}" config --quiet
log "$compose_file is valid (compose config)"
# A cluster left behind by an interrupted run goes first.
"${compose[@]}" down --volumes --remove-orphans --timeout 10 >/dev/null 2>&1 || true

# Brings the cluster up and sends the Paris prompt through the published port; sets up_ms to the
# time from `up` to the first streamed token. $1 names the start in the log.
up_and_ask() {
    local start_ns first_ns answer
    start_ns=$(date +%s%N)
    log "up ($1): 3 workers, then the coordinator once they are healthy"
    "${compose[@]}" up --detach --no-build
    for _ in $(seq 240); do
        "$realm" health "127.0.0.1:$REALM_PORT" --timeout-secs 2 >/dev/null 2>&1 && break
        sleep 0.5
    done
    "$realm" health "127.0.0.1:$REALM_PORT" --timeout-secs 2 >/dev/null

    # The first byte of the completion marks the first streamed token. The client sends the key
    # from REALM_API_KEY (exported above; not on its command line).
    "$realm" --coordinator "127.0.0.1:$REALM_PORT" generate \
            --prompt "The capital of France is" --max-tokens 16 2>"$work/usage" \
        | { IFS= read -r -n 1 first || true; date +%s%N >"$work/first_token_ns"; printf '%s' "$first"; cat; } \
        >"$work/answer"
    answer="$(cat "$work/answer")"
    first_ns="$(cat "$work/first_token_ns")"
    log "answer: ${answer//$'\n'/ }"
    log "usage: $(cat "$work/usage")"
    if [[ "$answer" != *Paris* ]]; then
        log "the answer does not mention Paris"
        exit 1
    fi
    up_ms=$(( (first_ns - start_ns) / 1000000 ))
}

# The shard files in each worker's cache volume: "service name size mtime" lines, sorted.
shards() {
    local service container
    for service in worker-1 worker-2 worker-3; do
        container="$("${compose[@]}" ps --quiet "$service")"
        docker exec "$container" find /cache -maxdepth 1 -type f \( -name '*.gguf' -o -name '*.partial' \) \
                -printf "$service %f %s %T@\n"
    done | sort
}

# `realm workers` must show every worker's shard cache with $1 (e.g. "cache: 1 hit, 0 misses, 0 B
# received"), and its listing is kept in $work/workers.
workers_show() {
    "$realm" --coordinator "127.0.0.1:$REALM_PORT" workers | tee "$work/workers" >&2
    local n
    n="$(grep -c -F $'\t'"$1" "$work/workers" || true)"
    [[ "$n" == 3 ]] || { log "$n of the 3 workers show \"$1\" in realm workers"; exit 1; }
}

up_and_ask "first start, empty caches"
first_up_ms=$up_ms

# Without the key, or with a wrong one, the coordinator refuses the client; health stays open.
refused() {   # $1: what; the rest: the client's environment change
    local what="$1"; shift
    if env "$@" "$realm" --coordinator "127.0.0.1:$REALM_PORT" generate \
            --prompt "The capital of France is" --max-tokens 4 >"$work/refused.out" 2>"$work/refused.err"; then
        log "a client $what got an answer: the coordinator does not check API keys"
        exit 1
    fi
    if ! grep -qi unauthenticated "$work/refused.err"; then
        log "a client $what failed, but not with UNAUTHENTICATED: $(head -c 300 "$work/refused.err")"
        exit 1
    fi
    [[ ! -s "$work/refused.out" ]] || { log "a client $what got output"; exit 1; }
    log "a client $what is refused: UNAUTHENTICATED"
}
refused "without the API key" -u REALM_API_KEY
refused "with a wrong API key" REALM_API_KEY="wrong-$(secret)"
env -u REALM_API_KEY "$realm" health "127.0.0.1:$REALM_PORT" --timeout-secs 2 >/dev/null \
    || { log "the health check needs a key: Kubernetes probes would fail"; exit 1; }

# The workers' network has no way out; the coordinator is reachable on loopback only.
workers_net="$(docker network ls --quiet --filter "name=${project}_workers")"
[[ "$(docker network inspect -f '{{.Internal}}' "$workers_net")" == true ]] \
    || { log "the workers' network is not internal"; exit 1; }
published="$("${compose[@]}" port coordinator 7000)"
[[ "$published" == "127.0.0.1:$REALM_PORT" ]] \
    || { log "the coordinator is published on $published, not 127.0.0.1:$REALM_PORT alone"; exit 1; }
# Every container runs as the image's unprivileged user and passes its own health check.
for service in worker-1 worker-2 worker-3 coordinator; do
    container="$("${compose[@]}" ps --quiet "$service")"
    uid="$(docker exec "$container" id -u)"
    [[ "$uid" == 10001 ]] || { log "$service runs as uid $uid, not 10001"; exit 1; }
    for _ in $(seq 60); do
        [[ "$(docker inspect -f '{{.State.Health.Status}}' "$container")" == healthy ]] && break
        sleep 0.5
    done
    health="$(docker inspect -f '{{.State.Health.Status}}' "$container")"
    [[ "$health" == healthy ]] || { log "$service is $health, not healthy"; exit 1; }
done
# Only the coordinator mounts the models, read-only; each worker mounts nothing but a writable
# volume of its own at /cache.
volumes=()
for service in worker-1 worker-2 worker-3 coordinator; do
    container="$("${compose[@]}" ps --quiet "$service")"
    mounts="$(docker inspect -f '{{range .Mounts}}{{.Destination}}:{{.Type}}:{{.RW}} {{end}}' "$container")"
    mounts="${mounts% }"
    case "$service" in
        coordinator) want="/models:bind:false" ;;
        *) want="/cache:volume:true"
           volumes+=("$(docker inspect -f '{{range .Mounts}}{{.Name}}{{end}}' "$container")") ;;
    esac
    [[ "$mounts" == "$want" ]] || { log "$service mounts '$mounts', want '$want' alone"; exit 1; }
done
[[ "$(printf '%s\n' "${volumes[@]}" | sort -u | wc -l)" == 3 ]] \
    || { log "the workers share cache volumes: ${volumes[*]}"; exit 1; }
log "only the coordinator mounts /models; each worker has its own /cache volume"

# The workers received their layers: one miss each, and each cache holds exactly one shard file
# (no partial one left).
workers_show "cache: 0 hits, 1 miss, "
for budget in 256.0 64.0 16.0; do
    grep -q "/$budget MiB" "$work/workers" || { log "no worker runs with its $budget MiB budget"; exit 1; }
done
if grep -q " 0 B received" "$work/workers"; then
    log "a worker shows a miss but received nothing"
    exit 1
fi
shards >"$work/shards.first"
for service in worker-1 worker-2 worker-3; do
    n="$(grep -c "^$service .*\.gguf " "$work/shards.first" || true)"
    [[ "$n" == 1 ]] || { log "$service's cache holds $n shard files, not 1"; cat "$work/shards.first" >&2; exit 1; }
done
if grep -q '\.partial ' "$work/shards.first"; then
    log "a finished delivery left a partial file"
    exit 1
fi
log "each worker's cache holds one shard: $(awk '{printf "%s%s %.1f MiB", sep, $1, $3 / 1048576; sep = ", "}' "$work/shards.first")"
"${compose[@]}" ps >&2

# Down and up again, keeping the volumes: every worker takes its shard from its cache, so nothing
# is delivered and the shard files are the same ones, untouched.
"${compose[@]}" down --remove-orphans --timeout 10 >/dev/null
up_and_ask "again, caches kept"
restart_up_ms=$up_ms
workers_show "cache: 1 hit, 0 misses, 0 B received, "
shards >"$work/shards.again"
if ! cmp -s "$work/shards.first" "$work/shards.again"; then
    log "the shard files changed across the restart:"
    diff "$work/shards.first" "$work/shards.again" >&2 || true
    exit 1
fi
log "restarted from the caches: nothing delivered, the shard files untouched"

"${compose[@]}" down --volumes --remove-orphans --timeout 10 >/dev/null
size() { docker image inspect -f '{{.Size}}' "$1" | awk '{printf "%.1f MB", $1 / 1e6}'; }
echo "compose-test: ok: answer mentions Paris, the workers hold no model, a restart delivers nothing"
echo "compose-test: image $image $(size "$image"), base $base $(size "$base")"
echo "compose-test: time from up to the first streamed token: $first_up_ms ms (layers delivered to the workers)"
echo "compose-test: time from up again to the first streamed token: $restart_up_ms ms (layers from the workers' caches)"

# --- the Kubernetes manifests' pods ------------------------------------------------------------
"$root/deploy/k8s-validate.sh" >/dev/null   # installs the YAML reader with the validator
"${REALM_TOOLS_DIR:-$root/target/tools}/kubernetes-validate/bin/python" "$root/deploy/k8s-pods.py" \
    --image "$image" --models "$REALM_MODELS_DIR" --realm "$realm" --port "$REALM_PORT"
