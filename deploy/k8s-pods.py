#!/usr/bin/env python3
"""Runs the pods of deploy/k8s/ under docker, as a kubelet would run them, to test the manifests
without a cluster: each StatefulSet replica under its stable DNS name (pod.service) and each
Deployment's pod behind its Service's name, with the ConfigMap's environment, the container's
command, user, read-only root, dropped capabilities and resource limits, the models' hostPath
mounted read-only (the coordinator's alone: the workers hold no model), and each pod's own
emptyDir (or StatefulSet claim) as a docker volume: the workers' shard cache, on disk (a
`medium: Memory` emptyDir becomes a tmpfs of its sizeLimit). The coordinator starts first, as it
may on a cluster, and must wait for the workers. Each pod is ready when its gRPC health answers
SERVING (what the probes ask), within its startup probe's budget. The coordinator's port is published on 127.0.0.1 only (a port-forward);
the pods' network is internal. The Secrets the manifests reference (secretKeyRef: the cluster
token, the API key) are made for the run with random values, as `kubectl create secret` would,
and reach the containers through docker's environment, never its command line. Then the Paris
prompt goes through the `realm` client with the API key, each worker's cache must then hold one
shard file (its layers, delivered by the coordinator), and a client without the key must get
UNAUTHENTICATED.

    k8s-pods.py --image realm:ci --models /path/to/models --realm target/release/realm --port N

Everything it starts is removed however it ends. Prints the time from the first pod to the
first streamed token."""
import argparse
import glob
import os
import secrets
import subprocess
import sys
import time

import yaml

LABEL = "realm.test=k8s-pods"
NETWORK = "realm-k8s-pods"
EDGE = "realm-k8s-pods-edge"


def docker(*args, check=True, capture=True, env=None):
    result = subprocess.run(["docker", *args], text=True, capture_output=capture, env=env)
    if check and result.returncode != 0:
        sys.exit(f"k8s-pods: docker {' '.join(args[:2])} failed: {result.stderr.strip()}")
    return result


def cleanup():
    ids = docker("ps", "-aq", "--filter", f"label={LABEL}", check=False).stdout.split()
    if ids:
        docker("rm", "-f", *ids, check=False)
    for net in (NETWORK, EDGE):
        docker("network", "rm", net, check=False)
    volumes = docker("volume", "ls", "-q", "--filter", f"label={LABEL}", check=False).stdout.split()
    if volumes:
        docker("volume", "rm", "-f", *volumes, check=False)


def size_bytes(quantity):
    """Bytes of a Kubernetes quantity such as 2Gi or 512M."""
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40,
             "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    for unit, factor in units.items():
        if quantity.endswith(unit):
            return int(float(quantity[:-len(unit)]) * factor)
    return int(quantity)


def pods(manifests):
    """(pod name, aliases, pod template, service port to publish or None) in start order."""
    by_kind = {}
    for d in manifests:
        by_kind.setdefault(d["kind"], []).append(d)
    services = {s["metadata"]["name"]: s for s in by_kind.get("Service", [])}

    def selected_by(template):
        labels = template["metadata"]["labels"]
        return [s for s in services.values()
                if all(labels.get(k) == v for k, v in s["spec"]["selector"].items())]

    out = []
    for d in by_kind.get("Deployment", []):
        template = d["spec"]["template"]
        aliases = [s["metadata"]["name"] for s in selected_by(template)]
        out.append((f"{d['metadata']['name']}-0", aliases, template, True))
    for s in by_kind.get("StatefulSet", []):
        template, service = s["spec"]["template"], s["spec"]["serviceName"]
        # A claim of volumeClaimTemplates is a volume of the pod, its own, as an emptyDir is.
        claims = [{"name": c["metadata"]["name"], "emptyDir": {}}
                  for c in s["spec"].get("volumeClaimTemplates", [])]
        if claims:
            spec = {**template["spec"], "volumes": [*template["spec"].get("volumes", []), *claims]}
            template = {**template, "spec": spec}
        for i in range(s["spec"]["replicas"]):
            pod = f"{s['metadata']['name']}-{i}"
            out.append((pod, [f"{pod}.{service}", pod], template, False))
    return out


def secret_refs(manifests):
    """{(secret name, key)} that the pod templates' env takes by secretKeyRef."""
    refs = set()
    for d in manifests:
        if d["kind"] in ("Deployment", "StatefulSet"):
            for c in d["spec"]["template"]["spec"]["containers"]:
                for env in c.get("env", []):
                    ref = env.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        refs.add((ref["name"], ref["key"]))
    return refs


def make_secrets(manifests):
    """{secret name: {key: random value}} for every Secret the manifests reference."""
    made = {}
    for name, key in sorted(secret_refs(manifests)):
        made.setdefault(name, {})[key] = secrets.token_hex(16)
    return made


def run_pod(name, aliases, template, config_maps, secret_data, args, publish):
    spec = template["spec"]
    (container,) = spec["containers"]
    pod_sc = spec.get("securityContext", {})
    sc = container.get("securityContext", {})
    cmd = ["run", "--detach", "--name", f"realm-k8s-{name}", "--label", LABEL, "--hostname", name,
           "--network", NETWORK]
    for alias in aliases:
        cmd += ["--network-alias", alias]
    if "runAsUser" in pod_sc:
        cmd += ["--user", f"{pod_sc['runAsUser']}:{pod_sc.get('runAsGroup', pod_sc['runAsUser'])}"]
    if sc.get("readOnlyRootFilesystem"):
        cmd.append("--read-only")
    if "ALL" in sc.get("capabilities", {}).get("drop", []):
        cmd += ["--cap-drop", "ALL"]
    if sc.get("allowPrivilegeEscalation") is False:
        cmd += ["--security-opt", "no-new-privileges:true"]
    limits = container.get("resources", {}).get("limits", {})
    if "memory" in limits:
        cmd += ["--memory", limits["memory"].replace("Mi", "m").replace("Gi", "g")]
    if "cpu" in limits:
        cmd += ["--cpus", str(limits["cpu"])]
    for source in container.get("envFrom", []):
        for key, value in config_maps[source["configMapRef"]["name"]].items():
            cmd += ["--env", f"{key}={value}"]
    # Secret values go to docker run through its environment (`--env NAME`), not its arguments.
    secret_env = dict(os.environ)
    for env in container.get("env", []):
        if "value" in env:
            cmd += ["--env", f"{env['name']}={env['value']}"]
            continue
        ref = env.get("valueFrom", {}).get("secretKeyRef")
        if not ref:
            sys.exit(f"k8s-pods: {name}: env {env['name']}: only value and secretKeyRef are run here")
        value = secret_data.get(ref["name"], {}).get(ref["key"])
        if value is None:
            sys.exit(f"k8s-pods: {name}: secret {ref['name']} has no key {ref['key']}")
        secret_env[env["name"]] = value
        cmd += ["--env", env["name"]]
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        mode = "ro" if mount.get("readOnly") else "rw"
        if "hostPath" in volume:
            # The one hostPath of the manifests: the models' folder on the node.
            cmd += ["--volume", f"{args.models}:{mount['mountPath']}:{mode}"]
        elif "emptyDir" in volume and volume["emptyDir"].get("medium") == "Memory":
            # Counted in --memory, as on a node. Writable to the pod's user, as the kubelet makes
            # an emptyDir (docker gives a tmpfs the mode of the image's folder, not mode=).
            limit = volume["emptyDir"].get("sizeLimit")
            opts = f"{mode},size={size_bytes(limit)}" if limit else mode
            if "runAsUser" in pod_sc:
                group = pod_sc.get("fsGroup", pod_sc.get("runAsGroup", pod_sc["runAsUser"]))
                opts += f",uid={pod_sc['runAsUser']},gid={group}"
            cmd += ["--tmpfs", f"{mount['mountPath']}:{opts}"]
        elif "emptyDir" in volume:
            # A new volume of the pod's own on disk; docker gives it the owner of the image's
            # folder (the kubelet makes an emptyDir writable by all). docker enforces no
            # sizeLimit; the kubelet evicts a pod past it.
            vol = f"realm-k8s-{name}-{mount['name']}"
            docker("volume", "create", "--label", LABEL, vol)
            cmd += ["--mount", f"type=volume,src={vol},dst={mount['mountPath']}"
                    + (",readonly" if mode == "ro" else "")]
        else:
            sys.exit(f"k8s-pods: {name}: volume {mount['name']}: only hostPath and emptyDir "
                     "volumes (and claims) are run here")
    if publish:
        port = container["ports"][0]["containerPort"]
        cmd += ["--publish", f"127.0.0.1:{args.port}:{port}"]
    cmd += ["--entrypoint", container["command"][0], args.image, *container["command"][1:],
            *container.get("args", [])]
    docker(*cmd, env=secret_env)
    if publish:
        # Published ports need a network that is not internal; it gets no masquerading either.
        docker("network", "connect", EDGE, f"realm-k8s-{name}")


def wait_ready(name, template):
    (container,) = template["spec"]["containers"]
    probe = container["startupProbe"]
    budget = probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)
    port = probe["grpc"]["port"]
    deadline = time.monotonic() + budget
    while time.monotonic() < deadline:
        r = docker("exec", f"realm-k8s-{name}", "realm", "health", f"127.0.0.1:{port}",
                   "--timeout-secs", "2", check=False)
        if r.returncode == 0:
            return
        running = docker("inspect", "-f", "{{.State.Running}}", f"realm-k8s-{name}").stdout.strip()
        if running != "true":
            break
        time.sleep(0.5)
    logs = docker("logs", "--tail", "30", f"realm-k8s-{name}", check=False)
    sys.exit(f"k8s-pods: {name} not ready (it exited, or its startup probe's {budget} s ran out)\n"
             f"{logs.stdout}{logs.stderr}")


def check_caches(order, config_maps):
    """Each pod with a shard cache (REALM_CACHE_DIR) holds exactly one shard file in it, and no
    pod that has one mounts the models."""
    held = []
    for name, _, template, _ in order:
        (container,) = template["spec"]["containers"]
        env = {}
        for source in container.get("envFrom", []):
            env.update(config_maps[source["configMapRef"]["name"]])
        env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
        cache = env.get("REALM_CACHE_DIR")
        if not cache:
            continue
        mounts = docker("inspect", "-f", "{{range .Mounts}}{{.Destination}} {{end}}",
                        f"realm-k8s-{name}").stdout.split()
        if "/models" in mounts or "REALM_MODEL" in env:
            sys.exit(f"k8s-pods: {name} has a shard cache and the model (mounts {mounts})")
        files = docker("exec", f"realm-k8s-{name}", "find", cache, "-maxdepth", "1", "-type", "f",
                       "-printf", "%f %s\\n").stdout.split("\n")
        shards = [f.split() for f in files if f.split() and f.split()[0].endswith(".gguf")]
        partial = [f for f in files if ".partial " in f]
        if len(shards) != 1 or partial:
            sys.exit(f"k8s-pods: {name}: its cache {cache} holds {files}, want one shard file")
        held.append(f"{name} {int(shards[0][1]) / (1 << 20):.1f} MiB")
    if not held:
        sys.exit("k8s-pods: no pod has a shard cache (REALM_CACHE_DIR)")
    print(f"k8s-pods: ok: each worker's cache holds its shard, delivered: {', '.join(held)}",
          file=sys.stderr)


def api_key(manifests, secret_data):
    """The coordinator's REALM_API_KEY, resolved as its pod sees it."""
    for d in manifests:
        if d["kind"] == "Deployment":
            for c in d["spec"]["template"]["spec"]["containers"]:
                for env in c.get("env", []):
                    if env["name"] == "REALM_API_KEY":
                        if "value" in env:
                            return env["value"]
                        ref = env["valueFrom"]["secretKeyRef"]
                        return secret_data[ref["name"]][ref["key"]]
    sys.exit("k8s-pods: the coordinator has no REALM_API_KEY")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--manifests", default=os.path.join(os.path.dirname(__file__), "k8s"))
    p.add_argument("--image", required=True)
    p.add_argument("--models", required=True)
    p.add_argument("--realm", required=True)
    p.add_argument("--port", required=True, type=int)
    args = p.parse_args()

    manifests = [d for path in sorted(glob.glob(f"{args.manifests}/*.yaml"))
                 for d in yaml.safe_load_all(open(path)) if d]
    config_maps = {d["metadata"]["name"]: d["data"] for d in manifests if d["kind"] == "ConfigMap"}
    secret_data = make_secrets(manifests)
    key = api_key(manifests, secret_data).split(",")[0]
    client_env = {k: v for k, v in os.environ.items() if k != "REALM_API_KEY"}
    cleanup()
    try:
        docker("network", "create", "--internal", "--label", LABEL, NETWORK)
        docker("network", "create", "--label", LABEL, "--opt",
               "com.docker.network.bridge.enable_ip_masquerade=false", EDGE)
        start = time.monotonic()
        order = pods(manifests)
        for name, aliases, template, publish in order:
            run_pod(name, aliases, template, config_maps, secret_data, args, publish)
            print(f"k8s-pods: started {name} as {', '.join(aliases)}", file=sys.stderr)
        for name, _, template, _ in reversed(order):
            wait_ready(name, template)
            print(f"k8s-pods: {name} ready", file=sys.stderr)
        client = [args.realm, "--coordinator", f"127.0.0.1:{args.port}", "generate",
                  "--prompt", "The capital of France is", "--max-tokens", "16"]
        gen = subprocess.Popen(client, stdout=subprocess.PIPE,
                               env={**client_env, "REALM_API_KEY": key})
        first = gen.stdout.read(1)
        first_token = time.monotonic() - start
        answer = (first + gen.stdout.read()).decode(errors="replace")
        if gen.wait() != 0 or "Paris" not in answer:
            sys.exit(f"k8s-pods: expected Paris, got {answer!r} (status {gen.returncode})")
        print(f"k8s-pods: ok: answer {answer.strip()!r}; {first_token:.1f} s from the first pod "
              "to the first streamed token")
        check_caches(order, config_maps)
        # Without the key the coordinator refuses the client.
        bare = subprocess.run(client, env=client_env, capture_output=True, text=True)
        if bare.returncode == 0 or "unauthenticated" not in bare.stderr.lower():
            sys.exit(f"k8s-pods: a client without the API key was not refused with UNAUTHENTICATED "
                     f"(status {bare.returncode}): {bare.stderr.strip()[:300]!r}")
        print("k8s-pods: ok: a client without the API key is refused (UNAUTHENTICATED)")
    finally:
        cleanup()


if __name__ == "__main__":
    main()
