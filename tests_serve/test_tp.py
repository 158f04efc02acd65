"""`hicache serve --tp-size 2`: two rank processes behind one HTTP server give transformers' greedy tokens, with
their caches agreeing through host and storage hits, and stop together."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from test_parity import DISTINCT, PS, run_all

from conftest import REPO, serve


def test_two_ranks_serve_transformers_tokens_through_every_tier(tmp_path, checkpoint, hf):
    flags = [
        "--model-path",
        str(checkpoint),
        "--page-size",
        PS,
        "--enable-hierarchical-cache",
        "--tp-size",
        "2",
        "--hicache-storage-backend",
        "file",
        "--hicache-storage-backend-extra-config",
        json.dumps({"storage_dir": str(tmp_path / "store"), "prefetch_threshold": 64}),
        "--hicache-storage-prefetch-policy",
        "wait_complete",
        "--max-total-tokens",
        "256",
        "--hicache-ratio",
        "4",
        "--max-running-requests",
        "1",
        "--enable-metrics",
    ]
    with serve(tmp_path, *flags) as s:
        run_all(s, hf, prompts=DISTINCT)
        run_all(s, hf, expect_cached="host", prompts=DISTINCT)
        assert s.post("/flush_cache", {})[0] == 200  # a control call: every rank flushes
        out = run_all(s, hf, expect_cached="storage", prompts=DISTINCT)
        assert all(o["meta_info"]["cached_tokens_details"]["storage"] >= 64 for o in out)
        # the fleet at TP=2: both ranks restore, both retain, and their caches still agree (the tokens hold)
        assert s.post("/flush_cache", {})[0] == 200
        status, op = s.post("/hicache/prefetch", {"text": DISTINCT[0], "operation_id": "tp-restore"})
        deadline = time.monotonic() + 60
        while status == 200 and op["state"] == "running" and time.monotonic() < deadline:
            time.sleep(0.05)
            op = s.get("/hicache/prefetch/tp-restore")
        assert status == 200 and op["state"] == "success", op
        body = {"text": DISTINCT[0], "sampling_params": {"max_new_tokens": 4, "temperature": 0}}
        m = s.generate({**body, "retention_seconds": 30, "session_id": "tp"})["meta_info"]
        assert m["cached_tokens_details"]["host"] >= 64 and m["retention"]["status"] == "accepted", m
        run_all(s, hf, prompts=DISTINCT)
        assert s.post("/hicache/sessions/tp", {}, method="DELETE")[0] == 200
        status, info = s.post("/hicache/storage-backend", {}, method="DELETE")
        assert status == 200 and info["hicache_storage_backend"] is None
        run_all(s, hf, prompts=DISTINCT)  # still serving, now without storage
        proc = s.proc
    assert proc.returncode == 0, s.log.read_text()[-2000:]  # SIGTERM: rank 0 shut down, then the other rank
    assert len(list((tmp_path / "store").iterdir())) == 2  # one namespace per rank


def test_tp_size_the_model_cannot_split_is_a_clear_error():
    r = subprocess.run(
        [sys.executable, "-m", "hicache_core.cli", "serve", "--port", "0", "--tp-size", "4"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert r.returncode == 2 and "attention heads (6) must divide evenly" in r.stderr, r.stderr
