"""A tiny llama checkpoint made with transformers; `hicache serve` processes (hicache_core.testing.server)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hicache_core.testing.checkpoint import CHAT_TEMPLATE, CORPUS, make_checkpoint  # noqa: F401 (tests import them from here)
from hicache_core.testing.server import Server, serve  # noqa: F401 (tests import them from here)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def hf(checkpoint):
    """transformers' own model and tokenizer on the checkpoint (the reference)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(checkpoint).eval(), AutoTokenizer.from_pretrained(checkpoint)


def hf_generate(hf, ids: list[int], n: int) -> list[int]:
    """transformers' greedy tokens after ``ids``; each (prompt, n) is generated once per model and remembered
    (greedy decoding of fixed weights is deterministic; the SmolLM2 tests ask the same questions tier after tier)."""
    import torch

    model, tok = hf
    memo = model.__dict__.setdefault("_hicache_reference_tokens", {})
    key = (tuple(ids), n)
    if key in memo:
        return list(memo[key])
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            max_new_tokens=n,
            do_sample=False,
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            pad_token_id=tok.eos_token_id,
        )
    memo[key] = out[0, len(ids) :].tolist()
    return list(memo[key])
