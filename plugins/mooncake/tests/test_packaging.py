"""The sdist ships its tests with their helpers (conftest starts a real mooncake_master), and they run after
unpacking."""

from pathlib import Path

from hicache_core.testing.packaging import run_pytest, unpacked_sdist


def test_sdist_ships_tests_that_run(tmp_path):
    root = unpacked_sdist(Path(__file__).resolve().parents[1], tmp_path)
    assert (root / "hicache_plugin_mooncake" / "py.typed").is_file()  # PEP 561: typed for its users
    assert " passed" in run_pytest(root, "tests", "-k", "test_v1_roundtrip and page_first_direct")
