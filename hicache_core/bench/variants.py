"""The storage variants a benchmark run compares in one run: hicache+storage under each storage admission
(``--storage-admissions``), L3 codec (``--storage-codecs``) or prefetch policy, each on a store of its own; what
each wrote to L3 against what it served; and which variants are lossy (their tokens counted, not required)."""

from __future__ import annotations

import argparse
import os
from typing import Optional

from hicache_core.config import HiCacheConfig
from hicache_core.errors import ConfigError


def storage_variants(args: argparse.Namespace, configs: list[str]) -> list[str]:
    """The configurations ``--storage-admissions`` and ``--storage-codecs`` add: hicache+storage once per admission
    beyond the one --hicache-storage-admission sets, and once per L3 codec beyond the extra config's (``configs``
    then runs it as it is)."""
    from hicache_core.config import STORAGE_ADMISSIONS
    from hicache_core.extra_config import CODECS

    added = []
    own = {
        "storage_admissions": args.hicache_storage_admission,
        "storage_codecs": HiCacheConfig.from_args(args).storage_codec[0],
    }
    for flag, known in (("storage_admissions", STORAGE_ADMISSIONS), ("storage_codecs", CODECS)):
        if not getattr(args, flag, None):
            continue
        dashed = "--" + flag.replace("_", "-")
        names = [x.strip() for x in getattr(args, flag).split(",") if x.strip()]
        wrong = [x for x in names if x not in known]
        if wrong or not names:
            raise ConfigError(f"{dashed}: {', '.join(wrong) or 'none given'}; choose from {', '.join(known)}")
        if args.prefetch_policies:
            raise ConfigError(f"{dashed} and --prefetch-policies: give one or the other")
        added += [f"hicache+storage@{x}" for x in names if x != own[flag]]
    return added


def variant_config(base: HiCacheConfig, variant: str) -> HiCacheConfig:
    """``base`` under another prefetch policy, storage admission or L3 codec, on a store of its own (a variant must
    not hit another's pages)."""
    from hicache_core.config import STORAGE_ADMISSIONS
    from hicache_core.extra_config import CODECS

    policy = variant
    extra = dict(base.hicache_storage_backend_extra_config)
    if base.hicache_storage_backend == "memory":
        extra["store"] = f"{extra.get('store', 'bench')}-{policy}-{os.getpid()}"
    elif "storage_dir" in extra:
        extra["storage_dir"] = os.path.join(str(extra["storage_dir"]), policy)
    if variant in CODECS:
        return base.replace(hicache_storage_backend_extra_config={**extra, "codec": variant})
    if variant in STORAGE_ADMISSIONS:
        return base.replace(hicache_storage_admission=variant, hicache_storage_backend_extra_config=extra)
    return base.replace(hicache_storage_prefetch_policy=policy, hicache_storage_backend_extra_config=extra)


def lossy(config: str, args: argparse.Namespace) -> bool:
    """A storage configuration whose L3 codec is fp8 serves KV within e4m3's step, not bit-exact: its tokens are
    counted against the reference, not required to equal it."""
    from hicache_core.extra_config import parse_extra_config

    if config.endswith("@fp8"):
        return True
    extra = parse_extra_config(getattr(args, "hicache_storage_backend_extra_config", None))
    return "storage" in config and "@" not in config and extra.get("codec") == "fp8"


def lossy_warning(summary: dict, args: argparse.Namespace) -> Optional[str]:
    """The line that says how often each lossy configuration's requests got the reference's tokens."""
    agree = summary["requests_with_reference_tokens"]
    shown = [f"{c} {a}/{n}" for c, (a, n) in agree.items() if lossy(c, args) and a < n]
    return "fp8 L3 codec (lossy): requests with the reference's tokens: " + ", ".join(shown) if shown else None


def print_l3_bytes(results: list[dict]) -> None:
    """What each storage configuration wrote to L3 against what storage served (``l3_bytes_per_storage_hit``)."""
    rows = [r for r in results if (r.get("transfer_bytes") or {}).get("storage_set")]
    if not rows:
        return
    print("\nbytes written to L3 against tokens served from it:")
    for r in rows:
        per = r.get("l3_bytes_per_storage_hit")
        held = r.get("storage_held_back_tokens") or 0
        written = (r.get("storage_stored_bytes") or {}).get("set", r["transfer_bytes"]["storage_set"])
        codec = r.get("codec_seconds") or {}
        print(
            f"  {r['label']:<20} {written / 2**20:.1f} MiB written, "
            f"{r['hit_tokens']['storage']} storage-hit tokens, "
            + (f"{per / 1024:.1f} KiB per storage-hit token" if per else "no storage hits")
            + (f", {held} tokens held back (seen once)" if held else "")
            + (
                f", codec {codec['set'] * 1e3:.0f} ms encoding, {codec['get'] * 1e3:.0f} ms decoding"
                if any(codec.values())
                else ""
            )
        )
