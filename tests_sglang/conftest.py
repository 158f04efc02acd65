"""A real mooncake_master on loopback, the same one the mooncake plugin's tests start (its conftest's Master)."""

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "mooncake_plugin_conftest", Path(__file__).resolve().parents[1] / "plugins" / "mooncake" / "tests" / "conftest.py"
)
_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mod)


@pytest.fixture(scope="session")
def master(tmp_path_factory):
    m = _mod.Master(str(tmp_path_factory.mktemp("mooncake")))
    m.start()
    yield m
    m.stop()
