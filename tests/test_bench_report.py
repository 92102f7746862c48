"""The side-by-side report names the machine its runs were made on, wherever it is rendered."""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from anchors import Anchors  # noqa: E402
from report import machine_record, write_report  # noqa: E402
from side_by_side import save_machine  # noqa: E402

ELSEWHERE = {"cpu_model": "Some Other CPU", "logical_cores": 2, "cpu_flags": ["avx2"], "mem_gib": 24.0,
             "lmserve_versions": {"python": "3.11.7", "torch": "2.13.0+cpu"},
             "anchors": {"vllm": {"ok": True, "versions": {"vllm": "0.32.0+cpu"}}}}


def _one_w3_run(results: Path) -> None:
    run = results / "W3" / "lmserve" / "r0.json"
    run.parent.mkdir(parents=True)
    run.write_text(json.dumps({"workload": "W3", "engine": "lmserve", "repeat": 0, "how": "lmserve serve",
                               "dtype": "float32", "cpu_busy_before": 0.01, "lmserve_git": "abc1234",
                               "figures": {"ttft_ms": 100.0, "tpot_ms": 10.0, "decode_tok_s": 100.0}}))


def test_report_names_the_saved_machine_not_the_one_rendering_it(tmp_path):
    results = tmp_path / "results"
    _one_w3_run(results)
    (results / "machine.json").write_text(json.dumps(ELSEWHERE))
    out = tmp_path / "report.md"
    write_report(results, out, Anchors(tmp_path / "anchors"), SimpleNamespace(smoke=False))
    text = out.read_text()
    assert "- CPU: Some Other CPU, 2 logical cores, 24 GiB RAM; matmul-relevant flags: avx2 (no avx512f" in text
    assert "- lmserve: git abc1234; python 3.11.7, torch 2.13.0+cpu" in text
    assert "- vllm: vllm 0.32.0+cpu" in text and "not set up yet" not in text


def test_runs_of_another_machine_are_not_mixed_into_saved_ones(tmp_path):
    here = machine_record(Anchors(tmp_path / "anchors"))
    (tmp_path / "machine.json").write_text(json.dumps(ELSEWHERE))
    with pytest.raises(SystemExit, match="holds runs of another machine \\(Some Other CPU, avx2\\)"):
        save_machine(tmp_path, here, force=False)
    save_machine(tmp_path, here, force=True)
    assert json.loads((tmp_path / "machine.json").read_text())["cpu_model"] == here["cpu_model"]
    save_machine(tmp_path, here, force=False)  # the same machine adds runs freely
