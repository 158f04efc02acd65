"""The fleet's HTTP surface: proactive restore and session retention (KV events go out over ZMQ, not HTTP).

* ``POST /hicache/prefetch`` -- restore a prompt's pages from storage to host before its request comes: a body of
  ``input_ids`` or ``text`` (and ``messages`` for a chat prompt), optional ``operation_id`` (default: a new one),
  ``ttl_seconds`` (default 60, at most 3600: more is clipped and the answer says so), ``cache_salt`` and
  ``extra_key``. The answer is the operation: its ``state`` (``running``, ``success``, ``cached``, ``miss``,
  ``failure``, ``declined``, ``cancelled``, ``expired``) and why. A request that comes while it runs joins it.
* ``GET /hicache/prefetch/{operation_id}`` -- its state now; ``DELETE`` cancels it.
* ``GET /hicache/sessions`` -- the prefixes retained by requests' ``retention_seconds`` hints;
  ``DELETE /hicache/sessions/{session_id}`` -- the session closed: its prefix is released.

Everything runs on the scheduler thread between steps (on every tensor-parallel rank).
"""

from __future__ import annotations

import asyncio
import math
import uuid
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HTTPRequest

from hicache_core.serve.protocol import BadRequest, Params, chat_messages, check_ids, with_namespace
from hicache_core.serve.state import ServerState


def restore_body(state: ServerState, body: dict) -> tuple[str, list[int], Any, Any, Any]:
    allowed = {"operation_id", "input_ids", "text", "messages", "ttl_seconds", "cache_salt", "extra_key"}
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise BadRequest(f"unknown field(s) {', '.join(unknown)}; /hicache/prefetch takes {', '.join(sorted(allowed))}")
    given = [k for k in ("input_ids", "text", "messages") if body.get(k) is not None]
    if len(given) != 1:
        raise BadRequest("give exactly one of input_ids, text and messages: the prompt whose pages to restore")
    if given == ["input_ids"]:
        if not isinstance(body["input_ids"], list):
            raise BadRequest("input_ids must be a list of token ids")
        ids = check_ids(body["input_ids"], state.model.config.vocab_size)
    elif given == ["text"]:
        if not isinstance(body["text"], str) or not body["text"]:
            raise BadRequest("text must be a non-empty string")
        ids = state.tokenizer.encode(body["text"])
    else:
        try:
            ids = state.tokenizer.apply_chat_template(chat_messages(body))
        except ValueError as e:
            raise BadRequest(str(e)) from None
    op_id = body.get("operation_id") or uuid.uuid4().hex
    if not isinstance(op_id, str) or len(op_id) > 256:
        raise BadRequest(f"operation_id must be a string of at most 256 characters, not {op_id!r}")
    ttl = body.get("ttl_seconds")
    if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 0 < ttl < math.inf):
        raise BadRequest(f"ttl_seconds must be a number > 0, not {ttl!r}")
    ns = with_namespace(Params(), body)
    return op_id, ids, ttl, ns.cache_salt, ns.extra_key


def add_fleet_routes(app: FastAPI, state: ServerState, body_of: Any, error: Any) -> None:
    async def on_scheduler(name: str, *args: Any) -> Any:
        return await asyncio.wrap_future(state.scheduler.call(name, *args))

    @app.post("/hicache/prefetch")
    async def restore(req: HTTPRequest) -> Any:
        args = restore_body(state, await body_of(req))
        return await on_scheduler("restore", *args)

    @app.get("/hicache/prefetch/{op_id}")
    async def restore_status(op_id: str) -> Any:
        out = await on_scheduler("restore_status", op_id)
        return out if out is not None else error(404, f"no restore operation {op_id!r} (unknown, or ended long ago)")

    @app.delete("/hicache/prefetch/{op_id}")
    async def restore_cancel(op_id: str) -> Any:
        out = await on_scheduler("cancel_restore", op_id)
        return out if out is not None else error(404, f"no restore operation {op_id!r} (unknown, or ended long ago)")

    @app.get("/hicache/sessions")
    async def sessions() -> Any:
        return {"retained": await on_scheduler("sessions")}

    @app.delete("/hicache/sessions/{session_id}")
    async def close_session(session_id: str) -> Any:
        answer = await on_scheduler("close_session", session_id)
        return answer if answer["status"] == "released" else error(404, answer["reason"])
