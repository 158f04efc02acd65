"""Mooncake client configuration: extra-config JSON, else a JSON file, else ``MOONCAKE_*`` environment variables.

Precedence (SGLang's): (1) the backend extra config when it names ``master_server_address``; (2) the JSON file at
``$SGLANG_HICACHE_MOONCAKE_CONFIG_PATH``; (3) the environment (``MOONCAKE_MASTER`` required).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Optional

import attrs

from hicache_core.config import read_json_object
from hicache_core.errors import ConfigError
from hicache_core.storage import parse_bool, parse_size
from hicache_core.storage.options import boolean, choice, number, option, parse_options, size, text, whole

CONFIG_PATH_ENV = "SGLANG_HICACHE_MOONCAKE_CONFIG_PATH"
DEFAULT_GLOBAL_SEGMENT = 4 << 30
DEFAULT_LOCAL_BUFFER = 16 << 20
PROTOCOLS = ("tcp", "rdma")


def str_or_empty(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{what}={value!r} must be a string")
    return value


def _host_port(value: str, what: str) -> str:
    host, sep, port = str(value).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"mooncake: {what}={value!r} is not host:port (for example 127.0.0.1:50051)")
    return str(value)


def _address(value: Any, what: str) -> str:
    return _host_port(text(value, what), what.split(": ", 1)[-1])


@attrs.frozen(kw_only=True)
class MooncakeStoreConfig:
    master_server_address: str = option(None, _address, "host:port of mooncake_master (required)")
    local_hostname: str = option("localhost", text, "this host's address for the transfer engine")
    metadata_server: str = option("P2PHANDSHAKE", text, "P2PHANDSHAKE or http://host:port/metadata")
    global_segment_size: int = option(DEFAULT_GLOBAL_SEGMENT, size, "bytes this client contributes to the store")
    local_buffer_size: int = option(DEFAULT_LOCAL_BUFFER, size, "client-side transfer buffer")
    protocol: str = option("tcp", choice(*PROTOCOLS), "transfer protocol")
    device_name: str = option("", str_or_empty, "RDMA device(s); empty for tcp")
    master_metrics_port: int = option(9003, whole(1, 65535), "the master's HTTP metrics port, probed before connecting")
    check_server: bool = option(False, boolean, "SGLang's flag: ask the master before use")
    extra_backend_tag: Optional[str] = option(None, text, "prefix of every key (separates deployments)")
    connect_timeout_s: float = option(30.0, number(0, above=True), "seconds to wait for the master when connecting")
    reconnect_after_s: float = option(10.0, number(0, above=True), "rebuild the client after calls fail this long")
    not_ready_wait_s: float = option(
        0.5, number(0), "how long a read waits for a page another writer is still putting (0: a miss at once)"
    )
    # Mooncake's ReplicateConfig.replica_num: each object on that many segments (clients' memory), so a page
    # outlives the client that held one copy (once the master has dropped that client: its client_ttl)
    replica_num: int = option(1, whole(1, 64), "copies of each page, each on another client's segment")
    source: str = "extra config"

    def __attrs_post_init__(self) -> None:
        if not self.master_server_address:
            raise ConfigError(f"mooncake: {self.source} lacks master_server_address (host:port of mooncake_master)")
        _host_port(self.master_server_address, "master_server_address")
        if self.protocol not in PROTOCOLS:
            raise ConfigError(
                f"mooncake: protocol={self.protocol!r}; choose one of {', '.join(PROTOCOLS)} (from {self.source})"
            )
        if not self.metadata_server:
            raise ConfigError(
                f"mooncake: metadata_server is empty (from {self.source}); use P2PHANDSHAKE or http://host:port/metadata"
            )

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any], source: str) -> MooncakeStoreConfig:
        if not d.get("master_server_address"):
            raise ConfigError(f"mooncake: {source} lacks master_server_address (host:port of mooncake_master)")
        return parse_options(cls, d, "mooncake", where=source, source=source)

    @classmethod
    def from_env(cls, **kw: Any) -> MooncakeStoreConfig:
        master = os.environ.get("MOONCAKE_MASTER")
        if not master:
            raise ConfigError(
                "mooncake: no configuration found. Give master_server_address in "
                "--hicache-storage-backend-extra-config, a JSON file at $SGLANG_HICACHE_MOONCAKE_CONFIG_PATH, "
                "or set MOONCAKE_MASTER=host:port (and MOONCAKE_TE_META_DATA_SERVER, MOONCAKE_PROTOCOL, ...)"
            )
        try:
            port = int(os.environ.get("MOONCAKE_MASTER_METRICS_PORT", "9003"))
        except ValueError as e:
            raise ConfigError(
                f"mooncake: MOONCAKE_MASTER_METRICS_PORT={os.environ['MOONCAKE_MASTER_METRICS_PORT']!r} is not a port"
            ) from e
        base = dict(
            master_server_address=master,
            local_hostname=os.environ.get("LOCAL_HOSTNAME", "localhost"),
            metadata_server=os.environ.get("MOONCAKE_TE_META_DATA_SERVER", "P2PHANDSHAKE"),
            global_segment_size=parse_size(
                os.environ.get("MOONCAKE_GLOBAL_SEGMENT_SIZE", DEFAULT_GLOBAL_SEGMENT),
                "mooncake: MOONCAKE_GLOBAL_SEGMENT_SIZE",
            ),
            local_buffer_size=DEFAULT_LOCAL_BUFFER,
            protocol=os.environ.get("MOONCAKE_PROTOCOL", "tcp"),
            device_name=os.environ.get("MOONCAKE_DEVICE", ""),
            master_metrics_port=port,
            check_server=parse_bool(
                os.environ.get("MOONCAKE_CHECK_SERVER", "false"), "mooncake: MOONCAKE_CHECK_SERVER"
            ),
            replica_num=_whole_env("MOONCAKE_REPLICA_NUM", 1),
            source="environment (MOONCAKE_*)",
        )
        return cls(**{**base, **kw})

    @classmethod
    def load(cls, extra: Mapping[str, Any]) -> MooncakeStoreConfig:
        """The extra config when it names the master; else the JSON file at $SGLANG_HICACHE_MOONCAKE_CONFIG_PATH,
        else MOONCAKE_* -- with the extra config's other keys (tag, timeouts) on top."""
        source = "--hicache-storage-backend-extra-config"
        if extra.get("master_server_address"):
            return cls.from_mapping(extra, source)
        given = parse_options(_Partial, extra, "mooncake", where=source)  # unknown keys fail whatever wins
        more = {k: v for k, v in attrs.asdict(given).items() if v is not None}
        path = os.environ.get(CONFIG_PATH_ENV)
        if path:
            data = read_json_object(path, f"mooncake: ${CONFIG_PATH_ENV}")
            return cls.from_mapping({**data, **more}, f"${CONFIG_PATH_ENV} file {path!r}")
        return cls.from_env(**more)


def _whole_env(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"mooncake: {name}={raw!r} is not a whole number") from None


def _partial_fields() -> dict[str, Any]:
    """The options, each defaulting to None: which keys an extra config gave."""
    out = {}
    for f in attrs.fields(MooncakeStoreConfig):
        if "parse" in f.metadata:
            out[f.name] = attrs.field(default=None, metadata=dict(f.metadata))
    return out


_Partial = attrs.make_class("_Partial", _partial_fields(), frozen=True, kw_only=True)
