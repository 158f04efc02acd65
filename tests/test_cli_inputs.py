"""Malformed input at the command line: every case ends in a one-line error and a non-zero exit -- no traceback,
nothing silently accepted. The table is the operator's list from the reliability issue, and more."""

from __future__ import annotations

import os

import pytest

from hicache_core.cli import main
from hicache_core.testing.cli import EXTRA, assert_clear_cli_error, backend_check, chk

backend = backend_check


def file_backend(extra: dict) -> list[str]:
    return backend_check("file", extra)


def mt(*more: str) -> list[str]:
    return ["bench", "multiturn", "--configs", "none", *more]


CASES: list[tuple[str, list[str], str]] = [
    # --- HiCache flags
    ("page size 0", chk("--page-size", "0"), "--page-size: 0 is out of range"),
    ("page size negative", chk("--page-size", "-1"), "--page-size: -1 is out of range"),
    ("page size text", chk("--page-size", "abc"), "'abc' is not a whole number"),
    ("page size float", chk("--page-size", "1.5"), "is not a whole number"),
    ("page size huge", chk("--page-size", "99999999999"), "out of range"),
    ("page size empty", chk("--page-size", ""), "is not a whole number"),
    ("fingerprint with a space", chk("--hicache-model-fingerprint", "rev 2"), "give 1-256 printable characters"),
    ("salt host pages negative", chk("--hicache-salt-host-pages", "-1"), "out of range"),
    (
        "salt storage quota on memory",
        chk("--hicache-storage-backend", "memory", "--hicache-salt-storage-pages", "4"),
        "storage backend 'memory' cannot hold a per-namespace storage quota",
    ),
    ("bench fingerprint size 0", ["bench", "fingerprint", "--size-gb", "0"], "must be > 0"),
    ("ratio nan", chk("--hicache-ratio", "nan"), "nan is not a finite number"),
    ("ratio inf", chk("--hicache-ratio", "inf"), "inf is not a finite number"),
    ("ratio negative", chk("--hicache-ratio", "-1"), "out of range"),
    ("ratio text", chk("--hicache-ratio", "lots"), "'lots' is not a number"),
    ("host size negative", chk("--hicache-size", "-1"), "out of range"),
    ("host size float", chk("--hicache-size", "1.5"), "is not a whole number"),
    ("io backend", chk("--hicache-io-backend", "dma"), "invalid choice: 'dma'"),
    ("write policy", chk("--hicache-write-policy", "sometimes"), "invalid choice"),
    ("mem layout", chk("--hicache-mem-layout", "diagonal"), "invalid choice"),
    ("prefetch policy", chk("--hicache-storage-prefetch-policy", "eager"), "invalid choice"),
    ("eviction policy", chk("--radix-eviction-policy", "random"), "invalid choice"),
    ("unknown flag", chk("--hicache-rato", "2"), "unrecognized arguments"),
    # --- backend names and dynamic loading
    ("unknown backend", chk("--hicache-storage-backend", "nosuch"), "unknown storage backend 'nosuch'"),
    ("dynamic without keys", backend("dynamic", {}), "dynamic needs"),
    (
        "dynamic missing module",
        backend("dynamic", {"backend_name": "x", "module_path": "no.such.mod", "class_name": "C"}),
        "cannot import module 'no.such.mod'",
    ),
    (
        "dynamic missing class",
        backend("dynamic", {"backend_name": "x", "module_path": "json", "class_name": "Nope"}),
        "has no class 'Nope'",
    ),
    (
        "dynamic not a class",
        backend("dynamic", {"backend_name": "x", "module_path": "json", "class_name": "loads"}),
        "is a function, not a class",
    ),
    (
        "dynamic lacks methods",
        backend("dynamic", {"backend_name": "x", "module_path": "json", "class_name": "JSONDecoder"}),
        "lacks get, set, exists",
    ),
    (
        "dynamic interface_v1 text",
        backend("dynamic", {"backend_name": "x", "module_path": "json", "class_name": "C", "interface_v1": "perhaps"}),
        "interface_v1='perhaps' is not a boolean",
    ),
    # --- extra-config JSON
    ("extra not json", chk(EXTRA, "{nope"), "not valid JSON"),
    ("extra a list", chk(EXTRA, "[1, 2]"), "expected a JSON object, got list"),
    ("extra nested deeply", chk(EXTRA, "[" * 100000 + "]" * 100000), "nested too deeply"),
    ("extra nested deeply object", chk(EXTRA, '{"a": ' * 50000 + "1" + "}" * 50000), "nested too deeply"),
    ("extra missing file", chk(EXTRA, "@/no/such/file.json"), "cannot read JSON file"),
    (
        "threshold 1e400",
        chk(EXTRA, '{"prefetch_threshold": 1e400}'),
        "prefetch_threshold=inf is not a valid whole number",
    ),
    (
        "threshold text",
        chk(EXTRA, '{"prefetch_threshold": "lots"}'),
        "is a string; write a whole number as a JSON number",
    ),
    ("threshold negative", chk(EXTRA, '{"prefetch_threshold": -5}'), "must be a finite number >= 0"),
    ("threshold NaN", chk(EXTRA, '{"prefetch_threshold": NaN}'), "prefetch_threshold=nan"),
    ("threshold list", chk(EXTRA, '{"prefetch_threshold": [1]}'), "is not a valid whole number"),
    ("timeout NaN", chk(EXTRA, '{"prefetch_timeout_base": NaN}'), "must be a finite number"),
    ("timeout Infinity", chk(EXTRA, '{"prefetch_timeout_base": Infinity}'), "must be a finite number"),
    ("timeout negative", chk(EXTRA, '{"prefetch_timeout_per_ki_token": -1}'), "must be a finite number >= 0"),
    (
        "io timeout text",
        chk(EXTRA, '{"io_timeout_s": "soon"}'),
        "io_timeout_s='soon' is a string; write a number as a JSON number",
    ),
    ("io timeout NaN", chk(EXTRA, '{"io_timeout_s": NaN}'), "must be a finite number"),
    ("pass prefix keys", chk(EXTRA, '{"hicache_storage_pass_prefix_keys": "maybe"}'), "is not a boolean"),
    ("threshold bool", chk(EXTRA, '{"prefetch_threshold": true}'), "is not a valid whole number"),
    # --- file backend
    ("file typo key", file_backend({"storag_dir": "/tmp/x"}), "did you mean 'storage_dir'"),
    ("file dir number", file_backend({"storage_dir": 12345}), "storage_dir=12345 must be a non-empty string"),
    ("file dir empty", file_backend({"storage_dir": ""}), "must be a non-empty string"),
    ("file capacity negative", file_backend({"capacity_bytes": -1}), "capacity_bytes=-1 must be >= 0"),
    ("file capacity text", file_backend({"capacity_bytes": "lots"}), "is not a size"),
    ("file capacity NaN", file_backend({"capacity_bytes": float("nan")}), "is not a size"),
    ("file threads 0", file_backend({"io_threads": 0}), "io_threads=0 must be a whole number >= 1"),
    ("file threads huge", file_backend({"io_threads": 10**6}), "must be a whole number >= 1 and <= 256"),
    ("file fsync typo", file_backend({"fsync": "fals"}), "fsync='fals' is not a boolean"),
    ("file layout compat", file_backend({"layout_compat": "sglng"}), "layout_compat='sglng'; choose one of"),
    ("file mac key empty", file_backend({"mac_key": ""}), "mac_key='' must be a non-empty string"),
    ("file mac key number", file_backend({"mac_key": 5}), "mac_key=5 must be a non-empty string"),
    ("file dir is a file", file_backend({"storage_dir": "/etc/hostname/sub"}), "cannot use storage_dir"),
    ("file dir world writable", file_backend({"storage_dir": "{tmp}/open"}), "writable by group and others"),
    (
        "file sglang layout capacity",
        file_backend({"layout_compat": "sglang", "capacity_bytes": 10, "storage_dir": "{tmp}/s"}),
        "cannot be used with layout_compat",
    ),
    # --- memory backend
    ("memory unknown key", backend("memory", {"stor": "x"}), "did you mean 'store'"),
    ("memory capacity negative", backend("memory", {"capacity_bytes": -1}), "must be >= 0"),
    ("memory store number", backend("memory", {"store": 5}), "store=5 must be a non-empty string"),
    # --- KV shape and ranks
    ("layers 0", chk("--num-layers", "0"), "--num-layers: 0 is out of range"),
    ("heads negative", chk("--num-kv-heads", "-1"), "out of range"),
    ("head dim 0", chk("--head-dim", "0"), "out of range"),
    ("dtype", chk("--dtype", "float7"), "invalid choice: 'float7'"),
    ("tp size 0", chk("--tp-size", "0"), "--tp/--tp-size: 0 is out of range"),
    ("tp rank past size", chk("--tp-rank", "2", "--tp-size", "2"), "--tp-rank 2 must be below --tp-size 2"),
    ("tp rank negative", chk("--tp-rank", "-1"), "out of range"),
    ("check pages 0", chk("--pages", "0"), "--pages: 0 is out of range"),
    ("check pages huge", chk("--pages", "1000000000"), "out of range"),
    (
        "check needs too much memory",
        [
            "check",
            "--hicache-storage-backend",
            "memory",
            "--page-size",
            "65536",
            "--pages",
            "65536",
            "--num-layers",
            "4096",
            "--num-kv-heads",
            "4096",
        ],
        "not enough memory",
    ),
    # --- benchmarks
    ("multiturn 0 clients", mt("--num-clients", "0"), "--num-clients: 0 is out of range"),
    ("multiturn -1 rounds", mt("--num-rounds", "-1"), "--num-rounds: -1 is out of range"),
    ("multiturn 0 request length", mt("--request-length", "0"), "out of range"),
    ("multiturn 0 output", mt("--output-length", "0"), "out of range"),
    ("multiturn rate 0", mt("--request-rate", "0"), "--request-rate: 0 is out of range"),
    ("multiturn rate nan", mt("--request-rate", "nan"), "nan is not a finite number"),
    ("multiturn device tokens 0", mt("--device-tokens", "0"), "out of range"),
    ("multiturn max running 0", mt("--max-running", "0"), "out of range"),
    ("multiturn hidden 0", mt("--hidden-size", "0"), "out of range"),
    ("multiturn seed negative", mt("--seed", "-1"), "out of range"),
    ("multiturn configs", mt("--configs", "none,turbo"), "turbo"),
    (
        "storage bench total 0",
        ["bench", "storage", "--hicache-storage-backend", "memory", "--total-mib", "0"],
        "out of range",
    ),
    (
        "storage bench repeat 0",
        ["bench", "storage", "--hicache-storage-backend", "memory", "--repeat", "0"],
        "out of range",
    ),
    ("storage bench page sizes", ["bench", "storage", "--page-kib", "abc"], "--page-kib 'abc': give page sizes"),
    ("storage bench page size 0", ["bench", "storage", "--page-kib", "0"], "cannot be made of pages"),
    ("transfer pages 0", ["bench", "transfer", "--pages", "0"], "out of range"),
    ("transfer mla negative", ["bench", "transfer", "--mla-dim", "-1"], "out of range"),
    ("tree prompt 0", ["bench", "tree", "--prompt-tokens", "0"], "out of range"),
    ("tree page size 0", ["bench", "tree", "--page-size", "0"], "out of range"),
    ("serve hidden 0", ["serve", "--hidden-size", "0"], "out of range"),
    (
        "serve shape with a checkpoint",
        ["serve", "--model-path", "{tmp}", "--num-layers", "2"],
        "--num-layers shape the random model; --model-path",
    ),
    # --- commands
    ("no command", [], "required: command"),
    ("unknown command", ["serve-me"], "invalid choice: 'serve-me'"),
    ("backends flag", ["backends", "--jsn"], "unrecognized arguments"),
]


@pytest.fixture(scope="module")
def tmp_dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli")
    (base / "open").mkdir()
    os.chmod(base / "open", 0o777)
    return base


@pytest.mark.parametrize("argv, expected", [(c[1], c[2]) for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_input_is_one_clear_error(argv, expected, tmp_dirs, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_dirs / "xdg"))
    assert_clear_cli_error(main, [a.replace("{tmp}", str(tmp_dirs)) for a in argv], expected, capsys)


def test_the_table_is_big_enough():
    # the operator's 93, less the hf3fs and mooncake cases that live with their plugins' tests
    assert len(CASES) >= 85


def test_the_cli_needs_no_test_tools():
    """`hicache` (every command's parser, certify's included) imports without pytest, as on a serving machine."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['pytest'] = None\n"
        "from hicache_core.cli import build_parser, main\n"
        "build_parser()\n"
        "sys.exit(main(['certify', '--hicache-storage-backend', 'memory', '--no-conformance', '--faults', 'none']))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "CERTIFIED" in r.stdout, r.stderr[-2000:]


def test_serve_takes_the_benchmarks_random_model_shape():
    """scripts/bench-http.sh serves the in-process benchmark's random model, so HTTP runs its workload; without the
    flags serve keeps ModelConfig's."""
    from hicache_core.bench.multiturn_args import BENCH_SHAPE
    from hicache_core.cli import build_parser
    from hicache_core.engine import ModelConfig
    from hicache_core.engine.checkpoint import config_from_args

    flags = [a for f, v in BENCH_SHAPE.items() for a in ("--" + f.replace("_", "-"), str(v))]
    got = config_from_args(build_parser().parse_args(["serve", *flags]))
    assert (
        {f: getattr(got, f) for f in BENCH_SHAPE} == BENCH_SHAPE != {f: getattr(ModelConfig(), f) for f in BENCH_SHAPE}
    )
    assert config_from_args(build_parser().parse_args(["serve"])) == ModelConfig()
    script = open(os.path.join(os.path.dirname(__file__), "..", "scripts", "bench-http.sh")).read()
    assert all(f"{flag} {v}" in script for flag, v in zip(flags[::2], flags[1::2]))
