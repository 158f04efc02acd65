"""fp8 (e4m3) KV with its scales in the page (--kv-cache-dtype fp8_e4m3): the codec's error is e4m3's, every cache
configuration and layout gives the fp8 no-cache run's tokens while moving (head_dim + 4) / (2 head_dim) of
bfloat16's bytes, and fp8 and bfloat16 pages of one model never read each other's pages."""

import json

import pytest
import torch
from test_engine import SMALL, parse

from hicache_core.bench import multiturn
from hicache_core.config import HiCacheConfig
from hicache_core.engine import Engine, ModelConfig, Request, TinyLlama
from hicache_core.engine.model_config import with_kv_cache_dtype
from hicache_core.errors import ConfigError
from hicache_core.memory import KVSpec
from hicache_core.memory.kv_codec import FP8_MAX, decode, encode
from hicache_core.memory.spec import FP8_SCALED
from hicache_core.registry.opening import make_storage_config

SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2)


def test_codec_keeps_each_heads_scale_in_its_last_four_bytes_and_e4m3s_precision():
    spec = KVSpec(layer_num=1, head_num=3, head_dim=20, dtype=torch.float8_e4m3fn, kv_format=FP8_SCALED)
    g = torch.Generator().manual_seed(0)
    x = (
        torch.randn(50, 3, 16, generator=g, dtype=torch.float64)
        * torch.logspace(-3, 3, 50, dtype=torch.float64)[:, None, None]
    )
    x[7] = 0.0  # an all-zero head: scale 1, values 0
    stored = encode(spec, x)
    assert stored.shape == (50, 3, 20) and stored.dtype == torch.float8_e4m3fn
    scale = stored[..., 16:].contiguous().view(torch.float32)[..., 0]
    torch.testing.assert_close(
        scale.double(), (x.abs().amax(-1) / FP8_MAX).where(x.abs().amax(-1) > 0, 1.0).float().double()
    )
    back = decode(spec, stored)
    assert back.dtype == torch.float32 and back.shape == x.shape and not back[7].any()
    amax = x.abs().amax(-1, keepdim=True)
    # e4m3: 3 mantissa bits, so within 1/16 of a value, or of the smallest normal step near zero
    assert ((back.double() - x).abs() <= x.abs() / 16 + amax * 2**-9 + 1e-30).all()
    plain = KVSpec(layer_num=1, head_num=3, head_dim=16)
    assert decode(plain, encode(plain, x)).dtype == torch.bfloat16


@pytest.mark.parametrize("layout", ["layer_first", "page_first", "page_first_direct"])
def test_every_configuration_gives_the_fp8_no_cache_tokens_with_fewer_bytes(tmp_path, layout):
    def run(dtype):
        report = tmp_path / dtype
        argv = [*SMALL, "--no-warm", "--kv-cache-dtype", dtype, "--hicache-mem-layout", layout]
        extra = json.dumps({"storage_dir": str(tmp_path / f"s-{dtype}"), "prefetch_threshold": 16})
        argv += ["--hicache-storage-backend-extra-config", extra, "--report-dir", str(report)]
        assert multiturn.run(parse(argv)) == 0  # every configuration's tokens are its no-cache run's
        return {c["config"]: c for c in json.loads((report / "report.json").read_text())["configs"]}

    fp8, bf16 = run("fp8_e4m3"), run("auto")
    host = fp8["hicache+storage"]
    assert host["hit_tokens"]["host"] + host["hit_tokens"]["storage"] > 0 and host["backuped_tokens"] > 0
    # bytes written to storage per token backed up: 2 layers x K,V x 2 heads x (16 values + 4 scale bytes), against
    # bfloat16's 2 x 2 x 2 x 32
    for run_, per_token in ((fp8, 2 * 2 * 2 * 20), (bf16, 2 * 2 * 2 * 32)):
        r = run_["hicache+storage"]
        assert r["transfer_bytes"]["storage_set"] == r["backuped_tokens"] * per_token
    assert fp8["hicache"]["transfer_bytes"]["d2h"] * 32 < bf16["hicache"]["transfer_bytes"]["d2h"] * 21


def _engine(model, store):
    cfg = HiCacheConfig(
        page_size=16,
        hicache_storage_backend="file",
        hicache_storage_backend_extra_config={"storage_dir": str(store), "prefetch_threshold": 16},
        hicache_storage_prefetch_policy="wait_complete",
    )
    return Engine(model, cfg, "hicache+storage", device_tokens=256, max_running=1)


def _served(model, store, prompt):
    engine = _engine(model, store)
    try:
        r = engine.generate([Request("r", prompt, 4)])[0]
        engine.flush()
    finally:
        engine.close()
    return r


def test_fp8_and_bfloat16_pages_of_one_model_never_mix(tmp_path):
    """One model, one store: bfloat16 writes, fp8 finds nothing (and the reverse); each finds its own after a
    restart. Their namespaces differ in dtype, head bytes and kv_format."""
    base = ModelConfig(head_dim=16, **SHAPE)
    bf16, fp8 = TinyLlama(base), TinyLlama(with_kv_cache_dtype(base, "fp8_e4m3"))
    assert bf16.config.fingerprint == fp8.config.fingerprint  # the same weights: only the KV differs
    tags = [make_storage_config(HiCacheConfig(page_size=16), m.config.kv_spec()).namespace for m in (bf16, fp8)]
    assert tags[0].tag != tags[1].tag and tags[1].fields()["kv_format"] == FP8_SCALED
    assert "kv_format" not in tags[0].fields()  # plain KV keeps the tag it always had
    prompt = list(range(5, 101))
    first = _served(bf16, tmp_path, prompt)
    assert first.cached["storage"] == 0
    assert _served(fp8, tmp_path, prompt).cached["storage"] == 0, "fp8 read bfloat16 pages"
    assert _served(bf16, tmp_path, prompt).cached["storage"] >= 80  # its own pages are there
    assert _served(fp8, tmp_path, prompt).cached["storage"] >= 80  # and fp8's, written by its first run


def test_bad_kv_settings_are_refused():
    with pytest.raises(ConfigError, match="--kv-cache-dtype 'fp8_e5m2': choose one of auto, fp8_e4m3"):
        with_kv_cache_dtype(ModelConfig(), "fp8_e5m2")
    with pytest.raises(ConfigError, match="stores float8_e4m3fn values and their scale"):
        KVSpec(layer_num=1, head_num=1, head_dim=20, dtype=torch.bfloat16, kv_format=FP8_SCALED)
    with pytest.raises(ConfigError, match="kv_format 'mxfp8'"):
        KVSpec(layer_num=1, head_num=1, head_dim=20, kv_format="mxfp8")
