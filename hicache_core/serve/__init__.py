"""``hicache serve``: the reference engine behind SGLang's and OpenAI's HTTP APIs (FastAPI + uvicorn).

    hicache serve --enable-hierarchical-cache --hicache-storage-backend file --enable-metrics --enable-cache-report
    hicache serve --model-path ./my-llama --port 30000 ...

Needs the ``serve`` extra: ``pip install 'hicache-core[serve]'``.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
from typing import Optional

from hicache_core.errors import ConfigError
from hicache_core.parse import add_kv_cache_dtype, arg_int
from hicache_core.serve.auth import Keys

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from hicache_core.config import add_hicache_args

    add_hicache_args(p)
    s = p.add_argument_group("server")
    s.add_argument(
        "--model-path",
        default=None,
        help="a local Hugging Face llama checkpoint directory (config.json, safetensors, tokenizer.json); "
        "default: the seeded random tiny model with a byte tokenizer",
    )
    s.add_argument("--served-model-name", default=None, help="the model name clients send (default: from the model)")
    s.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="KV dtype of a checkpoint (default: its torch_dtype)",
    )
    add_kv_cache_dtype(s)
    s.add_argument(
        "--compute-dtype",
        default="float64",
        choices=("float64", "float32"),
        help="the reference model's weights and activations (default float64: tokens do not depend on what was "
        "cached; float32 is about 3.7x as fast, its tokens may differ in near ties)",
    )
    s.add_argument("--seed", type=arg_int(0), default=0, help="the random model's seed (default %(default)s)")
    from hicache_core.engine.model_config import SHAPE_FLAGS

    for flag, _, what in SHAPE_FLAGS:
        s.add_argument(flag, type=arg_int(1, 1 << 16), help=f"the random model's {what} (default: ModelConfig's)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    s.add_argument("--port", type=arg_int(0, 65535), default=30000, help="port (default %(default)s; 0: any free one)")
    s.add_argument(
        "--max-total-tokens",
        type=arg_int(1, 1 << 26),
        default=16384,
        help="device KV pool in tokens (default %(default)s)",
    )
    s.add_argument(
        "--max-running-requests",
        type=arg_int(1, 1 << 16),
        default=16,
        help="requests in one batch (default %(default)s)",
    )
    s.add_argument("--disable-radix-cache", action="store_true", help="no prefix cache at all")
    s.add_argument(
        "--tp",
        "--tp-size",
        dest="tp_size",
        type=arg_int(1, 1024),
        default=1,
        help="tensor-parallel ranks (this server runs one; default %(default)s)",
    )
    d = p.add_argument_group("prefill/decode disaggregation (KV handed over through the shared storage tier)")
    d.add_argument(
        "--disaggregation-mode",
        default="null",
        choices=("null", "prefill", "decode"),
        help="prefill: answer with the first token once the prompt's pages are in storage; decode: load "
        "the prompt from storage and generate (default %(default)s: both in one server)",
    )
    d.add_argument(
        "--disaggregation-decode-enable-offload-kvcache",
        action="store_true",
        help="decode: write each finished request's prompt and generated KV to storage (asynchronously), "
        "so the next turn's prefill hits it",
    )
    d.add_argument(
        "--disaggregation-transfer-backend",
        default=None,
        help="SGLang's flag, accepted so its command lines run: KV always goes through the storage tier",
    )
    d.add_argument("--disaggregation-ib-device", default=None, help="SGLang's flag, accepted and not used")
    s.add_argument(
        "--kv-events-config",
        default=None,
        metavar="JSON",
        help="publish KV events (pages stored in and removed from each tier) over ZMQ as vLLM does; vLLM's JSON, "
        'e.g. \'{"enable_kv_cache_events": true, "endpoint": "tcp://*:5557", "replay_endpoint": "tcp://*:5558"}\' '
        "(needs the events extra)",
    )
    a = p.add_argument_group("access (serve/auth.py)")
    a.add_argument(
        "--api-key",
        default=None,
        help="every route but /health needs Authorization: Bearer <key> (default: $HICACHE_API_KEY; none: open)",
    )
    a.add_argument(
        "--admin-api-key",
        default=None,
        help="the operator routes (attach/detach/read the storage backend, /flush_cache, other tenants' sessions) "
        "need this key rather than --api-key (default: $HICACHE_ADMIN_API_KEY)",
    )
    a.add_argument("--admin-metrics", action="store_true", help="/metrics needs the operator's key too")
    from hicache_core.serve.tenants import add_tenant_arguments

    add_tenant_arguments(a)
    s.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="(default %(default)s)")
    s.add_argument("--port-file", default=None, help="write the bound port here once serving (tests, scripts)")


def run(args: argparse.Namespace) -> int:
    from hicache_core.engine.model_config import shape_from_args

    shape = shape_from_args(args)
    if args.model_path and shape:
        flags = ", ".join("--" + f.replace("_", "-") for f in shape)
        raise ConfigError(f"{flags} shape the random model; --model-path {args.model_path} brings its own shape")
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ConfigError(
            f"hicache serve needs the serve extra ({e.name} is missing): pip install 'hicache-core[serve]'"
        ) from None
    from hicache_core.config import HiCacheConfig
    from hicache_core.serve.state import ServerState

    logging.getLogger().setLevel(args.log_level.upper())
    logging.getLogger("hicache_core").setLevel(args.log_level.upper())
    config = HiCacheConfig.from_args(args)
    keys = Keys.from_args(args)  # a bad key fails here, before the model loads
    if not keys.enabled and args.host not in ("127.0.0.1", "localhost", "::1"):
        logging.getLogger(__name__).warning(
            "hicache serve listens on %s without --api-key: anyone who reaches the port can generate, flush the cache "
            "and detach its storage (set --api-key and --admin-api-key, or $HICACHE_API_KEY)",
            args.host,
        )
    if args.kv_events_config:  # a bad one fails here, before the model loads
        from hicache_core.events.publisher import KVEventsConfig

        KVEventsConfig.from_json(args.kv_events_config)
    check_roles(args, config)  # flag combinations first: a clear error before anything starts
    if args.tp_size > 1:
        from hicache_core.engine.checkpoint import config_from_args
        from hicache_core.engine.tp import check_divisible
        from hicache_core.serve.tp import serve_tp

        check_divisible(config_from_args(args), args.tp_size)
        _bind(args).close()  # the port is free (rank 0 binds it again)
        return serve_tp(args, config)
    sock = _bind(args)
    return serve_state(args, ServerState(args, config), sock)


def check_roles(args: argparse.Namespace, config) -> None:
    from hicache_core.engine.request import role_config
    from hicache_core.serve.state import engine_mode

    role_config(config, engine_mode(args), args.disaggregation_mode, args.disaggregation_decode_enable_offload_kvcache)
    unused = [
        f"--{k.replace('_', '-')} {getattr(args, k)}"
        for k in ("disaggregation_transfer_backend", "disaggregation_ib_device")
        if getattr(args, k)
    ]
    if unused and args.disaggregation_mode != "null":
        logging.getLogger(__name__).warning(
            "%s: hicache serve hands KV from prefill to decode through the storage tier (%s), not a transfer "
            "backend; the flag is accepted for SGLang command lines and not used",
            ", ".join(unused),
            args.hicache_storage_backend,
        )


def _bind(args: argparse.Namespace) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as e:
        raise ConfigError(f"cannot listen on {args.host}:{args.port}: {e.strerror} (pick another --port)") from None
    return sock


def serve_state(args: argparse.Namespace, state, sock: Optional[socket.socket] = None) -> int:
    """Serve ``state`` over HTTP until stopped (rank 0 of a tensor-parallel server runs this too)."""
    import uvicorn

    from hicache_core.serve.app import build_app

    sock = sock or _bind(args)
    port = sock.getsockname()[1]
    app = build_app(
        state,
        on_ready=(lambda: _write_port(args.port_file, port)) if args.port_file else None,
        keys=Keys.from_args(args),
    )
    state.scheduler.start()
    server = uvicorn.Server(
        uvicorn.Config(app, log_level=args.log_level, access_log=args.log_level == "debug", timeout_graceful_shutdown=5)
    )
    print(f"hicache serve: {state.model_name} ({state.mode}) on http://{args.host}:{port}", flush=True)
    # uvicorn re-raises the signal that stopped it once it has shut down; with the default handlers that killed
    # the process before the cache was closed (backups flushed, other ranks told to stop). Ours only note it.
    stopped_by: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: stopped_by.append(signum))
    try:
        server.run(sockets=[sock])
    finally:
        state.close()
    return 0


def _write_port(path: str, port: int) -> None:
    with open(path, "w") as f:
        f.write(str(port))
