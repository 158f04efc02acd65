"""hicache_storage_pass_prefix_keys: backends that take SGLang's ``extra_info`` get the storage keys of every
page before a batch -- for backups, prefetch queries and prefetch reads -- namespaced like the batch's own keys."""

from __future__ import annotations

import uuid

from cache_helpers import PS, make_cache, run_request, seq

from hicache_core.storage.memory import MemoryStorage

CALLS: list[tuple[str, list[str], object]] = []


class RecordingStore(MemoryStorage):
    """The memory backend, taking extra_info as SGLang's backends do, and writing down what it got."""

    def batch_exists(self, keys, extra_info=None):
        CALLS.append(("exists", list(keys), extra_info))
        return super().batch_exists(keys)

    def batch_get_v1(self, keys, host_indices, extra_info=None):
        CALLS.append(("get", list(keys), extra_info))
        return super().batch_get_v1(keys, host_indices)

    def batch_set_v1(self, keys, host_indices, extra_info=None):
        CALLS.append(("set", list(keys), extra_info))
        return super().batch_set_v1(keys, host_indices)


def recording_cache(store: str, on: bool):
    extra = {
        "backend_name": "rec",
        "module_path": __name__,
        "class_name": "RecordingStore",
        "interface_v1": 1,
        "store": store,
        "hicache_storage_pass_prefix_keys": on,
    }
    return make_cache(storage="dynamic", extra=extra, prefetch="wait_complete", device_pages=6)


def calls(kind: str) -> list[tuple[list[str], object]]:
    return [(k, e) for op, k, e in CALLS if op == kind]


def test_prefix_keys_reach_backups_and_prefetches():
    CALLS.clear()
    store = uuid.uuid4().hex
    a = seq(1, 3)
    c = recording_cache(store, True)
    run_request(c, a)
    run_request(c, a + seq(2, 2))  # a child node: its backup's prefix is a's three pages
    c.flush()
    c.close()
    sets = calls("set")
    assert len(sets) == 2, sets
    (a_keys, a_extra), (b_keys, b_extra) = sets
    assert len(a_keys) == 3 and a_extra.prefix_keys == []
    assert len(b_keys) == 2 and b_extra.prefix_keys == a_keys

    CALLS.clear()
    reader = recording_cache(store, True)
    run_request(reader, a[: 2 * PS])  # computed here (a miss at first), so the prefetch below anchors after it
    CALLS.clear()
    run_request(reader, a + seq(2, 2), rid="r2")
    exists, gets = calls("exists"), calls("get")
    assert exists and exists[0][1].prefix_keys == a_keys[:2] and exists[0][0] == [a_keys[2]] + b_keys
    assert gets and gets[0][1].prefix_keys == a_keys[:2]
    reader.close()


def test_without_the_flag_no_extra_info_is_passed():
    CALLS.clear()
    c = recording_cache(uuid.uuid4().hex, False)
    run_request(c, seq(3, 3))
    c.flush()
    c.close()
    assert CALLS and all(extra is None for _, _, extra in CALLS)


def test_sglang_extra_info_is_read_by_its_fields():
    """HiCacheForSGLang hands SGLang's HiCacheStorageExtraInfo on as ours: same field names; SGLang's read-side
    default ``prefix_keys=(None,)`` (a typo upstream) carries nothing."""
    import dataclasses

    from hicache_core.storage import ExtraInfo

    @dataclasses.dataclass
    class SGLangExtraInfo:
        prefix_keys: object = (None,)
        extra_info: object = None

    assert ExtraInfo.of(None) is None and ExtraInfo.of(SGLangExtraInfo()) is None
    assert ExtraInfo.of(SGLangExtraInfo(prefix_keys=["a", "b"])) == ExtraInfo(prefix_keys=["a", "b"])
    assert ExtraInfo.of(SGLangExtraInfo(prefix_keys=None, extra_info={"x": 1})) == ExtraInfo(None, {"x": 1})
