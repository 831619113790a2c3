#!/usr/bin/env python3
"""Teacher-forced next-token logprob fixtures from llama.cpp, for Realm's agreement tests.

For each position i of the first N tokens of a text, llama-server is asked for the top-K
next-token logprobs after tokens[0..=i] (prompt cache on, so each request evaluates one new
token, as a decode step would). The logprobs are llama-server's `n_probs` with
`post_sampling_probs` false: the softmax of the raw logits over the whole vocabulary (see
get_token_probabilities in tools/server/server-common.cpp), sent as log(p).

The reference run has flash attention off. The same requests are made under other settings
llama.cpp offers (flash attention on; each prompt evaluated whole, as one batch, with prompt
caching off), and llama.cpp's agreement with itself is recorded: the share of positions where
the setting's top-1 token equals the reference's, and the mean |delta| of the logprob of the
reference's top token. Realm's test must agree with the reference at least as well as the
least self-consistent setting.

    LLAMA_CPP_BIN=/path/to/llama.cpp/build/bin \\
        deploy/reference-logprobs.py --model models/X.gguf --text tests/fixtures/heldout.txt \\
        --out tests/fixtures/logprobs/x.json [--positions 200] [--top 10] [--tokens ids.json]

`--tokens ids.json` (a JSON list of token ids) replaces tokenization, for models whose text
tokenization is trivial (a byte-level synthetic vocabulary); `--text` is then optional and only
recorded. `--all` regenerates every fixture listed in tests/fixtures/logprobs/manifest.json
(paths there are relative to the repository root; `models/` may be moved with
REALM_MODELS_DIR). Only the standard library is used; llama-server listens on 127.0.0.1 only.
"""

import argparse
import hashlib
import json
import math
import os
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MANIFEST = os.path.join(REPO, "tests", "fixtures", "logprobs", "manifest.json")
THREADS = 2
# Settings of llama-server compared with each other; the first is the reference. `step` is how
# many new tokens each request evaluates, in one batch: 1 as in decoding, more as in a prompt.
BATCH = 16
SETTINGS = [
    {"name": "fa-off", "flash_attn": "off", "step": 1},
    {"name": "fa-on", "flash_attn": "on", "step": 1},
    {"name": f"fa-off-batch{BATCH}", "flash_attn": "off", "step": BATCH},
    {"name": f"fa-on-batch{BATCH}", "flash_attn": "on", "step": BATCH},
]
LOGPROB_DIGITS = 5


def fail(message):
    sys.exit(f"reference-logprobs: {message}")


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port, path, body, timeout=600):
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def llama_cpp_version(bin_dir):
    """llama-server's version line, and its commit (the full hash where the build directory
    sits in llama.cpp's git checkout)."""
    out = subprocess.run(
        [os.path.join(bin_dir, "llama-server"), "--version"],
        capture_output=True,
        text=True,
        env=server_env(bin_dir),
    )
    # "version: 0.5.0-dev (build 1, commit 0c1e570)"
    line = next((l for l in (out.stdout + out.stderr).splitlines() if l.startswith("version:")), None)
    if line is None or "commit " not in line:
        fail(f"cannot read llama-server --version: {out.stderr.strip()}")
    commit = line.split("commit ", 1)[1].rstrip(")").strip()
    full = subprocess.run(
        ["git", "-C", bin_dir, "rev-parse", commit],
        capture_output=True,
        text=True,
    )
    if full.returncode == 0 and full.stdout.strip():
        commit = full.stdout.strip()
    return line.strip(), commit


def server_env(bin_dir):
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = bin_dir + (
        ":" + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else ""
    )
    return env


class Server:
    """llama-server on a free loopback port, stopped on exit from the `with` block."""

    def __init__(self, bin_dir, model, n_ctx, flash_attn):
        self.port = free_port()
        self.args = [
            os.path.join(bin_dir, "llama-server"),
            "-m", model,
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "-t", str(THREADS),
            "-tb", str(THREADS),
            "-c", str(n_ctx),
            "-np", "1",
            "--flash-attn", flash_attn,
            "--no-warmup",
            # A sliding-window cache as long as the context: otherwise the server cannot extend
            # a cached prompt of a sliding-window model (gemma3) by one token and re-evaluates
            # the last few from a checkpoint. Within the window it changes no number.
            "--swa-full",
        ]
        self.bin_dir = bin_dir
        self.log = tempfile.TemporaryFile(mode="w+")
        self.process = None

    def command(self):
        """The command line as recorded: the binary and model by file name."""
        args = list(self.args)
        args[0] = "llama-server"
        args[args.index("-m") + 1] = os.path.basename(args[args.index("-m") + 1])
        args[args.index("--port") + 1] = "PORT"
        return shlex.join(args)

    def __enter__(self):
        self.process = subprocess.Popen(
            self.args,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=server_env(self.bin_dir),
        )
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.process.poll() is not None:
                self.log.seek(0)
                fail(f"llama-server exited:\n{self.log.read()[-4000:]}")
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{self.port}/health", timeout=5
                ) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.2)
        self.__exit__(None, None, None)
        fail("llama-server did not become healthy in 300 s")

    def __exit__(self, *exc):
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()

    def tokenize(self, text):
        # add_special: BOS exactly where the model's tokenizer adds it (its add_bos_token).
        body = {"content": text, "add_special": True, "parse_special": False}
        return post(self.port, "/tokenize", body)["tokens"]

    def next_token_top(self, prompt, top, cache_prompt):
        """(top-K [(id, logprob)], tokens evaluated) for the next token after `prompt`."""
        body = {
            "prompt": prompt,
            "n_predict": 1,
            "n_probs": top,
            "temperature": 0,
            "cache_prompt": cache_prompt,
            "post_sampling_probs": False,
        }
        reply = post(self.port, "/completion", body)
        probs = reply["completion_probabilities"][0]["top_logprobs"]
        evaluated = reply.get("timings", {}).get("prompt_n")
        return [(p["id"], p["logprob"]) for p in probs], evaluated


def run_setting(bin_dir, model, tokens, top, setting, ctx=None):
    """Per position, the top-K of `setting`, and the server command it ran.

    With a `step` of S > 1 every position is the last of a batch of S new tokens (or of the
    whole prompt for the first S): pass r evaluates the prompt up to position r from scratch,
    then extends it S tokens at a time through the prompt cache.
    """
    n_ctx = ctx or max(256, 64 * math.ceil((len(tokens) + 16) / 64))
    step = setting["step"]
    with Server(bin_dir, model, n_ctx, setting["flash_attn"]) as server:
        tops = [None] * len(tokens)
        for first in range(min(step, len(tokens))):
            for i in range(first, len(tokens), step):
                fresh = i == first and (step > 1 or i == 0)
                result, evaluated = server.next_token_top(tokens[: i + 1], top, not fresh)
                want = i + 1 if fresh else step
                if evaluated != want:
                    fail(
                        f"{setting['name']}: position {i} evaluated {evaluated} tokens, "
                        f"expected {want} (prompt caching did not behave as assumed)"
                    )
                if len(result) < top:
                    fail(f"{setting['name']}: position {i} returned {len(result)} of {top} probs")
                tops[i] = result
        return tops, server.command()


def compare(reference, other):
    """(top-1 agreement, mean |delta logprob of the reference's top token|, largest delta)."""
    agree, deltas = 0, []
    for ref, got in zip(reference, other):
        agree += ref[0][0] == got[0][0]
        lookup = dict(got)
        # Outside the setting's top-K its logprob is at most its K-th one: a lower bound on
        # the difference.
        theirs = lookup.get(ref[0][0], got[-1][1])
        deltas.append(abs(ref[0][1] - theirs))
    return agree / len(reference), sum(deltas) / len(deltas), max(deltas)


def make_fixture(bin_dir, model, out, positions, top, text=None, tokens_file=None, ctx=None):
    if not os.path.isfile(model):
        fail(f"{model}: no such model file")
    version, commit = llama_cpp_version(bin_dir)
    if tokens_file:
        with open(tokens_file) as f:
            tokens = json.load(f)
        if not (isinstance(tokens, list) and all(isinstance(t, int) for t in tokens)):
            fail(f"{tokens_file}: expected a JSON list of token ids")
        source = {"tokens_file": os.path.relpath(tokens_file, REPO)}
    else:
        with open(text, encoding="utf-8") as f:
            content = f.read()
        with Server(bin_dir, model, 4096, "off") as server:
            tokens = server.tokenize(content)
        source = {"text_file": os.path.relpath(text, REPO)}
    if len(tokens) < positions:
        fail(f"the input has {len(tokens)} tokens, fewer than --positions {positions}")
    tokens = tokens[:positions]

    runs = {}
    for setting in SETTINGS:
        print(f"  {setting['name']}: {positions} requests", file=sys.stderr, flush=True)
        started = time.time()
        runs[setting["name"]] = run_setting(bin_dir, model, tokens, top, setting, ctx)
        print(f"    {time.time() - started:.1f} s", file=sys.stderr, flush=True)

    reference_name = SETTINGS[0]["name"]
    reference, reference_command = runs[reference_name]
    settings = []
    for setting in SETTINGS[1:]:
        tops, command = runs[setting["name"]]
        agreement, mean_delta, max_delta = compare(reference, tops)
        settings.append(
            {
                "name": setting["name"],
                "command": command,
                "tokens_per_request": setting["step"],
                "top1_agreement": round(agreement, 4),
                "mean_abs_delta_top_logprob": round(mean_delta, LOGPROB_DIGITS),
                "max_abs_delta_top_logprob": round(max_delta, LOGPROB_DIGITS),
                "top1": [t[0][0] for t in tops],
            }
        )
    invocation = ["deploy/reference-logprobs.py", "--model", os.path.basename(model)]
    invocation += ["--tokens", source["tokens_file"]] if tokens_file else ["--text", source["text_file"]]
    invocation += ["--out", os.path.relpath(out, REPO), "--positions", str(positions), "--top", str(top)]
    invocation += ["--ctx", str(ctx)] if ctx else []
    fixture = {
        "about": (
            "llama.cpp's teacher-forced next-token top-K logprobs (softmax of the raw logits over "
            "the whole vocabulary) after each prefix tokens[0..=i]; made by "
            "deploy/reference-logprobs.py"
        ),
        "model": os.path.basename(model),
        "model_sha256": sha256(model),
        "llama_cpp_commit": commit,
        "llama_cpp_version": version,
        **source,
        "generated_by": shlex.join(invocation),
        "positions": positions,
        "top_k": top,
        "tokens": tokens,
        "reference": {
            "name": reference_name,
            "command": reference_command,
            "tokens_per_request": 1,
            "request": {"n_predict": 1, "n_probs": top, "temperature": 0, "post_sampling_probs": False},
        },
        "self_agreement": {
            "min_top1_agreement": min(s["top1_agreement"] for s in settings),
            "max_mean_abs_delta_top_logprob": max(s["mean_abs_delta_top_logprob"] for s in settings),
            "settings": settings,
        },
        # top[i]: [[token id, logprob], ...] for the token after tokens[0..=i], best first.
        "top": [[[t, round(lp, LOGPROB_DIGITS)] for t, lp in row] for row in reference],
    }
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write(format_fixture(fixture))
    print(
        f"{out}: self-agreement "
        + ", ".join(f"{s['name']} {s['top1_agreement']:.3f}/{s['mean_abs_delta_top_logprob']:.4f}" for s in settings),
        file=sys.stderr,
    )


def format_fixture(fixture):
    """JSON with one line per position and per list of ids, so diffs stay readable."""
    text = json.dumps(fixture, indent=1)
    # Innermost lists ([id, logprob] pairs, lists of ids) on one line each, then the lists of
    # such lists (a position's top-K).
    squash = lambda m: re.sub(r"\s+", " ", m.group(0)).replace("[ ", "[").replace(" ]", "]")
    text = re.sub(r"\[[^\[\]{}]*\]", squash, text)
    text = re.sub(r"\[\s*(?:\[[^\[\]]*\]\s*,?\s*)+\]", squash, text)
    return text + "\n"


def write_synthetic(path, spec):
    """Writes the synthetic model `spec` ({"arch", "dtype"}) with Realm's own writer, which the
    agreement test runs again: the same bytes."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    command = ["cargo", "run", "--quiet", "--release", "--bin", "realm-coordinator", "--", "synth",
               "--arch", spec["arch"], "--dtype", spec["dtype"], "--out", path]
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="GGUF model file")
    parser.add_argument("--text", help="text file to tokenize with the model's tokenizer")
    parser.add_argument("--tokens", help="JSON list of token ids, used instead of tokenizing --text")
    parser.add_argument("--out", help="fixture to write")
    parser.add_argument("--positions", type=int, default=200)
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument(
        "--ctx",
        type=int,
        help="llama-server's context (default: just enough for the tokens); it decides, e.g., "
        "which of Phi-3's LongRoPE factor tables applies",
    )
    parser.add_argument("--all", action="store_true", help=f"regenerate every fixture of {os.path.relpath(MANIFEST, REPO)}")
    args = parser.parse_args()

    bin_dir = os.environ.get("LLAMA_CPP_BIN")
    if not bin_dir or not os.path.isfile(os.path.join(bin_dir, "llama-server")):
        fail("set LLAMA_CPP_BIN to the directory of llama.cpp's binaries (llama-server)")

    if args.all:
        with open(MANIFEST) as f:
            entries = json.load(f)["fixtures"]
        models_dir = os.environ.get("REALM_MODELS_DIR", os.path.join(REPO, "models"))
        for entry in entries:
            model = entry["model"]
            model = os.path.join(models_dir, model[len("models/"):]) if model.startswith("models/") else os.path.join(REPO, model)
            if "synthetic" in entry:
                write_synthetic(model, entry["synthetic"])
            resolve = lambda key: os.path.join(REPO, entry[key]) if entry.get(key) else None
            print(f"{entry['out']}:", file=sys.stderr)
            make_fixture(
                bin_dir,
                model,
                resolve("out"),
                entry.get("positions", 200),
                entry.get("top", 10),
                text=resolve("text"),
                tokens_file=resolve("tokens"),
                ctx=entry.get("ctx"),
            )
        return
    if not (args.model and args.out and (args.text or args.tokens)):
        parser.error("--model, --out and --text or --tokens are required (or --all)")
    make_fixture(bin_dir, args.model, args.out, args.positions, args.top, args.text, args.tokens, args.ctx)


if __name__ == "__main__":
    main()
