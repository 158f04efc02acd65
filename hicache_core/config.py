"""HiCache configuration: every ``--hicache-*`` flag of the seed document, with SGLang's names and defaults.

One frozen :class:`HiCacheConfig` is built from argparse (:func:`add_hicache_args` + :meth:`HiCacheConfig.from_args`),
from a mapping (:meth:`HiCacheConfig.from_mapping`) or in code. Invalid values raise :class:`ConfigError` naming the
flag, the bad value and the allowed ones. The documented auto-adjustments live in :func:`resolve_layout` and are logged.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Mapping
from typing import Any, Optional

import attrs

from hicache_core.errors import ConfigError
from hicache_core.extra_config import (  # noqa: F401 (their home was here: importers keep these names)
    DYNAMIC_KEYS,
    RESERVED_EXTRA_KEYS,
    coerce_reserved,
    parse_extra_config,
    read_json_object,
    require_dynamic_keys,
)
from hicache_core.parse import arg_float, arg_int

logger = logging.getLogger(__name__)

IO_BACKENDS = ("kernel", "direct")
WRITE_POLICIES = ("write_back", "write_through", "write_through_selective")
MEM_LAYOUTS = ("layer_first", "page_first", "page_first_direct")
PREFETCH_POLICIES = ("best_effort", "wait_complete", "timeout", "cost_aware")
# which pages go to L3: all (every host copy is backed up, SGLang's way) or seen_twice (a page only once its prefix
# has been asked for twice: a prompt seen once costs no storage writes)
STORAGE_ADMISSIONS = ("all", "seen_twice")
EVICTION_POLICIES = ("lru", "lfu", "fifo")
MAX_PAGE_SIZE = 1 << 16  # tokens per page; SGLang's pages are 1-256


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _choice(*choices: str):
    def check(inst, attribute, value):
        if value not in choices:
            raise ConfigError(f"{_flag(attribute.name)}: invalid value {value!r}; choose one of {', '.join(choices)}")

    return check


def _non_negative(inst, attribute, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{_flag(attribute.name)}: invalid value {value!r}; it must be a finite number >= 0")


def _at_most_one(inst, attribute, value):
    if value > 1:
        raise ConfigError(f"{_flag(attribute.name)}: invalid value {value!r}; it is a share: between 0 and 1")


def _positive_int(inst, attribute, value):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{_flag(attribute.name)}: invalid value {value!r}; it must be a whole number > 0")
    if attribute.name == "page_size" and value > MAX_PAGE_SIZE:
        raise ConfigError(f"--page-size: invalid value {value!r}; it must be <= {MAX_PAGE_SIZE} tokens")


def _fingerprint(_inst: Any, _attr: Any, value: Optional[str]) -> None:
    """A model fingerprint names weights: 1-256 printable characters, no whitespace (a revision, a digest)."""
    if value is None:
        return
    if (
        not isinstance(value, str)
        or not 0 < len(value) <= 256
        or any(c.isspace() or not c.isprintable() for c in value)
    ):
        raise ConfigError(
            f"--hicache-model-fingerprint {value!r}: give 1-256 printable characters without spaces "
            "(a revision or a digest of the weights)"
        )


@attrs.frozen(kw_only=True)
class HiCacheConfig:
    """Every HiCache flag. Defaults are SGLang's, except ``page_size`` (the seed recommends 64; SGLang's is 1)."""

    page_size: int = attrs.field(default=64, validator=_positive_int)
    enable_hierarchical_cache: bool = False
    hicache_ratio: float = attrs.field(default=2.0, validator=_non_negative)
    hicache_size: int = attrs.field(default=0, validator=_non_negative)
    hicache_io_backend: str = attrs.field(default="kernel", validator=_choice(*IO_BACKENDS))
    hicache_write_policy: str = attrs.field(default="write_through", validator=_choice(*WRITE_POLICIES))
    hicache_mem_layout: str = attrs.field(default="layer_first", validator=_choice(*MEM_LAYOUTS))
    hicache_storage_backend: Optional[str] = None
    hicache_storage_prefetch_policy: str = attrs.field(default="best_effort", validator=_choice(*PREFETCH_POLICIES))
    hicache_storage_admission: str = attrs.field(default="all", validator=_choice(*STORAGE_ADMISSIONS))
    hicache_storage_backend_extra_config: dict = attrs.field(factory=dict, converter=parse_extra_config)
    radix_eviction_policy: str = attrs.field(default="lru", validator=_choice(*EVICTION_POLICIES))
    enable_metrics: bool = False
    enable_cache_report: bool = False
    model_name: Optional[str] = None
    hicache_model_fingerprint: Optional[str] = attrs.field(default=None, validator=_fingerprint)
    hicache_salt_host_pages: int = attrs.field(default=0, validator=_non_negative)  # per namespace; 0: no cap
    hicache_salt_storage_pages: int = attrs.field(default=0, validator=_non_negative)  # likewise, in storage
    # soft retention (cache/retention.py): the share of the host tier retained prefixes may hold, and the longest
    # retention a request may ask for
    hicache_retention_ratio: float = attrs.field(default=0.5, validator=[_non_negative, _at_most_one])
    hicache_retention_max_seconds: float = attrs.field(default=600.0, validator=_non_negative)
    # the share of the host tier one tenant's (namespace's) retained prefixes may hold (None: the whole budget)
    hicache_retention_tenant_ratio: Optional[float] = attrs.field(
        default=None, validator=attrs.validators.optional([_non_negative, _at_most_one])
    )

    def __attrs_post_init__(self) -> None:
        if self.hicache_storage_backend == "":
            object.__setattr__(self, "hicache_storage_backend", None)
        extra = self.hicache_storage_backend_extra_config
        for key, kind in RESERVED_EXTRA_KEYS.items():
            if key in extra:
                coerce_reserved(key, extra[key], kind)
        if self.hicache_storage_backend == "dynamic":
            require_dynamic_keys(extra)
        self.storage_codec  # noqa: B018 (checks codec_level's range at construction)
        self.storage_head_group  # noqa: B018

    # --- storage knobs SGLang reads out of the extra-config JSON -------------------------------------------------
    def _reserved(self, key: str, default: Any) -> Any:
        extra = self.hicache_storage_backend_extra_config
        return coerce_reserved(key, extra[key], RESERVED_EXTRA_KEYS[key]) if key in extra else default

    @property
    def prefetch_threshold(self) -> int:
        """Minimum tokens beyond the local hit worth a storage prefetch (SGLang: 256)."""
        return self._reserved("prefetch_threshold", 256)

    @property
    def prefetch_timeout_base(self) -> float:
        return self._reserved("prefetch_timeout_base", 1.0)

    @property
    def prefetch_timeout_per_ki_token(self) -> float:
        return self._reserved("prefetch_timeout_per_ki_token", 0.25)

    @property
    def io_timeout_s(self) -> float:
        """Deadline of each storage backend call in seconds; a call past it is abandoned and the request
        recomputes (0: wait forever)."""
        return self._reserved("io_timeout_s", 10.0)

    @property
    def storage_codec(self) -> tuple[str, str, int]:
        """The L3 page codec (``codec``: none, zstd or fp8), when it is used (``codec_when``: pays or always) and
        zstd's level (``codec_level``, 1-19)."""
        level = self._reserved("codec_level", 1)
        if not 1 <= level <= 19:
            raise ConfigError(f"--hicache-storage-backend-extra-config: codec_level={level}: give 1 (fast) to 19")
        return self._reserved("codec", "none"), self._reserved("codec_when", "pays"), level

    @property
    def storage_head_group(self) -> int:
        """KV heads per stored object (``head_group``; 0, the default: each rank stores its own shard of a page)."""
        group = self._reserved("head_group", 0)
        if group < 0:
            raise ConfigError(
                f"--hicache-storage-backend-extra-config: head_group={group}: give a number of KV heads >= 1 "
                "(or leave it out)"
            )
        return group

    @property
    def pass_prefix_keys(self) -> bool:
        return self._reserved("hicache_storage_pass_prefix_keys", False)

    @property
    def backend_extra_config(self) -> dict[str, Any]:
        """The extra config as the backend sees it: the reserved prefetch keys removed (as SGLang pops them)."""
        return {k: v for k, v in self.hicache_storage_backend_extra_config.items() if k not in RESERVED_EXTRA_KEYS}

    @property
    def write_through_threshold(self) -> int:
        return 1 if self.hicache_write_policy == "write_through" else 2

    # --- construction ---------------------------------------------------------------------------------------------
    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> HiCacheConfig:
        """Build from a mapping of field names (dashes or underscores, with or without leading ``--``)."""
        names = {f.name for f in attrs.fields(cls)}
        kwargs = {}
        for key, value in values.items():
            name = key.lstrip("-").replace("-", "_")
            if name not in names:
                raise ConfigError(f"unknown HiCache option {key!r}; known options: {', '.join(sorted(names))}")
            kwargs[name] = value
        return cls(**kwargs)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> HiCacheConfig:
        names = {f.name for f in attrs.fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in names})

    def replace(self, **changes: Any) -> HiCacheConfig:
        return attrs.evolve(self, **changes)


def add_hicache_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add every HiCache flag (SGLang's names) to an argparse parser. Help shows each command's real defaults
    (``%(default)s`` follows ``parser.set_defaults``); values are validated again by HiCacheConfig."""
    d = HiCacheConfig()
    g = parser.add_argument_group("HiCache")
    g.add_argument(
        "--page-size",
        type=arg_int(1, MAX_PAGE_SIZE),
        default=d.page_size,
        help="tokens per KV page (default %(default)s)",
    )
    g.add_argument("--enable-hierarchical-cache", action="store_true", help="enable the host (L2) tier")
    g.add_argument(
        "--hicache-ratio",
        type=arg_float(0),
        default=d.hicache_ratio,
        help="host pool size as a multiple of the device pool (default %(default)s)",
    )
    g.add_argument(
        "--hicache-size",
        type=arg_int(0),
        default=d.hicache_size,
        help="host pool size in GB per rank; overrides --hicache-ratio when > 0 (default %(default)s)",
    )
    g.add_argument(
        "--hicache-io-backend",
        default=d.hicache_io_backend,
        choices=IO_BACKENDS,
        help="how pages move between device and host (default %(default)s; kernel needs CUDA)",
    )
    g.add_argument(
        "--hicache-write-policy",
        default=d.hicache_write_policy,
        choices=WRITE_POLICIES,
        help="when device pages are copied to host (default %(default)s)",
    )
    g.add_argument(
        "--hicache-mem-layout",
        default=d.hicache_mem_layout,
        choices=MEM_LAYOUTS,
        help="host pool layout (default %(default)s)",
    )
    g.add_argument(
        "--hicache-storage-backend",
        default=None,
        metavar="NAME",
        help="L3 storage backend: a registered name (see `hicache backends`) or 'dynamic' (default %(default)s)",
    )
    g.add_argument(
        "--hicache-storage-prefetch-policy",
        default=d.hicache_storage_prefetch_policy,
        choices=PREFETCH_POLICIES,
        help="when a storage prefetch may stop (default %(default)s)",
    )
    g.add_argument(
        "--hicache-storage-admission",
        default=d.hicache_storage_admission,
        choices=STORAGE_ADMISSIONS,
        help="which host pages are backed up to storage: all, or seen_twice (only once their prefix has been "
        "asked for twice; a prompt seen once writes nothing to L3) (default %(default)s)",
    )
    g.add_argument(
        "--hicache-storage-backend-extra-config",
        default=None,
        metavar="JSON",
        help="JSON object (or a path to a JSON file) for the storage backend, plus the core's knobs "
        "prefetch_threshold, prefetch_timeout_base, prefetch_timeout_per_ki_token and io_timeout_s "
        "(deadline of each backend call, default 10 s)",
    )
    g.add_argument(
        "--radix-eviction-policy",
        default=d.radix_eviction_policy,
        choices=EVICTION_POLICIES,
        help="device/host eviction order (default %(default)s)",
    )
    g.add_argument("--enable-metrics", action="store_true", help="export Prometheus metrics")
    g.add_argument("--enable-cache-report", action="store_true", help="report cached tokens per request")
    g.add_argument("--model-name", default=None, help="model name, part of the storage namespace")
    g.add_argument(
        "--hicache-salt-host-pages",
        type=arg_int(0),
        default=d.hicache_salt_host_pages,
        metavar="N",
        help="host pages one cache_salt / extra_key namespace may hold; past it, its own pages go first "
        "(default %(default)s: no cap)",
    )
    g.add_argument(
        "--hicache-salt-storage-pages",
        type=arg_int(0),
        default=d.hicache_salt_storage_pages,
        metavar="N",
        help="storage pages one cache_salt / extra_key namespace may hold, across every "
        "process on the store; past it, its own oldest go (a backend that can count "
        "them: file) (default %(default)s: no cap)",
    )
    g.add_argument(
        "--hicache-retention-ratio",
        type=arg_float(0),
        default=d.hicache_retention_ratio,
        metavar="R",
        help="share of the host tier (the device tier without one) that prefixes retained by requests' "
        "retention_seconds hints may hold; hints past it are clipped (default %(default)s; 0: no retention)",
    )
    g.add_argument(
        "--hicache-retention-max-seconds",
        type=arg_float(0),
        default=d.hicache_retention_max_seconds,
        metavar="S",
        help="the longest retention_seconds a request may ask for; more is clipped (default %(default)s)",
    )
    g.add_argument(
        "--hicache-retention-tenant-ratio",
        type=arg_float(0),
        default=d.hicache_retention_tenant_ratio,
        metavar="R",
        help="the share of the host tier one tenant's (cache_salt/extra_key's) retained prefixes may hold; hints "
        "past it are clipped (default: all of --hicache-retention-ratio)",
    )
    g.add_argument(
        "--hicache-model-fingerprint",
        default=None,
        metavar="ID",
        help="the weights' identity in the storage namespace (default: a digest of the checkpoint's "
        "config, tokenizer and weights; the random model's seed and shape); give a revision "
        "when the engine knows one",
    )
    return parser


def resolve_layout(
    config: HiCacheConfig, *, backend_page_first_only: bool = False, backend_name: str | None = None
) -> HiCacheConfig:
    """Apply the documented layout / io-backend adjustments in one place, logging each one.

    Seed rules: ``page_first`` with ``direct`` io switches to ``layer_first``; ``page_first_direct`` forces
    ``direct``. A backend that serves only page-first layouts (Mooncake zero copy) moves ``layer_first`` to
    ``page_first`` (``kernel``) or ``page_first_direct`` (``direct``).
    """
    layout, io = config.hicache_mem_layout, config.hicache_io_backend
    if layout == "page_first" and io == "direct":
        logger.warning(
            "--hicache-mem-layout page_first does not pair with --hicache-io-backend direct: using layer_first "
            "(as the seed documents); choose page_first_direct to keep page-first storage transfers"
        )
        layout = "layer_first"
    if layout == "page_first_direct" and io != "direct":
        logger.warning(
            "--hicache-mem-layout page_first_direct is built for direct io: --hicache-io-backend set to direct"
        )
        io = "direct"
    if backend_page_first_only and layout == "layer_first":
        new = "page_first_direct" if io == "direct" else "page_first"
        logger.warning(
            "storage backend %r serves only page-first layouts zero-copy: --hicache-mem-layout %s -> %s",
            backend_name,
            layout,
            new,
        )
        layout = new
    if (layout, io) == (config.hicache_mem_layout, config.hicache_io_backend):
        return config
    return config.replace(hicache_mem_layout=layout, hicache_io_backend=io)
