"""`lmserve bench throughput` and `lmserve bench latency` end to end on a tiny model, at toy sizes."""

from __future__ import annotations

import json

import pytest
from tiny_models import LLAMA_GQA_TIED, make_tiny_model

from lmserve.cli import main


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bench-tiny")
    make_tiny_model(LLAMA_GQA_TIED, directory)
    return directory


def test_throughput_writes_json(tiny_llama, tmp_path, capsys):
    out = tmp_path / "throughput.json"
    code = main(["bench", "throughput", "--model", str(tiny_llama), "--num-prompts", "6", "--input-len", "12",
                 "--output-len", "5", "--max-num-seqs", "4", "--num-warmup-prompts", "2", "--disable-tqdm",
                 "--output-json", str(out)])
    assert code == 0
    assert "output tokens/s" in capsys.readouterr().out
    r = json.loads(out.read_text())
    assert r["num_requests"] == 6
    assert r["total_prompt_tokens"] == 6 * 12 and r["total_output_tokens"] == 6 * 5  # ignore_eos: exact lengths
    assert r["total_num_tokens"] == 6 * 17
    assert r["elapsed_time"] > 0
    assert r["requests_per_second"] == pytest.approx(6 / r["elapsed_time"])
    assert r["output_tokens_per_second"] == pytest.approx(30 / r["elapsed_time"])
    assert r["tokens_per_second"] == pytest.approx(102 / r["elapsed_time"])
    assert r["peak_rss_mib"] > 10 and r["cuda_max_allocated_mib"] is None
    assert r["config"]["engine"]["max_num_seqs"] == 4 and r["config"]["temperature"] == 0.0


def test_throughput_from_prompt_file(tiny_llama, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The quick brown fox\n\n{\"prompt\": \"Paris is the capital\"}\n{\"prompt\": [5, 6, 7]}\n",
                       encoding="utf-8")
    out = tmp_path / "t.json"
    assert main(["bench", "throughput", "--model", str(tiny_llama), "--dataset-path", str(prompts),
                 "--num-prompts", "3", "--output-len", "3", "--num-warmup-prompts", "0", "--disable-tqdm",
                 "--output-json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["num_requests"] == 3 and r["total_output_tokens"] == 9


def test_latency_writes_json(tiny_llama, tmp_path, capsys):
    out = tmp_path / "latency.json"
    code = main(["bench", "latency", "--model", str(tiny_llama), "--input-len", "10", "--output-len", "4",
                 "--num-iters", "3", "--num-iters-warmup", "1", "--output-json", str(out)])
    assert code == 0
    assert "TPOT (ms)" in capsys.readouterr().out
    r = json.loads(out.read_text())
    assert r["num_iters"] == 3
    for key in ("ttft_ms", "tpot_ms", "e2el_ms", "prefill_tokens_per_s", "decode_tokens_per_s"):
        assert len(r[key]) == 3 and all(v > 0 for v in r[key])
        assert r[f"min_{key}"] <= r[f"median_{key}"] <= r[f"max_{key}"]
    for ttft, tpot, e2el in zip(r["ttft_ms"], r["tpot_ms"], r["e2el_ms"], strict=True):
        assert tpot == pytest.approx((e2el - ttft) / 3)
    assert r["prefill_tokens_per_s"][0] == pytest.approx(10 / (r["ttft_ms"][0] / 1000))
    assert r["avg_latency"] > 0 and r["peak_rss_mib"] > 10


def test_bad_options_are_clear_errors(tiny_llama, capsys):
    assert main(["bench", "latency", "--model", str(tiny_llama), "--num-iters", "0"]) == 2
    assert "num_iters" in capsys.readouterr().err
    assert main(["bench", "throughput", "--model", str(tiny_llama), "--input-len", "0"]) == 2
    assert "input_len" in capsys.readouterr().err
