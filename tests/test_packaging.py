"""The distribution as a contributor meets it: the sdist's tests run after unpacking; tox lists the real envs."""

import configparser
import re
import shutil
import subprocess
from pathlib import Path

from hicache_core.testing.packaging import run_pytest, unpacked_sdist

REPO = Path(__file__).resolve().parents[1]


def test_sdist_ships_tests_that_run(tmp_path):
    root = unpacked_sdist(REPO, tmp_path)
    assert (root / "hicache_core" / "py.typed").is_file()  # PEP 561: typed for its users
    assert (root / "hicache_core" / "transfer" / "ntcopy.c").is_file()  # the streaming copier is built from it
    assert (root / "tests" / "core_helpers.py").is_file() and (root / "tests" / "cache_helpers.py").is_file()
    # every test module imports from the unpacked tree (a collection error fails the run): helpers included
    assert re.search(r"\d+ tests collected", run_pytest(root, "--collect-only", "tests"))
    assert " passed" in run_pytest(root, "tests/test_keys.py", "tests/test_config.py")


def test_tox_lists_exactly_the_real_envs():
    tox = shutil.which("tox")
    assert tox, "tox is not on PATH: python3 -m pip install tox (the README's test command needs it)"
    ini = configparser.ConfigParser(interpolation=None)
    ini.read(REPO / "tox.ini")
    defined = {s.split(":", 1)[1] for s in ini.sections() if s.startswith("testenv:")}
    listed = subprocess.run(
        [tox, "-l", "-c", str(REPO / "tox.ini")], capture_output=True, text=True, timeout=120
    ).stdout.split()
    assert sorted(listed) == sorted(defined), f"tox -l lists {listed}; tox.ini defines {sorted(defined)}"
    assert len(listed) == len(set(listed))
    every = subprocess.run(
        [tox, "list", "-c", str(REPO / "tox.ini")], capture_output=True, text=True, timeout=120
    ).stdout
    assert "additional environments" not in every, f"tox knows envs that are not in env_list:\n{every}"
