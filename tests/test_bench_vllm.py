"""``hicache bench vllm``'s arithmetic, without vLLM: medians and ranges over repeated runs (one vllm serve differs
from the next by several percent, more than the connector's own all-miss cost)."""

import argparse

import pytest

from hicache_core.bench import vllm
from hicache_core.errors import ConfigError


def fake(unique_s: list[float], rounds_s: list[list[float]]) -> dict:
    return {
        "unique": [{"ttft": t, "tokens": [1], "cached": 0} for t in unique_s],
        "rounds": [[{"ttft": t, "tokens": [2], "cached": 128} for t in rnd] for rnd in rounds_s],
    }


def test_repeated_runs_report_the_median_and_range():
    runs = {
        "alone": [fake([2.0, 2.0], [[1.0], [3.0]]), fake([2.2, 2.2], [[1.0], [5.0]]), fake([1.9, 1.9], [[1.0], [4.0]])],
        "hicache": [fake([2.1, 2.1], [[1.0], [0.5]])],
    }
    s = vllm.summarize_runs(runs)
    assert s["alone"]["unique_ttft_ms"] == pytest.approx(2000.0)
    assert s["alone"]["unique_ttft_range_ms"] == pytest.approx([1900.0, 2200.0])
    assert s["alone"]["rounds2plus_ttft_ms"] == pytest.approx(4000.0)
    assert s["alone"]["round_ttft_ms"] == pytest.approx([1000.0, 4000.0])
    assert "unique_ttft_range_ms" not in s["hicache"]  # one run: no range
    assert s["hicache"]["rounds2plus_ttft_ms"] == pytest.approx(500.0)


def test_repeat_below_one_is_refused_before_anything_starts(monkeypatch):
    p = argparse.ArgumentParser()
    vllm.add_arguments(p)
    monkeypatch.setattr(vllm, "default_model", lambda: pytest.fail("must not convert a model first"))
    monkeypatch.setattr("importlib.util.find_spec", lambda name: object())  # as if vLLM were installed
    args = p.parse_args(["--repeat", "0", "--model", "/nonexistent"])
    with pytest.raises(ConfigError, match="--repeat 0"):
        vllm.run(args)
