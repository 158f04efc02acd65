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
