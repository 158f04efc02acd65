"""The L3 codec ("codec" in the storage extra config): zstd pages round-trip byte-exact, fp8 pages within e4m3's step,
through the memory and file backends and every host layout; the codec is in the namespace; a blob that is not a
page is a miss; the cost rule writes raw pages where decoding would cost more than the bytes it saves; bad settings
and backends without blob methods are refused at start; an engine serves storage hits through it, tokens equal."""

import pytest
import torch

from hicache_core.config import HiCacheConfig
from hicache_core.engine import Engine, ModelConfig, Request, TinyLlama
from hicache_core.errors import ConfigError
from hicache_core.memory import KVSpec
from hicache_core.registry import open_backend, resolve_config
from hicache_core.storage.base import HiCacheStorage
from hicache_core.storage.codec import FP8_BLOCK
from hicache_core.storage.codec_storage import CodecCost
from hicache_core.testing import page_bytes, random_keys

PS = 16
LAYOUTS = ("layer_first", "page_first", "page_first_direct")


def _open(backend, extra, codec, *, layout="layer_first", dtype=torch.bfloat16, when="always", **spec_kw):
    spec = KVSpec(layer_num=3, head_num=2, head_dim=32, dtype=dtype, **spec_kw)
    extra = {**extra, "codec": codec, "codec_when": when} if codec else dict(extra)
    cfg, _ = resolve_config(
        HiCacheConfig(
            page_size=PS,
            hicache_mem_layout=layout,
            model_name="codec-test",
            hicache_storage_backend=backend,
            hicache_storage_backend_extra_config=extra,
        )
    )
    return open_backend(cfg, spec, PS * 16)


def _kv(pool, idx):
    """KV-like values (normal, a few magnitudes) into the host pages at ``idx``."""
    for segs in pool.page_memoryviews(idx):
        for s in segs:
            n = len(s) // pool.spec.itemsize
            x = torch.randn(n) * torch.logspace(-2, 1, n)[torch.randperm(n)]
            s[:] = memoryview(x.to(pool.dtype).view(torch.uint8).numpy())


def _values(pool, idx):
    return torch.frombuffer(bytearray(b"".join(page_bytes(pool, idx))), dtype=torch.uint8).view(pool.dtype).float()


@pytest.fixture(params=["memory", "file"])
def store(request, tmp_path):
    if request.param == "memory":
        return "memory", {"store": f"codec-{tmp_path.name}"}
    return "file", {"storage_dir": str(tmp_path / "store")}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn])
def test_zstd_pages_round_trip_byte_exact_and_smaller(store, layout, dtype):
    backend, pool = _open(*store, "zstd", layout=layout, dtype=dtype)
    try:
        src, dst = pool.alloc(4 * PS), pool.alloc(4 * PS)
        _kv(pool, src)
        keys = random_keys(4, PS)
        assert backend.batch_set_v1(keys, src) == [True] * 4
        assert backend.batch_exists(keys) == 4
        assert backend.batch_get_v1(keys, dst) == [True] * 4
        assert page_bytes(pool, dst) == page_bytes(pool, src)
        codec = backend.get_stats()["codec"]
        assert codec["pages_encoded"] == 4 and codec["decode_failed"] == 0
        assert codec["ratio"] > (1.05 if dtype != torch.float8_e4m3fn else 1.0)  # KV's exponents compress
    finally:
        backend.close()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fp8_pages_come_back_within_e4m3s_step_of_their_block(store, dtype):
    backend, pool = _open(*store, "fp8", dtype=dtype)
    try:
        src, dst = pool.alloc(3 * PS), pool.alloc(3 * PS)
        _kv(pool, src)
        keys = random_keys(3, PS)
        assert backend.batch_set_v1(keys, src) == [True] * 3
        assert backend.batch_get_v1(keys, dst) == [True] * 3
        x, y = _values(pool, src), _values(pool, dst)
        pad = (-x.numel()) % FP8_BLOCK
        amax = torch.nn.functional.pad(x.abs(), (0, pad)).view(-1, FP8_BLOCK).amax(1).repeat_interleave(FP8_BLOCK)
        amax = amax[: x.numel()]
        # e4m3: 3 mantissa bits (half a step: 1/16 of a value), subnormals below 2^-6 of the block's scale;
        # the result rounds once more to the pool's dtype
        bound = x.abs() / 16 + amax / 448 * 2**-9 + y.abs() * 2**-7 + 1e-30
        assert bool(((x - y).abs() <= bound).all())
        assert backend.get_stats()["codec"]["ratio"] > {2: 1.9, 4: 3.8}[pool.spec.itemsize]
    finally:
        backend.close()


@pytest.mark.parametrize("codec", ["zstd", "fp8"])
def test_v0_reads_what_v1_wrote_through_the_codec_and_the_reverse(store, codec):
    """SGLang's v0 calls (get/set of flat pages) go through the codec too. Before, they fell through to the raw
    backend: the memory backend handed out the encoded blob as the page (wrong KV) and the file backend took it for
    a foreign page and deleted it."""
    backend, pool = _open(*store, codec)
    try:
        src, back = pool.alloc(2 * PS), pool.alloc(PS)
        _kv(pool, src)
        keys = random_keys(3, PS)
        assert backend.batch_set_v1(keys[:2], src) == [True, True]
        want = torch.empty(pool.page_bytes // pool.spec.itemsize, dtype=pool.dtype)
        assert backend.batch_get_v1(keys[:1], back) == [True]  # v1's decode of the page: what v0 must give
        got = backend.get(keys[0], torch.zeros_like(want))
        assert got is not None and got.view(torch.uint8).numpy().tobytes() == page_bytes(pool, back)[0]
        assert backend.get(keys[1]) is not None and backend.exists(keys[1])  # read twice: nothing was removed
        assert backend.set(keys[2], got) and backend.exists(keys[2])
        assert backend.batch_get_v1(keys[2:], back) == [True]
        assert page_bytes(pool, back)[0] == got.view(torch.uint8).numpy().tobytes()
        assert backend.get(random_keys(1, PS)[0]) is None
        with pytest.raises(ValueError, match="flat page is"):
            backend.set(keys[0], got[:-1])
    finally:
        backend.close()


def test_the_codec_is_in_the_namespace(tmp_path):
    """Pages written under zstd are misses for a config without a codec, or with fp8, and the reverse."""
    extra = {"storage_dir": str(tmp_path)}
    keys = random_keys(2, PS)
    opened = {c: _open("file", extra, c) for c in ("zstd", "fp8", None)}
    try:
        b, pool = opened["zstd"]
        src = pool.alloc(2 * PS)
        _kv(pool, src)
        assert b.batch_set_v1(keys, src) == [True, True]
        assert b.batch_exists(keys) == 2
        assert opened["fp8"][0].batch_exists(keys) == 0 and opened[None][0].batch_exists(keys) == 0
        assert opened[None][0].batch_get_v1(keys, opened[None][1].alloc(2 * PS)) == [False, False]
    finally:
        for b, _ in opened.values():
            b.close()


def test_a_blob_that_is_not_a_page_is_a_miss_never_a_page(tmp_path):
    backend, pool = _open("memory", {"store": f"bad-{tmp_path.name}"}, "zstd")
    try:
        src, dst = pool.alloc(3 * PS), pool.alloc(3 * PS)
        _kv(pool, src)
        keys = random_keys(3, PS)
        assert backend.batch_set_v1(keys, src) == [True] * 3
        raw = backend.raw
        good = raw._pages[raw.namespace.key(keys[1])]
        blobs = {0: b"not a blob at all", 1: good[:-7], 2: good[:16] + bytes(len(good) - 16)}
        for i, blob in blobs.items():
            raw._pages[raw.namespace.key(keys[i])] = blob
        assert backend.batch_get_v1(keys, dst) == [False] * 3
        assert backend.get_stats()["codec"]["decode_failed"] == 3
    finally:
        backend.close()


def test_the_cost_rule_encodes_only_where_decoding_costs_less_than_the_bytes_it_saves():
    cost = CodecCost("pays")
    assert cost.pays()  # nothing measured: encode, and measure
    cost.record_encoded(140, 100)  # 1.4x
    cost.record_decode(1_000_000_000, 1.0)  # the decoder: 1 GB/s
    for n in (1, 2, 4, 8):
        cost.record_io(True, n * 10_000_000, n * 10_000_000 / 5e9)  # a 5 GB/s store: 1/(1.4*5) + 1 > 1/5
    assert not cost.pays()
    assert sum(cost.encode_batch() for _ in range(32)) == 2  # one batch in 16 explores
    slow = CodecCost("pays")
    slow.record_encoded(140, 100)
    slow.record_decode(1_000_000_000, 1.0)
    for n in (1, 2, 4, 8):
        slow.record_io(True, n * 10_000_000, 0.001 + n * 10_000_000 / 0.1e9)  # 100 MB/s and a millisecond
    assert slow.pays()
    assert CodecCost("always").encode_batch()


def test_on_a_fast_store_the_codec_writes_raw_pages_and_on_a_slow_one_encoded(tmp_path):
    for gbps, encoded in ((0.0, False), (0.02, True)):
        extra = {"store": f"rule-{gbps}-{tmp_path.name}", "read_gbps": gbps}
        backend, pool = _open("memory", extra, "zstd", when="pays")
        try:
            src, dst = pool.alloc(4 * PS), pool.alloc(4 * PS)
            _kv(pool, src)
            for _ in range(6):
                keys = random_keys(4, PS)
                assert backend.batch_set_v1(keys, src) == [True] * 4
                assert backend.batch_get_v1(keys, dst) == [True] * 4
                assert page_bytes(pool, dst) == page_bytes(pool, src)
            codec = backend.get_stats()["codec"]
            assert codec["pays"] is encoded, codec
            assert (codec["pages_raw"] > 0) is not encoded, codec  # unlimited memory: raw once measured
        finally:
            backend.close()


class WholePagesOnly(HiCacheStorage):
    def batch_get_v1(self, keys, host_indices):
        return [False] * len(keys)

    def batch_set_v1(self, keys, host_indices):
        return [True] * len(keys)


def test_bad_codec_settings_are_refused_with_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="codec='gzip': choose one of 'none', 'zstd', 'fp8'"):
        HiCacheConfig(hicache_storage_backend_extra_config={"codec": "gzip"})
    with pytest.raises(ConfigError, match="codec_when='sometimes'"):
        HiCacheConfig(hicache_storage_backend_extra_config={"codec": "zstd", "codec_when": "sometimes"})
    with pytest.raises(ConfigError, match="codec_level=40"):
        HiCacheConfig(hicache_storage_backend_extra_config={"codec": "zstd", "codec_level": 40})
    with pytest.raises(ConfigError, match="fp8.*holds float8_e4m3fn pages"):
        _open("memory", {}, "fp8", dtype=torch.float8_e4m3fn)
    extra = {"backend_name": "whole", "module_path": __name__, "class_name": "WholePagesOnly", "interface_v1": 1}
    with pytest.raises(ConfigError, match="stores whole pages only"):
        _open("dynamic", extra, "zstd")


MODEL = TinyLlama(ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4))


@pytest.mark.parametrize("codec", ["zstd", "fp8"])
def test_an_engine_serves_storage_hits_through_the_codec(tmp_path, codec):
    """A restarted engine reads the prompt's pages back through the codec: zstd gives the recompute's tokens
    exactly; fp8 is lossy, so its tokens are only compared where the run shows them (bench multiturn)."""
    prompt = list(range(10, 138))

    def engine():
        cfg = HiCacheConfig(
            page_size=PS,
            hicache_ratio=2.0,
            hicache_storage_backend="file",
            hicache_storage_backend_extra_config={
                "storage_dir": str(tmp_path),
                "prefetch_threshold": PS,
                "codec": codec,
                "codec_when": "always",
            },
            hicache_storage_prefetch_policy="wait_complete",
        )
        return Engine(MODEL, cfg, "hicache+storage", device_tokens=512, max_running=1)

    first = engine()
    try:
        cold = first.generate([Request("a", prompt, 6)])[0]
        first.flush()
        stats = first.cache.metrics.stats()
        assert 0 < stats["storage_stored_bytes"]["set"] < stats["transfer_bytes"]["storage_set"]
    finally:
        first.close()
    second = engine()
    try:
        warm = second.generate([Request("b", prompt, 6)])[0]
        assert warm.cached["storage"] >= len(prompt) - PS
        if codec == "zstd":
            assert warm.output == cold.output
    finally:
        second.close()


def test_bench_runs_each_codec_in_one_run_and_reports_bytes_per_storage_hit(tmp_path, capsys):
    """--storage-codecs none,zstd,fp8: zstd's tokens equal recompute's and it writes fewer bytes to L3 than no codec;
    fp8 writes fewer still, and its tokens are counted against the reference, not required."""
    import json

    from test_engine import SMALL, parse

    from hicache_core.bench import multiturn

    argv = [*SMALL, "--no-warm", "--hicache-ratio", "1", "--max-running", "1", "--report-dir", str(tmp_path)]
    argv += ["--configs", "hicache+storage", "--hicache-storage-prefetch-policy", "wait_complete"]
    argv += ["--storage-codecs", "none,zstd,fp8"]
    extra = json.dumps({"storage_dir": str(tmp_path / "store"), "prefetch_threshold": 16, "codec_when": "always"})
    assert multiturn.run(parse([*argv, "--hicache-storage-backend-extra-config", extra])) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    configs = {c["config"]: c for c in report["configs"]}
    plain, zstd, fp8 = (configs[n] for n in ("hicache+storage", "hicache+storage@zstd", "hicache+storage@fp8"))
    assert report["summary"]["outputs_identical"]["hicache+storage@zstd"]
    for c in (plain, zstd, fp8):
        assert c["hit_tokens"]["storage"] > 0
        assert c["l3_bytes_per_storage_hit"] == c["storage_stored_bytes"]["set"] / c["hit_tokens"]["storage"]
    assert plain["storage_stored_bytes"]["set"] == plain["transfer_bytes"]["storage_set"]
    share = {
        n: c["storage_stored_bytes"]["set"] / c["transfer_bytes"]["storage_set"]
        for n, c in configs.items()
        if n != "none"
    }
    assert share["hicache+storage@fp8"] < share["hicache+storage@zstd"] < 0.9 < share["hicache+storage"] == 1.0
    assert zstd["codec_seconds"]["get"] > 0 and plain["codec_seconds"]["get"] == 0
    out = capsys.readouterr().out
    assert "bytes written to L3 against tokens served from it" in out and "ms decoding" in out
    with pytest.raises(ConfigError, match="--storage-codecs: gzip; choose from none, zstd, fp8"):
        multiturn.run(parse([*SMALL, "--storage-codecs", "gzip"]))
