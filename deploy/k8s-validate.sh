#!/usr/bin/env bash
# Validates deploy/k8s/*.yaml against the Kubernetes API schemas (strict: unknown fields fail)
# with the PyPI package kubernetes-validate, which bundles the schemas (nothing is fetched at run
# time), for the oldest Kubernetes with native gRPC probes and a recent one; then checks that the
# manifests agree with each other (the worker list, the memory budget, the probe ports, the
# secrets: taken from one Secret that is referenced, never committed; the model file named and
# mounted by the coordinator alone, the workers' shard cache on a writable disk volume).
#
#   deploy/k8s-validate.sh
#
# The validator is installed once into a virtual environment under target/tools/.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${REALM_TOOLS_DIR:-$root/target/tools}/kubernetes-validate"
version="1.37.0"
k8s_versions=(1.27.0 1.37.0)

if [[ ! -x "$venv/bin/kubernetes-validate" ]] || [[ "$("$venv/bin/kubernetes-validate" --version)" != *"$version"* ]]; then
    echo "k8s-validate: installing kubernetes-validate $version into $venv"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "kubernetes-validate==$version"
fi

cd "$root/deploy/k8s"
for k in "${k8s_versions[@]}"; do
    "$venv/bin/kubernetes-validate" --strict --quiet -k "$k" ./*.yaml
    echo "k8s-validate: deploy/k8s/*.yaml valid for Kubernetes $k"
done

"$venv/bin/python" - ./*.yaml <<'PY'
import re, sys, yaml

docs = [d for path in sys.argv[1:] for d in yaml.safe_load_all(open(path)) if d]
by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
problems = []

config = by[("ConfigMap", "realm-config")]["data"]
workers = by[("StatefulSet", "realm-worker")]
service = by[("Service", "realm-worker")]

# The coordinator lists exactly the StatefulSet's pods, in order, by their stable names.
want = [f"realm-worker-{i}.{workers['spec']['serviceName']}:7001" for i in range(workers["spec"]["replicas"])]
if config["REALM_WORKERS"].split(",") != want:
    problems.append(f"REALM_WORKERS is {config['REALM_WORKERS']}, want {','.join(want)}")
if workers["spec"]["serviceName"] != service["metadata"]["name"] or service["spec"].get("clusterIP") != "None":
    problems.append("the StatefulSet's serviceName must be its headless Service")

UNITS = {"": 1, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30,
         "k": 10**3, "M": 10**6, "G": 10**9, "MB": 10**6, "GB": 10**9}
def size(text):
    m = re.fullmatch(r"([0-9.]+)\s*([A-Za-z]*)", text)
    if not m or m.group(2) not in UNITS:
        raise SystemExit(f"k8s-validate: cannot read size {text!r}")
    return float(m.group(1)) * UNITS[m.group(2)]

# A worker's memory holds its weight budget plus KV caches and the runtime.
budget = size(config["REALM_MEMORY_BUDGET"])
for d in docs:
    if d["kind"] not in ("StatefulSet", "Deployment"):
        continue
    for c in d["spec"]["template"]["spec"]["containers"]:
        res = c["resources"]
        if d is workers and size(res["limits"]["memory"]) < budget + (128 << 20):
            problems.append(f"{d['metadata']['name']}: memory limit {res['limits']['memory']} "
                            f"leaves under 128 MiB above REALM_MEMORY_BUDGET {config['REALM_MEMORY_BUDGET']}")
        ports = {p["containerPort"] for p in c["ports"]}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            grpc = c.get(probe, {}).get("grpc")
            if not grpc or grpc["port"] not in ports:
                problems.append(f"{d['metadata']['name']}: {probe} must be a gRPC probe on a container port")
# Secrets: no Secret (nor secret-looking ConfigMap entry) is committed; the workers take the cluster
# token, and the coordinator the same token and the API keys, from one Secret by secretKeyRef.
for d in docs:
    if d["kind"] == "Secret":
        problems.append(f"Secret {d['metadata']['name']} is committed: create it with kubectl (README)")
for key in config:
    if key in ("REALM_CLUSTER_TOKEN", "REALM_API_KEY"):
        problems.append(f"{key} is in the ConfigMap: it belongs in the Secret")
coordinator = by[("Deployment", "realm-coordinator")]
refs = {}
for d, need in ((workers, ("REALM_CLUSTER_TOKEN",)), (coordinator, ("REALM_CLUSTER_TOKEN", "REALM_API_KEY"))):
    for c in d["spec"]["template"]["spec"]["containers"]:
        env = {e["name"]: e for e in c.get("env", [])}
        for name in need:
            ref = env.get(name, {}).get("valueFrom", {}).get("secretKeyRef")
            if not ref or "value" in env.get(name, {}) or ref.get("optional"):
                problems.append(f"{d['metadata']['name']}: {name} must come from a required secretKeyRef")
                continue
            refs.setdefault(name, set()).add((ref["name"], ref["key"]))
for name, found in refs.items():
    if len(found) != 1:
        problems.append(f"{name} comes from different secrets or keys: {sorted(found)}")
if len({n for found in refs.values() for n, _ in found}) > 1:
    problems.append("the cluster token and the API keys come from different Secrets")

# Only the coordinator has the model: it names the file and mounts its folder. The workers get no
# REALM_MODEL (a worker given one needs the file) and mount no model folder; their shard cache,
# REALM_CACHE_DIR, is a writable volume on disk (an emptyDir with a sizeLimit, or a claim of the
# StatefulSet's volumeClaimTemplates), not memory (a tmpfs counts against the pod's memory).
def env_of(container):
    env = {}
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef", {}).get("name")
        env.update(by.get(("ConfigMap", ref), {}).get("data", {}) if ref else {})
    for e in container.get("env", []):
        env[e["name"]] = e.get("value")
    return env

def mounted(d, container, path):
    """(mount, volume) of the pod template mounting a folder that holds `path`, or (None, None)."""
    volumes = {v["name"]: v for v in d["spec"]["template"]["spec"].get("volumes", [])}
    for claim in d["spec"].get("volumeClaimTemplates", []):
        volumes[claim["metadata"]["name"]] = {"name": claim["metadata"]["name"], "claim": claim}
    for m in container.get("volumeMounts", []):
        if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/"):
            return m, volumes.get(m["name"])
    return None, None

for c in coordinator["spec"]["template"]["spec"]["containers"]:
    model = env_of(c).get("REALM_MODEL")
    if not model:
        problems.append("realm-coordinator: REALM_MODEL must name the model file")
    elif mounted(coordinator, c, model)[0] is None:
        problems.append(f"realm-coordinator: REALM_MODEL {model} is on no volume it mounts")
for c in workers["spec"]["template"]["spec"]["containers"]:
    env = env_of(c)
    if "REALM_MODEL" in env:
        problems.append("realm-worker: REALM_MODEL reaches the workers (from their env or ConfigMap): "
                        "they hold no model file; give it to the coordinator alone")
    for m in c.get("volumeMounts", []):
        if m["mountPath"].rstrip("/") == "/models":
            problems.append("realm-worker: mounts /models: the workers hold no model file")
    cache = env.get("REALM_CACHE_DIR")
    mount, volume = mounted(workers, c, cache) if cache else (None, None)
    if not cache:
        problems.append("realm-worker: REALM_CACHE_DIR must name the shard cache")
    elif mount is None or volume is None or mount.get("readOnly"):
        problems.append(f"realm-worker: the shard cache {cache} must be on a writable volume")
    elif "emptyDir" in volume:
        if volume["emptyDir"].get("medium") == "Memory":
            problems.append("realm-worker: the shard cache is a memory emptyDir: it would count "
                            "against the pod's memory; keep it on disk")
        if "sizeLimit" not in volume["emptyDir"]:
            problems.append("realm-worker: the shard cache's emptyDir needs a sizeLimit")
    elif "claim" not in volume:
        problems.append(f"realm-worker: the shard cache is a {sorted(volume)} volume; want an "
                        "emptyDir or a volumeClaimTemplate")

if problems:
    sys.exit("k8s-validate: " + "\nk8s-validate: ".join(problems))
print("k8s-validate: manifests agree (workers listed, memory follows the budget, gRPC probes, "
      "secrets by secretKeyRef from one uncommitted Secret, the model on the coordinator alone, "
      "the workers' shard cache on a disk volume)")
PY
