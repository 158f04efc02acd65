"""cache_salt over HTTP (SGLang's and vLLM's field; SGLang's ``extra_key`` likewise) on /generate, /v1/completions and
/v1/chat/completions: another salt's prefix is a miss in every tier -- no cached tokens, and a miss's TTFT, the
prefix-cache timing side channel closed -- the same salt hits, and no salt keeps the shared, unsalted cache. A
restarted server on the same store serves a salt's pages to that salt only."""

from __future__ import annotations

import json

from conftest import serve

PROMPT = "".join(f"line {i}: the tenant's private system prompt, which no other tenant may probe. " for i in range(24))


def gen(s, salt=None, key="cache_salt"):
    body = {"text": PROMPT, "sampling_params": {"max_new_tokens": 1, "temperature": 0}}
    if salt is not None:
        body[key] = salt
    m = s.generate(body)["meta_info"]
    return m["cached_tokens"], m["ttft"]


def test_salts_share_no_prefix_in_any_tier_and_their_ttft_shows_nothing(tmp_path):
    flags = [
        "--page-size",
        "16",
        "--enable-cache-report",
        "--enable-hierarchical-cache",
        "--hicache-storage-backend",
        "file",
        "--hicache-storage-prefetch-policy",
        "wait_complete",
        "--hicache-storage-backend-extra-config",
        json.dumps({"storage_dir": str(tmp_path / "store"), "prefetch_threshold": 16}),
    ]
    with serve(tmp_path, *flags) as s:
        cached, cold = gen(s, "tenant-a")
        assert cached == 0
        cached, hit = gen(s, "tenant-a")
        assert cached > len(PROMPT) // 2
        cached, other = gen(s, "tenant-b")  # same text, another tenant: a miss
        assert cached == 0
        assert other > 3 * hit, f"another salt's TTFT {other:.4f}s looks like a hit's {hit:.4f}s (cold {cold:.4f}s)"
        assert gen(s)[0] == 0  # no salt: the unsalted cache, which nobody filled
        assert gen(s, "tenant-a", key="extra_key")[0] == 0  # SGLang's extra_key is a namespace of its own
        status, out = s.post(
            "/v1/completions", {"model": "default", "prompt": PROMPT, "max_tokens": 1, "cache_salt": "tenant-b"}
        )
        assert status == 200 and out["usage"]["prompt_tokens_details"]["cached_tokens"] > 0, out
        status, out = s.post(
            "/v1/chat/completions",
            {
                "model": "default",
                "max_tokens": 1,
                "cache_salt": "tenant-c",
                "messages": [{"role": "user", "content": PROMPT}],
            },
        )
        assert status == 200 and "prompt_tokens_details" not in out["usage"], out  # reported only when cached
        for bad, says in ((7, "cache_salt must be a non-empty string"), ("", "cache_salt must be a non-empty")):
            status, out = s.post("/generate", {"text": "x", "cache_salt": bad})
            assert status == 400 and says in out["error"]["message"], out
        status, out = s.post("/generate", {"text": "x", "extra_key": ["a"]})
        assert status == 400 and "extra_key must be a non-empty string" in out["error"]["message"], out
    with serve(tmp_path, *flags) as s:  # a restart on the same store
        assert gen(s, "tenant-c")[0] == 0
        cached, _ = gen(s, "tenant-a")
        assert cached > 0
