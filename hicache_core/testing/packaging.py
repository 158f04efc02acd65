"""Packaging checks a distribution runs on itself: its sdist ships its tests with their helpers, and they run.

Used by the core's and each plugin's ``test_packaging.py``; build with the installed setuptools, no network.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path


def build_sdist(project: Path, out: Path) -> Path:
    """Build ``project``'s sdist into ``out`` with setuptools' PEP 517 backend, in a child process."""
    out.mkdir(parents=True, exist_ok=True)
    code = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    r = subprocess.run([sys.executable, "-c", code, str(out)], cwd=project, capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise AssertionError(f"building the sdist of {project} failed:\n{r.stderr[-3000:]}")
    return out / r.stdout.strip().splitlines()[-1]


def unpack(sdist: Path, into: Path) -> Path:
    with tarfile.open(sdist) as tar:
        tar.extractall(into, filter="data")
    (root,) = [p for p in into.iterdir() if p.is_dir()]
    return root


def unpacked_sdist(project: Path, tmp: Path) -> Path:
    """Build ``project``'s sdist and unpack it; the root must hold LICENSE and tests/."""
    root = unpack(build_sdist(project, tmp / "dist"), tmp / "unpacked")
    assert (root / "LICENSE").is_file(), f"{root.name}: the sdist has no LICENSE"
    assert (root / "tests").is_dir(), f"{root.name}: the sdist has no tests/"
    return root


def run_pytest(root: Path, *pytest_args: str) -> str:
    """pytest in an unpacked sdist (``pytest_args`` choose which tests); its output. Raises with the output when
    pytest fails, a collection error included."""
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(root), *pytest_args],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if r.returncode != 0:
        raise AssertionError(
            f"{root.name}: tests from the unpacked sdist failed:\n{r.stdout[-4000:]}{r.stderr[-2000:]}"
        )
    return r.stdout
