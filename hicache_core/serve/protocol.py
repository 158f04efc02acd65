"""What a client may send, checked: every bad field is a :class:`BadRequest` (HTTP 400) naming the field.

The engine decodes greedily, so ``temperature`` must be 0 when given (absent means 0); ``top_p`` 1 and ``top_k``
-1/0 are accepted as the no-op they are. ``n`` must be 1. A prompt plus ``max_new_tokens`` must fit the device
pool and the model's context; the limit is in the message.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import attrs

DEFAULT_MAX_NEW_TOKENS = 128  # SGLang's /generate default
OPENAI_DEFAULT_MAX_TOKENS = 16  # OpenAI's completions default


class BadRequest(ValueError):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@attrs.define
class Params:
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    stop: list[str] = attrs.field(factory=list)
    stop_token_ids: list[int] = attrs.field(factory=list)
    ignore_eos: bool = False
    # the request shares cached prefixes only with requests of the same cache_salt and extra_key (SGLang's and
    # vLLM's cache_salt; SGLang's extra_key)
    cache_salt: Optional[str] = None
    extra_key: Optional[str] = None
    # soft retention of the request's prefix (cache/retention.py): seconds, priority, and the session it belongs to
    retention_seconds: Optional[float] = None
    retention_priority: int = 0
    session_id: Optional[str] = None


def _obj(body: Any, what: str) -> dict:
    if not isinstance(body, dict):
        raise BadRequest(f"{what} must be a JSON object, not {type(body).__name__}")
    return body


def _int(v: Any, name: str, lo: int, hi: Optional[int] = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise BadRequest(f"{name} must be an integer, not {v!r}")
    if v < lo or (hi is not None and v > hi):
        raise BadRequest(f"{name} must be in [{lo}, {hi if hi is not None else 'inf'}], not {v}")
    return v


def _greedy_only(sp: dict) -> None:
    t = sp.get("temperature")
    if t is not None:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise BadRequest(f"temperature must be a finite number >= 0, not {t!r}")
        if t > 0:
            raise BadRequest(f"temperature {t}: this server decodes greedily; send temperature 0 (or leave it out)")
    top_p = sp.get("top_p")
    if top_p is not None and top_p != 1:
        raise BadRequest(f"top_p {top_p!r}: this server decodes greedily; send 1 or leave it out")
    top_k = sp.get("top_k")
    if top_k is not None and top_k not in (-1, 0):
        raise BadRequest(f"top_k {top_k!r}: this server decodes greedily; send -1 or leave it out")
    n = sp.get("n")
    if n is not None and n != 1:
        raise BadRequest(f"n {n!r}: one completion per request (n=1)")


def _stop(v: Any, name: str = "stop") -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) and s for s in v) or len(v) > 16:
        raise BadRequest(f"{name} must be a non-empty string or a list of up to 16 of them, not {v!r}")
    return list(v)


def sampling_params(sp: Any, default_max: int = DEFAULT_MAX_NEW_TOKENS, max_key: str = "max_new_tokens") -> Params:
    """SGLang's ``sampling_params`` (or an OpenAI body, with ``max_key`` ``max_tokens``)."""
    sp = _obj(sp if sp is not None else {}, "sampling_params")
    _greedy_only(sp)
    mx = sp.get(max_key)
    ids = sp.get("stop_token_ids") or []
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise BadRequest(f"stop_token_ids must be a list of token ids, not {ids!r}")
    ignore = sp.get("ignore_eos", False)
    if not isinstance(ignore, bool):
        raise BadRequest(f"ignore_eos must be true or false, not {ignore!r}")
    return Params(
        max_new_tokens=default_max if mx is None else _int(mx, max_key, 1),
        stop=_stop(sp.get("stop")),
        stop_token_ids=list(ids),
        ignore_eos=ignore,
    )


def prompt_ids(body: dict, tokenizer: Any, vocab: int) -> tuple[list[list[int]], bool]:
    """The prompts of a /generate body (``text`` or ``input_ids``, one or a batch) and whether it was a batch."""
    text, ids = body.get("text"), body.get("input_ids")
    if (text is None) == (ids is None):
        raise BadRequest("give exactly one of text and input_ids")
    if text is not None:
        if isinstance(text, str):
            return [tokenizer.encode(text)], False
        if isinstance(text, list) and text and all(isinstance(t, str) for t in text):
            return [tokenizer.encode(t) for t in text], True
        raise BadRequest("text must be a string or a non-empty list of strings")
    if isinstance(ids, list) and ids and all(isinstance(i, int) for i in ids):
        return [check_ids(ids, vocab)], False
    if isinstance(ids, list) and ids and all(isinstance(x, list) for x in ids):
        return [check_ids(x, vocab) for x in ids], True
    raise BadRequest("input_ids must be a non-empty list of token ids or a list of such lists")


def check_ids(ids: list, vocab: int, name: str = "input_ids") -> list[int]:
    if not ids:
        raise BadRequest(f"{name} is empty")
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab:
            raise BadRequest(f"{name}: {i!r} is not a token id of this model (0 <= id < {vocab})")
    return list(ids)


def openai_prompt(body: dict, tokenizer: Any, vocab: int) -> list[int]:
    p = body.get("prompt")
    if isinstance(p, str):
        ids = tokenizer.encode(p)
    elif isinstance(p, list) and p and all(isinstance(i, int) for i in p):
        ids = check_ids(p, vocab, "prompt")
    elif isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
        ids = tokenizer.encode(p[0])
    else:
        raise BadRequest("prompt must be a string or a list of token ids (one prompt per request)")
    if not ids:
        raise BadRequest("prompt is empty")
    return ids


def chat_messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BadRequest("messages must be a non-empty list")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest(f"messages[{i}] must be an object with a role and content")
        content = m.get("content")
        if isinstance(content, list):  # OpenAI content parts: text only
            parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            if len(parts) != len(content) or not all(isinstance(t, str) for t in parts):
                raise BadRequest(f"messages[{i}].content: only text parts are supported")
            content = "".join(str(t) for t in parts)
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string")
        out.append({"role": m["role"], "content": content})
    return out


def generate_params(body: dict) -> Params:
    """/generate: its ``sampling_params`` and the request's cache salt."""
    return with_namespace(sampling_params(body.get("sampling_params")), body)


def openai_params(body: dict, chat: bool) -> Params:
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    default = DEFAULT_MAX_NEW_TOKENS if chat else OPENAI_DEFAULT_MAX_TOKENS
    return with_namespace(sampling_params(body, default, key), body)


def with_namespace(params: Params, body: dict) -> Params:
    """``params`` with the request's ``cache_salt`` and ``extra_key`` (SGLang's fields; vLLM's ``cache_salt``):
    each a non-empty string of at most 1024 characters, or absent."""
    for k in ("cache_salt", "extra_key"):
        v = body.get(k)
        if v is not None and (not isinstance(v, str) or not 0 < len(v) <= 1024):
            raise BadRequest(f"{k} must be a non-empty string of at most 1024 characters, not {v!r}")
    secs, prio, sid = body.get("retention_seconds"), body.get("retention_priority", 0), body.get("session_id")
    if secs is not None and (isinstance(secs, bool) or not isinstance(secs, (int, float)) or not 0 < secs < math.inf):
        raise BadRequest(f"retention_seconds must be a number > 0, not {secs!r}")
    prio = _int(prio, "retention_priority", -(2**31), 2**31)  # clipped by the cache, and the answer says so
    if sid is not None and (not isinstance(sid, str) or not 0 < len(sid) <= 256):
        raise BadRequest(f"session_id must be a non-empty string of at most 256 characters, not {sid!r}")
    return attrs.evolve(
        params,
        cache_salt=body.get("cache_salt"),
        extra_key=body.get("extra_key"),
        retention_seconds=None if secs is None else float(secs),
        retention_priority=prio,
        session_id=sid,
    )


def check_fits(ids: list[int], params: Params, limit: int, why: str) -> None:
    need = len(ids) + params.max_new_tokens
    if need > limit:
        raise BadRequest(
            f"the prompt ({len(ids)} tokens) plus max_new_tokens ({params.max_new_tokens}) is {need} "
            f"tokens; this server takes at most {limit} ({why})"
        )
