"""The HTTP API driven by real clients: the openai package, raw streaming HTTP, concurrent requests; the cache
report, /metrics, storage attach/detach, a client that leaves mid-stream, and requests that must get a 4xx."""

from __future__ import annotations

import concurrent.futures
import json
import re
import subprocess
import sys
import time

import httpx
import pytest

from conftest import REPO, serve

PROMPT = "a prompt long enough to fill several pages of sixteen tokens, so that the cache has something to keep. " * 2


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api")
    with serve(
        tmp,
        "--enable-hierarchical-cache",
        "--page-size",
        "16",
        "--max-total-tokens",
        "4096",
        "--enable-metrics",
        "--enable-cache-report",
        "--max-running-requests",
        "8",
    ) as s:
        s.tmp = tmp
        yield s


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


def test_openai_client_completions_and_chat_with_cache_report(server):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="none")
    model = client.models.list().data[0].id
    first = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0)
    again = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0)
    assert first.choices[0].text == again.choices[0].text and first.choices[0].finish_reason == "length"
    assert first.usage.completion_tokens == 8
    assert again.usage.prompt_tokens_details.cached_tokens >= 160  # the whole prompt but its last page
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=5)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 5
    pieces = [
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=5, stream=True
        )
        if c.choices
    ]
    assert "".join(pieces) == chat.choices[0].message.content
    streamed = [
        c
        for c in client.completions.create(
            model=model, prompt=PROMPT, max_tokens=6, stream=True, stream_options={"include_usage": True}
        )
    ]
    assert (
        "".join(c.choices[0].text for c in streamed if c.choices)
        == client.completions.create(model=model, prompt=PROMPT, max_tokens=6).choices[0].text
    )
    assert streamed[-1].usage.completion_tokens == 6
    # SGLang's client examples send SGLang's protocol default, "default": served, same tokens
    assert (
        client.completions.create(model="default", prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text
        == first.choices[0].text
    )
    assert (
        client.chat.completions.create(model="default", messages=[{"role": "user", "content": PROMPT}], max_tokens=5)
        .choices[0]
        .message.content
        == chat.choices[0].message.content
    )


def test_generate_streams_sglang_chunks_over_raw_http(server):
    body = {"text": PROMPT, "sampling_params": {"max_new_tokens": 5, "temperature": 0}, "stream": True}
    chunks = []
    with httpx.stream("POST", server.url + "/generate", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                chunks.append(line[6:])
    assert chunks[-1] == "[DONE]"
    events = [json.loads(c) for c in chunks[:-1]]
    assert [len(e["output_ids"]) for e in events] == [1, 2, 3, 4, 5]
    assert events[-1]["meta_info"]["finish_reason"] == {"type": "length", "length": 5}
    plain = server.generate({"text": PROMPT, "sampling_params": {"max_new_tokens": 5}})
    assert plain["output_ids"] == events[-1]["output_ids"] and plain["text"] == events[-1]["text"]
    assert plain["meta_info"]["cached_tokens"] > 0


def test_concurrent_requests_get_the_tokens_they_get_alone(server):
    prompts = [f"client {i}: " + PROMPT[i * 7 :] for i in range(8)]
    alone = [server.generate({"text": p, "sampling_params": {"max_new_tokens": 6}})["output_ids"] for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(
            pool.map(lambda p: server.generate({"text": p, "sampling_params": {"max_new_tokens": 6}}), prompts * 2)
        )
    assert [o["output_ids"] for o in together] == alone * 2
    batch = server.generate({"text": prompts[:3], "sampling_params": {"max_new_tokens": 6}})
    assert [o["output_ids"] for o in batch] == alone[:3]


def test_stop_strings_and_stop_token_ids(server):
    full = server.generate({"input_ids": list(range(40, 80)), "sampling_params": {"max_new_tokens": 8}})
    cut = server.generate(
        {
            "input_ids": list(range(40, 80)),
            "sampling_params": {"max_new_tokens": 8, "stop_token_ids": [full["output_ids"][2]]},
        }
    )
    assert cut["output_ids"] == full["output_ids"][:3] and cut["meta_info"]["finish_reason"]["type"] == "stop"
    stop = full["text"][
        len(server.generate({"input_ids": list(range(40, 80)), "sampling_params": {"max_new_tokens": 4}})["text"]) :
    ][:3]
    if stop:
        s = server.generate({"input_ids": list(range(40, 80)), "sampling_params": {"max_new_tokens": 8, "stop": stop}})
        assert stop not in s["text"] and full["text"].startswith(s["text"])


def test_metrics_move(server):
    before = httpx.get(server.url + "/metrics").text
    server.generate({"text": PROMPT + "metrics", "sampling_params": {"max_new_tokens": 3}})
    server.generate({"text": PROMPT + "metrics", "sampling_params": {"max_new_tokens": 3}})
    after = httpx.get(server.url + "/metrics").text
    for name in (
        "sglang:prompt_tokens_total",
        "sglang:generation_tokens_total",
        "sglang:time_to_first_token_seconds_count",
        "sglang:num_requests_total",
        "hicache_prompt_tokens_total",
    ):
        assert metric(after, name) > metric(before, name), name
    assert metric(after, "sglang:cached_tokens_total", cache_source="device") > metric(
        before, "sglang:cached_tokens_total", cache_source="device"
    )
    assert 0 < metric(after, "sglang:cache_hit_rate") <= 1
    for phase in ("queued", "prefetch_wait", "load", "compute"):  # where each TTFT went
        assert (
            metric(after, "hicache_ttft_phase_seconds_count", phase=phase)
            >= metric(before, "hicache_ttft_phase_seconds_count", phase=phase) + 2
        ), phase
    assert "sglang:num_running_reqs" in after and "sglang:token_usage" in after


def test_client_that_leaves_mid_stream_frees_its_request(server):
    before = httpx.get(server.url + "/metrics").text
    body = {"text": PROMPT, "sampling_params": {"max_new_tokens": 3000, "ignore_eos": True}, "stream": True}
    with httpx.stream("POST", server.url + "/generate", json=body, timeout=60) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 4:
                break  # leave: the connection closes
    deadline = time.monotonic() + 30
    while True:
        info = server.get("/get_server_info")
        if info["num_running_reqs"] == 0 and info["num_queue_reqs"] == 0:
            break
        assert time.monotonic() < deadline, "the abandoned request is still running"
        time.sleep(0.1)
    after = httpx.get(server.url + "/metrics").text
    assert (
        metric(after, "sglang:num_requests_total", finish_reason="abort")
        == metric(before, "sglang:num_requests_total", finish_reason="abort") + 1
    )
    assert server.generate({"text": "still serving", "sampling_params": {"max_new_tokens": 2}})["output_ids"]


@pytest.mark.parametrize(
    "path,body,status,says",
    [
        ("/generate", b"{not json", 400, "not valid JSON"),
        ("/generate", [1, 2], 400, "JSON object"),
        ("/generate", {}, 400, "exactly one of text and input_ids"),
        ("/generate", {"text": "x", "input_ids": [1]}, 400, "exactly one of text and input_ids"),
        ("/generate", {"input_ids": [1, 99999]}, 400, "not a token id"),
        ("/generate", {"text": "x", "sampling_params": {"temperature": 0.8}}, 400, "greedily"),
        ("/generate", {"text": "x", "sampling_params": {"max_new_tokens": -1}}, 400, "max_new_tokens"),
        ("/generate", {"text": "x", "sampling_params": {"max_new_tokens": 10**7}}, 400, "at most 4096"),
        ("/generate", {"text": "x" * 5000}, 400, "at most 4096"),
        ("/generate", {"text": "x", "sampling_params": {"stop": 5}}, 400, "stop must be"),
        ("/generate", {"text": "x", "stream": "yes"}, 400, "stream must be"),
        ("/v1/completions", {"prompt": "x", "n": 2}, 400, "n=1"),
        ("/v1/completions", {"prompt": "x", "model": "gpt-9"}, 404, "not served here"),
        ("/v1/completions", {"prompt": "x", "model": "default:my-lora"}, 400, "LoRA adapter 'my-lora'"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "model": 7}, 400, "model must be"),
        ("/v1/chat/completions", {"messages": []}, 400, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": {"x": 1}}]}, 400, "content"),
        ("/hicache/storage-backend", {"hicache_storage_backend": "nope"}, 400, "unknown storage backend"),
    ],
)
def test_bad_requests_get_4xx_with_a_reason_and_the_server_lives(server, path, body, status, says):
    method = "PUT" if path.startswith("/hicache") else "POST"
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.request(method, server.url + path, content=data, timeout=30)
    assert r.status_code == status, r.text
    assert says in r.json()["message"], r.json()
    assert httpx.get(server.url + "/health").status_code == 200


def test_attach_and_detach_storage_at_runtime(server, tmp_path):
    assert server.get("/hicache/storage-backend")["hicache_storage_backend"] is None
    extra = json.dumps({"storage_dir": str(tmp_path / "attached")})
    status, out = server.post(
        "/hicache/storage-backend",
        {
            "hicache_storage_backend": "file",
            "hicache_storage_backend_extra_config_json": extra,
            "hicache_storage_prefetch_policy": "wait_complete",
        },
        method="PUT",
    )
    assert status == 200 and out["hicache_storage_backend"] == "file", out
    assert out["hicache_storage_prefetch_policy"] == "wait_complete"
    status, out = server.post("/hicache/storage-backend", {"hicache_storage_backend": "file"}, method="PUT")
    assert status == 400 and "attached already" in out["message"]
    prompt = "attach " + PROMPT * 2  # past the 256-token prefetch threshold
    first = server.generate({"text": prompt, "sampling_params": {"max_new_tokens": 4}})
    assert server.post("/flush_cache", {})[0] == 200  # waits for the backups, then empties device and host
    assert list((tmp_path / "attached").rglob("*.page")), "nothing reached the attached backend"
    again = server.generate({"text": prompt, "sampling_params": {"max_new_tokens": 4}})
    assert again["output_ids"] == first["output_ids"] and again["meta_info"]["cached_tokens_details"]["storage"] > 0
    meta = again["meta_info"]
    assert meta["prefetch"] in ("hit", "partial"), meta
    assert abs(sum(meta["ttft_phases"].values()) - meta["ttft"]) < 1e-6 and meta["ttft_phases"]["prefetch_wait"] > 0
    status, out = server.post("/hicache/storage-backend", {}, method="DELETE")
    assert status == 200 and out["hicache_storage_backend"] is None, out
    status, out = server.post("/hicache/storage-backend", {}, method="DELETE")
    assert status == 400 and "no storage backend" in out["message"]


def test_detach_refused_while_busy(server, tmp_path):
    extra = json.dumps({"storage_dir": str(tmp_path / "busy")})
    assert (
        server.post(
            "/hicache/storage-backend",
            {"hicache_storage_backend": "file", "hicache_storage_backend_extra_config_json": extra},
            method="PUT",
        )[0]
        == 200
    )
    body = {"text": PROMPT, "sampling_params": {"max_new_tokens": 3000, "ignore_eos": True}, "stream": True}
    with httpx.stream("POST", server.url + "/generate", json=body, timeout=60) as r:
        lines = r.iter_lines()  # kept: a dropped iterator closes the connection, and the request is aborted
        next(lines)
        status, out = server.post("/hicache/storage-backend", {}, method="DELETE")
        assert status == 400 and "retry when idle" in out["message"], out
    deadline = time.monotonic() + 30
    while server.post("/hicache/storage-backend", {}, method="DELETE")[0] != 200:
        assert time.monotonic() < deadline
        time.sleep(0.1)


@pytest.mark.parametrize(
    "argv,says",
    [
        (["--hicache-storage-backend", "file"], "needs the host tier: add --enable-hierarchical-cache"),
        (["--disable-radix-cache", "--enable-hierarchical-cache"], "--disable-radix-cache"),
        (["--model-path", "/nonexistent/model"], "not a directory"),
        (["--tp-size", "4"], "must divide evenly"),
        (["--port", "70000"], "--port"),
    ],
)
def test_serve_flags_fail_clearly(argv, says):
    r = subprocess.run(
        [sys.executable, "-m", "hicache_core.cli", "serve", "--port", "0", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert says in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert re.match(r"(hicache: error|usage)", r.stderr)
