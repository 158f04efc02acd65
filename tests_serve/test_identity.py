"""A model updated in place -- same directory, same shapes and dtype, new weights -- on a shared file store: the
restarted server must not load the old weights' pages (SGLang #24758: its namespace carries the directory's name).
The storage namespace carries the checkpoint's content fingerprint (hicache_core/identity.py)."""

from __future__ import annotations

import json

from conftest import CORPUS, hf_generate, make_checkpoint, serve

N = 8


def hf_of(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def ask(server, hf, text: str) -> dict:
    ids = hf[1](text).input_ids
    out = server.generate({"input_ids": ids, "sampling_params": {"max_new_tokens": N, "temperature": 0}})
    assert out["output_ids"] == hf_generate(hf, ids, N), "tokens differ from transformers on these weights"
    return out["meta_info"]["cached_tokens_details"]


def test_a_checkpoint_rewritten_in_place_gets_no_storage_hit_from_its_old_pages(tmp_path):
    model = make_checkpoint(tmp_path / "my-llama", seed=0)
    flags = [
        "--model-path",
        str(model),
        "--page-size",
        "8",
        "--enable-hierarchical-cache",
        "--hicache-storage-backend",
        "file",
        "--hicache-storage-prefetch-policy",
        "wait_complete",
        "--hicache-storage-backend-extra-config",
        json.dumps({"storage_dir": str(tmp_path / "store"), "prefetch_threshold": 8}),
    ]
    prompt = CORPUS[:600]
    old = hf_of(model)
    with serve(tmp_path, *flags) as s:
        ask(s, old, prompt)
    with serve(tmp_path, *flags) as s:  # the store works: same weights, a restart hits storage
        assert ask(s, old, prompt)["storage"] > 0
    make_checkpoint(model, seed=1)  # same path, same geometry, new weights
    new = hf_of(model)
    with serve(tmp_path, *flags) as s:
        assert ask(s, new, prompt)["storage"] == 0  # none of the old weights' pages
    with serve(tmp_path, *flags) as s:
        assert ask(s, new, prompt)["storage"] > 0  # and the new weights' pages serve the next restart
