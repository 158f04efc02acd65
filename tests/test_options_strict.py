"""Extra-config JSON is typed: a boolean or a number written as a string (``"fsync": "false"``) is refused with
the key, the value and the fix, in every schema the core and the file plugin ship, and in the reserved keys."""

from __future__ import annotations

import pytest

from hicache_core.config import HiCacheConfig
from hicache_core.errors import ConfigError
from hicache_core.storage.memory import MemoryOptions
from hicache_core.storage.options import boolean, number, option, parse_options, size, string_holes, whole
from hicache_plugin_file.directory import FileOptions


@pytest.mark.parametrize("cls", [MemoryOptions, FileOptions])
def test_no_schema_takes_a_string_for_a_boolean_or_number(cls):
    assert string_holes(cls) == []


def test_string_holes_finds_a_lenient_parser():
    import attrs

    def lenient(value, what):
        return bool(value)

    lenient.__qualname__ = "boolean"  # a parser named like the core's that accepts anything

    @attrs.frozen(kw_only=True)
    class Loose:
        flag: bool = option(False, lenient, "")

    assert string_holes(Loose) == ["flag='true'"]


@pytest.mark.parametrize(
    "parse, value, message",
    [
        (boolean, "false", "is not a boolean; write JSON true or false"),
        (boolean, 0, "is not a boolean"),
        (whole(0), "12", "is a string; write a whole number as a JSON number"),
        (whole(0), 1.5, "must be a whole number"),
        (number(0), "0.5", "is a string; write a number as a JSON number"),
        (size, "0.5", "is not a whole number of bytes"),
        (size, "true", "is not a size"),
    ],
)
def test_parsers_refuse_strings(parse, value, message):
    with pytest.raises(ConfigError, match=message):
        parse(value, "b: k")


def test_sizes_with_units_and_real_values_still_parse():
    # SGLang's Mooncake config reads a size as a number, digits in a string, or a string with its unit: all load
    assert size("4gb", "k") == 4 << 30 and size(1024, "k") == 1024 and size("1073741824", "k") == 1 << 30
    assert boolean(True, "k") is True and whole(1)(3, "k") == 3 and number(0)(0.5, "k") == 0.5


def test_file_backend_fsync_string_is_refused():
    with pytest.raises(ConfigError, match=r"file backend: fsync='false' is not a boolean"):
        parse_options(FileOptions, {"fsync": "false"}, "file backend")


@pytest.mark.parametrize(
    "extra, message",
    [
        ('{"prefetch_threshold": "256"}', "prefetch_threshold='256' is a string"),
        ('{"prefetch_threshold": 2.5}', "prefetch_threshold=2.5 is not a valid whole number"),
        ('{"io_timeout_s": "5"}', "io_timeout_s='5' is a string"),
        ('{"hicache_storage_pass_prefix_keys": "true"}', "is not a boolean; write JSON true or false"),
    ],
)
def test_reserved_keys_refuse_strings(extra, message):
    with pytest.raises(ConfigError, match=message):
        HiCacheConfig(hicache_storage_backend="file", hicache_storage_backend_extra_config=extra)
