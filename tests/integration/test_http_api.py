"""The OpenAI-compatible HTTP front on a real deployment (the session's Ray workers, CPU): routers with the HTTP API
(one plain, one behind an API key and TLS) started on the same workers. Text is checked against `LLM` greedy (or
seeded) output on the same checkpoint with the same chat template applied; counts, statuses and messages exactly."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import shutil
import ssl
import subprocess
import time

import grpc
import httpx
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.reflection_pb2 import ServerReflectionRequest
from grpc_reflection.v1alpha.reflection_pb2_grpc import ServerReflectionStub
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient
from transformers import AutoTokenizer

from bench.load.cli import main as bench_main
from bench.load.openai_backend import OpenAIClient, OpenAIError
from client import Client, KvrelayError
from deploy import DEFAULT_MODEL_DIR
from engine import LLM, SamplingParams
from engine.tokenizer import Tokenizer
from router.http.app import build_app
from router.http.frontend import Frontend
from router.http.logprobs import TokenTexts
from router.server import RouterServer

KEY = "sk-test-5f3a"
MESSAGES = [{"role": "system", "content": "Answer in one line."}, {"role": "user", "content": "Return a list of"}]


def start_router(served, **overrides) -> RouterServer:
    cfg = dataclasses.replace(served.cfg.router_config(), port=0, http_port=0, **overrides)
    router = RouterServer(cfg, served.placed.prefill_config.model, served.placed.prefill, served.placed.decode,
                          secret=served.placed.secret)
    asyncio.run_coroutine_threadsafe(router.start(served.cfg.max_model_len or 512, 60), served.loop).result(90)
    return router


def stop_router(served, router: RouterServer) -> None:
    asyncio.run_coroutine_threadsafe(router.stop(), served.loop).result(30)


@pytest.fixture(scope="module")
def router(served):
    r = start_router(served)
    yield r
    stop_router(served, r)


@pytest.fixture(scope="module")
def base(router) -> str:
    return f"http://127.0.0.1:{router.http_port}"


@pytest.fixture(scope="module")
def oai(base):
    with openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def llm():
    return LLM(DEFAULT_MODEL_DIR, dtype="float32", max_model_len=512)


def hf_chat_ids(messages: list[dict]) -> list[int]:
    """The reference chat prompt from transformers (not from the ChatTemplate under test)."""
    ids = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert isinstance(ids, list) and isinstance(ids[0], int)
    return ids


@pytest.fixture(scope="module")
def chat_ids() -> list[int]:
    ids = hf_chat_ids(MESSAGES)
    assert ids[0] == 1 and ids[1] != 1  # the template writes BOS once
    return ids


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, **kw)


def scrape(base: str, verify: ssl.SSLContext | bool = True) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics, parsed with prometheus_client's own parser."""
    text = httpx.get(f"{base}/metrics", verify=verify).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_completions_and_chat_equal_llm(oai, llm, chat_ids):
    prompt = "The default value is"
    (ref,) = llm.generate([prompt], greedy(16))
    r = oai.completions.create(model="default_model", prompt=prompt, max_tokens=16, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text == ref.text
    assert r.choices[0].finish_reason == ref.finish_reason
    n_prompt = len(Tokenizer.from_model_dir(DEFAULT_MODEL_DIR).encode(prompt))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == \
        (n_prompt, len(ref.token_ids), n_prompt + len(ref.token_ids))
    chunks = list(oai.completions.create(model="default_model", prompt=prompt, max_tokens=16, temperature=0,
                                         stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref.text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref.token_ids)

    (cref,) = llm.generate([chat_ids], greedy(12))
    c = oai.chat.completions.create(model="default_model", messages=MESSAGES, max_completion_tokens=12,
                                    temperature=0, user="someone")
    assert c.object == "chat.completion" and c.choices[0].message.role == "assistant"
    assert c.choices[0].message.content == cref.text and c.usage.prompt_tokens == len(chat_ids)
    assert c.usage.completion_tokens == len(cref.token_ids) and c.usage.prompt_tokens_details.cached_tokens >= 0
    parts = list(oai.chat.completions.create(model="default_model", messages=MESSAGES, max_tokens=12, temperature=0,
                                             stream=True))
    assert parts[0].choices[0].delta.role == "assistant" and parts[0].object == "chat.completion.chunk"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == cref.text
    assert parts[-1].choices[0].finish_reason == cref.finish_reason


def test_n_choices_with_seeds_are_reproducible(oai, llm):
    prompt = "If the file does not exist,"
    refs = llm.generate([prompt] * 3, [SamplingParams(max_tokens=10, temperature=1.0, seed=7 + i) for i in range(3)])
    kw = dict(model="default_model", prompt=prompt, max_tokens=10, temperature=1.0, seed=7, n=3)
    first = oai.completions.create(**kw)
    again = oai.completions.create(**kw)
    texts = [ch.text for ch in sorted(first.choices, key=lambda ch: ch.index)]
    assert texts == [r.text for r in refs] == [ch.text for ch in sorted(again.choices, key=lambda ch: ch.index)]
    assert len(set(texts)) > 1  # seed + i: the choices differ
    assert first.usage.completion_tokens == sum(len(r.token_ids) for r in refs)
    streamed: dict[int, str] = {}
    for ch in oai.completions.create(**kw, stream=True):
        for choice in ch.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text
    assert [streamed[i] for i in range(3)] == texts


def test_raw_sse_framing(base, llm, chat_ids):
    (ref,) = llm.generate([chat_ids], greedy(6))
    body = {"messages": MESSAGES, "max_tokens": 6, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert {p["object"] for p in payloads} == {"chat.completion.chunk"} and len({p["id"] for p in payloads}) == 1
    assert payloads[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert payloads[-2]["choices"][0]["finish_reason"] == "length" and payloads[-2]["choices"][0]["delta"] == {}
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"] == {
        "prompt_tokens": len(chat_ids), "completion_tokens": 6, "total_tokens": len(chat_ids) + 6,
        "prompt_tokens_details": {"cached_tokens": payloads[-1]["usage"]["prompt_tokens_details"]["cached_tokens"]}}
    assert all(p["usage"] is None for p in payloads[:-1])
    assert "".join(p["choices"][0]["delta"].get("content", "") for p in payloads[:-1]) == ref.text


def test_logprobs_in_both_formats(oai, llm, chat_ids):
    prompt = "Return True if the"
    (ref,) = llm.generate([prompt], greedy(6, logprobs=2))
    r = oai.completions.create(model="default_model", prompt=prompt, max_tokens=6, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(ref.token_ids) == len(lp.token_logprobs) == len(lp.top_logprobs)
    assert "".join(lp.tokens) == r.choices[0].text == ref.text
    assert lp.token_logprobs == pytest.approx([x.logprob for x in ref.logprobs], abs=1e-4)
    tok = Tokenizer.from_model_dir(DEFAULT_MODEL_DIR)
    prev = tok.encode(prompt)[-1]
    for i, x in enumerate(ref.logprobs):  # each alternative's id (as its text after the previous token) and logprob
        after = tok.decode([prev], skip_special_tokens=False)
        want = {tok.decode([prev, tid], skip_special_tokens=False)[len(after):]: p for tid, p in x.top}
        assert lp.top_logprobs[i].keys() == want.keys() and list(lp.top_logprobs[i].values()) == \
            pytest.approx(list(want.values()), abs=1e-4)
        prev = x.token_id
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(lp.tokens))]
    (cref,) = llm.generate([chat_ids], greedy(5, logprobs=3))
    c = oai.chat.completions.create(model="default_model", messages=MESSAGES, max_tokens=5, temperature=0,
                                    logprobs=True, top_logprobs=3)
    content = c.choices[0].logprobs.content
    assert len(content) == c.usage.completion_tokens == 5
    assert all(len(e.top_logprobs) == 3 and e.bytes == list(e.token.encode()) for e in content)
    assert "".join(e.token for e in content) == c.choices[0].message.content == cref.text
    assert [e.logprob for e in content] == pytest.approx([x.logprob for x in cref.logprobs], abs=1e-4)
    assert [t.logprob for e in content for t in e.top_logprobs] == \
        pytest.approx([p for x in cref.logprobs for _, p in x.top], abs=1e-4)


def moved_since(before: dict, after: dict, name: str, **labels) -> float:
    """How far a sample moved; every kvrelay: metric carries the served model's name."""
    key = (name, tuple(sorted({"model_name": "default_model", **labels}.items())))
    return after.get(key, 0) - before.get(key, 0)


def test_disconnects_abort_every_choice_on_the_workers(base, served):
    """n=3, streamed then whole: closing the connection frees every block on every worker long before the
    choices could have finished by themselves (at the token rate the stream showed)."""
    served.wait_all_free()
    before = scrape(base)
    total = 3 * 480
    body = {"prompt": "Return a list of", "max_tokens": 480, "ignore_eos": True, "temperature": 0, "n": 3,
            "logprobs": 0}
    with httpx.stream("POST", f"{base}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        got, first = 0, 0.0
        for line in r.iter_lines():
            if line.startswith("data: {"):
                got += sum(len(c["logprobs"]["tokens"]) for c in json.loads(line[6:])["choices"] if c["logprobs"])
                first = first or time.monotonic()
                if time.monotonic() - first > 0.5:
                    break
        rate = got / (time.monotonic() - first)  # tokens/s of the 3 choices together (first chunks count at t=0)
    left = time.monotonic()
    served.wait_all_free()
    assert got < total and time.monotonic() - left < (total - got) / rate / 3, (got, rate, time.monotonic() - left)

    sent = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):  # the client gives up on a whole response after 1 s
        httpx.post(f"{base}/v1/completions", json=body, timeout=httpx.Timeout(60, read=1.0))
    left = time.monotonic()
    served.wait_all_free()
    assert time.monotonic() - left < (total - rate * (left - sent)) / rate / 3
    after = scrape(base)
    assert moved_since(before, after, "kvrelay:request_errors_total", status="CANCELLED") == 6
    assert moved_since(before, after, "kvrelay:request_success_total", finished_reason="length") == 0


def test_overload_is_429_and_no_decode_group_is_503(served):
    """A router without a waiting line: 8 choices cannot all get one of the decode group's 4 seats, so 429; the
    choices the server then stopped are not counted as cancelled by the client. With its decode group marked
    down (as a failed call marks it; no load poll brings it back here): 503 on requests and /health."""
    r = start_router(served, max_queued_requests=0, load_poll_interval_s=3600.0)
    try:
        base = f"http://127.0.0.1:{r.http_port}"
        served.wait_all_free()
        before = scrape(base)
        body = {"prompt": "Return a list of", "max_tokens": 400, "ignore_eos": True, "n": 8}
        resp = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
        assert resp.status_code == 429, resp.text
        err = resp.json()["error"]
        assert (err["type"], err["code"]) == ("requests", "rate_limit_exceeded") and "capacity" in err["message"]
        served.wait_all_free()
        after = scrape(base)
        refused = moved_since(before, after, "kvrelay:request_errors_total", status="RESOURCE_EXHAUSTED")
        assert 1 <= refused <= 4 and moved_since(before, after, "kvrelay:request_errors_total", status="CANCELLED") == 0
        assert sum(v - before.get(k, 0) for k, v in after.items() if k[0] == "kvrelay:request_errors_total") == refused

        async def mark_down() -> None:
            r.pool.mark_unhealthy(r.pool.decode[0], "decode-0 is down (test)")

        asyncio.run_coroutine_threadsafe(mark_down(), served.loop).result(10)
        resp = httpx.post(f"{base}/v1/completions", json={"prompt": "x", "max_tokens": 4}, timeout=30)
        assert resp.status_code == 503 and resp.json()["error"]["type"] == "server_error"
        assert "no healthy decode group" in resp.json()["error"]["message"]
        health = httpx.get(f"{base}/health")
        assert health.status_code == 503 and "decode-0 is down (test)" in health.json()["reason"]
    finally:
        stop_router(served, r)


BAD = [
    ("/v1/completions", {"prompt": "x", "max_tokens": "5"}, 400, "'max_tokens': Input should be a valid integer",
     "max_tokens"),
    ("/v1/completions", {"max_tokens": 5}, 400, "'prompt' is required", "prompt"),
    ("/v1/completions", {"prompt": [1, "a"]}, 400, "'prompt' must be a string, a list of strings, a list of token "
     "ids or a list of lists of token ids", "prompt"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature must be a finite number >= 0",
     "temperature"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 600}, 400, "lower max_tokens to at most", "max_tokens"),
    ("/v1/completions", {"prompt": [5000]}, 400, "prompt token ids [5000] are outside the vocabulary", "prompt"),
    ("/v1/completions", {"prompt": "x", "n": 9}, 400, "n must be between 1 and 8, got 9", "n"),
    ("/v1/completions", {"prompt": "x", "echo": True}, 400, "echo is not supported", "echo"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "the model 'gpt-4' does not exist here", "model"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages must not be empty", "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, 400,
     "'messages.0.content' must be a string or a list of {type, text} parts", "messages"),
    ("/v1/chat/completions", {"messages": MESSAGES, "top_logprobs": 2}, 400, "top_logprobs needs logprobs: true",
     "top_logprobs"),
    ("/v1/chat/completions", {"messages": MESSAGES, "logprobs": True, "top_logprobs": 21}, 400,
     "logprobs must be an integer in [0, 20]", "top_logprobs"),
    # Each field the intake refuses (router.requests.FieldError) is OpenAI's `param`.
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens must be an integer >= 1", "max_tokens"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p must be in (0, 1]", "top_p"),
    ("/v1/completions", {"prompt": "x", "top_k": -2}, 400, "top_k must be an integer >= 0", "top_k"),
    ("/v1/completions", {"prompt": "x", "seed": -1}, 400, "seed must be a non-negative integer", "seed"),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, 400, "stop must be non-empty strings", "stop"),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": [-1]}, 400, "stop_token_ids must be non-negative",
     "stop_token_ids"),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": [5000]}, 400, "stop_token_ids [5000] are outside",
     "stop_token_ids"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, 400, "logprobs must be an integer in [0, 20]", "logprobs"),
    ("/v1/completions", {"prompt": [1] * 600}, 400, "the prompt has 600 tokens; at most 511 fit", "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "go " * 600}]}, 400, "at most 511 fit",
     "messages"),
    ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 600}, 400, "lower max_tokens to at most",
     "max_tokens"),
    ("/v1/chat/completions", {"messages": MESSAGES, "temperature": -1}, 400, "temperature must be", "temperature"),
]


@pytest.mark.parametrize("path,body,status,message,param", BAD)
def test_bad_input_gets_its_status_and_message(base, path, body, status, message, param):
    r = httpx.post(f"{base}{path}", json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and message in err["message"] and err["param"] == param
    assert err["type"] == "invalid_request_error" and err["code"] == ("model_not_found" if status == 404 else None)


def test_cached_tokens_are_the_prompts_whole_cached_blocks(oai, served):
    """The same prompt twice: the second reuses every whole block of the prompt (the last token is always
    computed), in completions and chat usage alike."""
    block = served.loads()[0].block_size
    prompt = [1] + [(7 * i + 11) % 4000 + 3 for i in range(2 * block + 9)]  # seen by no other test
    first, again = (oai.completions.create(model="default_model", prompt=prompt, max_tokens=2) for _ in range(2))
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details.cached_tokens == 2 * block
    messages = [{"role": "user", "content": "Explain what a context manager does, in one short sentence here."}]
    n = len(hf_chat_ids(messages))
    assert n % block and n > block  # some whole blocks, and a partial one that is never cached
    for _ in range(2):
        c = oai.chat.completions.create(model="default_model", messages=messages, max_tokens=2)
    assert c.usage.prompt_tokens == n and c.usage.prompt_tokens_details.cached_tokens == (n // block) * block


def test_not_json_and_unknown_route(base):
    r = httpx.post(f"{base}/v1/completions", content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.get(f"{base}/v1/embeddings")
    assert r.status_code == 404 and "there is no GET /v1/embeddings here" in r.json()["error"]["message"]
    assert r.json()["error"]["code"] is None and r.json()["error"]["param"] is None  # not an unknown model


def test_body_size_is_capped_while_reading_even_chunked(base):
    """A chunked body (no Content-Length) one byte over 8 MiB is 413 with OpenAI's error JSON, counted; one of
    exactly 8 MiB is served (parsed off the loop: it is over 256 KiB)."""
    def chunked(payload: bytes, size: int):  # a generator body: httpx sends it with Transfer-Encoding: chunked
        yield payload
        left = size - len(payload)
        while left > 0:
            piece = min(left, 1 << 16)
            yield b" " * piece
            left -= piece

    limit = 8 << 20
    payload = json.dumps({"prompt": [1, 450, 7], "max_tokens": 2}).encode()
    before = scrape(base)
    r = httpx.post(f"{base}/v1/completions", content=chunked(payload, limit + 1),
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413, r.text
    assert r.request.headers.get("transfer-encoding") == "chunked" and "content-length" not in r.request.headers
    assert r.json() == {"error": {"message": f"the request body is over {limit} bytes; at most {limit} bytes (8 MiB) "
                                  "are accepted: send a shorter prompt, or fewer prompts per request",
                                  "type": "invalid_request_error", "param": None, "code": None}}
    assert moved_since(before, scrape(base), "kvrelay:request_errors_total", status="INVALID_ARGUMENT") == 1
    r = httpx.post(f"{base}/v1/completions", content=chunked(payload, limit),
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"] == {
        "prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5, "prompt_tokens_details": {"cached_tokens": 0}}


def test_content_parts_and_chat_template_kwargs_cannot_replace_the_messages(base, llm):
    """Text parts are joined with newlines (as vLLM does); chat_template_kwargs cannot replace the messages."""
    ids = hf_chat_ids([MESSAGES[0], {"role": "user", "content": "Return a\nlist of"}])
    (ref,) = llm.generate([ids], greedy(5))
    parts = [{"type": "text", "text": "Return a"}, {"type": "text", "text": "list of"}]
    body = {"messages": [MESSAGES[0], {"role": "user", "content": parts}], "max_tokens": 5, "temperature": 0,
            "chat_template_kwargs": {"messages": [{"role": "user"}], "add_generation_prompt": False}}
    r = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == ref.text
    assert r.json()["usage"]["prompt_tokens"] == len(ids)


def test_a_router_bug_is_an_openai_json_500_and_counted(router, base):
    """Whatever escapes a route (here the health callback) answers OpenAI's error JSON, never plain text."""
    def broken() -> tuple[bool, str]:
        raise RuntimeError("the health callback broke")

    front = Frontend(intake=router.intake, model_name="default_model", chat_template=None,
                     texts=TokenTexts(None), api_key=None, healthy=broken)
    before = scrape(base)
    with TestClient(build_app(front), raise_server_exceptions=False) as c:
        r = c.get("/health")
    assert r.status_code == 500 and r.json() == {"error": {
        "message": "internal error in the router: RuntimeError: the health callback broke", "type": "server_error",
        "param": None, "code": None}}
    assert moved_since(before, scrape(base), "kvrelay:request_errors_total", status="INTERNAL") == 1


def test_openai_client_errors(oai):
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        oai.completions.create(model="default_model", prompt="x", max_tokens=0)


def test_models_health_and_metrics_counters(base, served):
    models = httpx.get(f"{base}/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["default_model"]
    assert models["data"][0]["max_model_len"] == 512 and models["data"][0]["vocab_size"] == 4096
    assert httpx.get(f"{base}/health").json() == {"status": "ok"}
    served.wait_all_free()
    before = scrape(base)
    prompts = [[1, 450, 7, 99], [1, 31, 2000, 5, 6, 77]]
    for p in prompts:
        r = httpx.post(f"{base}/v1/completions", json={"prompt": p, "max_tokens": 5, "ignore_eos": True,
                                                       "temperature": 0}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
    assert httpx.post(f"{base}/v1/completions", json={"prompt": "x", "top_p": 0}).status_code == 400
    after = scrape(base)

    def moved(name: str, **labels) -> float:
        return moved_since(before, after, name, **labels)

    assert moved("kvrelay:request_success_total", finished_reason="length") == 2
    assert moved("kvrelay:request_errors_total", status="INVALID_ARGUMENT") == 1
    assert moved("kvrelay:prompt_tokens_total") == moved("kvrelay:prefix_cache_queries_total") == 10
    assert moved("kvrelay:generation_tokens_total") == 10
    for h in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
              "kv_transfer_time_seconds", "kv_transfer_bytes"):
        assert moved(f"kvrelay:{h}_count") == 2, h
    # 4 layers x 2 KV heads x head_dim 48 x keys and values x float32, per prompt token
    assert moved("kvrelay:kv_transfer_bytes_sum") == 10 * 4 * 2 * 48 * 2 * 4
    # One per token after the first (the prefill worker's, alone in its chunk: its wait is the TTFT).
    assert moved("kvrelay:inter_token_latency_seconds_count") == 2 * 4
    for worker in ("prefill-0", "decode-0"):
        for g in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
            assert (f"kvrelay:{g}", (("model_name", "default_model"), ("worker", worker))) in after
    assert all(dict(labels).get("model_name") == "default_model" for name, labels in after
               if name.startswith("kvrelay:")), "every kvrelay: sample carries model_name"


def test_tokens_are_counted_as_they_stream_even_when_cancelled(router, base, served):
    """Two requests finish over HTTP; a third (through the intake, as both fronts run requests) is closed after
    its first 20 tokens. Prompt tokens count when a request is taken, generation tokens per streamed chunk (the
    cancelled request's too), inter-token latency once per token after each request's first chunk."""
    served.wait_all_free()
    before = scrape(base)
    for p in ([1, 450, 7, 99], [1, 31, 2000, 5, 6, 77]):
        r = httpx.post(f"{base}/v1/completions", json={"prompt": p, "max_tokens": 7, "ignore_eos": True}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 7

    async def cancelled() -> list[int]:
        spec = await router.intake.admit([1, 88, 412, 9, 3], {"max_tokens": 480, "ignore_eos": True})
        sizes: list[int] = []
        async with contextlib.aclosing(router.intake.run(spec)) as items:
            async for item in items:
                sizes.append(len(item.token_ids))
                if sum(sizes) >= 20:
                    break  # closing the stream cancels the request, as a client leaving does
        return sizes

    sizes = asyncio.run_coroutine_threadsafe(cancelled(), served.loop).result(60)
    served.wait_all_free()
    after = scrape(base)

    def moved(name: str, **labels) -> float:
        return moved_since(before, after, name, **labels)

    assert sum(sizes) < 480 and moved("kvrelay:request_errors_total", status="CANCELLED") == 1
    assert moved("kvrelay:request_success_total", finished_reason="length") == 2
    assert moved("kvrelay:prompt_tokens_total") == 4 + 6 + 5
    assert moved("kvrelay:generation_tokens_total") == 2 * 7 + sum(sizes)
    assert moved("kvrelay:inter_token_latency_seconds_count") == 2 * 6 + sum(sizes) - sizes[0]
    assert moved("kvrelay:prefix_cache_queries_total") == 4 + 6  # known once a request finishes
    assert moved("kvrelay:e2e_request_latency_seconds_count") == 2


def test_undecodable_grpc_requests_are_counted(router, base):
    """The parse guard's INVALID_ARGUMENT for bytes that are no GenerateRequest counts like any refusal."""
    before = scrape(base)
    with grpc.insecure_channel(f"127.0.0.1:{router.port}") as ch:
        generate = ch.unary_stream("/kvrelay.v1.Generation/Generate", request_serializer=lambda b: b,
                                   response_deserializer=lambda b: b)
        for body in (b"\xff\xff\xff\xff", b"\x22\x02\xc3\x28"):  # garbage; request_id with invalid UTF-8
            with pytest.raises(grpc.RpcError) as e:
                list(generate(body, timeout=10))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "could not be parsed" in e.value.details()
    assert moved_since(before, scrape(base), "kvrelay:request_errors_total", status="INVALID_ARGUMENT") == 2


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a self-signed certificate")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(d / "key.pem"),
                    "-out", str(d / "cert.pem")], check=True, capture_output=True)
    return str(d / "cert.pem"), str(d / "key.pem")


def test_api_key_and_tls_on_both_protocols(served, tls_files, llm):
    cert, key = tls_files
    secure = start_router(served, api_key=KEY, tls_cert=cert, tls_key=key)
    try:
        https = f"https://127.0.0.1:{secure.http_port}"
        ctx = ssl.create_default_context(cafile=cert)
        before = scrape(https, ctx)
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = httpx.post(f"{https}/v1/completions", json={"prompt": "x"}, headers=headers, verify=ctx)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        after_401 = scrape(https, ctx)
        for name in ("kvrelay:prompt_tokens_total", "kvrelay:prefix_cache_queries_total",
                     "kvrelay:generation_tokens_total", "kvrelay:e2e_request_latency_seconds_count"):
            assert moved_since(before, after_401, name) == 0, name  # a refused request did no work
        assert httpx.get(f"{https}/health", verify=ctx).status_code == 200  # no key needed
        (ref,) = llm.generate(["Return a list of"], greedy(8))
        with openai.OpenAI(base_url=f"{https}/v1", api_key=KEY, max_retries=0,
                           http_client=httpx.Client(verify=ctx)) as c:
            out = c.completions.create(model="default_model", prompt="Return a list of", max_tokens=8, temperature=0)
            assert out.choices[0].text == ref.text
        with openai.OpenAI(base_url=f"{https}/v1", api_key="bad", max_retries=0,
                           http_client=httpx.Client(verify=ctx)) as c, pytest.raises(openai.AuthenticationError):
            c.models.list()
        target = f"127.0.0.1:{secure.port}"
        for api_key in (None, "wrong"):
            with Client(target, timeout=30, ca_cert=cert, api_key=api_key) as c, pytest.raises(KvrelayError) as e:
                c.generate("Return a list of", max_tokens=4)
            assert e.value.code == "UNAUTHENTICATED" and "API key" in e.value.details
        with Client(target, timeout=60, ca_cert=cert, api_key=KEY) as c:
            assert c.generate("Return a list of", max_tokens=8, temperature=0).text == ref.text
        creds = grpc.ssl_channel_credentials(open(cert, "rb").read())
        with grpc.secure_channel(target, creds) as ch:  # health needs no key
            assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
                health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(KvrelayError):  # plaintext to a TLS port fails
            with Client(target, timeout=5, api_key=KEY) as c:
                c.model_info()
        for api_key in (None, "wrong"):  # server reflection is not open: it needs the key too
            with grpc.secure_channel(target, creds) as ch, pytest.raises(grpc.RpcError) as e:
                list(ServerReflectionStub(ch).ServerReflectionInfo(
                    iter([ServerReflectionRequest(list_services="")]), timeout=10,
                    metadata=(("authorization", f"Bearer {api_key}"),) if api_key else None))
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with grpc.secure_channel(target, creds) as ch:
            (listed,) = ServerReflectionStub(ch).ServerReflectionInfo(
                iter([ServerReflectionRequest(list_services="")]), timeout=10,
                metadata=(("authorization", f"Bearer {KEY}"),))
            assert "kvrelay.v1.Generation" in {svc.name for svc in listed.list_services_response.service}
        after = scrape(https, ctx)
        # 3 HTTP completions, 1 HTTP models list, 2 gRPC calls, 2 reflection calls
        assert moved_since(before, after, "kvrelay:request_errors_total", status="UNAUTHENTICATED") == 8
    finally:
        stop_router(served, secure)


def test_bench_openai_backend_against_the_http_front(base, tmp_path):
    out = tmp_path / "oai.json"
    rc = bench_main(["--backend", "openai", "--base-url", f"{base}/v1", "--concurrency", "2", "--num-requests", "4",
                     "--input-len", "12", "--output-len", "6", "--ignore-eos", "--seed", "3", "--out", str(out),
                     "--quiet"])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["config"]["backend"] == "openai" and "api_key" not in doc["config"]
    assert doc["model"]["model"] == "default_model" and doc["model"]["vocab_size"] == 4096
    m = doc["metrics"]
    assert (m["requested"], m["completed"], m["failed"]) == (4, 4, 0), doc["errors"]
    assert m["total_output_tokens"] == 24 and m["ttft_ms"]["count"] == 4
    for r in doc["requests"]:
        assert r["ok"] and r["finish_reason"] == "length" and r["completion_tokens"] == 6 == r["output_tokens"]
        assert r["prompt_tokens"] == r["prompt_len"] and r["server_timings_ms"] is None
        assert r["ttft_ms"] <= r["e2e_ms"]


def test_bench_openai_backend_timeout_bounds_the_whole_request(base, served):
    """Tokens keep coming (no single read waits 1 s), yet the request ends at its 1 s deadline."""
    async def run() -> tuple[str, int, float]:
        async with OpenAIClient(f"{base}/v1", model="default_model") as c:
            start, got = time.monotonic(), 0
            with pytest.raises(OpenAIError) as e:
                async for _ in c.stream([1, 450, 7], timeout=1.0, max_tokens=480, ignore_eos=True):
                    got += 1
            return e.value.code, got, time.monotonic() - start

    code, got, took = asyncio.run(run())
    assert code == "DEADLINE_EXCEEDED" and got > 1 and took < 2.5
    served.wait_all_free()  # closing the connection aborted the request
