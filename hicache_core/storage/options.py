"""Declarative extra-config schemas for backends: one attrs class per backend, parsed by :func:`parse_options`.

Each field is an :func:`option` with its default, a parser from :mod:`hicache_core.parse` (or one of the small
ones here) and a line of help. :func:`parse_options` is the one place where extra-config JSON meets a backend:
an unknown key is an error that lists the known ones (and the nearest, for a typo such as ``storag_dir``), and
every value is parsed with a message naming the backend, the key and the value.

Example::

    @attrs.frozen(kw_only=True)
    class MyOptions:
        root: str = option("/var/cache/my", text, "where pages live")
        capacity_bytes: int = option(0, parse_size, "0 = unlimited")

    opts = parse_options(MyOptions, extra_config, "my backend")
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping
from typing import Any, Optional

import attrs

from hicache_core.errors import ConfigError
from hicache_core.parse import parse_size

Parser = Callable[[Any, str], Any]
# Keys the core's dynamic loader reads from the same JSON: a plugin class loaded through ``dynamic`` sees them.
LOADER_KEYS = ("backend_name", "module_path", "class_name", "interface_v1")
SOURCE = "--hicache-storage-backend-extra-config"


def option(default: Any = None, parse: Optional[Parser] = None, help: str = "") -> Any:
    """One extra-config key: its default, its parser (``parse(value, what)``) and a line of help."""
    return attrs.field(default=default, metadata={"parse": parse, "help": help})


# --- parsers -----------------------------------------------------------------------------------------------------
def text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{what}={value!r} must be a non-empty string")
    return value


# JSON has booleans and numbers: a string where one belongs is a mistake to name ("fsync": "false" once turned
# fsync on in a hand-written config elsewhere), never a value to guess at. Environment variables, which are all
# strings, are parsed where they are read (hicache_core.parse), not here.
def boolean(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{what}={value!r} is not a boolean; write JSON true or false, without quotes")
    return value


def size(value: Any, what: str) -> int:
    """Bytes: a JSON number, or a string of digits or with its unit (``"4gb"``) -- SGLang's Mooncake config takes
    both, so its files load here unchanged. A string that is a fraction without a unit (``"0.5"``) is refused."""
    if isinstance(value, str) and not value.strip().isdigit() and _plain_number(value):
        raise ConfigError(f"{what}={value!r} is not a whole number of bytes; write a number of bytes or add a unit")
    return parse_size(value, what)


def _plain_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _not_text(value: Any, what: str, kind: str) -> None:
    if isinstance(value, str):
        raise ConfigError(f"{what}={value!r} is a string; write {kind} as a JSON number, without quotes")


def whole(minimum: int = 0, maximum: Optional[int] = None) -> Parser:
    def parse(value: Any, what: str) -> int:
        _not_text(value, what, "a whole number")
        ok = isinstance(value, int) and not isinstance(value, bool)
        if not ok or value < minimum or (maximum is not None and value > maximum):
            bounds = f">= {minimum}" + (f" and <= {maximum}" if maximum is not None else "")
            raise ConfigError(f"{what}={value!r} must be a whole number {bounds}")
        return int(value)

    return parse


def number(minimum: float = 0.0, *, above: bool = False) -> Parser:
    def parse(value: Any, what: str) -> float:
        _not_text(value, what, "a number")
        try:
            if isinstance(value, bool):
                raise ValueError
            out = float(value)
        except (TypeError, ValueError, OverflowError):
            out = math.nan
        if not math.isfinite(out) or out < minimum or (above and out == minimum):
            raise ConfigError(f"{what}={value!r} must be a finite number {'>' if above else '>='} {minimum:g}")
        return out

    return parse


def choice(*choices: str) -> Parser:
    def parse(value: Any, what: str) -> str:
        if value not in choices:
            raise ConfigError(f"{what}={value!r}; choose one of {', '.join(choices)}")
        return str(value)

    return parse


# --- the schema ---------------------------------------------------------------------------------------------------
def option_names(cls: type) -> list[str]:
    return [f.name for f in attrs.fields(cls) if "parse" in f.metadata]


def parse_options(
    cls: type,
    extra: Mapping[str, Any],
    backend: str,
    *,
    where: str = SOURCE,
    allow: tuple[str, ...] = LOADER_KEYS,
    **fixed: Any,
) -> Any:
    """``cls(**parsed)`` from the keys of ``extra``; unknown keys (beyond ``allow``) are an error. A None value means
    "the default". ``where`` names where the keys came from; ``fixed`` are constructor arguments that are not
    extra-config keys (such as a source label)."""
    known = option_names(cls)
    unknown = [k for k in extra if k not in known and k not in allow]
    if unknown:
        hints = []
        for k in unknown:
            near = difflib.get_close_matches(str(k), known, n=1)
            hints.append(f"{k!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))
        raise ConfigError(
            f"{backend}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(hints)} in {where}; "
            f"known keys: {', '.join(known)}"
        )
    fields = {f.name: f for f in attrs.fields(cls)}
    kwargs = dict(fixed)
    for key in known:
        if key in extra and extra[key] is not None:
            parse = fields[key].metadata["parse"]
            kwargs[key] = parse(extra[key], f"{backend}: {key}") if parse else extra[key]
    return cls(**kwargs)


def describe_options(cls: type) -> list[tuple[str, Any, str]]:
    """(key, default, help) per option, for docs and ``--help`` texts."""
    return [(f.name, f.default, f.metadata.get("help", "")) for f in attrs.fields(cls) if "parse" in f.metadata]


_STRINGS = ("true", "false", "1", "0", "12", "0.5", " 7 ")
_PROBES = {  # parser -> JSON strings it must refuse
    "boolean": _STRINGS,
    "whole.<locals>.parse": _STRINGS,
    "number.<locals>.parse": _STRINGS,
    "size": ("true", "false", "0.5", "1e3", "lots"),  # digits and units are SGLang's sizes: they stay
}


def string_holes(cls: type) -> list[str]:
    """The boolean and number keys of a schema that take a JSON string for their value (each should refuse it):
    what a backend's tests assert is empty, for their own schema classes as much as for the core's parsers."""
    holes = []
    for f in attrs.fields(cls):
        parse = f.metadata.get("parse")
        probes = _PROBES.get(getattr(parse, "__qualname__", ""), ()) if parse is not None else ()
        for probe in probes:
            try:
                parse(probe, f.name)
            except ConfigError:
                continue
            holes.append(f"{f.name}={probe!r}")
            break
    return holes
