"""The command-line options several benchmarks share, defined once: integer flags with a range and their default in
the help, and the output group (report directory, JSON, progress, and where a benchmark has them: repeats, a store
directory, running servers to drive)."""

from __future__ import annotations

import argparse
from typing import Any, Optional

from hicache_core.parse import arg_int


def int_option(group: Any, flags: str, lo: int, hi: Optional[int], default: Optional[int], help: str, **more) -> None:
    """An integer flag (``flags``: one or several, space separated) in [lo, hi]; its help ends with the default."""
    if default is not None:
        help = f"{help} (default %(default)s)"
    group.add_argument(*flags.split(), type=arg_int(lo, hi), default=default, help=help, **more)


def add_output_arguments(
    p: argparse.ArgumentParser,
    *,
    report: str,
    progress: Optional[str] = "no progress lines on stderr",
    repeat: Optional[str] = None,
    storage_dir: Optional[str] = None,
    base_url: Optional[str] = None,
    json_help: str = "print the JSON report instead of tables",
) -> Any:
    """The "output" group: ``--report-dir`` (``report`` says what goes there), ``--json``, and where given,
    ``--no-progress``, ``--repeat`` (its help: what runs again), ``--storage-dir`` (what goes there, in a temp dir
    by default) and ``--base-url`` (what it drives instead of the in-process engine). Returns the group."""
    o = p.add_argument_group("output")
    if repeat is not None:
        int_option(o, "--repeat", 1, 100, 1, f"run everything N times ({repeat}) and report the spread")
    if storage_dir is not None:
        o.add_argument(
            "--storage-dir", default=None, help=f"{storage_dir} (default: a temp dir, removed after the run)"
        )
    o.add_argument("--report-dir", default="hicache-report", help=f"where {report} (default %(default)s)")
    o.add_argument("--json", action="store_true", help=json_help)
    if progress is not None:
        o.add_argument("--no-progress", action="store_true", help=progress)
    if base_url is not None:
        o.add_argument(
            "--base-url",
            action="append",
            default=None,
            metavar="[LABEL=]URL",
            help=f"{base_url} instead of the in-process engine; repeat to compare them, the first is the reference",
        )
    return o
