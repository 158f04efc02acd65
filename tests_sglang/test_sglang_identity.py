"""Inside SGLang, HiCacheForSGLang keys pages by the weights, not the model's name: for a local checkpoint its
fingerprint is the checkpoint's content digest (the one hicache's engine and the vLLM connector use) plus what
SGLang's server args add that changes the KV (revision, quantization, KV dtype), so a model rewritten in place
under the same path reads none of its old pages. The server args are the real
``sglang.srt.runtime_context.get_server_args`` answer's fields, set here on a stand-in object (a real
``ServerArgs`` needs a launched server)."""

import types

import pytest
from real_pools import real_host_pool
from test_sglang_real_pools import bridge, indices, keys, store


def server_args(monkeypatch, model_path, **more):
    import sglang.srt.runtime_context as rc

    args = types.SimpleNamespace(
        model_path=str(model_path), revision=None, dtype="bfloat16", quantization=None, kv_cache_dtype="auto", **more
    )
    monkeypatch.setattr(rc, "get_server_args", lambda: args)
    return args


@pytest.fixture
def checkpoint(tmp_path):
    d = tmp_path / "my-llama"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "llama"}')
    (d / "model.safetensors").write_bytes(b"\x01" * 1024)
    return d


def written(tmp_path, ks, **extra):
    pool = real_host_pool("page_first")
    b = bridge(pool, {**store("file", tmp_path), **extra}, mla=False)
    return b, pool


def test_a_checkpoint_rewritten_in_place_reads_none_of_its_old_pages(tmp_path, monkeypatch, checkpoint):
    server_args(monkeypatch, checkpoint)
    ks = keys(4)
    b, _ = written(tmp_path, ks)
    assert b.batch_set_v1(ks, indices([0, 1, 2, 3])) == [True] * 4
    b.close()
    again, _ = written(tmp_path, ks)
    assert again.batch_exists(ks) == 4  # same weights: the pages are there
    again.close()
    (checkpoint / "model.safetensors").write_bytes(b"\x02" * 1024)  # same path, same size, new weights
    after, _ = written(tmp_path, ks)
    assert after.batch_exists(ks) == 0
    after.close()


def test_revision_quantization_and_kv_dtype_are_part_of_it(tmp_path, monkeypatch, checkpoint):
    args = server_args(monkeypatch, checkpoint)
    ks = keys(2)
    b, _ = written(tmp_path, ks)
    assert b.batch_set_v1(ks, indices([0, 1])) == [True] * 2
    b.close()
    for field, value in (("revision", "v2"), ("quantization", "fp8"), ("kv_cache_dtype", "fp8_e4m3")):
        old = getattr(args, field)
        setattr(args, field, value)
        other, _ = written(tmp_path, ks)
        assert other.batch_exists(ks) == 0, field
        other.close()
        setattr(args, field, old)


def test_an_explicit_fingerprint_wins_and_no_server_args_keeps_the_name_only_keys(tmp_path, monkeypatch, checkpoint):
    ks = keys(2)
    b, _ = written(tmp_path, ks, hicache_model_fingerprint="rev-abc")
    assert b.fingerprint == "rev-abc" and b.batch_set_v1(ks, indices([0, 1])) == [True] * 2
    b.close()
    same, _ = written(tmp_path, ks, hicache_model_fingerprint="rev-abc")
    assert same.batch_exists(ks) == 2
    same.close()
    plain, _ = written(tmp_path, ks)  # no server published its args here: by name, as before
    assert plain.fingerprint is None and plain.batch_exists(ks) == 0
    plain.close()


@pytest.mark.parametrize(
    "extra_key,cache_salt", [(None, "tenant-a"), ("lora-7", None), ("lora-7", "tenant-a"), ("", "x"), ("é", "日本")]
)
def test_namespaced_keys_are_sglangs(extra_key, cache_salt):
    """A salted or extra-keyed page has the key SGLang 0.5.23 gives it (its storage_namespace_seed chained into
    get_hash_str), so a store shared with SGLang servers keeps tenants apart the same way on both."""
    from sglang.srt.mem_cache.utils import get_hash_str, storage_namespace_seed

    from hicache_core.keys import hash_chain, namespace_seed

    seed = namespace_seed(extra_key, cache_salt)
    assert seed == storage_namespace_seed(extra_key, cache_salt)
    tokens = list(range(1000, 1000 + 4 * 16))
    want, prior = [], seed
    for i in range(0, len(tokens), 16):
        prior = get_hash_str(tokens[i : i + 16], prior)
        want.append(prior)
    assert hash_chain(tokens, 16, seed) == want
    assert namespace_seed(None, None) is None and storage_namespace_seed(None, None) is None


def test_inside_sglang_a_namespace_quota_travels_in_extra_info(tmp_path):
    """SGLang seeds a salted request's keys itself (above), so HiCacheForSGLang stores them apart unasked; an
    SGLang embedder that wants hicache's storage quota passes the namespace in SGLang's own extra_info, which the
    bridge forwards to the backend: the file backend keeps that namespace to its cap."""
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorageExtraInfo
    from sglang.srt.mem_cache.utils import storage_namespace_seed

    pool = real_host_pool("page_first")
    b = bridge(pool, store("file", tmp_path), mla=False)
    seed = storage_namespace_seed(None, "tenant-a")
    ks = keys(4)
    info = HiCacheStorageExtraInfo(extra_info={"namespace_seed": seed, "namespace_storage_pages": 2})
    for i, k in enumerate(ks):  # one page per call, oldest first
        assert b.batch_set_v1([k], indices([i]), info) == [True]
    assert [b.batch_exists([k]) for k in ks] == [0, 0, 1, 1]  # the namespace kept its newest two
    b.close()
