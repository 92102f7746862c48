"""PNG plots of benchmark results (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

LATENCIES = (("ttfts", "TTFT"), ("tpots", "TPOT"), ("itls", "ITL"), ("e2els", "E2EL"))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(run: dict[str, Any]) -> str:
    conc = run.get("max_concurrency")
    rate = run.get("request_rate")
    parts = [f"concurrency {conc}" if conc else "no concurrency cap"]
    if rate not in (None, "inf") and rate != float("inf"):
        parts.append(f"{rate} req/s")
    return ", ".join(parts)


def plot_serve(runs: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Latency distributions (ms) of each run; plus throughput against concurrency when there are several runs.

    Each run is a `bench serve` result with per-request lists 'ttfts', 'tpots', 'e2els' (s) and 'itls' (a list of
    gap lists per request, s), 'max_concurrency' and 'output_throughput'.
    """
    plt = _pyplot()
    several = len(runs) > 1
    ncols = 5 if several else 4
    fig, axes = plt.subplots(1, ncols, figsize=(4 * ncols, 3.4))
    for ax, (key, name) in zip(axes, LATENCIES, strict=False):
        for run in runs:
            values = run.get(key) or []
            if key == "itls":
                values = [gap for gaps in values for gap in gaps]
            values = [v * 1000.0 for v in values if v is not None]
            if values:
                ax.hist(values, bins=min(40, max(5, len(values) // 2)), alpha=0.55, label=_label(run))
        ax.set_title(f"{name} (ms)")
        ax.set_xlabel("ms")
        ax.set_ylabel("count")
    axes[0].legend(fontsize=7)
    if several:
        ax = axes[-1]
        conc = [run.get("max_concurrency") or 0 for run in runs]
        ax.plot(conc, [run["output_throughput"] for run in runs], "o-", label="output tok/s")
        ax.plot(conc, [run["total_token_throughput"] for run in runs], "s--", label="total tok/s")
        ax.set_xscale("log", base=2)
        ax.set_xticks(conc, [str(c) for c in conc])
        ax.set_xlabel("max concurrency")
        ax.set_ylabel("tokens/s")
        ax.set_title("throughput vs concurrency")
        ax.legend(fontsize=7)
    return _save(plt, fig, path, title)


def plot_bars(panels: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """One bar panel per metric: {'title', 'unit', 'bars': [(label, median, lo, hi), ...]}; whiskers min–max."""
    plt = _pyplot()
    n = max(1, len(panels))
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.6), squeeze=False)
    colors: dict[str, str] = {}  # one colour per label across panels, even where a panel lacks some labels
    for panel in panels:
        for bar in panel["bars"]:
            colors.setdefault(bar[0], f"C{len(colors) % 10}")
    for ax, panel in zip(axes[0], panels, strict=False):
        labels = [b[0] for b in panel["bars"]]
        med = [b[1] for b in panel["bars"]]
        err = [[m - b[2] for m, b in zip(med, panel["bars"], strict=True)],
               [b[3] - m for m, b in zip(med, panel["bars"], strict=True)]]
        ax.bar(range(len(labels)), med, yerr=err, capsize=4, color=[colors[label] for label in labels])
        ax.set_xticks(range(len(labels)), labels, rotation=25, ha="right", fontsize=8)
        ax.set_title(panel["title"], fontsize=9)
        ax.set_ylabel(panel.get("unit", ""))
    return _save(plt, fig, path, title)


def _save(plt: Any, fig: Any, path: str | Path, title: str) -> Path:
    """Title, tidy layout, write the PNG (creating its folder), free the figure."""
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
