"""``--hicache-storage-backend-extra-config``: the JSON (inline, ``@path`` or a file), the keys the core reads out
of it before the rest reaches the backend (SGLang's reserved keys, the dynamic loader's), typed strictly."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any, Optional

from hicache_core.errors import ConfigError

# Keys SGLang pops out of --hicache-storage-backend-extra-config before the rest reaches the backend.
RESERVED_EXTRA_KEYS = {
    "prefetch_threshold": int,
    "prefetch_timeout_base": float,
    "prefetch_timeout_per_ki_token": float,
    "hicache_storage_pass_prefix_keys": bool,
    "io_timeout_s": float,  # ours: the deadline of each backend call (0 = none)
    # ours: the L3 page codec (storage/codec.py), when it is used, and zstd's level
    "codec": str,
    "codec_when": str,
    "codec_level": int,
    # ours: pages stored by groups of this many KV heads, shared across TP sizes (storage/head_split.py)
    "head_group": int,
}
CODECS = ("none", "zstd", "fp8")
CODEC_WHEN = ("pays", "always")
_CHOICES = {"codec": CODECS, "codec_when": CODEC_WHEN}
DYNAMIC_KEYS = ("backend_name", "module_path", "class_name", "interface_v1")


def read_json_object(path: str, source: str) -> dict[str, Any]:
    """A JSON object from a file; errors name ``source``, the file and what is wrong with it."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except RecursionError:
        raise ConfigError(f"{source}: file {path!r} holds JSON nested too deeply") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{source}: file {path!r} is not UTF-8 text ({e.reason})") from None
    except OSError as e:
        raise ConfigError(f"{source}: cannot read JSON file {path!r}: {e.strerror}") from e
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"{source}: file {path!r} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
        ) from e
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: file {path!r} must hold a JSON object, not {type(value).__name__}")
    return value


def parse_extra_config(raw: Optional[str | Mapping[str, Any]]) -> dict[str, Any]:
    """Parse ``--hicache-storage-backend-extra-config``: a JSON object, ``@path`` or a path to a JSON file."""
    if raw is None or raw == "":
        return {}
    if isinstance(raw, Mapping):
        return dict(raw)
    text = raw.strip()
    source = "--hicache-storage-backend-extra-config"
    path = text[1:] if text.startswith("@") else text
    if not text.startswith("{") and (text.startswith("@") or os.path.isfile(path)):
        return read_json_object(path, source)
    try:
        value = json.loads(text)
    except RecursionError:
        raise ConfigError(f"{source}: JSON nested too deeply; give a flat JSON object of keys and values") from None
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"{source}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); "
            "give a JSON object such as '{\"prefetch_threshold\": 256}' or a path to a JSON file"
        ) from e
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(value).__name__}")
    return value


def require_dynamic_keys(extra: Mapping[str, Any]) -> None:
    """The one home of the rule: ``dynamic`` needs backend_name, module_path and class_name."""
    missing = [k for k in DYNAMIC_KEYS[:3] if not extra.get(k)]
    if missing:
        raise ConfigError(
            "--hicache-storage-backend dynamic needs --hicache-storage-backend-extra-config with "
            f"{', '.join(missing)}; for example "
            '\'{"backend_name": "my_store", "module_path": "my_pkg.store", "class_name": "MyStore", '
            '"interface_v1": 0}\''
        )


def coerce_reserved(key: str, value: Any, kind: type) -> Any:
    """A reserved key's JSON value, strictly: a string where a boolean or a number belongs is refused, never read."""
    what = f"--hicache-storage-backend-extra-config: {key}={value!r}"
    if kind is str:
        if value not in _CHOICES[key]:
            raise ConfigError(f"{what}: choose one of {', '.join(map(repr, _CHOICES[key]))}")
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{what} is not a boolean; write JSON true or false, without quotes")
        return value
    name = "whole number" if kind is int else "number"
    if isinstance(value, str):
        raise ConfigError(f"{what} is a string; write a {name} as a JSON number, without quotes")
    if isinstance(value, bool) or not isinstance(value, int if kind is int else (int, float)):
        raise ConfigError(f"{what} is not a valid {name}")
    out = kind(value)
    if not math.isfinite(out) or out < 0:
        raise ConfigError(f"{what} must be a finite number >= 0")
    return out
