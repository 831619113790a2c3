"""What Realm's Python benchmarks share: starting the binaries as processes and printing
figures as medians with their spread."""
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "release"


def log(*args):
    print(*args, file=sys.stderr, flush=True)


class Proc:
    """A Realm binary started with its `... listening on ADDR` line awaited."""

    def __init__(self, args, log_path, env=None):
        self.log_path = log_path
        self.log = open(log_path, "w")
        full_env = dict(os.environ, **(env or {}))
        full_env.pop("REALM_CLUSTER_TOKEN", None)
        self.started = time.monotonic()
        self.p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self.log, text=True, env=full_env)
        while True:
            line = self.p.stdout.readline()
            if not line:
                raise SystemExit(f"{args[0]} did not start; see {log_path}")
            if " listening on " in line:
                self.addr = line.split()[-1]
                self.ready = time.monotonic()
                return

    def status_kib(self, key):
        """A `/proc/PID/status` figure in KiB: `VmRSS`, `VmHWM`."""
        for line in Path(f"/proc/{self.p.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise SystemExit(f"no {key} for {self.p.pid}")

    def stop(self):
        self.p.terminate()
        try:
            self.p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
        self.log.close()


def spread(values, fmt="{:.2f}"):
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"
