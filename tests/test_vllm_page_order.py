"""The vLLM connector's page order without vLLM: which order a deployment gets, the namespace's model name, and
the block-order probe's refusals. The probe is fed stand-in cache writes here (a transpose, and writes that pad,
duplicate, spill or round); the real op, on this CPU's ISA, is tested in tests_vllm/test_block_order.py."""

import pytest
import torch

from hicache_core.errors import ConfigError
from hicache_core.integrations.vllm.block_order import probe
from hicache_core.integrations.vllm.settings import default_model_name, page_order

H, N, D = 2, 4, 8


def transposing(key, value, cache, slots):
    """vec's kind of packing: per head, K as [dim, token] then V as [token, dim] (block = slots // N)."""
    b = int(slots[0]) // N
    cache[b, :, :, :D] = key.permute(1, 2, 0).reshape(H, D, N).reshape(H, N, D)
    cache[b, :, :, D:] = value.permute(1, 0, 2)


def test_the_probe_reads_a_packing_and_round_trips_it_bit_exactly():
    order = probe(transposing, H, N, D, torch.bfloat16, "stand-in")
    kv = torch.randn(2, N, H, D).to(torch.bfloat16)
    cache = torch.zeros(2, H, N, 2 * D, dtype=torch.bfloat16)
    transposing(kv[0], kv[1], cache, torch.arange(N) + N)
    plain = torch.empty(2 * N * H * D, dtype=torch.bfloat16)
    order.unpack(cache[1], plain)
    assert torch.equal(plain.view(torch.int16), kv.reshape(-1).view(torch.int16))
    again = torch.empty_like(cache[1])
    order.pack(plain, again)
    assert torch.equal(again.view(torch.int16), cache[1].view(torch.int16))


def _pads(key, value, cache, slots):
    cache[1, :, :, :D] = key.permute(1, 0, 2)  # V never lands


def _duplicates(key, value, cache, slots):
    cache[1, :, :, :D] = key.permute(1, 0, 2)
    cache[1, :, :, D:] = key.permute(1, 0, 2)


def _spills(key, value, cache, slots):
    transposing(key, value, cache, slots)
    cache[0, 0, 0, 0] = 1.0


def _rounds(key, value, cache, slots):  # keeps K to bf16 precision in a float32 cache: small integers survive
    transposing(key.to(torch.bfloat16).to(key.dtype), value, cache, slots)


@pytest.mark.parametrize(
    "write,why",
    [(_pads, "no K or V value lands"), (_duplicates, "not a reordering"), (_spills, "outside the block"),
     (_rounds, "changes values")],
)  # fmt: skip
def test_a_write_that_is_not_a_reordering_is_refused_naming_the_setting_that_keeps_vllms_bytes(write, why):
    with pytest.raises(ConfigError, match=why) as e:
        probe(write, H, N, D, torch.float32, "stand-in")
    assert '"hicache_page_order": "vllm"' in str(e.value)


def test_an_fp8_block_is_refused():
    with pytest.raises(ConfigError, match="float16, bfloat16 and float32"):
        probe(transposing, H, N, D, torch.float8_e4m3fn, "stand-in")


def test_the_page_order_defaults_to_hicaches_where_the_connector_converts():
    assert page_order({}, "cpu", "auto") == "hicache"
    assert page_order({}, "cpu", "bfloat16") == "hicache"
    assert page_order({}, "cpu", "fp8_e4m3") == "vllm"
    assert page_order({}, "cuda", "auto") == "vllm"
    assert page_order({"hicache_page_order": "vllm"}, "cpu", "auto") == "vllm"
    with pytest.raises(ConfigError, match='use "vllm"'):
        page_order({"hicache_page_order": "hicache"}, "cuda", "auto")
    with pytest.raises(ConfigError, match="must be one of hicache, vllm"):
        page_order({"hicache_page_order": "native"}, "cpu", "auto")


def test_the_model_name_is_the_checkpoints_name_as_our_engine_gives_it(tmp_path):
    ckpt = tmp_path / "tiny-llama"
    ckpt.mkdir()
    assert default_model_name(str(ckpt), str(ckpt)) == "tiny-llama"  # vLLM's served name defaults to the path
    assert default_model_name(str(ckpt), ["chat"]) == "chat"
    assert default_model_name("org/hub-model", None) == "org/hub-model"
