"""``hicache bench prefill`` on a real checkpoint directory (the tiny llama transformers writes): the reference
engine timed per compute dtype, first tokens compared, a report written; bad flags end in one clear line. Beside
vLLM it runs by hand (the vllm tox env's venv): its numbers are in docs/serving.md."""

import json

from hicache_core.cli import main
from hicache_core.testing.cli import assert_clear_cli_error


def test_prefill_bench_times_both_compute_dtypes_on_a_checkpoint(tmp_path, checkpoint, capsys):
    out = tmp_path / "prefill.json"
    argv = ["bench", "prefill", "--model", str(checkpoint), "--no-vllm", "--tokens", "48", "--prompts", "3"]
    assert main(argv + ["--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["summary"]) == {"hicache-float64", "hicache-float32"}
    assert all(s["ttft_ms_mean"] > 0 and s["vs_vllm"] is None for s in report["summary"].values())
    assert len(report["results"]["hicache-float32"]["first_tokens"]) == 3
    assert report["first_token_agreement"]["hicache-float64"] == 3
    assert "hicache-float32" in capsys.readouterr().out


def test_prefill_bench_bad_flags(tmp_path, checkpoint, capsys):
    base = ["bench", "prefill", "--no-vllm", "--model", str(checkpoint)]
    assert_clear_cli_error(main, base + ["--compute-dtypes", "float16"], "--compute-dtypes", capsys)
    assert_clear_cli_error(main, base + ["--prompts", "1"], "--prompts", capsys)
    assert_clear_cli_error(main, base + ["--reserved-cpus", "4096"], "--reserved-cpus", capsys)
    assert_clear_cli_error(main, ["bench", "prefill", "--no-vllm", "--model", str(tmp_path)], "config.json", capsys)
