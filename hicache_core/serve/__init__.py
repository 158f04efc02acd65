"""``hicache serve``: the reference engine behind SGLang's and OpenAI's HTTP APIs (FastAPI + uvicorn).

    hicache serve --enable-hierarchical-cache --hicache-storage-backend file --enable-metrics --enable-cache-report
    hicache serve --model-path ./my-llama --port 30000 ...

Needs the ``serve`` extra: ``pip install 'hicache-core[serve]'``.
"""

from __future__ import annotations

import argparse
import logging
import socket

from hicache_core.errors import ConfigError
from hicache_core.parse import arg_int

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from hicache_core.config import add_hicache_args

    add_hicache_args(p)
    s = p.add_argument_group("server")
    s.add_argument("--model-path", default=None,
                   help="a local Hugging Face llama checkpoint directory (config.json, safetensors, tokenizer.json); "
                        "default: the seeded random tiny model with a byte tokenizer")
    s.add_argument("--served-model-name", default=None, help="the model name clients send (default: from the model)")
    s.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="KV dtype of a checkpoint (default: its torch_dtype)")
    s.add_argument("--seed", type=arg_int(0), default=0, help="the random model's seed (default %(default)s)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    s.add_argument("--port", type=arg_int(0, 65535), default=30000, help="port (default %(default)s; 0: any free one)")
    s.add_argument("--max-total-tokens", type=arg_int(1, 1 << 26), default=16384,
                   help="device KV pool in tokens (default %(default)s)")
    s.add_argument("--max-running-requests", type=arg_int(1, 1 << 16), default=16,
                   help="requests in one batch (default %(default)s)")
    s.add_argument("--disable-radix-cache", action="store_true", help="no prefix cache at all")
    s.add_argument("--tp", "--tp-size", dest="tp_size", type=arg_int(1, 1024), default=1,
                   help="tensor-parallel ranks (this server runs one; default %(default)s)")
    s.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="(default %(default)s)")
    s.add_argument("--port-file", default=None, help="write the bound port here once serving (tests, scripts)")


def run(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise ConfigError(f"hicache serve needs the serve extra ({e.name} is missing): "
                          "pip install 'hicache-core[serve]'") from None
    from hicache_core.config import HiCacheConfig
    from hicache_core.serve.app import build_app
    from hicache_core.serve.state import ServerState

    if args.tp_size != 1:
        raise ConfigError(f"--tp-size {args.tp_size}: hicache serve runs one rank; tensor parallelism across "
                          "processes is not supported yet (use --tp-size 1)")
    args.tp_rank = 0
    logging.getLogger().setLevel(args.log_level.upper())
    logging.getLogger("hicache_core").setLevel(args.log_level.upper())
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as e:
        raise ConfigError(f"cannot listen on {args.host}:{args.port}: {e.strerror} (pick another --port)") from None
    config = HiCacheConfig.from_args(args)
    state = ServerState(args, config)
    port = sock.getsockname()[1]
    app = build_app(state, on_ready=(lambda: _write_port(args.port_file, port)) if args.port_file else None)
    state.scheduler.start()
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, access_log=args.log_level == "debug",
                                           timeout_graceful_shutdown=5))
    print(f"hicache serve: {state.model_name} ({state.mode}) on http://{args.host}:{port}", flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        state.close()
    return 0


def _write_port(path: str, port: int) -> None:
    with open(path, "w") as f:
        f.write(str(port))
