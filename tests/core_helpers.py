"""Test helpers: fake-but-real installed plugin packages (a dist-info with entry points on sys.path)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def install_plugin(
    site: Path, dist: str, module: str, plugin_src: str, ep_name: str, extra_modules: dict | None = None
) -> Path:
    """Lay out an installed distribution in ``site`` the way pip does: the package plus its dist-info."""
    site.mkdir(parents=True, exist_ok=True)
    pkg = site / module
    pkg.mkdir(exist_ok=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "plugin.py").write_text(textwrap.dedent(plugin_src))
    for name, src in (extra_modules or {}).items():
        (pkg / f"{name}.py").write_text(textwrap.dedent(src))
    info = site / f"{dist.replace('-', '_')}-0.3.1.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.3.1\n")
    (info / "entry_points.txt").write_text(f"[hicache]\n{ep_name} = {module}.plugin\n")
    return site


def run_cli(*args: str, pythonpath: list[Path] | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    paths = [str(p) for p in (pythonpath or [])] + [str(REPO)]
    e["PYTHONPATH"] = os.pathsep.join(paths + ([e["PYTHONPATH"]] if e.get("PYTHONPATH") else []))
    e.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "hicache_core.cli", *args], capture_output=True, text=True, env=e, timeout=300
    )
