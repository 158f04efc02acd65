"""``hicache certify``: the memory backend certifies; a backend that serves wrong bytes does not."""

from __future__ import annotations

import json
from pathlib import Path

from hicache_core.cli import main

FIXTURES = Path(__file__).parent / "certify_fixtures"


def certify(capsys, *argv: str) -> tuple[int, dict]:
    rc = main(["certify", *argv, "--json"])
    return rc, json.loads(capsys.readouterr().out)


def test_memory_backend_certifies(capsys):
    rc, report = certify(capsys, "--hicache-storage-backend", "memory")
    rows = {(r["part"], r["name"]): r for r in report["rows"]}
    assert rc == 0 and report["passed"], [r for r in report["rows"] if r["outcome"] == "FAILED"]
    assert rows[("faults", "none")]["outcome"] == "passed"
    for mode in ("raise", "hang", "bool_result", "short_result", "long_result", "bad_exists", "restart"):
        assert rows[("faults", mode)]["outcome"] == "passed", rows[("faults", mode)]
        assert "wrong KV 0, leaked pages 0" in rows[("faults", mode)]["detail"]
    assert rows[("faults", "corrupt")]["outcome"] == "n/a"  # memory keeps no checksum to catch it with
    assert sum(part == "conformance" and r["outcome"] == "passed" for (part, _), r in rows.items()) >= 15


def test_a_backend_serving_wrong_bytes_is_not_certified(capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(FIXTURES))
    extra = {"backend_name": "liar", "module_path": "lying_store", "class_name": "LyingStore", "interface_v1": 1}
    rc, report = certify(
        capsys,
        "--hicache-storage-backend",
        "dynamic",
        "--hicache-storage-backend-extra-config",
        json.dumps(extra),
        "--faults",
        "none",
        "--requests",
        "20",
    )
    rows = {(r["part"], r["name"]): r for r in report["rows"]}
    assert rc == 1 and not report["passed"]
    assert rows[("faults", "none")]["outcome"] == "FAILED"
    assert "served wrong KV" in rows[("faults", "none")]["detail"]
    assert rows[("conformance", "test_v1_roundtrip[page_first]")]["outcome"] == "FAILED"


def test_certify_table_and_bad_flags(capsys):
    assert main(["certify", "--hicache-storage-backend", "memory", "--no-conformance", "--faults", "none,raise"]) == 0
    out = capsys.readouterr().out
    assert "CERTIFIED: 2 passed, 0 failed" in out and "faults      raise" in out
    assert main(["certify", "--hicache-storage-backend", "memory", "--faults", "meteor"]) == 2
    assert "--faults: unknown meteor" in capsys.readouterr().err
    assert main(["certify"]) == 2
    assert "name the backend to certify" in capsys.readouterr().err


def test_a_fault_row_that_drew_no_fault_is_drawn_again_then_fails(monkeypatch):
    from hicache_core import certify as c

    draws = []

    def row(mode, config, requests, seed, outcomes):
        draws.append(seed)
        return outcomes.pop(0)

    lucky = [
        c.Row("faults", "raise", "FAILED", f"{c.NO_FAULT} -- 120 requests, 0 faults"),
        c.Row("faults", "raise", "passed", "1 faults"),
    ]
    monkeypatch.setattr(c, "_fault_row", lambda *a: row(*a, lucky))
    assert [r.outcome for r in c.run_faults(None, 60, 7, ("raise",))] == ["passed"] and draws == [7, 1007]
    draws.clear()
    never = [c.Row("faults", "raise", "FAILED", f"{c.NO_FAULT} -- 0 faults")] * 3
    monkeypatch.setattr(c, "_fault_row", lambda *a: row(*a, never))
    assert [r.outcome for r in c.run_faults(None, 60, 7, ("raise",))] == ["FAILED"] and draws == [7, 1007, 2007]
    draws.clear()
    wrong = [c.Row("faults", "raise", "FAILED", "served wrong KV -- 3 faults")]  # any other failure stands at once
    monkeypatch.setattr(c, "_fault_row", lambda *a: row(*a, wrong))
    assert [r.outcome for r in c.run_faults(None, 60, 7, ("raise",))] == ["FAILED"] and draws == [7]
