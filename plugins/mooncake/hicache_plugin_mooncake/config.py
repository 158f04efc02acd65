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

CONFIG_PATH_ENV = "SGLANG_HICACHE_MOONCAKE_CONFIG_PATH"
DEFAULT_GLOBAL_SEGMENT = 4 << 30
DEFAULT_LOCAL_BUFFER = 16 << 20
PROTOCOLS = ("tcp", "rdma")
def _host_port(value: str, what: str) -> str:
    host, sep, port = str(value).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"mooncake: {what}={value!r} is not host:port (for example 127.0.0.1:50051)")
    return str(value)


@attrs.frozen(kw_only=True)
class MooncakeStoreConfig:
    master_server_address: str
    local_hostname: str = "localhost"
    metadata_server: str = "P2PHANDSHAKE"
    global_segment_size: int = DEFAULT_GLOBAL_SEGMENT
    local_buffer_size: int = DEFAULT_LOCAL_BUFFER
    protocol: str = "tcp"
    device_name: str = ""
    master_metrics_port: int = 9003
    check_server: bool = False
    extra_backend_tag: Optional[str] = None
    source: str = "extra config"

    def __attrs_post_init__(self) -> None:
        _host_port(self.master_server_address, "master_server_address")
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"mooncake: protocol={self.protocol!r}; choose one of {', '.join(PROTOCOLS)} (from {self.source})")
        if not self.metadata_server:
            raise ConfigError(f"mooncake: metadata_server is empty (from {self.source}); use P2PHANDSHAKE or http://host:port/metadata")

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any], source: str) -> MooncakeStoreConfig:
        known = {f.name for f in attrs.fields(cls)} - {"source"}
        unknown = sorted(set(d) - known - {"interface_v1", "backend_name", "module_path", "class_name"})
        if unknown:
            raise ConfigError(f"mooncake: unknown key(s) {', '.join(unknown)} in {source}; known: {', '.join(sorted(known))}")
        if not d.get("master_server_address"):
            raise ConfigError(f"mooncake: {source} lacks master_server_address (host:port of mooncake_master)")
        kw = {k: v for k, v in d.items() if k in known}
        for k in ("global_segment_size", "local_buffer_size"):
            if k in kw:
                kw[k] = parse_size(kw[k], f"mooncake: {k}")
        if "master_metrics_port" in kw:
            kw["master_metrics_port"] = int(kw["master_metrics_port"])
        if "check_server" in kw:
            kw["check_server"] = parse_bool(kw["check_server"], "mooncake: check_server")
        return cls(source=source, **kw)

    @classmethod
    def from_env(cls) -> MooncakeStoreConfig:
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
            raise ConfigError(f"mooncake: MOONCAKE_MASTER_METRICS_PORT={os.environ['MOONCAKE_MASTER_METRICS_PORT']!r} is not a port") from e
        return cls(
            master_server_address=master,
            local_hostname=os.environ.get("LOCAL_HOSTNAME", "localhost"),
            metadata_server=os.environ.get("MOONCAKE_TE_META_DATA_SERVER", "P2PHANDSHAKE"),
            global_segment_size=parse_size(os.environ.get("MOONCAKE_GLOBAL_SEGMENT_SIZE", DEFAULT_GLOBAL_SEGMENT),
                                           "mooncake: MOONCAKE_GLOBAL_SEGMENT_SIZE"),
            local_buffer_size=DEFAULT_LOCAL_BUFFER,
            protocol=os.environ.get("MOONCAKE_PROTOCOL", "tcp"),
            device_name=os.environ.get("MOONCAKE_DEVICE", ""),
            master_metrics_port=port,
            check_server=parse_bool(os.environ.get("MOONCAKE_CHECK_SERVER", "false"), "mooncake: MOONCAKE_CHECK_SERVER"),
            source="environment (MOONCAKE_*)",
        )

    @classmethod
    def load(cls, extra: Mapping[str, Any]) -> MooncakeStoreConfig:
        if extra.get("master_server_address"):
            return cls.from_mapping(extra, "--hicache-storage-backend-extra-config")
        path = os.environ.get(CONFIG_PATH_ENV)
        if path:
            data = read_json_object(path, f"mooncake: ${CONFIG_PATH_ENV}")
            tag = extra.get("extra_backend_tag")
            merged = {**data, **({"extra_backend_tag": tag} if tag else {})}
            return cls.from_mapping(merged, f"${CONFIG_PATH_ENV} file {path!r}")
        return cls.from_env()
