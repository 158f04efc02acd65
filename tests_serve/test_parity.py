"""`hicache serve --model-path` gives transformers' own greedy tokens, in every cache configuration, with the
prefix served from each tier in turn, and after a warm restart against storage."""

from __future__ import annotations

import json

import pytest

from conftest import CORPUS, hf_generate, serve

N = 12
PS = "16"
# four prompts sharing a long prefix (the cache's whole point), each long enough for several pages
PROMPTS = [CORPUS[:300] + tail for tail in (" and then", " the fox", " storage pages", " a host")]
# three prompts with nothing in common: a 256-token device pool holds one at a time, the rest go to the host
DISTINCT = [CORPUS[i * 41 : i * 41 + 300] for i in range(3)]


def run_all(server, hf, expect_cached: str | None = None, prompts: list[str] = PROMPTS) -> list[dict]:
    outs = []
    for p in prompts:
        out = server.generate({"text": p, "sampling_params": {"max_new_tokens": N, "temperature": 0}})
        ids = hf[1](p).input_ids
        assert out["meta_info"]["prompt_tokens"] == len(ids), "our tokenizer disagrees with transformers'"
        assert out["output_ids"] == hf_generate(hf, ids, N), f"tokens differ from transformers on {p[-12:]!r}"
        assert out["text"] == hf[1].decode(out["output_ids"], skip_special_tokens=True)
        outs.append(out)
    if expect_cached:  # some prompt's prefix came from that tier
        assert sum(o["meta_info"]["cached_tokens_details"][expect_cached] for o in outs) > 0, [
            o["meta_info"]["cached_tokens_details"] for o in outs
        ]
    return outs


@pytest.mark.parametrize(
    "flags",
    [
        ["--disable-radix-cache"],
        [],
        ["--enable-hierarchical-cache"],
    ],
    ids=["no-cache", "radix", "hicache-L1+L2"],
)
def test_greedy_parity_each_configuration(tmp_path, checkpoint, hf, flags):
    with serve(tmp_path, "--model-path", str(checkpoint), "--page-size", PS, "--max-total-tokens", "1024", *flags) as s:
        run_all(s, hf)
        again = run_all(s, hf, expect_cached=None if "--disable-radix-cache" in flags else "device")
        if "--disable-radix-cache" in flags:
            assert all(o["meta_info"]["cached_tokens"] == 0 for o in again)


def test_greedy_parity_through_host_and_storage_and_warm_restart(tmp_path, checkpoint, hf):
    store = tmp_path / "store"
    flags = [
        "--model-path",
        str(checkpoint),
        "--page-size",
        PS,
        "--enable-hierarchical-cache",
        "--hicache-storage-backend",
        "file",
        "--hicache-storage-backend-extra-config",
        json.dumps({"storage_dir": str(store), "prefetch_threshold": 64}),
        "--hicache-storage-prefetch-policy",
        "wait_complete",
        "--max-total-tokens",
        "256",
        "--hicache-ratio",
        "4",
        "--max-running-requests",
        "1",
    ]
    with serve(tmp_path, *flags) as s:
        run_all(s, hf, prompts=DISTINCT)  # each prompt evicts the last one's pages to the host
        run_all(s, hf, expect_cached="host", prompts=DISTINCT)
        status, _ = s.post("/flush_cache", {})
        assert status == 200
        out = run_all(s, hf, expect_cached="storage", prompts=DISTINCT)  # device and host emptied: from files
        assert all(o["meta_info"]["cached_tokens_details"]["storage"] >= 64 for o in out)
    with serve(tmp_path, *flags) as s:  # a new server process: only storage remembers
        out = run_all(s, hf, expect_cached="storage", prompts=DISTINCT)
        assert all(o["meta_info"]["cached_tokens_details"]["storage"] >= 64 for o in out)


def test_chat_template_and_bf16_checkpoint(tmp_path, checkpoint, hf):
    from conftest import make_checkpoint

    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the quick brown fox"}]
    ids = hf[1].apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
    if isinstance(ids, dict):
        ids = ids["input_ids"]
    with serve(tmp_path, "--model-path", str(checkpoint)) as s:
        status, out = s.post("/v1/chat/completions", {"messages": msgs, "max_tokens": N})
        assert status == 200, out
        assert out["usage"]["prompt_tokens"] == len(ids)
        want = hf_generate(hf, list(ids), N)
        if hf[1].eos_token_id in want:
            want = want[: want.index(hf[1].eos_token_id)]
        assert out["choices"][0]["message"]["content"] == hf[1].decode(want, skip_special_tokens=True)
    bf16 = make_checkpoint(tmp_path / "bf16", dtype="bfloat16")
    with serve(tmp_path, "--model-path", str(bf16), "--enable-hierarchical-cache", "--page-size", PS) as s:
        info = s.get("/get_model_info")
        assert info["vocab_size"] == len(hf[1])
        a = s.generate({"text": PROMPTS[0], "sampling_params": {"max_new_tokens": 6}})
        b = s.generate({"text": PROMPTS[0], "sampling_params": {"max_new_tokens": 6}})
        assert a["output_ids"] == b["output_ids"] and b["meta_info"]["cached_tokens"] > 0
