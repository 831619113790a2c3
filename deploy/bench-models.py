#!/usr/bin/env python3
"""Benchmark of several models over one pool of workers: SmolLM2 and gemma3 served by one
coordinator over two workers that each hold both files.

    deploy/bench-models.py [--rounds 3] [--seconds 15] [--clients 4]

- memory: each worker's resident set (VmRSS from /proc) after both models have generated, beside
  the same workers serving each model alone;
- speed: one streaming client of each model (`realm load --clients 1`, 64 tokens a request),
  alone and while --clients streams of the other model run, in alternated rounds.

Prints medians with the spread (min-max) and the ratios measured in the same run.
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchproc import BIN, ROOT, Proc, log, spread  # noqa: E402

MODELS = {
    "SmolLM2-135M-Instruct.Q4_1": ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf",
    "gemma-3-270m-q4_k_m": ROOT / "models" / "gemma-3-270m-q4_k_m.gguf",
}
MAX_TOKENS = 64


def cluster(models, work, tag):
    """Two workers holding every file of `models` (one compute thread each) and a coordinator
    serving them all."""
    files = [a for m in models for a in ("--model", str(MODELS[m]))]
    env = {"REALM_THREADS": "1"}
    workers = [Proc([str(BIN / "realm-worker"), "--listen", "127.0.0.1:0", *files],
                    work / f"{tag}-worker-{i}.log", env) for i in range(2)]
    args = [str(BIN / "realm-coordinator"), "serve", "--listen", "127.0.0.1:0", *files]
    for w in workers:
        args += ["--worker", w.addr]
    return Proc(args, work / f"{tag}-coordinator.log", env), workers


def load(coord, model, clients, seconds):
    """`realm load` of `model`: the Popen, its JSON report on stdout when it ends."""
    return subprocess.Popen(
        [str(BIN / "realm"), "--coordinator", coord.addr, "load", "--model", model, "--clients",
         str(clients), "--duration-secs", str(seconds), "--max-tokens", str(MAX_TOKENS), "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def rate(proc):
    out, _ = proc.communicate()
    report = json.loads(out)
    if report["failed"] or report["inconsistent"]:
        raise SystemExit(f"load failed: {report}")
    return report["tokens_per_second"]


def one_stream(coord, model, seconds, other=None, clients=0):
    """Tokens/s of one client of `model`, with `clients` clients of `other` running meanwhile."""
    background = load(coord, other, clients, seconds + 2) if other else None
    measured = rate(load(coord, model, 1, seconds))
    if background:
        rate(background)
    return measured


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=15)
    ap.add_argument("--clients", type=int, default=4)
    args = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "--quiet", "--bins"], cwd=ROOT, check=True)
    work = ROOT / "target" / "bench-models"
    work.mkdir(parents=True, exist_ok=True)
    names = list(MODELS)

    # Memory: the workers of each model alone, then of both, each after generating.
    rss = {}
    for tag, models in [("smollm2", names[:1]), ("gemma3", names[1:]), ("both", names)]:
        coord, workers = cluster(models, work, tag)
        for m in models:
            rate(load(coord, m, 2, 3))
        rss[tag] = [w.status_kib("VmRSS") / 1024 for w in workers]
        coord.stop()
        for w in workers:
            w.stop()
        log(f"{tag}: worker RSS {', '.join(f'{r:.0f}' for r in rss[tag])} MiB")

    coord, workers = cluster(names, work, "speed")
    alone = {m: [] for m in names}
    loaded = {m: [] for m in names}
    for r in range(args.rounds):
        order = names if r % 2 == 0 else names[::-1]
        for m in order:
            other = names[1 - names.index(m)]
            if r % 2 == 0:
                alone[m].append(one_stream(coord, m, args.seconds))
                loaded[m].append(one_stream(coord, m, args.seconds, other, args.clients))
            else:
                loaded[m].append(one_stream(coord, m, args.seconds, other, args.clients))
                alone[m].append(one_stream(coord, m, args.seconds))
            log(f"round {r + 1} {m}: alone {alone[m][-1]:.1f} tok/s, beside {args.clients} "
                f"streams of {other} {loaded[m][-1]:.1f} tok/s")
    coord.stop()
    for w in workers:
        w.stop()

    print("worker resident memory (VmRSS), MiB, worker 1 / worker 2:")
    for tag in rss:
        print(f"  {tag}: {' / '.join(f'{r:.0f}' for r in rss[tag])}")
    print(f"one stream of {MAX_TOKENS}-token requests, tok/s, two workers of one thread each:")
    for m in names:
        ratio = [b / a for a, b in zip(alone[m], loaded[m])]
        print(f"  {m}: alone {spread(alone[m], '{:.1f}')}; beside {args.clients} streams of the "
              f"other model {spread(loaded[m], '{:.1f}')}; ratio {spread(ratio)}")


if __name__ == "__main__":
    main()
