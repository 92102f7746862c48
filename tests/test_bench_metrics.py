"""Benchmark metric arithmetic on synthetic timestamps: TPOT, ITL, percentiles, goodput, throughputs."""

from __future__ import annotations

import numpy as np
import pytest

from lmserve.bench import datasets
from lmserve.bench.metrics import (
    RequestRecord,
    compute_metrics,
    format_mmm,
    inter_token_latencies,
    median_min_max,
    meets_slo,
    parse_goodput,
    percentile,
    summarize,
    tpot,
)


def record(ttft: float, chunk_gaps: list[float], prompt_len: int = 10, output_tokens: int | None = None,
           success: bool = True) -> RequestRecord:
    """A request whose first chunk came at `ttft` and the next ones after `chunk_gaps` (seconds)."""
    times = [ttft]
    for gap in chunk_gaps:
        times.append(times[-1] + gap)
    n = len(times) if output_tokens is None else output_tokens
    return RequestRecord(success=success, prompt_len=prompt_len, output_tokens=n, ttft=ttft, latency=times[-1],
                         itl=inter_token_latencies(times))


def test_tpot_is_decode_time_over_tokens_after_the_first():
    assert tpot(0.5, 1.5, 11) == pytest.approx(0.1)
    assert tpot(0.5, 0.5, 1) is None
    assert tpot(0.5, 0.5, 0) is None
    r = record(0.2, [0.05, 0.05, 0.10])
    assert r.latency == pytest.approx(0.4)
    assert r.tpot == pytest.approx((0.4 - 0.2) / 3)


def test_itl_are_the_gaps_between_chunks():
    assert inter_token_latencies([1.0, 1.25, 1.75, 2.0]) == pytest.approx([0.25, 0.5, 0.25])
    assert inter_token_latencies([1.0]) == []
    assert inter_token_latencies([]) == []


@pytest.mark.parametrize("q", [0, 1, 25, 50, 90, 99, 99.9, 100])
def test_percentile_matches_numpy_linear(q):
    values = [0.3, 5.0, 1.2, 9.9, 2.2, 2.2, 7.1]
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_edges():
    assert percentile([], 50) == 0.0
    assert percentile([4.0], 99) == 4.0
    with pytest.raises(ValueError, match="percentile"):
        percentile([1.0], 101)


def test_summarize_in_ms_with_extra_percentiles():
    out = summarize("ttft", [0.1, 0.2, 0.3, 0.4], [50, 90, 99.5])
    assert out["mean_ttft_ms"] == pytest.approx(250.0)
    assert out["median_ttft_ms"] == pytest.approx(250.0)
    assert out["std_ttft_ms"] == pytest.approx(float(np.std([100, 200, 300, 400])))
    assert out["p90_ttft_ms"] == pytest.approx(float(np.percentile([100, 200, 300, 400], 90)))
    assert out["p99_5_ttft_ms"] == pytest.approx(float(np.percentile([100, 200, 300, 400], 99.5)))
    assert summarize("itl", [])["mean_itl_ms"] == 0.0


def test_compute_metrics_on_synthetic_requests():
    records = [
        record(0.1, [0.02] * 4, prompt_len=8),           # 5 tokens, e2el 0.18, tpot 0.02
        record(0.3, [0.04] * 9, prompt_len=12),          # 10 tokens, e2el 0.66, tpot 0.04
        record(0.2, [], prompt_len=5),                   # 1 token: no TPOT, no ITL
        RequestRecord(success=False, prompt_len=99, error="HTTP 500"),
    ]
    m = compute_metrics(records, duration_s=2.0, percentiles=[50, 99])
    assert (m["completed"], m["failed"]) == (3, 1)
    assert m["total_input_tokens"] == 25 and m["total_output_tokens"] == 16
    assert m["request_throughput"] == pytest.approx(1.5)
    assert m["output_throughput"] == pytest.approx(8.0)
    assert m["total_token_throughput"] == pytest.approx(20.5)
    assert m["mean_ttft_ms"] == pytest.approx(200.0)
    assert m["median_ttft_ms"] == pytest.approx(200.0)
    assert m["mean_tpot_ms"] == pytest.approx(30.0)              # mean of 20 and 40: the 1-token request has none
    assert m["mean_itl_ms"] == pytest.approx((4 * 20 + 9 * 40) / 13)
    assert m["p99_itl_ms"] == pytest.approx(40.0)
    assert m["mean_e2el_ms"] == pytest.approx((180 + 660 + 200) / 3)
    assert m["p99_e2el_ms"] == pytest.approx(float(np.percentile([180, 660, 200], 99)))
    assert "request_goodput" not in m
    with pytest.raises(ValueError, match="duration"):
        compute_metrics(records, 0.0)


def test_goodput_counts_requests_meeting_every_slo():
    records = [record(0.1, [0.02] * 4), record(0.3, [0.04] * 9), record(0.05, [0.1, 0.1]),
               RequestRecord(success=False)]
    assert parse_goodput(["ttft:200", "TPOT:30"]) == {"ttft": 200.0, "tpot": 30.0}
    slos = parse_goodput(["ttft:200", "tpot:30"])
    assert [meets_slo(r, slos) for r in records] == [True, False, False, False]
    m = compute_metrics(records, 4.0, goodput_slos=slos)
    assert m["request_goodput"] == pytest.approx(0.25)
    assert compute_metrics(records, 1.0, goodput_slos={"e2el": 300})["request_goodput"] == pytest.approx(2.0)
    single = record(0.1, [])
    assert meets_slo(single, {"tpot": 0.0})  # a one-token request has no TPOT to miss


@pytest.mark.parametrize("bad", ["ttft", "foo:10", "ttft:abc", "tpot:-1"])
def test_goodput_spec_errors_name_the_item(bad):
    with pytest.raises(ValueError, match="--goodput"):
        parse_goodput([bad])


def test_median_min_max_format():
    assert median_min_max([3.0, 1.0, 2.0]) == (2.0, 1.0, 3.0)
    assert format_mmm([116.3, 109.0, 118.24]) == "116.3 [109.0–118.2]"
    assert format_mmm([5.0]) == "5.0"


def test_datasets_exact_lengths_and_shared_prefix():
    prompts = datasets.random_prompts(4, 16, 8, vocab_size=50, exclude_ids={0, 1, 2}, seed=3)
    assert all(len(p.prompt) == 16 == p.prompt_len and p.output_len == 8 for p in prompts)
    assert all(t >= 3 and t < 50 for p in prompts for t in p.prompt)
    assert prompts[0].prompt == datasets.random_prompts(4, 16, 8, 50, {0, 1, 2}, seed=3)[0].prompt
    shared = datasets.shared_prefix_prompts(3, prefix_len=10, input_len=4, output_len=2, vocab_size=1000, seed=1)
    assert all(p.prompt[:10] == shared[0].prompt[:10] and p.prompt_len == 14 for p in shared)
    assert len({tuple(p.prompt[10:]) for p in shared}) == 3
    with pytest.raises(ValueError, match="input_len"):
        datasets.random_prompts(1, 0, 8, 50)
