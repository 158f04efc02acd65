"""The HTTP surface fuzzed against a real `hicache serve`: every route of the server's own OpenAPI document, driven
with bodies drawn from its schema (hypothesis-jsonschema) and with arbitrary JSON, arbitrary path and query values,
and raw bytes that are not JSON. Every answer must be below 500, carry no traceback, and be the server's error body
when it is a refusal; afterwards the server must still answer, and a known prompt's tokens must be the ones it gave
before (nothing a client sent changed what is served). The number of cases run is printed (-s shows it)."""

from __future__ import annotations

import json
import os
import urllib.parse
import urllib.request

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema

from hicache_core.testing.server import TINY_MODEL, serve

ADMIN = "fuzz-admin-key"
CASES = int(os.environ.get("HICACHE_FUZZ_CASES", "60"))  # per route and kind of body
KNOWN = {"text": "a known prompt, whose tokens must not change", "sampling_params": {"max_new_tokens": 8}}

# arbitrary JSON, small: what a broken or hostile client sends
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
TEXT = st.text(max_size=40)


class Surface:
    def __init__(self, server) -> None:
        self.s = server
        self.cases = 0
        self.refused = 0

    def send(self, method: str, path: str, data: bytes | None, query: dict | None = None) -> None:
        url = self.s.url + path + ("?" + urllib.parse.urlencode(query) if query else "")
        headers = {"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"}
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                status, text = r.status, r.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as e:
            status, text = e.code, e.read().decode("utf-8", "replace")
        self.cases += 1
        what = f"{method} {path} {query or ''} {data[:300] if data else data!r} -> {status}: {text[:500]}"
        assert status < 500, what
        assert "Traceback" not in text and 'File "' not in text, what
        if status >= 400:
            self.refused += 1
            body = json.loads(text)
            assert body["object"] == "error" and body["message"] and body["error"]["code"] == status, what

    def known_tokens(self) -> list[int]:
        status, out, _ = self.s.call("POST", "/generate", KNOWN, key=ADMIN)
        assert status == 200, out
        return out["output_ids"]


def routes(doc: dict):
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            yield path, method.upper(), op


def fill(path: str, values: dict) -> str:
    for k, v in values.items():
        path = path.replace("{" + k + "}", urllib.parse.quote(v, safe="") or "x")
    return path


def test_every_route_survives_generated_and_arbitrary_input(tmp_path):
    flags = [
        "--page-size",
        "4",
        "--max-total-tokens",
        "384",
        *TINY_MODEL,
        "--enable-metrics",
        "--enable-cache-report",
        "--enable-hierarchical-cache",
        "--hicache-storage-backend",
        "file",
        "--hicache-storage-backend-extra-config",
        json.dumps({"storage_dir": str(tmp_path / "store")}),
        "--api-key",
        "fuzz-user-key",
        "--admin-api-key",
        ADMIN,
    ]
    with serve(tmp_path, *flags, cwd=tmp_path) as s:  # an attach the fuzz makes writes under tmp_path, nowhere else
        surface = Surface(s)
        before = surface.known_tokens()
        status, doc, _ = s.call("GET", "/openapi.json", key=ADMIN)
        assert status == 200
        seen = []
        for path, method, op in routes(doc):
            seen.append(f"{method} {path}")
            params = op.get("parameters", [])
            path_names = [p["name"] for p in params if p["in"] == "path"]
            query_names = [p["name"] for p in params if p["in"] == "query"]
            schema = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            bodies = [from_schema(schema), JSON] if schema else [st.none()]
            for bodies_of in bodies:

                @settings(
                    max_examples=CASES,
                    deadline=None,
                    database=None,
                    derandomize=True,
                    suppress_health_check=list(HealthCheck),
                )
                @given(
                    body=bodies_of,
                    where=st.fixed_dictionaries({n: TEXT for n in path_names}),
                    query=st.dictionaries(st.sampled_from(query_names), TEXT) if query_names else st.just({}),
                )
                def case(body, where, query):
                    data = None if body is None and not schema else json.dumps(body).encode()
                    surface.send(method, fill(path, where), data, query)

                case()
            if schema:  # bytes that are not JSON, and JSON that is not an object
                for raw in (b"{", b"\xff\xfe", b"[]", b"null", b'"x"', b"1e999", b'{"text": "' + b"a" * 10_000):
                    surface.send(method, fill(path, dict.fromkeys(path_names, "x")), raw)
        for method, path in (("GET", "/no/such/route"), ("PATCH", "/generate"), ("POST", "/health")):
            surface.send(method, path, b"{}")  # Starlette's own 404 and 405, in the server's error body
        assert len(seen) >= 15 and "POST /generate" in seen and "PUT /hicache/storage-backend" in seen, seen
        print(f"\nfuzz: {surface.cases} cases over {len(seen)} routes, {surface.refused} refused (4xx), none 5xx")
        assert s.call("GET", "/health")[0] == 200
        # the fuzz may have detached storage or flushed the cache: the tokens must be the same all the same
        assert surface.known_tokens() == before
    log = s.log.read_text()
    assert "Traceback" not in log, log[-5000:]
