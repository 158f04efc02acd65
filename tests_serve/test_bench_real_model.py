"""``hicache bench multiturn --model-path FILE.gguf``: the main job on a real trained model (SmolLM2-135M-Instruct
from its GGUF file): English prompts cut by its tokenizer, its replies as text in the report, the same tokens in
every configuration and after a warm restart that reads storage."""

from __future__ import annotations

import json
import subprocess
import sys

from test_real_checkpoint import smollm2_gguf

from conftest import REPO


def test_bench_multiturn_runs_on_a_real_model_and_reports_its_text(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "hicache_core.cli",
            "bench",
            "multiturn",
            "--model-path",
            str(smollm2_gguf()),
            "--configs",
            "hicache+storage",
            "--num-clients",
            "2",
            "--num-rounds",
            "2",
            "--request-length",
            "64",
            "--question-length",
            "24",
            "--output-length",
            "6",
            "--device-tokens",
            "192",
            "--page-size",
            "16",
            "--no-progress",
            "--json",
            "--report-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    s = out["summary"]
    assert s["outputs_identical"] == {"none": True, "hicache+storage": True}
    assert s["warm_outputs_identical"] and s["warm_storage_tokens"] > 0
    replies = s["replies_text"]
    assert len(replies) == 2 and all(any(c.isalpha() for c in t) for t in replies), replies  # words, not ids
    assert out["configs"][0]["rounds"][0]["prompt_tokens"] == 2 * 64
