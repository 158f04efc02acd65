"""``hicache-hf3fs-metadata``: the HTTP metadata service several hicache instances share (FastAPI + uvicorn).

Endpoints (POST and JSON but for the stats; SGLang's mini 3FS metadata server's shape):
``/{rank}/initialize {num_pages}``, ``/{rank}/exists {keys}``,
``/{rank}/reserve_and_allocate_page_indices {keys: [[key, prefix], ...]}``,
``/{rank}/confirm_write {written_keys_to_confirm, pages_to_release}``, ``/{rank}/get_page_indices {keys}``,
``GET /ranks`` (the ranks initialized), ``GET /{rank}/stats`` (where every slot is: keys, reserved, free; ``lost``
and ``doubled`` are 0 unless a bug), ``/{rank}/delete_keys {keys}``, ``/{rank}/clear``. Unknown rank: 404; a bad
body: 422 naming the field (at most 4096 keys a request, ``num_pages`` up to 2**40); a rank re-initialized with
another size: 409. With ``--auth-token``
(or ``$HICACHE_HF3FS_METADATA_TOKEN``) every request needs ``Authorization: Bearer <token>`` (else 401).

Reservations are leases (``--lease-s``, default 60): a slot reserved and not confirmed in time goes back, and its
late confirm is refused (``{"rejected": [keys]}``); a reserve retried with the same ``request_id`` gets the same
slots. With ``--persist-path`` the index is saved every ``--save-interval`` seconds and at shutdown, and loaded at
start (a damaged file is refused with what is wrong), so a restart keeps every confirmed page.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import logging
import os
import sys
from typing import Optional

from fastapi import Body, Depends, FastAPI, Header, HTTPException
from pydantic import BaseModel, Field

from hicache_plugin_hf3fs.metadata import LEASE_S, MAX_KEYS, MAX_PAGES, TOKEN_ENV, MetadataStore, RankMetadata

logger = logging.getLogger(__name__)


class InitBody(BaseModel):
    num_pages: int = Field(gt=0, le=MAX_PAGES)


class KeysBody(BaseModel):
    keys: list[str] = Field(max_length=MAX_KEYS)


class ReserveBody(BaseModel):
    keys: list[tuple[str, str]] = Field(max_length=MAX_KEYS)
    request_id: Optional[str] = Field(default=None, max_length=128)


class ConfirmBody(BaseModel):
    written_keys_to_confirm: list[tuple[str, int]] = Field(default=[], max_length=MAX_KEYS)
    pages_to_release: list[int] = Field(default=[], max_length=MAX_KEYS)


def create_app(store: MetadataStore, save_interval: float = 60.0, auth_token: Optional[str] = None) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        task = None
        if store.persist_path and save_interval > 0:

            async def saver():
                while True:
                    await asyncio.sleep(save_interval)
                    store.save()

            task = asyncio.create_task(saver())
        yield
        if task:
            task.cancel()
        store.save()

    def authorized(authorization: Optional[str] = Header(default=None)) -> None:
        if not auth_token:
            return
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), auth_token.encode()):
            raise HTTPException(
                401,
                "missing or wrong bearer token: send 'Authorization: Bearer <token>' "
                f"(the client reads metadata_auth_token or ${TOKEN_ENV})",
            )

    app = FastAPI(title="hicache hf3fs metadata", lifespan=lifespan, dependencies=[Depends(authorized)])

    def rank_of(rank: str) -> RankMetadata:
        try:
            return store.rank(rank)
        except KeyError:
            raise HTTPException(404, f"rank {rank!r} is not initialized; POST /{rank}/initialize first") from None

    @app.post("/{rank}/initialize", status_code=204)
    def initialize(rank: str, body: InitBody):
        try:
            store.initialize(rank, body.num_pages)
        except ValueError as e:
            raise HTTPException(409, str(e)) from e

    @app.post("/{rank}/exists")
    def exists(rank: str, body: KeysBody):
        return {"exists": rank_of(rank).exists(body.keys)}

    @app.post("/{rank}/reserve_and_allocate_page_indices")
    def reserve(rank: str, body: ReserveBody):
        return {"indices": rank_of(rank).reserve_and_allocate_page_indices([k for k, _ in body.keys], body.request_id)}

    @app.post("/{rank}/confirm_write")
    def confirm(rank: str, body: ConfirmBody):
        m = rank_of(rank)
        bad = [i for _, i in body.written_keys_to_confirm if not 0 <= i < m.num_pages]
        bad += [i for i in body.pages_to_release if not 0 <= i < m.num_pages]
        if bad:
            raise HTTPException(422, f"page indices out of range [0, {m.num_pages}): {bad[:8]}")
        return {"rejected": m.confirm_write(list(body.written_keys_to_confirm), list(body.pages_to_release))}

    @app.post("/{rank}/get_page_indices")
    def get_indices(rank: str, body: KeysBody):
        return {"indices": rank_of(rank).get_page_indices(body.keys)}

    @app.post("/{rank}/delete_keys", status_code=204)
    def delete(rank: str, body: KeysBody):
        rank_of(rank).delete_keys(body.keys)

    @app.get("/ranks")
    def ranks():
        with store.lock:
            return {"ranks": sorted(store.ranks)}

    @app.get("/{rank}/stats")
    def stats(rank: str):
        return rank_of(rank).stats()

    @app.post("/{rank}/clear", status_code=204)
    def clear(rank: str, body: Optional[dict] = Body(default=None)):
        rank_of(rank).clear()

    return app


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="hicache-hf3fs-metadata", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback)")
    p.add_argument("--port", type=int, default=18000)
    p.add_argument("--persist-path", default=None, help="JSON file the index is saved to and loaded from")
    p.add_argument("--save-interval", type=float, default=60.0, help="seconds between saves (with --persist-path)")
    p.add_argument(
        "--lease-s",
        type=float,
        default=LEASE_S,
        help=f"seconds a reserved slot waits for its confirm before it goes back (default {LEASE_S:g})",
    )
    p.add_argument(
        "--auth-token",
        default=None,
        help=f"require 'Authorization: Bearer TOKEN' on every request (else ${TOKEN_ENV}; default: none)",
    )
    p.add_argument("--log-level", default="warning")
    args = p.parse_args(argv)
    if not 0 < args.lease_s < float("inf"):
        p.error(f"--lease-s {args.lease_s} must be a positive number of seconds")
    try:
        store = MetadataStore(args.persist_path, lease_s=args.lease_s)
    except OSError as e:
        print(f"hicache-hf3fs-metadata: error: cannot read {args.persist_path!r}: {e.strerror}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"hicache-hf3fs-metadata: error: {e}", file=sys.stderr)
        return 2
    import uvicorn

    token = args.auth_token or os.environ.get(TOKEN_ENV) or None
    uvicorn.run(create_app(store, args.save_interval, token), host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
