"""Benchmark metric arithmetic, with vLLM's names: pure functions over per-request timestamps, no I/O.

Per request (times in seconds, from the moment the request was sent):
  TTFT  time to the first streamed chunk;
  E2EL  end-to-end latency, to the last streamed chunk (as vLLM's client);
  TPOT  (E2EL - TTFT) / (output_tokens - 1): the mean time per output token after the first (needs >= 2 tokens);
  ITL   the gaps between consecutive chunks (one value per gap, so a chunk of several tokens is one gap).
Aggregates are reported in milliseconds as mean / median / std / pNN, throughputs per second of benchmark wall time,
and goodput counts only the requests that met every SLO given (`ttft`, `tpot`, `e2el`, in ms, as in vLLM).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

SLO_KEYS = ("ttft", "tpot", "e2el")
DEFAULT_PERCENTILES = (99.0,)


@dataclass
class RequestRecord:
    """What the client saw of one request."""

    success: bool = False
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0                      # seconds
    latency: float = 0.0                   # E2EL, seconds
    itl: list[float] = field(default_factory=list)  # gaps between content chunks, seconds
    start_time: float = 0.0                # when it was sent, on the client's monotonic clock
    error: str = ""

    @property
    def tpot(self) -> float | None:
        return tpot(self.ttft, self.latency, self.output_tokens)


def tpot(ttft: float, e2el: float, output_tokens: int) -> float | None:
    """Time per output token after the first; None when fewer than two tokens came back."""
    if output_tokens < 2:
        return None
    return (e2el - ttft) / (output_tokens - 1)


def inter_token_latencies(chunk_times: Sequence[float]) -> list[float]:
    """The gaps between consecutive chunk arrival times."""
    return [b - a for a, b in zip(chunk_times, chunk_times[1:], strict=False)]


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics, as numpy's default."""
    if not values:
        return 0.0
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(rank), math.ceil(rank)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def percentile_name(q: float) -> str:
    return f"p{q:g}".replace(".", "_") if q != int(q) else f"p{int(q)}"


def summarize(name: str, values_s: Sequence[float], percentiles: Iterable[float] = DEFAULT_PERCENTILES,
              ) -> dict[str, float]:
    """{mean,median,std,pNN}_{name}_ms from values in seconds (zeros for an empty list, as vLLM)."""
    ms = [v * 1000.0 for v in values_s]
    n = len(ms)
    mean = sum(ms) / n if n else 0.0
    std = math.sqrt(sum((v - mean) ** 2 for v in ms) / n) if n else 0.0
    out = {f"mean_{name}_ms": mean, f"median_{name}_ms": percentile(ms, 50), f"std_{name}_ms": std}
    for q in percentiles:
        out[f"{percentile_name(q)}_{name}_ms"] = percentile(ms, q)
    return out


def parse_goodput(specs: Sequence[str] | None) -> dict[str, float]:
    """['ttft:500', 'tpot:50'] -> {'ttft': 500.0, 'tpot': 50.0} (milliseconds); errors name the bad item."""
    slos: dict[str, float] = {}
    for spec in specs or []:
        key, sep, value = spec.partition(":")
        key = key.strip().lower()
        if not sep or key not in SLO_KEYS:
            raise ValueError(f"--goodput: '{spec}' must be KEY:MS with KEY one of {', '.join(SLO_KEYS)}")
        try:
            slos[key] = float(value)
        except ValueError:
            raise ValueError(f"--goodput: '{spec}': '{value}' is not a number of milliseconds") from None
        if slos[key] < 0:
            raise ValueError(f"--goodput: '{spec}': the SLO must be >= 0 ms")
    return slos


def meets_slo(record: RequestRecord, slos: dict[str, float]) -> bool:
    """True when the request succeeded and every given SLO (ms) holds; a request without a TPOT passes tpot."""
    if not record.success:
        return False
    values = {"ttft": record.ttft, "e2el": record.latency, "tpot": record.tpot or 0.0}
    return all(values[key] * 1000.0 <= limit for key, limit in slos.items())


def compute_metrics(records: Sequence[RequestRecord], duration_s: float,
                    percentiles: Iterable[float] = DEFAULT_PERCENTILES,
                    goodput_slos: dict[str, float] | None = None) -> dict[str, Any]:
    """vLLM's `bench serve` result fields from the records of one run lasting `duration_s` seconds."""
    if duration_s <= 0:
        raise ValueError(f"duration must be > 0 s, got {duration_s}")
    percentiles = list(percentiles)
    ok = [r for r in records if r.success]
    input_tokens = sum(r.prompt_len for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    result: dict[str, Any] = {
        "duration": duration_s,
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration_s,
        "output_throughput": output_tokens / duration_s,
        "total_token_throughput": (input_tokens + output_tokens) / duration_s,
    }
    if goodput_slos:
        result["request_goodput"] = sum(meets_slo(r, goodput_slos) for r in records) / duration_s
    result.update(summarize("ttft", [r.ttft for r in ok], percentiles))
    result.update(summarize("tpot", [t for r in ok if (t := r.tpot) is not None], percentiles))
    result.update(summarize("itl", [gap for r in ok for gap in r.itl], percentiles))
    result.update(summarize("e2el", [r.latency for r in ok], percentiles))
    return result


def median_min_max(values: Sequence[float]) -> tuple[float, float, float]:
    """(median, min, max) of repeated measurements."""
    if not values:
        raise ValueError("no values")
    return percentile(values, 50), min(values), max(values)


def format_mmm(values: Sequence[float], digits: int = 1) -> str:
    """'median [min–max]' of repeated measurements, e.g. '116.3 [109.0–118.2]'."""
    med, lo, hi = median_min_max(values)
    if len(values) == 1:
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} [{lo:.{digits}f}–{hi:.{digits}f}]"
