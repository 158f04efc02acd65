"""A tiny llama checkpoint made with transformers, and `hicache serve` processes started and stopped per test."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CORPUS = (
    "the quick brown fox jumps over the lazy dog while a cache keeps every prefix it has seen; "
    "hierarchical memory holds pages on the device, on the host and in storage. "
) * 20
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_checkpoint(path: Path, dtype: str = "float32", seed: int = 0) -> Path:
    """A random-init LlamaForCausalLM (2 layers, GQA) with a trained byte-level BPE tokenizer, saved as a Hugging
    Face model directory (safetensors)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        [CORPUS],
        trainers.BpeTrainer(
            vocab_size=320,
            special_tokens=["<unk>", "<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    hf_tok.chat_template = CHAT_TEMPLATE
    cfg = LlamaConfig(
        vocab_size=len(hf_tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.1,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(getattr(torch, dtype)).eval()
    model.save_pretrained(path, safe_serialization=True)
    hf_tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def hf(checkpoint):
    """transformers' own model and tokenizer on the checkpoint (the reference)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(checkpoint).eval(), AutoTokenizer.from_pretrained(checkpoint)


def hf_generate(hf, ids: list[int], n: int) -> list[int]:
    import torch

    model, tok = hf
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            max_new_tokens=n,
            do_sample=False,
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            pad_token_id=tok.eos_token_id,
        )
    return out[0, len(ids) :].tolist()


class Server:
    def __init__(self, proc: subprocess.Popen, url: str, log: Path) -> None:
        self.proc, self.url, self.log = proc, url, log

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=60) as r:
            body = r.read().decode()
        return json.loads(body) if body.startswith(("{", "[")) else body

    def post(self, path: str, body, method: str = "POST"):
        req = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(), method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                text = r.read().decode()
                return r.status, (json.loads(text) if text.startswith(("{", "[")) else text)
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read().decode())

    def generate(self, body) -> dict:
        status, out = self.post("/generate", body)
        assert status == 200, out
        return out


@contextlib.contextmanager
def serve(tmp_path: Path, *flags: str):
    """Start `hicache serve` on a free port; yield a :class:`Server`; stop it (its log is shown on failure)."""
    port_file = tmp_path / f"port-{time.monotonic_ns()}"
    log = tmp_path / f"server-{time.monotonic_ns()}.log"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "hicache_core.cli",
                "serve",
                "--port",
                "0",
                "--port-file",
                str(port_file),
                "--log-level",
                "warning",
                *flags,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        deadline = time.monotonic() + 120
        while not port_file.exists() or not port_file.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"hicache serve did not start (exit {proc.poll()}):\n{log.read_text()}")
            time.sleep(0.1)
        server = Server(proc, f"http://127.0.0.1:{port_file.read_text()}", log)
        assert server.get("/health") == ""
        yield server
        assert proc.poll() is None, f"the server died:\n{log.read_text()}"
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
