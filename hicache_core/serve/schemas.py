"""The JSON bodies the server takes, as JSON Schema, for its OpenAPI document (``GET /openapi.json``).

The handlers read raw JSON and check it themselves (serve/protocol.py: a 400 that names the field); these schemas
describe what they accept, so clients, gateways and the fuzz test (tests_serve/test_fuzz.py, which drives every
route with bodies drawn from them and from arbitrary JSON) know the surface. They are documentation of the
checks, not a second set of them.
"""

from __future__ import annotations

from typing import Any

_SALT = {"type": "string", "minLength": 1, "maxLength": 1024}
NAMESPACE: dict[str, Any] = {
    "cache_salt": {**_SALT, "description": "the tenant: shares cached prefixes only with the same salt"},
    "extra_key": {**_SALT, "description": "SGLang's extra namespace key (an adapter, a tenant)"},
    "retention_seconds": {"type": "number", "exclusiveMinimum": 0, "description": "keep this prefix so long"},
    "retention_priority": {"type": "integer"},
    "session_id": {"type": "string", "minLength": 1, "maxLength": 256},
}
_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
_STOP = {
    "oneOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": 16},
    ]
}
_GREEDY = {
    "temperature": {"type": "number", "minimum": 0, "description": "0 only: this server decodes greedily"},
    "top_p": {"type": "number"},
    "top_k": {"type": "integer"},
    "n": {"type": "integer"},
    "stop": _STOP,
    "stop_token_ids": _IDS,
    "ignore_eos": {"type": "boolean"},
}
SAMPLING = {"type": "object", "properties": {"max_new_tokens": {"type": "integer", "minimum": 1}, **_GREEDY}}

GENERATE = {
    "type": "object",
    "properties": {
        "text": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1}]},
        "input_ids": {"oneOf": [_IDS, {"type": "array", "items": _IDS, "minItems": 1}]},
        "sampling_params": SAMPLING,
        "stream": {"type": "boolean"},
        **NAMESPACE,
    },
}
_OPENAI = {
    "model": {"type": "string"},
    "max_tokens": {"type": "integer", "minimum": 1},
    "stream": {"type": "boolean"},
    "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
    **_GREEDY,
    **NAMESPACE,
}
COMPLETION = {
    "type": "object",
    "required": ["prompt"],
    "properties": {"prompt": {"oneOf": [{"type": "string"}, _IDS]}, **_OPENAI},
}
_CONTENT = {
    "oneOf": [
        {"type": "string"},
        {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["type", "text"],
                "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
            },
        },
    ]
}
_MESSAGES = {
    "type": "array",
    "minItems": 1,
    "items": {
        "type": "object",
        "required": ["role", "content"],
        "properties": {"role": {"type": "string"}, "content": _CONTENT},
    },
}
CHAT = {
    "type": "object",
    "required": ["messages"],
    "properties": {
        "messages": _MESSAGES,
        "max_completion_tokens": {"type": "integer", "minimum": 1},
        **_OPENAI,
    },
}
RESTORE = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "input_ids": _IDS,
        "text": {"type": "string", "minLength": 1},
        "messages": _MESSAGES,
        "operation_id": {"type": "string", "maxLength": 256},
        "ttl_seconds": {"type": "number", "exclusiveMinimum": 0},
        "cache_salt": _SALT,
        "extra_key": _SALT,
    },
}
ATTACH = {
    "type": "object",
    "additionalProperties": False,
    "required": ["hicache_storage_backend"],
    "properties": {
        "hicache_storage_backend": {"type": "string", "minLength": 1},
        "hicache_storage_backend_extra_config_json": {"type": "string"},
        "hicache_storage_backend_extra_config": {"oneOf": [{"type": "string"}, {"type": "object"}]},
        "hicache_storage_prefetch_policy": {
            "enum": ["best_effort", "wait_complete", "timeout", "cost_aware"],
        },
    },
}


def body(schema: dict[str, Any]) -> dict[str, Any]:
    """A route's ``openapi_extra``: its JSON body, required."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


NAMESPACE_QUERY = {
    "parameters": [
        {"name": "cache_salt", "in": "query", "required": False, "schema": _SALT},
        {"name": "extra_key", "in": "query", "required": False, "schema": _SALT},
    ]
}
_BOOL_QUERY = {"type": "string", "enum": ["true", "false", "1", "0"]}
SESSIONS_QUERY = {
    "parameters": [
        *NAMESPACE_QUERY["parameters"],
        {"name": "all_tenants", "in": "query", "required": False, "schema": _BOOL_QUERY},
    ]
}
CLOSE_QUERY = {
    "parameters": [
        *NAMESPACE_QUERY["parameters"],
        {"name": "tenant", "in": "query", "required": False, "schema": {"type": "string"}},
    ]
}
