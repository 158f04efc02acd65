"""The one home of value parsing for configs and extra-config JSON: booleans and byte sizes.

Every error names what was being parsed (``what``) and the accepted spellings, so a typo never silently turns
into a default: ``"false"`` is False, ``"fals"`` is an error.
"""

from __future__ import annotations

import re
from typing import Any

from hicache_core.errors import ConfigError

TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.I)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_bool(value: Any, what: str) -> bool:
    """True/False from a bool, 0/1, or one of the spellings in TRUE / FALSE (any case)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        v = value.strip().lower()
        if v in TRUE:
            return True
        if v in FALSE:
            return False
    raise ConfigError(f"{what}={value!r} is not a boolean; use true/false (or 1/0, yes/no, on/off)")


def parse_size(value: Any, what: str) -> int:
    """Bytes (>= 0) from an int or a string such as ``"4gb"``, ``"512MiB"``, ``"64k"``, ``"1073741824"``."""
    if isinstance(value, bool):
        raise ConfigError(f"{what}={value!r} is not a size")
    if isinstance(value, int):
        n = value
    else:
        m = _SIZE.match(str(value))
        if not m:
            raise ConfigError(f"{what}={value!r} is not a size; use bytes or a string like '4gb' or '512mib'")
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n < 0:
        raise ConfigError(f"{what}={value!r} must be >= 0")
    return n


# --- command-line flag types (argparse ``type=``): a bad value is argparse's one-line error, exit 2 ----------------
def arg_int(minimum: int = 0, maximum: int | None = None):
    """An argparse type: a whole number in ``[minimum, maximum]``."""
    import argparse

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum or (maximum is not None and value > maximum):
            bounds = f">= {minimum}" + (f" and <= {maximum}" if maximum is not None else "")
            raise argparse.ArgumentTypeError(f"{text} is out of range: it must be {bounds}")
        return value

    parse.__name__ = "whole number"
    return parse


def arg_float(minimum: float = 0.0, *, above: bool = False, allow_inf: bool = False):
    """An argparse type: a number >= ``minimum`` (> with ``above``); NaN never, infinity only with ``allow_inf``."""
    import argparse
    import math

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if math.isnan(value) or (math.isinf(value) and not allow_inf):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number")
        if value < minimum or (above and value == minimum):
            raise argparse.ArgumentTypeError(f"{text} is out of range: it must be {'>' if above else '>='} {minimum:g}")
        return value

    parse.__name__ = "number"
    return parse


# --kv-cache-dtype (SGLang's flag): auto keeps the model's KV dtype (bfloat16 for the random model, a checkpoint's
# own or --dtype's); fp8_e4m3 stores float8 e4m3 KV with a float32 scale per token and head (memory/kv_codec.py)
KV_CACHE_DTYPES = ("auto", "fp8_e4m3")


def add_kv_cache_dtype(group: Any) -> None:
    """``--kv-cache-dtype`` on an argparse parser or group (bench multiturn and serve take it alike)."""
    group.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=KV_CACHE_DTYPES,
        help="KV in the pools and storage: auto (the model's: bfloat16 for the random model, a checkpoint's own or "
        "--dtype's) or fp8_e4m3 (float8 e4m3 with a float32 scale per token and head, stored in the page; about "
        "half the bytes; its pages never mix with another dtype's)",
    )
