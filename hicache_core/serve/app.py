"""The HTTP API: SGLang's native endpoints, OpenAI's, metrics and storage attach/detach, over one scheduler.

A handler parses and checks the body (:mod:`hicache_core.serve.protocol`: 400 with the reason), hands the request
to the scheduler and waits on its events. A client that goes away (a closed stream, a cancelled request) has its
request aborted: its pages go back at once. Nothing a client sends can stop the server.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Optional

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import PlainTextResponse, StreamingResponse

from hicache_core.engine import Request
from hicache_core.serve.auth import KeyMiddleware, Keys
from hicache_core.serve.errors import add_error_handlers, error
from hicache_core.serve.fleet import add_fleet_routes
from hicache_core.serve.protocol import (
    BadRequest,
    Params,
    chat_messages,
    generate_params,
    openai_params,
    openai_prompt,
    prompt_ids,
)
from hicache_core.serve.scheduler import Busy, Stream
from hicache_core.serve.schemas import ATTACH, CHAT, COMPLETION, GENERATE, body
from hicache_core.serve.state import ServerState


def _finish(r: Request) -> Optional[dict]:
    if r.finish_reason is None:
        return None
    if r.finish_reason == "length":
        return {"type": "length", "length": len(r.output)}
    if r.finish_reason == "stop":
        return {"type": "stop", "matched": r.output[-1] if r.output and r.output[-1] in r.eos else None}
    return {"type": "abort", "message": r.finish_reason}


def meta_info(r: Request) -> dict:
    return {
        "id": r.rid,
        "finish_reason": _finish(r),
        "prompt_tokens": len(r.prompt),
        "completion_tokens": len(r.output),
        "cached_tokens": r.cached_tokens,
        "cached_tokens_details": dict(r.cached),
        "e2e_latency": (r.finish_time or time.perf_counter()) - r.arrival,
        "ttft": r.ttft if r.first_token_time else None,
        # where the TTFT went (they sum to it) and how the storage prefetch ended; engine/engine.py's PHASES
        "ttft_phases": dict(r.phases) if r.first_token_time else None,
        "prefetch": r.prefetch,
        "retention": r.retention_answer,  # how a retention_seconds hint was answered (None without one)
    }


def generated(state: ServerState, r: Request, stop: list[str]) -> dict:
    """A /generate answer (or stream chunk): the text so far, its ids, meta_info."""
    return {"text": state.text_of(r, stop), "output_ids": list(r.output), "meta_info": meta_info(r)}


def usage(state: ServerState, r: Request) -> dict:
    u: dict[str, Any] = {
        "prompt_tokens": len(r.prompt),
        "completion_tokens": len(r.output),
        "total_tokens": len(r.prompt) + len(r.output),
    }
    if state.config.enable_cache_report and r.cached_tokens:
        u["prompt_tokens_details"] = {"cached_tokens": r.cached_tokens, "cached_tokens_details": dict(r.cached)}
    return u


def _openai_reason(r: Request) -> Optional[str]:
    return {"length": "length", "stop": "stop"}.get(r.finish_reason or "", "abort" if r.finish_reason else None)


async def run_to_end(state: ServerState, stream: Stream) -> Request:
    """Wait for the request to finish; abort it if the handler is cancelled (the client left)."""
    try:
        while True:
            kind, r = await stream.events.get()
            if kind == "done":
                return r
    except asyncio.CancelledError:
        state.scheduler.abort(stream.request)
        raise


async def events(state: ServerState, stream: Stream) -> AsyncIterator[tuple[str, Request]]:
    """The request's events; a consumer that stops early (client gone) aborts it."""
    done = False
    try:
        while not done:
            kind, r = await stream.events.get()
            done = kind == "done"
            yield kind, r
    finally:
        if not done:
            state.scheduler.abort(stream.request)


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def build_app(state: ServerState, on_ready: Optional[Callable[[], None]] = None, keys: Optional[Keys] = None) -> Any:
    @asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        if on_ready is not None:
            on_ready()
        yield

    app = FastAPI(title="hicache serve", version="1", lifespan=lifespan)
    if keys is not None and keys.enabled:
        app.add_middleware(KeyMiddleware, keys=keys, error=error)

    add_error_handlers(app)

    async def body_of(req: HTTPRequest) -> dict:
        raw = await req.body()
        try:
            body = json.loads(raw or b"null")
        except (ValueError, UnicodeDecodeError) as e:
            raise BadRequest(f"the body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        return body

    def start(prompts: list[list[int]], params: Params) -> list[Stream]:
        """Every prompt checked first, then all submitted or none: a bad or refused batch leaves nothing running."""
        requests = [state.new_request(ids, params) for ids in prompts]
        return state.submit(requests, asyncio.get_running_loop())

    def stream_flag(body: dict) -> bool:
        s = body.get("stream", False)
        if not isinstance(s, bool):
            raise BadRequest(f"stream must be true or false, not {s!r}")
        return s

    # --- SGLang's native API ---------------------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> Any:
        if not state.scheduler.alive:
            return error(503, f"the scheduler has stopped ({state.scheduler.last_error})")
        return PlainTextResponse("")

    @app.get("/model_info")
    @app.get("/get_model_info")  # SGLang 0.5.23 serves both names (get_: deprecated there)
    async def model_info() -> dict:
        c = state.model.config
        return {
            "model_path": state.args.model_path or c.name,
            "tokenizer_path": state.args.model_path,
            "is_generation": True,
            "served_model_name": state.model_name,
            "vocab_size": c.vocab_size,
            "max_total_tokens": state.engine.pool.size,
            "context_length": state.context,
        }

    @app.get("/server_info")  # what SGLang's bench_serving asks at its end
    @app.get("/get_server_info")
    async def server_info() -> dict:
        running, waiting = state.scheduler.counts()
        cache = state.engine.cache
        return {
            "version": _version(),
            "model_path": state.args.model_path,
            "served_model_name": state.model_name,
            "mode": state.mode,
            "disaggregation_mode": state.engine.role,
            "disaggregation_decode_enable_offload_kvcache": state.args.disaggregation_decode_enable_offload_kvcache,
            "page_size": state.engine.page_size,
            "max_total_tokens": state.engine.pool.size,
            "max_running_requests": state.engine.max_running,
            "num_running_reqs": running,
            "num_queue_reqs": waiting,
            "host_pool_tokens": cache.host_pool.size if cache.host_pool is not None else 0,
            "storage": state.storage_info(),
            "cache_stats": state.engine.metrics.stats(),
        }

    @app.post("/flush_cache")
    async def flush_cache() -> Any:
        try:
            await asyncio.wrap_future(state.scheduler.call("flush_cache", idle=True))
        except Busy as e:
            return error(400, f"cannot flush the cache now: {e}")
        return PlainTextResponse("Cache flushed.\n")

    @app.post("/generate", openapi_extra=body(GENERATE))
    async def generate(req: HTTPRequest) -> Any:
        body = await body_of(req)
        prompts, batch = prompt_ids(body, state.tokenizer, state.model.config.vocab_size)
        params = generate_params(body)
        if stream_flag(body):
            if batch:
                raise BadRequest("stream takes one prompt, not a batch")
            (stream,) = start(prompts[:1], params)

            async def chunks() -> AsyncIterator[str]:
                async for kind, r in events(state, stream):
                    if kind == "done" or r.finish_reason is None:
                        yield sse(generated(state, r, params.stop))
                yield "data: [DONE]\n\n"

            return StreamingResponse(chunks(), media_type="text/event-stream")
        streams = start(prompts, params)
        try:
            done = await asyncio.gather(*(run_to_end(state, s) for s in streams))
        except asyncio.CancelledError:
            for s in streams:
                state.scheduler.abort(s.request)
            raise
        out = [generated(state, r, params.stop) for r in done]
        return out if batch else out[0]

    # --- OpenAI's API ------------------------------------------------------------------------------------------------
    @app.get("/v1/models")
    async def models() -> dict:
        return {
            "object": "list",
            "data": [
                {
                    "id": state.model_name,
                    "object": "model",
                    "created": state.created,
                    "owned_by": "hicache",
                    "max_model_len": state.context,
                }
            ],
        }

    async def openai(body: dict, chat: bool) -> Any:
        served_model(body.get("model"), state.model_name)
        if chat:
            try:
                ids = state.tokenizer.apply_chat_template(chat_messages(body))
            except ValueError as e:
                raise BadRequest(str(e)) from None
        else:
            ids = openai_prompt(body, state.tokenizer, state.model.config.vocab_size)
        params = openai_params(body, chat)
        (stream,) = start([ids], params)
        rid = ("chatcmpl-" if chat else "cmpl-") + stream.request.rid
        kind = "chat.completion" if chat else "text_completion"
        head = {"id": rid, "created": int(time.time()), "model": state.model_name}
        chunk_kind = "chat.completion.chunk" if chat else "text_completion"
        if not stream_flag(body):
            r = await run_to_end(state, stream)
            text = state.text_of(r, params.stop)
            choice: dict[str, Any] = {"index": 0, "finish_reason": _openai_reason(r), "logprobs": None}
            choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
            out = {**head, "object": kind, "choices": [choice], "usage": usage(state, r)}
            if r.retention_answer is not None:  # how its retention hint was answered (hicache's field)
                out["retention"] = r.retention_answer
            return out
        opts = body.get("stream_options") or {}
        include_usage = isinstance(opts, dict) and opts.get("include_usage") is True

        async def chunks() -> AsyncIterator[str]:
            sent = ""
            if chat:
                yield sse(
                    {
                        **head,
                        "object": "chat.completion.chunk",
                        "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
                    }
                )
            async for ev, r in events(state, stream):
                text = state.text_of(r, params.stop)
                # hold back a partial stop string and an incomplete UTF-8 character
                safe = (
                    text
                    if ev == "done"
                    else text[: max(len(sent), len(text) - max(map(len, params.stop), default=0))].rstrip("\ufffd")
                )
                delta, sent = safe[len(sent) :], max(safe, sent, key=len)
                reason = _openai_reason(r) if ev == "done" else None
                if delta or reason:
                    c: dict[str, Any] = {"index": 0, "finish_reason": reason, "logprobs": None}
                    c.update({"delta": {"content": delta}} if chat else {"text": delta})
                    yield sse({**head, "object": chunk_kind, "choices": [c]})
                if ev == "done" and include_usage:
                    yield sse({**head, "object": chunk_kind, "choices": [], "usage": usage(state, r)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(chunks(), media_type="text/event-stream")

    @app.post("/v1/completions", openapi_extra=body(COMPLETION))
    async def completions(req: HTTPRequest) -> Any:
        return await openai(await body_of(req), chat=False)

    @app.post("/v1/chat/completions", openapi_extra=body(CHAT))
    async def chat_completions(req: HTTPRequest) -> Any:
        return await openai(await body_of(req), chat=True)

    # --- metrics and storage at runtime ------------------------------------------------------------------------------
    @app.get("/metrics")
    async def metrics() -> Any:
        if not state.config.enable_metrics:
            return error(404, "metrics are off; start the server with --enable-metrics")
        return PlainTextResponse(state.metrics.text(), media_type="text/plain; version=0.0.4")

    @app.get("/hicache/storage-backend")
    async def storage_get() -> dict:
        return state.storage_info()

    @app.put("/hicache/storage-backend", openapi_extra=body(ATTACH))
    async def storage_put(req: HTTPRequest) -> Any:
        body = await body_of(req)
        try:
            info = await asyncio.wrap_future(state.scheduler.call("attach", body, idle=True))
        except Busy as e:
            return error(400, f"cannot attach a storage backend now: {e}")
        return {"success": True, **info}

    @app.delete("/hicache/storage-backend")
    async def storage_delete() -> Any:
        try:
            info = await asyncio.wrap_future(state.scheduler.call("detach", idle=True))
        except Busy as e:
            return error(400, f"cannot detach the storage backend now: {e}")
        return {"success": True, **info}

    add_fleet_routes(app, state, body_of, error)
    return app


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hicache-core")
    except PackageNotFoundError:
        return "unknown"


def served_model(model: Any, served: str) -> None:
    """Accept what SGLang accepts for ``model``: absent, ``"default"`` (its protocol default, what its client examples
    send) or the served name. ``name:adapter`` names a LoRA adapter, which this server does not have: refused with
    what to send instead; any other name is not served here (404)."""
    if model is None or model in ("", "default", served):
        return
    if not isinstance(model, str):
        raise BadRequest(f"model must be a string; got {type(model).__name__}")
    base, sep, adapter = model.partition(":")
    if sep and base in ("default", served):
        raise BadRequest(
            f"model {model!r} names the LoRA adapter {adapter!r}, and hicache serve has no adapters; "
            f'send model {served!r} (or "default")'
        )
    raise BadRequest(f'model {model!r} is not served here; this server serves {served!r} (or send "default")', 404)
