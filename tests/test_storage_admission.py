"""--hicache-storage-admission seen_twice: a page goes to L3 only once its prefix has been asked for twice. A prompt
sent once writes nothing to storage; sent again (or extended) its pages are backed up and a restarted engine finds
them; a prompt whose node was evicted meanwhile is still known by its page keys. The multi-turn benchmark runs both
admissions in one run and reports bytes written to L3 per storage-hit token."""

import json

import pytest
from test_engine import SMALL, parse

from hicache_core.bench import multiturn
from hicache_core.config import HiCacheConfig
from hicache_core.engine import Engine, ModelConfig, Request, TinyLlama
from hicache_core.errors import ConfigError

MODEL = TinyLlama(ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4))
A = list(range(10, 106))  # 96 tokens: 6 pages of 16
B = list(range(200, 296))


def _engine(store, admission, ratio=4.0):
    cfg = HiCacheConfig(
        page_size=16,
        hicache_ratio=ratio,
        hicache_storage_backend="file",
        hicache_storage_backend_extra_config={"storage_dir": str(store), "prefetch_threshold": 16},
        hicache_storage_prefetch_policy="wait_complete",
        hicache_storage_admission=admission,
    )
    return Engine(MODEL, cfg, "hicache+storage", device_tokens=256, max_running=1)


def _ask(engine, rid, prompt):
    r = engine.generate([Request(rid, prompt, 4)])[0]
    engine.flush()
    return r


def _stats(engine):
    return engine.cache.metrics.stats()


def test_a_prompt_sent_once_writes_nothing_and_a_second_ask_backs_it_up(tmp_path):
    engine = _engine(tmp_path, "seen_twice")
    try:
        _ask(engine, "a1", A)
        s = _stats(engine)
        assert s["backuped_tokens"] == 0 and s["transfer_bytes"]["storage_set"] == 0
        assert s["storage_held_back_tokens"] >= 96
        _ask(engine, "b1", B)
        again = _ask(engine, "a2", A + [7, 8, 9])  # A's prefix asked for a second time
        assert again.cached["device"] + again.cached["host"] >= 96
        assert _stats(engine)["backuped_tokens"] >= 96  # A's pages, not B's
        assert _stats(engine)["backuped_tokens"] < 96 + 96
    finally:
        engine.close()
    restarted = _engine(tmp_path, "seen_twice")
    try:
        assert _ask(restarted, "a3", A).cached["storage"] >= 80  # A came back from the store
        assert _ask(restarted, "b2", B).cached["storage"] == 0  # B, seen once, was never written
    finally:
        restarted.close()


def test_a_prompt_evicted_between_its_two_asks_is_known_by_its_page_keys(tmp_path):
    """The first ask's node is gone from device and host before the second: the second ask recomputes it as a new
    node, and its page keys, remembered when it was held back, admit it."""
    engine = _engine(tmp_path, "seen_twice", ratio=1.0)  # the host holds as little as the device
    try:
        _ask(engine, "a1", A)
        for i in range(6):  # other prompts push A off the device and the host
            _ask(engine, f"x{i}", [(120 + 50 * i + j) % 500 for j in range(96)])
        assert _stats(engine)["backuped_tokens"] == 0
        engine.cache.operator.empty_local_tiers()
        second = _ask(engine, "a2", A)
        assert second.cached["device"] + second.cached["host"] == 0  # recomputed
        assert _stats(engine)["backuped_tokens"] >= 96
    finally:
        engine.close()


def test_admission_all_backs_up_what_is_sent_once(tmp_path):
    engine = _engine(tmp_path, "all")
    try:
        _ask(engine, "a1", A)
        assert _stats(engine)["backuped_tokens"] >= 96 and _stats(engine)["storage_held_back_tokens"] == 0
    finally:
        engine.close()


def test_bench_runs_both_admissions_in_one_run_and_seen_twice_writes_less(tmp_path, capsys):
    argv = [*SMALL, "--no-warm", "--storage-admissions", "all,seen_twice", "--report-dir", str(tmp_path)]
    extra = json.dumps({"storage_dir": str(tmp_path / "store"), "prefetch_threshold": 16})
    assert multiturn.run(parse([*argv, "--hicache-storage-backend-extra-config", extra])) == 0  # tokens identical
    configs = {c["config"]: c for c in json.loads((tmp_path / "report.json").read_text())["configs"]}
    every, twice = configs["hicache+storage"], configs["hicache+storage@seen_twice"]
    assert twice["storage_held_back_tokens"] > 0 and every["storage_held_back_tokens"] == 0
    assert 0 < twice["transfer_bytes"]["storage_set"] < every["transfer_bytes"]["storage_set"]
    for c in (every, twice):
        hits = c["hit_tokens"]["storage"]
        assert c["l3_bytes_per_storage_hit"] == (c["transfer_bytes"]["storage_set"] / hits if hits else None)
    assert "bytes written to L3 against tokens served from it" in capsys.readouterr().out


def test_bad_admission_settings_are_refused():
    with pytest.raises(
        ValueError, match="--hicache-storage-admission: invalid value .twice.; choose one of all, seen_twice"
    ):
        HiCacheConfig(hicache_storage_admission="twice")
    with pytest.raises(ConfigError, match="--storage-admissions: sometimes; choose from all, seen_twice"):
        multiturn.run(parse([*SMALL, "--storage-admissions", "sometimes"]))
    with pytest.raises(ConfigError, match="give one or the other"):
        multiturn.run(parse([*SMALL, "--storage-admissions", "seen_twice", "--prefetch-policies", "best_effort"]))
