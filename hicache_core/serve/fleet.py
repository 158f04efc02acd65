"""The fleet's HTTP surface: proactive restore and session retention (KV events go out over ZMQ, not HTTP).

* ``POST /hicache/prefetch`` -- restore a prompt's pages from storage to host before its request comes: a body of
  ``input_ids`` or ``text`` (and ``messages`` for a chat prompt), optional ``operation_id`` (default: a new one),
  ``ttl_seconds`` (default 60, at most 3600: more is clipped and the answer says so), ``cache_salt`` and
  ``extra_key``. The answer is the operation: its ``state`` (``running``, ``success``, ``cached``, ``miss``,
  ``failure``, ``declined``, ``cancelled``, ``expired``) and why. A request that comes while it runs joins it.
* ``GET /hicache/prefetch/{operation_id}`` -- its state now; ``DELETE`` cancels it.
* ``GET /hicache/sessions`` -- the prefixes retained by requests' ``retention_seconds`` hints;
  ``DELETE /hicache/sessions/{session_id}`` -- the session closed: its prefix is released.

Every one of these is the caller's tenant's (its ``cache_salt`` and ``extra_key``: in the body, or as query
parameters or ``X-Hicache-Cache-Salt`` / ``X-Hicache-Extra-Key`` headers where there is none). A tenant cannot see,
join, cancel or close another's restores and sessions; another's answers 404 with the words of one that does not
exist. An operator (``--admin-api-key``) lists every tenant's sessions with ``?all_tenants=true`` and closes one with
``?tenant=<its label>``.

Everything runs on the scheduler thread between steps (on every tensor-parallel rank).
"""

from __future__ import annotations

import asyncio
import math
import uuid
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HTTPRequest

from hicache_core.serve.auth import is_admin
from hicache_core.serve.protocol import BadRequest, Params, chat_messages, check_ids, with_namespace
from hicache_core.serve.schemas import CLOSE_QUERY, NAMESPACE_QUERY, RESTORE, SESSIONS_QUERY, body
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

    @app.post("/hicache/prefetch", openapi_extra=body(RESTORE))
    async def restore(req: HTTPRequest) -> Any:
        args = restore_body(state, await body_of(req))
        return await on_scheduler("restore", *args)

    @app.get("/hicache/prefetch/{op_id}", openapi_extra=NAMESPACE_QUERY)
    async def restore_status(op_id: str, req: HTTPRequest) -> Any:
        out = await on_scheduler("restore_status", op_id, *caller_namespace(req))
        return out if out is not None else error(404, no_restore(op_id))

    @app.delete("/hicache/prefetch/{op_id}", openapi_extra=NAMESPACE_QUERY)
    async def restore_cancel(op_id: str, req: HTTPRequest) -> Any:
        out = await on_scheduler("cancel_restore", op_id, *caller_namespace(req))
        return out if out is not None else error(404, no_restore(op_id))

    @app.get("/hicache/sessions", openapi_extra=SESSIONS_QUERY)
    async def sessions(req: HTTPRequest) -> Any:
        every = flag(req, "all_tenants")
        if every and not is_admin(req.scope):
            raise BadRequest("all_tenants lists every tenant's sessions: an operator's call (--admin-api-key)", 401)
        return {"retained": await on_scheduler("sessions", *caller_namespace(req), every)}

    @app.delete("/hicache/sessions/{session_id}", openapi_extra=CLOSE_QUERY)
    async def close_session(session_id: str, req: HTTPRequest) -> Any:
        label = req.query_params.get("tenant")
        if label is not None and not is_admin(req.scope):
            raise BadRequest("tenant= closes another tenant's session: an operator's call (--admin-api-key)", 401)
        answer = await on_scheduler("close_session", session_id, *caller_namespace(req), label)
        return answer if answer["status"] == "released" else error(404, answer["reason"])


def no_restore(op_id: str) -> str:
    # the same words for another tenant's restore as for none at all: a tenant cannot learn what others run
    return f"no restore operation {op_id!r} (unknown, or ended long ago)"


NAMESPACE_HEADERS = {"cache_salt": "x-hicache-cache-salt", "extra_key": "x-hicache-extra-key"}


def caller_namespace(req: HTTPRequest) -> tuple[Any, Any]:
    """The caller's tenant on a route without a body: ``cache_salt`` and ``extra_key`` as query parameters or as
    ``X-Hicache-Cache-Salt`` / ``X-Hicache-Extra-Key`` headers (which stay out of access logs), checked as in a
    body."""
    given: dict[str, Any] = {}
    for key, header in NAMESPACE_HEADERS.items():
        v = req.headers.get(header, req.query_params.get(key))
        if v is not None:
            given[key] = v
    ns = with_namespace(Params(), given)
    return ns.cache_salt, ns.extra_key


def flag(req: HTTPRequest, name: str) -> bool:
    v = req.query_params.get(name)
    if v is None:
        return False
    if v.lower() not in ("true", "false", "1", "0"):
        raise BadRequest(f"{name} must be true or false, not {v!r}")
    return v.lower() in ("true", "1")
