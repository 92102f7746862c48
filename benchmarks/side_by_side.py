#!/usr/bin/env python
"""lmserve against its anchors (transformers, llama.cpp, vLLM CPU), side by side on this machine.

Runs each workload's repeats alternating engines (A B C A B C ...) so that drift cancels, keeps every run's JSON
under --results-dir (a finished run is skipped on the next call, so the runner is resumable), then writes
docs/benchmarks.md with the machine, versions, dtypes, median [min–max] of each figure, ratios and plots.

  python benchmarks/side_by_side.py --setup --only llamacpp         # set an anchor up (slow, niced)
  python benchmarks/side_by_side.py --smoke --repeats 1             # toy sizes: prove the runner works
  python benchmarks/side_by_side.py --only lmserve,vllm --workloads W2,W3 --repeats 3
  python benchmarks/side_by_side.py --report-only                   # rewrite the report from saved runs

Run it with lmserve's venv (.venv/bin/python). One benchmark at a time on the machine: before every run it waits
until the CPUs are quiet and records how busy they were.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from anchors import ANCHORS, Anchors  # noqa: E402
from report import git_rev, machine_record, write_report  # noqa: E402
from servers import ServerPool, wait_for_quiet  # noqa: E402
from workloads import ENGINES, WORKLOADS, Plan, normalise, plan_runs  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(ENGINES), help=f"engines, comma-separated ({','.join(ENGINES)})")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="W1,W2,W3,W4")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="toy sizes, to prove the runner works (not a benchmark)")
    p.add_argument("--anchors-dir", default=os.environ.get("LMSERVE_ANCHORS_DIR", "/work/anchors"))
    p.add_argument("--results-dir", default=None, help="default: <anchors-dir>/results/{full,smoke}")
    p.add_argument("--report", default=None, help="default: docs/benchmarks.md (smoke: <results-dir>/report.md)")
    p.add_argument("--lmserve-args", default="--dtype auto --kv-cache-memory-gb 4",
                   help="engine options for lmserve (default: its own dtype choice, a 4 GiB KV cache like vLLM's)")
    p.add_argument("--lmserve-int8", action="store_true",
                   help="also run lmserve with --quantization int8 (W1-W3; AVX512-VNNI, or AVX2 on Q4 blocks)")
    p.add_argument("--vllm-dtype", default="bfloat16")
    p.add_argument("--hf-dtype", default="bfloat16")
    p.add_argument("--llamacpp-weights", default="q4_1", help="q4_1 and/or f16, comma-separated")
    p.add_argument("--llamacpp-args", default="",
                   help="extra llama-server options (e.g. --no-repack where its AMX path crashes)")
    p.add_argument("--setup", action="store_true", help="set up the selected anchors, then stop")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--force", action="store_true", help="redo runs whose results exist")
    p.add_argument("--quiet-threshold", type=float, default=0.15, help="max CPU busy fraction before a run")
    p.add_argument("--run-timeout", type=float, default=1800.0, help="seconds per measured run")
    args = p.parse_args(argv)
    args.engines = [e.strip() for e in args.only.split(",") if e.strip()]
    args.workload_names = [w.strip().upper() for w in args.workloads.split(",") if w.strip()]
    for e in args.engines:
        if e not in ENGINES:
            p.error(f"--only: unknown engine '{e}' (known: {', '.join(ENGINES)})")
    for w in args.workload_names:
        if w not in WORKLOADS:
            p.error(f"--workloads: unknown workload '{w}' (known: {', '.join(WORKLOADS)})")
    mode = "smoke" if args.smoke else "full"
    args.results = Path(args.results_dir or Path(args.anchors_dir) / "results" / mode)
    args.report_path = Path(args.report or (args.results / "report.md" if args.smoke else REPO / "docs/benchmarks.md"))
    return args


def run_one(plan: Plan, args: argparse.Namespace, pool: ServerPool, anchors: Anchors, out: Path) -> None:
    """Measure one (workload, engine variant, repeat) and save the normalised result at `out`."""
    prompts = plan.write_prompts(out.parent)
    base_url = pool.ensure(plan.server) if plan.server else None
    busy = wait_for_quiet(args.quiet_threshold)
    raw_path = out.with_suffix(".raw.json")
    argv, env = plan.command(prompts, raw_path, base_url)
    started = time.time()
    log = out.with_suffix(".log")
    with log.open("w") as f:
        f.write(" ".join(argv) + "\n")
        f.flush()
        rc = subprocess.call(argv, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **env},
                             timeout=args.run_timeout)
    if rc != 0 or not raw_path.is_file():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise RuntimeError(f"{plan.label} {plan.workload.name} failed (exit {rc}), log {log}:\n{tail}")
    raw = json.loads(raw_path.read_text())
    record = {"workload": plan.workload.name, "engine": plan.label, "repeat": plan.repeat, "kind": plan.kind,
              "how": plan.how, "dtype": plan.dtype, "cpu_busy_before": busy, "started": started,
              "wall_s": time.time() - started, "figures": normalise(plan.kind, raw), "raw_file": raw_path.name,
              "lmserve_git": git_rev(REPO)}
    out.write_text(json.dumps(record, indent=2) + "\n")


def save_machine(results: Path, machine: dict, force: bool) -> None:
    """Record the machine beside its runs; refuse to add runs of another machine to them."""
    path = results / "machine.json"
    if path.is_file() and not force:
        saved = json.loads(path.read_text())
        if (saved["cpu_model"], saved["cpu_flags"]) != (machine["cpu_model"], machine["cpu_flags"]):
            sys.exit(f"{results} holds runs of another machine ({saved['cpu_model']}, {', '.join(saved['cpu_flags'])})"
                     ": use another --results-dir, or --force to start over")
    path.write_text(json.dumps(machine, indent=2))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    anchors = Anchors(args.anchors_dir)
    selected_anchors = [e for e in args.engines if e in ANCHORS]
    if args.setup:
        for name in selected_anchors:
            print(name, json.dumps(anchors.setup(name), indent=2), flush=True)
        return 0
    args.results.mkdir(parents=True, exist_ok=True)
    failures_path = args.results / "failures.json"
    old = json.loads(failures_path.read_text()) if failures_path.is_file() else {}
    # Failures of engines not in this call stay on record; the selected ones are tried afresh.
    failures: dict[str, str] = {k: v for k, v in old.items() if k.split("-")[0] not in args.engines}
    if not args.report_only:
        save_machine(args.results, machine_record(anchors), args.force)
        pool = ServerPool(args.results / "server-logs")
        try:
            for wname in args.workload_names:
                plans = plan_runs(WORKLOADS[wname], args, anchors, failures)
                pool.keep_only({p.server.key for p in plans if p.server})  # same config: kept running
                for plan in plans:  # already in A B C A B C order
                    out = args.results / wname / plan.label / f"r{plan.repeat}.json"
                    if out.is_file() and not args.force:
                        continue
                    if plan.label in failures:
                        continue
                    out.parent.mkdir(parents=True, exist_ok=True)
                    print(f"[{time.strftime('%T')}] {wname} {plan.label} repeat {plan.repeat}", flush=True)
                    try:
                        run_one(plan, args, pool, anchors, out)
                    except (RuntimeError, subprocess.TimeoutExpired) as e:
                        failures[plan.label] = f"{wname}: {e}"
                        print(f"  failed: {e}", file=sys.stderr, flush=True)
        finally:
            pool.stop_all()
        failures_path.write_text(json.dumps(failures, indent=2))
    write_report(args.results, args.report_path, anchors, args)
    print(f"report written to {args.report_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

