import argparse
import json
import logging

import pytest

from hicache_core.config import HiCacheConfig, add_hicache_args, resolve_layout
from hicache_core.errors import ConfigError


def parse(*argv):
    p = argparse.ArgumentParser()
    add_hicache_args(p)
    return HiCacheConfig.from_args(p.parse_args(list(argv)))


def test_defaults_are_sglangs():
    c = parse()
    assert (c.hicache_ratio, c.hicache_size, c.hicache_io_backend, c.hicache_write_policy) == (
        2.0,
        0,
        "kernel",
        "write_through",
    )
    assert (c.hicache_mem_layout, c.hicache_storage_backend, c.hicache_storage_prefetch_policy) == (
        "layer_first",
        None,
        "best_effort",
    )
    assert (c.prefetch_threshold, c.prefetch_timeout_base, c.prefetch_timeout_per_ki_token) == (256, 1.0, 0.25)
    assert c.page_size == 64 and not c.enable_hierarchical_cache and c.write_through_threshold == 1


def test_every_seed_flag_parses():
    c = parse(
        "--page-size",
        "32",
        "--enable-hierarchical-cache",
        "--hicache-ratio",
        "3",
        "--hicache-size",
        "5",
        "--hicache-io-backend",
        "direct",
        "--hicache-write-policy",
        "write_through_selective",
        "--hicache-mem-layout",
        "page_first_direct",
        "--hicache-storage-backend",
        "memory",
        "--hicache-storage-prefetch-policy",
        "timeout",
        "--enable-metrics",
        "--enable-cache-report",
        "--hicache-storage-backend-extra-config",
        '{"prefetch_threshold": 128, "prefetch_timeout_base": 2, "x": 1}',
    )
    assert c.page_size == 32 and c.enable_hierarchical_cache and c.hicache_size == 5
    assert c.hicache_write_policy == "write_through_selective" and c.write_through_threshold == 2
    assert c.prefetch_threshold == 128 and c.prefetch_timeout_base == 2.0
    assert c.backend_extra_config == {"x": 1}  # reserved keys do not reach the backend
    assert c.enable_metrics and c.enable_cache_report


def test_extra_config_from_file(tmp_path):
    f = tmp_path / "extra.json"
    f.write_text(json.dumps({"prefetch_threshold": 512}))
    assert parse("--hicache-storage-backend-extra-config", str(f)).prefetch_threshold == 512
    assert parse("--hicache-storage-backend-extra-config", "@" + str(f)).prefetch_threshold == 512


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--hicache-storage-backend-extra-config", "{nope"], "not valid JSON"),
        (["--hicache-storage-backend-extra-config", "[1]"], "expected a JSON object"),
        (["--hicache-storage-backend-extra-config", "@/no/such/file.json"], "cannot read JSON file"),
        (
            ["--hicache-storage-backend-extra-config", '{"prefetch_threshold": "lots"}'],
            "prefetch_threshold='lots' is a string; write a whole number as a JSON number",
        ),
        (
            ["--hicache-storage-backend", "dynamic"],
            "needs --hicache-storage-backend-extra-config with backend_name, module_path, class_name",
        ),
        (
            [
                "--hicache-storage-backend",
                "dynamic",
                "--hicache-storage-backend-extra-config",
                '{"backend_name": "x", "module_path": "m"}',
            ],
            "class_name",
        ),
    ],
)
def test_bad_values_name_the_flag(argv, match):
    with pytest.raises(ConfigError, match=match):
        parse(*argv)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("hicache_ratio", -1.0, "--hicache-ratio: invalid value -1.0; it must be a finite number >= 0"),
        ("hicache_ratio", float("nan"), "--hicache-ratio: invalid value nan"),
        ("hicache_ratio", float("inf"), "--hicache-ratio: invalid value inf"),
        ("page_size", 0, "--page-size: invalid value 0"),
        ("page_size", 10**9, "--page-size: invalid value 1000000000; it must be <= 65536"),
    ],
)
def test_bad_values_in_code_name_the_flag(field, value, match):
    with pytest.raises(ConfigError, match=match):  # argparse refuses these on the command line already
        HiCacheConfig.from_mapping({field: value})


CHOICES = [
    ("hicache_io_backend", "dma", r"--hicache-io-backend: invalid value 'dma'; choose one of kernel, direct"),
    ("hicache_write_policy", "always", "choose one of write_back, write_through, write_through_selective"),
    ("hicache_mem_layout", "x", "choose one of layer_first, page_first, page_first_direct"),
    ("hicache_storage_prefetch_policy", "x", "best_effort, wait_complete, timeout"),
]


@pytest.mark.parametrize("field, value, match", CHOICES)
def test_bad_choices_name_the_flag_and_the_choices(field, value, match, capsys):
    with pytest.raises(ConfigError, match=match):  # in code or from a mapping
        HiCacheConfig.from_mapping({field: value})
    with pytest.raises(SystemExit) as e:  # on the command line argparse refuses it, listing the choices
        parse("--" + field.replace("_", "-"), value)
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_help_lists_choices_and_real_defaults():
    p = argparse.ArgumentParser()
    add_hicache_args(p)
    p.set_defaults(page_size=32)
    text = p.format_help()
    assert "{kernel,direct}" in text and "{best_effort,wait_complete,timeout,cost_aware}" in text
    assert "tokens per KV page (default 32)" in text


def test_from_mapping():
    c = HiCacheConfig.from_mapping({"--hicache-ratio": 4, "hicache_io_backend": "direct"})
    assert c.hicache_ratio == 4 and c.hicache_io_backend == "direct"
    with pytest.raises(ConfigError, match="unknown HiCache option 'hicache_ration'"):
        HiCacheConfig.from_mapping({"hicache_ration": 4})


def test_layout_adjustments_are_logged(caplog):
    caplog.set_level(logging.WARNING)
    c = resolve_layout(HiCacheConfig(hicache_mem_layout="page_first", hicache_io_backend="direct"))
    assert c.hicache_mem_layout == "layer_first" and "page_first_direct" in caplog.text
    c = resolve_layout(HiCacheConfig(hicache_mem_layout="page_first_direct", hicache_io_backend="kernel"))
    assert c.hicache_io_backend == "direct"
    c = resolve_layout(HiCacheConfig(), backend_page_first_only=True, backend_name="mooncake")
    assert c.hicache_mem_layout == "page_first"
    c = resolve_layout(HiCacheConfig(hicache_io_backend="direct"), backend_page_first_only=True)
    assert c.hicache_mem_layout == "page_first_direct"
    c = resolve_layout(
        HiCacheConfig(hicache_mem_layout="page_first", hicache_io_backend="direct"), backend_page_first_only=True
    )
    assert c.hicache_mem_layout == "page_first_direct"
    caplog.clear()
    same = HiCacheConfig()
    assert resolve_layout(same) is same and caplog.text == ""
