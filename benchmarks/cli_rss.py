"""Run the onnxprune CLI in a fresh child process and read its wall time and peak RSS.

A child of its own, because the parent's peak (exports, earlier runs) must not count, and
`ru_maxrss` would carry it over fork + exec: the child resets its high-water mark through
/proc/self/clear_refs after the imports, then reports VmHWM (Linux only).
"""

from __future__ import annotations

import json
import subprocess
import sys

_CHILD = r"""
import json, sys, time
import onnx, onnxruntime, numpy  # imported before the baseline, as the CLI would
from onnxprune.cli import main
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # reset the peak (VmHWM) to the current RSS
base = status("VmRSS")
start = time.perf_counter()
code = main(sys.argv[1:])
elapsed = time.perf_counter() - start
print(json.dumps({"code": code, "seconds": elapsed, "peak_rss": status("VmHWM"), "base_rss": base}))
"""


def run_cli_measured(args: list[str]) -> dict:
    """`onnxprune ARGS` in a child: {code, seconds, peak_rss, base_rss}; exits on failure."""
    done = subprocess.run([sys.executable, "-c", _CHILD, *args], capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise SystemExit(f"onnxprune {' '.join(args)} failed: {done.stderr.strip()[-2000:]}")
    return json.loads(lines[-1])
