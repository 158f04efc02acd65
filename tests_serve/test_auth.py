"""Trust at the door, against a real `hicache serve`: --api-key guards every route but /health, --admin-api-key the
operator routes (OpenAI's own client with a key); a tenant (cache_salt) sees and closes only its own sessions and
restores, and learns nothing of another's; a tenant past --tenant-max-requests gets a 429 while others go on."""

from __future__ import annotations

import json
import threading

from conftest import serve

API, ADMIN = "user-key-1234", "admin-key-5678"
PROMPT = "".join(f"turn {i}: the agent calls a tool and waits for its answer before it goes on. " for i in range(6))


def gen_body(**kw):
    return {"text": PROMPT, "sampling_params": {"max_new_tokens": 2, "temperature": 0}, **kw}


def assert_401(status, out, headers, says):
    assert status == 401, (status, out)
    assert out["error"]["type"] == "AuthenticationError" and out["error"]["code"] == 401, out
    assert says in out["message"], out
    assert (headers.get("WWW-Authenticate") or "").startswith("Bearer"), dict(headers)
    assert "Traceback" not in json.dumps(out)


def test_keys_guard_the_routes_and_openai_client_works(tmp_path):
    flags = [
        "--page-size",
        "16",
        "--enable-metrics",
        "--enable-cache-report",
        "--enable-hierarchical-cache",
        "--hicache-storage-backend",
        "file",
        "--hicache-storage-backend-extra-config",
        json.dumps({"storage_dir": str(tmp_path / "store"), "prefetch_threshold": 16}),
        "--api-key",
        API,
        "--admin-api-key",
        ADMIN,
        "--admin-metrics",
    ]
    with serve(tmp_path, *flags) as s:
        assert s.call("GET", "/health")[0] == 200  # open: load balancers probe it without a key
        for path, body in [("/generate", gen_body()), ("/v1/completions", {"prompt": "hi", "max_tokens": 1})]:
            assert_401(*s.call("POST", path, body), "a valid API key is required")
            assert_401(*s.call("POST", path, body, key="wrong"), "the API key is wrong")
            assert s.call("POST", path, body, key=API)[0] == 200
            assert s.call("POST", path, body, key=ADMIN)[0] == 200  # the operator's key opens every route
        assert_401(*s.call("GET", "/v1/models"), "a valid API key is required")
        assert_401(*s.call("GET", "/openapi.json"), "a valid API key is required")
        # the operator routes: the API key is not enough
        for method, path in [
            ("GET", "/hicache/storage-backend"),
            ("DELETE", "/hicache/storage-backend"),
            ("POST", "/flush_cache"),
            ("GET", "/metrics"),
        ]:
            assert_401(
                *s.call(method, path, key=API), "is an operator route: send Authorization: Bearer <--admin-api-key>"
            )
        status, info, _ = s.call("GET", "/hicache/storage-backend", key=ADMIN)
        assert status == 200 and info["hicache_storage_backend"] == "file", info
        assert s.call("GET", "/metrics", key=ADMIN)[0] == 200
        assert s.call("POST", "/flush_cache", key=ADMIN)[0] == 200
        # storage is still attached: nobody without the operator's key detached it
        assert s.call("GET", "/hicache/storage-backend", key=ADMIN)[1]["hicache_storage_backend"] == "file"

        import openai

        client = openai.OpenAI(base_url=s.url + "/v1", api_key=API, max_retries=0)
        out = client.completions.create(model="default", prompt="hello", max_tokens=2, temperature=0)
        assert out.usage.completion_tokens == 2
        chat = client.chat.completions.create(
            model="default", messages=[{"role": "user", "content": "hi"}], max_tokens=2, temperature=0
        )
        assert chat.choices[0].message.content is not None
        bad = openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0)
        try:
            bad.completions.create(model="default", prompt="hello", max_tokens=1)
            raise AssertionError("a wrong key was served")
        except openai.AuthenticationError as e:
            assert "the API key is wrong" in str(e)
    assert "Traceback" not in s.log.read_text()


def test_tenants_see_only_their_own_sessions_and_restores(tmp_path):
    flags = [
        "--page-size",
        "16",
        "--enable-hierarchical-cache",
        "--hicache-storage-backend",
        "file",
        "--hicache-storage-backend-extra-config",
        json.dumps({"storage_dir": str(tmp_path / "store"), "prefetch_threshold": 16}),
        "--api-key",
        API,
        "--admin-api-key",
        ADMIN,
        "--tenant-max-requests",
        "1",
    ]
    with serve(tmp_path, *flags) as s:
        for salt in ("tenant-a", "tenant-b"):
            status, out, _ = s.call(
                "POST", "/generate", gen_body(cache_salt=salt, retention_seconds=120, session_id="agent"), key=API
            )
            assert status == 200 and out["meta_info"]["retention"]["status"] == "accepted", out
        hdr_a = {"X-Hicache-Cache-Salt": "tenant-a"}
        status, out, _ = s.call("GET", "/hicache/sessions", key=API, headers=hdr_a)
        assert status == 200 and [r["key"] for r in out["retained"]] == ["agent"], out
        assert s.call("GET", "/hicache/sessions", key=API)[1] == {"retained": []}  # the unsalted tenant: none
        # another tenant's session answers as one that does not exist
        gone = s.call("DELETE", "/hicache/sessions/agent?cache_salt=tenant-c", key=API)
        never = s.call("DELETE", "/hicache/sessions/nobody?cache_salt=tenant-c", key=API)
        assert gone[0] == never[0] == 404
        assert gone[1]["message"] == never[1]["message"].replace("nobody", "agent"), (gone[1], never[1])
        # only an operator lists every tenant, or closes another's
        assert_401(*s.call("GET", "/hicache/sessions?all_tenants=true", key=API), "an operator's call")
        status, out, _ = s.call("GET", "/hicache/sessions?all_tenants=true", key=ADMIN)
        labels = sorted(r["tenant"] for r in out["retained"])
        assert status == 200 and len(labels) == 2 and "tenant-a" not in json.dumps(out), out  # labels, not salts
        assert_401(*s.call("DELETE", f"/hicache/sessions/agent?tenant={labels[0]}", key=API), "an operator's call")
        assert s.call("DELETE", f"/hicache/sessions/agent?tenant={labels[0]}", key=ADMIN)[0] == 200
        assert len(s.call("GET", "/hicache/sessions?all_tenants=true", key=ADMIN)[1]["retained"]) == 1
        # restores: one tenant's op id is not another's
        body = {"text": PROMPT, "operation_id": "op-1", "cache_salt": "tenant-a"}
        status, ra, _ = s.call("POST", "/hicache/prefetch", body, key=API)
        assert status == 200, ra
        status, out, _ = s.call("GET", "/hicache/prefetch/op-1?cache_salt=tenant-b", key=API)
        assert status == 404 and "no restore operation 'op-1'" in out["message"], out
        assert s.call("DELETE", "/hicache/prefetch/op-1", key=API)[0] == 404  # unsalted: not its op
        assert s.call("GET", "/hicache/prefetch/op-1", key=API, headers=hdr_a)[0] == 200

        # --tenant-max-requests 1: a's second request in flight is refused; b goes on
        long_body = {"text": PROMPT, "sampling_params": {"max_new_tokens": 200, "temperature": 0, "ignore_eos": True}}
        first: dict = {}
        t = threading.Thread(
            target=lambda: first.update(r=s.call("POST", "/generate", {**long_body, "cache_salt": "tenant-a"}, key=API))
        )
        t.start()
        try:
            for _ in range(2000):  # until the long request is in flight
                info = s.call("GET", "/get_server_info", key=API)[1]
                if info["num_running_reqs"] + info["num_queue_reqs"]:
                    break
            status, out, headers = s.call("POST", "/generate", gen_body(cache_salt="tenant-a"), key=API)
            assert "r" not in first, "the long request finished before a second one was sent"
            assert status == 429 and out["error"]["type"] == "RateLimitError", out
            assert "(--tenant-max-requests)" in out["message"] and headers.get("Retry-After") == "1", out
            assert s.call("POST", "/generate", gen_body(cache_salt="tenant-b"), key=API)[0] == 200
        finally:
            t.join(120)
        assert first["r"][0] == 200
        assert s.call("POST", "/generate", gen_body(cache_salt="tenant-a"), key=API)[0] == 200  # its slot came back
    assert "Traceback" not in s.log.read_text()
