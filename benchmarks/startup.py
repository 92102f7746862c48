#!/usr/bin/env python
"""Time `lmserve serve` on the default model from launch to a healthy /health, and its idle memory.

  .venv/bin/python benchmarks/startup.py --repeats 3 --section /work/anchors/results/full/startup.section.md
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

PORT = 8119


def start_once(extra: list[str]) -> tuple[float, float]:
    """(seconds to healthy, idle RSS in MiB) of one server start."""
    lmserve = Path(sys.executable).parent / "lmserve"
    start = time.perf_counter()
    proc = subprocess.Popen([str(lmserve), "serve", "--port", str(PORT), *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"lmserve serve exited with {proc.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/health", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.05)
        ready = time.perf_counter() - start
        time.sleep(2)
        status = Path(f"/proc/{proc.pid}/status").read_text()
        rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")) / 1024
        return ready, rss
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--section", default=None, help="also write a markdown section here")
    args = p.parse_args()
    rows = []
    variants = (([], "default (4 GiB KV pool)"), (["--kv-cache-memory-gb", "0.5"], "--kv-cache-memory-gb 0.5"))
    for extra, label in variants:
        runs = [start_once(extra) for _ in range(args.repeats)]
        ready, rss = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
        rows.append(f"| `lmserve serve` {label} | {ready:.1f} [{min(r[0] for r in runs):.1f}–"
                    f"{max(r[0] for r in runs):.1f}] | {rss:.0f} |")
    lines = ["## Startup and idle memory", "",
             f"`lmserve serve` on the default model, launch to a 200 from /health, median [min–max] of {args.repeats} "
             "starts (kernels already compiled; the first start on a machine also compiles them, "
             "about 11 s on 2 cores).", "",
             "| server | seconds to healthy | idle RSS MiB |", "|---|---|---|", *rows, ""]
    print("\n".join(lines))
    if args.section:
        Path(args.section).write_text("\n".join(lines))


if __name__ == "__main__":
    main()
