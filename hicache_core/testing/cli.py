"""Checks for command-line errors, for the core's tests and plugins' own: a malformed input must end in one clear
line on stderr and a non-zero exit -- never a traceback, never accepted silently."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

EXTRA = "--hicache-storage-backend-extra-config"


def chk(*more: str) -> list[str]:
    """``hicache check`` with a page-first layout (every backend serves it) and ``more`` flags."""
    return ["check", "--hicache-mem-layout", "page_first", *more]


def backend_check(name: str, extra: dict[str, Any]) -> list[str]:
    """``hicache check`` of backend ``name`` with an extra config."""
    return chk("--hicache-storage-backend", name, EXTRA, json.dumps(extra))


def assert_clear_cli_error(main: Callable[[list[str]], int], argv: list[str], expected: str, capsys) -> str:
    """Run ``main(argv)`` (``hicache_core.cli.main``: passed in, the testing kit sits below the CLI) in process;
    assert a non-zero exit and one error naming ``expected``; return stderr."""
    rc: object
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc not in (0, None), f"accepted silently: hicache {' '.join(argv[:8])}"
    assert "Traceback" not in err and "internal error" not in err, err
    assert expected in err and "error" in err, err
    return err
