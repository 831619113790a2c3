#!/usr/bin/env python3
"""Benchmark of shard delivery: workers without the model file receive their layers.

    deploy/bench-delivery.py [--rounds 3] [--layers 30] [--d-model 2048]

On loopback, with a synthetic model of ~2 GB (`realm-coordinator synth`, written once to
target/synthetic/), in alternated rounds:

- delivery: two workers with empty caches (`realm-worker --cache-dir`) and a coordinator;
  the bytes sent to each worker against the bytes of its layers and of the file, and the
  transfer rate (all bytes over the wall time of the deliveries, the coordinator's one-time
  hashing of the tensors included, and without it);
- a plain TCP copy of the same number of bytes between two processes (read from the model
  file, written to a file beside the caches), the reference for the rate;
- restart: the time from starting `realm-coordinator serve` to the first token, once with two
  workers that have `--model` and once with two workers whose caches hold their layers.

Prints medians with the spread (min-max) and the ratios. Figures move from machine to machine;
the ratios are measured in one run.
"""
import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchproc import BIN, ROOT, Proc, log, spread  # noqa: E402

CHUNK = 4 << 20
PROMPT = "The capital of France is"


def worker(args, log_path):
    return Proc([str(BIN / "realm-worker"), "--listen", "127.0.0.1:0", *args], log_path)


def coordinator(model, workers, log_path):
    args = [str(BIN / "realm-coordinator"), "serve", "--model", str(model), "--listen",
            "127.0.0.1:0", "--log-format", "json"]
    for w in workers:
        args += ["--worker", w.addr]
    return Proc(args, log_path, env={"REALM_LOG": "info"})


def json_lines(path):
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def stamp(event):
    """Seconds of an event's timestamp (RFC 3339, nanoseconds cut to microseconds)."""
    from datetime import datetime
    text = event["timestamp"].rstrip("Z")
    head, _, frac = text.partition(".")
    return datetime.fromisoformat(f"{head}.{(frac + '000000')[:6]}").timestamp()


def first_token(coord):
    """Runs one greedy token through the coordinator; returns when it has arrived."""
    subprocess.run([str(BIN / "realm"), "--coordinator", coord.addr, "generate", "--prompt", PROMPT,
                    "--max-tokens", "1"], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


def delivery_round(model, work):
    """Two model-less workers with empty caches; returns (per-worker records, wall, wire)."""
    caches = [work / f"cache-{i}" for i in range(2)]
    for c in caches:
        shutil.rmtree(c, ignore_errors=True)
    workers = [worker(["--cache-dir", str(c)], work / f"worker-{i}.log") for i, c in enumerate(caches)]
    coord = coordinator(model, workers, work / "coordinator.log")
    coord.stop()
    for w in workers:
        w.stop()
    events = json_lines(work / "coordinator.log")
    msg = lambda e: e.get("fields", {}).get("message", "")
    delivered = [e["fields"] for e in events if msg(e) == "shard delivered"]
    assigned = [e["fields"] for e in events if msg(e) == "shard assigned"]
    hashed = [e["fields"] for e in events if msg(e) == "hashed the shard's tensors"]
    if len(delivered) != 2 or len(assigned) != 2:
        raise SystemExit(f"expected two deliveries; see {work / 'coordinator.log'}")
    records = []
    for a in assigned:
        records.append({"worker": a["worker"], "layers": a["layers"], "sent": int(a["sent_bytes"]),
                        "weights": int(a["weight_bytes"])})
    wire = max(float(d["secs"]) for d in delivered)
    hash_ms = max(int(h["ms"]) for h in hashed) if hashed else 0
    # From the plan (before the first assignment) to the last tensor delivered: the workers'
    # cache lookups, the hashing, the manifests and the transfers.
    planned = [stamp(e) for e in events if msg(e) == "layers planned"]
    done = [stamp(e) for e in events if msg(e) == "shard delivered"]
    wall = max(done) - min(planned)
    return records, wall, wire, hash_ms / 1000.0


def tcp_copy(model, total, out_path):
    """A plain copy of `total` bytes of the model file through a loopback TCP connection between
    two processes, written to `out_path`; returns seconds."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        conn, _ = srv.accept()
        fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        buf = memoryview(bytearray(CHUNK))
        got = 0
        while got < total:
            n = conn.recv_into(buf, min(CHUNK, total - got))
            if n == 0:
                break
            os.write(fd, buf[:n])
            got += n
        os.close(fd)
        os._exit(0 if got == total else 1)
    srv.close()
    s = socket.create_connection(("127.0.0.1", port))
    fd = os.open(model, os.O_RDONLY)
    buf = bytearray(CHUNK)
    sent = 0
    while sent < total:
        n = min(CHUNK, total - sent)
        got = os.preadv(fd, [memoryview(buf)[:n]], sent)
        s.sendall(memoryview(buf)[:got])
        sent += got
    s.close()
    os.close(fd)
    _, status = os.waitpid(pid, 0)
    secs = time.monotonic() - start
    os.unlink(out_path)
    if status != 0:
        raise SystemExit("the TCP copy failed")
    return secs


def restart_round(model, work, from_cache):
    """Seconds from starting the coordinator to the first token, the workers already up."""
    if from_cache:
        args = [["--cache-dir", str(work / f"cache-{i}")] for i in range(2)]
    else:
        args = [["--model", str(model)] for _ in range(2)]
    workers = [worker(a, work / f"restart-worker-{i}.log") for i, a in enumerate(args)]
    coord = coordinator(model, workers, work / "restart-coordinator.log")
    first_token(coord)
    secs = time.monotonic() - coord.started
    coord.stop()
    for w in workers:
        w.stop()
    if from_cache:
        events = json_lines(work / "restart-coordinator.log")
        sources = [e["fields"].get("from") for e in events
                   if e.get("fields", {}).get("message") == "shard assigned"]
        if sources != ["cache", "cache"]:
            raise SystemExit(f"a restart was not served from the caches: {sources}")
    return secs


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--d-model", type=int, default=2048)
    args = ap.parse_args()

    subprocess.run(["cargo", "build", "--release", "--quiet", "--bins"], cwd=ROOT, check=True)
    model = ROOT / "target" / "synthetic" / f"delivery-{args.layers}x{args.d_model}-q8_0.gguf"
    if not model.exists():
        model.parent.mkdir(parents=True, exist_ok=True)
        log(f"writing {model.name}...")
        subprocess.run([str(BIN / "realm-coordinator"), "synth", "--out", str(model), "--layers",
                        str(args.layers), "--d-model", str(args.d_model), "--dtype", "q8_0"],
                       check=True, stdout=subprocess.DEVNULL)
    file_bytes = model.stat().st_size
    work = ROOT / "target" / "bench-delivery"
    work.mkdir(parents=True, exist_ok=True)
    log(f"model {model.name}: {file_bytes / 1e6:.0f} MB, {args.rounds} alternated rounds")

    realm_wall, realm_wire, realm_hash, tcp, warm_model, warm_cache = [], [], [], [], [], []
    records = None
    for r in range(args.rounds):
        records, wall, wire, hash_secs = delivery_round(model, work)
        total = sum(x["sent"] for x in records)
        realm_wall.append(total / wall / 1e6)
        realm_wire.append(total / wire / 1e6)
        realm_hash.append(hash_secs)
        tcp.append(total / tcp_copy(model, total, work / "tcp-copy.bin") / 1e6)
        # The copy and the delivery leave gigabytes of dirty pages: written back before the
        # restarts are timed, so neither restart pays for them.
        os.sync()
        time.sleep(2)
        # Which goes first alternates too: the first after the copy finds the memory as the
        # copy left it.
        if r % 2 == 0:
            warm_model.append(restart_round(model, work, from_cache=False))
            warm_cache.append(restart_round(model, work, from_cache=True))
        else:
            warm_cache.append(restart_round(model, work, from_cache=True))
            warm_model.append(restart_round(model, work, from_cache=False))
        log(f"round {r + 1}: delivery {realm_wall[-1]:.0f} MB/s ({realm_wire[-1]:.0f} on the wire), "
            f"TCP copy {tcp[-1]:.0f} MB/s; serve to first token: --model {warm_model[-1]:.2f} s, "
            f"cache {warm_cache[-1]:.2f} s")

    print(f"model: {model.name}, {file_bytes:,} bytes")
    for x in records:
        print(f"  worker {x['worker']} layers {x['layers']}: sent {x['sent']:,} bytes; its layers "
              f"hold {x['weights']:,} bytes ({'equal' if x['sent'] == x['weights'] else 'DIFFERENT'}); "
              f"{100 * x['sent'] / file_bytes:.1f}% of the file")
    ratio = [a / b for a, b in zip(realm_wall, tcp)]
    wire_ratio = [a / b for a, b in zip(realm_wire, tcp)]
    restart = [c / m for c, m in zip(warm_cache, warm_model)]
    print(f"delivery to two workers, MB/s: {spread(realm_wall, '{:.0f}')} with the coordinator's "
          f"hashing ({spread(realm_hash)} s), {spread(realm_wire, '{:.0f}')} on the wire")
    print(f"plain TCP copy, MB/s: {spread(tcp, '{:.0f}')}")
    print(f"delivery / TCP copy: {spread(ratio)} (wire only {spread(wire_ratio)})")
    print(f"serve to first token, --model workers: {spread(warm_model)} s; from caches: "
          f"{spread(warm_cache)} s; ratio {spread(restart)}")


if __name__ == "__main__":
    main()
