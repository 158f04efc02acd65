"""Probing Mooncake's endpoints before the client's setup, which cannot be interrupted once it waits."""

from __future__ import annotations

import socket
import urllib.parse
from typing import Optional

from hicache_core.errors import BackendLoadError
from hicache_plugin_mooncake.config import MooncakeStoreConfig


def check_reachable(c: MooncakeStoreConfig, connect_timeout_s: float) -> None:
    """Fail fast, before the client's setup -- which holds the GIL while it waits, freezing the whole process
    for minutes -- when the master or an HTTP metadata server does not accept connections, or accepts them
    and does not answer (a hung or stopped process: the kernel still accepts its connections). Answers are
    asked of HTTP endpoints: the metadata server, and the master's metrics port (``/health``) when it listens."""
    wait = min(5.0, connect_timeout_s)
    host, _, port = c.master_server_address.rpartition(":")
    probes: list[tuple[str, tuple[str, int], Optional[str]]] = [("mooncake_master", (host, int(port)), None)]
    meta = urllib.parse.urlparse(c.metadata_server)
    if meta.scheme in ("http", "https") and meta.hostname:
        meta_port = meta.port or (443 if meta.scheme == "https" else 80)
        probes.append(("metadata server", (meta.hostname, meta_port), c.metadata_server + "?key=hicache-probe"))
    probes.append(("mooncake_master's metrics port", (host, c.master_metrics_port), "/health"))
    for what, (h, p), http_path in probes:
        try:
            sock = socket.create_connection((h, p), timeout=wait)
        except OSError as e:
            if http_path == "/health":
                continue  # metrics elsewhere or off: nothing more to ask
            raise BackendLoadError(
                f"mooncake backend: cannot reach the {what} at {h}:{p} ({e.strerror or e}); start it, or fix "
                f"the address (config from {c.source})"
            ) from e
        with sock:
            if http_path is None:
                continue
            path = urllib.parse.urlparse(http_path)
            target = (path.path or "/") + (f"?{path.query}" if path.query else "")
            err: Optional[OSError] = None
            try:
                sock.settimeout(wait)
                sock.sendall(f"GET {target} HTTP/1.0\r\nHost: {h}:{p}\r\n\r\n".encode())
                answer = sock.recv(16)
            except OSError as e:
                answer, err = b"", e
            if not answer.startswith(b"HTTP/"):
                raise BackendLoadError(
                    f"mooncake backend: the {what} at {h}:{p} accepts connections but does not answer "
                    f"within {wait:g} s ({err or 'no HTTP reply'}): is it hung or stopped? Restart it "
                    f"(config from {c.source})"
                )
