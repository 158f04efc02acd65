"""The weights' identity in the storage namespace (hicache_core/identity.py): a checkpoint's fingerprint follows
its content, not its path or name, and is remembered per file by (size, mtime, ctime, inode)."""

import os

import pytest

from hicache_core import identity
from hicache_core.config import HiCacheConfig
from hicache_core.engine import ModelConfig
from hicache_core.errors import ConfigError
from hicache_core.keys import StorageNamespace


def make(path, weights: bytes = b"\x01" * 4096):
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text('{"model_type": "llama"}')
    (path / "tokenizer.json").write_text("{}")
    (path / "model.safetensors").write_bytes(weights)
    (path / "notes.txt").write_text("not part of the identity")
    return path


def test_same_content_same_fingerprint_anywhere(tmp_path):
    a, b = make(tmp_path / "a"), make(tmp_path / "b")
    assert identity.checkpoint_fingerprint(a) == identity.checkpoint_fingerprint(b)
    (b / "notes.txt").write_text("changed")  # not a file that decides the KV
    assert identity.checkpoint_fingerprint(a) == identity.checkpoint_fingerprint(b)


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "model.safetensors"])
def test_any_byte_of_config_tokenizer_or_weights_changes_it(tmp_path, name):
    ckpt = make(tmp_path / "m")
    before = identity.checkpoint_fingerprint(ckpt)
    f = ckpt / name
    data = bytearray(f.read_bytes())
    st = f.stat()
    data[len(data) // 2] ^= 1  # one bit, same size
    f.write_bytes(bytes(data))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime kept, as cp -p / rsync -t keep it
    assert identity.checkpoint_fingerprint(ckpt) != before


def test_a_new_shard_changes_it(tmp_path):
    ckpt = make(tmp_path / "m")
    before = identity.checkpoint_fingerprint(ckpt)
    (ckpt / "model-00002-of-00002.safetensors").write_bytes(b"\x02" * 64)
    assert identity.checkpoint_fingerprint(ckpt) != before


def test_the_memo_saves_rereading_unchanged_files(tmp_path, monkeypatch):
    ckpt = make(tmp_path / "m")
    first = identity.checkpoint_fingerprint(ckpt)
    assert (ckpt / identity.MEMO).exists()
    read = []
    real = identity.file_digest
    monkeypatch.setattr(identity, "file_digest", lambda p: read.append(p.name) or real(p))
    assert identity.checkpoint_fingerprint(ckpt) == first and read == []
    (ckpt / "tokenizer.json").write_text('{"x": 1}')
    identity.checkpoint_fingerprint(ckpt)
    assert read == ["tokenizer.json"]  # only the changed file is read again


def test_where_the_memo_cannot_be_written_beside_it_goes_to_the_user_cache(tmp_path, monkeypatch):
    """A place beside the checkpoint that cannot take the memo (here a directory of that name: unwritable even
    for root, who ignores a 0555 mode) sends it to $XDG_CACHE_HOME."""
    ckpt = make(tmp_path / "m")
    (ckpt / identity.MEMO).mkdir()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    fp = identity.checkpoint_fingerprint(ckpt)
    assert len(list((tmp_path / "cache" / "hicache" / "fingerprints").iterdir())) == 1
    read = []
    real = identity.file_digest
    monkeypatch.setattr(identity, "file_digest", lambda p: read.append(p.name) or real(p))
    assert identity.checkpoint_fingerprint(ckpt) == fp and read == []


def test_a_gguf_file_is_its_own_identity(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + b"\x00" * 100)
    before = identity.checkpoint_fingerprint(f)
    f.write_bytes(b"GGUF" + b"\x00" * 99 + b"\x01")
    assert identity.checkpoint_fingerprint(f) != before
    assert (tmp_path / ("m.gguf" + identity.MEMO)).exists()


def test_the_fingerprint_enters_the_namespace_and_the_random_model_has_one():
    assert StorageNamespace(fingerprint="a").tag != StorageNamespace(fingerprint="b").tag
    assert StorageNamespace().fields().get("fingerprint") is None  # none given: the namespace without it
    assert ModelConfig(seed=0).fingerprint != ModelConfig(seed=1).fingerprint
    assert ModelConfig(seed=0).fingerprint != ModelConfig(seed=0, hidden_size=512).fingerprint
    assert ModelConfig(seed=0).fingerprint == ModelConfig(seed=0).fingerprint


@pytest.mark.parametrize("bad", ["", "has space", "x" * 257, "tab\there"])
def test_a_bad_fingerprint_flag_is_refused(bad):
    with pytest.raises(ConfigError, match="--hicache-model-fingerprint"):
        HiCacheConfig(hicache_model_fingerprint=bad)


def test_bench_fingerprint_reports_its_cost_beside_a_raw_read(capsys):
    import json

    from hicache_core.cli import main

    assert main(["bench", "fingerprint", "--size-gb", "0.01", "--repeat", "1", "--json"]) == 0
    rows = {r["what"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    assert rows["read, cold (baseline)"]["vs_read"] == 1.0
    assert rows["fingerprint, cold"]["s"] > 0 and rows["fingerprint, memo (restart)"]["vs_read"] < 1
