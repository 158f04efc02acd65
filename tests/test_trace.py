"""``hicache bench trace``: Mooncake-format traces read, checked, generated, and replayed through the reference engine
beside recompute (the tokens of every configuration equal recompute's; hits never beat the trace's ideal)."""

import argparse
import json
from pathlib import Path

import pytest

from hicache_core.bench import trace, trace_format
from hicache_core.errors import ConfigError

ENGINE = [
    "--hidden-size",
    "64",
    "--intermediate-size",
    "128",
    "--num-layers",
    "2",
    "--num-heads",
    "4",
    "--num-kv-heads",
    "2",
    "--head-dim",
    "16",
    "--vocab-size",
    "512",
    "--page-size",
    "16",
    "--device-tokens",
    "512",
    "--max-running",
    "2",
    "--hicache-ratio",
    "1",
    "--no-progress",
]


def parse(argv):
    p = argparse.ArgumentParser()
    trace.add_arguments(p)
    return p.parse_args(argv)


def write(path: Path, records) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


@pytest.mark.parametrize(
    "line, message",
    [
        ("{oops", "line 1: not JSON"),
        ('{"timestamp": 0, "input_length": 10, "output_length": 1}', "hash_ids must be a list of integers"),
        ('{"timestamp": -1, "input_length": 10, "output_length": 1, "hash_ids": [1]}', "timestamp must be a number"),
        ('{"timestamp": 0, "input_length": 0, "output_length": 1, "hash_ids": [1]}', "at least 1"),
        ('{"timestamp": 0, "input_length": 600, "output_length": 1, "hash_ids": [1]}', "cover 512 tokens, fewer"),
        ('{"timestamp": 0, "input_length": 9, "output_length": true, "hash_ids": [1]}', "output_length must be"),
    ],
)
def test_a_bad_record_is_named_with_its_line(tmp_path, line, message):
    with pytest.raises(ConfigError, match=message) as e:
        trace_format.load(write(tmp_path / "t.jsonl", [line]))
    assert "each line is like" in str(e.value)


def test_empty_and_missing_traces(tmp_path):
    with pytest.raises(ConfigError, match="holds no requests"):
        trace_format.load(write(tmp_path / "t.jsonl", [""]))
    with pytest.raises(ConfigError, match="No such file"):
        trace_format.load(str(tmp_path / "absent.jsonl"))


def test_ideal_hits_follow_shared_leading_blocks():
    recs = [
        {"timestamp": 0, "input_length": 1024, "output_length": 1, "hash_ids": [1, 2]},
        {"timestamp": 1, "input_length": 1500, "output_length": 1, "hash_ids": [1, 2, 3]},  # both blocks seen
        {"timestamp": 2, "input_length": 1024, "output_length": 1, "hash_ids": [1, 9]},  # the first only
        {"timestamp": 3, "input_length": 1024, "output_length": 1, "hash_ids": [1, 2]},  # all: one token computed
        {"timestamp": 4, "input_length": 512, "output_length": 1, "hash_ids": [7, 1]},  # block 1 elsewhere: no hit
    ]
    assert trace_format.ideal_hits(recs, 512) == [0, 1024, 512, 1023, 0]
    assert trace_format.ideal_hits(recs, 16) == [0, 32, 16, 31, 0]  # scaled: 16 tokens a block


@pytest.mark.parametrize("shape", trace_format.SHAPES)
def test_generated_traces_are_valid_and_share_prefixes(shape):
    recs = trace_format.generate(shape, sessions=5, turns=4, seed=3)
    assert len(recs) == 20 and all(trace_format._problem(r) is None for r in recs)
    assert [r["timestamp"] for r in recs] == sorted(r["timestamp"] for r in recs)
    firsts = {tuple(r["hash_ids"][: 6 if shape == "agent" else 1]) for r in recs}
    assert len(firsts) == 1  # every session starts with the same system blocks
    ideal = sum(trace_format.ideal_hits(recs, 512)) / sum(r["input_length"] for r in recs)
    assert 0.3 < ideal < 1
    assert trace_format.generate(shape, 5, 4, 3) == recs and trace_format.generate(shape, 5, 4, 4) != recs


def test_replay_through_the_engine_beside_recompute(tmp_path, capsys):
    path = str(tmp_path / "conv.jsonl")
    assert trace.run(parse(["--generate", "conversation", "--output", path, "--sessions", "3", "--turns", "3"])) == 0
    argv = [path, "--block-tokens", "16", "--time-scale", "0.0002", "--max-output", "4"]
    argv += ["--configs", "radix,hicache+storage", "--report-dir", str(tmp_path / "r")] + ENGINE
    assert trace.run(parse(argv)) == 0  # 0: every configuration gave recompute's tokens
    out = capsys.readouterr().out
    assert "ideal hit rate" in out and "where TTFT goes" in out
    report = json.loads((tmp_path / "r" / "trace.json").read_text())
    by = {c["config"]: c for c in report["configs"]}
    assert list(by) == ["none", "radix", "hicache+storage"]
    assert by["none"]["hit_rate"] == 0 and all(c["outputs_identical"] for c in by.values())
    for c in by.values():
        assert c["requests"] == 9 and c["hit_rate"] <= c["ideal_hit_rate"] + 1e-9
        assert c["ttft_p50_ms"] <= c["ttft_p90_ms"] <= c["ttft_p99_ms"]
        assert abs(sum(c["ttft_phases_ms"].values()) - c["ttft_mean_ms"]) < 1e-3
    assert by["radix"]["hit_rate"] > 0 and by["hicache+storage"]["hit_rate"] > 0


def test_bad_replay_flags(tmp_path):
    with pytest.raises(ConfigError, match="give a trace FILE"):
        trace.run(parse(ENGINE))
    with pytest.raises(ConfigError, match="--generate writes a trace: give --output"):
        trace.run(parse(["--generate", "agent"]))
    path = write(tmp_path / "t.jsonl", [{"timestamp": 0, "input_length": 9, "output_length": 1, "hash_ids": [1]}])
    with pytest.raises(ConfigError, match="--configs: unknown gpu"):
        trace.run(parse([path, "--configs", "gpu"] + ENGINE))
    with pytest.raises(ConfigError, match="drop --tp"):
        trace.run(parse([path, "--tp", "2"] + ENGINE))


def test_replay_under_both_storage_admissions_reports_l3_bytes_per_storage_hit(tmp_path, capsys):
    """--storage-admissions all,seen_twice in one replay: both give recompute's tokens, seen_twice holds back what
    was asked once and writes less to L3."""
    path = str(tmp_path / "conv.jsonl")
    assert trace.run(parse(["--generate", "conversation", "--output", path, "--sessions", "3", "--turns", "3"])) == 0
    argv = [path, "--block-tokens", "16", "--time-scale", "0.0002", "--max-output", "4"]
    argv += ["--configs", "hicache+storage", "--storage-admissions", "all,seen_twice"]
    assert trace.run(parse([*argv, "--report-dir", str(tmp_path / "r"), *ENGINE])) == 0
    by = {c["config"]: c for c in json.loads((tmp_path / "r" / "trace.json").read_text())["configs"]}
    assert list(by) == ["none", "hicache+storage", "hicache+storage@seen_twice"]
    every, twice = by["hicache+storage"], by["hicache+storage@seen_twice"]
    assert twice["storage_held_back_tokens"] > 0 == every["storage_held_back_tokens"]
    assert twice["transfer_bytes"]["storage_set"] < every["transfer_bytes"]["storage_set"]
    assert "bytes written to L3 against tokens served from it" in capsys.readouterr().out
